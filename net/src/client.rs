//! The pooled upstream HTTP clients: hyper-util's pooling client over rustls
//! (ring), HTTP/1.1 and HTTP/2 (ALPN), the Mozilla roots plus any extra CA
//! certificates the operator configures (tests use this for a TLS upstream).
//!
//! An account may name an outbound proxy (`http://` with HTTP CONNECT,
//! `socks5://` resolving names here, `socks5h://` resolving them at the proxy;
//! user and password in the URL). Every distinct proxy URL gets its own client,
//! so its own connection pool: a connection made through one proxy is never
//! reused for an account behind another proxy, or behind none. TLS to the
//! upstream runs inside the tunnel, end to end.

use crate::h1::{self, H1Body, H1Error};
use bytes::Bytes;
use http::Uri;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::proxy::{SocksV5, Tunnel};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

pub type HttpClient = Client<HttpsConnector<Connector>, Full<Bytes>>;

/// What [`Upstreams::request`] answers: the response head (its body streams as it comes) or why none came.
pub type UpstreamResult = Result<http::Response<UpstreamBody>, UpstreamError>;

/// Why an upstream request got no response head. Neither kind carries a URL, a header or a body.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// From hyper's pooled client (HTTP/2, and HTTP/1.1 negotiated over TLS by `auto`).
    #[error(transparent)]
    Hyper(#[from] hyper_util::client::legacy::Error),
    /// From relay's own HTTP/1.1 connection ([`crate::h1`]).
    #[error(transparent)]
    H1(#[from] H1Error),
}

impl UpstreamError {
    /// The connection could not be made (nothing was sent).
    pub fn is_connect(&self) -> bool {
        match self {
            UpstreamError::Hyper(e) => e.is_connect(),
            UpstreamError::H1(e) => e.is_connect(),
        }
    }
}

/// A response body from an upstream: read by hyper's connection (HTTP/2) or straight from relay's
/// own HTTP/1.1 connection by whoever polls it.
#[derive(Debug)]
pub enum UpstreamBody {
    Hyper(hyper::body::Incoming),
    H1(H1Body),
}

impl UpstreamBody {
    /// Whether one poll hands over everything that has arrived (relay's own HTTP/1.1 body): then
    /// there is nothing to wait for to merge more into one write.
    pub fn delivers_all_arrived(&self) -> bool {
        matches!(self, UpstreamBody::H1(_))
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            UpstreamBody::H1(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Hyper(b) => b.is_end_stream(),
            UpstreamBody::H1(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            UpstreamBody::Hyper(b) => b.size_hint(),
            UpstreamBody::H1(b) => b.size_hint(),
        }
    }
}

/// How often a request an HTTP/2 upstream refused before processing it (`REFUSED_STREAM`, RFC 9113
/// §8.7: safe to send again) is sent again. A new connection's first burst meets it: the client may
/// open streams before the server's `SETTINGS_MAX_CONCURRENT_STREAMS` arrives; once it has, further
/// requests wait for a free stream instead.
const REFUSED_STREAM_RETRIES: usize = 3;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Past this many distinct proxy URLs (old ones stay after a config change),
/// the cache of proxied clients starts over.
const MAX_PROXIED_CLIENTS: usize = 1024;

/// HTTP/2: what one stream may receive before relay has passed it on (its
/// initial window). An SSE stream is a few hundred KB at most and JSON answers
/// rarely pass 1 MiB, so an upstream never waits on relay for an answer it
/// reads as fast as its client does; a client that stops reading holds at most
/// this much of its stream in relay (as an HTTP/1.1 socket's receive buffer
/// would).
pub const H2_STREAM_WINDOW: u32 = 1 << 20;

/// HTTP/2: the connection's window, the largest the protocol allows. Every
/// stream of an upstream shares its connection: a smaller window would let a
/// few clients that stop reading (their streams' unread data counts against
/// the connection) stall every other stream on it. The per-stream window
/// above bounds memory instead. No adaptive (BDP) window: it would override
/// both and ping the upstream for throughput SSE streams do not need.
pub const H2_CONNECTION_WINDOW: u32 = (1 << 31) - 1;

/// HTTP/2: a PING this often on a connection that has received nothing (also
/// while no stream is open), so a dead upstream connection is noticed during a
/// long thinking pause, not at the next idle timeout.
pub const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// HTTP/2: how long a PING may go unanswered before the connection (and its
/// streams) is closed as dead.
pub const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Which HTTP version relay speaks to upstreams (`upstream.http_version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HttpVersion {
    /// HTTP/2 where TLS negotiates `h2` (ALPN), else HTTP/1.1.
    #[default]
    Auto,
    /// HTTP/1.1 only (ALPN offers only `http/1.1`).
    Http1,
    /// HTTP/2 only: ALPN offers only `h2`, and plain `http://` upstreams get
    /// h2c with prior knowledge. An upstream without HTTP/2 cannot be reached.
    Http2,
}

impl HttpVersion {
    /// The setting's values: `auto`, `http1`, `http2`.
    pub const NAMES: [&'static str; 3] = ["auto", "http1", "http2"];

    /// `auto`, `http1` or `http2`; anything else is `None`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Self::Auto),
            "http1" => Some(Self::Http1),
            "http2" => Some(Self::Http2),
            _ => None,
        }
    }

    fn index(self) -> u8 {
        match self {
            Self::Auto => 0,
            Self::Http1 => 1,
            Self::Http2 => 2,
        }
    }

    fn from_index(i: u8) -> Self {
        match i {
            1 => Self::Http1,
            2 => Self::Http2,
            _ => Self::Auto,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read extra CA file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("TLS setup: {0}")]
    Tls(String),
}

pub use relay_proto::validate::{ProxyKind, ProxyUrlError};

/// An account's outbound proxy, parsed and checked when the config is built.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxySpec {
    /// The URL as configured: the key of its client (and a secret: never logged).
    url: String,
    pub kind: ProxyKind,
    /// `http://host:port` of the proxy itself (what the TCP connector dials).
    addr: Uri,
    auth: Option<(String, String)>,
}

impl std::fmt::Debug for ProxySpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxySpec")
            .field("kind", &self.kind)
            .field("addr", &self.addr)
            .field("auth", &self.auth.as_ref().map(|_| "set"))
            .finish()
    }
}

