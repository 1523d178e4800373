//! How long ago this data plane last heard from a control plane, and whether its config is too old
//! to serve.
//!
//! A data plane cut off from every control plane keeps serving its last config, including keys
//! revoked since. That is the point of a data plane, but not forever: past the maximum staleness
//! (`--max-config-staleness-mins`, default a day) it refuses requests with a 503 that says why,
//! until a control plane answers again. Contact is an open config stream; its time is kept in
//! `last_contact` in the data directory (written at least every minute while connected and when a
//! stream ends), so a restart while the control plane is away does not reset the clock.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

/// How often the contact time is written while connected.
const PERSIST_EVERY_MS: i64 = 60_000;

pub struct Freshness {
    connected: AtomicBool,
    last_contact_ms: AtomicI64,
    persisted_ms: AtomicI64,
    path: Option<PathBuf>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Freshness {
    /// Reads the last contact time kept in `dir` (else `fallback_ms`, e.g. when the cached config
    /// was written; 0: never).
    pub fn load(dir: Option<&std::path::Path>, fallback_ms: i64) -> Self {
        let path = dir.map(|d| d.join("last_contact"));
        let kept = path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|s| s.trim().parse::<i64>().ok());
        let last = kept.unwrap_or(fallback_ms).min(now_ms());
        Self {
            connected: AtomicBool::new(false),
            last_contact_ms: AtomicI64::new(last),
            persisted_ms: AtomicI64::new(last),
            path,
        }
    }

    fn persist(&self, at: i64) {
        self.persisted_ms.store(at, Ordering::Relaxed);
        if let Some(p) = &self.path {
            let tmp = p.with_extension("tmp");
            let ok = std::fs::write(&tmp, at.to_string()).and_then(|()| std::fs::rename(&tmp, p));
            if let Err(e) = ok {
                tracing::debug!(error = %e, "cannot record the last contact with the control plane");
            }
        }
    }

    /// A config stream is open.
    pub fn connected(&self) {
        let now = now_ms();
        self.last_contact_ms.store(now, Ordering::Relaxed);
        self.connected.store(true, Ordering::Release);
        self.persist(now);
    }

    /// The stream is still open (called on each message and periodically).
    pub fn touch(&self) {
        let now = now_ms();
        self.last_contact_ms.store(now, Ordering::Relaxed);
        if now - self.persisted_ms.load(Ordering::Relaxed) >= PERSIST_EVERY_MS {
            self.persist(now);
        }
    }

    /// The stream ended.
    pub fn disconnected(&self) {
        if self.connected.swap(false, Ordering::AcqRel) {
            let now = now_ms();
            self.last_contact_ms.store(now, Ordering::Relaxed);
            self.persist(now);
        }
    }

    /// How long since the last contact, when that is more than `max` (None: fresh enough).
    pub fn stale_for(&self, max: Duration) -> Option<Duration> {
        if self.connected.load(Ordering::Acquire) {
            return None;
        }
        let age = now_ms().saturating_sub(self.last_contact_ms.load(Ordering::Relaxed));
        let age = Duration::from_millis(u64::try_from(age).unwrap_or(0));
        (age > max).then_some(age)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn contact_survives_a_restart_and_staleness_counts_from_it() {
        let dir = tempfile::tempdir().unwrap();
        let f = Freshness::load(Some(dir.path()), 0);
        assert!(f.stale_for(Duration::from_secs(3600)).is_some(), "never contacted");
        f.connected();
        assert!(f.stale_for(Duration::ZERO).is_none(), "connected is fresh");
        f.disconnected();
        assert!(f.stale_for(Duration::from_secs(3600)).is_none());
        std::thread::sleep(Duration::from_millis(20));
        assert!(f.stale_for(Duration::from_millis(5)).is_some());
        // A new process reads the contact time back.
        let again = Freshness::load(Some(dir.path()), 0);
        assert!(again.stale_for(Duration::from_secs(3600)).is_none());
        // Without a record, the fallback counts.
        let other = tempfile::tempdir().unwrap();
        let old = Freshness::load(Some(other.path()), now_ms() - 10 * 3_600_000);
        assert!(old.stale_for(Duration::from_secs(3600)).is_some());
    }
}
