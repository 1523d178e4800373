//! Domain types as the store keeps them. Secrets only ever appear here encrypted
//! (`credential_enc`) or hashed (`key_hash`, `token_hash`).

use std::collections::BTreeMap;
use std::fmt;

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

pub fn now_ms() -> Millis {
    chrono::Utc::now().timestamp_millis()
}

/// A config version: `revision` grows by one per committed admin change;
/// `epoch` changes only when history is reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Version {
    pub epoch: u64,
    pub revision: u64,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.epoch, self.revision)
    }
}

macro_rules! str_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }
        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $s),+ }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }
        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($s => Ok($name::$variant),)+
                    other => Err(format!(
                        "unknown {} {other:?} (expected one of: {})",
                        stringify!($name),
                        [$($s),+].join(", ")
                    )),
                }
            }
        }
    };
}

str_enum!(
    /// What kind of upstream an account is.
    AccountKind {
        AnthropicApiKey => "anthropic-api-key",
        ClaudeOauth => "claude-oauth",
        AnthropicCompatible => "anthropic-compatible",
    }
);

str_enum!(AccountStatus { Enabled => "enabled", Disabled => "disabled" });

str_enum!(KeyStatus { Active => "active", Disabled => "disabled", Revoked => "revoked" });

str_enum!(
    /// How an operator steers a group: `active` (normal), `paused` (its accounts serve nobody
    /// through it; its keys go to its fallbacks), `activated` (first for keys whose group falls
    /// back to it).
    GroupState {
        Active => "active",
        Paused => "paused",
        Activated => "activated",
    }
);

str_enum!(
    /// What an admin token may do.
    Role {
        Admin => "admin",
        ReadOnly => "read-only",
        DataPlane => "data-plane",
    }
);

str_enum!(
    /// The kinds of resource a config-log entry can name.
    ResourceKind {
        ApiKey => "api_key",
        Account => "account",
        Group => "group",
        Price => "price",
        Settings => "settings",
        AdminToken => "admin_token",
        AccountState => "account_state",
    }
);

str_enum!(
    /// An account's shared health state (absent = healthy).
    AccountHealth {
        RateLimited => "rate_limited",
        Overloaded => "overloaded",
        Erroring => "erroring",
        Unauthorized => "unauthorized",
        Blocked => "blocked",
    }
);

/// An account's health, shared by every data plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountState {
    pub account_id: String,
    /// Model family it applies to; "" = the whole account.
    pub scope: String,
    pub health: AccountHealth,
    pub reason: String,
    /// 0 = until reset or credential change.
    pub until: Millis,
    pub since: Millis,
    pub reported_by: String,
    pub revision: u64,
}

impl AccountState {
    /// Its resource id in the config: `<account_id>/<scope>`.
    pub fn resource_id(&self) -> String {
        format!("{}/{}", self.account_id, self.scope)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub id: String,
    pub name: String,
    pub kind: AccountKind,
    pub base_url: String,
    /// AES-256-GCM ciphertext of the upstream credential (see `crypto`).
    pub credential_enc: Vec<u8>,
    pub refresh_token_enc: Option<Vec<u8>>,
    /// Non-secret hint, e.g. "…WXYZ".
    pub credential_hint: String,
    pub credential_expires_at: Option<Millis>,
    pub priority: i32,
    pub weight: u32,
    pub group_ids: Vec<String>,
    pub max_concurrency: u32,
    pub status: AccountStatus,
    /// The outbound proxy as shown to operators: any `user:password@` part redacted.
    pub proxy_url: String,
    /// AES-256-GCM ciphertext of the full proxy URL when it carries credentials.
    pub proxy_url_enc: Option<Vec<u8>>,
    /// Bumped by every change that clears the account's health (reset, enable,
    /// new credential, base URL or proxy); data planes follow it.
    pub reset_generation: u64,
    /// OAuth accounts: the granted scopes, the subscription type (`pro`, `max`, …) and the organization,
    /// as the login or the imported credentials said (empty when unknown).
    pub scopes: Vec<String>,
    pub subscription_type: String,
    pub organization: String,
    pub created_at: Millis,
    pub updated_at: Millis,
    /// The revision that last wrote this row (optimistic concurrency).
    pub revision: u64,
}

/// Limits of a key, or of a group (the total over its keys). 0 = unlimited for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeyLimits {
    pub rpm: u64,
    pub tpm: u64,
    pub max_concurrency: u64,
    /// micro-USD; 0 = none.
    pub daily_budget: u64,
    /// micro-USD; 0 = none.
    pub monthly_budget: u64,
}

