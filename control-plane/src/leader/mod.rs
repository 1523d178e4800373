//! Leader election for the control plane's singleton jobs (usage retention, OAuth token refresh):
//! several replicas share one store, and such a job must run on exactly one of them.
//!
//! Every replica has one [`Leadership`]. Which mechanism elects the leader depends on the
//! deployment: an etcd lease (`etcd`, when `--etcd-endpoints` is given), a Postgres session
//! advisory lock (`pg_lock`, Postgres without etcd), or none (`local`: the standalone control plane
//! on its embedded store is always the leader). Whatever the mechanism, a replica that wins records
//! it in the store with [`Store::claim_term`](crate::store::Store::claim_term), which returns a new,
//! higher *term*. A leader's writes carry its term (`Mutation::CheckTerm` first in the `apply`), so
//! a replica that lost leadership without noticing (paused by GC or a VM freeze, partitioned) has
//! its writes refused with `StoreError::Fenced` once a new leader has claimed a term: the election
//! keeps two leaders apart in time as well as it can (a leader steps down before its lease can
//! expire), and the term makes the rare overlap harmless for fenced writes.
//!
//! [`run_while_leading`] runs a job exactly while this replica leads: started on each win with the
//! term, aborted the moment the role changes.

pub mod etcd;
pub mod local;
pub mod pg_lock;

use crate::store::StoreError;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use etcd::{EtcdCredentials, EtcdOptions, EtcdTls};

/// This replica's part in the election.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Another replica leads (`leader`: its name when known), or nobody can be known to.
    Following { leader: Option<String> },
    /// This replica leads since `since_ms`; its writes carry `term`.
    Leading { term: u64, since_ms: i64 },
}

impl Role {
    /// The term when leading.
    pub fn term(&self) -> Option<u64> {
        match self {
            Role::Leading { term, .. } => Some(*term),
            Role::Following { .. } => None,
        }
    }

