//! The control plane's integration tests on the shared in-process control plane
//! (`relay_test_support::control_plane`), with admin, read-only and data-plane tokens.
#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use relay_control_plane::crypto::MasterKey;
use relay_control_plane::model::Role;
use relay_control_plane::store::DynStore;
use relay_proto::v1 as pb;
use relay_test_support::TestDb;
use std::sync::Arc;
use std::time::Duration;

pub use relay_test_support::control_plane::{
    new_store, Backend, ControlPlane as Cp, Watcher, ADMIN_TOKEN, DP_TOKEN, RO_TOKEN,
};

/// A control plane serving as `replica-a`, with a read-only token (`viewer`) and a data-plane
/// token (`dp`) beside the admin token.
pub async fn start(backend: Backend) -> Cp {
    let mut cp = Cp::create_with_tokens(
        backend,
        &[("viewer", Role::ReadOnly, RO_TOKEN), ("dp", Role::DataPlane, DP_TOKEN)],
    )
    .await;
    cp.replica = "replica-a".into();
    cp.resume().await;
    cp
}

/// Another server over the same store kind (for Postgres: another replica
/// with its own pool and LISTEN connection on the same database).
pub async fn start_replica(
    store: DynStore,
    key: MasterKey,
    db: Option<Arc<TestDb>>,
    sqlite_dir: Option<Arc<tempfile::TempDir>>,
    replica: &str,
) -> Cp {
    start_replica_polling(store, key, db, sqlite_dir, replica, Duration::from_millis(100)).await
}

/// A replica whose config publisher polls the head every `poll`.
pub async fn start_replica_polling(
    store: DynStore,
    key: MasterKey,
    db: Option<Arc<TestDb>>,
    sqlite_dir: Option<Arc<tempfile::TempDir>>,
    replica: &str,
    poll: Duration,
) -> Cp {
    let mut cp = Cp::over(store, key, db, sqlite_dir).await;
    cp.replica = replica.into();
    cp.poll_interval = poll;
    cp.resume().await;
    cp
}

/// A data plane's view: the config it holds, updated like the real one.
#[derive(Default, Clone)]
pub struct Held {
    pub version: Option<pb::ConfigVersion>,
    pub config: pb::Resources,
}

impl Held {
    pub fn apply(&mut self, u: &pb::ConfigUpdate) {
        let held = self.version.as_ref().map(|v| (v, &self.config));
        self.config = relay_proto::apply_update(held, u).expect("update must apply and match its hash");
        self.version = u.version;
    }
}

pub fn account_req(name: &str, secret: &str) -> pb::CreateAccountRequest {
    pb::CreateAccountRequest {
        name: name.into(),
        kind: pb::AccountKind::AnthropicApiKey as i32,
        credential: secret.into(),
        ..Default::default()
    }
}

/// Runs a test body against both stores.
#[macro_export]
macro_rules! both_stores {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                ($body)(common::start(common::Backend::Sqlite).await).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                ($body)(common::start(common::Backend::Postgres).await).await
            }
        }
    };
}
