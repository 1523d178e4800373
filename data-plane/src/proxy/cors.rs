//! CORS for browser clients of the Messages API, off unless `cors.allowed_origins` is set (exact
//! origins, or `*`).
//!
//! When it is set, on `/v1/messages`, `/v1/messages/count_tokens` and `/v1/models` (and
//! `/v1/models/{id}`):
//! - a preflight (`OPTIONS` with an `Origin`) is answered here, without a key: `204` with the
//!   origin echoed when it is allowed, `403` (`permission_error`, no CORS headers) when it is not;
//! - every answer to an allowed origin, errors and event streams included, carries
//!   `Access-Control-Allow-Origin` (the origin echoed, also for `*`) and
//!   `Access-Control-Expose-Headers` (relay's and the upstream's request ids, retry hints, the
//!   `anthropic-ratelimit-*` and `x-relay-*` headers present);
//! - every answer carries `Vary: Origin`;
//! - a request from an origin that is not allowed is served as before, without CORS headers (the
//!   browser then keeps the answer from the page).
//!
//! No credentials mode: keys travel in headers, never in cookies, so
//! `Access-Control-Allow-Credentials` is never sent. When the setting is unset, nothing here
//! applies and relay answers exactly as it does without CORS.

use crate::errors::{full, ApiError, Body};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use relay_proto::settings::{self, AllowedOrigins};
use std::collections::BTreeMap;

/// The setting that turns CORS on.
pub const KEY: &str = "cors.allowed_origins";

/// The methods a preflight allows.
const ALLOW_METHODS: &str = "POST, GET, OPTIONS";
/// The request headers a preflight always allows (what the SDKs and Claude's own clients send).
const ALLOW_HEADERS: &[&str] = &[
    "accept",
    "anthropic-beta",
    "anthropic-dangerous-direct-browser-access",
    "anthropic-version",
    "authorization",
    "content-type",
    "request-id",
    "x-api-key",
    "x-request-id",
];
/// Request headers allowed besides, by prefix, when a preflight asks for them: the SDKs' own
/// `x-stainless-*` and any other `anthropic-*`.
const ALLOW_HEADER_PREFIXES: &[&str] = &["x-stainless-", "anthropic-"];
/// At most this many prefix-allowed headers are echoed from one preflight.
const MAX_ECHOED_HEADERS: usize = 32;
/// How long a browser may keep a preflight's answer, in seconds (Chromium keeps it at most 2 h).
const MAX_AGE_SECS: &str = "7200";
/// Response headers a page may always read.
const EXPOSE_HEADERS: &[&str] = &[
    "request-id",
    "x-upstream-request-id",
    "retry-after",
    "retry-after-ms",
    "x-should-retry",
];
/// Response headers a page may read when present, by prefix.
const EXPOSE_HEADER_PREFIXES: &[&str] = &["anthropic-ratelimit-", "x-relay-"];

static ACRPN: HeaderName = HeaderName::from_static("access-control-request-private-network");
static ACAPN: HeaderName = HeaderName::from_static("access-control-allow-private-network");

/// Which browser origins may call the Messages API (`cors.allowed_origins`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Cors {
    /// Unset (or a stored value that no longer parses): no CORS at all.
    #[default]
    Off,
    /// `*`: every origin.
    Any,
    /// These exact origins (lowercase).
    Only(Vec<String>),
}

/// What CORS makes of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// CORS is off, or the path is not one CORS covers: nothing changes.
    Off,
    /// On, but the request names no origin (not a browser's cross-origin call).
    NoOrigin,
    /// From an allowed origin: echoed in `Access-Control-Allow-Origin`.
    Allowed(HeaderValue),
    /// From an origin that is not allowed (as sent, cut short, for the error message).
    Denied(String),
}

impl Cors {
    pub fn from_settings(values: &BTreeMap<String, String>) -> Self {
        match values.get(KEY).map(|v| settings::parse_origins(v)) {
            Some(Ok(AllowedOrigins::Any)) => Cors::Any,
            Some(Ok(AllowedOrigins::List(l))) => Cors::Only(l),
            _ => Cors::Off,
        }
    }

    pub fn is_on(&self) -> bool {
        !matches!(self, Cors::Off)
    }

