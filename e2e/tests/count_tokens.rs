//! count_tokens when no account can answer it: relay's own estimate, marked `x-relay-estimate: true`;
//! when an account can, the upstream's count and no mark.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use relay_mock_upstream::{expected_usage, Fault, MockConfig};
use serde_json::json;
use std::time::{Duration, Instant};

const SECOND_SECRET: &str = "sk-ant-api03-e2e-SECOND-ACCOUNT-0123456789";

struct Setup {
    cp: ControlPlane,
    mock: relay_mock_upstream::MockUpstream,
    dp: DataPlane,
    key: String,
    _dir: tempfile::TempDir,
}

/// Two accounts on the mock, one key.
async fn setup() -> Setup {
    recorder();
    let cp = ControlPlane::start(Backend::Sqlite).await;
    let mock = mock(MockConfig::default()).await;
    cp.add_account("acct-1", &mock.base_url(), ACCOUNT_SECRET).await;
    cp.add_account("acct-2", &mock.base_url(), SECOND_SECRET).await;
    let (_, key) = cp.add_key("client-1", &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let dp = DataPlane::start(&cp.url(), "dp-1", dir.path().join("dp-1")).await;
    dp.wait_version(cp.head().await).await;
    Setup {
        cp,
        mock,
        dp,
        key,
        _dir: dir,
    }
}

/// A conversation of a few hundred tokens: large enough for a meaningful comparison with the mock's count.
fn body() -> serde_json::Value {
    json!({
        "model": "claude-sonnet-4-5",
        "messages": [
            {"role": "user", "content": "I am planning a trip to Lisbon in the spring. What neighbourhoods would you recommend for a first visit, and how many days should I plan to see the main sights without rushing?"},
            {"role": "assistant", "content": "For a first visit, stay in Baixa or Chiado: both are central, walkable and close to the river. Alfama is charming but hilly, and Principe Real is quieter with good restaurants. Four days lets you see the castle, Belem, the tram 28 route and a day trip to Sintra without rushing."},
            {"role": "user", "content": "Thanks. Is Sintra worth a whole day, or can it be combined with Cascais?"},
        ],
    })
}

async fn count(s: &Setup, body: &serde_json::Value) -> HttpResponse {
    post(&s.dp, "/v1/messages/count_tokens?beta=true", &s.key, body, &[]).await
}

/// The process's metrics (installed once, before the first data plane of this test binary starts).
fn recorder() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static H: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> = std::sync::OnceLock::new();
    H.get_or_init(|| relay_runtime::metrics::builder().install_recorder().unwrap())
}

/// `relay_count_tokens_estimated_total{why}` (tests of this file run at once: each looks at its own `why`).
fn estimated(why: &str) -> u64 {
    let needle = format!("relay_count_tokens_estimated_total{{why=\"{why}\"}} ");
    recorder()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(&needle)?.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_account_that_answers_gives_the_upstreams_count() {
    let s = setup().await;
    let r = count(&s, &body()).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["input_tokens"], expected_usage(&body()).input_tokens);
    assert_eq!(r.header("x-relay-estimate"), None);
    assert!(r.header("request-id").is_some());
    // One account rate limited: the other answers, still no estimate.
    s.mock
        .set_fault(ACCOUNT_SECRET, Some(Fault::RateLimited { retry_after_secs: 30 }));
    for _ in 0..3 {
        let r = count(&s, &body()).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["input_tokens"], expected_usage(&body()).input_tokens);
        assert_eq!(r.header("x-relay-estimate"), None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_account_rate_limited_gives_the_estimate() {
    let s = setup().await;
    for secret in [ACCOUNT_SECRET, SECOND_SECRET] {
        s.mock
            .set_fault(secret, Some(Fault::RateLimited { retry_after_secs: 30 }));
    }
    let mock_count = expected_usage(&body()).input_tokens;
    // First: both accounts answer 429. Then: both are cooling down, none is tried, and the request does not
    // wait out the 30 s (count_tokens waits at most 2 s for an account).
    for round in 0..2 {
        let started = Instant::now();
        let r = count(&s, &body()).await;
        assert_eq!(r.status, 200, "round {round}: {:?}", r.body);
        assert_eq!(r.header("x-relay-estimate"), Some("true"));
        assert!(r.header("request-id").is_some());
        let n = r.json()["input_tokens"].as_u64().unwrap();
        // Plausible: within 10% of the mock's count for this plain-text conversation (see docs/token-estimate.md).
        let err = (n as f64 - mock_count as f64).abs() / mock_count as f64;
        assert!(err <= 0.10, "estimate {n}, mock {mock_count}");
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    }
    // The first round's accounts answered 429; the second found none available.
    assert_eq!((estimated("upstream_error"), estimated("no_account")), (1, 1));
    // The Messages API never gets an estimate: its error is as before (after a short wait for an account).
    s.cp.set_setting("queue.max_wait_ms", "200").await;
    s.dp.wait_version(s.cp.head().await).await;
    let r = post_messages(&s.dp, &s.key, &message_body("claude-sonnet-4-5", false)).await;
    assert_ne!(r.status, 200);
    assert_eq!(r.header("x-relay-estimate"), None);
    // Bad input is still Anthropic's error, not an estimate.
    let h = sdk_headers(&s.key);
    let hs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let r = send("POST", &s.dp.url("/v1/messages/count_tokens"), &hs, "{not json").await;
    assert_eq!((r.status, r.error_type()), (400, "invalid_request_error".to_string()));
    let r = count(&s, &json!({"model": "claude-sonnet-4-5"})).await;
    assert_eq!((r.status, r.error_type()), (400, "invalid_request_error".to_string()));
    assert_eq!(r.header("x-relay-estimate"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstreams_without_count_tokens_give_the_estimate_and_keep_serving_messages() {
    let s = setup().await;
    // A third account: the answers of two say enough, the third is not asked.
    s.cp.add_account("acct-3", &s.mock.base_url(), "third-account-secret")
        .await;
    s.dp.wait_version(s.cp.head().await).await;
    s.mock.set_count_tokens_served(false);
    for _ in 0..8 {
        let r = count(&s, &body()).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.header("x-relay-estimate"), Some("true"));
        assert!(r.json()["input_tokens"].as_u64().unwrap() > 50);
    }
    // Two accounts were asked each time (the 404 is not the account's fault, so the next one is
    // tried; two such answers end it), never all three…
    let asked = s
        .mock
        .requests()
        .iter()
        .filter(|r| r.path() == "/v1/messages/count_tokens")
        .count();
    assert_eq!(asked, 16);
    assert_eq!(estimated("endpoint_missing"), 8);
    // …and their Messages API is untouched: no breaker opened on those 404s.
    for _ in 0..4 {
        let r = post_messages(&s.dp, &s.key, &message_body("claude-sonnet-4-5", false)).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    // Once an upstream serves it again, its count comes back.
    s.mock.set_count_tokens_served(true);
    let r = count(&s, &body()).await;
    assert_eq!(r.header("x-relay-estimate"), None);
    assert_eq!(r.json()["input_tokens"], expected_usage(&body()).input_tokens);
}
