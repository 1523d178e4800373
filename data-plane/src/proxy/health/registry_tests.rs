//! Scenario tests of account health through [`HealthRegistry`]: settings, rate limits and their
//! scopes, the breaker, unauthorized and blocked states, unified utilization and the fleet view. What
//! one answer means on its own is the table in `classify_tests.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::error_body::clean_type;
use super::family::family_in;
use super::fleet::MIN_STATE_MS;
use super::*;
use http::header::HeaderName;
use http::HeaderMap;
use relay_proto::settings;
use relay_proto::v1 as pb;
use std::collections::BTreeMap;

const NOW: i64 = 1_700_000_000_000;
const OPUS: &str = "claude-opus-4-1-20250805";
const SONNET: &str = "claude-sonnet-4-5-20250929";

fn hm(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    h
}

fn err_body(kind: &str, message: &str) -> Vec<u8> {
    serde_json::json!({"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_1"})
        .to_string()
        .into_bytes()
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).unwrap().to_rfc3339()
}

fn respond(
    reg: &HealthRegistry,
    account: &str,
    model: &str,
    status: u16,
    headers: &[(&str, &str)],
    body: &[u8],
    now: i64,
) -> (Verdict, Option<pb::AccountState>) {
    respond_with(
        reg,
        account,
        model,
        status,
        headers,
        body,
        &HealthSettings::default(),
        now,
    )
}

#[allow(clippy::too_many_arguments)]
fn respond_with(
    reg: &HealthRegistry,
    account: &str,
    model: &str,
    status: u16,
    headers: &[(&str, &str)],
    body: &[u8],
    s: &HealthSettings,
    now: i64,
) -> (Verdict, Option<pb::AccountState>) {
    let h = hm(headers);
    let outcome = Outcome::Response {
        status,
        headers: &h,
        body,
    };
    reg.observe(account, model, &outcome, s, now)
}

fn fail(reg: &HealthRegistry, account: &str, now: i64) -> Option<pb::AccountState> {
    respond(reg, account, SONNET, 502, &[], b"bad gateway", now).1
}

fn ok(reg: &HealthRegistry, account: &str, now: i64) -> Option<pb::AccountState> {
    reg.on_success(account, SONNET, &HeaderMap::new(), &HealthSettings::default(), now)
}

fn shared(account: &str, health: pb::AccountHealth, scope: &str, until_ms: i64, since_ms: i64) -> pb::AccountState {
    pb::AccountState {
        account_id: account.into(),
        health: health as i32,
        reason: "from the fleet".into(),
        until_ms,
        scope: scope.into(),
        since_ms,
        reported_by: "dp-other".into(),
        reset_generation: 0,
    }
}

// ---- settings ----

