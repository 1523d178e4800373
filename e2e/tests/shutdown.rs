//! SIGTERM on a real data-plane process: a stream in flight completes, its
//! usage is stored, new connections are refused, the process exits cleanly.
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
