//! Active health probes: a cheap call that costs no tokens (`GET /v1/models` with the account's
//! credential, through its outbound proxy) tells whether an account works. `relayctl account check`
//! runs one now on any replica ([`Prober::check`]); the leader probes accounts in trouble in the
//! background ([`Prober::run`]), backing off per account, and brings a repaired one back.
//!
//! A verdict marks the account like a data plane's report would: `ok` clears its states, `unauthorized`
//! takes it out until its credential changes, `rate limited` until the reset the upstream gave,
//! `unreachable` and server errors for a minute.

use crate::crypto::MasterKey;
use crate::model::{now_ms, Account, AccountHealth, AccountKind, AccountState, AuditRecord, Millis, Mutation};
use crate::store::{DynStore, StoreError};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use relay_net::client::{ProxySpec, Upstreams};
use relay_proto::anthropic::{ratelimit, ApiError};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

/// Who the states and audit entries probes write name.
pub const ACTOR: &str = "control-plane:probe";
/// How long a probe may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `unreachable` / server-error verdicts keep an account out.
const COOL_DOWN_MS: Millis = 60_000;
/// How often the leader looks for accounts in trouble.
const EVERY: Duration = Duration::from_secs(10);
/// Backoff of repeated probes of one account.
const FIRST_BACKOFF: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(30 * 60);

/// What a probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Unauthorized(String),
    /// Until (unix ms).
    RateLimited(Millis, String),
    Overloaded(String),
    /// Answered with a server error.
    Erroring(String),
    /// No answer: connect error, TLS error, timeout.
    Unreachable(String),
    /// The organization is disabled.
    Blocked(String),
}

impl Verdict {
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Unauthorized(_) => "unauthorized",
            Verdict::RateLimited(..) => "rate_limited",
            Verdict::Overloaded(_) => "overloaded",
            Verdict::Erroring(_) => "erroring",
            Verdict::Unreachable(_) => "unreachable",
            Verdict::Blocked(_) => "blocked",
        }
    }

    pub fn detail(&self) -> &str {
        match self {
            Verdict::Ok => "",
            Verdict::Unauthorized(d)
            | Verdict::RateLimited(_, d)
            | Verdict::Overloaded(d)
            | Verdict::Erroring(d)
            | Verdict::Unreachable(d)
            | Verdict::Blocked(d) => d,
        }
    }

    pub fn until(&self) -> Millis {
        match self {
            Verdict::RateLimited(u, _) => *u,
            _ => 0,
        }
    }

    /// The shared state this verdict sets (None: it clears them).
    fn state(&self, account_id: &str, now: Millis) -> Option<AccountState> {
        let (health, until) = match self {
            Verdict::Ok => return None,
            Verdict::Unauthorized(_) => (AccountHealth::Unauthorized, 0),
            Verdict::Blocked(_) => (AccountHealth::Blocked, 0),
            Verdict::RateLimited(u, _) => (AccountHealth::RateLimited, *u),
            Verdict::Overloaded(_) => (AccountHealth::Overloaded, now + COOL_DOWN_MS),
            Verdict::Erroring(_) | Verdict::Unreachable(_) => (AccountHealth::Erroring, now + COOL_DOWN_MS),
        };
        Some(AccountState {
            account_id: account_id.to_string(),
            scope: String::new(),
            health,
            reason: format!("probe: {}", self.detail()).chars().take(500).collect(),
            until,
            since: now,
            reported_by: ACTOR.into(),
            revision: 0,
        })
    }
}

/// Runs probes; one per control-plane replica.
pub struct Prober {
    pub store: DynStore,
    pub key: MasterKey,
    pub upstreams: Arc<Upstreams>,
}

/// The error type and message of an Anthropic error body (read by the one parser,
/// `relay_proto::anthropic`), bounded, with the account's `secrets` masked: an upstream may quote
/// the credential it was sent ("Incorrect API key provided: sk-…"), and this text goes into the
/// account's state (published, shown) and the audit log.
fn error_message(body: &[u8], secrets: &[String]) -> String {
    let (body, _) = relay_proto::redact::redact_body(body.to_vec(), secrets);
    let err = ApiError::parse(&body).unwrap_or_default();
    let s = match (err.kind().unwrap_or_default(), err.message().unwrap_or_default()) {
        ("", "") => String::new(),
        (kind, "") => kind.to_string(),
        ("", msg) => msg.to_string(),
        (kind, msg) => format!("{kind}: {msg}"),
    };
    s.chars().take(200).collect()
}

