//! Usage: the reports of `relayctl usage` (grouped by key, account or model or one total, over a
//! time range, in hourly or daily buckets or not), as a table and an SVG chart, and downloadable
//! as CSV or JSON (`/usage/export?format=csv|json&…`, the same columns as `relayctl usage -o`).

use crate::web::chart;
use crate::web::render::{parse_when, time, usd_pico};
use crate::web::routes::layout;
use crate::web::{now_ms, Console};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use minijinja::context;
use relay_proto::v1 as pb;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

type Q = HashMap<String, String>;

/// Bars the chart shows at most (the largest when grouped, the newest when bucketed).
const CHART_BARS: usize = 48;

fn q<'a>(q: &'a Q, name: &str) -> &'a str {
    q.get(name).map(|s| s.trim()).unwrap_or("")
}

/// The report's query from the page's, and the name of its grouping ("" for one total).
fn request_of(query: &Q, now: i64) -> Result<(pb::QueryUsageRequest, &'static str, bool), String> {
    let (by, name) = match q(query, "by") {
        "" | "total" => (pb::UsageGroupBy::Unspecified, ""),
        "key" => (pb::UsageGroupBy::Key, "key"),
        "account" => (pb::UsageGroupBy::Account, "account"),
        "model" => (pb::UsageGroupBy::Model, "model"),
        v => return Err(format!("by: {v:?} is not key, account, model or total")),
    };
    let bucket = match q(query, "bucket") {
        "" | "none" => pb::UsageBucket::None,
        "hour" => pb::UsageBucket::Hour,
        "day" => pb::UsageBucket::Day,
        v => return Err(format!("bucket: {v:?} is not hour, day or none")),
    };
    let since = parse_when(q(query, "since"), now).map_err(|e| format!("since: {e}"))?;
    let until = parse_when(q(query, "until"), now).map_err(|e| format!("until: {e}"))?;
    if let (Some(s), Some(u)) = (since, until) {
        if s >= u {
            return Err("since must be earlier than until".into());
        }
    }
    Ok((
        pb::QueryUsageRequest {
            group_by: by as i32,
            since_ms: since.unwrap_or(0),
            until_ms: until.unwrap_or(0),
            bucket: bucket as i32,
        },
        name,
        bucket != pb::UsageBucket::None,
    ))
}

