//! `relay-bench`: relay's benchmark harness (see docs/benchmarks.md).
//!
//! ```text
//! relay-bench run [--quick] [--out bench/results] [--bin-dir target/release] [--only latency,saturation,limits,…]
//! relay-bench env --secs N                  # start everything, print addresses and pids, hold (for profiling)
//! relay-bench load --url URL --key K [--stream] [--rate R --secs S | --closed N --concurrency C]
//! relay-bench publish [--bin-dir target/release] [--compare-bin-dir DIR] [--accounts 5000] [--rounds 3]
//! relay-bench request-stats [--bin-dir target/release] [--compare-bin-dir DIR] [--requests 120000] [--rounds 3]
//! ```
//! `scripts/bench.sh` is the one command: it installs what is missing, builds
//! the release binaries and runs `relay-bench run`.

mod cp;
mod env;
mod load;
mod nginx;
mod procs;
mod publish;
mod redis;
mod report;
mod reqstats;
mod run;
mod stats;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(name = "relay-bench", about = "relay vs nginx vs direct, on loopback")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, clap::Args)]
struct EnvArgs {
    /// Where relay-mock-upstream, relay-control-plane and relay-data-plane are.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// The nginx binary.
    #[arg(long, default_value = "/usr/sbin/nginx")]
    nginx: PathBuf,
    /// redis-server, for scenario 8 (the limit check; `--only` without `limits` does not need it).
    #[arg(long, default_value = "/usr/bin/redis-server")]
    redis_server: PathBuf,
    /// Postgres to create the run's database in.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres:postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Delay between the events of the slow-stream mock (scenario 4), ms.
    #[arg(long, default_value_t = 1000)]
    slow_event_delay_ms: u64,
    /// `env` only: the mocks serve HTTPS (a CA made for the run; the data plane trusts it, nginx
    /// proxies to `https://`) and offer ALPN `h2`, as api.anthropic.com does.
    #[arg(long)]
    upstream_tls: bool,
    /// `env` only: the data planes' `upstream.http_version` (auto, http1, http2).
    #[arg(long)]
    upstream_http_version: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run every scenario and write bench/results/<timestamp>.{json,md}.
    Run {
        #[command(flatten)]
        env: EnvArgs,
        /// About two minutes of measuring instead of about six.
        #[arg(long)]
        quick: bool,
        /// A few seconds per scenario: a smoke test of the harness, numbers meaningless.
        #[arg(long, conflicts_with = "quick")]
        tiny: bool,
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
        /// Only these scenarios: latency, saturation, streams, limits, propagation, ingest, start.
        #[arg(long, value_delimiter = ',')]
        only: Option<Vec<String>>,
        /// Keep the run's Postgres database.
        #[arg(long)]
        keep_db: bool,
        /// Stop the whole run after this many seconds, whatever it is doing.
        #[arg(long, default_value_t = 1800)]
        max_secs: u64,
        /// Scenario 5's simulated data planes (Watch streams), instead of the mode's number.
        #[arg(long)]
        watchers: Option<usize>,
        /// Scenario 5's admin writes, instead of the mode's number.
        #[arg(long)]
        writes: Option<usize>,
        /// The fixed-rate scenarios' requests per second, instead of the mode's (e.g. lower for
        /// debug builds, which cannot keep up with 1,000/s and would measure their own queue).
        #[arg(long)]
        rate: Option<f64>,
    },
    /// Start everything (mocks, Postgres database, control plane, data plane,
    /// nginx), print addresses, keys and pids as JSON, and hold for `--secs`.
    Env {
        #[command(flatten)]
        env: EnvArgs,
        #[arg(long, default_value_t = 60)]
        secs: u64,
    },
    /// Hold N concurrent streams open on one loopback target and print the
    /// resident memory of `--pid` (for memory profiling).
    Hold {
        #[arg(long)]
        url: String,
        #[arg(long)]
        key: String,
        #[arg(long, default_value_t = 1000)]
        n: usize,
        #[arg(long)]
        pid: Option<u32>,
        #[arg(long, default_value_t = 5)]
        hold_secs: u64,
    },
    /// Drive one loopback target and print latency percentiles as JSON.
    Load {
        /// e.g. http://127.0.0.1:8080/v1/messages (loopback only).
        #[arg(long)]
        url: String,
        #[arg(long)]
        key: String,
        #[arg(long)]
        stream: bool,
        /// Fixed-rate mode: requests per second.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
        /// Closed-loop mode instead: this many requests in total.
        #[arg(long)]
        closed: Option<u64>,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
    },
    /// Time one account-state change from the report to a watching data plane, with
    /// `--accounts` accounts configured (and, for comparison, account updates: full builds).
    /// Needs only relay-control-plane and Postgres. Prints JSON.
    Publish {
        /// Where relay-control-plane is (label "a").
        #[arg(long, default_value = "target/release")]
        bin_dir: PathBuf,
        /// Another build to compare (label "b"), e.g. one from before a change: run alternately
        /// with --bin-dir on the same database, order rotating each round.
        #[arg(long)]
        compare_bin_dir: Option<PathBuf>,
        #[arg(
            long,
            env = "DATABASE_URL",
            default_value = "postgres://postgres:postgres@127.0.0.1:5432/postgres"
        )]
        database_url: String,
        #[arg(long, default_value_t = 5000)]
        accounts: usize,
        /// Rounds; each (re)starts every build once.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// State reports timed per round and build.
        #[arg(long, default_value_t = 20)]
        changes: usize,
        /// Account updates timed per round and build.
        #[arg(long, default_value_t = 5)]
        updates: usize,
        /// Keep the run's Postgres database.
        #[arg(long)]
        keep_db: bool,
    },
    /// Time `relayctl requests stats` (the RequestStats call) over a request log of
    /// `--requests` client requests. Needs only relay-control-plane and Postgres. Prints JSON.
    RequestStats {
        /// Where relay-control-plane is (label "a").
        #[arg(long, default_value = "target/release")]
        bin_dir: PathBuf,
        /// Another build to compare (label "b"), run alternately on the same database.
        #[arg(long)]
        compare_bin_dir: Option<PathBuf>,
        #[arg(
            long,
            env = "DATABASE_URL",
            default_value = "postgres://postgres:postgres@127.0.0.1:5432/postgres"
        )]
        database_url: String,
        #[arg(long, default_value_t = 120_000)]
        requests: u64,
        /// Rounds; each (re)starts every build once.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Keep the run's Postgres database.
        #[arg(long)]
        keep_db: bool,
    },
}

