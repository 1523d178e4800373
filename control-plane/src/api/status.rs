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
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn status(e: StoreError) -> (Code, String) {
        let s = Status::from(e);
        (s.code(), s.message().to_string())
    }

    #[test]
    fn only_an_unavailable_database_asks_the_caller_to_retry() {
        let cause = || -> Option<crate::store::BoxError> { Some("connection refused at 10.0.0.5".into()) };
        let (code, msg) = status(StoreError::Unavailable {
            message: "pool timeout".into(),
            source: cause(),
        });
        assert_eq!(code, Code::Unavailable);
        assert!(msg.ends_with("retry"), "{msg}");
        for e in [
            StoreError::Internal {
                message: "syntax".into(),
                source: cause(),
            },
            StoreError::Corrupt {
                message: "bad row".into(),
                source: cause(),
            },
            StoreError::Migration {
                message: "0015".into(),
                source: cause(),
            },
        ] {
            let (code, msg) = status(e);
            assert_eq!(code, Code::Internal);
            assert!(!msg.contains("retry"), "{msg}");
            // The database's own words stay in the log, not in the answer.
            assert!(!msg.contains("10.0.0.5") && msg.contains("control-plane log"), "{msg}");
        }
    }

    #[test]
    fn domain_errors_keep_their_kind_and_message() {
        let cases = [
            (
                StoreError::NotFound {
                    kind: "account",
                    name: "a1".into(),
                },
                Code::NotFound,
                "account \"a1\" not found",
            ),
            (
                StoreError::AlreadyExists {
                    kind: "group",
                    name: "g".into(),
                },
                Code::AlreadyExists,
                "group \"g\" already exists",
            ),
            (
                StoreError::InUse("group \"g\"".into()),
                Code::FailedPrecondition,
                "group \"g\" is still in use",
            ),
            (
                StoreError::Invalid("rpm 0 is out of range".into()),
                Code::InvalidArgument,
                "rpm 0 is out of range",
            ),
            (
                StoreError::Conflict {
                    kind: "key",
                    name: "k1".into(),
                },
                Code::Aborted,
                "concurrent modification of key \"k1\"; another change to it kept landing first",
            ),
        ];
        for (e, code, msg) in cases {
            assert_eq!(status(e), (code, msg.to_string()));
        }
    }
}
