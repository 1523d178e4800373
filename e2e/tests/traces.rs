#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Traces and the per-request log line, from a real relay process: an OTLP receiver (gRPC, and
//! HTTP/protobuf) collects what relay exports while a request fails over from a broken account
//! to a good one; the test reads the span tree, its attributes, the absence of secrets, and the
//! `relay::request` JSON line on the process's stderr.
mod common;
use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use relay_mock_upstream::{Fault, MockConfig};
use relay_test_support::wait_for;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the receiver got: every export request, as sent.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

impl Received {
    fn spans(&self) -> Vec<Span> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .flat_map(|r| r.resource_spans.iter())
            .flat_map(|r| r.scope_spans.iter())
            .flat_map(|s| s.spans.iter().cloned())
            .collect()
    }
    fn debug_text(&self) -> String {
        format!("{:?}", self.0.lock().unwrap())
    }
    fn service_names(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .flat_map(|r| r.resource_spans.iter())
            .filter_map(|r| r.resource.as_ref())
            .flat_map(|r| r.attributes.iter())
            .filter(|kv| kv.key == "service.name")
            .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
                Value::StringValue(s) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().push(req.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// An OTLP/gRPC receiver on a free port.
async fn grpc_receiver() -> (String, Received) {
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = TraceServiceServer::new(received.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (format!("http://{addr}"), received)
}

/// An OTLP/gRPC receiver over TLS that requires a client certificate from `ca`.
async fn grpc_tls_receiver(ca: &TestCa) -> (String, Received) {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (cert, key) = ca.issue(&["localhost"], false);
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, key))
        .client_ca_root(Certificate::from_pem(&ca.pem));
    let svc = TraceServiceServer::new(received.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (format!("https://localhost:{port}"), received)
}

/// An OTLP/HTTP receiver (POST /v1/traces, protobuf bodies) on a free port.
async fn http_receiver() -> (String, Received) {
    use http_body_util::BodyExt;
    use prost::Message;
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let r = received.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let r = r.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let r = r.clone();
                    async move {
                        let ok = req.uri().path() == "/v1/traces"
                            && req.headers().get("content-type").and_then(|v| v.to_str().ok())
                                == Some("application/x-protobuf");
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let status = match (ok, ExportTraceServiceRequest::decode(body)) {
                            (true, Ok(m)) => {
                                r.0.lock().unwrap().push(m);
                                200
                            }
                            _ => 400,
                        };
                        let mut resp = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::new()));
                        *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (format!("http://{addr}"), received)
}

fn attr(span: &Span, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.clone())
}

fn attr_str(span: &Span, key: &str) -> String {
    match attr(span, key) {
        Some(Value::StringValue(s)) => s,
        other => panic!("{}: {key} is {other:?}", span.name),
    }
}

fn attr_int(span: &Span, key: &str) -> i64 {
    match attr(span, key) {
        Some(Value::IntValue(n)) => n,
        other => panic!("{}: {key} is {other:?}", span.name),
    }
}

