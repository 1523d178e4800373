//! Process-level behaviour of the control plane, with the real binaries: it
//! stops on SIGTERM while data planes hold streams open (Kubernetes would
//! SIGKILL it on every rollout otherwise), and two processes never share a
//! data directory.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use relay_test_support::{free_port, wait_for, workspace_bin, Proc};
use std::time::{Duration, Instant};

fn sigterm(proc: &Proc) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &proc.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

async fn exits_within(proc: &mut Proc, limit: Duration) -> std::process::ExitStatus {
    wait_for(limit, "the process to exit", || {
        let s = proc.try_wait();
        async move { s }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}:\n{}", proc.log_text()))
}

/// A duration with more than three decimals (`1.234567891s`, `12.5001ms`): Debug formatting.
fn overprecise_duration(word: &str) -> bool {
    let w = word.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '.');
    let Some(num) = ["ms", "µs", "ns", "s"].iter().find_map(|u| w.strip_suffix(u)) else {
        return false;
    };
    match num.split_once('.') {
        Some((int, frac)) => {
            !int.is_empty()
                && int.bytes().all(|b| b.is_ascii_digit())
                && frac.len() > 3
                && frac.bytes().all(|b| b.is_ascii_digit())
        }
        None => false,
    }
}

#[test]
fn overprecise_durations_are_told_from_rounded_ones() {
    assert!(overprecise_duration("1.234567891s"));
    assert!(overprecise_duration("(12.50001ms)"));
    assert!(!overprecise_duration("6.7s"));
    assert!(!overprecise_duration("250ms"));
    assert!(!overprecise_duration("v0.1.0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_with_a_connected_data_plane_stops_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Standalone::spawn(
        &dir.path().join("relay-data"),
        &dir.path().join("relay.log"),
        &["--shutdown-grace-secs", "60"],
    );
    relay.ready().await;
    let token = std::fs::read_to_string(dir.path().join("relay-data/admin.token")).unwrap();
    let created: serde_json::Value = serde_json::from_str(&relayctl(
        &relay.server(),
        token.trim(),
        &["-o", "json", "token", "create", "dp-ext", "--role", "data-plane"],
        None,
    ))
    .unwrap();
    let dp_token = created["token"].as_str().unwrap().to_string();

    // A separate data-plane process holds a Watch and a Report stream open.
    let port = free_port();
    let mut cmd = std::process::Command::new(workspace_bin("relay-data-plane"));
    cmd.args(["--control-plane", &format!("http://{}", relay.server())])
        .args(["--listen", &format!("127.0.0.1:{port}"), "--node-id", "dp-ext"])
        .arg("--data-dir")
        .arg(dir.path().join("dp"))
        .env("RELAY_DATAPLANE_TOKEN", &dp_token);
    let dp = Proc::spawn(cmd, &dir.path().join("dp.log")).unwrap();
    let ready = format!("http://127.0.0.1:{port}/readyz");
    wait_for(Duration::from_secs(20), "the data plane to get its config", || {
        let url = ready.clone();
        async move { try_send("GET", &url).await.filter(|r| r.status == 200).map(|_| ()) }
    })
    .await
    .unwrap();

    // Nothing is in flight: the open streams end at once and the process exits
    // long before the grace period would force it.
    let started = Instant::now();
    sigterm(&relay.proc);
    let status = exits_within(&mut relay.proc, Duration::from_secs(10)).await;
    assert!(status.success(), "{status}:\n{}", relay.proc.log_text());
    assert!(started.elapsed() < Duration::from_secs(10));
    // A clean shutdown is no warning: not a WARN or ERROR line from start to exit.
    let log = relay.proc.log_text();
    let noisy: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    assert!(noisy.is_empty(), "a clean start and stop logged: {noisy:#?}");
    // "stopped" is the last word: stepping down as leader is said before it.
    let last = log.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    assert!(last.ends_with("stopped"), "the last line is {last:?}:\n{log}");
    assert!(log.contains("stepped down: shutting down"), "{log}");
    // The data plane keeps serving its config while the control plane is gone.
    assert_eq!(try_send("GET", &ready).await.map(|r| r.status), Some(200));
    assert!(dp.log_text().contains("config stream"), "{}", dp.log_text());
    // Durations read as people write them (6.7s, 250ms), never Debug's nanoseconds.
    for text in [relay.proc.log_text(), dp.log_text()] {
        let raw: Vec<&str> = text.split_whitespace().filter(|w| overprecise_duration(w)).collect();
        assert!(raw.is_empty(), "unrounded durations logged: {raw:?}");
    }
    // It said where its files are.
    for made in ["cache.key", "spool"] {
        let path = dir.path().join("dp").join(made);
        assert!(path.exists(), "{made}");
        assert!(
            dp.log_text().contains(path.to_str().unwrap()),
            "{made}: {}",
            dp.log_text()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_never_share_a_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay-data");
    let mut first = Standalone::spawn(&data, &dir.path().join("first.log"), &[]);
    first.ready().await;

    let mut second = Standalone::spawn(&data, &dir.path().join("second.log"), &[]);
    let status = exits_within(&mut second.proc, Duration::from_secs(20)).await;
    assert!(!status.success());
    let log = second.proc.log_text();
    assert!(
        log.contains(&format!("is in use by another relay process (pid {})", first.proc.id())),
        "{log}"
    );
    assert!(log.contains(&data.display().to_string()), "{log}");

    // A data-plane process on a directory a running one holds is refused too.
    let dp_dir = data.join("data-plane");
    let mut cmd = std::process::Command::new(workspace_bin("relay-data-plane"));
    cmd.args(["--control-plane", &format!("http://{}", first.server())])
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--data-dir")
        .arg(&dp_dir)
        .env("RELAY_DATAPLANE_TOKEN", "rat-unused-because-it-never-starts-0123456789");
    let mut dp = Proc::spawn(cmd, &dir.path().join("dp.log")).unwrap();
    let status = exits_within(&mut dp, Duration::from_secs(20)).await;
    assert!(!status.success());
    assert!(
        dp.log_text().contains("in use by another relay process"),
        "{}",
        dp.log_text()
    );

    // Once the first has stopped, the directory can be taken again.
    sigterm(&first.proc);
    exits_within(&mut first.proc, Duration::from_secs(20)).await;
    let mut again = Standalone::spawn(&data, &dir.path().join("again.log"), &[]);
    again.ready().await;
}

/// A data plane whose control plane is not there says why (the whole error, not tonic's
/// "transport error"), and keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_plane_says_why_it_cannot_reach_its_control_plane() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(workspace_bin("relay-data-plane"));
    cmd.args(["--control-plane", &format!("http://127.0.0.1:{}", free_port())])
        .args([
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--node-id",
            "dp-alone",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("dp"))
        .env("RELAY_DATAPLANE_TOKEN", "rat-not-checked-here");
    let mut dp = Proc::spawn(cmd, &dir.path().join("dp.log")).unwrap();
    wait_for(Duration::from_secs(20), "the connection failure to be logged", || {
        let text = dp.log_text();
        async move {
            let line = text
                .lines()
                .find(|l| l.contains("cannot connect to the control plane"))?;
            Some(line.to_string())
        }
    })
    .await
    .map(|line| assert!(line.to_lowercase().contains("connection refused"), "{line}"))
    .unwrap_or_else(|e| panic!("{e}: {}", dp.log_text()));
    assert!(dp.try_wait().is_none(), "it keeps running: {}", dp.log_text());
    dp.kill();
}

/// A data plane given a data plane's API port (plain HTTP) as its control plane says that this is
/// not a control plane's port, in words, not in tonic's ("invalid compression flag"); and, with
/// nothing spooled, it stops at once on SIGTERM, without a warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_plane_pointed_at_a_wrong_port_says_so_and_stops_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Standalone::spawn(&dir.path().join("relay-data"), &dir.path().join("relay.log"), &[]);
    relay.ready().await;
    let mut cmd = std::process::Command::new(workspace_bin("relay-data-plane"));
    cmd.args(["--control-plane", &format!("http://127.0.0.1:{}", relay.proxy)])
        .args([
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--node-id",
            "dp-lost",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("dp"))
        .env("RELAY_DATAPLANE_TOKEN", "rat-not-checked-here");
    let mut dp = Proc::spawn(cmd, &dir.path().join("dp.log")).unwrap();
    wait_for(Duration::from_secs(20), "the wrong address to be explained", || {
        let text = dp.log_text();
        async move { text.contains("not a relay control plane's gRPC port").then_some(()) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", dp.log_text()));
    let started = Instant::now();
    sigterm(&dp);
    let status = exits_within(&mut dp, Duration::from_secs(8)).await;
    assert!(status.success(), "{status}: {}", dp.log_text());
    assert!(started.elapsed() < Duration::from_secs(8));
    let log = dp.log_text();
    assert!(!log.contains("deadline passed"), "nothing was spooled: {log}");
}

const ETCD_PASSWORD: &str = "proc-etcd-pässword";

/// A distributed control plane on `db`, elected on etcd at `endpoints` (unless `extra` names
/// others) with `extra` flags; not waited for.
fn etcd_replica(db: &relay_test_support::TestDb, endpoints: &str, dir: &std::path::Path, extra: &[&str]) -> Proc {
    let mut cmd = std::process::Command::new(workspace_bin("relay-control-plane"));
    cmd.args(["--database-url", &db.url])
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--leader-ttl-secs", "3"])
        .args(extra)
        .env("RELAY_REPLICA", "cp-etcd")
        .env("RELAY_MASTER_KEY", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
        .env("RELAY_ADMIN_TOKEN", "rat-processes-etcd-admin-token-0123456789abcdef")
        .env_remove("RELAY_MASTER_KEY_FILE");
    if !extra.contains(&"--etcd-endpoints") {
        cmd.args(["--etcd-endpoints", endpoints]);
    }
    Proc::spawn(cmd, &dir.join(format!("cp-{}.log", uuid::Uuid::new_v4().simple()))).unwrap()
}

/// What the control plane says about its etcd credentials: a password file that is missing or
/// empty, or TLS files with an http:// endpoint, stop the start with the flag in the message; a
/// wrong password is logged (naming the user, never the password) and the replica keeps trying
/// without leading; a role that does not cover the prefix is explained; the right one leads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_on_etcd_with_auth_says_what_is_wrong_with_its_credentials() {
    let db = relay_test_support::TestDb::new().await.unwrap();
    let etcd = relay_test_support::etcd::TestEtcd::start_with(Default::default())
        .await
        .unwrap();
    etcd.enable_auth("relay-cp", ETCD_PASSWORD, "/relay/").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let (right, wrong, empty) = (
        file("right", &format!("{ETCD_PASSWORD}\n")),
        file("wrong", "not-the-etcd-password\n"),
        file("empty", "\n"),
    );
    let missing = dir.path().join("missing").display().to_string();
    let ca = file("ca.pem", "not used");

    // Refused at start, before anything is reached.
    for (extra, says) in [
        (
            vec!["--etcd-user", "relay-cp", "--etcd-password-file", &missing],
            format!("--etcd-password-file {missing}"),
        ),
        (
            vec!["--etcd-user", "relay-cp", "--etcd-password-file", &empty],
            format!("--etcd-password-file {empty} is empty"),
        ),
        (vec!["--etcd-ca-file", &ca], "are for https:// endpoints".to_string()),
        (vec!["--etcd-user", "relay-cp"], "--etcd-password-file".to_string()),
        (
            vec!["--etcd-endpoints", "https://localhost:2379", "--etcd-ca-file", &ca],
            format!("--etcd-ca-file {ca}"),
        ),
        (
            vec!["--etcd-endpoints", "https://localhost:2379", "--etcd-ca-file", &ca],
            "no PEM certificate".to_string(),
        ),
    ] {
        let mut cp = etcd_replica(&db, &etcd.endpoints, dir.path(), &extra);
        let status = exits_within(&mut cp, Duration::from_secs(20)).await;
        let log = cp.log_text();
        assert!(!status.success(), "{extra:?} was accepted: {log}");
        assert!(log.contains(&says), "{extra:?}: the message should say {says:?}: {log}");
    }

    // A wrong password: the replica runs, says it cannot log in and why, and never leads.
    let mut bad = etcd_replica(
        &db,
        &etcd.endpoints,
        dir.path(),
        &["--etcd-user", "relay-cp", "--etcd-password-file", &wrong],
    );
    let line = wait_for(Duration::from_secs(30), "the refused login to be logged", || {
        let text = bad.log_text();
        async move { Some(text.lines().find(|l| l.contains("cannot log in to etcd"))?.to_string()) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", bad.log_text()));
    assert!(
        line.contains("\"relay-cp\"") && line.contains("invalid user ID or password"),
        "{line}"
    );
    assert!(bad.try_wait().is_none(), "it keeps running: {}", bad.log_text());

    // The right password leads (the bad replica, still running, does not).
    let mut good = etcd_replica(
        &db,
        &etcd.endpoints,
        dir.path(),
        &["--etcd-user", "relay-cp", "--etcd-password-file", &right],
    );
    wait_for(Duration::from_secs(30), "the replica with the password to lead", || {
        let text = good.log_text();
        async move {
            text.lines()
                .any(|l| l.contains("leading") && l.contains("term"))
                .then_some(())
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", good.log_text()));
    // A user whose role does not cover the prefix: the log says what the role needs.
    let mut elsewhere = etcd_replica(
        &db,
        &etcd.endpoints,
        dir.path(),
        &[
            "--etcd-user",
            "relay-cp",
            "--etcd-password-file",
            &right,
            "--etcd-prefix",
            "/elsewhere/",
        ],
    );
    let line = wait_for(Duration::from_secs(30), "the refused read to be logged", || {
        let text = elsewhere.log_text();
        async move { Some(text.lines().find(|l| l.contains("permission denied"))?.to_string()) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", elsewhere.log_text()));
    assert!(
        line.contains("needs a role with read and write on relay's key prefix"),
        "{line}"
    );
    elsewhere.kill();
    let bad_log = bad.log_text();
    assert!(
        !bad_log.lines().any(|l| l.contains("leading") && l.contains("term")),
        "{bad_log}"
    );
    for log in [bad_log, good.log_text()] {
        assert!(
            !log.contains("not-the-etcd-password") && !log.contains(ETCD_PASSWORD),
            "a password in the log: {log}"
        );
    }
    bad.kill();
    good.kill();
}
