//! Postgres: what is not config but kept all the same: data planes' Watch records, quota
//! observations, OAuth answers waiting for their commit, the leadership term, and the
//! notification outbox with its episodes.

use super::error::{pg, to_u64};
use super::rows::{col, version_opt};
use super::PostgresStore;
use crate::model::*;
use crate::store::rules::to_i64;
use crate::store::{
    quota_windows_from, quota_windows_json, DeliveryOutcome, EpisodeChange, LeaderRecord, Notification, OpenEpisode,
    OutboxEntry, OutboxStats, ProxyRecord, Result, StoreError,
};
use tokio_postgres::error::SqlState;

pub(super) async fn record_proxy(store: &PostgresStore, node_id: &str, replica: &str, event: ProxyEvent) -> Result<()> {
    record_proxies(store, &[(node_id.to_string(), replica.to_string(), event)]).await
}

/// Data planes' Watch events, in order, in one transaction (one commit for a thousand ACKs), one
/// statement per run of events of one kind: ten thousand data planes ACKing one change cost a
/// handful of statements, not two round trips each (which kept Postgres busy for seconds after
/// every change at that scale, beside the fan-out of the next one).
pub(super) async fn record_proxies(store: &PostgresStore, events: &[ProxyRecord]) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    // Every value checked before anything is sent: a batch the store cannot hold writes nothing.
    let version =
        |v: &Version| -> Result<(i64, i64)> { Ok((to_i64(v.epoch, "epoch")?, to_i64(v.revision, "revision")?)) };
    for (_, _, event) in events {
        if let ProxyEvent::Acked { version: v, .. } | ProxyEvent::Nacked { version: v, .. } = event {
            version(v)?;
        }
    }
    let mut c = store.client().await?;
    let tx = c.transaction().await.map_err(pg)?;
    let now = now_ms();
    // Every node known first (a node's first event creates its row).
    let mut seen = std::collections::HashSet::with_capacity(events.len());
    let (mut nodes, mut replicas): (Vec<&str>, Vec<&str>) = (Vec::new(), Vec::new());
    for (node, replica, _) in events {
        if seen.insert(node.as_str()) {
            nodes.push(node);
            replicas.push(replica);
        }
    }
    let known = tx
        .prepare_cached(
            "INSERT INTO proxies (node_id, last_seen, connected, replica) \
             SELECT n, $2, FALSE, r FROM unnest($1::TEXT[], $3::TEXT[]) AS u(n, r) \
             ON CONFLICT (node_id) DO NOTHING",
        )
        .await
        .map_err(pg)?;
    tx.execute(&known, &[&nodes, &now, &replicas]).await.map_err(pg)?;
    // Runs of one kind from one replica, in order; within a run each node's last event is the
    // one that counts (each sets the same fields from its own values alone).
    for run in events.chunk_by(|a, b| a.1 == b.1 && std::mem::discriminant(&a.2) == std::mem::discriminant(&b.2)) {
        let replica = run[0].1.as_str();
        let mut last: std::collections::HashMap<&str, &ProxyEvent> =
            std::collections::HashMap::with_capacity(run.len());
        let mut order: Vec<&str> = Vec::with_capacity(run.len());
        for (node, _, event) in run {
            if last.insert(node.as_str(), event).is_none() {
                order.push(node);
            }
        }
        let events: Vec<(&str, &ProxyEvent)> = order.iter().filter_map(|n| Some((*n, *last.get(n)?))).collect();
        let nodes: Vec<&str> = events.iter().map(|(n, _)| *n).collect();
        match run[0].2 {
            ProxyEvent::Connected { .. } => {
                let builds: Vec<&str> = events
                    .iter()
                    .map(|(_, e)| match e {
                        ProxyEvent::Connected { build_version, .. } => build_version.as_str(),
                        _ => "",
                    })
                    .collect();
                let st = tx
                    .prepare_cached(
                        "UPDATE proxies p SET build_version = u.b, connected = TRUE, replica = $3, last_seen = $4 \
                         FROM unnest($1::TEXT[], $2::TEXT[]) AS u(n, b) WHERE p.node_id = u.n",
                    )
                    .await
                    .map_err(pg)?;
                tx.execute(&st, &[&nodes, &builds, &replica, &now]).await
            }
            ProxyEvent::Acked { .. } => {
                let (mut epochs, mut revisions, mut rejected) = (Vec::new(), Vec::new(), Vec::new());
                for (_, e) in &events {
                    if let ProxyEvent::Acked { version: v, rejected: r } = e {
                        let (e, r2) = version(v)?;
                        epochs.push(e);
                        revisions.push(r2);
                        rejected.push(rejected_to_json(r));
                    }
                }
                // A NACK is history once a later version is applied.
                let st = tx
                    .prepare_cached(
                        "UPDATE proxies p SET acked_epoch = u.e, acked_revision = u.r, last_seen = $5, \
                         rejected = u.j, \
                         nack_epoch = CASE WHEN p.nack_epoch <> u.e OR p.nack_revision <= u.r THEN NULL ELSE p.nack_epoch END, \
                         nack_revision = CASE WHEN p.nack_epoch <> u.e OR p.nack_revision <= u.r THEN NULL ELSE p.nack_revision END, \
                         nack_error = CASE WHEN p.nack_epoch <> u.e OR p.nack_revision <= u.r THEN '' ELSE p.nack_error END, \
                         nack_at = CASE WHEN p.nack_epoch <> u.e OR p.nack_revision <= u.r THEN 0 ELSE p.nack_at END \
                         FROM unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[], $4::TEXT[]) AS u(n, e, r, j) \
                         WHERE p.node_id = u.n",
                    )
                    .await
                    .map_err(pg)?;
                tx.execute(&st, &[&nodes, &epochs, &revisions, &rejected, &now]).await
            }
            ProxyEvent::Nacked { .. } => {
                let (mut epochs, mut revisions, mut errors) = (Vec::new(), Vec::new(), Vec::new());
                for (_, e) in &events {
                    if let ProxyEvent::Nacked { version: v, error, .. } = e {
                        let (e, r) = version(v)?;
                        epochs.push(e);
                        revisions.push(r);
                        errors.push(error.as_str());
                    }
                }
                let st = tx
                    .prepare_cached(
                        "UPDATE proxies p SET nack_epoch = u.e, nack_revision = u.r, nack_error = u.m, nack_at = $5, \
                         last_seen = $5 FROM unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[], $4::TEXT[]) AS u(n, e, r, m) \
                         WHERE p.node_id = u.n",
                    )
                    .await
                    .map_err(pg)?;
                tx.execute(&st, &[&nodes, &epochs, &revisions, &errors, &now]).await
            }
            ProxyEvent::Seen => {
                let st = tx
                    .prepare_cached(
                        "UPDATE proxies SET last_seen = $3 WHERE node_id = ANY($1::TEXT[]) AND replica = $2 AND connected",
                    )
                    .await
                    .map_err(pg)?;
                tx.execute(&st, &[&nodes, &replica, &now]).await
            }
            ProxyEvent::Disconnected => {
                let st = tx
                    .prepare_cached(
                        "UPDATE proxies SET connected = (replica <> $2) AND connected, last_seen = $3 \
                         WHERE node_id = ANY($1::TEXT[])",
                    )
                    .await
                    .map_err(pg)?;
                tx.execute(&st, &[&nodes, &replica, &now]).await
            }
        }
        .map_err(pg)?;
    }
    tx.commit().await.map_err(pg)?;
    Ok(())
}

