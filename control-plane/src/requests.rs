//! The request log: one record per client request, built from the usage rows the data planes
//! already report (one per upstream attempt, all attempts of a request sharing its `request_id`).
//!
//! The rules live here once, for both stores: what a record says (its final attempt, status,
//! timings, summed tokens and cost), what each filter matches, how pages are cut (an opaque cursor
//! over `(time, id)`, newest first) and what the statistics are. A store only answers plain
//! questions: which request ids come next in time order ([`Store::request_page`]) and what rows
//! they have ([`Store::request_events`]); for the statistics, one pass back over the log in
//! windows ([`Store::request_window_floor`], [`Store::request_window_events`]) instead of pages.
//! Because usage rows are stored exactly once by event id,
//! a record is idempotent under the spool's redelivery by construction.
//!
//! A record's `time` is the time of its latest usage row (when its last attempt ended), and pages
//! are ordered by it.

use crate::model::{Millis, RequestPage, UsageEvent};
use crate::store::{DynStore, Result, Store, StoreError};
use base64::Engine;
use std::collections::{BTreeMap, BTreeSet};

/// Request ids asked of the store at a time while filling a page.
pub const SCAN_BATCH: u32 = 500;
/// Requests one `list` call looks at, at most, before it returns a short page with a cursor (a
/// filter that matches little cannot make one call scan the whole table).
pub const MAX_SCAN_PER_PAGE: usize = 50_000;
/// Requests `stats` looks at, at most; the answer says when it stopped there.
pub const MAX_STATS_SCAN: usize = 2_000_000;

/// One client request and its attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// relay's request id (the data plane's `request-id` header).
    pub id: String,
    /// When its last attempt ended (ms).
    pub time: Millis,
    /// When its first attempt started, the wait before it included (ms).
    pub started: Millis,
    pub api_key_id: String,
    /// The model its final attempt was billed as (the answer's, when plausible).
    pub model: String,
    /// The model the client asked for ("" when its body was never read).
    pub model_requested: String,
    /// The key's group when the request was served ("" when unknown).
    pub group_id: String,
    pub stream: bool,
    /// The final attempt's status (0: no answer head).
    pub status: u32,
    /// The final attempt's error type ("" on success).
    pub error_type: String,
    /// relay's words on how it failed ("" on success or for an upstream's own error answer).
    pub error_message: String,
    /// The client went away before the final attempt ended (or before any).
    pub cancelled: bool,
    /// What the request came to, as [`outcome`] names it for its last row.
    pub outcome: String,
    pub client_request_id: String,
    /// From the request's start to the answering attempt's first byte (0: none came).
    pub ttfb_ms: u64,
    pub duration_ms: u64,
    /// The answering attempt's stream: its events and the longest gap between two (ms).
    pub stream_events: u64,
    pub max_event_gap_ms: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_write_5m_tokens: u64,
    pub cache_write_1h_tokens: u64,
    pub cache_read_tokens: u64,
    pub cost_pico_usd: u64,
    /// The upstream attempts, oldest first; the last one answered the client. Empty when the
    /// request never reached an upstream (refused by its limits, no account available, a bad
    /// body, the client gone first): then its one row, without an account, says how it ended.
    pub attempts: Vec<UsageEvent>,
}

/// What an attempt came to: "ok", "cancelled", its error type, or "http_<status>".
pub fn outcome(e: &UsageEvent) -> String {
    if e.cancelled {
        "cancelled".into()
    } else if !e.error_type.is_empty() {
        e.error_type.clone()
    } else if (200..300).contains(&e.http_status) {
        "ok".into()
    } else {
        format!("http_{}", e.http_status)
    }
}

