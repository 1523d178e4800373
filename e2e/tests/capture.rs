//! Capture (opt-in bodies) end to end: rules added with the real `relayctl capture add`, traffic
//! through a data plane to the mock upstream, captures stored by a Postgres control plane and
//! read back with `relayctl requests show|export|clear`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use base64::Engine as _;
use common::*;
use relay_test_support::wait_for;
use serde_json::Value;
use std::io::Read;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);
const MODEL: &str = "claude-sonnet-4-5";

/// The stored capture document of `id`, once it arrived (decompressed, as stored).
async fn captured(cp: &ControlPlane, id: &str) -> Value {
    wait_for(WAIT, "the capture to be stored", || async {
        let c = cp.store.get_capture(id).await.unwrap()?;
        let text = relay_control_plane::capture::inflate(&c.document_zstd).unwrap();
        Some(serde_json::from_str::<Value>(&text).unwrap())
    })
    .await
    .unwrap()
}

/// The bytes a stored chunk or body holds (text, or base64 when it was not UTF-8).
fn bytes_of(v: &Value, name: &str) -> Vec<u8> {
    if let Some(s) = v[name].as_str() {
        return s.as_bytes().to_vec();
    }
    let b = v[format!("{name}_base64")]
        .as_str()
        .unwrap_or_else(|| panic!("no {name} in {v}"));
    base64::engine::general_purpose::STANDARD.decode(b).unwrap()
}

async fn record_stored(cp: &ControlPlane, id: &str) {
    wait_for(WAIT, "the request's record", || async {
        relay_control_plane::requests::get(&cp.store, id)
            .await
            .unwrap()
            .map(|_| ())
    })
    .await
    .unwrap();
}

