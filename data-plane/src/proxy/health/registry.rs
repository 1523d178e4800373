//! The registry ([`HealthRegistry`]): one per data plane, every account's [`Tracked`] behind a
//! short per-account lock; it records outcomes (`observe`), follows config swaps (`sync`, which
//! drops what an operator reset cleared, and `sync_shared`) and answers the request path's
//! question "may this account take a request for this model now?" (`availability`).

use super::breaker::Breaker;
use super::classify::{classify, Outcome, Verdict};
use super::family::model_family;
use super::fleet::{is_live, outranks, state, Availability, Tracked};
use super::settings::HealthSettings;
use super::{lock, wall_now_ms};
use http::HeaderMap;
use relay_proto::v1 as pb;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError, RwLock};

/// behind an `Arc`.
#[derive(Debug)]
pub struct HealthRegistry {
    node_id: String,
    pub(super) accounts: RwLock<HashMap<Box<str>, Mutex<Tracked>>>,
    /// Each account's `reset_generation` in the config served: when it moves, an operator cleared
    /// the account (reset, enable, new credential or route) and everything known here goes too.
    generations: RwLock<HashMap<String, u64>>,
    /// Subscription accounts' quota windows, this data plane's and the fleet's newest.
    pub quotas: crate::proxy::quota::Quotas,
}

impl HealthRegistry {
    pub fn new(node_id: &str) -> Self {
        Self {
            node_id: node_id.to_string(),
            accounts: RwLock::new(HashMap::new()),
            generations: RwLock::new(HashMap::new()),
            quotas: crate::proxy::quota::Quotas::default(),
        }
    }

    /// Follows a config just applied (call on every config swap): accounts whose `reset_generation`
    /// moved lose everything known here (local states, the circuit breaker), as the operator cleared
    /// them on the control plane; accounts no longer in the config are forgotten; then the fleet view
    /// is replaced ([`Self::sync_shared`]).
    pub fn sync(&self, resources: &pb::Resources) {
        self.sync_at(resources, wall_now_ms());
    }

    /// [`Self::sync`] with an explicit clock (unix ms).
    pub fn sync_at(&self, resources: &pb::Resources, now_ms: i64) {
        let next: HashMap<String, u64> = resources
            .accounts
            .iter()
            .map(|a| (a.id.clone(), a.reset_generation))
            .collect();
        // One lock at a time (`observe` reads the generations, then the accounts).
        let cleared: Vec<String> = {
            let mut gens = self.generations.write().unwrap_or_else(PoisonError::into_inner);
            let moved = next
                .iter()
                .filter(|(id, g)| gens.get(*id).is_some_and(|old| old != *g))
                .map(|(id, _)| id.clone())
                .collect();
            *gens = next.clone();
            moved
        };
        {
            let mut map = self.accounts.write().unwrap_or_else(PoisonError::into_inner);
            // An account no longer in the config is forgotten.
            map.retain(|id, _| next.contains_key(id.as_ref()));
            self.quotas.retain(|id| next.contains_key(id));
            for id in &cleared {
                if let Some(slot) = map.get_mut(id.as_str()) {
                    let t = slot.get_mut().unwrap_or_else(PoisonError::into_inner);
                    t.local.clear();
                    t.breaker = Breaker::default();
                }
            }
        }
        self.sync_shared_at(&resources.account_states, now_ms);
    }

