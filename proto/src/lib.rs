//! relay-proto: the gRPC contract (`relay.v1`) between the control plane, the
//! data planes and `relayctl`, generated at build time without a system `protoc`.
//!
//! It also owns the one definition both sides use to fingerprint a config
//! ([`config_hash`]), so a data plane can prove it applied exactly what the
//! control plane meant.

#[allow(clippy::all, clippy::pedantic, clippy::unwrap_used, clippy::expect_used)]
pub mod v1 {
    tonic::include_proto!("relay.v1");
}

/// The encoded `FileDescriptorSet` of `relay.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/relay_descriptor.bin"));

use prost::Message;
use sha2::{Digest, Sha256};

/// Puts a complete config in canonical order (every list sorted by id).
pub fn canonicalize(resources: &mut v1::Resources) {
    resources.api_keys.sort_by(|a, b| a.id.cmp(&b.id));
    resources.accounts.sort_by(|a, b| a.id.cmp(&b.id));
    for a in &mut resources.accounts {
        a.group_ids.sort();
    }
    resources.groups.sort_by(|a, b| a.id.cmp(&b.id));
    resources.prices.sort_by(|a, b| a.id.cmp(&b.id));
    resources
        .account_states
        .sort_by(|a, b| (&a.account_id, &a.scope).cmp(&(&b.account_id, &b.scope)));
}

/// The resource id of an account state: `<account_id>/<scope>`.
pub fn account_state_id(s: &v1::AccountState) -> String {
    format!("{}/{}", s.account_id, s.scope)
}

/// SHA-256 (lower-case hex) of the canonical protobuf encoding of a complete config.
/// Maps are `BTreeMap`s, so the encoding is deterministic.
pub fn config_hash(resources: &v1::Resources) -> String {
    let mut r = resources.clone();
    canonicalize(&mut r);
    let digest = Sha256::digest(r.encode_to_vec());
    let mut s = String::with_capacity(64);
    for b in digest {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

impl v1::ConfigVersion {
    pub fn new(epoch: u64, revision: u64) -> Self {
        Self { epoch, revision }
    }
}

impl std::fmt::Display for v1::ConfigVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.epoch, self.revision)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApplyError {
    #[error("the update has no version")]
    NoVersion,
    #[error("a delta from {base} cannot apply to the held version {held}")]
    BaseMismatch { base: String, held: String },
    #[error("a delta arrived but no config is held")]
    NothingHeld,
    #[error("content hash mismatch after applying version {0}")]
    HashMismatch(String),
}

/// Applies a `ConfigUpdate` to the config held at `held_version` and returns
/// the complete new config, checking the content hash. The one definition of
/// delta semantics: upsert `resources` by id, then delete `removed`.
pub fn apply_update(
    held: Option<(&v1::ConfigVersion, &v1::Resources)>,
    update: &v1::ConfigUpdate,
) -> Result<v1::Resources, ApplyError> {
    let version = update.version.as_ref().ok_or(ApplyError::NoVersion)?;
    let incoming = update.resources.clone().unwrap_or_default();
    let mut next = if update.full {
        incoming
    } else {
        let (held_version, held) = held.ok_or(ApplyError::NothingHeld)?;
        let base = update.base.as_ref().ok_or(ApplyError::NoVersion)?;
        if base != held_version {
            return Err(ApplyError::BaseMismatch {
                base: base.to_string(),
                held: held_version.to_string(),
            });
        }
        let mut next = held.clone();
        upsert(&mut next.api_keys, incoming.api_keys, |x| x.id.clone());
        upsert(&mut next.accounts, incoming.accounts, |x| x.id.clone());
        upsert(&mut next.groups, incoming.groups, |x| x.id.clone());
        upsert(&mut next.prices, incoming.prices, |x| x.id.clone());
        upsert(&mut next.account_states, incoming.account_states, account_state_id);
        if incoming.settings.is_some() {
            next.settings = incoming.settings;
        }
        for r in &update.removed {
            match v1::ResourceKind::try_from(r.kind) {
                Ok(v1::ResourceKind::ApiKey) => next.api_keys.retain(|x| x.id != r.id),
                Ok(v1::ResourceKind::Account) => next.accounts.retain(|x| x.id != r.id),
                Ok(v1::ResourceKind::Group) => next.groups.retain(|x| x.id != r.id),
                Ok(v1::ResourceKind::Price) => next.prices.retain(|x| x.id != r.id),
                Ok(v1::ResourceKind::AccountState) => next.account_states.retain(|x| account_state_id(x) != r.id),
                _ => {}
            }
        }
        next
    };
    canonicalize(&mut next);
    if !update.content_hash.is_empty() && config_hash(&next) != update.content_hash {
        return Err(ApplyError::HashMismatch(version.to_string()));
    }
    Ok(next)
}

fn upsert<T>(into: &mut Vec<T>, items: Vec<T>, id: impl Fn(&T) -> String) {
    for item in items {
        let key = id(&item);
        match into.iter_mut().find(|x| id(x) == key) {
            Some(slot) => *slot = item,
            None => into.push(item),
        }
    }
}
