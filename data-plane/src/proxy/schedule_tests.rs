#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use crate::proxy::health::{HealthSettings, Outcome};
use crate::proxy::testkit::{self, Acct, KEY};
use relay_proto::v1 as pb;

fn want<'a>(cfg: &'a Arc<ServingConfig>, key: &'a Arc<KeyEntry>, headers: &'a HeaderMap) -> Want<'a> {
    Want {
        cfg,
        key,
        model: "claude-sonnet-4-5",
        headers,
        policy: &cfg.policy,
        is_messages: true,
    }
}

fn client_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("x-api-key", http::HeaderValue::from_static(KEY));
    h
}

fn chosen(c: Choice) -> String {
    match c {
        Choice::Ready(a, _) => a.id.clone(),
        Choice::Later(at) => format!("later {at:?}"),
        Choice::Suspended => "suspended".into(),
        Choice::Nothing => "nothing".into(),
    }
}

/// Takes an account out until an operator acts (a 401 for its credential).
fn unauthorize(p: &Proxy, id: &str) {
    let now = chrono::Utc::now().timestamp_millis();
    p.health.observe_as_of(
        id,
        0,
        "claude-sonnet-4-5",
        &Outcome::Response {
            status: 401,
            headers: &HeaderMap::new(),
            body: br#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}"#,
        },
        &HealthSettings::default(),
        now,
    );
}

#[tokio::test]
async fn choose_takes_the_lowest_priority_tier_the_sessions_account_first_and_never_a_tried_one() {
    let dir = tempfile::tempdir().unwrap();
    let accounts = [
        Acct::new("a").priority(1),
        Acct::new("b").priority(0),
        Acct::new("c").priority(2),
    ];
    let p = testkit::proxy(testkit::config(1, &accounts, pb::KeyStatus::Active, &[]), dir.path());
    let cfg = p.holder.get().unwrap();
    let key = cfg.key_for(KEY).unwrap().clone();
    let h = client_headers();
    let w = want(&cfg, &key, &h);
    let s = p.scheduler();
    let now = chrono::Utc::now().timestamp_millis();
    assert_eq!(chosen(s.choose(&w, &[], None, now)), "b", "the lowest tier");
    assert_eq!(
        chosen(s.choose(&w, &["b".into()], None, now)),
        "a",
        "then the next tier"
    );
    assert_eq!(
        chosen(s.choose(&w, &[], Some("c"), now)),
        "c",
        "the session's account first"
    );
    assert_eq!(
        chosen(s.choose(&w, &["c".into()], Some("c"), now)),
        "b",
        "not when it was tried"
    );
    let all: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
    assert_eq!(chosen(s.choose(&w, &all, None, now)), "nothing");
}

#[tokio::test]
async fn choose_waits_for_a_slot_and_gives_up_on_a_group_whose_accounts_are_all_out() {
    let dir = tempfile::tempdir().unwrap();
    let p = testkit::proxy(
        testkit::config(1, &[Acct::new("a").max_concurrency(1)], pb::KeyStatus::Active, &[]),
        dir.path(),
    );
    let cfg = p.holder.get().unwrap();
    let key = cfg.key_for(KEY).unwrap().clone();
    let h = client_headers();
    let w = want(&cfg, &key, &h);
    let s = p.scheduler();
    let now = chrono::Utc::now().timestamp_millis();
    let held = s.choose(&w, &[], None, now);
    assert_eq!(
        chosen(s.choose(&w, &[], None, now)),
        "later None",
        "its one slot is taken"
    );
    drop(held);
    assert_eq!(chosen(s.choose(&w, &[], None, now)), "a", "the slot came back");
    unauthorize(&p, "a");
    assert_eq!(
        chosen(s.choose(&w, &[], None, now)),
        "nothing",
        "out until someone acts"
    );
    assert!(p.groups.is_cooling("g", now), "and its group cools down");
}

