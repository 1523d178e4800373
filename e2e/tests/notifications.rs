//! Webhook notifications (docs/operations.md, "Notifications"): two control-plane processes on
//! one Postgres (the advisory lock elects the leader), a data plane, the mock upstream, and a
//! real HTTP receiver recording what arrives. An account the upstream revokes is notified once,
//! signed, after the receiver's first failures; budget thresholds once each; a data plane that
//! goes away is notified as lost (in the Slack format once it is chosen); the webhook URL and
//! its secret are in no log line, no `settings list` output and no data-plane config.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use relay_control_plane::crypto::MasterKey;
use relay_control_plane::store::postgres::PostgresStore;
use relay_control_plane::store::DynStore;
use relay_mock_upstream::{Fault, MockConfig};
use relay_proto::v1 as pb;
use relay_test_support::{free_port, wait_for, workspace_bin, Proc, TestDb};
use serde_json::Value;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const MASTER_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
/// In the webhook URL's path, as Slack's hooks.slack.com/services/T/B/XXX carry theirs.
const URL_TOKEN: &str = "XoXb7TOKENinTHEurl9Q";
const SIGNING_SECRET: &str = "whsec_e2e_S1GN1NG_secret_value";

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Delivery {
    status: u16,
    event: String,
    id: String,
    signature: String,
    body: Bytes,
}

impl Delivery {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// A webhook receiver on a free port: answers 500 to its first `fail_first` requests, 204 after.
struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<Delivery>>>,
    fail_first: Arc<AtomicUsize>,
}

