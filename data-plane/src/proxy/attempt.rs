//! Attempt stage: one upstream call on one account. It builds the upstream request (headers
//! from [`headers`]), waits for the head within its timeout, reads and judges an error body,
//! holds a stream's head until its first event (so a stream that opens with `event: error`
//! still fails over), reads a JSON answer whole, and says what the attempt came to: the
//! client's response, or a [`Failure`] and whether another account may be tried. Every
//! attempt that reached an upstream leaves one usage row ([`usage`]).

use super::admission::ClientRequest;
use super::balance::SlotGuard;
use super::body::TappedBody;
use super::health::{self, Outcome};
use super::retry::Failure;
use super::routes::status_class;
use super::schedule::{Waited, Want};
use super::sink::HealthSink;
use super::usage::{self, Attempt, AttemptGuard, Tap};
use super::{
    body, client_request_id, error_chain, estimate, headers, not_ours, policy, redact, reqlog, Proxy, MAX_BODY_BYTES,
};
use crate::control::state::{AccountEntry, KeyEntry, ServingConfig};
use crate::errors::{self, full, ApiError, Body};
use crate::upstream::encoding::Encoding;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use relay_net::client::UpstreamBody;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The least time a stream is given to start (head and first event), however little of the retry
/// deadline is left.
const STREAM_START_MIN: Duration = Duration::from_secs(10);

/// Everything about the client's request that every attempt needs.
#[derive(Clone)]
pub(super) struct AttemptCtx<'a> {
    pub(super) cfg: &'a Arc<ServingConfig>,
    pub(super) key: &'a Arc<KeyEntry>,
    pub(super) parts: &'a http::request::Parts,
    pub(super) body: &'a Bytes,
    pub(super) model: &'a str,
    pub(super) stream: bool,
    pub(super) request_id: &'a str,
    /// The client's own id for its request ("" when none).
    pub(super) client_request_id: &'a str,
    pub(super) started: Instant,
    pub(super) policy: &'a policy::Policy,
    /// When the whole request (every attempt) must be done.
    pub(super) deadline: tokio::time::Instant,
    /// `POST /v1/messages` (else `count_tokens`).
    pub(super) is_messages: bool,
    /// The request's reservation against its key's limits (None: the key has none).
    pub(super) charge: Option<Arc<relay_limits::Charge>>,
    /// Set once an attempt exists (its usage row then stands for the request).
    pub(super) attempted: &'a std::sync::atomic::AtomicBool,
    /// The request's `relay::request` log line.
    pub(super) log: &'a Arc<reqlog::RequestLog>,
    /// The request's `max_tokens` (0 when absent).
    pub(super) max_tokens: u64,
}

impl<'a> AttemptCtx<'a> {
    pub(super) fn new(
        req: &'a ClientRequest,
        request_id: &'a str,
        started: Instant,
        deadline: tokio::time::Instant,
        charge: Option<Arc<relay_limits::Charge>>,
        attempted: &'a std::sync::atomic::AtomicBool,
        log: &'a Arc<reqlog::RequestLog>,
    ) -> Self {
        AttemptCtx {
            cfg: &req.cfg,
            key: &req.key,
            parts: &req.parts,
            body: &req.body,
            model: &req.model,
            stream: req.stream,
            request_id,
            client_request_id: client_request_id(&req.parts.headers).unwrap_or(""),
            started,
            policy: &req.cfg.policy,
            deadline,
            is_messages: req.is_messages,
            charge,
            attempted,
            log,
            max_tokens: req.max_tokens,
        }
    }

    /// What scheduling needs of the request.
    pub(super) fn want(&self) -> Want<'a> {
        Want {
            cfg: self.cfg,
            key: self.key,
            model: self.model,
            headers: &self.parts.headers,
            policy: self.policy,
            is_messages: self.is_messages,
        }
    }
}

