//! Webhook notifications for operators without Prometheus: account trouble (unauthorized,
//! blocked, rate limited for long, OAuth refresh failed) and its end, budget thresholds crossed,
//! data planes lost and back. See docs/operations.md, "Notifications".
//!
//! Design: the leader replica runs [`Notifier::run`]. It looks at the fleet state the store
//! holds (account states the data planes report, data-plane heartbeats, committed spend) every
//! [`OBSERVE_EVERY`], and writes each event into the store's outbox under a dedup key
//! `KIND/SUBJECT/EPISODE` (an insert that does nothing when the key is stored). Episodes that
//! end (an account that recovers, a data plane back) are kept open in the store, so a new
//! leader knows what it must send the "recovered" event for, and never sends an event twice.
//! The same task delivers the outbox: POST with a timeout, retried with exponential backoff and
//! jitter, [`MAX_ATTEMPTS`] attempts and [`MAX_AGE_MS`] at most, then marked failed. A slow or
//! dead receiver only delays this task: ingest, admin calls and config pushes never wait on it.
//!
//! Secrets: `notify.webhook_url` and `notify.signing_secret` are stored sealed with the master
//! key ([`seal_setting`]), are never pushed to data planes (`relay_proto::settings::CONTROL_PLANE_ONLY`),
//! and never appear in logs, errors or metrics (delivery errors name a class of failure only).

use crate::crypto::MasterKey;
use crate::model::{AccountHealth, KeyStatus, Millis, ProxyState, PROXY_STALE_AFTER_MS};
use crate::spend::{current_periods, SpendCache};
use crate::store::{DeliveryOutcome, DynStore, EpisodeChange, Notification, Result as StoreResult};
use base64::Engine;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::Full;
use relay_net::client::Upstreams;
use relay_proto::metrics as m;
use relay_proto::settings;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

/// How often the leader looks for new events.
pub const OBSERVE_EVERY: Duration = Duration::from_secs(2);
/// How often the leader looks for notifications due.
pub const DELIVER_EVERY: Duration = Duration::from_secs(1);
/// Longest wait for a receiver's answer (connect, send, status).
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts per notification before it is marked failed.
pub const MAX_ATTEMPTS: u32 = 10;
/// A notification not delivered within this long of its event is marked failed.
pub const MAX_AGE_MS: Millis = 24 * 3_600_000;
/// First retry delay (doubling per attempt, jittered) and its cap.
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// A data plane gone longer than this before notifications saw it is not reported lost (an old
/// record, e.g. when notifications are first turned on).
pub const LOST_LOOKBACK_MS: Millis = 24 * 3_600_000;
/// Notifications delivered per pass at most.
const BATCH: u32 = 50;
/// Prefix of a sealed setting value as stored.
const SEALED: &str = "sealed:v1:";

/// The settings this module reads.
pub const WEBHOOK_URL: &str = "notify.webhook_url";
pub const SIGNING_SECRET: &str = "notify.signing_secret";
pub const WEBHOOK_FORMAT: &str = "notify.webhook_format";
pub const RATE_LIMITED_AFTER_MS: &str = "notify.rate_limited_after_ms";
pub const DATA_PLANE_LOST_AFTER_MS: &str = "notify.data_plane_lost_after_ms";
pub const BUDGET_THRESHOLDS: &str = "notify.budget_thresholds";

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("cannot seal the value of {0}")]
    Seal(String),
}

/// A secret setting's value as stored: sealed with the master key, bound to the setting's name.
pub fn seal_setting(key: &MasterKey, name: &str, value: &str) -> Result<String, NotifyError> {
    let sealed = key
        .seal(value, &format!("setting/{name}"))
        .map_err(|_| NotifyError::Seal(name.to_string()))?;
    Ok(format!(
        "{SEALED}{}",
        base64::engine::general_purpose::STANDARD.encode(sealed)
    ))
}

/// A secret setting's value in clear; a value stored unsealed is returned as is, one that does
/// not open (another master key) is `None`.
pub fn open_setting(key: &MasterKey, name: &str, stored: &str) -> Option<String> {
    let Some(b64) = stored.strip_prefix(SEALED) else {
        return Some(stored.to_string());
    };
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    key.open(&bytes, &format!("setting/{name}")).ok()
}

