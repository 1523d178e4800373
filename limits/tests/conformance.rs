//! The same scenarios against Redis (a real server: `REDIS_URL`, default 127.0.0.1:6379) and the
//! in-process counters, on a fake clock: both must refuse, count and settle identically.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use relay_limits::local::LocalCounters;
use relay_limits::redis_store::RedisCounters;
use relay_limits::{Ask, Committed, Counters, Kind, LimitKind, Limits, Subject};
use relay_proto::periods::{periods, Periods};
use std::time::Duration;

/// 2026-12-04T10:00:00.250Z
const T0: i64 = 1_796_378_400_250;

fn redis() -> RedisCounters {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    RedisCounters::new(&url, None, Duration::from_secs(5)).unwrap()
}

fn stores() -> Vec<(&'static str, Box<dyn Counters>)> {
    vec![("local", Box::new(LocalCounters::new())), ("redis", Box::new(redis()))]
}

fn subject(kind: Kind, limits: Limits) -> Subject {
    Subject {
        kind,
        id: uuid::Uuid::new_v4().to_string(),
        limits,
        committed: Committed::default(),
    }
}

fn p(now: i64) -> Periods {
    periods(chrono_tz::UTC, now)
}

fn ask(subjects: &[Subject], tokens: u64, cost_nano: u64, now: i64) -> Ask {
    Ask {
        subjects: subjects.to_vec(),
        tokens,
        cost_nano,
        periods: p(now),
    }
}

fn lease() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

#[tokio::test]
async fn requests_per_minute_is_a_sliding_window_exact_to_the_second() {
    for (name, c) in stores() {
        let s = [subject(
            Kind::Key,
            Limits {
                rpm: 3,
                ..Limits::default()
            },
        )];
        for i in 0..3 {
            let u = c
                .admit(&ask(&s, 0, 0, T0 + i * 10_000), &lease(), Some(T0 + i * 10_000))
                .await
                .unwrap();
            let u = u.unwrap_or_else(|r| panic!("{name}: request {i} refused: {r:?}"));
            assert_eq!(u[0].requests, i as u64 + 1, "{name}");
        }
        let at = T0 + 30_000;
        let r = c
            .admit(&ask(&s, 0, 0, at), &lease(), Some(at))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(r.kind, LimitKind::Requests, "{name}");
        assert_eq!(r.limit, 3);
        // The first request (second T0/1000) leaves the window 60 s after its second began.
        assert_eq!(r.retry_after_ms as i64, (T0 / 1000 + 60) * 1000 - at, "{name}");
        let peek = c.peek(&s, &p(at), Some(at)).await.unwrap();
        assert_eq!(peek[0].requests, 3, "{name}: a refused request is not counted");
        let later = (T0 / 1000 + 60) * 1000;
        let u = c.admit(&ask(&s, 0, 0, later), &lease(), Some(later)).await.unwrap();
        assert_eq!(u.unwrap()[0].requests, 3, "{name}: the first one left the window");
    }
}

#[tokio::test]
async fn concurrency_counts_leases_until_they_end_or_expire() {
    for (name, c) in stores() {
        let s = [subject(Kind::Key, Limits::concurrency_only(2))];
        let (a, b) = (lease(), lease());
        c.admit(&ask(&s, 0, 0, T0), &a, Some(T0)).await.unwrap().unwrap();
        c.admit(&ask(&s, 0, 0, T0), &b, Some(T0)).await.unwrap().unwrap();
        let r = c
            .admit(&ask(&s, 0, 0, T0), &lease(), Some(T0))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!((r.kind, r.limit), (LimitKind::Concurrency, 2), "{name}");
        c.finish(&s, &a, 0, 0, &p(T0), Some(T0 + 1)).await.unwrap();
        let c3 = lease();
        c.admit(&ask(&s, 0, 0, T0), &c3, Some(T0 + 2)).await.unwrap().unwrap();
        // b is renewed, c3 is not: 30 s on, c3's slot came back (its data plane died).
        c.renew(&[(s[0].name(), b.clone())], Some(T0 + 20_000)).await.unwrap();
        let at = T0 + 2 + relay_limits::LEASE_TTL_MS + 1;
        let u = c.peek(&s, &p(at), Some(at)).await.unwrap();
        assert_eq!(u[0].in_flight, 1, "{name}: the renewed lease lives, the other expired");
        c.admit(&ask(&s, 0, 0, at), &lease(), Some(at)).await.unwrap().unwrap();
        assert!(
            c.admit(&ask(&s, 0, 0, at), &lease(), Some(at)).await.unwrap().is_err(),
            "{name}"
        );
    }
}

