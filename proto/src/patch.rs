//! The content hash of a config whose account states alone change, without
//! hashing the rest again: the same digest as [`crate::config_hash`], computed
//! from a kept SHA-256 state.
//!
//! `account_states` is the last field of `Resources` (tag 6), and protobuf
//! encodes fields in tag order, so the canonical encoding of a config is the
//! encoding of everything else followed by the encoding of its states. The
//! control plane keeps the hasher state after the first part ([`StatesHasher`])
//! and, when only account states moved, feeds it the new states. A test holds
//! the two definitions equal.

use crate::v1;
use prost::Message;
use sha2::{Digest, Sha256};

/// The field number of `Resources.account_states` in `relay/v1/config.proto`.
const ACCOUNT_STATES_TAG: u32 = 6;

/// SHA-256 after the canonical encoding of a config without its account states.
#[derive(Clone)]
pub struct StatesHasher {
    prefix: Sha256,
}

impl std::fmt::Debug for StatesHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatesHasher").finish_non_exhaustive()
    }
}

impl StatesHasher {
    /// Hashes everything in `resources` but its account states. `resources` must be canonical
    /// ([`crate::canonicalize`]); its states are put back as they were.
    pub fn new(resources: &mut v1::Resources) -> Self {
        let states = std::mem::take(&mut resources.account_states);
        let mut prefix = Sha256::new();
        prefix.update(resources.encode_to_vec());
        resources.account_states = states;
        Self { prefix }
    }

    /// The content hash of the config this hasher was made from with `states` (canonical order:
    /// by account id, then scope) as its account states: equal to [`crate::config_hash`] of it.
    pub fn hash_with(&self, states: &[v1::AccountState]) -> String {
        let mut suffix = Vec::new();
        prost::encoding::message::encode_repeated(ACCOUNT_STATES_TAG, states, &mut suffix);
        let mut h = self.prefix.clone();
        h.update(&suffix);
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
