//! The one parser of Anthropic error bodies:
//! `{"type":"error","error":{"type":"…","message":"…"},"request_id":"req_…"}`, as the body of a
//! non-2xx answer and as the data of a mid-stream SSE `event: error`.

use serde::Deserialize;
use serde_json::Value;

/// The `error` object of an Anthropic error body. Each field is read on its own: one that is
/// missing or not a string is `None` and does not hide the other. Strings are kept as sent (the
/// upstream's words: bound or clean them before they reach a log line or a reason).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApiError {
    kind: Option<String>,
    message: Option<String>,
}

impl ApiError {
    /// Reads an error body. `None` when it is not JSON or has no `error` object (an HTML page from a
    /// proxy, `{"error":"boom"}`, a message). Every other field of the body is skipped unread.
    pub fn parse(body: &[u8]) -> Option<ApiError> {
        #[derive(Deserialize)]
        struct Envelope {
            #[serde(default)]
            error: Option<Value>,
        }
        // A derived struct also reads from a JSON array (`[{…}]`): only an object is a body.
        if body.trim_ascii_start().first() != Some(&b'{') {
            return None;
        }
        let envelope: Envelope = serde_json::from_slice(body).ok()?;
        Self::of_error(envelope.error.as_ref()?)
    }

    /// Reads an already parsed error document (an SSE `error` event's data): `None` when it has no
    /// `error` object.
    pub fn from_value(doc: &Value) -> Option<ApiError> {
        Self::of_error(doc.get("error")?)
    }

    fn of_error(error: &Value) -> Option<ApiError> {
        let error = error.as_object()?;
        let string = |key: &str| error.get(key).and_then(Value::as_str).map(str::to_owned);
        Some(ApiError {
            kind: string("type"),
            message: string("message"),
        })
    }

    /// `error.type`, e.g. `"overloaded_error"`, as sent.
    pub fn kind(&self) -> Option<&str> {
        self.kind.as_deref()
    }

    /// `error.message`, as sent.
    pub fn message(&self) -> Option<&str> {
        self.message.as_deref()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn reads_type_and_message_of_an_error_body() {
        let e = ApiError::parse(
            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},"request_id":"req_1"}"#,
        )
        .unwrap();
        assert_eq!(e.kind(), Some("overloaded_error"));
        assert_eq!(e.message(), Some("Overloaded"));
        // Key order and extra fields do not matter; escapes are decoded.
        let e =
            ApiError::parse(br#"{"error":{"message":"a \"quoted\" word","extra":[1],"type":"api_error"}}"#).unwrap();
        assert_eq!(e.kind(), Some("api_error"));
        assert_eq!(e.message(), Some("a \"quoted\" word"));
    }

    #[test]
    fn each_field_stands_alone() {
        let e = ApiError::parse(br#"{"error":{"type":7,"message":"x"}}"#).unwrap();
        assert_eq!((e.kind(), e.message()), (None, Some("x")));
        let e = ApiError::parse(br#"{"error":{"type":"rate_limit_error","message":null}}"#).unwrap();
        assert_eq!((e.kind(), e.message()), (Some("rate_limit_error"), None));
        let e = ApiError::parse(br#"{"error":{}}"#).unwrap();
        assert_eq!(e, ApiError::default());
    }

    #[test]
    fn what_is_not_an_error_body() {
        for body in [
            &b"<html>502 Bad Gateway</html>"[..],
            b"",
            br#"{"error":"boom"}"#,
            br#"{"error":null}"#,
            br#"{"type":"message","content":[]}"#,
            br#"[{"error":{"type":"api_error"}}]"#,
            br#"{"error":{"type":"api_error""#,
        ] {
            assert_eq!(ApiError::parse(body), None, "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn reads_a_parsed_sse_error_event() {
        let v: Value =
            serde_json::from_str(r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#)
                .unwrap();
        let e = ApiError::from_value(&v).unwrap();
        assert_eq!(e.kind(), Some("overloaded_error"));
        assert_eq!(ApiError::from_value(&serde_json::json!({"type":"ping"})), None);
    }
}