impl ProxySpec {
    /// Parses `scheme://[user[:password]@]host[:port]` with the one parser the
    /// control plane validates with ([`relay_proto::validate::parse_proxy_url`]).
    pub fn parse(url: &str) -> Result<Self, ProxyUrlError> {
        let p = relay_proto::validate::parse_proxy_url(url)?;
        let addr: Uri = format!("http://{}:{}", p.host, p.port)
            .parse()
            .map_err(|_| ProxyUrlError::Unparsable)?;
        Ok(Self {
            url: url.to_string(),
            kind: p.kind,
            addr,
            auth: p.auth,
        })
    }

    /// `host:port` of the proxy (no credentials), for logs and errors.
    pub fn endpoint(&self) -> String {
        self.addr.authority().map(|a| a.to_string()).unwrap_or_default()
    }
}

/// The TCP connector under TLS: direct, or through the account's proxy, bounded
/// by the connect timeout in force (a live setting, shared by every client).
#[derive(Clone)]
pub struct Connector {
    route: Route,
    timeout_ms: Arc<AtomicU64>,
}

#[derive(Debug, thiserror::Error)]
#[error("connecting to the upstream timed out after {0} ms")]
pub struct ConnectTimeout(u64);

#[derive(Clone)]
enum Route {
    Direct(HttpConnector),
    Tunnel(Tunnel<HttpConnector>),
    /// `local_dns`: resolve the upstream's name here (asynchronously) and hand
    /// the proxy an address; else the proxy gets the name.
    Socks {
        socks: SocksV5<HttpConnector>,
        local_dns: bool,
    },
}

