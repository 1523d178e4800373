//! The one place where the relay's own failures become HTTP responses, in the
//! Anthropic error shape every SDK parses:
//! `{"type":"error","error":{"type":…,"message":…},"request_id":…}` plus a
//! `request-id` header, and `x-should-retry: false` where retrying cannot help.
//!
//! Every Anthropic-format error body relay writes is built here: relay's own
//! ([`ApiError`]), the stand-in for an upstream error whose body was unreadable
//! ([`upstream_error_body`]), the body of a stream that opened with an error
//! ([`stream_opened_with_error_body`]) and the mid-stream SSE `event: error` frame
//! ([`sse_error_event`]). `data-plane/tests/architecture.rs` checks that no other
//! file builds one.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Why the relay itself refused or failed a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    /// `Some(false)`: tell SDKs not to retry.
    pub should_retry: Option<bool>,
    pub retry_after_secs: Option<u64>,
    /// Headers the response carries besides (a limited key's `anthropic-ratelimit-*`).
    pub headers: Vec<(http::HeaderName, HeaderValue)>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            should_retry: None,
            retry_after_secs: None,
            headers: Vec::new(),
        }
    }
    pub fn invalid_request(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", m).no_retry()
    }
    pub fn authentication(m: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "authentication_error", m).no_retry()
    }
    pub fn permission(m: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", m).no_retry()
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found_error", m).no_retry()
    }
    pub fn too_large(m: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "request_too_large", m).no_retry()
    }
    /// The client (its key) asks for more than relay lets it have at once.
    pub fn rate_limited(m: impl Into<String>) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", m)
    }
    /// The client did not finish sending its body in time.
    pub fn body_timeout(m: impl Into<String>) -> Self {
        Self::new(StatusCode::REQUEST_TIMEOUT, "invalid_request_error", m)
    }
    pub fn overloaded(m: impl Into<String>, retry_after_secs: u64) -> Self {
        let mut e = Self::new(
            StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            "overloaded_error",
            m,
        );
        e.retry_after_secs = Some(retry_after_secs);
        e
    }
    pub fn not_ready() -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "api_error",
            "relay has not received its configuration from the control plane yet",
        );
        e.retry_after_secs = Some(1);
        e
    }
    /// The data plane's config is older than it may serve.
    pub fn stale_config(m: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "api_error", m)
    }
    /// The key's group is paused by an operator and no fallback group can stand in: 503, and
    /// SDKs are told not to retry (the pause lasts until an operator resumes the group).
    pub fn group_paused(m: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "api_error", m).no_retry()
    }
    /// No enabled account serves the key's group: a configuration gap an operator must close.
    /// 503, and SDKs are told not to retry.
    pub fn not_configured(m: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "api_error", m).no_retry()
    }
    pub fn upstream_unreachable(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, "api_error", m)
    }
    /// The upstream answered, but not with an Anthropic answer (and no other account could).
    pub fn bad_upstream_answer(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, "api_error", m)
    }
    pub fn internal(m: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "api_error", m)
    }
    pub fn no_retry(mut self) -> Self {
        self.should_retry = Some(false);
        self
    }

    pub fn body_json(&self, request_id: &str) -> Bytes {
        Bytes::from(
            serde_json::json!({
                "type": "error",
                "error": {"type": self.kind, "message": self.message},
                "request_id": request_id,
            })
            .to_string(),
        )
    }

    pub fn into_response(self, request_id: &str) -> Response<Body> {
        let body = self.body_json(request_id);
        let mut resp = Response::new(full(body));
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Ok(v) = HeaderValue::from_str(request_id) {
            h.insert("request-id", v);
        }
        if let Some(r) = self.should_retry {
            h.insert(
                "x-should-retry",
                HeaderValue::from_static(if r { "true" } else { "false" }),
            );
        }
        if let Some(s) = self.retry_after_secs {
            h.insert(http::header::RETRY_AFTER, HeaderValue::from(s));
        }
        for (name, value) in self.headers {
            h.insert(name, value);
        }
        resp
    }
}

/// The error body `{"type":"error","error":{"type":…,"message":…}}` (no request id: an
/// upstream's answer that the client gets in place of the upstream's own body).
fn error_body(kind: &str, message: &str) -> serde_json::Value {
    serde_json::json!({
        "type": "error",
        "error": {"type": kind, "message": message},
    })
}

/// An Anthropic error body for an upstream error whose own body was empty or unreadable.
pub fn upstream_error_body(status: StatusCode) -> Bytes {
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
    let message = format!("the upstream answered {status} without a readable error body");
    Bytes::from(error_body(kind, &message).to_string())
}

/// The JSON error body for an upstream stream whose first event was `event: error` of this type.
pub fn stream_opened_with_error_body(error_type: &str) -> Bytes {
    Bytes::from(error_body(error_type, "the upstream stream opened with an error").to_string())
}

/// The SSE event sent to a client whose stream failed after it started.
pub fn sse_error_event(message: &str) -> Bytes {
    let data = error_body("api_error", message);
    Bytes::from(format!("event: error\ndata: {data}\n\n"))
}

pub fn full(b: impl Into<Bytes>) -> Body {
    use http_body_util::BodyExt;
    http_body_util::Full::new(b.into())
        .map_err(|never| match never {})
        .boxed()
}
