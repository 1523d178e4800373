//! Committed spend: what each API key (and so each group) has spent in the current budget
//! periods, the calendar day and month in `limits.timezone` ([`relay_proto::periods`]), from the
//! usage the store holds. Data planes poll it through `UsageIngest.Spend` (a budget check is
//! this plus the fleet's reservations in flight); `relayctl key show` reads it through
//! `Admin.GetApiKey`. Both go through one [`SpendCache`], so they agree.
//!
//! Cheap by construction: a hundred data planes polling every few seconds cost one answer per
//! second ([`ANSWER_TTL`], computed by one caller while the others wait for it), and an answer
//! sums today's usage only: the month's earlier days are summed again at most once a minute
//! ([`EARLIER_TTL`]; usage reported late for an earlier day counts within that minute).

use crate::model::{ApiKey, Group, KeyStatus, Millis};
use crate::store::{DynStore, Result};
use relay_proto::periods::{periods, Periods};
use relay_proto::settings;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// How long one `Spend` answer is served to every caller.
pub const ANSWER_TTL: Duration = Duration::from_secs(1);
/// How long today's per-key sums are reused (by `GetApiKey` too).
pub const TODAY_TTL: Duration = Duration::from_secs(1);
/// How long the sums of the month's days before today are reused.
pub const EARLIER_TTL: Duration = Duration::from_secs(60);

/// Spend in pico-USD over the day and the month that holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Spent {
    pub day: u64,
    pub month: u64,
}

impl Spent {
    fn add(self, o: Spent) -> Spent {
        Spent {
            day: self.day.saturating_add(o.day),
            month: self.month.saturating_add(o.month),
        }
    }
}

/// The `UsageIngest.Spend` answer (`api::usage` sends it): the spend of every key and group with a
/// budget, in the periods named, and how many data planes share the budgets.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SpendReport {
    pub day: String,
    pub month: String,
    /// Unix ms when the sums were taken.
    pub computed_at_ms: Millis,
    /// Data planes connected now.
    pub data_planes: u32,
    /// (key id, spend) of every budgeted key.
    pub keys: Vec<(String, Spent)>,
    /// (group id, spend) of every budgeted group.
    pub groups: Vec<(String, Spent)>,
}

/// Every key's spend in one pair of periods (keys without usage are absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Totals {
    pub periods: Periods,
    pub by_key: BTreeMap<String, Spent>,
    /// Unix ms when today's sums were taken.
    pub computed_at: Millis,
}

impl Totals {
    pub fn of_key(&self, key_id: &str) -> Spent {
        self.by_key.get(key_id).copied().unwrap_or_default()
    }

    /// A group's spend: that of the keys now in it (revoked ones too: what they spent counts).
    pub fn of_group<'a>(&self, group_id: &str, keys: impl IntoIterator<Item = &'a ApiKey>) -> Spent {
        keys.into_iter()
            .filter(|k| k.group_id == group_id)
            .fold(Spent::default(), |acc, k| acc.add(self.of_key(&k.id)))
    }
}

/// The budget periods that hold `now_ms`, in the time zone the settings name.
pub fn current_periods(settings: &BTreeMap<String, String>, now_ms: Millis) -> Periods {
    periods(settings::known("limits.timezone").tz_in(settings), now_ms)
}

struct Cached<T> {
    at: Instant,
    /// The periods it was computed for: another day (or time zone) makes it stale at once.
    periods: Periods,
    value: T,
}

impl<T> Cached<T> {
    fn fresh(&self, p: &Periods, ttl: Duration) -> bool {
        self.periods == *p && self.at.elapsed() < ttl
    }
}

#[derive(Default)]
struct State {
    answer: Option<Cached<Arc<SpendReport>>>,
    today: Option<Cached<Arc<Totals>>>,
    earlier: Option<Cached<Arc<BTreeMap<String, u64>>>>,
}

/// The shared, cached computation (one per control-plane process).
pub struct SpendCache {
    store: DynStore,
    state: Mutex<State>,
}

impl SpendCache {
    pub fn new(store: DynStore) -> Self {
        Self {
            store,
            state: Mutex::new(State::default()),
        }
    }

