//! Request-path tunables, read from the config's settings map when a config
//! is applied (so they change fleet-wide without restarts). Every value has a
//! default that allows ten-minute non-streaming calls and long thinking pauses.
//!
//! Names, types, ranges and defaults are declared in `relay_proto::settings`.

use relay_proto::settings;
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Failed attempts that took real time (see `quick_failure`) allowed per request.
    pub max_attempts: u32,
    /// A failed attempt quicker than this costs no attempt.
    pub quick_failure: Duration,
    pub retry_deadline: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub queue_max_wait: Duration,
    pub queue_max_size: usize,
    pub connect_timeout: Duration,
    /// `upstream.http_version`: HTTP/1.1, HTTP/2 or whichever the upstream offers.
    pub http_version: crate::upstream::client::HttpVersion,
    pub head_timeout: Duration,
    pub idle_timeout: Duration,
    pub total_timeout: Duration,
    pub sticky_ttl: Duration,
    /// How long a group whose accounts have all failed lets its fallbacks go first
    /// (`groups.cooldown_ms`; zero: never).
    pub group_cooldown: Duration,
    /// Clients see the upstream account's `anthropic-ratelimit-*` headers.
    pub expose_ratelimit: bool,
    /// The token, cost and budget metrics carry a `key` label (`metrics.key_labels`).
    pub key_labels: bool,
    /// Upstreams see the client's `x-forwarded-*`, `forwarded`, `x-real-ip` and `via` headers.
    pub forward_client_ip: bool,
    /// `tracing.propagate_upstream`: send the attempt's `traceparent` upstream.
    pub propagate_upstream: bool,
    /// `log.success_sample`: share of successful requests whose log line is written.
    pub success_sample: f64,
    /// What limited requests get while Redis is down (`limits.on_store_down`).
    pub limits_on_store_down: relay_limits::Policy,
    /// Every limit check's bound on Redis (`limits.store_timeout_ms`).
    pub limits_store_timeout: Duration,
    /// Cache reads count towards tokens per minute (`limits.count_cache_reads`).
    pub count_cache_reads: bool,
    /// Budgets' days and months (`limits.timezone`).
    pub timezone: chrono_tz::Tz,
    /// Browser origins allowed to call the Messages API (`cors.allowed_origins`; off when unset).
    pub cors: super::cors::Cors,
}

impl Default for Policy {
    fn default() -> Self {
        Self::from_settings(&BTreeMap::new())
    }
}

/// A declared setting's value (`relay_proto::settings`: range checked, else its default).
fn value(values: &BTreeMap<String, String>, name: &str) -> u64 {
    settings::known(name).u64_in(values)
}

fn ms(values: &BTreeMap<String, String>, name: &str) -> Duration {
    Duration::from_millis(value(values, name))
}

impl Policy {
    pub fn from_settings(values: &BTreeMap<String, String>) -> Self {
        Self {
            max_attempts: u32::try_from(value(values, "retry.max_attempts")).unwrap_or(u32::MAX),
            quick_failure: ms(values, "retry.quick_failure_ms"),
            retry_deadline: ms(values, "retry.deadline_ms"),
            backoff_base: ms(values, "retry.backoff_base_ms"),
            backoff_max: ms(values, "retry.backoff_max_ms"),
            queue_max_wait: ms(values, "queue.max_wait_ms"),
            queue_max_size: usize::try_from(value(values, "queue.max_size")).unwrap_or(usize::MAX),
            connect_timeout: ms(values, "upstream.connect_timeout_ms"),
            http_version: crate::upstream::client::HttpVersion::parse(
                settings::known("upstream.http_version").choice_in(values),
            )
            .unwrap_or_default(),
            head_timeout: ms(values, "upstream.head_timeout_ms"),
            idle_timeout: ms(values, "upstream.idle_timeout_ms"),
            total_timeout: ms(values, "upstream.total_timeout_ms"),
            sticky_ttl: ms(values, "sticky.ttl_ms"),
            group_cooldown: ms(values, "groups.cooldown_ms"),
            expose_ratelimit: settings::known("headers.expose_ratelimit").bool_in(values),
            forward_client_ip: settings::known("headers.forward_client_ip").bool_in(values),
            key_labels: settings::known("metrics.key_labels").bool_in(values),
            propagate_upstream: settings::known("tracing.propagate_upstream").bool_in(values),
            success_sample: {
                let s = settings::known("log.success_sample");
                s.fraction_of(values.get(s.name).map(String::as_str))
            },
            limits_on_store_down: relay_limits::Policy::parse(
                settings::known("limits.on_store_down").choice_in(values),
            ),
            limits_store_timeout: ms(values, "limits.store_timeout_ms"),
            count_cache_reads: settings::known("limits.count_cache_reads").bool_in(values),
            timezone: settings::known("limits.timezone").tz_in(values),
            cors: super::cors::Cors::from_settings(values),
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
        let d = Policy::default();
        assert_eq!(
            (d.max_attempts, d.retry_deadline, d.connect_timeout, d.head_timeout),
            (
                4,
                Duration::from_secs(60),
                Duration::from_secs(10),
                Duration::from_secs(600)
            ),
            "the declared defaults"
        );
        for name in [
            "retry.max_attempts",
            "retry.quick_failure_ms",
            "retry.deadline_ms",
            "retry.backoff_base_ms",
            "retry.backoff_max_ms",
            "queue.max_wait_ms",
            "queue.max_size",
            "upstream.connect_timeout_ms",
            "upstream.head_timeout_ms",
            "upstream.idle_timeout_ms",
            "upstream.total_timeout_ms",
            "sticky.ttl_ms",
            "groups.cooldown_ms",
        ] {
            assert!(settings::get(name).is_some(), "{name} is declared");
        }
        assert!(p.backoff(1) <= p.backoff_max && p.backoff(30) <= p.backoff_max);
        assert_eq!(
            d.group_cooldown,
            Duration::from_secs(600),
            "ten minutes, as cc-forwarder"
        );
    }
}
