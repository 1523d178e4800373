//! Postgres: usage rows (a binary `COPY` into a staging table, then one merge per batch), usage
//! reports and spend, the request log's pages and events, and retention deletes.

use super::error::{pg, to_u64};
use super::rows::col;
use super::PostgresStore;
use crate::model::*;
use crate::store::rules::to_i64;
use crate::store::{IngestResult, Result, StoreError};
use std::collections::BTreeMap;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};

/// The session's staging table for usage batches: temporary (no WAL, seen by this session only),
/// emptied at each commit. Created on a session's first batch, inside the batch's transaction (so
/// a pooler that pins a session per transaction works too).
const STAGE_SQL: &str = "DO $$BEGIN IF to_regclass('pg_temp.relay_usage_stage') IS NULL THEN \
     CREATE TEMP TABLE relay_usage_stage (LIKE usage_events) ON COMMIT DELETE ROWS; END IF; END$$";

/// Every column of a usage row, in the order the staging table receives them.
const USAGE_COLUMNS: &str = "event_id, request_id, ts, node_id, api_key_id, account_id, model, input_tokens, \
     output_tokens, cache_write_5m_tokens, cache_write_1h_tokens, cache_read_tokens, cost_pico_usd, latency_ms, \
     ttfb_ms, web_search_requests, http_status, error_type, stream, cancelled, upstream_request_id, anomaly, \
     client_request_id, queue_wait_ms, waited_for, stream_events, max_event_gap_ms, error_message, \
     model_requested, group_id, received_at";

/// The Postgres types of [`USAGE_COLUMNS`], in order.
const USAGE_TYPES: [Type; 31] = [
    Type::UUID,
    Type::TEXT,
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT4,
    Type::TEXT,
    Type::BOOL,
    Type::BOOL,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
];

/// The rows of the staging table not stored yet (a redelivered one is), inserted; the rows
/// actually inserted added to their day's rollup in the same statement, in key order (two
/// replicas adding to the same rollups lock them in the same order). Answers how many were
/// inserted.
const MERGE_SQL: &str = "WITH ins AS (INSERT INTO usage_events (event_id, request_id, ts, node_id, api_key_id, \
     account_id, model, input_tokens, output_tokens, cache_write_5m_tokens, cache_write_1h_tokens, \
     cache_read_tokens, cost_pico_usd, latency_ms, ttfb_ms, web_search_requests, http_status, error_type, stream, \
     cancelled, upstream_request_id, anomaly, client_request_id, queue_wait_ms, waited_for, stream_events, \
     max_event_gap_ms, error_message, model_requested, group_id, received_at) \
     SELECT event_id, request_id, ts, node_id, api_key_id, account_id, model, input_tokens, output_tokens, \
     cache_write_5m_tokens, cache_write_1h_tokens, cache_read_tokens, cost_pico_usd, latency_ms, ttfb_ms, \
     web_search_requests, http_status, error_type, stream, cancelled, upstream_request_id, anomaly, \
     client_request_id, queue_wait_ms, waited_for, stream_events, max_event_gap_ms, error_message, \
     model_requested, group_id, received_at FROM relay_usage_stage \
     ON CONFLICT (event_id) DO NOTHING \
     RETURNING ts, api_key_id, group_id, account_id, model, http_status, error_type, anomaly, \
     input_tokens, output_tokens, cache_write_5m_tokens, cache_write_1h_tokens, cache_read_tokens, \
     cost_pico_usd), \
     rolled AS (INSERT INTO usage_daily AS d (day, api_key_id, group_id, account_id, model, requests, \
     errors, anomalies, input_tokens, output_tokens, cache_write_5m_tokens, cache_write_1h_tokens, \
     cache_read_tokens, cost_pico_usd) \
     SELECT ts - (((ts % 86400000) + 86400000) % 86400000) AS day, api_key_id, group_id, account_id, \
     model, COUNT(*), COUNT(*) FILTER (WHERE http_status >= 400 OR error_type <> ''), \
     COUNT(*) FILTER (WHERE anomaly <> ''), LEAST(SUM(input_tokens), 9223372036854775807), \
     LEAST(SUM(output_tokens), 9223372036854775807), LEAST(SUM(cache_write_5m_tokens), 9223372036854775807), \
     LEAST(SUM(cache_write_1h_tokens), 9223372036854775807), LEAST(SUM(cache_read_tokens), 9223372036854775807), \
     LEAST(SUM(cost_pico_usd), 9223372036854775807) \
     FROM ins GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5 \
     ON CONFLICT (day, api_key_id, group_id, account_id, model) DO UPDATE SET \
     requests = LEAST(d.requests::NUMERIC + EXCLUDED.requests, 9223372036854775807)::BIGINT, \
     errors = LEAST(d.errors::NUMERIC + EXCLUDED.errors, 9223372036854775807)::BIGINT, \
     anomalies = LEAST(d.anomalies::NUMERIC + EXCLUDED.anomalies, 9223372036854775807)::BIGINT, \
     input_tokens = LEAST(d.input_tokens::NUMERIC + EXCLUDED.input_tokens, 9223372036854775807)::BIGINT, \
     output_tokens = LEAST(d.output_tokens::NUMERIC + EXCLUDED.output_tokens, 9223372036854775807)::BIGINT, \
     cache_write_5m_tokens = LEAST(d.cache_write_5m_tokens::NUMERIC + EXCLUDED.cache_write_5m_tokens, \
     9223372036854775807)::BIGINT, \
     cache_write_1h_tokens = LEAST(d.cache_write_1h_tokens::NUMERIC + EXCLUDED.cache_write_1h_tokens, \
     9223372036854775807)::BIGINT, \
     cache_read_tokens = LEAST(d.cache_read_tokens::NUMERIC + EXCLUDED.cache_read_tokens, \
     9223372036854775807)::BIGINT, \
     cost_pico_usd = LEAST(d.cost_pico_usd::NUMERIC + EXCLUDED.cost_pico_usd, 9223372036854775807)::BIGINT \
     RETURNING 1) \
     SELECT COUNT(*)::BIGINT FROM ins";