pub(super) async fn list_proxies(store: &PostgresStore) -> Result<Vec<ProxyState>> {
    let c = store.client().await?;
    let rows = c
        .query(
            "SELECT node_id, build_version, acked_epoch, acked_revision, nack_epoch, nack_revision, nack_error, \
             nack_at, last_seen, connected, replica, rejected FROM proxies ORDER BY node_id",
            &[],
        )
        .await
        .map_err(pg)?;
    rows.iter()
        .map(|r| {
            Ok(ProxyState {
                node_id: col(r, 0)?,
                build_version: col(r, 1)?,
                acked: version_opt(col(r, 2)?, col(r, 3)?)?,
                nack_version: version_opt(col(r, 4)?, col(r, 5)?)?,
                nack_error: col(r, 6)?,
                nack_at: col(r, 7)?,
                last_seen: col(r, 8)?,
                connected: col(r, 9)?,
                replica: col(r, 10)?,
                rejected: rejected_from_json(col(r, 11)?),
            })
        })
        .collect()
}

pub(super) async fn upsert_quotas(store: &PostgresStore, quotas: &[AccountQuota]) -> Result<()> {
    if quotas.is_empty() {
        return Ok(());
    }
    let c = store.client().await?;
    let stmt = c
        .prepare_cached(
            "INSERT INTO account_quotas (account_id, observed_at, observed_by, status, reset_at, windows) \
             SELECT $1, $2, $3, $4, $5, $6 WHERE EXISTS (SELECT 1 FROM accounts WHERE id = $1) \
             ON CONFLICT (account_id) DO UPDATE SET observed_at = EXCLUDED.observed_at, \
             observed_by = EXCLUDED.observed_by, status = EXCLUDED.status, reset_at = EXCLUDED.reset_at, \
             windows = EXCLUDED.windows WHERE account_quotas.observed_at < EXCLUDED.observed_at",
        )
        .await
        .map_err(pg)?;
    for q in quotas {
        let windows = quota_windows_json(&q.windows)?;
        match c
            .execute(
                &stmt,
                &[
                    &q.account_id,
                    &q.observed_at,
                    &q.observed_by,
                    &q.status,
                    &q.reset_at,
                    &windows,
                ],
            )
            .await
        {
            Ok(_) => {}
            // The account was deleted meanwhile.
            Err(e) if e.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION) => {}
            Err(e) => return Err(pg(e)),
        }
    }
    Ok(())
}

