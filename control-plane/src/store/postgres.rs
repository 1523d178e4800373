//! Postgres store (tokio-postgres + deadpool-postgres) for the distributed
//! control plane. Numbered migrations are applied at start under an advisory
//! lock, so replicas starting together migrate once. A dedicated connection
//! `LISTEN`s for head changes committed by other replicas (a hint only: the
//! config watcher also polls).

use super::{IngestResult, LeaderRecord, Result, Store, StoreError};
use crate::model::*;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Row};

const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/postgres/0001_init.sql")),
    (2, include_str!("../../migrations/postgres/0002_account_states.sql")),
    (3, include_str!("../../migrations/postgres/0003_proxy_url_enc.sql")),
    (4, include_str!("../../migrations/postgres/0004_config_sync.sql")),
    (5, include_str!("../../migrations/postgres/0005_usage_anomaly.sql")),
    (6, include_str!("../../migrations/postgres/0006_group_limits.sql")),
    (7, include_str!("../../migrations/postgres/0007_deleted_names.sql")),
    (8, include_str!("../../migrations/postgres/0008_leadership.sql")),
    (9, include_str!("../../migrations/postgres/0009_oauth_accounts.sql")),
    (
        10,
        include_str!("../../migrations/postgres/0010_quotas_and_refresh.sql"),
    ),
    (11, include_str!("../../migrations/postgres/0011_client_request_id.sql")),
    (12, include_str!("../../migrations/postgres/0012_queue_wait.sql")),
    (13, include_str!("../../migrations/postgres/0013_group_routing.sql")),
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

fn db<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Database(e.to_string())
}

fn pg(e: tokio_postgres::Error) -> StoreError {
    StoreError::Database(explain(&e))
}

/// What went wrong, as an operator can act on it: the server's own message (never query
/// parameters) with its SQLSTATE and, for the usual first-hour mistakes, what to do; otherwise
/// the whole error chain (connection refused, TLS).
fn explain(e: &tokio_postgres::Error) -> String {
    if let Some(d) = e.as_db_error() {
        let hint = match d.code().code() {
            "28P01" => " (the password in the database URL is wrong)",
            "28000" => " (the role does not exist, or the server's pg_hba.conf refuses this client: check the user in the database URL and pg_hba.conf; a server that requires TLS needs sslmode=require or stricter)",
            "3D000" => " (create the database, or fix its name in the database URL)",
            "53300" => " (the server has no connection slots left: raise its max_connections or lower --db-max-connections)",
            "57P03" => " (the server is starting up or shutting down: try again shortly)",
            _ => "",
        };
        return format!("{}: {}{hint}", d.code().code(), d.message());
    }
    let mut out = e.to_string();
    let mut next = std::error::Error::source(e);
    while let Some(cause) = next {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        next = cause.source();
    }
    out.push_str(connection_hint(&out));
    out
}

/// How long a new database connection may take to become a session (TCP, TLS, authentication).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// What to do about a connection that failed before the server said anything, from its error
/// chain ("" when there is nothing useful to add).
fn connection_hint(chain: &str) -> &'static str {
    let lower = chain.to_ascii_lowercase();
    if lower.contains("server does not support tls") {
        " (the server offers no TLS: use sslmode=prefer or disable, or turn ssl on in the server)"
    } else if lower.contains("connection refused") {
        " (nothing listens there: check the host and port in the database URL, and that Postgres runs)"
    } else if lower.contains("failed to lookup address") || lower.contains("name or service not known") {
        " (the host name in the database URL does not resolve: check it, and this machine's DNS)"
    } else if lower.contains("invalidcertificate") || lower.contains("certificate") {
        " (the server's certificate did not verify: check sslrootcert and the host name in the URL)"
    } else {
        ""
    }
}

/// A pool error: the connection's own error when there is one.
fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => StoreError::Database(explain(&e)),
        deadpool_postgres::PoolError::Timeout(deadpool_postgres::TimeoutType::Create) => StoreError::Database(format!(
            "no Postgres session within {}s at the database URL's host and port (is a Postgres server listening \
             there, not another service? is the network between here and there slow or filtered?)",
            CONNECT_TIMEOUT.as_secs()
        )),
        deadpool_postgres::PoolError::Timeout(_) => {
            StoreError::Database("timed out waiting for a database connection".to_string())
        }
        other => StoreError::Database(other.to_string()),
    }
}

fn to_i64(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| StoreError::Database(format!("{what} out of range")))
}

fn to_u64(v: i64, what: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} is negative")))
}