    /// Every key's spend in `p`, at most [`TODAY_TTL`] old.
    pub async fn totals(&self, p: &Periods) -> Result<Arc<Totals>> {
        let mut st = self.state.lock().await;
        self.totals_locked(&mut st, p, TODAY_TTL).await
    }

    /// Today's sums at most `max_age` old (the month's earlier days at most [`EARLIER_TTL`]).
    async fn totals_locked(&self, st: &mut State, p: &Periods, max_age: Duration) -> Result<Arc<Totals>> {
        if let Some(c) = st.today.as_ref().filter(|c| c.fresh(p, max_age)) {
            return Ok(c.value.clone());
        }
        let computed_at = crate::model::now_ms();
        let today = self.store.spend_by_key(p.day_start_ms, p.day_end_ms).await?;
        let earlier = match st.earlier.as_ref().filter(|c| c.fresh(p, EARLIER_TTL)) {
            Some(c) => c.value.clone(),
            None => {
                // On the first day of a month there is nothing before today.
                let sums = if p.month_start_ms < p.day_start_ms {
                    self.store.spend_by_key(p.month_start_ms, p.day_start_ms).await?
                } else {
                    BTreeMap::new()
                };
                let sums = Arc::new(sums);
                st.earlier = Some(Cached {
                    at: Instant::now(),
                    periods: p.clone(),
                    value: sums.clone(),
                });
                sums
            }
        };
        let mut by_key: BTreeMap<String, Spent> = earlier
            .iter()
            .map(|(k, v)| (k.clone(), Spent { day: 0, month: *v }))
            .collect();
        for (k, v) in today {
            let e = by_key.entry(k).or_default();
            *e = e.add(Spent { day: v, month: v });
        }
        let totals = Arc::new(Totals {
            periods: p.clone(),
            by_key,
            computed_at,
        });
        st.today = Some(Cached {
            at: Instant::now(),
            periods: p.clone(),
            value: totals.clone(),
        });
        Ok(totals)
    }

    /// The `UsageIngest.Spend` answer: every key and group with a daily or monthly budget (keys
    /// that are revoked aside), at most [`ANSWER_TTL`] old. No usage is summed while nothing
    /// has a budget.
    pub async fn report(&self) -> Result<Arc<SpendReport>> {
        let mut st = self.state.lock().await;
        if let Some(c) = st.answer.as_ref().filter(|c| c.at.elapsed() < ANSWER_TTL) {
            return Ok(c.value.clone());
        }
        let settings = self.store.settings().await?;
        let p = current_periods(&settings, crate::model::now_ms());
        let keys = self.store.list_api_keys().await?;
        let groups = self.store.list_groups().await?;
        let answer = Arc::new(self.build(&mut st, &p, &keys, &groups).await?);
        st.answer = Some(Cached {
            at: Instant::now(),
            periods: p,
            value: answer.clone(),
        });
        Ok(answer)
    }

    async fn build(&self, st: &mut State, p: &Periods, keys: &[ApiKey], groups: &[Group]) -> Result<SpendReport> {
        let budgeted_keys: Vec<&ApiKey> = keys
            .iter()
            .filter(|k| k.limits.has_budget() && k.status != KeyStatus::Revoked)
            .collect();
        let budgeted_groups: Vec<&Group> = groups.iter().filter(|g| g.limits.has_budget()).collect();
        let now = crate::model::now_ms();
        let connected = self.store.list_proxies().await?.iter().filter(|d| d.live(now)).count();
        let mut out = SpendReport {
            day: p.day.clone(),
            month: p.month.clone(),
            computed_at_ms: crate::model::now_ms(),
            data_planes: u32::try_from(connected).unwrap_or(u32::MAX),
            ..Default::default()
        };
        if budgeted_keys.is_empty() && budgeted_groups.is_empty() {
            return Ok(out);
        }
        // Summed now: an answer served for a second is never older than that.
        let totals = self.totals_locked(st, p, Duration::ZERO).await?;
        let spend = |id: &str, s: Spent| (id.to_string(), s);
        out.computed_at_ms = totals.computed_at;
        out.keys = budgeted_keys
            .iter()
            .map(|k| spend(&k.id, totals.of_key(&k.id)))
            .collect();
        out.groups = budgeted_groups
            .iter()
            .map(|g| spend(&g.id, totals.of_group(&g.id, keys)))
            .collect();
        Ok(out)
    }
}
