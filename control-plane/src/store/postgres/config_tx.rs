//! Postgres's side of the store rules ([`crate::store::rules::ConfigTx`]): the SQL of every
//! read and write a config change makes, inside the transaction `Store::apply` opened. The
//! checks themselves are in `store/rules.rs`.

use super::error::{pg, to_u64};
use super::rows::{col, load_fallbacks, ACCOUNT_COLS};
use crate::model::*;
use crate::store::rules::{to_i64, ConfigTx, Table, Written};
use crate::store::{Result, StoreError};
use std::collections::HashMap;
use tokio_postgres::error::SqlState;

/// One config transaction (the `config_head` row lock is taken by [`ConfigTx::bump_head`]).
pub(super) struct PgTx<'a, 'b> {
    pub(super) tx: &'a deadpool_postgres::Transaction<'b>,
}

/// A row write's outcome: a unique violation is [`Written::Duplicate`], anything else an error.
fn written(r: std::result::Result<u64, tokio_postgres::Error>) -> Result<Written> {
    match r {
        Ok(n) => Ok(Written::Rows(n)),
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => Ok(Written::Duplicate),
        Err(e) => Err(pg(e)),
    }
}

fn small(v: u32, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| StoreError::Invalid(format!("{what} {v} is out of range")))
}

/// The five limits as stored.
fn limits(l: &KeyLimits) -> Result<[i64; 5]> {
    Ok([
        to_i64(l.rpm, "rpm")?,
        to_i64(l.tpm, "tpm")?,
        to_i64(l.max_concurrency, "max_concurrency")?,
        to_i64(l.daily_budget, "daily_budget")?,
        to_i64(l.monthly_budget, "monthly_budget")?,
    ])
}

impl ConfigTx for PgTx<'_, '_> {
    async fn bump_head(&mut self) -> Result<Version> {
        // The row lock taken here is held until commit: writers serialize, and
        // revisions commit in order.
        let head = self
            .tx
            .query_one(
                "UPDATE config_head SET revision = revision + 1 RETURNING epoch, revision",
                &[],
            )
            .await
            .map_err(pg)?;
        Ok(Version {
            epoch: to_u64(col(&head, 0)?, "epoch")?,
            revision: to_u64(col(&head, 1)?, "revision")?,
        })
    }

    async fn exists(&mut self, table: Table, key: &str) -> Result<bool> {
        let sql = format!("SELECT 1 FROM {} WHERE {} = $1", table.name(), table.key());
        Ok(self.tx.query_opt(&sql, &[&key]).await.map_err(pg)?.is_some())
    }

    async fn group_names(&mut self) -> Result<HashMap<String, String>> {
        self.tx
            .query("SELECT id, name FROM groups", &[])
            .await
            .map_err(pg)?
            .iter()
            .map(|r| Ok((col(r, 0)?, col(r, 1)?)))
            .collect()
    }

    async fn fallbacks(&mut self) -> Result<HashMap<String, Vec<String>>> {
        load_fallbacks(self.tx).await
    }

