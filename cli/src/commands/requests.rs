//! `relayctl requests list|show|stats|tail|export|clear`: the request log (and captured bodies).

use anyhow::{anyhow, Result};
use relay_proto::v1::{
    ClearRequestsRequest, GetRequestRequest, ListRequestsRequest, RequestAttempt, RequestFilter, RequestRecord,
    RequestStatsRequest, RequestStatsRow, TailRequestsRequest,
};
use serde_json::json;

use crate::args::{RequestFilterArgs, RequestsCmd};
use crate::client::{status_error, Conn, RpcResult};
use crate::output::{json_object, Column, Format, Output, Value};
use crate::parse::format_cost;

pub async fn run(conn: &mut Conn, out: Output, cmd: RequestsCmd) -> Result<()> {
    match cmd {
        RequestsCmd::List {
            filter,
            limit,
            cursor,
            all,
        } => list(conn, out, &filter, limit, cursor, all).await,
        RequestsCmd::Show { id } => {
            let r = conn
                .api
                .get_request(GetRequestRequest { id })
                .await
                .or_report(&conn.server)?;
            show(out, &r)
        }
        RequestsCmd::Stats { filter } => {
            let resp = conn
                .api
                .request_stats(RequestStatsRequest {
                    filter: Some(to_filter(&filter)?),
                })
                .await
                .or_report(&conn.server)?;
            let mut rows = Vec::new();
            let nothing = resp.total.as_ref().is_none_or(|t| t.requests == 0);
            if let Some(t) = resp.total {
                rows.push(("total", t));
            }
            rows.extend(resp.by_model.into_iter().map(|r| ("model", r)));
            rows.extend(resp.by_key.into_iter().map(|r| ("key", r)));
            rows.extend(resp.by_account.into_iter().map(|r| ("account", r)));
            if resp.truncated {
                eprintln!("note: the statistics cover the newest records only (the scan bound was reached); narrow --since/--until");
            }
            if nothing {
                if let Some(note) = unknown_status_note(filter.status.as_deref()) {
                    eprintln!("{note}");
                }
            }
            out.list(STATS_COLUMNS, &rows)
        }
        RequestsCmd::Tail { filter } => tail(conn, out, &filter).await,
        RequestsCmd::Export {
            filter,
            with_bodies,
            gzip,
            zstd,
        } => export(conn, out, &filter, with_bodies, gzip, zstd).await,
        RequestsCmd::Clear { filter, yes } => clear(conn, out, &filter, yes).await,
    }
}

/// The error types records carry: the Anthropic API's and relay's own outcomes.
pub const KNOWN_OUTCOMES: &[&str] = &[
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "not_found_error",
    "request_too_large",
    "rate_limit_error",
    "api_error",
    "overloaded_error",
    "billing_error",
    "timeout_error",
    "invalid_upstream_response",
    "cancelled",
];

/// What to tell an operator whose `--status` names an error type neither the Anthropic API nor
/// relay uses (a typo, most likely): it is not refused, since a compatible upstream may name
/// its own types and records keep them, but a filter that matched nothing says why it may have.
pub fn unknown_status_note(status: Option<&str>) -> Option<String> {
    let s = status?.trim();
    let plain = s.is_empty()
        || matches!(s, "ok" | "error" | "errors")
        || s.parse::<u32>().is_ok()
        || (s.len() == 3 && s.ends_with("xx"))
        || s.starts_with("http_")
        || KNOWN_OUTCOMES.contains(&s);
    (!plain).then(|| {
        format!(
            "note: --status {s:?} is not an error type the Anthropic API or relay uses ({}); it keeps only records \
             whose outcome is exactly {s:?} (an upstream may name its own). --status also takes ok, error, an HTTP \
             status (429) or a class (5xx).",
            KNOWN_OUTCOMES.join(", ")
        )
    })
}