impl KeyLimits {
    /// Whether a daily or monthly budget is set.
    pub fn has_budget(&self) -> bool {
        self.daily_budget > 0 || self.monthly_budget > 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    /// HMAC-SHA256 of the key, hex.
    pub key_hash: String,
    pub key_prefix: String,
    pub status: KeyStatus,
    pub expires_at: Option<Millis>,
    pub group_id: String,
    pub allowed_models: Vec<String>,
    pub limits: KeyLimits,
    pub created_at: Millis,
    pub updated_at: Millis,
    pub revision: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub id: String,
    pub name: String,
    pub description: String,
    /// The group's total across its keys (0 = unlimited for each).
    pub limits: KeyLimits,
    /// Groups whose accounts serve this group's keys when none of its own is eligible, in order
    /// (ids). Never itself, never forming a cycle (checked by the store in the write).
    pub fallback_ids: Vec<String>,
    pub state: GroupState,
    /// When `state` was last set (0 = never) and by which actor ("" = never).
    pub state_since: Millis,
    pub state_by: String,
    pub created_at: Millis,
    pub updated_at: Millis,
    pub revision: u64,
}

impl Group {
    /// A new, active group without fallbacks.
    pub fn new(id: &str, name: &str, description: &str, limits: KeyLimits, now: Millis) -> Self {
        Self {
            id: id.to_string(),
            name: name.to_string(),
            description: description.to_string(),
            limits,
            fallback_ids: Vec::new(),
            state: GroupState::Active,
            state_since: 0,
            state_by: String::new(),
            created_at: now,
            updated_at: now,
            revision: 0,
        }
    }
}

/// A cycle among groups' fallbacks through `start`, as the ids along it (`start`, …, `start`),
/// if `edges` (each group's fallbacks) has one. A group naming itself is a cycle of one.
pub fn fallback_cycle<'a>(
    edges: &'a std::collections::HashMap<String, Vec<String>>,
    start: &'a str,
) -> Option<Vec<&'a str>> {
    // Depth-first from `start`; the path back to it is the cycle. Each group is visited once.
    let mut seen = std::collections::HashSet::new();
    let mut path: Vec<&'a str> = vec![start];
    let mut stack: Vec<std::slice::Iter<'a, String>> = vec![edges.get(start).map(|v| v.iter()).unwrap_or_default()];
    while let Some(top) = stack.last_mut() {
        match top.next() {
            Some(next) if next == start => {
                path.push(start);
                return Some(path);
            }
            Some(next) => {
                if seen.insert(next.as_str()) {
                    path.push(next.as_str());
                    stack.push(edges.get(next.as_str()).map(|v| v.iter()).unwrap_or_default());
                }
            }
            None => {
                stack.pop();
                path.pop();
            }
        }
    }
    None
}

/// Prices in micro-USD per million tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Price {
    pub id: String,
    pub model_pattern: String,
    pub effective_from: Millis,
    pub input: u64,
    pub output: u64,
    pub cache_write_5m: u64,
    pub cache_write_1h: u64,
    pub cache_read: u64,
    /// "builtin" or "operator".
    pub source: String,
    pub revision: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminToken {
    pub id: String,
    pub name: String,
    pub token_hash: String,
    pub token_prefix: String,
    pub role: Role,
    pub created_at: Millis,
    pub revision: u64,
}

