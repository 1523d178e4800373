//! One benchmark run: every scenario of issue 5 against direct, nginx and
//! relay, in one process, on one machine, with one load generator.
//!
//! Here: the plan, the context, the run and its order, the first checks; the scenarios in
//! `latency.rs` (1 to 4), `control.rs` (5 to 7) and `limits.rs` (8).

mod capture;
mod control;
mod latency;
mod limits;

use capture::capture_cost;
use control::{ingest, propagation, start_from_cache};
use latency::{fixed_rate, saturation, slow_streams};
use limits::limit_check;

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
            watchers: 1000,
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
            watchers: 10_000,
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
    /// Keys scenarios made (scenario 9's captured key): their requests count in `relay_requests`.
    extra_key_ids: Vec<String>,
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
        extra_key_ids: Vec::new(),
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
    if Ctx::wants(&opts.only, "capture") {
        // Before 5-7, as 8: its requests are counted below.
        log("scenario 9: capture at 100%");
        capture_cost(ctx).await?;
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

/// Every request sent to relay left one usage event in Postgres (through the
/// data plane's spool and `UsageIngest.Report`).
async fn usage_accounted(ctx: &mut Ctx) -> Result<()> {
    let mut ids = vec![ctx.env.setup.key_id.clone(), ctx.env.setup.slow_key_id.clone()];
    ids.extend(ctx.limits.as_ref().map(|l| l.key_id.clone()));
    ids.extend(ctx.extra_key_ids.iter().cloned());
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