#[tokio::test]
async fn tokens_are_reserved_then_settled_to_what_was_used() {
    for (name, c) in stores() {
        let s = [subject(
            Kind::Key,
            Limits {
                tpm: 100,
                ..Limits::default()
            },
        )];
        let first = lease();
        c.admit(&ask(&s, 60, 0, T0), &first, Some(T0)).await.unwrap().unwrap();
        let r = c
            .admit(&ask(&s, 60, 0, T0), &lease(), Some(T0 + 1))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!((r.kind, r.limit), (LimitKind::Tokens, 100), "{name}");
        c.finish(&s, &first, 10, 0, &p(T0), Some(T0 + 2)).await.unwrap();
        let u = c.peek(&s, &p(T0), Some(T0 + 3)).await.unwrap();
        assert_eq!(u[0].tokens, 10, "{name}: settled to the usage");
        let second = lease();
        let u = c
            .admit(&ask(&s, 60, 0, T0), &second, Some(T0 + 4))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(u[0].tokens, 70, "{name}");
        // Used more than reserved: the window counts what was used.
        c.finish(&s, &second, 95, 0, &p(T0), Some(T0 + 5)).await.unwrap();
        let u = c.peek(&s, &p(T0), Some(T0 + 6)).await.unwrap();
        assert_eq!(u[0].tokens, 105, "{name}");
        assert!(
            c.admit(&ask(&s, 1, 0, T0), &lease(), Some(T0 + 7))
                .await
                .unwrap()
                .is_err(),
            "{name}"
        );
        // An empty window takes one request larger than the whole limit.
        let fresh = [subject(
            Kind::Key,
            Limits {
                tpm: 100,
                ..Limits::default()
            },
        )];
        assert!(
            c.admit(&ask(&fresh, 500, 0, T0), &lease(), Some(T0))
                .await
                .unwrap()
                .is_ok(),
            "{name}"
        );
    }
}

