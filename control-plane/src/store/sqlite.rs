//! Embedded SQLite store (rusqlite, bundled) for standalone mode.
//!
//! One connection behind a mutex; every call runs on the blocking pool
//! (`spawn_blocking`) so the async runtime is never blocked on disk I/O.
//! Config writes take the write lock up front (`BEGIN IMMEDIATE`), so commit
//! order equals revision order.

use super::{IngestResult, LeaderRecord, Result, Store, StoreError};
use crate::model::*;
use rusqlite::types::{Type, Value};
use rusqlite::{ffi, params, params_from_iter, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// Numbered schema migrations, applied in order at open.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/sqlite/0001_init.sql")),
    (2, include_str!("../../migrations/sqlite/0002_account_states.sql")),
    (3, include_str!("../../migrations/sqlite/0003_proxy_url_enc.sql")),
    (4, include_str!("../../migrations/sqlite/0004_config_sync.sql")),
    (5, include_str!("../../migrations/sqlite/0005_usage_anomaly.sql")),
    (6, include_str!("../../migrations/sqlite/0006_group_limits.sql")),
    (7, include_str!("../../migrations/sqlite/0007_deleted_names.sql")),
    (8, include_str!("../../migrations/sqlite/0008_leadership.sql")),
    (9, include_str!("../../migrations/sqlite/0009_oauth_accounts.sql")),
    (10, include_str!("../../migrations/sqlite/0010_quotas_and_refresh.sql")),
    (11, include_str!("../../migrations/sqlite/0011_client_request_id.sql")),
    (12, include_str!("../../migrations/sqlite/0012_queue_wait.sql")),
    (13, include_str!("../../migrations/sqlite/0013_group_routing.sql")),
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
                        .map_err(|e| StoreError::Database(format!("cannot make {} private: {e}", p.display())))?;
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
            SaturatingSum,
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
                .map_err(|_| StoreError::Database("sqlite connection mutex poisoned".into()))?;
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Database(format!("sqlite task failed: {e}")))?
    }
}

// ---------------------------------------------------------------------------
// Errors and conversions

fn db(e: rusqlite::Error) -> StoreError {
    match e {
        rusqlite::Error::IntegralValueOutOfRange(..)
        | rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::InvalidColumnType(..) => StoreError::Corrupt(e.to_string()),
        other => StoreError::Database(other.to_string()),
    }
}

/// The extended constraint code when `e` is a constraint violation.
fn constraint_code(e: &rusqlite::Error) -> Option<i32> {
    match e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == ffi::ErrorCode::ConstraintViolation => Some(f.extended_code),
        _ => None,
    }
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(
        constraint_code(e),
        Some(ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
    )
}

/// Maps a write error: UNIQUE / PRIMARY KEY violations become `AlreadyExists`.
fn write_err(kind: ResourceKind, name: &str) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
    move |e| {
        if is_unique_violation(&e) {
            StoreError::AlreadyExists {
                kind: kind.as_str(),
                name: name.to_owned(),
            }
        } else {
            db(e)
        }
    }
}

fn to_i64(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| StoreError::Database(format!("{what} {v} is out of range")))
}

fn rev_from_db(v: i64) -> Result<u64> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("negative revision {v}")))
}

/// `relay_sum(x)`: SQLite's `SUM` fails the whole query with "integer overflow" once a sum passes
/// `i64::MAX`; usage totals saturate there instead, so one absurd row cannot make every report fail.
struct SaturatingSum;

impl rusqlite::functions::Aggregate<i64, Option<i64>> for SaturatingSum {
    fn init(&self, _: &mut rusqlite::functions::Context<'_>) -> rusqlite::Result<i64> {
        Ok(0)
    }

    fn step(&self, ctx: &mut rusqlite::functions::Context<'_>, acc: &mut i64) -> rusqlite::Result<()> {
        *acc = acc.saturating_add(ctx.get::<Option<i64>>(0)?.unwrap_or(0));
        Ok(())
    }

    fn finalize(&self, _: &mut rusqlite::functions::Context<'_>, acc: Option<i64>) -> rusqlite::Result<Option<i64>> {
        Ok(acc)
    }
}

fn col_u64(row: &Row<'_>, idx: usize) -> rusqlite::Result<u64> {
    let v: i64 = row.get(idx)?;
    u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(idx, v))
}

fn col_u32(row: &Row<'_>, idx: usize) -> rusqlite::Result<u32> {
    let v: i64 = row.get(idx)?;
    u32::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(idx, v))
}

fn col_i32(row: &Row<'_>, idx: usize) -> rusqlite::Result<i32> {
    let v: i64 = row.get(idx)?;
    i32::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(idx, v))
}

fn col_opt_u64(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<u64>> {
    let v: Option<i64> = row.get(idx)?;
    v.map(|v| u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(idx, v)))
        .transpose()
}

fn col_parse<T: FromStr<Err = String>>(row: &Row<'_>, idx: usize) -> rusqlite::Result<T> {
    let s: String = row.get(idx)?;
    s.parse()
        .map_err(|e: String| rusqlite::Error::FromSqlConversionFailure(idx, Type::Text, e.into()))
}

fn col_version(row: &Row<'_>, epoch: usize, revision: usize) -> rusqlite::Result<Option<Version>> {
    match (col_opt_u64(row, epoch)?, col_opt_u64(row, revision)?) {
        (Some(epoch), Some(revision)) => Ok(Some(Version { epoch, revision })),
        _ => Ok(None),
    }
}

fn opt_i64(v: Option<i64>) -> Value {
    v.map_or(Value::Null, Value::Integer)
}

// ---------------------------------------------------------------------------
// Migrations

