//! SQLite: usage rows, usage reports and spend (with the saturating `relay_sum`), the request
//! log's pages and events, and retention deletes.

use super::error::*;
use super::SqliteStore;
use crate::model::*;
use crate::store::rules::to_i64;
use crate::store::{IngestResult, Result, StoreError};
use rusqlite::{params, params_from_iter, Connection, Row};
use std::collections::BTreeMap;

/// `relay_sum(x)`: SQLite's `SUM` fails the whole query with "integer overflow" once a sum passes
/// `i64::MAX`; usage totals saturate there instead, so one absurd row cannot make every report fail.
pub(super) struct SaturatingSum;

impl rusqlite::functions::Aggregate<i64, Option<i64>> for SaturatingSum {
    fn init(&self, _: &mut rusqlite::functions::Context<'_>) -> rusqlite::Result<i64> {
        Ok(0)
    }

    fn step(&self, ctx: &mut rusqlite::functions::Context<'_>, acc: &mut i64) -> rusqlite::Result<()> {
        *acc = acc.saturating_add(ctx.get::<Option<i64>>(0)?.unwrap_or(0));
        Ok(())
    }

    fn finalize(&self, _: &mut rusqlite::functions::Context<'_>, acc: Option<i64>) -> rusqlite::Result<Option<i64>> {
        Ok(acc)
    }
}

fn insert_usage_tx(conn: &mut Connection, events: &[UsageEvent]) -> Result<IngestResult> {
    let tx = conn.transaction().map_err(db)?;
    let received_at = now_ms();
    let mut inserted = 0u64;
    {
        let mut stmt = tx
            .prepare_cached(
                "INSERT OR IGNORE INTO usage_events (event_id, request_id, ts, node_id, \
                 api_key_id, account_id, model, input_tokens, output_tokens, \
                 cache_write_5m_tokens, cache_write_1h_tokens, cache_read_tokens, cost_pico_usd, \
                 http_status, error_type, stream, cancelled, latency_ms, ttfb_ms, \
                 upstream_request_id, web_search_requests, received_at, anomaly, client_request_id, \
                 queue_wait_ms, waited_for, stream_events, max_event_gap_ms, error_message, \
                 model_requested, group_id) VALUES \
                 (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, \
                 ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29, ?30, ?31)",
            )
            .map_err(db)?;
        // Sums saturate at i64::MAX (an integer overflow would turn SQLite's sum into a float).
        let mut roll = tx
            .prepare_cached(
                "INSERT INTO usage_daily (day, api_key_id, group_id, account_id, model, requests, errors, \
                 anomalies, input_tokens, output_tokens, cache_write_5m_tokens, cache_write_1h_tokens, \
                 cache_read_tokens, cost_pico_usd) \
                 VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13) \
                 ON CONFLICT (day, api_key_id, group_id, account_id, model) DO UPDATE SET \
                 requests = requests + 1, errors = errors + excluded.errors, \
                 anomalies = anomalies + excluded.anomalies, \
                 input_tokens = relay_add(input_tokens, excluded.input_tokens), \
                 output_tokens = relay_add(output_tokens, excluded.output_tokens), \
                 cache_write_5m_tokens = relay_add(cache_write_5m_tokens, excluded.cache_write_5m_tokens), \
                 cache_write_1h_tokens = relay_add(cache_write_1h_tokens, excluded.cache_write_1h_tokens), \
                 cache_read_tokens = relay_add(cache_read_tokens, excluded.cache_read_tokens), \
                 cost_pico_usd = relay_add(cost_pico_usd, excluded.cost_pico_usd)",
            )
            .map_err(db)?;
        for e in events {
            let n = stmt
                .execute(params![
                    e.event_id.hyphenated().to_string(),
                    e.request_id,
                    e.ts,
                    e.node_id,
                    e.api_key_id,
                    e.account_id,
                    e.model,
                    to_i64(e.input_tokens, "input_tokens")?,
                    to_i64(e.output_tokens, "output_tokens")?,
                    to_i64(e.cache_write_5m_tokens, "cache_write_5m_tokens")?,
                    to_i64(e.cache_write_1h_tokens, "cache_write_1h_tokens")?,
                    to_i64(e.cache_read_tokens, "cache_read_tokens")?,
                    to_i64(e.cost_pico_usd, "cost_pico_usd")?,
                    i64::from(e.http_status),
                    e.error_type,
                    e.stream,
                    e.cancelled,
                    to_i64(e.latency_ms, "latency_ms")?,
                    to_i64(e.ttfb_ms, "ttfb_ms")?,
                    e.upstream_request_id,
                    to_i64(e.web_search_requests, "web_search_requests")?,
                    received_at,
                    e.anomaly,
                    e.client_request_id,
                    to_i64(e.queue_wait_ms, "queue_wait_ms")?,
                    e.waited_for,
                    to_i64(e.stream_events, "stream_events")?,
                    to_i64(e.max_event_gap_ms, "max_event_gap_ms")?,
                    e.error_message,
                    e.model_requested,
                    e.group_id,
                ])
                .map_err(db)?;
            inserted += n as u64;
            if n == 1 {
                // Only a row actually inserted (not a redelivered one) counts in its day's rollup.
                roll.execute(params![
                    e.ts - e.ts.rem_euclid(crate::store::DAY_MS),
                    e.api_key_id,
                    e.group_id,
                    e.account_id,
                    e.model,
                    i64::from(e.http_status >= 400 || !e.error_type.is_empty()),
                    i64::from(!e.anomaly.is_empty()),
                    to_i64(e.input_tokens, "input_tokens")?,
                    to_i64(e.output_tokens, "output_tokens")?,
                    to_i64(e.cache_write_5m_tokens, "cache_write_5m_tokens")?,
                    to_i64(e.cache_write_1h_tokens, "cache_write_1h_tokens")?,
                    to_i64(e.cache_read_tokens, "cache_read_tokens")?,
                    to_i64(e.cost_pico_usd, "cost_pico_usd")?,
                ])
                .map_err(db)?;
            }
        }
    }
    tx.commit().map_err(db)?;
    let total = events.len() as u64;
    Ok(IngestResult {
        inserted,
        duplicates: total.saturating_sub(inserted),
    })
}

