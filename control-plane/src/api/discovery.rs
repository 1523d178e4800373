//! `ConfigDiscovery.Watch`: one bidirectional stream per data plane.
//!
//! Protocol (see proto/relay/v1/config.proto): Hello first; the answer comes at
//! once (a delta when the publisher's log covers the gap, else a full
//! snapshot); then at most one un-ACKed update in flight, with every change
//! made meanwhile coalesced into the next one. A NACKed version is not resent
//! until the head moves on. A data plane that holds a newer revision than this
//! replica's head (it talked to a replica further ahead) gets nothing until
//! this replica catches up: a data plane never moves backwards within an epoch.

use super::auth::{Authenticator, Need};
use crate::config::{Published, Update};
use crate::model::{ProxyEvent, Version};
use crate::store::DynStore;
use futures::Stream;
use relay_proto::v1 as pb;
use relay_proto::v1::config_discovery_server::ConfigDiscovery;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

pub struct DiscoveryService {
    published: watch::Receiver<Arc<Published>>,
    store: DynStore,
    auth: Authenticator,
    replica: String,
    recorder: ProxyRecorder,
}

impl DiscoveryService {
    pub fn new(
        published: watch::Receiver<Arc<Published>>,
        store: DynStore,
        auth: Authenticator,
        replica: String,
    ) -> Self {
        Self {
            published,
            recorder: ProxyRecorder::start(store.clone()),
            store,
            auth,
            replica,
        }
    }
}

fn to_model(v: &pb::ConfigVersion) -> Version {
    Version {
        epoch: v.epoch,
        revision: v.revision,
    }
}

fn to_pb(v: Version) -> pb::ConfigVersion {
    pb::ConfigVersion::new(v.epoch, v.revision)
}

/// Whether a data plane holding `held` should get an update to `head`.
fn behind(held: Option<Version>, head: Version) -> bool {
    match held {
        None => true,
        Some(h) if h.epoch != head.epoch => true,
        Some(h) => h.revision < head.revision,
    }
}

fn build_update(p: &Published, held: Option<Version>) -> pb::ConfigUpdate {
    let snap = &p.snapshot;
    let mut u = pb::ConfigUpdate {
        nonce: uuid::Uuid::new_v4().simple().to_string(),
        version: Some(to_pb(snap.version)),
        content_hash: snap.hash.clone(),
        ..Default::default()
    };
    match p.update_from(held) {
        Update::Full(resources) => {
            u.full = true;
            u.resources = Some(resources);
        }
        Update::Delta {
            base,
            resources,
            removed,
        } => {
            u.base = Some(to_pb(base));
            u.resources = Some(resources);
            u.removed = removed;
        }
    }
    u
}

struct StreamGauge;
impl StreamGauge {
    fn new() -> Self {
        metrics::gauge!("relay_watch_streams").increment(1.0);
        StreamGauge
    }
}
impl Drop for StreamGauge {
    fn drop(&mut self) {
        metrics::gauge!("relay_watch_streams").decrement(1.0);
    }
}

/// Records data-plane state off the Watch streams' path: a stream never waits
/// for the database. Events queue in order; a writer task drains them in
/// batches and, per node, keeps only the last of consecutive ACKs (a thousand
/// data planes ACKing one change cost one write each, not a wait each).
#[derive(Clone)]
pub struct ProxyRecorder {
    tx: mpsc::UnboundedSender<(String, String, ProxyEvent)>,
}

impl ProxyRecorder {
    pub fn start(store: DynStore) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_proxy_states(store, rx));
        Self { tx }
    }

    fn record(&self, node: &str, replica: &str, ev: ProxyEvent) {
        let _ = self.tx.send((node.to_string(), replica.to_string(), ev));
    }
}

