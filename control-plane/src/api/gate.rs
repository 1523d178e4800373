//! The gate in front of every gRPC service.
//!
//! A call's bearer token is checked before any of its messages are decoded: an unknown token, or
//! one whose role may not call the service at all (a data-plane token on the Admin API, an operator
//! token on Watch or Report), is refused from the request head alone, so an unauthenticated client
//! cannot make the control plane read and decode a 64 MiB message. The services still check the
//! precise role of each method. The token is looked up in the tokens of the last published head
//! (memory); only a token not there (created this second) costs a store read. Unary Admin calls
//! get a time limit. Health and reflection need no token.

use super::auth::Authenticator;
use crate::model::Role;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tonic::body::Body;
use tonic::metadata::MetadataMap;
use tonic::Status;

/// Largest message an Admin call may send (its requests are small; answers may be large).
pub const ADMIN_MAX_DECODE_BYTES: usize = 4 << 20;
/// Largest message a data plane sends on Watch (hello, acks) or in an account-state report.
pub const DISCOVERY_MAX_DECODE_BYTES: usize = 8 << 20;
/// The time limit of one unary Admin call.
pub const ADMIN_CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Who may call what, by service.
fn roles_for(path: &str) -> Option<&'static [Role]> {
    if path.starts_with("/relay.v1.Admin/") {
        Some(&[Role::Admin, Role::ReadOnly])
    } else if path.starts_with("/relay.v1.ConfigDiscovery/") || path.starts_with("/relay.v1.UsageIngest/") {
        Some(&[Role::DataPlane])
    } else {
        None
    }
}

/// The layer for `tonic::transport::Server::layer`.
#[derive(Clone)]
pub struct GateLayer {
    auth: Authenticator,
}

impl GateLayer {
    pub fn new(auth: Authenticator) -> Self {
        Self { auth }
    }
}

impl<S> tower_layer::Layer<S> for GateLayer {
    type Service = Gate<S>;
    fn layer(&self, inner: S) -> Gate<S> {
        Gate {
            inner,
            auth: self.auth.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    auth: Authenticator,
}

impl<S> tower_service::Service<http::Request<Body>> for Gate<S>
where
    S: tower_service::Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // The service that was polled ready serves this call; a fresh clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        Box::pin(async move {
            let path = req.uri().path();
            let Some(roles) = roles_for(path) else {
                return inner.call(req).await;
            };
            let admin = roles.contains(&Role::Admin);
            let md = MetadataMap::from_headers(req.headers().clone());
            if let Err(status) = auth.admit(&md, roles).await {
                metrics::counter!(relay_proto::metrics::GRPC_REFUSED_BEFORE_DECODE_TOTAL).increment(1);
                return Ok(status.into_http());
            }
            if admin {
                match tokio::time::timeout(ADMIN_CALL_TIMEOUT, inner.call(req)).await {
                    Ok(r) => r,
                    Err(_) => Ok(Status::deadline_exceeded(format!(
                        "the call took longer than {} s",
                        ADMIN_CALL_TIMEOUT.as_secs()
                    ))
                    .into_http()),
                }
            } else {
                inner.call(req).await
            }
        })
    }
}
