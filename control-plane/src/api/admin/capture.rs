//! Capture rules (`relayctl capture add|list|rm`): validated, stored as config (published to the
//! data planes, audited); and clearing the request log (`relayctl requests clear`, audited).

use super::lookup::lookup;
use super::validate::validate_models;
use super::{new_id, AdminApi};
use crate::api::auth::Actor;
use crate::api::convert::{capture_rule_to_pb, version_pb};
use crate::capture::{DEFAULT_MAX_BYTES, MAX_MAX_BYTES};
use crate::model::*;
use crate::store::StoreError;
use relay_proto::v1 as pb;
use serde_json::json;
use std::collections::HashMap;
use tonic::Status;

/// The longest `--ttl` accepted: ten years.
const MAX_TTL_MS: u64 = 10 * 366 * 86_400_000;
/// Requests deleted per store transaction by `ClearRequests`.
const CLEAR_BATCH: usize = 500;

impl AdminApi {
    pub(super) async fn add_capture_rule(
        &self,
        actor: &Actor,
        r: pb::AddCaptureRuleRequest,
    ) -> Result<pb::CaptureRuleInfo, Status> {
        let key_id = if r.key.is_empty() {
            String::new()
        } else {
            let keys = self.store.list_api_keys().await?;
            match keys.iter().find(|k| k.id == r.key || k.name == r.key) {
                Some(k) => k.id.clone(),
                None => lookup(keys, &r.key, "key", |k| (&k.id, &k.name))?.id,
            }
        };
        let group_id = if r.group.is_empty() {
            String::new()
        } else {
            let groups = self.store.list_groups().await?;
            match groups.iter().find(|g| g.id == r.group || g.name == r.group) {
                Some(g) => g.id.clone(),
                None => lookup(groups, &r.group, "group", |g| (&g.id, &g.name))?.id,
            }
        };
        let account_id = if r.account.is_empty() {
            String::new()
        } else {
            let accounts = self.store.list_accounts().await?;
            match accounts.iter().find(|a| a.id == r.account || a.name == r.account) {
                Some(a) => a.id.clone(),
                None => lookup(accounts, &r.account, "account", |a| (&a.id, &a.name))?.id,
            }
        };
        let model = r.model.trim().to_string();
        validate_models(std::slice::from_ref(&model))?;
        let sample = if r.sample_rate == 0.0 { 1.0 } else { r.sample_rate };
        if !(sample > 0.0 && sample <= 1.0) {
            return Err(Status::invalid_argument(format!(
                "--sample is a share of requests above 0 and at most 1 (0.1 = one in ten), not {}",
                r.sample_rate
            )));
        }
        // Kept in millionths: a smaller share would be stored as another one.
        if sample < 0.000_001 {
            return Err(Status::invalid_argument(format!(
                "--sample is at least 0.000001 (one in a million), not {}",
                r.sample_rate
            )));
        }
        let sample_ppm = (sample * 1_000_000.0).round() as u32;
        let max_bytes = if r.max_bytes == 0 {
            DEFAULT_MAX_BYTES
        } else {
            r.max_bytes
        };
        if max_bytes > MAX_MAX_BYTES {
            return Err(Status::invalid_argument(format!(
                "--max-bytes is at most {MAX_MAX_BYTES} (4 MiB of each body), not {max_bytes}"
            )));
        }
        if r.ttl_ms > MAX_TTL_MS {
            return Err(Status::invalid_argument("--ttl is at most ten years"));
        }
        let rule = CaptureRule {
            id: new_id(),
            key_id,
            group_id,
            account_id,
            model,
            errors_only: r.errors_only,
            sample_ppm,
            max_bytes,
            ttl_ms: r.ttl_ms,
            created_ms: now_ms(),
        };
        let detail = json!({
            "key_id": rule.key_id, "group_id": rule.group_id, "account_id": rule.account_id,
            "model": rule.model, "errors_only": rule.errors_only, "sample_rate": sample,
            "max_bytes": rule.max_bytes, "ttl_ms": rule.ttl_ms,
        });
        let v = self
            .apply(
                actor,
                "capture.add",
                &rule.id,
                detail,
                vec![Mutation::InsertCaptureRule(rule.clone())],
            )
            .await?;
        let names = RuleNames::load(self).await?;
        let mut info = names.info(&rule);
        info.version = Some(version_pb(v));
        Ok(info)
    }

