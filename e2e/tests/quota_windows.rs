//! Subscription accounts' quota windows: what one data plane sees reaches the control plane
//! (`relayctl account show`) and every other data plane, and scheduling within a priority tier
//! prefers the account with more headroom, so a pool drains evenly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use relay_mock_upstream::MockConfig;
use relay_proto::v1 as pb;
use relay_test_support::wait_for;
use std::time::Duration;

async fn add_subscription(cp: &ControlPlane, name: &str, base_url: &str, token: &str) -> String {
    cp.admin()
        .await
        .create_account(pb::CreateAccountRequest {
            name: name.into(),
            kind: pb::AccountKind::ClaudeOauth as i32,
            base_url: base_url.into(),
            credential: token.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id
}

async fn quota(cp: &ControlPlane, name: &str) -> Option<pb::AccountQuota> {
    cp.admin()
        .await
        .get_account(pb::GetAccountRequest { account: name.into() })
        .await
        .unwrap()
        .into_inner()
        .quota
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quota_windows_are_shared_shown_and_steer_traffic_to_headroom() {
    let cp = ControlPlane::start(Backend::Postgres).await;
    let mock = mock(MockConfig::default()).await;
    // "busy" has used 90% of its 5-hour window, "fresh" 10%.
    mock.set_unified_utilization("tok-busy", 0.9);
    mock.set_unified_utilization("tok-fresh", 0.1);
    add_subscription(&cp, "busy", &mock.base_url(), "tok-busy").await;
    add_subscription(&cp, "fresh", &mock.base_url(), "tok-fresh").await;
    // Scheduling's own threshold stays out of the way: this is about preference, not exclusion.
    cp.set_setting("unified.threshold", "0.99").await;
    let (_, key) = cp.add_key("client", &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let dp1 = DataPlane::start(&cp.url(), "dp-1", dir.path().join("dp1")).await;
    let dp2 = DataPlane::start(&cp.url(), "dp-2", dir.path().join("dp2")).await;
    let head = cp.head().await;
    dp1.wait_version(head).await;
    dp2.wait_version(head).await;
    // Each request a new conversation (the same first message would stick to one account).
    let n = std::sync::atomic::AtomicUsize::new(0);
    let body = || {
        let mut b = message_body("claude-sonnet-4-5", false);
        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        b["messages"][0]["content"] = format!("conversation {i}").into();
        b
    };

    // dp-1 serves until it has seen both accounts.
    let seen = |token: &str| {
        mock.requests()
            .iter()
            .filter(|r| r.header("authorization") == Some(&format!("Bearer {token}")))
            .count()
    };
    wait_for(Duration::from_secs(20), "dp-1 to use both accounts", || async {
        let r = post_messages(&dp1, &key, &body()).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        (seen("tok-busy") > 0 && seen("tok-fresh") > 0).then_some(())
    })
    .await
    .unwrap();

    // The control plane holds what dp-1 saw.
    let q = wait_for(
        Duration::from_secs(20),
        "the quota windows to reach the control plane",
        || async {
            let busy = quota(&cp, "busy").await?;
            quota(&cp, "fresh").await?;
            Some(busy)
        },
    )
    .await
    .unwrap();
    assert_eq!(q.observed_by, "dp-1");
    assert_eq!(q.status, "allowed");
    let five = q.windows.iter().find(|w| w.name == "5h").expect("a 5h window");
    assert!((five.utilization - 0.9).abs() < 1e-6, "{five:?}");
    assert!(five.reset_ms > chrono::Utc::now().timestamp_millis(), "{five:?}");
    let seven = q.windows.iter().find(|w| w.name == "7d").expect("a 7d window");
    assert!((seven.utilization - 0.05).abs() < 1e-6, "{seven:?}");
    // … and relayctl shows it.
    let shown = relayctl(&cp.url(), ADMIN_TOKEN, &["account", "show", "busy"], None);
    assert!(shown.contains("5h 90% (resets in 4h5"), "{shown}");
    assert!(shown.contains("7d 5% (resets in 6d"), "{shown}");
    let listed = relayctl(&cp.url(), ADMIN_TOKEN, &["account", "list"], None);
    assert!(listed.contains("5h 10% · 7d 5%"), "{listed}");

    // dp-2 has served nothing, yet after the next exchange with the control plane it knows the
    // fleet's view: its very first requests already prefer the account with headroom.
    tokio::time::sleep(relay_data_plane::control::quota_report::REPORT_EVERY * 2).await;
    mock.clear_requests();
    for _ in 0..60 {
        let r = post_messages(&dp2, &key, &body()).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
    let (busy, fresh) = (seen("tok-busy"), seen("tok-fresh"));
    assert_eq!(busy + fresh, 60);
    // Headroom 0.1 against 0.9: about 6 of 60 to "busy" (30 if dp-2 knew nothing).
    assert!(busy <= 18, "dp-2 sent {busy} of 60 to the account with 10% headroom");
}