/// Where and how to send.
#[derive(Clone, PartialEq, Eq)]
pub struct Webhook {
    pub url: String,
    pub secret: Option<String>,
    pub slack: bool,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("url", &settings::mask(&self.url))
            .field("signed", &self.secret.is_some())
            .field("slack", &self.slack)
            .finish()
    }
}

impl Webhook {
    /// The configured webhook, if `notify.webhook_url` is set (and opens with this key).
    pub fn from_settings(values: &BTreeMap<String, String>, key: &MasterKey) -> Option<Webhook> {
        let url = open_setting(key, WEBHOOK_URL, values.get(WEBHOOK_URL)?)?;
        settings::known(WEBHOOK_URL).check(&url).ok()?;
        let secret = values
            .get(SIGNING_SECRET)
            .and_then(|s| open_setting(key, SIGNING_SECRET, s))
            .filter(|s| !s.is_empty());
        let slack = settings::known(WEBHOOK_FORMAT).choice_in(values) == "slack";
        Some(Webhook {
            url: url.trim().to_string(),
            secret,
            slack,
        })
    }
}

/// `X-Relay-Signature`: `t=UNIX,v1=HEX(HMAC-SHA256(secret, "UNIX.BODY"))`.
pub fn signature(secret: &str, unix_secs: i64, body: &[u8]) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        // HMAC takes keys of any length.
        Err(_) => return String::new(),
    };
    mac.update(unix_secs.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={unix_secs},v1={}", crate::crypto::hex(&mac.finalize().into_bytes()))
}

/// Checks a signature header as a receiver would (constant-time), for tests and docs.
pub fn verify(secret: &str, header: &str, body: &[u8]) -> bool {
    let Some(t) = header
        .split(',')
        .find_map(|p| p.strip_prefix("t="))
        .and_then(|t| t.parse::<i64>().ok())
    else {
        return false;
    };
    let expected = signature(secret, t, body);
    crate::crypto::hashes_equal(&expected, header)
}

/// The delay before retry number `attempt` (1 = the first retry): `BACKOFF_BASE * 2^(attempt-1)`
/// capped at `BACKOFF_MAX`, then jittered to between half and all of it (`jitter` in [0, 1]).
pub fn backoff(attempt: u32, jitter: f64) -> Duration {
    let exp = attempt.saturating_sub(1).min(20);
    let full = BACKOFF_BASE.saturating_mul(1u32 << exp).min(BACKOFF_MAX);
    full.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// The id receivers deduplicate by (`X-Relay-Delivery`, `id` in the body): derived from the
/// dedup key, so every attempt of one event carries the same id.
pub fn event_id(dedup_key: &str) -> String {
    let d = Sha256::digest(dedup_key.as_bytes());
    format!("evt_{}", &crate::crypto::hex(&d)[..32])
}

fn rfc3339(ms: Millis) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// One event about to be queued.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: String,
    pub subject: String,
    pub episode: String,
    pub severity: &'static str,
    pub summary: String,
    pub subject_doc: Value,
    pub details: Value,
}

impl Event {
    fn dedup_key(&self) -> String {
        format!("{}/{}/{}", self.kind, self.subject, self.episode)
    }

    /// The generic JSON document (docs/operations.md, "Notifications").
    pub fn document(&self, at_ms: Millis) -> Value {
        let key = self.dedup_key();
        json!({
            "id": event_id(&key),
            "type": self.kind,
            "occurred_at": rfc3339(at_ms),
            "severity": self.severity,
            "summary": self.summary,
            "subject": self.subject_doc,
            "details": self.details,
            "dedup_key": key,
            "relay_version": env!("CARGO_PKG_VERSION"),
        })
    }
}

/// The document `relayctl notify test` sends (type `test`, a fresh id each time).
pub fn test_document(actor: &str, now: Millis) -> Value {
    let e = Event {
        kind: "test".into(),
        subject: "test".into(),
        episode: uuid::Uuid::new_v4().simple().to_string(),
        severity: "info",
        summary: format!("Test notification from relay (sent by {actor})"),
        subject_doc: json!({"kind": "test", "id": "test", "name": "test"}),
        details: json!({"sent_by": actor}),
    };
    e.document(now)
}

