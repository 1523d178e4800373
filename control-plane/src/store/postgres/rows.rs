//! Postgres rows to domain types, and the reads of config tables (`load_config`, the list and
//! get calls, and the rules' reads).

use super::error::{parse, pg, to_u32, to_u64};
use crate::model::*;
use crate::store::Result;
use crate::store::StoreError;
use std::collections::{BTreeMap, HashMap};
use tokio_postgres::Row;

/// A column's value; one that does not convert (a type or a NULL the code does not expect) is
/// `Corrupt`, not a panic.
pub(super) fn col<'a, T, I>(row: &'a Row, idx: I) -> Result<T>
where
    T: tokio_postgres::types::FromSql<'a>,
    I: tokio_postgres::row::RowIndex + std::fmt::Display,
{
    row.try_get(idx).map_err(pg)
}

pub(super) fn version_opt(epoch: Option<i64>, revision: Option<i64>) -> Result<Option<Version>> {
    Ok(match (epoch, revision) {
        (Some(e), Some(r)) => Some(Version {
            epoch: to_u64(e, "epoch")?,
            revision: to_u64(r, "revision")?,
        }),
        _ => None,
    })
}

pub(super) fn account_from(row: &Row, group_ids: Vec<String>) -> Result<Account> {
    Ok(Account {
        id: col(row, "id")?,
        name: col(row, "name")?,
        kind: parse(col::<&str, _>(row, "kind")?)?,
        base_url: col(row, "base_url")?,
        credential_enc: col(row, "credential_enc")?,
        refresh_token_enc: col(row, "refresh_token_enc")?,
        credential_hint: col(row, "credential_hint")?,
        credential_expires_at: col(row, "credential_expires_at")?,
        priority: col(row, "priority")?,
        weight: to_u32(col(row, "weight")?, "weight")?,
        group_ids,
        max_concurrency: to_u32(col(row, "max_concurrency")?, "max_concurrency")?,
        status: parse(col::<&str, _>(row, "status")?)?,
        proxy_url: col(row, "proxy_url")?,
        proxy_url_enc: col(row, "proxy_url_enc")?,
        reset_generation: to_u64(col(row, "reset_generation")?, "reset_generation")?,
        scopes: col::<&str, _>(row, "oauth_scopes")?
            .split_whitespace()
            .map(str::to_string)
            .collect(),
        subscription_type: col(row, "subscription_type")?,
        organization: col(row, "organization")?,
        created_at: col(row, "created_at")?,
        updated_at: col(row, "updated_at")?,
        revision: to_u64(col(row, "revision")?, "revision")?,
    })
}

pub(super) fn key_from(row: &Row) -> Result<ApiKey> {
    let models: String = col(row, "allowed_models")?;
    Ok(ApiKey {
        id: col(row, "id")?,
        name: col(row, "name")?,
        key_hash: col(row, "key_hash")?,
        key_prefix: col(row, "key_prefix")?,
        status: parse(col::<&str, _>(row, "status")?)?,
        expires_at: col(row, "expires_at")?,
        group_id: col(row, "group_id")?,
        allowed_models: serde_json::from_str(&models)
            .map_err(|e| StoreError::corrupt_from(format!("allowed_models: {e}"), e))?,
        limits: KeyLimits {
            rpm: to_u64(col(row, "rpm")?, "rpm")?,
            tpm: to_u64(col(row, "tpm")?, "tpm")?,
            max_concurrency: to_u64(col(row, "max_concurrency")?, "max_concurrency")?,
            daily_budget: to_u64(col(row, "daily_budget")?, "daily_budget")?,
            monthly_budget: to_u64(col(row, "monthly_budget")?, "monthly_budget")?,
        },
        created_at: col(row, "created_at")?,
        updated_at: col(row, "updated_at")?,
        revision: to_u64(col(row, "revision")?, "revision")?,
    })
}

pub(super) fn group_from(row: &Row, fallback_ids: Vec<String>) -> Result<Group> {
    Ok(Group {
        id: col(row, "id")?,
        name: col(row, "name")?,
        description: col(row, "description")?,
        limits: KeyLimits {
            rpm: to_u64(col(row, "rpm")?, "rpm")?,
            tpm: to_u64(col(row, "tpm")?, "tpm")?,
            max_concurrency: to_u64(col(row, "max_concurrency")?, "max_concurrency")?,
            daily_budget: to_u64(col(row, "daily_budget")?, "daily_budget")?,
            monthly_budget: to_u64(col(row, "monthly_budget")?, "monthly_budget")?,
        },
        fallback_ids,
        state: parse(col::<&str, _>(row, "state")?)?,
        state_since: col(row, "state_since")?,
        state_by: col(row, "state_by")?,
        created_at: col(row, "created_at")?,
        updated_at: col(row, "updated_at")?,
        revision: to_u64(col(row, "revision")?, "revision")?,
    })
}

