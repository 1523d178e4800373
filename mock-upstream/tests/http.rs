//! The mock over real HTTP on loopback, with hyper's client (HTTP/1.1 and h2c).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use relay_mock_upstream::{expected_usage, Fault, MockConfig, MockUpstream, Usage, CACHE_WRITE_TOKENS_PER_MARK};
use serde_json::{json, Value};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn h2_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).http2_only(true).build_http()
}

fn request(
    mock: &MockUpstream,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method(method)
        .uri(format!("{}{path}", mock.base_url()));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let body = body.map(|v| Bytes::from(v.to_string())).unwrap_or_default();
    b.body(Full::new(body)).unwrap()
}

const KEY: &[(&str, &str)] = &[("x-api-key", "sk-ant-good"), ("anthropic-version", "2023-06-01")];

/// Sends and reads the whole body.
async fn send(c: &HttpClient, req: Request<Full<Bytes>>) -> (StatusCode, HeaderMap, Bytes) {
    let resp = c.request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (parts.status, parts.headers, bytes)
}

async fn post(mock: &MockUpstream, headers: &[(&str, &str)], body: &Value) -> (StatusCode, HeaderMap, Bytes) {
    send(
        &client(),
        request(mock, Method::POST, "/v1/messages?beta=true", headers, Some(body)),
    )
    .await
}

fn headers_with<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut h: Vec<(&str, &str)> = KEY.to_vec();
    h.extend_from_slice(extra);
    h
}

fn simple_body(stream: bool) -> Value {
    json!({
        "model": "claude-sonnet-4-5-20250929",
        "max_tokens": 1024,
        "stream": stream,
        "messages": [{"role": "user", "content": "Hello, mock! Tell me something."}],
    })
}

/// `(event name, data JSON)` of every SSE event.
fn parse_sse(bytes: &[u8]) -> Vec<(String, Value)> {
    let text = std::str::from_utf8(bytes).unwrap();
    assert!(
        text.is_empty() || text.ends_with("\n\n"),
        "stream does not end on an event boundary: {text:?}"
    );
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let mut lines = e.lines();
            let name = lines.next().unwrap().strip_prefix("event: ").unwrap().to_string();
            let data = lines.next().unwrap().strip_prefix("data: ").unwrap();
            assert!(lines.next().is_none());
            let data: Value = serde_json::from_str(data).unwrap();
            assert_eq!(data["type"], name.as_str(), "event name and data.type differ");
            (name, data)
        })
        .collect()
}

fn usage_of(v: &Value) -> Usage {
    let n = |k: &str| v[k].as_u64().unwrap();
    Usage {
        input_tokens: n("input_tokens"),
        output_tokens: n("output_tokens"),
        cache_creation_input_tokens: n("cache_creation_input_tokens"),
        cache_5m: v["cache_creation"]["ephemeral_5m_input_tokens"].as_u64().unwrap(),
        cache_1h: v["cache_creation"]["ephemeral_1h_input_tokens"].as_u64().unwrap(),
        cache_read_input_tokens: n("cache_read_input_tokens"),
    }
}

/// Checks the order message_start, (block start, deltas, stop)*, message_delta, message_stop with pings
/// anywhere; returns the non-ping events.
fn assert_sequence(events: &[(String, Value)]) -> Vec<(String, Value)> {
    let events: Vec<_> = events.iter().filter(|(n, _)| n != "ping").cloned().collect();
    assert_eq!(events.first().unwrap().0, "message_start");
    assert_eq!(events.last().unwrap().0, "message_stop");
    assert_eq!(events[events.len() - 2].0, "message_delta");
    let mut open: Option<u64> = None;
    let mut next_index = 0;
    for (name, data) in &events[1..events.len() - 2] {
        match name.as_str() {
            "content_block_start" => {
                assert!(open.is_none());
                assert_eq!(data["index"], next_index);
                open = Some(next_index);
                next_index += 1;
            }
            "content_block_delta" => assert_eq!(Some(data["index"].as_u64().unwrap()), open),
            "content_block_stop" => {
                assert_eq!(Some(data["index"].as_u64().unwrap()), open);
                open = None;
            }
            other => panic!("unexpected event {other}"),
        }
    }
    assert!(open.is_none());
    events
}

