//! The mock's OAuth server, behaving like Anthropic's as Claude Code sees it:
//!
//! - `GET /oauth/authorize?code=true&client_id&response_type=code&redirect_uri&scope&code_challenge&
//!   code_challenge_method=S256&state` plays a user who approves at once: checks the client id, the redirect URI
//!   and the challenge method, remembers the challenge, and answers 200 `text/plain` `CODE#STATE` (what the
//!   real callback page shows the user);
//! - `POST /v1/oauth/token` (JSON) with `grant_type` `authorization_code` (a single-use code, the verifier
//!   against the challenge, the redirect URI and client id) or `refresh_token` (a current refresh token is
//!   **rotated**: it is dead from then on; a used, revoked or unknown one gets 400 `invalid_grant`);
//! - the access tokens it issues (`mock-oauth-at-<n>`) are checked on the API routes: an unknown, revoked or
//!   expired one gets 401 `authentication_error`.
//!
//! Knobs and counters are on [`crate::MockUpstream`] (`set_oauth_*`, `fail_next_oauth_token_calls`,
//! `revoke_all_oauth_tokens`, `oauth_counters`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

/// Prefix of the access tokens the mock issues (and validates).
pub const ACCESS_TOKEN_PREFIX: &str = "mock-oauth-at-";
/// Prefix of the refresh tokens the mock issues.
pub const REFRESH_TOKEN_PREFIX: &str = "mock-oauth-rt-";

/// Who the OAuth server accepts, and what it issues.
#[derive(Debug, Clone)]
pub struct OAuthMockConfig {
    /// The only client id accepted. Default: Claude Code's public one.
    pub client_id: String,
    /// The only redirect URI accepted. Default: `https://platform.claude.com/oauth/code/callback`.
    pub redirect_uri: String,
    /// `expires_in` of issued access tokens (and when they stop working). Default 3600 s.
    pub token_lifetime: Duration,
    /// The organization name in token answers. Default `Mock Org`.
    pub organization_name: String,
    /// The account e-mail in token answers. Default `mock-user@example.com`.
    pub account_email: String,
}

impl Default for OAuthMockConfig {
    fn default() -> Self {
        OAuthMockConfig {
            client_id: "9d1c250a-e61b-44d9-88ed-5944d1962f5e".into(),
            redirect_uri: "https://platform.claude.com/oauth/code/callback".into(),
            token_lifetime: Duration::from_secs(3600),
            organization_name: "Mock Org".into(),
            account_email: "mock-user@example.com".into(),
        }
    }
}

/// What the OAuth server saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OAuthCounters {
    /// `GET /oauth/authorize` answered with a code.
    pub authorizations: u64,
    /// Token calls with `grant_type=authorization_code` (every one, failed ones included).
    pub code_grants: u64,
    /// Token calls with `grant_type=refresh_token` (every one, failed ones included).
    pub refresh_grants: u64,
    /// Refreshes that rotated a current refresh token.
    pub rotations: u64,
    /// `invalid_grant` answers: a used, revoked or unknown refresh token, or a bad code or verifier.
    pub invalid_grants: u64,
    /// Token calls failed on purpose ([`crate::MockUpstream::fail_next_oauth_token_calls`]).
    pub injected_failures: u64,
    /// API requests refused because their `mock-oauth-at-` token was unknown, revoked or expired.
    pub rejected_access_tokens: u64,
}

struct PendingCode {
    challenge: String,
    redirect_uri: String,
    client_id: String,
    state: String,
    scope: String,
}

#[derive(PartialEq, Eq)]
enum Refresh {
    Current { scope: String },
    Used,
}

#[derive(Default)]
struct Tables {
    next: u64,
    codes: HashMap<String, PendingCode>,
    /// Access token → expiry (ms since the epoch).
    access: HashMap<String, i64>,
    refresh: HashMap<String, Refresh>,
}

pub(crate) struct OAuthServer {
    pub config: OAuthMockConfig,
    tables: Mutex<Tables>,
    lifetime_ms: AtomicU64,
    delay_ms: AtomicU64,
    fail_next: AtomicU64,
    authorizations: AtomicU64,
    code_grants: AtomicU64,
    refresh_grants: AtomicU64,
    rotations: AtomicU64,
    invalid_grants: AtomicU64,
    injected_failures: AtomicU64,
    pub rejected_access_tokens: AtomicU64,
}

