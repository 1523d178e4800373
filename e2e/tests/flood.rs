//! Listeners under a connection flood, in a process with a small open-file limit: each listener
//! keeps within its own budget, the flooded one closes what it cannot hold instead of running out
//! of descriptors (and spinning on accept errors), and the other listener stays reachable.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use relay_test_support::{wait_for, workspace_bin};
use std::process::Command;
use std::time::Duration;

/// CPU seconds (user + system) the process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line; 12 and 13 after the name.
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

async fn flood(port: u16, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut held = Vec::new();
    for _ in 0..n {
        if let Ok(s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            held.push(s);
        }
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flooded_listener_never_starves_the_other_or_spins() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay-data");
    let mut relay = Standalone::spawn_under(
        &["prlimit", "--nofile=320:320", "--"],
        &data,
        &dir.path().join("relay.log"),
        &[],
    );
    let log = relay.ready().await;
    let (grpc, proxy) = (relay.grpc, relay.proxy);
    // It says what the open-file limit allows, per listener.
    assert!(log.contains("at most 32 connections at once"), "{log}");
    assert!(log.contains("at most 64 connections at once"), "{log}");
    let token = std::fs::read_to_string(data.join("admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let server = format!("127.0.0.1:{grpc}");

    // Flood the API listener well past what the process could hold.
    let cpu_before = cpu_seconds(relay.proc.id());
    let api_flood = flood(proxy, 400).await;
    // The admin listener answers meanwhile.
    relayctl(&server, &token, &["account", "list"], None);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_seconds(relay.proc.id()) - cpu_before;
    assert!(
        used < 1.5,
        "relay used {used:.2} CPU seconds in ~2 s of a held flood: spinning?"
    );
    assert!(relay.proc.try_wait().is_none(), "relay died under the flood");
    drop(api_flood);

    // Flood the admin listener: the API answers meanwhile, and the admin comes back after.
    let grpc_flood = flood(grpc, 400).await;
    let health = wait_for(
        Duration::from_secs(10),
        "the API to answer during the admin flood",
        || async { try_send("GET", &format!("http://127.0.0.1:{proxy}/healthz")).await },
    )
    .await
    .unwrap();
    assert_eq!(health.status, 200);
    drop(grpc_flood);
    wait_for(Duration::from_secs(10), "the admin listener to answer again", || {
        let (server, token) = (server.clone(), token.clone());
        async move {
            let out = Command::new(workspace_bin("relayctl"))
                .args(["account", "list"])
                .env("RELAY_SERVER", &server)
                .env("RELAY_ADMIN_TOKEN", &token)
                .output()
                .ok()?;
            out.status.success().then_some(())
        }
    })
    .await
    .unwrap();
}

/// Holds `n` connections to `port` and counts those the listener kept: a connection over the cap
/// is closed at once (the read ends), one under it stays open until its head is due.
async fn held_open(port: u16, n: usize) -> (usize, Vec<tokio::net::TcpStream>) {
    use tokio::io::AsyncReadExt;
    let conns = flood(port, n).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut kept = Vec::new();
    for mut c in conns {
        let mut b = [0u8; 1];
        // Nothing to read and not closed: held (a read that ends, EOF or reset, was a refusal).
        if tokio::time::timeout(Duration::from_millis(50), c.read(&mut b))
            .await
            .is_err()
        {
            kept.push(c);
        }
    }
    (kept.len(), kept)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http2_only_upstreams_let_the_api_listener_hold_twice_the_connections() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay-data");
    let mut relay = Standalone::spawn_under(
        &["prlimit", "--nofile=320:320", "--"],
        &data,
        &dir.path().join("relay.log"),
        &[],
    );
    let log = relay.ready().await;
    assert!(log.contains("at most 32 connections at once"), "{log}");
    let proxy = relay.proxy;
    let token = std::fs::read_to_string(data.join("admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let server = format!("127.0.0.1:{}", relay.grpc);

    // Upstreams that may speak HTTP/1.1 (the default): two descriptors per client connection.
    let (n, held) = held_open(proxy, 100).await;
    assert!((28..=32).contains(&n), "kept {n} of 100 with a cap of 32");
    drop(held);

    // HTTP/2 only: a stream shares its upstream connection, one descriptor per client connection.
    relayctl(
        &server,
        &token,
        &["settings", "set", "upstream.http_version", "http2"],
        None,
    );
    let (n, held) = wait_for(Duration::from_secs(15), "the cap to follow the setting", || async {
        let (n, held) = held_open(proxy, 100).await;
        (n > 32).then_some((n, held))
    })
    .await
    .unwrap();
    assert!(
        n <= 64,
        "kept {n} of 100 with a cap of 64 (320 descriptors, 256 kept back)"
    );

    // Back to either version while they are all open: none is closed, no new one is let in
    // until the open ones are below the lower cap again.
    relayctl(
        &server,
        &token,
        &["settings", "set", "upstream.http_version", "auto"],
        None,
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (more, _extra) = held_open(proxy, 20).await;
    assert_eq!(more, 0, "{n} open over a cap of 32: a new connection was let in");
    let mut b = [0u8; 1];
    let mut still = 0;
    for mut c in held {
        use tokio::io::AsyncReadExt;
        if tokio::time::timeout(Duration::from_millis(20), c.read(&mut b))
            .await
            .is_err()
        {
            still += 1;
        }
    }
    assert_eq!(still, n, "lowering the cap closed open connections");
}
