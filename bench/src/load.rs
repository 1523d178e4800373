//! The load generator: one hyper client (HTTP/1.1, keep-alive pool, no
//! connection limit), three ways to drive it.
//!
//! - [`fixed_rate`]: open loop. Request `i` is due at `start + i / rate`; a
//!   plain OS thread wakes at each due time (nanosleep, ~0.1 ms precision
//!   instead of the 1 ms of tokio's timer wheel) and hands the request to the
//!   runtime, whatever happened to earlier ones. Latency and time to first
//!   byte are measured from the *due* time, so a stall of the target (or of
//!   the generator) shows up in the percentiles instead of being hidden
//!   (no coordinated omission). The dispatch lag (actual − due) is reported
//!   too, as a health check of the generator itself.
//! - [`closed_loop`]: saturation. `concurrency` workers send back to back
//!   until `total` requests are done.
//! - [`hold_streams`]: many slow streams open at once.
//!
//! Every response body can be checked against a reference (after
//! [`normalize`]), so byte identity is verified on every request of a run.

use crate::stats::Dist;
use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    c.set_connect_timeout(Some(Duration::from_secs(10)));
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(usize::MAX)
        .pool_idle_timeout(Duration::from_secs(60))
        .build(c)
}

/// One request, sent many times.
#[derive(Debug, Clone)]
pub struct ReqTemplate {
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl ReqTemplate {
    pub fn build(&self) -> Result<http::Request<Full<Bytes>>> {
        let mut b = http::Request::builder().method(http::Method::POST).uri(&self.url);
        for (k, v) in &self.headers {
            b = b.header(k.as_str(), v.as_str());
        }
        Ok(b.body(Full::new(self.body.clone()))?)
    }
}

/// What one request gave, times in µs from its due time.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub status: u16,
    pub head_us: u64,
    pub ttfb_us: u64,
    pub total_us: u64,
    pub body: Bytes,
    pub error: Option<String>,
}

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

/// Sends one request and reads the whole body; times are measured from `due`.
pub async fn send(client: &HttpClient, req: &ReqTemplate, due: Instant) -> Outcome {
    let mut out = Outcome::default();
    let request = match req.build() {
        Ok(r) => r,
        Err(e) => {
            out.error = Some(e.to_string());
            return out;
        }
    };
    let resp = match client.request(request).await {
        Ok(r) => r,
        Err(e) => {
            out.error = Some(format!("{e:?}"));
            return out;
        }
    };
    out.head_us = us(due.elapsed());
    out.status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    let mut first = true;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Ok(d) = f.into_data() {
                    if first && !d.is_empty() {
                        out.ttfb_us = us(due.elapsed());
                        first = false;
                    }
                    buf.extend_from_slice(&d);
                }
            }
            Err(e) => {
                out.error = Some(format!("body: {e}"));
                break;
            }
        }
    }
    out.total_us = us(due.elapsed());
    out.body = Bytes::from(buf);
    out
}

/// Blanks the per-response random ids the mock puts in bodies
/// (`msg_mock_<32 hex>`, `toolu_mock_<32 hex>`, `req_mock_<32 hex>`), keeping
/// their length, so two answers to the same request compare byte for byte.
pub fn normalize(body: &[u8]) -> Vec<u8> {
    let mut out = body.to_vec();
    for prefix in [&b"msg_mock_"[..], b"toolu_mock_", b"req_mock_"] {
        let mut i = 0;
        while i + prefix.len() <= out.len() {
            if &out[i..i + prefix.len()] == prefix {
                let start = i + prefix.len();
                let mut j = start;
                while j < out.len() && j < start + 32 && out[j].is_ascii_hexdigit() {
                    out[j] = b'x';
                    j += 1;
                }
                i = j;
            } else {
                i += 1;
            }
        }
    }
    out
}

