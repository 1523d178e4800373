//! Metric handles of the request path, made once and kept. `metrics::counter!` with labels
//! builds a key (a label vector, its hash) and looks it up in the recorder's registry on every
//! call; a kept handle is one atomic add. Handles of fixed label sets (route, status class,
//! stream) are kept in statics, made on first use: by the recorder the process installed at
//! start (a handle made before any recorder is installed stays a no-op, so a test reading these
//! metrics installs its recorder first). The usage counters, whose labels come from the config
//! (price-table model pattern, group, key name), are kept per key of the config
//! ([`UsageMeters`], in each `KeyEntry`): a new config starts with new ones.

use metrics::{Counter, Histogram};
use relay_proto::metrics as m;
use std::sync::{Arc, Mutex, OnceLock};

/// A handle made on first use.
struct Kept<T>(OnceLock<T>);

impl<T> Kept<T> {
    const fn new() -> Self {
        Self(OnceLock::new())
    }

    fn get(&self, make: impl FnOnce() -> T) -> &T {
        self.0.get_or_init(make)
    }
}

/// The `route` labels (`routes::route_label`), in a fixed order.
const ROUTES: [&str; 6] = ["messages", "count_tokens", "models", "ops", "telemetry", "other"];
/// The `status` labels (`routes::status_class`), in a fixed order.
const STATUS_CLASSES: [&str; 10] = ["2xx", "400", "401", "403", "404", "413", "429", "529", "4xx", "5xx"];

fn route_index(route: &str) -> usize {
    ROUTES.iter().position(|r| *r == route).unwrap_or(ROUTES.len() - 1)
}

fn status_index(class: &str) -> usize {
    STATUS_CLASSES
        .iter()
        .position(|c| *c == class)
        .unwrap_or(STATUS_CLASSES.len() - 1)
}

static REQUESTS: [[Kept<Counter>; STATUS_CLASSES.len()]; ROUTES.len()] =
    [const { [const { Kept::new() }; STATUS_CLASSES.len()] }; ROUTES.len()];
static HEAD_SECONDS: [Kept<Histogram>; ROUTES.len()] = [const { Kept::new() }; ROUTES.len()];
static OVERHEAD_SECONDS: [Kept<Histogram>; ROUTES.len()] = [const { Kept::new() }; ROUTES.len()];
static UPSTREAM_RESPONSES: [Kept<Counter>; STATUS_CLASSES.len()] = [const { Kept::new() }; STATUS_CLASSES.len()];
static UPSTREAM_TTFB: Kept<Histogram> = Kept::new();
static ATTEMPTS_OK: Kept<Counter> = Kept::new();
static REQUEST_DURATION: [Kept<Histogram>; 2] = [const { Kept::new() }; 2];

/// A client request answered: `relay_requests_total{route, status}`.
pub fn request_answered(route: &str, status_class: &str) {
    let (r, s) = (route_index(route), status_index(status_class));
    REQUESTS[r][s]
        .get(|| metrics::counter!(m::REQUESTS_TOTAL, "route" => ROUTES[r], "status" => STATUS_CLASSES[s]))
        .increment(1);
}

/// `relay_request_head_seconds{route}`.
pub fn request_head(route: &str, secs: f64) {
    let r = route_index(route);
    HEAD_SECONDS[r]
        .get(|| metrics::histogram!(m::REQUEST_HEAD_SECONDS, "route" => ROUTES[r]))
        .record(secs);
}

/// `relay_overhead_seconds{route}`.
pub fn overhead(route: &str, secs: f64) {
    let r = route_index(route);
    OVERHEAD_SECONDS[r]
        .get(|| metrics::histogram!(m::OVERHEAD_SECONDS, "route" => ROUTES[r]))
        .record(secs);
}

/// An upstream's response head: `relay_upstream_responses_total{status}`.
pub fn upstream_response(status_class: &str) {
    let s = status_index(status_class);
    UPSTREAM_RESPONSES[s]
        .get(|| metrics::counter!(m::UPSTREAM_RESPONSES_TOTAL, "status" => STATUS_CLASSES[s]))
        .increment(1);
}

