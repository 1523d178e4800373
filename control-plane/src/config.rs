//! The config publisher: follows the store's head and keeps, in memory, the
//! complete config at head (as the data planes receive it, credentials opened)
//! plus the changes between the heads it published before, so every Watch
//! stream builds its snapshot or delta without touching the database.
//!
//! Deltas are derived from the published configs themselves
//! ([`relay_proto::changed`]: what differs between two consecutive heads), the
//! same content the hash covers, so a delta and the hash cannot disagree
//! whatever a write touched (cascades, restores). A delta is offered only from
//! a version this publisher published, and only when the data plane's content
//! hash matches it; anything else gets a full snapshot.
//!
//! It wakes on the store's change hint (own commits; `NOTIFY` from other
//! replicas) and on a poll, so a lost notification costs at most one poll
//! interval. It publishes through a `watch` channel: a burst of writes is seen
//! by streams as the latest head only (coalescing). When the store's head moves
//! backwards within an epoch (a database restored from a backup), it starts a
//! new epoch, so every data plane takes a full snapshot.
//!
//! A head reached only by account-state writes (a data plane's report, a failed OAuth refresh:
//! the audit actions in [`STATE_ONLY_ACTIONS`], written through [`apply_state_write`], which
//! refuses anything else) is published by patching the last snapshot: its account states are
//! read again, the rest is kept, and the hash is finished from the kept hasher state
//! ([`relay_proto::patch::StatesHasher`]); no credential is opened. Every other write (accounts,
//! keys, groups, prices, settings, tokens) goes through the full build, which opens only the
//! credentials and proxy URLs sealed anew since the last head (the others are kept by their
//! sealed bytes). Both give the same config (`tests/incremental_config.rs` compares them with a
//! build from scratch on both stores).

use crate::crypto::MasterKey;
use crate::model::{self, AuditRecord, ConfigState, Mutation, Version};
use crate::store::{DynStore, StoreError};
use relay_proto::patch::StatesHasher;
use relay_proto::v1 as pb;
use relay_proto::ResourceKey;
use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How many earlier heads the publisher can send deltas from. A data plane
/// further behind (or on a version this replica never published) gets a full
/// snapshot.
pub const MAX_POINTS: usize = 1024;
/// The most resource changes kept across those heads.
pub const MAX_CHANGES: usize = 200_000;

/// The audit action of a data plane's account-state report.
pub const ACTION_ACCOUNT_STATE: &str = "account.state";
/// The audit action of "unauthorized" set after an OAuth refresh the token endpoint refused.
pub const ACTION_OAUTH_REFRESH_FAILED: &str = "account.oauth_refresh_failed";
/// Audit actions of writes that change account states and nothing else: the publisher patches
/// its last snapshot when every revision since it carries one of these. Written only through
/// [`apply_state_write`].
pub const STATE_ONLY_ACTIONS: &[&str] = &[ACTION_ACCOUNT_STATE, ACTION_OAUTH_REFRESH_FAILED];

/// The most revisions one patch covers; a publisher further behind builds in full.
const MAX_PATCH_REVISIONS: u64 = 1024;

/// Applies a write that changes account states only (sets and clears, with their guards),
/// audited with one of [`STATE_ONLY_ACTIONS`]. Anything else is refused (`StoreError::Invalid`)
/// before it reaches the store: the publisher trusts these actions to mean "states only".
pub async fn apply_state_write(
    store: &DynStore,
    mutations: Vec<Mutation>,
    audit: AuditRecord,
) -> Result<Version, StoreError> {
    let states_only = mutations.iter().all(|m| {
        matches!(
            m,
            Mutation::SetAccountState(_)
                | Mutation::ClearAccountState { .. }
                | Mutation::RequireResetGeneration { .. }
                | Mutation::CheckTerm { .. }
        )
    });
    if !STATE_ONLY_ACTIONS.contains(&audit.action.as_str()) || !states_only {
        return Err(StoreError::Invalid(format!(
            "a state-only write ({}) may change account states only",
            audit.action
        )));
    }
    store.apply(mutations, audit).await
}

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
    /// Every admin token's role by keyed hash, read with this head: a stream
    /// sends this config only to a token still valid here (a revocation moves
    /// the head, so it is seen before anything newer goes out).
    pub tokens: Arc<std::collections::HashMap<String, model::Role>>,
    /// The hash state after everything but the account states: a patch finishes it.
    hasher: StatesHasher,
    /// Every account's secrets as opened for this head, by the sealed bytes: the next full build
    /// opens only what was sealed anew.
    opened: Arc<Opened>,
}

