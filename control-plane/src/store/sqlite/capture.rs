//! SQLite: capture rules as read for the config, captured requests (a `BLOB` in the one database
//! file: the same transaction and retention as the request log, no second place to back up),
//! clearing requests, and the captures' retention.

use super::error::*;
use super::SqliteStore;
use crate::model::*;
use crate::store::{IngestResult, Result};
use rusqlite::{params, params_from_iter, Connection, OptionalExtension};

pub(super) fn read_rules(conn: &Connection) -> Result<Vec<CaptureRule>> {
    let mut stmt = conn
        .prepare("SELECT rule FROM capture_rules ORDER BY revision, id")
        .map_err(db)?;
    let docs = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .map_err(db)?
        .collect::<rusqlite::Result<Vec<String>>>()
        .map_err(db)?;
    docs.iter().map(|d| crate::store::capture_rule_from(d)).collect()
}

pub(super) async fn list_rules(store: &SqliteStore) -> Result<Vec<CaptureRule>> {
    store.with_conn(|c| read_rules(c)).await
}

pub(super) async fn deleted_names(store: &SqliteStore) -> Result<Vec<DeletedName>> {
    store
        .with_conn(|c| {
            let mut stmt = c
                .prepare("SELECT kind, id, name, deleted_at FROM deleted_names ORDER BY deleted_at, kind, id")
                .map_err(db)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(DeletedName {
                        kind: r.get(0)?,
                        id: r.get(1)?,
                        name: r.get(2)?,
                        deleted_at: r.get(3)?,
                    })
                })
                .map_err(db)?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(db)?;
            Ok(rows)
        })
        .await
}

pub(super) async fn insert(store: &SqliteStore, caps: &[StoredCapture]) -> Result<IngestResult> {
    let caps = caps.to_vec();
    store
        .with_conn(move |c| {
            let tx = c.transaction().map_err(db)?;
            let mut out = IngestResult::default();
            for k in &caps {
                let n = tx
                    .execute(
                        "INSERT INTO request_captures (request_id, rule_id, api_key_id, node_id, captured_ms, \
                         expires_ms, truncated, document_zstd) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
                         ON CONFLICT (request_id) DO NOTHING",
                        params![
                            k.request_id,
                            k.rule_id,
                            k.api_key_id,
                            k.node_id,
                            k.captured_ms,
                            k.expires_ms,
                            k.truncated,
                            k.document_zstd
                        ],
                    )
                    .map_err(db)?;
                if n == 0 {
                    out.duplicates += 1;
                } else {
                    out.inserted += 1;
                }
            }
            tx.commit().map_err(db)?;
            Ok(out)
        })
        .await
}

pub(super) async fn get(store: &SqliteStore, request_id: &str) -> Result<Option<StoredCapture>> {
    let id = request_id.to_owned();
    store
        .with_conn(move |c| {
            c.query_row(
                "SELECT request_id, rule_id, api_key_id, node_id, captured_ms, expires_ms, truncated, document_zstd \
                 FROM request_captures WHERE request_id = ?1",
                params![id],
                |r| {
                    Ok(StoredCapture {
                        request_id: r.get(0)?,
                        rule_id: r.get(1)?,
                        api_key_id: r.get(2)?,
                        node_id: r.get(3)?,
                        captured_ms: r.get(4)?,
                        expires_ms: r.get(5)?,
                        truncated: r.get(6)?,
                        document_zstd: r.get(7)?,
                    })
                },
            )
            .optional()
            .map_err(db)
        })
        .await
}

pub(super) async fn delete_requests(store: &SqliteStore, ids: &[String]) -> Result<(u64, u64)> {
    let ids = ids.to_vec();
    store
        .with_conn(move |c| {
            let tx = c.transaction().map_err(db)?;
            let (mut rows, mut caps) = (0u64, 0u64);
            for chunk in ids.chunks(500) {
                let marks = vec!["?"; chunk.len()].join(",");
                rows += tx
                    .execute(
                        &format!("DELETE FROM usage_events WHERE request_id IN ({marks})"),
                        params_from_iter(chunk.iter()),
                    )
                    .map_err(db)? as u64;
                caps += tx
                    .execute(
                        &format!("DELETE FROM request_captures WHERE request_id IN ({marks})"),
                        params_from_iter(chunk.iter()),
                    )
                    .map_err(db)? as u64;
            }
            tx.commit().map_err(db)?;
            Ok((rows, caps))
        })
        .await
}

pub(super) async fn delete_before(store: &SqliteStore, before: Millis, now: Millis, limit: u32) -> Result<u64> {
    store
        .with_conn(move |c| {
            let n = c
                .execute(
                    "DELETE FROM request_captures WHERE request_id IN (SELECT request_id FROM request_captures \
                     WHERE captured_ms < ?1 OR (expires_ms > 0 AND expires_ms <= ?2) LIMIT ?3)",
                    params![before, now, limit],
                )
                .map_err(db)?;
            Ok(n as u64)
        })
        .await
}

pub(super) async fn delete_orphans(store: &SqliteStore, before: Millis, limit: u32) -> Result<u64> {
    store
        .with_conn(move |c| {
            let n = c
                .execute(
                    "DELETE FROM request_captures WHERE request_id IN (SELECT c.request_id FROM request_captures c \
                     WHERE c.captured_ms < ?1 AND NOT EXISTS (SELECT 1 FROM usage_events u WHERE u.request_id = c.request_id) \
                     LIMIT ?2)",
                    params![before, limit],
                )
                .map_err(db)?;
            Ok(n as u64)
        })
        .await
}
