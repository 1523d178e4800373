//! `relay-control-plane`: parses flags, opens the store, bootstraps, serves; in standalone mode
//! it also starts the data plane in the same process. Everything else lives in the libraries
//! (`relay-control-plane`, `relay-data-plane`); this package is the one place both meet.

use anyhow::{bail, Context};
use clap::Parser;
use relay_control_plane::bootstrap::{self, AdminTokenSource};
use relay_control_plane::crypto::MasterKey;
use relay_control_plane::server::{self, Options};
use relay_control_plane::store::{postgres::PostgresStore, sqlite::SqliteStore, DynStore};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// jemalloc instead of glibc's allocator, as the data plane: the control plane's allocation-heavy
/// paths (a config update built and encoded for every Watch stream, usage batches decoded and
/// copied into Postgres) spent a fifth of their samples in glibc's malloc; measured in
/// docs/benchmarks.md. Standalone mode's in-process data plane gets it too.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// relay's control plane. `--standalone` runs on an embedded store with no
/// outside service; `--database-url postgres://…` is the distributed mode.
#[derive(Debug, Parser)]
#[command(name = "relay-control-plane", version)]
struct Args {
    /// Run on the embedded store in --data-dir (no Postgres, Redis or etcd needed).
    #[arg(long)]
    standalone: bool,
    /// Where standalone mode keeps its database, master key and first admin token.
    #[arg(long, env = "RELAY_DATA_DIR", default_value = "relay-data")]
    data_dir: PathBuf,
    /// The gRPC listener (Admin, ConfigDiscovery, UsageIngest, health, reflection).
    #[arg(long, env = "RELAY_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Most connections the gRPC listener holds at once (data planes, relayctl, probes); more are
    /// closed at once. Capped by the open-file limit.
    #[arg(long, env = "RELAY_MAX_CONNECTIONS", default_value_t = 4096)]
    max_connections: usize,
    /// Standalone mode: where the in-process data plane will listen.
    #[arg(long, env = "RELAY_PROXY_LISTEN", default_value = "127.0.0.1:8080")]
    proxy_listen: SocketAddr,
    /// Serve the web console (operators sign in with an admin token; key holders see their key's
    /// use at /me) on this address. Standalone default: 127.0.0.1:8081; distributed mode: off
    /// unless set (any replica may serve it).
    #[arg(long, env = "RELAY_WEB_LISTEN")]
    web_listen: Option<SocketAddr>,
    /// Postgres URL: the distributed control plane.
    #[arg(long, env = "RELAY_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Postgres connection pool size.
    #[arg(long, env = "RELAY_DB_MAX_CONNECTIONS", default_value_t = 16)]
    db_max_connections: usize,
    /// A file holding the base64 master key (else RELAY_MASTER_KEY; standalone
    /// generates data-dir/master.key when neither is set).
    #[arg(long, env = "RELAY_MASTER_KEY_FILE")]
    master_key_file: Option<PathBuf>,
    /// This replica's name, as `relayctl status` and `relayctl data-planes list` show it (default: host name).
    #[arg(long, env = "RELAY_REPLICA")]
    replica: Option<String>,
    /// How often to poll the config head besides the NOTIFY hint, in milliseconds.
    #[arg(long, env = "RELAY_POLL_INTERVAL_MS", default_value_t = 1000)]
    poll_interval_ms: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, env = "RELAY_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Redis the data planes count limits in (`redis://HOST:6379/0`): `relayctl key show` then
    /// shows keys' live counters. Not with --standalone (it counts in process).
    #[arg(long, env = "RELAY_REDIS_URL")]
    redis_url: Option<String>,
    /// A file holding the Redis password (instead of one in the URL).
    #[arg(long, env = "RELAY_REDIS_PASSWORD_FILE", requires = "redis_url")]
    redis_password_file: Option<PathBuf>,
    /// etcd members (`http://HOST:2379` or `https://HOST:2379`, comma-separated) to elect the
    /// leader replica with; without it the replicas elect one with a Postgres advisory lock.
    #[arg(long, env = "RELAY_ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// Prefix of relay's etcd keys (the leader key is PREFIX + "leader").
    #[arg(long, env = "RELAY_ETCD_PREFIX", default_value = "/relay/")]
    etcd_prefix: String,
    /// The etcd user to log in as when etcd's authentication is on (needs --etcd-password-file).
    #[arg(long, env = "RELAY_ETCD_USER", requires_all = ["etcd_endpoints", "etcd_password_file"])]
    etcd_user: Option<String>,
    /// A file holding the password of --etcd-user (one trailing newline is ignored).
    #[arg(long, env = "RELAY_ETCD_PASSWORD_FILE", requires = "etcd_user")]
    etcd_password_file: Option<PathBuf>,
    /// CA certificates (PEM) that sign etcd's server certificates, for https:// endpoints
    /// (default: the public web roots).
    #[arg(long, env = "RELAY_ETCD_CA_FILE", requires = "etcd_endpoints")]
    etcd_ca_file: Option<PathBuf>,
    /// A client certificate (PEM) for an etcd that requires one (`--client-cert-auth`); needs
    /// --etcd-key-file.
    #[arg(long, env = "RELAY_ETCD_CERT_FILE", requires_all = ["etcd_endpoints", "etcd_key_file"])]
    etcd_cert_file: Option<PathBuf>,
    /// The private key (PEM) of --etcd-cert-file.
    #[arg(long, env = "RELAY_ETCD_KEY_FILE", requires = "etcd_cert_file")]
    etcd_key_file: Option<PathBuf>,
    /// Leader lease TTL in seconds: a leader cut off steps down within it, a dead leader is
    /// replaced within it.
    #[arg(long, env = "RELAY_LEADER_TTL_SECS", default_value_t = 10)]
    leader_ttl_secs: u64,
    /// Log format.
    #[arg(long, env = "RELAY_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Serve gRPC over TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "RELAY_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "RELAY_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// mTLS: data planes must present a client certificate issued by this CA
    /// (PEM) and valid for their node id. Needs --tls-cert.
    #[arg(long, env = "RELAY_CLIENT_CA", requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// On SIGTERM/Ctrl-C: how long to wait for in-flight admin calls and usage
    /// batches before exiting, in seconds. Watch and Report streams end at once
    /// (data planes reconnect to another replica).
    #[arg(long, env = "RELAY_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    shutdown_grace_secs: u64,
}

