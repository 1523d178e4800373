//! `relayctl account ...`: upstream accounts.

use anyhow::Result;
use relay_proto::v1::{
    AccountHealth, AccountInfo, AccountKind, AccountState, AccountStatus, CreateAccountRequest, DeleteAccountRequest,
    GetAccountRequest, ListAccountsRequest, ResetAccountRequest, UpdateAccountRequest,
};

use anyhow::{anyhow, bail, Context as _};
use relay_proto::v1::ListSettingsRequest;

use super::{clean_list, read_secret, read_secret_file, Deleted};
use crate::args::{AccountAdd, AccountCmd, AccountKindArg, AccountLogin, AccountUpdate};
use crate::client::{Api, Conn, RpcResult};
use crate::output::{Column, Output, Value};
use crate::parse::enum_label;

pub fn kind_label(v: i32) -> String {
    enum_label(
        AccountKind::try_from(v).ok().map(|k| k.as_str_name()),
        "ACCOUNT_KIND_",
        v,
    )
}

pub fn status_label(v: i32) -> String {
    enum_label(
        AccountStatus::try_from(v).ok().map(|k| k.as_str_name()),
        "ACCOUNT_STATUS_",
        v,
    )
}

pub fn health_label(v: i32) -> String {
    enum_label(
        AccountHealth::try_from(v).ok().map(|k| k.as_str_name()),
        "ACCOUNT_HEALTH_",
        v,
    )
}

