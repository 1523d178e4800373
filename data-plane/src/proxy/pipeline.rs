//! The pipeline: the stages a Messages or count_tokens request goes through, in order, each in
//! its own file. [`Proxy::stages`] is the whole path on one screen: a new per-request check is
//! a new stage file and one line there.

use super::admission::ClientRequest;
use super::attempt::AttemptCtx;
use super::capture::Recording;
use super::usage::Unattempted;
use super::{admission, client_request_id, fallback, groups, limit, reqlog, session, Proxy};
use crate::control::state::{KeyEntry, ServingConfig};
use crate::errors::{ApiError, Body};
use http::{Request, Response};
use hyper::body::Incoming;
use std::sync::Arc;
use std::time::Instant;

impl Proxy {
    /// Serves `POST /v1/messages` (`is_messages`) or `/v1/messages/count_tokens`: the key is
    /// admitted first; from then on the request leaves a usage row even if no attempt does.
    pub(super) async fn pipeline(
        &self,
        req: Request<Incoming>,
        request_id: &str,
        started: Instant,
        log: &Arc<reqlog::RequestLog>,
        is_messages: bool,
    ) -> Result<Response<Body>, ApiError> {
        let (cfg, key) = self.admit(req.headers())?;
        let span = tracing::Span::current();
        span.record("relay.key.name", key.name.as_str());
        span.record("relay.group", cfg.group_name(&key.group_id));
        let mut unattempted = Unattempted {
            spool: self.spool.clone(),
            pending: self.pending.clone(),
            node_id: self.node_id.clone(),
            request_id: request_id.to_string(),
            key_id: key.id.clone(),
            group_id: key.group_id.clone(),
            model: String::new(),
            stream: false,
            started,
            client_request_id: client_request_id(req.headers()).unwrap_or("").to_string(),
            attempted: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            outcome: None,
        };
        let mut capture = None;
        let out = self
            .stages(
                req,
                request_id,
                started,
                log,
                is_messages,
                cfg,
                key,
                &mut unattempted,
                &mut capture,
            )
            .await;
        unattempted.outcome = Some(match &out {
            Ok(r) => (r.status().as_u16(), String::new(), String::new()),
            Err(e) => (e.status.as_u16(), e.kind.to_string(), e.message.clone()),
        });
        // A capture rule chose this request: the answer is copied as it leaves.
        match (capture, out) {
            (None, out) => out,
            (Some(c), Ok(resp)) => Ok(c.wrap(resp, log.clone())),
            (Some(c), Err(e)) => {
                log.answered(e.status.as_u16(), Some(e.kind));
                c.refused(&e, request_id, log);
                Err(e)
            }
        }
    }

    /// The stages, in order. Each either refuses the request (its `ApiError` is the answer) or
    /// lets it go on; the retry loop at the end produces the answer.
    #[allow(clippy::too_many_arguments)]
    async fn stages(
        &self,
        req: Request<Incoming>,
        request_id: &str,
        started: Instant,
        log: &Arc<reqlog::RequestLog>,
        is_messages: bool,
        cfg: Arc<ServingConfig>,
        key: Arc<KeyEntry>,
        unattempted: &mut Unattempted,
        capture: &mut Option<Recording>,
    ) -> Result<Response<Body>, ApiError> {
        admission::check_version(req.headers())?;
        // The body counts against the key's share of held bodies until this function returns.
        let (req, _held) = self.read_request(req, cfg, key, is_messages).await?;
        unattempted.admitted(&req);
        *capture = self.captures.begin(&req, request_id, started);
        log.admitted(
            &req.key.name,
            req.group_name(),
            &req.model,
            req.stream,
            req.cfg.policy.success_sample,
        );
        admission::check_model(&req)?;
        groups::check(&req)?;
        let limited = limit::check(&self.limiter, &self.spend, &req).await?;
        // Every attempt must be done within `retry.deadline_ms` from here.
        let deadline = tokio::time::Instant::now() + req.cfg.policy.retry_deadline;
        let session = session::lookup(self.sessions.as_ref(), &req).await;
        let ctx = AttemptCtx::new(
            &req,
            request_id,
            started,
            deadline,
            limited.charge.clone(),
            &unattempted.attempted,
            log,
        );
        let out = self.attempts(&ctx, &session).await;
        let out = fallback::estimate_unanswered(out, &req, request_id).await;
        limited.decorate(out)
    }
}

impl ClientRequest {
    fn group_name(&self) -> &str {
        self.cfg.group_name(&self.key.group_id)
    }
}
