//! Failures injected into a whole fleet on this machine, started with `scripts/fleet.sh up`
//! (Postgres, Redis, etcd, two control-plane replicas, three data planes, the mock upstream, mTLS):
//! mixed traffic (streaming and not, through all three data planes) runs while a process is
//! killed or paused, and each test asserts that no client request failed and that Postgres holds
//! exactly one usage event per request sent (none lost, none doubled).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use base64::Engine;
use common::{message_body, sdk_headers, send};
use relay_test_support::{wait_for, workspace_bin};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct Fleet {
    dir: tempfile::TempDir,
    base: u16,
}

fn ports_free(base: u16) -> bool {
    (base..base + 50).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
}

impl Fleet {
    fn up() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Tests of this binary run at once: each fleet takes its own block of 100 ports.
        static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
        let mut base = 20_000 + (std::process::id() % 60) as u16 * 200 + NEXT.fetch_add(1, Ordering::Relaxed) * 100;
        while !ports_free(base) {
            // Below the kernel's ephemeral range (32768 and up), where outgoing connections
            // could take a port between this check and the fleet's start.
            base = if base > 32_000 { 20_000 } else { base + 100 };
        }
        let fleet = Self { dir, base };
        fleet.script(&["up"]);
        fleet
    }

    fn script(&self, args: &[&str]) -> String {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let bin = workspace_bin("relayctl").parent().unwrap().to_path_buf();
        let out = Command::new(root.join("scripts/fleet.sh"))
            .args(args)
            .env("RELAY_FLEET_DIR", self.dir.path())
            .env("RELAY_FLEET_PORT", self.base.to_string())
            .env("RELAY_FLEET_BIN", bin)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "fleet.sh {args:?}:\n{text}\n{}", self.logs());
        text
    }

    fn logs(&self) -> String {
        let mut all = String::new();
        for name in ["cp-1", "cp-2", "dp-1", "dp-2", "dp-3"] {
            let log = std::fs::read_to_string(self.dir.path().join(format!("logs/{name}.log"))).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            all += &format!(
                "--- {name}\n{}\n",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        all
    }

    fn pid(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("pids/{name}.pid")))
            .unwrap()
            .trim()
            .to_string()
    }

    fn signal(&self, name: &str, signal: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid(name))
            .status()
            .unwrap();
        assert!(ok.success(), "kill -{signal} {name}");
    }

    /// `relayctl -o json ARGS` against cp-1 with the fleet's admin token.
    fn relayctl(&self, args: &[&str]) -> serde_json::Value {
        let d = self.dir.path();
        let out = Command::new(workspace_bin("relayctl"))
            .args(["-o", "json"])
            .args(args)
            .env("RELAY_SERVER", format!("https://localhost:{}", self.base + 10))
            .env("RELAY_CA_FILE", d.join("certs/ca.pem"))
            .env(
                "RELAY_ADMIN_TOKEN",
                std::fs::read_to_string(d.join("admin.token")).unwrap().trim(),
            )
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "relayctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn connected(&self, node: &str) -> bool {
        let list = self.relayctl(&["proxies", "list"]);
        list.as_array()
            .unwrap()
            .iter()
            .any(|p| p["node_id"] == node && p["connected"] == true)
    }

    fn dp_url(&self, n: u16) -> String {
        format!("http://127.0.0.1:{}/v1/messages", self.base + 40 + n)
    }

    fn client_key(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("client.key"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// The replica holding the leader key in etcd (its JSON gateway).
    async fn leader(&self) -> Option<String> {
        let key = base64::engine::general_purpose::STANDARD.encode("/relay/leader");
        let r = send(
            "POST",
            &format!("http://127.0.0.1:{}/v3/kv/range", self.base + 2),
            &[("content-type", "application/json")],
            serde_json::json!({ "key": key }).to_string(),
        )
        .await;
        let v = r.json();
        let value = v["kvs"][0]["value"].as_str()?;
        let bytes = base64::engine::general_purpose::STANDARD.decode(value).ok()?;
        let holder: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        holder["replica"].as_str().map(str::to_string)
    }

    /// How many replicas say they lead (`relay_leader_is_leader` on each metrics port).
    async fn leading(&self) -> u32 {
        let mut n = 0;
        for port in [self.base + 11, self.base + 21] {
            if let Some(r) = common::try_send("GET", &format!("http://127.0.0.1:{port}/metrics")).await {
                let text = String::from_utf8_lossy(&r.body).to_string();
                n += text
                    .lines()
                    .filter(|l| l.starts_with("relay_leader_is_leader") && l.trim_end().ends_with(" 1"))
                    .count() as u32;
            }
        }
        n
    }

    /// (usage events, distinct request ids) in Postgres.
    async fn usage(&self) -> (i64, i64) {
        let url = format!("postgres://postgres@127.0.0.1:{}/relay", self.base);
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        let row = c
            .query_one("SELECT count(*), count(DISTINCT request_id) FROM usage_events", &[])
            .await
            .unwrap();
        (row.get(0), row.get(1))
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let _ = Command::new(root.join("scripts/fleet.sh"))
            .arg("down")
            .env("RELAY_FLEET_DIR", self.dir.path())
            .env("RELAY_FLEET_PORT", self.base.to_string())
            .output();
    }
}

/// Mixed traffic over the data planes in `targets` until stopped: (sent, failures).
struct Traffic {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    fn start(fleet: &Fleet, targets: &[u16], workers: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let key = fleet.client_key();
        let urls: Vec<String> = targets.iter().map(|n| fleet.dp_url(*n)).collect();
        let tasks = (0..workers)
            .map(|w| {
                let (stop, sent, failures, key, urls) =
                    (stop.clone(), sent.clone(), failures.clone(), key.clone(), urls.clone());
                tokio::spawn(async move {
                    let mut i = w;
                    while !stop.load(Ordering::Relaxed) {
                        let url = &urls[i % urls.len()];
                        let stream = i % 2 == 0;
                        let h = sdk_headers(&key);
                        let hs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
                        let r = send("POST", url, &hs, message_body("claude-sonnet-4-5", stream).to_string()).await;
                        sent.fetch_add(1, Ordering::Relaxed);
                        let body = String::from_utf8_lossy(&r.body).to_string();
                        let complete = if stream {
                            body.contains("message_stop")
                        } else {
                            body.contains("\"usage\"")
                        };
                        if r.status != 200 || !complete {
                            failures
                                .lock()
                                .unwrap()
                                .push(format!("{url} stream={stream}: {} {body}", r.status));
                        }
                        i += workers;
                    }
                })
            })
            .collect();
        Self {
            stop,
            sent,
            failures,
            tasks,
        }
    }

    async fn wait_sent(&self, n: usize) {
        let sent = self.sent.clone();
        wait_for(Duration::from_secs(60), "traffic", || {
            let sent = sent.load(Ordering::Relaxed);
            async move { (sent >= n).then_some(()) }
        })
        .await
        .unwrap();
    }

    async fn finish(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let failures = self.failures.lock().unwrap();
        assert!(
            failures.is_empty(),
            "{} client requests failed: {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
        self.sent.load(Ordering::Relaxed)
    }
}

/// Every request sent has exactly one usage event in Postgres, once the spools are drained.
async fn assert_usage_exact(fleet: &Fleet, sent: usize) {
    eprintln!("{sent} requests sent, all answered");
    let got = wait_for(Duration::from_secs(60), "every usage event in Postgres", || async {
        let (n, distinct) = fleet.usage().await;
        (n >= sent as i64).then_some((n, distinct))
    })
    .await;
    let (n, distinct) = match got {
        Ok(v) => v,
        Err(_) => panic!(
            "usage events lost: {:?} of {sent}\n{}",
            fleet.usage().await,
            fleet.logs()
        ),
    };
    assert_eq!(n, sent as i64, "usage events doubled");
    assert_eq!(distinct, n, "a request counted twice");
}

/// kill -9 the leader replica while traffic runs through all data planes: the other replica
/// takes the lead (etcd), the data planes keep serving from their config, the killed replica's
/// data planes spool usage until it is back (`fleet.sh up` restarts what is not running), and
/// nothing is lost or doubled.
#[tokio::test(flavor = "multi_thread")]
async fn killing_the_leader_replica_loses_no_request_and_no_usage() {
    let fleet = Fleet::up();
    let leader = wait_for(Duration::from_secs(30), "a leader", || fleet.leader())
        .await
        .unwrap();
    let traffic = Traffic::start(&fleet, &[1, 2, 3], 6);
    traffic.wait_sent(60).await;
    fleet.signal(&leader, "KILL");
    let other = if leader == "cp-1" { "cp-2" } else { "cp-1" };
    // The survivor takes the lead once the killed one's lease expires (--leader-ttl-secs).
    wait_for(Duration::from_secs(60), "the other replica to lead", || async {
        (fleet.leader().await.as_deref() == Some(other)).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    let before = traffic.sent.load(Ordering::Relaxed);
    traffic.wait_sent(before + 60).await;
    fleet.script(&["up"]);
    let before = traffic.sent.load(Ordering::Relaxed);
    traffic.wait_sent(before + 60).await;
    let sent = traffic.finish().await;
    assert_usage_exact(&fleet, sent).await;
}

/// SIGSTOP a data plane for longer than the control plane's stream timeouts while the others
/// serve: after SIGCONT its in-flight requests complete, it reconnects, and its usage arrives
/// once, with nothing doubled.
#[tokio::test(flavor = "multi_thread")]
async fn pausing_a_data_plane_loses_no_request_and_no_usage() {
    let fleet = Fleet::up();
    let traffic = Traffic::start(&fleet, &[1, 2, 3], 6);
    traffic.wait_sent(60).await;
    fleet.signal("dp-2", "STOP");
    let status = || fleet.script(&["status"]);
    let others = Traffic::start(&fleet, &[1, 3], 2);
    others.wait_sent(40).await;
    // Paused past the control plane's stream timeouts: it counts dp-2 as gone.
    wait_for(
        Duration::from_secs(120),
        "the control plane to see dp-2 gone",
        || async { (!fleet.connected("dp-2")).then_some(()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    fleet.signal("dp-2", "CONT");
    wait_for(Duration::from_secs(60), "dp-2 ready and connected again", || async {
        (status().contains("(ready; config from cp-2)") && fleet.connected("dp-2")).then_some(())
    })
    .await
    .unwrap();
    let before = traffic.sent.load(Ordering::Relaxed);
    traffic.wait_sent(before + 60).await;
    let sent = traffic.finish().await + others.finish().await;
    assert_usage_exact(&fleet, sent).await;
}

/// Restart Postgres (a fast shutdown, then `fleet.sh up` starts it again) while traffic runs:
/// data planes serve from their config and spool usage while the control planes cannot store it;
/// afterwards every request has exactly one usage event.
#[tokio::test(flavor = "multi_thread")]
async fn restarting_postgres_loses_no_request_and_no_usage() {
    let fleet = Fleet::up();
    let traffic = Traffic::start(&fleet, &[1, 2, 3], 6);
    traffic.wait_sent(60).await;
    // SIGINT is Postgres' fast shutdown: sessions are cut, the server stops.
    fleet.signal("postgres", "INT");
    // Stopped: the postmaster has exited (after its shutdown checkpoint).
    let pid = fleet.pid("postgres");
    wait_for(Duration::from_secs(60), "Postgres to stop", || {
        let gone = !std::path::Path::new(&format!("/proc/{pid}")).exists();
        async move { gone.then_some(()) }
    })
    .await
    .unwrap();
    let before = traffic.sent.load(Ordering::Relaxed);
    traffic.wait_sent(before + 60).await;
    fleet.script(&["up"]);
    let before = traffic.sent.load(Ordering::Relaxed);
    traffic.wait_sent(before + 60).await;
    let sent = traffic.finish().await;
    assert_usage_exact(&fleet, sent).await;
}

/// Stop etcd while traffic runs: the leader steps down within its lease, nobody leads, the data
/// planes serve and usage is stored (the collector does not need the leader); when etcd is back
/// (`fleet.sh up`) a replica leads again.
#[tokio::test(flavor = "multi_thread")]
async fn stopping_etcd_loses_no_request_and_no_usage() {
    let fleet = Fleet::up();
    wait_for(Duration::from_secs(30), "a leader", || fleet.leader())
        .await
        .unwrap();
    let traffic = Traffic::start(&fleet, &[1, 2, 3], 6);
    traffic.wait_sent(60).await;
    wait_for(Duration::from_secs(30), "one replica leading", || async {
        (fleet.leading().await == 1).then_some(())
    })
    .await
    .unwrap();
    fleet.signal("etcd", "TERM");
    // The leader cannot renew its lease: it steps down within --leader-ttl-secs.
    wait_for(Duration::from_secs(60), "the leader to step down", || async {
        (fleet.leading().await == 0).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    let before = traffic.sent.load(Ordering::Relaxed);
    traffic.wait_sent(before + 60).await;
    fleet.script(&["up"]);
    wait_for(Duration::from_secs(60), "one replica leading again", || async {
        (fleet.leading().await == 1).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    let before = traffic.sent.load(Ordering::Relaxed);
    traffic.wait_sent(before + 60).await;
    let sent = traffic.finish().await;
    assert_usage_exact(&fleet, sent).await;
}
