//! Webhook notifications: the recent ones with their delivery state, and a test send.

use super::AdminApi;
use crate::api::auth::Actor;
use relay_proto::settings;
use relay_proto::v1 as pb;
use std::sync::Arc;
use tonic::Status;

impl AdminApi {
    pub(super) async fn list_notifications(
        &self,
        _actor: &Actor,
        r: pb::ListNotificationsRequest,
    ) -> Result<pb::ListNotificationsResponse, Status> {
        let limit = match r.limit {
            0 => 50,
            n => n.min(1000),
        };
        let rows = self.store.notify_recent(limit).await?;
        let notifications = rows
            .into_iter()
            .map(|e| {
                let doc: serde_json::Value = serde_json::from_str(&e.notification.payload).unwrap_or_default();
                let text = |k: &str| doc.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
                pb::Notification {
                    id: text("id"),
                    r#type: e.notification.kind.clone(),
                    summary: text("summary"),
                    created_at_ms: e.notification.created_ms,
                    state: e.state,
                    attempts: e.notification.attempts,
                    next_attempt_at_ms: e.next_attempt_ms,
                    last_error: e.last_error,
                    done_at_ms: e.done_ms,
                }
            })
            .collect();
        Ok(pb::ListNotificationsResponse { notifications })
    }

    pub(super) async fn test_notification(
        &self,
        actor: &Actor,
        _r: pb::TestNotificationRequest,
    ) -> Result<pb::TestNotificationResponse, Status> {
        let values = self.store.settings().await?;
        let hook = crate::notify::Webhook::from_settings(&values, &self.key).ok_or_else(|| {
            Status::failed_precondition(
                "no webhook is configured: relayctl settings set notify.webhook_url URL (see docs/operations.md, Notifications)",
            )
        })?;
        let upstreams = match &self.prober {
            Some(p) => p.upstreams.clone(),
            None => Arc::new(
                relay_net::client::Upstreams::new(&Default::default())
                    .map_err(|e| Status::internal(format!("cannot build the HTTP client: {e}")))?,
            ),
        };
        let doc = crate::notify::test_document(&actor.name, crate::model::now_ms());
        let (http_status, error) = match crate::notify::send(&upstreams, &hook, &doc).await {
            Ok(s) => (u32::from(s), String::new()),
            Err(e) => (0, e),
        };
        tracing::info!(actor = %actor.name, http_status, "test notification sent");
        Ok(pb::TestNotificationResponse {
            http_status,
            error,
            webhook: settings::mask(&hook.url),
            format: if hook.slack { "slack" } else { "json" }.into(),
            signed: hook.secret.is_some(),
        })
    }
}
