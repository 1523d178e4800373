//! Subscription accounts across a fleet: three control-plane processes on one Postgres and one
//! etcd, data planes serving traffic, access tokens that expire every few seconds. Every expiry is
//! refreshed exactly once (the mock's counts), no refresh token is ever reused, no client request
//! fails because of a refresh; a leader killed between the token endpoint's answer and the commit
//! loses nothing; with etcd down nobody refreshes, and refresh resumes when it returns.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use relay_mock_upstream::{MockConfig, MockUpstream};
use relay_proto::v1 as pb;
use relay_test_support::etcd::TestEtcd;
use relay_test_support::{free_port, wait_for, workspace_bin, Proc, TestDb};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const MASTER_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
/// The leader lease: a dead leader is replaced within this.
const TTL_SECS: u64 = 3;

struct Replica {
    proc: Proc,
    url: String,
    name: String,
}

struct Fleet {
    db: TestDb,
    etcd: TestEtcd,
    mock: Arc<MockUpstream>,
    replicas: Vec<Replica>,
    dir: tempfile::TempDir,
}

impl Fleet {
    async fn start(token_lifetime: Duration) -> Fleet {
        let db = TestDb::new().await.unwrap();
        let etcd = TestEtcd::start_local().await.unwrap();
        let mock = Arc::new(mock(MockConfig::default()).await);
        mock.set_oauth_token_lifetime(token_lifetime);
        let dir = tempfile::tempdir().unwrap();
        Fleet {
            db,
            etcd,
            mock,
            replicas: Vec::new(),
            dir,
        }
    }

