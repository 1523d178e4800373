//! relay-test-support: what relay's tests share. Fresh Postgres databases per
//! test, free ports, child processes, and waiting for a condition instead of
//! sleeping, outbound proxies (`proxy`: HTTP CONNECT and SOCKS5), throwaway etcd members (`etcd`),
//! and, with the `control-plane` feature, the one in-process control plane (`control_plane`).
//!
//! The Postgres server is the one named by `DATABASE_URL`; else a local server
//! on 127.0.0.1:5432 when one answers; else an ephemeral server this process
//! starts itself (initdb into a temporary directory, trust auth, fsync off),
//! which a watchdog stops and deletes when the test process exits. The README's
//! test command (`scripts/test.sh`) installs PostgreSQL when it is missing and
//! exports `DATABASE_URL`. `RELAY_TEST_PG=ephemeral` forces the ephemeral server.

#[cfg(feature = "control-plane")]
pub mod control_plane;
pub mod etcd;
pub mod partition;
pub mod proxy;

use std::future::Future;
use std::time::Duration;

/// A database created for one test and dropped (`WITH (FORCE)`) when this value is dropped.
pub struct TestDb {
    pub url: String,
    admin_url: String,
    name: String,
}

const LOCAL_DEFAULT: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The server tests run against (see the crate doc); resolved once per process.
pub fn server_url() -> String {
    static URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    URL.get_or_init(|| {
        let force_ephemeral = std::env::var("RELAY_TEST_PG").is_ok_and(|v| v == "ephemeral");
        if let (Ok(u), false) = (std::env::var("DATABASE_URL"), force_ephemeral) {
            return u;
        }
        let local = std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], 5432)),
            std::time::Duration::from_millis(300),
        );
        if local.is_ok() && !force_ephemeral {
            return LOCAL_DEFAULT.to_string();
        }
        match start_ephemeral_postgres() {
            Ok(url) => url,
            Err(e) => {
                eprintln!("relay-test-support: cannot start an ephemeral Postgres ({e}); set DATABASE_URL or run scripts/test.sh");
                LOCAL_DEFAULT.to_string()
            }
        }
    })
    .clone()
}