impl RequestRecord {
    /// The record of these rows (all of one request); `None` when there are none.
    pub fn from_events(mut events: Vec<UsageEvent>) -> Option<Self> {
        events.sort_by_key(|a| (a.ts, a.event_id));
        let last = events.last()?.clone();
        let first = events.first()?;
        let started = events.iter().map(start_of).min().unwrap_or(first.ts);
        let time = last.ts;
        let sum = |f: fn(&UsageEvent) -> u64| events.iter().fold(0u64, |acc, e| acc.saturating_add(f(e)));
        let ttfb_ms = if last.ttfb_ms > 0 && !last.cancelled {
            u64::try_from((last.ts - last.latency_ms as i64).saturating_sub(started)).unwrap_or(0) + last.ttfb_ms
        } else {
            0
        };
        Some(RequestRecord {
            id: last.request_id.clone(),
            time,
            started,
            api_key_id: last.api_key_id.clone(),
            model: last.model.clone(),
            model_requested: events
                .iter()
                .rev()
                .map(|e| e.model_requested.as_str())
                .find(|m| !m.is_empty())
                .unwrap_or_default()
                .to_string(),
            group_id: events
                .iter()
                .rev()
                .map(|e| e.group_id.as_str())
                .find(|g| !g.is_empty())
                .unwrap_or_default()
                .to_string(),
            stream: events.iter().any(|e| e.stream),
            status: last.http_status,
            error_type: last.error_type.clone(),
            error_message: last.error_message.clone(),
            cancelled: last.cancelled,
            outcome: outcome(&last),
            client_request_id: events
                .iter()
                .map(|e| e.client_request_id.as_str())
                .find(|c| !c.is_empty())
                .unwrap_or_default()
                .to_string(),
            ttfb_ms,
            duration_ms: u64::try_from(time.saturating_sub(started)).unwrap_or(0),
            stream_events: last.stream_events,
            max_event_gap_ms: last.max_event_gap_ms,
            input_tokens: sum(|e| e.input_tokens),
            output_tokens: sum(|e| e.output_tokens),
            cache_write_5m_tokens: sum(|e| e.cache_write_5m_tokens),
            cache_write_1h_tokens: sum(|e| e.cache_write_1h_tokens),
            cache_read_tokens: sum(|e| e.cache_read_tokens),
            cost_pico_usd: sum(|e| e.cost_pico_usd),
            attempts: events.into_iter().filter(|e| !e.account_id.is_empty()).collect(),
        })
    }

    /// The attempt that answered the client (the last one).
    pub fn final_attempt(&self) -> Option<&UsageEvent> {
        self.attempts.last()
    }

    /// Whether the client got a successful answer (the last row's outcome is "ok").
    pub fn is_ok(&self) -> bool {
        self.outcome == "ok"
    }
}

/// When an attempt started, its wait for an account included.
fn start_of(e: &UsageEvent) -> Millis {
    let back = i64::try_from(e.latency_ms.saturating_add(e.queue_wait_ms)).unwrap_or(i64::MAX);
    e.ts.saturating_sub(back)
}

/// Which records a status filter keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusFilter {
    /// A successful answer.
    Ok,
    /// Anything else.
    Error,
    /// This exact HTTP status of the final attempt.
    Code(u32),
    /// A class: 4 (4xx) or 5 (5xx).
    Class(u32),
    /// The final attempt's error type or outcome (`rate_limit_error`, `cancelled`, …).
    Outcome(String),
}

impl std::str::FromStr for StatusFilter {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim();
        let bad = || {
            format!(
                "status {s:?}: expected ok, error, an HTTP status (429), a class (5xx) or an error type \
                 (overloaded_error, cancelled)"
            )
        };
        match s {
            "ok" => return Ok(StatusFilter::Ok),
            "error" | "errors" => return Ok(StatusFilter::Error),
            _ => {}
        }
        if let Ok(n) = s.parse::<u32>() {
            return if (100..600).contains(&n) {
                Ok(StatusFilter::Code(n))
            } else {
                Err(bad())
            };
        }
        if s.len() == 3 && s.ends_with("xx") {
            return match s.as_bytes()[0] {
                c @ b'1'..=b'5' => Ok(StatusFilter::Class(u32::from(c - b'0'))),
                _ => Err(bad()),
            };
        }
        if !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
            return Ok(StatusFilter::Outcome(s.to_string()));
        }
        Err(bad())
    }
}

/// What `list`, `stats` and `tail` keep. Names are resolved to ids by the caller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Inclusive, on the record's time.
    pub since: Option<Millis>,
    /// Exclusive.
    pub until: Option<Millis>,
    /// The record's key is one of these.
    pub keys: Option<BTreeSet<String>>,
    /// The record's group (its key's when the request was served).
    pub group_id: Option<String>,
    /// Some attempt went to this account.
    pub account_id: Option<String>,
    /// The record's model (answered and billed).
    pub model: Option<String>,
    /// The model the record's request asked for.
    pub model_requested: Option<String>,
    pub status: Option<StatusFilter>,
    pub stream: Option<bool>,
    pub min_duration_ms: u64,
}