impl Proxy {
    /// One attempt on one account. Ok: the response for the client. Err: what
    /// failed, and whether another account may be tried.
    pub(super) async fn attempt(
        &self,
        ctx: &AttemptCtx<'_>,
        account: Arc<AccountEntry>,
        slot: SlotGuard,
        waited: Waited,
        span: tracing::Span,
    ) -> Attempted {
        let sink = HealthSink {
            registry: self.health.clone(),
            reporter: self.reporter.clone(),
            settings: ctx.cfg.health_settings(&account.id).clone(),
            generation: account.reset_generation,
            account: account.clone(),
        };
        let up = match upstream_request(ctx, &account, &span) {
            Ok(r) => r,
            Err(e) => return Err((Failure::Relay(e), false)),
        };
        // From here on the attempt leaves exactly one usage row, however it ends (if the
        // client goes away before the upstream answers, the guard records it as cancelled).
        ctx.attempted.store(true, std::sync::atomic::Ordering::Release);
        let mut guard = AttemptGuard::new(Attempt {
            spool: self.spool.clone(),
            pending: self.pending.clone(),
            config: ctx.cfg.clone(),
            node_id: self.node_id.clone(),
            request_id: ctx.request_id.to_string(),
            key: ctx.key.clone(),
            account: account.clone(),
            model: ctx.model.to_string(),
            stream: ctx.stream,
            started: ctx.started,
            status: 0,
            upstream_request_id: String::new(),
            client_request_id: ctx.client_request_id.to_string(),
            waited,
            charge: ctx.charge.clone(),
            log: ctx.log.clone(),
            span,
        });
        let sent_at = Instant::now();
        let head_wait = head_wait(ctx);
        let head_deadline = tokio::time::Instant::now() + head_wait;
        let answered = tokio::time::timeout_at(head_deadline, self.upstreams.request(account.proxy.as_ref(), up)).await;
        not_ours(sent_at.elapsed());
        let resp = match answered {
            Ok(Ok(r)) => {
                super::meters::upstream_ttfb(sent_at.elapsed().as_secs_f64());
                r
            }
            Ok(Err(e)) => {
                metrics::counter!(relay_proto::metrics::UPSTREAM_ERRORS_TOTAL, "kind" => "connect").increment(1);
                let via = account.proxy.as_ref().map(|p| p.endpoint()).unwrap_or_default();
                tracing::warn!(account = %account.name, proxy = %via, error = %error_chain(&e), "upstream request failed");
                sink.observe(&account.id, ctx.model, &Outcome::ConnectError);
                if let Some(a) = guard.take() {
                    usage::record_failed(a, &Tap::for_content(false), Some("api_error"));
                }
                return Err((
                    Failure::Relay(ApiError::upstream_unreachable("the upstream could not be reached")),
                    true,
                ));
            }
            Err(_) => {
                metrics::counter!(relay_proto::metrics::UPSTREAM_ERRORS_TOTAL, "kind" => "timeout").increment(1);
                sink.observe(&account.id, ctx.model, &Outcome::Timeout);
                if let Some(a) = guard.take() {
                    usage::record_failed(a, &Tap::for_content(false), Some("api_error"));
                }
                return Err((
                    Failure::Relay(ApiError {
                        status: StatusCode::GATEWAY_TIMEOUT,
                        ..ApiError::upstream_unreachable("the upstream did not answer in time")
                    }),
                    true,
                ));
            }
        };
        let (parts, body) = resp.into_parts();
        super::meters::upstream_response(status_class(parts.status));
        let status = parts.status.as_u16();
        if let Some(a) = guard.get_mut() {
            a.status = status;
            a.upstream_request_id = parts
                .headers
                .get("request-id")
                .and_then(|v| v.to_str().ok())
                .filter(|v| v.len() <= 256)
                .unwrap_or("")
                .to_string();
        }
        let is_sse = content_type_of(&parts.headers).starts_with("text/event-stream");
        let encoding = Encoding::of(&parts.headers);
        let mut answered = Answered {
            ctx,
            account,
            sink,
            guard,
            tap: Tap::for_content(is_sse),
            parts,
            body,
            status,
            sent_at,
            head_deadline,
        };
        // 1xx (101 included), 3xx (a redirect's Location is never followed nor forwarded) and
        // anything outside the status range HTTP defines are not Messages answers.
        if !anthropic_status(status) {
            return Err(answered.invalid(&format!("status {status}")));
        }
        if !answered.parts.status.is_success() {
            return Err(answered.error_status(encoding).await);
        }
        let encoding = match encoding {
            Ok(e) => e,
            Err(e) => return Err(answered.invalid(&e.to_string())),
        };
        if is_sse != ctx.stream {
            let what = if ctx.stream {
                format!(
                    "a {:?} answer to a streaming request",
                    content_type_of(&answered.parts.headers)
                )
            } else {
                "an event stream answer to a non-streaming request".to_string()
            };
            return Err(answered.invalid(&what));
        }
        if !is_sse {
            return answered.json(encoding, slot).await;
        }
        if encoding != Encoding::Identity {
            // An event stream is tapped as it passes; relay does not decode one on the fly.
            return Err(answered.invalid("a compressed event stream"));
        }
        answered.stream(slot).await
    }
}