fn migrate(conn: &mut Connection) -> Result<()> {
    let mig = |e: rusqlite::Error| StoreError::Migration(e.to_string());
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
        tx.execute_batch(sql)
            .map_err(|e| StoreError::Migration(format!("migration {version}: {e}")))?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
            params![version, now_ms()],
        )
        .map_err(mig)?;
        tx.commit().map_err(mig)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Row mapping

const ACCOUNT_COLS: &str = "id, name, kind, base_url, credential_enc, refresh_token_enc, \
     credential_hint, credential_expires_at, priority, weight, max_concurrency, status, \
     proxy_url, created_at, updated_at, revision, proxy_url_enc, reset_generation, \
     oauth_scopes, subscription_type, organization";

fn account_from_row(row: &Row<'_>) -> rusqlite::Result<Account> {
    Ok(Account {
        id: row.get(0)?,
        name: row.get(1)?,
        kind: col_parse(row, 2)?,
        base_url: row.get(3)?,
        credential_enc: row.get(4)?,
        refresh_token_enc: row.get(5)?,
        credential_hint: row.get(6)?,
        credential_expires_at: row.get(7)?,
        priority: col_i32(row, 8)?,
        weight: col_u32(row, 9)?,
        group_ids: Vec::new(),
        max_concurrency: col_u32(row, 10)?,
        status: col_parse(row, 11)?,
        proxy_url: row.get(12)?,
        created_at: row.get(13)?,
        updated_at: row.get(14)?,
        revision: col_u64(row, 15)?,
        proxy_url_enc: row.get(16)?,
        reset_generation: col_u64(row, 17)?,
        scopes: row
            .get::<_, String>(18)?
            .split_whitespace()
            .map(str::to_string)
            .collect(),
        subscription_type: row.get(19)?,
        organization: row.get(20)?,
    })
}

/// Values for `ACCOUNT_COLS` as `?1..?21`.
fn account_values(a: &Account, revision: i64) -> Result<Vec<Value>> {
    Ok(vec![
        Value::Text(a.id.clone()),
        Value::Text(a.name.clone()),
        Value::Text(a.kind.as_str().to_owned()),
        Value::Text(a.base_url.clone()),
        Value::Blob(a.credential_enc.clone()),
        a.refresh_token_enc.clone().map_or(Value::Null, Value::Blob),
        Value::Text(a.credential_hint.clone()),
        opt_i64(a.credential_expires_at),
        Value::Integer(i64::from(a.priority)),
        Value::Integer(i64::from(a.weight)),
        Value::Integer(i64::from(a.max_concurrency)),
        Value::Text(a.status.as_str().to_owned()),
        Value::Text(a.proxy_url.clone()),
        Value::Integer(a.created_at),
        Value::Integer(a.updated_at),
        Value::Integer(revision),
        a.proxy_url_enc.clone().map_or(Value::Null, Value::Blob),
        Value::Integer(to_i64(a.reset_generation, "reset_generation")?),
        Value::Text(a.scopes.join(" ")),
        Value::Text(a.subscription_type.clone()),
        Value::Text(a.organization.clone()),
    ])
}

const API_KEY_COLS: &str = "id, name, key_hash, key_prefix, status, expires_at, group_id, \
     allowed_models, rpm, tpm, max_concurrency, daily_budget, monthly_budget, created_at, \
     updated_at, revision";

fn api_key_from_row(row: &Row<'_>) -> rusqlite::Result<ApiKey> {
    let models: String = row.get(7)?;
    let allowed_models: Vec<String> = serde_json::from_str(&models)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(7, Type::Text, Box::new(e)))?;
    Ok(ApiKey {
        id: row.get(0)?,
        name: row.get(1)?,
        key_hash: row.get(2)?,
        key_prefix: row.get(3)?,
        status: col_parse(row, 4)?,
        expires_at: row.get(5)?,
        group_id: row.get(6)?,
        allowed_models,
        limits: KeyLimits {
            rpm: col_u64(row, 8)?,
            tpm: col_u64(row, 9)?,
            max_concurrency: col_u64(row, 10)?,
            daily_budget: col_u64(row, 11)?,
            monthly_budget: col_u64(row, 12)?,
        },
        created_at: row.get(13)?,
        updated_at: row.get(14)?,
        revision: col_u64(row, 15)?,
    })
}

/// Values for `API_KEY_COLS` as `?1..?16`.
fn api_key_values(k: &ApiKey, revision: i64) -> Result<Vec<Value>> {
    let models = serde_json::to_string(&k.allowed_models)
        .map_err(|e| StoreError::Database(format!("encoding allowed_models: {e}")))?;
    Ok(vec![
        Value::Text(k.id.clone()),
        Value::Text(k.name.clone()),
        Value::Text(k.key_hash.clone()),
        Value::Text(k.key_prefix.clone()),
        Value::Text(k.status.as_str().to_owned()),
        opt_i64(k.expires_at),
        Value::Text(k.group_id.clone()),
        Value::Text(models),
        Value::Integer(to_i64(k.limits.rpm, "rpm")?),
        Value::Integer(to_i64(k.limits.tpm, "tpm")?),
        Value::Integer(to_i64(k.limits.max_concurrency, "max_concurrency")?),
        Value::Integer(to_i64(k.limits.daily_budget, "daily_budget")?),
        Value::Integer(to_i64(k.limits.monthly_budget, "monthly_budget")?),
        Value::Integer(k.created_at),
        Value::Integer(k.updated_at),
        Value::Integer(revision),
    ])
}

const GROUP_COLS: &str = "id, name, description, created_at, updated_at, revision, rpm, tpm, \
     max_concurrency, daily_budget, monthly_budget, state, state_since, state_by";

