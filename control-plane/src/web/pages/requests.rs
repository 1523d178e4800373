//! Requests: the request log (`relayctl requests list|show|tail`) with its filters (time range,
//! key, group, account, model, status or error type, stream, minimum duration), newest first and
//! paged by the service's cursor; a live tail over Server-Sent Events (`/requests/tail`, the
//! `TailRequests` stream, read by `console.js` with an `EventSource`); and one request's detail
//! (`/requests/{id}`): its attempts, timings, usage and cost, the stream's timeline and the bodies
//! a capture rule recorded.

use crate::web::chart;
use crate::web::render::{millis, parse_when, time, usd_pico};
use crate::web::routes::layout;
use crate::web::{now_ms, Console, MAX_LIVE_TAILS, TAIL_SESSION_CHECK};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use minijinja::{context, Value};
use relay_proto::v1 as pb;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// The filter fields the page's form has (and the links carry on).
const FILTERS: &[&str] = &[
    "since", "until", "key", "group", "account", "model", "status", "stream", "min_ms",
];

/// Records per page.
const PAGE: u32 = 50;

/// Stream events listed in the detail's timeline table; the chart shows them all.
const TIMELINE_ROWS: usize = 500;

type Q = HashMap<String, String>;

fn q<'a>(q: &'a Q, name: &str) -> &'a str {
    q.get(name).map(|s| s.trim()).unwrap_or("")
}

/// The service's filter from the page's query.
pub(crate) fn filter_of(query: &Q, now: i64) -> Result<pb::RequestFilter, String> {
    let since = parse_when(q(query, "since"), now).map_err(|e| format!("since: {e}"))?;
    let until = parse_when(q(query, "until"), now).map_err(|e| format!("until: {e}"))?;
    let stream = match q(query, "stream") {
        "" | "any" => None,
        "yes" | "true" => Some(true),
        "no" | "false" => Some(false),
        v => return Err(format!("stream: {v:?} is not yes, no or any")),
    };
    let min = q(query, "min_ms");
    let min_duration_ms = if min.is_empty() {
        0
    } else {
        min.parse()
            .map_err(|_| format!("min_ms: {min:?} is not a whole number of milliseconds"))?
    };
    Ok(pb::RequestFilter {
        since_ms: since.unwrap_or(0),
        until_ms: until.unwrap_or(0),
        key: q(query, "key").to_string(),
        group: q(query, "group").to_string(),
        account: q(query, "account").to_string(),
        model: q(query, "model").to_string(),
        status: q(query, "status").to_string(),
        stream,
        min_duration_ms,
        model_requested: String::new(),
    })
}

/// The filter part of the page's query, encoded again (for the next page).
fn filter_query(query: &Q) -> String {
    encoded(query, FILTERS)
}

/// The filters the live tail takes: all but the time range (the tail follows new records from
/// now on, and the service refuses a range).
const TAIL_FILTERS: &[&str] = &["key", "group", "account", "model", "status", "stream", "min_ms"];

/// The live tail's URL for the page's filters.
fn tail_url(query: &Q) -> String {
    let fq = encoded(query, TAIL_FILTERS);
    if fq.is_empty() {
        "/requests/tail".to_string()
    } else {
        format!("/requests/tail?{fq}")
    }
}

fn encoded(query: &Q, fields: &[&str]) -> String {
    fields
        .iter()
        .filter(|f| !q(query, f).is_empty())
        .map(|f| format!("{f}={}", super::url_encode(q(query, f))))
        .collect::<Vec<_>>()
        .join("&")
}

fn tokens(r: &pb::RequestRecord) -> u64 {
    r.input_tokens + r.output_tokens + r.cache_write_5m_tokens + r.cache_write_1h_tokens + r.cache_read_tokens
}

fn ok(r: &pb::RequestRecord) -> bool {
    r.outcome == "ok"
}

/// A record's row in the list.
fn row(r: &pb::RequestRecord) -> Value {
    context! {
        id => r.id.clone(),
        time => time(r.time_ms),
        key => r.key.clone(),
        group => r.group.clone(),
        model => r.model.clone(),
        stream => r.stream,
        status => r.status,
        outcome => r.outcome.clone(),
        ok => ok(r),
        attempts => r.attempts.len(),
        ttfb => millis(r.ttfb_ms),
        duration => millis(r.duration_ms),
        tokens => tokens(r),
        cost => usd_pico(r.cost_pico_usd),
    }
}