/// One committed change, as the audit log shows it. `detail` is JSON and never
/// holds a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub id: u64,
    pub at: Millis,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: String,
    pub revision: u64,
}

/// A data plane as the control plane last saw it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProxyState {
    pub node_id: String,
    pub build_version: String,
    pub acked: Option<Version>,
    /// The version the last NACK refused (cleared once a later one is acked).
    pub nack_version: Option<Version>,
    pub nack_error: String,
    pub nack_at: Millis,
    pub last_seen: Millis,
    /// As stored: the replica serving its stream said so last. See [`ProxyState::live`].
    pub connected: bool,
    pub replica: String,
    /// Resources the data plane took out of service in the config it acked.
    pub rejected: Vec<Rejected>,
}

/// How often the replica serving a data plane's Watch stream marks it seen.
pub const PROXY_SEEN_EVERY_MS: Millis = 15_000;
/// A data plane not seen for this long is not connected, whatever the stored flag says: the
/// replica that served it died without recording the disconnect.
pub const PROXY_STALE_AFTER_MS: Millis = 3 * PROXY_SEEN_EVERY_MS;

impl ProxyState {
    /// Connected now: recorded so, and seen within [`PROXY_STALE_AFTER_MS`].
    pub fn live(&self, now: Millis) -> bool {
        self.connected && now.saturating_sub(self.last_seen) <= PROXY_STALE_AFTER_MS
    }
}

/// A resource a data plane cannot use (it serves the rest of the config).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rejected {
    /// `ResourceKind::as_str()` of the resource ("account", "api_key", ...).
    pub kind: String,
    pub id: String,
    pub error: String,
}

/// JSON of a `Rejected` list, as stored.
pub fn rejected_to_json(r: &[Rejected]) -> String {
    serde_json::to_string(r).unwrap_or_else(|_| "[]".into())
}

/// A stored `Rejected` list; unreadable JSON reads as empty.
pub fn rejected_from_json(s: &str) -> Vec<Rejected> {
    serde_json::from_str(s).unwrap_or_default()
}

/// What happened on a Watch stream, for `Store::record_proxy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyEvent {
    Connected {
        build_version: String,
        held: Option<Version>,
    },
    Acked {
        version: Version,
        rejected: Vec<Rejected>,
    },
    Nacked {
        /// The version refused.
        version: Version,
        /// The version kept serving.
        serving: Option<Version>,
        error: String,
    },
    /// Still connected (sent every [`PROXY_SEEN_EVERY_MS`] by the serving replica).
    Seen,
    Disconnected,
}

/// One usage event, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UsageEvent {
    pub event_id: uuid::Uuid,
    pub request_id: String,
    pub ts: Millis,
    pub node_id: String,
    pub api_key_id: String,
    pub account_id: String,
    pub model: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_write_5m_tokens: u64,
    pub cache_write_1h_tokens: u64,
    pub cache_read_tokens: u64,
    pub cost_pico_usd: u64,
    pub http_status: u32,
    pub error_type: String,
    pub stream: bool,
    pub cancelled: bool,
    pub latency_ms: u64,
    pub ttfb_ms: u64,
    pub upstream_request_id: String,
    pub web_search_requests: u64,
    /// Why the counts cannot be fully trusted ("" when they can); see `relay_proto::bounds`.
    pub anomaly: String,
    /// The client's own id for its request (`x-request-id` / `request-id`), "" when none; see
    /// `relay_proto::bounds::client_request_id`.
    pub client_request_id: String,
    /// How long the request waited for an account before this attempt, and for what ("",
    /// "slot", "cooldown", "recovery"; see the proto's `UsageEvent`).
    pub queue_wait_ms: u64,
    pub waited_for: String,
    /// A stream's events and the longest gap between two of them (ms); 0 for JSON answers.
    pub stream_events: u64,
    pub max_event_gap_ms: u64,
    /// relay's own words on how it failed ("" on success or for an upstream's own error).
    pub error_message: String,
    /// The model the client asked for ("" when its body was never read); `model` is the one
    /// answered and billed.
    pub model_requested: String,
    /// The key's group when the request was served ("" when unknown).
    pub group_id: String,
}