struct Run {
    relay: Standalone,
    received: Received,
    secrets: Vec<String>,
    prompt: String,
    /// The `traceparent` each upstream request carried, in order.
    upstream_traceparents: Vec<Option<String>>,
    /// The upstream, kept alive for requests after the failover.
    _mock: relay_mock_upstream::MockUpstream,
    _dir: tempfile::TempDir,
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

/// A standalone relay exporting to `endpoint` over `protocol`, a broken account tried first and a
/// good one, and one client request with a `traceparent` that fails over.
/// With `propagate`, the operator turned `tracing.propagate_upstream` on.
async fn failover_run(protocol: &str, endpoint: String, received: Received, propagate: bool) -> Run {
    failover_run_with(protocol, endpoint, received, propagate, &[]).await
}

/// [`failover_run`] with more `OTEL_*` variables for the relay process.
async fn failover_run_with(
    protocol: &str,
    endpoint: String,
    received: Received,
    propagate: bool,
    env: &[(&str, std::path::PathBuf)],
) -> Run {
    let mock = mock(MockConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay-data");
    let (grpc, proxy) = (relay_test_support::free_port(), relay_test_support::free_port());
    let mut cmd = std::process::Command::new(relay_test_support::workspace_bin("relay-control-plane"));
    cmd.args(["--standalone", "--listen", &format!("127.0.0.1:{grpc}")])
        .args(["--proxy-listen", &format!("127.0.0.1:{proxy}")])
        .args([
            "--web-listen",
            &format!("127.0.0.1:{}", relay_test_support::free_port()),
        ])
        .args(["--log-format", "json"])
        .arg("--data-dir")
        .arg(&data)
        .env_remove("RELAY_ADMIN_TOKEN")
        .env_remove("RELAY_MASTER_KEY")
        // Debug for the proxy: its "answered" line is logged inside the request.
        .env("RUST_LOG", "info,relay_data_plane::proxy=debug")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
        .env("OTEL_SERVICE_NAME", "relay-under-test")
        .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())));
    let proc = relay_test_support::Proc::spawn(cmd, &dir.path().join("relay.log")).unwrap();
    let mut relay = Standalone { proc, grpc, proxy };
    relay.ready().await;
    let token = std::fs::read_to_string(data.join("admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let ctl = |args: &[&str], stdin: Option<&str>| relayctl(&relay.server(), &token, args, stdin);
    ctl(&["settings", "set", "retry.backoff_base_ms", "1"], None);
    ctl(&["settings", "set", "retry.backoff_max_ms", "5"], None);
    if propagate {
        ctl(&["settings", "set", "tracing.propagate_upstream", "true"], None);
    }
    let (broken, good) = ("cred-broken-7f3a9c", "cred-good-2b8e1d");
    for (name, cred, priority) in [("broken", broken, "0"), ("good", good, "1")] {
        ctl(
            &[
                "account",
                "add",
                name,
                "--kind",
                "anthropic-compatible",
                "--base-url",
                &mock.base_url(),
                "--priority",
                priority,
                "--secret-stdin",
            ],
            Some(cred),
        );
    }
    mock.set_fault(broken, Some(Fault::ServerError));
    let created: serde_json::Value =
        serde_json::from_str(&ctl(&["-o", "json", "key", "create", "k-trace"], None)).unwrap();
    let key = created["key"].as_str().unwrap().to_string();
    let url = format!("http://127.0.0.1:{proxy}/v1/messages");
    let prompt = format!("secret prompt {}", uuid::Uuid::new_v4());
    let mut body = message_body("claude-sonnet-4-5", false);
    body["messages"][0]["content"] = serde_json::json!(prompt);
    let headers = sdk_headers(&key);
    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    let mut hs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    hs.push(("traceparent", traceparent.as_str()));
    hs.push(("x-request-id", "client-req-42"));
    // Wait for the in-process data plane to know the key (with a trace of its own).
    wait_for(Duration::from_secs(15), "the key to be served", || {
        let url = format!("http://127.0.0.1:{proxy}/relay/v1/key");
        let h = sdk_headers(&key);
        async move {
            let hs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            (send("GET", &url, &hs, "").await.status == 200).then_some(())
        }
    })
    .await
    .unwrap();
    let resp = send("POST", &url, &hs, body.to_string()).await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    // Both accounts were asked, the broken one first; without the setting no traceparent went
    // upstream (with it, each attempt's own: checked against the spans by the caller).
    let reqs = mock.requests();
    assert!(reqs.iter().any(|r| r.header("x-api-key") == Some(broken)));
    assert!(reqs.iter().any(|r| r.header("x-api-key") == Some(good)));
    let upstream_traceparents: Vec<Option<String>> = reqs
        .iter()
        .filter(|r| r.header("x-api-key").is_some())
        .map(|r| r.header("traceparent").map(str::to_string))
        .collect();
    if !propagate {
        assert!(
            upstream_traceparents.iter().all(Option::is_none),
            "traceparent went upstream"
        );
    }
    Run {
        relay,
        received,
        secrets: vec![broken.to_string(), good.to_string(), key, token],
        prompt,
        upstream_traceparents,
        _mock: mock,
        _dir: dir,
    }
}

/// The spans of the client's trace, once the server span and two attempts have arrived.
async fn trace_of(run: &Run) -> Vec<Span> {
    wait_for(Duration::from_secs(30), "the request's spans", || {
        let spans: Vec<Span> = run
            .received
            .spans()
            .into_iter()
            .filter(|s| relay_proto::hex(&s.trace_id) == TRACE_ID)
            .collect();
        async move {
            let attempts = spans.iter().filter(|s| s.kind == SpanKind::Client as i32).count();
            let server = spans.iter().any(|s| s.kind == SpanKind::Server as i32);
            (server && attempts >= 2).then_some(spans)
        }
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}: got {}\nlog: {}",
            run.received.debug_text(),
            run.relay.proc.log_text()
        )
    })
}

