//! Forwarding one attempt to an upstream account and streaming the answer
//! back untouched, with the usage tapped on the side.
//!
//! The request keeps every client header except the client's key, hop-by-hop
//! headers and `accept-encoding` (the upstream is asked for `identity`, so the
//! tap reads plain bytes and the client gets a body that matches the headers
//! it receives). The response body is wrapped in [`TappedBody`], which passes
//! each frame on as it arrives and records exactly one usage event when the
//! body ends, fails, stalls or is dropped because the client went away. It
//! also holds the attempt's concurrency slot, so the slot is released however
//! the request ends.

use super::balance::SlotGuard;
use super::health::{HealthRegistry, HealthSettings, Outcome};
use crate::control::spool::Spool;
use crate::control::state::{AccountEntry, AccountKind, KeyEntry, ServingConfig};
use crate::control::state_report::StateReporter;
use crate::errors::{Body, BoxError};
use crate::upstream::sse::SseTap;
use crate::upstream::usage::{PriceTable, Usage};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http_body::{Body as HttpBody, Frame};
use http_body_util::BodyExt;
use relay_proto::v1 as pb;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// The beta every OAuth (subscription) call needs.
pub const OAUTH_BETA: &str = "oauth-2025-04-20";
/// Non-streaming bodies larger than this are passed through but not parsed for usage.
const MAX_TAPPED_BODY: usize = 32 << 20;

/// Pre-parsed names (`from_static` is const): removing by `&str` would parse the
/// name again on every request.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
static ANTHROPIC_BETA: HeaderName = HeaderName::from_static("anthropic-beta");
static REQUEST_ID: HeaderName = HeaderName::from_static("request-id");
static X_UPSTREAM_REQUEST_ID: HeaderName = HeaderName::from_static("x-upstream-request-id");

/// Response headers that identify the upstream organisation: never shown to clients.
static UPSTREAM_IDENTITY: [HeaderName; 2] = [
    HeaderName::from_static("anthropic-organization-id"),
    HeaderName::from_static("x-organization-uuid"),
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    if h.contains_key(header::CONNECTION) {
        let listed: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for n in listed {
            h.remove(n);
        }
    }
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
}

/// Request headers that tell an upstream about the client's network or browser session: never
/// sent upstream (the client IP ones only with `headers.forward_client_ip`).
static CLIENT_IDENTITY: [HeaderName; 2] = [header::COOKIE, HeaderName::from_static("proxy-authorization")];
static CLIENT_IP: [HeaderName; 4] = [
    header::FORWARDED,
    HeaderName::from_static("x-real-ip"),
    header::VIA,
    HeaderName::from_static("true-client-ip"),
];

/// The headers sent upstream for one attempt: the client's, without its key, its cookies, hop-by-hop
/// headers and (unless `forward_client_ip`) what identifies its network (`x-forwarded-*`,
/// `forwarded`, `x-real-ip`, `via`); with the account's credential. Other headers pass (Claude Code
/// and the SDKs send their own `anthropic-*`, `x-stainless-*`, `x-app`, `user-agent`, which
/// upstreams may rely on).
pub fn upstream_headers(client: &HeaderMap, account: &AccountEntry, forward_client_ip: bool) -> HeaderMap {
    let mut h = client.clone();
    strip_hop_by_hop(&mut h);
    h.remove(header::HOST);
    h.remove(&X_API_KEY);
    h.remove(header::AUTHORIZATION);
    h.remove(header::CONTENT_LENGTH);
    for n in &CLIENT_IDENTITY {
        h.remove(n);
    }
    if !forward_client_ip {
        for n in &CLIENT_IP {
            h.remove(n);
        }
        let forwarded: Vec<HeaderName> = h
            .keys()
            .filter(|n| n.as_str().starts_with("x-forwarded-"))
            .cloned()
            .collect();
        for n in forwarded {
            h.remove(n);
        }
    }
    h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    match account.kind {
        AccountKind::ApiKey | AccountKind::Compatible => {
            h.insert(X_API_KEY.clone(), account.credential.clone());
        }
        AccountKind::OAuth => {
            h.insert(header::AUTHORIZATION, account.bearer.clone());
            let mut betas: Vec<String> = h
                .get_all(&ANTHROPIC_BETA)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
            if !betas.iter().any(|b| b == OAUTH_BETA) {
                betas.push(OAUTH_BETA.to_string());
            }
            if let Ok(v) = HeaderValue::from_str(&betas.join(",")) {
                h.insert(ANTHROPIC_BETA.clone(), v);
            }
        }
    }
    h
}

/// Most bytes of upstream response headers (names and values) passed on to a client.
pub const MAX_CLIENT_HEADER_BYTES: usize = 16 * 1024;
/// Longest single upstream header value passed on.
pub const MAX_CLIENT_HEADER_VALUE: usize = 4 * 1024;
/// Most upstream response headers passed on.
pub const MAX_CLIENT_HEADERS: usize = 64;

static X_SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");

/// Upstream response headers a client may see: what the Anthropic API sends that SDKs and Claude
/// Code read (`content-type`, `anthropic-*` headers, `x-should-retry`, `cache-control`); the
/// account's own `anthropic-ratelimit-*` only with `headers.expose_ratelimit` (they describe one
/// pooled account, not the client's key). Everything else (`location`, `set-cookie`, a CDN's or proxy's own headers,
/// framing and coding headers, which relay derives from what it sends) stays behind; `retry-after`
/// is relay's own, bounded value ([`client_retry_after`]); `request-id` is renamed.
fn forwardable(name: &HeaderName, expose_ratelimit: bool) -> bool {
    let n = name.as_str();
    name == header::CONTENT_TYPE
        || name == header::CACHE_CONTROL
        || name == X_SHOULD_RETRY
        || (n.starts_with("anthropic-")
            && !UPSTREAM_IDENTITY.contains(name)
            && (expose_ratelimit || !n.starts_with("anthropic-ratelimit-")))
}

