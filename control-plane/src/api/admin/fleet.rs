//! The fleet as the control plane sees it: connected data planes (`ListProxies`), the config
//! head (`GetConfigVersion`), this replica and the leader (`GetStatus`).

use super::AdminApi;
use crate::api::auth::Actor;
use crate::api::convert::{resource_kind_to_pb, version_pb};
use crate::model::*;
use relay_proto::v1 as pb;
use tonic::Status;

impl AdminApi {
    pub(super) async fn list_proxies(
        &self,
        _actor: &Actor,
        _r: pb::ListProxiesRequest,
    ) -> Result<pb::ListProxiesResponse, Status> {
        let head = self.store.head().await?;
        let proxies = self.store.list_proxies().await?;
        let now = crate::model::now_ms();
        Ok(pb::ListProxiesResponse {
            proxies: proxies
                .into_iter()
                .map(|p| pb::ProxyState {
                    connected: p.live(now),
                    node_id: p.node_id,
                    build_version: p.build_version,
                    acked: p.acked.map(version_pb),
                    last_nack_version: p.nack_version.map(version_pb),
                    last_nack_error: p.nack_error,
                    last_nack_at_ms: p.nack_at,
                    last_seen_ms: p.last_seen,
                    replica: p.replica,
                    rejected: p
                        .rejected
                        .into_iter()
                        .map(|r| pb::RejectedResource {
                            r#ref: Some(pb::ResourceRef {
                                kind: r
                                    .kind
                                    .parse::<ResourceKind>()
                                    .map_or(0, |k| resource_kind_to_pb(k) as i32),
                                id: r.id,
                            }),
                            error: r.error,
                        })
                        .collect(),
                })
                .collect(),
            head: Some(version_pb(head)),
        })
    }

    pub(super) async fn get_config_version(
        &self,
        _actor: &Actor,
        _r: pb::GetConfigVersionRequest,
    ) -> Result<pb::ConfigVersion, Status> {
        let v = self.store.head().await?;
        Ok(version_pb(v))
    }

    pub(super) async fn get_status(
        &self,
        _actor: &Actor,
        _r: pb::GetStatusRequest,
    ) -> Result<pb::GetStatusResponse, Status> {
        let leader = self.store.leader().await?;
        Ok(pb::GetStatusResponse {
            replica: self.replica.clone(),
            build_version: env!("CARGO_PKG_VERSION").to_string(),
            leader: leader.map(|l| pb::LeaderInfo {
                holder: l.holder,
                mechanism: l.mechanism,
                since_ms: l.since_ms,
                term: l.term,
                detail: l.detail,
            }),
            replica_is_leader: self.leadership.as_ref().is_some_and(|l| l.role().is_leading()),
            replica_mechanism: self
                .leadership
                .as_ref()
                .map(|l| l.mechanism().to_string())
                .unwrap_or_default(),
            current_leader: self.leadership.as_ref().map(|l| match l.role() {
                crate::leader::Role::Leading { .. } => self.replica.clone(),
                crate::leader::Role::Following { leader } => leader.unwrap_or_default(),
            }),
        })
    }
}
