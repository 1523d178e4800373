//! SQLite: what is not config but kept all the same: data planes' Watch records, quota
//! observations, OAuth answers waiting for their commit, the leadership term, and the
//! notification outbox with its episodes.

use super::error::*;
use super::rows::*;
use super::SqliteStore;
use crate::model::*;
use crate::store::rules::to_i64;
use crate::store::{
    quota_windows_from, quota_windows_json, DeliveryOutcome, EpisodeChange, LeaderRecord, Notification, OpenEpisode,
    OutboxEntry, OutboxStats, ProxyRecord, Result, StoreError,
};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

fn record_proxy_tx(conn: &Connection, node_id: &str, replica: &str, event: &ProxyEvent) -> Result<()> {
    let now = now_ms();
    match event {
        ProxyEvent::Connected { build_version, held: _ } => {
            conn.execute(
                "INSERT INTO proxies (node_id, build_version, last_seen, connected, replica) \
                 VALUES (?1, ?2, ?3, 1, ?4) \
                 ON CONFLICT (node_id) DO UPDATE SET build_version = excluded.build_version, \
                 last_seen = excluded.last_seen, connected = 1, replica = excluded.replica",
                params![node_id, build_version, now, replica],
            )
            .map_err(db)?;
        }
        ProxyEvent::Acked { version: v, rejected } => {
            let (e, r) = (to_i64(v.epoch, "epoch")?, to_i64(v.revision, "revision")?);
            conn.execute(
                "INSERT INTO proxies (node_id, acked_epoch, acked_revision, last_seen, connected, \
                 replica, rejected) VALUES (?1, ?2, ?3, ?4, 1, ?5, ?6) \
                 ON CONFLICT (node_id) DO UPDATE SET acked_epoch = excluded.acked_epoch, \
                 acked_revision = excluded.acked_revision, last_seen = excluded.last_seen, \
                 rejected = excluded.rejected",
                params![node_id, e, r, now, replica, rejected_to_json(rejected)],
            )
            .map_err(db)?;
            // A NACK is history once a later version is applied.
            conn.execute(
                "UPDATE proxies SET nack_epoch = NULL, nack_revision = NULL, nack_error = '', nack_at = 0 \
                 WHERE node_id = ?1 AND nack_epoch IS NOT NULL AND (nack_epoch <> ?2 OR nack_revision <= ?3)",
                params![node_id, e, r],
            )
            .map_err(db)?;
        }
        ProxyEvent::Nacked { version, error, .. } => {
            conn.execute(
                "INSERT INTO proxies (node_id, nack_epoch, nack_revision, nack_error, nack_at, \
                 last_seen, connected, replica) VALUES (?1, ?2, ?3, ?4, ?5, ?5, 1, ?6) \
                 ON CONFLICT (node_id) DO UPDATE SET nack_epoch = excluded.nack_epoch, \
                 nack_revision = excluded.nack_revision, nack_error = excluded.nack_error, \
                 nack_at = excluded.nack_at, last_seen = excluded.last_seen",
                params![
                    node_id,
                    to_i64(version.epoch, "epoch")?,
                    to_i64(version.revision, "revision")?,
                    error,
                    now,
                    replica
                ],
            )
            .map_err(db)?;
        }
        ProxyEvent::Seen => {
            conn.execute(
                "UPDATE proxies SET last_seen = ?3 WHERE node_id = ?1 AND replica = ?2 AND connected",
                params![node_id, replica, now],
            )
            .map_err(db)?;
        }
        ProxyEvent::Disconnected => {
            conn.execute(
                "UPDATE proxies SET last_seen = ?3, \
                 connected = CASE WHEN replica = ?2 THEN 0 ELSE connected END \
                 WHERE node_id = ?1",
                params![node_id, replica, now],
            )
            .map_err(db)?;
        }
    }
    Ok(())
}

pub(super) async fn record_proxy(store: &SqliteStore, node_id: &str, replica: &str, event: ProxyEvent) -> Result<()> {
    let node_id = node_id.to_owned();
    let replica = replica.to_owned();
    store
        .with_conn(move |c| record_proxy_tx(c, &node_id, &replica, &event))
        .await
}