impl Filter {
    pub fn matches(&self, r: &RequestRecord) -> bool {
        if self.since.is_some_and(|s| r.time < s) || self.until.is_some_and(|u| r.time >= u) {
            return false;
        }
        if self.keys.as_ref().is_some_and(|k| !k.contains(&r.api_key_id)) {
            return false;
        }
        if let Some(a) = &self.account_id {
            if !r.attempts.iter().any(|e| &e.account_id == a) {
                return false;
            }
        }
        if self.group_id.as_ref().is_some_and(|g| g != &r.group_id) {
            return false;
        }
        if self.model.as_ref().is_some_and(|m| m != &r.model) {
            return false;
        }
        if self.model_requested.as_ref().is_some_and(|m| m != &r.model_requested) {
            return false;
        }
        if self.stream.is_some_and(|s| s != r.stream) {
            return false;
        }
        if r.duration_ms < self.min_duration_ms {
            return false;
        }
        match &self.status {
            None => true,
            Some(StatusFilter::Ok) => r.is_ok(),
            Some(StatusFilter::Error) => !r.is_ok(),
            Some(StatusFilter::Code(c)) => r.status == *c,
            Some(StatusFilter::Class(c)) => r.status / 100 == *c,
            Some(StatusFilter::Outcome(o)) => &r.outcome == o,
        }
    }
}

/// Where a page ends: the last record's `(time, id)`. Opaque to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub time: Millis,
    pub id: String,
}

impl Cursor {
    pub fn encode(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{}.{}", self.time, self.id))
    }

    pub fn decode(s: &str) -> std::result::Result<Self, String> {
        let bad = || "the cursor is not one a request list returned".to_string();
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| bad())?;
        let text = String::from_utf8(bytes).map_err(|_| bad())?;
        let (t, id) = text.split_once('.').ok_or_else(bad)?;
        Ok(Cursor {
            time: t.parse().map_err(|_| bad())?,
            id: id.to_string(),
        })
    }
}

/// One page of records, newest first.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub records: Vec<RequestRecord>,
    /// Where the next page starts; `None` when nothing older matches. A page can be shorter than
    /// asked while a cursor is still given (a filter that matched little within the scan bound).
    pub next: Option<Cursor>,
}

/// Reads the records of these request ids, newest first (by time, then id, bytewise).
async fn records_of(store: &dyn Store, ids: &[(Millis, String)]) -> Result<Vec<RequestRecord>> {
    let wanted: Vec<String> = ids.iter().map(|(_, id)| id.clone()).collect();
    let mut by_id: BTreeMap<String, Vec<UsageEvent>> = BTreeMap::new();
    for e in store.request_events(&wanted).await? {
        by_id.entry(e.request_id.clone()).or_default().push(e);
    }
    Ok(ids
        .iter()
        .filter_map(|(_, id)| by_id.remove(id).and_then(RequestRecord::from_events))
        .collect())
}

/// A page of at most `limit` records matching `filter`, older than `cursor`.
pub async fn list(store: &DynStore, filter: &Filter, cursor: Option<Cursor>, limit: usize) -> Result<Page> {
    let limit = limit.max(1);
    let mut before = cursor.map(|c| (c.time, c.id));
    let mut out = Vec::new();
    let mut scanned = 0usize;
    loop {
        let ids = store
            .request_page(RequestPage {
                since: filter.since,
                until: filter.until,
                before: before.clone(),
                limit: SCAN_BATCH,
            })
            .await?;
        let exhausted = ids.len() < SCAN_BATCH as usize;
        scanned += ids.len();
        let last_scanned = ids.last().cloned();
        for r in records_of(store.as_ref(), &ids).await? {
            if filter.matches(&r) {
                let at = (r.time, r.id.clone());
                out.push(r);
                if out.len() == limit {
                    return Ok(Page {
                        records: out,
                        next: Some(Cursor { time: at.0, id: at.1 }),
                    });
                }
            }
        }
        match last_scanned {
            Some(last) if !exhausted => {
                if scanned >= MAX_SCAN_PER_PAGE {
                    return Ok(Page {
                        records: out,
                        next: Some(Cursor {
                            time: last.0,
                            id: last.1,
                        }),
                    });
                }
                before = Some(last);
            }
            _ => {
                return Ok(Page {
                    records: out,
                    next: None,
                })
            }
        }
    }
}

/// One request by id, if stored.
pub async fn get(store: &DynStore, id: &str) -> Result<Option<RequestRecord>> {
    let mut records = records_of(store.as_ref(), &[(0, id.to_string())]).await?;
    Ok(records.pop())
}

