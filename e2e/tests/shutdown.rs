//! SIGTERM on a real data-plane process: a stream in flight completes, its
//! usage is stored, new connections are refused, the process exits cleanly.
//! SIGKILL while configs keep arriving: the restarted data plane serves the old
//! or the new config from its cache, never a broken one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use http_body_util::BodyExt;
use relay_mock_upstream::{expected_usage, MockConfig};
use relay_test_support::{free_port, wait_for, workspace_bin, Proc};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_lets_the_stream_in_flight_finish_and_stores_its_usage() {
    let cp = ControlPlane::start(Backend::Sqlite).await;
    let mock = mock(MockConfig {
        event_delay: Duration::from_millis(40),
        ..Default::default()
    })
    .await;
    cp.add_account("acct", &mock.base_url(), ACCOUNT_SECRET).await;
    let (_, key) = cp.add_key("client", &[]).await;

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut cmd = std::process::Command::new(workspace_bin("relay-data-plane"));
    cmd.args(["--control-plane", &cp.url(), "--listen", &format!("127.0.0.1:{port}")])
        .args(["--node-id", "dp-term", "--shutdown-grace-secs", "20"])
        .arg("--data-dir")
        .arg(dir.path().join("dp"))
        .env("RELAY_DATAPLANE_TOKEN", DP_TOKEN);
    let mut proc = Proc::spawn(cmd, &dir.path().join("dp.log")).unwrap();
    let base = format!("http://127.0.0.1:{port}");
    wait_for(Duration::from_secs(20), "the data plane to be ready", || {
        let url = format!("{base}/readyz");
        async move { try_send("GET", &url).await.filter(|r| r.status == 200).map(|_| ()) }
    })
    .await
    .unwrap();

    // A stream that takes about 1.5 s.
    let body = message_body("claude-sonnet-4-5", true);
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("{base}/v1/messages"));
    for (k, v) in sdk_headers(&key) {
        req = req.header(k, v);
    }
    let resp = http_client()
        .request(
            req.body(http_body_util::Full::new(bytes::Bytes::from(body.to_string())))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.into_body();
    let mut got = Vec::new();
    let first = stream.frame().await.unwrap().unwrap();
    got.extend_from_slice(first.data_ref().unwrap());

    // SIGTERM while it streams.
    let status = std::process::Command::new("kill")
        .args(["-TERM", &proc.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());

    // New connections are refused while the stream goes on.
    wait_for(Duration::from_secs(5), "the listener to close", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
            .then_some(())
    })
    .await
    .unwrap();

    while let Some(frame) = stream.frame().await {
        if let Some(d) = frame.unwrap().data_ref() {
            got.extend_from_slice(d);
        }
    }
    let text = String::from_utf8(got).unwrap();
    assert!(
        text.contains("event: message_stop"),
        "the stream in flight completed: {text}"
    );

    // It exits by itself, cleanly, after draining its usage to the control plane.
    let exit = wait_for(Duration::from_secs(30), "the data plane to exit", || {
        let s = proc.try_wait();
        async move { s }
    })
    .await
    .unwrap();
    assert!(exit.success(), "exit status {exit}: {}", proc.log_text());
    let t = cp.usage_total().await;
    assert_eq!(t.requests, 1, "its usage is stored before exit");
    assert_eq!(t.errors, 0);
    let expected = expected_usage(&body);
    assert_eq!(
        (t.input_tokens, t.output_tokens),
        (expected.input_tokens, expected.output_tokens)
    );
}

fn data_plane_cmd(cp: &ControlPlane, port: u16, dir: &std::path::Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(workspace_bin("relay-data-plane"));
    cmd.args(["--control-plane", &cp.url(), "--listen", &format!("127.0.0.1:{port}")])
        .args(["--node-id", "dp-kill"])
        .arg("--data-dir")
        .arg(dir.join("dp"))
        .env("RELAY_DATAPLANE_TOKEN", DP_TOKEN);
    cmd
}

async fn wait_ready(port: u16) {
    wait_for(Duration::from_secs(20), "the data plane to be ready", || async move {
        try_send("GET", &format!("http://127.0.0.1:{port}/readyz"))
            .await
            .filter(|r| r.status == 200)
            .map(|_| ())
    })
    .await
    .unwrap();
}

/// Design scenario 7: SIGKILL during apply. Admin writes arrive every few milliseconds while the data
/// plane is killed at arbitrary moments, eight times; each restart finds a cache it can serve from.
/// Finally, with the control plane down, the data plane starts from its cache alone and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_during_config_apply_leaves_the_old_or_the_new_config() {
    let mut cp = ControlPlane::start(Backend::Sqlite).await;
    let mock = mock(MockConfig::default()).await;
    cp.add_account("acct", &mock.base_url(), ACCOUNT_SECRET).await;
    let (_, key) = cp.add_key("client", &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();

    let admin = cp.admin().await;
    let writer = tokio::spawn(async move {
        let mut admin = admin;
        for i in 0.. {
            let r = admin
                .create_group(relay_proto::v1::CreateGroupRequest {
                    name: format!("churn-{i}"),
                    ..Default::default()
                })
                .await;
            if r.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    });
    for round in 0..8u64 {
        let mut proc = Proc::spawn(data_plane_cmd(&cp, port, dir.path()), &dir.path().join("dp.log")).unwrap();
        wait_ready(port).await;
        // Somewhere in the middle of receiving, applying and caching configs.
        tokio::time::sleep(Duration::from_millis(37 * round % 200)).await;
        proc.kill();
    }
    writer.abort();
    let _ = writer.await;

    // Control plane down: only the cache can make it ready.
    cp.kill().await;
    let mut proc = Proc::spawn(data_plane_cmd(&cp, port, dir.path()), &dir.path().join("dp-last.log")).unwrap();
    wait_ready(port).await;
    let r = post(
        &DataPlane {
            dp: None,
            dir: dir.path().to_path_buf(),
            addr: ([127, 0, 0, 1], port).into(),
        },
        "/v1/messages",
        &key,
        &message_body("claude-sonnet-4-5", false),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let log = proc.log_text();
    assert!(log.contains("serving the cached config"), "{log}");
    assert!(!log.contains("does not validate"), "{log}");
    assert!(!log.contains("cannot read the config cache"), "{log}");

    // The control plane returns: the data plane catches up to its head.
    cp.resume().await;
    let head = cp.head().await;
    wait_for(Duration::from_secs(20), "the data plane to ACK the head", || {
        let cp = &cp;
        async move {
            let proxies = cp
                .admin()
                .await
                .list_proxies(relay_proto::v1::ListProxiesRequest {})
                .await
                .ok()?
                .into_inner();
            proxies
                .proxies
                .iter()
                .any(|p| p.node_id == "dp-kill" && p.acked.as_ref() == Some(&head))
                .then_some(())
        }
    })
    .await
    .unwrap();
    proc.kill();
}