/// The upstream request for one attempt: the client's method, path and body to the account's
/// base URL, with [`headers::upstream_headers`], never the browser's `Origin`, and a trace
/// context only when the operator asks for it.
fn upstream_request(
    ctx: &AttemptCtx<'_>,
    account: &AccountEntry,
    span: &tracing::Span,
) -> Result<Request<Full<Bytes>>, ApiError> {
    let path = ctx.parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut uri = String::with_capacity(account.base_url.len() + path.len());
    uri.push_str(&account.base_url);
    uri.push_str(path);
    let mut up = Request::builder()
        .method(ctx.parts.method.clone())
        .uri(&uri)
        .body(Full::new(ctx.body.clone()))
        .map_err(|_| ApiError::internal("cannot build the upstream request"))?;
    // Without the browser's `Origin`: relay is the server a browser calls, the upstream call is
    // relay's own, whether CORS is on or not. (Anthropic's API answers a call with an Origin and
    // no anthropic-dangerous-direct-browser-access with a 401, which would take the account
    // out for every client.) Without the client's trace context: the upstream sees one only
    // when the operator asks for it, then the attempt span's own (a child of the client's).
    *up.headers_mut() = headers::upstream_headers(&ctx.parts.headers, account, ctx.policy.forward_client_ip);
    if ctx.policy.propagate_upstream {
        relay_telemetry::inject_headers(span, up.headers_mut());
    }
    Ok(up)
}

/// How long an attempt waits for the upstream's head.
fn head_wait(ctx: &AttemptCtx<'_>) -> Duration {
    // An upstream sends a stream's head and first event at once (the generation follows), so
    // a stream that has not started within what is left of the retry deadline (at least
    // STREAM_START_MIN) is a black hole: fail over. A non-streaming answer's head comes
    // when the whole answer is ready: `upstream.head_timeout_ms` (minutes).
    if ctx.stream {
        ctx.policy
            .head_timeout
            .min(remaining_until(ctx.deadline).max(STREAM_START_MIN))
    } else {
        ctx.policy.head_timeout
    }
}

