//! The `UsageIngest.Report` client: streams the spool to the control plane.
//!
//! One bidirectional stream per connection. Batches (up to `batch_max`
//! events, lingering up to `linger` to fill one) are read from the spool in
//! seq order and fed through an mpsc channel into the request stream; up to
//! `max_in_flight` batches await their ACK. The control plane ACKs each batch,
//! in order, once it is committed; the reporter then calls
//! [`Spool::ack_through`] with the highest seq of that batch. That is the only
//! way events leave the spool.
//!
//! Any error (connect, RPC status, stream end, an ACK out of order) drops the
//! stream; the reporter reconnects with jittered exponential backoff and
//! resends everything not ACKed, from [`Spool::first_unacked_seq`] on. The
//! control plane absorbs duplicates by event id, so delivery is at-least-once
//! and storage exactly-once. An outage is logged once at `error` (with the
//! pending count) and once more at `info` when it ends; retries in between
//! log at `debug`.
//!
//! On shutdown the reporter drains: it keeps sending, without lingering,
//! until the spool is empty or the drain deadline passes. What is left stays
//! in the spool for the next start.
//!
//! The client is built by the caller's `connect` factory, so the transport
//! (TLS, timeouts) is the caller's choice: [`usage_client`] wraps a channel
//! with the data-plane [`BearerToken`], and [`connector`] makes a factory from
//! an [`Endpoint`].
//!
//! Metrics: `relay_usage_batches_total{outcome=acked|failed}`,
//! `relay_usage_report_seconds` (send → ACK), and the
//! `relay_usage_spool_oldest_age_seconds` gauge, refreshed every second.

use super::spool::Spool;
use relay_proto::v1::usage_ingest_client::UsageIngestClient;
use relay_proto::v1::{BatchAck, UsageBatch};
use std::collections::VecDeque;
use std::fmt::Display;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::errors::InvalidMetadataValue;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

/// First retry delay; doubled per failure up to `backoff_max`.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The control plane refuses larger batches (`api::usage::MAX_BATCH` there).
pub const MAX_BATCH_EVENTS: usize = 10_000;

#[derive(Debug, Clone)]
pub struct ReporterConfig {
    /// Sent in every batch (events carry their own too).
    pub node_id: String,
    /// Most events per batch (clamped to [`MAX_BATCH_EVENTS`]).
    pub batch_max: usize,
    /// How long to wait for a partial batch to fill before sending it.
    pub linger: Duration,
    /// Batches sent and not yet ACKed.
    pub max_in_flight: usize,
    /// Ceiling of the reconnect backoff.
    pub backoff_max: Duration,
}