/// Data planes' Watch events, in order, in one transaction.
pub(super) async fn record_proxies(store: &SqliteStore, events: &[ProxyRecord]) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let events = events.to_vec();
    store
        .with_conn(move |c| {
            let tx = c.transaction().map_err(db)?;
            for (node_id, replica, event) in &events {
                record_proxy_tx(&tx, node_id, replica, event)?;
            }
            tx.commit().map_err(db)
        })
        .await
}

pub(super) async fn list_proxies(store: &SqliteStore) -> Result<Vec<ProxyState>> {
    store
        .with_conn(|c| {
            query_list(
                c,
                "SELECT node_id, build_version, acked_epoch, acked_revision, nack_epoch, \
             nack_revision, nack_error, nack_at, last_seen, connected, replica, rejected \
             FROM proxies ORDER BY node_id",
                [],
                proxy_from_row,
            )
        })
        .await
}

pub(super) async fn upsert_quotas(store: &SqliteStore, quotas: &[AccountQuota]) -> Result<()> {
    if quotas.is_empty() {
        return Ok(());
    }
    let quotas = quotas.to_vec();
    store
        .with_conn(move |c| {
            let tx = c.transaction().map_err(db)?;
            {
                let mut stmt = tx
                    .prepare_cached(
                        "INSERT INTO account_quotas (account_id, observed_at, observed_by, status, reset_at, windows) \
                     SELECT ?1, ?2, ?3, ?4, ?5, ?6 WHERE EXISTS (SELECT 1 FROM accounts WHERE id = ?1) \
                     ON CONFLICT (account_id) DO UPDATE SET observed_at = excluded.observed_at, \
                     observed_by = excluded.observed_by, status = excluded.status, reset_at = excluded.reset_at, \
                     windows = excluded.windows WHERE account_quotas.observed_at < excluded.observed_at",
                    )
                    .map_err(db)?;
                for q in &quotas {
                    let windows = quota_windows_json(&q.windows)?;
                    stmt.execute(params![
                        q.account_id,
                        q.observed_at,
                        q.observed_by,
                        q.status,
                        q.reset_at,
                        windows
                    ])
                    .map_err(db)?;
                }
            }
            tx.commit().map_err(db)
        })
        .await
}

pub(super) async fn list_quotas(store: &SqliteStore) -> Result<Vec<AccountQuota>> {
    store
        .with_conn(|c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT account_id, observed_at, observed_by, status, reset_at, windows FROM account_quotas",
                )
                .map_err(db)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, String>(5)?,
                    ))
                })
                .map_err(db)?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(db)?;
            rows.into_iter()
                .map(|(account_id, observed_at, observed_by, status, reset_at, windows)| {
                    Ok(AccountQuota {
                        account_id,
                        observed_at,
                        observed_by,
                        status,
                        reset_at,
                        windows: quota_windows_from(windows)?,
                    })
                })
                .collect()
        })
        .await
}

pub(super) async fn stash_oauth(store: &SqliteStore, p: &OAuthPending) -> Result<()> {
    let p = p.clone();
    store.with_conn(move |c| {
        let known = c
            .query_row("SELECT 1 FROM accounts WHERE id = ?1", [&p.account_id], |_| Ok(()))
            .optional()
            .map_err(db)?
            .is_some();
        if !known {
            return Err(StoreError::NotFound {
                kind: "account",
                name: p.account_id.clone(),
            });
        }
        c.execute(
            "INSERT INTO oauth_pending (account_id, from_hash, sealed, created_at) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (account_id, from_hash) DO UPDATE SET sealed = excluded.sealed, created_at = excluded.created_at",
            params![p.account_id, p.from_hash, p.sealed, p.created_at],
        )
        .map_err(db)?;
        Ok(())
    })
    .await
}

pub(super) async fn list_oauth_pending(store: &SqliteStore) -> Result<Vec<OAuthPending>> {
    store
        .with_conn(|c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT account_id, from_hash, sealed, created_at FROM oauth_pending ORDER BY created_at",
                )
                .map_err(db)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(OAuthPending {
                        account_id: r.get(0)?,
                        from_hash: r.get(1)?,
                        sealed: r.get(2)?,
                        created_at: r.get(3)?,
                    })
                })
                .map_err(db)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db)
        })
        .await
}

