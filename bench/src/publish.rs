//! `relay-bench publish`: how long one account-state change takes to reach a watching data
//! plane when the control plane holds many accounts (issue 8: incremental config), and, for
//! comparison, one account update (a full config build).
//!
//! It starts `relay-control-plane` on a fresh Postgres database, creates the accounts through
//! the admin API, opens one Watch stream (a simulated data plane that ACKs at once), then sends
//! `ReportAccountState` calls one at a time, each for another account, and times each from the
//! call sent until the stream holds the version the report was committed at.

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
    /// Where `relay-control-plane` is.
    pub bins: PathBuf,
    /// Postgres to create the run's database in.
    pub database_url: String,
    pub accounts: usize,
    /// Account-state reports timed.
    pub changes: usize,
    /// Account updates timed (full builds), for comparison.
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
    let (cp_proc, url, token) = env::control_plane(&o.bins, db_url, logs).await?;
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

    // One data plane, caught up with the head.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let watcher = tokio::spawn(cp::watcher(url.clone(), dp_token.clone(), 0, "publish".into(), tx));
    let head = head_revision(&mut admin).await?;
    let caught_up = Instant::now();
    receipt_of(&mut rx, head, Duration::from_secs(600)).await?;
    let first_snapshot = caught_up.elapsed();

    let mut dp = ConfigDiscoveryClient::with_interceptor(cp::channel(&url).await?, Bearer::new(&dp_token)?);
    let now_ms = chrono::Utc::now().timestamp_millis();
    let mut states = Vec::with_capacity(o.changes);
    for i in 0..o.changes {
        let account_id = ids[(i * 7919) % ids.len()].clone();
        let sent = Instant::now();
        let ack = dp
            .report_account_state(pb::AccountStateReport {
                node_id: "bench-publish-reporter".into(),
                state: Some(pb::AccountState {
                    account_id,
                    health: pb::AccountHealth::RateLimited as i32,
                    reason: "relay-bench publish".into(),
                    until_ms: now_ms + 3_600_000 + i as i64 * 1_000,
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
        let sent = Instant::now();
        admin
            .update_account(pb::UpdateAccountRequest {
                account: ids[(i * 104_729) % ids.len()].clone(),
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
    cp_proc.stop("TERM", Duration::from_secs(10)).await?;
    Ok(serde_json::json!({
        "control_plane": o.bins.join("relay-control-plane").display().to_string(),
        "accounts": ids.len(),
        "seed_secs": crate::stats::round3(seed_time.as_secs_f64()),
        "first_snapshot_ms": first_snapshot.as_millis() as u64,
        "state_change_to_data_plane": Dist::new(states).summary(),
        "account_update_to_data_plane": Dist::new(updates).summary(),
    }))
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