pub(super) fn price_from(row: &Row) -> Result<Price> {
    Ok(Price {
        id: col(row, "id")?,
        model_pattern: col(row, "model_pattern")?,
        effective_from: col(row, "effective_from")?,
        input: to_u64(col(row, "input")?, "price")?,
        output: to_u64(col(row, "output")?, "price")?,
        cache_write_5m: to_u64(col(row, "cache_write_5m")?, "price")?,
        cache_write_1h: to_u64(col(row, "cache_write_1h")?, "price")?,
        cache_read: to_u64(col(row, "cache_read")?, "price")?,
        source: col(row, "source")?,
        revision: to_u64(col(row, "revision")?, "revision")?,
    })
}

pub(super) fn token_from(row: &Row) -> Result<AdminToken> {
    Ok(AdminToken {
        id: col(row, "id")?,
        name: col(row, "name")?,
        token_hash: col(row, "token_hash")?,
        token_prefix: col(row, "token_prefix")?,
        role: parse(col::<&str, _>(row, "role")?)?,
        created_at: col(row, "created_at")?,
        revision: to_u64(col(row, "revision")?, "revision")?,
    })
}

pub(super) const ACCOUNT_COLS: &str = "id, name, kind, base_url, credential_enc, refresh_token_enc, credential_hint, \
     credential_expires_at, priority, weight, max_concurrency, status, proxy_url, created_at, updated_at, revision, proxy_url_enc, \
     reset_generation, oauth_scopes, subscription_type, organization";

pub(super) async fn load_accounts(
    c: &impl deadpool_postgres::GenericClient,
    filter: Option<&str>,
) -> Result<Vec<Account>> {
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
        memberships.entry(col(&r, 0)?).or_default().push(col(&r, 1)?);
    }
    rows.iter()
        .map(|r| {
            let id: String = col(r, "id")?;
            account_from(r, memberships.remove(&id).unwrap_or_default())
        })
        .collect()
}

/// Every group's fallbacks, in order.
pub(super) async fn load_fallbacks(c: &impl deadpool_postgres::GenericClient) -> Result<HashMap<String, Vec<String>>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for r in c
        .query(
            "SELECT group_id, fallback_id FROM group_fallbacks ORDER BY group_id, position",
            &[],
        )
        .await
        .map_err(pg)?
    {
        out.entry(col(&r, 0)?).or_default().push(col(&r, 1)?);
    }
    Ok(out)
}

/// Every group by name, or the one with this id (else name).
pub(super) async fn load_groups(c: &impl deadpool_postgres::GenericClient, filter: Option<&str>) -> Result<Vec<Group>> {
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
            let id: String = col(r, "id")?;
            group_from(r, fallbacks.remove(&id).unwrap_or_default())
        })
        .collect()
}

pub(super) async fn load_settings(c: &impl deadpool_postgres::GenericClient) -> Result<BTreeMap<String, String>> {
    c.query("SELECT name, value FROM settings ORDER BY name", &[])
        .await
        .map_err(pg)?
        .iter()
        .map(|r| Ok((col(r, 0)?, col(r, 1)?)))
        .collect()
}

pub(super) async fn load_states(c: &impl deadpool_postgres::GenericClient) -> Result<Vec<AccountState>> {
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
            account_id: col(r, 0)?,
            scope: col(r, 1)?,
            health: parse(col::<&str, _>(r, 2)?)?,
            reason: col(r, 3)?,
            until: col(r, 4)?,
            since: col(r, 5)?,
            reported_by: col(r, 6)?,
            revision: to_u64(col(r, 7)?, "revision")?,
        })
    })
    .collect()
}

pub(super) async fn head_of(c: &impl deadpool_postgres::GenericClient) -> Result<Version> {
    let r = c
        .query_one("SELECT epoch, revision FROM config_head", &[])
        .await
        .map_err(pg)?;
    Ok(Version {
        epoch: to_u64(col(&r, 0)?, "epoch")?,
        revision: to_u64(col(&r, 1)?, "revision")?,
    })
}