fn cached_body(stream: bool) -> Value {
    json!({
        "model": "claude-sonnet-4-5-20250929",
        "max_tokens": 1024,
        "stream": stream,
        "system": [
            {"type": "text", "text": "x-anthropic-billing-header: cc"},
            {"type": "text", "text": "You are helpful.", "cache_control": {"type": "ephemeral", "ttl": "1h"}}
        ],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "A long document ...", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "Question?"}
            ]}
        ],
    })
}

#[tokio::test]
async fn non_streaming_shape_usage_and_headers() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let body = cached_body(false);
    let (status, headers, bytes) = post(&mock, &headers_with(&[("x-mock-cache-read", "77")]), &body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/json");
    assert!(headers.get("content-encoding").is_none());
    let request_id = headers["request-id"].to_str().unwrap().to_string();
    assert!(request_id.starts_with("req_mock_"));
    assert_eq!(headers["anthropic-organization-id"], mock.organization_id());
    for name in ["requests", "tokens", "input-tokens", "output-tokens"] {
        for part in ["limit", "remaining"] {
            let v = headers[format!("anthropic-ratelimit-{name}-{part}").as_str()]
                .to_str()
                .unwrap();
            v.parse::<u64>().unwrap();
        }
        let reset = headers[format!("anthropic-ratelimit-{name}-reset").as_str()]
            .to_str()
            .unwrap();
        chrono::DateTime::parse_from_rfc3339(reset).unwrap();
    }
    assert!(headers.get("anthropic-ratelimit-unified-status").is_none());

    let msg: Value = serde_json::from_slice(&bytes).unwrap();
    assert!(msg["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(msg["type"], "message");
    assert_eq!(msg["role"], "assistant");
    assert_eq!(msg["model"], "claude-sonnet-4-5-20250929");
    assert_eq!(msg["stop_reason"], "end_turn");
    assert!(msg["stop_sequence"].is_null());
    assert_eq!(msg["content"].as_array().unwrap().len(), 1);
    assert_eq!(msg["content"][0]["type"], "text");
    assert_eq!(msg["content"][0]["text"].as_str().unwrap().len(), 30 * 16);
    assert_eq!(msg["usage"]["service_tier"], "standard");

    let usage = usage_of(&msg["usage"]);
    let expected = MockConfig::default().expected_usage(&body, 77);
    assert_eq!(usage, expected);
    assert_eq!(expected.cache_5m, CACHE_WRITE_TOKENS_PER_MARK);
    assert_eq!(expected.cache_1h, CACHE_WRITE_TOKENS_PER_MARK);
    assert_eq!(expected.cache_creation_input_tokens, 2 * CACHE_WRITE_TOKENS_PER_MARK);
    assert_eq!(expected.cache_read_input_tokens, 77);
    assert_eq!(expected.output_tokens, 30);
    let messages_len = serde_json::to_vec(&body["messages"]).unwrap().len() as u64;
    assert_eq!(expected.input_tokens, messages_len / 4);
    assert_eq!(
        expected_usage(&body),
        Usage {
            cache_read_input_tokens: 0,
            ..expected
        }
    );

    // What was received and what was sent.
    assert_eq!(mock.sent_body(&request_id).unwrap(), bytes);
    let reqs = mock.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].request_id, request_id);
    assert_eq!(reqs[0].method, Method::POST);
    assert_eq!(reqs[0].path_and_query, "/v1/messages?beta=true");
    assert_eq!(reqs[0].path(), "/v1/messages");
    assert_eq!(reqs[0].header("x-api-key"), Some("sk-ant-good"));
    assert_eq!(reqs[0].json().unwrap(), body);
    assert_eq!(mock.request_count(), 1);
}

