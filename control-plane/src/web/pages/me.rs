//! The key holder's page (`/me`): signed in by pasting a relay key (throttled per client address
//! against guessing), it shows that key's limits, remaining budget, usage per day and recent
//! requests, and nothing else. Its reads go through the service layer as a read-only caller
//! named after the key; it has no write.

use super::Form;
use crate::api::auth::Actor;
use crate::crypto::hashes_equal;
use crate::model::{KeyStatus, Role};
use crate::web::chart;
use crate::web::render::{time, usd_pico};
use crate::web::session::{self, ME_COOKIE};
use crate::web::{cookie, now_ms, secure, Console};
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use minijinja::context;
use relay_proto::v1 as pb;
use std::net::SocketAddr;
use std::sync::Arc;

const DAY: i64 = 86_400_000;

fn signin_page(c: &Console, status: StatusCode, error: Option<&str>) -> Response {
    c.views.page(status, "me.html", context! { title => "Your key", error })
}

pub async fn show(State(c): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let Some(raw) = cookie(&headers, ME_COOKIE) else {
        return signin_page(&c, StatusCode::OK, None);
    };
    let Some(claims) = c.signer.open(raw, "key", now_ms()) else {
        return signin_page(&c, StatusCode::OK, None);
    };
    match c.session_ended(&claims).await {
        Ok(false) => {}
        Ok(true) => return signin_page(&c, StatusCode::OK, None),
        Err(r) => return r,
    }
    let who = Actor {
        name: "console:key-holder".into(),
        role: Role::ReadOnly,
    };
    let key = match c.api.call(&who, pb::GetApiKeyRequest { key: claims.id.clone() }).await {
        Ok(k) => k,
        Err(_) => return signin_page(&c, StatusCode::OK, Some("That key is gone.")),
    };
    let info = key.info.clone().unwrap_or_default();
    let now = now_ms();
    let expired = info.expires_at_ms != 0 && info.expires_at_ms <= now;
    if info.id != claims.id || info.status != pb::KeyStatus::Active as i32 || expired {
        return signin_page(&c, StatusCode::OK, Some("That key is no longer active."));
    }
    let usage = match c
        .api
        .call(
            &who,
            pb::QueryUsageRequest {
                group_by: pb::UsageGroupBy::Key as i32,
                since_ms: now - 7 * DAY,
                until_ms: 0,
                bucket: pb::UsageBucket::Day as i32,
            },
        )
        .await
    {
        Ok(u) => u.rows.into_iter().filter(|r| r.group_id == info.id).collect::<Vec<_>>(),
        Err(s) => return super::failed(&c, &s),
    };
    let last = now - now.rem_euclid(DAY);
    // Per day of the last week: (label, requests, cost in USD).
    let days: Vec<(String, f64, f64)> = (0..7)
        .rev()
        .map(|i| {
            let start = last - i * DAY;
            let rows = usage.iter().filter(|r| r.bucket_start_ms == start);
            let (n, cost) = rows.fold((0u64, 0u64), |(n, c), r| (n + r.requests, c + r.cost_pico_usd));
            let label = chrono::DateTime::from_timestamp_millis(start)
                .map(|t| t.format("%m-%d").to_string())
                .unwrap_or_default();
            (label, n as f64, cost as f64 / 1e12)
        })
        .collect();
    let requests_per_day: Vec<(String, f64)> = days.iter().map(|(l, n, _)| (l.clone(), *n)).collect();
    let cost_per_day: Vec<(String, f64)> = days.iter().map(|(l, _, c)| (l.clone(), *c)).collect();
    let requests = match c
        .api
        .call(
            &who,
            pb::ListRequestsRequest {
                filter: Some(pb::RequestFilter {
                    key: info.id.clone(),
                    ..Default::default()
                }),
                limit: 20,
                cursor: String::new(),
            },
        )
        .await
    {
        Ok(r) => r.records,
        Err(s) => return super::failed(&c, &s),
    };
    let recent: Vec<_> = requests
        .iter()
        .filter(|r| r.key_id == info.id)
        .map(|r| {
            context! {
                time => time(r.time_ms), model => r.model.clone(), status => r.status,
                tokens => r.input_tokens + r.output_tokens, cost => usd_pico(r.cost_pico_usd),
            }
        })
        .collect();
    let l = info.limits.unwrap_or_default();
    let s = key.spend.clone().unwrap_or_default();
    let left = |budget_micro: u64, spent_pico: u64| {
        if budget_micro == 0 {
            "no budget".to_string()
        } else {
            usd_pico((budget_micro * 1_000_000).saturating_sub(spent_pico))
        }
    };
    let total: u64 = usage.iter().map(|r| r.requests).sum();
    let total_cost: u64 = usage.iter().map(|r| r.cost_pico_usd).sum();
    c.views.page(
        StatusCode::OK,
        "me.html",
        context! {
            title => "Your key",
            csrf => c.signer.csrf(raw),
            key => crate::web::pages::keys::row(&key),
            day_left => left(l.daily_budget_micro_usd, s.day_pico_usd),
            month_left => left(l.monthly_budget_micro_usd, s.month_pico_usd),
            week_requests => total,
            week_cost => usd_pico(total_cost),
            charts => vec![
                chart::bars("Your requests per day, last week", &requests_per_day, |v| format!("{v:.0}")),
                chart::bars("Your cost per day, last week (USD)", &cost_per_day, |v| format!("${v:.4}")),
            ],
            recent,
        },
    )
}

/// Signs a key holder in with their relay key.
pub async fn signin(
    State(c): State<Arc<Console>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    axum::Form(f): axum::Form<Form>,
) -> Response {
    if !c.me.allow(peer.ip()) {
        return signin_page(
            &c,
            StatusCode::TOO_MANY_REQUESTS,
            Some("Too many attempts from this address: wait a minute."),
        );
    }
    let pasted = super::field(&f, "key");
    let refused = || {
        signin_page(
            &c,
            StatusCode::UNAUTHORIZED,
            Some("That is not an active key of this relay."),
        )
    };
    if pasted.is_empty() {
        return refused();
    }
    let hash = c.key.hash_api_key(pasted);
    let keys = match c.store.list_api_keys().await {
        Ok(k) => k,
        Err(e) => return c.views.error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    let Some(k) = keys
        .into_iter()
        .find(|k| hashes_equal(&k.key_hash, &hash) && k.status == KeyStatus::Active)
        // An expired key is refused like a revoked one (relay refuses it too).
        .filter(|k| k.expires_at.is_none_or(|at| at > now_ms()))
    else {
        return refused();
    };
    let value = c.signer.seal(&session::claims("key", &k.id, "key", now_ms()));
    (
        [(
            header::SET_COOKIE,
            session::set_cookie(ME_COOKIE, &value, secure(&headers)),
        )],
        Redirect::to("/me"),
    )
        .into_response()
}

pub async fn signout(State(c): State<Arc<Console>>, headers: HeaderMap, axum::Form(f): axum::Form<Form>) -> Response {
    let Some(raw) = cookie(&headers, ME_COOKIE) else {
        return Redirect::to("/me").into_response();
    };
    if let Some(r) = c.check_csrf(raw, &f) {
        return r;
    }
    if let Some(claims) = c.signer.open(raw, "key", now_ms()) {
        if let Err(r) = c.end_session(&claims).await {
            return r;
        }
    }
    (
        [(header::SET_COOKIE, session::clear_cookie(ME_COOKIE, secure(&headers)))],
        Redirect::to("/me"),
    )
        .into_response()
}
