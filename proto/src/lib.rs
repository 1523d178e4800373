//! relay-proto: the gRPC contract (`relay.v1`) between the control plane, the
//! data planes and `relayctl`, generated at build time without a system `protoc`.
//!
//! It also owns what both sides must agree on, defined once: a config's
//! fingerprint ([`config_hash`]), delta semantics ([`apply_update`]) and the
//! delta between two configs ([`changed`], [`delta`]), so a data plane can
//! prove it applied exactly what the control plane meant; and what makes a
//! config usable ([`validate`]); the catalogue of every metric relay
//! emits ([`metrics`]); how an upstream answer's error body and
//! rate-limit headers read ([`anthropic`]), for every reader of upstreams;
//! the keyed hash of client keys and the hex encoding both planes write
//! hashes in ([`keyed_hash`], [`hex`]); and the Claude models relay lists
//! ([`models`]).

#[allow(clippy::all, clippy::pedantic, clippy::unwrap_used, clippy::expect_used)]
pub mod v1 {
    tonic::include_proto!("relay.v1");
}

/// `Debug` for messages that carry a secret (their generated `Debug` is
/// skipped in build.rs): every field but the secret ones, which print as
/// "<redacted>" (or "<none>" when empty), so a `{:?}` can never leak one.
macro_rules! redacted_debug {
    ($($ty:ident { plain: [$($p:ident),*], secret: [$($s:ident),*] })*) => {$(
        impl std::fmt::Debug for v1::$ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let mut d = f.debug_struct(stringify!($ty));
                $(d.field(stringify!($p), &self.$p);)*
                $(d.field(stringify!($s), &Redacted::of(&self.$s));)*
                d.finish()
            }
        }
    )*};
}

/// How a secret field shows in `Debug`.
struct Redacted(bool);

impl Redacted {
    fn of<T: SecretField + ?Sized>(v: &T) -> Self {
        Redacted(v.is_set())
    }
}

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0 { "<redacted>" } else { "<none>" })
    }
}

trait SecretField {
    fn is_set(&self) -> bool;
}
impl SecretField for String {
    fn is_set(&self) -> bool {
        !self.is_empty()
    }
}
impl SecretField for Vec<u8> {
    fn is_set(&self) -> bool {
        !self.is_empty()
    }
}
impl SecretField for Option<String> {
    fn is_set(&self) -> bool {
        self.as_ref().is_some_and(|s| !s.is_empty())
    }
}

redacted_debug! {
    Account {
        plain: [id, name, kind, base_url, priority, weight, group_ids, max_concurrency, status,
                credential_expires_at_ms, reset_generation],
        secret: [credential, proxy_url]
    }
    Settings { plain: [values], secret: [api_key_hash_secret] }
    CreateAccountRequest {
        plain: [name, kind, base_url, priority, weight, groups, max_concurrency, credential_expires_at_ms,
                scopes, subscription_type, organization],
        secret: [credential, proxy_url, refresh_token]
    }
    UpdateAccountRequest {
        plain: [account, name, base_url, priority, weight, set_groups, groups, max_concurrency, status,
                credential_expires_at_ms, allow_credential_to_new_host],
        secret: [credential, proxy_url, refresh_token]
    }
    CreateApiKeyResponse { plain: [info], secret: [key] }
    CreateAdminTokenResponse { plain: [info], secret: [token] }
}

/// The encoded `FileDescriptorSet` of `relay.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/relay_descriptor.bin"));

pub mod anthropic;
pub mod bounds;
mod hashing;
pub mod metrics;
pub mod models;
pub mod patch;
pub mod periods;
pub mod redact;
pub mod settings;
pub mod validate;

pub use hashing::{hex, keyed_hash, keyed_hash_bytes, KeyedHasher};

use prost::Message;
use sha2::{Digest, Sha256};
use std::collections::{BTreeSet, HashMap};

