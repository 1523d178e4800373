//! The metric catalogue: every metric relay's processes emit, with its type, unit, help text
//! and labels, declared once. The control plane, the data planes and the standalone binary call
//! [`describe_all`] at start (so every scrape carries `# HELP` and `# TYPE`), the exporter takes
//! its histogram buckets from [`MetricDef::buckets`], emit sites name metrics through the
//! constants below, and the tests check the scrape, the dashboard and the alert rules against
//! [`CATALOGUE`] (see docs/observability.md, "Metrics").
//!
//! Label sets are bounded: a label's values come from a fixed list in the code, or from what an
//! operator configured (account, group and price-table model names; data-plane node ids, bounded
//! by the fleet size). A client-chosen string is never a label value, and neither is an API
//! key's id or name unless the operator turns `metrics.key_labels` on.

/// What a metric is, as Prometheus types it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    /// The `# TYPE` word.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Which processes emit a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emitter {
    DataPlane,
    ControlPlane,
    Both,
}

impl Emitter {
    pub fn as_str(self) -> &'static str {
        match self {
            Emitter::DataPlane => "data plane",
            Emitter::ControlPlane => "control plane",
            Emitter::Both => "both",
        }
    }
}

/// One metric of the catalogue.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MetricDef {
    pub name: &'static str,
    pub kind: Kind,
    /// The unit, as its base unit name (`seconds`, `revisions`, …); "" for a plain count.
    pub unit: &'static str,
    pub help: &'static str,
    /// Every label it may carry.
    pub labels: &'static [&'static str],
    pub emitter: Emitter,
}

/// Buckets (seconds) for relay's own time: from 100 µs (proxying adds well under a millisecond)
/// to a second.
pub const OVERHEAD_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Buckets (seconds) for upstream and end-to-end times: from 1 ms (relay's own answers) to ten
/// minutes (a long generation streams for minutes).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0, 60.0, 120.0,
    300.0, 600.0,
];

/// Buckets (seconds) for internal calls (Redis, Postgres, the token endpoint): 250 µs to 10 s.
pub const CALL_BUCKETS: &[f64] = &[
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl MetricDef {
    /// The histogram's buckets (empty for counters and gauges).
    pub fn buckets(&self) -> &'static [f64] {
        if self.kind != Kind::Histogram {
            return &[];
        }
        match self.name {
            OVERHEAD_SECONDS => OVERHEAD_BUCKETS,
            REQUEST_HEAD_SECONDS | REQUEST_DURATION_SECONDS | UPSTREAM_TTFB_SECONDS | QUEUE_WAIT_SECONDS => {
                LATENCY_BUCKETS
            }
            _ => CALL_BUCKETS,
        }
    }
}

macro_rules! catalogue {
    ($($konst:ident = $name:literal: $kind:ident, $unit:literal, $emitter:ident, [$($label:literal),*], $help:literal;)*) => {
        $(pub const $konst: &str = $name;)*
        /// Every metric relay emits, sorted by name.
        pub const CATALOGUE: &[MetricDef] = &[$(MetricDef {
            name: $name,
            kind: Kind::$kind,
            unit: $unit,
            help: $help,
            labels: &[$($label),*],
            emitter: Emitter::$emitter,
        }),*];
    };
}

