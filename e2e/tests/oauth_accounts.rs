//! Claude subscription (OAuth) accounts with real processes: a standalone relay, relayctl, and the mock
//! upstream playing Anthropic's OAuth server and API. A PKCE login (the test plays the user who opens the URL
//! and pastes `CODE#STATE`), an imported Claude Code credentials file, and a setup token each serve a request
//! through the data plane with `Authorization: Bearer <that token>`, the OAuth beta and no `x-api-key`; a
//! pasted code with another login's state is refused and creates nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use relay_mock_upstream::{MockConfig, MockUpstream};
use relay_test_support::{wait_for, workspace_bin};
use serde_json::Value;

const SETUP_TOKEN: &str = "sk-ant-oat01-setup-token-for-the-e2e-test-0123456789";

struct Relay {
    standalone: Standalone,
    token: String,
    _dir: tempfile::TempDir,
}

impl Relay {
    async fn start(mock: &MockUpstream) -> Relay {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("relay-data");
        let mut standalone = Standalone::spawn(&data, &dir.path().join("relay.log"), &[]);
        standalone.ready().await;
        let token = std::fs::read_to_string(data.join("admin.token"))
            .unwrap()
            .trim()
            .to_string();
        let relay = Relay {
            standalone,
            token,
            _dir: dir,
        };
        let (authorize, token_url) = mock.oauth_urls();
        relay.ctl(&["settings", "set", "oauth.authorize_url", &authorize], None);
        relay.ctl(&["settings", "set", "oauth.token_url", &token_url], None);
        relay
    }

    fn ctl(&self, args: &[&str], stdin: Option<&str>) -> String {
        relayctl(&self.standalone.server(), &self.token, args, stdin)
    }

