//! The token client against the mock's OAuth server over real HTTP: a PKCE login, rotation, `invalid_grant`
//! on reuse, transient errors on 500s and timeouts, and no secret in any error.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::Duration;

use relay_mock_upstream::{MockConfig, MockUpstream};
use relay_oauth::{authorize_url, parse_pasted, ClientOptions, OAuthConfig, OAuthError, Pkce, TokenClient};

fn config(mock: &MockUpstream) -> OAuthConfig {
    let (authorize, token) = mock.oauth_urls();
    let mut s = BTreeMap::new();
    s.insert("oauth.authorize_url".to_string(), authorize);
    s.insert("oauth.token_url".to_string(), token);
    OAuthConfig::from_settings(&s)
}

fn client(timeout: Duration) -> TokenClient {
    TokenClient::new(&ClientOptions::default(), timeout).unwrap()
}

/// What a user approving in the browser gets to paste.
async fn approve(url: &str) -> String {
    let (scheme_host, rest) = url.split_at(url.find("/oauth/").unwrap());
    let addr = scheme_host.trim_start_matches("http://");
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {rest} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out.split("\r\n\r\n").nth(1).unwrap().trim().to_string()
}

#[tokio::test]
async fn a_pkce_login_then_refreshes_rotate() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let cfg = config(&mock);
    let pkce = Pkce::new();
    let pasted = approve(&authorize_url(&cfg, &pkce)).await;
    let code = parse_pasted(&pasted, &pkce.state).unwrap();
    let c = client(Duration::from_secs(10));
    let t = c
        .exchange_code(&cfg, &code, &pkce.state, pkce.verifier(), None)
        .await
        .unwrap();
    assert!(t.access_token.starts_with("mock-oauth-at-"));
    let rt1 = t.refresh_token.clone().unwrap();
    assert_eq!(t.organization.as_deref(), Some("Mock Org"));
    assert_eq!(t.account_email.as_deref(), Some("mock-user@example.com"));
    assert_eq!(t.scopes, cfg.scope_list());
    let left = t.expires_at_ms.unwrap() - relay_oauth::now_ms();
    assert!((3_590_000..=3_600_000).contains(&left), "{left}");

    // The code was used: exchanging it again is invalid_grant, without the code in the message.
    let e = c
        .exchange_code(&cfg, &code, &pkce.state, pkce.verifier(), None)
        .await
        .unwrap_err();
    assert!(matches!(e, OAuthError::InvalidGrant(_)), "{e}");
    assert!(!e.to_string().contains(&code));

    let t2 = c.refresh(&cfg, &rt1, None).await.unwrap();
    let rt2 = t2.refresh_token.clone().unwrap();
    assert_ne!(rt1, rt2);
    // Reusing the rotated-away token: invalid_grant, not retryable, no token in the message or Debug.
    let e = c.refresh(&cfg, &rt1, None).await.unwrap_err();
    assert!(matches!(e, OAuthError::InvalidGrant(_)) && !e.is_transient(), "{e}");
    assert!(!e.to_string().contains(&rt1) && !format!("{e:?}").contains(&rt1));
    assert!(!format!("{t2:?}").contains(&rt2) && !format!("{t2:?}").contains(&t2.access_token));
    c.refresh(&cfg, &rt2, None).await.unwrap();
    let counters = mock.oauth_counters();
    assert_eq!((counters.rotations, counters.invalid_grants), (2, 2), "{counters:?}");
}

#[tokio::test]
async fn server_errors_and_timeouts_are_transient_and_leave_the_token_alive() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let cfg = config(&mock);
    let (_, rt) = mock.mint_oauth_tokens("user:inference");
    let c = client(Duration::from_millis(300));

    mock.fail_next_oauth_token_calls(1);
    let e = c.refresh(&cfg, &rt, None).await.unwrap_err();
    assert!(e.is_transient(), "{e}");
    assert!(e.to_string().contains("500"), "{e}");

    mock.set_oauth_token_delay(Duration::from_secs(2));
    let e = c.refresh(&cfg, &rt, None).await.unwrap_err();
    assert!(e.is_transient(), "{e}");
    assert!(e.to_string().contains("no answer within 300 ms"), "{e}");
    mock.set_oauth_token_delay(Duration::ZERO);

    // Nothing listening: transient too.
    let mut dead = cfg.clone();
    dead.token_url = "http://127.0.0.1:9/v1/oauth/token".into();
    assert!(c.refresh(&dead, &rt, None).await.unwrap_err().is_transient());

    // A wrong client id: refused, not retryable.
    let mut other = cfg.clone();
    other.client_id = "someone-else".into();
    let e = c.refresh(&other, &rt, None).await.unwrap_err();
    assert!(matches!(e, OAuthError::Rejected { status: 401, .. }), "{e}");

    // The timed-out call may have rotated the token server-side (the mock answered late); a revocation
    // kills whatever is current.
    mock.revoke_all_oauth_tokens();
    assert!(matches!(
        c.refresh(&cfg, &rt, None).await.unwrap_err(),
        OAuthError::InvalidGrant(_)
    ));
}
