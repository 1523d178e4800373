//! Bearer-token authentication for every gRPC service.
//!
//! Tokens are looked up by their keyed hash and the stored hash is compared in
//! constant time. Roles: `admin` may do everything on the Admin API,
//! `read-only` may list and report, `data-plane` may only Watch and Report.

use crate::crypto::{hashes_equal, MasterKey};
use crate::model::Role;
use crate::store::DynStore;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::watch;
use tonic::metadata::MetadataMap;
use tonic::Status;

/// Every token's role, by keyed hash, as the store has it now.
type TokenRoles = Arc<HashMap<String, Role>>;

/// The tokens as of one published head.
type TokensAt = (crate::model::Version, TokenRoles);

fn at_or_after(a: crate::model::Version, b: crate::model::Version) -> bool {
    (a.epoch, a.revision) >= (b.epoch, b.revision)
}

/// Follows the admin tokens through the config publisher (which re-reads them
/// with every head: a revocation is a store write, so it moves the head), so
/// long-lived streams end when their token is revoked or its role changes.
#[derive(Clone)]
pub struct TokenWatch {
    rx: watch::Receiver<TokensAt>,
}

impl TokenWatch {
    pub fn start(mut published: watch::Receiver<Arc<crate::api::publish::Published>>) -> Self {
        let first = {
            let p = published.borrow_and_update();
            (p.snapshot.version, p.snapshot.tokens.clone())
        };
        let (tx, rx) = watch::channel(first);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = published.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                }
                let now = {
                    let p = published.borrow_and_update();
                    (p.snapshot.version, p.snapshot.tokens.clone())
                };
                tx.send_replace(now);
            }
        });
        Self { rx }
    }
}

/// A stream's credential: resolves [`StreamAuth::revoked`] when the token is
/// gone or no longer has the role the stream needs.
pub struct StreamAuth {
    hash: String,
    role: Role,
    /// The store's head right after the token was checked: a published head
    /// older than this may not know the token yet, and says nothing about it.
    since: crate::model::Version,
    rx: Option<watch::Receiver<TokensAt>>,
}

impl StreamAuth {
    /// Whether the token still authorizes the stream in `tokens` (a head's view).
    pub fn valid_at(&self, head: &crate::api::publish::Snapshot) -> bool {
        self.rx.is_none() || !self.revoked_in(&(head.version, head.tokens.clone()))
    }

    fn revoked_in(&self, (version, tokens): &TokensAt) -> bool {
        at_or_after(*version, self.since) && tokens.get(&self.hash) != Some(&self.role)
    }

    /// Resolves once the token no longer authorizes the stream (never without a [`TokenWatch`]).
    pub async fn revoked(&mut self) -> Status {
        let Some(rx) = self.rx.as_mut() else {
            return std::future::pending().await;
        };
        let (hash, role, since) = (&self.hash, self.role, self.since);
        let _ = rx
            .wait_for(|(v, m)| at_or_after(*v, since) && m.get(hash) != Some(&role))
            .await;
        metrics::counter!(relay_proto::metrics::STREAMS_CLOSED_TOTAL, "reason" => "token_revoked").increment(1);
        Status::unauthenticated("the token of this stream was revoked or its role changed")
    }
}

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Admin API reads.
    Read,
    /// Admin API writes.
    Write,
    /// Watch and Report.
    DataPlane,
}

/// Who is calling, as the audit log names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    pub name: String,
    pub role: Role,
}

#[derive(Clone)]
pub struct Authenticator {
    store: DynStore,
    key: MasterKey,
    /// Data planes must present a TLS client certificate for their node id.
    client_certs: bool,
    tokens: Option<TokenWatch>,
}

fn bearer(md: &MetadataMap) -> Option<&str> {
    let v = md.get("authorization")?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}

impl Authenticator {
    pub fn new(store: DynStore, key: MasterKey) -> Self {
        Self {
            store,
            key,
            client_certs: false,
            tokens: None,
        }
    }

    /// Streams authenticated by this one end when their token is revoked.
    pub fn with_token_watch(mut self, tokens: TokenWatch) -> Self {
        self.tokens = Some(tokens);
        self
    }

    /// [`Self::check`] for a long-lived stream: also returns what ends it when
    /// the token is revoked.
    pub async fn check_stream(&self, md: &MetadataMap, need: Need) -> Result<(Actor, StreamAuth), Status> {
        let actor = self.check(md, need).await?;
        // Read after the check: a head at or past this one was published from a
        // store that had the token (unless it was revoked since).
        let since = self.store.head().await?;
        let hash = bearer(md).map(|t| self.key.hash_admin_token(t)).unwrap_or_default();
        let role = actor.role;
        Ok((
            actor,
            StreamAuth {
                hash,
                role,
                since,
                rx: self.tokens.as_ref().map(|t| t.rx.clone()),
            },
        ))
    }

