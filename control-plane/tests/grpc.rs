//! The control plane's gRPC services end to end, over real connections, on
//! both stores: the Watch protocol, usage ingest, admin auth and roles.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{account_req, Cp, Held, ADMIN_TOKEN, DP_TOKEN, RO_TOKEN};
use relay_proto::v1 as pb;
use std::time::Duration;
use tonic::Code;

fn rev(u: &pb::ConfigUpdate) -> u64 {
    u.version.unwrap().revision
}

async fn head(cp: &Cp) -> pb::ConfigVersion {
    cp.admin()
        .await
        .get_config_version(pb::GetConfigVersionRequest {})
        .await
        .unwrap()
        .into_inner()
}

both_stores!(watch_snapshot_then_deltas, |cp: Cp| async move {
    let h0 = head(&cp).await;
    let mut w = cp.watch(None, "dp-1").await;
    let mut held = Held::default();

    // A fresh data plane gets the full config at head at once.
    let u = w.next().await;
    assert!(u.full);
    assert_eq!(u.version, Some(h0));
    held.apply(&u);
    assert!(held.config.groups.iter().any(|g| g.name == "default"));
    assert!(held.config.prices.iter().any(|p| p.model_pattern == "claude-sonnet-4*"));
    assert_eq!(held.config.settings.as_ref().unwrap().api_key_hash_secret.len(), 32);
    w.ack(&u).await;

    // An admin write arrives as a delta carrying just the new account, with its credential.
    let mut admin = cp.admin().await;
    let acct = admin
        .create_account(account_req("acct-a", "sk-ant-api03-aaaaaaaaaaaaaaaa"))
        .await
        .unwrap()
        .into_inner();
    let u = w.next().await;
    assert!(!u.full);
    assert_eq!(u.base, Some(h0));
    assert_eq!(rev(&u), h0.revision + 1);
    let r = u.resources.clone().unwrap();
    assert_eq!(r.accounts.len(), 1);
    assert!(r.api_keys.is_empty() && r.groups.is_empty() && r.prices.is_empty());
    assert_eq!(r.accounts[0].credential, "sk-ant-api03-aaaaaaaaaaaaaaaa");
    assert_eq!(r.accounts[0].group_ids, vec!["default".to_string()]);
    held.apply(&u);
    w.ack(&u).await;

    // A key, then the account's removal: upserts and removals.
    let key = admin
        .create_api_key(pb::CreateApiKeyRequest {
            name: "team-a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let u = w.next().await;
    held.apply(&u);
    w.ack(&u).await;
    let k = &held.config.api_keys[0];
    assert_eq!(k.name, "team-a");
    let secret = held.config.settings.as_ref().unwrap().api_key_hash_secret.clone();
    assert_eq!(
        k.key_hash,
        relay_control_plane::crypto::keyed_hash(&secret, &key.key),
        "a data plane can look the key up by its keyed hash"
    );

    admin
        .delete_account(pb::DeleteAccountRequest {
            account: acct.name.clone(),
        })
        .await
        .unwrap();
    let u = w.next().await;
    assert_eq!(
        u.removed,
        vec![pb::ResourceRef {
            kind: pb::ResourceKind::Account as i32,
            id: acct.id.clone()
        }]
    );
    held.apply(&u);
    w.ack(&u).await;
    assert!(held.config.accounts.is_empty());

    // The data plane's state is recorded: acked head, connected.
    let h = head(&cp).await;
    let c = cp.admin().await;
    relay_test_support::wait_for(Duration::from_secs(5), "ack to be recorded", || {
        let mut c = c.clone();
        async move {
            let p = c.list_proxies(pb::ListProxiesRequest {}).await.ok()?.into_inner();
            let dp = p.proxies.into_iter().find(|p| p.node_id == "dp-1")?;
            (dp.acked == Some(h) && dp.connected).then_some(())
        }
    })
    .await
    .unwrap();
});

both_stores!(nack_keeps_old_version_and_is_not_resent, |cp: Cp| async move {
    let mut w = cp.watch(None, "dp-nack").await;
    let first = w.next().await;
    w.ack(&first).await;
    let v1 = first.version.unwrap();

    let mut admin = cp.admin().await;
    admin
        .create_group(pb::CreateGroupRequest {
            name: "g1".into(),
            description: String::new(),
            limits: None,
            ..Default::default()
        })
        .await
        .unwrap();
    let u2 = w.next().await;
    w.nack(&u2, Some(v1), "weights do not validate").await;

    // The NACKed version is not sent again while the head stays there.
    w.expect_quiet(Duration::from_millis(400)).await;
    let proxies = admin
        .list_proxies(pb::ListProxiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let dp = proxies.proxies.iter().find(|p| p.node_id == "dp-nack").unwrap();
    assert_eq!(dp.acked, Some(v1), "the NACKed version never becomes the served one");
    assert_eq!(dp.last_nack_error, "weights do not validate");

    // The next change produces a delta from the version still served.
    admin
        .create_group(pb::CreateGroupRequest {
            name: "g2".into(),
            description: String::new(),
            limits: None,
            ..Default::default()
        })
        .await
        .unwrap();
    let u3 = w.next().await;
    assert_eq!(u3.base, Some(v1));
    assert_eq!(rev(&u3), v1.revision + 2);
    let names: Vec<_> = u3.resources.unwrap().groups.into_iter().map(|g| g.name).collect();
    assert_eq!(names.len(), 2, "both changes since the served version: {names:?}");
});

both_stores!(reconnect_with_held_version, |cp: Cp| async move {
    let h = head(&cp).await;
    // Current: an empty delta at head, at once.
    let mut w = cp.watch(Some(h), "dp-r").await;
    let u = w.next().await;
    assert!(!u.full);
    assert_eq!(u.version, Some(h));
    let r = u.resources.unwrap_or_default();
    assert!(r.accounts.is_empty() && r.api_keys.is_empty() && r.groups.is_empty() && u.removed.is_empty());
    drop(w);

    // An older epoch (history was reset since): a full snapshot.
    let older = pb::ConfigVersion::new(h.epoch - 1, h.revision + 5);
    let mut w = cp.watch(Some(older), "dp-r").await;
    let u = w.next().await;
    assert!(u.full);
    assert_eq!(u.version, Some(h));
    drop(w);

    // A revision the store never reached, in its own epoch: the database was
    // restored from a backup. A new epoch starts and the data plane takes a
    // full snapshot of it instead of waiting for revisions that now mean
    // something else.
    let ahead = pb::ConfigVersion::new(h.epoch, h.revision + 2);
    let mut w = cp.watch(Some(ahead), "dp-r").await;
    let u = w.next().await;
    assert!(u.full, "{u:?}");
    let v = u.version.unwrap();
    assert!(v.epoch > h.epoch && v.revision == h.revision, "{v:?}");
    let audit = cp
        .admin()
        .await
        .list_audit(pb::ListAuditRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        audit.entries.iter().any(|e| e.action == "config.new_epoch"),
        "the new epoch is audited"
    );
    w.ack(&u).await;
    drop(w);

    // A later epoch than the store has (a cache from another deployment): the
    // same, above that epoch, so the data plane never reads it as current.
    let h = head(&cp).await;
    let alien = pb::ConfigVersion::new(h.epoch + 1000, 1);
    let mut w = cp.watch(Some(alien), "dp-r").await;
    let u = w.next().await;
    assert!(u.full);
    assert!(u.version.unwrap().epoch > alien.epoch);
});

/// Design scenario 4: reconnecting to a lagging replica never moves a data
/// plane backwards, and is not mistaken for a restored database.
#[tokio::test]
async fn lagging_replica_never_moves_a_data_plane_backwards() {
    let a = common::start(common::Backend::Sqlite).await;
    let dir = a.sqlite_dir.clone().unwrap();
    // Replica B: its own handle on the same database, polling slowly, so it
    // sees A's writes late.
    let store_b = std::sync::Arc::new(
        relay_control_plane::store::sqlite::SqliteStore::open(&dir.path().join("relay.db")).unwrap(),
    ) as relay_control_plane::store::DynStore;
    let b = common::start_replica_polling(
        store_b,
        a.key.clone(),
        None,
        Some(dir),
        "replica-b",
        Duration::from_secs(2),
    )
    .await;
    let mut wb = b.watch(None, "dp-lag-b").await;
    let first = wb.next().await;
    wb.ack(&first).await;
    let mut admin = a.admin().await;
    admin
        .create_group(pb::CreateGroupRequest {
            name: "newer".into(),
            description: String::new(),
            limits: None,
            ..Default::default()
        })
        .await
        .unwrap();
    let ahead = head(&a).await;
    // A data plane that applied it through A reconnects to B, which lags.
    let mut w = b.watch(Some(ahead), "dp-lag").await;
    w.expect_quiet(Duration::from_millis(300)).await;
    assert_eq!(head(&a).await, ahead, "no new epoch: the store is not behind");
    // B catches up to the same version: still nothing to send.
    let u = wb.next().await;
    assert_eq!(u.version, Some(ahead), "B published the head");
    w.expect_quiet(Duration::from_millis(300)).await;
}

both_stores!(one_update_in_flight_and_coalescing, |cp: Cp| async move {
    let mut w = cp.watch(None, "dp-c").await;
    let mut held = Held::default();
    let first = w.next().await;
    held.apply(&first);
    // Not ACKed yet: 20 writes must not produce a second update.
    let mut admin = cp.admin().await;
    for i in 0..20 {
        admin
            .create_group(pb::CreateGroupRequest {
                name: format!("storm-{i}"),
                description: String::new(),
                limits: None,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    w.expect_quiet(Duration::from_millis(300)).await;
    w.ack(&first).await;
    // The next update jumps to the head, carrying all 20 groups.
    let h = head(&cp).await;
    let u = w.next().await;
    assert_eq!(u.version, Some(h));
    assert_eq!(rev(&u), first.version.unwrap().revision + 20);
    held.apply(&u);
    assert_eq!(
        held.config
            .groups
            .iter()
            .filter(|g| g.name.starts_with("storm-"))
            .count(),
        20
    );
});

both_stores!(concurrent_admin_writers_skip_no_revision, |cp: Cp| async move {
    let h0 = head(&cp).await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let mut admin = cp.admin().await;
        tasks.push(tokio::spawn(async move {
            admin
                .create_group(pb::CreateGroupRequest {
                    name: format!("w-{i}"),
                    description: String::new(),
                    limits: None,
                    ..Default::default()
                })
                .await
                .unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let h = head(&cp).await;
    assert_eq!(h.revision, h0.revision + 50);
    // Each revision has its audit entry.
    let audit = cp.store.list_audit(1000, None).await.unwrap();
    for r in (h0.revision + 1)..=h.revision {
        assert_eq!(audit.iter().filter(|a| a.revision == r).count(), 1, "revision {r}");
    }
    // Once this replica publishes the head (NOTIFY or poll), a watcher that held
    // the version before the storm gets one delta to head with all 50 groups.
    relay_test_support::wait_for(Duration::from_secs(5), "the head to be published", || async {
        let mut probe = cp.watch(None, "probe").await;
        (probe.next().await.version == Some(h)).then_some(())
    })
    .await
    .unwrap();
    let mut w = cp.watch(Some(h0), "dp-w").await;
    let u = w.next().await;
    assert_eq!(u.version, Some(h));
    assert_eq!(u.base, Some(h0));
    assert_eq!(u.resources.unwrap().groups.len(), 50);
});

both_stores!(usage_ingest_is_idempotent, |cp: Cp| async move {
    use futures::StreamExt;
    let mut client = cp.usage(DP_TOKEN).await;
    let events: Vec<pb::UsageEvent> = (0..100u64)
        .map(|i| pb::UsageEvent {
            event_id: uuid::Uuid::now_v7().to_string(),
            request_id: format!("req_{i}"),
            timestamp_ms: relay_control_plane::model::now_ms(),
            api_key_id: "key-1".into(),
            account_id: "acct-1".into(),
            model: if i % 2 == 0 {
                "claude-sonnet-4-5"
            } else {
                "claude-haiku-4-5"
            }
            .into(),
            input_tokens: 10 + i,
            output_tokens: 20 + i,
            cache_write_5m_tokens: i,
            cache_write_1h_tokens: 2 * i,
            cache_read_tokens: 3 * i,
            cost_pico_usd: 1_000_000 * (i + 1),
            http_status: 200,
            ..Default::default()
        })
        .collect();
    let mut bad = events.clone();
    bad.push(pb::UsageEvent {
        event_id: "not-a-uuid".into(),
        ..Default::default()
    });
    let batches = vec![
        pb::UsageBatch {
            batch_id: 1,
            node_id: "dp-u".into(),
            events: bad,
            oldest_unacked_age_ms: 0,
        },
        // The same events again (a resend after a lost ACK).
        pb::UsageBatch {
            batch_id: 2,
            node_id: "dp-u".into(),
            events: events.clone(),
            oldest_unacked_age_ms: 0,
        },
    ];
    let mut acks = client
        .report(futures::stream::iter(batches))
        .await
        .unwrap()
        .into_inner();
    let a1 = acks.next().await.unwrap().unwrap();
    assert_eq!((a1.batch_id, a1.inserted, a1.duplicates, a1.rejected), (1, 100, 0, 1));
    let a2 = acks.next().await.unwrap().unwrap();
    assert_eq!((a2.batch_id, a2.inserted, a2.duplicates), (2, 0, 100));

    // The same batch on a new stream (a restarted data plane) is absorbed too.
    let mut client = cp.usage(DP_TOKEN).await;
    let mut acks = client
        .report(futures::stream::iter(vec![pb::UsageBatch {
            batch_id: 1,
            node_id: "dp-u".into(),
            events: events.clone(),
            oldest_unacked_age_ms: 0,
        }]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(acks.next().await.unwrap().unwrap().duplicates, 100);

    let rows = cp
        .admin()
        .await
        .query_usage(pb::QueryUsageRequest {
            group_by: pb::UsageGroupBy::Model as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .rows;
    assert_eq!(rows.len(), 2);
    let total_requests: u64 = rows.iter().map(|r| r.requests).sum();
    assert_eq!(total_requests, 100, "one row per event, however often it was sent");
    let sum = |f: fn(&pb::UsageEvent) -> u64| events.iter().map(f).sum::<u64>();
    let got = |f: fn(&pb::UsageRow) -> u64| rows.iter().map(f).sum::<u64>();
    assert_eq!(got(|r| r.input_tokens), sum(|e| e.input_tokens));
    assert_eq!(got(|r| r.output_tokens), sum(|e| e.output_tokens));
    assert_eq!(got(|r| r.cache_write_5m_tokens), sum(|e| e.cache_write_5m_tokens));
    assert_eq!(got(|r| r.cache_write_1h_tokens), sum(|e| e.cache_write_1h_tokens));
    assert_eq!(got(|r| r.cache_read_tokens), sum(|e| e.cache_read_tokens));
    assert_eq!(got(|r| r.cost_pico_usd), sum(|e| e.cost_pico_usd));
    let sonnet = rows.iter().find(|r| r.group == "claude-sonnet-4-5").unwrap();
    assert_eq!(sonnet.requests, 50);
});

both_stores!(absurd_usage_is_clamped_flagged_and_reportable, |cp: Cp| async move {
    // An upstream claimed 2e12 input tokens, a u64::MAX cost, a status of 70000: the rows are kept
    // (the requests happened), clamped to what one request can carry and flagged; every report
    // over them still answers.
    use futures::StreamExt;
    let mut client = cp.usage(DP_TOKEN).await;
    let absurd = |i: u64| pb::UsageEvent {
        event_id: uuid::Uuid::now_v7().to_string(),
        request_id: format!("req_absurd_{i}"),
        timestamp_ms: relay_control_plane::model::now_ms(),
        api_key_id: "key-1".into(),
        account_id: "acct-1".into(),
        model: "claude-sonnet-4-5".into(),
        input_tokens: 2_000_000_000_000,
        output_tokens: u64::MAX,
        cost_pico_usd: u64::MAX,
        http_status: 70_000,
        ..Default::default()
    };
    let sane = pb::UsageEvent {
        event_id: uuid::Uuid::now_v7().to_string(),
        request_id: "req_sane".into(),
        timestamp_ms: relay_control_plane::model::now_ms(),
        api_key_id: "key-1".into(),
        account_id: "acct-1".into(),
        model: "claude-sonnet-4-5".into(),
        input_tokens: 10,
        output_tokens: 20,
        cost_pico_usd: 30,
        http_status: 200,
        anomaly: "unparsed".into(),
        ..Default::default()
    };
    let mut acks = client
        .report(futures::stream::iter(vec![pb::UsageBatch {
            batch_id: 1,
            node_id: "dp-u".into(),
            events: vec![absurd(1), absurd(2), sane],
            oldest_unacked_age_ms: 0,
        }]))
        .await
        .unwrap()
        .into_inner();
    let a = acks.next().await.unwrap().unwrap();
    assert_eq!((a.inserted, a.rejected), (3, 0), "nothing is dropped");
    for group_by in [
        pb::UsageGroupBy::Unspecified,
        pb::UsageGroupBy::Key,
        pb::UsageGroupBy::Model,
    ] {
        let rows = cp
            .admin()
            .await
            .query_usage(pb::QueryUsageRequest {
                group_by: group_by as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .rows;
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(r.requests, 3);
        assert_eq!(r.anomalies, 3, "two suspect, one unparsed");
        let max = relay_proto::bounds::MAX_TOKENS_PER_REQUEST;
        assert_eq!(r.input_tokens, 2 * max + 10);
        assert_eq!(r.output_tokens, 2 * max + 20);
        assert_eq!(
            r.cost_pico_usd,
            2 * relay_proto::bounds::MAX_COST_PICO_USD_PER_REQUEST + 30
        );
    }
});

both_stores!(tokens_are_checked_before_messages_are_decoded, |cp: Cp| async move {
    // 100 MiB in one Admin call: without a valid token it is refused from the head alone (had
    // it been decoded first, the answer would be about its size, not the token).
    let huge = pb::CreateAccountRequest {
        name: "x".repeat(100 << 20),
        ..Default::default()
    };
    for token in [None, Some("rat-not-a-token-of-this-deployment-0123456789abcdef")] {
        let e = cp
            .admin_as(token)
            .await
            .max_encoding_message_size(usize::MAX)
            .create_account(huge.clone())
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{token:?}: {e}");
    }
    // A client's API key in place of the admin token: told apart.
    let e = cp
        .admin_as(Some("rk-0123456789abcdef0123456789abcdef"))
        .await
        .list_accounts(pb::ListAccountsRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(e.message().contains("client API key"), "{}", e.message());
    // A data-plane token may not call Admin at all; an operator token may not Watch.
    let e = cp
        .admin_as(Some(DP_TOKEN))
        .await
        .max_encoding_message_size(usize::MAX)
        .create_account(huge.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    let e = cp.watch_as(ADMIN_TOKEN, None, "dp-x").await.err().unwrap();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    // An admin's Admin messages are small: 5 MiB is refused for its size.
    let e = cp
        .admin()
        .await
        .max_encoding_message_size(usize::MAX)
        .create_account(pb::CreateAccountRequest {
            name: "x".repeat(5 << 20),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e}");
    // A token created a moment ago (not yet in a published head) is let through.
    let created = cp
        .admin()
        .await
        .create_admin_token(pb::CreateAdminTokenRequest {
            name: "fresh".into(),
            role: pb::AdminRole::ReadOnly as i32,
        })
        .await
        .unwrap()
        .into_inner();
    // Where it came from, as `token list` will say it.
    assert!(
        created.info.as_ref().unwrap().source.starts_with("created by "),
        "{created:?}"
    );
    let listed = cp
        .admin_as(Some(&created.token))
        .await
        .list_accounts(pb::ListAccountsRequest {})
        .await;
    assert!(listed.is_ok(), "{listed:?}");
});

/// The config a fresh data plane holds once it has caught up with the head.
async fn snapshot(cp: &Cp, node: &str) -> pb::Resources {
    let target = head(cp).await;
    let mut w = cp.watch(None, node).await;
    let mut held = Held::default();
    follow(&mut w, &mut held, target).await;
    held.config
}

both_stores!(key_limits_are_stored_shipped_and_checked, |cp: Cp| async move {
    let mut admin = cp.admin().await;
    let limits = pb::KeyLimits {
        requests_per_minute: 60,
        tokens_per_minute: 100_000,
        max_concurrency: 2,
        daily_budget_micro_usd: 5_000_000,
        monthly_budget_micro_usd: 100_000_000,
    };
    let k = admin
        .create_api_key(pb::CreateApiKeyRequest {
            name: "limited".into(),
            limits: Some(limits),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(k.limits, Some(limits));
    let shipped = snapshot(&cp, "dp-limits").await;
    let key = shipped.api_keys.iter().find(|x| x.id == k.id).unwrap();
    assert_eq!(key.limits, Some(limits), "data planes receive the limits to enforce");

    // An update replaces the limits; 0 clears one.
    let cleared = pb::KeyLimits {
        requests_per_minute: 0,
        max_concurrency: 4,
        ..limits
    };
    let u = admin
        .update_api_key(pb::UpdateApiKeyRequest {
            key: "limited".into(),
            limits: Some(cleared),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(u.limits, Some(cleared));
    let audit = admin
        .list_audit(pb::ListAuditRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(
        audit[0].action == "key.update" && audit[0].detail.contains(r#""concurrency":4"#),
        "{:?}",
        audit[0]
    );

    // Beyond what the limiter counts exactly: refused, saying which and why, nothing stored.
    let e = admin
        .create_api_key(pb::CreateApiKeyRequest {
            name: "too-much".into(),
            limits: Some(pb::KeyLimits {
                tokens_per_minute: u64::MAX,
                daily_budget_micro_usd: 2_000_000_000_000,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("--tpm")
            && e.message().contains("--daily-budget")
            && e.message().contains("$2000000.00")
            && e.message().contains("0 means unlimited"),
        "{}",
        e.message()
    );
    let names: Vec<String> = admin
        .list_api_keys(pb::ListApiKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys
        .into_iter()
        .map(|k| k.name)
        .collect();
    assert_eq!(names, ["limited"]);
    let e = admin
        .update_api_key(pb::UpdateApiKeyRequest {
            key: "limited".into(),
            limits: Some(pb::KeyLimits {
                monthly_budget_micro_usd: u64::MAX,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("--monthly-budget"), "{}", e.message());
});

both_stores!(groups_carry_limits_and_update_in_place, |cp: Cp| async move {
    let mut admin = cp.admin().await;
    let limits = pb::KeyLimits {
        requests_per_minute: 600,
        daily_budget_micro_usd: 50_000_000,
        ..Default::default()
    };
    let g = admin
        .create_group(pb::CreateGroupRequest {
            name: "team".into(),
            description: "Team A".into(),
            limits: Some(limits),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.limits, Some(limits));
    admin
        .create_api_key(pb::CreateApiKeyRequest {
            name: "team-key".into(),
            group: "team".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let shipped = snapshot(&cp, "dp-groups").await;
    let sg = shipped.groups.iter().find(|x| x.id == g.id).unwrap();
    assert_eq!(sg.limits, Some(limits), "the group's total ships to data planes");
    let default = shipped.groups.iter().find(|x| x.name == "default").unwrap();
    assert_eq!(default.limits, None, "a group without limits ships as before");

    // Rename, describe and limit anew: the id stays, its key follows, audited.
    let new_limits = pb::KeyLimits {
        monthly_budget_micro_usd: 900_000_000,
        ..Default::default()
    };
    let u = admin
        .update_group(pb::UpdateGroupRequest {
            group: "team".into(),
            name: Some("team-a".into()),
            description: Some("Team A, renamed".into()),
            limits: Some(new_limits),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            u.id.as_str(),
            u.name.as_str(),
            u.description.as_str(),
            u.limits,
            u.key_count
        ),
        (g.id.as_str(), "team-a", "Team A, renamed", Some(new_limits), 1)
    );
    let keys = admin
        .list_api_keys(pb::ListApiKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(keys[0].group, "team-a");
    let listed = admin
        .list_groups(pb::ListGroupsRequest {})
        .await
        .unwrap()
        .into_inner()
        .groups;
    let l = listed.iter().find(|x| x.id == g.id).unwrap();
    assert_eq!((l.name.as_str(), l.limits), ("team-a", Some(new_limits)));
    let audit = admin
        .list_audit(pb::ListAuditRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(
        (audit[0].action.as_str(), audit[0].target.as_str()),
        ("group.update", "team")
    );
    assert!(audit[0].detail.contains("team-a"), "{}", audit[0].detail);
    // Only what is given changes: a description alone keeps the limits.
    let d = admin
        .update_group(pb::UpdateGroupRequest {
            group: g.id.clone(),
            description: Some(String::new()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((d.description.as_str(), d.limits), ("", Some(new_limits)));
    let shipped = snapshot(&cp, "dp-groups-2").await;
    let sg = shipped.groups.iter().find(|x| x.id == g.id).unwrap();
    assert_eq!((sg.name.as_str(), sg.limits), ("team-a", Some(new_limits)));

    // Refused: renaming the default group, a missing group, a taken name, bad limits, a reader.
    let code = |r: Result<tonic::Response<pb::GroupInfo>, tonic::Status>| r.err().map(|s| s.code());
    let upd = |group: &str, name: Option<&str>, limits: Option<pb::KeyLimits>| pb::UpdateGroupRequest {
        group: group.into(),
        name: name.map(String::from),
        limits,
        ..Default::default()
    };
    assert_eq!(
        code(admin.update_group(upd("default", Some("other"), None)).await),
        Some(Code::FailedPrecondition)
    );
    assert_eq!(
        code(admin.update_group(upd("nope", None, None)).await),
        Some(Code::NotFound)
    );
    assert_eq!(
        code(admin.update_group(upd("team-a", Some("default"), None)).await),
        Some(Code::AlreadyExists)
    );
    assert_eq!(
        code(admin.update_group(upd("team-a", Some("bad name"), None)).await),
        Some(Code::InvalidArgument)
    );
    let too_much = pb::KeyLimits {
        daily_budget_micro_usd: u64::MAX,
        ..Default::default()
    };
    let e = admin
        .update_group(upd("team-a", None, Some(too_much)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with("invalid group limits") && e.message().contains("--daily-budget"),
        "{}",
        e.message()
    );
    assert_eq!(
        code(
            cp.admin_as(Some(RO_TOKEN))
                .await
                .update_group(upd("team-a", Some("x"), None))
                .await
        ),
        Some(Code::PermissionDenied)
    );
    let after = admin
        .list_groups(pb::ListGroupsRequest {})
        .await
        .unwrap()
        .into_inner()
        .groups;
    let l = after.iter().find(|x| x.id == g.id).unwrap();
    assert_eq!(
        (l.name.as_str(), l.limits, after.len()),
        ("team-a", Some(new_limits), listed.len()),
        "nothing refused changed anything"
    );
});

/// Stores `events` through `UsageIngest.Report`, as a data plane does.
async fn report(cp: &Cp, events: Vec<pb::UsageEvent>) {
    use futures::StreamExt;
    let n = events.len() as u32;
    let mut acks = cp
        .usage(DP_TOKEN)
        .await
        .report(futures::stream::iter(vec![pb::UsageBatch {
            batch_id: 1,
            node_id: "dp-spend".into(),
            events,
            oldest_unacked_age_ms: 0,
        }]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(acks.next().await.unwrap().unwrap().inserted, n);
}

fn spent_event(key_id: &str, ts: i64, cost_pico_usd: u64) -> pb::UsageEvent {
    pb::UsageEvent {
        event_id: uuid::Uuid::now_v7().to_string(),
        request_id: "req".into(),
        timestamp_ms: ts,
        api_key_id: key_id.into(),
        account_id: "acct".into(),
        model: "claude-sonnet-4-5".into(),
        input_tokens: 10,
        cost_pico_usd,
        http_status: 200,
        ..Default::default()
    }
}

both_stores!(spend_is_the_stored_usage_of_every_budget, |cp: Cp| async move {
    let mut admin = cp.admin().await;
    let mut spend_client = cp.usage(DP_TOKEN).await;
    let tz = relay_proto::settings::known("limits.timezone").tz_in(&Default::default());

    // Nothing has a budget yet: the periods, no rows.
    let r = spend_client.spend(pb::SpendRequest {}).await.unwrap().into_inner();
    let p = relay_proto::periods::periods(tz, r.computed_at_ms);
    assert_eq!((r.day.as_str(), r.month.as_str()), (p.day.as_str(), p.month.as_str()));
    assert!(r.keys.is_empty() && r.groups.is_empty(), "{r:?}");
    // Only data planes ask.
    let e = cp
        .usage(ADMIN_TOKEN)
        .await
        .spend(pb::SpendRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    let daily = |usd: u64| pb::KeyLimits {
        daily_budget_micro_usd: usd * 1_000_000,
        ..Default::default()
    };
    admin
        .create_group(pb::CreateGroupRequest {
            name: "team".into(),
            limits: Some(daily(100)),
            ..Default::default()
        })
        .await
        .unwrap();
    let key = |name: &str, group: &str, limits: pb::KeyLimits| {
        let mut admin = admin.clone();
        let (name, group) = (name.to_string(), group.to_string());
        async move {
            admin
                .create_api_key(pb::CreateApiKeyRequest {
                    name,
                    group,
                    limits: Some(limits),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .info
                .unwrap()
                .id
        }
    };
    let k1 = key("k1", "team", daily(5)).await;
    let k2 = key("k2", "team", pb::KeyLimits::default()).await;
    let monthly = pb::KeyLimits {
        monthly_budget_micro_usd: 50_000_000,
        requests_per_minute: 10,
        ..Default::default()
    };
    let k3 = key("k3", "", monthly).await;
    let k4 = key(
        "k4",
        "",
        pb::KeyLimits {
            requests_per_minute: 10,
            ..Default::default()
        },
    )
    .await;

    let now = relay_control_plane::model::now_ms();
    let p = relay_proto::periods::periods(tz, now);
    let earlier_this_month = (p.month_start_ms < p.day_start_ms).then_some(p.day_start_ms - 1);
    let mut events = vec![
        spent_event(&k1, now, 1_000_000_000_000),
        spent_event(&k1, now, 250_000_000_000),
        spent_event(&k2, now, 3_000_000_000_000),
        spent_event(&k3, now, 7),
        spent_event(&k4, now, 11_000_000_000_000),
        // Last month counts nowhere.
        spent_event(&k1, p.month_start_ms - 1, 99_000_000_000_000),
        spent_event(&k3, p.month_start_ms - 1, 99_000_000_000_000),
    ];
    if let Some(ts) = earlier_this_month {
        // Yesterday (this month): the month's, not the day's.
        events.push(spent_event(&k1, ts, 500_000_000_000));
        events.push(spent_event(&k2, ts, 20));
    }
    report(&cp, events).await;
    let (k1_month_extra, k2_month_extra) = if earlier_this_month.is_some() {
        (500_000_000_000, 20)
    } else {
        (0, 0)
    };
    // The answer is at most a second old.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let r = spend_client.spend(pb::SpendRequest {}).await.unwrap().into_inner();
    if r.day != p.day {
        return; // midnight passed meanwhile: the sums above were for another day
    }
    let by_id = |rows: &[pb::Spend]| {
        rows.iter()
            .map(|s| (s.id.clone(), (s.day_pico_usd, s.month_pico_usd)))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let keys = by_id(&r.keys);
    assert_eq!(
        keys,
        [
            (k1.clone(), (1_250_000_000_000, 1_250_000_000_000 + k1_month_extra)),
            (k3.clone(), (7, 7)),
        ]
        .into(),
        "only keys with a budget, exact; k2 and k4 have none"
    );
    let team_id = admin
        .list_groups(pb::ListGroupsRequest {})
        .await
        .unwrap()
        .into_inner()
        .groups
        .into_iter()
        .find(|g| g.name == "team")
        .unwrap()
        .id;
    let team_day = 1_250_000_000_000 + 3_000_000_000_000;
    assert_eq!(
        by_id(&r.groups),
        [(team_id.clone(), (team_day, team_day + k1_month_extra + k2_month_extra))].into(),
        "a group's spend is its keys' (with or without their own budget)"
    );

    // Cached: a hundred polls within the second cost one computation and agree.
    let first = spend_client.spend(pb::SpendRequest {}).await.unwrap().into_inner();
    report(&cp, vec![spent_event(&k1, now, 1)]).await;
    for _ in 0..100 {
        let again = spend_client.spend(pb::SpendRequest {}).await.unwrap().into_inner();
        if again.computed_at_ms != first.computed_at_ms {
            break; // the second ended: a fresh answer
        }
        assert_eq!(again, first);
    }
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let r = spend_client.spend(pb::SpendRequest {}).await.unwrap().into_inner();
    assert_eq!(
        by_id(&r.keys)[&k1].0,
        1_250_000_000_001,
        "new usage counts within a second"
    );

    // Operators see the same numbers, with the key's group's.
    let shown = admin
        .get_api_key(pb::GetApiKeyRequest { key: "k1".into() })
        .await
        .unwrap()
        .into_inner();
    let s = shown.spend.unwrap();
    assert_eq!((s.day.as_str(), s.day_pico_usd), (p.day.as_str(), 1_250_000_000_001));
    assert_eq!(s.month_pico_usd, 1_250_000_000_001 + k1_month_extra);
    assert_eq!(
        (s.day_resets_at_ms, s.month_resets_at_ms),
        (p.day_end_ms, p.month_end_ms)
    );
    assert_eq!(shown.info.unwrap().limits, Some(daily(5)));
    assert_eq!(shown.group_limits, Some(daily(100)));
    assert_eq!(shown.group_spend.unwrap().day_pico_usd, team_day + 1);
    assert!(
        shown.live.is_none() && shown.group_live.is_none(),
        "live use is not made up"
    );
    // A key without a budget shows its spend too; readers may look; unknown keys are not found.
    let shown = cp
        .admin_as(Some(RO_TOKEN))
        .await
        .get_api_key(pb::GetApiKeyRequest { key: k4.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.spend.unwrap().day_pico_usd, 11_000_000_000_000);
    let e = admin
        .get_api_key(pb::GetApiKeyRequest { key: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // The time zone is the operator's: the periods follow it.
    admin
        .set_setting(pb::SetSettingRequest {
            name: "limits.timezone".into(),
            value: "Pacific/Kiritimati".into(),
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let r = spend_client.spend(pb::SpendRequest {}).await.unwrap().into_inner();
    let settings =
        std::collections::BTreeMap::from([("limits.timezone".to_string(), "Pacific/Kiritimati".to_string())]);
    let kiritimati = relay_proto::settings::known("limits.timezone").tz_in(&settings);
    let p = relay_proto::periods::periods(kiritimati, r.computed_at_ms);
    assert_eq!((r.day.as_str(), r.month.as_str()), (p.day.as_str(), p.month.as_str()));
});

both_stores!(admin_auth_and_roles, |cp: Cp| async move {
    let list = |token: Option<&'static str>| {
        let cp = &cp;
        async move {
            cp.admin_as(token)
                .await
                .list_accounts(pb::ListAccountsRequest {})
                .await
                .map(|_| ())
                .map_err(|s| s.code())
        }
    };
    let create = |token: Option<&'static str>, name: &'static str| {
        let cp = &cp;
        async move {
            cp.admin_as(token)
                .await
                .create_group(pb::CreateGroupRequest {
                    name: name.into(),
                    description: String::new(),
                    limits: None,
                    ..Default::default()
                })
                .await
                .map(|_| ())
                .map_err(|s| s.code())
        }
    };
    assert_eq!(list(None).await, Err(Code::Unauthenticated));
    assert_eq!(list(Some("rat-not-a-real-token")).await, Err(Code::Unauthenticated));
    assert_eq!(list(Some(RO_TOKEN)).await, Ok(()));
    assert_eq!(list(Some(ADMIN_TOKEN)).await, Ok(()));
    assert_eq!(list(Some(DP_TOKEN)).await, Err(Code::PermissionDenied));
    assert_eq!(create(Some(RO_TOKEN), "ro-write").await, Err(Code::PermissionDenied));
    assert_eq!(create(Some(DP_TOKEN), "dp-write").await, Err(Code::PermissionDenied));
    assert_eq!(create(Some(ADMIN_TOKEN), "admin-write").await, Ok(()));
    // Only data-plane tokens may Watch (a watch stream carries credentials).
    for t in [ADMIN_TOKEN, RO_TOKEN] {
        let code = cp.watch_as(t, None, "intruder").await.err().map(|s| s.code());
        assert_eq!(code, Some(Code::PermissionDenied));
    }
    // A read-only token cannot mint tokens; nothing changed on denial.
    let before = head(&cp).await;
    let r = cp
        .admin_as(Some(RO_TOKEN))
        .await
        .create_admin_token(pb::CreateAdminTokenRequest {
            name: "escalate".into(),
            role: pb::AdminRole::Admin as i32,
        })
        .await;
    assert_eq!(r.err().map(|s| s.code()), Some(Code::PermissionDenied));
    assert_eq!(head(&cp).await, before);
    // Every change is audited with its actor.
    let audit = cp
        .admin_as(Some(RO_TOKEN))
        .await
        .list_audit(pb::ListAuditRequest { limit: 10, since_ms: 0 })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(audit[0].action, "group.create");
    assert_eq!(audit[0].target, "admin-write");
    assert!(audit[0].actor.starts_with("bootstrap-"));
});

both_stores!(a_group_whose_keys_are_all_revoked_can_be_removed, |cp: Cp| async move {
    let mut admin = cp.admin().await;
    for g in ["team", "busy"] {
        admin
            .create_group(pb::CreateGroupRequest {
                name: g.into(),
                description: String::new(),
                limits: None,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let key = |name: &str, group: &str| pb::CreateApiKeyRequest {
        name: name.into(),
        group: group.into(),
        ..Default::default()
    };
    admin.create_api_key(key("old", "team")).await.unwrap();
    admin.create_api_key(key("live", "busy")).await.unwrap();
    let mut acct = account_req("member", "sk-member");
    acct.groups = vec!["busy".into()];
    admin.create_account(acct).await.unwrap();

    // A live key or an account holds a group, and the refusal names them.
    let e = admin
        .delete_group(pb::DeleteGroupRequest { group: "busy".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("accounts member") && e.message().contains("live") && !e.message().contains('['),
        "{}",
        e.message()
    );
    let e = admin
        .delete_group(pb::DeleteGroupRequest { group: "team".into() })
        .await
        .unwrap_err();
    assert!(e.message().contains("old"), "{}", e.message());

    // Revoked keys do not.
    admin
        .revoke_api_key(pb::RevokeApiKeyRequest { key: "old".into() })
        .await
        .unwrap();
    admin
        .delete_group(pb::DeleteGroupRequest { group: "team".into() })
        .await
        .unwrap();
    let keys = admin
        .list_api_keys(pb::ListApiKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    let old = keys.iter().find(|k| k.name == "old").unwrap();
    assert_eq!(old.group, "default", "the revoked key stays, in the default group");
    assert_eq!(old.status, pb::KeyStatus::Revoked as i32);
    let groups = admin
        .list_groups(pb::ListGroupsRequest {})
        .await
        .unwrap()
        .into_inner()
        .groups;
    assert!(groups.iter().all(|g| g.name != "team"));
});

both_stores!(
    group_fallbacks_are_validated_shipped_and_block_deletion,
    |cp: Cp| async move {
        let mut admin = cp.admin().await;
        let create = |name: &str, fallbacks: &[&str]| pb::CreateGroupRequest {
            name: name.into(),
            fallbacks: fallbacks.iter().map(|f| f.to_string()).collect(),
            ..Default::default()
        };
        admin.create_group(create("c", &[])).await.unwrap();
        let b = admin.create_group(create("b", &[])).await.unwrap().into_inner();
        // Created with fallbacks by name or id, kept in the order given.
        let a = admin
            .create_group(create("a", &["c", &b.id]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(a.fallbacks, ["c", "b"]);
        assert_eq!(a.state, pb::GroupState::Active as i32);
        let set = |group: &str, fallbacks: &[&str]| pb::UpdateGroupRequest {
            group: group.into(),
            set_fallbacks: true,
            fallbacks: fallbacks.iter().map(|f| f.to_string()).collect(),
            ..Default::default()
        };
        let a = admin.update_group(set("a", &["b", "c"])).await.unwrap().into_inner();
        assert_eq!(a.fallbacks, ["b", "c"]);

        // Refused, with a message that says why: unknown, self, twice, a cycle.
        let refused = |r: Result<tonic::Response<pb::GroupInfo>, tonic::Status>| {
            let e = r.unwrap_err();
            (e.code(), e.message().to_string())
        };
        let (code, msg) = refused(admin.update_group(set("a", &["nope"])).await);
        assert_eq!(code, Code::NotFound, "{msg}");
        assert!(msg.contains("\"nope\" not found"), "{msg}");
        let (code, msg) = refused(admin.update_group(set("a", &["a"])).await);
        assert_eq!(code, Code::InvalidArgument, "{msg}");
        assert!(msg.contains("cannot be its own fallback"), "{msg}");
        let (code, msg) = refused(admin.update_group(set("a", &["b", "b"])).await);
        assert_eq!(code, Code::InvalidArgument, "{msg}");
        assert!(msg.contains("twice"), "{msg}");
        admin.update_group(set("b", &["c"])).await.unwrap();
        let (code, msg) = refused(admin.update_group(set("c", &["a"])).await);
        assert_eq!(code, Code::InvalidArgument, "{msg}");
        assert!(msg.contains("cycle: c → a → b → c"), "{msg}");
        let (code, msg) = refused(admin.create_group(create("d", &["d"])).await);
        assert_eq!(
            code,
            Code::NotFound,
            "a group cannot name itself before it exists: {msg}"
        );
        // A reader cannot change fallbacks.
        let e = cp
            .admin_as(Some(RO_TOKEN))
            .await
            .update_group(set("a", &[]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);

        // Audited, by name; shipped to data planes by id, in order.
        let audit = admin
            .list_audit(pb::ListAuditRequest::default())
            .await
            .unwrap()
            .into_inner()
            .entries;
        let e = audit
            .iter()
            .find(|e| e.action == "group.update" && e.target == "b")
            .unwrap();
        assert!(e.detail.contains(r#""fallbacks":["c"]"#), "{}", e.detail);
        let groups = admin
            .list_groups(pb::ListGroupsRequest {})
            .await
            .unwrap()
            .into_inner()
            .groups;
        let id = |n: &str| groups.iter().find(|g| g.name == n).unwrap().id.clone();
        let c = groups.iter().find(|g| g.name == "c").unwrap();
        assert_eq!(c.fallback_of, ["a", "b"], "whose fallback it is");
        let shipped = snapshot(&cp, "dp-fallbacks").await;
        let sa = shipped.groups.iter().find(|g| g.id == id("a")).unwrap();
        assert_eq!(sa.fallback_ids, [id("b"), id("c")]);

        // A group that is someone's fallback cannot be deleted; the refusal names who.
        let e = admin
            .delete_group(pb::DeleteGroupRequest { group: "c".into() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert!(e.message().contains("fallback of a, b;"), "{}", e.message());
        // Cleared (`--no-fallback`), then it can go.
        let a = admin.update_group(set("a", &[])).await.unwrap().into_inner();
        assert!(a.fallbacks.is_empty());
        admin.update_group(set("b", &[])).await.unwrap();
        admin
            .delete_group(pb::DeleteGroupRequest { group: "c".into() })
            .await
            .unwrap();
    }
);

both_stores!(group_states_are_audited_shipped_and_shown, |cp: Cp| async move {
    let mut admin = cp.admin().await;
    admin
        .create_group(pb::CreateGroupRequest {
            name: "team".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let state = |group: &str, state: pb::GroupState| pb::SetGroupStateRequest {
        group: group.into(),
        state: state as i32,
    };
    let before = relay_control_plane::model::now_ms();
    let g = admin
        .set_group_state(state("team", pb::GroupState::Paused))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.state, pb::GroupState::Paused as i32);
    assert!(g.state_since_ms >= before, "{g:?}");
    assert!(g.state_by.starts_with("bootstrap-"), "the admin token's name: {g:?}");
    let shipped = snapshot(&cp, "dp-state").await;
    let sg = shipped.groups.iter().find(|x| x.id == g.id).unwrap();
    assert_eq!(sg.state, pb::GroupState::Paused as i32);
    let h = head(&cp).await;

    // The same state again changes nothing: no write, the since-time kept.
    let again = admin
        .set_group_state(state("team", pb::GroupState::Paused))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.state_since_ms, g.state_since_ms);
    assert_eq!(head(&cp).await, h);

    let g = admin
        .set_group_state(state(&g.id, pb::GroupState::Activated))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.state, pb::GroupState::Activated as i32);
    let g = admin
        .set_group_state(state("team", pb::GroupState::Active))
        .await
        .unwrap()
        .into_inner();
    let listed = admin
        .list_groups(pb::ListGroupsRequest {})
        .await
        .unwrap()
        .into_inner()
        .groups;
    let l = listed.iter().find(|x| x.name == "team").unwrap();
    assert_eq!(
        (l.state, l.state_since_ms),
        (pb::GroupState::Active as i32, g.state_since_ms)
    );
    let shipped = snapshot(&cp, "dp-state-2").await;
    let sg = shipped.groups.iter().find(|x| x.id == g.id).unwrap();
    assert_eq!(sg.state, pb::GroupState::Active as i32);

    // Each change is in the audit log, newest first.
    let audit = admin
        .list_audit(pb::ListAuditRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    let actions: Vec<_> = audit
        .iter()
        .take(3)
        .map(|e| (e.action.as_str(), e.target.as_str()))
        .collect();
    assert_eq!(
        actions,
        [
            ("group.resume", "team"),
            ("group.activate", "team"),
            ("group.pause", "team")
        ]
    );
    assert!(audit[0].detail.contains(r#""from":"activated""#), "{}", audit[0].detail);

    // Refused: a missing group, an unknown state, a reader.
    let e = admin
        .set_group_state(state("nope", pb::GroupState::Paused))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = admin
        .set_group_state(pb::SetGroupStateRequest {
            group: "team".into(),
            state: 42,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = cp
        .admin_as(Some(RO_TOKEN))
        .await
        .set_group_state(state("team", pb::GroupState::Paused))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
});

both_stores!(settings_are_declared_checked_and_unset, |cp: Cp| async move {
    use relay_control_plane::model::{AuditRecord, Mutation};
    let mut admin = cp.admin().await;
    let fresh = admin
        .list_settings(pb::ListSettingsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        fresh.settings.len(),
        relay_proto::settings::SETTINGS.len(),
        "every declared setting, none set"
    );
    assert!(fresh.settings.iter().all(|s| !s.set && s.value == s.default_value));
    let set = |name: &str, value: &str| pb::SetSettingRequest {
        name: name.into(),
        value: value.into(),
    };
    for (name, value, says) in [
        ("retry.max_attempt", "3", "did you mean retry.max_attempts?"),
        ("retry.max_attempts", "three", "integer in 1..=20"),
        ("retry.max_attempts", "0", "integer in 1..=20"),
        ("retry.max_attempts", "", "integer in 1..=20"),
        ("unified.threshold", "-1", "fraction"),
        ("account.main.retry.max_attempts", "2", "cannot be set per account"),
        (
            "cors.allowed_origins",
            "https://app.example/",
            "\"https://app.example/\" has a path",
        ),
        ("cors.allowed_origins", "app.example", "scheme://host[:port]"),
    ] {
        let e = admin.set_setting(set(name, value)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{name}={value}");
        assert!(e.message().contains(says), "{name}={value}: {}", e.message());
    }
    let e = admin.set_setting(set("models", &"a".repeat(20_000))).await.unwrap_err();
    assert!(e.message().contains("at most"), "{}", e.message());
    let e = admin
        .set_setting(set("account.ghost.cooldown.overloaded_ms", "5000"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // A per-account override, by account name, stored by id.
    let acct = admin
        .create_account(account_req("main", "sk-main"))
        .await
        .unwrap()
        .into_inner();
    let after = admin
        .set_setting(set("account.main.cooldown.overloaded_ms", "5000"))
        .await
        .unwrap()
        .into_inner();
    let key = format!("account.{}.cooldown.overloaded_ms", acct.id);
    assert_eq!(after.values.get(&key).map(String::as_str), Some("5000"));
    assert!(after.settings.iter().any(|s| s.name == key && s.set && s.per_account));

    // Set, then back to the default.
    admin.set_setting(set("retry.max_attempts", " 2 ")).await.unwrap();
    let list = admin
        .unset_setting(pb::UnsetSettingRequest {
            name: "retry.max_attempts".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let row = list.settings.iter().find(|s| s.name == "retry.max_attempts").unwrap();
    assert_eq!((row.value.as_str(), row.set), ("4", false));
    assert!(!list.values.contains_key("retry.max_attempts"));
    let e = admin
        .unset_setting(pb::UnsetSettingRequest {
            name: "retry.max_attempts".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // A value an older relay stored under a typo is listed as unknown and can go.
    cp.store
        .apply(
            vec![Mutation::SetSetting {
                name: "retry.max_attempt".into(),
                value: "3".into(),
            }],
            AuditRecord {
                actor: "old".into(),
                action: "setting.set".into(),
                target: "retry.max_attempt".into(),
                detail: "{}".into(),
            },
        )
        .await
        .unwrap();
    let list = admin
        .list_settings(pb::ListSettingsRequest {})
        .await
        .unwrap()
        .into_inner();
    let typo = list.settings.iter().find(|s| s.name == "retry.max_attempt").unwrap();
    assert!(typo.r#type.is_empty() && typo.description.contains("unset"), "{typo:?}");
    admin
        .unset_setting(pb::UnsetSettingRequest {
            name: "retry.max_attempt".into(),
        })
        .await
        .unwrap();
});

both_stores!(admin_validation_errors, |cp: Cp| async move {
    let mut admin = cp.admin().await;
    let code = |r: Result<tonic::Response<pb::AccountInfo>, tonic::Status>| r.err().map(|s| s.code());
    assert_eq!(
        code(admin.create_account(account_req("bad name", "sk-x-0123456789")).await),
        Some(Code::InvalidArgument)
    );
    assert_eq!(
        code(admin.create_account(account_req("empty-secret", " ")).await),
        Some(Code::InvalidArgument)
    );
    let mut no_kind = account_req("no-kind", "sk-x-0123456789");
    no_kind.kind = 0;
    assert_eq!(code(admin.create_account(no_kind).await), Some(Code::InvalidArgument));
    let mut compat = account_req("compat", "sk-x-0123456789");
    compat.kind = pb::AccountKind::AnthropicCompatible as i32;
    assert_eq!(
        code(admin.create_account(compat.clone()).await),
        Some(Code::InvalidArgument),
        "needs a base URL"
    );
    compat.base_url = "http://127.0.0.1:9999".into();
    assert_eq!(code(admin.create_account(compat).await), None);
    let mut unknown_group = account_req("lost", "sk-x-0123456789");
    unknown_group.groups = vec!["nope".into()];
    assert_eq!(code(admin.create_account(unknown_group).await), Some(Code::NotFound));
    let mut heavy = account_req("heavy", "sk-x-0123456789");
    heavy.weight = 1_000_000;
    assert_eq!(code(admin.create_account(heavy).await), Some(Code::InvalidArgument));
    admin
        .create_account(account_req("dup", "sk-x-0123456789"))
        .await
        .unwrap();
    assert_eq!(
        code(admin.create_account(account_req("dup", "sk-x-0123456789")).await),
        Some(Code::AlreadyExists)
    );
    // A revoked key stays revoked.
    admin
        .create_api_key(pb::CreateApiKeyRequest {
            name: "k".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .revoke_api_key(pb::RevokeApiKeyRequest { key: "k".into() })
        .await
        .unwrap();
    let r = admin
        .update_api_key(pb::UpdateApiKeyRequest {
            key: "k".into(),
            status: Some(pb::KeyStatus::Active as i32),
            ..Default::default()
        })
        .await;
    assert_eq!(r.err().map(|s| s.code()), Some(Code::FailedPrecondition));
    // The default group and groups in use cannot be removed.
    let r = admin
        .delete_group(pb::DeleteGroupRequest {
            group: "default".into(),
        })
        .await;
    assert_eq!(r.err().map(|s| s.code()), Some(Code::FailedPrecondition));
});

/// Several control-plane replicas on one Postgres database: writes through
/// either are seen by watchers of both, every revision in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_on_one_database_converge() {
    let a = common::start(common::Backend::Postgres).await;
    let db = a.db.clone().unwrap();
    let store_b = std::sync::Arc::new(
        relay_control_plane::store::postgres::PostgresStore::connect(&db.url, 8)
            .await
            .unwrap(),
    ) as relay_control_plane::store::DynStore;
    let b = common::start_replica(store_b, a.key.clone(), Some(db), None, "replica-b").await;

    let mut wa = a.watch(None, "dp-a").await;
    let mut wb = b.watch(None, "dp-b").await;
    let (mut ha, mut hb) = (Held::default(), Held::default());
    let u = wa.next().await;
    ha.apply(&u);
    wa.ack(&u).await;
    let u = wb.next().await;
    hb.apply(&u);
    wb.ack(&u).await;

    let mut tasks = Vec::new();
    for i in 0..40 {
        let cp = if i % 2 == 0 { &a } else { &b };
        let mut admin = cp.admin().await;
        tasks.push(tokio::spawn(async move {
            admin
                .create_group(pb::CreateGroupRequest {
                    name: format!("r-{i}"),
                    description: String::new(),
                    limits: None,
                    ..Default::default()
                })
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let h = head(&a).await;
    for (w, held) in [(&mut wa, &mut ha), (&mut wb, &mut hb)] {
        let mut last = held.version.unwrap().revision;
        while held.version != Some(h) {
            let u = w.next().await;
            assert!(rev(&u) > last, "never backwards");
            last = rev(&u);
            held.apply(&u);
            w.ack(&u).await;
        }
    }
    assert_eq!(
        relay_proto::config_hash(&ha.config),
        relay_proto::config_hash(&hb.config),
        "same content for the same version"
    );
    assert_eq!(ha.config.groups.iter().filter(|g| g.name.starts_with("r-")).count(), 40);
}

/// `grpcurl` works: health checks and server reflection are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection() {
    use futures::StreamExt;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let cp = common::start(common::Backend::Sqlite).await;
    let channel = cp.channel().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["", "relay.v1.Admin", "relay.v1.ConfigDiscovery", "relay.v1.UsageIngest"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service}"
        );
    }
    let mut reflection = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(futures::stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = replies.next().await.unwrap().unwrap().message_response
    else {
        panic!("no service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "relay.v1.Admin",
        "relay.v1.ConfigDiscovery",
        "relay.v1.UsageIngest",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }
}

both_stores!(new_credential_or_enable_clears_account_states, |cp: Cp| async move {
    use relay_control_plane::model::{AccountHealth, AccountState, AuditRecord, Mutation};
    let mut admin = cp.admin().await;
    let a = admin
        .create_account(account_req("acct-s", "sk-ant-api03-old-credential"))
        .await
        .unwrap()
        .into_inner();
    let set_state = |health: AccountHealth| {
        let store = cp.store.clone();
        let id = a.id.clone();
        async move {
            store
                .apply(
                    vec![Mutation::SetAccountState(AccountState {
                        account_id: id,
                        scope: String::new(),
                        health,
                        reason: "test".into(),
                        until: 0,
                        since: 1,
                        reported_by: "dp".into(),
                        revision: 0,
                    })],
                    AuditRecord {
                        actor: "test".into(),
                        action: "account.state".into(),
                        target: "acct-s".into(),
                        detail: "{}".into(),
                    },
                )
                .await
                .unwrap();
        }
    };
    set_state(AccountHealth::Unauthorized).await;
    let shown = admin
        .get_account(pb::GetAccountRequest {
            account: "acct-s".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.states.len(), 1);
    assert_eq!(shown.states[0].health, pb::AccountHealth::Unauthorized as i32);
    // A new credential ends it.
    let after = admin
        .update_account(pb::UpdateAccountRequest {
            account: "acct-s".into(),
            credential: Some("sk-ant-api03-new-credential".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(after.states.is_empty(), "{:?}", after.states);
    // So does an operator enabling the account.
    set_state(AccountHealth::Blocked).await;
    let after = admin
        .update_account(pb::UpdateAccountRequest {
            account: "acct-s".into(),
            status: Some(pb::AccountStatus::Enabled as i32),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(after.states.is_empty());
    // Changing the weight does not.
    set_state(AccountHealth::Blocked).await;
    let after = admin
        .update_account(pb::UpdateAccountRequest {
            account: "acct-s".into(),
            weight: Some(7),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.states.len(), 1);
    assert!(cp.store.load_config().await.unwrap().account_states.len() == 1);
    // Weight 0 in an update is refused (it was silently taken as 1); the weight stays.
    let err = admin
        .update_account(pb::UpdateAccountRequest {
            account: "acct-s".into(),
            weight: Some(0),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("weight 0 is refused"), "{}", err.message());
    let shown = admin
        .get_account(pb::GetAccountRequest {
            account: "acct-s".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.weight, 7);
});

/// Follows a watch stream, ACKing, until it holds `target`.
async fn follow(w: &mut common::Watcher, held: &mut Held, target: pb::ConfigVersion) {
    while held.version != Some(target) {
        let u = w.next().await;
        held.apply(&u);
        w.ack(&u).await;
    }
}

/// Another replica learns of a write through NOTIFY at once (its poll is a
/// minute away); when the LISTEN connection dies, the poll still catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notify_wakes_other_replicas_and_the_poll_covers_a_dead_listener() {
    use relay_control_plane::store::postgres::{PostgresStore, LISTEN_APPLICATION_NAME};
    let a = common::start(common::Backend::Postgres).await;
    let db = a.db.clone().unwrap();
    let replica = |poll: Duration| {
        let (db, key) = (db.clone(), a.key.clone());
        async move {
            let store = std::sync::Arc::new(PostgresStore::connect(&db.url, 4).await.unwrap())
                as relay_control_plane::store::DynStore;
            common::start_replica_polling(store, key, Some(db), None, "replica-b", poll).await
        }
    };
    let write = |name: &'static str| {
        let a = &a;
        async move {
            a.admin()
                .await
                .create_group(pb::CreateGroupRequest {
                    name: name.into(),
                    description: String::new(),
                    limits: None,
                    ..Default::default()
                })
                .await
                .unwrap();
            head(a).await
        }
    };

    // NOTIFY: the poll is a minute away, yet the write arrives quickly.
    let b = replica(Duration::from_secs(60)).await;
    let mut w = b.watch(None, "dp-notify").await;
    let mut held = Held::default();
    let u = w.next().await;
    held.apply(&u);
    w.ack(&u).await;
    let v = write("via-notify").await;
    tokio::time::timeout(Duration::from_secs(5), follow(&mut w, &mut held, v))
        .await
        .expect("NOTIFY woke the other replica");

    // The LISTEN connections die: a replica polling every 300 ms still catches up.
    let c = replica(Duration::from_millis(300)).await;
    let mut w = c.watch(None, "dp-poll").await;
    let mut held = Held::default();
    let u = w.next().await;
    held.apply(&u);
    w.ack(&u).await;
    let (admin_db, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let killed: i64 = admin_db
        .query_one(
            "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = $1) t",
            &[&LISTEN_APPLICATION_NAME],
        )
        .await
        .unwrap()
        .get(0);
    assert!(killed >= 1, "a LISTEN connection was terminated");
    let v = write("after-listener-died").await;
    tokio::time::timeout(Duration::from_secs(5), follow(&mut w, &mut held, v))
        .await
        .expect("the poll caught up");
    assert!(held.config.groups.iter().any(|g| g.name == "after-listener-died"));
}

/// Issue 12, item 8: RELAY_ADMIN_TOKEN bootstraps the first admin token only,
/// and only a strong one; a token revoked since never comes back at a restart.
#[tokio::test]
async fn the_environment_token_only_bootstraps() {
    use relay_control_plane::bootstrap::{ensure_admin_token, ensure_defaults, AdminTokenSource, BootstrapError};
    use relay_control_plane::crypto::MasterKey;
    use relay_control_plane::model::{AuditRecord, Mutation};
    let (store, _db, _dir) = common::new_store(common::Backend::Sqlite).await;
    let key = MasterKey::generate();
    ensure_defaults(&store).await.unwrap();
    for weak in [
        "weak",
        "rat-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "rat-choose-a-long-random-token",
    ] {
        assert!(
            matches!(
                ensure_admin_token(&store, &key, Some(weak), None).await,
                Err(BootstrapError::WeakToken)
            ),
            "{weak}"
        );
    }
    assert!(store.list_admin_tokens().await.unwrap().is_empty());
    let first = "rat-9f2c41d07be85a36c1e0d4f7a29b6c58e3f1";
    assert_eq!(
        ensure_admin_token(&store, &key, Some(first), None).await.unwrap(),
        AdminTokenSource::EnvironmentRegistered
    );
    assert_eq!(
        ensure_admin_token(&store, &key, Some(first), None).await.unwrap(),
        AdminTokenSource::Environment,
        "a restart with the same token"
    );
    let other = "rat-0a1b2c3d4e5f60718293a4b5c6d7e8f9fedcba";
    assert_eq!(
        ensure_admin_token(&store, &key, Some(other), None).await.unwrap(),
        AdminTokenSource::EnvironmentIgnored,
        "a second token is not added by the environment"
    );
    // Revoked (another admin token exists): it does not come back.
    store
        .apply(
            vec![Mutation::InsertAdminToken(
                relay_control_plane::api::admin::admin_token_row(
                    &key,
                    "ops",
                    relay_control_plane::model::Role::Admin,
                    other,
                ),
            )],
            AuditRecord {
                actor: "test".into(),
                action: "token.create".into(),
                target: "ops".into(),
                detail: "{}".into(),
            },
        )
        .await
        .unwrap();
    let bootstrap = store
        .list_admin_tokens()
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.name.starts_with("bootstrap-"))
        .unwrap();
    store
        .apply(
            vec![Mutation::DeleteAdminToken { id: bootstrap.id }],
            AuditRecord {
                actor: "test".into(),
                action: "token.revoke".into(),
                target: "bootstrap".into(),
                detail: "{}".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        ensure_admin_token(&store, &key, Some(first), None).await.unwrap(),
        AdminTokenSource::EnvironmentIgnored
    );
    assert!(store
        .find_admin_token(&key.hash_admin_token(first))
        .await
        .unwrap()
        .is_none());
}

/// Issue 12, item 3: revoking a data-plane token cuts its open Watch and Report
/// streams within a second; it cannot reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revoking_a_data_plane_token_closes_its_streams() {
    let cp = common::start(common::Backend::Sqlite).await;
    let mut admin = cp.admin().await;
    let created = admin
        .create_admin_token(pb::CreateAdminTokenRequest {
            name: "dp-doomed".into(),
            role: pb::AdminRole::DataPlane as i32,
        })
        .await
        .unwrap()
        .into_inner();
    let mut w = cp.watch_as(&created.token, None, "dp-doomed").await.unwrap();
    let first = w.next().await;
    w.ack(&first).await;
    let mut usage = cp.usage(&created.token).await;
    let (batches, rx) = tokio::sync::mpsc::channel::<pb::UsageBatch>(1);
    let mut acks = usage
        .report(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();

    let revoked_at = admin
        .revoke_admin_token(pb::RevokeAdminTokenRequest {
            token: "dp-doomed".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .version
        .unwrap();
    // Heads from before the revocation may still arrive (the stream was behind);
    // nothing at or after it does, and the stream ends within a second.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    let status = loop {
        let next = tokio::time::timeout_at(deadline, w.inbound.message())
            .await
            .expect("the Watch stream ends within a second");
        match next {
            Ok(Some(u)) => {
                let v = u.version.unwrap();
                assert!(
                    (v.epoch, v.revision) < (revoked_at.epoch, revoked_at.revision),
                    "a head at or after the revocation was sent: {v:?}"
                );
                w.ack(&u).await;
            }
            Ok(None) => panic!("the stream ended without saying why"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let ended = tokio::time::timeout(Duration::from_secs(1), acks.message())
        .await
        .expect("the Report stream ends within a second");
    assert_eq!(ended.expect_err("an error").code(), Code::Unauthenticated);
    drop(batches);
    let again = cp.watch_as(&created.token, None, "dp-doomed").await;
    assert_eq!(again.err().map(|s| s.code()), Some(Code::Unauthenticated));
}

/// Issue 12, item 11: moving an Anthropic API-key account to another host needs
/// its credential again (or an explicit, audited permission).
#[tokio::test]
async fn a_new_host_needs_the_credential_again() {
    let cp = common::start(common::Backend::Sqlite).await;
    let mut admin = cp.admin().await;
    admin.create_account(account_req("prod", "sk-ant-prod")).await.unwrap();
    let moved = |allow: bool, credential: Option<&str>| pb::UpdateAccountRequest {
        account: "prod".into(),
        base_url: Some("https://collector.example.net".into()),
        credential: credential.map(str::to_string),
        allow_credential_to_new_host: allow,
        ..Default::default()
    };
    let e = admin.update_account(moved(false, None)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("collector.example.net"), "{}", e.message());
    assert!(!e.message().contains("sk-ant-prod"));
    // Same host, another path: fine.
    admin
        .update_account(pb::UpdateAccountRequest {
            account: "prod".into(),
            base_url: Some("https://api.anthropic.com/".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    admin.update_account(moved(false, Some("sk-ant-new"))).await.unwrap();
    admin
        .update_account(pb::UpdateAccountRequest {
            account: "prod".into(),
            base_url: Some("https://elsewhere.example.org".into()),
            allow_credential_to_new_host: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let audit = admin
        .list_audit(pb::ListAuditRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(audit
        .entries
        .iter()
        .any(|e| e.detail.contains("credential_sent_to_new_host")));
}

both_stores!(
    removing_a_price_keeps_stored_costs_and_refuses_what_it_cannot,
    |cp: Cp| async move {
        let mut admin = cp.admin().await;
        let mut w = cp.watch(None, "dp-price").await;
        let mut held = Held::default();
        let u = w.next().await;
        held.apply(&u);
        w.ack(&u).await;
        let set = |effective_from_ms: i64| pb::SetPriceRequest {
            model_pattern: "my-model*".into(),
            effective_from_ms,
            input: 2_000_000,
            output: 8_000_000,
            ..Default::default()
        };
        let jan = 1_735_689_600_000; // 2025-01-01
        let feb = jan + 31 * 86_400_000;
        admin.set_price(set(jan)).await.unwrap();
        admin.set_price(set(feb)).await.unwrap();
        // Both writes arrive, in two updates or in one (the publisher coalesces what it sees at once).
        let mine = |held: &Held| {
            held.config
                .prices
                .iter()
                .filter(|p| p.model_pattern == "my-model*")
                .count()
        };
        while mine(&held) < 2 {
            let u = w.next().await;
            held.apply(&u);
            w.ack(&u).await;
        }
        assert_eq!(
            held.config
                .prices
                .iter()
                .filter(|p| p.model_pattern == "my-model*")
                .count(),
            2
        );
        let mut event = spent_event("key-x", chrono::Utc::now().timestamp_millis(), 7_000_000_000);
        event.model = "my-model-1".into();
        report(&cp, vec![event]).await;
        let reader = admin.clone();
        let cost = || {
            let mut admin = reader.clone();
            async move {
                admin
                    .query_usage(pb::QueryUsageRequest::default())
                    .await
                    .unwrap()
                    .into_inner()
                    .rows[0]
                    .cost_pico_usd
            }
        };
        assert_eq!(cost().await, 7_000_000_000);

        // Unknown pattern, unknown date, a built-in price, a read-only token: refused, nothing changes.
        let before = head(&cp).await;
        let rm = |pattern: &str, effective_from_ms: i64| pb::DeletePriceRequest {
            model_pattern: pattern.into(),
            effective_from_ms,
        };
        let e = admin.delete_price(rm("my-modle*", 0)).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        assert!(
            e.message().contains("no price for model pattern \"my-modle*\""),
            "{}",
            e.message()
        );
        assert!(e.message().contains("relayctl pricing list"), "{}", e.message());
        let e = admin.delete_price(rm("my-model*", jan + 1)).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        assert!(
            e.message().contains("2025-01-01T00:00:00Z"),
            "lists the dates there are: {}",
            e.message()
        );
        let e = admin.delete_price(rm("claude-sonnet-4*", 0)).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert!(e.message().contains("built-in"), "{}", e.message());
        let e = admin.delete_price(rm("", 0)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        let e = cp
            .admin_as(Some(RO_TOKEN))
            .await
            .delete_price(rm("my-model*", 0))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        assert_eq!(head(&cp).await, before);

        // One date, then the rest: data planes drop them; stored usage keeps its cost; audited.
        let r = admin.delete_price(rm("my-model*", jan)).await.unwrap().into_inner();
        assert_eq!(r.removed.len(), 1);
        assert_eq!(r.removed[0].effective_from_ms, jan);
        let u = w.next().await;
        assert_eq!(u.removed.len(), 1, "{u:?}");
        held.apply(&u);
        w.ack(&u).await;
        let r = admin.delete_price(rm(" my-model* ", 0)).await.unwrap().into_inner();
        assert_eq!(r.removed.iter().map(|p| p.effective_from_ms).collect::<Vec<_>>(), [feb]);
        assert_eq!(r.version, Some(head(&cp).await));
        let u = w.next().await;
        held.apply(&u);
        w.ack(&u).await;
        assert!(!held.config.prices.iter().any(|p| p.model_pattern == "my-model*"));
        let listed = admin.list_prices(pb::ListPricesRequest {}).await.unwrap().into_inner();
        assert!(!listed.prices.iter().any(|p| p.model_pattern == "my-model*"));
        assert!(listed.prices.iter().any(|p| p.model_pattern == "claude-sonnet-4*"));
        assert_eq!(cost().await, 7_000_000_000, "stored usage keeps its cost");
        let audit = admin
            .list_audit(pb::ListAuditRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            audit
                .entries
                .iter()
                .filter(|e| e.action == "price.delete" && e.target == "my-model*")
                .count(),
            2
        );
        let e = admin.delete_price(rm("my-model*", 0)).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
    }
);

/// Every method of the Admin service, from the proto descriptor (so a new RPC is covered the day
/// it is added), called over gRPC with an empty request by each kind of token: a read-only token
/// is refused every write and let through every read; an admin token is let through every
/// method; a data-plane token is refused every method. A write refused leaves the head where it
/// was. What each method needs is `api::admin::rpcs::RPCS`.
#[tokio::test]
async fn every_admin_rpc_is_authorized_as_declared() {
    use prost::Message;
    use relay_control_plane::api::auth::Need;
    let cp = common::start(common::Backend::Sqlite).await;
    let set = prost_types::FileDescriptorSet::decode(relay_proto::FILE_DESCRIPTOR_SET).unwrap();
    let admin = set
        .file
        .iter()
        .flat_map(|f| f.service.iter())
        .find(|s| s.name() == "Admin")
        .unwrap()
        .clone();
    assert!(admin.method.len() >= 30);
    let channel = cp.channel().await;
    // (code or OK) of one call: the request is empty (every field at its default).
    let call = |token: &'static str, method: String, streaming: bool| {
        let channel = channel.clone();
        async move {
            let mut grpc = tonic::client::Grpc::new(channel);
            grpc.ready().await.unwrap();
            let mut req = tonic::Request::new(());
            req.metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            let path: http::uri::PathAndQuery = format!("/relay.v1.Admin/{method}").parse().unwrap();
            let codec = tonic_prost::ProstCodec::<(), ()>::default();
            let r = if streaming {
                grpc.server_streaming(req, path, codec).await.map(|_| ())
            } else {
                grpc.unary(req, path, codec).await.map(|_| ())
            };
            r.err().map(|s| s.code())
        }
    };
    let refused = |c: Option<Code>| matches!(c, Some(Code::PermissionDenied | Code::Unauthenticated));
    let (mut reads, mut writes) = (0, 0);
    for m in &admin.method {
        let name = m.name().to_string();
        let need = relay_control_plane::api::admin::rpcs::need(&name)
            .unwrap_or_else(|| panic!("Admin.{name} declares no need"));
        let streaming = m.server_streaming();
        let before = head(&cp).await;
        let ro = call(RO_TOKEN, name.clone(), streaming).await;
        match need {
            Need::Read => {
                reads += 1;
                assert!(!refused(ro), "read-only token refused on read Admin.{name}: {ro:?}");
            }
            _ => {
                writes += 1;
                assert_eq!(
                    ro,
                    Some(Code::PermissionDenied),
                    "read-only token on write Admin.{name}"
                );
                assert_eq!(head(&cp).await, before, "a refused Admin.{name} changed the config");
            }
        }
        let dp = call(DP_TOKEN, name.clone(), streaming).await;
        assert_eq!(dp, Some(Code::PermissionDenied), "data-plane token on Admin.{name}");
        let admin = call(ADMIN_TOKEN, name.clone(), streaming).await;
        assert!(!refused(admin), "admin token refused on Admin.{name}: {admin:?}");
    }
    assert!(reads > 10 && writes > 10, "{reads} reads, {writes} writes");
}

// Many admins (or a script) updating one row at once all land, on either store: the Admin API
// re-reads and retries a lost optimistic-concurrency race itself, so no caller sees a conflict
// that a plain re-run would have fixed. And an account count that one store cannot keep is
// refused by both, with the range.
both_stores!(concurrent_updates_of_one_row_all_land, |cp: Cp| async move {
    let mut admin = cp.admin().await;
    admin
        .create_group(pb::CreateGroupRequest {
            name: "busy".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let account = admin
        .create_account(pb::CreateAccountRequest {
            name: "busy-acc".into(),
            kind: pb::AccountKind::AnthropicCompatible as i32,
            base_url: "http://127.0.0.1:9".into(),
            credential: "sk-test-credential".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut tasks = Vec::new();
    for i in 0..30u32 {
        let mut admin = cp.admin().await;
        tasks.push(tokio::spawn(async move {
            let g = admin
                .update_group(pb::UpdateGroupRequest {
                    group: "busy".into(),
                    description: Some(format!("d{i}")),
                    ..Default::default()
                })
                .await;
            let a = admin
                .update_account(pb::UpdateAccountRequest {
                    account: "busy-acc".into(),
                    priority: Some(i as i32),
                    ..Default::default()
                })
                .await;
            (g.map(|_| ()), a.map(|_| ()))
        }));
    }
    for t in tasks {
        let (g, a) = t.await.unwrap();
        g.unwrap();
        a.unwrap();
    }
    let _ = account;

    for (create, value) in [(true, 3_000_000_000u32), (false, 2_147_483_648)] {
        let err = if create {
            admin
                .create_account(pb::CreateAccountRequest {
                    name: "too-many".into(),
                    kind: pb::AccountKind::AnthropicCompatible as i32,
                    base_url: "http://127.0.0.1:9".into(),
                    credential: "sk-test-credential".into(),
                    max_concurrency: value,
                    ..Default::default()
                })
                .await
                .unwrap_err()
        } else {
            admin
                .update_account(pb::UpdateAccountRequest {
                    account: "busy-acc".into(),
                    max_concurrency: Some(value),
                    ..Default::default()
                })
                .await
                .unwrap_err()
        };
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        assert_eq!(
            err.message(),
            format!("max_concurrency {value} is out of range (0 to 2147483647)")
        );
    }
});
