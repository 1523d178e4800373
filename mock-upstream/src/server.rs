//! The HTTP side: accept loop (HTTP/1.1 and h2c on one port, or both over TLS with ALPN), routing, auth and
//! fault selection, the Anthropic error shape and response headers.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use chrono::{SecondsFormat, Utc};
use http::header::{HeaderName, HeaderValue, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::body::{Ending, MockBody, Sink};
use crate::fault::Fault;
use crate::plan::{self, Ids, Shape};
use crate::tls::TlsInfo;
use crate::RecordedRequest;

/// Model ids listed by `GET /v1/models`, in the order they are listed: the models relay knows.
pub use relay_proto::models::KNOWN as MODELS;

/// Rate limits advertised in the success headers.
const REQUESTS_LIMIT: u64 = 4000;
const TOKENS_LIMIT: u64 = 2_000_000;
const INPUT_TOKENS_LIMIT: u64 = 1_600_000;
const OUTPUT_TOKENS_LIMIT: u64 = 400_000;

/// How long a client may take to complete the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) struct Shared {
    pub shape: Shape,
    pub ttfb: Duration,
    pub event_delay: Duration,
    pub faults: ArcSwap<HashMap<String, Fault>>,
    /// The 5-hour unified utilization answered to a Bearer credential (default 0.1).
    pub utilization: ArcSwap<HashMap<String, f64>>,
    pub record: bool,
    pub log: Mutex<Vec<RecordedRequest>>,
    pub bodies: Mutex<HashMap<String, Sink>>,
    pub org_id: String,
    pub served: AtomicU64,
    pub tls_handshake_failures: AtomicU64,
    /// Connections accepted (TLS ones once their handshake succeeded).
    pub connections: AtomicU64,
    /// Speak HTTP/2 (ALPN `h2` with TLS, h2c without); false: HTTP/1.1 only.
    pub h2: bool,
    pub h2_max_concurrent_streams: u32,
    /// Every open connection starts a graceful shutdown (HTTP/2: GOAWAY; streams in flight finish).
    pub goaway: tokio::sync::Notify,
    /// Every open connection is dropped at once (its socket closed mid-stream).
    pub reset: tokio::sync::Notify,
    /// Requests whose response is not finished yet, and the most there ever were at once.
    pub in_flight: AtomicU64,
    pub max_in_flight: AtomicU64,
    pub oauth: crate::oauth::OAuthServer,
    /// False: `count_tokens` is answered like an unknown route (404 `not_found_error`), as by an upstream
    /// that does not serve it.
    pub count_tokens_served: std::sync::atomic::AtomicBool,
}

/// One request in flight, from its head until its response body is done or dropped.
pub(crate) struct InFlight(Arc<Shared>);

impl InFlight {
    fn new(shared: &Arc<Shared>) -> InFlight {
        let now = shared.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        shared.max_in_flight.fetch_max(now, Ordering::AcqRel);
        InFlight(shared.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

pub(crate) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
    mut shutdown: watch::Receiver<()>,
) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Typically EMFILE under a benchmark's load: back off instead of spinning.
                    tracing::warn!(error = %e, "mock upstream: accept failed");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let mut shutdown = shutdown.clone();
        match &tls {
            None => {
                tokio::spawn(serve_connection(TokioIo::new(stream), shared, None, shutdown));
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let handshake = tokio::select! {
                        r = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)) => r,
                        _ = shutdown.changed() => return,
                    };
                    let stream = match handshake {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            shared.tls_handshake_failures.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(error = %e, "mock upstream: TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            shared.tls_handshake_failures.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!("mock upstream: TLS handshake timed out");
                            return;
                        }
                    };
                    let info = Arc::new(TlsInfo::of(stream.get_ref().1));
                    serve_connection(TokioIo::new(stream), shared, Some(info), shutdown).await;
                });
            }
        }
    }
}

