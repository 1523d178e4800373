//! Where an attempt's outcome goes: account health (shared with the fleet through the
//! reporter), subscription quota windows, and the log line of a state change.

use super::health::{HealthRegistry, HealthSettings, Outcome};
use crate::control::state_report::StateReporter;
use relay_proto::v1 as pb;
use std::sync::Arc;

/// Where an attempt's outcome goes: account health (shared with the fleet
/// through the reporter) and the account's latency estimate.
#[derive(Clone)]
pub struct HealthSink {
    pub registry: Arc<HealthRegistry>,
    pub reporter: StateReporter,
    pub settings: HealthSettings,
    /// The account's `reset_generation` in the config the attempt was sent under.
    pub generation: u64,
    /// Its name, for the log line of a state change.
    pub account: Arc<crate::control::state::AccountEntry>,
}

impl HealthSink {
    pub fn observe(&self, account_id: &str, model: &str, outcome: &Outcome<'_>) -> super::health::Verdict {
        let now = chrono::Utc::now().timestamp_millis();
        if let Outcome::Response { headers, .. } = outcome {
            if let Some(q) = super::quota::parse(headers, account_id, self.registry.node_id(), now) {
                self.registry.quotas.observe(q);
            }
        }
        let (verdict, report) =
            self.registry
                .observe_as_of(account_id, self.generation, model, outcome, &self.settings, now);
        if let Some(state) = report {
            // By name, as relayctl shows it ("rate_limited"), not the proto constant.
            let health = pb::AccountHealth::try_from(state.health)
                .map(|h| {
                    h.as_str_name()
                        .trim_start_matches("ACCOUNT_HEALTH_")
                        .to_ascii_lowercase()
                })
                .unwrap_or_else(|_| "unknown".into());
            tracing::info!(
                account = %self.account.name,
                account_id,
                health,
                reason = %state.reason,
                "account state changed"
            );
            self.reporter.report(state);
        }
        verdict
    }
}