/// The body sent for a stored event document.
pub fn render(doc: &Value, slack: bool) -> Vec<u8> {
    if !slack {
        return doc.to_string().into_bytes();
    }
    let s = |k: &str| doc.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let icon = match s("severity").as_str() {
        "critical" => ":rotating_light:",
        "warning" => ":warning:",
        _ => ":white_check_mark:",
    };
    let text = format!("{icon} relay: {}", s("summary"));
    json!({
        "text": text,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": format!("{icon} *{}*\n{}", s("type"), s("summary"))}},
            {"type": "context", "elements": [
                {"type": "mrkdwn", "text": format!("{} · {}", s("occurred_at"), s("id"))}
            ]}
        ]
    })
    .to_string()
    .into_bytes()
}

/// The leader's notification job.
pub struct Notifier {
    pub store: DynStore,
    pub key: MasterKey,
    pub upstreams: Arc<Upstreams>,
    pub spend: Arc<SpendCache>,
}

impl Notifier {
    /// Observes and delivers until aborted (leadership lost, shutdown).
    pub async fn run(self: Arc<Self>, _term: u64) {
        // The outbox gauges are refreshed on their own beat: a slow receiver holds a
        // delivery batch for up to BATCH × the send timeout, and the gauges must show
        // the backlog growing meanwhile, not the value from before the batch.
        let _gauges = GaugeTask(tokio::spawn(Arc::clone(&self).refresh_gauges()));
        let mut last_observed: Option<tokio::time::Instant> = None;
        loop {
            let values = self.store.settings().await.unwrap_or_default();
            let hook = Webhook::from_settings(&values, &self.key);
            if hook.is_some() && last_observed.is_none_or(|t| t.elapsed() >= OBSERVE_EVERY) {
                last_observed = Some(tokio::time::Instant::now());
                if let Err(e) = self.observe(&values, crate::model::now_ms()).await {
                    tracing::warn!(error = %e, "notifications: cannot read the fleet state; trying again");
                }
            }
            if let Err(e) = self.deliver_due(hook.as_ref()).await {
                tracing::warn!(error = %e, "notifications: cannot read the outbox; trying again");
            }
            tokio::time::sleep(DELIVER_EVERY).await;
        }
    }

    /// Sets the outbox gauges every [`DELIVER_EVERY`], independently of delivery.
    async fn refresh_gauges(self: Arc<Self>) {
        loop {
            if let Ok(st) = self.store.notify_stats().await {
                metrics::gauge!(m::NOTIFY_OUTBOX_PENDING).set(st.pending as f64);
                let age = st
                    .oldest_created_ms
                    .map(|t| crate::model::now_ms().saturating_sub(t).max(0) as f64 / 1000.0)
                    .unwrap_or(0.0);
                metrics::gauge!(m::NOTIFY_OUTBOX_OLDEST_AGE_SECONDS).set(age);
            }
            tokio::time::sleep(DELIVER_EVERY).await;
        }
    }

    async fn enqueue(&self, e: &Event, change: EpisodeChange, now: Millis) -> StoreResult<bool> {
        let n = Notification {
            dedup_key: e.dedup_key(),
            kind: e.kind.clone(),
            subject: e.subject.clone(),
            payload: e.document(now).to_string(),
            created_ms: now,
            attempts: 0,
        };
        let stored = self.store.notify_enqueue(&n, &change).await?;
        if stored {
            metrics::counter!(m::NOTIFY_EVENTS_TOTAL, "kind" => e.kind.clone()).increment(1);
            tracing::info!(kind = %e.kind, subject = %e.subject, "notification queued");
        }
        Ok(stored)
    }

