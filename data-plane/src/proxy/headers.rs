//! Headers stage: what an attempt sends upstream (the client's headers without its key, its
//! cookies, hop-by-hop and network-identifying headers; the account's credential;
//! `accept-encoding: identity`) and what the client gets back (relay's own framing, a bounded
//! set of the upstream's headers, relay's `request-id` and `retry-after`).

use crate::control::state::{AccountEntry, AccountKind};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use std::time::Duration;

/// The beta every OAuth (subscription) call needs.
pub const OAUTH_BETA: &str = "oauth-2025-04-20";

static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
static ANTHROPIC_BETA: HeaderName = HeaderName::from_static("anthropic-beta");
static REQUEST_ID: HeaderName = HeaderName::from_static("request-id");
static X_UPSTREAM_REQUEST_ID: HeaderName = HeaderName::from_static("x-upstream-request-id");

/// Response headers that identify the upstream organisation: never shown to clients.
static UPSTREAM_IDENTITY: [HeaderName; 2] = [
    HeaderName::from_static("anthropic-organization-id"),
    HeaderName::from_static("x-organization-uuid"),
];

/// Client headers never sent upstream: hop-by-hop ones, the client's key and framing, its
/// cookies, the browser's `Origin`, the client's trace context (the upstream sees relay's own
/// only with `tracing.propagate_upstream`), and `accept-encoding` (relay asks for `identity`).
/// Matched on the (lower-case) name, no hashing or parsing per header.
fn never_forwarded(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "x-api-key"
            | "authorization"
            | "content-length"
            | "cookie"
            | "origin"
            | "traceparent"
            | "tracestate"
            | "accept-encoding"
    )
}

/// Request headers that tell an upstream about the client's network: sent only with
/// `headers.forward_client_ip`.
fn client_network(name: &str) -> bool {
    matches!(name, "forwarded" | "x-real-ip" | "via" | "true-client-ip") || name.starts_with("x-forwarded-")
}

/// The headers sent upstream for one attempt: the client's, without its key, its cookies, hop-by-hop
/// headers (and those its `Connection` names), its `Origin` and trace context, and (unless
/// `forward_client_ip`) what identifies its network (`x-forwarded-*`, `forwarded`, `x-real-ip`,
/// `via`); with the account's credential and `accept-encoding: identity`. Other headers pass
/// (Claude Code and the SDKs send their own `anthropic-*`, `x-stainless-*`, `x-app`,
/// `user-agent`, which upstreams may rely on). One pass over the client's headers: each is
/// kept or not by its name, nothing copied to be removed again.
pub fn upstream_headers(client: &HeaderMap, account: &AccountEntry, forward_client_ip: bool) -> HeaderMap {
    let oauth = account.kind == AccountKind::OAuth;
    // Headers the client's `Connection` lists are hop-by-hop too (rare: parsed only then).
    let listed: Vec<HeaderName> = client
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    let mut h = HeaderMap::with_capacity(client.len() + 2);
    for (name, value) in client {
        let n = name.as_str();
        if never_forwarded(n)
            || (!forward_client_ip && client_network(n))
            || (oauth && name == ANTHROPIC_BETA)
            || (!listed.is_empty() && listed.contains(name))
        {
            continue;
        }
        h.append(name.clone(), value.clone());
    }
    h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    match account.kind {
        AccountKind::ApiKey | AccountKind::Compatible => {
            h.insert(X_API_KEY.clone(), account.credential.clone());
        }
        AccountKind::OAuth => {
            h.insert(header::AUTHORIZATION, account.bearer.clone());
            let listed_beta = listed.contains(&ANTHROPIC_BETA);
            let mut betas: Vec<String> = client
                .get_all(&ANTHROPIC_BETA)
                .iter()
                .filter(|_| !listed_beta)
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
            if !betas.iter().any(|b| b == OAUTH_BETA) {
                betas.push(OAUTH_BETA.to_string());
            }
            if let Ok(v) = HeaderValue::from_str(&betas.join(",")) {
                h.insert(ANTHROPIC_BETA.clone(), v);
            }
        }
    }
    h
}