/// Number of SSE events (`event:` lines) in a body.
pub fn sse_events(body: &[u8]) -> usize {
    body.split(|b| *b == b'\n').filter(|l| l.starts_with(b"event:")).count()
}

#[derive(Debug, Clone)]
pub struct RateSpec {
    pub rate: f64,
    pub warmup: Duration,
    pub duration: Duration,
    /// Requests in flight at once before the generator gives up on a due
    /// request (counted in `skipped`: the run is then not valid).
    pub max_in_flight: usize,
    /// How long to wait for the last requests after the last one is due.
    pub drain: Duration,
}

#[derive(Debug, Default)]
pub struct RateResult {
    /// Requests sent, warm-up included.
    pub sent_all: u64,
    pub due: u64,
    pub measured: u64,
    pub ok: u64,
    pub errors: u64,
    pub skipped: u64,
    pub mismatches: u64,
    pub unfinished: u64,
    pub first_error: Option<String>,
    pub total: Dist,
    pub ttfb: Dist,
    pub lag: Dist,
    pub achieved_rps: f64,
}

struct Shared {
    total: Vec<u64>,
    ttfb: Vec<u64>,
    lag: Vec<u64>,
    ok: u64,
    errors: u64,
    mismatches: u64,
    first_error: Option<String>,
}