/// The filter flags as the control plane takes them.
pub fn to_filter(f: &RequestFilterArgs) -> Result<RequestFilter> {
    if let (Some(since), Some(until)) = (f.since, f.until) {
        if since >= until {
            return Err(anyhow!("--since must be earlier than --until"));
        }
    }
    Ok(RequestFilter {
        since_ms: f.since.unwrap_or(0),
        until_ms: f.until.unwrap_or(0),
        key: f.key.clone().unwrap_or_default(),
        group: f.group.clone().unwrap_or_default(),
        account: f.account.clone().unwrap_or_default(),
        model: f.model.clone().unwrap_or_default(),
        model_requested: f.model_requested.clone().unwrap_or_default(),
        status: f.status.clone().unwrap_or_default(),
        stream: if f.stream {
            Some(true)
        } else if f.no_stream {
            Some(false)
        } else {
            None
        },
        min_duration_ms: f.min_duration.unwrap_or(0),
    })
}

async fn list(
    conn: &mut Conn,
    out: Output,
    filter: &RequestFilterArgs,
    limit: u32,
    cursor: Option<String>,
    all: bool,
) -> Result<()> {
    let filter = to_filter(filter)?;
    let mut records = Vec::new();
    let mut cursor = cursor.unwrap_or_default();
    loop {
        let resp = conn
            .api
            .list_requests(ListRequestsRequest {
                filter: Some(filter.clone()),
                limit,
                cursor: cursor.clone(),
            })
            .await
            .or_report(&conn.server)?;
        records.extend(resp.records);
        cursor = resp.next_cursor;
        if !all || cursor.is_empty() {
            break;
        }
    }
    out.list(RECORD_COLUMNS, &records)?;
    if !cursor.is_empty() {
        eprintln!("more: add --cursor {cursor}");
    }
    if records.is_empty() {
        if let Some(note) = unknown_status_note(Some(filter.status.as_str())) {
            eprintln!("{note}");
        }
    }
    Ok(())
}

fn tokens(r: &RequestRecord) -> u64 {
    r.input_tokens
        .saturating_add(r.output_tokens)
        .saturating_add(r.cache_write_5m_tokens)
        .saturating_add(r.cache_write_1h_tokens)
        .saturating_add(r.cache_read_tokens)
}

fn attempts_json(r: &RequestRecord) -> serde_json::Value {
    serde_json::Value::Array(r.attempts.iter().map(attempt_json).collect())
}

fn attempt_json(a: &RequestAttempt) -> serde_json::Value {
    json!({
        "event_id": a.event_id,
        "time": crate::parse::format_time(a.time_ms),
        "account": a.account,
        "account_id": a.account_id,
        "node": a.node_id,
        "model": a.model,
        "status": a.status,
        "outcome": a.outcome,
        "latency_ms": a.latency_ms,
        "ttfb_ms": a.ttfb_ms,
        "queue_wait_ms": a.queue_wait_ms,
        "waited_for": a.waited_for,
        "upstream_request_id": a.upstream_request_id,
        "input_tokens": a.input_tokens,
        "output_tokens": a.output_tokens,
        "cache_write_5m_tokens": a.cache_write_5m_tokens,
        "cache_write_1h_tokens": a.cache_write_1h_tokens,
        "cache_read_tokens": a.cache_read_tokens,
        "cost_usd": format_cost(a.cost_pico_usd).parse::<serde_json::Number>().ok(),
        "anomaly": a.anomaly,
        "stream_events": a.stream_events,
        "max_event_gap_ms": a.max_event_gap_ms,
        "error_message": a.error_message,
    })
}

/// "acct-a:overloaded_error → acct-b:ok" ("no upstream: <outcome>" without attempts).
fn attempts_text(r: &RequestRecord) -> String {
    if r.attempts.is_empty() {
        return format!("no upstream: {}", r.outcome);
    }
    r.attempts
        .iter()
        .map(|a| format!("{}:{}", a.account, a.outcome))
        .collect::<Vec<_>>()
        .join(" → ")
}