/// One usage row's numbers as stored (checked before anything is sent).
struct RowNums {
    /// input, output, cache writes 5m and 1h, cache reads, cost, latency, ttfb, web searches.
    nums: [i64; 9],
    status: i32,
    waited_ms: i64,
    stream_events: i64,
    max_gap: i64,
}

fn row_nums(e: &UsageEvent) -> Result<RowNums> {
    let mut nums = [0i64; 9];
    for (slot, v) in nums.iter_mut().zip([
        e.input_tokens,
        e.output_tokens,
        e.cache_write_5m_tokens,
        e.cache_write_1h_tokens,
        e.cache_read_tokens,
        e.cost_pico_usd,
        e.latency_ms,
        e.ttfb_ms,
        e.web_search_requests,
    ]) {
        *slot = to_i64(v, "usage value")?;
    }
    Ok(RowNums {
        nums,
        status: i32::try_from(e.http_status)
            .map_err(|_| StoreError::Invalid(format!("http_status {} is out of range", e.http_status)))?,
        waited_ms: i64::try_from(e.queue_wait_ms).unwrap_or(i64::MAX),
        stream_events: to_i64(e.stream_events, "stream_events")?,
        max_gap: to_i64(e.max_event_gap_ms, "max_event_gap_ms")?,
    })
}

