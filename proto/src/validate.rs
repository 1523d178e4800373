//! The one definition of what makes a config usable, run by the control plane
//! before it accepts a write and by every data plane before it serves a
//! config: anything the control plane accepts, every data plane of the same
//! build accepts.
//!
//! Two kinds of failure:
//! - **structural** ([`StructuralError`]): the config as a whole cannot be
//!   served (duplicate ids, no key-hash secret, two keys with one hash). A data
//!   plane NACKs it and keeps serving the old one.
//! - **one resource** ([`ResourceError`]): an account or a key that cannot be
//!   used (an unusable URL, a dangling group). A data plane takes just that
//!   resource out of service, applies the rest, and says which in its ACK.
//!
//! Errors never echo a credential or a proxy URL (it may hold a password).

use crate::v1 as pb;
use std::collections::HashSet;

/// Why a proxy URL cannot be used. Never carries the URL itself: it may hold a password.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ProxyUrlError {
    #[error("the proxy URL does not parse")]
    Unparsable,
    #[error("proxy scheme {0:?} is not supported (use http, socks5 or socks5h)")]
    Scheme(String),
    #[error("the proxy URL has no host")]
    NoHost,
    #[error("the proxy URL must not have a path or query")]
    Path,
    #[error("the proxy user or password is not valid UTF-8 once percent-decoded")]
    Userinfo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyKind {
    /// HTTP CONNECT tunnel.
    Http,
    /// SOCKS5; `remote_dns`: the proxy resolves the upstream's name (`socks5h`).
    Socks5 { remote_dns: bool },
}

/// A parsed outbound proxy URL.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    pub kind: ProxyKind,
    pub host: String,
    pub port: u16,
    /// User and password, percent-decoded.
    pub auth: Option<(String, String)>,
}

impl std::fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyUrl")
            .field("kind", &self.kind)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("auth", &self.auth.as_ref().map(|_| "set"))
            .finish()
    }
}

/// Parses `scheme://[user[:password]@]host[:port][/]`; the port defaults to
/// 1080 as in curl. Schemes: `http` (CONNECT), `socks5`, `socks5h`.
pub fn parse_proxy_url(url: &str) -> Result<ProxyUrl, ProxyUrlError> {
    let uri: http::Uri = url.parse().map_err(|_| ProxyUrlError::Unparsable)?;
    let kind = match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
        Some("http") => ProxyKind::Http,
        Some("socks5") => ProxyKind::Socks5 { remote_dns: false },
        Some("socks5h") => ProxyKind::Socks5 { remote_dns: true },
        Some(other) => return Err(ProxyUrlError::Scheme(other.to_string())),
        None => return Err(ProxyUrlError::Unparsable),
    };
    let authority = uri.authority().ok_or(ProxyUrlError::NoHost)?;
    if !matches!(uri.path_and_query().map(|p| p.as_str()), None | Some("") | Some("/")) {
        return Err(ProxyUrlError::Path);
    }
    let host = authority.host();
    if host.is_empty() {
        return Err(ProxyUrlError::NoHost);
    }
    let port = authority.port_u16().unwrap_or(1080);
    let auth = match authority.as_str().rsplit_once('@') {
        None => None,
        Some((userinfo, _)) => {
            let (user, pass) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8()
                    .map(|c| c.into_owned())
                    .map_err(|_| ProxyUrlError::Userinfo)
            };
            Some((decode(user)?, decode(pass)?))
        }
    };
    Ok(ProxyUrl {
        kind,
        host: host.to_string(),
        port,
        auth,
    })
}

/// Why one resource cannot be used.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ResourceError {
    #[error("unknown account kind")]
    AccountKind,
    #[error("weight 0 on an enabled account")]
    ZeroWeight,
    #[error("invalid base URL: {0}")]
    BaseUrl(String),
    #[error("the credential is not a valid header value")]
    Credential,
    #[error("unusable proxy URL: {0}")]
    ProxyUrl(#[from] ProxyUrlError),
    #[error("refers to unknown group {0}")]
    UnknownGroup(String),
}

