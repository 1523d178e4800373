//! Data-plane identity from mTLS: with `--client-ca`, a data plane must present
//! a TLS client certificate issued by that CA (rustls verifies the chain during
//! the handshake) whose subject alternative names cover the node id it claims
//! in its Watch Hello, its usage batches and its account-state reports. A node
//! can then speak only for itself.
//!
//! The certificate is checked with `rustls-webpki`, as a TLS client checks a
//! server name: the node id must be a DNS name (`dp-1`, `dp-1.relay.svc`) the
//! certificate is valid for.

use rustls_pki_types::{CertificateDer, ServerName};
use std::sync::Arc;
use tonic::{Request, Status};

/// What the caller's connection proves about which data plane it is.
#[derive(Clone, Debug)]
pub enum NodeIdentity {
    /// Client certificates are not required (no client CA configured): the
    /// node id is taken as claimed, the bearer token is the only credential.
    Unchecked,
    /// Client certificates are required and this verified chain was presented.
    Certificate(Arc<Vec<CertificateDer<'static>>>),
    /// Client certificates are required and none was presented.
    Missing,
}

impl NodeIdentity {
    /// The identity of `req`'s connection; `required`: a client CA is configured.
    pub fn of<T>(req: &Request<T>, required: bool) -> Self {
        if !required {
            return Self::Unchecked;
        }
        match req.peer_certs() {
            Some(chain) if !chain.is_empty() => Self::Certificate(chain),
            _ => Self::Missing,
        }
    }

    /// Ok when the caller may speak for `node_id`.
    pub fn check(&self, node_id: &str) -> Result<(), Status> {
        let chain = match self {
            Self::Unchecked => return Ok(()),
            Self::Missing => {
                metrics::counter!(relay_proto::metrics::ADMIN_AUTH_FAILURES_TOTAL, "reason" => "no_client_certificate")
                    .increment(1);
                return Err(Status::unauthenticated(
                    "this control plane requires data planes to present a TLS client certificate",
                ));
            }
            Self::Certificate(chain) => chain,
        };
        let valid = chain.first().is_some_and(|leaf| {
            let name = ServerName::try_from(node_id.to_string()).ok();
            let cert = webpki::EndEntityCert::try_from(leaf).ok();
            match (name, cert) {
                (Some(name), Some(cert)) => cert.verify_is_valid_for_subject_name(&name).is_ok(),
                _ => false,
            }
        });
        if valid {
            Ok(())
        } else {
            metrics::counter!(relay_proto::metrics::ADMIN_AUTH_FAILURES_TOTAL, "reason" => "node_id_mismatch")
                .increment(1);
            Err(Status::permission_denied(format!(
                "the TLS client certificate is not valid for node id {node_id:?}"
            )))
        }
    }
}
