//! The published config in its wire form: the complete config at one head as data planes receive
//! it (credentials opened, every list in canonical order, its content hash), the heads published
//! before with what changed from each to the next, and the update (delta or snapshot) that takes a
//! data plane from what it holds to the head.
//!
//! Deltas are derived from the published configs themselves ([`relay_proto::changed`]: what
//! differs between two consecutive heads), the same content the hash covers, so a delta and the
//! hash cannot disagree whatever a write touched (cascades, restores). A delta is offered only from
//! a version this publisher published, and only when the data plane's content hash matches it;
//! anything else gets a full snapshot. `crate::config` decides when a new head is built; this
//! module is what it is built into (the wire types stay in `api/`, see docs/architecture.md).

use super::convert::{
    account_kind_to_pb, account_state_to_pb, group_state_to_pb, key_status_to_pb, limits_to_pb, price_to_pb, version_pb,
};
use crate::crypto::MasterKey;
use crate::model::{self, ConfigState, Version};
use crate::store::{DynStore, StoreError};
use relay_proto::patch::StatesHasher;
use relay_proto::v1 as pb;
use relay_proto::ResourceKey;
use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

/// How many earlier heads the publisher can send deltas from. A data plane
/// further behind (or on a version this replica never published) gets a full
/// snapshot.
pub const MAX_POINTS: usize = 1024;
/// The most resource changes kept across those heads.
pub const MAX_CHANGES: usize = 200_000;

/// An account's credential (or sealed proxy URL) did not open under the master key.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the credential of account {0}: wrong master key?")]
pub struct CredentialError(pub String);

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
    pub(crate) hasher: StatesHasher,
    /// Every account's secrets as opened for this head, by the sealed bytes: the next full build
    /// opens only what was sealed anew.
    pub(crate) opened: Arc<Opened>,
}

/// Accounts' opened credentials and proxy URLs by account id, each with the sealed bytes it was
/// opened from (opening is a function of those bytes and the account id, so equal bytes open to
/// the same secret).
#[derive(Default)]
pub struct Opened(std::collections::HashMap<String, OpenedAccount>);

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
    pub fn first(snapshot: Snapshot) -> Self {
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
    pub fn then(&self, next: Snapshot) -> Self {
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

/// The complete config at `state`'s version: built (opening only the secrets `before` does not
/// hold for the same sealed bytes), hashed, with the admin tokens read with it.
pub fn snapshot(
    state: &ConfigState,
    tokens: &[model::AdminToken],
    key: &MasterKey,
    before: &Opened,
) -> Result<Snapshot, CredentialError> {
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

/// Turns the stored config into what data planes receive: credentials opened,
/// group names resolved to ids, every list in canonical (id) order.
pub fn build_resources(state: &ConfigState, key: &MasterKey) -> Result<pb::Resources, CredentialError> {
    build_with(state, key, &Opened::default()).map(|(r, _)| r)
}

/// [`build_resources`], opening only the secrets `before` does not hold for the same sealed bytes;
/// returns what is opened now too.
fn build_with(
    state: &ConfigState,
    key: &MasterKey,
    before: &Opened,
) -> Result<(pb::Resources, Opened), CredentialError> {
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
        capture_rules: state
            .capture_rules
            .iter()
            .map(crate::api::convert::capture_rule_to_pb)
            .collect(),
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
fn open_secrets(a: &model::Account, key: &MasterKey) -> Result<(String, String), CredentialError> {
    let credential = key
        .open(&a.credential_enc, &a.id)
        .map_err(|_| CredentialError(a.name.clone()))?;
    let proxy_url = match &a.proxy_url_enc {
        Some(sealed) => key
            .open(sealed, &crate::api::admin::proxy_seal_context(&a.id))
            .map_err(|_| CredentialError(a.name.clone()))?,
        None => a.proxy_url.clone(),
    };
    Ok((credential, proxy_url))
}

/// An account as data planes receive it: credential and proxy URL opened.
pub fn account_to_pb(a: &model::Account, key: &MasterKey) -> Result<pb::Account, CredentialError> {
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

/// `current` with the account states at `head`, the caller having checked that only states
/// changed since (`crate::config`); `None` when the store moved on while the states were read.
pub async fn patch_states(
    store: &DynStore,
    current: &Published,
    head: Version,
) -> Result<Option<Published>, StoreError> {
    let prev = &current.snapshot;
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