pub(super) async fn list_quotas(store: &PostgresStore) -> Result<Vec<AccountQuota>> {
    let c = store.client().await?;
    c.query(
        "SELECT account_id, observed_at, observed_by, status, reset_at, windows FROM account_quotas",
        &[],
    )
    .await
    .map_err(pg)?
    .iter()
    .map(|r| {
        Ok(AccountQuota {
            account_id: col(r, 0)?,
            observed_at: col(r, 1)?,
            observed_by: col(r, 2)?,
            status: col(r, 3)?,
            reset_at: col(r, 4)?,
            windows: quota_windows_from(col(r, 5)?)?,
        })
    })
    .collect()
}

pub(super) async fn stash_oauth(store: &PostgresStore, p: &OAuthPending) -> Result<()> {
    let c = store.client().await?;
    let r = c
        .execute(
            "INSERT INTO oauth_pending (account_id, from_hash, sealed, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (account_id, from_hash) DO UPDATE SET sealed = EXCLUDED.sealed, created_at = EXCLUDED.created_at",
            &[&p.account_id, &p.from_hash, &p.sealed, &p.created_at],
        )
        .await;
    match r {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION) => Err(StoreError::NotFound {
            kind: "account",
            name: p.account_id.clone(),
        }),
        Err(e) => Err(pg(e)),
    }
}

pub(super) async fn list_oauth_pending(store: &PostgresStore) -> Result<Vec<OAuthPending>> {
    let c = store.client().await?;
    c.query(
        "SELECT account_id, from_hash, sealed, created_at FROM oauth_pending ORDER BY created_at",
        &[],
    )
    .await
    .map_err(pg)?
    .iter()
    .map(|r| {
        Ok(OAuthPending {
            account_id: col(r, 0)?,
            from_hash: col(r, 1)?,
            sealed: col(r, 2)?,
            created_at: col(r, 3)?,
        })
    })
    .collect::<Result<_>>()
}

pub(super) async fn drop_oauth_pending(store: &PostgresStore, account_id: &str, from_hash: &str) -> Result<()> {
    let c = store.client().await?;
    c.execute(
        "DELETE FROM oauth_pending WHERE account_id = $1 AND from_hash = $2",
        &[&account_id, &from_hash],
    )
    .await
    .map_err(pg)?;
    Ok(())
}