pub(super) async fn drop_oauth_pending(store: &SqliteStore, account_id: &str, from_hash: &str) -> Result<()> {
    let (a, h) = (account_id.to_string(), from_hash.to_string());
    store
        .with_conn(move |c| {
            c.execute(
                "DELETE FROM oauth_pending WHERE account_id = ?1 AND from_hash = ?2",
                params![a, h],
            )
            .map_err(db)?;
            Ok(())
        })
        .await
}

pub(super) async fn claim_term(
    store: &SqliteStore,
    holder: &str,
    mechanism: &str,
    detail: &str,
    now_ms: Millis,
) -> Result<u64> {
    let (holder, mechanism, detail) = (holder.to_owned(), mechanism.to_owned(), detail.to_owned());
    store
        .with_conn(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db)?;
            tx.execute(
                "INSERT INTO leadership (name, term, holder, mechanism, since_ms, detail) \
             VALUES ('leader', 1, ?1, ?2, ?3, ?4) \
             ON CONFLICT (name) DO UPDATE SET term = leadership.term + 1, holder = excluded.holder, \
             mechanism = excluded.mechanism, since_ms = excluded.since_ms, detail = excluded.detail",
                params![holder, mechanism, now_ms, detail],
            )
            .map_err(db)?;
            let term: i64 = tx
                .query_row("SELECT term FROM leadership WHERE name = 'leader'", [], |r| r.get(0))
                .map_err(db)?;
            tx.commit().map_err(db)?;
            rev_from_db(term)
        })
        .await
}

pub(super) async fn leader(store: &SqliteStore) -> Result<Option<LeaderRecord>> {
    store
        .with_conn(|c| {
            c.query_row(
                "SELECT term, holder, mechanism, since_ms, detail FROM leadership WHERE name = 'leader'",
                [],
                |r| {
                    Ok(LeaderRecord {
                        term: col_u64(r, 0)?,
                        holder: r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                        mechanism: r.get::<_, Option<String>>(2)?.unwrap_or_default(),
                        since_ms: r.get::<_, Option<i64>>(3)?.unwrap_or_default(),
                        detail: r.get::<_, Option<String>>(4)?.unwrap_or_default(),
                    })
                },
            )
            .optional()
            .map_err(db)
        })
        .await
}

pub(super) async fn notify_enqueue(store: &SqliteStore, n: &Notification, change: &EpisodeChange) -> Result<bool> {
    let n = n.clone();
    let change = change.clone();
    store
        .with_conn(move |c| {
            let tx = c.transaction().map_err(db)?;
            let inserted = tx
                .execute(
                    "INSERT INTO notify_outbox (dedup_key, kind, subject, payload, created_ms, next_attempt_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5) ON CONFLICT (dedup_key) DO NOTHING",
                    params![n.dedup_key, n.kind, n.subject, n.payload, n.created_ms],
                )
                .map_err(db)?
                > 0;
            if inserted {
                match &change {
                    EpisodeChange::None => {}
                    EpisodeChange::Open { kind, episode } => {
                        tx.execute(
                            "INSERT INTO notify_episodes (kind, subject, episode, opened_ms) VALUES (?1, ?2, ?3, ?4) \
                         ON CONFLICT (kind, subject) DO NOTHING",
                            params![kind, n.subject, episode, n.created_ms],
                        )
                        .map_err(db)?;
                    }
                    EpisodeChange::Close { kind } => {
                        tx.execute(
                            "DELETE FROM notify_episodes WHERE kind = ?1 AND subject = ?2",
                            params![kind, n.subject],
                        )
                        .map_err(db)?;
                    }
                }
            }
            tx.commit().map_err(db)?;
            Ok(inserted)
        })
        .await
}

pub(super) async fn notify_open_episodes(store: &SqliteStore) -> Result<Vec<OpenEpisode>> {
    store
        .with_conn(|c| {
            query_list(
                c,
                "SELECT kind, subject, episode, opened_ms FROM notify_episodes ORDER BY kind, subject",
                [],
                |r| {
                    Ok(OpenEpisode {
                        kind: r.get(0)?,
                        subject: r.get(1)?,
                        episode: r.get(2)?,
                        opened_ms: r.get(3)?,
                    })
                },
            )
        })
        .await
}