#[tokio::test]
async fn streaming_sequence_and_cumulative_usage() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let body = cached_body(true);
    let (status, headers, bytes) = post(&mock, &headers_with(&[("x-mock-cache-read", "5")]), &body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "text/event-stream");
    assert!(headers.get("content-length").is_none());
    let all = parse_sse(&bytes);
    assert!(all.iter().filter(|(n, _)| n == "ping").count() >= 1);
    assert_eq!(all[1].0, "ping");
    let events = assert_sequence(&all);
    let expected = MockConfig::default().expected_usage(&body, 5);

    let start = &events[0].1["message"];
    assert_eq!(start["model"], "claude-sonnet-4-5-20250929");
    assert_eq!(start["content"], json!([]));
    assert!(start["stop_reason"].is_null());
    assert_eq!(start["usage"]["output_tokens"], 1);
    assert_eq!(
        usage_of(&start["usage"]),
        Usage {
            output_tokens: 1,
            ..expected
        }
    );
    assert_eq!(start["usage"]["service_tier"], "standard");

    let text: String = events
        .iter()
        .filter(|(n, d)| n == "content_block_delta" && d["delta"]["type"] == "text_delta")
        .map(|(_, d)| d["delta"]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(text.len(), 30 * 16);
    assert_eq!(events.iter().filter(|(n, _)| n == "content_block_delta").count(), 30);

    let delta = &events[events.len() - 2].1;
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    let du = &delta["usage"];
    assert_eq!(du["output_tokens"].as_u64().unwrap(), expected.output_tokens);
    assert_eq!(du["input_tokens"].as_u64().unwrap(), expected.input_tokens);
    assert_eq!(
        du["cache_creation_input_tokens"].as_u64().unwrap(),
        expected.cache_creation_input_tokens
    );
    assert_eq!(
        du["cache_read_input_tokens"].as_u64().unwrap(),
        expected.cache_read_input_tokens
    );

    let request_id = headers["request-id"].to_str().unwrap();
    assert_eq!(mock.sent_body(request_id).unwrap(), bytes);
}

#[tokio::test]
async fn events_arrive_as_separate_frames_with_delays() {
    let config = MockConfig {
        ttfb: Duration::from_millis(150),
        event_delay: Duration::from_millis(10),
        text_events: 3,
        ping_every: 0,
        ..MockConfig::default()
    };
    let mock = MockUpstream::start(config).await.unwrap();
    let t0 = Instant::now();
    let resp = client()
        .request(request(
            &mock,
            Method::POST,
            "/v1/messages",
            KEY,
            Some(&simple_body(true)),
        ))
        .await
        .unwrap();
    assert!(
        t0.elapsed() < Duration::from_millis(140),
        "headers should not wait for ttfb"
    );
    let mut body = resp.into_body();
    let mut frames = Vec::new();
    while let Some(frame) = body.frame().await {
        let data = frame.unwrap().into_data().unwrap();
        if frames.is_empty() {
            assert!(t0.elapsed() >= Duration::from_millis(150));
        }
        frames.push(data);
    }
    // message_start, ping, block start, 3 deltas, block stop, message_delta, message_stop.
    assert_eq!(frames.len(), 9);
    for f in &frames {
        assert_eq!(parse_sse(f).len(), 1, "one event per frame");
    }
    assert!(t0.elapsed() >= Duration::from_millis(150 + 8 * 10));
}

fn tool_body(stream: bool) -> Value {
    json!({
        "model": "claude-sonnet-4-5-20250929",
        "max_tokens": 1024,
        "stream": stream,
        "tools": [
            {"name": "get_weather", "description": "Weather", "input_schema": {"type": "object", "properties": {
                "location": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"}
            }, "required": ["location"]}},
            {"name": "other", "input_schema": {"type": "object", "properties": {}}}
        ],
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
    })
}

