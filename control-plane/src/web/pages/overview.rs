//! Overview: requests, errors, tokens and cost over the last hour, day and week (totals, and
//! charts of the four per 5 minutes over the last hour (from the request log), per hour over the
//! last day or per day over the last week (from the usage buckets): `?window=hour|day|week`),
//! spend by key and by model, accounts by state, the subscription accounts' quota windows (5h/7d
//! utilization bars with their reset times), the data planes with their config version and last
//! contact, and the leader.

use crate::api::admin::AdminApi;
use crate::api::auth::Actor;
use crate::web::chart;
use crate::web::render::{ago, time, until, usd_pico};
use crate::web::routes::layout;
use crate::web::{now_ms, Console};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use minijinja::context;
use relay_proto::v1 as pb;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tonic::Status;

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;
const FIVE_MIN: i64 = 300_000;
/// Request-log pages (of [`PAGE`]) the last hour's chart reads at most.
const PAGES: usize = 10;
const PAGE: u32 = 1_000;

/// What the charts cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Window {
    Hour,
    Day,
    Week,
}

pub async fn show(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let op = match c.operator(&headers).await {
        Ok(op) => op,
        Err(r) => return r,
    };
    let window = match q.get("window").map(String::as_str) {
        None | Some("") | Some("day") => Window::Day,
        Some("hour") => Window::Hour,
        Some("week") => Window::Week,
        Some(other) => {
            return c.views.error(
                StatusCode::BAD_REQUEST,
                &format!("window: {other:?} is not hour, day or week"),
            )
        }
    };
    match gather(&c.api, &op.actor, window).await {
        Ok(data) => c.views.page(
            StatusCode::OK,
            "overview.html",
            context! { ..layout(&op, "/", "Overview"), ..data, ..context! { notice => super::notice(&c, &q) } },
        ),
        Err(s) => super::failed(&c, &s),
    }
}

fn tokens(r: &pb::UsageRow) -> u64 {
    r.input_tokens + r.output_tokens + r.cache_write_5m_tokens + r.cache_write_1h_tokens + r.cache_read_tokens
}

async fn usage(
    api: &AdminApi,
    who: &Actor,
    by: pb::UsageGroupBy,
    since: i64,
    bucket: pb::UsageBucket,
) -> Result<Vec<pb::UsageRow>, Status> {
    let req = pb::QueryUsageRequest {
        group_by: by as i32,
        since_ms: since,
        until_ms: 0,
        bucket: bucket as i32,
    };
    Ok(api.call(who, req).await?.rows)
}

/// The last hour's requests from the request log as usage rows per 5 minutes (requests, errors,
/// tokens, cost), and whether there were more than the pages read.
async fn last_hour(api: &AdminApi, who: &Actor, now: i64) -> Result<(Vec<pb::UsageRow>, bool), Status> {
    let mut per: BTreeMap<i64, pb::UsageRow> = BTreeMap::new();
    let mut cursor = String::new();
    for _ in 0..PAGES {
        let req = pb::ListRequestsRequest {
            filter: Some(pb::RequestFilter {
                since_ms: now - HOUR,
                ..Default::default()
            }),
            limit: PAGE,
            cursor: cursor.clone(),
        };
        let page = api.call(who, req).await?;
        for r in &page.records {
            let start = r.time_ms - r.time_ms.rem_euclid(FIVE_MIN);
            let row = per.entry(start).or_insert_with(|| pb::UsageRow {
                bucket_start_ms: start,
                ..Default::default()
            });
            row.requests += 1;
            row.errors += u64::from(r.outcome != "ok" && r.outcome != "cancelled");
            row.input_tokens += r.input_tokens;
            row.output_tokens += r.output_tokens;
            row.cache_write_5m_tokens += r.cache_write_5m_tokens;
            row.cache_write_1h_tokens += r.cache_write_1h_tokens;
            row.cache_read_tokens += r.cache_read_tokens;
            row.cost_pico_usd += r.cost_pico_usd;
        }
        cursor = page.next_cursor;
        if cursor.is_empty() {
            return Ok((per.into_values().collect(), false));
        }
    }
    Ok((per.into_values().collect(), true))
}

