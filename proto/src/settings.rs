//! Every operator setting, declared once: name, type, range, default and
//! meaning. The control plane refuses what does not fit here (`relayctl
//! settings set`), `settings list` shows it, and data planes read values
//! through it, so a default or a range is defined in one place. A stored value
//! that does not parse (an old database) reads as the default.

use std::collections::BTreeMap;

/// What a setting holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    /// Milliseconds, an integer in `min..=max`.
    Millis,
    /// An integer in `min..=max`.
    Count,
    /// A fraction in (0, 1], or a percentage in (1, 100].
    Fraction,
    /// A comma-separated list of model ids.
    Models,
    /// `true` or `false`.
    Bool,
    /// One of the setting's `choices`.
    Choice,
    /// An IANA time zone name (`UTC`, `Europe/Berlin`).
    TimeZone,
    /// An `http://` or `https://` URL.
    Url,
    /// One line of visible text (words separated by single spaces allowed).
    Text,
    /// Exact browser origins (`scheme://host[:port]`), comma-separated, or `*` alone.
    Origins,
    /// Percentages in 1..=100, comma-separated (`80,100`).
    Percents,
}

impl Type {
    pub fn as_str(self) -> &'static str {
        match self {
            Type::Millis => "milliseconds",
            Type::Count => "integer",
            Type::Fraction => "fraction",
            Type::Models => "model list",
            Type::Bool => "boolean",
            Type::Choice => "choice",
            Type::TimeZone => "time zone",
            Type::Url => "URL",
            Type::Text => "text",
            Type::Origins => "origin list",
            Type::Percents => "percentages",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    pub name: &'static str,
    pub ty: Type,
    /// Inclusive bounds for `Millis` and `Count`.
    pub min: u64,
    pub max: u64,
    /// As stored; empty for "none" (`models`: the built-in list).
    pub default: &'static str,
    /// May be overridden per account as `account.<ACCOUNT>.<name>`.
    pub per_account: bool,
    /// The values a `Choice` may take.
    pub choices: &'static [&'static str],
    pub description: &'static str,
}

/// Settings read outside the data plane, control plane and limiter sources: by the OAuth crate
/// (`oauth/src`), which relayctl (logins) and the control plane (token refreshes) use.
pub const READ_OUTSIDE_THE_PLANES: &[&str] = &[
    "oauth.authorize_url",
    "oauth.client_id",
    "oauth.redirect_uri",
    "oauth.refresh_ahead_ms",
    "oauth.scopes",
    "oauth.token_url",
];

/// Settings only the control plane reads: they are never pushed to data planes.
pub const CONTROL_PLANE_ONLY: &[&str] = &[
    "notify.budget_thresholds",
    "notify.data_plane_lost_after_ms",
    "notify.rate_limited_after_ms",
    "notify.signing_secret",
    "notify.webhook_format",
    "notify.webhook_url",
];

/// Secret settings: stored sealed with the master key, shown masked by `settings list`, audited
/// masked, kept out of error messages, never pushed to data planes (they are in
/// [`CONTROL_PLANE_ONLY`] too).
pub const SECRET: &[&str] = &["notify.signing_secret", "notify.webhook_url"];

/// Whether `name` is a secret setting ([`SECRET`]).
pub fn is_secret(name: &str) -> bool {
    SECRET.contains(&name)
}

/// Whether `name` stays on the control plane ([`CONTROL_PLANE_ONLY`]).
pub fn is_control_plane_only(name: &str) -> bool {
    CONTROL_PLANE_ONLY.contains(&name)
}

/// How a secret setting's value is shown: a URL as its scheme and host then `…`, anything else
/// as `…` alone (never a character of the secret beyond a URL's host).
pub fn mask(value: &str) -> String {
    let v = value.trim();
    if v.is_empty() {
        return String::new();
    }
    match v.split_once("://") {
        Some((scheme, rest)) if scheme == "http" || scheme == "https" => {
            let host = rest.split(['/', '?', '#']).next().unwrap_or("");
            let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
            format!("{scheme}://{host}/…")
        }
        _ => "…".to_string(),
    }
}