/// What the live tail sends for one record (the same columns as the list).
fn tail_json(r: &pb::RequestRecord) -> serde_json::Value {
    serde_json::json!({
        "id": r.id,
        "time": time(r.time_ms),
        "key": r.key,
        "group": r.group,
        "model": r.model,
        "stream": if r.stream { "yes" } else { "no" },
        "status": r.status,
        "outcome": r.outcome,
        "attempts": r.attempts.len(),
        "ttfb": millis(r.ttfb_ms),
        "duration": millis(r.duration_ms),
        "tokens": tokens(r),
        "cost": usd_pico(r.cost_pico_usd),
    })
}

pub async fn show(State(c): State<Arc<Console>>, headers: HeaderMap, Query(query): Query<Q>) -> Response {
    let op = match c.operator(&headers).await {
        Ok(op) => op,
        Err(r) => return r,
    };
    let filter = match filter_of(&query, now_ms()) {
        Ok(f) => f,
        Err(e) => return c.views.error(StatusCode::BAD_REQUEST, &e),
    };
    let req = pb::ListRequestsRequest {
        filter: Some(filter),
        limit: PAGE,
        cursor: q(&query, "cursor").to_string(),
    };
    let page = match c.api.call(&op.actor, req).await {
        Ok(p) => p,
        Err(s) => return super::failed(&c, &s),
    };
    let fq = filter_query(&query);
    let next = (!page.next_cursor.is_empty()).then(|| {
        let sep = if fq.is_empty() { "" } else { "&" };
        format!("/requests?{fq}{sep}cursor={}", super::url_encode(&page.next_cursor))
    });
    let values: HashMap<&str, &str> = FILTERS.iter().map(|f| (*f, q(&query, f))).collect();
    let rows: Vec<Value> = page.records.iter().map(row).collect();
    c.views.page(
        StatusCode::OK,
        "requests.html",
        context! { ..layout(&op, "/requests", "Requests"), ..context! {
            rows, next, f => values,
            paged => !q(&query, "cursor").is_empty(),
            tail => tail_url(&query),
            ranged => !(q(&query, "since").is_empty() && q(&query, "until").is_empty()),
        } },
    )
}

/// The live tail: every new record the filter selects, as an SSE `record` event (JSON), until the
/// browser goes away; a `failed` event with the reason when the service ends the stream or the
/// session no longer holds (signed out, expired, its token revoked or its role changed: checked
/// every [`TAIL_SESSION_CHECK`]). At most [`MAX_LIVE_TAILS`] at once per replica.
pub async fn tail(State(c): State<Arc<Console>>, headers: HeaderMap, Query(query): Query<Q>) -> Response {
    let op = match c.operator(&headers).await {
        Ok(op) => op,
        Err(r) => return r,
    };
    // The tail follows new records from now on: a time range (from an older link) does not apply.
    let filter = match filter_of(&query, now_ms()) {
        Ok(f) => pb::RequestFilter {
            since_ms: 0,
            until_ms: 0,
            ..f
        },
        Err(e) => return c.views.error(StatusCode::BAD_REQUEST, &e),
    };
    let Ok(permit) = c.tails.clone().try_acquire_owned() else {
        return c.views.error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("{MAX_LIVE_TAILS} live tails are open on this control plane already: close one (another tab?) and start again"),
        );
    };
    let mut records = match c
        .api
        .call(&op.actor, pb::TailRequestsRequest { filter: Some(filter) })
        .await
    {
        Ok(s) => s,
        Err(s) => return super::failed(&c, &s),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    let console = c.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let mut check = tokio::time::interval(TAIL_SESSION_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        check.tick().await;
        loop {
            // (the event, whether it is the last)
            let (event, last) = tokio::select! {
                _ = tx.closed() => return,
                item = records.next() => match item {
                    Some(Ok(r)) => (Event::default().event("record").data(tail_json(&r).to_string()), false),
                    Some(Err(s)) => (failed_event(s.message()), true),
                    None => return,
                },
                _ = check.tick() => match console.operator(&headers).await {
                    Ok(_) => continue,
                    Err(_) => (
                        failed_event("the session ended (signed out, expired, or its token revoked): sign in again"),
                        true,
                    ),
                },
            };
            if tx.send(event).await.is_err() || last {
                return;
            }
        }
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, std::convert::Infallible>))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

