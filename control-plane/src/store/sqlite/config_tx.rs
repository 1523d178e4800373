//! SQLite's side of the store rules ([`crate::store::rules::ConfigTx`]): the SQL of every read
//! and write a config change makes, inside the `BEGIN IMMEDIATE` transaction `Store::apply`
//! opened. The checks themselves are in `store/rules.rs`. rusqlite is synchronous: each
//! method finishes before its future is first polled to the end, so the rules run here under
//! `futures::executor::block_on` on the blocking pool.

use super::error::{db, is_unique_violation, rev_from_db};
use super::rows::{
    account_values, api_key_values, group_values, read_fallbacks, read_head, ACCOUNT_COLS, API_KEY_COLS, GROUP_COLS,
    PRICE_COLS,
};
use crate::model::*;
use crate::store::rules::{to_i64, ConfigTx, Table, Written};
use crate::store::Result;
use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, OptionalExtension, Transaction};
use std::collections::HashMap;

/// One config transaction (the write lock is already held: `BEGIN IMMEDIATE`).
pub(super) struct SqliteTx<'a, 'b> {
    pub(super) tx: &'a Transaction<'b>,
}

/// A row write's outcome: a UNIQUE / PRIMARY KEY violation is [`Written::Duplicate`].
fn written(r: rusqlite::Result<usize>) -> Result<Written> {
    match r {
        Ok(n) => Ok(Written::Rows(n as u64)),
        Err(e) if is_unique_violation(&e) => Ok(Written::Duplicate),
        Err(e) => Err(db(e)),
    }
}

impl ConfigTx for SqliteTx<'_, '_> {
    async fn bump_head(&mut self) -> Result<Version> {
        self.tx
            .execute("UPDATE config_head SET revision = revision + 1 WHERE singleton = 1", [])
            .map_err(db)?;
        read_head(self.tx)
    }

    async fn exists(&mut self, table: Table, key: &str) -> Result<bool> {
        let sql = format!("SELECT 1 FROM {} WHERE {} = ?1", table.name(), table.key());
        self.tx
            .query_row(&sql, [key], |_| Ok(()))
            .optional()
            .map(|o| o.is_some())
            .map_err(db)
    }