fn env_opts(a: &EnvArgs, work: PathBuf) -> Result<env::EnvOpts> {
    let bins = std::fs::canonicalize(&a.bin_dir).with_context(|| format!("bin dir {}", a.bin_dir.display()))?;
    for b in ["relay-mock-upstream", "relay-control-plane", "relay-data-plane"] {
        if !bins.join(b).exists() {
            bail!(
                "{} not found: build with `cargo build --release --workspace --bins`",
                bins.join(b).display()
            );
        }
    }
    if !a.nginx.exists() {
        bail!("{} not found: apt-get install nginx", a.nginx.display());
    }
    Ok(env::EnvOpts {
        bins,
        nginx: a.nginx.clone(),
        redis_server: a.redis_server.clone(),
        database_url: a.database_url.clone(),
        work,
        slow_event_delay_ms: a.slow_event_delay_ms,
        upstream_tls: a.upstream_tls,
        upstream_http_version: a.upstream_http_version.clone(),
    })
}

fn check_loopback(url: &str) -> Result<()> {
    let uri: http::Uri = url.parse()?;
    if !matches!(uri.host(), Some("127.0.0.1" | "localhost" | "[::1]")) {
        bail!("relay-bench only targets loopback addresses");
    }
    Ok(())
}

fn request_body(stream: bool) -> bytes::Bytes {
    run::body(stream)
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run {
            env,
            quick,
            tiny,
            out,
            only,
            keep_db,
            max_secs,
            watchers,
            writes,
            rate,
        } => {
            if env.upstream_tls || env.upstream_http_version.is_some() {
                bail!(
                    "--upstream-tls and --upstream-http-version are for `relay-bench env` (the run's direct \
                     and nginx scenarios speak plain HTTP to the mocks)"
                );
            }
            if watchers == Some(0) || writes == Some(0) {
                bail!("--watchers and --writes take a number above 0");
            }
            if rate.is_some_and(|r| !(r.is_finite() && r >= 1.0)) {
                bail!("--rate takes a number of requests per second, at least 1");
            }
            let wants_limits = only.as_ref().is_none_or(|o| o.iter().any(|x| x == "limits"));
            if wants_limits && !env.redis_server.exists() {
                bail!(
                    "{} not found (scenario 8, the limit check, needs it): apt-get install redis-server, \
                     or leave `limits` out of --only",
                    env.redis_server.display()
                );
            }
            let work = tempfile::Builder::new().prefix("relay-bench-").tempdir()?;
            let run_id = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
            let opts = run::RunOpts {
                env: env_opts(&env, work.path().to_path_buf())?,
                plan: {
                    let mut plan = if tiny {
                        run::Plan::tiny()
                    } else if quick {
                        run::Plan::quick()
                    } else {
                        run::Plan::full()
                    };
                    plan.watchers = watchers.unwrap_or(plan.watchers);
                    plan.writes = writes.unwrap_or(plan.writes);
                    plan.rate = rate.unwrap_or(plan.rate);
                    plan
                },
                only,
                keep_db,
                run_id: run_id.to_lowercase(),
            };
            // On a timeout or Ctrl-C the run is dropped, which kills every process it started.
            let report = tokio::select! {
                r = tokio::time::timeout(Duration::from_secs(max_secs), run::run(opts)) => match r {
                    Ok(r) => r?,
                    Err(_) => bail!("the run took longer than --max-secs {max_secs}; everything it started is stopped"),
                },
                // Ctrl-C or SIGTERM (`kill`, `pkill`): either way the processes a run or an env started
                // are stopped, not left behind holding ports and database connections.
                _ = relay_runtime::signal::shutdown() => bail!("interrupted; everything the run started is stopped"),
            };
            std::fs::create_dir_all(&out)?;
            let json_path = out.join(format!("{run_id}.json"));
            let md_path = out.join(format!("{run_id}.md"));
            std::fs::write(&json_path, serde_json::to_string_pretty(&report.json())? + "\n")?;
            std::fs::write(&md_path, report.markdown())?;
            println!("{}", report.markdown());
            println!("results: {} and {}", json_path.display(), md_path.display());
            if report.error.is_some() {
                // Keep the logs of a failed run.
                let kept = work.keep();
                eprintln!("logs kept in {}", kept.join("logs").display());
                bail!("the run stopped early");
            }
            Ok(())
        }
        Cmd::Env { env, secs } => {
            let work = tempfile::Builder::new().prefix("relay-bench-").tempdir()?;
            let run_id = chrono::Utc::now().format("%Y%m%dt%H%M%Sz").to_string();
            let e = env::Env::start(env_opts(&env, work.path().to_path_buf())?, &run_id).await?;
            let info = serde_json::json!({
                "mock": e.mock_addr.to_string(), "mock_pid": e.mock.pid,
                "slow_mock": e.slow_addr.to_string(),
                "nginx": e.nginx_addr.to_string(), "nginx_pids": e.nginx.tree(),
                "relay": e.dp_addr.to_string(), "relay_pid": e.dp_pid(),
                "control_plane": e.cp_url, "control_plane_pid": e.cp.as_ref().map(|p| p.pid),
                "key": e.setup.key, "slow_key": e.setup.slow_key, "dp_token": e.setup.dp_token,
                "logs": e.logs.display().to_string(),
            });
            println!("{}", serde_json::to_string_pretty(&info)?);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(secs)) => {}
                _ = relay_runtime::signal::shutdown() => {}
            }
            e.shutdown(false).await
        }
        Cmd::Hold {
            url,
            key,
            n,
            pid,
            hold_secs,
        } => {
            check_loopback(&url)?;
            let req = load::ReqTemplate {
                url,
                headers: vec![
                    ("x-api-key".into(), key),
                    ("anthropic-version".into(), "2023-06-01".into()),
                    ("content-type".into(), "application/json".into()),
                ],
                body: request_body(true),
            };
            let pids: Vec<u32> = pid.into_iter().collect();
            let r = load::hold_streams(
                &req,
                n.min(20_000),
                2000.0,
                Duration::from_secs(30),
                Duration::from_secs(hold_secs.min(600)),
                move || procs::rss_bytes(&pids),
            )
            .await?;
            println!(
                "{}",
                serde_json::json!({"open": r.open_at_peak, "failed": r.failed, "first_error": r.first_error,
                    "baseline_rss": r.baseline_rss, "peak_rss": r.peak_rss,
                    "bytes_per_stream": (r.peak_rss.saturating_sub(r.baseline_rss)) as f64 / r.open_at_peak.max(1) as f64})
            );
            Ok(())
        }
        Cmd::Load {
            url,
            key,
            stream,
            rate,
            secs,
            closed,
            concurrency,
        } => {
            check_loopback(&url)?;
            let secs = secs.clamp(0.1, 600.0);
            let req = load::ReqTemplate {
                url,
                headers: vec![
                    ("x-api-key".into(), key),
                    ("anthropic-version".into(), "2023-06-01".into()),
                    ("content-type".into(), "application/json".into()),
                ],
                body: request_body(stream),
            };
            let client = load::client();
            let out = match closed {
                Some(n) => {
                    let r = load::closed_loop(
                        &client,
                        &req,
                        concurrency,
                        n.min(10_000_000),
                        Duration::from_secs_f64(secs),
                        None,
                    )
                    .await?;
                    serde_json::json!({"ok": r.ok, "errors": r.errors, "elapsed_secs": r.elapsed.as_secs_f64(),
                        "rps": r.ok as f64 / r.elapsed.as_secs_f64(), "latency": r.total.summary(), "first_error": r.first_error})
                }
                None => {
                    let spec = load::RateSpec {
                        rate: rate.clamp(1.0, 100_000.0),
                        warmup: Duration::from_millis(500),
                        duration: Duration::from_secs_f64(secs),
                        max_in_flight: 10_000,
                        drain: Duration::from_secs(20),
                    };
                    let r = load::fixed_rate(&client, &req, &spec, None).await?;
                    serde_json::json!({"ok": r.ok, "errors": r.errors, "skipped": r.skipped, "achieved_rps": r.achieved_rps,
                        "total": r.total.summary(), "ttfb": r.ttfb.summary(), "dispatch_lag": r.lag.summary(),
                        "first_error": r.first_error})
                }
            };
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
        Cmd::Publish {
            bin_dir,
            compare_bin_dir,
            database_url,
            accounts,
            rounds,
            changes,
            updates,
            keep_db,
        } => {
            let mut bins = Vec::new();
            for dir in std::iter::once(bin_dir).chain(compare_bin_dir) {
                let dir = std::fs::canonicalize(&dir).with_context(|| format!("bin dir {}", dir.display()))?;
                if !dir.join("relay-control-plane").exists() {
                    bail!("{} not found", dir.join("relay-control-plane").display());
                }
                bins.push(dir);
            }
            let work = tempfile::Builder::new().prefix("relay-bench-publish-").tempdir()?;
            let opts = publish::PublishOpts {
                bins,
                rounds: rounds.clamp(1, 100),
                database_url,
                accounts: accounts.clamp(1, 100_000),
                changes: changes.clamp(1, 10_000),
                updates: updates.min(10_000),
                work: work.path().to_path_buf(),
                keep_db,
            };
            let out = tokio::select! {
                r = publish::run(opts) => r,
                _ = relay_runtime::signal::shutdown() => bail!("interrupted; everything the run started is stopped"),
            };
            match out {
                Ok(v) => {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                    Ok(())
                }
                Err(e) => {
                    let kept = work.keep();
                    eprintln!("logs kept in {}", kept.join("logs").display());
                    Err(e)
                }
            }
        }
        Cmd::RequestStats {
            bin_dir,
            compare_bin_dir,
            database_url,
            requests,
            rounds,
            keep_db,
        } => {
            let mut bins = Vec::new();
            for dir in std::iter::once(bin_dir).chain(compare_bin_dir) {
                let dir = std::fs::canonicalize(&dir).with_context(|| format!("bin dir {}", dir.display()))?;
                if !dir.join("relay-control-plane").exists() {
                    bail!("{} not found", dir.join("relay-control-plane").display());
                }
                bins.push(dir);
            }
            let work = tempfile::Builder::new().prefix("relay-bench-reqstats-").tempdir()?;
            let opts = reqstats::ReqStatsOpts {
                bins,
                rounds: rounds.clamp(1, 100),
                database_url,
                requests: requests.clamp(1, 10_000_000),
                work: work.path().to_path_buf(),
                keep_db,
            };
            let out = tokio::select! {
                r = reqstats::run(opts) => r,
                _ = relay_runtime::signal::shutdown() => bail!("interrupted; everything the run started is stopped"),
            };
            match out {
                Ok(v) => {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                    Ok(())
                }
                Err(e) => {
                    let kept = work.keep();
                    eprintln!("logs kept in {}", kept.join("logs").display());
                    Err(e)
                }
            }
        }
    }
}
