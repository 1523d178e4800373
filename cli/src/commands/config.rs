//! `relayctl group|pricing|settings ...`: groups, prices and settings.

use anyhow::{anyhow, Result};
use relay_proto::v1::{
    CreateGroupRequest, DeleteGroupRequest, DeletePriceRequest, GroupInfo, GroupState, KeyLimits, ListGroupsRequest,
    ListPricesRequest, ListSettingsRequest, ListSettingsResponse, Price, SetGroupStateRequest, SetPriceRequest,
    SetSettingRequest, SettingInfo, UnsetSettingRequest, UpdateGroupRequest,
};

use super::{clean_list, limits as lim, Deleted};
use crate::args::{GroupCmd, GroupUpdate, PriceRm, PriceSet, PricingCmd, SettingsCmd};
use crate::client::{Conn, RpcResult};
use crate::output::{Column, Format, Output, Value};
use crate::parse::default_cache_prices;

fn group_limits(g: &GroupInfo) -> KeyLimits {
    g.limits.unwrap_or_default()
}

/// A group's limits are the total across its keys: compact in tables, each one in JSON and CSV.
const GROUP_COLUMNS: &[Column<GroupInfo>] = &[
    Column::new("name", "Name", |g| Value::text(&g.name)),
    Column::new("id", "ID", |g| Value::Id(g.id.clone())),
    Column::new("description", "Description", |g| Value::text(&g.description)),
    Column::new("account_count", "Accounts", |g| Value::UInt(u64::from(g.account_count))),
    Column::new("key_count", "Keys", |g| Value::UInt(u64::from(g.key_count))),
    Column::new("limits", "Limits (all keys)", |g| {
        Value::Text(lim::summary(&group_limits(g)))
    }),
    Column::detail("rpm", "RPM", |g| {
        Value::limit(u64::from(group_limits(g).requests_per_minute))
    }),
    Column::detail("tpm", "TPM", |g| Value::limit(group_limits(g).tokens_per_minute)),
    Column::detail("concurrency", "Concurrency", |g| {
        Value::limit(u64::from(group_limits(g).max_concurrency))
    }),
    Column::detail("daily_budget_usd", "Daily budget ($)", |g| {
        Value::budget(group_limits(g).daily_budget_micro_usd)
    }),
    Column::detail("monthly_budget_usd", "Monthly budget ($)", |g| {
        Value::budget(group_limits(g).monthly_budget_micro_usd)
    }),
    Column::new("fallbacks", "Fallbacks", |g| Value::list(&g.fallbacks, "-")),
    Column::detail("fallback_of", "Fallback of", |g| Value::list(&g.fallback_of, "-")),
    Column::new("state", "State", |g| Value::text(group_state(g.state))),
    Column::new("state_since", "Since", |g| Value::Time(g.state_since_ms)),
    Column::detail("state_by", "By", |g| Value::opt_text(&g.state_by)),
];

/// How `group list` names a state.
fn group_state(s: i32) -> &'static str {
    match GroupState::try_from(s) {
        Ok(GroupState::Active) => "active",
        Ok(GroupState::Paused) => "paused",
        Ok(GroupState::Activated) => "activated",
        Err(_) => "unknown",
    }
}

/// A group by id, else by name.
fn find_group<'a>(groups: &'a [GroupInfo], wanted: &str) -> Result<&'a GroupInfo> {
    groups
        .iter()
        .find(|g| g.id == wanted)
        .or_else(|| groups.iter().find(|g| g.name == wanted))
        .ok_or_else(|| anyhow!("not found: group {wanted:?}"))
}

/// The update without limits (those need the group's current values). `--fallback ''` and
/// `--no-fallback` clear the fallbacks.
fn group_update_request(args: &GroupUpdate) -> UpdateGroupRequest {
    let fallbacks = match (&args.fallbacks, args.no_fallback) {
        (_, true) => Some(Vec::new()),
        (Some(f), false) => Some(clean_list(f)),
        (None, false) => None,
    };
    UpdateGroupRequest {
        group: args.group.clone(),
        name: args.name.clone(),
        description: args.description.clone(),
        limits: None,
        set_fallbacks: fallbacks.is_some(),
        fallbacks: fallbacks.unwrap_or_default(),
    }
}

