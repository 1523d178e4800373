//! Tells the control plane when this data plane sees an account change state
//! (`ConfigDiscovery.ReportAccountState`), so it can push the state to the
//! whole fleet. Reports queue in a bounded channel and are sent by one task;
//! the request path never waits for them. A report that cannot be delivered
//! is retried a few times and then dropped: the local view still protects
//! this data plane, and the next failure reports again.

use super::watch::ControlPlaneLink;
use relay_proto::v1 as pb;
use relay_proto::v1::config_discovery_client::ConfigDiscoveryClient;
use std::time::Duration;
use tokio::sync::mpsc;

#[derive(Clone)]
pub struct StateReporter {
    tx: mpsc::Sender<pb::AccountState>,
}

impl StateReporter {
    /// Starts the sending task.
    pub fn start(link: ControlPlaneLink, node_id: String) -> Self {
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(run(link, node_id, rx));
        Self { tx }
    }

    /// A reporter that drops everything (tests, or no control plane).
    pub fn disabled() -> Self {
        let (tx, _rx) = mpsc::channel(1);
        Self { tx }
    }

    pub fn report(&self, state: pb::AccountState) {
        if self.tx.try_send(state).is_err() {
            metrics::counter!(relay_proto::metrics::ACCOUNT_STATE_REPORTS_TOTAL, "outcome" => "dropped").increment(1);
        }
    }
}

async fn run(link: ControlPlaneLink, node_id: String, mut rx: mpsc::Receiver<pb::AccountState>) {
    let mut client = None;
    while let Some(state) = rx.recv().await {
        for attempt in 0..3u32 {
            if client.is_none() {
                client = connect(&link).await;
            }
            let Some(c) = client.as_mut() else {
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                continue;
            };
            let req = pb::AccountStateReport {
                node_id: node_id.clone(),
                state: Some(state.clone()),
            };
            match c.report_account_state(req).await {
                Ok(r) => {
                    let outcome = if r.get_ref().applied { "applied" } else { "known" };
                    metrics::counter!(relay_proto::metrics::ACCOUNT_STATE_REPORTS_TOTAL, "outcome" => outcome)
                        .increment(1);
                    break;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot report an account state; retrying");
                    client = None;
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
            }
        }
    }
}

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