/// `relay_upstream_ttfb_seconds`.
pub fn upstream_ttfb(secs: f64) {
    UPSTREAM_TTFB
        .get(|| metrics::histogram!(m::UPSTREAM_TTFB_SECONDS))
        .record(secs);
}

/// An attempt that answered the client: `relay_attempts_total{outcome="ok"}`.
pub fn attempt_ok() {
    ATTEMPTS_OK
        .get(|| metrics::counter!(m::ATTEMPTS_TOTAL, "outcome" => "ok"))
        .increment(1);
}

/// `relay_request_duration_seconds{stream}`.
pub fn request_duration(stream: bool, secs: f64) {
    let label = if stream { "true" } else { "false" };
    REQUEST_DURATION[usize::from(stream)]
        .get(|| metrics::histogram!(m::REQUEST_DURATION_SECONDS, "stream" => label))
        .record(secs);
}

/// A key's usage counters (`relay_usage_tokens_total` by kind, `relay_usage_cost_micro_usd_total`)
/// for one model label: input, output, cache_read, cache_write, then the cost.
pub struct UsageCounters {
    pub tokens: [Counter; 4],
    pub cost: Counter,
}

/// The usage counters of one key of one config, by model label (a price-table pattern or
/// "other"; as many as the config has patterns). Beyond [`MAX_USAGE_LABELS`] they are made per
/// call, as before.
#[derive(Default)]
pub struct UsageMeters(Mutex<Vec<(String, Arc<UsageCounters>)>>);

/// Model labels kept per key.
pub const MAX_USAGE_LABELS: usize = 64;

impl std::fmt::Debug for UsageMeters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UsageMeters")
    }
}

impl UsageMeters {
    /// The counters for `model`, made by `make` the first time.
    pub fn get(&self, model: &str, make: impl FnOnce() -> UsageCounters) -> Arc<UsageCounters> {
        let mut kept = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, c)) = kept.iter().find(|(label, _)| label == model) {
            return c.clone();
        }
        let counters = Arc::new(make());
        if kept.len() < MAX_USAGE_LABELS {
            kept.push((model.to_owned(), counters.clone()));
        }
        counters
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_label_has_its_own_handle() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // Local handles: the statics are for the process's recorder, so build the same way here.
        metrics::with_local_recorder(&recorder, || {
            let meters = UsageMeters::default();
            let make = |model: &'static str| {
                move || UsageCounters {
                    tokens: ["input", "output", "cache_read", "cache_write"]
                        .map(|kind| metrics::counter!(m::USAGE_TOKENS_TOTAL, "kind" => kind, "model" => model)),
                    cost: metrics::counter!(m::USAGE_COST_MICRO_USD_TOTAL, "model" => model),
                }
            };
            for _ in 0..3 {
                meters.get("claude-*", make("claude-*")).tokens[1].increment(5);
            }
            meters.get("other", make("other")).cost.increment(7);
            // Kept: a second maker is not called.
            meters.get("claude-*", unreachable_maker).tokens[0].increment(1);
        });
        let text = handle.render();
        assert!(
            text.contains(r#"relay_usage_tokens_total{kind="output",model="claude-*"} 15"#),
            "{text}"
        );
        assert!(
            text.contains(r#"relay_usage_tokens_total{kind="input",model="claude-*"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"relay_usage_cost_micro_usd_total{model="other"} 7"#),
            "{text}"
        );
        for (i, route) in ROUTES.iter().enumerate() {
            assert_eq!(route_index(route), i);
        }
        for (i, class) in STATUS_CLASSES.iter().enumerate() {
            assert_eq!(status_index(class), i);
        }
    }

    #[allow(clippy::panic)]
    fn unreachable_maker() -> UsageCounters {
        panic!("the counters of a kept label are made again")
    }
}
