//! The classification table: one row per upstream answer relay must understand (every row of the
//! Anthropic error table, rate limits with and without a reset, the first-event `overloaded_error`
//! of a 200 stream, transport failures), each with the verdict, breaker event and account state it
//! must produce under the default settings.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use http::header::HeaderName;
use pb::AccountHealth::{Blocked, Overloaded, RateLimited, Unauthorized};

const NOW: i64 = 1_700_000_000_000;
const SONNET: &str = "claude-sonnet-4-5-20250929";
/// `until_ms` of a state that lasts until the fleet clears it.
const UNTIL_RESET: i64 = 0;

/// What the attempt saw.
enum Seen {
    Answer(u16, Vec<(&'static str, String)>, String),
    Stream(&'static str),
    Connect,
    Timeout,
    Invalid,
}

/// The breaker event expected.
#[derive(Debug, PartialEq)]
enum B {
    Success,
    Failure,
    Nothing,
}

struct Row {
    name: &'static str,
    seen: Seen,
    retry_elsewhere: bool,
    retry_after_ms: Option<u64>,
    breaker: B,
    /// (health, scope, until_ms: UNTIL_RESET or an absolute time).
    states: Vec<(pb::AccountHealth, &'static str, i64)>,
}

fn body(kind: &str, message: &str) -> String {
    serde_json::json!({"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_1"}).to_string()
}

fn answer(status: u16, headers: &[(&'static str, String)], body: String) -> Seen {
    Seen::Answer(status, headers.to_vec(), body)
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).unwrap().to_rfc3339()
}

fn s(v: &str) -> String {
    v.to_string()
}

#[allow(clippy::too_many_lines)]
fn table() -> Vec<Row> {
    let row = |name, seen, retry_elsewhere, retry_after_ms, breaker, states| Row {
        name,
        seen,
        retry_elsewhere,
        retry_after_ms,
        breaker,
        states,
    };
    let min = 60_000; // cooldown.rate_limit_default_ms
    let overloaded = 30_000; // cooldown.overloaded_ms
    let max = 6 * 3_600_000; // cooldown.max_ms
    vec![
        row("200", answer(200, &[], s("")), false, None, B::Success, vec![]),
        // The client's request is at fault: the answer passes through, the account is fine.
        row(
            "400 invalid_request_error",
            answer(400, &[], body("invalid_request_error", "max_tokens: required")),
            false,
            None,
            B::Success,
            vec![],
        ),
        row(
            "404 not_found_error about the model",
            answer(404, &[], body("not_found_error", "model: claude-nope")),
            false,
            None,
            B::Success,
            vec![],
        ),
        row(
            "413 request_too_large",
            answer(413, &[], body("request_too_large", "Request exceeds the maximum size")),
            false,
            None,
            B::Success,
            vec![],
        ),
        row(
            "403 of another kind",
            answer(403, &[], body("invalid_request_error", "region")),
            false,
            None,
            B::Success,
            vec![],
        ),
        row(
            "422 invalid_request_error",
            answer(
                422,
                &[],
                body("invalid_request_error", "messages: at least one message is required"),
            ),
            false,
            None,
            B::Success,
            vec![],
        ),
        // The account's credential.
        row(
            "401 authentication_error",
            answer(401, &[], body("authentication_error", "invalid x-api-key")),
            true,
            None,
            B::Success,
            vec![(Unauthorized, "", UNTIL_RESET)],
        ),
        row(
            "401 without a body",
            answer(401, &[], s("")),
            true,
            None,
            B::Success,
            vec![(Unauthorized, "", UNTIL_RESET)],
        ),
        row(
            "403 permission_error",
            answer(403, &[], body("permission_error", "not allowed")),
            true,
            None,
            B::Success,
            vec![(Unauthorized, "", UNTIL_RESET)],
        ),
        row(
            "403 authentication_error",
            answer(403, &[], body("authentication_error", "no")),
            true,
            None,
            B::Success,
            vec![(Unauthorized, "", UNTIL_RESET)],
        ),
        row(
            "403 from a proxy, not JSON",
            answer(403, &[], s("<html>Forbidden</html>")),
            true,
            None,
            B::Success,
            vec![(Unauthorized, "", UNTIL_RESET)],
        ),
        // The account's organization or billing.
        row(
            "400 organization disabled",
            answer(
                400,
                &[],
                body("invalid_request_error", "This organization has been disabled."),
            ),
            true,
            None,
            B::Success,
            vec![(Blocked, "", UNTIL_RESET)],
        ),
        row(
            "403 organization disabled, not JSON",
            answer(403, &[], s("<p>This organization has been disabled</p>")),
            true,
            None,
            B::Success,
            vec![(Blocked, "", UNTIL_RESET)],
        ),
        row(
            "402 billing_error",
            answer(402, &[], body("billing_error", "pay up")),
            true,
            None,
            B::Success,
            vec![(Blocked, "", UNTIL_RESET)],
        ),
        row(
            "400 credit balance too low",
            answer(
                400,
                &[],
                body(
                    "invalid_request_error",
                    "Your credit balance is too low to access the Anthropic API.",
                ),
            ),
            true,
            None,
            B::Success,
            vec![(Blocked, "", UNTIL_RESET)],
        ),
        // The account's URL.
        row(
            "404 that is not about the model",
            answer(404, &[], body("not_found_error", "Not Found")),
            true,
            None,
            B::Failure,
            vec![],
        ),
        row(
            "408 timeout_error",
            answer(408, &[], body("timeout_error", "Request timed out")),
            true,
            None,
            B::Failure,
            vec![],
        ),
        // Rate limits.
        row(
            "429 with retry-after",
            answer(429, &[("retry-after", s("30"))], body("rate_limit_error", "slow down")),
            true,
            Some(30_000),
            B::Success,
            vec![(RateLimited, "", NOW + 30_000)],
        ),
        row(
            "429 with a fractional retry-after",
            answer(429, &[("retry-after", s("2.5"))], s("")),
            true,
            Some(2_500),
            B::Success,
            vec![(RateLimited, "", NOW + 2_500)],
        ),
        row(
            "429 with an HTTP-date retry-after",
            answer(
                429,
                &[(
                    "retry-after",
                    chrono::DateTime::from_timestamp_millis(NOW + 120_000)
                        .unwrap()
                        .to_rfc2822(),
                )],
                s(""),
            ),
            true,
            Some(120_000),
            B::Success,
            vec![(RateLimited, "", NOW + 120_000)],
        ),
        row(
            "429 with retry-after-ms",
            answer(
                429,
                &[("retry-after-ms", s("1500"))],
                body("rate_limit_error", "slow down"),
            ),
            true,
            Some(1_500),
            B::Success,
            vec![(RateLimited, "", NOW + 1_500)],
        ),
        row(
            "429 without retry-after: the exhausted limit's reset",
            answer(
                429,
                &[
                    ("anthropic-ratelimit-requests-remaining", s("0")),
                    ("anthropic-ratelimit-requests-reset", rfc3339(NOW + 45_000)),
                    ("anthropic-ratelimit-tokens-remaining", s("100")),
                    ("anthropic-ratelimit-tokens-reset", rfc3339(NOW + 90_000)),
                ],
                body("rate_limit_error", "slow down"),
            ),
            true,
            None,
            B::Success,
            vec![(RateLimited, "", NOW + 45_000)],
        ),
        row(
            "429 without any reset: the default",
            answer(429, &[], body("rate_limit_error", "slow down")),
            true,
            None,
            B::Success,
            vec![(RateLimited, "", NOW + min)],
        ),
        row(
            "429 retry-after past the cap",
            answer(429, &[("retry-after", s("999999"))], s("")),
            true,
            Some(999_999_000),
            B::Success,
            vec![(RateLimited, "", NOW + max)],
        ),
        row(
            "429 retry-after too large to count, and a reset at the epoch: the cap",
            answer(
                429,
                &[
                    ("retry-after", s("99999999999999999999")),
                    ("anthropic-ratelimit-tokens-remaining", s("0")),
                    ("anthropic-ratelimit-tokens-reset", s("1970-01-01T00:00:00Z")),
                ],
                s(""),
            ),
            true,
            Some(365 * 24 * 3600 * 1000),
            B::Success,
            vec![(RateLimited, "", NOW + max)],
        ),
        row(
            "429 whose limit reset is long past: the default, not a one-second rest",
            answer(
                429,
                &[
                    ("anthropic-ratelimit-tokens-remaining", s("0")),
                    ("anthropic-ratelimit-tokens-reset", rfc3339(NOW - 3_600_000)),
                ],
                body("rate_limit_error", "slow down"),
            ),
            true,
            None,
            B::Success,
            vec![(RateLimited, "", NOW + min)],
        ),
        row(
            "429 retry-after 0: the floor",
            answer(429, &[("retry-after", s("0"))], s("")),
            true,
            Some(0),
            B::Success,
            vec![(RateLimited, "", NOW + 1_000)],
        ),
        row(
            "429 about one model family",
            answer(
                429,
                &[("retry-after", s("20"))],
                body("rate_limit_error", "Rate limit for Opus models exceeded"),
            ),
            true,
            Some(20_000),
            B::Success,
            vec![(RateLimited, "opus", NOW + 20_000)],
        ),
        row(
            "429 subscription rejected: until the unified reset",
            answer(
                429,
                &[
                    ("retry-after", s("10")),
                    ("anthropic-ratelimit-unified-status", s("rejected")),
                    (
                        "anthropic-ratelimit-unified-reset",
                        ((NOW + 3_600_000) / 1000).to_string(),
                    ),
                ],
                body("rate_limit_error", "limit reached"),
            ),
            true,
            Some(10_000),
            B::Success,
            vec![(RateLimited, "", NOW + 3_600_000)],
        ),
        // Server errors.
        row(
            "500 api_error",
            answer(500, &[], body("api_error", "Internal server error")),
            true,
            None,
            B::Failure,
            vec![],
        ),
        row(
            "502 from a proxy, not JSON",
            answer(502, &[], s("<html>Bad Gateway</html>")),
            true,
            None,
            B::Failure,
            vec![],
        ),
        row(
            "503 with retry-after",
            answer(503, &[("retry-after", s("5"))], s("")),
            true,
            Some(5_000),
            B::Failure,
            vec![],
        ),
        row(
            "529 overloaded_error",
            answer(529, &[], body("overloaded_error", "Overloaded")),
            true,
            None,
            B::Success,
            vec![(Overloaded, "", NOW + overloaded)],
        ),
        row(
            "529 with a longer retry-after",
            answer(
                529,
                &[("retry-after", s("120"))],
                body("overloaded_error", "Overloaded"),
            ),
            true,
            Some(120_000),
            B::Success,
            vec![(Overloaded, "", NOW + 120_000)],
        ),
        // A 200 stream whose first event is an error.
        row(
            "200 stream opening with overloaded_error",
            Seen::Stream("overloaded_error"),
            true,
            None,
            B::Nothing,
            vec![(Overloaded, "", NOW + overloaded)],
        ),
        row(
            "200 stream opening with rate_limit_error",
            Seen::Stream("rate_limit_error"),
            true,
            None,
            B::Nothing,
            vec![(RateLimited, "", NOW + min)],
        ),
        row(
            "200 stream opening with api_error",
            Seen::Stream("api_error"),
            true,
            None,
            B::Failure,
            vec![],
        ),
        row(
            "200 stream opening with authentication_error",
            Seen::Stream("authentication_error"),
            true,
            None,
            B::Nothing,
            vec![(Unauthorized, "", UNTIL_RESET)],
        ),
        row(
            "200 stream opening with invalid_request_error",
            Seen::Stream("invalid_request_error"),
            false,
            None,
            B::Nothing,
            vec![],
        ),
        // Subscription utilization on a success.
        row(
            "200 with unified utilization over the threshold",
            answer(
                200,
                &[
                    ("anthropic-ratelimit-unified-status", s("allowed_warning")),
                    ("anthropic-ratelimit-unified-5h-utilization", s("0.99")),
                    (
                        "anthropic-ratelimit-unified-5h-reset",
                        ((NOW + 7_200_000) / 1000).to_string(),
                    ),
                ],
                s(""),
            ),
            false,
            None,
            B::Success,
            vec![(RateLimited, "", NOW + 7_200_000)],
        ),
        row(
            "200 with unified utilization under the threshold",
            answer(
                200,
                &[
                    ("anthropic-ratelimit-unified-5h-utilization", s("0.5")),
                    (
                        "anthropic-ratelimit-unified-5h-reset",
                        ((NOW + 7_200_000) / 1000).to_string(),
                    ),
                ],
                s(""),
            ),
            false,
            None,
            B::Success,
            vec![],
        ),
        // No Anthropic answer at all.
        row("connect error", Seen::Connect, true, None, B::Failure, vec![]),
        row("head timeout", Seen::Timeout, true, None, B::Failure, vec![]),
        row("invalid answer", Seen::Invalid, true, None, B::Failure, vec![]),
    ]
}

#[test]
fn every_upstream_answer_classifies_as_the_table_says() {
    let settings = HealthSettings::default();
    for row in table() {
        let headers: HeaderMap = match &row.seen {
            Seen::Answer(_, h, _) => h
                .iter()
                .map(|(k, v)| (HeaderName::from_static(k), v.parse().unwrap()))
                .collect(),
            _ => HeaderMap::new(),
        };
        let outcome = match &row.seen {
            Seen::Answer(status, _, body) => Outcome::Response {
                status: *status,
                headers: &headers,
                body: body.as_bytes(),
            },
            Seen::Stream(error_type) => Outcome::StreamError { error_type },
            Seen::Connect => Outcome::ConnectError,
            Seen::Timeout => Outcome::Timeout,
            Seen::Invalid => Outcome::Invalid {
                what: "no message_stop",
            },
        };
        let plan = classify(&outcome, SONNET, &settings, NOW);
        let name = row.name;
        assert_eq!(
            plan.verdict.retry_elsewhere, row.retry_elsewhere,
            "{name}: retry elsewhere"
        );
        assert_eq!(
            plan.verdict.retry_after.map(|d| d.as_millis() as u64),
            row.retry_after_ms,
            "{name}: retry-after"
        );
        let breaker = match plan.breaker {
            BreakerEvent::Success => B::Success,
            BreakerEvent::Failure(_) => B::Failure,
            BreakerEvent::Nothing => B::Nothing,
        };
        assert_eq!(breaker, row.breaker, "{name}: breaker");
        let states: Vec<_> = plan
            .states
            .iter()
            .flatten()
            .map(|st| (st.health, st.scope, st.until_ms))
            .collect();
        assert_eq!(states, row.states, "{name}: states");
        for st in plan.states.iter().flatten() {
            assert!(!st.reason.is_empty(), "{name}: every state says why");
        }
    }
}
