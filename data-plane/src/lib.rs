//! relay-data-plane: the stateless proxy that serves the Anthropic API from
//! the last config the control plane pushed, forwards to the chosen upstream
//! account, streams SSE back untouched while parsing usage on the side, and
//! reports every attempt's usage through a durable spool.
//!
//! [`start`] assembles it: the config holder (loaded from the disk cache when
//! there is one), the Watch client, the usage spool and its reporter, and the
//! HTTP listener. [`RunningDataPlane::shutdown`] stops it gracefully.

pub mod control;
pub mod errors;
pub mod proxy;
pub mod upstream;

// Shared with the control plane (standalone mode locks its data directory too).
pub use relay_net::listen;
pub use relay_runtime::datadir;

use control::cache::ConfigCache;
use control::spool::Spool;
use control::state::{ConfigHolder, ServingConfig};
use control::watch::{ControlPlaneLink, Watcher};
use hyper_util::rt::{TokioExecutor, TokioIo};
use proxy::usage::Pending;
use proxy::Proxy;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Clone)]
pub struct Options {
    /// The control plane's gRPC URL, e.g. `http://127.0.0.1:50051`.
    pub control_plane: String,
    /// The data-plane token (role `data-plane`).
    pub token: String,
    pub listen: SocketAddr,
    pub node_id: String,
    /// Config cache, its key, and the usage spool live here.
    pub data_dir: PathBuf,
    /// Base64 key for the config cache (else `data_dir/cache.key`).
    pub cache_key: Option<String>,
    /// Extra CA certificates (PEM) trusted for upstream TLS.
    pub extra_ca_file: Option<PathBuf>,
    /// TLS to the control plane (used with an `https://` URL).
    pub control_plane_tls: control::watch::ControlPlaneTls,
    /// How long in-flight requests may run on after shutdown begins.
    pub shutdown_grace: Duration,
    /// How long the usage spool may take to drain at shutdown.
    pub drain_deadline: Duration,
    /// How long a client may take to send a whole request body (then 408).
    pub body_read_timeout: Duration,
    /// How long a client may take to send a request head (HTTP/1; the
    /// connection is closed after).
    pub header_read_timeout: Duration,
    /// Open client connections at most; past it new ones are closed at once
    /// (`relay_client_connections_refused_total`).
    pub max_connections: usize,
    /// Allow plaintext gRPC (`http://`) to a control plane that is not on this host. The Watch
    /// stream carries every upstream credential: without this, only `https://` (or loopback) is
    /// accepted.
    pub insecure_control_plane: bool,
    /// Request-body bytes one key may have held at once (read, or kept for a retry).
    pub max_body_bytes_per_key: usize,
    /// Stop serving when no control plane has been heard from for this long (None: never).
    pub max_config_staleness: Option<Duration>,
    /// Serve `/metrics`, `/readyz` and `/healthz` here instead of on the API listener.
    pub ops_listen: Option<SocketAddr>,
    /// Redis for fleet-wide limits and sticky sessions (`redis://`, `rediss://`); None: this
    /// process counts alone.
    pub redis_url: Option<String>,
    /// Redis password (overrides one in the URL).
    pub redis_password: Option<String>,
    /// A limiter made by whoever embeds this data plane (standalone mode shares it with its
    /// control plane); `redis_url` is then not used.
    pub limiter: Option<Arc<relay_limits::Limiter>>,
}

impl std::fmt::Debug for Options {
    /// Everything but the token and the cache key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("control_plane", &self.control_plane)
            .field("listen", &self.listen)
            .field("node_id", &self.node_id)
            .field("data_dir", &self.data_dir)
            .field("extra_ca_file", &self.extra_ca_file)
            .field("control_plane_tls", &self.control_plane_tls)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("body_read_timeout", &self.body_read_timeout)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("max_connections", &self.max_connections)
            .field("insecure_control_plane", &self.insecure_control_plane)
            .field("max_body_bytes_per_key", &self.max_body_bytes_per_key)
            .field("max_config_staleness", &self.max_config_staleness)
            .field("ops_listen", &self.ops_listen)
            .field("redis", &self.redis_url.is_some())
            .finish_non_exhaustive()
    }
}

