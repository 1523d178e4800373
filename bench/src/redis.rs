//! Scenario 8's Redis: a throwaway `redis-server` on a free loopback port (no
//! persistence), and what it says about itself (`INFO`), read over a plain socket.

use crate::procs::{self, Proc};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;
use tokio::process::Command;

pub struct Redis {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl Redis {
    /// Starts `redis-server` on 127.0.0.1 with `--save '' --appendonly no`, in `dir`.
    pub async fn start(bin: &Path, dir: &Path, logs: &Path) -> Result<Redis> {
        std::fs::create_dir_all(dir)?;
        let port = procs::free_port()?;
        let mut cmd = Command::new(bin);
        cmd.arg("--bind")
            .arg("127.0.0.1")
            .arg("--port")
            .arg(port.to_string())
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--daemonize")
            .arg("no")
            .arg("--dir")
            .arg(dir);
        let mut p = Proc::spawn("redis", cmd, logs)?;
        p.wait_line("Ready to accept connections", Duration::from_secs(20))
            .await
            .context("waiting for redis-server")?;
        Ok(Redis {
            proc: p,
            addr: format!("127.0.0.1:{port}").parse()?,
        })
    }

    pub fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }
}

/// Commands the Redis at `addr` has run so far, and how many of them were script
/// calls (`EVALSHA`, `EVAL`, `FCALL`): the limiter's round trips. Each call of this
/// function is itself one command (counted by the next call).
pub async fn counters(addr: SocketAddr) -> Result<Counters> {
    tokio::task::spawn_blocking(move || read_counters(addr)).await?
}

#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub commands: u64,
    pub scripts: u64,
    /// Calls by command (`INFO commandstats`), including those run inside scripts.
    pub calls: BTreeMap<String, u64>,
}

impl Counters {
    /// Calls by command since `before` (those that changed).
    pub fn minus(&self, before: &Counters) -> BTreeMap<String, u64> {
        self.calls
            .iter()
            .map(|(k, v)| (k.clone(), v.saturating_sub(before.calls.get(k).copied().unwrap_or(0))))
            .filter(|(_, v)| *v > 0)
            .collect()
    }
}

fn read_counters(addr: SocketAddr) -> Result<Counters> {
    let text = info(addr)?;
    let field = |prefix: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.trim().parse().ok())
    };
    // cmdstat_evalsha:calls=12,usec=…
    let calls: BTreeMap<String, u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .filter_map(|l| {
            let (cmd, rest) = l.split_once(":calls=")?;
            Some((cmd.to_string(), rest.split(',').next()?.parse().ok()?))
        })
        .collect();
    let get = |cmd: &str| calls.get(cmd).copied().unwrap_or(0);
    Ok(Counters {
        commands: field("total_commands_processed:").context("INFO has no total_commands_processed")?,
        scripts: get("evalsha") + get("eval") + get("fcall"),
        calls,
    })
}

/// `INFO all` (one bulk string) over a plain connection.
fn info(addr: SocketAddr) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"INFO all\r\n")?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            bail!("redis closed the connection in the middle of INFO");
        }
        buf.extend_from_slice(&chunk[..n]);
        // "$<len>\r\n<len bytes>\r\n"
        let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..eol]).to_string();
        let Some(len) = head.strip_prefix('$').and_then(|l| l.parse::<usize>().ok()) else {
            bail!("unexpected answer to INFO: {head}");
        };
        if buf.len() >= eol + 2 + len {
            return Ok(String::from_utf8_lossy(&buf[eol + 2..eol + 2 + len]).into_owned());
        }
    }
}
