//! The config a data plane serves: built to one side from a complete
//! `Resources`, validated, indexed for the request path, then swapped in
//! atomically (`arc_swap`). A config that does not validate is never served.

use crate::upstream::usage::PriceTable;
use arc_swap::ArcSwapOption;
use relay_proto::v1 as pb;
use std::collections::HashMap;
use std::sync::Arc;

/// Why an update cannot be served at all (the old config keeps serving).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidConfig {
    /// The update does not lead to the config it claims: the control plane
    /// answers with a full snapshot.
    #[error(transparent)]
    Apply(#[from] relay_proto::ApplyError),
    /// The config as a whole fails validation.
    #[error(transparent)]
    Structure(#[from] relay_proto::validate::StructuralError),
}

impl InvalidConfig {
    /// What the NACK says about it.
    pub fn nack_reason(&self) -> pb::NackReason {
        match self {
            InvalidConfig::Apply(_) => pb::NackReason::Diverged,
            InvalidConfig::Structure(_) => pb::NackReason::Invalid,
        }
    }
}

/// How the data plane authenticates to an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountKind {
    ApiKey,
    OAuth,
    Compatible,
}

/// An account, ready for the request path.
#[derive(Debug)]
pub struct AccountEntry {
    pub id: String,
    pub name: String,
    pub kind: AccountKind,
    /// Without a trailing slash.
    pub base_url: String,
    pub credential: http::HeaderValue,
    pub bearer: http::HeaderValue,
    pub priority: i32,
    pub weight: u32,
    pub enabled: bool,
    pub max_concurrency: u32,
    /// The outbound proxy to reach it through, if any.
    pub proxy: Option<crate::upstream::client::ProxySpec>,
    /// Bumped by an operator's reset, enable or new credential: an answer to a request sent under
    /// an older one does not count (see `HealthRegistry::observe_as_of`).
    pub reset_generation: u64,
}

/// A client key, ready for the request path.
#[derive(Debug)]
pub struct KeyEntry {
    pub id: String,
    pub name: String,
    pub status: pb::KeyStatus,
    pub expires_at_ms: i64,
    pub group_id: String,
    pub allowed_models: Vec<String>,
    pub limits: pb::KeyLimits,
    /// The key's usage counters, made once per model label for this config.
    pub usage_meters: crate::proxy::meters::UsageMeters,
}

impl KeyEntry {
    /// Exact ids, or prefixes ending in '*'; an empty list allows every model.
    pub fn allows(&self, model: &str) -> bool {
        self.allowed_models.is_empty() || self.allowed_models.iter().any(|m| model_matches(m, model))
    }
}

pub fn model_matches(pattern: &str, model: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => model.starts_with(prefix),
        None => pattern == model,
    }
}

pub struct ServingConfig {
    pub version: pb::ConfigVersion,
    pub hash: String,
    /// The complete config as received (canonical order), kept to apply deltas and to cache.
    pub resources: pb::Resources,
    /// Accounts and keys this data plane cannot use: out of service, reported in the ACK.
    pub rejected: Vec<pb::RejectedResource>,
    /// The config's key-hash secret, keyed once.
    key_hasher: relay_proto::KeyedHasher,
    keys_by_hash: HashMap<[u8; 32], Arc<KeyEntry>>,
    /// Enabled and disabled accounts of each group, sorted by (priority, id).
    accounts_by_group: HashMap<String, Vec<Arc<AccountEntry>>>,
    pub prices: PriceTable,
    /// Groups by id (names and group-wide limits).
    groups: HashMap<String, pb::Group>,
    /// Retries, timeouts, waiting: from the settings map.
    pub policy: crate::proxy::policy::Policy,
    /// Health tunables per account (global settings with per-account overrides).
    health: HashMap<String, crate::proxy::health::HealthSettings>,
    health_default: crate::proxy::health::HealthSettings,
}

