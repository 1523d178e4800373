//! Capture (opt-in bodies): a request that a capture rule selects is recorded in full, the
//! request as the client sent it and the response as the client received it (every chunk with
//! its offset in ms from the request's arrival), with secret headers masked. No rule: nothing is
//! looked at beyond the rule list being empty.
//!
//! It never slows or endangers serving: bytes are copied (at most the rule's `max_bytes` of each
//! body, the rest cut and the capture marked `truncated`) into a buffer that counts against a
//! global bound on captures in flight ([`MAX_IN_FLIGHT`]) and on buffered bytes
//! ([`MAX_BUFFERED_BYTES`]); when either is full the capture is dropped and counted
//! (`relay_capture_dropped_total{reason}`), never waited for. The selectors known at admission
//! (key, group, model) and the sample draw (once per request) decide whether recording starts;
//! an errors-only or account rule decides when the answer ends. The finished document is
//! compressed (zstd) off the request path and shipped by one task over
//! `UsageIngest.StoreCaptures`: a bounded, best-effort channel beside the durable usage spool
//! (a capture is up to megabytes; the spool holds every event in memory until it is ACKed and
//! batches of them in one message, so captures there would put the usage it must never lose
//! behind bodies it may drop). A capture that cannot be shipped after a few tries is dropped
//! and counted.

use super::admission::ClientRequest;
use super::redact::{self, mask, redact};
use super::reqlog::RequestLog;
use crate::control::state::model_matches;
use crate::control::watch::ControlPlaneLink;
use crate::errors::{ApiError, Body, BoxError};
use base64::Engine as _;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame};
use http_body_util::BodyExt;
use relay_proto::v1 as pb;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// Captures recorded or waiting to ship at once on this data plane; more are dropped.
pub const MAX_IN_FLIGHT: usize = 256;
/// Bytes all captures in flight may hold; a capture that would pass it is dropped.
pub const MAX_BUFFERED_BYTES: usize = 64 << 20;
/// Chunks of one response recorded; later chunks count as cut (the bytes bound applies too).
const MAX_CHUNKS: usize = 65_536;
/// How many times a capture is offered to the control plane before it is dropped.
const SHIP_TRIES: u32 = 3;
const ZSTD_LEVEL: i32 = 3;
/// Header names whose values are secrets (masked), beyond those containing a word of
/// [`SECRET_WORDS`].
const SECRET_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "cookie",
    "set-cookie",
    "anthropic-admin-key",
];
const SECRET_WORDS: &[&str] = &[
    "key",
    "token",
    "secret",
    "auth",
    "cookie",
    "password",
    "credential",
    "session",
];

/// The capture machinery of one data plane: the in-flight bounds and the shipping queue.
pub struct Captures {
    permits: Arc<Semaphore>,
    buffered: Arc<AtomicUsize>,
    tx: mpsc::Sender<Finished>,
}

