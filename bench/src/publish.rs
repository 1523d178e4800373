//! `relay-bench publish`: how long one account-state change takes to reach a watching data
//! plane when the control plane holds many accounts (issue 8: incremental config), and, for
//! comparison, one account update (a full config build).
//!
//! It creates a fresh Postgres database, starts `relay-control-plane` on it and creates the
//! accounts through the admin API. Then, in rounds, it (re)starts the control plane on that
//! database (with `--compare-bin-dir`: the two builds alternately, order rotating, so both meet
//! the same machine), opens one Watch stream (a simulated data plane that ACKs at once), sends
//! `ReportAccountState` calls one at a time, each for another account, and times each from the
//! call sent until the stream holds the version the report was committed at; then the same for
//! a few account updates.

use crate::cp::{self, Bearer};
use crate::env;
use crate::stats::Dist;
use anyhow::{bail, Context, Result};
use futures::StreamExt;
use relay_proto::v1 as pb;
use relay_proto::v1::config_discovery_client::ConfigDiscoveryClient;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// What `relay-bench publish` runs.
#[derive(Debug, Clone)]
pub struct PublishOpts {
    /// Where `relay-control-plane` is: one build, or two to compare (labels "a" and "b").
    pub bins: Vec<PathBuf>,
    /// Measuring rounds; each starts every build once.
    pub rounds: usize,
    /// Postgres to create the run's database in.
    pub database_url: String,
    pub accounts: usize,
    /// Account-state reports timed per round and build.
    pub changes: usize,
    /// Account updates timed (full builds) per round and build, for comparison.
    pub updates: usize,
    /// Logs go under `work/logs`.
    pub work: PathBuf,
    pub keep_db: bool,
}

/// Runs the measurement on its own database (dropped afterwards unless `keep_db`) and returns
/// the results as JSON.
pub async fn run(o: PublishOpts) -> Result<serde_json::Value> {
    let logs = o.work.join("logs");
    std::fs::create_dir_all(&logs)?;
    let db_name = format!("relay_bench_publish_{}", uuid::Uuid::new_v4().simple());
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

async fn measure(o: &PublishOpts, db_url: &str, logs: &Path) -> Result<serde_json::Value> {
    let (master_key, token) = env::new_secrets();
    let first = o.bins.first().context("no control plane given")?;
    let (seeder, url) = env::control_plane_with(first, db_url, logs, &master_key, &token, "cp-seed").await?;
    let mut admin = cp::admin(&url, &token).await?;
    let dp_token = admin
        .create_admin_token(pb::CreateAdminTokenRequest {
            name: "bench-publish-dp".into(),
            role: pb::AdminRole::DataPlane as i32,
        })
        .await?
        .into_inner()
        .token;
    let seeding = Instant::now();
    let ids = create_accounts(&admin, o.accounts).await?;
    let seed_time = seeding.elapsed();
    seeder.stop("TERM", Duration::from_secs(10)).await?;

    let labels = ["a", "b"];
    let mut states: Vec<Vec<u64>> = vec![Vec::new(); o.bins.len()];
    let mut updates: Vec<Vec<u64>> = vec![Vec::new(); o.bins.len()];
    let mut first_snapshot: Vec<Vec<u64>> = vec![Vec::new(); o.bins.len()];
    let mut next_account = 0usize;
    for round in 0..o.rounds {
        for k in 0..o.bins.len() {
            let b = (round + k) % o.bins.len();
            let name = format!("cp-{}-{round}", labels[b % 2]);
            let (proc_, url) = env::control_plane_with(&o.bins[b], db_url, logs, &master_key, &token, &name).await?;
            let r = one_round(o, &url, &token, &dp_token, &ids, &mut next_account).await;
            proc_.stop("TERM", Duration::from_secs(10)).await?;
            let r = r.with_context(|| format!("round {round}, control plane {}", labels[b % 2]))?;
            first_snapshot[b].push(r.first_snapshot_us);
            states[b].extend(r.states);
            updates[b].extend(r.updates);
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
                "first_snapshot": Dist::new(first_snapshot[b].clone()).summary(),
                "state_change_to_data_plane": Dist::new(states[b].clone()).summary(),
                "account_update_to_data_plane": Dist::new(updates[b].clone()).summary(),
            })
        })
        .collect();
    Ok(serde_json::json!({
        "accounts": ids.len(),
        "seed_secs": crate::stats::round3(seed_time.as_secs_f64()),
        "rounds": o.rounds,
        "builds": builds,
    }))
}

