//! Sign-in with an admin token (read-only or admin), and sign-out. The session cookie carries
//! the token's id and role, never the token; attempts are throttled per client address.

use super::Form;
use crate::crypto::hashes_equal;
use crate::model::Role;
use crate::web::session::{self, SESSION_COOKIE};
use crate::web::{now_ms, secure, Console};
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use minijinja::context;
use std::net::SocketAddr;
use std::sync::Arc;

pub async fn form(State(c): State<Arc<Console>>) -> Response {
    c.views
        .page(StatusCode::OK, "signin.html", context! { title => "Sign in" })
}

pub async fn submit(
    State(c): State<Arc<Console>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    axum::Form(f): axum::Form<Form>,
) -> Response {
    if !c.signin.allow(peer.ip()) {
        return c.views.page(
            StatusCode::TOO_MANY_REQUESTS,
            "signin.html",
            context! { title => "Sign in", error => "Too many sign-in attempts from this address: wait a minute." },
        );
    }
    let token = super::field(&f, "token");
    let refused = |why: &str| {
        c.views.page(
            StatusCode::UNAUTHORIZED,
            "signin.html",
            context! { title => "Sign in", error => why },
        )
    };
    if token.is_empty() {
        return refused("Paste an admin token (rat-…).");
    }
    let hash = c.key.hash_admin_token(token);
    let found = match c.store.find_admin_token(&hash).await {
        Ok(t) => t.filter(|t| hashes_equal(&t.token_hash, &hash)),
        Err(e) => return c.views.error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    let Some(t) = found.filter(|t| matches!(t.role, Role::Admin | Role::ReadOnly)) else {
        metrics::counter!(relay_proto::metrics::ADMIN_AUTH_FAILURES_TOTAL, "reason" => "unknown_token").increment(1);
        return refused("That is not an admin or read-only token of this relay.");
    };
    let value = c
        .signer
        .seal(&session::claims("admin", &t.id, t.role.as_str(), now_ms()));
    tracing::info!(token = %t.name, role = %t.role, "console sign-in");
    (
        [(
            header::SET_COOKIE,
            session::set_cookie(SESSION_COOKIE, &value, secure(&headers)),
        )],
        Redirect::to("/"),
    )
        .into_response()
}

pub async fn signout(State(c): State<Arc<Console>>, headers: HeaderMap, axum::Form(f): axum::Form<Form>) -> Response {
    let op = match c.operator(&headers).await {
        Ok(op) => op,
        Err(r) => return r,
    };
    if let Some(r) = c.check_csrf(&op.cookie, &f) {
        return r;
    }
    if let Err(r) = c.end_session(&op.session).await {
        return r;
    }
    (
        [(
            header::SET_COOKIE,
            session::clear_cookie(SESSION_COOKIE, secure(&headers)),
        )],
        Redirect::to("/signin"),
    )
        .into_response()
}