    /// Starts control-plane replica `name` (with `env` added) and waits until it serves.
    async fn replica(&mut self, name: &str, env: &[(&str, &str)]) -> usize {
        let listen = format!("127.0.0.1:{}", free_port());
        let mut cmd = std::process::Command::new(workspace_bin("relay-control-plane"));
        cmd.args(["--database-url", &self.db.url, "--listen", &listen])
            .args(["--etcd-endpoints", &self.etcd.endpoints])
            .args(["--leader-ttl-secs", &TTL_SECS.to_string()])
            .env("RELAY_REPLICA", name)
            .env("RELAY_MASTER_KEY", MASTER_KEY)
            .env("RELAY_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("RELAY_POLL_INTERVAL_MS", "200")
            .env("RUST_LOG", "info")
            .env_remove("RELAY_MASTER_KEY_FILE");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let log = self.dir.path().join(format!("{name}.log"));
        let proc = Proc::spawn(cmd, &log).unwrap();
        let url = format!("http://{listen}");
        wait_for(Duration::from_secs(30), "a control plane to serve", || {
            let url = url.clone();
            async move { admin_at(&url).await }
        })
        .await
        .unwrap();
        self.replicas.push(Replica {
            proc,
            url,
            name: name.to_string(),
        });
        self.replicas.len() - 1
    }

    fn url(&self, i: usize) -> &str {
        &self.replicas[i].url
    }

    /// The replica that leads now, by `relayctl status` on replica `ask`.
    async fn leader(&self, ask: usize) -> Option<String> {
        let mut a = admin_at(self.url(ask)).await?;
        let s = a.get_status(pb::GetStatusRequest {}).await.ok()?.into_inner();
        let l = s.leader?;
        (!l.holder.is_empty()).then_some(l.holder)
    }

    async fn dp_token(&self) -> String {
        admin_at(self.url(0))
            .await
            .unwrap()
            .create_admin_token(pb::CreateAdminTokenRequest {
                name: format!("dp-{}", free_port()),
                role: pb::AdminRole::DataPlane as i32,
            })
            .await
            .unwrap()
            .into_inner()
            .token
    }

    async fn data_plane(&self, cp: usize, node: &str) -> DataPlane {
        let token = self.dp_token().await;
        let dp = DataPlane::start_with(self.url(cp), node, self.dir.path().join(node), |o| o.token = token).await;
        let head = admin_at(self.url(cp))
            .await
            .unwrap()
            .get_config_version(pb::GetConfigVersionRequest {})
            .await
            .unwrap()
            .into_inner();
        dp.wait_version(head).await;
        dp
    }

    /// Waits until every refresh the mock answered is committed (audited), and returns the count.
    async fn committed(&self) -> u64 {
        wait_for(Duration::from_secs(15), "every rotation to be committed", || async {
            let rotations = self.mock.oauth_counters().rotations;
            (self.audits("account.oauth_refresh").await as u64 == rotations).then_some(rotations)
        })
        .await
        .unwrap()
    }

    /// A claude-oauth account holding a fresh login's tokens (expiring with the mock's lifetime).
    async fn account(&self, name: &str, lifetime: Duration) -> String {
        let (at, rt) = self.mock.mint_oauth_tokens("user:inference user:profile");
        admin_at(self.url(0))
            .await
            .unwrap()
            .create_account(pb::CreateAccountRequest {
                name: name.into(),
                kind: pb::AccountKind::ClaudeOauth as i32,
                base_url: self.mock.base_url(),
                credential: at,
                refresh_token: rt,
                credential_expires_at_ms: chrono::Utc::now().timestamp_millis() + lifetime.as_millis() as i64,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .id
    }

    async fn set(&self, name: &str, value: &str) {
        admin_at(self.url(0))
            .await
            .unwrap()
            .set_setting(pb::SetSettingRequest {
                name: name.into(),
                value: value.into(),
            })
            .await
            .unwrap();
    }

    async fn audits(&self, action: &str) -> usize {
        admin_at(self.url(0))
            .await
            .unwrap()
            .list_audit(pb::ListAuditRequest {
                limit: 10_000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .entries
            .iter()
            .filter(|e| e.action == action)
            .count()
    }
}

async fn admin_at(
    url: &str,
) -> Option<
    pb::admin_client::AdminClient<
        tonic::service::interceptor::InterceptedService<tonic::transport::Channel, impl tonic::service::Interceptor>,
    >,
> {
    let channel = tonic::transport::Channel::from_shared(url.to_string())
        .ok()?
        .connect()
        .await
        .ok()?;
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {ADMIN_TOKEN}").parse().ok()?;
    Some(pb::admin_client::AdminClient::with_interceptor(
        channel,
        move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", bearer.clone());
            Ok(r)
        },
    ))
}

/// Clients sending requests through `dps` until `stop`; counts answers and failures.
fn traffic(
    dps: Vec<Arc<DataPlane>>,
    key: String,
    stop: Arc<AtomicBool>,
) -> (
    Arc<AtomicU64>,
    Arc<AtomicU64>,
    Vec<tokio::task::JoinHandle<Vec<String>>>,
) {
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = Vec::new();
    for (i, dp) in dps.into_iter().enumerate() {
        let (ok, failed, stop, key) = (ok.clone(), failed.clone(), stop.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let mut body = message_body("claude-sonnet-4-5", n.is_multiple_of(2));
                body["messages"][0]["content"] = format!("client {i} request {n}").into();
                let r = post_messages(&dp, &key, &body).await;
                if r.status == 200 && (n % 2 == 1 || String::from_utf8_lossy(&r.body).contains("message_stop")) {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    errors.push(format!("{} {}", r.status, String::from_utf8_lossy(&r.body)));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            errors
        }));
    }
    (ok, failed, tasks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_refresh_every_expiry_exactly_once_under_traffic() {
    // Tokens live 4 s; refreshed 2 s before they expire.
    let lifetime = Duration::from_secs(4);
    let mut f = Fleet::start(lifetime).await;
    for i in 1..=3 {
        f.replica(&format!("cp-{i}"), &[]).await;
    }
    let (_, token_url) = f.mock.oauth_urls();
    f.set("oauth.token_url", &token_url).await;
    f.set("oauth.refresh_ahead_ms", "2000").await;
    f.account("sub-a", lifetime).await;
    f.account("sub-b", lifetime).await;
    let key = admin_at(f.url(0))
        .await
        .unwrap()
        .create_api_key(pb::CreateApiKeyRequest {
            name: "client".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key;
    // Exactly one replica leads.
    let leader = wait_for(Duration::from_secs(20), "a leader", || f.leader(1))
        .await
        .unwrap();
    assert!(f.replicas.iter().any(|r| r.name == leader), "{leader}");
    // Two data planes on two replicas.
    let dp1 = Arc::new(f.data_plane(0, "dp-1").await);
    let dp2 = Arc::new(f.data_plane(2, "dp-2").await);
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed, tasks) = traffic(vec![dp1.clone(), dp2.clone()], key, stop.clone());
    tokio::time::sleep(Duration::from_secs(60)).await;
    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    for t in tasks {
        errors.extend(t.await.unwrap());
    }
    let c = f.mock.oauth_counters();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok > 100, "{ok} requests served");
    assert_eq!(
        failed,
        0,
        "client requests failed: {:?}",
        &errors[..errors.len().min(5)]
    );
    assert_eq!(c.rejected_access_tokens, 0, "an expired token was used: {c:?}");
    assert_eq!(c.invalid_grants, 0, "a refresh token was reused: {c:?}");
    assert_eq!(c.refresh_grants, c.rotations, "{c:?}");
    // 60 s, a new token every ~2 s per account: every expiry refreshed …
    assert!(c.rotations >= 40, "{c:?}");
    // … exactly once: each rotation committed once, by the leader.
    assert!(f.committed().await >= c.rotations, "{c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_killed_between_answer_and_commit_loses_nothing() {
    let lifetime = Duration::from_secs(6);
    let mut f = Fleet::start(lifetime).await;
    // cp-1 alone first, so it leads; it stops for good right after keeping a refresh answer.
    let first = f
        .replica("cp-1", &[("RELAY_FAILPOINTS", "oauth-after-answer=pause")])
        .await;
    wait_for(Duration::from_secs(20), "cp-1 to lead", || async {
        (f.leader(first).await.as_deref() == Some("cp-1")).then_some(())
    })
    .await
    .unwrap();
    let (_, token_url) = f.mock.oauth_urls();
    f.set("oauth.token_url", &token_url).await;
    f.set("oauth.refresh_ahead_ms", "3000").await;
    let second = f.replica("cp-2", &[]).await;
    f.replica("cp-3", &[]).await;
    f.account("sub", lifetime).await;
    let dp = Arc::new(f.data_plane(second, "dp-1").await);
    let (_, key) = {
        let k = admin_at(f.url(second))
            .await
            .unwrap()
            .create_api_key(pb::CreateApiKeyRequest {
                name: "client".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        (k.info, k.key)
    };
    // The leader spends the refresh token, keeps the answer, and stops before the commit.
    wait_for(Duration::from_secs(20), "the leader to refresh", || async {
        (f.mock.oauth_counters().rotations == 1).then_some(())
    })
    .await
    .unwrap();
    wait_for(Duration::from_secs(10), "the answer to be kept", || async {
        let c = tokio_postgres::connect(&f.db.url, tokio_postgres::NoTls).await.ok()?;
        tokio::spawn(c.1);
        let n: i64 =
            c.0.query_one("SELECT count(*) FROM oauth_pending", &[])
                .await
                .ok()?
                .get(0);
        (n == 1).then_some(())
    })
    .await
    .unwrap();
    let killed_at = std::time::Instant::now();
    f.replicas[first].proc.kill();
    // Another replica leads within the lease TTL and applies the kept answer: the account keeps
    // working through refresh after refresh, and the spent token is never tried again.
    let next = wait_for(Duration::from_secs(TTL_SECS * 3), "a new leader", || async {
        f.leader(second).await.filter(|l| l != "cp-1")
    })
    .await
    .unwrap();
    assert!(
        killed_at.elapsed() <= Duration::from_secs(TTL_SECS * 2),
        "{next} took over after {:?}",
        killed_at.elapsed()
    );
    wait_for(Duration::from_secs(30), "refreshes to go on", || async {
        (f.mock.oauth_counters().rotations >= 4).then_some(())
    })
    .await
    .unwrap();
    for i in 0..10 {
        let mut body = message_body("claude-sonnet-4-5", false);
        body["messages"][0]["content"] = format!("after the takeover {i}").into();
        let r = post_messages(&dp, &key, &body).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
    let c = f.mock.oauth_counters();
    assert_eq!(c.invalid_grants, 0, "the spent refresh token was tried again: {c:?}");
    assert_eq!(c.rejected_access_tokens, 0, "{c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_etcd_down_nobody_refreshes_and_refresh_resumes_when_it_returns() {
    let lifetime = Duration::from_secs(4);
    let mut f = Fleet::start(lifetime).await;
    for i in 1..=3 {
        f.replica(&format!("cp-{i}"), &[]).await;
    }
    let (_, token_url) = f.mock.oauth_urls();
    f.set("oauth.token_url", &token_url).await;
    f.set("oauth.refresh_ahead_ms", "2000").await;
    f.account("sub", lifetime).await;
    wait_for(Duration::from_secs(20), "refreshes", || async {
        (f.mock.oauth_counters().rotations >= 2).then_some(())
    })
    .await
    .unwrap();
    f.etcd.stop().await.unwrap();
    // Every replica steps down within the TTL; from then on nobody refreshes.
    tokio::time::sleep(Duration::from_secs(TTL_SECS + 1)).await;
    let during = f.mock.oauth_counters();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let after = f.mock.oauth_counters();
    assert_eq!(
        after.refresh_grants, during.refresh_grants,
        "someone refreshed without leading"
    );
    assert!(f.leader(0).await.is_some(), "the last leader's record stays readable");
    // … but no replica claims that anyone leads now.
    for i in 0..3 {
        let mut a = admin_at(f.url(i)).await.unwrap();
        let s = a.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
        assert_eq!(s.current_leader.as_deref(), Some(""), "replica {i}: {s:?}");
        assert!(!s.replica_is_leader);
    }
    f.etcd.restart().await.unwrap();
    wait_for(Duration::from_secs(30), "refresh to resume", || async {
        (f.mock.oauth_counters().rotations > after.rotations).then_some(())
    })
    .await
    .unwrap();
    // The token expired during the outage, yet its refresh token was spent once each time.
    let c = f.mock.oauth_counters();
    assert_eq!(c.invalid_grants, 0, "{c:?}");
    assert_eq!(c.refresh_grants, c.rotations, "{c:?}");
    f.committed().await;
}
