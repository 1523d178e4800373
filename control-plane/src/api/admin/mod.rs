//! The Admin API: the ONE service layer behind `relayctl` (over gRPC) and the web console (in
//! process). Validation, secrets sealed or hashed before they reach the store,
//! optimistic-concurrency retries, and an audit record for every write.
//!
//! [`AdminApi`] is a plain struct. Every operation is one call,
//! `api.call(&caller, request).await`: `caller` is who is calling ([`Actor`]: the name the audit
//! log records, and a role), `request` is the RPC's request message, which names the RPC
//! ([`rpcs`]). `call` checks the caller's role against what the RPC needs, as [`rpcs::RPCS`]
//! declares it once per RPC (reads: a read-only or admin token; writes: an admin token), counts
//! the call (`relay_admin_requests_total`), and runs the handler; writes are audited under the
//! caller's name. Nothing else reaches a handler: they are private to this module.
//!
//! [`grpc::AdminService`] is a thin tonic adapter: it turns the bearer token into an [`Actor`]
//! and calls the same `call`, so a console that authenticates its user and calls [`AdminApi`]
//! in process gets exactly the authorization and audit `relayctl` gets.
//!
//! One file per resource: `accounts`, `keys`, `groups`, `pricing`, `settings`, `tokens`,
//! `fleet` (data planes, config version, status), `reports` (audit log, usage), `requests` (the
//! request log), `capture` (capture rules, clearing the log), `notifications`; shared: `validate` (request checks), `lookup` (names, ids, id
//! prefixes).

mod accounts;
mod capture;
mod fleet;
mod groups;
pub mod grpc;
mod keys;
mod lookup;
mod notifications;
mod pricing;
mod reports;
pub mod requests;
pub mod rpcs;
mod settings;
mod tokens;
mod validate;

pub use accounts::{proxy_seal_context, redact_url, ANTHROPIC_BASE_URL};
pub use grpc::AdminService;
pub use rpcs::Rpc;
pub use tokens::admin_token_row;
pub use validate::{MAX_BUDGET_MICRO_USD, MAX_TPM};

use super::auth::Actor;
use crate::crypto::MasterKey;
use crate::model::{AuditRecord, Mutation, Version};
use crate::spend::SpendCache;
use crate::store::{DynStore, StoreError};
use std::sync::Arc;
use tonic::Status;

pub const DEFAULT_GROUP: &str = "default";
/// How often an update is retried when another writer changed the row meanwhile. Each retry
/// re-reads the row and waits a little longer (with jitter) first, so that many admins (or scripts)
/// updating one row at once all land, one after the other, on either store.
const CONFLICT_RETRIES: usize = 40;

/// The Admin API's operations, callable in process ([`AdminApi::call`]) and served over gRPC by
/// [`AdminService`].
pub struct AdminApi {
    store: DynStore,
    key: MasterKey,
    spend: Arc<SpendCache>,
    /// Keys' live counters (requests and tokens this minute, in flight).
    live: Option<Arc<relay_limits::Limiter>>,
    /// Runs `CheckAccounts` probes (None: refused).
    prober: Option<Arc<crate::jobs::probe::Prober>>,
    /// This replica's name and its part in the leader election (`GetStatus`).
    replica: String,
    leadership: Option<crate::leader::Leadership>,
    /// Ends `TailRequests` streams when the control plane shuts down.
    closing: Option<super::Closing>,
}

impl AdminApi {
    pub fn new(store: DynStore, key: MasterKey, spend: Arc<SpendCache>) -> Self {
        Self {
            store,
            key,
            spend,
            live: None,
            prober: None,
            replica: String::new(),
            leadership: None,
            closing: None,
        }
    }

    /// Reads live counters from this limiter (Redis, or the standalone data plane's).
    pub fn with_live(mut self, live: Option<Arc<relay_limits::Limiter>>) -> Self {
        self.live = live;
        self
    }

    /// Probes accounts for `CheckAccounts` with this prober.
    pub fn with_prober(mut self, prober: Option<Arc<crate::jobs::probe::Prober>>) -> Self {
        self.prober = prober;
        self
    }

