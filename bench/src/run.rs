//! One benchmark run: every scenario of issue 5 against direct, nginx and
//! relay, in one process, on one machine, with one load generator.

use crate::cp;
use crate::env::{self, Env, EnvOpts};
use crate::load::{self, HttpClient, RateResult, ReqTemplate};
use crate::procs;
use crate::redis::{self, Redis};
use crate::report::{Report, Row, Verdict};
use crate::stats::{round3, Dist, Spread};
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const MODEL: &str = "claude-sonnet-4-5-20250929";

/// How big a run is.
#[derive(Debug, Clone)]
pub struct Plan {
    pub mode: &'static str,
    pub rate: f64,
    pub rounds: usize,
    pub round: Duration,
    pub warmup: Duration,
    pub sat_requests: u64,
    pub sat_reps: usize,
    pub sat_concurrency: usize,
    pub streams: usize,
    pub stream_ramp: f64,
    pub watchers: usize,
    pub writes: usize,
    pub ingest_events: u64,
    pub ingest_reps: usize,
    pub ingest_streams: usize,
    pub ingest_batch: usize,
    pub starts: usize,
}

impl Plan {
    pub fn quick() -> Self {
        Self {
            mode: "quick",
            rate: 1000.0,
            rounds: 3,
            round: Duration::from_secs(3),
            warmup: Duration::from_millis(500),
            sat_requests: 4000,
            sat_reps: 2,
            sat_concurrency: 32,
            streams: 2000,
            stream_ramp: 2000.0,
            watchers: 200,
            writes: 10,
            ingest_events: 40_000,
            ingest_reps: 2,
            ingest_streams: 4,
            ingest_batch: 2000,
            starts: 3,
        }
    }

    /// A smoke test of the harness itself (seconds, numbers meaningless).
    pub fn tiny() -> Self {
        Self {
            mode: "tiny",
            rate: 200.0,
            rounds: 1,
            round: Duration::from_secs(1),
            warmup: Duration::from_millis(200),
            sat_requests: 500,
            sat_reps: 1,
            sat_concurrency: 8,
            streams: 200,
            stream_ramp: 1000.0,
            watchers: 20,
            writes: 3,
            ingest_events: 4000,
            ingest_reps: 1,
            ingest_streams: 2,
            ingest_batch: 1000,
            starts: 2,
        }
    }

    pub fn full() -> Self {
        Self {
            mode: "full",
            rate: 1000.0,
            rounds: 5,
            round: Duration::from_secs(8),
            warmup: Duration::from_secs(1),
            sat_requests: 10_000,
            sat_reps: 3,
            sat_concurrency: 32,
            streams: 10_000,
            stream_ramp: 2000.0,
            watchers: 1000,
            writes: 30,
            ingest_events: 250_000,
            ingest_reps: 2,
            ingest_streams: 4,
            ingest_batch: 2000,
            starts: 10,
        }
    }

    pub fn json(&self) -> Value {
        json!({
            "mode": self.mode,
            "rate_rps": self.rate,
            "rounds": self.rounds,
            "round_secs": self.round.as_secs_f64(),
            "warmup_secs": self.warmup.as_secs_f64(),
            "saturation_requests_per_rep": self.sat_requests,
            "saturation_reps": self.sat_reps,
            "saturation_concurrency": self.sat_concurrency,
            "slow_streams": self.streams,
            "slow_stream_ramp_per_sec": self.stream_ramp,
            "watchers": self.watchers,
            "config_writes": self.writes,
            "ingest_events_per_rep": self.ingest_events,
            "ingest_reps": self.ingest_reps,
            "ingest_streams": self.ingest_streams,
            "ingest_batch": self.ingest_batch,
            "data_plane_starts": self.starts,
        })
    }
}

#[derive(Debug, Clone)]
pub struct RunOpts {
    pub env: EnvOpts,
    pub plan: Plan,
    pub only: Option<Vec<String>>,
    pub keep_db: bool,
    pub run_id: String,
}

#[derive(Clone)]
struct Target {
    name: &'static str,
    addr: SocketAddr,
    slow_addr: SocketAddr,
    client: HttpClient,
}

struct Ctx {
    env: Env,
    plan: Plan,
    targets: Vec<Target>,
    key: String,
    /// Requests sent to relay: each becomes one usage event.
    relay_requests: u64,
    /// Normalized reference bodies (from direct): non-streaming, streaming.
    reference: [Arc<Vec<u8>>; 2],
    /// Scenario 8's data plane and Redis, kept until relay's usage is accounted.
    limits: Option<LimitsPlane>,
    report: Report,
}

/// Scenario 8: a second data plane with `--redis-url`, its Redis, and the key with limits.
struct LimitsPlane {
    dp: procs::Proc,
    redis: Redis,
    key_id: String,
}

pub fn body(stream: bool) -> Bytes {
    Bytes::from(
        json!({
            "model": MODEL,
            "max_tokens": 256,
            "stream": stream,
            "messages": [{"role": "user", "content": "Say hello to relay."}],
        })
        .to_string(),
    )
}

fn template(addr: SocketAddr, key: &str, stream: bool) -> ReqTemplate {
    ReqTemplate {
        url: format!("http://{addr}/v1/messages"),
        headers: vec![
            ("x-api-key".into(), key.into()),
            ("anthropic-version".into(), "2023-06-01".into()),
            ("content-type".into(), "application/json".into()),
        ],
        body: body(stream),
    }
}

impl Ctx {
    fn req(&self, t: &Target, stream: bool) -> ReqTemplate {
        template(t.addr, &self.key, stream)
    }

    fn wants(only: &Option<Vec<String>>, s: &str) -> bool {
        only.as_ref().is_none_or(|o| o.iter().any(|x| x == s))
    }

    fn proxy_pids(&self, name: &str) -> Vec<u32> {
        match name {
            "nginx" => self.env.nginx.tree(),
            "relay" => self.env.dp_pid().into_iter().collect(),
            _ => vec![],
        }
    }
}

fn log(msg: impl AsRef<str>) {
    eprintln!(
        "[relay-bench {}] {}",
        chrono::Utc::now().format("%H:%M:%S"),
        msg.as_ref()
    );
}

