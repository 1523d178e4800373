//! Capture (opt-in bodies) on the control plane's side: the limits a capture rule must keep, the
//! stored document read back (zstd, bounded), and the captures' retention (their TTL, and the
//! request log's age). Rules are config (`api/admin/capture.rs` writes them, `api/publish.rs`
//! sends them to the data planes); captures arrive over `UsageIngest.StoreCaptures`
//! (`api/usage.rs`) and are stored as shipped.

use crate::model::Millis;
use crate::store::{DynStore, Result};

/// `--max-bytes` when not given: the most bytes kept of each body.
pub const DEFAULT_MAX_BYTES: u64 = 256 * 1024;
/// The largest `--max-bytes` accepted (each body; a capture ships at most twice this, compressed).
pub const MAX_MAX_BYTES: u64 = 4 * 1024 * 1024;
/// The largest compressed capture document stored (`StoreCaptures` refuses larger ones).
pub const MAX_DOCUMENT_BYTES: usize = 12 * 1024 * 1024;
/// The most a stored document may inflate to when read back.
pub const MAX_INFLATED_BYTES: usize = 64 * 1024 * 1024;
/// Captures deleted per statement by retention.
pub const BATCH: u32 = 1_000;

/// Why a stored capture cannot be read back.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    #[error("the stored capture is not valid zstd: {0}")]
    Zstd(#[source] std::io::Error),
    #[error("the stored capture inflates beyond {MAX_INFLATED_BYTES} bytes")]
    TooLarge,
    #[error("the stored capture is not UTF-8 JSON")]
    NotText,
}

/// A stored document back to its JSON text.
pub fn inflate(document_zstd: &[u8]) -> Result<String, DocumentError> {
    use std::io::Read;
    let dec = zstd::stream::read::Decoder::new(document_zstd).map_err(DocumentError::Zstd)?;
    let mut out = Vec::new();
    let limit = u64::try_from(MAX_INFLATED_BYTES).unwrap_or(u64::MAX);
    dec.take(limit + 1).read_to_end(&mut out).map_err(DocumentError::Zstd)?;
    if out.len() > MAX_INFLATED_BYTES {
        return Err(DocumentError::TooLarge);
    }
    String::from_utf8(out).map_err(|_| DocumentError::NotText)
}

/// Deletes the captures past their TTL at `now_ms`, and those older than `max_age_ms` (the
/// request log's retention; 0 keeps them by age), in batches. Returns how many went.
pub async fn retention(store: &DynStore, now_ms: Millis, max_age_ms: u64) -> Result<u64> {
    let before = if max_age_ms == 0 {
        0
    } else {
        now_ms.saturating_sub(i64::try_from(max_age_ms).unwrap_or(i64::MAX))
    };
    let mut total = 0u64;
    loop {
        let n = store.delete_captures_before(before, now_ms, BATCH).await?;
        total += n;
        if n < u64::from(BATCH) {
            break;
        }
        tokio::task::yield_now().await;
    }
    if total > 0 {
        tracing::info!(captures = total, "capture retention: deleted expired captures");
    }
    Ok(total)
}