/// What one control plane did in one round, in microseconds.
struct Round {
    first_snapshot_us: u64,
    states: Vec<u64>,
    updates: Vec<u64>,
}

/// One control plane, just started: a data plane catches up, then the timed state reports and
/// account updates.
async fn one_round(
    o: &PublishOpts,
    url: &str,
    token: &str,
    dp_token: &str,
    ids: &[String],
    next_account: &mut usize,
) -> Result<Round> {
    let mut admin = cp::admin(url, token).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let watcher = tokio::spawn(cp::watcher(
        url.to_string(),
        dp_token.to_string(),
        0,
        "publish".into(),
        tx,
    ));
    let head = head_revision(&mut admin).await?;
    let caught_up = Instant::now();
    receipt_of(&mut rx, head, Duration::from_secs(600)).await?;
    let first_snapshot_us = caught_up.elapsed().as_micros() as u64;

    let mut dp = ConfigDiscoveryClient::with_interceptor(cp::channel(url).await?, Bearer::new(dp_token)?);
    let now_ms = chrono::Utc::now().timestamp_millis();
    let mut states = Vec::with_capacity(o.changes);
    for i in 0..o.changes {
        let n = *next_account;
        *next_account += 1;
        let account_id = ids[(n * 7919) % ids.len()].clone();
        let sent = Instant::now();
        let ack = dp
            .report_account_state(pb::AccountStateReport {
                node_id: "bench-publish-reporter".into(),
                state: Some(pb::AccountState {
                    account_id,
                    health: pb::AccountHealth::RateLimited as i32,
                    reason: "relay-bench publish".into(),
                    until_ms: now_ms + 3_600_000 + n as i64 * 1_000,
                    ..Default::default()
                }),
            })
            .await
            .context("reporting an account state")?
            .into_inner();
        if !ack.applied {
            bail!("state report {i} was not applied");
        }
        let revision = ack.version.map(|v| v.revision).unwrap_or_default();
        let at = receipt_of(&mut rx, revision, Duration::from_secs(120)).await?;
        states.push(at.saturating_duration_since(sent).as_micros() as u64);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut updates = Vec::with_capacity(o.updates);
    for i in 0..o.updates {
        let n = *next_account;
        *next_account += 1;
        let sent = Instant::now();
        admin
            .update_account(pb::UpdateAccountRequest {
                account: ids[(n * 104_729) % ids.len()].clone(),
                weight: Some(2 + (i % 5) as u32),
                ..Default::default()
            })
            .await
            .context("updating an account")?;
        let revision = head_revision(&mut admin).await?;
        let at = receipt_of(&mut rx, revision, Duration::from_secs(120)).await?;
        updates.push(at.saturating_duration_since(sent).as_micros() as u64);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    watcher.abort();
    Ok(Round {
        first_snapshot_us,
        states,
        updates,
    })
}

/// Creates `n` anthropic-compatible accounts, 16 calls at a time; returns their ids.
async fn create_accounts(admin: &cp::Admin, n: usize) -> Result<Vec<String>> {
    let results: Vec<Result<String>> = futures::stream::iter(0..n)
        .map(|i| {
            let mut admin = admin.clone();
            async move {
                let info = admin
                    .create_account(pb::CreateAccountRequest {
                        name: format!("bench-publish-{i:05}"),
                        kind: pb::AccountKind::AnthropicCompatible as i32,
                        base_url: "http://127.0.0.1:9".into(),
                        credential: format!("sk-bench-publish-{i:05}-credential"),
                        ..Default::default()
                    })
                    .await
                    .context("creating an account")?
                    .into_inner();
                Ok(info.id)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    results.into_iter().collect()
}

async fn head_revision(admin: &mut cp::Admin) -> Result<u64> {
    Ok(admin
        .get_config_version(pb::GetConfigVersionRequest {})
        .await?
        .into_inner()
        .revision)
}

/// When the watcher received a version at `revision` or later.
async fn receipt_of(
    rx: &mut mpsc::UnboundedReceiver<cp::Receipt>,
    revision: u64,
    timeout: Duration,
) -> Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
            Ok(Some((_, rev, at))) if rev >= revision => return Ok(at),
            Ok(Some(_)) => {}
            Ok(None) => bail!("the Watch stream ended"),
            Err(_) => bail!("revision {revision} did not reach the data plane within {timeout:?}"),
        }
    }
}
