//! Account health: what this data plane knows about each upstream account, merged with the fleet's
//! shared view (the `pb::AccountState`s the control plane pushes in the config), and the rules that
//! turn one upstream answer into a health verdict.
//!
//! # What it owns, file by file
//!
//! - `settings`: [`HealthSettings`], the cooldowns and thresholds, from the config's settings map,
//!   with per-account overrides (`account.<ACCOUNT_ID>.<key>`).
//! - `classify`: an attempt's [`Outcome`] (status, rate-limit headers, error body, SSE error event,
//!   connect error, head timeout) into a [`Verdict`] (may another account be tried? what
//!   `retry-after` to pass on?), a breaker event and, possibly, new states for the account.
//! - `ratelimit` and `error_body`: what rate-limit headers and error bodies mean for an account. Both
//!   are read by `relay_proto::anthropic` (the one parser, shared with the control plane's probes).
//! - `family`: model families, of a model id and of an upstream message.
//! - `breaker`: the local circuit breaker (ERRORING).
//! - `fleet`: what is known about one account, local states merged with the fleet's, and whether it
//!   may take a request now ([`Availability`]).
//! - `registry`: [`HealthRegistry`], one per data plane. It keeps, per account, the states observed
//!   here (to be reported to the control plane: `observe` returns them), the states the fleet shares
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

mod breaker;
mod classify;
mod error_body;
mod family;
mod fleet;
mod ratelimit;
mod registry;
#[cfg(test)]
mod registry_tests;
mod settings;

pub use classify::{Outcome, Verdict};
pub use family::model_family;
pub use fleet::{Availability, REPORT_GRACE_MS};
pub use registry::HealthRegistry;
pub use settings::{
    HealthSettings, KEY_BREAKER_THRESHOLD, KEY_ERRORING, KEY_MAX, KEY_MIN, KEY_OVERLOADED, KEY_RATE_LIMIT_DEFAULT,
    KEY_UNIFIED_THRESHOLD,
};

use std::fmt::Write as _;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A duration in whole ms (saturating).
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

/// The wall clock, unix ms.
fn wall_now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(ms).unwrap_or(0)
}

/// A per-account lock; a poisoned one is still usable (its data stays consistent).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