/// One batch in one transaction: the rows streamed (binary `COPY`) into the session's staging
/// table, then merged into `usage_events` with the rollups ([`MERGE_SQL`]); the staging table
/// empties at the commit (and at a rollback).
pub(super) async fn insert_usage(store: &PostgresStore, events: &[UsageEvent]) -> Result<IngestResult> {
    if events.is_empty() {
        return Ok(IngestResult::default());
    }
    // Every value checked before anything is sent: an invalid batch writes nothing.
    let nums = events.iter().map(row_nums).collect::<Result<Vec<_>>>()?;
    let now = now_ms();
    let mut c = store.client().await?;
    let tx = c.transaction().await.map_err(pg)?;
    tx.batch_execute(STAGE_SQL).await.map_err(pg)?;
    let sink = tx
        .copy_in(&format!(
            "COPY relay_usage_stage ({USAGE_COLUMNS}) FROM STDIN (FORMAT binary)"
        ))
        .await
        .map_err(pg)?;
    let writer = BinaryCopyInWriter::new(sink, &USAGE_TYPES);
    futures::pin_mut!(writer);
    for (e, n) in events.iter().zip(&nums) {
        let row: [&(dyn ToSql + Sync); 31] = [
            &e.event_id,
            &e.request_id,
            &e.ts,
            &e.node_id,
            &e.api_key_id,
            &e.account_id,
            &e.model,
            &n.nums[0],
            &n.nums[1],
            &n.nums[2],
            &n.nums[3],
            &n.nums[4],
            &n.nums[5],
            &n.nums[6],
            &n.nums[7],
            &n.nums[8],
            &n.status,
            &e.error_type,
            &e.stream,
            &e.cancelled,
            &e.upstream_request_id,
            &e.anomaly,
            &e.client_request_id,
            &n.waited_ms,
            &e.waited_for,
            &n.stream_events,
            &n.max_gap,
            &e.error_message,
            &e.model_requested,
            &e.group_id,
            &now,
        ];
        writer.as_mut().write(&row).await.map_err(pg)?;
    }
    writer.finish().await.map_err(pg)?;
    let merge = tx.prepare_cached(MERGE_SQL).await.map_err(pg)?;
    let row = tx.query_one(&merge, &[]).await.map_err(pg)?;
    tx.commit().await.map_err(pg)?;
    let inserted = to_u64(col(&row, 0)?, "count")?;
    let n = events.len() as u64;
    Ok(IngestResult {
        inserted,
        duplicates: n.saturating_sub(inserted),
    })
}

pub(super) async fn query_usage(store: &PostgresStore, q: UsageQuery) -> Result<Vec<UsageRow>> {
    let bucket = q.bucket.millis().unwrap_or(0);
    let (group_expr, name_expr, join) = match q.group_by {
        UsageGroupBy::None => ("''", "''", ""),
        UsageGroupBy::Key => (
            "e.api_key_id",
            "COALESCE(MAX(k.name), e.api_key_id)",
            "LEFT JOIN api_keys k ON k.id = e.api_key_id",
        ),
        UsageGroupBy::Account => (
            "e.account_id",
            "COALESCE(MAX(a.name), MAX(d.name) || ' (deleted)', e.account_id)",
            "LEFT JOIN accounts a ON a.id = e.account_id \
             LEFT JOIN deleted_names d ON d.kind = 'account' AND d.id = e.account_id",
        ),
        UsageGroupBy::Model => ("e.model", "e.model", ""),
    };
    let bucket_expr = if bucket > 0 {
        "(e.ts / $3::BIGINT) * $3::BIGINT"
    } else {
        "($3::BIGINT * 0)"
    };
    let sql = format!(
        "SELECT {bucket_expr} AS b, {group_expr} AS gid, {name_expr} AS gname, {n}, \
         {input}, {output}, {w5m}, {w1h}, {read}, {cost}, {err}, {anom} \
         FROM {source} {join} WHERE e.ts + e.span > $1 AND e.ts < $2 \
         GROUP BY 1, 2 ORDER BY 1, 3",
        source = crate::store::usage_source().replace(") u", ") e"),
        n = saturating_sum("e.n"),
        err = saturating_sum("e.err"),
        anom = saturating_sum("e.anom"),
        input = saturating_sum("e.input_tokens"),
        output = saturating_sum("e.output_tokens"),
        w5m = saturating_sum("e.cache_write_5m_tokens"),
        w1h = saturating_sum("e.cache_write_1h_tokens"),
        read = saturating_sum("e.cache_read_tokens"),
        cost = saturating_sum("e.cost_pico_usd"),
    );
    let c = store.client().await?;
    let rows = c
        .query(
            &sql,
            &[
                &q.since.unwrap_or(i64::MIN),
                &q.until.unwrap_or(i64::MAX),
                &bucket.max(1),
            ],
        )
        .await
        .map_err(pg)?;
    rows.iter()
        .map(|r| {
            Ok(UsageRow {
                bucket_start: col(r, 0)?,
                group_id: col(r, 1)?,
                group: col(r, 2)?,
                requests: to_u64(col(r, 3)?, "count")?,
                input_tokens: to_u64(col(r, 4)?, "sum")?,
                output_tokens: to_u64(col(r, 5)?, "sum")?,
                cache_write_5m_tokens: to_u64(col(r, 6)?, "sum")?,
                cache_write_1h_tokens: to_u64(col(r, 7)?, "sum")?,
                cache_read_tokens: to_u64(col(r, 8)?, "sum")?,
                cost_pico_usd: to_u64(col(r, 9)?, "sum")?,
                errors: to_u64(col(r, 10)?, "count")?,
                anomalies: to_u64(col(r, 11)?, "count")?,
            })
        })
        .collect()
}

