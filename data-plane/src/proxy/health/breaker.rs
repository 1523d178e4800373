//! The circuit breaker of one account (ERRORING), local to this data plane: consecutive failures
//! open it for `cooldown.erroring_ms`, a failed probe reopens it for twice as long (capped at
//! `cooldown.max_ms`), any upstream answer closes it.

use super::settings::HealthSettings;
use super::{fmt_ms, ms};

/// The circuit breaker of one account (ERRORING), local to this data plane.
#[derive(Debug, Default)]
pub(super) struct Breaker {
    /// Consecutive failures while closed.
    pub(super) failures: u32,
    /// Open (until `open_until_ms`) or, after that, half-open.
    pub(super) open: bool,
    pub(super) open_until_ms: i64,
    /// The current open period; doubled by each failed probe.
    pub(super) cooldown_ms: i64,
    /// Half-open: the probe is reserved until then.
    pub(super) probe_until_ms: i64,
    pub(super) opened_ms: i64,
    pub(super) reason: String,
}

impl Breaker {
    pub(super) fn idle(&self) -> bool {
        self.failures == 0 && !self.open
    }

    /// The upstream answered: the count restarts; a half-open breaker closes. A late answer to a
    /// request sent before the breaker opened does not cut the open period short.
    pub(super) fn on_success(&mut self, now: i64) {
        self.failures = 0;
        if self.open && now >= self.open_until_ms {
            *self = Breaker::default();
        }
    }

    /// Returns the reason when the breaker (re)opened.
    pub(super) fn on_failure(&mut self, what: &str, s: &HealthSettings, now: i64) -> Option<String> {
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
