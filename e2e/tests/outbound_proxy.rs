//! Per-account outbound proxies: an account whose `proxy_url` names an HTTP CONNECT or SOCKS5 proxy is
//! reached through it, TLS to the upstream running end to end inside the tunnel; changing or clearing the
//! URL takes effect with the next config; a proxy that refuses the relay's credentials fails the attempt
//! over to another account and never shows the password to anyone.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use relay_mock_upstream::MockConfig;
use relay_proto::v1 as pb;
use relay_test_support::proxy::{ProxyProtocol, TestProxy, Tunnel};

const PROXY_USER: &str = "relay-egress";
const PROXY_PASSWORD: &str = "pr0xy-PASSWORD-never-logged";

/// Sets the account's proxy URL and waits until `dp` serves the config holding it.
async fn switch_proxy(cp: &ControlPlane, dp: &DataPlane, account: &str, url: &str) {
    set_proxy(cp, account, url).await;
    dp.wait_version(cp.head().await).await;
}

async fn set_proxy(cp: &ControlPlane, account: &str, url: &str) {
    cp.admin()
        .await
        .update_account(pb::UpdateAccountRequest {
            account: account.into(),
            proxy_url: Some(url.into()),
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn both_kinds_succeed(dp: &DataPlane, key: &str) {
    let r = post_messages(dp, key, &message_body("claude-sonnet-4-5", false)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["type"], "message");
    let r = post_messages(dp, key, &message_body("claude-sonnet-4-5", true)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let text = String::from_utf8(r.body.to_vec()).unwrap();
    assert!(
        text.trim_end().ends_with("data: {\"type\":\"message_stop\"}"),
        "the stream is complete: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_reach_their_upstream_through_their_proxy() {
    let (ca_pem, tls) = test_pki();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    // The mock listens where "localhost" resolves first, so that resolving the name here (socks5) and at
    // the proxy (socks5h) reach the same socket on any machine.
    let localhost = tokio::net::lookup_host("localhost:0").await.unwrap().next().unwrap();
    let upstream = mock(MockConfig {
        tls: Some(tls),
        listen: localhost,
        ..MockConfig::default()
    })
    .await;
    let port = upstream.base_url().rsplit(':').next().unwrap().to_string();
    assert_eq!(upstream.base_url(), format!("https://localhost:{port}"));

    let http_proxy = TestProxy::start(ProxyProtocol::HttpConnect, Some((PROXY_USER, PROXY_PASSWORD)))
        .await
        .unwrap();
    let socks_proxy = TestProxy::start(ProxyProtocol::Socks5, Some((PROXY_USER, PROXY_PASSWORD)))
        .await
        .unwrap();
    let cp = ControlPlane::start(Backend::Sqlite).await;
    let account = cp
        .add_account("acct-behind-proxy", &upstream.base_url(), ACCOUNT_SECRET)
        .await;
    let (_, key) = cp.add_key("client-proxy", &[]).await;
    let mut dp = DataPlane::start_with(&cp.url(), "dp-proxy", dir.path().join("dp"), |o| {
        o.extra_ca_file = Some(ca_file.clone());
    })
    .await;
    let creds = Some((PROXY_USER.to_string(), PROXY_PASSWORD.to_string()));

    // 1. HTTP CONNECT with Basic credentials (percent-encoded in the URL where needed).
    switch_proxy(
        &cp,
        &dp,
        &account,
        &format!("http://{PROXY_USER}:{PROXY_PASSWORD}@{}", http_proxy.addr),
    )
    .await;
    both_kinds_succeed(&dp, &key).await;
    let tunnels = http_proxy.tunnels();
    assert!(!tunnels.is_empty(), "the requests went through the HTTP proxy");
    for t in &tunnels {
        assert_eq!(
            t,
            &Tunnel {
                target: format!("localhost:{port}"),
                auth: creds.clone(),
                accepted: true,
            }
        );
    }
    // TLS ran inside the tunnel, to the upstream itself, with the account's credential.
    let seen = upstream.requests();
    assert_eq!(seen.len(), 2);
    for q in &seen {
        assert!(q.tls.is_some(), "the upstream saw TLS");
        assert_eq!(q.header("x-api-key"), Some(ACCOUNT_SECRET));
    }

    // 2. SOCKS5 with remote name resolution: the proxy gets the name.
    switch_proxy(
        &cp,
        &dp,
        &account,
        &format!("socks5h://{PROXY_USER}:{PROXY_PASSWORD}@{}", socks_proxy.addr),
    )
    .await;
    let http_tunnels_before = http_proxy.tunnels().len();
    both_kinds_succeed(&dp, &key).await;
    let tunnels = socks_proxy.tunnels();
    assert!(!tunnels.is_empty(), "the requests went through the SOCKS proxy");
    assert!(
        tunnels
            .iter()
            .all(|t| t.target == format!("localhost:{port}") && t.auth == creds && t.accepted),
        "{tunnels:?}"
    );
    assert_eq!(
        http_proxy.tunnels().len(),
        http_tunnels_before,
        "no connection of the old proxy's pool was reused"
    );

    // 3. SOCKS5 with local resolution: the proxy gets an address, never the name.
    switch_proxy(
        &cp,
        &dp,
        &account,
        &format!("socks5://{PROXY_USER}:{PROXY_PASSWORD}@{}", socks_proxy.addr),
    )
    .await;
    let socks_before = socks_proxy.tunnels().len();
    both_kinds_succeed(&dp, &key).await;
    let tunnels = socks_proxy.tunnels();
    assert!(tunnels.len() > socks_before, "{tunnels:?}");
    for t in &tunnels[socks_before..] {
        let resolved = std::net::SocketAddr::new(localhost.ip(), port.parse().unwrap());
        assert_eq!(t.target, resolved.to_string(), "an address, not the name");
    }

    // 4. Cleared: direct again, no proxy sees anything new.
    switch_proxy(&cp, &dp, &account, "").await;
    let (h, s) = (http_proxy.tunnels().len(), socks_proxy.tunnels().len());
    both_kinds_succeed(&dp, &key).await;
    assert_eq!((http_proxy.tunnels().len(), socks_proxy.tunnels().len()), (h, s));
    assert_eq!(upstream.requests().len(), 8);
    dp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_refusing_the_relay_fails_over_and_never_leaks_its_password() {
    let good = mock(MockConfig::default()).await;
    let behind = mock(MockConfig::default()).await;
    // This proxy wants other credentials than the account gives it.
    let strict = TestProxy::start(ProxyProtocol::HttpConnect, Some(("someone-else", "other")))
        .await
        .unwrap();
    let cp = ControlPlane::start(Backend::Sqlite).await;
    let refused = cp.add_account("acct-refused", &behind.base_url(), ACCOUNT_SECRET).await;
    set_proxy(
        &cp,
        &refused,
        &format!("http://{PROXY_USER}:{PROXY_PASSWORD}@{}", strict.addr),
    )
    .await;
    // A lower priority than the refused account: tried second.
    cp.admin()
        .await
        .create_account(pb::CreateAccountRequest {
            name: "acct-direct".into(),
            kind: pb::AccountKind::AnthropicCompatible as i32,
            base_url: good.base_url(),
            credential: ACCOUNT_SECRET.into(),
            priority: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    let (_, key) = cp.add_key("client-failover", &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut dp = DataPlane::start(&cp.url(), "dp-refused", dir.path().join("dp")).await;
    dp.wait_version(cp.head().await).await;

    let r = post_messages(&dp, &key, &message_body("claude-sonnet-4-5", false)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(good.request_count(), 1, "served by the direct account");
    assert_eq!(behind.request_count(), 0, "nothing got past the refusing proxy");
    let t = strict.tunnels();
    assert_eq!(t.len(), 1, "{t:?}");
    assert!(!t[0].accepted);
    assert_eq!(t[0].auth, Some((PROXY_USER.to_string(), PROXY_PASSWORD.to_string())));

    // The operator sees where the account points, never the proxy's password.
    let accounts = cp
        .admin()
        .await
        .list_accounts(pb::ListAccountsRequest {})
        .await
        .unwrap()
        .into_inner()
        .accounts;
    let shown = accounts.iter().find(|a| a.id == refused).unwrap();
    assert!(
        shown.proxy_url.contains(&strict.addr.to_string()),
        "{}",
        shown.proxy_url
    );
    assert!(!shown.proxy_url.contains(PROXY_PASSWORD), "{}", shown.proxy_url);
    let audit = cp
        .admin()
        .await
        .list_audit(pb::ListAuditRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(!format!("{audit:?}").contains(PROXY_PASSWORD));
    dp.shutdown().await;
}
