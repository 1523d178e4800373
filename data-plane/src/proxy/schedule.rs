//! Scheduling stage: which account an attempt goes to and when. [`Scheduler::choose`] walks the
//! key's route (its group, then its fallbacks), priority tier by tier, the sticky session's
//! account first, the balancer's pick within a tier, and takes a concurrency slot;
//! [`Scheduler::acquire`] adds the fleet-wide slot and, when nothing is available now, the
//! bounded wait queue (for a cooldown's end, a free slot, or suspended for a recovery), checking
//! the key again against every newer config while it waits.

use super::admission::authenticate;
use super::balance::{Balancer, SlotGuard};
use super::groups::GroupCooling;
use super::health::{Availability, HealthRegistry};
use super::{not_ours, policy::Policy, Proxy};
use crate::control::state::{AccountEntry, ConfigHolder, KeyEntry, ServingConfig};
use crate::errors::ApiError;
use http::HeaderMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a request waiting for an account whose fleet-wide slots are all taken looks again.
const FLEET_SLOT_POLL_MS: i64 = 50;

/// How often a request suspended for a recovery looks again (a new config wakes it at once).
const SUSPENDED_POLL_MS: i64 = 250;

/// The longest a count_tokens request waits for an account (its answer otherwise is relay's estimate).
const COUNT_TOKENS_MAX_WAIT: Duration = Duration::from_secs(2);

/// What scheduling works with: the config holder (newer configs while waiting), the balancer
/// (slots, the pick), account health, the fleet-wide limiter (account slots), group cooldowns
/// and the wait queue's length.
pub(super) struct Scheduler<'a> {
    pub(super) holder: &'a ConfigHolder,
    pub(super) balancer: &'a Balancer,
    pub(super) health: &'a HealthRegistry,
    pub(super) limiter: &'a Arc<relay_limits::Limiter>,
    pub(super) groups: &'a GroupCooling,
    pub(super) queued: &'a AtomicUsize,
}

impl Proxy {
    pub(super) fn scheduler(&self) -> Scheduler<'_> {
        Scheduler {
            holder: &self.holder,
            balancer: &self.balancer,
            health: &self.health,
            limiter: &self.limiter,
            groups: &self.groups,
            queued: &self.queued,
        }
    }
}

/// What a request wants of scheduling: an account for this key and model, under this config
/// (and the policy of the config it was admitted under).
#[derive(Clone, Copy)]
pub(super) struct Want<'a> {
    pub(super) cfg: &'a Arc<ServingConfig>,
    pub(super) key: &'a Arc<KeyEntry>,
    pub(super) model: &'a str,
    /// The client's headers (its key is checked again against a newer config).
    pub(super) headers: &'a HeaderMap,
    pub(super) policy: &'a Policy,
    pub(super) is_messages: bool,
}

