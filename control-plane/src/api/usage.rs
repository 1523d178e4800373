//! `UsageIngest.Report`: batches of usage events in, one ACK per batch out,
//! sent only after the batch is committed. Duplicates (same event id) are
//! absorbed by the store, so a resent batch never counts twice.
//! `UsageIngest.Spend`: the committed spend of every key and group with a budget
//! (see [`crate::spend`]).
//! `UsageIngest.StoreCaptures`: captured bodies (capture rules), stored once per request id as
//! shipped (compressed); best effort on the data plane's side (see `crate::capture`).

use super::auth::{Authenticator, Need};
use crate::model::UsageEvent;
use crate::spend::SpendCache;
use crate::store::DynStore;
use futures::Stream;
use relay_proto::v1 as pb;
use relay_proto::v1::usage_ingest_server::UsageIngest;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

/// Largest batch accepted in one message.
pub const MAX_BATCH: usize = 10_000;

pub struct UsageService {
    store: DynStore,
    auth: Authenticator,
    closing: super::Closing,
    spend: Arc<SpendCache>,
}

impl UsageService {
    pub fn new(store: DynStore, auth: Authenticator, closing: super::Closing, spend: Arc<SpendCache>) -> Self {
        Self {
            store,
            auth,
            closing,
            spend,
        }
    }
}

