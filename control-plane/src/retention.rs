//! Usage retention: the leader replica deletes usage rows older than the `usage.retention_days`
//! setting (0, the default, keeps everything) every few minutes, in bounded batches. Not fenced:
//! deleting what is past the cutoff is idempotent, so a stale leader doing it too is harmless.

use crate::leader::{run_while_leading, Leadership};
use crate::model::Millis;
use crate::store::{DynStore, Result};
use std::time::Duration;

/// The setting this job reads.
pub const SETTING: &str = "usage.retention_days";
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
    if days == 0 {
        return Ok(0);
    }
    let days = i64::try_from(days).unwrap_or(i64::MAX);
    let cutoff = now_ms.saturating_sub(days.saturating_mul(DAY_MS));
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
