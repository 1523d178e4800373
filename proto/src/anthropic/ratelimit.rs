//! The one parser of Anthropic's rate-limit headers:
//!
//! - `retry-after-ms` (milliseconds), else `retry-after` (seconds, or an HTTP date): [`retry_after`];
//! - API-key accounts' `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}`
//!   (reset in RFC 3339): [`limits`], and the reset that matters for a refusal, [`limiting_reset`];
//! - subscription (OAuth) accounts' `anthropic-ratelimit-unified-*` (observed, not documented):
//!   `-status` (`allowed` | `allowed_warning` | `rejected`), `-reset` (unix seconds),
//!   `-{5h,7d}-{status,reset,utilization}`, `-representative-claim`: [`Unified`].
//!
//! Values are trimmed; an empty or unreadable one counts as absent. Nothing here allocates.

use http::header::HeaderName;
use http::HeaderMap;
use std::time::Duration;

/// What every rate-limit header's name starts with.
pub const PREFIX: &str = "anthropic-ratelimit-";

const RETRY_AFTER: HeaderName = HeaderName::from_static("retry-after");
const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");

/// (name, limit, remaining, reset) of each API-key limit.
static LIMITS: [(&str, HeaderName, HeaderName, HeaderName); 4] = [
    (
        "requests",
        HeaderName::from_static("anthropic-ratelimit-requests-limit"),
        HeaderName::from_static("anthropic-ratelimit-requests-remaining"),
        HeaderName::from_static("anthropic-ratelimit-requests-reset"),
    ),
    (
        "tokens",
        HeaderName::from_static("anthropic-ratelimit-tokens-limit"),
        HeaderName::from_static("anthropic-ratelimit-tokens-remaining"),
        HeaderName::from_static("anthropic-ratelimit-tokens-reset"),
    ),
    (
        "input-tokens",
        HeaderName::from_static("anthropic-ratelimit-input-tokens-limit"),
        HeaderName::from_static("anthropic-ratelimit-input-tokens-remaining"),
        HeaderName::from_static("anthropic-ratelimit-input-tokens-reset"),
    ),
    (
        "output-tokens",
        HeaderName::from_static("anthropic-ratelimit-output-tokens-limit"),
        HeaderName::from_static("anthropic-ratelimit-output-tokens-remaining"),
        HeaderName::from_static("anthropic-ratelimit-output-tokens-reset"),
    ),
];

const UNIFIED_STATUS: HeaderName = HeaderName::from_static("anthropic-ratelimit-unified-status");
const UNIFIED_RESET: HeaderName = HeaderName::from_static("anthropic-ratelimit-unified-reset");
const UNIFIED_CLAIM: HeaderName = HeaderName::from_static("anthropic-ratelimit-unified-representative-claim");
/// (window, utilization, reset, status) of each unified window.
const UNIFIED_WINDOWS: [(&str, HeaderName, HeaderName, HeaderName); 2] = [
    (
        "5h",
        HeaderName::from_static("anthropic-ratelimit-unified-5h-utilization"),
        HeaderName::from_static("anthropic-ratelimit-unified-5h-reset"),
        HeaderName::from_static("anthropic-ratelimit-unified-5h-status"),
    ),
    (
        "7d",
        HeaderName::from_static("anthropic-ratelimit-unified-7d-utilization"),
        HeaderName::from_static("anthropic-ratelimit-unified-7d-reset"),
        HeaderName::from_static("anthropic-ratelimit-unified-7d-status"),
    ),
];

/// A header's value, trimmed; `None` when absent, empty or not visible ASCII.
fn header<'h>(h: &'h HeaderMap, name: &HeaderName) -> Option<&'h str> {
    h.get(name)?.to_str().ok().map(str::trim).filter(|v| !v.is_empty())
}