/// The upstream's `content-type` ("" when none or not text).
fn content_type_of(h: &HeaderMap) -> &str {
    h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// What an attempt's result is: the client's response, or what failed and whether another
/// account may be tried.
type Attempted = Result<Response<Body>, (Failure, bool)>;

/// An attempt whose upstream sent a response head: what judging the answer needs.
struct Answered<'c, 'a> {
    ctx: &'c AttemptCtx<'a>,
    account: Arc<AccountEntry>,
    sink: HealthSink,
    /// Records the attempt's usage row (as cancelled if dropped before it was taken).
    guard: AttemptGuard,
    /// What was read of the answer.
    tap: Tap,
    parts: http::response::Parts,
    body: UpstreamBody,
    status: u16,
    sent_at: Instant,
    /// A stream's first event must have come by then.
    head_deadline: tokio::time::Instant,
}

impl Answered<'_, '_> {
    /// An answer that is not an Anthropic answer: an upstream fault. Fail over, feed the
    /// breaker, record it; the client never sees it.
    fn invalid(&mut self, what: &str) -> (Failure, bool) {
        metrics::counter!(relay_proto::metrics::UPSTREAM_ERRORS_TOTAL, "kind" => "invalid_answer").increment(1);
        tracing::warn!(account = %self.account.name, status = self.status, what, "the upstream's answer is not a valid Anthropic answer");
        self.sink
            .observe(&self.account.id, self.ctx.model, &Outcome::Invalid { what });
        if let Some(a) = self.guard.take() {
            usage::record_failed(a, &self.tap, Some(INVALID_ANSWER));
        }
        (
            Failure::Relay(ApiError::bad_upstream_answer(
                "the upstream's answer was not a valid Anthropic API response",
            )),
            true,
        )
    }

    /// An error status: its (small) error body is read within the request's deadline and judged.
    async fn error_status<E>(mut self, encoding: Result<Encoding, E>) -> (Failure, bool) {
        let ctx = self.ctx;
        let reading = Instant::now();
        let (raw, whole) = read_capped(
            &mut self.body,
            MAX_ERROR_BODY_BYTES,
            ctx.policy.idle_timeout,
            ctx.deadline,
        )
        .await;
        not_ours(reading.elapsed());
        let body = match encoding.map(|e| e.decode(&raw, MAX_ERROR_BODY_BYTES)) {
            Ok(Ok(b)) => b,
            // Undecodable: judged by its status alone; the client gets relay's own error body.
            _ => Vec::new(),
        };
        // An upstream may quote the credential it was sent ("Incorrect API key provided:
        // sk-ant-…"), in its body or a header: it is masked before the health judge and the
        // client see the body and the headers passed on (and so a capture, which stores what the
        // client got), and in the upstream request id the request log keeps. Only error answers
        // pay for it.
        let secrets = redact::secrets_of(ctx.cfg, &self.account.id);
        let (body, mut redacted) = redact::redact_body(body, &secrets);
        if let Some(a) = self.guard.get_mut() {
            a.upstream_request_id = redact::redact_text(&a.upstream_request_id, &secrets);
        }
        let mut headers = headers::client_headers(&self.parts.headers, ctx.request_id, ctx.policy.expose_ratelimit);
        redacted += redact::redact_headers(&mut headers, &secrets);
        if redacted > 0 {
            tracing::warn!(account = %self.account.name, status = self.status, redacted, "the upstream's error quoted the account's credential; masked");
        }
        self.tap.feed(&body);
        let status = self.status;
        let verdict = if endpoint_missing(ctx.is_messages, status, &body) {
            health::Verdict {
                retry_elsewhere: true,
                retry_after: None,
            }
        } else {
            self.sink.observe(
                &self.account.id,
                ctx.model,
                &Outcome::Response {
                    status,
                    headers: &self.parts.headers,
                    body: &body,
                },
            )
        };
        if let Some(a) = self.guard.take() {
            usage::record_failed(a, &self.tap, None);
        }
        // Only a whole Anthropic error reaches the client as the upstream sent it; an HTML
        // page, an event stream, a body cut at the deadline get relay's own error JSON.
        let body = if whole && usage::is_api_error(&body) {
            Bytes::from(body)
        } else {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            errors::upstream_error_body(self.parts.status)
        };
        let failure = Failure::Upstream {
            status: self.parts.status,
            headers,
            body,
            retry_after: verdict.retry_after,
        };
        (failure, verdict.retry_elsewhere)
    }

    /// A complete JSON answer: read whole before answering, so an answer cut off midway can
    /// still go to another account (the upstream produces it whole anyway, so this costs no
    /// latency).
    async fn json(mut self, encoding: Encoding, slot: SlotGuard) -> Attempted {
        let ctx = self.ctx;
        let total_deadline = tokio::time::Instant::now() + ctx.policy.total_timeout;
        let Some(raw) = read_whole(&mut self.body, MAX_BODY_BYTES, ctx.policy.idle_timeout, total_deadline).await
        else {
            metrics::counter!(relay_proto::metrics::UPSTREAM_ERRORS_TOTAL, "kind" => "body").increment(1);
            self.sink.observe(&self.account.id, ctx.model, &Outcome::ConnectError);
            if let Some(mut a) = self.guard.take() {
                a.status = 502;
                usage::record_failed(a, &self.tap, None);
            }
            return Err((
                Failure::Relay(ApiError::upstream_unreachable("the upstream's answer was cut off")),
                true,
            ));
        };
        let bytes = match encoding {
            Encoding::Identity => raw,
            e => match e.decode(&raw, MAX_BODY_BYTES) {
                Ok(b) => Bytes::from(b),
                Err(err) => return Err(self.invalid(&err.to_string())),
            },
        };
        // (No content-type at all is tolerated when the body is a message; the client gets one.)
        let content_type = content_type_of(&self.parts.headers).to_string();
        if !content_type.is_empty() && !content_type.starts_with("application/json") {
            return Err(self.invalid(&format!("content-type {content_type:?}")));
        }
        let answer = match usage::check_answer(ctx.is_messages, &bytes) {
            Ok(a) => a,
            Err(what) => return Err(self.invalid(what)),
        };
        slot.observe_latency(self.sent_at.elapsed());
        self.sink.observe(
            &self.account.id,
            ctx.model,
            &Outcome::Response {
                status: self.status,
                headers: &self.parts.headers,
                body: &[],
            },
        );
        if let Some(a) = self.guard.take() {
            let ttfb = a.started.elapsed().as_millis() as u64;
            usage::record(a, answer, ttfb);
        }
        drop(slot);
        let mut out = Response::new(full(bytes));
        *out.status_mut() = self.parts.status;
        *out.headers_mut() = headers::client_headers(&self.parts.headers, ctx.request_id, ctx.policy.expose_ratelimit);
        if content_type.is_empty() {
            out.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        Ok(out)
    }

    /// An event stream: its head is held until the first event (so a stream that opens with
    /// `event: error`, or with anything but message_start, can still go to another account),
    /// then the client gets the tapped body.
    async fn stream(mut self, slot: SlotGuard) -> Attempted {
        let ctx = self.ctx;
        let (held, rest) = match hold_first_event(&mut self.body, &mut self.tap, self.head_deadline).await {
            Ok(held) => held,
            Err(outcome) => {
                self.sink.observe(&self.account.id, ctx.model, &outcome);
                if let Some(a) = self.guard.take() {
                    usage::record_failed(a, &self.tap, None);
                }
                return Err((
                    Failure::Relay(ApiError::upstream_unreachable(
                        "the upstream stream failed before its first event",
                    )),
                    true,
                ));
            }
        };
        match first_event(&self.tap) {
            FirstEvent::Started => {}
            FirstEvent::NotAnthropic => {
                return Err(self.invalid("the stream did not open with message_start"));
            }
            FirstEvent::Error(error_type) => {
                let verdict = self.sink.observe(
                    &self.account.id,
                    ctx.model,
                    &Outcome::StreamError {
                        error_type: &error_type,
                    },
                );
                if let Some(a) = self.guard.take() {
                    usage::record_failed(a, &self.tap, None);
                }
                let mut headers = HeaderMap::new();
                headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                let failure = Failure::Upstream {
                    status: stream_error_status(&error_type),
                    headers,
                    body: errors::stream_opened_with_error_body(&error_type),
                    retry_after: verdict.retry_after,
                };
                return Err((failure, verdict.retry_elsewhere));
            }
        }
        // Success: the account answered.
        slot.observe_latency(self.sent_at.elapsed());
        self.sink.observe(
            &self.account.id,
            ctx.model,
            &Outcome::Response {
                status: self.status,
                headers: &self.parts.headers,
                body: &[],
            },
        );
        let Some(attempt) = self.guard.take() else {
            return Err((
                Failure::Relay(ApiError::internal("the attempt was already recorded")),
                false,
            ));
        };
        // The stream is accepted: what arrived after its first event is the tapped body's start.
        let prefix = if rest.is_empty() {
            held
        } else {
            self.tap.feed(&rest);
            let mut both = bytes::BytesMut::with_capacity(held.len() + rest.len());
            both.extend_from_slice(&held);
            both.extend_from_slice(&rest);
            both.freeze()
        };
        let ttfb = Some(ctx.started.elapsed().as_millis() as u64);
        let timeouts = body::BodyTimeouts {
            idle: ctx.policy.idle_timeout,
            total_deadline: tokio::time::Instant::now() + ctx.policy.total_timeout,
        };
        let Answered {
            sink, tap, parts, body, ..
        } = self;
        let hold = !body.delivers_all_arrived();
        let body =
            TappedBody::new(body, Some(prefix), tap, attempt, sink, Some(slot), timeouts, ttfb).hold_for_more(hold);
        let mut out = Response::new(body.boxed());
        *out.status_mut() = parts.status;
        *out.headers_mut() = headers::client_headers(&parts.headers, ctx.request_id, ctx.policy.expose_ratelimit);
        Ok(out)
    }
}

/// The error type recorded for an answer that was not an Anthropic answer.
const INVALID_ANSWER: &str = "invalid_upstream_response";
/// The most bytes of an upstream's error body read (and passed on).
const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// Whether an upstream status can be a Messages API answer: 2xx, 4xx, 5xx. A 1xx (101 included),
/// a 3xx (a redirect's Location is never followed nor forwarded) and anything outside the range
/// HTTP defines are not.
pub(super) fn anthropic_status(status: u16) -> bool {
    (200..300).contains(&status) || (400..600).contains(&status)
}

/// count_tokens answered 404/405 by an upstream that does not serve it (a compatible endpoint
/// without it): not the account's fault (its Messages API is untouched), and another account may
/// serve it. A 404 for an unknown model is the client's error, not this.
pub(super) fn endpoint_missing(is_messages: bool, status: u16, body: &[u8]) -> bool {
    !is_messages && matches!(status, 404 | 405) && !estimate::unknown_model(body)
}

/// How an event stream opened (its first event, held before the client sees the head).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum FirstEvent {
    /// `message_start`: an Anthropic stream; the client gets it.
    Started,
    /// `event: error` of this type: judged like an error status; it may fail over.
    Error(String),
    /// Anything else: a first event that is not JSON, has no `event:` name (SDKs dispatch on it)
    /// or is not `message_start`; or no event stream at all. Not an Anthropic stream.
    NotAnthropic,
}

/// What the tap read of a stream's first event says.
pub(super) fn first_event(tap: &Tap) -> FirstEvent {
    match tap {
        Tap::Sse(t) if t.corrupt() || !t.first_event_named() => FirstEvent::NotAnthropic,
        Tap::Sse(t) => match t.error_type() {
            Some(e) => FirstEvent::Error(e.to_string()),
            None if t.saw_message_start() => FirstEvent::Started,
            None => FirstEvent::NotAnthropic,
        },
        Tap::Buffer(..) => FirstEvent::NotAnthropic,
    }
}

/// The status a client sees for a stream that opened with `event: error` of this type.
pub(super) fn stream_error_status(error_type: &str) -> StatusCode {
    match error_type {
        "overloaded_error" => StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
        "rate_limit_error" => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The first-event hold: reads (and feeds to the tap) an event stream's bytes until its first
/// event is complete, before `deadline`. Ok: the bytes read and fed, which the client gets first
/// when the stream is accepted, and the bytes of the same read after the first event, not yet fed
/// (a body that hands over all that has arrived may bring the whole stream in one frame: what
/// the tap says of the first event, and what a refused stream bills, is that event's alone). Err:
/// the stream failed (ended, broke) or stalled before its first event. A tap that is not an event
/// stream holds nothing.
pub(super) async fn hold_first_event<B>(
    body: &mut B,
    tap: &mut Tap,
    deadline: tokio::time::Instant,
) -> Result<(Bytes, Bytes), Outcome<'static>>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    let mut held = bytes::BytesMut::new();
    while let Tap::Sse(t) = &*tap {
        if t.first_event_complete() {
            break;
        }
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                let Ok(d) = frame.into_data() else { continue };
                // Line by line until the first event is whole; the rest waits.
                let mut at = 0;
                while at < d.len() {
                    let end = memchr::memchr(b'\n', &d[at..]).map_or(d.len(), |i| at + i + 1);
                    tap.feed(&d[at..end]);
                    held.extend_from_slice(&d[at..end]);
                    at = end;
                    if matches!(&*tap, Tap::Sse(t) if t.first_event_complete()) {
                        break;
                    }
                }
                if at < d.len() {
                    return Ok((held.freeze(), d.slice(at..)));
                }
            }
            Ok(Some(Err(_))) | Ok(None) => return Err(Outcome::ConnectError),
            Err(_) => return Err(Outcome::Timeout),
        }
    }
    Ok((held.freeze(), Bytes::new()))
}

