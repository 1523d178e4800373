//! Fleet-state merging: everything known about one account ([`Tracked`]): the states observed
//! here (one per scope, to be reported), the fleet's shared states from the last config, and the
//! local breaker; which local states survive a new fleet view, whether a new state is worth
//! recording, and whether the account may take a request now ([`Availability`]).

use super::breaker::Breaker;
use super::classify::{BreakerEvent, NewState, Plan};
use super::settings::HealthSettings;
use relay_proto::v1 as pb;

/// Whether an account may take a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    Now,
    /// Half-open breaker: this caller may send the one probe (it has been reserved for them; its
    /// outcome goes to `observe`, or `release_probe` if the attempt is abandoned).
    Probe,
    /// Not before this time (unix ms).
    At(i64),
    /// Not until the fleet view clears the state (operator reset, credential change).
    Never,
}

/// How long a local state the fleet has never shown survives a config swap that lacks it (its report
/// may still be on its way to the control plane).
pub const REPORT_GRACE_MS: i64 = 5_000;
/// The shortest timed state by default (`cooldown.min_ms`): a reset in the past (clock skew) still
/// keeps the account out this long. Also the breaker's shortest probe interval.
pub(super) const MIN_STATE_MS: i64 = 1_000;
/// A new timed state is worth reporting only if it ends later than the known one by more than this
/// (the control plane's own tolerance).
pub(super) const MATERIAL_MS: i64 = 1_000;

#[derive(Debug)]
pub(super) struct LocalState {
    pub(super) state: pb::AccountState,
    /// The fleet view has shown a state for this account and scope since this one was set.
    pub(super) acked: bool,
}

/// Everything known about one account.
#[derive(Debug, Default)]
pub(super) struct Tracked {
    /// Observed here, one per scope.
    pub(super) local: Vec<LocalState>,
    /// The fleet's view, from the last config.
    pub(super) shared: Vec<pb::AccountState>,
    pub(super) breaker: Breaker,
}

pub(super) fn is_live(st: &pb::AccountState, now: i64) -> bool {
    st.health != pb::AccountHealth::Unspecified as i32 && (st.until_ms == 0 || st.until_ms > now)
}

/// Whether a known state makes a new one (same scope) not worth recording or reporting.
pub(super) fn dominates(known: &pb::AccountState, health: pb::AccountHealth, until: i64, now: i64) -> bool {
    if !is_live(known, now) {
        return false;
    }
    if known.until_ms == 0 {
        return until != 0 || known.health == health as i32;
    }
    until != 0 && until <= known.until_ms.saturating_add(MATERIAL_MS)
}

/// Whether `a` restricts more than `b` (same account and scope).
pub(super) fn outranks(a: &pb::AccountState, b: &pb::AccountState) -> bool {
    match (a.until_ms, b.until_ms) {
        (_, 0) => false,
        (0, _) => true,
        (x, y) => x > y,
    }
}

impl Tracked {
    pub(super) fn idle(&self) -> bool {
        self.local.is_empty() && self.shared.is_empty() && self.breaker.idle()
    }

    pub(super) fn availability(&mut self, family: &str, now: i64) -> Availability {
        let mut until = i64::MIN;
        for st in self.local.iter().map(|l| &l.state).chain(self.shared.iter()) {
            if st.health == pb::AccountHealth::Unspecified as i32
                || !(st.scope.is_empty() || st.scope.eq_ignore_ascii_case(family))
            {
                continue;
            }
            if st.until_ms == 0 {
                return Availability::Never;
            }
            if st.until_ms > now {
                until = until.max(st.until_ms);
            }
        }
        let b = &mut self.breaker;
        if b.open {
            if now < b.open_until_ms {
                until = until.max(b.open_until_ms);
            } else if until == i64::MIN {
                if b.probe_until_ms > now {
                    return Availability::At(b.probe_until_ms);
                }
                b.probe_until_ms = now.saturating_add(b.cooldown_ms.max(MIN_STATE_MS));
                return Availability::Probe;
            }
        }
        if until == i64::MIN {
            Availability::Now
        } else {
            Availability::At(until)
        }
    }

    pub(super) fn apply(
        &mut self,
        plan: Plan,
        account_id: &str,
        node_id: &str,
        s: &HealthSettings,
        now: i64,
    ) -> Option<pb::AccountState> {
        self.local.retain(|l| is_live(&l.state, now));
        let mut report = None;
        match &plan.breaker {
            BreakerEvent::Nothing => {}
            BreakerEvent::Success => self.breaker.on_success(now),
            BreakerEvent::Failure(what) => {
                if let Some(reason) = self.breaker.on_failure(what, s, now) {
                    let until = self.breaker.open_until_ms;
                    let known = self
                        .known()
                        .any(|k| k.scope.is_empty() && dominates(k, pb::AccountHealth::Erroring, until, now));
                    if !known {
                        let st = state(account_id, node_id, pb::AccountHealth::Erroring, "", until, reason, now);
                        prefer(&mut report, st);
                    }
                }
            }
        }
        // Any outcome ends the probe this account may have handed out.
        self.breaker.probe_until_ms = 0;
        for new in plan.states.into_iter().flatten() {
            if let Some(st) = self.set_local(new, account_id, node_id, now) {
                prefer(&mut report, st);
            }
        }
        report
    }

    pub(super) fn known(&self) -> impl Iterator<Item = &pb::AccountState> {
        self.local.iter().map(|l| &l.state).chain(self.shared.iter())
    }

    pub(super) fn set_local(
        &mut self,
        new: NewState,
        account_id: &str,
        node_id: &str,
        now: i64,
    ) -> Option<pb::AccountState> {
        if self
            .known()
            .any(|k| k.scope == new.scope && dominates(k, new.health, new.until_ms, now))
        {
            return None;
        }
        let st = state(
            account_id,
            node_id,
            new.health,
            new.scope,
            new.until_ms,
            new.reason,
            now,
        );
        let entry = LocalState {
            state: st.clone(),
            acked: false,
        };
        match self.local.iter_mut().find(|l| l.state.scope == new.scope) {
            Some(l) => *l = entry,
            None => self.local.push(entry),
        }
        Some(st)
    }

    /// After `shared` was replaced: which local states to keep (see the module doc).
    pub(super) fn reconcile(&mut self, now: i64) {
        let Tracked { local, shared, .. } = self;
        local.retain_mut(|l| {
            if !is_live(&l.state, now) {
                return false;
            }
            match shared.iter().find(|s| s.scope == l.state.scope) {
                Some(s) => {
                    l.acked = true;
                    l.state.since_ms > s.since_ms
                }
                None => !l.acked && now.saturating_sub(l.state.since_ms) < REPORT_GRACE_MS,
            }
        });
    }
}

pub(super) fn state(
    account_id: &str,
    node_id: &str,
    health: pb::AccountHealth,
    scope: &str,
    until_ms: i64,
    reason: String,
    now: i64,
) -> pb::AccountState {
    pb::AccountState {
        account_id: account_id.to_string(),
        health: health as i32,
        reason,
        until_ms,
        scope: scope.to_string(),
        since_ms: now,
        reported_by: node_id.to_string(),
        reset_generation: 0,
    }
}

/// Of two reports from one outcome, the account-wide one wins; else the later.
pub(super) fn prefer(report: &mut Option<pb::AccountState>, new: pb::AccountState) {
    if report
        .as_ref()
        .is_some_and(|r| r.scope.is_empty() && !new.scope.is_empty())
    {
        return;
    }
    *report = Some(new);
}
