//! Persistence behind one trait, with two implementations: Postgres for the
//! distributed control plane and SQLite (embedded, bundled) for standalone mode.
//! `tests/store_conformance.rs` runs one suite against both.
//!
//! Architecture invariant: every config write goes through [`Store::apply`],
//! which bumps the head revision and writes the audit entry in the same
//! transaction as the change. Nothing else writes config. What a write checks
//! and records is written once, in `rules.rs`, for both stores; each store
//! directory holds only its SQL. Errors are typed ([`StoreError`]): callers
//! decide by kind, and only `Unavailable` is worth a retry.

use crate::model::*;
use std::sync::Arc;
use tokio::sync::Notify;

pub mod pg_tls;
pub mod postgres;
mod rules;
pub mod sqlite;

/// The cause an error carries for logs and `source()` chains (never shown to a client).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong in the store, by what a caller can do about it. Messages name resources by
/// name or id, never a secret (no SQL parameter value of a credential column).
///
/// `Unavailable` is the only kind worth retrying as it is; `Internal`, `Corrupt` and `Migration`
/// keep their cause (`#[source]`) for the log and are not the caller's to fix.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{kind} {name:?} already exists")]
    AlreadyExists { kind: &'static str, name: String },
    #[error("{kind} {name:?} not found")]
    NotFound { kind: &'static str, name: String },
    /// An update from a revision that is no longer the row's (optimistic concurrency): another
    /// write to the same row landed between this write's read and its update. The Admin API
    /// re-reads and retries these itself; one reaches a caller only when it kept losing.
    #[error("concurrent modification of {kind} {name:?}; another change to it kept landing first")]
    Conflict { kind: &'static str, name: String },
    /// A delete refused because other rows still name the resource.
    #[error("{0} is still in use")]
    InUse(String),
    /// The write would break a rule the store keeps (a group falling back to itself, fallbacks
    /// forming a cycle, a value out of range); the message names what, by name.
    #[error("{0}")]
    Invalid(String),
    /// A `Mutation::CheckTerm` failed: another replica became leader since (see `crate::leader`).
    #[error("fenced: this replica's leadership term {held} is stale (current term {current})")]
    Fenced { held: u64, current: u64 },
    /// The database cannot be reached or did not answer in time (connection refused or lost,
    /// pool timeout, server starting or shutting down, lock busy): retrying later may succeed.
    #[error("database unavailable: {message}")]
    Unavailable {
        message: String,
        #[source]
        source: Option<BoxError>,
    },
    /// The database refused a statement for a reason a retry does not fix.
    #[error("database error: {message}")]
    Internal {
        message: String,
        #[source]
        source: Option<BoxError>,
    },
    /// A stored row does not convert to the domain type.
    #[error("stored data is invalid: {message}")]
    Corrupt {
        message: String,
        #[source]
        source: Option<BoxError>,
    },
    #[error("migration failed: {message}")]
    Migration {
        message: String,
        #[source]
        source: Option<BoxError>,
    },
}

impl StoreError {
    /// `Unavailable` with its cause.
    pub fn unavailable(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Unavailable {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// `Internal` with its cause.
    pub fn internal(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Internal {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// `Internal` without an underlying error (an invariant of the store itself broke).
    pub fn internal_msg(message: impl Into<String>) -> Self {
        Self::Internal {
            message: message.into(),
            source: None,
        }
    }

    /// `Corrupt` without an underlying error.
    pub fn corrupt(message: impl Into<String>) -> Self {
        Self::Corrupt {
            message: message.into(),
            source: None,
        }
    }

    /// `Corrupt` with its cause.
    pub fn corrupt_from(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Corrupt {
            message: message.into(),
            source: Some(source.into()),
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Who leads the control plane's singleton jobs, as the store last recorded it
/// ([`Store::claim_term`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeaderRecord {
    /// Grows by one with each new leader; writes fenced by an older term are refused.
    pub term: u64,
    /// The leading replica's name.
    pub holder: String,
    /// How it was elected: "etcd", "postgres-advisory-lock" or "standalone".
    pub mechanism: String,
    /// When it became leader (ms since the epoch).
    pub since_ms: Millis,
    /// The mechanism's own evidence, e.g. "etcd key /relay/leader create revision 1234".
    pub detail: String,
}

/// Result of storing one usage batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IngestResult {
    pub inserted: u64,
    pub duplicates: u64,
}

/// One webhook notification in the outbox (`crate::notify`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// `KIND/SUBJECT/EPISODE`: the same event written twice is stored once.
    pub dedup_key: String,
    pub kind: String,
    pub subject: String,
    /// The event document (JSON), as the generic format sends it.
    pub payload: String,
    pub created_ms: Millis,
    /// Delivery attempts made so far.
    pub attempts: u32,
}

/// What storing a notification does to the open episodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EpisodeChange {
    None,
    /// Opens episode `episode` of (`kind`, the notification's subject).
    Open {
        kind: String,
        episode: String,
    },
    /// Closes the open episode of (`kind`, the notification's subject).
    Close {
        kind: String,
    },
}

/// An episode opened by a notification and not closed yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenEpisode {
    pub kind: String,
    pub subject: String,
    pub episode: String,
    pub opened_ms: Millis,
}

/// How one delivery attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryOutcome {
    Sent,
    /// Failed; try again at `next_attempt_ms`.
    Retry {
        next_attempt_ms: Millis,
        error: String,
    },
    /// Failed for good.
    Failed {
        error: String,
    },
}

/// A notification as `relayctl notify list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    pub notification: Notification,
    /// pending, sent or failed.
    pub state: String,
    pub next_attempt_ms: Millis,
    pub last_error: String,
    /// When it was sent or given up (0 while pending).
    pub done_ms: Millis,
}

/// The outbox's waiting notifications.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutboxStats {
    pub pending: u64,
    /// `created_ms` of the oldest one.
    pub oldest_created_ms: Option<Millis>,
}

#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Which implementation this is ("postgres" or "sqlite"), for logs and metrics.
    fn backend(&self) -> &'static str;

    /// Woken (as a hint, without replay) when the head may have moved: by this
    /// process's own commits, and for Postgres by `NOTIFY` from other replicas.
    fn change_hint(&self) -> Arc<Notify>;

    /// The current head version.
    async fn head(&self) -> Result<Version>;

    /// Applies the mutations atomically, bumping the revision by exactly one and
    /// writing one audit entry. Returns the new head.
    async fn apply(&self, mutations: Vec<Mutation>, audit: AuditRecord) -> Result<Version>;

    /// Starts a new epoch (same revision) if the head is still `seen`: history
    /// was rewound (a restore), so revisions a data plane holds may now mean
    /// something else, and a new epoch makes every data plane take a full
    /// snapshot. The new epoch is above `seen`'s, `at_least`, and the current
    /// time in ms. Audited with `reason`. Returns the head after the call
    /// (unchanged when it had moved meanwhile).
    async fn start_new_epoch(&self, seen: Version, at_least: u64, reason: &str) -> Result<Version>;

    /// The whole config at the current head, read consistently.
    async fn load_config(&self) -> Result<ConfigState>;

    async fn list_accounts(&self) -> Result<Vec<Account>>;
    /// By id, or else by name.
    async fn get_account(&self, id_or_name: &str) -> Result<Option<Account>>;
    async fn list_api_keys(&self) -> Result<Vec<ApiKey>>;
    async fn get_api_key(&self, id_or_name: &str) -> Result<Option<ApiKey>>;
    async fn list_groups(&self) -> Result<Vec<Group>>;
    async fn get_group(&self, id_or_name: &str) -> Result<Option<Group>>;
    async fn list_prices(&self) -> Result<Vec<Price>>;
    async fn settings(&self) -> Result<std::collections::BTreeMap<String, String>>;
    /// Every stored account state (expired ones included), by account then scope.
    async fn list_account_states(&self) -> Result<Vec<AccountState>>;

    async fn list_admin_tokens(&self) -> Result<Vec<AdminToken>>;
    async fn find_admin_token(&self, token_hash: &str) -> Result<Option<AdminToken>>;

    /// Newest first; `limit` entries at most.
    async fn list_audit(&self, limit: u32, since: Option<Millis>) -> Result<Vec<AuditEntry>>;

    /// The audit entries written at these revisions (each change writes one), in no order.
    async fn audit_at_revisions(&self, revisions: &[u64]) -> Result<Vec<AuditEntry>>;

    async fn record_proxy(&self, node_id: &str, replica: &str, event: ProxyEvent) -> Result<()>;
    /// Data planes' Watch events, in order, in one transaction: one commit for the ACKs of a
    /// whole fleet. On an error nothing of the batch is recorded.
    async fn record_proxies(&self, events: &[ProxyRecord]) -> Result<()>;
    async fn list_proxies(&self) -> Result<Vec<ProxyState>>;

    /// Stores a batch of usage events in one transaction; events whose id is
    /// already stored are skipped (`ON CONFLICT DO NOTHING`).
    async fn insert_usage(&self, events: &[UsageEvent]) -> Result<IngestResult>;
    async fn query_usage(&self, query: UsageQuery) -> Result<Vec<UsageRow>>;
    /// The stored cost (pico-USD) of each API key's usage with `since <= ts < until`, by key id;
    /// keys without such usage are absent. Sums saturate at `i64::MAX`. One query, answered from
    /// the `(ts, api_key_id, cost_pico_usd)` index.
    async fn spend_by_key(&self, since: Millis, until: Millis) -> Result<std::collections::BTreeMap<String, u64>>;

    /// Stores quota observations, each only when newer than the stored one; observations of
    /// accounts that no longer exist are skipped. Not config: no revision, no audit.
    async fn upsert_quotas(&self, quotas: &[AccountQuota]) -> Result<()>;
    async fn list_quotas(&self) -> Result<Vec<AccountQuota>>;

    /// Keeps a token endpoint's answer until its tokens are committed (replacing one for the
    /// same account and spent token). An unknown account is an error (`NotFound`).
    async fn stash_oauth(&self, pending: &OAuthPending) -> Result<()>;
    async fn list_oauth_pending(&self) -> Result<Vec<OAuthPending>>;
    async fn drop_oauth_pending(&self, account_id: &str, from_hash: &str) -> Result<()>;

    /// Records that the console session `session` (its cookie's nonce) was signed out; kept until
    /// `expires_at`, when the cookie would be refused anyway. Ended sessions that expired by
    /// `now` are forgotten. Not config: no revision, no audit.
    async fn end_console_session(&self, session: &str, expires_at: Millis, now: Millis) -> Result<()>;
    /// Whether the console session `session` was signed out.
    async fn console_session_ended(&self, session: &str) -> Result<bool>;

    /// One page of the request log (see `crate::requests`): the client requests (usage rows grouped
    /// by `request_id`) whose latest event time `t` has `since <= t < until` and `(t, id) < before`
    /// (ids compared bytewise), newest first, at most `limit`, as `(t, request_id)`.
    async fn request_page(&self, page: RequestPage) -> Result<Vec<(Millis, String)>>;
    /// Every stored usage row of these requests, in no particular order.
    async fn request_events(&self, request_ids: &[String]) -> Result<Vec<UsageEvent>>;
    /// The time of the `rows`-th newest usage row with `floor <= ts < before` (`None`: fewer
    /// rows than that). The statistics walk the log back in windows of about `rows` rows with it.
    async fn request_window_floor(&self, floor: Millis, before: Millis, rows: u32) -> Result<Option<Millis>>;
    /// Every stored usage row of the requests whose latest row time `t` has `since <= t < until`
    /// (their earlier rows included), in no particular order.
    async fn request_window_events(&self, since: Millis, until: Millis) -> Result<Vec<UsageEvent>>;

    /// The names of deleted accounts and groups (`deleted_names`), so records that keep their
    /// ids can still name them.
    async fn deleted_names(&self) -> Result<Vec<DeletedName>>;
    /// The capture rules, oldest first.
    async fn list_capture_rules(&self) -> Result<Vec<CaptureRule>>;
    /// Stores captured requests, one per request id (a second one for an id is a duplicate).
    async fn insert_captures(&self, captures: &[StoredCapture]) -> Result<IngestResult>;
    async fn get_capture(&self, request_id: &str) -> Result<Option<StoredCapture>>;
    /// Deletes these requests' usage rows and captures, in one transaction: (rows, captures).
    async fn delete_requests(&self, request_ids: &[String]) -> Result<(u64, u64)>;
    /// Deletes at most `limit` captures taken before `before_ms` or expired at `now_ms`; returns
    /// how many went (callers loop while it returns `limit`).
    async fn delete_captures_before(&self, before_ms: Millis, now_ms: Millis, limit: u32) -> Result<u64>;
    /// Deletes at most `limit` captures taken before `before_ms` whose request has no usage row
    /// left (the row cap deleted its record); returns how many went.
    async fn delete_orphan_captures(&self, before_ms: Millis, limit: u32) -> Result<u64>;

    /// How many usage rows are stored.
    async fn usage_row_count(&self) -> Result<u64>;
    /// Deletes the `limit` oldest usage rows (by `ts`); returns how many went.
    async fn delete_oldest_usage(&self, limit: u32) -> Result<u64>;

    /// The time of the usage row at this offset in time order, oldest first (`None`: fewer rows).
    async fn usage_ts_at(&self, offset: u64) -> Result<Option<Millis>>;

    /// Records that the raw usage rows before `floor_ms` may be gone (retention deleted them):
    /// usage reports read the daily rollups for the whole days before it. Only ever moves forward.
    async fn raise_usage_raw_floor(&self, floor_ms: Millis) -> Result<()>;

    /// Deletes at most `limit` usage rows with `ts < before_ms`; returns how many went. Callers
    /// loop until it returns less than `limit` (bounded transactions on big tables).
    async fn delete_usage_before(&self, before_ms: Millis, limit: u32) -> Result<u64>;

    /// Records that `holder` just became leader: the term grows by one (the first is 1) and the
    /// new term is returned. Writes the leader makes carry it (`Mutation::CheckTerm`).
    async fn claim_term(&self, holder: &str, mechanism: &str, detail: &str, now_ms: Millis) -> Result<u64>;

    /// The last recorded leader, if any replica ever claimed a term.
    async fn leader(&self) -> Result<Option<LeaderRecord>>;

    /// Stores a pending notification unless one with its dedup key is stored already (then
    /// returns false and changes nothing); a stored one applies `change` in the same transaction.
    async fn notify_enqueue(&self, n: &Notification, change: &EpisodeChange) -> Result<bool>;
    async fn notify_open_episodes(&self) -> Result<Vec<OpenEpisode>>;
    /// Pending notifications due at `now`, oldest first, `limit` at most.
    async fn notify_due(&self, now: Millis, limit: u32) -> Result<Vec<Notification>>;
    /// Records a delivery attempt of a pending notification.
    async fn notify_mark(&self, dedup_key: &str, outcome: &DeliveryOutcome, now: Millis) -> Result<()>;
    async fn notify_stats(&self) -> Result<OutboxStats>;
    /// The newest notifications, newest first, `limit` at most.
    async fn notify_recent(&self, limit: u32) -> Result<Vec<OutboxEntry>>;
}