    /// Writes every event the fleet state shows at `now` (each once: the outbox deduplicates).
    pub async fn observe(&self, values: &BTreeMap<String, String>, now: Millis) -> StoreResult<()> {
        let open = self.store.notify_open_episodes().await?;
        let open: HashMap<(String, String), String> =
            open.into_iter().map(|o| ((o.kind, o.subject), o.episode)).collect();
        let mut current: HashMap<(String, String), Event> = HashMap::new();
        // Troubles still going on that do not (or no longer) qualify for a new event: an open
        // episode of one is not over (a rate limit below a threshold raised since).
        let mut ongoing: HashSet<(String, String)> = HashSet::new();

        // Accounts in trouble.
        let accounts = self.store.list_accounts().await?;
        let names: HashMap<&str, &str> = accounts.iter().map(|a| (a.id.as_str(), a.name.as_str())).collect();
        let limited_after = settings::known(RATE_LIMITED_AFTER_MS).u64_in(values) as i64;
        for s in self.store.list_account_states().await? {
            if s.until != 0 && s.until <= now {
                continue;
            }
            let (kind, severity, what) = match s.health {
                AccountHealth::Unauthorized if s.reported_by == crate::jobs::oauth_refresh::ACTOR => {
                    ("account.refresh_failed", "critical", "its OAuth token refresh failed")
                }
                AccountHealth::Unauthorized => ("account.unauthorized", "critical", "is unauthorized"),
                AccountHealth::Blocked => ("account.blocked", "critical", "is blocked"),
                AccountHealth::RateLimited => {
                    let long = now.saturating_sub(s.since) >= limited_after
                        || (s.until > 0 && s.until.saturating_sub(s.since) >= limited_after);
                    if !long {
                        ongoing.insert(("account.rate_limited".into(), account_subject(&s.account_id, &s.scope)));
                        continue;
                    }
                    ("account.rate_limited", "warning", "is rate limited")
                }
                _ => continue,
            };
            let name = names.get(s.account_id.as_str()).copied().unwrap_or("");
            let subject = account_subject(&s.account_id, &s.scope);
            let scope = if s.scope.is_empty() {
                String::new()
            } else {
                format!(" ({})", s.scope)
            };
            current.insert(
                (kind.to_string(), subject.clone()),
                Event {
                    kind: kind.to_string(),
                    subject,
                    episode: s.since.to_string(),
                    severity,
                    summary: format!("Account {name:?}{scope} {what}: {}", s.reason),
                    subject_doc: json!({"kind": "account", "id": s.account_id, "name": name, "scope": s.scope}),
                    details: json!({
                        "state": s.health.as_str(),
                        "reason": s.reason,
                        "since": rfc3339(s.since),
                        "until": (s.until > 0).then(|| rfc3339(s.until)),
                        "reported_by": s.reported_by,
                    }),
                },
            );
        }

        // Data planes lost.
        let grace = settings::known(DATA_PLANE_LOST_AFTER_MS).u64_in(values) as i64;
        let proxies = self.store.list_proxies().await?;
        let mut live: HashSet<String> = HashSet::new();
        for p in &proxies {
            if p.live(now) {
                live.insert(p.node_id.clone());
                continue;
            }
            let gone_since = not_live_since(p);
            let gone_for = now.saturating_sub(gone_since);
            if gone_for < grace || gone_for > LOST_LOOKBACK_MS + grace {
                continue;
            }
            current.insert(
                ("data_plane.lost".to_string(), p.node_id.clone()),
                Event {
                    kind: "data_plane.lost".into(),
                    subject: p.node_id.clone(),
                    episode: gone_since.to_string(),
                    severity: "critical",
                    summary: format!(
                        "Data plane {:?} lost: disconnected since {} (last served by replica {:?})",
                        p.node_id,
                        rfc3339(gone_since),
                        p.replica
                    ),
                    subject_doc: json!({"kind": "data_plane", "id": p.node_id, "name": p.node_id}),
                    details: json!({
                        "last_seen": rfc3339(p.last_seen),
                        "replica": p.replica,
                        "build_version": p.build_version,
                    }),
                },
            );
        }

        // New episodes.
        for ((kind, subject), e) in &current {
            if !open.contains_key(&(kind.clone(), subject.clone())) {
                let change = EpisodeChange::Open {
                    kind: kind.clone(),
                    episode: e.episode.clone(),
                };
                self.enqueue(e, change, now).await?;
            }
        }
        // Episodes over.
        for ((kind, subject), episode) in &open {
            let k = (kind.clone(), subject.clone());
            if current.contains_key(&k) || ongoing.contains(&k) {
                continue;
            }
            let e = if let Some(dp_kind) = kind.strip_prefix("data_plane.") {
                // Still not live but past the lookback: not recovered, left open.
                if dp_kind != "lost" || (!live.contains(subject) && proxies.iter().any(|p| &p.node_id == subject)) {
                    continue;
                }
                Event {
                    kind: "data_plane.recovered".into(),
                    subject: subject.clone(),
                    episode: format!("{kind}:{episode}"),
                    severity: "info",
                    summary: format!("Data plane {subject:?} is connected again"),
                    subject_doc: json!({"kind": "data_plane", "id": subject, "name": subject}),
                    details: json!({"recovers": kind}),
                }
            } else {
                let (account_id, scope) = subject.split_once('/').unwrap_or((subject.as_str(), ""));
                let name = names.get(account_id).copied().unwrap_or("");
                let gone = !names.contains_key(account_id);
                Event {
                    kind: "account.recovered".into(),
                    subject: subject.clone(),
                    episode: format!("{kind}:{episode}"),
                    severity: "info",
                    summary: if gone {
                        format!("Account {account_id} was removed (it was {})", kind_word(kind))
                    } else {
                        format!("Account {name:?} is no longer {}", kind_word(kind))
                    },
                    subject_doc: json!({"kind": "account", "id": account_id, "name": name, "scope": scope}),
                    details: json!({"recovers": kind, "removed": gone}),
                }
            };
            self.enqueue(&e, EpisodeChange::Close { kind: kind.clone() }, now)
                .await?;
        }

        self.observe_budgets(values, now).await
    }