    async fn group_names(&mut self) -> Result<HashMap<String, String>> {
        let mut stmt = self.tx.prepare_cached("SELECT id, name FROM groups").map_err(db)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(db)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db)
    }

    async fn fallbacks(&mut self) -> Result<HashMap<String, Vec<String>>> {
        read_fallbacks(self.tx)
    }

    async fn group_in_use(&mut self, group_id: &str) -> Result<bool> {
        self.tx
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM api_keys WHERE group_id = ?1) \
                 OR EXISTS (SELECT 1 FROM account_groups WHERE group_id = ?1) \
                 OR EXISTS (SELECT 1 FROM group_fallbacks WHERE fallback_id = ?1)",
                [group_id],
                |r| r.get::<_, bool>(0),
            )
            .map_err(db)
    }

    async fn reset_generation(&mut self, account_id: &str) -> Result<Option<u64>> {
        let generation: Option<i64> = self
            .tx
            .query_row(
                "SELECT reset_generation FROM accounts WHERE id = ?1",
                [account_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)?;
        generation.map(rev_from_db).transpose()
    }

    async fn leader_term(&mut self) -> Result<u64> {
        // Under the write lock apply took (BEGIN IMMEDIATE): no claim can commit meanwhile.
        let current: Option<i64> = self
            .tx
            .query_row("SELECT term FROM leadership WHERE name = 'leader'", [], |r| r.get(0))
            .optional()
            .map_err(db)?;
        Ok(current.map(rev_from_db).transpose()?.unwrap_or(0))
    }

    async fn write_account(&mut self, a: &Account, rev: i64, expect: Option<i64>) -> Result<Written> {
        let mut values = account_values(a, rev)?;
        let r = match expect {
            None => self.tx.execute(
                &format!(
                    "INSERT INTO accounts ({ACCOUNT_COLS}) VALUES \
                     (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21)"
                ),
                params_from_iter(values),
            ),
            Some(expect) => {
                values.push(Value::Integer(expect));
                // created_at (?14) is immutable; SQLite allows an unreferenced
                // parameter below the highest one used.
                self.tx.execute(
                    "UPDATE accounts SET name = ?2, kind = ?3, base_url = ?4, credential_enc = ?5, \
                     refresh_token_enc = ?6, credential_hint = ?7, credential_expires_at = ?8, \
                     priority = ?9, weight = ?10, max_concurrency = ?11, status = ?12, \
                     proxy_url = ?13, updated_at = ?15, revision = ?16, proxy_url_enc = ?17, \
                     reset_generation = ?18, oauth_scopes = ?19, subscription_type = ?20, \
                     organization = ?21 WHERE id = ?1 AND revision = ?22",
                    params_from_iter(values),
                )
            }
        };
        written(r)
    }

    async fn set_account_groups(&mut self, account_id: &str, group_ids: &[String]) -> Result<()> {
        self.tx
            .execute("DELETE FROM account_groups WHERE account_id = ?1", [account_id])
            .map_err(db)?;
        for group_id in group_ids {
            self.tx
                .execute(
                    "INSERT OR IGNORE INTO account_groups (account_id, group_id) VALUES (?1, ?2)",
                    [account_id, group_id.as_str()],
                )
                .map_err(db)?;
        }
        Ok(())
    }

    async fn delete_account(&mut self, id: &str) -> Result<u64> {
        // Usage reports keep naming the account (its usage rows hold only its id).
        self.tx
            .execute(
                "INSERT INTO deleted_names (kind, id, name, deleted_at) \
                 SELECT 'account', id, name, ?2 FROM accounts WHERE id = ?1 \
                 ON CONFLICT (kind, id) DO UPDATE SET name = excluded.name, deleted_at = excluded.deleted_at",
                params![id, now_ms()],
            )
            .map_err(db)?;
        self.tx
            .execute("DELETE FROM account_groups WHERE account_id = ?1", [id])
            .map_err(db)?;
        let n = self
            .tx
            .execute("DELETE FROM accounts WHERE id = ?1", [id])
            .map_err(db)?;
        Ok(n as u64)
    }

    async fn write_api_key(&mut self, k: &ApiKey, rev: i64, expect: Option<i64>) -> Result<Written> {
        let mut values = api_key_values(k, rev)?;
        let r = match expect {
            None => self.tx.execute(
                &format!(
                    "INSERT INTO api_keys ({API_KEY_COLS}) VALUES \
                     (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)"
                ),
                params_from_iter(values),
            ),
            Some(expect) => {
                values.push(Value::Integer(expect));
                // key_hash (?3), key_prefix (?4) and created_at (?14) never change (left
                // unreferenced).
                self.tx.execute(
                    "UPDATE api_keys SET name = ?2, status = ?5, \
                     expires_at = ?6, group_id = ?7, allowed_models = ?8, rpm = ?9, tpm = ?10, \
                     max_concurrency = ?11, daily_budget = ?12, monthly_budget = ?13, \
                     updated_at = ?15, revision = ?16 \
                     WHERE id = ?1 AND revision = ?17",
                    params_from_iter(values),
                )
            }
        };
        written(r)
    }

    async fn write_group(&mut self, g: &Group, rev: i64, expect: Option<i64>) -> Result<Written> {
        let mut values = group_values(g, rev)?;
        let r = match expect {
            None => self.tx.execute(
                &format!(
                    "INSERT INTO groups ({GROUP_COLS}) VALUES \
                     (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"
                ),
                params_from_iter(values),
            ),
            Some(expect) => {
                values.push(Value::Integer(expect));
                // created_at (?4) is immutable (left unreferenced).
                self.tx.execute(
                    "UPDATE groups SET name = ?2, description = ?3, updated_at = ?5, revision = ?6, rpm = ?7, \
                     tpm = ?8, max_concurrency = ?9, daily_budget = ?10, monthly_budget = ?11, state = ?12, \
                     state_since = ?13, state_by = ?14 WHERE id = ?1 AND revision = ?15",
                    params_from_iter(values),
                )
            }
        };
        written(r)
    }

    async fn set_fallbacks(&mut self, group_id: &str, fallback_ids: &[String]) -> Result<()> {
        self.tx
            .execute("DELETE FROM group_fallbacks WHERE group_id = ?1", [group_id])
            .map_err(db)?;
        for (i, f) in fallback_ids.iter().enumerate() {
            self.tx
                .execute(
                    "INSERT INTO group_fallbacks (group_id, position, fallback_id) VALUES (?1, ?2, ?3)",
                    params![group_id, to_i64(i as u64, "position")?, f],
                )
                .map_err(db)?;
        }
        Ok(())
    }

    async fn delete(&mut self, table: Table, key: &str) -> Result<u64> {
        if table == Table::Groups {
            // The request log keeps naming the group its requests were served in.
            self.tx
                .execute(
                    "INSERT INTO deleted_names (kind, id, name, deleted_at) \
                     SELECT 'group', id, name, ?2 FROM groups WHERE id = ?1 \
                     ON CONFLICT (kind, id) DO UPDATE SET name = excluded.name, deleted_at = excluded.deleted_at",
                    params![key, now_ms()],
                )
                .map_err(db)?;
        }
        let sql = format!("DELETE FROM {} WHERE {} = ?1", table.name(), table.key());
        Ok(self.tx.execute(&sql, [key]).map_err(db)? as u64)
    }

    async fn upsert_price(&mut self, p: &Price, rev: i64) -> Result<Written> {
        let r = self.tx.execute(
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
        );
        written(r)
    }

    async fn set_setting(&mut self, name: &str, value: &str, rev: i64) -> Result<()> {
        self.tx
            .execute(
                "INSERT INTO settings (name, value, revision) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value, \
                 revision = excluded.revision",
                params![name, value, rev],
            )
            .map_err(db)?;
        Ok(())
    }

    async fn insert_capture_rule(&mut self, id: &str, rule_json: &str, rev: i64) -> Result<Written> {
        let r = self.tx.execute(
            "INSERT INTO capture_rules (id, rule, revision) VALUES (?1, ?2, ?3)",
            params![id, rule_json, rev],
        );
        written(r)
    }

    async fn insert_admin_token(&mut self, t: &AdminToken, rev: i64) -> Result<Written> {
        let r = self.tx.execute(
            "INSERT INTO admin_tokens (id, name, token_hash, token_prefix, role, created_at, revision) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                t.id,
                t.name,
                t.token_hash,
                t.token_prefix,
                t.role.as_str(),
                t.created_at,
                rev
            ],
        );
        written(r)
    }

    async fn set_account_state(&mut self, st: &AccountState, rev: i64) -> Result<()> {
        self.tx
            .execute(
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
        Ok(())
    }

    async fn clear_account_state(&mut self, account_id: &str, scope: &str) -> Result<()> {
        self.tx
            .execute(
                "DELETE FROM account_states WHERE account_id = ?1 AND scope = ?2",
                params![account_id, scope],
            )
            .map_err(db)?;
        Ok(())
    }

    async fn append_audit(&mut self, audit: &AuditRecord, rev: i64) -> Result<()> {
        self.tx
            .execute(
                "INSERT INTO audit_log (at, actor, action, target, detail, revision) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![now_ms(), audit.actor, audit.action, audit.target, audit.detail, rev],
            )
            .map_err(db)?;
        Ok(())
    }
}
