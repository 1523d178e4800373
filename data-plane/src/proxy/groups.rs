//! Groups on the request path, beyond their limits: the group-level cooldown and the answer for
//! a key whose group an operator paused.
//!
//! **Cooldown.** When `choose` finds every enabled account of a group unavailable in the health
//! registry (rate limited, overloaded, erroring, unauthorized or blocked, as this data plane and
//! the fleet see them), the group cools down for `groups.cooldown_ms`: its keys' requests try its
//! fallback groups first, and keys falling back to it try it after their other fallbacks, until
//! the cooldown ends (then it is primary again, and cools again if its accounts are still all
//! out). It is not extended while it lasts. Each data plane decides for itself from the health
//! states it shares with the fleet, so data planes agree within a config round trip. A change of
//! the group's state by an operator (pause, resume, activate) ends a cooldown; an activated group
//! goes first whether it cools or not. `relay_group_cooling{group}` is 1 while a group cools.
//!
//! The order of groups itself is [`ServingConfig::route_groups`].

use crate::control::state::ServingConfig;
use crate::errors::ApiError;
use relay_proto::v1 as pb;
use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

/// A group cooling down.
#[derive(Debug, Clone)]
struct Cooling {
    /// Unix ms when it ends.
    until_ms: i64,
    /// The group's name when it began (the gauge's label).
    name: String,
    /// The operator's state of the group when it began: a change ends it.
    state: pb::GroupState,
}

/// The groups cooling down on this data plane. One per data plane.
#[derive(Debug, Default)]
pub struct GroupCooling {
    cooling: Mutex<HashMap<String, Cooling>>,
}

fn gauge(name: &str, value: f64) {
    metrics::gauge!(relay_proto::metrics::GROUP_COOLING, "group" => name.to_string()).set(value);
}

impl GroupCooling {
    /// Whether the group cools down at `now_ms`.
    pub fn is_cooling(&self, group_id: &str, now_ms: i64) -> bool {
        let map = self.cooling.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(group_id).is_some_and(|c| c.until_ms > now_ms)
    }

    /// When the group's cooldown ends, if it cools at `now_ms`.
    pub fn until(&self, group_id: &str, now_ms: i64) -> Option<i64> {
        let map = self.cooling.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(group_id).map(|c| c.until_ms).filter(|u| *u > now_ms)
    }

    /// Every account of the group was found unavailable at `now_ms`: it cools for `cooldown_ms`
    /// unless it already does (a cooldown is not extended) or `cooldown_ms` is 0. Returns whether
    /// a cooldown began.
    pub fn all_failed(&self, cfg: &ServingConfig, group_id: &str, now_ms: i64, cooldown_ms: u64) -> bool {
        if cooldown_ms == 0 {
            return false;
        }
        let until_ms = now_ms.saturating_add(i64::try_from(cooldown_ms).unwrap_or(i64::MAX));
        let name = cfg.group(group_id).map_or(group_id, |g| g.name.as_str()).to_string();
        {
            let mut map = self.cooling.lock().unwrap_or_else(PoisonError::into_inner);
            if map.get(group_id).is_some_and(|c| c.until_ms > now_ms) {
                return false;
            }
            map.insert(
                group_id.to_string(),
                Cooling {
                    until_ms,
                    name: name.clone(),
                    state: cfg.group_state(group_id),
                },
            );
        }
        gauge(&name, 1.0);
        tracing::warn!(
            group = %name,
            cooldown_ms,
            "every account of the group is unavailable: its fallback groups go first until the cooldown ends"
        );
        true
    }