pub(super) async fn claim_term(
    store: &PostgresStore,
    holder: &str,
    mechanism: &str,
    detail: &str,
    now_ms: Millis,
) -> Result<u64> {
    let c = store.client().await?;
    let row = c
        .query_one(
            "INSERT INTO leadership (name, term, holder, mechanism, since_ms, detail) \
             VALUES ('leader', 1, $1, $2, $3, $4) \
             ON CONFLICT (name) DO UPDATE SET term = leadership.term + 1, holder = EXCLUDED.holder, \
             mechanism = EXCLUDED.mechanism, since_ms = EXCLUDED.since_ms, detail = EXCLUDED.detail \
             RETURNING term",
            &[&holder, &mechanism, &now_ms, &detail],
        )
        .await
        .map_err(pg)?;
    to_u64(col(&row, 0)?, "term")
}

pub(super) async fn leader(store: &PostgresStore) -> Result<Option<LeaderRecord>> {
    let c = store.client().await?;
    let row = c
        .query_opt(
            "SELECT term, holder, mechanism, since_ms, detail FROM leadership WHERE name = 'leader'",
            &[],
        )
        .await
        .map_err(pg)?;
    row.map(|r| {
        Ok(LeaderRecord {
            term: to_u64(col(&r, 0)?, "term")?,
            holder: col::<Option<String>, _>(&r, 1)?.unwrap_or_default(),
            mechanism: col::<Option<String>, _>(&r, 2)?.unwrap_or_default(),
            since_ms: col::<Option<i64>, _>(&r, 3)?.unwrap_or_default(),
            detail: col::<Option<String>, _>(&r, 4)?.unwrap_or_default(),
        })
    })
    .transpose()
}

pub(super) async fn notify_enqueue(store: &PostgresStore, n: &Notification, change: &EpisodeChange) -> Result<bool> {
    let mut c = store.client().await?;
    let tx = c.transaction().await.map_err(pg)?;
    let inserted = tx
        .execute(
            "INSERT INTO notify_outbox (dedup_key, kind, subject, payload, created_ms, next_attempt_ms) \
             VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT (dedup_key) DO NOTHING",
            &[&n.dedup_key, &n.kind, &n.subject, &n.payload, &n.created_ms],
        )
        .await
        .map_err(pg)?
        > 0;
    if inserted {
        match change {
            EpisodeChange::None => {}
            EpisodeChange::Open { kind, episode } => {
                tx.execute(
                    "INSERT INTO notify_episodes (kind, subject, episode, opened_ms) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (kind, subject) DO NOTHING",
                    &[kind, &n.subject, episode, &n.created_ms],
                )
                .await
                .map_err(pg)?;
            }
            EpisodeChange::Close { kind } => {
                tx.execute(
                    "DELETE FROM notify_episodes WHERE kind = $1 AND subject = $2",
                    &[kind, &n.subject],
                )
                .await
                .map_err(pg)?;
            }
        }
    }
    tx.commit().await.map_err(pg)?;
    Ok(inserted)
}

pub(super) async fn notify_open_episodes(store: &PostgresStore) -> Result<Vec<OpenEpisode>> {
    let c = store.client().await?;
    let rows = c
        .query(
            "SELECT kind, subject, episode, opened_ms FROM notify_episodes ORDER BY kind, subject",
            &[],
        )
        .await
        .map_err(pg)?;
    rows.iter()
        .map(|r| {
            Ok(OpenEpisode {
                kind: col(r, 0)?,
                subject: col(r, 1)?,
                episode: col(r, 2)?,
                opened_ms: col(r, 3)?,
            })
        })
        .collect::<Result<_>>()
}

