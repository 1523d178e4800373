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

    /// The head that follows this one: `next` with the changes from here to it.
    pub fn then(&self, next: Snapshot) -> Self {
        let prev = &self.snapshot;
        let same_history = prev.version.epoch == next.version.epoch && prev.version.revision < next.version.revision;
        let mut points = if same_history {
            (*self.points).clone()
        } else {
            VecDeque::new()
        };
        if same_history {
            points.push_back(Point {
                version: prev.version,
                hash: prev.hash.clone(),
                to_next: Arc::new(relay_proto::changed(&prev.resources, &next.resources)),
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

/// The complete config at `state`'s version: built, hashed, with the admin tokens read with it.
pub fn snapshot(
    state: &ConfigState,
    tokens: &[model::AdminToken],
    key: &MasterKey,
) -> Result<Snapshot, CredentialError> {
    let resources = build_resources(state, key)?;
    let hash = relay_proto::config_hash(&resources);
    metrics::gauge!(relay_proto::metrics::CONFIG_HEAD_REVISION).set(state.version.revision as f64);
    Ok(Snapshot {
        version: state.version,
        resources,
        hash,
        tokens: Arc::new(tokens.iter().map(|t| (t.token_hash.clone(), t.role)).collect()),
    })
}

/// Turns the stored config into what data planes receive: credentials opened,
/// group names resolved to ids, every list in canonical (id) order.
pub fn build_resources(state: &ConfigState, key: &MasterKey) -> Result<pb::Resources, CredentialError> {
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
    for a in &state.accounts {
        r.accounts.push(account_to_pb(a, key)?);
    }
    relay_proto::canonicalize(&mut r);
    Ok(r)
}

/// An account as data planes receive it: credential and proxy URL opened.
pub fn account_to_pb(a: &model::Account, key: &MasterKey) -> Result<pb::Account, CredentialError> {
    let credential = key
        .open(&a.credential_enc, &a.id)
        .map_err(|_| CredentialError(a.name.clone()))?;
    let proxy_url = match &a.proxy_url_enc {
        Some(sealed) => key
            .open(sealed, &crate::api::admin::proxy_seal_context(&a.id))
            .map_err(|_| CredentialError(a.name.clone()))?,
        None => a.proxy_url.clone(),
    };
    Ok(pb::Account {
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
    })
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