/// The headers the client gets back: the allowed upstream headers within
/// [`MAX_CLIENT_HEADERS`], [`MAX_CLIENT_HEADER_VALUE`] and [`MAX_CLIENT_HEADER_BYTES`], the
/// upstream's `request-id` as `x-upstream-request-id`, relay's `request-id`.
pub fn client_headers(upstream: &HeaderMap, request_id: &str, expose_ratelimit: bool) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(upstream.len().min(MAX_CLIENT_HEADERS) + 2);
    let mut bytes = 0usize;
    let mut dropped = 0u64;
    for (name, value) in upstream {
        if !forwardable(name, expose_ratelimit) {
            continue;
        }
        let size = name.as_str().len() + value.len();
        if value.len() > MAX_CLIENT_HEADER_VALUE
            || bytes + size > MAX_CLIENT_HEADER_BYTES
            || h.len() >= MAX_CLIENT_HEADERS
        {
            dropped += 1;
            continue;
        }
        bytes += size;
        h.append(name.clone(), value.clone());
    }
    if dropped > 0 {
        metrics::counter!(relay_proto::metrics::UPSTREAM_HEADERS_DROPPED_TOTAL).increment(dropped);
    }
    if let Some(up) = upstream.get(&REQUEST_ID).filter(|v| v.len() <= 256) {
        h.insert(X_UPSTREAM_REQUEST_ID.clone(), up.clone());
    }
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert(REQUEST_ID.clone(), v);
    }
    h
}

/// The longest `retry-after` relay tells a client, in seconds.
pub const MAX_CLIENT_RETRY_AFTER_SECS: u64 = 3600;

/// relay's own `retry-after` for a client: whole seconds, at least 1, at most
/// [`MAX_CLIENT_RETRY_AFTER_SECS`] (an upstream's date in 2099 or a 20-digit value is not passed on).
pub fn client_retry_after(d: Duration) -> HeaderValue {
    HeaderValue::from(d.as_secs().clamp(1, MAX_CLIENT_RETRY_AFTER_SECS))
}

/// Counts usage events still being written to the spool (drained at shutdown).
#[derive(Default)]
pub struct Pending(AtomicUsize, tokio::sync::Notify);

impl Pending {
    pub fn count(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
    pub async fn drained(&self) {
        loop {
            let n = self.1.notified();
            if self.count() == 0 {
                return;
            }
            n.await;
        }
    }
}

/// Where an attempt's outcome goes: account health (shared with the fleet
/// through the reporter) and the account's latency estimate.
#[derive(Clone)]
pub struct HealthSink {
    pub registry: Arc<HealthRegistry>,
    pub reporter: StateReporter,
    pub settings: HealthSettings,
    /// The account's `reset_generation` in the config the attempt was sent under.
    pub generation: u64,
    /// Its name, for the log line of a state change.
    pub account: Arc<crate::control::state::AccountEntry>,
}

impl HealthSink {
    pub fn observe(&self, account_id: &str, model: &str, outcome: &Outcome<'_>) -> super::health::Verdict {
        let now = chrono::Utc::now().timestamp_millis();
        if let Outcome::Response { headers, .. } = outcome {
            if let Some(q) = super::quota::parse(headers, account_id, self.registry.node_id(), now) {
                self.registry.quotas.observe(q);
            }
        }
        let (verdict, report) =
            self.registry
                .observe_as_of(account_id, self.generation, model, outcome, &self.settings, now);
        if let Some(state) = report {
            // By name, as relayctl shows it ("rate_limited"), not the proto constant.
            let health = pb::AccountHealth::try_from(state.health)
                .map(|h| {
                    h.as_str_name()
                        .trim_start_matches("ACCOUNT_HEALTH_")
                        .to_ascii_lowercase()
                })
                .unwrap_or_else(|_| "unknown".into());
            tracing::info!(
                account = %self.account.name,
                account_id,
                health,
                reason = %state.reason,
                "account state changed"
            );
            self.reporter.report(state);
        }
        verdict
    }
}

/// What is known of an attempt before its body is read.
pub struct Attempt {
    pub spool: Arc<Spool>,
    pub pending: Arc<Pending>,
    pub config: Arc<ServingConfig>,
    pub node_id: Arc<str>,
    pub request_id: String,
    pub key: Arc<KeyEntry>,
    pub account: Arc<AccountEntry>,
    /// The requested model.
    pub model: String,
    pub stream: bool,
    pub started: Instant,
    /// The upstream's status; 0 until its response head arrived.
    pub status: u16,
    pub upstream_request_id: String,
    /// The client's own id for its request (`x-request-id` / `request-id`), "" when none.
    pub client_request_id: String,
    /// How long the request waited for an account before this attempt, and for what.
    pub waited: super::Waited,
    /// The request's reservation against its key's limits: what this attempt used is added.
    pub charge: Option<Arc<relay_limits::Charge>>,
    /// The request's log line, which this attempt's record adds to.
    pub log: Arc<super::reqlog::RequestLog>,
    /// The attempt's trace span (a GenAI `chat {model}` client span); ends with the record.
    pub span: tracing::Span,
}

/// An attempt in flight: records it as cancelled, with what is known, if it is dropped before its
/// outcome was recorded (the client went away while relay waited for the upstream's head or body).
/// Every attempt that reached an upstream leaves exactly one usage row.
pub struct AttemptGuard(Option<Attempt>);

impl AttemptGuard {
    pub fn new(a: Attempt) -> Self {
        Self(Some(a))
    }

    /// The attempt, for filling in what the response head said.
    pub fn get_mut(&mut self) -> Option<&mut Attempt> {
        self.0.as_mut()
    }

    /// Takes the attempt to record its outcome (None if it was already taken).
    pub fn take(&mut self) -> Option<Attempt> {
        self.0.take()
    }
}

impl Drop for AttemptGuard {
    fn drop(&mut self) {
        if let Some(a) = self.0.take() {
            let ttfb = 0;
            record(a, Recorded::cancelled(), ttfb);
        }
    }
}

pub enum Tap {
    Sse(Box<SseTap>),
    Buffer(Vec<u8>, bool),
}

impl Tap {
    pub fn for_content(is_sse: bool) -> Self {
        if is_sse {
            Tap::Sse(Box::default())
        } else {
            Tap::Buffer(Vec::new(), false)
        }
    }

    pub fn feed(&mut self, data: &[u8]) {
        match self {
            Tap::Sse(t) => t.feed(data),
            Tap::Buffer(buf, overflowed) => {
                if !*overflowed {
                    if buf.len() + data.len() > MAX_TAPPED_BODY {
                        *overflowed = true;
                        buf.clear();
                    } else {
                        buf.extend_from_slice(data);
                    }
                }
            }
        }
    }

