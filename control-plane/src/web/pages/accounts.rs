//! Accounts: every account with its state, reason, until when, utilization (subscription quota
//! windows) and masked credential hint; add an API-key, compatible-endpoint or setup-token
//! account; add a Claude subscription by the OAuth login in the browser (`relayctl account
//! login`: the authorize URL shown, `CODE#STATE` pasted back, the code exchanged here) or by
//! importing Claude Code's credentials file (`relayctl account add --credentials-file`); edit,
//! disable/enable, reset, check now (one or all), delete with confirmation (the name typed
//! again). Secrets are never shown after entry.
//!
//! The login's PKCE verifier and state travel between the two steps sealed (AES-GCM under the
//! master key, bound to the session's CSRF token) in the form itself: any replica finishes a
//! login another started, nothing is kept server-side, and the browser cannot read the verifier.

use super::{done, failed, field, number, Form};
use crate::web::render::{time, until};
use crate::web::routes::layout;
use crate::web::{now_ms, Console, Operator};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use minijinja::{context, Value};
use relay_proto::v1 as pb;
use std::collections::HashMap;
use std::sync::Arc;

fn kind_name(v: i32) -> &'static str {
    match pb::AccountKind::try_from(v) {
        Ok(pb::AccountKind::AnthropicApiKey) => "anthropic-api-key",
        Ok(pb::AccountKind::ClaudeOauth) => "claude-oauth",
        Ok(pb::AccountKind::AnthropicCompatible) => "anthropic-compatible",
        _ => "unknown",
    }
}

