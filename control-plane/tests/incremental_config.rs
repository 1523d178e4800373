//! The publisher's patch path (account-state writes) against a full rebuild, on both stores:
//! after every step of a sequence of state reports, clears, and other writes between them, the
//! head it publishes is exactly what a full build gives (version, resources, content hash), it
//! was patched exactly when only states changed, and the delta it offers from the previous
//! head (and from older ones) leads a data plane to that config.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use relay_control_plane::api::convert::version_pb;
use relay_control_plane::api::publish::Published;
use relay_control_plane::bootstrap;
use relay_control_plane::config::{
    apply_state_write, build_full, next_head, Built, ACTION_ACCOUNT_STATE, ACTION_OAUTH_REFRESH_FAILED,
};
use relay_control_plane::crypto::MasterKey;
use relay_control_plane::model::*;
use relay_control_plane::store::sqlite::SqliteStore;
use relay_control_plane::store::{DynStore, StoreError};
use std::sync::Arc;

const T0: Millis = 1_700_000_000_000;

fn account(key: &MasterKey, i: usize, group: &str) -> Account {
    let id = format!("acc-{i:03}");
    Account {
        credential_enc: key.seal(&format!("sk-ant-secret-{i}"), &id).unwrap(),
        id,
        name: format!("account-{i}"),
        kind: AccountKind::AnthropicApiKey,
        base_url: "https://api.anthropic.com".into(),
        refresh_token_enc: None,
        credential_hint: "…WXYZ".into(),
        credential_expires_at: None,
        priority: 10,
        weight: 3,
        group_ids: vec![group.to_string()],
        max_concurrency: 8,
        status: AccountStatus::Enabled,
        proxy_url: String::new(),
        proxy_url_enc: None,
        reset_generation: 0,
        scopes: Vec::new(),
        subscription_type: String::new(),
        organization: String::new(),
        created_at: T0,
        updated_at: T0,
        revision: 0,
    }
}

fn audit(action: &str) -> AuditRecord {
    AuditRecord {
        actor: "test".into(),
        action: action.into(),
        target: "t".into(),
        detail: String::new(),
    }
}

fn state(account: usize, scope: &str, health: AccountHealth, until: Millis) -> AccountState {
    AccountState {
        account_id: format!("acc-{account:03}"),
        scope: scope.into(),
        health,
        reason: format!("{} from a test", health.as_str()),
        until,
        since: T0,
        reported_by: "dp-test".into(),
        revision: 0,
    }
}

/// A data plane's report, as `ReportAccountState` writes it.
async fn report(store: &DynStore, s: AccountState) {
    let guard = Mutation::RequireResetGeneration {
        account_id: s.account_id.clone(),
        at_most: 0,
    };
    apply_state_write(
        store,
        vec![guard, Mutation::SetAccountState(s)],
        audit(ACTION_ACCOUNT_STATE),
    )
    .await
    .unwrap();
}

async fn clear(store: &DynStore, account: usize, scope: &str) {
    let m = Mutation::ClearAccountState {
        account_id: format!("acc-{account:03}"),
        scope: scope.into(),
    };
    apply_state_write(store, vec![m], audit(ACTION_ACCOUNT_STATE))
        .await
        .unwrap();
}

/// The head after the store moved, checked against a full build at the same head.
async fn step(store: &DynStore, key: &MasterKey, current: &Published, expect: Built, what: &str) -> Published {
    let (next, built) = next_head(store, key, current)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{what}: the head did not move"));
    assert_eq!(built, expect, "{what}: built the wrong way");
    let full = build_full(store, key).await.unwrap();
    let (got, want) = (&next.snapshot, &full.snapshot);
    assert_eq!(got.version, want.version, "{what}: version");
    assert_eq!(got.resources, want.resources, "{what}: resources");
    assert_eq!(got.hash, want.hash, "{what}: hash");
    assert_eq!(
        got.hash,
        relay_proto::config_hash(&want.resources),
        "{what}: hash definition"
    );
    // A data plane holding the previous head takes a delta and lands on the full build.
    let prev = &current.snapshot;
    let u = next.update_for(Some(prev.version), &prev.hash);
    assert!(!u.full, "{what}: a delta was expected");
    let applied = relay_proto::apply_update(Some((&version_pb(prev.version), &prev.resources)), &u).unwrap();
    assert_eq!(applied, want.resources, "{what}: the delta's result");
    next
}