fn tokens(r: &pb::UsageRow) -> u64 {
    r.input_tokens + r.output_tokens + r.cache_write_5m_tokens + r.cache_write_1h_tokens + r.cache_read_tokens
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

fn cost_usd(pico: u64) -> String {
    format!("{:.6}", pico as f64 / 1e12)
}

/// One row as the downloads give it: (column, value) in `relayctl usage -o csv|json`'s order.
fn export_row(r: &pb::UsageRow, by: &str, bucketed: bool) -> Vec<(String, serde_json::Value)> {
    let mut out: Vec<(String, serde_json::Value)> = Vec::new();
    if bucketed {
        out.push(("bucket_start".into(), rfc3339(r.bucket_start_ms).into()));
    }
    if !by.is_empty() {
        out.push((by.to_string(), r.group.clone().into()));
        if by != "model" {
            out.push((format!("{by}_id"), r.group_id.clone().into()));
        }
    }
    for (k, v) in [
        ("requests", r.requests),
        ("input_tokens", r.input_tokens),
        ("output_tokens", r.output_tokens),
        ("cache_write_5m_tokens", r.cache_write_5m_tokens),
        ("cache_write_1h_tokens", r.cache_write_1h_tokens),
        ("cache_read_tokens", r.cache_read_tokens),
        ("errors", r.errors),
        ("anomalies", r.anomalies),
    ] {
        out.push((k.into(), v.into()));
    }
    out.push(("cost_usd".into(), cost_usd(r.cost_pico_usd).into()));
    out.push(("cost_pico_usd".into(), r.cost_pico_usd.into()));
    out
}

/// One CSV field. A text starting like a spreadsheet formula (`=`, `+`, `-`, `@`, tab, CR: a model
/// name is whatever a client sent) gets a leading `'`, so a spreadsheet opening the download shows
/// it as text and never runs it.
fn csv_field(v: &serde_json::Value) -> String {
    let s = match v {
        serde_json::Value::String(s) if s.starts_with(['=', '+', '-', '@', '\t', '\r']) => format!("'{s}"),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// The report as CSV (a header line, then one line per row).
pub(crate) fn csv(rows: &[pb::UsageRow], by: &str, bucketed: bool) -> String {
    let header = export_row(&pb::UsageRow::default(), by, bucketed)
        .into_iter()
        .map(|(k, _)| k)
        .collect::<Vec<_>>()
        .join(",");
    let mut out = header + "\n";
    for r in rows {
        let line: Vec<String> = export_row(r, by, bucketed).iter().map(|(_, v)| csv_field(v)).collect();
        out.push_str(&line.join(","));
        out.push('\n');
    }
    out
}

fn json(rows: &[pb::UsageRow], by: &str, bucketed: bool) -> String {
    let list: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| serde_json::Value::Object(export_row(r, by, bucketed).into_iter().collect()))
        .collect();
    serde_json::to_string_pretty(&list).unwrap_or_default()
}

pub async fn show(State(c): State<Arc<Console>>, headers: HeaderMap, Query(query): Query<Q>) -> Response {
    let op = match c.operator(&headers).await {
        Ok(op) => op,
        Err(r) => return r,
    };
    let (req, by, bucketed) = match request_of(&query, now_ms()) {
        Ok(r) => r,
        Err(e) => return c.views.error(StatusCode::BAD_REQUEST, &e),
    };
    let rows = match c.api.call(&op.actor, req).await {
        Ok(r) => r.rows,
        Err(s) => return super::failed(&c, &s),
    };
    // The chart: cost per bucket (summed over the grouping) when bucketed, else cost per row.
    let points: Vec<(String, f64)> = if bucketed {
        let mut per: BTreeMap<i64, u64> = BTreeMap::new();
        for r in &rows {
            *per.entry(r.bucket_start_ms).or_default() += r.cost_pico_usd;
        }
        let fmt = if q(&query, "bucket") == "hour" {
            "%m-%d %Hh"
        } else {
            "%Y-%m-%d"
        };
        let all: Vec<(String, f64)> = per
            .into_iter()
            .map(|(at, v)| {
                let label = chrono::DateTime::from_timestamp_millis(at)
                    .map(|t| t.format(fmt).to_string())
                    .unwrap_or_default();
                (label, v as f64 / 1e12)
            })
            .collect();
        all[all.len().saturating_sub(CHART_BARS)..].to_vec()
    } else {
        let mut all: Vec<(String, f64)> = rows
            .iter()
            .map(|r| {
                let name = if r.group.is_empty() {
                    "total".to_string()
                } else {
                    r.group.clone()
                };
                (name, r.cost_pico_usd as f64 / 1e12)
            })
            .collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1));
        all.truncate(CHART_BARS);
        all
    };
    let svg = chart::bars(
        if bucketed {
            "Cost per bucket (USD)"
        } else {
            "Cost (USD)"
        },
        &points,
        |v| format!("${v:.4}"),
    );
    let table: Vec<_> = rows
        .iter()
        .map(|r| {
            context! {
                bucket => if bucketed { time(r.bucket_start_ms) } else { String::new() },
                name => r.group.clone(),
                requests => r.requests, input => r.input_tokens, output => r.output_tokens,
                cache_write => r.cache_write_5m_tokens + r.cache_write_1h_tokens, cache_read => r.cache_read_tokens,
                tokens => tokens(r), errors => r.errors, anomalies => r.anomalies,
                cost => usd_pico(r.cost_pico_usd),
            }
        })
        .collect();
    let fq: String = ["by", "bucket", "since", "until"]
        .iter()
        .filter(|f| !q(&query, f).is_empty())
        .map(|f| format!("&{f}={}", super::url_encode(q(&query, f))))
        .collect();
    let f: HashMap<&str, &str> = ["by", "bucket", "since", "until"]
        .iter()
        .map(|k| (*k, q(&query, k)))
        .collect();
    c.views.page(
        StatusCode::OK,
        "usage.html",
        context! { ..layout(&op, "/usage", "Usage"), ..context! {
            rows => table, by, bucketed, chart => svg, f,
            csv => format!("/usage/export?format=csv{fq}"),
            json => format!("/usage/export?format=json{fq}"),
        } },
    )
}

