//! Retry-loop stage: attempts on one account after another until one is accepted or nothing is
//! left to try, and, when every attempt failed, which failure the client sees
//! ([`final_answer`]: the most informative, the latest among equals).

use super::attempt::{attempt_span, remaining_until, AttemptCtx};
use super::schedule::Waited;
use super::session::Session;
use super::{headers, not_ours, Proxy};
use crate::errors::{full, ApiError, Body};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use std::time::{Duration, Instant};

impl Proxy {
    /// The retry loop: an account, an attempt, and on failure another account, until an answer
    /// is accepted, the deadline runs out, nothing is left to try, or `retry.max_attempts`
    /// attempts that took real time have failed. Each account is tried at most once; a failure
    /// quicker than `retry.quick_failure_ms` (a 429 or 529 at once, a refused connection) costs
    /// no attempt, so a group with healthy accounts is never given up on because its broken ones
    /// answered first.
    pub(super) async fn attempts(&self, ctx: &AttemptCtx<'_>, session: &Session) -> Result<Response<Body>, ApiError> {
        let bound = session.bound.as_deref();
        let scheduler = self.scheduler();
        let want = ctx.want();
        let (policy, deadline, request_id) = (ctx.policy, ctx.deadline, ctx.request_id);
        let mut tried: Vec<String> = Vec::new();
        let mut failures: Vec<Failure> = Vec::new();
        let mut costly = 0u32;
        let mut waited = Waited::default();
        let mut endpoint_missing = 0u32;
        while costly < policy.max_attempts {
            let Some((account, slot)) = scheduler.acquire(&want, &tried, bound, deadline, &mut waited).await? else {
                break;
            };
            if !tried.is_empty() {
                metrics::counter!(relay_proto::metrics::FAILOVERS_TOTAL).increment(1);
            }
            let began = Instant::now();
            let span = attempt_span(ctx, &account, tried.len() + 1);
            match self.attempt(ctx, account.clone(), slot, waited, span.clone()).await {
                Ok(resp) => {
                    session.answered_by(self.sessions.as_ref(), &account.id).await;
                    super::meters::attempt_ok();
                    tracing::Span::current().record("relay.attempts", tried.len() as i64 + 1);
                    return Ok(resp);
                }
                Err((failure, retry)) => {
                    if retry {
                        span.record("relay.retry_reason", failure.reason().as_str());
                    }
                    drop(span);
                    let slow = began.elapsed() >= policy.quick_failure;
                    metrics::counter!(relay_proto::metrics::ATTEMPTS_TOTAL, "outcome" => if slow { "failed" } else { "refused" })
                        .increment(1);
                    tried.push(account.id.clone());
                    if !retry {
                        // The request itself was refused (invalid, too large): no account would
                        // take it, and the client gets that answer as it is.
                        tracing::Span::current().record("relay.attempts", tried.len() as i64);
                        return Ok(failure.into_response(request_id));
                    }
                    // count_tokens on upstreams without the endpoint: two such answers say
                    // enough; the estimate answers instead of every account being asked.
                    let missing = !ctx.is_messages && failure.status().is_some_and(|s| matches!(s, 404 | 405));
                    failures.push(failure);
                    if missing {
                        endpoint_missing += 1;
                        if endpoint_missing >= 2 {
                            break;
                        }
                    }
                    if slow {
                        costly += 1;
                        let pause = policy.backoff(costly).min(remaining_until(deadline));
                        tokio::time::sleep(pause).await;
                        not_ours(pause);
                    }
                }
            }
        }
        tracing::Span::current().record("relay.attempts", tried.len() as i64);
        if failures.is_empty() {
            let hint = scheduler.retry_after_hint(&want);
            // It waited for a recovery and none came, nor is any account's return known: every
            // account is out until an operator (or a check) restores it. A client retry cannot
            // help, so SDKs are told not to: 503, not a 529 that they retry.
            if waited.what == "recovery" && hint.is_none() {
                return Err(ApiError::not_configured(format!(
                    "every upstream account that can serve this API key is out of service until an operator or an \
                     account check restores it (blocked, unauthorized or failing); none recovered in the {} s \
                     this request waited",
                    waited.ms.div_ceil(1000)
                )));
            }
            return Err(ApiError::overloaded(
                "no upstream account is available for this key right now",
                hint.unwrap_or(5),
            ));
        }
        // count_tokens keeps the upstreams' own answers: `estimate_unanswered` reads them.
        Ok(final_answer(failures, scheduler.retry_after_hint(&want), ctx.is_messages).into_response(request_id))
    }
}

