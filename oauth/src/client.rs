//! The token endpoint: the authorization-code exchange and the refresh-token grant, JSON over the data
//! plane's upstream client (so `http://`, `https://` and the account's outbound proxy all work).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_TYPE, USER_AGENT};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use relay_net::client::{ClientOptions, ProxySpec, Upstreams};
use relay_proto::anthropic::ApiError;
use serde_json::{json, Value};

use crate::{now_ms, parse_token_response, OAuthConfig, OAuthError, Tokens};

/// How long one call to the token endpoint may take, answer included, unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest answer read from the token endpoint.
const MAX_ANSWER_BYTES: usize = 256 * 1024;

/// The longest server message kept in an error.
const MAX_MESSAGE_CHARS: usize = 300;

/// Calls the token endpoint. Cheap to clone; share one.
#[derive(Clone)]
pub struct TokenClient {
    upstreams: Arc<Upstreams>,
    timeout: Duration,
}

impl std::fmt::Debug for TokenClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenClient")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl TokenClient {
    /// A client of its own (`opts.extra_ca_file` adds a CA to the Mozilla roots), with `timeout` per call.
    pub fn new(opts: &ClientOptions<'_>, timeout: Duration) -> Result<TokenClient, OAuthError> {
        let upstreams =
            Upstreams::new(opts).map_err(|e| OAuthError::Malformed(format!("cannot build the HTTP client: {e}")))?;
        Ok(TokenClient::with_upstreams(Arc::new(upstreams), timeout))
    }

    /// A client sharing existing upstream connection pools.
    pub fn with_upstreams(upstreams: Arc<Upstreams>, timeout: Duration) -> TokenClient {
        TokenClient { upstreams, timeout }
    }

    /// Trades an authorization code (from [`crate::parse_pasted`]) and the login's verifier for tokens.
    pub async fn exchange_code(
        &self,
        cfg: &OAuthConfig,
        code: &str,
        state: &str,
        verifier: &str,
        proxy: Option<&ProxySpec>,
    ) -> Result<Tokens, OAuthError> {
        let body = json!({
            "grant_type": "authorization_code",
            "client_id": cfg.client_id,
            "code": code,
            "redirect_uri": cfg.redirect_uri,
            "code_verifier": verifier,
            "state": state,
        });
        self.call(cfg, body, &[code, verifier], proxy).await
    }

    /// Trades a refresh token for a new access token and a **new** refresh token: the one given is dead once
    /// this succeeds (store the new one before anything else). [`OAuthError::InvalidGrant`] means it was
    /// already used or revoked: do not retry.
    pub async fn refresh(
        &self,
        cfg: &OAuthConfig,
        refresh_token: &str,
        proxy: Option<&ProxySpec>,
    ) -> Result<Tokens, OAuthError> {
        let body = json!({
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": cfg.client_id,
        });
        self.call(cfg, body, &[refresh_token], proxy).await
    }

    /// POSTs `body` to the token URL; `secrets` are scrubbed from any message the server sends back.
    async fn call(
        &self,
        cfg: &OAuthConfig,
        body: Value,
        secrets: &[&str],
        proxy: Option<&ProxySpec>,
    ) -> Result<Tokens, OAuthError> {
        let uri: http::Uri = cfg
            .token_url
            .parse()
            .map_err(|_| OAuthError::Malformed("oauth.token_url is not a URL".into()))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(OAuthError::Malformed("oauth.token_url is not an http(s) URL".into()));
        }
        let req = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json")
            .header(USER_AGENT, concat!("relay/", env!("CARGO_PKG_VERSION")))
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| OAuthError::Malformed(format!("cannot build the token request: {e}")))?;
        let exchange = async {
            let resp = self
                .upstreams
                .request(proxy, req)
                .await
                .map_err(|e| OAuthError::Transient(error_chain(&e)))?;
            let status = resp.status();
            let bytes = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| OAuthError::Transient(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok::<_, OAuthError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| OAuthError::Transient(format!("no answer within {} ms", self.timeout.as_millis())))??;
        if status.is_success() {
            return parse_token_response(&bytes, now_ms());
        }
        Err(classify(status, &bytes, secrets))
    }
}