    async fn group_in_use(&mut self, group_id: &str) -> Result<bool> {
        let row = self
            .tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM api_keys WHERE group_id = $1) \
                 OR EXISTS (SELECT 1 FROM account_groups WHERE group_id = $1) \
                 OR EXISTS (SELECT 1 FROM group_fallbacks WHERE fallback_id = $1)",
                &[&group_id],
            )
            .await
            .map_err(pg)?;
        col(&row, 0)
    }

    async fn reset_generation(&mut self, account_id: &str) -> Result<Option<u64>> {
        self.tx
            .query_opt("SELECT reset_generation FROM accounts WHERE id = $1", &[&account_id])
            .await
            .map_err(pg)?
            .map(|r| to_u64(col(&r, 0)?, "reset_generation"))
            .transpose()
    }

    async fn leader_term(&mut self) -> Result<u64> {
        // FOR SHARE: a claim_term committing meanwhile is waited for, and then seen.
        let row = self
            .tx
            .query_opt("SELECT term FROM leadership WHERE name = 'leader' FOR SHARE", &[])
            .await
            .map_err(pg)?;
        row.map_or(Ok(0), |r| to_u64(col(&r, 0)?, "term"))
    }

    async fn write_account(&mut self, a: &Account, rev: i64, expect: Option<i64>) -> Result<Written> {
        let weight = small(a.weight, "weight")?;
        let maxc = small(a.max_concurrency, "max_concurrency")?;
        let generation = to_i64(a.reset_generation, "reset_generation")?;
        let scopes = a.scopes.join(" ");
        let r = match expect {
            Some(expect) => {
                self.tx
                    .execute(
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
            }
            None => {
                self.tx
                    .execute(
                        &format!(
                            "INSERT INTO accounts ({ACCOUNT_COLS}) VALUES \
                             ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19,$20,$21)"
                        ),
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
                            &a.created_at,
                            &a.updated_at,
                            &rev,
                            &a.proxy_url_enc,
                            &generation,
                            &scopes,
                            &a.subscription_type,
                            &a.organization,
                        ],
                    )
                    .await
            }
        };
        written(r)
    }

    async fn set_account_groups(&mut self, account_id: &str, group_ids: &[String]) -> Result<()> {
        self.tx
            .execute("DELETE FROM account_groups WHERE account_id = $1", &[&account_id])
            .await
            .map_err(pg)?;
        for g in group_ids {
            self.tx
                .execute(
                    "INSERT INTO account_groups (account_id, group_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    &[&account_id, g],
                )
                .await
                .map_err(pg)?;
        }
        Ok(())
    }

    async fn delete_account(&mut self, id: &str) -> Result<u64> {
        // Usage reports keep naming the account (its usage rows hold only its id).
        self.tx
            .execute(
                "INSERT INTO deleted_names (kind, id, name, deleted_at) \
                 SELECT 'account', id, name, $2 FROM accounts WHERE id = $1 \
                 ON CONFLICT (kind, id) DO UPDATE SET name = EXCLUDED.name, deleted_at = EXCLUDED.deleted_at",
                &[&id, &now_ms()],
            )
            .await
            .map_err(pg)?;
        // Memberships and states go with it (ON DELETE CASCADE).
        self.tx
            .execute("DELETE FROM accounts WHERE id = $1", &[&id])
            .await
            .map_err(pg)
    }

    async fn write_api_key(&mut self, k: &ApiKey, rev: i64, expect: Option<i64>) -> Result<Written> {
        let models = serde_json::to_string(&k.allowed_models)
            .map_err(|e| StoreError::internal("cannot encode allowed_models", e))?;
        let [rpm, tpm, maxc, daily, monthly] = limits(&k.limits)?;
        let r = match expect {
            Some(expect) => {
                self.tx
                    .execute(
                        "UPDATE api_keys SET name=$2, status=$3, expires_at=$4, group_id=$5, allowed_models=$6, \
                         rpm=$7, tpm=$8, max_concurrency=$9, daily_budget=$10, monthly_budget=$11, updated_at=$12, \
                         revision=$13 WHERE id=$1 AND revision=$14",
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
            }
            None => {
                self.tx
                    .execute(
                        "INSERT INTO api_keys (id, name, key_hash, key_prefix, status, expires_at, group_id, \
                         allowed_models, rpm, tpm, max_concurrency, daily_budget, monthly_budget, created_at, \
                         updated_at, revision) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16)",
                        &[
                            &k.id,
                            &k.name,
                            &k.key_hash,
                            &k.key_prefix,
                            &k.status.as_str(),
                            &k.expires_at,
                            &k.group_id,
                            &models,
                            &rpm,
                            &tpm,
                            &maxc,
                            &daily,
                            &monthly,
                            &k.created_at,
                            &k.updated_at,
                            &rev,
                        ],
                    )
                    .await
            }
        };
        written(r)
    }

    async fn write_group(&mut self, g: &Group, rev: i64, expect: Option<i64>) -> Result<Written> {
        let [rpm, tpm, maxc, daily, monthly] = limits(&g.limits)?;
        let r = match expect {
            Some(expect) => {
                self.tx
                    .execute(
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
            }
            None => {
                self.tx
                    .execute(
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
            }
        };
        written(r)
    }

    async fn set_fallbacks(&mut self, group_id: &str, fallback_ids: &[String]) -> Result<()> {
        self.tx
            .execute("DELETE FROM group_fallbacks WHERE group_id = $1", &[&group_id])
            .await
            .map_err(pg)?;
        for (i, f) in fallback_ids.iter().enumerate() {
            let position = i32::try_from(i).map_err(|_| StoreError::Invalid("too many fallbacks".into()))?;
            self.tx
                .execute(
                    "INSERT INTO group_fallbacks (group_id, position, fallback_id) VALUES ($1, $2, $3)",
                    &[&group_id, &position, f],
                )
                .await
                .map_err(pg)?;
        }
        Ok(())
    }

    async fn delete(&mut self, table: Table, key: &str) -> Result<u64> {
        if table == Table::Groups {
            // The request log keeps naming the group its requests were served in.
            self.tx
                .execute(
                    "INSERT INTO deleted_names (kind, id, name, deleted_at) \
                     SELECT 'group', id, name, $2 FROM groups WHERE id = $1 \
                     ON CONFLICT (kind, id) DO UPDATE SET name = EXCLUDED.name, deleted_at = EXCLUDED.deleted_at",
                    &[&key, &now_ms()],
                )
                .await
                .map_err(pg)?;
        }
        let sql = format!("DELETE FROM {} WHERE {} = $1", table.name(), table.key());
        self.tx.execute(&sql, &[&key]).await.map_err(pg)
    }

    async fn upsert_price(&mut self, p: &Price, rev: i64) -> Result<Written> {
        let r = self
            .tx
            .execute(
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
                    &to_i64(p.input, "input price")?,
                    &to_i64(p.output, "output price")?,
                    &to_i64(p.cache_write_5m, "cache_write_5m price")?,
                    &to_i64(p.cache_write_1h, "cache_write_1h price")?,
                    &to_i64(p.cache_read, "cache_read price")?,
                    &p.source,
                    &rev,
                ],
            )
            .await;
        written(r)
    }

    async fn set_setting(&mut self, name: &str, value: &str, rev: i64) -> Result<()> {
        self.tx
            .execute(
                "INSERT INTO settings (name, value, revision) VALUES ($1,$2,$3) \
                 ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, revision = EXCLUDED.revision",
                &[&name, &value, &rev],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    async fn insert_capture_rule(&mut self, id: &str, rule_json: &str, rev: i64) -> Result<Written> {
        let r = self
            .tx
            .execute(
                "INSERT INTO capture_rules (id, rule, revision) VALUES ($1,$2,$3)",
                &[&id, &rule_json, &rev],
            )
            .await;
        written(r)
    }

    async fn insert_admin_token(&mut self, t: &AdminToken, rev: i64) -> Result<Written> {
        let r = self
            .tx
            .execute(
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
            .await;
        written(r)
    }

    async fn set_account_state(&mut self, st: &AccountState, rev: i64) -> Result<()> {
        self.tx
            .execute(
                "INSERT INTO account_states (account_id, scope, health, reason, until_at, since_at, reported_by, \
                 revision) VALUES ($1,$2,$3,$4,$5,$6,$7,$8) ON CONFLICT (account_id, scope) DO UPDATE SET \
                 health=EXCLUDED.health, reason=EXCLUDED.reason, until_at=EXCLUDED.until_at, \
                 since_at=EXCLUDED.since_at, reported_by=EXCLUDED.reported_by, revision=EXCLUDED.revision",
                &[
                    &st.account_id,
                    &st.scope,
                    &st.health.as_str(),
                    &st.reason,
                    &st.until,
                    &st.since,
                    &st.reported_by,
                    &rev,
                ],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    async fn clear_account_state(&mut self, account_id: &str, scope: &str) -> Result<()> {
        self.tx
            .execute(
                "DELETE FROM account_states WHERE account_id = $1 AND scope = $2",
                &[&account_id, &scope],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    async fn append_audit(&mut self, audit: &AuditRecord, rev: i64) -> Result<()> {
        self.tx
            .execute(
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
        Ok(())
    }
}
