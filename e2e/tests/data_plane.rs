//! The data plane end to end: a client with a relay key, a data plane, the
//! control plane and the mock upstream, all on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use relay_mock_upstream::{expected_usage, MockConfig};
use relay_proto::v1 as pb;
use relay_test_support::wait_for;
use serde_json::json;
use std::time::Duration;

/// Builtin price of claude-sonnet-4*, micro-USD per MTok: in, out, 5m, 1h, read.
const SONNET: (u64, u64, u64, u64, u64) = (3_000_000, 15_000_000, 3_750_000, 6_000_000, 300_000);

fn sonnet_cost(u: &relay_mock_upstream::Usage) -> u64 {
    u.input_tokens * SONNET.0
        + u.output_tokens * SONNET.1
        + u.cache_5m * SONNET.2
        + u.cache_1h * SONNET.3
        + u.cache_read_input_tokens * SONNET.4
}

struct Setup {
    cp: ControlPlane,
    mock: relay_mock_upstream::MockUpstream,
    dp: DataPlane,
    key: String,
    key_id: String,
    _dir: tempfile::TempDir,
}

async fn setup(backend: Backend, mock_config: MockConfig) -> Setup {
    let cp = ControlPlane::start(backend).await;
    let mock = mock(mock_config).await;
    cp.add_account("acct-1", &mock.base_url(), ACCOUNT_SECRET).await;
    let (key_id, key) = cp.add_key("client-1", &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let dp = DataPlane::start(&cp.url(), "dp-1", dir.path().join("dp-1")).await;
    dp.wait_version(cp.head().await).await;
    Setup {
        cp,
        mock,
        dp,
        key,
        key_id,
        _dir: dir,
    }
}

async fn wait_requests(cp: &ControlPlane, n: u64) -> relay_control_plane::model::UsageRow {
    wait_for(Duration::from_secs(10), "usage to be stored", || async {
        let t = cp.usage_total().await;
        (t.requests >= n).then_some(t)
    })
    .await
    .unwrap()
}

async fn pass_through_and_exact_usage(backend: Backend) {
    let s = setup(backend, MockConfig::default()).await;
    // A body with cache marks (5m and 1h) and a cache-read count: every usage field is exercised.
    let body = json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 512,
        "system": [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "A long document…", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
            {"type": "text", "text": "Summarise it."}
        ]}],
    });
    let expected = s.mock.config().expected_usage(&body, 100);

    // Non-streaming, with the query string Claude Code sends.
    let r = post(
        &s.dp,
        "/v1/messages?beta=true",
        &s.key,
        &body,
        &[("x-mock-cache-read", "100"), ("anthropic-beta", "a-beta,b-beta")],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let upstream_id = r.header("x-upstream-request-id").unwrap().to_string();
    assert_eq!(
        r.body,
        s.mock.sent_body(&upstream_id).unwrap(),
        "the body passes through unchanged"
    );
    assert!(r.header("request-id").unwrap().starts_with("req_relay_"));
    assert!(
        r.header("anthropic-organization-id").is_none(),
        "upstream identity is stripped"
    );
    assert_eq!(r.json()["usage"]["input_tokens"], expected.input_tokens);

    // What the upstream received: the account's credential, never the client's key.
    let seen = s
        .mock
        .requests()
        .into_iter()
        .find(|q| q.request_id == upstream_id)
        .unwrap();
    assert_eq!(seen.path_and_query, "/v1/messages?beta=true");
    assert_eq!(seen.header("x-api-key"), Some(ACCOUNT_SECRET));
    assert!(seen
        .headers
        .iter()
        .all(|(_, v)| !v.as_bytes().windows(s.key.len()).any(|w| w == s.key.as_bytes())));
    assert_eq!(seen.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(seen.header("anthropic-beta"), Some("a-beta,b-beta"));
    assert_eq!(seen.header("accept-encoding"), Some("identity"));
    assert_eq!(seen.json().unwrap(), body, "the request body is forwarded untouched");

    // Streaming: the bytes the client gets are the bytes the mock sent.
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let r = post(
        &s.dp,
        "/v1/messages",
        &s.key,
        &sbody,
        &[
            ("x-mock-cache-read", "100"),
            ("accept-encoding", "gzip, deflate, br, zstd"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert!(
        r.header("content-encoding").is_none(),
        "the body matches the headers: not compressed"
    );
    let upstream_id = r.header("x-upstream-request-id").unwrap().to_string();
    assert_eq!(
        r.body,
        s.mock.sent_body(&upstream_id).unwrap(),
        "SSE bytes byte-identical"
    );
    let text = String::from_utf8(r.body.to_vec()).unwrap();
    assert!(text.starts_with("event: message_start") && text.trim_end().ends_with("data: {\"type\":\"message_stop\"}"));

    // Usage stored: exact to the token and the cost to the pico-dollar.
    let t = wait_requests(&s.cp, 2).await;
    assert_eq!(t.requests, 2);
    assert_eq!(t.input_tokens, 2 * expected.input_tokens);
    assert_eq!(t.output_tokens, 2 * expected.output_tokens);
    assert_eq!(t.cache_write_5m_tokens, 2 * expected.cache_5m);
    assert_eq!(t.cache_write_1h_tokens, 2 * expected.cache_1h);
    assert_eq!(t.cache_read_tokens, 200);
    assert!(expected.cache_5m > 0 && expected.cache_1h > 0);
    assert_eq!(t.cost_pico_usd, 2 * sonnet_cost(&expected));
    let by_key =
        s.cp.store
            .query_usage(relay_control_plane::model::UsageQuery {
                group_by: relay_control_plane::model::UsageGroupBy::Key,
                ..Default::default()
            })
            .await
            .unwrap();
    assert_eq!(by_key[0].group_id, s.key_id);
    assert_eq!(by_key[0].group, "client-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pass_through_and_exact_usage_sqlite() {
    pass_through_and_exact_usage(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pass_through_and_exact_usage_postgres() {
    pass_through_and_exact_usage(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn other_routes() {
    let s = setup(Backend::Sqlite, MockConfig::default()).await;
    // count_tokens is forwarded.
    let body = json!({"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "count me"}]});
    let r = post(&s.dp, "/v1/messages/count_tokens?beta=true", &s.key, &body, &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["input_tokens"], expected_usage(&body).input_tokens);
    // Models are answered by the relay in the page shape.
    let h = sdk_headers(&s.key);
    let hs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let before = s.mock.request_count();
    let r = send("GET", &s.dp.url("/v1/models?limit=1000"), &hs, "").await;
    assert_eq!(r.status, 200);
    let page = r.json();
    assert!(page["data"].as_array().unwrap().iter().all(|m| m["type"] == "model"));
    assert!(page["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["id"] == "claude-sonnet-4-5-20250929"));
    assert_eq!(page["has_more"], false);
    assert_eq!(page["first_id"], page["data"][0]["id"]);
    let r = send("GET", &s.dp.url("/v1/models/claude-sonnet-4-5-20250929"), &hs, "").await;
    assert_eq!(r.json()["id"], "claude-sonnet-4-5-20250929");
    assert_eq!(
        send("GET", &s.dp.url("/v1/models/nope"), &hs, "").await.error_type(),
        "not_found_error"
    );
    // Claude Code's telemetry is acknowledged, never forwarded.
    let r = send("POST", &s.dp.url("/api/event_logging/batch"), &hs, "{\"events\":[]}").await;
    assert_eq!((r.status, r.json()), (200, json!({})));
    assert_eq!(
        s.mock.request_count(),
        before,
        "models and telemetry never reach the upstream"
    );
    // Health and metrics.
    assert_eq!(send("GET", &s.dp.url("/healthz"), &[], "").await.status, 200);
    assert_eq!(send("GET", &s.dp.url("/readyz"), &[], "").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_anthropic_errors() {
    let s = setup(Backend::Sqlite, MockConfig::default()).await;
    let (_, limited) = s.cp.add_key("haiku-only", &["claude-haiku-4-5*"]).await;
    s.dp.wait_version(s.cp.head().await).await;
    let before = s.mock.request_count();
    let ok = message_body("claude-sonnet-4-5", false);
    let url = s.dp.url("/v1/messages");
    let v = ("anthropic-version", "2023-06-01");

    let r = send("POST", &url, &[v], ok.to_string()).await;
    assert_eq!((r.status, r.error_type().as_str()), (401, "authentication_error"));
    assert_eq!(r.header("x-should-retry"), Some("false"));
    let r = send("POST", &url, &[v, ("x-api-key", "rk-wrong")], ok.to_string()).await;
    assert_eq!((r.status, r.error_type().as_str()), (401, "authentication_error"));
    // Authorization: Bearer works as well as x-api-key.
    let bearer = format!("Bearer {}", s.key);
    let r = send("POST", &url, &[v, ("authorization", &bearer)], ok.to_string()).await;
    assert_eq!(r.status, 200);
    let r = send("POST", &url, &[("x-api-key", &s.key)], ok.to_string()).await;
    assert_eq!(
        (r.status, r.error_type().as_str()),
        (400, "invalid_request_error"),
        "missing anthropic-version"
    );
    let r = send(
        "POST",
        &url,
        &[("x-api-key", &s.key), ("anthropic-version", "latest")],
        ok.to_string(),
    )
    .await;
    assert_eq!(
        (r.status, r.error_type().as_str()),
        (400, "invalid_request_error"),
        "malformed anthropic-version"
    );
    let r = send("POST", &url, &[v, ("x-api-key", &s.key)], "{not json").await;
    assert_eq!((r.status, r.error_type().as_str()), (400, "invalid_request_error"));
    // An array in the head's field order is not a request.
    for body in [r#"["claude-sonnet-4-5", 5, false]"#, "[]"] {
        let r = send("POST", &url, &[v, ("x-api-key", &s.key)], body).await;
        assert_eq!(
            (r.status, r.error_type().as_str()),
            (400, "invalid_request_error"),
            "{body}"
        );
        assert!(String::from_utf8_lossy(&r.body).contains("must be a JSON object"));
    }
    let r = send(
        "POST",
        &url,
        &[v, ("x-api-key", &s.key)],
        json!({"max_tokens": 1}).to_string(),
    )
    .await;
    assert_eq!(
        (r.status, r.error_type().as_str()),
        (400, "invalid_request_error"),
        "model missing"
    );
    let big = vec![b' '; 33 * 1024 * 1024];
    let r = send("POST", &url, &[v, ("x-api-key", &s.key)], big).await;
    assert_eq!((r.status, r.error_type().as_str()), (413, "request_too_large"));
    let r = send("POST", &s.dp.url("/v1/complete"), &[v, ("x-api-key", &s.key)], "{}").await;
    assert_eq!((r.status, r.error_type().as_str()), (404, "not_found_error"));
    // Request heads: 6 KB of headers pass; over 8 KB is 431 (hyper answers it, without a body).
    let ok_body = ok.to_string();
    let six_kb = "x".repeat(6 * 1024);
    let r = send(
        "POST",
        &url,
        &[v, ("x-api-key", &s.key), ("x-client-padding", &six_kb)],
        ok_body.clone(),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let nine_kb = "x".repeat(9 * 1024);
    let r = send(
        "POST",
        &url,
        &[v, ("x-api-key", &s.key), ("x-client-padding", &nine_kb)],
        ok_body,
    )
    .await;
    assert_eq!(r.status, 431);
    let r = post_messages(&s.dp, &limited, &ok).await;
    assert_eq!(
        (r.status, r.error_type().as_str()),
        (403, "permission_error"),
        "model outside the allow-list"
    );
    assert_eq!(r.header("x-should-retry"), Some("false"));
    let r = post_messages(&s.dp, &limited, &message_body("claude-haiku-4-5-20251001", false)).await;
    assert_eq!(r.status, 200, "allowed by prefix");
    assert_eq!(
        s.mock.request_count(),
        before + 3,
        "only the three valid requests reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revoked_and_disabled_keys_are_refused_within_a_second() {
    let s = setup(Backend::Sqlite, MockConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let dp2 = DataPlane::start(&s.cp.url(), "dp-2", dir.path().to_path_buf()).await;
    dp2.wait_version(s.cp.head().await).await;
    let body = message_body("claude-sonnet-4-5", false);
    assert_eq!(post_messages(&s.dp, &s.key, &body).await.status, 200);
    assert_eq!(post_messages(&dp2, &s.key, &body).await.status, 200);
    s.cp.admin()
        .await
        .revoke_api_key(pb::RevokeApiKeyRequest { key: "client-1".into() })
        .await
        .unwrap();
    let revoked_at = tokio::time::Instant::now();
    for dp in [&s.dp, &dp2] {
        wait_for(
            Duration::from_secs(1),
            "revocation to reach every data plane",
            || async {
                let r = post_messages(dp, &s.key, &body).await;
                (r.status == 401).then_some(())
            },
        )
        .await
        .unwrap();
    }
    assert!(revoked_at.elapsed() < Duration::from_secs(1));
    let r = post_messages(&dp2, &s.key, &body).await;
    assert_eq!(r.error_type(), "authentication_error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn not_ready_without_config() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens there.
    let port = relay_test_support::free_port();
    let dp = DataPlane::start(&format!("http://127.0.0.1:{port}"), "lonely", dir.path().to_path_buf()).await;
    let r = send("GET", &dp.url("/readyz"), &[], "").await;
    assert_eq!(r.status, 503);
    assert_eq!(send("GET", &dp.url("/healthz"), &[], "").await.status, 200);
    let r = post_messages(&dp, "rk-anything", &message_body("claude-sonnet-4-5", false)).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.error_type(), "api_error");
    assert!(r.header("retry-after").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn control_plane_outage_loses_nothing_and_restart_serves_from_cache() {
    let mut s = setup(Backend::Postgres, MockConfig::default()).await;
    let body = message_body("claude-sonnet-4-5", true);
    let expected = expected_usage(&body);
    for _ in 0..5 {
        assert_eq!(post_messages(&s.dp, &s.key, &body).await.status, 200);
    }
    // Every control plane down: traffic keeps flowing, usage spools.
    s.cp.kill().await;
    for _ in 0..20 {
        assert_eq!(post_messages(&s.dp, &s.key, &body).await.status, 200);
    }
    // The data plane restarts while the control plane is still down: it serves from its cache at once.
    s.dp.shutdown().await;
    let mut dp = DataPlane::start(&s.cp.url(), "dp-1", s.dp.dir.clone()).await;
    assert!(dp.version().is_some(), "ready from the disk cache");
    assert_eq!(send("GET", &dp.url("/readyz"), &[], "").await.status, 200);
    for _ in 0..5 {
        assert_eq!(post_messages(&dp, &s.key, &body).await.status, 200);
    }
    // The control plane returns: every request of the outage is stored exactly once.
    s.cp.resume().await;
    let t = wait_for(Duration::from_secs(15), "spool to drain", || async {
        let t = s.cp.usage_total().await;
        (t.requests >= 30).then_some(t)
    })
    .await
    .unwrap();
    assert_eq!(t.requests, 30);
    assert_eq!(t.input_tokens, 30 * expected.input_tokens);
    assert_eq!(t.output_tokens, 30 * expected.output_tokens);
    let db = s.cp.db.clone().unwrap();
    let (c, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let n: i64 = c
        .query_one("SELECT COUNT(DISTINCT request_id) FROM usage_events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 30, "one row per request");
    // And the restarted data plane resynced with the control plane.
    s.cp.add_key("after-outage", &[]).await;
    dp.wait_version(s.cp.head().await).await;
    dp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_disconnect_cancels_upstream_and_records_partial_usage() {
    let s = setup(
        Backend::Postgres,
        MockConfig {
            event_delay: Duration::from_millis(40),
            ..Default::default()
        },
    )
    .await;
    let mut req = http::Request::builder().method("POST").uri(s.dp.url("/v1/messages"));
    for (k, v) in sdk_headers(&s.key) {
        req = req.header(k, v);
    }
    let body = message_body("claude-sonnet-4-5", true);
    let resp = http_client()
        .request(
            req.body(http_body_util::Full::new(bytes::Bytes::from(body.to_string())))
                .unwrap(),
        )
        .await
        .unwrap();
    let upstream_id = resp.headers()["x-upstream-request-id"].to_str().unwrap().to_string();
    let mut b = resp.into_body();
    use http_body_util::BodyExt;
    let mut got = 0;
    while got < 3 {
        if let Some(Ok(f)) = b.frame().await {
            if f.is_data() {
                got += 1;
            }
        }
    }
    drop(b);
    // A complete stream of the same request: it takes the whole stream's
    // duration, long enough for an uncancelled upstream to have sent everything.
    let full_len = post_messages(&s.dp, &s.key, &body).await.body.len();
    let sent = s.mock.sent_body(&upstream_id).unwrap().len();
    assert!(
        sent < full_len / 2,
        "upstream kept streaming to nobody: {sent} of {full_len} bytes"
    );
    let db = s.cp.db.clone().unwrap();
    let (c, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let row = wait_for(Duration::from_secs(10), "cancelled event", || async {
        c.query_opt(
            "SELECT cancelled, input_tokens, output_tokens FROM usage_events WHERE upstream_request_id = $1",
            &[&upstream_id],
        )
        .await
        .ok()
        .flatten()
    })
    .await
    .unwrap();
    let (cancelled, input, output): (bool, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert!(cancelled);
    assert_eq!(
        input as u64,
        expected_usage(&body).input_tokens,
        "what was known is recorded"
    );
    assert!(output >= 1);
}

fn audit(target: &str) -> relay_control_plane::model::AuditRecord {
    relay_control_plane::model::AuditRecord {
        actor: "test".into(),
        action: "bypass".into(),
        target: target.into(),
        detail: "{}".into(),
    }
}

/// One account a data plane cannot use (here: weight 0 while enabled, written
/// past the admin API) is taken out of service alone: the rest of the config
/// applies (a key created after it works), and `account list` says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_unusable_account_is_out_of_service_and_the_rest_applies() {
    use relay_control_plane::model::Mutation;
    let s = setup(Backend::Sqlite, MockConfig::default()).await;
    let second = s.cp.add_account("acct-2", &s.mock.base_url(), ACCOUNT_SECRET).await;
    let mut acct = s.cp.store.get_account("acct-1").await.unwrap().unwrap();
    let expect = acct.revision;
    acct.weight = 0;
    s.cp.store
        .apply(
            vec![Mutation::UpdateAccount {
                row: acct.clone(),
                expect_revision: expect,
            }],
            audit("acct-1"),
        )
        .await
        .unwrap();
    let (_, later_key) = s.cp.add_key("later", &[]).await;
    s.dp.wait_version(s.cp.head().await).await;
    let info = wait_for(
        Duration::from_secs(5),
        "the account to show as out of service",
        || async {
            let list =
                s.cp.admin()
                    .await
                    .list_accounts(pb::ListAccountsRequest {})
                    .await
                    .unwrap()
                    .into_inner();
            list.accounts
                .into_iter()
                .find(|a| a.id == acct.id && !a.config_errors.is_empty())
        },
    )
    .await
    .unwrap();
    assert_eq!(info.config_errors, ["dp-1: weight 0 on an enabled account"]);
    let other =
        s.cp.admin()
            .await
            .get_account(pb::GetAccountRequest { account: second })
            .await
            .unwrap();
    assert!(other.into_inner().config_errors.is_empty());
    let proxies = s.cp.store.list_proxies().await.unwrap();
    assert!(
        proxies.iter().all(|p| p.nack_error.is_empty()),
        "no whole-config NACK: {proxies:?}"
    );
    for _ in 0..4 {
        let r = post_messages(&s.dp, &later_key, &message_body("claude-sonnet-4-5", false)).await;
        assert_eq!(r.status, 200, "served by the usable account");
    }
}

/// Events spaced out by the upstream reach the client as they arrive, one by one, not held back and not
/// gathered into one write; events that arrive together may leave together.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spaced_events_are_flushed_as_they_arrive() {
    use http_body_util::BodyExt;
    let delay = Duration::from_millis(60);
    let s = setup(
        Backend::Sqlite,
        MockConfig {
            event_delay: delay,
            text_events: 8,
            ..MockConfig::default()
        },
    )
    .await;
    let mut req = http::Request::builder().method("POST").uri(s.dp.url("/v1/messages"));
    for (k, v) in sdk_headers(&s.key) {
        req = req.header(k, v);
    }
    let body = message_body("claude-sonnet-4-5", true).to_string();
    let resp = http_client()
        .request(req.body(http_body_util::Full::new(bytes::Bytes::from(body))).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let start = std::time::Instant::now();
    let mut body = resp.into_body();
    // (arrival time, cumulative count of complete events)
    let mut arrivals = Vec::new();
    let mut text = String::new();
    while let Some(frame) = body.frame().await {
        if let Ok(d) = frame.unwrap().into_data() {
            text.push_str(std::str::from_utf8(&d).unwrap());
            arrivals.push((start.elapsed(), text.matches("\n\n").count()));
        }
    }
    let events = text.matches("\n\n").count();
    assert!(text.trim_end().ends_with("data: {\"type\":\"message_stop\"}"), "{text}");
    // The mock spaces every event after the first by `delay`: the client saw them over time, in many
    // separate arrivals, each within a fraction of the spacing.
    let spread = arrivals.last().unwrap().0 - arrivals.first().unwrap().0;
    assert!(spread >= delay * (events as u32 - 2), "{arrivals:?}");
    assert!(
        arrivals.len() >= events - 2,
        "{} arrivals for {events} events: {arrivals:?}",
        arrivals.len()
    );
    // Half-way through, part of the stream had arrived, not none and not all.
    let half = arrivals.last().unwrap().0 / 2;
    let by_half = arrivals
        .iter()
        .take_while(|(t, _)| *t <= half)
        .last()
        .map_or(0, |a| a.1);
    assert!(
        by_half > 1 && by_half < events,
        "{by_half} of {events} events by half-time: {arrivals:?}"
    );
}

/// Issue 12, item 1: the unauthenticated telemetry route reads at most 1 MB and
/// buffers nothing; a body (any route) that does not arrive within the body-read
/// timeout gets 408 instead of holding the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_bodies_are_bounded_in_size_and_time() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cp = ControlPlane::start(Backend::Sqlite).await;
    let (_, key) = cp.add_key("client", &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let dp = DataPlane::start_with(&cp.url(), "dp-1", dir.path().join("dp"), |o| {
        o.body_read_timeout = Duration::from_millis(500);
    })
    .await;
    dp.wait_version(cp.head().await).await;

    // Small telemetry: 200 {}.
    let r = send("POST", &dp.url("/api/event_logging/batch"), &[], "{\"events\":[]}").await;
    assert_eq!((r.status, r.body.as_ref()), (200, b"{}".as_ref()));

    // A chunked upload far past the bound: refused once 1 MB has been seen.
    let mut conn = tokio::net::TcpStream::connect(dp.addr).await.unwrap();
    conn.write_all(b"POST /api/event_logging/batch HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    let chunk = vec![b'a'; 64 * 1024];
    let mut sent = 0usize;
    for _ in 0..(400 * 16) {
        // 400 MB if it were all read: stop as soon as the server has answered.
        let head = format!("{:x}\r\n", chunk.len());
        if conn.write_all(head.as_bytes()).await.is_err()
            || conn.write_all(&chunk).await.is_err()
            || conn.write_all(b"\r\n").await.is_err()
        {
            break;
        }
        sent += chunk.len();
        let mut peek = [0u8; 12];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(1), conn.peek(&mut peek)).await {
            if n > 0 {
                break;
            }
        }
    }
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&answer[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("request_too_large"), "{text}");
    assert!(sent < 64 * 1024 * 1024, "the server kept reading: {sent} bytes");

    // A Messages body declared past the 32 MB limit, and nothing sent: 413 within seconds, not
    // at the body-read timeout.
    let mut conn = tokio::net::TcpStream::connect(dp.addr).await.unwrap();
    let head = format!(
        "POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\nanthropic-version: 2023-06-01\r\n\
         content-type: application/json\r\ncontent-length: 40000000\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut answer))
        .await
        .expect("a declared oversize body is refused without waiting for it")
        .unwrap();
    let text = String::from_utf8_lossy(&answer[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("request_too_large"), "{text}");

    // A Messages body that trickles and never completes: 408, in the Anthropic shape.
    let mut conn = tokio::net::TcpStream::connect(dp.addr).await.unwrap();
    let head = format!(
        "POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\nanthropic-version: 2023-06-01\r\n\
         content-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"model\":"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut answer))
        .await
        .expect("answered within the body-read timeout")
        .unwrap();
    let text = String::from_utf8_lossy(&answer[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"type\":\"error\""), "{text}");
}

/// Issue 12, item 6: a client trickling its request head is cut off after the
/// header-read timeout, and connections past the cap are closed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_heads_and_too_many_connections_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cp = ControlPlane::start(Backend::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    let dp = DataPlane::start_with(&cp.url(), "dp-1", dir.path().join("dp"), |o| {
        o.header_read_timeout = Duration::from_millis(400);
        o.max_connections = 3;
    })
    .await;
    dp.wait_version(cp.head().await).await;

    // One header byte every 100 ms, forever: the server closes it.
    let mut slow = tokio::net::TcpStream::connect(dp.addr).await.unwrap();
    let started = std::time::Instant::now();
    let head = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut closed = false;
    for b in head.iter() {
        if slow.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(100), slow.read(&mut buf)).await {
            Ok(Ok(_)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Err(_) => {}
        }
    }
    assert!(closed, "a trickled head was never cut off");
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());

    // Three connections are served; a fourth is closed at once.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = tokio::net::TcpStream::connect(dp.addr).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 512];
        let n = c.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        held.push(c);
    }
    let mut extra = tokio::net::TcpStream::connect(dp.addr).await.unwrap();
    let _ = extra.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(2), extra.read(&mut buf))
        .await
        .expect("closed, not left hanging")
        .unwrap_or(0);
    assert_eq!(n, 0, "past the cap: closed without an answer");
    // One closes: the next is served again.
    drop(held.pop());
    wait_for(Duration::from_secs(5), "a slot to free up", || async {
        try_send("GET", &dp.url("/healthz"))
            .await
            .filter(|r| r.status == 200)
            .map(|_| ())
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn headers_that_identify_clients_or_accounts_stay_on_their_side() {
    let s = setup(Backend::Sqlite, MockConfig::default()).await;
    let body = message_body("claude-sonnet-4-5", false);
    let client_side = [
        ("cookie", "session=secret"),
        ("x-forwarded-for", "203.0.113.7"),
        ("x-forwarded-proto", "https"),
        ("x-real-ip", "203.0.113.7"),
        ("forwarded", "for=203.0.113.7"),
        ("via", "1.1 corp-proxy"),
        ("x-stainless-lang", "python"),
    ];
    let r = post(&s.dp, "/v1/messages", &s.key, &body, &client_side).await;
    assert_eq!(r.status, 200);
    // By default the pooled account's rate-limit headers stay behind (the mock sends them).
    assert!(
        !r.headers.keys().any(|n| n.as_str().starts_with("anthropic-ratelimit-")),
        "{:?}",
        r.headers
    );
    let seen = s.mock.requests().last().unwrap().clone();
    for gone in [
        "cookie",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-real-ip",
        "forwarded",
        "via",
    ] {
        assert!(seen.header(gone).is_none(), "{gone} reached the upstream");
    }
    assert_eq!(seen.header("x-stainless-lang"), Some("python"), "SDK headers pass");

    // Both are operator choices.
    for (name, value) in [
        ("headers.expose_ratelimit", "true"),
        ("headers.forward_client_ip", "true"),
    ] {
        s.cp.set_setting(name, value).await;
    }
    s.dp.wait_version(s.cp.head().await).await;
    let r = post(&s.dp, "/v1/messages", &s.key, &body, &client_side).await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("anthropic-ratelimit-requests-remaining").is_some(),
        "{:?}",
        r.headers
    );
    let seen = s.mock.requests().last().unwrap().clone();
    assert_eq!(seen.header("x-forwarded-for"), Some("203.0.113.7"));
    assert!(seen.header("cookie").is_none(), "cookies never pass");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_key_cannot_make_a_data_plane_hold_unbounded_bodies() {
    let cp = ControlPlane::start(Backend::Sqlite).await;
    let mock = mock(MockConfig {
        ttfb: Duration::from_secs(2),
        ..MockConfig::default()
    })
    .await;
    cp.add_account("acct-1", &mock.base_url(), ACCOUNT_SECRET).await;
    let (_, key) = cp.add_key("big-sender", &[]).await;
    let (_, other) = cp.add_key("someone-else", &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let dp = DataPlane::start_with(&cp.url(), "dp-1", dir.path().join("dp-1"), |o| {
        o.max_body_bytes_per_key = 40 << 20;
    })
    .await;
    dp.wait_version(cp.head().await).await;
    let big = json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "x".repeat(25 << 20)}],
    });
    let url = dp.url("/v1/messages");
    let first = {
        let (url, key, big) = (url.clone(), key.clone(), big.clone());
        tokio::spawn(async move { post_raw(&url, &key, &big).await })
    };
    // While the first body is held (the upstream takes 2 s), a second one from the same key is
    // refused; another key is not affected.
    wait_for(
        Duration::from_secs(10),
        "the first body to reach the upstream",
        || async { (!mock.requests().is_empty()).then_some(()) },
    )
    .await
    .unwrap();
    let (second, third) = tokio::join!(post_raw(&url, &key, &big), post_raw(&url, &other, &big));
    assert_eq!(second.status, 429, "{}", String::from_utf8_lossy(&second.body));
    assert_eq!(second.error_type(), "rate_limit_error");
    assert!(second.header("retry-after").is_some());
    assert_eq!(third.status, 200, "{}", String::from_utf8_lossy(&third.body));
    assert_eq!(first.await.unwrap().status, 200);
    // Once the first has been answered the key may send again.
    assert_eq!(post_raw(&url, &key, &big).await.status, 200);
}

async fn post_raw(url: &str, key: &str, body: &serde_json::Value) -> HttpResponse {
    let h = sdk_headers(key);
    let hs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    send("POST", url, &hs, body.to_string()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_data_plane_cut_off_too_long_stops_serving_and_says_why() {
    let mut cp = ControlPlane::start(Backend::Sqlite).await;
    let mock = mock(MockConfig::default()).await;
    cp.add_account("acct-1", &mock.base_url(), ACCOUNT_SECRET).await;
    let (_, key) = cp.add_key("client", &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut dp = DataPlane::start_with(&cp.url(), "dp-1", dir.path().join("dp-1"), |o| {
        o.max_config_staleness = Some(Duration::from_secs(2));
    })
    .await;
    dp.wait_version(cp.head().await).await;
    let body = message_body("claude-sonnet-4-5", false);
    assert_eq!(post_messages(&dp, &key, &body).await.status, 200);

    // The control plane goes away: the last config is served for a while, then refused.
    cp.kill().await;
    assert_eq!(
        post_messages(&dp, &key, &body).await.status,
        200,
        "still within the staleness"
    );
    let refused = wait_for(Duration::from_secs(15), "the config to become too old", || async {
        let r = post_messages(&dp, &key, &body).await;
        (r.status == 503).then_some(r)
    })
    .await
    .unwrap();
    assert_eq!(refused.error_type(), "api_error");
    assert!(
        refused.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("has not reached its control plane"),
        "{:?}",
        refused.body
    );
    assert_eq!(send("GET", &dp.url("/readyz"), &[], "").await.status, 503);

    // A restart of the data plane does not reset the clock (the last contact is kept on disk).
    dp.shutdown().await;
    let dp = DataPlane::start_with(&cp.url(), "dp-1", dir.path().join("dp-1"), |o| {
        o.max_config_staleness = Some(Duration::from_secs(2));
    })
    .await;
    assert_eq!(post_messages(&dp, &key, &body).await.status, 503);

    // The control plane is back: serving again.
    cp.resume().await;
    wait_for(Duration::from_secs(15), "serving again", || async {
        (post_messages(&dp, &key, &body).await.status == 200).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(send("GET", &dp.url("/readyz"), &[], "").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operations_endpoints_can_live_off_the_public_port() {
    let cp = ControlPlane::start(Backend::Sqlite).await;
    let mock = mock(MockConfig::default()).await;
    cp.add_account("acct-1", &mock.base_url(), ACCOUNT_SECRET).await;
    let (_, key) = cp.add_key("client", &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let dp = DataPlane::start_with(&cp.url(), "dp-1", dir.path().join("dp-1"), |o| {
        o.ops_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    dp.wait_version(cp.head().await).await;
    let ops = dp.dp.as_ref().unwrap().ops_addr().unwrap();
    for path in ["/metrics", "/readyz", "/healthz"] {
        assert_eq!(
            send("GET", &dp.url(path), &[], "").await.status,
            404,
            "{path} on the API port"
        );
        assert_eq!(
            send("GET", &format!("http://{ops}{path}"), &[], "").await.status,
            200,
            "{path}"
        );
    }
    // The API stays on its port only.
    let body = message_body("claude-sonnet-4-5", false);
    assert_eq!(post_messages(&dp, &key, &body).await.status, 200);
    let h = sdk_headers(&key);
    let hs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let on_ops = send("POST", &format!("http://{ops}/v1/messages"), &hs, body.to_string()).await;
    assert_eq!(on_ops.status, 404);
}

/// `upstream request id → (request_id, client_request_id)` of every stored usage row.
async fn stored_request_ids(cp: &ControlPlane) -> std::collections::BTreeMap<String, (String, String)> {
    const SQL: &str = "SELECT upstream_request_id, request_id, client_request_id FROM usage_events";
    match &cp.db {
        Some(db) => {
            let (c, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            c.query(SQL, &[])
                .await
                .unwrap()
                .into_iter()
                .map(|r| (r.get(0), (r.get(1), r.get(2))))
                .collect()
        }
        None => {
            let conn = rusqlite::Connection::open(cp.sqlite_path().unwrap()).unwrap();
            let mut stmt = conn.prepare(SQL).unwrap();
            stmt.query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        }
    }
}

/// A client's own request id (`x-request-id`, else `request-id`) lands in its usage row beside
/// relay's; one that is too long or not visible ASCII is ignored; relay's `request-id` and the
/// upstream's (`x-upstream-request-id`) are returned as before, and the client's header still
/// reaches the upstream.
async fn client_request_ids_are_kept(backend: Backend) {
    let s = setup(backend, MockConfig::default()).await;
    let long = "x".repeat(129);
    let max = "y".repeat(128);
    // (path, stream, the client's headers, the id stored)
    type Case<'a> = (&'a str, bool, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        ("/v1/messages", true, vec![("x-request-id", "abc-123")], "abc-123"),
        ("/v1/messages", false, vec![("x-request-id", "abc-124")], "abc-124"),
        ("/v1/messages", false, vec![("request-id", "sdk-req-7")], "sdk-req-7"),
        (
            "/v1/messages",
            false,
            vec![("request-id", "second"), ("x-request-id", "x-first")],
            "x-first",
        ),
        ("/v1/messages", false, vec![("x-request-id", &max)], &max),
        ("/v1/messages", false, vec![("x-request-id", &long)], ""),
        ("/v1/messages", false, vec![("x-request-id", "has a space")], ""),
        // An empty x-request-id does not hide a good request-id.
        (
            "/v1/messages",
            false,
            vec![("x-request-id", ""), ("request-id", "fallback-1")],
            "fallback-1",
        ),
        ("/v1/messages", false, vec![], ""),
        (
            "/v1/messages/count_tokens",
            false,
            vec![("x-request-id", "count-1")],
            "count-1",
        ),
    ];
    let mut expected = std::collections::BTreeMap::new();
    for (path, stream, headers, want) in &cases {
        let mut body = message_body("claude-sonnet-4-5", *stream);
        if path.ends_with("count_tokens") {
            body = json!({"model": "claude-sonnet-4-5", "messages": body["messages"]});
        }
        let r = post(&s.dp, path, &s.key, &body, headers).await;
        assert_eq!(r.status, 200, "{headers:?}: {}", String::from_utf8_lossy(&r.body));
        let relay_id = r.header("request-id").unwrap().to_string();
        assert!(relay_id.starts_with("req_relay_"), "{relay_id}");
        assert!(r.header("x-request-id").is_none(), "the client's id is not echoed");
        let upstream_id = r.header("x-upstream-request-id").unwrap().to_string();
        let sent = s
            .mock
            .requests()
            .into_iter()
            .find(|q| q.request_id == upstream_id)
            .unwrap();
        for (k, v) in headers {
            assert_eq!(sent.header(k), Some(*v), "{k} is forwarded as before");
        }
        expected.insert(upstream_id, (relay_id, want.to_string()));
    }
    let stored = wait_for(Duration::from_secs(10), "usage rows to be stored", || async {
        let rows = stored_request_ids(&s.cp).await;
        (rows.len() >= cases.len()).then_some(rows)
    })
    .await
    .unwrap();
    assert_eq!(stored, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_request_ids_are_kept_postgres() {
    client_request_ids_are_kept(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_request_ids_are_kept_sqlite() {
    client_request_ids_are_kept(Backend::Sqlite).await;
}