fn check_tree(run: &Run, spans: &[Span]) {
    // The client's trace is honoured: the server span's parent is the client's span.
    let server: Vec<&Span> = spans.iter().filter(|s| s.kind == SpanKind::Server as i32).collect();
    assert_eq!(server.len(), 1, "{spans:?}");
    let server = server[0];
    assert_eq!(relay_proto::hex(&server.parent_span_id), PARENT_ID);
    assert_eq!(server.name, "POST messages");
    assert_eq!(attr_int(server, "http.response.status_code"), 200);
    assert_eq!(attr_str(server, "relay.key.name"), "k-trace");
    assert_eq!(attr_int(server, "relay.attempts"), 2);
    // One CLIENT child per attempt, GenAI conventions.
    let mut attempts: Vec<&Span> = spans.iter().filter(|s| s.kind == SpanKind::Client as i32).collect();
    attempts.sort_by_key(|s| s.start_time_unix_nano);
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    for a in &attempts {
        assert_eq!(a.parent_span_id, server.span_id, "{a:?}");
        assert_eq!(a.name, "chat claude-sonnet-4-5");
        assert_eq!(attr_str(a, "gen_ai.operation.name"), "chat");
        assert_eq!(attr_str(a, "gen_ai.provider.name"), "anthropic");
        assert_eq!(attr_str(a, "gen_ai.request.model"), "claude-sonnet-4-5");
        assert_eq!(
            attr_int(a, "gen_ai.request.max_tokens"),
            message_body("x", false)["max_tokens"].as_i64().unwrap()
        );
    }
    let (failed, ok) = (attempts[0], attempts[1]);
    assert_eq!(attr_str(failed, "relay.account.name"), "broken");
    assert_eq!(attr_str(failed, "relay.attempt.outcome"), "failed");
    assert_eq!(attr_str(failed, "relay.retry_reason"), "upstream_500");
    assert_eq!(attr_int(failed, "http.response.status_code"), 500);
    assert_eq!(attr_str(ok, "relay.account.name"), "good");
    assert_eq!(attr_str(ok, "relay.attempt.outcome"), "ok");
    assert!(attr(ok, "relay.retry_reason").is_none());
    assert!(attr_str(ok, "gen_ai.response.model").starts_with("claude-sonnet-4-5"));
    assert!(attr_int(ok, "gen_ai.usage.input_tokens") > 0);
    assert!(attr_int(ok, "gen_ai.usage.output_tokens") > 0);
    assert!(attr_str(ok, "gen_ai.response.id").starts_with("msg_"));
    match attr(ok, "gen_ai.response.finish_reasons") {
        Some(Value::ArrayValue(a)) => {
            let reasons: Vec<_> = a.values.iter().filter_map(|v| v.value.clone()).collect();
            assert_eq!(reasons, vec![Value::StringValue("end_turn".into())]);
        }
        other => panic!("finish_reasons is {other:?}"),
    }
    // The resource names the service as OTEL_SERVICE_NAME says.
    assert!(run.received.service_names().iter().all(|n| n == "relay-under-test"));
    // Nothing secret and no prompt anywhere in what was exported (every span, not just this trace's).
    let all = run.received.debug_text();
    for s in &run.secrets {
        assert!(!all.contains(s.as_str()), "a secret was exported");
    }
    assert!(!all.contains(&run.prompt), "the prompt was exported");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failover_is_one_trace_over_otlp_grpc_and_one_json_log_line() {
    let (endpoint, received) = grpc_receiver().await;
    let run = failover_run("grpc", endpoint, received, false).await;
    let spans = trace_of(&run).await;
    check_tree(&run, &spans);

    // The control plane's own work is traced too: Admin calls (SERVER spans named by method),
    // config pushes to the data plane, the usage batch that carried this request's records, and
    // leader jobs.
    let cp = wait_for(Duration::from_secs(30), "the control plane's spans", || {
        let spans = run.received.spans();
        async move {
            let admin = spans
                .iter()
                .any(|s| s.name.starts_with("relay.v1.Admin/") && s.kind == SpanKind::Server as i32);
            let push = spans.iter().any(|s| s.name == "config.push");
            let ingest = spans
                .iter()
                .any(|s| s.name == "usage.ingest" && attr_int(s, "relay.usage.events") >= 1);
            // A leader job's run (the standalone replica leads; its OAuth refresh pass runs at start).
            let leader = spans.iter().any(|s| s.name.starts_with("leader."));
            (admin && push && ingest && leader).then_some(spans)
        }
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}: got {:?}",
            run.received.spans().iter().map(|s| &s.name).collect::<Vec<_>>()
        )
    });
    let create_key = cp
        .iter()
        .find(|s| s.name == "relay.v1.Admin/CreateApiKey")
        .unwrap_or_else(|| {
            panic!(
                "no CreateApiKey span in {:?}",
                cp.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        });
    assert_eq!(attr_str(create_key, "rpc.system"), "grpc");
    assert_eq!(attr_str(create_key, "rpc.method"), "CreateApiKey");

    // The per-request line on stderr: JSON, target relay::request, the fields an operator reads.
    let log = run.relay.proc.log_text();
    let lines: Vec<serde_json::Value> = log.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let line = lines
        .iter()
        .find(|l| l["target"] == "relay::request" && l["fields"]["client_request_id"] == "client-req-42")
        .unwrap_or_else(|| panic!("no relay::request line in {log}"));
    let f = &line["fields"];
    assert_eq!(line["level"], "INFO");
    assert_eq!(f["trace_id"], TRACE_ID);
    assert_eq!(f["key_name"], "k-trace");
    assert_eq!(f["accounts"], "broken,good");
    assert_eq!(f["model"], "claude-sonnet-4-5");
    assert_eq!(f["stream"], false);
    assert_eq!(f["status"], 200);
    assert_eq!(f["attempts"], 2);
    assert_eq!(f["error_type"], "");
    assert!(f["input_tokens"].as_u64().unwrap() > 0 && f["output_tokens"].as_u64().unwrap() > 0);
    assert!(f["duration_ms"].is_u64() && f["ttfb_ms"].is_u64() && f["cost_usd"].is_number());
    let request_id = f["request_id"].as_str().unwrap().to_string();
    assert!(!request_id.is_empty());
    // Other lines logged while serving the request carry its request id (the request span's field).
    let inside: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["target"] != "relay::request")
        .filter(|l| l["span"]["request_id"] == request_id.as_str())
        .collect();
    assert!(
        !inside.is_empty(),
        "no other line carries request_id {request_id}: {log}"
    );
    for s in &run.secrets {
        assert!(!log.contains(s.as_str()), "a secret was logged");
    }
    assert!(!log.contains(&run.prompt), "the prompt was logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spans_export_over_otlp_http_protobuf_too_and_upstreams_get_the_attempts_traceparent_when_asked() {
    let (endpoint, received) = http_receiver().await;
    let run = failover_run("http/protobuf", endpoint, received, true).await;
    let spans = trace_of(&run).await;
    check_tree(&run, &spans);
    // tracing.propagate_upstream: each upstream request carried its attempt span's context (the
    // client's trace id, the attempt span as parent), not the client's own span.
    let mut attempts: Vec<&Span> = spans.iter().filter(|s| s.kind == SpanKind::Client as i32).collect();
    attempts.sort_by_key(|s| s.start_time_unix_nano);
    let expected: Vec<Option<String>> = attempts
        .iter()
        .map(|a| Some(format!("00-{TRACE_ID}-{}-01", relay_proto::hex(&a.span_id))))
        .collect();
    assert_eq!(run.upstream_traceparents, expected);

    // A streamed answer is one trace too; its attempt span carries the usage read from the stream.
    const STREAM_TRACE: &str = "5bf92f3577b34da6a3ce929d0e0e4737";
    let mut body = message_body("claude-sonnet-4-5", true);
    body["messages"][0]["content"] = serde_json::json!("stream please");
    let key = run.secrets[2].clone();
    let headers = sdk_headers(&key);
    let traceparent = format!("00-{STREAM_TRACE}-{PARENT_ID}-01");
    let mut hs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    hs.push(("traceparent", traceparent.as_str()));
    let url = format!("http://127.0.0.1:{}/v1/messages", run.relay.proxy);
    let resp = send("POST", &url, &hs, body.to_string()).await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert!(String::from_utf8_lossy(&resp.body).contains("event: message_stop"));
    let spans = wait_for(Duration::from_secs(30), "the stream's spans", || {
        let spans: Vec<Span> = run
            .received
            .spans()
            .into_iter()
            .filter(|s| relay_proto::hex(&s.trace_id) == STREAM_TRACE)
            .collect();
        async move {
            // The broken account is still tried first: wait for the attempt that answered.
            let answered = spans
                .iter()
                .any(|s| s.kind == SpanKind::Client as i32 && attr_str(s, "relay.attempt.outcome") == "ok");
            let server = spans.iter().any(|s| s.kind == SpanKind::Server as i32);
            (server && answered).then_some(spans)
        }
    })
    .await
    .unwrap();
    let server = spans.iter().find(|s| s.kind == SpanKind::Server as i32).unwrap();
    assert_eq!(attr_int(server, "http.response.status_code"), 200);
    let attempt = spans
        .iter()
        .find(|s| s.kind == SpanKind::Client as i32 && attr_str(s, "relay.attempt.outcome") == "ok")
        .unwrap();
    assert_eq!(
        relay_proto::hex(&attempt.parent_span_id),
        relay_proto::hex(&server.span_id)
    );
    assert_eq!(attempt.name, "chat claude-sonnet-4-5");
    assert!(attr_int(attempt, "gen_ai.usage.output_tokens") > 0, "{attempt:?}");
    assert!(attr_str(attempt, "gen_ai.response.id").starts_with("msg_"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spans_export_over_otlp_grpc_with_tls_a_private_ca_and_a_client_certificate() {
    let ca = TestCa::new("otel test ca");
    let (endpoint, received) = grpc_tls_receiver(&ca).await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca.issue(&["relay"], true);
    let files = [("ca.pem", ca.pem.clone()), ("client.pem", cert), ("client.key", key)];
    for (name, pem) in &files {
        std::fs::write(dir.path().join(name), pem).unwrap();
    }
    let env = [
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", dir.path().join("ca.pem")),
        ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", dir.path().join("client.pem")),
        ("OTEL_EXPORTER_OTLP_CLIENT_KEY", dir.path().join("client.key")),
    ];
    let run = failover_run_with("grpc", endpoint, received, false, &env).await;
    let spans = trace_of(&run).await;
    check_tree(&run, &spans);
}
