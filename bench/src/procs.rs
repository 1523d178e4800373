//! Child processes (mock upstream, nginx, control plane, data plane) and what
//! /proc says about them: CPU time, resident memory, open-file limits.
//!
//! Every child is killed (with its own children) when its [`Proc`] is dropped,
//! so an error anywhere in a run leaves nothing behind.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

pub struct Proc {
    pub name: String,
    pub pid: u32,
    child: Child,
    pub log: PathBuf,
    lines: Option<mpsc::UnboundedReceiver<String>>,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr going to `log_dir/<name>.log`
    /// (stdout is also scanned line by line, see [`Proc::wait_line`]).
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> Result<Proc> {
        let log = log_dir.join(format!("{name}.log"));
        let err = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::from(err))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let pid = child.id().context("child has no pid")?;
        let (tx, rx) = mpsc::unbounded_channel();
        if let Some(out) = child.stdout.take() {
            let log_path = log.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(out).lines();
                let mut file = std::fs::OpenOptions::new().append(true).open(&log_path).ok();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(f) = file.as_mut() {
                        use std::io::Write;
                        let _ = writeln!(f, "{line}");
                    }
                    let _ = tx.send(line);
                }
            });
        }
        Ok(Proc {
            name: name.to_string(),
            pid,
            child,
            log,
            lines: Some(rx),
        })
    }

    /// Waits for a stdout line containing `needle`; returns the rest of the
    /// line after it (trimmed).
    pub async fn wait_line(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let Some(rx) = self.lines.as_mut() else {
            bail!("{}: stdout is not captured", self.name)
        };
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(line)) => {
                    if let Some(i) = line.find(needle) {
                        return Ok(line[i + needle.len()..].trim().to_string());
                    }
                }
                Ok(None) => bail!(
                    "{} exited before printing {needle:?}; see {}:\n{}",
                    self.name,
                    self.log.display(),
                    tail(&self.log)
                ),
                Err(_) => bail!(
                    "{} did not print {needle:?} within {timeout:?}; see {}:\n{}",
                    self.name,
                    self.log.display(),
                    tail(&self.log)
                ),
            }
        }
    }

    /// The process and its direct children (nginx: master and workers).
    pub fn tree(&self) -> Vec<u32> {
        let mut v = vec![self.pid];
        v.extend(children(self.pid));
        v
    }

    /// SIGTERM (or `sig`), then waits up to `grace`, then SIGKILL.
    pub async fn stop(mut self, sig: &str, grace: Duration) -> Result<()> {
        let kids = children(self.pid);
        signal(self.pid, sig);
        if tokio::time::timeout(grace, self.child.wait()).await.is_err() {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
        for k in kids {
            signal(k, "KILL");
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            for k in children(self.pid) {
                signal(k, "KILL");
            }
            let _ = self.child.start_kill();
        }
    }
}

pub fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Direct children of `pid` (from every thread's `children` file).
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(s.split_whitespace().filter_map(|x| x.parse::<u32>().ok()));
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// utime + stime of `pid`, in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let Some(rest) = s.rfind(')').map(|i| &s[i + 1..]) else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command name: field 3 (state) is f[0]; utime is field 14, stime 15.
    let get = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

/// CPU seconds used so far by every process of `pids`.
pub fn cpu_secs(pids: &[u32]) -> f64 {
    pids.iter().map(|p| cpu_ticks(*p)).sum::<u64>() as f64 / clk_tck() as f64
}

pub fn clk_tck() -> u64 {
    static TCK: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100)
    })
}

fn status_kb(pid: u32, field: &str) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|x| x.parse().ok())
        .unwrap_or(0)
}

/// Resident set size in bytes, summed over `pids`.
pub fn rss_bytes(pids: &[u32]) -> u64 {
    pids.iter().map(|p| status_kb(*p, "VmRSS:")).sum::<u64>() * 1024
}

/// Peak resident set size (VmHWM) in bytes, summed over `pids`.
pub fn hwm_bytes(pids: &[u32]) -> u64 {
    pids.iter().map(|p| status_kb(*p, "VmHWM:")).sum::<u64>() * 1024
}

/// The soft open-files limit of `pid`.
pub fn nofile(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = s.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// A free loopback port (bound then released).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Polls `GET path` on `addr` with a raw HTTP/1.1 request until it answers
/// 200; returns the time since `since`. Blocking: call from a plain thread.
pub fn wait_http_200(addr: std::net::SocketAddr, path: &str, since: Instant, timeout: Duration) -> Result<Duration> {
    use std::io::{Read, Write};
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    loop {
        if since.elapsed() > timeout {
            bail!("{addr}{path} did not answer 200 within {timeout:?}");
        }
        if let Ok(mut s) = std::net::TcpStream::connect(addr) {
            let _ = s.set_nodelay(true);
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            if s.write_all(req.as_bytes()).is_ok() {
                let mut buf = [0u8; 16];
                let mut got = 0;
                while got < 12 {
                    match s.read(&mut buf[got..]) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got += n,
                    }
                }
                if got >= 12 && &buf[9..12] == b"200" {
                    return Ok(since.elapsed());
                }
            }
        }
        std::thread::sleep(Duration::from_micros(250));
    }
}