catalogue! {
    ACCEPT_ERRORS_TOTAL = "relay_accept_errors_total": Counter, "", Both, ["listener"],
        "Accept failures that were not about one connection (out of descriptors or memory); the listener backs off.";
    ACCOUNT_PROBES_TOTAL = "relay_account_probes_total": Counter, "", ControlPlane, ["verdict"],
        "Account probes (relayctl account check, and the leader's probes of accounts in trouble), by verdict.";
    ACCOUNT_QUOTA_RESETS_IN_SECONDS = "relay_account_quota_resets_in_seconds": Gauge, "seconds", ControlPlane, ["account", "window"],
        "When a subscription account's quota window resets, as the fleet last saw it.";
    ACCOUNT_QUOTA_UTILIZATION = "relay_account_quota_utilization": Gauge, "ratio", ControlPlane, ["account", "window"],
        "A subscription account's unified utilization (0..1) in its 5h and 7d windows, as the fleet last saw it.";
    ACCOUNT_STATE = "relay_account_state": Gauge, "", DataPlane, ["account", "state"],
        "1 for the state an account is in as this data plane sees it (available, rate_limited, overloaded, erroring, unauthorized, blocked, disabled), 0 for the others.";
    ACCOUNT_STATE_CHANGES_TOTAL = "relay_account_state_changes_total": Counter, "", ControlPlane, ["health"],
        "Account state reports applied, by the health reported.";
    ACCOUNT_STATE_REPORTS_IGNORED_TOTAL = "relay_account_state_reports_ignored_total": Counter, "", ControlPlane, ["reason"],
        "Account state reports ignored (made before an operator's reset).";
    ACCOUNT_STATE_REPORTS_TOTAL = "relay_account_state_reports_total": Counter, "", DataPlane, ["outcome"],
        "Account state reports sent to the control plane, by outcome.";
    ADMIN_AUTH_FAILURES_TOTAL = "relay_admin_auth_failures_total": Counter, "", ControlPlane, ["reason"],
        "Refused tokens and client certificates (unknown_token, role, no_client_certificate, node_id_mismatch).";
    ADMIN_REQUESTS_TOTAL = "relay_admin_requests_total": Counter, "", ControlPlane, ["method", "auth"],
        "Admin gRPC calls, by method and authentication outcome.";
    ATTEMPTS_TOTAL = "relay_attempts_total": Counter, "", DataPlane, ["outcome"],
        "Upstream attempts, by outcome (ok, failed, refused).";
    BUDGET_USED_RATIO = "relay_budget_used_ratio": Gauge, "ratio", DataPlane, ["subject", "group", "key", "period"],
        "Committed spend over budget (0..1+) of each group and key with a budget, by period (day, month); keys are summed up as their group's fullest key unless metrics.key_labels is on.";
    CAPTURE_DROPPED_TOTAL = "relay_capture_dropped_total": Counter, "", DataPlane, ["reason"],
        "Captures (capture rules) dropped instead of waiting: full (too many in flight), too_large (over the shipping bound), ship_failed (the control plane did not take it).";
    CAPTURES_TOTAL = "relay_captures_total": Counter, "", DataPlane, ["outcome"],
        "Captures made by capture rules, by outcome (stored, duplicate, skipped: an errors-only or account rule that did not apply in the end).";
    CLIENT_CONNECTIONS_REFUSED_TOTAL = "relay_client_connections_refused_total": Counter, "", Both, ["listener"],
        "Connections closed at once because the listener's connection cap was reached.";
    CONFIG_CACHE_ERRORS_TOTAL = "relay_config_cache_errors_total": Counter, "", DataPlane, [],
        "Failures to persist the on-disk config cache.";
    CONFIG_EPOCHS_STARTED_TOTAL = "relay_config_epochs_started_total": Counter, "", ControlPlane, [],
        "New config epochs started because the store's history was rewound (a restore).";
    CONFIG_HEAD_REVISION = "relay_config_head_revision": Gauge, "", ControlPlane, [],
        "The config head revision this control-plane replica publishes.";
    CONFIG_NACKS_TOTAL = "relay_config_nacks_total": Counter, "", ControlPlane, ["reason"],
        "Config NACKs received from data planes (invalid, diverged).";
    CONFIG_REFRESH_ERRORS_TOTAL = "relay_config_refresh_errors_total": Counter, "", ControlPlane, [],
        "Failures to reload the config head from the store.";
    CONFIG_REJECTED_RESOURCES_TOTAL = "relay_config_rejected_resources_total": Counter, "", ControlPlane, [],
        "Resources data planes reported they took out of service.";
    CONFIG_RESOURCES_OUT_OF_SERVICE = "relay_config_resources_out_of_service": Gauge, "", DataPlane, [],
        "Accounts and keys of the served config this data plane cannot use.";
    CONFIG_REVISION = "relay_config_revision": Gauge, "", DataPlane, [],
        "The config revision this data plane serves.";
    CONFIG_STREAM_FAILURES_TOTAL = "relay_config_stream_failures_total": Counter, "", DataPlane, [],
        "Config (Watch) streams to the control plane that failed.";
    CONFIG_UPDATES_SENT_TOTAL = "relay_config_updates_sent_total": Counter, "", ControlPlane, ["kind"],
        "Config updates sent to data planes (full, delta).";
    CONFIG_UPDATES_TOTAL = "relay_config_updates_total": Counter, "", DataPlane, ["outcome"],
        "Config updates received, by answer (ack, nack).";
    CONTROL_PLANE_CONNECTED = "relay_control_plane_connected": Gauge, "", DataPlane, [],
        "1 while this data plane's config stream to a control plane is open.";
    COUNT_TOKENS_ESTIMATED_TOTAL = "relay_count_tokens_estimated_total": Counter, "", DataPlane, ["why"],
        "count_tokens requests answered with relay's estimate (no_account, upstream_error, endpoint_missing).";
    DATA_PLANE_CONFIG_LAG_REVISIONS = "relay_data_plane_config_lag_revisions": Gauge, "", ControlPlane, ["node_id"],
        "Config revisions a connected data plane is behind this replica's head (the head's revision when it holds another epoch or none).";
    DATA_PLANE_CONNECTED = "relay_data_plane_connected": Gauge, "", ControlPlane, ["node_id"],
        "1 while the data plane with this node id has a config stream open to this replica, 0 after it closed.";
    DATA_PLANE_INGEST_LAG_SECONDS = "relay_data_plane_ingest_lag_seconds": Gauge, "seconds", ControlPlane, ["node_id"],
        "Age of the oldest usage event a data plane has not had acknowledged, as it reported with its last batch.";
    DATA_PLANES_NACKING = "relay_data_planes_nacking": Gauge, "", ControlPlane, [],
        "Data planes on this replica whose last answer was a NACK of an invalid config.";
    ERROR_ANSWERS_TOTAL = "relay_error_answers_total": Counter, "", DataPlane, ["type"],
        "relay's own error answers to clients, by Anthropic error type (formerly relay_relay_errors_total).";
    FAILOVERS_TOTAL = "relay_failovers_total": Counter, "", DataPlane, [],
        "Attempts made on another account after one failed.";
    GROUP_ACCOUNTS_AVAILABLE = "relay_group_accounts_available": Gauge, "", DataPlane, ["group"],
        "Accounts of a group that are enabled and in no account-wide state, as this data plane sees them.";
    GROUP_COOLDOWNS_TOTAL = "relay_group_cooldowns_total": Counter, "", DataPlane, [],
        "Group cooldowns begun (every account of the group was found unavailable).";
    GROUP_COOLING = "relay_group_cooling": Gauge, "", DataPlane, ["group"],
        "1 while the group cools down (its fallback groups go first), 0 after.";
    GRPC_REFUSED_BEFORE_DECODE_TOTAL = "relay_grpc_refused_before_decode_total": Counter, "", ControlPlane, [],
        "gRPC calls refused from their head (unknown token, or a role that may not call the service).";
    LEADER_INFO = "relay_leader_info": Gauge, "", ControlPlane, ["replica"],
        "1 on the replica that leads the singleton jobs, labelled with its replica name; 0 after it stepped down.";
    LEADER_IS_LEADER = "relay_leader_is_leader": Gauge, "", ControlPlane, [],
        "1 on the replica that leads the singleton jobs.";
    LEADER_TRANSITIONS_TOTAL = "relay_leader_transitions_total": Counter, "", ControlPlane, [],
        "Times this replica became or stopped being the leader.";
    LIMITS_CHECK_SECONDS = "relay_limits_check_seconds": Histogram, "seconds", DataPlane, [],
        "Time of one limit check in Redis.";
    LIMITS_LIVE_DATA_PLANES = "relay_limits_live_data_planes": Gauge, "", DataPlane, [],
        "Data planes live in Redis (what limits are divided by while Redis is down and limits.on_store_down is local).";
    LIMITS_MODE = "relay_limits_mode": Gauge, "", DataPlane, ["mode"],
        "1 for where limits are counted now (shared, process, degraded_local, degraded_deny, degraded_allow).";
    LIMITS_MODE_TRANSITIONS_TOTAL = "relay_limits_mode_transitions_total": Counter, "", DataPlane, ["to"],
        "Changes of limits mode (Redis lost or back).";
    LIMITS_REFUSED_TOTAL = "relay_limits_refused_total": Counter, "", DataPlane, ["limit", "subject"],
        "Requests refused by a limit of a key, group or account.";
    LIMITS_STORE_ERRORS_TOTAL = "relay_limits_store_errors_total": Counter, "", DataPlane, [],
        "Redis calls that failed or timed out.";
    MODEL_MISMATCH_TOTAL = "relay_model_mismatch_total": Counter, "", DataPlane, ["account"],
        "Answers naming another model than the request asked for.";
    NOTIFY_DELIVERIES_TOTAL = "relay_notify_deliveries_total": Counter, "", ControlPlane, ["outcome"],
        "Webhook notification delivery attempts by outcome (sent; retry: failed, tried again later; failed: given up after the attempts or age allowed).";
    NOTIFY_EVENTS_TOTAL = "relay_notify_events_total": Counter, "", ControlPlane, ["kind"],
        "Notifications queued in the outbox by event kind (account.unauthorized, data_plane.lost, budget.threshold, ...).";
    NOTIFY_OUTBOX_OLDEST_AGE_SECONDS = "relay_notify_outbox_oldest_age_seconds": Gauge, "seconds", ControlPlane, [],
        "Age of the oldest notification still waiting for delivery (0: none), on the leader replica.";
    NOTIFY_OUTBOX_PENDING = "relay_notify_outbox_pending": Gauge, "", ControlPlane, [],
        "Notifications waiting for delivery (first attempt or a retry), on the leader replica.";
    OAUTH_REFRESH_DURATION_SECONDS = "relay_oauth_refresh_duration_seconds": Histogram, "seconds", ControlPlane, [],
        "Time of one call to the OAuth token endpoint.";
    OAUTH_REFRESH_TOTAL = "relay_oauth_refresh_total": Counter, "", ControlPlane, ["outcome"],
        "Subscription token refreshes by outcome (ok, invalid_grant, transient, rejected, commit_failed).";
    OVERHEAD_SECONDS = "relay_overhead_seconds": Histogram, "seconds", DataPlane, ["route"],
        "relay's own time in a request up to its response head: the head time less the time spent waiting on upstreams, for an account slot, for the client's body and between failed attempts.";
    QUEUE_LENGTH = "relay_queue_length": Gauge, "", DataPlane, [],
        "Requests waiting for an account slot.";
    QUEUE_WAIT_SECONDS = "relay_queue_wait_seconds": Histogram, "seconds", DataPlane, [],
        "Time a request waited for an account slot.";
    QUOTA_REPORTS_TOTAL = "relay_quota_reports_total": Counter, "", DataPlane, ["outcome"],
        "Quota-window reports to the control plane (ok, failed).";
    REQUEST_BODIES_REFUSED_TOTAL = "relay_request_bodies_refused_total": Counter, "", DataPlane, ["reason"],
        "Requests refused because their key held too many body bytes.";
    REQUEST_DURATION_SECONDS = "relay_request_duration_seconds": Histogram, "seconds", DataPlane, ["stream"],
        "Time from a request's arrival to the last byte of its successful answer.";
    REQUEST_HEAD_SECONDS = "relay_request_head_seconds": Histogram, "seconds", DataPlane, ["route"],
        "Time from a request's arrival to its response head (the client's time to first byte; a stream's head comes with its first event).";
    REQUESTS_CANCELLED_TOTAL = "relay_requests_cancelled_total": Counter, "", DataPlane, [],
        "Attempts whose client went away before the answer was complete.";
    REQUESTS_REFUSED_STALE_CONFIG_TOTAL = "relay_requests_refused_stale_config_total": Counter, "", DataPlane, [],
        "Requests refused because no control plane was heard from for --max-config-staleness-mins.";
    REQUESTS_TOTAL = "relay_requests_total": Counter, "", DataPlane, ["route", "status"],
        "Requests answered, by route and status: 2xx as a class; 400, 401, 403, 404, 413, 429 and 529 exactly; other statuses as 4xx or 5xx.";
    REQUESTS_UNATTEMPTED_TOTAL = "relay_requests_unattempted_total": Counter, "", DataPlane, [],
        "Client requests (their key known) that ended without reaching an upstream; each still leaves one request-log row.";
    STICKY_EVICTIONS_TOTAL = "relay_sticky_evictions_total": Counter, "", DataPlane, [],
        "Sticky sessions evicted from the in-process session store.";
    STICKY_MOVES_TOTAL = "relay_sticky_moves_total": Counter, "", DataPlane, [],
        "Sticky sessions moved to another account.";
    STREAMS_CLOSED_TOTAL = "relay_streams_closed_total": Counter, "", ControlPlane, ["reason"],
        "Watch and Report streams ended because their token was revoked.";
    TRACE_SPANS_DROPPED_TOTAL = "relay_trace_spans_dropped_total": Counter, "", Both, [],
        "Finished spans dropped instead of exported because the OTLP export queue was full or the exporter failed (traces are off unless OTEL_EXPORTER_OTLP_ENDPOINT is set).";
    UPSTREAM_ERRORS_TOTAL = "relay_upstream_errors_total": Counter, "", DataPlane, ["kind"],
        "Upstream attempts that failed without a usable answer (connect, timeout, invalid_answer, body).";
    UPSTREAM_HEADERS_DROPPED_TOTAL = "relay_upstream_headers_dropped_total": Counter, "", DataPlane, [],
        "Allowed upstream headers dropped for size or count.";
    UPSTREAM_RESPONSES_TOTAL = "relay_upstream_responses_total": Counter, "", DataPlane, ["status"],
        "Upstream response heads, by status class.";
    UPSTREAM_STREAM_ERRORS_TOTAL = "relay_upstream_stream_errors_total": Counter, "", DataPlane, ["kind"],
        "Streams that failed after they started (failed, stalled, truncated, corrupt).";
    UPSTREAM_TTFB_SECONDS = "relay_upstream_ttfb_seconds": Histogram, "seconds", DataPlane, [],
        "Time from sending an attempt to its upstream's response head.";
    USAGE_ANOMALIES_TOTAL = "relay_usage_anomalies_total": Counter, "", DataPlane, ["anomaly"],
        "Usage events flagged suspect or unparsed when built.";
    USAGE_BATCHES_TOTAL = "relay_usage_batches_total": Counter, "", DataPlane, ["outcome"],
        "Usage batches reported to the control plane (acked, failed).";
    USAGE_COMMIT_SECONDS = "relay_usage_commit_seconds": Histogram, "seconds", ControlPlane, [],
        "Time to store one usage batch.";
    USAGE_COST_MICRO_USD_TOTAL = "relay_usage_cost_micro_usd_total": Counter, "", DataPlane, ["model", "group", "key"],
        "Cost of the usage relay recorded, in micro-USD, by price-table model pattern and key group (and key name with metrics.key_labels).";
    USAGE_EVENTS_TOTAL = "relay_usage_events_total": Counter, "", ControlPlane, ["outcome"],
        "Usage events received (inserted, duplicate, rejected).";
    USAGE_REPORT_SECONDS = "relay_usage_report_seconds": Histogram, "seconds", DataPlane, [],
        "Time from sending a usage batch to its acknowledgement.";
    USAGE_ROWS_FLAGGED_TOTAL = "relay_usage_rows_flagged_total": Counter, "", ControlPlane, ["anomaly"],
        "Usage rows stored flagged suspect or unparsed.";
    USAGE_SPOOL_DEPTH = "relay_usage_spool_depth": Gauge, "", DataPlane, [],
        "Usage events in the spool not yet acknowledged by the control plane.";
    USAGE_SPOOL_ERRORS_TOTAL = "relay_usage_spool_errors_total": Counter, "", DataPlane, [],
        "Usage events the spool's disk refused (kept in memory and sent, but not durable).";
    USAGE_SPOOL_FSYNCS_TOTAL = "relay_usage_spool_fsyncs_total": Counter, "", DataPlane, [],
        "Spool fsyncs.";
    USAGE_SPOOL_OLDEST_AGE_SECONDS = "relay_usage_spool_oldest_age_seconds": Gauge, "seconds", DataPlane, [],
        "Age of the oldest usage event not yet acknowledged by the control plane (0 when none).";
    USAGE_TOKENS_TOTAL = "relay_usage_tokens_total": Counter, "", DataPlane, ["kind", "model", "group", "key"],
        "Tokens relay recorded, by kind (input, output, cache_read, cache_write), price-table model pattern and key group (and key name with metrics.key_labels).";
    USAGE_UNPRICED_TOTAL = "relay_usage_unpriced_total": Counter, "", DataPlane, [],
        "Usage events with tokens but no price in the price table (recorded at cost 0).";
    WATCH_REFUSED_TOTAL = "relay_watch_refused_total": Counter, "", ControlPlane, ["reason"],
        "Watch streams refused (duplicate_node_id).";
    WATCH_STREAMS = "relay_watch_streams": Gauge, "", ControlPlane, [],
        "Data planes connected to this replica (open Watch streams).";
}

