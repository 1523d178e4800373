//! An in-process control plane on a free port, on SQLite or Postgres, with
//! clients authenticated as admin, read-only and data plane.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use relay_control_plane::api::admin::admin_token_row;
use relay_control_plane::bootstrap;
use relay_control_plane::crypto::MasterKey;
use relay_control_plane::model::{AuditRecord, Mutation, Role};
use relay_control_plane::server::{self, Options};
use relay_control_plane::store::postgres::PostgresStore;
use relay_control_plane::store::sqlite::SqliteStore;
use relay_control_plane::store::DynStore;
use relay_proto::v1 as pb;
use relay_proto::v1::admin_client::AdminClient;
use relay_proto::v1::config_discovery_client::ConfigDiscoveryClient;
use relay_proto::v1::usage_ingest_client::UsageIngestClient;
use relay_test_support::TestDb;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status, Streaming};

pub const ADMIN_TOKEN: &str = "rat-test-admin-token-0123456789abcdefghijklmnop";
pub const RO_TOKEN: &str = "rat-test-read-only-token-0123456789abcdefghijkl";
pub const DP_TOKEN: &str = "rat-test-data-plane-token-0123456789abcdefghijk";

#[derive(Clone, Copy, Debug)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub struct Cp {
    pub addr: SocketAddr,
    pub store: DynStore,
    pub key: MasterKey,
    shutdown: Option<oneshot::Sender<()>>,
    pub db: Option<Arc<TestDb>>,
    pub sqlite_dir: Option<Arc<tempfile::TempDir>>,
}

impl Drop for Cp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub async fn new_store(backend: Backend) -> (DynStore, Option<Arc<TestDb>>, Option<Arc<tempfile::TempDir>>) {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            let store = Arc::new(SqliteStore::open(&dir.path().join("relay.db")).unwrap()) as DynStore;
            (store, None, Some(Arc::new(dir)))
        }
        Backend::Postgres => {
            let db = TestDb::new().await.unwrap();
            let store = Arc::new(PostgresStore::connect(&db.url, 16).await.unwrap()) as DynStore;
            (store, Some(Arc::new(db)), None)
        }
    }
}

pub async fn start(backend: Backend) -> Cp {
    let (store, db, dir) = new_store(backend).await;
    let key = MasterKey::generate();
    bootstrap::ensure_defaults(&store).await.unwrap();
    bootstrap::ensure_admin_token(&store, &key, Some(ADMIN_TOKEN), None)
        .await
        .unwrap();
    for (name, role, token) in [("viewer", Role::ReadOnly, RO_TOKEN), ("dp", Role::DataPlane, DP_TOKEN)] {
        store
            .apply(
                vec![Mutation::InsertAdminToken(admin_token_row(&key, name, role, token))],
                AuditRecord {
                    actor: "test".into(),
                    action: "token.create".into(),
                    target: name.into(),
                    detail: "{}".into(),
                },
            )
            .await
            .unwrap();
    }
    start_replica(store, key, db, dir, "replica-a").await
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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let opts = Options {
        replica: replica.to_string(),
        poll_interval: poll,
        tls: None,
        ..Options::default()
    };
    tokio::spawn(server::serve(store.clone(), key.clone(), listener, opts, async {
        let _ = rx.await;
    }));
    Cp {
        addr,
        store,
        key,
        shutdown: Some(tx),
        db,
        sqlite_dir,
    }
}

pub type Authed = InterceptedService<Channel, BearerInterceptor>;

#[derive(Clone)]
pub struct BearerInterceptor(Option<String>);

impl tonic::service::Interceptor for BearerInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        Ok(req)
    }
}

impl Cp {
    pub async fn channel(&self) -> Channel {
        let url = format!("http://{}", self.addr);
        relay_test_support::wait_for(Duration::from_secs(10), "control plane to accept connections", || {
            let url = url.clone();
            async move { Channel::from_shared(url).ok()?.connect().await.ok() }
        })
        .await
        .unwrap()
    }

    pub async fn admin_as(&self, token: Option<&str>) -> AdminClient<Authed> {
        AdminClient::with_interceptor(self.channel().await, BearerInterceptor(token.map(String::from)))
    }

    pub async fn admin(&self) -> AdminClient<Authed> {
        self.admin_as(Some(ADMIN_TOKEN)).await
    }

    pub async fn watch(&self, held: Option<pb::ConfigVersion>, node: &str) -> Watcher {
        self.watch_as(DP_TOKEN, held, node).await.unwrap()
    }

    pub async fn watch_as(&self, token: &str, held: Option<pb::ConfigVersion>, node: &str) -> Result<Watcher, Status> {
        let mut client =
            ConfigDiscoveryClient::with_interceptor(self.channel().await, BearerInterceptor(Some(token.to_string())))
                .max_decoding_message_size(64 << 20);
        let (tx, rx) = mpsc::channel(8);
        tx.send(pb::WatchRequest {
            kind: Some(pb::watch_request::Kind::Hello(pb::Hello {
                node_id: node.to_string(),
                build_version: "test".into(),
                held,
                // One "process" per node id: a quick reconnect replaces its own
                // stale stream, as a real data plane's does.
                instance_id: format!("test-{node}"),
                ..Default::default()
            })),
        })
        .await
        .unwrap();
        let inbound = client.watch(ReceiverStream::new(rx)).await?.into_inner();
        Ok(Watcher { tx, inbound })
    }

    pub async fn usage(&self, token: &str) -> UsageIngestClient<Authed> {
        UsageIngestClient::with_interceptor(self.channel().await, BearerInterceptor(Some(token.to_string())))
    }
}

pub struct Watcher {
    pub tx: mpsc::Sender<pb::WatchRequest>,
    pub inbound: Streaming<pb::ConfigUpdate>,
}

impl Watcher {
    /// The next update, failing the test after 10 s.
    pub async fn next(&mut self) -> pb::ConfigUpdate {
        tokio::time::timeout(Duration::from_secs(10), self.inbound.message())
            .await
            .expect("no config update within 10 s")
            .expect("watch stream failed")
            .expect("watch stream ended")
    }

    /// Asserts that no update arrives within `d`.
    pub async fn expect_quiet(&mut self, d: Duration) {
        if let Ok(m) = tokio::time::timeout(d, self.inbound.message()).await {
            panic!("expected no update, got {m:?}");
        }
    }

    pub async fn ack(&self, u: &pb::ConfigUpdate) {
        self.tx
            .send(pb::WatchRequest {
                kind: Some(pb::watch_request::Kind::Ack(pb::Ack {
                    nonce: u.nonce.clone(),
                    version: u.version,
                    ..Default::default()
                })),
            })
            .await
            .unwrap();
    }

    pub async fn nack(&self, u: &pb::ConfigUpdate, serving: Option<pb::ConfigVersion>, error: &str) {
        self.tx
            .send(pb::WatchRequest {
                kind: Some(pb::watch_request::Kind::Nack(pb::Nack {
                    nonce: u.nonce.clone(),
                    serving,
                    error: error.to_string(),
                    reason: pb::NackReason::Invalid as i32,
                })),
            })
            .await
            .unwrap();
    }
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
