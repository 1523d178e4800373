//! The usage pipeline end to end: spool → reporter → a real in-process control
//! plane (SQLite) → storage, checked through `Store::query_usage`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{Backend, ControlPlane, DP_TOKEN};
use relay_control_plane::model::UsageQuery;
use relay_control_plane::store::DynStore;
use relay_data_plane::control::report::{connector, run_reporter, BearerToken, ReporterConfig};
use relay_data_plane::control::spool::Spool;
use relay_proto::v1::UsageEvent;
use relay_test_support::wait_for;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Endpoint;

const WAIT: Duration = Duration::from_secs(30);

/// (events stored, sum of their input tokens).
async fn stored(store: &DynStore) -> (u64, u64) {
    let rows = store.query_usage(UsageQuery::default()).await.unwrap();
    rows.iter()
        .fold((0, 0), |(n, t), r| (n + r.requests, t + r.input_tokens))
}

/// Event `i` carries `i` input tokens, so the stored sum proves which ones arrived.
fn event(i: u64) -> UsageEvent {
    UsageEvent {
        event_id: uuid::Uuid::now_v7().to_string(),
        request_id: format!("req-{i}"),
        timestamp_ms: chrono::Utc::now().timestamp_millis(),
        node_id: "dp-1".into(),
        api_key_id: "key-1".into(),
        account_id: "acc-1".into(),
        model: "claude-sonnet-4-5".into(),
        input_tokens: i,
        output_tokens: 2 * i,
        http_status: 200,
        ..UsageEvent::default()
    }
}

fn sum(range: std::ops::RangeInclusive<u64>) -> u64 {
    range.sum()
}

struct Reporter {
    task: JoinHandle<()>,
    stop: watch::Sender<bool>,
}

fn start_reporter(spool: &Arc<Spool>, port: u16, drain_deadline: Duration) -> Reporter {
    let endpoint = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2));
    let connect = connector(endpoint, BearerToken::new(DP_TOKEN).unwrap());
    let cfg = ReporterConfig {
        batch_max: 100,
        backoff_max: Duration::from_millis(200),
        ..ReporterConfig::new("dp-1")
    };
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(run_reporter(spool.clone(), connect, cfg, rx, drain_deadline));
    Reporter { task, stop }
}