pub async fn run(opts: RunOpts) -> Result<Report> {
    let started = Instant::now();
    log(format!(
        "starting mocks, Postgres database, control plane, data plane, nginx in {}",
        opts.env.work.display()
    ));
    let env = Env::start(opts.env.clone(), &opts.run_id).await?;
    log(format!(
        "mock {} (slow {}), nginx {}, relay {}, control plane {}",
        env.mock_addr, env.slow_addr, env.nginx_addr, env.dp_addr, env.cp_url
    ));
    let targets = vec![
        Target {
            name: "direct",
            addr: env.mock_addr,
            slow_addr: env.slow_addr,
            client: load::client(),
        },
        Target {
            name: "nginx",
            addr: env.nginx_addr,
            slow_addr: env.nginx_slow_addr,
            client: load::client(),
        },
        Target {
            name: "relay",
            addr: env.dp_addr,
            slow_addr: env.dp_addr,
            client: load::client(),
        },
    ];
    let key = env.setup.key.clone();
    let mut ctx = Ctx {
        env,
        plan: opts.plan.clone(),
        targets,
        key,
        relay_requests: 0,
        reference: [Arc::new(Vec::new()), Arc::new(Vec::new())],
        limits: None,
        report: Report::new(&opts),
    };
    let result = scenarios(&mut ctx, &opts).await;
    if let Some(l) = ctx.limits.take() {
        let stopped = async {
            l.dp.stop("TERM", Duration::from_secs(15)).await?;
            l.redis.proc.stop("TERM", Duration::from_secs(5)).await
        };
        if let Err(e) = stopped.await {
            log(format!("cleanup: {e:#}"));
        }
    }
    let Ctx { env, mut report, .. } = ctx;
    if let Err(e) = &result {
        report.error = Some(format!("{e:#}"));
        log(format!("run failed: {e:#}"));
    }
    report.logs = env.logs.display().to_string();
    log("stopping everything");
    if let Err(e) = env.shutdown(opts.keep_db).await {
        log(format!("cleanup: {e:#}"));
    }
    report.elapsed_secs = started.elapsed().as_secs_f64();
    Ok(report)
}

async fn scenarios(ctx: &mut Ctx, opts: &RunOpts) -> Result<()> {
    verify(ctx).await?;
    if Ctx::wants(&opts.only, "latency") {
        log("scenario 1: non-streaming at a fixed rate");
        fixed_rate(ctx, false).await?;
        log("scenario 2: streaming at a fixed rate");
        fixed_rate(ctx, true).await?;
    }
    if Ctx::wants(&opts.only, "saturation") {
        log("scenario 3: saturation");
        saturation(ctx, false).await?;
        saturation(ctx, true).await?;
    }
    if Ctx::wants(&opts.only, "streams") {
        log("scenario 4: concurrent slow streams");
        slow_streams(ctx).await?;
    }
    if Ctx::wants(&opts.only, "limits") {
        // Before 5-7: it needs the control plane (7 stops it), and its requests are counted below.
        log("scenario 8: the limit check, Redis on loopback");
        limit_check(ctx).await?;
    }
    usage_accounted(ctx).await?;
    if Ctx::wants(&opts.only, "propagation") {
        log("scenario 5: config propagation");
        propagation(ctx).await?;
    }
    if Ctx::wants(&opts.only, "ingest") {
        log("scenario 6: usage ingest");
        ingest(ctx).await?;
    }
    if Ctx::wants(&opts.only, "start") {
        log("scenario 7: data-plane start from the cached config");
        start_from_cache(ctx).await?;
    }
    Ok(())
}

/// One request of each kind to each target: all 200, and every body equal to
/// direct's after id normalization. Also checks the mock is deterministic.
async fn verify(ctx: &mut Ctx) -> Result<()> {
    let mut out = json!({});
    for stream in [false, true] {
        let mut reference: Option<Vec<u8>> = None;
        for t in ctx.targets.clone() {
            let req = ctx.req(&t, stream);
            let mut bodies = Vec::new();
            for _ in 0..2 {
                let o = load::send(&t.client, &req, Instant::now()).await;
                if t.name == "relay" {
                    ctx.relay_requests += 1;
                }
                if o.error.is_some() || o.status != 200 {
                    bail!(
                        "{} answered {} {:?}: {}",
                        t.name,
                        o.status,
                        o.error,
                        String::from_utf8_lossy(&o.body)
                    );
                }
                bodies.push(load::normalize(&o.body));
            }
            if bodies[0] != bodies[1] {
                bail!("{}: two answers to the same request differ beyond their ids", t.name);
            }
            let r = reference.get_or_insert_with(|| bodies[0].clone());
            let identical = *r == bodies[0];
            let kind = if stream { "streaming" } else { "non_streaming" };
            out[kind][t.name] = json!({
                "bytes": bodies[0].len(),
                "sse_events": load::sse_events(&bodies[0]),
                "identical_to_direct": identical,
            });
            if !identical {
                log(format!("WARNING: {} body differs from direct's ({kind})", t.name));
            }
        }
        ctx.reference[usize::from(stream)] = Arc::new(reference.unwrap_or_default());
    }
    ctx.report.set("verification", out);
    Ok(())
}

fn rate_json(r: &RateResult, metric: &Dist) -> Value {
    json!({
        "due": r.due,
        "measured": r.measured,
        "ok": r.ok,
        "errors": r.errors,
        "skipped": r.skipped,
        "unfinished": r.unfinished,
        "mismatches": r.mismatches,
        "achieved_rps": round3(r.achieved_rps),
        "first_error": r.first_error,
        "metric": metric.summary(),
        "total": r.total.summary(),
        "ttfb": r.ttfb.summary(),
        "dispatch_lag": r.lag.summary(),
    })
}

