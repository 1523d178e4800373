//! Postgres store (tokio-postgres + deadpool-postgres) for the distributed
//! control plane. Numbered migrations are applied at start under an advisory
//! lock, so replicas starting together migrate once. A dedicated connection
//! `LISTEN`s for head changes committed by other replicas (a hint only: the
//! config watcher also polls).

//!
//! Layout: `error.rs` (driver errors as typed store errors), `rows.rs` (rows to domain types,
//! the config reads), `config_tx.rs` (the SQL under `store/rules.rs`, which holds the checks of
//! every config write), `usage.rs` (usage rows, the request log, retention), `ops.rs` (data-plane
//! records, quotas, OAuth hand-over, leadership, the notification outbox).

mod capture;
mod config_tx;
mod error;
mod ops;
mod rows;
mod usage;

use super::rules::{self, to_i64, ConfigTx};
use super::{
    DeliveryOutcome, EpisodeChange, IngestResult, LeaderRecord, Notification, OpenEpisode, OutboxEntry, OutboxStats,
    Result, Store, StoreError,
};
use crate::model::*;
use config_tx::PgTx;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use error::{pg, pool_err, to_u64, CONNECT_TIMEOUT};
use rows::*;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;

/// Numbered schema migrations, applied in order at connect (public for the upgrade tests, which
/// build a database at an older version).
pub const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../../migrations/postgres/0001_init.sql")),
    (2, include_str!("../../../migrations/postgres/0002_account_states.sql")),
    (3, include_str!("../../../migrations/postgres/0003_proxy_url_enc.sql")),
    (4, include_str!("../../../migrations/postgres/0004_config_sync.sql")),
    (5, include_str!("../../../migrations/postgres/0005_usage_anomaly.sql")),
    (6, include_str!("../../../migrations/postgres/0006_group_limits.sql")),
    (7, include_str!("../../../migrations/postgres/0007_deleted_names.sql")),
    (8, include_str!("../../../migrations/postgres/0008_leadership.sql")),
    (9, include_str!("../../../migrations/postgres/0009_oauth_accounts.sql")),
    (
        10,
        include_str!("../../../migrations/postgres/0010_quotas_and_refresh.sql"),
    ),
    (
        11,
        include_str!("../../../migrations/postgres/0011_client_request_id.sql"),
    ),
    (12, include_str!("../../../migrations/postgres/0012_queue_wait.sql")),
    (13, include_str!("../../../migrations/postgres/0013_group_routing.sql")),
    (14, include_str!("../../../migrations/postgres/0014_request_log.sql")),
    (15, include_str!("../../../migrations/postgres/0015_notify_outbox.sql")),
    (
        16,
        include_str!("../../../migrations/postgres/0016_request_model_group.sql"),
    ),
    (17, include_str!("../../../migrations/postgres/0017_usage_daily.sql")),
    (18, include_str!("../../../migrations/postgres/0018_capture.sql")),
    (
        19,
        include_str!("../../../migrations/postgres/0019_console_signouts.sql"),
    ),
];
const NOTIFY_CHANNEL: &str = "relay_config";
/// `application_name` of the LISTEN connection.
pub const LISTEN_APPLICATION_NAME: &str = "relay-config-listener";
/// Arbitrary, fixed key for the migration advisory lock.
const MIGRATION_LOCK: i64 = 0x7265_6c61_7900_0001;

pub struct PostgresStore {
    pool: Pool,
    hint: Arc<Notify>,
    listener: tokio::task::JoinHandle<()>,
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl PostgresStore {
    /// Connects, applies pending migrations and starts the `LISTEN` task.
    pub async fn connect(url: &str, max_connections: usize) -> Result<Self> {
        let super::pg_tls::PgTarget { config: cfg, tls, .. } = super::pg_tls::target(url)?;
        let mgr = Manager::from_config(
            cfg.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        // A new connection that does not become a Postgres session in time (a host:port where
        // something else listens) is an error that says so, not a silent hang.
        let pool = Pool::builder(mgr)
            .max_size(max_connections.max(2))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::internal("cannot build the database pool", e))?;
        migrate(&pool).await?;
        let hint = Arc::new(Notify::new());
        let listener = tokio::spawn(listen_loop(cfg, tls, hint.clone()));
        Ok(Self { pool, hint, listener })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(pool_err)
    }
}

async fn migrate(pool: &Pool) -> Result<()> {
    let mut c = pool.get().await.map_err(pool_err)?;
    let tx = c.transaction().await.map_err(pg)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg)?;
    // Created only when missing (under the lock): `IF NOT EXISTS` would have the server send a
    // NOTICE ("relation already exists") on every start.
    let exists: bool = col(
        &tx.query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
            .await
            .map_err(pg)?,
        0,
    )?;
    if !exists {
        tx.batch_execute("CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)")
            .await
            .map_err(pg)?;
    }
    let done: Vec<i64> = tx
        .query("SELECT version FROM schema_migrations", &[])
        .await
        .map_err(pg)?
        .iter()
        .map(|r| col(r, 0))
        .collect::<Result<_>>()?;
    for (version, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        tx.batch_execute(sql).await.map_err(|e| StoreError::Migration {
            message: format!("{version}: {}", error::explain(&e)),
            source: Some(e.into()),
        })?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
            &[version, &now_ms()],
        )
        .await
        .map_err(pg)?;
    }
    tx.commit().await.map_err(pg)
}