    /// What the tap read, as a usage record's fields.
    fn recorded(&self, status: u16) -> Recorded {
        match self {
            Tap::Sse(t) => Recorded {
                usage: t.usage(),
                model: t.model().map(str::to_string),
                response_id: t.message_id().map(str::to_string),
                stop_reason: t.stop_reason().map(str::to_string),
                error_type: t.error_type().map(str::to_string).unwrap_or_default(),
                unparsed: t.usage_unparsed(),
                suspect: t.counts_unreadable(),
                cancelled: false,
                // Filled in by the body, which saw when they arrived.
                stream_events: 0,
                max_event_gap_ms: 0,
                error_message: String::new(),
            },
            Tap::Buffer(b, _) if status >= 400 => Recorded {
                error_type: Usage::parse_error_type(b).unwrap_or_else(|| "api_error".into()),
                ..Recorded::default()
            },
            Tap::Buffer(b, overflowed) => match Usage::parse_message_body(b) {
                Some((usage, model, id, stop_reason)) => Recorded {
                    usage,
                    model,
                    response_id: id,
                    stop_reason,
                    ..Recorded::default()
                },
                None => Recorded {
                    unparsed: *overflowed || !b.is_empty(),
                    ..Recorded::default()
                },
            },
        }
    }
}

/// What one usage row says beyond the attempt itself.
#[derive(Debug, Default)]
pub struct Recorded {
    pub usage: Usage,
    /// The model the answer named (billed instead of the requested one when present).
    pub model: Option<String>,
    /// "" on success.
    pub error_type: String,
    /// The answer's usage could not be read.
    pub unparsed: bool,
    /// A usage count was there but not a whole number of tokens (left out, row flagged).
    pub suspect: bool,
    pub cancelled: bool,
    /// A stream's events and the longest gap between two of them arriving (ms).
    pub stream_events: u64,
    pub max_event_gap_ms: u64,
    /// relay's own words on how the attempt failed ("" otherwise; an upstream's text is not kept).
    pub error_message: String,
    /// The answer's message id (`msg_…`), when the tap read it.
    pub response_id: Option<String>,
    /// The answer's `stop_reason`, when the tap read it.
    pub stop_reason: Option<String>,
}

impl Recorded {
    fn cancelled() -> Self {
        Recorded {
            cancelled: true,
            ..Recorded::default()
        }
    }
}

/// Timeouts that apply while a body streams.
#[derive(Debug, Clone, Copy)]
pub struct BodyTimeouts {
    pub idle: Duration,
    pub total_deadline: tokio::time::Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome2 {
    Complete,
    /// The upstream failed or stalled after the head went out.
    UpstreamFailed,
    /// The stream ended cleanly, but before `message_stop` (and with no error event).
    Truncated,
    Cancelled,
}

/// A streamed response body passed through frame by frame, recording usage once.
///
/// Only whole events reach the client: bytes after the last complete event (by the tap's count)
/// are held until the event ends, so a stream that dies inside an event is followed by relay's
/// `event: error` on a clean event boundary, never glued onto half an event. An event larger than
/// [`MAX_HELD_BYTES`] is passed on in pieces (memory stays bounded).
pub struct TappedBody {
    inner: hyper::body::Incoming,
    prefix: Option<Bytes>,
    tap: Tap,
    attempt: Option<Attempt>,
    health: HealthSink,
    ttfb_ms: Option<u64>,
    slot: Option<SlotGuard>,
    timeouts: BodyTimeouts,
    idle: Pin<Box<tokio::time::Sleep>>,
    /// Bytes to send last, before ending (relay's error event, or a successful stream's tail).
    trailer_event: Option<Bytes>,
    /// What the upstream body said while frames were being coalesced.
    deferred: Option<Deferred>,
    /// Bytes read but held for a scheduler turn (see `coalesce`).
    held: Option<Bytes>,
    /// Consecutive turns that brought no new chunk while holding.
    idle_turns: u8,
    /// Bytes fed to the tap but not yet sent: the start of an event not complete yet.
    tail: bytes::BytesMut,
    /// Bytes sent to the client so far.
    sent: u64,
    done: bool,
    /// Events the tap had counted when bytes last arrived, when the last new one arrived, and
    /// the longest gap between two arrivals (ms): the usage row's gap summary.
    events_seen: u64,
    last_event_at: Option<Instant>,
    max_event_gap_ms: u64,
}

enum Deferred {
    Error(hyper::Error),
    End,
}

/// Frames already arrived are merged into one write up to this size.
const COALESCE_BYTES: usize = 64 * 1024;
/// Scheduler turns without a new chunk after which held bytes are sent (the
/// connection task needs two turns to hand over its next chunk).
const IDLE_TURNS: u8 = 2;
/// The most bytes of an incomplete event held back; a larger event is passed on as it comes.
pub const MAX_HELD_BYTES: usize = crate::upstream::sse::MAX_EVENT_BYTES;

impl TappedBody {
    /// `prefix` holds bytes already read from `inner` (and already fed to `tap`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        inner: hyper::body::Incoming,
        prefix: Option<Bytes>,
        tap: Tap,
        attempt: Attempt,
        health: HealthSink,
        slot: Option<SlotGuard>,
        timeouts: BodyTimeouts,
        ttfb_ms: Option<u64>,
    ) -> Self {
        let idle = Box::pin(tokio::time::sleep(
            timeouts.idle.min(remaining(timeouts.total_deadline)),
        ));
        let mut body = Self {
            inner,
            prefix: None,
            tap,
            attempt: Some(attempt),
            health,
            ttfb_ms,
            slot,
            timeouts,
            idle,
            trailer_event: None,
            deferred: None,
            held: None,
            idle_turns: 0,
            tail: bytes::BytesMut::new(),
            sent: 0,
            done: false,
            events_seen: 0,
            last_event_at: None,
            max_event_gap_ms: 0,
        };
        body.prefix = prefix.and_then(|p| body.release(p));
        body
    }

    pub fn boxed(self) -> Body {
        BodyExt::boxed(self)
    }

