//! # relay-mock-upstream
//!
//! A fake Anthropic API that speaks the real wire format (see `/work/shared/anthropic-wire.md`), so relay's
//! tests and benchmarks run with no real account. This crate owns:
//!
//! - the **server** ([`MockUpstream`]): hyper 1 on one port for HTTP/1.1 and h2c (or, with [`MockConfig::tls`],
//!   HTTPS with ALPN `h2` and `http/1.1`), serving
//!   `POST /v1/messages` (JSON or SSE), `POST /v1/messages/count_tokens`, `GET /v1/models` and
//!   `GET /v1/models/{id}`; every other route is a 404 `not_found_error` (and is still recorded, so a test can
//!   assert that relay never forwarded e.g. `/api/event_logging/batch`), and so is `count_tokens` after
//!   [`MockUpstream::set_count_tokens_served`]`(false)` (an upstream that lacks it);
//! - **deterministic usage** ([`expected_usage`], [`MockConfig::expected_usage`]): the exact token counts the
//!   mock reports for a request body, so tests can assert relay's accounting;
//! - **fault injection** ([`Fault`]): per credential ([`MockConfig::faults_by_credential`],
//!   [`MockUpstream::set_fault`]) or per request (`x-mock-fault` header);
//! - **recording**: every request received ([`MockUpstream::requests`]) and the exact bytes of every response
//!   body sent ([`MockUpstream::sent_body`]), unless [`MockConfig::record`] is off (benchmarks);
//! - an **OAuth server** like Anthropic's (`GET /oauth/authorize`, `POST /v1/oauth/token` with rotating refresh
//!   tokens; see `src/oauth.rs`), whose access tokens (`mock-oauth-at-N`) the API routes validate: knobs
//!   [`MockUpstream::set_oauth_token_lifetime`], [`MockUpstream::set_oauth_token_delay`],
//!   [`MockUpstream::fail_next_oauth_token_calls`], [`MockUpstream::revoke_all_oauth_tokens`], counters
//!   [`MockUpstream::oauth_counters`];
//! - a **hostile upstream** ([`hostile::HostileUpstream`]): raw TCP answering every request with scripted
//!   bytes, for what a well-behaved server cannot send (wrong framing, captive-portal HTML, redirects, cut events);
//! - the `relay-mock-upstream` **binary** (see `src/main.rs`) wrapping all of the above.
//!
//! ## Requests
//! `POST /v1/messages` (any query string) needs `x-api-key` or `Authorization: Bearer` (else 401
//! `authentication_error`; a Bearer `mock-oauth-at-…` token must be one the OAuth server issued, not revoked nor
//! expired, else 401 `authentication_error`; other Bearer values are accepted as they are) and `anthropic-version` (else 400); then the fault, if any; then a JSON object body
//! with a string `model`, an array `messages` and an integer `max_tokens` (else 400 `invalid_request_error`).
//! `count_tokens` has the same checks except `max_tokens`; `/v1/models…` needs only a credential.
//!
//! Request headers the mock understands:
//! - `x-mock-fault: rate-limited|overloaded|server-error|unauthorized|drop-mid-stream|error-event|stall|org-disabled|echo-credential`
//!   (overrides the credential's fault), with `x-mock-fault-after: N` (events sent before a stream fault,
//!   default [`DEFAULT_FAULT_AFTER_EVENTS`]) and `x-mock-retry-after: S` (for `rate-limited`, default
//!   [`DEFAULT_RETRY_AFTER_SECS`]);
//! - `x-mock-cache-read: N`: report `cache_read_input_tokens = N`.
//! - `x-mock-answer-model: M`: the answer names model `M` whatever the request asked (a compatible
//!   endpoint that maps model names).
//!
//! ## Answers
//! - Content: a `thinking` block first (`thinking_events` `thinking_delta`s then one `signature_delta`) when the
//!   body has `"thinking": {"type": "enabled"}` (or `"adaptive"`); then, if the body has `tools` (and
//!   `tool_choice` is not `none`), one `tool_use` block calling `tool_choice.name` or else the first tool, whose
//!   input has one value per `input_schema.properties` entry (string → `"mock value for NAME"`, number/integer →
//!   `1`, boolean → `true`, array → `[]`, object → `{}`), streamed as `tool_json_pieces` `input_json_delta`s,
//!   `stop_reason: "tool_use"`; otherwise one `text` block of `text_events` `text_delta`s of `event_bytes` ASCII
//!   bytes each, `stop_reason: "end_turn"`.
//! - Streaming: `message_start` (usage with input, cache fields, `cache_creation` split, `output_tokens: 1`,
//!   `service_tier`), `ping`, the blocks (`content_block_start`, deltas, `content_block_stop`) with a `ping`
//!   after every `ping_every`-th content delta, `message_delta` (stop reason and cumulative usage:
//!   `input_tokens`, `cache_creation_input_tokens`, `cache_read_input_tokens`, `output_tokens`; the 5m/1h split
//!   is only in `message_start`), `message_stop`. One body frame per event; `ttfb` before the first event (the
//!   headers are sent at once), `event_delay` before each later one. Stream faults count every event,
//!   `ping`s included.
//! - Non-streaming: the Message JSON with the same blocks complete, after `ttfb + event_delay × content deltas`.
//! - Every response carries `request-id: req_mock_<uuid>` and `anthropic-organization-id: <uuid>` (one per
//!   server, [`MockUpstream::organization_id`]); successes carry `anthropic-ratelimit-{requests,tokens,
//!   input-tokens,output-tokens}-{limit,remaining,reset}` (RFC 3339), plus `anthropic-ratelimit-unified-*`
//!   (`status: allowed`) when the credential came as a Bearer token. Bodies are never compressed.