pub(super) async fn spend_by_key(store: &PostgresStore, since: Millis, until: Millis) -> Result<BTreeMap<String, u64>> {
    let sql = format!(
        "SELECT api_key_id, {cost} FROM usage_events WHERE ts >= $1 AND ts < $2 GROUP BY api_key_id",
        cost = saturating_sum("cost_pico_usd"),
    );
    let c = store.client().await?;
    let rows = c.query(&sql, &[&since, &until]).await.map_err(pg)?;
    rows.iter()
        .map(|r| Ok((col::<String, _>(r, 0)?, to_u64(col(r, 1)?, "sum")?)))
        .collect()
}

pub(super) async fn request_page(store: &PostgresStore, page: RequestPage) -> Result<Vec<(Millis, String)>> {
    let (before_ts, before_id) = page.before.unwrap_or((Millis::MAX, String::new()));
    let c = store.client().await?;
    let rows = c
        .query(
            "SELECT MAX(ts) AS t, request_id FROM usage_events WHERE ts >= $1 GROUP BY request_id \
             HAVING MAX(ts) < $2 AND (MAX(ts) < $3 OR (MAX(ts) = $3 AND request_id COLLATE \"C\" < $4)) \
             ORDER BY t DESC, request_id COLLATE \"C\" DESC LIMIT $5",
            &[
                &page.since.unwrap_or(Millis::MIN),
                &page.until.unwrap_or(Millis::MAX),
                &before_ts,
                &before_id,
                &i64::from(page.limit),
            ],
        )
        .await
        .map_err(pg)?;
    rows.iter().map(|r| Ok((col(r, 0)?, col(r, 1)?))).collect::<Result<_>>()
}

pub(super) async fn request_events(store: &PostgresStore, request_ids: &[String]) -> Result<Vec<UsageEvent>> {
    if request_ids.is_empty() {
        return Ok(Vec::new());
    }
    let c = store.client().await?;
    let sql = format!(
        "SELECT {} FROM usage_events WHERE request_id = ANY($1)",
        crate::store::USAGE_COLUMNS
    );
    let rows = c.query(&sql, &[&request_ids]).await.map_err(pg)?;
    rows.iter().map(event_of).collect()
}

/// One row read with [`crate::store::USAGE_COLUMNS`] back to its event.
fn event_of(r: &tokio_postgres::Row) -> Result<UsageEvent> {
    Ok(UsageEvent {
        event_id: col(r, 0)?,
        request_id: col(r, 1)?,
        ts: col(r, 2)?,
        node_id: col(r, 3)?,
        api_key_id: col(r, 4)?,
        account_id: col(r, 5)?,
        model: col(r, 6)?,
        input_tokens: crate::store::count(col(r, 7)?),
        output_tokens: crate::store::count(col(r, 8)?),
        cache_write_5m_tokens: crate::store::count(col(r, 9)?),
        cache_write_1h_tokens: crate::store::count(col(r, 10)?),
        cache_read_tokens: crate::store::count(col(r, 11)?),
        cost_pico_usd: crate::store::count(col(r, 12)?),
        http_status: u32::try_from(col::<i32, _>(r, 13)?).unwrap_or(0),
        error_type: col(r, 14)?,
        stream: col(r, 15)?,
        cancelled: col(r, 16)?,
        latency_ms: crate::store::count(col(r, 17)?),
        ttfb_ms: crate::store::count(col(r, 18)?),
        upstream_request_id: col(r, 19)?,
        web_search_requests: crate::store::count(col(r, 20)?),
        anomaly: col(r, 21)?,
        client_request_id: col(r, 22)?,
        queue_wait_ms: crate::store::count(col(r, 23)?),
        waited_for: col(r, 24)?,
        stream_events: crate::store::count(col(r, 25)?),
        max_event_gap_ms: crate::store::count(col(r, 26)?),
        error_message: col(r, 27)?,
        model_requested: col(r, 28)?,
        group_id: col(r, 29)?,
    })
}