fn query_usage_tx(conn: &Connection, q: UsageQuery) -> Result<Vec<UsageRow>> {
    let bucket = match q.bucket.millis() {
        Some(_) => "(u.ts / ?3) * ?3",
        None => "0",
    };
    let (group, group_id, join) = match q.group_by {
        UsageGroupBy::None => ("''", "''", ""),
        UsageGroupBy::Key => (
            "COALESCE(k.name, u.api_key_id)",
            "u.api_key_id",
            "LEFT JOIN api_keys k ON k.id = u.api_key_id",
        ),
        UsageGroupBy::Account => (
            "COALESCE(a.name, d.name || ' (deleted)', u.account_id)",
            "u.account_id",
            "LEFT JOIN accounts a ON a.id = u.account_id \
             LEFT JOIN deleted_names d ON d.kind = 'account' AND d.id = u.account_id",
        ),
        UsageGroupBy::Model => ("u.model", "u.model", ""),
    };
    // ?3 is only referenced with a bucket; an unreferenced trailing parameter
    // would not be bindable, so the parameter list follows the SQL.
    let sql = format!(
        "SELECT {bucket} AS bucket_start, {group} AS grp, {group_id} AS gid, relay_sum(u.n), \
         relay_sum(u.input_tokens), relay_sum(u.output_tokens), relay_sum(u.cache_write_5m_tokens), \
         relay_sum(u.cache_write_1h_tokens), relay_sum(u.cache_read_tokens), relay_sum(u.cost_pico_usd), \
         relay_sum(u.err), relay_sum(u.anom) \
         FROM {source} {join} \
         WHERE (?1 IS NULL OR u.ts + u.span > ?1) AND (?2 IS NULL OR u.ts < ?2) \
         GROUP BY bucket_start, gid, grp \
         ORDER BY bucket_start, grp, gid",
        source = crate::store::usage_source()
    );
    let map = |r: &Row<'_>| -> rusqlite::Result<UsageRow> {
        Ok(UsageRow {
            bucket_start: r.get(0)?,
            group: r.get(1)?,
            group_id: r.get(2)?,
            requests: col_u64(r, 3)?,
            input_tokens: col_u64(r, 4)?,
            output_tokens: col_u64(r, 5)?,
            cache_write_5m_tokens: col_u64(r, 6)?,
            cache_write_1h_tokens: col_u64(r, 7)?,
            cache_read_tokens: col_u64(r, 8)?,
            cost_pico_usd: col_u64(r, 9)?,
            errors: col_u64(r, 10)?,
            anomalies: col_u64(r, 11)?,
        })
    };
    let mut stmt = conn.prepare(&sql).map_err(db)?;
    let rows = match q.bucket.millis() {
        Some(b) => stmt.query_map(params![q.since, q.until, b], map),
        None => stmt.query_map(params![q.since, q.until], map),
    }
    .map_err(db)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db)
}

