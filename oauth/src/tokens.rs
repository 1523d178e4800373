//! Tokens, from the token endpoint's answer or from Claude Code's credentials file.
//!
//! Both are parsed as a `serde_json::Value` first and read field by field, so an error names the field and
//! never quotes a value (serde's typed errors would quote a token).

use serde_json::Value;

use crate::OAuthError;

/// An account's OAuth tokens and what came with them. `Debug` shows neither token.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Tokens {
    pub access_token: String,
    /// `None` for a long-lived setup token (it cannot be refreshed).
    pub refresh_token: Option<String>,
    /// When the access token expires, ms since the Unix epoch.
    pub expires_at_ms: Option<i64>,
    pub scopes: Vec<String>,
    /// `pro`, `max`, … when the answer or the file says.
    pub subscription_type: Option<String>,
    /// The organization's name (its uuid when it has no name).
    pub organization: Option<String>,
    pub account_email: Option<String>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("access_token", &"[redacted]")
            .field("refresh_token", &self.refresh_token.as_ref().map(|_| "[redacted]"))
            .field("expires_at_ms", &self.expires_at_ms)
            .field("scopes", &self.scopes)
            .field("subscription_type", &self.subscription_type)
            .field("organization", &self.organization)
            .field("account_email", &self.account_email)
            .finish()
    }
}

fn malformed(m: impl Into<String>) -> OAuthError {
    OAuthError::Malformed(m.into())
}

/// A non-empty string field, `None` when absent or null; an error when of another type.
fn opt_str(obj: &Value, field: &str, what: &str) -> Result<Option<String>, OAuthError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.trim().to_string())),
        Some(_) => Err(malformed(format!("{what}{field} is not a string"))),
    }
}

/// A token: a non-empty string of visible ASCII (it goes into a header).
fn token(obj: &Value, field: &str, what: &str) -> Result<Option<String>, OAuthError> {
    let t = opt_str(obj, field, what)?;
    if let Some(t) = &t {
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(malformed(format!(
                "{what}{field} holds characters a token cannot (spaces, control or non-ASCII characters)"
            )));
        }
    }
    Ok(t)
}

/// The token endpoint's JSON answer, received at `now_ms`: `access_token`, `refresh_token` (rotated on each
/// refresh), `expires_in` (seconds), `scope` (space-separated), and when present `organization: {uuid,
/// name}`, `account: {uuid, email_address}` and a subscription type (`subscription_type` /
/// `subscriptionType`, top level or in `organization`).
pub fn parse_token_response(body: &[u8], now_ms: i64) -> Result<Tokens, OAuthError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| malformed(format!("the token endpoint's answer is not JSON ({e})")))?;
    if !v.is_object() {
        return Err(malformed("the token endpoint's answer is not a JSON object"));
    }
    let what = "the token endpoint's answer: ";
    let access_token =
        token(&v, "access_token", what)?.ok_or_else(|| malformed("the token endpoint's answer has no access_token"))?;
    let refresh_token = token(&v, "refresh_token", what)?;
    let expires_at_ms = match v.get("expires_in") {
        None | Some(Value::Null) => None,
        Some(n) => {
            let secs = n
                .as_i64()
                .or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
                .filter(|s| *s >= 0)
                .ok_or_else(|| malformed("the token endpoint's answer: expires_in is not a number of seconds"))?;
            Some(now_ms.saturating_add(secs.saturating_mul(1000)))
        }
    };
    let scopes = opt_str(&v, "scope", what)?
        .map(|s| s.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    let org = v.get("organization").filter(|o| o.is_object());
    let organization = match org {
        Some(o) => opt_str(o, "name", "the token endpoint's answer: organization.")?.or(opt_str(
            o,
            "uuid",
            "the token endpoint's answer: organization.",
        )?),
        None => None,
    };
    let mut subscription_type = opt_str(&v, "subscription_type", what)?.or(opt_str(&v, "subscriptionType", what)?);
    if subscription_type.is_none() {
        if let Some(o) = org {
            subscription_type = opt_str(o, "subscription_type", "the token endpoint's answer: organization.")?;
        }
    }
    let account_email = match v.get("account").filter(|a| a.is_object()) {
        Some(a) => opt_str(a, "email_address", "the token endpoint's answer: account.")?,
        None => None,
    };
    Ok(Tokens {
        access_token,
        refresh_token,
        expires_at_ms,
        scopes,
        subscription_type,
        organization,
        account_email,
    })
}