/// Why an attempt failed: the upstream's own answer (passed to the client as
/// is when it is the last one), or the relay's.
pub(super) enum Failure {
    Upstream {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        retry_after: Option<Duration>,
    },
    Relay(ApiError),
}

impl Failure {
    pub(super) fn into_response(self, request_id: &str) -> Response<Body> {
        match self {
            Failure::Upstream {
                status,
                mut headers,
                body,
                retry_after,
            } => {
                headers.remove(header::CONTENT_LENGTH);
                if let Ok(v) = HeaderValue::from_str(request_id) {
                    headers.insert("request-id", v);
                }
                if let Some(ra) = retry_after {
                    headers.insert(header::RETRY_AFTER, headers::client_retry_after(ra));
                }
                let mut r = Response::new(full(body));
                *r.status_mut() = status;
                *r.headers_mut() = headers;
                r
            }
            Failure::Relay(e) => e.into_response(request_id),
        }
    }
}

impl Failure {
    /// Why another account is tried after this failure (a span attribute).
    fn reason(&self) -> String {
        match self {
            Failure::Upstream { status, .. } => format!("upstream_{}", status.as_u16()),
            Failure::Relay(e) => e.kind.to_string(),
        }
    }

    /// The upstream's status, when the upstream answered.
    fn status(&self) -> Option<u16> {
        match self {
            Failure::Upstream { status, .. } => Some(status.as_u16()),
            Failure::Relay(_) => None,
        }
    }

    /// How much the answer tells the client, lower first: when to come back (429), that the
    /// service is busy (529), the upstream's own server error, relay's (timeout, unreachable, not
    /// an Anthropic answer), and last an account's own refusal of its credentials or URL.
    fn rank(&self) -> u8 {
        match self {
            Failure::Upstream { status, .. } => match status.as_u16() {
                429 => 0,
                529 => 1,
                408 | 500..=599 => 2,
                _ => 4,
            },
            Failure::Relay(_) => 3,
        }
    }
}

