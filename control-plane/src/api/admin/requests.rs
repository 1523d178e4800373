//! The request log's Admin calls (`ListRequests`, `GetRequest`, `RequestStats`, `TailRequests`):
//! proto filters to [`crate::requests::Filter`] (names resolved to ids), records to proto (ids
//! to names). The rules themselves are in `crate::requests`.

use super::AdminApi;
use crate::api::auth::Actor;
use crate::requests::{self, Cursor, Filter, RequestRecord, StatusFilter};
use crate::store::{DynStore, StoreError};
use relay_proto::v1 as pb;
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;
use tonic::Status;

/// Records a page holds when the caller asks for 0, and at most.
pub const DEFAULT_LIMIT: u32 = 50;
pub const MAX_LIMIT: u32 = 1_000;
/// How often `TailRequests` looks for new records.
pub const TAIL_POLL: Duration = Duration::from_millis(500);
/// A record is shown by tail once its last row is this old (ms): the attempts of one request
/// usually arrive together, and this gives a late one time to join its record.
pub const TAIL_SETTLE_MS: i64 = 2_000;
/// How far back tail looks on each poll for records stored late (ms).
pub const TAIL_WINDOW_MS: i64 = 300_000;

/// Names of keys, accounts and groups by id, for showing records.
#[derive(Default)]
pub struct Names {
    keys: HashMap<String, (String, String)>,
    accounts: HashMap<String, String>,
    groups: HashMap<String, String>,
}

impl Names {
    /// Every key, account and group by id; a deleted account or group by its last name with
    /// " (deleted)", as `relayctl usage` names it.
    pub async fn load(store: &DynStore) -> Result<Self, Status> {
        let keys = store.list_api_keys().await?;
        let accounts = store.list_accounts().await?;
        let groups = store.list_groups().await?;
        let mut names = Names {
            keys: keys.into_iter().map(|k| (k.id, (k.name, k.group_id))).collect(),
            accounts: HashMap::new(),
            groups: HashMap::new(),
        };
        for d in store.deleted_names().await? {
            let into = match d.kind.as_str() {
                "account" => &mut names.accounts,
                "group" => &mut names.groups,
                _ => continue,
            };
            into.insert(d.id, format!("{} (deleted)", d.name));
        }
        names.accounts.extend(accounts.into_iter().map(|a| (a.id, a.name)));
        names.groups.extend(groups.into_iter().map(|g| (g.id, g.name)));
        Ok(names)
    }

    fn account(&self, id: &str) -> String {
        self.accounts.get(id).cloned().unwrap_or_else(|| id.to_string())
    }

    pub fn record(&self, r: &RequestRecord) -> pb::RequestRecord {
        let key = self
            .keys
            .get(&r.api_key_id)
            .map_or_else(|| r.api_key_id.clone(), |k| k.0.clone());
        // The group the request was served in (carried in its usage rows), shown by its name now
        // (its id when the group is gone).
        let group_id = r.group_id.clone();
        pb::RequestRecord {
            id: r.id.clone(),
            time_ms: r.time,
            started_ms: r.started,
            key,
            key_id: r.api_key_id.clone(),
            group: self.groups.get(&group_id).cloned().unwrap_or_else(|| group_id.clone()),
            group_id,
            model: r.model.clone(),
            model_requested: r.model_requested.clone(),
            stream: r.stream,
            status: r.status,
            error_type: r.error_type.clone(),
            cancelled: r.cancelled,
            outcome: r.outcome.clone(),
            client_request_id: r.client_request_id.clone(),
            ttfb_ms: r.ttfb_ms,
            duration_ms: r.duration_ms,
            stream_events: r.stream_events,
            max_event_gap_ms: r.max_event_gap_ms,
            error_message: r.error_message.clone(),
            input_tokens: r.input_tokens,
            output_tokens: r.output_tokens,
            cache_write_5m_tokens: r.cache_write_5m_tokens,
            cache_write_1h_tokens: r.cache_write_1h_tokens,
            cache_read_tokens: r.cache_read_tokens,
            cost_pico_usd: r.cost_pico_usd,
            attempts: r
                .attempts
                .iter()
                .map(|e| pb::RequestAttempt {
                    event_id: e.event_id.to_string(),
                    time_ms: e.ts,
                    account: self.account(&e.account_id),
                    account_id: e.account_id.clone(),
                    node_id: e.node_id.clone(),
                    model: e.model.clone(),
                    status: e.http_status,
                    outcome: requests::outcome(e),
                    error_type: e.error_type.clone(),
                    latency_ms: e.latency_ms,
                    ttfb_ms: e.ttfb_ms,
                    queue_wait_ms: e.queue_wait_ms,
                    waited_for: e.waited_for.clone(),
                    upstream_request_id: e.upstream_request_id.clone(),
                    input_tokens: e.input_tokens,
                    output_tokens: e.output_tokens,
                    cache_write_5m_tokens: e.cache_write_5m_tokens,
                    cache_write_1h_tokens: e.cache_write_1h_tokens,
                    cache_read_tokens: e.cache_read_tokens,
                    cost_pico_usd: e.cost_pico_usd,
                    anomaly: e.anomaly.clone(),
                    stream_events: e.stream_events,
                    max_event_gap_ms: e.max_event_gap_ms,
                    error_message: e.error_message.clone(),
                })
                .collect(),
            capture: None,
        }
    }