pub(super) async fn notify_due(store: &PostgresStore, now: Millis, limit: u32) -> Result<Vec<Notification>> {
    let c = store.client().await?;
    let rows = c
        .query(
            "SELECT dedup_key, kind, subject, payload, created_ms, attempts FROM notify_outbox \
             WHERE state = 'pending' AND next_attempt_ms <= $1 ORDER BY created_ms, dedup_key LIMIT $2",
            &[&now, &i64::from(limit)],
        )
        .await
        .map_err(pg)?;
    rows.iter()
        .map(|r| {
            Ok(Notification {
                dedup_key: col(r, 0)?,
                kind: col(r, 1)?,
                subject: col(r, 2)?,
                payload: col(r, 3)?,
                created_ms: col(r, 4)?,
                attempts: u32::try_from(col::<i32, _>(r, 5)?).unwrap_or(0),
            })
        })
        .collect::<Result<_>>()
}

pub(super) async fn notify_mark(
    store: &PostgresStore,
    dedup_key: &str,
    outcome: &DeliveryOutcome,
    now: Millis,
) -> Result<()> {
    let (state, next, error) = match outcome {
        DeliveryOutcome::Sent => ("sent", now, String::new()),
        DeliveryOutcome::Retry { next_attempt_ms, error } => ("pending", *next_attempt_ms, error.clone()),
        DeliveryOutcome::Failed { error } => ("failed", now, error.clone()),
    };
    let done: i64 = if state == "pending" { 0 } else { now };
    let c = store.client().await?;
    c.execute(
        "UPDATE notify_outbox SET state = $2, attempts = attempts + 1, next_attempt_ms = $3, \
         last_error = $4, done_ms = $5 WHERE dedup_key = $1 AND state = 'pending'",
        &[&dedup_key, &state, &next, &error, &done],
    )
    .await
    .map_err(pg)?;
    Ok(())
}

pub(super) async fn notify_recent(store: &PostgresStore, limit: u32) -> Result<Vec<OutboxEntry>> {
    let c = store.client().await?;
    let rows = c
        .query(
            "SELECT dedup_key, kind, subject, payload, created_ms, attempts, state, next_attempt_ms, \
             last_error, done_ms FROM notify_outbox ORDER BY created_ms DESC, dedup_key LIMIT $1",
            &[&i64::from(limit)],
        )
        .await
        .map_err(pg)?;
    rows.iter()
        .map(|r| {
            Ok(OutboxEntry {
                notification: Notification {
                    dedup_key: col(r, 0)?,
                    kind: col(r, 1)?,
                    subject: col(r, 2)?,
                    payload: col(r, 3)?,
                    created_ms: col(r, 4)?,
                    attempts: u32::try_from(col::<i32, _>(r, 5)?).unwrap_or(0),
                },
                state: col(r, 6)?,
                next_attempt_ms: col(r, 7)?,
                last_error: col(r, 8)?,
                done_ms: col(r, 9)?,
            })
        })
        .collect::<Result<_>>()
}

pub(super) async fn notify_stats(store: &PostgresStore) -> Result<OutboxStats> {
    let c = store.client().await?;
    let r = c
        .query_one(
            "SELECT COUNT(*), MIN(created_ms) FROM notify_outbox WHERE state = 'pending'",
            &[],
        )
        .await
        .map_err(pg)?;
    Ok(OutboxStats {
        pending: u64::try_from(col::<i64, _>(&r, 0)?).unwrap_or(0),
        oldest_created_ms: col(&r, 1)?,
    })
}

pub(super) async fn end_console_session(
    store: &PostgresStore,
    session: &str,
    expires_at: Millis,
    now: Millis,
) -> Result<()> {
    let c = store.client().await?;
    c.execute("DELETE FROM console_signouts WHERE expires_at <= $1", &[&now])
        .await
        .map_err(pg)?;
    c.execute(
        "INSERT INTO console_signouts (session, expires_at) VALUES ($1, $2) ON CONFLICT (session) DO NOTHING",
        &[&session, &expires_at],
    )
    .await
    .map_err(pg)?;
    Ok(())
}

pub(super) async fn console_session_ended(store: &PostgresStore, session: &str) -> Result<bool> {
    let c = store.client().await?;
    let row = c
        .query_one("SELECT COUNT(*) FROM console_signouts WHERE session = $1", &[&session])
        .await
        .map_err(pg)?;
    let n: i64 = col(&row, 0)?;
    Ok(n > 0)
}