impl Captures {
    /// Starts the shipping task (it ends when the last `Captures` is dropped).
    pub fn start(link: ControlPlaneLink, node_id: Arc<str>) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(MAX_IN_FLIGHT);
        tokio::spawn(ship(link, node_id, rx));
        Arc::new(Self::with(tx))
    }

    /// Captures that go nowhere (tests without a control plane).
    pub fn disabled() -> Arc<Self> {
        let (tx, _rx) = mpsc::channel(1);
        Arc::new(Self::with(tx))
    }

    fn with(tx: mpsc::Sender<Finished>) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            buffered: Arc::new(AtomicUsize::new(0)),
            tx,
        }
    }

    /// Starts recording `req` when a rule selects it: its key, group and model match and it
    /// wins the sample draw (one draw per request). `None` (nothing recorded) otherwise, or
    /// when the in-flight bounds are full (counted).
    pub fn begin(&self, req: &ClientRequest, request_id: &str, started: Instant) -> Option<Recording> {
        let rules = &req.cfg.resources.capture_rules;
        if rules.is_empty() {
            return None;
        }
        let draw: f64 = rand::random();
        let candidates: Vec<Candidate> = rules
            .iter()
            .filter(|r| r.key_id.is_empty() || r.key_id == req.key.id)
            .filter(|r| r.group_id.is_empty() || r.group_id == req.key.group_id)
            .filter(|r| r.model.is_empty() || model_matches(&r.model, &req.model))
            .filter(|r| draw < r.sample_rate)
            .map(|r| Candidate {
                rule_id: r.id.clone(),
                account: (!r.account_id.is_empty()).then(|| {
                    // The request log knows accounts by name.
                    req.cfg
                        .resources
                        .accounts
                        .iter()
                        .find(|a| a.id == r.account_id)
                        .map_or_else(|| r.account_id.clone(), |a| a.name.clone())
                }),
                errors_only: r.errors_only,
                max_bytes: usize::try_from(r.max_bytes).unwrap_or(usize::MAX),
                ttl_ms: r.ttl_ms,
            })
            .collect();
        let max_bytes = candidates.iter().map(|c| c.max_bytes).max()?;
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            dropped("full");
            return None;
        };
        let mut rec = Recording {
            cfg: req.cfg.clone(),
            client_secrets: client_secrets(&req.parts.headers),
            request_id: request_id.to_string(),
            api_key_id: req.key.id.clone(),
            started,
            captured_ms: now_ms(),
            candidates,
            max_bytes,
            method: req.parts.method.to_string(),
            path: req.parts.uri.path().to_string(),
            request_headers: masked_headers(&req.parts.headers),
            request_body: Bytes::new(),
            request_bytes: req.body.len(),
            status: 0,
            response_headers: Vec::new(),
            stream: req.stream,
            chunks: Vec::new(),
            response_kept: 0,
            response_bytes: 0,
            response_cut: false,
            budget: Budget {
                buffered: self.buffered.clone(),
                held: 0,
            },
            tx: self.tx.clone(),
            _permit: permit,
        };
        let keep = req.body.len().min(max_bytes);
        if !rec.budget.take(keep) {
            dropped("full");
            return None;
        }
        rec.request_body = Bytes::copy_from_slice(req.body.get(..keep).unwrap_or_default());
        Some(rec)
    }
}

/// A rule that may still apply once the answer is known.
struct Candidate {
    rule_id: String,
    /// The account name it requires some attempt to have gone to.
    account: Option<String>,
    errors_only: bool,
    max_bytes: usize,
    ttl_ms: u64,
}

/// Bytes held against [`MAX_BUFFERED_BYTES`], given back on drop.
struct Budget {
    buffered: Arc<AtomicUsize>,
    held: usize,
}

impl Budget {
    fn take(&mut self, n: usize) -> bool {
        let ok = self
            .buffered
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                let next = b.checked_add(n)?;
                (next <= MAX_BUFFERED_BYTES).then_some(next)
            })
            .is_ok();
        if ok {
            self.held += n;
        }
        ok
    }
}

impl Drop for Budget {
    fn drop(&mut self) {
        self.buffered.fetch_sub(self.held, Ordering::AcqRel);
    }
}

/// One request being recorded.
pub struct Recording {
    /// The config it was admitted under: the credentials of the accounts it went to are
    /// redacted from what it stored.
    cfg: Arc<crate::control::state::ServingConfig>,
    /// The client's own key as it sent it (headers are masked; a body may quote it).
    client_secrets: Vec<String>,
    request_id: String,
    api_key_id: String,
    started: Instant,
    captured_ms: i64,
    candidates: Vec<Candidate>,
    max_bytes: usize,
    method: String,
    path: String,
    request_headers: Vec<(String, String)>,
    request_body: Bytes,
    request_bytes: usize,
    status: u16,
    response_headers: Vec<(String, String)>,
    stream: bool,
    /// (offset ms from the request's arrival, bytes kept of the chunk).
    chunks: Vec<(u64, Bytes)>,
    response_kept: usize,
    response_bytes: usize,
    response_cut: bool,
    budget: Budget,
    tx: mpsc::Sender<Finished>,
    _permit: OwnedSemaphorePermit,
}

impl Recording {
    /// Records the answer's head and wraps its body so that each chunk is copied as it leaves.
    pub fn wrap(mut self, resp: http::Response<Body>, log: Arc<RequestLog>) -> http::Response<Body> {
        self.status = resp.status().as_u16();
        self.response_headers = masked_headers(resp.headers());
        resp.map(|inner| {
            BodyExt::boxed(CaptureBody {
                inner,
                rec: Some(self),
                log,
            })
        })
    }

    /// relay's own error answer (the request never got a body from an upstream).
    pub fn refused(mut self, e: &ApiError, request_id: &str, log: &RequestLog) {
        let resp = e.clone().into_response(request_id);
        self.status = resp.status().as_u16();
        self.response_headers = masked_headers(resp.headers());
        let body = e.body_json(request_id);
        self.chunk(&body);
        self.finish(log);
    }