/// A group row; its fallbacks are read apart ([`with_fallbacks`]).
fn group_from_row(row: &Row<'_>) -> rusqlite::Result<Group> {
    Ok(Group {
        id: row.get(0)?,
        name: row.get(1)?,
        description: row.get(2)?,
        limits: KeyLimits {
            rpm: col_u64(row, 6)?,
            tpm: col_u64(row, 7)?,
            max_concurrency: col_u64(row, 8)?,
            daily_budget: col_u64(row, 9)?,
            monthly_budget: col_u64(row, 10)?,
        },
        fallback_ids: Vec::new(),
        state: col_parse(row, 11)?,
        state_since: row.get(12)?,
        state_by: row.get(13)?,
        created_at: row.get(3)?,
        updated_at: row.get(4)?,
        revision: col_u64(row, 5)?,
    })
}

/// Every group's fallbacks, in order.
fn read_fallbacks(conn: &Connection) -> Result<HashMap<String, Vec<String>>> {
    let pairs = query_list(
        conn,
        "SELECT group_id, fallback_id FROM group_fallbacks ORDER BY group_id, position",
        [],
        |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
    )?;
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for (g, f) in pairs {
        out.entry(g).or_default().push(f);
    }
    Ok(out)
}

/// Fills in the groups' fallbacks.
fn with_fallbacks(conn: &Connection, mut groups: Vec<Group>) -> Result<Vec<Group>> {
    let mut all = read_fallbacks(conn)?;
    for g in &mut groups {
        g.fallback_ids = all.remove(&g.id).unwrap_or_default();
    }
    Ok(groups)
}

/// Replaces a group's fallbacks (in the write's transaction) and checks what the store keeps:
/// every fallback exists, none repeats, none is the group itself, no cycle.
fn set_fallbacks(tx: &Transaction<'_>, g: &Group) -> Result<()> {
    tx.execute("DELETE FROM group_fallbacks WHERE group_id = ?1", [&g.id])
        .map_err(db)?;
    if g.fallback_ids.is_empty() {
        return Ok(());
    }
    let names: HashMap<String, String> = query_list(tx, "SELECT id, name FROM groups", [], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
    })?
    .into_iter()
    .collect();
    for (i, f) in g.fallback_ids.iter().enumerate() {
        if !names.contains_key(f) {
            return Err(not_found(ResourceKind::Group, f));
        }
        if g.fallback_ids[..i].contains(f) {
            return Err(StoreError::Invalid(format!(
                "group {:?} is named twice among {:?}'s fallbacks",
                names.get(f).unwrap_or(f),
                g.name
            )));
        }
    }
    let mut edges = read_fallbacks(tx)?;
    edges.insert(g.id.clone(), g.fallback_ids.clone());
    super::check_fallbacks(&edges, &names, &g.id)?;
    for (i, f) in g.fallback_ids.iter().enumerate() {
        tx.execute(
            "INSERT INTO group_fallbacks (group_id, position, fallback_id) VALUES (?1, ?2, ?3)",
            params![g.id, to_i64(i as u64, "position")?, f],
        )
        .map_err(db)?;
    }
    Ok(())
}

/// Values for `GROUP_COLS` as `?1..?14`.
fn group_values(g: &Group, revision: i64) -> Result<Vec<Value>> {
    let l = &g.limits;
    Ok(vec![
        Value::Text(g.id.clone()),
        Value::Text(g.name.clone()),
        Value::Text(g.description.clone()),
        Value::Integer(g.created_at),
        Value::Integer(g.updated_at),
        Value::Integer(revision),
        Value::Integer(to_i64(l.rpm, "rpm")?),
        Value::Integer(to_i64(l.tpm, "tpm")?),
        Value::Integer(to_i64(l.max_concurrency, "max_concurrency")?),
        Value::Integer(to_i64(l.daily_budget, "daily_budget")?),
        Value::Integer(to_i64(l.monthly_budget, "monthly_budget")?),
        Value::Text(g.state.as_str().to_string()),
        Value::Integer(g.state_since),
        Value::Text(g.state_by.clone()),
    ])
}

const PRICE_COLS: &str = "id, model_pattern, effective_from, input, output, cache_write_5m, \
     cache_write_1h, cache_read, source, revision";

fn price_from_row(row: &Row<'_>) -> rusqlite::Result<Price> {
    Ok(Price {
        id: row.get(0)?,
        model_pattern: row.get(1)?,
        effective_from: row.get(2)?,
        input: col_u64(row, 3)?,
        output: col_u64(row, 4)?,
        cache_write_5m: col_u64(row, 5)?,
        cache_write_1h: col_u64(row, 6)?,
        cache_read: col_u64(row, 7)?,
        source: row.get(8)?,
        revision: col_u64(row, 9)?,
    })
}

const ADMIN_TOKEN_COLS: &str = "id, name, token_hash, token_prefix, role, created_at, revision";

fn admin_token_from_row(row: &Row<'_>) -> rusqlite::Result<AdminToken> {
    Ok(AdminToken {
        id: row.get(0)?,
        name: row.get(1)?,
        token_hash: row.get(2)?,
        token_prefix: row.get(3)?,
        role: col_parse(row, 4)?,
        created_at: row.get(5)?,
        revision: col_u64(row, 6)?,
    })
}

fn audit_from_row(row: &Row<'_>) -> rusqlite::Result<AuditEntry> {
    Ok(AuditEntry {
        id: col_u64(row, 0)?,
        at: row.get(1)?,
        actor: row.get(2)?,
        action: row.get(3)?,
        target: row.get(4)?,
        detail: row.get(5)?,
        revision: col_u64(row, 6)?,
    })
}

