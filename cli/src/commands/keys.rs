//! `relayctl key ...`: client API keys.

use anyhow::Result;
use relay_proto::v1::{
    ApiKeyInfo, CreateApiKeyRequest, GetApiKeyRequest, GetApiKeyResponse, KeyLimits, KeyStatus, ListApiKeysRequest,
    LiveUse, RevokeApiKeyRequest, UpdateApiKeyRequest,
};

use super::{clean_list, limits as lim};
use crate::args::{KeyCmd, KeyCreate, KeyUpdate};
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

fn group_limits(r: &GetApiKeyResponse) -> KeyLimits {
    r.group_limits.unwrap_or_default()
}

fn key_limits(r: &GetApiKeyResponse) -> KeyLimits {
    r.info.as_ref().and_then(|i| i.limits).unwrap_or_default()
}

/// Live use of the rate limits, when the control plane reports it (from the fleet limiter).
fn live(l: Option<&LiveUse>) -> Value {
    l.map_or(Value::Null, |l| {
        Value::Text(format!(
            "{} requests and {} tokens in the last minute, {} in flight",
            l.requests_last_minute, l.tokens_last_minute, l.in_flight
        ))
    })
}

/// What `key show` adds to the key: the budgets' periods, what the key and its group have spent of
/// them (stored usage, as the data planes count it) and what is left.
pub const SPEND_COLUMNS: &[Column<GetApiKeyResponse>] = &[
    Column::new("day", "Today", |r| Value::text(&lim::of(r.spend.as_ref()).day)),
    Column::new("month", "This month", |r| Value::text(&lim::of(r.spend.as_ref()).month)),
    Column::new("spent_today_usd", "Spent today ($)", |r| {
        lim::spent(lim::of(r.spend.as_ref()).day_pico_usd)
    }),
    Column::new("remaining_today_usd", "Left today ($)", |r| {
        lim::remaining(
            key_limits(r).daily_budget_micro_usd,
            lim::of(r.spend.as_ref()).day_pico_usd,
        )
    }),
    Column::new("spent_this_month_usd", "Spent this month ($)", |r| {
        lim::spent(lim::of(r.spend.as_ref()).month_pico_usd)
    }),
    Column::new("remaining_this_month_usd", "Left this month ($)", |r| {
        lim::remaining(
            key_limits(r).monthly_budget_micro_usd,
            lim::of(r.spend.as_ref()).month_pico_usd,
        )
    }),
    Column::new("day_resets_at", "Day budget resets", |r| {
        Value::Time(lim::of(r.spend.as_ref()).day_resets_at_ms)
    }),
    Column::new("month_resets_at", "Month budget resets", |r| {
        Value::Time(lim::of(r.spend.as_ref()).month_resets_at_ms)
    }),
    Column::new("live_use", "Live use", |r| live(r.live.as_ref())),
    Column::new("group_limits", "Group limits", |r| {
        Value::Text(lim::summary(&group_limits(r)))
    }),
    Column::new("group_spent_today_usd", "Group spent today ($)", |r| {
        lim::spent(lim::of(r.group_spend.as_ref()).day_pico_usd)
    }),
    Column::new("group_remaining_today_usd", "Group left today ($)", |r| {
        lim::remaining(
            group_limits(r).daily_budget_micro_usd,
            lim::of(r.group_spend.as_ref()).day_pico_usd,
        )
    }),
    Column::new("group_spent_this_month_usd", "Group spent this month ($)", |r| {
        lim::spent(lim::of(r.group_spend.as_ref()).month_pico_usd)
    }),
    Column::new("group_remaining_this_month_usd", "Group left this month ($)", |r| {
        lim::remaining(
            group_limits(r).monthly_budget_micro_usd,
            lim::of(r.group_spend.as_ref()).month_pico_usd,
        )
    }),
    Column::new("group_live_use", "Group live use", |r| live(r.group_live.as_ref())),
];

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
            let shown = api.get_api_key(GetApiKeyRequest { key }).await.or_report(&server)?;
            let info = shown.info.clone().unwrap_or_default();
            out.pair(COLUMNS, &info, SPEND_COLUMNS, &shown)
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
                // The server resolves the key (id, name or unique id prefix) as every other
                // command does; the limits not given keep their current values.
                let shown = api
                    .get_api_key(GetApiKeyRequest { key: args.key.clone() })
                    .await
                    .or_report(&server)?;
                let current = shown.info.unwrap_or_default();
                req.key = current.id.clone();
                req.limits = Some(lim::apply(limits(&current), &args.limits));
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
        limits: Some(lim::apply(KeyLimits::default(), &args.limits)),
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
    fn show_adds_spend_and_what_is_left() {
        let mut info = key("k1", "ci", KeyStatus::Active);
        info.limits = Some(KeyLimits {
            daily_budget_micro_usd: 5_000_000,
            ..Default::default()
        });
        let shown = GetApiKeyResponse {
            info: Some(info.clone()),
            spend: Some(relay_proto::v1::BudgetSpend {
                day: "2026-12-04".into(),
                month: "2026-12".into(),
                day_pico_usd: 1_250_000_000_000,
                month_pico_usd: 7_000_000_000_000,
                day_resets_at_ms: 1_796_428_800_000,
                month_resets_at_ms: 1_798_761_600_000,
            }),
            group_limits: Some(KeyLimits {
                requests_per_minute: 600,
                ..Default::default()
            }),
            ..Default::default()
        };
        let text =
            crate::output::render_pair(crate::output::Format::Json, COLUMNS, &info, SPEND_COLUMNS, &shown).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["name"], "ci");
        assert_eq!(v["daily_budget_usd"].as_f64(), Some(5.0));
        assert_eq!(v["day"], "2026-12-04");
        assert_eq!(v["spent_today_usd"].as_f64(), Some(1.25));
        assert_eq!(v["remaining_today_usd"].as_f64(), Some(3.75));
        assert_eq!(v["spent_this_month_usd"].as_f64(), Some(7.0));
        assert_eq!(
            v["remaining_this_month_usd"],
            serde_json::Value::Null,
            "no monthly budget"
        );
        assert_eq!(v["day_resets_at"], "2026-12-05T00:00:00Z");
        assert_eq!(v["live_use"], serde_json::Value::Null, "not reported: not made up");
        assert_eq!(v["group_limits"], "600 rpm");
        let table =
            crate::output::render_pair(crate::output::Format::Table, COLUMNS, &info, SPEND_COLUMNS, &shown).unwrap();
        assert!(
            table.contains("Left today ($)") && table.contains("3.750000"),
            "{table}"
        );
        assert!(
            table.contains("Left this month ($)") && table.contains("unlimited"),
            "{table}"
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
