//! The config publisher: follows the store's head and keeps, in memory, the
//! complete config at head (as the data planes receive it, credentials opened)
//! plus a window of the config log, so every Watch stream builds its snapshot
//! or delta without touching the database.
//!
//! It wakes on the store's change hint (own commits; `NOTIFY` from other
//! replicas) and on a poll, so a lost notification costs at most one poll
//! interval. It publishes through a `watch` channel: a burst of writes is seen
//! by streams as the latest head only (coalescing).

use crate::crypto::MasterKey;
use crate::model::{self, ConfigState, LogEntry, ResourceKind, Version};
use crate::store::{DynStore, StoreError};
use relay_proto::v1 as pb;
use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How many revisions of the config log the publisher keeps for deltas. A data
/// plane further behind gets a full snapshot.
pub const LOG_WINDOW: u64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot open the credential of account {0}: wrong master key?")]
    Credential(String),
}

/// The complete config at one version, ready to send.
#[derive(Debug)]
pub struct Snapshot {
    pub version: Version,
    pub resources: pb::Resources,
    pub hash: String,
}

/// What the publisher shares with the Watch streams.
#[derive(Debug)]
pub struct Published {
    pub snapshot: Arc<Snapshot>,
    /// Log entries for revisions in `(log_floor, snapshot.version.revision]`.
    log: Arc<VecDeque<LogEntry>>,
    log_floor: u64,
}

/// What a Watch stream sends next.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    Full(pb::Resources),
    Delta {
        base: Version,
        resources: pb::Resources,
        removed: Vec<pb::ResourceRef>,
    },
}

impl Published {
    /// The update that takes a data plane holding `held` to this head: a delta
    /// when the log covers the gap within the same epoch, else a full snapshot.
    pub fn update_from(&self, held: Option<Version>) -> Update {
        let head = self.snapshot.version;
        let Some(held) = held else {
            return Update::Full(self.snapshot.resources.clone());
        };
        if held.epoch != head.epoch || held.revision > head.revision || held.revision < self.log_floor {
            return Update::Full(self.snapshot.resources.clone());
        }
        let mut refs: BTreeSet<(&str, &str)> = BTreeSet::new();
        for e in self.log.iter().filter(|e| e.revision > held.revision) {
            refs.insert((e.kind.as_str(), e.id.as_str()));
        }
        let all = &self.snapshot.resources;
        let mut resources = pb::Resources::default();
        let mut removed = Vec::new();
        let mut settings_changed = false;
        for (kind, id) in refs {
            let kind: ResourceKind = match kind.parse() {
                Ok(k) => k,
                Err(_) => continue,
            };
            let (pb_kind, present) = match kind {
                ResourceKind::ApiKey => (
                    pb::ResourceKind::ApiKey,
                    push_by_id(&all.api_keys, id, &mut resources.api_keys, |k| &k.id),
                ),
                ResourceKind::Account => (
                    pb::ResourceKind::Account,
                    push_by_id(&all.accounts, id, &mut resources.accounts, |a| &a.id),
                ),
                ResourceKind::Group => (
                    pb::ResourceKind::Group,
                    push_by_id(&all.groups, id, &mut resources.groups, |g| &g.id),
                ),
                ResourceKind::Price => (
                    pb::ResourceKind::Price,
                    push_by_id(&all.prices, id, &mut resources.prices, |p| &p.id),
                ),
                ResourceKind::Settings => {
                    settings_changed = true;
                    continue;
                }
                ResourceKind::AccountState => {
                    let found = all
                        .account_states
                        .iter()
                        .find(|st| relay_proto::account_state_id(st) == id);
                    if let Some(st) = found {
                        resources.account_states.push(st.clone());
                    }
                    (pb::ResourceKind::AccountState, found.is_some())
                }
                // Not part of what data planes receive.
                ResourceKind::AdminToken => continue,
            };
            if !present {
                removed.push(pb::ResourceRef {
                    kind: pb_kind as i32,
                    id: id.to_string(),
                });
            }
        }
        if settings_changed {
            resources.settings = all.settings.clone();
        }
        Update::Delta {
            base: held,
            resources,
            removed,
        }
    }
}

fn push_by_id<T: Clone>(all: &[T], id: &str, out: &mut Vec<T>, key: impl Fn(&T) -> &String) -> bool {
    match all.binary_search_by(|x| key(x).as_str().cmp(id)) {
        Ok(i) => {
            out.push(all[i].clone());
            true
        }
        Err(_) => false,
    }
}