/// Which requests one page of the request log covers (`Store::request_page`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestPage {
    /// Inclusive, on a request's latest event time.
    pub since: Option<Millis>,
    /// Exclusive.
    pub until: Option<Millis>,
    /// Only requests before this `(time, request id)`: the previous page's last one.
    pub before: Option<(Millis, String)>,
    pub limit: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UsageGroupBy {
    #[default]
    None,
    Key,
    Account,
    Model,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UsageBucket {
    #[default]
    None,
    Hour,
    Day,
}

impl UsageBucket {
    pub fn millis(self) -> Option<i64> {
        match self {
            UsageBucket::None => None,
            UsageBucket::Hour => Some(3_600_000),
            UsageBucket::Day => Some(86_400_000),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UsageQuery {
    pub group_by: UsageGroupBy,
    /// Inclusive.
    pub since: Option<Millis>,
    /// Exclusive.
    pub until: Option<Millis>,
    pub bucket: UsageBucket,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UsageRow {
    pub bucket_start: Millis,
    /// Key or account name (or id when the row is gone), or the model id.
    pub group: String,
    pub group_id: String,
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_write_5m_tokens: u64,
    pub cache_write_1h_tokens: u64,
    pub cache_read_tokens: u64,
    pub cost_pico_usd: u64,
    pub errors: u64,
    /// Rows among `requests` whose counts are flagged (`UsageEvent::anomaly`).
    pub anomalies: u64,
}

/// The whole config at one version, as stored (credentials still encrypted).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfigState {
    pub version: Version,
    pub api_keys: Vec<ApiKey>,
    pub accounts: Vec<Account>,
    pub groups: Vec<Group>,
    pub prices: Vec<Price>,
    pub settings: BTreeMap<String, String>,
    pub account_states: Vec<AccountState>,
    pub capture_rules: Vec<CaptureRule>,
}

/// A capture rule (`relayctl capture add`): which requests are recorded in full. Selectors are
/// ids ("" = any); stored as one JSON document in both stores.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct CaptureRule {
    pub id: String,
    pub key_id: String,
    pub group_id: String,
    pub account_id: String,
    /// An exact model id or a prefix ending in '*'; "" = any.
    pub model: String,
    pub errors_only: bool,
    /// The share of matching requests captured, in millionths (1..=1,000,000).
    pub sample_ppm: u32,
    /// The most bytes kept of each body.
    pub max_bytes: u64,
    /// Captures are removed this long after they were taken (0: with the request log).
    pub ttl_ms: u64,
    pub created_ms: Millis,
}

/// A deleted account's or group's last name (`deleted_names`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeletedName {
    /// `account` or `group`.
    pub kind: String,
    pub id: String,
    pub name: String,
    pub deleted_at: Millis,
}

/// One captured request as stored (`request_captures`): the data plane's zstd-compressed
/// capture document, kept as shipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCapture {
    pub request_id: String,
    pub rule_id: String,
    pub api_key_id: String,
    pub node_id: String,
    pub captured_ms: Millis,
    /// 0: removed with the request log only.
    pub expires_ms: Millis,
    pub truncated: bool,
    pub document_zstd: Vec<u8>,
}

/// One write, applied atomically with others by `Store::apply`.
///
/// `expect_revision` on an update is optimistic concurrency: the write fails
/// with `StoreError::Conflict` if the row was changed since it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    InsertAccount(Account),
    UpdateAccount {
        row: Account,
        expect_revision: u64,
    },
    DeleteAccount {
        id: String,
    },
    InsertApiKey(ApiKey),
    UpdateApiKey {
        row: ApiKey,
        expect_revision: u64,
    },
    InsertGroup(Group),
    UpdateGroup {
        row: Group,
        expect_revision: u64,
    },
    DeleteGroup {
        id: String,
    },
    UpsertPrice(Price),
    /// Removes one price row (by id). Stored usage keeps its cost: costs are
    /// computed when the usage is recorded, never from the price table later.
    DeletePrice {
        id: String,
    },
    InsertCaptureRule(CaptureRule),
    DeleteCaptureRule {
        id: String,
    },
    SetSetting {
        name: String,
        value: String,
    },
    UnsetSetting {
        name: String,
    },
    InsertAdminToken(AdminToken),
    DeleteAdminToken {
        id: String,
    },
    SetAccountState(AccountState),
    ClearAccountState {
        account_id: String,
        scope: String,
    },
    /// A guard, no write: the whole apply fails with `StoreError::Conflict`
    /// when the account's `reset_generation` is above `at_most` (a state seen
    /// before an operator's reset must not land after it).
    RequireResetGeneration {
        account_id: String,
        at_most: u64,
    },
    /// A guard, no write (fencing): the whole apply fails with `StoreError::Fenced` unless the
    /// stored leadership term is `term`, so a replica that lost leadership without noticing
    /// (paused, partitioned) cannot land a leader-only write after a new leader took over.
    CheckTerm {
        term: u64,
    },
}