    /// The `reset_generation` of the account in the config served (0 if unknown): reports carry it,
    /// so the control plane can tell one made before a reset.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn generation(&self, account_id: &str) -> u64 {
        let gens = self.generations.read().unwrap_or_else(PoisonError::into_inner);
        gens.get(account_id).copied().unwrap_or(0)
    }

    /// Replaces the fleet view with the states in the config just applied (call on every config swap).
    /// Local breaker counters are kept; local states newer than the shared ones are kept.
    pub fn sync_shared(&self, states: &[pb::AccountState]) {
        self.sync_shared_at(states, wall_now_ms());
    }

    /// [`Self::sync_shared`] with an explicit clock (unix ms), which decides whether a local state the
    /// fleet has never shown may still be on its way ([`REPORT_GRACE_MS`]).
    pub fn sync_shared_at(&self, states: &[pb::AccountState], now_ms: i64) {
        let mut incoming: HashMap<&str, Vec<pb::AccountState>> = HashMap::new();
        for st in states {
            if st.health != pb::AccountHealth::Unspecified as i32 {
                incoming.entry(st.account_id.as_str()).or_default().push(st.clone());
            }
        }
        let mut map = self.accounts.write().unwrap_or_else(PoisonError::into_inner);
        for id in incoming.keys() {
            if !map.contains_key(*id) {
                map.insert((*id).into(), Mutex::default());
            }
        }
        for (id, slot) in map.iter_mut() {
            let t = slot.get_mut().unwrap_or_else(PoisonError::into_inner);
            t.shared = incoming.remove(id.as_ref()).unwrap_or_default();
            t.reconcile(now_ms);
        }
        map.retain(|_, slot| !slot.get_mut().unwrap_or_else(PoisonError::into_inner).idle());
    }

    /// Whether the account may take a request for `model` now. Considers account-wide and
    /// family-scoped states; expired states count as healthy. Reserves the probe when half-open.
    /// Does not allocate.
    pub fn availability(&self, account_id: &str, model: &str, now_ms: i64) -> Availability {
        let map = self.accounts.read().unwrap_or_else(PoisonError::into_inner);
        match map.get(account_id) {
            None => Availability::Now,
            Some(slot) => lock(slot).availability(model_family(model), now_ms),
        }
    }

    /// Records an attempt's outcome; returns the verdict and, when the account's state CHANGED in a
    /// way the fleet should know, the state to report to the control plane. Any outcome releases the
    /// account's probe. For an attempt sent under the account's current `reset_generation`.
    pub fn observe(
        &self,
        account_id: &str,
        model: &str,
        outcome: &Outcome<'_>,
        settings: &HealthSettings,
        now_ms: i64,
    ) -> (Verdict, Option<pb::AccountState>) {
        self.observe_as_of(account_id, u64::MAX, model, outcome, settings, now_ms)
    }

    /// [`Self::observe`] for an attempt sent under the account's `reset_generation` `sent_at`
    /// (`u64::MAX`: the current one). An answer to a request sent before an operator's reset (or new
    /// credential) changes nothing here and is not reported: it describes what was cleared.
    pub fn observe_as_of(
        &self,
        account_id: &str,
        sent_at: u64,
        model: &str,
        outcome: &Outcome<'_>,
        settings: &HealthSettings,
        now_ms: i64,
    ) -> (Verdict, Option<pb::AccountState>) {
        let plan = classify(outcome, model, settings, now_ms);
        let verdict = plan.verdict.clone();
        // The generation is read while the accounts lock is held: `sync_at` clears an account
        // under the write lock after publishing its new generation, so a state set here is
        // either seen as stale now or cleared by that sync (never left behind).
        let current = |reg: &Self| {
            let g = reg.generation(account_id);
            (g, sent_at != u64::MAX && sent_at < g)
        };
        let stamp = |generation: u64| {
            move |mut st: pb::AccountState| {
                st.reset_generation = generation;
                st
            }
        };
        {
            let map = self.accounts.read().unwrap_or_else(PoisonError::into_inner);
            let (generation, stale) = current(self);
            if stale {
                if let Some(slot) = map.get(account_id) {
                    lock(slot).breaker.probe_until_ms = 0;
                }
                return (verdict, None);
            }
            if let Some(slot) = map.get(account_id) {
                let report = lock(slot).apply(plan, account_id, &self.node_id, settings, now_ms);
                return (verdict, report.map(stamp(generation)));
            }
            if !plan.changes_state() {
                return (verdict, None);
            }
        }
        let mut map = self.accounts.write().unwrap_or_else(PoisonError::into_inner);
        let (generation, stale) = current(self);
        if stale {
            return (verdict, None);
        }
        let slot = map.entry(account_id.into()).or_default();
        let report = slot.get_mut().unwrap_or_else(PoisonError::into_inner).apply(
            plan,
            account_id,
            &self.node_id,
            settings,
            now_ms,
        );
        (verdict, report.map(stamp(generation)))
    }

    /// A successful answer's headers: unified utilization tracking, and the breaker closes (when
    /// half-open) or its count restarts. Returns a state to report if the account just crossed the
    /// unified threshold. A thin wrapper over [`Self::observe`] with status 200.
    pub fn on_success(
        &self,
        account_id: &str,
        model: &str,
        headers: &HeaderMap,
        settings: &HealthSettings,
        now_ms: i64,
    ) -> Option<pb::AccountState> {
        let outcome = Outcome::Response {
            status: 200,
            headers,
            body: &[],
        };
        self.observe(account_id, model, &outcome, settings, now_ms).1
    }

    /// The attempt that got [`Availability::Probe`] was abandoned before any outcome (e.g. the client
    /// went away): the next caller may probe.
    pub fn release_probe(&self, account_id: &str) {
        let map = self.accounts.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = map.get(account_id) {
            lock(slot).breaker.probe_until_ms = 0;
        }
    }

    /// The current local+shared view, for diagnostics and tests: one state per (account, scope), the
    /// most restrictive live one; an open breaker shows as ERRORING. Sorted by account and scope.
    pub fn states(&self, now_ms: i64) -> Vec<pb::AccountState> {
        let mut out: BTreeMap<(String, String), pb::AccountState> = BTreeMap::new();
        let mut merge = |st: pb::AccountState| {
            let key = (st.account_id.clone(), st.scope.clone());
            match out.get(&key) {
                Some(have) if !outranks(&st, have) => {}
                _ => {
                    out.insert(key, st);
                }
            }
        };
        let map = self.accounts.read().unwrap_or_else(PoisonError::into_inner);
        for (id, slot) in map.iter() {
            let t = lock(slot);
            for st in t.known().filter(|st| is_live(st, now_ms)) {
                merge(st.clone());
            }
            let b = &t.breaker;
            if b.open && now_ms < b.open_until_ms {
                merge(state(
                    id,
                    &self.node_id,
                    pb::AccountHealth::Erroring,
                    "",
                    b.open_until_ms,
                    b.reason.clone(),
                    b.opened_ms,
                ));
            }
        }
        out.into_values().collect()
    }
}
