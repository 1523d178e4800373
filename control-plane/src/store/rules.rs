//! The store's rules, written once for both stores: what a config write checks (a name taken, a
//! row missing or changed since it was read, a group still in use, fallbacks that repeat or form
//! a cycle, a leader's stale term) and the bookkeeping every write does (the head's revision,
//! the audit entry). Each store implements [`ConfigTx`], the few reads and writes the rules need
//! inside one transaction, in its own SQL; nothing here knows a dialect.

use super::{Result, StoreError};
use crate::model::*;
use std::collections::HashMap;

/// The tables a rule names when it asks whether a row exists or deletes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Table {
    Accounts,
    ApiKeys,
    Groups,
    Prices,
    AdminTokens,
    /// Keyed by `name`, not `id`.
    Settings,
}

impl Table {
    /// The SQL table name.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Table::Accounts => "accounts",
            Table::ApiKeys => "api_keys",
            Table::Groups => "groups",
            Table::Prices => "prices",
            Table::AdminTokens => "admin_tokens",
            Table::Settings => "settings",
        }
    }

    /// The column a row is found by.
    pub(crate) fn key(self) -> &'static str {
        match self {
            Table::Settings => "name",
            _ => "id",
        }
    }

    /// The resource kind errors name.
    fn kind(self) -> &'static str {
        match self {
            Table::Accounts => ResourceKind::Account.as_str(),
            Table::ApiKeys => ResourceKind::ApiKey.as_str(),
            Table::Groups => ResourceKind::Group.as_str(),
            Table::Prices => ResourceKind::Price.as_str(),
            Table::AdminTokens => ResourceKind::AdminToken.as_str(),
            Table::Settings => "setting",
        }
    }
}

/// What a row write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Written {
    /// This many rows were written (0: an update whose row is missing or changed).
    Rows(u64),
    /// A unique constraint refused it (a name, id or hash already taken).
    Duplicate,
}

/// The reads and writes the rules need, inside one config transaction. `rev` is the revision
/// the write lands at (from [`ConfigTx::bump_head`]). Implementations do no checking of their
/// own beyond reporting a unique violation as [`Written::Duplicate`].
pub(crate) trait ConfigTx {
    /// Takes the config write lock and moves the head's revision up by one; returns the new head.
    async fn bump_head(&mut self) -> Result<Version>;
    async fn exists(&mut self, table: Table, key: &str) -> Result<bool>;
    /// Every group's name, by id.
    async fn group_names(&mut self) -> Result<HashMap<String, String>>;
    /// Every group's fallbacks, in order, by group id.
    async fn fallbacks(&mut self) -> Result<HashMap<String, Vec<String>>>;
    /// Whether a key, an account or another group's fallbacks name the group.
    async fn group_in_use(&mut self, group_id: &str) -> Result<bool>;
    async fn reset_generation(&mut self, account_id: &str) -> Result<Option<u64>>;
    /// The stored leadership term (0 before any claim), read so that a claim committing
    /// meanwhile is seen.
    async fn leader_term(&mut self) -> Result<u64>;

    /// Inserts (`expect` is `None`) or updates from revision `expect`; memberships apart.
    async fn write_account(&mut self, a: &Account, rev: i64, expect: Option<i64>) -> Result<Written>;
    /// Replaces the account's group memberships.
    async fn set_account_groups(&mut self, account_id: &str, group_ids: &[String]) -> Result<()>;
    /// Deletes the account (its memberships and states with it), keeping its name for usage.
    async fn delete_account(&mut self, id: &str) -> Result<u64>;
    async fn write_api_key(&mut self, k: &ApiKey, rev: i64, expect: Option<i64>) -> Result<Written>;
    /// Inserts or updates a group's row; fallbacks apart.
    async fn write_group(&mut self, g: &Group, rev: i64, expect: Option<i64>) -> Result<Written>;
    /// Replaces a group's fallbacks with `fallback_ids`, in order.
    async fn set_fallbacks(&mut self, group_id: &str, fallback_ids: &[String]) -> Result<()>;
    async fn delete(&mut self, table: Table, key: &str) -> Result<u64>;
    async fn upsert_price(&mut self, p: &Price, rev: i64) -> Result<Written>;
    async fn set_setting(&mut self, name: &str, value: &str, rev: i64) -> Result<()>;
    async fn insert_admin_token(&mut self, t: &AdminToken, rev: i64) -> Result<Written>;
    async fn set_account_state(&mut self, st: &AccountState, rev: i64) -> Result<()>;
    async fn clear_account_state(&mut self, account_id: &str, scope: &str) -> Result<()>;
    /// Appends an audit entry written now at revision `rev`.
    async fn append_audit(&mut self, audit: &AuditRecord, rev: i64) -> Result<()>;
}

