//! What one key can make a data plane hold in request bodies.
//!
//! A request body is read whole before the first attempt (relay must know the model) and kept
//! until the upstream has answered (a retry sends it again). One key sending many 32 MB bodies at
//! once would make the data plane hold all of them; [`HeldBodies`] caps the bytes one key holds
//! at once on this data plane (`--max-body-mb-per-key`). Bodies up to [`UNCOUNTED_BYTES`] are
//! not counted (no lock on the common path); a larger body counts whole from then on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Bodies up to this size are not counted.
pub const UNCOUNTED_BYTES: usize = 256 * 1024;

/// Bytes of request bodies held per key.
pub struct HeldBodies {
    limit: usize,
    held: Mutex<HashMap<Arc<str>, usize>>,
}

/// One request's share; returned when dropped.
pub struct Hold {
    owner: Arc<HeldBodies>,
    key: Arc<str>,
    bytes: usize,
}

/// The key would hold more than the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverLimit {
    pub limit: usize,
}

impl HeldBodies {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// Accounts a body that has grown to `total` bytes (no-op while it is small).
    pub fn grow(self: &Arc<Self>, hold: &mut Option<Hold>, key_id: &str, total: usize) -> Result<(), OverLimit> {
        if total <= UNCOUNTED_BYTES && hold.is_none() {
            return Ok(());
        }
        let before = hold.as_ref().map_or(0, |h| h.bytes);
        let add = total.saturating_sub(before);
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let key: Arc<str> = match hold {
            Some(h) => h.key.clone(),
            None => Arc::from(key_id),
        };
        let now = held.get(&key).copied().unwrap_or(0);
        if now + add > self.limit {
            metrics::counter!(relay_proto::metrics::REQUEST_BODIES_REFUSED_TOTAL, "reason" => "per_key_held_bytes")
                .increment(1);
            return Err(OverLimit { limit: self.limit });
        }
        held.insert(key.clone(), now + add);
        match hold {
            // Never less than was counted (a declared length is counted before the bytes come).
            Some(h) => h.bytes = h.bytes.max(total),
            None => {
                *hold = Some(Hold {
                    owner: self.clone(),
                    key,
                    bytes: total,
                })
            }
        }
        Ok(())
    }

    /// Bytes `key_id` holds now.
    pub fn held_by(&self, key_id: &str) -> usize {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.get(key_id).copied().unwrap_or(0)
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut held = self.owner.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.key) {
            *n = n.saturating_sub(self.bytes);
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn small_bodies_are_free_large_ones_count_until_dropped() {
        let h = HeldBodies::new(3 << 20);
        let mut a = None;
        h.grow(&mut a, "k", 1000).unwrap();
        assert!(a.is_none());
        h.grow(&mut a, "k", 2 << 20).unwrap();
        assert_eq!(h.held_by("k"), 2 << 20);
        let mut b = None;
        assert_eq!(h.grow(&mut b, "k", 2 << 20), Err(OverLimit { limit: 3 << 20 }));
        // Another key has its own budget.
        let mut c = None;
        h.grow(&mut c, "other", 2 << 20).unwrap();
        // A body counted from its declared length first, then as it arrives, counts once.
        let mut d = None;
        h.grow(&mut d, "d", 1 << 20).unwrap();
        for n in (1..=16).map(|i| i * (64 << 10)) {
            h.grow(&mut d, "d", n).unwrap();
        }
        assert_eq!(h.held_by("d"), 1 << 20);
        drop(d);
        assert_eq!(h.held_by("d"), 0);
        drop(a);
        assert_eq!(h.held_by("k"), 0);
        h.grow(&mut b, "k", 2 << 20).unwrap();
        assert_eq!(h.held_by("k"), 2 << 20);
        drop(b);
        drop(c);
        assert!(h.held.lock().unwrap().is_empty());
    }
}