/// Until when a 429 keeps the account out: `retry-after` (at most a day), else the unified reset
/// (subscription accounts), else the limiting `anthropic-ratelimit-*-reset`, else a minute. The
/// headers are read by the one parser, `relay_proto::anthropic::ratelimit`.
fn reset_of(h: &http::HeaderMap, now: Millis) -> Millis {
    if let Some(d) = ratelimit::retry_after(h, now) {
        return now + d.min(Duration::from_secs(86_400)).as_millis() as Millis;
    }
    if let Some(u) = ratelimit::Unified::parse(h).and_then(|u| u.reset_ms) {
        return u;
    }
    if let Some((at, _)) = ratelimit::limiting_reset(h) {
        return at;
    }
    now + COOL_DOWN_MS
}

impl Prober {
    /// Probes one account (its stored credential and proxy), without marking it.
    pub async fn probe(&self, a: &Account) -> Verdict {
        let Ok(credential) = self.key.open(&a.credential_enc, &a.id) else {
            return Verdict::Unauthorized("the stored credential cannot be opened (wrong master key?)".into());
        };
        let proxy_url = match &a.proxy_url_enc {
            Some(sealed) => match self.key.open(sealed, &crate::api::admin::proxy_seal_context(&a.id)) {
                Ok(p) => Some(p),
                Err(_) => return Verdict::Unreachable("the stored proxy URL cannot be opened".into()),
            },
            None => (!a.proxy_url.is_empty()).then(|| a.proxy_url.clone()),
        };
        let proxy = match proxy_url.as_deref().map(ProxySpec::parse) {
            None => None,
            Some(Ok(p)) => Some(p),
            Some(Err(e)) => return Verdict::Unreachable(format!("the proxy URL: {e}")),
        };
        let models = match self.call(a, &credential, proxy.as_ref(), "GET", "/v1/models").await {
            Ok(x) => x,
            Err(v) => return v,
        };
        let (parts, body) = match models.0.status.as_u16() {
            // No models list (some compatible servers have none): the Messages route itself, with a
            // request it must refuse before any model runs (`{}`: 400, no tokens), tells a server
            // that serves it from a wrong base URL (404 there too).
            404 | 405 => match self.call(a, &credential, proxy.as_ref(), "POST", "/v1/messages").await {
                Ok((p, _)) if matches!(p.status.as_u16(), 400 | 422) => return Verdict::Ok,
                Ok((p, _)) if matches!(p.status.as_u16(), 404 | 405) => {
                    return Verdict::Erroring(format!(
                        "HTTP {} on {}/v1/messages: the base URL does not lead to the Messages API (give the server's root, as for https://api.anthropic.com)",
                        p.status.as_u16(),
                        a.base_url.trim_end_matches('/')
                    ))
                }
                Ok(x) => x,
                Err(v) => return v,
            },
            _ => models,
        };
        let now = now_ms();
        let msg = error_message(
            &body,
            &relay_proto::redact::secrets(&credential, proxy_url.as_deref().unwrap_or("")),
        );
        match parts.status.as_u16() {
            200..=299 => Verdict::Ok,
            401 | 403 => Verdict::Unauthorized(format!("HTTP {} {msg}", parts.status.as_u16())),
            429 => Verdict::RateLimited(reset_of(&parts.headers, now), format!("HTTP 429 {msg}")),
            529 => Verdict::Overloaded(format!("HTTP 529 {msg}")),
            400 if msg.to_ascii_lowercase().contains("disabled") => Verdict::Blocked(format!("HTTP 400 {msg}")),
            s @ 500..=599 => Verdict::Erroring(format!("HTTP {s} {msg}")),
            s => Verdict::Erroring(format!("unexpected HTTP {s} {msg}")),
        }
    }

