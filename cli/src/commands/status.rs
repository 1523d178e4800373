//! Read-mostly views: `status`, `data-planes`, `audit`, `usage`, `version`.

use anyhow::{anyhow, Result};
use relay_proto::v1::{
    AuditEntry, ConfigVersion, GetConfigVersionRequest, GetStatusRequest, GetStatusResponse, LeaderInfo,
    ListAuditRequest, ListProxiesRequest, ProxyState, QueryUsageRequest, UsageBucket, UsageGroupBy, UsageRow,
};

use super::version_string;
use crate::args::{AuditArgs, BucketArg, NotifyCmd, ProxiesCmd, UsageArgs, UsageBy};
use crate::client::{Conn, RpcResult};
use crate::output::{Column, Format, Output, Value};
use crate::parse::format_cost;

/// A data plane, with the head it is compared against.
struct ProxyRow {
    p: ProxyState,
    head: Option<ConfigVersion>,
}

impl ProxyRow {
    /// Revisions behind the head; unknown before the first ACK or across epochs.
    fn lag(&self) -> Option<u64> {
        match (&self.p.acked, &self.head) {
            (Some(a), Some(h)) if a.epoch == h.epoch => Some(h.revision.saturating_sub(a.revision)),
            _ => None,
        }
    }

    /// The acked config as people read it: its revision, and "current", "N behind" or "older
    /// epoch" against the head (the epoch itself is in `-o wide`/JSON).
    fn config_text(&self) -> Option<String> {
        let a = self.p.acked.as_ref()?;
        Some(match (self.lag(), &self.head) {
            (Some(0), _) => format!("{} (current)", a.revision),
            (Some(n), _) => format!("{} ({n} behind)", a.revision),
            (None, Some(_)) => format!("{} (older epoch)", a.revision),
            (None, None) => a.revision.to_string(),
        })
    }

    /// The last refused version, when (UTC, to the minute: `-o wide` has the whole time) and why.
    /// The control plane clears it once the data plane acks a later version.
    fn nack_text(&self) -> Option<String> {
        let v = self.p.last_nack_version.as_ref()?;
        let at = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(self.p.last_nack_at_ms)
            .filter(|_| self.p.last_nack_at_ms != 0)
            .map(|t| format!(" {}", t.format("%m-%d %H:%M")))
            .unwrap_or_default();
        Some(format!("{}{at}: {}", v.revision, self.p.last_nack_error))
    }
}

fn opt_version(v: Option<&ConfigVersion>) -> Value {
    version_string(v).map_or(Value::Null, Value::Text)
}

fn kind_name(x: &relay_proto::v1::RejectedResource) -> &'static str {
    let kind = x.r#ref.as_ref().map_or(0, |r| r.kind);
    match relay_proto::v1::ResourceKind::try_from(kind) {
        Ok(relay_proto::v1::ResourceKind::Account) => "account",
        Ok(relay_proto::v1::ResourceKind::ApiKey) => "key",
        _ => "resource",
    }
}

const PROXY_COLUMNS: &[Column<ProxyRow>] = &[
    Column::new("node_id", "Node", |r| Value::text(&r.p.node_id)),
    Column::new("config", "Config", |r| r.config_text().map_or(Value::Null, Value::Text)),
    Column::new("last_nack", "Last NACK", |r| {
        r.nack_text().map_or(Value::Null, Value::Text)
    }),
    Column::detail("build_version", "Build", |r| Value::opt_text(&r.p.build_version)),
    Column::detail("acked_version", "Acked", |r| opt_version(r.p.acked.as_ref())),
    Column::detail("head_version", "Head", |r| opt_version(r.head.as_ref())),
    Column::detail("lag", "Lag", |r| r.lag().map_or(Value::Null, Value::UInt)),
    Column::detail("last_nack_error", "Last NACK error", |r| {
        Value::opt_text(&r.p.last_nack_error)
    }),
    Column::detail("last_nack_version", "NACKed version", |r| {
        opt_version(r.p.last_nack_version.as_ref())
    }),
    Column::detail("last_nack_at", "NACKed at", |r| Value::Time(r.p.last_nack_at_ms)),
    Column::new("rejected", "Out of service", |r| {
        let items: Vec<String> =
            r.p.rejected
                .iter()
                .map(|x| {
                    format!(
                        "{} {}: {}",
                        kind_name(x),
                        x.r#ref.as_ref().map_or("", |r| r.id.as_str()),
                        x.error
                    )
                })
                .collect();
        Value::list(&items, "-")
    }),
    Column::detail("last_seen", "Last seen", |r| Value::Time(r.p.last_seen_ms)),
    Column::new("connected", "Connected", |r| Value::Bool(r.p.connected)),
    // The control-plane replica its Watch stream is attached to.
    Column::new("replica", "Replica", |r| Value::opt_text(&r.p.replica)),
];