pub async fn group(conn: &mut Conn, out: Output, cmd: GroupCmd) -> Result<()> {
    let server = conn.server.clone();
    let api = &mut conn.api;
    match cmd {
        GroupCmd::Create(args) => {
            let req = CreateGroupRequest {
                name: args.name,
                description: args.description,
                limits: Some(lim::apply(KeyLimits::default(), &args.limits)),
                fallbacks: clean_list(&args.fallbacks),
            };
            let info = api.create_group(req).await.or_report(&server)?;
            out.one(GROUP_COLUMNS, &info)
        }
        GroupCmd::List => {
            let list = api.list_groups(ListGroupsRequest {}).await.or_report(&server)?;
            out.list(GROUP_COLUMNS, &list.groups)
        }
        GroupCmd::Show { group } => {
            let list = api.list_groups(ListGroupsRequest {}).await.or_report(&server)?;
            out.one(GROUP_COLUMNS, find_group(&list.groups, &group)?)
        }
        GroupCmd::Update(args) => {
            let mut req = group_update_request(&args);
            if args.limits.any() {
                let list = api.list_groups(ListGroupsRequest {}).await.or_report(&server)?;
                let current = find_group(&list.groups, &args.group)?;
                req.group = current.id.clone();
                req.limits = Some(lim::apply(group_limits(current), &args.limits));
            }
            let info = api.update_group(req).await.or_report(&server)?;
            out.one(GROUP_COLUMNS, &info)
        }
        GroupCmd::Rm { group } => {
            let resp = api
                .delete_group(DeleteGroupRequest { group: group.clone() })
                .await
                .or_report(&server)?;
            Deleted {
                kind: "group",
                target: group,
                version: resp.version,
            }
            .print(out, "deleted")
        }
        GroupCmd::Pause { group } => set_group_state(api, &server, out, group, GroupState::Paused).await,
        GroupCmd::Resume { group } => set_group_state(api, &server, out, group, GroupState::Active).await,
        GroupCmd::Activate { group } => set_group_state(api, &server, out, group, GroupState::Activated).await,
    }
}

async fn set_group_state(
    api: &mut crate::client::Api,
    server: &str,
    out: Output,
    group: String,
    state: GroupState,
) -> Result<()> {
    let info = api
        .set_group_state(SetGroupStateRequest {
            group,
            state: state as i32,
        })
        .await
        .or_report(server)?;
    out.one(GROUP_COLUMNS, &info)
}

/// Prices are USD per million tokens (exact decimals in JSON).
const PRICE_COLUMNS: &[Column<Price>] = &[
    Column::new("model_pattern", "Model", |p| Value::text(&p.model_pattern)),
    Column::new("input", "Input $/MTok", |p| Value::usd(p.input)),
    Column::new("output", "Output $/MTok", |p| Value::usd(p.output)),
    Column::new("cache_write_5m", "Cache write 5m", |p| Value::usd(p.cache_write_5m)),
    Column::new("cache_write_1h", "Cache write 1h", |p| Value::usd(p.cache_write_1h)),
    Column::new("cache_read", "Cache read", |p| Value::usd(p.cache_read)),
    Column::new("effective_from", "Effective from", |p| Value::Time(p.effective_from_ms)),
    Column::new("source", "Source", |p| Value::text(&p.source)),
    Column::detail("id", "ID", |p| Value::text(&p.id)),
];

fn price_request(args: PriceSet) -> Result<SetPriceRequest> {
    let (w5m, w1h, read) = default_cache_prices(args.input_price).map_err(|e| anyhow!(e))?;
    Ok(SetPriceRequest {
        model_pattern: args.model_pattern,
        effective_from_ms: args.effective_from.unwrap_or(0),
        input: args.input_price,
        output: args.output_price,
        cache_write_5m: args.cache_write_5m_price.unwrap_or(w5m),
        cache_write_1h: args.cache_write_1h_price.unwrap_or(w1h),
        cache_read: args.cache_read_price.unwrap_or(read),
    })
}

