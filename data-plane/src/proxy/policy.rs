//! Request-path tunables, read from the config's settings map when a config
//! is applied (so they change fleet-wide without restarts). Every value has a
//! default that allows ten-minute non-streaming calls and long thinking pauses.
//!
//! | setting | default | meaning |
//! | --- | --- | --- |
//! | `retry.max_attempts` | 4 | attempts per client request, across accounts |
//! | `retry.deadline_ms` | 60000 | time budget for failed attempts and waiting, before a response is accepted |
//! | `retry.backoff_base_ms` / `retry.backoff_max_ms` | 25 / 1000 | jittered exponential backoff between attempts |
//! | `queue.max_wait_ms` | 30000 | how long a request may wait for an account to become available |
//! | `queue.max_size` | 1000 | requests waiting at once on this data plane |
//! | `upstream.connect_timeout_ms` | 10000 | to open a connection to an upstream (TCP, and the tunnel through its proxy) |
//! | `upstream.head_timeout_ms` | 600000 | until the upstream's response head (and, for streams, its first event) |
//! | `upstream.idle_timeout_ms` | 300000 | between two body frames of a response |
//! | `upstream.total_timeout_ms` | 3600000 | a whole response |
//! | `sticky.ttl_ms` | 3600000 | how long a session stays bound to its account without use |

use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub max_attempts: u32,
    pub retry_deadline: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub queue_max_wait: Duration,
    pub queue_max_size: usize,
    pub connect_timeout: Duration,
    pub head_timeout: Duration,
    pub idle_timeout: Duration,
    pub total_timeout: Duration,
    pub sticky_ttl: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            retry_deadline: Duration::from_secs(60),
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_secs(1),
            queue_max_wait: Duration::from_secs(30),
            queue_max_size: 1000,
            connect_timeout: Duration::from_secs(10),
            head_timeout: Duration::from_secs(600),
            idle_timeout: Duration::from_secs(300),
            total_timeout: Duration::from_secs(3600),
            sticky_ttl: Duration::from_secs(3600),
        }
    }
}

fn ms(values: &BTreeMap<String, String>, key: &str, default: Duration) -> Duration {
    values
        .get(key)
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_millis)
        .unwrap_or(default)
}

fn num<T: std::str::FromStr>(values: &BTreeMap<String, String>, key: &str, default: T) -> T {
    values.get(key).and_then(|v| v.trim().parse().ok()).unwrap_or(default)
}

impl Policy {
    pub fn from_settings(values: &BTreeMap<String, String>) -> Self {
        let d = Self::default();
        Self {
            max_attempts: num(values, "retry.max_attempts", d.max_attempts).clamp(1, 20),
            retry_deadline: ms(values, "retry.deadline_ms", d.retry_deadline),
            backoff_base: ms(values, "retry.backoff_base_ms", d.backoff_base),
            backoff_max: ms(values, "retry.backoff_max_ms", d.backoff_max),
            queue_max_wait: ms(values, "queue.max_wait_ms", d.queue_max_wait),
            queue_max_size: num(values, "queue.max_size", d.queue_max_size),
            connect_timeout: ms(values, "upstream.connect_timeout_ms", d.connect_timeout).max(Duration::from_millis(1)),
            head_timeout: ms(values, "upstream.head_timeout_ms", d.head_timeout),
            idle_timeout: ms(values, "upstream.idle_timeout_ms", d.idle_timeout),
            total_timeout: ms(values, "upstream.total_timeout_ms", d.total_timeout),
            sticky_ttl: ms(values, "sticky.ttl_ms", d.sticky_ttl),
        }
    }

    /// Jittered exponential backoff before attempt `n` (1-based retry count).
    pub fn backoff(&self, n: u32) -> Duration {
        let exp = self
            .backoff_base
            .saturating_mul(1u32 << n.min(16))
            .min(self.backoff_max);
        let jitter = rand::random::<f64>();
        exp.mul_f64(0.5 + jitter / 2.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let mut v = BTreeMap::new();
        assert_eq!(Policy::from_settings(&v), Policy::default());
        v.insert("retry.max_attempts".into(), "2".into());
        v.insert("upstream.idle_timeout_ms".into(), "1500".into());
        v.insert("queue.max_size".into(), "garbage".into());
        let p = Policy::from_settings(&v);
        assert_eq!(p.max_attempts, 2);
        assert_eq!(p.idle_timeout, Duration::from_millis(1500));
        assert_eq!(p.queue_max_size, 1000, "unparseable values keep the default");
        assert!(p.backoff(1) <= p.backoff_max && p.backoff(30) <= p.backoff_max);
    }
}