/// Why a config as a whole cannot be served.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StructuralError {
    #[error("duplicate {kind} id {id}")]
    DuplicateId { kind: &'static str, id: String },
    #[error("settings are missing or carry no api-key hash secret")]
    NoHashSecret,
    #[error("two api keys share one hash ({0} and another)")]
    DuplicateKeyHash(String),
}

/// The shortest accepted key-hash secret, in bytes.
pub const MIN_HASH_SECRET: usize = 16;

/// An account's base URL as relay stores it: trimmed, without trailing slashes and without a
/// trailing `/v1` (relay appends the API path, `/v1/messages`, itself: a base URL that ends in
/// `/v1` would send requests to `/v1/v1/messages`).
pub fn normalize_base_url(url: &str) -> String {
    let mut u = url.trim().trim_end_matches('/');
    if u.len() >= 3 && u[u.len() - 3..].eq_ignore_ascii_case("/v1") {
        u = u[..u.len() - 3].trim_end_matches('/');
    }
    u.to_string()
}

/// Refuses a base URL that already names an API route (`…/v1/messages`, `…/v1/models`): relay
/// appends the route itself, so requests would go to `/v1/messages/v1/messages`. The message
/// says what to give instead. (A trailing `/v1` alone is dropped by [`normalize_base_url`].)
pub fn base_url_names_no_route(url: &str) -> Result<(), String> {
    let u = url.trim().trim_end_matches('/');
    let path = u
        .split_once("://")
        .map_or(u, |(_, rest)| rest.split_once('/').map_or("", |(_, p)| p));
    let lower = format!("/{}", path.to_ascii_lowercase());
    // Only Anthropic's own routes: gateways put `/v1/` in their roots
    // (`https://gateway.ai.cloudflare.com/v1/ACCOUNT/GATEWAY/anthropic`).
    let route = lower.rfind("/v1/").filter(|&at| {
        let tail = &lower[at + 4..];
        ["messages", "models", "complete"]
            .iter()
            .any(|r| tail == *r || tail.starts_with(&format!("{r}/")))
    });
    if let Some(at) = route {
        let root = &u[..u.len() - (lower.len() - at)];
        return Err(format!(
            "the base URL {u:?} already names an API route ({}): give the server's root, {root:?}; relay appends /v1/messages itself",
            &lower[at..]
        ));
    }
    Ok(())
}

/// An account's base URL: absolute http(s) with a host.
pub fn base_url(url: &str) -> Result<http::Uri, ResourceError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| ResourceError::BaseUrl(e.to_string()))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(ResourceError::BaseUrl("expected an absolute http(s) URL".into()));
    }
    if uri.query().is_some() {
        return Err(ResourceError::BaseUrl("a base URL takes no query".into()));
    }
    Ok(uri)
}

/// A credential as it goes upstream: `x-api-key: C` or `Authorization: Bearer C`.
pub fn credential(c: &str) -> Result<(), ResourceError> {
    let ok = |v: &str| http::HeaderValue::from_str(v).is_ok();
    if c.trim().is_empty() || c.chars().any(char::is_control) || !ok(c) || !ok(&format!("Bearer {c}")) {
        return Err(ResourceError::Credential);
    }
    Ok(())
}

/// One account, on its own (group references are checked by [`config`]).
pub fn account(a: &pb::Account) -> Result<(), ResourceError> {
    match pb::AccountKind::try_from(a.kind) {
        Ok(pb::AccountKind::AnthropicApiKey | pb::AccountKind::ClaudeOauth | pb::AccountKind::AnthropicCompatible) => {}
        _ => return Err(ResourceError::AccountKind),
    }
    if a.weight == 0 && a.status == pb::AccountStatus::Enabled as i32 {
        return Err(ResourceError::ZeroWeight);
    }
    base_url(&a.base_url)?;
    credential(&a.credential)?;
    if !a.proxy_url.is_empty() {
        parse_proxy_url(&a.proxy_url)?;
    }
    Ok(())
}

fn check_unique<'a>(kind: &'static str, ids: impl Iterator<Item = &'a String>) -> Result<(), StructuralError> {
    let mut seen = HashSet::new();
    for id in ids {
        if !seen.insert(id) {
            return Err(StructuralError::DuplicateId { kind, id: id.clone() });
        }
    }
    Ok(())
}

