//! Audit: the audit log (`relayctl audit`), newest first: who (the token's name) did what to
//! which target, when, with the details, filtered by time, actor, action and target.

use crate::web::render::{parse_when, time};
use crate::web::routes::layout;
use crate::web::{now_ms, Console};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use minijinja::context;
use relay_proto::v1 as pb;
use std::collections::HashMap;
use std::sync::Arc;

type Q = HashMap<String, String>;

/// Entries read when a filter is given (the filters on actor, action and target apply to them).
const SCAN: u32 = 5_000;
/// Entries shown at most.
const SHOWN: usize = 500;

fn q<'a>(q: &'a Q, name: &str) -> &'a str {
    q.get(name).map(|s| s.trim()).unwrap_or("")
}

/// Whether `entry` passes the page's filters (case-insensitive substrings).
fn keep(e: &pb::AuditEntry, actor: &str, action: &str, target: &str) -> bool {
    let has = |hay: &str, needle: &str| needle.is_empty() || hay.to_lowercase().contains(&needle.to_lowercase());
    has(&e.actor, actor) && has(&e.action, action) && has(&e.target, target)
}

pub async fn show(State(c): State<Arc<Console>>, headers: HeaderMap, Query(query): Query<Q>) -> Response {
    let op = match c.operator(&headers).await {
        Ok(op) => op,
        Err(r) => return r,
    };
    let since = match parse_when(q(&query, "since"), now_ms()) {
        Ok(s) => s,
        Err(e) => return c.views.error(StatusCode::BAD_REQUEST, &format!("since: {e}")),
    };
    let (actor, action, target) = (q(&query, "actor"), q(&query, "action"), q(&query, "target"));
    let filtered = !(actor.is_empty() && action.is_empty() && target.is_empty());
    let req = pb::ListAuditRequest {
        limit: if filtered { SCAN } else { SHOWN as u32 },
        since_ms: since.unwrap_or(0),
    };
    let mut entries = match c.api.call(&op.actor, req).await {
        Ok(r) => r.entries,
        Err(s) => return super::failed(&c, &s),
    };
    entries.retain(|e| keep(e, actor, action, target));
    entries.sort_by_key(|e| std::cmp::Reverse(e.id));
    entries.truncate(SHOWN);
    let rows: Vec<_> = entries
        .iter()
        .map(|e| {
            context! {
                id => e.id, time => time(e.at_ms), actor => e.actor.clone(), action => e.action.clone(),
                target => e.target.clone(), detail => e.detail.clone(), revision => e.revision,
            }
        })
        .collect();
    let f: HashMap<&str, &str> = ["since", "actor", "action", "target"]
        .iter()
        .map(|k| (*k, q(&query, k)))
        .collect();
    c.views.page(
        StatusCode::OK,
        "audit.html",
        context! { ..layout(&op, "/audit", "Audit"), ..context! { rows, f, shown => SHOWN } },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_case_insensitive_substrings() {
        let e = pb::AuditEntry {
            actor: "Ops-Admin".into(),
            action: "group.pause".into(),
            target: "group/main".into(),
            ..Default::default()
        };
        assert!(keep(&e, "ops", "pause", ""));
        assert!(keep(&e, "", "", ""));
        assert!(!keep(&e, "viewer", "", ""));
        assert!(!keep(&e, "", "", "backup"));
    }
}
