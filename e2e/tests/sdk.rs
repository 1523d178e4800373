//! The official Anthropic Python SDK against a distributed relay made of real
//! processes: a Postgres-backed control plane, two data planes, and the mock
//! upstream (in this test process, so its recordings can be read).
//!
//! `tests/sdk_client.py` uses the SDK unchanged: non-streaming, raw streaming,
//! the streaming helper (with thinking), tool use (plain and streamed),
//! count_tokens and the models list (paginated). It runs once against each
//! data plane. The test checks that every call succeeded, that the SSE bytes
//! the SDK received are the bytes the mock sent, that what the upstream got is
//! what the SDK sent (with the account's credential instead of the relay key),
//! that Postgres holds exactly one usage row per attempt with tokens exact and
//! cost exact to the pico-dollar, from both data planes, and that no secret
//! appears in any process's log or in any table. The account reaches the mock
//! through an HTTP CONNECT proxy with a password (one of the secrets scanned).
//!
//! The SDK is installed by `scripts/test.sh`; without it this test fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use relay_mock_upstream::{MockConfig, MockUpstream, Usage};
use relay_proto::v1 as pb;
use relay_proto::v1::admin_client::AdminClient;
use relay_test_support::{free_port, wait_for, workspace_bin, Proc, TestDb};
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const MASTER_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const ADMIN_TOKEN: &str = "rat-sdk-e2e-admin-token-0123456789abcdefghijklmnop";
const ACCOUNT_SECRET: &str = "sk-ant-api03-sdk-e2e-ACCOUNT-SECRET-0123456789abcdef";
const PROXY_PASSWORD: &str = "sdk-egress-PROXY-PASSWORD-0123456789";
const MODEL: &str = "claude-sonnet-4-5";

/// Builtin price of claude-sonnet-4*, micro-USD per MTok: in, out, 5m, 1h, read.
const SONNET: (u64, u64, u64, u64, u64) = (3_000_000, 15_000_000, 3_750_000, 6_000_000, 300_000);

/// Pico-USD: tokens × micro-USD per million tokens.
fn sonnet_cost(u: &Usage) -> u64 {
    u.input_tokens * SONNET.0
        + u.output_tokens * SONNET.1
        + u.cache_5m * SONNET.2
        + u.cache_1h * SONNET.3
        + u.cache_read_input_tokens * SONNET.4
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("sdk_client.py")
}

/// Fails (never skips) when the SDK is missing.
fn require_sdk() {
    let out = Command::new("python3").args(["-c", "import anthropic"]).output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "the official Anthropic Python SDK is not installed ({}): run scripts/test.sh, which installs it \
             (or: python3 -m pip install anthropic)",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!("cannot run python3 ({e}): run scripts/test.sh, which installs python3 and the anthropic SDK"),
    }
}

async fn admin(url: &str) -> AdminClient<InterceptedService<Channel, impl tonic::service::Interceptor + Clone>> {
    let channel = wait_for(Duration::from_secs(10), "control plane to accept gRPC", || {
        let url = url.to_string();
        async move { Channel::from_shared(url).ok()?.connect().await.ok() }
    })
    .await
    .unwrap();
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {ADMIN_TOKEN}").parse().unwrap();
    AdminClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", bearer.clone());
        Ok(r)
    })
}

async fn wait_log(proc: &mut Proc, what: &str, needle: &str) {
    wait_for(Duration::from_secs(30), what, || {
        let text = proc.log_text();
        let exited = proc.try_wait();
        async move {
            if let Some(status) = exited {
                panic!("process exited with {status} while waiting for {needle:?}: {text}");
            }
            text.contains(needle).then_some(())
        }
    })
    .await
    .unwrap();
}

async fn http_status(url: &str) -> Option<u16> {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let resp = client.get(url.parse().ok()?).await.ok()?;
    Some(resp.status().as_u16())
}

struct DataPlaneProc {
    node: &'static str,
    port: u16,
    proc: Proc,
}

fn start_data_plane(node: &'static str, cp: &str, token: &str, dir: &Path) -> DataPlaneProc {
    let port = free_port();
    let data = dir.join(node);
    let mut cmd = Command::new(workspace_bin("relay-data-plane"));
    cmd.args(["--control-plane", cp])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--node-id", node])
        .arg("--data-dir")
        .arg(&data)
        .env("RELAY_DATAPLANE_TOKEN", token)
        .env("RUST_LOG", "debug")
        .env_remove("RELAY_DATAPLANE_TOKEN_FILE")
        .env_remove("RELAY_DP_CACHE_KEY");
    let proc = Proc::spawn(cmd, &dir.join(format!("{node}.log"))).unwrap();
    DataPlaneProc { node, port, proc }
}

