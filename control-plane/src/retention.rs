//! Usage retention: the leader replica deletes usage rows older than the `usage.retention_days`
//! setting (0, the default, keeps everything), then the oldest rows beyond `usage.retention_max_rows`
//! (0, the default: no cap), every few minutes, in bounded batches (each its own short
//! transaction, so ingest goes on meanwhile). The request log's records are made of these rows, so
//! this is its retention too. Cost reports are not: before deleting, the job raises the raw floor
//! (`Store::raise_usage_raw_floor`), and usage reports read the daily rollups, which the store
//! keeps beside the raw rows and which nothing deletes, for the days before it. Not fenced:
//! deleting what is past the cutoff is idempotent, and a stale leader trimming to the cap at the
//! same time deletes at most one batch too many.

use crate::leader::{run_while_leading, Leadership};
use crate::model::Millis;
use crate::store::{DynStore, Result};
use std::time::Duration;

/// The setting this job reads.
pub const SETTING: &str = "usage.retention_days";
/// The row cap it also enforces.
pub const MAX_ROWS_SETTING: &str = "usage.retention_max_rows";
/// How often the leader looks.
pub const INTERVAL: Duration = Duration::from_secs(300);
/// Rows per delete (one short transaction each).
pub const BATCH: u32 = 5_000;
const DAY_MS: Millis = 86_400_000;

/// Runs the retention job on this replica whenever it leads, every `interval`.
pub fn start(store: DynStore, leadership: &Leadership, interval: Duration) -> tokio::task::JoinHandle<()> {
    run_while_leading(leadership, "usage-retention", move |_term| {
        let store = store.clone();
        async move {
            loop {
                if let Err(e) = run_once(&store, crate::model::now_ms()).await {
                    tracing::warn!(error = %e, "usage retention failed; trying again later");
                }
                tokio::time::sleep(interval).await;
            }
        }
    })
}

/// Deletes the usage older than the retention at `now_ms`; returns how many rows went.
pub async fn run_once(store: &DynStore, now_ms: Millis) -> Result<u64> {
    let settings = store.settings().await?;
    let days = relay_proto::settings::known(SETTING).u64_in(&settings);
    let max_rows = relay_proto::settings::known(MAX_ROWS_SETTING).u64_in(&settings);
    let mut total = if days == 0 {
        0
    } else {
        by_age(store, now_ms, days).await?
    };
    if max_rows > 0 {
        total += to_cap(store, max_rows).await?;
    }
    crate::capture::retention(store, now_ms, days.saturating_mul(DAY_MS as u64)).await?;
    Ok(total)
}

/// Deletes the oldest rows beyond `max_rows`.
async fn to_cap(store: &DynStore, max_rows: u64) -> Result<u64> {
    let mut over = store.usage_row_count().await?.saturating_sub(max_rows);
    let mut total = 0u64;
    while over > 0 {
        let batch = u32::try_from(over.min(u64::from(BATCH))).unwrap_or(BATCH);
        // The oldest rows go first: before they do, reports move to the rollups for every day up
        // to the one of the oldest row that stays (its own day included: rows of the same time
        // may go with the batch).
        if let Some(stays) = store.usage_ts_at(u64::from(batch)).await? {
            store.raise_usage_raw_floor(stays.saturating_add(1)).await?;
        }
        let n = store.delete_oldest_usage(batch).await?;
        if n == 0 {
            break;
        }
        total += n;
        over = over.saturating_sub(n);
        tokio::task::yield_now().await;
    }
    if total > 0 {
        tracing::info!(
            rows = total,
            max_rows,
            "usage retention: deleted the oldest usage beyond the row cap"
        );
        // The captures of the requests whose records went with them. Only those taken before the
        // oldest row left: a capture can arrive before its request's usage rows do.
        let before = store.usage_ts_at(0).await?.unwrap_or(Millis::MAX);
        let mut captures = 0u64;
        loop {
            let n = store.delete_orphan_captures(before, BATCH).await?;
            captures += n;
            if n < u64::from(BATCH) {
                break;
            }
            tokio::task::yield_now().await;
        }
        if captures > 0 {
            tracing::info!(
                captures,
                "capture retention: deleted the captures of requests the row cap deleted"
            );
        }
    }
    Ok(total)
}

/// Deletes the rows older than `days` at `now_ms`.
async fn by_age(store: &DynStore, now_ms: Millis, days: u64) -> Result<u64> {
    let days = i64::try_from(days).unwrap_or(i64::MAX);
    let cutoff = now_ms.saturating_sub(days.saturating_mul(DAY_MS));
    // First: from now on usage reports read the daily rollups (never deleted) for the days
    // before the cutoff, so a report over them gives the same totals while and after rows go.
    store.raise_usage_raw_floor(cutoff).await?;
    let mut total = 0u64;
    loop {
        let n = store.delete_usage_before(cutoff, BATCH).await?;
        total += n;
        if n < u64::from(BATCH) {
            break;
        }
        tokio::task::yield_now().await;
    }
    if total > 0 {
        tracing::info!(
            rows = total,
            retention_days = days,
            cutoff_ms = cutoff,
            "usage retention: deleted old usage"
        );
    } else {
        tracing::debug!(retention_days = days, "usage retention: nothing to delete");
    }
    Ok(total)
}
