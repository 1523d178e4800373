//! TLS between data planes and the control plane, with client certificates (mTLS): the control plane serves
//! gRPC over TLS and, with a client CA, accepts a data plane only with a certificate from that CA valid for
//! the node id it claims. Operators' clients need no certificate (they use admin tokens over TLS).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use relay_control_plane::server::ServerTls;
use relay_proto::v1 as pb;
use relay_test_support::wait_for;
use std::time::Duration;

struct Pki {
    ca: TestCa,
    /// Another CA, whose certificates the control plane must not accept.
    rogue: TestCa,
}

async fn tls_control_plane(pki: &Pki) -> ControlPlane {
    let (cert, key) = pki.ca.issue(&["localhost"], false);
    let mut cp = ControlPlane::create(Backend::Sqlite).await;
    cp.tls = Some(ServerTls {
        cert_pem: cert.into_bytes(),
        key_pem: key.into_bytes(),
        client_ca_pem: Some(pki.ca.pem.clone().into_bytes()),
    });
    cp.tls_ca = Some(pki.ca.pem.clone().into_bytes());
    cp.resume().await;
    cp
}

/// A data plane claiming `node`, presenting `cert` (certificate and key PEM) if any.
async fn data_plane(
    cp: &ControlPlane,
    pki: &Pki,
    node: &str,
    cert: Option<(String, String)>,
    dir: &std::path::Path,
) -> DataPlane {
    let ca = pki.ca.pem.clone().into_bytes();
    DataPlane::start_with(&cp.url(), node, dir.join(node), move |o| {
        o.control_plane_tls.ca_pem = Some(ca);
        o.control_plane_tls.identity = cert.map(|(c, k)| (c.into_bytes(), k.into_bytes()));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn data_planes_need_a_certificate_for_their_node_id() {
    let pki = Pki {
        ca: TestCa::new("relay test CA"),
        rogue: TestCa::new("rogue CA"),
    };
    let cp = tls_control_plane(&pki).await;
    assert!(cp.url().starts_with("https://"), "{}", cp.url());
    // The admin API works over TLS with a token and no client certificate.
    let upstream = mock(Default::default()).await;
    cp.add_account("acct-1", &upstream.base_url(), ACCOUNT_SECRET).await;
    let (_, key) = cp.add_key("client-1", &[]).await;
    let dir = tempfile::tempdir().unwrap();

    // dp-1 with a certificate for dp-1: gets the config, serves, and its usage is stored.
    let mut good = data_plane(&cp, &pki, "dp-1", Some(pki.ca.issue(&["dp-1"], true)), dir.path()).await;
    good.wait_version(cp.head().await).await;
    let r = post_messages(&good, &key, &message_body("claude-sonnet-4-5", false)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    wait_for(Duration::from_secs(10), "dp-1's usage to be stored", || async {
        (cp.usage_total().await.requests == 1).then_some(())
    })
    .await
    .unwrap();

    // Claiming another node id with dp-1's certificate, presenting none, or one from another CA: never served.
    let mut liars = vec![
        data_plane(&cp, &pki, "dp-2", Some(pki.ca.issue(&["dp-1"], true)), dir.path()).await,
        data_plane(&cp, &pki, "dp-3", None, dir.path()).await,
        data_plane(&cp, &pki, "dp-4", Some(pki.rogue.issue(&["dp-4"], true)), dir.path()).await,
    ];
    // Give them time to try (and retry) while dp-1 gets a newer config.
    cp.admin()
        .await
        .create_group(pb::CreateGroupRequest {
            name: "later".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    good.wait_version(cp.head().await).await;
    // Each has been refused at least twice (its first Watch and a retry after that write).
    for dp in &liars {
        let running = dp.dp.as_ref().unwrap();
        wait_for(
            Duration::from_secs(20),
            "the data plane to be refused twice",
            || async { (running.watch_failures() >= 2).then_some(()) },
        )
        .await
        .unwrap();
    }
    for dp in &liars {
        assert_eq!(
            dp.version(),
            None,
            "a data plane without a valid certificate got a config"
        );
        let r = try_send("GET", &dp.url("/readyz")).await.unwrap();
        assert_eq!(r.status, 503, "not ready without a config");
    }
    // The control plane knows only dp-1.
    let proxies = cp
        .admin()
        .await
        .list_proxies(pb::ListProxiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let nodes: Vec<&str> = proxies.proxies.iter().map(|p| p.node_id.as_str()).collect();
    assert_eq!(nodes, vec!["dp-1"], "{proxies:?}");

    // relayctl over TLS: verifies the control plane with --ca-file, authenticates with its token.
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &pki.ca.pem).unwrap();
    let out = std::process::Command::new(relay_test_support::workspace_bin("relayctl"))
        .args([
            "--server",
            &cp.url(),
            "--ca-file",
            ca_file.to_str().unwrap(),
            "-o",
            "json",
            "account",
            "list",
        ])
        .env("RELAY_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("acct-1"), "{stdout}");
    // Without the CA, the control plane's certificate is not trusted.
    let out = std::process::Command::new(relay_test_support::workspace_bin("relayctl"))
        .args(["--server", &cp.url(), "account", "list"])
        .env("RELAY_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    assert!(!out.status.success());

    // Plain gRPC to the TLS listener fails.
    let plain = tonic::transport::Channel::from_shared(format!("http://{}", cp.addr))
        .unwrap()
        .connect()
        .await;
    let refused = match plain {
        Err(_) => true,
        Ok(ch) => pb::admin_client::AdminClient::new(ch)
            .get_config_version(pb::GetConfigVersionRequest {})
            .await
            .is_err(),
    };
    assert!(refused, "plain-text gRPC must not reach a TLS listener");

    for dp in liars.iter_mut() {
        dp.shutdown().await;
    }
    good.shutdown().await;
}