const RECORD_COLUMNS: &[Column<RequestRecord>] = &[
    // Whole: `requests show` takes the whole id (a client has it from the `request-id` header),
    // and every request id starts with the same `req_relay_`, so a short one tells nothing apart.
    Column::new("id", "ID", |r| Value::text(&r.id)),
    Column::new("time", "Time", |r| Value::Time(r.time_ms)),
    Column::detail("started", "Started", |r| Value::Time(r.started_ms)),
    Column::new("key", "Key", |r| Value::text(&r.key)),
    Column::detail("key_id", "Key ID", |r| Value::opt_text(&r.key_id)),
    Column::new("group", "Group", |r| Value::opt_text(&r.group)),
    Column::detail("group_id", "Group ID", |r| Value::opt_text(&r.group_id)),
    Column::new("model", "Model", |r| Value::text(&r.model)),
    Column::detail("model_requested", "Model asked", |r| {
        Value::opt_text(&r.model_requested)
    }),
    Column::new("status", "Status", |r| Value::UInt(u64::from(r.status))),
    Column::detail("outcome", "Outcome", |r| Value::text(&r.outcome)),
    Column::detail("error_type", "Error", |r| Value::opt_text(&r.error_type)),
    Column::detail("error_message", "Error message", |r| Value::opt_text(&r.error_message)),
    Column::detail("cancelled", "Cancelled", |r| Value::Bool(r.cancelled)),
    Column::new("stream", "Stream", |r| Value::Bool(r.stream)),
    // Tables and CSV: "acct-a:overloaded_error → acct-b:ok"; JSON: every attempt's fields.
    Column::new("attempts", "Attempts", |r| Value::Described {
        json: attempts_json(r),
        text: attempts_text(r),
    }),
    Column::new("ttfb_ms", "TTFB ms", |r| Value::UInt(r.ttfb_ms)),
    Column::new("duration_ms", "ms", |r| Value::UInt(r.duration_ms)),
    Column::detail("stream_events", "Events", |r| Value::UInt(r.stream_events)),
    Column::detail("max_event_gap_ms", "Max gap ms", |r| Value::UInt(r.max_event_gap_ms)),
    Column::detail("input_tokens", "Input", |r| Value::UInt(r.input_tokens)),
    Column::detail("output_tokens", "Output", |r| Value::UInt(r.output_tokens)),
    Column::detail("cache_write_5m_tokens", "Cache write 5m", |r| {
        Value::UInt(r.cache_write_5m_tokens)
    }),
    Column::detail("cache_write_1h_tokens", "Cache write 1h", |r| {
        Value::UInt(r.cache_write_1h_tokens)
    }),
    Column::detail("cache_read_tokens", "Cache read", |r| Value::UInt(r.cache_read_tokens)),
    Column::detail("client_request_id", "Client request id", |r| {
        Value::opt_text(&r.client_request_id)
    }),
    Column::new("cost_usd", "Cost (USD)", |r| {
        Value::Decimal(format_cost(r.cost_pico_usd))
    }),
    Column::detail("cost_pico_usd", "Cost (pico-USD)", |r| Value::UInt(r.cost_pico_usd)),
];

/// Table columns for one record's summary in `show` (the attempts follow as their own table).
const SHOW_COLUMNS: &[Column<RequestRecord>] = &[
    Column::new("id", "ID", |r| Value::text(&r.id)),
    Column::new("time", "Time", |r| Value::Time(r.time_ms)),
    Column::new("started", "Started", |r| Value::Time(r.started_ms)),
    Column::new("key", "Key", |r| Value::text(&r.key)),
    Column::new("group", "Group", |r| Value::opt_text(&r.group)),
    Column::new("model", "Model", |r| Value::text(&r.model)),
    Column::new("model_requested", "Model asked", |r| {
        Value::opt_text(&r.model_requested)
    }),
    Column::new("status", "Status", |r| Value::UInt(u64::from(r.status))),
    Column::new("outcome", "Outcome", |r| Value::text(&r.outcome)),
    Column::new("error_type", "Error", |r| Value::opt_text(&r.error_type)),
    Column::new("error_message", "Error message", |r| Value::opt_text(&r.error_message)),
    Column::new("stream", "Stream", |r| Value::Bool(r.stream)),
    Column::new("cancelled", "Cancelled", |r| Value::Bool(r.cancelled)),
    Column::new("client_request_id", "Client request id", |r| {
        Value::opt_text(&r.client_request_id)
    }),
    Column::new("ttfb_ms", "TTFB ms", |r| Value::UInt(r.ttfb_ms)),
    Column::new("duration_ms", "Duration ms", |r| Value::UInt(r.duration_ms)),
    Column::new("stream_events", "Stream events", |r| Value::UInt(r.stream_events)),
    Column::new("max_event_gap_ms", "Max event gap ms", |r| {
        Value::UInt(r.max_event_gap_ms)
    }),
    Column::new("input_tokens", "Input", |r| Value::UInt(r.input_tokens)),
    Column::new("output_tokens", "Output", |r| Value::UInt(r.output_tokens)),
    Column::new("cache_write_5m_tokens", "Cache write 5m", |r| {
        Value::UInt(r.cache_write_5m_tokens)
    }),
    Column::new("cache_write_1h_tokens", "Cache write 1h", |r| {
        Value::UInt(r.cache_write_1h_tokens)
    }),
    Column::new("cache_read_tokens", "Cache read", |r| Value::UInt(r.cache_read_tokens)),
    Column::new("cost_usd", "Cost (USD)", |r| {
        Value::Decimal(format_cost(r.cost_pico_usd))
    }),
    Column::new("captured", "Captured", |r| {
        Value::text(match &r.capture {
            Some(c) if c.truncated => "yes (truncated)",
            Some(_) => "yes",
            None => "no",
        })
    }),
];

