//! The request log against both stores: records are exactly one per request whatever the
//! redelivery, filters and pages return exactly what an in-memory model of the requests says
//! (a property test), statistics equal a direct computation, and retention deletes what is old
//! and nothing else, in batches, while ingest goes on.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use relay_control_plane::model::*;
use relay_control_plane::requests::{self, Cursor, Filter, StatusFilter};
use relay_control_plane::store::postgres::PostgresStore;
use relay_control_plane::store::sqlite::SqliteStore;
use relay_control_plane::store::DynStore;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const T0: Millis = 1_700_000_000_000;
/// Each case's requests live in their own window, so cases can share one database.
const WINDOW: Millis = 10_000_000;
const KEYS: [&str; 3] = ["key-a", "key-b", "key-c"];
const ACCOUNTS: [&str; 3] = ["acct-1", "acct-2", "acct-3"];
const MODELS: [&str; 2] = ["claude-sonnet-4-5", "claude-haiku-4-5"];
/// The group each key was in when its requests were served (key-c's requests carry none).
const GROUPS: [&str; 3] = ["grp-1", "grp-2", ""];
/// What the upstream answered with, for a request asking `MODELS[i]`: a dated id.
fn answered(i: usize) -> String {
    format!("{}-20250929", MODELS[i])
}
/// Status and the error type relay records for it.
const STATUSES: [(u32, &str); 5] = [
    (200, ""),
    (429, "rate_limit_error"),
    (529, "overloaded_error"),
    (500, "api_error"),
    (400, "invalid_request_error"),
];

#[derive(Debug, Clone)]
struct AttemptSpec {
    account: usize,
    status: usize,
    cancelled: bool,
    latency: u64,
    output: u64,
}

#[derive(Debug, Clone)]
struct RequestSpec {
    key: usize,
    model: usize,
    stream: bool,
    /// Start offset in the case's window (small, so times tie often).
    start: i64,
    attempts: Vec<AttemptSpec>,
}

fn attempt() -> impl Strategy<Value = AttemptSpec> {
    (
        0..ACCOUNTS.len(),
        0..STATUSES.len(),
        prop::bool::weighted(0.1),
        0u64..4,
        0u64..50,
    )
        .prop_map(|(account, status, cancelled, latency, output)| AttemptSpec {
            account,
            status,
            cancelled,
            latency,
            output,
        })
}

fn request() -> impl Strategy<Value = RequestSpec> {
    (
        0..KEYS.len(),
        0..MODELS.len(),
        any::<bool>(),
        0i64..12,
        prop::collection::vec(attempt(), 1..4),
    )
        .prop_map(|(key, model, stream, start, attempts)| RequestSpec {
            key,
            model,
            stream,
            start,
            attempts,
        })
}

#[derive(Debug, Clone)]
struct FilterSpec {
    since: Option<i64>,
    until: Option<i64>,
    keys: Option<BTreeSet<usize>>,
    account: Option<usize>,
    model: Option<usize>,
    status: Option<usize>,
    stream: Option<bool>,
    min_duration: u64,
    /// Filter on the model asked for (the `model` filter is on the answered one).
    asked: Option<usize>,
    group: Option<usize>,
}

fn filter_spec() -> impl Strategy<Value = FilterSpec> {
    (
        prop::option::of(0i64..16),
        prop::option::of(0i64..20),
        prop::option::of(prop::collection::btree_set(0..KEYS.len(), 0..3)),
        prop::option::of(0..ACCOUNTS.len()),
        prop::option::of(0..MODELS.len()),
        prop::option::of(0usize..6),
        prop::option::of(any::<bool>()),
        prop::sample::select(vec![0u64, 0, 2, 5]),
        prop::option::of(0..MODELS.len()),
        prop::option::of(0..GROUPS.len()),
    )
        .prop_map(
            |(since, until, keys, account, model, status, stream, min_duration, asked, group)| FilterSpec {
                asked,
                group,
                since,
                until,
                keys,
                account,
                model,
                status,
                stream,
                min_duration,
            },
        )
}

