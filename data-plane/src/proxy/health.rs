//! Account health: what this data plane knows about each upstream account, merged with the fleet's
//! shared view (the `pb::AccountState`s the control plane pushes in the config), and the rules that
//! turn one upstream answer into a health verdict.
//!
//! # What it owns
//!
//! - [`HealthSettings`]: the cooldowns and thresholds, from the config's settings map, with
//!   per-account overrides (`account.<ACCOUNT_ID>.<key>`).
//! - The classification of an attempt's [`Outcome`] (status, rate-limit headers, error body, SSE error
//!   event, connect error, head timeout) into a [`Verdict`] (may another account be tried? what
//!   `retry-after` to pass on?) and, possibly, a new state for the account.
//! - [`HealthRegistry`]: one per data plane. It keeps, per account, the states observed here (to be
//!   reported to the control plane: `observe` returns them), the states the fleet shares
//!   (`sync_shared`, on every config swap) and a local circuit breaker; it answers the request
//!   path's question "may this account take a request for this model now?" (`availability`)
//!   without allocating and under one short per-account lock.
//!
//! # States
//!
//! A state applies to an account and a *scope*: a model family (`"opus"`, `"sonnet"`, `"haiku"`) when
//! the upstream's signal was per family, else `""` (the whole account). It ends at `until_ms`
//! (unix ms) or, with `until_ms == 0`, only when the fleet view drops it (an operator reset or a
//! credential change clears it on the control plane). Expired states count as healthy. Every timed
//! state is capped at `HealthSettings::max` from now.
//!
//! ```text
//!                 429 (retry-after / ratelimit reset / unified reset / default),
//!                 unified utilization >= threshold or status rejected
//!   ┌─────────┐ ─────────────────────────────────────────────► RATE_LIMITED  until reset
//!   │ healthy │ ─── 529, SSE overloaded_error first ─────────► OVERLOADED    until now + cooldown
//!   └─────────┘ ◄── until_ms passes ──────────────────────────┘
//!        │ ──── 401, 403 authentication/permission ──────────► UNAUTHORIZED  until 0 ┐ until the
//!        └───── 400/403 "organization has been disabled" ────► BLOCKED       until 0 ┘ fleet clears it
//!
//!   ERRORING: a circuit breaker, local to this data plane (5xx other than 529, timeouts, connect errors)
//!
//!   CLOSED (n consecutive failures) ── failure and n+1 = threshold ──► OPEN  until now + cooldown
//!     ▲  any upstream answer resets n                                    │ until passes
//!     │                                                                  ▼
//!     └──────── the probe gets an answer (not a 5xx) ────────────  HALF-OPEN: one probe at a time
//!                                                                        │ the probe fails
//!                                                                        ▼
//!                                                                 OPEN  cooldown × 2 (capped)
//! ```
//!
//! In HALF-OPEN, `availability` hands out [`Availability::Probe`] to exactly one caller; the others get
//! `At(lease end)`. The probe is released by the next `observe` for that account, by
//! [`HealthRegistry::release_probe`] (the attempt was abandoned), or when its lease (the current
//! cooldown) runs out.
//!
//! # Local and shared
//!
//! The fleet view replaces itself wholesale on every `sync_shared`. A local state (one this data plane
//! observed and reported) is kept next to it when it is newer than the shared state of the same
//! account and scope; when the fleet view has no such state, the local one is kept only while its
//! report may still be in flight (never seen by the fleet, younger than [`REPORT_GRACE_MS`]): once the
//! fleet has shown a state and then drops it, it was reset. Breaker counters are local and survive
//! every sync.

use http::header::HeaderName;
use http::HeaderMap;
use relay_proto::settings;
use relay_proto::v1 as pb;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long a local state the fleet has never shown survives a config swap that lacks it (its report
/// may still be on its way to the control plane).
pub const REPORT_GRACE_MS: i64 = 5_000;
/// The shortest timed state by default (`cooldown.min_ms`): a reset in the past (clock skew) still
/// keeps the account out this long. Also the breaker's shortest probe interval.
const MIN_STATE_MS: i64 = 1_000;
/// A new timed state is worth reporting only if it ends later than the known one by more than this
/// (the control plane's own tolerance).
const MATERIAL_MS: i64 = 1_000;
/// Model families, as they appear in model ids and in upstream error messages.
const FAMILIES: [&str; 3] = ["opus", "sonnet", "haiku"];

pub const KEY_RATE_LIMIT_DEFAULT: &str = "cooldown.rate_limit_default_ms";
pub const KEY_OVERLOADED: &str = "cooldown.overloaded_ms";
pub const KEY_ERRORING: &str = "cooldown.erroring_ms";
pub const KEY_MAX: &str = "cooldown.max_ms";
pub const KEY_MIN: &str = "cooldown.min_ms";
pub const KEY_BREAKER_THRESHOLD: &str = "breaker.threshold";
pub const KEY_UNIFIED_THRESHOLD: &str = "unified.threshold";
const ACCOUNT_PREFIX: &str = "account.";

// ---------------------------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------------------------

/// Tunables, from the config's settings map (keys below; values in ms unless noted), with per-account
/// overrides `account.<ACCOUNT_ID>.<key>`. Unparseable values are ignored (the default stays).
#[derive(Debug, Clone, PartialEq)]
pub struct HealthSettings {
    /// A 429 without any reset: `cooldown.rate_limit_default_ms`, default 60 s.
    pub rate_limit_default: Duration,
    /// 529 / SSE `overloaded_error`: `cooldown.overloaded_ms`, default 30 s.
    pub overloaded: Duration,
    /// The breaker's first open period: `cooldown.erroring_ms`, default 30 s.
    pub erroring: Duration,
    /// Cap of every timed state: `cooldown.max_ms`, default 6 h.
    pub max: Duration,
    /// Floor of every timed state: `cooldown.min_ms`, default 1 s (at most `max`).
    pub min: Duration,
    /// Consecutive failures that open the breaker: `breaker.threshold`, default 3 (at least 1).
    pub breaker_threshold: u32,
    /// Unified utilization that rate-limits a subscription account: `unified.threshold` (0..1, or a
    /// percentage > 1), default 0.98.
    pub unified_threshold: f64,
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self::from_settings(&BTreeMap::new())
    }
}

impl HealthSettings {
    /// The global values (names, ranges and defaults declared in `relay_proto::settings`).
    pub fn from_settings(values: &BTreeMap<String, String>) -> Self {
        let ms = |name: &str| Duration::from_millis(settings::known(name).u64_in(values));
        let max = ms(KEY_MAX);
        Self {
            rate_limit_default: ms(KEY_RATE_LIMIT_DEFAULT),
            overloaded: ms(KEY_OVERLOADED),
            erroring: ms(KEY_ERRORING),
            max,
            min: ms(KEY_MIN).min(max),
            breaker_threshold: u32::try_from(settings::known(KEY_BREAKER_THRESHOLD).u64_in(values)).unwrap_or(u32::MAX),
            unified_threshold: settings::known(KEY_UNIFIED_THRESHOLD)
                .fraction_of(values.get(KEY_UNIFIED_THRESHOLD).map(String::as_str)),
        }
    }

    /// These settings with the account's overrides applied. Does not allocate.
    pub fn for_account(&self, values: &BTreeMap<String, String>, account_id: &str) -> HealthSettings {
        let mut s = self.clone();
        let overrides = values.range::<str, _>((Bound::Included(ACCOUNT_PREFIX), Bound::Unbounded));
        for (k, v) in overrides {
            let Some(rest) = k.strip_prefix(ACCOUNT_PREFIX) else {
                break;
            };
            if let Some(key) = rest.strip_prefix(account_id).and_then(|r| r.strip_prefix('.')) {
                s.set(key, v);
            }
        }
        s.min = s.min.min(s.max);
        s
    }

    /// An override: a value that does not fit its declared range is ignored.
    fn set(&mut self, key: &str, value: &str) {
        let Some(decl) = settings::get(key).filter(|d| d.per_account) else {
            return;
        };
        let fits = decl.check(value).is_ok();
        if !fits {
            return;
        }
        let ms = || Duration::from_millis(decl.u64_of(Some(value)));
        match key {
            KEY_RATE_LIMIT_DEFAULT => self.rate_limit_default = ms(),
            KEY_OVERLOADED => self.overloaded = ms(),
            KEY_ERRORING => self.erroring = ms(),
            KEY_MAX => self.max = ms(),
            KEY_MIN => self.min = ms(),
            KEY_BREAKER_THRESHOLD => {
                self.breaker_threshold = u32::try_from(decl.u64_of(Some(value))).unwrap_or(u32::MAX)
            }
            KEY_UNIFIED_THRESHOLD => self.unified_threshold = decl.fraction_of(Some(value)),
            _ => {}
        }
    }
}

/// A utilization header as a fraction (0 allowed): values above 1.0 are percentages.
fn utilization(v: f64) -> Option<f64> {
    if !v.is_finite() || v < 0.0 {
        return None;
    }
    Some(if v > 1.0 { v / 100.0 } else { v })
}

// ---------------------------------------------------------------------------------------------
// Outcomes and verdicts
// ---------------------------------------------------------------------------------------------

/// The model family a model id belongs to: "opus", "sonnet", "haiku", or "" when unknown.
pub fn model_family(model: &str) -> &'static str {
    FAMILIES
        .iter()
        .copied()
        .find(|f| contains_ci(model.as_bytes(), f.as_bytes()))
        .unwrap_or("")
}

/// What one attempt's outcome means for the account.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome<'a> {
    /// The upstream answered with this status and headers; `body` is the (small) error body when
    /// status >= 400, or empty.
    Response {
        status: u16,
        headers: &'a HeaderMap,
        body: &'a [u8],
    },
    /// An SSE stream whose FIRST event was `event: error` with this error type (e.g. "overloaded_error").
    StreamError {
        error_type: &'a str,
    },
    ConnectError,
    /// The upstream answered, but not with an Anthropic answer (a 2xx that is not a message or an
    /// event stream, a 1xx/3xx/600+ status, a stream that ended before `message_stop`): an upstream
    /// fault, counted by the breaker like a broken connection.
    Invalid {
        what: &'a str,
    },
    /// No response head within the head timeout.
    Timeout,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// Whether another account may be tried for this request (connect/timeout/429/529/5xx/401/403/
    /// org-disabled: true; any other 4xx: false, the client's request is at fault).
    pub retry_elsewhere: bool,
    /// How long the client should wait before retrying, if the upstream said (retry-after), for the
    /// final error.
    pub retry_after: Option<Duration>,
}

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

/// A state an outcome calls for (before it is merged with what is known).
#[derive(Debug, Clone, PartialEq)]
struct NewState {
    health: pb::AccountHealth,
    scope: &'static str,
    /// 0 = until reset.
    until_ms: i64,
    reason: String,
}

#[derive(Debug, Clone, PartialEq)]
enum BreakerEvent {
    /// The outcome says nothing about reachability (e.g. an SSE error after a 200 head).
    Nothing,
    /// The upstream answered.
    Success,
    /// 5xx (not 529), timeout, connect error; the text says which.
    Failure(String),
}

/// Everything an outcome implies, computed without any lock held.
#[derive(Debug, Clone, PartialEq)]
struct Plan {
    verdict: Verdict,
    breaker: BreakerEvent,
    states: [Option<NewState>; 2],
}

impl Plan {
    fn new(retry_elsewhere: bool, retry_after: Option<Duration>, breaker: BreakerEvent) -> Self {
        Self {
            verdict: Verdict {
                retry_elsewhere,
                retry_after,
            },
            breaker,
            states: [None, None],
        }
    }

