//! The one in-process control plane of relay's tests (feature `control-plane`): a store on
//! SQLite or Postgres with the defaults and known tokens, served on a port of its own, that can
//! be stopped and served again on the same port and store; clients authenticated as admin,
//! read-only or data plane (Admin, Watch, Report). The control plane's own tests and the
//! end-to-end tests both use it.
//!
//! A harness fails the test that uses it: it unwraps and panics on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::{free_port, wait_for, TestDb};
use relay_control_plane::api::admin::admin_token_row;
use relay_control_plane::bootstrap;
use relay_control_plane::crypto::MasterKey;
use relay_control_plane::model::{AuditRecord, Mutation, Role, UsageRow};
use relay_control_plane::server::{self, Options, ServerTls};
use relay_control_plane::store::postgres::PostgresStore;
use relay_control_plane::store::sqlite::SqliteStore;
use relay_control_plane::store::DynStore;
use relay_proto::v1 as pb;
use relay_proto::v1::admin_client::AdminClient;
use relay_proto::v1::config_discovery_client::ConfigDiscoveryClient;
use relay_proto::v1::usage_ingest_client::UsageIngestClient;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status, Streaming};

/// The first admin token of every test control plane.
pub const ADMIN_TOKEN: &str = "rat-test-admin-token-0123456789abcdefghijklmnop";
/// A read-only token (on control planes made with it: see [`ControlPlane::create_with_tokens`]).
pub const RO_TOKEN: &str = "rat-test-read-only-token-0123456789abcdefghijkl";
/// The data-plane token of every test control plane.
pub const DP_TOKEN: &str = "rat-test-data-plane-token-0123456789abcdefghijk";

/// Which store the control plane runs on.
#[derive(Clone, Copy, Debug)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A fresh store: SQLite in a temporary directory, or a Postgres database of its own.
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

