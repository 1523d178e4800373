//! Postgres rows to domain types, and the reads of config tables (`load_config`, the list and
//! get calls, and the rules' reads).

use super::error::{parse, pg, to_u32, to_u64};
use crate::model::*;
use crate::store::Result;
use crate::store::StoreError;
use std::collections::{BTreeMap, HashMap};
use tokio_postgres::Row;

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
        id: row.get("id"),
        name: row.get("name"),
        kind: parse(row.get::<_, &str>("kind"))?,
        base_url: row.get("base_url"),
        credential_enc: row.get("credential_enc"),
        refresh_token_enc: row.get("refresh_token_enc"),
        credential_hint: row.get("credential_hint"),
        credential_expires_at: row.get("credential_expires_at"),
        priority: row.get("priority"),
        weight: to_u32(row.get("weight"), "weight")?,
        group_ids,
        max_concurrency: to_u32(row.get("max_concurrency"), "max_concurrency")?,
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

pub(super) fn key_from(row: &Row) -> Result<ApiKey> {
    let models: String = row.get("allowed_models");
    Ok(ApiKey {
        id: row.get("id"),
        name: row.get("name"),
        key_hash: row.get("key_hash"),
        key_prefix: row.get("key_prefix"),
        status: parse(row.get::<_, &str>("status"))?,
        expires_at: row.get("expires_at"),
        group_id: row.get("group_id"),
        allowed_models: serde_json::from_str(&models)
            .map_err(|e| StoreError::corrupt_from(format!("allowed_models: {e}"), e))?,
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

pub(super) fn group_from(row: &Row, fallback_ids: Vec<String>) -> Result<Group> {
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

pub(super) fn price_from(row: &Row) -> Result<Price> {
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

pub(super) fn token_from(row: &Row) -> Result<AdminToken> {
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
        out.entry(r.get(0)).or_default().push(r.get(1));
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
            let id: String = r.get("id");
            group_from(r, fallbacks.remove(&id).unwrap_or_default())
        })
        .collect()
}

pub(super) async fn load_settings(c: &impl deadpool_postgres::GenericClient) -> Result<BTreeMap<String, String>> {
    Ok(c.query("SELECT name, value FROM settings ORDER BY name", &[])
        .await
        .map_err(pg)?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
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

pub(super) async fn head_of(c: &impl deadpool_postgres::GenericClient) -> Result<Version> {
    let r = c
        .query_one("SELECT epoch, revision FROM config_head", &[])
        .await
        .map_err(pg)?;
    Ok(Version {
        epoch: to_u64(r.get(0), "epoch")?,
        revision: to_u64(r.get(1), "revision")?,
    })
}