    /// The part of `data` (already fed to the tap) that completes events, with whatever was held
    /// before it; the rest is held. None: nothing to send yet.
    fn release(&mut self, data: Bytes) -> Option<Bytes> {
        let Tap::Sse(t) = &self.tap else {
            self.sent += data.len() as u64;
            return (!data.is_empty()).then_some(data);
        };
        // New events arrived with these bytes: the gap since the previous ones.
        if t.events() > self.events_seen {
            let now = Instant::now();
            if let Some(last) = self.last_event_at {
                let gap = now.saturating_duration_since(last).as_millis() as u64;
                self.max_event_gap_ms = self.max_event_gap_ms.max(gap);
            }
            self.last_event_at = Some(now);
            self.events_seen = t.events();
        }
        let complete = t.complete_bytes();
        let fed = t.fed();
        // Everything fed is either sent, held in `tail`, or in `data`; an event too large to hold
        // is let through as it is.
        let upto = if fed.saturating_sub(complete) as usize > MAX_HELD_BYTES {
            fed
        } else {
            complete
        };
        let n = usize::try_from(upto.saturating_sub(self.sent)).unwrap_or(usize::MAX);
        let out = if self.tail.is_empty() {
            if n >= data.len() {
                data
            } else {
                self.tail.extend_from_slice(&data[n..]);
                data.slice(..n)
            }
        } else {
            self.tail.extend_from_slice(&data);
            self.tail.split_to(n.min(self.tail.len())).freeze()
        };
        self.sent += out.len() as u64;
        (!out.is_empty()).then_some(out)
    }

    /// The upstream body ended cleanly: a stream without `message_stop` (and without an error
    /// event) is a failure. Returns what to send last: relay's error event, or the tail.
    fn end(&mut self) -> Option<Bytes> {
        self.done = true;
        let truncated = match &self.tap {
            Tap::Sse(t) => !t.saw_message_stop() && t.error_type().is_none(),
            Tap::Buffer(..) => false,
        };
        if truncated {
            metrics::counter!(relay_proto::metrics::UPSTREAM_STREAM_ERRORS_TOTAL, "kind" => "truncated").increment(1);
            self.finish(Outcome2::Truncated);
            self.tail.clear();
            return Some(self.after_partial(error_event("upstream stream ended before message_stop")));
        }
        self.finish(Outcome2::Complete);
        let tail = self.tail.split().freeze();
        match &self.tap {
            // After message_stop nothing belongs to the message; a stream without SSE framing
            // keeps its last bytes.
            Tap::Sse(_) => None,
            Tap::Buffer(..) => (!tail.is_empty()).then_some(tail),
        }
    }

    /// What the tap says of the stream now: corrupt (an event that is not JSON) or ended
    /// (message_stop read): either way the stream ends here, without reading further.
    fn settled(&self) -> Option<bool> {
        match &self.tap {
            Tap::Sse(t) if t.corrupt() => Some(false),
            Tap::Sse(t) if t.ended() => Some(true),
            _ => None,
        }
    }

    /// The bytes that end a stream that stops here: relay's error event when it failed (after a
    /// blank line if part of an oversized event went out), nothing when it ended at message_stop.
    fn close_now(&mut self, ok: bool) -> Option<Bytes> {
        if ok {
            return self.end();
        }
        metrics::counter!(relay_proto::metrics::UPSTREAM_STREAM_ERRORS_TOTAL, "kind" => "corrupt").increment(1);
        Some(self.fail("the upstream sent an event that is not valid JSON"))
    }

    fn finish(&mut self, outcome: Outcome2) {
        let Some(a) = self.attempt.take() else { return };
        let mut r = self.tap.recorded(a.status);
        if let Tap::Sse(t) = &self.tap {
            // A stream that ended without a message_start billed nothing it could read.
            r.unparsed |= !t.saw_message_start();
        }
        if r.error_type.is_empty() && matches!(outcome, Outcome2::UpstreamFailed | Outcome2::Truncated) {
            r.error_type = "api_error".to_string();
        }
        r.cancelled = outcome == Outcome2::Cancelled;
        r.error_message = match outcome {
            Outcome2::UpstreamFailed => "the upstream stream failed or stalled after it started".into(),
            Outcome2::Truncated => "the upstream stream ended before message_stop".into(),
            Outcome2::Complete | Outcome2::Cancelled => String::new(),
        };
        r.stream_events = self.events_seen;
        r.max_event_gap_ms = self.max_event_gap_ms;
        // The account's health: a stream that failed after its head counts against it.
        match outcome {
            Outcome2::UpstreamFailed => {
                self.health.observe(&a.account.id, &a.model, &Outcome::ConnectError);
            }
            Outcome2::Truncated => {
                self.health.observe(
                    &a.account.id,
                    &a.model,
                    &Outcome::Invalid {
                        what: "stream ended before message_stop",
                    },
                );
            }
            Outcome2::Complete if r.error_type == "overloaded_error" => {
                self.health.observe(
                    &a.account.id,
                    &a.model,
                    &Outcome::StreamError {
                        error_type: &r.error_type,
                    },
                );
            }
            _ => {}
        }
        let ttfb = self.ttfb_ms.unwrap_or(0);
        record(a, r, ttfb);
        // Release the concurrency slot now rather than when the body is dropped.
        self.slot = None;
    }

    /// The stream failed after its head: relay's error event on an event boundary (what was held
    /// of an incomplete event is dropped).
    fn fail(&mut self, message: &str) -> Bytes {
        self.finish(Outcome2::UpstreamFailed);
        self.tail.clear();
        self.done = true;
        self.after_partial(error_event(message))
    }

    /// `ev` after a blank line when part of an event larger than [`MAX_HELD_BYTES`] already went
    /// out: the error then arrives as its own event, not glued onto half of another.
    fn after_partial(&self, ev: Bytes) -> Bytes {
        match &self.tap {
            Tap::Sse(t) if self.sent > t.complete_bytes() => {
                let mut b = bytes::BytesMut::with_capacity(ev.len() + 2);
                b.extend_from_slice(b"\n\n");
                b.extend_from_slice(&ev);
                b.freeze()
            }
            _ => ev,
        }
    }
}

fn remaining(deadline: tokio::time::Instant) -> Duration {
    deadline.saturating_duration_since(tokio::time::Instant::now())
}

/// The SSE event sent to a client whose stream failed after it started.
fn error_event(message: &str) -> Bytes {
    let data = serde_json::json!({"type": "error", "error": {"type": "api_error", "message": message}});
    Bytes::from(format!("event: error\ndata: {data}\n\n"))
}

/// Whether an answer names another model than the request asked for. A dated id answering its
/// alias (`claude-sonnet-4-5` → `claude-sonnet-4-5-20250929`, `…-latest` → `…-20241022`) is the
/// same model; anything else is a mapping the upstream made (a compatible endpoint's names).
pub fn model_mismatch(requested: &str, answered: &str) -> bool {
    let req = requested.strip_suffix("-latest").unwrap_or(requested);
    // `a` is `b` or `b` with a date: `-YYYYMMDD`.
    let same = |a: &str, b: &str| {
        a.eq_ignore_ascii_case(b)
            || a.strip_prefix(b)
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|d| d.len() == 8 && d.bytes().all(|c| c.is_ascii_digit()))
    };
    !(same(answered, req) || same(req, answered))
}