pub type DynStore = Arc<dyn Store>;

/// One Watch event to record: the data plane's node id, the replica serving it, the event.
pub type ProxyRecord = (String, String, ProxyEvent);

/// The columns `Store::request_events` reads, in the order both stores map them.
pub(crate) const USAGE_COLUMNS: &str = "event_id, request_id, ts, node_id, api_key_id, account_id, model, \
     input_tokens, output_tokens, cache_write_5m_tokens, cache_write_1h_tokens, cache_read_tokens, cost_pico_usd, \
     http_status, error_type, stream, cancelled, latency_ms, ttfb_ms, upstream_request_id, web_search_requests, \
     anomaly, client_request_id, queue_wait_ms, waited_for, stream_events, max_event_gap_ms, error_message, \
     model_requested, group_id";

/// The request ids whose latest usage row time is in `[$1, $2)`: those with a row in the range
/// and none at or after its end (both looked up by index: `(ts, …)` and `(request_id, ts)`).
pub(crate) const REQUESTS_ENDING_IN: &str = "SELECT DISTINCT w.request_id FROM usage_events w \
     WHERE w.ts >= $1 AND w.ts < $2 AND NOT EXISTS \
     (SELECT 1 FROM usage_events l WHERE l.request_id = w.request_id AND l.ts >= $2)";

