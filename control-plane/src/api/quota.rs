//! Subscription accounts' quota windows between the wire and the store, and the gauges that show
//! them (`relay_account_quota_utilization{account, window}`, `relay_account_quota_resets_in_seconds`).

use crate::model::{AccountQuota, QuotaWindow};
use relay_proto::v1 as pb;

/// Longest status or window name kept (the upstream's strings, bounded).
const MAX_TEXT: usize = 32;
/// Most windows kept per account.
const MAX_WINDOWS: usize = 8;

fn bounded(s: &str) -> String {
    s.chars().take(MAX_TEXT).collect()
}

pub fn to_pb(q: &AccountQuota) -> pb::AccountQuota {
    pb::AccountQuota {
        account_id: q.account_id.clone(),
        status: q.status.clone(),
        reset_ms: q.reset_at,
        windows: q
            .windows
            .iter()
            .map(|w| pb::QuotaWindow {
                name: w.name.clone(),
                utilization: w.utilization,
                reset_ms: w.reset_ms,
                status: w.status.clone(),
            })
            .collect(),
        observed_ms: q.observed_at,
        observed_by: q.observed_by.clone(),
    }
}

/// A reported observation as stored; `node_id` is the reporter (never what the message claims).
/// Utilization outside 0..1 (or not a number) is stored as unknown.
pub fn from_pb(q: &pb::AccountQuota, node_id: &str) -> AccountQuota {
    AccountQuota {
        account_id: q.account_id.clone(),
        observed_at: q.observed_ms,
        observed_by: node_id.to_string(),
        status: bounded(&q.status),
        reset_at: q.reset_ms.max(0),
        windows: q
            .windows
            .iter()
            .take(MAX_WINDOWS)
            .map(|w| QuotaWindow {
                name: bounded(&w.name),
                utilization: if w.utilization.is_finite() && (0.0..=1.0).contains(&w.utilization) {
                    w.utilization
                } else {
                    -1.0
                },
                reset_ms: w.reset_ms.max(0),
                status: bounded(&w.status),
            })
            .collect(),
    }
}

/// Sets the gauges from the fleet's view (`name_of` maps account ids to names; unknown ids are
/// left out).
pub fn export(quotas: &[AccountQuota], name_of: impl Fn(&str) -> Option<String>, now_ms: i64) {
    for q in quotas {
        let Some(name) = name_of(&q.account_id) else { continue };
        for w in &q.windows {
            if w.utilization >= 0.0 {
                metrics::gauge!(relay_proto::metrics::ACCOUNT_QUOTA_UTILIZATION, "account" => name.clone(), "window" => w.name.clone())
                    .set(w.utilization);
            }
            if w.reset_ms > 0 {
                metrics::gauge!(relay_proto::metrics::ACCOUNT_QUOTA_RESETS_IN_SECONDS, "account" => name.clone(), "window" => w.name.clone())
                    .set(((w.reset_ms - now_ms).max(0) as f64) / 1000.0);
            }
        }
    }
}
