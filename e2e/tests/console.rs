//! The web console in a real browser (issue 15): headless Chromium (Debian's `chromium` and
//! `chromium-driver`, through Python's `selenium`; `tests/console_client.py`) against a control
//! plane with its console on, a data plane and the mock upstream. The browser signs in, adds an
//! account through the form, creates a key and reads it once, the script sends traffic with it,
//! the browser sees the overview and the key's spend move, opens the key holder's page (that key
//! only), revokes the key through the form and relay refuses it next; a read-only token sees no
//! control and a forged post from the page is refused. It also adds a Claude subscription by the
//! OAuth login (the authorize URL shown, `CODE#STATE` pasted back), follows the request log's
//! live tail (an `EventSource`) while a request is sent, opens a request's detail, pauses and
//! resumes a group, and visits Usage, Audit, Settings and Data planes; every page is checked at
//! phone width (375 px) and walked with the Tab key (every visible control reached). No page, an
//! error page included, logs a console error; a client's markup-looking model name stays text in the
//! live tail. Screenshots of each page are written to a scratch directory, or with
//! `RELAY_CONSOLE_SHOTS=docs/console` to the README's.
//!
//! `scripts/test.sh` installs the browser, the driver and Selenium; without them this test fails,
//! it never skips.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use relay_control_plane::model::Role;
use relay_mock_upstream::MockConfig;
use relay_test_support::control_plane::RO_TOKEN;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