    /// Keys' and groups' spend against their budgets: one event per threshold and period.
    async fn observe_budgets(&self, values: &BTreeMap<String, String>, now: Millis) -> StoreResult<()> {
        let keys = self.store.list_api_keys().await?;
        let groups = self.store.list_groups().await?;
        let budgeted_keys: Vec<_> = keys
            .iter()
            .filter(|k| k.limits.has_budget() && k.status != KeyStatus::Revoked)
            .collect();
        let budgeted_groups: Vec<_> = groups.iter().filter(|g| g.limits.has_budget()).collect();
        if budgeted_keys.is_empty() && budgeted_groups.is_empty() {
            return Ok(());
        }
        let thresholds = settings::known(BUDGET_THRESHOLDS).percents_in(values);
        let p = current_periods(values, now);
        let totals = self.spend.totals(&p).await?;
        let mut checks: Vec<(&str, &str, &str, u64, u64, u64, u64)> = Vec::new();
        for k in &budgeted_keys {
            let s = totals.of_key(&k.id);
            checks.push((
                "key",
                &k.id,
                &k.name,
                k.limits.daily_budget,
                s.day,
                k.limits.monthly_budget,
                s.month,
            ));
        }
        for g in &budgeted_groups {
            let s = totals.of_group(&g.id, &keys);
            checks.push((
                "group",
                &g.id,
                &g.name,
                g.limits.daily_budget,
                s.day,
                g.limits.monthly_budget,
                s.month,
            ));
        }
        for (kind, id, name, day_budget, day_spent, month_budget, month_spent) in checks {
            for (period, label, budget, spent) in [
                ("daily", p.day.as_str(), day_budget, day_spent),
                ("monthly", p.month.as_str(), month_budget, month_spent),
            ] {
                if budget == 0 {
                    continue;
                }
                // budget in micro-USD, spent in pico-USD.
                let budget_pico = u128::from(budget) * 1_000_000;
                for &t in &thresholds {
                    if u128::from(spent) * 100 < budget_pico * u128::from(t) {
                        continue;
                    }
                    let e = Event {
                        kind: "budget.threshold".into(),
                        subject: format!("{kind}:{id}"),
                        episode: format!("{period}:{label}:{t}"),
                        severity: if t >= 100 { "critical" } else { "warning" },
                        summary: format!(
                            "{} {name:?} has spent {t}% of its {period} budget (${:.2} of ${:.2}, {label})",
                            if kind == "key" { "API key" } else { "Group" },
                            spent as f64 / 1e12,
                            budget as f64 / 1e6
                        ),
                        subject_doc: json!({"kind": if kind == "key" { "api_key" } else { "group" }, "id": id, "name": name}),
                        details: json!({
                            "period": period,
                            "period_label": label,
                            "threshold_percent": t,
                            "budget_usd": budget as f64 / 1e6,
                            "spent_usd": spent as f64 / 1e12,
                        }),
                    };
                    self.enqueue(&e, EpisodeChange::None, now).await?;
                }
            }
        }
        Ok(())
    }

