//! Talking to the control plane: the admin setup of a run, simulated data
//! planes watching config (propagation, `publish`), and a usage-ingest driver.

use crate::stats::Dist;
use anyhow::{bail, Context, Result};
use relay_proto::v1 as pb;
use relay_proto::v1::admin_client::AdminClient;
use relay_proto::v1::config_discovery_client::ConfigDiscoveryClient;
use relay_proto::v1::usage_ingest_client::UsageIngestClient;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

#[derive(Clone)]
pub struct Bearer(MetadataValue<tonic::metadata::Ascii>);

impl Bearer {
    pub fn new(token: &str) -> Result<Self> {
        Ok(Self(format!("Bearer {token}").parse()?))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        r.metadata_mut().insert("authorization", self.0.clone());
        Ok(r)
    }
}

pub type Admin = AdminClient<InterceptedService<Channel, Bearer>>;

pub async fn channel(url: &str) -> Result<Channel> {
    Ok(Endpoint::from_shared(url.to_string())?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?)
}

pub async fn admin(url: &str, token: &str) -> Result<Admin> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match channel(url).await {
            Ok(ch) => return Ok(AdminClient::with_interceptor(ch, Bearer::new(token)?)),
            Err(e) if Instant::now() > deadline => return Err(e).context("connecting to the control plane"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// What a run creates through the admin API.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Client key whose group reaches the fast mock.
    pub key: String,
    /// Client key whose group reaches the slow-stream mock.
    pub slow_key: String,
    pub key_id: String,
    pub slow_key_id: String,
    pub dp_token: String,
}

pub async fn setup(admin: &mut Admin, fast_mock: &str, slow_mock: &str) -> Result<Setup> {
    admin
        .create_account(pb::CreateAccountRequest {
            name: "bench-mock".into(),
            kind: pb::AccountKind::AnthropicCompatible as i32,
            base_url: fast_mock.into(),
            credential: "sk-bench-mock-credential".into(),
            ..Default::default()
        })
        .await
        .context("creating the mock account")?;
    admin
        .create_group(pb::CreateGroupRequest {
            name: "slow".into(),
            description: "slow-stream mock".into(),
            limits: None,
            ..Default::default()
        })
        .await
        .context("creating the slow group")?;
    admin
        .create_account(pb::CreateAccountRequest {
            name: "bench-slow-mock".into(),
            kind: pb::AccountKind::AnthropicCompatible as i32,
            base_url: slow_mock.into(),
            credential: "sk-bench-slow-credential".into(),
            groups: vec!["slow".into()],
            ..Default::default()
        })
        .await
        .context("creating the slow mock account")?;
    let k = admin
        .create_api_key(pb::CreateApiKeyRequest {
            name: "bench".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let s = admin
        .create_api_key(pb::CreateApiKeyRequest {
            name: "bench-slow".into(),
            group: "slow".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let t = admin
        .create_admin_token(pb::CreateAdminTokenRequest {
            name: "bench-dp".into(),
            role: pb::AdminRole::DataPlane as i32,
        })
        .await?
        .into_inner();
    Ok(Setup {
        key: k.key,
        slow_key: s.key,
        key_id: k.info.map(|i| i.id).unwrap_or_default(),
        slow_key_id: s.info.map(|i| i.id).unwrap_or_default(),
        dp_token: t.token,
    })
}

/// A client key in the default group (the fast mock) with limits it never reaches
/// (scenario 8): every request it sends is checked and counted by the limiter.
/// Returns the key and its id.
pub async fn limited_key(admin: &mut Admin, name: &str) -> Result<(String, String)> {
    let k = admin
        .create_api_key(pb::CreateApiKeyRequest {
            name: name.into(),
            limits: Some(pb::KeyLimits {
                requests_per_minute: 1_000_000_000,
                max_concurrency: 100_000,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .context("creating the limited key")?
        .into_inner();
    Ok((k.key, k.info.map(|i| i.id).unwrap_or_default()))
}

/// One receipt: watcher index, revision, when it arrived.
pub type Receipt = (usize, u64, Instant);

/// One simulated data plane: its own connection, Hello, then ACK every update
/// at once, reporting each receipt.
pub async fn watcher(
    url: String,
    token: String,
    idx: usize,
    tag: String,
    tx: mpsc::UnboundedSender<Receipt>,
) -> Result<()> {
    let ch = channel(&url).await?;
    let mut client =
        ConfigDiscoveryClient::with_interceptor(ch, Bearer::new(&token)?).max_decoding_message_size(64 * 1024 * 1024);
    let (out_tx, out_rx) = mpsc::channel::<pb::WatchRequest>(4);
    out_tx
        .send(pb::WatchRequest {
            kind: Some(pb::watch_request::Kind::Hello(pb::Hello {
                node_id: format!("bench-{tag}-{idx}"),
                build_version: "relay-bench".into(),
                held: None,
                ..Default::default()
            })),
        })
        .await?;
    let mut inbound = client.watch(ReceiverStream::new(out_rx)).await?.into_inner();
    while let Some(u) = inbound.message().await? {
        let now = Instant::now();
        let version = u.version.unwrap_or_default();
        out_tx
            .send(pb::WatchRequest {
                kind: Some(pb::watch_request::Kind::Ack(pb::Ack {
                    nonce: u.nonce,
                    version: Some(version),
                    ..Default::default()
                })),
            })
            .await?;
        if tx.send((idx, version.revision, now)).is_err() {
            break;
        }
    }
    Ok(())
}

#[derive(Debug, Default)]
pub struct PropagationResult {
    pub watchers: usize,
    pub writes: usize,
    /// From just before each admin call was sent (upper bound: includes the write itself).
    pub from_send: Dist,
    /// From the moment each admin call returned (lower bound: the commit came before).
    pub from_return: Dist,
    /// Admin call round trips.
    pub admin_rtt: Dist,
    pub missing: usize,
    pub connect_time: Duration,
    /// Watchers the control plane shows as having ACKed the last write (ListProxies).
    pub acks_recorded: usize,
    /// Per write: from the admin call sent until the control plane has
    /// recorded every stream's ACK (polled every 10 ms; 50 ms above 1,000 streams).
    pub acks_recorded_after: Dist,
}

/// Opens `n` Watch streams, then makes `writes` admin writes one at a time,
/// each after every stream has the previous one, and times each stream's
/// receipt (its ACK goes out right after) of each write.
pub async fn propagation(
    url: &str,
    admin: &mut Admin,
    dp_token: &str,
    n: usize,
    writes: usize,
    tag: &str,
) -> Result<PropagationResult> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Receipt>();
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let started = Instant::now();
    let mut tasks = Vec::new();
    // Open the connections a few at a time, like data planes coming up.
    let gate = Arc::new(Semaphore::new(64));
    for i in 0..n {
        let (url, token, tx, errors, tag, gate) = (
            url.to_string(),
            dp_token.to_string(),
            tx.clone(),
            errors.clone(),
            tag.to_string(),
            gate.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await;
            let (first_tx, mut first_rx) = mpsc::unbounded_channel::<Receipt>();
            // Release the gate on the first receipt, then forward.
            let fwd = tokio::spawn(async move {
                let mut p = permit.ok();
                while let Some(r) = first_rx.recv().await {
                    p.take();
                    if tx.send(r).is_err() {
                        break;
                    }
                }
            });
            if let Err(e) = watcher(url, token, i, tag, first_tx).await {
                errors.lock().unwrap_or_else(|p| p.into_inner()).push(format!("{e:#}"));
            }
            let _ = fwd.await;
        }));
    }
    drop(tx);
    // Everyone has its first snapshot.
    let mut latest: HashMap<usize, u64> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while latest.len() < n {
        match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
            Ok(Some((i, rev, _))) => {
                latest.insert(i, rev);
            }
            _ => {
                let errs = errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
                bail!(
                    "only {} of {n} watchers got their first config; errors: {:?}",
                    latest.len(),
                    errs.iter().take(3).collect::<Vec<_>>()
                );
            }
        }
    }
    let connect_time = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    while rx.try_recv().is_ok() {}

    let mut r = PropagationResult {
        watchers: n,
        writes,
        connect_time,
        ..Default::default()
    };
    let (mut from_send, mut from_return, mut rtt, mut recorded) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for w in 0..writes {
        let sent = Instant::now();
        admin
            .create_group(pb::CreateGroupRequest {
                name: format!("prop-{tag}-{w}"),
                description: String::new(),
                limits: None,
                ..Default::default()
            })
            .await
            .context("admin write")?;
        let returned = Instant::now();
        rtt.push((returned - sent).as_micros() as u64);
        let head = admin
            .get_config_version(pb::GetConfigVersionRequest {})
            .await?
            .into_inner()
            .revision;
        let mut got: HashMap<usize, Instant> = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while got.len() < n {
            match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
                Ok(Some((i, rev, at))) if rev >= head => {
                    got.entry(i).or_insert(at);
                }
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        r.missing += n - got.len();
        for at in got.values() {
            from_send.push(at.saturating_duration_since(sent).as_micros() as u64);
            from_return.push(at.saturating_duration_since(returned).as_micros() as u64);
        }
        // The control plane's own view: every ACK of this version recorded
        // (`ListProxies`). The next write waits for it, so it never queues
        // behind this one's ACK bookkeeping: writes are spaced like an
        // operator's, not a storm.
        let rec_deadline = Instant::now() + Duration::from_secs(30);
        r.acks_recorded = 0;
        while Instant::now() < rec_deadline {
            let proxies = admin
                .list_proxies(pb::ListProxiesRequest {})
                .await?
                .into_inner()
                .proxies;
            let acked = proxies
                .iter()
                .filter(|p| p.node_id.starts_with(&format!("bench-{tag}-")))
                .filter(|p| p.acked.is_some_and(|a| a.revision >= head))
                .count();
            r.acks_recorded = acked;
            if acked >= n {
                recorded.push(sent.elapsed().as_micros() as u64);
                break;
            }
            // Each poll lists every data plane: at 10,000 a poll is itself work for the control plane.
            tokio::time::sleep(Duration::from_millis(if n > 1000 { 50 } else { 10 })).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        while rx.try_recv().is_ok() {}
    }
    for t in &tasks {
        t.abort();
    }
    r.from_send = Dist::new(from_send);
    r.from_return = Dist::new(from_return);
    r.admin_rtt = Dist::new(rtt);
    r.acks_recorded_after = Dist::new(recorded);
    Ok(r)
}

#[derive(Debug, Default)]
pub struct IngestResult {
    pub events: u64,
    pub acked_inserted: u64,
    pub acked_duplicates: u64,
    pub acked_rejected: u64,
    pub elapsed: Duration,
    pub events_per_sec: f64,
    pub rows_in_db: i64,
}

fn event(node: &str, i: u64) -> pb::UsageEvent {
    pb::UsageEvent {
        event_id: uuid::Uuid::now_v7().to_string(),
        request_id: format!("req_bench_{i}"),
        timestamp_ms: chrono::Utc::now().timestamp_millis(),
        node_id: node.to_string(),
        api_key_id: "bench-key".into(),
        account_id: "bench-account".into(),
        model: "claude-sonnet-4-5-20250929".into(),
        input_tokens: 1200 + i % 100,
        output_tokens: 300 + i % 50,
        cache_write_5m_tokens: 0,
        cache_write_1h_tokens: 0,
        cache_read_tokens: 1024,
        cost_pico_usd: 8_100_000_000_000 + i,
        http_status: 200,
        error_type: String::new(),
        stream: i.is_multiple_of(2),
        cancelled: false,
        latency_ms: 900,
        ttfb_ms: 300,
        upstream_request_id: format!("req_upstream_{i}"),
        web_search_requests: 0,
        anomaly: String::new(),
        client_request_id: String::new(),
        queue_wait_ms: 0,
        waited_for: String::new(),
        stream_events: 0,
        max_event_gap_ms: 0,
        error_message: String::new(),
        model_requested: String::new(),
        group_id: String::new(),
    }
}

/// Sends `total` events over `streams` Report streams in batches of `batch`,
/// at most `window` batches un-ACKed per stream; counts ACKed events, then
/// counts the rows with this node id in Postgres.
#[derive(Debug, Clone, Copy)]
pub struct IngestSpec {
    pub total: u64,
    pub streams: usize,
    pub batch: usize,
    /// Batches un-ACKed at once per stream.
    pub window: usize,
}

pub async fn ingest(
    url: &str,
    dp_token: &str,
    db: &tokio_postgres::Client,
    node: &str,
    spec: IngestSpec,
) -> Result<IngestResult> {
    let IngestSpec {
        total,
        streams,
        batch,
        window,
    } = spec;
    // Build every batch first, so the timed part is transport and commit only.
    let per_stream = total / streams as u64;
    let mut plans: Vec<Vec<pb::UsageBatch>> = Vec::new();
    let mut n = 0u64;
    for _ in 0..streams {
        let mut batches = Vec::new();
        let mut left = per_stream;
        let mut id = 0;
        while left > 0 {
            let k = left.min(batch as u64);
            id += 1;
            batches.push(pb::UsageBatch {
                batch_id: id,
                node_id: node.to_string(),
                events: (0..k).map(|j| event(node, n + j)).collect(),
                oldest_unacked_age_ms: 0,
            });
            n += k;
            left -= k;
        }
        plans.push(batches);
    }
    let mut channels = Vec::new();
    for _ in 0..streams {
        channels.push(channel(url).await?);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (plan, ch) in plans.into_iter().zip(channels) {
        let token = dp_token.to_string();
        tasks.push(tokio::spawn(async move {
            let mut client = UsageIngestClient::with_interceptor(ch, Bearer::new(&token)?)
                .max_encoding_message_size(256 * 1024 * 1024);
            let (tx, rx) = mpsc::channel::<pb::UsageBatch>(window.max(1));
            let credits = Arc::new(Semaphore::new(window.max(1)));
            let count = plan.len();
            let sender = {
                let credits = credits.clone();
                tokio::spawn(async move {
                    for b in plan {
                        let Ok(p) = credits.acquire().await else { return };
                        p.forget();
                        if tx.send(b).await.is_err() {
                            return;
                        }
                    }
                    // Keep the stream open until every ACK is in.
                    let _ = credits.acquire_many(window.max(1) as u32).await;
                })
            };
            let mut acks = client.report(ReceiverStream::new(rx)).await?.into_inner();
            let (mut ins, mut dup, mut rej) = (0u64, 0u64, 0u64);
            for _ in 0..count {
                let Some(a) = acks.message().await? else {
                    bail!("the control plane closed the stream early")
                };
                ins += a.inserted as u64;
                dup += a.duplicates as u64;
                rej += a.rejected as u64;
                credits.add_permits(1);
            }
            sender.abort();
            anyhow::Ok((ins, dup, rej))
        }));
    }
    let mut r = IngestResult {
        events: n,
        ..Default::default()
    };
    for t in tasks {
        let (i, d, j) = t.await??;
        r.acked_inserted += i;
        r.acked_duplicates += d;
        r.acked_rejected += j;
    }
    r.elapsed = started.elapsed();
    r.events_per_sec = r.acked_inserted as f64 / r.elapsed.as_secs_f64();
    r.rows_in_db = db
        .query_one("SELECT count(*) FROM usage_events WHERE node_id = $1", &[&node])
        .await?
        .get(0);
    Ok(r)
}