impl std::fmt::Debug for ServingConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingConfig")
            .field("version", &self.version)
            .field("hash", &self.hash)
            .field("keys", &self.keys_by_hash.len())
            .finish_non_exhaustive()
    }
}

fn header(v: &str) -> Option<http::HeaderValue> {
    let mut h = http::HeaderValue::from_str(v).ok()?;
    h.set_sensitive(true);
    Some(h)
}

fn reject(out: &mut Vec<pb::RejectedResource>, kind: pb::ResourceKind, id: &str, error: String) {
    out.push(pb::RejectedResource {
        r#ref: Some(pb::ResourceRef {
            kind: kind as i32,
            id: id.to_string(),
        }),
        error,
    });
}

impl ServingConfig {
    /// Validates and indexes a complete config. Nothing is shared with the
    /// config being served until this returns Ok. A structural fault refuses
    /// the whole config; an account or key that cannot be used is left out of
    /// service and listed in [`ServingConfig::rejected`] (validation is
    /// [`relay_proto::validate`], the same code the control plane runs).
    pub fn build(version: pb::ConfigVersion, resources: pb::Resources) -> Result<Self, InvalidConfig> {
        let r = &resources;
        let mut rejected = relay_proto::validate::config(r)?;
        let key_hasher = relay_proto::KeyedHasher::new(
            r.settings
                .as_ref()
                .map(|s| s.api_key_hash_secret.as_slice())
                .unwrap_or_default(),
        );
        let out: std::collections::HashSet<(i32, &str)> = rejected
            .iter()
            .filter_map(|x| x.r#ref.as_ref().map(|r| (r.kind, r.id.as_str())))
            .collect();
        let usable = |kind: pb::ResourceKind, id: &str| !out.contains(&(kind as i32, id));

        let mut keys_by_hash = HashMap::with_capacity(r.api_keys.len());
        for k in r.api_keys.iter().filter(|k| usable(pb::ResourceKind::ApiKey, &k.id)) {
            let entry = Arc::new(KeyEntry {
                id: k.id.clone(),
                name: k.name.clone(),
                status: pb::KeyStatus::try_from(k.status).unwrap_or(pb::KeyStatus::Unspecified),
                expires_at_ms: k.expires_at_ms,
                group_id: k.group_id.clone(),
                allowed_models: k.allowed_models.clone(),
                limits: k.limits.unwrap_or_default(),
                usage_meters: Default::default(),
            });
            // A stored hash not in keyed_hash's form (64 lower-case hex digits) matches no key.
            if let Some(hash) = relay_proto::keyed_hash_bytes(&k.key_hash) {
                keys_by_hash.insert(hash, entry);
            }
        }

        let mut accounts_by_group: HashMap<String, Vec<Arc<AccountEntry>>> = HashMap::new();
        let mut late = Vec::new();
        for a in r.accounts.iter().filter(|a| usable(pb::ResourceKind::Account, &a.id)) {
            // Validated above; what is left can only fail if this build and
            // the shared validation disagree, and then only this account goes.
            let kind = match pb::AccountKind::try_from(a.kind) {
                Ok(pb::AccountKind::AnthropicApiKey) => AccountKind::ApiKey,
                Ok(pb::AccountKind::ClaudeOauth) => AccountKind::OAuth,
                _ => AccountKind::Compatible,
            };
            let proxy = match a.proxy_url.as_str() {
                "" => Ok(None),
                url => crate::upstream::client::ProxySpec::parse(url).map(Some),
            };
            let (credential, bearer, proxy) = match (
                header(&a.credential),
                header(&format!("Bearer {}", a.credential)),
                proxy,
            ) {
                (Some(c), Some(b), Ok(p)) => (c, b, p),
                (_, _, Err(e)) => {
                    late.push((a.id.clone(), format!("unusable proxy URL: {e}")));
                    continue;
                }
                _ => {
                    late.push((a.id.clone(), "the credential is not a valid header value".into()));
                    continue;
                }
            };
            let entry = Arc::new(AccountEntry {
                id: a.id.clone(),
                name: a.name.clone(),
                kind,
                base_url: relay_proto::validate::normalize_base_url(&a.base_url),
                credential,
                bearer,
                priority: a.priority,
                weight: a.weight,
                enabled: a.status == pb::AccountStatus::Enabled as i32,
                max_concurrency: a.max_concurrency,
                proxy,
                reset_generation: a.reset_generation,
            });
            for g in &a.group_ids {
                accounts_by_group.entry(g.clone()).or_default().push(entry.clone());
            }
        }
        for (id, error) in late {
            reject(&mut rejected, pb::ResourceKind::Account, &id, error);
        }
        for list in accounts_by_group.values_mut() {
            list.sort_by(|a, b| (a.priority, &a.id).cmp(&(b.priority, &b.id)));
        }
        let prices = PriceTable::new(&r.prices);
        let empty = std::collections::BTreeMap::new();
        let values = r.settings.as_ref().map(|s| &s.values).unwrap_or(&empty);
        let policy = crate::proxy::policy::Policy::from_settings(values);
        let health_default = crate::proxy::health::HealthSettings::from_settings(values);
        let health = r
            .accounts
            .iter()
            .map(|a| (a.id.clone(), health_default.for_account(values, &a.id)))
            .collect();
        let hash = relay_proto::config_hash(&resources);
        let groups = r.groups.iter().map(|g| (g.id.clone(), g.clone())).collect();
        Ok(Self {
            version,
            hash,
            rejected,
            key_hasher,
            keys_by_hash,
            accounts_by_group,
            prices,
            groups,
            policy,
            health,
            health_default,
            resources,
        })
    }

    /// O(1): the keyed hash of the presented key (its 32 bytes, no hex), then one map lookup.
    pub fn key_for(&self, presented: &str) -> Option<&Arc<KeyEntry>> {
        // The control plane stored the key's hash with this same function, in hex.
        self.keys_by_hash.get(&self.key_hasher.digest(presented))
    }

    /// Health tunables for an account.
    pub fn health_settings(&self, account_id: &str) -> &crate::proxy::health::HealthSettings {
        self.health.get(account_id).unwrap_or(&self.health_default)
    }

    /// A group by id.
    pub fn group(&self, id: &str) -> Option<&pb::Group> {
        self.groups.get(id)
    }

    /// Whether any key or group has a daily or monthly budget (then committed spend is polled).
    pub fn has_budgets(&self) -> bool {
        let budget = |l: &pb::KeyLimits| l.daily_budget_micro_usd > 0 || l.monthly_budget_micro_usd > 0;
        self.keys_by_hash.values().any(|k| budget(&k.limits))
            || self.groups.values().any(|g| g.limits.as_ref().is_some_and(budget))
    }

    /// Every account of a group, sorted by (priority, id).
    pub fn accounts_of(&self, group_id: &str) -> &[Arc<AccountEntry>] {
        self.accounts_by_group.get(group_id).map(Vec::as_slice).unwrap_or(&[])
    }

    /// A group's name ("" for an unknown id).
    pub fn group_name(&self, group_id: &str) -> &str {
        self.groups.get(group_id).map_or("", |g| g.name.as_str())
    }

    /// Every key of the config.
    pub fn keys(&self) -> impl Iterator<Item = &Arc<KeyEntry>> {
        self.keys_by_hash.values()
    }

    /// Every group of the config.
    pub fn groups(&self) -> impl Iterator<Item = &pb::Group> {
        self.groups.values()
    }

    /// An operator's state of a group (unknown groups are active).
    pub fn group_state(&self, group_id: &str) -> pb::GroupState {
        self.groups.get(group_id).map_or(pb::GroupState::Active, |g| g.state())
    }

    /// The groups whose accounts serve a key of `group_id`, in the order they are tried: the
    /// group and then its fallbacks in their order, except that fallbacks an operator activated
    /// come first, groups `cooling` (all their accounts failed recently) come after the others
    /// (an activated one stays first), and paused groups are left out. Fallbacks are not
    /// transitive (a fallback's own fallbacks are not used); unknown ids and repeats are skipped.
    /// Empty only when the group is paused and no fallback can stand in.
    pub fn route_groups<'a>(&'a self, group_id: &'a str, cooling: impl Fn(&str) -> bool) -> Vec<&'a str> {
        let Some(g) = self.groups.get(group_id) else {
            return vec![group_id];
        };
        let mut route: Vec<&'a str> = Vec::with_capacity(1 + g.fallback_ids.len());
        route.push(g.id.as_str());
        for f in &g.fallback_ids {
            if self.groups.contains_key(f) && !route.contains(&f.as_str()) {
                route.push(f.as_str());
            }
        }
        route.retain(|id| self.group_state(id) != pb::GroupState::Paused);
        // A stable sort: within each rank, the operator's order.
        route.sort_by_key(|id| match self.group_state(id) {
            pb::GroupState::Activated => 0,
            _ if cooling(id) => 2,
            _ => 1,
        });
        route
    }
}

/// The config being served; `None` until the first one arrives.
#[derive(Default)]
pub struct ConfigHolder {
    current: ArcSwapOption<ServingConfig>,
    /// Woken on every new config (requests suspended for a recovery look again).
    changed: tokio::sync::Notify,
}

impl ConfigHolder {
    pub fn get(&self) -> Option<Arc<ServingConfig>> {
        self.current.load_full()
    }

