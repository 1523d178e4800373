//! Committed spend from the control plane (`UsageIngest.Spend`): the usage it has stored
//! for each key and group with a budget, this day and month. Polled every few seconds
//! while any budget exists; a budget check counts `max(this, the fleet's running
//! counter)`, so spend is never lost to a Redis that restarted, nor counted twice.

use crate::control::state::ConfigHolder;
use crate::control::watch::ControlPlaneLink;
use arc_swap::ArcSwap;
use relay_limits::{Committed, Kind};
use relay_proto::periods::Periods;
use relay_proto::v1 as pb;
use relay_proto::v1::usage_ingest_client::UsageIngestClient;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// How often committed spend is asked for.
pub const POLL: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Snapshot {
    day: String,
    month: String,
    keys: HashMap<String, (u64, u64)>,
    groups: HashMap<String, (u64, u64)>,
}

/// The last committed spend heard from a control plane.
#[derive(Default)]
pub struct SpendBook {
    current: ArcSwap<Snapshot>,
}

impl SpendBook {
    /// A subject's committed spend in `periods`, nano-USD (0 for a period the last answer
    /// was not about: a new day starts from what the fleet counts).
    pub fn committed(&self, kind: Kind, id: &str, periods: &Periods) -> Committed {
        let s = self.current.load();
        let map = match kind {
            Kind::Key => &s.keys,
            Kind::Group => &s.groups,
            Kind::Account => return Committed::default(),
        };
        let (day, month) = map.get(id).copied().unwrap_or((0, 0));
        Committed {
            day_nano: if s.day == periods.day {
                relay_limits::nano_of_pico(day)
            } else {
                0
            },
            month_nano: if s.month == periods.month {
                relay_limits::nano_of_pico(month)
            } else {
                0
            },
        }
    }

    pub fn set(&self, r: pb::SpendResponse) {
        let map = |v: Vec<pb::Spend>| {
            v.into_iter()
                .map(|s| (s.id, (s.day_pico_usd, s.month_pico_usd)))
                .collect()
        };
        self.current.store(Arc::new(Snapshot {
            day: r.day,
            month: r.month,
            keys: map(r.keys),
            groups: map(r.groups),
        }));
    }
}

type Interceptor = Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send + Sync>;
type Client =
    UsageIngestClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Interceptor>>;

async fn connect(link: &ControlPlaneLink) -> Option<Client> {
    let channel = link.connect().await.ok()?;
    let bearer = link.bearer().ok()?;
    let f: Interceptor = Box::new(move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", bearer.clone());
        Ok(r)
    });
    Some(UsageIngestClient::with_interceptor(channel, f))
}

/// Polls while the config has budgets or this data plane counts in Redis (the answer also says
/// how many data planes are connected: the local fallback's share), until `stop` turns true.
pub async fn run(
    book: Arc<SpendBook>,
    limiter: Arc<relay_limits::Limiter>,
    link: ControlPlaneLink,
    holder: Arc<ConfigHolder>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut client: Option<Client> = None;
    loop {
        if limiter.is_shared() || holder.get().is_some_and(|c| c.has_budgets()) {
            if client.is_none() {
                client = connect(&link).await;
            }
            if let Some(c) = client.as_mut() {
                match tokio::time::timeout(Duration::from_secs(10), c.spend(pb::SpendRequest {})).await {
                    Ok(Ok(r)) => {
                        let r = r.into_inner();
                        limiter.set_fleet_hint(u64::from(r.data_planes));
                        book.set(r);
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(code = ?e.code(), "cannot read committed spend from the control plane");
                        client = None;
                    }
                    Err(_) => client = None,
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = stop.changed() => return,
        }
    }
}
