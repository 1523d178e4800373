//! Keys: every key with its group, limits, live use, spend today and this month against its
//! budgets, and expiry; create (the key is shown once, with a copy button), edit limits, revoke.

use super::{dollars, done, failed, field, number, Form};
use crate::web::render::{limit, time, usd_micro_budget, usd_pico};
use crate::web::routes::layout;
use crate::web::{now_ms, Console, Operator};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use minijinja::{context, Value};
use relay_proto::v1 as pb;
use std::collections::HashMap;
use std::sync::Arc;

fn status_name(v: i32) -> &'static str {
    match pb::KeyStatus::try_from(v) {
        Ok(pb::KeyStatus::Active) => "active",
        Ok(pb::KeyStatus::Disabled) => "disabled",
        Ok(pb::KeyStatus::Revoked) => "revoked",
        _ => "unknown",
    }
}

/// A key's row: what the list shows.
pub(crate) fn row(k: &pb::GetApiKeyResponse) -> Value {
    let info = k.info.clone().unwrap_or_default();
    let l = info.limits.unwrap_or_default();
    let s = k.spend.clone().unwrap_or_default();
    let live = k.live.unwrap_or_default();
    context! {
        id => info.id,
        name => info.name,
        prefix => info.key_prefix,
        group => info.group,
        status => status_name(info.status),
        active => info.status == pb::KeyStatus::Active as i32,
        rpm => limit(l.requests_per_minute.into()),
        tpm => limit(l.tokens_per_minute),
        concurrency => limit(l.max_concurrency.into()),
        raw => context! {
            rpm => l.requests_per_minute, tpm => l.tokens_per_minute, concurrency => l.max_concurrency,
            daily => if l.daily_budget_micro_usd == 0 { String::new() } else { format!("{:.2}", l.daily_budget_micro_usd as f64 / 1e6) },
            monthly => if l.monthly_budget_micro_usd == 0 { String::new() } else { format!("{:.2}", l.monthly_budget_micro_usd as f64 / 1e6) },
        },
        day_spend => usd_pico(s.day_pico_usd),
        month_spend => usd_pico(s.month_pico_usd),
        day_budget => usd_micro_budget(l.daily_budget_micro_usd),
        month_budget => usd_micro_budget(l.monthly_budget_micro_usd),
        live => k.live.map(|_| format!("{} req/min, {} tok/min, {} in flight", live.requests_last_minute, live.tokens_last_minute, live.in_flight)),
        expires => if info.expires_at_ms == 0 { "never".to_string() } else { time(info.expires_at_ms) },
        models => if info.allowed_models.is_empty() { "all".to_string() } else { info.allowed_models.join(", ") },
    }
}

async fn page(c: &Console, op: &Operator, extra: Value, status: StatusCode) -> Response {
    let keys = match c.api.call(&op.actor, pb::ListApiKeysRequest {}).await {
        Ok(k) => k.keys,
        Err(s) => return failed(c, &s),
    };
    let mut rows = Vec::new();
    for k in keys {
        match c.api.call(&op.actor, pb::GetApiKeyRequest { key: k.id.clone() }).await {
            Ok(full) => rows.push(row(&full)),
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => return failed(c, &s),
        }
    }
    let groups: Vec<String> = match c.api.call(&op.actor, pb::ListGroupsRequest {}).await {
        Ok(g) => g.groups.into_iter().map(|g| g.name).collect(),
        Err(s) => return failed(c, &s),
    };
    c.views.page(
        status,
        "keys.html",
        context! { ..layout(op, "/keys", "Keys"), ..extra, ..context! { keys => rows, groups } },
    )
}

pub async fn show(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    match c.operator(&headers).await {
        Ok(op) => page(&c, &op, context! { notice => super::notice(&c, &q) }, StatusCode::OK).await,
        Err(r) => r,
    }
}

fn parse_limits(f: &Form) -> Result<pb::KeyLimits, String> {
    Ok(pb::KeyLimits {
        requests_per_minute: u32::try_from(number(f, "rpm")?).map_err(|_| "rpm: too large".to_string())?,
        tokens_per_minute: number(f, "tpm")?,
        max_concurrency: u32::try_from(number(f, "concurrency")?).map_err(|_| "concurrency: too large".to_string())?,
        daily_budget_micro_usd: dollars(f, "daily")?,
        monthly_budget_micro_usd: dollars(f, "monthly")?,
    })
}

/// Creates a key and shows it, this once.
pub async fn create(State(c): State<Arc<Console>>, headers: HeaderMap, axum::Form(f): axum::Form<Form>) -> Response {
    let op = match c.operator(&headers).await {
        Ok(op) => op,
        Err(r) => return r,
    };
    if let Some(r) = c.check_csrf(&op.cookie, &f) {
        return r;
    }
    let limits = match parse_limits(&f) {
        Ok(l) => l,
        Err(e) => return c.views.error(StatusCode::BAD_REQUEST, &e),
    };
    let days = match number(&f, "expires_days") {
        Ok(d) => d.min(100 * 365) as i64,
        Err(e) => return c.views.error(StatusCode::BAD_REQUEST, &e),
    };
    let req = pb::CreateApiKeyRequest {
        name: field(&f, "name").to_string(),
        group: field(&f, "group").to_string(),
        allowed_models: field(&f, "models")
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(String::from)
            .collect(),
        expires_at_ms: if days == 0 { 0 } else { now_ms() + days * 86_400_000 },
        limits: Some(limits),
    };
    match c.api.call(&op.actor, req).await {
        // Rendered, not redirected: the key is in this answer only (and it is not cached).
        Ok(created) => {
            let name = created.info.map(|i| i.name).unwrap_or_default();
            page(
                &c,
                &op,
                context! { created => context! { name, key => created.key } },
                StatusCode::OK,
            )
            .await
        }
        Err(s) => failed(&c, &s),
    }
}

async fn limits_update(c: &Console, op: &Operator, id: &str, f: &Form) -> Response {
    let limits = match parse_limits(f) {
        Ok(l) => l,
        Err(e) => return c.views.error(StatusCode::BAD_REQUEST, &e),
    };
    let req = pb::UpdateApiKeyRequest {
        key: id.to_string(),
        limits: Some(limits),
        ..Default::default()
    };
    match c.api.call(&op.actor, req).await {
        Ok(k) => done(c, "/keys", &format!("Limits of {} saved.", k.name)),
        Err(s) => failed(c, &s),
    }
}

pub async fn limits(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    axum::Form(f): axum::Form<Form>,
) -> Response {
    let op = match c.operator(&headers).await {
        Ok(op) => op,
        Err(r) => return r,
    };
    if let Some(r) = c.check_csrf(&op.cookie, &f) {
        return r;
    }
    limits_update(&c, &op, &id, &f).await
}

pub async fn revoke(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    axum::Form(f): axum::Form<Form>,
) -> Response {
    let op = match c.operator(&headers).await {
        Ok(op) => op,
        Err(r) => return r,
    };
    if let Some(r) = c.check_csrf(&op.cookie, &f) {
        return r;
    }
    match c.api.call(&op.actor, pb::RevokeApiKeyRequest { key: id }).await {
        Ok(k) => done(&c, "/keys", &format!("Key {} revoked.", k.name)),
        Err(s) => failed(&c, &s),
    }
}
