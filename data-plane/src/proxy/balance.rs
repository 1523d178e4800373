//! Load-aware choice among healthy accounts, and concurrency slots.
//!
//! One [`Balancer`] per data plane keeps, for every account it has seen, two
//! live numbers, both plain atomics:
//!
//! - **outstanding**: requests holding a [`SlotGuard`] on the account (taken
//!   with [`Balancer::try_acquire`], which also enforces
//!   `AccountEntry::max_concurrency`, exactly, with a compare-and-swap loop);
//! - **peak-EWMA latency** (as in Finagle and linkerd): the time to the
//!   response head or first event, reported by the caller through
//!   [`SlotGuard::observe_latency`]. A sample above the current estimate
//!   replaces it at once (the estimate is pessimistic: it reacts to a slow
//!   account immediately); a lower one is blended in with weight
//!   `1 - exp(-elapsed / tau)` (`tau` = 10 s), so it recovers gradually. When an
//!   account gets no traffic its estimate decays toward zero as it is read, so
//!   an account that was slow once is probed again after a while instead of
//!   being starved forever.
//!
//! [`Balancer::pick`] is the power of two choices: two distinct accounts of
//! the tier drawn at random with probability proportional to their weight,
//! and the one with the lower `cost = latency * (1 + outstanding / weight)`
//! wins (ties go to the first drawn). Latencies within a factor of two of each
//! other count as equal, so the weighted draw sets the traffic shares of
//! similar accounts (idle or not: outstanding requests settle in proportion
//! to the weights), and only a clearly slower account (twice the latency)
//! yields its share to a faster one. An account without a latency sample yet
//! is costed at the median of the tier's estimates (or a neutral default when
//! no account of the tier has one), so new accounts get traffic.
//!
//! The request path takes no lock here: the per-account state lives in a
//! copy-on-write map (`arc_swap`), replaced under a mutex only the first time
//! an account is seen. State of accounts removed from the config stays (a
//! few dozen bytes each) and is reused if the id comes back.

use crate::control::state::AccountEntry;
use arc_swap::ArcSwap;
use rand::Rng;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Time constant of the latency EWMA.
const TAU_NS: f64 = 10e9;
/// Latency assumed for a tier where no account has a sample yet. Any positive
/// value works: it is only ever compared with itself.
const NEUTRAL_LATENCY_NS: f64 = 1e9;
/// Estimates never go below this (a zero would erase the outstanding count
/// from the cost).
const FLOOR_NS: f64 = 1e3;
/// Latency estimates closer than this factor are treated as equal (see [`Balancer::pick`]).
const LATENCY_TOLERANCE: f64 = 2.0;
/// How many sampled accounts of a tier the median is taken over (a stack buffer: no allocation).
const MEDIAN_SAMPLE: usize = 32;

/// Live load of one account.
#[derive(Debug)]
struct Load {
    id: Box<str>,
    outstanding: AtomicU32,
    /// f64 bits of the peak-EWMA latency in nanoseconds; 0.0 means no sample yet.
    ewma: AtomicU64,
    /// When `ewma` was last updated, in nanoseconds since the balancer's epoch.
    stamp: AtomicU64,
}

impl Load {
    fn new(id: &str) -> Self {
        Self {
            id: id.into(),
            outstanding: AtomicU32::new(0),
            ewma: AtomicU64::new(0f64.to_bits()),
            stamp: AtomicU64::new(0),
        }
    }