/// (account, requested, answered) triples already logged; bounded so a hostile upstream naming a
/// new model in every answer cannot grow it (past the bound each mismatch is counted, not logged).
static MISMATCHES_SEEN: std::sync::LazyLock<std::sync::Mutex<std::collections::HashSet<(String, String, String)>>> =
    std::sync::LazyLock::new(Default::default);
const MAX_MISMATCHES_LOGGED: usize = 64;

/// Logs a model mismatch once per (account, requested, answered) and counts every one.
fn note_model_mismatch(account: &str, requested: &str, answered: &str) {
    metrics::counter!(relay_proto::metrics::MODEL_MISMATCH_TOTAL, "account" => account.to_string()).increment(1);
    let mut seen = MISMATCHES_SEEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if seen.len() < MAX_MISMATCHES_LOGGED
        && seen.insert((account.to_string(), requested.to_string(), answered.to_string()))
    {
        tracing::warn!(
            account,
            requested,
            answered,
            "the upstream answered with another model than the request asked for (logged once per account and pair)"
        );
    }
}

/// Builds the usage event and hands it to the spool (asynchronously: the
/// client already has its answer).
pub fn record(a: Attempt, r: Recorded, ttfb_ms: u64) {
    // The model the answer names is recorded (a dated id, say), unless it is not a plausible model
    // id; the price is the requested model's whenever the table has one, so an upstream cannot
    // make a request cheap by naming another model.
    let answered = r.model.filter(|m| !m.is_empty());
    let implausible = answered
        .as_ref()
        .is_some_and(|m| m.len() > 200 || m.chars().any(|c| c.is_control() || c.is_whitespace()));
    let requested = a.model.clone();
    if let Some(m) = answered.as_deref().filter(|_| !implausible) {
        if model_mismatch(&requested, m) {
            note_model_mismatch(&a.account.name, &requested, m);
        }
    }
    let billed_model = answered.filter(|_| !implausible).unwrap_or(a.model);
    let response_id = r.response_id;
    let stop_reason = r.stop_reason;
    let now = chrono::Utc::now().timestamp_millis();
    let usage = r.usage;
    let mut event = pb::UsageEvent {
        event_id: uuid::Uuid::now_v7().to_string(),
        request_id: a.request_id,
        timestamp_ms: now,
        node_id: a.node_id.to_string(),
        api_key_id: a.key.id.clone(),
        account_id: a.account.id.clone(),
        model: billed_model,
        input_tokens: usage.input_tokens,
        output_tokens: usage.output_tokens,
        cache_write_5m_tokens: usage.cache_write_5m_tokens,
        cache_write_1h_tokens: usage.cache_write_1h_tokens,
        cache_read_tokens: usage.cache_read_tokens,
        cost_pico_usd: 0,
        http_status: u32::from(a.status),
        error_type: r.error_type,
        stream: a.stream,
        cancelled: r.cancelled,
        latency_ms: a.started.elapsed().as_millis() as u64,
        ttfb_ms,
        upstream_request_id: a.upstream_request_id,
        web_search_requests: usage.web_search_requests,
        anomaly: String::new(),
        client_request_id: a.client_request_id,
        queue_wait_ms: a.waited.ms,
        waited_for: a.waited.what.to_string(),
        stream_events: u32::try_from(r.stream_events).unwrap_or(u32::MAX),
        max_event_gap_ms: r.max_event_gap_ms,
        error_message: r.error_message,
    };
    if r.unparsed {
        relay_proto::bounds::flag(&mut event, relay_proto::bounds::UNPARSED);
        metrics::counter!(relay_proto::metrics::USAGE_ANOMALIES_TOTAL, "anomaly" => relay_proto::bounds::UNPARSED)
            .increment(1);
    }
    // Counts beyond what one request can carry are clamped first, and the cost is that of the
    // clamped counts: an absurd claim is never billed as such.
    let mut suspect = relay_proto::bounds::clamp(&mut event);
    if r.suspect {
        relay_proto::bounds::flag(&mut event, relay_proto::bounds::SUSPECT);
        suspect = true;
    }
    let counted = Usage {
        input_tokens: event.input_tokens,
        output_tokens: event.output_tokens,
        cache_write_5m_tokens: event.cache_write_5m_tokens,
        cache_write_1h_tokens: event.cache_write_1h_tokens,
        cache_read_tokens: event.cache_read_tokens,
        web_search_requests: event.web_search_requests,
    };
    let price_model = if a.config.prices.lookup(&requested, now).is_some() {
        requested.as_str()
    } else {
        event.model.as_str()
    };
    event.cost_pico_usd = cost_of(&a.config.prices, price_model, now, &counted);
    // The metrics' model label: the price table's pattern, never the client's string.
    let model_label = a
        .config
        .prices
        .lookup(price_model, now)
        .map_or_else(|| "other".to_string(), |p| p.model_pattern.clone());
    if implausible {
        relay_proto::bounds::flag(&mut event, relay_proto::bounds::SUSPECT);
        suspect = true;
    }
    suspect |= relay_proto::bounds::clamp(&mut event);
    if suspect {
        metrics::counter!(relay_proto::metrics::USAGE_ANOMALIES_TOTAL, "anomaly" => relay_proto::bounds::SUSPECT)
            .increment(1);
        tracing::warn!(
            request_id = %event.request_id,
            client_request_id = %event.client_request_id,
            account_id = %event.account_id,
            "the upstream reported usage beyond what one request can carry: clamped and flagged suspect"
        );
    }
    if let Some(c) = &a.charge {
        let counted = Usage {
            input_tokens: event.input_tokens,
            output_tokens: event.output_tokens,
            cache_write_5m_tokens: event.cache_write_5m_tokens,
            cache_write_1h_tokens: event.cache_write_1h_tokens,
            cache_read_tokens: event.cache_read_tokens,
            web_search_requests: event.web_search_requests,
        };
        c.add(
            super::limit::counted_tokens(&counted, a.config.policy.count_cache_reads),
            event.cost_pico_usd,
        );
    }
    count_usage(&a.config, &a.key, model_label, &event);
    if (200..300).contains(&event.http_status) && !event.cancelled {
        metrics::histogram!(relay_proto::metrics::REQUEST_DURATION_SECONDS, "stream" => if a.stream { "true" } else { "false" })
            .record(a.started.elapsed().as_secs_f64());
    }
    if event.cancelled {
        metrics::counter!(relay_proto::metrics::REQUESTS_CANCELLED_TOTAL).increment(1);
    }
    let ok = !event.cancelled && event.error_type.is_empty() && (200..400).contains(&event.http_status);
    a.log.attempt(&a.account.name, ttfb_ms, ok, &event);
    trace_attempt(&a.span, &event, response_id.as_deref(), stop_reason.as_deref(), ok);
    spool_event(&a.spool, &a.pending, event);
}