/// The report as a CSV or JSON download.
pub async fn export(State(c): State<Arc<Console>>, headers: HeaderMap, Query(query): Query<Q>) -> Response {
    let op = match c.operator(&headers).await {
        Ok(op) => op,
        Err(r) => return r,
    };
    let (req, by, bucketed) = match request_of(&query, now_ms()) {
        Ok(r) => r,
        Err(e) => return c.views.error(StatusCode::BAD_REQUEST, &e),
    };
    let format = q(&query, "format");
    if format != "csv" && format != "json" {
        return c.views.error(
            StatusCode::BAD_REQUEST,
            &format!("format: {format:?} is not csv or json"),
        );
    }
    let rows = match c.api.call(&op.actor, req).await {
        Ok(r) => r.rows,
        Err(s) => return super::failed(&c, &s),
    };
    let (body, ctype) = if format == "csv" {
        (csv(&rows, by, bucketed), "text/csv; charset=utf-8")
    } else {
        (json(&rows, by, bucketed), "application/json")
    };
    let mut res = body.into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    let disposition = format!("attachment; filename=\"relay-usage.{format}\"");
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    res
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn csv_has_relayctls_columns_and_quotes_what_needs_it() {
        let rows = vec![pb::UsageRow {
            group: "a,\"b\"".into(),
            group_id: "id1".into(),
            requests: 3,
            cost_pico_usd: 1_500_000_000_000,
            bucket_start_ms: 86_400_000,
            ..Default::default()
        }];
        let out = csv(&rows, "key", true);
        let mut lines = out.lines();
        assert_eq!(
            lines.next().unwrap(),
            "bucket_start,key,key_id,requests,input_tokens,output_tokens,cache_write_5m_tokens,\
             cache_write_1h_tokens,cache_read_tokens,errors,anomalies,cost_usd,cost_pico_usd"
        );
        assert_eq!(
            lines.next().unwrap(),
            "1970-01-02T00:00:00Z,\"a,\"\"b\"\"\",id1,3,0,0,0,0,0,0,0,1.500000,1500000000000"
        );
        assert!(csv(&[], "", false).starts_with("requests,"));
        // A client-chosen name that a spreadsheet would run as a formula stays text.
        let hostile = vec![pb::UsageRow {
            group: "=HYPERLINK(\"http://evil.example\",\"x\")".into(),
            ..Default::default()
        }];
        let out = csv(&hostile, "model", false);
        assert!(
            out.lines()
                .nth(1)
                .unwrap()
                .starts_with("\"'=HYPERLINK(\"\"http://evil.example\"\""),
            "{out}"
        );
        let out = csv(
            &[pb::UsageRow {
                group: "@SUM(A1)".into(),
                ..Default::default()
            }],
            "model",
            false,
        );
        assert!(out.lines().nth(1).unwrap().starts_with("'@SUM(A1),"), "{out}");
        let q: Q = [("by".to_string(), "team".to_string())].into_iter().collect();
        assert!(request_of(&q, 0).is_err());
        let q: Q = [("since", "1h"), ("until", "2h")]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        assert!(request_of(&q, 10_000_000).unwrap_err().contains("earlier"));
    }
}