    pub fn swap(&self, cfg: ServingConfig) {
        metrics::gauge!(relay_proto::metrics::CONFIG_REVISION).set(cfg.version.revision as f64);
        metrics::gauge!(relay_proto::metrics::CONFIG_RESOURCES_OUT_OF_SERVICE).set(cfg.rejected.len() as f64);
        self.current.store(Some(Arc::new(cfg)));
        self.changed.notify_waiters();
    }

    /// Completes at the next [`Self::swap`]; create it before looking at the current config.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn account(id: &str, proxy_url: &str) -> pb::Account {
        pb::Account {
            id: id.into(),
            name: id.into(),
            kind: pb::AccountKind::AnthropicApiKey as i32,
            base_url: "https://api.anthropic.com".into(),
            credential: "sk-ant-secret".into(),
            weight: 1,
            group_ids: vec!["g".into()],
            status: pb::AccountStatus::Enabled as i32,
            proxy_url: proxy_url.into(),
            ..Default::default()
        }
    }

    fn resources() -> pb::Resources {
        let mut r = pb::Resources {
            groups: vec![pb::Group {
                id: "g".into(),
                ..Default::default()
            }],
            accounts: vec![account("a", ""), account("b", "http://u:hunter2@127.0.0.1:3128/x")],
            api_keys: vec![
                pb::ApiKey {
                    id: "k1".into(),
                    key_hash: relay_proto::keyed_hash(&[1; 32], "rk-k1"),
                    group_id: "g".into(),
                    ..Default::default()
                },
                pb::ApiKey {
                    id: "k2".into(),
                    key_hash: relay_proto::keyed_hash(&[1; 32], "rk-k2"),
                    group_id: "gone".into(),
                    ..Default::default()
                },
            ],
            settings: Some(pb::Settings {
                api_key_hash_secret: vec![1; 32],
                values: Default::default(),
            }),
            ..Default::default()
        };
        relay_proto::canonicalize(&mut r);
        r
    }