fn proxy_from_row(row: &Row<'_>) -> rusqlite::Result<ProxyState> {
    let connected: i64 = row.get(9)?;
    Ok(ProxyState {
        node_id: row.get(0)?,
        build_version: row.get(1)?,
        acked: col_version(row, 2, 3)?,
        nack_version: col_version(row, 4, 5)?,
        nack_error: row.get(6)?,
        nack_at: row.get(7)?,
        last_seen: row.get(8)?,
        connected: connected != 0,
        replica: row.get(10)?,
        rejected: rejected_from_json(&row.get::<_, String>(11)?),
    })
}

// ---------------------------------------------------------------------------
// Reads (plain functions on a connection or transaction)

fn read_head(conn: &Connection) -> Result<Version> {
    let (epoch, revision): (i64, i64) = conn
        .query_row("SELECT epoch, revision FROM config_head WHERE singleton = 1", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .map_err(db)?;
    Ok(Version {
        epoch: u64::try_from(epoch).map_err(|_| StoreError::Corrupt(format!("epoch {epoch}")))?,
        revision: rev_from_db(revision)?,
    })
}

fn query_list<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    f: fn(&Row<'_>) -> rusqlite::Result<T>,
) -> Result<Vec<T>> {
    let mut stmt = conn.prepare_cached(sql).map_err(db)?;
    let rows = stmt.query_map(params, f).map_err(db)?;
    rows.collect::<rusqlite::Result<Vec<T>>>().map_err(db)
}

/// Looks a row up by id, then by name.
fn get_by_id_or_name<T>(
    conn: &Connection,
    table: &str,
    cols: &str,
    id_or_name: &str,
    f: fn(&Row<'_>) -> rusqlite::Result<T>,
) -> Result<Option<T>> {
    for col in ["id", "name"] {
        let sql = format!("SELECT {cols} FROM {table} WHERE {col} = ?1");
        let mut stmt = conn.prepare_cached(&sql).map_err(db)?;
        if let Some(row) = stmt.query_row([id_or_name], f).optional().map_err(db)? {
            return Ok(Some(row));
        }
    }
    Ok(None)
}

fn read_accounts(conn: &Connection) -> Result<Vec<Account>> {
    let mut accounts = query_list(
        conn,
        &format!("SELECT {ACCOUNT_COLS} FROM accounts ORDER BY name"),
        [],
        account_from_row,
    )?;
    let links = query_list(
        conn,
        "SELECT account_id, group_id FROM account_groups ORDER BY account_id, group_id",
        [],
        |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
    )?;
    let mut by_account: HashMap<String, Vec<String>> = HashMap::new();
    for (account_id, group_id) in links {
        by_account.entry(account_id).or_default().push(group_id);
    }
    for a in &mut accounts {
        if let Some(groups) = by_account.remove(&a.id) {
            a.group_ids = groups;
        }
    }
    Ok(accounts)
}

fn read_account(conn: &Connection, id_or_name: &str) -> Result<Option<Account>> {
    let Some(mut account) = get_by_id_or_name(conn, "accounts", ACCOUNT_COLS, id_or_name, account_from_row)? else {
        return Ok(None);
    };
    account.group_ids = query_list(
        conn,
        "SELECT group_id FROM account_groups WHERE account_id = ?1 ORDER BY group_id",
        [&account.id],
        |r| r.get(0),
    )?;
    Ok(Some(account))
}

fn read_api_keys(conn: &Connection) -> Result<Vec<ApiKey>> {
    query_list(
        conn,
        &format!("SELECT {API_KEY_COLS} FROM api_keys ORDER BY name"),
        [],
        api_key_from_row,
    )
}

fn read_groups(conn: &Connection) -> Result<Vec<Group>> {
    let groups = query_list(
        conn,
        &format!("SELECT {GROUP_COLS} FROM groups ORDER BY name"),
        [],
        group_from_row,
    )?;
    with_fallbacks(conn, groups)
}

fn read_prices(conn: &Connection) -> Result<Vec<Price>> {
    query_list(
        conn,
        &format!("SELECT {PRICE_COLS} FROM prices ORDER BY model_pattern, effective_from"),
        [],
        price_from_row,
    )
}

fn read_settings(conn: &Connection) -> Result<BTreeMap<String, String>> {
    let pairs = query_list(conn, "SELECT name, value FROM settings", [], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
    })?;
    Ok(pairs.into_iter().collect())
}

fn read_account_states(conn: &Connection) -> Result<Vec<AccountState>> {
    query_list(
        conn,
        "SELECT account_id, scope, health, reason, until_at, since_at, reported_by, revision \
         FROM account_states ORDER BY account_id, scope",
        [],
        |r| {
            Ok(AccountState {
                account_id: r.get(0)?,
                scope: r.get(1)?,
                health: col_parse(r, 2)?,
                reason: r.get(3)?,
                until: r.get(4)?,
                since: r.get(5)?,
                reported_by: r.get(6)?,
                revision: col_u64(r, 7)?,
            })
        },
    )
}

// ---------------------------------------------------------------------------
// Writes

fn exists(tx: &Transaction<'_>, table: &str, id: &str) -> Result<bool> {
    let sql = format!("SELECT 1 FROM {table} WHERE id = ?1");
    tx.query_row(&sql, [id], |_| Ok(()))
        .optional()
        .map(|o| o.is_some())
        .map_err(db)
}

fn require_group(tx: &Transaction<'_>, group_id: &str) -> Result<()> {
    if exists(tx, "groups", group_id)? {
        Ok(())
    } else {
        Err(StoreError::NotFound {
            kind: ResourceKind::Group.as_str(),
            name: group_id.to_owned(),
        })
    }
}

/// Zero rows updated: the row is either gone or was changed since read.
fn update_miss(tx: &Transaction<'_>, table: &str, kind: ResourceKind, id: &str) -> StoreError {
    match exists(tx, table, id) {
        Ok(true) => StoreError::Conflict {
            kind: kind.as_str(),
            id: id.to_owned(),
        },
        Ok(false) => StoreError::NotFound {
            kind: kind.as_str(),
            name: id.to_owned(),
        },
        Err(e) => e,
    }
}

fn not_found(kind: ResourceKind, id: &str) -> StoreError {
    StoreError::NotFound {
        kind: kind.as_str(),
        name: id.to_owned(),
    }
}

fn set_account_groups(tx: &Transaction<'_>, account_id: &str, group_ids: &[String]) -> Result<()> {
    tx.execute("DELETE FROM account_groups WHERE account_id = ?1", [account_id])
        .map_err(db)?;
    for group_id in group_ids {
        require_group(tx, group_id)?;
        tx.execute(
            "INSERT OR IGNORE INTO account_groups (account_id, group_id) VALUES (?1, ?2)",
            [account_id, group_id.as_str()],
        )
        .map_err(db)?;
    }
    Ok(())
}

fn apply_mutation(tx: &Transaction<'_>, m: &Mutation, rev: i64) -> Result<()> {
    match m {
        Mutation::InsertAccount(a) => {
            tx.execute(
                &format!(
                    "INSERT INTO accounts ({ACCOUNT_COLS}) VALUES \
                     (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21)"
                ),
                params_from_iter(account_values(a, rev)?),
            )
            .map_err(write_err(ResourceKind::Account, &a.name))?;
            set_account_groups(tx, &a.id, &a.group_ids)?;
        }
        Mutation::UpdateAccount { row, expect_revision } => {
            let mut values = account_values(row, rev)?;
            values.push(Value::Integer(to_i64(*expect_revision, "revision")?));
            // created_at (?14) is immutable; SQLite allows an unreferenced
            // parameter below the highest one used.
            let n = tx
                .execute(
                    "UPDATE accounts SET name = ?2, kind = ?3, base_url = ?4, credential_enc = ?5, \
                     refresh_token_enc = ?6, credential_hint = ?7, credential_expires_at = ?8, \
                     priority = ?9, weight = ?10, max_concurrency = ?11, status = ?12, \
                     proxy_url = ?13, updated_at = ?15, revision = ?16, proxy_url_enc = ?17, \
                     reset_generation = ?18, oauth_scopes = ?19, subscription_type = ?20, \
                     organization = ?21 WHERE id = ?1 AND revision = ?22",
                    params_from_iter(values),
                )
                .map_err(write_err(ResourceKind::Account, &row.name))?;
            if n == 0 {
                return Err(update_miss(tx, "accounts", ResourceKind::Account, &row.id));
            }
            set_account_groups(tx, &row.id, &row.group_ids)?;
        }
        Mutation::DeleteAccount { id } => {
            // Usage reports keep naming the account (its usage rows hold only its id).
            tx.execute(
                "INSERT INTO deleted_names (kind, id, name, deleted_at) \
                 SELECT 'account', id, name, ?2 FROM accounts WHERE id = ?1 \
                 ON CONFLICT (kind, id) DO UPDATE SET name = excluded.name, deleted_at = excluded.deleted_at",
                params![id, crate::model::now_ms()],
            )
            .map_err(db)?;
            tx.execute("DELETE FROM account_groups WHERE account_id = ?1", [id])
                .map_err(db)?;
            let n = tx.execute("DELETE FROM accounts WHERE id = ?1", [id]).map_err(db)?;
            if n == 0 {
                return Err(not_found(ResourceKind::Account, id));
            }
        }
        Mutation::InsertApiKey(k) => {
            require_group(tx, &k.group_id)?;
            tx.execute(
                &format!(
                    "INSERT INTO api_keys ({API_KEY_COLS}) VALUES \
                     (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)"
                ),
                params_from_iter(api_key_values(k, rev)?),
            )
            .map_err(write_err(ResourceKind::ApiKey, &k.name))?;
        }
        Mutation::UpdateApiKey { row, expect_revision } => {
            require_group(tx, &row.group_id)?;
            let mut values = api_key_values(row, rev)?;
            values.push(Value::Integer(to_i64(*expect_revision, "revision")?));
            // created_at (?14) is immutable (left unreferenced).
            let n = tx
                .execute(
                    "UPDATE api_keys SET name = ?2, key_hash = ?3, key_prefix = ?4, status = ?5, \
                     expires_at = ?6, group_id = ?7, allowed_models = ?8, rpm = ?9, tpm = ?10, \
                     max_concurrency = ?11, daily_budget = ?12, monthly_budget = ?13, \
                     updated_at = ?15, revision = ?16 \
                     WHERE id = ?1 AND revision = ?17",
                    params_from_iter(values),
                )
                .map_err(write_err(ResourceKind::ApiKey, &row.name))?;
            if n == 0 {
                return Err(update_miss(tx, "api_keys", ResourceKind::ApiKey, &row.id));
            }
        }
        Mutation::InsertGroup(g) => {
            tx.execute(
                &format!(
                    "INSERT INTO groups ({GROUP_COLS}) VALUES \
                     (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"
                ),
                params_from_iter(group_values(g, rev)?),
            )
            .map_err(write_err(ResourceKind::Group, &g.name))?;
            set_fallbacks(tx, g)?;
        }
        Mutation::UpdateGroup { row, expect_revision } => {
            let mut values = group_values(row, rev)?;
            values.push(Value::Integer(to_i64(*expect_revision, "revision")?));
            // created_at (?4) is immutable (left unreferenced).
            let n = tx
                .execute(
                    "UPDATE groups SET name = ?2, description = ?3, updated_at = ?5, revision = ?6, rpm = ?7, \
                     tpm = ?8, max_concurrency = ?9, daily_budget = ?10, monthly_budget = ?11, state = ?12, \
                     state_since = ?13, state_by = ?14 WHERE id = ?1 AND revision = ?15",
                    params_from_iter(values),
                )
                .map_err(write_err(ResourceKind::Group, &row.name))?;
            if n == 0 {
                return Err(update_miss(tx, "groups", ResourceKind::Group, &row.id));
            }
            set_fallbacks(tx, row)?;
        }
        Mutation::DeleteGroup { id } => {
            let name: Option<String> = tx
                .query_row("SELECT name FROM groups WHERE id = ?1", [id], |r| r.get(0))
                .optional()
                .map_err(db)?;
            let Some(name) = name else {
                return Err(not_found(ResourceKind::Group, id));
            };
            let in_use = tx
                .query_row(
                    "SELECT EXISTS (SELECT 1 FROM api_keys WHERE group_id = ?1) \
                         OR EXISTS (SELECT 1 FROM account_groups WHERE group_id = ?1) \
                         OR EXISTS (SELECT 1 FROM group_fallbacks WHERE fallback_id = ?1)",
                    [id],
                    |r| r.get::<_, bool>(0),
                )
                .map_err(db)?;
            if in_use {
                return Err(StoreError::InUse(format!("group {name:?}")));
            }
            tx.execute("DELETE FROM groups WHERE id = ?1", [id]).map_err(db)?;
        }
        Mutation::UpsertPrice(p) => {
            let label = format!("{}@{}", p.model_pattern, p.effective_from);
            tx.execute(
                &format!(
                    "INSERT INTO prices ({PRICE_COLS}) VALUES \
                     (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
                     ON CONFLICT (id) DO UPDATE SET model_pattern = excluded.model_pattern, \
                     effective_from = excluded.effective_from, input = excluded.input, \
                     output = excluded.output, cache_write_5m = excluded.cache_write_5m, \
                     cache_write_1h = excluded.cache_write_1h, cache_read = excluded.cache_read, \
                     source = excluded.source, revision = excluded.revision"
                ),
                params![
                    p.id,
                    p.model_pattern,
                    p.effective_from,
                    to_i64(p.input, "input price")?,
                    to_i64(p.output, "output price")?,
                    to_i64(p.cache_write_5m, "cache_write_5m price")?,
                    to_i64(p.cache_write_1h, "cache_write_1h price")?,
                    to_i64(p.cache_read, "cache_read price")?,
                    p.source,
                    rev,
                ],
            )
            .map_err(write_err(ResourceKind::Price, &label))?;
        }
        Mutation::DeletePrice { id } => {
            let n = tx.execute("DELETE FROM prices WHERE id = ?1", [id]).map_err(db)?;
            if n == 0 {
                return Err(not_found(ResourceKind::Price, id));
            }
        }
        Mutation::SetSetting { name, value } => {
            tx.execute(
                "INSERT INTO settings (name, value, revision) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value, \
                 revision = excluded.revision",
                params![name, value, rev],
            )
            .map_err(db)?;
        }
        Mutation::UnsetSetting { name } => {
            let n = tx.execute("DELETE FROM settings WHERE name = ?1", [name]).map_err(db)?;
            if n == 0 {
                return Err(StoreError::NotFound {
                    kind: "setting",
                    name: name.clone(),
                });
            }
        }
        Mutation::InsertAdminToken(t) => {
            tx.execute(
                &format!(
                    "INSERT INTO admin_tokens ({ADMIN_TOKEN_COLS}) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
                ),
                params![
                    t.id,
                    t.name,
                    t.token_hash,
                    t.token_prefix,
                    t.role.as_str(),
                    t.created_at,
                    rev
                ],
            )
            .map_err(write_err(ResourceKind::AdminToken, &t.name))?;
        }
        Mutation::SetAccountState(st) => {
            if !exists(tx, "accounts", &st.account_id)? {
                return Err(not_found(ResourceKind::Account, &st.account_id));
            }
            tx.execute(
                "INSERT INTO account_states (account_id, scope, health, reason, until_at, since_at, reported_by, \
                 revision) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (account_id, scope) DO UPDATE SET \
                 health = excluded.health, reason = excluded.reason, until_at = excluded.until_at, \
                 since_at = excluded.since_at, reported_by = excluded.reported_by, revision = excluded.revision",
                params![
                    st.account_id,
                    st.scope,
                    st.health.as_str(),
                    st.reason,
                    st.until,
                    st.since,
                    st.reported_by,
                    rev
                ],
            )
            .map_err(db)?;
        }
        Mutation::RequireResetGeneration { account_id, at_most } => {
            let generation: Option<i64> = tx
                .query_row(
                    "SELECT reset_generation FROM accounts WHERE id = ?1",
                    [account_id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db)?;
            let generation = generation.ok_or_else(|| not_found(ResourceKind::Account, account_id))?;
            if u64::try_from(generation).unwrap_or(0) > *at_most {
                return Err(StoreError::Conflict {
                    kind: "account",
                    id: account_id.clone(),
                });
            }
        }
        Mutation::CheckTerm { term } => {
            // Under the write lock apply took (BEGIN IMMEDIATE): no claim can commit meanwhile.
            let current: Option<i64> = tx
                .query_row("SELECT term FROM leadership WHERE name = 'leader'", [], |r| r.get(0))
                .optional()
                .map_err(db)?;
            let current = current.map(rev_from_db).transpose()?.unwrap_or(0);
            if current != *term {
                return Err(StoreError::Fenced { held: *term, current });
            }
        }
        Mutation::ClearAccountState { account_id, scope } => {
            tx.execute(
                "DELETE FROM account_states WHERE account_id = ?1 AND scope = ?2",
                params![account_id, scope],
            )
            .map_err(db)?;
        }
        Mutation::DeleteAdminToken { id } => {
            let n = tx.execute("DELETE FROM admin_tokens WHERE id = ?1", [id]).map_err(db)?;
            if n == 0 {
                return Err(not_found(ResourceKind::AdminToken, id));
            }
        }
    }
    Ok(())
}

fn apply_tx(conn: &mut Connection, mutations: &[Mutation], audit: &AuditRecord) -> Result<Version> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db)?;
    tx.execute("UPDATE config_head SET revision = revision + 1 WHERE singleton = 1", [])
        .map_err(db)?;
    let head = read_head(&tx)?;
    let rev = to_i64(head.revision, "revision")?;
    for m in mutations {
        apply_mutation(&tx, m, rev)?;
    }
    tx.execute(
        "INSERT INTO audit_log (at, actor, action, target, detail, revision) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![now_ms(), audit.actor, audit.action, audit.target, audit.detail, rev],
    )
    .map_err(db)?;
    tx.commit().map_err(db)?;
    Ok(head)
}

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