pub(super) fn remaining_until(deadline: tokio::time::Instant) -> Duration {
    deadline.saturating_duration_since(tokio::time::Instant::now())
}

/// Reads a whole body, each frame within `idle` and all before `deadline`.
/// None when it fails, stalls, or is larger than `cap`.
async fn read_whole<B>(body: &mut B, cap: usize, idle: Duration, deadline: tokio::time::Instant) -> Option<Bytes>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    let mut out = bytes::BytesMut::new();
    loop {
        let wait = idle.min(remaining_until(deadline));
        match tokio::time::timeout(wait, body.frame()).await {
            Ok(None) => return Some(out.freeze()),
            Ok(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    if out.len() + d.len() > cap {
                        return None;
                    }
                    out.extend_from_slice(d);
                }
            }
            Ok(Some(Err(_))) | Err(_) => return None,
        }
    }
}

/// Reads a body up to `cap` bytes (the rest is dropped), each frame within `idle`, all of it
/// before `deadline` (an error body that drips a byte a second does not hold the request).
/// Also says whether the body came whole (ended before the cap, the deadline or an error).
async fn read_capped<B>(body: &mut B, cap: usize, idle: Duration, deadline: tokio::time::Instant) -> (Vec<u8>, bool)
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    let mut out = Vec::new();
    loop {
        let wait = idle.min(remaining_until(deadline));
        match tokio::time::timeout(wait, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    let room = cap.saturating_sub(out.len());
                    out.extend_from_slice(&d[..d.len().min(room)]);
                    if d.len() > room {
                        return (out, false);
                    }
                }
            }
            Ok(None) => return (out, true),
            _ => return (out, false),
        }
    }
}

