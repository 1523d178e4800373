//! count_tokens fallback stage: when no account could count a request's tokens, relay answers
//! with its own estimate ([`super::estimate`]), marked `x-relay-estimate: true`; never usage.

use super::admission::ClientRequest;
use super::{body_bytes, estimate, routes::json_response};
use crate::errors::{full, ApiError, Body};
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

/// A count_tokens answer that says no account could count: relay's estimate instead (`x-relay-estimate: true`).
/// Passed on as they are: an upstream's count, and the answers that are about the request itself (400, 413,
/// a 404 for an unknown model, …). Replaced: no account available, and upstream answers that are about the
/// account or the upstream (401, 403, 404/405 for a missing endpoint, 408, 429, 5xx, 529).
/// Messages requests pass unchanged.
pub(super) async fn estimate_unanswered(
    out: Result<Response<Body>, ApiError>,
    req: &ClientRequest,
    request_id: &str,
) -> Result<Response<Body>, ApiError> {
    if req.is_messages {
        return out;
    }
    answer_or_estimate(out, &req.body, request_id).await
}

/// The count_tokens answer, or relay's estimate for `body` in its place.
pub(super) async fn answer_or_estimate(
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