/// Parses a `Percents` value: each percentage in 1..=100, sorted, without repeats.
pub fn parse_percents(value: &str) -> Option<Vec<u64>> {
    let mut out = Vec::new();
    for p in value.split(',').map(str::trim) {
        let n = p.strip_suffix('%').unwrap_or(p).trim().parse::<u64>().ok()?;
        if !(1..=100).contains(&n) {
            return None;
        }
        out.push(n);
    }
    out.sort_unstable();
    out.dedup();
    (!out.is_empty()).then_some(out)
}

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
        "share of successful client requests whose relay::request log line is written (errors always are); for very high request rates",
    )
    .fraction(),
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

    const fn fraction(self) -> Self {
        Setting {
            ty: Type::Fraction,
            ..self
        }
    }

    const fn account(self) -> Self {
        per_account(self)
    }

    /// Marks a setting read by the OAuth crate (listed in [`READ_OUTSIDE_THE_PLANES`]); a no-op that
    /// documents it where it is declared.
    const fn read_outside(self) -> Self {
        self
    }

    /// "1..=20", "0 < x <= 1 (or a percentage)", "ids, comma-separated".
    pub fn range(&self) -> String {
        match self.ty {
            Type::Millis | Type::Count => format!("{}..={}", self.min, self.max),
            Type::Fraction => "0 < x <= 1, or a percentage 1 < x <= 100".into(),
            Type::Models => "model ids, comma-separated".into(),
            Type::Bool => "true or false".into(),
            Type::Choice => self.choices.join(", "),
            Type::TimeZone => "an IANA name such as UTC or Europe/Berlin".into(),
            Type::Url => "http:// or https:// URL, without user:password@".into(),
            Type::Text => "visible text, at most 512 characters".into(),
            Type::Origins => "exact origins scheme://host[:port], comma-separated, or * alone".into(),
            Type::Percents => "percentages 1..=100, comma-separated".into(),
        }
    }

    /// Checks a value for this setting.
    pub fn check(&self, value: &str) -> Result<(), SettingError> {
        let v = value.trim();
        let invalid = || SettingError::Invalid {
            name: self.name.to_string(),
            // A secret is never repeated back (it would reach logs and terminals).
            value: if is_secret(self.name) {
                "(secret, not shown)".to_string()
            } else {
                value.chars().take(64).collect()
            },
            expected: format!("{} in {}", self.ty.as_str(), self.range()),
        };
        // A number is short: with the value cap only a model list may be long, so
        // `settings list` stays small whatever is stored.
        let cap = match self.ty {
            Type::Models => usize::MAX,
            Type::Origins => MAX_ORIGINS_BYTES,
            Type::Url | Type::Text => 512,
            _ => 32,
        };
        if v.len() > cap {
            return Err(invalid());
        }
        match self.ty {
            Type::Millis | Type::Count => match v.parse::<u64>() {
                Ok(n) if (self.min..=self.max).contains(&n) => Ok(()),
                _ => Err(invalid()),
            },
            Type::Fraction => match v.parse::<f64>().ok().and_then(fraction) {
                Some(_) => Ok(()),
                None => Err(invalid()),
            },
            Type::Bool => match v {
                "true" | "false" => Ok(()),
                _ => Err(invalid()),
            },
            Type::Choice => match self.choices.contains(&v) {
                true => Ok(()),
                false => Err(invalid()),
            },
            Type::TimeZone => match v.parse::<chrono_tz::Tz>() {
                Ok(_) => Ok(()),
                Err(_) => Err(invalid()),
            },
            Type::Url => match is_http_url(v) {
                true => Ok(()),
                false => Err(invalid()),
            },
            Type::Text => {
                let ok = !v.is_empty() && v.chars().all(|c| c == ' ' || (!c.is_control() && !c.is_whitespace()));
                if ok {
                    Ok(())
                } else {
                    Err(invalid())
                }
            }
            Type::Percents => match parse_percents(v) {
                Some(_) => Ok(()),
                None => Err(invalid()),
            },
            Type::Origins => match parse_origins(v) {
                Ok(_) => Ok(()),
                Err(reason) => Err(SettingError::BadOrigins {
                    name: self.name.to_string(),
                    reason,
                }),
            },
            Type::Models => {
                let ok = !v.is_empty()
                    && v.split(',')
                        .map(str::trim)
                        .all(|m| !m.is_empty() && m.chars().all(|c| c.is_ascii_graphic() && c != '*'));
                if ok {
                    Ok(())
                } else {
                    Err(invalid())
                }
            }
        }
    }

    /// The value in `values` (or `raw`), parsed, else the default.
    pub fn u64_in(&self, values: &BTreeMap<String, String>) -> u64 {
        self.u64_of(values.get(self.name).map(String::as_str))
    }

    /// `raw` parsed as an integer in range, else the default.
    pub fn u64_of(&self, raw: Option<&str>) -> u64 {
        raw.and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|n| (self.min..=self.max).contains(n))
            .or_else(|| self.default.parse().ok())
            .unwrap_or(self.min)
    }

    /// The value in `values` as a boolean, else the default.
    pub fn bool_in(&self, values: &BTreeMap<String, String>) -> bool {
        match values.get(self.name).map(|v| v.trim()) {
            Some("true") => true,
            Some("false") => false,
            _ => self.default == "true",
        }
    }

    /// The value in `values` if it is one of the choices, else the default.
    pub fn choice_in(&self, values: &BTreeMap<String, String>) -> &'static str {
        let v = values.get(self.name).map(|v| v.trim()).unwrap_or("");
        self.choices.iter().copied().find(|c| *c == v).unwrap_or(self.default)
    }

    /// The value in `values` as percentages ([`parse_percents`]), else the default.
    pub fn percents_in(&self, values: &BTreeMap<String, String>) -> Vec<u64> {
        values
            .get(self.name)
            .and_then(|v| parse_percents(v))
            .or_else(|| parse_percents(self.default))
            .unwrap_or_default()
    }

    /// The value in `values` (trimmed) if it passes [`Setting::check`], else the default (`Url`, `Text`).
    pub fn str_in<'a>(&'a self, values: &'a BTreeMap<String, String>) -> &'a str {
        match values.get(self.name) {
            Some(v) if self.check(v).is_ok() => v.trim(),
            _ => self.default,
        }
    }

    /// The value in `values` as a time zone, else the default (UTC).
    pub fn tz_in(&self, values: &BTreeMap<String, String>) -> chrono_tz::Tz {
        values
            .get(self.name)
            .and_then(|v| v.trim().parse::<chrono_tz::Tz>().ok())
            .or_else(|| self.default.parse().ok())
            .unwrap_or(chrono_tz::UTC)
    }

    /// `raw` parsed as a fraction, else the default.
    pub fn fraction_of(&self, raw: Option<&str>) -> f64 {
        raw.and_then(|v| v.trim().parse::<f64>().ok())
            .and_then(fraction)
            .or_else(|| self.default.parse::<f64>().ok())
            .unwrap_or(1.0)
    }
}