/// One upstream attempt's span: a GenAI client span (`chat {model}`, OpenTelemetry semantic
/// conventions [`relay_telemetry::SEMCONV_VERSION`]) with relay's own attributes. What the
/// answer said is recorded with the attempt's usage ([`usage::record`]).
pub(super) fn attempt_span(ctx: &AttemptCtx<'_>, account: &AccountEntry, n: usize) -> tracing::Span {
    let operation = if ctx.is_messages { "chat" } else { "count_tokens" };
    tracing::info_span!(
        "attempt",
        otel.name = %format_args!("{operation} {}", ctx.model),
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        gen_ai.operation.name = operation,
        gen_ai.provider.name = "anthropic",
        gen_ai.request.model = ctx.model,
        gen_ai.request.max_tokens = i64::try_from(ctx.max_tokens).unwrap_or(i64::MAX),
        gen_ai.response.model = tracing::field::Empty,
        gen_ai.response.id = tracing::field::Empty,
        gen_ai.usage.input_tokens = tracing::field::Empty,
        gen_ai.usage.output_tokens = tracing::field::Empty,
        relay.account.id = account.id.as_str(),
        relay.account.name = account.name.as_str(),
        relay.attempt = n as i64,
        relay.stream = ctx.stream,
        relay.attempt.outcome = tracing::field::Empty,
        relay.retry_reason = tracing::field::Empty,
        relay.usage.cache_read_tokens = tracing::field::Empty,
        relay.usage.cache_write_tokens = tracing::field::Empty,
        relay.cost_usd = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
    )
}

#[cfg(test)]
#[path = "attempt_tests.rs"]
mod tests;