/// The credentials file Claude Code writes after `claude login` (`~/.claude/.credentials.json`, or the
/// macOS keychain item's content): `{"claudeAiOauth": {"accessToken", "refreshToken", "expiresAt" (ms),
/// "scopes": [...], "subscriptionType"?}}`.
pub fn parse_credentials_file(json: &[u8]) -> Result<Tokens, OAuthError> {
    let v: Value = serde_json::from_slice(json).map_err(|e| {
        malformed(format!(
            "the credentials file is not JSON ({e}); expected Claude Code's .credentials.json"
        ))
    })?;
    let Some(o) = v.get("claudeAiOauth").filter(|o| o.is_object()) else {
        return Err(malformed(
            "the credentials file has no \"claudeAiOauth\" object; expected Claude Code's .credentials.json \
             (written by `claude login`)",
        ));
    };
    let what = "the credentials file: claudeAiOauth.";
    let access_token = token(o, "accessToken", what)?
        .ok_or_else(|| malformed("the credentials file has no claudeAiOauth.accessToken"))?;
    let refresh_token = token(o, "refreshToken", what)?;
    let expires_at_ms = match o.get("expiresAt") {
        None | Some(Value::Null) => None,
        Some(n) => Some(
            n.as_i64()
                .or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
                .ok_or_else(|| malformed("the credentials file: claudeAiOauth.expiresAt is not a time in ms"))
                .and_then(|ms| {
                    // Milliseconds since the epoch between 2001 and 2100: a value in seconds (or
                    // garbage) would otherwise be stored as "expired long ago" or "never expires".
                    if (1_000_000_000_000..=4_102_444_800_000).contains(&ms) {
                        Ok(ms)
                    } else {
                        Err(malformed(
                            "the credentials file: claudeAiOauth.expiresAt must be a time in milliseconds since the epoch (e.g. 1760000000000)",
                        ))
                    }
                })?,
        ),
    };
    let scopes = match o.get("scopes") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| malformed("the credentials file: claudeAiOauth.scopes holds a non-string"))
            })
            .collect::<Result<_, _>>()?,
        Some(Value::String(s)) => s.split_whitespace().map(str::to_string).collect(),
        Some(_) => return Err(malformed("the credentials file: claudeAiOauth.scopes is not a list")),
    };
    let subscription_type = opt_str(o, "subscriptionType", what)?;
    Ok(Tokens {
        access_token,
        refresh_token,
        expires_at_ms,
        scopes,
        subscription_type,
        organization: None,
        account_email: None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn a_token_answer_parses() {
        let body = br#"{"token_type":"Bearer","access_token":"sk-ant-oat01-AAA","refresh_token":"sk-ant-ort01-BBB",
            "expires_in":28800,"scope":"user:inference user:profile",
            "organization":{"uuid":"o-1","name":"Acme"},"account":{"uuid":"a-1","email_address":"x@acme.test"}}"#;
        let t = parse_token_response(body, 1_000).unwrap();
        assert_eq!(t.access_token, "sk-ant-oat01-AAA");
        assert_eq!(t.refresh_token.as_deref(), Some("sk-ant-ort01-BBB"));
        assert_eq!(t.expires_at_ms, Some(1_000 + 28_800_000));
        assert_eq!(t.scopes, ["user:inference", "user:profile"]);
        assert_eq!(t.organization.as_deref(), Some("Acme"));
        assert_eq!(t.account_email.as_deref(), Some("x@acme.test"));
        assert_eq!(t.subscription_type, None);
        let d = format!("{t:?}");
        assert!(!d.contains("AAA") && !d.contains("BBB"), "{d}");

        let t = parse_token_response(
            br#"{"access_token":"a","organization":{"uuid":"o-1"},"subscription_type":"max"}"#,
            0,
        )
        .unwrap();
        assert_eq!(t.organization.as_deref(), Some("o-1"));
        assert_eq!(t.subscription_type.as_deref(), Some("max"));
        assert_eq!((t.refresh_token, t.expires_at_ms), (None, None));
    }

    #[test]
    fn bad_answers_are_refused_without_quoting_them() {
        for (body, needle) in [
            (&b"<html>"[..], "not JSON"),
            (b"[1]", "not a JSON object"),
            (b"{}", "no access_token"),
            (br#"{"access_token":7}"#, "access_token is not a string"),
            (br#"{"access_token":"has space"}"#, "cannot"),
            (br#"{"access_token":"a","expires_in":"secret-ish"}"#, "expires_in"),
        ] {
            let e = parse_token_response(body, 0).unwrap_err();
            assert!(matches!(e, OAuthError::Malformed(_)), "{e}");
            assert!(e.to_string().contains(needle), "{e}");
            assert!(!e.to_string().contains("secret-ish") && !e.to_string().contains("has space"));
        }
    }

    #[test]
    fn claude_codes_credentials_file_parses() {
        let file = br#"{"claudeAiOauth":{"accessToken":"sk-ant-oat01-X","refreshToken":"sk-ant-ort01-Y",
            "expiresAt":1760000000000,"scopes":["user:inference","user:profile"],"subscriptionType":"max"}}"#;
        let t = parse_credentials_file(file).unwrap();
        assert_eq!(t.access_token, "sk-ant-oat01-X");
        assert_eq!(t.refresh_token.as_deref(), Some("sk-ant-ort01-Y"));
        assert_eq!(t.expires_at_ms, Some(1_760_000_000_000));
        assert_eq!(t.scopes, ["user:inference", "user:profile"]);
        assert_eq!(t.subscription_type.as_deref(), Some("max"));
    }

    #[test]
    fn wrong_credentials_files_say_what_is_wrong() {
        for (file, needle) in [
            (&b"not json"[..], "not JSON"),
            (br#"{"accessToken":"x"}"#, "no \"claudeAiOauth\" object"),
            (br#"{"claudeAiOauth":{}}"#, "no claudeAiOauth.accessToken"),
            (
                br#"{"claudeAiOauth":{"accessToken":"x","expiresAt":"soon"}}"#,
                "expiresAt",
            ),
            (br#"{"claudeAiOauth":{"accessToken":"x","scopes":[1]}}"#, "scopes"),
            // Seconds, not milliseconds.
            (
                br#"{"claudeAiOauth":{"accessToken":"x","expiresAt":1760000000}}"#,
                "milliseconds",
            ),
            (
                br#"{"claudeAiOauth":{"accessToken":"x","expiresAt":1e300}}"#,
                "milliseconds",
            ),
            (
                br#"{"claudeAiOauth":{"accessToken":"x","expiresAt":-5}}"#,
                "milliseconds",
            ),
            (
                br#"{"claudeAiOauth":{"accessToken":"x","refreshToken":5}}"#,
                "refreshToken",
            ),
        ] {
            let e = parse_credentials_file(file).unwrap_err();
            assert!(e.to_string().contains(needle), "{needle}: {e}");
        }
    }
}
