//! tonic adapters: the only place where proto types meet the store and the
//! domain model. `auth` checks bearer tokens; `admin` serves `relayctl`;
//! `discovery` serves `ConfigDiscovery.Watch`; `usage` serves `UsageIngest.Report`;
//! `identity` ties a data plane's TLS client certificate to its node id; `gate` checks every
//! call's token before its messages are decoded; `quota` converts subscription quota windows;
//! `requests` serves the request log's calls.

pub mod admin;
pub mod auth;
pub mod discovery;
pub mod gate;
pub mod identity;
pub mod quota;
pub mod requests;
pub mod usage;

use crate::store::StoreError;
use tokio::sync::watch;
use tonic::Status;

/// Becomes `true` when the control plane begins to shut down: open Watch and
/// Report streams end at once (data planes reconnect to another replica), so
/// the server's graceful shutdown does not wait on them.
pub type Closing = watch::Receiver<bool>;

/// Resolves once `closing` is `true` (or its sender is gone).
pub async fn closed(closing: &mut Closing) {
    let _ = closing.wait_for(|c| *c).await.map(|_| ());
}

/// What a stream that ends because the control plane is going away says.
pub fn shutting_down() -> Status {
    Status::unavailable("the control plane is shutting down; reconnect to another replica")
}

/// The one mapping from store errors to gRPC statuses. Messages carry names
/// and ids only, never a secret.
pub fn status_from_store(e: StoreError) -> Status {
    match e {
        StoreError::AlreadyExists { .. } => Status::already_exists(e.to_string()),
        StoreError::NotFound { .. } => Status::not_found(e.to_string()),
        StoreError::Conflict { .. } => Status::aborted(e.to_string()),
        StoreError::InUse(_) | StoreError::Fenced { .. } => Status::failed_precondition(e.to_string()),
        StoreError::Invalid(_) => Status::invalid_argument(e.to_string()),
        StoreError::Unavailable { .. } => {
            tracing::error!(error = %e, "store unavailable");
            Status::unavailable("the control plane's database is unavailable; retry")
        }
        StoreError::Internal { .. } | StoreError::Migration { .. } => {
            tracing::error!(error = %e, "store failure");
            Status::internal("the control plane's database refused the request; see the control-plane log")
        }
        StoreError::Corrupt { .. } => {
            tracing::error!(error = %e, "stored data is invalid");
            Status::internal("stored data is invalid; see the control-plane log")
        }
    }
}
