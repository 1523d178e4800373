//! The mock's OAuth server over real HTTP: the authorize step, both grants, rotation, the knobs, and the API
//! validating the access tokens it issued.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use relay_mock_upstream::{MockConfig, MockUpstream, OAuthCounters, OAuthMockConfig};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

const CLIENT_ID: &str = "9d1c250a-e61b-44d9-88ed-5944d1962f5e";
const REDIRECT: &str = "https%3A%2F%2Fplatform.claude.com%2Foauth%2Fcode%2Fcallback";
const REDIRECT_RAW: &str = "https://platform.claude.com/oauth/code/callback";
const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";

fn challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

async fn send(method: Method, url: &str, headers: &[(&str, &str)], body: Option<Value>) -> (StatusCode, Bytes) {
    let c: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let body = body.map(|v| Bytes::from(v.to_string())).unwrap_or_default();
    let resp = c.request(b.body(Full::new(body)).unwrap()).await.unwrap();
    let status = resp.status();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

fn authorize_query(challenge: &str, state: &str) -> String {
    format!(
        "code=true&client_id={CLIENT_ID}&response_type=code&redirect_uri={REDIRECT}\
         &scope=user%3Ainference%20user%3Aprofile&code_challenge={challenge}&code_challenge_method=S256&state={state}"
    )
}

async fn authorize(mock: &MockUpstream, query: &str) -> (StatusCode, String) {
    let (s, b) = send(
        Method::GET,
        &format!("{}/oauth/authorize?{query}", mock.base_url()),
        &[],
        None,
    )
    .await;
    (s, String::from_utf8(b.to_vec()).unwrap())
}

async fn token(mock: &MockUpstream, body: Value) -> (StatusCode, Value) {
    let (s, b) = send(
        Method::POST,
        &format!("{}/v1/oauth/token", mock.base_url()),
        &[("content-type", "application/json")],
        Some(body),
    )
    .await;
    (s, serde_json::from_slice(&b).unwrap())
}

fn code_grant(code: &str, verifier: &str, state: &str) -> Value {
    json!({"grant_type": "authorization_code", "client_id": CLIENT_ID, "code": code,
           "redirect_uri": REDIRECT_RAW, "code_verifier": verifier, "state": state})
}

fn refresh_grant(rt: &str) -> Value {
    json!({"grant_type": "refresh_token", "refresh_token": rt, "client_id": CLIENT_ID})
}

/// An API call with `Authorization: Bearer token`: the status.
async fn api(mock: &MockUpstream, token: &str) -> StatusCode {
    let auth = format!("Bearer {token}");
    send(
        Method::POST,
        &format!("{}/v1/messages", mock.base_url()),
        &[("authorization", &auth), ("anthropic-version", "2023-06-01")],
        Some(json!({"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})),
    )
    .await
    .0
}

#[tokio::test]
async fn pkce_login_issues_single_use_codes_and_tokens_the_api_accepts() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let (s, pasted) = authorize(&mock, &authorize_query(&challenge(VERIFIER), "st-1")).await;
    assert_eq!(s, StatusCode::OK, "{pasted}");
    let (code, state) = pasted.split_once('#').unwrap();
    assert_eq!(state, "st-1");

    let (s, t) = token(&mock, code_grant(code, VERIFIER, "st-1")).await;
    assert_eq!(s, StatusCode::OK, "{t}");
    let at = t["access_token"].as_str().unwrap();
    assert!(at.starts_with("mock-oauth-at-"), "{t}");
    assert!(t["refresh_token"].as_str().unwrap().starts_with("mock-oauth-rt-"));
    assert_eq!(t["expires_in"], 3600);
    assert_eq!(t["scope"], "user:inference user:profile");
    assert_eq!(t["organization"]["name"], "Mock Org");
    assert_eq!(t["account"]["email_address"], "mock-user@example.com");
    assert_eq!(api(&mock, at).await, StatusCode::OK);

    // The code is single use.
    let (s, e) = token(&mock, code_grant(code, VERIFIER, "st-1")).await;
    assert_eq!(
        (s, e["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_grant"))
    );

    // A wrong verifier is refused (and burns the code).
    let (_, pasted) = authorize(&mock, &authorize_query(&challenge(VERIFIER), "st-2")).await;
    let code = pasted.split_once('#').unwrap().0;
    let (s, e) = token(
        &mock,
        code_grant(code, "another-verifier-another-verifier-another-v", "st-2"),
    )
    .await;
    assert_eq!(
        (s, e["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_grant"))
    );
    let (s, _) = token(&mock, code_grant(code, VERIFIER, "st-2")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    let c = mock.oauth_counters();
    assert_eq!((c.authorizations, c.code_grants, c.invalid_grants), (2, 4, 3), "{c:?}");
}

#[tokio::test]
async fn authorize_checks_client_redirect_and_method() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let good = authorize_query(&challenge(VERIFIER), "s");
    for bad in [
        good.replace(CLIENT_ID, "someone-else"),
        good.replace(REDIRECT, "https%3A%2F%2Fevil.example%2Fcb"),
        good.replace("S256", "plain"),
        good.replace("response_type=code", "response_type=token"),
        good.replace("&state=s", ""),
    ] {
        let (s, body) = authorize(&mock, &bad).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    assert_eq!(mock.oauth_counters().authorizations, 0);
}

#[tokio::test]
async fn refresh_tokens_rotate_and_a_reused_one_is_invalid_grant() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let (at1, rt1) = mock.mint_oauth_tokens("user:inference");
    let (s, t) = token(&mock, refresh_grant(&rt1)).await;
    assert_eq!(s, StatusCode::OK, "{t}");
    let rt2 = t["refresh_token"].as_str().unwrap().to_string();
    let at2 = t["access_token"].as_str().unwrap().to_string();
    assert_ne!(rt1, rt2);
    assert_eq!(t["scope"], "user:inference");
    // The old access token lives until it expires; the new one works.
    assert_eq!(api(&mock, &at1).await, StatusCode::OK);
    assert_eq!(api(&mock, &at2).await, StatusCode::OK);

    // The rotated-away refresh token is dead; so is an unknown one.
    for dead in [rt1.as_str(), "mock-oauth-rt-999"] {
        let (s, e) = token(&mock, refresh_grant(dead)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
        assert_eq!(e["error"], "invalid_grant");
        assert!(e["error_description"].is_string());
    }
    // The current one still works.
    let (s, _) = token(&mock, refresh_grant(&rt2)).await;
    assert_eq!(s, StatusCode::OK);
    let c = mock.oauth_counters();
    assert_eq!((c.refresh_grants, c.rotations, c.invalid_grants), (4, 2, 2), "{c:?}");
}

#[tokio::test]
async fn knobs_failures_delay_lifetime_and_revocation() {
    let mock = MockUpstream::start(MockConfig {
        oauth: OAuthMockConfig {
            token_lifetime: Duration::from_secs(120),
            ..Default::default()
        },
        ..Default::default()
    })
    .await
    .unwrap();
    let (_, rt) = mock.mint_oauth_tokens("user:inference");

    // Two injected 500s, which change nothing: the refresh token survives them.
    mock.fail_next_oauth_token_calls(2);
    for _ in 0..2 {
        let (s, e) = token(&mock, refresh_grant(&rt)).await;
        assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{e}");
    }
    let started = std::time::Instant::now();
    mock.set_oauth_token_delay(Duration::from_millis(300));
    let (s, t) = token(&mock, refresh_grant(&rt)).await;
    assert_eq!(s, StatusCode::OK, "{t}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(t["expires_in"], 120);
    mock.set_oauth_token_delay(Duration::ZERO);

    // A token that expired, an unknown one: 401 in Anthropic's shape, counted.
    mock.set_oauth_token_lifetime(Duration::from_secs(0));
    let (at0, _) = mock.mint_oauth_tokens("user:inference");
    assert_eq!(api(&mock, &at0).await, StatusCode::UNAUTHORIZED);
    assert_eq!(api(&mock, "mock-oauth-at-424242").await, StatusCode::UNAUTHORIZED);
    // Other Bearer values are as before.
    assert_eq!(api(&mock, "some-setup-token").await, StatusCode::OK);

    // Revoking: the live access token and the current refresh token die.
    mock.set_oauth_token_lifetime(Duration::from_secs(3600));
    let (at, rt) = mock.mint_oauth_tokens("user:inference");
    assert_eq!(api(&mock, &at).await, StatusCode::OK);
    mock.revoke_all_oauth_tokens();
    assert_eq!(api(&mock, &at).await, StatusCode::UNAUTHORIZED);
    let (s, e) = token(&mock, refresh_grant(&rt)).await;
    assert_eq!(
        (s, e["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_grant"))
    );

    let c = mock.oauth_counters();
    assert_eq!(
        c,
        OAuthCounters {
            authorizations: 0,
            code_grants: 0,
            refresh_grants: 4,
            rotations: 1,
            invalid_grants: 1,
            injected_failures: 2,
            rejected_access_tokens: 3,
        }
    );
    let last = mock
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.path() == "/v1/messages")
        .unwrap();
    assert_eq!(last.header("authorization"), Some(format!("Bearer {at}").as_str()));
}

#[tokio::test]
async fn a_401_for_an_expired_token_has_anthropics_shape() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let (at, _) = mock.mint_oauth_tokens("user:inference");
    mock.expire_oauth_access_token(&at);
    let auth = format!("Bearer {at}");
    let (s, body) = send(
        Method::GET,
        &format!("{}/v1/models", mock.base_url()),
        &[("authorization", &auth)],
        None,
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "authentication_error");
    assert!(v["request_id"].is_string());
}