/// How long the upstream asks a client to wait: `retry-after-ms`, else `retry-after` in seconds
/// (fractions allowed) or as an HTTP date (relative to `now_ms`; a date in the past is zero).
/// A negative or unreadable value is `None`.
pub fn retry_after(h: &HeaderMap, now_ms: i64) -> Option<Duration> {
    if let Some(v) = header(h, &RETRY_AFTER_MS).and_then(|v| v.parse::<f64>().ok()) {
        return seconds(v / 1000.0);
    }
    let v = header(h, &RETRY_AFTER)?;
    if let Ok(secs) = v.parse::<f64>() {
        return seconds(secs);
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?.timestamp_millis();
    Some(Duration::from_millis(
        u64::try_from(at.saturating_sub(now_ms)).unwrap_or(0),
    ))
}

/// The longest wait a `retry-after` is taken to ask for; a larger value (or one too large to count,
/// `99999999999999999999`) is this long, so it still means "a long time", not "no answer".
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(365 * 24 * 3600);

/// A non-negative number of seconds as a wait, at most [`RETRY_AFTER_MAX`]; negative or NaN: `None`.
fn seconds(secs: f64) -> Option<Duration> {
    if secs.is_nan() || secs < 0.0 {
        return None;
    }
    Some(Duration::try_from_secs_f64(secs).map_or(RETRY_AFTER_MAX, |d| d.min(RETRY_AFTER_MAX)))
}

/// One API-key limit's headers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    /// `requests`, `tokens`, `input-tokens` or `output-tokens`.
    pub name: &'static str,
    /// `…-reset`'s full header name (for a reason: "anthropic-ratelimit-tokens-reset").
    pub reset_header: &'static str,
    /// `…-limit`.
    pub limit: Option<u64>,
    /// `…-remaining`.
    pub remaining: Option<f64>,
    /// `…-reset`, RFC 3339, as unix ms.
    pub reset_ms: Option<i64>,
}

/// The four API-key limits, in the order requests, tokens, input tokens, output tokens (each with
/// whatever of its headers the answer carried).
pub fn limits(h: &HeaderMap) -> [Limit; 4] {
    LIMITS.each_ref().map(|(name, limit, remaining, reset)| Limit {
        name,
        reset_header: reset.as_str(),
        limit: header(h, limit).and_then(|v| v.parse::<u64>().ok()),
        remaining: header(h, remaining).and_then(|v| v.parse::<f64>().ok()),
        reset_ms: header(h, reset).and_then(rfc3339_ms),
    })
}

/// The API-key limit reset that explains a refusal (unix ms, and its header's name): the latest
/// among the limits with nothing remaining, else the latest given.
pub fn limiting_reset(h: &HeaderMap) -> Option<(i64, &'static str)> {
    let mut exhausted: Option<(i64, &'static str)> = None;
    let mut latest: Option<(i64, &'static str)> = None;
    for l in limits(h) {
        let Some(at) = l.reset_ms else {
            continue;
        };
        if latest.is_none_or(|(t, _)| at > t) {
            latest = Some((at, l.reset_header));
        }
        if l.remaining == Some(0.0) && exhausted.is_none_or(|(t, _)| at > t) {
            exhausted = Some((at, l.reset_header));
        }
    }
    exhausted.or(latest)
}

fn rfc3339_ms(v: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(v)
        .ok()
        .map(|d| d.timestamp_millis())
}

/// Unix seconds (as the unified headers give them) to unix ms; a value that is clearly already in
/// ms is taken as such. Zero, negative or unreadable: `None`.
fn unix_ms(v: &str) -> Option<i64> {
    let x = v.parse::<f64>().ok().filter(|x| x.is_finite() && *x > 0.0)?;
    let ms = if x > 1e11 { x } else { x * 1000.0 };
    Some(ms.min(i64::MAX as f64) as i64)
}

/// A utilization as a fraction (0 allowed): a value above 1 is a percentage. Not capped at 1.
fn utilization(v: &str) -> Option<f64> {
    let x = v.parse::<f64>().ok().filter(|x| x.is_finite() && *x >= 0.0)?;
    Some(if x > 1.0 { x / 100.0 } else { x })
}

/// One unified window (`5h`, `7d`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UnifiedWindow<'h> {
    /// `5h` or `7d`.
    pub name: &'static str,
    /// `-utilization` as a fraction (a value above 1 was a percentage; not capped).
    pub utilization: Option<f64>,
    /// `-reset`, unix ms.
    pub reset_ms: Option<i64>,
    /// `-status`, as sent.
    pub status: Option<&'h str>,
}

impl UnifiedWindow<'_> {
    /// Whether this window's status is `rejected`.
    pub fn rejected(&self) -> bool {
        self.status.is_some_and(|v| v.eq_ignore_ascii_case("rejected"))
    }

    /// Whether the answer carried anything readable about this window.
    pub fn present(&self) -> bool {
        self.utilization.is_some() || self.reset_ms.is_some() || self.status.is_some()
    }
}