fn health_name(v: i32) -> String {
    pb::AccountHealth::try_from(v)
        .map(|h| {
            h.as_str_name()
                .trim_start_matches("ACCOUNT_HEALTH_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| "unknown".into())
}

/// An account's state as one word, with the reason and until when (unix ms, 0 = until reset).
pub(crate) fn state_of(a: &pb::AccountInfo, now: i64) -> (String, String, i64) {
    if a.status == pb::AccountStatus::Disabled as i32 {
        return ("disabled".into(), String::new(), 0);
    }
    match a.states.iter().find(|s| s.until_ms == 0 || s.until_ms > now) {
        Some(s) => {
            let scope = if s.scope.is_empty() {
                String::new()
            } else {
                format!(" ({})", s.scope)
            };
            (health_name(s.health) + &scope, s.reason.clone(), s.until_ms)
        }
        None if !a.config_errors.is_empty() => ("out of service".into(), a.config_errors.join("; "), 0),
        None => ("healthy".into(), String::new(), 0),
    }
}

fn row(a: &pb::AccountInfo, now: i64) -> Value {
    let (state, reason, until_ms) = state_of(a, now);
    let quota: Vec<Value> = a
        .quota
        .iter()
        .flat_map(|q| q.windows.iter())
        .map(|w| {
            context! {
                name => w.name.clone(),
                pct => if w.utilization < 0.0 { None } else { Some((w.utilization * 100.0).round() as u32) },
                resets => until(w.reset_ms, now),
            }
        })
        .collect();
    context! {
        id => a.id.clone(),
        name => a.name.clone(),
        kind => kind_name(a.kind),
        base_url => a.base_url.clone(),
        groups => a.groups.join(", "),
        enabled => a.status != pb::AccountStatus::Disabled as i32,
        state,
        healthy => state == "healthy",
        reason,
        until => if until_ms == 0 { String::new() } else { format!("{} ({})", time(until_ms), until(until_ms, now)) },
        hint => a.credential_hint.clone(),
        subscription => a.subscription_type.clone(),
        raw => context! {
            base_url => a.base_url.clone(), priority => a.priority, weight => a.weight,
            groups => a.groups.join(", "), max_concurrency => a.max_concurrency, proxy_url => a.proxy_url.clone(),
        },
        concurrency => if a.max_concurrency == 0 { "—".to_string() } else { a.max_concurrency.to_string() },
        quota,
    }
}

pub async fn show(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let op = match c.operator(&headers).await {
        Ok(op) => op,
        Err(r) => return r,
    };
    page(&c, &op, super::notice(&c, &q)).await
}

async fn page(c: &Console, op: &Operator, notice: Option<String>) -> Response {
    let now = now_ms();
    let accounts = match c.api.call(&op.actor, pb::ListAccountsRequest {}).await {
        Ok(a) => a.accounts,
        Err(s) => return failed(c, &s),
    };
    let groups: Vec<String> = match c.api.call(&op.actor, pb::ListGroupsRequest {}).await {
        Ok(g) => g.groups.into_iter().map(|g| g.name).collect(),
        Err(s) => return failed(c, &s),
    };
    let rows: Vec<Value> = accounts.iter().map(|a| row(a, now)).collect();
    c.views.page(
        StatusCode::OK,
        "accounts.html",
        context! { ..layout(op, "/accounts", "Accounts"), ..context! { accounts => rows, groups, notice } },
    )
}

/// Adds an API-key or compatible-endpoint account.
pub async fn create(State(c): State<Arc<Console>>, headers: HeaderMap, axum::Form(f): axum::Form<Form>) -> Response {
    let op = match c.operator(&headers).await {
        Ok(op) => op,
        Err(r) => return r,
    };
    if let Some(r) = c.check_csrf(&op.cookie, &f) {
        return r;
    }
    let kind = match field(&f, "kind") {
        "anthropic-compatible" => pb::AccountKind::AnthropicCompatible,
        "claude-oauth" => pb::AccountKind::ClaudeOauth,
        _ => pb::AccountKind::AnthropicApiKey,
    };
    let max_concurrency = match number(&f, "max_concurrency").map(u32::try_from) {
        Ok(Ok(n)) => n,
        _ => {
            return c
                .views
                .error(StatusCode::BAD_REQUEST, "max_concurrency: not a whole number")
        }
    };
    let req = pb::CreateAccountRequest {
        name: field(&f, "name").to_string(),
        kind: kind as i32,
        base_url: field(&f, "base_url").to_string(),
        credential: field(&f, "credential").to_string(),
        groups: field(&f, "groups")
            .split(',')
            .map(str::trim)
            .filter(|g| !g.is_empty())
            .map(String::from)
            .collect(),
        max_concurrency,
        ..Default::default()
    };
    match c.api.call(&op.actor, req).await {
        Ok(a) => done(&c, "/accounts", &format!("Account {} added.", a.name)),
        Err(s) => failed(&c, &s),
    }
}

fn checked(checks: &[pb::AccountCheck]) -> String {
    let parts: Vec<String> = checks.iter().map(|c| format!("{}: {}", c.name, c.verdict)).collect();
    if parts.is_empty() {
        "No account to check.".into()
    } else {
        format!("Checked {}.", parts.join(", "))
    }
}

/// Checks every account now.
pub async fn check_all(State(c): State<Arc<Console>>, headers: HeaderMap, axum::Form(f): axum::Form<Form>) -> Response {
    let op = match c.operator(&headers).await {
        Ok(op) => op,
        Err(r) => return r,
    };
    if let Some(r) = c.check_csrf(&op.cookie, &f) {
        return r;
    }
    match c
        .api
        .call(&op.actor, pb::CheckAccountsRequest { account: String::new() })
        .await
    {
        Ok(r) => done(&c, "/accounts", &checked(&r.checks)),
        Err(s) => failed(&c, &s),
    }
}

/// One account's action: enable, disable, reset, check, delete.
pub async fn act(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    axum::Form(f): axum::Form<Form>,
) -> Response {
    let op = match c.operator(&headers).await {
        Ok(op) => op,
        Err(r) => return r,
    };
    if let Some(r) = c.check_csrf(&op.cookie, &f) {
        return r;
    }
    let status = |s: pb::AccountStatus| pb::UpdateAccountRequest {
        account: id.clone(),
        status: Some(s as i32),
        ..Default::default()
    };
    let result = match action.as_str() {
        "enable" => c
            .api
            .call(&op.actor, status(pb::AccountStatus::Enabled))
            .await
            .map(|a| format!("Account {} enabled.", a.name)),
        "disable" => c
            .api
            .call(&op.actor, status(pb::AccountStatus::Disabled))
            .await
            .map(|a| format!("Account {} disabled.", a.name)),
        "reset" => c
            .api
            .call(&op.actor, pb::ResetAccountRequest { account: id.clone() })
            .await
            .map(|a| format!("Account {} reset.", a.name)),
        "check" => c
            .api
            .call(&op.actor, pb::CheckAccountsRequest { account: id.clone() })
            .await
            .map(|r| checked(&r.checks)),
        "edit" => {
            let current = match c
                .api
                .call(&op.actor, pb::GetAccountRequest { account: id.clone() })
                .await
            {
                Ok(a) => a,
                Err(s) => return failed(&c, &s),
            };
            let req = match edit_request(&current, &f) {
                Ok(Some(r)) => r,
                Ok(None) => return done(&c, "/accounts", &format!("Account {}: nothing changed.", current.name)),
                Err(e) => return c.views.error(StatusCode::BAD_REQUEST, &e),
            };
            c.api
                .call(&op.actor, req)
                .await
                .map(|a| format!("Account {} saved.", a.name))
        }
        "delete" => {
            // Confirmation: the account's name typed again.
            let account = match c
                .api
                .call(&op.actor, pb::GetAccountRequest { account: id.clone() })
                .await
            {
                Ok(a) => a,
                Err(s) => return failed(&c, &s),
            };
            if field(&f, "confirm") != account.name {
                return c.views.error(
                    StatusCode::BAD_REQUEST,
                    &format!("Not deleted: type the account's name ({}) to confirm.", account.name),
                );
            }
            c.api
                .call(&op.actor, pb::DeleteAccountRequest { account: id.clone() })
                .await
                .map(|_| format!("Account {} deleted.", account.name))
        }
        _ => return c.views.error(StatusCode::NOT_FOUND, "no such action"),
    };
    match result {
        Ok(notice) => done(&c, "/accounts", &notice),
        Err(s) => failed(&c, &s),
    }
}

fn groups_of(f: &Form) -> Vec<String> {
    field(f, "groups")
        .split(',')
        .map(str::trim)
        .filter(|g| !g.is_empty())
        .map(String::from)
        .collect()
}

fn small_number<T: TryFrom<u64>>(f: &Form, name: &str) -> Result<T, String> {
    T::try_from(number(f, name)?).map_err(|_| format!("{name}: too large"))
}

/// The edit form as an update of `cur`: only the fields the operator changed are set (None when
/// none is). A field left as shown is not sent: the outbound proxy is shown masked (its password
/// never leaves relay), so sending it back would replace the real one; and changing the base URL
/// or the proxy ends the account's health states, which a new priority must not. The credential
/// is sent only when a new one is typed.
fn edit_request(cur: &pb::AccountInfo, f: &Form) -> Result<Option<pb::UpdateAccountRequest>, String> {
    let priority = match field(f, "priority") {
        "" => 0,
        v => v
            .parse::<i32>()
            .map_err(|_| format!("priority: {v:?} is not a whole number"))?,
    };
    let weight = small_number::<u32>(f, "weight")?;
    let max_concurrency = small_number::<u32>(f, "max_concurrency")?;
    let changed = |new: &str, old: &str| (new != old).then(|| new.to_string());
    let credential = field(f, "credential");
    let groups = groups_of(f);
    let mut old_groups = cur.groups.clone();
    let mut new_groups = groups.clone();
    old_groups.sort();
    new_groups.sort();
    let req = pb::UpdateAccountRequest {
        account: cur.id.clone(),
        name: Some(field(f, "name"))
            .filter(|n| !n.is_empty() && *n != cur.name)
            .map(String::from),
        base_url: changed(field(f, "base_url"), &cur.base_url),
        credential: (!credential.is_empty()).then(|| credential.to_string()),
        priority: (priority != cur.priority).then_some(priority),
        weight: Some(weight).filter(|w| *w != 0 && *w != cur.weight),
        set_groups: new_groups != old_groups,
        groups,
        max_concurrency: (max_concurrency != cur.max_concurrency).then_some(max_concurrency),
        status: None,
        proxy_url: changed(field(f, "proxy_url"), &cur.proxy_url),
        refresh_token: None,
        credential_expires_at_ms: None,
        allow_credential_to_new_host: f.contains_key("allow_new_host"),
    };
    let any = req.name.is_some()
        || req.base_url.is_some()
        || req.credential.is_some()
        || req.priority.is_some()
        || req.weight.is_some()
        || req.set_groups
        || req.max_concurrency.is_some()
        || req.proxy_url.is_some();
    Ok(any.then_some(req))
}

/// How long a started OAuth login may be finished.
const LOGIN_TTL_MS: i64 = 30 * 60 * 1000;
/// How long the token exchange may take.
const TOKEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A started login, sealed into the second step's form.
#[derive(serde::Serialize, serde::Deserialize)]
struct Login {
    verifier: String,
    state: String,
    exp: i64,
    name: String,
    base_url: String,
    groups: Vec<String>,
    max_concurrency: u32,
    proxy_url: String,
}

fn login_context(op: &Operator) -> String {
    format!("console-oauth-login/{}", op.csrf)
}

/// The account the login will create, from the first step's form (the credential a placeholder).
fn oauth_request(f: &Form) -> Result<pb::CreateAccountRequest, String> {
    Ok(pb::CreateAccountRequest {
        name: field(f, "name").to_string(),
        kind: pb::AccountKind::ClaudeOauth as i32,
        base_url: field(f, "base_url").to_string(),
        // Stands in for the token while the control plane checks the rest.
        credential: "login-pending".to_string(),
        groups: groups_of(f),
        max_concurrency: small_number(f, "max_concurrency")?,
        proxy_url: field(f, "proxy_url").to_string(),
        validate_only: true,
        ..Default::default()
    })
}

async fn oauth_config(c: &Console, op: &Operator) -> Result<relay_oauth::OAuthConfig, Response> {
    match c.api.call(&op.actor, pb::ListSettingsRequest {}).await {
        Ok(s) => Ok(relay_oauth::OAuthConfig::from_settings(&s.values.into_iter().collect())),
        Err(s) => Err(failed(c, &s)),
    }
}

/// Step 1 of the subscription login: everything the control plane would refuse is refused now
/// (before the operator spends a login on it), then the authorize URL is shown with the form
/// that takes `CODE#STATE` back.
pub async fn oauth_start(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    axum::Form(f): axum::Form<Form>,
) -> Response {
    let op = match c.writer(&headers, &f).await {
        Ok(op) => op,
        Err(r) => return r,
    };
    let req = match oauth_request(&f) {
        Ok(r) => r,
        Err(e) => return c.views.error(StatusCode::BAD_REQUEST, &e),
    };
    if let Err(s) = c.api.call(&op.actor, req.clone()).await {
        return failed(&c, &s);
    }
    let cfg = match oauth_config(&c, &op).await {
        Ok(cfg) => cfg,
        Err(r) => return r,
    };
    let pkce = relay_oauth::Pkce::new();
    let login = Login {
        verifier: pkce.verifier().to_string(),
        state: pkce.state.clone(),
        exp: now_ms() + LOGIN_TTL_MS,
        name: req.name.clone(),
        base_url: req.base_url,
        groups: req.groups,
        max_concurrency: req.max_concurrency,
        proxy_url: req.proxy_url,
    };
    let sealed = match serde_json::to_string(&login)
        .ok()
        .and_then(|j| c.key.seal(&j, &login_context(&op)).ok())
    {
        Some(b) => URL_SAFE_NO_PAD.encode(b),
        None => {
            return c
                .views
                .error(StatusCode::INTERNAL_SERVER_ERROR, "cannot start the login")
        }
    };
    c.views.page(
        StatusCode::OK,
        "oauth.html",
        context! { ..layout(&op, "/accounts", "Subscription login"), ..context! {
            name => req.name, url => relay_oauth::authorize_url(&cfg, &pkce), login => sealed,
        } },
    )
}

/// Step 2: the pasted `CODE#STATE` checked against the login's state and exchanged for tokens,
/// then the account created with them.
pub async fn oauth_finish(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    axum::Form(f): axum::Form<Form>,
) -> Response {
    let op = match c.writer(&headers, &f).await {
        Ok(op) => op,
        Err(r) => return r,
    };
    let login: Login = match URL_SAFE_NO_PAD
        .decode(field(&f, "login"))
        .ok()
        .and_then(|b| c.key.open(&b, &login_context(&op)).ok())
        .and_then(|j| serde_json::from_str(&j).ok())
    {
        Some(l) => l,
        None => {
            return c.views.error(
                StatusCode::BAD_REQUEST,
                "this login was not started in this session: start it again from the Accounts page",
            )
        }
    };
    if login.exp < now_ms() {
        return c.views.error(
            StatusCode::BAD_REQUEST,
            "this login is more than 30 minutes old: start it again from the Accounts page",
        );
    }
    let code = match relay_oauth::parse_pasted(field(&f, "code"), &login.state) {
        Ok(code) => code,
        Err(e) => {
            return c
                .views
                .error(StatusCode::BAD_REQUEST, &format!("{e}; no account was created"))
        }
    };
    let proxy = match login.proxy_url.trim() {
        "" => None,
        url => match relay_oauth::ProxySpec::parse(url) {
            Ok(p) => Some(p),
            Err(e) => {
                return c
                    .views
                    .error(StatusCode::BAD_REQUEST, &format!("the proxy URL is not usable: {e}"))
            }
        },
    };
    let cfg = match oauth_config(&c, &op).await {
        Ok(cfg) => cfg,
        Err(r) => return r,
    };
    let client = match relay_oauth::TokenClient::new(&relay_oauth::ClientOptions::default(), TOKEN_TIMEOUT) {
        Ok(client) => client,
        Err(e) => return c.views.error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    };
    let tokens = match client
        .exchange_code(&cfg, &code, &login.state, &login.verifier, proxy.as_ref())
        .await
    {
        Ok(t) => t,
        Err(e) => {
            return c.views.error(
                StatusCode::BAD_GATEWAY,
                &format!("the login failed: {e}; no account was created"),
            )
        }
    };
    let req = pb::CreateAccountRequest {
        name: login.name,
        kind: pb::AccountKind::ClaudeOauth as i32,
        base_url: login.base_url,
        credential: tokens.access_token,
        groups: login.groups,
        max_concurrency: login.max_concurrency,
        proxy_url: login.proxy_url,
        refresh_token: tokens.refresh_token.unwrap_or_default(),
        credential_expires_at_ms: tokens.expires_at_ms.unwrap_or(0),
        scopes: tokens.scopes,
        subscription_type: tokens.subscription_type.unwrap_or_default(),
        organization: tokens.organization.unwrap_or_default(),
        ..Default::default()
    };
    match c.api.call(&op.actor, req).await {
        Ok(a) => done(&c, "/accounts", &format!("Subscription account {} added.", a.name)),
        Err(s) => failed(&c, &s),
    }
}

/// Imports Claude Code's credentials file (`~/.claude/.credentials.json`), pasted or read into
/// the form by the page's script, as a claude-oauth account.
pub async fn import(State(c): State<Arc<Console>>, headers: HeaderMap, axum::Form(f): axum::Form<Form>) -> Response {
    let op = match c.writer(&headers, &f).await {
        Ok(op) => op,
        Err(r) => return r,
    };
    let tokens = match relay_oauth::parse_credentials_file(field(&f, "credentials").as_bytes()) {
        Ok(t) => t,
        Err(e) => {
            return c.views.error(
                StatusCode::BAD_REQUEST,
                &format!("the credentials file: {e}; no account was created"),
            )
        }
    };
    let max_concurrency = match small_number(&f, "max_concurrency") {
        Ok(n) => n,
        Err(e) => return c.views.error(StatusCode::BAD_REQUEST, &e),
    };
    let req = pb::CreateAccountRequest {
        name: field(&f, "name").to_string(),
        kind: pb::AccountKind::ClaudeOauth as i32,
        base_url: field(&f, "base_url").to_string(),
        credential: tokens.access_token,
        groups: groups_of(&f),
        max_concurrency,
        refresh_token: tokens.refresh_token.unwrap_or_default(),
        credential_expires_at_ms: tokens.expires_at_ms.unwrap_or(0),
        scopes: tokens.scopes,
        subscription_type: tokens.subscription_type.unwrap_or_default(),
        organization: tokens.organization.unwrap_or_default(),
        ..Default::default()
    };
    match c.api.call(&op.actor, req).await {
        Ok(a) => done(&c, "/accounts", &format!("Subscription account {} imported.", a.name)),
        Err(s) => failed(&c, &s),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn form(pairs: &[(&str, &str)]) -> Form {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn the_edit_form_sends_only_what_changed() {
        let cur = pb::AccountInfo {
            id: "a-1".into(),
            name: "main".into(),
            base_url: "http://upstream:9999".into(),
            priority: 0,
            weight: 1,
            groups: vec!["default".into(), "b".into()],
            proxy_url: "http://…@proxy:3128".into(),
            ..Default::default()
        };
        // The form as shown, submitted unchanged: nothing to send.
        let shown = [
            ("name", "main"),
            ("base_url", "http://upstream:9999"),
            ("credential", ""),
            ("groups", "b, default"),
            ("priority", "0"),
            ("weight", "1"),
            ("max_concurrency", "0"),
            ("proxy_url", "http://…@proxy:3128"),
        ];
        assert!(edit_request(&cur, &form(&shown)).unwrap().is_none());
        // A new priority only: the masked proxy and the base URL are not sent back.
        let mut f = form(&shown);
        f.insert("priority".into(), "5".into());
        let r = edit_request(&cur, &f).unwrap().unwrap();
        assert_eq!(r.priority, Some(5));
        assert_eq!((r.proxy_url, r.base_url, r.name, r.weight), (None, None, None, None));
        assert!(!r.set_groups && r.credential.is_none());
        // A proxy removed, groups changed, a new credential.
        let mut f = form(&shown);
        f.insert("proxy_url".into(), "".into());
        f.insert("groups".into(), "default".into());
        f.insert("credential".into(), "sk-new".into());
        let r = edit_request(&cur, &f).unwrap().unwrap();
        assert_eq!(r.proxy_url.as_deref(), Some(""));
        assert!(r.set_groups && r.groups == vec!["default".to_string()]);
        assert_eq!(r.credential.as_deref(), Some("sk-new"));
        assert!(edit_request(&cur, &form(&[("priority", "x")])).is_err());
    }
}
