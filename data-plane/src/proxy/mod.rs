//! The request path: routing, authentication, model checks, scheduling and
//! forwarding, each a small step of its own; errors become responses in one
//! place (`crate::errors`).
//!
//! Architecture invariant: nothing here blocks on the control plane. Every
//! request is served from the config swapped in last (`ConfigHolder`), and
//! usage goes to the local spool.

pub mod balance;
pub mod cors;
pub mod estimate;
pub mod forward;
pub mod gauges;
pub mod groups;
pub mod health;
pub mod held;
pub mod limit;
pub mod models;
pub mod policy;
pub mod quota;
pub mod reqlog;
pub mod sticky;

use crate::control::spool::Spool;
use crate::control::state::{AccountEntry, ConfigHolder, KeyEntry, ServingConfig};
use crate::control::state_report::StateReporter;
use crate::errors::{full, ApiError, Body};
use crate::upstream::client::Upstreams;
use crate::upstream::encoding::Encoding;
use balance::{Balancer, SlotGuard};
use bytes::Bytes;
use forward::{Attempt, AttemptGuard, HealthSink, Pending, Tap, TappedBody};
use health::{Availability, HealthRegistry, Outcome};
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use relay_proto::v1 as pb;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use sticky::SessionStore;
use tracing::Instrument;

/// How often a request waiting for an account whose fleet-wide slots are all taken looks again.
const FLEET_SLOT_POLL_MS: i64 = 50;
/// The least time a stream is given to start (head and first event), however little of the retry
/// deadline is left.
const STREAM_START_MIN: Duration = Duration::from_secs(10);
/// How often a request suspended for a recovery looks again (a new config wakes it at once).
const SUSPENDED_POLL_MS: i64 = 250;

/// The longest a count_tokens request waits for an account (its answer otherwise is relay's estimate).
const COUNT_TOKENS_MAX_WAIT: Duration = Duration::from_secs(2);

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
}

fn new_request_id() -> String {
    format!("req_relay_{}", uuid::Uuid::now_v7().simple())
}

/// The client's own id for its request: the first of `x-request-id` and `request-id` that is
/// 1..=128 visible ASCII characters (`relay_proto::bounds::client_request_id`); an empty or
/// unusable `x-request-id` does not hide a good `request-id`.
fn client_request_id(h: &HeaderMap) -> Option<&str> {
    ["x-request-id", "request-id"].iter().find_map(|n| {
        h.get(*n)
            .and_then(|v| v.to_str().ok())
            .and_then(relay_proto::bounds::client_request_id)
    })
}

fn json_response(status: StatusCode, body: &serde_json::Value, request_id: &str) -> Response<Body> {
    let mut r = Response::new(full(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Ok(v) = HeaderValue::from_str(request_id) {
        r.headers_mut().insert("request-id", v);
    }
    r
}

/// The presented relay key: `x-api-key`, else `Authorization: Bearer`.
fn presented_key(h: &HeaderMap) -> Option<&str> {
    if let Some(k) = h.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(k.trim());
    }
    let auth = h.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = auth.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}

fn authenticate(cfg: &ServingConfig, h: &HeaderMap) -> Result<Arc<KeyEntry>, ApiError> {
    let presented = presented_key(h)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| ApiError::authentication("x-api-key header is required"))?;
    let key = cfg
        .key_for(presented)
        .ok_or_else(|| ApiError::authentication("invalid x-api-key"))?;
    match key.status {
        pb::KeyStatus::Active => {}
        pb::KeyStatus::Revoked => return Err(ApiError::authentication("this API key has been revoked")),
        pb::KeyStatus::Disabled => return Err(ApiError::permission("this API key is disabled")),
        pb::KeyStatus::Unspecified => return Err(ApiError::authentication("invalid x-api-key")),
    }
    if key.expires_at_ms > 0 && key.expires_at_ms <= chrono::Utc::now().timestamp_millis() {
        return Err(ApiError::authentication("this API key has expired"));
    }
    Ok(key.clone())
}

fn check_version(h: &HeaderMap) -> Result<(), ApiError> {
    let v = h
        .get("anthropic-version")
        .ok_or_else(|| ApiError::invalid_request("anthropic-version: header is required"))?;
    let ok = v.to_str().is_ok_and(|s| {
        let b = s.as_bytes();
        b.len() == 10
            && b[4] == b'-'
            && b[7] == b'-'
            && b.iter()
                .enumerate()
                .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
    });
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid_request(
            "anthropic-version: must be a version date such as 2023-06-01",
        ))
    }
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

#[derive(serde::Deserialize)]
struct RequestHead {
    model: Option<serde_json::Value>,
    #[serde(default)]
    stream: Option<serde_json::Value>,
    #[serde(default)]
    max_tokens: Option<serde_json::Value>,
}

