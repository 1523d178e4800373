//! `relay-bench request-stats`: how long `relayctl requests stats` (the `RequestStats` call)
//! takes over a large request log (issue 14).
//!
//! It creates a fresh Postgres database, starts `relay-control-plane` on it (which migrates it),
//! fills `usage_events` with `--requests` client requests in one `generate_series` insert (one row
//! each, a second attempt for every tenth: an overloaded first try then a success; two models,
//! 20 keys, 7 accounts, streaming or not), then, in rounds, starts each build on that database
//! (with `--compare-bin-dir`: the two alternately, order rotating) and times `RequestStats` over
//! everything and over one model.

use crate::cp;
use crate::env;
use crate::stats::Dist;
use anyhow::{Context, Result};
use relay_proto::v1 as pb;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What `relay-bench request-stats` runs.
#[derive(Debug, Clone)]
pub struct ReqStatsOpts {
    /// Where `relay-control-plane` is: one build, or two to compare (labels "a" and "b").
    pub bins: Vec<PathBuf>,
    pub rounds: usize,
    pub database_url: String,
    /// Client requests in the log.
    pub requests: u64,
    /// Logs go under `work/logs`.
    pub work: PathBuf,
    pub keep_db: bool,
}

/// Runs the measurement on its own database (dropped afterwards unless `keep_db`).
pub async fn run(o: ReqStatsOpts) -> Result<serde_json::Value> {
    let logs = o.work.join("logs");
    std::fs::create_dir_all(&logs)?;
    let db_name = format!("relay_bench_reqstats_{}", uuid::Uuid::new_v4().simple());
    let maint = env::pg(&o.database_url).await?;
    maint
        .batch_execute(&format!("CREATE DATABASE {db_name}"))
        .await
        .context("creating the run's database")?;
    let result = measure(&o, &env::with_db(&o.database_url, &db_name), &logs).await;
    if !o.keep_db {
        maint
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"))
            .await
            .context("dropping the run's database")?;
    }
    result
}

/// The request log: `n` requests, 10 ms apart, ending now.
async fn seed(db_url: &str, n: u64) -> Result<u64> {
    let db = env::pg(db_url).await?;
    let n = i64::try_from(n)?;
    let t0 = chrono::Utc::now().timestamp_millis() - n * 10;
    let rows = db
        .execute(
            "INSERT INTO usage_events (event_id, request_id, ts, node_id, api_key_id, account_id, model, \
             input_tokens, output_tokens, cache_write_5m_tokens, cache_write_1h_tokens, cache_read_tokens, \
             cost_pico_usd, http_status, error_type, stream, cancelled, latency_ms, ttfb_ms, \
             upstream_request_id, web_search_requests, received_at) \
             SELECT gen_random_uuid(), 'req-' || g, $1::BIGINT + g * 10 + a * 5, 'dp-1', \
             'key-' || (g % 20), 'acct-' || ((g + a) % 7), \
             CASE WHEN g % 3 = 0 THEN 'claude-haiku-4-5' ELSE 'claude-sonnet-4-5' END, \
             100, g % 500, 0, 0, 10, (g % 500) * 15000, \
             CASE WHEN a = 0 AND g % 10 = 0 THEN 529 ELSE 200 END, \
             CASE WHEN a = 0 AND g % 10 = 0 THEN 'overloaded_error' ELSE '' END, \
             g % 2 = 0, false, 100 + g % 900, 50 + g % 100, '', 0, $1::BIGINT \
             FROM generate_series(1, $2::BIGINT) g, generate_series(0, 1) a \
             WHERE a = 0 OR g % 10 = 0",
            &[&t0, &n],
        )
        .await
        .context("seeding usage_events")?;
    db.batch_execute("ANALYZE usage_events").await?;
    Ok(rows)
}

async fn measure(o: &ReqStatsOpts, db_url: &str, logs: &Path) -> Result<serde_json::Value> {
    let (master_key, token) = env::new_secrets();
    let first = o.bins.first().context("no control plane given")?;
    let (seeder, _url) = env::control_plane_with(first, db_url, logs, &master_key, &token, "cp-seed").await?;
    let seeding = Instant::now();
    let rows = seed(db_url, o.requests).await?;
    let seed_time = seeding.elapsed();
    seeder.stop("TERM", Duration::from_secs(10)).await?;

    let labels = ["a", "b"];
    let mut all: Vec<Vec<u64>> = vec![Vec::new(); o.bins.len()];
    let mut one_model: Vec<Vec<u64>> = vec![Vec::new(); o.bins.len()];
    let mut counted = vec![0u64; o.bins.len()];
    for round in 0..o.rounds {
        for k in 0..o.bins.len() {
            let b = (round + k) % o.bins.len();
            let name = format!("cp-{}-{round}", labels[b % 2]);
            let (proc_, url) = env::control_plane_with(&o.bins[b], db_url, logs, &master_key, &token, &name).await?;
            let r = one_round(&url, &token).await;
            proc_.stop("TERM", Duration::from_secs(10)).await?;
            let (t_all, t_model, n) = r.with_context(|| format!("round {round}, control plane {}", labels[b % 2]))?;
            all[b].push(t_all);
            one_model[b].push(t_model);
            counted[b] = n;
        }
    }
    let builds: Vec<serde_json::Value> = o
        .bins
        .iter()
        .enumerate()
        .map(|(b, dir)| {
            serde_json::json!({
                "label": labels[b % 2],
                "control_plane": dir.join("relay-control-plane").display().to_string(),
                // 0: the call over everything ran into the control plane's deadline.
                "requests_counted": counted[b],
                "stats_all_ms": Dist::new(all[b].clone()).summary(),
                "stats_one_model_ms": Dist::new(one_model[b].clone()).summary(),
            })
        })
        .collect();
    Ok(serde_json::json!({
        "requests": o.requests,
        "usage_rows": rows,
        "seed_secs": crate::stats::round3(seed_time.as_secs_f64()),
        "rounds": o.rounds,
        "builds": builds,
    }))
}

/// One `RequestStats` over everything and one over a model, in µs, and the requests counted.
async fn one_round(url: &str, token: &str) -> Result<(u64, u64, u64)> {
    let mut admin = cp::admin(url, token).await?;
    // A first call so the connection and the catalogue reads are warm.
    let _ = admin
        .request_stats(pb::RequestStatsRequest {
            filter: Some(pb::RequestFilter {
                since_ms: chrono::Utc::now().timestamp_millis() - 1_000,
                ..Default::default()
            }),
        })
        .await?;
    let call = |filter: pb::RequestFilter| {
        let mut admin = admin.clone();
        async move {
            let t = Instant::now();
            // The control plane's own deadline on admin calls (60 s) ends a slow one: its time
            // is then recorded as the deadline, with no answer.
            let r = match admin
                .request_stats(pb::RequestStatsRequest { filter: Some(filter) })
                .await
            {
                Ok(r) => Some(r.into_inner()),
                Err(s) if s.code() == tonic::Code::DeadlineExceeded => None,
                Err(s) => return Err(s.into()),
            };
            Ok::<_, anyhow::Error>((u64::try_from(t.elapsed().as_micros())?, r))
        }
    };
    let (t_all, r) = call(pb::RequestFilter::default()).await?;
    let (t_model, _) = call(pb::RequestFilter {
        model: "claude-haiku-4-5".into(),
        ..Default::default()
    })
    .await?;
    Ok((t_all, t_model, r.and_then(|r| r.total).map_or(0, |t| t.requests)))
}