fn price_rm_request(args: &PriceRm) -> DeletePriceRequest {
    DeletePriceRequest {
        model_pattern: args.model_pattern.clone(),
        effective_from_ms: args.effective_from.unwrap_or(0),
    }
}

/// What `pricing rm` says it removed: the pattern and each effective date.
fn removed_text(pattern: &str, removed: &[Price], version: Option<&relay_proto::v1::ConfigVersion>) -> String {
    let dates: Vec<String> = removed
        .iter()
        .map(|p| match p.effective_from_ms {
            0 => "always".to_string(),
            ms => chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
                .map_or_else(|| ms.to_string(), |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string()),
        })
        .collect();
    let n = removed.len();
    let version = super::version_string(version)
        .map(|v| format!(" (config version {v})"))
        .unwrap_or_default();
    format!(
        "removed {n} price{} of {pattern:?}, effective from {}{version}; usage already recorded keeps its cost",
        if n == 1 { "" } else { "s" },
        dates.join(", ")
    )
}

pub async fn pricing(conn: &mut Conn, out: Output, cmd: PricingCmd) -> Result<()> {
    let server = conn.server.clone();
    let api = &mut conn.api;
    match cmd {
        PricingCmd::List => {
            let list = api.list_prices(ListPricesRequest {}).await.or_report(&server)?;
            out.list(PRICE_COLUMNS, &list.prices)
        }
        PricingCmd::Set(args) => {
            let price = api.set_price(price_request(args)?).await.or_report(&server)?;
            out.one(PRICE_COLUMNS, &price)
        }
        PricingCmd::Rm(args) => {
            let resp = api.delete_price(price_rm_request(&args)).await.or_report(&server)?;
            let text = removed_text(&args.model_pattern, &resp.removed, resp.version.as_ref());
            match out.format {
                Format::Table | Format::Wide => {
                    println!("{text}");
                    Ok(())
                }
                _ => out.list(PRICE_COLUMNS, &resp.removed),
            }
        }
    }
}