    /// Sends what is due (with no webhook configured, only ages out what is too old).
    async fn deliver_due(&self, hook: Option<&Webhook>) -> StoreResult<()> {
        let now = crate::model::now_ms();
        for n in self.store.notify_due(now, BATCH).await? {
            if now.saturating_sub(n.created_ms) > MAX_AGE_MS {
                let outcome = DeliveryOutcome::Failed {
                    error: "not delivered within 24 hours".into(),
                };
                self.store.notify_mark(&n.dedup_key, &outcome, now).await?;
                metrics::counter!(m::NOTIFY_DELIVERIES_TOTAL, "outcome" => "failed").increment(1);
                continue;
            }
            let Some(hook) = hook else { continue };
            let doc: Value = serde_json::from_str(&n.payload).unwrap_or(Value::Null);
            let result = send(&self.upstreams, hook, &doc).await;
            let now = crate::model::now_ms();
            let outcome = match result {
                Ok(status) if (200..300).contains(&status) => DeliveryOutcome::Sent,
                other => {
                    let error = match other {
                        Ok(status) => format!("the receiver answered HTTP {status}"),
                        Err(e) => e,
                    };
                    let attempt = n.attempts + 1;
                    if attempt >= MAX_ATTEMPTS {
                        DeliveryOutcome::Failed { error }
                    } else {
                        let delay = backoff(attempt, rand::random::<f64>());
                        DeliveryOutcome::Retry {
                            next_attempt_ms: now + delay.as_millis() as i64,
                            error,
                        }
                    }
                }
            };
            let label = match &outcome {
                DeliveryOutcome::Sent => "sent",
                DeliveryOutcome::Retry { .. } => "retry",
                DeliveryOutcome::Failed { .. } => "failed",
            };
            match &outcome {
                DeliveryOutcome::Sent => tracing::info!(kind = %n.kind, subject = %n.subject, "notification sent"),
                DeliveryOutcome::Retry { error, .. } => {
                    tracing::warn!(kind = %n.kind, subject = %n.subject, attempt = n.attempts + 1, %error, "notification not delivered; retrying")
                }
                DeliveryOutcome::Failed { error } => {
                    tracing::warn!(kind = %n.kind, subject = %n.subject, attempts = n.attempts + 1, %error, "notification not delivered; giving up")
                }
            }
            metrics::counter!(m::NOTIFY_DELIVERIES_TOTAL, "outcome" => label).increment(1);
            self.store.notify_mark(&n.dedup_key, &outcome, now).await?;
        }
        Ok(())
    }
}

/// Aborts the gauge task when the job stops (leadership lost, shutdown).
struct GaugeTask(tokio::task::JoinHandle<()>);

impl Drop for GaugeTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `ACCOUNT_ID` or `ACCOUNT_ID/SCOPE`.
fn account_subject(account_id: &str, scope: &str) -> String {
    if scope.is_empty() {
        account_id.to_string()
    } else {
        format!("{account_id}/{scope}")
    }
}

fn kind_word(kind: &str) -> &str {
    match kind {
        "account.refresh_failed" => "failing its OAuth refresh",
        "account.rate_limited" => "rate limited",
        k => k.strip_prefix("account.").unwrap_or(k),
    }
}

/// When a data plane that is not live stopped being so: its recorded disconnect, or (its replica
/// died without recording one) its last heartbeat plus the staleness allowance.
fn not_live_since(p: &ProxyState) -> Millis {
    if p.connected {
        p.last_seen.saturating_add(PROXY_STALE_AFTER_MS)
    } else {
        p.last_seen
    }
}

