//! Scenario 9: what capture costs. A second key of the run's group with a capture rule that
//! records every one of its requests (sample 1, the default 256 KiB of each body), against the
//! run's key without one, through the same data plane, streaming (the most chunks to copy).
//! Interleaved: (a) added latency at a fixed rate, rounds in rotating order (as scenario 2);
//! (b) CPU of the data plane at saturation per 10,000 requests (as scenario 3). At saturation
//! the shipping queue fills and captures are dropped (counted, never waited for): the CPU is
//! that of copying and compressing what is kept, the rest counted in
//! `relay_capture_dropped_total`.

use super::*;
use relay_proto::v1 as pb;

pub(super) async fn capture_cost(ctx: &mut Ctx) -> Result<()> {
    let plan = ctx.plan.clone();
    let created = ctx
        .env
        .admin
        .create_api_key(pb::CreateApiKeyRequest {
            name: "bench-captured".into(),
            ..Default::default()
        })
        .await
        .context("creating the captured key")?
        .into_inner();
    let key = created.key;
    // Its requests are relay's too: their usage is accounted with the rest.
    ctx.extra_key_ids.extend(created.info.map(|i| i.id));
    ctx.env
        .admin
        .add_capture_rule(pb::AddCaptureRuleRequest {
            key: "bench-captured".into(),
            ..Default::default()
        })
        .await
        .context("adding the capture rule")?;
    let stream = true;
    let variants = [
        ("plain", template(ctx.env.dp_addr, &ctx.key, stream)),
        ("captured", template(ctx.env.dp_addr, &key, stream)),
    ];
    let clients: BTreeMap<&str, HttpClient> = variants.iter().map(|(n, _)| (*n, load::client())).collect();
    let client = |n: &&str| clients.get(*n).cloned().unwrap_or_else(load::client);
    let reference = ctx.reference[1].clone();

    // The rule reached the data plane: a captured request's capture is stored.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = load::send(&client(&"captured"), &variants[1].1, Instant::now()).await;
        ctx.relay_requests += 1;
        if o.status != 200 {
            bail!("the captured key's request got {}: {:?}", o.status, o.error);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let page = ctx
            .env
            .admin
            .list_requests(pb::ListRequestsRequest {
                filter: Some(pb::RequestFilter {
                    key: "bench-captured".into(),
                    ..Default::default()
                }),
                limit: 1,
                cursor: String::new(),
            })
            .await?
            .into_inner();
        if let Some(r) = page.records.first() {
            let full = ctx
                .env
                .admin
                .get_request(pb::GetRequestRequest { id: r.id.clone() })
                .await?
                .into_inner();
            if let Some(c) = full.capture {
                log(format!(
                    "  capture on: request {} stored with {} compressed bytes",
                    r.id, c.stored_bytes
                ));
                break;
            }
        }
        if Instant::now() > deadline {
            bail!("no capture stored for the captured key after 30 s");
        }
    }

    // (a) Latency at a fixed rate, streaming.
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
            ctx.relay_requests += r.sent_all;
            log(format!(
                "  round {} {:>9}: TTFB p50 {:.3} ms, last byte p50 {:.3} ms p99 {:.3} ms ({} ok, {} errors, {} mismatches)",
                round + 1,
                name,
                r.ttfb.pct_ms(50.0),
                r.total.pct_ms(50.0),
                r.total.pct_ms(99.0),
                r.ok,
                r.errors,
                r.mismatches,
            ));
            rj[*name] = rate_json(&r, &r.total);
            per.entry(*name).or_default().push(r);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        rounds_json.push(rj);
    }
    let bad: u64 = per
        .values()
        .flatten()
        .map(|r| r.errors + r.skipped + r.unfinished + r.mismatches)
        .sum();
    let diff = |p: f64, ttfb: bool| -> Spread {
        let (Some(x), Some(y)) = (per.get("captured"), per.get("plain")) else {
            return Spread::default();
        };
        let pick = |r: &RateResult| if ttfb { r.ttfb.pct_ms(p) } else { r.total.pct_ms(p) };
        Spread::of(&x.iter().zip(y).map(|(x, y)| pick(x) - pick(y)).collect::<Vec<_>>())
    };
    let pooled = |n: &str, p: f64| {
        per.get(n)
            .map(|v| Dist::merge(v.iter().map(|r| &r.total)).pct_ms(p))
            .unwrap_or_default()
    };
    for p in [50.0, 99.0] {
        let pn = p as u32;
        ctx.report.rows.push(Row {
            scenario: format!("9. capture at 100%, streaming @ {} rps", plan.rate),
            measure: format!(
                "p{pn} (ms) to the last byte, captured key vs a key without a rule, same data plane; \
                 added by capture (last byte · TTFB)"
            ),
            direct: "—".into(),
            nginx: "—".into(),
            relay: format!(
                "plain {:.3} · captured {:.3} · added {} · TTFB {}",
                pooled("plain", p),
                pooled("captured", p),
                diff(p, false).fmt_signed(3),
                diff(p, true).fmt_signed(3)
            ),
            target: "—".into(),
            verdict: if bad == 0 { Verdict::Info } else { Verdict::Invalid },
        });
    }
    ctx.report
        .sections
        .insert("capture_latency".into(), json!({"rounds": rounds_json, "errors": bad}));

    // (b) CPU of the data plane at saturation, per 10,000 streamed requests.
    let pid = ctx.env.dp_pid().context("the run's data plane is not running")?;
    let mut cpu: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut rps: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut errors = 0;
    for rep in 0..plan.sat_reps {
        for i in 0..variants.len() {
            let (name, req) = &variants[(i + rep) % variants.len()];
            let d0 = procs::cpu_secs(&[pid]);
            let r = load::closed_loop(
                &client(name),
                req,
                plan.sat_concurrency,
                plan.sat_requests,
                Duration::from_secs(120),
                Some(reference.clone()),
            )
            .await?;
            // Let the shipping task finish what it kept.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let d1 = procs::cpu_secs(&[pid]);
            ctx.relay_requests += r.ok + r.errors;
            errors += r.errors + r.mismatches;
            let per10k = (d1 - d0) / r.ok.max(1) as f64 * 10_000.0;
            let x = r.ok as f64 / r.elapsed.as_secs_f64();
            log(format!(
                "  rep {} {:>9}: {:.0} rps, data plane {:.3} CPU s/10k ({} errors, {} mismatches)",
                rep + 1,
                name,
                x,
                per10k,
                r.errors,
                r.mismatches
            ));
            cpu.entry(*name).or_default().push(per10k);
            rps.entry(*name).or_default().push(x);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    let med = |m: &BTreeMap<&str, Vec<f64>>, n: &str| Spread::of(m.get(n).map_or(&[][..], |v| &v[..]));
    let added: Vec<f64> = cpu
        .get("captured")
        .zip(cpu.get("plain"))
        .map(|(c, p)| c.iter().zip(p).map(|(c, p)| c - p).collect())
        .unwrap_or_default();
    ctx.report.rows.push(Row {
        scenario: format!(
            "9. capture at 100%, saturation, streaming, {} connections",
            plan.sat_concurrency
        ),
        measure: "data-plane CPU s per 10,000 requests, captured key vs a key without a rule; throughput (requests/s)"
            .into(),
        direct: "—".into(),
        nginx: "—".into(),
        relay: format!(
            "plain {} ({} rps) · captured {} ({} rps) · added {}",
            med(&cpu, "plain").fmt(2),
            med(&rps, "plain").fmt(0),
            med(&cpu, "captured").fmt(2),
            med(&rps, "captured").fmt(0),
            Spread::of(&added).fmt_signed(2)
        ),
        target: "—".into(),
        verdict: if errors == 0 { Verdict::Info } else { Verdict::Invalid },
    });
    Ok(())
}
