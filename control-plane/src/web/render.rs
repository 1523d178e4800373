//! Rendering: the minijinja templates (files in `templates/`, compiled in; HTML auto-escaped),
//! the static assets, the security headers every answer carries, and the formatting helpers the
//! pages share.

use super::WebError;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use minijinja::{context, Environment, Value};

const TEMPLATES: &[(&str, &str)] = &[
    ("base.html", include_str!("templates/base.html")),
    ("error.html", include_str!("templates/error.html")),
    ("signin.html", include_str!("templates/signin.html")),
    ("overview.html", include_str!("templates/overview.html")),
    ("keys.html", include_str!("templates/keys.html")),
    ("accounts.html", include_str!("templates/accounts.html")),
    ("me.html", include_str!("templates/me.html")),
    ("requests.html", include_str!("templates/requests.html")),
    ("request.html", include_str!("templates/request.html")),
    ("groups.html", include_str!("templates/groups.html")),
    ("usage.html", include_str!("templates/usage.html")),
    ("audit.html", include_str!("templates/audit.html")),
    ("settings.html", include_str!("templates/settings.html")),
    ("planes.html", include_str!("templates/planes.html")),
    ("oauth.html", include_str!("templates/oauth.html")),
];

pub const CSS: &str = include_str!("static/console.css");
pub const JS: &str = include_str!("static/console.js");
pub const FAVICON: &str = include_str!("static/favicon.svg");

/// The compiled templates.
pub struct Views {
    env: Environment<'static>,
}

impl Views {
    pub fn new() -> Result<Self, WebError> {
        let mut env = Environment::new();
        for (name, src) in TEMPLATES {
            env.add_template(name, src)
                .map_err(|e| WebError::Templates(format!("{name}: {e}")))?;
        }
        Ok(Self { env })
    }

    /// `name` rendered with `ctx`, answered with `status`.
    pub fn page(&self, status: StatusCode, name: &str, ctx: Value) -> Response {
        match self.env.get_template(name).and_then(|t| t.render(ctx)) {
            Ok(html) => (status, Html(html)).into_response(),
            Err(e) => {
                tracing::error!(template = name, error = %e, "console page failed to render");
                (StatusCode::INTERNAL_SERVER_ERROR, "the page failed to render").into_response()
            }
        }
    }

    /// An error page saying `message`.
    pub fn error(&self, status: StatusCode, message: &str) -> Response {
        self.page(
            status,
            "error.html",
            context! { title => "Error", status => status.as_u16(), message => message },
        )
    }
}

/// The headers every console answer carries: a CSP allowing only relay's own script and style
/// (no inline script), no framing, no sniffing, no referrer to other sites, no caching of pages.
pub async fn security_headers(mut res: Response) -> Response {
    let h = res.headers_mut();
    let set = |h: &mut axum::http::HeaderMap, k: &'static str, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(
        h,
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; \
         base-uri 'none'; frame-ancestors 'none'",
    );
    set(h, "x-frame-options", "DENY");
    set(h, "x-content-type-options", "nosniff");
    set(h, "referrer-policy", "same-origin");
    if !h.contains_key(header::CACHE_CONTROL) {
        set(h, "cache-control", "no-store");
    }
    res
}

/// A static asset.
pub fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// Pico-USD as dollars ("$1.2345").
pub fn usd_pico(pico: u64) -> String {
    format!("${:.4}", pico as f64 / 1e12)
}

/// Micro-USD as dollars, "—" for 0 (no budget).
pub fn usd_micro_budget(micro: u64) -> String {
    if micro == 0 {
        "—".into()
    } else {
        format!("${:.2}", micro as f64 / 1e6)
    }
}

/// A limit, "—" for 0 (unlimited).
pub fn limit(v: u64) -> String {
    if v == 0 {
        "—".into()
    } else {
        v.to_string()
    }
}

/// Unix ms as UTC time, "—" for 0.
pub fn time(ms: i64) -> String {
    if ms <= 0 {
        return "—".into();
    }
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| "—".into())
}

/// How long ago `ms` was ("12s ago"), "never" for 0.
pub fn ago(ms: i64, now: i64) -> String {
    if ms <= 0 {
        return "never".into();
    }
    let s = (now - ms).max(0) / 1000;
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86_399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

/// How long until `ms` ("in 3m"), "" for 0.
pub fn until(ms: i64, now: i64) -> String {
    if ms <= 0 {
        return String::new();
    }
    let s = (ms - now).max(0) / 1000;
    match s {
        0..=59 => format!("in {s}s"),
        60..=3599 => format!("in {}m", s / 60),
        3600..=86_399 => format!("in {}h", s / 3600),
        _ => format!("in {}d", s / 86_400),
    }
}

/// A time a filter form takes, as unix ms: empty (None), a span ago ("30m", "24h", "7d"), an
/// RFC 3339 instant, or a date and time in UTC as a `datetime-local` field sends it
/// ("2026-12-04T10:00").
pub fn parse_when(s: &str, now: i64) -> Result<Option<i64>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    let unit = match s.chars().last() {
        Some('s') => Some(1_000),
        Some('m') => Some(60_000),
        Some('h') => Some(3_600_000),
        Some('d') => Some(86_400_000),
        _ => None,
    };
    if let (Some(unit), Ok(n)) = (unit, s[..s.len() - 1].parse::<i64>()) {
        if (0..=100_000).contains(&n) {
            return Ok(Some(now - n * unit));
        }
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(Some(t.timestamp_millis()));
    }
    for f in [
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%d %H:%M:%S",
    ] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, f) {
            return Ok(Some(t.and_utc().timestamp_millis()));
        }
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).map(|t| t.and_utc().timestamp_millis()));
    }
    Err(format!(
        "{s:?} is not a time: give a span ago (30m, 24h, 7d), a UTC date and time (2026-12-04T10:00) or RFC 3339"
    ))
}

/// Milliseconds as a person reads them ("850 ms", "2.4 s").
pub fn millis(ms: u64) -> String {
    if ms < 1_000 {
        format!("{ms} ms")
    } else {
        format!("{:.1} s", ms as f64 / 1e3)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_template_compiles_and_escapes() {
        let v = Views::new().unwrap();
        let r = v.error(StatusCode::BAD_REQUEST, "<script>x</script>");
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn money_and_time_read_as_a_person_writes_them() {
        assert_eq!(usd_pico(1_500_000_000_000), "$1.5000");
        assert_eq!(usd_micro_budget(0), "—");
        assert_eq!(usd_micro_budget(2_500_000), "$2.50");
        assert_eq!(ago(0, 5), "never");
        assert_eq!(ago(1_000, 121_000), "2m ago");
        assert_eq!(until(61_000, 1_000), "in 1m");
        assert_eq!(time(0), "—");
    }

    #[test]
    fn filter_times_take_spans_dates_and_rfc3339() {
        let now = 10 * 86_400_000;
        assert_eq!(parse_when("", now), Ok(None));
        assert_eq!(parse_when("24h", now), Ok(Some(9 * 86_400_000)));
        assert_eq!(parse_when("7d", now), Ok(Some(3 * 86_400_000)));
        assert_eq!(parse_when("1970-01-02T00:00", now), Ok(Some(86_400_000)));
        assert_eq!(parse_when("1970-01-02T00:00:00Z", now), Ok(Some(86_400_000)));
        assert_eq!(parse_when("1970-01-03", now), Ok(Some(2 * 86_400_000)));
        assert!(parse_when("yesterday", now).unwrap_err().contains("not a time"));
        assert_eq!(millis(850), "850 ms");
        assert_eq!(millis(2_400), "2.4 s");
    }
}