/// The error of a non-2xx answer.
fn classify(status: StatusCode, body: &[u8], secrets: &[&str]) -> OAuthError {
    let v: Option<Value> = serde_json::from_slice(body).ok();
    let field = |name: &str| {
        v.as_ref()
            .and_then(|v| v.get(name))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    // Anthropic's API error shape, {"type":"error","error":{"type","message"}}: the one parser.
    let api_message = || ApiError::parse(body).and_then(|e| e.message().map(str::to_string));
    let code = v
        .as_ref()
        .and_then(|v| v.get("error"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let message = field("error_description")
        .or_else(|| field("error"))
        .or_else(api_message)
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("no description").to_string());
    let message = scrub(&message, secrets);
    if status == StatusCode::BAD_REQUEST && code.as_deref() == Some("invalid_grant") {
        return OAuthError::InvalidGrant(message);
    }
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        return OAuthError::Transient(format!("HTTP {}: {message}", status.as_u16()));
    }
    OAuthError::Rejected {
        status: status.as_u16(),
        message,
    }
}

/// `message`, short, on one line, with every secret sent replaced: whole, or any part
/// `relay_proto::redact` finds (a tail, or its start where the server's message ends), before the
/// message is cut short here (cut first, a secret at the cut was left half there, unmatched).
fn scrub(message: &str, secrets: &[&str]) -> String {
    let mut m = message.to_string();
    for s in secrets.iter().filter(|s| s.len() >= 4) {
        m = m.replace(s, "[redacted]");
    }
    let parts = relay_proto::redact::normalized(secrets.iter().map(|s| s.to_string()).collect());
    let (m, _) = relay_proto::redact::redact_body(m.into_bytes(), &parts);
    String::from_utf8_lossy(&m)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_MESSAGE_CHARS)
        .collect()
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_classified() {
        let e = classify(
            StatusCode::BAD_REQUEST,
            br#"{"error":"invalid_grant","error_description":"Refresh token rt-SECRET not found or invalid"}"#,
            &["rt-SECRET"],
        );
        assert_eq!(
            e,
            OAuthError::InvalidGrant("Refresh token [redacted] not found or invalid".into())
        );
        assert!(!e.is_transient());
        let e = classify(
            StatusCode::BAD_REQUEST,
            br#"{"error":"invalid_request","error_description":"bad client"}"#,
            &[],
        );
        assert_eq!(
            e,
            OAuthError::Rejected {
                status: 400,
                message: "bad client".into()
            }
        );
        let e = classify(StatusCode::UNAUTHORIZED, b"<html>", &[]);
        assert!(matches!(e, OAuthError::Rejected { status: 401, .. }), "{e}");
        let e = classify(
            StatusCode::INTERNAL_SERVER_ERROR,
            br#"{"type":"error","error":{"type":"api_error","message":"boom"}}"#,
            &[],
        );
        assert_eq!(e, OAuthError::Transient("HTTP 500: boom".into()));
        assert!(classify(StatusCode::TOO_MANY_REQUESTS, b"", &[]).is_transient());
    }

    #[test]
    fn no_part_of_the_refresh_token_is_left_in_a_message_cut_short_or_quoting_its_tail() {
        let rt = "sk-ant-ort01-REFRESHqW3eR5tY7uI9oP1aS3dF5gH7jK9lZ2xC4vB6nM8-QwErTy";
        let secret = &rt[13..];
        // The token where the message is cut (all but its last character kept), its tail, all but
        // its last character.
        for quoted in [
            format!("{} {rt}", "x".repeat(MAX_MESSAGE_CHARS - rt.len())),
            format!("unknown refresh token ending {}", &rt[rt.len() - 24..]),
            format!("token {} revoked", &rt[..rt.len() - 1]),
        ] {
            let body = serde_json::json!({"error": "invalid_request", "error_description": quoted}).to_string();
            for status in [StatusCode::BAD_REQUEST, StatusCode::INTERNAL_SERVER_ERROR] {
                let e = classify(status, body.as_bytes(), &[rt]).to_string();
                for i in 0..secret.len() - 8 {
                    assert!(!e.contains(&secret[i..i + 8]), "{e}");
                }
            }
        }
    }
}
