//! Usage-event stage: what one attempt came to, as one usage row for the spool (tokens, cost,
//! status, timings, what the tap read), the attempt's span attributes and the usage metrics;
//! a request that never reached an upstream still leaves one row ([`Unattempted`]). Also the
//! check that a complete 2xx JSON body is an Anthropic answer ([`check_answer`]).

use crate::control::spool::Spool;
use crate::control::state::{AccountEntry, KeyEntry, ServingConfig};
use crate::upstream::sse::SseTap;
use crate::upstream::usage::{Answer, AnswerValues, PriceTable, Usage};
use relay_proto::anthropic::ApiError;
use relay_proto::v1 as pb;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Non-streaming bodies larger than this are passed through but not parsed for usage.
const MAX_TAPPED_BODY: usize = 32 << 20;

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
    pub waited: super::schedule::Waited,
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
    pub(super) fn recorded(&self, status: u16) -> Recorded {
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
            // An error answer (the attempt masked the account's secrets in it before feeding the
            // tap): its type, and its own message, bounded, for the request log.
            Tap::Buffer(b, _) if status >= 400 => {
                let error = ApiError::parse(b);
                Recorded {
                    error_type: error
                        .as_ref()
                        .and_then(|e| e.kind().map(str::to_owned))
                        .unwrap_or_else(|| "api_error".into()),
                    error_message: error
                        .as_ref()
                        .and_then(|e| e.message().map(bounded_message))
                        .unwrap_or_default(),
                    ..Recorded::default()
                }
            }
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
    let group_id = a.key.group_id.clone();
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
        model_requested: requested.clone(),
        group_id,
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
        .map_or("other", |p| p.model_pattern.as_str());
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
        super::meters::request_duration(a.stream, a.started.elapsed().as_secs_f64());
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
            tracing::error!(
                error = %e,
                "cannot write a usage event to the spool: it is kept in memory and sent, but lost if this data plane stops before the control plane has it"
            );
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
/// a client's string) and key group; by key name too with `metrics.key_labels`. The handles are
/// kept on the key's config entry ([`super::meters::UsageMeters`]).
fn count_usage(cfg: &ServingConfig, key: &KeyEntry, model: &str, event: &pb::UsageEvent) {
    let counters = key.usage_meters.get(model, || {
        use relay_proto::metrics::{USAGE_COST_MICRO_USD_TOTAL as COST, USAGE_TOKENS_TOTAL as TOKENS};
        let model = model.to_owned();
        let group = cfg.group_name(&key.group_id).to_owned();
        const KINDS: [&str; 4] = ["input", "output", "cache_read", "cache_write"];
        if cfg.policy.key_labels {
            let k = key.name.clone();
            super::meters::UsageCounters {
                tokens: KINDS.map(|kind| {
                    metrics::counter!(TOKENS, "kind" => kind, "model" => model.clone(), "group" => group.clone(), "key" => k.clone())
                }),
                cost: metrics::counter!(COST, "model" => model, "group" => group, "key" => k),
            }
        } else {
            super::meters::UsageCounters {
                tokens: KINDS.map(|kind| metrics::counter!(TOKENS, "kind" => kind, "model" => model.clone(), "group" => group.clone())),
                cost: metrics::counter!(COST, "model" => model, "group" => group),
            }
        }
    });
    let cache_write = event.cache_write_5m_tokens.saturating_add(event.cache_write_1h_tokens);
    let [input, output, cache_read, cache_written] = &counters.tokens;
    input.increment(event.input_tokens);
    output.increment(event.output_tokens);
    cache_read.increment(event.cache_read_tokens);
    cache_written.increment(cache_write);
    // Rounded to the nearest micro-USD per event (a counter counts whole units).
    counters
        .cost
        .increment(event.cost_pico_usd.saturating_add(500_000) / 1_000_000);
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
    /// The key's group when the request came ("" for none).
    pub group_id: String,
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

impl Unattempted {
    /// The request's body was read: its row names the model and whether it streamed.
    pub fn admitted(&mut self, req: &super::admission::ClientRequest) {
        self.model = req.model.clone();
        self.stream = req.stream;
    }
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
            model: self.model.clone(),
            model_requested: std::mem::take(&mut self.model),
            group_id: std::mem::take(&mut self.group_id),
            http_status: u32::from(status),
            error_type,
            error_message: bounded_message(&error_message),
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
    let a = match Answer::typed(body) {
        Some(a) => a,
        None => {
            let v: AnswerValues = serde_json::from_slice(body).map_err(|_| "the body is not a JSON object")?;
            Answer::from_values(v)
        }
    };
    if !is_messages {
        return if a.has_input_tokens {
            Ok(Recorded::default())
        } else {
            Err("the body has no input_tokens count")
        };
    }
    if !a.is_message {
        return Err("the body is not a message");
    }
    Ok(match a.usage {
        Some(u) => Recorded {
            usage: Usage::from_report(&u),
            suspect: u.has_unreadable(),
            model: a.model,
            response_id: a.id,
            stop_reason: a.stop_reason,
            ..Recorded::default()
        },
        None => Recorded {
            model: a.model,
            response_id: a.id,
            stop_reason: a.stop_reason,
            unparsed: true,
            ..Recorded::default()
        },
    })
}

/// Records an attempt whose whole (small) answer was read and that failed: an error status, an
/// invalid answer, a stream that failed before its first event. `tap` is what was read.
/// The same bound the control plane keeps on an error message (512 bytes, on a character
/// boundary).
fn bounded_message(message: &str) -> String {
    let mut end = message.len().min(512);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message[..end].to_string()
}

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
