//! What one usage event can plausibly carry. An upstream can claim anything (a compatible endpoint
//! with a bug, a hostile one); a count beyond these bounds is clamped to them and the event flagged
//! `suspect`, never stored as is (it would overflow every sum) and never dropped (the request
//! happened). Both the data plane (when it builds the event) and the control plane (when it stores
//! one) apply them.

use crate::v1::UsageEvent;

/// Tokens of one kind in one request: ten times the largest context window (1M tokens).
pub const MAX_TOKENS_PER_REQUEST: u64 = 10_000_000;
/// Server-side web searches in one request.
pub const MAX_WEB_SEARCHES_PER_REQUEST: u64 = 100_000;
/// The cost of one request: 100,000 USD, in pico-USD.
pub const MAX_COST_PICO_USD_PER_REQUEST: u64 = 100_000 * 1_000_000_000_000;
/// Latency and time to first byte: one week, in milliseconds.
pub const MAX_LATENCY_MS: u64 = 7 * 24 * 3600 * 1000;
/// The longest client request id kept (`x-request-id` / `request-id`), in bytes.
pub const MAX_CLIENT_REQUEST_ID_LEN: usize = 128;

/// A client's own request id as relay keeps it: 1..=[`MAX_CLIENT_REQUEST_ID_LEN`] visible ASCII
/// characters (no spaces, no control characters), surrounding whitespace trimmed; anything else is
/// ignored (None), so a client cannot bloat usage rows or forge log lines with it.
pub fn client_request_id(raw: &str) -> Option<&str> {
    let v = raw.trim();
    (!v.is_empty() && v.len() <= MAX_CLIENT_REQUEST_ID_LEN && v.bytes().all(|b| b.is_ascii_graphic())).then_some(v)
}

/// The anomaly for a clamped count.
pub const SUSPECT: &str = "suspect";
/// The anomaly for usage that could not be read from the answer.
pub const UNPARSED: &str = "unparsed";

/// Adds `reason` to the event's anomalies (comma separated, each once).
pub fn flag(e: &mut UsageEvent, reason: &str) {
    if e.anomaly.split(',').any(|r| r == reason) {
        return;
    }
    if !e.anomaly.is_empty() {
        e.anomaly.push(',');
    }
    e.anomaly.push_str(reason);
}

/// Clamps every count of `e` to its bound; flags the event [`SUSPECT`] when one was above it.
/// Returns whether anything was clamped.
pub fn clamp(e: &mut UsageEvent) -> bool {
    let mut clamped = false;
    let mut cap = |v: &mut u64, max: u64| {
        if *v > max {
            *v = max;
            clamped = true;
        }
    };
    cap(&mut e.input_tokens, MAX_TOKENS_PER_REQUEST);
    cap(&mut e.output_tokens, MAX_TOKENS_PER_REQUEST);
    cap(&mut e.cache_write_5m_tokens, MAX_TOKENS_PER_REQUEST);
    cap(&mut e.cache_write_1h_tokens, MAX_TOKENS_PER_REQUEST);
    cap(&mut e.cache_read_tokens, MAX_TOKENS_PER_REQUEST);
    cap(&mut e.web_search_requests, MAX_WEB_SEARCHES_PER_REQUEST);
    cap(&mut e.cost_pico_usd, MAX_COST_PICO_USD_PER_REQUEST);
    cap(&mut e.latency_ms, MAX_LATENCY_MS);
    cap(&mut e.ttfb_ms, MAX_LATENCY_MS);
    if e.http_status > 999 {
        e.http_status = 0;
        clamped = true;
    }
    if clamped {
        flag(e, SUSPECT);
    }
    clamped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_request_ids_are_short_visible_ascii() {
        assert_eq!(client_request_id("abc-123"), Some("abc-123"));
        assert_eq!(client_request_id(" req_01HX:42/a "), Some("req_01HX:42/a"));
        assert_eq!(client_request_id(&"x".repeat(128)).map(str::len), Some(128));
        for bad in ["", "  ", "a b", "a\tb", "a\nb", "é", "a\u{7f}"] {
            assert_eq!(client_request_id(bad), None, "{bad:?}");
        }
        assert_eq!(client_request_id(&"x".repeat(129)), None);
    }

    #[test]
    fn clamps_and_flags_once() {
        let mut e = UsageEvent {
            input_tokens: 2_000_000_000_000,
            output_tokens: 5,
            cost_pico_usd: u64::MAX,
            ..Default::default()
        };
        assert!(clamp(&mut e));
        assert_eq!(e.input_tokens, MAX_TOKENS_PER_REQUEST);
        assert_eq!(e.output_tokens, 5);
        assert_eq!(e.cost_pico_usd, MAX_COST_PICO_USD_PER_REQUEST);
        flag(&mut e, UNPARSED);
        assert!(!clamp(&mut e), "already within bounds");
        assert_eq!(e.anomaly, "suspect,unparsed");
        let mut ok = UsageEvent {
            input_tokens: 1_000_000,
            ..Default::default()
        };
        assert!(!clamp(&mut ok));
        assert!(ok.anomaly.is_empty());
    }

    #[test]
    fn sums_of_bounded_rows_fit_in_i64_for_a_long_while() {
        // A million rows at the bound still fit: aggregates saturate beyond that, they never fail.
        assert!(u128::from(MAX_TOKENS_PER_REQUEST) * 1_000_000 < i64::MAX as u128);
    }
}