/// A subscription account's unified rate-limit headers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Unified<'h> {
    /// `-status`, as sent.
    pub status: Option<&'h str>,
    /// `-reset`, unix ms.
    pub reset_ms: Option<i64>,
    /// `-representative-claim`, as sent (which window speaks for the account, e.g. `five_hour`).
    pub representative_claim: Option<&'h str>,
    /// The 5-hour and 7-day windows, in that order.
    pub windows: [UnifiedWindow<'h>; 2],
}

impl<'h> Unified<'h> {
    /// `None` when the answer carries no readable unified header at all (API-key accounts).
    pub fn parse(h: &'h HeaderMap) -> Option<Unified<'h>> {
        // Every unified header has this prefix: one pass over the names (most answers carry
        // none) instead of nine hashed lookups.
        if !h.keys().any(|n| n.as_str().starts_with("anthropic-ratelimit-unified-")) {
            return None;
        }
        let windows = UNIFIED_WINDOWS
            .each_ref()
            .map(|(name, util, reset, status)| UnifiedWindow {
                name,
                utilization: header(h, util).and_then(utilization),
                reset_ms: header(h, reset).and_then(unix_ms),
                status: header(h, status),
            });
        let u = Unified {
            status: header(h, &UNIFIED_STATUS),
            reset_ms: header(h, &UNIFIED_RESET).and_then(unix_ms),
            representative_claim: header(h, &UNIFIED_CLAIM),
            windows,
        };
        let any = u.status.is_some()
            || u.reset_ms.is_some()
            || u.representative_claim.is_some()
            || u.windows.iter().any(UnifiedWindow::present);
        any.then_some(u)
    }

    /// Whether the account-wide status is `rejected`.
    pub fn rejected(&self) -> bool {
        self.status.is_some_and(|v| v.eq_ignore_ascii_case("rejected"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000_000;

    /// Headers, and what they should read as.
    type Case = (&'static [(&'static str, &'static str)], Option<u64>);

    fn hm(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn retry_after_forms() {
        let cases: &[Case] = &[
            (&[("retry-after", "30")], Some(30_000)),
            (&[("retry-after", " 1.5 ")], Some(1_500)),
            (&[("retry-after-ms", "250")], Some(250)),
            // retry-after-ms wins over retry-after.
            (&[("retry-after", "30"), ("retry-after-ms", "2000")], Some(2_000)),
            // An HTTP date: relative to now; in the past it is zero.
            (&[("retry-after", "Tue, 14 Nov 2023 22:13:27 GMT")], Some(7_000)),
            (&[("retry-after", "Tue, 14 Nov 2023 22:00:00 GMT")], Some(0)),
            (&[("retry-after", "-5")], None),
            // Too large to count: the longest wait, not "nothing said".
            (
                &[("retry-after", "99999999999999999999")],
                Some(RETRY_AFTER_MAX.as_millis() as u64),
            ),
            (&[("retry-after-ms", "1e30")], Some(RETRY_AFTER_MAX.as_millis() as u64)),
            (&[("retry-after", "NaN")], None),
            (&[("retry-after", "soon")], None),
            (&[("retry-after", "")], None),
            (&[], None),
        ];
        for (headers, want) in cases {
            let got = retry_after(&hm(headers), NOW).map(|d| d.as_millis() as u64);
            assert_eq!(got, *want, "{headers:?}");
        }
    }

    #[test]
    fn api_key_limits_and_the_limiting_reset() {
        let h = hm(&[
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-ratelimit-requests-reset", "2023-11-14T22:13:30Z"),
            ("anthropic-ratelimit-tokens-limit", "40000"),
            ("anthropic-ratelimit-tokens-remaining", "12000"),
            ("anthropic-ratelimit-tokens-reset", "2023-11-14T22:14:20Z"),
            ("anthropic-ratelimit-output-tokens-reset", "not a date"),
        ]);
        let l = limits(&h);
        assert_eq!(l[0].name, "requests");
        assert_eq!(
            (l[0].limit, l[0].remaining, l[0].reset_ms),
            (Some(50), Some(0.0), Some(NOW + 10_000))
        );
        assert_eq!(
            (l[1].limit, l[1].remaining, l[1].reset_ms),
            (Some(40_000), Some(12_000.0), Some(NOW + 60_000))
        );
        assert_eq!(
            l[2],
            Limit {
                name: "input-tokens",
                reset_header: "anthropic-ratelimit-input-tokens-reset",
                limit: None,
                remaining: None,
                reset_ms: None
            }
        );
        assert_eq!(l[3].reset_ms, None);
        // The exhausted limit explains the refusal, though another resets later.
        assert_eq!(
            limiting_reset(&h),
            Some((NOW + 10_000, "anthropic-ratelimit-requests-reset"))
        );
        // None exhausted: the latest reset.
        let h = hm(&[
            ("anthropic-ratelimit-requests-reset", "2023-11-14T22:13:30Z"),
            ("anthropic-ratelimit-tokens-reset", "2023-11-14T22:14:20Z"),
        ]);
        assert_eq!(
            limiting_reset(&h),
            Some((NOW + 60_000, "anthropic-ratelimit-tokens-reset"))
        );
        assert_eq!(limiting_reset(&HeaderMap::new()), None);
    }

    #[test]
    fn unified_headers() {
        let h = hm(&[
            ("anthropic-ratelimit-unified-status", "allowed_warning"),
            ("anthropic-ratelimit-unified-reset", "1700003600"),
            ("anthropic-ratelimit-unified-representative-claim", "five_hour"),
            ("anthropic-ratelimit-unified-5h-utilization", "0.91"),
            ("anthropic-ratelimit-unified-5h-reset", "1700003600"),
            ("anthropic-ratelimit-unified-5h-status", "allowed_warning"),
            ("anthropic-ratelimit-unified-7d-utilization", "13"),
            ("anthropic-ratelimit-unified-7d-reset", "1700500000000"),
            ("anthropic-ratelimit-unified-7d-status", "Rejected"),
        ]);
        let u = Unified::parse(&h).unwrap();
        assert_eq!(u.status, Some("allowed_warning"));
        assert!(!u.rejected());
        assert_eq!(u.reset_ms, Some(1_700_003_600_000));
        assert_eq!(u.representative_claim, Some("five_hour"));
        assert_eq!(u.windows[0].name, "5h");
        assert_eq!(u.windows[0].utilization, Some(0.91));
        assert!(!u.windows[0].rejected());
        // A percentage, and a reset already in ms.
        assert_eq!(u.windows[1].utilization, Some(0.13));
        assert_eq!(u.windows[1].reset_ms, Some(1_700_500_000_000));
        assert!(u.windows[1].rejected());
    }

    #[test]
    fn unified_absent_or_unreadable() {
        assert_eq!(
            Unified::parse(&hm(&[("anthropic-ratelimit-requests-limit", "50")])),
            None
        );
        let junk = hm(&[
            ("anthropic-ratelimit-unified-reset", "0"),
            ("anthropic-ratelimit-unified-5h-utilization", "-1"),
            ("anthropic-ratelimit-unified-7d-utilization", "NaN"),
            ("anthropic-ratelimit-unified-status", "  "),
        ]);
        assert_eq!(Unified::parse(&junk), None);
        let h = hm(&[("anthropic-ratelimit-unified-status", "rejected")]);
        let rejected = Unified::parse(&h).unwrap();
        assert!(rejected.rejected());
        assert!(rejected.windows.iter().all(|w| !w.present()));
    }
}