/// Hands one usage event to the spool; the shutdown drain waits for it.
fn spool_event(spool: &Arc<Spool>, pending: &Arc<Pending>, event: pb::UsageEvent) {
    let pending = pending.clone();
    pending.0.fetch_add(1, Ordering::AcqRel);
    spool.append_then(event, move |result| {
        if let Err(e) = result {
            metrics::counter!(relay_proto::metrics::USAGE_SPOOL_ERRORS_TOTAL).increment(1);
            tracing::error!(error = %e, "cannot write a usage event to the spool");
        }
        if pending.0.fetch_sub(1, Ordering::AcqRel) == 1 {
            pending.1.notify_waiters();
        }
    });
}

/// Records what the usage record says on the attempt's span (GenAI semantic conventions and
/// relay's own attributes). Never a credential, a key or any body text.
fn trace_attempt(
    span: &tracing::Span,
    event: &pb::UsageEvent,
    response_id: Option<&str>,
    stop_reason: Option<&str>,
    ok: bool,
) {
    if span.is_disabled() {
        return;
    }
    // Anthropic's stop_reason values are a short fixed list; anything else is not exported.
    if let Some(r) = stop_reason.filter(|r| r.len() <= 64 && r.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')) {
        relay_telemetry::set_string_array(span, "gen_ai.response.finish_reasons", &[r]);
    }
    span.record("gen_ai.response.model", event.model.as_str());
    if let Some(id) = response_id.filter(|id| id.len() <= 256) {
        span.record("gen_ai.response.id", id);
    }
    // Signed: an unsigned field is exported as a string.
    let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    span.record("gen_ai.usage.input_tokens", int(event.input_tokens));
    span.record("gen_ai.usage.output_tokens", int(event.output_tokens));
    span.record("relay.usage.cache_read_tokens", int(event.cache_read_tokens));
    span.record(
        "relay.usage.cache_write_tokens",
        int(event.cache_write_5m_tokens + event.cache_write_1h_tokens),
    );
    span.record("relay.cost_usd", event.cost_pico_usd as f64 / 1e12);
    if event.http_status > 0 {
        span.record("http.response.status_code", i64::from(event.http_status));
    }
    let outcome = if event.cancelled {
        "cancelled"
    } else if ok {
        "ok"
    } else {
        "failed"
    };
    span.record("relay.attempt.outcome", outcome);
    if !ok {
        let t = if event.error_type.is_empty() {
            "cancelled"
        } else {
            event.error_type.as_str()
        };
        span.record("error.type", t);
        span.record("otel.status_code", "ERROR");
    }
}

/// Tokens and cost into `relay_usage_tokens_total` and `relay_usage_cost_micro_usd_total`, by
/// price-table model pattern ("other" for a model the table does not price: the label never holds
/// a client's string) and key group; by key name too with `metrics.key_labels`.
fn count_usage(cfg: &ServingConfig, key: &KeyEntry, model: String, event: &pb::UsageEvent) {
    let group = cfg.group_name(&key.group_id).to_string();
    let cache_write = event.cache_write_5m_tokens.saturating_add(event.cache_write_1h_tokens);
    let tokens = [
        ("input", event.input_tokens),
        ("output", event.output_tokens),
        ("cache_read", event.cache_read_tokens),
        ("cache_write", cache_write),
    ];
    // Rounded to the nearest micro-USD per event (a counter counts whole units).
    let micro_usd = event.cost_pico_usd.saturating_add(500_000) / 1_000_000;
    use relay_proto::metrics::{USAGE_COST_MICRO_USD_TOTAL as COST, USAGE_TOKENS_TOTAL as TOKENS};
    if cfg.policy.key_labels {
        let k = key.name.clone();
        for (kind, n) in tokens {
            metrics::counter!(TOKENS, "kind" => kind, "model" => model.clone(), "group" => group.clone(), "key" => k.clone())
                .increment(n);
        }
        metrics::counter!(COST, "model" => model, "group" => group, "key" => k).increment(micro_usd);
    } else {
        for (kind, n) in tokens {
            metrics::counter!(TOKENS, "kind" => kind, "model" => model.clone(), "group" => group.clone()).increment(n);
        }
        metrics::counter!(COST, "model" => model, "group" => group).increment(micro_usd);
    }
}

/// A client request (its key known) that has not reached an upstream yet. If it ends without any
/// attempt (refused by its limits, no account available, a bad body, an estimate for count_tokens,
/// or the client gone first), it still leaves one usage row, with no account (`account_id` ""),
/// no tokens and no cost: the request log has exactly one record per request. Usage reports
/// leave such rows out.
pub struct Unattempted {
    pub spool: Arc<Spool>,
    pub pending: Arc<Pending>,
    pub node_id: Arc<str>,
    pub request_id: String,
    pub key_id: String,
    /// The requested model ("" until the body was read).
    pub model: String,
    pub stream: bool,
    pub started: Instant,
    pub client_request_id: String,
    /// Set by the first attempt: then that attempt's row stands for the request.
    pub attempted: Arc<std::sync::atomic::AtomicBool>,
    /// The answer's status, error type and relay's message; None when the client went away first.
    pub outcome: Option<(u16, String, String)>,
}

