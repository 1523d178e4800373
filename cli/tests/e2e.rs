//! relayctl against real control-plane processes, as a new user would use
//! them: standalone (embedded store) and Postgres-backed. Also checks that no
//! secret reaches the database file, any log line or any error message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use relay_proto::v1 as pb;
use relay_test_support::{free_port, wait_for, workspace_bin, Proc, TestDb};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const UPSTREAM_SECRET: &str = "sk-ant-api03-UPSTREAM-SECRET-never-logged-0123456789";
const PROXY_PASSWORD: &str = "proxy-PASSWORD-never-logged-42";

struct Env {
    server: String,
    token: String,
    dir: tempfile::TempDir,
}

impl Env {
    fn relayctl(&self, args: &[&str], stdin: Option<&str>) -> Output {
        self.relayctl_as(&self.token, args, stdin)
    }

    fn relayctl_as(&self, token: &str, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(workspace_bin("relayctl"));
        cmd.args(args)
            .env("RELAY_SERVER", &self.server)
            .env("RELAY_ADMIN_TOKEN", token)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("relayctl runs");
        if let Some(s) = stdin {
            child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        // Every error message relayctl prints is checked for secrets too.
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains(UPSTREAM_SECRET), "secret in relayctl stderr: {stderr}");
        assert!(!stderr.contains(&self.token), "admin token in relayctl stderr");
        out
    }

    /// Runs relayctl, expects success, returns stdout.
    fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.relayctl(args, stdin);
        assert!(
            out.status.success(),
            "relayctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str], stdin: Option<&str>) -> Value {
        let mut a = vec!["-o", "json"];
        a.extend_from_slice(args);
        let s = self.ok(&a, stdin);
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("relayctl {args:?} printed no JSON ({e}): {s}"))
    }
}

fn start_control_plane(args: &[&str], envs: &[(&str, &str)], log: &Path) -> (Proc, String) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut cmd = Command::new(workspace_bin("relay-control-plane"));
    cmd.args(args).args(["--listen", &listen]).env("RUST_LOG", "debug");
    cmd.env_remove("RELAY_ADMIN_TOKEN").env_remove("RELAY_MASTER_KEY");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let proc = Proc::spawn(cmd, log).unwrap();
    (proc, listen)
}

async fn wait_listening(proc: &mut Proc) {
    wait_for(Duration::from_secs(30), "control plane to listen", || {
        let text = proc.log_text();
        let exited = proc.try_wait();
        async move {
            if let Some(status) = exited {
                panic!("control plane exited with {status}: {text}");
            }
            text.contains("listening on").then_some(())
        }
    })
    .await
    .unwrap();
}

