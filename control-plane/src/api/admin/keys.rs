//! Client API keys: create (the secret shown once, stored as a keyed hash), update, list, revoke,
//! and show with the group's limits, committed spend and live counters.

use super::lookup::lookup;
use super::validate::{limits_json, validate_expiry, validate_limits, validate_models, validate_name};
use super::{new_id, retry_conflicts, AdminApi, DEFAULT_GROUP};
use crate::api::auth::Actor;
use crate::api::convert::{key_status_to_pb, limits_to_pb};
use crate::crypto;
use crate::model::*;
use crate::spend::{current_periods, Spent};
use relay_proto::v1 as pb;
use serde_json::json;
use std::collections::BTreeMap;
use tonic::Status;

impl AdminApi {
    /// The key's and its group's live counters, when this control plane can see them.
    pub(super) async fn live_use(
        &self,
        k: &crate::model::ApiKey,
        group: &crate::model::Group,
        p: &relay_proto::periods::Periods,
    ) -> (Option<pb::LiveUse>, Option<pb::LiveUse>) {
        let Some(l) = &self.live else { return (None, None) };
        let subject = |kind, id: &str, limits: &pb::KeyLimits| relay_limits::Subject {
            kind,
            id: id.to_string(),
            limits: relay_limits::Limits::from_pb(Some(limits)),
            committed: relay_limits::Committed::default(),
        };
        let subjects = [
            subject(relay_limits::Kind::Key, &k.id, &limits_to_pb(&k.limits)),
            subject(relay_limits::Kind::Group, &group.id, &limits_to_pb(&group.limits)),
        ];
        match l.peek(&subjects, p).await {
            Ok(u) => {
                let live = |u: &relay_limits::Use| pb::LiveUse {
                    requests_last_minute: u32::try_from(u.requests).unwrap_or(u32::MAX),
                    tokens_last_minute: u.tokens,
                    in_flight: u32::try_from(u.in_flight).unwrap_or(u32::MAX),
                };
                // A subject without limits is not counted: no live use to show.
                let of = |i: usize| {
                    subjects
                        .get(i)
                        .filter(|s| !s.limits.is_unlimited())
                        .and_then(|_| u.get(i))
                        .map(live)
                };
                (of(0), of(1))
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot read live counters");
                (None, None)
            }
        }
    }

    /// Stores `next` over `cur` (optimistic concurrency on `cur`'s revision), audited.
    pub(super) async fn write_key(
        &self,
        actor: &Actor,
        action: &str,
        cur: &ApiKey,
        next: ApiKey,
        detail: serde_json::Value,
    ) -> Result<ApiKey, Status> {
        let m = Mutation::UpdateApiKey {
            row: next.clone(),
            expect_revision: cur.revision,
        };
        self.apply(actor, action, &cur.name, detail, vec![m]).await?;
        Ok(next)
    }

    pub(super) async fn api_key(&self, id_or_name: &str) -> Result<ApiKey, Status> {
        if let Some(k) = self.store.get_api_key(id_or_name).await? {
            return Ok(k);
        }
        let all = self.store.list_api_keys().await?;
        lookup(all, id_or_name, "key", |k| (&k.id, &k.name))
    }

    pub(super) fn key_info(k: &ApiKey, groups: &BTreeMap<String, String>) -> pb::ApiKeyInfo {
        pb::ApiKeyInfo {
            id: k.id.clone(),
            name: k.name.clone(),
            key_prefix: k.key_prefix.clone(),
            status: key_status_to_pb(k.status) as i32,
            expires_at_ms: k.expires_at.unwrap_or(0),
            group: groups.get(&k.group_id).cloned().unwrap_or_else(|| k.group_id.clone()),
            allowed_models: k.allowed_models.clone(),
            limits: Some(limits_to_pb(&k.limits)),
            created_at_ms: k.created_at,
            updated_at_ms: k.updated_at,
        }
    }

    pub(super) async fn create_api_key(
        &self,
        actor: &Actor,
        r: pb::CreateApiKeyRequest,
    ) -> Result<pb::CreateApiKeyResponse, Status> {
        validate_name("key", &r.name)?;
        let group = if r.group.is_empty() {
            DEFAULT_GROUP
        } else {
            r.group.as_str()
        };
        let group_id = self.resolve_groups(&[group.to_string()]).await?.remove(0);
        let allowed_models = validate_models(&r.allowed_models)?;
        let expires_at = validate_expiry(r.expires_at_ms)?;
        let limits = validate_limits("key", r.limits.as_ref())?;
        let secret = crypto::generate_secret(crypto::API_KEY_PREFIX);
        let now = now_ms();
        let row = ApiKey {
            id: new_id(),
            name: r.name.clone(),
            key_hash: self.key.hash_api_key(&secret),
            key_prefix: crypto::display_prefix(&secret, crypto::API_KEY_PREFIX),
            status: KeyStatus::Active,
            expires_at,
            group_id,
            allowed_models,
            limits,
            created_at: now,
            updated_at: now,
            revision: 0,
        };
        let detail = json!({
            "id": row.id, "group": group, "models": row.allowed_models, "expires_at_ms": row.expires_at,
            "limits": limits_json(&row.limits),
        });
        self.apply(
            actor,
            "key.create",
            &r.name,
            detail,
            vec![Mutation::InsertApiKey(row.clone())],
        )
        .await?;
        let groups = self.group_names().await?;
        Ok(pb::CreateApiKeyResponse {
            info: Some(Self::key_info(&row, &groups)),
            key: secret,
        })
    }