impl Options {
    pub fn new(control_plane: &str, token: &str, listen: SocketAddr, node_id: &str, data_dir: PathBuf) -> Self {
        Self {
            control_plane: control_plane.to_string(),
            token: token.to_string(),
            listen,
            node_id: node_id.to_string(),
            data_dir,
            cache_key: None,
            extra_ca_file: None,
            control_plane_tls: control::watch::ControlPlaneTls::default(),
            shutdown_grace: Duration::from_secs(30),
            drain_deadline: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(120),
            header_read_timeout: Duration::from_secs(30),
            max_connections: 20_000,
            insecure_control_plane: false,
            max_body_bytes_per_key: 64 << 20,
            max_config_staleness: Some(Duration::from_secs(24 * 3600)),
            ops_listen: None,
            redis_url: None,
            redis_password: None,
            limiter: None,
        }
    }
}

/// Checks each URL of a `--control-plane` value (one, or the replicas' separated by commas):
/// refuses a plaintext one whose host is not this machine, unless allowed.
pub fn check_control_plane_url(urls: &str, insecure_allowed: bool) -> Result<(), StartError> {
    control::watch::split_urls(urls).try_for_each(|url| check_one_control_plane_url(url, insecure_allowed))
}

fn check_one_control_plane_url(url: &str, insecure_allowed: bool) -> Result<(), StartError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| StartError::ControlPlaneUrl(e.to_string()))?;
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http") => {
            let host = uri.host().unwrap_or("").trim_start_matches('[').trim_end_matches(']');
            let loopback = host.eq_ignore_ascii_case("localhost")
                || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
            if loopback || insecure_allowed {
                if !loopback {
                    tracing::warn!(
                        control_plane = %url,
                        "plaintext gRPC to a control plane on another host (--insecure-control-plane): upstream credentials cross the network unencrypted"
                    );
                }
                Ok(())
            } else {
                Err(StartError::PlaintextControlPlane(host.to_string()))
            }
        }
        _ => Err(StartError::ControlPlaneUrl(format!(
            "{url}: expected http:// or https://"
        ))),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid control-plane URL: {0}")]
    ControlPlaneUrl(String),
    #[error(
        "the control plane at {0} would be reached over plaintext gRPC, which carries every upstream credential: \
         use https:// (the control plane's --tls-cert/--tls-key, and --control-plane-ca here), or pass \
         --insecure-control-plane on a network you trust"
    )]
    PlaintextControlPlane(String),
    #[error(transparent)]
    Cache(#[from] control::cache::CacheError),
    #[error(transparent)]
    Spool(#[from] control::spool::SpoolError),
    #[error(transparent)]
    Client(#[from] upstream::client::ClientError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    DataDir(#[from] datadir::LockError),
    #[error("invalid Redis URL (--redis-url): {0}")]
    Redis(String),
}

pub struct RunningDataPlane {
    local_addr: SocketAddr,
    ops_addr: Option<SocketAddr>,
    pub holder: Arc<ConfigHolder>,
    /// Concurrency slots and load per account.
    pub balancer: Arc<proxy::balance::Balancer>,
    /// Account health as this data plane sees it.
    pub health: Arc<proxy::health::HealthRegistry>,
    pub spool: Arc<Spool>,
    stop: watch::Sender<bool>,
    report_stop: watch::Sender<bool>,
    accepting: Arc<AtomicBool>,
    pending: Arc<Pending>,
    server: JoinHandle<()>,
    watcher: JoinHandle<()>,
    watch_failures: Arc<std::sync::atomic::AtomicU64>,
    reporter: JoinHandle<()>,
    grace: Duration,
    /// The data directory stays this process's until it stops.
    _dir_lock: datadir::DirLock,
}

/// Starts a data plane. With a cached config it is ready at once; without,
/// it answers 503 until the first config arrives.
pub async fn start(
    opts: Options,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
) -> Result<RunningDataPlane, StartError> {
    let dir_lock = datadir::lock(&opts.data_dir)?;
    let holder = Arc::new(ConfigHolder::default());
    let health = Arc::new(proxy::health::HealthRegistry::new(&opts.node_id));
    let upstreams = Arc::new(upstream::client::Upstreams::new(&upstream::client::ClientOptions {
        extra_ca_file: opts.extra_ca_file.as_deref(),
        ..Default::default()
    })?);
    let sessions = Arc::new(proxy::sticky::MemorySessions::default());
    let limiter = match &opts.limiter {
        Some(l) => l.clone(),
        None => relay_limits::Limiter::new(relay_limits::LimiterOptions {
            redis_url: opts.redis_url.clone(),
            redis_password: opts.redis_password.clone(),
            node_id: opts.node_id.clone(),
        })
        .map_err(|e| StartError::Redis(e.to_string()))?,
    };
    let session_store: Arc<dyn proxy::sticky::SessionStore> = if limiter.is_shared() {
        Arc::new(proxy::sticky::FleetSessions {
            local: sessions.clone(),
            limiter: limiter.clone(),
        })
    } else {
        sessions.clone()
    };
    // What every config that starts serving (cached or received) sets beyond itself.
    let group_cooling = Arc::new(proxy::groups::GroupCooling::default());
    // A proxied request holds two descriptors (its client's and its upstream's) while upstreams may
    // speak HTTP/1.1, one when they speak HTTP/2 only (`upstream.http_version`): the API
    // listener's cap follows the config.
    let conn_cap = listen::ConnCap::new(opts.max_connections, 2, listen::raise_fd_limit(), "api listener");
    let on_apply: control::watch::OnApply = {
        let conn_cap = conn_cap.clone();
        let health = health.clone();
        let group_cooling = group_cooling.clone();
        let upstreams = upstreams.clone();
        let sessions = sessions.clone();
        let limiter = limiter.clone();
        Arc::new(move |cfg: &ServingConfig| {
            health.sync(&cfg.resources);
            group_cooling.refresh(Some(cfg), chrono::Utc::now().timestamp_millis());
            upstreams.set_connect_timeout(cfg.policy.connect_timeout);
            upstreams.set_http_version(cfg.policy.http_version);
            conn_cap.set_fds_per_connection(match cfg.policy.http_version {
                relay_net::client::HttpVersion::Http2 => 1,
                _ => 2,
            });
            sessions.set_ttl(cfg.policy.sticky_ttl);
            limiter.configure(cfg.policy.limits_on_store_down, cfg.policy.limits_store_timeout);
        })
    };
    let cache = Arc::new(ConfigCache::open(&opts.data_dir, opts.cache_key.as_deref())?);
    let freshness = Arc::new(control::freshness::Freshness::load(
        Some(&opts.data_dir),
        cache.written_at_ms().unwrap_or(0),
    ));
    match cache.load() {
        Ok(Some((version, resources))) => match ServingConfig::build(version, resources) {
            Ok(cfg) => {
                tracing::info!(version = %version, "serving the cached config until the control plane answers");
                on_apply(&cfg);
                holder.swap(cfg);
            }
            Err(e) => tracing::warn!(error = %e, "the cached config does not validate; ignoring it"),
        },
        Ok(None) => tracing::info!("no cached config; not ready until the control plane answers"),
        Err(e) => tracing::warn!(error = %e, "cannot read the config cache; ignoring it"),
    }
    check_control_plane_url(&opts.control_plane, opts.insecure_control_plane)?;
    let link = ControlPlaneLink::new(&opts.control_plane, &opts.token, &opts.control_plane_tls)
        .map_err(|e| StartError::ControlPlaneUrl(e.to_string()))?;
    let spool = Arc::new(Spool::open(&opts.data_dir.join("spool"))?);
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: opts.listen,
            source,
        })?;
    let ops = match opts.ops_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Listen { addr, source })?,
        ),
        None => None,
    };
    let local_addr = listener.local_addr().map_err(|source| StartError::Listen {
        addr: opts.listen,
        source,
    })?;
    let (stop, stop_rx) = watch::channel(false);
    // The reporter stops last: after in-flight requests have written their usage.
    let (report_stop, report_stop_rx) = watch::channel(false);
    let accepting = Arc::new(AtomicBool::new(true));
    let pending = Arc::new(Pending::default());
    let node_id: Arc<str> = Arc::from(opts.node_id.as_str());

    let watch_failures = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let watcher = tokio::spawn(
        Watcher {
            link: link.clone(),
            node_id: opts.node_id.clone(),
            instance_id: uuid::Uuid::new_v4().simple().to_string(),
            holder: holder.clone(),
            cache: Some(cache),
            on_apply: Some(on_apply),
            failures: watch_failures.clone(),
            freshness: freshness.clone(),
        }
        .run(stop_rx.clone()),
    );
    let reporter = tokio::spawn(control::report::run_reporter(
        spool.clone(),
        control::report::link_connector(
            link.clone(),
            control::report::BearerToken::new(&link.token)
                .map_err(|_| StartError::ControlPlaneUrl("the data-plane token is not a valid header value".into()))?,
        ),
        control::report::ReporterConfig::new(&opts.node_id),
        report_stop_rx,
        opts.drain_deadline,
    ));
    let balancer = Arc::new(proxy::balance::Balancer::new());
    let spend = Arc::new(control::spend::SpendBook::default());
    tokio::spawn(control::spend::run(
        spend.clone(),
        limiter.clone(),
        link.clone(),
        holder.clone(),
        stop_rx.clone(),
    ));
    tokio::spawn(limiter.clone().run());
    tokio::spawn(control::quota_report::run(
        health.clone(),
        link.clone(),
        opts.node_id.clone(),
        stop_rx.clone(),
    ));
    let proxy = Arc::new(Proxy {
        holder: holder.clone(),
        upstreams,
        spool: spool.clone(),
        pending: pending.clone(),
        node_id,
        balancer: balancer.clone(),
        health: health.clone(),
        reporter: control::state_report::StateReporter::start(link.clone(), opts.node_id.clone()),
        sessions: session_store,
        queued: std::sync::atomic::AtomicUsize::new(0),
        metrics,
        accepting: accepting.clone(),
        body_read_timeout: opts.body_read_timeout,
        held_bodies: proxy::held::HeldBodies::new(opts.max_body_bytes_per_key),
        freshness: freshness.clone(),
        max_config_staleness: opts.max_config_staleness,
        ops_separate: opts.ops_listen.is_some(),
        limiter,
        spend,
        groups: group_cooling,
        captures: proxy::capture::Captures::start(link.clone(), Arc::from(opts.node_id.as_str())),
    });
    let limits = ConnLimits {
        header_read_timeout: opts.header_read_timeout,
        cap: conn_cap,
    };
    let ops_addr = match ops {
        Some(l) => {
            let addr = l.local_addr().ok();
            tokio::spawn(serve_ops(l, proxy.clone(), stop_rx.clone()));
            addr
        }
        None => None,
    };
    if proxy.metrics.is_none() {
        // Scraped from the process's own metrics listener: keep the state gauges current anyway.
        tokio::spawn(
            proxy
                .clone()
                .refresh_gauges_every(std::time::Duration::from_secs(5), stop_rx.clone()),
        );
    }
    let server = tokio::spawn(serve(listener, proxy, stop_rx, limits));
    Ok(RunningDataPlane {
        local_addr,
        ops_addr,
        holder,
        balancer,
        health,
        spool,
        stop,
        report_stop,
        accepting,
        pending,
        server,
        watcher,
        watch_failures,
        reporter,
        grace: opts.shutdown_grace,
        _dir_lock: dir_lock,
    })
}

