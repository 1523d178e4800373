//! The limiter a data plane holds: Redis when it answers, the operator's policy
//! (`limits.on_store_down`) when it does not, and a background task that keeps
//! leases alive, counts the live data planes and notices Redis coming back.

use crate::local::LocalCounters;
use crate::redis_store::RedisCounters;
use crate::{Ask, Counters, Error, Kind, Limits, Refusal, Subject, Use};
use relay_proto::periods::Periods;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What to do with limited requests while Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Count in process, each rate and concurrency limit divided by the live data planes.
    Local,
    /// Refuse requests of keys that have limits.
    Deny,
    /// Serve them unchecked.
    Allow,
}

impl Policy {
    pub fn parse(s: &str) -> Policy {
        match s {
            "deny" => Policy::Deny,
            "allow" => Policy::Allow,
            _ => Policy::Local,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Local => "local",
            Policy::Deny => "deny",
            Policy::Allow => "allow",
        }
    }
    fn code(self) -> u8 {
        self as u8
    }
    fn from_code(c: u8) -> Policy {
        match c {
            1 => Policy::Deny,
            2 => Policy::Allow,
            _ => Policy::Local,
        }
    }
}

/// Where limits are counted right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// In Redis: exact across the fleet.
    Shared,
    /// In this process, by design (standalone, or no Redis configured).
    Process,
    /// Redis is down: the policy applies.
    Degraded(Policy),
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Shared => "shared",
            Mode::Process => "process",
            Mode::Degraded(Policy::Local) => "degraded_local",
            Mode::Degraded(Policy::Deny) => "degraded_deny",
            Mode::Degraded(Policy::Allow) => "degraded_allow",
        }
    }
}

const ALL_MODES: [&str; 5] = ["shared", "process", "degraded_local", "degraded_deny", "degraded_allow"];

pub struct LimiterOptions {
    /// `redis://` or `rediss://`; None: count in process.
    pub redis_url: Option<String>,
    pub redis_password: Option<String>,
    /// This data plane, for the live-plane count.
    pub node_id: String,
}

/// The answer to "may this request go ahead".
pub enum Decision {
    /// No limit applies to it (nothing is counted).
    Unlimited,
    Admitted(Charge),
    Refused {
        refusal: Refusal,
        subject: Subject,
    },
    /// Redis is down and the policy is `deny`.
    StoreDown,
}

/// The fleet-wide limiter.
pub struct Limiter {
    shared: Option<RedisCounters>,
    local: LocalCounters,
    down: AtomicBool,
    policy: AtomicU8,
    planes: AtomicU64,
    /// Whether `planes` was ever counted in Redis (else the control plane's count is used).
    counted: AtomicBool,
    /// Data planes connected to the control plane (`SpendResponse.data_planes`).
    fleet_hint: AtomicU64,
    /// Leases this data plane holds (renewed in the background, in Redis or in process).
    leases: Mutex<HashMap<String, Held>>,
    node_id: String,
}

/// A lease in flight: its subjects, its reservation (`tokens:cost:second`) and where it lives.
struct Held {
    subjects: Vec<String>,
    reservation: String,
    shared: bool,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("mode", &self.mode())
            .field("planes", &self.planes())
            .finish_non_exhaustive()
    }
}

/// How often the background task looks at Redis, and how long a data plane counts as live.
const TICK: Duration = Duration::from_secs(1);
const PLANE_TTL_MS: i64 = 10_000;
const RENEW_EVERY: u32 = 10;
/// Attempts of a background clean-up (a lost admission undone, a settlement retried).
const BACKGROUND_TRIES: u32 = 5;

impl Limiter {
    pub fn new(opts: LimiterOptions) -> Result<Arc<Limiter>, Error> {
        let shared = match &opts.redis_url {
            Some(url) => Some(RedisCounters::new(
                url,
                opts.redis_password.clone(),
                Duration::from_millis(250),
            )?),
            None => None,
        };
        let l = Arc::new(Limiter {
            shared,
            local: LocalCounters::new(),
            down: AtomicBool::new(false),
            policy: AtomicU8::new(Policy::Local.code()),
            planes: AtomicU64::new(1),
            counted: AtomicBool::new(false),
            fleet_hint: AtomicU64::new(1),
            leases: Mutex::new(HashMap::new()),
            node_id: opts.node_id,
        });
        l.publish_mode();
        Ok(l)
    }

