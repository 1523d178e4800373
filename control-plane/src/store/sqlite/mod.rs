//! Embedded SQLite store (rusqlite, bundled) for standalone mode.
//!
//! One connection behind a mutex; every call runs on the blocking pool
//! (`spawn_blocking`) so the async runtime is never blocked on disk I/O.
//! Config writes take the write lock up front (`BEGIN IMMEDIATE`), so commit
//! order equals revision order.

//!
//! Layout: `error.rs` (rusqlite errors as typed store errors, column conversions), `rows.rs`
//! (rows to domain types and back, the config reads), `config_tx.rs` (the SQL under
//! `store/rules.rs`, which holds the checks of every config write), `usage.rs` (usage rows, the
//! request log, retention), `ops.rs` (data-plane records, quotas, OAuth hand-over, leadership,
//! the notification outbox).

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
use config_tx::SqliteTx;
use error::db;
use rows::*;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// Numbered schema migrations, applied in order at open (public for the upgrade tests, which
/// build a database at an older version).
pub const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../../migrations/sqlite/0001_init.sql")),
    (2, include_str!("../../../migrations/sqlite/0002_account_states.sql")),
    (3, include_str!("../../../migrations/sqlite/0003_proxy_url_enc.sql")),
    (4, include_str!("../../../migrations/sqlite/0004_config_sync.sql")),
    (5, include_str!("../../../migrations/sqlite/0005_usage_anomaly.sql")),
    (6, include_str!("../../../migrations/sqlite/0006_group_limits.sql")),
    (7, include_str!("../../../migrations/sqlite/0007_deleted_names.sql")),
    (8, include_str!("../../../migrations/sqlite/0008_leadership.sql")),
    (9, include_str!("../../../migrations/sqlite/0009_oauth_accounts.sql")),
    (
        10,
        include_str!("../../../migrations/sqlite/0010_quotas_and_refresh.sql"),
    ),
    (
        11,
        include_str!("../../../migrations/sqlite/0011_client_request_id.sql"),
    ),
    (12, include_str!("../../../migrations/sqlite/0012_queue_wait.sql")),
    (13, include_str!("../../../migrations/sqlite/0013_group_routing.sql")),
    (14, include_str!("../../../migrations/sqlite/0014_request_log.sql")),
    (15, include_str!("../../../migrations/sqlite/0015_notify_outbox.sql")),
    (
        16,
        include_str!("../../../migrations/sqlite/0016_request_model_group.sql"),
    ),
    (17, include_str!("../../../migrations/sqlite/0017_usage_daily.sql")),
    (18, include_str!("../../../migrations/sqlite/0018_capture.sql")),
    (19, include_str!("../../../migrations/sqlite/0019_console_signouts.sql")),
];