async fn append_all(spool: &Arc<Spool>, range: std::ops::RangeInclusive<u64>) {
    // Concurrent appenders, as the proxy's request tasks are.
    let tasks: Vec<_> = range
        .map(|i| {
            let s = spool.clone();
            tokio::spawn(async move { s.append(event(i)).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

async fn wait_stored(store: &DynStore, want: (u64, u64), what: &str) {
    wait_for(WAIT, what, || async {
        let got = stored(store).await;
        assert!(got.0 <= want.0, "more events stored than sent: {got:?} > {want:?}");
        (got == want).then_some(())
    })
    .await
    .unwrap();
}

async fn wait_empty(spool: &Spool) {
    wait_for(WAIT, "spool depth 0", || async { (spool.depth() == 0).then_some(()) })
        .await
        .unwrap();
}

fn spool_in(dir: &Path) -> Arc<Spool> {
    Arc::new(Spool::open(dir).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_events_stored_exactly_once() {
    let cp = ControlPlane::start(Backend::Sqlite).await;
    let port = cp.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let spool = spool_in(dir.path());
    let reporter = start_reporter(&spool, port, Duration::from_secs(5));

    append_all(&spool, 1..=1_000).await;
    wait_stored(&cp.store, (1_000, sum(1..=1_000)), "1,000 events stored").await;
    wait_empty(&spool).await;
    assert_eq!(spool.first_unacked_seq(), None);
    assert_eq!(spool.oldest_unacked_ms(), None);

    reporter.stop.send(true).unwrap();
    tokio::time::timeout(WAIT, reporter.task).await.unwrap().unwrap();
    assert_eq!(stored(&cp.store).await, (1_000, sum(1..=1_000)));

    // ACKed means gone for good: a reopened spool resends nothing.
    drop(spool);
    assert_eq!(Spool::open(dir.path()).unwrap().depth(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_down_then_up() {
    let mut cp = ControlPlane::create(Backend::Sqlite).await;
    let port = cp.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let spool = spool_in(dir.path());
    // Nothing listens on `port` yet: the reporter retries with backoff.
    let reporter = start_reporter(&spool, port, Duration::from_secs(5));

    append_all(&spool, 1..=200).await;
    assert_eq!(
        spool.depth(),
        200,
        "nothing can be ACKed while the control plane is down"
    );
    assert!(spool.oldest_unacked_ms().is_some());

    cp.resume().await;
    wait_stored(&cp.store, (200, sum(1..=200)), "200 spooled events stored").await;
    wait_empty(&spool).await;

    reporter.stop.send(true).unwrap();
    tokio::time::timeout(WAIT, reporter.task).await.unwrap().unwrap();
    assert_eq!(stored(&cp.store).await, (200, sum(1..=200)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_plane_restart_mid_flight() {
    let cp = ControlPlane::start(Backend::Sqlite).await;
    let port = cp.addr.port();
    let dir = tempfile::tempdir().unwrap();

    let spool = spool_in(dir.path());
    let reporter = start_reporter(&spool, port, Duration::from_secs(5));
    let appender = {
        let s = spool.clone();
        tokio::spawn(async move {
            for chunk in 0..10u64 {
                append_all(&s, chunk * 100 + 1..=chunk * 100 + 100).await;
            }
        })
    };
    // Crash once some of it is stored but (most likely) not all.
    wait_for(WAIT, "some events stored", || async {
        (stored(&cp.store).await.0 > 0).then_some(())
    })
    .await
    .unwrap();
    reporter.task.abort();
    let _ = reporter.task.await;
    appender.await.unwrap();
    // Spooled after the crash of the reporter, before the process "dies".
    append_all(&spool, 1_001..=1_100).await;
    let left = spool.depth();
    assert!(left >= 100);
    eprintln!(
        "restart with {left} un-ACKed events, {} stored",
        stored(&cp.store).await.0
    );
    let weak = Arc::downgrade(&spool);
    drop(spool);
    wait_for(WAIT, "the old spool to be released", || async {
        weak.upgrade().is_none().then_some(())
    })
    .await
    .unwrap();

    // Restart: the un-ACKed events are recovered and resent, new ones follow.
    let spool = spool_in(dir.path());
    assert_eq!(spool.depth(), left, "exactly the un-ACKed events are recovered");
    let reporter = start_reporter(&spool, port, Duration::from_secs(5));
    append_all(&spool, 1_101..=1_500).await;
    wait_stored(&cp.store, (1_500, sum(1..=1_500)), "1,500 events stored").await;
    wait_empty(&spool).await;

    reporter.stop.send(true).unwrap();
    tokio::time::timeout(WAIT, reporter.task).await.unwrap().unwrap();
    assert_eq!(
        stored(&cp.store).await,
        (1_500, sum(1..=1_500)),
        "totals exact, nothing twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_the_spool() {
    let cp = ControlPlane::start(Backend::Sqlite).await;
    let port = cp.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let spool = spool_in(dir.path());

    // Appended with nothing sending them, then shutdown at once: the
    // reporter must deliver them all before it returns.
    append_all(&spool, 1..=300).await;
    let reporter = start_reporter(&spool, port, Duration::from_secs(20));
    reporter.stop.send(true).unwrap();
    tokio::time::timeout(WAIT, reporter.task).await.unwrap().unwrap();
    assert_eq!(spool.depth(), 0, "drained before returning");
    assert_eq!(stored(&cp.store).await, (300, sum(1..=300)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_control_plane_down_stops_at_the_deadline() {
    let mut cp = ControlPlane::create(Backend::Sqlite).await;
    let port = cp.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let spool = spool_in(dir.path());
    append_all(&spool, 1..=50).await;
    let reporter = start_reporter(&spool, port, Duration::from_millis(300));
    reporter.stop.send(true).unwrap();
    tokio::time::timeout(WAIT, reporter.task).await.unwrap().unwrap();
    // Nothing lost: it all waits in the spool for the next start.
    assert_eq!(spool.depth(), 50);
    drop(spool);
    let spool = spool_in(dir.path());
    assert_eq!(spool.depth(), 50);

    cp.resume().await;
    let reporter = start_reporter(&spool, port, Duration::from_secs(5));
    wait_stored(&cp.store, (50, sum(1..=50)), "50 events stored after the restart").await;
    wait_empty(&spool).await;
    reporter.stop.send(true).unwrap();
    tokio::time::timeout(WAIT, reporter.task).await.unwrap().unwrap();
}