/// Open-loop load at a fixed arrival rate; see the module docs.
pub async fn fixed_rate(
    client: &HttpClient,
    req: &ReqTemplate,
    spec: &RateSpec,
    reference: Option<Arc<Vec<u8>>>,
) -> Result<RateResult> {
    let total_n = (spec.rate * (spec.warmup + spec.duration).as_secs_f64()).round() as u64;
    let warm_n = (spec.rate * spec.warmup.as_secs_f64()).round() as u64;
    let period = Duration::from_secs_f64(1.0 / spec.rate);
    let shared = Arc::new(Mutex::new(Shared {
        total: Vec::with_capacity(total_n as usize),
        ttfb: Vec::with_capacity(total_n as usize),
        lag: Vec::with_capacity(total_n as usize),
        ok: 0,
        errors: 0,
        mismatches: 0,
        first_error: None,
    }));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let skipped = Arc::new(AtomicU64::new(0));
    let sent_all = Arc::new(AtomicU64::new(0));
    let handle = tokio::runtime::Handle::current();
    let start = Instant::now() + Duration::from_millis(20);
    let dispatcher = {
        let shared = shared.clone();
        let in_flight = in_flight.clone();
        let skipped = skipped.clone();
        let sent_all = sent_all.clone();
        let client = client.clone();
        let req = Arc::new(req.clone());
        let max = spec.max_in_flight;
        std::thread::spawn(move || {
            for i in 0..total_n {
                let due = start + period.mul_f64(i as f64);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let measured = i >= warm_n;
                if in_flight.load(Ordering::Relaxed) >= max {
                    if measured {
                        skipped.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
                in_flight.fetch_add(1, Ordering::Relaxed);
                sent_all.fetch_add(1, Ordering::Relaxed);
                let lag = us(due.elapsed());
                let (client, req, shared, in_flight, reference) = (
                    client.clone(),
                    req.clone(),
                    shared.clone(),
                    in_flight.clone(),
                    reference.clone(),
                );
                handle.spawn(async move {
                    let o = send(&client, &req, due).await;
                    let good = o.error.is_none() && o.status == 200;
                    let mismatch = good && reference.as_ref().is_some_and(|r| normalize(&o.body) != **r);
                    if measured {
                        let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
                        s.lag.push(lag);
                        if good {
                            s.ok += 1;
                            s.total.push(o.total_us);
                            s.ttfb.push(o.ttfb_us);
                        } else {
                            s.errors += 1;
                            if s.first_error.is_none() {
                                s.first_error = Some(
                                    o.error
                                        .clone()
                                        .unwrap_or_else(|| format!("status {}: {:?}", o.status, o.body)),
                                );
                            }
                        }
                        if mismatch {
                            s.mismatches += 1;
                        }
                    }
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                });
            }
        })
    };
    tokio::task::spawn_blocking(move || dispatcher.join())
        .await
        .context("dispatcher task")?
        .map_err(|_| anyhow::anyhow!("dispatcher thread panicked"))?;
    let last_due = Instant::now();
    while in_flight.load(Ordering::Relaxed) > 0 && last_due.elapsed() < spec.drain {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let measured_span = (Instant::now() - start).saturating_sub(spec.warmup);
    let unfinished = in_flight.load(Ordering::Relaxed) as u64;
    let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
    let ok = s.ok;
    Ok(RateResult {
        sent_all: sent_all.load(Ordering::Relaxed),
        due: total_n - warm_n,
        measured: s.ok + s.errors,
        ok,
        errors: s.errors,
        skipped: skipped.load(Ordering::Relaxed),
        mismatches: s.mismatches,
        unfinished,
        first_error: s.first_error.take(),
        total: Dist::new(std::mem::take(&mut s.total)),
        ttfb: Dist::new(std::mem::take(&mut s.ttfb)),
        lag: Dist::new(std::mem::take(&mut s.lag)),
        achieved_rps: ok as f64 / measured_span.as_secs_f64().max(1e-9),
    })
}

#[derive(Debug, Default)]
pub struct ClosedResult {
    pub ok: u64,
    pub errors: u64,
    pub mismatches: u64,
    pub elapsed: Duration,
    pub total: Dist,
    pub first_error: Option<String>,
}

/// `concurrency` workers send back to back until `total` requests are done
/// (or `timeout` passes).
pub async fn closed_loop(
    client: &HttpClient,
    req: &ReqTemplate,
    concurrency: usize,
    total: u64,
    timeout: Duration,
    reference: Option<Arc<Vec<u8>>>,
) -> Result<ClosedResult> {
    let tickets = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, req, tickets, reference) = (client.clone(), req.clone(), tickets.clone(), reference.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let (mut ok, mut errors, mut mismatches, mut first_error) = (0u64, 0u64, 0u64, None);
            while tickets.fetch_add(1, Ordering::Relaxed) < total && started.elapsed() < timeout {
                let o = send(&client, &req, Instant::now()).await;
                if o.error.is_none() && o.status == 200 {
                    ok += 1;
                    lat.push(o.total_us);
                    if reference.as_ref().is_some_and(|r| normalize(&o.body) != **r) {
                        mismatches += 1;
                    }
                } else {
                    errors += 1;
                    if first_error.is_none() {
                        first_error = Some(o.error.unwrap_or_else(|| format!("status {}", o.status)));
                    }
                }
            }
            (lat, ok, errors, mismatches, first_error)
        }));
    }
    let mut r = ClosedResult::default();
    let mut lat = Vec::new();
    for t in tasks {
        let (l, ok, errors, mismatches, fe) = t.await?;
        lat.extend(l);
        r.ok += ok;
        r.errors += errors;
        r.mismatches += mismatches;
        if r.first_error.is_none() {
            r.first_error = fe;
        }
    }
    r.elapsed = started.elapsed();
    r.total = Dist::new(lat);
    Ok(r)
}

#[derive(Debug, Default)]
pub struct StreamsResult {
    pub attempted: usize,
    /// Streams that had their first event and were still open at the peak.
    pub open_at_peak: usize,
    pub failed: usize,
    pub first_error: Option<String>,
    pub baseline_rss: u64,
    pub peak_rss: u64,
    pub ramp: Duration,
}

