//! The console's route table and navigation, in one place: a new page is one file in `pages/`,
//! its routes here and (for an operator's page) one line in [`NAV`].

use super::pages::{accounts, audit, groups, keys, me, overview, planes, requests, settings, signin, usage};
use super::render::{self, asset};
use super::{Console, Operator};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use minijinja::Value;
use std::sync::Arc;

/// The operator's pages in the navigation: (path, label).
pub const NAV: &[(&str, &str)] = &[
    ("/", "Overview"),
    ("/keys", "Keys"),
    ("/accounts", "Accounts"),
    ("/groups", "Groups"),
    ("/requests", "Requests"),
    ("/usage", "Usage"),
    ("/audit", "Audit"),
    ("/settings", "Settings"),
    ("/planes", "Data planes"),
];

pub fn router(c: Arc<Console>) -> Router {
    Router::new()
        .route("/", get(overview::show))
        .route("/signin", get(signin::form).post(signin::submit))
        .route("/signout", post(signin::signout))
        .route("/keys", get(keys::show).post(keys::create))
        .route("/keys/{id}/limits", post(keys::limits))
        .route("/keys/{id}/revoke", post(keys::revoke))
        .route("/accounts", get(accounts::show).post(accounts::create))
        .route("/accounts/check", post(accounts::check_all))
        .route("/accounts/oauth", post(accounts::oauth_start))
        .route("/accounts/oauth/finish", post(accounts::oauth_finish))
        .route("/accounts/import", post(accounts::import))
        .route("/accounts/{id}/{action}", post(accounts::act))
        .route("/groups", get(groups::show).post(groups::create))
        .route("/groups/{id}/{action}", post(groups::act))
        .route("/usage", get(usage::show))
        .route("/usage/export", get(usage::export))
        .route("/audit", get(audit::show))
        .route("/settings", get(settings::show).post(settings::set))
        .route("/planes", get(planes::show))
        .route("/requests", get(requests::show))
        .route("/requests/tail", get(requests::tail))
        .route("/requests/{id}", get(requests::detail))
        .route("/me", get(me::show).post(me::signin))
        .route("/me/signout", post(me::signout))
        .route(
            "/static/console.css",
            get(|| async { asset("text/css; charset=utf-8", render::CSS) }),
        )
        .route(
            "/static/console.js",
            get(|| async { asset("text/javascript; charset=utf-8", render::JS) }),
        )
        .route(
            "/static/favicon.svg",
            get(|| async { asset("image/svg+xml", render::FAVICON) }),
        )
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(c.clone(), cross_site_posts))
        .layer(axum::middleware::map_response(render::security_headers))
        .with_state(c)
}

/// What every operator page's layout shows: the navigation with `path` current, who is signed
/// in, whether the controls are shown, the session's CSRF token.
pub(crate) fn layout(op: &Operator, path: &str, title: &str) -> Value {
    let nav: Vec<Value> = NAV
        .iter()
        .map(|(p, l)| minijinja::context! { path => *p, label => *l, current => *p == path })
        .collect();
    minijinja::context! {
        title => title,
        nav => nav,
        user => op.actor.name.clone(),
        role => op.actor.role.as_str(),
        can_write => op.can_write(),
        csrf => op.csrf.clone(),
    }
}

/// Refuses (403) a POST another site's page made, before any handler runs: the browser says so in
/// `Sec-Fetch-Site` (`cross-site`, or `same-site`: a sibling subdomain). CSRF tokens already
/// guard every signed-in form; this also guards the two sign-in forms (an attacker's page could
/// otherwise sign a visitor in to the attacker's session) and costs nothing to a real user.
async fn cross_site_posts(State(c): State<Arc<Console>>, req: Request, next: Next) -> Response {
    let foreign = req
        .headers()
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("cross-site") || v.eq_ignore_ascii_case("same-site"));
    if req.method() == Method::POST && foreign {
        return c.views.error(
            StatusCode::FORBIDDEN,
            "this form was posted from another site's page: open the console and use its own forms",
        );
    }
    next.run(req).await
}

/// Any other path: a page saying so (with the console's links), not an empty answer.
async fn not_found(State(c): State<Arc<Console>>) -> Response {
    c.views
        .error(StatusCode::NOT_FOUND, "there is no such page in the console")
}