#[tokio::test]
async fn an_operator_and_a_key_holder_use_the_console_in_a_real_browser() {
    let mut cp = ControlPlane::create_with_tokens(
        Backend::Sqlite,
        &[("dp", Role::DataPlane, DP_TOKEN), ("viewer", Role::ReadOnly, RO_TOKEN)],
    )
    .await;
    cp.web = Some(SocketAddr::from(([127, 0, 0, 1], relay_test_support::free_port())));
    cp.resume().await;
    let web = cp.web_url().unwrap();
    let mock = mock(MockConfig::default()).await;
    let (authorize, token_url) = mock.oauth_urls();
    cp.set_setting("oauth.authorize_url", &authorize).await;
    cp.set_setting("oauth.token_url", &token_url).await;
    // Every request's bodies are captured (the request detail shows them and the stream's timeline).
    cp.admin()
        .await
        .add_capture_rule(relay_proto::v1::AddCaptureRuleRequest::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dp = DataPlane::start(&cp.url(), "dp-1", dir.path().join("dp-1")).await;
    dp.wait_version(cp.head().await).await;
    let w = web.clone();
    relay_test_support::wait_for(Duration::from_secs(10), "the console to listen", || {
        let w = w.clone();
        async move { try_send("GET", &format!("{w}/signin")).await }
    })
    .await
    .unwrap();

    // Screenshots go to a scratch directory, so that running the suite leaves the tree clean;
    // `RELAY_CONSOLE_SHOTS=docs/console` (from the repository root) refreshes the README's.
    let scratch = tempfile::tempdir().unwrap();
    let shots = match std::env::var_os("RELAY_CONSOLE_SHOTS") {
        Some(dir) => Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir),
        None => scratch.path().to_path_buf(),
    };
    std::fs::create_dir_all(&shots).unwrap();
    let cfg = json!({
        "web": web,
        "relay": dp.url(""),
        "admin_token": ADMIN_TOKEN,
        "ro_token": RO_TOKEN,
        "upstream": mock.base_url(),
        "shots": shots,
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console_client.py");
    // The servers run on this runtime: the browser is driven off it.
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .arg(cfg.to_string())
            .output()
            .expect("python3 runs")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "console_client.py failed (run scripts/test.sh to install chromium, chromium-driver and selenium): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("{r:#}");

    assert_eq!(r["signed_in_title"], "Overview · relay");
    assert_eq!(r["account_added"], true);
    assert_eq!(r["account_secret_shown"], false, "the account's secret is never shown");
    assert_eq!(r["key_prefix"], "rk-");
    assert_eq!(r["key_shown_again"], false, "the key is shown once");
    assert!(
        r["copy_button"].as_str().unwrap().starts_with("Copied")
            || r["copy_button"].as_str().unwrap().starts_with("Selected")
    );
    assert_eq!(r["traffic"], json!([200, 200, 200]));
    assert_ne!(r["spend_before"], r["spend_after"], "the key's spend moved");
    assert!(
        r["overview_requests_last_hour"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 3
    );
    assert_eq!(r["overview_lists_key"], true);
    assert_eq!(r["me_shows_key"], true);
    assert_eq!(r["me_shows_other_key"], false, "the key holder sees their key only");
    assert_eq!(r["me_shows_account"], false);
    assert!(r["me_recent_rows"].as_u64().unwrap() >= 1, "{r}");
    assert!(r["revoked_notice"].as_str().unwrap().contains("browser-key revoked"));
    assert_eq!(r["after_revoke"], 401, "relay refuses the revoked key");
    assert_eq!(r["after_signout_title"], "Sign in · relay");
    for (page, forms) in r["read_only_controls"].as_object().unwrap() {
        assert_eq!(forms, &json!([]), "a read-only token sees no control on {page}");
    }
    assert_eq!(r["forged_post_status"], 403);
    for (page, px) in r["phone_overflow_px"].as_object().unwrap() {
        assert_eq!(px, 0, "{page} is readable at phone width without scrolling sideways");
    }
    // The subscription login in the browser.
    assert_eq!(r["authorize_url_is_the_mocks"], true);
    assert!(r["login_notice"].as_str().unwrap().contains("sub-browser added"), "{r}");
    assert_eq!(r["login_token_shown"], false, "the tokens are never shown");
    // Requests: the live tail showed the new request; the detail has its attempt.
    assert!(r["tail_row"].as_str().unwrap().contains("browser-key"), "{r}");
    assert_eq!(
        r["tail_markup_elements"], 0,
        "a client's model name is text in the tail"
    );
    assert_eq!(r["tail_script_ran"], false);
    assert!(r["request_rows"].as_u64().unwrap() >= 3);
    assert!(r["detail_title"].as_str().unwrap().starts_with("Request "));
    assert!(
        r["detail_timeline_ticks"].as_u64().unwrap() >= 3,
        "message_start … message_stop"
    );
    assert!(!r["detail_attempt_account"].as_str().unwrap().is_empty());
    // Groups, usage, audit, settings, data planes.
    assert_eq!(
        (r["group_paused"].as_str(), r["group_resumed"].as_str()),
        (Some("paused"), Some("active"))
    );
    assert_eq!(r["usage_lists_key"], true);
    assert!(r["usage_csv"].as_str().unwrap().contains("/usage/export?format=csv"));
    let audit = r["audit_text"].as_str().unwrap();
    assert!(audit.contains("group.") && audit.contains("key."), "{audit}");
    assert!(r["settings_rows"].as_u64().unwrap() > 10);
    assert!(r["planes_text"].as_str().unwrap().contains("dp-1"));
    assert_eq!(r["console_errors"], json!([]), "no page logs a console error");
    assert_eq!(
        r["external_requests"],
        json!([]),
        "no page loads anything from elsewhere"
    );
    for (page, missing) in r["tab_missing"].as_object().unwrap() {
        assert_eq!(missing, &json!([]), "Tab reaches every control of {page}");
    }
    assert!(r["tab_missing"].as_object().unwrap().len() >= 13, "{r}");
    assert!(r["error_page_title"].as_str().unwrap().starts_with("Error"), "{r}");
    for shot in [
        "signin",
        "overview",
        "keys",
        "accounts",
        "me",
        "key-created",
        "keys-read-only",
        "account-login",
        "requests",
        "request-detail",
        "requests-phone",
        "groups",
        "usage",
        "audit",
        "settings",
        "planes",
    ] {
        assert!(shots.join(format!("{shot}.png")).exists(), "{shot}.png");
    }
    drop(mock);
}