/// The answer a client gets when every attempt failed: the most informative failure (see
/// [`Failure::rank`]; the latest among equals). A rate limit or overload carries the soonest
/// `retry-after` any attempt was told, or any account of the group is known to return at
/// (`hint_secs`). An account's 401/403/404 concerns relay's credentials or the account's URL, not
/// the client's key: it becomes relay's 502 naming the status, never the upstream's 401.
fn final_answer(failures: Vec<Failure>, hint_secs: Option<u64>, hide_account_refusals: bool) -> Failure {
    let soonest = failures
        .iter()
        .filter_map(|f| match f {
            Failure::Upstream {
                status, retry_after, ..
            } if matches!(status.as_u16(), 429 | 529) => *retry_after,
            _ => None,
        })
        .chain(hint_secs.map(Duration::from_secs))
        .min();
    let n = failures.len();
    let best = failures.into_iter().enumerate().min_by_key(|(i, f)| (f.rank(), n - i));
    match best {
        Some((_, f)) if f.rank() == 4 && hide_account_refusals => {
            let what = match &f {
                Failure::Upstream { status, .. } => status.as_u16().to_string(),
                Failure::Relay(_) => String::new(),
            };
            Failure::Relay(ApiError::upstream_unreachable(format!(
                "no upstream account could take this request: the upstream refused the account ({what}); the relay's operator must check its credentials or base URL"
            )))
        }
        Some((
            _,
            Failure::Upstream {
                status,
                headers,
                body,
                retry_after,
            },
        )) if matches!(status.as_u16(), 429 | 529) => Failure::Upstream {
            status,
            headers,
            body,
            retry_after: soonest.or(retry_after),
        },
        Some((_, f)) => f,
        None => Failure::Relay(ApiError::overloaded(
            "no upstream account is available for this key right now",
            hint_secs.unwrap_or(5),
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn upstream(status: u16, retry_after_secs: Option<u64>) -> Failure {
        Failure::Upstream {
            status: StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: crate::errors::upstream_error_body(StatusCode::from_u16(status).unwrap()),
            retry_after: retry_after_secs.map(Duration::from_secs),
        }
    }

    fn answer(failures: Vec<Failure>, hint: Option<u64>) -> (u16, Option<String>, String) {
        let r = final_answer(failures, hint, true).into_response("req_1");
        let retry_after = r
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_string());
        let status = r.status().as_u16();
        let body = futures_body(r);
        (status, retry_after, body)
    }

    fn futures_body(r: Response<Body>) -> String {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let b = rt.block_on(crate::proxy::body_bytes(r.into_body())).unwrap();
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[test]
    fn a_rate_limit_wins_and_carries_the_soonest_retry_after() {
        let (status, ra, _) = answer(
            vec![
                upstream(500, None),
                upstream(429, Some(40)),
                Failure::Relay(ApiError::upstream_unreachable("x")),
                upstream(529, Some(7)),
                upstream(429, Some(30)),
            ],
            Some(20),
        );
        assert_eq!((status, ra.as_deref()), (429, Some("7")));
        // The group's soonest return counts too.
        let (_, ra, _) = answer(vec![upstream(429, Some(40))], Some(3));
        assert_eq!(ra.as_deref(), Some("3"));
    }

    #[test]
    fn an_upstream_server_error_says_more_than_relays_own() {
        let (status, _, body) = answer(
            vec![
                upstream(500, None),
                Failure::Relay(ApiError::upstream_unreachable("the upstream could not be reached")),
            ],
            None,
        );
        assert_eq!(status, 500, "{body}");
        let (status, _, _) = answer(vec![upstream(529, None), upstream(503, None)], None);
        assert_eq!(status, 529);
        // Among equals, the latest.
        let (status, _, _) = answer(vec![upstream(500, None), upstream(503, None)], None);
        assert_eq!(status, 503);
    }

    #[test]
    fn an_accounts_refused_credentials_never_reach_the_client_as_its_own() {
        let (status, _, body) = answer(vec![upstream(401, None), upstream(403, None)], None);
        assert_eq!(status, 502, "{body}");
        assert!(body.contains("refused the account (403)"), "{body}");
        assert!(body.contains("\"type\":\"api_error\""), "{body}");
        // Any other failure is more telling.
        let (status, _, _) = answer(
            vec![upstream(401, None), Failure::Relay(ApiError::upstream_unreachable("x"))],
            None,
        );
        assert_eq!(status, 502);
        let (status, _, _) = answer(vec![upstream(401, None), upstream(529, Some(2))], None);
        assert_eq!(status, 529);
    }

    /// The client's status after the retry loop over accounts answering these, in order.
    async fn retried(answers: [String; 2]) -> (u16, String) {
        use crate::proxy::testkit::{self, deadline, Acct};
        let a = testkit::upstream(vec![answers[0].clone()]).await;
        let b = testkit::upstream(vec![answers[1].clone()]).await;
        let dir = tempfile::tempdir().unwrap();
        let accounts = [Acct::new("a").at(&a).priority(0), Acct::new("b").at(&b).priority(1)];
        let p = testkit::proxy(
            testkit::config(1, &accounts, relay_proto::v1::KeyStatus::Active, &[]),
            dir.path(),
        );
        let req = testkit::request(&p, true);
        let log = testkit::log();
        let attempted = std::sync::atomic::AtomicBool::new(false);
        let ctx = AttemptCtx::new(&req, "req_test", Instant::now(), deadline(&req), None, &attempted, &log);
        let r = p.attempts(&ctx, &Session::default()).await.unwrap();
        let status = r.status().as_u16();
        let body = crate::proxy::body_bytes(r.into_body()).await.unwrap();
        (status, String::from_utf8_lossy(&body).to_string())
    }

    #[tokio::test]
    async fn the_retry_loop_fails_over_to_the_next_account_and_answers_with_the_most_telling_failure() {
        use crate::proxy::testkit::{answer, STREAM_OK};
        let overloaded = r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        let limited = r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#;
        let (status, body) = retried([
            answer(529, "application/json", overloaded),
            answer(200, "text/event-stream", STREAM_OK),
        ])
        .await;
        assert_eq!(status, 200);
        assert!(body.contains("message_stop"), "{body}");
        let (status, body) = retried([
            answer(429, "application/json", limited),
            answer(500, "text/plain", "oops"),
        ])
        .await;
        assert_eq!(status, 429, "a rate limit says more than a server error: {body}");
        assert!(body.contains("slow down"), "{body}");
    }
}
