//! Test fakes for the stages' unit tests: a config with one key and the accounts asked for, a
//! whole [`Proxy`] in process (spool in a temp dir, no control plane, limits counted in
//! process), a scripted upstream on a local socket, and a body whose frames a test hands out.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::admission::ClientRequest;
use super::{balance, groups, held, reqlog, sticky, usage, Proxy};
use crate::control::state::{ConfigHolder, ServingConfig};
use bytes::Bytes;
use http_body::Frame;
use relay_proto::v1 as pb;
use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The key every test config holds.
pub const KEY: &str = "rk-test-key";
const SECRET: [u8; 32] = [7; 32];

/// An account in a test config: id, priority tier, max concurrency (0: none), base URL.
pub struct Acct<'a> {
    pub id: &'a str,
    pub priority: i32,
    pub max_concurrency: u32,
    pub base_url: String,
}

impl<'a> Acct<'a> {
    pub fn new(id: &'a str) -> Self {
        Acct {
            id,
            priority: 0,
            max_concurrency: 0,
            base_url: "https://api.anthropic.com".into(),
        }
    }
    pub fn priority(mut self, p: i32) -> Self {
        self.priority = p;
        self
    }
    pub fn max_concurrency(mut self, n: u32) -> Self {
        self.max_concurrency = n;
        self
    }
    pub fn at(mut self, base_url: &str) -> Self {
        self.base_url = base_url.into();
        self
    }
}

fn key_hash(presented: &str) -> String {
    relay_proto::keyed_hash(&SECRET, presented)
}

