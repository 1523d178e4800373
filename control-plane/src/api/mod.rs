//! The wire side of the control plane: the only place where proto types meet the store and the
//! domain model (`tests/architecture.rs` checks it). `admin` is the Admin API (the service layer
//! behind `relayctl` and the console, and its gRPC adapter); `auth` checks bearer tokens and
//! roles; `discovery` serves `ConfigDiscovery.Watch`; `publish` is the published config in the
//! form Watch sends; `usage` serves `UsageIngest.Report`; `identity` ties a data plane's TLS client
//! certificate to its node id; `gate` checks every call's token before its messages are decoded;
//! `quota` converts subscription quota windows; `convert` maps domain types to proto and back;
//! `status` maps store errors to gRPC statuses; [`services`] mounts them all for the server.

pub mod admin;
pub mod auth;
pub mod convert;
pub mod discovery;
pub mod gate;
pub mod identity;
pub mod publish;
pub mod quota;
pub mod status;
pub mod usage;

use tokio::sync::watch;
use tonic::Status;

/// Becomes `true` when the control plane begins to shut down: open Watch and
/// Report streams end at once (data planes reconnect to another replica), so
/// the server's graceful shutdown does not wait on them.
pub type Closing = watch::Receiver<bool>;

/// Resolves once `closing` is `true` (or its sender is gone).
pub async fn closed(closing: &mut Closing) {
    let _ = closing.wait_for(|c| *c).await.map(|_| ());
}

/// What a stream that ends because the control plane is going away says.
pub fn shutting_down() -> Status {
    Status::unavailable("the control plane is shutting down; reconnect to another replica")
}

/// The relay services with their message limits, as the routes the server mounts (beside health
/// and reflection); each is marked serving in `health`.
pub async fn routes(
    admin: admin::AdminService,
    discovery: discovery::DiscoveryService,
    usage: usage::UsageService,
    health: &tonic_health::server::HealthReporter,
) -> tonic::service::Routes {
    use relay_proto::v1::admin_server::AdminServer;
    use relay_proto::v1::config_discovery_server::ConfigDiscoveryServer;
    use relay_proto::v1::usage_ingest_server::UsageIngestServer;
    let max = crate::server::MAX_MESSAGE_BYTES;
    let admin = AdminServer::new(admin)
        .max_decoding_message_size(gate::ADMIN_MAX_DECODE_BYTES)
        .max_encoding_message_size(max);
    let discovery = ConfigDiscoveryServer::new(discovery)
        .max_decoding_message_size(gate::DISCOVERY_MAX_DECODE_BYTES)
        .max_encoding_message_size(max);
    let usage = UsageIngestServer::new(usage)
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    health.set_serving::<AdminServer<admin::AdminService>>().await;
    health
        .set_serving::<ConfigDiscoveryServer<discovery::DiscoveryService>>()
        .await;
    health.set_serving::<UsageIngestServer<usage::UsageService>>().await;
    tonic::service::Routes::new(admin)
        .add_service(discovery)
        .add_service(usage)
}
