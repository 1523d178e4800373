//! `relayctl key ...`: client API keys.

use anyhow::{anyhow, Result};
use relay_proto::v1::{
    ApiKeyInfo, CreateApiKeyRequest, KeyLimits, KeyStatus, ListApiKeysRequest, RevokeApiKeyRequest, UpdateApiKeyRequest,
};

use super::clean_list;
use crate::args::{KeyCmd, KeyCreate, KeyUpdate, LimitArgs};
use crate::client::{Conn, RpcResult};
use crate::output::{Column, Output, Value};
use crate::parse::enum_label;

pub fn status_label(v: i32) -> String {
    enum_label(KeyStatus::try_from(v).ok().map(|k| k.as_str_name()), "KEY_STATUS_", v)
}

fn limits(k: &ApiKeyInfo) -> KeyLimits {
    k.limits.unwrap_or_default()
}

pub const COLUMNS: &[Column<ApiKeyInfo>] = &[
    Column::new("name", "Name", |k| Value::text(&k.name)),
    Column::new("id", "ID", |k| Value::Id(k.id.clone())),
    Column::new("key_prefix", "Prefix", |k| Value::text(&k.key_prefix)),
    Column::new("status", "Status", |k| Value::Text(status_label(k.status))),
    Column::new("group", "Group", |k| Value::opt_text(&k.group)),
    Column::new("allowed_models", "Models", |k| Value::list(&k.allowed_models, "(all)")),
    Column::new("expires_at", "Expires", |k| Value::Time(k.expires_at_ms)),
    Column::detail("rpm", "RPM", |k| Value::limit(u64::from(limits(k).requests_per_minute))),
    Column::detail("tpm", "TPM", |k| Value::limit(limits(k).tokens_per_minute)),
    Column::detail("concurrency", "Concurrency", |k| {
        Value::limit(u64::from(limits(k).max_concurrency))
    }),
    Column::detail("daily_budget_usd", "Daily budget ($)", |k| {
        Value::budget(limits(k).daily_budget_micro_usd)
    }),
    Column::detail("monthly_budget_usd", "Monthly budget ($)", |k| {
        Value::budget(limits(k).monthly_budget_micro_usd)
    }),
    Column::detail("created_at", "Created", |k| Value::Time(k.created_at_ms)),
    Column::detail("updated_at", "Updated", |k| Value::Time(k.updated_at_ms)),
];

/// `current` with the limits given on the command line changed.
fn apply_limits(mut current: KeyLimits, args: &LimitArgs) -> KeyLimits {
    if let Some(v) = args.rpm {
        current.requests_per_minute = v;
    }
    if let Some(v) = args.tpm {
        current.tokens_per_minute = v;
    }
    if let Some(v) = args.concurrency {
        current.max_concurrency = v;
    }
    if let Some(v) = args.daily_budget {
        current.daily_budget_micro_usd = v;
    }
    if let Some(v) = args.monthly_budget {
        current.monthly_budget_micro_usd = v;
    }
    current
}

/// Finds a key by id, else by name (preferring the one not revoked when a name
/// was reused).
fn find_key<'a>(keys: &'a [ApiKeyInfo], wanted: &str) -> Result<&'a ApiKeyInfo> {
    if let Some(k) = keys.iter().find(|k| k.id == wanted) {
        return Ok(k);
    }
    let named: Vec<&ApiKeyInfo> = keys.iter().filter(|k| k.name == wanted).collect();
    let live: Vec<&ApiKeyInfo> = named
        .iter()
        .copied()
        .filter(|k| k.status != KeyStatus::Revoked as i32)
        .collect();
    match (named.as_slice(), live.as_slice()) {
        ([], _) => Err(anyhow!("not found: API key {wanted:?}")),
        ([only], _) | (_, [only]) => Ok(only),
        _ => {
            let ids: Vec<&str> = named.iter().map(|k| k.id.as_str()).collect();
            Err(anyhow!(
                "several API keys are named {wanted:?}; use an id ({})",
                ids.join(", ")
            ))
        }
    }
}