#[tokio::test]
async fn tool_use_stream_partial_json_concatenates() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let body = tool_body(true);
    let (status, _, bytes) = post(&mock, KEY, &body).await;
    assert_eq!(status, StatusCode::OK);
    let events = assert_sequence(&parse_sse(&bytes));
    let start = events.iter().find(|(n, _)| n == "content_block_start").unwrap();
    assert_eq!(start.1["content_block"]["type"], "tool_use");
    assert_eq!(start.1["content_block"]["name"], "get_weather");
    assert!(start.1["content_block"]["id"].as_str().unwrap().starts_with("toolu_"));
    assert_eq!(start.1["content_block"]["input"], json!({}));
    let pieces: Vec<&str> = events
        .iter()
        .filter(|(n, _)| n == "content_block_delta")
        .map(|(_, d)| {
            assert_eq!(d["delta"]["type"], "input_json_delta");
            d["delta"]["partial_json"].as_str().unwrap()
        })
        .collect();
    assert_eq!(pieces.len(), 6);
    let input: Value = serde_json::from_str(&pieces.concat()).unwrap();
    assert!(input["location"].is_string());
    assert_eq!(input["days"], 1);
    assert_eq!(input["metric"], true);
    let delta = &events[events.len() - 2].1;
    assert_eq!(delta["delta"]["stop_reason"], "tool_use");
    assert_eq!(
        delta["usage"]["output_tokens"].as_u64().unwrap(),
        expected_usage(&body).output_tokens
    );
    assert_eq!(expected_usage(&body).output_tokens, 6);

    // Non-streaming: the same block, complete.
    let (status, _, bytes) = post(&mock, KEY, &tool_body(false)).await;
    assert_eq!(status, StatusCode::OK);
    let msg: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(msg["stop_reason"], "tool_use");
    assert_eq!(msg["content"][0]["type"], "tool_use");
    assert_eq!(msg["content"][0]["input"], input);

    // tool_choice picks the tool; "none" answers with text.
    let mut chosen = tool_body(false);
    chosen["tool_choice"] = json!({"type": "tool", "name": "other"});
    let (_, _, bytes) = post(&mock, KEY, &chosen).await;
    let msg: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(msg["content"][0]["name"], "other");
    assert_eq!(msg["content"][0]["input"], json!({}));
    assert_eq!(
        msg["usage"]["output_tokens"].as_u64().unwrap(),
        expected_usage(&chosen).output_tokens
    );
    let mut none = tool_body(false);
    none["tool_choice"] = json!({"type": "none"});
    let (_, _, bytes) = post(&mock, KEY, &none).await;
    let msg: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(msg["content"][0]["type"], "text");
    assert_eq!(msg["stop_reason"], "end_turn");
}

