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
    let fit = fit(requested, fds_per_connection, Some(limit));
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

/// `requested`, or as many connections of `fds_per_connection` descriptors as `limit` holds
/// beside [`FD_RESERVE`] (at least 1).
fn fit(requested: usize, fds_per_connection: u64, limit: Option<u64>) -> usize {
    let Some(limit) = limit else { return requested };
    let fit = usize::try_from(limit.saturating_sub(FD_RESERVE) / fds_per_connection.max(1)).unwrap_or(usize::MAX);
    requested.min(fit.max(1))
}

/// A listener's connection cap that follows how many descriptors a connection may take: the data
/// plane's API listener budgets two per client connection while its upstreams may be HTTP/1.1 (the
/// client's socket and the upstream's), one when they are HTTP/2 only (streams share a few
/// upstream connections, which [`FD_RESERVE`] covers). Lowering the cap never closes a
/// connection: permits held above the new cap are given back to nobody as they are released.
pub struct ConnCap {
    open: Arc<Semaphore>,
    requested: usize,
    limit: Option<u64>,
    name: &'static str,
    /// (the cap in force, descriptors per connection it was computed for)
    state: std::sync::Mutex<(usize, u64)>,
    /// Permits to forget as connections end (the cap was lowered while they were held).
    owed: std::sync::atomic::AtomicUsize,
}

/// A connection's place under a [`ConnCap`], until dropped.
pub struct CapPermit {
    permit: Option<OwnedSemaphorePermit>,
    cap: Arc<ConnCap>,
}

impl Drop for CapPermit {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        if let Some(p) = self.permit.take() {
            if self
                .cap
                .owed
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |o| o.checked_sub(1))
                .is_ok()
            {
                p.forget();
            }
        }
    }
}

impl ConnCap {
    /// `requested` connections of `fds_per_connection` descriptors each, within `limit`
    /// ([`fd_budget`]: said once at start when the limit is what caps it).
    pub fn new(requested: usize, fds_per_connection: u64, limit: Option<u64>, name: &'static str) -> Arc<Self> {
        let cap = fd_budget(requested, fds_per_connection, limit, name).max(1);
        Arc::new(Self {
            open: Arc::new(Semaphore::new(cap)),
            requested,
            limit,
            name,
            state: std::sync::Mutex::new((cap, fds_per_connection)),
            owed: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// The cap in force.
    pub fn cap(&self) -> usize {
        self.state.lock().map(|s| s.0).unwrap_or_else(|e| e.into_inner().0)
    }

    /// Connections open now (under the cap).
    pub fn open(&self) -> usize {
        let cap = self.cap();
        let owed = self.owed.load(std::sync::atomic::Ordering::Acquire);
        (cap + owed).saturating_sub(self.open.available_permits())
    }

    /// A place for one more connection, or None when the cap is reached.
    pub fn try_acquire(self: &Arc<Self>) -> Option<CapPermit> {
        let permit = self.open.clone().try_acquire_owned().ok()?;
        Some(CapPermit {
            permit: Some(permit),
            cap: self.clone(),
        })
    }

    /// Recomputes the cap for connections of `fds_per_connection` descriptors.
    pub fn set_fds_per_connection(&self, fds_per_connection: u64) {
        use std::sync::atomic::Ordering;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.1 == fds_per_connection {
            return;
        }
        let (old, _) = *state;
        let new = fit(self.requested, fds_per_connection, self.limit);
        *state = (new, fds_per_connection);
        if new > old {
            // Permits still owed from an earlier lowering are cancelled first.
            let extra = new - old;
            let owed = self
                .owed
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |o| Some(o.saturating_sub(extra)))
                .unwrap_or(0);
            self.open.add_permits(extra - owed.min(extra));
        } else if new < old {
            let fewer = old - new;
            let forgotten = self.open.forget_permits(fewer);
            self.owed.fetch_add(fewer - forgotten, Ordering::AcqRel);
        }
        if new != old {
            tracing::info!(
                listener = self.name,
                connections = new,
                before = old,
                fds_per_connection,
                "connection cap follows the descriptors a connection may take"
            );
        }
    }
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

    #[test]
    fn the_cap_follows_the_descriptors_a_connection_takes() {
        let limit = Some(FD_RESERVE + 10);
        let cap = ConnCap::new(100, 2, limit, "test");
        assert_eq!(cap.cap(), 5);
        let held: Vec<_> = (0..5).map(|_| cap.try_acquire().unwrap()).collect();
        assert!(cap.try_acquire().is_none(), "5 of 2 descriptors fill 10");
        // HTTP/2 only upstreams: one descriptor each, 10 fit.
        cap.set_fds_per_connection(1);
        assert_eq!(cap.cap(), 10);
        let more: Vec<_> = (0..5).map(|_| cap.try_acquire().unwrap()).collect();
        assert!(cap.try_acquire().is_none());
        assert_eq!(cap.open(), 10);
        // Back to two each while all 10 are open: none is closed, and no new one is let in
        // until the open ones are down under the new cap.
        cap.set_fds_per_connection(2);
        assert_eq!(cap.cap(), 5);
        assert_eq!(cap.open(), 10);
        drop(more);
        assert!(cap.try_acquire().is_none(), "5 still open: the cap of 5 is full");
        let mut held = held.into_iter();
        drop(held.next());
        let again = cap.try_acquire();
        assert!(again.is_some(), "4 open, the fifth place is free");
        assert!(cap.try_acquire().is_none());
        // Raised again: exactly the new cap.
        cap.set_fds_per_connection(1);
        let extra: Vec<_> = std::iter::from_fn(|| cap.try_acquire()).take(100).collect();
        assert_eq!(extra.len(), 5, "10 in all: 5 open, 5 more");
        assert_eq!(cap.open(), 10);
        drop((held, again));
    }

    #[test]
    fn a_lowering_owed_is_paid_by_connections_ending_then_cancelled_by_a_raise() {
        let cap = ConnCap::new(100, 1, Some(FD_RESERVE + 8), "test");
        let held: Vec<_> = (0..8).map(|_| cap.try_acquire().unwrap()).collect();
        cap.set_fds_per_connection(2); // cap 4, 4 owed
        let mut held = held.into_iter();
        drop(held.next()); // 7 open, 3 owed
        drop(held.next()); // 6 open, 2 owed
        assert!(cap.try_acquire().is_none());
        cap.set_fds_per_connection(1); // cap 8: the 2 still owed are cancelled, 2 places added
        let extra: Vec<_> = std::iter::from_fn(|| cap.try_acquire()).take(100).collect();
        assert_eq!(extra.len(), 2, "6 open, 8 allowed");
        drop(held);
        let rest: Vec<_> = std::iter::from_fn(|| cap.try_acquire()).take(100).collect();
        assert_eq!(rest.len(), 6, "the 6 that ended gave their places back");
        assert_eq!(cap.open(), 8);
        drop((extra, rest));
        assert_eq!(cap.open(), 0);
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