/// What `relayctl status` shows.
#[derive(Debug, Default, Clone)]
struct Overview {
    version: Option<ConfigVersion>,
    data_planes: u64,
    connected: u64,
    behind: u64,
    max_lag: u64,
    nacking: u64,
    accounts: u64,
    disabled: u64,
    healthy: u64,
    /// Enabled accounts by their worst current state, e.g. ("RATE_LIMITED", 2).
    by_state: Vec<(String, u64)>,
    requests: u64,
    errors: u64,
    flagged: u64,
    cost_pico_usd: u64,
    /// Who leads the singleton jobs, and which replica answered (None: an older control plane).
    status: Option<GetStatusResponse>,
    now_ms: i64,
}

/// A duration as people read it: "45s", "5m", "3h", "2d".
fn ago(ms: i64) -> String {
    let s = (ms / 1000).max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// "cp-2 (etcd) since 5m ago, term 7".
fn leader_text(l: &LeaderInfo, now_ms: i64) -> String {
    format!(
        "{} ({}) since {} ago, term {}",
        l.holder,
        l.mechanism,
        ago(now_ms - l.since_ms),
        l.term
    )
}

impl Overview {
    fn text(&self) -> String {
        let states: Vec<String> = self
            .by_state
            .iter()
            .map(|(s, n)| format!("{n} {}", s.to_ascii_lowercase().replace('_', " ")))
            .collect();
        let mut out = format!(
            "Config version   {}\n\
             Data planes      {} connected of {}; {} behind the head (max {} revisions); {} refusing the config\n\
             Accounts         {} enabled: {} healthy{}{}; {} disabled\n\
             Last hour        {} requests, {} errors, {} spent",
            version_string(self.version.as_ref()).unwrap_or_else(|| "-".into()),
            self.connected,
            self.data_planes,
            self.behind,
            self.max_lag,
            self.nacking,
            self.accounts - self.disabled,
            self.healthy,
            if states.is_empty() { "" } else { ", " },
            states.join(", "),
            self.disabled,
            self.requests,
            self.errors,
            dollars(self.cost_pico_usd),
        );
        if self.flagged > 0 {
            out.push_str(&format!(", {} usage rows flagged", self.flagged));
        }
        out.push('\n');
        if let Some(st) = &self.status {
            let last = st.leader.as_ref().map(|l| leader_text(l, self.now_ms));
            let leader = match (st.current_leader.as_deref(), last) {
                // The replica takes no part in elections: the last recorded win is all there is.
                (None, last) => last.unwrap_or_else(|| "none yet".to_string()),
                (Some(""), None) => "none now".to_string(),
                (Some(""), Some(last)) => format!("none now (last: {last})"),
                (Some(now), Some(last)) if st.leader.as_ref().is_some_and(|l| l.holder == now) => last,
                (Some(now), Some(last)) => format!("{now} (last recorded: {last})"),
                (Some(now), None) => now.to_string(),
            };
            out.push_str(&format!("leader: {leader}\n"));
            if !st.replica.is_empty() {
                let build = if st.build_version.is_empty() {
                    String::new()
                } else {
                    format!("relay {}, ", st.build_version)
                };
                out.push_str(&format!(
                    "answered by: {} ({build}{}{})\n",
                    st.replica,
                    st.replica_mechanism,
                    if st.replica_is_leader {
                        ", leading"
                    } else {
                        ", following"
                    }
                ));
            }
        }
        out
    }
}

/// Money as people read it: dollars and cents (rounded), e.g. "$12.35".
fn dollars(pico_usd: u64) -> String {
    let cents = (u128::from(pico_usd) + 5_000_000_000) / 10_000_000_000;
    format!("${}.{:02}", cents / 100, cents % 100)
}

const OVERVIEW_COLUMNS: &[Column<Overview>] = &[
    Column::new("config_version", "Config version", |o| opt_version(o.version.as_ref())),
    Column::new("data_planes", "Data planes", |o| Value::UInt(o.data_planes)),
    Column::new("data_planes_connected", "Connected", |o| Value::UInt(o.connected)),
    Column::new("data_planes_behind", "Behind", |o| Value::UInt(o.behind)),
    Column::new("max_lag", "Max lag", |o| Value::UInt(o.max_lag)),
    Column::new("data_planes_nacking", "NACKing", |o| Value::UInt(o.nacking)),
    Column::new("accounts", "Accounts", |o| Value::UInt(o.accounts)),
    Column::new("accounts_disabled", "Disabled", |o| Value::UInt(o.disabled)),
    Column::new("accounts_healthy", "Healthy", |o| Value::UInt(o.healthy)),
    Column::new("accounts_by_state", "By state", |o| {
        let items: Vec<String> = o.by_state.iter().map(|(s, n)| format!("{s}={n}")).collect();
        Value::list(&items, "-")
    }),
    Column::new("last_hour_requests", "Requests (1h)", |o| Value::UInt(o.requests)),
    Column::new("last_hour_errors", "Errors (1h)", |o| Value::UInt(o.errors)),
    Column::new("last_hour_flagged", "Flagged (1h)", |o| Value::UInt(o.flagged)),
    Column::new("last_hour_cost_usd", "Spend (1h)", |o| {
        Value::Decimal(format_cost(o.cost_pico_usd))
    }),
    Column::new("leader", "Leader", |o| {
        o.status
            .as_ref()
            .and_then(|s| s.leader.as_ref())
            .map_or(Value::Null, |l| Value::text(&l.holder))
    }),
    Column::new("leader_now", "Leading now", |o| {
        // What the answering replica sees: null when it takes no part, "" when nobody leads.
        o.status
            .as_ref()
            .and_then(|s| s.current_leader.as_deref())
            .map_or(Value::Null, Value::text)
    }),
    Column::new("leader_mechanism", "Mechanism", |o| {
        o.status
            .as_ref()
            .and_then(|s| s.leader.as_ref())
            .map_or(Value::Null, |l| Value::text(&l.mechanism))
    }),
    Column::new("leader_since", "Leader since", |o| {
        o.status
            .as_ref()
            .and_then(|s| s.leader.as_ref())
            .map_or(Value::Null, |l| Value::Time(l.since_ms))
    }),
    Column::new("leader_term", "Term", |o| {
        o.status
            .as_ref()
            .and_then(|s| s.leader.as_ref())
            .map_or(Value::Null, |l| Value::UInt(l.term))
    }),
    Column::new("replica", "Replica", |o| {
        o.status.as_ref().map_or(Value::Null, |s| Value::opt_text(&s.replica))
    }),
    Column::new("build_version", "Control plane version", |o| {
        o.status
            .as_ref()
            .map_or(Value::Null, |s| Value::opt_text(&s.build_version))
    }),
];

pub async fn status(conn: &mut Conn, out: Output) -> Result<()> {
    use relay_proto::v1::{AccountHealth, AccountStatus, ListAccountsRequest};
    let server = conn.server.clone();
    let version = conn
        .api
        .get_config_version(GetConfigVersionRequest {})
        .await
        .or_report(&server)?;
    let proxies = conn.api.list_proxies(ListProxiesRequest {}).await.or_report(&server)?;
    let accounts = conn
        .api
        .list_accounts(ListAccountsRequest {})
        .await
        .or_report(&server)?;
    let hour_ago = chrono::Utc::now().timestamp_millis() - 3_600_000;
    let usage = conn
        .api
        .query_usage(QueryUsageRequest {
            since_ms: hour_ago,
            ..Default::default()
        })
        .await
        .or_report(&server)?;
    // An older control plane has no GetStatus: the rest still shows.
    let status = match conn.api.get_status(GetStatusRequest {}).await {
        Ok(r) => Some(r.into_inner()),
        Err(s) if s.code() == tonic::Code::Unimplemented => None,
        Err(s) => return Err(crate::client::status_error(&s, &server)),
    };
    let mut o = Overview {
        version: Some(version),
        status,
        now_ms: chrono::Utc::now().timestamp_millis(),
        ..Overview::default()
    };
    for p in proxies.proxies {
        let row = ProxyRow { p, head: proxies.head };
        o.data_planes += 1;
        o.connected += u64::from(row.p.connected);
        if row.p.connected && row.lag().is_some_and(|l| l > 0) {
            o.behind += 1;
        }
        o.max_lag = o.max_lag.max(row.lag().unwrap_or(0));
        o.nacking += u64::from(row.p.last_nack_version.is_some());
    }
    let mut by_state: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    for a in &accounts.accounts {
        o.accounts += 1;
        if a.status == AccountStatus::Disabled as i32 {
            o.disabled += 1;
            continue;
        }
        // The worst state in force (the enum goes from least to most severe).
        let worst = a
            .states
            .iter()
            .filter_map(|s| AccountHealth::try_from(s.health).ok())
            .max_by_key(|h| *h as i32);
        match worst {
            None => o.healthy += 1,
            Some(h) => {
                *by_state
                    .entry(h.as_str_name().trim_start_matches("ACCOUNT_HEALTH_").to_string())
                    .or_default() += 1
            }
        }
    }
    o.by_state = by_state.into_iter().collect();
    for r in usage.rows {
        o.requests += r.requests;
        o.errors += r.errors;
        o.flagged += r.anomalies;
        o.cost_pico_usd = o.cost_pico_usd.saturating_add(r.cost_pico_usd);
    }
    match out.format {
        Format::Table | Format::Wide => {
            print!("{}", o.text());
            Ok(())
        }
        _ => out.one(OVERVIEW_COLUMNS, &o),
    }
}

pub async fn proxies(conn: &mut Conn, out: Output, cmd: ProxiesCmd) -> Result<()> {
    match cmd {
        ProxiesCmd::List => {
            let resp = conn
                .api
                .list_proxies(ListProxiesRequest {})
                .await
                .or_report(&conn.server)?;
            let head = resp.head;
            let rows: Vec<ProxyRow> = resp.proxies.into_iter().map(|p| ProxyRow { p, head }).collect();
            out.list(PROXY_COLUMNS, &rows)
        }
    }
}

/// The detail is JSON; keep it structured in JSON output when it parses.
fn audit_detail(e: &AuditEntry) -> Value {
    if e.detail.is_empty() {
        return Value::Null;
    }
    serde_json::from_str(&e.detail).map_or_else(|_| Value::text(&e.detail), Value::Json)
}

/// `key=value` pairs of the audit detail, ids and empty values left out, at most 80 characters.
fn audit_summary(e: &AuditEntry) -> Value {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(&e.detail) else {
        return Value::opt_text(&e.detail);
    };
    // A price: dollars per million tokens, input and output first.
    if map.get("unit").and_then(|u| u.as_str()) == Some("micro-USD per million tokens") {
        let text = ["input", "output", "cache_read", "cache_write_5m", "cache_write_1h"]
            .iter()
            .filter_map(|k| {
                let n = map.get(*k)?.as_u64()?;
                Some(format!("{k}=${}/MTok", crate::parse::format_micros(n)))
            })
            .collect::<Vec<_>>()
            .join(", ");
        return Value::Text(text);
    }
    let mut parts = Vec::new();
    for (k, v) in &map {
        if k == "id" || v.is_null() || v == &serde_json::json!("") || v == &serde_json::json!([]) {
            continue;
        }
        let (k, shown) = match v {
            serde_json::Value::Object(o) => {
                let set: Vec<String> = o
                    .iter()
                    .filter(|(_, x)| !matches!(x, serde_json::Value::Number(n) if n.as_u64() == Some(0)))
                    .map(|(k, x)| {
                        let (k, x) = audit_field(k, x);
                        format!("{k}:{x}")
                    })
                    .collect();
                if set.is_empty() {
                    continue;
                }
                (k.clone(), set.join(" "))
            }
            v => audit_field(k, v),
        };
        parts.push(format!("{k}={shown}"));
    }
    let mut text = parts.join(", ");
    if text.chars().count() > 80 {
        text = text.chars().take(79).collect::<String>() + "…";
    }
    Value::Text(text)
}

/// One field of an audit detail as a table shows it: money in dollars and cents
/// (`daily_budget_micro_usd: 5000000` → `daily_budget` `$5.00`; a budget of 0 is `unlimited`).
fn audit_field(k: &str, v: &serde_json::Value) -> (String, String) {
    if let (Some(name), Some(n)) = (k.strip_suffix("_micro_usd"), v.as_u64()) {
        let shown = if n == 0 && name.contains("budget") {
            crate::output::UNLIMITED.to_string()
        } else {
            format!("${}", crate::parse::format_micros(n))
        };
        return (name.to_string(), shown);
    }
    let shown = match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    (k.to_string(), shown)
}

const AUDIT_COLUMNS: &[Column<AuditEntry>] = &[
    Column::new("at", "At", |e| Value::Time(e.at_ms)),
    Column::new("actor", "Actor", |e| Value::text(&e.actor)),
    Column::new("action", "Action", |e| Value::text(&e.action)),
    Column::new("target", "Target", |e| Value::text(&e.target)),
    // A readable summary in tables; the raw record with -o json / -o wide.
    Column::new("summary", "Changes", audit_summary),
    Column::detail("id", "ID", |e| Value::UInt(e.id)),
    Column::detail("revision", "Revision", |e| Value::UInt(e.revision)),
    Column::detail("detail", "Detail", audit_detail),
];

pub async fn audit(conn: &mut Conn, out: Output, args: AuditArgs) -> Result<()> {
    let req = ListAuditRequest {
        limit: args.limit.unwrap_or(0),
        since_ms: args.since.unwrap_or(0),
    };
    let resp = conn.api.list_audit(req).await.or_report(&conn.server)?;
    out.list(AUDIT_COLUMNS, &resp.entries)
}

/// Columns of a usage report: the bucket and group columns only when asked for.
fn usage_columns(by: Option<UsageBy>, bucketed: bool) -> Vec<Column<UsageRow>> {
    let mut cols: Vec<Column<UsageRow>> = Vec::new();
    if bucketed {
        cols.push(Column::new("bucket_start", "Bucket", |r| {
            Value::Time(r.bucket_start_ms)
        }));
    }
    if let Some(by) = by {
        // The dimension is named for what it is (deleted keys and accounts keep their names).
        let (id, id_col, header) = match by {
            UsageBy::Key => ("key", Some("key_id"), "Key"),
            UsageBy::Account => ("account", Some("account_id"), "Account"),
            UsageBy::Model => ("model", None, "Model"),
        };
        cols.push(Column::new(id, header, |r| Value::text(&r.group)));
        if let Some(id_col) = id_col {
            cols.push(Column::detail(id_col, "ID", |r| Value::opt_text(&r.group_id)));
        }
    }
    let totals: [Column<UsageRow>; 10] = [
        Column::new("requests", "Requests", |r| Value::UInt(r.requests)),
        Column::new("input_tokens", "Input", |r| Value::UInt(r.input_tokens)),
        Column::new("output_tokens", "Output", |r| Value::UInt(r.output_tokens)),
        Column::new("cache_write_5m_tokens", "Cache write 5m", |r| {
            Value::UInt(r.cache_write_5m_tokens)
        }),
        Column::new("cache_write_1h_tokens", "Cache write 1h", |r| {
            Value::UInt(r.cache_write_1h_tokens)
        }),
        Column::new("cache_read_tokens", "Cache read", |r| Value::UInt(r.cache_read_tokens)),
        Column::new("errors", "Errors", |r| Value::UInt(r.errors)),
        // Rows whose counts were clamped or could not be read (see docs/operations.md).
        Column::new("anomalies", "Flagged", |r| Value::UInt(r.anomalies)),
        Column::new("cost_usd", "Cost ($)", |r| Value::Decimal(format_cost(r.cost_pico_usd))),
        Column::detail("cost_pico_usd", "Cost (pico-USD)", |r| Value::UInt(r.cost_pico_usd)),
    ];
    cols.extend(totals);
    cols
}

fn usage_request(args: &UsageArgs) -> Result<QueryUsageRequest> {
    if let (Some(since), Some(until)) = (args.since, args.until) {
        if since >= until {
            return Err(anyhow!("--since must be earlier than --until"));
        }
    }
    let group_by = match args.by {
        None => UsageGroupBy::Unspecified,
        Some(UsageBy::Key) => UsageGroupBy::Key,
        Some(UsageBy::Account) => UsageGroupBy::Account,
        Some(UsageBy::Model) => UsageGroupBy::Model,
    };
    let bucket = match args.bucket {
        None => UsageBucket::None,
        Some(BucketArg::Hour) => UsageBucket::Hour,
        Some(BucketArg::Day) => UsageBucket::Day,
    };
    Ok(QueryUsageRequest {
        group_by: group_by as i32,
        since_ms: args.since.unwrap_or(0),
        until_ms: args.until.unwrap_or(0),
        bucket: bucket as i32,
    })
}

pub async fn usage(conn: &mut Conn, out: Output, args: UsageArgs) -> Result<()> {
    let req = usage_request(&args)?;
    let resp = conn.api.query_usage(req).await.or_report(&conn.server)?;
    out.list(&usage_columns(args.by, args.bucket.is_some()), &resp.rows)
}

const VERSION_COLUMNS: &[Column<ConfigVersion>] = &[
    Column::new("version", "Version", |v| Value::Text(v.to_string())),
    Column::new("epoch", "Epoch", |v| Value::UInt(v.epoch)),
    Column::new("revision", "Revision", |v| Value::UInt(v.revision)),
];

pub async fn version(conn: &mut Conn, out: Output) -> Result<()> {
    let v = conn
        .api
        .get_config_version(GetConfigVersionRequest {})
        .await
        .or_report(&conn.server)?;
    match out.format {
        Format::Table | Format::Wide => out.one_or_text(VERSION_COLUMNS, &v, &v.to_string()),
        Format::Json | Format::Csv => out.one(VERSION_COLUMNS, &v),
    }
}

const NOTIFY_TEST_COLUMNS: &[Column<relay_proto::v1::TestNotificationResponse>] = &[
    Column::new("webhook", "Webhook", |r| Value::Text(r.webhook.clone())),
    Column::new("format", "Format", |r| Value::Text(r.format.clone())),
    Column::new("signed", "Signed", |r| {
        Value::Text(if r.signed { "yes" } else { "no" }.into())
    }),
    Column::new("http_status", "HTTP status", |r| Value::UInt(u64::from(r.http_status))),
    Column::new("error", "Error", |r| Value::Text(r.error.clone())),
];

const NOTIFICATION_COLUMNS: &[Column<relay_proto::v1::Notification>] = &[
    Column::new("created_at", "Created", |n| Value::Time(n.created_at_ms)),
    Column::new("type", "Type", |n| Value::text(&n.r#type)),
    Column::new("state", "State", |n| Value::text(&n.state)),
    Column::new("attempts", "Attempts", |n| Value::UInt(u64::from(n.attempts))),
    Column::new("summary", "Summary", |n| Value::text(&n.summary)),
    Column::new("last_error", "Last error", |n| Value::opt_text(&n.last_error)),
    Column::detail("id", "ID", |n| Value::text(&n.id)),
    Column::detail("next_attempt_at", "Next attempt", |n| {
        Value::Time(if n.state == "pending" { n.next_attempt_at_ms } else { 0 })
    }),
    Column::detail("done_at", "Done", |n| Value::Time(n.done_at_ms)),
];

/// `relayctl notify list|test`.
pub async fn notify(conn: &mut Conn, out: Output, cmd: NotifyCmd) -> Result<()> {
    match cmd {
        NotifyCmd::List { limit } => {
            let r = conn
                .api
                .list_notifications(relay_proto::v1::ListNotificationsRequest { limit })
                .await
                .or_report(&conn.server)?;
            out.list(NOTIFICATION_COLUMNS, &r.notifications)
        }
        NotifyCmd::Test => {
            let r = conn
                .api
                .test_notification(relay_proto::v1::TestNotificationRequest {})
                .await
                .or_report(&conn.server)?;
            // Whether the body was signed does not depend on the receiver answering.
            let signed = if r.signed { ", signed" } else { "" };
            let text = match r.http_status {
                0 => format!(
                    "test notification to {} ({}{signed}): no answer: {}",
                    r.webhook, r.format, r.error
                ),
                s => format!("test notification to {} ({}{signed}): HTTP {s}", r.webhook, r.format),
            };
            match out.format {
                Format::Table | Format::Wide => out.one_or_text(NOTIFY_TEST_COLUMNS, &r, &text)?,
                Format::Json | Format::Csv => out.one(NOTIFY_TEST_COLUMNS, &r)?,
            }
            if (200..300).contains(&r.http_status) {
                Ok(())
            } else {
                Err(anyhow!("the receiver did not accept the test notification"))
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::output::{render_list, Format};

    fn row() -> UsageRow {
        UsageRow {
            bucket_start_ms: 1_700_000_000_000,
            group: "ci".into(),
            group_id: "k1".into(),
            requests: 3,
            input_tokens: 1000,
            cost_pico_usd: 3_000_000_000,
            ..Default::default()
        }
    }

    #[test]
    fn the_leader_line_reads_naturally() {
        let l = LeaderInfo {
            holder: "cp-2".into(),
            mechanism: "etcd".into(),
            since_ms: 1_000,
            term: 7,
            detail: String::new(),
        };
        assert_eq!(
            leader_text(&l, 1_000 + 5 * 60_000 + 10),
            "cp-2 (etcd) since 5m ago, term 7"
        );
        assert_eq!(ago(59_999), "59s");
        assert_eq!(ago(3 * 3_600_000), "3h");
        let o = Overview {
            status: Some(GetStatusResponse {
                replica: "cp-1".into(),
                leader: Some(l),
                replica_is_leader: false,
                replica_mechanism: "etcd".into(),
                current_leader: Some("cp-2".into()),
                build_version: String::new(),
            }),
            now_ms: 1_000 + 5 * 60_000,
            ..Overview::default()
        };
        let text = o.text();
        assert!(text.contains("leader: cp-2 (etcd) since 5m ago, term 7\n"), "{text}");
        assert!(text.contains("answered by: cp-1 (etcd, following)"), "{text}");
        // The control plane's version, when it says it.
        let mut versioned = o.clone();
        versioned.status.as_mut().unwrap().build_version = "0.1.0".into();
        assert!(
            versioned
                .text()
                .contains("answered by: cp-1 (relay 0.1.0, etcd, following)"),
            "{}",
            versioned.text()
        );
        // The recorded leader is gone and nobody leads: say so rather than show the old one.
        let mut gone = o.clone();
        gone.status.as_mut().unwrap().current_leader = Some(String::new());
        assert!(
            gone.text()
                .contains("leader: none now (last: cp-2 (etcd) since 5m ago, term 7)\n"),
            "{}",
            gone.text()
        );
        // Another replica has just won and not yet recorded it.
        let mut next = o.clone();
        next.status.as_mut().unwrap().current_leader = Some("cp-3".into());
        assert!(
            next.text().contains("leader: cp-3 (last recorded: cp-2"),
            "{}",
            next.text()
        );
    }

    #[test]
    fn money_reads_as_dollars_and_cents() {
        assert_eq!(dollars(0), "$0.00");
        assert_eq!(dollars(12_345_000_000_000), "$12.35");
        assert_eq!(dollars(4_999_999_999), "$0.00");
        assert_eq!(dollars(5_000_000_000), "$0.01");
        assert_eq!(dollars(u64::MAX), "$18446744.07");
    }

    #[test]
    fn usage_json_fields() {
        let s = render_list(Format::Json, &usage_columns(Some(UsageBy::Key), true), &[row()]).unwrap();
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        let r = &v[0];
        for k in [
            "requests",
            "input_tokens",
            "output_tokens",
            "cache_write_5m_tokens",
            "cache_write_1h_tokens",
            "cache_read_tokens",
            "cost_usd",
            "errors",
            "anomalies",
            "key",
            "key_id",
            "bucket_start",
        ] {
            assert!(r.get(k).is_some(), "missing {k}");
        }
        assert_eq!(r["cost_usd"].as_f64().unwrap(), 0.003);
        assert_eq!(r["bucket_start"], "2023-11-14T22:13:20Z");
        assert_eq!(r["key"], "ci");
        assert_eq!(r["cost_pico_usd"], 3_000_000_000u64);
    }

    #[test]
    fn ungrouped_usage_has_no_group_or_bucket() {
        let s = render_list(Format::Json, &usage_columns(None, false), &[row()]).unwrap();
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert!(v[0].get("key").is_none() && v[0].get("bucket_start").is_none());
        let csv = render_list(Format::Csv, &usage_columns(None, false), &[row()]).unwrap();
        assert!(csv.lines().nth(1).unwrap().contains(",0.003000,"));
    }

    #[test]
    fn usage_window_is_checked() {
        let args = UsageArgs {
            by: None,
            since: Some(10),
            until: Some(5),
            bucket: None,
        };
        assert!(usage_request(&args).is_err());
        let args = UsageArgs {
            by: Some(UsageBy::Model),
            since: None,
            until: None,
            bucket: Some(BucketArg::Day),
        };
        let r = usage_request(&args).unwrap();
        assert_eq!(
            (r.group_by, r.bucket, r.since_ms),
            (UsageGroupBy::Model as i32, UsageBucket::Day as i32, 0)
        );
    }

    /// A 100-column table: the config as "revision (current | N behind)", the last NACK with its
    /// time, the replica; the epoch-long version strings only in `-o wide` and JSON.
    #[test]
    fn data_planes_read_in_100_columns() {
        let epoch: u64 = 1_764_835_200_000;
        let ms = epoch as i64;
        let current = ProxyRow {
            p: ProxyState {
                node_id: "dp-a".into(),
                acked: Some(ConfigVersion::new(epoch, 141)),
                last_seen_ms: ms + 5_000,
                connected: true,
                replica: "cp-0".into(),
                ..Default::default()
            },
            head: Some(ConfigVersion::new(epoch, 141)),
        };
        let row_b = || ProxyRow {
            p: ProxyState {
                node_id: "dp-b".into(),
                acked: Some(ConfigVersion::new(epoch, 139)),
                last_nack_version: Some(ConfigVersion::new(epoch, 140)),
                last_nack_error: "duplicate id".into(),
                last_nack_at_ms: ms + 3_000,
                last_seen_ms: ms + 5_000,
                connected: true,
                replica: "cp-1".into(),
                ..Default::default()
            },
            head: Some(ConfigVersion::new(epoch, 141)),
        };
        let other = ProxyRow {
            p: ProxyState {
                node_id: "dp-c".into(),
                acked: Some(ConfigVersion::new(epoch - 1, 900)),
                ..Default::default()
            },
            head: Some(ConfigVersion::new(epoch, 141)),
        };
        let table = render_list(Format::Table, PROXY_COLUMNS, &[current, row_b(), other]).unwrap();
        for line in table.lines() {
            assert!(line.chars().count() <= 100, "{} columns: {line}", line.chars().count());
        }
        assert!(!table.contains(&epoch.to_string()), "no epoch in the table: {table}");
        let row = |node: &str| table.lines().find(|l| l.contains(node)).unwrap().to_string();
        let a = row("dp-a");
        assert!(a.contains("141 (current)") && a.contains("cp-0"), "{a}");
        let b = row("dp-b");
        assert!(b.contains("139 (2 behind)") && b.contains("cp-1"), "{b}");
        assert!(b.contains("140 12-04 08:00: duplicate id"), "{b}");
        assert!(row("dp-c").contains("900 (older epoch)"), "{table}");
        assert!(
            a.split('┆').nth(2).is_some_and(|c| c.trim() == "-"),
            "no NACK shown: {a}"
        );
        let wide = render_list(Format::Wide, PROXY_COLUMNS, &[row_b()]).unwrap();
        assert!(
            wide.contains(&format!("{epoch}:139")) && wide.contains("2025-12-04T08:00:05Z"),
            "{wide}"
        );
    }

    /// The audit table shows money in dollars, never micro-dollars, and "unlimited" for a budget
    /// cleared to 0.
    #[test]
    fn audit_summary_shows_money_in_dollars() {
        let entry = |detail: &str| AuditEntry {
            detail: detail.to_string(),
            ..Default::default()
        };
        assert_eq!(
            audit_summary(&entry(
                r#"{"group":"default","limits":{"daily_budget_micro_usd":5000000,"rpm":60,"tpm":0}}"#,
            )),
            Value::text("group=default, limits=daily_budget:$5.00 rpm:60")
        );
        assert_eq!(
            audit_summary(&entry(
                r#"{"monthly_budget_micro_usd":0,"daily_budget_micro_usd":12500000}"#
            )),
            Value::text("daily_budget=$12.50, monthly_budget=unlimited")
        );
        // Prices: dollars per million tokens, input and output first (they were cut off).
        assert_eq!(
            audit_summary(&entry(
                r#"{"cache_read":300000,"cache_write_1h":6000000,"cache_write_5m":3750000,"effective_from_ms":0,"input":3000000,"output":15000000,"unit":"micro-USD per million tokens"}"#
            )),
            Value::text(
                "input=$3.00/MTok, output=$15.00/MTok, cache_read=$0.30/MTok, cache_write_5m=$3.75/MTok, cache_write_1h=$6.00/MTok"
            )
        );
    }

    #[test]
    fn proxy_lag() {
        let p = |acked: Option<ConfigVersion>| ProxyRow {
            p: ProxyState {
                acked,
                ..Default::default()
            },
            head: Some(ConfigVersion::new(1, 10)),
        };
        assert_eq!(p(Some(ConfigVersion::new(1, 7))).lag(), Some(3));
        assert_eq!(p(Some(ConfigVersion::new(0, 70))).lag(), None);
        assert_eq!(p(None).lag(), None);
        let obj = crate::output::json_object(PROXY_COLUMNS, &p(Some(ConfigVersion::new(1, 7))));
        assert_eq!(obj["acked_version"], "1:7");
        assert_eq!(obj["head_version"], "1:10");
        assert_eq!(obj["lag"], 3);
        assert_eq!(obj["last_seen"], serde_json::Value::Null);
    }
}