impl ReporterConfig {
    /// The defaults: 500 events per batch, 20 ms linger, 4 batches in flight,
    /// backoff up to 30 s.
    pub fn new(node_id: impl Into<String>) -> Self {
        Self {
            node_id: node_id.into(),
            batch_max: 500,
            linger: Duration::from_millis(20),
            max_in_flight: 4,
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// Adds `authorization: Bearer <data-plane token>` to every call.
#[derive(Clone)]
pub struct BearerToken(MetadataValue<Ascii>);

impl BearerToken {
    pub fn new(token: &str) -> Result<Self, InvalidMetadataValue> {
        let mut v = MetadataValue::try_from(format!("Bearer {token}"))?;
        v.set_sensitive(true);
        Ok(Self(v))
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(..)")
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// The authenticated `UsageIngest` client the reporter drives.
pub type UsageClient = UsageIngestClient<InterceptedService<Channel, BearerToken>>;

/// Wraps a connected channel with the data-plane token.
pub fn usage_client(channel: Channel, token: BearerToken) -> UsageClient {
    UsageIngestClient::with_interceptor(channel, token)
}

/// Why a connection failed, with its causes (tonic's own Display says only "transport error").
#[derive(Debug)]
pub struct ConnectError(String);

impl Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A boxed connection attempt, as [`connector`] returns.
pub type ConnectFuture = Pin<Box<dyn Future<Output = Result<UsageClient, ConnectError>> + Send>>;

/// A `connect` factory for [`run_reporter`]: each call opens a new
/// connection to `endpoint` (configure TLS and timeouts on it).
pub fn connector(endpoint: Endpoint, token: BearerToken) -> impl Fn() -> ConnectFuture + Send + Sync + 'static {
    move || {
        let endpoint = endpoint.clone();
        let token = token.clone();
        Box::pin(async move {
            let channel = endpoint
                .connect()
                .await
                .map_err(|e| ConnectError(crate::proxy::error_chain(&e)))?;
            Ok(usage_client(channel, token))
        })
    }
}

/// A `connect` factory for [`run_reporter`] over a [`super::watch::ControlPlaneLink`]: each call
/// connects to the replica that answered last, else the next one listed.
pub fn link_connector(
    link: super::watch::ControlPlaneLink,
    token: BearerToken,
) -> impl Fn() -> ConnectFuture + Send + Sync + 'static {
    move || {
        let link = link.clone();
        let token = token.clone();
        Box::pin(async move {
            let channel = link
                .connect()
                .await
                .map_err(|e| ConnectError(crate::proxy::error_chain(&e)))?;
            Ok(usage_client(channel, token))
        })
    }
}

/// Streams `spool` to the control plane until `shutdown` becomes true (or its
/// sender is dropped), then drains for at most `drain_deadline`. `connect`
/// is called for every (re)connection; its error is only logged.
pub async fn run_reporter<F, Fut, E>(
    spool: Arc<Spool>,
    connect: F,
    cfg: ReporterConfig,
    mut shutdown: watch::Receiver<bool>,
    drain_deadline: Duration,
) where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<UsageClient, E>>,
    E: Display,
{
    let _age = AbortOnDrop(tokio::spawn(age_gauge(spool.clone())));
    let cfg = ReporterConfig {
        batch_max: cfg.batch_max.clamp(1, MAX_BATCH_EVENTS),
        max_in_flight: cfg.max_in_flight.max(1),
        backoff_max: cfg.backoff_max.max(BACKOFF_MIN),
        ..cfg
    };
    let mut phase = Phase::Running;
    let mut health = Health::new(cfg.backoff_max);
    loop {
        if let Phase::Draining(deadline) = phase {
            let pending = spool.depth();
            if pending == 0 {
                tracing::info!("usage spool drained");
                return;
            }
            if Instant::now() >= deadline {
                deadline_passed(pending);
                return;
            }
        }

        let attempt = connect();
        tokio::pin!(attempt);
        let connected = loop {
            tokio::select! {
                r = &mut attempt => break r,
                () = stop_signal(&mut shutdown, phase) => {
                    // Still connecting and nothing to send: no reason to wait for the control plane.
                    if spool.depth() == 0 {
                        tracing::info!("usage spool drained");
                        return;
                    }
                    if !phase.advance(drain_deadline) {
                        deadline_passed(spool.depth());
                        return;
                    }
                }
            }
        };
        let result = match connected {
            Ok(client) => {
                session(
                    &spool,
                    client,
                    &cfg,
                    &mut shutdown,
                    &mut phase,
                    drain_deadline,
                    &mut health,
                )
                .await
            }
            Err(e) => Err(SessionError::Connect(e.to_string())),
        };
        match result {
            Ok(End::Drained) => {
                tracing::info!("usage spool drained");
                return;
            }
            Ok(End::Deadline) => {
                deadline_passed(spool.depth());
                return;
            }
            Err(e) => health.failed(&e, spool.depth()),
        }

        let wait = health.next_backoff();
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop_signal(&mut shutdown, phase) => {
                if !phase.advance(drain_deadline) {
                    deadline_passed(spool.depth());
                    return;
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Running,
    /// Shut down: drain until this instant.
    Draining(Instant),
}

impl Phase {
    /// Called when [`stop_signal`] fired. Returns false when the drain
    /// deadline has passed (time to stop).
    fn advance(&mut self, drain_deadline: Duration) -> bool {
        match *self {
            Phase::Running => {
                tracing::info!(deadline = ?drain_deadline, "shutting down: draining the usage spool");
                *self = Phase::Draining(Instant::now() + drain_deadline);
                true
            }
            Phase::Draining(_) => false,
        }
    }
}

/// Resolves when shutdown is asked for (Running) or the drain deadline
/// passes (Draining).
async fn stop_signal(shutdown: &mut watch::Receiver<bool>, phase: Phase) {
    match phase {
        // A dropped sender counts as shutdown: nobody could ask for it any more.
        Phase::Running => {
            let _ = shutdown.wait_for(|stop| *stop).await;
        }
        Phase::Draining(deadline) => tokio::time::sleep_until(deadline).await,
    }
}

#[derive(Debug)]
enum End {
    /// Shut down and the spool is empty.
    Drained,
    /// Shut down and the drain deadline passed.
    Deadline,
}

/// The drain deadline passed: a warning when usage stays spooled, none when nothing was left.
fn deadline_passed(pending: u64) {
    if pending == 0 {
        tracing::info!("usage spool drained");
    } else {
        tracing::warn!(
            pending,
            "usage drain deadline passed; the rest stays spooled for the next start"
        );
    }
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("usage stream failed: {0}")]
    Rpc(#[from] Status),
    #[error("the control plane closed the usage stream")]
    Closed,
    #[error("ACK for batch {got} while batch {expected:?} was the oldest in flight")]
    OutOfOrder { expected: Option<u64>, got: u64 },
}

struct InFlight {
    batch_id: u64,
    max_seq: u64,
    events: usize,
    sent: Instant,
}

/// One stream: send batches, handle ACKs, until an error or the end of a drain.
async fn session(
    spool: &Arc<Spool>,
    mut client: UsageClient,
    cfg: &ReporterConfig,
    shutdown: &mut watch::Receiver<bool>,
    phase: &mut Phase,
    drain_deadline: Duration,
    health: &mut Health,
) -> Result<End, SessionError> {
    let (tx, rx) = mpsc::channel::<UsageBatch>(cfg.max_in_flight);
    let call = client.report(ReceiverStream::new(rx));
    tokio::pin!(call);
    let mut acks = loop {
        tokio::select! {
            r = &mut call => break r?.into_inner(),
            () = stop_signal(shutdown, *phase) => {
                if !phase.advance(drain_deadline) {
                    return Ok(End::Deadline);
                }
            }
        }
    };
    if spool.depth() == 0 {
        health.recovered(0);
    }

    // Resend everything not ACKed.
    let mut cursor = spool.first_unacked_seq().map_or(0, |s| s.saturating_sub(1));
    let mut in_flight: VecDeque<InFlight> = VecDeque::new();
    let mut next_batch_id = 1u64;
    let mut linger_until: Option<Instant> = None;
    let result = loop {
        let draining = matches!(phase, Phase::Draining(_));
        if draining && in_flight.is_empty() && spool.depth() == 0 {
            break Ok(End::Drained);
        }

        // Armed before reading, so no append between the two is missed.
        let wake = spool.notified();
        while in_flight.len() < cfg.max_in_flight {
            let events = spool.read_after(cursor, cfg.batch_max);
            let Some(&(max_seq, _)) = events.last() else {
                linger_until = None;
                break;
            };
            if events.len() < cfg.batch_max && !draining && !cfg.linger.is_zero() {
                let until = *linger_until.get_or_insert_with(|| Instant::now() + cfg.linger);
                if Instant::now() < until {
                    break;
                }
            }
            linger_until = None;
            let batch_id = next_batch_id;
            next_batch_id += 1;
            let count = events.len();
            let batch = UsageBatch {
                batch_id,
                node_id: cfg.node_id.clone(),
                events: events.into_iter().map(|(_, e)| e).collect(),
                oldest_unacked_age_ms: spool
                    .oldest_unacked_ms()
                    .map_or(0, |ts| (chrono::Utc::now().timestamp_millis() - ts).max(0) as u64),
            };
            // Cannot be full: the channel holds max_in_flight and fewer are unACKed.
            if tx.try_send(batch).is_err() {
                break;
            }
            cursor = max_seq;
            in_flight.push_back(InFlight {
                batch_id,
                max_seq,
                events: count,
                sent: Instant::now(),
            });
        }
        if tx.is_closed() {
            break Err(SessionError::Closed);
        }

        let room = in_flight.len() < cfg.max_in_flight;
        let linger = linger_until.filter(|_| room);
        tokio::select! {
            msg = acks.message() => match msg {
                Ok(Some(ack)) => {
                    if let Err(e) = on_ack(spool, &mut in_flight, &ack).await {
                        break Err(e);
                    }
                    health.recovered(spool.depth());
                }
                Ok(None) => break Err(SessionError::Closed),
                Err(status) => break Err(SessionError::Rpc(status)),
            },
            () = wake, if room => {}
            () = sleep_until_opt(linger), if linger.is_some() => {}
            () = stop_signal(shutdown, *phase) => {
                if !phase.advance(drain_deadline) {
                    break Ok(End::Deadline);
                }
            }
        }
    };
    if result.is_err() && !in_flight.is_empty() {
        metrics::counter!(relay_proto::metrics::USAGE_BATCHES_TOTAL, "outcome" => "failed")
            .increment(in_flight.len() as u64);
    }
    result
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn on_ack(spool: &Arc<Spool>, in_flight: &mut VecDeque<InFlight>, ack: &BatchAck) -> Result<(), SessionError> {
    let expected = in_flight.front().map(|b| b.batch_id);
    if expected != Some(ack.batch_id) {
        return Err(SessionError::OutOfOrder {
            expected,
            got: ack.batch_id,
        });
    }
    let Some(batch) = in_flight.pop_front() else {
        return Err(SessionError::OutOfOrder {
            expected,
            got: ack.batch_id,
        });
    };
    metrics::histogram!(relay_proto::metrics::USAGE_REPORT_SECONDS).record(batch.sent.elapsed().as_secs_f64());
    metrics::counter!(relay_proto::metrics::USAGE_BATCHES_TOTAL, "outcome" => "acked").increment(1);
    if ack.rejected > 0 {
        tracing::warn!(
            batch_id = ack.batch_id,
            rejected = ack.rejected,
            events = batch.events,
            "the control plane rejected usage events that can never be stored; they are dropped"
        );
    }
    tracing::trace!(
        batch_id = ack.batch_id,
        inserted = ack.inserted,
        duplicates = ack.duplicates,
        "usage batch ACKed"
    );
    // ack_through fsyncs the watermark: keep it off the async workers.
    let s = spool.clone();
    let upto = batch.max_seq;
    match tokio::task::spawn_blocking(move || s.ack_through(upto)).await {
        Ok(Ok(())) => {}
        // Already forgotten in memory; at worst a restart resends it.
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot persist the usage ACK watermark"),
        Err(e) => tracing::warn!(error = %e, "usage ACK task failed"),
    }
    Ok(())
}

/// Outage logging and the backoff.
struct Health {
    outage_since: Option<Instant>,
    backoff: Duration,
    backoff_max: Duration,
}

impl Health {
    fn new(backoff_max: Duration) -> Self {
        Self {
            outage_since: None,
            backoff: BACKOFF_MIN,
            backoff_max,
        }
    }

    fn failed(&mut self, error: &SessionError, pending: u64) {
        if self.outage_since.is_none() {
            self.outage_since = Some(Instant::now());
            let hint = super::address_hint(&error.to_string()).unwrap_or_default();
            tracing::error!(%error, hint, pending, "cannot report usage to the control plane; spooling and retrying");
        } else {
            tracing::debug!(%error, pending, "usage report retry failed");
        }
    }

    fn recovered(&mut self, pending: u64) {
        self.backoff = BACKOFF_MIN;
        if let Some(since) = self.outage_since.take() {
            tracing::info!(
                // Tenths of a second: a log line, not a measurement.
                outage_secs = (since.elapsed().as_millis() / 100) as f64 / 10.0,
                pending,
                "usage reporting to the control plane recovered"
            );
        }
    }

    /// The delay before the next attempt: uniform in [b/2, b], b doubling.
    fn next_backoff(&mut self) -> Duration {
        let b = self.backoff;
        self.backoff = (b * 2).min(self.backoff_max);
        jitter(b)
    }
}

fn jitter(d: Duration) -> Duration {
    use rand::Rng;
    let half = d / 2;
    half + half.mul_f64(rand::thread_rng().gen::<f64>())
}

async fn age_gauge(spool: Arc<Spool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let age = spool.oldest_unacked_ms().map_or(0.0, |ts| {
            (chrono::Utc::now().timestamp_millis() - ts).max(0) as f64 / 1000.0
        });
        metrics::gauge!(relay_proto::metrics::USAGE_SPOOL_OLDEST_AGE_SECONDS).set(age);
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_max() {
        let mut h = Health::new(Duration::from_secs(1));
        let mut prev_cap = Duration::ZERO;
        for _ in 0..10 {
            let cap = h.backoff;
            let d = h.next_backoff();
            assert!(d >= cap / 2 && d <= cap, "{d:?} within [{:?}, {cap:?}]", cap / 2);
            assert!(cap >= prev_cap);
            prev_cap = cap;
        }
        assert_eq!(h.backoff, Duration::from_secs(1));
        h.recovered(0);
        assert_eq!(h.backoff, BACKOFF_MIN);
    }

    #[test]
    fn bearer_token_is_sent_and_hidden() {
        use tonic::service::Interceptor;
        let mut t = BearerToken::new("rat-secret").unwrap();
        assert_eq!(format!("{t:?}"), "BearerToken(..)");
        let req = t.call(Request::new(())).unwrap();
        assert_eq!(req.metadata().get("authorization").unwrap(), "Bearer rat-secret");
        assert!(BearerToken::new("bad\ntoken").is_err());
    }
}