/// The operations listener: `/metrics`, `/readyz`, `/healthz` only (HTTP/1.1, a few connections).
async fn serve_ops(listener: tokio::net::TcpListener, proxy: Arc<Proxy>, mut stop: watch::Receiver<bool>) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    let open = Arc::new(tokio::sync::Semaphore::new(64));
    loop {
        let stream = tokio::select! {
            s = listen::accept(&listener, "ops") => s,
            _ = stopped(&mut stop) => return,
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            metrics::counter!(relay_proto::metrics::CLIENT_CONNECTIONS_REFUSED_TOTAL, "listener" => "ops").increment(1);
            continue;
        };
        let proxy = proxy.clone();
        let svc = hyper::service::service_fn(move |req| proxy.clone().handle_ops(req));
        let conn = builder.serve_connection(TokioIo::new(stream), svc);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
}

/// What one client may hold of the listener, and how many may be connected at once.
struct ConnLimits {
    header_read_timeout: Duration,
    cap: Arc<listen::ConnCap>,
}

async fn serve(
    listener: tokio::net::TcpListener,
    proxy: Arc<Proxy>,
    mut stop: watch::Receiver<bool>,
    limits: ConnLimits,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // hyper's smallest read/write buffer cap (it grows to 16 KB otherwise, for
    // requests of a few hundred bytes): 12 KB less per open stream, measured.
    // Request heads are limited to 8 KB (431 beyond), like nginx's default, and
    // must arrive within the header-read timeout (a trickled head is closed;
    // hyper needs a timer for that, off without one).
    builder
        .http1()
        .max_buf_size(8192)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(hyper_util::rt::TokioTimer::new());
    loop {
        let (stream, _) = tokio::select! {
            s = listen::accept(&listener, "api") => (s, ()),
            _ = stopped(&mut stop) => break,
        };
        let Some(permit) = limits.cap.try_acquire() else {
            metrics::counter!(relay_proto::metrics::CLIENT_CONNECTIONS_REFUSED_TOTAL, "listener" => "api").increment(1);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        // Boxed: hyper keeps one slot the size of the service future per
        // connection for its whole life; a pointer there instead of the ~4 KB
        // request future saves that much per open stream (measured).
        let svc = hyper::service::service_fn(move |req| Box::pin(proxy.clone().handle(req)));
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    // In-flight requests and streams finish; the caller bounds how long.
    graceful.shutdown().await;
}

impl RunningDataPlane {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The operations listener's address, when there is one.
    pub fn ops_addr(&self) -> Option<SocketAddr> {
        self.ops_addr
    }

    /// How many config streams to the control plane have failed or been refused.
    pub fn watch_failures(&self) -> u64 {
        self.watch_failures.load(Ordering::Relaxed)
    }

    pub fn config_version(&self) -> Option<relay_proto::v1::ConfigVersion> {
        self.holder.get().map(|c| c.version)
    }

    /// Graceful stop: not ready, stop accepting, let in-flight requests finish
    /// (up to the grace period), write their usage, drain the spool to the
    /// control plane (up to the drain deadline), exit.
    pub async fn shutdown(self) {
        self.accepting.store(false, Ordering::Release);
        let _ = self.stop.send(true);
        let grace = self.grace;
        let mut server = self.server;
        if tokio::time::timeout(grace, &mut server).await.is_err() {
            tracing::warn!("in-flight requests still running after the grace period; closing them");
            server.abort();
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.pending.drained()).await;
        let _ = self.report_stop.send(true);
        let _ = self.reporter.await;
        self.watcher.abort();
    }
}

/// Resolves once `rx` holds `true` (or its sender is gone).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await.map(|_| ());
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    #[test]
    fn several_control_plane_urls_are_each_checked() {
        assert!(super::check_control_plane_url("http://127.0.0.1:50051, http://127.0.0.1:50052", false).is_ok());
        let e = super::check_control_plane_url("https://cp-1:50051,http://cp-2:50051", false).unwrap_err();
        assert!(
            matches!(&e, super::StartError::PlaintextControlPlane(h) if h == "cp-2"),
            "{e}"
        );
        assert!(super::check_control_plane_url("https://cp-1:50051,ftp://cp-2", false).is_err());
        assert!(super::check_control_plane_url(",", false).is_err(), "nothing listed");
        let urls: Vec<&str> = super::control::watch::split_urls(" https://a:1 ,, https://b:2 ").collect();
        assert_eq!(urls, ["https://a:1", "https://b:2"]);
    }

    #[test]
    fn plaintext_control_planes_only_on_this_host_or_when_allowed() {
        for ok in [
            "http://127.0.0.1:50051",
            "http://localhost:50051",
            "http://[::1]:50051",
            "https://cp.example:443",
        ] {
            assert!(super::check_control_plane_url(ok, false).is_ok(), "{ok}");
        }
        let e = super::check_control_plane_url("http://relay-control-plane.relay.svc:50051", false).unwrap_err();
        assert!(e.to_string().contains("--insecure-control-plane"), "{e}");
        assert!(matches!(e, super::StartError::PlaintextControlPlane(_)));
        assert!(super::check_control_plane_url("http://10.0.0.5:50051", true).is_ok());
        assert!(super::check_control_plane_url("ftp://x", true).is_err());
    }

    #[test]
    fn options_debug_hides_the_token_and_cache_key() {
        let mut o = super::Options::new(
            "http://cp:50051",
            "rat-SECRET-token",
            std::net::SocketAddr::from(([127, 0, 0, 1], 8080)),
            "dp-1",
            "d".into(),
        );
        o.cache_key = Some("CACHEKEY".into());
        let s = format!("{o:?}");
        assert!(
            s.contains("dp-1") && !s.contains("SECRET") && !s.contains("CACHEKEY"),
            "{s}"
        );
    }
}
