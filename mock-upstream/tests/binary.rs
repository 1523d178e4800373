//! The `relay-mock-upstream` binary: flags, the `listening on ADDR` line, per-credential faults.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[tokio::test]
async fn binary_serves_with_flags() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_relay-mock-upstream"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--text-events",
            "4",
            "--event-bytes",
            "3",
            "--fault",
            "bad-key=rate-limited:9",
            "--fault",
            "tok==stall:1",
            "--no-record",
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(20), BufReader::new(stdout).read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    let addr = line.trim().strip_prefix("listening on ").unwrap().to_string();

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let body = json!({"model": "claude-sonnet-4-5-20250929", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});
    let req = |key: &str| {
        Request::builder()
            .method(Method::POST)
            .uri(format!("http://{addr}/v1/messages"))
            .header("x-api-key", key)
            .header("anthropic-version", "2023-06-01")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap()
    };
    let resp = client.request(req("good")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let msg: Value = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(msg["content"][0]["text"].as_str().unwrap().len(), 12);
    assert_eq!(msg["usage"]["output_tokens"], 4);

    let resp = client.request(req("bad-key")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["retry-after"], "9");

    // `tok=` is the credential (split on the last '='): a non-streaming stall never answers.
    let r = tokio::time::timeout(Duration::from_millis(300), client.request(req("tok="))).await;
    assert!(r.is_err());

    child.start_kill().unwrap();
    let _ = child.wait().await;
}