fn status_filter(i: usize) -> StatusFilter {
    match i {
        0 => StatusFilter::Ok,
        1 => StatusFilter::Error,
        2 => StatusFilter::Code(429),
        3 => StatusFilter::Class(5),
        4 => StatusFilter::Outcome("cancelled".into()),
        _ => StatusFilter::Outcome("overloaded_error".into()),
    }
}

/// What the model knows of one request: computed from the spec alone, not by `requests`.
struct Expected {
    id: String,
    time: Millis,
    ok: bool,
    duration: u64,
    cost: u64,
    output: u64,
}

fn expected(spec: &RequestSpec, base: Millis, id: &str) -> Expected {
    let total: u64 = spec.attempts.iter().map(|a| a.latency).sum();
    let last = spec.attempts.last().unwrap();
    Expected {
        id: id.to_string(),
        time: base + spec.start + total as i64,
        ok: !last.cancelled && STATUSES[last.status].0 == 200,
        duration: total,
        cost: spec.attempts.iter().map(|a| a.output * 1_000).sum(),
        output: spec.attempts.iter().map(|a| a.output).sum(),
    }
}

fn model_matches(spec: &RequestSpec, e: &Expected, f: &FilterSpec, base: Millis) -> bool {
    let last = spec.attempts.last().unwrap();
    f.since.is_none_or(|s| e.time >= base + s)
        && f.until.is_none_or(|u| e.time < base + u)
        && f.keys.as_ref().is_none_or(|k| k.contains(&spec.key))
        && f.account.is_none_or(|a| spec.attempts.iter().any(|x| x.account == a))
        && f.model.is_none_or(|m| m == spec.model)
        && f.asked.is_none_or(|m| m == spec.model)
        && f.group.is_none_or(|g| g == spec.key)
        && f.stream.is_none_or(|s| s == spec.stream)
        && e.duration >= f.min_duration
        && match f.status {
            None => true,
            Some(0) => e.ok,
            Some(1) => !e.ok,
            Some(2) => !last.cancelled && STATUSES[last.status].0 == 429,
            Some(3) => !last.cancelled && STATUSES[last.status].0 / 100 == 5,
            Some(4) => last.cancelled,
            Some(_) => !last.cancelled && STATUSES[last.status].1 == "overloaded_error",
        }
}

/// The usage rows the data planes would report for these requests.
fn events(specs: &[RequestSpec], base: Millis, case: u64, ids: &AtomicU64) -> Vec<UsageEvent> {
    let mut out = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let mut ts = base + spec.start;
        for a in &spec.attempts {
            ts += a.latency as i64;
            let (status, error_type) = STATUSES[a.status];
            out.push(UsageEvent {
                event_id: uuid::Uuid::from_u128(u128::from(ids.fetch_add(1, Ordering::Relaxed)) + 1),
                request_id: format!("req-{case:05}-{i:04}"),
                ts,
                node_id: if i % 2 == 0 { "dp-1" } else { "dp-2" }.into(),
                api_key_id: KEYS[spec.key].into(),
                account_id: ACCOUNTS[a.account].into(),
                model: answered(spec.model),
                model_requested: MODELS[spec.model].into(),
                group_id: GROUPS[spec.key].into(),
                output_tokens: a.output,
                cost_pico_usd: a.output * 1_000,
                http_status: if a.cancelled { 0 } else { status },
                error_type: if a.cancelled { String::new() } else { error_type.into() },
                stream: spec.stream,
                cancelled: a.cancelled,
                latency_ms: a.latency,
                ttfb_ms: u64::from(!a.cancelled),
                stream_events: a.output,
                max_event_gap_ms: a.latency + 7,
                error_message: if a.cancelled {
                    format!("gone {i}")
                } else {
                    String::new()
                },
                ..UsageEvent::default()
            });
        }
    }
    out
}