#[test]
fn settings_defaults_and_keys() {
    let d = HealthSettings::default();
    assert_eq!(d.rate_limit_default, Duration::from_secs(60));
    assert_eq!(d.overloaded, Duration::from_secs(30));
    assert_eq!(d.erroring, Duration::from_secs(30));
    assert_eq!(d.max, Duration::from_secs(6 * 3600));
    assert_eq!(d.breaker_threshold, 3);
    assert_eq!(d.unified_threshold, 0.98);
    assert_eq!(HealthSettings::from_settings(&BTreeMap::new()), d);

    let values: BTreeMap<String, String> = [
        ("cooldown.rate_limit_default_ms", "5000"),
        ("cooldown.overloaded_ms", "7000"),
        ("cooldown.erroring_ms", " 9000 "),
        ("cooldown.max_ms", "600000"),
        ("cooldown.min_ms", "250"),
        ("breaker.threshold", "5"),
        ("unified.threshold", "0.9"),
        ("account.acc-1.cooldown.max_ms", "1000"),
        ("head_timeout_ms", "1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let s = HealthSettings::from_settings(&values);
    assert_eq!(
        s,
        HealthSettings {
            rate_limit_default: Duration::from_millis(5000),
            overloaded: Duration::from_millis(7000),
            erroring: Duration::from_millis(9000),
            max: Duration::from_millis(600_000),
            min: Duration::from_millis(250),
            breaker_threshold: 5,
            unified_threshold: 0.9,
        },
        "global keys apply, account overrides do not"
    );
}

#[test]
fn settings_invalid_values_keep_defaults_and_percent_threshold() {
    let values: BTreeMap<String, String> = [
        ("cooldown.overloaded_ms", "soon"),
        ("cooldown.erroring_ms", "-5"),
        ("breaker.threshold", "0"),
        ("unified.threshold", "95"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let s = HealthSettings::from_settings(&values);
    assert_eq!(s.overloaded, Duration::from_secs(30));
    assert_eq!(s.erroring, Duration::from_secs(30));
    assert_eq!(s.breaker_threshold, 3, "a threshold of 0 is ignored");
    assert!((s.unified_threshold - 0.95).abs() < 1e-9, "95 means 95 %");
    for bad in ["NaN", "-0.5", "0", "250"] {
        let v: BTreeMap<String, String> = [("unified.threshold".to_string(), bad.to_string())].into();
        assert_eq!(HealthSettings::from_settings(&v).unified_threshold, 0.98, "{bad}");
    }
}

#[test]
fn settings_per_account_overrides() {
    let values: BTreeMap<String, String> = [
        ("cooldown.max_ms", "600000"),
        ("breaker.threshold", "4"),
        ("account.acc-1.breaker.threshold", "1"),
        ("account.acc-1.cooldown.max_ms", "1000"),
        ("account.acc-10.cooldown.overloaded_ms", "1"),
        ("account.acc.1.cooldown.erroring_ms", "2"),
        ("account.acc-1.breaker.threshold.bogus", "9"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let global = HealthSettings::from_settings(&values);
    let one = global.for_account(&values, "acc-1");
    assert_eq!(one.breaker_threshold, 1);
    assert_eq!(one.max, Duration::from_millis(1000));
    assert_eq!(
        one.overloaded,
        Duration::from_secs(30),
        "acc-10's override is not acc-1's"
    );
    assert_eq!(one.erroring, Duration::from_secs(30));
    let dotted = global.for_account(&values, "acc.1");
    assert_eq!(dotted.erroring, Duration::from_millis(2), "ids with dots work");
    assert_eq!(dotted.breaker_threshold, 4);
    let other = global.for_account(&values, "acc-2");
    assert_eq!(other, global);
}

#[test]
fn per_account_overrides_drive_the_breaker_and_caps() {
    let values: BTreeMap<String, String> = [
        ("account.flaky.breaker.threshold", "1"),
        ("account.flaky.cooldown.erroring_ms", "5000"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let global = HealthSettings::from_settings(&values);
    let reg = HealthRegistry::new("dp-1");
    for account in ["flaky", "steady"] {
        let s = global.for_account(&values, account);
        let _ = reg.observe(account, SONNET, &Outcome::ConnectError, &s, NOW);
    }
    assert_eq!(reg.availability("flaky", SONNET, NOW), Availability::At(NOW + 5000));
    assert_eq!(reg.availability("steady", SONNET, NOW), Availability::Now);
}

// ---- model families ----

#[test]
fn model_families() {
    assert_eq!(model_family("claude-opus-4-1-20250805"), "opus");
    assert_eq!(model_family("claude-3-opus-20240229"), "opus");
    assert_eq!(model_family("claude-sonnet-4-5"), "sonnet");
    assert_eq!(model_family("claude-3-5-Sonnet-latest"), "sonnet");
    assert_eq!(model_family("claude-haiku-4-5"), "haiku");
    assert_eq!(model_family("gpt-4o"), "");
    assert_eq!(model_family(""), "");
}

// ---- rate limits ----

#[test]
fn retry_after_limits_the_account_until_then() {
    let reg = HealthRegistry::new("dp-1");
    let body = err_body(
        "rate_limit_error",
        "Number of request tokens has exceeded your per-minute rate limit",
    );
    let (v, report) = respond(&reg, "a", SONNET, 429, &[("retry-after", "30")], &body, NOW);
    assert_eq!(
        v,
        Verdict {
            retry_elsewhere: true,
            retry_after: Some(Duration::from_secs(30))
        }
    );
    let st = report.expect("a new state is reported");
    assert_eq!(st.account_id, "a");
    assert_eq!(st.health, pb::AccountHealth::RateLimited as i32);
    assert_eq!(st.scope, "");
    assert_eq!(st.until_ms, NOW + 30_000);
    assert_eq!(st.since_ms, NOW);
    assert_eq!(st.reported_by, "dp-1");
    assert_eq!(st.reason, "429 rate_limit_error: retry-after 30s");
    assert_eq!(reg.availability("a", SONNET, NOW), Availability::At(NOW + 30_000));
    assert_eq!(
        reg.availability("a", OPUS, NOW + 29_999),
        Availability::At(NOW + 30_000)
    );
    assert_eq!(
        reg.availability("a", SONNET, NOW + 30_000),
        Availability::Now,
        "expired = healthy"
    );
    assert_eq!(
        reg.availability("b", SONNET, NOW),
        Availability::Now,
        "other accounts unaffected"
    );
}

#[test]
fn ratelimit_reset_headers_take_the_exhausted_limit() {
    let reg = HealthRegistry::new("dp-1");
    let tokens_reset = rfc3339(NOW + 42_000);
    let requests_reset = rfc3339(NOW + 50_000);
    let output_reset = rfc3339(NOW + 45_000);
    let h = [
        ("anthropic-ratelimit-requests-remaining", "3"),
        ("anthropic-ratelimit-requests-reset", requests_reset.as_str()),
        ("anthropic-ratelimit-tokens-remaining", "0"),
        ("anthropic-ratelimit-tokens-reset", tokens_reset.as_str()),
        ("anthropic-ratelimit-output-tokens-remaining", "0"),
        ("anthropic-ratelimit-output-tokens-reset", output_reset.as_str()),
    ];
    let (v, st) = respond(&reg, "a", SONNET, 429, &h, b"", NOW);
    assert_eq!(v.retry_after, None);
    let st = st.unwrap();
    assert_eq!(st.until_ms, NOW + 45_000, "the latest reset among the exhausted limits");
    assert_eq!(
        st.reason,
        "429 rate_limit_error: anthropic-ratelimit-output-tokens-reset"
    );

    // None exhausted: the latest given.
    let h = [
        ("anthropic-ratelimit-requests-remaining", "3"),
        ("anthropic-ratelimit-requests-reset", requests_reset.as_str()),
        ("anthropic-ratelimit-tokens-remaining", "10"),
        ("anthropic-ratelimit-tokens-reset", tokens_reset.as_str()),
    ];
    let (_, st) = respond(&reg, "b", SONNET, 429, &h, b"", NOW);
    assert_eq!(st.unwrap().until_ms, NOW + 50_000);

    // retry-after wins over the reset headers.
    let h = [
        ("retry-after", "7"),
        ("anthropic-ratelimit-tokens-remaining", "0"),
        ("anthropic-ratelimit-tokens-reset", tokens_reset.as_str()),
    ];
    let (_, st) = respond(&reg, "c", SONNET, 429, &h, b"", NOW);
    assert_eq!(st.unwrap().until_ms, NOW + 7_000);
}

#[test]
fn unified_reset_limits_a_subscription_account() {
    let reg = HealthRegistry::new("dp-1");
    let reset_s = ((NOW + 3_600_000) / 1000).to_string();
    let h = [
        ("anthropic-ratelimit-unified-status", "rejected"),
        ("anthropic-ratelimit-unified-reset", reset_s.as_str()),
    ];
    let (v, st) = respond(&reg, "a", SONNET, 429, &h, b"", NOW);
    assert!(v.retry_elsewhere);
    let st = st.unwrap();
    assert_eq!(st.until_ms, NOW + 3_600_000);
    assert_eq!(st.health, pb::AccountHealth::RateLimited as i32);
    assert!(st.reason.contains("unified-reset"), "{}", st.reason);
    assert_eq!(
        reg.availability("a", SONNET, NOW + 3_599_000),
        Availability::At(NOW + 3_600_000)
    );

    // A short retry-after does not undercut a rejected unified window.
    let h = [
        ("retry-after", "10"),
        ("anthropic-ratelimit-unified-status", "rejected"),
        ("anthropic-ratelimit-unified-reset", reset_s.as_str()),
    ];
    let (v, st) = respond(&reg, "b", SONNET, 429, &h, b"", NOW);
    assert_eq!(v.retry_after, Some(Duration::from_secs(10)));
    assert_eq!(st.unwrap().until_ms, NOW + 3_600_000);
}

#[test]
fn a_429_without_reset_gets_the_default() {
    let reg = HealthRegistry::new("dp-1");
    let (v, st) = respond(
        &reg,
        "a",
        SONNET,
        429,
        &[],
        &err_body("rate_limit_error", "slow down"),
        NOW,
    );
    assert_eq!(
        v,
        Verdict {
            retry_elsewhere: true,
            retry_after: None
        }
    );
    let st = st.unwrap();
    assert_eq!(st.until_ms, NOW + 60_000);
    assert_eq!(st.reason, "429 rate_limit_error: no reset given, default 1m");

    let s = HealthSettings {
        rate_limit_default: Duration::from_secs(5),
        ..HealthSettings::default()
    };
    let (_, st) = respond_with(&reg, "b", SONNET, 429, &[], b"", &s, NOW);
    assert_eq!(st.unwrap().until_ms, NOW + 5_000);
}

#[test]
fn rate_limits_are_capped_at_max_and_floored() {
    let reg = HealthRegistry::new("dp-1");
    let (v, st) = respond(&reg, "a", SONNET, 429, &[("retry-after", "100000")], b"", NOW);
    assert_eq!(
        v.retry_after,
        Some(Duration::from_secs(100_000)),
        "the client is told what upstream said"
    );
    let st = st.unwrap();
    assert_eq!(st.until_ms, NOW + 6 * 3_600_000);
    assert!(st.reason.ends_with("(capped)"), "{}", st.reason);

    let s = HealthSettings {
        max: Duration::from_secs(10),
        ..HealthSettings::default()
    };
    let far = rfc3339(NOW + 3_600_000);
    let h = [
        ("anthropic-ratelimit-tokens-remaining", "0"),
        ("anthropic-ratelimit-tokens-reset", far.as_str()),
    ];
    let (_, st) = respond_with(&reg, "b", SONNET, 429, &h, b"", &s, NOW);
    assert_eq!(st.unwrap().until_ms, NOW + 10_000);

    // A reset already in the past (clock skew) still keeps the account out briefly.
    let past = rfc3339(NOW - 5_000);
    let h = [
        ("anthropic-ratelimit-tokens-remaining", "0"),
        ("anthropic-ratelimit-tokens-reset", past.as_str()),
    ];
    let (_, st) = respond(&reg, "c", SONNET, 429, &h, b"", NOW);
    assert_eq!(st.unwrap().until_ms, NOW + MIN_STATE_MS);
    // ... as long as `cooldown.min_ms` says.
    let s = HealthSettings::from_settings(&[(KEY_MIN.to_string(), "50".to_string())].into_iter().collect());
    let (_, st) = respond_with(&reg, "d", SONNET, 429, &h, b"", &s, NOW);
    assert_eq!(st.unwrap().until_ms, NOW + 50);
}

#[test]
fn family_scoped_limit_blocks_only_that_family() {
    let reg = HealthRegistry::new("dp-1");
    let body = err_body(
        "rate_limit_error",
        "This request would exceed your organization's rate limit of 20,000 output tokens per minute for Claude Opus 4.",
    );
    let (v, st) = respond(&reg, "a", OPUS, 429, &[("retry-after", "20")], &body, NOW);
    assert!(v.retry_elsewhere);
    let st = st.unwrap();
    assert_eq!(st.scope, "opus");
    assert_eq!(st.reason, "429 rate_limit_error (opus): retry-after 20s");
    assert_eq!(reg.availability("a", OPUS, NOW), Availability::At(NOW + 20_000));
    assert_eq!(
        reg.availability("a", "claude-3-opus-20240229", NOW),
        Availability::At(NOW + 20_000)
    );
    assert_eq!(
        reg.availability("a", SONNET, NOW),
        Availability::Now,
        "sonnet still goes"
    );
    assert_eq!(reg.availability("a", "claude-haiku-4-5", NOW), Availability::Now);
    assert_eq!(reg.availability("a", "unknown-model", NOW), Availability::Now);

    // An account-wide limit blocks every family.
    let _ = respond(&reg, "a", SONNET, 429, &[("retry-after", "5")], b"", NOW);
    assert_eq!(reg.availability("a", SONNET, NOW), Availability::At(NOW + 5_000));
    assert_eq!(
        reg.availability("a", OPUS, NOW),
        Availability::At(NOW + 20_000),
        "the later one counts"
    );
    assert_eq!(reg.availability("a", OPUS, NOW + 20_000), Availability::Now);

    let scopes: Vec<(String, i64)> = reg.states(NOW).into_iter().map(|s| (s.scope, s.until_ms)).collect();
    assert_eq!(
        scopes,
        vec![("".to_string(), NOW + 5_000), ("opus".to_string(), NOW + 20_000)]
    );
}

#[test]
fn message_family_prefers_the_requests_own_family() {
    assert_eq!(family_in("limits for Opus and Sonnet models", SONNET), Some("sonnet"));
    assert_eq!(family_in("limits for Opus models", SONNET), Some("opus"));
    assert_eq!(family_in("per-minute rate limit", OPUS), None);
}

#[test]
fn repeated_signals_are_reported_once() {
    let reg = HealthRegistry::new("dp-1");
    let (_, first) = respond(&reg, "a", SONNET, 429, &[("retry-after", "30")], b"", NOW);
    assert!(first.is_some());
    let (v, again) = respond(&reg, "a", SONNET, 429, &[("retry-after", "30")], b"", NOW + 500);
    assert!(v.retry_elsewhere);
    assert_eq!(again, None, "ends within the tolerance of what is known: nothing new");
    let (_, later) = respond(&reg, "a", SONNET, 429, &[("retry-after", "60")], b"", NOW + 500);
    assert_eq!(later.unwrap().until_ms, NOW + 60_500, "a materially later end is news");
    let (_, shorter) = respond(&reg, "a", SONNET, 429, &[("retry-after", "1")], b"", NOW + 600);
    assert_eq!(shorter, None, "never shortens a known state");
    assert_eq!(reg.availability("a", SONNET, NOW + 600), Availability::At(NOW + 60_500));
}

// ---- overloaded ----

#[test]
fn overloaded_529_cools_down() {
    let reg = HealthRegistry::new("dp-1");
    let body = err_body("overloaded_error", "Overloaded");
    let (v, st) = respond(&reg, "a", SONNET, 529, &[], &body, NOW);
    assert_eq!(
        v,
        Verdict {
            retry_elsewhere: true,
            retry_after: None
        }
    );
    let st = st.unwrap();
    assert_eq!(st.health, pb::AccountHealth::Overloaded as i32);
    assert_eq!(st.until_ms, NOW + 30_000);
    assert_eq!(st.scope, "");
    assert_eq!(st.reason, "529 overloaded_error: cooldown 30s");
    assert_eq!(reg.availability("a", OPUS, NOW + 1), Availability::At(NOW + 30_000));
    assert_eq!(reg.availability("a", OPUS, NOW + 30_000), Availability::Now);

    let s = HealthSettings {
        overloaded: Duration::from_secs(120),
        ..HealthSettings::default()
    };
    let (_, st) = respond_with(&reg, "b", SONNET, 529, &[], &body, &s, NOW);
    assert_eq!(st.unwrap().until_ms, NOW + 120_000);
}

#[test]
fn overloaded_as_first_sse_event() {
    let reg = HealthRegistry::new("dp-1");
    let s = HealthSettings::default();
    let (v, st) = reg.observe(
        "a",
        SONNET,
        &Outcome::StreamError {
            error_type: "overloaded_error",
        },
        &s,
        NOW,
    );
    assert!(v.retry_elsewhere);
    let st = st.unwrap();
    assert_eq!(st.health, pb::AccountHealth::Overloaded as i32);
    assert_eq!(st.until_ms, NOW + 30_000);
    assert_eq!(reg.availability("a", SONNET, NOW), Availability::At(NOW + 30_000));

    let (v, st) = reg.observe(
        "b",
        SONNET,
        &Outcome::StreamError {
            error_type: "invalid_request_error",
        },
        &s,
        NOW,
    );
    assert!(!v.retry_elsewhere);
    assert_eq!(st, None);
    assert_eq!(reg.availability("b", SONNET, NOW), Availability::Now);
}

// ---- circuit breaker ----

#[test]
fn breaker_opens_exactly_at_threshold() {
    let reg = HealthRegistry::new("dp-1");
    assert_eq!(fail(&reg, "a", NOW), None);
    assert_eq!(reg.availability("a", SONNET, NOW), Availability::Now);
    assert_eq!(fail(&reg, "a", NOW + 1), None);
    assert_eq!(reg.availability("a", SONNET, NOW + 1), Availability::Now);
    let st = fail(&reg, "a", NOW + 2).expect("the third failure opens the breaker");
    assert_eq!(st.health, pb::AccountHealth::Erroring as i32);
    assert_eq!(st.until_ms, NOW + 2 + 30_000);
    assert_eq!(st.scope, "");
    assert_eq!(st.reason, "3 consecutive failures (last: 502): breaker open for 30s");
    assert_eq!(reg.availability("a", SONNET, NOW + 3), Availability::At(NOW + 30_002));
    assert_eq!(reg.availability("a", OPUS, NOW + 3), Availability::At(NOW + 30_002));
}

#[test]
fn every_erroring_kind_counts_and_a_success_in_between_resets() {
    let reg = HealthRegistry::new("dp-1");
    let s = HealthSettings::default();
    let (v, _) = reg.observe("a", SONNET, &Outcome::ConnectError, &s, NOW);
    assert_eq!(
        v,
        Verdict {
            retry_elsewhere: true,
            retry_after: None
        }
    );
    let (v, _) = reg.observe("a", SONNET, &Outcome::Timeout, &s, NOW);
    assert!(v.retry_elsewhere);
    assert_eq!(ok(&reg, "a", NOW), None);
    let (v, _) = respond(&reg, "a", SONNET, 500, &[], &err_body("api_error", "Internal"), NOW);
    assert!(v.retry_elsewhere);
    let (v, _) = respond(&reg, "a", SONNET, 503, &[("retry-after", "3")], b"", NOW);
    assert_eq!(v.retry_after, Some(Duration::from_secs(3)));
    assert_eq!(
        reg.availability("a", SONNET, NOW),
        Availability::Now,
        "two since the success"
    );
    let (_, st) = reg.observe(
        "a",
        SONNET,
        &Outcome::StreamError {
            error_type: "api_error",
        },
        &s,
        NOW,
    );
    assert_eq!(
        st.unwrap().reason,
        "3 consecutive failures (last: SSE api_error): breaker open for 30s"
    );
    assert_eq!(reg.availability("a", SONNET, NOW), Availability::At(NOW + 30_000));

    // Any answer from the upstream (even a client error) proves it is reachable.
    let reg = HealthRegistry::new("dp-1");
    fail(&reg, "b", NOW);
    fail(&reg, "b", NOW);
    let _ = respond(
        &reg,
        "b",
        SONNET,
        400,
        &[],
        &err_body("invalid_request_error", "bad"),
        NOW,
    );
    fail(&reg, "b", NOW);
    fail(&reg, "b", NOW);
    assert_eq!(reg.availability("b", SONNET, NOW), Availability::Now);
}

#[test]
fn half_open_allows_one_probe_at_a_time() {
    let reg = HealthRegistry::new("dp-1");
    for _ in 0..3 {
        fail(&reg, "a", NOW);
    }
    let open_until = NOW + 30_000;
    assert_eq!(
        reg.availability("a", SONNET, open_until - 1),
        Availability::At(open_until)
    );
    assert_eq!(reg.availability("a", SONNET, open_until), Availability::Probe);
    let lease = open_until + 30_000;
    assert_eq!(
        reg.availability("a", SONNET, open_until),
        Availability::At(lease),
        "not a second probe"
    );
    assert_eq!(reg.availability("a", OPUS, open_until + 10), Availability::At(lease));
    // The lease runs out: the next caller probes.
    assert_eq!(reg.availability("a", SONNET, lease), Availability::Probe);
    assert_eq!(reg.availability("a", SONNET, lease), Availability::At(lease + 30_000));
    // The prober gives up: released at once.
    reg.release_probe("a");
    assert_eq!(reg.availability("a", SONNET, lease + 1), Availability::Probe);
}

#[test]
fn only_one_of_many_concurrent_callers_gets_the_probe() {
    let reg = std::sync::Arc::new(HealthRegistry::new("dp-1"));
    for _ in 0..3 {
        fail(&reg, "a", NOW);
    }
    let t = NOW + 30_000;
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let reg = reg.clone();
            std::thread::spawn(move || {
                (0..100)
                    .filter(|_| reg.availability("a", SONNET, t) == Availability::Probe)
                    .count()
            })
        })
        .collect();
    let probes: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(probes, 1);
}

#[test]
fn failed_probe_doubles_the_cooldown_up_to_max() {
    let s = HealthSettings {
        max: Duration::from_secs(100),
        ..HealthSettings::default()
    };
    let reg = HealthRegistry::new("dp-1");
    for _ in 0..3 {
        let _ = reg.observe("a", SONNET, &Outcome::Timeout, &s, NOW);
    }
    let mut t = NOW + 30_000;
    assert_eq!(reg.availability("a", SONNET, t), Availability::Probe);
    let (v, st) = reg.observe("a", SONNET, &Outcome::Timeout, &s, t);
    assert!(v.retry_elsewhere);
    let st = st.expect("a reopened breaker is reported");
    assert_eq!(st.health, pb::AccountHealth::Erroring as i32);
    assert_eq!(st.until_ms, t + 60_000);
    assert_eq!(st.reason, "probe failed (timeout): breaker reopened for 1m");
    assert_eq!(reg.availability("a", SONNET, t + 59_999), Availability::At(t + 60_000));
    t += 60_000;
    assert_eq!(reg.availability("a", SONNET, t), Availability::Probe);
    let (_, st) = reg.observe("a", SONNET, &Outcome::ConnectError, &s, t);
    assert_eq!(st.unwrap().until_ms, t + 100_000, "120 s capped at max = 100 s");
    assert_eq!(reg.availability("a", SONNET, t + 1), Availability::At(t + 100_000));
}

#[test]
fn late_failures_while_open_do_not_extend_it() {
    let reg = HealthRegistry::new("dp-1");
    for _ in 0..3 {
        fail(&reg, "a", NOW);
    }
    assert_eq!(fail(&reg, "a", NOW + 10_000), None);
    assert_eq!(
        reg.availability("a", SONNET, NOW + 10_000),
        Availability::At(NOW + 30_000)
    );
    // Nor does a late success cut it short.
    assert_eq!(ok(&reg, "a", NOW + 10_000), None);
    assert_eq!(
        reg.availability("a", SONNET, NOW + 10_000),
        Availability::At(NOW + 30_000)
    );
}

#[test]
fn successful_probe_closes_the_breaker() {
    let reg = HealthRegistry::new("dp-1");
    for _ in 0..3 {
        fail(&reg, "a", NOW);
    }
    let t = NOW + 30_000;
    assert_eq!(reg.availability("a", SONNET, t), Availability::Probe);
    assert_eq!(ok(&reg, "a", t + 100), None, "closing is not reported");
    assert_eq!(reg.availability("a", SONNET, t + 100), Availability::Now);
    assert_eq!(reg.availability("a", SONNET, t + 100), Availability::Now);
    // Closed with a fresh count, and the next opening starts from the base cooldown again.
    assert_eq!(fail(&reg, "a", t + 200), None);
    assert_eq!(fail(&reg, "a", t + 200), None);
    assert_eq!(reg.availability("a", SONNET, t + 200), Availability::Now);
    assert_eq!(fail(&reg, "a", t + 200).unwrap().until_ms, t + 200 + 30_000);
    assert!(reg
        .states(t + 300)
        .iter()
        .any(|s| s.health == pb::AccountHealth::Erroring as i32));
}

#[test]
fn probe_answered_with_a_rate_limit_closes_the_breaker_but_limits() {
    let reg = HealthRegistry::new("dp-1");
    for _ in 0..3 {
        fail(&reg, "a", NOW);
    }
    let t = NOW + 30_000;
    assert_eq!(reg.availability("a", SONNET, t), Availability::Probe);
    let (_, st) = respond(&reg, "a", SONNET, 429, &[("retry-after", "10")], b"", t);
    assert_eq!(st.unwrap().health, pb::AccountHealth::RateLimited as i32);
    assert_eq!(reg.availability("a", SONNET, t), Availability::At(t + 10_000));
    assert_eq!(reg.availability("a", SONNET, t + 10_000), Availability::Now);
}

// ---- unauthorized and blocked ----

#[test]
fn unauthorized_until_the_fleet_clears_it() {
    let reg = HealthRegistry::new("dp-1");
    let body = err_body("authentication_error", "invalid x-api-key");
    let (v, st) = respond(&reg, "a", SONNET, 401, &[], &body, NOW);
    assert_eq!(
        v,
        Verdict {
            retry_elsewhere: true,
            retry_after: None
        }
    );
    let st = st.unwrap();
    assert_eq!(st.health, pb::AccountHealth::Unauthorized as i32);
    assert_eq!(st.until_ms, 0);
    assert_eq!(st.reason, "401 authentication_error");
    assert_eq!(reg.availability("a", SONNET, NOW), Availability::Never);
    assert_eq!(reg.availability("a", OPUS, NOW + 86_400_000), Availability::Never);
    // Later signals never downgrade it.
    let (_, st) = respond(&reg, "a", SONNET, 429, &[("retry-after", "1")], b"", NOW + 1);
    assert_eq!(st, None);
    assert_eq!(reg.availability("a", SONNET, NOW + 5_000), Availability::Never);

    // The control plane records it and pushes it back; then an operator resets it.
    let fleet = shared("a", pb::AccountHealth::Unauthorized, "", 0, NOW + 50);
    reg.sync_shared_at(std::slice::from_ref(&fleet), NOW + 100);
    assert_eq!(reg.availability("a", SONNET, NOW + 100), Availability::Never);
    reg.sync_shared_at(&[], NOW + 200);
    assert_eq!(reg.availability("a", SONNET, NOW + 200), Availability::Now);
    assert!(reg.states(NOW + 200).is_empty());
}

#[test]
fn unauthorized_dropped_by_a_wall_clock_sync_without_it() {
    let reg = HealthRegistry::new("dp-1");
    let _ = respond(&reg, "a", SONNET, 401, &[], b"", NOW);
    assert_eq!(reg.availability("a", SONNET, NOW), Availability::Never);
    reg.sync_shared(&[]);
    assert_eq!(reg.availability("a", SONNET, NOW), Availability::Now);
}

#[test]
fn forbidden_permission_and_authentication_errors() {
    let reg = HealthRegistry::new("dp-1");
    for (account, kind) in [("a", "permission_error"), ("b", "authentication_error")] {
        let (v, st) = respond(&reg, account, SONNET, 403, &[], &err_body(kind, "no"), NOW);
        assert!(v.retry_elsewhere);
        let st = st.unwrap();
        assert_eq!(st.health, pb::AccountHealth::Unauthorized as i32);
        assert_eq!(st.reason, format!("403 {kind}"));
        assert_eq!(reg.availability(account, SONNET, NOW), Availability::Never);
    }
    // A 403 without an Anthropic body (e.g. from a proxy in front) is taken the same way.
    let (v, st) = respond(&reg, "c", SONNET, 403, &[], b"<html>Forbidden</html>", NOW);
    assert!(v.retry_elsewhere);
    assert_eq!(st.unwrap().health, pb::AccountHealth::Unauthorized as i32);
    let (_, st) = reg.observe(
        "d",
        SONNET,
        &Outcome::StreamError {
            error_type: "permission_error",
        },
        &HealthSettings::default(),
        NOW,
    );
    assert_eq!(st.unwrap().until_ms, 0);
}

#[test]
fn disabled_organization_is_blocked() {
    let reg = HealthRegistry::new("dp-1");
    let body = err_body("invalid_request_error", "This organization has been disabled.");
    let (v, st) = respond(&reg, "a", SONNET, 400, &[], &body, NOW);
    assert_eq!(
        v,
        Verdict {
            retry_elsewhere: true,
            retry_after: None
        }
    );
    let st = st.unwrap();
    assert_eq!(st.health, pb::AccountHealth::Blocked as i32);
    assert_eq!(st.until_ms, 0);
    assert_eq!(st.reason, "400: organization disabled");
    assert_eq!(reg.availability("a", SONNET, NOW + 86_400_000), Availability::Never);

    let body = err_body("permission_error", "This organization has been disabled.");
    let (v, st) = respond(&reg, "b", SONNET, 403, &[], &body, NOW);
    assert!(v.retry_elsewhere);
    assert_eq!(st.unwrap().health, pb::AccountHealth::Blocked as i32);

    // Blocked after unauthorized is news (a different permanent state).
    let _ = respond(&reg, "c", SONNET, 401, &[], b"", NOW);
    let body = err_body("invalid_request_error", "This organization has been disabled.");
    let (_, st) = respond(&reg, "c", SONNET, 400, &[], &body, NOW + 1);
    assert_eq!(st.unwrap().health, pb::AccountHealth::Blocked as i32);
    let (_, st) = respond(&reg, "c", SONNET, 400, &[], &body, NOW + 2);
    assert_eq!(st, None, "the same permanent state is not news");
}

#[test]
fn an_account_out_of_credit_or_at_a_wrong_url_is_the_accounts_fault() {
    let reg = HealthRegistry::new("dp-1");
    let credit = err_body(
        "invalid_request_error",
        "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits.",
    );
    let (v, st) = respond(&reg, "a", SONNET, 400, &[], &credit, NOW);
    assert!(v.retry_elsewhere);
    let st = st.unwrap();
    assert_eq!(st.health, pb::AccountHealth::Blocked as i32);
    assert!(st.reason.contains("out of credit"), "{}", st.reason);
    let (v, st) = respond(
        &reg,
        "b",
        SONNET,
        402,
        &[],
        &err_body("billing_error", "no credit"),
        NOW,
    );
    assert!(v.retry_elsewhere);
    assert_eq!(st.unwrap().health, pb::AccountHealth::Blocked as i32);
    // Anthropic's own 404 for a path that does not exist (a base URL with a stray prefix).
    let (v, _) = respond(
        &reg,
        "c",
        SONNET,
        404,
        &[],
        &err_body("not_found_error", "Not Found"),
        NOW,
    );
    assert!(v.retry_elsewhere);
    let (v, _) = respond(
        &reg,
        "d",
        SONNET,
        408,
        &[],
        &err_body("timeout_error", "Request timed out"),
        NOW,
    );
    assert!(v.retry_elsewhere);
}

// ---- unified utilization ----

#[test]
fn unified_utilization_at_threshold_limits_until_the_window_reset() {
    let reg = HealthRegistry::new("dp-1");
    let reset_5h = ((NOW + 2 * 3_600_000) / 1000).to_string();
    let reset_7d = ((NOW + 3 * 3_600_000) / 1000).to_string();
    let below = [
        ("anthropic-ratelimit-unified-status", "allowed_warning"),
        ("anthropic-ratelimit-unified-5h-utilization", "0.97"),
        ("anthropic-ratelimit-unified-5h-reset", reset_5h.as_str()),
        ("anthropic-ratelimit-unified-7d-utilization", "0.5"),
        ("anthropic-ratelimit-unified-7d-reset", reset_7d.as_str()),
    ];
    assert_eq!(
        reg.on_success("a", SONNET, &hm(&below), &HealthSettings::default(), NOW),
        None
    );
    assert_eq!(reg.availability("a", SONNET, NOW), Availability::Now);

    let at = [
        ("anthropic-ratelimit-unified-status", "allowed_warning"),
        ("anthropic-ratelimit-unified-5h-utilization", "0.98"),
        ("anthropic-ratelimit-unified-5h-reset", reset_5h.as_str()),
        ("anthropic-ratelimit-unified-7d-utilization", "0.5"),
        ("anthropic-ratelimit-unified-7d-reset", reset_7d.as_str()),
    ];
    let st = reg
        .on_success("a", SONNET, &hm(&at), &HealthSettings::default(), NOW)
        .expect("crossing the threshold is reported");
    assert_eq!(st.health, pb::AccountHealth::RateLimited as i32);
    assert_eq!(st.scope, "");
    assert_eq!(st.until_ms, NOW + 2 * 3_600_000);
    assert_eq!(st.reason, "unified 5h utilization 98.0% >= 98.0%: until reset in 2h");
    assert_eq!(
        reg.availability("a", OPUS, NOW + 1),
        Availability::At(NOW + 2 * 3_600_000)
    );
    assert_eq!(
        reg.on_success("a", SONNET, &hm(&at), &HealthSettings::default(), NOW + 10),
        None,
        "only the crossing is reported"
    );

    // The 7d window, in percent; its reset applies.
    let pct = [
        ("anthropic-ratelimit-unified-5h-utilization", "12.5"),
        ("anthropic-ratelimit-unified-5h-reset", reset_5h.as_str()),
        ("anthropic-ratelimit-unified-7d-utilization", "99.0"),
        ("anthropic-ratelimit-unified-7d-reset", reset_7d.as_str()),
    ];
    let st = reg
        .on_success("b", SONNET, &hm(&pct), &HealthSettings::default(), NOW)
        .unwrap();
    assert_eq!(st.until_ms, NOW + 3 * 3_600_000);
    assert_eq!(st.reason, "unified 7d utilization 99.0% >= 98.0%: until reset in 3h");

    // 12.5 % and 0.5 (a fraction) are both far below.
    let low = [
        ("anthropic-ratelimit-unified-5h-utilization", "12.5"),
        ("anthropic-ratelimit-unified-7d-utilization", "0.5"),
    ];
    assert_eq!(
        reg.on_success("c", SONNET, &hm(&low), &HealthSettings::default(), NOW),
        None
    );

    // A per-account threshold.
    let s = HealthSettings {
        unified_threshold: 0.9,
        ..HealthSettings::default()
    };
    let (_, st) = respond_with(&reg, "d", SONNET, 200, &below, b"", &s, NOW);
    assert_eq!(st.unwrap().until_ms, NOW + 2 * 3_600_000);
}

#[test]
fn unified_rejected_status_and_cap() {
    let reg = HealthRegistry::new("dp-1");
    let reset = ((NOW + 600_000) / 1000).to_string();
    let h = [
        ("anthropic-ratelimit-unified-status", "rejected"),
        ("anthropic-ratelimit-unified-reset", reset.as_str()),
    ];
    let st = reg
        .on_success("a", SONNET, &hm(&h), &HealthSettings::default(), NOW)
        .unwrap();
    assert_eq!(st.until_ms, NOW + 600_000);
    assert_eq!(st.reason, "unified status rejected: until reset in 10m");

    let far = ((NOW + 5 * 86_400_000) / 1000).to_string();
    let h = [
        ("anthropic-ratelimit-unified-7d-utilization", "1.0"),
        ("anthropic-ratelimit-unified-7d-reset", far.as_str()),
    ];
    let st = reg
        .on_success("b", SONNET, &hm(&h), &HealthSettings::default(), NOW)
        .unwrap();
    assert_eq!(st.until_ms, NOW + 6 * 3_600_000, "capped at max");

    // A 429 whose utilization is over the threshold: both end up account-wide; the later wins.
    let reset_5h = ((NOW + 3_600_000) / 1000).to_string();
    let h = [
        ("retry-after", "30"),
        ("anthropic-ratelimit-unified-status", "allowed"),
        ("anthropic-ratelimit-unified-5h-utilization", "1.0"),
        ("anthropic-ratelimit-unified-5h-reset", reset_5h.as_str()),
    ];
    let (v, st) = respond(&reg, "c", SONNET, 429, &h, b"", NOW);
    assert_eq!(v.retry_after, Some(Duration::from_secs(30)));
    assert_eq!(st.unwrap().until_ms, NOW + 3_600_000);
    assert_eq!(reg.availability("c", SONNET, NOW), Availability::At(NOW + 3_600_000));
}

// ---- the fleet view ----

#[test]
fn shared_states_block_until_they_expire() {
    let reg = HealthRegistry::new("dp-1");
    reg.sync_shared_at(
        &[
            shared("a", pb::AccountHealth::RateLimited, "", NOW + 10_000, NOW - 1),
            shared("b", pb::AccountHealth::Overloaded, "opus", NOW + 20_000, NOW - 1),
            shared("c", pb::AccountHealth::Blocked, "", 0, NOW - 1),
            shared("d", pb::AccountHealth::Unspecified, "", 0, NOW - 1),
            shared("e", pb::AccountHealth::Erroring, "", NOW - 1, NOW - 10),
        ],
        NOW,
    );
    assert_eq!(reg.availability("a", SONNET, NOW), Availability::At(NOW + 10_000));
    assert_eq!(reg.availability("a", SONNET, NOW + 10_000), Availability::Now);
    assert_eq!(reg.availability("b", OPUS, NOW), Availability::At(NOW + 20_000));
    assert_eq!(reg.availability("b", SONNET, NOW), Availability::Now);
    assert_eq!(reg.availability("c", SONNET, NOW), Availability::Never);
    assert_eq!(
        reg.availability("d", SONNET, NOW),
        Availability::Now,
        "unspecified is ignored"
    );
    assert_eq!(reg.availability("e", SONNET, NOW), Availability::Now, "already expired");
    let ids: Vec<String> = reg.states(NOW).into_iter().map(|s| s.account_id).collect();
    assert_eq!(ids, vec!["a", "b", "c"]);
    assert_eq!(reg.states(NOW)[0].reported_by, "dp-other");
}

#[test]
fn each_sync_replaces_the_fleet_view() {
    let reg = HealthRegistry::new("dp-1");
    reg.sync_shared_at(&[shared("a", pb::AccountHealth::Blocked, "", 0, NOW)], NOW);
    assert_eq!(reg.availability("a", SONNET, NOW), Availability::Never);
    reg.sync_shared_at(
        &[shared("b", pb::AccountHealth::RateLimited, "", NOW + 5_000, NOW)],
        NOW + 1,
    );
    assert_eq!(reg.availability("a", SONNET, NOW + 1), Availability::Now);
    assert_eq!(reg.availability("b", SONNET, NOW + 1), Availability::At(NOW + 5_000));
    reg.sync_shared_at(&[], NOW + 2);
    assert_eq!(reg.availability("b", SONNET, NOW + 2), Availability::Now);
    assert!(reg.states(NOW + 2).is_empty());
}

#[test]
fn local_states_survive_a_sync_while_newer_or_in_flight() {
    let reg = HealthRegistry::new("dp-1");
    // Observed here; the report has not reached the fleet yet.
    let _ = respond(&reg, "a", SONNET, 429, &[("retry-after", "60")], b"", NOW);
    reg.sync_shared_at(&[], NOW + 1_000);
    assert_eq!(
        reg.availability("a", SONNET, NOW + 1_000),
        Availability::At(NOW + 60_000),
        "in flight: kept"
    );
    reg.sync_shared_at(&[], NOW + REPORT_GRACE_MS);
    assert_eq!(
        reg.availability("a", SONNET, NOW + REPORT_GRACE_MS),
        Availability::Now,
        "never confirmed within the grace: dropped"
    );

    // Newer than the fleet's state of the same scope: kept next to it.
    let _ = respond(&reg, "b", SONNET, 429, &[("retry-after", "60")], b"", NOW);
    let older = shared("b", pb::AccountHealth::RateLimited, "", NOW + 10_000, NOW - 5_000);
    reg.sync_shared_at(std::slice::from_ref(&older), NOW + 10);
    assert_eq!(
        reg.availability("b", SONNET, NOW + 20_000),
        Availability::At(NOW + 60_000)
    );
    // Once the fleet has shown a state and then drops it, the local one goes too (a reset).
    reg.sync_shared_at(&[], NOW + 30);
    assert_eq!(reg.availability("b", SONNET, NOW + 30), Availability::Now);

    // Older than the fleet's state: the fleet's wins.
    let _ = respond(&reg, "c", SONNET, 429, &[("retry-after", "60")], b"", NOW);
    let newer = shared("c", pb::AccountHealth::Overloaded, "", NOW + 5_000, NOW + 100);
    reg.sync_shared_at(std::slice::from_ref(&newer), NOW + 200);
    assert_eq!(reg.availability("c", SONNET, NOW + 200), Availability::At(NOW + 5_000));
    let st = reg.states(NOW + 200);
    assert_eq!(st.len(), 1);
    assert_eq!(st[0].health, pb::AccountHealth::Overloaded as i32);
}

#[test]
fn known_shared_states_are_not_reported_again() {
    let reg = HealthRegistry::new("dp-1");
    reg.sync_shared_at(
        &[shared("a", pb::AccountHealth::RateLimited, "", NOW + 60_000, NOW)],
        NOW,
    );
    let (v, st) = respond(&reg, "a", SONNET, 429, &[("retry-after", "30")], b"", NOW);
    assert!(v.retry_elsewhere);
    assert_eq!(st, None, "the fleet already knows a longer limit");
    let (_, st) = respond(&reg, "a", SONNET, 429, &[("retry-after", "120")], b"", NOW);
    assert_eq!(st.unwrap().until_ms, NOW + 120_000);
}

#[test]
fn breaker_counters_survive_syncs() {
    let reg = HealthRegistry::new("dp-1");
    fail(&reg, "a", NOW);
    fail(&reg, "a", NOW);
    reg.sync_shared_at(&[], NOW);
    reg.sync_shared_at(&[shared("z", pb::AccountHealth::Blocked, "", 0, NOW)], NOW);
    assert!(fail(&reg, "a", NOW).is_some(), "the third failure still opens it");
    reg.sync_shared_at(&[], NOW + 1);
    assert_eq!(reg.availability("a", SONNET, NOW + 1), Availability::At(NOW + 30_000));
    assert_eq!(reg.availability("a", SONNET, NOW + 30_000), Availability::Probe);
}

fn config_with(accounts: &[(&str, u64)], states: Vec<pb::AccountState>) -> pb::Resources {
    pb::Resources {
        accounts: accounts
            .iter()
            .map(|(id, generation)| pb::Account {
                id: id.to_string(),
                reset_generation: *generation,
                ..Default::default()
            })
            .collect(),
        account_states: states,
        ..Default::default()
    }
}

#[test]
fn every_setting_read_here_is_declared_with_its_default() {
    for key in [
        KEY_RATE_LIMIT_DEFAULT,
        KEY_OVERLOADED,
        KEY_ERRORING,
        KEY_MAX,
        KEY_MIN,
        KEY_BREAKER_THRESHOLD,
        KEY_UNIFIED_THRESHOLD,
    ] {
        assert!(settings::get(key).is_some_and(|s| s.per_account), "{key}");
    }
    let d = HealthSettings::default();
    assert_eq!(d.breaker_threshold, 3);
    assert_eq!(d.rate_limit_default, Duration::from_secs(60));
    assert_eq!(d.min, Duration::from_secs(1));
    assert_eq!(d.unified_threshold, 0.98);
}

#[test]
fn an_operator_reset_clears_the_local_breaker_and_states() {
    let reg = HealthRegistry::new("dp-1");
    reg.sync_at(&config_with(&[("a", 0), ("b", 0)], vec![]), NOW);
    for _ in 0..3 {
        fail(&reg, "a", NOW);
    }
    let _ = respond(&reg, "b", SONNET, 401, &[], b"", NOW);
    assert_eq!(reg.availability("a", SONNET, NOW + 1), Availability::At(NOW + 30_000));
    assert_eq!(reg.availability("b", SONNET, NOW + 1), Availability::Never);
    // An unrelated config change keeps both.
    reg.sync_at(&config_with(&[("a", 0), ("b", 0)], vec![]), NOW + 2);
    assert_eq!(reg.availability("a", SONNET, NOW + 3), Availability::At(NOW + 30_000));
    // `account reset a`: its generation moves; b's does not.
    reg.sync_at(&config_with(&[("a", 1), ("b", 0)], vec![]), NOW + 4);
    assert_eq!(reg.availability("a", SONNET, NOW + 5), Availability::Now);
    assert_eq!(reg.availability("b", SONNET, NOW + 5), Availability::Never);
    assert_eq!(reg.generation("a"), 1, "reports now carry the new generation");
    // The report of b's 401, made before b's reset, and the reset arrive in one
    // update (the state never shown): the reset wins at once.
    reg.sync_at(&config_with(&[("a", 1), ("b", 1)], vec![]), NOW + 6);
    assert_eq!(reg.availability("b", SONNET, NOW + 7), Availability::Now);
    // A 401 answering a request sent before a's reset (with the old credential) is not a
    // verdict on the account as it is now: nothing recorded, nothing reported.
    let (_, report) = reg.observe_as_of(
        "a",
        0,
        SONNET,
        &Outcome::Response {
            status: 401,
            headers: &HeaderMap::new(),
            body: b"",
        },
        &HealthSettings::default(),
        NOW + 7,
    );
    assert_eq!(report, None);
    assert_eq!(reg.availability("a", SONNET, NOW + 7), Availability::Now);
    // The same answer to a request sent under the current generation counts, and says so.
    let (_, report) = reg.observe_as_of(
        "a",
        1,
        SONNET,
        &Outcome::Response {
            status: 401,
            headers: &HeaderMap::new(),
            body: b"",
        },
        &HealthSettings::default(),
        NOW + 7,
    );
    assert_eq!(report.map(|r| r.reset_generation), Some(1));
    // A deleted account is forgotten.
    let _ = respond(&reg, "a", SONNET, 401, &[], b"", NOW + 8);
    reg.sync_at(&config_with(&[("b", 1)], vec![]), NOW + 9);
    assert!(reg.states(NOW + 10).is_empty());
}

#[test]
fn states_view_merges_local_shared_and_breaker() {
    let reg = HealthRegistry::new("dp-1");
    let _ = respond(&reg, "a", SONNET, 529, &[], b"", NOW);
    for _ in 0..3 {
        fail(&reg, "b", NOW);
    }
    reg.sync_shared_at(
        &[
            shared("a", pb::AccountHealth::RateLimited, "", NOW + 5_000, NOW - 10),
            shared("c", pb::AccountHealth::Unauthorized, "", 0, NOW - 10),
        ],
        NOW,
    );
    let view: Vec<(String, i32, i64)> = reg
        .states(NOW)
        .into_iter()
        .map(|s| (s.account_id, s.health, s.until_ms))
        .collect();
    assert_eq!(
        view,
        vec![
            ("a".into(), pb::AccountHealth::Overloaded as i32, NOW + 30_000),
            ("b".into(), pb::AccountHealth::Erroring as i32, NOW + 30_000),
            ("c".into(), pb::AccountHealth::Unauthorized as i32, 0),
        ]
    );
    assert!(reg.states(NOW + 30_000).iter().all(|s| s.account_id == "c"));
}

#[test]
fn healthy_traffic_leaves_no_trace() {
    let reg = HealthRegistry::new("dp-1");
    for i in 0..10 {
        assert_eq!(ok(&reg, &format!("acc-{i}"), NOW), None);
    }
    assert!(
        reg.accounts.read().unwrap().is_empty(),
        "successes on unknown accounts insert nothing"
    );
    fail(&reg, "x", NOW);
    ok(&reg, "x", NOW);
    reg.sync_shared_at(&[], NOW);
    assert!(
        reg.accounts.read().unwrap().is_empty(),
        "idle accounts are pruned on sync"
    );
}

#[test]
fn reasons_never_echo_upstream_messages() {
    let reg = HealthRegistry::new("dp-1");
    let body = err_body("authentication_error", "invalid x-api-key sk-ant-api03-SECRET");
    let (_, st) = respond(&reg, "a", SONNET, 401, &[], &body, NOW);
    assert_eq!(st.unwrap().reason, "401 authentication_error");
    // Error types are reduced to [A-Za-z0-9_], at most 40 characters.
    let body = err_body("weird type\"; with {json} and a very long tail that goes on", "x");
    let (_, st) = respond(&reg, "b", SONNET, 403, &[], &body, NOW);
    assert_eq!(st, None, "an unknown 403 type is a client error");
    let (_, st) = respond(&reg, "b", SONNET, 500, &[], &body, NOW);
    assert_eq!(st, None);
    assert_eq!(clean_type("weird type\"; with {json}"), "weirdtypewithjson");
    assert_eq!(clean_type(&"x".repeat(100)).len(), 40);
}

#[test]
fn durations_format() {
    assert_eq!(fmt_ms(30_000), "30s");
    assert_eq!(fmt_ms(90_000), "1m30s");
    assert_eq!(fmt_ms(6 * 3_600_000), "6h");
    assert_eq!(fmt_ms(1_500), "1.5s");
    assert_eq!(fmt_ms(250), "250ms");
    assert_eq!(fmt_ms(0), "0s");
}
