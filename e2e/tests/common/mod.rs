//! A whole relay in one test process: a control plane (SQLite or Postgres) on
//! a free port, data planes started on demand, the mock upstream, and an
//! HTTP client speaking to the data planes like an SDK would.
#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use relay_data_plane::RunningDataPlane;
use relay_mock_upstream::{MockConfig, MockTls, MockUpstream};
use relay_proto::v1 as pb;
use relay_test_support::wait_for;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub const ACCOUNT_SECRET: &str = "sk-ant-api03-e2e-ACCOUNT-SECRET-0123456789";

/// The in-process control plane, shared with the control plane's own tests: it can be stopped
/// and started again on the same port and store.
pub use relay_test_support::control_plane::{Backend, ControlPlane, ADMIN_TOKEN, DP_TOKEN};

pub struct DataPlane {
    pub dp: Option<RunningDataPlane>,
    pub dir: PathBuf,
    pub addr: SocketAddr,
}

impl DataPlane {
    pub async fn start(control_plane: &str, node: &str, dir: PathBuf) -> Self {
        Self::start_with(control_plane, node, dir, |_| {}).await
    }

    /// Like `start`, with `tweak` applied to the options first.
    pub async fn start_with(
        control_plane: &str,
        node: &str,
        dir: PathBuf,
        tweak: impl FnOnce(&mut relay_data_plane::Options),
    ) -> Self {
        let mut opts = relay_data_plane::Options::new(
            control_plane,
            DP_TOKEN,
            "127.0.0.1:0".parse().unwrap(),
            node,
            dir.clone(),
        );
        tweak(&mut opts);
        // A recorder of its own (not installed: tests share the process): /metrics answers as in
        // the binary, which always has one.
        let metrics = relay_runtime::metrics::builder().build_recorder().handle();
        let dp = relay_data_plane::start(opts, Some(metrics)).await.unwrap();
        let addr = dp.local_addr();
        Self {
            dp: Some(dp),
            dir,
            addr,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn version(&self) -> Option<pb::ConfigVersion> {
        self.dp.as_ref().and_then(|d| d.config_version())
    }

    /// Waits until the data plane serves `v` or newer.
    pub async fn wait_version(&self, v: pb::ConfigVersion) {
        wait_for(Duration::from_secs(10), "data plane to apply the config", || {
            let have = self.version();
            async move {
                have.filter(|h| h.epoch == v.epoch && h.revision >= v.revision)
                    .map(|_| ())
            }
        })
        .await
        .unwrap();
    }

    pub async fn shutdown(&mut self) {
        if let Some(dp) = self.dp.take() {
            dp.shutdown().await;
        }
    }
}

pub async fn mock(config: MockConfig) -> MockUpstream {
    MockUpstream::start(config).await.unwrap()
}

pub struct HttpResponse {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl HttpResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// Asserts the Anthropic error shape and returns error.type.
    pub fn error_type(&self) -> String {
        let j = self.json();
        assert_eq!(j["type"], "error", "{j}");
        assert!(j["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{j}");
        assert!(self.headers.contains_key("request-id"));
        j["error"]["type"].as_str().unwrap().to_string()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

pub fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends a request the way an SDK does and reads the whole answer.
pub async fn send(method: &str, url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> HttpResponse {
    let mut req = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = http_client()
        .request(req.body(Full::new(body.into())).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    HttpResponse {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

/// Like [`send`], but None when the connection fails (a server not up yet).
pub async fn try_send(method: &str, url: &str) -> Option<HttpResponse> {
    let req = http::Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(Bytes::new()))
        .ok()?;
    let resp = http_client().request(req).await.ok()?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.ok()?.to_bytes();
    Some(HttpResponse {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    })
}

/// The headers every SDK call carries.
pub fn sdk_headers(key: &str) -> Vec<(&'static str, String)> {
    vec![
        ("x-api-key", key.to_string()),
        ("anthropic-version", "2023-06-01".to_string()),
        ("content-type", "application/json".to_string()),
    ]
}

pub async fn post_messages(dp: &DataPlane, key: &str, body: &serde_json::Value) -> HttpResponse {
    post(dp, "/v1/messages", key, body, &[]).await
}

pub async fn post(
    dp: &DataPlane,
    path: &str,
    key: &str,
    body: &serde_json::Value,
    extra: &[(&str, &str)],
) -> HttpResponse {
    let h = sdk_headers(key);
    let mut headers: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    headers.extend_from_slice(extra);
    send("POST", &dp.url(path), &headers, body.to_string()).await
}

pub fn message_body(model: &str, stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": model,
        "max_tokens": 256,
        "stream": stream,
        "messages": [{"role": "user", "content": "Say hello to relay."}],
    })
}

/// A CA and a leaf for `localhost` / `127.0.0.1` signed by it: (the CA certificate PEM, the mock's TLS).
pub fn test_pki() -> (String, MockTls) {
    let ca = TestCa::new("relay e2e test CA");
    let (cert_chain_pem, key_pem) = ca.issue(&["localhost", "127.0.0.1"], false);
    (
        ca.pem.clone(),
        MockTls {
            cert_chain_pem,
            key_pem,
        },
    )
}

/// A test CA that issues server and client certificates (rcgen; nothing on disk but what a test writes).
pub struct TestCa {
    pub pem: String,
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let issuer = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
        Self {
            pem: issuer.pem(),
            issuer,
        }
    }

    /// (certificate PEM, key PEM) for `names`, for a server or a client.
    pub fn issue(&self, names: &[&str], client: bool) -> (String, String) {
        self.issue_with(
            names,
            vec![if client {
                rcgen::ExtendedKeyUsagePurpose::ClientAuth
            } else {
                rcgen::ExtendedKeyUsagePurpose::ServerAuth
            }],
        )
    }

    /// (certificate PEM, key PEM) for `names` with these extended key usages.
    pub fn issue_with(&self, names: &[&str], usages: Vec<rcgen::ExtendedKeyUsagePurpose>) -> (String, String) {
        self.issue_cn(names, Some(names[0]), usages)
    }

    /// (certificate PEM, key PEM) for `names`, with `cn` as the Common Name or none at all.
    pub fn issue_cn(
        &self,
        names: &[&str],
        cn: Option<&str>,
        usages: Vec<rcgen::ExtendedKeyUsagePurpose>,
    ) -> (String, String) {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        }
        params.extended_key_usages = usages;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Runs the relayctl binary against `server` with an admin token; fails the test when it fails.
pub fn relayctl(server: &str, token: &str, args: &[&str], stdin: Option<&str>) -> String {
    relayctl_with(server, token, &[], args, stdin)
}

/// [`relayctl`] with more environment (`RELAY_CA_FILE`, ...).
pub fn relayctl_with(
    server: &str,
    token: &str,
    env: &[(&str, &std::ffi::OsStr)],
    args: &[&str],
    stdin: Option<&str>,
) -> String {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(relay_test_support::workspace_bin("relayctl"))
        .args(args)
        .env("RELAY_SERVER", server)
        .env("RELAY_ADMIN_TOKEN", token)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "relayctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A standalone relay process (control plane + in-process data plane) on `data`.
pub struct Standalone {
    pub proc: relay_test_support::Proc,
    pub grpc: u16,
    pub proxy: u16,
}

impl Standalone {
    /// Spawns it; does not wait for it to serve.
    pub fn spawn(data: &std::path::Path, log: &std::path::Path, extra: &[&str]) -> Self {
        Self::spawn_under(&[], data, log, extra)
    }

    /// Like [`Self::spawn`], run through `wrapper` (e.g. `prlimit --nofile=N --`).
    pub fn spawn_under(wrapper: &[&str], data: &std::path::Path, log: &std::path::Path, extra: &[&str]) -> Self {
        let (grpc, proxy) = (relay_test_support::free_port(), relay_test_support::free_port());
        let bin = relay_test_support::workspace_bin("relay-control-plane");
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = std::process::Command::new(first);
                c.args(rest).arg(&bin);
                c
            }
            None => std::process::Command::new(&bin),
        };
        cmd.args(["--standalone", "--listen", &format!("127.0.0.1:{grpc}")])
            .args(["--proxy-listen", &format!("127.0.0.1:{proxy}")])
            // Its own console port: tests run standalone processes side by side.
            .args([
                "--web-listen",
                &format!("127.0.0.1:{}", relay_test_support::free_port()),
            ])
            .args(extra)
            .arg("--data-dir")
            .arg(data)
            .env_remove("RELAY_ADMIN_TOKEN")
            .env_remove("RELAY_MASTER_KEY");
        let proc = relay_test_support::Proc::spawn(cmd, log).unwrap();
        Self { proc, grpc, proxy }
    }

    /// Waits until it serves the Anthropic API; returns its log so far.
    pub async fn ready(&mut self) -> String {
        wait_for(Duration::from_secs(30), "relay to serve the Anthropic API", || {
            let text = self.proc.log_text();
            let exited = self.proc.try_wait();
            async move {
                if let Some(s) = exited {
                    panic!("relay exited with {s}: {text}");
                }
                text.contains("serving the Anthropic API").then_some(text)
            }
        })
        .await
        .unwrap()
    }

    pub fn server(&self) -> String {
        format!("127.0.0.1:{}", self.grpc)
    }
}