/// `http://` or `https://`, then a host (no spaces, no fragment).
fn is_http_url(v: &str) -> bool {
    let Some(rest) = v.strip_prefix("https://").or_else(|| v.strip_prefix("http://")) else {
        return false;
    };
    let host = rest.split(['/', '?']).next().unwrap_or("");
    // No `user:password@`: an HTTP client does not send it, and its connection pool logs the
    // authority (put a token in the path, or use notify.signing_secret).
    !host.contains('@')
        && !host.is_empty()
        && !host.starts_with(':')
        && v.chars().all(|c| c.is_ascii_graphic())
        && !v.contains('#')
}

/// The longest `cors.allowed_origins` value, in bytes.
pub const MAX_ORIGINS_BYTES: usize = 4096;

/// What `cors.allowed_origins` allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedOrigins {
    /// `*`: every origin.
    Any,
    /// These exact origins, lowercased (browsers send scheme and host in lowercase).
    List(Vec<String>),
}

/// Parses a `cors.allowed_origins` value: `*` alone, or exact origins `scheme://host[:port]`,
/// comma-separated. Err: why not, naming the offending origin.
pub fn parse_origins(value: &str) -> Result<AllowedOrigins, String> {
    let v = value.trim();
    if v.is_empty() {
        return Err("no origin given (to turn CORS off: relayctl settings unset cors.allowed_origins)".into());
    }
    if v == "*" {
        return Ok(AllowedOrigins::Any);
    }
    let mut out = Vec::new();
    for o in v.split(',').map(str::trim) {
        check_origin(o)?;
        let o = o.to_ascii_lowercase();
        if !out.contains(&o) {
            out.push(o);
        }
    }
    Ok(AllowedOrigins::List(out))
}

