//! Subscription accounts' quota windows: the `anthropic-ratelimit-unified-*` headers every answer
//! from a Claude subscription account carries (5-hour and 7-day utilization, status and reset),
//! read by `relay_proto::anthropic::ratelimit`.
//!
//! Each data plane keeps the newest observation per account ([`Quotas`]), sends what it saw to the
//! control plane every few seconds and takes back the fleet's newest ([`merge`](Quotas::merge)),
//! so every data plane knows every account's headroom, even one it has not used lately. Scheduling
//! reads [`Quotas::headroom`]: within a priority tier, the account with the most headroom left
//! takes the traffic (latency and load being similar) until it is down to the others' level, so a
//! pool drains evenly rather than one account at a time (see `balance`).

use http::HeaderMap;
use relay_proto::anthropic::ratelimit::Unified;
use relay_proto::v1 as pb;
use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};

/// The least share of its weight an account keeps however little headroom it reports, so a nearly
/// used-up account still sees the odd request (and so fresh headers) until the threshold takes it out.
const MIN_HEADROOM: f64 = 0.02;

/// The quota an answer's headers describe; None when they carry no unified header (API-key
/// accounts, most error answers). Status strings are kept as sent, bounded in length.
pub fn parse(h: &HeaderMap, account_id: &str, node_id: &str, now_ms: i64) -> Option<pb::AccountQuota> {
    let u = Unified::parse(h)?;
    let bounded = |s: Option<&str>| s.map(|s| s.chars().take(32).collect::<String>()).unwrap_or_default();
    let windows: Vec<pb::QuotaWindow> = u
        .windows
        .iter()
        .filter(|w| w.present())
        .map(|w| pb::QuotaWindow {
            name: w.name.to_string(),
            utilization: w.utilization.map_or(-1.0, |x| x.min(1.0)),
            reset_ms: w.reset_ms.unwrap_or(0),
            status: bounded(w.status),
        })
        .collect();
    let status = bounded(u.status);
    let reset_ms = u.reset_ms.unwrap_or(0);
    if windows.is_empty() && status.is_empty() && reset_ms == 0 {
        return None;
    }
    Some(pb::AccountQuota {
        account_id: account_id.to_string(),
        status,
        reset_ms,
        windows,
        observed_ms: now_ms,
        observed_by: node_id.to_string(),
    })
}

/// Headroom in `MIN_HEADROOM..=1`: one minus the highest known utilization of a window that has
/// not reset yet (a window past its reset is fresh again).
pub fn headroom_of(q: &pb::AccountQuota, now_ms: i64) -> f64 {
    let used = q
        .windows
        .iter()
        .filter(|w| w.utilization >= 0.0 && (w.reset_ms == 0 || w.reset_ms > now_ms))
        .map(|w| w.utilization)
        .fold(0.0_f64, f64::max);
    (1.0 - used).clamp(MIN_HEADROOM, 1.0)
}

#[derive(Debug, Default)]
struct Entry {
    quota: pb::AccountQuota,
    /// Seen here and not yet sent to the control plane.
    unsent: bool,
}

/// The newest quota observation per account, this data plane's and the fleet's.
#[derive(Debug, Default)]
pub struct Quotas {
    map: RwLock<HashMap<String, Entry>>,
}

impl Quotas {
    /// Records what an answer said (newer observations win).
    pub fn observe(&self, q: pb::AccountQuota) {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        match map.get_mut(&q.account_id) {
            Some(e) if e.quota.observed_ms > q.observed_ms => {}
            Some(e) => {
                e.quota = q;
                e.unsent = true;
            }
            None => {
                map.insert(q.account_id.clone(), Entry { quota: q, unsent: true });
            }
        }
    }

    /// The observations made here since the last [`Self::sent`].
    pub fn unsent(&self) -> Vec<pb::AccountQuota> {
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        map.values().filter(|e| e.unsent).map(|e| e.quota.clone()).collect()
    }

    /// The control plane stored these (unless something newer came meanwhile).
    pub fn sent(&self, quotas: &[pb::AccountQuota]) {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        for q in quotas {
            if let Some(e) = map.get_mut(&q.account_id) {
                if e.quota.observed_ms <= q.observed_ms {
                    e.unsent = false;
                }
            }
        }
    }

