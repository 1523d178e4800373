//! Reports over what happened: the audit log (`ListAudit`) and usage totals (`QueryUsage`).

use super::AdminApi;
use crate::api::auth::Actor;
use crate::model::{self, *};
use relay_proto::v1 as pb;
use tonic::Status;

impl AdminApi {
    pub(super) async fn list_audit(
        &self,
        _actor: &Actor,
        r: pb::ListAuditRequest,
    ) -> Result<pb::ListAuditResponse, Status> {
        let limit = if r.limit == 0 { 100 } else { r.limit.min(10_000) };
        let since = (r.since_ms > 0).then_some(r.since_ms);
        let entries = self.store.list_audit(limit, since).await?;
        Ok(pb::ListAuditResponse {
            entries: entries
                .into_iter()
                .map(|e| pb::AuditEntry {
                    id: e.id,
                    at_ms: e.at,
                    actor: e.actor,
                    action: e.action,
                    target: e.target,
                    detail: e.detail,
                    revision: e.revision,
                })
                .collect(),
        })
    }

    pub(super) async fn query_usage(
        &self,
        _actor: &Actor,
        r: pb::QueryUsageRequest,
    ) -> Result<pb::QueryUsageResponse, Status> {
        let group_by = match pb::UsageGroupBy::try_from(r.group_by) {
            Ok(pb::UsageGroupBy::Key) => UsageGroupBy::Key,
            Ok(pb::UsageGroupBy::Account) => UsageGroupBy::Account,
            Ok(pb::UsageGroupBy::Model) => UsageGroupBy::Model,
            _ => UsageGroupBy::None,
        };
        let bucket = match pb::UsageBucket::try_from(r.bucket) {
            Ok(pb::UsageBucket::Hour) => model::UsageBucket::Hour,
            Ok(pb::UsageBucket::Day) => model::UsageBucket::Day,
            _ => model::UsageBucket::None,
        };
        if r.since_ms > 0 && r.until_ms > 0 && r.until_ms <= r.since_ms {
            return Err(Status::invalid_argument("--until must be after --since"));
        }
        let rows = self
            .store
            .query_usage(UsageQuery {
                group_by,
                since: (r.since_ms > 0).then_some(r.since_ms),
                until: (r.until_ms > 0).then_some(r.until_ms),
                bucket,
            })
            .await?;
        Ok(pb::QueryUsageResponse {
            rows: rows
                .into_iter()
                .map(|u| pb::UsageRow {
                    bucket_start_ms: u.bucket_start,
                    group: u.group,
                    group_id: u.group_id,
                    requests: u.requests,
                    input_tokens: u.input_tokens,
                    output_tokens: u.output_tokens,
                    cache_write_5m_tokens: u.cache_write_5m_tokens,
                    cache_write_1h_tokens: u.cache_write_1h_tokens,
                    cache_read_tokens: u.cache_read_tokens,
                    cost_pico_usd: u.cost_pico_usd,
                    errors: u.errors,
                    anomalies: u.anomalies,
                })
                .collect(),
        })
    }
}
