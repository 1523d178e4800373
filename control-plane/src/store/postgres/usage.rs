//! Postgres: usage rows (one `unnest` insert per batch), usage reports and spend, the request
//! log's pages and events, and retention deletes.

use super::error::{pg, to_u64};
use super::rows::col;
use super::PostgresStore;
use crate::model::*;
use crate::store::rules::to_i64;
use crate::store::{IngestResult, Result, StoreError};
use std::collections::BTreeMap;

pub(super) async fn insert_usage(store: &PostgresStore, events: &[UsageEvent]) -> Result<IngestResult> {
    if events.is_empty() {
        return Ok(IngestResult::default());
    }
    // Column-wise arrays, inserted in one statement with unnest().
    let n = events.len();
    let mut ids = Vec::with_capacity(n);
    let mut req = Vec::with_capacity(n);
    let mut ts = Vec::with_capacity(n);
    let mut node = Vec::with_capacity(n);
    let mut key = Vec::with_capacity(n);
    let mut acct = Vec::with_capacity(n);
    let mut model = Vec::with_capacity(n);
    let mut nums: [Vec<i64>; 9] = Default::default();
    let mut status = Vec::with_capacity(n);
    let mut err = Vec::with_capacity(n);
    let mut stream = Vec::with_capacity(n);
    let mut cancelled = Vec::with_capacity(n);
    let mut upstream = Vec::with_capacity(n);
    let mut anomaly = Vec::with_capacity(n);
    let mut client_id = Vec::with_capacity(n);
    let mut waited_ms = Vec::with_capacity(n);
    let mut waited_for = Vec::with_capacity(n);
    let mut stream_events = Vec::with_capacity(n);
    let mut max_gap = Vec::with_capacity(n);
    let mut messages = Vec::with_capacity(n);
    for e in events {
        ids.push(e.event_id);
        req.push(e.request_id.as_str());
        ts.push(e.ts);
        node.push(e.node_id.as_str());
        key.push(e.api_key_id.as_str());
        acct.push(e.account_id.as_str());
        model.push(e.model.as_str());
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
            slot.push(to_i64(v, "usage value")?);
        }
        status.push(
            i32::try_from(e.http_status)
                .map_err(|_| StoreError::Invalid(format!("http_status {} is out of range", e.http_status)))?,
        );
        err.push(e.error_type.as_str());
        stream.push(e.stream);
        cancelled.push(e.cancelled);
        upstream.push(e.upstream_request_id.as_str());
        anomaly.push(e.anomaly.as_str());
        client_id.push(e.client_request_id.as_str());
        waited_ms.push(i64::try_from(e.queue_wait_ms).unwrap_or(i64::MAX));
        waited_for.push(e.waited_for.as_str());
        stream_events.push(to_i64(e.stream_events, "stream_events")?);
        max_gap.push(to_i64(e.max_event_gap_ms, "max_event_gap_ms")?);
        messages.push(e.error_message.as_str());
    }
    let now = now_ms();
    let c = store.client().await?;
    let inserted = c
        .execute(
            "INSERT INTO usage_events (event_id, request_id, ts, node_id, api_key_id, account_id, model, \
             input_tokens, output_tokens, cache_write_5m_tokens, cache_write_1h_tokens, cache_read_tokens, \
             cost_pico_usd, latency_ms, ttfb_ms, web_search_requests, http_status, error_type, stream, \
             cancelled, upstream_request_id, anomaly, client_request_id, queue_wait_ms, waited_for, \
             stream_events, max_event_gap_ms, error_message, received_at) \
             SELECT *, $21::BIGINT FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::text[], \
             $6::text[], $7::text[], $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[], $12::bigint[], \
             $13::bigint[], $14::bigint[], $15::bigint[], $16::bigint[], $17::int[], $18::text[], $19::bool[], \
             $20::bool[], $22::text[], $23::text[], $24::text[], $25::bigint[], $26::text[], $27::bigint[], \
             $28::bigint[], $29::text[]) \
             ON CONFLICT (event_id) DO NOTHING",
            &[
                &ids,
                &req,
                &ts,
                &node,
                &key,
                &acct,
                &model,
                &nums[0],
                &nums[1],
                &nums[2],
                &nums[3],
                &nums[4],
                &nums[5],
                &nums[6],
                &nums[7],
                &nums[8],
                &status,
                &err,
                &stream,
                &cancelled,
                &now,
                &upstream,
                &anomaly,
                &client_id,
                &waited_ms,
                &waited_for,
                &stream_events,
                &max_gap,
                &messages,
            ],
        )
        .await
        .map_err(pg)?;
    let n = n as u64;
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
        "SELECT {bucket_expr} AS b, {group_expr} AS gid, {name_expr} AS gname, COUNT(*)::BIGINT, \
         {input}, {output}, {w5m}, {w1h}, {read}, {cost}, \
         COUNT(*) FILTER (WHERE e.http_status >= 400 OR e.error_type <> '')::BIGINT, \
         COUNT(*) FILTER (WHERE e.anomaly <> '')::BIGINT \
         FROM usage_events e {join} WHERE e.ts >= $1 AND e.ts < $2 AND e.account_id <> '' \
         GROUP BY 1, 2 ORDER BY 1, 3",
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
    rows.iter()
        .map(|r| {
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
            })
        })
        .collect::<Result<_>>()
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
