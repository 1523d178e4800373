//! Routing stage: the routes relay serves, the operations endpoints (`/healthz`, `/readyz`,
//! `/metrics`), Claude Code's telemetry batches, and around every request its span, its
//! `relay::request` log line, its metrics (by route and status class) and CORS.

use super::{
    client_request_id, cors, gauges, limit, models, new_request_id, reqlog, Proxy, MAX_TELEMETRY_BYTES, NOT_OURS,
};
use crate::errors::{full, ApiError, Body};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

pub(super) fn json_response(status: StatusCode, body: &serde_json::Value, request_id: &str) -> Response<Body> {
    let mut r = Response::new(full(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Ok(v) = HeaderValue::from_str(request_id) {
        r.headers_mut().insert("request-id", v);
    }
    r
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
            otel.name = %format_args!("{} {route}", req.method()),
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
                super::meters::overhead(route, started.elapsed().saturating_sub(waited).as_secs_f64());
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
        super::meters::request_answered(route, status_class(resp.status()));
        log.answered(resp.status().as_u16(), None);
        span.record("http.response.status_code", i64::from(resp.status().as_u16()));
        if resp.status().is_server_error() {
            span.record("otel.status_code", "ERROR");
        }
        super::meters::request_head(route, started.elapsed().as_secs_f64());
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
            "/metrics" => self.metrics_text(request_id),
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
            (&Method::POST, "/v1/messages") => self.pipeline(req, request_id, started, log, true).await,
            (&Method::POST, "/v1/messages/count_tokens") => self.pipeline(req, request_id, started, log, false).await,
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

    /// Brings the state gauges (account states, group cooling, spend) up to date: cooldowns end
    /// by themselves, so they are refreshed before each scrape, or on a beat when the scrape is
    /// served elsewhere ([`Proxy::refresh_gauges_every`]).
    pub fn refresh_gauges(&self) {
        let now = chrono::Utc::now().timestamp_millis();
        self.groups.refresh(self.holder.get().as_deref(), now);
        if let Some(cfg) = self.holder.get() {
            gauges::refresh(&cfg, &self.health, &self.spend, now);
        }
    }

    /// Refreshes the state gauges every `period` until `stop`: for a process whose metrics are
    /// scraped from a listener that does not go through this proxy (`--metrics-listen`).
    pub async fn refresh_gauges_every(self: Arc<Self>, period: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            self.refresh_gauges();
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = stop.changed() => return,
            }
        }
    }

    fn metrics_text(&self, request_id: &str) -> Response<Body> {
        let Some(handle) = self.metrics.as_ref() else {
            // This process's metrics are served on their own listener; an empty 200 here would
            // look like a healthy scrape of nothing.
            return ApiError::not_found(
                "metrics are not served on this port: scrape the address given by --metrics-listen",
            )
            .into_response(request_id);
        };
        self.refresh_gauges();
        let text = handle.render();
        let mut r = Response::new(full(text));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        r
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

pub(super) fn status_class(s: StatusCode) -> &'static str {
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
}
