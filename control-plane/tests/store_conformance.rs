//! One conformance suite for every `Store` implementation.
//!
//! `conformance_suite!(make)` expands into a set of `#[tokio::test]`s; `make`
//! is an expression evaluating to a future that yields either a `DynStore` or
//! a `(DynStore, guard)` pair, where `guard` (e.g. an ephemeral database) is
//! kept alive until the test ends. Each test gets a fresh, empty store.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use relay_control_plane::model::*;
use relay_control_plane::store::sqlite::SqliteStore;
use relay_control_plane::store::{DynStore, IngestResult, Store, StoreError};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

// ---------------------------------------------------------------------------
// What `make` may yield

/// A fresh store, plus whatever must live as long as the test.
pub trait TestStore {
    fn into_parts(self) -> (DynStore, Box<dyn std::any::Any + Send>);
}

impl TestStore for DynStore {
    fn into_parts(self) -> (DynStore, Box<dyn std::any::Any + Send>) {
        (self, Box::new(()))
    }
}

impl<G: Send + 'static> TestStore for (DynStore, G) {
    fn into_parts(self) -> (DynStore, Box<dyn std::any::Any + Send>) {
        (self.0, Box::new(self.1))
    }
}

/// The variant of a store error, by name.
fn kind_of(err: &StoreError) -> &'static str {
    match err {
        StoreError::AlreadyExists { .. } => "AlreadyExists",
        StoreError::NotFound { .. } => "NotFound",
        StoreError::Conflict { .. } => "Conflict",
        StoreError::InUse(_) => "InUse",
        StoreError::Invalid(_) => "Invalid",
        StoreError::Fenced { .. } => "Fenced",
        StoreError::Unavailable { .. } => "Unavailable",
        StoreError::Internal { .. } => "Internal",
        StoreError::Corrupt { .. } => "Corrupt",
        StoreError::Migration { .. } => "Migration",
    }
}

/// Both stores refuse with this exact kind and message (what a client is shown).
#[track_caller]
fn assert_refused(err: &StoreError, kind: &str, message: &str) {
    assert_eq!((kind_of(err), err.to_string().as_str()), (kind, message), "{err:?}");
}

// ---------------------------------------------------------------------------
// Fixtures

const T0: Millis = 1_700_000_000_000;
const HOUR: Millis = 3_600_000;

fn group(id: &str, name: &str) -> Group {
    Group::new(id, name, &format!("the {name} group"), KeyLimits::default(), T0)
}

