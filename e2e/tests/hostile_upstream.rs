//! Hostile and broken upstreams: a client never receives garbage, a mis-framed response or half an
//! event; usage is never billed wrong and never lost. Each case runs against
//! `relay_mock_upstream::hostile`, which writes exactly the bytes a misbehaving server would, and
//! checks what the client got against the usage row relay stored (read from the store itself).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use relay_mock_upstream::hostile::{self, HostileUpstream, Script, ScriptUsage, Step};
use relay_mock_upstream::{expected_usage, MockConfig, MockUpstream};
use relay_proto::v1 as pb;
use relay_test_support::wait_for;
use serde_json::Value;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const USAGE: ScriptUsage = ScriptUsage {
    input_tokens: 1234,
    output_tokens: 56,
};

struct Fleet {
    cp: ControlPlane,
    bad: HostileUpstream,
    _good: Option<MockUpstream>,
    dp: DataPlane,
    key: String,
    bad_id: String,
    good_id: Option<String>,
    _dir: tempfile::TempDir,
}

async fn account(cp: &ControlPlane, name: &str, base_url: &str, priority: i32) -> String {
    cp.admin()
        .await
        .create_account(pb::CreateAccountRequest {
            name: name.into(),
            kind: pb::AccountKind::AnthropicCompatible as i32,
            base_url: base_url.into(),
            credential: format!("cred-{name}"),
            priority,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id
}

/// A hostile account tried first and, `with_good`, a well-behaved one behind it.
async fn fleet(script: Script, with_good: bool, settings: &[(&str, &str)]) -> Fleet {
    let cp = ControlPlane::start(Backend::Sqlite).await;
    let bad = HostileUpstream::start(script).await.unwrap();
    let bad_id = account(&cp, "bad", &bad.base_url(), 0).await;
    let (good, good_id) = if with_good {
        let m = mock(MockConfig::default()).await;
        let id = account(&cp, "good", &m.base_url(), 10).await;
        (Some(m), Some(id))
    } else {
        (None, None)
    };
    cp.set_setting("retry.backoff_base_ms", "1").await;
    cp.set_setting("retry.backoff_max_ms", "5").await;
    for (k, v) in settings {
        cp.set_setting(k, v).await;
    }
    let (_, key) = cp.add_key("client", &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let dp = DataPlane::start(&cp.url(), "dp-1", dir.path().join("dp")).await;
    dp.wait_version(cp.head().await).await;
    Fleet {
        cp,
        bad,
        _good: good,
        dp,
        key,
        bad_id,
        good_id,
        _dir: dir,
    }
}

/// One stored usage row.
#[derive(Debug, Clone)]
struct Row {
    account_id: String,
    http_status: i64,
    error_type: String,
    cancelled: bool,
    input_tokens: i64,
    output_tokens: i64,
    cost_pico_usd: i64,
    anomaly: String,
}

fn rows(cp: &ControlPlane) -> Vec<Row> {
    let conn = rusqlite::Connection::open(cp.sqlite_path().unwrap()).unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT account_id, http_status, error_type, cancelled, input_tokens, output_tokens, cost_pico_usd, \
             anomaly FROM usage_events ORDER BY ts, event_id",
        )
        .unwrap();
    stmt.query_map([], |r| {
        Ok(Row {
            account_id: r.get(0)?,
            http_status: r.get(1)?,
            error_type: r.get(2)?,
            cancelled: r.get(3)?,
            input_tokens: r.get(4)?,
            output_tokens: r.get(5)?,
            cost_pico_usd: r.get(6)?,
            anomaly: r.get(7)?,
        })
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

async fn wait_rows(cp: &ControlPlane, n: usize) -> Vec<Row> {
    wait_for(Duration::from_secs(10), "usage rows to be stored", || async {
        let r = rows(cp);
        (r.len() >= n).then_some(r)
    })
    .await
    .unwrap()
}

fn body(stream: bool) -> Value {
    message_body("claude-sonnet-4-5", stream)
}

async fn ask(f: &Fleet, stream: bool) -> HttpResponse {
    post_messages(&f.dp, &f.key, &body(stream)).await
}

/// The events of an SSE body; panics unless every event is whole and its data is JSON.
fn events(body: &[u8]) -> Vec<(String, Value)> {
    let text = std::str::from_utf8(body).unwrap();
    assert!(
        text.ends_with("\n\n"),
        "the body does not end on an event boundary: {text:?}"
    );
    text.split("\n\n")
        .filter(|b| !b.is_empty())
        .map(|block| {
            let mut name = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    name = v.to_string();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data.push_str(v);
                }
            }
            let value: Value = serde_json::from_str(&data)
                .unwrap_or_else(|e| panic!("event {name:?} is not whole JSON ({e}): {data:?}\nbody: {text}"));
            (name, value)
        })
        .collect()
}

/// The usage a client reads from a stream: message_start's, updated by message_delta.
fn client_usage(events: &[(String, Value)]) -> (i64, i64) {
    let mut input = 0;
    let mut output = 0;
    for (name, v) in events {
        match name.as_str() {
            "message_start" => {
                input = v["message"]["usage"]["input_tokens"].as_i64().unwrap_or(0);
                output = v["message"]["usage"]["output_tokens"].as_i64().unwrap_or(0);
            }
            "message_delta" => {
                if let Some(o) = v["usage"]["output_tokens"].as_i64() {
                    output = o;
                }
            }
            _ => {}
        }
    }
    (input, output)
}

fn assert_good_answer(r: &HttpResponse, stream: bool) {
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.header("location").is_none());
    let expected = expected_usage(&body(stream));
    if stream {
        let ev = events(&r.body);
        assert_eq!(ev.first().unwrap().0, "message_start");
        assert_eq!(ev.last().unwrap().0, "message_stop");
        assert_eq!(
            client_usage(&ev),
            (expected.input_tokens as i64, expected.output_tokens as i64)
        );
    } else {
        let j = r.json();
        assert_eq!(j["type"], "message");
        assert_eq!(j["usage"]["input_tokens"], expected.input_tokens);
    }
}

/// A script answering 200 with this JSON body.
fn json_answer(body: &Value) -> Script {
    Script::raw(hostile::response(
        200,
        &[("content-type", "application/json")],
        body.to_string().as_bytes(),
    ))
}

fn html_200() -> Script {
    Script::raw(hostile::response(
        200,
        &[("content-type", "text/html")],
        b"<html><body>Please log in to the hotel Wi-Fi</body></html>",
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answers_that_are_not_anthropic_answers_fail_over() {
    let ping = "event: ping\ndata: {\"type\":\"ping\"}\n\n".to_string();
    let mut no_start = vec![ping];
    no_start.extend(hostile::sse_events(USAGE).into_iter().skip(1));
    let msg = hostile::message_json(USAGE);
    let cases: Vec<(&str, Script, bool)> = vec![
        ("captive portal HTML", html_200(), false),
        ("captive portal HTML to a stream", html_200(), true),
        (
            "JSON that is not a message",
            Script::raw(hostile::response(
                200,
                &[("content-type", "application/json")],
                br#"{"hello":"world"}"#,
            )),
            false,
        ),
        (
            "a JSON message to a streaming request",
            Script::raw(hostile::response(
                200,
                &[("content-type", "application/json")],
                msg.as_bytes(),
            )),
            true,
        ),
        (
            "a stream that does not open with message_start",
            Script::raw(hostile::sse_response(&no_start)),
            true,
        ),
        (
            "an event stream to a non-streaming request",
            Script::raw(hostile::sse_response(&hostile::sse_events(USAGE))),
            false,
        ),
        (
            "a redirect",
            Script::raw(hostile::response(302, &[("location", "http://127.0.0.2:9/steal")], b"")),
            false,
        ),
        (
            "a status above 599",
            Script::raw(hostile::response(
                600,
                &[("content-type", "application/json")],
                msg.as_bytes(),
            )),
            false,
        ),
        (
            "switching protocols",
            Script::raw(hostile::head(101, &[("upgrade", "websocket")])).then(Step::Hold),
            false,
        ),
        (
            "a gzipped event stream",
            Script::raw({
                let mut raw = hostile::head(
                    200,
                    &[("content-type", "text/event-stream"), ("content-encoding", "gzip")],
                );
                raw.extend(hostile::gzip(hostile::sse_events(USAGE).concat().as_bytes()));
                raw
            }),
            true,
        ),
    ];
    for (name, script, stream) in cases {
        let f = fleet(script, true, &[("breaker.threshold", "1")]).await;
        let r = ask(&f, stream).await;
        assert_good_answer(&r, stream);
        assert_eq!(f.bad.request_count(), 1, "{name}: the hostile account was tried once");
        let rows = wait_rows(&f.cp, 2).await;
        let bad: Vec<&Row> = rows.iter().filter(|r| r.account_id == f.bad_id).collect();
        let good: Vec<&Row> = rows
            .iter()
            .filter(|r| Some(&r.account_id) == f.good_id.as_ref())
            .collect();
        assert_eq!(bad.len(), 1, "{name}: {rows:?}");
        assert!(!bad[0].error_type.is_empty(), "{name}: recorded as a failure: {rows:?}");
        assert_eq!(
            (bad[0].input_tokens, bad[0].cost_pico_usd),
            (0, 0),
            "{name}: nothing billed"
        );
        assert_eq!(good.len(), 1, "{name}: {rows:?}");
        assert_eq!(good[0].error_type, "", "{name}");
        assert_eq!(good[0].input_tokens as u64, expected_usage(&body(stream)).input_tokens);
        // The breaker counted it: with a threshold of 1 the account is out now.
        let states = wait_for(
            Duration::from_secs(10),
            "the account state to reach the control plane",
            || async {
                let st =
                    f.cp.admin()
                        .await
                        .get_account(pb::GetAccountRequest { account: "bad".into() })
                        .await
                        .unwrap()
                        .into_inner()
                        .states;
                (!st.is_empty()).then_some(st)
            },
        )
        .await
        .unwrap();
        assert!(
            states.iter().any(|s| s.health == pb::AccountHealth::Erroring as i32),
            "{name}: {states:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn alone_an_invalid_answer_is_a_clear_error_never_the_garbage() {
    for (name, script) in [
        ("html", html_200()),
        (
            "redirect",
            Script::raw(hostile::response(
                302,
                &[("location", "http://127.0.0.2:9/steal"), ("content-type", "text/html")],
                b"<a href=x>moved</a>",
            )),
        ),
    ] {
        let f = fleet(script, false, &[]).await;
        let r = ask(&f, false).await;
        assert_eq!(r.status, 502, "{name}");
        assert_eq!(r.error_type(), "api_error", "{name}");
        assert!(r.header("location").is_none(), "{name}");
        assert_eq!(r.header("content-type"), Some("application/json"), "{name}");
    }
}

/// Reads one HTTP/1.1 response (content-length or chunked) from `s`; returns the head and body.
async fn read_response(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> (String, Vec<u8>) {
    let mut tmp = [0u8; 8192];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = s.read(&mut tmp).await.unwrap();
        assert!(n > 0, "connection closed before a head");
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    buf.drain(..head_end);
    if let Some(len) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse::<usize>().unwrap())
    {
        fill(s, buf, len).await;
        let body: Vec<u8> = buf.drain(..len).collect();
        return (head, body);
    }
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(p) = buf.windows(2).position(|w| w == b"\r\n") {
                break p;
            }
            let want = buf.len() + 1;
            fill(s, buf, want).await;
        };
        let size = usize::from_str_radix(std::str::from_utf8(&buf[..line_end]).unwrap().trim(), 16).unwrap();
        buf.drain(..line_end + 2);
        fill(s, buf, size + 2).await;
        body.extend(buf.drain(..size));
        buf.drain(..2);
        if size == 0 {
            return (head, body);
        }
    }
}

async fn fill(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>, want: usize) {
    let mut tmp = [0u8; 8192];
    while buf.len() < want {
        let n = s.read(&mut tmp).await.unwrap();
        assert!(n > 0, "connection closed inside a body");
        buf.extend_from_slice(&tmp[..n]);
    }
}

fn raw_request(key: &str, body: &Value) -> Vec<u8> {
    let b = body.to_string();
    format!(
        "POST /v1/messages HTTP/1.1\r\nhost: relay\r\nx-api-key: {key}\r\nanthropic-version: 2023-06-01\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{b}",
        b.len()
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn framing_is_relays_own_never_the_upstreams() {
    // Content-Length: 7 together with chunked: the chunks are what counts (RFC 9112 §6.3); relay
    // must not hand its client `content-length: 7` followed by the whole body, which would leave
    // a forged second response on the client's keep-alive connection.
    let msg = hostile::message_json(USAGE);
    let mut json_raw = hostile::head(
        200,
        &[
            ("content-type", "application/json"),
            ("content-length", "7"),
            ("transfer-encoding", "chunked"),
        ],
    );
    json_raw.extend(hostile::chunk(msg.as_bytes()));
    json_raw.extend_from_slice(hostile::LAST_CHUNK);
    let sse = hostile::sse_events(USAGE);
    let mut sse_raw = hostile::head(
        200,
        &[
            ("content-type", "text/event-stream"),
            ("content-length", "7"),
            ("transfer-encoding", "chunked"),
        ],
    );
    for e in &sse {
        sse_raw.extend(hostile::chunk(e.as_bytes()));
    }
    sse_raw.extend_from_slice(hostile::LAST_CHUNK);

    for (stream, script, expected) in [
        (false, json_raw, msg.clone().into_bytes()),
        (true, sse_raw, sse.concat().into_bytes()),
    ] {
        let f = fleet(Script::raw(script), false, &[]).await;
        let mut s = tokio::net::TcpStream::connect(f.dp.addr).await.unwrap();
        let mut buf = Vec::new();
        // Two requests on one keep-alive connection: each answer is framed exactly.
        for _ in 0..2 {
            s.write_all(&raw_request(&f.key, &body(stream))).await.unwrap();
            let (head, got) = read_response(&mut s, &mut buf).await;
            assert!(head.starts_with("http/1.1 200"), "{head}");
            assert_eq!(got, expected, "byte-identical body, framed by relay");
            assert!(!head.contains("content-length: 7"), "{head}");
        }
        // Nothing else is waiting on the connection.
        let extra = tokio::time::timeout(Duration::from_millis(300), s.read(&mut [0u8; 64])).await;
        assert!(extra.is_err(), "unexpected bytes after the responses: {extra:?}");
        let rows = wait_rows(&f.cp, 2).await;
        for r in rows {
            assert_eq!((r.input_tokens, r.output_tokens), (1234, 56), "{r:?}");
            assert_eq!(r.error_type, "");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_cut_inside_an_event_ends_on_an_event_boundary() {
    let ev = hostile::sse_events(USAGE);
    let mut raw = hostile::sse_head();
    for e in &ev[..3] {
        raw.extend(hostile::chunk(e.as_bytes()));
    }
    let cut = &ev[3].as_bytes()[..ev[3].len() / 2];
    raw.extend(hostile::chunk(cut));
    // ... and the connection closes without the last chunk.
    let f = fleet(Script::raw(raw), false, &[]).await;
    let r = ask(&f, true).await;
    assert_eq!(r.status, 200);
    let got = events(&r.body);
    assert!(
        r.body.starts_with(ev[..3].concat().as_bytes()),
        "the whole events arrive untouched"
    );
    assert_eq!(got.len(), 4, "three whole events and relay's error: {got:?}");
    assert_eq!(got[3].0, "error");
    assert_eq!(got[3].1["error"]["type"], "api_error");
    let rows = wait_rows(&f.cp, 1).await;
    assert_eq!(rows[0].error_type, "api_error");
    // The tap and the client agree on what was delivered.
    assert_eq!((rows[0].input_tokens, rows[0].output_tokens), client_usage(&got));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_that_ends_before_message_stop_is_a_failure() {
    let ev = hostile::sse_events(USAGE);
    for (name, upto) in [
        ("cut cleanly before message_stop", ev.len() - 1),
        ("only message_start", 1),
    ] {
        let f = fleet(
            Script::raw(hostile::sse_response(&ev[..upto])),
            false,
            &[("breaker.threshold", "1")],
        )
        .await;
        let r = ask(&f, true).await;
        assert_eq!(r.status, 200, "{name}");
        let got = events(&r.body);
        assert_eq!(got.len(), upto + 1, "{name}: {got:?}");
        assert_eq!(got.last().unwrap().0, "error", "{name}");
        assert!(r.body.starts_with(ev[..upto].concat().as_bytes()), "{name}");
        let rows = wait_rows(&f.cp, 1).await;
        assert_eq!(rows[0].error_type, "api_error", "{name}");
        assert_eq!(
            (rows[0].input_tokens, rows[0].output_tokens),
            client_usage(&got),
            "{name}"
        );
        let states = wait_for(Duration::from_secs(10), "the breaker to open", || async {
            let st =
                f.cp.admin()
                    .await
                    .get_account(pb::GetAccountRequest { account: "bad".into() })
                    .await
                    .unwrap()
                    .into_inner()
                    .states;
            st.iter()
                .any(|s| s.health == pb::AccountHealth::Erroring as i32)
                .then_some(st)
        })
        .await;
        assert!(states.is_ok(), "{name}: the account was penalised");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_headers_are_filtered_and_bounded() {
    let msg = hostile::message_json(USAGE);
    let huge = "x".repeat(100 * 1024);
    let big = "y".repeat(10 * 1024);
    let script = Script::raw(hostile::response(
        200,
        &[
            ("content-type", "application/json"),
            ("x-junk", &huge),
            ("anthropic-big", &big),
            ("set-cookie", "session=stolen"),
            ("location", "http://127.0.0.2:9/"),
            ("anthropic-ratelimit-requests-remaining", "5"),
            ("retry-after", "99999999999999999999"),
            ("request-id", "req_upstream_1"),
        ],
        msg.as_bytes(),
    ));
    let f = fleet(script, false, &[]).await;
    let r = ask(&f, false).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.body, msg.as_bytes());
    for gone in ["x-junk", "anthropic-big", "set-cookie", "location", "retry-after"] {
        assert!(r.header(gone).is_none(), "{gone} was forwarded");
    }
    // The account's own rate-limit headers stay behind unless headers.expose_ratelimit.
    assert!(r.header("anthropic-ratelimit-requests-remaining").is_none());
    assert_eq!(r.header("x-upstream-request-id"), Some("req_upstream_1"));
    assert_eq!(r.header("content-length"), Some(msg.len().to_string().as_str()));
    let total: usize = r.headers.iter().map(|(n, v)| n.as_str().len() + v.len()).sum();
    assert!(total < 20 * 1024, "{total} bytes of headers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retry_after_sent_to_clients_is_relays_own_bounded_value() {
    for value in ["Fri, 31 Dec 2099 23:59:59 GMT", "99999999999999999999", "86400"] {
        let f = fleet(
            Script::raw(hostile::response(
                429,
                &[("content-type", "application/json"), ("retry-after", value)],
                br#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#,
            )),
            false,
            &[("queue.max_wait_ms", "200"), ("retry.deadline_ms", "1000")],
        )
        .await;
        for _ in 0..2 {
            // The first answer is the upstream's 429; the second finds the account limited.
            let r = ask(&f, false).await;
            assert!(matches!(r.status, 429 | 529), "{value}: {}", r.status);
            if let Some(ra) = r.header("retry-after") {
                let secs: u64 = ra.parse().unwrap_or_else(|_| panic!("{value}: retry-after {ra:?}"));
                assert!((1..=3600).contains(&secs), "{value}: retry-after {secs}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gzipped_answer_is_decoded_for_the_client_and_billed() {
    let msg = hostile::message_json(USAGE);
    let f = fleet(
        Script::raw(hostile::response(
            200,
            &[("content-type", "application/json"), ("content-encoding", "gzip")],
            &hostile::gzip(msg.as_bytes()),
        )),
        false,
        &[],
    )
    .await;
    let r = ask(&f, false).await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-encoding").is_none());
    assert_eq!(r.body, msg.as_bytes(), "the client reads what relay billed");
    let rows = wait_rows(&f.cp, 1).await;
    assert_eq!((rows[0].input_tokens, rows[0].output_tokens), (1234, 56));
    assert!(rows[0].cost_pico_usd > 0, "{rows:?}");
    assert_eq!(rows[0].anomaly, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn absurd_or_unreadable_usage_is_flagged_and_reports_keep_working() {
    let absurd = hostile::message_json(ScriptUsage {
        input_tokens: 2_000_000_000_000,
        output_tokens: 3,
    });
    // A message_start without usage (JSON, so passed on): its usage is unreadable.
    let mut bad_start =
        vec!["event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\"}}\n\n".to_string()];
    bad_start.extend(hostile::sse_events(USAGE).into_iter().skip(1));
    let f = fleet(
        Script::raw(hostile::response(
            200,
            &[("content-type", "application/json")],
            absurd.as_bytes(),
        )),
        false,
        &[],
    )
    .await;
    for _ in 0..2 {
        assert_eq!(ask(&f, false).await.status, 200);
    }
    f.bad.set_script(Script::raw(hostile::sse_response(&bad_start)));
    let r = ask(&f, true).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let rows = wait_rows(&f.cp, 3).await;
    let max = relay_proto::bounds::MAX_TOKENS_PER_REQUEST as i64;
    assert_eq!(rows[0].input_tokens, max);
    assert_eq!(rows[0].anomaly, "suspect");
    // Billed as the clamped counts (10M input tokens: tens of dollars), never as the claim.
    let dollars = rows[0].cost_pico_usd / 1_000_000_000_000;
    assert!((1..=1_000).contains(&dollars), "{} pico-USD", rows[0].cost_pico_usd);
    assert_eq!(rows[1].anomaly, "suspect");
    assert_eq!(rows[2].anomaly, "unparsed", "{rows:?}");
    assert_eq!(rows[2].error_type, "");
    // Reports over the rows answer, and count them.
    let total = f.cp.usage_total().await;
    assert_eq!(total.requests, 3);
    assert_eq!(total.anomalies, 3);
    assert_eq!(total.input_tokens, 2 * max as u64);
    let out = relayctl(&f.cp.url(), ADMIN_TOKEN, &["usage", "--output", "json"], None);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v[0]["anomalies"], 3, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_leaves_before_the_answer_still_leaves_a_usage_row() {
    let cases: Vec<(&str, Script, bool, i64)> = vec![
        ("no head at all", Script(vec![Step::Hold]), false, 0),
        (
            "a JSON head, then nothing",
            Script::raw(hostile::head(
                200,
                &[("content-type", "application/json"), ("content-length", "1000")],
            ))
            .then(Step::Hold),
            false,
            200,
        ),
        (
            "a stream head, then nothing",
            Script::raw(hostile::sse_head()).then(Step::Hold),
            true,
            200,
        ),
    ];
    for (name, script, stream, status) in cases {
        let f = fleet(script, false, &[]).await;
        let asked = tokio::time::timeout(Duration::from_millis(500), ask(&f, stream)).await;
        assert!(asked.is_err(), "{name}: the upstream never answers");
        let rows = wait_rows(&f.cp, 1).await;
        assert_eq!(rows.len(), 1, "{name}: {rows:?}");
        assert!(rows[0].cancelled, "{name}: {rows:?}");
        assert_eq!(rows[0].http_status, status, "{name}");
        assert_eq!(rows[0].account_id, f.bad_id);
        // The upstream connection was closed with it.
        wait_for(Duration::from_secs(10), "the upstream connection to close", || async {
            (f.bad.open_connections() == 0).then_some(())
        })
        .await
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dripping_error_body_is_bounded_by_the_retry_deadline() {
    // A 500 whose body comes one byte a second: relay stops reading at the request's deadline and
    // goes on, instead of holding the client for the body's whole length.
    let script = Script::raw(hostile::head(
        500,
        &[("content-type", "application/json"), ("content-length", "120")],
    ))
    .then(Step::Drip(vec![b' '; 120], Duration::from_secs(1)));
    let f = fleet(script, true, &[("retry.deadline_ms", "1500")]).await;
    let r = tokio::time::timeout(Duration::from_secs(20), ask(&f, false))
        .await
        .expect("the answer came well before the 120 s the body takes");
    assert_good_answer(&r, false);
    let rows = wait_rows(&f.cp, 2).await;
    assert!(rows.iter().any(|r| r.account_id == f.bad_id && r.http_status == 500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_404_that_is_not_an_api_error_is_the_accounts_fault() {
    // A wrong base URL: the upstream's web server answers 404 with its own page.
    let f = fleet(
        Script::raw(hostile::response(
            404,
            &[("content-type", "text/html")],
            b"<h1>Not Found</h1>",
        )),
        true,
        &[("breaker.threshold", "1")],
    )
    .await;
    assert_good_answer(&ask(&f, false).await, false);
    assert_eq!(f.bad.request_count(), 1);
    // The API's own not_found_error (an unknown model) is the client's: no other account is tried.
    let f = fleet(
        Script::raw(hostile::response(
            404,
            &[("content-type", "application/json")],
            br#"{"type":"error","error":{"type":"not_found_error","message":"model: claude-nope"}}"#,
        )),
        true,
        &[],
    )
    .await;
    let r = ask(&f, false).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.error_type(), "not_found_error");
    assert_eq!(f.bad.request_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_base_url_ending_in_v1_is_stored_without_it() {
    let cp = ControlPlane::start(Backend::Sqlite).await;
    let m = mock(MockConfig::default()).await;
    cp.add_account("with-v1", &format!("{}/v1/", m.base_url()), "cred")
        .await;
    let info = cp
        .admin()
        .await
        .get_account(pb::GetAccountRequest {
            account: "with-v1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.base_url, m.base_url());
    let (_, key) = cp.add_key("client", &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let dp = DataPlane::start(&cp.url(), "dp-1", dir.path().join("dp")).await;
    dp.wait_version(cp.head().await).await;
    for _ in 0..4 {
        assert_eq!(post_messages(&dp, &key, &body(false)).await.status, 200);
    }
    assert!(m.requests().iter().all(|r| r.path() == "/v1/messages"));
    // A base URL that names the route itself is refused, with the root to give instead.
    let mut admin = cp.admin().await;
    let err = admin
        .create_account(pb::CreateAccountRequest {
            name: "with-route".into(),
            kind: pb::AccountKind::AnthropicCompatible as i32,
            base_url: format!("{}/v1/messages", m.base_url()),
            credential: "cred".into(),
            weight: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message()
            .contains(&format!("give the server's root, {:?}", m.base_url())),
        "{}",
        err.message()
    );
    let err = admin
        .update_account(pb::UpdateAccountRequest {
            account: "with-v1".into(),
            base_url: Some(format!("{}/v1/messages/", m.base_url())),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn error_bodies_reach_clients_only_as_whole_api_errors() {
    let ev = hostile::sse_events(USAGE).concat();
    let cases: Vec<(&str, Script, bool, u16)> = vec![
        (
            "an HTML 500",
            Script::raw(hostile::response(
                500,
                &[("content-type", "text/html")],
                b"<html>ise</html>",
            )),
            false,
            500,
        ),
        (
            "a 418 page",
            Script::raw(hostile::response(
                418,
                &[("content-type", "text/plain")],
                b"I'm a teapot",
            )),
            false,
            418,
        ),
        (
            "a 500 carrying an event stream",
            Script::raw(hostile::response(
                500,
                &[("content-type", "text/event-stream")],
                ev.as_bytes(),
            )),
            true,
            500,
        ),
        (
            "an API error cut at the deadline",
            Script::raw(hostile::head(
                500,
                &[("content-type", "application/json"), ("content-length", "80")],
            ))
            .then(Step::Drip(
                br#"{"type":"error","error":{"type":"api_error","message":"xxxxxxxxxxxxxxxxxxxxxxxxxxx"}}"#.to_vec(),
                Duration::from_millis(400),
            )),
            false,
            500,
        ),
    ];
    for (name, script, stream, status) in cases {
        let f = fleet(
            script,
            false,
            &[("retry.deadline_ms", "1500"), ("queue.max_wait_ms", "100")],
        )
        .await;
        let r = ask(&f, stream).await;
        assert_eq!(r.status, status, "{name}: {}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.header("content-type"), Some("application/json"), "{name}");
        assert!(!r.error_type().is_empty(), "{name}: a whole Anthropic error");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_carry_only_json_events_and_end_at_message_stop() {
    let ev = hostile::sse_events(USAGE);
    // An event that is not JSON in the middle: what came before, then relay's error.
    let mut corrupt = ev[..3].to_vec();
    corrupt.push("event: content_block_delta\ndata: {not json at all\n\n".into());
    corrupt.extend(ev[3..].iter().cloned());
    let f = fleet(Script::raw(hostile::sse_response(&corrupt)), false, &[]).await;
    let r = ask(&f, true).await;
    let got = events(&r.body);
    assert_eq!(got.len(), 4, "{got:?}");
    assert_eq!(got[3].0, "error");
    assert!(r.body.starts_with(ev[..3].concat().as_bytes()));
    assert_eq!(wait_rows(&f.cp, 1).await[0].error_type, "api_error");

    // Events and garbage after message_stop never reach the client.
    let mut after = ev.clone();
    after.push("event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"INJECTED\"}}\n\n<html>".into());
    let f = fleet(Script::raw(hostile::sse_response(&after)), false, &[]).await;
    let r = ask(&f, true).await;
    assert_eq!(r.body, ev.concat().as_bytes(), "the stream ends at message_stop");
    assert_eq!(wait_rows(&f.cp, 1).await[0].error_type, "");

    // A first event that is not JSON, or events without names: not an Anthropic stream.
    let bad_start = vec!["event: message_start\ndata: {\"type\":\"message_start\"\n\n".to_string()];
    let nameless: Vec<String> = ev
        .iter()
        .map(|e| {
            e.lines()
                .filter(|l| !l.starts_with("event:"))
                .map(|l| format!("{l}\n"))
                .collect()
        })
        .collect();
    for (name, events_sent) in [("invalid message_start", bad_start), ("no event names", nameless)] {
        let f = fleet(Script::raw(hostile::sse_response(&events_sent)), true, &[]).await;
        let r = ask(&f, true).await;
        assert_good_answer(&r, true);
        assert_eq!(f.bad.request_count(), 1, "{name}");
    }

    // A cut event larger than what relay holds: relay's error still arrives as its own event.
    let mut huge = hostile::sse_head();
    huge.extend(hostile::chunk(ev[0].as_bytes()));
    let big = format!(
        "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"{}",
        "Q".repeat(1_100_000)
    );
    huge.extend(hostile::chunk(big.as_bytes()));
    let f = fleet(Script::raw(huge), false, &[]).await;
    let r = ask(&f, true).await;
    let text = String::from_utf8_lossy(&r.body);
    assert!(text.ends_with("\n\n"), "ends on a boundary");
    assert!(text.contains("QQQQ\n\nevent: error\n"), "the error event stands alone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreadable_counts_and_a_foreign_model_name_do_not_make_requests_free() {
    for usage in [
        serde_json::json!({"input_tokens": 1e30, "output_tokens": 5}),
        serde_json::json!({"input_tokens": -500, "output_tokens": -1}),
        serde_json::json!({"input_tokens": "100", "output_tokens": "abc"}),
    ] {
        let body = serde_json::json!({"id": "m", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": [], "usage": usage});
        let f = fleet(json_answer(&body), false, &[]).await;
        assert_eq!(ask(&f, false).await.status, 200);
        let rows = wait_rows(&f.cp, 1).await;
        assert_eq!(rows[0].anomaly, "suspect", "{usage}: {rows:?}");
    }
    // The price is the requested model's, whatever model the answer names.
    let mut priced = Vec::new();
    for model in ["claude-sonnet-4-5", "totally-free-model"] {
        let body = serde_json::json!({"id": "m", "type": "message", "role": "assistant", "model": model,
            "content": [], "usage": {"input_tokens": 1_000_000, "output_tokens": 100_000}});
        let f = fleet(json_answer(&body), false, &[]).await;
        assert_eq!(ask(&f, false).await.status, 200);
        priced.push(wait_rows(&f.cp, 1).await[0].cost_pico_usd);
    }
    assert!(priced[0] > 0);
    assert_eq!(
        priced[0], priced[1],
        "an upstream cannot make a request free by naming another model"
    );
}