    fn push(&mut self, st: Option<NewState>) {
        if let Some(slot) = self.states.iter_mut().find(|s| s.is_none()) {
            *slot = st;
        }
    }

    fn changes_state(&self) -> bool {
        self.states.iter().any(Option::is_some) || matches!(self.breaker, BreakerEvent::Failure(_))
    }
}

fn classify(outcome: &Outcome<'_>, model: &str, s: &HealthSettings, now: i64) -> Plan {
    match outcome {
        Outcome::Response { status, headers, body } => classify_response(*status, headers, body, model, s, now),
        Outcome::StreamError { error_type } => classify_stream_error(error_type, s, now),
        Outcome::ConnectError => Plan::new(true, None, BreakerEvent::Failure("connect error".into())),
        Outcome::Invalid { what } => Plan::new(true, None, BreakerEvent::Failure(format!("invalid answer: {what}"))),
        Outcome::Timeout => Plan::new(true, None, BreakerEvent::Failure("timeout".into())),
    }
}

fn classify_response(status: u16, h: &HeaderMap, body: &[u8], model: &str, s: &HealthSettings, now: i64) -> Plan {
    let unified = Unified::parse(h);
    let mut plan = match status {
        0..=399 => Plan::new(false, None, BreakerEvent::Success),
        429 => {
            let retry_after = retry_after(h, now);
            let mut plan = Plan::new(true, retry_after, BreakerEvent::Success);
            plan.push(Some(rate_limited(
                h,
                body,
                model,
                retry_after,
                unified.as_ref(),
                s,
                now,
            )));
            plan
        }
        529 => {
            let retry_after = retry_after(h, now);
            let cooldown = ms(s.overloaded).max(retry_after.map_or(0, ms));
            let (until, capped) = bounded(now, now.saturating_add(cooldown), s);
            let mut plan = Plan::new(true, retry_after, BreakerEvent::Success);
            plan.push(Some(NewState {
                health: pb::AccountHealth::Overloaded,
                scope: "",
                until_ms: until,
                reason: format!("529 overloaded_error: cooldown {}{capped}", fmt_ms(until - now)),
            }));
            plan
        }
        500..=599 => {
            let err = ErrorInfo::parse(body);
            let what = match err.kind() {
                Some(k) => format!("{status} {k}"),
                None => status.to_string(),
            };
            Plan::new(true, retry_after(h, now), BreakerEvent::Failure(what))
        }
        // A 404 that is not about the request's model ("model: …", the client's error) means the
        // account's URL leads nowhere (a base URL ending in /v1, a proxy path): the account's fault.
        404 if !ErrorInfo::parse(body).about_the_model() => Plan::new(
            true,
            None,
            BreakerEvent::Failure("404 that is not about the model: check the account's base URL".into()),
        ),
        // The upstream timed the request out: another account may well answer.
        408 => Plan::new(
            true,
            retry_after(h, now),
            BreakerEvent::Failure("408 request timeout".into()),
        ),
        // An account out of credit (402 billing_error, or 400 "credit balance is too low"): out
        // until an operator tops it up and resets it; never the client's answer.
        400 | 402 if status == 402 || ErrorInfo::parse(body).out_of_credit(body) => {
            let mut plan = Plan::new(true, None, BreakerEvent::Success);
            plan.push(Some(NewState {
                health: pb::AccountHealth::Blocked,
                scope: "",
                until_ms: 0,
                reason: format!("{status}: out of credit (billing)"),
            }));
            plan
        }
        400..=499 => {
            let err = ErrorInfo::parse(body);
            let mut plan = Plan::new(true, None, BreakerEvent::Success);
            if matches!(status, 400 | 403) && err.org_disabled(body) {
                plan.push(Some(NewState {
                    health: pb::AccountHealth::Blocked,
                    scope: "",
                    until_ms: 0,
                    reason: format!("{status}: organization disabled"),
                }));
            } else if status == 401
                || (status == 403
                    && err
                        .kind()
                        .is_none_or(|k| k == "permission_error" || k == "authentication_error"))
            {
                let kind = err.kind().unwrap_or(if status == 401 {
                    "authentication_error"
                } else {
                    "permission_error"
                });
                plan.push(Some(NewState {
                    health: pb::AccountHealth::Unauthorized,
                    scope: "",
                    until_ms: 0,
                    reason: format!("{status} {kind}"),
                }));
            } else {
                // The client's request is at fault: no other account would answer differently.
                plan.verdict.retry_elsewhere = false;
            }
            plan
        }
        _ => Plan::new(false, None, BreakerEvent::Success),
    };
    // Subscription utilization, from every answer. On a 429 the rejection itself is handled above
    // (with its scope); only the utilization threshold applies here.
    if let Some(u) = unified {
        plan.push(u.limit(s, now, status != 429));
    }
    plan
}

fn classify_stream_error(error_type: &str, s: &HealthSettings, now: i64) -> Plan {
    let kind = clean_type(error_type);
    match error_type {
        "overloaded_error" => {
            let (until, capped) = bounded(now, now.saturating_add(ms(s.overloaded)), s);
            let mut plan = Plan::new(true, None, BreakerEvent::Nothing);
            plan.push(Some(NewState {
                health: pb::AccountHealth::Overloaded,
                scope: "",
                until_ms: until,
                reason: format!("SSE overloaded_error: cooldown {}{capped}", fmt_ms(until - now)),
            }));
            plan
        }
        "rate_limit_error" => {
            let (until, capped) = bounded(now, now.saturating_add(ms(s.rate_limit_default)), s);
            let mut plan = Plan::new(true, None, BreakerEvent::Nothing);
            plan.push(Some(NewState {
                health: pb::AccountHealth::RateLimited,
                scope: "",
                until_ms: until,
                reason: format!(
                    "SSE rate_limit_error: no reset given, default {}{capped}",
                    fmt_ms(until - now)
                ),
            }));
            plan
        }
        "api_error" => Plan::new(true, None, BreakerEvent::Failure(format!("SSE {kind}"))),
        "authentication_error" | "permission_error" => {
            let mut plan = Plan::new(true, None, BreakerEvent::Nothing);
            plan.push(Some(NewState {
                health: pb::AccountHealth::Unauthorized,
                scope: "",
                until_ms: 0,
                reason: format!("SSE {kind}"),
            }));
            plan
        }
        _ => Plan::new(false, None, BreakerEvent::Nothing),
    }
}

/// A 429: limited until the reset the upstream gave. `retry-after` is the upstream's own answer and
/// wins; else the relevant `anthropic-ratelimit-*-reset`; a subscription account whose unified status
/// is `rejected` is limited at least until the unified reset; nothing at all: the default.
fn rate_limited(
    h: &HeaderMap,
    body: &[u8],
    model: &str,
    retry_after: Option<Duration>,
    unified: Option<&Unified>,
    s: &HealthSettings,
    now: i64,
) -> NewState {
    let err = ErrorInfo::parse(body);
    let scope = err.message().and_then(|m| family_in(m, model)).unwrap_or("");
    let kind = err.kind().unwrap_or("rate_limit_error");
    let mut end: Option<(i64, Cow<'static, str>)> = None;
    if let Some(d) = retry_after {
        end = Some((
            now.saturating_add(ms(d)),
            format!("retry-after {}", fmt_ms(ms(d))).into(),
        ));
    } else if let Some((reset, name)) = standard_reset(h) {
        end = Some((reset, name.into()));
    }
    if let Some(reset) = unified.and_then(|u| u.reset_ms) {
        let rejected = unified.is_some_and(|u| u.rejected);
        if end.as_ref().is_none_or(|(e, _)| rejected && reset > *e) {
            end = Some((reset, "anthropic-ratelimit-unified-reset".into()));
        }
    }
    let (end, source) = end.unwrap_or_else(|| {
        let d = ms(s.rate_limit_default);
        (
            now.saturating_add(d),
            format!("no reset given, default {}", fmt_ms(d)).into(),
        )
    });
    let (until, capped) = bounded(now, end, s);
    let scoped = if scope.is_empty() {
        String::new()
    } else {
        format!(" ({scope})")
    };
    NewState {
        health: pb::AccountHealth::RateLimited,
        scope,
        until_ms: until,
        reason: format!("429 {kind}{scoped}: {source}{capped}"),
    }
}

/// The end of a timed state: at least `min` from now, at most `max`. The text notes a cap.
fn bounded(now: i64, end: i64, s: &HealthSettings) -> (i64, &'static str) {
    let end = end.max(now.saturating_add(ms(s.min.min(s.max))));
    let limit = now.saturating_add(ms(s.max));
    if end > limit {
        (limit, " (capped)")
    } else {
        (end, "")
    }
}

// ---------------------------------------------------------------------------------------------
// Header and body parsing
// ---------------------------------------------------------------------------------------------

const RETRY_AFTER: HeaderName = HeaderName::from_static("retry-after");
const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");
/// (remaining, reset, name of the reset header) of each API-key limit.
const STANDARD_LIMITS: [(HeaderName, HeaderName, &str); 4] = [
    (
        HeaderName::from_static("anthropic-ratelimit-requests-remaining"),
        HeaderName::from_static("anthropic-ratelimit-requests-reset"),
        "anthropic-ratelimit-requests-reset",
    ),
    (
        HeaderName::from_static("anthropic-ratelimit-tokens-remaining"),
        HeaderName::from_static("anthropic-ratelimit-tokens-reset"),
        "anthropic-ratelimit-tokens-reset",
    ),
    (
        HeaderName::from_static("anthropic-ratelimit-input-tokens-remaining"),
        HeaderName::from_static("anthropic-ratelimit-input-tokens-reset"),
        "anthropic-ratelimit-input-tokens-reset",
    ),
    (
        HeaderName::from_static("anthropic-ratelimit-output-tokens-remaining"),
        HeaderName::from_static("anthropic-ratelimit-output-tokens-reset"),
        "anthropic-ratelimit-output-tokens-reset",
    ),
];
const UNIFIED_STATUS: HeaderName = HeaderName::from_static("anthropic-ratelimit-unified-status");
const UNIFIED_RESET: HeaderName = HeaderName::from_static("anthropic-ratelimit-unified-reset");
/// (window, utilization, reset, status) of each unified window.
const UNIFIED_WINDOWS: [(&str, HeaderName, HeaderName, HeaderName); 2] = [
    (
        "5h",
        HeaderName::from_static("anthropic-ratelimit-unified-5h-utilization"),
        HeaderName::from_static("anthropic-ratelimit-unified-5h-reset"),
        HeaderName::from_static("anthropic-ratelimit-unified-5h-status"),
    ),
    (
        "7d",
        HeaderName::from_static("anthropic-ratelimit-unified-7d-utilization"),
        HeaderName::from_static("anthropic-ratelimit-unified-7d-reset"),
        HeaderName::from_static("anthropic-ratelimit-unified-7d-status"),
    ),
];

fn header_str<'h>(h: &'h HeaderMap, name: &HeaderName) -> Option<&'h str> {
    h.get(name)?.to_str().ok().map(str::trim).filter(|v| !v.is_empty())
}