/// Most bytes of upstream response headers (names and values) passed on to a client.
pub const MAX_CLIENT_HEADER_BYTES: usize = 16 * 1024;
/// Longest single upstream header value passed on.
pub const MAX_CLIENT_HEADER_VALUE: usize = 4 * 1024;
/// Most upstream response headers passed on.
pub const MAX_CLIENT_HEADERS: usize = 64;

static X_SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");

/// Upstream response headers a client may see: what the Anthropic API sends that SDKs and Claude
/// Code read (`content-type`, `anthropic-*` headers, `x-should-retry`, `cache-control`); the
/// account's own `anthropic-ratelimit-*` only with `headers.expose_ratelimit` (they describe one
/// pooled account, not the client's key). Everything else (`location`, `set-cookie`, a CDN's or proxy's own headers,
/// framing and coding headers, which relay derives from what it sends) stays behind; `retry-after`
/// is relay's own, bounded value ([`client_retry_after`]); `request-id` is renamed.
fn forwardable(name: &HeaderName, expose_ratelimit: bool) -> bool {
    let n = name.as_str();
    name == header::CONTENT_TYPE
        || name == header::CACHE_CONTROL
        || name == X_SHOULD_RETRY
        || (n.starts_with("anthropic-")
            && !UPSTREAM_IDENTITY.contains(name)
            && (expose_ratelimit || !n.starts_with("anthropic-ratelimit-")))
}

/// The headers the client gets back: the allowed upstream headers within
/// [`MAX_CLIENT_HEADERS`], [`MAX_CLIENT_HEADER_VALUE`] and [`MAX_CLIENT_HEADER_BYTES`], the
/// upstream's `request-id` as `x-upstream-request-id`, relay's `request-id`.
pub fn client_headers(upstream: &HeaderMap, request_id: &str, expose_ratelimit: bool) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(upstream.len().min(MAX_CLIENT_HEADERS) + 2);
    let mut bytes = 0usize;
    let mut dropped = 0u64;
    for (name, value) in upstream {
        if !forwardable(name, expose_ratelimit) {
            continue;
        }
        let size = name.as_str().len() + value.len();
        if value.len() > MAX_CLIENT_HEADER_VALUE
            || bytes + size > MAX_CLIENT_HEADER_BYTES
            || h.len() >= MAX_CLIENT_HEADERS
        {
            dropped += 1;
            continue;
        }
        bytes += size;
        h.append(name.clone(), value.clone());
    }
    if dropped > 0 {
        metrics::counter!(relay_proto::metrics::UPSTREAM_HEADERS_DROPPED_TOTAL).increment(dropped);
    }
    if let Some(up) = upstream.get(&REQUEST_ID).filter(|v| v.len() <= 256) {
        h.insert(X_UPSTREAM_REQUEST_ID.clone(), up.clone());
    }
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert(REQUEST_ID.clone(), v);
    }
    h
}

/// The longest `retry-after` relay tells a client, in seconds.
pub const MAX_CLIENT_RETRY_AFTER_SECS: u64 = 3600;

