//! `relay-data-plane`: parses flags, starts the data plane, stops it on SIGTERM.

use anyhow::Context;
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// jemalloc instead of glibc's allocator: measured in docs/benchmarks.md.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// relay's data plane: serves the Anthropic API with the config the control plane pushes.
#[derive(Debug, Parser)]
#[command(name = "relay-data-plane", version)]
struct Args {
    /// The control plane's gRPC URL (a Service or load balancer in front of the replicas), or the
    /// replicas' URLs separated by commas, in order of preference: each reconnection tries the one
    /// that answered last, then the next listed, so one replica down leaves the data plane
    /// connected to another.
    #[arg(long, env = "RELAY_CONTROL_PLANE", default_value = "http://127.0.0.1:50051")]
    control_plane: String,
    /// Where to serve the Anthropic API.
    #[arg(long, env = "RELAY_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// This data plane's name (as `relayctl proxies list` shows it); unique per
    /// data plane. Default: the host name (two data planes on one host need
    /// their own), or `data-plane-<random>` when there is none.
    #[arg(long, env = "RELAY_NODE_ID")]
    node_id: Option<String>,
    /// Config cache and usage spool.
    #[arg(long, env = "RELAY_DATA_DIR", default_value = "relay-data-plane")]
    data_dir: PathBuf,
    /// A file holding the data-plane token (else RELAY_DATAPLANE_TOKEN).
    #[arg(long, env = "RELAY_DATAPLANE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Extra CA certificates (PEM) to trust for upstream TLS.
    #[arg(long, env = "RELAY_EXTRA_CA_FILE")]
    extra_ca_file: Option<PathBuf>,
    /// CA (PEM) to verify an https:// control plane with (default: the Mozilla roots).
    #[arg(long, env = "RELAY_CONTROL_PLANE_CA")]
    control_plane_ca: Option<PathBuf>,
    /// mTLS: this data plane's client certificate (PEM), valid for its node id; needs --tls-key.
    #[arg(long, env = "RELAY_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "RELAY_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Seconds in-flight requests may run on after SIGTERM.
    #[arg(long, env = "RELAY_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    shutdown_grace_secs: u64,
    /// Seconds a client may take to send a whole request body (then 408).
    #[arg(long, env = "RELAY_BODY_READ_TIMEOUT_SECS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    body_read_timeout_secs: u64,
    /// Seconds a client may take to send a request head (HTTP/1), then the connection is closed.
    #[arg(long, env = "RELAY_HEADER_READ_TIMEOUT_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    header_read_timeout_secs: u64,
    /// Open client connections at most; new ones past it are closed at once.
    #[arg(long, env = "RELAY_MAX_CONNECTIONS", default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: u64,
    /// Allow plaintext gRPC (http://) to a control plane on another host. The config stream carries
    /// every upstream credential: use https:// unless the network is yours alone.
    #[arg(long, env = "RELAY_INSECURE_CONTROL_PLANE")]
    insecure_control_plane: bool,
    /// Megabytes of request bodies one API key may have in flight at once on this data plane
    /// (a body counts from when it is read until the upstream answered); more get 429.
    #[arg(long, env = "RELAY_MAX_BODY_MB_PER_KEY", default_value_t = 64, value_parser = clap::value_parser!(u64).range(32..=1_000_000))]
    max_body_mb_per_key: u64,
    /// Minutes without any control plane after which the data plane stops serving its last config
    /// (it may still hold keys revoked since); 0: serve it forever.
    #[arg(long, env = "RELAY_MAX_CONFIG_STALENESS_MINS", default_value_t = 1440)]
    max_config_staleness_mins: u64,
    /// Serve /metrics, /readyz and /healthz on this address instead of on the API listener (keep
    /// them off the public port).
    #[arg(long, env = "RELAY_OPS_LISTEN")]
    ops_listen: Option<SocketAddr>,
    /// Redis for fleet-wide key limits, budgets, account concurrency and sticky sessions
    /// (`redis://HOST:6379/0`, `rediss://` for TLS). Without it each data plane counts alone.
    #[arg(long, env = "RELAY_REDIS_URL")]
    redis_url: Option<String>,
    /// A file holding the Redis password (instead of one in the URL).
    #[arg(long, env = "RELAY_REDIS_PASSWORD_FILE", requires = "redis_url")]
    redis_password_file: Option<PathBuf>,
    /// Log format.
    #[arg(long, env = "RELAY_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

/// The host name (`HOSTNAME`, else the kernel's), else a random name: never
/// one fixed name that every data plane would share.
fn default_node_id() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty() && h != "localhost")
        .unwrap_or_else(|| format!("data-plane-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let telemetry = relay_runtime::init_logging(&args.log_format, "relay-data-plane")?;
    let token = match (&args.token_file, std::env::var("RELAY_DATAPLANE_TOKEN")) {
        (Some(f), _) => std::fs::read_to_string(f)
            .with_context(|| format!("reading {}", f.display()))?
            .trim()
            .to_string(),
        (None, Ok(t)) => t,
        (None, Err(_)) => anyhow::bail!(
            "no data-plane token: set RELAY_DATAPLANE_TOKEN or --token-file (create one with `relayctl token create NAME --role data-plane`)"
        ),
    };
    let metrics = relay_runtime::metrics::install_recorder().context("installing the metrics recorder")?;
    let node_id = args.node_id.clone().unwrap_or_else(default_node_id);
    let mut opts = relay_data_plane::Options::new(
        &args.control_plane,
        &token,
        args.listen,
        &node_id,
        args.data_dir.clone(),
    );
    opts.cache_key = std::env::var("RELAY_DP_CACHE_KEY").ok();
    opts.extra_ca_file = args.extra_ca_file.clone();
    let read =
        |p: &PathBuf, what: &str| std::fs::read(p).with_context(|| format!("reading the {what} {}", p.display()));
    opts.control_plane_tls.ca_pem = args
        .control_plane_ca
        .as_ref()
        .map(|p| read(p, "control-plane CA"))
        .transpose()?;
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        opts.control_plane_tls.identity = Some((read(cert, "TLS certificate")?, read(key, "TLS key")?));
    }
    opts.shutdown_grace = Duration::from_secs(args.shutdown_grace_secs);
    opts.body_read_timeout = Duration::from_secs(args.body_read_timeout_secs);
    opts.header_read_timeout = Duration::from_secs(args.header_read_timeout_secs);
    opts.max_connections = usize::try_from(args.max_connections).unwrap_or(usize::MAX);
    opts.insecure_control_plane = args.insecure_control_plane;
    opts.ops_listen = args.ops_listen;
    opts.max_config_staleness = (args.max_config_staleness_mins > 0)
        .then(|| Duration::from_secs(args.max_config_staleness_mins.saturating_mul(60)));
    opts.max_body_bytes_per_key = usize::try_from(args.max_body_mb_per_key << 20).unwrap_or(usize::MAX);
    opts.redis_url = args.redis_url.clone();
    opts.redis_password = args
        .redis_password_file
        .as_ref()
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("reading the Redis password file {}", p.display())))
        .transpose()?
        .map(|p| p.trim().to_string());
    if opts.redis_url.is_none() {
        tracing::warn!(
            "no --redis-url: key limits, budgets and account concurrency are counted by this data plane alone \
             (per replica), and sticky sessions do not follow a client to another replica"
        );
    }
    let dp = relay_data_plane::start(opts, Some(metrics))
        .await
        .context("starting the data plane")?;
    println!("relay: data plane {node_id} listening on {}", dp.local_addr());
    let key_file = if std::env::var_os("RELAY_DP_CACHE_KEY").is_some() {
        "RELAY_DP_CACHE_KEY".to_string()
    } else {
        args.data_dir.join("cache.key").display().to_string()
    };
    println!(
        "relay: data directory {}: the config cache (encrypted with {key_file}, mode 0600) and the usage spool \
         ({}); keep it across restarts",
        args.data_dir.display(),
        args.data_dir.join("spool").display()
    );
    if let Some(ops) = dp.ops_addr() {
        println!("relay: /metrics, /readyz and /healthz on http://{ops}");
    }
    relay_runtime::signal::shutdown().await;
    tracing::info!("SIGTERM: draining");
    dp.shutdown().await;
    telemetry.shutdown(Duration::from_secs(5)).await;
    Ok(())
}
