//! `ConfigDiscovery.Watch`: one bidirectional stream per data plane.
//!
//! Protocol (see proto/relay/v1/config.proto): Hello first; the answer comes at
//! once (a delta when the publisher published the data plane's version with
//! the content hash it holds, else a full snapshot); then at most one un-ACKed
//! update in flight, with every change made meanwhile coalesced into the next
//! one.
//!
//! - A NACK for an invalid config leaves the data plane on its version, and
//!   that version is not resent until the head moves on.
//! - A NACK because the update did not lead to the hash it claimed (diverged)
//!   is answered at once with a full snapshot.
//! - A data plane that holds a version ahead of this replica's head waits
//!   until this replica catches up (a data plane never moves backwards), unless
//!   the store itself is behind it: then history was rewound (a restore) and
//!   a new epoch starts, which every data plane takes as a full snapshot.
//! - One live stream per node id on a replica: a second process claiming the
//!   same node id is refused; the same process reconnecting replaces its own.

use super::auth::{Authenticator, Need};
use super::convert::version_pb;
use super::publish::Published;
use crate::model::{ProxyEvent, Version};
use crate::store::DynStore;
use futures::Stream;
use relay_proto::v1 as pb;
use relay_proto::v1::config_discovery_server::ConfigDiscovery;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

pub struct DiscoveryService {
    published: watch::Receiver<Arc<Published>>,
    store: DynStore,
    auth: Authenticator,
    replica: String,
    recorder: ProxyRecorder,
    live: LiveNodes,
    closing: super::Closing,
}

/// The node ids with a live Watch stream on this replica. A stream removes its
/// entry when it ends, unless a newer stream of the same process took it over.
#[derive(Clone, Default)]
pub struct LiveNodes(Arc<Mutex<HashMap<String, LiveStream>>>);

/// (the process's instance id, a stream serial, the signal that ends the stream).
type LiveStream = (String, u64, watch::Sender<bool>);

/// Ends a stream's claim on its node id.
struct LiveClaim {
    nodes: LiveNodes,
    node: String,
    serial: u64,
}

impl LiveNodes {
    /// Claims `node` for a stream of process `instance`. Refused when another
    /// process holds a live stream for it; a stale stream of the same process
    /// is told to end. Returns the claim and the signal that ends this stream.
    fn claim(&self, node: &str, instance: &str) -> Result<(LiveClaim, watch::Receiver<bool>), Status> {
        static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((held_by, _, end)) = map.get(node) {
            let same_process = !instance.is_empty() && held_by == instance;
            if !same_process && !end.is_closed() {
                metrics::counter!(relay_proto::metrics::WATCH_REFUSED_TOTAL, "reason" => "duplicate_node_id")
                    .increment(1);
                return Err(Status::already_exists(format!(
                    "node id {node:?} is already connected to this control plane from another data-plane process; \
                     give each data plane its own --node-id"
                )));
            }
            let _ = end.send(true);
        }
        let serial = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = watch::channel(false);
        map.insert(node.to_string(), (instance.to_string(), serial, tx));
        Ok((
            LiveClaim {
                nodes: self.clone(),
                node: node.to_string(),
                serial,
            },
            rx,
        ))
    }
}

impl Drop for LiveClaim {
    fn drop(&mut self) {
        let mut map = self.nodes.0.lock().unwrap_or_else(PoisonError::into_inner);
        if map.get(&self.node).is_some_and(|(_, s, _)| *s == self.serial) {
            map.remove(&self.node);
        }
    }
}

impl DiscoveryService {
    pub fn new(
        published: watch::Receiver<Arc<Published>>,
        store: DynStore,
        auth: Authenticator,
        replica: String,
        closing: super::Closing,
    ) -> Self {
        Self {
            closing,
            published,
            recorder: ProxyRecorder::start(store.clone()),
            store,
            auth,
            replica,
            live: LiveNodes::default(),
        }
    }
}

fn to_model(v: &pb::ConfigVersion) -> Version {
    Version {
        epoch: v.epoch,
        revision: v.revision,
    }
}

/// Whether `a` comes after `b` in config history (epochs only grow).
fn later(a: Version, b: Version) -> bool {
    (a.epoch, a.revision) > (b.epoch, b.revision)
}

/// What a data plane holds, as far as this stream knows: a version and the
/// content hash at it (empty when not known).
type Held = Option<(Version, String)>;

