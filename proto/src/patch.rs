//! The content hash of a config whose account states alone change, without
//! hashing the rest again: the same digest as [`crate::config_hash`], computed
//! from a kept SHA-256 state.
//!
//! Protobuf encodes fields in tag order, so the canonical encoding of a config
//! is the encoding of the fields before `account_states` (tags 1 to 5), then
//! its states (tag 6), then the fields after them (`capture_rules`, tag 7).
//! The control plane keeps the hasher state after the first part and the
//! encoded last part ([`StatesHasher`]) and, when only account states moved,
//! hashes the new states between them. Tests hold the two definitions equal.

use crate::v1;
use prost::Message;
use sha2::{Digest, Sha256};

/// The field number of `Resources.account_states` in `relay/v1/config.proto`.
const ACCOUNT_STATES_TAG: u32 = 6;
/// The field number of `Resources.capture_rules`: the one field after the states.
const CAPTURE_RULES_TAG: u32 = 7;

/// SHA-256 after the canonical encoding of the fields before a config's account states, and the
/// encoding of the fields after them.
#[derive(Clone)]
pub struct StatesHasher {
    prefix: Sha256,
    suffix: Vec<u8>,
}

impl std::fmt::Debug for StatesHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatesHasher").finish_non_exhaustive()
    }
}

impl StatesHasher {
    /// Hashes everything in `resources` around its account states. `resources` must be canonical
    /// ([`crate::canonicalize`]); its states are put back as they were.
    pub fn new(resources: &mut v1::Resources) -> Self {
        // Every field, named: a new one must be placed before or after the states here.
        let v1::Resources {
            api_keys: _,
            accounts: _,
            groups: _,
            prices: _,
            settings: _,
            account_states: _,
            capture_rules: _,
        } = resources;
        let states = std::mem::take(&mut resources.account_states);
        let rules = std::mem::take(&mut resources.capture_rules);
        let mut prefix = Sha256::new();
        prefix.update(resources.encode_to_vec());
        let mut suffix = Vec::new();
        prost::encoding::message::encode_repeated(CAPTURE_RULES_TAG, &rules, &mut suffix);
        resources.capture_rules = rules;
        resources.account_states = states;
        Self { prefix, suffix }
    }

    /// The content hash of the config this hasher was made from with `states` (canonical order:
    /// by account id, then scope) as its account states: equal to [`crate::config_hash`] of it.
    pub fn hash_with(&self, states: &[v1::AccountState]) -> String {
        let mut encoded = Vec::new();
        prost::encoding::message::encode_repeated(ACCOUNT_STATES_TAG, states, &mut encoded);
        let mut h = self.prefix.clone();
        h.update(&encoded);
        h.update(&self.suffix);
        let mut s = String::with_capacity(64);
        for b in h.finalize() {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn config(states: Vec<v1::AccountState>) -> v1::Resources {
        let mut r = v1::Resources {
            capture_rules: vec![],
            api_keys: vec![v1::ApiKey {
                id: "k1".into(),
                key_hash: "ab".repeat(32),
                limits: Some(v1::KeyLimits {
                    requests_per_minute: 5,
                    ..Default::default()
                }),
                ..Default::default()
            }],
            accounts: (0..20)
                .map(|i| v1::Account {
                    id: format!("acc-{i:03}"),
                    name: format!("account {i}"),
                    credential: format!("sk-{i}"),
                    group_ids: vec!["g1".into()],
                    weight: 1 + i,
                    ..Default::default()
                })
                .collect(),
            groups: vec![v1::Group {
                id: "g1".into(),
                name: "default".into(),
                ..Default::default()
            }],
            prices: vec![v1::Price {
                id: "p1".into(),
                model_pattern: "claude-*".into(),
                input: 3,
                ..Default::default()
            }],
            settings: Some(v1::Settings {
                api_key_hash_secret: vec![7; 32],
                values: [("retry.max_attempts".to_string(), "2".to_string())].into(),
            }),
            account_states: states,
        };
        crate::canonicalize(&mut r);
        r
    }

    fn state(account: &str, scope: &str, until: i64) -> v1::AccountState {
        v1::AccountState {
            account_id: account.into(),
            scope: scope.into(),
            health: v1::AccountHealth::RateLimited as i32,
            reason: "429".into(),
            until_ms: until,
            since_ms: 1,
            reported_by: "dp-1".into(),
            reset_generation: 0,
        }
    }

    #[test]
    fn equals_the_config_hash_whatever_the_states() {
        let mut base = config(vec![state("acc-001", "", 9)]);
        let hasher = StatesHasher::new(&mut base);
        // The states are given back untouched.
        assert_eq!(base.account_states, vec![state("acc-001", "", 9)]);
        for states in [
            vec![],
            vec![state("acc-001", "", 9)],
            vec![state("acc-001", "", 10)],
            vec![
                state("acc-002", "", 0),
                state("acc-002", "opus", 5),
                state("acc-019", "", 7),
            ],
        ] {
            let mut whole = base.clone();
            whole.account_states = states.clone();
            assert_eq!(hasher.hash_with(&states), crate::config_hash(&whole), "{states:?}");
        }
    }

    #[test]
    fn equals_the_config_hash_with_capture_rules_and_states() {
        // Capture rules are encoded after the states (a higher field number): a config holding
        // both must hash the same both ways, or every data plane rejects it.
        let mut base = config(vec![state("acc-001", "", 9)]);
        base.capture_rules = vec![v1::CaptureRule {
            id: "r1".into(),
            key_id: "k1".into(),
            sample_rate: 1.0,
            max_bytes: 1024,
            ..Default::default()
        }];
        let hasher = StatesHasher::new(&mut base);
        assert_eq!(base.capture_rules.len(), 1);
        for states in [vec![], vec![state("acc-001", "", 9)], vec![state("acc-002", "", 3)]] {
            let mut whole = base.clone();
            whole.account_states = states.clone();
            assert_eq!(hasher.hash_with(&states), crate::config_hash(&whole), "{states:?}");
        }
    }

    #[test]
    fn differs_when_anything_else_differs() {
        let states = vec![state("acc-003", "", 9)];
        let mut a = config(states.clone());
        let mut b = config(states.clone());
        b.accounts[4].weight += 1;
        assert_ne!(
            StatesHasher::new(&mut a).hash_with(&states),
            StatesHasher::new(&mut b).hash_with(&states)
        );
    }
}
