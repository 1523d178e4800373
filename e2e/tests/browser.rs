//! Browser clients: CORS for the Messages API (`cors.allowed_origins`).
//!
//! `cors_follows_the_setting` checks the headers over plain HTTP: off by default (exactly as
//! before: `OPTIONS` is a 405, no CORS header anywhere), then on for one origin (preflights
//! answered without a key, CORS headers on answers, errors and streams included, nothing for
//! other origins, the browser's `Origin` not passed upstream), then off again.
//!
//! `a_real_browser_streams_from_an_allowed_origin_only` drives headless Chromium (Debian's
//! `chromium` and `chromium-driver`, through Python's `selenium`; `tests/browser_client.py`): a page
//! served by this test on an allowed origin calls relay with `fetch` and reads a streamed answer
//! from the mock upstream into the page; the same page on another origin is refused by the browser.
//! `scripts/test.sh` installs the browser, the driver and Selenium; without them this test fails,
//! it never skips.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use relay_mock_upstream::MockConfig;
use relay_proto::v1 as pb;
use relay_test_support::wait_for;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const PAGE: &str = include_str!("browser_page.html");
const MODEL: &str = "claude-sonnet-4-5";

struct Setup {
    cp: ControlPlane,
    mock: relay_mock_upstream::MockUpstream,
    dp: DataPlane,
    key: String,
    _dir: tempfile::TempDir,
}