async fn sequence(store: DynStore) {
    let key = MasterKey::generate();
    bootstrap::ensure_defaults(&store).await.unwrap();
    let group = store.list_groups().await.unwrap()[0].id.clone();
    let accounts: Vec<Mutation> = (0..20)
        .map(|i| Mutation::InsertAccount(account(&key, i, &group)))
        .collect();
    store.apply(accounts, audit("account.create")).await.unwrap();
    let first = build_full(&store, &key).await.unwrap();
    let mut p = first;
    let (oldest_version, oldest_hash, oldest_resources) = (
        p.snapshot.version,
        p.snapshot.hash.clone(),
        p.snapshot.resources.clone(),
    );

    report(&store, state(1, "", AccountHealth::RateLimited, T0 + 60_000)).await;
    p = step(&store, &key, &p, Built::Patched, "first report").await;

    report(&store, state(1, "", AccountHealth::RateLimited, T0 + 120_000)).await;
    p = step(&store, &key, &p, Built::Patched, "the same account again, later").await;

    report(&store, state(2, "claude-opus", AccountHealth::Overloaded, T0 + 5_000)).await;
    report(&store, state(2, "", AccountHealth::Erroring, T0 + 9_000)).await;
    report(&store, state(19, "", AccountHealth::Unauthorized, 0)).await;
    p = step(&store, &key, &p, Built::Patched, "three reports coalesced").await;

    apply_state_write(
        &store,
        vec![Mutation::SetAccountState(state(5, "", AccountHealth::Unauthorized, 0))],
        audit(ACTION_OAUTH_REFRESH_FAILED),
    )
    .await
    .unwrap();
    p = step(&store, &key, &p, Built::Patched, "an OAuth refresh refused").await;

    clear(&store, 2, "claude-opus").await;
    p = step(&store, &key, &p, Built::Patched, "a clear").await;

    // Anything else goes through the full build, also when states changed with it.
    let mut a = store.get_account("acc-003").await.unwrap().unwrap();
    let rev = a.revision;
    a.weight = 9;
    report(&store, state(4, "", AccountHealth::RateLimited, T0 + 1_000)).await;
    store
        .apply(
            vec![Mutation::UpdateAccount {
                row: a,
                expect_revision: rev,
            }],
            audit("account.update"),
        )
        .await
        .unwrap();
    p = step(&store, &key, &p, Built::Full, "a report and an account update").await;

    // A new credential and a sealed proxy URL are opened anew; the others are kept.
    let mut a = store.get_account("acc-004").await.unwrap().unwrap();
    let rev = a.revision;
    a.credential_enc = key.seal("sk-ant-rotated", &a.id).unwrap();
    let mut b = store.get_account("acc-006").await.unwrap().unwrap();
    let rev_b = b.revision;
    b.proxy_url_enc = Some(
        key.seal(
            "http://user:pw@proxy.example:3128",
            &relay_control_plane::api::admin::proxy_seal_context(&b.id),
        )
        .unwrap(),
    );
    store
        .apply(
            vec![
                Mutation::UpdateAccount {
                    row: a,
                    expect_revision: rev,
                },
                Mutation::UpdateAccount {
                    row: b,
                    expect_revision: rev_b,
                },
            ],
            audit("account.update"),
        )
        .await
        .unwrap();
    p = step(&store, &key, &p, Built::Full, "a new credential and proxy URL").await;
    let opened = |id: &str| {
        p.snapshot
            .resources
            .accounts
            .iter()
            .find(|x| x.id == id)
            .cloned()
            .unwrap()
    };
    assert_eq!(opened("acc-004").credential, "sk-ant-rotated");
    assert_eq!(opened("acc-006").proxy_url, "http://user:pw@proxy.example:3128");
    assert_eq!(opened("acc-005").credential, "sk-ant-secret-5");

    report(&store, state(7, "", AccountHealth::Blocked, 0)).await;
    p = step(&store, &key, &p, Built::Patched, "a report after a full build").await;

    // A delete that cascades to the account's states.
    store
        .apply(
            vec![Mutation::DeleteAccount { id: "acc-007".into() }],
            audit("account.delete"),
        )
        .await
        .unwrap();
    p = step(&store, &key, &p, Built::Full, "a delete with a cascade").await;

    store
        .apply(
            vec![Mutation::SetSetting {
                name: "retry.max_attempts".into(),
                value: "2".into(),
            }],
            audit("settings.set"),
        )
        .await
        .unwrap();
    p = step(&store, &key, &p, Built::Full, "a setting").await;

    clear(&store, 1, "").await;
    report(&store, state(8, "", AccountHealth::Overloaded, T0 + 30_000)).await;
    p = step(&store, &key, &p, Built::Patched, "a clear and a report").await;

    // A data plane still on the first head gets one delta to the last.
    let u = p.update_for(Some(oldest_version), &oldest_hash);
    assert!(!u.full);
    let applied = relay_proto::apply_update(Some((&version_pb(oldest_version), &oldest_resources)), &u).unwrap();
    assert_eq!(applied, p.snapshot.resources);
    assert!(next_head(&store, &key, &p).await.unwrap().is_none(), "nothing moved");
}