/// A value bound for a BIGINT column; one that does not fit is the caller's mistake.
pub(crate) fn to_i64(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| StoreError::Invalid(format!("{what} {v} is out of range")))
}

/// `Store::apply`: the head moves up by one, every mutation is checked and written, one audit
/// entry. The caller commits (or drops the transaction on an error).
pub(crate) async fn apply<T: ConfigTx>(tx: &mut T, mutations: &[Mutation], audit: &AuditRecord) -> Result<Version> {
    let head = tx.bump_head().await?;
    let rev = to_i64(head.revision, "revision")?;
    for m in mutations {
        apply_one(tx, m, rev).await?;
    }
    tx.append_audit(audit, rev).await?;
    Ok(head)
}

/// The audit entry of `Store::start_new_epoch`.
pub(crate) fn new_epoch_audit(reason: &str) -> AuditRecord {
    AuditRecord {
        actor: "control-plane".into(),
        action: "config.new_epoch".into(),
        target: String::new(),
        detail: serde_json::json!({ "reason": reason }).to_string(),
    }
}

fn not_found(kind: &'static str, name: &str) -> StoreError {
    StoreError::NotFound {
        kind,
        name: name.to_owned(),
    }
}

/// A write's outcome as the rule sees it: a duplicate is `AlreadyExists` (named `name`); an
/// update that wrote nothing found its row missing (`NotFound`) or changed since read (`Conflict`).
async fn written<T: ConfigTx>(tx: &mut T, w: Written, table: Table, id: &str, name: &str) -> Result<()> {
    match w {
        Written::Rows(0) => Err(if tx.exists(table, id).await? {
            StoreError::Conflict {
                kind: table.kind(),
                id: id.to_owned(),
            }
        } else {
            not_found(table.kind(), id)
        }),
        Written::Rows(_) => Ok(()),
        Written::Duplicate => Err(StoreError::AlreadyExists {
            kind: table.kind(),
            name: name.to_owned(),
        }),
    }
}

/// Every group named exists.
async fn require_groups<T: ConfigTx>(tx: &mut T, group_ids: &[String]) -> Result<()> {
    for g in group_ids {
        if !tx.exists(Table::Groups, g).await? {
            return Err(not_found(ResourceKind::Group.as_str(), g));
        }
    }
    Ok(())
}

/// A delete of one row by key: none deleted is `NotFound`.
async fn delete_one<T: ConfigTx>(tx: &mut T, table: Table, key: &str) -> Result<()> {
    match tx.delete(table, key).await? {
        0 => Err(not_found(table.kind(), key)),
        _ => Ok(()),
    }
}

fn expect(revision: u64) -> Result<Option<i64>> {
    to_i64(revision, "revision").map(Some)
}

