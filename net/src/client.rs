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

use bytes::Bytes;
use http::Uri;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::proxy::{SocksV5, Tunnel};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

pub type HttpClient = Client<HttpsConnector<Connector>, Full<Bytes>>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Past this many distinct proxy URLs (old ones stay after a config change),
/// the cache of proxied clients starts over.
const MAX_PROXIED_CLIENTS: usize = 1024;

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
    direct: HttpClient,
    proxied: Mutex<HashMap<String, HttpClient>>,
}

impl Upstreams {
    pub fn new(opts: &ClientOptions<'_>) -> Result<Self, ClientError> {
        let tls = tls_config(opts.extra_ca_file)?;
        let connect_timeout_ms = Arc::new(AtomicU64::new(
            u64::try_from(opts.connect_timeout.as_millis()).unwrap_or(u64::MAX),
        ));
        let direct = build_client(
            &tls,
            opts.pool_idle_timeout,
            Connector {
                route: Route::Direct(tcp()),
                timeout_ms: connect_timeout_ms.clone(),
            },
        );
        Ok(Self {
            tls,
            connect_timeout_ms,
            pool_idle_timeout: opts.pool_idle_timeout,
            direct,
            proxied: Mutex::new(HashMap::new()),
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

    /// Sends `req` directly or through `proxy`.
    pub fn request(&self, proxy: Option<&ProxySpec>, req: http::Request<Full<Bytes>>) -> ResponseFuture {
        let Some(proxy) = proxy else {
            return self.direct.request(req);
        };
        let mut map = self.proxied.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = map.get(&proxy.url) {
            return c.request(req);
        }
        if map.len() >= MAX_PROXIED_CLIENTS {
            map.clear();
        }
        let tcp = tcp();
        let route = match proxy.kind {
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
        };
        let connector = Connector {
            route,
            timeout_ms: self.connect_timeout_ms.clone(),
        };
        let client = build_client(&self.tls, self.pool_idle_timeout, connector);
        let fut = client.request(req);
        map.insert(proxy.url.clone(), client);
        fut
    }
}

/// The TCP connector; the [`Connector`] around it bounds the whole connect.
fn tcp() -> HttpConnector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http
}

fn build_client(tls: &rustls::ClientConfig, pool_idle_timeout: Duration, connector: Connector) -> HttpClient {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls.clone())
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(connector);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(pool_idle_timeout)
        .pool_max_idle_per_host(256)
        .build(https)
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