async fn gather(api: &AdminApi, who: &Actor, window: Window) -> Result<minijinja::Value, Status> {
    let now = now_ms();
    let mut totals = Vec::new();
    for (label, span) in [("Last hour", HOUR), ("Last day", DAY), ("Last week", 7 * DAY)] {
        let rows = usage(
            api,
            who,
            pb::UsageGroupBy::Unspecified,
            now - span,
            pb::UsageBucket::None,
        )
        .await?;
        let (mut req, mut err, mut tok, mut cost) = (0, 0, 0, 0);
        for r in &rows {
            req += r.requests;
            err += r.errors;
            tok += tokens(r);
            cost += r.cost_pico_usd;
        }
        totals.push(context! { label, requests => req, errors => err, tokens => tok, cost => usd_pico(cost) });
    }
    // Hourly over the last day, daily over the last week: the buckets the store has, zeros between.
    let hourly = usage(
        api,
        who,
        pb::UsageGroupBy::Unspecified,
        now - DAY,
        pb::UsageBucket::Hour,
    )
    .await?;
    let daily = usage(
        api,
        who,
        pb::UsageGroupBy::Unspecified,
        now - 7 * DAY,
        pb::UsageBucket::Day,
    )
    .await?;
    let series =
        |rows: &[pb::UsageRow], step: i64, n: i64, f: &dyn Fn(&pb::UsageRow) -> f64, label: &dyn Fn(i64) -> String| {
            let by: BTreeMap<i64, f64> = rows.iter().map(|r| (r.bucket_start_ms, f(r))).collect();
            let last = now - now.rem_euclid(step);
            (0..n)
                .rev()
                .map(|i| {
                    let start = last - i * step;
                    (label(start), by.get(&start).copied().unwrap_or(0.0))
                })
                .collect::<Vec<_>>()
        };
    let fmt = |ms: i64, f: &str| {
        chrono::DateTime::from_timestamp_millis(ms)
            .map(|t| t.format(f).to_string())
            .unwrap_or_default()
    };
    let hour_label = |ms: i64| fmt(ms, "%Hh");
    let day_label = |ms: i64| fmt(ms, "%m-%d");
    let count = |v: f64| format!("{v:.0}");
    let minute_label = |ms: i64| fmt(ms, "%H:%M");
    let (recent, more) = if window == Window::Hour {
        last_hour(api, who, now).await?
    } else {
        (Vec::new(), false)
    };
    let cap = format!("per 5 minutes, last hour (the newest {} requests)", PAGES as u32 * PAGE);
    let (rows, step, n, label, span): (&[pb::UsageRow], i64, i64, &dyn Fn(i64) -> String, &str) = match window {
        Window::Hour if more => (&recent, FIVE_MIN, 12, &minute_label, &cap),
        Window::Hour => (&recent, FIVE_MIN, 12, &minute_label, "per 5 minutes, last hour"),
        Window::Day => (&hourly, HOUR, 24, &hour_label, "per hour, last day"),
        Window::Week => (&daily, DAY, 7, &day_label, "per day, last week"),
    };
    let charts = vec![
        chart::bars(
            &format!("Requests {span}"),
            &series(rows, step, n, &|r| r.requests as f64, label),
            count,
        ),
        chart::bars(
            &format!("Errors {span}"),
            &series(rows, step, n, &|r| r.errors as f64, label),
            count,
        ),
        chart::bars(
            &format!("Tokens {span}"),
            &series(rows, step, n, &|r| tokens(r) as f64, label),
            count,
        ),
        chart::bars(
            &format!("Cost {span} (USD)"),
            &series(rows, step, n, &|r| r.cost_pico_usd as f64 / 1e12, label),
            |v| format!("${v:.4}"),
        ),
    ];
    let spend = |rows: Vec<pb::UsageRow>| {
        let mut rows: Vec<_> = rows
            .into_iter()
            .filter(|r| r.requests > 0 || r.cost_pico_usd > 0)
            .collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.cost_pico_usd));
        rows.iter()
            .map(|r| context! { name => r.group.clone(), requests => r.requests, tokens => tokens(r), cost => usd_pico(r.cost_pico_usd) })
            .collect::<Vec<_>>()
    };
    let by_key = spend(usage(api, who, pb::UsageGroupBy::Key, now - 7 * DAY, pb::UsageBucket::None).await?);
    let by_model = spend(usage(api, who, pb::UsageGroupBy::Model, now - 7 * DAY, pb::UsageBucket::None).await?);

    let accounts = api.call(who, pb::ListAccountsRequest {}).await?.accounts;
    let mut states: BTreeMap<String, u64> = BTreeMap::new();
    for a in &accounts {
        *states.entry(super::accounts::state_of(a, now).0).or_default() += 1;
    }
    let states: Vec<_> = states.into_iter().map(|(state, n)| context! { state, n }).collect();
    // Subscription accounts' quota windows, as the fleet last saw them.
    let quotas: Vec<_> = accounts
        .iter()
        .filter(|a| a.kind == pb::AccountKind::ClaudeOauth as i32)
        .map(|a| {
            let q = a.quota.clone().unwrap_or_default();
            let windows: Vec<_> = q
                .windows
                .iter()
                .map(|w| {
                    let pct = (w.utilization >= 0.0).then(|| (w.utilization * 100.0).round().min(100.0) as u32);
                    context! {
                        name => w.name.clone(), pct, status => w.status.clone(),
                        resets => if w.reset_ms > 0 { format!("resets {} ({})", until(w.reset_ms, now), time(w.reset_ms)) } else { String::new() },
                        high => pct.is_some_and(|p| p >= 80),
                    }
                })
                .collect();
            context! { name => a.name.clone(), windows, seen => ago(q.observed_ms, now), subscription => a.subscription_type.clone() }
        })
        .collect();

    let fleet = api.call(who, pb::ListProxiesRequest {}).await?;
    let version = |v: Option<&pb::ConfigVersion>| v.map(|v| format!("{}.{}", v.epoch, v.revision)).unwrap_or_default();
    let head = version(fleet.head.as_ref());
    let planes: Vec<_> = fleet
        .proxies
        .iter()
        .map(|p| {
            context! {
                node => p.node_id.clone(),
                version => version(p.acked.as_ref()),
                current => version(p.acked.as_ref()) == head,
                connected => p.connected,
                replica => p.replica.clone(),
                last_contact => ago(p.last_seen_ms, now),
                error => p.last_nack_error.clone(),
            }
        })
        .collect();
    let status = api.call(who, pb::GetStatusRequest {}).await?;
    let leader = status
        .current_leader
        .clone()
        .filter(|l| !l.is_empty())
        .or_else(|| status.leader.as_ref().map(|l| l.holder.clone()))
        .unwrap_or_else(|| "nobody".into());
    Ok(context! {
        totals, charts, by_key, by_model, states, planes, head, leader, quotas,
        window => match window { Window::Hour => "hour", Window::Day => "day", Window::Week => "week" },
        replica => status.replica,
        accounts_total => accounts.len(),
    })
}