fn spend_by_key_tx(conn: &Connection, since: Millis, until: Millis) -> Result<BTreeMap<String, u64>> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT api_key_id, relay_sum(cost_pico_usd) FROM usage_events \
             WHERE ts >= ?1 AND ts < ?2 GROUP BY api_key_id",
        )
        .map_err(db)?;
    let rows = stmt
        .query_map(params![since, until], |r| Ok((r.get::<_, String>(0)?, col_u64(r, 1)?)))
        .map_err(db)?;
    rows.collect::<rusqlite::Result<BTreeMap<_, _>>>().map_err(db)
}

pub(super) async fn insert_usage(store: &SqliteStore, events: &[UsageEvent]) -> Result<IngestResult> {
    if events.is_empty() {
        return Ok(IngestResult::default());
    }
    let events = events.to_vec();
    store.with_conn(move |c| insert_usage_tx(c, &events)).await
}

pub(super) async fn query_usage(store: &SqliteStore, query: UsageQuery) -> Result<Vec<UsageRow>> {
    store.with_conn(move |c| query_usage_tx(c, query)).await
}

pub(super) async fn spend_by_key(store: &SqliteStore, since: Millis, until: Millis) -> Result<BTreeMap<String, u64>> {
    store.with_conn(move |c| spend_by_key_tx(c, since, until)).await
}

pub(super) async fn request_page(store: &SqliteStore, page: RequestPage) -> Result<Vec<(Millis, String)>> {
    store
        .with_conn(move |c| {
            let (before_ts, before_id) = page.before.unwrap_or((Millis::MAX, String::new()));
            let mut stmt = c
                .prepare_cached(
                    "SELECT MAX(ts) AS t, request_id FROM usage_events WHERE ts >= ?1 GROUP BY request_id \
                 HAVING MAX(ts) < ?2 AND (MAX(ts) < ?3 OR (MAX(ts) = ?3 AND request_id < ?4)) \
                 ORDER BY t DESC, request_id DESC LIMIT ?5",
                )
                .map_err(db)?;
            let rows = stmt
                .query_map(
                    params![
                        page.since.unwrap_or(Millis::MIN),
                        page.until.unwrap_or(Millis::MAX),
                        before_ts,
                        before_id,
                        i64::from(page.limit)
                    ],
                    |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
                )
                .map_err(db)?;
            rows.collect::<std::result::Result<Vec<_>, _>>().map_err(db)
        })
        .await
}

pub(super) async fn request_events(store: &SqliteStore, request_ids: &[String]) -> Result<Vec<UsageEvent>> {
    if request_ids.is_empty() {
        return Ok(Vec::new());
    }
    let ids = request_ids.to_vec();
    store
        .with_conn(move |c| {
            let mut out = Vec::new();
            // SQLite's bound-parameter limit: at most 500 ids per statement.
            for chunk in ids.chunks(500) {
                let marks = vec!["?"; chunk.len()].join(", ");
                let sql = format!(
                    "SELECT {} FROM usage_events WHERE request_id IN ({marks})",
                    crate::store::USAGE_COLUMNS
                );
                let mut stmt = c.prepare(&sql).map_err(db)?;
                let rows = stmt.query_map(params_from_iter(chunk.iter()), event_row).map_err(db)?;
                for row in rows {
                    out.push(event_of(row.map_err(db)?)?);
                }
            }
            Ok(out)
        })
        .await
}

/// One row read with [`crate::store::USAGE_COLUMNS`]: its event id as stored, and the event
/// (its id still nil: [`event_of`] parses it).
fn event_row(r: &Row<'_>) -> rusqlite::Result<(String, UsageEvent)> {
    let id: String = r.get(0)?;
    Ok((
        id,
        UsageEvent {
            event_id: uuid::Uuid::nil(),
            request_id: r.get(1)?,
            ts: r.get(2)?,
            node_id: r.get(3)?,
            api_key_id: r.get(4)?,
            account_id: r.get(5)?,
            model: r.get(6)?,
            input_tokens: crate::store::count(r.get(7)?),
            output_tokens: crate::store::count(r.get(8)?),
            cache_write_5m_tokens: crate::store::count(r.get(9)?),
            cache_write_1h_tokens: crate::store::count(r.get(10)?),
            cache_read_tokens: crate::store::count(r.get(11)?),
            cost_pico_usd: crate::store::count(r.get(12)?),
            http_status: u32::try_from(r.get::<_, i64>(13)?).unwrap_or(0),
            error_type: r.get(14)?,
            stream: r.get(15)?,
            cancelled: r.get(16)?,
            latency_ms: crate::store::count(r.get(17)?),
            ttfb_ms: crate::store::count(r.get(18)?),
            upstream_request_id: r.get(19)?,
            web_search_requests: crate::store::count(r.get(20)?),
            anomaly: r.get(21)?,
            client_request_id: r.get(22)?,
            queue_wait_ms: crate::store::count(r.get(23)?),
            waited_for: r.get(24)?,
            stream_events: crate::store::count(r.get(25)?),
            max_event_gap_ms: crate::store::count(r.get(26)?),
            error_message: r.get(27)?,
            model_requested: r.get(28)?,
            group_id: r.get(29)?,
        },
    ))
}