/// Whether a data plane holding `held` should get an update to the head of `p`.
fn should_send(held: &Held, p: &Published, first: bool) -> bool {
    let head = &p.snapshot;
    match held {
        None => true,
        Some((v, _)) if later(*v, head.version) => false,
        Some((v, h)) if *v == head.version => first || (!h.is_empty() && *h != head.hash),
        Some(_) => true,
    }
}

fn build_update(p: &Published, held: &Held) -> pb::ConfigUpdate {
    match held {
        Some((v, h)) => p.update_for(Some(*v), h),
        None => p.update_for(None, ""),
    }
}

/// A data plane says it holds `held`, ahead of this replica's head. If the
/// store is not ahead of it either, history was rewound (a restore, or a cache
/// from another deployment): start a new epoch.
async fn check_rewound(store: &DynStore, held: Version) {
    match store.head().await {
        Ok(head) if later(held, head) => {
            if let Err(e) = crate::config::rewound(store, head, held).await {
                tracing::warn!(error = %e, "cannot start a new config epoch");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the config head"),
    }
}

/// Counts this replica's data planes whose last answer was a NACK of an
/// invalid config (`relay_data_planes_nacking`): they serve an older config
/// until the head moves to one they accept.
#[derive(Default)]
struct NackingGauge(bool);

impl NackingGauge {
    fn set(&mut self, nacking: bool) {
        if nacking != self.0 {
            metrics::gauge!(relay_proto::metrics::DATA_PLANES_NACKING).increment(if nacking { 1.0 } else { -1.0 });
            self.0 = nacking;
        }
    }
}

impl Drop for NackingGauge {
    fn drop(&mut self) {
        self.set(false);
    }
}

/// `relay_data_plane_connected{node_id}` and `relay_data_plane_config_lag_revisions{node_id}`
/// of one Watch stream: connected while the stream lives, the lag as of the head it last looked
/// at. The label is the data plane's node id: one series per data plane of the fleet.
struct NodeGauges {
    node: String,
    /// A newer stream of the same data plane took over: its gauges are that stream's now.
    replaced: bool,
}

impl NodeGauges {
    fn new(node: &str) -> Self {
        metrics::gauge!(relay_proto::metrics::DATA_PLANE_CONNECTED, "node_id" => node.to_string()).set(1.0);
        NodeGauges {
            node: node.to_string(),
            replaced: false,
        }
    }

    /// Revisions the data plane is behind `head`: all of them when it holds nothing or another
    /// epoch's config.
    fn lag(&self, head: Version, held: Option<Version>) {
        let lag = match held {
            Some(h) if h.epoch == head.epoch => head.revision.saturating_sub(h.revision),
            _ => head.revision,
        };
        metrics::gauge!(relay_proto::metrics::DATA_PLANE_CONFIG_LAG_REVISIONS, "node_id" => self.node.clone())
            .set(lag as f64);
    }
}

impl Drop for NodeGauges {
    fn drop(&mut self) {
        if self.replaced {
            return;
        }
        metrics::gauge!(relay_proto::metrics::DATA_PLANE_CONNECTED, "node_id" => self.node.clone()).set(0.0);
        // Not this replica's to say once the stream is gone (the data plane may be on another).
        metrics::gauge!(relay_proto::metrics::DATA_PLANE_CONFIG_LAG_REVISIONS, "node_id" => self.node.clone()).set(0.0);
    }
}

struct StreamGauge;
impl StreamGauge {
    fn new() -> Self {
        metrics::gauge!(relay_proto::metrics::WATCH_STREAMS).increment(1.0);
        StreamGauge
    }
}
impl Drop for StreamGauge {
    fn drop(&mut self) {
        metrics::gauge!(relay_proto::metrics::WATCH_STREAMS).decrement(1.0);
    }
}

/// Records data-plane state off the Watch streams' path: a stream never waits
/// for the database. Events queue in order; a writer task drains them in
/// batches and, per node, keeps only the last of consecutive ACKs, and records
/// each batch in one transaction (ten thousand data planes ACKing one change
/// cost one commit, not a wait each).
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

/// The most Watch events recorded in one transaction.
const MAX_RECORD_BATCH: usize = 20_000;

async fn write_proxy_states(store: DynStore, mut rx: mpsc::UnboundedReceiver<(String, String, ProxyEvent)>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_RECORD_BATCH {
            let Ok(more) = rx.try_recv() else { break };
            batch.push(more);
        }
        // Drop an ACK when the next event of the same node is also an ACK.
        let mut keep = vec![true; batch.len()];
        let mut next_is_ack: std::collections::HashMap<&str, bool> = std::collections::HashMap::new();
        for i in (0..batch.len()).rev() {
            let (node, _, ev) = &batch[i];
            let is_ack = matches!(ev, ProxyEvent::Acked { .. });
            if is_ack && next_is_ack.get(node.as_str()) == Some(&true) {
                keep[i] = false;
            }
            next_is_ack.insert(node.as_str(), is_ack);
        }
        let batch: Vec<_> = batch
            .into_iter()
            .zip(keep)
            .filter_map(|(r, keep)| keep.then_some(r))
            .collect();
        // One transaction per batch; when it fails, each event on its own, so that one event the
        // store refuses costs only its own record.
        if store.record_proxies(&batch).await.is_err() {
            for (node, replica, ev) in batch {
                if let Err(e) = store.record_proxy(&node, &replica, ev).await {
                    tracing::warn!(node_id = %node, error = %e, "cannot record data-plane state");
                }
            }
        }
    }
}

struct StreamParts {
    inbound: Streaming<pb::WatchRequest>,
    identity: super::identity::NodeIdentity,
    tx: mpsc::Sender<Result<pb::ConfigUpdate, Status>>,
    published: watch::Receiver<Arc<Published>>,
    recorder: ProxyRecorder,
    replica: String,
    store: DynStore,
    live: LiveNodes,
    closing: super::Closing,
    auth: super::auth::StreamAuth,
}

async fn run_stream(s: StreamParts) {
    let StreamParts {
        mut inbound,
        identity,
        tx,
        mut published,
        recorder,
        replica,
        store,
        live,
        mut closing,
        mut auth,
    } = s;
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
    let (_claim, mut replaced) = match live.claim(&node, &hello.instance_id) {
        Ok(c) => c,
        Err(status) => {
            tracing::warn!(node_id = %node, "data plane refused: its node id is already connected from another process");
            let _ = tx.send(Err(status)).await;
            return;
        }
    };
    let mut held: Held = hello.held.as_ref().map(|v| (to_model(v), hello.held_hash.clone()));
    tracing::info!(node_id = %node, held = ?held.as_ref().map(|h| h.0), build = %hello.build_version, "data plane connected");
    recorder.record(
        &node,
        &replica,
        ProxyEvent::Connected {
            build_version: hello.build_version.clone(),
            held: held.as_ref().map(|h| h.0),
        },
    );
    if let Some((v, _)) = &held {
        let head = published.borrow().snapshot.version;
        if later(*v, head) {
            check_rewound(&store, *v).await;
        }
    }

    // The update awaiting an answer: (nonce, version, content hash, full).
    let mut in_flight: Option<(String, Version, String, bool)> = None;
    let mut nacked: Option<Version> = None;
    let mut nacking = NackingGauge::default();
    let mut node_gauges = NodeGauges::new(&node);
    let mut rejected: Vec<pb::RejectedResource> = Vec::new();
    // The first answer goes out at once, even when the data plane is current
    // (then it is an empty delta), unless it is ahead of this replica.
    let mut first = true;
    let mut seen = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_millis(crate::model::PROXY_SEEN_EVERY_MS as u64),
        Duration::from_millis(crate::model::PROXY_SEEN_EVERY_MS as u64),
    );
    seen.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if in_flight.is_none() {
            let p = published.borrow_and_update().clone();
            let head = p.snapshot.version;
            node_gauges.lag(head, held.as_ref().map(|h| h.0));
            if !auth.valid_at(&p.snapshot) {
                // Revoked (or re-roled) at or before this head: nothing more goes out.
                let _ = tx.send(Err(auth.revoked().await)).await;
                break;
            }
            if should_send(&held, &p, first) && nacked != Some(head) {
                let u = build_update(&p, &held);
                in_flight = Some((u.nonce.clone(), head, p.snapshot.hash.clone(), u.full));
                metrics::counter!(relay_proto::metrics::CONFIG_UPDATES_SENT_TOTAL, "kind" => if u.full { "full" } else { "delta" })
                    .increment(1);
                let span = tracing::info_span!(
                    "watch update",
                    otel.name = "config.push",
                    node_id = %node,
                    relay.config.version = %head,
                    relay.config.full = in_flight.as_ref().is_some_and(|f| f.3),
                );
                if tx.send(Ok(u)).instrument(span).await.is_err() {
                    break;
                }
            }
            first = false;
        }
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(pb::WatchRequest { kind: Some(pb::watch_request::Kind::Ack(a)) })) => {
                    match in_flight.take() {
                        Some((nonce, v, hash, _)) if nonce == a.nonce => {
                            let applied = a.version.as_ref().map(to_model).unwrap_or(v);
                            let hash = if applied == v { hash } else { String::new() };
                            held = Some((applied, hash));
                            nacked = None;
                            nacking.set(false);
                            if a.rejected != rejected {
                                for x in a.rejected.iter().filter(|x| !rejected.contains(x)) {
                                    let r = x.r#ref.clone().unwrap_or_default();
                                    tracing::warn!(node_id = %node, id = %r.id, error = %x.error, "data plane took a resource out of service");
                                }
                                metrics::counter!(relay_proto::metrics::CONFIG_REJECTED_RESOURCES_TOTAL).increment(a.rejected.len() as u64);
                                rejected = a.rejected.clone();
                            }
                            recorder.record(&node, &replica, ProxyEvent::Acked {
                                version: applied,
                                rejected: a.rejected.iter().map(rejected_to_model).collect(),
                            });
                        }
                        other => {
                            in_flight = other;
                            tracing::debug!(node_id = %node, "stale ACK ignored");
                        }
                    }
                }
                Ok(Some(pb::WatchRequest { kind: Some(pb::watch_request::Kind::Nack(n)) })) => {
                    match in_flight.take() {
                        Some((nonce, v, _, full)) if nonce == n.nonce => {
                            let diverged = n.reason == pb::NackReason::Diverged as i32 && !full;
                            if diverged {
                                // The delta did not reproduce the config: a full snapshot, at once.
                                tracing::info!(node_id = %node, version = %v, error = %n.error, "data plane diverged; sending a full snapshot");
                                metrics::counter!(relay_proto::metrics::CONFIG_NACKS_TOTAL, "reason" => "diverged").increment(1);
                                held = None;
                            } else {
                                tracing::warn!(node_id = %node, version = %v, error = %n.error, "data plane rejected config; it keeps serving its last one");
                                metrics::counter!(relay_proto::metrics::CONFIG_NACKS_TOTAL, "reason" => "invalid").increment(1);
                                nacked = Some(v);
                                nacking.set(true);
                                held = match (n.serving.as_ref().map(to_model), held.take()) {
                                    (Some(s), Some((h, hash))) if s == h => Some((h, hash)),
                                    (s, _) => s.map(|s| (s, String::new())),
                                };
                            }
                            recorder.record(&node, &replica, ProxyEvent::Nacked {
                                version: v,
                                serving: n.serving.as_ref().map(to_model),
                                error: n.error.chars().take(2000).collect(),
                            });
                        }
                        other => {
                            in_flight = other;
                            tracing::debug!(node_id = %node, "stale NACK ignored");
                        }
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
            _ = async { replaced.wait_for(|r| *r).await.map(|_| ()) } => {
                // The newer stream has recorded itself as connected already.
                tracing::info!(node_id = %node, "a newer stream of the same data plane replaced this one");
                node_gauges.replaced = true;
                return;
            }
            _ = super::closed(&mut closing) => {
                let _ = tx.send(Err(super::shutting_down())).await;
                break;
            }
            status = auth.revoked() => {
                tracing::warn!(node_id = %node, "closing the config stream: its token was revoked");
                let _ = tx.send(Err(status)).await;
                break;
            }
            _ = seen.tick() => recorder.record(&node, &replica, ProxyEvent::Seen),
            _ = tx.closed() => break,
        }
    }
    tracing::info!(node_id = %node, "data plane disconnected");
    recorder.record(&node, &replica, ProxyEvent::Disconnected);
}