    /// One bounded call to `path` under the account's base URL, with its credential (a POST
    /// carries `{}`); a transport failure or timeout is the verdict.
    async fn call(
        &self,
        a: &Account,
        credential: &str,
        proxy: Option<&ProxySpec>,
        method: &str,
        path: &str,
    ) -> Result<(http::response::Parts, Bytes), Verdict> {
        let url = format!("{}{path}", a.base_url.trim_end_matches('/'));
        let mut req = http::Request::builder()
            .method(method)
            .uri(&url)
            .header("anthropic-version", "2023-06-01")
            .header("accept", "application/json")
            .header("accept-encoding", "identity")
            .header("user-agent", concat!("relay/", env!("CARGO_PKG_VERSION"), " (probe)"));
        req = match a.kind {
            AccountKind::ClaudeOauth => req
                .header("authorization", format!("Bearer {credential}"))
                .header("anthropic-beta", "oauth-2025-04-20"),
            _ => req.header("x-api-key", credential),
        };
        let body = if method == "POST" {
            req = req.header("content-type", "application/json");
            Bytes::from_static(b"{}")
        } else {
            Bytes::new()
        };
        let Ok(req) = req.body(Full::new(body)) else {
            return Err(Verdict::Unreachable(
                "the base URL or credential does not make a valid request".into(),
            ));
        };
        let answer = tokio::time::timeout(PROBE_TIMEOUT, async {
            let resp = self.upstreams.request(proxy, req).await?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, 64 * 1024)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Ok::<_, relay_net::client::UpstreamError>((parts, body))
        })
        .await;
        match answer {
            Err(_) => Err(Verdict::Unreachable(format!(
                "no answer within {}s",
                PROBE_TIMEOUT.as_secs()
            ))),
            Ok(Err(e)) => {
                use std::error::Error;
                let why = e.source().map_or_else(|| e.to_string(), |s| s.to_string());
                Err(Verdict::Unreachable(why.chars().take(200).collect()))
            }
            Ok(Ok(x)) => Ok(x),
        }
    }

    /// Writes what a verdict means for the account (fenced by `term` when given): `Ok` clears its
    /// states, anything else sets one. Returns whether anything changed.
    pub async fn mark(&self, a: &Account, v: &Verdict, term: Option<u64>, actor: &str) -> Result<bool, StoreError> {
        let now = now_ms();
        let current: Vec<AccountState> = self
            .store
            .list_account_states()
            .await?
            .into_iter()
            .filter(|s| s.account_id == a.id)
            .collect();
        let mut muts: Vec<Mutation> = term.map(|t| Mutation::CheckTerm { term: t }).into_iter().collect();
        match v.state(&a.id, now) {
            None => {
                if current.is_empty() {
                    return Ok(false);
                }
                // As `relayctl account reset`: data planes drop what they knew of it too.
                let Some(cur) = self.store.get_account(&a.id).await? else {
                    return Ok(false);
                };
                let mut row = cur.clone();
                row.reset_generation = cur.reset_generation.saturating_add(1);
                muts.push(Mutation::UpdateAccount {
                    row,
                    expect_revision: cur.revision,
                });
                for s in current {
                    muts.push(Mutation::ClearAccountState {
                        account_id: s.account_id,
                        scope: s.scope,
                    });
                }
            }
            Some(st) => {
                let known = current
                    .iter()
                    .any(|s| s.scope.is_empty() && s.health == st.health && (s.until == 0 || s.until >= st.until));
                if known {
                    return Ok(false);
                }
                muts.push(Mutation::SetAccountState(st));
            }
        }
        let audit = AuditRecord {
            actor: actor.to_string(),
            action: "account.check".into(),
            target: a.id.clone(),
            detail: serde_json::json!({"account": a.name, "verdict": v.label(), "detail": v.detail()}).to_string(),
        };
        self.store.apply(muts, audit).await.map(|_| true)
    }

    /// `relayctl account check`: probes now and marks each account.
    pub async fn check(
        &self,
        accounts: Vec<Account>,
        actor: &str,
    ) -> Vec<(Account, Verdict, Result<bool, StoreError>)> {
        use futures::StreamExt;
        futures::stream::iter(accounts)
            .map(|a| async move {
                let v = self.probe(&a).await;
                metrics::counter!(relay_proto::metrics::ACCOUNT_PROBES_TOTAL, "verdict" => v.label()).increment(1);
                let marked = self.mark(&a, &v, None, actor).await;
                (a, v, marked)
            })
            .buffer_unordered(8)
            .collect()
            .await
    }

    /// The leader's background probes (runs under `term` until dropped or fenced): every account
    /// that a data plane took out until further notice (unauthorized, blocked) or whose breaker is
    /// open is probed, backing off per account (30 s doubling to 30 min); a working one comes back.
    /// Accounts the refresh job took out (their refresh token was rejected) wait for a new login.
    pub async fn run(self: Arc<Self>, term: u64) {
        let mut backoff: HashMap<String, (Millis, Duration)> = HashMap::new();
        loop {
            tokio::time::sleep(EVERY).await;
            let (Ok(accounts), Ok(states)) = (self.store.list_accounts().await, self.store.list_account_states().await)
            else {
                continue;
            };
            let now = now_ms();
            backoff.retain(|id, _| states.iter().any(|s| &s.account_id == id));
            for a in accounts {
                let troubled = states.iter().any(|s| {
                    s.account_id == a.id
                        && s.reported_by != super::oauth_refresh::ACTOR
                        && match s.health {
                            AccountHealth::Unauthorized | AccountHealth::Blocked => true,
                            AccountHealth::Erroring => s.until == 0 || s.until > now,
                            _ => false,
                        }
                });
                if !troubled || backoff.get(&a.id).is_some_and(|(at, _)| *at > now) {
                    continue;
                }
                let span = tracing::info_span!(
                    "probe",
                    otel.name = "leader.probe",
                    relay.account.id = a.id.as_str(),
                    relay.account.name = a.name.as_str(),
                    relay.probe.verdict = tracing::field::Empty,
                );
                let v = self.probe(&a).instrument(span.clone()).await;
                span.record("relay.probe.verdict", v.label());
                metrics::counter!(relay_proto::metrics::ACCOUNT_PROBES_TOTAL, "verdict" => v.label()).increment(1);
                let next = backoff
                    .get(&a.id)
                    .map_or(FIRST_BACKOFF, |(_, d)| (*d * 2).min(MAX_BACKOFF));
                backoff.insert(a.id.clone(), (now + next.as_millis() as Millis, next));
                if v == Verdict::Ok {
                    tracing::info!(account = %a.name, "probe: the account works again; back in rotation");
                } else {
                    tracing::debug!(account = %a.name, verdict = v.label(), "probe: still in trouble");
                    // A data plane's state stays as it is; only a good answer changes anything here.
                    continue;
                }
                match self.mark(&a, &v, Some(term), ACTOR).await {
                    Ok(_) => {}
                    Err(StoreError::Fenced { .. }) => return,
                    Err(e) => tracing::warn!(account = %a.name, error = %e, "probe: cannot mark the account"),
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const NOW: Millis = 1_700_000_000_000;

    fn hm(pairs: &[(&str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn error_message_names_type_and_message() {
        let body = br#"{"type":"error","error":{"type":"permission_error","message":"not allowed"}}"#;
        assert_eq!(error_message(body, &[]), "permission_error: not allowed");
        assert_eq!(error_message(br#"{"error":{"type":"api_error"}}"#, &[]), "api_error");
        assert_eq!(error_message(b"<html>bad gateway</html>", &[]), "");
        let long = format!(r#"{{"error":{{"message":"{}"}}}}"#, "x".repeat(500));
        assert_eq!(error_message(long.as_bytes(), &[]).len(), 200);
    }

    #[test]
    fn an_error_quoting_the_credential_or_proxy_password_is_masked() {
        let credential = "sk-ant-api03-PROBED-0123456789abcdefghijklmnop";
        let secrets = relay_proto::redact::secrets(credential, "http://u:proxy-password-123@proxy.example:3128");
        let body = format!(
            r#"{{"type":"error","error":{{"type":"authentication_error","message":"Incorrect API key provided: {}; proxy-password-123"}}}}"#,
            &credential[credential.len() - 20..]
        );
        let msg = error_message(body.as_bytes(), &secrets);
        assert_eq!(
            msg,
            "authentication_error: Incorrect API key provided: sk-ant…mnop; prox…-123"
        );
    }

    #[test]
    fn a_429_keeps_the_account_out_until_the_reset_given() {
        let cases: &[(&[(&str, &str)], Millis)] = &[
            (&[("retry-after", "30")], NOW + 30_000),
            (&[("retry-after", "999999")], NOW + 86_400_000),
            (
                &[
                    ("retry-after", "30"),
                    ("anthropic-ratelimit-unified-reset", "1700000600"),
                ],
                NOW + 30_000,
            ),
            (&[("anthropic-ratelimit-unified-reset", "1700000600")], NOW + 600_000),
            (
                &[("anthropic-ratelimit-requests-reset", "2023-11-14T22:14:20Z")],
                NOW + 60_000,
            ),
            (&[], NOW + COOL_DOWN_MS),
        ];
        for (headers, want) in cases {
            assert_eq!(reset_of(&hm(headers), NOW), *want, "{headers:?}");
        }
    }
}
