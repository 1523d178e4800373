//! relay's own HTTP/1.1 client connections, for upstreams spoken to over HTTP/1.1 (plain `http://`
//! ones, and every upstream under `upstream.http_version = http1`).
//!
//! hyper's pooled client gives every HTTP/1.1 connection its own task, a request channel and read
//! and write buffers (about 35 KB an open stream, and a task hand-over per chunk). Here the
//! connection has no task: the request future writes the request and reads the head, and the
//! response body reads the socket from the task that polls it (the client's connection task), so a
//! burst of events the kernel holds is decoded and handed on in one poll. Reads go into a buffer
//! on the stack and each frame is copied out at its own size: an idle open stream holds no read
//! buffer at all. A connection whose body ended cleanly and that may be kept alive goes back to
//! its pool; one dropped mid-body (the client left) is closed, which cancels the upstream request.
//!
//! Parsing is `httparse` (hyper's own parser); the body framing (RFC 9112 §6.3: no body, a
//! `content-length`, `chunked`, or up to the close) is decoded here.

use crate::client::Connector;
use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// The largest response head read (status line and headers): hyper's own default limit.
pub const MAX_HEAD_BYTES: usize = 400 * 1024;
/// The most response headers parsed.
pub const MAX_HEADERS: usize = 128;
/// Bytes read from the socket in one go (on the stack; each frame is copied out at its size).
const READ_CHUNK: usize = 16 * 1024;
/// The most idle connections kept per upstream (scheme, host and port).
const MAX_IDLE_PER_HOST: usize = 256;
/// The most bytes of a chunk-size line's extensions and of trailers accepted.
const MAX_CHUNK_META: usize = 16 * 1024;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a request over relay's own HTTP/1.1 connection got no response head, or why its body broke.
/// No variant carries a URL, a header or a body: none can leak a credential.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("the upstream URL has no http or https scheme or no host")]
    Uri,
    #[error("connecting to the upstream failed")]
    Connect(#[source] BoxError),
    #[error("connecting to the upstream timed out after {0} ms")]
    TlsTimeout(u64),
    #[error("TLS with the upstream failed")]
    Tls(#[source] io::Error),
    #[error("sending the request to the upstream failed")]
    Write(#[source] io::Error),
    #[error("reading the upstream's answer failed")]
    Read(#[source] io::Error),
    #[error("the upstream closed the connection before answering")]
    ClosedBeforeHead,
    #[error("the upstream's response head is not valid HTTP/1.1: {0}")]
    Head(&'static str),
    #[error("the upstream's response head is larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("the upstream's response body is not validly framed: {0}")]
    Framing(&'static str),
    #[error("the upstream closed the connection before the response body ended")]
    Incomplete,
}

impl H1Error {
    /// The connection could not be made (nothing was sent).
    pub fn is_connect(&self) -> bool {
        matches!(self, H1Error::Connect(_) | H1Error::TlsTimeout(_) | H1Error::Tls(_))
    }
}

/// One connection's stream: plain TCP or TLS over it (direct or through the account's proxy).
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl Io {
    /// Whether an idle pooled connection can carry a request: the upstream has not closed it and
    /// sent nothing unasked. Polled once without waiting.
    fn usable(&mut self) -> bool {
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        matches!(Pin::new(self).poll_read(&mut cx, &mut buf), Poll::Pending)
    }
}

struct IdleConn {
    io: Io,
    since: Instant,
}

struct PoolInner {
    connector: Connector,
    tls: Arc<rustls::ClientConfig>,
    /// The connect timeout in force, in ms (shared with the connector; it bounds the TLS handshake too).
    timeout_ms: Arc<std::sync::atomic::AtomicU64>,
    idle_timeout: Duration,
    idle: Mutex<IdleMap>,
}

#[derive(Default)]
struct IdleMap {
    by_host: HashMap<Arc<str>, Vec<IdleConn>>,
    /// Whether a task sweeping out expired idle connections runs.
    sweeping: bool,
}

/// The HTTP/1.1 connections of one route (direct, or through one proxy), by upstream.
#[derive(Clone)]
pub(crate) struct Pool {
    inner: Arc<PoolInner>,
}

impl Pool {
    pub(crate) fn new(
        connector: Connector,
        tls: &rustls::ClientConfig,
        timeout_ms: Arc<std::sync::atomic::AtomicU64>,
        idle_timeout: Duration,
    ) -> Self {
        let mut tls = tls.clone();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Self {
            inner: Arc::new(PoolInner {
                connector,
                tls: Arc::new(tls),
                timeout_ms,
                idle_timeout,
                idle: Mutex::new(IdleMap::default()),
            }),
        }
    }

    /// Sends `req` (whose body is `body`) and reads the response head. A pooled connection the
    /// upstream turns out to have closed before the request could be written is replaced by a new
    /// one; a request written whole is never sent twice.
    pub(crate) async fn send(&self, req: http::request::Parts, body: Bytes) -> Result<http::Response<H1Body>, H1Error> {
        let (Some(scheme), Some(authority)) = (req.uri.scheme_str(), req.uri.authority()) else {
            return Err(H1Error::Uri);
        };
        let tls = match scheme {
            "https" => true,
            "http" => false,
            _ => return Err(H1Error::Uri),
        };
        let key: Arc<str> = format!("{scheme}://{authority}").into();
        let head = request_head(&req, authority.as_str(), body.len());
        let mut io = match self.checkout(&key) {
            Some(mut io) => match write_request(&mut io.0, &head, &body).await {
                Ok(()) => io,
                // Closed under us (an idle timeout racing this request): nothing was processed.
                Err(_) => self.connect_and_write(&req.uri, tls, &head, &body).await?,
            },
            None => self.connect_and_write(&req.uri, tls, &head, &body).await?,
        };
        let (parts, leftover) = read_head(&mut io.0).await?;
        let framing = framing(&req.method, &parts)?;
        let keep_alive = keep_alive(&parts) && !matches!(framing, Decoder::Close);
        let body = H1Body {
            io: Some(io.0),
            decoder: framing,
            pending: (!leftover.is_empty()).then_some(leftover),
            keep_alive,
            pool: Arc::downgrade(&self.inner),
            key,
        };
        let mut body = body;
        if body.decoder.finished() {
            // No body (a 204, a HEAD, a zero length): whatever followed the head is not this
            // response's, and the connection is not reused after it.
            if body.pending.take().is_some() {
                body.keep_alive = false;
            }
            body.release();
        }
        let mut resp = http::Response::new(body);
        *resp.status_mut() = parts.status;
        *resp.version_mut() = parts.version;
        *resp.headers_mut() = parts.headers;
        Ok(resp)
    }

    /// A new connection with the request written on it. Not boxed where it is awaited: its state
    /// shares the request future's bytes with the later phases, where a box of its own would be
    /// an allocation more per new connection, all of them at once when many streams open
    /// together (measured: 3 KB more per stream at the peak of 2,000 opening at once).
    async fn connect_and_write(&self, uri: &Uri, tls: bool, head: &[u8], body: &Bytes) -> Result<Conn, H1Error> {
        let mut io = self.connect(uri, tls).await?;
        write_request(&mut io, head, body).await.map_err(H1Error::Write)?;
        Ok(Conn(io))
    }

    async fn connect(&self, uri: &Uri, tls: bool) -> Result<Io, H1Error> {
        use tower_service::Service as _;
        let mut connector = self.inner.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(H1Error::Connect)?;
        let tcp = connector
            .call(uri.clone())
            .await
            .map_err(H1Error::Connect)?
            .into_inner();
        if !tls {
            return Ok(Io::Plain(tcp));
        }
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|_| H1Error::Tls(io::Error::new(io::ErrorKind::InvalidInput, "invalid server name")))?;
        let limit = self.inner.timeout_ms.load(std::sync::atomic::Ordering::Relaxed);
        // Boxed: the handshake's state is large, and the request future (which the data plane's
        // connection keeps allocated at its largest for as long as the client stays connected,
        // and which every future awaiting it moves whole) should not carry it.
        let handshake = Box::pin(tokio_rustls::TlsConnector::from(self.inner.tls.clone()).connect(name, tcp));
        match tokio::time::timeout(Duration::from_millis(limit), handshake).await {
            Ok(Ok(s)) => Ok(Io::Tls(Box::new(s))),
            Ok(Err(e)) => Err(H1Error::Tls(e)),
            Err(_) => Err(H1Error::TlsTimeout(limit)),
        }
    }

    /// The most recently idled connection to `key` that is still usable (expired or closed ones
    /// found on the way are dropped).
    fn checkout(&self, key: &Arc<str>) -> Option<Conn> {
        let mut idle = self.inner.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let conns = idle.by_host.get_mut(key)?;
        let now = Instant::now();
        while let Some(mut c) = conns.pop() {
            if now.saturating_duration_since(c.since) < self.inner.idle_timeout && c.io.usable() {
                return Some(Conn(c.io));
            }
        }
        None
    }
}

/// A connection being used for one request.
struct Conn(Io);

impl PoolInner {
    /// Keeps a connection whose response ended cleanly for the next request to `key`.
    fn put(self: &Arc<Self>, key: Arc<str>, io: Io) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let conns = idle.by_host.entry(key).or_default();
        if conns.len() >= MAX_IDLE_PER_HOST {
            conns.remove(0);
        }
        conns.push(IdleConn {
            io,
            since: Instant::now(),
        });
        if !idle.sweeping {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                idle.sweeping = true;
                rt.spawn(sweep(Arc::downgrade(self)));
            }
        }
    }
}

/// Closes idle connections past the idle timeout (or closed by the upstream) while any are kept;
/// ends when none are left or the pool is gone.
async fn sweep(pool: Weak<PoolInner>) {
    loop {
        let every = match pool.upgrade() {
            Some(p) => (p.idle_timeout / 2).max(Duration::from_millis(100)),
            None => return,
        };
        tokio::time::sleep(every).await;
        let Some(p) = pool.upgrade() else { return };
        let mut idle = p.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        idle.by_host.retain(|_, conns| {
            conns.retain_mut(|c| now.saturating_duration_since(c.since) < p.idle_timeout && c.io.usable());
            !conns.is_empty()
        });
        if idle.by_host.is_empty() {
            idle.sweeping = false;
            return;
        }
    }
}

/// The request line and headers: the caller's headers without framing and hop-by-hop ones, which
/// relay sets itself (`host` from the URL, `content-length` from the body).
fn request_head(req: &http::request::Parts, authority: &str, body_len: usize) -> Vec<u8> {
    let target = req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut size = req.method.as_str().len() + target.len() + authority.len() + 64;
    for (n, v) in &req.headers {
        size += n.as_str().len() + v.len() + 4;
    }
    let mut head = Vec::with_capacity(size);
    head.extend_from_slice(req.method.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    head.extend_from_slice(authority.as_bytes());
    head.extend_from_slice(b"\r\n");
    for (n, v) in &req.headers {
        if n == HOST || n == CONTENT_LENGTH || n == TRANSFER_ENCODING || n == CONNECTION {
            continue;
        }
        head.extend_from_slice(n.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(v.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    let sends_length = body_len > 0
        || !matches!(
            req.method,
            Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS
        );
    if sends_length {
        head.extend_from_slice(b"content-length: ");
        head.extend_from_slice(body_len.to_string().as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// Writes the head and the body (vectored: one segment each, no copy of the body).
async fn write_request(io: &mut Io, head: &[u8], body: &[u8]) -> io::Result<()> {
    let (mut h, mut b) = (head, body);
    while !h.is_empty() {
        let n = io.write_vectored(&[io::IoSlice::new(h), io::IoSlice::new(b)]).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_head = n.min(h.len());
        h = &h[from_head..];
        b = &b[n - from_head..];
    }
    if !b.is_empty() {
        io.write_all(b).await?;
    }
    io.flush().await
}

/// Reads until a whole response head (1xx informational heads other than 101 skipped). Returns it
/// and the bytes read after it (the body's start).
async fn read_head(io: &mut Io) -> Result<(http::response::Parts, Bytes), H1Error> {
    use tokio::io::AsyncReadExt as _;
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        if !buf.is_empty() {
            if let Some(parts) = parse_head(&mut buf)? {
                let informational = parts.status.is_informational() && parts.status != StatusCode::SWITCHING_PROTOCOLS;
                if !informational {
                    return Ok((parts, buf.freeze()));
                }
                continue;
            }
        }
        if buf.len() >= MAX_HEAD_BYTES {
            return Err(H1Error::HeadTooLarge);
        }
        if buf.capacity() == buf.len() {
            buf.reserve(buf.len().min(MAX_HEAD_BYTES - buf.len()).max(4096));
        }
        let n = io.read_buf(&mut buf).await.map_err(H1Error::Read)?;
        if n == 0 {
            return Err(if buf.is_empty() {
                H1Error::ClosedBeforeHead
            } else {
                H1Error::Head("the connection closed inside the head")
            });
        }
    }
}

/// Takes one whole response head off the start of `buf`; None (and `buf` untouched) when it is not
/// whole yet. Header values are slices of the head's own bytes, not copies.
fn parse_head(buf: &mut BytesMut) -> Result<Option<http::response::Parts>, H1Error> {
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let used = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut resp, buf, &mut headers)
    {
        Ok(httparse::Status::Complete(n)) if n > MAX_HEAD_BYTES => return Err(H1Error::HeadTooLarge),
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(H1Error::Head("too many headers")),
        Err(_) => return Err(H1Error::Head("malformed status line or header")),
    };
    let status = resp
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(H1Error::Head("invalid status code"))?;
    let version = match resp.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    // Names now; values as where they lie in the head, taken once the head is split off.
    let base = buf.as_ptr() as usize;
    let mut found: Vec<(HeaderName, usize, usize)> = Vec::with_capacity(resp.headers.len());
    for h in resp.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| H1Error::Head("invalid header name"))?;
        let start = (h.value.as_ptr() as usize).saturating_sub(base);
        found.push((name, start, start + h.value.len()));
    }
    let head = buf.split_to(used).freeze();
    let mut map = HeaderMap::with_capacity(found.len());
    for (name, start, end) in found {
        let value = head.get(start..end).map(|_| head.slice(start..end)).unwrap_or_default();
        let value = HeaderValue::from_maybe_shared(value).map_err(|_| H1Error::Head("invalid header value"))?;
        map.append(name, value);
    }
    let mut parts = http::Response::new(()).into_parts().0;
    parts.status = status;
    parts.version = version;
    parts.headers = map;
    Ok(Some(parts))
}

/// Whether the connection may carry another request after this response.
fn keep_alive(parts: &http::response::Parts) -> bool {
    let tokens = || {
        parts
            .headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
    };
    if parts.version == Version::HTTP_10 {
        tokens().any(|t| t.eq_ignore_ascii_case("keep-alive"))
    } else {
        !tokens().any(|t| t.eq_ignore_ascii_case("close"))
    }
}

/// How the response body is delimited (RFC 9112 §6.3).
fn framing(method: &Method, parts: &http::response::Parts) -> Result<Decoder, H1Error> {
    let status = parts.status.as_u16();
    if method == Method::HEAD || status == 204 || status == 304 || (100..200).contains(&status) {
        return Ok(Decoder::Length(0));
    }
    let te: Vec<&str> = parts
        .headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    if parts.headers.contains_key(TRANSFER_ENCODING) {
        // A transfer coding other than chunked last: the body runs to the close.
        return Ok(match te.last() {
            Some(t) if t.eq_ignore_ascii_case("chunked") => Decoder::Chunked(Chunked::default()),
            _ => Decoder::Close,
        });
    }
    let mut length: Option<u64> = None;
    for v in parts.headers.get_all(CONTENT_LENGTH) {
        for part in v
            .to_str()
            .map_err(|_| H1Error::Framing("invalid content-length"))?
            .split(',')
        {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(H1Error::Framing("invalid content-length"));
            }
            let n: u64 = part.parse().map_err(|_| H1Error::Framing("invalid content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(H1Error::Framing("conflicting content-length values"));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(n) => Decoder::Length(n),
        None => Decoder::Close,
    })
}

/// Where the body stands.
#[derive(Debug)]
enum Decoder {
    /// This many bytes are left.
    Length(u64),
    Chunked(Chunked),
    /// Up to the close (the connection is not reused).
    Close,
    /// Ended (the close-delimited body included).
    Done,
}

impl Decoder {
    fn finished(&self) -> bool {
        matches!(
            self,
            Decoder::Length(0)
                | Decoder::Done
                | Decoder::Chunked(Chunked {
                    state: ChunkState::End,
                    ..
                })
        )
    }

    /// Decodes `input`, appending the body's bytes to `out`. Returns how many bytes of `input`
    /// belong to the body (the rest follows the response).
    fn decode(&mut self, input: &[u8], out: &mut BytesMut) -> Result<usize, H1Error> {
        match self {
            Decoder::Length(left) => {
                let n = usize::try_from(*left).unwrap_or(usize::MAX).min(input.len());
                out.extend_from_slice(&input[..n]);
                *left -= n as u64;
                Ok(n)
            }
            Decoder::Close => {
                out.extend_from_slice(input);
                Ok(input.len())
            }
            Decoder::Chunked(c) => c.decode(input, out),
            Decoder::Done => Ok(0),
        }
    }

    /// The connection closed: Ok when that ends the body.
    fn eof(&mut self) -> Result<(), H1Error> {
        match self {
            Decoder::Close | Decoder::Done => {
                *self = Decoder::Done;
                Ok(())
            }
            d if d.finished() => Ok(()),
            _ => Err(H1Error::Incomplete),
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading the chunk size's hex digits.
    #[default]
    Size,
    /// After the digits: whitespace, then `;` extensions or CR.
    SizeTail,
    /// Inside extensions, up to CR.
    Extension,
    /// The size line's LF.
    SizeLf,
    /// Inside the chunk's data.
    Data,
    /// The CR after the data.
    DataCr,
    /// The LF after the data.
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    /// Inside a trailer line.
    Trailer,
    /// The LF ending a trailer line.
    TrailerLf,
    /// The final LF.
    EndLf,
    End,
}

/// The chunked decoder's state: byte by byte through the framing, in bulk through the data, so it
/// keeps no bytes across reads.
#[derive(Debug, Default)]
struct Chunked {
    state: ChunkState,
    /// The size being read, then what is left of the chunk.
    size: u64,
    /// Digits of the size line read, and those after its leading zeros (at most 15: < 2^60).
    digits: u8,
    significant: u8,
    /// Framing bytes (extensions, trailers) read so far.
    meta: usize,
}

impl Chunked {
    fn decode(&mut self, input: &[u8], out: &mut BytesMut) -> Result<usize, H1Error> {
        let bad = |what| Err(H1Error::Framing(what));
        let mut i = 0;
        while i < input.len() && self.state != ChunkState::End {
            if self.state == ChunkState::Data {
                let n = usize::try_from(self.size).unwrap_or(usize::MAX).min(input.len() - i);
                out.extend_from_slice(&input[i..i + n]);
                self.size -= n as u64;
                i += n;
                if self.size == 0 {
                    self.state = ChunkState::DataCr;
                }
                continue;
            }
            let b = input[i];
            i += 1;
            if !matches!(self.state, ChunkState::Size | ChunkState::DataCr | ChunkState::DataLf) {
                self.meta += 1;
                if self.meta > MAX_CHUNK_META {
                    return bad("chunk extensions or trailers too large");
                }
            }
            self.state = match (self.state, b) {
                (ChunkState::Size, b) if b.is_ascii_hexdigit() => {
                    // Leading zeros are valid and count for nothing (but a size was given).
                    if self.size > 0 || b != b'0' {
                        if self.significant >= 15 {
                            return bad("chunk size too large");
                        }
                        self.significant += 1;
                    }
                    self.digits = self.digits.saturating_add(1);
                    self.size = self.size * 16 + u64::from((b as char).to_digit(16).unwrap_or(0));
                    ChunkState::Size
                }
                (ChunkState::Size, _) if self.digits == 0 => return bad("chunk size missing"),
                (ChunkState::Size | ChunkState::SizeTail, b' ' | b'\t') => ChunkState::SizeTail,
                (ChunkState::Size | ChunkState::SizeTail, b';') => ChunkState::Extension,
                (ChunkState::Size | ChunkState::SizeTail | ChunkState::Extension, b'\r') => ChunkState::SizeLf,
                (ChunkState::Extension, b'\n') => return bad("bare LF in a chunk extension"),
                (ChunkState::Extension, _) => ChunkState::Extension,
                (ChunkState::SizeLf, b'\n') => {
                    self.digits = 0;
                    self.significant = 0;
                    self.meta = 0;
                    if self.size == 0 {
                        ChunkState::TrailerStart
                    } else {
                        ChunkState::Data
                    }
                }
                (ChunkState::DataCr, b'\r') => ChunkState::DataLf,
                (ChunkState::DataLf, b'\n') => {
                    self.size = 0;
                    ChunkState::Size
                }
                (ChunkState::TrailerStart, b'\r') => ChunkState::EndLf,
                (ChunkState::TrailerStart | ChunkState::Trailer, b'\n') => return bad("bare LF in trailers"),
                (ChunkState::Trailer, b'\r') => ChunkState::TrailerLf,
                (ChunkState::TrailerStart | ChunkState::Trailer, _) => ChunkState::Trailer,
                (ChunkState::TrailerLf, b'\n') => ChunkState::TrailerStart,
                (ChunkState::EndLf, b'\n') => ChunkState::End,
                (ChunkState::Size | ChunkState::SizeTail, _) => return bad("invalid chunk size line"),
                (ChunkState::SizeLf | ChunkState::TrailerLf | ChunkState::EndLf, _) => return bad("CR without LF"),
                (ChunkState::DataCr | ChunkState::DataLf, _) => return bad("chunk data not followed by CRLF"),
                (ChunkState::Data | ChunkState::End, _) => self.state,
            };
        }
        Ok(i)
    }
}

/// A response body read straight from its connection by whoever polls it.
pub struct H1Body {
    /// The connection; None once the body ended (and the connection went back to its pool or
    /// was closed).
    io: Option<Io>,
    decoder: Decoder,
    /// Bytes read with the head that belong to the body.
    pending: Option<Bytes>,
    /// Whether the connection may carry another request once this body ended cleanly.
    keep_alive: bool,
    pool: Weak<PoolInner>,
    key: Arc<str>,
}

impl std::fmt::Debug for H1Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Body")
            .field("decoder", &self.decoder)
            .finish_non_exhaustive()
    }
}

impl H1Body {
    /// The body ended cleanly: the connection goes back to its pool when it may be kept alive.
    fn release(&mut self) {
        self.decoder = Decoder::Done;
        let Some(io) = self.io.take() else { return };
        if !self.keep_alive {
            return;
        }
        if let Some(pool) = self.pool.upgrade() {
            pool.put(self.key.clone(), io);
        }
    }

    /// Decodes `input`; bytes past the body's end make the connection unusable.
    fn take(&mut self, input: &[u8]) -> Result<Option<Bytes>, H1Error> {
        let mut out = BytesMut::with_capacity(input.len());
        let used = self.decoder.decode(input, &mut out)?;
        if used < input.len() {
            // The upstream sent more than the response: never reuse that connection.
            self.keep_alive = false;
        }
        if self.decoder.finished() {
            self.release();
        }
        Ok((!out.is_empty()).then(|| out.freeze()))
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        let this = &mut *self;
        if let Some(p) = this.pending.take() {
            match this.take(&p) {
                Ok(Some(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(None) => {}
                Err(e) => return Poll::Ready(Some(Err(this.fail(e)))),
            }
        }
        loop {
            if this.decoder.finished() {
                this.release();
                return Poll::Ready(None);
            }
            let Some(io) = this.io.as_mut() else {
                return Poll::Ready(None);
            };
            let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut buf = ReadBuf::uninit(&mut stack);
            match Pin::new(io).poll_read(cx, &mut buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(this.fail(H1Error::Read(e))))),
                Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                    this.keep_alive = false;
                    return match this.decoder.eof() {
                        Ok(()) => {
                            this.release();
                            Poll::Ready(None)
                        }
                        Err(e) => Poll::Ready(Some(Err(this.fail(e)))),
                    };
                }
                Poll::Ready(Ok(())) => match this.take(buf.filled()) {
                    Ok(Some(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    // Only framing arrived: read on.
                    Ok(None) => {}
                    Err(e) => return Poll::Ready(Some(Err(this.fail(e)))),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_none() && self.decoder.finished()
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.decoder, &self.pending) {
            (Decoder::Length(n), None) => SizeHint::with_exact(*n),
            (Decoder::Done, None) => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

impl H1Body {
    /// The body broke: the connection is closed, the error passed on.
    fn fail(&mut self, e: H1Error) -> H1Error {
        self.io = None;
        self.keep_alive = false;
        self.decoder = Decoder::Done;
        e
    }
}

#[cfg(test)]
#[path = "h1_tests.rs"]
mod tests;
