//! What the notification job queues from the fleet state (`relay_control_plane::notify`), on a
//! real (SQLite) store: each trouble once, its recovery once, rate limits only past
//! `notify.rate_limited_after_ms`, OAuth refresh failures as their own event, data planes lost
//! only past `notify.data_plane_lost_after_ms` and recovered when back.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use relay_control_plane::crypto::MasterKey;
use relay_control_plane::model::*;
use relay_control_plane::notify::Notifier;
use relay_control_plane::spend::SpendCache;
use relay_control_plane::store::sqlite::SqliteStore;
use relay_control_plane::store::DynStore;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;

fn audit() -> AuditRecord {
    AuditRecord {
        actor: "test".into(),
        action: "test".into(),
        target: "test".into(),
        detail: "{}".into(),
    }
}

fn account(id: &str, now: Millis) -> Account {
    Account {
        id: id.into(),
        name: format!("name-{id}"),
        kind: AccountKind::AnthropicApiKey,
        base_url: "https://api.anthropic.com".into(),
        credential_enc: vec![1, 2, 3],
        refresh_token_enc: None,
        credential_hint: "…WXYZ".into(),
        credential_expires_at: None,
        priority: 10,
        weight: 1,
        group_ids: vec!["g1".into()],
        max_concurrency: 8,
        status: AccountStatus::Enabled,
        proxy_url: String::new(),
        proxy_url_enc: None,
        reset_generation: 0,
        scopes: Vec::new(),
        subscription_type: String::new(),
        organization: String::new(),
        created_at: now,
        updated_at: now,
        revision: 0,
    }
}

fn state(id: &str, health: AccountHealth, since: Millis, until: Millis, by: &str) -> Mutation {
    Mutation::SetAccountState(AccountState {
        account_id: id.into(),
        scope: String::new(),
        health,
        reason: "upstream said so".into(),
        until,
        since,
        reported_by: by.into(),
        revision: 0,
    })
}

