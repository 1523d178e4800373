//! `GET /v1/models` and `/v1/models/{id}`, answered by the relay in the
//! Anthropic page shape, listing what the caller's key may use.

use crate::control::state::{model_matches, KeyEntry, ServingConfig};
use serde_json::{json, Value};

// Current Claude models (one list, in relay-proto). Operators can replace the list with the
// `models` setting (comma-separated ids).
use relay_proto::models::KNOWN;

fn entry(id: &str, display: &str, created: &str) -> Value {
    json!({"type": "model", "id": id, "display_name": display, "created_at": created})
}

/// The models the key may use, newest first.
pub fn visible(cfg: &ServingConfig, key: &KeyEntry) -> Vec<Value> {
    let configured = cfg
        .resources
        .settings
        .as_ref()
        .and_then(|s| s.values.get("models"))
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
        });
    let mut out: Vec<Value> = match configured {
        Some(ids) => ids
            .into_iter()
            .filter(|id| key.allows(id))
            .map(|id| entry(id, id, "2025-01-01T00:00:00Z"))
            .collect(),
        None => KNOWN
            .iter()
            .filter(|(id, _, _)| key.allows(id))
            .map(|(id, d, c)| entry(id, d, c))
            .collect(),
    };
    // Exact ids on the key's allow-list are listed even when not known.
    for m in &key.allowed_models {
        if !m.ends_with('*') && !out.iter().any(|v| v["id"] == m.as_str()) {
            out.push(entry(m, m, "2025-01-01T00:00:00Z"));
        }
    }
    out
}

/// A page: `limit` (1..=1000, default 20), `after_id`, `before_id`.
pub fn page(models: Vec<Value>, query: Option<&str>) -> Value {
    let mut limit = 20usize;
    let mut after: Option<String> = None;
    let mut before: Option<String> = None;
    for pair in query.unwrap_or("").split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "limit" => limit = v.parse().unwrap_or(20).clamp(1, 1000),
            "after_id" => after = Some(v.to_string()),
            "before_id" => before = Some(v.to_string()),
            _ => {}
        }
    }
    let pos = |id: &str| models.iter().position(|m| m["id"] == id);
    let start = after.as_deref().and_then(pos).map(|i| i + 1).unwrap_or(0);
    let end = before.as_deref().and_then(pos).unwrap_or(models.len());
    let slice: Vec<Value> = models
        .get(start..end.max(start))
        .unwrap_or(&[])
        .iter()
        .take(limit)
        .cloned()
        .collect();
    let has_more = start + slice.len() < end;
    json!({
        "data": slice,
        "has_more": has_more,
        "first_id": slice.first().map(|m| m["id"].clone()),
        "last_id": slice.last().map(|m| m["id"].clone()),
    })
}

pub fn find(models: &[Value], id: &str) -> Option<Value> {
    models
        .iter()
        .find(|m| {
            m["id"] == id
                || m["id"]
                    .as_str()
                    .is_some_and(|full| model_matches(&format!("{id}-*"), full))
        })
        .cloned()
}