    fn allows(&self, origin: &str) -> bool {
        match self {
            Cors::Off => false,
            Cors::Any => true,
            Cors::Only(list) => list.iter().any(|o| o.eq_ignore_ascii_case(origin)),
        }
    }

    /// The verdict for a request to `path` carrying `headers`.
    pub fn judge(&self, path: &str, headers: &HeaderMap) -> Verdict {
        if !self.is_on() || !covers(path) {
            return Verdict::Off;
        }
        match headers.get(header::ORIGIN) {
            None => Verdict::NoOrigin,
            Some(o) if o.to_str().is_ok_and(|s| self.allows(s.trim())) => Verdict::Allowed(o.clone()),
            Some(o) => Verdict::Denied(String::from_utf8_lossy(o.as_bytes()).chars().take(100).collect()),
        }
    }
}

/// The paths CORS covers: the Messages API and the models list.
pub fn covers(path: &str) -> bool {
    matches!(path, "/v1/messages" | "/v1/messages/count_tokens" | "/v1/models") || path.starts_with("/v1/models/")
}

impl Verdict {
    /// A preflight with this verdict is answered by [`preflight`] (CORS on and an `Origin` sent).
    pub fn answers_preflight(&self) -> bool {
        matches!(self, Verdict::Allowed(_) | Verdict::Denied(_))
    }
}

/// The answer to a preflight (`OPTIONS`) whose verdict [`Verdict::answers_preflight`]: `204` with
/// the CORS headers for an allowed origin, `403` in the Anthropic error shape (and no CORS headers,
/// so the browser refuses the call) for another.
pub fn preflight(verdict: &Verdict, request: &HeaderMap, request_id: &str) -> Response<Body> {
    let origin = match verdict {
        Verdict::Allowed(o) => o.clone(),
        Verdict::Denied(shown) => {
            tracing::debug!(origin = %shown, "CORS preflight from an origin not in cors.allowed_origins");
            let mut r = ApiError::permission(format!(
                "origin {shown:?} may not call this relay from a browser (it is not in cors.allowed_origins)"
            ))
            .into_response(request_id);
            add_vary(r.headers_mut(), "Origin");
            return r;
        }
        Verdict::Off | Verdict::NoOrigin => {
            return ApiError::internal("not a CORS preflight").into_response(request_id);
        }
    };
    let mut r = Response::new(full(bytes::Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    let h = r.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(ALLOW_METHODS),
    );
    if let Ok(v) = HeaderValue::from_str(&allow_headers(request)) {
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v);
    }
    h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static(MAX_AGE_SECS));
    // A relay inside a private network called from a public page (Chromium's Private Network
    // Access): the operator allowed the origin, so the page may reach it.
    if request
        .get(&ACRPN)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"))
    {
        h.insert(ACAPN.clone(), HeaderValue::from_static("true"));
    }
    add_vary(
        h,
        "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
    );
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert("request-id", v);
    }
    r
}

/// `Access-Control-Allow-Headers`: the fixed list, plus the prefix-allowed headers the preflight
/// asked for (`Access-Control-Request-Headers`).
fn allow_headers(request: &HeaderMap) -> String {
    let mut out: Vec<String> = ALLOW_HEADERS.iter().map(|s| s.to_string()).collect();
    let asked = request
        .get_all(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase());
    let mut echoed = 0;
    for name in asked {
        if echoed >= MAX_ECHOED_HEADERS {
            break;
        }
        let ok = name.len() <= 64
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && ALLOW_HEADER_PREFIXES.iter().any(|p| name.starts_with(p))
            && !out.contains(&name);
        if ok {
            out.push(name);
            echoed += 1;
        }
    }
    out.join(", ")
}

/// Adds what CORS puts on an actual answer: `Vary: Origin` whenever CORS is on for the path, and
/// for an allowed origin `Access-Control-Allow-Origin` and `Access-Control-Expose-Headers`.
pub fn decorate(verdict: &Verdict, resp: &mut Response<Body>) {
    if matches!(verdict, Verdict::Off) {
        return;
    }
    let h = resp.headers_mut();
    add_vary(h, "Origin");
    if let Verdict::Allowed(origin) = verdict {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        if let Ok(v) = HeaderValue::from_str(&expose_headers(h)) {
            h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v);
        }
    }
}