fn read_pem(path: &std::path::Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading the {what} {}", path.display()))
}

fn master_key(args: &Args) -> anyhow::Result<MasterKey> {
    if let Ok(v) = std::env::var("RELAY_MASTER_KEY") {
        return MasterKey::from_base64(&v).context("RELAY_MASTER_KEY");
    }
    if let Some(f) = &args.master_key_file {
        relay_runtime::datadir::check_private(f).map_err(anyhow::Error::msg)?;
        let s = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        return MasterKey::from_base64(&s).with_context(|| format!("master key file {}", f.display()));
    }
    if args.standalone {
        let path = args.data_dir.join("master.key");
        let existed = path.exists();
        let key = MasterKey::load_or_create(&path).context("standalone master key")?;
        if existed {
            println!("relay: master key is in {}", path.display());
        } else {
            println!(
                "relay: generated the master key at {} (mode 0600): it encrypts the stored credentials, back it up",
                path.display()
            );
        }
        return Ok(key);
    }
    bail!("no master key: set RELAY_MASTER_KEY (32 bytes, base64) or --master-key-file")
}

/// Reads a file named by a flag, with the flag in the error.
fn read_flag_file(flag: &str, path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{flag} {}", path.display()))
}

/// The etcd election's options from the flags (`None` without --etcd-endpoints): the password and
/// the TLS files are read here.
fn etcd_options(args: &Args) -> anyhow::Result<Option<relay_control_plane::leader::EtcdOptions>> {
    use relay_control_plane::leader::{EtcdCredentials, EtcdOptions};
    if args.etcd_endpoints.is_empty() {
        return Ok(None);
    }
    let mut etcd = EtcdOptions::new(&args.etcd_endpoints.join(","));
    etcd.prefix = args.etcd_prefix.clone();
    if let (Some(user), Some(file)) = (&args.etcd_user, &args.etcd_password_file) {
        if user.is_empty() {
            bail!("--etcd-user is empty");
        }
        let bytes = read_flag_file("--etcd-password-file", file)?;
        let password = String::from_utf8(bytes)
            .map_err(|_| anyhow::anyhow!("--etcd-password-file {}: not UTF-8 text", file.display()))?;
        let password = password.strip_suffix('\n').unwrap_or(&password);
        let password = password.strip_suffix('\r').unwrap_or(password);
        if password.is_empty() {
            bail!("--etcd-password-file {} is empty", file.display());
        }
        etcd.credentials = Some(EtcdCredentials {
            user: user.clone(),
            password: password.to_string(),
        });
    }
    if let Some(ca) = &args.etcd_ca_file {
        etcd.tls.ca_pem = Some(read_flag_file("--etcd-ca-file", ca)?);
    }
    if let (Some(cert), Some(key)) = (&args.etcd_cert_file, &args.etcd_key_file) {
        etcd.tls.identity = Some((
            read_flag_file("--etcd-cert-file", cert)?,
            read_flag_file("--etcd-key-file", key)?,
        ));
    }
    if etcd.tls.is_set() {
        if let Some(plain) = etcd.endpoints.iter().find(|e| !e.starts_with("https://")) {
            bail!(
                "--etcd-endpoints {plain}: --etcd-ca-file / --etcd-cert-file are for https:// endpoints; \
                 give etcd's https:// client URL (or drop the TLS files)"
            );
        }
    }
    // The endpoints and TLS files are checked now, not once the store is open.
    let mut checked = etcd.clone();
    checked.ttl = Duration::from_secs(args.leader_ttl_secs);
    checked.validate().with_context(|| {
        let mut given = vec![format!("--etcd-endpoints {}", args.etcd_endpoints.join(","))];
        for (flag, file) in [
            ("--etcd-ca-file", &args.etcd_ca_file),
            ("--etcd-cert-file", &args.etcd_cert_file),
            ("--etcd-key-file", &args.etcd_key_file),
        ] {
            if let Some(f) = file {
                given.push(format!("{flag} {}", f.display()));
            }
        }
        given.push(format!("--leader-ttl-secs {}", args.leader_ttl_secs));
        given.join(", ")
    })?;
    Ok(Some(etcd))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let telemetry = relay_runtime::init_logging(&args.log_format, "relay-control-plane")?;
    if args.standalone && args.database_url.is_some() {
        bail!(
            "--standalone uses the embedded store; drop --database-url (or drop --standalone for the distributed mode)"
        );
    }
    if args.standalone && args.tls_cert.is_some() {
        bail!("TLS (--tls-cert, --client-ca) is for the distributed mode; standalone serves on loopback");
    }
    if args.standalone && args.redis_url.is_some() {
        bail!("--standalone counts limits in process; drop --redis-url (or run the distributed mode)");
    }
    if args.standalone && !args.etcd_endpoints.is_empty() {
        bail!("--standalone is its own leader; drop --etcd-endpoints (or run the distributed mode)");
    }
    if !args.standalone && args.database_url.is_none() {
        bail!("choose a mode: --standalone (embedded store) or --database-url postgres://… (distributed)");
    }
    // Read before anything is reached: a missing password or certificate file stops the start.
    let etcd = etcd_options(&args)?;
    // One recorder per process: in standalone mode the in-process data plane
    // serves it on its /metrics; --metrics-listen serves it on its own port.
    // Every metric's type and help from the catalogue are described in this process's one recorder
    // (the in-process data plane's too, in standalone mode).
    let metrics = if let Some(addr) = args.metrics_listen {
        relay_runtime::metrics::install_with_listener(addr).context("starting the metrics listener")?;
        None
    } else {
        Some(relay_runtime::metrics::install_recorder().context("installing the metrics recorder")?)
    };
    // The embedded store's directory is this process's alone.
    let _dir_lock = match &args.database_url {
        None => Some(relay_runtime::datadir::lock(&args.data_dir)?),
        Some(_) => None,
    };
    let key = master_key(&args)?;
    let store: DynStore = match &args.database_url {
        Some(url) => Arc::new(
            PostgresStore::connect(url, args.db_max_connections)
                .await
                .context("opening the Postgres store")?,
        ),
        None => {
            let db = args.data_dir.join("relay.db");
            let existed = db.exists();
            let store =
                SqliteStore::open(&db).with_context(|| format!("opening the embedded store {}", db.display()))?;
            println!(
                "relay: {} the embedded store at {} (mode 0600, with its -wal and -shm files): accounts, keys, usage; back it up",
                if existed { "opened" } else { "created" },
                db.display()
            );
            Arc::new(store)
        }
    };
    bootstrap::ensure_defaults(&store).await.context("creating defaults")?;
    let env_token = std::env::var("RELAY_ADMIN_TOKEN").ok();
    let data_dir = (args.standalone || args.database_url.is_none()).then_some(args.data_dir.as_path());
    match bootstrap::ensure_admin_token(&store, &key, env_token.as_deref(), data_dir)
        .await
        .context("bootstrapping the admin token")?
    {
        AdminTokenSource::Generated(p) => {
            println!(
                "relay: generated the first admin token and wrote it to {} (mode 0600)",
                p.display()
            );
            println!("relay:   export RELAY_ADMIN_TOKEN=\"$(cat {})\"", p.display());
        }
        AdminTokenSource::Existing(p) => println!("relay: admin token is in {}", p.display()),
        AdminTokenSource::Environment => println!("relay: RELAY_ADMIN_TOKEN is a registered admin token"),
        AdminTokenSource::EnvironmentRegistered => {
            println!("relay: registered RELAY_ADMIN_TOKEN as the first admin token")
        }
        AdminTokenSource::EnvironmentIgnored => {
            println!(
                "relay: RELAY_ADMIN_TOKEN is not an admin token of this deployment and admin tokens exist: \
                 it was not registered (a revoked token does not come back); create tokens with `relayctl token create`"
            );
            tracing::warn!("RELAY_ADMIN_TOKEN ignored: it is not a registered admin token");
        }
        AdminTokenSource::AlreadyPresent => {}
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let local = listener.local_addr()?;
    println!(
        "relay: control plane ({} store) listening on {local}",
        if args.standalone { "embedded" } else { "postgres" }
    );
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(server::ServerTls {
            cert_pem: read_pem(cert, "TLS certificate")?,
            key_pem: read_pem(key, "TLS key")?,
            client_ca_pem: args
                .client_ca
                .as_deref()
                .map(|p| read_pem(p, "client CA"))
                .transpose()?,
        }),
        _ => None,
    };
    let replica = args.replica.clone().unwrap_or_else(server::hostname);
    // Keys' live counters: the in-process data plane's (standalone), or Redis'.
    let limiter = if args.standalone || args.redis_url.is_some() {
        let password = args
            .redis_password_file
            .as_ref()
            .map(|p| {
                std::fs::read_to_string(p).with_context(|| format!("reading the Redis password file {}", p.display()))
            })
            .transpose()?
            .map(|p| p.trim().to_string());
        Some(
            relay_limits::Limiter::new(relay_limits::LimiterOptions {
                redis_url: args.redis_url.clone(),
                redis_password: password,
                node_id: format!("control-plane-{replica}"),
            })
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context("--redis-url")?,
        )
    } else {
        None
    };
    // Who runs the singleton jobs (usage retention, token refresh): one replica of the fleet.
    let leadership = match &args.database_url {
        None => relay_control_plane::leader::Leadership::standalone(&store, &replica).await?,
        Some(url) => {
            let ttl = Duration::from_secs(args.leader_ttl_secs);
            match etcd {
                None => relay_control_plane::leader::Leadership::postgres(store.clone(), &replica, url, ttl)?,
                Some(mut etcd) => {
                    etcd.ttl = ttl;
                    relay_control_plane::leader::Leadership::etcd(store.clone(), &replica, etcd)?
                }
            }
        }
    };
    println!("relay: leader election: {}", leadership.mechanism());
    let retention =
        relay_control_plane::retention::start(store.clone(), &leadership, relay_control_plane::retention::INTERVAL);
    let opts = Options {
        leadership: Some(leadership.clone()),
        replica,
        poll_interval: Duration::from_millis(args.poll_interval_ms.max(10)),
        tls,
        max_connections: relay_net::listen::fd_budget(
            args.max_connections,
            1,
            relay_net::listen::raise_fd_limit(),
            "control-plane listener",
        ),
        limiter: limiter.clone(),
        web: args
            .web_listen
            .or_else(|| args.standalone.then(|| SocketAddr::from(([127, 0, 0, 1], 8081)))),
    };
    if let Some(web) = opts.web {
        println!("relay: web console on http://{web} (sign in with an admin token; key holders: http://{web}/me)");
    }
    let dp_token = if args.standalone {
        Some(
            bootstrap::standalone_data_plane_token(&store, &key)
                .await
                .context("creating the in-process data plane's token")?,
        )
    } else {
        None
    };
    let (stop_cp, cp_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut cp = tokio::spawn(server::serve(store, key, listener, opts, async {
        let _ = cp_stopped.await;
    }));
    let dp = match dp_token {
        Some(token) => {
            let mut dp_opts = relay_data_plane::Options::new(
                &format!("http://{local}"),
                &token,
                args.proxy_listen,
                "standalone",
                args.data_dir.join("data-plane"),
            );
            dp_opts.limiter = limiter.clone();
            let dp = relay_data_plane::start(dp_opts, metrics)
                .await
                .context("starting the in-process data plane")?;
            println!(
                "relay: data plane (in-process) serving the Anthropic API on http://{}; its usage spool and config cache are in {}",
                dp.local_addr(),
                args.data_dir.join("data-plane").display()
            );
            Some(dp)
        }
        None => None,
    };
    let ended_early = tokio::select! {
        _ = relay_runtime::signal::shutdown() => {
            tracing::info!("shutting down");
            None
        }
        r = &mut cp => Some(r),
    };
    // The data plane first: it drains its usage into the control plane.
    if let Some(dp) = dp {
        dp.shutdown().await;
    }
    // Hand the singleton jobs over at once (revokes the etcd lease, releases the lock).
    retention.abort();
    leadership.shutdown().await;
    let _ = stop_cp.send(());
    let result = match ended_early {
        Some(r) => r,
        None => match tokio::time::timeout(Duration::from_secs(args.shutdown_grace_secs), &mut cp).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!(
                    grace_secs = args.shutdown_grace_secs,
                    "requests still in flight after the shutdown grace period; exiting"
                );
                cp.abort();
                telemetry.shutdown(Duration::from_secs(5)).await;
                return Ok(());
            }
        },
    };
    telemetry.shutdown(Duration::from_secs(5)).await;
    result.context("control plane task")?.context("serving")?;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    /// Standalone mode is assembled here and nowhere else: the control-plane library (and
    /// relay-oauth, which it and relayctl use) never depend on the data plane.
    #[test]
    fn only_this_package_depends_on_both_planes() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        for manifest in [
            "control-plane/Cargo.toml",
            "oauth/Cargo.toml",
            "net/Cargo.toml",
            "runtime/Cargo.toml",
        ] {
            let text = std::fs::read_to_string(root.join(manifest)).unwrap();
            assert!(
                !text.lines().any(|l| l.trim_start().starts_with("relay-data-plane")),
                "{manifest} depends on relay-data-plane"
            );
        }
    }
}