    fn json(&self, args: &[&str], stdin: Option<&str>) -> Value {
        let mut a = vec!["-o", "json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.ctl(&a, stdin)).unwrap()
    }

    /// A group and a key routed to it; the key.
    fn key_for(&self, group: &str) -> String {
        self.ctl(&["group", "add", group], None);
        let k = self.json(&["key", "create", &format!("key-{group}"), "--group", group], None);
        k["key"].as_str().unwrap().to_string()
    }

    /// `relayctl account login`, playing the user: open the printed URL (the mock approves at once and shows
    /// `CODE#STATE`), let `edit` change what is pasted, paste it. Exit success, stdout and stderr.
    async fn login(&self, args: &[&str], edit: impl Fn(&str) -> String) -> (bool, String, String) {
        let mut child = Command::new(workspace_bin("relayctl"))
            .args(["-o", "json", "account", "login"])
            .args(args)
            .env("RELAY_SERVER", self.standalone.server())
            .env("RELAY_ADMIN_TOKEN", &self.token)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut printed = String::new();
        let url = loop {
            let mut line = String::new();
            assert!(
                stdout.read_line(&mut line).unwrap() > 0,
                "relayctl printed no URL: {printed}"
            );
            printed.push_str(&line);
            if line.starts_with("http") {
                break line.trim().to_string();
            }
        };
        assert!(
            printed.starts_with("Open this URL, approve, and paste the code shown (CODE#STATE):"),
            "{printed}"
        );
        let page = send("GET", &url, &[], "").await;
        assert_eq!(page.status, 200, "{}", String::from_utf8_lossy(&page.body));
        let pasted = edit(std::str::from_utf8(&page.body).unwrap());
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(format!("{pasted}\n").as_bytes()).unwrap();
        drop(stdin);
        let mut rest = String::new();
        stdout.read_to_string(&mut rest).unwrap();
        let mut stderr = String::new();
        child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        let status = child.wait().unwrap();
        (status.success(), rest, stderr)
    }
}

/// Sends a request with `key` through the data plane until it is served (the config may take a moment to
/// arrive); returns the mock's record of the request it received.
async fn serve_through(relay: &Relay, mock: &MockUpstream, key: &str) -> relay_mock_upstream::RecordedRequest {
    mock.clear_requests();
    let url = format!("http://127.0.0.1:{}/v1/messages", relay.standalone.proxy);
    let body = message_body("claude-sonnet-4-5", false).to_string();
    wait_for(Duration::from_secs(10), "the request to be served", || {
        let (url, key, body) = (url.clone(), key.to_string(), body.clone());
        async move {
            let h = sdk_headers(&key);
            let hs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let r = send("POST", &url, &hs, body).await;
            (r.status == 200).then_some(())
        }
    })
    .await
    .unwrap();
    mock.requests()
        .into_iter()
        .rev()
        .find(|r| r.path() == "/v1/messages")
        .unwrap()
}

fn assert_oauth_request(r: &relay_mock_upstream::RecordedRequest, token: Option<&str>) {
    let auth = r.header("authorization").unwrap();
    match token {
        Some(t) => assert_eq!(auth, format!("Bearer {t}")),
        None => assert!(auth.starts_with("Bearer mock-oauth-at-"), "{auth}"),
    }
    assert!(
        r.header("anthropic-beta")
            .unwrap_or("")
            .split(',')
            .any(|b| b.trim() == "oauth-2025-04-20"),
        "{:?}",
        r.headers
    );
    assert!(r.header("x-api-key").is_none(), "{:?}", r.headers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn login_import_and_setup_token_each_serve_with_their_bearer() {
    let mock = mock(MockConfig::default()).await;
    let relay = Relay::start(&mock).await;
    let base = mock.base_url();

    // 1. A PKCE login.
    let key = relay.key_for("g-login");
    let (ok, out, err) = relay
        .login(&["sub-login", "--base-url", &base, "--group", "g-login"], |p| {
            p.to_string()
        })
        .await;
    assert!(ok, "login failed: {err}");
    let info: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(info["name"], "sub-login");
    assert_eq!(info["kind"], "claude-oauth");
    assert_eq!(info["organization"], "Mock Org");
    assert_eq!(
        info["scopes"],
        serde_json::json!([
            "org:create_api_key",
            "user:profile",
            "user:inference",
            "user:sessions:claude_code"
        ])
    );
    assert!(
        !info["credential_hint"].as_str().unwrap().contains("setup token"),
        "{info}"
    );
    assert!(info["credential_expires_at"].is_string(), "{info}");
    let c = mock.oauth_counters();
    assert_eq!((c.authorizations, c.code_grants, c.invalid_grants), (1, 1, 0), "{c:?}");
    assert!(!out.contains("mock-oauth-at-") && !out.contains("mock-oauth-rt-") && !err.contains("mock-oauth"));
    let r = serve_through(&relay, &mock, &key).await;
    assert_oauth_request(&r, None);

    // 2. Claude Code's credentials file.
    let key = relay.key_for("g-file");
    let (at, rt) = mock.mint_oauth_tokens("user:inference user:profile");
    let file = tempfile::NamedTempFile::new().unwrap();
    let expires = chrono::Utc::now().timestamp_millis() + 3_600_000;
    std::fs::write(
        file.path(),
        format!(
            r#"{{"claudeAiOauth":{{"accessToken":"{at}","refreshToken":"{rt}","expiresAt":{expires},
                "scopes":["user:inference","user:profile"],"subscriptionType":"max"}}}}"#
        ),
    )
    .unwrap();
    let info = relay.json(
        &[
            "account",
            "add",
            "sub-file",
            "--kind",
            "claude-oauth",
            "--credentials-file",
            file.path().to_str().unwrap(),
            "--base-url",
            &base,
            "--group",
            "g-file",
        ],
        None,
    );
    assert_eq!(info["subscription_type"], "max");
    assert_eq!(info["scopes"], serde_json::json!(["user:inference", "user:profile"]));
    let r = serve_through(&relay, &mock, &key).await;
    assert_oauth_request(&r, Some(&at));

    // 3. A setup token (no refresh token).
    let key = relay.key_for("g-setup");
    relay.ctl(
        &[
            "account",
            "add",
            "sub-setup",
            "--kind",
            "claude-oauth",
            "--secret-stdin",
            "--base-url",
            &base,
            "--group",
            "g-setup",
        ],
        Some(SETUP_TOKEN),
    );
    let shown = relay.ctl(&["account", "show", "sub-setup"], None);
    assert!(shown.contains("setup token (no refresh)"), "{shown}");
    assert!(!shown.contains(SETUP_TOKEN));
    let r = serve_through(&relay, &mock, &key).await;
    assert_oauth_request(&r, Some(SETUP_TOKEN));

    // The list shows the plan; no token anywhere in it.
    let list = relay.ctl(&["account", "list", "-o", "wide"], None);
    assert!(list.contains("max") && list.contains("Mock Org"), "{list}");
    assert!(!list.contains(&at) && !list.contains(SETUP_TOKEN) && !list.contains("mock-oauth-rt-"));
    assert_eq!(mock.oauth_counters().rejected_access_tokens, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_code_pasted_with_another_logins_state_is_refused_and_creates_nothing() {
    let mock = mock(MockConfig::default()).await;
    let relay = Relay::start(&mock).await;
    let (ok, out, err) = relay
        .login(&["sub-wrong", "--base-url", &mock.base_url()], |p| {
            let (code, _) = p.split_once('#').unwrap();
            format!("{code}#some-other-login-state")
        })
        .await;
    assert!(!ok, "a foreign state was accepted: {out}");
    assert!(
        err.contains("belongs to another login") && err.contains("no account was created"),
        "{err}"
    );
    // The code was never sent to the token endpoint, and there is no account.
    assert_eq!(mock.oauth_counters().code_grants, 0);
    let list = relay.json(&["account", "list"], None);
    assert_eq!(list, serde_json::json!([]));

    // Garbage instead of CODE#STATE: refused too.
    let (ok, _, err) = relay
        .login(&["sub-wrong", "--base-url", &mock.base_url()], |_| "nonsense".into())
        .await;
    assert!(!ok);
    assert!(err.contains("CODE#STATE"), "{err}");
    assert_eq!(relay.json(&["account", "list"], None), serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_login_that_could_not_be_stored_is_refused_before_the_url_is_shown() {
    let mock = mock(MockConfig::default()).await;
    let relay = Relay::start(&mock).await;
    relay.ctl(
        &[
            "account",
            "add",
            "taken",
            "--kind",
            "claude-oauth",
            "--secret-stdin",
            "--base-url",
            &mock.base_url(),
        ],
        Some("sk-ant-oat01-setup"),
    );
    for (args, needle) in [
        (vec!["taken"], "already exists"),
        (vec!["fresh", "--group", "no-such-group"], "no-such-group"),
        (vec!["fresh", "--base-url", "ftp://example.com"], "base URL"),
        (vec!["bad name!"], "invalid account name"),
    ] {
        let out = Command::new(workspace_bin("relayctl"))
            .args(["account", "login"])
            .args(&args)
            .env("RELAY_SERVER", relay.standalone.server())
            .env("RELAY_ADMIN_TOKEN", &relay.token)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(!out.status.success(), "{args:?}: {stdout}");
        assert!(!stdout.contains("http"), "{args:?}: the URL was shown: {stdout}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    assert_eq!(mock.oauth_counters().code_grants, 0);
    let names: Vec<String> = relay
        .json(&["account", "list"], None)
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["taken"]);
}