impl Scheduler<'_> {
    /// When some account that may serve the key (its group's and its fallback groups', as
    /// `choose` routes them) will be available again, in seconds (at least 1); None when no
    /// account's return is known.
    pub(super) fn retry_after_hint(&self, ctx: &Want<'_>) -> Option<u64> {
        let now = chrono::Utc::now().timestamp_millis();
        let soonest = ctx
            .cfg
            .route_groups(&ctx.key.group_id, |_| false)
            .into_iter()
            .flat_map(|g| ctx.cfg.accounts_of(g).iter())
            .filter_map(|a| match self.health.availability(a.id.as_str(), ctx.model, now) {
                Availability::At(t) => Some(t),
                _ => None,
            })
            .min();
        soonest.map(|t| ((t - now).max(0) as u64).div_ceil(1000).clamp(1, 3600))
    }

    /// An account and a concurrency slot on it, waiting (bounded by `queue.max_wait_ms`, the
    /// deadline and `queue.max_size`) when none is available now: for the soonest known return
    /// or a free slot, and, when nothing is known to return (every untried account of the group
    /// unauthorized, blocked or otherwise out until someone acts), suspended for a recovery: a
    /// new config (an operator's reset or enable, a probe's verdict) or a local success. None:
    /// nothing to try.
    pub(super) async fn acquire(
        &self,
        ctx: &Want<'_>,
        tried: &[String],
        bound: Option<&str>,
        deadline: tokio::time::Instant,
        waited: &mut Waited,
    ) -> Result<Option<(Arc<AccountEntry>, SlotGuard)>, ApiError> {
        // count_tokens waits little: when no account frees up soon, relay answers it with an estimate.
        let max_wait = if ctx.is_messages {
            ctx.policy.queue_max_wait
        } else {
            ctx.policy.queue_max_wait.min(COUNT_TOKENS_MAX_WAIT)
        };
        // The wait is the request's, not each look's: what earlier attempts waited counts.
        let max_wait = max_wait.saturating_sub(Duration::from_millis(waited.ms));
        let wait_until = deadline.min(tokio::time::Instant::now() + max_wait);
        let mut ticket: Option<QueueTicket<'_>> = None;
        // Accounts whose fleet-wide slots (their max_concurrency across every data plane) were
        // all taken when last asked; looked at again after a short wait.
        let mut full: Vec<String> = Vec::new();
        // While suspended, each look is at the newest config (an operator may have acted).
        let mut fresh: Option<Arc<ServingConfig>> = None;
        // The config the key was last checked against.
        let mut checked: Arc<ServingConfig> = ctx.cfg.clone();
        loop {
            // Created before looking, so a release or a new config in between is not missed.
            let released = self.balancer.released();
            let changed = self.holder.changed();
            let now = chrono::Utc::now().timestamp_millis();
            let skip: Vec<String>;
            let excluded = if full.is_empty() {
                tried
            } else {
                skip = tried.iter().chain(full.iter()).cloned().collect();
                &skip
            };
            let looked_at = match &fresh {
                Some(cfg) => Want { cfg, ..*ctx },
                None => *ctx,
            };
            let choice = match self.choose(&looked_at, excluded, bound, now) {
                Choice::Ready(a, mut slot) => {
                    if a.max_concurrency == 0 || !self.limiter.is_shared() {
                        return Ok(Some((a, slot)));
                    }
                    match self.limiter.account_slot(&a.id, u64::from(a.max_concurrency)).await {
                        Some(fleet) => {
                            slot.hold_fleet(fleet);
                            return Ok(Some((a, slot)));
                        }
                        None => {
                            drop(slot);
                            self.health.release_probe(&a.id);
                            full.push(a.id.clone());
                            continue;
                        }
                    }
                }
                // Other data planes hold the slots: they tell nobody here when one frees up.
                Choice::Nothing if !full.is_empty() => Choice::Later(Some(now + FLEET_SLOT_POLL_MS)),
                // Nothing tried yet and accounts that could come back: wait for a recovery.
                Choice::Nothing
                    if tried.is_empty()
                        && looked_at
                            .cfg
                            .route_groups(&ctx.key.group_id, |_| false)
                            .into_iter()
                            .flat_map(|g| looked_at.cfg.accounts_of(g).iter())
                            .any(|a| a.enabled && a.weight > 0) =>
                {
                    Choice::Suspended
                }
                c => c,
            };
            let (at, what) = match choice {
                Choice::Ready(..) | Choice::Nothing => return Ok(None),
                Choice::Later(None) => (None, "slot"),
                Choice::Later(at) => (at, "cooldown"),
                Choice::Suspended => (Some(now + SUSPENDED_POLL_MS), "recovery"),
            };
            full.clear();
            if ticket.is_none() {
                ticket = Some(
                    QueueTicket::take(self.queued, ctx.policy.queue_max_size).ok_or_else(|| {
                        ApiError::overloaded("too many requests are waiting for an upstream account", 1)
                    })?,
                );
            }
            let now_i = tokio::time::Instant::now();
            if now_i >= wait_until {
                return Ok(None);
            }
            let wake = at
                .map(|t| now_i + Duration::from_millis((t - now).max(1) as u64))
                .unwrap_or(wait_until)
                .min(wait_until);
            tokio::select! {
                _ = released => {}
                _ = changed => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
            not_ours(now_i.elapsed());
            waited.what = what;
            waited.ms = waited
                .ms
                .saturating_add(now_i.elapsed().as_millis().try_into().unwrap_or(u64::MAX));
            // Whatever it waited for, the request goes on only as the key now allows: a key
            // revoked, expired, narrowed or moved meanwhile is not served as it was admitted.
            // The key is looked up again only when the config changed (the lookup hashes the
            // presented key, and a release wakes every waiter); its expiry is checked each time.
            if ctx.key.expires_at_ms > 0 && ctx.key.expires_at_ms <= chrono::Utc::now().timestamp_millis() {
                return Err(ApiError::authentication("this API key has expired"));
            }
            let newer = self.holder.get().filter(|cfg| !Arc::ptr_eq(cfg, &checked));
            if let Some(cfg) = newer {
                checked = cfg.clone();
                let key = authenticate(&cfg, ctx.headers)?;
                if key.id != ctx.key.id {
                    return Err(ApiError::authentication("invalid x-api-key"));
                }
                if !key.allows(ctx.model) {
                    return Err(ApiError::permission(format!(
                        "this API key may not use model {}",
                        ctx.model
                    )));
                }
                if key.group_id != ctx.key.group_id {
                    return Err(ApiError::overloaded(
                        "this API key was moved to another group while the request waited; retry it",
                        1,
                    ));
                }
                if matches!(choice, Choice::Suspended) {
                    fresh = Some(cfg);
                }
            }
        }
    }

    /// Groups in their route's order ([`ServingConfig::route_groups`]: the key's group, then its
    /// fallbacks; activated ones first, cooling ones last, paused ones never); within a group,
    /// priority tier first; within a tier the balancer's choice among accounts that are enabled,
    /// healthy, untried and have a free slot. The session's account comes first within its
    /// group when it qualifies. A group found with every enabled account unavailable begins a
    /// cooldown (`groups.cooldown_ms`, see [`groups`]).
    fn choose(&self, ctx: &Want<'_>, tried: &[String], bound: Option<&str>, now: i64) -> Choice {
        let route = ctx
            .cfg
            .route_groups(&ctx.key.group_id, |g| self.groups.is_cooling(g, now));
        let usable = |a: &Arc<AccountEntry>| a.enabled && a.weight > 0 && !tried.contains(&a.id);
        let mut later: Option<i64> = None;
        let mut waiting_for_slot = false;
        for group_id in route {
            let candidates = ctx.cfg.accounts_of(group_id);
            if let Some(id) = bound {
                if let Some(a) = candidates.iter().find(|a| a.id == id && usable(a)) {
                    match self.health.availability(&a.id, ctx.model, now) {
                        Availability::Now | Availability::Probe => match self.balancer.try_acquire(a) {
                            Some(slot) => return Choice::Ready(a.clone(), slot),
                            None => {
                                self.health.release_probe(&a.id);
                            }
                        },
                        _ => {}
                    }
                }
            }
            // Whether every enabled account of the group was looked at and found unavailable.
            let (mut enabled, mut unavailable, mut all_seen) = (0usize, 0usize, true);
            let mut i = 0;
            while i < candidates.len() {
                let priority = candidates[i].priority;
                let tier_end = candidates[i..]
                    .iter()
                    .position(|a| a.priority != priority)
                    .map_or(candidates.len(), |n| i + n);
                let mut ready: Vec<&Arc<AccountEntry>> = Vec::new();
                for a in candidates[i..tier_end].iter().filter(|a| a.enabled && a.weight > 0) {
                    enabled += 1;
                    if !usable(a) {
                        all_seen = false;
                        continue;
                    }
                    match self.health.availability(&a.id, ctx.model, now) {
                        Availability::Now => ready.push(a),
                        Availability::Probe => match self.balancer.try_acquire(a) {
                            // The half-open breaker's one probe goes to this request.
                            Some(slot) => return Choice::Ready(a.clone(), slot),
                            None => {
                                self.health.release_probe(&a.id);
                                waiting_for_slot = true;
                            }
                        },
                        Availability::At(t) => {
                            unavailable += 1;
                            later = Some(later.map_or(t, |l: i64| l.min(t)));
                        }
                        Availability::Never => unavailable += 1,
                    }
                }
                while let Some(a) = self
                    .balancer
                    .pick_with_headroom(&ready, |id| self.health.quotas.headroom(id, now))
                {
                    match self.balancer.try_acquire(a) {
                        Some(slot) => return Choice::Ready(a.clone(), slot),
                        None => {
                            waiting_for_slot = true;
                            let id = a.id.clone();
                            ready.retain(|x| x.id != id);
                        }
                    }
                }
                i = tier_end;
            }
            if enabled > 0 && all_seen && unavailable == enabled {
                let cooldown = u64::try_from(ctx.policy.group_cooldown.as_millis()).unwrap_or(u64::MAX);
                if self.groups.all_failed(ctx.cfg, group_id, now, cooldown) {
                    metrics::counter!(relay_proto::metrics::GROUP_COOLDOWNS_TOTAL).increment(1);
                }
            }
        }
        if later.is_some() || waiting_for_slot {
            Choice::Later(if waiting_for_slot { None } else { later })
        } else {
            Choice::Nothing
        }
    }
}