    pub(super) async fn update_api_key(
        &self,
        actor: &Actor,
        r: pb::UpdateApiKeyRequest,
    ) -> Result<pb::ApiKeyInfo, Status> {
        if let Some(n) = &r.name {
            validate_name("key", n)?;
        }
        let limits = r.limits.as_ref().map(|l| validate_limits("key", Some(l))).transpose()?;
        let group_id = match &r.group {
            Some(g) => Some(self.resolve_groups(std::slice::from_ref(g)).await?.remove(0)),
            None => None,
        };
        let models = if r.set_allowed_models {
            Some(validate_models(&r.allowed_models)?)
        } else {
            None
        };
        let expires = r.expires_at_ms.map(validate_expiry).transpose()?;
        let status = match r.status.map(pb::KeyStatus::try_from) {
            None => None,
            Some(Ok(pb::KeyStatus::Active)) => Some(KeyStatus::Active),
            Some(Ok(pb::KeyStatus::Disabled)) => Some(KeyStatus::Disabled),
            Some(_) => {
                return Err(Status::invalid_argument(
                    "status must be active or disabled (revoke with `key revoke`)",
                ))
            }
        };
        let row = retry_conflicts(|| async {
            let cur = self.api_key(&r.key).await?;
            if cur.status == KeyStatus::Revoked {
                return Err(Status::failed_precondition(format!(
                    "key {:?} is revoked; create a new one",
                    cur.name
                )));
            }
            let mut k = cur.clone();
            let mut changed = serde_json::Map::new();
            if let Some(n) = &r.name {
                k.name = n.clone();
                changed.insert("name".into(), json!(n));
            }
            if let Some(g) = &group_id {
                k.group_id = g.clone();
                changed.insert("group_id".into(), json!(g));
            }
            if let Some(m) = &models {
                k.allowed_models = m.clone();
                changed.insert("models".into(), json!(m));
            }
            if let Some(e) = expires {
                k.expires_at = e;
                changed.insert("expires_at_ms".into(), json!(e));
            }
            if let Some(l) = limits {
                k.limits = l;
                changed.insert("limits".into(), limits_json(&k.limits));
            }
            if let Some(s) = status {
                k.status = s;
                changed.insert("status".into(), json!(s.as_str()));
            }
            if k == cur {
                return Ok(k);
            }
            k.updated_at = now_ms();
            self.write_key(actor, "key.update", &cur, k, serde_json::Value::Object(changed))
                .await
        })
        .await?;
        let groups = self.group_names().await?;
        Ok(Self::key_info(&row, &groups))
    }

    pub(super) async fn list_api_keys(
        &self,
        _actor: &Actor,
        _r: pb::ListApiKeysRequest,
    ) -> Result<pb::ListApiKeysResponse, Status> {
        let groups = self.group_names().await?;
        let keys = self.store.list_api_keys().await?;
        Ok(pb::ListApiKeysResponse {
            keys: keys.iter().map(|k| Self::key_info(k, &groups)).collect(),
        })
    }

    pub(super) async fn revoke_api_key(
        &self,
        actor: &Actor,
        r: pb::RevokeApiKeyRequest,
    ) -> Result<pb::ApiKeyInfo, Status> {
        let name = r.key.clone();
        let row = retry_conflicts(|| async {
            let cur = self.api_key(&name).await?;
            if cur.status == KeyStatus::Revoked {
                return Ok(cur);
            }
            let mut k = cur.clone();
            k.status = KeyStatus::Revoked;
            k.updated_at = now_ms();
            self.write_key(actor, "key.revoke", &cur, k, json!({"id": cur.id}))
                .await
        })
        .await?;
        let groups = self.group_names().await?;
        Ok(Self::key_info(&row, &groups))
    }

    /// The key, its group's limits, and what each has spent of its budgets: the same sums
    /// `UsageIngest.Spend` gives data planes. Live use (requests this minute, in flight) is the
    /// fleet limiter's and is left unset here.
    pub(super) async fn get_api_key(
        &self,
        _actor: &Actor,
        r: pb::GetApiKeyRequest,
    ) -> Result<pb::GetApiKeyResponse, Status> {
        let k = self.api_key(&r.key).await?;
        let group = self.group(&k.group_id).await?;
        let settings = self.store.settings().await?;
        let p = current_periods(&settings, now_ms());
        let totals = self.spend.totals(&p).await?;
        let keys = self.store.list_api_keys().await?;
        let groups = self.group_names().await?;
        let (live, group_live) = self.live_use(&k, &group, &p).await;
        Ok(pb::GetApiKeyResponse {
            info: Some(Self::key_info(&k, &groups)),
            spend: Some(budget_spend(&p, totals.of_key(&k.id))),
            group_limits: Some(limits_to_pb(&group.limits)),
            group_spend: Some(budget_spend(&p, totals.of_group(&group.id, &keys))),
            live,
            group_live,
        })
    }
}

/// Spend over the current periods, as the Admin API shows it.
pub(super) fn budget_spend(p: &relay_proto::periods::Periods, s: Spent) -> pb::BudgetSpend {
    pb::BudgetSpend {
        day: p.day.clone(),
        month: p.month.clone(),
        day_pico_usd: s.day,
        month_pico_usd: s.month,
        day_resets_at_ms: p.day_end_ms,
        month_resets_at_ms: p.month_end_ms,
    }
}