const ATTEMPT_COLUMNS: &[Column<RequestAttempt>] = &[
    Column::new("time", "Ended", |a| Value::Time(a.time_ms)),
    Column::new("account", "Account", |a| Value::text(&a.account)),
    Column::new("node", "Node", |a| Value::text(&a.node_id)),
    Column::new("status", "Status", |a| Value::UInt(u64::from(a.status))),
    Column::new("outcome", "Outcome", |a| Value::text(&a.outcome)),
    Column::new("latency_ms", "ms", |a| Value::UInt(a.latency_ms)),
    Column::new("ttfb_ms", "TTFB ms", |a| Value::UInt(a.ttfb_ms)),
    Column::new("queue_wait_ms", "Waited ms", |a| Value::UInt(a.queue_wait_ms)),
    Column::new("tokens", "Tokens", |a| {
        Value::UInt(
            a.input_tokens
                .saturating_add(a.output_tokens)
                .saturating_add(a.cache_write_5m_tokens)
                .saturating_add(a.cache_write_1h_tokens)
                .saturating_add(a.cache_read_tokens),
        )
    }),
    Column::new("cost_usd", "Cost (USD)", |a| {
        Value::Decimal(format_cost(a.cost_pico_usd))
    }),
    Column::new("upstream_request_id", "Upstream request id", |a| {
        Value::opt_text(&a.upstream_request_id)
    }),
];

