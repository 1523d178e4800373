//! Groups that fail over and that an operator steers, with the real binaries: one standalone
//! relay process (control plane and in-process data plane), relayctl for every change, and the
//! mock upstream (in this process, so each account's faults can be set and the requests it
//! received counted).
//!
//! A key in group `a` (accounts a-1, a-2; fallback `b` with account b-1), a key in group `solo`
//! (no fallback): `a`'s accounts all failing → served by `b`, then `a` cools down and `b` goes
//! first even once `a`'s accounts answer again, until the cooldown ends; `pause a` → `b` at once
//! and no attempt on `a`; `pause solo` → a clear error; `resume` → `a` again; `activate b` → `b`
//! first.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use relay_mock_upstream::{Fault, MockConfig, MockUpstream};
use relay_test_support::wait_for;
use serde_json::json;
use std::time::{Duration, Instant};

const COOLDOWN_MS: u64 = 8_000;

struct Relay {
    proc: Standalone,
    token: String,
    _dir: tempfile::TempDir,
}

impl Relay {
    fn ctl(&self, args: &[&str]) -> String {
        relayctl(&self.proc.server(), &self.token, args, None)
    }

    fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["-o", "json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.ctl(&a)).unwrap()
    }

    /// Waits until the data plane serves the control plane's head; returns how long that took.
    async fn synced(&self) -> Duration {
        let started = Instant::now();
        wait_for(Duration::from_secs(10), "the data plane to apply the head", || {
            let list = self.ctl_json(&["data-planes", "list"]);
            async move {
                let dp = list.as_array()?.iter().find(|p| p["node_id"] == "standalone")?;
                (dp["lag"].as_u64() == Some(0)).then_some(())
            }
        })
        .await
        .unwrap();
        started.elapsed()
    }

    /// A conversation of its own (sessions would stick to one account otherwise).
    async fn ask(&self, key: &str, n: usize) -> HttpResponse {
        let mut body = message_body("claude-sonnet-4-5", n.is_multiple_of(2));
        body["messages"][0]["content"] = json!(format!("conversation {n}: {}", uuid::Uuid::new_v4()));
        let h = sdk_headers(key);
        let hs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let url = format!("http://127.0.0.1:{}/v1/messages", self.proc.proxy);
        send("POST", &url, &hs, body.to_string()).await
    }

    async fn metrics(&self) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.proc.proxy);
        let r = send("GET", &url, &[], "").await;
        String::from_utf8_lossy(&r.body).into_owned()
    }
}

fn hits(mock: &MockUpstream, credential: &str) -> usize {
    mock.requests()
        .iter()
        .filter(|r| r.header("x-api-key") == Some(credential))
        .count()
}

/// (hits on a-1 and a-2, hits on b-1) since the mock's log was last cleared.
fn by_group(mock: &MockUpstream) -> (usize, usize) {
    (hits(mock, "cred-a1") + hits(mock, "cred-a2"), hits(mock, "cred-b1"))
}