/// The directory holding `initdb` and `postgres`.
fn postgres_bindir() -> anyhow::Result<std::path::PathBuf> {
    if let Ok(out) = std::process::Command::new("pg_config").arg("--bindir").output() {
        let dir = std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    let mut found: Vec<std::path::PathBuf> = std::fs::read_dir("/usr/lib/postgresql")?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort();
    found
        .pop()
        .ok_or_else(|| anyhow::anyhow!("no PostgreSQL server binaries found (apt-get install postgresql)"))
}

/// Starts a throwaway server; returns its URL. Runs as `postgres` when we are root.
fn start_ephemeral_postgres() -> anyhow::Result<String> {
    let port = start_postgres_server("pg", &[], "")?;
    Ok(format!("postgres://postgres@127.0.0.1:{port}/postgres"))
}

/// Starts a throwaway Postgres server that requires TLS with this certificate chain and key
/// (PEM) on 127.0.0.1 (plain connections are refused); returns its port. Stopped and deleted
/// when this process exits.
pub fn start_tls_postgres(cert_pem: &str, key_pem: &str) -> anyhow::Result<u16> {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let tag = format!("pgtls-{}", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    start_postgres_server(
        &tag,
        &[("server.crt", cert_pem), ("server.key", key_pem)],
        "-c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key",
    )
}

/// initdb + postgres in a temporary directory; `files` are written into the data directory
/// (mode 0600, owned by the server's user); `extra` are more server options. Returns the port.
fn start_postgres_server(tag: &str, files: &[(&str, &str)], extra: &str) -> anyhow::Result<u16> {
    use std::process::Command;
    let bin = postgres_bindir()?;
    let dir = std::env::temp_dir().join(format!("relay-test-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let as_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false);
    let run_as = |cmd: &str| -> Command {
        if as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", "sh", "-c", cmd]);
            c
        } else {
            let mut c = Command::new("sh");
            c.args(["-c", cmd]);
            c
        }
    };
    if as_root {
        Command::new("chown").args(["-R", "postgres"]).arg(&dir).status()?;
    }
    let d = dir.display();
    let b = bin.display();
    let init = run_as(&format!(
        "'{b}/initdb' -D '{d}/data' -U postgres --auth=trust -E UTF8 >'{d}/initdb.log' 2>&1"
    ))
    .status()?;
    anyhow::ensure!(init.success(), "initdb failed (see {d}/initdb.log)");
    for (name, contents) in files {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("data").join(name);
        std::fs::write(&path, contents)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        if as_root {
            Command::new("chown").arg("postgres").arg(&path).status()?;
        }
    }
    if !files.is_empty() || !extra.is_empty() {
        // Only TLS connections over TCP (a server with extra options is a TLS test's).
        std::fs::write(
            dir.join("data").join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n",
        )?;
    }
    let port = free_port();
    let parent = std::process::id();
    // The watchdog stops and removes the server once this process is gone.
    let script = format!(
        "'{b}/postgres' -D '{d}/data' -p {port} -k '{d}' -c listen_addresses=127.0.0.1 -c fsync=off \
         -c synchronous_commit=off -c max_connections=300 {extra} >'{d}/postgres.log' 2>&1 & pg=$!; \
         while [ -d /proc/{parent} ] && kill -0 $pg 2>/dev/null; do sleep 1; done; \
         kill -INT $pg 2>/dev/null; wait $pg; rm -rf '{d}'"
    );
    run_as(&script)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "ephemeral Postgres did not start (see {d}/postgres.log)"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Ok(port)
}

fn with_database(url: &str, db: &str) -> anyhow::Result<String> {
    // Replace the path component of a postgres:// URL.
    let (head, tail) = url
        .split_once("://")
        .ok_or_else(|| anyhow::anyhow!("DATABASE_URL must be a postgres:// URL"))?;
    let (authority, rest) = match tail.find('/') {
        Some(i) => (&tail[..i], &tail[i..]),
        None => (tail, ""),
    };
    let query = rest.find('?').map(|i| &rest[i..]).unwrap_or("");
    Ok(format!("{head}://{authority}/{db}{query}"))
}

async fn admin_client(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.map_err(|e| {
        anyhow::anyhow!("cannot connect to the test Postgres at {url}: {e} (set DATABASE_URL or run scripts/test.sh)")
    })?;
    tokio::spawn(conn);
    Ok(client)
}

impl TestDb {
    pub async fn new() -> anyhow::Result<Self> {
        let admin_url = server_url();
        let name = format!("relay_test_{}", uuid::Uuid::new_v4().simple());
        let client = admin_client(&admin_url).await?;
        client.batch_execute(&format!("CREATE DATABASE {name}")).await?;
        Ok(Self {
            url: with_database(&admin_url, &name)?,
            admin_url,
            name,
        })
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop may run inside a runtime: do the cleanup on a thread of its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            rt.block_on(async {
                if let Ok(c) = admin_client(&admin_url).await {
                    let _ = c
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// A TCP port that was free a moment ago on 127.0.0.1.
///
/// Taken from 10000..20000, below the kernel's ephemeral range (32768 and up) and below the
/// fleet tests' blocks (20000 and up): a port the kernel hands out (`bind(0)`) can be taken by
/// any outgoing connection between this check and the test's own bind, which made tests fail
/// with "address in use" under load. Each process walks the range from its own starting point,
/// so one process never returns a port twice and two processes rarely meet.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::OnceLock;
    const LOW: u32 = 10_000;
    const SPAN: u32 = 10_000;
    // A stride coprime with SPAN visits every port of the range once.
    const STRIDE: u32 = 7_919;
    static SEED: OnceLock<u32> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = *SEED.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        std::process::id().wrapping_mul(2_654_435_761) ^ nanos
    });
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = LOW + seed.wrapping_add(n.wrapping_mul(STRIDE)) % SPAN;
        let port = port as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// Polls `check` every 20 ms until it returns `Some`, or fails after `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A binary of this workspace, next to the test executable
/// (`target/<profile>/NAME`). `cargo test --workspace` (and `scripts/test.sh`)
/// build every binary before the tests run.
pub fn workspace_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|d| if d.ends_with("deps") { d.parent() } else { Some(d) })
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    let path = dir.join(name);
    if !path.exists() {
        build_workspace_bins();
    }
    path
}

/// `cargo test` builds only the binaries of the package under test; tests that spawn another
/// package's binary build them all once, here, when one is missing.
fn build_workspace_bins() {
    static BUILT: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut built = BUILT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if *built {
        return;
    }
    *built = true;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = std::process::Command::new(cargo)
        .args(["build", "--workspace", "--bins", "--quiet"])
        .current_dir(workspace)
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        eprintln!("building the workspace binaries failed: {status:?}");
    }
}

/// A child process that is killed when dropped, with its output in a log file.
pub struct Proc {
    child: std::process::Child,
    pub log: std::path::PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(mut cmd: std::process::Command, log: &std::path::Path) -> anyhow::Result<Self> {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let err = out.try_clone()?;
        cmd.stdout(out).stderr(err).stdin(std::process::Stdio::null());
        let child = cmd.spawn().map_err(|e| {
            anyhow::anyhow!(
                "cannot start {:?}: {e} (run `cargo build --workspace` first)",
                cmd.get_program()
            )
        })?;
        Ok(Self {
            child,
            log: log.to_path_buf(),
        })
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Whether it has exited, and how.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGKILL and waits.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn database_url_rewrite() {
        assert_eq!(
            with_database("postgres://u:p@h:5432/postgres?sslmode=disable", "x").unwrap(),
            "postgres://u:p@h:5432/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "x").unwrap(), "postgres://h/x");
    }
}