/// An answer: status and JSON or text body.
pub(crate) enum Answer {
    Json(u16, Value),
    Text(u16, String),
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn oauth_error(status: u16, error: &str, description: &str) -> Answer {
    Answer::Json(status, json!({"error": error, "error_description": description}))
}

fn query_params(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// Percent-decoding (and `+` as a space) of a query component.
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

impl OAuthServer {
    pub fn new(config: OAuthMockConfig) -> OAuthServer {
        let lifetime_ms = u64::try_from(config.token_lifetime.as_millis()).unwrap_or(u64::MAX);
        OAuthServer {
            config,
            tables: Mutex::new(Tables::default()),
            lifetime_ms: AtomicU64::new(lifetime_ms),
            delay_ms: AtomicU64::new(0),
            fail_next: AtomicU64::new(0),
            authorizations: AtomicU64::new(0),
            code_grants: AtomicU64::new(0),
            refresh_grants: AtomicU64::new(0),
            rotations: AtomicU64::new(0),
            invalid_grants: AtomicU64::new(0),
            injected_failures: AtomicU64::new(0),
            rejected_access_tokens: AtomicU64::new(0),
        }
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_lifetime(&self, d: Duration) {
        self.lifetime_ms
            .store(u64::try_from(d.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    pub fn set_delay(&self, d: Duration) {
        self.delay_ms
            .store(u64::try_from(d.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    pub fn fail_next(&self, n: u64) {
        self.fail_next.store(n, Ordering::Relaxed);
    }

    /// Every access and refresh token stops working (refresh tokens answer `invalid_grant`).
    pub fn revoke_all(&self) {
        let mut t = self.tables();
        t.access.clear();
        for v in t.refresh.values_mut() {
            *v = Refresh::Used;
        }
        t.codes.clear();
    }

    pub fn counters(&self) -> OAuthCounters {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        OAuthCounters {
            authorizations: g(&self.authorizations),
            code_grants: g(&self.code_grants),
            refresh_grants: g(&self.refresh_grants),
            rotations: g(&self.rotations),
            invalid_grants: g(&self.invalid_grants),
            injected_failures: g(&self.injected_failures),
            rejected_access_tokens: g(&self.rejected_access_tokens),
        }
    }

    /// Issues an access and refresh token pair as a completed login would.
    pub fn mint(&self, scope: &str) -> (String, String, u64) {
        let lifetime_ms = self.lifetime_ms.load(Ordering::Relaxed);
        let mut t = self.tables();
        t.next += 1;
        let n = t.next;
        let at = format!("{ACCESS_TOKEN_PREFIX}{n}");
        let rt = format!("{REFRESH_TOKEN_PREFIX}{n}");
        let expires = now_ms().saturating_add(i64::try_from(lifetime_ms).unwrap_or(i64::MAX));
        t.access.insert(at.clone(), expires);
        t.refresh.insert(
            rt.clone(),
            Refresh::Current {
                scope: scope.to_string(),
            },
        );
        (at, rt, lifetime_ms / 1000)
    }

    /// Whether `token` (a `mock-oauth-at-` token) is issued, not revoked and not expired.
    pub fn access_token_valid(&self, token: &str) -> bool {
        self.tables().access.get(token).is_some_and(|exp| *exp > now_ms())
    }

    /// Makes `token` expired now (it stays known).
    pub fn expire(&self, token: &str) {
        if let Some(exp) = self.tables().access.get_mut(token) {
            *exp = 0;
        }
    }

    /// `GET /oauth/authorize?…`
    pub fn authorize(&self, query: &str) -> Answer {
        let q = query_params(query);
        let get = |k: &str| q.get(k).map(String::as_str).unwrap_or("");
        if get("client_id") != self.config.client_id {
            return oauth_error(400, "invalid_client", "Unknown client_id");
        }
        if get("response_type") != "code" {
            return oauth_error(400, "unsupported_response_type", "response_type must be code");
        }
        if get("redirect_uri") != self.config.redirect_uri {
            return oauth_error(400, "invalid_request", "redirect_uri is not registered for this client");
        }
        if get("code_challenge_method") != "S256" {
            return oauth_error(400, "invalid_request", "code_challenge_method must be S256");
        }
        if get("code_challenge").len() < 43 {
            return oauth_error(400, "invalid_request", "code_challenge is missing or too short");
        }
        if get("state").is_empty() {
            return oauth_error(400, "invalid_request", "state is required");
        }
        let code = {
            let mut t = self.tables();
            t.next += 1;
            let code = format!("mock-oauth-code-{}-{}", t.next, uuid::Uuid::new_v4().simple());
            t.codes.insert(
                code.clone(),
                PendingCode {
                    challenge: get("code_challenge").to_string(),
                    redirect_uri: get("redirect_uri").to_string(),
                    client_id: get("client_id").to_string(),
                    state: get("state").to_string(),
                    scope: get("scope").to_string(),
                },
            );
            code
        };
        self.authorizations.fetch_add(1, Ordering::Relaxed);
        Answer::Text(200, format!("{code}#{}", get("state")))
    }

    /// `POST /v1/oauth/token`
    pub async fn token(&self, body: &[u8]) -> Answer {
        let delay = self.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let v: Value = match serde_json::from_slice(body) {
            Ok(v @ Value::Object(_)) => v,
            _ => return oauth_error(400, "invalid_request", "the body must be a JSON object"),
        };
        let get = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("");
        let grant = get("grant_type");
        match grant {
            "authorization_code" => self.code_grants.fetch_add(1, Ordering::Relaxed),
            "refresh_token" => self.refresh_grants.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        let failing = self
            .fail_next
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            self.injected_failures.fetch_add(1, Ordering::Relaxed);
            return Answer::Json(
                500,
                json!({"type": "error", "error": {"type": "api_error", "message": "Internal server error"}}),
            );
        }
        if get("client_id") != self.config.client_id {
            return oauth_error(401, "invalid_client", "Client authentication failed");
        }
        match grant {
            "authorization_code" => self.code_grant(&v),
            "refresh_token" => self.refresh_grant(get("refresh_token")),
            _ => oauth_error(
                400,
                "unsupported_grant_type",
                "grant_type must be authorization_code or refresh_token",
            ),
        }
    }

    fn invalid_grant(&self, description: &str) -> Answer {
        self.invalid_grants.fetch_add(1, Ordering::Relaxed);
        oauth_error(400, "invalid_grant", description)
    }

    fn code_grant(&self, v: &Value) -> Answer {
        let get = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("");
        // Single use: the code is gone whatever happens next.
        let Some(pending) = self.tables().codes.remove(get("code")) else {
            return self.invalid_grant("Invalid 'code' in request.");
        };
        if pending.client_id != get("client_id") || pending.redirect_uri != get("redirect_uri") {
            return self.invalid_grant("redirect_uri does not match the authorization request");
        }
        let verifier = get("code_verifier");
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
        if verifier.is_empty() || challenge != pending.challenge {
            return self.invalid_grant("Invalid code verifier");
        }
        if v.get("state").is_some() && get("state") != pending.state {
            return self.invalid_grant("Invalid state");
        }
        self.issue(&pending.scope)
    }

    fn refresh_grant(&self, refresh_token: &str) -> Answer {
        let scope = {
            let mut t = self.tables();
            match t.refresh.get_mut(refresh_token) {
                Some(r @ Refresh::Current { .. }) => match std::mem::replace(r, Refresh::Used) {
                    Refresh::Current { scope } => Some(scope),
                    Refresh::Used => None,
                },
                _ => None,
            }
        };
        let Some(scope) = scope else {
            return self.invalid_grant("Refresh token not found or invalid");
        };
        self.rotations.fetch_add(1, Ordering::Relaxed);
        self.issue(&scope)
    }

    fn issue(&self, scope: &str) -> Answer {
        let (at, rt, expires_in) = self.mint(scope);
        Answer::Json(
            200,
            json!({
                "token_type": "Bearer",
                "access_token": at,
                "refresh_token": rt,
                "expires_in": expires_in,
                "scope": scope,
                "organization": {"uuid": "4f5e6d7c-0000-4000-8000-00000000a11c", "name": self.config.organization_name},
                "account": {"uuid": "0a1b2c3d-0000-4000-8000-0000000000ac", "email_address": self.config.account_email},
            }),
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_decoded() {
        let q = query_params("a=x%3Ay%20z&b=1+2&c=%zz&d");
        assert_eq!(q["a"], "x:y z");
        assert_eq!(q["b"], "1 2");
        assert_eq!(q["c"], "%zz");
        assert_eq!(q["d"], "");
    }
}
