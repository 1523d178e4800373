//! Everything a run needs, started on loopback: two mock upstreams (fast, and
//! slow streams), a fresh Postgres database, a control plane on it, one data
//! plane, and nginx in front of the same mocks.

use crate::cp::{self, Admin, Setup};
use crate::procs::{self, Proc};
use anyhow::{Context, Result};
use base64::Engine;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::process::Command;

#[derive(Debug, Clone)]
pub struct EnvOpts {
    pub bins: PathBuf,
    pub nginx: PathBuf,
    /// redis-server, for scenario 8 (the limit check).
    pub redis_server: PathBuf,
    pub database_url: String,
    pub work: PathBuf,
    /// Delay between events of the slow-stream mock.
    pub slow_event_delay_ms: u64,
    /// The mocks serve HTTPS with ALPN `h2` (see [`TlsFiles`]).
    pub upstream_tls: bool,
    /// The `upstream.http_version` setting, if given.
    pub upstream_http_version: Option<String>,
}

/// A CA made for the run and the mocks' certificate for `localhost`, as PEM files in the work dir.
struct TlsFiles {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl TlsFiles {
    fn write(dir: &Path) -> Result<TlsFiles> {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "relay-bench CA");
        ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let issuer = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate()?)?;
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
        params.distinguished_name.push(rcgen::DnType::CommonName, "localhost");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        let files = TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("mock-cert.pem"),
            key: dir.join("mock-key.pem"),
        };
        std::fs::write(&files.ca, issuer.pem())?;
        std::fs::write(&files.cert, cert.pem())?;
        std::fs::write(&files.key, key.serialize_pem())?;
        Ok(files)
    }
}

pub struct Env {
    pub opts: EnvOpts,
    pub logs: PathBuf,
    pub mock: Proc,
    pub mock_addr: SocketAddr,
    pub slow: Proc,
    pub slow_addr: SocketAddr,
    pub nginx: Proc,
    pub nginx_addr: SocketAddr,
    pub nginx_slow_addr: SocketAddr,
    pub cp: Option<Proc>,
    pub cp_url: String,
    pub dp: Option<Proc>,
    pub dp_addr: SocketAddr,
    pub dp_dir: PathBuf,
    pub db: tokio_postgres::Client,
    pub db_name: String,
    pub setup: Setup,
    pub admin: Admin,
}

/// `url` with its database name replaced by `name`.
pub fn with_db(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[scheme_end..].rfind('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    format!("{base}/{name}{query}")
}

pub async fn pg(url: &str) -> Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to Postgres ({})", redact(url)))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(a)) if a > s => format!("{}://…@{}", &url[..s], &url[a + 1..]),
        _ => url.to_string(),
    }
}

async fn mock(bins: &Path, name: &str, extra: &[String], logs: &Path) -> Result<(Proc, SocketAddr)> {
    let mut cmd = Command::new(bins.join("relay-mock-upstream"));
    cmd.args(["--listen", "127.0.0.1:0", "--no-record"]).args(extra);
    let mut p = Proc::spawn(name, cmd, logs)?;
    let addr: SocketAddr = p
        .wait_line("listening on ", Duration::from_secs(20))
        .await?
        .parse()
        .context("mock address")?;
    Ok((p, addr))
}

pub fn data_plane_cmd(
    bins: &Path,
    cp_url: &str,
    listen: SocketAddr,
    dir: &Path,
    token: &str,
    node_id: &str,
) -> Command {
    let mut cmd = Command::new(bins.join("relay-data-plane"));
    cmd.arg("--control-plane")
        .arg(cp_url)
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--node-id")
        .arg(node_id)
        .arg("--data-dir")
        .arg(dir)
        .arg("--shutdown-grace-secs")
        .arg("5")
        .env("RELAY_DATAPLANE_TOKEN", token);
    cmd
}