mod body;
mod fault;
pub mod hostile;
mod oauth;
mod plan;
mod server;
mod tls;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use tokio::net::TcpSocket;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use fault::{Fault, ParseFaultError, DEFAULT_FAULT_AFTER_EVENTS, DEFAULT_RETRY_AFTER_SECS};
pub use oauth::{OAuthCounters, OAuthMockConfig, ACCESS_TOKEN_PREFIX, REFRESH_TOKEN_PREFIX};
pub use plan::{Usage, CACHE_WRITE_TOKENS_PER_MARK};
pub use server::MODELS;
pub use tls::{MockTls, TlsInfo};

/// How the mock behaves. `MockConfig::default()` is what tests usually want.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Where to listen. Default `127.0.0.1:0` (an ephemeral port).
    pub listen: SocketAddr,
    /// Streaming: delay before the first SSE event (headers go out at once). Non-streaming: added before the
    /// response. Default 0.
    pub ttfb: Duration,
    /// Streaming: delay between two SSE events. Non-streaming: `event_delay × content deltas` is added before
    /// the response. Default 0.
    pub event_delay: Duration,
    /// Number of `text_delta`s of a text answer. Default 30.
    pub text_events: usize,
    /// Bytes of text per `text_delta` / `thinking_delta`. Default 16.
    pub event_bytes: usize,
    /// Number of `thinking_delta`s when thinking is enabled. Default 5.
    pub thinking_events: usize,
    /// Number of `input_json_delta`s a tool-use input is split into (fewer if the JSON is shorter). Default 6.
    pub tool_json_pieces: usize,
    /// A `ping` after every N-th content delta (0: only the one after `message_start`). Default 10.
    pub ping_every: usize,
    /// Faults keyed by credential: the `x-api-key` value or the Bearer token.
    pub faults_by_credential: HashMap<String, Fault>,
    /// Record requests and response bodies. Default true; benchmarks turn it off (no lock on the hot path).
    pub record: bool,
    /// Serve HTTPS with this certificate (ALPN `h2` and `http/1.1`) instead of plain HTTP/1.1 and h2c.
    /// Default `None`.
    pub tls: Option<MockTls>,
    /// Speak HTTP/2: with TLS, offer ALPN `h2` (besides `http/1.1`); without, accept h2c. False: HTTP/1.1 only
    /// (ALPN offers only `http/1.1`), as an upstream without HTTP/2. Default true.
    pub h2: bool,
    /// HTTP/2: the streams one connection may carry at once (`SETTINGS_MAX_CONCURRENT_STREAMS`). Default
    /// 10,000 (benchmarks multiplex many streams on one connection; hyper's own default is 200).
    pub h2_max_concurrent_streams: u32,
    /// The OAuth server's client, redirect URI and token lifetime (see [`OAuthMockConfig`]).
    pub oauth: OAuthMockConfig,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            ttfb: Duration::ZERO,
            event_delay: Duration::ZERO,
            text_events: 30,
            event_bytes: 16,
            thinking_events: 5,
            tool_json_pieces: 6,
            ping_every: 10,
            faults_by_credential: HashMap::new(),
            record: true,
            tls: None,
            h2: true,
            h2_max_concurrent_streams: 10_000,
            oauth: OAuthMockConfig::default(),
        }
    }
}