/// Every record matching `filter` (newest first), at most `max`; the flag says the bound cut it.
pub async fn all(store: &DynStore, filter: &Filter, max: usize) -> Result<(Vec<RequestRecord>, bool)> {
    let mut out = Vec::new();
    let mut cursor = None;
    let mut scanned = 0usize;
    loop {
        let page = list(store, filter, cursor, SCAN_BATCH as usize).await?;
        scanned += page.records.len();
        out.extend(page.records);
        match page.next {
            None => return Ok((out, false)),
            Some(_) if scanned >= max => return Ok((out, true)),
            next => cursor = next,
        }
    }
}

/// Counts, error ratio, latency percentiles, tokens and cost over some records.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// What the row is about: "" for the total, else a model, key id or account id.
    pub name: String,
    pub requests: u64,
    pub errors: u64,
    pub error_ratio: f64,
    pub duration_p50_ms: u64,
    pub duration_p90_ms: u64,
    pub duration_p99_ms: u64,
    /// Over the records whose answer's first byte came (ttfb > 0).
    pub ttfb_p50_ms: u64,
    pub ttfb_p90_ms: u64,
    pub ttfb_p99_ms: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_write_5m_tokens: u64,
    pub cache_write_1h_tokens: u64,
    pub cache_read_tokens: u64,
    pub cost_pico_usd: u64,
}

/// The nearest-rank percentile `p` (0 < p <= 100) of sorted values; 0 for none.
pub fn percentile(sorted: &[u64], p: u32) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let n = sorted.len();
    let rank = (n * p as usize).div_ceil(100).clamp(1, n);
    sorted[rank - 1]
}

/// Statistics being gathered, one record at a time (the durations are kept for the
/// percentiles, nothing else).
#[derive(Debug, Default)]
pub struct StatsAcc {
    s: Stats,
    durations: Vec<u64>,
    ttfbs: Vec<u64>,
}

impl StatsAcc {
    pub fn add(&mut self, r: &RequestRecord) {
        let s = &mut self.s;
        s.requests += 1;
        if !r.is_ok() {
            s.errors += 1;
        }
        self.durations.push(r.duration_ms);
        if r.ttfb_ms > 0 {
            self.ttfbs.push(r.ttfb_ms);
        }
        s.input_tokens = s.input_tokens.saturating_add(r.input_tokens);
        s.output_tokens = s.output_tokens.saturating_add(r.output_tokens);
        s.cache_write_5m_tokens = s.cache_write_5m_tokens.saturating_add(r.cache_write_5m_tokens);
        s.cache_write_1h_tokens = s.cache_write_1h_tokens.saturating_add(r.cache_write_1h_tokens);
        s.cache_read_tokens = s.cache_read_tokens.saturating_add(r.cache_read_tokens);
        s.cost_pico_usd = s.cost_pico_usd.saturating_add(r.cost_pico_usd);
    }

    pub fn finish(mut self, name: &str) -> Stats {
        let mut s = self.s;
        s.name = name.to_string();
        self.durations.sort_unstable();
        self.ttfbs.sort_unstable();
        s.error_ratio = if s.requests == 0 {
            0.0
        } else {
            s.errors as f64 / s.requests as f64
        };
        s.duration_p50_ms = percentile(&self.durations, 50);
        s.duration_p90_ms = percentile(&self.durations, 90);
        s.duration_p99_ms = percentile(&self.durations, 99);
        s.ttfb_p50_ms = percentile(&self.ttfbs, 50);
        s.ttfb_p90_ms = percentile(&self.ttfbs, 90);
        s.ttfb_p99_ms = percentile(&self.ttfbs, 99);
        s
    }
}

/// The statistics of these records.
pub fn stats<'a>(name: &str, records: impl IntoIterator<Item = &'a RequestRecord>) -> Stats {
    let mut acc = StatsAcc::default();
    for r in records {
        acc.add(r);
    }
    acc.finish(name)
}

/// The statistics panel: the total, and rows by model, key id and final account id.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatsReport {
    pub total: Stats,
    pub by_model: Vec<Stats>,
    pub by_key: Vec<Stats>,
    pub by_account: Vec<Stats>,
    /// The scan stopped at [`MAX_STATS_SCAN`] records (newest first): narrow the time range.
    pub truncated: bool,
}

/// The statistics panel being gathered, one record at a time.
#[derive(Debug, Default)]
pub struct ReportAcc {
    total: StatsAcc,
    by_model: BTreeMap<String, StatsAcc>,
    by_key: BTreeMap<String, StatsAcc>,
    by_account: BTreeMap<String, StatsAcc>,
}