/// Puts a complete config in canonical order (every list sorted by id).
pub fn canonicalize(resources: &mut v1::Resources) {
    resources.api_keys.sort_by(|a, b| a.id.cmp(&b.id));
    resources.accounts.sort_by(|a, b| a.id.cmp(&b.id));
    for a in &mut resources.accounts {
        a.group_ids.sort();
    }
    resources.groups.sort_by(|a, b| a.id.cmp(&b.id));
    resources.prices.sort_by(|a, b| a.id.cmp(&b.id));
    resources.capture_rules.sort_by(|a, b| a.id.cmp(&b.id));
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
    hex(&Sha256::digest(r.encode_to_vec()))
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
        upsert(&mut next.capture_rules, incoming.capture_rules, |x| x.id.clone());
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
                Ok(v1::ResourceKind::CaptureRule) => next.capture_rules.retain(|x| x.id != r.id),
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

/// The identity of one resource in a config: its kind and id (the settings are
/// one resource, with an empty id).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceKey {
    pub kind: i32,
    pub id: String,
}

impl ResourceKey {
    fn new(kind: v1::ResourceKind, id: &str) -> Self {
        Self {
            kind: kind as i32,
            id: id.to_string(),
        }
    }
}

fn diff_list<T: PartialEq>(
    out: &mut BTreeSet<ResourceKey>,
    kind: v1::ResourceKind,
    old: &[T],
    new: &[T],
    id: impl Fn(&T) -> String,
) {
    let before: HashMap<String, &T> = old.iter().map(|x| (id(x), x)).collect();
    let mut seen = std::collections::HashSet::with_capacity(new.len());
    for x in new {
        let key = id(x);
        if before.get(&key).is_none_or(|o| *o != x) {
            out.insert(ResourceKey::new(kind, &key));
        }
        seen.insert(key);
    }
    for key in before.keys() {
        if !seen.contains(key) {
            out.insert(ResourceKey::new(kind, key));
        }
    }
}

/// Every resource that differs between two complete configs (added, changed
/// or removed), whatever caused the difference: a write, a cascade, a restore.
/// Computed over the same content [`config_hash`] covers, so a delta built
/// from it ([`delta`]) always reproduces `new` exactly.
pub fn changed(old: &v1::Resources, new: &v1::Resources) -> BTreeSet<ResourceKey> {
    use v1::ResourceKind as K;
    let mut out = BTreeSet::new();
    diff_list(&mut out, K::ApiKey, &old.api_keys, &new.api_keys, |x| x.id.clone());
    diff_list(&mut out, K::Account, &old.accounts, &new.accounts, |x| x.id.clone());
    diff_list(&mut out, K::Group, &old.groups, &new.groups, |x| x.id.clone());
    diff_list(&mut out, K::Price, &old.prices, &new.prices, |x| x.id.clone());
    diff_list(&mut out, K::CaptureRule, &old.capture_rules, &new.capture_rules, |x| {
        x.id.clone()
    });
    diff_list(
        &mut out,
        K::AccountState,
        &old.account_states,
        &new.account_states,
        account_state_id,
    );
    if old.settings != new.settings {
        out.insert(ResourceKey::new(K::Settings, ""));
    }
    out
}

fn find_by_id<'a, T>(all: &'a [T], id: &str, key: impl Fn(&T) -> &str) -> Option<&'a T> {
    // Canonical lists are sorted by id; fall back to a scan if one is not.
    match all.binary_search_by(|x| key(x).cmp(id)) {
        Ok(i) => all.get(i),
        Err(_) => all.iter().find(|x| key(x) == id),
    }
}