type Connecting = Pin<Box<dyn Future<Output = Result<TokioIo<tokio::net::TcpStream>, BoxError>> + Send>>;

/// Both proxy connectors take a missing port to mean 443; give them the scheme's.
fn with_port(dst: Uri) -> Uri {
    if dst.port().is_some() {
        return dst;
    }
    let port = if dst.scheme_str() == Some("http") { 80 } else { 443 };
    let (Some(scheme), Some(host)) = (dst.scheme_str(), dst.host()) else {
        return dst;
    };
    format!("{scheme}://{host}:{port}").parse().unwrap_or(dst)
}

/// `scheme://name:port` → `scheme://ip:port` (the resolver's first answer).
async fn resolve_host(dst: Uri) -> Result<Uri, BoxError> {
    let (Some(scheme), Some(host), Some(port)) = (dst.scheme_str(), dst.host(), dst.port_u16()) else {
        return Ok(dst);
    };
    if host.starts_with('[') || host.parse::<std::net::IpAddr>().is_ok() {
        return Ok(dst);
    }
    let addr = tokio::net::lookup_host((host, port))
        .await?
        .next()
        .ok_or_else(|| format!("{host} did not resolve"))?;
    let ip = match addr.ip() {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
    };
    Ok(format!("{scheme}://{ip}:{port}").parse()?)
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = BoxError;
    type Future = Connecting;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match &mut self.route {
            Route::Direct(c) => c.poll_ready(cx).map_err(Into::into),
            Route::Tunnel(c) => c.poll_ready(cx).map_err(Into::into),
            Route::Socks { socks, .. } => socks.poll_ready(cx).map_err(Into::into),
        }
    }

    fn call(&mut self, dst: Uri) -> Connecting {
        let limit = self.timeout_ms.load(Ordering::Relaxed);
        let connecting = self.route.call(dst);
        Box::pin(async move {
            match tokio::time::timeout(Duration::from_millis(limit), connecting).await {
                Ok(r) => r,
                Err(_) => Err(ConnectTimeout(limit).into()),
            }
        })
    }
}

impl Route {
    fn call(&mut self, dst: Uri) -> Connecting {
        use tower_service::Service as _;
        match self {
            Route::Direct(c) => {
                let f = c.call(dst);
                Box::pin(async move { f.await.map_err(Into::into) })
            }
            Route::Tunnel(c) => {
                let f = c.call(with_port(dst));
                Box::pin(async move { f.await.map_err(Into::into) })
            }
            Route::Socks {
                socks,
                local_dns: false,
            } => {
                let f = socks.call(with_port(dst));
                Box::pin(async move { f.await.map_err(Into::into) })
            }
            Route::Socks { socks, local_dns: true } => {
                // hyper-util's own local resolution blocks the runtime thread
                // (`to_socket_addrs`); resolve here instead and pass an address.
                let mut socks = socks.clone();
                let dst = with_port(dst);
                Box::pin(async move {
                    let dst = resolve_host(dst).await?;
                    socks.call(dst).await.map_err(Into::into)
                })
            }
        }
    }
}

pub struct ClientOptions<'a> {
    pub extra_ca_file: Option<&'a Path>,
    pub connect_timeout: Duration,
    pub pool_idle_timeout: Duration,
}

impl Default for ClientOptions<'_> {
    fn default() -> Self {
        Self {
            extra_ca_file: None,
            connect_timeout: Duration::from_secs(10),
            pool_idle_timeout: Duration::from_secs(90),
        }
    }
}