async fn report_usage(server: &str, dp_token: &str, events: Vec<pb::UsageEvent>) -> pb::BatchAck {
    use futures::StreamExt;
    let channel = tonic::transport::Channel::from_shared(format!("http://{server}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let token: tonic::metadata::MetadataValue<_> = format!("Bearer {dp_token}").parse().unwrap();
    let mut client = relay_proto::v1::usage_ingest_client::UsageIngestClient::with_interceptor(
        channel,
        move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", token.clone());
            Ok(r)
        },
    );
    let batch = pb::UsageBatch {
        batch_id: 1,
        node_id: "e2e".into(),
        events,
        oldest_unacked_age_ms: 0,
    };
    let mut acks = client
        .report(futures::stream::iter(vec![batch]))
        .await
        .unwrap()
        .into_inner();
    acks.next().await.unwrap().unwrap()
}

/// The walk a new operator takes, with the checks they would make.
async fn operator_walkthrough(env: &Env) -> (String, String) {
    // Groups, an account (secret on stdin), a key.
    env.ok(&["group", "add", "team-a", "--description", "Team A"], None);
    env.ok(
        &[
            "account",
            "add",
            "acct-1",
            "--kind",
            "anthropic-api-key",
            "--secret-stdin",
            "--group",
            "team-a",
            "--priority",
            "1",
            "--weight",
            "3",
        ],
        Some(&format!("{UPSTREAM_SECRET}\n")),
    );
    let created = env.json(
        &[
            "key",
            "create",
            "team-a-key",
            "--group",
            "team-a",
            "--models",
            "claude-sonnet-4-5,claude-haiku-4-5",
        ],
        None,
    );
    let api_key = created["key"].as_str().unwrap().to_string();
    assert!(api_key.starts_with("rk-") && api_key.len() >= 40, "{api_key}");

    // An account behind a proxy with a password, read from a file: shown redacted.
    let proxy_file = env.dir.path().join("proxy-url");
    std::fs::write(
        &proxy_file,
        format!("socks5h://egress:{PROXY_PASSWORD}@proxy.internal:1080\n"),
    )
    .unwrap();
    env.ok(
        &[
            "account",
            "add",
            "acct-proxied",
            "--kind",
            "anthropic-api-key",
            "--secret-stdin",
            "--proxy-url-file",
            proxy_file.to_str().unwrap(),
        ],
        Some(&format!("{UPSTREAM_SECRET}\n")),
    );
    let proxied = env.json(&["account", "show", "acct-proxied"], None);
    assert_eq!(proxied["proxy_url"], "socks5h://…@proxy.internal:1080", "{proxied}");

    // Listed as a table and as JSON, without the secrets.
    let table = env.ok(&["account", "list"], None);
    assert!(table.contains("acct-1") && table.contains("team-a"), "{table}");
    assert!(!table.contains(UPSTREAM_SECRET));
    let accounts = env.json(&["account", "list"], None);
    let a = &accounts.as_array().unwrap()[0];
    assert_eq!(a["name"], "acct-1");
    assert_eq!(a["kind"], "anthropic-api-key");
    assert_eq!(a["priority"], 1);
    assert_eq!(a["weight"], 3);
    assert_eq!(a["groups"], serde_json::json!(["team-a"]));
    assert_eq!(a["status"], "enabled");
    assert!(!accounts.to_string().contains(UPSTREAM_SECRET));

    // Short ids: each row's id is told apart from the others' (the accounts were made within a
    // second, so their first 8 characters are the same), and taken where an id is.
    let mut shorts = Vec::new();
    for line in table.lines().filter(|l| l.contains("acct-")) {
        let cells: Vec<&str> = line
            .split('┆')
            .map(|c| c.trim_matches(|ch: char| ch == '│' || ch.is_whitespace()))
            .collect();
        let (name, short) = (cells[0], cells[1]);
        let full = accounts.as_array().unwrap().iter().find(|a| a["name"] == name).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            full.starts_with(short) && short.len() >= 8 && short.len() < full.len(),
            "{table}"
        );
        assert_eq!(env.json(&["account", "show", short], None)["name"], name);
        shorts.push(short.to_string());
    }
    assert_eq!(shorts.len(), 2, "{table}");
    assert_ne!(shorts[0], shorts[1], "{table}");
    let out = env.relayctl(&["account", "show", &shorts[0][..4]], None);
    assert!(!out.status.success());
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(
        why.contains("acct-1, acct-proxied") || why.contains("acct-proxied, acct-1"),
        "{why}"
    );
    assert!(why.contains("give more of the id, or the name"), "{why}");

    let keys = env.json(&["key", "list"], None);
    let k = &keys.as_array().unwrap()[0];
    assert_eq!(k["name"], "team-a-key");
    assert_eq!(k["group"], "team-a");
    assert_eq!(k["rpm"], 0, "unlimited: {k}");
    assert_eq!(
        k["allowed_models"],
        serde_json::json!(["claude-sonnet-4-5", "claude-haiku-4-5"])
    );
    assert!(!keys.to_string().contains(&api_key), "the key is shown once only");
    let shown = env.json(&["key", "show", "team-a-key"], None);
    assert_eq!(shown["name"], "team-a-key");
    assert!(!shown.to_string().contains(&api_key));
    let groups = env.json(&["group", "list"], None);
    let g = groups
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "team-a")
        .unwrap()
        .clone();
    assert_eq!(
        (g["account_count"].as_u64(), g["key_count"].as_u64()),
        (Some(1), Some(1))
    );

    // Disable, update, show.
    env.ok(&["account", "disable", "acct-1"], None);
    assert_eq!(env.json(&["account", "show", "acct-1"], None)["status"], "disabled");
    env.ok(&["account", "enable", "acct-1"], None);
    env.ok(&["account", "update", "acct-1", "--weight", "5"], None);
    assert_eq!(env.json(&["account", "show", "acct-1"], None)["weight"], 5);
    let k = env.json(&["key", "update", "team-a-key", "--tpm", "100000"], None);
    assert_eq!(k["tpm"], 100000, "{k}");
    let k = env.json(&["key", "update", "team-a-key", "--tpm", "0"], None);
    assert_eq!(k["tpm"], 0, "0 clears a limit: {k}");
    // A unique id prefix names a key for a limit change too, as for every other command.
    let id = k["id"].as_str().unwrap().to_owned();
    let k = env.json(&["key", "update", &id[..18], "--rpm", "7"], None);
    assert_eq!((k["rpm"].as_u64(), k["tpm"].as_u64()), (Some(7), Some(0)), "{k}");

    // Pricing: the default table is there; an override is listed.
    let prices = env.json(&["pricing", "list"], None);
    assert!(prices
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["model_pattern"] == "claude-sonnet-4*" && p["source"] == "builtin"));
    // The global `--output` is the format, also on `pricing set` (its prices are `--*-price`).
    let set = env.ok(
        &[
            "pricing",
            "set",
            "my-model",
            "--input-price",
            "2",
            "--output-price",
            "8",
            "--output",
            "json",
        ],
        None,
    );
    let set: Value = serde_json::from_str(&set).unwrap_or_else(|e| panic!("not JSON ({e}): {set}"));
    assert_eq!(set["output"].as_f64(), Some(8.0), "{set}");
    let prices = env.json(&["pricing", "list"], None);
    let mine = prices
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["model_pattern"] == "my-model")
        .unwrap()
        .clone();
    assert_eq!(
        mine["cache_write_5m"].as_f64(),
        Some(2.5),
        "5m write defaults to 1.25x input"
    );
    // `pricing rm`: an unknown pattern is refused with what to do; a built-in price stays.
    let out = env.relayctl(&["pricing", "rm", "my-modle"], None);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no price for model pattern \"my-modle\"") && err.contains("relayctl pricing list"),
        "{err}"
    );
    let out = env.relayctl(&["pricing", "rm", "claude-sonnet-4*"], None);
    assert!(String::from_utf8_lossy(&out.stderr).contains("built-in"));
    env.ok(
        &[
            "pricing",
            "set",
            "gone-model",
            "--input-price",
            "1",
            "--output-price",
            "1",
        ],
        None,
    );
    let said = env.ok(&["pricing", "rm", "gone-model"], None);
    assert!(said.starts_with("removed 1 price of \"gone-model\""), "{said}");
    let prices = env.json(&["pricing", "list"], None);
    assert!(!prices
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["model_pattern"] == "gone-model"));

    // Audit log: who did what, never the secret.
    let audit = env.json(&["audit", "--limit", "50"], None);
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for want in [
        "group.create",
        "account.create",
        "key.create",
        "account.disable",
        "account.update",
        "price.set",
    ] {
        assert!(actions.contains(&want), "{want} missing from {actions:?}");
    }
    let audit_text = env.ok(&["audit"], None);
    assert!(!audit_text.contains(UPSTREAM_SECRET) && !audit_text.contains(&api_key));

    // Roles: a read-only token can read and not write.
    let ro = env.json(&["token", "create", "viewer", "--role", "read-only"], None)["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(env.relayctl_as(&ro, &["account", "list"], None).status.success());
    // `token list` says where each token came from.
    let tokens = env.json(&["token", "list"], None);
    let viewer = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "viewer")
        .unwrap();
    assert!(
        viewer["source"].as_str().unwrap().starts_with("created by "),
        "{tokens}"
    );
    assert!(env.ok(&["token", "list"], None).contains("Source"));
    let denied = env.relayctl_as(&ro, &["group", "add", "nope"], None);
    assert_eq!(denied.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&denied.stderr).contains("permission denied"));
    // A wrong token: a clear error, non-zero exit.
    let bad = env.relayctl_as("rat-wrong", &["account", "list"], None);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unauthenticated"));
    // Bad input: a clear error, nothing changed.
    let before = env.json(&["version"], None)["revision"].as_u64();
    let out = env.relayctl(
        &["account", "add", "x y", "--kind", "anthropic-api-key", "--secret-stdin"],
        Some("sk-x-0123456789\n"),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid account name"));
    assert_eq!(env.json(&["version"], None)["revision"].as_u64(), before);

    // Usage reported by a data plane shows up exact, per model, as JSON and CSV.
    let dp = env.json(&["token", "create", "dp-1", "--role", "data-plane"], None)["token"]
        .as_str()
        .unwrap()
        .to_string();
    let key_id = env.json(&["key", "list"], None)[0]["id"].as_str().unwrap().to_string();
    let events: Vec<pb::UsageEvent> = (0..3u64)
        .map(|i| pb::UsageEvent {
            event_id: uuid::Uuid::now_v7().to_string(),
            request_id: format!("req_{i}"),
            timestamp_ms: chrono::Utc::now().timestamp_millis(),
            api_key_id: key_id.clone(),
            account_id: "acct".into(),
            model: "claude-sonnet-4-5".into(),
            input_tokens: 1000,
            output_tokens: 500,
            cache_write_5m_tokens: 100,
            cache_write_1h_tokens: 10,
            cache_read_tokens: 2000,
            // 1000*3 + 500*15 + 100*3.75 + 10*6 + 2000*0.3 micro-USD = 11535 µUSD
            cost_pico_usd: 11_535_000_000,
            http_status: 200,
            ..Default::default()
        })
        .collect();
    let ack = report_usage(&env.server, &dp, events).await;
    assert_eq!(ack.inserted, 3);
    let usage = env.json(&["usage", "--by", "key", "--since", "1h"], None);
    let row = &usage.as_array().unwrap()[0];
    assert_eq!(row["key"], "team-a-key");
    assert_eq!(row["requests"], 3);
    assert_eq!(row["input_tokens"], 3000);
    assert_eq!(row["output_tokens"], 1500);
    assert_eq!(row["cache_write_5m_tokens"], 300);
    assert_eq!(row["cache_write_1h_tokens"], 30);
    assert_eq!(row["cache_read_tokens"], 6000);
    assert_eq!(row["cost_usd"].as_f64(), Some(0.034605));
    let csv = env.ok(&["-o", "csv", "usage", "--by", "model"], None);
    let mut lines = csv.lines();
    let header = lines.next().unwrap();
    for col in ["requests", "input_tokens", "output_tokens", "cost_usd"] {
        assert!(header.contains(col), "{header}");
    }
    assert!(lines.next().unwrap().contains("claude-sonnet-4-5"));

    // A deleted account keeps its name in usage reports.
    env.ok(
        &[
            "account",
            "create",
            "acct-gone",
            "--kind",
            "anthropic-api-key",
            "--secret-stdin",
        ],
        Some(&format!("{UPSTREAM_SECRET}\n")),
    );
    let gone_id = env.json(&["account", "show", "acct-gone"], None)["id"]
        .as_str()
        .unwrap()
        .to_string();
    let event = pb::UsageEvent {
        event_id: uuid::Uuid::now_v7().to_string(),
        request_id: "req_gone".into(),
        timestamp_ms: chrono::Utc::now().timestamp_millis(),
        // Not team-a-key's: its budgets are checked to the micro-dollar below.
        api_key_id: "key-elsewhere".into(),
        account_id: gone_id.clone(),
        model: "claude-sonnet-4-5".into(),
        input_tokens: 10,
        cost_pico_usd: 1_000_000,
        http_status: 200,
        ..Default::default()
    };
    assert_eq!(report_usage(&env.server, &dp, vec![event]).await.inserted, 1);
    env.ok(&["account", "rm", "acct-gone"], None);
    let usage = env.json(&["usage", "--by", "account"], None);
    let row = usage
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["account_id"] == gone_id.as_str())
        .unwrap_or_else(|| panic!("{usage}"))
        .clone();
    assert_eq!(row["account"], "acct-gone (deleted)", "{row}");
    assert_eq!(row["requests"], 1);
    let table = env.ok(&["usage", "--by", "account"], None);
    assert!(table.contains("acct-gone (deleted)"), "{table}");
    limits_walkthrough(env).await;
    settings_walkthrough(env);
    // Revoking by name works with the admin token in the environment (issue 12, item 9).
    env.json(&["token", "create", "short-lived", "--role", "read-only"], None);
    env.ok(&["token", "revoke", "short-lived"], None);
    let tokens = env.json(&["token", "list"], None);
    assert!(!tokens.to_string().contains("short-lived"), "{tokens}");
    (api_key, ro)
}