async fn apply_one<T: ConfigTx>(tx: &mut T, m: &Mutation, rev: i64) -> Result<()> {
    match m {
        Mutation::InsertAccount(a) => {
            require_groups(tx, &a.group_ids).await?;
            let w = tx.write_account(a, rev, None).await?;
            written(tx, w, Table::Accounts, &a.id, &a.name).await?;
            tx.set_account_groups(&a.id, &a.group_ids).await?;
        }
        Mutation::UpdateAccount { row, expect_revision } => {
            require_groups(tx, &row.group_ids).await?;
            let w = tx.write_account(row, rev, expect(*expect_revision)?).await?;
            written(tx, w, Table::Accounts, &row.id, &row.name).await?;
            tx.set_account_groups(&row.id, &row.group_ids).await?;
        }
        Mutation::DeleteAccount { id } => {
            if tx.delete_account(id).await? == 0 {
                return Err(not_found(ResourceKind::Account.as_str(), id));
            }
        }
        Mutation::InsertApiKey(k) => {
            require_groups(tx, std::slice::from_ref(&k.group_id)).await?;
            let w = tx.write_api_key(k, rev, None).await?;
            written(tx, w, Table::ApiKeys, &k.id, &k.name).await?;
        }
        Mutation::UpdateApiKey { row, expect_revision } => {
            require_groups(tx, std::slice::from_ref(&row.group_id)).await?;
            let w = tx.write_api_key(row, rev, expect(*expect_revision)?).await?;
            written(tx, w, Table::ApiKeys, &row.id, &row.name).await?;
        }
        Mutation::InsertGroup(g) => {
            let w = tx.write_group(g, rev, None).await?;
            written(tx, w, Table::Groups, &g.id, &g.name).await?;
            set_fallbacks(tx, g).await?;
        }
        Mutation::UpdateGroup { row, expect_revision } => {
            let w = tx.write_group(row, rev, expect(*expect_revision)?).await?;
            written(tx, w, Table::Groups, &row.id, &row.name).await?;
            set_fallbacks(tx, row).await?;
        }
        Mutation::DeleteGroup { id } => {
            let Some(name) = tx.group_names().await?.remove(id) else {
                return Err(not_found(ResourceKind::Group.as_str(), id));
            };
            if tx.group_in_use(id).await? {
                return Err(StoreError::InUse(format!("group {name:?}")));
            }
            delete_one(tx, Table::Groups, id).await?;
        }
        Mutation::UpsertPrice(p) => {
            if tx.upsert_price(p, rev).await? == Written::Duplicate {
                return Err(StoreError::AlreadyExists {
                    kind: ResourceKind::Price.as_str(),
                    name: format!("{}@{}", p.model_pattern, p.effective_from),
                });
            }
        }
        Mutation::DeletePrice { id } => delete_one(tx, Table::Prices, id).await?,
        Mutation::SetSetting { name, value } => tx.set_setting(name, value, rev).await?,
        Mutation::UnsetSetting { name } => delete_one(tx, Table::Settings, name).await?,
        Mutation::InsertAdminToken(t) => {
            if tx.insert_admin_token(t, rev).await? == Written::Duplicate {
                return Err(StoreError::AlreadyExists {
                    kind: ResourceKind::AdminToken.as_str(),
                    name: t.name.clone(),
                });
            }
        }
        Mutation::DeleteAdminToken { id } => delete_one(tx, Table::AdminTokens, id).await?,
        Mutation::SetAccountState(st) => {
            if !tx.exists(Table::Accounts, &st.account_id).await? {
                return Err(not_found(ResourceKind::Account.as_str(), &st.account_id));
            }
            tx.set_account_state(st, rev).await?;
        }
        Mutation::ClearAccountState { account_id, scope } => tx.clear_account_state(account_id, scope).await?,
        Mutation::RequireResetGeneration { account_id, at_most } => {
            let generation = tx
                .reset_generation(account_id)
                .await?
                .ok_or_else(|| not_found(ResourceKind::Account.as_str(), account_id))?;
            if generation > *at_most {
                return Err(StoreError::Conflict {
                    kind: ResourceKind::Account.as_str(),
                    id: account_id.clone(),
                });
            }
        }
        Mutation::CheckTerm { term } => {
            let current = tx.leader_term().await?;
            if current != *term {
                return Err(StoreError::Fenced { held: *term, current });
            }
        }
    }
    Ok(())
}

/// Replaces a group's fallbacks and checks what the store keeps: every fallback exists, none
/// repeats, none is the group itself, no cycle.
async fn set_fallbacks<T: ConfigTx>(tx: &mut T, g: &Group) -> Result<()> {
    if g.fallback_ids.is_empty() {
        return tx.set_fallbacks(&g.id, &[]).await;
    }
    let names = tx.group_names().await?;
    for (i, f) in g.fallback_ids.iter().enumerate() {
        if !names.contains_key(f) {
            return Err(not_found(ResourceKind::Group.as_str(), f));
        }
        if g.fallback_ids[..i].contains(f) {
            return Err(StoreError::Invalid(format!(
                "group {:?} is named twice among {:?}'s fallbacks",
                names.get(f).unwrap_or(f),
                g.name
            )));
        }
    }
    let mut edges = tx.fallbacks().await?;
    edges.insert(g.id.clone(), g.fallback_ids.clone());
    check_fallbacks(&edges, &names, &g.id)?;
    tx.set_fallbacks(&g.id, &g.fallback_ids).await
}

/// The check run inside the write, after setting `group_id`'s fallbacks (and by the Admin API
/// before it writes): no group falls back to itself, directly or through others. `edges` holds
/// every group's fallbacks as written, `names` every group's name (for the message).
pub fn check_fallbacks(
    edges: &HashMap<String, Vec<String>>,
    names: &HashMap<String, String>,
    group_id: &str,
) -> Result<()> {
    match crate::model::fallback_cycle(edges, group_id) {
        None => Ok(()),
        Some(path) => {
            let name = |id: &str| names.get(id).cloned().unwrap_or_else(|| id.to_string());
            Err(StoreError::Invalid(if path.len() <= 2 {
                format!("group {:?} cannot be its own fallback", name(group_id))
            } else {
                format!(
                    "fallbacks may not form a cycle: {}",
                    path.iter().map(|id| name(id)).collect::<Vec<_>>().join(" → ")
                )
            }))
        }
    }
}