/// The fixed names, then every present header with an exposed prefix.
fn expose_headers(h: &HeaderMap) -> String {
    let mut out: Vec<&str> = EXPOSE_HEADERS.to_vec();
    for name in h.keys() {
        let n = name.as_str();
        if EXPOSE_HEADER_PREFIXES.iter().any(|p| n.starts_with(p)) && !out.contains(&n) {
            out.push(n);
        }
    }
    out.join(", ")
}

/// Appends `value` to `Vary` unless it already names `Origin`.
fn add_vary(h: &mut HeaderMap, value: &'static str) {
    let has_origin = h
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim().eq_ignore_ascii_case("origin") || v.trim() == "*");
    if !has_origin {
        h.append(header::VARY, HeaderValue::from_static(value));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn cors(v: &str) -> Cors {
        Cors::from_settings(&[(KEY.to_string(), v.to_string())].into())
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn get<'a>(r: &'a Response<Body>, name: &str) -> Option<&'a str> {
        r.headers().get(name).map(|v| v.to_str().unwrap())
    }

    #[test]
    fn settings_turn_it_on_and_a_bad_value_leaves_it_off() {
        assert_eq!(Cors::from_settings(&BTreeMap::new()), Cors::Off);
        assert_eq!(cors("*"), Cors::Any);
        assert_eq!(
            cors("https://App.example, http://localhost:5173"),
            Cors::Only(vec!["https://app.example".into(), "http://localhost:5173".into()])
        );
        // A stored value that no longer parses reads as the default: off.
        assert_eq!(cors("https://app.example/"), Cors::Off);
        assert_eq!(cors(""), Cors::Off);
        assert!(!Cors::Off.is_on() && Cors::Any.is_on());
    }

    #[test]
    fn verdicts_by_path_and_origin() {
        let c = cors("https://app.example");
        let from = |o: &str| headers(&[("origin", o)]);
        assert_eq!(
            c.judge("/v1/messages", &from("https://app.example")),
            Verdict::Allowed(HeaderValue::from_static("https://app.example"))
        );
        // Browsers send lowercase; an operator's capitals do not matter either way.
        assert!(matches!(
            c.judge("/v1/messages", &from("https://APP.example")),
            Verdict::Allowed(_)
        ));
        for path in ["/v1/messages/count_tokens", "/v1/models", "/v1/models/claude-x"] {
            assert!(
                matches!(c.judge(path, &from("https://app.example")), Verdict::Allowed(_)),
                "{path}"
            );
        }
        assert_eq!(
            c.judge("/v1/messages", &from("https://evil.example")),
            Verdict::Denied("https://evil.example".into())
        );
        assert_eq!(
            c.judge("/v1/messages", &from("https://app.example:8443")),
            Verdict::Denied("https://app.example:8443".into())
        );
        assert_eq!(c.judge("/v1/messages", &HeaderMap::new()), Verdict::NoOrigin);
        assert_eq!(c.judge("/relay/v1/key", &from("https://app.example")), Verdict::Off);
        assert_eq!(c.judge("/healthz", &from("https://app.example")), Verdict::Off);
        assert_eq!(
            Cors::Off.judge("/v1/messages", &from("https://app.example")),
            Verdict::Off
        );
        assert!(matches!(
            cors("*").judge("/v1/messages", &from("https://anything.example")),
            Verdict::Allowed(_)
        ));
        assert!(Verdict::Denied(String::new()).answers_preflight());
        assert!(!Verdict::NoOrigin.answers_preflight() && !Verdict::Off.answers_preflight());
    }

    #[test]
    fn an_allowed_preflight_gets_every_cors_header() {
        let c = cors("https://app.example");
        let req = headers(&[
            ("origin", "https://app.example"),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "anthropic-version, content-type, x-api-key, x-stainless-os, X-Stainless-Lang, anthropic-future, x-evil, x-stainless-bad_name",
            ),
        ]);
        let r = preflight(&c.judge("/v1/messages", &req), &req, "req_1");
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        assert_eq!(get(&r, "access-control-allow-origin"), Some("https://app.example"));
        assert_eq!(get(&r, "access-control-allow-methods"), Some("POST, GET, OPTIONS"));
        assert_eq!(get(&r, "access-control-max-age"), Some("7200"));
        let allowed: Vec<&str> = get(&r, "access-control-allow-headers").unwrap().split(", ").collect();
        for n in [
            "anthropic-version",
            "x-api-key",
            "authorization",
            "anthropic-beta",
            "anthropic-dangerous-direct-browser-access",
            "content-type",
            "x-request-id",
            "request-id",
            "x-stainless-os",
            "x-stainless-lang",
            "anthropic-future",
        ] {
            assert!(allowed.contains(&n), "{n} in {allowed:?}");
        }
        assert!(
            !allowed.contains(&"x-evil") && !allowed.iter().any(|n| n.contains('_')),
            "{allowed:?}"
        );
        assert!(get(&r, "vary").unwrap().starts_with("Origin"));
        assert_eq!(get(&r, "request-id"), Some("req_1"));
        assert!(r.headers().get("access-control-allow-credentials").is_none());
        assert!(r.headers().get("access-control-allow-private-network").is_none());

        let mut pna = req.clone();
        pna.insert(ACRPN.clone(), HeaderValue::from_static("true"));
        let r = preflight(&c.judge("/v1/messages", &pna), &pna, "req_2");
        assert_eq!(get(&r, "access-control-allow-private-network"), Some("true"));
    }

    #[tokio::test]
    async fn a_disallowed_preflight_is_refused_without_cors_headers() {
        let c = cors("https://app.example");
        let req = headers(&[
            ("origin", "https://evil.example"),
            ("access-control-request-method", "POST"),
        ]);
        let r = preflight(&c.judge("/v1/messages", &req), &req, "req_1");
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert!(r.headers().keys().all(|k| !k.as_str().starts_with("access-control-")));
        assert_eq!(get(&r, "vary"), Some("Origin"));
        let body = crate::proxy::body_bytes(r.into_body()).await.unwrap();
        let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(j["type"], "error");
        assert_eq!(j["error"]["type"], "permission_error");
        assert!(j["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\"https://evil.example\""));
        assert_eq!(j["request_id"], "req_1");
    }

    #[test]
    fn answers_to_allowed_origins_carry_allow_origin_and_expose_headers() {
        let c = cors("*");
        let req = headers(&[("origin", "http://localhost:5173")]);
        let mut r = Response::new(full("{}"));
        r.headers_mut().insert("request-id", HeaderValue::from_static("req_1"));
        r.headers_mut()
            .insert("anthropic-ratelimit-requests-remaining", HeaderValue::from_static("9"));
        r.headers_mut()
            .insert("x-relay-estimate", HeaderValue::from_static("true"));
        r.headers_mut()
            .insert("vary", HeaderValue::from_static("accept-encoding"));
        decorate(&c.judge("/v1/messages", &req), &mut r);
        assert_eq!(get(&r, "access-control-allow-origin"), Some("http://localhost:5173"));
        let exposed: Vec<&str> = get(&r, "access-control-expose-headers").unwrap().split(", ").collect();
        for n in [
            "request-id",
            "x-upstream-request-id",
            "retry-after",
            "x-should-retry",
            "anthropic-ratelimit-requests-remaining",
            "x-relay-estimate",
        ] {
            assert!(exposed.contains(&n), "{n} in {exposed:?}");
        }
        let vary: Vec<&str> = r
            .headers()
            .get_all("vary")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(vary, ["accept-encoding", "Origin"]);
        // Decorating twice does not repeat Vary.
        decorate(&c.judge("/v1/messages", &req), &mut r);
        assert_eq!(r.headers().get_all("vary").iter().count(), 2);
    }

    #[test]
    fn others_get_vary_only_and_off_changes_nothing() {
        let c = cors("https://app.example");
        for req in [headers(&[("origin", "https://evil.example")]), HeaderMap::new()] {
            let mut r = Response::new(full("{}"));
            decorate(&c.judge("/v1/messages", &req), &mut r);
            assert_eq!(get(&r, "vary"), Some("Origin"));
            assert!(r.headers().keys().all(|k| !k.as_str().starts_with("access-control-")));
        }
        let mut r = Response::new(full("{}"));
        let req = headers(&[("origin", "https://app.example")]);
        decorate(&Cors::Off.judge("/v1/messages", &req), &mut r);
        decorate(&c.judge("/relay/v1/key", &req), &mut r);
        assert!(r.headers().is_empty());
    }
}
