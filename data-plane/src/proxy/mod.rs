//! The request path, cut into stages, one concern per file (in the spirit of linkerd2-proxy's
//! one layer per file). [`pipeline`] runs them in order for `POST /v1/messages` and
//! `/v1/messages/count_tokens`:
//!
//! | stage | file | owns |
//! | --- | --- | --- |
//! | routing | [`routes`] | the routes, the ops endpoints, the request's span, metrics and log line |
//! | admission | [`admission`] | config present and fresh, the key, `anthropic-version`, the bounded body read, the request head |
//! | groups | [`groups`] | a paused group, a route without an enabled account |
//! | limits | [`limit`] | the key's and group's rate, concurrency and budget limits |
//! | session | [`session`] | the sticky-session key and the account it is bound to |
//! | retry loop | [`retry`] | attempts until one is accepted, and which failure the client sees |
//! | scheduling | [`schedule`] | choosing an account, its slot, the bounded wait queue |
//! | attempt | [`attempt`] | one upstream call: head, error body, the first-event hold, the verdict |
//! | headers | [`headers`] | what goes upstream and what comes back to the client |
//! | tapped body | [`body`] | the streamed answer: whole events, coalesced writes, usage tapped |
//! | usage event | [`usage`] | the one usage row per attempt (or per unattempted request) |
//! | redaction | [`redact`] | an account's secrets out of an upstream's error body and of captures (`relay_proto::redact`) |
//! | estimate | [`fallback`] | count_tokens answered by relay's estimate when no account can |
//!
//! Errors become responses in one place (`crate::errors`).
//!
//! Architecture invariant: nothing here blocks on the control plane. Every
//! request is served from the config swapped in last (`ConfigHolder`), and
//! usage goes to the local spool.

pub mod admission;
pub mod attempt;
pub mod balance;
pub mod body;
pub mod capture;
pub mod cors;
pub mod estimate;
pub mod fallback;
pub mod gauges;
pub mod groups;
pub mod headers;
pub mod health;
pub mod held;
pub mod limit;
pub mod meters;
pub mod models;
pub mod pipeline;
pub mod policy;
pub mod quota;
pub mod redact;
pub mod reqlog;
pub mod retry;
pub mod routes;
pub mod schedule;
pub mod session;
pub mod sink;
pub mod sticky;
#[cfg(test)]
mod testkit;
pub mod usage;

use crate::control::spool::Spool;
use crate::control::state::ConfigHolder;
use crate::control::state_report::StateReporter;
use crate::errors::Body;
use crate::upstream::client::Upstreams;
use balance::Balancer;
use bytes::Bytes;
use health::HealthRegistry;
use http::HeaderMap;
use http_body_util::BodyExt;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;
use sticky::SessionStore;
use usage::Pending;

/// Requests to the Messages API may be up to 32 MB.
pub const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
/// Claude Code's telemetry batches are a few KB; they are acknowledged, never kept.
pub const MAX_TELEMETRY_BYTES: usize = 1024 * 1024;

pub struct Proxy {
    pub holder: Arc<ConfigHolder>,
    pub upstreams: Arc<Upstreams>,
    pub spool: Arc<Spool>,
    pub pending: Arc<Pending>,
    pub node_id: Arc<str>,
    pub balancer: Arc<Balancer>,
    pub health: Arc<HealthRegistry>,
    pub reporter: StateReporter,
    pub sessions: Arc<dyn SessionStore>,
    /// Requests waiting for an account right now.
    pub queued: AtomicUsize,
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// False once shutdown has begun (readiness).
    pub accepting: Arc<std::sync::atomic::AtomicBool>,
    /// How long a client may take to send a whole request body.
    pub body_read_timeout: std::time::Duration,
    /// Request-body bytes each key may have held at once on this data plane.
    pub held_bodies: Arc<held::HeldBodies>,
    /// When a control plane was last heard from.
    pub freshness: Arc<crate::control::freshness::Freshness>,
    /// Past this without a control plane, requests are refused (None: never).
    pub max_config_staleness: Option<Duration>,
    /// `/metrics`, `/readyz` and `/healthz` are on their own listener, not on the API's.
    pub ops_separate: bool,
    /// Keys' and groups' limits and budgets, and accounts' fleet-wide concurrency.
    pub limiter: Arc<relay_limits::Limiter>,
    /// Committed spend from the control plane, for budgets.
    pub spend: Arc<crate::control::spend::SpendBook>,
    /// Groups cooling down after all their accounts failed (their fallbacks go first).
    pub groups: Arc<groups::GroupCooling>,
    /// Capture rules' recordings in flight and their shipping queue.
    pub captures: Arc<capture::Captures>,
}

fn new_request_id() -> String {
    // Written straight into a string of the right size (no formatting machinery).
    let mut buf = uuid::Uuid::encode_buffer();
    let hex = uuid::Uuid::now_v7().simple().encode_lower(&mut buf);
    let mut id = String::with_capacity("req_relay_".len() + hex.len());
    id.push_str("req_relay_");
    id.push_str(hex);
    id
}

/// The client's own id for its request: the first of `x-request-id` and `request-id` that is
/// 1..=128 visible ASCII characters (`relay_proto::bounds::client_request_id`); an empty or
/// unusable `x-request-id` does not hide a good `request-id`.
fn client_request_id(h: &HeaderMap) -> Option<&str> {
    // Pre-parsed names: a `&str` key is parsed (and its case checked) on every lookup.
    static NAMES: [http::HeaderName; 2] = [
        http::HeaderName::from_static("x-request-id"),
        http::HeaderName::from_static("request-id"),
    ];
    NAMES.iter().find_map(|n| {
        h.get(n)
            .and_then(|v| v.to_str().ok())
            .and_then(relay_proto::bounds::client_request_id)
    })
}

tokio::task_local! {
    /// The time of the request being served that is not relay's own: waiting on upstreams, for
    /// an account, for the client's body, and the backoff between failed attempts. What is left
    /// of its head time is relay's overhead.
    static NOT_OURS: std::cell::Cell<Duration>;
}

/// Adds `d` to the current request's time that is not relay's own (no-op outside a request).
fn not_ours(d: Duration) {
    let _ = NOT_OURS.try_with(|c| c.set(c.get().saturating_add(d)));
}

/// Bytes of a finished response body (for tests).
pub async fn body_bytes(b: Body) -> Result<Bytes, crate::errors::BoxError> {
    Ok(b.collect().await?.to_bytes())
}

/// An error and its sources, "outer: inner: innermost" (hyper's own Display
/// says only "client error (Connect)").
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut last = out.clone();
    let mut next = e.source();
    while let Some(cause) = next {
        // hyper wraps an error in one that says the same ("tcp connect error: tcp connect error").
        let text = cause.to_string();
        if text != last {
            out.push_str(": ");
            out.push_str(&text);
        }
        last = text;
        next = cause.source();
    }
    out
}

#[cfg(test)]
mod request_id_tests {
    #[test]
    fn a_request_id_is_req_relay_and_32_lower_case_hex_digits_and_new_each_time() {
        let (a, b) = (super::new_request_id(), super::new_request_id());
        for id in [&a, &b] {
            let hex = id.strip_prefix("req_relay_").unwrap_or_default();
            assert_eq!(hex.len(), 32, "{id}");
            assert!(hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')), "{id}");
        }
        assert_ne!(a, b);
    }
}