fn failed_event(why: &str) -> Event {
    Event::default().event("failed").data(why.replace(['\r', '\n'], " "))
}

/// The stream's events (SSE `event:` lines) of a capture's response chunks, at their offsets; a
/// JSON answer's chunks as byte counts.
fn stream_events(doc: &serde_json::Value) -> Vec<(u64, String)> {
    let response = &doc["response"];
    let stream = response["stream"].as_bool().unwrap_or(false);
    let mut out = Vec::new();
    for chunk in response["chunks"].as_array().into_iter().flatten() {
        let at = chunk["offset_ms"].as_u64().unwrap_or(0);
        match chunk["data"].as_str() {
            Some(data) if stream => {
                for line in data.lines() {
                    if let Some(name) = line.strip_prefix("event:") {
                        out.push((at, name.trim().to_string()));
                    }
                }
            }
            Some(data) => out.push((at, format!("{} bytes", data.len()))),
            None => out.push((at, "binary chunk".into())),
        }
    }
    out
}

/// A captured body for reading: pretty JSON when it is JSON, else as sent.
fn body_text(v: &serde_json::Value) -> String {
    match v.as_str() {
        Some(s) => serde_json::from_str::<serde_json::Value>(s)
            .ok()
            .and_then(|j| serde_json::to_string_pretty(&j).ok())
            .unwrap_or_else(|| s.to_string()),
        None => String::new(),
    }
}

fn headers_of(v: &serde_json::Value) -> Vec<(String, String)> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| Some((h[0].as_str()?.to_string(), h[1].as_str()?.to_string())))
        .collect()
}