    /// Names this replica and its leadership in `GetStatus`.
    pub fn with_replica(mut self, replica: &str, leadership: Option<crate::leader::Leadership>) -> Self {
        self.replica = replica.to_string();
        self.leadership = leadership;
        self
    }

    /// Ends open `TailRequests` streams when `closing` turns true.
    pub fn with_closing(mut self, closing: super::Closing) -> Self {
        self.closing = Some(closing);
        self
    }

    /// Runs one Admin RPC for `caller`: refused (PERMISSION_DENIED) unless the caller's role has
    /// what the RPC needs ([`rpcs::RPCS`]); counted either way.
    pub async fn call<R: Rpc>(&self, caller: &Actor, req: R) -> Result<R::Reply, Status> {
        let allowed = super::auth::permit(caller, R::NEED);
        count(R::LABEL, allowed.is_ok());
        allowed?;
        req.run(self, caller, rpcs::Authorized::granted()).await
    }

    /// Applies `m` in one store transaction with its audit record (the caller as actor).
    async fn apply(
        &self,
        actor: &Actor,
        action: &str,
        target: &str,
        detail: serde_json::Value,
        m: Vec<Mutation>,
    ) -> Result<Version, StoreError> {
        self.store
            .apply(
                m,
                AuditRecord {
                    actor: actor.name.clone(),
                    action: action.to_string(),
                    target: target.to_string(),
                    detail: detail.to_string(),
                },
            )
            .await
    }
}

/// Counts one Admin call by method (its handler's name) and whether it was let through.
pub(crate) fn count(method: &'static str, ok: bool) {
    let outcome = if ok { "ok" } else { "denied" };
    metrics::counter!(relay_proto::metrics::ADMIN_REQUESTS_TOTAL, "method" => method, "auth" => outcome).increment(1);
}

fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Runs `f` until it does not hit a concurrent-modification conflict.
async fn retry_conflicts<T, F, Fut>(mut f: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let mut attempt = 0;
    loop {
        match f().await {
            Err(s) if s.code() == tonic::Code::Aborted && attempt + 1 < CONFLICT_RETRIES => {
                attempt += 1;
                // 1 ms, 2 ms, ... up to 20 ms, each with up to as much again of jitter: writers
                // that collided spread out instead of colliding again in lockstep.
                let base = attempt.min(20) as u64;
                let jitter = rand::random::<u64>() % (base + 1);
                tokio::time::sleep(std::time::Duration::from_millis(base + jitter)).await;
            }
            r => return r,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::model::Role;
    use relay_proto::v1 as pb;

    /// A console calling the service layer in process gets what relayctl gets over gRPC: a
    /// read-only caller is refused a write (and nothing is stored), reads are served, and an
    /// admin's write is audited under the caller's name.
    #[tokio::test]
    async fn in_process_calls_are_authorized_and_audited() {
        let store: DynStore = Arc::new(crate::store::sqlite::SqliteStore::open_in_memory().unwrap());
        crate::bootstrap::ensure_defaults(&store).await.unwrap();
        let api = AdminApi::new(
            store.clone(),
            MasterKey::generate(),
            Arc::new(SpendCache::new(store.clone())),
        );
        let viewer = Actor {
            name: "console:viewer".into(),
            role: Role::ReadOnly,
        };
        let alice = Actor {
            name: "console:alice".into(),
            role: Role::Admin,
        };
        let create = || pb::CreateGroupRequest {
            name: "team-a".into(),
            ..Default::default()
        };
        let head = store.head().await.unwrap();
        let refused = api.call(&viewer, create()).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
        assert_eq!(store.head().await.unwrap(), head, "a refused write stored something");

        let made = api.call(&alice, create()).await.unwrap();
        assert_eq!(made.name, "team-a");
        let groups = api.call(&viewer, pb::ListGroupsRequest {}).await.unwrap();
        assert!(groups.groups.iter().any(|g| g.name == "team-a"));
        let audit = api
            .call(&viewer, pb::ListAuditRequest { limit: 10, since_ms: 0 })
            .await
            .unwrap();
        let entry = audit.entries.iter().find(|e| e.action == "group.create").unwrap();
        assert_eq!(
            (entry.actor.as_str(), entry.target.as_str()),
            ("console:alice", "team-a")
        );
    }
}