/// The delta that takes any config holding `head`'s content outside `keys` to
/// `head`: every key present in `head` is upserted with its value there, every
/// other key is removed. Sending a key that did not change is harmless.
pub fn delta<'a>(
    head: &v1::Resources,
    keys: impl IntoIterator<Item = &'a ResourceKey>,
) -> (v1::Resources, Vec<v1::ResourceRef>) {
    use v1::ResourceKind as K;
    let mut up = v1::Resources::default();
    let mut removed = Vec::new();
    for k in keys {
        let present = match K::try_from(k.kind) {
            Ok(K::ApiKey) => find_by_id(&head.api_keys, &k.id, |x| &x.id)
                .map(|x| up.api_keys.push(x.clone()))
                .is_some(),
            Ok(K::Account) => find_by_id(&head.accounts, &k.id, |x| &x.id)
                .map(|x| up.accounts.push(x.clone()))
                .is_some(),
            Ok(K::Group) => find_by_id(&head.groups, &k.id, |x| &x.id)
                .map(|x| up.groups.push(x.clone()))
                .is_some(),
            Ok(K::Price) => find_by_id(&head.prices, &k.id, |x| &x.id)
                .map(|x| up.prices.push(x.clone()))
                .is_some(),
            Ok(K::CaptureRule) => find_by_id(&head.capture_rules, &k.id, |x| &x.id)
                .map(|x| up.capture_rules.push(x.clone()))
                .is_some(),
            Ok(K::AccountState) => head
                .account_states
                .iter()
                .find(|x| account_state_id(x) == k.id)
                .map(|x| up.account_states.push(x.clone()))
                .is_some(),
            Ok(K::Settings) => {
                up.settings = head.settings.clone();
                continue;
            }
            _ => continue,
        };
        if !present {
            removed.push(v1::ResourceRef {
                kind: k.kind,
                id: k.id.clone(),
            });
        }
    }
    (up, removed)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn state(account: &str, scope: &str, until: i64) -> v1::AccountState {
        v1::AccountState {
            account_id: account.into(),
            scope: scope.into(),
            health: v1::AccountHealth::RateLimited as i32,
            until_ms: until,
            ..Default::default()
        }
    }

    fn config(accounts: &[&str], states: Vec<v1::AccountState>, secret: u8) -> v1::Resources {
        let mut r = v1::Resources {
            accounts: accounts
                .iter()
                .map(|a| v1::Account {
                    id: a.to_string(),
                    ..Default::default()
                })
                .collect(),
            account_states: states,
            settings: Some(v1::Settings {
                api_key_hash_secret: vec![secret; 32],
                values: Default::default(),
            }),
            ..Default::default()
        };
        canonicalize(&mut r);
        r
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let a = v1::Account {
            name: "main".into(),
            credential: "sk-ant-SECRET".into(),
            proxy_url: "http://u:PASSWORD@p:1".into(),
            ..Default::default()
        };
        let s = format!("{a:?}");
        assert!(s.contains("main") && s.contains("<redacted>"), "{s}");
        assert!(!s.contains("SECRET") && !s.contains("PASSWORD"), "{s}");
        let r = v1::Resources {
            accounts: vec![a],
            settings: Some(v1::Settings {
                api_key_hash_secret: b"HASHSECRET".to_vec(),
                values: Default::default(),
            }),
            ..Default::default()
        };
        let s = format!("{r:?}");
        assert!(!s.contains("SECRET") && !s.contains("72, 65"), "{s}");
        let k = v1::CreateApiKeyResponse {
            key: "rk-live-KEY".into(),
            ..Default::default()
        };
        assert!(!format!("{k:?}").contains("KEY"));
        let u = v1::UpdateAccountRequest {
            credential: Some("sk-NEW".into()),
            ..Default::default()
        };
        assert!(!format!("{u:?}").contains("NEW"));
    }

    /// The bug that froze fleets: an account deleted with its states (a cascade).
    #[test]
    fn a_delta_from_the_diff_reproduces_the_new_config_cascades_included() {
        let old = config(
            &["a", "b"],
            vec![state("a", "", 5), state("a", "opus", 9), state("b", "", 1)],
            1,
        );
        let new = config(&["b"], vec![state("b", "", 2)], 2);
        let keys = changed(&old, &new);
        let (resources, removed) = delta(&new, &keys);
        assert_eq!(removed.len(), 3, "account a and both its states: {removed:?}");
        let update = v1::ConfigUpdate {
            version: Some(v1::ConfigVersion::new(1, 2)),
            base: Some(v1::ConfigVersion::new(1, 1)),
            resources: Some(resources),
            removed,
            content_hash: config_hash(&new),
            ..Default::default()
        };
        let v = v1::ConfigVersion::new(1, 1);
        let got = apply_update(Some((&v, &old)), &update).unwrap();
        assert_eq!(got, new);
        assert!(changed(&new, &new).is_empty());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod props {
    //! Property tests: a delta built from two configs, applied to the first, gives the second,
    //! whatever the two are; a delta never applies on the wrong base; nothing panics.
    use super::*;
    use proptest::prelude::*;

    fn ids() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(0u8..6, 0..6)
    }

    /// A config from small id sets (so two draws share ids) and a few varying fields.
    fn resources() -> impl Strategy<Value = v1::Resources> {
        (
            ids(),
            ids(),
            ids(),
            ids(),
            proptest::collection::vec((0u8..6, 0u8..3, 0i64..5), 0..6),
            any::<u8>(),
            0u8..3,
        )
            .prop_map(|(keys, accounts, groups, prices, states, secret, weight)| {
                let mut r = v1::Resources {
                    api_keys: keys
                        .iter()
                        .map(|k| v1::ApiKey {
                            id: format!("k{k}"),
                            name: format!("key {k} {weight}"),
                            ..Default::default()
                        })
                        .collect(),
                    accounts: accounts
                        .iter()
                        .map(|a| v1::Account {
                            id: format!("a{a}"),
                            weight: u32::from(*a) + u32::from(weight),
                            ..Default::default()
                        })
                        .collect(),
                    groups: groups
                        .iter()
                        .map(|g| v1::Group {
                            id: format!("g{g}"),
                            name: format!("group {g}"),
                            ..Default::default()
                        })
                        .collect(),
                    prices: prices
                        .iter()
                        .map(|p| v1::Price {
                            id: format!("p{p}"),
                            ..Default::default()
                        })
                        .collect(),
                    // Capture rules come and go with the prices' ids (their own kind of resource).
                    capture_rules: prices
                        .iter()
                        .map(|p| v1::CaptureRule {
                            id: format!("c{p}"),
                            sample_rate: f64::from(weight + 1) / 4.0,
                            ..Default::default()
                        })
                        .collect(),
                    account_states: states
                        .iter()
                        .map(|(a, scope, until)| v1::AccountState {
                            account_id: format!("a{a}"),
                            scope: ["", "model:x", "model:y"][*scope as usize].to_string(),
                            until_ms: *until,
                            ..Default::default()
                        })
                        .collect(),
                    settings: Some(v1::Settings {
                        api_key_hash_secret: vec![secret; 32],
                        values: Default::default(),
                    }),
                };
                // Lists hold each id once, as a stored config does.
                r.api_keys.sort_by(|x, y| x.id.cmp(&y.id));
                r.api_keys.dedup_by(|x, y| x.id == y.id);
                r.accounts.sort_by(|x, y| x.id.cmp(&y.id));
                r.accounts.dedup_by(|x, y| x.id == y.id);
                r.groups.sort_by(|x, y| x.id.cmp(&y.id));
                r.groups.dedup_by(|x, y| x.id == y.id);
                r.prices.sort_by(|x, y| x.id.cmp(&y.id));
                r.prices.dedup_by(|x, y| x.id == y.id);
                r.capture_rules.sort_by(|x, y| x.id.cmp(&y.id));
                r.capture_rules.dedup_by(|x, y| x.id == y.id);
                r.account_states.sort_by_key(account_state_id);
                r.account_states
                    .dedup_by(|x, y| account_state_id(x) == account_state_id(y));
                canonicalize(&mut r);
                r
            })
    }

    proptest! {
        #[test]
        fn a_delta_between_two_configs_leads_from_one_to_the_other(a in resources(), b in resources()) {
            let va = v1::ConfigVersion::new(1, 5);
            let vb = v1::ConfigVersion::new(1, 9);
            let keys = changed(&a, &b);
            let (up, removed) = delta(&b, &keys);
            let update = v1::ConfigUpdate {
                version: Some(vb),
                full: false,
                base: Some(va),
                resources: Some(up),
                removed,
                content_hash: config_hash(&b),
                ..Default::default()
            };
            let got = apply_update(Some((&va, &a)), &update).unwrap();
            prop_assert_eq!(&got, &b);
            // On any other base it is refused, never half-applied.
            let other = v1::ConfigVersion::new(1, 4);
            prop_assert!(apply_update(Some((&other, &a)), &update).is_err());
        }

        #[test]
        fn arbitrary_updates_never_panic(held in resources(), bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            use prost::Message;
            if let Ok(update) = v1::ConfigUpdate::decode(bytes.as_slice()) {
                let v = v1::ConfigVersion::new(1, 1);
                let _ = apply_update(Some((&v, &held)), &update);
                let _ = apply_update(None, &update);
            }
        }
    }
}
