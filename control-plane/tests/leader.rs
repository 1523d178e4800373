//! Leader election against real servers: an etcd member (relay-test-support's, or
//! `ETCD_ENDPOINTS`) and Postgres. Short TTLs; every wait is for a condition.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use relay_control_plane::leader::{run_while_leading, EtcdOptions, Leadership, Role};
use relay_control_plane::model::*;
use relay_control_plane::store::postgres::PostgresStore;
use relay_control_plane::store::sqlite::SqliteStore;
use relay_control_plane::store::{DynStore, StoreError};
use relay_test_support::etcd::TestEtcd;
use relay_test_support::{wait_for, TestDb};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(2);

async fn pg_store() -> (DynStore, TestDb) {
    let db = TestDb::new().await.unwrap();
    let store = Arc::new(PostgresStore::connect(&db.url, 8).await.unwrap()) as DynStore;
    (store, db)
}

fn etcd_opts(etcd: &TestEtcd) -> EtcdOptions {
    let mut o = EtcdOptions::new(&etcd.endpoints);
    // Each test has its own key, so tests may share one etcd (ETCD_ENDPOINTS).
    o.prefix = format!("/relay-test/{}/", uuid::Uuid::new_v4());
    o.ttl = TTL;
    o
}

/// The indexes of the replicas that lead now.
fn leading(ls: &[Option<Leadership>]) -> Vec<usize> {
    ls.iter()
        .enumerate()
        .filter(|(_, l)| l.as_ref().is_some_and(|l| l.role().is_leading()))
        .map(|(i, _)| i)
        .collect()
}

/// Waits until exactly one leads (never two at once meanwhile); returns it and its term.
async fn one_leader(ls: &[Option<Leadership>], within: Duration) -> (usize, u64) {
    wait_for(within, "exactly one leader", || async {
        let now = leading(ls);
        assert!(now.len() <= 1, "two leaders at once: {now:?}");
        let i = *now.first()?;
        Some((i, ls[i].as_ref()?.role().term()?))
    })
    .await
    .unwrap()
}