    pub fn is_leading(&self) -> bool {
        self.term().is_some()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("invalid etcd endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("leader election: {0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Sets the role seen by [`Leadership`]: logs and counts transitions, keeps the gauge.
pub(crate) struct RoleSink {
    tx: Arc<watch::Sender<Role>>,
    /// Set when the process shuts down: stepping down then is the plan, not a warning.
    stopping: Arc<AtomicBool>,
    mechanism: &'static str,
    replica: String,
}

impl RoleSink {
    pub(crate) fn set(&self, role: Role) {
        let mut was_leading = false;
        let changed = self.tx.send_if_modified(|cur| {
            if *cur == role {
                return false;
            }
            was_leading = cur.is_leading();
            *cur = role.clone();
            true
        });
        if !changed {
            return;
        }
        if was_leading != role.is_leading() {
            metrics::counter!(relay_proto::metrics::LEADER_TRANSITIONS_TOTAL).increment(1);
            metrics::gauge!(relay_proto::metrics::LEADER_IS_LEADER).set(if role.is_leading() { 1.0 } else { 0.0 });
            // Who leads: the leader's own series says 1, with its replica name.
            metrics::gauge!(relay_proto::metrics::LEADER_INFO, "replica" => self.replica.clone())
                .set(if role.is_leading() { 1.0 } else { 0.0 });
        }
        match &role {
            Role::Leading { term, .. } => {
                tracing::info!(replica = %self.replica, mechanism = self.mechanism, term, "leading")
            }
            Role::Following { .. } if was_leading && self.stopping.load(Ordering::SeqCst) => tracing::info!(
                replica = %self.replica,
                mechanism = self.mechanism,
                "stepped down: shutting down"
            ),
            Role::Following { leader } if was_leading => tracing::warn!(
                replica = %self.replica,
                mechanism = self.mechanism,
                leader = leader.as_deref().unwrap_or("unknown"),
                "stepped down: no longer the leader"
            ),
            Role::Following { leader } => tracing::info!(
                replica = %self.replica,
                mechanism = self.mechanism,
                leader = leader.as_deref().unwrap_or("unknown"),
                "following"
            ),
        }
    }
}

impl Drop for RoleSink {
    fn drop(&mut self) {
        // The coordinator is gone: this replica leads no more.
        self.set(Role::Following { leader: None });
    }
}

struct Inner {
    mechanism: &'static str,
    /// Shared with the sink: the process is shutting down.
    stopping: Arc<AtomicBool>,
    replica: String,
    rx: watch::Receiver<Role>,
    /// Keeps the role channel open while any `Leadership` lives (standalone has no task).
    _tx: Arc<watch::Sender<Role>>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
    /// Standalone's sink (no coordinator task owns it).
    sink: Mutex<Option<RoleSink>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last `Leadership` is gone: the process is stopping, whatever the sink logs next.
        self.stopping.store(true, Ordering::SeqCst);
        if let Ok(mut t) = self.task.lock() {
            if let Some(t) = t.take() {
                t.abort();
            }
        }
    }
}

/// This replica's view of the election; cheap to clone. Dropping the last clone stops the
/// coordinator without releasing anything (its lease expires; use [`Leadership::shutdown`] to hand
/// over at once).
#[derive(Clone)]
pub struct Leadership {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership")
            .field("mechanism", &self.inner.mechanism)
            .field("replica", &self.inner.replica)
            .field("role", &self.role())
            .finish()
    }
}

/// What a coordinator task gets: where to publish the role, and when to stop.
pub(crate) struct Coordinator {
    pub(crate) sink: RoleSink,
    pub(crate) stop: watch::Receiver<bool>,
}

impl Leadership {
    /// A `Leadership` whose role a coordinator task (from `spawn`) drives; `None` for standalone,
    /// whose role is set once through the returned sink.
    pub(crate) fn build<Fut>(mechanism: &'static str, replica: &str, spawn: impl FnOnce(Coordinator) -> Fut) -> Self
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = watch::channel(Role::Following { leader: None });
        let tx = Arc::new(tx);
        let (stop_tx, stop_rx) = watch::channel(false);
        let stopping = Arc::new(AtomicBool::new(false));
        let sink = RoleSink {
            tx: tx.clone(),
            stopping: stopping.clone(),
            mechanism,
            replica: replica.to_string(),
        };
        let task = tokio::spawn(spawn(Coordinator { sink, stop: stop_rx }));
        Self {
            inner: Arc::new(Inner {
                mechanism,
                replica: replica.to_string(),
                stopping,
                rx,
                _tx: tx,
                stop: stop_tx,
                task: Mutex::new(Some(task)),
                sink: Mutex::new(None),
            }),
        }
    }

    /// A `Leadership` without a coordinator task, leading with `term` for good.
    pub(crate) fn fixed(mechanism: &'static str, replica: &str, term: u64, since_ms: i64) -> Self {
        let (tx, rx) = watch::channel(Role::Following { leader: None });
        let tx = Arc::new(tx);
        let stopping = Arc::new(AtomicBool::new(false));
        let sink = RoleSink {
            tx: tx.clone(),
            stopping: stopping.clone(),
            mechanism,
            replica: replica.to_string(),
        };
        sink.set(Role::Leading { term, since_ms });
        let (stop, _) = watch::channel(false);
        Self {
            inner: Arc::new(Inner {
                mechanism,
                replica: replica.to_string(),
                stopping,
                rx,
                _tx: tx,
                stop,
                task: Mutex::new(None),
                sink: Mutex::new(Some(sink)),
            }),
        }
    }

    /// This replica's role now.
    pub fn role(&self) -> Role {
        self.inner.rx.borrow().clone()
    }

    /// Every role change from now on (the current role is marked seen).
    pub fn subscribe(&self) -> watch::Receiver<Role> {
        let mut rx = self.inner.rx.clone();
        rx.borrow_and_update();
        rx
    }

    /// "etcd", "postgres-advisory-lock" or "standalone".
    pub fn mechanism(&self) -> &'static str {
        self.inner.mechanism
    }

    /// This replica's name, as the leader record names it.
    pub fn replica(&self) -> &str {
        &self.inner.replica
    }

    /// Steps down and hands over at once (revokes the etcd lease, releases the advisory lock),
    /// then stops the coordinator. The role is `Following` afterwards.
    pub async fn shutdown(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        let _ = self.inner.stop.send(true);
        let task = self.inner.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
        // A fixed leader (standalone) steps down here too, before the process says it stopped.
        let sink = self.inner.sink.lock().ok().and_then(|mut s| s.take());
        drop(sink);
    }
}

/// Sleeps `d`, or less when asked to stop.
pub(crate) async fn wait(stop: &mut watch::Receiver<bool>, d: std::time::Duration) {
    if *stop.borrow() {
        return;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = stop.changed() => {}
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs `f(term)` while this replica leads: started whenever it becomes leader, dropped (aborted)
/// the moment the role changes, started again with the new term on the next win. A job that ends
/// by itself is not restarted within the same term. Abort the returned handle to stop for good.
pub fn run_while_leading<F, Fut>(leadership: &Leadership, job: &'static str, f: F) -> JoinHandle<()>
where
    F: Fn(u64) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut rx = leadership.subscribe();
    tokio::spawn(async move {
        loop {
            let term = rx.borrow_and_update().term();
            let running = term.map(|term| {
                tracing::info!(job, term, "leader job starting");
                AbortOnDrop(tokio::spawn(f(term)))
            });
            // Until the role moves away from this term.
            loop {
                if rx.changed().await.is_err() {
                    if running.is_some() {
                        tracing::info!(job, "leader job stopped: the coordinator is gone");
                    }
                    return;
                }
                if rx.borrow_and_update().term() != term {
                    break;
                }
            }
            if let (Some(running), Some(term)) = (running, term) {
                drop(running);
                tracing::info!(job, term, "leader job stopped: leadership changed");
            }
        }
    })
}
