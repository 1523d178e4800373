//! Groups (`relayctl group …`): every group with its state (active, paused, activated: since when
//! and by whom), its member accounts and their live state, its keys, fallbacks (and the groups
//! falling back to it) and limits; pause, resume and activate; create, edit (description,
//! fallbacks, limits) and delete with confirmation. The page reloads itself every few seconds
//! (live state) unless the operator is typing.

use super::{dollars, done, failed, field, number, Form};
use crate::web::render::{ago, limit, usd_micro_budget};
use crate::web::routes::layout;
use crate::web::{now_ms, Console};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use minijinja::{context, Value};
use relay_proto::v1 as pb;
use std::collections::HashMap;
use std::sync::Arc;

/// How often the page reloads itself (seconds).
const REFRESH_S: u32 = 15;

pub(crate) fn state_name(v: i32) -> &'static str {
    match pb::GroupState::try_from(v) {
        Ok(pb::GroupState::Paused) => "paused",
        Ok(pb::GroupState::Activated) => "activated",
        _ => "active",
    }
}

fn list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|g| !g.is_empty())
        .map(String::from)
        .collect()
}

fn limits_of(f: &Form) -> Result<pb::KeyLimits, String> {
    Ok(pb::KeyLimits {
        requests_per_minute: u32::try_from(number(f, "rpm")?).map_err(|_| "rpm: too large".to_string())?,
        tokens_per_minute: number(f, "tpm")?,
        max_concurrency: u32::try_from(number(f, "concurrency")?).map_err(|_| "concurrency: too large".to_string())?,
        daily_budget_micro_usd: dollars(f, "daily")?,
        monthly_budget_micro_usd: dollars(f, "monthly")?,
    })
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
    let now = now_ms();
    let groups = match c.api.call(&op.actor, pb::ListGroupsRequest {}).await {
        Ok(g) => g.groups,
        Err(s) => return failed(&c, &s),
    };
    let accounts = match c.api.call(&op.actor, pb::ListAccountsRequest {}).await {
        Ok(a) => a.accounts,
        Err(s) => return failed(&c, &s),
    };
    let keys = match c.api.call(&op.actor, pb::ListApiKeysRequest {}).await {
        Ok(k) => k.keys,
        Err(s) => return failed(&c, &s),
    };
    let rows: Vec<Value> = groups
        .iter()
        .map(|g| {
            let l = g.limits.unwrap_or_default();
            let members: Vec<Value> = accounts
                .iter()
                .filter(|a| a.groups.contains(&g.name))
                .map(|a| {
                    let (state, reason, _) = super::accounts::state_of(a, now);
                    context! { name => a.name.clone(), state, reason }
                })
                .collect();
            let key_names: Vec<String> = keys
                .iter()
                .filter(|k| k.group == g.name && k.status != pb::KeyStatus::Revoked as i32)
                .map(|k| k.name.clone())
                .collect();
            context! {
                id => g.id.clone(),
                name => g.name.clone(),
                description => g.description.clone(),
                state => state_name(g.state),
                since => if g.state_since_ms == 0 { String::new() } else { ago(g.state_since_ms, now) },
                by => g.state_by.clone(),
                members,
                keys => key_names,
                fallbacks => g.fallbacks.join(" → "),
                fallbacks_raw => g.fallbacks.join(", "),
                fallback_of => g.fallback_of.join(", "),
                limits => context! {
                    rpm => limit(l.requests_per_minute.into()), tpm => limit(l.tokens_per_minute),
                    concurrency => limit(l.max_concurrency.into()),
                    daily => usd_micro_budget(l.daily_budget_micro_usd), monthly => usd_micro_budget(l.monthly_budget_micro_usd),
                },
                raw => context! {
                    rpm => l.requests_per_minute, tpm => l.tokens_per_minute, concurrency => l.max_concurrency,
                    daily => if l.daily_budget_micro_usd == 0 { String::new() } else { format!("{:.2}", l.daily_budget_micro_usd as f64 / 1e6) },
                    monthly => if l.monthly_budget_micro_usd == 0 { String::new() } else { format!("{:.2}", l.monthly_budget_micro_usd as f64 / 1e6) },
                },
            }
        })
        .collect();
    c.views.page(
        StatusCode::OK,
        "groups.html",
        context! { ..layout(&op, "/groups", "Groups"), ..context! {
            groups => rows, notice => super::notice(&c, &q), refresh => REFRESH_S,
        } },
    )
}

