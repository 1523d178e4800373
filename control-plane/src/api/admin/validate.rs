//! What the Admin API checks in a request before anything is stored: names, URLs, weights,
//! credentials, model patterns, expiries, limits, descriptions, OAuth facts.

use super::accounts::redact_url;
use crate::model::*;
use relay_proto::v1 as pb;
use serde_json::json;
use tonic::Status;

pub(super) const MAX_WEIGHT: u32 = 10_000;
/// The largest tokens-per-minute limit (the limiter counts tokens exactly up to 2^53).
pub const MAX_TPM: u64 = 1_000_000_000_000;
/// The largest daily or monthly budget, in micro-USD: $1,000,000 (the limiter counts spend in
/// nano-USD, exactly up to 2^53).
pub const MAX_BUDGET_MICRO_USD: u64 = 1_000_000_000_000;
/// The longest credential (API key, token) an account takes, in bytes: it travels in a request
/// header, and upstreams refuse headers far shorter than a megabyte.
pub const MAX_CREDENTIAL_BYTES: usize = 16 * 1024;
/// The most model patterns one key may be limited to, and the longest pattern, in bytes.
pub const MAX_KEY_MODELS: usize = 256;
pub const MAX_MODEL_PATTERN_BYTES: usize = 128;

/// Names: 1 to 64 characters of letters, digits, '.', '_', '-', '@'.
pub(super) fn validate_name(what: &str, name: &str) -> Result<(), Status> {
    // A name that reads as an id prefix would shadow the item whose id starts so (names win).
    // (Shaped as relayctl shows ids: eight hex digits or more, then nothing but hex and '-'.)
    let id_like = name.len() >= 8
        && name.bytes().take(8).all(|b| b.is_ascii_hexdigit())
        && name.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_digit());
    if id_like {
        return Err(Status::invalid_argument(format!(
            "invalid {what} name {name:?}: it reads as the start of an id (hex digits and '-'), which \
             relayctl takes as an id; add a letter beyond a-f"
        )));
    }
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'));
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "invalid {what} name {name:?}: use 1 to 64 letters, digits, '.', '_', '-' or '@'"
        )))
    }
}

pub(super) fn validate_url(what: &str, url: &str, schemes: &[&str]) -> Result<(), Status> {
    let parsed: Result<tonic::codegen::http::Uri, _> = url.parse();
    match parsed {
        Ok(u) if u.scheme_str().is_some_and(|s| schemes.contains(&s)) && u.host().is_some() => Ok(()),
        _ => Err(Status::invalid_argument(format!(
            "invalid {what} {:?}: expected an absolute URL with scheme {}",
            redact_url(url),
            schemes.join(" or ")
        ))),
    }
}

/// An outbound proxy URL, checked with the parser the data planes use.
pub(super) fn validate_proxy_url(url: &str) -> Result<(), Status> {
    relay_proto::validate::parse_proxy_url(url).map(|_| ()).map_err(|e| {
        Status::invalid_argument(format!(
            "invalid proxy URL {:?}: {e}; expected http://[user:pass@]host:port, socks5://… or socks5h://…",
            redact_url(url)
        ))
    })
}

pub(super) fn validate_weight(w: u32) -> Result<u32, Status> {
    match w {
        0 => Ok(1),
        w if w <= MAX_WEIGHT => Ok(w),
        w => Err(Status::invalid_argument(format!(
            "weight {w} is out of range 1..={MAX_WEIGHT}"
        ))),
    }
}

pub(super) fn validate_credential(c: &str) -> Result<(), Status> {
    if c.trim().is_empty() {
        return Err(Status::invalid_argument("the credential is empty"));
    }
    if c.chars().any(|ch| ch.is_control()) {
        return Err(Status::invalid_argument(
            "the credential contains control characters (a stray newline?)",
        ));
    }
    if c.len() > MAX_CREDENTIAL_BYTES {
        return Err(Status::invalid_argument(format!(
            "the credential is {} bytes; at most {MAX_CREDENTIAL_BYTES}",
            c.len()
        )));
    }
    Ok(())
}