/// `retry-after-ms`, else `retry-after` (seconds, or an HTTP date).
fn retry_after(h: &HeaderMap, now: i64) -> Option<Duration> {
    if let Some(v) = header_str(h, &RETRY_AFTER_MS).and_then(|v| v.parse::<f64>().ok()) {
        return Duration::try_from_secs_f64(v / 1000.0).ok();
    }
    let v = header_str(h, &RETRY_AFTER)?;
    if let Ok(secs) = v.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).ok();
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?.timestamp_millis();
    Some(Duration::from_millis(
        u64::try_from(at.saturating_sub(now)).unwrap_or(0),
    ))
}

/// The relevant API-key limit reset (unix ms): the latest among the limits with nothing remaining,
/// else the latest given.
fn standard_reset(h: &HeaderMap) -> Option<(i64, &'static str)> {
    let mut exhausted: Option<(i64, &'static str)> = None;
    let mut latest: Option<(i64, &'static str)> = None;
    for (remaining, reset, name) in &STANDARD_LIMITS {
        let Some(at) = header_str(h, reset).and_then(rfc3339_ms) else {
            continue;
        };
        if latest.is_none_or(|(l, _)| at > l) {
            latest = Some((at, name));
        }
        let zero = header_str(h, remaining).and_then(|v| v.parse::<f64>().ok()) == Some(0.0);
        if zero && exhausted.is_none_or(|(l, _)| at > l) {
            exhausted = Some((at, name));
        }
    }
    exhausted.or(latest)
}

fn rfc3339_ms(v: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(v)
        .ok()
        .map(|d| d.timestamp_millis())
}

/// Unix seconds (as the unified headers give them) to unix ms; a value that is clearly already in
/// ms is taken as such.
fn unix_ms(v: &str) -> Option<i64> {
    let x = v.parse::<f64>().ok().filter(|x| x.is_finite() && *x > 0.0)?;
    let ms = if x > 1e11 { x } else { x * 1000.0 };
    Some(ms.min(i64::MAX as f64) as i64)
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Window {
    name: &'static str,
    utilization: Option<f64>,
    reset_ms: Option<i64>,
    rejected: bool,
}

/// A subscription account's unified rate-limit headers.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Unified {
    rejected: bool,
    reset_ms: Option<i64>,
    windows: [Window; 2],
}

impl Unified {
    /// None when the answer carries no unified header at all (API-key accounts). Does not allocate.
    fn parse(h: &HeaderMap) -> Option<Unified> {
        let status = header_str(h, &UNIFIED_STATUS);
        let reset_ms = header_str(h, &UNIFIED_RESET).and_then(unix_ms);
        let windows = UNIFIED_WINDOWS.each_ref().map(|(name, util, reset, status)| Window {
            name,
            utilization: header_str(h, util)
                .and_then(|v| v.parse::<f64>().ok())
                .and_then(utilization),
            reset_ms: header_str(h, reset).and_then(unix_ms),
            rejected: header_str(h, status).is_some_and(|v| v.eq_ignore_ascii_case("rejected")),
        });
        let any = status.is_some()
            || reset_ms.is_some()
            || windows
                .iter()
                .any(|w| w.utilization.is_some() || w.reset_ms.is_some() || w.rejected);
        any.then(|| Unified {
            rejected: status.is_some_and(|v| v.eq_ignore_ascii_case("rejected")),
            reset_ms,
            windows,
        })
    }

    /// Rate limited until the reset of the window that crossed the threshold (or was rejected).
    fn limit(&self, s: &HealthSettings, now: i64, use_status: bool) -> Option<NewState> {
        let mut end: Option<(i64, String)> = None;
        for w in &self.windows {
            let over = w.utilization.filter(|u| *u >= s.unified_threshold);
            if over.is_none() && !(use_status && w.rejected) {
                continue;
            }
            let at = w
                .reset_ms
                .or(self.reset_ms)
                .unwrap_or_else(|| now.saturating_add(ms(s.rate_limit_default)));
            if end.as_ref().is_none_or(|(e, _)| at > *e) {
                let why = match over {
                    Some(u) => format!(
                        "unified {} utilization {:.1}% >= {:.1}%",
                        w.name,
                        u * 100.0,
                        s.unified_threshold * 100.0
                    ),
                    None => format!("unified {} status rejected", w.name),
                };
                end = Some((at, why));
            }
        }
        if end.is_none() && use_status && self.rejected {
            let at = self
                .reset_ms
                .or_else(|| self.windows.iter().filter_map(|w| w.reset_ms).max())
                .unwrap_or_else(|| now.saturating_add(ms(s.rate_limit_default)));
            end = Some((at, "unified status rejected".into()));
        }
        let (at, why) = end?;
        let (until, capped) = bounded(now, at, s);
        Some(NewState {
            health: pb::AccountHealth::RateLimited,
            scope: "",
            until_ms: until,
            reason: format!("{why}: until reset in {}{capped}", fmt_ms(until - now)),
        })
    }
}

#[derive(serde::Deserialize, Default)]
struct ErrorEnvelope<'a> {
    #[serde(borrow, default)]
    error: Option<ErrorDetail<'a>>,
}

#[derive(serde::Deserialize, Default)]
struct ErrorDetail<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    message: Option<Cow<'a, str>>,
}

/// The `error` of an Anthropic error body, if it is one.
struct ErrorInfo<'a> {
    kind: Option<String>,
    message: Option<Cow<'a, str>>,
}

impl<'a> ErrorInfo<'a> {
    fn parse(body: &'a [u8]) -> Self {
        let detail = serde_json::from_slice::<ErrorEnvelope<'a>>(body)
            .ok()
            .and_then(|e| e.error)
            .unwrap_or_default();
        Self {
            kind: detail.kind.as_deref().map(clean_type).filter(|k| !k.is_empty()),
            message: detail.message,
        }
    }

    fn kind(&self) -> Option<&str> {
        self.kind.as_deref()
    }

    fn message(&self) -> Option<&str> {
        self.message.as_deref()
    }

    /// "This organization has been disabled." (in the message, or anywhere in a body that is not JSON).
    /// A 404 about the request's model (`not_found_error` "model: …"): the client's error.
    fn about_the_model(&self) -> bool {
        self.kind() == Some("not_found_error")
            && self
                .message()
                .is_some_and(|m| m.trim_start().to_ascii_lowercase().starts_with("model"))
    }

    /// The account has no credit left (Anthropic: 400 "Your credit balance is too low …").
    fn out_of_credit(&self, body: &[u8]) -> bool {
        let hay = self.message().map_or(body, str::as_bytes);
        self.kind() == Some("billing_error") || contains_ci(hay, b"credit balance is too low")
    }

    fn org_disabled(&self, body: &[u8]) -> bool {
        const NEEDLES: [&[u8]; 2] = [b"organization has been disabled", b"organization is disabled"];
        let hay = self.message().map_or(body, str::as_bytes);
        NEEDLES.iter().any(|n| contains_ci(hay, n))
    }
}

/// An error type safe to put in a reason: `[A-Za-z0-9_]`, at most 40 characters.
fn clean_type(t: &str) -> String {
    t.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(40)
        .collect()
}

/// The model family an error message is about: the request's own family if mentioned, else the first
/// family mentioned.
fn family_in(message: &str, model: &str) -> Option<&'static str> {
    let own = model_family(model);
    if !own.is_empty() && contains_ci(message.as_bytes(), own.as_bytes()) {
        return Some(own);
    }
    FAMILIES
        .iter()
        .copied()
        .find(|f| contains_ci(message.as_bytes(), f.as_bytes()))
}

/// ASCII case-insensitive substring search (`needle` in lower case). Does not allocate.
fn contains_ci(hay: &[u8], needle: &[u8]) -> bool {
    if needle.is_empty() {
        return true;
    }
    hay.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle))
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// "30s", "1m30s", "6h", "1.5s", "250ms".
fn fmt_ms(ms: i64) -> String {
    let ms = ms.max(0);
    if ms % 1000 != 0 {
        return if ms < 1000 {
            format!("{ms}ms")
        } else {
            format!("{:.1}s", ms as f64 / 1000.0)
        };
    }
    let secs = ms / 1000;
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        let _ = write!(out, "{h}h");
    }
    if m > 0 {
        let _ = write!(out, "{m}m");
    }
    if s > 0 || out.is_empty() {
        let _ = write!(out, "{s}s");
    }
    out
}

fn wall_now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(ms).unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// The registry
// ---------------------------------------------------------------------------------------------

/// The circuit breaker of one account (ERRORING), local to this data plane.
#[derive(Debug, Default)]
struct Breaker {
    /// Consecutive failures while closed.
    failures: u32,
    /// Open (until `open_until_ms`) or, after that, half-open.
    open: bool,
    open_until_ms: i64,
    /// The current open period; doubled by each failed probe.
    cooldown_ms: i64,
    /// Half-open: the probe is reserved until then.
    probe_until_ms: i64,
    opened_ms: i64,
    reason: String,
}

impl Breaker {
    fn idle(&self) -> bool {
        self.failures == 0 && !self.open
    }

    /// The upstream answered: the count restarts; a half-open breaker closes. A late answer to a
    /// request sent before the breaker opened does not cut the open period short.
    fn on_success(&mut self, now: i64) {
        self.failures = 0;
        if self.open && now >= self.open_until_ms {
            *self = Breaker::default();
        }
    }

    /// Returns the reason when the breaker (re)opened.
    fn on_failure(&mut self, what: &str, s: &HealthSettings, now: i64) -> Option<String> {
        let max = ms(s.max);
        if self.open {
            if now < self.open_until_ms {
                // A request sent before the breaker opened: the open period already accounts for it.
                return None;
            }
            self.cooldown_ms = self.cooldown_ms.saturating_mul(2).max(ms(s.erroring)).min(max);
            self.reason = format!(
                "probe failed ({what}): breaker reopened for {}",
                fmt_ms(self.cooldown_ms)
            );
        } else {
            self.failures = self.failures.saturating_add(1);
            if self.failures < s.breaker_threshold.max(1) {
                return None;
            }
            self.cooldown_ms = ms(s.erroring).min(max);
            self.reason = format!(
                "{} consecutive failures (last: {what}): breaker open for {}",
                self.failures,
                fmt_ms(self.cooldown_ms)
            );
        }
        self.open = true;
        self.opened_ms = now;
        self.open_until_ms = now.saturating_add(self.cooldown_ms);
        self.probe_until_ms = 0;
        Some(self.reason.clone())
    }
}

#[derive(Debug)]
struct LocalState {
    state: pb::AccountState,
    /// The fleet view has shown a state for this account and scope since this one was set.
    acked: bool,
}

/// Everything known about one account.
#[derive(Debug, Default)]
struct Tracked {
    /// Observed here, one per scope.
    local: Vec<LocalState>,
    /// The fleet's view, from the last config.
    shared: Vec<pb::AccountState>,
    breaker: Breaker,
}

fn is_live(st: &pb::AccountState, now: i64) -> bool {
    st.health != pb::AccountHealth::Unspecified as i32 && (st.until_ms == 0 || st.until_ms > now)
}

/// Whether a known state makes a new one (same scope) not worth recording or reporting.
fn dominates(known: &pb::AccountState, health: pb::AccountHealth, until: i64, now: i64) -> bool {
    if !is_live(known, now) {
        return false;
    }
    if known.until_ms == 0 {
        return until != 0 || known.health == health as i32;
    }
    until != 0 && until <= known.until_ms.saturating_add(MATERIAL_MS)
}

/// Whether `a` restricts more than `b` (same account and scope).
fn outranks(a: &pb::AccountState, b: &pb::AccountState) -> bool {
    match (a.until_ms, b.until_ms) {
        (_, 0) => false,
        (0, _) => true,
        (x, y) => x > y,
    }
}