fn show(out: Output, r: &RequestRecord) -> Result<()> {
    match out.format {
        Format::Table | Format::Wide => {
            out.one(SHOW_COLUMNS, r)?;
            println!("attempts ({}):", r.attempts.len());
            out.list(ATTEMPT_COLUMNS, &r.attempts)
        }
        Format::Json => {
            let mut v = json_object(RECORD_COLUMNS, r);
            v.insert("capture".into(), capture_json(r)?);
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        Format::Csv => out.one(RECORD_COLUMNS, r),
    }?;
    if matches!(out.format, Format::Table | Format::Wide) {
        if let Some(c) = &r.capture {
            // The capture document as stored (headers masked), pretty-printed.
            let doc: serde_json::Value = serde_json::from_str(&c.document_json)?;
            println!("capture (rule {}, {} bytes stored):", c.rule_id, c.stored_bytes);
            println!("{}", serde_json::to_string_pretty(&doc)?);
        }
    }
    Ok(())
}

/// The record's capture document as JSON (null when nothing was captured).
fn capture_json(r: &RequestRecord) -> Result<serde_json::Value> {
    Ok(match &r.capture {
        Some(c) => serde_json::from_str(&c.document_json)?,
        None => serde_json::Value::Null,
    })
}

/// Writes every matching record as one JSON object a line (with `capture` when asked), through
/// gzip or zstd when asked; records are fetched a page at a time, captures one request at a time.
async fn export(
    conn: &mut Conn,
    out: Output,
    filter: &RequestFilterArgs,
    with_bodies: bool,
    gzip: bool,
    zstd: bool,
) -> Result<()> {
    use std::io::Write;
    if matches!(out.format, Format::Csv | Format::Wide) {
        return Err(anyhow!("export writes JSON lines: use -o jsonl (or leave -o out)"));
    }
    let filter = to_filter(filter)?;
    let stdout = std::io::stdout().lock();
    let mut w: Box<dyn Write> = if gzip {
        Box::new(flate2::write::GzEncoder::new(stdout, flate2::Compression::default()))
    } else if zstd {
        Box::new(zstd::stream::write::Encoder::new(stdout, 3)?.auto_finish())
    } else {
        Box::new(std::io::BufWriter::new(stdout))
    };
    let mut cursor = String::new();
    loop {
        let resp = conn
            .api
            .list_requests(ListRequestsRequest {
                filter: Some(filter.clone()),
                limit: 1000,
                cursor: cursor.clone(),
            })
            .await
            .or_report(&conn.server)?;
        for r in &resp.records {
            let mut v = json_object(RECORD_COLUMNS, r);
            if with_bodies {
                let full = conn
                    .api
                    .get_request(GetRequestRequest { id: r.id.clone() })
                    .await
                    .or_report(&conn.server)?;
                v.insert("capture".into(), capture_json(&full)?);
            }
            serde_json::to_writer(&mut w, &v)?;
            w.write_all(b"\n")?;
        }
        cursor = resp.next_cursor;
        if cursor.is_empty() {
            break;
        }
    }
    w.flush()?;
    drop(w);
    Ok(())
}

async fn clear(conn: &mut Conn, out: Output, filter: &RequestFilterArgs, yes: bool) -> Result<()> {
    let filter = to_filter(filter)?;
    if !yes {
        use std::io::{BufRead, IsTerminal, Write};
        if !std::io::stdin().is_terminal() {
            return Err(anyhow!(
                "requests clear deletes records and captures for good: add --yes to confirm"
            ));
        }
        let everything = filter == RequestFilter::default();
        eprint!(
            "delete {} request records and their captures? [y/N] ",
            if everything { "ALL" } else { "the matching" }
        );
        std::io::stderr().flush()?;
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        if !matches!(line.trim(), "y" | "Y" | "yes") {
            return Err(anyhow!("nothing deleted"));
        }
    }
    let r = conn
        .api
        .clear_requests(ClearRequestsRequest { filter: Some(filter) })
        .await
        .or_report(&conn.server)?;
    let text = format!(
        "deleted {} requests ({} usage rows, {} captures)",
        r.requests, r.usage_rows, r.captures
    );
    out.one_or_text(CLEARED_COLUMNS, &r, &text)
}

const CLEARED_COLUMNS: &[Column<relay_proto::v1::ClearRequestsResponse>] = &[
    Column::new("requests", "Requests", |r| Value::UInt(r.requests)),
    Column::new("usage_rows", "Usage rows", |r| Value::UInt(r.usage_rows)),
    Column::new("captures", "Captures", |r| Value::UInt(r.captures)),
];

type StatsRow = (&'static str, RequestStatsRow);

const STATS_COLUMNS: &[Column<StatsRow>] = &[
    Column::new("by", "By", |r| Value::text(r.0)),
    Column::new("name", "Name", |r| Value::opt_text(&r.1.name)),
    Column::detail("id", "ID", |r| Value::opt_text(&r.1.id)),
    Column::new("requests", "Requests", |r| Value::UInt(r.1.requests)),
    Column::new("errors", "Errors", |r| Value::UInt(r.1.errors)),
    Column::new("error_ratio", "Error ratio", |r| {
        Value::Decimal(format!("{:.4}", r.1.error_ratio))
    }),
    Column::new("duration_p50_ms", "p50 ms", |r| Value::UInt(r.1.duration_p50_ms)),
    Column::new("duration_p90_ms", "p90 ms", |r| Value::UInt(r.1.duration_p90_ms)),
    Column::new("duration_p99_ms", "p99 ms", |r| Value::UInt(r.1.duration_p99_ms)),
    Column::detail("ttfb_p50_ms", "TTFB p50 ms", |r| Value::UInt(r.1.ttfb_p50_ms)),
    Column::detail("ttfb_p90_ms", "TTFB p90 ms", |r| Value::UInt(r.1.ttfb_p90_ms)),
    Column::detail("ttfb_p99_ms", "TTFB p99 ms", |r| Value::UInt(r.1.ttfb_p99_ms)),
    Column::new("input_tokens", "Input", |r| Value::UInt(r.1.input_tokens)),
    Column::new("output_tokens", "Output", |r| Value::UInt(r.1.output_tokens)),
    Column::detail("cache_write_5m_tokens", "Cache write 5m", |r| {
        Value::UInt(r.1.cache_write_5m_tokens)
    }),
    Column::detail("cache_write_1h_tokens", "Cache write 1h", |r| {
        Value::UInt(r.1.cache_write_1h_tokens)
    }),
    Column::detail("cache_read_tokens", "Cache read", |r| {
        Value::UInt(r.1.cache_read_tokens)
    }),
    Column::new("cost_usd", "Cost (USD)", |r| {
        Value::Decimal(format_cost(r.1.cost_pico_usd))
    }),
    Column::detail("cost_pico_usd", "Cost (pico-USD)", |r| Value::UInt(r.1.cost_pico_usd)),
];

/// One record as a CSV record without the header: every line of it (a quoted value may hold a
/// newline), without the final newline.
fn csv_record(r: &RequestRecord) -> Result<String> {
    let text = crate::output::render_list(Format::Csv, RECORD_COLUMNS, std::slice::from_ref(r))?;
    let body = text.split_once('\n').map_or("", |(_, rest)| rest);
    Ok(body.strip_suffix('\n').unwrap_or(body).to_string())
}

async fn tail(conn: &mut Conn, out: Output, filter: &RequestFilterArgs) -> Result<()> {
    let filter = to_filter(filter)?;
    if let Some(note) = unknown_status_note(Some(filter.status.as_str())) {
        eprintln!("{note}");
    }
    let mut stream = conn
        .api
        .tail_requests(TailRequestsRequest { filter: Some(filter) })
        .await
        .or_report(&conn.server)?;
    if out.format == Format::Csv {
        let header: Vec<&str> = RECORD_COLUMNS.iter().map(|c| c.key).collect();
        println!("{}", header.join(","));
    }
    loop {
        let r = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(s) => return Err(status_error(&s, &conn.server)),
        };
        let line = match out.format {
            Format::Json => serde_json::to_string(&json_object(RECORD_COLUMNS, &r))?,
            Format::Csv => csv_record(&r)?,
            Format::Table | Format::Wide => crate::output::printable_line(&format!(
                "{}  {}  {}  {}  {}  {}{}  {} ms  {} tok  ${}  {}",
                crate::parse::format_time(r.time_ms).unwrap_or_default(),
                r.id,
                r.key,
                r.model,
                r.status,
                if r.stream { "stream" } else { "json" },
                if r.error_type.is_empty() {
                    String::new()
                } else {
                    format!(" {}", r.error_type)
                },
                r.duration_ms,
                tokens(&r),
                format_cost(r.cost_pico_usd),
                attempts_text(&r),
            )),
        };
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{line}")?;
        stdout.flush()?;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_status_no_error_type_uses_gets_a_note_and_known_ones_none() {
        for known in [
            "ok",
            "error",
            "429",
            "5xx",
            "cancelled",
            "overloaded_error",
            "http_418",
            "",
        ] {
            assert_eq!(unknown_status_note(Some(known)), None, "{known}");
        }
        assert_eq!(unknown_status_note(None), None);
        let note = unknown_status_note(Some("bogus")).unwrap();
        assert!(
            note.contains("\"bogus\" is not an error type") && note.contains("overloaded_error"),
            "{note}"
        );
    }

    #[test]
    fn a_tailed_csv_record_keeps_a_value_with_a_newline() {
        let r = RequestRecord {
            id: "req_relay_1".into(),
            model: "claude-son\"net,\nx".into(),
            key: "k1".into(),
            ..Default::default()
        };
        let header: Vec<&str> = RECORD_COLUMNS.iter().map(|c| c.key).collect();
        let text = format!("{}\n{}\n", header.join(","), csv_record(&r).unwrap());
        let mut rd = csv::Reader::from_reader(text.as_bytes());
        let rows: Vec<csv::StringRecord> = rd.records().map(|x| x.unwrap()).collect();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].len(), header.len());
        let model = header.iter().position(|h| *h == "model").unwrap();
        assert_eq!(&rows[0][model], "claude-son\"net,\nx");
    }
}