    fn chunk(&mut self, data: &[u8]) {
        self.response_bytes += data.len();
        let room = self.max_bytes.saturating_sub(self.response_kept);
        let keep = data.len().min(room);
        if keep < data.len() || self.chunks.len() >= MAX_CHUNKS {
            self.response_cut = true;
        }
        if keep == 0 || self.chunks.len() >= MAX_CHUNKS || !self.budget.take(keep) {
            if keep > 0 {
                self.response_cut = true;
            }
            return;
        }
        let offset = self.started.elapsed().as_millis() as u64;
        self.chunks
            .push((offset, Bytes::copy_from_slice(data.get(..keep).unwrap_or_default())));
        self.response_kept += keep;
    }

    /// The answer ended (or the client went away): the deferred conditions decide, and the
    /// document goes to the shipping queue without waiting.
    fn finish(self, log: &RequestLog) {
        let (accounts, error) = log.settled();
        let chosen = self
            .candidates
            .iter()
            .find(|c| (!c.errors_only || error) && c.account.as_ref().is_none_or(|a| accounts.iter().any(|x| x == a)));
        let Some(rule) = chosen else {
            metrics::counter!(relay_proto::metrics::CAPTURES_TOTAL, "outcome" => "skipped").increment(1);
            return;
        };
        let rule_id = rule.rule_id.clone();
        let max = rule.max_bytes;
        let ttl_ms = rule.ttl_ms;
        let tx = self.tx.clone();
        // An upstream may quote its credential in an answer (a compatible one's "invalid key
        // sk-…"): every credential of an account the request went to is redacted, as is the
        // client's key.
        let secrets = redact::normalized(
            self.cfg
                .resources
                .accounts
                .iter()
                .filter(|a| accounts.iter().any(|n| n == &a.name))
                .flat_map(redact::account_secrets)
                .chain(self.client_secrets.iter().cloned())
                .collect(),
        );
        let finished = Finished {
            secrets,
            expires_ms: if ttl_ms == 0 {
                0
            } else {
                self.captured_ms
                    .saturating_add(i64::try_from(ttl_ms).unwrap_or(i64::MAX))
            },
            rule_id,
            max_bytes: max,
            rec: self,
        };
        if tx.try_send(finished).is_err() {
            dropped("full");
        }
    }
}

/// A finished recording on its way to the control plane (its permit and bytes held until sent).
struct Finished {
    /// Redacted from the bodies before they are stored.
    secrets: Vec<String>,
    rule_id: String,
    max_bytes: usize,
    expires_ms: i64,
    rec: Recording,
}

impl Finished {
    /// The capture document (JSON) and whether anything was cut.
    fn document(&self, node_id: &str) -> (Vec<u8>, bool) {
        let r = &self.rec;
        let req_keep = r.request_body.len().min(self.max_bytes);
        let req_cut = r.request_bytes > req_keep;
        // The response's chunks as this rule keeps them.
        let mut kept = 0usize;
        let mut resp_cut = r.response_cut;
        let mut offsets = Vec::with_capacity(r.chunks.len());
        let mut pieces = Vec::with_capacity(r.chunks.len());
        for (offset, data) in &r.chunks {
            let room = self.max_bytes.saturating_sub(kept);
            if room == 0 {
                resp_cut = true;
                break;
            }
            let piece = data.slice(..data.len().min(room));
            resp_cut |= piece.len() < data.len();
            kept += piece.len();
            offsets.push(*offset);
            pieces.push(piece);
        }
        let (body, redacted_request) = redact(&[r.request_body.slice(..req_keep)], &self.secrets);
        let (pieces, redacted_response) = redact(&pieces, &self.secrets);
        let (request_headers, redacted_request_headers) = headers_json(&r.request_headers, &self.secrets);
        let (response_headers, redacted_response_headers) = headers_json(&r.response_headers, &self.secrets);
        let chunks: Vec<serde_json::Value> = offsets
            .iter()
            .zip(&pieces)
            .map(|(offset, piece)| {
                let mut c = serde_json::Map::new();
                c.insert("offset_ms".into(), (*offset).into());
                put_bytes(&mut c, "data", piece);
                serde_json::Value::Object(c)
            })
            .collect();
        let mut request = serde_json::Map::new();
        request.insert("method".into(), r.method.clone().into());
        request.insert("path".into(), r.path.clone().into());
        request.insert("headers".into(), request_headers);
        request.insert("bytes".into(), r.request_bytes.into());
        request.insert("truncated".into(), req_cut.into());
        put_bytes(&mut request, "body", body.first().map_or(&[][..], |b| &b[..]));
        let doc = serde_json::json!({
            "version": 1,
            "request_id": r.request_id,
            "rule_id": self.rule_id,
            "node_id": node_id,
            "captured_ms": r.captured_ms,
            "truncated": req_cut || resp_cut,
            // Secrets replaced by their masks (the bodies then differ from what was sent there).
            "redacted": redacted_request + redacted_response + redacted_request_headers + redacted_response_headers,
            "request": request,
            "response": {
                "status": r.status,
                "headers": response_headers,
                "stream": r.stream,
                "bytes": r.response_bytes,
                "truncated": resp_cut,
                "chunks": chunks,
            },
        });
        (serde_json::to_vec(&doc).unwrap_or_default(), req_cut || resp_cut)
    }
}

