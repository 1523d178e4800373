//! Admin tokens: create (the secret shown once, stored as a keyed hash), list with where each
//! came from, revoke (never the last admin token).

use super::lookup::lookup;
use super::validate::validate_name;
use super::{new_id, AdminApi};
use crate::api::auth::Actor;
use crate::api::convert::{role_from_pb, role_to_pb, version_pb};
use crate::crypto::{self, MasterKey};
use crate::model::*;
use relay_proto::v1 as pb;
use serde_json::json;
use tonic::Status;

impl AdminApi {
    pub(super) async fn create_admin_token(
        &self,
        actor: &Actor,
        r: pb::CreateAdminTokenRequest,
    ) -> Result<pb::CreateAdminTokenResponse, Status> {
        validate_name("token", &r.name)?;
        let role = role_from_pb(r.role)?;
        let token = crypto::generate_secret(crypto::ADMIN_TOKEN_PREFIX);
        let row = admin_token_row(&self.key, &r.name, role, &token);
        self.apply(
            actor,
            "token.create",
            &r.name,
            json!({"id": row.id, "role": role.as_str()}),
            vec![Mutation::InsertAdminToken(row.clone())],
        )
        .await?;
        let mut info = token_info(&row);
        // As `token list` will say it.
        info.source = format!("created by {}", actor.name);
        Ok(pb::CreateAdminTokenResponse {
            info: Some(info),
            token,
        })
    }

    pub(super) async fn list_admin_tokens(
        &self,
        _actor: &Actor,
        _r: pb::ListAdminTokensRequest,
    ) -> Result<pb::ListAdminTokensResponse, Status> {
        let tokens = self.store.list_admin_tokens().await?;
        let revisions: Vec<u64> = tokens.iter().map(|t| t.revision).collect();
        let created = self.store.audit_at_revisions(&revisions).await?;
        Ok(pb::ListAdminTokensResponse {
            tokens: tokens
                .iter()
                .map(|t| pb::AdminTokenInfo {
                    source: created
                        .iter()
                        .find(|e| {
                            e.revision == t.revision
                                && e.target == t.name
                                && (e.action == "token.create" || e.action == "token.rotate")
                        })
                        .map(token_source)
                        .unwrap_or_default(),
                    ..token_info(t)
                })
                .collect(),
        })
    }

    pub(super) async fn revoke_admin_token(
        &self,
        actor: &Actor,
        r: pb::RevokeAdminTokenRequest,
    ) -> Result<pb::DeleteResponse, Status> {
        let name = &r.token;
        let tokens = self.store.list_admin_tokens().await?;
        let t = match tokens.iter().find(|t| &t.id == name || &t.name == name) {
            Some(t) => t,
            None => lookup(tokens.iter().collect(), name, "token", |t| (&t.id, &t.name))?,
        };
        if t.role == Role::Admin && tokens.iter().filter(|t| t.role == Role::Admin).count() == 1 {
            return Err(Status::failed_precondition(
                "this is the last admin token; create another before revoking it",
            ));
        }
        let v = self
            .apply(
                actor,
                "token.revoke",
                &t.name,
                json!({"id": t.id, "role": t.role.as_str()}),
                vec![Mutation::DeleteAdminToken { id: t.id.clone() }],
            )
            .await?;
        Ok(pb::DeleteResponse {
            version: Some(version_pb(v)),
        })
    }
}

pub(super) fn token_info(t: &AdminToken) -> pb::AdminTokenInfo {
    pb::AdminTokenInfo {
        id: t.id.clone(),
        name: t.name.clone(),
        role: role_to_pb(t.role) as i32,
        token_prefix: t.token_prefix.clone(),
        created_at_ms: t.created_at,
        source: String::new(),
    }
}

/// Where a token came from, as the audit entry of the change that stored it says: the bootstrap's
/// `source` (RELAY_ADMIN_TOKEN, generated at first start, standalone start), else who created it.
pub(super) fn token_source(entry: &AuditEntry) -> String {
    let source = serde_json::from_str::<serde_json::Value>(&entry.detail)
        .ok()
        .and_then(|d| d.get("source").and_then(|s| s.as_str()).map(str::to_string));
    source.unwrap_or_else(|| format!("created by {}", entry.actor))
}

/// Creates an admin token row for `token` (not stored: only its hash).
pub fn admin_token_row(key: &MasterKey, name: &str, role: Role, token: &str) -> AdminToken {
    AdminToken {
        id: new_id(),
        name: name.to_string(),
        token_hash: key.hash_admin_token(token),
        token_prefix: crypto::display_prefix(token, crypto::ADMIN_TOKEN_PREFIX),
        role,
        created_at: now_ms(),
        revision: 0,
    }
}