impl Receiver {
    async fn start(fail_first: usize) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let got: Arc<Mutex<Vec<Delivery>>> = Arc::default();
        let fail = Arc::new(AtomicUsize::new(fail_first));
        let (g, f) = (got.clone(), fail.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (g, f) = (g.clone(), f.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (g, f) = (g.clone(), f.clone());
                        async move {
                            let h = |n: &str| {
                                req.headers()
                                    .get(n)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_string()
                            };
                            let (event, id, signature) =
                                (h("x-relay-event"), h("x-relay-delivery"), h("x-relay-signature"));
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let failing = f
                                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                                .is_ok();
                            let status = if failing { 500 } else { 204 };
                            g.lock().unwrap().push(Delivery {
                                status,
                                event,
                                id,
                                signature,
                                body,
                            });
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::new()))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Receiver {
            port,
            got,
            fail_first: fail,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/services/T0001/B0002/{URL_TOKEN}", self.port)
    }

    fn all(&self) -> Vec<Delivery> {
        self.got.lock().unwrap().clone()
    }

    /// Deliveries of `event` answered 2xx.
    fn accepted(&self, event: &str) -> Vec<Delivery> {
        self.all()
            .into_iter()
            .filter(|d| d.event == event && d.status < 300)
            .collect()
    }

    async fn wait_accepted(&self, event: &str, n: usize) -> Vec<Delivery> {
        wait_for(Duration::from_secs(60), &format!("{n} {event} notification(s)"), || {
            let got = self.accepted(event);
            async move { (got.len() >= n).then_some(got) }
        })
        .await
        .unwrap()
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

/// A control-plane replica process on `db` (Postgres advisory-lock leadership).
async fn replica(db: &TestDb, name: &str, dir: &std::path::Path) -> (Proc, String) {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut cmd = std::process::Command::new(workspace_bin("relay-control-plane"));
    cmd.args(["--database-url", &db.url, "--listen", &listen])
        .args(["--leader-ttl-secs", "2"])
        .env("RELAY_REPLICA", name)
        .env("RELAY_MASTER_KEY", MASTER_KEY)
        .env("RELAY_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("RELAY_POLL_INTERVAL_MS", "200")
        .env("RUST_LOG", "debug")
        .env_remove("RELAY_MASTER_KEY_FILE");
    let proc = Proc::spawn(cmd, &dir.join(format!("{name}.log"))).unwrap();
    let url = format!("http://{listen}");
    wait_for(Duration::from_secs(30), "a control plane to serve", || {
        let url = url.clone();
        async move { admin_at(&url).await }
    })
    .await
    .unwrap();
    (proc, url)
}

async fn set(url: &str, name: &str, value: &str) {
    admin_at(url)
        .await
        .unwrap()
        .set_setting(pb::SetSettingRequest {
            name: name.into(),
            value: value.into(),
        })
        .await
        .unwrap();
}

async fn spent_today(url: &str, key: &str) -> u64 {
    admin_at(url)
        .await
        .unwrap()
        .get_api_key(pb::GetApiKeyRequest { key: key.into() })
        .await
        .unwrap()
        .into_inner()
        .spend
        .map(|s| s.day_pico_usd)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fleet_events_are_notified_once_signed_and_secrets_stay_secret() {
    let db = TestDb::new().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (mut p0, cp0) = replica(&db, "cp-a", dir.path()).await;
    let (mut p1, cp1) = replica(&db, "cp-b", dir.path()).await;
    // The receiver refuses the first two attempts: the event arrives on the third, once.
    let rx = Receiver::start(2).await;
    set(&cp0, "notify.webhook_url", &rx.url()).await;
    set(&cp1, "notify.signing_secret", SIGNING_SECRET).await;
    set(&cp0, "notify.data_plane_lost_after_ms", "1000").await;

    let mock = mock(MockConfig::default()).await;
    mock.set_fault("cred-revoked", Some(Fault::Unauthorized));
    let mut a = admin_at(&cp0).await.unwrap();
    for (name, cred) in [("revoked", "cred-revoked"), ("good", "cred-good")] {
        a.create_account(pb::CreateAccountRequest {
            name: name.into(),
            kind: pb::AccountKind::AnthropicCompatible as i32,
            base_url: mock.base_url(),
            credential: cred.into(),
            // The revoked account first, so the first request meets it.
            priority: if name == "revoked" { 0 } else { 10 },
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let created = a
        .create_api_key(pb::CreateApiKeyRequest {
            name: "team".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let key = created.key;
    let dp_token = a
        .create_admin_token(pb::CreateAdminTokenRequest {
            name: "dp".into(),
            role: pb::AdminRole::DataPlane as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut dp = DataPlane::start_with(&cp1, "dp-notify", dir.path().join("dp"), |o| o.token = dp_token).await;
    let head = a
        .get_config_version(pb::GetConfigVersionRequest {})
        .await
        .unwrap()
        .into_inner();
    dp.wait_version(head).await;

    // The upstream revokes one account: the request fails over, the account is marked.
    let r = post_messages(&dp, &key, &message_body("claude-sonnet-4-5", false)).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    let got = rx.wait_accepted("account.unauthorized", 1).await;
    let d = &got[0];
    let doc = d.json();
    assert_eq!(doc["type"], "account.unauthorized");
    assert_eq!(doc["subject"]["kind"], "account");
    assert_eq!(doc["subject"]["name"], "revoked");
    assert_eq!(doc["severity"], "critical");
    assert_eq!(doc["id"], d.id.as_str());
    assert!(doc["summary"].as_str().unwrap().contains("revoked"), "{doc}");
    assert!(doc["occurred_at"].as_str().unwrap().ends_with('Z'), "{doc}");
    assert_eq!(doc["details"]["state"], "unauthorized");
    // Signed: the receiver's check passes with the secret, fails with another.
    assert!(
        relay_control_plane::notify::verify(SIGNING_SECRET, &d.signature, &d.body),
        "{}",
        d.signature
    );
    assert!(!relay_control_plane::notify::verify("another", &d.signature, &d.body));
    // Every attempt was the same event (same id); two refused, then one accepted.
    let attempts: Vec<Delivery> = rx
        .all()
        .into_iter()
        .filter(|x| x.event == "account.unauthorized")
        .collect();
    assert_eq!(attempts.len(), 3, "{attempts:?}");
    assert!(attempts.iter().all(|x| x.id == d.id));
    assert_eq!(rx.fail_first.load(Ordering::SeqCst), 0);

    // Budgets: what one request costs, then a daily budget it is 85% of: 80% is crossed; a
    // second request crosses 100%. One notification each, however long we watch.
    let per_request = wait_for(Duration::from_secs(30), "the first request's spend", || {
        let cp = cp0.clone();
        async move {
            let s = spent_today(&cp, "team").await;
            (s > 0).then_some(s)
        }
    })
    .await
    .unwrap();
    let budget_micro = (per_request as f64 / 1e6 / 0.85).ceil() as u64;
    a.update_api_key(pb::UpdateApiKeyRequest {
        key: "team".into(),
        limits: Some(pb::KeyLimits {
            daily_budget_micro_usd: budget_micro,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let b80 = rx.wait_accepted("budget.threshold", 1).await;
    assert_eq!(b80[0].json()["details"]["threshold_percent"], 80);
    assert_eq!(b80[0].json()["subject"]["name"], "team");
    let r = post_messages(&dp, &key, &message_body("claude-sonnet-4-5", false)).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let b = rx.wait_accepted("budget.threshold", 2).await;
    assert_eq!(b[1].json()["details"]["threshold_percent"], 100);
    assert_eq!(b[1].json()["details"]["period"], "daily");

    // The Slack format from now on; the data plane goes away and is reported lost.
    set(&cp0, "notify.webhook_format", "slack").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let dp_dir = dp.dir.clone();
    dp.shutdown().await;
    let lost = rx.wait_accepted("data_plane.lost", 1).await;
    let slack = lost[0].json();
    assert!(slack["text"].as_str().unwrap().contains("dp-notify"), "{slack}");
    assert_eq!(slack["blocks"][0]["type"], "section");
    assert_eq!(slack["blocks"][0]["text"]["type"], "mrkdwn");
    assert!(relay_control_plane::notify::verify(
        SIGNING_SECRET,
        &lost[0].signature,
        &lost[0].body
    ));

    // Watch a few more rounds (both replicas stay up; the leader changes when one stops): nothing
    // is sent twice.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let leader = admin_at(&cp0)
        .await
        .unwrap()
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .leader
        .unwrap()
        .holder;
    if leader == "cp-a" {
        p0.kill();
    } else {
        p1.kill();
    }
    let survivor = if leader == "cp-a" { &cp1 } else { &cp0 };
    wait_for(Duration::from_secs(30), "the other replica to lead", || {
        let url = survivor.clone();
        let old = leader.clone();
        async move {
            let s = admin_at(&url)
                .await?
                .get_status(pb::GetStatusRequest {})
                .await
                .ok()?
                .into_inner();
            s.leader.filter(|l| !l.holder.is_empty() && l.holder != old).map(|_| ())
        }
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    for (event, n) in [
        ("account.unauthorized", 1),
        ("budget.threshold", 2),
        ("data_plane.lost", 1),
    ] {
        let got = rx.accepted(event);
        assert_eq!(got.len(), n, "{event}: {got:?}");
        let mut ids: Vec<&str> = got.iter().map(|d| d.id.as_str()).collect();
        ids.dedup();
        assert_eq!(ids.len(), n, "{event}: {got:?}");
    }

    // `relayctl notify test` goes through the same webhook and prints the receiver's status.
    let tested = relayctl(survivor, ADMIN_TOKEN, &["notify", "test"], None);
    assert!(tested.contains("HTTP 204"), "{tested}");
    assert!(tested.contains("slack") && tested.contains("signed"), "{tested}");
    let test = rx.wait_accepted("test", 1).await;
    assert!(relay_control_plane::notify::verify(
        SIGNING_SECRET,
        &test[0].signature,
        &test[0].body
    ));

    // `relayctl notify list`: the unauthorized event sent after three attempts.
    let listed_notifications = relayctl(survivor, ADMIN_TOKEN, &["notify", "list", "-o", "json"], None);
    let rows: Value = serde_json::from_str(&listed_notifications).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "account.unauthorized")
        .unwrap();
    assert_eq!(row["state"], "sent", "{row}");
    assert_eq!(row["attempts"], 3, "{row}");
    assert_eq!(row["id"], d.id.as_str(), "{row}");

    // Secrets: masked by `settings list`, absent from every data-plane config and every log.
    let listed = relayctl(survivor, ADMIN_TOKEN, &["settings", "list"], None);
    let listed_json = relayctl(survivor, ADMIN_TOKEN, &["settings", "list", "-o", "json"], None);
    assert!(listed.contains("notify.webhook_url"), "{listed}");
    assert!(listed.contains("http://127.0.0.1"), "the host is shown: {listed}");
    let store = Arc::new(PostgresStore::connect(&db.url, 2).await.unwrap()) as DynStore;
    let state = store.load_config().await.unwrap();
    let stored = format!("{:?}", state.settings);
    let pushed =
        relay_control_plane::api::publish::build_resources(&state, &MasterKey::from_base64(MASTER_KEY).unwrap())
            .unwrap()
            .settings
            .unwrap()
            .values;
    assert!(pushed.keys().all(|k| !k.starts_with("notify.")), "{pushed:?}");
    let audit = format!("{:?}", store.list_audit(1000, None).await.unwrap());
    // The logs were captured (the leaders said what they sent), and the audit names the host only.
    assert!(
        format!("{}{}", p0.log_text(), p1.log_text()).contains("notification sent"),
        "no delivery logged"
    );
    assert!(audit.contains(&format!("http://127.0.0.1:{}/…", rx.port)), "{audit}");
    let mut texts = vec![
        ("settings list", listed),
        ("settings list --json", listed_json),
        ("notify test", tested),
        ("notify list", listed_notifications),
        ("stored settings", stored),
        ("audit", audit),
        ("cp-a log", p0.log_text()),
        ("cp-b log", p1.log_text()),
    ];
    for f in walk(&dp_dir) {
        texts.push((
            "data-plane file",
            String::from_utf8_lossy(&std::fs::read(&f).unwrap()).to_string(),
        ));
    }
    for (what, text) in &texts {
        for secret in [URL_TOKEN, SIGNING_SECRET] {
            assert!(!text.contains(secret), "{what} holds a secret:\n{text}");
        }
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