/// Serves HTTP/1.1 or HTTP/2 (detected from the preface) on one connection, plain or TLS, until it ends or
/// the server is dropped.
async fn serve_connection<I>(io: I, shared: Arc<Shared>, tls: Option<Arc<TlsInfo>>, mut shutdown: watch::Receiver<()>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let ctl = shared.clone();
    let service = hyper::service::service_fn(move |req| {
        let (shared, tls) = (shared.clone(), tls.clone());
        async move {
            let g = InFlight::new(&shared);
            let mut resp = handle(shared, tls, req).await?;
            resp.body_mut().hold(g);
            Ok::<_, Infallible>(resp)
        }
    });
    ctl.connections.fetch_add(1, Ordering::Relaxed);
    let goaway = ctl.goaway.notified();
    let reset = ctl.reset.notified();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // Benchmarks multiplex many streams on few h2 connections.
    builder.http2().max_concurrent_streams(ctl.h2_max_concurrent_streams);
    if !ctl.h2 {
        builder = builder.http1_only();
    }
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn, goaway, reset);
    let mut closing = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "mock upstream: connection ended with an error");
                }
                return;
            }
            () = &mut goaway, if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            // Dropping the connection closes its socket, whatever is in flight.
            () = &mut reset => return,
            // Sender dropped (MockUpstream dropped): close the connection, even a stalled one.
            _ = shutdown.changed() => return,
        }
    }
}

/// Who is calling: `x-api-key` and/or `Authorization: Bearer`.
struct Credentials {
    api_key: Option<String>,
    bearer: Option<String>,
}

impl Credentials {
    fn from_headers(h: &HeaderMap) -> Credentials {
        let api_key = header_str(h, "x-api-key").filter(|v| !v.is_empty()).map(str::to_string);
        let bearer = header_str(h, "authorization").and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            let token = token.trim();
            (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_string())
        });
        Credentials { api_key, bearer }
    }

    fn present(&self) -> bool {
        self.api_key.is_some() || self.bearer.is_some()
    }

    /// Bearer credentials are treated as subscription (OAuth) accounts: they get the unified rate-limit headers.
    fn is_oauth(&self) -> bool {
        self.bearer.is_some()
    }
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

struct Cx<'a> {
    shared: &'a Shared,
    request_id: String,
    creds: Credentials,
}

async fn handle(
    shared: Arc<Shared>,
    tls: Option<Arc<TlsInfo>>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            tracing::debug!(error = %e, "mock upstream: failed to read request body");
            Bytes::new()
        }
    };
    shared.served.fetch_add(1, Ordering::Relaxed);
    let request_id = format!("req_mock_{}", uuid::Uuid::new_v4().simple());
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    if shared.record {
        let rec = RecordedRequest {
            request_id: request_id.clone(),
            method: parts.method.clone(),
            path_and_query: path_and_query.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
            body: body.clone(),
            tls: tls.as_deref().cloned(),
        };
        shared.log.lock().unwrap_or_else(|e| e.into_inner()).push(rec);
    }
    let cx = Cx {
        shared: &shared,
        request_id,
        creds: Credentials::from_headers(&parts.headers),
    };
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, q),
        None => (path_and_query.as_str(), ""),
    };
    let resp = match (&parts.method, path) {
        (&Method::POST, "/v1/messages") => messages(&cx, &parts.headers, &body).await,
        (&Method::POST, "/v1/messages/count_tokens") if shared.count_tokens_served.load(Ordering::Acquire) => {
            count_tokens(&cx, &parts.headers, &body)
        }
        (&Method::GET, "/v1/models") => models(&cx, &parts.headers, query),
        (&Method::GET, p) if p.starts_with("/v1/models/") => model(&cx, &parts.headers, &p["/v1/models/".len()..]),
        (&Method::GET, "/oauth/authorize") => oauth_answer(shared.oauth.authorize(query)),
        (&Method::POST, "/v1/oauth/token") => oauth_answer(shared.oauth.token(&body).await),
        _ => error(
            &cx,
            StatusCode::NOT_FOUND,
            "not_found_error",
            &format!("Not found: {} {path}", parts.method),
        ),
    };
    Ok(finish(&cx, resp))
}

