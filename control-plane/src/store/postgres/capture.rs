//! Postgres: capture rules as read for the config, captured requests (`bytea`), clearing
//! requests, and the captures' retention.

use super::error::pg;
use super::rows::col;
use super::PostgresStore;
use crate::model::*;
use crate::store::{IngestResult, Result};

pub(super) async fn load_rules(c: &impl deadpool_postgres::GenericClient) -> Result<Vec<CaptureRule>> {
    c.query("SELECT rule FROM capture_rules ORDER BY revision, id", &[])
        .await
        .map_err(pg)?
        .iter()
        .map(|r| crate::store::capture_rule_from(&col::<String, _>(r, 0)?))
        .collect()
}

pub(super) async fn list_rules(store: &PostgresStore) -> Result<Vec<CaptureRule>> {
    let c = store.client().await?;
    load_rules(&c).await
}

pub(super) async fn deleted_names(store: &PostgresStore) -> Result<Vec<DeletedName>> {
    let c = store.client().await?;
    let rows = c
        .query(
            "SELECT kind, id, name, deleted_at FROM deleted_names ORDER BY deleted_at, kind, id",
            &[],
        )
        .await
        .map_err(pg)?;
    rows.iter()
        .map(|r| {
            Ok(DeletedName {
                kind: col(r, 0)?,
                id: col(r, 1)?,
                name: col(r, 2)?,
                deleted_at: col(r, 3)?,
            })
        })
        .collect()
}

pub(super) async fn insert(store: &PostgresStore, caps: &[StoredCapture]) -> Result<IngestResult> {
    let mut c = store.client().await?;
    let tx = c.transaction().await.map_err(pg)?;
    let mut out = IngestResult::default();
    for k in caps {
        let n = tx
            .execute(
                "INSERT INTO request_captures (request_id, rule_id, api_key_id, node_id, captured_ms, expires_ms, \
                 truncated, document_zstd) VALUES ($1,$2,$3,$4,$5,$6,$7,$8) ON CONFLICT (request_id) DO NOTHING",
                &[
                    &k.request_id,
                    &k.rule_id,
                    &k.api_key_id,
                    &k.node_id,
                    &k.captured_ms,
                    &k.expires_ms,
                    &k.truncated,
                    &k.document_zstd,
                ],
            )
            .await
            .map_err(pg)?;
        if n == 0 {
            out.duplicates += 1;
        } else {
            out.inserted += 1;
        }
    }
    tx.commit().await.map_err(pg)?;
    Ok(out)
}

pub(super) async fn get(store: &PostgresStore, request_id: &str) -> Result<Option<StoredCapture>> {
    let c = store.client().await?;
    let row = c
        .query_opt(
            "SELECT request_id, rule_id, api_key_id, node_id, captured_ms, expires_ms, truncated, document_zstd \
             FROM request_captures WHERE request_id = $1",
            &[&request_id],
        )
        .await
        .map_err(pg)?;
    row.map(|r| {
        Ok(StoredCapture {
            request_id: col(&r, 0)?,
            rule_id: col(&r, 1)?,
            api_key_id: col(&r, 2)?,
            node_id: col(&r, 3)?,
            captured_ms: col(&r, 4)?,
            expires_ms: col(&r, 5)?,
            truncated: col(&r, 6)?,
            document_zstd: col(&r, 7)?,
        })
    })
    .transpose()
}

pub(super) async fn delete_requests(store: &PostgresStore, ids: &[String]) -> Result<(u64, u64)> {
    let mut c = store.client().await?;
    let tx = c.transaction().await.map_err(pg)?;
    let rows = tx
        .execute("DELETE FROM usage_events WHERE request_id = ANY($1)", &[&ids])
        .await
        .map_err(pg)?;
    let caps = tx
        .execute("DELETE FROM request_captures WHERE request_id = ANY($1)", &[&ids])
        .await
        .map_err(pg)?;
    tx.commit().await.map_err(pg)?;
    Ok((rows, caps))
}

pub(super) async fn delete_before(store: &PostgresStore, before: Millis, now: Millis, limit: u32) -> Result<u64> {
    let c = store.client().await?;
    let n = c
        .execute(
            "DELETE FROM request_captures WHERE request_id IN (SELECT request_id FROM request_captures \
             WHERE captured_ms < $1 OR (expires_ms > 0 AND expires_ms <= $2) LIMIT $3)",
            &[&before, &now, &i64::from(limit)],
        )
        .await
        .map_err(pg)?;
    Ok(n)
}

pub(super) async fn delete_orphans(store: &PostgresStore, before: Millis, limit: u32) -> Result<u64> {
    let c = store.client().await?;
    let n = c
        .execute(
            "DELETE FROM request_captures WHERE request_id IN (SELECT c.request_id FROM request_captures c \
             WHERE c.captured_ms < $1 AND NOT EXISTS (SELECT 1 FROM usage_events u WHERE u.request_id = c.request_id) \
             LIMIT $2)",
            &[&before, &i64::from(limit)],
        )
        .await
        .map_err(pg)?;
    Ok(n)
}