/// A config version `n`: group `g` with these accounts, the key [`KEY`] in it (active unless
/// `key_status` says otherwise), and these settings.
pub fn config(n: u64, accounts: &[Acct<'_>], key_status: pb::KeyStatus, settings: &[(&str, &str)]) -> ServingConfig {
    let values: BTreeMap<String, String> = settings.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let mut r = pb::Resources {
        groups: vec![pb::Group {
            id: "g".into(),
            name: "g".into(),
            state: pb::GroupState::Active as i32,
            ..Default::default()
        }],
        accounts: accounts
            .iter()
            .map(|a| pb::Account {
                id: a.id.into(),
                name: a.id.into(),
                kind: pb::AccountKind::AnthropicApiKey as i32,
                base_url: a.base_url.clone(),
                credential: "sk-ant-test".into(),
                weight: 1,
                priority: a.priority,
                max_concurrency: a.max_concurrency,
                group_ids: vec!["g".into()],
                status: pb::AccountStatus::Enabled as i32,
                ..Default::default()
            })
            .collect(),
        api_keys: vec![pb::ApiKey {
            id: "k".into(),
            name: "k".into(),
            key_hash: key_hash(KEY),
            group_id: "g".into(),
            status: key_status as i32,
            ..Default::default()
        }],
        settings: Some(pb::Settings {
            api_key_hash_secret: SECRET.to_vec(),
            values,
        }),
        ..Default::default()
    };
    relay_proto::canonicalize(&mut r);
    ServingConfig::build(pb::ConfigVersion::new(1, n), r).unwrap()
}

/// A proxy serving `cfg`, its spool in `dir`.
pub fn proxy(cfg: ServingConfig, dir: &std::path::Path) -> Arc<Proxy> {
    let holder = Arc::new(ConfigHolder::default());
    holder.swap(cfg);
    let limiter = relay_limits::Limiter::new(relay_limits::LimiterOptions {
        redis_url: None,
        redis_password: None,
        node_id: "dp-test".into(),
    })
    .unwrap();
    Arc::new(Proxy {
        holder,
        upstreams: Arc::new(crate::upstream::client::Upstreams::new(&Default::default()).unwrap()),
        spool: Arc::new(crate::control::spool::Spool::open(dir).unwrap()),
        pending: Arc::new(usage::Pending::default()),
        node_id: Arc::from("dp-test"),
        balancer: Arc::new(balance::Balancer::new()),
        health: Arc::new(super::health::HealthRegistry::new("dp-test")),
        reporter: crate::control::state_report::StateReporter::disabled(),
        sessions: Arc::new(sticky::MemorySessions::default()),
        queued: std::sync::atomic::AtomicUsize::new(0),
        metrics: None,
        accepting: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        body_read_timeout: std::time::Duration::from_secs(10),
        held_bodies: held::HeldBodies::new(usize::MAX),
        freshness: Arc::new(crate::control::freshness::Freshness::load(None, 0)),
        max_config_staleness: None,
        ops_separate: false,
        limiter,
        spend: Arc::new(crate::control::spend::SpendBook::default()),
        groups: Arc::new(groups::GroupCooling::default()),
        captures: super::capture::Captures::disabled(),
    })
}

/// An admitted Messages request for `model` (streaming or not) under the proxy's config.
pub fn request(p: &Proxy, stream: bool) -> ClientRequest {
    let cfg = p.holder.get().unwrap();
    let key = cfg.key_for(KEY).unwrap().clone();
    let body = Bytes::from(format!(
        r#"{{"model":"claude-sonnet-4-5","max_tokens":16,"stream":{stream},"messages":[{{"role":"user","content":"hi"}}]}}"#
    ));
    let (parts, ()) = http::Request::builder()
        .method("POST")
        .uri("/v1/messages")
        .header("x-api-key", KEY)
        .header("anthropic-version", "2023-06-01")
        .body(())
        .unwrap()
        .into_parts();
    ClientRequest {
        cfg,
        key,
        parts,
        body,
        model: "claude-sonnet-4-5".into(),
        stream,
        max_tokens: 16,
        is_messages: true,
    }
}

/// A request log line for a test request.
pub fn log() -> Arc<reqlog::RequestLog> {
    reqlog::RequestLog::new("req_test", None, None, "messages", Instant::now())
}

/// An upstream on a local socket answering every request with the next of `answers` (raw
/// HTTP/1.1 responses, the connection closed after each); the last one repeats. Returns its
/// base URL.
pub async fn upstream(answers: Vec<String>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut answers: VecDeque<String> = answers.into();
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let answer = if answers.len() > 1 {
                answers.pop_front().unwrap()
            } else {
                answers.front().cloned().unwrap_or_default()
            };
            tokio::spawn(async move {
                // The request: its head, then content-length bytes.
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = sock.read(&mut chunk).await else { return };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text[..end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                let _ = sock.write_all(answer.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    format!("http://{addr}")
}

/// A raw HTTP/1.1 response: status, content type, body (the connection closes after it).
pub fn answer(status: u16, content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// A complete event stream of one short message.
pub const STREAM_OK: &str = concat!(
    "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5\",\"content\":[],\"stop_reason\":null,\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\n\n",
    "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"hi\"}}\n\n",
    "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
    "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":2}}\n\n",
    "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
);

/// A body a test scripts: each step is a data frame or a `Pending` (the next poll is pending;
/// the body wakes itself so the step after it comes on the next poll).
pub struct ScriptedBody {
    steps: VecDeque<Step>,
    /// A failed body has not ended (as a connection that broke).
    failed: bool,
}

pub enum Step {
    Data(&'static str),
    Pending,
    /// Pending for good (a stalled upstream): only a timeout ends the wait.
    Stall,
    Fail,
}

impl ScriptedBody {
    pub fn new(steps: Vec<Step>) -> Self {
        ScriptedBody {
            steps: steps.into(),
            failed: false,
        }
    }
}

impl http_body::Body for ScriptedBody {
    type Data = Bytes;
    type Error = crate::errors::BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.steps.pop_front() {
            Some(Step::Data(d)) => Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(d.as_bytes()))))),
            Some(Step::Pending) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Some(Step::Stall) => {
                self.steps.push_front(Step::Stall);
                Poll::Pending
            }
            Some(Step::Fail) => {
                self.failed = true;
                Poll::Ready(Some(Err("connection reset".into())))
            }
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.steps.is_empty() && !self.failed
    }
}

/// The retry deadline of a request admitted now.
pub fn deadline(req: &ClientRequest) -> tokio::time::Instant {
    tokio::time::Instant::now() + req.cfg.policy.retry_deadline
}