    /// Records a latency sample (peak-EWMA). Lock-free: the estimate is
    /// updated with a CAS loop; the timestamp is a separate atomic, so a
    /// concurrent update may use a slightly stale elapsed time, which only
    /// shifts one blend weight a little.
    fn observe(&self, sample_ns: f64, now: u64) {
        let sample = if sample_ns.is_finite() {
            sample_ns.max(FLOOR_NS)
        } else {
            FLOOR_NS
        };
        let mut cur = self.ewma.load(Ordering::Acquire);
        loop {
            let old = f64::from_bits(cur);
            let new = if old <= 0.0 || sample > old {
                sample
            } else {
                let elapsed = now.saturating_sub(self.stamp.load(Ordering::Acquire)) as f64;
                let w = (-elapsed / TAU_NS).exp();
                old * w + sample * (1.0 - w)
            };
            match self
                .ewma
                .compare_exchange_weak(cur, new.to_bits(), Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
        self.stamp.fetch_max(now, Ordering::AcqRel);
    }

    /// The estimate at `now` (decayed toward zero since its last update, not
    /// below the floor), or None without a sample.
    fn estimate(&self, now: u64) -> Option<f64> {
        let v = f64::from_bits(self.ewma.load(Ordering::Acquire));
        if v <= 0.0 {
            return None;
        }
        let elapsed = now.saturating_sub(self.stamp.load(Ordering::Acquire)) as f64;
        Some((v * (-elapsed / TAU_NS).exp()).max(FLOOR_NS))
    }
}

#[derive(Debug)]
struct Inner {
    loads: ArcSwap<HashMap<Box<str>, Arc<Load>>>,
    /// Serialises the (rare) copy-on-write insertions into `loads`.
    insert: Mutex<()>,
    total: AtomicU64,
    released: tokio::sync::Notify,
    epoch: Instant,
}

impl Inner {
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn load_of(&self, id: &str) -> Arc<Load> {
        if let Some(l) = self.loads.load().get(id) {
            return Arc::clone(l);
        }
        let _serial = self.insert.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.loads.load_full();
        if let Some(l) = current.get(id) {
            return Arc::clone(l);
        }
        let load = Arc::new(Load::new(id));
        let mut next = HashMap::clone(&current);
        next.insert(id.into(), Arc::clone(&load));
        self.loads.store(Arc::new(next));
        load
    }
}

/// Per-account live load: outstanding requests and a peak-EWMA of latency
/// (the time to the response head / first event, reported by the caller).
/// `Send + Sync`; share one per data plane behind an `Arc`.
#[derive(Debug)]
pub struct Balancer {
    inner: Arc<Inner>,
}

impl Default for Balancer {
    fn default() -> Self {
        Self::new()
    }
}

impl Balancer {
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                loads: ArcSwap::from_pointee(HashMap::new()),
                insert: Mutex::new(()),
                total: AtomicU64::new(0),
                released: tokio::sync::Notify::new(),
                epoch: Instant::now(),
            }),
        }
    }

    /// Power of two choices among `tier` (the usable accounts of one priority
    /// tier): two distinct accounts drawn with probability proportional to
    /// their weight, the one with the lower
    /// `cost = latency * (outstanding + 1) / weight` returned. One account:
    /// it. Empty: None. No allocation, no lock.
    pub fn pick<'a>(&self, tier: &[&'a Arc<AccountEntry>]) -> Option<&'a Arc<AccountEntry>> {
        self.pick_at(tier, &mut rand::thread_rng(), self.inner.now(), |_| 1.0)
    }

    /// [`Self::pick`] weighing each account's `headroom` (0..=1: the share of its subscription quota
    /// left, 1 when unknown): its weight is scaled by it and its cost divided by it, so within a
    /// tier a pool of subscription accounts drains evenly rather than one account at a time.
    pub fn pick_with_headroom<'a>(
        &self,
        tier: &[&'a Arc<AccountEntry>],
        headroom: impl Fn(&str) -> f64,
    ) -> Option<&'a Arc<AccountEntry>> {
        self.pick_at(tier, &mut rand::thread_rng(), self.inner.now(), headroom)
    }

    fn pick_at<'a, R: Rng + ?Sized>(
        &self,
        tier: &[&'a Arc<AccountEntry>],
        rng: &mut R,
        now: u64,
        headroom: impl Fn(&str) -> f64,
    ) -> Option<&'a Arc<AccountEntry>> {
        match tier {
            [] => return None,
            [only] => return Some(only),
            _ => {}
        }
        let share = |a: &AccountEntry| {
            let h = headroom(&a.id);
            if h.is_finite() {
                h.clamp(0.001, 1.0)
            } else {
                1.0
            }
        };
        // Weights in thousandths, scaled by headroom; never below one thousandth.
        let weight = |a: &AccountEntry| ((f64::from(a.weight.max(1)) * 1000.0 * share(a)) as u64).max(1);
        let total: u64 = tier.iter().map(|a| weight(a)).sum();
        let i = weighted_index(tier, rng.gen_range(0..total), None, weight);
        let j = weighted_index(tier, rng.gen_range(0..total - weight(tier[i])), Some(i), weight);
        let (a, b) = (tier[i], tier[j]);

        let loads = self.inner.loads.load();
        let (la, lb) = (loads.get(a.id.as_str()), loads.get(b.id.as_str()));
        let (ea, eb) = (la.and_then(|l| l.estimate(now)), lb.and_then(|l| l.estimate(now)));
        let default = if ea.is_none() || eb.is_none() {
            median_estimate(tier, &loads, now)
        } else {
            NEUTRAL_LATENCY_NS
        };
        // Latencies within LATENCY_TOLERANCE of each other count as equal: weights then set the
        // shares (an upstream's times vary more than that from call to call); only an account
        // clearly slower loses its share to a faster one.
        let (xa, xb) = (ea.unwrap_or(default), eb.unwrap_or(default));
        let (ea, eb) = if xa.max(xb) <= xa.min(xb) * LATENCY_TOLERANCE {
            (Some(1.0), Some(1.0))
        } else {
            (Some(xa), Some(xb))
        };
        let cost = |acct: &AccountEntry, load: Option<&Arc<Load>>, est: Option<f64>| {
            let outstanding = load.map_or(0, |l| l.outstanding.load(Ordering::Relaxed));
            // Outstanding per unit of weight: at equal latency, accounts whose
            // load is in proportion to their weights cost the same.
            // Less headroom costs more: an account with a tenth of its subscription quota left
            // must be ten times faster to be preferred to one with all of it.
            est.unwrap_or(default) * (1.0 + f64::from(outstanding) * 1000.0 / weight(acct) as f64) / share(acct)
        };
        // `a` was drawn by weight, so with equal costs (idle, equally fast
        // accounts) weights set the traffic shares exactly; `b` takes over
        // only when `a` is slower or busier for its weight.
        if cost(b, lb, eb) < cost(a, la, ea) {
            Some(b)
        } else {
            Some(a)
        }
    }

    /// Takes a concurrency slot on the account, honouring
    /// `account.max_concurrency` (0 = unlimited) exactly, even under
    /// contention. None when the account is full. The guard counts as
    /// outstanding while alive and releases its slot when dropped.
    pub fn try_acquire(&self, account: &AccountEntry) -> Option<SlotGuard> {
        let load = self.inner.load_of(&account.id);
        let max = account.max_concurrency;
        if max == 0 {
            load.outstanding.fetch_add(1, Ordering::AcqRel);
        } else {
            let mut cur = load.outstanding.load(Ordering::Acquire);
            loop {
                if cur >= max {
                    return None;
                }
                match load
                    .outstanding
                    .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
                {
                    Ok(_) => break,
                    Err(actual) => cur = actual,
                }
            }
        }
        self.inner.total.fetch_add(1, Ordering::AcqRel);
        Some(SlotGuard {
            inner: Arc::clone(&self.inner),
            load,
            fleet: None,
        })
    }

    /// Resolves when any slot is released, for requests waiting for capacity.
    ///
    /// To not miss a release, create this future **before** re-checking
    /// availability: a release that happens after its creation wakes it, even
    /// if it has not been polled yet; one that happened before does not.
    ///
    /// ```text
    /// loop {
    ///     let released = balancer.released();
    ///     if let Some(slot) = balancer.try_acquire(&account) {
    ///         break slot;
    ///     }
    ///     tokio::time::timeout_at(deadline, released).await?;
    /// }
    /// ```
    ///
    /// Every release wakes every waiter (each re-checks its own accounts).
    pub fn released(&self) -> tokio::sync::futures::Notified<'_> {
        self.inner.released.notified()
    }

    /// Requests holding a slot on an account.
    pub fn outstanding(&self, account_id: &str) -> u32 {
        self.inner
            .loads
            .load()
            .get(account_id)
            .map_or(0, |l| l.outstanding.load(Ordering::Acquire))
    }

    /// Requests holding a slot, across accounts.
    pub fn outstanding_total(&self) -> u64 {
        self.inner.total.load(Ordering::Acquire)
    }
}

