//! A hostile upstream: raw TCP, answering every request with a scripted sequence of bytes, pauses and
//! closes, so tests can produce what no well-behaved HTTP server library would send (a captive portal's HTML,
//! a 302 to another host, `Content-Length` together with `Transfer-Encoding: chunked`, a stream cut inside an
//! event, a 100 KB header, a gzipped body nobody asked for, an error body that drips a byte a second).
//!
//! Every response the helpers build carries `connection: close` and the server closes the connection after
//! each script, so a client never reuses a connection the script left in an unknown state. The Anthropic
//! shapes ([`message_json`], [`sse_events`]) carry the usage given, so a test can check relay's accounting
//! against exactly what the client received.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// One step of a script.
#[derive(Debug, Clone)]
pub enum Step {
    /// Write these bytes (and flush).
    Write(Vec<u8>),
    /// Wait this long.
    Sleep(Duration),
    /// Write these bytes one at a time, `Duration` apart.
    Drip(Vec<u8>, Duration),
    /// Keep the connection open and silent until the client goes away or the server is dropped.
    Hold,
}

/// What the hostile upstream answers to every request.
#[derive(Debug, Clone, Default)]
pub struct Script(pub Vec<Step>);

impl Script {
    /// A script that writes `bytes` and closes.
    pub fn raw(bytes: impl Into<Vec<u8>>) -> Self {
        Script(vec![Step::Write(bytes.into())])
    }
    /// Appends a step.
    pub fn then(mut self, step: Step) -> Self {
        self.0.push(step);
        self
    }
}

/// The usage a scripted answer reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScriptUsage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// A non-streaming Messages answer with this usage.
pub fn message_json(u: ScriptUsage) -> String {
    serde_json::json!({
        "id": "msg_hostile",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": "hello from a hostile upstream"}],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": {"input_tokens": u.input_tokens, "output_tokens": u.output_tokens},
    })
    .to_string()
}

/// The events of a complete streamed answer with this usage, each a whole `event:`/`data:` block ending in
/// a blank line: `message_start`, `content_block_start`, two `content_block_delta`s, `content_block_stop`,
/// `message_delta`, `message_stop`.
pub fn sse_events(u: ScriptUsage) -> Vec<String> {
    let ev = |name: &str, data: serde_json::Value| format!("event: {name}\ndata: {data}\n\n");
    vec![
        ev(
            "message_start",
            serde_json::json!({"type": "message_start", "message": {
                "id": "msg_hostile", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": u.input_tokens, "output_tokens": 1}}}),
        ),
        ev(
            "content_block_start",
            serde_json::json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        ev(
            "content_block_delta",
            serde_json::json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hello "}}),
        ),
        ev(
            "content_block_delta",
            serde_json::json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "world"}}),
        ),
        ev(
            "content_block_stop",
            serde_json::json!({"type": "content_block_stop", "index": 0}),
        ),
        ev(
            "message_delta",
            serde_json::json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                "usage": {"output_tokens": u.output_tokens}}),
        ),
        ev("message_stop", serde_json::json!({"type": "message_stop"})),
    ]
}

/// A response head: status line (any code, any reason), the given headers, `connection: close`.
pub fn head(status: u16, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status} X\r\n").into_bytes();
    for (n, v) in headers {
        let _ = write!(out, "{n}: {v}\r\n");
    }
    out.extend_from_slice(b"connection: close\r\n\r\n");
    out
}

/// A whole response with a `content-length` body.
pub fn response(status: u16, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let len = body.len().to_string();
    let mut h: Vec<(&str, &str)> = headers.to_vec();
    h.push(("content-length", &len));
    let mut out = head(status, &h);
    out.extend_from_slice(body);
    out
}

/// One chunk of a chunked body.
pub fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

/// The end of a chunked body.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// A 200 SSE head, chunked.
pub fn sse_head() -> Vec<u8> {
    head(
        200,
        &[("content-type", "text/event-stream"), ("transfer-encoding", "chunked")],
    )
}

/// A streamed answer: the head, then each of `events` as one chunk, then the end of the body.
pub fn sse_response(events: &[String]) -> Vec<u8> {
    let mut out = sse_head();
    for e in events {
        out.extend(chunk(e.as_bytes()));
    }
    out.extend_from_slice(LAST_CHUNK);
    out
}

/// `data` gzip-compressed.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let _ = enc.write_all(data);
    enc.finish().unwrap_or_default()
}

/// A running hostile upstream. Serves until dropped.
pub struct HostileUpstream {
    addr: SocketAddr,
    script: Arc<Mutex<Script>>,
    requests: Arc<Mutex<Vec<Vec<u8>>>>,
    open: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl HostileUpstream {
    /// Listens on an ephemeral loopback port and answers every request with `script`.
    pub async fn start(script: Script) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let script = Arc::new(Mutex::new(script));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let open = Arc::new(AtomicUsize::new(0));
        let task = {
            let (script, requests, open) = (script.clone(), requests.clone(), open.clone());
            tokio::spawn(async move {
                while let Ok((socket, _)) = listener.accept().await {
                    let (script, requests, open) = (script.clone(), requests.clone(), open.clone());
                    tokio::spawn(async move {
                        open.fetch_add(1, Ordering::AcqRel);
                        serve(socket, script, requests).await;
                        open.fetch_sub(1, Ordering::AcqRel);
                    });
                }
            })
        };
        Ok(Self {
            addr,
            script,
            requests,
            open,
            task,
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the script for the next requests.
    pub fn set_script(&self, script: Script) {
        if let Ok(mut s) = self.script.lock() {
            *s = script;
        }
    }

    /// How many requests arrived (each one's head and body, as bytes).
    pub fn request_count(&self) -> usize {
        self.requests.lock().map(|r| r.len()).unwrap_or(0)
    }

    /// The raw bytes of every request received.
    pub fn requests(&self) -> Vec<Vec<u8>> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Connections being served right now (a held connection counts until the client closes it).
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

impl Drop for HostileUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request (head, and a `content-length` body), runs the script, closes.
async fn serve(mut socket: TcpStream, script: Arc<Mutex<Script>>, requests: Arc<Mutex<Vec<Vec<u8>>>>) {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        match socket.read(&mut tmp).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        match socket.read(&mut tmp).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
    if let Ok(mut r) = requests.lock() {
        r.push(buf);
    }
    let steps = script.lock().map(|s| s.0.clone()).unwrap_or_default();
    for step in steps {
        match step {
            Step::Write(bytes) => {
                if socket.write_all(&bytes).await.is_err() || socket.flush().await.is_err() {
                    return;
                }
            }
            Step::Sleep(d) => tokio::time::sleep(d).await,
            Step::Drip(bytes, every) => {
                for b in bytes {
                    if socket.write_all(&[b]).await.is_err() || socket.flush().await.is_err() {
                        return;
                    }
                    tokio::time::sleep(every).await;
                }
            }
            Step::Hold => {
                // Until the peer closes (a read of 0 or an error).
                while let Ok(n) = socket.read(&mut tmp).await {
                    if n == 0 {
                        break;
                    }
                }
                return;
            }
        }
    }
    let _ = socket.shutdown().await;
}
