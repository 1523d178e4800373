//! A throwaway etcd member for tests: `/usr/bin/etcd` (Debian's `etcd-server`, which
//! `scripts/test.sh` installs) on free ports in a temporary directory, stoppable and restartable
//! (same data, same ports) to test what relay does while etcd is down. A watchdog kills it when the
//! test process exits. `TestEtcd::start` uses `ETCD_ENDPOINTS` instead when that is set (then
//! `stop` and `restart` refuse); `TestEtcd::start_local` always starts its own.

use std::path::PathBuf;
use std::time::Duration;

pub struct TestEtcd {
    /// `http://127.0.0.1:PORT` (or the `ETCD_ENDPOINTS` list).
    pub endpoints: String,
    local: Option<Local>,
}

struct Local {
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    running: bool,
}

fn etcd_binary() -> anyhow::Result<PathBuf> {
    for p in ["/usr/bin/etcd", "/usr/local/bin/etcd"] {
        if std::path::Path::new(p).exists() {
            return Ok(p.into());
        }
    }
    anyhow::bail!("no etcd binary (apt-get install -y etcd-server, or set ETCD_ENDPOINTS)")
}

impl TestEtcd {
    /// The member named by `ETCD_ENDPOINTS`, else a local one.
    pub async fn start() -> anyhow::Result<Self> {
        match std::env::var("ETCD_ENDPOINTS") {
            Ok(e) if !e.trim().is_empty() => Ok(Self {
                endpoints: e.trim().to_string(),
                local: None,
            }),
            _ => Self::start_local().await,
        }
    }

    /// A member of its own, on free ports.
    pub async fn start_local() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("relay-test-etcd-").tempdir()?;
        let client_port = crate::free_port();
        let mut peer_port = crate::free_port();
        while peer_port == client_port {
            peer_port = crate::free_port();
        }
        let mut me = Self {
            endpoints: format!("http://127.0.0.1:{client_port}"),
            local: Some(Local {
                dir,
                client_port,
                peer_port,
                running: false,
            }),
        };
        me.launch().await?;
        Ok(me)
    }

    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let bin = etcd_binary()?;
        let Some(l) = self.local.as_mut() else {
            anyhow::bail!("ETCD_ENDPOINTS is set: this etcd is not ours to start or stop");
        };
        let d = l.dir.path().display().to_string();
        let (c, p) = (l.client_port, l.peer_port);
        let parent = std::process::id();
        // The watchdog kills etcd once this process is gone.
        let script = format!(
            "'{bin}' --name relay-test --data-dir '{d}/data' \
             --listen-client-urls http://127.0.0.1:{c} --advertise-client-urls http://127.0.0.1:{c} \
             --listen-peer-urls http://127.0.0.1:{p} --initial-advertise-peer-urls http://127.0.0.1:{p} \
             --initial-cluster relay-test=http://127.0.0.1:{p} >>'{d}/etcd.log' 2>&1 & e=$!; echo $e >'{d}/pid'; \
             while [ -d /proc/{parent} ] && kill -0 $e 2>/dev/null; do sleep 1; done; kill -9 $e 2>/dev/null",
            bin = bin.display()
        );
        let _ = std::fs::remove_file(l.dir.path().join("pid"));
        std::process::Command::new("sh")
            .args(["-c", &script])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        l.running = true;
        let endpoint = self.endpoints.clone();
        crate::wait_for(Duration::from_secs(20), "etcd to become healthy", || {
            let e = endpoint.clone();
            async move { healthy(&e).await.then_some(()) }
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e} (log: {d}/etcd.log)"))
    }

    /// Kills the member (SIGKILL, like a crash) and waits until its port stops answering.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let Some(l) = self.local.as_mut() else {
            anyhow::bail!("ETCD_ENDPOINTS is set: this etcd is not ours to stop");
        };
        let pid = std::fs::read_to_string(l.dir.path().join("pid"))?;
        std::process::Command::new("kill").args(["-9", pid.trim()]).status()?;
        l.running = false;
        let port = l.client_port;
        crate::wait_for(Duration::from_secs(10), "etcd to stop", || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
                .then_some(())
        })
        .await
    }

    /// Starts the stopped member again, with its data and on its ports.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if self.local.as_ref().is_some_and(|l| l.running) {
            self.stop().await?;
        }
        self.launch().await
    }
}

impl Drop for TestEtcd {
    fn drop(&mut self) {
        if let Some(l) = &self.local {
            if let Ok(pid) = std::fs::read_to_string(l.dir.path().join("pid")) {
                let _ = std::process::Command::new("kill").args(["-9", pid.trim()]).status();
            }
        }
    }
}

/// `GET /health` answers `"health":"true"`.
async fn healthy(endpoint: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await else {
        return false;
    };
    let req = format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).contains("\"health\":\"true\"")
}
