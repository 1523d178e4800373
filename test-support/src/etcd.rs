//! A throwaway etcd member for tests: `/usr/bin/etcd` (Debian's `etcd-server`, which
//! `scripts/test.sh` installs) on free ports in a temporary directory, stoppable and restartable
//! (same data, same ports) to test what relay does while etcd is down. A watchdog kills it when the
//! test process exits. `TestEtcd::start` uses `ETCD_ENDPOINTS` instead when that is set (then
//! `stop` and `restart` refuse); `TestEtcd::start_local` always starts its own, and
//! `TestEtcd::start_with` one with TLS on its client port and/or short-lived auth tokens (a second,
//! plain-HTTP client port, `admin`, is for the test's own setup calls such as `enable_auth`).

use std::path::PathBuf;
use std::time::Duration;

pub struct TestEtcd {
    /// `http://127.0.0.1:PORT` (or the `ETCD_ENDPOINTS` list); `https://localhost:PORT` with TLS.
    pub endpoints: String,
    /// A plain `http://127.0.0.1:PORT` client URL of the same member, for setup calls.
    pub admin: String,
    local: Option<Local>,
}

struct Local {
    dir: tempfile::TempDir,
    client_port: u16,
    admin_port: u16,
    peer_port: u16,
    running: bool,
    setup: EtcdSetup,
}

/// How a local member is started.
#[derive(Debug, Clone, Default)]
pub struct EtcdSetup {
    /// `--auth-token simple --auth-token-ttl N`: an auth token unused for N seconds expires.
    pub auth_token_ttl_secs: Option<u32>,
    /// The client port speaks TLS with this certificate.
    pub tls: Option<ServerTls>,
}

/// etcd's server certificate (PEM; it must allow client auth too when `client_ca_pem` is set: the
/// gateway inside etcd presents it to etcd's own gRPC server).
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
    /// `--client-cert-auth --trusted-ca-file`: TLS clients must show a certificate this CA signed.
    pub client_ca_pem: Option<String>,
}

/// etcd's root user's password once `enable_auth` has run.
pub const ROOT_PASSWORD: &str = "root-secret";

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
                admin: e.trim().split(',').next().unwrap_or_default().to_string(),
                local: None,
            }),
            _ => Self::start_local().await,
        }
    }

    /// A member of its own, on free ports.
    pub async fn start_local() -> anyhow::Result<Self> {
        Self::start_with(EtcdSetup::default()).await
    }

    /// A member of its own, started as `setup` says.
    pub async fn start_with(setup: EtcdSetup) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("relay-test-etcd-").tempdir()?;
        let mut ports = Vec::new();
        while ports.len() < 3 {
            let p = crate::free_port();
            if !ports.contains(&p) {
                ports.push(p);
            }
        }
        let (client_port, admin_port, peer_port) = (ports[0], ports[1], ports[2]);
        if let Some(tls) = &setup.tls {
            std::fs::write(dir.path().join("server.pem"), &tls.cert_pem)?;
            std::fs::write(dir.path().join("server-key.pem"), &tls.key_pem)?;
            if let Some(ca) = &tls.client_ca_pem {
                std::fs::write(dir.path().join("client-ca.pem"), ca)?;
            }
        }
        let endpoints = match &setup.tls {
            Some(_) => format!("https://localhost:{client_port}"),
            None => format!("http://127.0.0.1:{client_port}"),
        };
        let mut me = Self {
            endpoints,
            admin: format!("http://127.0.0.1:{admin_port}"),
            local: Some(Local {
                dir,
                client_port,
                admin_port,
                peer_port,
                running: false,
                setup,
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
        let (c, a, p) = (l.client_port, l.admin_port, l.peer_port);
        let parent = std::process::id();
        let mut extra = String::new();
        let client = match &l.setup.tls {
            Some(tls) => {
                extra.push_str(&format!(
                    " --cert-file '{d}/server.pem' --key-file '{d}/server-key.pem'"
                ));
                if tls.client_ca_pem.is_some() {
                    extra.push_str(&format!(" --client-cert-auth --trusted-ca-file '{d}/client-ca.pem'"));
                }
                format!("https://127.0.0.1:{c}")
            }
            None => format!("http://127.0.0.1:{c}"),
        };
        if let Some(ttl) = l.setup.auth_token_ttl_secs {
            extra.push_str(&format!(" --auth-token simple --auth-token-ttl {ttl}"));
        }
        // The watchdog kills etcd once this process is gone.
        let script = format!(
            "'{bin}' --name relay-test --data-dir '{d}/data'{extra} \
             --listen-client-urls {client},http://127.0.0.1:{a} --advertise-client-urls {client} \
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
        let endpoint = self.admin.clone();
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

impl TestEtcd {
    /// POSTs `body` (JSON) to the gateway's `path` on the plain admin port, with a token when
    /// given: etcd's answer, or its error.
    pub async fn admin_call(
        &self,
        path: &str,
        body: serde_json::Value,
        token: Option<&str>,
    ) -> anyhow::Result<serde_json::Value> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self
            .admin
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(&addr)).await??;
        let body = body.to_string();
        let auth = token.map(|t| format!("Authorization: {t}\r\n")).unwrap_or_default();
        let req = format!(
            "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await?;
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await??;
        let text = String::from_utf8_lossy(&out);
        let (_, json) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow::anyhow!("etcd {path}: no HTTP answer: {text}"))?;
        let v: serde_json::Value = serde_json::from_str(json.trim())?;
        if v.get("error").is_some_and(|e| !e.is_null()) {
            anyhow::bail!("etcd {path}: {v}");
        }
        Ok(v)
    }

    /// A token of etcd's root user (after `enable_auth`).
    pub async fn root_token(&self) -> anyhow::Result<String> {
        let v = self
            .admin_call(
                "/v3/auth/authenticate",
                serde_json::json!({"name": "root", "password": ROOT_PASSWORD}),
                None,
            )
            .await?;
        v["token"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow::anyhow!("no token: {v}"))
    }

    /// Turns etcd's authentication on: a `root` user (`ROOT_PASSWORD`), and `user`/`password`
    /// with a role that may read and write the keys under `prefix` (what relay needs).
    pub async fn enable_auth(&self, user: &str, password: &str, prefix: &str) -> anyhow::Result<()> {
        use base64::Engine;
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let mut end = prefix.as_bytes().to_vec();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let calls = [
            (
                "/v3/auth/user/add",
                serde_json::json!({"name": "root", "password": ROOT_PASSWORD}),
            ),
            (
                "/v3/auth/user/grant",
                serde_json::json!({"user": "root", "role": "root"}),
            ),
            ("/v3/auth/role/add", serde_json::json!({"name": "relay-leader"})),
            (
                "/v3/auth/role/grant",
                serde_json::json!({"name": "relay-leader", "perm": {
                    "permType": "READWRITE", "key": b64(prefix.as_bytes()), "range_end": b64(&end)}}),
            ),
            (
                "/v3/auth/user/add",
                serde_json::json!({"name": user, "password": password}),
            ),
            (
                "/v3/auth/user/grant",
                serde_json::json!({"user": user, "role": "relay-leader"}),
            ),
            ("/v3/auth/enable", serde_json::json!({})),
        ];
        for (path, body) in calls {
            self.admin_call(path, body, None).await?;
        }
        Ok(())
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
