//! TLS to the upstream: the mock upstream serves HTTPS with a certificate from a CA generated at test time
//! (rcgen; no certificate files in the repository), and an `anthropic-compatible` account points at its
//! `https://localhost:PORT`.
//!
//! - A data plane started with `extra_ca_file` = that CA's PEM relays streaming and non-streaming requests,
//!   and the mock records them as received over TLS.
//! - A data plane without it (Mozilla roots only) refuses the mock's certificate: the client gets a 5xx
//!   Anthropic-shaped error and the mock serves no request (its handshakes fail).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use relay_mock_upstream::{MockConfig, MockUpstream};
use relay_test_support::wait_for;
use std::path::PathBuf;
use std::time::Duration;

/// A control plane, an HTTPS mock and an account pointing at it; the CA's PEM is written to `dir/ca.pem`.
struct Setup {
    cp: ControlPlane,
    mock: MockUpstream,
    key: String,
    ca_file: PathBuf,
    dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let (ca_pem, tls) = test_pki();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let mock = mock(MockConfig {
        tls: Some(tls),
        ..MockConfig::default()
    })
    .await;
    assert!(mock.base_url().starts_with("https://localhost:"), "{}", mock.base_url());
    let cp = ControlPlane::start(Backend::Sqlite).await;
    cp.add_account("acct-tls", &mock.base_url(), ACCOUNT_SECRET).await;
    let (_, key) = cp.add_key("client-tls", &[]).await;
    Setup {
        cp,
        mock,
        key,
        ca_file,
        dir,
    }
}

/// A data plane trusting `extra_ca_file` (besides the Mozilla roots), once it serves a config.
async fn data_plane(s: &Setup, node: &str, extra_ca_file: Option<PathBuf>) -> DataPlane {
    let dir = s.dir.path().join(node);
    let mut opts =
        relay_data_plane::Options::new(&s.cp.url(), DP_TOKEN, "127.0.0.1:0".parse().unwrap(), node, dir.clone());
    opts.extra_ca_file = extra_ca_file;
    let dp = relay_data_plane::start(opts, None).await.unwrap();
    let dp = DataPlane {
        addr: dp.local_addr(),
        dp: Some(dp),
        dir,
    };
    wait_for(Duration::from_secs(10), "the data plane to get a config", || {
        let v = dp.version();
        async move { v }
    })
    .await
    .unwrap();
    dp.wait_version(s.cp.head().await).await;
    dp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extra_ca_file_lets_the_data_plane_reach_a_tls_upstream() {
    let s = setup().await;
    let mut dp = data_plane(&s, "dp-tls", Some(s.ca_file.clone())).await;

    let r = post_messages(&dp, &s.key, &message_body("claude-sonnet-4-5", false)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let j = r.json();
    assert_eq!(j["type"], "message", "{j}");
    assert_eq!(j["stop_reason"], "end_turn", "{j}");

    let r = post_messages(&dp, &s.key, &message_body("claude-sonnet-4-5", true)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let text = String::from_utf8(r.body.to_vec()).unwrap();
    assert!(text.starts_with("event: message_start"), "{text}");
    assert!(
        text.trim_end().ends_with("data: {\"type\":\"message_stop\"}"),
        "the stream is complete: {text}"
    );

    // The mock served both, over TLS, with the account's credential.
    assert_eq!(s.mock.request_count(), 2);
    let seen = s.mock.requests();
    assert_eq!(seen.len(), 2);
    for q in &seen {
        assert_eq!(q.path(), "/v1/messages");
        assert_eq!(q.header("x-api-key"), Some(ACCOUNT_SECRET));
        let tls = q.tls.as_ref().expect("the request came over TLS");
        assert!(tls.protocol_version.starts_with("TLSv1."), "{tls:?}");
        match tls.alpn.as_deref() {
            Some("h2") => assert_eq!(q.version, http::Version::HTTP_2),
            Some("http/1.1") | None => assert_eq!(q.version, http::Version::HTTP_11),
            Some(other) => panic!("unexpected ALPN {other}"),
        }
    }
    assert_eq!(s.mock.tls_handshake_failures(), 0);
    dp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_extra_ca_the_tls_upstream_is_not_trusted() {
    let s = setup().await;
    let mut dp = data_plane(&s, "dp-no-ca", None).await;

    let r = post_messages(&dp, &s.key, &message_body("claude-sonnet-4-5", false)).await;
    assert!(r.status >= 500, "status {}: {:?}", r.status, r.body);
    let error_type = r.error_type();
    assert!(!error_type.is_empty(), "{:?}", r.body);

    // The relay did reach the mock but rejected its certificate: no request was served.
    wait_for(Duration::from_secs(5), "the mock to see the failed handshake", || {
        let n = s.mock.tls_handshake_failures();
        async move { (n >= 1).then_some(()) }
    })
    .await
    .unwrap();
    assert_eq!(s.mock.request_count(), 0);
    assert!(s.mock.requests().is_empty());
    dp.shutdown().await;
}