impl ReportAcc {
    pub fn add(&mut self, r: &RequestRecord) {
        self.total.add(r);
        let account = r.final_attempt().map(|e| e.account_id.as_str()).unwrap_or_default();
        for (map, name) in [
            (&mut self.by_model, r.model.as_str()),
            (&mut self.by_key, r.api_key_id.as_str()),
            (&mut self.by_account, account),
        ] {
            match map.get_mut(name) {
                Some(acc) => acc.add(r),
                None => map.entry(name.to_string()).or_default().add(r),
            }
        }
    }

    pub fn finish(self, truncated: bool) -> StatsReport {
        let rows = |m: BTreeMap<String, StatsAcc>| m.into_iter().map(|(name, acc)| acc.finish(&name)).collect();
        StatsReport {
            total: self.total.finish(""),
            by_model: rows(self.by_model),
            by_key: rows(self.by_key),
            by_account: rows(self.by_account),
            truncated,
        }
    }
}

/// The statistics panel of these records.
pub fn stats_report(records: &[RequestRecord], truncated: bool) -> StatsReport {
    let mut acc = ReportAcc::default();
    for r in records {
        acc.add(r);
    }
    acc.finish(truncated)
}

/// Usage rows the statistics read per store call, about (a window of the log, newest first).
pub const STATS_WINDOW_ROWS: u32 = 20_000;

/// The statistics panel over every record matching `filter`, newest first, at most
/// [`MAX_STATS_SCAN`] records. One pass over the log in windows of about
/// [`STATS_WINDOW_ROWS`] usage rows (each window: the requests whose latest row falls in it, all
/// their rows read at once), the records built and filtered by the same rules as [`list`]'s; no
/// page is cut and no record is read twice.
pub async fn stats_over(store: &DynStore, filter: &Filter) -> Result<StatsReport> {
    stats_in_windows(store, filter, STATS_WINDOW_ROWS).await
}

/// [`stats_over`] with windows of about `window_rows` usage rows (tests walk many small ones).
pub async fn stats_in_windows(store: &DynStore, filter: &Filter, window_rows: u32) -> Result<StatsReport> {
    let floor = filter.since.unwrap_or(Millis::MIN);
    let mut before = filter.until.unwrap_or(Millis::MAX);
    let mut acc = ReportAcc::default();
    let mut counted = 0usize;
    while before > floor {
        let from = store
            .request_window_floor(floor, before, window_rows)
            .await?
            .unwrap_or(floor)
            .max(floor);
        let mut by_id: BTreeMap<String, Vec<UsageEvent>> = BTreeMap::new();
        for e in store.request_window_events(from, before).await? {
            by_id.entry(e.request_id.clone()).or_default().push(e);
        }
        let mut records: Vec<RequestRecord> = by_id
            .into_values()
            .filter_map(RequestRecord::from_events)
            .filter(|r| filter.matches(r))
            .collect();
        // Newest first, so that a cut keeps the newest records (as `all` does).
        records.sort_by(|a, b| (b.time, b.id.as_bytes()).cmp(&(a.time, a.id.as_bytes())));
        for r in &records {
            if counted == MAX_STATS_SCAN {
                return Ok(acc.finish(true));
            }
            acc.add(r);
            counted += 1;
        }
        if from == floor {
            break;
        }
        before = from;
    }
    Ok(acc.finish(false))
}

/// A filter's time range, checked.
pub fn check_range(since: Option<Millis>, until: Option<Millis>) -> Result<()> {
    match (since, until) {
        (Some(s), Some(u)) if u <= s => Err(StoreError::Invalid("--until must be after --since".into())),
        _ => Ok(()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn status_filters_parse() {
        assert_eq!("ok".parse::<StatusFilter>().unwrap(), StatusFilter::Ok);
        assert_eq!("5xx".parse::<StatusFilter>().unwrap(), StatusFilter::Class(5));
        assert_eq!("429".parse::<StatusFilter>().unwrap(), StatusFilter::Code(429));
        assert_eq!(
            "overloaded_error".parse::<StatusFilter>().unwrap(),
            StatusFilter::Outcome("overloaded_error".into())
        );
        assert!("9xx".parse::<StatusFilter>().is_err());
        assert!("42".parse::<StatusFilter>().is_err());
        assert!("Bad Value".parse::<StatusFilter>().is_err());
    }

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let c = Cursor {
            time: 1_700_000_000_123,
            id: "0190-abc.def".into(),
        };
        assert_eq!(Cursor::decode(&c.encode()).unwrap(), c);
        assert!(Cursor::decode("not a cursor!").is_err());
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50), 50);
        assert_eq!(percentile(&v, 99), 99);
        assert_eq!(percentile(&[7], 99), 7);
        assert_eq!(percentile(&[], 50), 0);
    }
}