/// Accounts' opened credentials and proxy URLs by account id, each with the sealed bytes it was
/// opened from (opening is a function of those bytes and the account id, so equal bytes open to
/// the same secret).
#[derive(Default)]
struct Opened(std::collections::HashMap<String, OpenedAccount>);

struct OpenedAccount {
    credential_enc: Vec<u8>,
    proxy_url_enc: Option<Vec<u8>>,
    credential: String,
    proxy_url: String,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Opened({} accounts)", self.0.len())
    }
}

/// An earlier head: its version and content hash, and what changed from it
/// to the next published head.
#[derive(Debug, Clone)]
struct Point {
    version: Version,
    hash: String,
    to_next: Arc<BTreeSet<ResourceKey>>,
}

/// What the publisher shares with the Watch streams.
#[derive(Debug)]
pub struct Published {
    pub snapshot: Arc<Snapshot>,
    /// Earlier heads, oldest first; the last one's `to_next` leads to `snapshot`.
    points: Arc<VecDeque<Point>>,
}

impl Published {
    fn first(snapshot: Snapshot) -> Self {
        Self {
            snapshot: Arc::new(snapshot),
            points: Arc::new(VecDeque::new()),
        }
    }

    /// Whether `next` continues this head's history (same epoch, later revision).
    fn continued_by(&self, next: Version) -> bool {
        let prev = self.snapshot.version;
        prev.epoch == next.epoch && prev.revision < next.revision
    }

    /// The head that follows this one: `next` with the changes from here to it.
    fn then(&self, next: Snapshot) -> Self {
        let to_next = if self.continued_by(next.version) {
            relay_proto::changed(&self.snapshot.resources, &next.resources)
        } else {
            BTreeSet::new()
        };
        self.then_with(next, to_next)
    }

    /// The head that follows this one: `next`, which differs from it by `to_next` exactly.
    fn then_with(&self, next: Snapshot, to_next: BTreeSet<ResourceKey>) -> Self {
        let prev = &self.snapshot;
        let same_history = self.continued_by(next.version);
        let mut points = if same_history {
            (*self.points).clone()
        } else {
            VecDeque::new()
        };
        if same_history {
            points.push_back(Point {
                version: prev.version,
                hash: prev.hash.clone(),
                to_next: Arc::new(to_next),
            });
        }
        let mut total: usize = points.iter().map(|p| p.to_next.len()).sum();
        while points.len() > MAX_POINTS || total > MAX_CHANGES {
            match points.pop_front() {
                Some(p) => total -= p.to_next.len(),
                None => break,
            }
        }
        Self {
            snapshot: Arc::new(next),
            points: Arc::new(points),
        }
    }

    /// Whether this publisher knows `version` with content `hash` (empty: any).
    pub fn knows(&self, version: Version, hash: &str) -> bool {
        let same = |v: Version, h: &str| v == version && (hash.is_empty() || h == hash);
        same(self.snapshot.version, &self.snapshot.hash) || self.points.iter().any(|p| same(p.version, &p.hash))
    }