pub async fn wait_ready(addr: SocketAddr, since: Instant, timeout: Duration) -> Result<Duration> {
    tokio::task::spawn_blocking(move || procs::wait_http_200(addr, "/readyz", since, timeout)).await?
}

/// Starts `relay-control-plane` on `db_url` with a fresh master key and admin token; returns
/// the process, its gRPC URL and the admin token.
pub async fn control_plane(bins: &Path, db_url: &str, logs: &Path) -> Result<(Proc, String, String)> {
    let (master_key, admin_token) = new_secrets();
    let (p, url) = control_plane_with(bins, db_url, logs, &master_key, &admin_token, "control-plane").await?;
    Ok((p, url, admin_token))
}

/// A fresh master key (base64) and admin token.
pub fn new_secrets() -> (String, String) {
    let mut key = [0u8; 32];
    rand::Rng::fill(&mut rand::thread_rng(), &mut key[..]);
    let master_key = base64::engine::general_purpose::STANDARD.encode(key);
    (master_key, format!("rat-bench-{}", uuid::Uuid::new_v4().simple()))
}

/// Starts `relay-control-plane` on `db_url` with these secrets (a restart on the same database);
/// its log is `logs/<name>.log`. Returns the process and its gRPC URL.
pub async fn control_plane_with(
    bins: &Path,
    db_url: &str,
    logs: &Path,
    master_key: &str,
    admin_token: &str,
    name: &str,
) -> Result<(Proc, String)> {
    let cp_port = procs::free_port()?;
    let mut cmd = Command::new(bins.join("relay-control-plane"));
    cmd.arg("--database-url")
        .arg(db_url)
        .arg("--listen")
        .arg(format!("127.0.0.1:{cp_port}"))
        .arg("--replica")
        .arg("bench-cp")
        // Scenario 5 opens up to 10,000 Watch streams (one connection each): above the default
        // of 4,096 the control plane closes new connections at once. Capped by its open-files limit.
        .arg("--max-connections")
        .arg("16384")
        .env("RELAY_MASTER_KEY", master_key)
        .env("RELAY_ADMIN_TOKEN", admin_token);
    let mut cp_p = Proc::spawn(name, cmd, logs)?;
    let cp_addr = cp_p.wait_line("listening on ", Duration::from_secs(120)).await?;
    Ok((cp_p, format!("http://{cp_addr}")))
}