    /// Applies the fleet's settings (`limits.on_store_down`, `limits.store_timeout_ms`).
    pub fn configure(&self, policy: Policy, timeout: Duration) {
        let old = Policy::from_code(self.policy.swap(policy.code(), Ordering::AcqRel));
        if let Some(s) = &self.shared {
            s.set_timeout(timeout);
        }
        if old != policy {
            self.publish_mode();
        }
    }

    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    pub fn mode(&self) -> Mode {
        match (&self.shared, self.down.load(Ordering::Acquire)) {
            (None, _) => Mode::Process,
            (Some(_), false) => Mode::Shared,
            (Some(_), true) => Mode::Degraded(Policy::from_code(self.policy.load(Ordering::Acquire))),
        }
    }

    /// Live data planes: as last counted in Redis, else as the control plane last reported
    /// (a data plane started while Redis was down must not take the whole limit), at least 1.
    pub fn planes(&self) -> u64 {
        let counted = if self.counted.load(Ordering::Acquire) {
            self.planes.load(Ordering::Acquire)
        } else {
            1
        };
        // The larger of the two: a fleet that grew while Redis was down is counted by the
        // control plane only.
        counted.max(self.fleet_hint.load(Ordering::Acquire)).max(1)
    }

    /// The data planes the control plane sees connected.
    pub fn set_fleet_hint(&self, n: u64) {
        self.fleet_hint.store(n.max(1), Ordering::Release);
    }

    fn publish_mode(&self) {
        let mode = self.mode().as_str();
        for m in ALL_MODES {
            metrics::gauge!(relay_proto::metrics::LIMITS_MODE, "mode" => m).set(if m == mode { 1.0 } else { 0.0 });
        }
    }

    fn set_down(&self, down: bool, why: Option<&Error>) {
        if self.down.swap(down, Ordering::AcqRel) == down {
            return;
        }
        self.publish_mode();
        metrics::counter!(relay_proto::metrics::LIMITS_MODE_TRANSITIONS_TOTAL, "to" => self.mode().as_str())
            .increment(1);
        match why {
            Some(e) => tracing::warn!(
                error = %e,
                policy = Policy::from_code(self.policy.load(Ordering::Acquire)).as_str(),
                planes = self.planes(),
                "limits: Redis cannot be reached; limits.on_store_down applies until it answers again"
            ),
            None => tracing::info!("limits: Redis answers again; limits are counted fleet-wide"),
        }
    }