fn oauth_answer(a: crate::oauth::Answer) -> Response<MockBody> {
    let (status, body, ty) = match a {
        crate::oauth::Answer::Json(status, v) => (status, v.to_string(), "application/json"),
        crate::oauth::Answer::Text(status, t) => (status, t, "text/plain; charset=utf-8"),
    };
    let mut resp = Response::new(MockBody::full(Bytes::from(body)));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(ty));
    resp
}

/// Adds the headers every response carries and attaches the body recorder.
fn finish(cx: &Cx<'_>, mut resp: Response<MockBody>) -> Response<MockBody> {
    let h = resp.headers_mut();
    insert(h, "request-id", &cx.request_id);
    insert(h, "anthropic-organization-id", &cx.shared.org_id);
    if !cx.shared.record {
        return resp;
    }
    let sink: Sink = Arc::default();
    cx.shared
        .bodies
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(cx.request_id.clone(), sink.clone());
    resp.map(|b| b.with_sink(Some(sink)))
}

fn insert(h: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(HeaderName::from_static(name), v);
    }
}

fn json_response(status: StatusCode, value: &Value) -> Response<MockBody> {
    let mut resp = Response::new(MockBody::full(Bytes::from(value.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// An error in Anthropic's shape: `{"type":"error","error":{"type":…,"message":…},"request_id":…}`.
fn error(cx: &Cx<'_>, status: StatusCode, kind: &str, message: &str) -> Response<MockBody> {
    json_response(
        status,
        &json!({"type": "error", "error": {"type": kind, "message": message}, "request_id": cx.request_id}),
    )
}

fn invalid(cx: &Cx<'_>, message: &str) -> Response<MockBody> {
    error(cx, StatusCode::BAD_REQUEST, "invalid_request_error", message)
}

fn rfc3339_in(secs: u64) -> String {
    let at = Utc::now() + chrono::Duration::seconds(i64::try_from(secs).unwrap_or(i64::MAX / 1000));
    at.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn unix_in(secs: u64) -> u64 {
    u64::try_from(Utc::now().timestamp()).unwrap_or(0).saturating_add(secs)
}

/// Rate-limit headers of a successful answer.
fn success_headers(cx: &Cx<'_>, h: &mut HeaderMap) {
    let reset = rfc3339_in(60);
    for (name, limit) in [
        ("requests", REQUESTS_LIMIT),
        ("tokens", TOKENS_LIMIT),
        ("input-tokens", INPUT_TOKENS_LIMIT),
        ("output-tokens", OUTPUT_TOKENS_LIMIT),
    ] {
        let remaining = if name == "requests" { limit - 1 } else { limit };
        set(h, format!("anthropic-ratelimit-{name}-limit"), &limit.to_string());
        set(
            h,
            format!("anthropic-ratelimit-{name}-remaining"),
            &remaining.to_string(),
        );
        set(h, format!("anthropic-ratelimit-{name}-reset"), &reset);
    }
    if cx.creds.is_oauth() {
        let five_h = unix_in(5 * 3600).to_string();
        let seven_d = unix_in(7 * 24 * 3600).to_string();
        set(h, "anthropic-ratelimit-unified-status".into(), "allowed");
        set(h, "anthropic-ratelimit-unified-reset".into(), &five_h);
        set(h, "anthropic-ratelimit-unified-5h-status".into(), "allowed");
        set(h, "anthropic-ratelimit-unified-5h-reset".into(), &five_h);
        let used = cx
            .creds
            .bearer
            .as_ref()
            .and_then(|b| cx.shared.utilization.load().get(b).copied())
            .unwrap_or(0.1);
        set(
            h,
            "anthropic-ratelimit-unified-5h-utilization".into(),
            &used.to_string(),
        );
        set(h, "anthropic-ratelimit-unified-7d-status".into(), "allowed");
        set(h, "anthropic-ratelimit-unified-7d-reset".into(), &seven_d);
        set(h, "anthropic-ratelimit-unified-7d-utilization".into(), "0.05");
        set(
            h,
            "anthropic-ratelimit-unified-representative-claim".into(),
            "five_hour",
        );
    }
}

fn set(h: &mut HeaderMap, name: String, value: &str) {
    if let (Ok(n), Ok(v)) = (HeaderName::try_from(name), HeaderValue::from_str(value)) {
        h.insert(n, v);
    }
}

/// The answer of a status fault.
fn fault_response(cx: &Cx<'_>, fault: Fault) -> Response<MockBody> {
    match fault {
        Fault::RateLimited { retry_after_secs } => {
            let mut resp = error(
                cx,
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "This request would exceed the rate limit for your organization (mock) of 4,000 requests per \
                 minute. Please try again later.",
            );
            let h = resp.headers_mut();
            let reset = rfc3339_in(retry_after_secs);
            set(h, RETRY_AFTER.as_str().into(), &retry_after_secs.to_string());
            set(
                h,
                "anthropic-ratelimit-requests-limit".into(),
                &REQUESTS_LIMIT.to_string(),
            );
            set(h, "anthropic-ratelimit-requests-remaining".into(), "0");
            set(h, "anthropic-ratelimit-requests-reset".into(), &reset);
            set(h, "anthropic-ratelimit-tokens-limit".into(), &TOKENS_LIMIT.to_string());
            set(
                h,
                "anthropic-ratelimit-tokens-remaining".into(),
                &TOKENS_LIMIT.to_string(),
            );
            set(h, "anthropic-ratelimit-tokens-reset".into(), &reset);
            if cx.creds.is_oauth() {
                let unix = unix_in(retry_after_secs).to_string();
                set(h, "anthropic-ratelimit-unified-status".into(), "rejected");
                set(h, "anthropic-ratelimit-unified-reset".into(), &unix);
                set(h, "anthropic-ratelimit-unified-5h-status".into(), "rejected");
                set(h, "anthropic-ratelimit-unified-5h-reset".into(), &unix);
                set(h, "anthropic-ratelimit-unified-5h-utilization".into(), "1.0");
                set(
                    h,
                    "anthropic-ratelimit-unified-representative-claim".into(),
                    "five_hour",
                );
            }
            resp
        }
        Fault::Overloaded | Fault::ErrorEventMidStream { .. } => error(
            cx,
            StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            "overloaded_error",
            "Overloaded",
        ),
        Fault::ServerError => error(
            cx,
            StatusCode::INTERNAL_SERVER_ERROR,
            "api_error",
            "Internal server error",
        ),
        Fault::Unauthorized => error(
            cx,
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid x-api-key",
        ),
        Fault::OrgDisabled => invalid(cx, "This organization has been disabled."),
        Fault::EchoCredential { last } => {
            let sent = cx.creds.api_key.as_deref().or(cx.creds.bearer.as_deref()).unwrap_or("");
            let chars: Vec<char> = sent.chars().collect();
            let quoted: String = match last {
                0 => sent.to_string(),
                n => chars.iter().skip(chars.len().saturating_sub(n)).collect(),
            };
            invalid(
                cx,
                &format!("Incorrect API key provided: {quoted}. You can find your API key in the console."),
            )
        }
        // Not status faults; callers handle them. Answer as a server error if one ever gets here.
        Fault::DropMidStream { .. } | Fault::Stall { .. } => error(
            cx,
            StatusCode::INTERNAL_SERVER_ERROR,
            "api_error",
            "Internal server error",
        ),
    }
}

/// The fault for this request: the `x-mock-fault` header wins, then the credential's configured fault.
fn select_fault(cx: &Cx<'_>, h: &HeaderMap) -> Result<Option<Fault>, Box<Response<MockBody>>> {
    if let Some(kind) = header_str(h, "x-mock-fault") {
        let param_header = if Fault::parse(kind, None).is_ok_and(|f| matches!(f, Fault::RateLimited { .. })) {
            "x-mock-retry-after"
        } else {
            "x-mock-fault-after"
        };
        let param = match header_str(h, param_header) {
            Some(v) => match v.trim().parse::<u64>() {
                Ok(n) => Some(n),
                Err(_) => {
                    return Err(Box::new(invalid(
                        cx,
                        &format!("{param_header}: expected a non-negative integer"),
                    )))
                }
            },
            None => None,
        };
        return Fault::parse(kind, param)
            .map(Some)
            .map_err(|e| Box::new(invalid(cx, &e.to_string())));
    }
    let faults = cx.shared.faults.load();
    if faults.is_empty() {
        return Ok(None);
    }
    let by_key = cx.creds.api_key.as_ref().and_then(|k| faults.get(k));
    let by_bearer = cx.creds.bearer.as_ref().and_then(|k| faults.get(k));
    Ok(by_key.or(by_bearer).copied())
}

/// Credential, `anthropic-version` (when `need_version`), then status faults. `Ok(fault)` when the request may
/// proceed (with a stream fault, if any).
fn gate(cx: &Cx<'_>, h: &HeaderMap, need_version: bool) -> Result<Option<Fault>, Box<Response<MockBody>>> {
    if !cx.creds.present() {
        return Err(Box::new(error(
            cx,
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "x-api-key header is required",
        )));
    }
    // Tokens the mock's OAuth server issued must be live ones.
    if let Some(token) = cx.creds.bearer.as_deref() {
        if token.starts_with(crate::oauth::ACCESS_TOKEN_PREFIX) && !cx.shared.oauth.access_token_valid(token) {
            cx.shared.oauth.rejected_access_tokens.fetch_add(1, Ordering::Relaxed);
            return Err(Box::new(error(
                cx,
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "OAuth token has expired or is invalid. Please obtain a new token or refresh your existing token.",
            )));
        }
    }
    if need_version && header_str(h, "anthropic-version").is_none_or(|v| v.trim().is_empty()) {
        return Err(Box::new(invalid(cx, "anthropic-version: header is required")));
    }
    match select_fault(cx, h)? {
        Some(f) if f.is_status_fault() => Err(Box::new(fault_response(cx, f))),
        other => Ok(other),
    }
}

/// The body as a JSON object with a string `model` and an array `messages`.
fn parse_body(cx: &Cx<'_>, body: &[u8]) -> Result<Value, Box<Response<MockBody>>> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| Box::new(invalid(cx, &format!("There was an error parsing the body: {e}"))))?;
    if !value.is_object() {
        return Err(Box::new(invalid(cx, "Request body must be a JSON object")));
    }
    if !value.get("model").is_some_and(Value::is_string) {
        return Err(Box::new(invalid(cx, "model: Field required")));
    }
    if !value.get("messages").is_some_and(Value::is_array) {
        return Err(Box::new(invalid(cx, "messages: Field required")));
    }
    Ok(value)
}

async fn messages(cx: &Cx<'_>, h: &HeaderMap, body: &[u8]) -> Response<MockBody> {
    let fault = match gate(cx, h, true) {
        Ok(f) => f,
        Err(resp) => return *resp,
    };
    let value = match parse_body(cx, body) {
        Ok(v) => v,
        Err(resp) => return *resp,
    };
    if !value.get("max_tokens").is_some_and(Value::is_u64) {
        return invalid(cx, "max_tokens: Field required");
    }
    let cache_read = header_str(h, "x-mock-cache-read")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let plan = plan::plan(&cx.shared.shape, &value, cache_read);
    let ids = Ids {
        message_id: format!("msg_mock_{}", uuid::Uuid::new_v4().simple()),
        tool_use_id: format!("toolu_mock_{}", uuid::Uuid::new_v4().simple()),
    };
    // `x-mock-answer-model`: answer under another model's name, as a compatible endpoint that
    // maps model names does.
    let model = match header_str(h, "x-mock-answer-model") {
        Some(m) if !m.trim().is_empty() => Value::String(m.trim().to_string()),
        _ => value.get("model").cloned().unwrap_or(Value::Null),
    };
    let streaming = value.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let shared = cx.shared;

    if streaming {
        let mut frames = plan::sse_frames(&plan, &model, &ids, shared.shape.ping_every);
        let ending = match fault {
            Some(Fault::DropMidStream { after_events }) => {
                frames.truncate(after_events);
                Ending::Abort
            }
            Some(Fault::ErrorEventMidStream { after_events }) => {
                frames.truncate(after_events);
                frames.push(plan::overloaded_error_frame());
                Ending::Finish
            }
            Some(Fault::Stall { after_events }) => {
                frames.truncate(after_events);
                Ending::Stall
            }
            _ => Ending::Finish,
        };
        let mut resp = Response::new(MockBody::frames(frames, ending, shared.ttfb, shared.event_delay));
        let hm = resp.headers_mut();
        hm.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        hm.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        success_headers(cx, hm);
        return resp;
    }

    // Non-streaming: the whole answer after the time a stream would have taken to generate its content.
    let steps = u32::try_from(plan.content_deltas).unwrap_or(u32::MAX);
    let wait = shared.ttfb.saturating_add(shared.event_delay.saturating_mul(steps));
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    let bytes = Bytes::from(plan::message_json(&plan, &model, &ids).to_string());
    let mut resp = match fault {
        Some(Fault::Stall { .. }) => return std::future::pending().await,
        Some(f @ Fault::ErrorEventMidStream { .. }) => return fault_response(cx, f),
        Some(Fault::DropMidStream { .. }) => {
            let half = bytes.slice(..bytes.len() / 2);
            Response::new(MockBody::frames(
                vec![half],
                Ending::Abort,
                Duration::ZERO,
                Duration::ZERO,
            ))
        }
        _ => Response::new(MockBody::full(bytes)),
    };
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    success_headers(cx, resp.headers_mut());
    resp
}

fn count_tokens(cx: &Cx<'_>, h: &HeaderMap, body: &[u8]) -> Response<MockBody> {
    if let Err(resp) = gate(cx, h, true) {
        return *resp;
    }
    let value = match parse_body(cx, body) {
        Ok(v) => v,
        Err(resp) => return *resp,
    };
    let mut resp = json_response(StatusCode::OK, &json!({"input_tokens": plan::input_tokens(&value)}));
    success_headers(cx, resp.headers_mut());
    resp
}

fn model_json(m: &(&str, &str, &str)) -> Value {
    json!({"type": "model", "id": m.0, "display_name": m.1, "created_at": m.2})
}

fn models(cx: &Cx<'_>, h: &HeaderMap, query: &str) -> Response<MockBody> {
    if let Err(resp) = gate(cx, h, false) {
        return *resp;
    }
    let mut limit = 20usize;
    let (mut after, mut before) = (None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "limit" => match v.parse::<usize>() {
                Ok(n) if (1..=1000).contains(&n) => limit = n,
                _ => return invalid(cx, "limit: Input should be between 1 and 1000"),
            },
            "after_id" => after = Some(v.to_string()),
            "before_id" => before = Some(v.to_string()),
            _ => {}
        }
    }
    let position = |id: &str| MODELS.iter().position(|m| m.0 == id);
    let (page, has_more) = if let Some(before) = before {
        let end = position(&before).unwrap_or(0);
        let start = end.saturating_sub(limit);
        (&MODELS[start..end], start > 0)
    } else {
        let start = after.and_then(|a| position(&a)).map(|i| i + 1).unwrap_or(0);
        let end = (start + limit).min(MODELS.len());
        (&MODELS[start..end], end < MODELS.len())
    };
    let mut resp = json_response(
        StatusCode::OK,
        &json!({
            "data": page.iter().map(model_json).collect::<Vec<_>>(),
            "has_more": has_more,
            "first_id": page.first().map(|m| m.0),
            "last_id": page.last().map(|m| m.0),
        }),
    );
    success_headers(cx, resp.headers_mut());
    resp
}

fn model(cx: &Cx<'_>, h: &HeaderMap, id: &str) -> Response<MockBody> {
    if let Err(resp) = gate(cx, h, false) {
        return *resp;
    }
    match MODELS.iter().find(|m| m.0 == id) {
        Some(m) => {
            let mut resp = json_response(StatusCode::OK, &model_json(m));
            success_headers(cx, resp.headers_mut());
            resp
        }
        None => error(cx, StatusCode::NOT_FOUND, "not_found_error", &format!("model: {id}")),
    }
}