async fn setup(mock_config: MockConfig) -> Setup {
    let cp = ControlPlane::start(Backend::Sqlite).await;
    let mock = mock(mock_config).await;
    cp.add_account("acct-1", &mock.base_url(), ACCOUNT_SECRET).await;
    let (_, key) = cp.add_key("browser-app", &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let dp = DataPlane::start(&cp.url(), "dp-1", dir.path().join("dp-1")).await;
    dp.wait_version(cp.head().await).await;
    Setup {
        cp,
        mock,
        dp,
        key,
        _dir: dir,
    }
}

impl Setup {
    /// Sets (or with None unsets) `cors.allowed_origins` and waits until the data plane serves it.
    async fn cors(&self, value: Option<&str>) {
        match value {
            Some(v) => self.cp.set_setting("cors.allowed_origins", v).await,
            None => {
                self.cp
                    .admin()
                    .await
                    .unset_setting(pb::UnsetSettingRequest {
                        name: "cors.allowed_origins".into(),
                    })
                    .await
                    .unwrap();
            }
        }
        self.dp.wait_version(self.cp.head().await).await;
    }
}

fn preflight_headers(origin: &str) -> Vec<(&str, &str)> {
    vec![
        ("origin", origin),
        ("access-control-request-method", "POST"),
        (
            "access-control-request-headers",
            "anthropic-dangerous-direct-browser-access,anthropic-version,content-type,x-api-key,x-request-id",
        ),
    ]
}

fn cors_headers(r: &HttpResponse) -> Vec<String> {
    r.headers
        .keys()
        .map(|k| k.as_str().to_string())
        .filter(|k| k.starts_with("access-control-"))
        .collect()
}

async fn call(s: &Setup, path: &str, key: &str, origin: Option<&str>, body: &Value) -> HttpResponse {
    let mut extra = vec![("anthropic-dangerous-direct-browser-access", "true")];
    if let Some(o) = origin {
        extra.push(("origin", o));
    }
    post(&s.dp, path, key, body, &extra).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cors_follows_the_setting() {
    let s = setup(MockConfig::default()).await;
    let app = "https://app.example";
    let stream = message_body(MODEL, true);

    // Off (the default): exactly as without CORS.
    for path in ["/v1/messages", "/v1/messages/count_tokens", "/v1/models"] {
        let r = send("OPTIONS", &s.dp.url(path), &preflight_headers(app), "").await;
        assert_eq!(r.status, 405, "{path}");
        assert_eq!(r.error_type(), "invalid_request_error");
        assert!(cors_headers(&r).is_empty() && r.header("vary").is_none(), "{path}");
    }
    let r = call(&s, "/v1/messages", &s.key, Some(app), &stream).await;
    assert_eq!(r.status, 200);
    assert!(cors_headers(&r).is_empty() && r.header("vary").is_none());
    let sent = s.mock.requests().pop().unwrap();
    assert_eq!(
        sent.header("origin"),
        None,
        "a client's Origin never reaches the upstream (it could take the account out)"
    );

    // A value that is not an origin is refused, saying which and why.
    let e =
        s.cp.admin()
            .await
            .set_setting(pb::SetSettingRequest {
                name: "cors.allowed_origins".into(),
                value: "https://app.example/".into(),
            })
            .await
            .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("\"https://app.example/\" has a path") && e.message().contains("scheme://host[:port]"),
        "{}",
        e.message()
    );

    // On for one origin.
    s.cors(Some(app)).await;
    for path in [
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/models",
        "/v1/models/claude-x",
    ] {
        // No key, no anthropic-version: a preflight is answered as it is.
        let r = send("OPTIONS", &s.dp.url(path), &preflight_headers(app), "").await;
        assert_eq!(r.status, 204, "{path}: {}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.header("access-control-allow-origin"), Some(app));
        assert_eq!(r.header("access-control-allow-methods"), Some("POST, GET, OPTIONS"));
        let allowed = r.header("access-control-allow-headers").unwrap();
        for h in [
            "anthropic-version",
            "x-api-key",
            "authorization",
            "anthropic-beta",
            "anthropic-dangerous-direct-browser-access",
            "content-type",
            "x-request-id",
        ] {
            assert!(allowed.split(", ").any(|a| a == h), "{h} in {allowed}");
        }
        assert_eq!(r.header("access-control-max-age"), Some("7200"));
        assert!(r.header("vary").unwrap().contains("Origin"));
        assert!(r.header("access-control-allow-credentials").is_none());
        assert!(
            r.header("access-control-expose-headers").is_none(),
            "for answers, not preflights"
        );
        assert!(r.body.is_empty());

        // Another origin: 403 in the Anthropic error shape, no CORS header.
        let r = send(
            "OPTIONS",
            &s.dp.url(path),
            &preflight_headers("https://evil.example"),
            "",
        )
        .await;
        assert_eq!(r.status, 403, "{path}");
        assert_eq!(r.error_type(), "permission_error");
        assert!(r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("https://evil.example"));
        assert!(cors_headers(&r).is_empty(), "{:?}", cors_headers(&r));
    }
    // Not a browser preflight (no Origin), and paths CORS does not cover: as before.
    let r = send("OPTIONS", &s.dp.url("/v1/messages"), &[], "").await;
    assert_eq!(r.status, 405);
    let r = send("OPTIONS", &s.dp.url("/relay/v1/key"), &preflight_headers(app), "").await;
    assert_eq!(r.status, 405);
    assert!(cors_headers(&r).is_empty());

    let exposes = |r: &HttpResponse| {
        let e = r
            .header("access-control-expose-headers")
            .unwrap_or_default()
            .to_string();
        e.split(", ").any(|h| h == "request-id") && e.split(", ").any(|h| h == "retry-after")
    };
    // Answers to the allowed origin: a stream, JSON, count_tokens, the models list, relay's errors.
    s.mock.clear_requests();
    let r = call(&s, "/v1/messages", &s.key, Some(app), &stream).await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/event-stream"));
    assert!(String::from_utf8_lossy(&r.body).contains("event: message_stop"));
    assert_eq!(r.header("access-control-allow-origin"), Some(app));
    assert!(exposes(&r), "{:?}", r.header("access-control-expose-headers"));
    assert_eq!(r.header("vary"), Some("Origin"));
    let r = call(&s, "/v1/messages", &s.key, Some(app), &message_body(MODEL, false)).await;
    assert_eq!((r.status, r.header("access-control-allow-origin")), (200, Some(app)));
    let count = json!({"model": MODEL, "messages": stream["messages"]});
    let r = call(&s, "/v1/messages/count_tokens", &s.key, Some(app), &count).await;
    assert_eq!((r.status, r.header("access-control-allow-origin")), (200, Some(app)));
    let mut h: Vec<(&str, String)> = sdk_headers(&s.key);
    h.push(("origin", app.into()));
    let hs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let r = send("GET", &s.dp.url("/v1/models"), &hs, "").await;
    assert_eq!((r.status, r.header("access-control-allow-origin")), (200, Some(app)));
    let r = call(&s, "/v1/messages", "rk-wrong", Some(app), &stream).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.error_type(), "authentication_error");
    assert_eq!(r.header("access-control-allow-origin"), Some(app));
    assert!(exposes(&r));
    let r = call(&s, "/v1/messages", &s.key, Some(app), &json!({"model": MODEL})).await;
    assert_eq!(r.status, 400, "relay's own error: {}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("access-control-allow-origin"), Some(app));
    // The browser's Origin stayed on relay's side; the rest of its headers went on.
    let sent = s.mock.requests();
    assert!(sent.len() >= 3);
    for q in &sent {
        assert_eq!(q.header("origin"), None, "{}", q.path());
        assert_eq!(q.header("anthropic-dangerous-direct-browser-access"), Some("true"));
    }

    // Another origin, and no origin: served, Vary only.
    let r = call(&s, "/v1/messages", &s.key, Some("https://evil.example"), &stream).await;
    assert_eq!(r.status, 200);
    assert!(cors_headers(&r).is_empty());
    assert_eq!(r.header("vary"), Some("Origin"));
    let r = call(&s, "/v1/messages", &s.key, None, &stream).await;
    assert_eq!(r.status, 200);
    assert!(cors_headers(&r).is_empty());

    // `*`: every origin, echoed.
    s.cors(Some("*")).await;
    let other = "http://localhost:5173";
    let r = send("OPTIONS", &s.dp.url("/v1/messages"), &preflight_headers(other), "").await;
    assert_eq!((r.status, r.header("access-control-allow-origin")), (204, Some(other)));

    // Off again: exactly as before.
    s.cors(None).await;
    let r = send("OPTIONS", &s.dp.url("/v1/messages"), &preflight_headers(app), "").await;
    assert_eq!(r.status, 405);
    s.mock.clear_requests();
    let r = call(&s, "/v1/messages", &s.key, Some(app), &stream).await;
    assert!(cors_headers(&r).is_empty() && r.header("vary").is_none());
    // Even with CORS off, a client's Origin never reaches the upstream.
    let sent = s.mock.requests();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].header("origin"), None);
}