    /// The update that takes a data plane holding `held` (with content hash
    /// `held_hash`; empty = not known) to this head, with a fresh nonce: a delta
    /// when `held` is this head or one this publisher published before with
    /// that content, else a full snapshot.
    pub fn update_for(&self, held: Option<Version>, held_hash: &str) -> pb::ConfigUpdate {
        let head = &self.snapshot;
        let mut u = pb::ConfigUpdate {
            nonce: uuid::Uuid::new_v4().simple().to_string(),
            version: Some(version_pb(head.version)),
            content_hash: head.hash.clone(),
            ..Default::default()
        };
        match self.delta_from(held, held_hash) {
            Some((base, resources, removed)) => {
                u.base = Some(version_pb(base));
                u.resources = Some(resources);
                u.removed = removed;
            }
            None => {
                u.full = true;
                u.resources = Some(head.resources.clone());
            }
        }
        u
    }

    /// The delta from `held` to this head, if this publisher knows `held`'s content.
    fn delta_from(
        &self,
        held: Option<Version>,
        held_hash: &str,
    ) -> Option<(Version, pb::Resources, Vec<pb::ResourceRef>)> {
        let head = &self.snapshot;
        let held = held?;
        let matches = |hash: &str| held_hash.is_empty() || held_hash == hash;
        if held == head.version {
            return matches(&head.hash).then(|| (held, pb::Resources::default(), Vec::new()));
        }
        let start = self.points.iter().position(|p| p.version == held)?;
        if !matches(&self.points[start].hash) {
            return None;
        }
        let mut keys: BTreeSet<&ResourceKey> = BTreeSet::new();
        for p in self.points.iter().skip(start) {
            keys.extend(p.to_next.iter());
        }
        let (resources, removed) = relay_proto::delta(&head.resources, keys);
        Some((held, resources, removed))
    }
}

/// Turns the stored config into what data planes receive: credentials opened,
/// group names resolved to ids, every list in canonical (id) order.
pub fn build_resources(state: &ConfigState, key: &MasterKey) -> Result<pb::Resources, ConfigError> {
    build_with(state, key, &Opened::default()).map(|(r, _)| r)
}

/// [`build_resources`], opening only the secrets `before` does not hold for the same sealed bytes;
/// returns what is opened now too.
fn build_with(state: &ConfigState, key: &MasterKey, before: &Opened) -> Result<(pb::Resources, Opened), ConfigError> {
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
                // Absent when unlimited, as before groups had limits (same config hash).
                limits: (g.limits != model::KeyLimits::default()).then(|| limits_to_pb(&g.limits)),
                // Empty and active (both the proto default) unless set: the same hash as before.
                fallback_ids: g.fallback_ids.clone(),
                state: group_state_to_pb(g.state) as i32,
            })
            .collect(),
        prices: state.prices.iter().map(price_to_pb).collect(),
        settings: Some(pb::Settings {
            api_key_hash_secret: key.api_key_hash_secret().to_vec(),
            // Control-plane-only settings (the webhook URL and its signing secret among them) stay here.
            values: state
                .settings
                .iter()
                .filter(|(name, _)| !relay_proto::settings::is_control_plane_only(name))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }),
        account_states: state.account_states.iter().map(account_state_to_pb).collect(),
    };
    let mut opened = Opened(std::collections::HashMap::with_capacity(state.accounts.len()));
    for a in &state.accounts {
        let kept = before
            .0
            .get(&a.id)
            .filter(|o| o.credential_enc == a.credential_enc && o.proxy_url_enc == a.proxy_url_enc);
        let (credential, proxy_url) = match kept {
            Some(o) => (o.credential.clone(), o.proxy_url.clone()),
            None => open_secrets(a, key)?,
        };
        opened.0.insert(
            a.id.clone(),
            OpenedAccount {
                credential_enc: a.credential_enc.clone(),
                proxy_url_enc: a.proxy_url_enc.clone(),
                credential: credential.clone(),
                proxy_url: proxy_url.clone(),
            },
        );
        r.accounts.push(account_pb(a, credential, proxy_url));
    }
    relay_proto::canonicalize(&mut r);
    Ok((r, opened))
}