fn rejected(kind: pb::ResourceKind, id: &str, e: &ResourceError) -> pb::RejectedResource {
    pb::RejectedResource {
        r#ref: Some(pb::ResourceRef {
            kind: kind as i32,
            id: id.to_string(),
        }),
        error: e.to_string(),
    }
}

/// Checks a complete config: `Err` when it cannot be served at all, else the
/// resources to take out of service (empty when everything is usable), in
/// canonical order.
pub fn config(r: &pb::Resources) -> Result<Vec<pb::RejectedResource>, StructuralError> {
    check_unique("api key", r.api_keys.iter().map(|k| &k.id))?;
    check_unique("account", r.accounts.iter().map(|a| &a.id))?;
    check_unique("group", r.groups.iter().map(|g| &g.id))?;
    check_unique("price", r.prices.iter().map(|p| &p.id))?;
    check_unique("capture rule", r.capture_rules.iter().map(|c| &c.id))?;
    if r.settings
        .as_ref()
        .is_none_or(|s| s.api_key_hash_secret.len() < MIN_HASH_SECRET)
    {
        return Err(StructuralError::NoHashSecret);
    }
    let mut hashes = HashSet::new();
    for k in &r.api_keys {
        if !hashes.insert(k.key_hash.as_str()) {
            return Err(StructuralError::DuplicateKeyHash(k.name.clone()));
        }
    }
    let groups: HashSet<&str> = r.groups.iter().map(|g| g.id.as_str()).collect();
    let mut out = Vec::new();
    for k in &r.api_keys {
        if !groups.contains(k.group_id.as_str()) {
            out.push(rejected(
                pb::ResourceKind::ApiKey,
                &k.id,
                &ResourceError::UnknownGroup(k.group_id.clone()),
            ));
        }
    }
    for a in &r.accounts {
        let unknown = a.group_ids.iter().find(|g| !groups.contains(g.as_str()));
        let check = match unknown {
            Some(g) => Err(ResourceError::UnknownGroup(g.clone())),
            None => account(a),
        };
        if let Err(e) = check {
            out.push(rejected(pb::ResourceKind::Account, &a.id, &e));
        }
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    #[test]
    fn base_urls_lose_a_trailing_v1() {
        for (given, stored) in [
            ("https://api.anthropic.com", "https://api.anthropic.com"),
            ("https://api.anthropic.com/", "https://api.anthropic.com"),
            ("https://api.anthropic.com/v1", "https://api.anthropic.com"),
            ("https://api.anthropic.com/v1/", "https://api.anthropic.com"),
            (" https://gw.example/anthropic/V1 ", "https://gw.example/anthropic"),
            ("https://gw.example/v1beta", "https://gw.example/v1beta"),
        ] {
            assert_eq!(normalize_base_url(given), stored, "{given}");
        }
    }

    #[test]
    fn base_urls_that_name_a_route_are_refused_with_the_root_to_give() {
        for ok in [
            "https://api.anthropic.com",
            "https://gw.example/anthropic",
            "http://127.0.0.1:9999",
            "https://gateway.ai.cloudflare.com/v1/acct/gw/anthropic",
            "https://gw.example/v1/messages-proxy",
        ] {
            assert_eq!(base_url_names_no_route(ok), Ok(()), "{ok}");
        }
        for (bad, root) in [
            ("http://127.0.0.1:9999/v1/messages", "http://127.0.0.1:9999"),
            (
                "https://gw.example/anthropic/v1/messages/",
                "https://gw.example/anthropic",
            ),
            ("https://api.anthropic.com/V1/models", "https://api.anthropic.com"),
            ("https://gw.example/v1/messages/count_tokens", "https://gw.example"),
        ] {
            let e = base_url_names_no_route(bad).unwrap_err();
            assert!(
                e.contains(&format!("{root:?}")) && e.contains("appends /v1/messages"),
                "{e}"
            );
        }
    }

    use super::*;

    fn acct(id: &str) -> pb::Account {
        pb::Account {
            id: id.into(),
            name: id.into(),
            kind: pb::AccountKind::AnthropicApiKey as i32,
            base_url: "https://api.anthropic.com".into(),
            credential: "sk-ant-x".into(),
            weight: 1,
            group_ids: vec!["g".into()],
            status: pb::AccountStatus::Enabled as i32,
            ..Default::default()
        }
    }

    fn base() -> pb::Resources {
        pb::Resources {
            groups: vec![pb::Group {
                id: "g".into(),
                ..Default::default()
            }],
            settings: Some(pb::Settings {
                api_key_hash_secret: vec![7; 32],
                values: Default::default(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn proxy_urls_parse_with_defaults_and_decoded_credentials() {
        let p = parse_proxy_url("socks5h://us%40er:p%3Ass@proxy.internal").unwrap();
        assert_eq!(p.kind, ProxyKind::Socks5 { remote_dns: true });
        assert_eq!((p.host.as_str(), p.port), ("proxy.internal", 1080));
        assert_eq!(p.auth, Some(("us@er".to_string(), "p:ss".to_string())));
        let p = parse_proxy_url("SOCKS5://u@[::1]:9050").unwrap();
        assert_eq!(p.kind, ProxyKind::Socks5 { remote_dns: false });
        assert_eq!(p.auth, Some(("u".to_string(), String::new())));
        assert!(!format!("{:?}", parse_proxy_url("http://u:secret@p:1").unwrap()).contains("secret"));
    }

    #[test]
    fn bad_proxy_urls_are_refused_without_echoing_them() {
        for (url, want) in [
            ("https://u:secret@p:443", ProxyUrlError::Scheme("https".into())),
            ("ftp://p", ProxyUrlError::Scheme("ftp".into())),
            ("http://u:secret@p:8080/path", ProxyUrlError::Path),
            ("http://127.0.0.1:3128/x", ProxyUrlError::Path),
            ("http://127.0.0.1:3128?x=1", ProxyUrlError::Path),
            ("not a url", ProxyUrlError::Unparsable),
            ("http://u:%ff@p", ProxyUrlError::Userinfo),
        ] {
            let e = parse_proxy_url(url).unwrap_err();
            assert_eq!(e, want, "{url}");
            assert!(!e.to_string().contains("secret"), "{e}");
        }
    }

    #[test]
    fn one_bad_account_is_rejected_alone() {
        let mut r = base();
        let mut bad = acct("b");
        bad.proxy_url = "http://u:secret@127.0.0.1:3128/x".into();
        let mut dangling = acct("c");
        dangling.group_ids = vec!["nope".into()];
        r.accounts = vec![acct("a"), bad, dangling];
        let out = config(&r).unwrap();
        let ids: Vec<_> = out.iter().map(|x| x.r#ref.as_ref().unwrap().id.as_str()).collect();
        assert_eq!(ids, ["b", "c"]);
        assert!(out.iter().all(|x| !x.error.contains("secret")));
        assert!(out[1].error.contains("unknown group nope"), "{}", out[1].error);
    }

    #[test]
    fn structural_faults_refuse_the_whole_config() {
        let mut r = base();
        r.accounts = vec![acct("a"), acct("a")];
        assert!(matches!(config(&r), Err(StructuralError::DuplicateId { .. })));
        let mut r = base();
        r.settings = None;
        assert_eq!(config(&r), Err(StructuralError::NoHashSecret));
    }

    #[test]
    fn accounts_need_a_usable_url_credential_and_weight() {
        let mut a = acct("a");
        assert_eq!(account(&a), Ok(()));
        a.base_url = "api.anthropic.com".into();
        assert!(matches!(account(&a), Err(ResourceError::BaseUrl(_))));
        let mut a = acct("a");
        a.credential = "sk\nx".into();
        assert_eq!(account(&a), Err(ResourceError::Credential));
        let mut a = acct("a");
        a.weight = 0;
        assert_eq!(account(&a), Err(ResourceError::ZeroWeight));
        a.status = pb::AccountStatus::Disabled as i32;
        assert_eq!(account(&a), Ok(()));
    }
}