async fn write_proxy_states(store: DynStore, mut rx: mpsc::UnboundedReceiver<(String, String, ProxyEvent)>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        // Drop an ACK when the next event of the same node is also an ACK.
        let mut keep = vec![true; batch.len()];
        let mut next_is_ack: std::collections::HashMap<&str, bool> = std::collections::HashMap::new();
        for i in (0..batch.len()).rev() {
            let (node, _, ev) = &batch[i];
            let is_ack = matches!(ev, ProxyEvent::Acked(_));
            if is_ack && next_is_ack.get(node.as_str()) == Some(&true) {
                keep[i] = false;
            }
            next_is_ack.insert(node.as_str(), is_ack);
        }
        for ((node, replica, ev), keep) in batch.into_iter().zip(keep) {
            if !keep {
                continue;
            }
            if let Err(e) = store.record_proxy(&node, &replica, ev).await {
                tracing::warn!(node_id = %node, error = %e, "cannot record data-plane state");
            }
        }
    }
}

async fn run_stream(
    mut inbound: Streaming<pb::WatchRequest>,
    identity: super::identity::NodeIdentity,
    tx: mpsc::Sender<Result<pb::ConfigUpdate, Status>>,
    mut published: watch::Receiver<Arc<Published>>,
    recorder: ProxyRecorder,
    replica: String,
) {
    let _gauge = StreamGauge::new();
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
        Ok(Ok(Some(pb::WatchRequest {
            kind: Some(pb::watch_request::Kind::Hello(h)),
        }))) if !h.node_id.is_empty() => h,
        Ok(Ok(Some(_))) => {
            let _ = tx
                .send(Err(Status::invalid_argument(
                    "the first message must be a Hello with a node_id",
                )))
                .await;
            return;
        }
        Err(_) => {
            let _ = tx.send(Err(Status::deadline_exceeded("no Hello within 10 s"))).await;
            return;
        }
        Ok(_) => return,
    };
    let node = hello.node_id.clone();
    if let Err(status) = identity.check(&node) {
        tracing::warn!(node_id = %node, error = %status.message(), "data plane refused");
        let _ = tx.send(Err(status)).await;
        return;
    }
    let mut acked: Option<Version> = hello.held.as_ref().map(to_model);
    tracing::info!(node_id = %node, held = ?acked, build = %hello.build_version, "data plane connected");
    recorder.record(
        &node,
        &replica,
        ProxyEvent::Connected {
            build_version: hello.build_version.clone(),
            held: acked,
        },
    );

    let mut in_flight: Option<(String, Version)> = None;
    let mut nacked: Option<Version> = None;
    // The first answer goes out at once, even when the data plane is current
    // (then it is an empty delta), unless it is ahead of this replica.
    let mut first = true;
    loop {
        if in_flight.is_none() {
            let p = published.borrow_and_update().clone();
            let head = p.snapshot.version;
            let current = acked == Some(head);
            let send = (behind(acked, head) || (first && current)) && nacked != Some(head);
            if send {
                let u = build_update(&p, acked);
                in_flight = Some((u.nonce.clone(), head));
                metrics::counter!("relay_config_updates_sent_total", "kind" => if u.full { "full" } else { "delta" })
                    .increment(1);
                if tx.send(Ok(u)).await.is_err() {
                    break;
                }
            }
            first = false;
        }
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(pb::WatchRequest { kind: Some(pb::watch_request::Kind::Ack(a)) })) => {
                    match &in_flight {
                        Some((nonce, v)) if *nonce == a.nonce => {
                            let applied = a.version.as_ref().map(to_model).unwrap_or(*v);
                            acked = Some(applied);
                            in_flight = None;
                            recorder.record(&node, &replica, ProxyEvent::Acked(applied));
                        }
                        _ => tracing::debug!(node_id = %node, "stale ACK ignored"),
                    }
                }
                Ok(Some(pb::WatchRequest { kind: Some(pb::watch_request::Kind::Nack(n)) })) => {
                    match &in_flight {
                        Some((nonce, v)) if *nonce == n.nonce => {
                            tracing::warn!(node_id = %node, version = %v, error = %n.error, "data plane rejected config");
                            metrics::counter!("relay_config_nacks_total").increment(1);
                            nacked = Some(*v);
                            in_flight = None;
                            if let Some(s) = n.serving.as_ref() {
                                acked = Some(to_model(s));
                            }
                            recorder.record(&node, &replica, ProxyEvent::Nacked {
                                serving: n.serving.as_ref().map(to_model),
                                error: n.error.chars().take(2000).collect(),
                            });
                        }
                        _ => tracing::debug!(node_id = %node, "stale NACK ignored"),
                    }
                }
                Ok(Some(_)) => {
                    let _ = tx.send(Err(Status::invalid_argument("unexpected message: Hello is sent once"))).await;
                    break;
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(node_id = %node, error = %e, "watch stream ended");
                    break;
                }
            },
            changed = published.changed(), if in_flight.is_none() => {
                if changed.is_err() {
                    break;
                }
            }
            _ = tx.closed() => break,
        }
    }
    tracing::info!(node_id = %node, "data plane disconnected");
    recorder.record(&node, &replica, ProxyEvent::Disconnected);
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::ConfigUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl ConfigDiscovery for DiscoveryService {
    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<Streaming<pb::WatchRequest>>) -> Result<Response<WatchStream>, Status> {
        self.auth.check(req.metadata(), Need::DataPlane).await?;
        let identity = self.auth.node_identity(&req);
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(run_stream(
            req.into_inner(),
            identity,
            tx,
            self.published.clone(),
            self.recorder.clone(),
            self.replica.clone(),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn report_account_state(
        &self,
        req: Request<pb::AccountStateReport>,
    ) -> Result<Response<pb::AccountStateAck>, Status> {
        self.auth.check(req.metadata(), Need::DataPlane).await?;
        let identity = self.auth.node_identity(&req);
        let r = req.into_inner();
        identity.check(&r.node_id)?;
        let st = r.state.ok_or_else(|| Status::invalid_argument("state is required"))?;
        let health =
            crate::config::health_from_pb(st.health).ok_or_else(|| Status::invalid_argument("health is required"))?;
        if self
            .store
            .get_account(&st.account_id)
            .await
            .map_err(super::status_from_store)?
            .is_none()
        {
            return Err(Status::not_found(format!("account {} not found", st.account_id)));
        }
        let now = crate::model::now_ms();
        let existing = self
            .store
            .list_account_states()
            .await
            .map_err(super::status_from_store)?
            .into_iter()
            .find(|s| s.account_id == st.account_id && s.scope == st.scope);
        // Many data planes report the same limit: only a material change is applied.
        let known = existing.as_ref().is_some_and(|e| {
            let live = e.until == 0 || e.until > now;
            live && e.health == health && (e.until == 0 || (st.until_ms != 0 && st.until_ms <= e.until + 1000))
        });
        if known {
            let head = self.store.head().await.map_err(super::status_from_store)?;
            return Ok(Response::new(pb::AccountStateAck {
                applied: false,
                version: Some(to_pb(head)),
            }));
        }
        let row = crate::model::AccountState {
            account_id: st.account_id.clone(),
            scope: st.scope.chars().take(64).collect(),
            health,
            reason: st.reason.chars().take(500).collect(),
            until: st.until_ms.max(0),
            since: now,
            reported_by: r.node_id.clone(),
            revision: 0,
        };
        let audit = crate::model::AuditRecord {
            actor: format!("data-plane:{}", r.node_id),
            action: "account.state".into(),
            target: st.account_id.clone(),
            detail: serde_json::json!({
                "health": health.as_str(), "scope": row.scope, "until_ms": row.until, "reason": row.reason,
            })
            .to_string(),
        };
        let v = self
            .store
            .apply(vec![crate::model::Mutation::SetAccountState(row)], audit)
            .await
            .map_err(super::status_from_store)?;
        metrics::counter!("relay_account_state_changes_total", "health" => health.as_str()).increment(1);
        Ok(Response::new(pb::AccountStateAck {
            applied: true,
            version: Some(to_pb(v)),
        }))
    }
}