/// Every setting with its value in force and its default (`-o json` keeps the types).
const SETTING_COLUMNS: &[Column<SettingInfo>] = &[
    Column::new("name", "Name", |s| Value::text(&s.name)),
    Column::new("value", "Value", |s| Value::opt_text(&s.value)),
    // In wide and `settings show`: `Set` says whether the value is the default, and the
    // defaults' URLs would not fit a 100-column table beside the values.
    Column::detail("default", "Default", |s| Value::opt_text(&s.default_value)),
    Column::new("set", "Set", |s| Value::Bool(s.set)),
    Column::new("type", "Type", |s| Value::opt_text(&s.r#type)),
    Column::detail("range", "Range", |s| Value::opt_text(&s.range)),
    Column::detail("per_account", "Per account", |s| Value::Bool(s.per_account)),
    Column::detail("description", "Description", |s| Value::opt_text(&s.description)),
];

/// The row for `name` after a change (account overrides are stored by id).
fn row_for(list: &ListSettingsResponse, name: &str) -> Option<SettingInfo> {
    list.settings
        .iter()
        .find(|s| s.name == name)
        .or_else(|| {
            let suffix = name.rsplit_once('.').map(|(_, n)| n)?;
            list.settings
                .iter()
                .rev()
                .find(|s| s.name.starts_with("account.") && s.name.ends_with(suffix))
        })
        .cloned()
}

pub async fn settings(conn: &mut Conn, out: Output, cmd: SettingsCmd) -> Result<()> {
    let server = conn.server.clone();
    let api = &mut conn.api;
    match cmd {
        SettingsCmd::List => {
            let list = api.list_settings(ListSettingsRequest {}).await.or_report(&server)?;
            out.list(SETTING_COLUMNS, &list.settings)
        }
        SettingsCmd::Show { name } => {
            let list = api.list_settings(ListSettingsRequest {}).await.or_report(&server)?;
            let row = row_for(&list, &name)
                .ok_or_else(|| anyhow!("no setting {name:?}; `relayctl settings list` shows them all"))?;
            out.one(SETTING_COLUMNS, &row)
        }
        SettingsCmd::Set { name, value } => {
            let req = SetSettingRequest {
                name: name.clone(),
                value: value.clone(),
            };
            let list = api.set_setting(req).await.or_report(&server)?;
            let row = row_for(&list, &name).unwrap_or_else(|| SettingInfo {
                name: name.clone(),
                value: value.clone(),
                set: true,
                ..Default::default()
            });
            let text = format!("{name} = {}", row.value);
            out.one_or_text(SETTING_COLUMNS, &row, &text)
        }
        SettingsCmd::Unset { name } => {
            let list = api
                .unset_setting(UnsetSettingRequest { name: name.clone() })
                .await
                .or_report(&server)?;
            let text = match list.settings.iter().find(|s| s.name == name) {
                Some(s) if s.default_value.is_empty() && name == "models" => {
                    format!("{name} unset: back to the default (the built-in model list)")
                }
                Some(s) if s.default_value.is_empty() => format!("{name} unset: back to the default (none)"),
                Some(s) => format!("{name} unset: back to the default {}", s.default_value),
                None => format!("{name} unset"),
            };
            let row = list
                .settings
                .iter()
                .find(|s| s.name == name)
                .cloned()
                .unwrap_or(SettingInfo {
                    name,
                    ..Default::default()
                });
            out.one_or_text(SETTING_COLUMNS, &row, &text)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn set(args: &[&str]) -> SetPriceRequest {
        use clap::Parser;
        let cli = crate::args::Cli::try_parse_from(["relayctl", "pricing", "set"].iter().chain(args)).unwrap();
        let crate::args::Command::Pricing(PricingCmd::Set(p)) = cli.command else {
            unreachable!()
        };
        price_request(p).unwrap()
    }

    #[test]
    fn cache_prices_default_from_input() {
        let r = set(&["claude-sonnet-4*", "--input-price", "3", "--output-price", "15"]);
        assert_eq!((r.input, r.output), (3_000_000, 15_000_000));
        assert_eq!(
            (r.cache_write_5m, r.cache_write_1h, r.cache_read),
            (3_750_000, 6_000_000, 300_000)
        );
        assert_eq!(r.effective_from_ms, 0);
        let r = set(&[
            "m",
            "--input-price",
            "15",
            "--output-price",
            "75",
            "--cache-write-5m-price",
            "18.75",
            "--cache-read-price",
            "1.5",
            "--effective-from",
            "2025-01-01T00:00:00Z",
        ]);
        assert_eq!(
            (r.cache_write_5m, r.cache_write_1h, r.cache_read),
            (18_750_000, 30_000_000, 1_500_000)
        );
        assert_eq!(r.effective_from_ms, 1_735_689_600_000);
    }

    #[test]
    fn pricing_rm_says_what_it_removed() {
        let rm = PriceRm {
            model_pattern: "m*".into(),
            effective_from: Some(1_735_689_600_000),
        };
        assert_eq!(price_rm_request(&rm).effective_from_ms, 1_735_689_600_000);
        let removed = [
            Price {
                effective_from_ms: 1_735_689_600_000,
                ..Default::default()
            },
            Price {
                effective_from_ms: 1_738_368_000_000,
                ..Default::default()
            },
        ];
        let v = relay_proto::v1::ConfigVersion::new(3, 141);
        assert_eq!(
            removed_text("m*", &removed, Some(&v)),
            "removed 2 prices of \"m*\", effective from 2025-01-01 00:00:00 UTC, 2025-02-01 00:00:00 UTC \
             (config version 3:141); usage already recorded keeps its cost"
        );
        assert!(removed_text("m", &removed[..1], None).starts_with("removed 1 price of \"m\", effective"));
    }

    #[test]
    fn price_json_is_usd_per_mtok() {
        let p = Price {
            model_pattern: "m".into(),
            input: 3_000_000,
            cache_read: 300_000,
            ..Default::default()
        };
        let obj = crate::output::json_object(PRICE_COLUMNS, &p);
        assert_eq!(obj["input"].as_f64().unwrap(), 3.0);
        assert_eq!(obj["cache_read"].as_f64().unwrap(), 0.3);
        assert_eq!(obj["effective_from"], serde_json::Value::Null);
    }
}