impl MockConfig {
    fn shape(&self) -> plan::Shape {
        plan::Shape {
            text_events: self.text_events,
            event_bytes: self.event_bytes,
            thinking_events: self.thinking_events,
            tool_json_pieces: self.tool_json_pieces,
            ping_every: self.ping_every,
        }
    }

    /// The usage a mock with this configuration reports for `request_body` when the request carries
    /// `x-mock-cache-read: cache_read_input_tokens` (pass 0 without that header). See [`expected_usage`] for
    /// the rules.
    pub fn expected_usage(&self, request_body: &serde_json::Value, cache_read_input_tokens: u64) -> Usage {
        plan::plan(&self.shape(), request_body, cache_read_input_tokens).usage
    }
}

/// The usage the mock reports for `request_body` under [`MockConfig::default()`] and without an
/// `x-mock-cache-read` header. The rules (the server computes its answer with the same code):
///
/// - `input_tokens` = `max(1, floor(B / 4))` where `B` is the byte length of `serde_json::to_vec(&body["messages"])`
///   (compact JSON of the parsed value; system and tools do not count). `count_tokens` answers the same number.
/// - `output_tokens` = number of content deltas: `thinking_events` (if thinking is `enabled`/`adaptive`) +
///   either the number of `input_json_delta` pieces (tool answer: `min(max(1, tool_json_pieces), chars of the
///   input JSON)`) or `text_events` (text answer). `signature_delta` does not count. Defaults: 30 for text,
///   5 + 30 with thinking, 6 for a tool call whose input JSON has at least 6 chars.
/// - Each `cache_control` object found at `body.cache_control`, `tools[i].cache_control`,
///   `system[i].cache_control`, `messages[i].content[j].cache_control` or
///   `messages[i].content[j].content[k].cache_control` adds [`CACHE_WRITE_TOKENS_PER_MARK`] (1024) tokens:
///   to `cache_1h` if its `ttl` is `"1h"`, else to `cache_5m`.
///   `cache_creation_input_tokens = cache_5m + cache_1h`.
/// - `cache_read_input_tokens` = N from the request header `x-mock-cache-read: N`, else 0 (here always 0; use
///   [`MockConfig::expected_usage`] to pass N).
pub fn expected_usage(request_body: &serde_json::Value) -> Usage {
    MockConfig::default().expected_usage(request_body, 0)
}

/// One request as the mock received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// The `request-id` the mock put on its response.
    pub request_id: String,
    pub method: http::Method,
    /// Path and query, e.g. `/v1/messages?beta=true`.
    pub path_and_query: String,
    pub version: http::Version,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    /// What the connection negotiated, if it was TLS ([`MockConfig::tls`]); `None` for plain HTTP.
    pub tls: Option<TlsInfo>,
}

impl RecordedRequest {
    /// The path without the query string.
    pub fn path(&self) -> &str {
        self.path_and_query.split('?').next().unwrap_or_default()
    }

