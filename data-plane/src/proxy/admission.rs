//! Admission stage: a request is admitted when relay has a config that is not too old, the
//! presented key is known, active and unexpired, `anthropic-version` is a date, and the body
//! arrives whole within its time and size bounds (and the key's share of held bodies) as a
//! JSON object naming a model the key may use.

use super::{held, not_ours, Proxy, MAX_BODY_BYTES};
use crate::control::state::{KeyEntry, ServingConfig};
use crate::errors::ApiError;
use bytes::Bytes;
use http::{header, HeaderMap};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use relay_proto::v1 as pb;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a refused request's body is read and discarded before its answer is sent anyway.
const REFUSED_BODY_DRAIN: Duration = Duration::from_secs(3);

/// The presented relay key: `x-api-key`, else `Authorization: Bearer`.
fn presented_key(h: &HeaderMap) -> Option<&str> {
    if let Some(k) = h.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(k.trim());
    }
    let auth = h.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = auth.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}

pub(super) fn authenticate(cfg: &ServingConfig, h: &HeaderMap) -> Result<Arc<KeyEntry>, ApiError> {
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

pub(super) fn check_version(h: &HeaderMap) -> Result<(), ApiError> {
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

#[derive(serde::Deserialize)]
struct RequestHead {
    model: Option<serde_json::Value>,
    #[serde(default)]
    stream: Option<serde_json::Value>,
    #[serde(default)]
    max_tokens: Option<serde_json::Value>,
}

impl Proxy {
    /// The config is too old to serve: no control plane for longer than the maximum staleness.
    pub(super) fn stale(&self) -> Option<ApiError> {
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

    pub(super) fn admit(&self, h: &HeaderMap) -> Result<(Arc<ServingConfig>, Arc<KeyEntry>), ApiError> {
        let cfg = self.holder.get().ok_or_else(ApiError::not_ready)?;
        if let Some(e) = self.stale() {
            return Err(e);
        }
        let key = authenticate(&cfg, h)?;
        Ok((cfg, key))
    }

    /// Reads the body (bounded in size, time and the key's share of held bodies) and its head.
    /// The [`held::Hold`] keeps the body counted against the key until it is dropped.
    pub(super) async fn read_request(
        &self,
        req: http::Request<Incoming>,
        cfg: Arc<ServingConfig>,
        key: Arc<KeyEntry>,
        is_messages: bool,
    ) -> Result<(ClientRequest, Option<held::Hold>), ApiError> {
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
            // Read (and discard) what the client is still sending, so it gets this answer
            // instead of a broken pipe; give up past twice the limit, or after a few seconds (a
            // client that declared a huge body and sends nothing gets its answer now, not at
            // the body timeout).
            drop(hold);
            let drain = async {
                let mut drained = 0usize;
                while let Some(Ok(frame)) = incoming.frame().await {
                    drained += frame.data_ref().map_or(0, |d| d.len());
                    if drained > 2 * MAX_BODY_BYTES {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(REFUSED_BODY_DRAIN, drain).await;
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
        let head = Head::parse(&body, is_messages)?;
        let req = ClientRequest {
            cfg,
            key,
            parts,
            body,
            model: head.model,
            stream: head.stream,
            max_tokens: head.max_tokens,
            is_messages,
        };
        Ok((req, hold))
    }
}

/// An admitted request: its config and key, its head and whole body, and what the body says.
/// Every later stage reads it.
pub struct ClientRequest {
    pub cfg: Arc<ServingConfig>,
    pub key: Arc<KeyEntry>,
    pub parts: http::request::Parts,
    pub body: Bytes,
    pub model: String,
    /// A streaming Messages request (`"stream": true`; never for count_tokens).
    pub stream: bool,
    /// The request's `max_tokens` (0 when absent), at most 2^24.
    pub max_tokens: u64,
    /// `POST /v1/messages` (else `count_tokens`).
    pub is_messages: bool,
}

/// What relay reads of a request body: the model, whether it streams, its `max_tokens`.
#[derive(Debug, PartialEq, Eq)]
pub struct Head {
    pub model: String,
    pub stream: bool,
    pub max_tokens: u64,
}

impl Head {
    /// The head of a request body: a JSON object with a non-empty string `model`.
    pub fn parse(body: &[u8], is_messages: bool) -> Result<Head, ApiError> {
        // A JSON array would deserialize into the head's fields in order: only an object is a request.
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(ApiError::invalid_request("request body must be a JSON object"));
        }
        let head: RequestHead = serde_json::from_slice(body)
            .map_err(|e| ApiError::invalid_request(format!("request body is not valid JSON: {e}")))?;
        let model = match head.model {
            Some(serde_json::Value::String(m)) if !m.is_empty() => m,
            Some(_) => return Err(ApiError::invalid_request("model: must be a string")),
            None => return Err(ApiError::invalid_request("model: Field required")),
        };
        // As Anthropic: `stream` is a boolean when given ("yes" is refused, not taken as false).
        let stream = match head.stream {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::Bool(b)) => b,
            Some(_) => return Err(ApiError::invalid_request("stream: Input should be a valid boolean")),
        };
        let stream = is_messages && stream;
        let max_tokens = head
            .max_tokens
            .as_ref()
            .and_then(|v| v.as_u64())
            .unwrap_or(0)
            .min(1 << 24);
        Ok(Head {
            model,
            stream,
            max_tokens,
        })
    }
}

/// The key may use the requested model.
pub fn check_model(req: &ClientRequest) -> Result<(), ApiError> {
    if req.key.allows(&req.model) {
        Ok(())
    } else {
        Err(ApiError::permission(format!(
            "this API key may not use model {}",
            req.model
        )))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn the_head_is_a_json_object_naming_a_model() {
        let h = Head::parse(br#" {"model":"m","stream":true,"max_tokens":99999999999}"#, true).unwrap();
        assert_eq!(
            h,
            Head {
                model: "m".into(),
                stream: true,
                max_tokens: 1 << 24
            }
        );
        assert!(
            !Head::parse(br#"{"model":"m","stream":true}"#, false).unwrap().stream,
            "count_tokens never streams"
        );
        let refused = |b: &[u8]| Head::parse(b, true).unwrap_err().message;
        assert_eq!(refused(br#"["m", true]"#), "request body must be a JSON object");
        assert_eq!(refused(br#"{"model":""}"#), "model: must be a string");
        assert_eq!(refused(br#"{"max_tokens":1}"#), "model: Field required");
        assert!(refused(b"{nope").starts_with("request body is not valid JSON"));
        assert_eq!(
            refused(br#"{"model":"m","stream":"yes"}"#),
            "stream: Input should be a valid boolean"
        );
        assert!(!Head::parse(br#"{"model":"m","stream":null}"#, true).unwrap().stream);
    }

    #[test]
    fn anthropic_version_must_be_a_date() {
        let with = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("anthropic-version", http::HeaderValue::from_static(v));
            check_version(&h)
        };
        assert!(with("2023-06-01").is_ok());
        assert!(with("2023-6-1").is_err() && with("latest").is_err());
        assert_eq!(check_version(&HeaderMap::new()).unwrap_err().status.as_u16(), 400);
    }
}