fn insert_usage_tx(conn: &mut Connection, events: &[UsageEvent]) -> Result<IngestResult> {
    let tx = conn.transaction().map_err(db)?;
    let received_at = now_ms();
    let mut inserted = 0u64;
    {
        let mut stmt = tx
            .prepare_cached(
                "INSERT OR IGNORE INTO usage_events (event_id, request_id, ts, node_id, \
                 api_key_id, account_id, model, input_tokens, output_tokens, \
                 cache_write_5m_tokens, cache_write_1h_tokens, cache_read_tokens, cost_pico_usd, \
                 http_status, error_type, stream, cancelled, latency_ms, ttfb_ms, \
                 upstream_request_id, web_search_requests, received_at, anomaly, client_request_id, \
                 queue_wait_ms, waited_for) VALUES \
                 (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, \
                 ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26)",
            )
            .map_err(db)?;
        for e in events {
            let n = stmt
                .execute(params![
                    e.event_id.hyphenated().to_string(),
                    e.request_id,
                    e.ts,
                    e.node_id,
                    e.api_key_id,
                    e.account_id,
                    e.model,
                    to_i64(e.input_tokens, "input_tokens")?,
                    to_i64(e.output_tokens, "output_tokens")?,
                    to_i64(e.cache_write_5m_tokens, "cache_write_5m_tokens")?,
                    to_i64(e.cache_write_1h_tokens, "cache_write_1h_tokens")?,
                    to_i64(e.cache_read_tokens, "cache_read_tokens")?,
                    to_i64(e.cost_pico_usd, "cost_pico_usd")?,
                    i64::from(e.http_status),
                    e.error_type,
                    e.stream,
                    e.cancelled,
                    to_i64(e.latency_ms, "latency_ms")?,
                    to_i64(e.ttfb_ms, "ttfb_ms")?,
                    e.upstream_request_id,
                    to_i64(e.web_search_requests, "web_search_requests")?,
                    received_at,
                    e.anomaly,
                    e.client_request_id,
                    to_i64(e.queue_wait_ms, "queue_wait_ms")?,
                    e.waited_for,
                ])
                .map_err(db)?;
            inserted += u64::try_from(n).map_err(|_| StoreError::Database("row count".into()))?;
        }
    }
    tx.commit().map_err(db)?;
    let total = u64::try_from(events.len()).map_err(|_| StoreError::Database("batch too large".into()))?;
    Ok(IngestResult {
        inserted,
        duplicates: total.saturating_sub(inserted),
    })
}