fn parse<T: FromStr<Err = String>>(s: &str) -> Result<T> {
    s.parse().map_err(StoreError::Corrupt)
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
            .map_err(db)?;
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
    let exists: bool = tx
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
        .await
        .map_err(pg)?
        .get(0);
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
        .map(|r| r.get(0))
        .collect();
    for (version, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        tx.batch_execute(sql)
            .await
            .map_err(|e| StoreError::Migration(format!("{version}: {}", pg(e))))?;
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

fn version_opt(epoch: Option<i64>, revision: Option<i64>) -> Result<Option<Version>> {
    Ok(match (epoch, revision) {
        (Some(e), Some(r)) => Some(Version {
            epoch: to_u64(e, "epoch")?,
            revision: to_u64(r, "revision")?,
        }),
        _ => None,
    })
}

fn account_from(row: &Row, group_ids: Vec<String>) -> Result<Account> {
    Ok(Account {
        id: row.get("id"),
        name: row.get("name"),
        kind: parse(row.get::<_, &str>("kind"))?,
        base_url: row.get("base_url"),
        credential_enc: row.get("credential_enc"),
        refresh_token_enc: row.get("refresh_token_enc"),
        credential_hint: row.get("credential_hint"),
        credential_expires_at: row.get("credential_expires_at"),
        priority: row.get("priority"),
        weight: u32::try_from(row.get::<_, i32>("weight")).map_err(db)?,
        group_ids,
        max_concurrency: u32::try_from(row.get::<_, i32>("max_concurrency")).map_err(db)?,
        status: parse(row.get::<_, &str>("status"))?,
        proxy_url: row.get("proxy_url"),
        proxy_url_enc: row.get("proxy_url_enc"),
        reset_generation: to_u64(row.get("reset_generation"), "reset_generation")?,
        scopes: row
            .get::<_, &str>("oauth_scopes")
            .split_whitespace()
            .map(str::to_string)
            .collect(),
        subscription_type: row.get("subscription_type"),
        organization: row.get("organization"),
        created_at: row.get("created_at"),
        updated_at: row.get("updated_at"),
        revision: to_u64(row.get("revision"), "revision")?,
    })
}

fn key_from(row: &Row) -> Result<ApiKey> {
    let models: String = row.get("allowed_models");
    Ok(ApiKey {
        id: row.get("id"),
        name: row.get("name"),
        key_hash: row.get("key_hash"),
        key_prefix: row.get("key_prefix"),
        status: parse(row.get::<_, &str>("status"))?,
        expires_at: row.get("expires_at"),
        group_id: row.get("group_id"),
        allowed_models: serde_json::from_str(&models).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        limits: KeyLimits {
            rpm: to_u64(row.get("rpm"), "rpm")?,
            tpm: to_u64(row.get("tpm"), "tpm")?,
            max_concurrency: to_u64(row.get("max_concurrency"), "max_concurrency")?,
            daily_budget: to_u64(row.get("daily_budget"), "daily_budget")?,
            monthly_budget: to_u64(row.get("monthly_budget"), "monthly_budget")?,
        },
        created_at: row.get("created_at"),
        updated_at: row.get("updated_at"),
        revision: to_u64(row.get("revision"), "revision")?,
    })
}

fn group_from(row: &Row, fallback_ids: Vec<String>) -> Result<Group> {
    Ok(Group {
        id: row.get("id"),
        name: row.get("name"),
        description: row.get("description"),
        limits: KeyLimits {
            rpm: to_u64(row.get("rpm"), "rpm")?,
            tpm: to_u64(row.get("tpm"), "tpm")?,
            max_concurrency: to_u64(row.get("max_concurrency"), "max_concurrency")?,
            daily_budget: to_u64(row.get("daily_budget"), "daily_budget")?,
            monthly_budget: to_u64(row.get("monthly_budget"), "monthly_budget")?,
        },
        fallback_ids,
        state: parse(row.get::<_, &str>("state"))?,
        state_since: row.get("state_since"),
        state_by: row.get("state_by"),
        created_at: row.get("created_at"),
        updated_at: row.get("updated_at"),
        revision: to_u64(row.get("revision"), "revision")?,
    })
}

fn price_from(row: &Row) -> Result<Price> {
    Ok(Price {
        id: row.get("id"),
        model_pattern: row.get("model_pattern"),
        effective_from: row.get("effective_from"),
        input: to_u64(row.get("input"), "price")?,
        output: to_u64(row.get("output"), "price")?,
        cache_write_5m: to_u64(row.get("cache_write_5m"), "price")?,
        cache_write_1h: to_u64(row.get("cache_write_1h"), "price")?,
        cache_read: to_u64(row.get("cache_read"), "price")?,
        source: row.get("source"),
        revision: to_u64(row.get("revision"), "revision")?,
    })
}

fn token_from(row: &Row) -> Result<AdminToken> {
    Ok(AdminToken {
        id: row.get("id"),
        name: row.get("name"),
        token_hash: row.get("token_hash"),
        token_prefix: row.get("token_prefix"),
        role: parse(row.get::<_, &str>("role"))?,
        created_at: row.get("created_at"),
        revision: to_u64(row.get("revision"), "revision")?,
    })
}

/// Maps a unique violation to `AlreadyExists`, a foreign-key violation to `InUse`.
fn write_err<'a>(kind: &'static str, name: &'a str) -> impl FnOnce(tokio_postgres::Error) -> StoreError + 'a {
    move |e| match e.code() {
        Some(c) if *c == SqlState::UNIQUE_VIOLATION => StoreError::AlreadyExists {
            kind,
            name: name.to_string(),
        },
        Some(c) if *c == SqlState::FOREIGN_KEY_VIOLATION => match kind {
            "group" => StoreError::InUse(format!("group {name}")),
            _ => StoreError::NotFound {
                kind: "group",
                name: "referenced by this write".into(),
            },
        },
        _ => pg(e),
    }
}

const ACCOUNT_COLS: &str = "id, name, kind, base_url, credential_enc, refresh_token_enc, credential_hint, \
     credential_expires_at, priority, weight, max_concurrency, status, proxy_url, created_at, updated_at, revision, proxy_url_enc, \
     reset_generation, oauth_scopes, subscription_type, organization";

async fn load_accounts(c: &impl deadpool_postgres::GenericClient, filter: Option<&str>) -> Result<Vec<Account>> {
    let rows = match filter {
        None => c
            .query(&format!("SELECT {ACCOUNT_COLS} FROM accounts ORDER BY name"), &[])
            .await
            .map_err(pg)?,
        Some(f) => c
            .query(
                &format!(
                    "SELECT {ACCOUNT_COLS} FROM accounts WHERE id = $1 OR name = $1 ORDER BY (id = $1) DESC LIMIT 1"
                ),
                &[&f],
            )
            .await
            .map_err(pg)?,
    };
    let mut memberships: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in c
        .query(
            "SELECT account_id, group_id FROM account_groups ORDER BY account_id, group_id",
            &[],
        )
        .await
        .map_err(pg)?
    {
        memberships.entry(r.get(0)).or_default().push(r.get(1));
    }
    rows.iter()
        .map(|r| {
            let id: String = r.get("id");
            account_from(r, memberships.remove(&id).unwrap_or_default())
        })
        .collect()
}

/// Every group's fallbacks, in order.
async fn load_fallbacks(c: &impl deadpool_postgres::GenericClient) -> Result<HashMap<String, Vec<String>>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for r in c
        .query(
            "SELECT group_id, fallback_id FROM group_fallbacks ORDER BY group_id, position",
            &[],
        )
        .await
        .map_err(pg)?
    {
        out.entry(r.get(0)).or_default().push(r.get(1));
    }
    Ok(out)
}

/// Every group by name, or the one with this id (else name).
async fn load_groups(c: &impl deadpool_postgres::GenericClient, filter: Option<&str>) -> Result<Vec<Group>> {
    let rows = match filter {
        None => c.query("SELECT * FROM groups ORDER BY name", &[]).await,
        Some(f) => {
            c.query(
                "SELECT * FROM groups WHERE id = $1 OR name = $1 ORDER BY (id = $1) DESC LIMIT 1",
                &[&f],
            )
            .await
        }
    }
    .map_err(pg)?;
    let mut fallbacks = load_fallbacks(c).await?;
    rows.iter()
        .map(|r| {
            let id: String = r.get("id");
            group_from(r, fallbacks.remove(&id).unwrap_or_default())
        })
        .collect()
}

/// Replaces a group's fallbacks (in the write's transaction) and checks what the store keeps:
/// every fallback exists, none repeats, none is the group itself, no cycle.
async fn set_fallbacks(tx: &deadpool_postgres::Transaction<'_>, g: &Group) -> Result<()> {
    tx.execute("DELETE FROM group_fallbacks WHERE group_id = $1", &[&g.id])
        .await
        .map_err(pg)?;
    if g.fallback_ids.is_empty() {
        return Ok(());
    }
    let names: HashMap<String, String> = tx
        .query("SELECT id, name FROM groups", &[])
        .await
        .map_err(pg)?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (i, f) in g.fallback_ids.iter().enumerate() {
        if !names.contains_key(f) {
            return Err(StoreError::NotFound {
                kind: "group",
                name: f.clone(),
            });
        }
        if g.fallback_ids[..i].contains(f) {
            return Err(StoreError::Invalid(format!(
                "group {:?} is named twice among {:?}'s fallbacks",
                names.get(f).unwrap_or(f),
                g.name
            )));
        }
    }
    let mut edges = load_fallbacks(tx).await?;
    edges.insert(g.id.clone(), g.fallback_ids.clone());
    super::check_fallbacks(&edges, &names, &g.id)?;
    for (i, f) in g.fallback_ids.iter().enumerate() {
        let position = i32::try_from(i).map_err(db)?;
        tx.execute(
            "INSERT INTO group_fallbacks (group_id, position, fallback_id) VALUES ($1, $2, $3)",
            &[&g.id, &position, f],
        )
        .await
        .map_err(pg)?;
    }
    Ok(())
}

async fn load_settings(c: &impl deadpool_postgres::GenericClient) -> Result<BTreeMap<String, String>> {
    Ok(c.query("SELECT name, value FROM settings ORDER BY name", &[])
        .await
        .map_err(pg)?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

async fn load_states(c: &impl deadpool_postgres::GenericClient) -> Result<Vec<AccountState>> {
    c.query(
        "SELECT account_id, scope, health, reason, until_at, since_at, reported_by, revision \
         FROM account_states ORDER BY account_id, scope",
        &[],
    )
    .await
    .map_err(pg)?
    .iter()
    .map(|r| {
        Ok(AccountState {
            account_id: r.get(0),
            scope: r.get(1),
            health: parse(r.get::<_, &str>(2))?,
            reason: r.get(3),
            until: r.get(4),
            since: r.get(5),
            reported_by: r.get(6),
            revision: to_u64(r.get(7), "revision")?,
        })
    })
    .collect()
}

async fn head_of(c: &impl deadpool_postgres::GenericClient) -> Result<Version> {
    let r = c
        .query_one("SELECT epoch, revision FROM config_head", &[])
        .await
        .map_err(pg)?;
    Ok(Version {
        epoch: to_u64(r.get(0), "epoch")?,
        revision: to_u64(r.get(1), "revision")?,
    })
}

async fn apply_one(tx: &deadpool_postgres::Transaction<'_>, m: &Mutation, rev: i64) -> Result<()> {
    match m {
        Mutation::InsertAccount(a) | Mutation::UpdateAccount { row: a, .. } => {
            let weight = i32::try_from(a.weight).map_err(db)?;
            let maxc = i32::try_from(a.max_concurrency).map_err(db)?;
            let generation = to_i64(a.reset_generation, "reset_generation")?;
            let scopes = a.scopes.join(" ");
            let n = if let Mutation::UpdateAccount { expect_revision, .. } = m {
                let expect = to_i64(*expect_revision, "revision")?;
                tx.execute(
                    "UPDATE accounts SET name=$2, kind=$3, base_url=$4, credential_enc=$5, refresh_token_enc=$6, \
                     credential_hint=$7, credential_expires_at=$8, priority=$9, weight=$10, max_concurrency=$11, \
                     status=$12, proxy_url=$13, updated_at=$14, revision=$15, proxy_url_enc=$17, reset_generation=$18, \
                     oauth_scopes=$19, subscription_type=$20, organization=$21 \
                     WHERE id=$1 AND revision=$16",
                    &[
                        &a.id,
                        &a.name,
                        &a.kind.as_str(),
                        &a.base_url,
                        &a.credential_enc,
                        &a.refresh_token_enc,
                        &a.credential_hint,
                        &a.credential_expires_at,
                        &a.priority,
                        &weight,
                        &maxc,
                        &a.status.as_str(),
                        &a.proxy_url,
                        &a.updated_at,
                        &rev,
                        &expect,
                        &a.proxy_url_enc,
                        &generation,
                        &scopes,
                        &a.subscription_type,
                        &a.organization,
                    ],
                )
                .await
                .map_err(write_err("account", &a.name))?
            } else {
                tx.execute(
                    &format!("INSERT INTO accounts ({ACCOUNT_COLS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19,$20,$21)"),
                    &[
                        &a.id, &a.name, &a.kind.as_str(), &a.base_url, &a.credential_enc, &a.refresh_token_enc,
                        &a.credential_hint, &a.credential_expires_at, &a.priority, &weight, &maxc,
                        &a.status.as_str(), &a.proxy_url, &a.created_at, &a.updated_at, &rev, &a.proxy_url_enc,
                        &generation, &scopes, &a.subscription_type, &a.organization,
                    ],
                )
                .await
                .map_err(write_err("account", &a.name))?
            };
            if n == 0 {
                return Err(missing_or_conflict(tx, "accounts", "account", &a.id).await);
            }
            tx.execute("DELETE FROM account_groups WHERE account_id = $1", &[&a.id])
                .await
                .map_err(pg)?;
            for g in &a.group_ids {
                tx.execute(
                    "INSERT INTO account_groups (account_id, group_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    &[&a.id, g],
                )
                .await
                .map_err(|e| match e.code() {
                    Some(c) if *c == SqlState::FOREIGN_KEY_VIOLATION => StoreError::NotFound {
                        kind: "group",
                        name: g.clone(),
                    },
                    _ => pg(e),
                })?;
            }
        }
        Mutation::DeleteAccount { id } => {
            // Usage reports keep naming the account (its usage rows hold only its id).
            tx.execute(
                "INSERT INTO deleted_names (kind, id, name, deleted_at) \
                 SELECT 'account', id, name, $2 FROM accounts WHERE id = $1 \
                 ON CONFLICT (kind, id) DO UPDATE SET name = EXCLUDED.name, deleted_at = EXCLUDED.deleted_at",
                &[id, &crate::model::now_ms()],
            )
            .await
            .map_err(pg)?;
            let n = tx
                .execute("DELETE FROM accounts WHERE id = $1", &[id])
                .await
                .map_err(pg)?;
            if n == 0 {
                return Err(StoreError::NotFound {
                    kind: "account",
                    name: id.clone(),
                });
            }
        }
        Mutation::InsertApiKey(k) | Mutation::UpdateApiKey { row: k, .. } => {
            let models = serde_json::to_string(&k.allowed_models).map_err(db)?;
            let l = &k.limits;
            let (rpm, tpm, maxc, daily, monthly) = (
                to_i64(l.rpm, "rpm")?,
                to_i64(l.tpm, "tpm")?,
                to_i64(l.max_concurrency, "concurrency")?,
                to_i64(l.daily_budget, "daily budget")?,
                to_i64(l.monthly_budget, "monthly budget")?,
            );
            let n = if let Mutation::UpdateApiKey { expect_revision, .. } = m {
                let expect = to_i64(*expect_revision, "revision")?;
                tx.execute(
                    "UPDATE api_keys SET name=$2, status=$3, expires_at=$4, group_id=$5, allowed_models=$6, rpm=$7, \
                     tpm=$8, max_concurrency=$9, daily_budget=$10, monthly_budget=$11, updated_at=$12, revision=$13 \
                     WHERE id=$1 AND revision=$14",
                    &[
                        &k.id,
                        &k.name,
                        &k.status.as_str(),
                        &k.expires_at,
                        &k.group_id,
                        &models,
                        &rpm,
                        &tpm,
                        &maxc,
                        &daily,
                        &monthly,
                        &k.updated_at,
                        &rev,
                        &expect,
                    ],
                )
                .await
                .map_err(write_err("api_key", &k.name))?
            } else {
                tx.execute(
                    "INSERT INTO api_keys (id, name, key_hash, key_prefix, status, expires_at, group_id, allowed_models, \
                     rpm, tpm, max_concurrency, daily_budget, monthly_budget, created_at, updated_at, revision) \
                     VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16)",
                    &[
                        &k.id, &k.name, &k.key_hash, &k.key_prefix, &k.status.as_str(), &k.expires_at, &k.group_id,
                        &models, &rpm, &tpm, &maxc, &daily, &monthly, &k.created_at, &k.updated_at, &rev,
                    ],
                )
                .await
                .map_err(write_err("api_key", &k.name))?
            };
            if n == 0 {
                return Err(missing_or_conflict(tx, "api_keys", "api_key", &k.id).await);
            }
        }
        Mutation::InsertGroup(g) | Mutation::UpdateGroup { row: g, .. } => {
            let l = &g.limits;
            let (rpm, tpm, maxc, daily, monthly) = (
                to_i64(l.rpm, "rpm")?,
                to_i64(l.tpm, "tpm")?,
                to_i64(l.max_concurrency, "concurrency")?,
                to_i64(l.daily_budget, "daily budget")?,
                to_i64(l.monthly_budget, "monthly budget")?,
            );
            let n = if let Mutation::UpdateGroup { expect_revision, .. } = m {
                let expect = to_i64(*expect_revision, "revision")?;
                tx.execute(
                    "UPDATE groups SET name=$2, description=$3, updated_at=$4, revision=$5, rpm=$6, tpm=$7, \
                     max_concurrency=$8, daily_budget=$9, monthly_budget=$10, state=$12, state_since=$13, \
                     state_by=$14 WHERE id=$1 AND revision=$11",
                    &[
                        &g.id,
                        &g.name,
                        &g.description,
                        &g.updated_at,
                        &rev,
                        &rpm,
                        &tpm,
                        &maxc,
                        &daily,
                        &monthly,
                        &expect,
                        &g.state.as_str(),
                        &g.state_since,
                        &g.state_by,
                    ],
                )
                .await
                .map_err(write_err("group", &g.name))?
            } else {
                tx.execute(
                    "INSERT INTO groups (id, name, description, created_at, updated_at, revision, rpm, tpm, \
                     max_concurrency, daily_budget, monthly_budget, state, state_since, state_by) \
                     VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14)",
                    &[
                        &g.id,
                        &g.name,
                        &g.description,
                        &g.created_at,
                        &g.updated_at,
                        &rev,
                        &rpm,
                        &tpm,
                        &maxc,
                        &daily,
                        &monthly,
                        &g.state.as_str(),
                        &g.state_since,
                        &g.state_by,
                    ],
                )
                .await
                .map_err(write_err("group", &g.name))?
            };
            if n == 0 {
                return Err(missing_or_conflict(tx, "groups", "group", &g.id).await);
            }
            set_fallbacks(tx, g).await?;
        }
        Mutation::DeleteGroup { id } => {
            let n = tx
                .execute("DELETE FROM groups WHERE id = $1", &[id])
                .await
                .map_err(write_err("group", id))?;
            if n == 0 {
                return Err(StoreError::NotFound {
                    kind: "group",
                    name: id.clone(),
                });
            }
        }
        Mutation::UpsertPrice(p) => {
            tx.execute(
                "INSERT INTO prices (id, model_pattern, effective_from, input, output, cache_write_5m, cache_write_1h, \
                 cache_read, source, revision) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10) \
                 ON CONFLICT (id) DO UPDATE SET model_pattern=EXCLUDED.model_pattern, \
                 effective_from=EXCLUDED.effective_from, input=EXCLUDED.input, output=EXCLUDED.output, \
                 cache_write_5m=EXCLUDED.cache_write_5m, cache_write_1h=EXCLUDED.cache_write_1h, \
                 cache_read=EXCLUDED.cache_read, source=EXCLUDED.source, revision=EXCLUDED.revision",
                &[
                    &p.id,
                    &p.model_pattern,
                    &p.effective_from,
                    &to_i64(p.input, "price")?,
                    &to_i64(p.output, "price")?,
                    &to_i64(p.cache_write_5m, "price")?,
                    &to_i64(p.cache_write_1h, "price")?,
                    &to_i64(p.cache_read, "price")?,
                    &p.source,
                    &rev,
                ],
            )
            .await
            .map_err(write_err("price", &p.model_pattern))?;
        }
        Mutation::DeletePrice { id } => {
            let n = tx
                .execute("DELETE FROM prices WHERE id = $1", &[id])
                .await
                .map_err(pg)?;
            if n == 0 {
                return Err(StoreError::NotFound {
                    kind: "price",
                    name: id.clone(),
                });
            }
        }
        Mutation::SetSetting { name, value } => {
            tx.execute(
                "INSERT INTO settings (name, value, revision) VALUES ($1,$2,$3) \
                 ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, revision = EXCLUDED.revision",
                &[name, value, &rev],
            )
            .await
            .map_err(pg)?;
        }
        Mutation::UnsetSetting { name } => {
            let n = tx
                .execute("DELETE FROM settings WHERE name = $1", &[name])
                .await
                .map_err(pg)?;
            if n == 0 {
                return Err(StoreError::NotFound {
                    kind: "setting",
                    name: name.clone(),
                });
            }
        }
        Mutation::InsertAdminToken(t) => {
            tx.execute(
                "INSERT INTO admin_tokens (id, name, token_hash, token_prefix, role, created_at, revision) \
                 VALUES ($1,$2,$3,$4,$5,$6,$7)",
                &[
                    &t.id,
                    &t.name,
                    &t.token_hash,
                    &t.token_prefix,
                    &t.role.as_str(),
                    &t.created_at,
                    &rev,
                ],
            )
            .await
            .map_err(write_err("admin_token", &t.name))?;
        }
        Mutation::SetAccountState(st) => {
            tx.execute(
                "INSERT INTO account_states (account_id, scope, health, reason, until_at, since_at, reported_by, revision) \
                 VALUES ($1,$2,$3,$4,$5,$6,$7,$8) ON CONFLICT (account_id, scope) DO UPDATE SET \
                 health=EXCLUDED.health, reason=EXCLUDED.reason, until_at=EXCLUDED.until_at, \
                 since_at=EXCLUDED.since_at, reported_by=EXCLUDED.reported_by, revision=EXCLUDED.revision",
                &[
                    &st.account_id, &st.scope, &st.health.as_str(), &st.reason, &st.until, &st.since,
                    &st.reported_by, &rev,
                ],
            )
            .await
            .map_err(|e| match e.code() {
                Some(c) if *c == SqlState::FOREIGN_KEY_VIOLATION => StoreError::NotFound {
                    kind: "account",
                    name: st.account_id.clone(),
                },
                _ => pg(e),
            })?;
        }
        Mutation::RequireResetGeneration { account_id, at_most } => {
            let row = tx
                .query_opt("SELECT reset_generation FROM accounts WHERE id = $1", &[account_id])
                .await
                .map_err(pg)?
                .ok_or_else(|| StoreError::NotFound {
                    kind: "account",
                    name: account_id.clone(),
                })?;
            if to_u64(row.get(0), "reset_generation")? > *at_most {
                return Err(StoreError::Conflict {
                    kind: "account",
                    id: account_id.clone(),
                });
            }
        }
        Mutation::CheckTerm { term } => {
            // FOR SHARE: a claim_term committing meanwhile is waited for, and then seen.
            let row = tx
                .query_opt("SELECT term FROM leadership WHERE name = 'leader' FOR SHARE", &[])
                .await
                .map_err(pg)?;
            let current = match row {
                Some(r) => to_u64(r.get(0), "term")?,
                None => 0,
            };
            if current != *term {
                return Err(StoreError::Fenced { held: *term, current });
            }
        }
        Mutation::ClearAccountState { account_id, scope } => {
            tx.execute(
                "DELETE FROM account_states WHERE account_id = $1 AND scope = $2",
                &[account_id, scope],
            )
            .await
            .map_err(pg)?;
        }
        Mutation::DeleteAdminToken { id } => {
            let n = tx
                .execute("DELETE FROM admin_tokens WHERE id = $1", &[id])
                .await
                .map_err(pg)?;
            if n == 0 {
                return Err(StoreError::NotFound {
                    kind: "admin_token",
                    name: id.clone(),
                });
            }
        }
    }
    Ok(())
}

async fn missing_or_conflict(
    tx: &deadpool_postgres::Transaction<'_>,
    table: &str,
    kind: &'static str,
    id: &str,
) -> StoreError {
    match tx
        .query_opt(&format!("SELECT 1 FROM {table} WHERE id = $1"), &[&id])
        .await
    {
        Ok(Some(_)) => StoreError::Conflict {
            kind,
            id: id.to_string(),
        },
        Ok(None) => StoreError::NotFound {
            kind,
            name: id.to_string(),
        },
        Err(e) => pg(e),
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
        // The row lock taken here is held until commit: writers serialize, and
        // revisions commit in order.
        let head = tx
            .query_one(
                "UPDATE config_head SET revision = revision + 1 RETURNING epoch, revision",
                &[],
            )
            .await
            .map_err(pg)?;
        let (epoch, rev): (i64, i64) = (head.get(0), head.get(1));
        for m in &mutations {
            apply_one(&tx, m, rev).await?;
        }
        tx.execute(
            "INSERT INTO audit_log (at, actor, action, target, detail, revision) VALUES ($1,$2,$3,$4,$5,$6)",
            &[
                &now_ms(),
                &audit.actor,
                &audit.action,
                &audit.target,
                &audit.detail,
                &rev,
            ],
        )
        .await
        .map_err(pg)?;
        tx.execute("SELECT pg_notify($1, $2)", &[&NOTIFY_CHANNEL, &rev.to_string()])
            .await
            .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        self.hint.notify_waiters();
        self.hint.notify_one();
        Ok(Version {
            epoch: to_u64(epoch, "epoch")?,
            revision: to_u64(rev, "revision")?,
        })
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
        tx.execute(
            "INSERT INTO audit_log (at, actor, action, target, detail, revision) VALUES ($1,$2,$3,$4,$5,$6)",
            &[
                &now_ms(),
                &"control-plane",
                &"config.new_epoch",
                &"",
                &serde_json::json!({ "reason": reason }).to_string(),
                &r,
            ],
        )
        .await
        .map_err(pg)?;
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
        tx.commit().await.map_err(pg)?;
        Ok(ConfigState {
            version,
            api_keys,
            accounts,
            groups,
            prices,
            settings,
            account_states,
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
                    id: to_u64(r.get(0), "id")?,
                    at: r.get(1),
                    actor: r.get(2),
                    action: r.get(3),
                    target: r.get(4),
                    detail: r.get(5),
                    revision: to_u64(r.get(6), "revision")?,
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
                    id: to_u64(r.get(0), "id")?,
                    at: r.get(1),
                    actor: r.get(2),
                    action: r.get(3),
                    target: r.get(4),
                    detail: r.get(5),
                    revision: to_u64(r.get(6), "revision")?,
                })
            })
            .collect()
    }

    async fn record_proxy(&self, node_id: &str, replica: &str, event: ProxyEvent) -> Result<()> {
        let c = self.client().await?;
        let now = now_ms();
        c.execute(
            "INSERT INTO proxies (node_id, last_seen, connected, replica) VALUES ($1, $2, FALSE, $3) \
             ON CONFLICT (node_id) DO NOTHING",
            &[&node_id, &now, &replica],
        )
        .await
        .map_err(pg)?;
        let v = |v: Option<Version>| -> Result<(Option<i64>, Option<i64>)> {
            Ok(match v {
                Some(v) => (Some(to_i64(v.epoch, "epoch")?), Some(to_i64(v.revision, "revision")?)),
                None => (None, None),
            })
        };
        match event {
            ProxyEvent::Connected { build_version, .. } => {
                c.execute(
                    "UPDATE proxies SET build_version=$2, connected=TRUE, replica=$3, last_seen=$4 WHERE node_id=$1",
                    &[&node_id, &build_version, &replica, &now],
                )
                .await
            }
            ProxyEvent::Acked { version, rejected } => {
                let (e, r) = v(Some(version))?;
                // A NACK is history once a later version is applied.
                c.execute(
                    "UPDATE proxies SET acked_epoch=$2, acked_revision=$3, last_seen=$4, rejected=$5, \
                     nack_epoch = CASE WHEN nack_epoch <> $2 OR nack_revision <= $3 THEN NULL ELSE nack_epoch END, \
                     nack_revision = CASE WHEN nack_epoch <> $2 OR nack_revision <= $3 THEN NULL ELSE nack_revision END, \
                     nack_error = CASE WHEN nack_epoch <> $2 OR nack_revision <= $3 THEN '' ELSE nack_error END, \
                     nack_at = CASE WHEN nack_epoch <> $2 OR nack_revision <= $3 THEN 0 ELSE nack_at END \
                     WHERE node_id=$1",
                    &[&node_id, &e, &r, &now, &rejected_to_json(&rejected)],
                )
                .await
            }
            ProxyEvent::Nacked { version, error, .. } => {
                let (e, r) = v(Some(version))?;
                c.execute(
                    "UPDATE proxies SET nack_epoch=$2, nack_revision=$3, nack_error=$4, nack_at=$5, last_seen=$5 \
                     WHERE node_id=$1",
                    &[&node_id, &e, &r, &error, &now],
                )
                .await
            }
            ProxyEvent::Seen => {
                c.execute(
                    "UPDATE proxies SET last_seen=$3 WHERE node_id=$1 AND replica=$2 AND connected",
                    &[&node_id, &replica, &now],
                )
                .await
            }
            ProxyEvent::Disconnected => {
                c.execute(
                    "UPDATE proxies SET connected = (replica <> $2) AND connected, last_seen=$3 WHERE node_id=$1",
                    &[&node_id, &replica, &now],
                )
                .await
            }
        }
        .map_err(pg)?;
        Ok(())
    }

    async fn list_proxies(&self) -> Result<Vec<ProxyState>> {
        let c = self.client().await?;
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
                    node_id: r.get(0),
                    build_version: r.get(1),
                    acked: version_opt(r.get(2), r.get(3))?,
                    nack_version: version_opt(r.get(4), r.get(5))?,
                    nack_error: r.get(6),
                    nack_at: r.get(7),
                    last_seen: r.get(8),
                    connected: r.get(9),
                    replica: r.get(10),
                    rejected: rejected_from_json(r.get(11)),
                })
            })
            .collect()
    }

    async fn insert_usage(&self, events: &[UsageEvent]) -> Result<IngestResult> {
        if events.is_empty() {
            return Ok(IngestResult::default());
        }
        // Column-wise arrays, inserted in one statement with unnest().
        let n = events.len();
        let mut ids = Vec::with_capacity(n);
        let mut req = Vec::with_capacity(n);
        let mut ts = Vec::with_capacity(n);
        let mut node = Vec::with_capacity(n);
        let mut key = Vec::with_capacity(n);
        let mut acct = Vec::with_capacity(n);
        let mut model = Vec::with_capacity(n);
        let mut nums: [Vec<i64>; 9] = Default::default();
        let mut status = Vec::with_capacity(n);
        let mut err = Vec::with_capacity(n);
        let mut stream = Vec::with_capacity(n);
        let mut cancelled = Vec::with_capacity(n);
        let mut upstream = Vec::with_capacity(n);
        let mut anomaly = Vec::with_capacity(n);
        let mut client_id = Vec::with_capacity(n);
        let mut waited_ms = Vec::with_capacity(n);
        let mut waited_for = Vec::with_capacity(n);
        for e in events {
            ids.push(e.event_id);
            req.push(e.request_id.as_str());
            ts.push(e.ts);
            node.push(e.node_id.as_str());
            key.push(e.api_key_id.as_str());
            acct.push(e.account_id.as_str());
            model.push(e.model.as_str());
            for (slot, v) in nums.iter_mut().zip([
                e.input_tokens,
                e.output_tokens,
                e.cache_write_5m_tokens,
                e.cache_write_1h_tokens,
                e.cache_read_tokens,
                e.cost_pico_usd,
                e.latency_ms,
                e.ttfb_ms,
                e.web_search_requests,
            ]) {
                slot.push(to_i64(v, "usage value")?);
            }
            status.push(i32::try_from(e.http_status).map_err(db)?);
            err.push(e.error_type.as_str());
            stream.push(e.stream);
            cancelled.push(e.cancelled);
            upstream.push(e.upstream_request_id.as_str());
            anomaly.push(e.anomaly.as_str());
            client_id.push(e.client_request_id.as_str());
            waited_ms.push(i64::try_from(e.queue_wait_ms).unwrap_or(i64::MAX));
            waited_for.push(e.waited_for.as_str());
        }
        let now = now_ms();
        let c = self.client().await?;
        let inserted = c
            .execute(
                "INSERT INTO usage_events (event_id, request_id, ts, node_id, api_key_id, account_id, model, \
                 input_tokens, output_tokens, cache_write_5m_tokens, cache_write_1h_tokens, cache_read_tokens, \
                 cost_pico_usd, latency_ms, ttfb_ms, web_search_requests, http_status, error_type, stream, \
                 cancelled, upstream_request_id, anomaly, client_request_id, queue_wait_ms, waited_for, received_at) \
                 SELECT *, $21::BIGINT FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::text[], \
                 $6::text[], $7::text[], $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[], $12::bigint[], \
                 $13::bigint[], $14::bigint[], $15::bigint[], $16::bigint[], $17::int[], $18::text[], $19::bool[], \
                 $20::bool[], $22::text[], $23::text[], $24::text[], $25::bigint[], $26::text[]) \
                 ON CONFLICT (event_id) DO NOTHING",
                &[
                    &ids,
                    &req,
                    &ts,
                    &node,
                    &key,
                    &acct,
                    &model,
                    &nums[0],
                    &nums[1],
                    &nums[2],
                    &nums[3],
                    &nums[4],
                    &nums[5],
                    &nums[6],
                    &nums[7],
                    &nums[8],
                    &status,
                    &err,
                    &stream,
                    &cancelled,
                    &now,
                    &upstream,
                    &anomaly,
                    &client_id,
                    &waited_ms,
                    &waited_for,
                ],
            )
            .await
            .map_err(pg)?;
        let n = n as u64;
        Ok(IngestResult {
            inserted,
            duplicates: n.saturating_sub(inserted),
        })
    }

    async fn query_usage(&self, q: UsageQuery) -> Result<Vec<UsageRow>> {
        let bucket = q.bucket.millis().unwrap_or(0);
        let (group_expr, name_expr, join) = match q.group_by {
            UsageGroupBy::None => ("''", "''", ""),
            UsageGroupBy::Key => (
                "e.api_key_id",
                "COALESCE(MAX(k.name), e.api_key_id)",
                "LEFT JOIN api_keys k ON k.id = e.api_key_id",
            ),
            UsageGroupBy::Account => (
                "e.account_id",
                "COALESCE(MAX(a.name), MAX(d.name) || ' (deleted)', e.account_id)",
                "LEFT JOIN accounts a ON a.id = e.account_id \
                 LEFT JOIN deleted_names d ON d.kind = 'account' AND d.id = e.account_id",
            ),
            UsageGroupBy::Model => ("e.model", "e.model", ""),
        };
        let bucket_expr = if bucket > 0 {
            "(e.ts / $3::BIGINT) * $3::BIGINT"
        } else {
            "($3::BIGINT * 0)"
        };
        let sql = format!(
            "SELECT {bucket_expr} AS b, {group_expr} AS gid, {name_expr} AS gname, COUNT(*)::BIGINT, \
             {input}, {output}, {w5m}, {w1h}, {read}, {cost}, \
             COUNT(*) FILTER (WHERE e.http_status >= 400 OR e.error_type <> '')::BIGINT, \
             COUNT(*) FILTER (WHERE e.anomaly <> '')::BIGINT \
             FROM usage_events e {join} WHERE e.ts >= $1 AND e.ts < $2 \
             GROUP BY 1, 2 ORDER BY 1, 3",
            input = saturating_sum("e.input_tokens"),
            output = saturating_sum("e.output_tokens"),
            w5m = saturating_sum("e.cache_write_5m_tokens"),
            w1h = saturating_sum("e.cache_write_1h_tokens"),
            read = saturating_sum("e.cache_read_tokens"),
            cost = saturating_sum("e.cost_pico_usd"),
        );
        let c = self.client().await?;
        let rows = c
            .query(
                &sql,
                &[
                    &q.since.unwrap_or(i64::MIN),
                    &q.until.unwrap_or(i64::MAX),
                    &bucket.max(1),
                ],
            )
            .await
            .map_err(pg)?;
        rows.iter()
            .map(|r| {
                Ok(UsageRow {
                    bucket_start: r.get(0),
                    group_id: r.get(1),
                    group: r.get(2),
                    requests: to_u64(r.get(3), "count")?,
                    input_tokens: to_u64(r.get(4), "sum")?,
                    output_tokens: to_u64(r.get(5), "sum")?,
                    cache_write_5m_tokens: to_u64(r.get(6), "sum")?,
                    cache_write_1h_tokens: to_u64(r.get(7), "sum")?,
                    cache_read_tokens: to_u64(r.get(8), "sum")?,
                    cost_pico_usd: to_u64(r.get(9), "sum")?,
                    errors: to_u64(r.get(10), "count")?,
                    anomalies: to_u64(r.get(11), "count")?,
                })
            })
            .collect()
    }

    async fn spend_by_key(&self, since: Millis, until: Millis) -> Result<BTreeMap<String, u64>> {
        let sql = format!(
            "SELECT api_key_id, {cost} FROM usage_events WHERE ts >= $1 AND ts < $2 GROUP BY api_key_id",
            cost = saturating_sum("cost_pico_usd"),
        );
        let c = self.client().await?;
        let rows = c.query(&sql, &[&since, &until]).await.map_err(pg)?;
        rows.iter()
            .map(|r| Ok((r.get::<_, String>(0), to_u64(r.get(1), "sum")?)))
            .collect()
    }

    async fn upsert_quotas(&self, quotas: &[AccountQuota]) -> Result<()> {
        if quotas.is_empty() {
            return Ok(());
        }
        let c = self.client().await?;
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

    async fn list_quotas(&self) -> Result<Vec<AccountQuota>> {
        let c = self.client().await?;
        c.query(
            "SELECT account_id, observed_at, observed_by, status, reset_at, windows FROM account_quotas",
            &[],
        )
        .await
        .map_err(pg)?
        .iter()
        .map(|r| {
            Ok(AccountQuota {
                account_id: r.get(0),
                observed_at: r.get(1),
                observed_by: r.get(2),
                status: r.get(3),
                reset_at: r.get(4),
                windows: quota_windows_from(r.get(5))?,
            })
        })
        .collect()
    }

    async fn stash_oauth(&self, p: &OAuthPending) -> Result<()> {
        let c = self.client().await?;
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

    async fn list_oauth_pending(&self) -> Result<Vec<OAuthPending>> {
        let c = self.client().await?;
        Ok(c.query(
            "SELECT account_id, from_hash, sealed, created_at FROM oauth_pending ORDER BY created_at",
            &[],
        )
        .await
        .map_err(pg)?
        .iter()
        .map(|r| OAuthPending {
            account_id: r.get(0),
            from_hash: r.get(1),
            sealed: r.get(2),
            created_at: r.get(3),
        })
        .collect())
    }

    async fn drop_oauth_pending(&self, account_id: &str, from_hash: &str) -> Result<()> {
        let c = self.client().await?;
        c.execute(
            "DELETE FROM oauth_pending WHERE account_id = $1 AND from_hash = $2",
            &[&account_id, &from_hash],
        )
        .await
        .map_err(pg)?;
        Ok(())
    }
    async fn delete_usage_before(&self, before_ms: Millis, limit: u32) -> Result<u64> {
        let c = self.client().await?;
        let n = c
            .execute(
                "DELETE FROM usage_events WHERE ctid = ANY(ARRAY(\
                 SELECT ctid FROM usage_events WHERE ts < $1 LIMIT $2))",
                &[&before_ms, &i64::from(limit)],
            )
            .await
            .map_err(pg)?;
        Ok(n)
    }

    async fn claim_term(&self, holder: &str, mechanism: &str, detail: &str, now_ms: Millis) -> Result<u64> {
        let c = self.client().await?;
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
        to_u64(row.get(0), "term")
    }

    async fn leader(&self) -> Result<Option<LeaderRecord>> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                "SELECT term, holder, mechanism, since_ms, detail FROM leadership WHERE name = 'leader'",
                &[],
            )
            .await
            .map_err(pg)?;
        row.map(|r| {
            Ok(LeaderRecord {
                term: to_u64(r.get(0), "term")?,
                holder: r.get::<_, Option<String>>(1).unwrap_or_default(),
                mechanism: r.get::<_, Option<String>>(2).unwrap_or_default(),
                since_ms: r.get::<_, Option<i64>>(3).unwrap_or_default(),
                detail: r.get::<_, Option<String>>(4).unwrap_or_default(),
            })
        })
        .transpose()
    }
}