/// Every upstream client of a data plane: the direct one and one per proxy.
pub struct Upstreams {
    tls: rustls::ClientConfig,
    /// The connect timeout in force, in ms (`upstream.connect_timeout_ms`).
    connect_timeout_ms: Arc<AtomicU64>,
    pool_idle_timeout: Duration,
    /// The [`HttpVersion`] in force (its index), a live setting.
    version: AtomicU8,
    /// The direct client of each [`HttpVersion`] (by index): a change of
    /// version takes effect for the next request; connections of the other
    /// versions idle out.
    direct: [HttpClient; 3],
    /// One client per (version, proxy URL).
    proxied: Mutex<HashMap<(u8, String), HttpClient>>,
    /// relay's own HTTP/1.1 connections: direct, and per proxy URL.
    h1_direct: h1::Pool,
    h1_proxied: Mutex<HashMap<String, h1::Pool>>,
}

impl Upstreams {
    pub fn new(opts: &ClientOptions<'_>) -> Result<Self, ClientError> {
        let tls = tls_config(opts.extra_ca_file)?;
        let connect_timeout_ms = Arc::new(AtomicU64::new(
            u64::try_from(opts.connect_timeout.as_millis()).unwrap_or(u64::MAX),
        ));
        let h1_direct = h1::Pool::new(
            Connector {
                route: Route::Direct(tcp()),
                timeout_ms: connect_timeout_ms.clone(),
            },
            &tls,
            connect_timeout_ms.clone(),
            opts.pool_idle_timeout,
        );
        let direct = [HttpVersion::Auto, HttpVersion::Http1, HttpVersion::Http2].map(|v| {
            build_client(
                &tls,
                opts.pool_idle_timeout,
                v,
                Connector {
                    route: Route::Direct(tcp()),
                    timeout_ms: connect_timeout_ms.clone(),
                },
            )
        });
        Ok(Self {
            tls,
            connect_timeout_ms,
            pool_idle_timeout: opts.pool_idle_timeout,
            version: AtomicU8::new(HttpVersion::Auto.index()),
            direct,
            proxied: Mutex::new(HashMap::new()),
            h1_direct,
            h1_proxied: Mutex::new(HashMap::new()),
        })
    }

    /// Sets the connect timeout of every new connection (a live setting, set
    /// when a config starts serving).
    pub fn set_connect_timeout(&self, timeout: Duration) {
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        if self.connect_timeout_ms.load(Ordering::Relaxed) != ms {
            self.connect_timeout_ms.store(ms, Ordering::Relaxed);
        }
    }

    /// Sets the HTTP version of every request from now on (a live setting,
    /// set when a config starts serving).
    pub fn set_http_version(&self, version: HttpVersion) {
        self.version.store(version.index(), Ordering::Relaxed);
    }

    /// The HTTP version in force.
    pub fn http_version(&self) -> HttpVersion {
        HttpVersion::from_index(self.version.load(Ordering::Relaxed))
    }