#[tokio::test]
async fn thinking_block_with_signature() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let mut body = simple_body(true);
    body["thinking"] = json!({"type": "enabled", "budget_tokens": 2048});
    let (_, _, bytes) = post(&mock, KEY, &body).await;
    let events = assert_sequence(&parse_sse(&bytes));
    let starts: Vec<&Value> = events
        .iter()
        .filter(|(n, _)| n == "content_block_start")
        .map(|(_, d)| d)
        .collect();
    assert_eq!(starts.len(), 2);
    assert_eq!(starts[0]["content_block"]["type"], "thinking");
    assert_eq!(starts[1]["content_block"]["type"], "text");
    let kinds: Vec<&str> = events
        .iter()
        .filter(|(n, d)| n == "content_block_delta" && d["index"] == 0)
        .map(|(_, d)| d["delta"]["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.len(), 6);
    assert!(kinds[..5].iter().all(|k| *k == "thinking_delta"));
    assert_eq!(kinds[5], "signature_delta");
    let expected = expected_usage(&body);
    assert_eq!(expected.output_tokens, 35);
    assert_eq!(
        events[events.len() - 2].1["usage"]["output_tokens"].as_u64().unwrap(),
        35
    );

    body["stream"] = json!(false);
    let (_, _, bytes) = post(&mock, KEY, &body).await;
    let msg: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(msg["content"][0]["type"], "thinking");
    assert_eq!(msg["content"][0]["thinking"].as_str().unwrap().len(), 5 * 16);
    assert!(msg["content"][0]["signature"].as_str().unwrap().len() > 10);
    assert_eq!(msg["content"][1]["type"], "text");
    assert_eq!(usage_of(&msg["usage"]), expected);
}

/// Checks the Anthropic error shape and returns the error type.
fn error_type(headers: &HeaderMap, bytes: &[u8]) -> String {
    let v: Value = serde_json::from_slice(bytes).unwrap();
    assert_eq!(v["type"], "error");
    assert!(v["error"]["message"].is_string());
    assert_eq!(v["request_id"], headers["request-id"].to_str().unwrap());
    assert!(headers.get("anthropic-organization-id").is_some());
    assert_eq!(headers["content-type"], "application/json");
    v["error"]["type"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn status_faults_by_credential() {
    let faults: HashMap<String, Fault> = [
        ("k-429", Fault::RateLimited { retry_after_secs: 12 }),
        ("k-529", Fault::Overloaded),
        ("k-500", Fault::ServerError),
        ("k-401", Fault::Unauthorized),
        ("k-org", Fault::OrgDisabled),
        ("oauth-429", Fault::RateLimited { retry_after_secs: 40 }),
    ]
    .into_iter()
    .map(|(k, f)| (k.to_string(), f))
    .collect();
    let mock = MockUpstream::start(MockConfig {
        faults_by_credential: faults,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let body = simple_body(false);
    let cases = [
        ("k-429", 429, "rate_limit_error"),
        ("k-529", 529, "overloaded_error"),
        ("k-500", 500, "api_error"),
        ("k-401", 401, "authentication_error"),
        ("k-org", 400, "invalid_request_error"),
    ];
    for (key, status, kind) in cases {
        let (s, h, b) = post(&mock, &[("x-api-key", key), ("anthropic-version", "2023-06-01")], &body).await;
        assert_eq!(s.as_u16(), status, "{key}");
        assert_eq!(error_type(&h, &b), kind, "{key}");
        if key == "k-org" {
            let v: Value = serde_json::from_slice(&b).unwrap();
            assert_eq!(v["error"]["message"], "This organization has been disabled.");
        }
        if key == "k-429" {
            assert_eq!(h["retry-after"], "12");
            assert_eq!(h["anthropic-ratelimit-requests-remaining"], "0");
            chrono::DateTime::parse_from_rfc3339(h["anthropic-ratelimit-requests-reset"].to_str().unwrap()).unwrap();
            assert!(h.get("anthropic-ratelimit-unified-status").is_none());
        }
    }
    // Bearer (OAuth) credential: unified headers.
    let (s, h, b) = post(
        &mock,
        &[
            ("authorization", "Bearer oauth-429"),
            ("anthropic-version", "2023-06-01"),
        ],
        &body,
    )
    .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(error_type(&h, &b), "rate_limit_error");
    assert_eq!(h["retry-after"], "40");
    assert_eq!(h["anthropic-ratelimit-unified-status"], "rejected");
    let reset: i64 = h["anthropic-ratelimit-unified-reset"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let now = chrono::Utc::now().timestamp();
    assert!((now + 35..=now + 45).contains(&reset));

    // A healthy key on the same server is fine; a healthy Bearer gets unified "allowed".
    let (s, _, _) = post(&mock, KEY, &body).await;
    assert_eq!(s, StatusCode::OK);
    let (s, h, _) = post(
        &mock,
        &[
            ("authorization", "Bearer oauth-ok"),
            ("anthropic-version", "2023-06-01"),
        ],
        &body,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h["anthropic-ratelimit-unified-status"], "allowed");

    // Status faults apply to count_tokens and models too.
    let c = client();
    let (s, _, _) = send(
        &c,
        request(&mock, Method::GET, "/v1/models", &[("x-api-key", "k-529")], None),
    )
    .await;
    assert_eq!(s.as_u16(), 529);
    let (s, _, _) = send(
        &c,
        request(
            &mock,
            Method::POST,
            "/v1/messages/count_tokens",
            &[("x-api-key", "k-401"), ("anthropic-version", "2023-06-01")],
            Some(&body),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // Faults can change at runtime.
    mock.set_fault("k-500", None);
    mock.set_fault("sk-ant-good", Some(Fault::Overloaded));
    let (s, _, _) = post(
        &mock,
        &[("x-api-key", "k-500"), ("anthropic-version", "2023-06-01")],
        &body,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = post(&mock, KEY, &body).await;
    assert_eq!(s.as_u16(), 529);
    mock.clear_faults();
    let (s, _, _) = post(
        &mock,
        &[("x-api-key", "k-429"), ("anthropic-version", "2023-06-01")],
        &body,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
}

/// `echo-credential`: a 400 `invalid_request_error` quoting the credential sent (the x-api-key, else
/// the Bearer token), whole or its last N characters.
#[tokio::test]
async fn echo_credential_quotes_the_credential_sent() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let body = simple_body(false);
    let message = |b: &Bytes| -> String {
        let v: Value = serde_json::from_slice(b).unwrap();
        v["error"]["message"].as_str().unwrap().to_string()
    };
    let (s, h, b) = post(&mock, &headers_with(&[("x-mock-fault", "echo-credential")]), &body).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(error_type(&h, &b), "invalid_request_error");
    assert!(
        message(&b).contains(&format!("Incorrect API key provided: {}.", KEY[0].1)),
        "{b:?}"
    );
    let token = "sk-ant-oat01-bearer-token-0123456789abcdefghij";
    let bearer = format!("Bearer {token}");
    let (s, _, b) = post(
        &mock,
        &[
            ("authorization", bearer.as_str()),
            ("anthropic-version", "2023-06-01"),
            ("x-mock-fault", "echo-credential"),
            ("x-mock-fault-after", "20"),
        ],
        &body,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let m = message(&b);
    assert!(m.contains(&format!("provided: {}.", &token[token.len() - 20..])), "{m}");
    assert!(!m.contains(&token[..token.len() - 20]), "{m}");
}

#[tokio::test]
async fn status_faults_by_header() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let body = simple_body(true);
    let cases = [
        ("rate-limited", 429, "rate_limit_error"),
        ("overloaded", 529, "overloaded_error"),
        ("server-error", 500, "api_error"),
        ("unauthorized", 401, "authentication_error"),
        ("org-disabled", 400, "invalid_request_error"),
    ];
    for (fault, status, kind) in cases {
        let (s, h, b) = post(&mock, &headers_with(&[("x-mock-fault", fault)]), &body).await;
        assert_eq!(s.as_u16(), status, "{fault}");
        assert_eq!(error_type(&h, &b), kind, "{fault}");
        if fault == "rate-limited" {
            assert_eq!(
                h["retry-after"],
                relay_mock_upstream::DEFAULT_RETRY_AFTER_SECS.to_string().as_str()
            );
        }
    }
    let (s, h, _) = post(
        &mock,
        &headers_with(&[("x-mock-fault", "rate-limited"), ("x-mock-retry-after", "3")]),
        &body,
    )
    .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(h["retry-after"], "3");
    // Non-streaming error-event: a plain 529.
    let (s, h, b) = post(
        &mock,
        &headers_with(&[("x-mock-fault", "error-event")]),
        &simple_body(false),
    )
    .await;
    assert_eq!(s.as_u16(), 529);
    assert_eq!(error_type(&h, &b), "overloaded_error");
    // Unknown fault name.
    let (s, h, b) = post(&mock, &headers_with(&[("x-mock-fault", "meteor")]), &body).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(error_type(&h, &b), "invalid_request_error");
}

/// Reads frames until the body ends, errors, or nothing arrives for `idle`. Returns (frames, how it ended).
async fn read_frames(
    mock: &MockUpstream,
    headers: &[(&str, &str)],
    body: &Value,
    idle: Duration,
) -> (StatusCode, Vec<Bytes>, &'static str) {
    read_frames_with(&client(), mock, headers, body, idle).await
}

async fn read_frames_with(
    c: &HttpClient,
    mock: &MockUpstream,
    headers: &[(&str, &str)],
    body: &Value,
    idle: Duration,
) -> (StatusCode, Vec<Bytes>, &'static str) {
    let resp = c
        .request(request(mock, Method::POST, "/v1/messages", headers, Some(body)))
        .await
        .unwrap();
    let status = resp.status();
    let mut b = resp.into_body();
    let mut frames = Vec::new();
    loop {
        match tokio::time::timeout(idle, b.frame()).await {
            Err(_) => return (status, frames, "stalled"),
            Ok(None) => return (status, frames, "ended"),
            Ok(Some(Err(_))) => return (status, frames, "error"),
            Ok(Some(Ok(f))) => frames.push(f.into_data().unwrap()),
        }
    }
}

#[tokio::test]
async fn mid_stream_faults_by_header_and_credential() {
    let faults = HashMap::from([
        ("k-drop".to_string(), Fault::DropMidStream { after_events: 4 }),
        ("k-err".to_string(), Fault::ErrorEventMidStream { after_events: 5 }),
        ("k-stall".to_string(), Fault::Stall { after_events: 2 }),
    ]);
    let mock = MockUpstream::start(MockConfig {
        faults_by_credential: faults,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let body = simple_body(true);
    let idle = Duration::from_millis(400);
    let with = |key: &'static str| vec![("x-api-key", key), ("anthropic-version", "2023-06-01")];

    let (s, frames, end) = read_frames(&mock, &with("k-drop"), &body, idle).await;
    assert_eq!((s, frames.len(), end), (StatusCode::OK, 4, "error"));
    let (s, frames, end) = read_frames(
        &mock,
        &headers_with(&[("x-mock-fault", "drop-mid-stream"), ("x-mock-fault-after", "7")]),
        &body,
        idle,
    )
    .await;
    assert_eq!((s, frames.len(), end), (StatusCode::OK, 7, "error"));
    assert_eq!(parse_sse(&frames[0])[0].0, "message_start");

    for (headers, n) in [
        (with("k-err"), 5),
        (
            headers_with(&[("x-mock-fault", "error-event"), ("x-mock-fault-after", "0")]),
            0,
        ),
    ] {
        let (s, frames, end) = read_frames(&mock, &headers, &body, idle).await;
        assert_eq!((s, frames.len(), end), (StatusCode::OK, n + 1, "ended"));
        let last = parse_sse(frames.last().unwrap());
        assert_eq!(last[0].0, "error");
        assert_eq!(
            last[0].1,
            json!({"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}})
        );
    }

    let (s, frames, end) = read_frames(&mock, &with("k-stall"), &body, idle).await;
    assert_eq!((s, frames.len(), end), (StatusCode::OK, 2, "stalled"));
    let (s, frames, end) = read_frames(
        &mock,
        &headers_with(&[("x-mock-fault", "stall"), ("x-mock-fault-after", "3")]),
        &body,
        idle,
    )
    .await;
    assert_eq!((s, frames.len(), end), (StatusCode::OK, 3, "stalled"));

    // Non-streaming drop: 200 then a truncated body and an aborted connection.
    let resp = client()
        .request(request(
            &mock,
            Method::POST,
            "/v1/messages",
            &headers_with(&[("x-mock-fault", "drop-mid-stream")]),
            Some(&simple_body(false)),
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.into_body().collect().await.is_err());
    // Non-streaming stall: no answer at all.
    let req = request(
        &mock,
        Method::POST,
        "/v1/messages",
        &headers_with(&[("x-mock-fault", "stall")]),
        Some(&simple_body(false)),
    );
    assert!(tokio::time::timeout(idle, client().request(req)).await.is_err());
}

#[tokio::test]
async fn dropping_the_mock_ends_stalled_streams() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let resp = client()
        .request(request(
            &mock,
            Method::POST,
            "/v1/messages",
            &headers_with(&[("x-mock-fault", "stall")]),
            Some(&simple_body(true)),
        ))
        .await
        .unwrap();
    drop(mock);
    let r = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect()).await;
    assert!(
        matches!(r, Ok(Err(_))),
        "the stalled stream should be cut when the mock is dropped"
    );
}

#[tokio::test]
async fn count_tokens_uses_the_input_rule() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let body =
        json!({"model": "claude-sonnet-4-5-20250929", "messages": [{"role": "user", "content": "count me please"}]});
    let (s, h, b) = send(
        &client(),
        request(
            &mock,
            Method::POST,
            "/v1/messages/count_tokens?beta=true",
            KEY,
            Some(&body),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(h["request-id"].to_str().unwrap().starts_with("req_mock_"));
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v, json!({"input_tokens": expected_usage(&body).input_tokens}));
    let (s, h, b) = send(
        &client(),
        request(
            &mock,
            Method::POST,
            "/v1/messages/count_tokens",
            KEY,
            Some(&json!({"messages": []})),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(error_type(&h, &b), "invalid_request_error");
}

#[tokio::test]
async fn models_page_shape() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let c = client();
    let (s, h, b) = send(
        &c,
        request(&mock, Method::GET, "/v1/models?limit=1000", &[("x-api-key", "k")], None),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(h.get("anthropic-organization-id").is_some());
    let v: Value = serde_json::from_slice(&b).unwrap();
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), relay_mock_upstream::MODELS.len());
    assert_eq!(data[0]["id"], relay_mock_upstream::MODELS[0].0);
    for m in data {
        assert_eq!(m["type"], "model");
        assert!(m["id"].as_str().unwrap().starts_with("claude"));
        assert!(m["display_name"].is_string());
        chrono::DateTime::parse_from_rfc3339(m["created_at"].as_str().unwrap()).unwrap();
    }
    assert_eq!(v["has_more"], false);
    assert_eq!(v["first_id"], data[0]["id"]);
    assert_eq!(v["last_id"], data[data.len() - 1]["id"]);

    let (_, _, b) = send(
        &c,
        request(&mock, Method::GET, "/v1/models?limit=2", &[("x-api-key", "k")], None),
    )
    .await;
    let page1: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(page1["data"].as_array().unwrap().len(), 2);
    assert_eq!(page1["has_more"], true);
    let after = page1["last_id"].as_str().unwrap();
    let (_, _, b) = send(
        &c,
        request(
            &mock,
            Method::GET,
            &format!("/v1/models?limit=2&after_id={after}"),
            &[("x-api-key", "k")],
            None,
        ),
    )
    .await;
    let page2: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(page2["first_id"], data[2]["id"]);

    let (s, _, b) = send(
        &c,
        request(
            &mock,
            Method::GET,
            "/v1/models/claude-sonnet-4-5-20250929",
            &[("authorization", "Bearer t")],
            None,
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let m: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(m["id"], "claude-sonnet-4-5-20250929");
    let (s, h, b) = send(
        &c,
        request(&mock, Method::GET, "/v1/models/nope", &[("x-api-key", "k")], None),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(error_type(&h, &b), "not_found_error");
}

#[tokio::test]
async fn request_validation() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let body = simple_body(false);
    // Missing key.
    let (s, h, b) = post(&mock, &[("anthropic-version", "2023-06-01")], &body).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(error_type(&h, &b), "authentication_error");
    let (s, h, b) = send(&client(), request(&mock, Method::GET, "/v1/models", &[], None)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(error_type(&h, &b), "authentication_error");
    // Missing version.
    let (s, h, b) = post(&mock, &[("x-api-key", "k")], &body).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(error_type(&h, &b), "invalid_request_error");
    // Bad bodies.
    for bad in [
        json!({"max_tokens": 10, "messages": []}),
        json!({"model": "m", "messages": []}),
        json!({"model": "m", "max_tokens": 10}),
        json!([1, 2]),
    ] {
        let (s, h, b) = post(&mock, KEY, &bad).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(error_type(&h, &b), "invalid_request_error");
    }
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("{}/v1/messages", mock.base_url()))
        .header("x-api-key", "k")
        .header("anthropic-version", "2023-06-01")
        .body(Full::new(Bytes::from_static(b"{not json")))
        .unwrap();
    let (s, h, b) = send(&client(), req).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(error_type(&h, &b), "invalid_request_error");
    // Unknown route: 404, recorded.
    let (s, h, b) = send(
        &client(),
        request(&mock, Method::POST, "/api/event_logging/batch", KEY, Some(&json!({}))),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(error_type(&h, &b), "not_found_error");
    assert!(mock.requests().iter().any(|r| r.path() == "/api/event_logging/batch"));
}

#[tokio::test]
async fn h2c_streaming() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let resp = h2_client()
        .request(request(
            &mock,
            Method::POST,
            "/v1/messages",
            KEY,
            Some(&simple_body(true)),
        ))
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    assert_sequence(&parse_sse(&bytes));
    assert_eq!(mock.requests()[0].version, http::Version::HTTP_2);
    // A mid-stream drop on h2 resets the stream after the events before it; a stall keeps it open.
    let h2 = h2_client();
    let idle = Duration::from_millis(400);
    let drop = headers_with(&[("x-mock-fault", "drop"), ("x-mock-fault-after", "5")]);
    let (s, frames, end) = read_frames_with(&h2, &mock, &drop, &simple_body(true), idle).await;
    assert_eq!((s, frames.len(), end), (StatusCode::OK, 5, "error"));
    let stall = headers_with(&[("x-mock-fault", "stall"), ("x-mock-fault-after", "2")]);
    let (s, frames, end) = read_frames_with(&h2, &mock, &stall, &simple_body(true), idle).await;
    assert_eq!((s, frames.len(), end), (StatusCode::OK, 2, "stalled"));
}

#[tokio::test]
async fn no_record_mode_and_concurrency() {
    let mock = MockUpstream::start(MockConfig {
        record: false,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let c = c.clone();
        let req = request(&mock, Method::POST, "/v1/messages", KEY, Some(&simple_body(i % 2 == 0)));
        tasks.push(tokio::spawn(async move { send(&c, req).await.0 }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(mock.request_count(), 200);
    assert!(mock.requests().is_empty());
}