async fn wait_ready(dp: &mut DataPlaneProc) {
    let url = format!("http://127.0.0.1:{}/readyz", dp.port);
    wait_for(Duration::from_secs(30), "data plane to be ready", || {
        let exited = dp.proc.try_wait();
        let log = dp.proc.log.clone();
        let url = url.clone();
        async move {
            if let Some(status) = exited {
                panic!(
                    "data plane exited with {status}: {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            (http_status(&url).await == Some(200)).then_some(())
        }
    })
    .await
    .unwrap();
}

/// Runs the SDK script against one data plane; returns its JSON report.
async fn run_sdk(port: u16, key: &str) -> Value {
    let mut cmd = Command::new("python3");
    cmd.arg(script())
        .env("ANTHROPIC_BASE_URL", format!("http://127.0.0.1:{port}"))
        .env("ANTHROPIC_API_KEY", key)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1");
    // Nothing from the developer's environment may pick other credentials or another profile.
    for var in [
        "ANTHROPIC_AUTH_TOKEN",
        "ANTHROPIC_PROFILE",
        "ANTHROPIC_CONFIG_DIR",
        "ANTHROPIC_IDENTITY_TOKEN",
        "ANTHROPIC_IDENTITY_TOKEN_FILE",
        "ANTHROPIC_FEDERATION_RULE_ID",
        "ANTHROPIC_ORGANIZATION_ID",
        "ANTHROPIC_LOG",
    ] {
        cmd.env_remove(var);
    }
    let out = tokio::time::timeout(
        Duration::from_secs(180),
        tokio::task::spawn_blocking(move || cmd.output()),
    )
    .await
    .expect("the SDK script finished within 3 minutes")
    .unwrap()
    .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the SDK script failed ({}):\n{stderr}\nstdout: {stdout}",
        out.status
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("the SDK script printed no JSON ({e}): {stdout}\n{stderr}"))
}

/// Standard base64 with padding (the script's encoding of the raw SSE bytes).
fn base64_decode(s: &str) -> Vec<u8> {
    fn val(c: u8) -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c:?}"),
        }
    }
    let bytes: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    assert_eq!(bytes.len() % 4, 0, "base64 length");
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for chunk in bytes.chunks(4) {
        let pad = chunk.iter().filter(|&&c| c == b'=').count();
        let n = chunk
            .iter()
            .map(|&c| if c == b'=' { 0 } else { val(c) })
            .fold(0u32, |acc, v| (acc << 6) | v);
        let three = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&three[..3 - pad]);
    }
    out
}

/// The text an SSE body carries in its `text_delta`s.
fn sse_text(body: &[u8]) -> String {
    String::from_utf8_lossy(body)
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter(|e| e["type"] == "content_block_delta" && e["delta"]["type"] == "text_delta")
        .map(|e| e["delta"]["text"].as_str().unwrap().to_string())
        .collect()
}

/// One attempt that must be a usage row.
struct Expected {
    node: &'static str,
    request_id: String,
    stream: bool,
    usage: Usage,
    cost: u64,
    model: &'static str,
}