/// One unified rate-limit window of a subscription account ("5h", "7d").
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QuotaWindow {
    pub name: String,
    /// 0..1; negative when the upstream did not say.
    pub utilization: f64,
    /// Unix ms; 0 = not said.
    pub reset_ms: Millis,
    pub status: String,
}

/// The newest quota windows the fleet saw for a subscription account.
#[derive(Debug, Clone, PartialEq)]
pub struct AccountQuota {
    pub account_id: String,
    pub observed_at: Millis,
    pub observed_by: String,
    pub status: String,
    pub reset_at: Millis,
    pub windows: Vec<QuotaWindow>,
}

/// A token endpoint's answer to a refresh, sealed, kept until its tokens are committed.
#[derive(Clone, PartialEq)]
pub struct OAuthPending {
    pub account_id: String,
    /// SHA-256 (hex) of the refresh token that was spent.
    pub from_hash: String,
    /// AES-256-GCM ciphertext of the answer (see `crypto`).
    pub sealed: Vec<u8>,
    pub created_at: Millis,
}

impl std::fmt::Debug for OAuthPending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuthPending")
            .field("account_id", &self.account_id)
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn edges(list: &[(&str, &[&str])]) -> HashMap<String, Vec<String>> {
        list.iter()
            .map(|(g, f)| (g.to_string(), f.iter().map(|x| x.to_string()).collect()))
            .collect()
    }

    #[test]
    fn fallback_cycles_are_found_through_the_group_changed() {
        let e = edges(&[("a", &["b", "c"]), ("b", &["c"]), ("c", &[])]);
        assert_eq!(fallback_cycle(&e, "a"), None);
        let e = edges(&[("a", &["a"])]);
        assert_eq!(fallback_cycle(&e, "a").unwrap(), ["a", "a"]);
        let e = edges(&[("a", &["b", "c"]), ("b", &["d"]), ("c", &["d"]), ("d", &["a"])]);
        assert_eq!(fallback_cycle(&e, "a").unwrap(), ["a", "b", "d", "a"]);
        // A diamond without a way back is no cycle; unknown ids end a path.
        let e = edges(&[("a", &["b", "c"]), ("b", &["d", "x"]), ("c", &["d"]), ("d", &[])]);
        assert_eq!(fallback_cycle(&e, "a"), None);
        assert_eq!(fallback_cycle(&e, "nope"), None);
    }
}