/// The index drawn by `roll` (in `0..total weight`, excluding `skip`'s weight).
fn weighted_index(
    tier: &[&Arc<AccountEntry>],
    mut roll: u64,
    skip: Option<usize>,
    weight: impl Fn(&AccountEntry) -> u64,
) -> usize {
    let mut last = 0;
    for (k, a) in tier.iter().enumerate() {
        if Some(k) == skip {
            continue;
        }
        last = k;
        let w = weight(a);
        if roll < w {
            return k;
        }
        roll -= w;
    }
    last
}

/// The median latency estimate of the tier's sampled accounts (over at most
/// `MEDIAN_SAMPLE` of them), or the neutral default when none has a sample.
fn median_estimate(tier: &[&Arc<AccountEntry>], loads: &HashMap<Box<str>, Arc<Load>>, now: u64) -> f64 {
    let mut buf = [0f64; MEDIAN_SAMPLE];
    let mut n = 0;
    for a in tier {
        if n == MEDIAN_SAMPLE {
            break;
        }
        if let Some(e) = loads.get(a.id.as_str()).and_then(|l| l.estimate(now)) {
            buf[n] = e;
            n += 1;
        }
    }
    if n == 0 {
        return NEUTRAL_LATENCY_NS;
    }
    let s = &mut buf[..n];
    s.sort_unstable_by(f64::total_cmp);
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// A concurrency slot on one account. Releases the slot when dropped,
/// however the request ends: completed, client gone (the future dropped),
/// upstream error, timeout, or a panic unwinding through the task holding it.
#[derive(Debug)]
pub struct SlotGuard {
    inner: Arc<Inner>,
    load: Arc<Load>,
    /// The account's fleet-wide slot (a lease in Redis), released with this one.
    fleet: Option<Box<relay_limits::Charge>>,
}

impl SlotGuard {
    /// Holds the account's fleet-wide slot for as long as this one.
    pub fn hold_fleet(&mut self, c: relay_limits::Charge) {
        self.fleet = Some(Box::new(c));
    }

    /// Reports the time to the response head (or first event) of the request
    /// holding this slot.
    pub fn observe_latency(&self, d: Duration) {
        self.load.observe(d.as_nanos() as f64, self.inner.now());
    }

    pub fn account_id(&self) -> &str {
        &self.load.id
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.load.outstanding.fetch_sub(1, Ordering::AcqRel);
        self.inner.total.fetch_sub(1, Ordering::AcqRel);
        self.inner.released.notify_waiters();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::control::state::AccountKind;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use std::collections::VecDeque;

    fn acct(id: &str, weight: u32, max_concurrency: u32) -> Arc<AccountEntry> {
        Arc::new(AccountEntry {
            id: id.into(),
            name: id.into(),
            kind: AccountKind::ApiKey,
            base_url: "http://x".into(),
            credential: http::HeaderValue::from_static("k"),
            bearer: http::HeaderValue::from_static("Bearer k"),
            priority: 0,
            weight,
            enabled: true,
            max_concurrency,
            proxy: None,
            reset_generation: 0,
        })
    }

    const MS: u64 = 1_000_000;

    fn observe(b: &Balancer, a: &AccountEntry, ms: u64, now: u64) {
        b.inner.load_of(&a.id).observe((ms * MS) as f64, now);
    }

    /// A closed loop: `in_flight` requests outstanding at all times (each pick
    /// takes a slot, the oldest is released), every account answering with
    /// the given latency. Returns picks per account id.
    fn closed_loop(
        b: &Balancer,
        accounts: &[(Arc<AccountEntry>, u64)],
        in_flight: usize,
        picks: usize,
    ) -> HashMap<String, usize> {
        let tier: Vec<&Arc<AccountEntry>> = accounts.iter().map(|(a, _)| a).collect();
        let mut rng = StdRng::seed_from_u64(7);
        let mut held = VecDeque::new();
        let mut counts = HashMap::new();
        let mut now = 1_000 * MS;
        for _ in 0..picks {
            now += MS;
            let a = b.pick_at(&tier, &mut rng, now, |_| 1.0).unwrap();
            *counts.entry(a.id.clone()).or_insert(0) += 1;
            let latency = accounts.iter().find(|(x, _)| x.id == a.id).unwrap().1;
            if latency > 0 {
                observe(b, a, latency, now);
            }
            held.push_back(b.try_acquire(a).unwrap());
            if held.len() > in_flight {
                held.pop_front();
            }
        }
        drop(held);
        assert_eq!(b.outstanding_total(), 0);
        counts
    }

    #[test]
    fn empty_and_single() {
        let b = Balancer::new();
        assert!(b.pick(&[]).is_none());
        let a = acct("a", 1, 0);
        assert_eq!(b.pick(&[&a]).unwrap().id, "a");
    }

    #[test]
    fn slower_account_gets_markedly_fewer_picks() {
        let b = Balancer::new();
        let (slow, fast) = (acct("slow", 1, 0), acct("fast", 1, 0));
        let counts = closed_loop(&b, &[(slow, 1000), (fast, 100)], 32, 10_000);
        let share = counts.get("slow").copied().unwrap_or(0) as f64 / 10_000.0;
        assert!(share < 0.2, "slow account share {share}, counts {counts:?}");

        // Sequential picks with nothing in flight: the faster one always wins.
        let b = Balancer::new();
        let (slow, fast) = (acct("slow", 1, 0), acct("fast", 1, 0));
        observe(&b, &slow, 1000, 1);
        observe(&b, &fast, 100, 1);
        let tier = [&slow, &fast];
        let slow_picks = (0..10_000).filter(|_| b.pick(&tier).unwrap().id == "slow").count();
        assert!(slow_picks < 500, "{slow_picks}");
    }

    #[test]
    fn busier_account_gets_fewer_picks() {
        let b = Balancer::new();
        let (busy, idle) = (acct("busy", 1, 0), acct("idle", 1, 0));
        observe(&b, &busy, 100, 1);
        observe(&b, &idle, 100, 1);
        let _held: Vec<_> = (0..3).map(|_| b.try_acquire(&busy).unwrap()).collect();
        let tier = [&busy, &idle];
        assert!((0..1000).all(|_| b.pick(&tier).unwrap().id == "idle"));
    }

    #[test]
    fn weights_respected_when_loads_are_equal() {
        let b = Balancer::new();
        let (heavy, light) = (acct("heavy", 3, 0), acct("light", 1, 0));
        let counts = closed_loop(&b, &[(heavy, 100), (light, 100)], 64, 20_000);
        let ratio = counts["heavy"] as f64 / counts["light"] as f64;
        assert!((2.5..3.6).contains(&ratio), "3:1 weights gave {counts:?}");

        // Without latency samples at all (new accounts), the same.
        let b = Balancer::new();
        let (heavy, light) = (acct("heavy", 3, 0), acct("light", 1, 0));
        let counts = closed_loop(&b, &[(heavy, 0), (light, 0)], 64, 20_000);
        let ratio = counts["heavy"] as f64 / counts["light"] as f64;
        assert!((2.5..3.6).contains(&ratio), "3:1 weights gave {counts:?}");
    }

    #[test]
    fn more_headroom_wins_within_a_tier_unless_it_is_much_slower() {
        // Equally fast accounts: the one with more of its subscription quota left takes the
        // requests, until it is down to the other's level (the pool drains evenly).
        let b = Balancer::new();
        let (fresh, spent) = (acct("fresh", 1, 0), acct("spent", 1, 0));
        let tier = [&fresh, &spent];
        let headroom = |id: &str| if id == "fresh" { 0.9 } else { 0.3 };
        let fresh_picks = (0..10_000)
            .filter(|_| b.pick_with_headroom(&tier, headroom).unwrap().id == "fresh")
            .count();
        assert_eq!(fresh_picks, 10_000);
        observe(&b, &fresh, 100, 1);
        observe(&b, &spent, 100, 1);
        assert!((0..1000).all(|_| b.pick_with_headroom(&tier, headroom).unwrap().id == "fresh"));
        // Equal headroom: weights and load as ever.
        let even = (0..20_000)
            .filter(|_| b.pick_with_headroom(&tier, |_| 0.5).unwrap().id == "fresh")
            .count();
        assert!((9_000..11_000).contains(&even), "{even}");
        // Less headroom is outweighed only by far lower latency (here 20x for 3x the headroom).
        let b = Balancer::new();
        observe(&b, &fresh, 1000, 1);
        observe(&b, &spent, 50, 1);
        assert!((0..1000).all(|_| b.pick_with_headroom(&tier, headroom).unwrap().id == "spent"));
    }

    #[test]
    fn weights_set_shares_for_one_request_at_a_time() {
        // Idle, equally fast accounts: a request at a time still splits 3:1.
        let b = Balancer::new();
        let (heavy, light) = (acct("heavy", 3, 0), acct("light", 1, 0));
        observe(&b, &heavy, 100, 1);
        observe(&b, &light, 100, 1);
        let tier = [&heavy, &light];
        let heavy_picks = (0..20_000).filter(|_| b.pick(&tier).unwrap().id == "heavy").count();
        let ratio = heavy_picks as f64 / (20_000 - heavy_picks) as f64;
        assert!((2.6..3.5).contains(&ratio), "3:1 weights gave {ratio}");
    }

    #[test]
    fn weighted_draw_of_two_distinct() {
        // Four accounts of equal weight and equal cost (no samples, nothing
        // outstanding): every ordered pair is equally likely and ties go to the
        // first drawn, so picks are uniform, and never the same account twice
        // in one draw (which would bias nothing here, but is checked by the
        // absence of an out-of-range index).
        let b = Balancer::new();
        let accounts: Vec<_> = ["a", "b", "c", "d"].iter().map(|id| acct(id, 1, 0)).collect();
        let tier: Vec<&Arc<AccountEntry>> = accounts.iter().collect();
        let mut rng = StdRng::seed_from_u64(1);
        let mut counts = HashMap::new();
        for _ in 0..8000 {
            *counts
                .entry(b.pick_at(&tier, &mut rng, 1, |_| 1.0).unwrap().id.clone())
                .or_insert(0) += 1;
        }
        for id in ["a", "b", "c", "d"] {
            assert!((1600..2400).contains(&counts[id]), "{counts:?}");
        }
    }

    #[test]
    fn new_account_gets_traffic_at_the_tier_median() {
        let b = Balancer::new();
        let (old1, old2, new) = (acct("old1", 1, 0), acct("old2", 1, 0), acct("new", 1, 0));
        observe(&b, &old1, 100, 1);
        observe(&b, &old2, 500, 1);
        let tier = [&old1, &old2, &new];
        let mut rng = StdRng::seed_from_u64(3);
        let mut counts = HashMap::new();
        for _ in 0..3000 {
            *counts
                .entry(b.pick_at(&tier, &mut rng, 1, |_| 1.0).unwrap().id.clone())
                .or_insert(0) += 1;
        }
        // Median 300 ms: "new" is as fast as old2 (500, within 2x: they share) and loses to
        // old1 (100, over 3x faster), which also beats old2 every time.
        let n = |id: &str| counts.get(id).copied().unwrap_or(0);
        assert!(n("new") > 300, "{counts:?}");
        assert!(n("old1") > 1800, "{counts:?}");
        assert!(n("old2") < n("new") * 2, "{counts:?}");
    }

    #[test]
    fn weights_hold_between_accounts_of_similar_latency() {
        // 120 ms against 100 ms is noise, not a reason to starve the heavier account: 10:1
        // weights give about 10:1 shares, one request at a time.
        let b = Balancer::new();
        let (fast, heavy) = (acct("fast", 1, 0), acct("heavy", 10, 0));
        observe(&b, &fast, 100, 1);
        observe(&b, &heavy, 120, 1);
        let tier = [&fast, &heavy];
        let mut rng = StdRng::seed_from_u64(5);
        let heavy_picks = (0..11_000)
            .filter(|_| b.pick_at(&tier, &mut rng, 1, |_| 1.0).unwrap().id == "heavy")
            .count();
        let ratio = heavy_picks as f64 / (11_000 - heavy_picks) as f64;
        assert!((8.0..12.5).contains(&ratio), "10:1 weights gave {ratio}");
    }

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let l = Load::new("a");
        assert!(l.estimate(0).is_none());
        l.observe(100.0 * MS as f64, 0);
        assert_eq!(l.estimate(0), Some(100.0 * MS as f64));
        l.observe(1000.0 * MS as f64, 1);
        assert_eq!(l.estimate(1), Some(1000.0 * MS as f64), "a peak is taken at once");
        // A lower sample one tau later: 1000·e⁻¹ + 100·(1 − e⁻¹) ≈ 431 ms.
        l.observe(100.0 * MS as f64, 1 + TAU_NS as u64);
        let e = l.estimate(1 + TAU_NS as u64).unwrap() / MS as f64;
        assert!((e - 431.0).abs() < 1.0, "{e}");
        // Unused, the estimate decays toward zero as it is read, not below the floor.
        let later = l.estimate(1 + 3 * TAU_NS as u64).unwrap() / MS as f64;
        assert!((later - 431.0 * (-2f64).exp()).abs() < 1.0, "{later}");
        assert_eq!(l.estimate(u64::MAX), Some(FLOOR_NS));
    }

    #[test]
    fn guard_observes_and_names_its_account() {
        let b = Balancer::new();
        let a = acct("a", 1, 0);
        let g = b.try_acquire(&a).unwrap();
        assert_eq!(g.account_id(), "a");
        g.observe_latency(Duration::from_millis(250));
        let e = b.inner.load_of("a").estimate(b.inner.now()).unwrap();
        assert!((e - 250e6).abs() < 1e6, "{e}");
        assert_eq!(b.outstanding("a"), 1);
        drop(g);
        assert_eq!(b.outstanding("a"), 0);
        assert_eq!(b.outstanding("unknown"), 0);
    }

    #[test]
    fn max_concurrency_and_unlimited() {
        let b = Balancer::new();
        let limited = acct("l", 1, 2);
        let g1 = b.try_acquire(&limited).unwrap();
        let _g2 = b.try_acquire(&limited).unwrap();
        assert!(b.try_acquire(&limited).is_none());
        drop(g1);
        let _g3 = b.try_acquire(&limited).unwrap();
        let unlimited = acct("u", 1, 0);
        let many: Vec<_> = (0..1000).map(|_| b.try_acquire(&unlimited).unwrap()).collect();
        assert_eq!(b.outstanding("u"), 1000);
        assert_eq!(b.outstanding_total(), 1002);
        drop(many);
        assert_eq!(b.outstanding_total(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn max_concurrency_enforced_exactly_under_concurrency() {
        let b = Arc::new(Balancer::new());
        let a = acct("a", 1, 5);
        let held = Arc::new(AtomicU32::new(0));
        let peak = Arc::new(AtomicU32::new(0));
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let (b, a, held, peak) = (b.clone(), a.clone(), held.clone(), peak.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..50 {
                    let slot = loop {
                        let released = b.released();
                        if let Some(s) = b.try_acquire(&a) {
                            break s;
                        }
                        released.await;
                    };
                    let now = held.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    assert!(b.outstanding("a") <= 5);
                    tokio::task::yield_now().await;
                    held.fetch_sub(1, Ordering::SeqCst);
                    drop(slot);
                }
            }));
        }
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(30), t).await.unwrap().unwrap();
        }
        let peak = peak.load(Ordering::SeqCst);
        assert!((1..=5).contains(&peak), "peak {peak}");
        assert_eq!(b.outstanding("a"), 0);
        assert_eq!(b.outstanding_total(), 0);
    }

    #[tokio::test]
    async fn guard_released_when_its_task_panics() {
        let b = Arc::new(Balancer::new());
        let a = acct("a", 1, 1);
        let (b2, a2) = (b.clone(), a.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let _slot = b2.try_acquire(&a2).unwrap();
            let _ = tx.send(());
            tokio::task::yield_now().await;
            panic!("request handler panicked");
        });
        rx.await.unwrap();
        assert!(task.await.unwrap_err().is_panic());
        assert_eq!(b.outstanding("a"), 0);
        assert_eq!(b.outstanding_total(), 0);
        assert!(b.try_acquire(&a).is_some());
    }

    #[tokio::test]
    async fn guard_released_when_its_future_is_dropped() {
        let b = Arc::new(Balancer::new());
        let a = acct("a", 1, 1);
        let (b2, a2) = (b.clone(), a.clone());
        let task = tokio::spawn(async move {
            let _slot = b2.try_acquire(&a2).unwrap();
            std::future::pending::<()>().await;
        });
        tokio::task::yield_now().await;
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        assert_eq!(b.outstanding_total(), 0);
    }

    #[tokio::test]
    async fn released_wakes_a_waiter() {
        let b = Arc::new(Balancer::new());
        let a = acct("a", 1, 1);
        let slot = b.try_acquire(&a).unwrap();
        let (b2, a2) = (b.clone(), a.clone());
        let waiter = tokio::spawn(async move {
            loop {
                let released = b2.released();
                if let Some(s) = b2.try_acquire(&a2) {
                    return s.account_id().to_string();
                }
                released.await;
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(slot);
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, "a");
        assert_eq!(b.outstanding_total(), 0);
    }

    #[test]
    fn a_release_after_creating_the_future_is_not_lost() {
        let b = Balancer::new();
        let a = acct("a", 1, 1);
        let slot = b.try_acquire(&a).unwrap();
        let released = b.released();
        drop(slot); // released before the future is ever polled
        use std::future::Future;
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let mut released = std::pin::pin!(released);
        assert!(released.as_mut().poll(&mut cx).is_ready());
    }
}