/// The n-th newest row time in `[floor, before)` (see `Store::request_window_floor`).
pub(super) async fn request_window_floor(
    store: &PostgresStore,
    floor: Millis,
    before: Millis,
    rows: u32,
) -> Result<Option<Millis>> {
    let c = store.client().await?;
    let row = c
        .query_opt(
            "SELECT ts FROM usage_events WHERE ts >= $1 AND ts < $2 ORDER BY ts DESC OFFSET $3 LIMIT 1",
            &[&floor, &before, &(i64::from(rows.max(1)) - 1)],
        )
        .await
        .map_err(pg)?;
    row.map(|r| col(&r, 0)).transpose()
}

pub(super) async fn request_window_events(
    store: &PostgresStore,
    since: Millis,
    until: Millis,
) -> Result<Vec<UsageEvent>> {
    let c = store.client().await?;
    let sql = format!(
        "SELECT {} FROM usage_events WHERE request_id IN ({})",
        crate::store::USAGE_COLUMNS,
        crate::store::REQUESTS_ENDING_IN
    );
    let rows = c.query(&sql, &[&since, &until]).await.map_err(pg)?;
    rows.iter().map(event_of).collect()
}

pub(super) async fn usage_row_count(store: &PostgresStore) -> Result<u64> {
    let c = store.client().await?;
    let row = c
        .query_one("SELECT COUNT(*) FROM usage_events", &[])
        .await
        .map_err(pg)?;
    Ok(crate::store::count(col(&row, 0)?))
}

pub(super) async fn delete_oldest_usage(store: &PostgresStore, limit: u32) -> Result<u64> {
    let c = store.client().await?;
    c.execute(
        "DELETE FROM usage_events WHERE ctid = ANY(ARRAY(\
         SELECT ctid FROM usage_events ORDER BY ts LIMIT $1))",
        &[&i64::from(limit)],
    )
    .await
    .map_err(pg)
}

pub(super) async fn usage_ts_at(store: &PostgresStore, offset: u64) -> Result<Option<Millis>> {
    let c = store.client().await?;
    let row = c
        .query_opt(
            "SELECT ts FROM usage_events ORDER BY ts OFFSET $1 LIMIT 1",
            &[&i64::try_from(offset).unwrap_or(i64::MAX)],
        )
        .await
        .map_err(pg)?;
    row.map(|r| col(&r, 0)).transpose()
}

pub(super) async fn raise_usage_raw_floor(store: &PostgresStore, floor_ms: Millis) -> Result<()> {
    let c = store.client().await?;
    c.execute(
        "INSERT INTO usage_raw_floor (id, floor_ms) VALUES (1, $1) \
         ON CONFLICT (id) DO UPDATE SET floor_ms = GREATEST(usage_raw_floor.floor_ms, EXCLUDED.floor_ms)",
        &[&floor_ms],
    )
    .await
    .map_err(pg)?;
    Ok(())
}

pub(super) async fn delete_usage_before(store: &PostgresStore, before_ms: Millis, limit: u32) -> Result<u64> {
    let c = store.client().await?;
    let n = c
        .execute(
            "DELETE FROM usage_events WHERE ctid = ANY(ARRAY(\
             SELECT ctid FROM usage_events WHERE ts < $1 LIMIT $2))",
            &[&before_ms, &i64::from(limit)],
        )
        .await
        .map_err(pg)?;
    Ok(n)
}

/// `SUM(col)` as a BIGINT that saturates at `i64::MAX` instead of failing the query (the sum of
/// a BIGINT column is NUMERIC, which never overflows; only the cast back could).
fn saturating_sum(col: &str) -> String {
    format!("LEAST(SUM({col}), 9223372036854775807)::BIGINT")
}
