//! tonic adapters: the only place where proto types meet the store and the
//! domain model. `auth` checks bearer tokens; `admin` serves `relayctl`;
//! `discovery` serves `ConfigDiscovery.Watch`; `usage` serves `UsageIngest.Report`;
//! `identity` ties a data plane's TLS client certificate to its node id.

pub mod admin;
pub mod auth;
pub mod discovery;
pub mod identity;
pub mod usage;

use crate::store::StoreError;
use tonic::Status;

/// The one mapping from store errors to gRPC statuses. Messages carry names
/// and ids only, never a secret.
pub fn status_from_store(e: StoreError) -> Status {
    match e {
        StoreError::AlreadyExists { .. } => Status::already_exists(e.to_string()),
        StoreError::NotFound { .. } => Status::not_found(e.to_string()),
        StoreError::Conflict { .. } => Status::aborted(e.to_string()),
        StoreError::InUse(_) => Status::failed_precondition(e.to_string()),
        StoreError::Database(_) | StoreError::Migration(_) => {
            tracing::error!(error = %e, "store failure");
            Status::unavailable("the control plane's database is unavailable; retry")
        }
        StoreError::Corrupt(_) => {
            tracing::error!(error = %e, "stored data is invalid");
            Status::internal("stored data is invalid; see the control-plane log")
        }
    }
}