impl Drop for Unattempted {
    fn drop(&mut self) {
        if self.attempted.load(Ordering::Acquire) {
            return;
        }
        let (status, error_type, error_message, cancelled) = match self.outcome.take() {
            Some((s, e, m)) => (s, e, m, false),
            None => (
                0,
                String::new(),
                "the client went away before any upstream was called".into(),
                true,
            ),
        };
        let event = pb::UsageEvent {
            event_id: uuid::Uuid::now_v7().to_string(),
            request_id: std::mem::take(&mut self.request_id),
            timestamp_ms: chrono::Utc::now().timestamp_millis(),
            node_id: self.node_id.to_string(),
            api_key_id: std::mem::take(&mut self.key_id),
            model: std::mem::take(&mut self.model),
            http_status: u32::from(status),
            error_type,
            // The same bound the control plane keeps (512 bytes, on a character boundary).
            error_message: {
                let mut end = error_message.len().min(512);
                while !error_message.is_char_boundary(end) {
                    end -= 1;
                }
                error_message[..end].to_string()
            },
            stream: self.stream,
            cancelled,
            latency_ms: self.started.elapsed().as_millis() as u64,
            client_request_id: std::mem::take(&mut self.client_request_id),
            ..pb::UsageEvent::default()
        };
        metrics::counter!(relay_proto::metrics::REQUESTS_UNATTEMPTED_TOTAL).increment(1);
        spool_event(&self.spool, &self.pending, event);
    }
}

pub fn cost_of(prices: &PriceTable, model: &str, at_ms: i64, usage: &Usage) -> u64 {
    match prices.lookup(model, at_ms) {
        Some(p) => crate::upstream::usage::cost_pico_usd(p, usage),
        None => {
            if usage != &Usage::default() {
                metrics::counter!(relay_proto::metrics::USAGE_UNPRICED_TOTAL).increment(1);
            }
            0
        }
    }
}

/// Whether a body is an Anthropic error: `{"type":"error","error":{"type":"…",…}}`.
pub fn is_api_error(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Inner {
        #[serde(rename = "type")]
        kind: String,
    }
    #[derive(serde::Deserialize)]
    struct Err {
        #[serde(rename = "type")]
        kind: String,
        error: Inner,
    }
    serde_json::from_slice::<Err>(body).is_ok_and(|e| e.kind == "error" && !e.error.kind.is_empty())
}

/// Checks that a complete 2xx JSON body is an Anthropic answer (a `message` for the Messages API,
/// `{"input_tokens": N}` for count_tokens) and reads its usage. Err: what is wrong with it.
pub fn check_answer(is_messages: bool, body: &[u8]) -> Result<Recorded, &'static str> {
    #[derive(serde::Deserialize)]
    struct Answer {
        #[serde(rename = "type")]
        kind: Option<serde_json::Value>,
        usage: Option<serde_json::Value>,
        model: Option<serde_json::Value>,
        id: Option<serde_json::Value>,
        stop_reason: Option<serde_json::Value>,
        input_tokens: Option<serde_json::Value>,
    }
    let a: Answer = serde_json::from_slice(body).map_err(|_| "the body is not a JSON object")?;
    if !is_messages {
        return match a.input_tokens {
            Some(n) if n.is_u64() => Ok(Recorded::default()),
            _ => Err("the body has no input_tokens count"),
        };
    }
    if a.kind.as_ref().and_then(|k| k.as_str()) != Some("message") {
        return Err("the body is not a message");
    }
    let string = |v: Option<serde_json::Value>| match v {
        Some(serde_json::Value::String(s)) => Some(s),
        _ => None,
    };
    let model = string(a.model);
    let response_id = string(a.id);
    let stop_reason = string(a.stop_reason);
    Ok(match a.usage {
        Some(u) if u.is_object() => Recorded {
            usage: Usage::from_json(&u),
            suspect: Usage::has_unreadable_counts(&u),
            model,
            response_id,
            stop_reason,
            ..Recorded::default()
        },
        _ => Recorded {
            model,
            response_id,
            stop_reason,
            unparsed: true,
            ..Recorded::default()
        },
    })
}

/// Records an attempt whose whole (small) answer was read and that failed: an error status, an
/// invalid answer, a stream that failed before its first event. `tap` is what was read.
pub fn record_failed(a: Attempt, tap: &Tap, error_type: Option<&str>) {
    let mut r = tap.recorded(a.status);
    // A failed attempt's usage is whatever the tap could read; an unreadable one is not an anomaly.
    r.unparsed = false;
    match error_type {
        Some(t) => r.error_type = t.to_string(),
        None if r.error_type.is_empty() => r.error_type = "api_error".to_string(),
        None => {}
    }
    let ttfb = a.started.elapsed().as_millis() as u64;
    record(a, r, ttfb);
}

impl TappedBody {
    /// Sends `data` (already fed to the tap) merged with whatever else the
    /// upstream connection has already delivered, up to [`COALESCE_BYTES`].
    ///
    /// hyper hands a response body over from the connection task one chunk at a
    /// time, so a burst of SSE events read with one `recv` would otherwise
    /// leave as one `writev` each. While chunks keep coming, the bytes are held
    /// across scheduler turns (the task yields) so the connection task can hand
    /// over its next chunk; after [`IDLE_TURNS`] turns that bring nothing new,
    /// what is held is sent. No byte waits for the network, only for tasks
    /// that are already runnable: a few microseconds when idle; on a busy
    /// worker at most until its next I/O poll (tokio wakes deferred tasks then,
    /// every `event_interval` = 61 polls), the same bound socket readiness has.
    fn coalesce(
        &mut self,
        cx: &mut Context<'_>,
        data: Bytes,
        fresh: bool,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut merged: Option<bytes::BytesMut> = None;
        let mut more = false;
        let mut pending = false;
        while merged.as_ref().map_or(data.len(), |m| m.len()) < COALESCE_BYTES && !self.inner.is_end_stream() {
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(f))) => {
                    if let Ok(d) = f.into_data() {
                        self.tap.feed(&d);
                        merged
                            .get_or_insert_with(|| bytes::BytesMut::from(&data[..]))
                            .extend_from_slice(&d);
                        more = true;
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    self.deferred = Some(Deferred::Error(e));
                    break;
                }
                Poll::Ready(None) => {
                    self.deferred = Some(Deferred::End);
                    break;
                }
                Poll::Pending => {
                    pending = true;
                    break;
                }
            }
        }
        let out = merged.map_or(data, bytes::BytesMut::freeze);
        self.idle_turns = if fresh || more { 0 } else { self.idle_turns + 1 };
        if pending && self.idle_turns < IDLE_TURNS && out.len() < COALESCE_BYTES {
            self.held = Some(out);
            // tokio's yield: the wake-up is deferred until this worker has run
            // what is queued (the connection task just woken among them), and no
            // idle worker is signalled to steal this task back meanwhile.
            let mut turn = std::pin::pin!(tokio::task::yield_now());
            let _ = turn.as_mut().poll(cx);
            return Poll::Pending;
        }
        let out = self.release(out);
        let ending = if let Some(ok) = self.settled() {
            // message_stop read, or an event that is not JSON: the stream ends here.
            Some(self.close_now(ok))
        } else if self.inner.is_end_stream() || matches!(self.deferred, Some(Deferred::End)) {
            // hyper may not poll again once the body says it has
            // ended: record now, not in Drop (which would mean "cancelled").
            Some(self.end())
        } else {
            None
        };
        if let Some(last) = ending {
            self.deferred = None;
            return match (out, last) {
                (Some(out), last) => {
                    self.trailer_event = last;
                    Poll::Ready(Some(Ok(Frame::data(out))))
                }
                (None, Some(last)) => Poll::Ready(Some(Ok(Frame::data(last)))),
                (None, None) => Poll::Ready(None),
            };
        }
        let next = self.timeouts.idle.min(remaining(self.timeouts.total_deadline));
        self.idle.as_mut().reset(tokio::time::Instant::now() + next);
        match out {
            Some(out) => Poll::Ready(Some(Ok(Frame::data(out)))),
            None => {
                // Nothing whole to send yet. When the upstream is pending its waker is set;
                // otherwise (an error or end was deferred) come back at once.
                if !pending {
                    cx.waker().wake_by_ref();
                }
                Poll::Pending
            }
        }
    }
}