/// One exact origin: `scheme://host[:port]`, nothing else.
fn check_origin(o: &str) -> Result<(), String> {
    let shown: String = o.chars().take(80).collect();
    let bad = |why: &str| Err(format!("{shown:?} {why}"));
    if o.is_empty() {
        return Err("an empty origin (two commas, or one at an end)".into());
    }
    if o == "*" {
        return bad("must stand alone (* allows every origin; it cannot be listed with others)");
    }
    if o.eq_ignore_ascii_case("null") {
        return bad("is not allowed (the null origin is shared by sandboxed pages and local files)");
    }
    if !o.chars().all(|c| c.is_ascii_graphic()) {
        return bad("is not an origin (spaces or characters outside visible ASCII)");
    }
    let Some((scheme, rest)) = o.split_once("://") else {
        return bad("is not an origin: expected scheme://host[:port], such as https://app.example.com");
    };
    let scheme_ok = scheme.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !scheme_ok {
        return bad("has no valid scheme: expected scheme://host[:port], such as https://app.example.com");
    }
    if rest.contains(['/', '?', '#']) {
        return bad("has a path, query or fragment: an origin is scheme://host[:port] only (no trailing slash)");
    }
    if rest.contains('@') {
        return bad("has a user name: an origin is scheme://host[:port] only");
    }
    if rest.contains('*') {
        return bad("has a wildcard: list exact origins, or * alone for every origin");
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let Some((addr, after)) = v6.split_once(']') else {
            return bad("has an unclosed [ in its host");
        };
        if addr.is_empty() || !addr.chars().all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.') {
            return bad("has an invalid IPv6 host");
        }
        match after {
            "" => (addr, None),
            p => match p.strip_prefix(':') {
                Some(p) => (addr, Some(p)),
                None => return bad("has something after its host that is not :port"),
            },
        }
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    let host_ok = !host.is_empty()
        && !host.starts_with(['.', '-'])
        && !host.ends_with('-')
        && (rest.starts_with('[')
            || host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.')));
    if !host_ok {
        return bad("has no valid host: expected scheme://host[:port], such as https://app.example.com");
    }
    if let Some(p) = port {
        let n = match p.parse::<u16>() {
            Ok(n) if n > 0 && p.chars().all(|c| c.is_ascii_digit()) && !p.starts_with('0') => n,
            _ => return bad("has an invalid port (1..=65535)"),
        };
        let default = match scheme.to_ascii_lowercase().as_str() {
            "http" | "ws" => Some(80),
            "https" | "wss" => Some(443),
            _ => None,
        };
        if default == Some(n) {
            return bad("names its scheme's default port: browsers send the origin without it, so leave it out");
        }
    }
    Ok(())
}

/// A utilization or threshold as a fraction in (0, 1]: values above 1.0 are percentages.
pub fn fraction(v: f64) -> Option<f64> {
    if !v.is_finite() || v <= 0.0 || v > 100.0 {
        return None;
    }
    Some(if v > 1.0 { v / 100.0 } else { v })
}

/// The declared setting `name`. Panics never: unknown names are `None`.
pub fn get(name: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.name == name)
}

/// The declared setting `name`, for a name the code knows exists.
pub fn known(name: &str) -> &'static Setting {
    match get(name) {
        Some(s) => s,
        None => &SETTINGS[0],
    }
}