#[tokio::test]
async fn patched_heads_equal_full_builds_sqlite() {
    sequence(Arc::new(SqliteStore::open_in_memory().unwrap())).await;
}

#[tokio::test]
async fn patched_heads_equal_full_builds_postgres() {
    let db = relay_test_support::TestDb::new().await.unwrap();
    let store = relay_control_plane::store::postgres::PostgresStore::connect(&db.url, 4)
        .await
        .unwrap();
    sequence(Arc::new(store)).await;
}

#[tokio::test]
async fn a_state_only_write_refuses_anything_else() {
    let store: DynStore = Arc::new(SqliteStore::open_in_memory().unwrap());
    let key = MasterKey::generate();
    bootstrap::ensure_defaults(&store).await.unwrap();
    let before = store.head().await.unwrap();
    let group = store.list_groups().await.unwrap()[0].id.clone();
    let err = apply_state_write(
        &store,
        vec![Mutation::InsertAccount(account(&key, 1, &group))],
        audit(ACTION_ACCOUNT_STATE),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    let err = apply_state_write(
        &store,
        vec![Mutation::SetAccountState(state(1, "", AccountHealth::Blocked, 0))],
        audit("account.check"),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    assert_eq!(store.head().await.unwrap(), before, "nothing was written");
}

/// The patch path trusts the state-only actions: nothing writes them but `apply_state_write`.
#[test]
fn state_only_actions_are_named_only_by_the_publisher() {
    fn sources(dir: &std::path::Path, out: &mut Vec<(std::path::PathBuf, String)>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                sources(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push((p.clone(), std::fs::read_to_string(&p).unwrap()));
            }
        }
    }
    let mut files = Vec::new();
    sources(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    for (path, text) in &files {
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        for action in relay_control_plane::config::STATE_ONLY_ACTIONS {
            let literal = format!("\"{action}\"");
            if code.contains(&literal) {
                assert!(
                    path.ends_with("src/config.rs"),
                    "{} writes {literal} by hand: use config::apply_state_write and its constant",
                    path.display()
                );
            }
        }
        if text.contains("ACTION_ACCOUNT_STATE") || text.contains("ACTION_OAUTH_REFRESH_FAILED") {
            assert!(
                code.contains("apply_state_write"),
                "{} names a state-only action without apply_state_write",
                path.display()
            );
        }
    }
}