/// Limits on keys and groups, refused when malformed, and the budgets' spend as `key show` tells
/// it (the walkthrough reported $0.034605 of usage for team-a-key today).
async fn limits_walkthrough(env: &Env) {
    // A group's limits are the total across its keys: set, listed compactly, updated in place.
    let g = env.json(
        &["group", "create", "team-b", "--rpm", "600", "--daily-budget", "50"],
        None,
    );
    assert_eq!(
        (g["rpm"].as_u64(), g["daily_budget_usd"].as_f64()),
        (Some(600), Some(50.0))
    );
    let table = env.ok(&["group", "list"], None);
    assert!(
        table.contains("600 rpm, $50.00/day") && table.contains("unlimited"),
        "{table}"
    );
    let renamed = env.json(
        &[
            "group",
            "update",
            "team-b",
            "--name",
            "team-c",
            "--rpm",
            "0",
            "--monthly-budget",
            "900",
        ],
        None,
    );
    assert_eq!(renamed["id"], g["id"], "a rename keeps the id");
    assert_eq!(renamed["name"], "team-c");
    assert_eq!(renamed["limits"], "$50.00/day, $900.00/month");
    let k = env.json(
        &[
            "key",
            "create",
            "limited",
            "--group",
            "team-c",
            "--rpm",
            "60",
            "--concurrency",
            "2",
            "--daily-budget",
            "12.50",
        ],
        None,
    );
    assert_eq!(
        (
            k["rpm"].as_u64(),
            k["concurrency"].as_u64(),
            k["daily_budget_usd"].as_f64()
        ),
        (Some(60), Some(2), Some(12.5)),
        "{k}"
    );

    // Malformed limits: refused with what to type, before anything is sent; nothing changes.
    let before = env.json(&["version"], None)["revision"].as_u64();
    for (args, says) in [
        (
            &["key", "update", "limited", "--rpm", "-5"][..],
            "a limit cannot be negative; expected a whole number of requests per minute such as 60",
        ),
        (
            &["group", "update", "team-c", "--daily-budget", "lots"][..],
            "expected an amount in USD such as 5 or 12.50",
        ),
        (
            &["key", "create", "x", "--monthly-budget", "-1"][..],
            "a budget cannot be negative",
        ),
    ] {
        let out = env.relayctl(args, None);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let why = String::from_utf8_lossy(&out.stderr);
        assert!(why.contains(says) && why.contains(args[3]), "{args:?}: {why}");
    }
    // Beyond what relay counts exactly: the control plane says so.
    let out = env.relayctl(&["key", "update", "limited", "--daily-budget", "2000000"], None);
    assert_eq!(out.status.code(), Some(1));
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(why.contains("--daily-budget") && why.contains("$1000000.00"), "{why}");
    assert_eq!(env.json(&["version"], None)["revision"].as_u64(), before);

    // `key show`: each limit, the budgets spent today and this month (stored usage), what is
    // left, and the group's. Live use comes from the limiter (standalone: the in-process data
    // plane's); the key's requests so far were made before it had limits, so none were counted.
    env.ok(
        &[
            "key",
            "update",
            "team-a-key",
            "--daily-budget",
            "1",
            "--monthly-budget",
            "0.03",
        ],
        None,
    );
    let mut shown = Value::Null;
    for _ in 0..20 {
        shown = env.json(&["key", "show", "team-a-key"], None);
        if shown["spent_today_usd"].as_f64() == Some(0.034605) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(shown["daily_budget_usd"].as_f64(), Some(1.0), "{shown}");
    assert_eq!(shown["spent_today_usd"].as_f64(), Some(0.034605), "{shown}");
    assert_eq!(shown["remaining_today_usd"].as_f64(), Some(0.965395), "{shown}");
    assert_eq!(shown["spent_this_month_usd"].as_f64(), Some(0.034605), "{shown}");
    assert_eq!(
        shown["remaining_this_month_usd"].as_f64(),
        Some(0.0),
        "overspent, never negative"
    );
    assert_eq!(shown["day"], chrono::Utc::now().format("%Y-%m-%d").to_string());
    assert_eq!(
        shown["live_use"],
        "0 requests and 0 tokens in the last minute, 0 in flight"
    );
    assert_eq!(shown["group_limits"], "unlimited");
    assert_eq!(shown["group_spent_today_usd"].as_f64(), Some(0.034605));
    let table = env.ok(&["key", "show", "team-a-key"], None);
    for want in [
        "Spent today ($)",
        "0.034605",
        "Left today ($)",
        "0.965395",
        "Group limits",
    ] {
        assert!(table.contains(want), "{want}: {table}");
    }
    let limited = env.json(&["key", "show", "limited"], None);
    assert_eq!(limited["group_limits"], "$50.00/day, $900.00/month");
    assert_eq!(limited["remaining_today_usd"].as_f64(), Some(12.5));
    let audit = env.json(&["audit", "--limit", "20"], None);
    assert!(
        audit.as_array().unwrap().iter().any(|e| e["action"] == "group.update"),
        "{audit}"
    );
}

/// Groups that fail over and that an operator steers: fallbacks set, refused when they would
/// loop, cleared; pause, resume and activate shown with since when and by whom, audited.
fn groups_walkthrough(env: &Env) {
    env.ok(&["group", "create", "backup"], None);
    let p = env.json(&["group", "create", "primary", "--fallback", "backup"], None);
    assert_eq!(p["fallbacks"], serde_json::json!(["backup"]), "{p}");
    assert_eq!(
        (p["state"].as_str(), p["state_since"].is_null()),
        (Some("active"), true),
        "{p}"
    );
    let t = env.json(&["group", "create", "third", "--fallback", "primary,backup"], None);
    assert_eq!(t["fallbacks"], serde_json::json!(["primary", "backup"]), "{t}");
    // A loop is refused with the path it would take; nothing changes.
    let out = env.relayctl(&["group", "update", "backup", "--fallback", "third"], None);
    assert_eq!(out.status.code(), Some(1));
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(why.contains("cycle: backup → third → primary → backup"), "{why}");
    let out = env.relayctl(&["group", "update", "backup", "--fallback", "nope"], None);
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"nope\" not found"));

    let paused = env.json(&["group", "pause", "primary"], None);
    assert_eq!(paused["state"], "paused", "{paused}");
    assert!(paused["state_since"].as_str().is_some(), "{paused}");
    assert!(!paused["state_by"].as_str().unwrap_or("").is_empty(), "{paused}");
    let table = env.ok(&["group", "list"], None);
    for want in ["Fallbacks", "State", "Since", "paused", "primary, backup"] {
        assert!(table.contains(want), "{want}: {table}");
    }
    let shown = env.json(&["group", "show", "backup"], None);
    assert_eq!(shown["fallback_of"], serde_json::json!(["primary", "third"]), "{shown}");
    assert_eq!(env.json(&["group", "resume", "primary"], None)["state"], "active");
    assert_eq!(env.json(&["group", "activate", "backup"], None)["state"], "activated");

    // A group that is someone's fallback stays until they let it go.
    let out = env.relayctl(&["group", "rm", "backup"], None);
    assert_eq!(out.status.code(), Some(1));
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(why.contains("is a fallback of"), "{why}");
    let p = env.json(&["group", "update", "primary", "--no-fallback"], None);
    assert_eq!(p["fallbacks"], serde_json::json!([]), "{p}");
    let t = env.json(&["group", "update", "third", "--fallback", ""], None);
    assert_eq!(t["fallbacks"], serde_json::json!([]), "{t}");
    env.ok(&["group", "resume", "backup"], None);
    env.ok(&["group", "rm", "backup"], None);
    let audit = env.json(&["audit", "--limit", "30"], None);
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    for want in ["group.pause", "group.resume", "group.activate", "group.delete"] {
        assert!(actions.contains(&want), "{want}: {actions:?}");
    }
    env.ok(&["group", "rm", "third"], None);
    env.ok(&["group", "rm", "primary"], None);
}