/// The longest value a setting may hold, in bytes.
pub const MAX_VALUE_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingError {
    #[error("unknown setting {name:?}{}; the settings are: {}", suggestion.map(|s| format!(" (did you mean {s}?)")).unwrap_or_default(), names())]
    Unknown {
        name: String,
        suggestion: Option<&'static str>,
    },
    #[error("invalid value {value:?} for {name}: expected {expected}")]
    Invalid {
        name: String,
        value: String,
        expected: String,
    },
    #[error("{0} cannot be set per account; per-account settings: {1}")]
    NotPerAccount(String, String),
    #[error("the value is {0} bytes; at most {MAX_VALUE_BYTES}")]
    TooLong(usize),
    #[error(
        "invalid value for {name}: {reason}; expected exact origins scheme://host[:port], comma-separated, or * alone"
    )]
    BadOrigins { name: String, reason: String },
}

fn names() -> String {
    SETTINGS.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
}

/// What a setting name addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Global(&'static Setting),
    /// `account.<ACCOUNT>.<setting>`: the account as written (id or name).
    Account {
        account: String,
        setting: &'static Setting,
    },
}

/// Resolves a setting name (`NAME` or `account.<ACCOUNT>.<NAME>`).
pub fn target(name: &str) -> Result<Target, SettingError> {
    if let Some(rest) = name.strip_prefix("account.") {
        // The account part may itself hold dots (a name): the setting is the longest known suffix.
        let found = SETTINGS.iter().find_map(|s| {
            rest.strip_suffix(s.name)
                .and_then(|a| a.strip_suffix('.'))
                .filter(|a| !a.is_empty())
                .map(|a| (a, s))
        });
        return match found {
            Some((account, s)) if s.per_account => Ok(Target::Account {
                account: account.to_string(),
                setting: s,
            }),
            Some((_, s)) => Err(SettingError::NotPerAccount(
                s.name.to_string(),
                SETTINGS
                    .iter()
                    .filter(|s| s.per_account)
                    .map(|s| s.name)
                    .collect::<Vec<_>>()
                    .join(", "),
            )),
            None => Err(SettingError::Unknown {
                name: name.to_string(),
                suggestion: suggest(rest.rsplit_once('.').map_or(rest, |(_, n)| n)),
            }),
        };
    }
    get(name).map(Target::Global).ok_or_else(|| SettingError::Unknown {
        name: name.to_string(),
        suggestion: suggest(name),
    })
}

/// Checks `name = value` as `settings set` would.
pub fn check(name: &str, value: &str) -> Result<Target, SettingError> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(SettingError::TooLong(value.len()));
    }
    let t = target(name)?;
    match &t {
        Target::Global(s) | Target::Account { setting: s, .. } => s.check(value)?,
    }
    Ok(t)
}

/// The closest declared name, if it is close (a typo).
fn suggest(name: &str) -> Option<&'static str> {
    SETTINGS
        .iter()
        .map(|s| (strsim::levenshtein(name, s.name), s.name))
        .filter(|(d, n)| *d <= 3.max(n.len() / 4) || n.ends_with(name) || name.ends_with(*n))
        .min_by_key(|(d, _)| *d)
        .map(|(_, n)| n)
}