    fn with_leases<T>(&self, f: impl FnOnce(&mut HashMap<String, Held>) -> T) -> T {
        let mut g = match self.leases.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut g)
    }

    /// Checks and counts one request against its subjects (those without any limit are skipped).
    pub async fn admit(self: &Arc<Self>, mut ask: Ask) -> Decision {
        ask.subjects.retain(|s| !s.limits.is_unlimited());
        if ask.subjects.is_empty() {
            return Decision::Unlimited;
        }
        let lease = uuid::Uuid::new_v4().simple().to_string();
        let started = std::time::Instant::now();
        if let Some(shared) = self.shared.as_ref().filter(|_| !self.down.load(Ordering::Acquire)) {
            match shared.admit(&ask, &lease, None).await {
                Ok(r) => {
                    metrics::histogram!(relay_proto::metrics::LIMITS_CHECK_SECONDS)
                        .record(started.elapsed().as_secs_f64());
                    return self.decided(Ok(r), ask, lease, true);
                }
                Err(e) => {
                    metrics::counter!(relay_proto::metrics::LIMITS_STORE_ERRORS_TOTAL).increment(1);
                    self.set_down(true, Some(&e));
                    // The script may still run once Redis catches up: undo it then.
                    let (shared, subjects, lease, periods) =
                        (shared.clone(), ask.subjects.clone(), lease.clone(), ask.periods.clone());
                    tokio::spawn(async move {
                        for _ in 0..BACKGROUND_TRIES {
                            if shared.cancel(&subjects, &lease, &periods).await.is_ok() {
                                return;
                            }
                            tokio::time::sleep(TICK).await;
                        }
                    });
                }
            }
        }
        match self.mode() {
            Mode::Degraded(Policy::Allow) => Decision::Unlimited,
            Mode::Degraded(Policy::Deny) => Decision::StoreDown,
            Mode::Degraded(Policy::Local) => {
                let planes = self.planes();
                let original = ask.subjects.clone();
                for s in &mut ask.subjects {
                    s.limits = s.limits.share(planes);
                }
                let r = self.local.admit(&ask, &lease, None).await;
                match self.decided(r, ask, lease, false) {
                    // Name the whole limit, and say it is this data plane's share.
                    Decision::Refused { refusal, .. } => Decision::Refused {
                        subject: original[refusal.subject].clone(),
                        refusal,
                    },
                    d => d,
                }
            }
            Mode::Shared | Mode::Process => {
                let r = self.local.admit(&ask, &lease, None).await;
                self.decided(r, ask, lease, false)
            }
        }
    }

    fn decided(
        self: &Arc<Self>,
        r: Result<Result<Vec<Use>, Refusal>, Error>,
        ask: Ask,
        lease: String,
        shared: bool,
    ) -> Decision {
        match r {
            Ok(Ok(uses)) => {
                let sec = uses.first().map_or(0, |u| u.now_ms.div_euclid(1000));
                // Only subjects that hold a lease need it renewed.
                let leased: Vec<String> = ask
                    .subjects
                    .iter()
                    .filter(|s| s.limits.needs().leases)
                    .map(Subject::name)
                    .collect();
                if !leased.is_empty() {
                    let held = Held {
                        subjects: leased,
                        reservation: format!("{}:{}:{sec}", ask.tokens, ask.cost_nano),
                        shared,
                    };
                    self.with_leases(|m| m.insert(lease.clone(), held));
                }
                Decision::Admitted(Charge {
                    inner: Some(ChargeInner {
                        limiter: self.clone(),
                        lease,
                        subjects: ask.subjects,
                        periods: ask.periods,
                        shared,
                        tokens: AtomicU64::new(0),
                        cost_pico: AtomicU64::new(0),
                    }),
                    uses,
                })
            }
            Ok(Err(refusal)) => {
                metrics::counter!(relay_proto::metrics::LIMITS_REFUSED_TOTAL, "limit" => refusal.kind.as_str(), "subject" => ask.subjects.get(refusal.subject).map_or("key", |s| s.kind.as_str())).increment(1);
                let subject = ask.subjects.get(refusal.subject).cloned().unwrap_or(Subject {
                    kind: Kind::Key,
                    id: String::new(),
                    limits: Limits::default(),
                    committed: Default::default(),
                });
                Decision::Refused { refusal, subject }
            }
            // The local store never fails; a shared failure was handled by the caller.
            Err(_) => Decision::Unlimited,
        }
    }

    /// A concurrency slot of `max` on an upstream account, fleet-wide. None: all are taken.
    pub async fn account_slot(self: &Arc<Self>, account_id: &str, max: u64) -> Option<Charge> {
        let ask = Ask {
            subjects: vec![Subject {
                kind: Kind::Account,
                id: account_id.to_string(),
                limits: Limits::concurrency_only(max),
                committed: Default::default(),
            }],
            tokens: 0,
            cost_nano: 0,
            periods: relay_proto::periods::periods(chrono_tz::UTC, chrono::Utc::now().timestamp_millis()),
        };
        match self.admit(ask).await {
            Decision::Admitted(c) => Some(c),
            Decision::Refused { .. } => None,
            // An account's own concurrency under `deny` or `allow`: this data plane's own slots
            // (the balancer's) still bound it.
            Decision::Unlimited | Decision::StoreDown => Some(Charge {
                inner: None,
                uses: Vec::new(),
            }),
        }
    }

    /// The shared store while it answers (sticky sessions live there too); None: keep to this
    /// process.
    pub fn shared_store(&self) -> Option<&RedisCounters> {
        self.shared.as_ref().filter(|_| !self.down.load(Ordering::Acquire))
    }

    /// Reports a failed call to the shared store made outside the limiter (sticky sessions).
    pub fn store_failed(&self, e: &Error) {
        metrics::counter!(relay_proto::metrics::LIMITS_STORE_ERRORS_TOTAL).increment(1);
        self.set_down(true, Some(e));
    }

    /// Each subject's use now (for the key holder's endpoint and operators).
    pub async fn peek(&self, subjects: &[Subject], periods: &Periods) -> Result<Vec<Use>, Error> {
        match self.shared.as_ref().filter(|_| !self.down.load(Ordering::Acquire)) {
            Some(s) => s.peek(subjects, periods, None).await,
            None => self.local.peek(subjects, periods, None).await,
        }
    }

    /// The background task: heartbeat (live planes, Redis health) every second, lease renewal
    /// every ten. Runs until the process ends.
    pub async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n: u32 = 0;
        let mut down_for: u32 = 0;
        loop {
            tick.tick().await;
            n = n.wrapping_add(1);
            let mut reachable = true;
            if let Some(shared) = &self.shared {
                match shared.heartbeat(&self.node_id, PLANE_TTL_MS).await {
                    Ok(planes) => {
                        self.planes.store(planes, Ordering::Release);
                        self.counted.store(true, Ordering::Release);
                        metrics::gauge!(relay_proto::metrics::LIMITS_LIVE_DATA_PLANES).set(planes as f64);
                        self.set_down(false, None);
                        down_for = 0;
                    }
                    Err(e) => {
                        reachable = false;
                        self.set_down(true, Some(&e));
                        down_for += 1;
                        // A misconfigured Redis (wrong password, wrong host) must not go unnoticed.
                        if down_for.is_multiple_of(60) {
                            tracing::error!(
                                error = %e,
                                minutes = down_for / 60,
                                "limits: Redis still cannot be reached; limits.on_store_down applies"
                            );
                        }
                    }
                }
            }
            if n.is_multiple_of(RENEW_EVERY) {
                self.renew_all(reachable).await;
            }
        }
    }

    /// Extends every lease this data plane holds now (the background task does it every 10 s).
    pub async fn renew_now(&self) {
        self.renew_all(!self.down.load(Ordering::Acquire)).await;
    }

    /// Extends every lease this data plane holds: in process always, in Redis when it answers.
    async fn renew_all(&self, reachable: bool) {
        let mut local: Vec<(String, String)> = Vec::new();
        let mut shared: Vec<(String, String, String)> = Vec::new();
        self.with_leases(|m| {
            for (lease, h) in m.iter() {
                for s in &h.subjects {
                    if h.shared {
                        shared.push((s.clone(), lease.clone(), h.reservation.clone()));
                    } else {
                        local.push((s.clone(), lease.clone()));
                    }
                }
            }
        });
        let _ = self.local.renew(&local, None).await;
        if let (Some(s), true) = (&self.shared, reachable) {
            let mut force = false;
            for chunk in shared.chunks(500) {
                match s.renew_held(&self.node_id, chunk, force).await {
                    Ok(readded) => force |= readded,
                    Err(e) => tracing::debug!(error = %e, "limits: cannot renew leases"),
                }
            }
        }
    }

    async fn finish(&self, mut c: ChargeInner) {
        let tokens = c.tokens.load(Ordering::Acquire);
        let cost = crate::nano_of_pico(c.cost_pico.load(Ordering::Acquire));
        self.with_leases(|m| m.remove(&c.lease));
        // A subject counted only by its requests has nothing to settle.
        c.subjects.retain(|s| s.limits.needs().settles());
        if c.subjects.is_empty() {
            return;
        }
        if c.shared {
            if let Some(s) = &self.shared {
                if s.finish(&c.subjects, &c.lease, tokens, cost, &c.periods, None)
                    .await
                    .is_ok()
                {
                    return;
                }
                metrics::counter!(relay_proto::metrics::LIMITS_STORE_ERRORS_TOTAL).increment(1);
                // Retried with a longer bound; failing that the lease expires by itself and the
                // spend reaches the budget through the control plane's stored usage.
                for _ in 0..BACKGROUND_TRIES {
                    tokio::time::sleep(TICK).await;
                    if s.finish_slowly(&c.subjects, &c.lease, tokens, cost, &c.periods)
                        .await
                        .is_ok()
                    {
                        return;
                    }
                }
                tracing::debug!("limits: cannot settle a request in Redis; its lease expires by itself");
            }
        } else {
            let _ = self
                .local
                .finish(&c.subjects, &c.lease, tokens, cost, &c.periods, None)
                .await;
        }
    }
}

