//! Settings (`relayctl settings …`): every setting relay declares with its description, type and
//! range, the value in force and the default; then the per-account overrides and anything stored
//! that relay does not know. A full admin edits a value or puts it back to the default through
//! `SetSetting`/`UnsetSetting`, the calls relayctl makes (validated and audited there).

use super::{done, failed, field, Form};
use crate::web::routes::layout;
use crate::web::Console;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use minijinja::context;
use relay_proto::v1 as pb;
use std::collections::HashMap;
use std::sync::Arc;

pub async fn show(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let op = match c.operator(&headers).await {
        Ok(op) => op,
        Err(r) => return r,
    };
    let settings = match c.api.call(&op.actor, pb::ListSettingsRequest {}).await {
        Ok(s) => s.settings,
        Err(s) => return failed(&c, &s),
    };
    let rows: Vec<_> = settings
        .iter()
        .map(|s| {
            context! {
                name => s.name.clone(), value => s.value.clone(), default => s.default_value.clone(),
                set => s.set, kind => s.r#type.clone(), range => s.range.clone(),
                description => s.description.clone(), per_account => s.per_account,
                known => !s.r#type.is_empty(),
                secret => relay_proto::settings::is_secret(&s.name),
            }
        })
        .collect();
    c.views.page(
        StatusCode::OK,
        "settings.html",
        context! { ..layout(&op, "/settings", "Settings"), ..context! { settings => rows, notice => super::notice(&c, &q) } },
    )
}

/// Sets a value (`name`, `value`), or puts it back to the default (`unset` given).
pub async fn set(State(c): State<Arc<Console>>, headers: HeaderMap, axum::Form(f): axum::Form<Form>) -> Response {
    let op = match c.writer(&headers, &f).await {
        Ok(op) => op,
        Err(r) => return r,
    };
    let name = field(&f, "name").to_string();
    if name.is_empty() {
        return c.views.error(StatusCode::BAD_REQUEST, "name: which setting?");
    }
    let result = if f.contains_key("unset") {
        c.api
            .call(&op.actor, pb::UnsetSettingRequest { name: name.clone() })
            .await
            .map(|_| format!("{name} is back to its default."))
    } else {
        let value = field(&f, "value").to_string();
        c.api
            .call(
                &op.actor,
                pb::SetSettingRequest {
                    name: name.clone(),
                    value: value.clone(),
                },
            )
            .await
            // A secret's value is never shown again (nor put in the URL the notice travels in).
            .map(|_| {
                if relay_proto::settings::is_secret(&name) {
                    format!("{name} set to {}.", relay_proto::settings::mask(&value))
                } else {
                    format!("{name} set to {value}.")
                }
            })
    };
    match result {
        Ok(notice) => done(&c, "/settings", &notice),
        Err(s) => failed(&c, &s),
    }
}