/// Names that were renamed, and what to use instead: kept only in the docs.
pub const DEPRECATED: &[(&str, &str)] = &[("relay_relay_errors_total", ERROR_ANSWERS_TOTAL)];

/// The catalogue entry for a metric name, or for a series name of a histogram
/// (`_bucket`, `_sum`, `_count`).
pub fn find(name: &str) -> Option<&'static MetricDef> {
    if let Some(m) = CATALOGUE.iter().find(|m| m.name == name) {
        return Some(m);
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
        let base = name.strip_suffix(suffix)?;
        CATALOGUE.iter().find(|m| m.name == base && m.kind == Kind::Histogram)
    })
}

/// Registers the type, unit and help of every metric with the installed recorder. Call once,
/// after installing it.
pub fn describe_all() {
    for m in CATALOGUE {
        let unit = match m.unit {
            "seconds" => Some(::metrics::Unit::Seconds),
            _ => None,
        };
        match (m.kind, unit) {
            (Kind::Counter, Some(u)) => ::metrics::describe_counter!(m.name, u, m.help),
            (Kind::Counter, None) => ::metrics::describe_counter!(m.name, m.help),
            (Kind::Gauge, Some(u)) => ::metrics::describe_gauge!(m.name, u, m.help),
            (Kind::Gauge, None) => ::metrics::describe_gauge!(m.name, m.help),
            (Kind::Histogram, Some(u)) => ::metrics::describe_histogram!(m.name, u, m.help),
            (Kind::Histogram, None) => ::metrics::describe_histogram!(m.name, m.help),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_sorted_and_follow_the_conventions() {
        for w in CATALOGUE.windows(2) {
            assert!(w[0].name < w[1].name, "{} then {}", w[0].name, w[1].name);
        }
        for m in CATALOGUE {
            assert!(
                m.name.starts_with("relay_") && !m.name.starts_with("relay_relay_"),
                "{}",
                m.name
            );
            assert!(
                m.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{}",
                m.name
            );
            assert_eq!(m.kind == Kind::Counter, m.name.ends_with("_total"), "{}", m.name);
            if m.unit == "seconds" {
                assert!(m.name.ends_with("_seconds"), "{}", m.name);
            }
            assert!(!m.help.is_empty() && m.help.ends_with('.'), "{}", m.name);
            assert_eq!(m.buckets().is_empty(), m.kind != Kind::Histogram, "{}", m.name);
            assert!(!m.labels.contains(&"key_id"), "{}: never a key id", m.name);
        }
    }

    #[test]
    fn histogram_series_names_resolve_to_their_histogram() {
        assert_eq!(
            find("relay_overhead_seconds_bucket").map(|m| m.name),
            Some(OVERHEAD_SECONDS)
        );
        assert_eq!(find("relay_requests_total").map(|m| m.kind), Some(Kind::Counter));
        assert!(find("relay_requests_total_count").is_none());
        assert!(find("relay_relay_errors_total").is_none());
    }

    #[test]
    fn overhead_buckets_resolve_below_a_millisecond_and_latency_ones_reach_minutes() {
        assert!(OVERHEAD_BUCKETS.iter().filter(|b| **b < 0.001).count() >= 4);
        assert!(LATENCY_BUCKETS.iter().filter(|b| (1.0..=60.0).contains(*b)).count() >= 6);
        assert!(LATENCY_BUCKETS.last().is_some_and(|b| *b >= 300.0));
    }
}