fn query_usage_tx(conn: &Connection, q: UsageQuery) -> Result<Vec<UsageRow>> {
    let bucket = match q.bucket.millis() {
        Some(_) => "(u.ts / ?3) * ?3",
        None => "0",
    };
    let (group, group_id, join) = match q.group_by {
        UsageGroupBy::None => ("''", "''", ""),
        UsageGroupBy::Key => (
            "COALESCE(k.name, u.api_key_id)",
            "u.api_key_id",
            "LEFT JOIN api_keys k ON k.id = u.api_key_id",
        ),
        UsageGroupBy::Account => (
            "COALESCE(a.name, d.name || ' (deleted)', u.account_id)",
            "u.account_id",
            "LEFT JOIN accounts a ON a.id = u.account_id \
             LEFT JOIN deleted_names d ON d.kind = 'account' AND d.id = u.account_id",
        ),
        UsageGroupBy::Model => ("u.model", "u.model", ""),
    };
    // ?3 is only referenced with a bucket; an unreferenced trailing parameter
    // would not be bindable, so the parameter list follows the SQL.
    let sql = format!(
        "SELECT {bucket} AS bucket_start, {group} AS grp, {group_id} AS gid, COUNT(*), \
         relay_sum(u.input_tokens), relay_sum(u.output_tokens), relay_sum(u.cache_write_5m_tokens), \
         relay_sum(u.cache_write_1h_tokens), relay_sum(u.cache_read_tokens), relay_sum(u.cost_pico_usd), \
         SUM(CASE WHEN u.http_status >= 400 OR u.error_type <> '' THEN 1 ELSE 0 END), \
         SUM(CASE WHEN u.anomaly <> '' THEN 1 ELSE 0 END) \
         FROM usage_events u {join} \
         WHERE (?1 IS NULL OR u.ts >= ?1) AND (?2 IS NULL OR u.ts < ?2) \
         GROUP BY bucket_start, gid, grp \
         ORDER BY bucket_start, grp, gid"
    );
    let map = |r: &Row<'_>| -> rusqlite::Result<UsageRow> {
        Ok(UsageRow {
            bucket_start: r.get(0)?,
            group: r.get(1)?,
            group_id: r.get(2)?,
            requests: col_u64(r, 3)?,
            input_tokens: col_u64(r, 4)?,
            output_tokens: col_u64(r, 5)?,
            cache_write_5m_tokens: col_u64(r, 6)?,
            cache_write_1h_tokens: col_u64(r, 7)?,
            cache_read_tokens: col_u64(r, 8)?,
            cost_pico_usd: col_u64(r, 9)?,
            errors: col_u64(r, 10)?,
            anomalies: col_u64(r, 11)?,
        })
    };
    let mut stmt = conn.prepare(&sql).map_err(db)?;
    let rows = match q.bucket.millis() {
        Some(b) => stmt.query_map(params![q.since, q.until, b], map),
        None => stmt.query_map(params![q.since, q.until], map),
    }
    .map_err(db)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db)
}