/// How long a request waited for an account so far, and for what (the last thing it waited for):
/// "slot", "cooldown", "recovery"; "" when it did not wait.
#[derive(Debug, Clone, Copy, Default)]
pub struct Waited {
    pub ms: u64,
    pub what: &'static str,
}

pub(super) enum Choice {
    Ready(Arc<AccountEntry>, SlotGuard),
    /// Nothing now; maybe at this time (None: when a slot frees up).
    Later(Option<i64>),
    /// Nothing now, nor known to come back: waiting for a recovery.
    Suspended,
    Nothing,
}

/// A place in the bounded wait queue; leaves it when dropped.
struct QueueTicket<'a>(&'a AtomicUsize, Instant);

impl<'a> QueueTicket<'a> {
    fn take(counter: &'a AtomicUsize, max: usize) -> Option<Self> {
        let prev = counter.fetch_add(1, Ordering::AcqRel);
        if prev >= max {
            counter.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        metrics::gauge!(relay_proto::metrics::QUEUE_LENGTH).increment(1.0);
        Some(Self(counter, Instant::now()))
    }
}

impl Drop for QueueTicket<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!(relay_proto::metrics::QUEUE_LENGTH).decrement(1.0);
        metrics::histogram!(relay_proto::metrics::QUEUE_WAIT_SECONDS).record(self.1.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
#[path = "schedule_tests.rs"]
mod tests;
