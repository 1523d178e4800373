//! The fleet-wide limiter: what a key (or its group, or an upstream account) may
//! still do right now, counted where every data plane sees the same numbers.
//!
//! * **What is counted** per subject (a key, a group, an account): requests in
//!   the last 60 seconds and tokens in the last 60 seconds (per-second buckets, a
//!   sliding window exact to the second), requests in flight (leases that expire
//!   unless renewed, so a crashed data plane's slots come back), and spend of the
//!   current day and month in the operator's time zone.
//! * **The reservation rule.** A request reserves an estimate of its tokens and
//!   cost when it is admitted and settles to its exact usage when it ends
//!   ([`Charge`]). A request is admitted while a limit still has room: requests
//!   `< rpm`, in flight `< concurrency`, tokens used plus its estimate `<= tpm`
//!   (a request into an empty window always fits), committed spend plus the
//!   reservations in flight `< budget`. A budget can therefore be overshot by at
//!   most the requests already in flight when it was crossed. Committed spend is
//!   `max(the fleet's running counter, the control plane's stored sum)`, so a
//!   Redis that lost its data never resets a budget.
//! * **Where.** [`Counters`] has two implementations with one behaviour (a
//!   conformance suite runs against both): [`redis_store::RedisCounters`] (one
//!   Lua script per check: check, count and set expiry atomically; nothing is
//!   counted for a refused request; every key expires by itself) and
//!   [`local::LocalCounters`] (in process, for standalone mode and as the
//!   fallback).
//! * **When Redis is down** ([`Limiter`]): `limits.on_store_down` decides:
//!   `local` counts in process with each rate and concurrency limit divided by
//!   the live data planes (budgets stay whole: committed spend keeps coming from
//!   the control plane), `deny` refuses requests of limited keys, `allow` serves
//!   them unchecked. Every transition is a log line and a metric; the limiter
//!   returns to Redis by itself when Redis answers again.

pub mod limiter;
pub mod local;
pub mod redis_store;

pub use limiter::{Charge, Decision, Limiter, LimiterOptions, Mode, Policy};

use relay_proto::periods::Periods;
use relay_proto::v1 as pb;

/// The sliding window of requests and tokens, in seconds.
pub const WINDOW_SECS: i64 = 60;
/// How long a lease (a request in flight) lives without renewal.
pub const LEASE_TTL_MS: i64 = 30_000;

/// Errors talking to the shared store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the limit store did not answer within {0} ms")]
    Timeout(u64),
    #[error("the limit store failed: {0}")]
    Store(String),
    #[error("the limit store answered something unexpected: {0}")]
    Protocol(String),
}

/// What a subject may do. 0 means unlimited for every field.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub rpm: u64,
    pub tpm: u64,
    pub concurrency: u64,
    /// Nano-USD (budgets are set in micro-USD; spend is counted in nano-USD so a
    /// month of a large budget stays exact in Redis' Lua numbers).
    pub daily_nano: u64,
    pub monthly_nano: u64,
}

impl Limits {
    pub fn from_pb(l: Option<&pb::KeyLimits>) -> Limits {
        let Some(l) = l else { return Limits::default() };
        Limits {
            rpm: u64::from(l.requests_per_minute),
            tpm: l.tokens_per_minute,
            concurrency: u64::from(l.max_concurrency),
            daily_nano: l.daily_budget_micro_usd.saturating_mul(1000),
            monthly_nano: l.monthly_budget_micro_usd.saturating_mul(1000),
        }
    }

    pub fn concurrency_only(n: u64) -> Limits {
        Limits {
            concurrency: n,
            ..Limits::default()
        }
    }

    pub fn is_unlimited(&self) -> bool {
        *self == Limits::default()
    }

    pub fn has_budget(&self) -> bool {
        self.daily_nano > 0 || self.monthly_nano > 0
    }

    /// What these limits need counted; nothing else is touched (the scripts' `needs`).
    pub fn needs(&self) -> Needs {
        let spend = self.has_budget();
        let reservations = self.tpm > 0 || spend;
        Needs {
            requests: self.rpm > 0,
            tokens: self.tpm > 0,
            spend,
            reservations,
            leases: self.concurrency > 0 || reservations,
        }
    }

    /// This data plane's share when `planes` data planes count apart: rates and
    /// concurrency divided (rounded up, so a limit never becomes "unlimited" or
    /// zero), budgets whole (their committed spend is the fleet's, from the control plane).
    pub fn share(&self, planes: u64) -> Limits {
        let n = planes.max(1);
        let div = |v: u64| if v == 0 { 0 } else { v.div_ceil(n).max(1) };
        Limits {
            rpm: div(self.rpm),
            tpm: div(self.tpm),
            concurrency: div(self.concurrency),
            ..*self
        }
    }
}