    /// Sends `req` directly or through `proxy`. HTTP/1.1 (`http1`, and `auto` to a plain `http://`
    /// upstream) goes over relay's own connections ([`crate::h1`]); what may be HTTP/2 over hyper's
    /// client, where a request the upstream refused before processing it is sent again (up to
    /// [`REFUSED_STREAM_RETRIES`] times).
    pub fn request(
        &self,
        proxy: Option<&ProxySpec>,
        req: http::Request<Full<Bytes>>,
    ) -> impl Future<Output = UpstreamResult> + Send + '_ {
        let version = self.version.load(Ordering::Relaxed);
        let may_be_h2 = match HttpVersion::from_index(version) {
            HttpVersion::Http1 => false,
            HttpVersion::Http2 => true,
            HttpVersion::Auto => req.uri().scheme_str() == Some("https"),
        };
        // What the request future holds stays small (a proxied client is boxed, the direct one
        // borrowed): every future that awaits it is moved whole at least once.
        enum Via<'a> {
            Hyper(ClientRef<'a>, Box<Resend>),
            H1(h1::Pool),
        }
        let via = if may_be_h2 {
            let again = Resend::of(&req);
            let client = match proxy {
                None => ClientRef::Direct(&self.direct[usize::from(version.min(2))]),
                Some(proxy) => ClientRef::Proxied(Box::new(self.proxied(version, proxy))),
            };
            Via::Hyper(client, Box::new(again))
        } else {
            Via::H1(match proxy {
                None => self.h1_direct.clone(),
                Some(proxy) => self.h1_proxied(proxy),
            })
        };
        async move {
            match via {
                Via::H1(pool) => {
                    let (parts, body) = req.into_parts();
                    let body = http_body_util::BodyExt::collect(body)
                        .await
                        .map(|c| c.to_bytes())
                        .unwrap_or_default();
                    let resp = pool.send(parts, body).await?;
                    Ok(resp.map(UpstreamBody::H1))
                }
                Via::Hyper(client, again) => {
                    let client = match &client {
                        ClientRef::Direct(c) => *c,
                        ClientRef::Proxied(c) => &**c,
                    };
                    let mut answer = client.request(req).await;
                    let mut n = 0;
                    while n < REFUSED_STREAM_RETRIES && answer.as_ref().is_err_and(refused_stream) {
                        n += 1;
                        answer = client.request(again.request()).await;
                    }
                    Ok(answer?.map(UpstreamBody::Hyper))
                }
            }
        }
    }

    /// relay's own HTTP/1.1 pool through `proxy` (made on first use).
    fn h1_proxied(&self, proxy: &ProxySpec) -> h1::Pool {
        let mut map = self.h1_proxied.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(p) = map.get(&proxy.url) {
            return p.clone();
        }
        if map.len() >= MAX_PROXIED_CLIENTS {
            map.clear();
        }
        let connector = Connector {
            route: proxy_route(proxy),
            timeout_ms: self.connect_timeout_ms.clone(),
        };
        let pool = h1::Pool::new(
            connector,
            &self.tls,
            self.connect_timeout_ms.clone(),
            self.pool_idle_timeout,
        );
        map.insert(proxy.url.clone(), pool.clone());
        pool
    }

    /// The client of `proxy` for `version` (made on first use).
    fn proxied(&self, version: u8, proxy: &ProxySpec) -> HttpClient {
        let mut map = self.proxied.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (version, proxy.url.clone());
        if let Some(c) = map.get(&key) {
            return c.clone();
        }
        if map.len() >= MAX_PROXIED_CLIENTS {
            map.clear();
        }
        let route = proxy_route(proxy);
        let connector = Connector {
            route,
            timeout_ms: self.connect_timeout_ms.clone(),
        };
        let client = build_client(
            &self.tls,
            self.pool_idle_timeout,
            HttpVersion::from_index(version),
            connector,
        );
        map.insert(key, client.clone());
        client
    }
}

/// The hyper client a request goes through: the direct one, or a proxy's.
enum ClientRef<'a> {
    Direct(&'a HttpClient),
    Proxied(Box<HttpClient>),
}

/// What it takes to send a request again (its body is shared, not copied).
struct Resend {
    method: http::Method,
    uri: Uri,
    version: http::Version,
    headers: http::HeaderMap,
    body: Full<Bytes>,
}

impl Resend {
    fn of(req: &http::Request<Full<Bytes>>) -> Self {
        Self {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
            body: req.body().clone(),
        }
    }

    fn request(&self) -> http::Request<Full<Bytes>> {
        let mut r = http::Request::new(self.body.clone());
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.version_mut() = self.version;
        *r.headers_mut() = self.headers.clone();
        r
    }
}

/// The upstream refused the HTTP/2 stream before processing it (`REFUSED_STREAM`).
fn refused_stream(e: &hyper_util::client::legacy::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(h2) = c.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        cause = c.source();
    }
    false
}