fn account(id: &str, name: &str, group_ids: &[&str]) -> Account {
    Account {
        id: id.into(),
        name: name.into(),
        kind: AccountKind::AnthropicApiKey,
        base_url: "https://api.anthropic.com".into(),
        credential_enc: vec![1, 2, 3, 0, 255, name.len() as u8],
        refresh_token_enc: None,
        credential_hint: "…WXYZ".into(),
        credential_expires_at: None,
        priority: 10,
        weight: 3,
        group_ids: group_ids.iter().map(|g| g.to_string()).collect(),
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

fn oauth_account(id: &str, name: &str, group_ids: &[&str]) -> Account {
    Account {
        kind: AccountKind::ClaudeOauth,
        refresh_token_enc: Some(vec![9, 8, 7]),
        credential_expires_at: Some(T0 + 8 * HOUR),
        priority: -5,
        weight: 1,
        status: AccountStatus::Disabled,
        proxy_url: "socks5://…@127.0.0.1:1080".into(),
        proxy_url_enc: Some(vec![4, 5, 6]),
        scopes: vec!["user:inference".into(), "user:profile".into()],
        subscription_type: "max".into(),
        organization: "Acme Inc".into(),
        ..account(id, name, group_ids)
    }
}

fn api_key(id: &str, name: &str, group_id: &str) -> ApiKey {
    ApiKey {
        id: id.into(),
        name: name.into(),
        key_hash: format!("hash-of-{id}"),
        key_prefix: format!("rk-{}", &id[..id.len().min(4)]),
        status: KeyStatus::Active,
        expires_at: None,
        group_id: group_id.into(),
        allowed_models: vec![],
        limits: KeyLimits::default(),
        created_at: T0,
        updated_at: T0,
        revision: 0,
    }
}

fn price(id: &str, pattern: &str, effective_from: Millis) -> Price {
    Price {
        id: id.into(),
        model_pattern: pattern.into(),
        effective_from,
        input: 3_000_000,
        output: 15_000_000,
        cache_write_5m: 3_750_000,
        cache_write_1h: 6_000_000,
        cache_read: 300_000,
        source: "operator".into(),
        revision: 0,
    }
}

fn admin_token(id: &str, name: &str, role: Role) -> AdminToken {
    AdminToken {
        id: id.into(),
        name: name.into(),
        token_hash: format!("token-hash-{id}"),
        token_prefix: format!("rat-{id}"),
        role,
        created_at: T0,
        revision: 0,
    }
}

fn audit(action: &str, target: &str) -> AuditRecord {
    AuditRecord {
        actor: "admin:alice".into(),
        action: action.into(),
        target: target.into(),
        detail: format!(r#"{{"target":"{target}"}}"#),
    }
}

fn setting(name: &str, value: &str) -> Mutation {
    Mutation::SetSetting {
        name: name.into(),
        value: value.into(),
    }
}

/// `row` as the store should return it after being written at `revision`.
fn at_rev<T: Clone>(row: &T, revision: u64, set: fn(&mut T, u64)) -> T {
    let mut row = row.clone();
    set(&mut row, revision);
    row
}

fn acc_at(a: &Account, revision: u64) -> Account {
    let mut a = at_rev(a, revision, |a, r| a.revision = r);
    a.group_ids.sort();
    a
}

fn key_at(k: &ApiKey, revision: u64) -> ApiKey {
    at_rev(k, revision, |k, r| k.revision = r)
}

fn group_at(g: &Group, revision: u64) -> Group {
    at_rev(g, revision, |g, r| g.revision = r)
}

fn price_at(p: &Price, revision: u64) -> Price {
    at_rev(p, revision, |p, r| p.revision = r)
}

fn token_at(t: &AdminToken, revision: u64) -> AdminToken {
    at_rev(t, revision, |t, r| t.revision = r)
}

#[allow(clippy::too_many_arguments)]
fn usage(n: u64, ts: Millis, key: &str, acct: &str, model: &str, http_status: u32, error_type: &str) -> UsageEvent {
    UsageEvent {
        event_id: uuid::Uuid::new_v4(),
        request_id: format!("req_{n}"),
        ts,
        node_id: "dp-1".into(),
        api_key_id: key.into(),
        account_id: acct.into(),
        model: model.into(),
        // Distinct magnitudes per field so that a swapped column shows.
        input_tokens: 1_000 + n,
        output_tokens: 20_000 + 3 * n,
        cache_write_5m_tokens: 300_000 + 7 * n,
        cache_write_1h_tokens: 4_000_000 + 11 * n,
        cache_read_tokens: 50_000_000 + 13 * n,
        cost_pico_usd: 6_000_000_000 + 17 * n,
        http_status,
        error_type: error_type.into(),
        stream: n.is_multiple_of(2),
        cancelled: n.is_multiple_of(5),
        latency_ms: 100 + n,
        ttfb_ms: 10 + n,
        upstream_request_id: format!("msg_{n}"),
        web_search_requests: n % 3,
        anomaly: if n == 3 { "suspect".into() } else { String::new() },
        client_request_id: if n.is_multiple_of(2) {
            format!("client-{n}")
        } else {
            String::new()
        },
        queue_wait_ms: if n.is_multiple_of(3) { 250 * n } else { 0 },
        waited_for: if n.is_multiple_of(3) {
            "recovery".into()
        } else {
            String::new()
        },
        stream_events: n,
        max_event_gap_ms: 3 * n,
        error_message: if n == 2 { "relay's words".into() } else { String::new() },
        model_requested: if n == 4 {
            "claude-sonnet-4-5".into()
        } else {
            String::new()
        },
        group_id: format!("grp-{}", n % 2),
    }
}

/// The expected `query_usage` answer, computed independently in memory.
fn expected_usage(
    events: &[UsageEvent],
    q: UsageQuery,
    key_names: &BTreeMap<&str, &str>,
    account_names: &BTreeMap<&str, &str>,
) -> Vec<UsageRow> {
    let mut rows: BTreeMap<(Millis, String, String), UsageRow> = BTreeMap::new();
    for e in events {
        if q.since.is_some_and(|s| e.ts < s) || q.until.is_some_and(|u| e.ts >= u) {
            continue;
        }
        let bucket_start = q.bucket.millis().map_or(0, |b| (e.ts / b) * b);
        let (group, group_id) = match q.group_by {
            UsageGroupBy::None => (String::new(), String::new()),
            UsageGroupBy::Key => (
                key_names
                    .get(e.api_key_id.as_str())
                    .map_or(e.api_key_id.clone(), |n| n.to_string()),
                e.api_key_id.clone(),
            ),
            UsageGroupBy::Account => (
                account_names
                    .get(e.account_id.as_str())
                    .map_or(e.account_id.clone(), |n| n.to_string()),
                e.account_id.clone(),
            ),
            UsageGroupBy::Model => (e.model.clone(), e.model.clone()),
        };
        let row = rows
            .entry((bucket_start, group.clone(), group_id.clone()))
            .or_insert_with(|| UsageRow {
                bucket_start,
                group,
                group_id,
                ..UsageRow::default()
            });
        row.requests += 1;
        row.input_tokens += e.input_tokens;
        row.output_tokens += e.output_tokens;
        row.cache_write_5m_tokens += e.cache_write_5m_tokens;
        row.cache_write_1h_tokens += e.cache_write_1h_tokens;
        row.cache_read_tokens += e.cache_read_tokens;
        row.cost_pico_usd += e.cost_pico_usd;
        if e.http_status >= 400 || !e.error_type.is_empty() {
            row.errors += 1;
        }
        if !e.anomaly.is_empty() {
            row.anomalies += 1;
        }
    }
    rows.into_values().collect()
}

// ---------------------------------------------------------------------------
// The suite

macro_rules! conformance_suite {
    ($make:expr) => {
        #[allow(unused_imports)]
        use super::*;

        /// A fresh store and its keep-alive guard.
        async fn fresh() -> (DynStore, Box<dyn std::any::Any + Send>) {
            TestStore::into_parts($make.await)
        }

        #[tokio::test]
        async fn capture_rules_are_config_and_captures_are_stored_once_cleared_and_expired() {
            let (store, _guard) = fresh().await;
            let rule = CaptureRule {
                id: "c1".into(),
                key_id: "k1".into(),
                model: "claude-*".into(),
                errors_only: true,
                sample_ppm: 500_000,
                max_bytes: 1024,
                ttl_ms: 60_000,
                created_ms: 5,
                ..CaptureRule::default()
            };
            apply_ok(&store, vec![Mutation::InsertCaptureRule(rule.clone())]).await;
            assert_eq!(
                store.load_config().await.unwrap().capture_rules,
                vec![rule.clone()]
            );
            assert_eq!(store.list_capture_rules().await.unwrap(), vec![rule.clone()]);
            let err = store
                .apply(
                    vec![Mutation::InsertCaptureRule(rule.clone())],
                    audit("capture.add", "c1"),
                )
                .await
                .unwrap_err();
            assert_refused(&err, "AlreadyExists", "capture rule \"c1\" already exists");
            apply_ok(&store, vec![Mutation::DeleteCaptureRule { id: "c1".into() }]).await;
            assert!(store.load_config().await.unwrap().capture_rules.is_empty());
            let err = store
                .apply(
                    vec![Mutation::DeleteCaptureRule { id: "c1".into() }],
                    audit("capture.rm", "c1"),
                )
                .await
                .unwrap_err();
            assert_refused(&err, "NotFound", "capture rule \"c1\" not found");

            let cap = |id: &str, captured_ms: i64, expires_ms: i64| StoredCapture {
                request_id: id.into(),
                rule_id: "c1".into(),
                api_key_id: "k1".into(),
                node_id: "dp-1".into(),
                captured_ms,
                expires_ms,
                truncated: id == "r-b",
                document_zstd: vec![0x28, 0xb5, 0x2f, 0xfd, 0, 0xff, id.len() as u8],
            };
            let (a, b, c) = (cap("r-a", 100, 0), cap("r-b", 200, 900), cap("r-c", 200, 2_000));
            let r = store
                .insert_captures(&[a.clone(), b.clone(), c.clone()])
                .await
                .unwrap();
            assert_eq!(
                r,
                IngestResult {
                    inserted: 3,
                    duplicates: 0
                }
            );
            let r = store.insert_captures(std::slice::from_ref(&a)).await.unwrap();
            assert_eq!(
                r,
                IngestResult {
                    inserted: 0,
                    duplicates: 1
                }
            );
            assert_eq!(store.get_capture("r-b").await.unwrap(), Some(b.clone()));
            assert_eq!(store.get_capture("r-x").await.unwrap(), None);
            // Older than 150 (r-a) or expired at 1,000 (r-b) go; r-c stays.
            assert_eq!(store.delete_captures_before(150, 1_000, 10).await.unwrap(), 2);
            assert_eq!(store.get_capture("r-a").await.unwrap(), None);
            assert_eq!(store.get_capture("r-b").await.unwrap(), None);
            assert_eq!(store.get_capture("r-c").await.unwrap(), Some(c));
            assert_eq!(
                store
                    .delete_requests(&["r-c".to_string(), "r-x".to_string()])
                    .await
                    .unwrap(),
                (0, 1)
            );
            assert_eq!(store.get_capture("r-c").await.unwrap(), None);
        }

        /// Applies `mutations` and asserts the head moved by exactly one.
        async fn apply_ok(store: &DynStore, mutations: Vec<Mutation>) -> Version {
            let before = store.head().await.unwrap();
            let v = store.apply(mutations, audit("test.apply", "test")).await.unwrap();
            assert_eq!(v.epoch, before.epoch, "epoch must not change on apply");
            assert_eq!(v.revision, before.revision + 1, "apply bumps by exactly one");
            assert_eq!(store.head().await.unwrap(), v);
            v
        }

        /// Applies `mutations`, expecting failure; asserts nothing changed.
        async fn apply_err(store: &DynStore, mutations: Vec<Mutation>) -> StoreError {
            let before_head = store.head().await.unwrap();
            let before_config = store.load_config().await.unwrap();
            let before_audit = store.list_audit(1000, None).await.unwrap();
            let err = store
                .apply(mutations, audit("test.fail", "test"))
                .await
                .expect_err("apply should have failed");
            assert_eq!(
                store.head().await.unwrap(),
                before_head,
                "failed apply moved the head"
            );
            assert_eq!(
                store.load_config().await.unwrap(),
                before_config,
                "failed apply left changes"
            );
            assert_eq!(
                store.list_audit(1000, None).await.unwrap(),
                before_audit,
                "failed apply left an audit entry"
            );
            err
        }

        #[tokio::test]
        async fn backend_is_named() {
            let (store, _guard) = fresh().await;
            assert!(["sqlite", "postgres"].contains(&store.backend()));
        }

        #[tokio::test]
        async fn head_starts_at_zero_and_each_apply_bumps_by_one() {
            let (store, _guard) = fresh().await;
            let v0 = store.head().await.unwrap();
            assert_eq!(v0.revision, 0);
            assert!(v0.epoch > 0, "epoch should be set at creation");
            let config = store.load_config().await.unwrap();
            assert_eq!(
                config,
                ConfigState {
                    version: v0,
                    ..ConfigState::default()
                }
            );

            let v1 = apply_ok(&store, vec![setting("a", "1")]).await;
            assert_eq!(
                v1,
                Version {
                    epoch: v0.epoch,
                    revision: 1
                }
            );
            // Several mutations in one apply are still one revision.
            let v2 = apply_ok(
                &store,
                vec![
                    setting("b", "2"),
                    Mutation::InsertGroup(group("g1", "one")),
                    Mutation::InsertGroup(group("g2", "two")),
                ],
            )
            .await;
            assert_eq!(v2.revision, 2);
            assert_eq!(store.list_audit(10, None).await.unwrap().len(), 2);
        }

        #[tokio::test]
        async fn a_new_epoch_starts_only_from_the_head_seen() {
            let (store, _guard) = fresh().await;
            let v1 = apply_ok(&store, vec![setting("a", "1")]).await;
            let stale = Version {
                epoch: v1.epoch,
                revision: 0,
            };
            assert_eq!(
                store.start_new_epoch(stale, 0, "test").await.unwrap(),
                v1,
                "the head moved: nothing happens"
            );
            let v2 = store
                .start_new_epoch(v1, 0, "restored from a backup")
                .await
                .unwrap();
            assert!(v2.epoch > v1.epoch, "{v2} after {v1}");
            assert_eq!(v2.revision, v1.revision);
            assert_eq!(store.head().await.unwrap(), v2);
            assert_eq!(
                store.start_new_epoch(v1, 0, "again").await.unwrap(),
                v2,
                "one new epoch per rewind"
            );
            let audit = store.list_audit(1, None).await.unwrap();
            assert_eq!(audit[0].action, "config.new_epoch");
            assert!(
                audit[0].detail.contains("restored from a backup"),
                "{}",
                audit[0].detail
            );
            let v3 = apply_ok(&store, vec![setting("a", "2")]).await;
            assert_eq!(
                v3,
                Version {
                    epoch: v2.epoch,
                    revision: v2.revision + 1
                }
            );
            let floor = v3.epoch + 1_000_000_000_000;
            let v4 = store
                .start_new_epoch(v3, floor, "a cache from elsewhere")
                .await
                .unwrap();
            assert_eq!(v4.epoch, floor, "above the epoch a data plane claimed");
        }

        #[tokio::test]
        async fn apply_is_atomic() {
            let (store, _guard) = fresh().await;
            apply_ok(&store, vec![Mutation::InsertGroup(group("g1", "one"))]).await;

            // The second mutation fails on a duplicate name: nothing of the first stays.
            let err = apply_err(
                &store,
                vec![
                    Mutation::InsertGroup(group("g2", "two")),
                    setting("s", "v"),
                    Mutation::InsertGroup(group("g3", "one")),
                ],
            )
            .await;
            assert_refused(&err, "AlreadyExists", "group \"one\" already exists");
            assert!(store.get_group("g2").await.unwrap().is_none());
            assert!(store.settings().await.unwrap().is_empty());

            // A failing delete after a good insert.
            let err = apply_err(
                &store,
                vec![
                    Mutation::InsertAccount(account("a1", "alpha", &["g1"])),
                    Mutation::DeleteAccount { id: "nope".into() },
                ],
            )
            .await;
            assert_refused(&err, "NotFound", "account \"nope\" not found");
            assert!(store.get_account("a1").await.unwrap().is_none());

            // The store is still usable and the revision sequence has no gap.
            let v = apply_ok(&store, vec![Mutation::InsertGroup(group("g2", "two"))]).await;
            assert_eq!(v.revision, 2);
        }

        #[tokio::test]
        async fn groups_insert_get_and_duplicates() {
            let (store, _guard) = fresh().await;
            let g = group("grp-1", "default");
            let v = apply_ok(&store, vec![Mutation::InsertGroup(g.clone())]).await;

            let by_id = store.get_group("grp-1").await.unwrap().unwrap();
            assert_eq!(by_id, group_at(&g, v.revision));
            let by_name = store.get_group("default").await.unwrap().unwrap();
            assert_eq!(by_name, by_id);
            assert!(store.get_group("missing").await.unwrap().is_none());

            let err = apply_err(&store, vec![Mutation::InsertGroup(group("grp-2", "default"))]).await;
            match err {
                StoreError::AlreadyExists { kind, name } => {
                    assert_eq!(kind, ResourceKind::Group.as_str());
                    assert_eq!(name, "default");
                }
                other => panic!("expected AlreadyExists, got {other:?}"),
            }
            let err = apply_err(&store, vec![Mutation::InsertGroup(group("grp-1", "other"))]).await;
            assert_refused(&err, "AlreadyExists", "group \"other\" already exists");

            apply_ok(&store, vec![Mutation::InsertGroup(group("grp-0", "beta"))]).await;
            let names: Vec<String> = store
                .list_groups()
                .await
                .unwrap()
                .into_iter()
                .map(|g| g.name)
                .collect();
            assert_eq!(names, ["beta", "default"]);
        }

        #[tokio::test]
        async fn groups_carry_limits_and_update_in_place() {
            let (store, _guard) = fresh().await;
            let limits = KeyLimits {
                rpm: 600,
                tpm: 2_000_000,
                max_concurrency: 12,
                daily_budget: 50_000_000,
                monthly_budget: 1_000_000_000,
            };
            let g = Group {
                limits,
                ..group("grp-1", "team-a")
            };
            let v1 = apply_ok(&store, vec![Mutation::InsertGroup(g.clone())]).await;
            assert_eq!(
                store.get_group("team-a").await.unwrap().unwrap(),
                group_at(&g, v1.revision)
            );
            apply_ok(&store, vec![Mutation::InsertGroup(group("grp-2", "team-b"))]).await;

            // Renamed, described and limited anew in one write: same id, new revision.
            let next = Group {
                name: "team-a2".into(),
                description: "renamed".into(),
                limits: KeyLimits {
                    rpm: 0,
                    daily_budget: 0,
                    ..limits
                },
                updated_at: T0 + HOUR,
                ..group_at(&g, v1.revision)
            };
            let v3 = apply_ok(
                &store,
                vec![Mutation::UpdateGroup {
                    row: next.clone(),
                    expect_revision: v1.revision,
                }],
            )
            .await;
            let got = store.get_group("grp-1").await.unwrap().unwrap();
            assert_eq!(got, group_at(&next, v3.revision));
            assert_eq!(got.created_at, T0, "created_at never changes");
            assert!(
                store.get_group("team-a").await.unwrap().is_none(),
                "the old name is gone"
            );
            let config = store.load_config().await.unwrap();
            assert_eq!(config.groups.iter().find(|g| g.id == "grp-1"), Some(&got));

            // A stale revision, a missing group, a taken name: refused, nothing changed.
            let err = apply_err(
                &store,
                vec![Mutation::UpdateGroup {
                    row: next.clone(),
                    expect_revision: v1.revision,
                }],
            )
            .await;
            assert_refused(
                &err,
                "Conflict",
                "concurrent modification of group \"team-a2\"; another change to it kept landing first",
            );
            let err = apply_err(
                &store,
                vec![Mutation::UpdateGroup {
                    row: Group {
                        id: "nope".into(),
                        ..next.clone()
                    },
                    expect_revision: 0,
                }],
            )
            .await;
            assert_refused(&err, "NotFound", "group \"nope\" not found");
            let err = apply_err(
                &store,
                vec![Mutation::UpdateGroup {
                    row: Group {
                        name: "team-b".into(),
                        ..got.clone()
                    },
                    expect_revision: v3.revision,
                }],
            )
            .await;
            assert_refused(&err, "AlreadyExists", "group \"team-b\" already exists");
        }

        #[tokio::test]
        async fn values_a_column_cannot_hold_are_refused_as_invalid() {
            let (store, _guard) = fresh().await;
            apply_ok(&store, vec![Mutation::InsertGroup(group("g1", "one"))]).await;
            let mut key = api_key("k1", "greedy", "g1");
            key.limits.rpm = u64::MAX;
            let err = apply_err(&store, vec![Mutation::InsertApiKey(key)]).await;
            assert_refused(&err, "Invalid", "rpm 18446744073709551615 is out of range");
            let group = Group {
                limits: KeyLimits {
                    monthly_budget: u64::MAX,
                    ..KeyLimits::default()
                },
                ..group("g2", "two")
            };
            let err = apply_err(&store, vec![Mutation::InsertGroup(group)]).await;
            assert_refused(
                &err,
                "Invalid",
                "monthly_budget 18446744073709551615 is out of range",
            );
            let mut p = price("p1", "claude-*", T0);
            p.output = u64::MAX;
            let err = apply_err(&store, vec![Mutation::UpsertPrice(p)]).await;
            assert_refused(
                &err,
                "Invalid",
                "output price 18446744073709551615 is out of range",
            );
        }

        #[tokio::test]
        async fn get_prefers_id_over_name() {
            let (store, _guard) = fresh().await;
            // One group's id is another group's name: the id lookup wins.
            apply_ok(
                &store,
                vec![
                    Mutation::InsertGroup(group("same", "first")),
                    Mutation::InsertGroup(group("g-2", "same")),
                ],
            )
            .await;
            assert_eq!(store.get_group("same").await.unwrap().unwrap().name, "first");
            assert_eq!(store.get_group("g-2").await.unwrap().unwrap().name, "same");
        }

        #[tokio::test]
        async fn accounts_round_trip() {
            let (store, _guard) = fresh().await;
            apply_ok(
                &store,
                vec![
                    Mutation::InsertGroup(group("g-b", "bravo")),
                    Mutation::InsertGroup(group("g-a", "alpha")),
                ],
            )
            .await;
            let mut plain = account("acc-1", "zeta", &["g-b", "g-a"]);
            plain.reset_generation = 3;
            let oauth = oauth_account("acc-2", "eta", &[]);
            let v = apply_ok(
                &store,
                vec![
                    Mutation::InsertAccount(plain.clone()),
                    Mutation::InsertAccount(oauth.clone()),
                ],
            )
            .await;

            let got = store.get_account("acc-1").await.unwrap().unwrap();
            assert_eq!(got, acc_at(&plain, v.revision));
            assert_eq!(got.group_ids, ["g-a", "g-b"], "group_ids come back sorted");
            assert_eq!(store.get_account("zeta").await.unwrap().unwrap(), got);
            assert_eq!(
                store.get_account("eta").await.unwrap().unwrap(),
                acc_at(&oauth, v.revision)
            );
            assert!(store.get_account("nobody").await.unwrap().is_none());

            let listed = store.list_accounts().await.unwrap();
            assert_eq!(listed, [acc_at(&oauth, v.revision), acc_at(&plain, v.revision)]);

            let err = apply_err(
                &store,
                vec![Mutation::InsertAccount(account("acc-3", "zeta", &[]))],
            )
            .await;
            match err {
                StoreError::AlreadyExists { kind, name } => {
                    assert_eq!(kind, ResourceKind::Account.as_str());
                    assert_eq!(name, "zeta");
                }
                other => panic!("expected AlreadyExists, got {other:?}"),
            }
            let err = apply_err(
                &store,
                vec![Mutation::InsertAccount(account("acc-1", "new-name", &[]))],
            )
            .await;
            assert_refused(&err, "AlreadyExists", "account \"new-name\" already exists");

            // A membership in a group that does not exist is refused.
            let err = apply_err(
                &store,
                vec![Mutation::InsertAccount(account("acc-4", "iota", &["g-missing"]))],
            )
            .await;
            assert_refused(&err, "NotFound", "group \"g-missing\" not found");
        }

        #[tokio::test]
        async fn account_updates_use_optimistic_concurrency() {
            let (store, _guard) = fresh().await;
            apply_ok(
                &store,
                vec![
                    Mutation::InsertGroup(group("g1", "one")),
                    Mutation::InsertGroup(group("g2", "two")),
                    Mutation::InsertGroup(group("g3", "three")),
                ],
            )
            .await;
            let v1 = apply_ok(
                &store,
                vec![Mutation::InsertAccount(account("acc", "main", &["g1", "g2"]))],
            )
            .await;
            let read = store.get_account("acc").await.unwrap().unwrap();
            assert_eq!(read.revision, v1.revision);

            // Update from the current revision: weight, status, groups replaced.
            let mut changed = read.clone();
            changed.weight = 42;
            changed.status = AccountStatus::Disabled;
            changed.group_ids = vec!["g3".into(), "g2".into()];
            changed.credential_enc = vec![7; 40];
            changed.updated_at = T0 + 1;
            let v2 = apply_ok(
                &store,
                vec![Mutation::UpdateAccount {
                    row: changed.clone(),
                    expect_revision: read.revision,
                }],
            )
            .await;
            let after = store.get_account("acc").await.unwrap().unwrap();
            assert_eq!(after, acc_at(&changed, v2.revision));
            assert_eq!(after.group_ids, ["g2", "g3"], "membership set is replaced");

            // A second writer that read before that update is rejected.
            let mut stale = read.clone();
            stale.weight = 1;
            let err = apply_err(
                &store,
                vec![Mutation::UpdateAccount {
                    row: stale,
                    expect_revision: read.revision,
                }],
            )
            .await;
            match err {
                StoreError::Conflict { kind, name } => {
                    assert_eq!(kind, ResourceKind::Account.as_str());
                    assert_eq!(name, "main");
                }
                other => panic!("expected Conflict, got {other:?}"),
            }
            assert_eq!(store.get_account("acc").await.unwrap().unwrap().weight, 42);

            // Updating a row that does not exist.
            let err = apply_err(
                &store,
                vec![Mutation::UpdateAccount {
                    row: account("ghost", "ghost", &[]),
                    expect_revision: v2.revision,
                }],
            )
            .await;
            assert_refused(&err, "NotFound", "account \"ghost\" not found");

            // Renaming onto another account's name.
            apply_ok(
                &store,
                vec![Mutation::InsertAccount(account("acc-b", "other", &[]))],
            )
            .await;
            let mut rename = after.clone();
            rename.name = "other".into();
            let err = apply_err(
                &store,
                vec![Mutation::UpdateAccount {
                    row: rename,
                    expect_revision: after.revision,
                }],
            )
            .await;
            assert_refused(&err, "AlreadyExists", "account \"other\" already exists");
        }

        #[tokio::test]
        async fn api_keys_round_trip_and_update() {
            let (store, _guard) = fresh().await;
            apply_ok(
                &store,
                vec![
                    Mutation::InsertGroup(group("g1", "one")),
                    Mutation::InsertGroup(group("g2", "two")),
                ],
            )
            .await;
            let mut key = api_key("key-1", "ci", "g1");
            key.allowed_models = vec!["claude-sonnet-4-5".into(), "claude-haiku-*".into()];
            key.expires_at = Some(T0 + 24 * HOUR);
            key.limits = KeyLimits {
                rpm: 60,
                tpm: 100_000,
                max_concurrency: 4,
                daily_budget: 5_000_000,
                monthly_budget: 100_000_000,
            };
            let plain = api_key("key-2", "bot", "g2");
            let v = apply_ok(
                &store,
                vec![
                    Mutation::InsertApiKey(key.clone()),
                    Mutation::InsertApiKey(plain.clone()),
                ],
            )
            .await;

            assert_eq!(
                store.get_api_key("key-1").await.unwrap().unwrap(),
                key_at(&key, v.revision)
            );
            assert_eq!(
                store.get_api_key("ci").await.unwrap().unwrap(),
                key_at(&key, v.revision)
            );
            assert_eq!(
                store.get_api_key("bot").await.unwrap().unwrap(),
                key_at(&plain, v.revision)
            );
            assert!(store.get_api_key("nope").await.unwrap().is_none());
            assert_eq!(
                store.list_api_keys().await.unwrap(),
                [key_at(&plain, v.revision), key_at(&key, v.revision)]
            );

            let err = apply_err(&store, vec![Mutation::InsertApiKey(api_key("key-3", "ci", "g1"))]).await;
            match err {
                StoreError::AlreadyExists { kind, name } => {
                    assert_eq!(kind, "key");
                    assert_eq!(name, "ci");
                }
                other => panic!("expected AlreadyExists, got {other:?}"),
            }
            let err = apply_err(
                &store,
                vec![Mutation::InsertApiKey(api_key("key-4", "x", "g-missing"))],
            )
            .await;
            assert_refused(&err, "NotFound", "group \"g-missing\" not found");

            // Revoke from the current revision, then a stale update conflicts.
            let mut revoked = key_at(&key, v.revision);
            revoked.status = KeyStatus::Revoked;
            revoked.allowed_models.clear();
            revoked.group_id = "g2".into();
            revoked.updated_at = T0 + 5;
            let v2 = apply_ok(
                &store,
                vec![Mutation::UpdateApiKey {
                    row: revoked.clone(),
                    expect_revision: v.revision,
                }],
            )
            .await;
            assert_eq!(
                store.get_api_key("key-1").await.unwrap().unwrap(),
                key_at(&revoked, v2.revision)
            );
            // A key's hash and prefix are its identity: an update never changes them.
            let v3 = apply_ok(
                &store,
                vec![Mutation::UpdateApiKey {
                    row: ApiKey {
                        key_hash: "another-hash".into(),
                        key_prefix: "rk-other".into(),
                        ..key_at(&revoked, v2.revision)
                    },
                    expect_revision: v2.revision,
                }],
            )
            .await;
            let kept = store.get_api_key("key-1").await.unwrap().unwrap();
            assert_eq!(kept, key_at(&revoked, v3.revision));

            let mut stale = key_at(&key, v.revision);
            stale.status = KeyStatus::Disabled;
            let err = apply_err(
                &store,
                vec![Mutation::UpdateApiKey {
                    row: stale,
                    expect_revision: v.revision,
                }],
            )
            .await;
            assert_refused(
                &err,
                "Conflict",
                "concurrent modification of key \"ci\"; another change to it kept landing first",
            );
            let err = apply_err(
                &store,
                vec![Mutation::UpdateApiKey {
                    row: api_key("key-x", "x", "g1"),
                    expect_revision: v2.revision,
                }],
            )
            .await;
            assert_refused(&err, "NotFound", "key \"key-x\" not found");
        }

        #[tokio::test]
        async fn deleting_an_account_removes_its_memberships() {
            let (store, _guard) = fresh().await;
            apply_ok(
                &store,
                vec![
                    Mutation::InsertGroup(group("g1", "one")),
                    Mutation::InsertAccount(account("acc", "main", &["g1"])),
                    Mutation::InsertAccount(account("acc-2", "spare", &[])),
                ],
            )
            .await;
            apply_ok(&store, vec![Mutation::DeleteAccount { id: "acc".into() }]).await;
            assert!(store.get_account("acc").await.unwrap().is_none());
            assert!(store.get_account("main").await.unwrap().is_none());
            assert_eq!(store.list_accounts().await.unwrap().len(), 1);
            // The group is no longer referenced, so it can go.
            apply_ok(&store, vec![Mutation::DeleteGroup { id: "g1".into() }]).await;
            assert!(store.list_groups().await.unwrap().is_empty());

            let err = apply_err(&store, vec![Mutation::DeleteAccount { id: "acc".into() }]).await;
            match err {
                StoreError::NotFound { kind, name } => {
                    assert_eq!(kind, ResourceKind::Account.as_str());
                    assert_eq!(name, "acc");
                }
                other => panic!("expected NotFound, got {other:?}"),
            }
            // The name can be reused after the delete.
            apply_ok(
                &store,
                vec![Mutation::InsertAccount(account("acc-3", "main", &[]))],
            )
            .await;
        }

        #[tokio::test]
        async fn deleting_a_group_in_use_is_refused() {
            let (store, _guard) = fresh().await;
            apply_ok(
                &store,
                vec![
                    Mutation::InsertGroup(group("g-key", "keyed")),
                    Mutation::InsertGroup(group("g-acc", "pooled")),
                    Mutation::InsertApiKey(api_key("k1", "key", "g-key")),
                    Mutation::InsertAccount(account("a1", "acct", &["g-acc"])),
                ],
            )
            .await;

            let err = apply_err(&store, vec![Mutation::DeleteGroup { id: "g-key".into() }]).await;
            assert_refused(&err, "InUse", "group \"keyed\" is still in use");
            let err = apply_err(&store, vec![Mutation::DeleteGroup { id: "g-acc".into() }]).await;
            assert_refused(&err, "InUse", "group \"pooled\" is still in use");
            let err = apply_err(&store, vec![Mutation::DeleteGroup { id: "g-none".into() }]).await;
            assert_refused(&err, "NotFound", "group \"g-none\" not found");

            // Moving the account elsewhere frees the group.
            apply_ok(&store, vec![Mutation::InsertGroup(group("g-new", "fresh"))]).await;
            let mut a = store.get_account("a1").await.unwrap().unwrap();
            let expect_revision = a.revision;
            a.group_ids = vec!["g-new".into()];
            apply_ok(
                &store,
                vec![
                    Mutation::UpdateAccount {
                        row: a,
                        expect_revision,
                    },
                    Mutation::DeleteGroup { id: "g-acc".into() },
                ],
            )
            .await;
            assert!(store.get_group("g-acc").await.unwrap().is_none());
            assert!(store.get_group("g-key").await.unwrap().is_some());
        }

        #[tokio::test]
        async fn groups_keep_fallbacks_in_order_and_their_state() {
            let (store, _guard) = fresh().await;
            apply_ok(
                &store,
                vec![
                    Mutation::InsertGroup(group("g-b", "bravo")),
                    Mutation::InsertGroup(group("g-c", "charlie")),
                ],
            )
            .await;
            // Created with fallbacks, in the order given (not sorted).
            let a = Group {
                fallback_ids: vec!["g-c".into(), "g-b".into()],
                ..group("g-a", "alpha")
            };
            let v1 = apply_ok(&store, vec![Mutation::InsertGroup(a.clone())]).await;
            let got = store.get_group("alpha").await.unwrap().unwrap();
            assert_eq!(got, group_at(&a, v1.revision));
            assert_eq!(got.state, GroupState::Active);

            // Paused, by whom and since when; the list reordered.
            let next = Group {
                fallback_ids: vec!["g-b".into(), "g-c".into()],
                state: GroupState::Paused,
                state_since: T0 + HOUR,
                state_by: "ops".into(),
                updated_at: T0 + HOUR,
                ..got.clone()
            };
            let v2 = apply_ok(
                &store,
                vec![Mutation::UpdateGroup {
                    row: next.clone(),
                    expect_revision: got.revision,
                }],
            )
            .await;
            assert_eq!(
                store.get_group("g-a").await.unwrap().unwrap(),
                group_at(&next, v2.revision)
            );
            let listed = store.list_groups().await.unwrap();
            assert_eq!(
                listed.iter().find(|g| g.id == "g-a"),
                Some(&group_at(&next, v2.revision))
            );
            let config = store.load_config().await.unwrap();
            let in_config = config.groups.iter().find(|g| g.id == "g-a").unwrap();
            assert_eq!(in_config.fallback_ids, ["g-b", "g-c"]);
            assert_eq!(
                (in_config.state, in_config.state_by.as_str()),
                (GroupState::Paused, "ops")
            );
            assert!(config
                .groups
                .iter()
                .filter(|g| g.id != "g-a")
                .all(|g| g.fallback_ids.is_empty()));

            // Activated, fallbacks cleared.
            let cleared = Group {
                fallback_ids: vec![],
                state: GroupState::Activated,
                ..group_at(&next, v2.revision)
            };
            let v3 = apply_ok(
                &store,
                vec![Mutation::UpdateGroup {
                    row: cleared.clone(),
                    expect_revision: v2.revision,
                }],
            )
            .await;
            assert_eq!(
                store.get_group("g-a").await.unwrap().unwrap(),
                group_at(&cleared, v3.revision)
            );
        }

        #[tokio::test]
        async fn fallbacks_that_are_unknown_repeated_self_or_cyclic_are_refused() {
            let (store, _guard) = fresh().await;
            let b = Group {
                fallback_ids: vec!["g-c".into()],
                ..group("g-b", "bravo")
            };
            apply_ok(
                &store,
                vec![
                    Mutation::InsertGroup(group("g-c", "charlie")),
                    Mutation::InsertGroup(b),
                    Mutation::InsertGroup(group("g-a", "alpha")),
                ],
            )
            .await;
            let a = store.get_group("g-a").await.unwrap().unwrap();
            let with = |f: &[&str]| Mutation::UpdateGroup {
                row: Group {
                    fallback_ids: f.iter().map(|x| x.to_string()).collect(),
                    ..a.clone()
                },
                expect_revision: a.revision,
            };
            let err = apply_err(&store, vec![with(&["g-nope"])]).await;
            assert_refused(&err, "NotFound", "group \"g-nope\" not found");
            let err = apply_err(&store, vec![with(&["g-a"])]).await;
            assert_refused(&err, "Invalid", "group \"alpha\" cannot be its own fallback");
            let err = apply_err(&store, vec![with(&["g-b", "g-b"])]).await;
            assert_refused(
                &err,
                "Invalid",
                "group \"bravo\" is named twice among \"alpha\"'s fallbacks",
            );
            // alpha → bravo is fine; then charlie → alpha would close alpha → bravo → charlie → alpha.
            let v = apply_ok(&store, vec![with(&["g-b"])]).await;
            let c = store.get_group("g-c").await.unwrap().unwrap();
            let err = apply_err(
                &store,
                vec![Mutation::UpdateGroup {
                    row: Group {
                        fallback_ids: vec!["g-a".into()],
                        ..c.clone()
                    },
                    expect_revision: c.revision,
                }],
            )
            .await;
            assert_refused(
                &err,
                "Invalid",
                "fallbacks may not form a cycle: charlie → alpha → bravo → charlie",
            );
            // Nothing was left half-written by the refusals.
            assert_eq!(
                store.get_group("g-a").await.unwrap().unwrap().fallback_ids,
                ["g-b"]
            );
            assert!(store.get_group("g-a").await.unwrap().unwrap().revision == v.revision);
        }

        #[tokio::test]
        async fn signed_out_console_sessions_are_remembered_until_they_expire() {
            let (store, _guard) = fresh().await;
            assert!(!store.console_session_ended("n-1").await.unwrap());
            store.end_console_session("n-1", 2_000, 1_000).await.unwrap();
            store.end_console_session("n-2", 5_000, 1_000).await.unwrap();
            // Twice is once.
            store.end_console_session("n-1", 2_000, 1_000).await.unwrap();
            assert!(store.console_session_ended("n-1").await.unwrap());
            assert!(store.console_session_ended("n-2").await.unwrap());
            assert!(!store.console_session_ended("n-3").await.unwrap());
            // Once n-1's cookie has expired (it is refused on its own), it is forgotten; n-2 not.
            store.end_console_session("n-3", 9_000, 3_000).await.unwrap();
            assert!(!store.console_session_ended("n-1").await.unwrap());
            assert!(store.console_session_ended("n-2").await.unwrap());
            assert!(store.console_session_ended("n-3").await.unwrap());
        }

        #[tokio::test]
        async fn deleting_a_group_that_is_a_fallback_is_refused() {
            let (store, _guard) = fresh().await;
            let a = Group {
                fallback_ids: vec!["g-b".into()],
                ..group("g-a", "alpha")
            };
            apply_ok(
                &store,
                vec![
                    Mutation::InsertGroup(group("g-b", "bravo")),
                    Mutation::InsertGroup(a),
                ],
            )
            .await;
            let err = apply_err(&store, vec![Mutation::DeleteGroup { id: "g-b".into() }]).await;
            assert_refused(&err, "InUse", "group \"bravo\" is still in use");
            // The group naming it can go (its list with it), and then the fallback too.
            apply_ok(&store, vec![Mutation::DeleteGroup { id: "g-a".into() }]).await;
            apply_ok(&store, vec![Mutation::DeleteGroup { id: "g-b".into() }]).await;
            assert!(store
                .list_groups()
                .await
                .unwrap()
                .iter()
                .all(|g| g.id != "g-a" && g.id != "g-b"));
        }

        #[tokio::test]
        async fn load_config_returns_what_was_written() {
            let (store, _guard) = fresh().await;
            let g1 = group("g1", "default");
            let g2 = group("g2", "batch");
            let v1 = apply_ok(
                &store,
                vec![
                    Mutation::InsertGroup(g1.clone()),
                    Mutation::InsertGroup(g2.clone()),
                ],
            )
            .await;
            let a1 = account("a1", "primary", &["g2", "g1"]);
            let a2 = oauth_account("a2", "backup", &["g1"]);
            let mut k1 = api_key("k1", "web", "g1");
            k1.allowed_models = vec!["claude-opus-4-1".into()];
            let k2 = api_key("k2", "app", "g2");
            let p1 = price("p1", "claude-sonnet-*", T0);
            let p0 = price("p0", "claude-opus-*", T0);
            let v2 = apply_ok(
                &store,
                vec![
                    Mutation::InsertAccount(a1.clone()),
                    Mutation::InsertAccount(a2.clone()),
                    Mutation::InsertApiKey(k1.clone()),
                    Mutation::InsertApiKey(k2.clone()),
                    Mutation::UpsertPrice(p1.clone()),
                    Mutation::UpsertPrice(p0.clone()),
                    setting("retry.max_attempts", "3"),
                    setting("log.level", "info"),
                    Mutation::InsertAdminToken(admin_token("t1", "ops", Role::Admin)),
                ],
            )
            .await;

            let config = store.load_config().await.unwrap();
            let expected = ConfigState {
                version: v2,
                api_keys: vec![key_at(&k2, v2.revision), key_at(&k1, v2.revision)],
                accounts: vec![acc_at(&a2, v2.revision), acc_at(&a1, v2.revision)],
                groups: vec![group_at(&g2, v1.revision), group_at(&g1, v1.revision)],
                prices: vec![price_at(&p0, v2.revision), price_at(&p1, v2.revision)],
                settings: [("log.level", "info"), ("retry.max_attempts", "3")]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                account_states: vec![],
                capture_rules: vec![],
            };
            assert_eq!(config, expected);
            assert_eq!(config.version, store.head().await.unwrap());

            // The list/get reads agree with the snapshot.
            assert_eq!(store.list_accounts().await.unwrap(), expected.accounts);
            assert_eq!(store.list_api_keys().await.unwrap(), expected.api_keys);
            assert_eq!(store.list_groups().await.unwrap(), expected.groups);
            assert_eq!(store.list_prices().await.unwrap(), expected.prices);
            assert_eq!(store.settings().await.unwrap(), expected.settings);
        }

        #[tokio::test]
        async fn account_states_upsert_clear_and_cascade() {
            let (store, _guard) = fresh().await;
            apply_ok(&store, vec![Mutation::InsertGroup(group("g1", "one"))]).await;
            apply_ok(
                &store,
                vec![Mutation::InsertAccount(account("a1", "acct-1", &["g1"]))],
            )
            .await;
            let st = |health: AccountHealth, scope: &str, until: Millis| AccountState {
                account_id: "a1".into(),
                scope: scope.into(),
                health,
                reason: "429 from upstream".into(),
                until,
                since: T0,
                reported_by: "dp-1".into(),
                revision: 0,
            };
            apply_ok(
                &store,
                vec![Mutation::SetAccountState(st(
                    AccountHealth::RateLimited,
                    "",
                    T0 + HOUR,
                ))],
            )
            .await;
            let v2 = apply_ok(
                &store,
                vec![Mutation::SetAccountState(st(
                    AccountHealth::Overloaded,
                    "opus",
                    T0 + 60_000,
                ))],
            )
            .await;
            // Upsert: same (account, scope) replaces.
            let v3 = apply_ok(
                &store,
                vec![Mutation::SetAccountState(st(AccountHealth::Unauthorized, "", 0))],
            )
            .await;
            let states = store.list_account_states().await.unwrap();
            assert_eq!(states.len(), 2);
            assert_eq!(states[0].scope, "");
            assert_eq!(states[0].health, AccountHealth::Unauthorized);
            assert_eq!(states[0].until, 0);
            assert_eq!(states[0].revision, v3.revision);
            assert_eq!(states[1].scope, "opus");
            assert_eq!(states[1].revision, v2.revision);
            assert_eq!(store.load_config().await.unwrap().account_states, states);
            // A state for an unknown account is refused, nothing changes.
            let mut ghost = st(AccountHealth::Blocked, "", 0);
            ghost.account_id = "ghost".into();
            let err = apply_err(&store, vec![Mutation::SetAccountState(ghost)]).await;
            assert_refused(&err, "NotFound", "account \"ghost\" not found");
            apply_ok(
                &store,
                vec![Mutation::ClearAccountState {
                    account_id: "a1".into(),
                    scope: "opus".into(),
                }],
            )
            .await;
            assert_eq!(store.list_account_states().await.unwrap().len(), 1);
            // A state seen before a reset (a lower reset generation) does not land.
            let mut acc = store.get_account("a1").await.unwrap().unwrap();
            let rev = acc.revision;
            acc.reset_generation = 2;
            apply_ok(
                &store,
                vec![Mutation::UpdateAccount {
                    row: acc,
                    expect_revision: rev,
                }],
            )
            .await;
            let head = store.head().await.unwrap();
            let guard = |at_most| Mutation::RequireResetGeneration {
                account_id: "a1".into(),
                at_most,
            };
            let err = apply_err(
                &store,
                vec![
                    guard(1),
                    Mutation::SetAccountState(st(AccountHealth::Blocked, "x", 0)),
                ],
            )
            .await;
            assert_refused(
                &err,
                "Conflict",
                "concurrent modification of account \"a1\"; another change to it kept landing first",
            );
            assert_eq!(store.head().await.unwrap(), head, "nothing applied");
            apply_ok(
                &store,
                vec![
                    guard(2),
                    Mutation::SetAccountState(st(AccountHealth::Blocked, "x", 0)),
                ],
            )
            .await;
            assert_eq!(store.list_account_states().await.unwrap().len(), 2);
            // Deleting the account deletes its states.
            apply_ok(&store, vec![Mutation::DeleteAccount { id: "a1".into() }]).await;
            assert!(store.list_account_states().await.unwrap().is_empty());
        }

        #[tokio::test]
        async fn audit_is_newest_first_with_actor_action_target() {
            let (store, _guard) = fresh().await;
            let start = now_ms();
            let mut versions = vec![];
            for (i, action) in ["group.create", "account.create", "key.create"]
                .iter()
                .enumerate()
            {
                let record = AuditRecord {
                    actor: format!("admin:user{i}"),
                    action: action.to_string(),
                    target: format!("target-{i}"),
                    detail: format!(r#"{{"n":{i}}}"#),
                };
                versions.push(
                    store
                        .apply(vec![setting("n", &i.to_string())], record)
                        .await
                        .unwrap(),
                );
            }
            let end = now_ms();

            let entries = store.list_audit(100, None).await.unwrap();
            assert_eq!(entries.len(), 3);
            for (entry, i) in entries.iter().zip([2usize, 1, 0]) {
                assert_eq!(entry.actor, format!("admin:user{i}"));
                assert_eq!(entry.target, format!("target-{i}"));
                assert_eq!(entry.detail, format!(r#"{{"n":{i}}}"#));
                assert_eq!(entry.revision, versions[i].revision);
                assert!(
                    entry.at >= start && entry.at <= end,
                    "at {} not in [{start}, {end}]",
                    entry.at
                );
            }
            let actions: Vec<&str> = entries.iter().map(|e| e.action.as_str()).collect();
            assert_eq!(actions, ["key.create", "account.create", "group.create"]);
            let ids: BTreeSet<u64> = entries.iter().map(|e| e.id).collect();
            assert_eq!(ids.len(), 3, "audit ids are unique");
            assert!(entries.windows(2).all(|w| w[0].at >= w[1].at));

            let limited = store.list_audit(2, None).await.unwrap();
            assert_eq!(limited, entries[..2]);
            assert_eq!(store.list_audit(100, Some(start)).await.unwrap(), entries);
            assert!(store.list_audit(100, Some(end + HOUR)).await.unwrap().is_empty());
            let oldest_at = entries[2].at;
            let since_oldest = store.list_audit(100, Some(oldest_at + 1)).await.unwrap();
            assert!(since_oldest.iter().all(|e| e.at > oldest_at));

            // By revision: the entry each change wrote (what `token list` reads a source from).
            let mut at = store
                .audit_at_revisions(&[versions[0].revision, versions[2].revision, 999_999])
                .await
                .unwrap();
            at.sort_by_key(|e| e.revision);
            let targets: Vec<&str> = at.iter().map(|e| e.target.as_str()).collect();
            assert_eq!(targets, ["target-0", "target-2"]);
            assert!(store.audit_at_revisions(&[]).await.unwrap().is_empty());
        }

        #[tokio::test]
        async fn proxy_events_recorded_in_one_batch_apply_in_order_or_not_at_all() {
            let (store, _guard) = fresh().await;
            store.record_proxies(&[]).await.unwrap();
            assert!(store.list_proxies().await.unwrap().is_empty());
            let v5 = Version {
                epoch: 2,
                revision: 5,
            };
            let connected = |b: &str| ProxyEvent::Connected {
                build_version: b.into(),
                held: None,
            };
            let acked = |v: Version| ProxyEvent::Acked {
                version: v,
                rejected: vec![],
            };
            let rec = |n: &str, r: &str, e: ProxyEvent| (n.to_string(), r.to_string(), e);
            store
                .record_proxies(&[
                    rec("dp-1", "cp-1", connected("1.0")),
                    rec("dp-2", "cp-1", connected("1.1")),
                    rec("dp-1", "cp-1", acked(v5)),
                    rec("dp-2", "cp-1", acked(v5)),
                    rec("dp-1", "cp-1", ProxyEvent::Disconnected),
                ])
                .await
                .unwrap();
            let p = store.list_proxies().await.unwrap();
            let got: Vec<_> = p
                .iter()
                .map(|p| (p.node_id.as_str(), p.build_version.as_str(), p.connected, p.acked))
                .collect();
            assert_eq!(
                got,
                [("dp-1", "1.0", false, Some(v5)), ("dp-2", "1.1", true, Some(v5))],
                "every event applied, each node's in the order given"
            );
            // A batch with one event the store cannot hold records nothing of the batch.
            let v6 = Version {
                epoch: 2,
                revision: 6,
            };
            let err = store
                .record_proxies(&[
                    rec("dp-2", "cp-1", acked(v6)),
                    rec(
                        "dp-3",
                        "cp-1",
                        acked(Version {
                            epoch: u64::MAX,
                            revision: 1,
                        }),
                    ),
                ])
                .await
                .unwrap_err();
            assert_refused(&err, "Invalid", "epoch 18446744073709551615 is out of range");
            let p = store.list_proxies().await.unwrap();
            assert_eq!(p.len(), 2, "no row for dp-3");
            assert_eq!(
                p[1].acked,
                Some(v5),
                "dp-2's ack of the same batch is not kept either"
            );
            // Runs of one kind hold several events of a node: its last counts, and an ACK after a
            // NACK of the same version clears the NACK.
            let v7 = Version {
                epoch: 2,
                revision: 7,
            };
            store
                .record_proxies(&[
                    rec(
                        "dp-2",
                        "cp-1",
                        ProxyEvent::Nacked {
                            version: v7,
                            serving: Some(v5),
                            error: "bad".into(),
                        },
                    ),
                    rec("dp-1", "cp-1", acked(v6)),
                    rec("dp-1", "cp-1", acked(v7)),
                    rec("dp-1", "cp-1", connected("2.0")),
                    rec("dp-1", "cp-1", connected("2.1")),
                ])
                .await
                .unwrap();
            let p = store.list_proxies().await.unwrap();
            assert_eq!(
                (p[0].acked, p[0].build_version.as_str(), p[0].connected),
                (Some(v7), "2.1", true)
            );
            assert_eq!((p[1].acked, p[1].nack_version), (Some(v5), Some(v7)));
            assert_eq!(p[1].nack_error, "bad");
            store
                .record_proxies(&[rec("dp-2", "cp-1", acked(v6)), rec("dp-2", "cp-1", acked(v7))])
                .await
                .unwrap();
            let p = store.list_proxies().await.unwrap();
            assert_eq!(
                (p[1].acked, p[1].nack_version),
                (Some(v7), None),
                "the NACK is history"
            );
            assert_eq!(p[1].nack_error, "");
        }

        #[tokio::test]
        async fn proxies_reflect_connect_ack_nack_disconnect() {
            let (store, _guard) = fresh().await;
            assert!(store.list_proxies().await.unwrap().is_empty());
            let before = now_ms();
            let held = Version {
                epoch: 7,
                revision: 3,
            };
            store
                .record_proxy(
                    "dp-b",
                    "cp-1",
                    ProxyEvent::Connected {
                        build_version: "1.4.0".into(),
                        held: Some(held),
                    },
                )
                .await
                .unwrap();
            let p = store.list_proxies().await.unwrap();
            assert_eq!(p.len(), 1);
            assert_eq!(p[0].node_id, "dp-b");
            assert_eq!(p[0].build_version, "1.4.0");
            assert!(p[0].connected);
            assert_eq!(p[0].replica, "cp-1");
            assert_eq!(p[0].acked, None, "a connect does not count as an ack");
            assert_eq!(p[0].nack_version, None);
            assert!(p[0].last_seen >= before);

            let v5 = Version {
                epoch: 7,
                revision: 5,
            };
            let rejected = vec![Rejected {
                kind: "account".into(),
                id: "acc-1".into(),
                error: "unusable proxy URL".into(),
            }];
            store
                .record_proxy(
                    "dp-b",
                    "cp-1",
                    ProxyEvent::Acked {
                        version: v5,
                        rejected: rejected.clone(),
                    },
                )
                .await
                .unwrap();
            let p = &store.list_proxies().await.unwrap()[0];
            assert_eq!(p.acked, Some(v5));
            assert_eq!(
                p.rejected, rejected,
                "what the data plane could not use is kept with the ack"
            );
            assert!(p.connected);

            let v6 = Version {
                epoch: 7,
                revision: 6,
            };
            store
                .record_proxy(
                    "dp-b",
                    "cp-1",
                    ProxyEvent::Nacked {
                        version: v6,
                        serving: Some(v5),
                        error: "bad route".into(),
                    },
                )
                .await
                .unwrap();
            let p = store.list_proxies().await.unwrap().remove(0);
            assert_eq!(
                p.nack_version,
                Some(v6),
                "the version refused, not the one served"
            );
            assert_eq!(p.nack_error, "bad route");
            assert!(p.nack_at >= before);
            assert_eq!(p.acked, Some(v5), "a nack leaves the last ack");
            store
                .record_proxy(
                    "dp-b",
                    "cp-1",
                    ProxyEvent::Acked {
                        version: v5,
                        rejected: vec![],
                    },
                )
                .await
                .unwrap();
            let p = store.list_proxies().await.unwrap().remove(0);
            assert_eq!(p.nack_version, Some(v6), "an older ack leaves the nack");
            assert!(p.rejected.is_empty());

            store
                .record_proxy(
                    "dp-b",
                    "cp-1",
                    ProxyEvent::Acked {
                        version: v6,
                        rejected: vec![],
                    },
                )
                .await
                .unwrap();
            let p = store.list_proxies().await.unwrap().remove(0);
            assert_eq!(
                (p.nack_version, p.nack_error.as_str(), p.nack_at),
                (None, "", 0),
                "current again: the nack is cleared"
            );

            // A stale stream on another replica closing does not disconnect it.
            store
                .record_proxy("dp-b", "cp-2", ProxyEvent::Disconnected)
                .await
                .unwrap();
            let p = store.list_proxies().await.unwrap().remove(0);
            assert!(p.connected);
            assert_eq!(p.replica, "cp-1");

            let last_seen = p.last_seen;
            store
                .record_proxy("dp-b", "cp-1", ProxyEvent::Disconnected)
                .await
                .unwrap();
            let p = store.list_proxies().await.unwrap().remove(0);
            assert!(!p.connected);
            assert_eq!(p.acked, Some(v6), "disconnect keeps the last ack");
            assert_eq!(p.build_version, "1.4.0");
            assert!(p.last_seen >= last_seen);

            // Reconnect on another replica, with a new build.
            store
                .record_proxy(
                    "dp-b",
                    "cp-2",
                    ProxyEvent::Connected {
                        build_version: "1.5.0".into(),
                        held: Some(v6),
                    },
                )
                .await
                .unwrap();
            store
                .record_proxy(
                    "dp-a",
                    "cp-1",
                    ProxyEvent::Connected {
                        build_version: "1.5.0".into(),
                        held: None,
                    },
                )
                .await
                .unwrap();
            let all = store.list_proxies().await.unwrap();
            let nodes: Vec<&str> = all.iter().map(|p| p.node_id.as_str()).collect();
            assert_eq!(nodes, ["dp-a", "dp-b"]);
            assert!(all.iter().all(|p| p.connected && p.build_version == "1.5.0"));
            assert_eq!(all[1].replica, "cp-2");
            assert_eq!(all[1].acked, Some(v6));
            assert_eq!(all[0].acked, None);

            // Seen: only the replica serving it refreshes it; a data plane whose replica died
            // (no disconnect recorded, no longer seen) is not live, whatever the stored flag says.
            let now = now_ms();
            let b = all[1].clone();
            assert!(b.live(now));
            assert!(!b.live(b.last_seen + relay_control_plane::model::PROXY_STALE_AFTER_MS + 1));
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            store
                .record_proxy("dp-b", "cp-1", ProxyEvent::Seen)
                .await
                .unwrap();
            let p = store.list_proxies().await.unwrap().remove(1);
            assert_eq!(
                p.last_seen, b.last_seen,
                "another replica's tick does not refresh it"
            );
            store
                .record_proxy("dp-b", "cp-2", ProxyEvent::Seen)
                .await
                .unwrap();
            let p = store.list_proxies().await.unwrap().remove(1);
            assert!(p.last_seen > b.last_seen, "the serving replica's tick does");
            assert!(p.connected);
            store
                .record_proxy("dp-b", "cp-2", ProxyEvent::Disconnected)
                .await
                .unwrap();
            let seen = store.list_proxies().await.unwrap().remove(1).last_seen;
            store
                .record_proxy("dp-b", "cp-2", ProxyEvent::Seen)
                .await
                .unwrap();
            let p = store.list_proxies().await.unwrap().remove(1);
            assert!(
                !p.connected && p.last_seen == seen,
                "a late tick does not reconnect it"
            );
        }

        #[tokio::test]
        async fn usage_is_deduplicated_and_summed() {
            let (store, _guard) = fresh().await;
            apply_ok(
                &store,
                vec![
                    Mutation::InsertGroup(group("g1", "one")),
                    Mutation::InsertApiKey(api_key("key-a", "web", "g1")),
                    Mutation::InsertApiKey(api_key("key-b", "batch", "g1")),
                    Mutation::InsertAccount(account("acc-1", "primary", &["g1"])),
                    Mutation::InsertAccount(account("acc-2", "backup", &["g1"])),
                ],
            )
            .await;
            let key_names: BTreeMap<&str, &str> = [("key-a", "web"), ("key-b", "batch")].into();
            let account_names: BTreeMap<&str, &str> = [("acc-1", "primary"), ("acc-2", "backup")].into();

            let h0 = (T0 / HOUR) * HOUR;
            let sonnet = "claude-sonnet-4-5";
            let haiku = "claude-haiku-4-5";
            let events = vec![
                usage(1, h0 + 1, "key-a", "acc-1", sonnet, 200, ""),
                usage(2, h0 + 10 * 60_000, "key-a", "acc-2", haiku, 200, ""),
                usage(
                    3,
                    h0 + HOUR - 1,
                    "key-b",
                    "acc-1",
                    sonnet,
                    529,
                    "overloaded_error",
                ),
                usage(4, h0 + HOUR, "key-b", "acc-1", sonnet, 200, "api_error"),
                usage(5, h0 + HOUR + 5, "key-a", "acc-2", haiku, 429, "rate_limit_error"),
                usage(6, h0 + 2 * HOUR + 7, "key-gone", "acc-gone", sonnet, 200, ""),
                usage(7, h0 + 2 * HOUR + 8, "key-b", "acc-2", haiku, 200, ""),
            ];

            assert!(store.query_usage(UsageQuery::default()).await.unwrap().is_empty());
            assert_eq!(store.insert_usage(&[]).await.unwrap(), IngestResult::default());

            let first = store.insert_usage(&events[..4]).await.unwrap();
            assert_eq!(
                first,
                IngestResult {
                    inserted: 4,
                    duplicates: 0
                }
            );
            // A retried batch is all duplicates; a batch overlapping it is partly new.
            let again = store.insert_usage(&events[..4]).await.unwrap();
            assert_eq!(
                again,
                IngestResult {
                    inserted: 0,
                    duplicates: 4
                }
            );
            let mut overlap = events[2..].to_vec();
            overlap.push(events[6].clone()); // duplicated within the batch too
            let third = store.insert_usage(&overlap).await.unwrap();
            assert_eq!(
                third,
                IngestResult {
                    inserted: 3,
                    duplicates: 3
                }
            );

            // Hand-checked grand total.
            let total = store.query_usage(UsageQuery::default()).await.unwrap();
            let n_sum: u64 = (1..=7).sum();
            assert_eq!(
                total,
                [UsageRow {
                    bucket_start: 0,
                    group: String::new(),
                    group_id: String::new(),
                    requests: 7,
                    input_tokens: 7 * 1_000 + n_sum,
                    output_tokens: 7 * 20_000 + 3 * n_sum,
                    cache_write_5m_tokens: 7 * 300_000 + 7 * n_sum,
                    cache_write_1h_tokens: 7 * 4_000_000 + 11 * n_sum,
                    cache_read_tokens: 7 * 50_000_000 + 13 * n_sum,
                    cost_pico_usd: 7 * 6_000_000_000 + 17 * n_sum,
                    errors: 3,
                    anomalies: 1,
                }]
            );

            // Hand-checked per-key rows (ordered by group name; a deleted key shows its id).
            let by_key = store
                .query_usage(UsageQuery {
                    group_by: UsageGroupBy::Key,
                    ..UsageQuery::default()
                })
                .await
                .unwrap();
            let summary: Vec<(&str, &str, u64, u64, u64)> = by_key
                .iter()
                .map(|r| {
                    (
                        r.group.as_str(),
                        r.group_id.as_str(),
                        r.requests,
                        r.input_tokens,
                        r.errors,
                    )
                })
                .collect();
            assert_eq!(
                summary,
                [
                    ("batch", "key-b", 3, 3_000 + 3 + 4 + 7, 2),
                    ("key-gone", "key-gone", 1, 1_006, 0),
                    ("web", "key-a", 3, 3_000 + 1 + 2 + 5, 1),
                ]
            );

            // Every grouping, bucket and window against the in-memory oracle.
            let windows = [
                (None, None),
                (Some(h0 + HOUR), None),
                (None, Some(h0 + HOUR)),
                (Some(h0 + 10 * 60_000), Some(h0 + 2 * HOUR + 8)),
                (Some(h0 + 3 * HOUR), None),
            ];
            for group_by in [
                UsageGroupBy::None,
                UsageGroupBy::Key,
                UsageGroupBy::Account,
                UsageGroupBy::Model,
            ] {
                for bucket in [UsageBucket::None, UsageBucket::Hour, UsageBucket::Day] {
                    for (since, until) in windows {
                        let q = UsageQuery {
                            group_by,
                            since,
                            until,
                            bucket,
                        };
                        let got = store.query_usage(q).await.unwrap();
                        let want = expected_usage(&events, q, &key_names, &account_names);
                        assert_eq!(got, want, "query {q:?}");
                    }
                }
            }

            // Spot-check hourly buckets by model.
            let hourly = store
                .query_usage(UsageQuery {
                    group_by: UsageGroupBy::Model,
                    bucket: UsageBucket::Hour,
                    ..UsageQuery::default()
                })
                .await
                .unwrap();
            let shape: Vec<(Millis, &str, u64)> = hourly
                .iter()
                .map(|r| (r.bucket_start, r.group.as_str(), r.requests))
                .collect();
            assert_eq!(
                shape,
                [
                    (h0, haiku, 1),
                    (h0, sonnet, 2),
                    (h0 + HOUR, haiku, 1),
                    (h0 + HOUR, sonnet, 1),
                    (h0 + 2 * HOUR, haiku, 1),
                    (h0 + 2 * HOUR, sonnet, 1),
                ]
            );
            assert!(hourly.iter().all(|r| r.group == r.group_id));
        }

        #[tokio::test]
        async fn quotas_keep_the_newest_observation_of_existing_accounts() {
            let (store, _guard) = fresh().await;
            apply_ok(&store, vec![Mutation::InsertAccount(account("a1", "one", &[]))]).await;
            let head = store.head().await.unwrap();
            let q = |at: i64, used: f64| AccountQuota {
                account_id: "a1".into(),
                observed_at: at,
                observed_by: "dp-1".into(),
                status: "allowed".into(),
                reset_at: 77,
                windows: vec![QuotaWindow {
                    name: "5h".into(),
                    utilization: used,
                    reset_ms: 99,
                    status: "allowed".into(),
                }],
            };
            store.upsert_quotas(&[q(10, 0.5)]).await.unwrap();
            store.upsert_quotas(&[q(5, 0.9)]).await.unwrap();
            assert_eq!(
                store.list_quotas().await.unwrap(),
                vec![q(10, 0.5)],
                "an older observation never wins"
            );
            store.upsert_quotas(&[q(20, 0.7)]).await.unwrap();
            assert_eq!(store.list_quotas().await.unwrap(), vec![q(20, 0.7)]);
            // An account that does not exist (deleted meanwhile) is skipped, not an error.
            let mut ghost = q(30, 0.1);
            ghost.account_id = "ghost".into();
            store.upsert_quotas(&[ghost]).await.unwrap();
            assert_eq!(store.list_quotas().await.unwrap().len(), 1);
            assert_eq!(store.head().await.unwrap(), head, "quotas are not config");
            // They go with the account.
            apply_ok(&store, vec![Mutation::DeleteAccount { id: "a1".into() }]).await;
            assert!(store.list_quotas().await.unwrap().is_empty());
        }

        #[tokio::test]
        async fn oauth_answers_are_kept_until_dropped() {
            let (store, _guard) = fresh().await;
            apply_ok(&store, vec![Mutation::InsertAccount(account("a1", "one", &[]))]).await;
            let p = |hash: &str, sealed: &[u8]| OAuthPending {
                account_id: "a1".into(),
                from_hash: hash.into(),
                sealed: sealed.to_vec(),
                created_at: T0,
            };
            store.stash_oauth(&p("h1", b"first")).await.unwrap();
            store.stash_oauth(&p("h1", b"again")).await.unwrap();
            store.stash_oauth(&p("h2", b"other")).await.unwrap();
            let mut got = store.list_oauth_pending().await.unwrap();
            got.sort_by(|a, b| a.from_hash.cmp(&b.from_hash));
            assert_eq!(got, vec![p("h1", b"again"), p("h2", b"other")]);
            store.drop_oauth_pending("a1", "h1").await.unwrap();
            assert_eq!(store.list_oauth_pending().await.unwrap(), vec![p("h2", b"other")]);
            let mut ghost = p("h3", b"x");
            ghost.account_id = "ghost".into();
            let err = store.stash_oauth(&ghost).await.unwrap_err();
            assert_refused(&err, "NotFound", "account \"ghost\" not found");
        }

        #[tokio::test]
        async fn spend_by_key_sums_cost_in_a_half_open_range() {
            let (store, _guard) = fresh().await;
            let day = 86_400_000;
            let cost = |e: &UsageEvent| e.cost_pico_usd;
            let events = vec![
                usage(1, T0 - 1, "key-a", "acc-1", "m", 200, ""),
                usage(2, T0, "key-a", "acc-1", "m", 200, ""),
                usage(3, T0 + HOUR, "key-a", "acc-1", "m", 529, "overloaded_error"),
                usage(4, T0 + 2 * HOUR, "key-b", "acc-2", "m", 200, ""),
                usage(5, T0 + day - 1, "key-b", "acc-2", "m", 200, ""),
                usage(6, T0 + day, "key-b", "acc-2", "m", 200, ""),
            ];
            store.insert_usage(&events).await.unwrap();
            // A resent event counts once.
            store.insert_usage(&events[1..2]).await.unwrap();
            let got = store.spend_by_key(T0, T0 + day).await.unwrap();
            let want: BTreeMap<String, u64> = [
                ("key-a".to_string(), cost(&events[1]) + cost(&events[2])),
                ("key-b".to_string(), cost(&events[3]) + cost(&events[4])),
            ]
            .into();
            assert_eq!(
                got, want,
                "since is inclusive, until exclusive; failed requests cost what they cost"
            );
            let later = store.spend_by_key(T0 + day, T0 + 2 * day).await.unwrap();
            assert_eq!(later, BTreeMap::from([("key-b".to_string(), cost(&events[5]))]));
            assert!(store
                .spend_by_key(T0 + 3 * day, T0 + 4 * day)
                .await
                .unwrap()
                .is_empty());
            // Sums near the top of BIGINT saturate instead of failing.
            let big = (i64::MAX / 2) as u64 + 1;
            let mut huge = Vec::new();
            for n in 0..3 {
                let mut e = usage(10 + n, T0 + 5 * day, "key-big", "acc-1", "m", 200, "");
                e.cost_pico_usd = big;
                huge.push(e);
            }
            store.insert_usage(&huge).await.unwrap();
            let got = store.spend_by_key(T0 + 5 * day, T0 + 6 * day).await.unwrap();
            assert_eq!(got.get("key-big"), Some(&(i64::MAX as u64)));
        }

        #[tokio::test]
        async fn usage_sums_saturate_instead_of_failing() {
            // Rows near the top of BIGINT (a store written before ingest bounded counts, or many
            // rows at the bound): every report still answers, saturated at i64::MAX.
            let (store, _guard) = fresh().await;
            let big = (i64::MAX / 2) as u64 + 1;
            let mut events = Vec::new();
            for n in 0..3 {
                let mut e = usage(
                    n,
                    1_000 + n as i64,
                    "key-a",
                    "acc-1",
                    "claude-sonnet-4-5",
                    200,
                    "",
                );
                e.input_tokens = big;
                e.cost_pico_usd = big;
                events.push(e);
            }
            store.insert_usage(&events).await.unwrap();
            for group_by in [UsageGroupBy::None, UsageGroupBy::Key, UsageGroupBy::Model] {
                let rows = store
                    .query_usage(UsageQuery {
                        group_by,
                        ..UsageQuery::default()
                    })
                    .await
                    .unwrap();
                assert_eq!(rows.len(), 1);
                assert_eq!(rows[0].requests, 3);
                assert_eq!(rows[0].input_tokens, i64::MAX as u64);
                assert_eq!(rows[0].cost_pico_usd, i64::MAX as u64);
                assert_eq!(rows[0].output_tokens, 3 * 20_000 + 3 * 3);
            }
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn concurrent_applies_get_consecutive_revisions() {
            let (store, _guard) = fresh().await;
            let tasks: Vec<_> = (0..50)
                .map(|i| {
                    let store = Arc::clone(&store);
                    tokio::spawn(async move {
                        store
                            .apply(
                                vec![
                                    setting(&format!("s{i:02}"), &i.to_string()),
                                    Mutation::InsertGroup(group(&format!("g{i:02}"), &format!("group {i:02}"))),
                                ],
                                audit("concurrent", &format!("g{i:02}")),
                            )
                            .await
                            .unwrap()
                    })
                })
                .collect();
            let mut revisions = vec![];
            for t in tasks {
                revisions.push(t.await.unwrap().revision);
            }
            revisions.sort_unstable();
            assert_eq!(
                revisions,
                (1..=50).collect::<Vec<u64>>(),
                "each apply got its own revision"
            );
            assert_eq!(store.head().await.unwrap().revision, 50);

            // Each revision holds one task's group and setting, from the same task.
            let audit = store.list_audit(1000, None).await.unwrap();
            let mut per_rev: BTreeMap<u64, &str> = BTreeMap::new();
            for e in &audit {
                assert!(
                    per_rev.insert(e.revision, e.target.as_str()).is_none(),
                    "revision {} twice",
                    e.revision
                );
            }
            assert_eq!(
                per_rev.keys().copied().collect::<Vec<_>>(),
                (1..=50).collect::<Vec<u64>>()
            );
            let config = store.load_config().await.unwrap();
            for g in &config.groups {
                assert_eq!(
                    per_rev.get(&g.revision).copied(),
                    Some(g.id.as_str()),
                    "group {} mixes two applies",
                    g.id
                );
            }

            let config = store.load_config().await.unwrap();
            assert_eq!(config.groups.len(), 50);
            assert_eq!(config.settings.len(), 50);
            assert_eq!(store.list_audit(1000, None).await.unwrap().len(), 50);
        }

        #[tokio::test]
        async fn settings_upsert() {
            let (store, _guard) = fresh().await;
            apply_ok(&store, vec![setting("a", "1"), setting("b", "2")]).await;
            apply_ok(&store, vec![setting("a", "10")]).await;
            // The last write in one apply wins.
            apply_ok(&store, vec![setting("c", "x"), setting("c", "y")]).await;
            let s = store.settings().await.unwrap();
            let want: BTreeMap<String, String> = [("a", "10"), ("b", "2"), ("c", "y")]
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect();
            assert_eq!(s, want);
            assert_eq!(store.load_config().await.unwrap().settings, want);
        }

        #[tokio::test]
        async fn prices_upsert_and_order() {
            let (store, _guard) = fresh().await;
            let later = price("p-sonnet-2", "claude-sonnet-*", T0 + 30 * 24 * HOUR);
            let earlier = price("p-sonnet-1", "claude-sonnet-*", T0);
            let mut opus = price("p-opus", "claude-opus-*", T0);
            opus.source = "builtin".into();
            let v1 = apply_ok(
                &store,
                vec![
                    Mutation::UpsertPrice(later.clone()),
                    Mutation::UpsertPrice(earlier.clone()),
                    Mutation::UpsertPrice(opus.clone()),
                ],
            )
            .await;
            assert_eq!(
                store.list_prices().await.unwrap(),
                [
                    price_at(&opus, v1.revision),
                    price_at(&earlier, v1.revision),
                    price_at(&later, v1.revision)
                ]
            );

            // Same id: replaced in place, with the new revision.
            let mut cheaper = earlier.clone();
            cheaper.input = 1_000_000;
            cheaper.cache_read = 100_000;
            cheaper.source = "operator".into();
            let v2 = apply_ok(&store, vec![Mutation::UpsertPrice(cheaper.clone())]).await;
            assert_eq!(
                store.list_prices().await.unwrap(),
                [
                    price_at(&opus, v1.revision),
                    price_at(&cheaper, v2.revision),
                    price_at(&later, v1.revision)
                ]
            );

            // Another id for an existing (pattern, effective_from) is a duplicate.
            let err = apply_err(
                &store,
                vec![Mutation::UpsertPrice(price("p-dup", "claude-opus-*", T0))],
            )
            .await;
            assert_refused(
                &err,
                "AlreadyExists",
                &format!("price \"claude-opus-*@{T0}\" already exists"),
            );
        }

        #[tokio::test]
        async fn admin_tokens_insert_find_delete() {
            let (store, _guard) = fresh().await;
            let ops = admin_token("t-1", "ops", Role::Admin);
            let dash = admin_token("t-2", "dashboard", Role::ReadOnly);
            let dp = admin_token("t-3", "data-plane", Role::DataPlane);
            let v = apply_ok(
                &store,
                vec![
                    Mutation::InsertAdminToken(ops.clone()),
                    Mutation::InsertAdminToken(dash.clone()),
                    Mutation::InsertAdminToken(dp.clone()),
                ],
            )
            .await;
            assert_eq!(
                store.list_admin_tokens().await.unwrap(),
                [
                    token_at(&dash, v.revision),
                    token_at(&dp, v.revision),
                    token_at(&ops, v.revision)
                ]
            );
            assert_eq!(
                store.find_admin_token(&ops.token_hash).await.unwrap(),
                Some(token_at(&ops, v.revision))
            );
            assert_eq!(
                store
                    .find_admin_token(&dp.token_hash)
                    .await
                    .unwrap()
                    .unwrap()
                    .role,
                Role::DataPlane
            );
            assert_eq!(store.find_admin_token("no-such-hash").await.unwrap(), None);
            // Lookup is by hash only, not by id or name.
            assert_eq!(store.find_admin_token("t-1").await.unwrap(), None);
            assert_eq!(store.find_admin_token("ops").await.unwrap(), None);

            let err = apply_err(
                &store,
                vec![Mutation::InsertAdminToken(admin_token(
                    "t-4",
                    "ops",
                    Role::ReadOnly,
                ))],
            )
            .await;
            assert_refused(&err, "AlreadyExists", "admin token \"ops\" already exists");
            let mut same_hash = admin_token("t-5", "other", Role::ReadOnly);
            same_hash.token_hash = ops.token_hash.clone();
            let err = apply_err(&store, vec![Mutation::InsertAdminToken(same_hash)]).await;
            assert_refused(&err, "AlreadyExists", "admin token \"other\" already exists");

            apply_ok(&store, vec![Mutation::DeleteAdminToken { id: "t-1".into() }]).await;
            assert_eq!(store.find_admin_token(&ops.token_hash).await.unwrap(), None);
            assert_eq!(store.list_admin_tokens().await.unwrap().len(), 2);
            let err = apply_err(&store, vec![Mutation::DeleteAdminToken { id: "t-1".into() }]).await;
            assert_refused(&err, "NotFound", "admin token \"t-1\" not found");
        }

        #[tokio::test]
        async fn a_deleted_account_keeps_its_name_in_usage() {
            let (store, _guard) = fresh().await;
            apply_ok(
                &store,
                vec![
                    Mutation::InsertGroup(group("g1", "one")),
                    Mutation::InsertApiKey(api_key("key-a", "web", "g1")),
                    Mutation::InsertAccount(account("acc-1", "primary", &["g1"])),
                    Mutation::InsertAccount(account("acc-2", "backup", &["g1"])),
                ],
            )
            .await;
            store
                .insert_usage(&[
                    usage(1, T0, "key-a", "acc-1", "m", 200, ""),
                    usage(2, T0 + 1, "key-a", "acc-1", "m", 200, ""),
                    usage(4, T0 + 2, "key-a", "acc-2", "m", 200, ""),
                ])
                .await
                .unwrap();
            let by_account = || async {
                store
                    .query_usage(UsageQuery {
                        group_by: UsageGroupBy::Account,
                        ..UsageQuery::default()
                    })
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|r| (r.group, r.group_id, r.requests))
                    .collect::<Vec<_>>()
            };
            let s = |n: &str, id: &str, c: u64| (n.to_string(), id.to_string(), c);
            assert_eq!(
                by_account().await,
                [s("backup", "acc-2", 1), s("primary", "acc-1", 2)]
            );

            apply_ok(&store, vec![Mutation::DeleteAccount { id: "acc-1".into() }]).await;
            assert_eq!(
                by_account().await,
                [s("backup", "acc-2", 1), s("primary (deleted)", "acc-1", 2)],
                "the deleted account's usage keeps its name"
            );
            // A new account may take the name: both rows stay apart.
            apply_ok(
                &store,
                vec![Mutation::InsertAccount(account("acc-3", "primary", &["g1"]))],
            )
            .await;
            store
                .insert_usage(&[usage(5, T0 + 3, "key-a", "acc-3", "m", 200, "")])
                .await
                .unwrap();
            assert_eq!(
                by_account().await,
                [
                    s("backup", "acc-2", 1),
                    s("primary", "acc-3", 1),
                    s("primary (deleted)", "acc-1", 2)
                ]
            );
        }

        #[tokio::test]
        async fn deleting_a_price_leaves_stored_costs() {
            let (store, _guard) = fresh().await;
            let p = price("p-1", "my-model", T0);
            let keep = price("p-2", "my-model", T0 + HOUR);
            apply_ok(
                &store,
                vec![
                    Mutation::UpsertPrice(p.clone()),
                    Mutation::UpsertPrice(keep.clone()),
                ],
            )
            .await;
            let e = usage(1, T0 + 1, "key-a", "acc-1", "my-model", 200, "");
            store.insert_usage(std::slice::from_ref(&e)).await.unwrap();
            let cost = || async { store.query_usage(UsageQuery::default()).await.unwrap()[0].cost_pico_usd };
            assert_eq!(cost().await, e.cost_pico_usd);

            let v = apply_ok(&store, vec![Mutation::DeletePrice { id: "p-1".into() }]).await;
            let left = store.list_prices().await.unwrap();
            assert_eq!(left.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(), ["p-2"]);
            assert_eq!(store.load_config().await.unwrap().prices, left);
            assert!(left[0].revision < v.revision, "the other price is untouched");
            assert_eq!(cost().await, e.cost_pico_usd, "stored usage keeps its cost");

            let err = apply_err(&store, vec![Mutation::DeletePrice { id: "p-1".into() }]).await;
            assert_refused(&err, "NotFound", "price \"p-1\" not found");
        }

        #[tokio::test]
        async fn change_hint_wakes_waiters_on_apply() {
            let (store, _guard) = fresh().await;
            let hint = store.change_hint();
            // Registered as a waiter before the commit (no sleep needed).
            let waiter = hint.notified();
            tokio::pin!(waiter);
            waiter.as_mut().enable();
            apply_ok(&store, vec![setting("x", "1")]).await;
            tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
                .await
                .expect("waiter was not woken by the commit");

            // A waiter that starts after the commit still sees a stored permit.
            let hint2 = store.change_hint();
            apply_ok(&store, vec![setting("x", "2")]).await;
            tokio::time::timeout(std::time::Duration::from_secs(5), hint2.notified())
                .await
                .expect("no permit stored for a late waiter");
        }

        #[tokio::test]
        async fn claiming_a_term_increments_it_and_records_the_leader() {
            let (store, _guard) = fresh().await;
            assert_eq!(store.leader().await.unwrap(), None);
            assert_eq!(store.claim_term("cp-1", "etcd", "rev 10", T0).await.unwrap(), 1);
            assert_eq!(
                store.claim_term("cp-2", "etcd", "rev 12", T0 + 5).await.unwrap(),
                2
            );
            let l = store.leader().await.unwrap().unwrap();
            assert_eq!(
                l,
                relay_control_plane::store::LeaderRecord {
                    term: 2,
                    holder: "cp-2".into(),
                    mechanism: "etcd".into(),
                    since_ms: T0 + 5,
                    detail: "rev 12".into(),
                }
            );
            assert_eq!(
                store.claim_term("cp-2", "etcd", "rev 13", T0 + 9).await.unwrap(),
                3
            );
        }

        #[tokio::test]
        async fn a_write_with_a_stale_term_is_fenced_and_changes_nothing() {
            let (store, _guard) = fresh().await;
            // No term claimed yet: no term is current.
            let err = apply_err(&store, vec![Mutation::CheckTerm { term: 1 }, setting("job", "x")]).await;
            assert_refused(
                &err,
                "Fenced",
                "fenced: this replica's leadership term 1 is stale (current term 0)",
            );
            let old = store.claim_term("cp-1", "etcd", "", T0).await.unwrap();
            apply_ok(
                &store,
                vec![Mutation::CheckTerm { term: old }, setting("job", "1")],
            )
            .await;
            let new = store.claim_term("cp-2", "etcd", "", T0 + 1).await.unwrap();
            assert_eq!(new, old + 1);
            let err = apply_err(
                &store,
                vec![Mutation::CheckTerm { term: old }, setting("job", "2")],
            )
            .await;
            let stale = format!("fenced: this replica's leadership term {old} is stale (current term {new})");
            assert_refused(&err, "Fenced", &stale);
            // The guard holds wherever it stands in the batch.
            let err = apply_err(
                &store,
                vec![setting("job", "3"), Mutation::CheckTerm { term: old }],
            )
            .await;
            assert_refused(&err, "Fenced", &stale);
            assert_eq!(
                store.settings().await.unwrap().get("job").map(String::as_str),
                Some("1")
            );
            apply_ok(
                &store,
                vec![Mutation::CheckTerm { term: new }, setting("job", "4")],
            )
            .await;
            assert_eq!(
                store.settings().await.unwrap().get("job").map(String::as_str),
                Some("4")
            );
        }

        #[tokio::test]
        async fn usage_before_the_cutoff_is_deleted_in_batches() {
            let (store, _guard) = fresh().await;
            let old: Vec<UsageEvent> = (0..5)
                .map(|n| usage(n, T0 + n as i64, "k", "a", "m", 200, ""))
                .collect();
            let new: Vec<UsageEvent> = (5..8)
                .map(|n| usage(n, T0 + HOUR + n as i64, "k", "a", "m", 200, ""))
                .collect();
            store.insert_usage(&old).await.unwrap();
            store.insert_usage(&new).await.unwrap();
            assert_eq!(
                store.delete_usage_before(T0 + HOUR, 2).await.unwrap(),
                2,
                "one batch at most"
            );
            let mut total = 2;
            loop {
                let n = store.delete_usage_before(T0 + HOUR, 2).await.unwrap();
                total += n;
                if n < 2 {
                    break;
                }
            }
            assert_eq!(total, 5);
            let left = store.query_usage(UsageQuery::default()).await.unwrap();
            assert_eq!(
                left.iter().map(|r| r.requests).sum::<u64>(),
                3,
                "newer usage stays"
            );
            assert_eq!(store.delete_usage_before(T0 + HOUR, 100).await.unwrap(), 0);
        }

        #[tokio::test]
        async fn the_notification_outbox_stores_each_event_once_and_keeps_episodes() {
            use relay_control_plane::store::{DeliveryOutcome, EpisodeChange, Notification, OutboxStats};
            let (store, _guard) = fresh().await;
            let n = |key: &str, kind: &str, at: Millis| Notification {
                dedup_key: key.into(),
                kind: kind.into(),
                subject: "acc_1".into(),
                payload: format!("{{\"type\":\"{kind}\"}}"),
                created_ms: at,
                attempts: 0,
            };
            let open = EpisodeChange::Open {
                kind: "account.unauthorized".into(),
                episode: "7".into(),
            };
            let first = n("account.unauthorized/acc_1/7", "account.unauthorized", T0);
            assert!(store.notify_enqueue(&first, &open).await.unwrap());
            // The same event again (another replica, a new leader): nothing changes.
            assert!(!store
                .notify_enqueue(
                    &n("account.unauthorized/acc_1/7", "account.unauthorized", T0 + 5),
                    &open
                )
                .await
                .unwrap());
            let eps = store.notify_open_episodes().await.unwrap();
            assert_eq!(eps.len(), 1);
            assert_eq!(
                (
                    eps[0].kind.as_str(),
                    eps[0].subject.as_str(),
                    eps[0].episode.as_str()
                ),
                ("account.unauthorized", "acc_1", "7")
            );
            assert_eq!(
                store.notify_stats().await.unwrap(),
                OutboxStats {
                    pending: 1,
                    oldest_created_ms: Some(T0)
                }
            );
            let due = store.notify_due(T0, 10).await.unwrap();
            assert_eq!(due, vec![first.clone()]);
            assert!(
                store.notify_due(T0 - 1, 10).await.unwrap().is_empty(),
                "not due before it was made"
            );
            // A failed attempt: due again only at its retry time, with the attempt counted.
            let retry = DeliveryOutcome::Retry {
                next_attempt_ms: T0 + 1_000,
                error: "HTTP 500".into(),
            };
            store.notify_mark(&first.dedup_key, &retry, T0).await.unwrap();
            assert!(store.notify_due(T0 + 999, 10).await.unwrap().is_empty());
            assert_eq!(store.notify_due(T0 + 1_000, 10).await.unwrap()[0].attempts, 1);
            store
                .notify_mark(&first.dedup_key, &DeliveryOutcome::Sent, T0 + 1_000)
                .await
                .unwrap();
            assert!(
                store.notify_due(T0 + HOUR, 10).await.unwrap().is_empty(),
                "sent once"
            );
            assert_eq!(store.notify_stats().await.unwrap(), OutboxStats::default());
            // Marking a sent one again changes nothing (a stale leader's late answer).
            store
                .notify_mark(&first.dedup_key, &retry, T0 + 2_000)
                .await
                .unwrap();
            assert!(store.notify_due(T0 + HOUR, 10).await.unwrap().is_empty());
            // The recovery closes the episode.
            let rec = n(
                "account.recovered/acc_1/account.unauthorized:7",
                "account.recovered",
                T0 + 9,
            );
            let close = EpisodeChange::Close {
                kind: "account.unauthorized".into(),
            };
            assert!(store.notify_enqueue(&rec, &close).await.unwrap());
            assert!(store.notify_open_episodes().await.unwrap().is_empty());
            store
                .notify_mark(
                    &rec.dedup_key,
                    &DeliveryOutcome::Failed { error: "gone".into() },
                    T0 + 10,
                )
                .await
                .unwrap();
            assert!(
                store.notify_due(T0 + HOUR, 10).await.unwrap().is_empty(),
                "failed is final"
            );
            let recent = store.notify_recent(10).await.unwrap();
            let states: Vec<(&str, &str, u32)> = recent
                .iter()
                .map(|e| {
                    (
                        e.notification.kind.as_str(),
                        e.state.as_str(),
                        e.notification.attempts,
                    )
                })
                .collect();
            assert_eq!(
                states,
                vec![
                    ("account.recovered", "failed", 1),
                    ("account.unauthorized", "sent", 2)
                ],
                "newest first"
            );
            assert_eq!(recent[1].last_error, "", "a success clears the error");
            assert_eq!(recent[0].done_ms, T0 + 10);
            assert_eq!(store.notify_recent(1).await.unwrap().len(), 1);
        }
    };
}

mod sqlite {
    conformance_suite!(async { std::sync::Arc::new(SqliteStore::open_in_memory().unwrap()) as DynStore });

    /// SQLite-only: data survives reopening the file.
    #[tokio::test]
    async fn file_store_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.db");
        let v = {
            let store = SqliteStore::open(&path).unwrap();
            store
                .apply(
                    vec![Mutation::InsertGroup(group("g1", "one")), setting("k", "v")],
                    audit("group.create", "one"),
                )
                .await
                .unwrap()
        };
        let store: DynStore = Arc::new(SqliteStore::open(&path).unwrap());
        assert_eq!(store.head().await.unwrap(), v);
        let config = store.load_config().await.unwrap();
        assert_eq!(config.groups, [group_at(&group("g1", "one"), v.revision)]);
        assert_eq!(config.settings.get("k").map(String::as_str), Some("v"));
        assert_eq!(store.list_audit(10, None).await.unwrap().len(), 1);
    }
}

// ---------------------------------------------------------------------------
// Postgres: each test gets its own database on the test server
// (`DATABASE_URL`, see relay-test-support).

mod postgres {
    use relay_control_plane::store::postgres::PostgresStore;
    use relay_test_support::TestDb;

    conformance_suite!(async {
        let db = TestDb::new().await.unwrap();
        let store = std::sync::Arc::new(PostgresStore::connect(&db.url, 8).await.unwrap()) as DynStore;
        (store, db)
    });
}