/// The counters a subject's limits need: requests for rpm, tokens for tpm, reservations for
/// tpm and budgets, leases for concurrency and reservations, spend for budgets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    pub requests: bool,
    pub tokens: bool,
    pub spend: bool,
    pub reservations: bool,
    pub leases: bool,
}

impl Needs {
    /// Anything to settle when a request ends.
    pub fn settles(&self) -> bool {
        self.leases || self.spend
    }
}

/// What a subject is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Key,
    Group,
    Account,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Key => "key",
            Kind::Group => "group",
            Kind::Account => "account",
        }
    }
    fn tag(self) -> char {
        match self {
            Kind::Key => 'k',
            Kind::Group => 'g',
            Kind::Account => 'a',
        }
    }
}

/// Spend the control plane has stored for a subject in the current periods, nano-USD.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Committed {
    pub day_nano: u64,
    pub month_nano: u64,
}

/// One thing whose limits a request counts against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub kind: Kind,
    pub id: String,
    pub limits: Limits,
    pub committed: Committed,
}

impl Subject {
    /// The stable name of this subject's counters (`k:<id>`).
    pub fn name(&self) -> String {
        format!("{}:{}", self.kind.tag(), self.id)
    }
}

/// A request asking to be admitted.
#[derive(Debug, Clone)]
pub struct Ask {
    pub subjects: Vec<Subject>,
    /// Tokens reserved until the request settles (its estimate).
    pub tokens: u64,
    /// Cost reserved until the request settles, nano-USD.
    pub cost_nano: u64,
    pub periods: Periods,
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    Concurrency,
    Requests,
    Tokens,
    DailyBudget,
    MonthlyBudget,
}

impl LimitKind {
    fn from_code(c: i64) -> Option<LimitKind> {
        Some(match c {
            1 => LimitKind::Concurrency,
            2 => LimitKind::Requests,
            3 => LimitKind::Tokens,
            4 => LimitKind::DailyBudget,
            5 => LimitKind::MonthlyBudget,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Concurrency => "concurrency",
            LimitKind::Requests => "requests_per_minute",
            LimitKind::Tokens => "tokens_per_minute",
            LimitKind::DailyBudget => "daily_budget",
            LimitKind::MonthlyBudget => "monthly_budget",
        }
    }
    /// A budget: retrying before the period ends cannot help.
    pub fn is_budget(self) -> bool {
        matches!(self, LimitKind::DailyBudget | LimitKind::MonthlyBudget)
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Index into `Ask::subjects`.
    pub subject: usize,
    pub kind: LimitKind,
    /// The limit that was reached (requests, tokens, requests in flight, or nano-USD).
    pub limit: u64,
    /// When retrying may succeed, ms from now (at least 1 s).
    pub retry_after_ms: u64,
    /// A budget refused because of the reservations of requests still in flight, not because it
    /// is spent: retrying once they settle may succeed.
    pub by_reservations: bool,
}

/// A subject's current use, as counted after the request in hand (when admitted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Use {
    /// The store's clock when this was read, unix ms.
    pub now_ms: i64,
    /// Requests in the last 60 s and when the window is empty again (unix ms; 0: it is).
    pub requests: u64,
    pub requests_reset_ms: i64,
    pub tokens: u64,
    pub tokens_reset_ms: i64,
    pub in_flight: u64,
    /// Committed spend (max of the running counter and the control plane's) and reservations.
    pub day_nano: u64,
    pub month_nano: u64,
    pub reserved_nano: u64,
}

/// Where counters live. Both implementations behave identically (the conformance suite).
/// `now_ms`: the caller's clock for tests; None: the store's own (Redis' `TIME`).
#[async_trait::async_trait]
pub trait Counters: Send + Sync {
    /// Checks every subject's limits and, when all have room, counts the request against
    /// all of them and leases `lease` (atomically: nothing counted for a refusal).
    async fn admit(&self, ask: &Ask, lease: &str, now_ms: Option<i64>) -> Result<Result<Vec<Use>, Refusal>, Error>;
    /// Settles a lease to what the request used (tokens counted and cost in nano-USD) and
    /// ends it.
    async fn finish(
        &self,
        subjects: &[Subject],
        lease: &str,
        tokens: u64,
        cost_nano: u64,
        periods: &Periods,
        now_ms: Option<i64>,
    ) -> Result<(), Error>;
    /// Keeps leases alive (a request still in flight).
    async fn renew(&self, leases: &[(String, String)], now_ms: Option<i64>) -> Result<(), Error>;
    /// Each subject's current use (for `GET /relay/v1/key` and `relayctl key show`).
    async fn peek(&self, subjects: &[Subject], periods: &Periods, now_ms: Option<i64>) -> Result<Vec<Use>, Error>;
}

/// Nano-USD from a cost in pico-USD, rounded up (a request that cost anything costs at least 1).
pub fn nano_of_pico(pico: u64) -> u64 {
    pico.div_ceil(1000)
}
