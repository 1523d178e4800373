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
    CaptureRules,
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
            Table::CaptureRules => "capture_rules",
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
            Table::ApiKeys => "key",
            Table::Groups => ResourceKind::Group.as_str(),
            Table::Prices => ResourceKind::Price.as_str(),
            Table::AdminTokens => "admin token",
            Table::CaptureRules => "capture rule",
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
    /// Inserts a capture rule as its JSON document.
    async fn insert_capture_rule(&mut self, id: &str, rule_json: &str, rev: i64) -> Result<Written>;
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
                name: name.to_owned(),
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

/// An account's counts fit what either store keeps (a 32-bit signed integer): the same refusal,
/// with the range, on both.
fn check_account(a: &crate::model::Account) -> Result<()> {
    for (what, v) in [("weight", a.weight), ("max_concurrency", a.max_concurrency)] {
        if i32::try_from(v).is_err() {
            return Err(StoreError::Invalid(format!(
                "{what} {v} is out of range (0 to {})",
                i32::MAX
            )));
        }
    }
    Ok(())
}

async fn apply_one<T: ConfigTx>(tx: &mut T, m: &Mutation, rev: i64) -> Result<()> {
    match m {
        Mutation::InsertAccount(a) => {
            check_account(a)?;
            require_groups(tx, &a.group_ids).await?;
            let w = tx.write_account(a, rev, None).await?;
            written(tx, w, Table::Accounts, &a.id, &a.name).await?;
            tx.set_account_groups(&a.id, &a.group_ids).await?;
        }
        Mutation::UpdateAccount { row, expect_revision } => {
            check_account(row)?;
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
        Mutation::InsertCaptureRule(c) => {
            let doc = serde_json::to_string(c).map_err(|e| StoreError::internal("cannot encode a capture rule", e))?;
            if tx.insert_capture_rule(&c.id, &doc, rev).await? == Written::Duplicate {
                return Err(StoreError::AlreadyExists {
                    kind: "capture rule",
                    name: c.id.clone(),
                });
            }
        }
        Mutation::DeleteCaptureRule { id } => delete_one(tx, Table::CaptureRules, id).await?,
        Mutation::SetSetting { name, value } => tx.set_setting(name, value, rev).await?,
        Mutation::UnsetSetting { name } => delete_one(tx, Table::Settings, name).await?,
        Mutation::InsertAdminToken(t) => {
            if tx.insert_admin_token(t, rev).await? == Written::Duplicate {
                return Err(StoreError::AlreadyExists {
                    kind: Table::AdminTokens.kind(),
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
                    name: account_id.clone(),
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    //! The rules over a fake transaction: what they decide, without a database (the conformance
    //! suite runs the same rules over both real stores).
    use super::*;
    use std::collections::HashSet;

    /// Rows that exist, by table and key; every call is logged.
    #[derive(Default)]
    struct Fake {
        rows: HashSet<(&'static str, String)>,
        groups: HashMap<String, String>,
        in_use: HashSet<String>,
        /// What an update writes (0: its revision no longer matches).
        update_rows: u64,
        log: Vec<String>,
    }

    impl Fake {
        fn with(mut self, table: Table, key: &str) -> Self {
            self.rows.insert((table.name(), key.to_string()));
            self
        }
    }

    impl ConfigTx for Fake {
        async fn bump_head(&mut self) -> Result<Version> {
            self.log.push("bump".into());
            Ok(Version { epoch: 1, revision: 7 })
        }
        async fn exists(&mut self, table: Table, key: &str) -> Result<bool> {
            Ok(self.rows.contains(&(table.name(), key.to_string())))
        }
        async fn group_names(&mut self) -> Result<HashMap<String, String>> {
            Ok(self.groups.clone())
        }
        async fn fallbacks(&mut self) -> Result<HashMap<String, Vec<String>>> {
            Ok(HashMap::new())
        }
        async fn group_in_use(&mut self, group_id: &str) -> Result<bool> {
            Ok(self.in_use.contains(group_id))
        }
        async fn reset_generation(&mut self, _: &str) -> Result<Option<u64>> {
            Ok(None)
        }
        async fn leader_term(&mut self) -> Result<u64> {
            Ok(0)
        }
        async fn write_account(&mut self, _: &Account, _: i64, _: Option<i64>) -> Result<Written> {
            Ok(Written::Rows(1))
        }
        async fn set_account_groups(&mut self, _: &str, _: &[String]) -> Result<()> {
            Ok(())
        }
        async fn delete_account(&mut self, _: &str) -> Result<u64> {
            Ok(0)
        }
        async fn write_api_key(&mut self, _: &ApiKey, _: i64, _: Option<i64>) -> Result<Written> {
            Ok(Written::Rows(1))
        }
        async fn write_group(&mut self, g: &Group, rev: i64, expect: Option<i64>) -> Result<Written> {
            self.log.push(format!("group {} at {rev}", g.id));
            Ok(Written::Rows(if expect.is_some() { self.update_rows } else { 1 }))
        }
        async fn set_fallbacks(&mut self, _: &str, _: &[String]) -> Result<()> {
            Ok(())
        }
        async fn delete(&mut self, table: Table, key: &str) -> Result<u64> {
            self.log.push(format!("delete {} {key}", table.name()));
            Ok(1)
        }
        async fn upsert_price(&mut self, _: &Price, _: i64) -> Result<Written> {
            Ok(Written::Duplicate)
        }
        async fn set_setting(&mut self, name: &str, _: &str, rev: i64) -> Result<()> {
            self.log.push(format!("setting {name} at {rev}"));
            Ok(())
        }
        async fn insert_capture_rule(&mut self, _: &str, _: &str, _: i64) -> Result<Written> {
            Ok(Written::Duplicate)
        }
        async fn insert_admin_token(&mut self, _: &AdminToken, _: i64) -> Result<Written> {
            Ok(Written::Duplicate)
        }
        async fn set_account_state(&mut self, _: &AccountState, _: i64) -> Result<()> {
            Ok(())
        }
        async fn clear_account_state(&mut self, _: &str, _: &str) -> Result<()> {
            Ok(())
        }
        async fn append_audit(&mut self, audit: &AuditRecord, rev: i64) -> Result<()> {
            self.log.push(format!("audit {} at {rev}", audit.action));
            Ok(())
        }
    }

    fn audit() -> AuditRecord {
        AuditRecord {
            actor: "ops".into(),
            action: "test.write".into(),
            target: String::new(),
            detail: String::new(),
        }
    }

    fn setting(name: &str) -> Mutation {
        Mutation::SetSetting {
            name: name.into(),
            value: "v".into(),
        }
    }

    fn run(tx: &mut Fake, mutations: &[Mutation]) -> Result<Version> {
        futures::executor::block_on(apply(tx, mutations, &audit()))
    }

    /// One head move, every write at its revision, one audit entry last.
    #[test]
    fn a_write_moves_the_head_once_and_is_audited_last() {
        let mut tx = Fake::default();
        let head = run(&mut tx, &[setting("a"), setting("b")]).unwrap();
        assert_eq!(head, Version { epoch: 1, revision: 7 });
        assert_eq!(
            tx.log,
            ["bump", "setting a at 7", "setting b at 7", "audit test.write at 7"]
        );
    }

    /// A refused mutation stops the write before its audit entry (the store rolls back).
    #[test]
    fn a_refusal_stops_before_the_audit() {
        let mut tx = Fake::default();
        let err = run(
            &mut tx,
            &[
                setting("a"),
                Mutation::DeleteGroup { id: "g-none".into() },
                setting("b"),
            ],
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "group \"g-none\" not found");
        assert_eq!(tx.log, ["bump", "setting a at 7"]);
    }

    /// An update that wrote nothing: changed since read when the row is there, else missing.
    #[test]
    fn an_update_that_wrote_nothing_is_a_conflict_or_not_found() {
        let group = Group::new("g1", "one", "", KeyLimits::default(), 0);
        let update = [Mutation::UpdateGroup {
            row: group,
            expect_revision: 3,
        }];
        let mut tx = Fake::default().with(Table::Groups, "g1");
        let err = run(&mut tx, &update).unwrap_err();
        assert!(matches!(err, StoreError::Conflict { kind: "group", .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "concurrent modification of group \"one\"; another change to it kept landing first"
        );
        let mut tx = Fake::default();
        let err = run(&mut tx, &update).unwrap_err();
        assert_eq!(err.to_string(), "group \"g1\" not found");
    }

    /// A group in use is not deleted, and the refusal names it; a free one is.
    #[test]
    fn a_group_in_use_is_refused_by_name() {
        let mut tx = Fake::default();
        tx.groups.insert("g1".into(), "one".into());
        tx.in_use.insert("g1".into());
        let delete = [Mutation::DeleteGroup { id: "g1".into() }];
        let err = run(&mut tx, &delete).unwrap_err();
        assert!(matches!(err, StoreError::InUse(_)), "{err:?}");
        assert_eq!(err.to_string(), "group \"one\" is still in use");
        tx.in_use.clear();
        tx.log.clear();
        run(&mut tx, &delete).unwrap();
        assert_eq!(tx.log, ["bump", "delete groups g1", "audit test.write at 7"]);
    }

    /// A unique violation is AlreadyExists, named as the operator knows the resource.
    #[test]
    fn duplicates_are_named() {
        let price = Price {
            id: "p1".into(),
            model_pattern: "claude-*".into(),
            effective_from: 5,
            input: 1,
            output: 1,
            cache_write_5m: 1,
            cache_write_1h: 1,
            cache_read: 1,
            source: "operator".into(),
            revision: 0,
        };
        let err = run(&mut Fake::default(), &[Mutation::UpsertPrice(price)]).unwrap_err();
        assert_eq!(err.to_string(), "price \"claude-*@5\" already exists");
    }
}
