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

/// The headers sent upstream for one attempt.
pub fn upstream_headers(client: &HeaderMap, account: &AccountEntry) -> HeaderMap {
    let mut h = client.clone();
    strip_hop_by_hop(&mut h);
    h.remove(header::HOST);
    h.remove(&X_API_KEY);
    h.remove(header::AUTHORIZATION);
    h.remove(header::CONTENT_LENGTH);
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

/// The headers the client gets back.
pub fn client_headers(upstream: &HeaderMap, request_id: &str) -> HeaderMap {
    let mut h = upstream.clone();
    strip_hop_by_hop(&mut h);
    for n in &UPSTREAM_IDENTITY {
        h.remove(n);
    }
    if let Some(up) = h.remove(&REQUEST_ID) {
        h.insert(X_UPSTREAM_REQUEST_ID.clone(), up);
    }
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert(REQUEST_ID.clone(), v);
    }
    h
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
}

impl HealthSink {
    pub fn observe(&self, account_id: &str, model: &str, outcome: &Outcome<'_>) -> super::health::Verdict {
        let now = chrono::Utc::now().timestamp_millis();
        let (verdict, report) =
            self.registry
                .observe_as_of(account_id, self.generation, model, outcome, &self.settings, now);
        if let Some(state) = report {
            tracing::info!(account_id, health = state.health, reason = %state.reason, "account state changed");
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
    pub status: u16,
    pub upstream_request_id: String,
    pub health: HealthSink,
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
    Cancelled,
}

/// A response body passed through frame by frame, recording usage once.
pub struct TappedBody {
    inner: hyper::body::Incoming,
    prefix: Option<Bytes>,
    tap: Tap,
    attempt: Option<Attempt>,
    ttfb_ms: Option<u64>,
    slot: Option<SlotGuard>,
    timeouts: BodyTimeouts,
    idle: Pin<Box<tokio::time::Sleep>>,
    /// A synthetic `event: error` to send before ending (mid-stream failure).
    trailer_event: Option<Bytes>,
    /// What the upstream body said while frames were being coalesced.
    deferred: Option<Deferred>,
    /// Bytes read but held for a scheduler turn (see `coalesce`).
    held: Option<Bytes>,
    /// Consecutive turns that brought no new chunk while holding.
    idle_turns: u8,
    done: bool,
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

impl TappedBody {
    /// `prefix` holds bytes already read from `inner` (and already fed to `tap`).
    pub fn new(
        inner: hyper::body::Incoming,
        prefix: Option<Bytes>,
        tap: Tap,
        attempt: Attempt,
        slot: Option<SlotGuard>,
        timeouts: BodyTimeouts,
        ttfb_ms: Option<u64>,
    ) -> Self {
        let idle = Box::pin(tokio::time::sleep(
            timeouts.idle.min(remaining(timeouts.total_deadline)),
        ));
        Self {
            inner,
            prefix,
            tap,
            attempt: Some(attempt),
            ttfb_ms,
            slot,
            timeouts,
            idle,
            trailer_event: None,
            deferred: None,
            held: None,
            idle_turns: 0,
            done: false,
        }
    }

    pub fn boxed(self) -> Body {
        BodyExt::boxed(self)
    }

    fn finish(&mut self, outcome: Outcome2) {
        let Some(a) = self.attempt.take() else { return };
        let (usage, model, error_type) = match &self.tap {
            Tap::Sse(t) => (
                t.usage(),
                t.model().map(str::to_string),
                t.error_type().map(str::to_string),
            ),
            Tap::Buffer(b, false) if a.status >= 400 => (Usage::default(), None, Usage::parse_error_type(b)),
            Tap::Buffer(b, false) => match Usage::parse_message_body(b) {
                Some((u, m, _)) => (u, m, None),
                None => (Usage::default(), None, None),
            },
            Tap::Buffer(..) => (Usage::default(), None, None),
        };
        let error_type = match (outcome, error_type) {
            (_, Some(t)) => t,
            (Outcome2::UpstreamFailed, None) => "api_error".to_string(),
            _ => String::new(),
        };
        // The account's health: a stream that failed after its head counts against it.
        match outcome {
            Outcome2::UpstreamFailed => {
                a.health.observe(&a.account.id, &a.model, &Outcome::ConnectError);
            }
            Outcome2::Complete if error_type == "overloaded_error" => {
                a.health.observe(
                    &a.account.id,
                    &a.model,
                    &Outcome::StreamError {
                        error_type: &error_type,
                    },
                );
            }
            _ => {}
        }
        let ttfb = self.ttfb_ms.unwrap_or(0);
        record(a, usage, model, error_type, outcome == Outcome2::Cancelled, ttfb);
        // Release the concurrency slot now rather than when the body is dropped.
        self.slot = None;
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

/// Builds the usage event and hands it to the spool (asynchronously: the
/// client already has its answer).
fn record(a: Attempt, usage: Usage, model: Option<String>, error_type: String, cancelled: bool, ttfb_ms: u64) {
    let billed_model = model.filter(|m| !m.is_empty()).unwrap_or(a.model);
    let now = chrono::Utc::now().timestamp_millis();
    let cost = cost_of(&a.config.prices, &billed_model, now, &usage);
    let event = pb::UsageEvent {
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
        cost_pico_usd: cost,
        http_status: u32::from(a.status),
        error_type,
        stream: a.stream,
        cancelled,
        latency_ms: a.started.elapsed().as_millis() as u64,
        ttfb_ms,
        upstream_request_id: a.upstream_request_id,
        web_search_requests: usage.web_search_requests,
    };
    metrics::counter!("relay_usage_tokens_total", "kind" => "input").increment(usage.input_tokens);
    metrics::counter!("relay_usage_tokens_total", "kind" => "output").increment(usage.output_tokens);
    if cancelled {
        metrics::counter!("relay_requests_cancelled_total").increment(1);
    }
    let spool = a.spool;
    let pending = a.pending;
    pending.0.fetch_add(1, Ordering::AcqRel);
    spool.append_then(event, move |result| {
        if let Err(e) = result {
            metrics::counter!("relay_usage_spool_errors_total").increment(1);
            tracing::error!(error = %e, "cannot write a usage event to the spool");
        }
        if pending.0.fetch_sub(1, Ordering::AcqRel) == 1 {
            pending.1.notify_waiters();
        }
    });
}

pub fn cost_of(prices: &PriceTable, model: &str, at_ms: i64, usage: &Usage) -> u64 {
    match prices.lookup(model, at_ms) {
        Some(p) => crate::upstream::usage::cost_pico_usd(p, usage),
        None => {
            if usage != &Usage::default() {
                metrics::counter!("relay_usage_unpriced_total").increment(1);
            }
            0
        }
    }
}

/// Records an attempt whose whole (small) answer was read: a failed attempt,
/// or a stream that failed before its first event. `tap` is what was read.
pub fn record_read(a: Attempt, tap: &Tap) {
    let (usage, model, error_type) = match tap {
        Tap::Sse(t) => (
            t.usage(),
            t.model().map(str::to_string),
            t.error_type().map(str::to_string).unwrap_or_else(|| "api_error".into()),
        ),
        Tap::Buffer(b, _) if a.status >= 400 => (
            Usage::default(),
            None,
            Usage::parse_error_type(b).unwrap_or_else(|| "api_error".into()),
        ),
        Tap::Buffer(b, _) => (
            Usage::parse_message_body(b).map(|(u, _, _)| u).unwrap_or_default(),
            None,
            String::new(),
        ),
    };
    let ttfb = a.started.elapsed().as_millis() as u64;
    record(a, usage, model, error_type, false, ttfb);
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
        if self.inner.is_end_stream() || matches!(self.deferred, Some(Deferred::End)) {
            // hyper may not poll again once the body says it has
            // ended: record now, not in Drop (which would mean "cancelled").
            self.finish(Outcome2::Complete);
            self.done = true;
            return Poll::Ready(Some(Ok(Frame::data(out))));
        }
        let next = self.timeouts.idle.min(remaining(self.timeouts.total_deadline));
        self.idle.as_mut().reset(tokio::time::Instant::now() + next);
        Poll::Ready(Some(Ok(Frame::data(out))))
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
        let polled = match this.deferred.take() {
            Some(Deferred::Error(e)) => Poll::Ready(Some(Err(e))),
            Some(Deferred::End) => Poll::Ready(None),
            None => Pin::new(&mut this.inner).poll_frame(cx),
        };
        match polled {
            Poll::Pending => {
                if this.idle.as_mut().poll(cx).is_ready() {
                    // Stalled: end the stream (with an SSE error event when it is a stream).
                    metrics::counter!("relay_upstream_stream_errors_total", "kind" => "stalled").increment(1);
                    let is_sse = matches!(this.tap, Tap::Sse(_));
                    this.finish(Outcome2::UpstreamFailed);
                    if is_sse {
                        this.done = true;
                        return Poll::Ready(Some(Ok(Frame::data(error_event("upstream stream stalled")))));
                    }
                    return Poll::Ready(Some(Err("upstream stream stalled".into())));
                }
                Poll::Pending
            }
            Poll::Ready(Some(Ok(frame))) => {
                let data = match frame.into_data() {
                    Ok(d) => d,
                    // Not data (trailers): pass it on as is.
                    Err(other) => return Poll::Ready(Some(Ok(other))),
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
                metrics::counter!("relay_upstream_stream_errors_total", "kind" => "failed").increment(1);
                let is_sse = matches!(this.tap, Tap::Sse(_));
                this.finish(Outcome2::UpstreamFailed);
                if is_sse {
                    // The client already has a 200 and events: tell it in-band, then end.
                    this.done = true;
                    return Poll::Ready(Some(Ok(Frame::data(error_event(
                        "upstream connection lost mid-stream",
                    )))));
                }
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(None) => {
                this.finish(Outcome2::Complete);
                this.done = true;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none()
            && self.trailer_event.is_none()
            && self.held.is_none()
            && self.deferred.is_none()
            && (self.done || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        if self.prefix.is_some() {
            return http_body::SizeHint::default();
        }
        self.inner.size_hint()
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
