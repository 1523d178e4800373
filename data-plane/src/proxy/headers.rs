//! Headers stage: what an attempt sends upstream (the client's headers without its key, its
//! cookies, hop-by-hop and network-identifying headers; the account's credential;
//! `accept-encoding: identity`) and what the client gets back (relay's own framing, a bounded
//! set of the upstream's headers, relay's `request-id` and `retry-after`).

use crate::control::state::{AccountEntry, AccountKind};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use std::time::Duration;

/// The beta every OAuth (subscription) call needs.
pub const OAUTH_BETA: &str = "oauth-2025-04-20";

/// Pre-parsed names (`from_static` is const): removing by `&str` would parse the
/// name again on every request.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
static ANTHROPIC_BETA: HeaderName = HeaderName::from_static("anthropic-beta");
static REQUEST_ID: HeaderName = HeaderName::from_static("request-id");
static X_UPSTREAM_REQUEST_ID: HeaderName = HeaderName::from_static("x-upstream-request-id");

/// Response headers that identify the upstream organisation: never shown to clients.
static UPSTREAM_IDENTITY: [HeaderName; 2] = [
    HeaderName::from_static("anthropic-organization-id"),
    HeaderName::from_static("x-organization-uuid"),
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
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
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
}

/// Request headers that tell an upstream about the client's network or browser session: never
/// sent upstream (the client IP ones only with `headers.forward_client_ip`).
static CLIENT_IDENTITY: [HeaderName; 2] = [header::COOKIE, HeaderName::from_static("proxy-authorization")];
static CLIENT_IP: [HeaderName; 4] = [
    header::FORWARDED,
    HeaderName::from_static("x-real-ip"),
    header::VIA,
    HeaderName::from_static("true-client-ip"),
];

/// The headers sent upstream for one attempt: the client's, without its key, its cookies, hop-by-hop
/// headers and (unless `forward_client_ip`) what identifies its network (`x-forwarded-*`,
/// `forwarded`, `x-real-ip`, `via`); with the account's credential. Other headers pass (Claude Code
/// and the SDKs send their own `anthropic-*`, `x-stainless-*`, `x-app`, `user-agent`, which
/// upstreams may rely on).
pub fn upstream_headers(client: &HeaderMap, account: &AccountEntry, forward_client_ip: bool) -> HeaderMap {
    let mut h = client.clone();
    strip_hop_by_hop(&mut h);
    h.remove(header::HOST);
    h.remove(&X_API_KEY);
    h.remove(header::AUTHORIZATION);
    h.remove(header::CONTENT_LENGTH);
    for n in &CLIENT_IDENTITY {
        h.remove(n);
    }
    if !forward_client_ip {
        for n in &CLIENT_IP {
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