/// Turns the stored config into what data planes receive: credentials opened,
/// group names resolved to ids, every list in canonical (id) order.
pub fn build_resources(state: &ConfigState, key: &MasterKey) -> Result<pb::Resources, ConfigError> {
    let mut r = pb::Resources {
        api_keys: state.api_keys.iter().map(api_key_to_pb).collect(),
        accounts: Vec::with_capacity(state.accounts.len()),
        groups: state
            .groups
            .iter()
            .map(|g| pb::Group {
                id: g.id.clone(),
                name: g.name.clone(),
                description: g.description.clone(),
            })
            .collect(),
        prices: state.prices.iter().map(price_to_pb).collect(),
        settings: Some(pb::Settings {
            api_key_hash_secret: key.api_key_hash_secret().to_vec(),
            values: state.settings.clone(),
        }),
        account_states: state.account_states.iter().map(account_state_to_pb).collect(),
    };
    for a in &state.accounts {
        let credential = key
            .open(&a.credential_enc, &a.id)
            .map_err(|_| ConfigError::Credential(a.name.clone()))?;
        let proxy_url = match &a.proxy_url_enc {
            Some(sealed) => key
                .open(sealed, &crate::api::admin::proxy_seal_context(&a.id))
                .map_err(|_| ConfigError::Credential(a.name.clone()))?,
            None => a.proxy_url.clone(),
        };
        r.accounts.push(pb::Account {
            id: a.id.clone(),
            name: a.name.clone(),
            kind: account_kind_to_pb(a.kind) as i32,
            base_url: a.base_url.clone(),
            credential,
            priority: a.priority,
            weight: a.weight,
            group_ids: a.group_ids.clone(),
            max_concurrency: a.max_concurrency,
            status: match a.status {
                model::AccountStatus::Enabled => pb::AccountStatus::Enabled,
                model::AccountStatus::Disabled => pb::AccountStatus::Disabled,
            } as i32,
            proxy_url,
            credential_expires_at_ms: a.credential_expires_at.unwrap_or(0),
        });
    }
    relay_proto::canonicalize(&mut r);
    Ok(r)
}

pub fn health_to_pb(h: model::AccountHealth) -> pb::AccountHealth {
    match h {
        model::AccountHealth::RateLimited => pb::AccountHealth::RateLimited,
        model::AccountHealth::Overloaded => pb::AccountHealth::Overloaded,
        model::AccountHealth::Erroring => pb::AccountHealth::Erroring,
        model::AccountHealth::Unauthorized => pb::AccountHealth::Unauthorized,
        model::AccountHealth::Blocked => pb::AccountHealth::Blocked,
    }
}

pub fn health_from_pb(h: i32) -> Option<model::AccountHealth> {
    match pb::AccountHealth::try_from(h).ok()? {
        pb::AccountHealth::RateLimited => Some(model::AccountHealth::RateLimited),
        pb::AccountHealth::Overloaded => Some(model::AccountHealth::Overloaded),
        pb::AccountHealth::Erroring => Some(model::AccountHealth::Erroring),
        pb::AccountHealth::Unauthorized => Some(model::AccountHealth::Unauthorized),
        pb::AccountHealth::Blocked => Some(model::AccountHealth::Blocked),
        pb::AccountHealth::Unspecified => None,
    }
}

pub fn account_state_to_pb(s: &model::AccountState) -> pb::AccountState {
    pb::AccountState {
        account_id: s.account_id.clone(),
        health: health_to_pb(s.health) as i32,
        reason: s.reason.clone(),
        until_ms: s.until,
        scope: s.scope.clone(),
        since_ms: s.since,
        reported_by: s.reported_by.clone(),
    }
}

pub fn account_kind_to_pb(k: model::AccountKind) -> pb::AccountKind {
    match k {
        model::AccountKind::AnthropicApiKey => pb::AccountKind::AnthropicApiKey,
        model::AccountKind::ClaudeOauth => pb::AccountKind::ClaudeOauth,
        model::AccountKind::AnthropicCompatible => pb::AccountKind::AnthropicCompatible,
    }
}

pub fn key_status_to_pb(s: model::KeyStatus) -> pb::KeyStatus {
    match s {
        model::KeyStatus::Active => pb::KeyStatus::Active,
        model::KeyStatus::Disabled => pb::KeyStatus::Disabled,
        model::KeyStatus::Revoked => pb::KeyStatus::Revoked,
    }
}