    /// Takes in the fleet's newest observations: each replaces ours when it is newer.
    pub fn merge(&self, fleet: Vec<pb::AccountQuota>) {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        for q in fleet {
            match map.get_mut(&q.account_id) {
                Some(e) if e.quota.observed_ms >= q.observed_ms => {}
                Some(e) => {
                    e.quota = q;
                    e.unsent = false;
                }
                None => {
                    map.insert(
                        q.account_id.clone(),
                        Entry {
                            quota: q,
                            unsent: false,
                        },
                    );
                }
            }
        }
    }

    /// Forgets accounts no longer configured.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        map.retain(|id, _| keep(id));
    }

    /// Scheduling's headroom factor for the account (1 when nothing is known).
    pub fn headroom(&self, account_id: &str, now_ms: i64) -> f64 {
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        map.get(account_id).map_or(1.0, |e| headroom_of(&e.quota, now_ms))
    }

    pub fn get(&self, account_id: &str) -> Option<pb::AccountQuota> {
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        map.get(account_id).map(|e| e.quota.clone())
    }

    /// Every known observation.
    pub fn all(&self) -> Vec<pb::AccountQuota> {
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        map.values().map(|e| e.quota.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use http::{HeaderName, HeaderValue};

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(HeaderName::from_static(k), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn parses_both_windows_and_ignores_api_key_answers() {
        let h = headers(&[
            ("anthropic-ratelimit-unified-status", "allowed"),
            ("anthropic-ratelimit-unified-5h-utilization", "0.42"),
            ("anthropic-ratelimit-unified-5h-reset", "1900000000"),
            ("anthropic-ratelimit-unified-5h-status", "allowed"),
            ("anthropic-ratelimit-unified-7d-utilization", "13"),
            ("anthropic-ratelimit-unified-7d-reset", "1900500000"),
        ]);
        let q = parse(&h, "a1", "dp-1", 5).unwrap();
        assert_eq!(q.status, "allowed");
        assert_eq!(q.windows.len(), 2);
        assert_eq!(q.windows[0].name, "5h");
        assert!((q.windows[0].utilization - 0.42).abs() < 1e-9);
        assert_eq!(q.windows[0].reset_ms, 1_900_000_000_000);
        assert!(
            (q.windows[1].utilization - 0.13).abs() < 1e-9,
            "a percentage is read as such"
        );
        assert_eq!(q.observed_ms, 5);
        assert!(parse(&headers(&[("anthropic-ratelimit-requests-limit", "50")]), "a", "n", 1).is_none());
    }

    #[test]
    fn headroom_is_what_the_fullest_live_window_leaves() {
        let q = |u5: f64, u7: f64, reset5: i64| pb::AccountQuota {
            windows: vec![
                pb::QuotaWindow {
                    name: "5h".into(),
                    utilization: u5,
                    reset_ms: reset5,
                    status: String::new(),
                },
                pb::QuotaWindow {
                    name: "7d".into(),
                    utilization: u7,
                    reset_ms: 0,
                    status: String::new(),
                },
            ],
            ..Default::default()
        };
        assert!((headroom_of(&q(0.8, 0.1, 0), 100) - 0.2).abs() < 1e-9);
        assert!(
            (headroom_of(&q(0.8, 0.1, 50), 100) - 0.9).abs() < 1e-9,
            "a reset window is fresh"
        );
        assert_eq!(headroom_of(&q(1.0, 1.0, 0), 0), MIN_HEADROOM);
        assert_eq!(headroom_of(&q(-1.0, -1.0, 0), 0), 1.0, "unknown utilization");
    }

    #[test]
    fn newest_observation_wins_and_sent_ones_are_not_resent() {
        let qs = Quotas::default();
        let at = |t: i64, u: f64| pb::AccountQuota {
            account_id: "a".into(),
            observed_ms: t,
            windows: vec![pb::QuotaWindow {
                name: "5h".into(),
                utilization: u,
                reset_ms: 0,
                status: String::new(),
            }],
            ..Default::default()
        };
        qs.observe(at(10, 0.5));
        qs.observe(at(5, 0.9));
        assert!((qs.headroom("a", 0) - 0.5).abs() < 1e-9);
        let unsent = qs.unsent();
        assert_eq!(unsent.len(), 1);
        qs.sent(&unsent);
        assert!(qs.unsent().is_empty());
        qs.merge(vec![at(20, 0.75)]);
        assert!((qs.headroom("a", 0) - 0.25).abs() < 1e-9);
        qs.merge(vec![at(15, 0.0)]);
        assert!(
            (qs.headroom("a", 0) - 0.25).abs() < 1e-9,
            "an older fleet view does not win"
        );
        assert_eq!(qs.headroom("other", 0), 1.0);
    }
}