pub(super) async fn notify_due(store: &SqliteStore, now: Millis, limit: u32) -> Result<Vec<Notification>> {
    store
        .with_conn(move |c| {
            query_list(
                c,
                "SELECT dedup_key, kind, subject, payload, created_ms, attempts FROM notify_outbox \
             WHERE state = 'pending' AND next_attempt_ms <= ?1 ORDER BY created_ms, dedup_key LIMIT ?2",
                params![now, i64::from(limit)],
                |r| {
                    Ok(Notification {
                        dedup_key: r.get(0)?,
                        kind: r.get(1)?,
                        subject: r.get(2)?,
                        payload: r.get(3)?,
                        created_ms: r.get(4)?,
                        attempts: u32::try_from(r.get::<_, i64>(5)?).unwrap_or(u32::MAX),
                    })
                },
            )
        })
        .await
}

pub(super) async fn notify_mark(
    store: &SqliteStore,
    dedup_key: &str,
    outcome: &DeliveryOutcome,
    now: Millis,
) -> Result<()> {
    let key = dedup_key.to_string();
    let outcome = outcome.clone();
    store
        .with_conn(move |c| {
            let (state, next, error) = match &outcome {
                DeliveryOutcome::Sent => ("sent", now, String::new()),
                DeliveryOutcome::Retry { next_attempt_ms, error } => ("pending", *next_attempt_ms, error.clone()),
                DeliveryOutcome::Failed { error } => ("failed", now, error.clone()),
            };
            let done = if state == "pending" { 0 } else { now };
            c.execute(
                "UPDATE notify_outbox SET state = ?2, attempts = attempts + 1, next_attempt_ms = ?3, \
             last_error = ?4, done_ms = ?5 WHERE dedup_key = ?1 AND state = 'pending'",
                params![key, state, next, error, done],
            )
            .map_err(db)?;
            Ok(())
        })
        .await
}

pub(super) async fn notify_recent(store: &SqliteStore, limit: u32) -> Result<Vec<OutboxEntry>> {
    store
        .with_conn(move |c| {
            query_list(
                c,
                "SELECT dedup_key, kind, subject, payload, created_ms, attempts, state, next_attempt_ms, \
             last_error, done_ms FROM notify_outbox ORDER BY created_ms DESC, dedup_key LIMIT ?1",
                params![i64::from(limit)],
                |r| {
                    Ok(OutboxEntry {
                        notification: Notification {
                            dedup_key: r.get(0)?,
                            kind: r.get(1)?,
                            subject: r.get(2)?,
                            payload: r.get(3)?,
                            created_ms: r.get(4)?,
                            attempts: u32::try_from(r.get::<_, i64>(5)?).unwrap_or(u32::MAX),
                        },
                        state: r.get(6)?,
                        next_attempt_ms: r.get(7)?,
                        last_error: r.get(8)?,
                        done_ms: r.get(9)?,
                    })
                },
            )
        })
        .await
}

pub(super) async fn notify_stats(store: &SqliteStore) -> Result<OutboxStats> {
    store
        .with_conn(|c| {
            c.query_row(
                "SELECT COUNT(*), MIN(created_ms) FROM notify_outbox WHERE state = 'pending'",
                [],
                |r| {
                    Ok(OutboxStats {
                        pending: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
                        oldest_created_ms: r.get(1)?,
                    })
                },
            )
            .map_err(db)
        })
        .await
}

pub(super) async fn end_console_session(
    store: &SqliteStore,
    session: &str,
    expires_at: Millis,
    now: Millis,
) -> Result<()> {
    let session = session.to_string();
    store
        .with_conn(move |c| {
            c.execute("DELETE FROM console_signouts WHERE expires_at <= ?1", params![now])
                .map_err(db)?;
            c.execute(
                "INSERT INTO console_signouts (session, expires_at) VALUES (?1, ?2) ON CONFLICT (session) DO NOTHING",
                params![session, expires_at],
            )
            .map_err(db)?;
            Ok(())
        })
        .await
}

pub(super) async fn console_session_ended(store: &SqliteStore, session: &str) -> Result<bool> {
    let session = session.to_string();
    store
        .with_conn(move |c| {
            let n: i64 = c
                .query_row(
                    "SELECT COUNT(*) FROM console_signouts WHERE session = ?1",
                    params![session],
                    |r| r.get(0),
                )
                .map_err(db)?;
            Ok(n > 0)
        })
        .await
}