pub(super) fn account_kind(k: i32) -> Result<AccountKind, Status> {
    match pb::AccountKind::try_from(k) {
        Ok(pb::AccountKind::AnthropicApiKey) => Ok(AccountKind::AnthropicApiKey),
        Ok(pb::AccountKind::ClaudeOauth) => Ok(AccountKind::ClaudeOauth),
        Ok(pb::AccountKind::AnthropicCompatible) => Ok(AccountKind::AnthropicCompatible),
        _ => Err(Status::invalid_argument(
            "account kind is required: anthropic-api-key, claude-oauth or anthropic-compatible",
        )),
    }
}

/// A USD amount from micro-USD, for messages ("$12.50").
pub(super) fn usd(micros: u64) -> String {
    format!("${}.{:02}", micros / 1_000_000, (micros % 1_000_000) / 10_000)
}

/// The limits of a key or a group (`whose`: "key" or "group"), checked: every value fits what
/// the limiter counts exactly. 0 means unlimited for each; an absent message is all zeros.
/// (A negative or non-numeric value cannot reach here: the fields are unsigned integers, and
/// relayctl refuses such input before it sends anything.)
pub(super) fn validate_limits(whose: &str, l: Option<&pb::KeyLimits>) -> Result<KeyLimits, Status> {
    let limits = limits_from_pb(l);
    let mut wrong = Vec::new();
    if limits.tpm > MAX_TPM {
        wrong.push(format!(
            "tokens per minute (--tpm) {} is above the largest relay enforces, {MAX_TPM}",
            limits.tpm
        ));
    }
    for (what, v) in [
        ("daily budget (--daily-budget)", limits.daily_budget),
        ("monthly budget (--monthly-budget)", limits.monthly_budget),
    ] {
        if v > MAX_BUDGET_MICRO_USD {
            wrong.push(format!(
                "{what} {} is above the largest relay counts exactly, {}",
                usd(v),
                usd(MAX_BUDGET_MICRO_USD)
            ));
        }
    }
    if wrong.is_empty() {
        return Ok(limits);
    }
    Err(Status::invalid_argument(format!(
        "invalid {whose} limits: {} (0 means unlimited)",
        wrong.join("; ")
    )))
}

pub(super) fn limits_from_pb(l: Option<&pb::KeyLimits>) -> KeyLimits {
    let l = l.cloned().unwrap_or_default();
    KeyLimits {
        rpm: u64::from(l.requests_per_minute),
        tpm: l.tokens_per_minute,
        max_concurrency: u64::from(l.max_concurrency),
        daily_budget: l.daily_budget_micro_usd,
        monthly_budget: l.monthly_budget_micro_usd,
    }
}

pub(super) fn limits_json(l: &KeyLimits) -> serde_json::Value {
    json!({
        "rpm": l.rpm, "tpm": l.tpm, "concurrency": l.max_concurrency,
        "daily_budget_micro_usd": l.daily_budget, "monthly_budget_micro_usd": l.monthly_budget,
    })
}

/// A group's description: at most 500 characters, no control characters.
pub(super) fn validate_description(d: &str) -> Result<(), Status> {
    if d.chars().count() > 500 || d.chars().any(char::is_control) {
        return Err(Status::invalid_argument(
            "invalid group description: at most 500 characters, without control characters",
        ));
    }
    Ok(())
}

pub(super) fn validate_models(models: &[String]) -> Result<Vec<String>, Status> {
    let mut out = Vec::new();
    for m in models.iter().map(|m| m.trim()).filter(|m| !m.is_empty()) {
        if m.len() > MAX_MODEL_PATTERN_BYTES {
            return Err(Status::invalid_argument(format!(
                "a model pattern is {} bytes; at most {MAX_MODEL_PATTERN_BYTES}",
                m.len()
            )));
        }
        if out.len() == MAX_KEY_MODELS {
            return Err(Status::invalid_argument(format!(
                "more than {MAX_KEY_MODELS} models for one key: use prefixes ending in '*'"
            )));
        }
        let body = m.strip_suffix('*').unwrap_or(m);
        if body.contains('*') || m.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(Status::invalid_argument(format!(
                "invalid model {m:?}: an exact model id, or a prefix ending in '*'"
            )));
        }
        if !out.iter().any(|x: &String| x == m) {
            out.push(m.to_string());
        }
    }
    Ok(out)
}

