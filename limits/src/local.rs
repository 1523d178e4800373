//! Counters in this process: standalone mode's store, and the fallback of a data
//! plane whose Redis is down. The rules are the Lua script's (`redis_store`), written
//! again in Rust; the conformance suite (`tests/conformance.rs`) holds them equal.

use crate::{Ask, Counters, Error, LimitKind, Refusal, Subject, Use, LEASE_TTL_MS, WINDOW_SECS};
use relay_proto::periods::Periods;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

#[derive(Debug, Clone, Copy)]
struct Lease {
    expires_ms: i64,
    tokens: u64,
    cost_nano: u64,
    sec: i64,
}

#[derive(Debug, Default)]
struct State {
    requests: BTreeMap<i64, u64>,
    tokens: BTreeMap<i64, u64>,
    leases: HashMap<String, Lease>,
    /// Spend by period label (`d:2026-12-04`, `m:2026-12`); only current labels are kept.
    spend: HashMap<String, u64>,
}

impl State {
    fn prune(&mut self, now_ms: i64) {
        let oldest_kept = now_ms.div_euclid(1000) - WINDOW_SECS + 1;
        self.requests = self.requests.split_off(&oldest_kept);
        self.tokens = self.tokens.split_off(&oldest_kept);
        self.leases.retain(|_, l| l.expires_ms > now_ms);
    }

    fn spent(&self, label: &str, committed: u64) -> u64 {
        self.spend.get(label).copied().unwrap_or(0).max(committed)
    }

    /// What the subject's limits count (as the script reads it: other counters read as 0).
    fn usage(&self, s: &Subject, p: &Periods, now_ms: i64) -> Use {
        let n = s.limits.needs();
        let reset = |m: &BTreeMap<i64, u64>| {
            m.iter()
                .rev()
                .find(|(_, v)| **v > 0)
                .map_or(0, |(sec, _)| (sec + WINDOW_SECS) * 1000)
        };
        let pick = |on: bool, v: u64| if on { v } else { 0 };
        Use {
            now_ms,
            requests: pick(n.requests, self.requests.values().sum()),
            requests_reset_ms: if n.requests { reset(&self.requests) } else { 0 },
            tokens: pick(n.tokens, self.tokens.values().sum()),
            tokens_reset_ms: if n.tokens { reset(&self.tokens) } else { 0 },
            in_flight: pick(n.leases, self.leases.len() as u64),
            day_nano: pick(n.spend, self.spent(&day_label(p), s.committed.day_nano)),
            month_nano: pick(n.spend, self.spent(&month_label(p), s.committed.month_nano)),
            reserved_nano: pick(n.reservations, self.leases.values().map(|l| l.cost_nano).sum()),
        }
    }
}

fn day_label(p: &Periods) -> String {
    format!("d:{}:{}", p.zone, p.day)
}

fn month_label(p: &Periods) -> String {
    format!("m:{}:{}", p.zone, p.month)
}

/// How long until enough of a window's oldest seconds leave it that `fits(remaining)` holds.
fn wait_for(window: &BTreeMap<i64, u64>, now_ms: i64, fits: impl Fn(u64) -> bool) -> u64 {
    let mut left: u64 = window.values().sum();
    for (sec, v) in window {
        left = left.saturating_sub(*v);
        if fits(left) {
            return ((sec + WINDOW_SECS) * 1000 - now_ms).max(1000) as u64;
        }
    }
    (WINDOW_SECS * 1000) as u64
}

/// The first limit of `s` with no room for this request, if any.
fn check(st: &State, s: &Subject, ask: &Ask, now_ms: i64) -> Option<(LimitKind, u64, u64, bool)> {
    let l = &s.limits;
    let u = st.usage(s, &ask.periods, now_ms);
    if l.concurrency > 0 && u.in_flight >= l.concurrency {
        return Some((LimitKind::Concurrency, l.concurrency, 1000, false));
    }
    if l.rpm > 0 && u.requests >= l.rpm {
        let retry = wait_for(&st.requests, now_ms, |left| left < l.rpm);
        return Some((LimitKind::Requests, l.rpm, retry, false));
    }
    if l.tpm > 0 && u.tokens > 0 && u.tokens.saturating_add(ask.tokens) > l.tpm {
        let retry = wait_for(&st.tokens, now_ms, |left| {
            left == 0 || left.saturating_add(ask.tokens) <= l.tpm
        });
        return Some((LimitKind::Tokens, l.tpm, retry, false));
    }
    // Spent: until the period ends. Only reserved by requests in flight: shortly.
    let budget = |kind, limit: u64, spent: u64, end_ms: i64| {
        (limit > 0 && spent.saturating_add(u.reserved_nano) >= limit).then(|| {
            if spent >= limit {
                (kind, limit, (end_ms - now_ms).max(1000) as u64, false)
            } else {
                (kind, limit, 2000, true)
            }
        })
    };
    budget(LimitKind::DailyBudget, l.daily_nano, u.day_nano, ask.periods.day_end_ms).or_else(|| {
        budget(
            LimitKind::MonthlyBudget,
            l.monthly_nano,
            u.month_nano,
            ask.periods.month_end_ms,
        )
    })
}

