//! The config a data plane serves: built to one side from a complete
//! `Resources`, validated, indexed for the request path, then swapped in
//! atomically (`arc_swap`). A config that does not validate is never served.

use crate::upstream::usage::PriceTable;
use arc_swap::ArcSwapOption;
use relay_proto::v1 as pb;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidConfig {
    #[error("duplicate {kind} id {id}")]
    DuplicateId { kind: &'static str, id: String },
    #[error("api key {key} refers to unknown group {group}")]
    KeyGroup { key: String, group: String },
    #[error("account {account} refers to unknown group {group}")]
    AccountGroup { account: String, group: String },
    #[error("account {0} has weight 0")]
    ZeroWeight(String),
    #[error("account {account} has an invalid base URL: {reason}")]
    BaseUrl { account: String, reason: String },
    #[error("account {account} has an unusable proxy URL: {reason}")]
    ProxyUrl {
        account: String,
        reason: crate::upstream::client::ProxyUrlError,
    },
    #[error("account {0} has an unknown kind")]
    AccountKind(String),
    #[error("two api keys share one hash ({0} and another)")]
    DuplicateKeyHash(String),
    #[error("settings are missing or carry no api-key hash secret")]
    NoHashSecret,
    #[error(transparent)]
    Apply(#[from] relay_proto::ApplyError),
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
    hash_secret: Vec<u8>,
    keys_by_hash: HashMap<String, Arc<KeyEntry>>,
    /// Enabled and disabled accounts of each group, sorted by (priority, id).
    accounts_by_group: HashMap<String, Vec<Arc<AccountEntry>>>,
    pub prices: PriceTable,
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

fn check_unique<'a>(kind: &'static str, ids: impl Iterator<Item = &'a String>) -> Result<(), InvalidConfig> {
    let mut seen = HashSet::new();
    for id in ids {
        if !seen.insert(id) {
            return Err(InvalidConfig::DuplicateId { kind, id: id.clone() });
        }
    }
    Ok(())
}

fn header(v: &str, account: &str) -> Result<http::HeaderValue, InvalidConfig> {
    let mut h = http::HeaderValue::from_str(v).map_err(|_| InvalidConfig::BaseUrl {
        account: account.to_string(),
        reason: "credential is not a valid header value".into(),
    })?;
    h.set_sensitive(true);
    Ok(h)
}

impl ServingConfig {
    /// Validates and indexes a complete config. Nothing is shared with the
    /// config being served until this returns Ok.
    pub fn build(version: pb::ConfigVersion, resources: pb::Resources) -> Result<Self, InvalidConfig> {
        let r = &resources;
        check_unique("api key", r.api_keys.iter().map(|k| &k.id))?;
        check_unique("account", r.accounts.iter().map(|a| &a.id))?;
        check_unique("group", r.groups.iter().map(|g| &g.id))?;
        check_unique("price", r.prices.iter().map(|p| &p.id))?;
        let hash_secret = r
            .settings
            .as_ref()
            .map(|s| s.api_key_hash_secret.clone())
            .filter(|s| s.len() >= 16)
            .ok_or(InvalidConfig::NoHashSecret)?;
        let groups: HashSet<&str> = r.groups.iter().map(|g| g.id.as_str()).collect();

        let mut keys_by_hash = HashMap::with_capacity(r.api_keys.len());
        for k in &r.api_keys {
            if !groups.contains(k.group_id.as_str()) {
                return Err(InvalidConfig::KeyGroup {
                    key: k.name.clone(),
                    group: k.group_id.clone(),
                });
            }
            let entry = Arc::new(KeyEntry {
                id: k.id.clone(),
                name: k.name.clone(),
                status: pb::KeyStatus::try_from(k.status).unwrap_or(pb::KeyStatus::Unspecified),
                expires_at_ms: k.expires_at_ms,
                group_id: k.group_id.clone(),
                allowed_models: k.allowed_models.clone(),
                limits: k.limits.unwrap_or_default(),
            });
            if keys_by_hash.insert(k.key_hash.clone(), entry).is_some() {
                return Err(InvalidConfig::DuplicateKeyHash(k.name.clone()));
            }
        }

        let mut accounts_by_group: HashMap<String, Vec<Arc<AccountEntry>>> = HashMap::new();
        for a in &r.accounts {
            let kind = match pb::AccountKind::try_from(a.kind) {
                Ok(pb::AccountKind::AnthropicApiKey) => AccountKind::ApiKey,
                Ok(pb::AccountKind::ClaudeOauth) => AccountKind::OAuth,
                Ok(pb::AccountKind::AnthropicCompatible) => AccountKind::Compatible,
                _ => return Err(InvalidConfig::AccountKind(a.name.clone())),
            };
            let enabled = a.status == pb::AccountStatus::Enabled as i32;
            if a.weight == 0 && enabled {
                return Err(InvalidConfig::ZeroWeight(a.name.clone()));
            }
            let uri: http::Uri = a
                .base_url
                .parse()
                .map_err(|e: http::uri::InvalidUri| InvalidConfig::BaseUrl {
                    account: a.name.clone(),
                    reason: e.to_string(),
                })?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                return Err(InvalidConfig::BaseUrl {
                    account: a.name.clone(),
                    reason: "expected an absolute http(s) URL".into(),
                });
            }
            let entry = Arc::new(AccountEntry {
                id: a.id.clone(),
                name: a.name.clone(),
                kind,
                base_url: a.base_url.trim_end_matches('/').to_string(),
                credential: header(&a.credential, &a.name)?,
                bearer: header(&format!("Bearer {}", a.credential), &a.name)?,
                priority: a.priority,
                weight: a.weight,
                enabled,
                max_concurrency: a.max_concurrency,
                proxy: match a.proxy_url.as_str() {
                    "" => None,
                    url => Some(crate::upstream::client::ProxySpec::parse(url).map_err(|reason| {
                        InvalidConfig::ProxyUrl {
                            account: a.name.clone(),
                            reason,
                        }
                    })?),
                },
            });
            for g in &a.group_ids {
                if !groups.contains(g.as_str()) {
                    return Err(InvalidConfig::AccountGroup {
                        account: a.name.clone(),
                        group: g.clone(),
                    });
                }
                accounts_by_group.entry(g.clone()).or_default().push(entry.clone());
            }
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
        Ok(Self {
            version,
            hash,
            hash_secret,
            keys_by_hash,
            accounts_by_group,
            prices,
            policy,
            health,
            health_default,
            resources,
        })
    }

    /// O(1): the keyed hash of the presented key, then one map lookup.
    pub fn key_for(&self, presented: &str) -> Option<&Arc<KeyEntry>> {
        use hmac::Mac;
        let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(&self.hash_secret).ok()?;
        mac.update(presented.as_bytes());
        let digest = mac.finalize().into_bytes();
        let mut hex = String::with_capacity(64);
        for b in digest {
            use std::fmt::Write;
            let _ = write!(hex, "{b:02x}");
        }
        self.keys_by_hash.get(&hex)
    }

    /// Health tunables for an account.
    pub fn health_settings(&self, account_id: &str) -> &crate::proxy::health::HealthSettings {
        self.health.get(account_id).unwrap_or(&self.health_default)
    }

    /// Every account of a group, sorted by (priority, id).
    pub fn accounts_of(&self, group_id: &str) -> &[Arc<AccountEntry>] {
        self.accounts_by_group.get(group_id).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// The config being served; `None` until the first one arrives.
#[derive(Default)]
pub struct ConfigHolder {
    current: ArcSwapOption<ServingConfig>,
}

impl ConfigHolder {
    pub fn get(&self) -> Option<Arc<ServingConfig>> {
        self.current.load_full()
    }

    pub fn swap(&self, cfg: ServingConfig) {
        metrics::gauge!("relay_config_revision").set(cfg.version.revision as f64);
        self.current.store(Some(Arc::new(cfg)));
    }
}