    /// Ends cooldowns that are over, and those of groups gone from `cfg` or whose state an
    /// operator changed since they began; the gauge follows. Called when a config is applied
    /// and before metrics are read.
    pub fn refresh(&self, cfg: Option<&ServingConfig>, now_ms: i64) {
        let mut ended = Vec::new();
        {
            let mut map = self.cooling.lock().unwrap_or_else(PoisonError::into_inner);
            map.retain(|id, c| {
                let changed = cfg.is_some_and(|cfg| cfg.group(id).is_none() || cfg.group_state(id) != c.state);
                let keep = c.until_ms > now_ms && !changed;
                if !keep {
                    ended.push(c.name.clone());
                }
                keep
            });
        }
        for name in ended {
            gauge(&name, 0.0);
        }
    }
}

/// The groups stage: a paused group with nowhere to fall back to is refused before anything is
/// counted; a Messages request whose route has no enabled account at all is refused as a
/// configuration gap (count_tokens is answered by the estimate instead).
pub fn check(req: &super::admission::ClientRequest) -> Result<(), ApiError> {
    if let Some(e) = paused_refusal(&req.cfg, &req.key.group_id) {
        return Err(e);
    }
    if req.is_messages {
        if let Some(e) = no_account_refusal(&req.cfg, &req.key.group_id) {
            return Err(e);
        }
    }
    Ok(())
}

/// The answer for a key whose group is paused and whose fallbacks cannot stand in (none, or all
/// paused too): 503 `api_error` naming the group, with `x-should-retry: false` (an operator's
/// pause lasts until they resume it; retrying at once cannot help). None when the key's
/// requests have somewhere to go.
pub fn paused_refusal(cfg: &ServingConfig, group_id: &str) -> Option<ApiError> {
    if cfg.group_state(group_id) != pb::GroupState::Paused || !cfg.route_groups(group_id, |_| false).is_empty() {
        return None;
    }
    let g = cfg.group(group_id)?;
    let why = if g.fallback_ids.is_empty() {
        "it has no fallback group".to_string()
    } else {
        let names: Vec<&str> = g
            .fallback_ids
            .iter()
            .filter_map(|f| cfg.group(f).map(|x| x.name.as_str()))
            .collect();
        format!("its fallback groups ({}) are paused too", names.join(", "))
    };
    Some(ApiError::group_paused(format!(
        "the group {:?} this API key belongs to is paused by an operator and {why}; no upstream account serves it \
         until the group is resumed",
        g.name
    )))
}