#[tokio::test(start_paused = true)]
async fn acquire_waits_in_the_queue_for_a_slot_and_says_what_it_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let p = testkit::proxy(
        testkit::config(1, &[Acct::new("a").max_concurrency(1)], pb::KeyStatus::Active, &[]),
        dir.path(),
    );
    let cfg = p.holder.get().unwrap();
    let key = cfg.key_for(KEY).unwrap().clone();
    let h = client_headers();
    let w = want(&cfg, &key, &h);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    let mut waited = Waited::default();
    let (first, slot) = p
        .scheduler()
        .acquire(&w, &[], None, deadline, &mut waited)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((first.id.as_str(), waited.what), ("a", ""));
    let releaser = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        drop(slot);
    });
    let (second, _slot) = p
        .scheduler()
        .acquire(&w, &[], None, deadline, &mut waited)
        .await
        .unwrap()
        .unwrap();
    releaser.await.unwrap();
    assert_eq!(second.id, "a");
    assert_eq!(waited.what, "slot");
    assert!((3000..3100).contains(&waited.ms), "{}", waited.ms);
    assert_eq!(p.queued.load(Ordering::Acquire), 0, "it left the queue");
}

#[tokio::test(start_paused = true)]
async fn acquire_gives_up_at_the_wait_limit_and_refuses_past_the_queue_size() {
    let dir = tempfile::tempdir().unwrap();
    let settings = [("queue.max_wait_ms", "2000"), ("queue.max_size", "1")];
    let p = testkit::proxy(
        testkit::config(
            1,
            &[Acct::new("a").max_concurrency(1)],
            pb::KeyStatus::Active,
            &settings,
        ),
        dir.path(),
    );
    let cfg = p.holder.get().unwrap();
    let key = cfg.key_for(KEY).unwrap().clone();
    let h = client_headers();
    let w = want(&cfg, &key, &h);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    let mut waited = Waited::default();
    let _held = p
        .scheduler()
        .acquire(&w, &[], None, deadline, &mut waited)
        .await
        .unwrap()
        .unwrap();
    // One request waits (the queue holds one); a second is refused at once.
    let p2 = p.clone();
    let (cfg2, key2) = (cfg.clone(), key.clone());
    let waiter = tokio::spawn(async move {
        let h = client_headers();
        let mut waited = Waited::default();
        let r = p2
            .scheduler()
            .acquire(&want(&cfg2, &key2, &h), &[], None, deadline, &mut waited)
            .await;
        (r.map(|o| o.is_none()), waited.ms)
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let refused = p
        .scheduler()
        .acquire(&w, &[], None, deadline, &mut Waited::default())
        .await;
    let Err(e) = refused else { panic!("the queue is full") };
    assert_eq!((e.status.as_u16(), e.retry_after_secs), (529, Some(1)));
    assert!(e.message.contains("too many requests are waiting"), "{}", e.message);
    let (none, ms) = waiter.await.unwrap();
    assert!(none.unwrap(), "nothing came free within queue.max_wait_ms");
    assert!((2000..2100).contains(&ms), "{ms}");
}

#[tokio::test(start_paused = true)]
async fn a_suspended_request_sees_its_key_revoked_in_a_newer_config() {
    let dir = tempfile::tempdir().unwrap();
    let p = testkit::proxy(
        testkit::config(1, &[Acct::new("a")], pb::KeyStatus::Active, &[]),
        dir.path(),
    );
    unauthorize(&p, "a");
    let cfg = p.holder.get().unwrap();
    let key = cfg.key_for(KEY).unwrap().clone();
    let p2 = p.clone();
    let waiter = tokio::spawn(async move {
        let h = client_headers();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
        let mut waited = Waited::default();
        let r = p2
            .scheduler()
            .acquire(&want(&cfg, &key, &h), &[], None, deadline, &mut waited)
            .await;
        (r.map(|o| o.map(|(a, _)| a.id.clone())), waited.what)
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiter.is_finished(), "suspended for a recovery");
    p.holder
        .swap(testkit::config(2, &[Acct::new("a")], pb::KeyStatus::Revoked, &[]));
    let (r, what) = waiter.await.unwrap();
    assert_eq!(what, "recovery");
    let Err(e) = r else {
        panic!("the key was revoked meanwhile")
    };
    assert_eq!(e.status.as_u16(), 401);
}
