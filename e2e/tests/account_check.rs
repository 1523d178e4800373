//! `relayctl account check`: every account probed with a call that costs no tokens, each verdict
//! printed, the accounts marked by what was found, and a repaired account brought back.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use relay_mock_upstream::{Fault, MockConfig};
use relay_proto::v1 as pb;

/// relayctl's (exit success, stdout, stderr).
fn relayctl_status(server: &str, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(relay_test_support::workspace_bin("relayctl"))
        .args(args)
        .env("RELAY_SERVER", server)
        .env("RELAY_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn states(cp: &ControlPlane, name: &str) -> Vec<pb::AccountState> {
    cp.admin()
        .await
        .get_account(pb::GetAccountRequest { account: name.into() })
        .await
        .unwrap()
        .into_inner()
        .states
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn check_prints_verdicts_marks_accounts_and_brings_a_repaired_one_back() {
    let cp = ControlPlane::start(Backend::Sqlite).await;
    let mock = mock(MockConfig::default()).await;
    mock.set_fault("key-bad", Some(Fault::Unauthorized));
    mock.set_fault("key-busy", Some(Fault::RateLimited { retry_after_secs: 40 }));
    cp.add_account("good", &mock.base_url(), "key-good").await;
    cp.add_account("bad", &mock.base_url(), "key-bad").await;
    cp.add_account("busy", &mock.base_url(), "key-busy").await;
    let closed = relay_test_support::free_port();
    cp.add_account("gone", &format!("http://127.0.0.1:{closed}"), "key-gone")
        .await;
    // A server that answers, but not the Messages API where the base URL leads: 404 on the
    // models list and on the Messages route alike. Not "ok".
    cp.add_account("wrongpath", &format!("{}/nothing/here", mock.base_url()), "key-good")
        .await;

    let (ok, table, err) = relayctl_status(&cp.url(), &["account", "check", "--all"]);
    assert!(!ok, "some accounts are not ok, so the exit status says so: {table}");
    assert!(err.contains("4 of 5 account(s) not ok"), "{err}");
    assert!(table.contains("rate limited until"), "{table}");
    assert!(!table.contains("key-"), "no credential in the output: {table}");
    let (_, out, _) = relayctl_status(&cp.url(), &["account", "check", "--all", "-o", "json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let row = |name: &str| {
        rows.iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("no row for {name}: {out}"))
            .clone()
    };
    assert_eq!(row("good")["verdict"], "ok", "{out}");
    assert_eq!(row("bad")["verdict"], "unauthorized", "{out}");
    assert!(row("bad")["detail"].as_str().unwrap().contains("401"), "{out}");
    assert!(
        row("busy")["verdict"]
            .as_str()
            .unwrap()
            .starts_with("rate limited until"),
        "{out}"
    );
    assert_eq!(row("gone")["verdict"], "unreachable", "{out}");
    assert_eq!(row("wrongpath")["verdict"], "erroring", "{out}");
    assert!(
        row("wrongpath")["detail"]
            .as_str()
            .unwrap()
            .contains("does not lead to the Messages API"),
        "{out}"
    );
    // The second check found the same: nothing new to mark.
    assert_eq!(row("bad")["marked"], "unchanged", "{out}");

    // The probes cost no tokens: model listings, and for the one without a list the Messages
    // route with a request no model runs.
    for r in mock.requests() {
        assert!(
            r.path() == "/v1/models" || r.path().starts_with("/nothing/here/v1/"),
            "{}",
            r.path()
        );
    }
    assert!(mock
        .requests()
        .iter()
        .any(|r| r.path() == "/nothing/here/v1/messages" && r.body.as_ref() == b"{}"));

    // Marked: the bad one out until its credential changes, the busy one until its reset.
    let bad = states(&cp, "bad").await;
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0].health, pb::AccountHealth::Unauthorized as i32);
    assert_eq!(bad[0].until_ms, 0);
    let busy = states(&cp, "busy").await;
    assert_eq!(busy[0].health, pb::AccountHealth::RateLimited as i32);
    let in_40s = chrono::Utc::now().timestamp_millis() + 40_000;
    assert!(
        (in_40s - 5_000..=in_40s + 1_000).contains(&busy[0].until_ms),
        "{busy:?}"
    );
    assert_eq!(states(&cp, "gone").await[0].health, pb::AccountHealth::Erroring as i32);
    assert!(states(&cp, "good").await.is_empty());

    // The upstream repairs the account: a check brings it back.
    mock.set_fault("key-bad", None);
    let (ok, out, _) = relayctl_status(&cp.url(), &["account", "check", "bad", "-o", "json"]);
    assert!(ok, "{out}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (&rows[0]["verdict"], &rows[0]["marked"]),
        (&"ok".into(), &"yes".into()),
        "{out}"
    );
    assert!(states(&cp, "bad").await.is_empty());
    // The check is audited.
    let audit = relayctl(&cp.url(), ADMIN_TOKEN, &["audit"], None);
    assert!(audit.contains("account.check"), "{audit}");
}

/// An upstream that quotes the credential it was sent in its error: the check's verdict, the
/// account's state it marks and the audit entry show it masked, never whole or in part.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_check_against_an_upstream_quoting_the_credential_shows_it_masked() {
    const CREDENTIAL: &str = "sk-ant-api03-PROBED-credential-0123456789abcdefghij";
    let cp = ControlPlane::start(Backend::Sqlite).await;
    let mock = mock(MockConfig::default()).await;
    mock.set_fault(CREDENTIAL, Some(Fault::EchoCredential { last: 0 }));
    cp.add_account("echo", &mock.base_url(), CREDENTIAL).await;
    let (ok, out, err) = relayctl_status(&cp.url(), &["account", "check", "echo", "-o", "json"]);
    assert!(!ok, "{out} {err}");
    let tail = &CREDENTIAL[CREDENTIAL.len() - 20..];
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let detail = rows[0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("HTTP 400") && detail.contains("Incorrect API key provided: sk-ant…ghij"),
        "{out}"
    );
    assert!(!out.contains(tail) && !err.contains(tail), "{out} {err}");
    let states = states(&cp, "echo").await;
    assert_eq!(states.len(), 1, "{states:?}");
    assert!(
        states[0].reason.contains("sk-ant…ghij") && !states[0].reason.contains(tail),
        "{states:?}"
    );
    let audit = relayctl(&cp.url(), ADMIN_TOKEN, &["audit", "-o", "json"], None);
    assert!(audit.contains("account.check") && !audit.contains(tail), "{audit}");
}
