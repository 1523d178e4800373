//! The web console: server-rendered pages for operators (signed in with an admin token) and key
//! holders (`/me`, signed in with their relay key), on a listener of its own
//! (`relay-control-plane --web-listen ADDR`).
//!
//! The console is a wire side beside the gRPC adapter: every read and write goes through
//! [`AdminApi::call`] with the signed-in token as the [`Actor`], so it has exactly the
//! authorization and audit of `relayctl` and can do nothing `relayctl` cannot. Read-only tokens
//! see no controls, and the service layer refuses their writes anyway.
//!
//! Pieces: [`routes`] (the route table and the navigation, in one place), [`session`] (stateless
//! signed session cookies, CSRF tokens, the sign-in throttle), [`render`] (the minijinja templates
//! in `templates/`, the formatting helpers, the security headers), [`chart`] (SVG bar charts
//! rendered on the server), `pages/` (one file per page). Assets (`static/`: one CSS file, one
//! small script) are compiled in and served by relay itself: the pages make no external request,
//! and the Content-Security-Policy forbids inline script.

pub mod chart;
mod pages;
pub mod render;
pub mod routes;
pub mod session;

use crate::api::admin::AdminApi;
use crate::api::auth::Actor;
use crate::crypto::MasterKey;
use crate::model::Role;
use crate::store::DynStore;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use session::{Signer, Throttle, SESSION_COOKIE};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Sign-in attempts (admin token or relay key) one client address may make per minute.
pub const SIGNIN_ATTEMPTS_PER_MINUTE: u32 = 10;

/// Live tails (Requests page, `/requests/tail`) one replica serves at once: each polls the store
/// twice a second, so a page reloaded in many tabs (or a hostile client) cannot load the store
/// without bound. One more is refused (503) until one closes.
pub const MAX_LIVE_TAILS: usize = 32;

/// How often a live tail checks that its session still holds (not signed out, not expired, the
/// token not revoked): the tail ends within this long after.
pub const TAIL_SESSION_CHECK: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("web console templates: {0}")]
    Templates(String),
    #[error("web console listener: {0}")]
    Serve(#[from] std::io::Error),
}

/// The console's state, shared by every handler.
pub struct Console {
    api: Arc<AdminApi>,
    store: DynStore,
    key: MasterKey,
    signer: Signer,
    signin: Throttle,
    me: Throttle,
    views: render::Views,
    tails: Arc<tokio::sync::Semaphore>,
}

impl Console {
    pub fn new(api: Arc<AdminApi>, store: DynStore, key: MasterKey) -> Result<Self, WebError> {
        Ok(Self {
            api,
            store,
            signer: Signer::new(key.console_session_secret()),
            key,
            signin: Throttle::new(SIGNIN_ATTEMPTS_PER_MINUTE, Duration::from_secs(60)),
            me: Throttle::new(SIGNIN_ATTEMPTS_PER_MINUTE, Duration::from_secs(60)),
            views: render::Views::new()?,
            tails: Arc::new(tokio::sync::Semaphore::new(MAX_LIVE_TAILS)),
        })
    }

    /// The signed-in operator, re-checked against the store on every request (a revoked token or
    /// a changed role ends the session at once); a redirect to the sign-in page otherwise.
    async fn operator(&self, headers: &HeaderMap) -> Result<Operator, Response> {
        let to_signin = || Redirect::to("/signin").into_response();
        let raw = cookie(headers, SESSION_COOKIE).ok_or_else(to_signin)?;
        let claims = self.signer.open(raw, "admin", now_ms()).ok_or_else(to_signin)?;
        if self.session_ended(&claims).await? {
            return Err(to_signin());
        }
        let tokens = self
            .store
            .list_admin_tokens()
            .await
            .map_err(|e| self.views.error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()))?;
        let token = tokens
            .into_iter()
            .find(|t| t.id == claims.id && t.role.as_str() == claims.role && t.role != Role::DataPlane)
            .ok_or_else(to_signin)?;
        Ok(Operator {
            actor: Actor {
                name: token.name,
                role: token.role,
            },
            csrf: self.signer.csrf(raw),
            cookie: raw.to_string(),
            session: claims,
        })
    }

    /// Whether the session was signed out (on any replica: the store keeps signed-out sessions
    /// until they expire); the error page (503) when the store cannot say.
    async fn session_ended(&self, claims: &session::Claims) -> Result<bool, Response> {
        self.store
            .console_session_ended(&claims.nonce)
            .await
            .map_err(|e| self.views.error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()))
    }

    /// Ends a session for good: a copy of its cookie is refused from now on, by every replica.
    async fn end_session(&self, claims: &session::Claims) -> Result<(), Response> {
        self.store
            .end_console_session(&claims.nonce, claims.exp, now_ms())
            .await
            .map_err(|e| self.views.error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()))
    }

    /// The signed-in operator of a form post whose CSRF token is the session's; the redirect to
    /// the sign-in page or the refusal (403) otherwise. What the post may do is the service
    /// layer's to decide (a read-only token's writes are refused there).
    async fn writer(&self, headers: &HeaderMap, form: &HashMap<String, String>) -> Result<Operator, Response> {
        let op = self.operator(headers).await?;
        match self.check_csrf(&op.cookie, form) {
            Some(refused) => Err(refused),
            None => Ok(op),
        }
    }

    /// The refusal (403) of a form whose CSRF token is not the session's; None when it is.
    fn check_csrf(&self, cookie: &str, form: &HashMap<String, String>) -> Option<Response> {
        let given = form.get("csrf").map(String::as_str).unwrap_or("");
        if self.signer.csrf_ok(cookie, given) {
            None
        } else {
            Some(self.views.error(
                StatusCode::FORBIDDEN,
                "the form's CSRF token is missing or not this session's: reload the page and try again",
            ))
        }
    }
}

/// An operator signed in with an admin token.
pub(crate) struct Operator {
    pub actor: Actor,
    /// The session cookie's value (the CSRF token is tied to it).
    pub cookie: String,
    pub csrf: String,
    /// What the session cookie says.
    pub session: session::Claims,
}

impl Operator {
    pub fn can_write(&self) -> bool {
        self.actor.role == Role::Admin
    }
}

/// The value of cookie `name` in the request.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|h| session::cookie(h, name))
        .filter(|v| !v.is_empty())
}

/// Whether the browser reached the console over HTTPS (a TLS-terminating proxy in front says
/// so): cookies are then `Secure`.
fn secure(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Serves the console on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    console: Console,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WebError> {
    let app = routes::router(Arc::new(console));
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}
