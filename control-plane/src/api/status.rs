//! The one mapping from store errors to gRPC statuses, as `From<StoreError> for Status`, so
//! handlers write `store.x().await?`. Messages carry names and ids only, never a secret.

use crate::store::StoreError;
use tonic::Status;

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::AlreadyExists { .. } => Status::already_exists(e.to_string()),
            StoreError::NotFound { .. } => Status::not_found(e.to_string()),
            StoreError::Conflict { .. } => Status::aborted(e.to_string()),
            StoreError::InUse(_) | StoreError::Fenced { .. } => Status::failed_precondition(e.to_string()),
            StoreError::Invalid(_) => Status::invalid_argument(e.to_string()),
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
}
