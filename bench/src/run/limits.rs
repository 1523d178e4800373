//! Scenario 8: what the limit check (Redis) costs.

use super::*;

/// Scenario 8: what the limit check costs. A second data plane, fed by the same control
/// plane, runs with `--redis-url` to a `redis-server` of its own on loopback. Through it, a
/// key with limits it never reaches (each request: one Lua script when admitted, one when it
/// settles) against a key without limits; both pay the sticky-session lookup in Redis (a
/// `GETEX` per request) that any data plane with `--redis-url` makes. The run's own data plane
/// (no Redis) with the key without limits is the third way in. Interleaved: (a) added latency
/// at a fixed rate, non-streaming, rounds in rotating order (as scenario 1); (b) CPU at
/// saturation, data plane plus Redis (as scenario 3).
pub(super) async fn limit_check(ctx: &mut Ctx) -> Result<()> {
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