struct ChargeInner {
    limiter: Arc<Limiter>,
    lease: String,
    subjects: Vec<Subject>,
    periods: Periods,
    shared: bool,
    tokens: AtomicU64,
    cost_pico: AtomicU64,
}

/// An admitted request's reservation. What its attempts used is added to it; when it is
/// dropped (the request and its body are done) it settles to that and releases its lease.
pub struct Charge {
    inner: Option<ChargeInner>,
    /// Each subject's use, counting this request (for rate-limit headers).
    pub uses: Vec<Use>,
}

impl std::fmt::Debug for Charge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Charge")
            .field("lease", &self.inner.as_ref().map(|c| c.lease.as_str()))
            .field("subjects", &self.subjects().len())
            .finish()
    }
}

impl Charge {
    /// Adds what one attempt used: tokens counted against tokens-per-minute, cost in pico-USD.
    pub fn add(&self, tokens: u64, cost_pico: u64) {
        if let Some(c) = &self.inner {
            c.tokens.fetch_add(tokens, Ordering::AcqRel);
            c.cost_pico.fetch_add(cost_pico, Ordering::AcqRel);
        }
    }

    /// The subjects this request counts against, with their limits.
    pub fn subjects(&self) -> &[Subject] {
        self.inner.as_ref().map_or(&[], |c| &c.subjects)
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        let Some(c) = self.inner.take() else { return };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(async move {
                    let l = c.limiter.clone();
                    l.finish(c).await;
                });
            }
            Err(_) => tracing::debug!("limits: a charge dropped outside the runtime is left to expire"),
        }
    }
}