/// The connector's route through `proxy`.
fn proxy_route(proxy: &ProxySpec) -> Route {
    let tcp = tcp();
    match proxy.kind {
        ProxyKind::Http => {
            let mut t = Tunnel::new(proxy.addr.clone(), tcp);
            if let Some((user, pass)) = &proxy.auth {
                use base64::Engine as _;
                let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
                if let Ok(v) = http::HeaderValue::from_str(&format!("Basic {token}")) {
                    t = t.with_auth(v);
                }
            }
            Route::Tunnel(t)
        }
        ProxyKind::Socks5 { remote_dns } => {
            let mut socks = SocksV5::new(proxy.addr.clone(), tcp);
            if let Some((user, pass)) = &proxy.auth {
                socks = socks.with_auth(user.clone(), pass.clone());
            }
            Route::Socks {
                socks,
                local_dns: !remote_dns,
            }
        }
    }
}

/// The TCP connector; the [`Connector`] around it bounds the whole connect.
fn tcp() -> HttpConnector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http
}

fn build_client(
    tls: &rustls::ClientConfig,
    pool_idle_timeout: Duration,
    version: HttpVersion,
    connector: Connector,
) -> HttpClient {
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls.clone())
        .https_or_http();
    let https = match version {
        HttpVersion::Auto => builder.enable_all_versions().wrap_connector(connector),
        HttpVersion::Http1 => builder.enable_http1().wrap_connector(connector),
        HttpVersion::Http2 => builder.enable_http2().wrap_connector(connector),
    };
    let mut b = Client::builder(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(pool_idle_timeout)
        .pool_max_idle_per_host(256)
        .http2_only(version == HttpVersion::Http2)
        .http2_adaptive_window(false)
        .http2_initial_stream_window_size(H2_STREAM_WINDOW)
        .http2_initial_connection_window_size(H2_CONNECTION_WINDOW)
        .http2_keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
        .http2_keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT)
        .http2_keep_alive_while_idle(true);
    b.build(https)
}

fn tls_config(extra_ca_file: Option<&Path>) -> Result<rustls::ClientConfig, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca_file {
        let err = |reason: String| ClientError::CaFile {
            path: path.display().to_string(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let mut n = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| err(e.to_string()))?;
            roots.add(cert).map_err(|e| err(e.to_string()))?;
            n += 1;
        }
        if n == 0 {
            return Err(err("no PEM certificate in it".into()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls_parse_with_defaults_and_decoded_credentials() {
        let p = ProxySpec::parse("socks5h://us%40er:p%3Ass@proxy.internal").unwrap();
        assert_eq!(p.kind, ProxyKind::Socks5 { remote_dns: true });
        assert_eq!(p.endpoint(), "proxy.internal:1080");
        assert_eq!(p.auth, Some(("us@er".to_string(), "p:ss".to_string())));

        let p = ProxySpec::parse("http://10.0.0.1:3128/").unwrap();
        assert_eq!(p.kind, ProxyKind::Http);
        assert_eq!(p.endpoint(), "10.0.0.1:3128");
        assert_eq!(p.auth, None);

        let p = ProxySpec::parse("SOCKS5://u@[::1]:9050").unwrap();
        assert_eq!(p.kind, ProxyKind::Socks5 { remote_dns: false });
        assert_eq!(p.endpoint(), "[::1]:9050");
        assert_eq!(p.auth, Some(("u".to_string(), String::new())));
    }

    #[test]
    fn a_proxy_password_never_shows_in_debug() {
        // Which URLs are refused, and how, is relay_proto::validate's (its tests).
        let p = ProxySpec::parse("http://user:secret@p:1").unwrap();
        assert!(!format!("{p:?}").contains("secret"));
    }

    #[test]
    fn proxied_destinations_get_their_scheme_port() {
        assert_eq!(with_port("http://h/".parse().unwrap()).port_u16(), Some(80));
        assert_eq!(with_port("https://h".parse().unwrap()).port_u16(), Some(443));
        assert_eq!(with_port("http://h:8080".parse().unwrap()).port_u16(), Some(8080));
    }
}
