//! Data planes (`relayctl proxies`): every data plane the control plane knows, with the config
//! version it runs against the head, whether it is connected and to which replica, its last
//! contact, its build, its last refused update and the resources it took out of service.

use crate::web::render::{ago, time};
use crate::web::routes::layout;
use crate::web::{now_ms, Console};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use minijinja::context;
use relay_proto::v1 as pb;
use std::sync::Arc;

/// How often the page reloads itself (seconds).
const REFRESH_S: u32 = 10;

pub(crate) fn version(v: Option<&pb::ConfigVersion>) -> String {
    v.map(|v| format!("{}.{}", v.epoch, v.revision)).unwrap_or_default()
}

pub async fn show(State(c): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let op = match c.operator(&headers).await {
        Ok(op) => op,
        Err(r) => return r,
    };
    let now = now_ms();
    let fleet = match c.api.call(&op.actor, pb::ListProxiesRequest {}).await {
        Ok(f) => f,
        Err(s) => return super::failed(&c, &s),
    };
    let head = version(fleet.head.as_ref());
    let planes: Vec<_> = fleet
        .proxies
        .iter()
        .map(|p| {
            let rejected: Vec<String> = p
                .rejected
                .iter()
                .map(|r| {
                    let what = r
                        .r#ref
                        .as_ref()
                        .map(|x| {
                            let kind = pb::ResourceKind::try_from(x.kind)
                                .map(|k| {
                                    k.as_str_name()
                                        .trim_start_matches("RESOURCE_KIND_")
                                        .to_ascii_lowercase()
                                })
                                .unwrap_or_default();
                            format!("{kind} {}", x.id)
                        })
                        .unwrap_or_default();
                    format!("{what}: {}", r.error)
                })
                .collect();
            context! {
                node => p.node_id.clone(),
                build => p.build_version.clone(),
                version => version(p.acked.as_ref()),
                current => version(p.acked.as_ref()) == head,
                connected => p.connected,
                replica => p.replica.clone(),
                last_contact => ago(p.last_seen_ms, now),
                last_seen => time(p.last_seen_ms),
                nack_version => version(p.last_nack_version.as_ref()),
                nack_error => p.last_nack_error.clone(),
                nack_at => if p.last_nack_at_ms == 0 { String::new() } else { ago(p.last_nack_at_ms, now) },
                rejected,
            }
        })
        .collect();
    c.views.page(
        StatusCode::OK,
        "planes.html",
        context! { ..layout(&op, "/planes", "Data planes"), ..context! { planes, head, refresh => REFRESH_S } },
    )
}