impl Tracked {
    fn idle(&self) -> bool {
        self.local.is_empty() && self.shared.is_empty() && self.breaker.idle()
    }

    fn availability(&mut self, family: &str, now: i64) -> Availability {
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

    fn apply(
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

    fn known(&self) -> impl Iterator<Item = &pb::AccountState> {
        self.local.iter().map(|l| &l.state).chain(self.shared.iter())
    }

    fn set_local(&mut self, new: NewState, account_id: &str, node_id: &str, now: i64) -> Option<pb::AccountState> {
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
    fn reconcile(&mut self, now: i64) {
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

fn state(
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
fn prefer(report: &mut Option<pb::AccountState>, new: pb::AccountState) {
    if report
        .as_ref()
        .is_some_and(|r| r.scope.is_empty() && !new.scope.is_empty())
    {
        return;
    }
    *report = Some(new);
}

/// Account health as this data plane sees it, merged with the fleet's view. One per data plane,
/// behind an `Arc`.
#[derive(Debug)]
pub struct HealthRegistry {
    node_id: String,
    accounts: RwLock<HashMap<Box<str>, Mutex<Tracked>>>,
    /// Each account's `reset_generation` in the config served: when it moves, an operator cleared
    /// the account (reset, enable, new credential or route) and everything known here goes too.
    generations: RwLock<HashMap<String, u64>>,
    /// Subscription accounts' quota windows, this data plane's and the fleet's newest.
    pub quotas: super::quota::Quotas,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl HealthRegistry {
    pub fn new(node_id: &str) -> Self {
        Self {
            node_id: node_id.to_string(),
            accounts: RwLock::new(HashMap::new()),
            generations: RwLock::new(HashMap::new()),
            quotas: super::quota::Quotas::default(),
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000_000;
    const OPUS: &str = "claude-opus-4-1-20250805";
    const SONNET: &str = "claude-sonnet-4-5-20250929";

    fn hm(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    fn err_body(kind: &str, message: &str) -> Vec<u8> {
        serde_json::json!({"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_1"})
            .to_string()
            .into_bytes()
    }

    fn rfc3339(ms: i64) -> String {
        chrono::DateTime::from_timestamp_millis(ms).unwrap().to_rfc3339()
    }

    fn respond(
        reg: &HealthRegistry,
        account: &str,
        model: &str,
        status: u16,
        headers: &[(&str, &str)],
        body: &[u8],
        now: i64,
    ) -> (Verdict, Option<pb::AccountState>) {
        respond_with(
            reg,
            account,
            model,
            status,
            headers,
            body,
            &HealthSettings::default(),
            now,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn respond_with(
        reg: &HealthRegistry,
        account: &str,
        model: &str,
        status: u16,
        headers: &[(&str, &str)],
        body: &[u8],
        s: &HealthSettings,
        now: i64,
    ) -> (Verdict, Option<pb::AccountState>) {
        let h = hm(headers);
        let outcome = Outcome::Response {
            status,
            headers: &h,
            body,
        };
        reg.observe(account, model, &outcome, s, now)
    }

    fn fail(reg: &HealthRegistry, account: &str, now: i64) -> Option<pb::AccountState> {
        respond(reg, account, SONNET, 502, &[], b"bad gateway", now).1
    }

    fn ok(reg: &HealthRegistry, account: &str, now: i64) -> Option<pb::AccountState> {
        reg.on_success(account, SONNET, &HeaderMap::new(), &HealthSettings::default(), now)
    }

    fn shared(account: &str, health: pb::AccountHealth, scope: &str, until_ms: i64, since_ms: i64) -> pb::AccountState {
        pb::AccountState {
            account_id: account.into(),
            health: health as i32,
            reason: "from the fleet".into(),
            until_ms,
            scope: scope.into(),
            since_ms,
            reported_by: "dp-other".into(),
            reset_generation: 0,
        }
    }

    // ---- settings ----

    #[test]
    fn settings_defaults_and_keys() {
        let d = HealthSettings::default();
        assert_eq!(d.rate_limit_default, Duration::from_secs(60));
        assert_eq!(d.overloaded, Duration::from_secs(30));
        assert_eq!(d.erroring, Duration::from_secs(30));
        assert_eq!(d.max, Duration::from_secs(6 * 3600));
        assert_eq!(d.breaker_threshold, 3);
        assert_eq!(d.unified_threshold, 0.98);
        assert_eq!(HealthSettings::from_settings(&BTreeMap::new()), d);

        let values: BTreeMap<String, String> = [
            ("cooldown.rate_limit_default_ms", "5000"),
            ("cooldown.overloaded_ms", "7000"),
            ("cooldown.erroring_ms", " 9000 "),
            ("cooldown.max_ms", "600000"),
            ("cooldown.min_ms", "250"),
            ("breaker.threshold", "5"),
            ("unified.threshold", "0.9"),
            ("account.acc-1.cooldown.max_ms", "1000"),
            ("head_timeout_ms", "1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let s = HealthSettings::from_settings(&values);
        assert_eq!(
            s,
            HealthSettings {
                rate_limit_default: Duration::from_millis(5000),
                overloaded: Duration::from_millis(7000),
                erroring: Duration::from_millis(9000),
                max: Duration::from_millis(600_000),
                min: Duration::from_millis(250),
                breaker_threshold: 5,
                unified_threshold: 0.9,
            },
            "global keys apply, account overrides do not"
        );
    }

    #[test]
    fn settings_invalid_values_keep_defaults_and_percent_threshold() {
        let values: BTreeMap<String, String> = [
            ("cooldown.overloaded_ms", "soon"),
            ("cooldown.erroring_ms", "-5"),
            ("breaker.threshold", "0"),
            ("unified.threshold", "95"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let s = HealthSettings::from_settings(&values);
        assert_eq!(s.overloaded, Duration::from_secs(30));
        assert_eq!(s.erroring, Duration::from_secs(30));
        assert_eq!(s.breaker_threshold, 3, "a threshold of 0 is ignored");
        assert!((s.unified_threshold - 0.95).abs() < 1e-9, "95 means 95 %");
        for bad in ["NaN", "-0.5", "0", "250"] {
            let v: BTreeMap<String, String> = [("unified.threshold".to_string(), bad.to_string())].into();
            assert_eq!(HealthSettings::from_settings(&v).unified_threshold, 0.98, "{bad}");
        }
    }

    #[test]
    fn settings_per_account_overrides() {
        let values: BTreeMap<String, String> = [
            ("cooldown.max_ms", "600000"),
            ("breaker.threshold", "4"),
            ("account.acc-1.breaker.threshold", "1"),
            ("account.acc-1.cooldown.max_ms", "1000"),
            ("account.acc-10.cooldown.overloaded_ms", "1"),
            ("account.acc.1.cooldown.erroring_ms", "2"),
            ("account.acc-1.breaker.threshold.bogus", "9"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let global = HealthSettings::from_settings(&values);
        let one = global.for_account(&values, "acc-1");
        assert_eq!(one.breaker_threshold, 1);
        assert_eq!(one.max, Duration::from_millis(1000));
        assert_eq!(
            one.overloaded,
            Duration::from_secs(30),
            "acc-10's override is not acc-1's"
        );
        assert_eq!(one.erroring, Duration::from_secs(30));
        let dotted = global.for_account(&values, "acc.1");
        assert_eq!(dotted.erroring, Duration::from_millis(2), "ids with dots work");
        assert_eq!(dotted.breaker_threshold, 4);
        let other = global.for_account(&values, "acc-2");
        assert_eq!(other, global);
    }

    #[test]
    fn per_account_overrides_drive_the_breaker_and_caps() {
        let values: BTreeMap<String, String> = [
            ("account.flaky.breaker.threshold", "1"),
            ("account.flaky.cooldown.erroring_ms", "5000"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let global = HealthSettings::from_settings(&values);
        let reg = HealthRegistry::new("dp-1");
        for account in ["flaky", "steady"] {
            let s = global.for_account(&values, account);
            let _ = reg.observe(account, SONNET, &Outcome::ConnectError, &s, NOW);
        }
        assert_eq!(reg.availability("flaky", SONNET, NOW), Availability::At(NOW + 5000));
        assert_eq!(reg.availability("steady", SONNET, NOW), Availability::Now);
    }

    // ---- model families ----

    #[test]
    fn model_families() {
        assert_eq!(model_family("claude-opus-4-1-20250805"), "opus");
        assert_eq!(model_family("claude-3-opus-20240229"), "opus");
        assert_eq!(model_family("claude-sonnet-4-5"), "sonnet");
        assert_eq!(model_family("claude-3-5-Sonnet-latest"), "sonnet");
        assert_eq!(model_family("claude-haiku-4-5"), "haiku");
        assert_eq!(model_family("gpt-4o"), "");
        assert_eq!(model_family(""), "");
    }

    // ---- rate limits ----

    #[test]
    fn retry_after_limits_the_account_until_then() {
        let reg = HealthRegistry::new("dp-1");
        let body = err_body(
            "rate_limit_error",
            "Number of request tokens has exceeded your per-minute rate limit",
        );
        let (v, report) = respond(&reg, "a", SONNET, 429, &[("retry-after", "30")], &body, NOW);
        assert_eq!(
            v,
            Verdict {
                retry_elsewhere: true,
                retry_after: Some(Duration::from_secs(30))
            }
        );
        let st = report.expect("a new state is reported");
        assert_eq!(st.account_id, "a");
        assert_eq!(st.health, pb::AccountHealth::RateLimited as i32);
        assert_eq!(st.scope, "");
        assert_eq!(st.until_ms, NOW + 30_000);
        assert_eq!(st.since_ms, NOW);
        assert_eq!(st.reported_by, "dp-1");
        assert_eq!(st.reason, "429 rate_limit_error: retry-after 30s");
        assert_eq!(reg.availability("a", SONNET, NOW), Availability::At(NOW + 30_000));
        assert_eq!(
            reg.availability("a", OPUS, NOW + 29_999),
            Availability::At(NOW + 30_000)
        );
        assert_eq!(
            reg.availability("a", SONNET, NOW + 30_000),
            Availability::Now,
            "expired = healthy"
        );
        assert_eq!(
            reg.availability("b", SONNET, NOW),
            Availability::Now,
            "other accounts unaffected"
        );
    }

    #[test]
    fn retry_after_variants() {
        let reg = HealthRegistry::new("dp-1");
        let (v, st) = respond(&reg, "a", SONNET, 429, &[("retry-after-ms", "1500")], b"", NOW);
        assert_eq!(v.retry_after, Some(Duration::from_millis(1500)));
        assert_eq!(st.unwrap().until_ms, NOW + 1500);
        let date = chrono::DateTime::from_timestamp_millis(NOW + 120_000)
            .unwrap()
            .to_rfc2822();
        let (v, st) = respond(&reg, "b", SONNET, 429, &[("retry-after", &date)], b"", NOW);
        assert_eq!(v.retry_after, Some(Duration::from_secs(120)));
        assert_eq!(st.unwrap().until_ms, NOW + 120_000);
        let (v, st) = respond(&reg, "c", SONNET, 429, &[("retry-after", "2.5")], b"", NOW);
        assert_eq!(v.retry_after, Some(Duration::from_millis(2500)));
        assert_eq!(st.unwrap().until_ms, NOW + 2500);
    }

    #[test]
    fn ratelimit_reset_headers_take_the_exhausted_limit() {
        let reg = HealthRegistry::new("dp-1");
        let tokens_reset = rfc3339(NOW + 42_000);
        let requests_reset = rfc3339(NOW + 50_000);
        let output_reset = rfc3339(NOW + 45_000);
        let h = [
            ("anthropic-ratelimit-requests-remaining", "3"),
            ("anthropic-ratelimit-requests-reset", requests_reset.as_str()),
            ("anthropic-ratelimit-tokens-remaining", "0"),
            ("anthropic-ratelimit-tokens-reset", tokens_reset.as_str()),
            ("anthropic-ratelimit-output-tokens-remaining", "0"),
            ("anthropic-ratelimit-output-tokens-reset", output_reset.as_str()),
        ];
        let (v, st) = respond(&reg, "a", SONNET, 429, &h, b"", NOW);
        assert_eq!(v.retry_after, None);
        let st = st.unwrap();
        assert_eq!(st.until_ms, NOW + 45_000, "the latest reset among the exhausted limits");
        assert_eq!(
            st.reason,
            "429 rate_limit_error: anthropic-ratelimit-output-tokens-reset"
        );

        // None exhausted: the latest given.
        let h = [
            ("anthropic-ratelimit-requests-remaining", "3"),
            ("anthropic-ratelimit-requests-reset", requests_reset.as_str()),
            ("anthropic-ratelimit-tokens-remaining", "10"),
            ("anthropic-ratelimit-tokens-reset", tokens_reset.as_str()),
        ];
        let (_, st) = respond(&reg, "b", SONNET, 429, &h, b"", NOW);
        assert_eq!(st.unwrap().until_ms, NOW + 50_000);

        // retry-after wins over the reset headers.
        let h = [
            ("retry-after", "7"),
            ("anthropic-ratelimit-tokens-remaining", "0"),
            ("anthropic-ratelimit-tokens-reset", tokens_reset.as_str()),
        ];
        let (_, st) = respond(&reg, "c", SONNET, 429, &h, b"", NOW);
        assert_eq!(st.unwrap().until_ms, NOW + 7_000);
    }

    #[test]
    fn unified_reset_limits_a_subscription_account() {
        let reg = HealthRegistry::new("dp-1");
        let reset_s = ((NOW + 3_600_000) / 1000).to_string();
        let h = [
            ("anthropic-ratelimit-unified-status", "rejected"),
            ("anthropic-ratelimit-unified-reset", reset_s.as_str()),
        ];
        let (v, st) = respond(&reg, "a", SONNET, 429, &h, b"", NOW);
        assert!(v.retry_elsewhere);
        let st = st.unwrap();
        assert_eq!(st.until_ms, NOW + 3_600_000);
        assert_eq!(st.health, pb::AccountHealth::RateLimited as i32);
        assert!(st.reason.contains("unified-reset"), "{}", st.reason);
        assert_eq!(
            reg.availability("a", SONNET, NOW + 3_599_000),
            Availability::At(NOW + 3_600_000)
        );

        // A short retry-after does not undercut a rejected unified window.
        let h = [
            ("retry-after", "10"),
            ("anthropic-ratelimit-unified-status", "rejected"),
            ("anthropic-ratelimit-unified-reset", reset_s.as_str()),
        ];
        let (v, st) = respond(&reg, "b", SONNET, 429, &h, b"", NOW);
        assert_eq!(v.retry_after, Some(Duration::from_secs(10)));
        assert_eq!(st.unwrap().until_ms, NOW + 3_600_000);
    }

    #[test]
    fn a_429_without_reset_gets_the_default() {
        let reg = HealthRegistry::new("dp-1");
        let (v, st) = respond(
            &reg,
            "a",
            SONNET,
            429,
            &[],
            &err_body("rate_limit_error", "slow down"),
            NOW,
        );
        assert_eq!(
            v,
            Verdict {
                retry_elsewhere: true,
                retry_after: None
            }
        );
        let st = st.unwrap();
        assert_eq!(st.until_ms, NOW + 60_000);
        assert_eq!(st.reason, "429 rate_limit_error: no reset given, default 1m");

        let s = HealthSettings {
            rate_limit_default: Duration::from_secs(5),
            ..HealthSettings::default()
        };
        let (_, st) = respond_with(&reg, "b", SONNET, 429, &[], b"", &s, NOW);
        assert_eq!(st.unwrap().until_ms, NOW + 5_000);
    }

    #[test]
    fn rate_limits_are_capped_at_max_and_floored() {
        let reg = HealthRegistry::new("dp-1");
        let (v, st) = respond(&reg, "a", SONNET, 429, &[("retry-after", "100000")], b"", NOW);
        assert_eq!(
            v.retry_after,
            Some(Duration::from_secs(100_000)),
            "the client is told what upstream said"
        );
        let st = st.unwrap();
        assert_eq!(st.until_ms, NOW + 6 * 3_600_000);
        assert!(st.reason.ends_with("(capped)"), "{}", st.reason);

        let s = HealthSettings {
            max: Duration::from_secs(10),
            ..HealthSettings::default()
        };
        let far = rfc3339(NOW + 3_600_000);
        let h = [
            ("anthropic-ratelimit-tokens-remaining", "0"),
            ("anthropic-ratelimit-tokens-reset", far.as_str()),
        ];
        let (_, st) = respond_with(&reg, "b", SONNET, 429, &h, b"", &s, NOW);
        assert_eq!(st.unwrap().until_ms, NOW + 10_000);

        // A reset already in the past (clock skew) still keeps the account out briefly.
        let past = rfc3339(NOW - 5_000);
        let h = [
            ("anthropic-ratelimit-tokens-remaining", "0"),
            ("anthropic-ratelimit-tokens-reset", past.as_str()),
        ];
        let (_, st) = respond(&reg, "c", SONNET, 429, &h, b"", NOW);
        assert_eq!(st.unwrap().until_ms, NOW + MIN_STATE_MS);
        // ... as long as `cooldown.min_ms` says.
        let s = HealthSettings::from_settings(&[(KEY_MIN.to_string(), "50".to_string())].into_iter().collect());
        let (_, st) = respond_with(&reg, "d", SONNET, 429, &h, b"", &s, NOW);
        assert_eq!(st.unwrap().until_ms, NOW + 50);
    }

    #[test]
    fn family_scoped_limit_blocks_only_that_family() {
        let reg = HealthRegistry::new("dp-1");
        let body = err_body(
            "rate_limit_error",
            "This request would exceed your organization's rate limit of 20,000 output tokens per minute for Claude Opus 4.",
        );
        let (v, st) = respond(&reg, "a", OPUS, 429, &[("retry-after", "20")], &body, NOW);
        assert!(v.retry_elsewhere);
        let st = st.unwrap();
        assert_eq!(st.scope, "opus");
        assert_eq!(st.reason, "429 rate_limit_error (opus): retry-after 20s");
        assert_eq!(reg.availability("a", OPUS, NOW), Availability::At(NOW + 20_000));
        assert_eq!(
            reg.availability("a", "claude-3-opus-20240229", NOW),
            Availability::At(NOW + 20_000)
        );
        assert_eq!(
            reg.availability("a", SONNET, NOW),
            Availability::Now,
            "sonnet still goes"
        );
        assert_eq!(reg.availability("a", "claude-haiku-4-5", NOW), Availability::Now);
        assert_eq!(reg.availability("a", "unknown-model", NOW), Availability::Now);

        // An account-wide limit blocks every family.
        let _ = respond(&reg, "a", SONNET, 429, &[("retry-after", "5")], b"", NOW);
        assert_eq!(reg.availability("a", SONNET, NOW), Availability::At(NOW + 5_000));
        assert_eq!(
            reg.availability("a", OPUS, NOW),
            Availability::At(NOW + 20_000),
            "the later one counts"
        );
        assert_eq!(reg.availability("a", OPUS, NOW + 20_000), Availability::Now);

        let scopes: Vec<(String, i64)> = reg.states(NOW).into_iter().map(|s| (s.scope, s.until_ms)).collect();
        assert_eq!(
            scopes,
            vec![("".to_string(), NOW + 5_000), ("opus".to_string(), NOW + 20_000)]
        );
    }

    #[test]
    fn message_family_prefers_the_requests_own_family() {
        assert_eq!(family_in("limits for Opus and Sonnet models", SONNET), Some("sonnet"));
        assert_eq!(family_in("limits for Opus models", SONNET), Some("opus"));
        assert_eq!(family_in("per-minute rate limit", OPUS), None);
    }

    #[test]
    fn repeated_signals_are_reported_once() {
        let reg = HealthRegistry::new("dp-1");
        let (_, first) = respond(&reg, "a", SONNET, 429, &[("retry-after", "30")], b"", NOW);
        assert!(first.is_some());
        let (v, again) = respond(&reg, "a", SONNET, 429, &[("retry-after", "30")], b"", NOW + 500);
        assert!(v.retry_elsewhere);
        assert_eq!(again, None, "ends within the tolerance of what is known: nothing new");
        let (_, later) = respond(&reg, "a", SONNET, 429, &[("retry-after", "60")], b"", NOW + 500);
        assert_eq!(later.unwrap().until_ms, NOW + 60_500, "a materially later end is news");
        let (_, shorter) = respond(&reg, "a", SONNET, 429, &[("retry-after", "1")], b"", NOW + 600);
        assert_eq!(shorter, None, "never shortens a known state");
        assert_eq!(reg.availability("a", SONNET, NOW + 600), Availability::At(NOW + 60_500));
    }

    // ---- overloaded ----

    #[test]
    fn overloaded_529_cools_down() {
        let reg = HealthRegistry::new("dp-1");
        let body = err_body("overloaded_error", "Overloaded");
        let (v, st) = respond(&reg, "a", SONNET, 529, &[], &body, NOW);
        assert_eq!(
            v,
            Verdict {
                retry_elsewhere: true,
                retry_after: None
            }
        );
        let st = st.unwrap();
        assert_eq!(st.health, pb::AccountHealth::Overloaded as i32);
        assert_eq!(st.until_ms, NOW + 30_000);
        assert_eq!(st.scope, "");
        assert_eq!(st.reason, "529 overloaded_error: cooldown 30s");
        assert_eq!(reg.availability("a", OPUS, NOW + 1), Availability::At(NOW + 30_000));
        assert_eq!(reg.availability("a", OPUS, NOW + 30_000), Availability::Now);

        let s = HealthSettings {
            overloaded: Duration::from_secs(120),
            ..HealthSettings::default()
        };
        let (_, st) = respond_with(&reg, "b", SONNET, 529, &[], &body, &s, NOW);
        assert_eq!(st.unwrap().until_ms, NOW + 120_000);
    }

    #[test]
    fn overloaded_as_first_sse_event() {
        let reg = HealthRegistry::new("dp-1");
        let s = HealthSettings::default();
        let (v, st) = reg.observe(
            "a",
            SONNET,
            &Outcome::StreamError {
                error_type: "overloaded_error",
            },
            &s,
            NOW,
        );
        assert!(v.retry_elsewhere);
        let st = st.unwrap();
        assert_eq!(st.health, pb::AccountHealth::Overloaded as i32);
        assert_eq!(st.until_ms, NOW + 30_000);
        assert_eq!(reg.availability("a", SONNET, NOW), Availability::At(NOW + 30_000));

        let (v, st) = reg.observe(
            "b",
            SONNET,
            &Outcome::StreamError {
                error_type: "invalid_request_error",
            },
            &s,
            NOW,
        );
        assert!(!v.retry_elsewhere);
        assert_eq!(st, None);
        assert_eq!(reg.availability("b", SONNET, NOW), Availability::Now);
    }

    // ---- circuit breaker ----

    #[test]
    fn breaker_opens_exactly_at_threshold() {
        let reg = HealthRegistry::new("dp-1");
        assert_eq!(fail(&reg, "a", NOW), None);
        assert_eq!(reg.availability("a", SONNET, NOW), Availability::Now);
        assert_eq!(fail(&reg, "a", NOW + 1), None);
        assert_eq!(reg.availability("a", SONNET, NOW + 1), Availability::Now);
        let st = fail(&reg, "a", NOW + 2).expect("the third failure opens the breaker");
        assert_eq!(st.health, pb::AccountHealth::Erroring as i32);
        assert_eq!(st.until_ms, NOW + 2 + 30_000);
        assert_eq!(st.scope, "");
        assert_eq!(st.reason, "3 consecutive failures (last: 502): breaker open for 30s");
        assert_eq!(reg.availability("a", SONNET, NOW + 3), Availability::At(NOW + 30_002));
        assert_eq!(reg.availability("a", OPUS, NOW + 3), Availability::At(NOW + 30_002));
    }

    #[test]
    fn every_erroring_kind_counts_and_a_success_in_between_resets() {
        let reg = HealthRegistry::new("dp-1");
        let s = HealthSettings::default();
        let (v, _) = reg.observe("a", SONNET, &Outcome::ConnectError, &s, NOW);
        assert_eq!(
            v,
            Verdict {
                retry_elsewhere: true,
                retry_after: None
            }
        );
        let (v, _) = reg.observe("a", SONNET, &Outcome::Timeout, &s, NOW);
        assert!(v.retry_elsewhere);
        assert_eq!(ok(&reg, "a", NOW), None);
        let (v, _) = respond(&reg, "a", SONNET, 500, &[], &err_body("api_error", "Internal"), NOW);
        assert!(v.retry_elsewhere);
        let (v, _) = respond(&reg, "a", SONNET, 503, &[("retry-after", "3")], b"", NOW);
        assert_eq!(v.retry_after, Some(Duration::from_secs(3)));
        assert_eq!(
            reg.availability("a", SONNET, NOW),
            Availability::Now,
            "two since the success"
        );
        let (_, st) = reg.observe(
            "a",
            SONNET,
            &Outcome::StreamError {
                error_type: "api_error",
            },
            &s,
            NOW,
        );
        assert_eq!(
            st.unwrap().reason,
            "3 consecutive failures (last: SSE api_error): breaker open for 30s"
        );
        assert_eq!(reg.availability("a", SONNET, NOW), Availability::At(NOW + 30_000));

        // Any answer from the upstream (even a client error) proves it is reachable.
        let reg = HealthRegistry::new("dp-1");
        fail(&reg, "b", NOW);
        fail(&reg, "b", NOW);
        let _ = respond(
            &reg,
            "b",
            SONNET,
            400,
            &[],
            &err_body("invalid_request_error", "bad"),
            NOW,
        );
        fail(&reg, "b", NOW);
        fail(&reg, "b", NOW);
        assert_eq!(reg.availability("b", SONNET, NOW), Availability::Now);
    }

    #[test]
    fn half_open_allows_one_probe_at_a_time() {
        let reg = HealthRegistry::new("dp-1");
        for _ in 0..3 {
            fail(&reg, "a", NOW);
        }
        let open_until = NOW + 30_000;
        assert_eq!(
            reg.availability("a", SONNET, open_until - 1),
            Availability::At(open_until)
        );
        assert_eq!(reg.availability("a", SONNET, open_until), Availability::Probe);
        let lease = open_until + 30_000;
        assert_eq!(
            reg.availability("a", SONNET, open_until),
            Availability::At(lease),
            "not a second probe"
        );
        assert_eq!(reg.availability("a", OPUS, open_until + 10), Availability::At(lease));
        // The lease runs out: the next caller probes.
        assert_eq!(reg.availability("a", SONNET, lease), Availability::Probe);
        assert_eq!(reg.availability("a", SONNET, lease), Availability::At(lease + 30_000));
        // The prober gives up: released at once.
        reg.release_probe("a");
        assert_eq!(reg.availability("a", SONNET, lease + 1), Availability::Probe);
    }

    #[test]
    fn only_one_of_many_concurrent_callers_gets_the_probe() {
        let reg = std::sync::Arc::new(HealthRegistry::new("dp-1"));
        for _ in 0..3 {
            fail(&reg, "a", NOW);
        }
        let t = NOW + 30_000;
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let reg = reg.clone();
                std::thread::spawn(move || {
                    (0..100)
                        .filter(|_| reg.availability("a", SONNET, t) == Availability::Probe)
                        .count()
                })
            })
            .collect();
        let probes: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(probes, 1);
    }

    #[test]
    fn failed_probe_doubles_the_cooldown_up_to_max() {
        let s = HealthSettings {
            max: Duration::from_secs(100),
            ..HealthSettings::default()
        };
        let reg = HealthRegistry::new("dp-1");
        for _ in 0..3 {
            let _ = reg.observe("a", SONNET, &Outcome::Timeout, &s, NOW);
        }
        let mut t = NOW + 30_000;
        assert_eq!(reg.availability("a", SONNET, t), Availability::Probe);
        let (v, st) = reg.observe("a", SONNET, &Outcome::Timeout, &s, t);
        assert!(v.retry_elsewhere);
        let st = st.expect("a reopened breaker is reported");
        assert_eq!(st.health, pb::AccountHealth::Erroring as i32);
        assert_eq!(st.until_ms, t + 60_000);
        assert_eq!(st.reason, "probe failed (timeout): breaker reopened for 1m");
        assert_eq!(reg.availability("a", SONNET, t + 59_999), Availability::At(t + 60_000));
        t += 60_000;
        assert_eq!(reg.availability("a", SONNET, t), Availability::Probe);
        let (_, st) = reg.observe("a", SONNET, &Outcome::ConnectError, &s, t);
        assert_eq!(st.unwrap().until_ms, t + 100_000, "120 s capped at max = 100 s");
        assert_eq!(reg.availability("a", SONNET, t + 1), Availability::At(t + 100_000));
    }

    #[test]
    fn late_failures_while_open_do_not_extend_it() {
        let reg = HealthRegistry::new("dp-1");
        for _ in 0..3 {
            fail(&reg, "a", NOW);
        }
        assert_eq!(fail(&reg, "a", NOW + 10_000), None);
        assert_eq!(
            reg.availability("a", SONNET, NOW + 10_000),
            Availability::At(NOW + 30_000)
        );
        // Nor does a late success cut it short.
        assert_eq!(ok(&reg, "a", NOW + 10_000), None);
        assert_eq!(
            reg.availability("a", SONNET, NOW + 10_000),
            Availability::At(NOW + 30_000)
        );
    }

    #[test]
    fn successful_probe_closes_the_breaker() {
        let reg = HealthRegistry::new("dp-1");
        for _ in 0..3 {
            fail(&reg, "a", NOW);
        }
        let t = NOW + 30_000;
        assert_eq!(reg.availability("a", SONNET, t), Availability::Probe);
        assert_eq!(ok(&reg, "a", t + 100), None, "closing is not reported");
        assert_eq!(reg.availability("a", SONNET, t + 100), Availability::Now);
        assert_eq!(reg.availability("a", SONNET, t + 100), Availability::Now);
        // Closed with a fresh count, and the next opening starts from the base cooldown again.
        assert_eq!(fail(&reg, "a", t + 200), None);
        assert_eq!(fail(&reg, "a", t + 200), None);
        assert_eq!(reg.availability("a", SONNET, t + 200), Availability::Now);
        assert_eq!(fail(&reg, "a", t + 200).unwrap().until_ms, t + 200 + 30_000);
        assert!(reg
            .states(t + 300)
            .iter()
            .any(|s| s.health == pb::AccountHealth::Erroring as i32));
    }

    #[test]
    fn probe_answered_with_a_rate_limit_closes_the_breaker_but_limits() {
        let reg = HealthRegistry::new("dp-1");
        for _ in 0..3 {
            fail(&reg, "a", NOW);
        }
        let t = NOW + 30_000;
        assert_eq!(reg.availability("a", SONNET, t), Availability::Probe);
        let (_, st) = respond(&reg, "a", SONNET, 429, &[("retry-after", "10")], b"", t);
        assert_eq!(st.unwrap().health, pb::AccountHealth::RateLimited as i32);
        assert_eq!(reg.availability("a", SONNET, t), Availability::At(t + 10_000));
        assert_eq!(reg.availability("a", SONNET, t + 10_000), Availability::Now);
    }

    // ---- unauthorized and blocked ----

    #[test]
    fn unauthorized_until_the_fleet_clears_it() {
        let reg = HealthRegistry::new("dp-1");
        let body = err_body("authentication_error", "invalid x-api-key");
        let (v, st) = respond(&reg, "a", SONNET, 401, &[], &body, NOW);
        assert_eq!(
            v,
            Verdict {
                retry_elsewhere: true,
                retry_after: None
            }
        );
        let st = st.unwrap();
        assert_eq!(st.health, pb::AccountHealth::Unauthorized as i32);
        assert_eq!(st.until_ms, 0);
        assert_eq!(st.reason, "401 authentication_error");
        assert_eq!(reg.availability("a", SONNET, NOW), Availability::Never);
        assert_eq!(reg.availability("a", OPUS, NOW + 86_400_000), Availability::Never);
        // Later signals never downgrade it.
        let (_, st) = respond(&reg, "a", SONNET, 429, &[("retry-after", "1")], b"", NOW + 1);
        assert_eq!(st, None);
        assert_eq!(reg.availability("a", SONNET, NOW + 5_000), Availability::Never);

        // The control plane records it and pushes it back; then an operator resets it.
        let fleet = shared("a", pb::AccountHealth::Unauthorized, "", 0, NOW + 50);
        reg.sync_shared_at(std::slice::from_ref(&fleet), NOW + 100);
        assert_eq!(reg.availability("a", SONNET, NOW + 100), Availability::Never);
        reg.sync_shared_at(&[], NOW + 200);
        assert_eq!(reg.availability("a", SONNET, NOW + 200), Availability::Now);
        assert!(reg.states(NOW + 200).is_empty());
    }

    #[test]
    fn unauthorized_dropped_by_a_wall_clock_sync_without_it() {
        let reg = HealthRegistry::new("dp-1");
        let _ = respond(&reg, "a", SONNET, 401, &[], b"", NOW);
        assert_eq!(reg.availability("a", SONNET, NOW), Availability::Never);
        reg.sync_shared(&[]);
        assert_eq!(reg.availability("a", SONNET, NOW), Availability::Now);
    }

    #[test]
    fn forbidden_permission_and_authentication_errors() {
        let reg = HealthRegistry::new("dp-1");
        for (account, kind) in [("a", "permission_error"), ("b", "authentication_error")] {
            let (v, st) = respond(&reg, account, SONNET, 403, &[], &err_body(kind, "no"), NOW);
            assert!(v.retry_elsewhere);
            let st = st.unwrap();
            assert_eq!(st.health, pb::AccountHealth::Unauthorized as i32);
            assert_eq!(st.reason, format!("403 {kind}"));
            assert_eq!(reg.availability(account, SONNET, NOW), Availability::Never);
        }
        // A 403 without an Anthropic body (e.g. from a proxy in front) is taken the same way.
        let (v, st) = respond(&reg, "c", SONNET, 403, &[], b"<html>Forbidden</html>", NOW);
        assert!(v.retry_elsewhere);
        assert_eq!(st.unwrap().health, pb::AccountHealth::Unauthorized as i32);
        let (_, st) = reg.observe(
            "d",
            SONNET,
            &Outcome::StreamError {
                error_type: "permission_error",
            },
            &HealthSettings::default(),
            NOW,
        );
        assert_eq!(st.unwrap().until_ms, 0);
    }

    #[test]
    fn disabled_organization_is_blocked() {
        let reg = HealthRegistry::new("dp-1");
        let body = err_body("invalid_request_error", "This organization has been disabled.");
        let (v, st) = respond(&reg, "a", SONNET, 400, &[], &body, NOW);
        assert_eq!(
            v,
            Verdict {
                retry_elsewhere: true,
                retry_after: None
            }
        );
        let st = st.unwrap();
        assert_eq!(st.health, pb::AccountHealth::Blocked as i32);
        assert_eq!(st.until_ms, 0);
        assert_eq!(st.reason, "400: organization disabled");
        assert_eq!(reg.availability("a", SONNET, NOW + 86_400_000), Availability::Never);

        let body = err_body("permission_error", "This organization has been disabled.");
        let (v, st) = respond(&reg, "b", SONNET, 403, &[], &body, NOW);
        assert!(v.retry_elsewhere);
        assert_eq!(st.unwrap().health, pb::AccountHealth::Blocked as i32);

        // Blocked after unauthorized is news (a different permanent state).
        let _ = respond(&reg, "c", SONNET, 401, &[], b"", NOW);
        let body = err_body("invalid_request_error", "This organization has been disabled.");
        let (_, st) = respond(&reg, "c", SONNET, 400, &[], &body, NOW + 1);
        assert_eq!(st.unwrap().health, pb::AccountHealth::Blocked as i32);
        let (_, st) = respond(&reg, "c", SONNET, 400, &[], &body, NOW + 2);
        assert_eq!(st, None, "the same permanent state is not news");
    }

    #[test]
    fn an_account_out_of_credit_or_at_a_wrong_url_is_the_accounts_fault() {
        let reg = HealthRegistry::new("dp-1");
        let credit = err_body(
            "invalid_request_error",
            "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits.",
        );
        let (v, st) = respond(&reg, "a", SONNET, 400, &[], &credit, NOW);
        assert!(v.retry_elsewhere);
        let st = st.unwrap();
        assert_eq!(st.health, pb::AccountHealth::Blocked as i32);
        assert!(st.reason.contains("out of credit"), "{}", st.reason);
        let (v, st) = respond(
            &reg,
            "b",
            SONNET,
            402,
            &[],
            &err_body("billing_error", "no credit"),
            NOW,
        );
        assert!(v.retry_elsewhere);
        assert_eq!(st.unwrap().health, pb::AccountHealth::Blocked as i32);
        // Anthropic's own 404 for a path that does not exist (a base URL with a stray prefix).
        let (v, _) = respond(
            &reg,
            "c",
            SONNET,
            404,
            &[],
            &err_body("not_found_error", "Not Found"),
            NOW,
        );
        assert!(v.retry_elsewhere);
        let (v, _) = respond(
            &reg,
            "d",
            SONNET,
            408,
            &[],
            &err_body("timeout_error", "Request timed out"),
            NOW,
        );
        assert!(v.retry_elsewhere);
    }

    #[test]
    fn other_client_errors_are_the_clients_fault() {
        let reg = HealthRegistry::new("dp-1");
        for (status, kind, message) in [
            (
                400,
                "invalid_request_error",
                "messages: at least one message is required",
            ),
            (404, "not_found_error", "model: claude-nonexistent"),
            (413, "request_too_large", "messages: at least one message is required"),
            (
                403,
                "invalid_request_error",
                "messages: at least one message is required",
            ),
            (
                422,
                "invalid_request_error",
                "messages: at least one message is required",
            ),
        ] {
            let body = err_body(kind, message);
            let (v, st) = respond(&reg, "a", SONNET, status, &[], &body, NOW);
            assert_eq!(
                v,
                Verdict {
                    retry_elsewhere: false,
                    retry_after: None
                },
                "{status}"
            );
            assert_eq!(st, None, "{status}");
        }
        assert_eq!(reg.availability("a", SONNET, NOW), Availability::Now);
        assert!(reg.states(NOW).is_empty());
        let (v, st) = respond(&reg, "a", SONNET, 200, &[], b"", NOW);
        assert!(!v.retry_elsewhere);
        assert_eq!(st, None);
    }

    // ---- unified utilization ----

    #[test]
    fn unified_utilization_at_threshold_limits_until_the_window_reset() {
        let reg = HealthRegistry::new("dp-1");
        let reset_5h = ((NOW + 2 * 3_600_000) / 1000).to_string();
        let reset_7d = ((NOW + 3 * 3_600_000) / 1000).to_string();
        let below = [
            ("anthropic-ratelimit-unified-status", "allowed_warning"),
            ("anthropic-ratelimit-unified-5h-utilization", "0.97"),
            ("anthropic-ratelimit-unified-5h-reset", reset_5h.as_str()),
            ("anthropic-ratelimit-unified-7d-utilization", "0.5"),
            ("anthropic-ratelimit-unified-7d-reset", reset_7d.as_str()),
        ];
        assert_eq!(
            reg.on_success("a", SONNET, &hm(&below), &HealthSettings::default(), NOW),
            None
        );
        assert_eq!(reg.availability("a", SONNET, NOW), Availability::Now);

        let at = [
            ("anthropic-ratelimit-unified-status", "allowed_warning"),
            ("anthropic-ratelimit-unified-5h-utilization", "0.98"),
            ("anthropic-ratelimit-unified-5h-reset", reset_5h.as_str()),
            ("anthropic-ratelimit-unified-7d-utilization", "0.5"),
            ("anthropic-ratelimit-unified-7d-reset", reset_7d.as_str()),
        ];
        let st = reg
            .on_success("a", SONNET, &hm(&at), &HealthSettings::default(), NOW)
            .expect("crossing the threshold is reported");
        assert_eq!(st.health, pb::AccountHealth::RateLimited as i32);
        assert_eq!(st.scope, "");
        assert_eq!(st.until_ms, NOW + 2 * 3_600_000);
        assert_eq!(st.reason, "unified 5h utilization 98.0% >= 98.0%: until reset in 2h");
        assert_eq!(
            reg.availability("a", OPUS, NOW + 1),
            Availability::At(NOW + 2 * 3_600_000)
        );
        assert_eq!(
            reg.on_success("a", SONNET, &hm(&at), &HealthSettings::default(), NOW + 10),
            None,
            "only the crossing is reported"
        );

        // The 7d window, in percent; its reset applies.
        let pct = [
            ("anthropic-ratelimit-unified-5h-utilization", "12.5"),
            ("anthropic-ratelimit-unified-5h-reset", reset_5h.as_str()),
            ("anthropic-ratelimit-unified-7d-utilization", "99.0"),
            ("anthropic-ratelimit-unified-7d-reset", reset_7d.as_str()),
        ];
        let st = reg
            .on_success("b", SONNET, &hm(&pct), &HealthSettings::default(), NOW)
            .unwrap();
        assert_eq!(st.until_ms, NOW + 3 * 3_600_000);
        assert_eq!(st.reason, "unified 7d utilization 99.0% >= 98.0%: until reset in 3h");

        // 12.5 % and 0.5 (a fraction) are both far below.
        let low = [
            ("anthropic-ratelimit-unified-5h-utilization", "12.5"),
            ("anthropic-ratelimit-unified-7d-utilization", "0.5"),
        ];
        assert_eq!(
            reg.on_success("c", SONNET, &hm(&low), &HealthSettings::default(), NOW),
            None
        );

        // A per-account threshold.
        let s = HealthSettings {
            unified_threshold: 0.9,
            ..HealthSettings::default()
        };
        let (_, st) = respond_with(&reg, "d", SONNET, 200, &below, b"", &s, NOW);
        assert_eq!(st.unwrap().until_ms, NOW + 2 * 3_600_000);
    }

    #[test]
    fn unified_rejected_status_and_cap() {
        let reg = HealthRegistry::new("dp-1");
        let reset = ((NOW + 600_000) / 1000).to_string();
        let h = [
            ("anthropic-ratelimit-unified-status", "rejected"),
            ("anthropic-ratelimit-unified-reset", reset.as_str()),
        ];
        let st = reg
            .on_success("a", SONNET, &hm(&h), &HealthSettings::default(), NOW)
            .unwrap();
        assert_eq!(st.until_ms, NOW + 600_000);
        assert_eq!(st.reason, "unified status rejected: until reset in 10m");

        let far = ((NOW + 5 * 86_400_000) / 1000).to_string();
        let h = [
            ("anthropic-ratelimit-unified-7d-utilization", "1.0"),
            ("anthropic-ratelimit-unified-7d-reset", far.as_str()),
        ];
        let st = reg
            .on_success("b", SONNET, &hm(&h), &HealthSettings::default(), NOW)
            .unwrap();
        assert_eq!(st.until_ms, NOW + 6 * 3_600_000, "capped at max");

        // A 429 whose utilization is over the threshold: both end up account-wide; the later wins.
        let reset_5h = ((NOW + 3_600_000) / 1000).to_string();
        let h = [
            ("retry-after", "30"),
            ("anthropic-ratelimit-unified-status", "allowed"),
            ("anthropic-ratelimit-unified-5h-utilization", "1.0"),
            ("anthropic-ratelimit-unified-5h-reset", reset_5h.as_str()),
        ];
        let (v, st) = respond(&reg, "c", SONNET, 429, &h, b"", NOW);
        assert_eq!(v.retry_after, Some(Duration::from_secs(30)));
        assert_eq!(st.unwrap().until_ms, NOW + 3_600_000);
        assert_eq!(reg.availability("c", SONNET, NOW), Availability::At(NOW + 3_600_000));
    }

    // ---- the fleet view ----

    #[test]
    fn shared_states_block_until_they_expire() {
        let reg = HealthRegistry::new("dp-1");
        reg.sync_shared_at(
            &[
                shared("a", pb::AccountHealth::RateLimited, "", NOW + 10_000, NOW - 1),
                shared("b", pb::AccountHealth::Overloaded, "opus", NOW + 20_000, NOW - 1),
                shared("c", pb::AccountHealth::Blocked, "", 0, NOW - 1),
                shared("d", pb::AccountHealth::Unspecified, "", 0, NOW - 1),
                shared("e", pb::AccountHealth::Erroring, "", NOW - 1, NOW - 10),
            ],
            NOW,
        );
        assert_eq!(reg.availability("a", SONNET, NOW), Availability::At(NOW + 10_000));
        assert_eq!(reg.availability("a", SONNET, NOW + 10_000), Availability::Now);
        assert_eq!(reg.availability("b", OPUS, NOW), Availability::At(NOW + 20_000));
        assert_eq!(reg.availability("b", SONNET, NOW), Availability::Now);
        assert_eq!(reg.availability("c", SONNET, NOW), Availability::Never);
        assert_eq!(
            reg.availability("d", SONNET, NOW),
            Availability::Now,
            "unspecified is ignored"
        );
        assert_eq!(reg.availability("e", SONNET, NOW), Availability::Now, "already expired");
        let ids: Vec<String> = reg.states(NOW).into_iter().map(|s| s.account_id).collect();
        assert_eq!(ids, vec!["a", "b", "c"]);
        assert_eq!(reg.states(NOW)[0].reported_by, "dp-other");
    }

    #[test]
    fn each_sync_replaces_the_fleet_view() {
        let reg = HealthRegistry::new("dp-1");
        reg.sync_shared_at(&[shared("a", pb::AccountHealth::Blocked, "", 0, NOW)], NOW);
        assert_eq!(reg.availability("a", SONNET, NOW), Availability::Never);
        reg.sync_shared_at(
            &[shared("b", pb::AccountHealth::RateLimited, "", NOW + 5_000, NOW)],
            NOW + 1,
        );
        assert_eq!(reg.availability("a", SONNET, NOW + 1), Availability::Now);
        assert_eq!(reg.availability("b", SONNET, NOW + 1), Availability::At(NOW + 5_000));
        reg.sync_shared_at(&[], NOW + 2);
        assert_eq!(reg.availability("b", SONNET, NOW + 2), Availability::Now);
        assert!(reg.states(NOW + 2).is_empty());
    }

    #[test]
    fn local_states_survive_a_sync_while_newer_or_in_flight() {
        let reg = HealthRegistry::new("dp-1");
        // Observed here; the report has not reached the fleet yet.
        let _ = respond(&reg, "a", SONNET, 429, &[("retry-after", "60")], b"", NOW);
        reg.sync_shared_at(&[], NOW + 1_000);
        assert_eq!(
            reg.availability("a", SONNET, NOW + 1_000),
            Availability::At(NOW + 60_000),
            "in flight: kept"
        );
        reg.sync_shared_at(&[], NOW + REPORT_GRACE_MS);
        assert_eq!(
            reg.availability("a", SONNET, NOW + REPORT_GRACE_MS),
            Availability::Now,
            "never confirmed within the grace: dropped"
        );

        // Newer than the fleet's state of the same scope: kept next to it.
        let _ = respond(&reg, "b", SONNET, 429, &[("retry-after", "60")], b"", NOW);
        let older = shared("b", pb::AccountHealth::RateLimited, "", NOW + 10_000, NOW - 5_000);
        reg.sync_shared_at(std::slice::from_ref(&older), NOW + 10);
        assert_eq!(
            reg.availability("b", SONNET, NOW + 20_000),
            Availability::At(NOW + 60_000)
        );
        // Once the fleet has shown a state and then drops it, the local one goes too (a reset).
        reg.sync_shared_at(&[], NOW + 30);
        assert_eq!(reg.availability("b", SONNET, NOW + 30), Availability::Now);

        // Older than the fleet's state: the fleet's wins.
        let _ = respond(&reg, "c", SONNET, 429, &[("retry-after", "60")], b"", NOW);
        let newer = shared("c", pb::AccountHealth::Overloaded, "", NOW + 5_000, NOW + 100);
        reg.sync_shared_at(std::slice::from_ref(&newer), NOW + 200);
        assert_eq!(reg.availability("c", SONNET, NOW + 200), Availability::At(NOW + 5_000));
        let st = reg.states(NOW + 200);
        assert_eq!(st.len(), 1);
        assert_eq!(st[0].health, pb::AccountHealth::Overloaded as i32);
    }

    #[test]
    fn known_shared_states_are_not_reported_again() {
        let reg = HealthRegistry::new("dp-1");
        reg.sync_shared_at(
            &[shared("a", pb::AccountHealth::RateLimited, "", NOW + 60_000, NOW)],
            NOW,
        );
        let (v, st) = respond(&reg, "a", SONNET, 429, &[("retry-after", "30")], b"", NOW);
        assert!(v.retry_elsewhere);
        assert_eq!(st, None, "the fleet already knows a longer limit");
        let (_, st) = respond(&reg, "a", SONNET, 429, &[("retry-after", "120")], b"", NOW);
        assert_eq!(st.unwrap().until_ms, NOW + 120_000);
    }

    #[test]
    fn breaker_counters_survive_syncs() {
        let reg = HealthRegistry::new("dp-1");
        fail(&reg, "a", NOW);
        fail(&reg, "a", NOW);
        reg.sync_shared_at(&[], NOW);
        reg.sync_shared_at(&[shared("z", pb::AccountHealth::Blocked, "", 0, NOW)], NOW);
        assert!(fail(&reg, "a", NOW).is_some(), "the third failure still opens it");
        reg.sync_shared_at(&[], NOW + 1);
        assert_eq!(reg.availability("a", SONNET, NOW + 1), Availability::At(NOW + 30_000));
        assert_eq!(reg.availability("a", SONNET, NOW + 30_000), Availability::Probe);
    }

    fn config_with(accounts: &[(&str, u64)], states: Vec<pb::AccountState>) -> pb::Resources {
        pb::Resources {
            accounts: accounts
                .iter()
                .map(|(id, generation)| pb::Account {
                    id: id.to_string(),
                    reset_generation: *generation,
                    ..Default::default()
                })
                .collect(),
            account_states: states,
            ..Default::default()
        }
    }

    #[test]
    fn every_setting_read_here_is_declared_with_its_default() {
        for key in [
            KEY_RATE_LIMIT_DEFAULT,
            KEY_OVERLOADED,
            KEY_ERRORING,
            KEY_MAX,
            KEY_MIN,
            KEY_BREAKER_THRESHOLD,
            KEY_UNIFIED_THRESHOLD,
        ] {
            assert!(settings::get(key).is_some_and(|s| s.per_account), "{key}");
        }
        let d = HealthSettings::default();
        assert_eq!(d.breaker_threshold, 3);
        assert_eq!(d.rate_limit_default, Duration::from_secs(60));
        assert_eq!(d.min, Duration::from_secs(1));
        assert_eq!(d.unified_threshold, 0.98);
    }

    #[test]
    fn an_operator_reset_clears_the_local_breaker_and_states() {
        let reg = HealthRegistry::new("dp-1");
        reg.sync_at(&config_with(&[("a", 0), ("b", 0)], vec![]), NOW);
        for _ in 0..3 {
            fail(&reg, "a", NOW);
        }
        let _ = respond(&reg, "b", SONNET, 401, &[], b"", NOW);
        assert_eq!(reg.availability("a", SONNET, NOW + 1), Availability::At(NOW + 30_000));
        assert_eq!(reg.availability("b", SONNET, NOW + 1), Availability::Never);
        // An unrelated config change keeps both.
        reg.sync_at(&config_with(&[("a", 0), ("b", 0)], vec![]), NOW + 2);
        assert_eq!(reg.availability("a", SONNET, NOW + 3), Availability::At(NOW + 30_000));
        // `account reset a`: its generation moves; b's does not.
        reg.sync_at(&config_with(&[("a", 1), ("b", 0)], vec![]), NOW + 4);
        assert_eq!(reg.availability("a", SONNET, NOW + 5), Availability::Now);
        assert_eq!(reg.availability("b", SONNET, NOW + 5), Availability::Never);
        assert_eq!(reg.generation("a"), 1, "reports now carry the new generation");
        // The report of b's 401, made before b's reset, and the reset arrive in one
        // update (the state never shown): the reset wins at once.
        reg.sync_at(&config_with(&[("a", 1), ("b", 1)], vec![]), NOW + 6);
        assert_eq!(reg.availability("b", SONNET, NOW + 7), Availability::Now);
        // A 401 answering a request sent before a's reset (with the old credential) is not a
        // verdict on the account as it is now: nothing recorded, nothing reported.
        let (_, report) = reg.observe_as_of(
            "a",
            0,
            SONNET,
            &Outcome::Response {
                status: 401,
                headers: &HeaderMap::new(),
                body: b"",
            },
            &HealthSettings::default(),
            NOW + 7,
        );
        assert_eq!(report, None);
        assert_eq!(reg.availability("a", SONNET, NOW + 7), Availability::Now);
        // The same answer to a request sent under the current generation counts, and says so.
        let (_, report) = reg.observe_as_of(
            "a",
            1,
            SONNET,
            &Outcome::Response {
                status: 401,
                headers: &HeaderMap::new(),
                body: b"",
            },
            &HealthSettings::default(),
            NOW + 7,
        );
        assert_eq!(report.map(|r| r.reset_generation), Some(1));
        // A deleted account is forgotten.
        let _ = respond(&reg, "a", SONNET, 401, &[], b"", NOW + 8);
        reg.sync_at(&config_with(&[("b", 1)], vec![]), NOW + 9);
        assert!(reg.states(NOW + 10).is_empty());
    }

    #[test]
    fn states_view_merges_local_shared_and_breaker() {
        let reg = HealthRegistry::new("dp-1");
        let _ = respond(&reg, "a", SONNET, 529, &[], b"", NOW);
        for _ in 0..3 {
            fail(&reg, "b", NOW);
        }
        reg.sync_shared_at(
            &[
                shared("a", pb::AccountHealth::RateLimited, "", NOW + 5_000, NOW - 10),
                shared("c", pb::AccountHealth::Unauthorized, "", 0, NOW - 10),
            ],
            NOW,
        );
        let view: Vec<(String, i32, i64)> = reg
            .states(NOW)
            .into_iter()
            .map(|s| (s.account_id, s.health, s.until_ms))
            .collect();
        assert_eq!(
            view,
            vec![
                ("a".into(), pb::AccountHealth::Overloaded as i32, NOW + 30_000),
                ("b".into(), pb::AccountHealth::Erroring as i32, NOW + 30_000),
                ("c".into(), pb::AccountHealth::Unauthorized as i32, 0),
            ]
        );
        assert!(reg.states(NOW + 30_000).iter().all(|s| s.account_id == "c"));
    }

    #[test]
    fn healthy_traffic_leaves_no_trace() {
        let reg = HealthRegistry::new("dp-1");
        for i in 0..10 {
            assert_eq!(ok(&reg, &format!("acc-{i}"), NOW), None);
        }
        assert!(
            reg.accounts.read().unwrap().is_empty(),
            "successes on unknown accounts insert nothing"
        );
        fail(&reg, "x", NOW);
        ok(&reg, "x", NOW);
        reg.sync_shared_at(&[], NOW);
        assert!(
            reg.accounts.read().unwrap().is_empty(),
            "idle accounts are pruned on sync"
        );
    }

    #[test]
    fn reasons_never_echo_upstream_messages() {
        let reg = HealthRegistry::new("dp-1");
        let body = err_body("authentication_error", "invalid x-api-key sk-ant-api03-SECRET");
        let (_, st) = respond(&reg, "a", SONNET, 401, &[], &body, NOW);
        assert_eq!(st.unwrap().reason, "401 authentication_error");
        // Error types are reduced to [A-Za-z0-9_], at most 40 characters.
        let body = err_body("weird type\"; with {json} and a very long tail that goes on", "x");
        let (_, st) = respond(&reg, "b", SONNET, 403, &[], &body, NOW);
        assert_eq!(st, None, "an unknown 403 type is a client error");
        let (_, st) = respond(&reg, "b", SONNET, 500, &[], &body, NOW);
        assert_eq!(st, None);
        assert_eq!(clean_type("weird type\"; with {json}"), "weirdtypewithjson");
        assert_eq!(clean_type(&"x".repeat(100)).len(), 40);
    }

    #[test]
    fn durations_format() {
        assert_eq!(fmt_ms(30_000), "30s");
        assert_eq!(fmt_ms(90_000), "1m30s");
        assert_eq!(fmt_ms(6 * 3_600_000), "6h");
        assert_eq!(fmt_ms(1_500), "1.5s");
        assert_eq!(fmt_ms(250), "250ms");
        assert_eq!(fmt_ms(0), "0s");
    }
}