/// Runs relayctl against `server`: (success, stdout, stderr).
fn run(server: &str, args: &[&str], stdin_null: bool) -> (bool, Vec<u8>, String) {
    let mut cmd = std::process::Command::new(relay_test_support::workspace_bin("relayctl"));
    cmd.args(args)
        .env("RELAY_SERVER", server)
        .env("RELAY_ADMIN_TOKEN", ADMIN_TOKEN);
    if stdin_null {
        cmd.stdin(std::process::Stdio::null());
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn pg(cp: &ControlPlane) -> tokio_postgres::Client {
    let url = cp.db.as_ref().unwrap().url.clone();
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn captured_requests_replay_byte_for_byte_hold_no_secret_and_export_and_clear() {
    let mock = mock(relay_mock_upstream::MockConfig {
        event_delay: Duration::from_millis(20),
        ..Default::default()
    })
    .await;
    let cp = ControlPlane::start(Backend::Postgres).await;
    let server = cp.url();
    cp.add_account("acct", &mock.base_url(), ACCOUNT_SECRET).await;
    let (_, key_a) = cp.add_key("team-a", &[]).await;
    let (_, key_b) = cp.add_key("team-b", &["claude-haiku*"]).await;
    let dir = tempfile::tempdir().unwrap();
    let dp = DataPlane::start(&server, "dp-1", dir.path().join("dp")).await;
    dp.wait_version(cp.head().await).await;
    let db = pg(&cp).await;

    // No rule: nothing is captured.
    let r = post_messages(&dp, &key_a, &message_body(MODEL, true)).await;
    assert_eq!(r.status, 200);
    let uncaptured = r.header("request-id").unwrap().to_string();
    record_stored(&cp, &uncaptured).await;
    let n: i64 = db
        .query_one("SELECT count(*) FROM request_captures", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "no rule, no capture");

    // Rules: everything of team-a (64 KiB of each body); only errors of team-b.
    let added = relayctl(
        &server,
        ADMIN_TOKEN,
        &[
            "capture",
            "add",
            "--key",
            "team-a",
            "--max-bytes",
            "64KiB",
            "--ttl",
            "7d",
            "-o",
            "json",
        ],
        None,
    );
    let added: Value = serde_json::from_str(&added).unwrap();
    assert_eq!(added["key"], "team-a", "{added}");
    assert_eq!(added["max_bytes"], 65536, "{added}");
    relayctl(
        &server,
        ADMIN_TOKEN,
        &["capture", "add", "--key", "team-b", "--errors-only"],
        None,
    );
    // Refused with a reason: a sample rate above 1.
    let (ok, _, err) = run(&server, &["capture", "add", "--sample", "1.5"], false);
    assert!(!ok && err.contains("--sample"), "{err}");
    let rules: Value = serde_json::from_str(&relayctl(
        &server,
        ADMIN_TOKEN,
        &["capture", "list", "-o", "json"],
        None,
    ))
    .unwrap();
    assert_eq!(rules.as_array().unwrap().len(), 2, "{rules}");
    dp.wait_version(cp.head().await).await;

    // A stream replays byte for byte from the stored chunks, with their arrival offsets.
    let cookie = "session=relay-cookie-0123456789abcdef";
    let r = post(
        &dp,
        "/v1/messages",
        &key_a,
        &message_body(MODEL, true),
        &[("cookie", cookie)],
    )
    .await;
    assert_eq!(r.status, 200);
    let stream_id = r.header("request-id").unwrap().to_string();
    let doc = captured(&cp, &stream_id).await;
    assert_eq!(doc["response"]["status"], 200);
    assert_eq!(doc["response"]["stream"], true);
    assert_eq!(doc["truncated"], false);
    let chunks = doc["response"]["chunks"].as_array().unwrap();
    assert!(chunks.len() > 1, "events arriving apart are separate chunks: {doc}");
    let replay: Vec<u8> = chunks.iter().flat_map(|c| bytes_of(c, "data")).collect();
    assert_eq!(replay, r.body.to_vec(), "the stored stream is what the client received");
    let offsets: Vec<u64> = chunks.iter().map(|c| c["offset_ms"].as_u64().unwrap()).collect();
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "{offsets:?}");
    // They are arrival offsets: the mock sends event k no sooner than k × 20 ms after the request,
    // so a chunk that completes the first n events was not written before (n - 1) × 20 ms.
    let mut events = 0u64;
    for (c, offset) in chunks.iter().zip(&offsets) {
        events += bytes_of(c, "data").windows(2).filter(|w| *w == b"\n\n").count() as u64;
        assert!(
            *offset >= events.saturating_sub(1) * 20,
            "{events} events by {offset} ms: {offsets:?}"
        );
    }
    assert!(events > 10, "{events}");
    // The request as the client sent it, its key masked.
    let sent_body = message_body(MODEL, true).to_string();
    assert_eq!(bytes_of(&doc["request"], "body"), sent_body.as_bytes());
    let headers = doc["request"]["headers"].as_array().unwrap();
    let header = |n: &str| {
        headers
            .iter()
            .find(|h| h[0] == n)
            .map(|h| h[1].as_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("no {n} in {headers:?}"))
    };
    let masked = header("x-api-key");
    assert!(
        masked.contains('…') && masked.ends_with(&key_a[key_a.len() - 4..]),
        "{masked}"
    );
    assert!(!header("cookie").contains("0123456789abcdef"));
    assert_eq!(header("anthropic-version"), "2023-06-01");

    // A 10 MB body over the cap is cut at 64 KiB and marked, not dropped.
    let big = "x".repeat(10 * 1024 * 1024);
    let mut body = message_body(MODEL, false);
    body["messages"][0]["content"] = Value::String(big);
    let r = post_messages(&dp, &key_a, &body).await;
    assert_eq!(r.status, 200);
    let big_id = r.header("request-id").unwrap().to_string();
    let doc = captured(&cp, &big_id).await;
    assert_eq!(doc["truncated"], true);
    assert_eq!(doc["request"]["truncated"], true);
    assert_eq!(doc["request"]["bytes"], body.to_string().len());
    assert_eq!(
        bytes_of(&doc["request"], "body"),
        body.to_string().as_bytes()[..65536].to_vec()
    );
    assert_eq!(doc["response"]["truncated"], false);
    let replay: Vec<u8> = doc["response"]["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| bytes_of(c, "data"))
        .collect();
    assert_eq!(replay, r.body.to_vec());

    // Errors only: team-b's success is not captured, its refusal is.
    let ok_b = post_messages(&dp, &key_b, &message_body("claude-haiku-4-5", false)).await;
    assert_eq!(ok_b.status, 200);
    let ok_b = ok_b.header("request-id").unwrap().to_string();
    let err_b = post_messages(&dp, &key_b, &message_body(MODEL, false)).await;
    assert_eq!(err_b.status, 403);
    let err_b_id = err_b.header("request-id").unwrap().to_string();
    let doc = captured(&cp, &err_b_id).await;
    assert_eq!(doc["response"]["status"], 403);
    let replay: Vec<u8> = doc["response"]["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| bytes_of(c, "data"))
        .collect();
    assert_eq!(replay, err_b.body.to_vec());
    record_stored(&cp, &ok_b).await;
    assert!(
        cp.store.get_capture(&ok_b).await.unwrap().is_none(),
        "a success under an errors-only rule"
    );
    assert!(cp.store.get_capture(&uncaptured).await.unwrap().is_none());

    // No secret (client keys, the upstream credential, the cookie) in any stored byte: the
    // captures as stored and inflated, and every table as text.
    let secrets = [key_a.as_str(), key_b.as_str(), ACCOUNT_SECRET, cookie];
    for row in db
        .query(
            "SELECT document_zstd, request_captures::text FROM request_captures",
            &[],
        )
        .await
        .unwrap()
    {
        let z: Vec<u8> = row.get(0);
        let mut inflated = Vec::new();
        zstd::stream::read::Decoder::new(&z[..])
            .unwrap()
            .read_to_end(&mut inflated)
            .unwrap();
        let text: String = row.get(1);
        for s in secrets {
            assert!(!contains(&z, s.as_bytes()) && !contains(&inflated, s.as_bytes()) && !text.contains(s));
        }
    }
    let tables: Vec<String> = db
        .query(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = current_schema()",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        tables.len() > 10 && tables.iter().any(|t| t == "audit_log"),
        "{tables:?}"
    );
    for table in &tables {
        for row in db.query(&format!("SELECT t::text FROM {table} t"), &[]).await.unwrap() {
            let text: String = row.get(0);
            for s in secrets {
                assert!(!text.contains(s), "a secret in {table}");
            }
        }
    }

    // show: the captured bodies with the record.
    let shown: Value = serde_json::from_str(&relayctl(
        &server,
        ADMIN_TOKEN,
        &["requests", "show", &stream_id, "-o", "json"],
        None,
    ))
    .unwrap();
    assert_eq!(shown["capture"]["request_id"], stream_id.as_str(), "{shown}");

    // export: every record a line, with its capture; compressed, the same lines.
    record_stored(&cp, &err_b_id).await;
    let plain = relayctl(
        &server,
        ADMIN_TOKEN,
        &["requests", "export", "--with-bodies", "-o", "jsonl"],
        None,
    );
    let lines: Vec<Value> = plain.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 5, "{plain}");
    let by_id = |id: &str| lines.iter().find(|l| l["id"] == id).unwrap().clone();
    assert_eq!(by_id(&stream_id)["capture"]["request_id"], stream_id.as_str());
    assert_eq!(by_id(&big_id)["capture"]["truncated"], true);
    assert!(by_id(&uncaptured)["capture"].is_null());
    assert!(by_id(&ok_b)["capture"].is_null());
    let (ok, zst, err) = run(&server, &["requests", "export", "--with-bodies", "--zstd"], false);
    assert!(ok, "{err}");
    assert_eq!(String::from_utf8(zstd::decode_all(&zst[..]).unwrap()).unwrap(), plain);
    let (ok, gz, err) = run(&server, &["requests", "export", "--gzip"], false);
    assert!(ok, "{err}");
    let mut unzipped = String::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_string(&mut unzipped)
        .unwrap();
    assert_eq!(unzipped.lines().count(), 5);

    // clear: asks first (refused without --yes off a terminal), then deletes team-b's records and
    // captures only, audited.
    let (ok, _, err) = run(&server, &["requests", "clear", "--key", "team-b"], true);
    assert!(!ok && err.contains("--yes"), "{err}");
    let cleared: Value = serde_json::from_str(&relayctl(
        &server,
        ADMIN_TOKEN,
        &["requests", "clear", "--key", "team-b", "--yes", "-o", "json"],
        None,
    ))
    .unwrap();
    assert_eq!(cleared["requests"], 2, "{cleared}");
    assert_eq!(cleared["captures"], 1, "{cleared}");
    assert!(cp.store.get_capture(&err_b_id).await.unwrap().is_none());
    assert!(cp.store.get_capture(&stream_id).await.unwrap().is_some());
    let left = relayctl(&server, ADMIN_TOKEN, &["requests", "export", "-o", "jsonl"], None);
    assert_eq!(left.lines().count(), 3);
    let audit = relayctl(&server, ADMIN_TOKEN, &["audit", "-o", "json"], None);
    assert!(
        audit.contains("requests.clear") && audit.contains("capture.add"),
        "{audit}"
    );

    // rm: the rule goes; new requests are not captured.
    let id = added["id"].as_str().unwrap().to_string();
    relayctl(&server, ADMIN_TOKEN, &["capture", "rm", &id], None);
    dp.wait_version(cp.head().await).await;
    let r = post_messages(&dp, &key_a, &message_body(MODEL, false)).await;
    let after = r.header("request-id").unwrap().to_string();
    record_stored(&cp, &after).await;
    assert!(cp.store.get_capture(&after).await.unwrap().is_none());
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Every file under `dir` (recursively), as bytes.
fn files_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else if let Ok(b) = std::fs::read(&p) {
            out.push((p, b));
        }
    }
    out
}

/// An upstream that quotes the credential it was sent in an error relay passes on (the mock's
/// `echo-credential`: a 400 "Incorrect API key provided: …", whole or its last 20 characters;
/// an API key sent as x-api-key, an OAuth token as Bearer): the client gets the error in its
/// Anthropic shape with the credential masked, and neither the request log nor any stored byte
/// (the SQLite files raw, every capture inflated, the data planes' directories) holds it. A
/// client that pastes its own key in a prompt: not stored either. And a capture rule added while
/// an account is in cooldown (an account state in the config): both data planes keep applying
/// configs (a key created afterwards is accepted, no NACK) and the rule captures.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_echoed_credential_reaches_neither_the_client_nor_the_log_nor_a_capture() {
    use relay_mock_upstream::Fault;
    use relay_proto::v1 as pb;
    const ECHO_KEY: &str = "sk-ant-api03-ECHOED-apikey-0123456789abcdefghijklmnopqrstuv";
    const ECHO_TOKEN: &str = "sk-ant-oat01-ECHOED-oauth-ZYXWVUTSRQPONMLKJIHGFEDCBA987654";
    const BUSY: &str = "cred-busy-0123456789abcdef";
    let cp = ControlPlane::start(Backend::Sqlite).await;
    let server = cp.url();
    let mock = mock(relay_mock_upstream::MockConfig::default()).await;
    mock.set_fault(ECHO_KEY, Some(Fault::EchoCredential { last: 0 }));
    mock.set_fault(ECHO_TOKEN, Some(Fault::EchoCredential { last: 20 }));
    mock.set_fault(BUSY, Some(Fault::Overloaded));
    let mut admin = cp.admin().await;
    for (group, account, kind, credential) in [
        ("g-key", "echo-key", pb::AccountKind::AnthropicCompatible, ECHO_KEY),
        ("g-oauth", "echo-oauth", pb::AccountKind::ClaudeOauth, ECHO_TOKEN),
    ] {
        admin
            .create_group(pb::CreateGroupRequest {
                name: group.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        admin
            .create_account(pb::CreateAccountRequest {
                name: account.into(),
                kind: kind as i32,
                base_url: mock.base_url(),
                credential: credential.into(),
                groups: vec![group.into()],
                ..Default::default()
            })
            .await
            .unwrap();
    }
    cp.add_account("busy", &mock.base_url(), BUSY).await;
    let key_in = |name: &'static str, group: &'static str| {
        let cp = &cp;
        async move {
            cp.admin()
                .await
                .create_api_key(pb::CreateApiKeyRequest {
                    name: name.into(),
                    group: group.into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .key
        }
    };
    let key_k = key_in("team-k", "g-key").await;
    let key_o = key_in("team-o", "g-oauth").await;
    let (_, key_d) = cp.add_key("team-d", &[]).await;
    cp.set_setting("queue.max_wait_ms", "0").await;
    let dir = tempfile::tempdir().unwrap();
    let dp1 = DataPlane::start(&server, "dp-1", dir.path().join("dp1")).await;
    let dp2 = DataPlane::start(&server, "dp-2", dir.path().join("dp2")).await;
    let head = cp.head().await;
    dp1.wait_version(head).await;
    dp2.wait_version(head).await;

    // "busy" answers 529: it goes into cooldown, an account state in the config.
    let r = post_messages(&dp1, &key_d, &message_body(MODEL, false)).await;
    assert_eq!(r.status, 529, "{:?}", r.body);
    wait_for(WAIT, "busy's cooldown in the config", || async {
        (!cp.store.list_account_states().await.unwrap().is_empty()).then_some(())
    })
    .await
    .unwrap();
    // Rules added beside it; then a key. Both data planes apply every config since.
    for key in ["team-k", "team-o"] {
        relayctl(&server, ADMIN_TOKEN, &["capture", "add", "--key", key], None);
    }
    let key_late = key_in("late", "g-key").await;
    let head = cp.head().await;
    dp1.wait_version(head).await;
    dp2.wait_version(head).await;
    assert!(
        !cp.store.list_account_states().await.unwrap().is_empty(),
        "busy is still in cooldown"
    );
    let planes: Value = serde_json::from_str(&relayctl(
        &server,
        ADMIN_TOKEN,
        &["data-planes", "list", "-o", "json"],
        None,
    ))
    .unwrap();
    let planes = planes.as_array().unwrap();
    assert_eq!(planes.len(), 2, "{planes:?}");
    for p in planes {
        assert!(p["last_nack"].is_null(), "a data plane refused a config: {p}");
    }
    // The key created after the rule is accepted (its request reaches the upstream).
    let late = post_messages(&dp2, &key_late, &message_body(MODEL, false)).await;
    assert_eq!(late.status, 400, "{:?}", late.body);
    assert_eq!(late.error_type(), "invalid_request_error");

    // The upstream quotes the credential: whole (x-api-key), its last 20 characters (Bearer),
    // a JSON answer and a stream request, messages and count_tokens, on both data planes.
    let token_tail = &ECHO_TOKEN[ECHO_TOKEN.len() - 20..];
    let mut prompt = message_body(MODEL, false);
    prompt["messages"][0]["content"] = format!("my key is {key_k}, keep it safe").into();
    let mut count = message_body(MODEL, false);
    count.as_object_mut().unwrap().remove("max_tokens");
    count.as_object_mut().unwrap().remove("stream");
    let answers = vec![
        ("echo-key", post_messages(&dp1, &key_k, &prompt).await),
        (
            "echo-key",
            post(&dp2, "/v1/messages/count_tokens", &key_k, &count, &[]).await,
        ),
        (
            "echo-oauth",
            post_messages(&dp2, &key_o, &message_body(MODEL, true)).await,
        ),
        (
            "echo-oauth",
            post_messages(&dp1, &key_o, &message_body(MODEL, false)).await,
        ),
    ];
    assert!(
        mock.requests().len() >= answers.len() + 2,
        "every request reached the upstream"
    );
    let secrets: [&[u8]; 4] = [
        ECHO_KEY.as_bytes(),
        &ECHO_KEY.as_bytes()[ECHO_KEY.len() - 20..],
        token_tail.as_bytes(),
        key_k.as_bytes(),
    ];
    let holds_secret = |b: &[u8]| secrets.iter().any(|s| contains(b, s));
    let mut ids = Vec::new();
    let answers: Vec<(&str, HttpResponse)> = answers.into_iter().chain([("echo-key", late)]).collect();
    for (account, r) in &answers {
        assert_eq!(r.status, 400, "{account}: {:?}", r.body);
        assert!(!holds_secret(&r.body), "the client got a credential: {:?}", r.body);
        // Its Anthropic shape, the credential masked as anthropic-proxy shows one.
        let v = r.json();
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        let masked = if *account == "echo-key" {
            "sk-ant…stuv"
        } else {
            "sk-ant…7654"
        };
        let message = v["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!("Incorrect API key provided: {masked}.")),
            "{message}"
        );
        ids.push((*account, r.header("request-id").unwrap().to_string()));
    }
    // (The late key's request is not captured: no rule names it.)
    ids.pop();

    // The request log: one attempt on the echoing account, nothing of the credential.
    for (account, id) in &ids {
        let shown = wait_for(WAIT, "the request's record", || {
            let server = server.clone();
            async move {
                let (ok, out, _) = run(&server, &["requests", "show", id, "-o", "json"], false);
                ok.then(|| serde_json::from_slice::<Value>(&out).unwrap())
                    .filter(|v| v["capture"].is_object())
            }
        })
        .await
        .unwrap();
        assert!(!holds_secret(shown.to_string().as_bytes()), "{shown}");
        let attempts = shown["attempts"].as_array().unwrap();
        assert_eq!(attempts.len(), 1, "{shown}");
        assert_eq!(attempts[0]["account"], *account, "{shown}");
        assert_eq!(attempts[0]["outcome"], "invalid_request_error", "{shown}");
        // The upstream's own message is kept for the log, masked as the client got it.
        let masked = if *account == "echo-key" {
            "sk-ant…stuv"
        } else {
            "sk-ant…7654"
        };
        let message = attempts[0]["error_message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!("Incorrect API key provided: {masked}.")),
            "{shown}"
        );
        assert_eq!(shown["error_message"], message, "{shown}");
        // The rule captured it: the answer as the client got it (already masked), the request
        // with the client's key masked where the prompt quoted it.
        let doc = captured(&cp, id).await;
        let (_, r) = answers
            .iter()
            .find(|(_, r)| r.header("request-id") == Some(id.as_str()))
            .unwrap();
        let replay: Vec<u8> = doc["response"]["chunks"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|c| bytes_of(c, "data"))
            .collect();
        assert_eq!(replay, r.body.to_vec(), "{doc}");
    }
    let doc = captured(&cp, &ids[0].1).await;
    assert_eq!(doc["redacted"], 1, "the client's key in its prompt: {doc}");
    let sent = String::from_utf8(bytes_of(&doc["request"], "body")).unwrap();
    assert!(sent.contains("my key is ") && !sent.contains(&key_k), "{sent}");

    // No stored byte holds a secret: the database's files as they are on disk, every capture
    // inflated, the data planes' spools.
    let db_dir = cp.sqlite_dir.as_ref().unwrap().path().to_path_buf();
    let db = rusqlite::Connection::open(db_dir.join("relay.db")).unwrap();
    let docs: Vec<Vec<u8>> = db
        .prepare("SELECT document_zstd FROM request_captures")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(docs.len(), ids.len(), "one capture per request of team-k and team-o");
    for z in &docs {
        let inflated = zstd::decode_all(&z[..]).unwrap();
        assert!(!inflated.is_empty() && !holds_secret(&inflated) && !holds_secret(z));
    }
    drop(db);
    let mut scanned = files_under(&db_dir);
    scanned.extend(files_under(dir.path()));
    assert!(
        scanned.iter().any(|(p, _)| p.ends_with("relay.db")),
        "{:?}",
        scanned.iter().map(|(p, _)| p).collect::<Vec<_>>()
    );
    for (path, bytes) in &scanned {
        assert!(!holds_secret(bytes), "a secret in {}", path.display());
    }
}