/// POSTs one event; Ok(HTTP status) or Err(a class of failure that never holds the URL).
pub async fn send(upstreams: &Upstreams, hook: &Webhook, doc: &Value) -> Result<u16, String> {
    let body = render(doc, hook.slack);
    let uri: http::Uri = hook
        .url
        .parse()
        .map_err(|_| "notify.webhook_url is not a URL".to_string())?;
    let kind = doc.get("type").and_then(Value::as_str).unwrap_or("");
    let id = doc.get("id").and_then(Value::as_str).unwrap_or("");
    let mut req = http::Request::builder()
        .method(http::Method::POST)
        .uri(uri)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::USER_AGENT, concat!("relay/", env!("CARGO_PKG_VERSION")))
        .header("x-relay-event", kind)
        .header("x-relay-delivery", id)
        .header("idempotency-key", id);
    if let Some(secret) = &hook.secret {
        req = req.header(
            "x-relay-signature",
            signature(secret, chrono::Utc::now().timestamp(), &body),
        );
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|_| "cannot build the request".to_string())?;
    let call = async {
        let resp = upstreams.request(None, req).await.map_err(|e| {
            if e.is_connect() {
                "cannot connect to the receiver"
            } else {
                "the request failed"
            }
            .to_string()
        })?;
        Ok::<u16, String>(resp.status().as_u16())
    };
    match tokio::time::timeout(DELIVERY_TIMEOUT, call).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} s", DELIVERY_TIMEOUT.as_secs())),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_bind_time_and_body() {
        let body = br#"{"type":"account.unauthorized"}"#;
        let h = signature("whsec_test", 1_700_000_000, body);
        assert!(h.starts_with("t=1700000000,v1="), "{h}");
        assert_eq!(h.len(), "t=1700000000,v1=".len() + 64);
        assert!(verify("whsec_test", &h, body));
        assert!(!verify("whsec_other", &h, body));
        assert!(!verify("whsec_test", &h, b"{}"));
        let moved = h.replace("t=1700000000", "t=1700000001");
        assert!(!verify("whsec_test", &moved, body));
        // A known vector: HMAC-SHA256(key "k", "1.b").
        let mut mac = Hmac::<Sha256>::new_from_slice(b"k").unwrap();
        mac.update(b"1.b");
        let hex = crate::crypto::hex(&mac.finalize().into_bytes());
        assert_eq!(signature("k", 1, b"b"), format!("t=1,v1={hex}"));
    }

    #[test]
    fn backoff_doubles_is_capped_and_jittered_within_half() {
        assert_eq!(backoff(1, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(2, 1.0), Duration::from_secs(2));
        assert_eq!(backoff(4, 1.0), Duration::from_secs(8));
        assert_eq!(backoff(1, 0.0), Duration::from_millis(500));
        assert_eq!(backoff(30, 1.0), BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX, 0.0), BACKOFF_MAX / 2);
        for a in 1..15 {
            let d = backoff(a, 0.37);
            assert!(d <= backoff(a, 1.0) && d >= backoff(a, 0.0));
        }
    }

    #[test]
    fn slack_bodies_have_text_and_blocks() {
        let e = Event {
            kind: "account.unauthorized".into(),
            subject: "acc_1".into(),
            episode: "1".into(),
            severity: "critical",
            summary: "Account \"main\" is unauthorized: 401".into(),
            subject_doc: json!({"kind": "account", "id": "acc_1", "name": "main"}),
            details: json!({}),
        };
        let doc = e.document(1_700_000_000_000);
        assert_eq!(doc["id"], event_id("account.unauthorized/acc_1/1"));
        let v: Value = serde_json::from_slice(&render(&doc, true)).unwrap();
        assert!(v["text"].as_str().unwrap().contains("is unauthorized"));
        assert_eq!(v["blocks"][0]["type"], "section");
        assert_eq!(v["blocks"][0]["text"]["type"], "mrkdwn");
        let g: Value = serde_json::from_slice(&render(&doc, false)).unwrap();
        assert_eq!(g, doc);
    }

    #[test]
    fn sealed_settings_open_only_with_their_key_and_name() {
        let key = MasterKey::generate();
        let s = seal_setting(&key, WEBHOOK_URL, "https://hooks.example/T/B/X").unwrap();
        assert!(!s.contains("hooks.example"));
        assert_eq!(
            open_setting(&key, WEBHOOK_URL, &s).as_deref(),
            Some("https://hooks.example/T/B/X")
        );
        assert_eq!(open_setting(&key, SIGNING_SECRET, &s), None);
        assert_eq!(open_setting(&MasterKey::generate(), WEBHOOK_URL, &s), None);
    }
}