impl Proxy {
    /// Serves one request. Never fails: every error becomes a response.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Response<Body>, std::convert::Infallible> {
        let started = Instant::now();
        let request_id = new_request_id();
        let route = route_label(req.method(), req.uri().path());
        // Every line logged while the request is routed carries relay's id and the client's own.
        // Exported, it is the trace's SERVER span (a child of the client's `traceparent`).
        let span = tracing::info_span!(
            "request",
            request_id = %request_id,
            client_request_id = tracing::field::Empty,
            otel.name = %format!("{} {route}", req.method()),
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            http.request.method = %req.method(),
            http.route = route,
            http.response.status_code = tracing::field::Empty,
            relay.key.name = tracing::field::Empty,
            relay.group = tracing::field::Empty,
            relay.attempts = tracing::field::Empty,
            error.type = tracing::field::Empty,
        );
        if let Some(id) = client_request_id(req.headers()) {
            span.record("client_request_id", id);
        }
        relay_telemetry::set_parent_from_headers(&span, req.headers());
        let log = reqlog::RequestLog::new(
            &request_id,
            client_request_id(req.headers()),
            relay_telemetry::trace_id(&span),
            route,
            started,
        );
        let cors = match self.holder.get() {
            Some(cfg) => cfg.policy.cors.judge(req.uri().path(), req.headers()),
            None => cors::Verdict::Off,
        };
        let method = req.method().clone();
        let resp = if method == Method::OPTIONS && cors.answers_preflight() {
            // A browser's preflight: answered here, without a key.
            cors::preflight(&cors, req.headers(), &request_id)
        } else {
            let routed = NOT_OURS.scope(std::cell::Cell::new(Duration::ZERO), async {
                let r = self
                    .route(req, &request_id, started, &log)
                    .instrument(span.clone())
                    .await;
                (r, NOT_OURS.with(std::cell::Cell::get))
            });
            let (routed, waited) = routed.await;
            if matches!(route, "messages" | "count_tokens") {
                metrics::histogram!(relay_proto::metrics::OVERHEAD_SECONDS, "route" => route)
                    .record(started.elapsed().saturating_sub(waited).as_secs_f64());
            }
            let mut resp = match routed {
                Ok(r) => r,
                Err(e) => {
                    metrics::counter!(relay_proto::metrics::ERROR_ANSWERS_TOTAL, "type" => e.kind).increment(1);
                    log.answered(e.status.as_u16(), Some(e.kind));
                    span.record("error.type", e.kind);
                    e.into_response(&request_id)
                }
            };
            cors::decorate(&cors, &mut resp);
            resp
        };
        metrics::counter!(relay_proto::metrics::REQUESTS_TOTAL, "route" => route, "status" => status_class(resp.status()))
            .increment(1);
        log.answered(resp.status().as_u16(), None);
        span.record("http.response.status_code", i64::from(resp.status().as_u16()));
        if resp.status().is_server_error() {
            span.record("otel.status_code", "ERROR");
        }
        metrics::histogram!(relay_proto::metrics::REQUEST_HEAD_SECONDS, "route" => route)
            .record(started.elapsed().as_secs_f64());
        span.in_scope(|| {
            tracing::debug!(
                method = %method,
                route,
                status = resp.status().as_u16(),
                head_ms = started.elapsed().as_millis() as u64,
                "answered"
            )
        });
        Ok(resp)
    }

    /// Serves the operations listener: `/healthz`, `/readyz`, `/metrics`, nothing else.
    pub async fn handle_ops(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, std::convert::Infallible> {
        let request_id = new_request_id();
        let resp = match (req.method(), req.uri().path()) {
            (&Method::GET, "/healthz" | "/readyz" | "/metrics") => self.ops(req.uri().path(), &request_id),
            _ => ApiError::not_found(format!("no route for {} {}", req.method(), req.uri().path()))
                .into_response(&request_id),
        };
        Ok(resp)
    }

    fn ops(&self, path: &str, request_id: &str) -> Response<Body> {
        match path {
            "/readyz" => self.readyz(request_id),
            "/metrics" => self.metrics_text(),
            _ => json_response(StatusCode::OK, &serde_json::json!({"status": "ok"}), request_id),
        }
    }

    async fn route(
        &self,
        req: Request<Incoming>,
        request_id: &str,
        started: Instant,
        log: &Arc<reqlog::RequestLog>,
    ) -> Result<Response<Body>, ApiError> {
        let path = req.uri().path().to_string();
        match (req.method(), path.as_str()) {
            (&Method::GET, "/healthz" | "/readyz" | "/metrics") if !self.ops_separate => {
                Ok(self.ops(&path, request_id))
            }
            (&Method::POST, "/api/event_logging/batch") => {
                // Claude Code telemetry: acknowledge, never forward, never keep. Read as it
                // comes (nothing buffered), bounded in size and time; no key is needed.
                let mut body = req.into_body();
                let read = async {
                    let mut seen = 0usize;
                    while let Some(frame) = body.frame().await {
                        let frame = frame.map_err(|_| ApiError::invalid_request("could not read the request body"))?;
                        seen += frame.data_ref().map_or(0, |d| d.len());
                        if seen > MAX_TELEMETRY_BYTES {
                            return Err(ApiError::too_large("a telemetry batch is at most 1 MB"));
                        }
                    }
                    Ok(())
                };
                tokio::time::timeout(self.body_read_timeout, read)
                    .await
                    .map_err(|_| ApiError::body_timeout("the request body did not arrive in time"))??;
                Ok(json_response(StatusCode::OK, &serde_json::json!({}), request_id))
            }
            (&Method::POST, "/v1/messages") => self.forward(req, request_id, started, log, true).await,
            (&Method::POST, "/v1/messages/count_tokens") => self.forward(req, request_id, started, log, false).await,
            (&Method::GET, "/relay/v1/key") => {
                // The key holder's own view: authenticated with the key itself.
                let (cfg, key) = self.admit(req.headers())?;
                let body = limit::status(&self.limiter, &self.spend, &cfg, &key).await;
                Ok(json_response(StatusCode::OK, &body, request_id))
            }
            (&Method::GET, "/v1/models") => {
                let (cfg, key) = self.admit(req.headers())?;
                let list = models::visible(&cfg, &key);
                Ok(json_response(
                    StatusCode::OK,
                    &models::page(list, req.uri().query()),
                    request_id,
                ))
            }
            (&Method::GET, p) if p.starts_with("/v1/models/") => {
                let (cfg, key) = self.admit(req.headers())?;
                let id = &p["/v1/models/".len()..];
                let list = models::visible(&cfg, &key);
                match models::find(&list, id) {
                    Some(m) => Ok(json_response(StatusCode::OK, &m, request_id)),
                    None => Err(ApiError::not_found(format!("model: {id}"))),
                }
            }
            (_, "/v1/messages" | "/v1/messages/count_tokens" | "/v1/models" | "/relay/v1/key") => {
                let allow = if path.starts_with("/v1/messages") {
                    "POST"
                } else {
                    "GET"
                };
                Err(ApiError {
                    status: StatusCode::METHOD_NOT_ALLOWED,
                    headers: vec![(header::ALLOW, HeaderValue::from_static(allow))],
                    ..ApiError::invalid_request(format!(
                        "method {} is not allowed on {path} (use {allow})",
                        req.method()
                    ))
                })
            }
            _ => Err(ApiError::not_found(not_routed(req.method(), &path))),
        }
    }

    fn readyz(&self, request_id: &str) -> Response<Body> {
        let cfg = self.holder.get();
        let accepting = self.accepting.load(std::sync::atomic::Ordering::Acquire) && self.stale().is_none();
        let body = serde_json::json!({
            "ready": cfg.is_some() && accepting,
            "config_version": cfg.as_ref().map(|c| c.version.to_string()),
        });
        let status = if cfg.is_some() && accepting {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        json_response(status, &body, request_id)
    }

    fn metrics_text(&self) -> Response<Body> {
        // Cooldowns end by themselves: the gauge is brought up to date before it is read.
        let now = chrono::Utc::now().timestamp_millis();
        self.groups.refresh(self.holder.get().as_deref(), now);
        if let Some(cfg) = self.holder.get() {
            gauges::refresh(&cfg, &self.health, &self.spend, now);
        }
        let text = self.metrics.as_ref().map(|h| h.render()).unwrap_or_default();
        let mut r = Response::new(full(text));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        r
    }

    /// Config present and key valid.
    /// The config is too old to serve: no control plane for longer than the maximum staleness.
    fn stale(&self) -> Option<ApiError> {
        let max = self.max_config_staleness?;
        let age = self.freshness.stale_for(max)?;
        metrics::counter!(relay_proto::metrics::REQUESTS_REFUSED_STALE_CONFIG_TOTAL).increment(1);
        let mut e = ApiError::stale_config(format!(
            "relay has not reached its control plane for {} minutes (at most {} allowed): it no longer serves a \
             config that may still hold revoked keys",
            age.as_secs() / 60,
            max.as_secs() / 60
        ));
        e.retry_after_secs = Some(30);
        Some(e)
    }

    fn admit(&self, h: &HeaderMap) -> Result<(Arc<ServingConfig>, Arc<KeyEntry>), ApiError> {
        let cfg = self.holder.get().ok_or_else(ApiError::not_ready)?;
        if let Some(e) = self.stale() {
            return Err(e);
        }
        let key = authenticate(&cfg, h)?;
        Ok((cfg, key))
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        request_id: &str,
        started: Instant,
        log: &Arc<reqlog::RequestLog>,
        is_messages: bool,
    ) -> Result<Response<Body>, ApiError> {
        let (cfg, key) = self.admit(req.headers())?;
        let span = tracing::Span::current();
        span.record("relay.key.name", key.name.as_str());
        span.record("relay.group", cfg.group_name(&key.group_id));
        // From here on (the key known) the request leaves a usage row even if no attempt does.
        let mut unattempted = forward::Unattempted {
            spool: self.spool.clone(),
            pending: self.pending.clone(),
            node_id: self.node_id.clone(),
            request_id: request_id.to_string(),
            key_id: key.id.clone(),
            model: String::new(),
            stream: false,
            started,
            client_request_id: client_request_id(req.headers()).unwrap_or("").to_string(),
            attempted: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            outcome: None,
        };
        let out = self
            .forward_admitted(req, request_id, started, log, is_messages, cfg, key, &mut unattempted)
            .await;
        unattempted.outcome = Some(match &out {
            Ok(r) => (r.status().as_u16(), String::new(), String::new()),
            Err(e) => (e.status.as_u16(), e.kind.to_string(), e.message.clone()),
        });
        out
    }

    #[allow(clippy::too_many_arguments)]
    async fn forward_admitted(
        &self,
        req: Request<Incoming>,
        request_id: &str,
        started: Instant,
        log: &Arc<reqlog::RequestLog>,
        is_messages: bool,
        cfg: Arc<ServingConfig>,
        key: Arc<KeyEntry>,
        unattempted: &mut forward::Unattempted,
    ) -> Result<Response<Body>, ApiError> {
        check_version(req.headers())?;
        let (parts, mut incoming) = req.into_parts();
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        // This key's share of the request bodies held at once (a large body counts until the
        // upstream has answered).
        let mut hold: Option<held::Hold> = None;
        let mut over_held = false;
        let body = if declared.is_some_and(|n| n > MAX_BODY_BYTES) {
            None
        } else {
            let read = async {
                if let Some(n) = declared {
                    if self.held_bodies.grow(&mut hold, &key.id, n).is_err() {
                        over_held = true;
                        return Ok(None);
                    }
                }
                let mut buf = bytes::BytesMut::with_capacity(declared.unwrap_or(0).min(MAX_BODY_BYTES));
                while let Some(frame) = incoming.frame().await {
                    let frame = frame.map_err(|_| ApiError::invalid_request("could not read the request body"))?;
                    if let Some(d) = frame.data_ref() {
                        if buf.len() + d.len() > MAX_BODY_BYTES {
                            return Ok(None);
                        }
                        buf.extend_from_slice(d);
                        if self.held_bodies.grow(&mut hold, &key.id, buf.len()).is_err() {
                            over_held = true;
                            return Ok(None);
                        }
                    }
                }
                Ok(Some(buf.freeze()))
            };
            // A client trickling its body does not hold a connection and its buffer forever.
            let reading = Instant::now();
            let read = tokio::time::timeout(self.body_read_timeout, read).await;
            not_ours(reading.elapsed());
            read.map_err(|_| ApiError::body_timeout("the request body did not arrive in time"))??
        };
        let Some(body) = body else {
            // Read (and discard) what the client is still sending, so it gets
            // this answer instead of a broken pipe; give up past twice the limit.
            let mut drained = 0usize;
            drop(hold);
            while let Some(Ok(frame)) = incoming.frame().await {
                drained += frame.data_ref().map_or(0, |d| d.len());
                if drained > 2 * MAX_BODY_BYTES {
                    break;
                }
            }
            if over_held {
                let mut e = ApiError::rate_limited(format!(
                    "this API key already has {} MB of request bodies in flight on this relay; retry when some finish",
                    self.held_bodies.held_by(&key.id) >> 20
                ));
                e.retry_after_secs = Some(1);
                return Err(e);
            }
            return Err(ApiError::too_large("request body exceeds the 32 MB limit"));
        };
        // A JSON array would deserialize into the head's fields in order: only an object is a request.
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(ApiError::invalid_request("request body must be a JSON object"));
        }
        let head: RequestHead = serde_json::from_slice(&body)
            .map_err(|e| ApiError::invalid_request(format!("request body is not valid JSON: {e}")))?;
        let model = match head.model {
            Some(serde_json::Value::String(m)) if !m.is_empty() => m,
            Some(_) => return Err(ApiError::invalid_request("model: must be a string")),
            None => return Err(ApiError::invalid_request("model: Field required")),
        };
        let stream = is_messages && matches!(head.stream, Some(serde_json::Value::Bool(true)));
        unattempted.model = model.clone();
        unattempted.stream = stream;
        log.admitted(
            &key.name,
            cfg.group_name(&key.group_id),
            &model,
            stream,
            cfg.policy.success_sample,
        );
        if !key.allows(&model) {
            return Err(ApiError::permission(format!("this API key may not use model {model}")));
        }
        // Limits and budgets: checked and counted before any upstream is called.
        let max_tokens = head
            .max_tokens
            .as_ref()
            .and_then(|v| v.as_u64())
            .unwrap_or(0)
            .min(1 << 24);
        // A paused group with nowhere to fall back to: refused before anything is counted.
        if let Some(e) = groups::paused_refusal(&cfg, &key.group_id) {
            return Err(e);
        }
        // No enabled account on the route at all: a configuration gap, said as such (count_tokens
        // is answered by the estimate instead).
        if is_messages {
            if let Some(e) = groups::no_account_refusal(&cfg, &key.group_id) {
                return Err(e);
            }
        }
        let (tokens, cost) = limit::estimate(&cfg, &model, body.len(), max_tokens, is_messages);
        let admitted = limit::admit(&self.limiter, &self.spend, &cfg, &key, &model, tokens, cost).await?;

        let policy = &cfg.policy;
        let deadline = tokio::time::Instant::now() + policy.retry_deadline;
        // Sessions are per group: the same session id from another tenant's client is another session.
        let session = if is_messages {
            sticky::session_key(&parts.headers, &body).map(|s| format!("{}:{s}", key.group_id))
        } else {
            None
        };
        let bound = match &session {
            Some(k) => self.sessions.get(k).await,
            None => None,
        };
        let ctx = AttemptCtx {
            cfg: &cfg,
            key: &key,
            parts: &parts,
            body: &body,
            model: &model,
            stream,
            request_id,
            client_request_id: client_request_id(&parts.headers).unwrap_or(""),
            started,
            policy,
            deadline,
            is_messages,
            charge: admitted.charge.clone(),
            attempted: &unattempted.attempted,
            log,
            max_tokens,
        };
        let out = self.attempts(&ctx, session.as_deref(), bound.as_deref()).await;
        // count_tokens that no account could answer: relay's own estimate (never for usage).
        let out = if is_messages {
            out
        } else {
            estimate_unanswered(out, &body, request_id).await
        };
        // A limited key's standing goes on every answer, success or not.
        match out {
            Ok(mut resp) => {
                for (name, value) in admitted.headers {
                    resp.headers_mut().insert(name, value);
                }
                Ok(resp)
            }
            Err(mut e) => {
                e.headers.extend(admitted.headers);
                Err(e)
            }
        }
    }

    /// The retry loop: an account, an attempt, and on failure another account, until an answer
    /// is accepted, the deadline runs out, nothing is left to try, or `retry.max_attempts`
    /// attempts that took real time have failed. Each account is tried at most once; a failure
    /// quicker than `retry.quick_failure_ms` (a 429 or 529 at once, a refused connection) costs
    /// no attempt, so a group with healthy accounts is never given up on because its broken ones
    /// answered first.
    async fn attempts(
        &self,
        ctx: &AttemptCtx<'_>,
        session: Option<&str>,
        bound: Option<&str>,
    ) -> Result<Response<Body>, ApiError> {
        let (policy, deadline, request_id) = (ctx.policy, ctx.deadline, ctx.request_id);
        let mut tried: Vec<String> = Vec::new();
        let mut failures: Vec<Failure> = Vec::new();
        let mut costly = 0u32;
        let mut waited = Waited::default();
        let mut endpoint_missing = 0u32;
        while costly < policy.max_attempts {
            let Some((account, slot)) = self.acquire(ctx, &tried, bound, deadline, &mut waited).await? else {
                break;
            };
            if !tried.is_empty() {
                metrics::counter!(relay_proto::metrics::FAILOVERS_TOTAL).increment(1);
            }
            let began = Instant::now();
            let span = attempt_span(ctx, &account, tried.len() + 1);
            match self.attempt(ctx, account.clone(), slot, waited, span.clone()).await {
                Ok(resp) => {
                    if let Some(k) = session {
                        if bound != Some(account.id.as_str()) {
                            if bound.is_some() {
                                metrics::counter!(relay_proto::metrics::STICKY_MOVES_TOTAL).increment(1);
                            }
                            self.sessions.bind(k, &account.id).await;
                        }
                    }
                    metrics::counter!(relay_proto::metrics::ATTEMPTS_TOTAL, "outcome" => "ok").increment(1);
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
            return Err(ApiError::overloaded(
                "no upstream account is available for this key right now",
                self.retry_after_hint(ctx).unwrap_or(5),
            ));
        }
        // count_tokens keeps the upstreams' own answers: `estimate_unanswered` reads them.
        Ok(final_answer(failures, self.retry_after_hint(ctx), ctx.is_messages).into_response(request_id))
    }

    /// When some account that may serve the key (its group's and its fallback groups', as
    /// `choose` routes them) will be available again, in seconds (at least 1); None when no
    /// account's return is known.
    fn retry_after_hint(&self, ctx: &AttemptCtx<'_>) -> Option<u64> {
        let now = chrono::Utc::now().timestamp_millis();
        let soonest = ctx
            .cfg
            .route_groups(&ctx.key.group_id, |_| false)
            .into_iter()
            .flat_map(|g| ctx.cfg.accounts_of(g).iter())
            .filter_map(|a| match self.health.availability(a.id.as_str(), ctx.model, now) {
                Availability::At(t) => Some(t),
                _ => None,
            })
            .min();
        soonest.map(|t| ((t - now).max(0) as u64).div_ceil(1000).clamp(1, 3600))
    }

    /// An account and a concurrency slot on it, waiting (bounded by `queue.max_wait_ms`, the
    /// deadline and `queue.max_size`) when none is available now: for the soonest known return
    /// or a free slot, and, when nothing is known to return (every untried account of the group
    /// unauthorized, blocked or otherwise out until someone acts), suspended for a recovery: a
    /// new config (an operator's reset or enable, a probe's verdict) or a local success. None:
    /// nothing to try.
    async fn acquire(
        &self,
        ctx: &AttemptCtx<'_>,
        tried: &[String],
        bound: Option<&str>,
        deadline: tokio::time::Instant,
        waited: &mut Waited,
    ) -> Result<Option<(Arc<AccountEntry>, SlotGuard)>, ApiError> {
        // count_tokens waits little: when no account frees up soon, relay answers it with an estimate.
        let max_wait = if ctx.is_messages {
            ctx.policy.queue_max_wait
        } else {
            ctx.policy.queue_max_wait.min(COUNT_TOKENS_MAX_WAIT)
        };
        // The wait is the request's, not each look's: what earlier attempts waited counts.
        let max_wait = max_wait.saturating_sub(Duration::from_millis(waited.ms));
        let wait_until = deadline.min(tokio::time::Instant::now() + max_wait);
        let mut ticket: Option<QueueTicket<'_>> = None;
        // Accounts whose fleet-wide slots (their max_concurrency across every data plane) were
        // all taken when last asked; looked at again after a short wait.
        let mut full: Vec<String> = Vec::new();
        // While suspended, each look is at the newest config (an operator may have acted).
        let mut fresh: Option<Arc<ServingConfig>> = None;
        // The config the key was last checked against.
        let mut checked: Arc<ServingConfig> = ctx.cfg.clone();
        loop {
            // Created before looking, so a release or a new config in between is not missed.
            let released = self.balancer.released();
            let changed = self.holder.changed();
            let now = chrono::Utc::now().timestamp_millis();
            let skip: Vec<String>;
            let excluded = if full.is_empty() {
                tried
            } else {
                skip = tried.iter().chain(full.iter()).cloned().collect();
                &skip
            };
            let looked_at = match &fresh {
                Some(cfg) => AttemptCtx { cfg, ..ctx.clone() },
                None => ctx.clone(),
            };
            let choice = match self.choose(&looked_at, excluded, bound, now) {
                Choice::Ready(a, mut slot) => {
                    if a.max_concurrency == 0 || !self.limiter.is_shared() {
                        return Ok(Some((a, slot)));
                    }
                    match self.limiter.account_slot(&a.id, u64::from(a.max_concurrency)).await {
                        Some(fleet) => {
                            slot.hold_fleet(fleet);
                            return Ok(Some((a, slot)));
                        }
                        None => {
                            drop(slot);
                            self.health.release_probe(&a.id);
                            full.push(a.id.clone());
                            continue;
                        }
                    }
                }
                // Other data planes hold the slots: they tell nobody here when one frees up.
                Choice::Nothing if !full.is_empty() => Choice::Later(Some(now + FLEET_SLOT_POLL_MS)),
                // Nothing tried yet and accounts that could come back: wait for a recovery.
                Choice::Nothing
                    if tried.is_empty()
                        && looked_at
                            .cfg
                            .route_groups(&ctx.key.group_id, |_| false)
                            .into_iter()
                            .flat_map(|g| looked_at.cfg.accounts_of(g).iter())
                            .any(|a| a.enabled && a.weight > 0) =>
                {
                    Choice::Suspended
                }
                c => c,
            };
            let (at, what) = match choice {
                Choice::Ready(..) | Choice::Nothing => return Ok(None),
                Choice::Later(None) => (None, "slot"),
                Choice::Later(at) => (at, "cooldown"),
                Choice::Suspended => (Some(now + SUSPENDED_POLL_MS), "recovery"),
            };
            full.clear();
            if ticket.is_none() {
                ticket = Some(
                    QueueTicket::take(&self.queued, ctx.policy.queue_max_size).ok_or_else(|| {
                        ApiError::overloaded("too many requests are waiting for an upstream account", 1)
                    })?,
                );
            }
            let now_i = tokio::time::Instant::now();
            if now_i >= wait_until {
                return Ok(None);
            }
            let wake = at
                .map(|t| now_i + Duration::from_millis((t - now).max(1) as u64))
                .unwrap_or(wait_until)
                .min(wait_until);
            tokio::select! {
                _ = released => {}
                _ = changed => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
            not_ours(now_i.elapsed());
            waited.what = what;
            waited.ms = waited
                .ms
                .saturating_add(now_i.elapsed().as_millis().try_into().unwrap_or(u64::MAX));
            // Whatever it waited for, the request goes on only as the key now allows: a key
            // revoked, expired, narrowed or moved meanwhile is not served as it was admitted.
            // The key is looked up again only when the config changed (the lookup hashes the
            // presented key, and a release wakes every waiter); its expiry is checked each time.
            if ctx.key.expires_at_ms > 0 && ctx.key.expires_at_ms <= chrono::Utc::now().timestamp_millis() {
                return Err(ApiError::authentication("this API key has expired"));
            }
            let newer = self.holder.get().filter(|cfg| !Arc::ptr_eq(cfg, &checked));
            if let Some(cfg) = newer {
                checked = cfg.clone();
                let key = authenticate(&cfg, &ctx.parts.headers)?;
                if key.id != ctx.key.id {
                    return Err(ApiError::authentication("invalid x-api-key"));
                }
                if !key.allows(ctx.model) {
                    return Err(ApiError::permission(format!(
                        "this API key may not use model {}",
                        ctx.model
                    )));
                }
                if key.group_id != ctx.key.group_id {
                    return Err(ApiError::overloaded(
                        "this API key was moved to another group while the request waited; retry it",
                        1,
                    ));
                }
                if matches!(choice, Choice::Suspended) {
                    fresh = Some(cfg);
                }
            }
        }
    }

    /// Groups in their route's order ([`ServingConfig::route_groups`]: the key's group, then its
    /// fallbacks; activated ones first, cooling ones last, paused ones never); within a group,
    /// priority tier first; within a tier the balancer's choice among accounts that are enabled,
    /// healthy, untried and have a free slot. The session's account comes first within its
    /// group when it qualifies. A group found with every enabled account unavailable begins a
    /// cooldown (`groups.cooldown_ms`, see [`groups`]).
    fn choose(&self, ctx: &AttemptCtx<'_>, tried: &[String], bound: Option<&str>, now: i64) -> Choice {
        let route = ctx
            .cfg
            .route_groups(&ctx.key.group_id, |g| self.groups.is_cooling(g, now));
        let usable = |a: &Arc<AccountEntry>| a.enabled && a.weight > 0 && !tried.contains(&a.id);
        let mut later: Option<i64> = None;
        let mut waiting_for_slot = false;
        for group_id in route {
            let candidates = ctx.cfg.accounts_of(group_id);
            if let Some(id) = bound {
                if let Some(a) = candidates.iter().find(|a| a.id == id && usable(a)) {
                    match self.health.availability(&a.id, ctx.model, now) {
                        Availability::Now | Availability::Probe => match self.balancer.try_acquire(a) {
                            Some(slot) => return Choice::Ready(a.clone(), slot),
                            None => {
                                self.health.release_probe(&a.id);
                            }
                        },
                        _ => {}
                    }
                }
            }
            // Whether every enabled account of the group was looked at and found unavailable.
            let (mut enabled, mut unavailable, mut all_seen) = (0usize, 0usize, true);
            let mut i = 0;
            while i < candidates.len() {
                let priority = candidates[i].priority;
                let tier_end = candidates[i..]
                    .iter()
                    .position(|a| a.priority != priority)
                    .map_or(candidates.len(), |n| i + n);
                let mut ready: Vec<&Arc<AccountEntry>> = Vec::new();
                for a in candidates[i..tier_end].iter().filter(|a| a.enabled && a.weight > 0) {
                    enabled += 1;
                    if !usable(a) {
                        all_seen = false;
                        continue;
                    }
                    match self.health.availability(&a.id, ctx.model, now) {
                        Availability::Now => ready.push(a),
                        Availability::Probe => match self.balancer.try_acquire(a) {
                            // The half-open breaker's one probe goes to this request.
                            Some(slot) => return Choice::Ready(a.clone(), slot),
                            None => {
                                self.health.release_probe(&a.id);
                                waiting_for_slot = true;
                            }
                        },
                        Availability::At(t) => {
                            unavailable += 1;
                            later = Some(later.map_or(t, |l: i64| l.min(t)));
                        }
                        Availability::Never => unavailable += 1,
                    }
                }
                while let Some(a) = self
                    .balancer
                    .pick_with_headroom(&ready, |id| self.health.quotas.headroom(id, now))
                {
                    match self.balancer.try_acquire(a) {
                        Some(slot) => return Choice::Ready(a.clone(), slot),
                        None => {
                            waiting_for_slot = true;
                            let id = a.id.clone();
                            ready.retain(|x| x.id != id);
                        }
                    }
                }
                i = tier_end;
            }
            if enabled > 0 && all_seen && unavailable == enabled {
                let cooldown = u64::try_from(ctx.policy.group_cooldown.as_millis()).unwrap_or(u64::MAX);
                if self.groups.all_failed(ctx.cfg, group_id, now, cooldown) {
                    metrics::counter!(relay_proto::metrics::GROUP_COOLDOWNS_TOTAL).increment(1);
                }
            }
        }
        if later.is_some() || waiting_for_slot {
            Choice::Later(if waiting_for_slot { None } else { later })
        } else {
            Choice::Nothing
        }
    }

    /// One attempt on one account. Ok: the response for the client. Err: what
    /// failed, and whether another account may be tried.
    async fn attempt(
        &self,
        ctx: &AttemptCtx<'_>,
        account: Arc<AccountEntry>,
        slot: SlotGuard,
        waited: Waited,
        span: tracing::Span,
    ) -> Result<Response<Body>, (Failure, bool)> {
        let sink = HealthSink {
            registry: self.health.clone(),
            reporter: self.reporter.clone(),
            settings: ctx.cfg.health_settings(&account.id).clone(),
            generation: account.reset_generation,
            account: account.clone(),
        };
        let uri = format!(
            "{}{}",
            account.base_url,
            ctx.parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
        );
        let mut up = match Request::builder()
            .method(ctx.parts.method.clone())
            .uri(&uri)
            .body(Full::new(ctx.body.clone()))
        {
            Ok(r) => r,
            Err(_) => {
                return Err((
                    Failure::Relay(ApiError::internal("cannot build the upstream request")),
                    false,
                ))
            }
        };
        *up.headers_mut() = forward::upstream_headers(&ctx.parts.headers, &account, ctx.policy.forward_client_ip);
        // relay is the server a browser calls: the upstream call is relay's own, never a
        // browser's, whether CORS is on or not. (Anthropic's API answers a call with an Origin and
        // no anthropic-dangerous-direct-browser-access with a 401, which would take the account
        // out for every client.)
        up.headers_mut().remove(header::ORIGIN);
        // The upstream sees a trace context only when the operator asks for it: then the
        // attempt span's own (a child of the client's, when it sent one).
        up.headers_mut().remove("traceparent");
        up.headers_mut().remove("tracestate");
        if ctx.policy.propagate_upstream {
            relay_telemetry::inject_headers(&span, up.headers_mut());
        }
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
        // An upstream sends a stream's head and first event at once (the generation follows), so
        // a stream that has not started within what is left of the retry deadline (at least
        // STREAM_START_MIN) is a black hole: fail over. A non-streaming answer's head comes
        // when the whole answer is ready: `upstream.head_timeout_ms` (minutes).
        let head_wait = if ctx.stream {
            ctx.policy
                .head_timeout
                .min(remaining_until(ctx.deadline).max(STREAM_START_MIN))
        } else {
            ctx.policy.head_timeout
        };
        let head_deadline = tokio::time::Instant::now() + head_wait;
        let answered = tokio::time::timeout_at(head_deadline, self.upstreams.request(account.proxy.as_ref(), up)).await;
        not_ours(sent_at.elapsed());
        let resp = match answered {
            Ok(Ok(r)) => {
                metrics::histogram!(relay_proto::metrics::UPSTREAM_TTFB_SECONDS)
                    .record(sent_at.elapsed().as_secs_f64());
                r
            }
            Ok(Err(e)) => {
                metrics::counter!(relay_proto::metrics::UPSTREAM_ERRORS_TOTAL, "kind" => "connect").increment(1);
                let via = account.proxy.as_ref().map(|p| p.endpoint()).unwrap_or_default();
                tracing::warn!(account = %account.name, proxy = %via, error = %error_chain(&e), "upstream request failed");
                sink.observe(&account.id, ctx.model, &Outcome::ConnectError);
                if let Some(a) = guard.take() {
                    forward::record_failed(a, &Tap::for_content(false), Some("api_error"));
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
                    forward::record_failed(a, &Tap::for_content(false), Some("api_error"));
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
        let (rparts, mut rbody) = resp.into_parts();
        metrics::counter!(relay_proto::metrics::UPSTREAM_RESPONSES_TOTAL, "status" => status_class(rparts.status))
            .increment(1);
        let status = rparts.status.as_u16();
        if let Some(a) = guard.get_mut() {
            a.status = status;
            a.upstream_request_id = rparts
                .headers
                .get("request-id")
                .and_then(|v| v.to_str().ok())
                .filter(|v| v.len() <= 256)
                .unwrap_or("")
                .to_string();
        }
        let content_type = rparts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let is_sse = content_type.starts_with("text/event-stream");
        let encoding = Encoding::of(&rparts.headers);
        let mut tap = Tap::for_content(is_sse);
        // An answer that is not an Anthropic answer: an upstream fault. Fail over, feed the
        // breaker, record it; the client never sees it.
        let invalid = |guard: &mut AttemptGuard, tap: &Tap, what: &str| {
            metrics::counter!(relay_proto::metrics::UPSTREAM_ERRORS_TOTAL, "kind" => "invalid_answer").increment(1);
            tracing::warn!(account = %account.name, status, what, "the upstream's answer is not a valid Anthropic answer");
            sink.observe(&account.id, ctx.model, &Outcome::Invalid { what });
            if let Some(a) = guard.take() {
                forward::record_failed(a, tap, Some(INVALID_ANSWER));
            }
            (
                Failure::Relay(ApiError::bad_upstream_answer(
                    "the upstream's answer was not a valid Anthropic API response",
                )),
                true,
            )
        };

        // 1xx (101 included), 3xx (a redirect's Location is never followed nor forwarded) and
        // anything outside the status range HTTP defines are not Messages answers.
        if !(200..300).contains(&status) && !(400..600).contains(&status) {
            return Err(invalid(&mut guard, &tap, &format!("status {status}")));
        }

        if !rparts.status.is_success() {
            // A failed attempt: read its (small) error body, within the request's deadline.
            let reading = Instant::now();
            let (raw, whole) =
                read_capped(&mut rbody, MAX_ERROR_BODY_BYTES, ctx.policy.idle_timeout, ctx.deadline).await;
            not_ours(reading.elapsed());
            let body = match encoding.as_ref().map(|e| e.decode(&raw, MAX_ERROR_BODY_BYTES)) {
                Ok(Ok(b)) => b,
                // Undecodable: judged by its status alone; the client gets relay's own error body.
                _ => Vec::new(),
            };
            tap.feed(&body);
            // count_tokens on an upstream that does not serve it (a compatible endpoint without it): not the
            // account's fault (its Messages API is untouched), and another account may serve it.
            let verdict = if !ctx.is_messages && matches!(status, 404 | 405) && !estimate::unknown_model(&body) {
                health::Verdict {
                    retry_elsewhere: true,
                    retry_after: None,
                }
            } else {
                sink.observe(
                    &account.id,
                    ctx.model,
                    &Outcome::Response {
                        status,
                        headers: &rparts.headers,
                        body: &body,
                    },
                )
            };
            if let Some(a) = guard.take() {
                forward::record_failed(a, &tap, None);
            }
            // Only a whole Anthropic error reaches the client as the upstream sent it; an HTML
            // page, an event stream, a body cut at the deadline get relay's own error JSON.
            let mut headers = forward::client_headers(&rparts.headers, ctx.request_id, ctx.policy.expose_ratelimit);
            let body = if whole && forward::is_api_error(&body) {
                Bytes::from(body)
            } else {
                headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                Bytes::from(upstream_error_body(rparts.status))
            };
            let failure = Failure::Upstream {
                status: rparts.status,
                headers,
                body,
                retry_after: verdict.retry_after,
            };
            return Err((failure, verdict.retry_elsewhere));
        }

        let encoding = match encoding {
            Ok(e) => e,
            Err(e) => return Err(invalid(&mut guard, &tap, &e.to_string())),
        };
        if is_sse != ctx.stream {
            let what = if ctx.stream {
                format!("a {content_type:?} answer to a streaming request")
            } else {
                "an event stream answer to a non-streaming request".to_string()
            };
            return Err(invalid(&mut guard, &tap, &what));
        }

        if !is_sse {
            // A complete JSON answer: read it whole before answering, so an
            // answer cut off midway can still go to another account (the
            // upstream produces it whole anyway, so this costs no latency).
            let total_deadline = tokio::time::Instant::now() + ctx.policy.total_timeout;
            let Some(raw) = read_whole(&mut rbody, MAX_BODY_BYTES, ctx.policy.idle_timeout, total_deadline).await
            else {
                metrics::counter!(relay_proto::metrics::UPSTREAM_ERRORS_TOTAL, "kind" => "body").increment(1);
                sink.observe(&account.id, ctx.model, &Outcome::ConnectError);
                if let Some(mut a) = guard.take() {
                    a.status = 502;
                    forward::record_failed(a, &tap, None);
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
                    Err(err) => return Err(invalid(&mut guard, &tap, &err.to_string())),
                },
            };
            // (No content-type at all is tolerated when the body is a message; the client gets one.)
            if !content_type.is_empty() && !content_type.starts_with("application/json") {
                return Err(invalid(&mut guard, &tap, &format!("content-type {content_type:?}")));
            }
            let answer = match forward::check_answer(ctx.is_messages, &bytes) {
                Ok(a) => a,
                Err(what) => return Err(invalid(&mut guard, &tap, what)),
            };
            slot.observe_latency(sent_at.elapsed());
            sink.observe(
                &account.id,
                ctx.model,
                &Outcome::Response {
                    status,
                    headers: &rparts.headers,
                    body: &[],
                },
            );
            if let Some(a) = guard.take() {
                let ttfb = a.started.elapsed().as_millis() as u64;
                forward::record(a, answer, ttfb);
            }
            drop(slot);
            let mut out = Response::new(full(bytes));
            *out.status_mut() = rparts.status;
            *out.headers_mut() = forward::client_headers(&rparts.headers, ctx.request_id, ctx.policy.expose_ratelimit);
            if content_type.is_empty() {
                out.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            }
            return Ok(out);
        }

        if encoding != Encoding::Identity {
            // An event stream is tapped as it passes; relay does not decode one on the fly.
            return Err(invalid(&mut guard, &tap, "a compressed event stream"));
        }
        let prefix: Bytes = {
            // Hold the head until the first event: a stream that opens with
            // `event: error` (or with anything but message_start) can still go to another account.
            let mut held = bytes::BytesMut::new();
            let first = loop {
                let Tap::Sse(t) = &tap else { break Ok(()) };
                if t.first_event_complete() {
                    break Ok(());
                }
                match tokio::time::timeout_at(head_deadline, rbody.frame()).await {
                    Ok(Some(Ok(frame))) => {
                        if let Some(d) = frame.data_ref() {
                            tap.feed(d);
                            held.extend_from_slice(d);
                        }
                    }
                    Ok(Some(Err(_))) | Ok(None) => break Err(Outcome::ConnectError),
                    Err(_) => break Err(Outcome::Timeout),
                }
            };
            let (error_type, started) = match &tap {
                // A first event that is not JSON, or has no `event:` name (SDKs dispatch on it),
                // does not open an Anthropic stream.
                Tap::Sse(t) if t.corrupt() || !t.first_event_named() => (None, false),
                Tap::Sse(t) => (t.error_type().map(str::to_string), t.saw_message_start()),
                Tap::Buffer(..) => (None, false),
            };
            match (first, error_type) {
                (Err(outcome), _) => {
                    sink.observe(&account.id, ctx.model, &outcome);
                    if let Some(a) = guard.take() {
                        forward::record_failed(a, &tap, None);
                    }
                    return Err((
                        Failure::Relay(ApiError::upstream_unreachable(
                            "the upstream stream failed before its first event",
                        )),
                        true,
                    ));
                }
                (Ok(()), Some(error_type)) => {
                    let verdict = sink.observe(
                        &account.id,
                        ctx.model,
                        &Outcome::StreamError {
                            error_type: &error_type,
                        },
                    );
                    if let Some(a) = guard.take() {
                        forward::record_failed(a, &tap, None);
                    }
                    let status = match error_type.as_str() {
                        "overloaded_error" => StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                        "rate_limit_error" => StatusCode::TOO_MANY_REQUESTS,
                        _ => StatusCode::INTERNAL_SERVER_ERROR,
                    };
                    let failure = Failure::Upstream {
                        status,
                        headers: {
                            let mut h = HeaderMap::new();
                            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                            h
                        },
                        body: Bytes::from(
                            serde_json::json!({
                                "type": "error",
                                "error": {"type": error_type, "message": "the upstream stream opened with an error"},
                            })
                            .to_string(),
                        ),
                        retry_after: verdict.retry_after,
                    };
                    return Err((failure, verdict.retry_elsewhere));
                }
                (Ok(()), None) if !started => {
                    return Err(invalid(&mut guard, &tap, "the stream did not open with message_start"));
                }
                (Ok(()), None) => held.freeze(),
            }
        };
        // Success: the account answered.
        let head_latency = sent_at.elapsed();
        slot.observe_latency(head_latency);
        sink.observe(
            &account.id,
            ctx.model,
            &Outcome::Response {
                status,
                headers: &rparts.headers,
                body: &[],
            },
        );
        let Some(attempt) = guard.take() else {
            return Err((
                Failure::Relay(ApiError::internal("the attempt was already recorded")),
                false,
            ));
        };
        let ttfb = Some(ctx.started.elapsed().as_millis() as u64);
        let timeouts = forward::BodyTimeouts {
            idle: ctx.policy.idle_timeout,
            total_deadline: tokio::time::Instant::now() + ctx.policy.total_timeout,
        };
        let body = TappedBody::new(rbody, Some(prefix), tap, attempt, sink, Some(slot), timeouts, ttfb);
        let mut out = Response::new(body.boxed());
        *out.status_mut() = rparts.status;
        *out.headers_mut() = forward::client_headers(&rparts.headers, ctx.request_id, ctx.policy.expose_ratelimit);
        Ok(out)
    }
}

/// The error type recorded for an answer that was not an Anthropic answer.
const INVALID_ANSWER: &str = "invalid_upstream_response";
/// The most bytes of an upstream's error body read (and passed on).
const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// An Anthropic error body for an upstream error whose own body was empty or unreadable.
fn upstream_error_body(status: StatusCode) -> String {
    let kind = match status.as_u16() {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    };
    serde_json::json!({
        "type": "error",
        "error": {"type": kind, "message": format!("the upstream answered {status} without a readable error body")},
    })
    .to_string()
}

/// A count_tokens answer that says no account could count: relay's estimate instead (`x-relay-estimate: true`).
/// Passed on as they are: an upstream's count, and the answers that are about the request itself (400, 413,
/// a 404 for an unknown model, …). Replaced: no account available, and upstream answers that are about the
/// account or the upstream (401, 403, 404/405 for a missing endpoint, 408, 429, 5xx, 529).
async fn estimate_unanswered(
    out: Result<Response<Body>, ApiError>,
    body: &Bytes,
    request_id: &str,
) -> Result<Response<Body>, ApiError> {
    let why = match out {
        Ok(resp) if resp.status().is_success() => return Ok(resp),
        Ok(resp) => match resp.status().as_u16() {
            404 | 405 => {
                // Read the (small) error body: an unknown model is the client's error.
                let (parts, b) = resp.into_parts();
                let bytes = body_bytes(b).await.unwrap_or_default();
                if estimate::unknown_model(&bytes) {
                    return Ok(Response::from_parts(parts, full(bytes)));
                }
                "endpoint_missing"
            }
            401 | 403 | 408 | 429 | 500..=599 => "upstream_error",
            _ => return Ok(resp),
        },
        Err(e) if e.status == StatusCode::TOO_MANY_REQUESTS || e.status.is_server_error() => "no_account",
        Err(e) => return Err(e),
    };
    let owned = body.clone();
    let n = match tokio::task::spawn_blocking(move || estimate::estimate(&owned)).await {
        Ok(Ok(n)) => n,
        Ok(Err(invalid)) => return Err(ApiError::invalid_request(invalid.0)),
        Err(_) => return Err(ApiError::internal("the token estimate failed")),
    };
    metrics::counter!(relay_proto::metrics::COUNT_TOKENS_ESTIMATED_TOTAL, "why" => why).increment(1);
    tracing::debug!(
        request_id,
        why,
        input_tokens = n,
        "count_tokens answered with relay's estimate"
    );
    let mut resp = json_response(StatusCode::OK, &serde_json::json!({"input_tokens": n}), request_id);
    resp.headers_mut()
        .insert("x-relay-estimate", HeaderValue::from_static("true"));
    Ok(resp)
}

/// How long a request waited for an account so far, and for what (the last thing it waited for):
/// "slot", "cooldown", "recovery"; "" when it did not wait.
#[derive(Debug, Clone, Copy, Default)]
pub struct Waited {
    pub ms: u64,
    pub what: &'static str,
}

/// Everything about the client's request that every attempt needs.
#[derive(Clone)]
struct AttemptCtx<'a> {
    cfg: &'a Arc<ServingConfig>,
    key: &'a Arc<KeyEntry>,
    parts: &'a http::request::Parts,
    body: &'a Bytes,
    model: &'a str,
    stream: bool,
    request_id: &'a str,
    /// The client's own id for its request ("" when none).
    client_request_id: &'a str,
    started: Instant,
    policy: &'a policy::Policy,
    /// When the whole request (every attempt) must be done.
    deadline: tokio::time::Instant,
    /// `POST /v1/messages` (else `count_tokens`).
    is_messages: bool,
    /// The request's reservation against its key's limits (None: the key has none).
    charge: Option<Arc<relay_limits::Charge>>,
    /// Set once an attempt exists (its usage row then stands for the request).
    attempted: &'a std::sync::atomic::AtomicBool,
    /// The request's `relay::request` log line.
    log: &'a Arc<reqlog::RequestLog>,
    /// The request's `max_tokens` (0 when absent).
    max_tokens: u64,
}

enum Choice {
    Ready(Arc<AccountEntry>, SlotGuard),
    /// Nothing now; maybe at this time (None: when a slot frees up).
    Later(Option<i64>),
    /// Nothing now, nor known to come back: waiting for a recovery.
    Suspended,
    Nothing,
}

/// Why an attempt failed: the upstream's own answer (passed to the client as
/// is when it is the last one), or the relay's.
enum Failure {
    Upstream {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        retry_after: Option<Duration>,
    },
    Relay(ApiError),
}

impl Failure {
    fn into_response(self, request_id: &str) -> Response<Body> {
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
                    headers.insert(header::RETRY_AFTER, forward::client_retry_after(ra));
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

/// The 404 message for a path relay does not serve, with what the client likely meant: a base
/// URL that already ended in `/v1` (`/v1/v1/messages`), or an API relay does not relay yet.
fn not_routed(method: &Method, path: &str) -> String {
    let trimmed = path.trim_end_matches('/');
    let hint = if path.starts_with("/v1/v1/") || path.starts_with("//") {
        " (the client's base URL ends in /v1 or a slash: give relay's root, e.g. http://relay:8080, as ANTHROPIC_BASE_URL)"
    } else if trimmed != path && matches!(trimmed, "/v1/messages" | "/v1/messages/count_tokens" | "/v1/models") {
        " (without the trailing slash)"
    } else if path.starts_with("/v1/files") || path.starts_with("/v1/messages/batches") {
        " (the Files and Message Batches APIs are not relayed yet)"
    } else {
        ""
    };
    format!("no route for {method} {path}{hint}")
}

/// A place in the bounded wait queue; leaves it when dropped.
struct QueueTicket<'a>(&'a AtomicUsize, Instant);

impl<'a> QueueTicket<'a> {
    fn take(counter: &'a AtomicUsize, max: usize) -> Option<Self> {
        let prev = counter.fetch_add(1, Ordering::AcqRel);
        if prev >= max {
            counter.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        metrics::gauge!(relay_proto::metrics::QUEUE_LENGTH).increment(1.0);
        Some(Self(counter, Instant::now()))
    }
}

impl Drop for QueueTicket<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!(relay_proto::metrics::QUEUE_LENGTH).decrement(1.0);
        metrics::histogram!(relay_proto::metrics::QUEUE_WAIT_SECONDS).record(self.1.elapsed().as_secs_f64());
    }
}

fn remaining_until(deadline: tokio::time::Instant) -> Duration {
    deadline.saturating_duration_since(tokio::time::Instant::now())
}

/// Reads a whole body, each frame within `idle` and all before `deadline`.
/// None when it fails, stalls, or is larger than `cap`.
async fn read_whole(body: &mut Incoming, cap: usize, idle: Duration, deadline: tokio::time::Instant) -> Option<Bytes> {
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
async fn read_capped(
    body: &mut Incoming,
    cap: usize,
    idle: Duration,
    deadline: tokio::time::Instant,
) -> (Vec<u8>, bool) {
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
/// answer said is recorded with the attempt's usage ([`forward::record`]).
fn attempt_span(ctx: &AttemptCtx<'_>, account: &AccountEntry, n: usize) -> tracing::Span {
    let operation = if ctx.is_messages { "chat" } else { "count_tokens" };
    tracing::info_span!(
        "attempt",
        otel.name = %format!("{operation} {}", ctx.model),
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

fn route_label(m: &Method, path: &str) -> &'static str {
    match (m, path) {
        (&Method::POST, "/v1/messages") => "messages",
        (&Method::POST, "/v1/messages/count_tokens") => "count_tokens",
        (&Method::GET, p) if p.starts_with("/v1/models") => "models",
        (_, "/healthz" | "/readyz" | "/metrics") => "ops",
        (_, "/api/event_logging/batch") => "telemetry",
        _ => "other",
    }
}

fn status_class(s: StatusCode) -> &'static str {
    match s.as_u16() {
        200..=299 => "2xx",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        413 => "413",
        429 => "429",
        529 => "529",
        402..=499 => "4xx",
        _ => "5xx",
    }
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
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn paths_relay_does_not_serve_say_what_was_likely_meant() {
        let m = |p: &str| not_routed(&Method::POST, p);
        assert!(
            m("/v1/v1/messages").contains("base URL ends in /v1"),
            "{}",
            m("/v1/v1/messages")
        );
        assert!(m("//v1/messages").contains("base URL ends in /v1 or a slash"));
        assert!(m("/v1/messages/").contains("without the trailing slash"));
        assert!(m("/v1/messages/batches").contains("not relayed yet"));
        assert!(not_routed(&Method::GET, "/v1/files").contains("not relayed yet"));
        assert_eq!(m("/v2/other"), "no route for POST /v2/other");
    }

    fn upstream(status: u16, retry_after_secs: Option<u64>) -> Failure {
        Failure::Upstream {
            status: StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: Bytes::from(upstream_error_body(StatusCode::from_u16(status).unwrap())),
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
        let b = rt.block_on(body_bytes(r.into_body())).unwrap();
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
}
