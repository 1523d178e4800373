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
    /// File systems mounted for this fleet (unmounted after `down`).
    mounts: Vec<PathBuf>,
    /// More environment for `fleet.sh`.
    env: Vec<(String, String)>,
    /// The replica relayctl talks to (1 or 2).
    admin: std::sync::atomic::AtomicU16,
}

/// This process's real user and group ids (from /proc/self/status).
fn ids() -> (u32, u32) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let id = |field: &str| -> u32 {
        let line = status.lines().find(|l| l.starts_with(field)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    (id("Uid:"), id("Gid:"))
}

/// `program` as root: itself when the tests run as root, else through `sudo -n` (scripts/test.sh
/// run by a user with sudo, as it installs packages).
fn as_root(program: &str) -> Command {
    if ids().0 == 0 {
        Command::new(program)
    } else {
        let mut cmd = Command::new("sudo");
        cmd.args(["-n", program]);
        cmd
    }
}

fn ports_free(base: u16) -> bool {
    (base..base + 50).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
}

impl Fleet {
    fn up() -> Self {
        let fleet = Self::new();
        fleet.script(&["up"]);
        fleet
    }

    /// A state directory and a block of ports; nothing started yet.
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Tests of this binary run at once: each fleet takes its own block of 100 ports.
        static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
        let mut base = 20_000 + (std::process::id() % 60) as u16 * 200 + NEXT.fetch_add(1, Ordering::Relaxed) * 100;
        while !ports_free(base) {
            // Below the kernel's ephemeral range (32768 and up), where outgoing connections
            // could take a port between this check and the fleet's start.
            base = if base > 32_000 { 20_000 } else { base + 100 };
        }
        Self {
            dir,
            base,
            mounts: Vec::new(),
            env: Vec::new(),
            admin: std::sync::atomic::AtomicU16::new(1),
        }
    }

    fn script(&self, args: &[&str]) -> String {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let bin = workspace_bin("relayctl").parent().unwrap().to_path_buf();
        let out = Command::new(root.join("scripts/fleet.sh"))
            .args(args)
            .env("RELAY_FLEET_DIR", self.dir.path())
            .env("RELAY_FLEET_PORT", self.base.to_string())
            .env("RELAY_FLEET_BIN", bin)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
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

    /// `relayctl -o json ARGS` against cp-1 (or the replica in `admin`) with the fleet's admin token.
    fn relayctl(&self, args: &[&str]) -> serde_json::Value {
        let d = self.dir.path();
        let out = Command::new(workspace_bin("relayctl"))
            .args(["-o", "json"])
            .args(args)
            .env(
                "RELAY_SERVER",
                format!(
                    "https://localhost:{}",
                    self.base + 10 * self.admin.load(Ordering::Relaxed)
                ),
            )
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

    /// `relayctl key create NAME ARGS`: the new client key.
    fn create_key(&self, name: &str, args: &[&str]) -> String {
        let mut all = vec!["key", "create", name];
        all.extend_from_slice(args);
        self.relayctl(&all)["key"].as_str().unwrap().to_string()
    }

    /// What data plane `n` says about `key` (`GET /relay/v1/key`), once it knows the key.
    async fn key_status(&self, n: u16, key: &str) -> Option<serde_json::Value> {
        let h = sdk_headers(key);
        let hs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let url = format!("http://127.0.0.1:{}/relay/v1/key", self.base + 40 + n);
        let r = send("GET", &url, &hs, "").await;
        (r.status == 200).then(|| r.json())
    }

    /// One non-streaming request with `key` to data plane `n`.
    async fn post(&self, n: u16, key: &str) -> common::HttpResponse {
        let h = sdk_headers(key);
        let hs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
        send(
            "POST",
            &self.dp_url(n),
            &hs,
            message_body("claude-sonnet-4-5", false).to_string(),
        )
        .await
    }

    /// Waits until `pid` has exited.
    async fn gone(&self, pid: &str) {
        wait_for(Duration::from_secs(60), "the process to exit", || {
            let gone = !std::path::Path::new(&format!("/proc/{pid}")).exists();
            async move { gone.then_some(()) }
        })
        .await
        .unwrap();
    }

    /// A counter or gauge (without labels) on data plane `n`'s /metrics.
    async fn dp_metric(&self, n: u16, name: &str) -> Option<f64> {
        let r = common::try_send("GET", &format!("http://127.0.0.1:{}/metrics", self.base + 40 + n)).await?;
        let text = String::from_utf8_lossy(&r.body).to_string();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
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

    /// (usage events, of them answered 200, distinct request ids) of the key named `name`.
    async fn key_usage(&self, name: &str) -> (i64, i64, i64) {
        let url = format!("postgres://postgres@127.0.0.1:{}/relay", self.base);
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        let row = c
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE u.http_status = 200), count(DISTINCT u.request_id) \
                 FROM usage_events u JOIN api_keys k ON k.id = u.api_key_id WHERE k.name = $1",
                &[&name],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
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
        for m in &self.mounts {
            let _ = as_root("umount").arg("-l").arg(m).status();
        }
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
        Self::start_with(fleet, &fleet.client_key(), targets, workers)
    }

    fn start_with(fleet: &Fleet, key: &str, targets: &[u16], workers: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let key = key.to_string();
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

/// Each data plane is given both replicas (its preferred one first). kill -9 cp-1 and leave it
/// down: dp-1 and dp-3, which were on it, connect to cp-2 (the next one listed) and take config
/// from it; usage from every data plane reaches Postgres through cp-2 with cp-1 still down.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_down_leaves_no_data_plane_without_a_control_plane() {
    let fleet = Fleet::up();
    let traffic = Traffic::start(&fleet, &[1, 2, 3], 6);
    traffic.wait_sent(60).await;
    let pid = fleet.pid("cp-1");
    fleet.signal("cp-1", "KILL");
    fleet.gone(&pid).await;
    fleet.admin.store(2, Ordering::Relaxed);
    wait_for(
        Duration::from_secs(60),
        "every data plane connected to cp-2",
        || async {
            ["dp-1", "dp-2", "dp-3"]
                .iter()
                .all(|n| fleet.connected(n))
                .then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    // Config from cp-2 reaches them all: a key made now works everywhere.
    let late = fleet.create_key("late", &[]);
    for n in 1..=3u16 {
        wait_for(Duration::from_secs(30), "the new key everywhere", || {
            fleet.key_status(n, &late)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    }
    let before = traffic.sent.load(Ordering::Relaxed);
    traffic.wait_sent(before + 60).await;
    let sent = traffic.finish().await;
    // cp-1 is still down: all of it came through cp-2.
    assert_usage_exact(&fleet, sent).await;
    let log = std::fs::read_to_string(fleet.dir.path().join("logs/dp-1.log")).unwrap();
    assert!(log.contains("using the next one listed"), "dp-1 says it failed over");
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
        (status().contains("(ready; config from cp-2, else cp-1)") && fleet.connected("dp-2")).then_some(())
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

/// Sends `n` non-streaming requests with `key`, round robin over the three data planes: how many
/// were served (200); every other answer must be the limit's 429 (checked with `refused`).
async fn spend(fleet: &Fleet, key: &str, n: u16, refused: impl Fn(&str)) -> usize {
    let mut ok = 0;
    for i in 0..n {
        let r = fleet.post(1 + i % 3, key).await;
        match r.status {
            200 => ok += 1,
            429 => refused(r.json()["error"]["message"].as_str().unwrap()),
            s => panic!("unexpected {s}: {}", String::from_utf8_lossy(&r.body)),
        }
    }
    ok
}

/// Stop Redis (the limits store) while traffic with a limited key runs, then start it again: no
/// request fails (`limits.on_store_down` is `local` by default: each data plane counts its share of
/// each limit in process, a 429 says so), every request has one usage event, and once Redis is
/// back the data planes count in it again and a limit holds exactly across the fleet.
#[tokio::test(flavor = "multi_thread")]
async fn stopping_redis_loses_no_request_and_limits_hold() {
    let fleet = Fleet::up();
    let busy = fleet.create_key("busy", &["--rpm", "1000000", "--concurrency", "64"]);
    let tight = fleet.create_key("tight", &["--rpm", "9"]);
    // Every data plane knows both keys and has counted the fleet (heartbeats in Redis).
    for n in 1..=3u16 {
        wait_for(
            Duration::from_secs(30),
            "a data plane to count the fleet in Redis",
            || async {
                let s = fleet.key_status(n, &tight).await?;
                fleet.key_status(n, &busy).await?;
                let r = common::try_send("GET", &format!("http://127.0.0.1:{}/metrics", fleet.base + 40 + n)).await?;
                let m = String::from_utf8_lossy(&r.body).contains("relay_limits_live_data_planes 3");
                (m && s["counted"] == "shared").then_some(())
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    }
    let traffic = Traffic::start_with(&fleet, &busy, &[1, 2, 3], 6);
    traffic.wait_sent(60).await;
    let pid = fleet.pid("redis");
    fleet.signal("redis", "TERM");
    fleet.gone(&pid).await;
    wait_for(Duration::from_secs(30), "every data plane to count locally", || async {
        for n in 1..=3u16 {
            if fleet.key_status(n, &tight).await?["counted"] != "degraded_local" {
                return None;
            }
        }
        Some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    // Each data plane allows its share of the tight key: 9 / 3 = 3, so at most 9 in all.
    let degraded_ok = spend(&fleet, &tight, 30, |m| {
        assert!(m.contains("9 requests per minute") && m.contains("share"), "{m}");
    })
    .await;
    assert!((1..=9).contains(&degraded_ok), "within the stated bound: {degraded_ok}");
    for n in 1..=3u16 {
        let r = common::try_send("GET", &format!("http://127.0.0.1:{}/readyz", fleet.base + 40 + n))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "a data plane without Redis stays ready");
    }
    let before = traffic.sent.load(Ordering::Relaxed);
    traffic.wait_sent(before + 60).await;
    fleet.script(&["up"]);
    wait_for(
        Duration::from_secs(30),
        "every data plane to count in Redis again",
        || async {
            for n in 1..=3u16 {
                if fleet.key_status(n, &busy).await?["counted"] != "shared" {
                    return None;
                }
            }
            Some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    let before = traffic.sent.load(Ordering::Relaxed);
    traffic.wait_sent(before + 60).await;
    // Exact again: a fresh key's 9 per minute, spent over all three data planes, is 9.
    let exact = fleet.create_key("exact", &["--rpm", "9"]);
    for n in 1..=3u16 {
        wait_for(Duration::from_secs(30), "the new key everywhere", || {
            fleet.key_status(n, &exact)
        })
        .await
        .unwrap();
    }
    let exact_ok = spend(&fleet, &exact, 30, |m| {
        assert!(m.contains("9 requests per minute") && !m.contains("share"), "{m}");
    })
    .await;
    assert_eq!(exact_ok, 9, "the limit holds exactly across the fleet with Redis back");
    let sent = traffic.finish().await;
    assert_usage_exact(&fleet, sent + 60).await;
    // Every request has its row, the refused ones too (429, no upstream called).
    assert_eq!(fleet.key_usage("busy").await, (sent as i64, sent as i64, sent as i64));
    assert_eq!(fleet.key_usage("tight").await, (30, degraded_ok as i64, 30));
    assert_eq!(fleet.key_usage("exact").await, (30, 9, 30));
}

/// A data plane whose disk is full (its data directory on a 2 MB tmpfs, filled up while traffic
/// runs): it keeps serving and stays ready; the usage events its spool cannot write are kept in
/// memory and sent to the control plane all the same (`relay_usage_spool_errors_total` counts
/// them), so none is lost while it runs; once space is freed the spool writes again.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_under_a_data_plane_loses_no_request_and_no_usage() {
    let mut fleet = Fleet::new();
    let data = fleet.dir.path().join("dp-2");
    std::fs::create_dir_all(&data).unwrap();
    let (uid, gid) = ids();
    let ok = as_root("mount")
        .args(["-t", "tmpfs", "-o", &format!("size=2m,uid={uid},gid={gid},mode=0700")])
        .arg("relay-fleet-dp2")
        .arg(&data)
        .status()
        .unwrap();
    assert!(
        ok.success(),
        "mounting a tmpfs needs root (or sudo without a password: scripts/test.sh as a user)"
    );
    fleet.mounts.push(data);
    fleet.script(&["up"]);
    let traffic = Traffic::start(&fleet, &[1, 2, 3], 6);
    traffic.wait_sent(60).await;
    // Fill the file system in small pieces, to the last byte it gives.
    let fill = fleet.dir.path().join("dp-2/fill");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&fill).unwrap();
        let chunk = [0u8; 512];
        while f.write_all(&chunk).and_then(|()| f.sync_data()).is_ok() {}
    }
    wait_for(Duration::from_secs(60), "dp-2's spool to fail to write", || async {
        (fleet.dp_metric(2, "relay_usage_spool_errors_total").await? > 0.0).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    let before = traffic.sent.load(Ordering::Relaxed);
    traffic.wait_sent(before + 90).await;
    let refused = fleet.dp_metric(2, "relay_usage_spool_errors_total").await.unwrap();
    assert!(
        refused >= 5.0,
        "dp-2 served on with a full disk: {refused} events refused"
    );
    let r = common::try_send("GET", &format!("http://127.0.0.1:{}/readyz", fleet.base + 42))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "a data plane with a full disk stays ready");
    // Space again: the spool writes again (the refusals stop growing).
    std::fs::remove_file(&fill).unwrap();
    let before = traffic.sent.load(Ordering::Relaxed);
    traffic.wait_sent(before + 30).await;
    let after_free = fleet.dp_metric(2, "relay_usage_spool_errors_total").await.unwrap();
    let before = traffic.sent.load(Ordering::Relaxed);
    traffic.wait_sent(before + 60).await;
    assert_eq!(
        fleet.dp_metric(2, "relay_usage_spool_errors_total").await.unwrap(),
        after_free,
        "with space again the spool writes"
    );
    let sent = traffic.finish().await;
    assert_usage_exact(&fleet, sent).await;
    let log = std::fs::read_to_string(fleet.dir.path().join("logs/dp-2.log")).unwrap();
    assert!(
        log.contains("it is kept in memory and sent"),
        "the log says what happened"
    );
}

/// Partition a data plane from the control planes and heal it. dp-3 reaches its replica only
/// through a forwarder the test cuts: bytes stop both ways, nothing is closed (as when packets are
/// dropped), new connections hang. dp-3 serves on from its last config (a key created meanwhile
/// does not reach it), its usage waits in its spool; the control plane counts it gone; after the
/// heal it reconnects, takes the new config, and its usage arrives once.
#[tokio::test(flavor = "multi_thread")]
async fn partitioning_a_data_plane_from_the_control_planes_loses_no_request_and_no_usage() {
    let mut fleet = Fleet::new();
    let cp1: std::net::SocketAddr = format!("127.0.0.1:{}", fleet.base + 10).parse().unwrap();
    let partition = relay_test_support::partition::Partition::start(cp1).await.unwrap();
    fleet.env.push((
        "RELAY_FLEET_DP3_CONTROL_PLANE".into(),
        format!("https://localhost:{}", partition.addr.port()),
    ));
    fleet.script(&["up"]);
    let traffic = Traffic::start(&fleet, &[1, 2, 3], 6);
    traffic.wait_sent(60).await;
    partition.cut();
    let only_3 = Traffic::start(&fleet, &[3], 2);
    // A key made during the partition reaches dp-1, never dp-3.
    let late = fleet.create_key("late", &[]);
    wait_for(Duration::from_secs(30), "dp-1 to know the new key", || {
        fleet.key_status(1, &late)
    })
    .await
    .unwrap();
    // The control plane sees dp-3's stream die (HTTP/2 keepalive) while dp-3 serves on.
    wait_for(
        Duration::from_secs(120),
        "the control plane to count dp-3 gone",
        || async { (!fleet.connected("dp-3")).then_some(()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    assert!(
        fleet.key_status(3, &late).await.is_none(),
        "dp-3 serves its last config"
    );
    let spooled = fleet.dp_metric(3, "relay_usage_spool_depth").await.unwrap();
    assert!(spooled > 0.0, "dp-3's usage waits in its spool: {spooled}");
    let r = common::try_send("GET", &format!("http://127.0.0.1:{}/readyz", fleet.base + 43))
        .await
        .unwrap();
    assert_eq!(
        r.status, 200,
        "a partitioned data plane stays ready (within --max-config-staleness-mins)"
    );
    let before = only_3.sent.load(Ordering::Relaxed);
    only_3.wait_sent(before + 20).await;
    partition.heal();
    wait_for(
        Duration::from_secs(120),
        "dp-3 connected again, on the new config",
        || async { (fleet.connected("dp-3") && fleet.key_status(3, &late).await.is_some()).then_some(()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    let before = traffic.sent.load(Ordering::Relaxed);
    traffic.wait_sent(before + 60).await;
    let sent = traffic.finish().await + only_3.finish().await;
    assert_usage_exact(&fleet, sent).await;
    wait_for(Duration::from_secs(30), "dp-3's spool to drain", || async {
        (fleet.dp_metric(3, "relay_usage_spool_depth").await? == 0.0).then_some(())
    })
    .await
    .unwrap();
}

/// `fleet.sh` knows its own processes: one killed -9 whose pid a stranger took since is "stopped"
/// to `status`, started again by `up`, and left alone by `down` (pid files are checked against the
/// process's start time); a second fleet on ports in use stops at once, naming the port, instead
/// of waiting a minute or taking another fleet's servers for its own.
#[tokio::test(flavor = "multi_thread")]
async fn fleet_sh_never_signals_a_stranger_and_refuses_ports_in_use() {
    let fleet = Fleet::up();
    fleet.signal("mock", "KILL");
    let mut stranger = Command::new("sleep").arg("300").spawn().unwrap();
    std::fs::write(fleet.dir.path().join("pids/mock.pid"), format!("{}\n", stranger.id())).unwrap();
    let status = fleet.script(&["status"]);
    let mock = status.lines().find(|l| l.starts_with("mock")).unwrap();
    assert!(mock.contains("stopped"), "{mock}");

    // Another fleet on the same ports.
    let other = tempfile::tempdir().unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let started = std::time::Instant::now();
    let out = Command::new(root.join("scripts/fleet.sh"))
        .arg("up")
        .env("RELAY_FLEET_DIR", other.path())
        .env("RELAY_FLEET_PORT", fleet.base.to_string())
        .env("RELAY_FLEET_BIN", workspace_bin("relayctl").parent().unwrap())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a second fleet on the same ports came up: {text}"
    );
    assert!(
        text.contains(&format!("port {} is in use by another process", fleet.base)),
        "{text}"
    );
    // Not the minute-long wait for a server that could never start.
    assert!(started.elapsed() < Duration::from_secs(30), "{text}");
    let _ = Command::new(root.join("scripts/fleet.sh"))
        .args(["down", "--purge"])
        .env("RELAY_FLEET_DIR", other.path())
        .env("RELAY_FLEET_PORT", fleet.base.to_string())
        .output();

    fleet.script(&["up"]);
    let status = fleet.script(&["status"]);
    assert_eq!(
        status.lines().filter(|l| l.contains(" running ")).count(),
        9,
        "{status}"
    );
    let mock = common::try_send("GET", &format!("http://127.0.0.1:{}/", fleet.base + 4)).await;
    assert!(mock.is_some(), "the mock upstream answers again");
    fleet.script(&["down"]);
    assert!(
        stranger.try_wait().unwrap().is_none(),
        "fleet.sh down killed a process that was not its own"
    );
    let _ = stranger.kill();
    let _ = stranger.wait();
}