/// Scenarios 1 and 2: rounds of direct, nginx, relay in rotating order.
async fn fixed_rate(ctx: &mut Ctx, stream: bool) -> Result<()> {
    let plan = ctx.plan.clone();
    let spec = load::RateSpec {
        rate: plan.rate,
        warmup: plan.warmup,
        duration: plan.round,
        max_in_flight: 5000,
        drain: Duration::from_secs(20),
    };
    let reference = ctx.reference[usize::from(stream)].clone();
    let mut per_target: BTreeMap<&'static str, Vec<RateResult>> = BTreeMap::new();
    let mut rounds_json = Vec::new();
    for round in 0..plan.rounds {
        let n = ctx.targets.len();
        let order: Vec<Target> = (0..n).map(|i| ctx.targets[(i + round) % n].clone()).collect();
        let mut rj = json!({"order": order.iter().map(|t| t.name).collect::<Vec<_>>()});
        for t in order {
            let req = ctx.req(&t, stream);
            let r = load::fixed_rate(&t.client, &req, &spec, Some(reference.clone())).await?;
            if t.name == "relay" {
                ctx.relay_requests += r.sent_all;
            }
            let metric = if stream { &r.ttfb } else { &r.total };
            log(format!(
                "  round {} {:>6}: p50 {:.3} ms p99 {:.3} ms ({} ok, {} errors, {} mismatches, lag p99 {:.3} ms)",
                round + 1,
                t.name,
                metric.pct_ms(50.0),
                metric.pct_ms(99.0),
                r.ok,
                r.errors,
                r.mismatches,
                r.lag.pct_ms(99.0)
            ));
            rj[t.name] = rate_json(&r, metric);
            per_target.entry(t.name).or_default().push(r);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        rounds_json.push(rj);
    }
    let metric_of = |r: &RateResult| -> Dist {
        if stream {
            r.ttfb.clone()
        } else {
            r.total.clone()
        }
    };
    let pooled: BTreeMap<&str, Dist> = per_target
        .iter()
        .map(|(k, v)| {
            (
                *k,
                Dist::merge(v.iter().map(|r| if stream { &r.ttfb } else { &r.total })),
            )
        })
        .collect();
    let diff = |a: &str, p: f64| -> Spread {
        let (Some(x), Some(d)) = (per_target.get(a), per_target.get("direct")) else {
            return Spread::default();
        };
        let v: Vec<f64> = x
            .iter()
            .zip(d)
            .map(|(x, d)| metric_of(x).pct_ms(p) - metric_of(d).pct_ms(p))
            .collect();
        Spread::of(&v)
    };
    let sum =
        |name: &str, f: fn(&RateResult) -> u64| -> u64 { per_target.get(name).map_or(0, |v| v.iter().map(f).sum()) };
    let problems: Vec<String> = ["direct", "nginx", "relay"]
        .iter()
        .filter_map(|n| {
            let (e, s, u) = (sum(n, |r| r.errors), sum(n, |r| r.skipped), sum(n, |r| r.unfinished));
            (e + s + u > 0).then(|| format!("{n}: {e} errors, {s} skipped, {u} unfinished"))
        })
        .collect();
    let (key, label, what) = if stream {
        ("streaming", "2. streaming, 30 text deltas", "added TTFB")
    } else {
        ("non_streaming", "1. non-streaming, small body", "added latency")
    };
    let mut summary = json!({
        "metric": if stream { "time to first body byte, from the due time" } else { "time to the last body byte, from the due time" },
        "rounds": rounds_json,
        "problems": problems,
    });
    for (name, d) in &pooled {
        summary["pooled"][*name] = d.summary();
    }
    for p in [50.0, 99.0] {
        for a in ["relay", "nginx"] {
            summary[format!("{a}_minus_direct_p{}_ms", p as u32)] = diff(a, p).json();
        }
    }
    let lag = Dist::merge(per_target.values().flatten().map(|r| &r.lag));
    summary["dispatch_lag_all"] = lag.summary();
    for (p, target) in [(50.0, 0.1), (99.0, 1.0)] {
        let rd = diff("relay", p);
        let nd = diff("nginx", p);
        let cell = |n: &str| pooled.get(n).map(|d| format!("{:.3}", d.pct_ms(p))).unwrap_or_default();
        let valid = problems.is_empty();
        ctx.report.rows.push(Row {
            scenario: format!("{label} @ {} rps", plan.rate),
            measure: format!("{what} p{} (ms)", p as u32),
            direct: cell("direct"),
            nginx: format!("{}; added {}", cell("nginx"), nd.fmt_signed(3)),
            relay: format!("{}; added {}", cell("relay"), rd.fmt_signed(3)),
            target: format!("≤ {target} ms"),
            verdict: if !valid {
                Verdict::Invalid
            } else if rd.median <= target {
                Verdict::Met
            } else {
                Verdict::Missed
            },
        });
    }
    let lag_cell = |n: &str| {
        per_target
            .get(n)
            .map(|v| format!("{:.3}", Dist::merge(v.iter().map(|r| &r.lag)).pct_ms(99.0)))
            .unwrap_or_default()
    };
    ctx.report.rows.push(Row {
        scenario: format!("{label} @ {} rps", plan.rate),
        measure: "generator health: dispatch lag p99 (ms), included in every latency above".into(),
        direct: lag_cell("direct"),
        nginx: lag_cell("nginx"),
        relay: lag_cell("relay"),
        target: "—".into(),
        verdict: Verdict::Info,
    });
    if stream {
        let total = |n: &str| sum(n, |r| r.ok);
        let mism = |n: &str| sum(n, |r| r.mismatches);
        let events = load::sse_events(&ctx.reference[1]);
        ctx.report.rows.push(Row {
            scenario: format!("{label} @ {} rps", plan.rate),
            measure: format!("bodies identical to direct's ({events} events each, ids blanked)"),
            direct: format!("{}/{}", total("direct") - mism("direct"), total("direct")),
            nginx: format!("{}/{}", total("nginx") - mism("nginx"), total("nginx")),
            relay: format!("{}/{}", total("relay") - mism("relay"), total("relay")),
            target: "every event byte-identical".into(),
            verdict: if mism("relay") == 0 && total("relay") > 0 {
                Verdict::Met
            } else {
                Verdict::Missed
            },
        });
        summary["mismatches"] = json!({"direct": mism("direct"), "nginx": mism("nginx"), "relay": mism("relay")});
    }
    ctx.report.set(key, summary);
    Ok(())
}

/// Scenario 3: closed loop at saturation; CPU of the proxy process per 10,000 requests.
async fn saturation(ctx: &mut Ctx, stream: bool) -> Result<()> {
    let plan = ctx.plan.clone();
    let reference = ctx.reference[usize::from(stream)].clone();
    let mock_pid = ctx.env.mock.pid;
    let cp_pid = ctx.env.cp.as_ref().map(|p| p.pid);
    let mut reps_json = Vec::new();
    let mut per: BTreeMap<&'static str, Vec<(f64, f64, f64)>> = BTreeMap::new(); // (cpu/10k, rps, mock cpu/10k)
    let mut cp_cpu = Vec::new();
    let mut errors = 0;
    for rep in 0..plan.sat_reps {
        let n = ctx.targets.len();
        for i in 0..n {
            let t = ctx.targets[(i + rep) % n].clone();
            let req = ctx.req(&t, stream);
            let pids = ctx.proxy_pids(t.name);
            let (p0, m0, c0) = (
                procs::cpu_secs(&pids),
                procs::cpu_secs(&[mock_pid]),
                cp_pid.map(|p| procs::cpu_secs(&[p])),
            );
            let r = load::closed_loop(
                &t.client,
                &req,
                plan.sat_concurrency,
                plan.sat_requests,
                Duration::from_secs(120),
                Some(reference.clone()),
            )
            .await?;
            let (p1, m1, c1) = (
                procs::cpu_secs(&pids),
                procs::cpu_secs(&[mock_pid]),
                cp_pid.map(|p| procs::cpu_secs(&[p])),
            );
            if t.name == "relay" {
                ctx.relay_requests += r.ok + r.errors;
                if let (Some(a), Some(b)) = (c0, c1) {
                    cp_cpu.push((b - a) / r.ok.max(1) as f64 * 10_000.0);
                }
            }
            errors += r.errors + r.mismatches;
            let per10k = (p1 - p0) / r.ok.max(1) as f64 * 10_000.0;
            let mock10k = (m1 - m0) / r.ok.max(1) as f64 * 10_000.0;
            let rps = r.ok as f64 / r.elapsed.as_secs_f64();
            log(format!(
                "  {} rep {} {:>6}: {:.0} rps, proxy {:.3} CPU s/10k, mock {:.3} CPU s/10k ({} errors, {} mismatches)",
                if stream { "streaming" } else { "non-streaming" },
                rep + 1,
                t.name,
                rps,
                per10k,
                mock10k,
                r.errors,
                r.mismatches
            ));
            reps_json.push(json!({
                "rep": rep + 1, "target": t.name, "ok": r.ok, "errors": r.errors, "mismatches": r.mismatches,
                "first_error": r.first_error, "elapsed_secs": r.elapsed.as_secs_f64(), "rps": round3(rps),
                "proxy_cpu_secs": round3(p1 - p0), "proxy_cpu_secs_per_10k": round3(per10k),
                "mock_cpu_secs_per_10k": round3(mock10k), "latency": r.total.summary(),
            }));
            per.entry(t.name).or_default().push((per10k, rps, mock10k));
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    let col = |n: &str, f: fn(&(f64, f64, f64)) -> f64| -> Spread {
        Spread::of(
            &per.get(n)
                .map(|v| v.iter().map(f).collect::<Vec<_>>())
                .unwrap_or_default(),
        )
    };
    let ratios: Vec<f64> = per
        .get("relay")
        .zip(per.get("nginx"))
        .map(|(r, g)| r.iter().zip(g).map(|(r, g)| r.0 / g.0.max(1e-9)).collect())
        .unwrap_or_default();
    let ratio = Spread::of(&ratios);
    let kind = if stream { "streaming" } else { "non-streaming" };
    let cp = Spread::of(&cp_cpu);
    ctx.report.rows.push(Row {
        scenario: format!("3. saturation, {kind}, {} connections", plan.sat_concurrency),
        measure: "proxy CPU s per 10,000 requests".into(),
        direct: format!("— (mock {:.2})", col("direct", |x| x.2).median),
        nginx: col("nginx", |x| x.0).fmt(2),
        relay: format!(
            "{} = {}× nginx (+ control plane {:.2})",
            col("relay", |x| x.0).fmt(2),
            ratio.fmt(2),
            cp.median
        ),
        target: "≤ 1.5× nginx".into(),
        verdict: if errors > 0 {
            Verdict::Invalid
        } else if ratio.median <= 1.5 {
            Verdict::Met
        } else {
            Verdict::Missed
        },
    });
    ctx.report.rows.push(Row {
        scenario: format!("3. saturation, {kind}, {} connections", plan.sat_concurrency),
        measure: "throughput (requests/s, generator on the same 2 cores)".into(),
        direct: col("direct", |x| x.1).fmt(0),
        nginx: col("nginx", |x| x.1).fmt(0),
        relay: col("relay", |x| x.1).fmt(0),
        target: "—".into(),
        verdict: Verdict::Info,
    });
    ctx.report.set(
        &format!("saturation_{}", kind.replace('-', "_")),
        json!({
            "reps": reps_json,
            "relay_over_nginx_cpu": ratio.json(),
            "control_plane_cpu_secs_per_10k": cp.json(),
        }),
    );
    Ok(())
}

/// Scenario 4: many concurrent slow streams; resident memory at the peak.
async fn slow_streams(ctx: &mut Ctx) -> Result<()> {
    let plan = ctx.plan.clone();
    let me = std::process::id();
    let my_nofile = procs::nofile(me).unwrap_or(1024);
    let mut out = json!({});
    let mut rows: BTreeMap<&str, String> = BTreeMap::new();
    let mut verdict = Verdict::Info;
    for t in ctx.targets.clone() {
        if t.name == "direct" {
            continue;
        }
        let pids = ctx.proxy_pids(t.name);
        // relay holds two sockets per stream (client and upstream); so does
        // each nginx worker for the streams it serves.
        let proxy_nofile = pids.iter().filter_map(|p| procs::nofile(*p)).min().unwrap_or(1024);
        let cap = ((proxy_nofile.saturating_sub(256)) / 2).min(my_nofile.saturating_sub(256)) as usize;
        let n = plan.streams.min(cap);
        let key = if t.name == "relay" {
            ctx.env.setup.slow_key.clone()
        } else {
            ctx.key.clone()
        };
        let req = template(t.slow_addr, &key, true);
        let pids2 = pids.clone();
        let hwm0 = procs::hwm_bytes(&pids);
        log(format!("  {}: opening {n} streams (fd limit {proxy_nofile})", t.name));
        let r = load::hold_streams(
            &req,
            n,
            plan.stream_ramp,
            Duration::from_secs(20),
            Duration::from_secs(2),
            move || procs::rss_bytes(&pids2),
        )
        .await?;
        if t.name == "relay" {
            ctx.relay_requests += (r.open_at_peak + r.failed) as u64;
        }
        let hwm = procs::hwm_bytes(&pids);
        let per = r.peak_rss.saturating_sub(r.baseline_rss) as f64 / r.open_at_peak.max(1) as f64;
        let at_10k = r.peak_rss as f64 + per * (10_000usize.saturating_sub(r.open_at_peak)) as f64;
        log(format!(
            "  {}: {} open, {} failed, RSS {:.1} MB → {:.1} MB, {:.0} bytes per stream{}",
            t.name,
            r.open_at_peak,
            r.failed,
            r.baseline_rss as f64 / 1e6,
            r.peak_rss as f64 / 1e6,
            per,
            r.first_error
                .as_ref()
                .map(|e| format!(" (first error: {e})"))
                .unwrap_or_default()
        ));
        out[t.name] = json!({
            "attempted": r.attempted, "open_at_peak": r.open_at_peak, "failed": r.failed,
            "first_error": r.first_error, "fd_limit": proxy_nofile, "cap_by_fd_limit": cap,
            "baseline_rss_bytes": r.baseline_rss, "peak_rss_bytes": r.peak_rss,
            "bytes_per_stream": per.round(), "vm_hwm_before": hwm0, "vm_hwm_after": hwm,
            "ramp_secs": r.ramp.as_secs_f64(), "extrapolated_rss_at_10000_bytes": at_10k.round(),
        });
        let reached = r.open_at_peak;
        let mut cell = format!(
            "{:.1} MB at {reached} streams ({:.1} MB idle), {:.1} KB/stream",
            r.peak_rss as f64 / 1e6,
            r.baseline_rss as f64 / 1e6,
            per / 1e3
        );
        if reached < 10_000 {
            if n < plan.streams {
                cell.push_str(&format!(
                    "; {n} is the most the open-files limit ({proxy_nofile}) allows at 2 sockets per stream"
                ));
            }
            cell.push_str(&format!("; ≈ {:.0} MB at 10,000 (extrapolated)", at_10k / 1e6));
        }
        rows.insert(t.name, cell);
        if t.name == "relay" {
            verdict = if reached == 0 || r.failed > 0 && reached < n / 2 {
                Verdict::Invalid
            } else if at_10k <= 200e6 {
                Verdict::Met
            } else {
                Verdict::Missed
            };
        }
        // Let both sides tear the streams down.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    ctx.report.rows.push(Row {
        scenario: format!(
            "4. {} concurrent slow streams (1 event/{} ms)",
            plan.streams, ctx.env.opts.slow_event_delay_ms
        ),
        measure: "proxy RSS at peak; bytes per open stream".into(),
        direct: "—".into(),
        nginx: rows.get("nginx").cloned().unwrap_or_default(),
        relay: rows.get("relay").cloned().unwrap_or_default(),
        target: "≤ 200 MB in all at 10,000".into(),
        verdict,
    });
    ctx.report.set("slow_streams", out);
    Ok(())
}

/// Scenario 8: what the limit check costs. A second data plane, fed by the same control
/// plane, runs with `--redis-url` to a `redis-server` of its own on loopback. Through it, a
/// key with limits it never reaches (each request: one Lua script when admitted, one when it
/// settles) against a key without limits; both pay the sticky-session lookup in Redis (a
/// `GETEX` per request) that any data plane with `--redis-url` makes. The run's own data plane
/// (no Redis) with the key without limits is the third way in. Interleaved: (a) added latency
/// at a fixed rate, non-streaming, rounds in rotating order (as scenario 1); (b) CPU at
/// saturation, data plane plus Redis (as scenario 3).
async fn limit_check(ctx: &mut Ctx) -> Result<()> {
    let plan = ctx.plan.clone();
    let dir = ctx.env.opts.work.join("limits");
    let redis = Redis::start(&ctx.env.opts.redis_server, &dir.join("redis"), &ctx.env.logs).await?;
    let (limited_key, key_id) = cp::limited_key(&mut ctx.env.admin, "bench-limited").await?;
    let dp_dir = dir.join("data-plane");
    std::fs::create_dir_all(&dp_dir)?;
    let addr: SocketAddr = format!("127.0.0.1:{}", procs::free_port()?).parse()?;
    let mut cmd = env::data_plane_cmd(
        &ctx.env.opts.bins,
        &ctx.env.cp_url,
        addr,
        &dp_dir,
        &ctx.env.setup.dp_token,
        "bench-dp-limits",
    );
    cmd.arg("--redis-url").arg(redis.url());
    let dp = procs::Proc::spawn("data-plane-limits", cmd, &ctx.env.logs)?;
    let (dp_pid, redis_pid, redis_addr) = (dp.pid, redis.proc.pid, redis.addr);
    ctx.limits = Some(LimitsPlane { dp, redis, key_id });
    env::wait_ready(addr, Instant::now(), Duration::from_secs(60))
        .await
        .context("waiting for the data plane with --redis-url to be ready")?;
    let plain_pid = ctx.env.dp_pid().context("the run's data plane is not running")?;
    log(format!(
        "  data plane {addr} (pid {dp_pid}) with Redis {redis_addr} (pid {redis_pid}); the run's data plane (pid {plain_pid}) has none"
    ));

    // The ways in: the mock itself, the run's data plane (no Redis), and the data plane with
    // Redis with each key. CPU is counted for the processes each one runs through.
    let variants = [
        ("direct", template(ctx.env.mock_addr, &ctx.key, false)),
        ("no_redis", template(ctx.env.dp_addr, &ctx.key, false)),
        ("unlimited", template(addr, &ctx.key, false)),
        ("limited", template(addr, &limited_key, false)),
    ];
    let clients: BTreeMap<&str, HttpClient> = variants.iter().map(|(n, _)| (*n, load::client())).collect();
    let client = |n: &&str| clients.get(*n).cloned().unwrap_or_else(load::client);
    let reference = ctx.reference[0].clone();

    // Every key answers, with direct's body; only the limited one runs scripts (the data
    // plane's heartbeat is a script too, once a second: hence 50 requests and a margin).
    let mut checks = json!({});
    for (name, req) in &variants[1..] {
        let sent = 50u64;
        let before = redis::counters(redis_addr).await?;
        let mut identical = 0;
        for _ in 0..sent {
            let o = load::send(&client(name), req, Instant::now()).await;
            ctx.relay_requests += 1;
            if o.error.is_some() || o.status != 200 {
                bail!(
                    "relay answered the {name} request {} {:?}: {}",
                    o.status,
                    o.error,
                    String::from_utf8_lossy(&o.body)
                );
            }
            if load::normalize(&o.body) == *reference {
                identical += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let after = redis::counters(redis_addr).await?;
        let scripts = after.scripts.saturating_sub(before.scripts);
        checks[*name] = json!({
            "requests": sent,
            "identical_to_direct": identical,
            "redis_script_calls": scripts,
            "redis_calls_by_command": after.minus(&before),
        });
        log(format!(
            "  {name}: {sent} requests, {identical} identical to direct's, {scripts} Redis script calls"
        ));
        if (*name == "limited") != (scripts >= sent) {
            bail!("{name}: {scripts} Redis script calls for {sent} requests");
        }
    }

    // (a) Latency at a fixed rate.
    let spec = load::RateSpec {
        rate: plan.rate,
        warmup: plan.warmup,
        duration: plan.round,
        max_in_flight: 5000,
        drain: Duration::from_secs(20),
    };
    let mut per: BTreeMap<&'static str, Vec<RateResult>> = BTreeMap::new();
    let mut rounds_json = Vec::new();
    for round in 0..plan.rounds {
        let n = variants.len();
        let mut rj = json!({"order": (0..n).map(|i| variants[(i + round) % n].0).collect::<Vec<_>>()});
        for i in 0..n {
            let (name, req) = &variants[(i + round) % n];
            let r = load::fixed_rate(&client(name), req, &spec, Some(reference.clone())).await?;
            if *name != "direct" {
                ctx.relay_requests += r.sent_all;
            }
            log(format!(
                "  round {} {:>9}: p50 {:.3} ms p99 {:.3} ms ({} ok, {} errors, {} mismatches, lag p99 {:.3} ms)",
                round + 1,
                name,
                r.total.pct_ms(50.0),
                r.total.pct_ms(99.0),
                r.ok,
                r.errors,
                r.mismatches,
                r.lag.pct_ms(99.0)
            ));
            rj[*name] = rate_json(&r, &r.total);
            per.entry(*name).or_default().push(r);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        rounds_json.push(rj);
    }
    let problems: Vec<String> = per
        .iter()
        .filter_map(|(n, v)| {
            let bad: u64 = v
                .iter()
                .map(|r| r.errors + r.skipped + r.unfinished + r.mismatches)
                .sum();
            (bad > 0).then(|| format!("{n}: {bad} errors, skipped, unfinished or mismatched"))
        })
        .collect();
    // Per round: a's percentile − b's percentile.
    let diff = |a: &str, b: &str, p: f64| -> Spread {
        let (Some(x), Some(y)) = (per.get(a), per.get(b)) else {
            return Spread::default();
        };
        let v: Vec<f64> = x
            .iter()
            .zip(y)
            .map(|(x, y)| x.total.pct_ms(p) - y.total.pct_ms(p))
            .collect();
        Spread::of(&v)
    };
    let pooled = |n: &str, p: f64| {
        per.get(n)
            .map(|v| Dist::merge(v.iter().map(|r| &r.total)).pct_ms(p))
            .unwrap_or_default()
    };
    let mut latency =
        json!({"rounds": rounds_json, "problems": problems, "metric": "time to the last body byte, from the due time"});
    for p in [50.0, 99.0] {
        let pn = p as u32;
        for (a, b) in [
            ("no_redis", "direct"),
            ("unlimited", "direct"),
            ("limited", "direct"),
            ("limited", "unlimited"),
            ("unlimited", "no_redis"),
        ] {
            latency[format!("{a}_minus_{b}_p{pn}_ms")] = diff(a, b, p).json();
        }
        let added = |n: &str| format!("{:.3}; added {}", pooled(n, p), diff(n, "direct", p).fmt_signed(3));
        ctx.report.rows.push(Row {
            scenario: format!("8. limit check (Redis on loopback), non-streaming @ {} rps", plan.rate),
            measure: format!(
                "added latency p{pn} (ms), limited key vs unlimited key through the same data plane with Redis \
                 (and the run's data plane without Redis)"
            ),
            direct: format!("{:.3}", pooled("direct", p)),
            nginx: "—".into(),
            relay: format!(
                "limited {} · unlimited {} · the check: {} · (no Redis {})",
                added("limited"),
                added("unlimited"),
                diff("limited", "unlimited", p).fmt_signed(3),
                added("no_redis")
            ),
            target: "—".into(),
            verdict: if problems.is_empty() {
                Verdict::Info
            } else {
                Verdict::Invalid
            },
        });
    }

    // (b) CPU at saturation, per 10,000 requests: the data plane and Redis.
    #[derive(Clone, Copy)]
    struct Rep {
        dp: f64,
        redis: f64,
        rps: f64,
        scripts: f64,
        commands: f64,
    }
    let mut reps: BTreeMap<&str, Vec<Rep>> = BTreeMap::new();
    let mut reps_json = Vec::new();
    let mut errors = 0;
    let sat = &variants[1..];
    for rep in 0..plan.sat_reps {
        for i in 0..sat.len() {
            let (name, req) = &sat[(i + rep) % sat.len()];
            let pid = if *name == "no_redis" { plain_pid } else { dp_pid };
            let c0 = redis::counters(redis_addr).await?;
            let (d0, r0) = (procs::cpu_secs(&[pid]), procs::cpu_secs(&[redis_pid]));
            let r = load::closed_loop(
                &client(name),
                req,
                plan.sat_concurrency,
                plan.sat_requests,
                Duration::from_secs(120),
                Some(reference.clone()),
            )
            .await?;
            // Let the last requests settle (one more script each for the limited key).
            tokio::time::sleep(Duration::from_millis(100)).await;
            let (d1, r1) = (procs::cpu_secs(&[pid]), procs::cpu_secs(&[redis_pid]));
            let c1 = redis::counters(redis_addr).await?;
            ctx.relay_requests += r.ok + r.errors;
            errors += r.errors + r.mismatches;
            let n = r.ok.max(1) as f64;
            let x = Rep {
                dp: (d1 - d0) / n * 10_000.0,
                redis: (r1 - r0) / n * 10_000.0,
                rps: r.ok as f64 / r.elapsed.as_secs_f64(),
                scripts: c1.scripts.saturating_sub(c0.scripts) as f64 / n,
                // One of them is the INFO that read c0.
                commands: c1.commands.saturating_sub(c0.commands + 1) as f64 / n,
            };
            log(format!(
                "  rep {} {:>9}: {:.0} rps, data plane {:.3} + Redis {:.3} CPU s/10k; per request {:.2} Redis scripts, {:.2} commands ({} errors, {} mismatches)",
                rep + 1,
                name,
                x.rps,
                x.dp,
                x.redis,
                x.scripts,
                x.commands,
                r.errors,
                r.mismatches
            ));
            reps_json.push(json!({
                "rep": rep + 1, "variant": name, "data_plane_pid": pid, "ok": r.ok, "errors": r.errors,
                "mismatches": r.mismatches, "first_error": r.first_error, "elapsed_secs": r.elapsed.as_secs_f64(),
                "rps": round3(x.rps), "data_plane_cpu_secs": round3(d1 - d0), "redis_cpu_secs": round3(r1 - r0),
                "data_plane_cpu_secs_per_10k": round3(x.dp), "redis_cpu_secs_per_10k": round3(x.redis),
                "redis_scripts_per_request": round3(x.scripts),
                "redis_commands_per_request_including_inside_scripts": round3(x.commands),
                "redis_calls_by_command": c1.minus(&c0), "latency": r.total.summary(),
            }));
            reps.entry(*name).or_default().push(x);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    let col = |n: &str, f: fn(&Rep) -> f64| -> Spread {
        Spread::of(
            &reps
                .get(n)
                .map(|v| v.iter().map(f).collect::<Vec<_>>())
                .unwrap_or_default(),
        )
    };
    // Per repetition: a (data plane + Redis) − b (data plane + Redis).
    let per_rep = |a: &str, b: &str, f: fn(&Rep, &Rep) -> f64| -> Spread {
        let v: Vec<f64> = reps
            .get(a)
            .zip(reps.get(b))
            .map(|(x, y)| x.iter().zip(y).map(|(x, y)| f(x, y)).collect())
            .unwrap_or_default();
        Spread::of(&v)
    };
    let total = |x: &Rep| x.dp + x.redis;
    let check = per_rep("limited", "unlimited", |l, u| l.dp + l.redis - u.dp - u.redis);
    let check_pct = per_rep("limited", "unlimited", |l, u| {
        (l.dp + l.redis) / (u.dp + u.redis).max(1e-9) * 100.0 - 100.0
    });
    let cell = |n: &str| {
        format!(
            "{} {:.2} + Redis {:.2} = {:.2}",
            n,
            col(n, |x| x.dp).median,
            col(n, |x| x.redis).median,
            col(n, total).median
        )
    };
    let sat_label = format!(
        "8. limit check (Redis on loopback), saturation, non-streaming, {} connections",
        plan.sat_concurrency
    );
    ctx.report.rows.push(Row {
        scenario: sat_label.clone(),
        measure: "CPU s per 10,000 requests (data plane + Redis), limited key vs unlimited key (and the run's data plane without Redis)".into(),
        direct: "—".into(),
        nginx: "—".into(),
        relay: format!(
            "{} · {} · the check: {} ({:+.0}%) · (no Redis: data plane {:.2})",
            cell("limited"),
            cell("unlimited"),
            check.fmt_signed(2),
            check_pct.median,
            col("no_redis", |x| x.dp).median
        ),
        target: "—".into(),
        verdict: if errors > 0 {
            Verdict::Invalid
        } else {
            Verdict::Info
        },
    });
    ctx.report.rows.push(Row {
        scenario: sat_label,
        measure: "throughput (requests/s, generator on the same 2 cores); Redis calls per request (scripts / commands incl. inside scripts)".into(),
        direct: "—".into(),
        nginx: "—".into(),
        relay: format!(
            "limited {} ({:.2} / {:.2}) · unlimited {} ({:.2} / {:.2}) · no Redis {}",
            col("limited", |x| x.rps).fmt(0),
            col("limited", |x| x.scripts).median,
            col("limited", |x| x.commands).median,
            col("unlimited", |x| x.rps).fmt(0),
            col("unlimited", |x| x.scripts).median,
            col("unlimited", |x| x.commands).median,
            col("no_redis", |x| x.rps).fmt(0),
        ),
        target: "—".into(),
        verdict: Verdict::Info,
    });
    ctx.report.set(
        "limit_check",
        json!({
            "key_limits": {"requests_per_minute": 1_000_000_000u64, "max_concurrency": 100_000},
            "variants": {
                "no_redis": "the run's data plane (no --redis-url), key without limits",
                "unlimited": "the data plane with --redis-url, key without limits",
                "limited": "the data plane with --redis-url, key with limits",
            },
            "verification": checks,
            "latency": latency,
            "saturation": {
                "reps": reps_json,
                "limited_minus_unlimited_cpu_secs_per_10k": check.json(),
                "limited_over_unlimited_cpu_percent": check_pct.json(),
                "unlimited_minus_no_redis_cpu_secs_per_10k": per_rep("unlimited", "no_redis", |u, p| u.dp + u.redis - p.dp).json(),
            },
        }),
    );
    Ok(())
}

/// Every request sent to relay left one usage event in Postgres (through the
/// data plane's spool and `UsageIngest.Report`).
async fn usage_accounted(ctx: &mut Ctx) -> Result<()> {
    let mut ids = vec![ctx.env.setup.key_id.clone(), ctx.env.setup.slow_key_id.clone()];
    ids.extend(ctx.limits.as_ref().map(|l| l.key_id.clone()));
    let expected = ctx.relay_requests as i64;
    let t0 = Instant::now();
    let mut stored: i64 = 0;
    let mut last_change = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        let n: i64 = ctx
            .env
            .db
            .query_one("SELECT count(*) FROM usage_events WHERE api_key_id = ANY($1)", &[&ids])
            .await?
            .get(0);
        if n != stored {
            stored = n;
            last_change = Instant::now();
        }
        if stored >= expected || last_change.elapsed() > Duration::from_secs(5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    log(format!(
        "  usage events stored for relay's requests: {stored} of {expected} sent"
    ));
    ctx.report.set(
        "relay_usage_accounting",
        json!({"requests_sent_to_relay": expected, "usage_events_stored": stored, "waited_secs": t0.elapsed().as_secs_f64()}),
    );
    ctx.report.rows.push(Row {
        scenario: "all of the above".into(),
        measure: "relay's usage events stored in Postgres / requests sent to relay".into(),
        direct: "—".into(),
        nginx: "—".into(),
        relay: format!("{stored} / {expected}"),
        target: "none lost".into(),
        verdict: if stored >= expected {
            Verdict::Met
        } else {
            Verdict::Missed
        },
    });
    Ok(())
}

/// Scenario 5: admin write → every simulated data plane has it.
async fn propagation(ctx: &mut Ctx) -> Result<()> {
    let plan = ctx.plan.clone();
    let cp_url = ctx.env.cp_url.clone();
    let token = ctx.env.setup.dp_token.clone();
    let r = cp::propagation(&cp_url, &mut ctx.env.admin, &token, plan.watchers, plan.writes, "w").await?;
    log(format!(
        "  {} watchers × {} writes: from send p50 {:.1} ms p99 {:.1} ms; from return p50 {:.1} ms p99 {:.1} ms; admin rtt p50 {:.1} ms; {} missing",
        r.watchers,
        r.writes,
        r.from_send.pct_ms(50.0),
        r.from_send.pct_ms(99.0),
        r.from_return.pct_ms(50.0),
        r.from_return.pct_ms(99.0),
        r.admin_rtt.pct_ms(50.0),
        r.missing
    ));
    ctx.report.set(
        "propagation",
        json!({
            "watchers": r.watchers, "writes": r.writes, "missing": r.missing,
            "connect_secs": r.connect_time.as_secs_f64(),
            "from_admin_call_sent": r.from_send.summary(),
            "from_admin_call_returned": r.from_return.summary(),
            "admin_call_rtt": r.admin_rtt.summary(),
            "acks_recorded_by_control_plane_last_write": r.acks_recorded,
            "all_acks_recorded_by_control_plane_from_admin_call_sent": r.acks_recorded_after.summary(),
        }),
    );
    for (p, target) in [(50.0, 50.0), (99.0, 200.0)] {
        ctx.report.rows.push(Row {
            scenario: format!(
                "5. config propagation, {} Watch streams, {} writes",
                r.watchers, r.writes
            ),
            measure: format!("admin write → every stream has it and ACKs, p{} (ms)", p as u32),
            direct: "—".into(),
            nginx: "—".into(),
            relay: format!(
                "{:.1} (from the call's return: {:.1})",
                r.from_send.pct_ms(p),
                r.from_return.pct_ms(p)
            ),
            target: format!("≤ {target} ms"),
            verdict: if r.missing > 0 {
                Verdict::Invalid
            } else if r.from_send.pct_ms(p) <= target {
                Verdict::Met
            } else {
                Verdict::Missed
            },
        });
    }
    ctx.report.rows.push(Row {
        scenario: format!(
            "5. config propagation, {} Watch streams, {} writes",
            r.watchers, r.writes
        ),
        measure: "admin write → control plane has recorded all ACKs (per write, ms): p50 / max; admin call RTT p50"
            .into(),
        direct: "—".into(),
        nginx: "—".into(),
        relay: format!(
            "{:.1} / {:.1}; RTT {:.1}",
            r.acks_recorded_after.pct_ms(50.0),
            r.acks_recorded_after.max_ms(),
            r.admin_rtt.pct_ms(50.0)
        ),
        target: "—".into(),
        verdict: Verdict::Info,
    });
    Ok(())
}

/// Scenario 6: usage events committed per second through `UsageIngest.Report`.
async fn ingest(ctx: &mut Ctx) -> Result<()> {
    let plan = ctx.plan.clone();
    let mut reps = Vec::new();
    let mut rates = Vec::new();
    let mut lost = 0i64;
    let mut total = 0u64;
    for rep in 0..plan.ingest_reps {
        let node = format!("bench-ingest-{}", rep + 1);
        let r = cp::ingest(
            &ctx.env.cp_url,
            &ctx.env.setup.dp_token,
            &ctx.env.db,
            &node,
            cp::IngestSpec {
                total: plan.ingest_events,
                streams: plan.ingest_streams,
                batch: plan.ingest_batch,
                window: 2,
            },
        )
        .await?;
        log(format!(
            "  rep {}: {} events in {:.2} s = {:.0} events/s; ACKed {} inserted; {} rows in Postgres",
            rep + 1,
            r.events,
            r.elapsed.as_secs_f64(),
            r.events_per_sec,
            r.acked_inserted,
            r.rows_in_db
        ));
        lost += (r.events as i64 - r.rows_in_db).max(0) + (r.events as i64 - r.acked_inserted as i64).max(0);
        total += r.events;
        rates.push(r.events_per_sec);
        reps.push(json!({
            "events": r.events, "acked_inserted": r.acked_inserted, "acked_duplicates": r.acked_duplicates,
            "acked_rejected": r.acked_rejected, "rows_in_db": r.rows_in_db,
            "elapsed_secs": r.elapsed.as_secs_f64(), "events_per_sec": r.events_per_sec.round(),
        }));
    }
    let s = Spread::of(&rates);
    ctx.report
        .set("ingest", json!({"reps": reps, "events_per_sec": s.json()}));
    ctx.report.rows.push(Row {
        scenario: format!(
            "6. usage ingest, {} streams × batches of {}",
            plan.ingest_streams, plan.ingest_batch
        ),
        measure: "events/s committed to Postgres (ACKed); rows lost".into(),
        direct: "—".into(),
        nginx: "—".into(),
        relay: format!("{} /s; {lost} of {total} lost", s.fmt(0)),
        target: "≥ 50,000 /s, none lost".into(),
        verdict: if lost == 0 && s.median >= 50_000.0 {
            Verdict::Met
        } else {
            Verdict::Missed
        },
    });
    Ok(())
}

/// Scenario 7: exec → first 200 on /readyz, from the cached config, with the
/// control plane stopped.
async fn start_from_cache(ctx: &mut Ctx) -> Result<()> {
    let plan = ctx.plan.clone();
    if let Some(dp) = ctx.env.dp.take() {
        dp.stop("TERM", Duration::from_secs(15)).await?;
    }
    if let Some(cp) = ctx.env.cp.take() {
        cp.stop("TERM", Duration::from_secs(10)).await?;
    }
    let bins = ctx.env.opts.bins.clone();
    let addr: SocketAddr = format!("127.0.0.1:{}", procs::free_port()?).parse()?;
    let mut times = Vec::new();
    let mut served = 0;
    for i in 0..plan.starts {
        let cmd = env::data_plane_cmd(
            &bins,
            &ctx.env.cp_url,
            addr,
            &ctx.env.dp_dir,
            &ctx.env.setup.dp_token,
            "bench-dp",
        );
        let t0 = Instant::now();
        let p = procs::Proc::spawn(&format!("data-plane-start-{}", i + 1), cmd, &ctx.env.logs)?;
        let took = env::wait_ready(addr, t0, Duration::from_secs(30))
            .await
            .context("data plane did not become ready from its cache")?;
        times.push(took.as_secs_f64() * 1000.0);
        let t = Target {
            name: "relay",
            addr,
            slow_addr: addr,
            client: load::client(),
        };
        let o = load::send(&t.client, &template(addr, &ctx.key, false), Instant::now()).await;
        if o.status == 200 {
            served += 1;
        }
        // Nothing is pending (the spool drained before the control plane stopped): no need to wait.
        p.stop("KILL", Duration::from_secs(5)).await?;
    }
    let s = Spread::of(&times);
    log(format!(
        "  exec → ready: {} ms; {served} of {} served a request from the cache",
        s.fmt(1),
        plan.starts
    ));
    ctx.report.set(
        "start_from_cache",
        json!({"runs_ms": times, "ms": s.json(), "served_a_request": served, "control_plane": "stopped"}),
    );
    ctx.report.rows.push(Row {
        scenario: "7. data-plane start, cached config, control plane down".into(),
        measure: format!("exec → first 200 on /readyz (ms), {} starts", plan.starts),
        direct: "—".into(),
        nginx: "—".into(),
        relay: format!("{} ({served}/{} then served a request)", s.fmt(1), plan.starts),
        target: "≤ 100 ms".into(),
        verdict: if served < plan.starts {
            Verdict::Invalid
        } else if s.median <= 100.0 {
            Verdict::Met
        } else {
            Verdict::Missed
        },
    });
    Ok(())
}
