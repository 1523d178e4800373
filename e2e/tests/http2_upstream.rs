//! HTTP/2 to the upstream (issue 17): the mock upstream serves HTTPS with a test CA and offers ALPN `h2`
//! (as api.anthropic.com does), or only `http/1.1` (an upstream without HTTP/2).
//!
//! - JSON and streamed answers reach the client byte for byte as the mock sent them, many at once on one
//!   upstream connection, and usage is exact.
//! - Failover and the account states a 429, 529, 500 or a dropped stream leave are those of HTTP/1.1.
//! - A stream broken mid-way (the stream reset, the connection closed) ends for the client exactly as over
//!   HTTP/1.1 (the events so far, then relay's `api_error` event; a failed usage row); a GOAWAY lets the
//!   streams in flight finish and the next request opens a new connection.
//! - Without `h2` offered, relay speaks HTTP/1.1; `upstream.http_version` forces either version.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use relay_mock_upstream::{expected_usage, Fault, MockConfig, MockUpstream};
use relay_proto::v1 as pb;
use relay_test_support::wait_for;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;

struct Setup {
    cp: ControlPlane,
    mock: MockUpstream,
    dp: DataPlane,
    key: String,
    _dir: tempfile::TempDir,
}

fn cred(i: usize) -> String {
    format!("cred-{i}")
}

/// A control plane, a mock (HTTPS unless `plain`; `h2` offered or not), `accounts` accounts on it
/// (credentials `cred-i`), `settings`, a key and a data plane trusting the mock's CA.
async fn setup_with(mock_config: MockConfig, plain: bool, accounts: usize, settings: &[(&str, &str)]) -> Setup {
    let (ca_pem, tls) = test_pki();
    let dir = tempfile::tempdir().unwrap();
    let ca_file: PathBuf = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let mock = mock(MockConfig {
        tls: (!plain).then_some(tls),
        ..mock_config
    })
    .await;
    let cp = ControlPlane::start(Backend::Sqlite).await;
    for i in 0..accounts {
        cp.add_account(&format!("acct-{i}"), &mock.base_url(), &cred(i)).await;
    }
    cp.set_setting("retry.backoff_base_ms", "1").await;
    cp.set_setting("retry.backoff_max_ms", "5").await;
    for (k, v) in settings {
        cp.set_setting(k, v).await;
    }
    let (_, key) = cp.add_key("client", &[]).await;
    let dp = DataPlane::start_with(&cp.url(), "dp-h2", dir.path().join("dp"), |o| {
        o.extra_ca_file = Some(ca_file.clone());
    })
    .await;
    dp.wait_version(cp.head().await).await;
    Setup {
        cp,
        mock,
        dp,
        key,
        _dir: dir,
    }
}

async fn setup(h2: bool, accounts: usize, settings: &[(&str, &str)]) -> Setup {
    setup_with(
        MockConfig {
            h2,
            ..MockConfig::default()
        },
        false,
        accounts,
        settings,
    )
    .await
}

/// The HTTP version and ALPN protocol of every request the mock served.
fn versions(mock: &MockUpstream) -> Vec<(http::Version, Option<String>)> {
    mock.requests()
        .into_iter()
        .map(|q| (q.version, q.tls.and_then(|t| t.alpn)))
        .collect()
}

/// A distinct conversation (one conversation would stick to one account).
fn body(i: usize, stream: bool) -> Value {
    let mut b = message_body("claude-sonnet-4-5", stream);
    b["messages"][0]["content"] = json!(format!("conversation {i}"));
    b
}

/// The client got, byte for byte, what the mock sent for this request.
fn assert_identical(s: &Setup, r: &HttpResponse, stream: bool) {
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let id = r.header("x-upstream-request-id").unwrap();
    assert_eq!(
        r.body,
        s.mock.sent_body(id).unwrap(),
        "byte-identical body (stream: {stream})"
    );
    if stream {
        assert_eq!(r.header("content-type"), Some("text/event-stream"));
        let text = String::from_utf8_lossy(&r.body);
        assert!(text.trim_end().ends_with("data: {\"type\":\"message_stop\"}"), "{text}");
    } else {
        assert_eq!(r.json()["type"], "message");
    }
}

