//! A network partition between two processes on loopback: a TCP forwarder that a test can cut
//! (bytes stop flowing both ways on every connection, new connections hang; nothing is closed,
//! as when packets are dropped) and heal (everything held flows on, closes included).

use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A running forwarder from a loopback port to `target`; stops when dropped (its connections end).
pub struct Partition {
    pub addr: SocketAddr,
    open: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Partition {
    /// Starts forwarding (healed) to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (open, gate) = watch::channel(true);
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let gate = gate.clone();
                conns.spawn(async move {
                    let mut g = gate.clone();
                    if g.wait_for(|open| *open).await.is_err() {
                        return;
                    }
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pump(cr, sw, gate.clone()), pump(sr, cw, gate));
                });
            }
        });
        Ok(Self { addr, open, task })
    }

    /// Cuts every connection through it (held, not closed) and holds new ones.
    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    /// Lets everything flow again.
    pub fn heal(&self) {
        self.open.send_replace(true);
    }
}

/// Copies `from` to `to`, reading and writing only while the gate is open.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut gate: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if gate.wait_for(|open| *open).await.is_err() {
            return;
        }
        let n = tokio::select! {
            // An error ends the copy like an end of stream.
            r = from.read(&mut buf) => r.unwrap_or_default(),
            // Cut while waiting for bytes: stop reading (they stay in the kernel's buffers).
            _ = gate.wait_for(|open| !*open) => continue,
        };
        // Bytes read just before a cut are held until the heal.
        if gate.wait_for(|open| *open).await.is_err() {
            return;
        }
        if n == 0 {
            let _ = to.shutdown().await;
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