    /// Requires data planes to prove their node id with a TLS client certificate.
    pub fn with_client_certs(mut self, required: bool) -> Self {
        self.client_certs = required;
        self
    }

    /// What `req`'s connection proves about the data plane calling.
    pub fn node_identity<T>(&self, req: &tonic::Request<T>) -> super::identity::NodeIdentity {
        super::identity::NodeIdentity::of(req, self.client_certs)
    }

    /// Whether the call's token is known and has one of `roles`: from the tokens of the last
    /// published head when it is there, else from the store (a token created since). Used by the
    /// gate before a call's messages are decoded; methods still [`Self::check`] their own need.
    pub async fn admit(&self, md: &MetadataMap, roles: &[Role]) -> Result<(), Status> {
        let token = bearer(md)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Status::unauthenticated("missing bearer token (authorization: Bearer <token>)"))?;
        let hash = self.key.hash_admin_token(token);
        let known = self.tokens.as_ref().and_then(|t| t.rx.borrow().1.get(&hash).copied());
        let role = match known {
            Some(role) => role,
            None => {
                let found = self.store.find_admin_token(&hash).await?;
                match found.filter(|t| hashes_equal(&t.token_hash, &hash)) {
                    Some(t) => t.role,
                    None => {
                        metrics::counter!(relay_proto::metrics::ADMIN_AUTH_FAILURES_TOTAL, "reason" => "unknown_token")
                            .increment(1);
                        return Err(unknown_token(token));
                    }
                }
            }
        };
        if roles.contains(&role) {
            Ok(())
        } else {
            metrics::counter!(relay_proto::metrics::ADMIN_AUTH_FAILURES_TOTAL, "reason" => "role").increment(1);
            Err(Status::permission_denied(format!(
                "a token with role {role} may not call this service"
            )))
        }
    }

    /// Who the call's bearer token belongs to (UNAUTHENTICATED when nobody), and [`permit`]s it.
    pub async fn check(&self, md: &MetadataMap, need: Need) -> Result<Actor, Status> {
        let actor = self.identify(md).await?;
        permit(&actor, need)?;
        Ok(actor)
    }

    /// Who the call's bearer token belongs to, from the store: UNAUTHENTICATED when it is
    /// missing or unknown. What the caller may do is [`permit`]'s question.
    pub async fn identify(&self, md: &MetadataMap) -> Result<Actor, Status> {
        let token = bearer(md)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Status::unauthenticated("missing bearer token (authorization: Bearer <token>)"))?;
        let hash = self.key.hash_admin_token(token);
        let found = self.store.find_admin_token(&hash).await?;
        let Some(t) = found.filter(|t| hashes_equal(&t.token_hash, &hash)) else {
            metrics::counter!(relay_proto::metrics::ADMIN_AUTH_FAILURES_TOTAL, "reason" => "unknown_token")
                .increment(1);
            return Err(unknown_token(token));
        };
        Ok(Actor {
            name: t.name,
            role: t.role,
        })
    }
}

/// Whether `actor`'s role allows `need`: reads to admin and read-only tokens, writes to admin
/// tokens, Watch and Report to data-plane tokens. PERMISSION_DENIED otherwise.
pub fn permit(actor: &Actor, need: Need) -> Result<(), Status> {
    let allowed = match need {
        Need::Read => matches!(actor.role, Role::Admin | Role::ReadOnly),
        Need::Write => actor.role == Role::Admin,
        Need::DataPlane => actor.role == Role::DataPlane,
    };
    if allowed {
        return Ok(());
    }
    metrics::counter!(relay_proto::metrics::ADMIN_AUTH_FAILURES_TOTAL, "reason" => "role").increment(1);
    Err(Status::permission_denied(format!(
        "token {:?} has role {}, which may not do this",
        actor.name, actor.role
    )))
}

/// UNAUTHENTICATED for a token this deployment does not know; a client's API key given in its
/// place is told apart (an easy slip: both are relay's secrets).
fn unknown_token(token: &str) -> Status {
    if token.starts_with(crate::crypto::API_KEY_PREFIX) {
        return Status::unauthenticated(
            "invalid token: this is a client API key (rk-…), not an admin token (rat-…); the admin token is in \
             RELAY_ADMIN_TOKEN or, standalone, in the data directory's admin.token",
        );
    }
    Status::unauthenticated("invalid token")
}