/// Creates a group.
pub async fn create(State(c): State<Arc<Console>>, headers: HeaderMap, axum::Form(f): axum::Form<Form>) -> Response {
    let op = match c.writer(&headers, &f).await {
        Ok(op) => op,
        Err(r) => return r,
    };
    let limits = match limits_of(&f) {
        Ok(l) => l,
        Err(e) => return c.views.error(StatusCode::BAD_REQUEST, &e),
    };
    let req = pb::CreateGroupRequest {
        name: field(&f, "name").to_string(),
        description: field(&f, "description").to_string(),
        limits: Some(limits),
        fallbacks: list(field(&f, "fallbacks")),
    };
    match c.api.call(&op.actor, req).await {
        Ok(g) => done(&c, "/groups", &format!("Group {} created.", g.name)),
        Err(s) => failed(&c, &s),
    }
}

/// One group's action: pause, resume, activate, edit, delete.
pub async fn act(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    axum::Form(f): axum::Form<Form>,
) -> Response {
    let op = match c.writer(&headers, &f).await {
        Ok(op) => op,
        Err(r) => return r,
    };
    let state = |s: pb::GroupState| pb::SetGroupStateRequest {
        group: id.clone(),
        state: s as i32,
    };
    let result = match action.as_str() {
        "pause" => c
            .api
            .call(&op.actor, state(pb::GroupState::Paused))
            .await
            .map(|g| format!("Group {} paused: its keys go to its fallbacks.", g.name)),
        "resume" => c
            .api
            .call(&op.actor, state(pb::GroupState::Active))
            .await
            .map(|g| format!("Group {} resumed.", g.name)),
        "activate" => c
            .api
            .call(&op.actor, state(pb::GroupState::Activated))
            .await
            .map(|g| format!("Group {} activated: groups falling back to it use it first.", g.name)),
        "edit" => {
            let limits = match limits_of(&f) {
                Ok(l) => l,
                Err(e) => return c.views.error(StatusCode::BAD_REQUEST, &e),
            };
            let req = pb::UpdateGroupRequest {
                group: id.clone(),
                name: None,
                description: Some(field(&f, "description").to_string()),
                limits: Some(limits),
                set_fallbacks: true,
                fallbacks: list(field(&f, "fallbacks")),
            };
            c.api
                .call(&op.actor, req)
                .await
                .map(|g| format!("Group {} saved.", g.name))
        }
        "delete" => {
            let groups = match c.api.call(&op.actor, pb::ListGroupsRequest {}).await {
                Ok(g) => g.groups,
                Err(s) => return failed(&c, &s),
            };
            let Some(g) = groups.into_iter().find(|g| g.id == id || g.name == id) else {
                return c.views.error(StatusCode::NOT_FOUND, &format!("no group {id}"));
            };
            if field(&f, "confirm") != g.name {
                return c.views.error(
                    StatusCode::BAD_REQUEST,
                    &format!("Not deleted: type the group's name ({}) to confirm.", g.name),
                );
            }
            c.api
                .call(&op.actor, pb::DeleteGroupRequest { group: id.clone() })
                .await
                .map(|_| format!("Group {} deleted.", g.name))
        }
        _ => return c.views.error(StatusCode::NOT_FOUND, "no such action"),
    };
    match result {
        Ok(notice) => done(&c, "/groups", &notice),
        Err(s) => failed(&c, &s),
    }
}
