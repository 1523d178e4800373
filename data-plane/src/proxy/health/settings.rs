//! The health tunables ([`HealthSettings`]): cooldowns, the breaker threshold and the unified
//! utilization threshold, read from the config's settings map (names, ranges and defaults are
//! declared in `relay_proto::settings`), with per-account overrides `account.<ACCOUNT_ID>.<key>`.

use relay_proto::settings;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::time::Duration;

pub const KEY_RATE_LIMIT_DEFAULT: &str = "cooldown.rate_limit_default_ms";
pub const KEY_OVERLOADED: &str = "cooldown.overloaded_ms";
pub const KEY_ERRORING: &str = "cooldown.erroring_ms";
pub const KEY_MAX: &str = "cooldown.max_ms";
pub const KEY_MIN: &str = "cooldown.min_ms";
pub const KEY_BREAKER_THRESHOLD: &str = "breaker.threshold";
pub const KEY_UNIFIED_THRESHOLD: &str = "unified.threshold";
const ACCOUNT_PREFIX: &str = "account.";

/// Tunables, from the config's settings map (keys below; values in ms unless noted), with per-account
/// overrides `account.<ACCOUNT_ID>.<key>`. Unparseable values are ignored (the default stays).
#[derive(Debug, Clone, PartialEq)]
pub struct HealthSettings {
    /// A 429 without any reset: `cooldown.rate_limit_default_ms`, default 60 s.
    pub rate_limit_default: Duration,
    /// 529 / SSE `overloaded_error`: `cooldown.overloaded_ms`, default 30 s.
    pub overloaded: Duration,
    /// The breaker's first open period: `cooldown.erroring_ms`, default 30 s.
    pub erroring: Duration,
    /// Cap of every timed state: `cooldown.max_ms`, default 6 h.
    pub max: Duration,
    /// Floor of every timed state: `cooldown.min_ms`, default 1 s (at most `max`).
    pub min: Duration,
    /// Consecutive failures that open the breaker: `breaker.threshold`, default 3 (at least 1).
    pub breaker_threshold: u32,
    /// Unified utilization that rate-limits a subscription account: `unified.threshold` (0..1, or a
    /// percentage > 1), default 0.98.
    pub unified_threshold: f64,
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self::from_settings(&BTreeMap::new())
    }
}

impl HealthSettings {
    /// The global values (names, ranges and defaults declared in `relay_proto::settings`).
    pub fn from_settings(values: &BTreeMap<String, String>) -> Self {
        let ms = |name: &str| Duration::from_millis(settings::known(name).u64_in(values));
        let max = ms(KEY_MAX);
        Self {
            rate_limit_default: ms(KEY_RATE_LIMIT_DEFAULT),
            overloaded: ms(KEY_OVERLOADED),
            erroring: ms(KEY_ERRORING),
            max,
            min: ms(KEY_MIN).min(max),
            breaker_threshold: u32::try_from(settings::known(KEY_BREAKER_THRESHOLD).u64_in(values)).unwrap_or(u32::MAX),
            unified_threshold: settings::known(KEY_UNIFIED_THRESHOLD)
                .fraction_of(values.get(KEY_UNIFIED_THRESHOLD).map(String::as_str)),
        }
    }

    /// These settings with the account's overrides applied. Does not allocate.
    pub fn for_account(&self, values: &BTreeMap<String, String>, account_id: &str) -> HealthSettings {
        let mut s = self.clone();
        let overrides = values.range::<str, _>((Bound::Included(ACCOUNT_PREFIX), Bound::Unbounded));
        for (k, v) in overrides {
            let Some(rest) = k.strip_prefix(ACCOUNT_PREFIX) else {
                break;
            };
            if let Some(key) = rest.strip_prefix(account_id).and_then(|r| r.strip_prefix('.')) {
                s.set(key, v);
            }
        }
        s.min = s.min.min(s.max);
        s
    }

    /// An override: a value that does not fit its declared range is ignored.
    fn set(&mut self, key: &str, value: &str) {
        let Some(decl) = settings::get(key).filter(|d| d.per_account) else {
            return;
        };
        let fits = decl.check(value).is_ok();
        if !fits {
            return;
        }
        let ms = || Duration::from_millis(decl.u64_of(Some(value)));
        match key {
            KEY_RATE_LIMIT_DEFAULT => self.rate_limit_default = ms(),
            KEY_OVERLOADED => self.overloaded = ms(),
            KEY_ERRORING => self.erroring = ms(),
            KEY_MAX => self.max = ms(),
            KEY_MIN => self.min = ms(),
            KEY_BREAKER_THRESHOLD => {
                self.breaker_threshold = u32::try_from(decl.u64_of(Some(value))).unwrap_or(u32::MAX)
            }
            KEY_UNIFIED_THRESHOLD => self.unified_threshold = decl.fraction_of(Some(value)),
            _ => {}
        }
    }
}