/// A control plane serving a store on `addr` (after [`ControlPlane::resume`]).
pub struct ControlPlane {
    pub addr: SocketAddr,
    pub store: DynStore,
    pub key: MasterKey,
    /// The Postgres database (Postgres only); kept until the last replica on it is dropped.
    pub db: Option<Arc<TestDb>>,
    /// The SQLite database's directory (SQLite only).
    pub sqlite_dir: Option<Arc<tempfile::TempDir>>,
    /// The replica name it serves as.
    pub replica: String,
    /// How often its config publisher polls the head.
    pub poll_interval: Duration,
    /// TLS for the listener, applied by the next `resume`.
    pub tls: Option<ServerTls>,
    /// The CA the clients verify a TLS listener with.
    pub tls_ca: Option<Vec<u8>>,
    /// Where `GetApiKey` reads keys' live counters, applied by the next `resume`.
    pub limiter: Option<Arc<relay_limits::Limiter>>,
    /// Where the web console listens, applied by the next `resume` (None: no console).
    pub web: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ControlPlane {
    /// A control plane with the admin and data-plane tokens, serving.
    pub async fn start(backend: Backend) -> Self {
        let mut cp = Self::create(backend).await;
        cp.resume().await;
        cp
    }

    /// A store with the defaults, the admin token and the data-plane token, and a free port
    /// reserved for it, not serving yet (`resume` starts it; until then connections are refused).
    pub async fn create(backend: Backend) -> Self {
        Self::create_with_tokens(backend, &[("dp", Role::DataPlane, DP_TOKEN)]).await
    }

    /// [`ControlPlane::create`] with these tokens (name, role, secret) after the admin token,
    /// each written as `relayctl token create` writes it.
    pub async fn create_with_tokens(backend: Backend, tokens: &[(&str, Role, &str)]) -> Self {
        let (store, db, dir) = new_store(backend).await;
        let key = MasterKey::generate();
        bootstrap::ensure_defaults(&store).await.unwrap();
        bootstrap::ensure_admin_token(&store, &key, Some(ADMIN_TOKEN), None)
            .await
            .unwrap();
        for (name, role, token) in tokens {
            store
                .apply(
                    vec![Mutation::InsertAdminToken(admin_token_row(&key, name, *role, token))],
                    AuditRecord {
                        actor: "test".into(),
                        action: "token.create".into(),
                        target: (*name).into(),
                        detail: "{}".into(),
                    },
                )
                .await
                .unwrap();
        }
        Self::over(store, key, db, dir).await
    }

    /// Another control plane over an existing store (for Postgres: another replica with its own
    /// pool and LISTEN connection on the same database), not serving yet.
    pub async fn over(
        store: DynStore,
        key: MasterKey,
        db: Option<Arc<TestDb>>,
        sqlite_dir: Option<Arc<tempfile::TempDir>>,
    ) -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            store,
            key,
            db,
            sqlite_dir,
            replica: "test".into(),
            poll_interval: Duration::from_millis(100),
            tls: None,
            tls_ca: None,
            limiter: None,
            web: None,
            stop: None,
            task: None,
        }
    }

    /// (Re)starts serving on the same address.
    pub async fn resume(&mut self) {
        let listener = wait_for(Duration::from_secs(10), "control-plane port to be free", || {
            let addr = self.addr;
            async move { tokio::net::TcpListener::bind(addr).await.ok() }
        })
        .await
        .unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let opts = Options {
            replica: self.replica.clone(),
            poll_interval: self.poll_interval,
            tls: self.tls.clone(),
            limiter: self.limiter.clone(),
            web: self.web,
            ..Options::default()
        };
        let fut = server::serve(self.store.clone(), self.key.clone(), listener, opts, async {
            let _ = rx.await;
        });
        self.task = Some(tokio::spawn(async move {
            let _ = fut.await;
        }));
        self.stop = Some(tx);
    }

    /// Stops serving (open streams are cut) and waits until it has.
    pub async fn kill(&mut self) {
        if let Some(t) = self.stop.take() {
            let _ = t.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// SQLite only: stops serving, closes the store, runs `f` on the database file (e.g. to
    /// restore a backup over it), reopens it and serves again.
    pub async fn with_store_closed(&mut self, f: impl FnOnce(&Path)) {
        let path = self.sqlite_path().expect("with_store_closed needs the SQLite backend");
        self.kill().await;
        let placeholder = Arc::new(SqliteStore::open_in_memory().unwrap()) as DynStore;
        let old = std::mem::replace(&mut self.store, placeholder);
        // The server's tasks let go of their clones as they wind down.
        wait_for(Duration::from_secs(10), "the store to be closed", || {
            let n = Arc::strong_count(&old);
            async move { (n == 1).then_some(()) }
        })
        .await
        .unwrap();
        drop(old);
        f(&path);
        self.store = Arc::new(SqliteStore::open(&path).unwrap()) as DynStore;
        self.resume().await;
    }

    /// `https://localhost:PORT` once TLS is on (the test certificates name localhost).
    pub fn url(&self) -> String {
        match self.tls {
            Some(_) => format!("https://localhost:{}", self.addr.port()),
            None => format!("http://{}", self.addr),
        }
    }

    /// The web console's base URL (`http://127.0.0.1:PORT`) when it is on.
    pub fn web_url(&self) -> Option<String> {
        self.web.map(|a| format!("http://{a}"))
    }

    /// The SQLite database file (SQLite control planes only).
    pub fn sqlite_path(&self) -> Option<PathBuf> {
        self.sqlite_dir.as_ref().map(|d| d.path().join("relay.db"))
    }

    /// A channel to the listener, once it accepts (verifying TLS with `tls_ca` when set).
    pub async fn channel(&self) -> Channel {
        wait_for(Duration::from_secs(10), "control plane to accept connections", || {
            let url = self.url();
            let ca = self.tls_ca.clone();
            async move {
                let mut endpoint = Channel::from_shared(url).ok()?;
                if let Some(ca) = ca {
                    let tls = tonic::transport::ClientTlsConfig::new()
                        .ca_certificate(tonic::transport::Certificate::from_pem(ca));
                    endpoint = endpoint.tls_config(tls).ok()?;
                }
                endpoint.connect().await.ok()
            }
        })
        .await
        .unwrap()
    }

    /// An Admin client presenting `token` (or none).
    pub async fn admin_as(&self, token: Option<&str>) -> AdminClient<Authed> {
        AdminClient::with_interceptor(self.channel().await, BearerInterceptor(token.map(String::from)))
    }

    /// An Admin client presenting [`ADMIN_TOKEN`].
    pub async fn admin(&self) -> AdminClient<Authed> {
        self.admin_as(Some(ADMIN_TOKEN)).await
    }

    /// A Watch stream as data plane `node`, holding `held`, with [`DP_TOKEN`].
    pub async fn watch(&self, held: Option<pb::ConfigVersion>, node: &str) -> Watcher {
        self.watch_as(DP_TOKEN, held, node).await.unwrap()
    }

    /// A Watch stream presenting `token`: its `Hello` sent, the stream open (or refused).
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

    /// A UsageIngest client presenting `token`.
    pub async fn usage(&self, token: &str) -> UsageIngestClient<Authed> {
        UsageIngestClient::with_interceptor(self.channel().await, BearerInterceptor(Some(token.to_string())))
    }

    /// Adds an anthropic-compatible account pointing at `base_url`, returns its id.
    pub async fn add_account(&self, name: &str, base_url: &str, secret: &str) -> String {
        self.admin()
            .await
            .create_account(pb::CreateAccountRequest {
                name: name.into(),
                kind: pb::AccountKind::AnthropicCompatible as i32,
                base_url: base_url.into(),
                credential: secret.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .id
    }

    /// Sets an operator setting (`relayctl settings set NAME VALUE`).
    pub async fn set_setting(&self, name: &str, value: &str) {
        self.admin()
            .await
            .set_setting(pb::SetSettingRequest {
                name: name.into(),
                value: value.into(),
            })
            .await
            .unwrap();
    }

    /// Creates a key; returns (id, secret).
    pub async fn add_key(&self, name: &str, models: &[&str]) -> (String, String) {
        let r = self
            .admin()
            .await
            .create_api_key(pb::CreateApiKeyRequest {
                name: name.into(),
                allowed_models: models.iter().map(|m| m.to_string()).collect(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        (r.info.unwrap().id, r.key)
    }

    /// The store's config head.
    pub async fn head(&self) -> pb::ConfigVersion {
        let v = self.store.head().await.unwrap();
        pb::ConfigVersion::new(v.epoch, v.revision)
    }

    /// Usage totals over everything stored.
    pub async fn usage_total(&self) -> UsageRow {
        self.store
            .query_usage(Default::default())
            .await
            .unwrap()
            .into_iter()
            .next()
            .unwrap_or_default()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(t) = self.stop.take() {
            let _ = t.send(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// A client channel with a bearer token on every call.
pub type Authed = InterceptedService<Channel, BearerInterceptor>;

/// Adds `authorization: Bearer <token>` (when there is one) to every call.
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

/// A Watch stream as a data plane holds it.
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