// ---------------------------------------------------------------------------
// The browser

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("browser_client.py")
}

/// Fails (never skips) when the browser, its driver or Selenium is missing.
fn require_browser() {
    let missing: Vec<&str> = [("chromium", "chromium"), ("chromedriver", "chromium-driver")]
        .into_iter()
        .filter(|(bin, _)| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {bin}")])
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(|(_, pkg)| pkg)
        .collect();
    assert!(
        missing.is_empty(),
        "Debian packages {missing:?} are not installed: run scripts/test.sh, which installs them \
         (or: apt-get install chromium chromium-driver)"
    );
    let out = Command::new("python3").args(["-c", "import selenium"]).output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "Python's selenium is not installed ({}): run scripts/test.sh, which installs it \
             (or: python3 -m pip install selenium)",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!("cannot run python3 ({e}): run scripts/test.sh"),
    }
}

/// Serves the test page at `/` on a port of its own (one origin); returns the port.
async fn serve_page() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    let (status, body) = match req.uri().path() {
                        "/" => (200, PAGE),
                        _ => (404, ""),
                    };
                    let resp = http::Response::builder()
                        .status(status)
                        .header("content-type", "text/html; charset=utf-8")
                        .body(http_body_util::Full::new(bytes::Bytes::from_static(body.as_bytes())))
                        .unwrap();
                    Ok::<_, std::convert::Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (port, task)
}

