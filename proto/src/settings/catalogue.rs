//! The catalogue: every setting relay accepts, with its type, range, default and meaning.

use super::{Setting, Type};

const HOUR_MS: u64 = 3_600_000;
const DAY_MS: u64 = 24 * HOUR_MS;

const fn ms(name: &'static str, min: u64, max: u64, default: &'static str, description: &'static str) -> Setting {
    Setting {
        name,
        ty: Type::Millis,
        min,
        max,
        default,
        per_account: false,
        choices: &[],
        description,
    }
}

const fn per_account(s: Setting) -> Setting {
    Setting { per_account: true, ..s }
}

/// Every setting, by name.
pub const SETTINGS: &[Setting] = &[
    ms(
        "breaker.threshold",
        1,
        1_000_000,
        "3",
        "consecutive failures (5xx, timeouts, connect errors) that open an account's circuit breaker",
    )
    .count()
    .account(),
    per_account(ms(
        "cooldown.erroring_ms",
        1,
        DAY_MS,
        "30000",
        "how long an open circuit breaker keeps an account out first (doubles on each failed probe)",
    )),
    per_account(ms(
        "cooldown.max_ms",
        1,
        7 * DAY_MS,
        "21600000",
        "cap of every timed account state",
    )),
    per_account(ms(
        "cooldown.min_ms",
        0,
        DAY_MS,
        "1000",
        "floor of every timed account state (a reset already in the past still counts this long); above cooldown.max_ms it counts as that",
    )),
    per_account(ms(
        "cooldown.overloaded_ms",
        1,
        DAY_MS,
        "30000",
        "how long a 529 (overloaded) keeps an account out",
    )),
    per_account(ms(
        "cooldown.rate_limit_default_ms",
        1,
        DAY_MS,
        "60000",
        "how long a 429 without any reset header keeps an account out",
    )),
    ms(
        "groups.cooldown_ms",
        0,
        DAY_MS,
        "600000",
        "how long a group whose accounts have all failed lets its fallback groups go first (0: never)",
    ),
    Setting {
        name: "cors.allowed_origins",
        ty: Type::Origins,
        min: 0,
        max: 0,
        default: "",
        per_account: false,
        choices: &[],
        description: "browser origins that may call the Messages API (CORS: preflights answered without a key, CORS headers on answers); unset: CORS off",
    },
    Setting {
        name: "headers.expose_ratelimit",
        ty: Type::Bool,
        min: 0,
        max: 0,
        default: "false",
        per_account: false,
        choices: &[],
        description: "pass the upstream account's anthropic-ratelimit-* headers on to clients (they describe one pooled account, not the client's key)",
    },
    Setting {
        name: "headers.forward_client_ip",
        ty: Type::Bool,
        min: 0,
        max: 0,
        default: "false",
        per_account: false,
        choices: &[],
        description: "pass the client's x-forwarded-*, forwarded, x-real-ip and via headers on to upstreams",
    },
    ms(
        "log.success_sample",
        0,
        0,
        "1",
        "share of successful client requests whose relay::request log line is written (errors and cancelled requests always are; 0: none); for very high request rates",
    )
    .share(),
    Setting {
        name: "tracing.propagate_upstream",
        ty: Type::Bool,
        min: 0,
        max: 0,
        default: "false",
        per_account: false,
        choices: &[],
        description: "send each upstream attempt's W3C traceparent to the upstream (off: upstreams never see relay's or the client's trace context)",
    },
    Setting {
        name: "limits.count_cache_reads",
        ty: Type::Bool,
        min: 0,
        max: 0,
        default: "false",
        per_account: false,
        choices: &[],
        description: "count cache-read input tokens towards keys' and groups' tokens-per-minute limits",
    },
    Setting {
        name: "limits.on_store_down",
        ty: Type::Choice,
        min: 0,
        max: 0,
        default: "local",
        per_account: false,
        choices: &["local", "deny", "allow"],
        description: "when Redis cannot be reached: local (each limit divided by the live data planes, counted in process), deny (refuse limited requests) or allow (serve them unlimited)",
    },
    ms(
        "limits.store_timeout_ms",
        1,
        10_000,
        "250",
        "longest a limit check may wait for Redis before the on_store_down policy applies",
    ),
    Setting {
        name: "limits.timezone",
        ty: Type::TimeZone,
        min: 0,
        max: 0,
        default: "UTC",
        per_account: false,
        choices: &[],
        description: "the time zone whose calendar days and months daily and monthly budgets count",
    },
    Setting {
        name: "metrics.key_labels",
        ty: Type::Bool,
        min: 0,
        max: 0,
        default: "false",
        per_account: false,
        choices: &[],
        description: "label the token, cost and budget metrics with each API key's name (one series per key and model: turn on only for a bounded number of keys); off: by key group only",
    },
    Setting {
        name: "models",
        ty: Type::Models,
        min: 0,
        max: 0,
        default: "",
        per_account: false,
        choices: &[],
        description: "the model ids GET /v1/models lists (comma-separated); unset: the built-in list",
    },
    Setting {
        name: "notify.budget_thresholds",
        ty: Type::Percents,
        min: 0,
        max: 0,
        default: "80,100",
        per_account: false,
        choices: &[],
        description: "notifications: the percentages of a key's or group's daily or monthly budget whose crossing is notified (once per period each)",
    },
    ms(
        "notify.data_plane_lost_after_ms",
        0,
        DAY_MS,
        "60000",
        "notifications: how long a data plane must stay disconnected before data_plane.lost is sent",
    ),
    ms(
        "notify.rate_limited_after_ms",
        0,
        7 * DAY_MS,
        "900000",
        "notifications: how long an account must be (or be set to stay) rate limited before account.rate_limited is sent",
    ),
    Setting {
        name: "notify.signing_secret",
        ty: Type::Text,
        min: 0,
        max: 0,
        default: "",
        per_account: false,
        choices: &[],
        description: "notifications: the secret that signs each webhook body (X-Relay-Signature, HMAC-SHA256); secret: stored sealed, shown masked; unset: unsigned",
    },
    Setting {
        name: "notify.webhook_format",
        ty: Type::Choice,
        min: 0,
        max: 0,
        default: "json",
        per_account: false,
        choices: &["json", "slack"],
        description: "notifications: the body sent, json (relay's event document) or slack (a Slack incoming-webhook message)",
    },
    Setting {
        name: "notify.webhook_url",
        ty: Type::Url,
        min: 0,
        max: 0,
        default: "",
        per_account: false,
        choices: &[],
        description: "notifications: where the leader replica POSTs fleet events (account trouble, budgets, data planes lost); secret: stored sealed, shown masked; unset: no notifications",
    },
    Setting {
        name: "oauth.authorize_url",
        ty: Type::Url,
        min: 0,
        max: 0,
        default: "https://claude.ai/oauth/authorize",
        per_account: false,
        choices: &[],
        description: "subscription logins (relayctl account login): the page the operator opens to approve",
    }
    .read_outside(),
    Setting {
        name: "oauth.client_id",
        ty: Type::Text,
        min: 0,
        max: 0,
        default: "9d1c250a-e61b-44d9-88ed-5944d1962f5e",
        per_account: false,
        choices: &[],
        description: "subscription logins and token refreshes: the OAuth client id (Claude Code's public one)",
    }
    .read_outside(),
    Setting {
        name: "oauth.redirect_uri",
        ty: Type::Url,
        min: 0,
        max: 0,
        default: "https://platform.claude.com/oauth/code/callback",
        per_account: false,
        choices: &[],
        description: "subscription logins: where the approval page sends its answer (a page showing CODE#STATE)",
    }
    .read_outside(),
    ms(
        "oauth.refresh_ahead_ms",
        1,
        DAY_MS,
        "300000",
        "how long before its expiry a subscription account's access token is refreshed",
    )
    .read_outside(),
    Setting {
        name: "oauth.scopes",
        ty: Type::Text,
        min: 0,
        max: 0,
        default: "org:create_api_key user:profile user:inference user:sessions:claude_code",
        per_account: false,
        choices: &[],
        description: "subscription logins: the scopes asked for (space-separated)",
    }
    .read_outside(),
    Setting {
        name: "oauth.token_url",
        ty: Type::Url,
        min: 0,
        max: 0,
        default: "https://platform.claude.com/v1/oauth/token",
        per_account: false,
        choices: &[],
        description: "subscription logins and token refreshes: the OAuth token endpoint",
    }
    .read_outside(),
    ms(
        "queue.max_size",
        0,
        1_000_000,
        "1000",
        "requests waiting for an account at once, per data plane",
    )
    .count(),
    ms(
        "queue.max_wait_ms",
        0,
        HOUR_MS,
        "30000",
        "how long a request may wait for an account to become available",
    ),
    ms(
        "retry.backoff_base_ms",
        0,
        60_000,
        "25",
        "first backoff between attempts (jittered, doubling); above retry.backoff_max_ms it counts as that",
    ),
    ms(
        "retry.backoff_max_ms",
        0,
        60_000,
        "1000",
        "longest backoff between attempts",
    ),
    ms(
        "retry.deadline_ms",
        1,
        HOUR_MS,
        "60000",
        "time budget for failed attempts and waiting before an answer is accepted",
    ),
    ms(
        "retry.max_attempts",
        1,
        20,
        "4",
        "failed attempts that took real time (at least retry.quick_failure_ms) allowed per client request; quicker refusals do not count, and each eligible account is tried at most once",
    )
    .count(),
    ms(
        "retry.quick_failure_ms",
        0,
        60_000,
        "2000",
        "a failed attempt answered faster than this (a 429 or 529 at once, a refused connection) does not count against retry.max_attempts",
    ),
    ms(
        "sticky.ttl_ms",
        1,
        30 * DAY_MS,
        "3600000",
        "how long a session stays bound to its account without use",
    ),
    ms(
        "unified.threshold",
        0,
        0,
        "0.98",
        "unified (subscription) utilization at which an account counts as rate limited",
    )
    .fraction()
    .account(),
    ms(
        "upstream.connect_timeout_ms",
        1,
        HOUR_MS,
        "10000",
        "to open a connection to an upstream (TCP and the proxy tunnel)",
    ),
    ms(
        "upstream.head_timeout_ms",
        1,
        DAY_MS,
        "600000",
        "until the upstream's response head (for streams: its first event)",
    ),
    Setting {
        name: "upstream.http_version",
        ty: Type::Choice,
        min: 0,
        max: 0,
        default: "auto",
        per_account: false,
        choices: &["auto", "http1", "http2"],
        description: "the HTTP version of the data planes' requests to upstreams: auto (HTTP/2 where TLS negotiates h2 through ALPN, as api.anthropic.com does, one connection per upstream carrying every stream; else HTTP/1.1), http1 (HTTP/1.1 only) or http2 (HTTP/2 only, h2c to plain http:// upstreams)",
    },
    ms(
        "upstream.idle_timeout_ms",
        1,
        DAY_MS,
        "300000",
        "between two body frames of an upstream response",
    ),
    ms(
        "upstream.total_timeout_ms",
        1,
        DAY_MS,
        "3600000",
        "a whole upstream response",
    ),
    ms(
        "usage.retention_days",
        0,
        36_500,
        "0",
        "days of usage the control plane keeps (older rows are deleted every few minutes by the leader replica); 0 keeps it forever",
    )
    .count(),
    ms(
        "usage.retention_max_rows",
        0,
        100_000_000_000,
        "0",
        "usage rows (the request log's records are made of them) the control plane keeps at most: the oldest beyond it are deleted every few minutes by the leader replica; 0 sets no cap",
    )
    .count(),
];

impl Setting {
    const fn count(self) -> Self {
        Setting {
            ty: Type::Count,
            ..self
        }
    }

    const fn share(self) -> Self {
        Setting {
            ty: Type::Share,
            ..self
        }
    }

    const fn fraction(self) -> Self {
        Setting {
            ty: Type::Fraction,
            ..self
        }
    }

    const fn account(self) -> Self {
        per_account(self)
    }

    /// Marks a setting read by the OAuth crate (listed in [`super::READ_OUTSIDE_THE_PLANES`]); a no-op that
    /// documents it where it is declared.
    const fn read_outside(self) -> Self {
        self
    }
}