pub(super) fn validate_expiry(ms: i64) -> Result<Option<Millis>, Status> {
    match ms {
        0 => Ok(None),
        ms if ms < now_ms() => Err(Status::invalid_argument("the expiry is in the past")),
        ms => Ok(Some(ms)),
    }
}

/// The OAuth facts of a new account (scopes, subscription type, organization): only for claude-oauth
/// accounts, short, one line each.
pub(super) fn validate_oauth_fields(
    kind: AccountKind,
    r: &pb::CreateAccountRequest,
) -> Result<(Vec<String>, String, String), Status> {
    let scopes: Vec<String> = r
        .scopes
        .iter()
        .flat_map(|s| s.split_whitespace())
        .map(str::to_string)
        .collect();
    let sub = r.subscription_type.trim().to_string();
    let org = r.organization.trim().to_string();
    if kind != AccountKind::ClaudeOauth && (!scopes.is_empty() || !sub.is_empty() || !org.is_empty()) {
        return Err(Status::invalid_argument(
            "scopes, subscription type and organization are for claude-oauth accounts only",
        ));
    }
    if scopes.len() > 32
        || scopes
            .iter()
            .any(|s| s.len() > 128 || !s.bytes().all(|b| b.is_ascii_graphic()))
    {
        return Err(Status::invalid_argument(
            "scopes: at most 32, each at most 128 visible ASCII characters",
        ));
    }
    for (what, v) in [("subscription type", &sub), ("organization", &org)] {
        if v.chars().count() > 200 || v.chars().any(char::is_control) {
            return Err(Status::invalid_argument(format!(
                "{what}: at most 200 characters, on one line"
            )));
        }
    }
    Ok((scopes, sub, org))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::api::admin::redact_url;

    #[test]
    fn names_and_urls() {
        assert!(validate_name("x", "team-a_1").is_ok());
        assert!(validate_name("x", "").is_err());
        assert!(validate_name("x", "a b").is_err());
        assert!(validate_url("u", "https://api.anthropic.com", &["https"]).is_ok());
        assert!(validate_url("u", "api.anthropic.com", &["https"]).is_err());
        assert_eq!(redact_url("http://user:pw@proxy:3128"), "http://…@proxy:3128");
        // Issue 12 item 10: an unescaped '@' in the password leaked its tail.
        assert_eq!(redact_url("http://user:p@ss@proxy:3128"), "http://…@proxy:3128");
        assert_eq!(redact_url("socks5://u:a@b@c@h:1/"), "socks5://…@h:1/");
        assert_eq!(redact_url("http://proxy:3128/x@y"), "http://proxy:3128/x@y");
        assert!(validate_models(&["claude-*".into()]).is_ok());
        assert!(validate_models(&["cl*aude".into()]).is_err());
        assert_eq!(validate_weight(0).ok(), Some(1));
    }

    #[test]
    fn huge_credentials_and_model_lists_are_refused() {
        assert!(validate_credential(&"k".repeat(MAX_CREDENTIAL_BYTES)).is_ok());
        let e = validate_credential(&"k".repeat(MAX_CREDENTIAL_BYTES + 1)).unwrap_err();
        assert!(e.message().contains("at most 16384"), "{e:?}");
        // The refusal never repeats the credential.
        assert!(!e.message().contains("kkk"), "{e:?}");
        let many: Vec<String> = (0..=MAX_KEY_MODELS).map(|i| format!("m{i}")).collect();
        assert!(validate_models(&many[..MAX_KEY_MODELS]).is_ok());
        assert!(validate_models(&many).unwrap_err().message().contains("more than 256"));
        assert!(validate_models(&["m".repeat(MAX_MODEL_PATTERN_BYTES + 1)]).is_err());
        // Repeats count once.
        assert_eq!(validate_models(&vec!["m".to_string(); 1_000]).unwrap().len(), 1);
    }
}