/// The answer for a Messages request whose key's route (its group and fallback groups) has no
/// enabled account at all: a configuration gap, not an overload. 503 `api_error` naming the group
/// and what to do, `x-should-retry: false` (no retry helps until an operator adds or enables an
/// account). None when some enabled account could serve it, in whatever health.
pub fn no_account_refusal(cfg: &ServingConfig, group_id: &str) -> Option<ApiError> {
    let route = cfg.route_groups(group_id, |_| false);
    let any = route
        .iter()
        .flat_map(|g| cfg.accounts_of(g).iter())
        .any(|a| a.enabled && a.weight > 0);
    if any || route.is_empty() {
        return None;
    }
    let name = cfg.group(group_id).map_or(group_id, |g| g.name.as_str());
    let fallbacks = if route.len() > 1 {
        " nor to its fallback groups"
    } else {
        ""
    };
    Some(ApiError::not_configured(format!(
        "no enabled upstream account belongs to the group {name:?} this API key uses{fallbacks}: an operator must \
         add one (relayctl account update ACCOUNT --groups {name}) or enable one"
    )))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cfg(groups: Vec<pb::Group>) -> ServingConfig {
        let mut r = pb::Resources {
            groups,
            settings: Some(pb::Settings {
                api_key_hash_secret: vec![3; 32],
                values: Default::default(),
            }),
            ..Default::default()
        };
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
    fn a_cooldown_lasts_its_time_is_not_extended_and_ends_with_a_state_change() {
        let c = cfg(vec![
            grp("a", &["b"], pb::GroupState::Active),
            grp("b", &[], pb::GroupState::Active),
        ]);
        let g = GroupCooling::default();
        assert!(!g.is_cooling("a", 1_000));
        assert!(!g.all_failed(&c, "a", 1_000, 0), "0 turns cooldowns off");
        assert!(g.all_failed(&c, "a", 1_000, 500));
        assert!(g.is_cooling("a", 1_499) && !g.is_cooling("b", 1_200));
        assert!(!g.all_failed(&c, "a", 1_200, 500), "not extended");
        assert_eq!(g.until("a", 1_200), Some(1_500));
        assert!(!g.is_cooling("a", 1_500), "over");
        assert!(g.all_failed(&c, "a", 1_600, 500), "and may begin again");
        g.refresh(Some(&c), 1_700);
        assert!(g.is_cooling("a", 1_700), "kept while nothing changed");
        let resumed = cfg(vec![
            grp("a", &["b"], pb::GroupState::Activated),
            grp("b", &[], pb::GroupState::Active),
        ]);
        g.refresh(Some(&resumed), 1_700);
        assert!(!g.is_cooling("a", 1_700), "an operator's state change ends it");
        assert!(g.all_failed(&c, "a", 1_800, 500));
        g.refresh(Some(&cfg(vec![grp("b", &[], pb::GroupState::Active)])), 1_800);
        assert!(!g.is_cooling("a", 1_800), "a group gone is forgotten");
    }

    #[test]
    fn a_route_without_an_enabled_account_is_refused_as_a_configuration_gap() {
        let mut r = pb::Resources {
            groups: vec![
                grp("a", &["b"], pb::GroupState::Active),
                grp("b", &[], pb::GroupState::Active),
            ],
            accounts: vec![pb::Account {
                id: "acc".into(),
                name: "acc".into(),
                kind: pb::AccountKind::AnthropicApiKey as i32,
                base_url: "https://api.anthropic.com".into(),
                credential: "c".into(),
                weight: 1,
                group_ids: vec!["b".into()],
                status: pb::AccountStatus::Disabled as i32,
                ..Default::default()
            }],
            settings: Some(pb::Settings {
                api_key_hash_secret: vec![3; 32],
                values: Default::default(),
            }),
            ..Default::default()
        };
        relay_proto::canonicalize(&mut r);
        let c = ServingConfig::build(pb::ConfigVersion::new(1, 1), r.clone()).unwrap();
        let e = no_account_refusal(&c, "a").unwrap();
        assert_eq!((e.status.as_u16(), e.should_retry), (503, Some(false)));
        assert!(
            e.message.contains("\"a-name\"") && e.message.contains("fallback") && e.message.contains("--groups a-name"),
            "{}",
            e.message
        );
        // The fallback group's account enabled: it can serve.
        r.accounts[0].status = pb::AccountStatus::Enabled as i32;
        let c = ServingConfig::build(pb::ConfigVersion::new(1, 2), r).unwrap();
        assert!(no_account_refusal(&c, "a").is_none());
    }

    #[test]
    fn a_paused_group_without_a_way_out_is_refused_by_name() {
        use pb::GroupState::{Active, Paused};
        let c = cfg(vec![grp("a", &[], Paused)]);
        let e = paused_refusal(&c, "a").unwrap();
        assert_eq!(e.status.as_u16(), 503);
        assert_eq!(e.should_retry, Some(false));
        assert!(
            e.message.contains("\"a-name\"") && e.message.contains("no fallback group"),
            "{}",
            e.message
        );
        let c = cfg(vec![grp("a", &["b"], Paused), grp("b", &[], Paused)]);
        let e = paused_refusal(&c, "a").unwrap();
        assert!(e.message.contains("(b-name) are paused too"), "{}", e.message);
        let c = cfg(vec![grp("a", &["b"], Paused), grp("b", &[], Active)]);
        assert!(paused_refusal(&c, "a").is_none(), "b stands in");
        let c = cfg(vec![grp("a", &[], Active)]);
        assert!(paused_refusal(&c, "a").is_none());
    }
}