/// Checks one run of the script against one data plane; adds the usage rows it must have produced to
/// `expected`, keyed by upstream request id.
fn check_run(
    node: &'static str,
    report: &Value,
    mock: &MockUpstream,
    key: &str,
    expected: &mut HashMap<String, Expected>,
) {
    let ctx = |what: &str| format!("{node}: {what}");
    let exchanges = report["exchanges"].as_array().unwrap();
    let calls = &report["calls"];

    // Every exchange succeeded; every forwarded one reached the mock as the SDK sent it, with the
    // account's credential and without the relay key.
    let recorded: HashMap<String, relay_mock_upstream::RecordedRequest> =
        mock.requests().into_iter().map(|r| (r.request_id.clone(), r)).collect();
    for e in exchanges {
        assert_eq!(e["status"], 200, "{}", ctx(&format!("exchange {e}")));
        assert!(e["auth"].is_string(), "{}", ctx("the SDK did not send the relay key"));
        let path = e["path"].as_str().unwrap();
        if !path.starts_with("/v1/messages") {
            assert!(path.starts_with("/v1/models"), "{}", ctx(path));
            continue;
        }
        let upstream_id = e["upstream_request_id"].as_str().unwrap().to_string();
        let relay_id = e["request_id"].as_str().unwrap().to_string();
        assert!(relay_id.starts_with("req_relay_"), "{}", ctx(&relay_id));
        let seen = recorded
            .get(&upstream_id)
            .unwrap_or_else(|| panic!("{}", ctx(&format!("the mock never answered {upstream_id}"))));
        assert_eq!(seen.path(), path);
        assert_eq!(
            seen.json().as_ref(),
            Some(&e["body"]),
            "{}",
            ctx("the body is forwarded untouched")
        );
        assert_eq!(
            seen.header("x-api-key"),
            Some(ACCOUNT_SECRET),
            "{}",
            ctx("upstream credential")
        );
        assert!(
            seen.header("authorization").is_none(),
            "{}",
            ctx("the client's Bearer is not forwarded")
        );
        assert!(
            seen.headers
                .iter()
                .all(|(_, v)| !v.as_bytes().windows(key.len()).any(|w| w == key.as_bytes())),
            "{}",
            ctx("the relay key reached the upstream")
        );
        assert_eq!(seen.header("anthropic-version"), e["anthropic_version"].as_str());
        let body = &e["body"];
        let is_messages = path == "/v1/messages";
        let usage = if is_messages {
            mock.config().expected_usage(body, e["cache_read"].as_u64().unwrap())
        } else {
            Usage::default()
        };
        let prev = expected.insert(
            upstream_id,
            Expected {
                node,
                request_id: relay_id,
                stream: body["stream"] == true,
                usage,
                cost: sonnet_cost(&usage),
                // count_tokens is recorded too: the model asked about, nothing billed.
                model: MODEL,
            },
        );
        assert!(prev.is_none(), "one upstream request per attempt");
    }

    let exchange = |call: &str| &exchanges[calls[call]["exchange"].as_u64().unwrap() as usize];
    let upstream_id = |call: &str| calls[call]["upstream_request_id"].as_str().unwrap().to_string();
    let expected_of = |call: &str| {
        mock.config()
            .expected_usage(&exchange(call)["body"], exchange(call)["cache_read"].as_u64().unwrap())
    };
    let parsed = |call: &str| -> Usage { serde_json::from_value(calls[call]["usage"].clone()).unwrap() };

    // Non-streaming: the usage the SDK parsed is exact, every field exercised.
    let u = expected_of("create");
    assert_eq!(parsed("create"), u, "{}", ctx("create usage"));
    assert!(u.cache_5m > 0 && u.cache_1h > 0 && u.cache_read_input_tokens == 100);
    assert_eq!(calls["create"]["request_id"], exchange("create")["request_id"]);
    assert_eq!(calls["create"]["model"], MODEL);

    // Raw stream: the bytes the SDK received are the bytes the mock sent.
    let raw = base64_decode(calls["raw_stream"]["sse_base64"].as_str().unwrap());
    let sent = mock.sent_body(&upstream_id("raw_stream")).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&raw),
        String::from_utf8_lossy(&sent),
        "{}",
        ctx("SSE bytes")
    );
    assert_eq!(raw, sent.to_vec(), "{}", ctx("SSE bytes byte-identical"));
    assert!(raw.ends_with(b"data: {\"type\":\"message_stop\"}\n\n"));
    assert_eq!(calls["raw_stream"]["content_type"], "text/event-stream");
    assert!(calls["raw_stream"]["content_encoding"].is_null());

    // The streaming helper accumulated exactly what the mock streamed.
    assert_eq!(
        parsed("stream_helper"),
        expected_of("stream_helper"),
        "{}",
        ctx("stream usage")
    );
    let text = calls["stream_helper"]["text"].as_str().unwrap();
    assert!(!text.is_empty());
    assert_eq!(text, sse_text(&mock.sent_body(&upstream_id("stream_helper")).unwrap()));
    assert!(!calls["stream_helper"]["thinking"].as_str().unwrap().is_empty());
    assert_eq!(
        calls["stream_helper"]["request_id"],
        exchange("stream_helper")["request_id"]
    );

    // Tool use, plain and streamed: the input the SDK parsed is the mock's.
    let want_input = serde_json::json!({"city": "mock value for city", "days": 1});
    for call in ["tool_use", "tool_stream"] {
        assert_eq!(parsed(call), expected_of(call), "{}", ctx(call));
        assert_eq!(calls[call]["tool_name"], "get_weather");
        assert_eq!(calls[call]["tool_input"], want_input, "{}", ctx(call));
    }

    // count_tokens.
    assert_eq!(
        calls["count_tokens"]["input_tokens"].as_u64().unwrap(),
        relay_mock_upstream::expected_usage(&exchange("count_tokens")["body"]).input_tokens,
        "{}",
        ctx("count_tokens")
    );

    // Models: answered by relay, the same list page by page as in one page.
    let models = &calls["models"];
    let ids: Vec<&str> = models["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        !ids.is_empty() && ids.iter().all(|id| id.starts_with("claude")),
        "{ids:?}"
    );
    assert!(ids.contains(&"claude-sonnet-4-5-20250929"), "{ids:?}");
    assert_eq!(models["paged_ids"], models["ids"], "{}", ctx("auto-pagination"));
    assert!(
        models["pages_fetched"].as_u64().unwrap() > 1,
        "{}",
        ctx("several pages")
    );
    assert_eq!(models["retrieved"], ids[0]);
}