pub async fn run(conn: &mut Conn, out: Output, cmd: KeyCmd) -> Result<()> {
    let server = conn.server.clone();
    let api = &mut conn.api;
    match cmd {
        KeyCmd::Create(args) => {
            let resp = api.create_api_key(create_request(args)).await.or_report(&server)?;
            let info = resp.info.unwrap_or_default();
            out.secret_once(COLUMNS, &info, "key", &resp.key)
        }
        KeyCmd::List => {
            let list = api.list_api_keys(ListApiKeysRequest {}).await.or_report(&server)?;
            out.list(COLUMNS, &list.keys)
        }
        KeyCmd::Show { key } => {
            let list = api.list_api_keys(ListApiKeysRequest {}).await.or_report(&server)?;
            out.one(COLUMNS, find_key(&list.keys, &key)?)
        }
        KeyCmd::Revoke { key } => {
            let info = api
                .revoke_api_key(RevokeApiKeyRequest { key })
                .await
                .or_report(&server)?;
            out.one_or_text(
                COLUMNS,
                &info,
                &format!("API key {:?} ({}) revoked", info.name, info.id),
            )
        }
        KeyCmd::Update(args) => {
            let mut req = update_request(&args);
            if args.limits.any() {
                let list = api.list_api_keys(ListApiKeysRequest {}).await.or_report(&server)?;
                let current = find_key(&list.keys, &args.key)?;
                req.key = current.id.clone();
                req.limits = Some(apply_limits(limits(current), &args.limits));
            }
            let info = api.update_api_key(req).await.or_report(&server)?;
            out.one(COLUMNS, &info)
        }
    }
}

fn create_request(args: KeyCreate) -> CreateApiKeyRequest {
    CreateApiKeyRequest {
        name: args.name,
        group: args.group.unwrap_or_default(),
        allowed_models: clean_list(&args.models),
        expires_at_ms: args.expires.unwrap_or(0),
        limits: Some(apply_limits(KeyLimits::default(), &args.limits)),
    }
}

/// The update without limits (those need the key's current values).
fn update_request(args: &KeyUpdate) -> UpdateApiKeyRequest {
    let models = clean_list(&args.models);
    let status = if args.disable {
        Some(KeyStatus::Disabled as i32)
    } else if args.enable {
        Some(KeyStatus::Active as i32)
    } else {
        None
    };
    UpdateApiKeyRequest {
        key: args.key.clone(),
        name: args.name.clone(),
        group: args.group.clone(),
        set_allowed_models: args.all_models || !models.is_empty(),
        allowed_models: models,
        expires_at_ms: args.expires,
        limits: None,
        status,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key(id: &str, name: &str, status: KeyStatus) -> ApiKeyInfo {
        ApiKeyInfo {
            id: id.into(),
            name: name.into(),
            status: status as i32,
            ..Default::default()
        }
    }

    #[test]
    fn keys_resolve_by_id_then_name() {
        let keys = vec![
            key("k1", "ci", KeyStatus::Revoked),
            key("k2", "ci", KeyStatus::Active),
            key("k3", "dup", KeyStatus::Active),
            key("k4", "dup", KeyStatus::Disabled),
        ];
        assert_eq!(find_key(&keys, "k1").unwrap().id, "k1");
        assert_eq!(find_key(&keys, "ci").unwrap().id, "k2");
        assert!(find_key(&keys, "dup").unwrap_err().to_string().contains("k3, k4"));
        assert!(find_key(&keys, "zzz").unwrap_err().to_string().starts_with("not found"));
    }

    #[test]
    fn only_given_limits_change() {
        let current = KeyLimits {
            requests_per_minute: 60,
            tokens_per_minute: 1000,
            max_concurrency: 4,
            daily_budget_micro_usd: 5_000_000,
            monthly_budget_micro_usd: 100_000_000,
        };
        let args = LimitArgs {
            rpm: Some(120),
            tpm: None,
            concurrency: None,
            daily_budget: Some(0),
            monthly_budget: None,
        };
        let new = apply_limits(current, &args);
        assert_eq!(
            new,
            KeyLimits {
                requests_per_minute: 120,
                daily_budget_micro_usd: 0,
                ..current
            }
        );
    }

    #[test]
    fn key_json_fields() {
        let mut k = key("k1", "ci", KeyStatus::Active);
        k.limits = Some(KeyLimits {
            daily_budget_micro_usd: 12_500_000,
            ..Default::default()
        });
        let obj = crate::output::json_object(COLUMNS, &k);
        assert_eq!(obj["status"], "active");
        assert_eq!(obj["expires_at"], serde_json::Value::Null);
        assert_eq!(obj["daily_budget_usd"].as_f64().unwrap(), 12.5);
        assert_eq!(obj["rpm"], 0);
        assert_eq!(obj["allowed_models"], serde_json::json!([]));
    }
}
