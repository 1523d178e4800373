//! The README's quickstart, step by step, with real binaries: one standalone
//! process (control plane on the embedded store plus an in-process data
//! plane), relayctl, and the mock upstream in place of a real account.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use relay_mock_upstream::{expected_usage, Fault, MockConfig};
use relay_test_support::{free_port, wait_for, workspace_bin, Proc};
use std::process::Command;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quickstart_from_nothing_to_a_streamed_answer() {
    let mock = mock(MockConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay-data");
    let (grpc, proxy) = (free_port(), free_port());
    // 1. Start relay.
    let mut cmd = Command::new(workspace_bin("relay-control-plane"));
    cmd.args(["--standalone", "--listen", &format!("127.0.0.1:{grpc}")])
        .args(["--proxy-listen", &format!("127.0.0.1:{proxy}")])
        .args(["--web-listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--data-dir")
        .arg(&data)
        .env_remove("RELAY_ADMIN_TOKEN")
        .env_remove("RELAY_MASTER_KEY");
    let mut relay = Proc::spawn(cmd, &dir.path().join("relay.log")).unwrap();
    let log = wait_for(Duration::from_secs(30), "relay to serve the Anthropic API", || {
        let text = relay.log_text();
        let exited = relay.try_wait();
        async move {
            if let Some(s) = exited {
                panic!("relay exited with {s}: {text}");
            }
            text.contains("serving the Anthropic API").then_some(text)
        }
    })
    .await
    .unwrap();
    assert!(log.contains(&format!("http://127.0.0.1:{proxy}")), "{log}");
    let token = std::fs::read_to_string(data.join("admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let server = format!("127.0.0.1:{grpc}");

    // 2. An account (the mock stands in for Anthropic), 3. a key.
    relayctl(
        &server,
        &token,
        &[
            "account",
            "add",
            "main",
            "--kind",
            "anthropic-compatible",
            "--base-url",
            &mock.base_url(),
            "--secret-stdin",
        ],
        Some("mock-upstream-credential\n"),
    );
    let created: serde_json::Value = serde_json::from_str(&relayctl(
        &server,
        &token,
        &["-o", "json", "key", "create", "my-laptop"],
        None,
    ))
    .unwrap();
    let key = created["key"].as_str().unwrap().to_string();

    // 4. Use it, as an SDK would with ANTHROPIC_BASE_URL and ANTHROPIC_API_KEY.
    let base = format!("http://127.0.0.1:{proxy}");
    let body = message_body("claude-sonnet-4-5", true);
    let r = wait_for(Duration::from_secs(10), "the key to reach the data plane", || {
        let (url, key, body) = (format!("{base}/v1/messages"), key.clone(), body.to_string());
        async move {
            let h = sdk_headers(&key);
            let hs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let r = send("POST", &url, &hs, body).await;
            (r.status == 200).then_some(r)
        }
    })
    .await
    .unwrap();
    let text = String::from_utf8(r.body.to_vec()).unwrap();
    assert!(text.starts_with("event: message_start") && text.contains("event: message_stop"));

    // 5. Look around: usage per key, exact; the in-process data plane is listed.
    let usage = wait_for(Duration::from_secs(10), "usage to be stored", || {
        let out = relayctl(&server, &token, &["-o", "json", "usage", "--by", "key"], None);
        async move {
            let v: serde_json::Value = serde_json::from_str(&out).ok()?;
            (v.as_array()?.len() == 1).then_some(v)
        }
    })
    .await
    .unwrap();
    let row = &usage[0];
    let expected = expected_usage(&body);
    assert_eq!(row["key"], "my-laptop");
    assert_eq!(row["requests"], 1);
    assert_eq!(row["input_tokens"], expected.input_tokens);
    assert_eq!(row["output_tokens"], expected.output_tokens);
    let proxies: serde_json::Value =
        serde_json::from_str(&relayctl(&server, &token, &["-o", "json", "proxies", "list"], None)).unwrap();
    assert_eq!(proxies[0]["node_id"], "standalone");
    assert_eq!(proxies[0]["connected"], true);

    // 6. The account gets rate limited: the log names its health, not a number, in plain text.
    mock.set_fault(
        "mock-upstream-credential",
        Some(Fault::RateLimited { retry_after_secs: 30 }),
    );
    let h = sdk_headers(&key);
    let hs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let r = send("POST", &format!("{base}/v1/messages"), &hs, body.to_string()).await;
    assert_ne!(r.status, 200);
    let line = wait_for(Duration::from_secs(10), "the state change to be logged", || {
        let text = relay.log_text();
        async move {
            text.lines()
                .find(|l| l.contains("account state changed"))
                .map(str::to_string)
        }
    })
    .await
    .unwrap();
    assert!(
        line.contains("health=rate_limited") || line.contains("health=\"rate_limited\""),
        "{line}"
    );
    assert!(!line.contains("ACCOUNT_HEALTH_"), "{line}");
    assert!(line.contains("account=main"), "the account is named: {line}");
    assert!(!line.contains("health=1") && !line.contains('\u{1b}'), "{line}");
    relay.kill();
}

/// The README's first command, `scripts/standalone.sh`, run from another directory (the release
/// build skipped: `RELAY_BIN` names the workspace's binaries): relay keeps its data under the
/// caller's `./relay-data`, and the next steps it prints work as printed in another shell, in
/// another directory: the admin token's path, relayctl on the PATH (with the mock upstream beside
/// it), the gRPC address it was given; the console and the data plane answer where it says.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn standalone_sh_prints_next_steps_that_work_from_anywhere() {
    let mock = mock(MockConfig::default()).await;
    let caller = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let (grpc, proxy, web) = (free_port(), free_port(), free_port());
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let bin = workspace_bin("relay-control-plane").parent().unwrap().to_path_buf();
    let mut cmd = Command::new(root.join("scripts/standalone.sh"));
    cmd.args(["--listen", &format!("127.0.0.1:{grpc}")])
        .args(["--proxy-listen", &format!("127.0.0.1:{proxy}")])
        .arg(format!("--web-listen=127.0.0.1:{web}"))
        .current_dir(caller.path())
        .env("RELAY_BIN", &bin)
        .env_remove("RELAY_DATA_DIR")
        .env_remove("RELAY_ADMIN_TOKEN")
        .env_remove("RELAY_MASTER_KEY");
    let mut relay = Proc::spawn(cmd, &elsewhere.path().join("standalone.log")).unwrap();
    let log = wait_for(Duration::from_secs(30), "relay to serve the Anthropic API", || {
        let text = relay.log_text();
        let exited = relay.try_wait();
        async move {
            if let Some(s) = exited {
                panic!("standalone.sh exited with {s}: {text}");
            }
            text.contains("serving the Anthropic API").then_some(text)
        }
    })
    .await
    .unwrap();
    let data = caller.path().join("relay-data");
    assert!(
        data.join("admin.token").exists(),
        "no admin token in the caller's ./relay-data: {log}"
    );
    // The steps: the indented lines between "In another shell:" and the first "claude" line.
    let steps: Vec<&str> = log
        .lines()
        .skip_while(|l| !l.contains("In another shell:"))
        .skip(1)
        .take_while(|l| !l.contains("claude"))
        .filter_map(|l| l.strip_prefix("  "))
        .collect();
    assert!(
        steps
            .iter()
            .any(|s| s.contains(&format!("{}/admin.token", data.display()))),
        "the steps name the admin token by its absolute path: {log}"
    );
    assert!(
        log.contains(&format!("http://127.0.0.1:{web}")),
        "the console's address: {log}"
    );
    assert!(
        log.contains("relay-mock-upstream --listen"),
        "how to try without a real key: {log}"
    );
    assert!(
        bin.join("relay-mock-upstream").exists(),
        "the mock upstream is beside relayctl"
    );
    // Follow them in another directory, with the mock standing in for the Anthropic key.
    let script = steps
        .iter()
        .map(|s| {
            if s.contains("YOUR_ANTHROPIC_API_KEY") {
                format!(
                    "printf mock-key | relayctl account create mock --kind anthropic-compatible --base-url {} --secret-stdin >/dev/null",
                    mock.base_url()
                )
            } else if s.starts_with("relayctl key create") {
                "relayctl -o json key create my-laptop".to_string()
            } else {
                s.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let out = Command::new("bash")
        .args(["-euc", &script])
        .current_dir(elsewhere.path())
        .env_remove("RELAY_SERVER")
        .env_remove("RELAY_ADMIN_TOKEN")
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the printed steps failed:\n{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let key = created["key"].as_str().unwrap().to_string();
    let body = message_body("claude-sonnet-4-5", false);
    let r = wait_for(
        Duration::from_secs(10),
        "the key to work on the printed base URL",
        || {
            let (url, key, body) = (
                format!("http://127.0.0.1:{proxy}/v1/messages"),
                key.clone(),
                body.to_string(),
            );
            async move {
                let h = sdk_headers(&key);
                let hs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let r = send("POST", &url, &hs, body).await;
                (r.status == 200).then_some(r)
            }
        },
    )
    .await
    .unwrap();
    assert!(String::from_utf8_lossy(&r.body).contains("\"usage\""));
    let console = send("GET", &format!("http://127.0.0.1:{web}/"), &[], String::new()).await;
    assert_eq!(console.status, 303, "the console asks to sign in");
    relay.kill();
}