/// Keeps a `LISTEN relay_config` connection open and turns notifications into
/// hints; reconnects with backoff. The poll in the config watcher covers gaps.
async fn listen_loop(
    mut cfg: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    hint: Arc<Notify>,
) {
    // Named, so operators (and tests) can tell the listener from pool connections.
    cfg.application_name(LISTEN_APPLICATION_NAME);
    let mut backoff = Duration::from_millis(200);
    loop {
        match cfg.connect(tls.clone()).await {
            Ok((client, mut conn)) => {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    let mut stream = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
                    use futures::StreamExt;
                    while let Some(msg) = stream.next().await {
                        match msg {
                            Ok(AsyncMessage::Notification(_)) => {
                                if tx.send(()).is_err() {
                                    break;
                                }
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "config LISTEN connection failed");
                                break;
                            }
                        }
                    }
                });
                if let Err(e) = client.batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}")).await {
                    tracing::warn!(error = %e, "LISTEN failed");
                } else {
                    backoff = Duration::from_millis(200);
                    // Something may have changed while we were not listening.
                    hint.notify_waiters();
                    while rx.recv().await.is_some() {
                        hint.notify_waiters();
                    }
                }
                driver.abort();
            }
            Err(e) => tracing::warn!(error = %e, "cannot open config LISTEN connection"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

#[async_trait::async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn change_hint(&self) -> Arc<Notify> {
        self.hint.clone()
    }

    async fn head(&self) -> Result<Version> {
        head_of(&self.client().await?).await
    }

    async fn apply(&self, mutations: Vec<Mutation>, audit: AuditRecord) -> Result<Version> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let head = rules::apply(&mut PgTx { tx: &tx }, &mutations, &audit).await?;
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[&NOTIFY_CHANNEL, &head.revision.to_string()],
        )
        .await
        .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        self.hint.notify_waiters();
        self.hint.notify_one();
        Ok(head)
    }

    async fn start_new_epoch(&self, seen: Version, at_least: u64, reason: &str) -> Result<Version> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let (e, r) = (to_i64(seen.epoch, "epoch")?, to_i64(seen.revision, "revision")?);
        let floor = to_i64(at_least, "epoch")?;
        let row = tx
            .query_opt(
                "UPDATE config_head SET epoch = GREATEST(epoch + 1, $3, (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT) \
                 WHERE epoch = $1 AND revision = $2 RETURNING epoch, revision",
                &[&e, &r, &floor],
            )
            .await
            .map_err(pg)?;
        if row.is_none() {
            drop(tx);
            return self.head().await;
        }
        PgTx { tx: &tx }
            .append_audit(&rules::new_epoch_audit(reason), r)
            .await?;
        tx.execute("SELECT pg_notify($1, $2)", &[&NOTIFY_CHANNEL, &r.to_string()])
            .await
            .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        self.hint.notify_waiters();
        self.hint.notify_one();
        self.head().await
    }

    async fn load_config(&self) -> Result<ConfigState> {
        let mut c = self.client().await?;
        let tx = c
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(pg)?;
        let version = head_of(&tx).await?;
        let api_keys = tx
            .query("SELECT * FROM api_keys ORDER BY name", &[])
            .await
            .map_err(pg)?
            .iter()
            .map(key_from)
            .collect::<Result<_>>()?;
        let accounts = load_accounts(&tx, None).await?;
        let groups = load_groups(&tx, None).await?;
        let prices = tx
            .query("SELECT * FROM prices ORDER BY model_pattern, effective_from", &[])
            .await
            .map_err(pg)?
            .iter()
            .map(price_from)
            .collect::<Result<_>>()?;
        let settings = load_settings(&tx).await?;
        let account_states = load_states(&tx).await?;
        let capture_rules = capture::load_rules(&tx).await?;
        tx.commit().await.map_err(pg)?;
        Ok(ConfigState {
            version,
            api_keys,
            accounts,
            groups,
            prices,
            settings,
            account_states,
            capture_rules,
        })
    }

    async fn list_accounts(&self) -> Result<Vec<Account>> {
        load_accounts(&self.client().await?, None).await
    }

    async fn get_account(&self, id_or_name: &str) -> Result<Option<Account>> {
        Ok(load_accounts(&self.client().await?, Some(id_or_name))
            .await?
            .into_iter()
            .next())
    }

    async fn list_api_keys(&self) -> Result<Vec<ApiKey>> {
        let c = self.client().await?;
        c.query("SELECT * FROM api_keys ORDER BY name", &[])
            .await
            .map_err(pg)?
            .iter()
            .map(key_from)
            .collect()
    }

    async fn get_api_key(&self, id_or_name: &str) -> Result<Option<ApiKey>> {
        let c = self.client().await?;
        c.query_opt(
            "SELECT * FROM api_keys WHERE id = $1 OR name = $1 ORDER BY (id = $1) DESC LIMIT 1",
            &[&id_or_name],
        )
        .await
        .map_err(pg)?
        .as_ref()
        .map(key_from)
        .transpose()
    }

    async fn list_groups(&self) -> Result<Vec<Group>> {
        load_groups(&self.client().await?, None).await
    }

    async fn get_group(&self, id_or_name: &str) -> Result<Option<Group>> {
        Ok(load_groups(&self.client().await?, Some(id_or_name))
            .await?
            .into_iter()
            .next())
    }

    async fn list_prices(&self) -> Result<Vec<Price>> {
        let c = self.client().await?;
        c.query("SELECT * FROM prices ORDER BY model_pattern, effective_from", &[])
            .await
            .map_err(pg)?
            .iter()
            .map(price_from)
            .collect()
    }

    async fn settings(&self) -> Result<BTreeMap<String, String>> {
        load_settings(&self.client().await?).await
    }

    async fn list_account_states(&self) -> Result<Vec<AccountState>> {
        load_states(&self.client().await?).await
    }

    async fn list_admin_tokens(&self) -> Result<Vec<AdminToken>> {
        let c = self.client().await?;
        c.query("SELECT * FROM admin_tokens ORDER BY name", &[])
            .await
            .map_err(pg)?
            .iter()
            .map(token_from)
            .collect()
    }

    async fn find_admin_token(&self, token_hash: &str) -> Result<Option<AdminToken>> {
        let c = self.client().await?;
        c.query_opt("SELECT * FROM admin_tokens WHERE token_hash = $1", &[&token_hash])
            .await
            .map_err(pg)?
            .as_ref()
            .map(token_from)
            .transpose()
    }

    async fn list_audit(&self, limit: u32, since: Option<Millis>) -> Result<Vec<AuditEntry>> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT id, at, actor, action, target, detail, revision FROM audit_log \
                 WHERE at >= $1 ORDER BY id DESC LIMIT $2",
                &[&since.unwrap_or(i64::MIN), &i64::from(limit)],
            )
            .await
            .map_err(pg)?;
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    id: to_u64(col(r, 0)?, "id")?,
                    at: col(r, 1)?,
                    actor: col(r, 2)?,
                    action: col(r, 3)?,
                    target: col(r, 4)?,
                    detail: col(r, 5)?,
                    revision: to_u64(col(r, 6)?, "revision")?,
                })
            })
            .collect()
    }

    async fn audit_at_revisions(&self, revisions: &[u64]) -> Result<Vec<AuditEntry>> {
        let revisions = revisions
            .iter()
            .map(|r| to_i64(*r, "revision"))
            .collect::<Result<Vec<i64>>>()?;
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT id, at, actor, action, target, detail, revision FROM audit_log WHERE revision = ANY($1)",
                &[&revisions],
            )
            .await
            .map_err(pg)?;
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    id: to_u64(col(r, 0)?, "id")?,
                    at: col(r, 1)?,
                    actor: col(r, 2)?,
                    action: col(r, 3)?,
                    target: col(r, 4)?,
                    detail: col(r, 5)?,
                    revision: to_u64(col(r, 6)?, "revision")?,
                })
            })
            .collect()
    }

    async fn record_proxy(&self, node_id: &str, replica: &str, event: ProxyEvent) -> Result<()> {
        ops::record_proxy(self, node_id, replica, event).await
    }

    async fn record_proxies(&self, events: &[crate::store::ProxyRecord]) -> Result<()> {
        ops::record_proxies(self, events).await
    }

    async fn list_proxies(&self) -> Result<Vec<ProxyState>> {
        ops::list_proxies(self).await
    }

    async fn insert_usage(&self, events: &[UsageEvent]) -> Result<IngestResult> {
        usage::insert_usage(self, events).await
    }

    async fn query_usage(&self, q: UsageQuery) -> Result<Vec<UsageRow>> {
        usage::query_usage(self, q).await
    }

    async fn spend_by_key(&self, since: Millis, until: Millis) -> Result<BTreeMap<String, u64>> {
        usage::spend_by_key(self, since, until).await
    }

    async fn upsert_quotas(&self, quotas: &[AccountQuota]) -> Result<()> {
        ops::upsert_quotas(self, quotas).await
    }

    async fn list_quotas(&self) -> Result<Vec<AccountQuota>> {
        ops::list_quotas(self).await
    }

    async fn stash_oauth(&self, p: &OAuthPending) -> Result<()> {
        ops::stash_oauth(self, p).await
    }

    async fn list_oauth_pending(&self) -> Result<Vec<OAuthPending>> {
        ops::list_oauth_pending(self).await
    }

    async fn drop_oauth_pending(&self, account_id: &str, from_hash: &str) -> Result<()> {
        ops::drop_oauth_pending(self, account_id, from_hash).await
    }

    async fn end_console_session(&self, session: &str, expires_at: Millis, now: Millis) -> Result<()> {
        ops::end_console_session(self, session, expires_at, now).await
    }

    async fn console_session_ended(&self, session: &str) -> Result<bool> {
        ops::console_session_ended(self, session).await
    }

    async fn request_page(&self, page: RequestPage) -> Result<Vec<(Millis, String)>> {
        usage::request_page(self, page).await
    }

    async fn request_events(&self, request_ids: &[String]) -> Result<Vec<UsageEvent>> {
        usage::request_events(self, request_ids).await
    }

    async fn request_window_floor(&self, floor: Millis, before: Millis, rows: u32) -> Result<Option<Millis>> {
        usage::request_window_floor(self, floor, before, rows).await
    }

    async fn request_window_events(&self, since: Millis, until: Millis) -> Result<Vec<UsageEvent>> {
        usage::request_window_events(self, since, until).await
    }

    async fn deleted_names(&self) -> Result<Vec<DeletedName>> {
        capture::deleted_names(self).await
    }

    async fn list_capture_rules(&self) -> Result<Vec<CaptureRule>> {
        capture::list_rules(self).await
    }

    async fn insert_captures(&self, captures: &[StoredCapture]) -> Result<IngestResult> {
        capture::insert(self, captures).await
    }

    async fn get_capture(&self, request_id: &str) -> Result<Option<StoredCapture>> {
        capture::get(self, request_id).await
    }

    async fn delete_requests(&self, request_ids: &[String]) -> Result<(u64, u64)> {
        capture::delete_requests(self, request_ids).await
    }

    async fn delete_captures_before(&self, before_ms: Millis, now_ms: Millis, limit: u32) -> Result<u64> {
        capture::delete_before(self, before_ms, now_ms, limit).await
    }

    async fn delete_orphan_captures(&self, before_ms: Millis, limit: u32) -> Result<u64> {
        capture::delete_orphans(self, before_ms, limit).await
    }

    async fn usage_row_count(&self) -> Result<u64> {
        usage::usage_row_count(self).await
    }

    async fn delete_oldest_usage(&self, limit: u32) -> Result<u64> {
        usage::delete_oldest_usage(self, limit).await
    }

    async fn usage_ts_at(&self, offset: u64) -> Result<Option<Millis>> {
        usage::usage_ts_at(self, offset).await
    }

    async fn raise_usage_raw_floor(&self, floor_ms: Millis) -> Result<()> {
        usage::raise_usage_raw_floor(self, floor_ms).await
    }

    async fn delete_usage_before(&self, before_ms: Millis, limit: u32) -> Result<u64> {
        usage::delete_usage_before(self, before_ms, limit).await
    }

    async fn claim_term(&self, holder: &str, mechanism: &str, detail: &str, now_ms: Millis) -> Result<u64> {
        ops::claim_term(self, holder, mechanism, detail, now_ms).await
    }

    async fn leader(&self) -> Result<Option<LeaderRecord>> {
        ops::leader(self).await
    }

    async fn notify_enqueue(&self, n: &Notification, change: &EpisodeChange) -> Result<bool> {
        ops::notify_enqueue(self, n, change).await
    }

    async fn notify_open_episodes(&self) -> Result<Vec<OpenEpisode>> {
        ops::notify_open_episodes(self).await
    }

    async fn notify_due(&self, now: Millis, limit: u32) -> Result<Vec<Notification>> {
        ops::notify_due(self, now, limit).await
    }

    async fn notify_mark(&self, dedup_key: &str, outcome: &DeliveryOutcome, now: Millis) -> Result<()> {
        ops::notify_mark(self, dedup_key, outcome, now).await
    }

    async fn notify_recent(&self, limit: u32) -> Result<Vec<OutboxEntry>> {
        ops::notify_recent(self, limit).await
    }

    async fn notify_stats(&self) -> Result<OutboxStats> {
        ops::notify_stats(self).await
    }
}