fn rejected_to_model(x: &pb::RejectedResource) -> crate::model::Rejected {
    let r = x.r#ref.clone().unwrap_or_default();
    crate::model::Rejected {
        kind: super::convert::resource_kind_from_pb(r.kind).into(),
        id: r.id.chars().take(200).collect(),
        error: x.error.chars().take(500).collect(),
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::ConfigUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl ConfigDiscovery for DiscoveryService {
    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<Streaming<pb::WatchRequest>>) -> Result<Response<WatchStream>, Status> {
        let (_, stream_auth) = self.auth.check_stream(req.metadata(), Need::DataPlane).await?;
        let identity = self.auth.node_identity(&req);
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(run_stream(StreamParts {
            inbound: req.into_inner(),
            identity,
            tx,
            published: self.published.clone(),
            recorder: self.recorder.clone(),
            replica: self.replica.clone(),
            store: self.store.clone(),
            live: self.live.clone(),
            closing: self.closing.clone(),
            auth: stream_auth,
        }));
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
            super::convert::health_from_pb(st.health).ok_or_else(|| Status::invalid_argument("health is required"))?;
        let account = self
            .store
            .get_account(&st.account_id)
            .await?
            .ok_or_else(|| Status::not_found(format!("account {} not found", st.account_id)))?;
        let stale = || async {
            let head = self.store.head().await?;
            Ok::<_, Status>(Response::new(pb::AccountStateAck {
                applied: false,
                version: Some(version_pb(head)),
            }))
        };
        if st.reset_generation < account.reset_generation {
            // Seen before an operator cleared the account: the reset wins.
            metrics::counter!(relay_proto::metrics::ACCOUNT_STATE_REPORTS_IGNORED_TOTAL, "reason" => "before_reset")
                .increment(1);
            return stale().await;
        }
        let now = crate::model::now_ms();
        let existing = self
            .store
            .list_account_states()
            .await?
            .into_iter()
            .find(|s| s.account_id == st.account_id && s.scope == st.scope);
        // Many data planes report the same limit: only a material change is applied.
        let known = existing.as_ref().is_some_and(|e| {
            let live = e.until == 0 || e.until > now;
            live && e.health == health && (e.until == 0 || (st.until_ms != 0 && st.until_ms <= e.until + 1000))
        });
        if known {
            return stale().await;
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
            action: crate::config::ACTION_ACCOUNT_STATE.into(),
            target: st.account_id.clone(),
            detail: serde_json::json!({
                "health": health.as_str(), "scope": row.scope, "until_ms": row.until, "reason": row.reason,
            })
            .to_string(),
        };
        // The generation check again, in the write's transaction: a reset
        // committed since the check above wins.
        let guard = crate::model::Mutation::RequireResetGeneration {
            account_id: st.account_id.clone(),
            at_most: st.reset_generation,
        };
        let write = vec![guard, crate::model::Mutation::SetAccountState(row)];
        let v = match crate::config::apply_state_write(&self.store, write, audit).await {
            Ok(v) => v,
            Err(crate::store::StoreError::Conflict { .. }) => {
                metrics::counter!(relay_proto::metrics::ACCOUNT_STATE_REPORTS_IGNORED_TOTAL, "reason" => "before_reset").increment(1);
                return stale().await;
            }
            Err(e) => return Err(e.into()),
        };
        metrics::counter!(relay_proto::metrics::ACCOUNT_STATE_CHANGES_TOTAL, "health" => health.as_str()).increment(1);
        Ok(Response::new(pb::AccountStateAck {
            applied: true,
            version: Some(version_pb(v)),
        }))
    }

    async fn report_quotas(&self, req: Request<pb::QuotaReport>) -> Result<Response<pb::QuotaReportAck>, Status> {
        self.auth.check(req.metadata(), Need::DataPlane).await?;
        let identity = self.auth.node_identity(&req);
        let r = req.into_inner();
        identity.check(&r.node_id)?;
        if r.quotas.len() > MAX_QUOTAS_PER_REPORT {
            return Err(Status::invalid_argument(format!(
                "a quota report carries at most {MAX_QUOTAS_PER_REPORT} accounts"
            )));
        }
        let now = crate::model::now_ms();
        // An observation from the future (a skewed clock) would never be replaced: cap it at now.
        let rows: Vec<_> = r
            .quotas
            .iter()
            .map(|q| {
                let mut row = super::quota::from_pb(q, &r.node_id);
                row.observed_at = row.observed_at.min(now);
                row
            })
            .collect();
        self.store.upsert_quotas(&rows).await?;
        let fleet = self.store.list_quotas().await?;
        if let Ok(accounts) = self.store.list_accounts().await {
            let names: HashMap<String, String> = accounts.into_iter().map(|a| (a.id, a.name)).collect();
            super::quota::export(&fleet, |id| names.get(id).cloned(), now);
        }
        Ok(Response::new(pb::QuotaReportAck {
            fleet: fleet.iter().map(super::quota::to_pb).collect(),
        }))
    }
}

/// Most accounts one quota report may carry.
const MAX_QUOTAS_PER_REPORT: usize = 10_000;