    fn stats_row(&self, s: &requests::Stats, name: String) -> pb::RequestStatsRow {
        pb::RequestStatsRow {
            id: s.name.clone(),
            name,
            requests: s.requests,
            errors: s.errors,
            error_ratio: s.error_ratio,
            duration_p50_ms: s.duration_p50_ms,
            duration_p90_ms: s.duration_p90_ms,
            duration_p99_ms: s.duration_p99_ms,
            ttfb_p50_ms: s.ttfb_p50_ms,
            ttfb_p90_ms: s.ttfb_p90_ms,
            ttfb_p99_ms: s.ttfb_p99_ms,
            input_tokens: s.input_tokens,
            output_tokens: s.output_tokens,
            cache_write_5m_tokens: s.cache_write_5m_tokens,
            cache_write_1h_tokens: s.cache_write_1h_tokens,
            cache_read_tokens: s.cache_read_tokens,
            cost_pico_usd: s.cost_pico_usd,
        }
    }

    pub fn stats(&self, r: &requests::StatsReport) -> pb::RequestStatsResponse {
        pb::RequestStatsResponse {
            total: Some(self.stats_row(&r.total, String::new())),
            by_model: r.by_model.iter().map(|s| self.stats_row(s, s.name.clone())).collect(),
            by_key: r
                .by_key
                .iter()
                .map(|s| {
                    let name = self.keys.get(&s.name).map_or_else(|| s.name.clone(), |k| k.0.clone());
                    self.stats_row(s, name)
                })
                .collect(),
            by_account: r
                .by_account
                .iter()
                .map(|s| self.stats_row(s, self.account(&s.name)))
                .collect(),
            truncated: r.truncated,
        }
    }
}

/// The proto filter as the domain's, names resolved (an unknown name is NOT_FOUND).
pub async fn filter(store: &DynStore, f: Option<&pb::RequestFilter>) -> Result<Filter, Status> {
    let Some(f) = f else { return Ok(Filter::default()) };
    let since = (f.since_ms > 0).then_some(f.since_ms);
    let until = (f.until_ms > 0).then_some(f.until_ms);
    requests::check_range(since, until)?;
    let mut keys: Option<BTreeSet<String>> = None;
    if !f.key.is_empty() {
        let k = store
            .get_api_key(&f.key)
            .await?
            .ok_or_else(|| not_found("key", &f.key))?;
        keys = Some(BTreeSet::from([k.id]));
    }
    let group_id = if f.group.is_empty() {
        None
    } else {
        Some(match store.get_group(&f.group).await? {
            Some(g) => g.id,
            None => deleted(store, "group", &f.group).await?,
        })
    };
    let account_id = if f.account.is_empty() {
        None
    } else {
        Some(match store.get_account(&f.account).await? {
            Some(a) => a.id,
            None => deleted(store, "account", &f.account).await?,
        })
    };
    let status = if f.status.is_empty() {
        None
    } else {
        Some(f.status.parse::<StatusFilter>().map_err(Status::invalid_argument)?)
    };
    Ok(Filter {
        since,
        until,
        keys,
        group_id,
        account_id,
        model: (!f.model.is_empty()).then(|| f.model.clone()),
        model_requested: (!f.model_requested.is_empty()).then(|| f.model_requested.clone()),
        status,
        stream: f.stream,
        min_duration_ms: f.min_duration_ms,
    })
}

/// The id of a deleted account or group named `given` (its id, or its last name: the latest
/// deleted by that name), whose records keep its id; NOT_FOUND when none was.
async fn deleted(store: &DynStore, kind: &'static str, given: &str) -> Result<String, Status> {
    let gone = store.deleted_names().await?;
    let of_kind = || gone.iter().rev().filter(|d| d.kind == kind);
    of_kind()
        .find(|d| d.id == given)
        .or_else(|| of_kind().find(|d| d.name == given))
        .map(|d| d.id.clone())
        .ok_or_else(|| not_found(kind, given))
}

fn not_found(kind: &'static str, name: &str) -> Status {
    StoreError::NotFound {
        kind,
        name: name.to_string(),
    }
    .into()
}