/// Counters in a `Mutex`ed map, pruned as they are touched.
#[derive(Default)]
pub struct LocalCounters {
    state: Mutex<HashMap<String, State>>,
}

impl LocalCounters {
    pub fn new() -> Self {
        Self::default()
    }

    fn now(now_ms: Option<i64>) -> i64 {
        now_ms.unwrap_or_else(|| chrono::Utc::now().timestamp_millis())
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, State>) -> T) -> T {
        let mut g = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut g)
    }

    /// Subjects with any counter (a bound on memory: idle subjects are dropped).
    pub fn subjects(&self) -> usize {
        self.with(|m| m.len())
    }
}

#[async_trait::async_trait]
impl Counters for LocalCounters {
    async fn admit(&self, ask: &Ask, lease: &str, now_ms: Option<i64>) -> Result<Result<Vec<Use>, Refusal>, Error> {
        let now = Self::now(now_ms);
        let sec = now.div_euclid(1000);
        Ok(self.with(|m| {
            for (i, s) in ask.subjects.iter().enumerate() {
                let st = m.entry(s.name()).or_default();
                st.prune(now);
                if let Some((kind, limit, retry_after_ms, by_reservations)) = check(st, s, ask, now) {
                    return Err(Refusal {
                        subject: i,
                        kind,
                        limit,
                        retry_after_ms,
                        by_reservations,
                    });
                }
            }
            let mut uses = Vec::with_capacity(ask.subjects.len());
            for s in &ask.subjects {
                let n = s.limits.needs();
                let st = m.entry(s.name()).or_default();
                if n.requests {
                    *st.requests.entry(sec).or_default() += 1;
                }
                if n.tokens && ask.tokens > 0 {
                    *st.tokens.entry(sec).or_default() += ask.tokens;
                }
                if n.leases {
                    st.leases.insert(
                        lease.to_string(),
                        Lease {
                            expires_ms: now + LEASE_TTL_MS,
                            tokens: if n.tokens { ask.tokens } else { 0 },
                            cost_nano: if n.reservations { ask.cost_nano } else { 0 },
                            sec,
                        },
                    );
                }
                uses.push(st.usage(s, &ask.periods, now));
            }
            Ok(uses)
        }))
    }

    async fn finish(
        &self,
        subjects: &[Subject],
        lease: &str,
        tokens: u64,
        cost_nano: u64,
        periods: &Periods,
        now_ms: Option<i64>,
    ) -> Result<(), Error> {
        let now = Self::now(now_ms);
        let sec = now.div_euclid(1000);
        self.with(|m| {
            for s in subjects {
                let n = s.limits.needs();
                let name = s.name();
                let st = m.entry(name.clone()).or_default();
                st.prune(now);
                match st.leases.remove(lease) {
                    Some(l) if n.tokens => {
                        if let Some(v) = st.tokens.get_mut(&l.sec) {
                            *v = (*v + tokens).saturating_sub(l.tokens);
                        }
                    }
                    Some(_) => {}
                    None if n.tokens && tokens > 0 => *st.tokens.entry(sec).or_default() += tokens,
                    None => {}
                }
                if n.spend && cost_nano > 0 {
                    let day = day_label(periods);
                    let month = month_label(periods);
                    let d = st.spent(&day, s.committed.day_nano) + cost_nano;
                    let mo = st.spent(&month, s.committed.month_nano) + cost_nano;
                    st.spend.retain(|k, _| *k == day || *k == month);
                    st.spend.insert(day, d);
                    st.spend.insert(month, mo);
                }
                let idle =
                    st.requests.is_empty() && st.tokens.is_empty() && st.leases.is_empty() && st.spend.is_empty();
                if idle {
                    m.remove(&name);
                }
            }
        });
        Ok(())
    }

    async fn renew(&self, leases: &[(String, String)], now_ms: Option<i64>) -> Result<(), Error> {
        let now = Self::now(now_ms);
        self.with(|m| {
            for (subject, lease) in leases {
                if let Some(l) = m.get_mut(subject).and_then(|st| st.leases.get_mut(lease)) {
                    l.expires_ms = now + LEASE_TTL_MS;
                }
            }
        });
        Ok(())
    }

    async fn peek(&self, subjects: &[Subject], periods: &Periods, now_ms: Option<i64>) -> Result<Vec<Use>, Error> {
        let now = Self::now(now_ms);
        Ok(self.with(|m| {
            subjects
                .iter()
                .map(|s| match m.get_mut(&s.name()) {
                    Some(st) => {
                        st.prune(now);
                        st.usage(s, periods, now)
                    }
                    None => State::default().usage(s, periods, now),
                })
                .collect()
        }))
    }
}