impl HttpBody for TappedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(p) = this.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(p))));
        }
        if let Some(ev) = this.trailer_event.take() {
            this.done = true;
            return Poll::Ready(Some(Ok(Frame::data(ev))));
        }
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(held) = this.held.take() {
            return this.coalesce(cx, held, false);
        }
        if let Some(ok) = this.settled() {
            // Settled in bytes already sent (the held first event): do not wait for more.
            this.deferred = None;
            return match this.close_now(ok) {
                Some(last) => Poll::Ready(Some(Ok(Frame::data(last)))),
                None => Poll::Ready(None),
            };
        }
        let polled = match this.deferred.take() {
            Some(Deferred::Error(e)) => Poll::Ready(Some(Err(e))),
            Some(Deferred::End) => Poll::Ready(None),
            None => Pin::new(&mut this.inner).poll_frame(cx),
        };
        match polled {
            Poll::Pending => {
                if this.idle.as_mut().poll(cx).is_ready() {
                    // Stalled: end the stream (with an SSE error event when it is a stream).
                    metrics::counter!(relay_proto::metrics::UPSTREAM_STREAM_ERRORS_TOTAL, "kind" => "stalled")
                        .increment(1);
                    if matches!(this.tap, Tap::Sse(_)) {
                        let ev = this.fail("upstream stream stalled");
                        return Poll::Ready(Some(Ok(Frame::data(ev))));
                    }
                    this.finish(Outcome2::UpstreamFailed);
                    this.done = true;
                    return Poll::Ready(Some(Err("upstream stream stalled".into())));
                }
                Poll::Pending
            }
            Poll::Ready(Some(Ok(frame))) => {
                let data = match frame.into_data() {
                    Ok(d) => d,
                    // Not data (trailers): dropped; relay ends the body itself.
                    Err(_) => {
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                };
                if this.ttfb_ms.is_none() {
                    if let Some(a) = &this.attempt {
                        this.ttfb_ms = Some(a.started.elapsed().as_millis() as u64);
                    }
                }
                this.tap.feed(&data);
                this.coalesce(cx, data, true)
            }
            Poll::Ready(Some(Err(e))) => {
                metrics::counter!(relay_proto::metrics::UPSTREAM_STREAM_ERRORS_TOTAL, "kind" => "failed").increment(1);
                if matches!(this.tap, Tap::Sse(_)) {
                    // The client already has a 200 and events: tell it in-band, then end.
                    let ev = this.fail("upstream connection lost mid-stream");
                    return Poll::Ready(Some(Ok(Frame::data(ev))));
                }
                this.finish(Outcome2::UpstreamFailed);
                this.done = true;
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(None) => match this.end() {
                Some(last) => Poll::Ready(Some(Ok(Frame::data(last)))),
                None => Poll::Ready(None),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.prefix.is_none() && self.trailer_event.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        // relay frames what it sends (whole events, perhaps its own error event): never the
        // upstream's length.
        http_body::SizeHint::default()
    }
}

impl Drop for TappedBody {
    fn drop(&mut self) {
        // Dropped before the end: the client went away. Dropping `inner`
        // closes the upstream connection, which cancels the upstream request;
        // dropping the slot releases the account's concurrency slot.
        if self.attempt.is_some() {
            self.finish(Outcome2::Cancelled);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::model_mismatch;

    #[test]
    fn a_dated_id_for_its_alias_is_no_mismatch_but_another_model_is() {
        for (req, ans) in [
            ("claude-sonnet-4-5", "claude-sonnet-4-5-20250929"),
            ("claude-3-5-sonnet-latest", "claude-3-5-sonnet-20241022"),
            ("claude-opus-4-1-20250805", "claude-opus-4-1-20250805"),
            ("claude-haiku-4-5-20251001", "claude-haiku-4-5"),
        ] {
            assert!(!model_mismatch(req, ans), "{req} → {ans}");
        }
        for (req, ans) in [
            ("claude-opus-4-1", "claude-sonnet-4-5-20250929"),
            ("claude-sonnet-4", "claude-sonnet-4-5-20250929"),
            ("claude-sonnet-4-5", "glm-4.6"),
        ] {
            assert!(model_mismatch(req, ans), "{req} → {ans}");
        }
    }

    #[test]
    fn every_mismatch_is_counted_per_account() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            for _ in 0..3 {
                super::note_model_mismatch("acct-mapped", "claude-sonnet-4-5", "glm-4.6");
            }
        });
        let text = handle.render();
        assert!(
            text.contains("relay_model_mismatch_total{account=\"acct-mapped\"} 3"),
            "{text}"
        );
    }
}
