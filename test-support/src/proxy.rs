//! Outbound proxies for tests: a real, minimal HTTP CONNECT proxy (RFC 9110
//! §9.3.6, Basic `Proxy-Authorization`) and SOCKS5 proxy (RFC 1928 with
//! RFC 1929 user/password), each on a loopback port. They tunnel bytes both
//! ways and record every tunnel they were asked for, so a test can check that
//! traffic went through the proxy, to which destination, with which
//! credentials.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocol {
    HttpConnect,
    Socks5,
}

/// One tunnel request the proxy received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tunnel {
    /// `host:port` as the client asked for it (a name for `socks5h`, an address for `socks5`).
    pub target: String,
    /// The credentials the client gave, if any.
    pub auth: Option<(String, String)>,
    /// Whether the proxy let it through.
    pub accepted: bool,
}

/// A running proxy; stops when dropped.
pub struct TestProxy {
    pub addr: SocketAddr,
    tunnels: Arc<Mutex<Vec<Tunnel>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestProxy {
    /// Starts a proxy that requires `auth` when given.
    pub async fn start(protocol: ProxyProtocol, auth: Option<(&str, &str)>) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let tunnels = Arc::new(Mutex::new(Vec::new()));
        let auth = auth.map(|(u, p)| (u.to_string(), p.to_string()));
        let log = tunnels.clone();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let log = log.clone();
                let auth = auth.clone();
                tokio::spawn(async move {
                    let _ = match protocol {
                        ProxyProtocol::HttpConnect => http_connect(conn, auth, log).await,
                        ProxyProtocol::Socks5 => socks5(conn, auth, log).await,
                    };
                });
            }
        });
        Ok(Self { addr, tunnels, task })
    }

    /// Every tunnel asked for so far.
    pub fn tunnels(&self) -> Vec<Tunnel> {
        self.tunnels.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

fn record(log: &Mutex<Vec<Tunnel>>, t: Tunnel) {
    log.lock().unwrap_or_else(PoisonError::into_inner).push(t);
}

fn decode_basic(value: &str) -> Option<(String, String)> {
    use base64::Engine as _;
    let b64 = value.trim().strip_prefix("Basic ")?;
    let raw = base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

async fn http_connect(
    conn: TcpStream,
    want: Option<(String, String)>,
    log: Arc<Mutex<Vec<Tunnel>>>,
) -> anyhow::Result<()> {
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or("").to_string());
    let mut auth = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).await? == 0 {
            return Ok(());
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((name, value)) = h.split_once(':') {
            if name.eq_ignore_ascii_case("proxy-authorization") {
                auth = decode_basic(value);
            }
        }
    }
    // Bytes the client sent after the head (none for a well-behaved client) would be lost.
    anyhow::ensure!(reader.buffer().is_empty(), "data after the CONNECT head");
    let mut conn = reader.into_inner();
    if method != "CONNECT" {
        conn.write_all(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n")
            .await?;
        return Ok(());
    }
    let accepted = want.is_none() || want == auth;
    record(
        &log,
        Tunnel {
            target: target.clone(),
            auth,
            accepted,
        },
    );
    if !accepted {
        conn.write_all(
            b"HTTP/1.1 407 Proxy Authentication Required\r\nproxy-authenticate: Basic realm=\"test\"\r\ncontent-length: 0\r\n\r\n",
        )
        .await?;
        return Ok(());
    }
    match TcpStream::connect(&target).await {
        Ok(upstream) => {
            conn.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n").await?;
            let mut upstream = upstream;
            tokio::io::copy_bidirectional(&mut conn, &mut upstream).await?;
        }
        Err(_) => {
            conn.write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
                .await?;
        }
    }
    Ok(())
}

async fn socks5(
    mut conn: TcpStream,
    want: Option<(String, String)>,
    log: Arc<Mutex<Vec<Tunnel>>>,
) -> anyhow::Result<()> {
    // Greeting: VER NMETHODS METHODS...
    let mut head = [0u8; 2];
    conn.read_exact(&mut head).await?;
    anyhow::ensure!(head[0] == 5, "not SOCKS5");
    let mut methods = vec![0u8; usize::from(head[1])];
    conn.read_exact(&mut methods).await?;
    let method = if want.is_some() { 2 } else { 0 };
    if !methods.contains(&method) {
        conn.write_all(&[5, 0xff]).await?;
        return Ok(());
    }
    conn.write_all(&[5, method]).await?;
    let mut auth = None;
    if method == 2 {
        // RFC 1929: VER ULEN UNAME PLEN PASSWD
        let mut v = [0u8; 2];
        conn.read_exact(&mut v).await?;
        let mut user = vec![0u8; usize::from(v[1])];
        conn.read_exact(&mut user).await?;
        let mut plen = [0u8; 1];
        conn.read_exact(&mut plen).await?;
        let mut pass = vec![0u8; usize::from(plen[0])];
        conn.read_exact(&mut pass).await?;
        auth = Some((
            String::from_utf8_lossy(&user).into_owned(),
            String::from_utf8_lossy(&pass).into_owned(),
        ));
    }
    let accepted_auth = want.is_none() || want == auth;
    if method == 2 {
        conn.write_all(&[1, if accepted_auth { 0 } else { 1 }]).await?;
    }
    // Request: VER CMD RSV ATYP DST.ADDR DST.PORT
    let mut req = [0u8; 4];
    if !accepted_auth {
        record(
            &log,
            Tunnel {
                target: String::new(),
                auth,
                accepted: false,
            },
        );
        return Ok(());
    }
    conn.read_exact(&mut req).await?;
    let host = match req[3] {
        1 => {
            let mut a = [0u8; 4];
            conn.read_exact(&mut a).await?;
            std::net::Ipv4Addr::from(a).to_string()
        }
        4 => {
            let mut a = [0u8; 16];
            conn.read_exact(&mut a).await?;
            format!("[{}]", std::net::Ipv6Addr::from(a))
        }
        3 => {
            let mut len = [0u8; 1];
            conn.read_exact(&mut len).await?;
            let mut name = vec![0u8; usize::from(len[0])];
            conn.read_exact(&mut name).await?;
            String::from_utf8_lossy(&name).into_owned()
        }
        _ => anyhow::bail!("bad address type"),
    };
    let mut port = [0u8; 2];
    conn.read_exact(&mut port).await?;
    let target = format!("{host}:{}", u16::from_be_bytes(port));
    record(
        &log,
        Tunnel {
            target: target.clone(),
            auth,
            accepted: req[1] == 1,
        },
    );
    if req[1] != 1 {
        // Only CONNECT.
        conn.write_all(&[5, 7, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
        return Ok(());
    }
    let resolved = if host == "localhost" {
        format!("127.0.0.1:{}", u16::from_be_bytes(port))
    } else {
        target.clone()
    };
    match TcpStream::connect(&resolved).await {
        Ok(upstream) => {
            conn.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
            let mut upstream = upstream;
            tokio::io::copy_bidirectional(&mut conn, &mut upstream).await?;
            Ok(())
        }
        Err(_) => {
            conn.write_all(&[5, 5, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
            Ok(())
        }
    }
}