const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The embedded store.
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    hint: Arc<Notify>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path` and migrates it.
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path).map_err(db)?;
        let store = Self::init(conn)?;
        // The database holds sealed credentials and token hashes: readable by this user only
        // (its WAL and shared-memory files too, which SQLite creates with the umask's mode).
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            for file in [name.clone(), format!("{name}-wal"), format!("{name}-shm")] {
                let p = path.with_file_name(file);
                if p.exists() {
                    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
                        .map_err(|e| StoreError::unavailable(format!("cannot make {} private: {e}", p.display()), e))?;
                }
            }
        }
        Ok(store)
    }

    /// A private in-memory database (tests, throwaway runs).
    pub fn open_in_memory() -> Result<Self> {
        let conn = Connection::open_in_memory().map_err(db)?;
        Self::init(conn)
    }

    fn init(mut conn: Connection) -> Result<Self> {
        conn.busy_timeout(BUSY_TIMEOUT).map_err(db)?;
        // In-memory databases answer "memory" here; that is fine.
        conn.pragma_update(None, "journal_mode", "WAL").map_err(db)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(db)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(db)?;
        conn.create_aggregate_function(
            "relay_sum",
            1,
            rusqlite::functions::FunctionFlags::SQLITE_UTF8 | rusqlite::functions::FunctionFlags::SQLITE_DETERMINISTIC,
            usage::SaturatingSum,
        )
        .map_err(db)?;
        // `relay_add(a, b)`: a + b saturating at i64::MAX (the rollups' running sums).
        conn.create_scalar_function(
            "relay_add",
            2,
            rusqlite::functions::FunctionFlags::SQLITE_UTF8 | rusqlite::functions::FunctionFlags::SQLITE_DETERMINISTIC,
            |ctx| Ok(ctx.get::<i64>(0)?.saturating_add(ctx.get::<i64>(1)?)),
        )
        .map_err(db)?;
        migrate(&mut conn)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            hint: Arc::new(Notify::new()),
        })
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn with_conn<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let mut guard = conn
                .lock()
                .map_err(|_| StoreError::internal_msg("sqlite connection mutex poisoned"))?;
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::internal("sqlite task failed", e))?
    }
}

// ---------------------------------------------------------------------------
// Migrations

fn migrate(conn: &mut Connection) -> Result<()> {
    let mig = |e: rusqlite::Error| StoreError::Migration {
        message: e.to_string(),
        source: Some(e.into()),
    };
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    INTEGER PRIMARY KEY,
             applied_at INTEGER
         )",
    )
    .map_err(mig)?;
    for &(version, sql) in MIGRATIONS {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(mig)?;
        let applied = tx
            .query_row("SELECT 1 FROM schema_migrations WHERE version = ?1", [version], |_| {
                Ok(())
            })
            .optional()
            .map_err(mig)?
            .is_some();
        if applied {
            continue;
        }
        tx.execute_batch(sql).map_err(|e| StoreError::Migration {
            message: format!("migration {version}: {e}"),
            source: Some(e.into()),
        })?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
            params![version, now_ms()],
        )
        .map_err(mig)?;
        tx.commit().map_err(mig)?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn change_hint(&self) -> Arc<Notify> {
        Arc::clone(&self.hint)
    }

    async fn head(&self) -> Result<Version> {
        self.with_conn(|c| read_head(c)).await
    }

    async fn apply(&self, mutations: Vec<Mutation>, audit: AuditRecord) -> Result<Version> {
        let version = self
            .with_conn(move |c| {
                let tx = c
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(db)?;
                // Every ConfigTx method of SQLite completes without waiting: `block_on` returns
                // as soon as the rules have run.
                let head = futures::executor::block_on(rules::apply(&mut SqliteTx { tx: &tx }, &mutations, &audit))?;
                tx.commit().map_err(db)?;
                Ok(head)
            })
            .await?;
        self.hint.notify_waiters();
        self.hint.notify_one();
        Ok(version)
    }

    async fn start_new_epoch(&self, seen: Version, at_least: u64, reason: &str) -> Result<Version> {
        let reason = reason.to_owned();
        let floor = to_i64(at_least, "epoch")?;
        let (head, changed) = self
            .with_conn(move |c| {
                let tx = c
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(db)?;
                let (e, r) = (to_i64(seen.epoch, "epoch")?, to_i64(seen.revision, "revision")?);
                let n = tx
                    .execute(
                        "UPDATE config_head SET epoch = MAX(epoch + 1, ?3, ?4) \
                         WHERE singleton = 1 AND epoch = ?1 AND revision = ?2",
                        params![e, r, now_ms(), floor],
                    )
                    .map_err(db)?;
                if n == 1 {
                    let audit = rules::new_epoch_audit(&reason);
                    futures::executor::block_on(SqliteTx { tx: &tx }.append_audit(&audit, r))?;
                }
                let head = read_head(&tx)?;
                tx.commit().map_err(db)?;
                Ok((head, n == 1))
            })
            .await?;
        if changed {
            self.hint.notify_waiters();
            self.hint.notify_one();
        }
        Ok(head)
    }

    async fn load_config(&self) -> Result<ConfigState> {
        self.with_conn(|c| {
            let tx = c.transaction().map_err(db)?;
            let state = ConfigState {
                version: read_head(&tx)?,
                api_keys: read_api_keys(&tx)?,
                accounts: read_accounts(&tx)?,
                groups: read_groups(&tx)?,
                prices: read_prices(&tx)?,
                settings: read_settings(&tx)?,
                account_states: read_account_states(&tx)?,
                capture_rules: capture::read_rules(&tx)?,
            };
            tx.commit().map_err(db)?;
            Ok(state)
        })
        .await
    }

    async fn list_accounts(&self) -> Result<Vec<Account>> {
        self.with_conn(|c| read_accounts(c)).await
    }

    async fn get_account(&self, id_or_name: &str) -> Result<Option<Account>> {
        let key = id_or_name.to_owned();
        self.with_conn(move |c| read_account(c, &key)).await
    }

    async fn list_api_keys(&self) -> Result<Vec<ApiKey>> {
        self.with_conn(|c| read_api_keys(c)).await
    }

    async fn get_api_key(&self, id_or_name: &str) -> Result<Option<ApiKey>> {
        let key = id_or_name.to_owned();
        self.with_conn(move |c| get_by_id_or_name(c, "api_keys", API_KEY_COLS, &key, api_key_from_row))
            .await
    }

    async fn list_groups(&self) -> Result<Vec<Group>> {
        self.with_conn(|c| read_groups(c)).await
    }

    async fn get_group(&self, id_or_name: &str) -> Result<Option<Group>> {
        let key = id_or_name.to_owned();
        self.with_conn(move |c| {
            let found = get_by_id_or_name(c, "groups", GROUP_COLS, &key, group_from_row)?;
            Ok(with_fallbacks(c, found.into_iter().collect())?.into_iter().next())
        })
        .await
    }

    async fn list_prices(&self) -> Result<Vec<Price>> {
        self.with_conn(|c| read_prices(c)).await
    }

    async fn settings(&self) -> Result<BTreeMap<String, String>> {
        self.with_conn(|c| read_settings(c)).await
    }

    async fn list_account_states(&self) -> Result<Vec<AccountState>> {
        self.with_conn(|c| read_account_states(c)).await
    }

    async fn list_admin_tokens(&self) -> Result<Vec<AdminToken>> {
        self.with_conn(|c| {
            query_list(
                c,
                &format!("SELECT {ADMIN_TOKEN_COLS} FROM admin_tokens ORDER BY name"),
                [],
                admin_token_from_row,
            )
        })
        .await
    }

    async fn find_admin_token(&self, token_hash: &str) -> Result<Option<AdminToken>> {
        let hash = token_hash.to_owned();
        self.with_conn(move |c| {
            c.query_row(
                &format!("SELECT {ADMIN_TOKEN_COLS} FROM admin_tokens WHERE token_hash = ?1"),
                [hash],
                admin_token_from_row,
            )
            .optional()
            .map_err(db)
        })
        .await
    }

    async fn list_audit(&self, limit: u32, since: Option<Millis>) -> Result<Vec<AuditEntry>> {
        self.with_conn(move |c| {
            query_list(
                c,
                "SELECT id, at, actor, action, target, detail, revision FROM audit_log \
                 WHERE (?1 IS NULL OR at >= ?1) ORDER BY id DESC LIMIT ?2",
                params![since, i64::from(limit)],
                audit_from_row,
            )
        })
        .await
    }

    async fn audit_at_revisions(&self, revisions: &[u64]) -> Result<Vec<AuditEntry>> {
        let revisions = revisions.to_vec();
        self.with_conn(move |c| {
            let mut out = Vec::new();
            for r in revisions {
                let r = to_i64(r, "revision")?;
                out.extend(query_list(
                    c,
                    "SELECT id, at, actor, action, target, detail, revision FROM audit_log WHERE revision = ?1",
                    params![r],
                    audit_from_row,
                )?);
            }
            Ok(out)
        })
        .await
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

    async fn query_usage(&self, query: UsageQuery) -> Result<Vec<UsageRow>> {
        usage::query_usage(self, query).await
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