fn assert_no_secret_in(what: &str, text: &str, secrets: &[(&str, &str)]) {
    for (name, s) in secrets {
        assert!(!text.contains(s), "the {name} appears in {what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_through_two_data_planes() {
    require_sdk();
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let db = TestDb::new().await.unwrap();
    let dir = tempfile::tempdir().unwrap();

    // The control plane, on Postgres.
    let cp_listen = format!("127.0.0.1:{}", free_port());
    let cp_log = dir.path().join("control-plane.log");
    let mut cmd = Command::new(workspace_bin("relay-control-plane"));
    cmd.args(["--database-url", &db.url, "--listen", &cp_listen])
        .env("RELAY_MASTER_KEY", MASTER_KEY)
        .env("RELAY_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("RELAY_POLL_INTERVAL_MS", "200")
        .env("RUST_LOG", "debug")
        .env_remove("RELAY_MASTER_KEY_FILE");
    let mut cp = Proc::spawn(cmd, &cp_log).unwrap();
    wait_log(&mut cp, "control plane to listen", "listening on").await;
    let cp_url = format!("http://{cp_listen}");

    // A data-plane token, an account on the mock, a key.
    let mut adm = admin(&cp_url).await;
    let dp_token = adm
        .create_admin_token(pb::CreateAdminTokenRequest {
            name: "sdk-dp".into(),
            role: pb::AdminRole::DataPlane as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    assert!(dp_token.starts_with("rat-"));
    let egress = relay_test_support::proxy::TestProxy::start(
        relay_test_support::proxy::ProxyProtocol::HttpConnect,
        Some(("sdk-egress", PROXY_PASSWORD)),
    )
    .await
    .unwrap();
    adm.create_account(pb::CreateAccountRequest {
        name: "mock-acct".into(),
        kind: pb::AccountKind::AnthropicCompatible as i32,
        base_url: mock.base_url(),
        credential: ACCOUNT_SECRET.into(),
        proxy_url: format!("http://sdk-egress:{PROXY_PASSWORD}@{}", egress.addr),
        ..Default::default()
    })
    .await
    .unwrap();
    let key = adm
        .create_api_key(pb::CreateApiKeyRequest {
            name: "sdk-client".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key;
    assert!(key.starts_with("rk-"));

    // Two data planes; everything above is in the first config they get.
    let mut dps = [
        start_data_plane("dp-a", &cp_url, &dp_token, dir.path()),
        start_data_plane("dp-b", &cp_url, &dp_token, dir.path()),
    ];
    for dp in &mut dps {
        wait_ready(dp).await;
    }

    // The SDK against each.
    let mut expected: HashMap<String, Expected> = HashMap::new();
    for dp in &dps {
        let report = run_sdk(dp.port, &key).await;
        check_run(dp.node, &report, &mock, &key, &mut expected);
    }
    assert_eq!(expected.len(), 12, "6 forwarded attempts per data plane");

    // Usage: one row per attempt, exact to the token and the pico-dollar, from both data planes.
    let (pg, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let want = expected.len() as i64;
    wait_for(Duration::from_secs(30), "every usage row to be stored", || async {
        let n: i64 = pg
            .query_one("SELECT COUNT(*) FROM usage_events", &[])
            .await
            .unwrap()
            .get(0);
        (n >= want).then_some(())
    })
    .await
    .unwrap();
    let rows = pg
        .query(
            "SELECT upstream_request_id, request_id, node_id, model, input_tokens, output_tokens, \
             cache_write_5m_tokens, cache_write_1h_tokens, cache_read_tokens, cost_pico_usd, http_status, \
             stream, cancelled, error_type FROM usage_events",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), expected.len(), "exactly one row per attempt");
    for r in &rows {
        let up: String = r.get("upstream_request_id");
        let e = expected
            .get(&up)
            .unwrap_or_else(|| panic!("a usage row for an unknown attempt {up}"));
        let int = |c: &str| r.get::<_, i64>(c) as u64;
        assert_eq!(r.get::<_, String>("request_id"), e.request_id);
        assert_eq!(r.get::<_, String>("node_id"), e.node);
        assert_eq!(r.get::<_, String>("model"), e.model);
        assert_eq!(
            (
                int("input_tokens"),
                int("output_tokens"),
                int("cache_write_5m_tokens"),
                int("cache_write_1h_tokens"),
                int("cache_read_tokens"),
            ),
            (
                e.usage.input_tokens,
                e.usage.output_tokens,
                e.usage.cache_5m,
                e.usage.cache_1h,
                e.usage.cache_read_input_tokens,
            ),
            "tokens of {up}"
        );
        assert_eq!(int("cost_pico_usd"), e.cost, "cost of {up}");
        assert_eq!(r.get::<_, i32>("http_status"), 200);
        assert_eq!(r.get::<_, bool>("stream"), e.stream, "stream flag of {up}");
        assert!(
            !r.get::<_, bool>("cancelled"),
            "{up} ({} on {}) recorded as cancelled",
            e.request_id,
            e.node
        );
        assert_eq!(r.get::<_, String>("error_type"), "");
    }
    let sums = pg
        .query_one(
            "SELECT SUM(input_tokens)::BIGINT, SUM(output_tokens)::BIGINT, SUM(cache_write_5m_tokens)::BIGINT, \
             SUM(cache_write_1h_tokens)::BIGINT, SUM(cache_read_tokens)::BIGINT, SUM(cost_pico_usd)::BIGINT \
             FROM usage_events",
            &[],
        )
        .await
        .unwrap();
    let total = |f: fn(&Expected) -> u64| expected.values().map(f).sum::<u64>() as i64;
    let got: Vec<i64> = (0..6).map(|i| sums.get(i)).collect();
    let want_sums = vec![
        total(|e| e.usage.input_tokens),
        total(|e| e.usage.output_tokens),
        total(|e| e.usage.cache_5m),
        total(|e| e.usage.cache_1h),
        total(|e| e.usage.cache_read_input_tokens),
        total(|e| e.cost),
    ];
    assert_eq!(got, want_sums, "SUM of input, output, 5m, 1h, read tokens and cost");
    assert!(
        want_sums.iter().all(|&s| s > 0),
        "every usage field was exercised: {want_sums:?}"
    );
    let nodes: BTreeSet<String> = pg
        .query("SELECT DISTINCT node_id FROM usage_events", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(nodes, BTreeSet::from(["dp-a".to_string(), "dp-b".to_string()]));

    // Every upstream connection went through the account's proxy, with its credentials.
    let tunnels = egress.tunnels();
    assert!(!tunnels.is_empty());
    assert!(
        tunnels
            .iter()
            .all(|t| t.accepted && t.auth == Some(("sdk-egress".to_string(), PROXY_PASSWORD.to_string()))),
        "{tunnels:?}"
    );

    // No secret in any process's log (stdout and stderr), nor in any table.
    let secrets = [
        ("account credential", ACCOUNT_SECRET),
        ("proxy password", PROXY_PASSWORD),
        ("relay API key", key.as_str()),
        ("admin token", ADMIN_TOKEN),
        ("data-plane token", dp_token.as_str()),
        ("master key", MASTER_KEY),
    ];
    let mut logs = vec![(cp_log.clone(), cp.log_text())];
    for dp in &dps {
        logs.push((dp.proc.log.clone(), dp.proc.log_text()));
    }
    for (path, text) in &logs {
        assert!(
            text.contains("DEBUG"),
            "{} holds debug logs (else the scan proves nothing)",
            path.display()
        );
        assert_no_secret_in(&path.display().to_string(), text, &secrets);
    }
    let tables: Vec<String> = pg
        .query("SELECT tablename FROM pg_tables WHERE schemaname = 'public'", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for t in tables {
        let dump: String = pg
            .query_one(
                &format!("SELECT COALESCE(string_agg(x::text, ' '), '') FROM {t} x"),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_no_secret_in(&format!("table {t}"), &dump, &secrets);
    }
    drop(dps);
    drop(cp);
}