/// Settings: every one listed on a fresh install, typos and bad values refused
/// with what to type instead, unset back to the default.
fn settings_walkthrough(env: &Env) {
    let list = env.json(&["settings", "list"], None);
    let row = |list: &Value, name: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} not listed: {list}"))
    };
    let attempts = row(&list, "retry.max_attempts");
    assert_eq!(
        (attempts["value"].as_str(), attempts["default"].as_str()),
        (Some("4"), Some("4"))
    );
    assert_eq!(attempts["set"], false);
    assert!(list.as_array().unwrap().len() >= 19, "every declared setting: {list}");
    let table = env.ok(&["settings", "list"], None);
    assert!(
        table.contains("upstream.connect_timeout_ms") && table.contains("10000"),
        "{table}"
    );

    for (args, says) in [
        (
            ["settings", "set", "retry.max_attempt", "3"],
            "did you mean retry.max_attempts?",
        ),
        (["settings", "set", "retry.max_attempts", "three"], "integer in 1..=20"),
        (["settings", "set", "retry.max_attempts", ""], "integer in 1..=20"),
        (
            ["settings", "set", "account.nobody.cooldown.overloaded_ms", "5"],
            "not found",
        ),
    ] {
        let out = env.relayctl(&args, None);
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
    assert_eq!(
        env.ok(&["settings", "set", "retry.max_attempts", "2"], None).trim(),
        "retry.max_attempts = 2"
    );
    let set = row(&env.json(&["settings", "list"], None), "retry.max_attempts");
    assert_eq!((set["value"].as_str(), set["set"].as_bool()), (Some("2"), Some(true)));
    let out = env.ok(&["settings", "unset", "retry.max_attempts"], None);
    assert!(out.contains("back to the default 4"), "{out}");
    let unset = row(&env.json(&["settings", "list"], None), "retry.max_attempts");
    assert_eq!(
        (unset["value"].as_str(), unset["set"].as_bool()),
        (Some("4"), Some(false))
    );
    let out = env.relayctl(&["settings", "unset", "retry.max_attempts"], None);
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not set"));
}