fn capture_view(cap: &pb::RequestCapture) -> Value {
    let doc: serde_json::Value = serde_json::from_str(&cap.document_json).unwrap_or_default();
    let chunks: String = doc["response"]["chunks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["data"].as_str())
        .collect();
    let response_body = if doc["response"]["stream"].as_bool().unwrap_or(false) {
        chunks
    } else {
        body_text(&serde_json::Value::String(chunks))
    };
    context! {
        captured => time(cap.captured_ms),
        rule => cap.rule_id.clone(),
        truncated => cap.truncated,
        stored_bytes => cap.stored_bytes,
        method => doc["request"]["method"].as_str().unwrap_or("").to_string(),
        path => doc["request"]["path"].as_str().unwrap_or("").to_string(),
        request_headers => headers_of(&doc["request"]["headers"]),
        request_body => body_text(&doc["request"]["body"]),
        request_binary => doc["request"]["body_base64"].is_string(),
        response_status => doc["response"]["status"].as_u64().unwrap_or(0),
        response_headers => headers_of(&doc["response"]["headers"]),
        response_body,
    }
}

fn attempt(a: &pb::RequestAttempt) -> Value {
    context! {
        time => time(a.time_ms),
        account => a.account.clone(),
        node => a.node_id.clone(),
        model => a.model.clone(),
        status => a.status,
        outcome => a.outcome.clone(),
        ok => a.outcome == "ok",
        error => if a.error_message.is_empty() { a.error_type.clone() } else { format!("{}: {}", a.error_type, a.error_message) },
        latency => millis(a.latency_ms),
        ttfb => millis(a.ttfb_ms),
        queue => millis(a.queue_wait_ms),
        waited_for => a.waited_for.clone(),
        upstream_id => a.upstream_request_id.clone(),
        input => a.input_tokens,
        output => a.output_tokens,
        cache_write => a.cache_write_5m_tokens + a.cache_write_1h_tokens,
        cache_read => a.cache_read_tokens,
        cost => usd_pico(a.cost_pico_usd),
        events => a.stream_events,
        gap => millis(a.max_event_gap_ms),
        anomaly => a.anomaly.clone(),
    }
}

pub async fn detail(State(c): State<Arc<Console>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let op = match c.operator(&headers).await {
        Ok(op) => op,
        Err(r) => return r,
    };
    let r = match c.api.call(&op.actor, pb::GetRequestRequest { id: id.clone() }).await {
        Ok(r) => r,
        Err(s) => return super::failed(&c, &s),
    };
    let events = r
        .capture
        .as_ref()
        .map(|cap| stream_events(&serde_json::from_str(&cap.document_json).unwrap_or_default()))
        .unwrap_or_default();
    let timeline_svg = (!events.is_empty()).then(|| chart::timeline("Stream events by arrival (ms)", &events));
    let timeline: Vec<Value> = events
        .iter()
        .take(TIMELINE_ROWS)
        .map(|(at, name)| context! { at => *at, name => name.clone() })
        .collect();
    let title = format!("Request {}", r.id);
    c.views.page(
        StatusCode::OK,
        "request.html",
        context! { ..layout(&op, "/requests", &title), ..context! {
            r => context! {
                id => r.id.clone(),
                time => time(r.time_ms),
                started => time(r.started_ms),
                key => r.key.clone(),
                group => r.group.clone(),
                model => r.model.clone(),
                model_requested => r.model_requested.clone(),
                stream => r.stream,
                status => r.status,
                outcome => r.outcome.clone(),
                ok => ok(&r),
                error_type => r.error_type.clone(),
                error_message => r.error_message.clone(),
                client_request_id => r.client_request_id.clone(),
                ttfb => millis(r.ttfb_ms),
                duration => millis(r.duration_ms),
                input => r.input_tokens,
                output => r.output_tokens,
                cache_write_5m => r.cache_write_5m_tokens,
                cache_write_1h => r.cache_write_1h_tokens,
                cache_read => r.cache_read_tokens,
                cost => usd_pico(r.cost_pico_usd),
                stream_events => r.stream_events,
                max_gap => millis(r.max_event_gap_ms),
            },
            attempts => r.attempts.iter().map(attempt).collect::<Vec<_>>(),
            timeline_svg,
            timeline,
            timeline_more => events.len().saturating_sub(TIMELINE_ROWS),
            capture => r.capture.as_ref().map(capture_view),
        } },
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn query(pairs: &[(&str, &str)]) -> Q {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn the_form_becomes_the_service_filter() {
        let now = 100 * 3_600_000;
        let f = filter_of(
            &query(&[
                ("since", "1h"),
                ("key", " app "),
                ("stream", "yes"),
                ("min_ms", "250"),
                ("status", "5xx"),
            ]),
            now,
        )
        .unwrap();
        assert_eq!(f.since_ms, 99 * 3_600_000);
        assert_eq!(f.until_ms, 0);
        assert_eq!(f.key, "app");
        assert_eq!(f.stream, Some(true));
        assert_eq!(f.min_duration_ms, 250);
        assert_eq!(f.status, "5xx");
        assert!(filter_of(&query(&[("min_ms", "soon")]), now)
            .unwrap_err()
            .contains("min_ms"));
        assert!(filter_of(&query(&[("stream", "maybe")]), now).is_err());
        assert_eq!(filter_of(&query(&[("stream", "any")]), now).unwrap().stream, None);
        assert_eq!(
            filter_query(&query(&[("key", "a b"), ("cursor", "x"), ("model", "")])),
            "key=a%20b"
        );
        // The live tail takes the filters but not the time range (it follows from now on).
        assert_eq!(
            tail_url(&query(&[
                ("since", "1h"),
                ("until", "10m"),
                ("model", "m"),
                ("stream", "yes")
            ])),
            "/requests/tail?model=m&stream=yes"
        );
        assert_eq!(tail_url(&query(&[("since", "1h")])), "/requests/tail");
    }

    #[test]
    fn a_streams_capture_becomes_its_event_timeline() {
        let doc = serde_json::json!({"response": {"stream": true, "chunks": [
            {"offset_ms": 5, "data": "event: message_start\ndata: {}\n\n"},
            {"offset_ms": 40, "data": "event: content_block_delta\ndata: {}\n\nevent: message_stop\ndata: {}\n\n"},
        ]}});
        assert_eq!(
            stream_events(&doc),
            vec![
                (5, "message_start".to_string()),
                (40, "content_block_delta".to_string()),
                (40, "message_stop".to_string())
            ]
        );
        let json = serde_json::json!({"response": {"stream": false, "chunks": [{"offset_ms": 9, "data": "{}"}]}});
        assert_eq!(stream_events(&json), vec![(9, "2 bytes".to_string())]);
    }
}