/// relay's own `retry-after` for a client: whole seconds, at least 1, at most
/// [`MAX_CLIENT_RETRY_AFTER_SECS`] (an upstream's date in 2099 or a 20-digit value is not passed on).
pub fn client_retry_after(d: Duration) -> HeaderValue {
    HeaderValue::from(d.as_secs().clamp(1, MAX_CLIENT_RETRY_AFTER_SECS))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::control::state::{AccountEntry, AccountKind};

    /// The filter as it was written before (a copy of the client's map, then every name
    /// removed), kept as the reference the one-pass filter must agree with.
    fn reference(client: &HeaderMap, account: &AccountEntry, forward_client_ip: bool) -> HeaderMap {
        let mut h = client.clone();
        if h.contains_key(header::CONNECTION) {
            let listed: Vec<HeaderName> = h
                .get_all(header::CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
                .collect();
            for n in listed {
                h.remove(n);
            }
        }
        for n in [
            "connection",
            "keep-alive",
            "proxy-authenticate",
            "proxy-authorization",
            "proxy-connection",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "host",
            "x-api-key",
            "authorization",
            "content-length",
            "cookie",
        ] {
            h.remove(n);
        }
        if !forward_client_ip {
            for n in ["forwarded", "x-real-ip", "via", "true-client-ip"] {
                h.remove(n);
            }
            let forwarded: Vec<HeaderName> = h
                .keys()
                .filter(|n| n.as_str().starts_with("x-forwarded-"))
                .cloned()
                .collect();
            for n in forwarded {
                h.remove(n);
            }
        }
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        match account.kind {
            AccountKind::ApiKey | AccountKind::Compatible => {
                h.insert(X_API_KEY.clone(), account.credential.clone());
            }
            AccountKind::OAuth => {
                h.insert(header::AUTHORIZATION, account.bearer.clone());
                let mut betas: Vec<String> = h
                    .get_all(&ANTHROPIC_BETA)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(','))
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect();
                if !betas.iter().any(|b| b == OAUTH_BETA) {
                    betas.push(OAUTH_BETA.to_string());
                }
                h.insert(ANTHROPIC_BETA.clone(), HeaderValue::from_str(&betas.join(",")).unwrap());
            }
        }
        // What attempt.rs removed after it.
        for n in ["origin", "traceparent", "tracestate"] {
            h.remove(n);
        }
        h
    }

    fn sorted(h: &HeaderMap) -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = h.iter().map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())).collect();
        v.sort();
        v
    }

    #[test]
    fn the_one_pass_filter_sends_what_the_reference_sent() {
        let clients: Vec<Vec<(&str, &str)>> = vec![
            vec![
                ("host", "relay:8080"),
                ("x-api-key", "rk-client"),
                ("anthropic-version", "2023-06-01"),
                ("content-type", "application/json"),
                ("content-length", "131"),
                ("user-agent", "claude-cli/2.0"),
                ("x-stainless-lang", "js"),
                ("accept-encoding", "gzip, br"),
                ("accept", "application/json"),
            ],
            vec![
                ("authorization", "Bearer rk-client"),
                ("cookie", "a=b"),
                ("origin", "https://app.example"),
                ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
                ("tracestate", "x=y"),
                ("x-forwarded-for", "10.0.0.1"),
                ("x-forwarded-proto", "https"),
                ("forwarded", "for=10.0.0.1"),
                ("x-real-ip", "10.0.0.1"),
                ("via", "1.1 lb"),
                ("true-client-ip", "10.0.0.1"),
                ("anthropic-beta", "prompt-caching-2024-07-31, oauth-2025-04-20"),
                ("anthropic-beta", "files-api-2025-04-14"),
            ],
            vec![
                ("connection", "keep-alive, x-secret-hop, anthropic-beta"),
                ("x-secret-hop", "1"),
                ("keep-alive", "timeout=5"),
                ("te", "trailers"),
                ("proxy-authorization", "Basic x"),
                ("proxy-connection", "keep-alive"),
                ("upgrade", "h2c"),
                ("transfer-encoding", "chunked"),
                ("anthropic-beta", "tools-2024-04-04"),
                ("x-app", "cli"),
            ],
        ];
        let account = |kind| AccountEntry {
            id: "a".into(),
            name: "a".into(),
            kind,
            base_url: "http://127.0.0.1:1".into(),
            credential: HeaderValue::from_static("sk-ant-account"),
            bearer: HeaderValue::from_static("Bearer sk-ant-oat-account"),
            priority: 0,
            weight: 1,
            enabled: true,
            max_concurrency: 0,
            proxy: None,
            reset_generation: 0,
        };
        let accounts = [
            account(AccountKind::ApiKey),
            account(AccountKind::OAuth),
            account(AccountKind::Compatible),
        ];
        for pairs in &clients {
            let mut client = HeaderMap::new();
            for (n, v) in pairs {
                client.append(
                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            for account in &accounts {
                for forward_client_ip in [false, true] {
                    assert_eq!(
                        sorted(&upstream_headers(&client, account, forward_client_ip)),
                        sorted(&reference(&client, account, forward_client_ip)),
                        "{pairs:?} {:?} forward_client_ip={forward_client_ip}",
                        account.kind
                    );
                }
            }
        }
    }
}