fn percentile(sorted: &[u64], p: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    // Nearest rank: the smallest value with at least p% of the values at or below it.
    let n = sorted.len();
    let rank = (n * p).div_ceil(100).max(1);
    sorted[rank - 1]
}

async fn check_case(
    store: &DynStore,
    case: u64,
    specs: Vec<RequestSpec>,
    filters: Vec<(FilterSpec, usize)>,
    ids: &AtomicU64,
) -> Result<(), TestCaseError> {
    let base = T0 + case as i64 * WINDOW;
    let evs = events(&specs, base, case, ids);
    // At-least-once: every event twice, in batches of varying size, the second time reversed.
    for chunk in evs.chunks(7) {
        store.insert_usage(chunk).await.unwrap();
    }
    let mut again = evs.clone();
    again.reverse();
    for chunk in again.chunks(3) {
        let r = store.insert_usage(chunk).await.unwrap();
        prop_assert_eq!(r.inserted, 0, "a redelivered event is not stored twice");
    }
    let exp: Vec<(RequestSpec, Expected)> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| (s.clone(), expected(s, base, &format!("req-{case:05}-{i:04}"))))
        .collect();

    // Every request has exactly one record, with its attempts in order.
    let everything = Filter {
        since: Some(base),
        until: Some(base + WINDOW),
        ..Filter::default()
    };
    let (all, truncated) = requests::all(store, &everything, 1_000_000).await.unwrap();
    prop_assert!(!truncated);
    prop_assert_eq!(all.len(), specs.len());
    for r in &all {
        let i: usize = r.id.rsplit('-').next().unwrap().parse().unwrap();
        let spec = &specs[i];
        let accounts: Vec<&str> = r.attempts.iter().map(|a| a.account_id.as_str()).collect();
        let want: Vec<&str> = spec.attempts.iter().map(|a| ACCOUNTS[a.account]).collect();
        prop_assert_eq!(accounts, want);
        prop_assert_eq!(r.duration_ms, exp[i].1.duration);
        prop_assert_eq!(r.is_ok(), exp[i].1.ok);
        prop_assert_eq!(r.cost_pico_usd, exp[i].1.cost);
        // The gap summary round-trips through the store (the answering attempt's).
        let last = spec.attempts.last().unwrap();
        prop_assert_eq!(r.stream_events, last.output);
        prop_assert_eq!(r.max_event_gap_ms, last.latency + 7);
        let message = if last.cancelled {
            format!("gone {i}")
        } else {
            String::new()
        };
        prop_assert_eq!(&r.error_message, &message);
        // Asked and answered, and the group at request time, round-trip through the store.
        prop_assert_eq!(&r.model, &answered(spec.model));
        prop_assert_eq!(r.model_requested.as_str(), MODELS[spec.model]);
        prop_assert_eq!(r.group_id.as_str(), GROUPS[spec.key]);
    }

    for (f, page_size) in filters {
        let filter = Filter {
            since: Some(base + f.since.unwrap_or(0)),
            until: Some(base + f.until.unwrap_or(WINDOW)),
            keys: f
                .keys
                .as_ref()
                .map(|k| k.iter().map(|i| KEYS[*i].to_string()).collect()),
            account_id: f.account.map(|a| ACCOUNTS[a].to_string()),
            model: f.model.map(answered),
            model_requested: f.asked.map(|m| MODELS[m].to_string()),
            group_id: f.group.map(|g| GROUPS[g].to_string()),
            status: f.status.map(status_filter),
            stream: f.stream,
            min_duration_ms: f.min_duration,
        };
        if f.until.is_some_and(|u| u <= f.since.unwrap_or(0)) {
            continue;
        }
        let mut want: Vec<&Expected> = exp
            .iter()
            .filter(|(s, e)| model_matches(s, e, &f, base))
            .map(|(_, e)| e)
            .collect();
        want.sort_by(|a, b| (b.time, &b.id).cmp(&(a.time, &a.id)));
        let want_ids: Vec<&str> = want.iter().map(|e| e.id.as_str()).collect();

        // Walk the pages (through the opaque cursor, as a client does).
        let mut got = Vec::new();
        let mut cursor: Option<Cursor> = None;
        let mut pages = 0;
        loop {
            let page = requests::list(store, &filter, cursor.take(), page_size).await.unwrap();
            prop_assert!(page.records.len() <= page_size);
            got.extend(page.records);
            pages += 1;
            prop_assert!(pages <= specs.len() + 2, "paging ends");
            match page.next {
                Some(c) => cursor = Some(Cursor::decode(&c.encode()).unwrap()),
                None => break,
            }
        }
        let got_ids: Vec<&str> = got.iter().map(|r| r.id.as_str()).collect();
        prop_assert_eq!(&got_ids, &want_ids, "filter {:?}, pages of {}", f, page_size);

        // The statistics the store walk gives (in windows of every size, their edges falling
        // between attempts of one request too) equal those of the listed records.
        let listed = requests::stats_report(&got, false);
        prop_assert_eq!(&requests::stats_over(store, &filter).await.unwrap(), &listed);
        for window in [1, 2, 5] {
            prop_assert_eq!(
                &requests::stats_in_windows(store, &filter, window).await.unwrap(),
                &listed,
                "windows of {} rows",
                window
            );
        }
        // Stats over the filter equal a direct computation over the model's records.
        let stats = listed.total;
        prop_assert_eq!(stats.requests, want.len() as u64);
        prop_assert_eq!(stats.errors, want.iter().filter(|e| !e.ok).count() as u64);
        prop_assert_eq!(stats.cost_pico_usd, want.iter().map(|e| e.cost).sum::<u64>());
        prop_assert_eq!(stats.output_tokens, want.iter().map(|e| e.output).sum::<u64>());
        let mut durations: Vec<u64> = want.iter().map(|e| e.duration).collect();
        durations.sort_unstable();
        prop_assert_eq!(stats.duration_p50_ms, percentile(&durations, 50));
        prop_assert_eq!(stats.duration_p90_ms, percentile(&durations, 90));
        prop_assert_eq!(stats.duration_p99_ms, percentile(&durations, 99));
        let ratio = if want.is_empty() {
            0.0
        } else {
            want.iter().filter(|e| !e.ok).count() as f64 / want.len() as f64
        };
        prop_assert!((stats.error_ratio - ratio).abs() < 1e-12);
    }
    Ok(())
}

