//! Accepting connections without spinning and without starving other listeners.
//!
//! `accept` fails for two kinds of reasons: the one connection went wrong (reset or aborted before
//! it was accepted: try the next one at once), or the process cannot take any connection now (out
//! of file descriptors, out of memory: retrying at once spins a core and fixes nothing). The second
//! kind backs off exponentially (5 ms up to 1 s) and is counted in
//! `relay_accept_errors_total{listener}`. Each listener also has its own connection cap: a
//! connection over it is closed at once, so a flood on one port never takes the descriptors another
//! listener (the control plane's, in standalone mode) needs. [`fd_budget`] keeps the caps within the
//! process's open-file limit.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Errors that concern only the connection being accepted.
fn per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// The next connection of `listener`, backing off on errors that are not about one connection.
pub async fn accept(listener: &TcpListener, name: &'static str) -> TcpStream {
    let mut backoff = Duration::ZERO;
    loop {
        match listener.accept().await {
            Ok((s, _)) => return s,
            Err(e) if per_connection(&e) => continue,
            Err(e) => {
                backoff = (backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
                metrics::counter!(relay_proto::metrics::ACCEPT_ERRORS_TOTAL, "listener" => name).increment(1);
                tracing::warn!(listener = name, error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed; backing off");
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

/// A connection that holds its place under the listener's cap until it is dropped.
pub struct Capped {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for Capped {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Capped {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Capped {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

/// The connections of `listener` as a stream (for tonic's `serve_with_incoming`), at most
/// `max_connections` open at once (those over it are closed at once and counted in
/// `relay_client_connections_refused_total{listener}`), with [`accept`]'s backoff.
pub fn incoming(
    listener: TcpListener,
    name: &'static str,
    max_connections: usize,
) -> impl futures::Stream<Item = io::Result<Capped>> + Send + 'static {
    let cap = Arc::new(Semaphore::new(max_connections.max(1)));
    futures::stream::unfold((listener, cap), move |(listener, cap)| async move {
        loop {
            let stream = accept(&listener, name).await;
            match cap.clone().try_acquire_owned() {
                Ok(permit) => {
                    let _ = stream.set_nodelay(true);
                    let c = Capped {
                        stream,
                        _permit: permit,
                    };
                    return Some((Ok(c), (listener, cap)));
                }
                Err(_) => {
                    metrics::counter!(relay_proto::metrics::CLIENT_CONNECTIONS_REFUSED_TOTAL, "listener" => name)
                        .increment(1);
                    drop(stream);
                }
            }
        }
    })
}

/// Descriptors kept free for everything but client connections (the other listener, the
/// store, the spool, logs).
pub const FD_RESERVE: u64 = 256;

/// Raises this process's open-file limit to its hard limit and returns the soft limit now in
/// force (None where it cannot be read).
pub fn raise_fd_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => Some(n),
        Err(e) => {
            tracing::debug!(error = %e, "cannot read or raise the open-file limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE).ok().map(|(soft, _)| soft)
        }
    }
}

/// How many connections a listener may hold when each may need `fds_per_connection`
/// descriptors (a proxied request holds its client's and its upstream's), within `limit`:
/// `requested`, or less (with a warning saying why) when the open-file limit could not hold it.
pub fn fd_budget(requested: usize, fds_per_connection: u64, limit: Option<u64>, name: &str) -> usize {
    let Some(limit) = limit else { return requested };
    let fit = usize::try_from(limit.saturating_sub(FD_RESERVE) / fds_per_connection.max(1)).unwrap_or(usize::MAX);
    if requested > fit {
        let fit = fit.max(1);
        // What would hold them all: each connection's descriptors plus the reserve.
        let needed = (requested as u64)
            .saturating_mul(fds_per_connection.max(1))
            .saturating_add(FD_RESERVE);
        // Said once at start: a cap, not a fault.
        tracing::info!(
            listener = name,
            requested,
            allowed = fit,
            open_file_limit = limit,
            fds_per_connection,
            needed,
            "capping connections to what the open-file limit holds: each connection may take {fds_per_connection} \
             descriptors (client and upstream) and {FD_RESERVE} are kept for the rest; `ulimit -n {needed}` \
             would allow them all"
        );
        println!(
            "relay: {name}: at most {fit} connections at once, not {requested}: each may take \
             {fds_per_connection} open files and the limit is {limit} (`ulimit -n {needed}` would allow {requested})"
        );
        return fit;
    }
    requested
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn budget_fits_the_open_file_limit() {
        assert_eq!(fd_budget(20_000, 2, None, "api"), 20_000);
        assert_eq!(fd_budget(20_000, 2, Some(1_048_576), "api"), 20_000);
        assert_eq!(
            fd_budget(20_000, 2, Some(1024), "api"),
            (1024 - FD_RESERVE as usize) / 2
        );
        assert_eq!(fd_budget(100, 2, Some(10), "api"), 1);
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_and_the_rest_served() {
        use futures::StreamExt;
        use tokio::io::AsyncReadExt;
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut conns = Box::pin(incoming(l, "test", 1));
        let c1 = TcpStream::connect(addr).await.unwrap();
        let held = conns.next().await.unwrap().unwrap();
        // The second is accepted and closed at once (read gives EOF); the stream waits on.
        let mut c2 = TcpStream::connect(addr).await.unwrap();
        let next = tokio::spawn(async move { conns.next().await.map(|c| c.is_ok()) });
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), c2.read(&mut b))
            .await
            .unwrap();
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        // Once the first is gone, a new connection is taken.
        drop(held);
        drop(c1);
        let _c3 = TcpStream::connect(addr).await.unwrap();
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(5), next)
                .await
                .unwrap()
                .unwrap(),
            Some(true)
        );
    }
}