/// An error message as stored: at most [`MAX_ERROR_MESSAGE_BYTES`] (cut on a character boundary),
/// control characters replaced by spaces.
pub fn bounded_message(m: &str) -> String {
    let mut end = m.len().min(MAX_ERROR_MESSAGE_BYTES);
    while !m.is_char_boundary(end) {
        end -= 1;
    }
    m[..end].chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

/// A model name or id as stored: at most [`MAX_NAME_BYTES`] (cut on a character boundary),
/// control characters and whitespace replaced by `_`.
pub fn bounded_name(m: &str) -> String {
    let mut end = m.len().min(MAX_NAME_BYTES);
    while !m.is_char_boundary(end) {
        end -= 1;
    }
    m[..end]
        .chars()
        .map(|c| if c.is_control() || c.is_whitespace() { '_' } else { c })
        .collect()
}

/// The longest requested model name or group id a usage row keeps.
pub const MAX_NAME_BYTES: usize = 200;

/// The longest error message a usage row keeps.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 512;

/// Converts the wire events; those that can never be stored are returned apart.
pub fn convert(batch: &pb::UsageBatch) -> (Vec<UsageEvent>, usize) {
    let mut ok = Vec::with_capacity(batch.events.len());
    let mut rejected = 0;
    for e in &batch.events {
        let Ok(event_id) = uuid::Uuid::parse_str(&e.event_id) else {
            rejected += 1;
            continue;
        };
        // Counts beyond what one request can carry are clamped and the row flagged, never
        // dropped and never stored as is (they would overflow every sum).
        let mut e = e.clone();
        if relay_proto::bounds::clamp(&mut e) {
            metrics::counter!(relay_proto::metrics::USAGE_ROWS_FLAGGED_TOTAL, "anomaly" => relay_proto::bounds::SUSPECT).increment(1);
            tracing::warn!(
                node_id = %batch.node_id,
                request_id = %e.request_id,
                "a usage event with counts beyond what one request can carry was clamped and flagged suspect"
            );
        }
        if e.anomaly.split(',').any(|a| a == relay_proto::bounds::UNPARSED) {
            metrics::counter!(relay_proto::metrics::USAGE_ROWS_FLAGGED_TOTAL, "anomaly" => relay_proto::bounds::UNPARSED)
                .increment(1);
        }
        ok.push(UsageEvent {
            event_id,
            request_id: e.request_id.clone(),
            ts: e.timestamp_ms,
            node_id: if e.node_id.is_empty() {
                batch.node_id.clone()
            } else {
                e.node_id.clone()
            },
            api_key_id: e.api_key_id.clone(),
            account_id: e.account_id.clone(),
            // The model answered, or the one asked when the answer named none plausible: a
            // client's choice either way, bounded like the requested model (no control character
            // reaches an operator's terminal through `relayctl usage` or `requests list`).
            model: bounded_name(&e.model),
            input_tokens: e.input_tokens,
            output_tokens: e.output_tokens,
            cache_write_5m_tokens: e.cache_write_5m_tokens,
            cache_write_1h_tokens: e.cache_write_1h_tokens,
            cache_read_tokens: e.cache_read_tokens,
            cost_pico_usd: e.cost_pico_usd,
            http_status: e.http_status,
            error_type: e.error_type.clone(),
            stream: e.stream,
            cancelled: e.cancelled,
            latency_ms: e.latency_ms,
            ttfb_ms: e.ttfb_ms,
            upstream_request_id: e.upstream_request_id.clone(),
            web_search_requests: e.web_search_requests,
            anomaly: e.anomaly.clone(),
            // Checked again here: a data plane of another build, or a broken one, cannot store
            // anything longer or stranger than the data plane keeps.
            client_request_id: relay_proto::bounds::client_request_id(&e.client_request_id)
                .unwrap_or("")
                .to_string(),
            // At most a day (no request waits longer); an unknown reason is kept as "other".
            queue_wait_ms: e.queue_wait_ms.min(86_400_000),
            waited_for: match e.waited_for.as_str() {
                w @ ("" | "slot" | "cooldown" | "recovery") => w.to_string(),
                _ => "other".to_string(),
            },
            stream_events: u64::from(e.stream_events),
            // At most a day, like the wait.
            max_event_gap_ms: e.max_event_gap_ms.min(86_400_000),
            error_message: bounded_message(&e.error_message),
            model_requested: bounded_name(&e.model_requested),
            group_id: bounded_name(&e.group_id),
        });
    }
    (ok, rejected)
}

async fn run(
    mut inbound: Streaming<pb::UsageBatch>,
    identity: super::identity::NodeIdentity,
    tx: mpsc::Sender<Result<pb::BatchAck, Status>>,
    store: DynStore,
    mut closing: super::Closing,
    mut auth: super::auth::StreamAuth,
) {
    loop {
        // A batch being stored is finished and ACKed first; between batches a
        // shutdown ends the stream (the data plane resends what is unACKed).
        let next = tokio::select! {
            m = inbound.message() => m,
            _ = super::closed(&mut closing) => {
                let _ = tx.send(Err(super::shutting_down())).await;
                return;
            }
            status = auth.revoked() => {
                let _ = tx.send(Err(status)).await;
                return;
            }
        };
        let batch = match next {
            Ok(Some(b)) => b,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "usage stream ended");
                return;
            }
        };
        if batch.events.len() > MAX_BATCH {
            let _ = tx
                .send(Err(Status::invalid_argument(format!(
                    "a batch holds at most {MAX_BATCH} events"
                ))))
                .await;
            return;
        }
        // With client certificates, a data plane reports only its own usage.
        let claimed = std::iter::once(batch.node_id.as_str()).chain(
            batch
                .events
                .iter()
                .map(|e| e.node_id.as_str())
                .filter(|n| !n.is_empty()),
        );
        let mut checked: Option<&str> = None;
        for node in claimed {
            if checked == Some(node) {
                continue;
            }
            if let Err(status) = identity.check(node) {
                let _ = tx.send(Err(status)).await;
                return;
            }
            checked = Some(node);
        }
        if !batch.node_id.is_empty() {
            // The data plane's usage ingest lag: how old the oldest event it still holds is (0: it
            // holds nothing older than this batch, or it is a version that does not say).
            metrics::gauge!(relay_proto::metrics::DATA_PLANE_INGEST_LAG_SECONDS, "node_id" => batch.node_id.clone())
                .set(batch.oldest_unacked_age_ms as f64 / 1000.0);
        }
        let (events, rejected) = convert(&batch);
        if rejected > 0 {
            tracing::warn!(node_id = %batch.node_id, rejected, "usage events that can never be stored were dropped");
            metrics::counter!(relay_proto::metrics::USAGE_EVENTS_TOTAL, "outcome" => "rejected")
                .increment(rejected as u64);
        }
        let started = Instant::now();
        let span = tracing::info_span!(
            "usage ingest",
            otel.name = "usage.ingest",
            node_id = %batch.node_id,
            relay.usage.events = events.len() as i64,
            relay.usage.rejected = rejected as i64,
        );
        match store.insert_usage(&events).instrument(span).await {
            Ok(r) => {
                metrics::histogram!(relay_proto::metrics::USAGE_COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
                metrics::counter!(relay_proto::metrics::USAGE_EVENTS_TOTAL, "outcome" => "inserted")
                    .increment(r.inserted);
                metrics::counter!(relay_proto::metrics::USAGE_EVENTS_TOTAL, "outcome" => "duplicate")
                    .increment(r.duplicates);
                let ack = pb::BatchAck {
                    batch_id: batch.batch_id,
                    inserted: u32::try_from(r.inserted).unwrap_or(u32::MAX),
                    duplicates: u32::try_from(r.duplicates).unwrap_or(u32::MAX),
                    rejected: u32::try_from(rejected).unwrap_or(u32::MAX),
                };
                if tx.send(Ok(ack)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                // Not ACKed: the data plane keeps the batch in its spool and resends it.
                tracing::error!(error = %e, "cannot store usage batch");
                let _ = tx
                    .send(Err(Status::unavailable("usage store unavailable; resend later")))
                    .await;
                return;
            }
        }
    }
}

type ReportStream = Pin<Box<dyn Stream<Item = Result<pb::BatchAck, Status>> + Send>>;

#[tonic::async_trait]
impl UsageIngest for UsageService {
    type ReportStream = ReportStream;

    async fn report(&self, req: Request<Streaming<pb::UsageBatch>>) -> Result<Response<ReportStream>, Status> {
        let (_, stream_auth) = self.auth.check_stream(req.metadata(), Need::DataPlane).await?;
        let identity = self.auth.node_identity(&req);
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(run(
            req.into_inner(),
            identity,
            tx,
            self.store.clone(),
            self.closing.clone(),
            stream_auth,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn store_captures(&self, req: Request<pb::CaptureBatch>) -> Result<Response<pb::CaptureAck>, Status> {
        self.auth.check(req.metadata(), Need::DataPlane).await?;
        let identity = self.auth.node_identity(&req);
        let batch = req.into_inner();
        identity.check(&batch.node_id)?;
        let mut rejected = 0u32;
        let mut keep = Vec::with_capacity(batch.captures.len());
        for c in batch.captures {
            // A request id is 1..=128 visible ASCII characters; a document is bounded.
            let id_ok = !c.request_id.is_empty()
                && c.request_id.len() <= 128
                && c.request_id.bytes().all(|b| b.is_ascii_graphic());
            if !id_ok || c.document_zstd.is_empty() || c.document_zstd.len() > crate::capture::MAX_DOCUMENT_BYTES {
                rejected += 1;
                continue;
            }
            keep.push(crate::model::StoredCapture {
                request_id: c.request_id,
                rule_id: c.rule_id,
                api_key_id: c.api_key_id,
                node_id: batch.node_id.clone(),
                captured_ms: c.captured_ms,
                expires_ms: c.expires_ms.max(0),
                truncated: c.truncated,
                document_zstd: c.document_zstd,
            });
        }
        let r = self.store.insert_captures(&keep).await.map_err(|e| {
            tracing::warn!(error = %e, "cannot store captures");
            Status::unavailable("capture store unavailable; resend later")
        })?;
        Ok(Response::new(pb::CaptureAck {
            stored: u32::try_from(r.inserted).unwrap_or(u32::MAX),
            duplicates: u32::try_from(r.duplicates).unwrap_or(u32::MAX),
            rejected,
        }))
    }

    async fn spend(&self, req: Request<pb::SpendRequest>) -> Result<Response<pb::SpendResponse>, Status> {
        self.auth.check(req.metadata(), Need::DataPlane).await?;
        let answer = self.spend.report().await?;
        Ok(Response::new(spend_to_pb(&answer)))
    }
}

/// The `Spend` answer as the wire carries it.
fn spend_to_pb(r: &crate::spend::SpendReport) -> pb::SpendResponse {
    let spend = |(id, s): &(String, crate::spend::Spent)| pb::Spend {
        id: id.clone(),
        day_pico_usd: s.day,
        month_pico_usd: s.month,
    };
    pb::SpendResponse {
        day: r.day.clone(),
        month: r.month.clone(),
        computed_at_ms: r.computed_at_ms,
        data_planes: r.data_planes,
        keys: r.keys.iter().map(spend).collect(),
        groups: r.groups.iter().map(spend).collect(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_model_name_is_stored_without_control_characters() {
        let batch = pb::UsageBatch {
            node_id: "dp".into(),
            events: vec![pb::UsageEvent {
                event_id: uuid::Uuid::now_v7().to_string(),
                request_id: "req_1".into(),
                model: "\u{1b}[2J\u{1b}[31mEVIL\u{7}".into(),
                model_requested: "claude-sonnet-4-5".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let (events, rejected) = convert(&batch);
        assert_eq!(rejected, 0);
        assert_eq!(events[0].model, "_[2J_[31mEVIL_");
        assert_eq!(events[0].model_requested, "claude-sonnet-4-5");
    }
}