/// The settings table of `docs/operations.md`, as that file holds it (a test keeps them equal).
pub fn markdown_table() -> String {
    let mut out = String::from(
        "| setting | type | range | default | per account | meaning |\n| --- | --- | --- | --- | --- | --- |\n",
    );
    for s in SETTINGS {
        let default = match (s.default.is_empty(), s.ty) {
            (true, Type::Origins | Type::Url | Type::Text) => "(none: off)",
            (true, _) => "(built-in list)",
            (false, _) => s.default,
        };
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {} | {} |\n",
            s.name,
            s.ty.as_str(),
            s.range(),
            default,
            if s.per_account { "yes" } else { "" },
            s.description
        ));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_default_fits_its_own_rules() {
        for s in SETTINGS {
            if !s.default.is_empty() {
                assert_eq!(s.check(s.default), Ok(()), "{}", s.name);
            }
        }
        let mut names: Vec<_> = SETTINGS.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), SETTINGS.len(), "unique names");
    }

    #[test]
    fn setting_urls_take_no_user_and_password() {
        for name in ["notify.webhook_url", "oauth.token_url"] {
            let e = check(name, "https://user:pw@hooks.example/T/B/x")
                .unwrap_err()
                .to_string();
            assert!(e.contains("without user:password@"), "{e}");
            if SECRET.contains(&name) {
                assert!(!e.contains("pw@"), "a secret refused is not repeated: {e}");
            }
            assert!(check(name, "https://hooks.example/T/B/x?token=1").is_ok());
        }
    }

    #[test]
    fn secrets_are_masked_and_never_repeated_in_errors() {
        let e = check(
            "notify.webhook_url",
            "https://hooks.slack.com/services/T0/B0/sekrit value",
        )
        .unwrap_err();
        assert!(!e.to_string().contains("sekrit"), "{e}");
        assert_eq!(
            mask("https://hooks.slack.com/services/T0/B0/sekrit"),
            "https://hooks.slack.com/…"
        );
        assert_eq!(
            mask("https://user:pw@example.com:8443/x?token=1"),
            "https://example.com:8443/…"
        );
        assert_eq!(mask("whsec_abcdef"), "…");
        for n in SECRET {
            assert!(is_control_plane_only(n), "{n}");
        }
        assert_eq!(parse_percents("100, 80,80%"), Some(vec![80, 100]));
        assert_eq!(parse_percents("0"), None);
        assert_eq!(parse_percents("101"), None);
        assert_eq!(parse_percents(""), None);
        assert!(check("notify.budget_thresholds", "50,90,100").is_ok());
        assert!(check("notify.budget_thresholds", "50,x").is_err());
    }

    #[test]
    fn typos_bad_values_and_overrides() {
        let e = check("retry.max_attempt", "3").unwrap_err();
        assert!(e.to_string().contains("did you mean retry.max_attempts?"), "{e}");
        let e = check("retry.max_attempts", "three").unwrap_err();
        assert!(e.to_string().contains("integer in 1..=20"), "{e}");
        assert!(check("retry.max_attempts", "").is_err());
        assert!(check("retry.max_attempts", "21").is_err());
        assert!(check("retry.max_attempts", "20").is_ok());
        assert!(check("unified.threshold", "95").is_ok());
        assert!(check("unified.threshold", "0").is_err());
        assert!(check("unified.threshold", &format!("0.5{}", "0".repeat(40))).is_err());
        assert!(check("models", "claude-a, claude-b").is_ok());
        assert!(check("models", "claude-*").is_err());
        assert!(check("models", &"x".repeat(MAX_VALUE_BYTES + 1)).is_err());
        assert!(check("oauth.token_url", "http://127.0.0.1:9999/v1/oauth/token").is_ok());
        assert!(check("oauth.token_url", "ftp://example.com/").is_err());
        assert!(check("oauth.token_url", "https://").is_err());
        assert!(check("oauth.authorize_url", "https://a b/").is_err());
        assert!(check("oauth.scopes", "user:inference user:profile").is_ok());
        assert!(check("oauth.scopes", "user:inference\tx").is_err());
        assert!(check("oauth.refresh_ahead_ms", "0").is_err());
        let mut v = BTreeMap::new();
        v.insert("oauth.token_url".to_string(), "nope".to_string());
        assert_eq!(
            known("oauth.token_url").str_in(&v),
            "https://platform.claude.com/v1/oauth/token"
        );
        assert_eq!(
            check("account.main.team.cooldown.overloaded_ms", "5000").unwrap(),
            Target::Account {
                account: "main.team".into(),
                setting: known("cooldown.overloaded_ms")
            }
        );
        assert!(matches!(
            check("account.main.retry.max_attempts", "2"),
            Err(SettingError::NotPerAccount(..))
        ));
        assert!(matches!(
            check("account.main.nope", "2"),
            Err(SettingError::Unknown { .. })
        ));
    }

    /// Nothing accepted that is not done: every setting the control plane accepts is read by name
    /// somewhere in the code that serves (the data plane, the control plane or the limiter),
    /// outside its test modules.
    #[test]
    fn every_setting_is_read_by_the_planes() {
        fn sources(dir: &std::path::Path, out: &mut String) {
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    sources(&p, out);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    let text = std::fs::read_to_string(&p).unwrap();
                    // Code before the file's test module.
                    let code = text.split("#[cfg(test)]").next().unwrap_or("");
                    out.push_str(code);
                }
            }
        }
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut code = String::new();
        for dir in ["data-plane/src", "control-plane/src", "limits/src"] {
            sources(&root.join(dir), &mut code);
        }
        // Settings the OAuth crate reads (relayctl's logins, the control plane's refreshes).
        let mut oauth = String::new();
        sources(&root.join("oauth/src"), &mut oauth);
        for n in READ_OUTSIDE_THE_PLANES {
            assert!(oauth.contains(&format!("\"{n}\"")), "{n} is not read by oauth/src");
        }
        let unread: Vec<&str> = SETTINGS
            .iter()
            .map(|s| s.name)
            .filter(|n| !READ_OUTSIDE_THE_PLANES.contains(n))
            .filter(|n| !code.contains(&format!("\"{n}\"")))
            .collect();
        assert!(unread.is_empty(), "settings accepted but read nowhere: {unread:?}");
    }

    #[test]
    fn the_operations_doc_lists_every_setting() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/operations.md")).unwrap();
        assert!(
            doc.contains(&markdown_table()),
            "docs/operations.md must hold this table (Settings section):\n{}",
            markdown_table()
        );
    }

    #[test]
    fn origins_are_exact_and_refused_with_a_reason() {
        let name = "cors.allowed_origins";
        assert_eq!(parse_origins(" * ").unwrap(), AllowedOrigins::Any);
        assert_eq!(
            parse_origins(
                "https://App.Example.com, http://localhost:5173,chrome-extension://abcdef, http://[::1]:8080"
            )
            .unwrap(),
            AllowedOrigins::List(vec![
                "https://app.example.com".into(),
                "http://localhost:5173".into(),
                "chrome-extension://abcdef".into(),
                "http://[::1]:8080".into(),
            ])
        );
        assert!(check(name, "https://a.example, https://a.example").is_ok());
        for (bad, why) in [
            ("", "no origin given"),
            ("https://app.example.com/", "has a path"),
            ("https://app.example.com/chat", "has a path"),
            ("app.example.com", "expected scheme://host[:port]"),
            ("https://", "no valid host"),
            ("https://:8080", "no valid host"),
            ("https://a.example:0", "invalid port"),
            ("https://a.example:65536", "invalid port"),
            ("https://a.example:", "invalid port"),
            ("https://a.example:443", "default port"),
            ("http://a.example:80", "default port"),
            ("https://*.example.com", "wildcard"),
            ("*, https://a.example", "must stand alone"),
            ("https://a.example,", "empty origin"),
            ("null", "null origin"),
            ("https://user@a.example", "user name"),
            ("https://a b.example", "visible ASCII"),
            ("1http://a.example", "no valid scheme"),
            ("https://a_b.example", "no valid host"),
            ("http://[::1", "unclosed"),
        ] {
            let e = check(name, bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
            assert!(e.contains("cors.allowed_origins"), "{e}");
        }
        let long = vec!["https://a.example"; 300].join(",");
        assert!(check(name, &long).is_err(), "at most {MAX_ORIGINS_BYTES} bytes");
        // A value that no longer parses reads as the default: off.
        assert!(known(name).default.is_empty());
    }

    #[test]
    fn reading_falls_back_to_the_default() {
        let s = known("queue.max_size");
        let mut v = BTreeMap::new();
        assert_eq!(s.u64_in(&v), 1000);
        v.insert("queue.max_size".to_string(), "garbage".to_string());
        assert_eq!(s.u64_in(&v), 1000);
        v.insert("queue.max_size".to_string(), "7".to_string());
        assert_eq!(s.u64_in(&v), 7);
        assert_eq!(known("unified.threshold").fraction_of(Some("90")), 0.9);
    }
}
