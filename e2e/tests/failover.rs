//! Failover, account health, sticky sessions, waiting and slots: no request
//! fails while a healthy account exists.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use relay_mock_upstream::{expected_usage, Fault, MockConfig, MockUpstream};
use relay_proto::v1 as pb;
use relay_test_support::wait_for;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

struct Fleet {
    cp: ControlPlane,
    mock: Arc<MockUpstream>,
    dp: DataPlane,
    key: String,
    /// Account ids, by index; credential of account i is `cred-i`.
    ids: Vec<String>,
    _dir: tempfile::TempDir,
}

fn cred(i: usize) -> String {
    format!("cred-{i}")
}

/// `n` accounts on one mock (same priority, weight 1), a key, one data plane.
async fn fleet(n: usize, mock_config: MockConfig, settings: &[(&str, &str)]) -> Fleet {
    let cp = ControlPlane::start(Backend::Sqlite).await;
    let mock = Arc::new(mock(mock_config).await);
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(cp.add_account(&format!("acct-{i}"), &mock.base_url(), &cred(i)).await);
    }
    // Fast backoff in tests; everything else stays at its default unless given.
    cp.set_setting("retry.backoff_base_ms", "1").await;
    cp.set_setting("retry.backoff_max_ms", "5").await;
    for (k, v) in settings {
        cp.set_setting(k, v).await;
    }
    let (_, key) = cp.add_key("client", &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let dp = DataPlane::start(&cp.url(), "dp-1", dir.path().join("dp")).await;
    dp.wait_version(cp.head().await).await;
    Fleet {
        cp,
        mock,
        dp,
        key,
        ids,
        _dir: dir,
    }
}

fn hits(mock: &MockUpstream, credential: &str) -> usize {
    mock.requests()
        .iter()
        .filter(|r| r.header("x-api-key") == Some(credential))
        .count()
}

/// A complete, successful answer: 200 and, for streams, a `message_stop`.
fn assert_complete(r: &HttpResponse, stream: bool) {
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    if stream {
        let text = String::from_utf8_lossy(&r.body);
        assert!(text.contains("event: message_stop"), "incomplete stream: {text}");
        assert!(!text.contains("event: error"), "error in stream: {text}");
    }
}