fn spend_by_key_tx(conn: &Connection, since: Millis, until: Millis) -> Result<BTreeMap<String, u64>> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT api_key_id, relay_sum(cost_pico_usd) FROM usage_events \
             WHERE ts >= ?1 AND ts < ?2 GROUP BY api_key_id",
        )
        .map_err(db)?;
    let rows = stmt
        .query_map(params![since, until], |r| Ok((r.get::<_, String>(0)?, col_u64(r, 1)?)))
        .map_err(db)?;
    rows.collect::<rusqlite::Result<BTreeMap<_, _>>>().map_err(db)
}

// ---------------------------------------------------------------------------
// The trait

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
        let version = self.with_conn(move |c| apply_tx(c, &mutations, &audit)).await?;
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
                    tx.execute(
                        "INSERT INTO audit_log (at, actor, action, target, detail, revision) \
                         VALUES (?1, 'control-plane', 'config.new_epoch', '', ?2, ?3)",
                        params![now_ms(), serde_json::json!({ "reason": reason }).to_string(), r],
                    )
                    .map_err(db)?;
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
                let r = i64::try_from(r).map_err(|_| StoreError::Database("revision out of range".into()))?;
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
        let node_id = node_id.to_owned();
        let replica = replica.to_owned();
        self.with_conn(move |c| record_proxy_tx(c, &node_id, &replica, &event))
            .await
    }

    async fn list_proxies(&self) -> Result<Vec<ProxyState>> {
        self.with_conn(|c| {
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

    async fn insert_usage(&self, events: &[UsageEvent]) -> Result<IngestResult> {
        if events.is_empty() {
            return Ok(IngestResult::default());
        }
        let events = events.to_vec();
        self.with_conn(move |c| insert_usage_tx(c, &events)).await
    }

    async fn query_usage(&self, query: UsageQuery) -> Result<Vec<UsageRow>> {
        self.with_conn(move |c| query_usage_tx(c, query)).await
    }

    async fn spend_by_key(&self, since: Millis, until: Millis) -> Result<BTreeMap<String, u64>> {
        self.with_conn(move |c| spend_by_key_tx(c, since, until)).await
    }

    async fn upsert_quotas(&self, quotas: &[AccountQuota]) -> Result<()> {
        if quotas.is_empty() {
            return Ok(());
        }
        let quotas = quotas.to_vec();
        self.with_conn(move |c| {
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
                    let windows = super::postgres::quota_windows_json(&q.windows)?;
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

    async fn list_quotas(&self) -> Result<Vec<AccountQuota>> {
        self.with_conn(|c| {
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
                        windows: super::postgres::quota_windows_from(windows)?,
                    })
                })
                .collect()
        })
        .await
    }

    async fn stash_oauth(&self, p: &OAuthPending) -> Result<()> {
        let p = p.clone();
        self.with_conn(move |c| {
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

    async fn list_oauth_pending(&self) -> Result<Vec<OAuthPending>> {
        self.with_conn(|c| {
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

    async fn drop_oauth_pending(&self, account_id: &str, from_hash: &str) -> Result<()> {
        let (a, h) = (account_id.to_string(), from_hash.to_string());
        self.with_conn(move |c| {
            c.execute(
                "DELETE FROM oauth_pending WHERE account_id = ?1 AND from_hash = ?2",
                params![a, h],
            )
            .map_err(db)?;
            Ok(())
        })
        .await
    }
    async fn delete_usage_before(&self, before_ms: Millis, limit: u32) -> Result<u64> {
        self.with_conn(move |c| {
            let n = c
                .execute(
                    "DELETE FROM usage_events WHERE rowid IN \
                     (SELECT rowid FROM usage_events WHERE ts < ?1 LIMIT ?2)",
                    params![before_ms, i64::from(limit)],
                )
                .map_err(db)?;
            Ok(n as u64)
        })
        .await
    }

    async fn claim_term(&self, holder: &str, mechanism: &str, detail: &str, now_ms: Millis) -> Result<u64> {
        let (holder, mechanism, detail) = (holder.to_owned(), mechanism.to_owned(), detail.to_owned());
        self.with_conn(move |c| {
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

    async fn leader(&self) -> Result<Option<LeaderRecord>> {
        self.with_conn(|c| {
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
}