async fn wait_usage(cp: &ControlPlane, n: u64) -> relay_control_plane::model::UsageRow {
    wait_for(Duration::from_secs(10), "usage to be stored", || async {
        let t = cp.usage_total().await;
        (t.requests >= n).then_some(t)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answers_over_h2_are_byte_identical_share_one_connection_and_usage_is_exact() {
    let s = setup(true, 1, &[]).await;
    // The first request opens the connection; the next 40 (half of them streams) run at once on it.
    let r = post_messages(&s.dp, &s.key, &body(0, true)).await;
    assert_identical(&s, &r, true);
    let mut tasks = Vec::new();
    for i in 1..=40 {
        let (dp_url, key) = (s.dp.url("/v1/messages"), s.key.clone());
        tasks.push(tokio::spawn(async move {
            let stream = i % 2 == 0;
            let h = sdk_headers(&key);
            let hs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            (stream, send("POST", &dp_url, &hs, body(i, stream).to_string()).await)
        }));
    }
    for t in tasks {
        let (stream, r) = t.await.unwrap();
        assert_identical(&s, &r, stream);
    }
    let seen = versions(&s.mock);
    assert_eq!(seen.len(), 41);
    assert!(
        seen.iter()
            .all(|v| *v == (http::Version::HTTP_2, Some("h2".to_string()))),
        "every request went over HTTP/2: {seen:?}"
    );
    assert_eq!(s.mock.connections(), 1, "one connection carried every stream");
    assert!(s.mock.max_in_flight() > 1, "streams ran concurrently");

    // Usage: exact to the token for every one of them.
    let t = wait_usage(&s.cp, 41).await;
    let expected = expected_usage(&body(0, true));
    assert_eq!((t.requests, t.errors), (41, 0));
    assert_eq!(t.input_tokens, 41 * expected.input_tokens);
    assert_eq!(t.output_tokens, 41 * expected.output_tokens);
}

async fn account_states(cp: &ControlPlane, name: &str) -> Vec<pb::AccountState> {
    cp.admin()
        .await
        .get_account(pb::GetAccountRequest { account: name.into() })
        .await
        .unwrap()
        .into_inner()
        .states
}

/// What one failure kind leaves, seen through relay: every request answered, how often the broken
/// account was tried, its state and cooldown.
async fn failover_outcome(h2: bool, fault: Fault) -> (pb::AccountHealth, Option<i64>) {
    let s = setup(h2, 2, &[("breaker.threshold", "1")]).await;
    s.mock.set_fault(&cred(0), Some(fault));
    let started = chrono_now_ms();
    for i in 0..8 {
        let stream = i % 2 == 0;
        let r = post_messages(&s.dp, &s.key, &body(i, stream)).await;
        assert_eq!(r.status, 200, "{fault:?} h2={h2}: {}", String::from_utf8_lossy(&r.body));
        if stream {
            let text = String::from_utf8_lossy(&r.body);
            assert!(
                text.contains("event: message_stop") && !text.contains("event: error"),
                "{text}"
            );
        }
    }
    let want = if h2 {
        http::Version::HTTP_2
    } else {
        http::Version::HTTP_11
    };
    assert!(versions(&s.mock).iter().all(|(v, _)| *v == want), "{fault:?} h2={h2}");
    let broken = s
        .mock
        .requests()
        .iter()
        .filter(|q| q.header("x-api-key") == Some(&cred(0)))
        .count();
    assert!(
        broken <= 4,
        "{fault:?} h2={h2}: the broken account was hit {broken} times"
    );
    let states = wait_for(Duration::from_secs(5), "the account state", || async {
        let st = account_states(&s.cp, "acct-0").await;
        (!st.is_empty()).then_some(st)
    })
    .await
    .unwrap();
    let health = pb::AccountHealth::try_from(states[0].health).unwrap();
    // The cooldown, rounded to seconds (from when the test started).
    let cooldown = (states[0].until_ms > 0).then(|| ((states[0].until_ms - started) as f64 / 1000.0).round() as i64);
    (health, cooldown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failover_and_account_states_are_the_same_over_h2_as_over_http1() {
    for (fault, health) in [
        (
            Fault::RateLimited { retry_after_secs: 30 },
            pb::AccountHealth::RateLimited,
        ),
        (Fault::Overloaded, pb::AccountHealth::Overloaded),
        (Fault::ServerError, pb::AccountHealth::Erroring),
        (Fault::Unauthorized, pb::AccountHealth::Unauthorized),
        // Over h2 a stream reset, over HTTP/1.1 a closed connection, before the first event.
        (Fault::DropMidStream { after_events: 0 }, pb::AccountHealth::Erroring),
    ] {
        let over_h1 = failover_outcome(false, fault).await;
        let over_h2 = failover_outcome(true, fault).await;
        assert_eq!(over_h1.0, health, "{fault:?} over HTTP/1.1");
        assert_eq!(over_h2, over_h1, "{fault:?}: HTTP/2 as HTTP/1.1 (health, cooldown s)");
    }
}

/// The SSE events of a body: (name, data).
fn events(body: &[u8]) -> Vec<(String, Value)> {
    let text = std::str::from_utf8(body).unwrap();
    assert!(text.ends_with("\n\n"), "not on an event boundary: {text:?}");
    text.split("\n\n")
        .filter(|b| !b.is_empty())
        .map(|block| {
            let mut name = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    name = v.to_string();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data.push_str(v);
                }
            }
            (name, serde_json::from_str(&data).unwrap_or(Value::Null))
        })
        .collect()
}

/// A stream broken after its third event by the mock (`drop-mid-stream`: over h2 the stream is reset,
/// over HTTP/1.1 the connection is closed mid-body): what the client got and what was stored.
async fn broken_stream(h2: bool) -> (u16, Vec<String>, Value, (u64, u64, u64, u64)) {
    let s = setup(h2, 1, &[]).await;
    let r = post(
        &s.dp,
        "/v1/messages",
        &s.key,
        &body(0, true),
        &[("x-mock-fault", "drop-mid-stream"), ("x-mock-fault-after", "3")],
    )
    .await;
    let ev = events(&r.body);
    let t = wait_usage(&s.cp, 1).await;
    // The connection (h1) or stream (h2) is gone; the next request is served all the same.
    let again = post_messages(&s.dp, &s.key, &body(1, true)).await;
    assert_identical(&s, &again, true);
    (
        r.status,
        ev.iter().map(|(n, _)| n.clone()).collect(),
        ev.last().unwrap().1.clone(),
        (t.requests, t.errors, t.input_tokens, t.output_tokens),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_reset_mid_way_over_h2_ends_as_a_broken_http1_stream() {
    let over_h1 = broken_stream(false).await;
    let over_h2 = broken_stream(true).await;
    assert_eq!(over_h1.0, 200);
    assert_eq!(over_h1.1.len(), 4, "three events and relay's error: {:?}", over_h1.1);
    assert_eq!(over_h1.1.last().map(String::as_str), Some("error"));
    assert_eq!(over_h1.2["error"]["type"], "api_error");
    assert_eq!(over_h1.3 .1, 1, "a failed usage row");
    assert_eq!(over_h2, over_h1, "HTTP/2 as HTTP/1.1: status, events, error, usage");
}

/// A slow stream in flight when the mock closes every connection at once: the client gets the events
/// so far and relay's error event; a failed usage row with the request's input tokens.
async fn connection_closed_mid_stream(h2: bool) -> (u16, String, Value, u64) {
    let s = setup_with(
        MockConfig {
            h2,
            event_delay: Duration::from_millis(40),
            ..MockConfig::default()
        },
        false,
        1,
        &[],
    )
    .await;
    let req = {
        let (url, key) = (s.dp.url("/v1/messages"), s.key.clone());
        tokio::spawn(async move {
            let h = sdk_headers(&key);
            let hs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            send("POST", &url, &hs, body(0, true).to_string()).await
        })
    };
    wait_for(Duration::from_secs(5), "the stream to be under way", || {
        let n = s.mock.request_count();
        async move { (n >= 1).then_some(()) }
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.mock.reset_connections();
    let r = req.await.unwrap();
    let ev = events(&r.body);
    assert!(ev.len() > 2, "some events came before the close: {ev:?}");
    assert!(ev.iter().all(|(n, _)| n != "message_stop"));
    let t = wait_usage(&s.cp, 1).await;
    assert_eq!(t.errors, 1, "a failed usage row");
    let again = post_messages(&s.dp, &s.key, &body(1, false)).await;
    assert_identical(&s, &again, false);
    assert_eq!(s.mock.connections(), 2, "a new connection after the close");
    (
        r.status,
        ev[0].0.clone(),
        ev.last().unwrap().1["error"].clone(),
        t.input_tokens,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_closed_mid_stream_over_h2_ends_as_over_http1() {
    let over_h1 = connection_closed_mid_stream(false).await;
    let over_h2 = connection_closed_mid_stream(true).await;
    assert_eq!(over_h1.0, 200);
    assert_eq!(over_h1.1, "message_start");
    assert_eq!(over_h1.2["type"], "api_error");
    assert_eq!(over_h1.3, expected_usage(&body(0, true)).input_tokens);
    assert_eq!(over_h2, over_h1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_goaway_lets_streams_in_flight_finish_and_the_next_request_opens_a_connection() {
    let s = setup_with(
        MockConfig {
            event_delay: Duration::from_millis(20),
            ..MockConfig::default()
        },
        false,
        1,
        &[],
    )
    .await;
    let mut streams = Vec::new();
    for i in 0..4 {
        let (url, key) = (s.dp.url("/v1/messages"), s.key.clone());
        streams.push(tokio::spawn(async move {
            let h = sdk_headers(&key);
            let hs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            send("POST", &url, &hs, body(i, true).to_string()).await
        }));
    }
    wait_for(Duration::from_secs(5), "the streams to be under way", || {
        let n = s.mock.request_count();
        async move { (n >= 4).then_some(()) }
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.mock.goaway();
    for t in streams {
        assert_identical(&s, &t.await.unwrap(), true);
    }
    // The connection that went away is not used again.
    let r = post_messages(&s.dp, &s.key, &body(9, false)).await;
    assert_identical(&s, &r, false);
    assert!(versions(&s.mock).iter().all(|(v, _)| *v == http::Version::HTTP_2));
    assert!(s.mock.connections() >= 2, "a new connection after GOAWAY");
    let t = wait_usage(&s.cp, 5).await;
    assert_eq!(t.errors, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_h2_offered_the_upstream_is_spoken_to_over_http1() {
    let s = setup(false, 1, &[]).await;
    for (i, stream) in [(0, false), (1, true)] {
        let r = post_messages(&s.dp, &s.key, &body(i, stream)).await;
        assert_identical(&s, &r, stream);
    }
    let seen = versions(&s.mock);
    assert_eq!(
        seen,
        vec![(http::Version::HTTP_11, Some("http/1.1".to_string())); 2],
        "HTTP/1.1, agreed through ALPN"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_http_version_forces_either_version() {
    let s = setup(true, 1, &[("upstream.http_version", "http1")]).await;
    let r = post_messages(&s.dp, &s.key, &body(0, true)).await;
    assert_identical(&s, &r, true);
    let (version, alpn) = versions(&s.mock).pop().unwrap();
    assert_eq!(
        version,
        http::Version::HTTP_11,
        "http1: HTTP/1.1 although the upstream offers h2"
    );
    assert_ne!(alpn.as_deref(), Some("h2"));

    // A live setting: the next request after the config is applied.
    s.cp.set_setting("upstream.http_version", "http2").await;
    s.dp.wait_version(s.cp.head().await).await;
    let r = post_messages(&s.dp, &s.key, &body(1, true)).await;
    assert_identical(&s, &r, true);
    assert_eq!(
        versions(&s.mock).pop().unwrap(),
        (http::Version::HTTP_2, Some("h2".to_string()))
    );

    // http2 against a plain-HTTP upstream: h2c with prior knowledge.
    let plain = setup_with(MockConfig::default(), true, 1, &[("upstream.http_version", "http2")]).await;
    let r = post_messages(&plain.dp, &plain.key, &body(2, false)).await;
    assert_identical(&plain, &r, false);
    assert_eq!(versions(&plain.mock), vec![(http::Version::HTTP_2, None)]);

    // http2 against an upstream without HTTP/2: not reached (a clear 5xx), no request served.
    let h1_only = setup(false, 1, &[("upstream.http_version", "http2")]).await;
    let r = post_messages(&h1_only.dp, &h1_only.key, &body(3, false)).await;
    assert!(r.status >= 500, "{} {:?}", r.status, r.body);
    assert!(!r.error_type().is_empty(), "an Anthropic-shaped error: {:?}", r.body);
    assert_eq!(h1_only.mock.request_count(), 0);
}

fn chrono_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// An upstream that allows fewer streams on a connection than relay has requests for it: every request
/// is answered in full (over HTTP/2), none refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn more_streams_than_the_upstream_allows_per_connection_all_complete() {
    let s = setup_with(
        MockConfig {
            h2_max_concurrent_streams: 2,
            event_delay: Duration::from_millis(20),
            ..MockConfig::default()
        },
        false,
        1,
        &[],
    )
    .await;
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..6 {
        let (url, key) = (s.dp.url("/v1/messages"), s.key.clone());
        tasks.push(tokio::spawn(async move {
            let h = sdk_headers(&key);
            let hs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            send("POST", &url, &hs, body(i, true).to_string()).await
        }));
    }
    for t in tasks {
        assert_identical(&s, &t.await.unwrap(), true);
    }
    eprintln!(
        "6 streams, cap 2: {:?}, connections {}, most at once {}",
        started.elapsed(),
        s.mock.connections(),
        s.mock.max_in_flight()
    );
    assert!(versions(&s.mock).iter().all(|(v, _)| *v == http::Version::HTTP_2));
}