pub fn limits_to_pb(l: &model::KeyLimits) -> pb::KeyLimits {
    pb::KeyLimits {
        requests_per_minute: u32::try_from(l.rpm).unwrap_or(u32::MAX),
        tokens_per_minute: l.tpm,
        max_concurrency: u32::try_from(l.max_concurrency).unwrap_or(u32::MAX),
        daily_budget_micro_usd: l.daily_budget,
        monthly_budget_micro_usd: l.monthly_budget,
    }
}

fn api_key_to_pb(k: &model::ApiKey) -> pb::ApiKey {
    pb::ApiKey {
        id: k.id.clone(),
        name: k.name.clone(),
        key_hash: k.key_hash.clone(),
        key_prefix: k.key_prefix.clone(),
        status: key_status_to_pb(k.status) as i32,
        expires_at_ms: k.expires_at.unwrap_or(0),
        group_id: k.group_id.clone(),
        allowed_models: k.allowed_models.clone(),
        limits: Some(limits_to_pb(&k.limits)),
    }
}

pub fn price_to_pb(p: &model::Price) -> pb::Price {
    pb::Price {
        id: p.id.clone(),
        model_pattern: p.model_pattern.clone(),
        effective_from_ms: p.effective_from,
        input: p.input,
        output: p.output,
        cache_write_5m: p.cache_write_5m,
        cache_write_1h: p.cache_write_1h,
        cache_read: p.cache_read,
        source: p.source.clone(),
    }
}

/// Follows the store and publishes the head. Holds the receiver side for
/// Watch streams; the task stops when every handle is dropped.
pub struct ConfigPublisher {
    rx: watch::Receiver<Arc<Published>>,
}

impl ConfigPublisher {
    /// Loads the head once (so the first Watch stream has something to send)
    /// and starts following.
    pub async fn start(store: DynStore, key: MasterKey, poll: Duration) -> Result<Self, ConfigError> {
        let state = store.load_config().await?;
        let head = state.version.revision;
        let floor = head.saturating_sub(LOG_WINDOW);
        let log: VecDeque<LogEntry> = store.log_since(floor, head).await?.into();
        let first = Arc::new(publish(&state, &key, log, floor)?);
        let (tx, rx) = watch::channel(first);
        tokio::spawn(follow(store, key, poll, tx));
        Ok(Self { rx })
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Published>> {
        self.rx.clone()
    }

    pub fn current(&self) -> Arc<Published> {
        self.rx.borrow().clone()
    }
}

fn publish(
    state: &ConfigState,
    key: &MasterKey,
    log: VecDeque<LogEntry>,
    floor: u64,
) -> Result<Published, ConfigError> {
    let resources = build_resources(state, key)?;
    let hash = relay_proto::config_hash(&resources);
    metrics::gauge!("relay_config_head_revision").set(state.version.revision as f64);
    Ok(Published {
        snapshot: Arc::new(Snapshot {
            version: state.version,
            resources,
            hash,
        }),
        log: Arc::new(log),
        log_floor: floor,
    })
}

async fn follow(store: DynStore, key: MasterKey, poll: Duration, tx: watch::Sender<Arc<Published>>) {
    let hint = store.change_hint();
    loop {
        tokio::select! {
            _ = hint.notified() => {}
            _ = tokio::time::sleep(poll) => {}
            _ = tx.closed() => return,
        }
        let current = tx.borrow().clone();
        match refresh(&store, &key, &current).await {
            Ok(Some(next)) => {
                tracing::debug!(version = %next.snapshot.version, "config head moved");
                tx.send_replace(Arc::new(next));
            }
            Ok(None) => {}
            Err(e) => {
                metrics::counter!("relay_config_refresh_errors_total").increment(1);
                tracing::warn!(error = %e, "cannot refresh config from the store; serving the last head");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

async fn refresh(store: &DynStore, key: &MasterKey, current: &Published) -> Result<Option<Published>, ConfigError> {
    let head = store.head().await?;
    let have = current.snapshot.version;
    if head == have {
        return Ok(None);
    }
    let state = store.load_config().await?;
    let new_head = state.version.revision;
    let (mut log, mut floor) = if state.version.epoch == have.epoch && new_head >= have.revision {
        let mut log = (*current.log).clone();
        log.extend(store.log_since(have.revision, new_head).await?);
        (log, current.log_floor)
    } else {
        let floor = new_head.saturating_sub(LOG_WINDOW);
        (store.log_since(floor, new_head).await?.into(), floor)
    };
    let min_floor = new_head.saturating_sub(LOG_WINDOW);
    while log.front().is_some_and(|e| e.revision <= min_floor) {
        log.pop_front();
    }
    floor = floor.max(min_floor);
    Ok(Some(publish(&state, key, log, floor)?))
}