/// The client's key as sent (`x-api-key`, or `authorization` without its scheme).
fn client_secrets(h: &http::HeaderMap) -> Vec<String> {
    ["x-api-key", "authorization"]
        .iter()
        .filter_map(|n| h.get(*n)?.to_str().ok())
        .map(|v| match v.split_once(' ') {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim().to_string(),
            _ => v.trim().to_string(),
        })
        .collect()
}

/// `bytes` as text under `name` when it is UTF-8, else base64 under `name_base64`.
fn put_bytes(into: &mut serde_json::Map<String, serde_json::Value>, name: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(s) => {
            into.insert(name.into(), s.into());
        }
        Err(_) => {
            into.insert(
                format!("{name}_base64"),
                base64::engine::general_purpose::STANDARD.encode(bytes).into(),
            );
        }
    }
}

/// Headers as stored, with any secret quoted in a value redacted (an upstream may echo its
/// credential in a header the client is given: `anthropic-*`, `request-id`, `content-type`), and
/// how many were.
fn headers_json(h: &[(String, String)], secrets: &[String]) -> (serde_json::Value, usize) {
    let mut redacted = 0;
    let items = h
        .iter()
        .map(|(n, v)| {
            let (out, k) = redact(&[Bytes::copy_from_slice(v.as_bytes())], secrets);
            redacted += k;
            let v = out
                .first()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            serde_json::json!([n, v])
        })
        .collect();
    (serde_json::Value::Array(items), redacted)
}

/// Headers as stored: every secret value masked ([`mask`]), values that are not text skipped.
pub fn masked_headers(h: &http::HeaderMap) -> Vec<(String, String)> {
    h.iter()
        .filter_map(|(name, value)| {
            let n = name.as_str();
            let v = value.to_str().ok()?;
            let secret =
                value.is_sensitive() || SECRET_HEADERS.contains(&n) || SECRET_WORDS.iter().any(|w| n.contains(w));
            Some((n.to_string(), if secret { mask(v) } else { v.to_string() }))
        })
        .collect()
}

fn dropped(reason: &'static str) {
    metrics::counter!(relay_proto::metrics::CAPTURE_DROPPED_TOTAL, "reason" => reason).increment(1);
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The client's body with each chunk copied into the recording as it leaves.
struct CaptureBody {
    inner: Body,
    rec: Option<Recording>,
    log: Arc<RequestLog>,
}

impl CaptureBody {
    fn done(&mut self) {
        if let Some(rec) = self.rec.take() {
            rec.finish(&self.log);
        }
    }
}

impl HttpBody for CaptureBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(rec), Some(data)) = (this.rec.as_mut(), frame.data_ref()) {
                    rec.chunk(data);
                }
                if this.inner.is_end_stream() {
                    this.done();
                }
            }
            Poll::Ready(_) => this.done(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for CaptureBody {
    fn drop(&mut self) {
        // The client went away (or hyper stopped polling at the end): what was sent is kept.
        self.done();
    }
}

type Interceptor = Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send + Sync>;
type Client = pb::usage_ingest_client::UsageIngestClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Interceptor>,
>;

async fn connect(link: &ControlPlaneLink) -> Option<Client> {
    let channel = link.connect().await.ok()?;
    let bearer = link.bearer().ok()?;
    let f: Interceptor = Box::new(move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", bearer.clone());
        Ok(r)
    });
    Some(pb::usage_ingest_client::UsageIngestClient::with_interceptor(channel, f).max_encoding_message_size(usize::MAX))
}

