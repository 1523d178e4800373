//! Sends the subscription quota windows this data plane observed to the control plane
//! (`ConfigDiscovery.ReportQuotas`) every few seconds, and takes back the fleet's newest view of
//! every account, which scheduling reads (see `proxy::quota`). Quota observations are not config:
//! they move with every answer, so they travel beside the versioned config, not in it. A report
//! that cannot be delivered is kept and sent with the next one; the request path never waits.

use super::watch::ControlPlaneLink;
use crate::proxy::health::HealthRegistry;
use relay_proto::v1 as pb;
use relay_proto::v1::config_discovery_client::ConfigDiscoveryClient;
use std::sync::Arc;
use std::time::Duration;

/// How often observations go out (and the fleet's come back).
pub const REPORT_EVERY: Duration = Duration::from_secs(3);

type Interceptor = Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send + Sync>;
type Client =
    ConfigDiscoveryClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Interceptor>>;

async fn connect(link: &ControlPlaneLink) -> Option<Client> {
    let channel = link.connect().await.ok()?;
    let bearer = link.bearer().ok()?;
    let f: Interceptor = Box::new(move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", bearer.clone());
        Ok(r)
    });
    Some(ConfigDiscoveryClient::with_interceptor(channel, f))
}

/// Runs until `stop` turns true.
pub async fn run(
    health: Arc<HealthRegistry>,
    link: ControlPlaneLink,
    node_id: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let quotas = &health.quotas;
    let mut client: Option<Client> = None;
    let mut tick = tokio::time::interval(REPORT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        if client.is_none() {
            client = connect(&link).await;
        }
        let Some(c) = client.as_mut() else { continue };
        let unsent = quotas.unsent();
        let req = pb::QuotaReport {
            node_id: node_id.clone(),
            quotas: unsent.clone(),
        };
        match c.report_quotas(req).await {
            Ok(r) => {
                quotas.sent(&unsent);
                quotas.merge(r.into_inner().fleet);
                metrics::counter!(relay_proto::metrics::QUOTA_REPORTS_TOTAL, "outcome" => "ok").increment(1);
            }
            Err(e) if e.code() == tonic::Code::Unimplemented => {
                // A control plane from before quota reports: nothing to send there.
                quotas.sent(&unsent);
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot report quota windows; they go with the next report");
                metrics::counter!(relay_proto::metrics::QUOTA_REPORTS_TOTAL, "outcome" => "failed").increment(1);
                client = None;
            }
        }
    }
}
