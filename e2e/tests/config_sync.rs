//! The config-sync scenarios of issue 18, end to end with two data planes:
//! each ends with the check that matters to an operator: within a second every
//! data plane refuses a key revoked afterwards and serves one created afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use relay_control_plane::model::{AccountHealth, AccountState, AuditRecord, Mutation};
use relay_mock_upstream::{Fault, MockConfig, MockUpstream};
use relay_proto::v1 as pb;
use relay_test_support::wait_for;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

struct Fleet {
    cp: ControlPlane,
    mock: MockUpstream,
    dps: Vec<DataPlane>,
    _dir: tempfile::TempDir,
}

const MODEL: &str = "claude-sonnet-4-5";

/// A control plane, the mock upstream and two data planes; `accounts` are
/// (name, credential, priority).
async fn fleet(backend: Backend, accounts: &[(&str, &str, i32)]) -> Fleet {
    let cp = ControlPlane::start(backend).await;
    let mock = mock(MockConfig::default()).await;
    let mut admin = cp.admin().await;
    for (name, cred, priority) in accounts {
        admin
            .create_account(pb::CreateAccountRequest {
                name: name.to_string(),
                kind: pb::AccountKind::AnthropicCompatible as i32,
                base_url: mock.base_url(),
                credential: cred.to_string(),
                priority: *priority,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    cp.set_setting("retry.backoff_base_ms", "1").await;
    cp.set_setting("retry.backoff_max_ms", "5").await;
    // No account available: answer at once instead of queueing.
    cp.set_setting("queue.max_wait_ms", "50").await;
    cp.set_setting("retry.deadline_ms", "2000").await;
    let dir = tempfile::tempdir().unwrap();
    let mut dps = Vec::new();
    for i in 1..=2 {
        let dp = DataPlane::start(&cp.url(), &format!("dp-{i}"), dir.path().join(format!("dp-{i}"))).await;
        dp.wait_version(cp.head().await).await;
        dps.push(dp);
    }
    Fleet {
        cp,
        mock,
        dps,
        _dir: dir,
    }
}

static BODIES: AtomicUsize = AtomicUsize::new(0);

/// A request of a conversation of its own (no sticky session pins it).
fn body() -> serde_json::Value {
    let mut b = message_body(MODEL, false);
    b["messages"][0]["content"] = format!("conversation {}", BODIES.fetch_add(1, Ordering::Relaxed)).into();
    b
}

async fn status(dp: &DataPlane, key: &str) -> u16 {
    post_messages(dp, key, &body()).await.status
}

static KEYS: AtomicUsize = AtomicUsize::new(0);

/// Creates a key and waits until every data plane serves it; revokes it and
/// creates another; then within a second every data plane refuses the first
/// (401) and serves the second (200). Needs a healthy account.
async fn assert_fleet_follows(f: &Fleet) {
    let n = KEYS.fetch_add(1, Ordering::Relaxed);
    let (_, old) = f.cp.add_key(&format!("before-{n}"), &[]).await;
    wait_for(
        Duration::from_secs(10),
        "every data plane to serve a new key",
        || async {
            for dp in &f.dps {
                if status(dp, &old).await != 200 {
                    return None;
                }
            }
            Some(())
        },
    )
    .await
    .unwrap();
    f.cp.admin()
        .await
        .revoke_api_key(pb::RevokeApiKeyRequest {
            key: format!("before-{n}"),
        })
        .await
        .unwrap();
    let (_, new) = f.cp.add_key(&format!("after-{n}"), &[]).await;
    wait_for(
        Duration::from_secs(1),
        "every data plane to follow the revocation and the new key",
        || async {
            for dp in &f.dps {
                if status(dp, &old).await != 401 || status(dp, &new).await != 200 {
                    return None;
                }
            }
            Some(())
        },
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}: versions {:?}",
            f.dps.iter().map(|d| d.version()).collect::<Vec<_>>()
        )
    });
}

async fn no_nacks(f: &Fleet) {
    let proxies = f.cp.store.list_proxies().await.unwrap();
    for p in proxies {
        assert!(p.nack_error.is_empty(), "{} NACKed: {}", p.node_id, p.nack_error);
    }
}

async fn account(f: &Fleet, name: &str) -> pb::AccountInfo {
    f.cp.admin()
        .await
        .get_account(pb::GetAccountRequest { account: name.into() })
        .await
        .unwrap()
        .into_inner()
}