async fn serve_ok(relay: &Relay, key: &str, from: usize, n: usize) {
    for i in from..from + n {
        let r = relay.ask(key, i).await;
        assert_eq!(r.status, 200, "request {i}: {}", String::from_utf8_lossy(&r.body));
        if i.is_multiple_of(2) {
            assert!(String::from_utf8_lossy(&r.body).contains("event: message_stop"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn groups_fail_over_cool_down_and_follow_the_operator() {
    let mock = mock(MockConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut proc = Standalone::spawn(&dir.path().join("relay-data"), &dir.path().join("relay.log"), &[]);
    proc.ready().await;
    let token = std::fs::read_to_string(dir.path().join("relay-data/admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let relay = Relay { proc, token, _dir: dir };
    for (name, value) in [
        ("retry.backoff_base_ms", "1".to_string()),
        ("retry.backoff_max_ms", "5".to_string()),
        ("groups.cooldown_ms", COOLDOWN_MS.to_string()),
    ] {
        relay.ctl(&["settings", "set", name, &value]);
    }
    relay.ctl(&["group", "create", "b"]);
    relay.ctl(&["group", "create", "a", "--fallback", "b"]);
    relay.ctl(&["group", "create", "solo"]);
    for (account, group, cred) in [
        ("a-1", "a", "cred-a1"),
        ("a-2", "a", "cred-a2"),
        ("b-1", "b", "cred-b1"),
        ("s-1", "solo", "cred-s1"),
    ] {
        relayctl(
            &relay.proc.server(),
            &relay.token,
            &[
                "account",
                "add",
                account,
                "--kind",
                "anthropic-compatible",
                "--base-url",
                &mock.base_url(),
                "--group",
                group,
                "--secret-stdin",
            ],
            Some(cred),
        );
    }
    let key_a = relay.ctl_json(&["key", "create", "k-a", "--group", "a"])["key"]
        .as_str()
        .unwrap()
        .to_string();
    let key_solo = relay.ctl_json(&["key", "create", "k-solo", "--group", "solo"])["key"]
        .as_str()
        .unwrap()
        .to_string();
    relay.synced().await;

    // 1. Normally a's own accounts serve its key.
    serve_ok(&relay, &key_a, 0, 6).await;
    let (a, b) = by_group(&mock);
    assert_eq!((a, b), (6, 0), "group a first");

    // 2. Paused: b at once, not one attempt on a; shown with since when and by whom.
    let paused = relay.ctl_json(&["group", "pause", "a"]);
    assert_eq!(paused["state"], "paused");
    let took = relay.synced().await;
    assert!(
        took < Duration::from_secs(2),
        "the pause reached the data plane in {took:?}"
    );
    mock.clear_requests();
    serve_ok(&relay, &key_a, 10, 6).await;
    assert_eq!(by_group(&mock), (0, 6), "a paused group's accounts serve nobody");
    let table = relay.ctl(&["group", "list"]);
    let row = table
        .lines()
        .find(|l| l.trim_start_matches('│').split_whitespace().next() == Some("a"))
        .unwrap_or_else(|| panic!("no row for a: {table}"));
    assert!(row.contains("paused"), "{table}");
    let shown = relay.ctl_json(&["group", "show", "a"]);
    assert_eq!(shown["fallbacks"], json!(["b"]), "{shown}");
    assert!(
        shown["state_since"].is_string() && shown["state_by"].is_string(),
        "{shown}"
    );

    // 3. Paused without a fallback: a clear Anthropic-shaped error, nothing sent upstream.
    relay.ctl(&["group", "pause", "solo"]);
    relay.synced().await;
    let r = relay.ask(&key_solo, 20).await;
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.error_type(), "api_error");
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("\"solo\"") && message.contains("paused") && message.contains("no fallback"),
        "{message}"
    );
    assert_eq!(r.header("x-should-retry"), Some("false"));
    assert_eq!(hits(&mock, "cred-s1"), 0);

    // 4. Resumed: a again (and solo serves again).
    relay.ctl(&["group", "resume", "a"]);
    relay.ctl(&["group", "resume", "solo"]);
    relay.synced().await;
    mock.clear_requests();
    serve_ok(&relay, &key_a, 30, 6).await;
    assert_eq!(by_group(&mock), (6, 0), "resumed: a's own accounts again");
    assert_eq!(relay.ask(&key_solo, 36).await.status, 200);

    // 4b. Its only account disabled: a configuration gap, said as one (not an overload to retry).
    relay.ctl(&["account", "disable", "s-1"]);
    relay.synced().await;
    let r = relay.ask(&key_solo, 37).await;
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.error_type(), "api_error");
    assert_eq!(r.header("x-should-retry"), Some("false"));
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("no enabled upstream account") && message.contains("--groups solo"),
        "{message}"
    );
    relay.ctl(&["account", "enable", "s-1"]);
    relay.synced().await;
    assert_eq!(relay.ask(&key_solo, 38).await.status, 200);

    // 5. b activated: first for keys that fall back to it.
    relay.ctl(&["group", "activate", "b"]);
    relay.synced().await;
    mock.clear_requests();
    serve_ok(&relay, &key_a, 40, 6).await;
    assert_eq!(by_group(&mock), (0, 6), "an activated fallback goes first");
    relay.ctl(&["group", "resume", "b"]);
    relay.synced().await;

    // 6. Every account of a fails: the request is served by b.
    mock.clear_requests();
    for cred in ["cred-a1", "cred-a2"] {
        mock.set_fault(cred, Some(Fault::RateLimited { retry_after_secs: 1 }));
    }
    serve_ok(&relay, &key_a, 50, 1).await;
    let (a, b) = by_group(&mock);
    assert_eq!((a, b), (2, 1), "both of a's accounts were tried, then b served");
    // The next request finds a's accounts all out: a cools down, b serves.
    serve_ok(&relay, &key_a, 51, 1).await;
    let cooled_at = Instant::now();
    assert_eq!(
        by_group(&mock),
        (2, 2),
        "a's accounts are known to be out: not tried again"
    );
    assert!(
        relay.metrics().await.contains("relay_group_cooling{group=\"a\"} 1"),
        "{}",
        relay.metrics().await
    );

    // 7. a's accounts answer again (their 1 s rate limit is over), but a still cools down: b
    // goes first for the cooldown.
    mock.clear_faults();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    mock.clear_requests();
    serve_ok(&relay, &key_a, 60, 4).await;
    assert_eq!(by_group(&mock), (0, 4), "during a's cooldown its fallback goes first");
    assert!(
        cooled_at.elapsed() < Duration::from_millis(COOLDOWN_MS),
        "the check above ran within the cooldown ({:?})",
        cooled_at.elapsed()
    );

    // 8. After the cooldown a is primary again, and the gauge says so.
    let wait = Duration::from_millis(COOLDOWN_MS).saturating_sub(cooled_at.elapsed());
    tokio::time::sleep(wait + Duration::from_millis(200)).await;
    mock.clear_requests();
    serve_ok(&relay, &key_a, 70, 4).await;
    assert_eq!(by_group(&mock), (4, 0), "after the cooldown: a again");
    assert!(
        relay.metrics().await.contains("relay_group_cooling{group=\"a\"} 0"),
        "{}",
        relay.metrics().await
    );

    // Every step is in the audit log.
    let audit = relay.ctl_json(&["audit", "--limit", "50"]);
    let actions: Vec<String> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str().map(str::to_string))
        .collect();
    for want in ["group.pause", "group.resume", "group.activate"] {
        assert!(actions.iter().any(|a| a == want), "{want}: {actions:?}");
    }
}
