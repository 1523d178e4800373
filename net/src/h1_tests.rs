#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::client::{HttpVersion, UpstreamBody, UpstreamError, Upstreams};
use http_body_util::{BodyExt, Full};
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

fn chunked(input: &[&[u8]]) -> Result<Vec<u8>, H1Error> {
    let mut d = Decoder::Chunked(Chunked::default());
    let mut out = BytesMut::new();
    for piece in input {
        let used = d.decode(piece, &mut out)?;
        assert_eq!(used, piece.len(), "no bytes follow the body here");
    }
    assert!(d.finished(), "the terminal chunk ends the body");
    Ok(out.to_vec())
}

#[test]
fn chunked_bodies_decode_however_the_reads_split_them() {
    let wire = b"5\r\nhello\r\n7;ext=\"x\"\r\n, world\r\n0\r\nx-trailer: 1\r\n\r\n";
    assert_eq!(chunked(&[wire]).unwrap(), b"hello, world");
    // Every split point, and byte by byte.
    for at in 0..wire.len() {
        assert_eq!(
            chunked(&[&wire[..at], &wire[at..]]).unwrap(),
            b"hello, world",
            "split at {at}"
        );
    }
    let bytes: Vec<&[u8]> = wire.chunks(1).collect();
    assert_eq!(chunked(&bytes).unwrap(), b"hello, world");
    // Upper-case hex, whitespace before CRLF, no trailers.
    assert_eq!(chunked(&[b"A \r\n0123456789\r\n0\r\n\r\n"]).unwrap(), b"0123456789");
    // Leading zeros, however many (a broken-upstream test sent sizes as 16 hex digits).
    assert_eq!(
        chunked(&[b"000000000000000000000003\r\nabc\r\n00000000000000000000\r\n\r\n"]).unwrap(),
        b"abc"
    );
}

#[test]
fn chunked_decoding_stops_at_the_body_end_and_refuses_bad_framing() {
    let mut d = Decoder::Chunked(Chunked::default());
    let mut out = BytesMut::new();
    let used = d.decode(b"2\r\nok\r\n0\r\n\r\nHTTP/1.1 200", &mut out).unwrap();
    assert_eq!(used, 12, "the bytes after the terminal chunk are not the body's");
    assert!(d.finished());
    for bad in [
        &b"x\r\n"[..],
        b"\r\n",
        b"5\r\nhelloX\r\n",
        b"5\nhello\r\n",
        b"10000000000000000\r\n",
        b"0\r\nbad\ntrailer\r\n\r\n",
    ] {
        let mut d = Decoder::Chunked(Chunked::default());
        assert!(
            matches!(d.decode(bad, &mut BytesMut::new()), Err(H1Error::Framing(_))),
            "{:?} is refused",
            String::from_utf8_lossy(bad)
        );
    }
    // Extensions cannot grow without bound.
    let mut d = Decoder::Chunked(Chunked::default());
    let mut line = b"1;".to_vec();
    line.resize(MAX_CHUNK_META + 10, b'a');
    assert!(d.decode(&line, &mut BytesMut::new()).is_err());
    // Many chunks are fine (the limit is per size line and for the trailers).
    let mut d = Decoder::Chunked(Chunked::default());
    let mut out = BytesMut::new();
    for _ in 0..20_000 {
        d.decode(b"1;e\r\nx\r\n", &mut out).unwrap();
    }
    assert_eq!(out.len(), 20_000);
}

fn head(text: &str) -> http::response::Parts {
    let mut buf = BytesMut::from(text.as_bytes());
    let parts = parse_head(&mut buf).unwrap().unwrap();
    assert!(buf.is_empty(), "the whole head was taken");
    parts
}