fn run_property(store: DynStore, rt: &tokio::runtime::Runtime, cases: u32) {
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let case = AtomicU64::new(0);
    let ids = AtomicU64::new(0);
    let strategy = (
        prop::collection::vec(request(), 0..40),
        prop::collection::vec((filter_spec(), 1usize..6), 1..6),
    );
    runner
        .run(&strategy, |(specs, filters)| {
            let n = case.fetch_add(1, Ordering::Relaxed);
            rt.block_on(check_case(&store, n, specs, filters, &ids))
        })
        .unwrap();
}

#[test]
fn sqlite_filters_and_pages_match_the_model() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = Arc::new(SqliteStore::open_in_memory().unwrap()) as DynStore;
    run_property(store, &rt, 96);
}

#[test]
fn postgres_filters_and_pages_match_the_model() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (store, _db) = rt.block_on(async {
        let db = relay_test_support::TestDb::new().await.unwrap();
        let store = Arc::new(PostgresStore::connect(&db.url, 8).await.unwrap()) as DynStore;
        (store, db)
    });
    run_property(store, &rt, 32);
}

/// Retention deletes every row older than the cutoff and nothing newer, in batches, while new
/// usage keeps arriving.
async fn retention_while_ingesting(store: DynStore) {
    let now = T0 + 40 * 86_400_000;
    store
        .apply(
            vec![Mutation::SetSetting {
                name: relay_control_plane::retention::SETTING.into(),
                value: "30".into(),
            }],
            AuditRecord {
                actor: "test".into(),
                action: "settings.set".into(),
                target: relay_control_plane::retention::SETTING.into(),
                detail: "{}".into(),
            },
        )
        .await
        .unwrap();
    let cutoff = now - 30 * 86_400_000;
    let ids = AtomicU64::new(1_000_000);
    let row = |n: u64, ts: Millis| UsageEvent {
        event_id: uuid::Uuid::from_u128(u128::from(ids.fetch_add(1, Ordering::Relaxed))),
        request_id: format!("r{n}"),
        ts,
        api_key_id: "k".into(),
        account_id: "a".into(),
        model: "m".into(),
        http_status: 200,
        ..UsageEvent::default()
    };
    // More old rows than one retention batch, on both sides of the cutoff.
    let old_count = u64::from(relay_control_plane::retention::BATCH) * 2 + 123;
    let old: Vec<UsageEvent> = (0..old_count).map(|n| row(n, cutoff - 1 - (n as i64 % 1000))).collect();
    let kept: Vec<UsageEvent> = (0..500)
        .map(|n| row(old_count + n, cutoff + (n as i64 % 1000)))
        .collect();
    for chunk in old.chunks(1000).chain(kept.chunks(1000)) {
        store.insert_usage(chunk).await.unwrap();
    }
    // Redelivered: stored once, counted once (in the rollups too).
    assert_eq!(store.insert_usage(&old[..700]).await.unwrap().inserted, 0);
    // A cost report by key and day over whole days around the cutoff, before anything goes.
    let day = 86_400_000;
    let report = UsageQuery {
        group_by: UsageGroupBy::Key,
        since: Some(cutoff - cutoff.rem_euclid(day) - 5 * day),
        until: Some(cutoff - cutoff.rem_euclid(day) + 2 * day),
        bucket: UsageBucket::Day,
    };
    let before = store.query_usage(report).await.unwrap();
    assert_eq!(
        before.iter().map(|r| r.requests).sum::<u64>(),
        old_count + 500,
        "{before:?}"
    );
    // New usage keeps arriving while retention runs.
    let writer = {
        let store = store.clone();
        let fresh: Vec<UsageEvent> = (0..2_000).map(|n| row(10_000_000 + n, now + n as i64)).collect();
        tokio::spawn(async move {
            for chunk in fresh.chunks(50) {
                store.insert_usage(chunk).await.unwrap();
                tokio::task::yield_now().await;
            }
        })
    };
    // In batches: one delete takes at most its batch, and only rows before the cutoff.
    assert_eq!(store.delete_usage_before(cutoff, 100).await.unwrap(), 100);
    let deleted = relay_control_plane::retention::run_once(&store, now).await.unwrap();
    writer.await.unwrap();
    assert_eq!(deleted, old_count - 100, "every row before the cutoff went");
    let left = requests::all(&store, &Filter::default(), 1_000_000).await.unwrap().0;
    let left_ids: BTreeSet<String> = left.iter().map(|r| r.id.clone()).collect();
    let want: BTreeSet<String> = (old_count..old_count + 500)
        .chain(10_000_000..10_002_000)
        .map(|n| format!("r{n}"))
        .collect();
    assert_eq!(left_ids, want, "the newer rows and everything ingested meanwhile stay");
    assert_eq!(relay_control_plane::retention::run_once(&store, now).await.unwrap(), 0);
    // The raw rows are gone, the report over their days is the same (read from the rollups).
    assert_eq!(store.query_usage(report).await.unwrap(), before);
    let total = store.query_usage(UsageQuery::default()).await.unwrap();
    assert_eq!(total[0].requests, old_count + 500 + 2_000, "{total:?}");
}