pub async fn list(store: &DynStore, r: &pb::ListRequestsRequest) -> Result<pb::ListRequestsResponse, Status> {
    let f = filter(store, r.filter.as_ref()).await?;
    let limit = if r.limit == 0 {
        DEFAULT_LIMIT
    } else {
        r.limit.min(MAX_LIMIT)
    };
    let cursor = if r.cursor.is_empty() {
        None
    } else {
        Some(Cursor::decode(&r.cursor).map_err(Status::invalid_argument)?)
    };
    let page = requests::list(store, &f, cursor, limit as usize).await?;
    let names = Names::load(store).await?;
    Ok(pb::ListRequestsResponse {
        records: page.records.iter().map(|r| names.record(r)).collect(),
        next_cursor: page.next.map(|c| c.encode()).unwrap_or_default(),
    })
}

pub async fn get(store: &DynStore, id: &str) -> Result<pb::RequestRecord, Status> {
    if id.is_empty() || id.len() > 128 {
        return Err(Status::invalid_argument("a request id is 1 to 128 characters"));
    }
    let r = requests::get(store, id)
        .await?
        .ok_or_else(|| not_found("request", id))?;
    let mut out = Names::load(store).await?.record(&r);
    if let Some(c) = store.get_capture(id).await? {
        let document_json = crate::capture::inflate(&c.document_zstd).map_err(|e| Status::data_loss(e.to_string()))?;
        out.capture = Some(pb::RequestCapture {
            rule_id: c.rule_id,
            captured_ms: c.captured_ms,
            truncated: c.truncated,
            document_json,
            stored_bytes: c.document_zstd.len() as u64,
        });
    }
    Ok(out)
}

pub async fn stats(store: &DynStore, r: &pb::RequestStatsRequest) -> Result<pb::RequestStatsResponse, Status> {
    let f = filter(store, r.filter.as_ref()).await?;
    let report = requests::stats_over(store, &f).await?;
    Ok(Names::load(store).await?.stats(&report))
}

/// Sends every new record matching the filter, each once, until the receiver is dropped.
pub async fn tail(store: DynStore, f: Filter, tx: tokio::sync::mpsc::Sender<Result<pb::RequestRecord, Status>>) {
    let started = crate::model::now_ms();
    // Shown ids with their time, forgotten once older than the window.
    let mut shown: HashMap<String, i64> = HashMap::new();
    loop {
        let now = crate::model::now_ms();
        let mut window = f.clone();
        window.since = Some(f.since.unwrap_or(started).max(now - TAIL_WINDOW_MS).max(started));
        let mut fresh = match requests::all(&store, &window, 100_000).await {
            Ok((records, _)) => records,
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        };
        fresh.retain(|r| r.time <= now - TAIL_SETTLE_MS && !shown.contains_key(&r.id));
        fresh.reverse();
        if !fresh.is_empty() {
            let names = match Names::load(&store).await {
                Ok(n) => n,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            for r in &fresh {
                shown.insert(r.id.clone(), r.time);
                if tx.send(Ok(names.record(r))).await.is_err() {
                    return;
                }
            }
        }
        shown.retain(|_, t| *t >= now - 2 * TAIL_WINDOW_MS);
        tokio::select! {
            _ = tx.closed() => return,
            _ = tokio::time::sleep(TAIL_POLL) => {}
        }
    }
}

/// What `TailRequests` answers with: records as they are stored, until the caller goes away.
pub type TailStream = tokio_stream::wrappers::ReceiverStream<Result<pb::RequestRecord, Status>>;

impl AdminApi {
    pub(super) async fn list_requests(
        &self,
        _actor: &Actor,
        r: pb::ListRequestsRequest,
    ) -> Result<pb::ListRequestsResponse, Status> {
        list(&self.store, &r).await
    }

    pub(super) async fn get_request(
        &self,
        _actor: &Actor,
        r: pb::GetRequestRequest,
    ) -> Result<pb::RequestRecord, Status> {
        get(&self.store, &r.id).await
    }

    pub(super) async fn request_stats(
        &self,
        _actor: &Actor,
        r: pb::RequestStatsRequest,
    ) -> Result<pb::RequestStatsResponse, Status> {
        stats(&self.store, &r).await
    }

    pub(super) async fn tail_requests(&self, _actor: &Actor, r: pb::TailRequestsRequest) -> Result<TailStream, Status> {
        // Tail follows records from now on: a time range would be ignored, or (in the past)
        // show nothing ever.
        if r.filter.as_ref().is_some_and(|f| f.since_ms > 0 || f.until_ms > 0) {
            return Err(Status::invalid_argument(
                "tail follows new records from now on: --since and --until do not apply (use requests list for a time range)",
            ));
        }
        let filter = filter(&self.store, r.filter.as_ref()).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let tail = tail(self.store.clone(), filter, tx.clone());
        let closing = self.closing.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tail => {}
                _ = async move {
                    match closing {
                        Some(mut c) => crate::api::closed(&mut c).await,
                        None => std::future::pending().await,
                    }
                } => {
                    let _ = tx.send(Err(crate::api::shutting_down())).await;
                }
            }
        });
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
    }
}