/// An account's credential and proxy URL, opened.
fn open_secrets(a: &model::Account, key: &MasterKey) -> Result<(String, String), ConfigError> {
    let credential = key
        .open(&a.credential_enc, &a.id)
        .map_err(|_| ConfigError::Credential(a.name.clone()))?;
    let proxy_url = match &a.proxy_url_enc {
        Some(sealed) => key
            .open(sealed, &crate::api::admin::proxy_seal_context(&a.id))
            .map_err(|_| ConfigError::Credential(a.name.clone()))?,
        None => a.proxy_url.clone(),
    };
    Ok((credential, proxy_url))
}

/// An account as data planes receive it: credential and proxy URL opened.
pub fn account_to_pb(a: &model::Account, key: &MasterKey) -> Result<pb::Account, ConfigError> {
    let (credential, proxy_url) = open_secrets(a, key)?;
    Ok(account_pb(a, credential, proxy_url))
}

/// An account as data planes receive it, with its secrets opened already.
fn account_pb(a: &model::Account, credential: String, proxy_url: String) -> pb::Account {
    pb::Account {
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
        reset_generation: a.reset_generation,
    }
}

pub fn group_state_to_pb(s: model::GroupState) -> pb::GroupState {
    match s {
        model::GroupState::Active => pb::GroupState::Active,
        model::GroupState::Paused => pb::GroupState::Paused,
        model::GroupState::Activated => pb::GroupState::Activated,
    }
}

pub fn version_pb(v: Version) -> pb::ConfigVersion {
    pb::ConfigVersion::new(v.epoch, v.revision)
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
        reset_generation: 0,
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
        let first = Arc::new(build_full(&store, &key).await?);
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

fn snapshot(
    state: &ConfigState,
    tokens: &[model::AdminToken],
    key: &MasterKey,
    before: &Opened,
) -> Result<Snapshot, ConfigError> {
    // Canonical already: the hasher sees what `config_hash` would.
    let (mut resources, opened) = build_with(state, key, before)?;
    let hasher = StatesHasher::new(&mut resources);
    let hash = hasher.hash_with(&resources.account_states);
    metrics::gauge!(relay_proto::metrics::CONFIG_HEAD_REVISION).set(state.version.revision as f64);
    Ok(Snapshot {
        version: state.version,
        resources,
        hash,
        tokens: Arc::new(tokens.iter().map(|t| (t.token_hash.clone(), t.role)).collect()),
        hasher,
        opened: Arc::new(opened),
    })
}

/// How the publisher reached a new head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Built {
    /// The last snapshot with the account states read again (only states changed since).
    Patched,
    /// Everything loaded again; only credentials and proxy URLs sealed anew are opened.
    Full,
}

/// Builds the complete config at the store's head, from scratch.
pub async fn build_full(store: &DynStore, key: &MasterKey) -> Result<Published, ConfigError> {
    let state = store.load_config().await?;
    let tokens = store.list_admin_tokens().await?;
    Ok(Published::first(snapshot(&state, &tokens, key, &Opened::default())?))
}

/// The head that follows `current` when the store moved: patched when only account states
/// changed since (see the module doc), else built in full. `None` when the head did not move,
/// or moved backwards (then a new epoch is started, and the next call builds it).
pub async fn next_head(
    store: &DynStore,
    key: &MasterKey,
    current: &Published,
) -> Result<Option<(Published, Built)>, ConfigError> {
    let head = store.head().await?;
    let have = current.snapshot.version;
    if head == have {
        return Ok(None);
    }
    if (head.epoch, head.revision) < (have.epoch, have.revision) {
        // The store went back in time under us: restored from a backup.
        rewound(store, head, have).await?;
        return Ok(None);
    }
    if let Some(next) = patch_states(store, current, head).await? {
        return Ok(Some((next, Built::Patched)));
    }
    let state = store.load_config().await?;
    let tokens = store.list_admin_tokens().await?;
    let next = snapshot(&state, &tokens, key, &current.snapshot.opened)?;
    Ok(Some((current.then(next), Built::Full)))
}

