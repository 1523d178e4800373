//! Gauges computed when `/metrics` is scraped, so they are current whatever changed since (a
//! state that ended by itself, a new config, new committed spend): each account's state, the
//! available accounts of each group, and how much of each budget is spent.
//!
//! Labels are names an operator chose (accounts, groups; keys only with `metrics.key_labels`).
//! A series whose account, group or key left the config is zeroed (states) or set to NaN (counts
//! and ratios: no longer a value an alert should compare).

use super::health::HealthRegistry;
use crate::control::spend::SpendBook;
use crate::control::state::ServingConfig;
use relay_limits::Kind;
use relay_proto::metrics::{ACCOUNT_STATE, BUDGET_USED_RATIO, GROUP_ACCOUNTS_AVAILABLE};
use relay_proto::v1 as pb;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Mutex, PoisonError};

/// The values `relay_account_state{state}` takes.
pub const STATES: &[&str] = &[
    "available",
    "rate_limited",
    "overloaded",
    "erroring",
    "unauthorized",
    "blocked",
    "disabled",
];

fn health_label(h: pb::AccountHealth) -> &'static str {
    match h {
        pb::AccountHealth::RateLimited => "rate_limited",
        pb::AccountHealth::Overloaded => "overloaded",
        pb::AccountHealth::Erroring => "erroring",
        pb::AccountHealth::Unauthorized => "unauthorized",
        pb::AccountHealth::Blocked => "blocked",
        pb::AccountHealth::Unspecified => "available",
    }
}

/// Label sets written at the last refresh, to retire those that left the config.
#[derive(Default)]
struct Written {
    accounts: BTreeSet<String>,
    groups: BTreeSet<String>,
    budgets: BTreeSet<Vec<(&'static str, String)>>,
}

static WRITTEN: Mutex<Option<Written>> = Mutex::new(None);

/// Brings the gauges up to date with `cfg`, the health view and committed spend.
pub fn refresh(cfg: &ServingConfig, health: &HealthRegistry, spend: &SpendBook, now_ms: i64) {
    // Account-wide states by account id (a model family's state leaves the account serving the
    // others).
    let states: HashMap<String, &'static str> = health
        .states(now_ms)
        .into_iter()
        .filter(|st| st.scope.is_empty())
        .map(|st| {
            let label = health_label(st.health());
            (st.account_id, label)
        })
        .collect();
    let mut accounts: BTreeSet<String> = BTreeSet::new();
    let mut groups: BTreeSet<String> = BTreeSet::new();
    for g in cfg.groups() {
        let mut available = 0u32;
        for a in cfg.accounts_of(&g.id) {
            let state = if !a.enabled {
                "disabled"
            } else {
                states.get(a.id.as_str()).copied().unwrap_or("available")
            };
            if state == "available" {
                available += 1;
            }
            if accounts.insert(a.name.clone()) {
                for s in STATES {
                    metrics::gauge!(ACCOUNT_STATE, "account" => a.name.clone(), "state" => *s).set(if *s == state {
                        1.0
                    } else {
                        0.0
                    });
                }
            }
        }
        metrics::gauge!(GROUP_ACCOUNTS_AVAILABLE, "group" => g.name.clone()).set(f64::from(available));
        groups.insert(g.name.clone());
    }
    let budgets = budget_ratios(cfg, spend, now_ms);
    let mut written = WRITTEN.lock().unwrap_or_else(PoisonError::into_inner);
    let before = written.take().unwrap_or_default();
    for gone in before.accounts.difference(&accounts) {
        for s in STATES {
            metrics::gauge!(ACCOUNT_STATE, "account" => gone.clone(), "state" => *s).set(0.0);
        }
    }
    for gone in before.groups.difference(&groups) {
        metrics::gauge!(GROUP_ACCOUNTS_AVAILABLE, "group" => gone.clone()).set(f64::NAN);
    }
    for gone in before.budgets.iter().filter(|l| !budgets.contains_key(*l)) {
        metrics::gauge!(BUDGET_USED_RATIO, labels(gone)).set(f64::NAN);
    }
    for (l, ratio) in &budgets {
        metrics::gauge!(BUDGET_USED_RATIO, labels(l)).set(*ratio);
    }
    *written = Some(Written {
        accounts,
        groups,
        budgets: budgets.into_keys().collect(),
    });
}

fn labels(l: &[(&'static str, String)]) -> Vec<metrics::Label> {
    l.iter().map(|(k, v)| metrics::Label::new(*k, v.clone())).collect()
}

/// Spent over budget for every group and key with a budget, by period: committed spend (what
/// the control plane stored) over the budget. Without `metrics.key_labels` a group's keys are
/// one series: the fullest key's ratio.
fn budget_ratios(cfg: &ServingConfig, spend: &SpendBook, now_ms: i64) -> BTreeMap<Vec<(&'static str, String)>, f64> {
    let p = relay_proto::periods::periods(cfg.policy.timezone, now_ms);
    let mut out: BTreeMap<Vec<(&'static str, String)>, f64> = BTreeMap::new();
    let ratio = |spent_nano: u64, budget_micro: u64| spent_nano as f64 / (budget_micro as f64 * 1000.0);
    for g in cfg.groups() {
        let Some(l) = g.limits.as_ref() else { continue };
        let c = spend.committed(Kind::Group, &g.id, &p);
        for (period, budget, spent) in [
            ("day", l.daily_budget_micro_usd, c.day_nano),
            ("month", l.monthly_budget_micro_usd, c.month_nano),
        ] {
            if budget > 0 {
                let key = vec![
                    ("subject", "group".to_string()),
                    ("group", g.name.clone()),
                    ("period", period.to_string()),
                ];
                out.insert(key, ratio(spent, budget));
            }
        }
    }
    for k in cfg.keys() {
        let c = spend.committed(Kind::Key, &k.id, &p);
        let group = cfg.group_name(&k.group_id).to_string();
        for (period, budget, spent) in [
            ("day", k.limits.daily_budget_micro_usd, c.day_nano),
            ("month", k.limits.monthly_budget_micro_usd, c.month_nano),
        ] {
            if budget == 0 {
                continue;
            }
            let mut key = vec![("subject", "key".to_string()), ("group", group.clone())];
            if cfg.policy.key_labels {
                key.push(("key", k.name.clone()));
            }
            key.push(("period", period.to_string()));
            let r = ratio(spent, budget);
            let e = out.entry(key).or_insert(r);
            *e = e.max(r);
        }
    }
    out
}
