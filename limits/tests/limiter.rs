//! The limiter's policy when Redis is down, and its return when Redis answers again, against a
//! real `redis-server` this test starts and kills.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use relay_limits::{Ask, Committed, Decision, Kind, LimitKind, Limiter, LimiterOptions, Limits, Mode, Policy, Subject};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn redis_server(port: u16) -> Child {
    let c = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    c
}

fn limiter(port: u16) -> Arc<Limiter> {
    Limiter::new(LimiterOptions {
        redis_url: Some(format!("redis://127.0.0.1:{port}/0")),
        redis_password: None,
        node_id: uuid::Uuid::new_v4().to_string(),
    })
    .unwrap()
}

fn ask(rpm: u64) -> (Ask, Subject) {
    let s = Subject {
        kind: Kind::Key,
        id: uuid::Uuid::new_v4().to_string(),
        limits: Limits {
            rpm,
            ..Limits::default()
        },
        committed: Committed::default(),
    };
    let periods = relay_proto::periods::periods(chrono_tz::UTC, chrono::Utc::now().timestamp_millis());
    (
        Ask {
            subjects: vec![s.clone()],
            tokens: 0,
            cost_nano: 0,
            periods,
        },
        s,
    )
}

fn admitted(d: &Decision) -> bool {
    matches!(d, Decision::Admitted(_))
}

#[tokio::test]
async fn each_policy_applies_while_redis_is_down() {
    let port = free_port(); // nothing listens there
    let (a, _) = ask(4);
    let l = limiter(port);
    l.configure(Policy::Local, Duration::from_millis(200));
    // Local: this data plane's share (the last count of live planes is 1 here: the whole limit).
    let mut kept = Vec::new();
    for _ in 0..4 {
        let d = l.admit(a.clone()).await;
        assert!(admitted(&d), "admitted locally");
        kept.push(d);
    }
    assert_eq!(l.mode(), Mode::Degraded(Policy::Local));
    match l.admit(a.clone()).await {
        Decision::Refused { refusal, subject } => {
            assert_eq!(refusal.kind, LimitKind::Requests);
            assert_eq!(subject.limits.rpm, 4, "the refusal names the whole limit");
        }
        _ => panic!("the fifth request within the minute is refused"),
    }
    l.configure(Policy::Deny, Duration::from_millis(200));
    assert!(matches!(l.admit(a.clone()).await, Decision::StoreDown));
    l.configure(Policy::Allow, Duration::from_millis(200));
    assert!(matches!(l.admit(a.clone()).await, Decision::Unlimited));
    // A key without limits never waits for Redis.
    let (free, _) = ask(0);
    assert!(matches!(l.admit(free).await, Decision::Unlimited));
}

fn concurrency_ask(n: u64) -> (Ask, Subject) {
    let (mut a, mut s) = ask(0);
    s.limits = Limits::concurrency_only(n);
    a.subjects = vec![s.clone()];
    (a, s)
}

#[tokio::test]
async fn a_check_that_timed_out_is_undone_when_redis_catches_up() {
    let port = free_port();
    let mut server = redis_server(port);
    let l = limiter(port);
    l.configure(Policy::Local, Duration::from_millis(100));
    let (a, s) = concurrency_ask(2);
    // Redis is busy for 800 ms (a long script): both checks time out, run there later, and
    // the requests are admitted locally meanwhile.
    let busy = std::thread::spawn(move || {
        Command::new("redis-cli")
            .args(["-p", &port.to_string(), "eval"])
            .arg("local t = redis.call('TIME'); local s = t[1] * 1e6 + t[2]; while true do local n = redis.call('TIME'); if n[1] * 1e6 + n[2] - s > 800000 then break end end return 1")
            .arg("0")
            .output()
            .unwrap()
    });
    std::thread::sleep(Duration::from_millis(100));
    let first = l.admit(a.clone()).await;
    let second = l.admit(a.clone()).await;
    assert!(admitted(&first) && admitted(&second));
    drop((first, second));
    busy.join().unwrap();
    // In Redis itself, once the late scripts ran and were undone: nothing in flight, nothing counted.
    let direct = relay_limits::redis_store::RedisCounters::new(
        &format!("redis://127.0.0.1:{port}/0"),
        None,
        Duration::from_secs(2),
    )
    .unwrap();
    let periods = relay_proto::periods::periods(chrono_tz::UTC, chrono::Utc::now().timestamp_millis());
    let mut last = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let u = relay_limits::Counters::peek(&direct, std::slice::from_ref(&s), &periods, None)
            .await
            .unwrap();
        if u[0].in_flight == 0 && u[0].requests == 0 {
            last = None;
            break;
        }
        last = Some(u[0]);
    }
    assert_eq!(last, None, "orphaned leases or counts remained");
    server.kill().unwrap();
    let _ = server.wait();
}

#[tokio::test]
async fn leases_lost_by_redis_come_back_with_the_next_renewal() {
    let port = free_port();
    let mut server = redis_server(port);
    let l = limiter(port);
    l.configure(Policy::Local, Duration::from_millis(500));
    let (a, s) = concurrency_ask(1);
    let held = l.admit(a.clone()).await;
    assert!(admitted(&held));
    l.renew_now().await;
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "FLUSHALL"])
        .output()
        .unwrap();
    assert!(out.status.success());
    // Lost: a second request would get the slot.
    let periods = relay_proto::periods::periods(chrono_tz::UTC, chrono::Utc::now().timestamp_millis());
    assert_eq!(
        l.peek(std::slice::from_ref(&s), &periods).await.unwrap()[0].in_flight,
        0
    );
    l.renew_now().await;
    assert_eq!(
        l.peek(std::slice::from_ref(&s), &periods).await.unwrap()[0].in_flight,
        1,
        "the held request counts again"
    );
    assert!(matches!(l.admit(a.clone()).await, Decision::Refused { .. }));
    drop(held);
    server.kill().unwrap();
    let _ = server.wait();
}

#[tokio::test]
async fn the_limiter_returns_to_redis_when_it_answers_again() {
    let port = free_port();
    let mut server = redis_server(port);
    let l = limiter(port);
    l.configure(Policy::Local, Duration::from_millis(300));
    tokio::spawn(l.clone().run());
    let (a, s) = concurrency_ask(1000);
    assert!(admitted(&l.admit(a.clone()).await));
    assert_eq!(l.mode(), Mode::Shared);
    server.kill().unwrap();
    server.wait().unwrap();
    // The next check fails over to the policy, bounded by the timeout.
    let t = std::time::Instant::now();
    assert!(admitted(&l.admit(a.clone()).await));
    assert!(t.elapsed() < Duration::from_secs(3), "bounded: {:?}", t.elapsed());
    assert_eq!(l.mode(), Mode::Degraded(Policy::Local));
    let mut server = redis_server(port);
    let mut back = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if l.mode() == Mode::Shared {
            back = true;
            break;
        }
    }
    assert!(back, "the limiter noticed Redis again");
    let d = l.admit(a.clone()).await;
    assert!(admitted(&d));
    let periods = relay_proto::periods::periods(chrono_tz::UTC, chrono::Utc::now().timestamp_millis());
    let u = l.peek(std::slice::from_ref(&s), &periods).await.unwrap();
    assert_eq!(u[0].in_flight, 1, "counted in the restarted Redis");
    drop(d);
    let mut in_flight = 1;
    for _ in 0..50 {
        in_flight = l.peek(std::slice::from_ref(&s), &periods).await.unwrap()[0].in_flight;
        if in_flight == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(in_flight, 0, "a dropped charge releases its lease");
    server.kill().unwrap();
    let _ = server.wait();
}
