//! `relayctl token ...`: admin tokens.

use anyhow::{anyhow, Result};
use relay_proto::v1::{
    AdminRole, AdminTokenInfo, CreateAdminTokenRequest, ListAdminTokensRequest, RevokeAdminTokenRequest,
};

use super::Deleted;
use crate::args::{RoleArg, TokenCmd};
use crate::client::{Conn, RpcResult};
use crate::output::{Column, Output, Value};
use crate::parse::{enum_label, enum_name};

const ROLE_PREFIX: &str = "ADMIN_ROLE_";

pub fn role_label(v: i32) -> String {
    enum_label(AdminRole::try_from(v).ok().map(|r| r.as_str_name()), ROLE_PREFIX, v)
}

/// The proto value of a role, looked up by name so that roles the contract
/// does not (yet) define fail clearly instead of sending a guessed number.
fn role(arg: RoleArg) -> Result<AdminRole> {
    let label = match arg {
        RoleArg::Admin => "admin",
        RoleArg::ReadOnly => "read-only",
        RoleArg::DataPlane => "data-plane",
    };
    let name = enum_name(label, ROLE_PREFIX);
    AdminRole::from_str_name(&name).ok_or_else(|| {
        anyhow!("role {label} is not supported by this relayctl's API contract (relay.v1.AdminRole has no {name})")
    })
}

const COLUMNS: &[Column<AdminTokenInfo>] = &[
    Column::new("name", "Name", |t| Value::text(&t.name)),
    Column::new("id", "ID", |t| Value::Id(t.id.clone())),
    Column::new("role", "Role", |t| Value::Text(role_label(t.role))),
    Column::new("source", "Source", |t| Value::opt_text(&t.source)),
    Column::new("created_at", "Created", |t| Value::Time(t.created_at_ms)),
    Column::detail("token_prefix", "Prefix", |t| Value::text(&t.token_prefix)),
];

pub async fn run(conn: &mut Conn, out: Output, cmd: TokenCmd) -> Result<()> {
    let server = conn.server.clone();
    let api = &mut conn.api;
    match cmd {
        TokenCmd::Create { name, role: r } => {
            let req = CreateAdminTokenRequest {
                name,
                role: role(r)? as i32,
            };
            let resp = api.create_admin_token(req).await.or_report(&server)?;
            let info = resp.info.unwrap_or_default();
            out.secret_once(COLUMNS, &info, "token", &resp.token)
        }
        TokenCmd::List => {
            let list = api
                .list_admin_tokens(ListAdminTokensRequest {})
                .await
                .or_report(&server)?;
            out.list(COLUMNS, &list.tokens)
        }
        TokenCmd::Revoke { name: token } => {
            let resp = api
                .revoke_admin_token(RevokeAdminTokenRequest { token: token.clone() })
                .await
                .or_report(&server)?;
            Deleted {
                kind: "token",
                target: token,
                version: resp.version,
            }
            .print(out, "revoked")
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn roles_map_by_name() {
        assert_eq!(role(RoleArg::Admin).unwrap(), AdminRole::Admin);
        assert_eq!(role(RoleArg::ReadOnly).unwrap(), AdminRole::ReadOnly);
        assert_eq!(role_label(AdminRole::ReadOnly as i32), "read-only");
        // data-plane works as soon as the contract defines ADMIN_ROLE_DATA_PLANE.
        match role(RoleArg::DataPlane) {
            Ok(r) => assert_eq!(r.as_str_name(), "ADMIN_ROLE_DATA_PLANE"),
            Err(e) => assert!(e.to_string().contains("ADMIN_ROLE_DATA_PLANE")),
        }
    }
}