/// The text of every `text_delta` in an SSE body, in order.
fn streamed_text(sse: &[u8]) -> String {
    String::from_utf8_lossy(sse)
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
        .filter(|v| v["type"] == "content_block_delta" && v["delta"]["type"] == "text_delta")
        .map(|v| v["delta"]["text"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_real_browser_streams_from_an_allowed_origin_only() {
    require_browser();
    // Spaced events: the page reads the answer as it streams, in several chunks.
    let s = setup(MockConfig {
        event_delay: Duration::from_millis(15),
        ..Default::default()
    })
    .await;
    let (allowed_port, _allowed) = serve_page().await;
    let (denied_port, _denied) = serve_page().await;
    let allowed = format!("http://127.0.0.1:{allowed_port}");
    let denied = format!("http://127.0.0.1:{denied_port}");
    s.cors(Some(&allowed)).await;

    let config = json!({
        "relay": s.dp.url(""),
        "key": s.key,
        "allowed_page": format!("{allowed}/"),
        "denied_page": format!("{denied}/"),
        "client_request_id": "browser-abc-123",
    });
    let mut cmd = Command::new("python3");
    cmd.arg(script())
        .arg(config.to_string())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1");
    let out = tokio::time::timeout(
        Duration::from_secs(180),
        tokio::task::spawn_blocking(move || cmd.output()),
    )
    .await
    .expect("the browser script finished within 3 minutes")
    .unwrap()
    .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the browser script failed ({}):\n{stderr}\nstdout: {stdout}",
        out.status
    );
    let report: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("the browser script printed no JSON ({e}): {stdout}\n{stderr}"));
    eprintln!("browser: Chromium {}", report["browser_version"]);

    // The allowed origin: a streamed answer, read in the page as it came.
    let ok = &report["streamed"];
    assert_eq!(ok["origin"], allowed.as_str());
    assert_eq!(ok["status"], 200, "{ok}");
    assert!(ok["error"].is_null(), "{ok}");
    assert!(ok["content_type"].as_str().unwrap().starts_with("text/event-stream"));
    assert!(ok["request_id"].as_str().unwrap().starts_with("req_relay_"), "{ok}");
    let events: Vec<&str> = ok["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert_eq!(events.first(), Some(&"message_start"), "{events:?}");
    assert_eq!(events.last(), Some(&"message_stop"), "{events:?}");
    assert!(
        ok["chunks"].as_u64().unwrap() > 1,
        "the page read the stream as it came: {ok}"
    );
    // What the page shows is exactly the text the upstream streamed for this request.
    let upstream_id = ok["upstream_request_id"]
        .as_str()
        .expect("x-upstream-request-id is exposed to the page");
    let sent = s
        .mock
        .sent_body(upstream_id)
        .expect("the mock served the page's request");
    let expected = streamed_text(&sent);
    assert!(!expected.is_empty());
    assert_eq!(ok["page_text"], expected.as_str());
    let upstream = s.mock.requests();
    assert_eq!(
        upstream.len(),
        1,
        "only the allowed origin's call with a valid key reached the upstream"
    );
    assert_eq!(upstream[0].header("origin"), None);
    assert_eq!(upstream[0].header("x-request-id"), Some("browser-abc-123"));

    // The allowed origin with a wrong key: relay's 401 is readable by the page.
    let bad = &report["bad_key"];
    assert_eq!(bad["status"], 401, "{bad}");
    let body: Value = serde_json::from_str(bad["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["error"]["type"], "authentication_error");

    // Another origin: the browser refuses (the preflight got a 403 and no CORS headers), nothing
    // reaches the upstream, the page shows nothing.
    let no = &report["denied"];
    assert_eq!(no["origin"], denied.as_str());
    assert!(no["status"].is_null(), "{no}");
    assert!(no["error"].as_str().unwrap().contains("Failed to fetch"), "{no}");
    assert_eq!(no["page_text"], "");
    assert_eq!(s.mock.requests().len(), 1);

    // The page's x-request-id is in the usage record, beside relay's id.
    let path = s.cp.sqlite_path().unwrap();
    let id = upstream_id.to_string();
    let stored = wait_for(Duration::from_secs(10), "the browser's usage row", || {
        let path = path.clone();
        let id = id.clone();
        async move {
            let conn = rusqlite::Connection::open(path).ok()?;
            conn.query_row(
                "SELECT request_id, client_request_id FROM usage_events WHERE upstream_request_id = ?1",
                [&id],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
            )
            .ok()
        }
    })
    .await
    .unwrap();
    assert_eq!(stored.0, ok["request_id"].as_str().unwrap());
    assert_eq!(stored.1, "browser-abc-123");
}
