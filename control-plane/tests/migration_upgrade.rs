//! Upgrades keep every row: a database built at migration 13 (before the request log's index,
//! 0014) and filled with usage rows is opened by the current store, which applies 0014 onward
//! (the request index, the asked model and request-time group, the daily rollups). Every row is
//! still there, every request has its record, and the usage report gives the same totals (now
//! with the rollups backfilled), on Postgres and on SQLite.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use relay_control_plane::model::*;
use relay_control_plane::requests::{self, Filter};
use relay_control_plane::store::postgres::{self, PostgresStore};
use relay_control_plane::store::sqlite::{self, SqliteStore};
use relay_control_plane::store::DynStore;
use std::sync::Arc;

/// The last migration before the request log.
const BEFORE: i64 = 13;
const ROWS: i64 = 3_000;
const T0: i64 = 1_700_000_000_000;

/// Usage rows as a build at migration 13 wrote them: one request in ten with a second attempt.
fn insert_rows_sql() -> String {
    format!(
        "INSERT INTO usage_events (event_id, request_id, ts, node_id, api_key_id, account_id, model, \
         input_tokens, output_tokens, cache_write_5m_tokens, cache_write_1h_tokens, cache_read_tokens, \
         cost_pico_usd, http_status, error_type, stream, cancelled, latency_ms, ttfb_ms, \
         upstream_request_id, web_search_requests, received_at, client_request_id, queue_wait_ms) \
         VALUES {}",
        (0..ROWS)
            .map(|i| {
                let req = if i % 10 == 1 { i - 1 } else { i };
                format!(
                    "('{}', 'req-{req}', {ts}, 'dp-1', 'key-{k}', 'acct-{a}', 'claude-sonnet-4-5', 10, {i}, 0, 0, 1, \
                     {cost}, {status}, '{err}', {stream}, false, 5, 2, 'msg_{i}', 0, {ts}, '', 0)",
                    uuid::Uuid::from_u128(i as u128 + 1).hyphenated(),
                    ts = T0 + i * 60_000,
                    k = i % 3,
                    a = i % 4,
                    cost = i * 1_000,
                    status = if i % 10 == 0 { 529 } else { 200 },
                    err = if i % 10 == 0 { "overloaded_error" } else { "" },
                    stream = if i % 2 == 0 { "true" } else { "false" },
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// What must hold once the current store opened the old database.
async fn check_upgraded(store: DynStore) {
    assert_eq!(store.usage_row_count().await.unwrap(), ROWS as u64, "every row kept");
    let (records, truncated) = requests::all(&store, &Filter::default(), 1_000_000).await.unwrap();
    assert!(!truncated);
    let requests = (0..ROWS).filter(|i| i % 10 != 1).count();
    assert_eq!(records.len(), requests, "one record per request");
    let retried = records.iter().filter(|r| r.attempts.len() == 2).count();
    assert_eq!(retried, (0..ROWS).filter(|i| i % 10 == 1).count());
    // Rows from before the upgrade asked for no model the store knows of.
    assert!(records
        .iter()
        .all(|r| r.model_requested.is_empty() && r.model == "claude-sonnet-4-5"));
    let total = store.query_usage(UsageQuery::default()).await.unwrap();
    assert_eq!(total.len(), 1);
    assert_eq!(total[0].requests, ROWS as u64);
    assert_eq!(total[0].output_tokens, (0..ROWS as u64).sum::<u64>());
    assert_eq!(total[0].cost_pico_usd, (0..ROWS as u64).map(|i| i * 1_000).sum::<u64>());
    assert_eq!(total[0].errors, (0..ROWS).filter(|i| i % 10 == 0).count() as u64);
    // The same report once every raw row is past the retention: read from the backfilled rollups.
    let by_day = UsageQuery {
        group_by: UsageGroupBy::Key,
        bucket: UsageBucket::Day,
        ..UsageQuery::default()
    };
    let before = store.query_usage(by_day).await.unwrap();
    store.raise_usage_raw_floor(Millis::MAX / 2).await.unwrap();
    assert_eq!(
        store.query_usage(by_day).await.unwrap(),
        before,
        "rollups hold what the rows held"
    );
    // The statistics walk sees the same records.
    let stats = requests::stats_over(&store, &Filter::default()).await.unwrap();
    assert_eq!(stats, requests::stats_report(&records, false));
}

#[tokio::test]
async fn postgres_upgrade_from_migration_13_keeps_every_row() {
    let db = relay_test_support::TestDb::new().await.unwrap();
    {
        let (c, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        c.batch_execute("CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)")
            .await
            .unwrap();
        for (version, sql) in postgres::MIGRATIONS.iter().filter(|(v, _)| *v <= BEFORE) {
            c.batch_execute(sql).await.unwrap();
            c.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, 0)",
                &[version],
            )
            .await
            .unwrap();
        }
        c.batch_execute(&insert_rows_sql()).await.unwrap();
    }
    let store = Arc::new(PostgresStore::connect(&db.url, 4).await.unwrap()) as DynStore;
    let (c, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let index = c
        .query_opt(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'usage_events_request'",
            &[],
        )
        .await
        .unwrap()
        .expect("0014's index exists");
    let def: String = index.get(0);
    assert!(def.contains("(request_id, ts)"), "{def}");
    let applied: i64 = c
        .query_one("SELECT MAX(version) FROM schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(applied, postgres::MIGRATIONS.last().unwrap().0);
    check_upgraded(store).await;
}

#[tokio::test]
async fn sqlite_upgrade_from_migration_13_keeps_every_row() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.db");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER)")
            .unwrap();
        for (version, sql) in sqlite::MIGRATIONS.iter().filter(|(v, _)| *v <= BEFORE) {
            c.execute_batch(sql).unwrap();
            c.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, 0)",
                [version],
            )
            .unwrap();
        }
        c.execute_batch(&insert_rows_sql()).unwrap();
    }
    let store = Arc::new(SqliteStore::open(&path).unwrap()) as DynStore;
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        let def: String = c
            .query_row(
                "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = 'usage_events_request'",
                [],
                |r| r.get(0),
            )
            .expect("0014's index exists");
        assert!(def.contains("(request_id, ts)"), "{def}");
    }
    check_upgraded(store).await;
}