/// "healthy", or each state as `health[(scope)] until TIME` / `… until reset`.
fn health_summary(states: &[AccountState]) -> String {
    if states.is_empty() {
        return "healthy".into();
    }
    states
        .iter()
        .map(|s| {
            let scope = if s.scope.is_empty() {
                String::new()
            } else {
                format!("({})", s.scope)
            };
            let until = crate::parse::format_time(s.until_ms).unwrap_or_else(|| "reset".into());
            format!("{}{scope} until {until}", health_label(s.health))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// "3h12m", "2d4h", "45s": how far off a reset is.
fn until(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// A subscription account's quota windows: "5h 42% (resets in 2h10m) · 7d 13% (resets in 3d4h)";
/// `brief` leaves the resets out. Empty when nothing was seen.
fn quota_summary(q: Option<&relay_proto::v1::AccountQuota>, brief: bool, now_ms: i64) -> String {
    let Some(q) = q else { return String::new() };
    q.windows
        .iter()
        .map(|w| {
            let fresh = w.reset_ms > 0 && w.reset_ms <= now_ms;
            let used = if fresh {
                "reset".to_string()
            } else if w.utilization >= 0.0 {
                format!("{:.0}%", w.utilization * 100.0)
            } else {
                "?".to_string()
            };
            let status = if w.status.is_empty() || w.status == "allowed" || fresh {
                String::new()
            } else {
                format!(" {}", w.status)
            };
            if brief || w.reset_ms <= now_ms {
                format!("{} {used}{status}", w.name)
            } else {
                format!("{} {used}{status} (resets in {})", w.name, until(w.reset_ms - now_ms))
            }
        })
        .collect::<Vec<_>>()
        .join(" · ")
}

fn quota_json(q: Option<&relay_proto::v1::AccountQuota>) -> serde_json::Value {
    let Some(q) = q else { return serde_json::Value::Null };
    serde_json::json!({
        "status": q.status,
        "reset_at": crate::parse::format_time(q.reset_ms),
        "observed_at": crate::parse::format_time(q.observed_ms),
        "observed_by": q.observed_by,
        "windows": q.windows.iter().map(|w| serde_json::json!({
            "name": w.name,
            "utilization": (w.utilization >= 0.0).then_some(w.utilization),
            "status": w.status,
            "reset_at": crate::parse::format_time(w.reset_ms),
        })).collect::<Vec<_>>(),
    })
}

fn states_json(states: &[AccountState]) -> serde_json::Value {
    serde_json::Value::Array(
        states
            .iter()
            .map(|s| {
                serde_json::json!({
                    "health": health_label(s.health),
                    "scope": s.scope,
                    "reason": s.reason,
                    "until": crate::parse::format_time(s.until_ms),
                    "since": crate::parse::format_time(s.since_ms),
                    "reported_by": s.reported_by,
                })
            })
            .collect(),
    )
}

/// Each state on a line of its own, as people read it: "erroring until 2026-12-04 14:05:03Z, since
/// 14:04:33Z, reported by dp-1: 3 consecutive failures (…)".
fn states_text(states: &[AccountState]) -> String {
    states
        .iter()
        .map(|s| {
            let scope = if s.scope.is_empty() {
                String::new()
            } else {
                format!(" ({})", s.scope)
            };
            let until =
                crate::parse::format_time(s.until_ms).map_or_else(|| " until reset".into(), |t| format!(" until {t}"));
            let since = crate::parse::format_time(s.since_ms).map_or_else(String::new, |t| format!(", since {t}"));
            let by = if s.reported_by.is_empty() {
                String::new()
            } else {
                format!(", reported by {}", s.reported_by)
            };
            let reason = if s.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", s.reason)
            };
            format!("{}{scope}{until}{since}{by}{reason}", health_label(s.health))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn kind(arg: AccountKindArg) -> AccountKind {
    match arg {
        AccountKindArg::AnthropicApiKey => AccountKind::AnthropicApiKey,
        AccountKindArg::ClaudeOauth => AccountKind::ClaudeOauth,
        AccountKindArg::AnthropicCompatible => AccountKind::AnthropicCompatible,
    }
}

pub const COLUMNS: &[Column<AccountInfo>] = &[
    Column::new("name", "Name", |a| Value::text(&a.name)),
    Column::new("id", "ID", |a| Value::Id(a.id.clone())),
    Column::new("kind", "Kind", |a| Value::Text(kind_label(a.kind))),
    Column::new("status", "Status", |a| Value::Text(status_label(a.status))),
    // List tables show priority and weight together ("10/3"); everything else shows each.
    Column::summary("routing", "Prio/Wt", |a| {
        Value::Text(format!("{}/{}", a.priority, a.weight))
    }),
    Column::detail("priority", "Priority", |a| Value::Int(i64::from(a.priority))),
    Column::detail("weight", "Weight", |a| Value::UInt(u64::from(a.weight))),
    Column::new("groups", "Groups", |a| Value::list(&a.groups, "-")),
    Column::new("health", "Health", |a| {
        let mut h = health_summary(&a.states);
        // Subscription accounts: how much of each quota window is used ("healthy; 5h 42% · 7d 13%").
        let q = quota_summary(a.quota.as_ref(), true, chrono::Utc::now().timestamp_millis());
        if !q.is_empty() {
            h.push_str("; ");
            h.push_str(&q);
        }
        if !a.config_errors.is_empty() {
            h.push_str(&format!("; out of service on {} data plane(s)", a.config_errors.len()));
        }
        Value::Text(h)
    }),
    Column::detail("quota_windows", "Quota windows", |a| {
        let q = quota_summary(a.quota.as_ref(), false, chrono::Utc::now().timestamp_millis());
        if q.is_empty() {
            Value::Null
        } else {
            Value::Text(q)
        }
    }),
    Column::detail("quota_detail", "Quota (as seen)", |a| {
        Value::Json(quota_json(a.quota.as_ref()))
    }),
    Column::detail("max_concurrency", "Max concurrency", |a| {
        Value::limit(u64::from(a.max_concurrency))
    }),
    Column::detail("subscription_type", "Plan", |a| Value::opt_text(&a.subscription_type)),
    Column::detail("organization", "Organization", |a| Value::opt_text(&a.organization)),
    Column::detail("scopes", "Scopes", |a| Value::list(&a.scopes, "-")),
    Column::detail("credential_hint", "Credential", |a| Value::opt_text(&a.credential_hint)),
    // Data planes that took the account out of service (they cannot use it).
    Column::detail("config_errors", "Out of service on", |a| {
        Value::list(&a.config_errors, "-")
    }),
    Column::detail("states", "States", |a| Value::Described {
        json: states_json(&a.states),
        text: states_text(&a.states),
    }),
    Column::detail("base_url", "Base URL", |a| Value::opt_text(&a.base_url)),
    Column::detail("proxy_url", "Proxy URL", |a| Value::opt_text(&a.proxy_url)),
    Column::detail("credential_expires_at", "Credential expires", |a| {
        Value::Time(a.credential_expires_at_ms)
    }),
    Column::detail("created_at", "Created", |a| Value::Time(a.created_at_ms)),
    Column::detail("updated_at", "Updated", |a| Value::Time(a.updated_at_ms)),
];

/// `account check`: one row per account probed.
pub const CHECK_COLUMNS: &[Column<relay_proto::v1::AccountCheck>] = &[
    Column::new("name", "Account", |c| Value::text(&c.name)),
    Column::new("verdict", "Verdict", |c| {
        Value::Text(match c.verdict.as_str() {
            "rate_limited" => match crate::parse::format_time(c.until_ms) {
                Some(t) => format!("rate limited until {t}"),
                None => "rate limited".into(),
            },
            v => v.replace('_', " "),
        })
    }),
    Column::new("detail", "Detail", |c| Value::opt_text(&c.detail)),
    Column::new("marked", "Marked", |c| {
        if !c.mark_error.is_empty() {
            Value::Text(format!("failed: {}", c.mark_error))
        } else {
            Value::text(if c.marked { "yes" } else { "unchanged" })
        }
    }),
    Column::detail("account_id", "ID", |c| Value::Id(c.account_id.clone())),
    Column::detail("until", "Until", |c| Value::Time(c.until_ms)),
];

pub async fn run(conn: &mut Conn, out: Output, cmd: AccountCmd) -> Result<()> {
    let server = conn.server.clone();
    let api = &mut conn.api;
    match cmd {
        AccountCmd::Create(args) => {
            let req = create_request(args)?;
            let info = api.create_account(req).await.or_report(&server)?;
            out.one(COLUMNS, &info)
        }
        AccountCmd::Login(args) => {
            let req = login(api, &server, args).await?;
            let info = api.create_account(req).await.or_report(&server)?;
            out.one(COLUMNS, &info)
        }
        AccountCmd::List => {
            let list = api.list_accounts(ListAccountsRequest {}).await.or_report(&server)?;
            out.list(COLUMNS, &list.accounts)
        }
        AccountCmd::Show { account } => {
            let info = api
                .get_account(GetAccountRequest { account })
                .await
                .or_report(&server)?;
            out.one(COLUMNS, &info)
        }
        AccountCmd::Update(args) => {
            let req = update_request(args)?;
            let info = api.update_account(req).await.or_report(&server)?;
            out.one(COLUMNS, &info)
        }
        AccountCmd::Disable { account } => set_status(api, &server, out, account, AccountStatus::Disabled).await,
        AccountCmd::Enable { account } => set_status(api, &server, out, account, AccountStatus::Enabled).await,
        AccountCmd::Reset { account } => {
            let info = api
                .reset_account(ResetAccountRequest { account })
                .await
                .or_report(&server)?;
            out.one(COLUMNS, &info)
        }
        AccountCmd::Check { account, all: _ } => {
            let resp = api
                .check_accounts(relay_proto::v1::CheckAccountsRequest {
                    account: account.unwrap_or_default(),
                })
                .await
                .or_report(&server)?;
            out.list(CHECK_COLUMNS, &resp.checks)?;
            // A script can tell: nonzero when any account is not ok.
            if resp.checks.iter().any(|c| c.verdict != "ok") {
                return Err(anyhow::anyhow!(
                    "{} of {} account(s) not ok",
                    resp.checks.iter().filter(|c| c.verdict != "ok").count(),
                    resp.checks.len()
                ));
            }
            Ok(())
        }
        AccountCmd::Rm { account } => {
            let resp = api
                .delete_account(DeleteAccountRequest {
                    account: account.clone(),
                })
                .await
                .or_report(&server)?;
            Deleted {
                kind: "account",
                target: account,
                version: resp.version,
            }
            .print(out, "deleted")
        }
    }
}

async fn set_status(api: &mut Api, server: &str, out: Output, account: String, status: AccountStatus) -> Result<()> {
    let req = UpdateAccountRequest {
        account,
        status: Some(status as i32),
        ..Default::default()
    };
    let info = api.update_account(req).await.or_report(server)?;
    let text = format!("account {:?} {}", info.name, status_label(info.status));
    out.one_or_text(COLUMNS, &info, &text)
}

/// How long relayctl waits for the token endpoint.
const TOKEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The PKCE login, done here on the operator's machine: the verifier never leaves this process. Prints the
/// authorize URL, reads `CODE#STATE` from stdin, checks the state and exchanges the code; the request that
/// creates the account comes back.
async fn login(api: &mut Api, server: &str, args: AccountLogin) -> Result<CreateAccountRequest> {
    use std::io::Write as _;
    let proxy_url = proxy_url(args.proxy_url, args.proxy_url_file.as_deref())?.unwrap_or_default();
    let proxy = match proxy_url.trim() {
        "" => None,
        url => Some(relay_oauth::ProxySpec::parse(url).map_err(|e| anyhow!("the proxy URL is not usable: {e}"))?),
    };
    let mut req = CreateAccountRequest {
        name: args.name,
        kind: AccountKind::ClaudeOauth as i32,
        base_url: args.base_url.unwrap_or_default(),
        // Stands in for the token while the control plane checks the rest.
        credential: "login-pending".to_string(),
        priority: args.priority.unwrap_or(0),
        weight: args.weight.unwrap_or(0),
        groups: clean_list(&args.groups),
        max_concurrency: args.max_concurrency.unwrap_or(0),
        proxy_url,
        validate_only: true,
        ..Default::default()
    };
    // Everything the control plane would refuse (a taken name, an unknown group, a bad URL) is
    // refused before the operator spends a login on it.
    api.create_account(req.clone())
        .await
        .or_report(server)
        .context("the account cannot be created; nothing was asked of the login")?;
    let settings = api.list_settings(ListSettingsRequest {}).await.or_report(server)?;
    let cfg = relay_oauth::OAuthConfig::from_settings(&settings.values.into_iter().collect());
    let pkce = relay_oauth::Pkce::new();
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "Open this URL, approve, and paste the code shown (CODE#STATE):")?;
        writeln!(stdout, "{}", relay_oauth::authorize_url(&cfg, &pkce))?;
        stdout.flush()?;
    }
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("cannot read the code from standard input")?;
    let code = relay_oauth::parse_pasted(&line, &pkce.state).map_err(|e| anyhow!("{e}; no account was created"))?;
    let client = relay_oauth::TokenClient::new(&relay_oauth::ClientOptions::default(), TOKEN_TIMEOUT)
        .map_err(|e| anyhow!("{e}"))?;
    let tokens = client
        .exchange_code(&cfg, &code, &pkce.state, pkce.verifier(), proxy.as_ref())
        .await
        .map_err(|e| anyhow!("the login failed: {e}; no account was created"))?;
    req.validate_only = false;
    req.credential = tokens.access_token;
    req.refresh_token = tokens.refresh_token.unwrap_or_default();
    req.credential_expires_at_ms = tokens.expires_at_ms.unwrap_or(0);
    req.scopes = tokens.scopes;
    req.subscription_type = tokens.subscription_type.unwrap_or_default();
    req.organization = tokens.organization.unwrap_or_default();
    Ok(req)
}

/// `--credentials-file`: Claude Code's `.credentials.json`, for a claude-oauth account.
fn import_credentials(args: AccountAdd) -> Result<CreateAccountRequest> {
    let Some(path) = args.credentials_file.as_deref() else {
        bail!("no credentials file given");
    };
    if args.kind != AccountKindArg::ClaudeOauth {
        bail!("--credentials-file is Claude Code's credentials file: it needs --kind claude-oauth");
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read the credentials file {}", path.display()))?;
    let tokens = relay_oauth::parse_credentials_file(&bytes).map_err(|e| anyhow!("{} ({})", e, path.display()))?;
    Ok(CreateAccountRequest {
        name: args.name,
        kind: AccountKind::ClaudeOauth as i32,
        base_url: args.base_url.unwrap_or_default(),
        credential: tokens.access_token,
        priority: args.priority.unwrap_or(0),
        weight: args.weight.unwrap_or(0),
        groups: clean_list(&args.groups),
        max_concurrency: args.max_concurrency.unwrap_or(0),
        proxy_url: proxy_url(args.proxy_url, args.proxy_url_file.as_deref())?.unwrap_or_default(),
        refresh_token: tokens.refresh_token.unwrap_or_default(),
        credential_expires_at_ms: tokens.expires_at_ms.unwrap_or(0),
        scopes: tokens.scopes,
        subscription_type: tokens.subscription_type.unwrap_or_default(),
        organization: tokens.organization.unwrap_or_default(),
        validate_only: false,
    })
}

fn create_request(args: AccountAdd) -> Result<CreateAccountRequest> {
    if args.credentials_file.is_some() {
        return import_credentials(args);
    }
    let credential = read_secret(&args.secret)?.unwrap_or_default();
    let refresh_token = match &args.refresh_token_file {
        Some(p) => read_secret_file(p, "refresh token")?,
        None => String::new(),
    };
    Ok(CreateAccountRequest {
        name: args.name,
        kind: kind(args.kind) as i32,
        base_url: args.base_url.unwrap_or_default(),
        credential,
        priority: args.priority.unwrap_or(0),
        weight: args.weight.unwrap_or(0),
        groups: clean_list(&args.groups),
        max_concurrency: args.max_concurrency.unwrap_or(0),
        proxy_url: proxy_url(args.proxy_url, args.proxy_url_file.as_deref())?.unwrap_or_default(),
        refresh_token,
        credential_expires_at_ms: args.expires.unwrap_or(0),
        ..Default::default()
    })
}

fn proxy_url(inline: Option<String>, file: Option<&std::path::Path>) -> Result<Option<String>> {
    match file {
        Some(p) => Ok(Some(read_secret_file(p, "proxy URL")?)),
        None => Ok(inline),
    }
}

fn update_request(args: AccountUpdate) -> Result<UpdateAccountRequest> {
    let credential = read_secret(&args.secret)?;
    let refresh_token = args
        .refresh_token_file
        .as_deref()
        .map(|p| read_secret_file(p, "refresh token"))
        .transpose()?;
    let groups = clean_list(&args.groups);
    Ok(UpdateAccountRequest {
        account: args.account,
        name: args.name,
        base_url: args.base_url,
        credential,
        priority: args.priority,
        weight: args.weight,
        set_groups: !groups.is_empty(),
        groups,
        max_concurrency: args.max_concurrency,
        status: None,
        proxy_url: proxy_url(args.proxy_url, args.proxy_url_file.as_deref())?,
        refresh_token,
        credential_expires_at_ms: args.expires,
        allow_credential_to_new_host: args.allow_credential_to_new_host,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod width_tests {
    use super::*;
    use crate::output::{render_list, Format};

    fn account() -> AccountInfo {
        AccountInfo {
            id: "01a23f7a-5754-73eb-851d-053d349b8231".into(),
            name: "team-a-primary".into(),
            kind: relay_proto::v1::AccountKind::AnthropicApiKey as i32,
            status: relay_proto::v1::AccountStatus::Enabled as i32,
            priority: 10,
            weight: 3,
            groups: vec!["default".into(), "team-a".into()],
            credential_hint: "sk-ant-…XYZ1".into(),
            ..Default::default()
        }
    }

    /// `account show` of an account in trouble: its states as sentences in the table, one per
    /// line, so it fits a terminal; JSON keeps the structured list.
    #[test]
    fn states_read_as_sentences_in_tables_and_stay_structured_in_json() {
        let mut a = account();
        a.states = vec![relay_proto::v1::AccountState {
            account_id: a.id.clone(),
            health: relay_proto::v1::AccountHealth::Erroring as i32,
            reason: "3 consecutive failures (last: 404 that is not about the model: check the account's base URL)"
                .into(),
            until_ms: 1_796_400_000_000,
            since_ms: 1_796_399_970_000,
            reported_by: "dp-1".into(),
            ..Default::default()
        }];
        let shown = crate::output::render_one_at(Format::Table, COLUMNS, &a, false, Some(100)).unwrap();
        assert!(!shown.contains("\"health\""), "{shown}");
        assert!(
            shown.contains("erroring until") && shown.contains("by dp-1: 3 consecutive"),
            "{shown}"
        );
        for line in shown.lines() {
            assert!(line.chars().count() <= 100, "{} columns: {line}", line.chars().count());
        }
        let json: serde_json::Value =
            serde_json::from_str(&crate::output::render_one(Format::Json, COLUMNS, &a, false).unwrap()).unwrap();
        assert_eq!(json["states"][0]["health"], "erroring", "{json}");
    }

    /// A 100-column terminal holds the account list: names first, ids short; `-o wide` has it all.
    #[test]
    fn the_account_list_fits_100_columns_and_wide_has_everything() {
        let table = render_list(Format::Table, COLUMNS, &[account()]).unwrap();
        for line in table.lines() {
            assert!(line.chars().count() <= 100, "{} columns: {line}", line.chars().count());
        }
        assert!(
            table.contains("team-a-primary") && table.contains("01a23f7a"),
            "{table}"
        );
        assert!(!table.contains("01a23f7a-5754"), "ids are short in tables: {table}");
        let header = table.lines().nth(1).unwrap();
        assert!(
            header.find("Name").unwrap() < header.find("ID").unwrap(),
            "names first: {header}"
        );
        let wide = render_list(Format::Wide, COLUMNS, &[account()]).unwrap();
        assert!(wide.contains("01a23f7a-5754-73eb-851d-053d349b8231") && wide.contains("Credential"));
    }
}