#[test]
fn framing_follows_rfc_9112() {
    let post = Method::POST;
    assert!(matches!(
        framing(&post, &head("HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n")),
        Ok(Decoder::Length(12))
    ));
    assert!(matches!(
        framing(&post, &head("HTTP/1.1 200 OK\r\ncontent-length: 12, 12\r\n\r\n")),
        Ok(Decoder::Length(12))
    ));
    assert!(framing(
        &post,
        &head("HTTP/1.1 200 OK\r\ncontent-length: 12\r\ncontent-length: 13\r\n\r\n")
    )
    .is_err());
    assert!(framing(&post, &head("HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n")).is_err());
    assert!(framing(&post, &head("HTTP/1.1 200 OK\r\ncontent-length: +1\r\n\r\n")).is_err());
    // transfer-encoding wins over content-length; chunked must be last, else up to the close.
    assert!(matches!(
        framing(
            &post,
            &head("HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: gzip, chunked\r\n\r\n")
        ),
        Ok(Decoder::Chunked(_))
    ));
    assert!(matches!(
        framing(
            &post,
            &head("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n")
        ),
        Ok(Decoder::Close)
    ));
    assert!(matches!(
        framing(&post, &head("HTTP/1.1 200 OK\r\n\r\n")),
        Ok(Decoder::Close)
    ));
    assert!(matches!(
        framing(&post, &head("HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n")),
        Ok(Decoder::Length(0))
    ));
    assert!(matches!(
        framing(&Method::HEAD, &head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")),
        Ok(Decoder::Length(0))
    ));
    let h = head("HTTP/1.1 429 Too Many\r\nRetry-After: 7\r\nx-a: b c\r\nx-a:\td\r\n\r\n");
    assert_eq!(h.status, 429);
    assert_eq!(h.headers["retry-after"], "7");
    let xa: Vec<_> = h.headers.get_all("x-a").iter().collect();
    assert_eq!(
        xa,
        ["b c", "d"],
        "values whole, in order, without surrounding whitespace"
    );
    assert!(keep_alive(&head("HTTP/1.1 200 OK\r\n\r\n")));
    assert!(!keep_alive(&head(
        "HTTP/1.1 200 OK\r\nconnection: keep-alive, Close\r\n\r\n"
    )));
    assert!(!keep_alive(&head("HTTP/1.0 200 OK\r\n\r\n")));
    assert!(keep_alive(&head("HTTP/1.0 200 OK\r\nconnection: keep-alive\r\n\r\n")));
}

/// A scripted upstream: each accepted connection reads one request head (and its body, by
/// content-length) per answer and writes the answer as the script says.
struct Upstream {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<String>>>,
}

/// What the upstream does with each request on a connection: write these pieces (a pause
/// between them), then keep the connection or close it.
#[derive(Clone)]
struct Answer {
    pieces: Vec<Vec<u8>>,
    close: bool,
}

fn answer(text: &str) -> Answer {
    Answer {
        pieces: vec![text.as_bytes().to_vec()],
        close: false,
    }
}

async fn upstream(script: Vec<Answer>) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let script = Arc::new(Mutex::new(script.into_iter()));
    let (a, r) = (accepted.clone(), requests.clone());
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            let (script, requests) = (script.clone(), r.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    // One request: the head, then content-length bytes.
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .map(|v| v.trim().parse().unwrap())
                        .unwrap_or(0);
                    while buf.len() < end + len {
                        let mut chunk = [0u8; 4096];
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let request = String::from_utf8_lossy(&buf[..end + len]).to_string();
                    buf.drain(..end + len);
                    requests.lock().unwrap().push(request);
                    let Some(ans) = script.lock().unwrap().next() else {
                        return;
                    };
                    for (i, p) in ans.pieces.iter().enumerate() {
                        if i > 0 {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        if sock.write_all(p).await.is_err() {
                            return;
                        }
                    }
                    if ans.close {
                        return;
                    }
                }
            });
        }
    });
    Upstream {
        addr,
        accepted,
        requests,
    }
}