/// Flips each credential's fault among `faults` every few milliseconds, forever.
async fn toggle_faults(mock: &MockUpstream, creds: &[String], faults: &[Option<Fault>]) {
    let mut n = 0usize;
    loop {
        for c in creds {
            let pick = (n.wrapping_mul(2654435761) >> 7) % faults.len();
            mock.set_fault(c, faults[pick]);
            n += 1;
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

/// `total` requests through the fleet's data plane, 16 at a time, every other one streaming:
/// (streamed, response) each, in order.
async fn load(f: &Fleet, total: usize) -> Vec<(bool, HttpResponse)> {
    let body_s = message_body("claude-sonnet-4-5", true);
    let body_n = message_body("claude-sonnet-4-5", false);
    let sem = Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = Vec::new();
    for i in 0..total {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let url = f.dp.url("/v1/messages");
        let key = f.key.clone();
        let body = if i % 2 == 0 { body_s.clone() } else { body_n.clone() };
        tasks.push(tokio::spawn(async move {
            let h = sdk_headers(&key);
            let hs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let r = send("POST", &url, &hs, body.to_string()).await;
            drop(permit);
            (i % 2 == 0, r)
        }));
    }
    let mut out = Vec::with_capacity(total);
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Applies an account update through the Admin API.
async fn update_account(f: &Fleet, req: pb::UpdateAccountRequest) {
    f.cp.admin().await.update_account(req).await.unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_failure_kind_fails_over_and_marks_the_account() {
    let now = || chrono_now_ms();
    let cases: Vec<(Fault, pb::AccountHealth, Option<i64>)> = vec![
        (
            Fault::RateLimited { retry_after_secs: 30 },
            pb::AccountHealth::RateLimited,
            Some(30_000),
        ),
        (Fault::Overloaded, pb::AccountHealth::Overloaded, Some(30_000)),
        (Fault::ServerError, pb::AccountHealth::Erroring, Some(30_000)),
        (Fault::Unauthorized, pb::AccountHealth::Unauthorized, None),
        (Fault::OrgDisabled, pb::AccountHealth::Blocked, None),
        // A stream that opens with `event: error` (overloaded) fails over too.
        (
            Fault::ErrorEventMidStream { after_events: 0 },
            pb::AccountHealth::Overloaded,
            Some(30_000),
        ),
        // A connection dropped before the first event: counts towards the breaker.
        (
            Fault::DropMidStream { after_events: 0 },
            pb::AccountHealth::Erroring,
            Some(30_000),
        ),
    ];
    for (fault, health, cooldown) in cases {
        // A breaker that opens at the first failure: which account the balancer picks first (and so
        // whether three failures come in a row) depends on timing, not on what this test checks.
        let f = fleet(2, MockConfig::default(), &[("breaker.threshold", "1")]).await;
        f.mock.set_fault(&cred(0), Some(fault));
        let started = now();
        for i in 0..12 {
            let stream = i % 2 == 0;
            // Distinct conversations (one conversation would stick to one account).
            let mut body = message_body("claude-sonnet-4-5", stream);
            body["messages"][0]["content"] = json!(format!("conversation {i}"));
            let r = post_messages(&f.dp, &f.key, &body).await;
            assert_complete(&r, stream);
        }
        // The broken account was tried at most until its state was known (3 for the breaker).
        let broken_hits = hits(&f.mock, &cred(0));
        assert!(
            broken_hits <= 4,
            "{fault:?}: the broken account was hit {broken_hits} times"
        );
        assert!(hits(&f.mock, &cred(1)) >= 12, "{fault:?}");
        // The state reached the control plane (and so `relayctl account list`).
        let states = wait_for(
            Duration::from_secs(5),
            "the account state at the control plane",
            || async {
                let s = account_states(&f.cp, "acct-0").await;
                (!s.is_empty()).then_some(s)
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{fault:?}: {e}"));
        assert_eq!(states[0].health, health as i32, "{fault:?}: {states:?}");
        assert_eq!(states[0].account_id, f.ids[0]);
        assert_eq!(states[0].reported_by, "dp-1");
        match cooldown {
            Some(ms) => {
                let until = states[0].until_ms;
                assert!(
                    until >= started + ms - 2_000 && until <= now() + ms + 2_000,
                    "{fault:?}: until {until} not about now + {ms} ms"
                );
            }
            None => assert_eq!(states[0].until_ms, 0, "{fault:?}: until reset"),
        }
        assert!(account_states(&f.cp, "acct-1").await.is_empty());
    }
}

fn chrono_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreachable_account_fails_over_and_reset_brings_an_account_back() {
    let f = fleet(1, MockConfig::default(), &[]).await;
    // A second account whose upstream is not listening.
    let dead_port = relay_test_support::free_port();
    f.cp.add_account("dead", &format!("http://127.0.0.1:{dead_port}"), "cred-dead")
        .await;
    f.dp.wait_version(f.cp.head().await).await;
    for i in 0..10 {
        let r = post_messages(&f.dp, &f.key, &message_body("claude-sonnet-4-5", i % 2 == 0)).await;
        assert_complete(&r, i % 2 == 0);
    }
    // 401 takes acct-0 out until an operator resets it; with no other live account the client
    // gets relay's 502 (never a 401: the client's key is fine), then the reset brings it back.
    f.mock.set_fault(&cred(0), Some(Fault::Unauthorized));
    let r = post_messages(&f.dp, &f.key, &message_body("claude-sonnet-4-5", false)).await;
    assert_eq!(r.status, 502, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.error_type(), "api_error");
    wait_for(Duration::from_secs(5), "unauthorized state", || async {
        (!account_states(&f.cp, "acct-0").await.is_empty()).then_some(())
    })
    .await
    .unwrap();
    f.mock.clear_faults();
    let info =
        f.cp.admin()
            .await
            .reset_account(pb::ResetAccountRequest {
                account: "acct-0".into(),
            })
            .await
            .unwrap()
            .into_inner();
    assert!(info.states.is_empty());
    f.dp.wait_version(f.cp.head().await).await;
    let r = post_messages(&f.dp, &f.key, &message_body("claude-sonnet-4-5", true)).await;
    assert_complete(&r, true);
    let audit = f.cp.store.list_audit(50, None).await.unwrap();
    assert!(audit
        .iter()
        .any(|a| a.action == "account.reset" && a.target == "acct-0"));
    assert!(audit
        .iter()
        .any(|a| a.action == "account.state" && a.actor == "data-plane:dp-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_every_account_fails_the_client_gets_a_clear_answer() {
    let f = fleet(2, MockConfig::default(), &[("queue.max_wait_ms", "200")]).await;
    f.mock.set_fault(&cred(0), Some(Fault::ServerError));
    f.mock.set_fault(&cred(1), Some(Fault::ServerError));
    let r = post_messages(&f.dp, &f.key, &message_body("claude-sonnet-4-5", false)).await;
    assert_eq!(r.status, 500, "the last upstream error");
    assert_eq!(r.error_type(), "api_error");
    assert_eq!(f.mock.request_count(), 2, "each account tried once");
    // Both rate limited: nothing available within the wait limit: 529 with retry-after.
    f.mock
        .set_fault(&cred(0), Some(Fault::RateLimited { retry_after_secs: 20 }));
    f.mock
        .set_fault(&cred(1), Some(Fault::RateLimited { retry_after_secs: 20 }));
    let r = post_messages(&f.dp, &f.key, &message_body("claude-sonnet-4-5", false)).await;
    assert_eq!(r.status, 429);
    let r = post_messages(&f.dp, &f.key, &message_body("claude-sonnet-4-5", true)).await;
    assert_eq!(r.status, 529);
    assert_eq!(r.error_type(), "overloaded_error");
    let retry_after: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry_after), "{retry_after}");
    // Failed attempts that reached an upstream are usage events too, one request id per client request.
    let events = wait_for(Duration::from_secs(5), "usage events", || async {
        let t = f.cp.usage_total().await;
        (t.requests >= 4).then_some(t)
    })
    .await
    .unwrap();
    assert_eq!(events.requests, 4);
    assert_eq!(events.errors, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_two_of_four_accounts_failing_at_random() {
    let f = fleet(
        4,
        MockConfig::default(),
        &[
            ("cooldown.overloaded_ms", "100"),
            ("cooldown.erroring_ms", "100"),
            ("cooldown.rate_limit_default_ms", "100"),
        ],
    )
    .await;
    // Accounts 0 and 1 flip between faults every few milliseconds.
    let toggler = {
        let mock = f.mock.clone();
        tokio::spawn(async move {
            let faults = [
                None,
                Some(Fault::RateLimited { retry_after_secs: 1 }),
                Some(Fault::Overloaded),
                Some(Fault::ServerError),
                Some(Fault::ErrorEventMidStream { after_events: 0 }),
                Some(Fault::DropMidStream { after_events: 0 }),
            ];
            toggle_faults(&mock, &[cred(0), cred(1)], &faults).await
        })
    };
    let total = 2000usize;
    let body_s = message_body("claude-sonnet-4-5", true);
    let mut ok = 0;
    for (stream, r) in load(&f, total).await {
        assert_complete(&r, stream);
        ok += 1;
    }
    toggler.abort();
    assert_eq!(ok, total, "100% client success");
    // Usage exact: one successful event per client request with the exact tokens; failed attempts apart.
    let expected = expected_usage(&body_s);
    let store = f.cp.store.clone();
    let stored = wait_for(Duration::from_secs(20), "every usage event", || async {
        let rows = store
            .query_usage(relay_control_plane::model::UsageQuery::default())
            .await
            .unwrap();
        let t = rows.into_iter().next().unwrap_or_default();
        (t.requests - t.errors >= total as u64).then_some(t)
    })
    .await
    .unwrap();
    let successes = stored.requests - stored.errors;
    assert_eq!(successes, total as u64);
    assert_eq!(stored.input_tokens, total as u64 * expected.input_tokens);
    assert_eq!(stored.output_tokens, total as u64 * expected.output_tokens);
    assert_eq!(
        f.dp.dp.as_ref().unwrap().balancer.outstanding_total(),
        0,
        "no slot leaked"
    );
}

/// Eight accounts, six failing in every way (rate limited, overloaded, server errors, streams
/// that open with an error or drop, a revoked credential, a port nobody listens on) and coming
/// back to fail again, two working: with the default retry settings every one of 2,000 requests,
/// streaming and not, succeeds, and usage is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn six_of_eight_accounts_failing_every_way_never_fail_a_request() {
    let f = fleet(
        6,
        MockConfig::default(),
        &[
            // Failing accounts come back quickly, to fail again.
            ("cooldown.min_ms", "0"),
            ("cooldown.max_ms", "50"),
            ("cooldown.overloaded_ms", "50"),
            ("cooldown.erroring_ms", "50"),
            ("cooldown.rate_limit_default_ms", "50"),
        ],
    )
    .await;
    // The backoff as shipped: the fleet helper makes it fast for other tests.
    f.cp.set_setting("retry.backoff_base_ms", "25").await;
    f.cp.set_setting("retry.backoff_max_ms", "1000").await;
    let dead_port = relay_test_support::free_port();
    f.cp.add_account("dead", &format!("http://127.0.0.1:{dead_port}"), "cred-dead")
        .await;
    f.cp.add_account("good-a", &f.mock.base_url(), "cred-good-a").await;
    f.cp.add_account("good-b", &f.mock.base_url(), "cred-good-b").await;
    // The working accounts are the last tier: every failing account that is available is in
    // the way first.
    for good in ["good-a", "good-b"] {
        update_account(
            &f,
            pb::UpdateAccountRequest {
                account: good.into(),
                priority: Some(1),
                ..Default::default()
            },
        )
        .await;
    }
    f.dp.wait_version(f.cp.head().await).await;
    // acct-5's credential is revoked; accounts 0..=4 flip between failures every few ms.
    f.mock.set_fault(&cred(5), Some(Fault::Unauthorized));
    let toggler = {
        let mock = f.mock.clone();
        tokio::spawn(async move {
            // Now and then one answers, which brings it back into rotation to fail again.
            let faults = [
                Some(Fault::RateLimited { retry_after_secs: 0 }),
                Some(Fault::Overloaded),
                Some(Fault::ServerError),
                Some(Fault::ErrorEventMidStream { after_events: 0 }),
                Some(Fault::DropMidStream { after_events: 0 }),
                None,
            ];
            let creds: Vec<String> = (0..5).map(cred).collect();
            toggle_faults(&mock, &creds, &faults).await
        })
    };
    let total = 2000usize;
    let body_s = message_body("claude-sonnet-4-5", true);
    let mut failed = Vec::new();
    for (stream, r) in load(&f, total).await {
        let complete = r.status == 200
            && (!stream || {
                let text = String::from_utf8_lossy(&r.body);
                text.contains("event: message_stop") && !text.contains("event: error")
            });
        if !complete {
            failed.push(format!("{} {}", r.status, String::from_utf8_lossy(&r.body)));
        }
    }
    toggler.abort();
    let failing_hits: usize = (0..6).map(|i| hits(&f.mock, &cred(i))).sum();
    eprintln!(
        "attempts: failing {:?}, good {} + {}, all {}",
        (0..6).map(|i| hits(&f.mock, &cred(i))).collect::<Vec<_>>(),
        hits(&f.mock, "cred-good-a"),
        hits(&f.mock, "cred-good-b"),
        f.mock.request_count()
    );
    assert!(
        failed.is_empty(),
        "{} of {total} requests failed; first: {:?}",
        failed.len(),
        failed.first()
    );
    // The failing accounts were really in the way.
    // (With every failure counted against retry.max_attempts, about one request in 150 failed.)
    assert!(
        failing_hits >= 20,
        "the failing accounts took only {failing_hits} attempts"
    );
    let expected = expected_usage(&body_s);
    let store = f.cp.store.clone();
    let stored = wait_for(Duration::from_secs(30), "every usage event", || async {
        let rows = store
            .query_usage(relay_control_plane::model::UsageQuery::default())
            .await
            .unwrap();
        let t = rows.into_iter().next().unwrap_or_default();
        (t.requests - t.errors >= total as u64).then_some(t)
    })
    .await
    .unwrap();
    assert_eq!(stored.requests - stored.errors, total as u64);
    assert_eq!(stored.input_tokens, total as u64 * expected.input_tokens);
    assert_eq!(stored.output_tokens, total as u64 * expected.output_tokens);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sticky_sessions_keep_an_account_and_move_when_it_is_limited() {
    let f = fleet(3, MockConfig::default(), &[]).await;
    let session = "8f0e1c1e-3c1d-4c4c-9f7e-2f3a1b2c3d4e";
    let turn = |n: usize| {
        // Each turn adds messages; the cache_control mark moves to the last one
        // (so the first user message has it in turn 0 only).
        let mut messages =
            vec![json!({"role": "user", "content": [{"type": "text", "text": "Fix the failing test."}]})];
        for i in 0..n {
            messages.push(json!({"role": "assistant", "content": format!("answer {i}")}));
            messages.push(json!({"role": "user", "content": [{"type": "text", "text": format!("turn {i}")}]}));
        }
        if let Some(last) = messages.last_mut() {
            last["content"][0]["cache_control"] = json!({"type": "ephemeral"});
        }
        json!({"model": "claude-sonnet-4-5", "max_tokens": 100, "stream": true, "messages": messages,
               "system": "You are Claude Code."})
    };
    let used = |from: usize| -> Vec<String> {
        f.mock.requests()[from..]
            .iter()
            .map(|r| r.header("x-api-key").unwrap_or("").to_string())
            .collect()
    };
    for n in 0..20 {
        let r = post(
            &f.dp,
            "/v1/messages",
            &f.key,
            &turn(n),
            &[("x-claude-code-session-id", session)],
        )
        .await;
        assert_complete(&r, true);
    }
    let creds = used(0);
    assert!(
        creds.iter().all(|c| *c == creds[0]),
        "one account for 20 turns: {creds:?}"
    );
    // The same conversation without the header (content hash) stays put too.
    let before = f.mock.requests().len();
    for n in 0..5 {
        assert_complete(&post(&f.dp, "/v1/messages", &f.key, &turn(n), &[]).await, true);
    }
    let by_content = used(before);
    assert!(by_content.iter().all(|c| *c == by_content[0]), "{by_content:?}");
    // Its account gets rate limited: the session moves once, then stays.
    f.mock
        .set_fault(&creds[0], Some(Fault::RateLimited { retry_after_secs: 60 }));
    let before = f.mock.requests().len();
    for n in 20..30 {
        let r = post(
            &f.dp,
            "/v1/messages",
            &f.key,
            &turn(n),
            &[("x-claude-code-session-id", session)],
        )
        .await;
        assert_complete(&r, true);
    }
    let after: Vec<String> = used(before).into_iter().filter(|c| *c != creds[0]).collect();
    assert_eq!(after.len(), 10);
    assert!(
        after.iter().all(|c| *c == after[0]),
        "moved once, then stayed: {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_429_seen_by_one_data_plane_stops_the_other() {
    let f = fleet(2, MockConfig::default(), &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let dp2 = DataPlane::start(&f.cp.url(), "dp-2", dir.path().to_path_buf()).await;
    dp2.wait_version(f.cp.head().await).await;
    f.mock
        .set_fault(&cred(0), Some(Fault::RateLimited { retry_after_secs: 120 }));
    // dp-1 meets the limit.
    // Distinct conversations (one would stick to one account), bounded.
    let mut n = 0;
    while hits(&f.mock, &cred(0)) == 0 {
        n += 1;
        assert!(n < 200, "dp-1 never chose account 0");
        let mut body = message_body("claude-sonnet-4-5", false);
        body["messages"][0]["content"] = json!(format!("conversation {n}"));
        assert_complete(&post_messages(&f.dp, &f.key, &body).await, false);
    }
    let seen = tokio::time::Instant::now();
    let h2 = dp2.dp.as_ref().unwrap().health.clone();
    let account0 = f.ids[0].clone();
    wait_for(Duration::from_secs(1), "dp-2 to learn of the limit", || async {
        let now = chrono_now_ms();
        h2.states(now).iter().any(|s| s.account_id == account0).then_some(())
    })
    .await
    .unwrap();
    assert!(seen.elapsed() < Duration::from_secs(1));
    // dp-2 never sends to the limited account (even though the mock would now accept).
    f.mock.clear_faults();
    let before = hits(&f.mock, &cred(0));
    for _ in 0..30 {
        assert_complete(
            &post_messages(&dp2, &f.key, &message_body("claude-sonnet-4-5", false)).await,
            false,
        );
    }
    assert_eq!(
        hits(&f.mock, &cred(0)),
        before,
        "dp-2 kept away from the limited account"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slots_never_leak_whatever_way_requests_end() {
    let f = fleet(
        2,
        MockConfig {
            event_delay: Duration::from_millis(1),
            ..Default::default()
        },
        &[
            ("upstream.idle_timeout_ms", "200"),
            ("breaker.threshold", "100000"),
            ("cooldown.overloaded_ms", "1"),
            ("cooldown.min_ms", "1"),
            ("retry.max_attempts", "1"),
        ],
    )
    .await;
    // Both accounts allow 4 concurrent requests.
    for name in ["acct-0", "acct-1"] {
        update_account(
            &f,
            pb::UpdateAccountRequest {
                account: name.into(),
                max_concurrency: Some(4),
                ..Default::default()
            },
        )
        .await;
    }
    f.dp.wait_version(f.cp.head().await).await;
    let sem = Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = Vec::new();
    let mut endings: HashMap<&'static str, usize> = HashMap::new();
    for i in 0..1000usize {
        let way: &'static str = [
            "complete-stream",
            "complete-json",
            "client-gone",
            "upstream-500",
            "dropped",
            "error-event",
            "stalled",
        ][i % 7];
        *endings.entry(way).or_default() += 1;
        let permit = sem.clone().acquire_owned().await.unwrap();
        let url = f.dp.url("/v1/messages");
        let key = f.key.clone();
        tasks.push(tokio::spawn(async move {
            let stream = way != "complete-json" && way != "upstream-500";
            let body = message_body("claude-sonnet-4-5", stream).to_string();
            let mut req = http::Request::builder().method("POST").uri(url);
            for (k, v) in sdk_headers(&key) {
                req = req.header(k, v);
            }
            req = match way {
                "upstream-500" => req.header("x-mock-fault", "server-error"),
                "dropped" => req
                    .header("x-mock-fault", "drop-mid-stream")
                    .header("x-mock-fault-after", "3"),
                "error-event" => req
                    .header("x-mock-fault", "error-event")
                    .header("x-mock-fault-after", "3"),
                "stalled" => req.header("x-mock-fault", "stall").header("x-mock-fault-after", "3"),
                _ => req,
            };
            let resp = http_client()
                .request(req.body(http_body_util::Full::new(bytes::Bytes::from(body))).unwrap())
                .await
                .unwrap();
            use http_body_util::BodyExt;
            let mut b = resp.into_body();
            if way == "client-gone" {
                let _ = b.frame().await;
                drop(b);
            } else {
                while let Some(Ok(_)) = b.frame().await {}
            }
            drop(permit);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let balancer = f.dp.dp.as_ref().unwrap().balancer.clone();
    wait_for(Duration::from_secs(5), "every slot to be released", || async {
        (balancer.outstanding_total() == 0).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(endings.len(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_wait_for_a_slot_instead_of_failing() {
    let f = fleet(
        1,
        MockConfig {
            event_delay: Duration::from_millis(15),
            ..Default::default()
        },
        &[],
    )
    .await;
    update_account(
        &f,
        pb::UpdateAccountRequest {
            account: "acct-0".into(),
            max_concurrency: Some(1),
            ..Default::default()
        },
    )
    .await;
    f.dp.wait_version(f.cp.head().await).await;
    let body = message_body("claude-sonnet-4-5", true);
    let (a, b) = tokio::join!(post_messages(&f.dp, &f.key, &body), post_messages(&f.dp, &f.key, &body));
    assert_complete(&a, true);
    assert_complete(&b, true);
    // Past the wait limit: 529 with retry-after.
    f.cp.set_setting("queue.max_wait_ms", "50").await;
    f.dp.wait_version(f.cp.head().await).await;
    let balancer = f.dp.dp.as_ref().unwrap().balancer.clone();
    let (a, b) = tokio::join!(post_messages(&f.dp, &f.key, &body), async {
        // Once the first holds the only slot.
        wait_for(Duration::from_secs(5), "the first stream to hold the slot", || async {
            (balancer.outstanding_total() == 1).then_some(())
        })
        .await
        .unwrap();
        post_messages(&f.dp, &f.key, &body).await
    });
    assert_complete(&a, true);
    assert_eq!(b.status, 529);
    assert_eq!(b.error_type(), "overloaded_error");
    assert!(b.header("retry-after").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_stream_ends_with_an_error_event_and_is_recorded() {
    let f = fleet(1, MockConfig::default(), &[("upstream.idle_timeout_ms", "300")]).await;
    let r = post(
        &f.dp,
        "/v1/messages",
        &f.key,
        &message_body("claude-sonnet-4-5", true),
        &[("x-mock-fault", "stall"), ("x-mock-fault-after", "5")],
    )
    .await;
    assert_eq!(r.status, 200);
    let text = String::from_utf8_lossy(&r.body).to_string();
    assert!(text.starts_with("event: message_start"));
    assert!(
        text.trim_end().ends_with('}') && text.contains("event: error"),
        "{text}"
    );
    assert!(!text.contains("message_stop"));
    let t = wait_for(Duration::from_secs(5), "the stalled attempt's usage", || async {
        let t = f.cp.usage_total().await;
        (t.requests >= 1).then_some(t)
    })
    .await
    .unwrap();
    assert_eq!(t.errors, 1, "recorded as failed");
    assert_eq!(
        t.input_tokens,
        expected_usage(&message_body("claude-sonnet-4-5", true)).input_tokens
    );
}

/// An upstream that accepts no connection (its accept queue is full: the SYN is dropped) is given up after
/// `upstream.connect_timeout_ms`, and the request goes to the next account.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connect_that_hangs_times_out_and_fails_over() {
    let f = fleet(1, MockConfig::default(), &[("upstream.connect_timeout_ms", "200")]).await;
    // A listener with a backlog of 0 whose queue one connection fills: later connects hang.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let hanging = socket.listen(0).unwrap();
    let hanging_addr = hanging.local_addr().unwrap();
    let _filler = std::net::TcpStream::connect(hanging_addr).unwrap();
    let probe = tokio::time::timeout(Duration::from_millis(500), tokio::net::TcpStream::connect(hanging_addr)).await;
    assert!(probe.is_err(), "the listener's queue is full: a connect hangs");
    // Tried first (lower priority number), never connects.
    f.cp.admin()
        .await
        .create_account(pb::CreateAccountRequest {
            name: "hanging".into(),
            kind: pb::AccountKind::AnthropicCompatible as i32,
            base_url: format!("http://{hanging_addr}"),
            credential: "cred-hanging".into(),
            priority: -1,
            ..Default::default()
        })
        .await
        .unwrap();
    f.dp.wait_version(f.cp.head().await).await;
    let started = std::time::Instant::now();
    let r = post_messages(&f.dp, &f.key, &message_body("claude-sonnet-4-5", false)).await;
    let took = started.elapsed();
    assert_complete(&r, false);
    assert_eq!(hits(&f.mock, &cred(0)), 1, "served by the account that answers");
    // The default connect timeout is 10 s; the 200 ms setting is what let it move on.
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

/// With every account out until someone acts (here: a revoked credential), a request waits for a
/// recovery instead of failing at once: the operator's reset lets it through; with no recovery it
/// gets 529 when `queue.max_wait_ms` is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_waits_for_an_operators_recovery() {
    let f = fleet(1, MockConfig::default(), &[("queue.max_wait_ms", "10000")]).await;
    f.mock.set_fault(&cred(0), Some(Fault::Unauthorized));
    let r = post_messages(&f.dp, &f.key, &message_body("claude-sonnet-4-5", false)).await;
    assert_eq!(r.status, 502, "{}", String::from_utf8_lossy(&r.body));
    wait_for(Duration::from_secs(5), "unauthorized state", || async {
        (!account_states(&f.cp, "acct-0").await.is_empty()).then_some(())
    })
    .await
    .unwrap();
    f.dp.wait_version(f.cp.head().await).await;
    f.mock.clear_faults();
    // The next request finds nothing and waits …
    let waiting = {
        let (dp_url, key) = (f.dp.url("/v1/messages"), f.key.clone());
        tokio::spawn(async move {
            let h = sdk_headers(&key);
            let hs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let started = std::time::Instant::now();
            let r = send(
                "POST",
                &dp_url,
                &hs,
                message_body("claude-sonnet-4-5", true).to_string(),
            )
            .await;
            (r, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!waiting.is_finished(), "the request did not wait");
    // … until the operator resets the account.
    f.cp.admin()
        .await
        .reset_account(pb::ResetAccountRequest {
            account: "acct-0".into(),
        })
        .await
        .unwrap();
    let (r, took) = waiting.await.unwrap();
    assert_complete(&r, true);
    assert!(took < Duration::from_secs(8), "{took:?}");
    // Its usage row says what it waited for, and how long.
    let request_id = r.header("request-id").unwrap().to_string();
    let path = f.cp.sqlite_path().unwrap();
    let (waited_ms, waited_for) = wait_for(Duration::from_secs(10), "the waiting request's usage row", || {
        let (path, request_id) = (path.clone(), request_id.clone());
        async move {
            let conn = rusqlite::Connection::open(path).ok()?;
            conn.query_row(
                "SELECT queue_wait_ms, waited_for FROM usage_events WHERE request_id = ?1 AND http_status = 200",
                [&request_id],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
            )
            .ok()
        }
    })
    .await
    .unwrap();
    assert_eq!(waited_for, "recovery");
    assert!((1000..8000).contains(&waited_ms), "{waited_ms}");

    // Nothing recovers: once the wait is up, a 503 that tells SDKs not to retry (no retry helps
    // until someone acts), saying so.
    f.cp.set_setting("queue.max_wait_ms", "1000").await;
    f.mock.set_fault(&cred(0), Some(Fault::Unauthorized));
    let r = post_messages(&f.dp, &f.key, &message_body("claude-sonnet-4-5", false)).await;
    assert_eq!(r.status, 502);
    wait_for(Duration::from_secs(5), "unauthorized state", || async {
        (!account_states(&f.cp, "acct-0").await.is_empty()).then_some(())
    })
    .await
    .unwrap();
    f.dp.wait_version(f.cp.head().await).await;
    let started = std::time::Instant::now();
    let r = post_messages(&f.dp, &f.key, &message_body("claude-sonnet-4-5", false)).await;
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.error_type(), "api_error");
    assert_eq!(r.header("x-should-retry"), Some("false"));
    assert!(
        String::from_utf8_lossy(&r.body).contains("until an operator or an account check restores it"),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
}

/// An upstream that answers under another model's name (a compatible endpoint mapping names):
/// the usage record names the model that answered (the count and the log line are unit-tested:
/// the in-process data plane has no metrics recorder).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_the_request_did_not_ask_for_is_recorded_as_answered() {
    let f = fleet(1, MockConfig::default(), &[]).await;
    let h = sdk_headers(&f.key);
    let mut hs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    hs.push(("x-mock-answer-model", "glm-4.6"));
    for stream in [false, true] {
        let r = send(
            "POST",
            &f.dp.url("/v1/messages"),
            &hs,
            message_body("claude-sonnet-4-5", stream).to_string(),
        )
        .await;
        assert_complete(&r, stream);
    }
    let store = f.cp.store.clone();
    wait_for(Duration::from_secs(10), "usage under the answered model", || async {
        let rows = store
            .query_usage(relay_control_plane::model::UsageQuery {
                group_by: relay_control_plane::model::UsageGroupBy::Model,
                ..Default::default()
            })
            .await
            .unwrap();
        rows.iter()
            .any(|r| r.group == "glm-4.6" && r.requests == 2)
            .then_some(())
    })
    .await
    .unwrap();
}

/// A request waiting for an account (here: the only one is rate limited for a few seconds) goes
/// on only as its key now allows: revoked meanwhile, it gets 401 instead of being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_revoked_while_its_request_waits_is_not_served() {
    let f = fleet(1, MockConfig::default(), &[("queue.max_wait_ms", "10000")]).await;
    f.mock
        .set_fault(&cred(0), Some(Fault::RateLimited { retry_after_secs: 4 }));
    let r = post_messages(&f.dp, &f.key, &message_body("claude-sonnet-4-5", false)).await;
    assert_eq!(r.status, 429);
    f.mock.clear_faults();
    let waiting = {
        let (dp_url, key) = (f.dp.url("/v1/messages"), f.key.clone());
        tokio::spawn(async move {
            let h = sdk_headers(&key);
            let hs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            send(
                "POST",
                &dp_url,
                &hs,
                message_body("claude-sonnet-4-5", false).to_string(),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(!waiting.is_finished(), "the request did not wait for the cooldown");
    let keys =
        f.cp.admin()
            .await
            .list_api_keys(pb::ListApiKeysRequest {})
            .await
            .unwrap()
            .into_inner();
    let id = keys.keys[0].id.clone();
    f.cp.admin()
        .await
        .revoke_api_key(pb::RevokeApiKeyRequest { key: id })
        .await
        .unwrap();
    f.dp.wait_version(f.cp.head().await).await;
    let r = waiting.await.unwrap();
    assert_eq!(r.status, 401, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        f.mock.request_count(),
        1,
        "the revoked key's request never reached an upstream"
    );
}

/// An account that opens a stream and then never sends an event does not hold a streaming
/// request for `upstream.head_timeout_ms` (ten minutes): a stream must start within the retry
/// deadline (at least 10 s), and the request goes on to a healthy account.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_black_holed_stream_fails_over_within_the_retry_deadline() {
    let f = fleet(1, MockConfig::default(), &[("retry.deadline_ms", "3000")]).await;
    f.cp.add_account("good", &f.mock.base_url(), "cred-good").await;
    update_account(
        &f,
        pb::UpdateAccountRequest {
            account: "good".into(),
            priority: Some(1),
            ..Default::default()
        },
    )
    .await;
    f.dp.wait_version(f.cp.head().await).await;
    f.mock.set_fault(&cred(0), Some(Fault::Stall { after_events: 0 }));
    let started = std::time::Instant::now();
    let r = post_messages(&f.dp, &f.key, &message_body("claude-sonnet-4-5", true)).await;
    assert_complete(&r, true);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(20), "held for {took:?}");
    assert_eq!(hits(&f.mock, &cred(0)), 1);
    assert_eq!(hits(&f.mock, "cred-good"), 1);
}