/// A quota's windows as stored (JSON text).
pub(crate) fn quota_windows_json(w: &[QuotaWindow]) -> Result<String> {
    serde_json::to_string(w).map_err(|e| StoreError::Corrupt(format!("quota windows: {e}")))
}

pub(crate) fn quota_windows_from(text: String) -> Result<Vec<QuotaWindow>> {
    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("quota windows: {e}")))
}

/// `SUM(col)` as a BIGINT that saturates at `i64::MAX` instead of failing the query (the sum of
/// a BIGINT column is NUMERIC, which never overflows; only the cast back could).
fn saturating_sum(col: &str) -> String {
    format!("LEAST(SUM({col}), 9223372036854775807)::BIGINT")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::connection_hint;

    /// A database URL pointing at a port where something else listens (it accepts and says
    /// nothing Postgres understands) fails with a message, not a hang.
    #[tokio::test]
    async fn a_port_that_is_not_postgres_is_an_error_not_a_hang() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let _held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((sock, _)) = listener.accept().await {
                open.push(sock);
            }
        });
        let url = format!("postgres://relay@127.0.0.1:{port}/relay?sslmode=disable");
        let started = std::time::Instant::now();
        let err = match super::PostgresStore::connect(&url, 2).await {
            Ok(_) => panic!("connected to a silent port"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("no Postgres session within 15s"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(40));
    }

    /// A connection that failed before the server spoke says what to check.
    #[test]
    fn connection_failures_say_what_to_check() {
        for (chain, says) in [
            (
                "error connecting to server: failed to lookup address information: Name or service not known",
                "does not resolve",
            ),
            (
                "error connecting to server: Connection refused (os error 111)",
                "nothing listens there",
            ),
            (
                "error performing TLS handshake: server does not support TLS",
                "offers no TLS",
            ),
            ("invalid peer certificate: UnknownIssuer", "sslrootcert"),
        ] {
            assert!(connection_hint(chain).contains(says), "{chain}");
        }
        assert_eq!(connection_hint("something else"), "");
    }
}