/// The reported bug: deleting an account that had health states froze every
/// data plane (hash mismatch on every later update), so revocations stopped.
async fn delete_accounts_with_states(backend: Backend) {
    let f = fleet(
        backend,
        &[
            ("limited", "cred-limited", 0),
            ("broken", "cred-broken", 1),
            ("healthy", "cred-healthy", 2),
        ],
    )
    .await;
    f.cp.set_setting("cooldown.erroring_ms", "60000").await;
    f.mock
        .set_fault("cred-limited", Some(Fault::RateLimited { retry_after_secs: 300 }));
    f.mock.set_fault("cred-broken", Some(Fault::ServerError));
    let (_, key) = f.cp.add_key("client", &[]).await;
    for dp in &f.dps {
        dp.wait_version(f.cp.head().await).await;
    }
    wait_for(Duration::from_secs(10), "both accounts to carry a state", || async {
        // Each request fails over to the healthy account.
        assert_eq!(status(&f.dps[0], &key).await, 200);
        let limited = account(&f, "limited").await;
        let broken = account(&f, "broken").await;
        let rl = limited
            .states
            .iter()
            .any(|s| s.health == pb::AccountHealth::RateLimited as i32);
        let er = broken
            .states
            .iter()
            .any(|s| s.health == pb::AccountHealth::Erroring as i32);
        (rl && er).then_some(())
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {:?}",
            futures::executor::block_on(f.cp.store.list_account_states())
        )
    });
    let mut admin = f.cp.admin().await;
    for name in ["limited", "broken"] {
        admin
            .delete_account(pb::DeleteAccountRequest { account: name.into() })
            .await
            .unwrap();
    }
    assert_fleet_follows(&f).await;
    no_nacks(&f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_accounts_with_health_states_does_not_freeze_the_fleet_sqlite() {
    delete_accounts_with_states(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_accounts_with_health_states_does_not_freeze_the_fleet_postgres() {
    delete_accounts_with_states(Backend::Postgres).await;
}

/// What a data plane cannot use, the control plane refuses, with a reason and
/// without echoing a password.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unusable_proxy_urls_are_refused_and_the_fleet_follows() {
    let f = fleet(Backend::Sqlite, &[("healthy", "cred-healthy", 0)]).await;
    let mut admin = f.cp.admin().await;
    for (url, why) in [
        ("http://u:hunter2@127.0.0.1:3128/x", "path"),
        ("http://u:hunter2@127.0.0.1:3128?x=1", "path or query"),
        ("http://u:%ff@127.0.0.1:3128", "UTF-8"),
        ("https://u:hunter2@127.0.0.1:3128", "scheme"),
    ] {
        let e = admin
            .create_account(pb::CreateAccountRequest {
                name: "proxied".into(),
                kind: pb::AccountKind::AnthropicCompatible as i32,
                base_url: f.mock.base_url(),
                credential: "cred-p".into(),
                proxy_url: url.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{url}");
        assert!(e.message().contains(why), "{url}: {}", e.message());
        assert!(!e.message().contains("hunter2"), "{}", e.message());
        let e = admin
            .update_account(pb::UpdateAccountRequest {
                account: "healthy".into(),
                proxy_url: Some(url.into()),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{url}");
        assert!(!e.message().contains("hunter2"), "{}", e.message());
    }
    assert_fleet_follows(&f).await;
    no_nacks(&f).await;
}

/// A database restored from a backup: the data planes hold revisions the
/// restored history does not have. A new epoch starts; a key that existed only
/// after the backup stops working everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restored_database_starts_a_new_epoch_everywhere() {
    let mut f = fleet(Backend::Sqlite, &[("healthy", "cred-healthy", 0)]).await;
    let backup = f._dir.path().join("backup.db");
    let b = backup.clone();
    f.cp.with_store_closed(move |db| {
        std::fs::copy(db, &b).unwrap();
    })
    .await;
    let (_, later) = f.cp.add_key("after-the-backup", &[]).await;
    for i in 0..5 {
        f.cp.admin()
            .await
            .create_group(pb::CreateGroupRequest {
                name: format!("g-{i}"),
                description: String::new(),
                limits: None,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let ahead = f.cp.head().await;
    for dp in &f.dps {
        dp.wait_version(ahead).await;
        assert_eq!(status(dp, &later).await, 200);
    }
    let b = backup.clone();
    f.cp.with_store_closed(move |db| {
        for ext in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{ext}", db.display()));
        }
        std::fs::copy(&b, db).unwrap();
    })
    .await;
    let restored = f.cp.head().await;
    assert!(restored.revision < ahead.revision);
    // The data planes reconnect (their backoff), say they hold `ahead`, and get
    // a new epoch.
    wait_for(
        Duration::from_secs(15),
        "every data plane to take the restored config",
        || async {
            for dp in &f.dps {
                let v = dp.version()?;
                if v.epoch <= ahead.epoch || status(dp, &later).await != 401 {
                    return None;
                }
            }
            Some(())
        },
    )
    .await
    .unwrap();
    let audit = f.cp.store.list_audit(10, None).await.unwrap();
    assert!(audit.iter().any(|a| a.action == "config.new_epoch"), "{audit:?}");
    assert_fleet_follows(&f).await;
    no_nacks(&f).await;
}

/// What an operator clears is cleared everywhere: `account reset` (and
/// `account enable`) close every data plane's local circuit breaker.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reset_and_enable_clear_every_local_breaker() {
    let f = fleet(Backend::Sqlite, &[("solo", "cred-solo", 0)]).await;
    // Long enough that only a reset can explain the account serving again.
    f.cp.set_setting("cooldown.erroring_ms", "600000").await;
    let (_, key) = f.cp.add_key("client", &[]).await;
    for dp in &f.dps {
        dp.wait_version(f.cp.head().await).await;
    }
    for reset_by_enable in [false, true] {
        f.mock.set_fault("cred-solo", Some(Fault::ServerError));
        for dp in &f.dps {
            // Failures until this data plane's own breaker is open.
            wait_for(Duration::from_secs(10), "the breaker to open", || async {
                let r = post_messages(dp, &key, &body()).await;
                (r.status == 529 && r.header("retry-after").is_some()).then_some(())
            })
            .await
            .unwrap();
        }
        f.mock.set_fault("cred-solo", None);
        let mut admin = f.cp.admin().await;
        if reset_by_enable {
            admin
                .update_account(pb::UpdateAccountRequest {
                    account: "solo".into(),
                    status: Some(pb::AccountStatus::Enabled as i32),
                    ..Default::default()
                })
                .await
                .unwrap();
        } else {
            admin
                .reset_account(pb::ResetAccountRequest { account: "solo".into() })
                .await
                .unwrap();
        }
        wait_for(
            Duration::from_secs(1),
            "every data plane to serve with the account again",
            || async {
                for dp in &f.dps {
                    if status(dp, &key).await != 200 {
                        return None;
                    }
                }
                Some(())
            },
        )
        .await
        .unwrap();
    }
    assert_fleet_follows(&f).await;
}

/// A data plane saw a 401; its report and an operator's reset reach it in one
/// update (it was away meanwhile). The account serves again at once, and stays
/// so without waiting for an unrelated change.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_state_and_a_reset_in_one_update_leave_the_account_serving() {
    let mut f = fleet(Backend::Sqlite, &[("solo", "cred-solo", 0)]).await;
    let (_, key) = f.cp.add_key("client", &[]).await;
    for dp in &f.dps {
        dp.wait_version(f.cp.head().await).await;
    }
    let id = account(&f, "solo").await.id;
    f.cp.kill().await;
    // Observed on dp-1 while the control plane is away: a local state.
    f.mock.set_fault("cred-solo", Some(Fault::Unauthorized));
    assert_ne!(status(&f.dps[0], &key).await, 200);
    assert_ne!(status(&f.dps[0], &key).await, 200, "the account is out on dp-1");
    f.mock.set_fault("cred-solo", None);
    // Meanwhile the state is stored and then reset (as if reported through
    // another replica): both land before dp-1 hears of either.
    let audit = |a: &str| AuditRecord {
        actor: "test".into(),
        action: a.into(),
        target: "solo".into(),
        detail: "{}".into(),
    };
    f.cp.store
        .apply(
            vec![Mutation::SetAccountState(AccountState {
                account_id: id.clone(),
                scope: String::new(),
                health: AccountHealth::Unauthorized,
                reason: "401".into(),
                until: 0,
                since: relay_control_plane::model::now_ms(),
                reported_by: "dp-1".into(),
                revision: 0,
            })],
            audit("account.state"),
        )
        .await
        .unwrap();
    let mut row = f.cp.store.get_account(&id).await.unwrap().unwrap();
    let expect = row.revision;
    row.reset_generation += 1;
    f.cp.store
        .apply(
            vec![
                Mutation::UpdateAccount {
                    row,
                    expect_revision: expect,
                },
                Mutation::ClearAccountState {
                    account_id: id.clone(),
                    scope: String::new(),
                },
            ],
            audit("account.reset"),
        )
        .await
        .unwrap();
    f.cp.resume().await;
    let head = f.cp.head().await;
    for dp in &f.dps {
        dp.wait_version(head).await;
    }
    wait_for(
        Duration::from_secs(1),
        "dp-1 to serve with the account again",
        || async { (status(&f.dps[0], &key).await == 200).then_some(()) },
    )
    .await
    .unwrap();
    // Past the grace a local state may wait for its report: still serving.
    tokio::time::sleep(Duration::from_millis(5_500)).await;
    assert_eq!(status(&f.dps[0], &key).await, 200);
    assert_fleet_follows(&f).await;
}

/// Two data planes given one node id: the second is refused while the first
/// is live, and takes over once the first is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_duplicate_node_id_is_refused_while_the_first_is_live() {
    let mut f = fleet(Backend::Sqlite, &[("healthy", "cred-healthy", 0)]).await;
    let dir = tempfile::tempdir().unwrap();
    let dup = DataPlane::start(&f.cp.url(), "dp-1", dir.path().join("dup")).await;
    // It keeps being refused: never ready while dp-1 is live.
    wait_for(Duration::from_secs(10), "the duplicate to be refused", || {
        let failures = dup.dp.as_ref().unwrap().watch_failures();
        async move { (failures >= 2).then_some(()) }
    })
    .await
    .unwrap();
    assert_eq!(send("GET", &dup.url("/readyz"), &[], "").await.status, 503);
    assert_eq!(send("GET", &f.dps[0].url("/readyz"), &[], "").await.status, 200);
    assert_fleet_follows(&f).await;
    // dp-1 goes away: the other process with that node id is served.
    f.dps[0].shutdown().await;
    dup.wait_version(f.cp.head().await).await;
    assert_eq!(send("GET", &dup.url("/readyz"), &[], "").await.status, 200);
}