fn event_of((id, mut e): (String, UsageEvent)) -> Result<UsageEvent> {
    e.event_id =
        uuid::Uuid::parse_str(&id).map_err(|_| StoreError::corrupt(format!("usage event id {id:?} is not a UUID")))?;
    Ok(e)
}

/// The n-th newest row time in `[floor, before)` (see `Store::request_window_floor`).
pub(super) async fn request_window_floor(
    store: &SqliteStore,
    floor: Millis,
    before: Millis,
    rows: u32,
) -> Result<Option<Millis>> {
    store
        .with_conn(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT ts FROM usage_events WHERE ts >= ?1 AND ts < ?2 ORDER BY ts DESC LIMIT 1 OFFSET ?3",
                )
                .map_err(db)?;
            let mut rows = stmt
                .query_map(params![floor, before, i64::from(rows.max(1)) - 1], |r| {
                    r.get::<_, i64>(0)
                })
                .map_err(db)?;
            rows.next().transpose().map_err(db)
        })
        .await
}

pub(super) async fn request_window_events(
    store: &SqliteStore,
    since: Millis,
    until: Millis,
) -> Result<Vec<UsageEvent>> {
    store
        .with_conn(move |c| {
            let sql = format!(
                "SELECT {} FROM usage_events WHERE request_id IN ({})",
                crate::store::USAGE_COLUMNS,
                crate::store::REQUESTS_ENDING_IN.replace('$', "?")
            );
            let mut stmt = c.prepare_cached(&sql).map_err(db)?;
            let rows = stmt.query_map(params![since, until], event_row).map_err(db)?;
            let mut out = Vec::new();
            for row in rows {
                out.push(event_of(row.map_err(db)?)?);
            }
            Ok(out)
        })
        .await
}

pub(super) async fn usage_row_count(store: &SqliteStore) -> Result<u64> {
    store
        .with_conn(|c| {
            c.query_row("SELECT COUNT(*) FROM usage_events", [], |r| r.get::<_, i64>(0))
                .map(crate::store::count)
                .map_err(db)
        })
        .await
}

pub(super) async fn delete_oldest_usage(store: &SqliteStore, limit: u32) -> Result<u64> {
    store
        .with_conn(move |c| {
            let n = c
                .execute(
                    "DELETE FROM usage_events WHERE rowid IN \
                 (SELECT rowid FROM usage_events ORDER BY ts LIMIT ?1)",
                    params![i64::from(limit)],
                )
                .map_err(db)?;
            Ok(n as u64)
        })
        .await
}

pub(super) async fn usage_ts_at(store: &SqliteStore, offset: u64) -> Result<Option<Millis>> {
    store
        .with_conn(move |c| {
            let mut stmt = c
                .prepare_cached("SELECT ts FROM usage_events ORDER BY ts LIMIT 1 OFFSET ?1")
                .map_err(db)?;
            let mut rows = stmt
                .query_map(params![i64::try_from(offset).unwrap_or(i64::MAX)], |r| {
                    r.get::<_, i64>(0)
                })
                .map_err(db)?;
            rows.next().transpose().map_err(db)
        })
        .await
}

pub(super) async fn raise_usage_raw_floor(store: &SqliteStore, floor_ms: Millis) -> Result<()> {
    store
        .with_conn(move |c| {
            c.execute(
                "INSERT INTO usage_raw_floor (id, floor_ms) VALUES (1, ?1) \
                 ON CONFLICT (id) DO UPDATE SET floor_ms = MAX(floor_ms, excluded.floor_ms)",
                params![floor_ms],
            )
            .map_err(db)?;
            Ok(())
        })
        .await
}

pub(super) async fn delete_usage_before(store: &SqliteStore, before_ms: Millis, limit: u32) -> Result<u64> {
    store
        .with_conn(move |c| {
            let n = c
                .execute(
                    "DELETE FROM usage_events WHERE rowid IN \
                 (SELECT rowid FROM usage_events WHERE ts < ?1 LIMIT ?2)",
                    params![before_ms, i64::from(limit)],
                )
                .map_err(db)?;
            Ok(n as u64)
        })
        .await
}
