//! Assembles the control plane's one gRPC listener: Admin, ConfigDiscovery,
//! UsageIngest, `grpc.health.v1` and server reflection (so `grpcurl` works),
//! in plain gRPC or TLS, optionally with data-plane client certificates (mTLS).

use crate::api::admin::{AdminApi, AdminService};
use crate::api::auth::Authenticator;
use crate::api::discovery::DiscoveryService;
use crate::api::usage::UsageService;
use crate::config::{ConfigError, ConfigPublisher};
use crate::crypto::MasterKey;
use crate::store::DynStore;
use std::future::Future;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// Largest gRPC message in either direction (full snapshots of big fleets).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("reflection: {0}")]
    Reflection(String),
    #[error("upstream HTTP client (probes, OAuth refresh): {0}")]
    Upstream(String),
    #[error(transparent)]
    Web(#[from] crate::web::WebError),
    #[error("web console listener {addr}: {source}")]
    WebListen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

#[derive(Debug, Clone)]
pub struct Options {
    /// This replica's name, recorded with each data plane it serves.
    pub replica: String,
    /// How often the config publisher polls the head (the `NOTIFY` hint aside).
    pub poll_interval: Duration,
    /// TLS on the listener (plain gRPC when `None`).
    pub tls: Option<ServerTls>,
    /// Most connections open at once on the listener (see `relay_net::listen`).
    pub max_connections: usize,
    /// Where keys' live counters are (Redis, or the standalone data plane's): `relayctl key show`
    /// shows them. None: not known here.
    pub limiter: Option<std::sync::Arc<relay_limits::Limiter>>,
    /// This replica's part in the leader election (`GetStatus` reports it). None: not known here.
    pub leadership: Option<crate::leader::Leadership>,
    /// Serve the web console (`crate::web`) on this address. None: no console.
    pub web: Option<std::net::SocketAddr>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            replica: hostname(),
            poll_interval: Duration::from_secs(1),
            tls: None,
            max_connections: 4096,
            limiter: None,
            leadership: None,
            web: None,
        }
    }
}

/// TLS for the gRPC listener, as PEM.
#[derive(Clone)]
pub struct ServerTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// When set (mTLS), data planes must present a client certificate issued by
    /// this CA and valid for the node id they claim (see `api::identity`).
    /// Operators' clients (relayctl) need no certificate: they use admin tokens.
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("client_ca", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "control-plane".to_string())
}

/// Aborts its tasks when dropped (when serving ends, however it ends).
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    store: DynStore,
    key: MasterKey,
    listener: TcpListener,
    opts: Options,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let publisher = ConfigPublisher::start(store.clone(), key.clone(), opts.poll_interval).await?;
    // Streams end when shutdown begins: tonic's graceful shutdown waits for
    // open connections, and a Watch stream never ends by itself.
    let (closing_tx, closing) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = closing_tx.send(true);
    };
    let client_certs = opts.tls.as_ref().is_some_and(|t| t.client_ca_pem.is_some());
    let tokens = crate::api::auth::TokenWatch::start(publisher.subscribe());
    let auth = Authenticator::new(store.clone(), key.clone())
        .with_client_certs(client_certs)
        .with_token_watch(tokens);
    let gate = crate::api::gate::GateLayer::new(auth.clone());
    let spend = std::sync::Arc::new(crate::spend::SpendCache::new(store.clone()));
    let upstreams = std::sync::Arc::new(
        relay_net::client::Upstreams::new(&Default::default()).map_err(|e| ServeError::Upstream(e.to_string()))?,
    );
    let prober = std::sync::Arc::new(crate::jobs::probe::Prober {
        store: store.clone(),
        key: key.clone(),
        upstreams: upstreams.clone(),
    });
    // The leader's jobs: OAuth refresh, probes of accounts in trouble and webhook notifications (retention is started by
    // the binary). They stop the moment this replica stops leading, and when serving ends.
    let jobs = match &opts.leadership {
        Some(l) => {
            let refresher = std::sync::Arc::new(crate::jobs::oauth_refresh::Refresher {
                store: store.clone(),
                key: key.clone(),
                endpoint: std::sync::Arc::new(crate::jobs::oauth_refresh::OAuthEndpoint {
                    client: relay_oauth::TokenClient::with_upstreams(upstreams.clone(), relay_oauth::DEFAULT_TIMEOUT),
                }),
                rejection_grace: crate::jobs::oauth_refresh::REJECTION_GRACE,
            });
            let probes = prober.clone();
            let notifier = std::sync::Arc::new(crate::notify::Notifier {
                store: store.clone(),
                key: key.clone(),
                upstreams: upstreams.clone(),
                spend: spend.clone(),
            });
            vec![
                crate::leader::run_while_leading(l, "oauth-refresh", move |term| refresher.clone().run(term)),
                crate::leader::run_while_leading(l, "account-probe", move |term| probes.clone().run(term)),
                crate::leader::run_while_leading(l, "notifications", move |term| notifier.clone().run(term)),
            ]
        }
        None => Vec::new(),
    };
    let _jobs = AbortOnDrop(jobs);
    let api = std::sync::Arc::new(
        AdminApi::new(store.clone(), key.clone(), spend.clone())
            .with_live(opts.limiter.clone())
            .with_prober(Some(prober.clone()))
            .with_replica(&opts.replica, opts.leadership.clone())
            .with_closing(closing.clone()),
    );
    // The web console: the same service layer, on its own listener, until shutdown begins.
    let _web = match opts.web {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::WebListen { addr, source })?;
            let console = crate::web::Console::new(api.clone(), store.clone(), key.clone())?;
            let mut closing = closing.clone();
            let task = tokio::spawn(async move {
                let stop = async move { crate::api::closed(&mut closing).await };
                if let Err(e) = crate::web::serve(listener, console, stop).await {
                    tracing::error!(error = %e, "the web console stopped");
                }
            });
            Some(AbortOnDrop(vec![task]))
        }
        None => None,
    };
    let admin = AdminService::new(api, auth.clone());
    let discovery = DiscoveryService::new(
        publisher.subscribe(),
        store.clone(),
        auth.clone(),
        opts.replica.clone(),
        closing.clone(),
    );
    let usage = UsageService::new(store.clone(), auth, closing, spend);

    let (reporter, health) = tonic_health::server::health_reporter();
    let routes = crate::api::routes(admin, discovery, usage, &reporter).await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(relay_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;

    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &opts.tls {
        let mut cfg = ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem));
        if let Some(ca) = &tls.client_ca_pem {
            cfg = cfg.client_ca_root(Certificate::from_pem(ca)).client_auth_optional(true);
        }
        builder = builder.tls_config(cfg)?;
    }
    builder
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // Streams a connection may have open at once (a data plane needs two or three).
        .max_concurrent_streams(Some(128))
        // One SERVER span per Admin call (a trace each); streams (Watch, Report) are traced per
        // update and per usage batch instead.
        .trace_fn(|req| {
            let path = req.uri().path();
            if path.starts_with("/relay.v1.Admin/") {
                tracing::info_span!(
                    "admin",
                    otel.name = %path.trim_start_matches('/'),
                    otel.kind = "server",
                    rpc.system = "grpc",
                    rpc.method = %path.rsplit('/').next().unwrap_or(""),
                )
            } else {
                tracing::Span::none()
            }
        })
        .layer(gate)
        .add_routes(routes.add_service(health).add_service(reflection))
        .serve_with_incoming_shutdown(
            relay_net::listen::incoming(listener, "grpc", opts.max_connections),
            shutdown,
        )
        .await?;
    drop(publisher);
    Ok(())
}