/// Compresses and sends each finished capture, one at a time; the permit and the bytes it
/// holds are given back once it is sent or dropped.
async fn ship(link: ControlPlaneLink, node_id: Arc<str>, mut rx: mpsc::Receiver<Finished>) {
    let mut client = None;
    while let Some(f) = rx.recv().await {
        let node = node_id.clone();
        let packed = tokio::task::spawn_blocking(move || {
            let (doc, truncated) = f.document(&node);
            let z = zstd::bulk::compress(&doc, ZSTD_LEVEL);
            (f, z, truncated)
        })
        .await;
        let Ok((f, Ok(document_zstd), truncated)) = packed else {
            dropped("too_large");
            continue;
        };
        let capture = pb::Capture {
            request_id: f.rec.request_id.clone(),
            rule_id: f.rule_id.clone(),
            api_key_id: f.rec.api_key_id.clone(),
            captured_ms: f.rec.captured_ms,
            expires_ms: f.expires_ms,
            truncated,
            document_zstd,
        };
        drop(f);
        let batch = pb::CaptureBatch {
            node_id: node_id.to_string(),
            captures: vec![capture],
        };
        let mut sent = false;
        for attempt in 0..SHIP_TRIES {
            if client.is_none() {
                client = connect(&link).await;
            }
            let Some(c) = client.as_mut() else {
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                continue;
            };
            match c.store_captures(batch.clone()).await {
                Ok(r) => {
                    let outcome = if r.get_ref().stored > 0 { "stored" } else { "duplicate" };
                    metrics::counter!(relay_proto::metrics::CAPTURES_TOTAL, "outcome" => outcome).increment(1);
                    sent = true;
                    break;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot ship a capture; retrying");
                    if e.code() == tonic::Code::InvalidArgument || e.code() == tonic::Code::ResourceExhausted {
                        break;
                    }
                    client = None;
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
            }
        }
        if !sent {
            dropped("ship_failed");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked_as_first_characters_an_ellipsis_and_the_last_four() {
        assert_eq!(mask("sk-ant-api03-abcdefghijklmnopqrstuvwxyz"), "sk-ant…wxyz");
        assert_eq!(mask("Bearer rk-live-0123456789abcdefWXYZ"), "Bearer rk-liv…WXYZ");
        // Too short to show any of it.
        assert_eq!(mask("hunter2"), "…");
        let mut h = http::HeaderMap::new();
        h.insert("x-api-key", "rk-live-0123456789abcdefWXYZ".parse().unwrap());
        h.insert("cookie", "session=0123456789abcdefghij".parse().unwrap());
        h.insert("x-my-token", "0123456789abcdefghijkl".parse().unwrap());
        h.insert("anthropic-version", "2023-06-01".parse().unwrap());
        let m = masked_headers(&h);
        let get = |n: &str| m.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone()).unwrap();
        assert_eq!(get("x-api-key"), "rk-liv…WXYZ");
        assert!(!get("cookie").contains("0123456789abcdef"));
        assert!(!get("x-my-token").contains("0123456789abcdef"));
        assert_eq!(get("anthropic-version"), "2023-06-01");
    }

    #[test]
    fn a_secret_an_upstream_echoed_in_a_header_is_redacted() {
        let cred = "sk-ant-api03-Zx9Qw8Er7Ty6Ui5Op4As3Df2Gh1Jk0LmNbVcXz-AAAAAAAA".to_string();
        let secrets = redact::normalized(vec![cred.clone()]);
        let h = vec![
            ("content-type".to_string(), format!("application/json; charset={cred}")),
            ("anthropic-echo".to_string(), cred.clone()),
            ("x-upstream-request-id".to_string(), format!("req_{}", &cred[20..])),
            ("anthropic-version".to_string(), "2023-06-01".to_string()),
        ];
        let (v, n) = headers_json(&h, &secrets);
        assert_eq!(n, 3, "{v}");
        assert!(!v.to_string().contains(&cred[13..29]), "{v}");
        assert!(!v.to_string().contains(&cred[30..46]), "{v}");
        assert_eq!(v[0][1], format!("application/json; charset={}", mask(&cred)));
        assert_eq!(v[3], serde_json::json!(["anthropic-version", "2023-06-01"]));
    }
}