#[tokio::test]
async fn sqlite_retention_deletes_what_is_old_while_ingest_continues() {
    retention_while_ingesting(Arc::new(SqliteStore::open_in_memory().unwrap())).await;
}

#[tokio::test]
async fn postgres_retention_deletes_what_is_old_while_ingest_continues() {
    let db = relay_test_support::TestDb::new().await.unwrap();
    let store = Arc::new(PostgresStore::connect(&db.url, 8).await.unwrap()) as DynStore;
    retention_while_ingesting(store).await;
}

/// The row cap keeps exactly the newest rows, deleting the rest in batches.
async fn row_cap_keeps_the_newest(store: DynStore) {
    store
        .apply(
            vec![Mutation::SetSetting {
                name: relay_control_plane::retention::MAX_ROWS_SETTING.into(),
                value: "7000".into(),
            }],
            AuditRecord {
                actor: "test".into(),
                action: "settings.set".into(),
                target: relay_control_plane::retention::MAX_ROWS_SETTING.into(),
                detail: "{}".into(),
            },
        )
        .await
        .unwrap();
    let rows: Vec<UsageEvent> = (0..12_000u64)
        .map(|n| UsageEvent {
            event_id: uuid::Uuid::from_u128(u128::from(n) + 1),
            request_id: format!("r{n:05}"),
            ts: T0 + n as i64,
            api_key_id: "k".into(),
            account_id: "a".into(),
            model: "m".into(),
            http_status: 200,
            ..UsageEvent::default()
        })
        .collect();
    for chunk in rows.chunks(1000) {
        store.insert_usage(chunk).await.unwrap();
    }
    // Captures (kept "with the request log": no TTL) of a request the cap deletes, of one it
    // keeps, and of one whose usage rows have not arrived yet.
    let cap = |id: &str, captured_ms: Millis| StoredCapture {
        request_id: id.into(),
        rule_id: "c1".into(),
        api_key_id: "k".into(),
        node_id: "dp-1".into(),
        captured_ms,
        expires_ms: 0,
        truncated: false,
        document_zstd: vec![0x28, 0xb5, 0x2f, 0xfd, 0, 0xff],
    };
    store
        .insert_captures(&[
            cap("r00010", T0 + 10),
            cap("r11000", T0 + 11_000),
            cap("r-not-yet", T0 + 20_000),
        ])
        .await
        .unwrap();
    let totals = store.query_usage(UsageQuery::default()).await.unwrap();
    // No age limit: only the cap applies.
    let deleted = relay_control_plane::retention::run_once(&store, T0 + 1_000_000)
        .await
        .unwrap();
    assert_eq!(deleted, 5_000);
    assert_eq!(store.usage_row_count().await.unwrap(), 7_000);
    let left: BTreeSet<String> = requests::all(&store, &Filter::default(), 1_000_000)
        .await
        .unwrap()
        .0
        .into_iter()
        .map(|r| r.id)
        .collect();
    let want: BTreeSet<String> = (5_000..12_000u64).map(|n| format!("r{n:05}")).collect();
    assert_eq!(left, want, "the newest rows stay");
    // The deleted request's capture went with its record; the others stay.
    assert_eq!(store.get_capture("r00010").await.unwrap(), None);
    assert!(store.get_capture("r11000").await.unwrap().is_some());
    assert!(store.get_capture("r-not-yet").await.unwrap().is_some());
    assert_eq!(
        store.query_usage(UsageQuery::default()).await.unwrap(),
        totals,
        "the usage report still counts what the cap deleted"
    );
    assert_eq!(
        relay_control_plane::retention::run_once(&store, T0 + 1_000_000)
            .await
            .unwrap(),
        0
    );
}

#[tokio::test]
async fn sqlite_row_cap_keeps_the_newest() {
    row_cap_keeps_the_newest(Arc::new(SqliteStore::open_in_memory().unwrap())).await;
}

#[tokio::test]
async fn postgres_row_cap_keeps_the_newest() {
    let db = relay_test_support::TestDb::new().await.unwrap();
    let store = Arc::new(PostgresStore::connect(&db.url, 8).await.unwrap()) as DynStore;
    row_cap_keeps_the_newest(store).await;
}