/// One day in ms.
pub(crate) const DAY_MS: i64 = 86_400_000;

/// Where usage reports read from, as one table `u` with a row per raw usage row (`span` 1) or per
/// daily rollup row (`ts` its day's start, `span` a day): the rollups for the whole days before the
/// raw floor (rounded up to a day; see `usage_raw_floor`), the raw rows from there on. The same
/// SQL for both stores (no parameter).
pub(crate) fn usage_source() -> String {
    let split = "COALESCE((SELECT floor_ms + ((86400000 - floor_ms % 86400000) % 86400000) \
                 FROM usage_raw_floor WHERE id = 1), -9223372036854775808)";
    format!(
        "(SELECT ts, 1 AS span, api_key_id, account_id, model, 1 AS n, input_tokens, output_tokens, \
         cache_write_5m_tokens, cache_write_1h_tokens, cache_read_tokens, cost_pico_usd, \
         CASE WHEN http_status >= 400 OR error_type <> '' THEN 1 ELSE 0 END AS err, \
         CASE WHEN anomaly <> '' THEN 1 ELSE 0 END AS anom \
         FROM usage_events WHERE ts >= {split} AND account_id <> '' \
         UNION ALL \
         SELECT day, 86400000, api_key_id, account_id, model, requests, input_tokens, output_tokens, \
         cache_write_5m_tokens, cache_write_1h_tokens, cache_read_tokens, cost_pico_usd, errors, anomalies \
         FROM usage_daily WHERE day < {split} AND account_id <> '') u"
    )
}

/// A capture rule's stored JSON document back to its type.
pub(crate) fn capture_rule_from(doc: &str) -> Result<CaptureRule> {
    serde_json::from_str(doc).map_err(|e| StoreError::corrupt_from(format!("capture rule: {e}"), e))
}

/// A stored count back to what it counts (a negative value cannot be stored; read as 0).
pub(crate) fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub use rules::check_fallbacks;

/// A quota's windows as stored (JSON text), in both stores.
pub(crate) fn quota_windows_json(w: &[QuotaWindow]) -> Result<String> {
    serde_json::to_string(w).map_err(|e| StoreError::internal("cannot encode quota windows", e))
}

/// Stored quota windows back to their type.
pub(crate) fn quota_windows_from(text: String) -> Result<Vec<QuotaWindow>> {
    serde_json::from_str(&text).map_err(|e| StoreError::corrupt_from(format!("quota windows: {e}"), e))
}