    #[test]
    fn one_unusable_account_or_key_is_left_out_and_the_rest_serves() {
        let cfg = ServingConfig::build(pb::ConfigVersion::new(1, 1), resources()).unwrap();
        let ids: Vec<_> = cfg.accounts_of("g").iter().map(|a| a.id.as_str()).collect();
        assert_eq!(ids, ["a"], "the account with an unusable proxy URL is out of service");
        let out: Vec<_> = cfg
            .rejected
            .iter()
            .map(|x| (x.r#ref.as_ref().unwrap().kind, x.r#ref.as_ref().unwrap().id.as_str()))
            .collect();
        assert_eq!(
            out,
            [
                (pb::ResourceKind::ApiKey as i32, "k2"),
                (pb::ResourceKind::Account as i32, "b")
            ]
        );
        assert!(cfg.rejected.iter().all(|x| !x.error.contains("hunter2")));
        assert_eq!(cfg.keys_by_hash.len(), 1, "the key naming an unknown group is out too");
        assert_eq!(cfg.key_for("rk-k1").map(|k| k.id.as_str()), Some("k1"));
        assert!(cfg.key_for("rk-k2").is_none());
        assert!(cfg.key_for("rk-k3").is_none());
    }

    fn routed(groups: Vec<pb::Group>) -> ServingConfig {
        let mut r = resources();
        r.groups = groups;
        relay_proto::canonicalize(&mut r);
        ServingConfig::build(pb::ConfigVersion::new(1, 1), r).unwrap()
    }

    fn grp(id: &str, fallbacks: &[&str], state: pb::GroupState) -> pb::Group {
        pb::Group {
            id: id.into(),
            name: format!("{id}-name"),
            fallback_ids: fallbacks.iter().map(|f| f.to_string()).collect(),
            state: state as i32,
            ..Default::default()
        }
    }

    #[test]
    fn routes_put_the_group_first_then_its_fallbacks_in_order() {
        use pb::GroupState::{Activated, Active, Paused};
        let cfg = routed(vec![
            grp("g", &["c", "b", "gone", "c", "g"], Active),
            grp("b", &["x"], Active),
            grp("c", &[], Active),
            grp("x", &[], Active),
        ]);
        let none = |_: &str| false;
        // Unknown ids, repeats and the group itself are skipped; b's own fallback x is not used.
        assert_eq!(cfg.route_groups("g", none), ["g", "c", "b"]);
        assert_eq!(cfg.route_groups("b", none), ["b", "x"]);
        assert_eq!(cfg.route_groups("unknown", none), ["unknown"]);
        // Cooling: after the others, in order.
        assert_eq!(cfg.route_groups("g", |id| id == "g"), ["c", "b", "g"]);
        assert_eq!(cfg.route_groups("g", |id| id != "b"), ["b", "g", "c"]);

        // Paused: left out, for its own keys and for those falling back to it.
        let cfg = routed(vec![
            grp("g", &["c", "b"], Paused),
            grp("b", &[], Active),
            grp("c", &[], Paused),
        ]);
        assert_eq!(cfg.route_groups("g", none), ["b"]);
        let cfg = routed(vec![grp("g", &[], Paused)]);
        assert!(cfg.route_groups("g", none).is_empty());

        // Activated: first for keys that fall back to it, even over a cooling own group;
        // activation wins over cooling.
        let cfg = routed(vec![
            grp("g", &["c", "b"], Active),
            grp("b", &[], Activated),
            grp("c", &[], Active),
        ]);
        assert_eq!(cfg.route_groups("g", none), ["b", "g", "c"]);
        assert_eq!(cfg.route_groups("g", |id| id == "b" || id == "g"), ["b", "c", "g"]);
        assert_eq!(cfg.route_groups("b", none), ["b"]);
    }

    #[test]
    fn structural_faults_refuse_the_config() {
        let mut r = resources();
        r.settings = None;
        let e = ServingConfig::build(pb::ConfigVersion::new(1, 1), r).unwrap_err();
        assert_eq!(e.nack_reason(), pb::NackReason::Invalid);
        let e = InvalidConfig::from(relay_proto::ApplyError::HashMismatch("1:2".into()));
        assert_eq!(e.nack_reason(), pb::NackReason::Diverged);
    }
}
