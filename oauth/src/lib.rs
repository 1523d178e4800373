//! # relay-oauth
//!
//! Anthropic's OAuth, as Claude Code uses it for subscription (Claude Pro/Max) accounts
//! (see `/work/shared/anthropic-wire.md`, "Subscription (OAuth) accounts"):
//!
//! - [`OAuthConfig`]: the endpoints, public client id, scopes and redirect URI, read from the `oauth.*`
//!   settings ([`OAuthConfig::from_settings`]) so they can change without a release;
//! - [`Pkce`]: the PKCE S256 pair and the `state`, made where the operator runs the login (relayctl): the
//!   verifier never leaves that process; [`authorize_url`] and [`parse_pasted`] (`CODE#STATE`);
//! - [`TokenClient`]: the token endpoint (authorization-code exchange and refresh-token grant) over the shared
//!   upstream client of `relay-net` (HTTP, HTTPS, outbound proxies), with a timeout and typed errors ([`OAuthError`]:
//!   never retry an [`OAuthError::InvalidGrant`], retry an [`OAuthError::Transient`] with backoff);
//! - [`parse_token_response`] and [`parse_credentials_file`] (the `.credentials.json` Claude Code writes after
//!   `claude login`), both giving [`Tokens`].
//!
//! No secret (access token, refresh token, authorization code, code verifier) is ever part of an error message
//! or a `Debug` output: the types holding them redact them.

mod client;
mod pkce;
mod tokens;

use std::collections::BTreeMap;

pub use client::{TokenClient, DEFAULT_TIMEOUT};
pub use pkce::{authorize_url, parse_pasted, Pkce};
pub use relay_net::client::{ClientOptions, ProxySpec};
pub use tokens::{parse_credentials_file, parse_token_response, Tokens};

/// The settings this crate reads.
pub const SETTING_AUTHORIZE_URL: &str = "oauth.authorize_url";
pub const SETTING_TOKEN_URL: &str = "oauth.token_url";
pub const SETTING_CLIENT_ID: &str = "oauth.client_id";
pub const SETTING_SCOPES: &str = "oauth.scopes";
pub const SETTING_REDIRECT_URI: &str = "oauth.redirect_uri";
pub const SETTING_REFRESH_AHEAD_MS: &str = "oauth.refresh_ahead_ms";

/// Where and as whom to talk OAuth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthConfig {
    /// The page the operator opens to approve (`https://claude.ai/oauth/authorize`).
    pub authorize_url: String,
    /// The token endpoint (`https://platform.claude.com/v1/oauth/token`).
    pub token_url: String,
    /// The public client id (Claude Code's).
    pub client_id: String,
    /// Space-separated scopes, as sent.
    pub scopes: String,
    /// Where the authorize page sends its answer (a page that shows `CODE#STATE`).
    pub redirect_uri: String,
}

impl OAuthConfig {
    /// The configuration in `settings` (name → stored value, as `ListSettings` or the config carries them);
    /// a missing or invalid value reads as its default.
    pub fn from_settings(settings: &BTreeMap<String, String>) -> OAuthConfig {
        let get = |name: &str| relay_proto::settings::known(name).str_in(settings).to_string();
        OAuthConfig {
            authorize_url: get(SETTING_AUTHORIZE_URL),
            token_url: get(SETTING_TOKEN_URL),
            client_id: get(SETTING_CLIENT_ID),
            scopes: get(SETTING_SCOPES),
            redirect_uri: get(SETTING_REDIRECT_URI),
        }
    }

    /// The scopes as a list.
    pub fn scope_list(&self) -> Vec<String> {
        self.scopes.split_whitespace().map(str::to_string).collect()
    }
}

impl Default for OAuthConfig {
    fn default() -> Self {
        OAuthConfig::from_settings(&BTreeMap::new())
    }
}

/// How long before its expiry an access token should be refreshed (`oauth.refresh_ahead_ms`), in ms.
pub fn refresh_ahead_ms(settings: &BTreeMap<String, String>) -> u64 {
    relay_proto::settings::known(SETTING_REFRESH_AHEAD_MS).u64_in(settings)
}

/// What went wrong talking OAuth. Messages never hold a token, a code or a verifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OAuthError {
    /// 400 `invalid_grant`: the refresh token was revoked or already used (refresh tokens rotate), or the
    /// authorization code is wrong, used or expired. Never retry: the account needs a new login.
    #[error("the token endpoint refused the grant (invalid_grant): {0}")]
    InvalidGrant(String),
    /// Another 4xx (or an unexpected status): retrying will not help.
    #[error("the token endpoint refused the request (HTTP {status}): {message}")]
    Rejected { status: u16, message: String },
    /// 5xx, 429, a timeout or a connection error: retry later, with backoff.
    #[error("the token endpoint could not be reached or failed: {0}")]
    Transient(String),
    /// An answer, a pasted code or a credentials file that is not what it should be.
    #[error("{0}")]
    Malformed(String),
    /// The pasted `CODE#STATE` carries another login's state: refused.
    #[error("the pasted code belongs to another login (its state does not match this one's); start the login again and paste the code it shows")]
    StateMismatch,
}

impl OAuthError {
    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, OAuthError::Transient(_))
    }
}

/// Now, in ms since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_claude_codes() {
        let cfg = OAuthConfig::default();
        assert_eq!(cfg.authorize_url, "https://claude.ai/oauth/authorize");
        assert_eq!(cfg.token_url, "https://platform.claude.com/v1/oauth/token");
        assert_eq!(cfg.client_id, "9d1c250a-e61b-44d9-88ed-5944d1962f5e");
        assert_eq!(cfg.redirect_uri, "https://platform.claude.com/oauth/code/callback");
        assert_eq!(
            cfg.scope_list(),
            [
                "org:create_api_key",
                "user:profile",
                "user:inference",
                "user:sessions:claude_code"
            ]
        );
        assert_eq!(refresh_ahead_ms(&BTreeMap::new()), 300_000);
    }

    #[test]
    fn settings_override_and_bad_values_read_as_defaults() {
        let mut s = BTreeMap::new();
        s.insert(
            "oauth.token_url".to_string(),
            "http://127.0.0.1:9/v1/oauth/token".to_string(),
        );
        s.insert("oauth.authorize_url".to_string(), "ftp://nope".to_string());
        s.insert("oauth.refresh_ahead_ms".to_string(), "60000".to_string());
        let cfg = OAuthConfig::from_settings(&s);
        assert_eq!(cfg.token_url, "http://127.0.0.1:9/v1/oauth/token");
        assert_eq!(cfg.authorize_url, "https://claude.ai/oauth/authorize");
        assert_eq!(refresh_ahead_ms(&s), 60_000);
    }
}