    pub(super) async fn list_capture_rules(
        &self,
        _actor: &Actor,
        _r: pb::ListCaptureRulesRequest,
    ) -> Result<pb::ListCaptureRulesResponse, Status> {
        let rules = self.store.list_capture_rules().await?;
        let names = RuleNames::load(self).await?;
        Ok(pb::ListCaptureRulesResponse {
            rules: rules.iter().map(|r| names.info(r)).collect(),
        })
    }

    pub(super) async fn delete_capture_rule(
        &self,
        actor: &Actor,
        r: pb::DeleteCaptureRuleRequest,
    ) -> Result<pb::DeleteResponse, Status> {
        let rules = self.store.list_capture_rules().await?;
        let rule = match rules.iter().find(|c| c.id == r.id) {
            Some(c) => c.clone(),
            // Rules have no name: an id prefix, as `capture list` shows it.
            None => lookup(rules, &r.id, "capture rule", |c| (&c.id, &c.id))?,
        };
        let v = self
            .apply(
                actor,
                "capture.rm",
                &rule.id,
                json!({}),
                vec![Mutation::DeleteCaptureRule { id: rule.id.clone() }],
            )
            .await
            .map_err(|e| match e {
                StoreError::NotFound { .. } => Status::not_found(format!("capture rule {:?} not found", r.id)),
                e => e.into(),
            })?;
        Ok(pb::DeleteResponse {
            version: Some(version_pb(v)),
        })
    }

    pub(super) async fn clear_requests(
        &self,
        actor: &Actor,
        r: pb::ClearRequestsRequest,
    ) -> Result<pb::ClearRequestsResponse, Status> {
        let f = super::requests::filter(&self.store, r.filter.as_ref()).await?;
        let mut out = pb::ClearRequestsResponse::default();
        loop {
            let (records, truncated) = crate::requests::all(&self.store, &f, crate::requests::MAX_STATS_SCAN).await?;
            let ids: Vec<String> = records.into_iter().map(|r| r.id).collect();
            for chunk in ids.chunks(CLEAR_BATCH) {
                let (rows, caps) = self.store.delete_requests(chunk).await?;
                out.requests += chunk.len() as u64;
                out.usage_rows += rows;
                out.captures += caps;
            }
            if !truncated || ids.is_empty() {
                break;
            }
        }
        let filter = r.filter.unwrap_or_default();
        let detail = json!({
            "since_ms": filter.since_ms, "until_ms": filter.until_ms, "key": filter.key,
            "group": filter.group, "account": filter.account, "model": filter.model,
            "status": filter.status, "stream": filter.stream, "min_duration_ms": filter.min_duration_ms,
            "requests": out.requests, "usage_rows": out.usage_rows, "captures": out.captures,
        });
        self.apply(actor, "requests.clear", "", detail, vec![]).await?;
        Ok(out)
    }
}

/// Names of what rules select, for display.
struct RuleNames {
    keys: HashMap<String, String>,
    groups: HashMap<String, String>,
    accounts: HashMap<String, String>,
}

impl RuleNames {
    async fn load(api: &AdminApi) -> Result<Self, Status> {
        Ok(Self {
            keys: api
                .store
                .list_api_keys()
                .await?
                .into_iter()
                .map(|k| (k.id, k.name))
                .collect(),
            groups: api
                .store
                .list_groups()
                .await?
                .into_iter()
                .map(|g| (g.id, g.name))
                .collect(),
            accounts: api
                .store
                .list_accounts()
                .await?
                .into_iter()
                .map(|a| (a.id, a.name))
                .collect(),
        })
    }

    fn info(&self, r: &CaptureRule) -> pb::CaptureRuleInfo {
        let name = |m: &HashMap<String, String>, id: &str| m.get(id).cloned().unwrap_or_else(|| id.to_string());
        pb::CaptureRuleInfo {
            rule: Some(capture_rule_to_pb(r)),
            key: name(&self.keys, &r.key_id),
            group: name(&self.groups, &r.group_id),
            account: name(&self.accounts, &r.account_id),
            version: None,
        }
    }
}