/// Every queued notification's (type, subject name or id), in order.
async fn queued(store: &DynStore) -> Vec<(String, String)> {
    store
        .notify_due(i64::MAX, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|n| {
            let doc: Value = serde_json::from_str(&n.payload).unwrap();
            assert_eq!(doc["dedup_key"], n.dedup_key.as_str());
            (
                doc["type"].as_str().unwrap().to_string(),
                doc["subject"]["name"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn troubles_are_queued_once_and_their_recoveries_once() {
    let store = Arc::new(SqliteStore::open_in_memory().unwrap()) as DynStore;
    let now = now_ms();
    let mut muts = vec![Mutation::InsertGroup(Group::new(
        "g1",
        "g1",
        "",
        KeyLimits::default(),
        now,
    ))];
    for id in ["a1", "a2", "a3", "a4"] {
        muts.push(Mutation::InsertAccount(account(id, now)));
    }
    store.apply(muts, audit()).await.unwrap();
    store
        .apply(
            vec![
                state("a1", AccountHealth::Unauthorized, now - 1_000, 0, "dp-1"),
                // Limited for 5 s more: not "for long".
                state("a2", AccountHealth::RateLimited, now - 1_000, now + 5_000, "dp-1"),
                // Limited for two minutes already.
                state("a3", AccountHealth::RateLimited, now - 120_000, 0, "dp-1"),
                state(
                    "a4",
                    AccountHealth::Unauthorized,
                    now - 1_000,
                    0,
                    relay_control_plane::jobs::oauth_refresh::ACTOR,
                ),
            ],
            audit(),
        )
        .await
        .unwrap();
    let notifier = Notifier {
        store: store.clone(),
        key: MasterKey::generate(),
        upstreams: Arc::new(relay_net::client::Upstreams::new(&Default::default()).unwrap()),
        spend: Arc::new(SpendCache::new(store.clone())),
    };
    let mut values = BTreeMap::new();
    values.insert("notify.rate_limited_after_ms".to_string(), "60000".to_string());
    values.insert("notify.data_plane_lost_after_ms".to_string(), "30000".to_string());

    notifier.observe(&values, now).await.unwrap();
    notifier.observe(&values, now + 1).await.unwrap();
    let mut got = queued(&store).await;
    got.sort();
    assert_eq!(
        got,
        vec![
            ("account.rate_limited".into(), "name-a3".into()),
            ("account.refresh_failed".into(), "name-a4".into()),
            ("account.unauthorized".into(), "name-a1".into()),
        ]
    );

    // A longer threshold: a3 would not be reported now, but it is still limited: no recovery.
    values.insert("notify.rate_limited_after_ms".to_string(), "600000".to_string());
    // a1 is reset by the operator.
    store
        .apply(
            vec![Mutation::ClearAccountState {
                account_id: "a1".into(),
                scope: String::new(),
            }],
            audit(),
        )
        .await
        .unwrap();
    notifier.observe(&values, now + 2).await.unwrap();
    notifier.observe(&values, now + 3).await.unwrap();
    let got = queued(&store).await;
    assert_eq!(got.len(), 4, "{got:?}");
    assert!(got.contains(&("account.recovered".into(), "name-a1".into())), "{got:?}");
    // a3's limit ends: now it is over.
    store
        .apply(
            vec![Mutation::ClearAccountState {
                account_id: "a3".into(),
                scope: String::new(),
            }],
            audit(),
        )
        .await
        .unwrap();
    notifier.observe(&values, now + 4).await.unwrap();
    notifier.observe(&values, now + 5).await.unwrap();
    let got = queued(&store).await;
    assert_eq!(got.len(), 5, "{got:?}");
    assert!(got.contains(&("account.recovered".into(), "name-a3".into())), "{got:?}");

    // A data plane goes away: lost only past the grace, once; recovered when back, once.
    store
        .record_proxy(
            "dp-x",
            "cp-1",
            ProxyEvent::Connected {
                build_version: "1".into(),
                held: None,
            },
        )
        .await
        .unwrap();
    store
        .record_proxy("dp-x", "cp-1", ProxyEvent::Disconnected)
        .await
        .unwrap();
    let gone = now_ms();
    notifier.observe(&values, gone + 10_000).await.unwrap();
    assert!(!queued(&store).await.iter().any(|(t, _)| t == "data_plane.lost"));
    notifier.observe(&values, gone + 31_000).await.unwrap();
    notifier.observe(&values, gone + 32_000).await.unwrap();
    let lost = queued(&store)
        .await
        .into_iter()
        .filter(|(t, _)| t == "data_plane.lost")
        .count();
    assert_eq!(lost, 1);
    store
        .record_proxy(
            "dp-x",
            "cp-2",
            ProxyEvent::Connected {
                build_version: "1".into(),
                held: None,
            },
        )
        .await
        .unwrap();
    notifier.observe(&values, now_ms()).await.unwrap();
    notifier.observe(&values, now_ms()).await.unwrap();
    let back = queued(&store)
        .await
        .into_iter()
        .filter(|(t, n)| t == "data_plane.recovered" && n == "dp-x")
        .count();
    assert_eq!(back, 1);
    assert!(store
        .notify_open_episodes()
        .await
        .unwrap()
        .iter()
        .all(|e| e.subject != "dp-x"));
}

#[tokio::test]
async fn budget_thresholds_are_queued_once_per_period_and_follow_the_setting() {
    let store = Arc::new(SqliteStore::open_in_memory().unwrap()) as DynStore;
    let now = now_ms();
    let mut group = Group::new("g1", "team-group", "", KeyLimits::default(), now);
    // The group: $10 a month; the key: $1 a day.
    group.limits.monthly_budget = 10_000_000;
    let key = ApiKey {
        id: "k1".into(),
        name: "ci".into(),
        key_hash: "hash-k1".into(),
        key_prefix: "rk-k1".into(),
        status: KeyStatus::Active,
        expires_at: None,
        group_id: "g1".into(),
        allowed_models: vec![],
        limits: KeyLimits {
            daily_budget: 1_000_000,
            ..KeyLimits::default()
        },
        created_at: now,
        updated_at: now,
        revision: 0,
    };
    store
        .apply(vec![Mutation::InsertGroup(group), Mutation::InsertApiKey(key)], audit())
        .await
        .unwrap();
    let spend = |n: u8, usd: f64| UsageEvent {
        event_id: uuid::Uuid::from_bytes([n; 16]),
        request_id: format!("req-{n}"),
        ts: now_ms(),
        node_id: "dp-1".into(),
        api_key_id: "k1".into(),
        account_id: "a1".into(),
        model: "m".into(),
        cost_pico_usd: (usd * 1e12) as u64,
        http_status: 200,
        ..Default::default()
    };
    let notifier = Notifier {
        store: store.clone(),
        key: MasterKey::generate(),
        upstreams: Arc::new(relay_net::client::Upstreams::new(&Default::default()).unwrap()),
        spend: Arc::new(SpendCache::new(store.clone())),
    };
    let mut values = BTreeMap::new();
    let budget_events = |store: DynStore| async move {
        let mut out: Vec<(String, u64, String)> = store
            .notify_due(i64::MAX, 1000)
            .await
            .unwrap()
            .into_iter()
            .filter(|n| n.kind == "budget.threshold")
            .map(|n| {
                let doc: Value = serde_json::from_str(&n.payload).unwrap();
                (
                    doc["subject"]["name"].as_str().unwrap().to_string(),
                    doc["details"]["threshold_percent"].as_u64().unwrap(),
                    doc["details"]["period"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        out.sort();
        out
    };

    // $0.70: below 80% of the key's day.
    store.insert_usage(&[spend(1, 0.70)]).await.unwrap();
    notifier.observe(&values, now_ms()).await.unwrap();
    assert!(budget_events(store.clone()).await.is_empty());
    // $0.85: 80% of the day, once however often it is looked at.
    store.insert_usage(&[spend(2, 0.15)]).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await; // the spend cache's TTL
    notifier.observe(&values, now_ms()).await.unwrap();
    notifier.observe(&values, now_ms()).await.unwrap();
    assert_eq!(
        budget_events(store.clone()).await,
        vec![("ci".into(), 80, "daily".into())]
    );
    // Thresholds 50 and 100 instead: 50% is crossed already; the group's month is at 8.5%.
    values.insert("notify.budget_thresholds".to_string(), "50,100".to_string());
    notifier.observe(&values, now_ms()).await.unwrap();
    // $5.20 more: the key's day is past 100%, the group's month past 50%.
    store.insert_usage(&[spend(3, 5.20)]).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    notifier.observe(&values, now_ms()).await.unwrap();
    notifier.observe(&values, now_ms()).await.unwrap();
    assert_eq!(
        budget_events(store.clone()).await,
        vec![
            ("ci".into(), 50, "daily".into()),
            ("ci".into(), 80, "daily".into()),
            ("ci".into(), 100, "daily".into()),
            ("team-group".into(), 50, "monthly".into()),
        ]
    );
}