fn assert_no_secret_in(path: &Path, secrets: &[&str]) {
    let bytes = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    for s in secrets {
        assert!(!text.contains(s), "a secret was found in {}", path.display());
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_walkthrough() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("cp.log");
    let data_s = data.to_str().unwrap();
    let proxy_listen = format!("127.0.0.1:{}", free_port());
    let standalone = ["--standalone", "--data-dir", data_s, "--proxy-listen", &proxy_listen];
    let (mut cp, server) = start_control_plane(&standalone, &[], &log);
    wait_listening(&mut cp).await;
    wait_for(Duration::from_secs(30), "the in-process data plane", || {
        let text = cp.log_text();
        async move { text.contains("serving the Anthropic API").then_some(()) }
    })
    .await
    .unwrap();

    // The first admin token was generated into the data dir, mode 0600, and only its path printed.
    let token_file = data.join("admin.token");
    let token = std::fs::read_to_string(&token_file).unwrap().trim().to_string();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::metadata(data.join("master.key")).unwrap().permissions().mode() & 0o777,
            0o600
        );
        for db in ["relay.db", "relay.db-wal", "relay.db-shm"] {
            let path = data.join(db);
            if path.exists() || db == "relay.db" {
                assert_eq!(
                    std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                    0o600,
                    "{db}"
                );
            }
        }
    }
    // Where every file it made is: the token, the master key, the store and the data plane's.
    for made in ["relay.db", "data-plane"] {
        let path = data.join(made);
        assert!(path.exists(), "{made}");
        assert!(
            cp.log_text().contains(path.to_str().unwrap()),
            "{made}: {}",
            cp.log_text()
        );
    }
    assert!(cp.log_text().contains(token_file.to_str().unwrap()));
    assert!(
        cp.log_text().contains(data.join("master.key").to_str().unwrap()),
        "{}",
        cp.log_text()
    );

    // https:// against the plain listener: relayctl says the server does not speak TLS.
    let wrong = Env {
        server: format!("https://{server}"),
        token: token.clone(),
        dir: tempfile::tempdir().unwrap(),
    };
    let out = wrong.relayctl(&["account", "list"], None);
    assert!(!out.status.success());
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(why.contains("does not speak TLS"), "{why}");
    // The data plane's port given as --server: relayctl says it is not the admin port.
    let wrong = Env {
        server: proxy_listen.clone(),
        token: token.clone(),
        dir: tempfile::tempdir().unwrap(),
    };
    let out = wrong.relayctl(&["account", "list"], None);
    assert!(!out.status.success());
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(why.contains("is not a relay control plane's admin port"), "{why}");

    let env = Env { server, token, dir };
    let (api_key, ro) = operator_walkthrough(&env).await;
    groups_walkthrough(&env);
    let tokens = env.json(&["token", "list"], None);
    let source = |name: &str| {
        tokens.as_array().unwrap().iter().find(|t| t["name"] == name).unwrap()["source"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(source("admin"), "generated at first start", "{tokens}");
    assert_eq!(source("standalone-data-plane"), "standalone start", "{tokens}");

    // One screen of status: the accounts the walkthrough made, and the last hour.
    let text = env.ok(&["status"], None);
    for line in ["Config version", "Data planes", "Accounts", "Last hour"] {
        assert!(text.contains(line), "{text}");
    }
    let st = env.json(&["status"], None);
    let accounts = env.json(&["account", "list"], None).as_array().unwrap().len() as u64;
    assert_eq!(st["accounts"].as_u64(), Some(accounts), "{st}");
    assert!(st["last_hour_requests"].as_u64().is_some(), "{st}");
    assert_eq!(
        st["build_version"],
        env!("CARGO_PKG_VERSION"),
        "the control plane's version: {st}"
    );
    assert!(text.contains(&format!("relay {}", env!("CARGO_PKG_VERSION"))), "{text}");

    // Restart: everything is still there, the token file is reused.
    cp.kill();
    let (mut cp2, server2) = start_control_plane(&standalone, &[], &env.dir.path().join("cp2.log"));
    wait_listening(&mut cp2).await;
    assert!(cp2.log_text().contains("admin token is in"));
    let env2 = Env {
        server: server2,
        token: env.token.clone(),
        dir: tempfile::tempdir().unwrap(),
    };
    assert_eq!(env2.json(&["account", "show", "acct-1"], None)["weight"], 5);

    // No secret in the database files, the key file aside, nor in any log line.
    let secrets = [
        UPSTREAM_SECRET,
        PROXY_PASSWORD,
        api_key.as_str(),
        env.token.as_str(),
        ro.as_str(),
    ];
    for f in files_under(&data) {
        if f.file_name().is_some_and(|n| n == "admin.token") {
            continue;
        }
        assert_no_secret_in(&f, &secrets);
    }
    assert_no_secret_in(&log, &secrets);
    assert_no_secret_in(&env.dir.path().join("cp2.log"), &secrets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_walkthrough() {
    let db = TestDb::new().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("cp.log");
    let master = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let token = "rat-e2e-bootstrap-token-0123456789abcdefghijklmn";
    // With Redis, as the data planes count there: `key show` reads live counters from it.
    let redis = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let (mut cp, server) = start_control_plane(
        &["--database-url", &db.url, "--redis-url", &redis],
        &[("RELAY_MASTER_KEY", master), ("RELAY_ADMIN_TOKEN", token)],
        &log,
    );
    wait_listening(&mut cp).await;
    // It says what it did with RELAY_ADMIN_TOKEN, and `token list` where that token came from.
    assert!(
        cp.log_text()
            .contains("registered RELAY_ADMIN_TOKEN as the first admin token"),
        "{}",
        cp.log_text()
    );
    let env = Env {
        server,
        token: token.to_string(),
        dir,
    };
    let (api_key, ro) = operator_walkthrough(&env).await;
    let tokens = env.json(&["token", "list"], None);
    let boot = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"].as_str().unwrap().starts_with("bootstrap-"))
        .unwrap_or_else(|| panic!("{tokens}"));
    assert_eq!(boot["source"], "RELAY_ADMIN_TOKEN", "{tokens}");

    // No secret anywhere in the database (every table, as text), nor in the log.
    let (client, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let tables: Vec<String> = client
        .query("SELECT tablename FROM pg_tables WHERE schemaname = 'public'", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(tables.len() >= 10, "{tables:?}");
    for t in tables {
        let rows = client
            .query(
                &format!("SELECT COALESCE(string_agg(x::text, ' '), '') FROM {t} x"),
                &[],
            )
            .await
            .unwrap();
        let dump: String = rows[0].get(0);
        for s in [UPSTREAM_SECRET, PROXY_PASSWORD, api_key.as_str(), token, ro.as_str()] {
            assert!(!dump.contains(s), "a secret is stored in table {t}");
        }
        // bytea columns print as hex: check the hex form of the upstream secret too.
        let hex = relay_proto::hex(UPSTREAM_SECRET.as_bytes());
        assert!(!dump.contains(&hex), "the credential is stored unencrypted in {t}");
    }
    assert_no_secret_in(
        &log,
        &[UPSTREAM_SECRET, PROXY_PASSWORD, api_key.as_str(), token, ro.as_str()],
    );
    // A control plane that cannot reach its database fails with a clear error.
    let out = Command::new(workspace_bin("relay-control-plane"))
        .args([
            "--database-url",
            "postgres://nobody@127.0.0.1:1/none",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("RELAY_MASTER_KEY", master)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("opening the Postgres store"), "{stderr}");
    assert!(stderr.contains("nothing listens there"), "says what to check: {stderr}");
    // The server's own message, and what to do: a role or a database that does not exist.
    let (scheme, rest) = db.url.split_once("://").unwrap();
    let host_and_db = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let no_role = format!("{scheme}://relay_no_such_role@{host_and_db}");
    let (base, _) = db.url.rsplit_once('/').unwrap();
    let no_db = format!("{base}/relay_no_such_database");
    for (url, server_says, what_to_do) in [
        (no_role.as_str(), "relay_no_such_role", "the user in the database URL"),
        (
            no_db.as_str(),
            "database \"relay_no_such_database\" does not exist",
            "create the database",
        ),
    ] {
        let out = Command::new(workspace_bin("relay-control-plane"))
            .args(["--database-url", url, "--listen", "127.0.0.1:0"])
            .env("RELAY_MASTER_KEY", master)
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(server_says), "the server's message: {stderr}");
        assert!(
            stderr.contains(what_to_do) || stderr.contains("password in the database URL"),
            "what to do: {stderr}"
        );
    }

    // A second start on the same database: its log is plain text (not a terminal), with no
    // NOTICE from the migrations.
    cp.kill();
    let log2 = env.dir.path().join("cp2.log");
    let (mut cp2, _) = start_control_plane(
        &["--database-url", &db.url],
        &[("RELAY_MASTER_KEY", master), ("RELAY_ADMIN_TOKEN", token)],
        &log2,
    );
    wait_listening(&mut cp2).await;
    let text = std::fs::read_to_string(&log2).unwrap();
    assert!(!text.contains('\u{1b}'), "ANSI colour codes in a log file: {text}");
    assert!(!text.contains("already exists"), "{text}");
    assert!(text.contains("RELAY_ADMIN_TOKEN is a registered admin token"), "{text}");
    // Another replica given a new RELAY_ADMIN_TOKEN says it did not register it.
    cp2.kill();
    let log3 = env.dir.path().join("cp3.log");
    let other = "rat-another-replica-token-0123456789abcdefghij";
    let (mut cp3, _) = start_control_plane(
        &["--database-url", &db.url],
        &[("RELAY_MASTER_KEY", master), ("RELAY_ADMIN_TOKEN", other)],
        &log3,
    );
    wait_listening(&mut cp3).await;
    let text = cp3.log_text();
    assert!(text.contains("it was not registered"), "{text}");
    assert!(!text.contains(other), "the token itself is never logged");
}

/// The request log as an operator reads it: a table with whole request ids and the attempts as
/// "account:outcome → …", and records whose account and group were deleted since: named (with
/// " (deleted)") and found by their old names, as `relayctl usage` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_log_tables_and_deleted_accounts_and_groups() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("cp.log");
    let proxy_listen = format!("127.0.0.1:{}", free_port());
    let (mut cp, server) = start_control_plane(
        &[
            "--standalone",
            "--data-dir",
            data.to_str().unwrap(),
            "--proxy-listen",
            &proxy_listen,
        ],
        &[],
        &log,
    );
    wait_listening(&mut cp).await;
    let token = std::fs::read_to_string(data.join("admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let env = Env { server, token, dir };
    env.ok(&["group", "add", "g-gone"], None);
    env.ok(
        &[
            "account",
            "create",
            "acct-gone",
            "--kind",
            "anthropic-compatible",
            "--base-url",
            "http://127.0.0.1:9",
            "--group",
            "g-gone",
            "--secret-stdin",
        ],
        Some(UPSTREAM_SECRET),
    );
    let key = env.json(&["key", "create", "k-log", "--group", "g-gone"], None);
    let key_id = key["id"].as_str().unwrap().to_string();
    let group_id = env.json(&["group", "show", "g-gone"], None)["id"]
        .as_str()
        .unwrap()
        .to_string();
    let account_id = env.json(&["account", "show", "acct-gone"], None)["id"]
        .as_str()
        .unwrap()
        .to_string();
    let dp = env.json(&["token", "create", "dp-log", "--role", "data-plane"], None)["token"]
        .as_str()
        .unwrap()
        .to_string();
    let now = chrono::Utc::now().timestamp_millis();
    let attempt = |status: u32, error_type: &str, ts: i64| pb::UsageEvent {
        event_id: uuid::Uuid::now_v7().to_string(),
        request_id: "req_relay_01a2430e49457554af85c7d9dfe29e77".into(),
        timestamp_ms: ts,
        api_key_id: key_id.clone(),
        account_id: account_id.clone(),
        group_id: group_id.clone(),
        model: "claude-sonnet-4-5".into(),
        http_status: status,
        error_type: error_type.into(),
        output_tokens: 5,
        ..Default::default()
    };
    let ack = report_usage(
        &env.server,
        &dp,
        vec![attempt(529, "overloaded_error", now - 10), attempt(200, "", now)],
    )
    .await;
    assert_eq!(ack.inserted, 2);

    // The table: the whole id (what `requests show` takes), the attempts in words.
    let table = env.ok(&["requests", "list"], None);
    assert!(table.contains("req_relay_01a2430e49457554af85c7d9dfe29e77"), "{table}");
    assert!(table.contains("acct-gone:overloaded_error → acct-gone:ok"), "{table}");
    assert!(!table.contains("\"account\""), "no raw JSON in the table: {table}");
    env.ok(
        &["requests", "show", "req_relay_01a2430e49457554af85c7d9dfe29e77"],
        None,
    );
    let csv = env.ok(&["requests", "list", "-o", "csv"], None);
    assert!(csv.contains("acct-gone:overloaded_error → acct-gone:ok"), "{csv}");

    // The account and the group go (the key moves to another group first).
    env.ok(&["key", "update", "k-log", "--group", "default"], None);
    env.ok(&["account", "rm", "acct-gone"], None);
    env.ok(&["group", "rm", "g-gone"], None);
    let records = env.json(&["requests", "list"], None);
    let r = &records[0];
    assert_eq!(r["group"], "g-gone (deleted)", "{r}");
    assert_eq!(r["group_id"], group_id.as_str(), "{r}");
    assert_eq!(r["attempts"][0]["account"], "acct-gone (deleted)", "{r}");
    assert_eq!(r["attempts"][1]["account_id"], account_id.as_str(), "{r}");
    // Still found by the old names, and by the ids.
    for args in [
        ["--account", "acct-gone"],
        ["--account", account_id.as_str()],
        ["--group", "g-gone"],
        ["--group", group_id.as_str()],
    ] {
        let mut a = vec!["requests", "list"];
        a.extend_from_slice(&args);
        let found = env.json(&a, None);
        assert_eq!(found.as_array().unwrap().len(), 1, "{args:?}: {found}");
    }
    let out = env.relayctl(&["requests", "list", "--account", "never-was"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
    let stats = env.json(&["requests", "stats"], None);
    assert!(
        stats
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["by"] == "account" && s["name"] == "acct-gone (deleted)"),
        "{stats}"
    );
    // --status: an error type neither the API nor relay uses is kept (a compatible upstream may
    // name its own), and said so when nothing matched; a known one that matched nothing is not.
    for cmd in ["list", "stats"] {
        let out = env.relayctl(&["requests", cmd, "--status", "bogus"], None);
        assert!(out.status.success(), "{cmd}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--status \"bogus\" is not an error type"), "{cmd}: {err}");
        let out = env.relayctl(&["requests", cmd, "--status", "rate_limit_error"], None);
        assert!(out.status.success() && out.stderr.is_empty(), "{cmd}: {out:?}");
    }
    // stats by account says how it counts, and that --account does otherwise.
    let help = env.ok(&["requests", "stats", "--help"], None);
    assert!(
        help.contains("under the account of its final attempt") && help.contains("any attempt"),
        "{help}"
    );

    // Capture rules: a value the API would read as "not given" is refused, not turned into the
    // default; a share finer than a millionth too.
    for (args, says) in [
        (["--sample", "0"], "--sample 0 would record nothing"),
        (["--max-bytes", "0"], "--max-bytes must be at least 1"),
        (["--ttl", "0s"], "--ttl must be longer than 0"),
        (["--sample", "1e-300"], "at least 0.000001"),
    ] {
        let mut a = vec!["capture", "add", "--key", "k-log"];
        a.extend_from_slice(&args);
        let out = env.relayctl(&a, None);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
    assert_eq!(env.json(&["capture", "list"], None), serde_json::json!([]));

    // tail follows from now on: a time range is refused, not silently ignored.
    let out = env.relayctl(&["requests", "tail", "--until", "1h"], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--since and --until do not apply"), "{err}");
    drop(cp);
}
