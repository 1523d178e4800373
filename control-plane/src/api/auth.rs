//! Bearer-token authentication for every gRPC service.
//!
//! Tokens are looked up by their keyed hash and the stored hash is compared in
//! constant time. Roles: `admin` may do everything on the Admin API,
//! `read-only` may list and report, `data-plane` may only Watch and Report.

use crate::crypto::{hashes_equal, MasterKey};
use crate::model::Role;
use crate::store::DynStore;
use tonic::metadata::MetadataMap;
use tonic::Status;

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Admin API reads.
    Read,
    /// Admin API writes.
    Write,
    /// Watch and Report.
    DataPlane,
}

/// Who is calling, as the audit log names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    pub name: String,
    pub role: Role,
}

#[derive(Clone)]
pub struct Authenticator {
    store: DynStore,
    key: MasterKey,
    /// Data planes must present a TLS client certificate for their node id.
    client_certs: bool,
}

fn bearer(md: &MetadataMap) -> Option<&str> {
    let v = md.get("authorization")?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}

impl Authenticator {
    pub fn new(store: DynStore, key: MasterKey) -> Self {
        Self {
            store,
            key,
            client_certs: false,
        }
    }

    /// Requires data planes to prove their node id with a TLS client certificate.
    pub fn with_client_certs(mut self, required: bool) -> Self {
        self.client_certs = required;
        self
    }

    /// What `req`'s connection proves about the data plane calling.
    pub fn node_identity<T>(&self, req: &tonic::Request<T>) -> super::identity::NodeIdentity {
        super::identity::NodeIdentity::of(req, self.client_certs)
    }

    pub async fn check(&self, md: &MetadataMap, need: Need) -> Result<Actor, Status> {
        let token = bearer(md)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Status::unauthenticated("missing bearer token (authorization: Bearer <token>)"))?;
        let hash = self.key.hash_admin_token(token);
        let found = self
            .store
            .find_admin_token(&hash)
            .await
            .map_err(super::status_from_store)?;
        let Some(t) = found.filter(|t| hashes_equal(&t.token_hash, &hash)) else {
            metrics::counter!("relay_admin_auth_failures_total", "reason" => "unknown_token").increment(1);
            return Err(Status::unauthenticated("invalid token"));
        };
        let allowed = match need {
            Need::Read => matches!(t.role, Role::Admin | Role::ReadOnly),
            Need::Write => t.role == Role::Admin,
            Need::DataPlane => t.role == Role::DataPlane,
        };
        if !allowed {
            metrics::counter!("relay_admin_auth_failures_total", "reason" => "role").increment(1);
            return Err(Status::permission_denied(format!(
                "token {:?} has role {}, which may not do this",
                t.name, t.role
            )));
        }
        Ok(Actor {
            name: t.name,
            role: t.role,
        })
    }
}