fn write(term: u64, value: &str) -> (Vec<Mutation>, AuditRecord) {
    (
        vec![
            Mutation::CheckTerm { term },
            Mutation::SetSetting {
                name: "leader.test".into(),
                value: value.into(),
            },
        ],
        AuditRecord {
            actor: "test".into(),
            action: "test.write".into(),
            target: String::new(),
            detail: String::new(),
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_etcd_elect_one_and_a_revoked_or_dropped_leader_is_replaced() {
    let etcd = TestEtcd::start().await.unwrap();
    let (store, _db) = pg_store().await;
    let opts = etcd_opts(&etcd);
    let mut ls: Vec<Option<Leadership>> = (0..3)
        .map(|i| Some(Leadership::etcd(store.clone(), &format!("cp-{i}"), opts.clone()).unwrap()))
        .collect();
    assert_eq!(ls[0].as_ref().unwrap().mechanism(), "etcd");
    let (first, term1) = one_leader(&ls, Duration::from_secs(10)).await;
    let rec = store.leader().await.unwrap().unwrap();
    assert_eq!(
        (rec.holder.as_str(), rec.term, rec.mechanism.as_str()),
        (format!("cp-{first}").as_str(), term1, "etcd")
    );
    assert!(rec.detail.contains("create revision"), "{}", rec.detail);
    // The followers know who leads.
    for (i, l) in ls.iter().enumerate().filter(|(i, _)| *i != first) {
        let name = format!("cp-{first}");
        wait_for(Duration::from_secs(3), "followers to name the leader", || async {
            (l.as_ref().unwrap().role()
                == Role::Following {
                    leader: Some(name.clone()),
                })
            .then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("cp-{i}: {e}"));
    }

    // A leader that shuts down revokes its lease: another takes over well within the TTL.
    let started = Instant::now();
    ls[first].as_ref().unwrap().shutdown().await;
    assert_eq!(ls[first].as_ref().unwrap().role(), Role::Following { leader: None });
    ls[first] = None;
    let (second, term2) = one_leader(&ls, TTL).await;
    assert!(started.elapsed() < TTL, "handover took {:?}", started.elapsed());
    assert_ne!(second, first);
    assert!(term2 > term1);

    // A leader whose coordinator is dropped (a crashed process) is replaced once its lease expires.
    let started = Instant::now();
    ls[second] = None;
    let (third, term3) = one_leader(&ls, TTL * 3).await;
    assert!(
        started.elapsed() < TTL + Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert!(![first, second].contains(&third));
    assert!(term3 > term2);
    assert_eq!(store.leader().await.unwrap().unwrap().holder, format!("cp-{third}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_makes_the_leader_step_down_and_etcd_back_elects_one_with_a_higher_term() {
    let mut etcd = TestEtcd::start_local().await.unwrap();
    let (store, _db) = pg_store().await;
    let opts = etcd_opts(&etcd);
    let ls: Vec<Option<Leadership>> = (0..2)
        .map(|i| Some(Leadership::etcd(store.clone(), &format!("cp-{i}"), opts.clone()).unwrap()))
        .collect();
    let (_, term1) = one_leader(&ls, Duration::from_secs(10)).await;

    let stopped = Instant::now();
    etcd.stop().await.unwrap();
    wait_for(TTL, "the leader to step down", || async {
        leading(&ls).is_empty().then_some(())
    })
    .await
    .unwrap();
    let took = stopped.elapsed();
    assert!(took < TTL, "stepped down after {took:?}, TTL {TTL:?}");
    // And nobody leads while etcd is away.
    let until = Instant::now() + TTL;
    while Instant::now() < until {
        assert!(leading(&ls).is_empty(), "someone leads without etcd");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    etcd.restart().await.unwrap();
    let (_, term2) = one_leader(&ls, TTL * 5).await;
    assert!(term2 > term1, "{term2} after {term1}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_leaders_write_is_fenced() {
    let etcd = TestEtcd::start().await.unwrap();
    let (store, _db) = pg_store().await;
    let opts = etcd_opts(&etcd);
    let mut ls: Vec<Option<Leadership>> = (0..2)
        .map(|i| Some(Leadership::etcd(store.clone(), &format!("cp-{i}"), opts.clone()).unwrap()))
        .collect();
    let (old, old_term) = one_leader(&ls, Duration::from_secs(10)).await;
    let (m, a) = write(old_term, "from the first leader");
    store.apply(m, a).await.unwrap();
    ls[old].as_ref().unwrap().shutdown().await;
    ls[old] = None;
    let (_, new_term) = one_leader(&ls, TTL).await;
    // The old leader, paused through all this, wakes up and writes with its term.
    let (m, a) = write(old_term, "stale");
    let head = store.head().await.unwrap();
    let err = store.apply(m, a).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Fenced { held, current } if held == old_term && current == new_term),
        "{err:?}"
    );
    assert_eq!(store.head().await.unwrap(), head);
    assert_eq!(store.settings().await.unwrap()["leader.test"], "from the first leader");
    let (m, a) = write(new_term, "from the new leader");
    store.apply(m, a).await.unwrap();
    assert_eq!(store.settings().await.unwrap()["leader.test"], "from the new leader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_advisory_lock_elects_one_of_two_and_jobs_follow_the_leader() {
    let db = TestDb::new().await.unwrap();
    let store = Arc::new(PostgresStore::connect(&db.url, 8).await.unwrap()) as DynStore;
    let mut ls: Vec<Option<Leadership>> = (0..2)
        .map(|i| {
            Some(Leadership::postgres(store.clone(), &format!("cp-{i}"), &db.url, Duration::from_secs(1)).unwrap())
        })
        .collect();
    assert_eq!(ls[0].as_ref().unwrap().mechanism(), "postgres-advisory-lock");
    // A job on each replica: it counts ticks, under the term it was started with.
    let ticks: Vec<Arc<AtomicU64>> = (0..2).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let terms: Vec<Arc<AtomicU64>> = (0..2).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let jobs: Vec<_> = (0..2)
        .map(|i| {
            let (t, term_seen) = (ticks[i].clone(), terms[i].clone());
            run_while_leading(ls[i].as_ref().unwrap(), "test-job", move |term| {
                let (t, term_seen) = (t.clone(), term_seen.clone());
                async move {
                    term_seen.store(term, Ordering::SeqCst);
                    loop {
                        t.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            })
        })
        .collect();
    let (first, term1) = one_leader(&ls, Duration::from_secs(10)).await;
    let rec = store.leader().await.unwrap().unwrap();
    assert_eq!(
        (rec.holder, rec.mechanism, rec.term),
        (format!("cp-{first}"), "postgres-advisory-lock".into(), term1)
    );
    let other = 1 - first;
    wait_for(Duration::from_secs(3), "the leader's job to run", || async {
        (ticks[first].load(Ordering::SeqCst) > 3).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(terms[first].load(Ordering::SeqCst), term1);
    assert_eq!(ticks[other].load(Ordering::SeqCst), 0, "a follower ran the job");

    ls[first].as_ref().unwrap().shutdown().await;
    // The job stopped with the leadership.
    tokio::task::yield_now().await;
    let stopped_at = ticks[first].load(Ordering::SeqCst);
    let (second, term2) = one_leader(&ls, Duration::from_secs(5)).await;
    assert_eq!(second, other);
    assert!(term2 > term1);
    wait_for(Duration::from_secs(3), "the new leader's job to run", || async {
        (ticks[other].load(Ordering::SeqCst) > 3).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(terms[other].load(Ordering::SeqCst), term2);
    assert!(
        ticks[first].load(Ordering::SeqCst) <= stopped_at + 1,
        "the old leader's job kept running"
    );
    ls[first] = None;
    for j in jobs {
        j.abort();
    }
}

fn usage(n: u64, ts: Millis) -> UsageEvent {
    UsageEvent {
        event_id: uuid::Uuid::new_v4(),
        request_id: format!("req_{n}"),
        ts,
        node_id: "dp-1".into(),
        api_key_id: "k".into(),
        account_id: "a".into(),
        model: "m".into(),
        input_tokens: 1,
        output_tokens: 1,
        cache_write_5m_tokens: 0,
        cache_write_1h_tokens: 0,
        cache_read_tokens: 0,
        cost_pico_usd: 1,
        http_status: 200,
        error_type: String::new(),
        stream: false,
        cancelled: false,
        latency_ms: 1,
        ttfb_ms: 1,
        upstream_request_id: String::new(),
        web_search_requests: 0,
        anomaly: String::new(),
        client_request_id: String::new(),
        queue_wait_ms: 0,
        waited_for: String::new(),
        stream_events: 0,
        max_event_gap_ms: 0,
        error_message: String::new(),
        model_requested: String::new(),
        group_id: String::new(),
    }
}

async fn usage_rows(store: &DynStore) -> u64 {
    store
        .query_usage(UsageQuery::default())
        .await
        .unwrap()
        .iter()
        .map(|r| r.requests)
        .sum()
}

#[tokio::test]
async fn retention_deletes_usage_older_than_the_setting_and_keeps_the_rest() {
    let store = Arc::new(SqliteStore::open_in_memory().unwrap()) as DynStore;
    let now = now_ms();
    let day = 86_400_000;
    let events: Vec<UsageEvent> = [now - 40 * day, now - 31 * day, now - 29 * day, now - day, now]
        .iter()
        .enumerate()
        .map(|(n, ts)| usage(n as u64, *ts))
        .collect();
    store.insert_usage(&events).await.unwrap();
    // 0 (the default) keeps everything.
    assert_eq!(relay_control_plane::retention::run_once(&store, now).await.unwrap(), 0);
    assert_eq!(usage_rows(&store).await, 5);
    store
        .apply(
            vec![Mutation::SetSetting {
                name: "usage.retention_days".into(),
                value: "30".into(),
            }],
            AuditRecord {
                actor: "test".into(),
                action: "settings.set".into(),
                target: "usage.retention_days".into(),
                detail: String::new(),
            },
        )
        .await
        .unwrap();
    // The standalone control plane leads, so it runs the job.
    let leadership = Leadership::standalone(&store, "cp").await.unwrap();
    assert!(leadership.role().is_leading());
    assert_eq!(leadership.mechanism(), "standalone");
    let job = relay_control_plane::retention::start(store.clone(), &leadership, Duration::from_millis(50));
    wait_for(Duration::from_secs(5), "old usage to go", || async {
        (store.usage_row_count().await.unwrap() == 3).then_some(())
    })
    .await
    .unwrap();
    job.abort();
    assert_eq!(
        store.usage_row_count().await.unwrap(),
        3,
        "usage newer than 30 days stays"
    );
    // The raw rows went; the usage report still counts them (from the daily rollups).
    assert_eq!(usage_rows(&store).await, 5);
}

mod common;

#[tokio::test]
async fn get_status_names_the_replica_and_the_leader() {
    let cp = common::start(common::Backend::Sqlite).await;
    let mut admin = cp.admin().await;
    let st = admin
        .get_status(relay_proto::v1::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.leader, None, "nobody claimed a term yet");
    let term = cp
        .store
        .claim_term("cp-7", "etcd", "etcd key /relay/leader create revision 12", 1_000)
        .await
        .unwrap();
    let st = admin
        .get_status(relay_proto::v1::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let l = st.leader.unwrap();
    assert_eq!(
        (
            l.holder.as_str(),
            l.mechanism.as_str(),
            l.since_ms,
            l.term,
            l.detail.as_str()
        ),
        ("cp-7", "etcd", 1_000, term, "etcd key /relay/leader create revision 12")
    );
    assert!(!st.replica.is_empty());
    // Read-only tokens may ask too.
    let mut ro = cp.admin_as(Some(common::RO_TOKEN)).await;
    ro.get_status(relay_proto::v1::GetStatusRequest {}).await.unwrap();
}