impl Env {
    pub async fn start(opts: EnvOpts, run_id: &str) -> Result<Env> {
        let logs = opts.work.join("logs");
        std::fs::create_dir_all(&logs)?;
        let tls = if opts.upstream_tls {
            Some(TlsFiles::write(&opts.work)?)
        } else {
            None
        };
        let tls_args: Vec<String> = match &tls {
            Some(t) => vec![
                "--tls-cert".into(),
                t.cert.display().to_string(),
                "--tls-key".into(),
                t.key.display().to_string(),
            ],
            None => Vec::new(),
        };
        let (mock_p, mock_addr) = mock(&opts.bins, "mock", &tls_args, &logs).await?;
        let mut slow_args = vec!["--event-delay-ms".to_string(), opts.slow_event_delay_ms.to_string()];
        slow_args.extend(tls_args.iter().cloned());
        let (slow_p, slow_addr) = mock(&opts.bins, "mock-slow", &slow_args, &logs).await?;
        // With TLS the accounts name `localhost` (the certificate's name).
        let upstream_url = |a: SocketAddr| match &tls {
            Some(_) => format!("https://localhost:{}", a.port()),
            None => format!("http://{a}"),
        };

        // A fresh database for this run.
        let db_name = format!("relay_bench_{run_id}");
        let maint = pg(&opts.database_url).await?;
        maint
            .batch_execute(&format!("CREATE DATABASE {db_name}"))
            .await
            .context("creating the run's database")?;
        let db_url = with_db(&opts.database_url, &db_name);

        let (cp_p, cp_url, admin_token) = control_plane(&opts.bins, &db_url, &logs).await?;
        let mut admin = cp::admin(&cp_url, &admin_token).await?;
        let setup = cp::setup(&mut admin, &upstream_url(mock_addr), &upstream_url(slow_addr)).await?;
        if let Some(v) = &opts.upstream_http_version {
            admin
                .set_setting(relay_proto::v1::SetSettingRequest {
                    name: "upstream.http_version".into(),
                    value: v.clone(),
                })
                .await
                .context("setting upstream.http_version")?;
        }

        let dp_dir = opts.work.join("data-plane");
        std::fs::create_dir_all(&dp_dir)?;
        let dp_addr: SocketAddr = format!("127.0.0.1:{}", procs::free_port()?).parse()?;
        let mut dp_cmd = data_plane_cmd(&opts.bins, &cp_url, dp_addr, &dp_dir, &setup.dp_token, "bench-dp");
        if let Some(t) = &tls {
            dp_cmd.arg("--extra-ca-file").arg(&t.ca);
        }
        let dp_p = Proc::spawn("data-plane", dp_cmd, &logs)?;
        wait_ready(dp_addr, Instant::now(), Duration::from_secs(60))
            .await
            .context("waiting for the data plane to be ready")?;

        let nginx_addr: SocketAddr = format!("127.0.0.1:{}", procs::free_port()?).parse()?;
        let nginx_slow_addr: SocketAddr = format!("127.0.0.1:{}", procs::free_port()?).parse()?;
        let prefix = opts.work.join("nginx");
        let nofile = procs::nofile(std::process::id()).unwrap_or(1024);
        crate::nginx::write_config(
            &prefix,
            nginx_addr,
            mock_addr,
            nginx_slow_addr,
            slow_addr,
            nofile,
            tls.is_some(),
        )?;
        let nginx_p = crate::nginx::spawn(&opts.nginx, &prefix, &logs)?;
        let since = Instant::now();
        loop {
            if std::net::TcpStream::connect(nginx_addr).is_ok() && std::net::TcpStream::connect(nginx_slow_addr).is_ok()
            {
                break;
            }
            if since.elapsed() > Duration::from_secs(20) {
                anyhow::bail!("nginx did not listen; see {}", prefix.join("logs/error.log").display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        Ok(Env {
            opts,
            logs,
            mock: mock_p,
            mock_addr,
            slow: slow_p,
            slow_addr,
            nginx: nginx_p,
            nginx_addr,
            nginx_slow_addr,
            cp: Some(cp_p),
            cp_url,
            dp: Some(dp_p),
            dp_addr,
            dp_dir,
            db: pg(&db_url).await?,
            db_name,
            setup,
            admin,
        })
    }

    pub fn dp_pid(&self) -> Option<u32> {
        self.dp.as_ref().map(|p| p.pid)
    }

    pub fn cp_pid(&self) -> Option<u32> {
        self.cp.as_ref().map(|p| p.pid)
    }

    /// Stops everything and drops the run's database (unless `keep_db`).
    pub async fn shutdown(mut self, keep_db: bool) -> Result<()> {
        if let Some(dp) = self.dp.take() {
            dp.stop("TERM", Duration::from_secs(15)).await?;
        }
        if let Some(cp) = self.cp.take() {
            cp.stop("TERM", Duration::from_secs(10)).await?;
        }
        self.nginx.stop("QUIT", Duration::from_secs(10)).await?;
        self.mock.stop("TERM", Duration::from_secs(5)).await?;
        self.slow.stop("TERM", Duration::from_secs(5)).await?;
        drop(self.db);
        if !keep_db {
            let maint = pg(&self.opts.database_url).await?;
            maint
                .batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.db_name))
                .await
                .context("dropping the run's database")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_database_name() {
        assert_eq!(
            with_db("postgres://u:p@127.0.0.1:5432/postgres", "x"),
            "postgres://u:p@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_db("postgres://u@h/db?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
        assert_eq!(with_db("postgres://u@h", "x"), "postgres://u@h/x");
    }
}