/// Whether every write from `have` (exclusive) to `head` (inclusive) changed account states
/// only: exactly one audit entry per revision, each with a [`STATE_ONLY_ACTIONS`] action.
async fn states_only_since(store: &DynStore, have: Version, head: Version) -> Result<bool, StoreError> {
    if head.epoch != have.epoch || head.revision <= have.revision || head.revision - have.revision > MAX_PATCH_REVISIONS
    {
        return Ok(false);
    }
    let wanted = have.revision + 1..=head.revision;
    let judge = |entries: &[model::AuditEntry]| -> Option<bool> {
        let mut seen = BTreeSet::new();
        for e in entries.iter().filter(|e| wanted.contains(&e.revision)) {
            if !STATE_ONLY_ACTIONS.contains(&e.action.as_str()) || !seen.insert(e.revision) {
                return Some(false);
            }
        }
        // Not every revision seen: cannot tell from these entries.
        (seen.len() as u64 == head.revision - have.revision).then_some(true)
    };
    // The newest entries first (the primary key, backwards): later writes may have landed.
    let gap = u32::try_from(head.revision - have.revision).unwrap_or(u32::MAX);
    let newest = store.list_audit(gap.saturating_add(64), None).await?;
    if let Some(answer) = judge(&newest) {
        return Ok(answer);
    }
    let revisions: Vec<u64> = wanted.clone().collect();
    Ok(judge(&store.audit_at_revisions(&revisions).await?).unwrap_or(false))
}

/// `current` with the account states at `head`, when only states changed since; `None` when
/// something else changed, or the store moved on while the states were read.
async fn patch_states(store: &DynStore, current: &Published, head: Version) -> Result<Option<Published>, ConfigError> {
    let prev = &current.snapshot;
    if !states_only_since(store, prev.version, head).await? {
        return Ok(None);
    }
    let stored = store.list_account_states().await?;
    // The states are the head's only if nothing committed since the head was read.
    if store.head().await? != head {
        return Ok(None);
    }
    let mut states: Vec<pb::AccountState> = stored.iter().map(account_state_to_pb).collect();
    states.sort_by(|a, b| (&a.account_id, &a.scope).cmp(&(&b.account_id, &b.scope)));
    let hash = prev.hasher.hash_with(&states);
    let to_next = relay_proto::changed(
        &pb::Resources {
            account_states: prev.resources.account_states.clone(),
            ..Default::default()
        },
        &pb::Resources {
            account_states: states.clone(),
            ..Default::default()
        },
    );
    let mut resources = prev.resources.clone();
    resources.account_states = states;
    metrics::gauge!(relay_proto::metrics::CONFIG_HEAD_REVISION).set(head.revision as f64);
    let next = Snapshot {
        version: head,
        resources,
        hash,
        tokens: prev.tokens.clone(),
        hasher: prev.hasher.clone(),
        opened: prev.opened.clone(),
    };
    Ok(Some(current.then_with(next, to_next)))
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
        match next_head(&store, &key, &current).await {
            Ok(Some((next, built))) => {
                tracing::debug!(version = %next.snapshot.version, ?built, "config head moved");
                tx.send_replace(Arc::new(next));
            }
            Ok(None) => {}
            Err(e) => {
                metrics::counter!(relay_proto::metrics::CONFIG_REFRESH_ERRORS_TOTAL).increment(1);
                tracing::warn!(error = %e, "cannot refresh config from the store; serving the last head");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// History was rewound to `head` while `seen` (a later revision of the same
/// epoch) had been published: start a new epoch, so every data plane gets a
/// full snapshot instead of trusting revisions that now mean something else.
pub async fn rewound(store: &DynStore, head: Version, seen: Version) -> Result<(), StoreError> {
    let reason = format!("history rewound: head {head}, seen {seen}");
    let new = store
        .start_new_epoch(head, seen.epoch.saturating_add(1), &reason)
        .await?;
    if new != head {
        metrics::counter!(relay_proto::metrics::CONFIG_EPOCHS_STARTED_TOTAL).increment(1);
        tracing::warn!(%head, %seen, epoch = new.epoch, "the store's history was rewound (restored from a backup?); started a new epoch: every data plane takes a full snapshot");
    }
    Ok(())
}