/// Opens `n` streaming requests at `ramp_per_sec`, waits until all have their
/// first event (or `settle` passes), samples `rss()` for `hold`, then closes
/// them all. `rss` is sampled every 50 ms throughout.
pub async fn hold_streams(
    req: &ReqTemplate,
    n: usize,
    ramp_per_sec: f64,
    settle: Duration,
    hold: Duration,
    rss: impl Fn() -> u64 + Send + Sync + 'static,
) -> Result<StreamsResult> {
    let client = client();
    let open = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let first_error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let rss = Arc::new(rss);
    let baseline_rss = rss();
    let peak = Arc::new(AtomicU64::new(baseline_rss));
    let peak_open = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (rss, peak, peak_open, open, mut stop) = (
            rss.clone(),
            peak.clone(),
            peak_open.clone(),
            open.clone(),
            stop_rx.clone(),
        );
        tokio::spawn(async move {
            loop {
                let r = rss();
                if r > peak.load(Ordering::Relaxed) {
                    peak.store(r, Ordering::Relaxed);
                }
                peak_open.fetch_max(open.load(Ordering::Relaxed), Ordering::Relaxed);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    _ = stop.changed() => return,
                }
            }
        })
    };
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        tokio::time::sleep_until(started + Duration::from_secs_f64(i as f64 / ramp_per_sec)).await;
        let (client, req, open, failed, first_error, mut stop) = (
            client.clone(),
            req.clone(),
            open.clone(),
            failed.clone(),
            first_error.clone(),
            stop_rx.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let fail = |e: String| {
                failed.fetch_add(1, Ordering::Relaxed);
                let mut f = first_error.lock().unwrap_or_else(|p| p.into_inner());
                if f.is_none() {
                    *f = Some(e);
                }
            };
            let request = match req.build() {
                Ok(r) => r,
                Err(e) => return fail(e.to_string()),
            };
            let resp = tokio::select! {
                r = client.request(request) => r,
                _ = stop.wait_for(|s| *s) => return,
            };
            let resp = match resp {
                Ok(r) if r.status() == 200 => r,
                Ok(r) => return fail(format!("status {}", r.status())),
                Err(e) => return fail(format!("{e:?}")),
            };
            let mut body = resp.into_body();
            let mut counted = false;
            loop {
                tokio::select! {
                    f = body.frame() => match f {
                        Some(Ok(_)) => {
                            if !counted {
                                counted = true;
                                open.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Some(Err(e)) => {
                            if counted { open.fetch_sub(1, Ordering::Relaxed); }
                            return fail(format!("body: {e}"));
                        }
                        None => {
                            if counted { open.fetch_sub(1, Ordering::Relaxed); }
                            return fail("stream ended before the measurement".into());
                        }
                    },
                    _ = stop.wait_for(|s| *s) => {
                        // Dropping the body closes the connection.
                        return;
                    }
                }
            }
        }));
    }
    let ramp = started.elapsed();
    let deadline = tokio::time::Instant::now() + settle;
    while open.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < n && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(hold).await;
    let open_now = open.load(Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let _ = sampler.await;
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    let fe = first_error.lock().unwrap_or_else(|p| p.into_inner()).take();
    Ok(StreamsResult {
        attempted: n,
        open_at_peak: open_now,
        failed: failed.load(Ordering::Relaxed),
        first_error: fe,
        baseline_rss,
        peak_rss: peak.load(Ordering::Relaxed),
        ramp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_blanks_ids_only() {
        let a = br#"{"id":"msg_mock_0123456789abcdef0123456789abcdef","x":"msg_mock_"}"#;
        let b = br#"{"id":"msg_mock_fedcba9876543210fedcba9876543210","x":"msg_mock_"}"#;
        assert_eq!(normalize(a), normalize(b));
        assert_eq!(normalize(a).len(), a.len());
        assert_ne!(
            normalize(a),
            normalize(br#"{"id":"msg_mock_0123456789abcdef0123456789abcdef","x":"msg_mockX"}"#)
        );
    }

    #[test]
    fn counts_events() {
        assert_eq!(sse_events(b"event: a\ndata: {}\n\nevent: b\ndata: {}\n\n"), 2);
    }
}