    /// A header's value, if present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// A running mock upstream. Serves until dropped; dropping it closes the listener and every open connection
/// (stalled streams included).
pub struct MockUpstream {
    addr: SocketAddr,
    shared: Arc<server::Shared>,
    config: MockConfig,
    accept: JoinHandle<()>,
    _shutdown: watch::Sender<()>,
}

impl MockUpstream {
    /// Binds `config.listen` (default `127.0.0.1:0`) and serves HTTP/1.1 and h2c (HTTPS if `config.tls` is
    /// set) until dropped. Must be called inside a tokio runtime. An unusable `config.tls` is an
    /// `InvalidInput` error.
    pub async fn start(config: MockConfig) -> std::io::Result<MockUpstream> {
        let tls = config.tls.as_ref().map(|t| tls::acceptor(t, config.h2)).transpose()?;
        let socket = if config.listen.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(config.listen)?;
        let listener = socket.listen(4096)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(server::Shared {
            shape: config.shape(),
            ttfb: config.ttfb,
            event_delay: config.event_delay,
            faults: ArcSwap::from_pointee(config.faults_by_credential.clone()),
            utilization: ArcSwap::from_pointee(HashMap::new()),
            record: config.record,
            log: Mutex::new(Vec::new()),
            bodies: Mutex::new(HashMap::new()),
            org_id: uuid::Uuid::new_v4().to_string(),
            served: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            tls_handshake_failures: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            h2: config.h2,
            h2_max_concurrent_streams: config.h2_max_concurrent_streams,
            goaway: tokio::sync::Notify::new(),
            reset: tokio::sync::Notify::new(),
            oauth: oauth::OAuthServer::new(config.oauth.clone()),
            count_tokens_served: std::sync::atomic::AtomicBool::new(true),
        });
        let (shutdown_tx, shutdown_rx) = watch::channel(());
        let accept = tokio::spawn(server::accept_loop(listener, shared.clone(), tls, shutdown_rx));
        tracing::debug!(%addr, "mock upstream listening");
        Ok(MockUpstream {
            addr,
            shared,
            config,
            accept,
            _shutdown: shutdown_tx,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://IP:PORT` (an unspecified bind address is reported as loopback); with TLS,
    /// `https://localhost:PORT` (so the certificate must be issued for `localhost`).
    pub fn base_url(&self) -> String {
        if self.config.tls.is_some() {
            return format!("https://localhost:{}", self.addr.port());
        }
        let mut addr = self.addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(if addr.is_ipv4() {
                Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
        }
        format!("http://{addr}")
    }

    /// The configuration it was started with (faults as configured at start).
    pub fn config(&self) -> &MockConfig {
        &self.config
    }

    /// Every request received, in arrival order (empty if recording is off).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Forgets the recorded requests and response bodies.
    pub fn clear_requests(&self) {
        self.shared.log.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.shared.bodies.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// The most requests this mock had in flight at once (from request head to the end of the response).
    pub fn max_in_flight(&self) -> u64 {
        self.shared.max_in_flight.load(Ordering::Acquire)
    }

    /// Number of requests received (counted even when recording is off).
    pub fn request_count(&self) -> u64 {
        self.shared.served.load(Ordering::Relaxed)
    }

    /// Connections served so far (TLS ones once their handshake succeeded): over HTTP/2 one connection
    /// carries many requests.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Every open connection starts a graceful shutdown: HTTP/2 sends GOAWAY (the streams in flight finish,
    /// no new one is accepted on it); HTTP/1.1 closes once its response in flight is done. The server keeps
    /// accepting new connections.
    pub fn goaway(&self) {
        self.shared.goaway.notify_waiters();
    }

    /// Every open connection is closed at once, mid-response if one is in flight (HTTP/2: every stream on
    /// it breaks). The server keeps accepting new connections.
    pub fn reset_connections(&self) {
        self.shared.reset.notify_waiters();
    }

    /// Number of TLS handshakes that failed or timed out (a client that does not trust the certificate, a
    /// plain-HTTP client on a TLS mock…). Always 0 without TLS.
    pub fn tls_handshake_failures(&self) -> u64 {
        self.shared.tls_handshake_failures.load(Ordering::Relaxed)
    }

    /// The exact bytes of the response body sent under `request_id` so far (a stream still in flight returns
    /// what has been sent yet). `None` if unknown or recording is off.
    pub fn sent_body(&self, request_id: &str) -> Option<Bytes> {
        let sink = self
            .shared
            .bodies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(request_id)
            .cloned()?;
        let bytes = sink.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Some(Bytes::from(bytes))
    }

    /// The `anthropic-organization-id` this server puts on every response.
    pub fn organization_id(&self) -> &str {
        &self.shared.org_id
    }

    /// Sets (`Some`) or clears (`None`) the fault of a credential, effective for the next request.
    pub fn set_fault(&self, credential: &str, fault: Option<Fault>) {
        self.shared.faults.rcu(|current| {
            let mut next = HashMap::clone(current);
            match fault {
                Some(f) => next.insert(credential.to_string(), f),
                None => next.remove(credential),
            };
            next
        });
    }

    /// The 5-hour unified utilization (0..1) this server reports to the Bearer credential `token`
    /// from the next answer on (default 0.1).
    pub fn set_unified_utilization(&self, token: &str, five_hour: f64) {
        self.shared.utilization.rcu(|current| {
            let mut next = HashMap::clone(current);
            next.insert(token.to_string(), five_hour);
            next
        });
    }

    /// Whether `POST /v1/messages/count_tokens` is served (default true). When not, it is answered like any
    /// unknown route, 404 `not_found_error` "Not found: POST /v1/messages/count_tokens", as by an upstream that
    /// lacks the endpoint (a compatible API).
    pub fn set_count_tokens_served(&self, served: bool) {
        self.shared.count_tokens_served.store(served, Ordering::Release);
    }

    /// Clears every per-credential fault.
    pub fn clear_faults(&self) {
        self.shared.faults.store(Arc::new(HashMap::new()));
    }

    /// OAuth: `expires_in` of access tokens issued from now on (and when they stop working).
    pub fn set_oauth_token_lifetime(&self, lifetime: Duration) {
        self.shared.oauth.set_lifetime(lifetime);
    }

    /// OAuth: a delay before every token endpoint answer (`Duration::ZERO`: none).
    pub fn set_oauth_token_delay(&self, delay: Duration) {
        self.shared.oauth.set_delay(delay);
    }

    /// OAuth: the next `n` token calls answer 500 `api_error` (and change nothing).
    pub fn fail_next_oauth_token_calls(&self, n: u64) {
        self.shared.oauth.fail_next(n);
    }

    /// OAuth: every access token issued so far stops working (401 on the API) and every refresh token answers
    /// `invalid_grant`, as when the user revokes the app.
    pub fn revoke_all_oauth_tokens(&self) {
        self.shared.oauth.revoke_all();
    }

    /// OAuth: the access token `token` expires now.
    pub fn expire_oauth_access_token(&self, token: &str) {
        self.shared.oauth.expire(token);
    }

    /// OAuth: issues an access and refresh token pair (scope `scope`) as a completed login would, without the
    /// authorize step: `(access_token, refresh_token)`.
    pub fn mint_oauth_tokens(&self, scope: &str) -> (String, String) {
        let (at, rt, _) = self.shared.oauth.mint(scope);
        (at, rt)
    }

    /// OAuth: what the OAuth server saw so far.
    pub fn oauth_counters(&self) -> OAuthCounters {
        self.shared.oauth.counters()
    }

    /// `BASE/oauth/authorize` and `BASE/v1/oauth/token`: the `oauth.authorize_url` and `oauth.token_url` to
    /// point relay at this mock.
    pub fn oauth_urls(&self) -> (String, String) {
        let base = self.base_url();
        (format!("{base}/oauth/authorize"), format!("{base}/v1/oauth/token"))
    }

    /// The usage this server reports for `request_body` (with its own configuration), without
    /// `x-mock-cache-read`.
    pub fn expected_usage(&self, request_body: &serde_json::Value) -> Usage {
        self.config.expected_usage(request_body, 0)
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        // Dropping `_shutdown` (right after this) tells every connection task to close its connection.
        self.accept.abort();
    }
}

impl std::fmt::Debug for MockUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockUpstream")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}