fn upstreams() -> Upstreams {
    let u = Upstreams::new(&Default::default()).unwrap();
    u.set_http_version(HttpVersion::Http1);
    u
}

fn post(addr: std::net::SocketAddr, body: &'static str) -> http::Request<Full<Bytes>> {
    http::Request::builder()
        .method(Method::POST)
        .uri(format!("http://{addr}/v1/messages?beta=true"))
        .header("x-api-key", "k")
        .header("content-length", "999")
        .header("transfer-encoding", "chunked")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

async fn call(u: &Upstreams, req: http::Request<Full<Bytes>>) -> Result<(u16, Vec<u8>), String> {
    let resp = u.request(None, req).await.map_err(|e| e.to_string())?;
    assert!(
        matches!(resp.body(), UpstreamBody::H1(_)),
        "HTTP/1.1 goes over relay's own connection"
    );
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, body.to_vec()))
}

#[tokio::test]
async fn requests_are_written_whole_and_kept_alive_connections_reused() {
    let up = upstream(vec![
        answer("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"),
        answer("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
        answer("HTTP/1.1 429 Too Many Requests\r\ncontent-length: 0\r\n\r\n"),
    ])
    .await;
    let u = upstreams();
    assert_eq!(
        call(&u, post(up.addr, "{\"a\":1}")).await.unwrap(),
        (200, b"{}".to_vec())
    );
    assert_eq!(call(&u, post(up.addr, "x")).await.unwrap(), (200, b"abc".to_vec()));
    assert_eq!(call(&u, post(up.addr, "")).await.unwrap(), (429, Vec::new()));
    assert_eq!(
        up.accepted.load(Ordering::SeqCst),
        1,
        "one connection carried all three"
    );
    let reqs = up.requests.lock().unwrap().clone();
    let first = &reqs[0];
    assert!(first.starts_with("POST /v1/messages?beta=true HTTP/1.1\r\n"), "{first}");
    assert!(first.contains(&format!("host: {}\r\n", up.addr)));
    assert!(first.contains("x-api-key: k\r\n"));
    assert!(first.contains("content-length: 7\r\n"), "relay's own length: {first}");
    assert!(
        !first.contains("999") && !first.contains("transfer-encoding"),
        "{first}"
    );
    assert!(first.ends_with("\r\n\r\n{\"a\":1}"));
    assert!(reqs[2].contains("content-length: 0\r\n"), "an empty POST says so");
}

#[tokio::test]
async fn a_stream_arrives_frame_by_frame_as_the_upstream_writes_it() {
    let events = [
        "event: message_start\ndata: {}\n\n",
        "event: content_block_delta\ndata: {}\n\n",
        "event: message_stop\ndata: {}\n\n",
    ];
    let mut pieces =
        vec![b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n".to_vec()];
    for e in events {
        pieces.push(format!("{:x}\r\n{e}\r\n", e.len()).into_bytes());
    }
    pieces.push(b"0\r\n\r\n".to_vec());
    let up = upstream(vec![Answer { pieces, close: false }]).await;
    let u = upstreams();
    let resp = u.request(None, post(up.addr, "{}")).await.unwrap();
    let mut body = resp.into_body();
    let mut frames = Vec::new();
    while let Some(f) = body.frame().await {
        frames.push(f.unwrap().into_data().unwrap());
    }
    assert_eq!(
        frames,
        events.map(|e| Bytes::from(e.as_bytes())),
        "one frame per write, nothing else"
    );
    assert!(body.is_end_stream());
}

#[tokio::test]
async fn a_body_cut_by_the_upstream_is_an_error_and_its_connection_is_not_reused() {
    let up = upstream(vec![
        Answer {
            close: true,
            ..answer("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel")
        },
        Answer {
            close: true,
            ..answer("HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello")
        },
        // Up to the close: the whole body, then a new connection.
        Answer {
            close: true,
            ..answer("HTTP/1.1 200 OK\r\n\r\nto the end")
        },
        answer("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
    ])
    .await;
    let u = upstreams();
    let e = call(&u, post(up.addr, "")).await.unwrap_err();
    assert!(e.contains("before the response body ended"), "{e}");
    let e = call(&u, post(up.addr, "")).await.unwrap_err();
    assert!(e.contains("before the response body ended"), "{e}");
    assert_eq!(
        call(&u, post(up.addr, "")).await.unwrap(),
        (200, b"to the end".to_vec())
    );
    assert_eq!(call(&u, post(up.addr, "")).await.unwrap(), (200, b"ok".to_vec()));
    assert_eq!(up.accepted.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn connections_the_upstream_closed_or_said_close_on_are_not_reused() {
    let up = upstream(vec![
        // Closes after answering, without saying so: the idle check finds it closed.
        Answer {
            close: true,
            ..answer("HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na")
        },
        answer("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\nb"),
        // Sends more than its length: the extra bytes are not the next answer.
        answer("HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\ncHTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nX"),
        answer("HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nd"),
        answer("HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\ne"),
    ])
    .await;
    let u = upstreams();
    for expect in ["a", "b", "c", "d", "e"] {
        assert_eq!(
            call(&u, post(up.addr, "")).await.unwrap(),
            (200, expect.as_bytes().to_vec())
        );
        // Let a close reach this side before the next request.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        up.accepted.load(Ordering::SeqCst),
        4,
        "a, b and c each end their connection; d and e share one"
    );
}

#[tokio::test]
async fn bad_heads_are_errors_and_informational_heads_are_skipped() {
    let up = upstream(vec![
        answer("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok"),
        answer("HTTP/1.1 2000 Wrong\r\n\r\n"),
        Answer {
            close: true,
            ..answer("HTTP/1.1 200 OK\r\ncontent-le")
        },
        Answer {
            close: true,
            ..answer("")
        },
        answer("HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n"),
    ])
    .await;
    let u = upstreams();
    assert_eq!(call(&u, post(up.addr, "")).await.unwrap(), (201, b"ok".to_vec()));
    for expect in [
        "not valid HTTP/1.1",
        "closed the connection inside the head",
        "closed the connection before answering",
        "not validly framed",
    ] {
        let e = call(&u, post(up.addr, "")).await.unwrap_err();
        assert!(e.contains(expect.split(' ').next_back().unwrap()), "{expect}: {e}");
    }
    // An endless head is cut at MAX_HEAD_BYTES.
    let mut big = "HTTP/1.1 200 OK\r\n".to_string();
    while big.len() <= MAX_HEAD_BYTES {
        big.push_str("x-filler: 0123456789012345678901234567890123456789\r\n");
    }
    let up = upstream(vec![answer(&big)]).await;
    let e = u.request(None, post(up.addr, "")).await.unwrap_err();
    assert!(
        matches!(e, UpstreamError::H1(H1Error::HeadTooLarge | H1Error::Head(_))),
        "{e}"
    );
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_connect_error() {
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let e = upstreams().request(None, post(addr, "")).await.unwrap_err();
    assert!(e.is_connect(), "{e}");
}

#[tokio::test]
async fn dropping_a_body_midway_closes_its_connection() {
    let up = upstream(vec![
        Answer {
            pieces: vec![
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n".to_vec(),
                b"1\r\nb\r\n0\r\n\r\n".to_vec(),
            ],
            close: false,
        },
        answer("HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nz"),
    ])
    .await;
    let u = upstreams();
    let resp = u.request(None, post(up.addr, "")).await.unwrap();
    let mut body = resp.into_body();
    assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), "a");
    drop(body);
    assert_eq!(call(&u, post(up.addr, "")).await.unwrap(), (200, b"z".to_vec()));
    assert_eq!(
        up.accepted.load(Ordering::SeqCst),
        2,
        "the half-read connection was not reused"
    );
}