#[tokio::test]
async fn a_budget_counts_committed_spend_plus_what_is_in_flight() {
    for (name, c) in stores() {
        let mut key = subject(
            Kind::Key,
            Limits {
                daily_nano: 1000,
                monthly_nano: 5000,
                ..Limits::default()
            },
        );
        key.committed = Committed {
            day_nano: 900,
            month_nano: 900,
        };
        let s = [key];
        let (a, b) = (lease(), lease());
        c.admit(&ask(&s, 0, 50, T0), &a, Some(T0)).await.unwrap().unwrap();
        let u = c.admit(&ask(&s, 0, 50, T0), &b, Some(T0)).await.unwrap().unwrap();
        assert_eq!((u[0].day_nano, u[0].reserved_nano), (900, 100), "{name}");
        let r = c
            .admit(&ask(&s, 0, 50, T0), &lease(), Some(T0))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!((r.kind, r.limit), (LimitKind::DailyBudget, 1000), "{name}");
        // Not spent: reserved by the two in flight, so retry shortly, not tomorrow.
        assert!(r.by_reservations, "{name}");
        assert_eq!(r.retry_after_ms, 2000, "{name}");
        c.finish(&s, &a, 0, 30, &p(T0), Some(T0)).await.unwrap();
        c.finish(&s, &b, 0, 30, &p(T0), Some(T0)).await.unwrap();
        let u = c.peek(&s, &p(T0), Some(T0)).await.unwrap();
        assert_eq!(
            (u[0].day_nano, u[0].month_nano, u[0].reserved_nano),
            (960, 960, 0),
            "{name}"
        );
        // The control plane's stored sum caught up and passed the running counter: it counts.
        let mut later = s.clone();
        later[0].committed = Committed {
            day_nano: 1000,
            month_nano: 1000,
        };
        let r = c
            .admit(&ask(&later, 0, 1, T0), &lease(), Some(T0))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(r.kind, LimitKind::DailyBudget, "{name}");
        assert!(!r.by_reservations, "{name}: spent");
        assert_eq!(r.retry_after_ms as i64, p(T0).day_end_ms - T0, "{name}: until tomorrow");
        // Tomorrow is another day (the monthly budget still has room).
        let tomorrow = p(T0).day_end_ms + 1;
        let mut next = s.clone();
        next[0].committed = Committed {
            day_nano: 0,
            month_nano: 960,
        };
        let u = c
            .admit(&ask(&next, 0, 1, tomorrow), &lease(), Some(tomorrow))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((u[0].day_nano, u[0].month_nano), (0, 960), "{name}");
    }
}

#[tokio::test]
async fn a_refusal_by_one_subject_counts_nothing_against_the_others() {
    for (name, c) in stores() {
        let key = subject(
            Kind::Key,
            Limits {
                rpm: 100,
                concurrency: 10,
                ..Limits::default()
            },
        );
        let group = subject(
            Kind::Group,
            Limits {
                rpm: 1,
                ..Limits::default()
            },
        );
        let both = [key.clone(), group.clone()];
        c.admit(&ask(&both, 0, 0, T0), &lease(), Some(T0))
            .await
            .unwrap()
            .unwrap();
        let r = c
            .admit(&ask(&both, 0, 0, T0), &lease(), Some(T0))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!((r.subject, r.kind), (1, LimitKind::Requests), "{name}");
        let u = c.peek(&both, &p(T0), Some(T0)).await.unwrap();
        assert_eq!((u[0].requests, u[0].in_flight), (1, 1), "{name}");
        assert_eq!(u[1].requests, 1, "{name}");
    }
}

#[tokio::test]
async fn spend_is_counted_per_time_zone() {
    for (name, c) in stores() {
        let s = [subject(
            Kind::Key,
            Limits {
                daily_nano: 100,
                ..Limits::default()
            },
        )];
        let utc = p(T0);
        c.finish(&s, "a", 0, 60, &utc, Some(T0)).await.unwrap();
        // Another zone whose day has the same date is another day.
        let la = periods(chrono_tz::America::Los_Angeles, T0 + 10 * 3_600_000);
        assert_eq!(la.day, utc.day);
        let u = c.peek(&s, &la, Some(T0)).await.unwrap();
        assert_eq!(u[0].day_nano, 0, "{name}");
        let u = c.peek(&s, &utc, Some(T0)).await.unwrap();
        assert_eq!(u[0].day_nano, 60, "{name}");
    }
}

#[tokio::test]
async fn an_unknown_lease_settles_its_usage_into_the_current_second() {
    for (name, c) in stores() {
        let s = [subject(
            Kind::Key,
            Limits {
                tpm: 1000,
                daily_nano: 10,
                ..Limits::default()
            },
        )];
        c.finish(&s, "gone", 40, 7, &p(T0), Some(T0)).await.unwrap();
        let u = c.peek(&s, &p(T0), Some(T0)).await.unwrap();
        assert_eq!((u[0].tokens, u[0].day_nano, u[0].in_flight), (40, 7, 0), "{name}");
        assert!(u[0].tokens_reset_ms > T0, "{name}");
    }
}
