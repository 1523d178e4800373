//! SQLite rows to domain types and back, and the reads of config tables (`load_config`, the
//! list and get calls, and the rules' reads).

use super::error::*;
use crate::model::*;
use crate::store::rules::to_i64;
use crate::store::{Result, StoreError};
use rusqlite::types::{Type, Value};
use rusqlite::{Connection, OptionalExtension, Row};
use std::collections::{BTreeMap, HashMap};

// ---------------------------------------------------------------------------
// Row mapping

pub(super) const ACCOUNT_COLS: &str = "id, name, kind, base_url, credential_enc, refresh_token_enc, \
     credential_hint, credential_expires_at, priority, weight, max_concurrency, status, \
     proxy_url, created_at, updated_at, revision, proxy_url_enc, reset_generation, \
     oauth_scopes, subscription_type, organization";

pub(super) fn account_from_row(row: &Row<'_>) -> rusqlite::Result<Account> {
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
pub(super) fn account_values(a: &Account, revision: i64) -> Result<Vec<Value>> {
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

pub(super) const API_KEY_COLS: &str = "id, name, key_hash, key_prefix, status, expires_at, group_id, \
     allowed_models, rpm, tpm, max_concurrency, daily_budget, monthly_budget, created_at, \
     updated_at, revision";

pub(super) fn api_key_from_row(row: &Row<'_>) -> rusqlite::Result<ApiKey> {
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
pub(super) fn api_key_values(k: &ApiKey, revision: i64) -> Result<Vec<Value>> {
    let models = serde_json::to_string(&k.allowed_models)
        .map_err(|e| StoreError::internal("cannot encode allowed_models", e))?;
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

pub(super) const GROUP_COLS: &str = "id, name, description, created_at, updated_at, revision, rpm, tpm, \
     max_concurrency, daily_budget, monthly_budget, state, state_since, state_by";

/// A group row; its fallbacks are read apart ([`with_fallbacks`]).
pub(super) fn group_from_row(row: &Row<'_>) -> rusqlite::Result<Group> {
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
pub(super) fn read_fallbacks(conn: &Connection) -> Result<HashMap<String, Vec<String>>> {
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
pub(super) fn with_fallbacks(conn: &Connection, mut groups: Vec<Group>) -> Result<Vec<Group>> {
    let mut all = read_fallbacks(conn)?;
    for g in &mut groups {
        g.fallback_ids = all.remove(&g.id).unwrap_or_default();
    }
    Ok(groups)
}

/// Values for `GROUP_COLS` as `?1..?14`.
pub(super) fn group_values(g: &Group, revision: i64) -> Result<Vec<Value>> {
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

pub(super) const PRICE_COLS: &str = "id, model_pattern, effective_from, input, output, cache_write_5m, \
     cache_write_1h, cache_read, source, revision";

pub(super) fn price_from_row(row: &Row<'_>) -> rusqlite::Result<Price> {
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

pub(super) const ADMIN_TOKEN_COLS: &str = "id, name, token_hash, token_prefix, role, created_at, revision";

pub(super) fn admin_token_from_row(row: &Row<'_>) -> rusqlite::Result<AdminToken> {
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

pub(super) fn audit_from_row(row: &Row<'_>) -> rusqlite::Result<AuditEntry> {
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

pub(super) fn proxy_from_row(row: &Row<'_>) -> rusqlite::Result<ProxyState> {
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

pub(super) fn read_head(conn: &Connection) -> Result<Version> {
    let (epoch, revision): (i64, i64) = conn
        .query_row("SELECT epoch, revision FROM config_head WHERE singleton = 1", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .map_err(db)?;
    Ok(Version {
        epoch: u64::try_from(epoch).map_err(|_| StoreError::corrupt(format!("epoch {epoch}")))?,
        revision: rev_from_db(revision)?,
    })
}

pub(super) fn query_list<T>(
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
pub(super) fn get_by_id_or_name<T>(
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

pub(super) fn read_accounts(conn: &Connection) -> Result<Vec<Account>> {
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

pub(super) fn read_account(conn: &Connection, id_or_name: &str) -> Result<Option<Account>> {
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

pub(super) fn read_api_keys(conn: &Connection) -> Result<Vec<ApiKey>> {
    query_list(
        conn,
        &format!("SELECT {API_KEY_COLS} FROM api_keys ORDER BY name"),
        [],
        api_key_from_row,
    )
}

pub(super) fn read_groups(conn: &Connection) -> Result<Vec<Group>> {
    let groups = query_list(
        conn,
        &format!("SELECT {GROUP_COLS} FROM groups ORDER BY name"),
        [],
        group_from_row,
    )?;
    with_fallbacks(conn, groups)
}

pub(super) fn read_prices(conn: &Connection) -> Result<Vec<Price>> {
    query_list(
        conn,
        &format!("SELECT {PRICE_COLS} FROM prices ORDER BY model_pattern, effective_from"),
        [],
        price_from_row,
    )
}

pub(super) fn read_settings(conn: &Connection) -> Result<BTreeMap<String, String>> {
    let pairs = query_list(conn, "SELECT name, value FROM settings", [], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
    })?;
    Ok(pairs.into_iter().collect())
}

pub(super) fn read_account_states(conn: &Connection) -> Result<Vec<AccountState>> {
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
