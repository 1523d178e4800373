//! Refreshes Claude subscription (OAuth) accounts' access tokens: ahead of expiry
//! (`oauth.refresh_ahead_ms`), and at once when a data plane reports a 401 from the account (at
//! most once per token). Runs on the leader only (see `leader::run_while_leading`), under the
//! leadership term it was started with.
//!
//! The refresh token rotates on every refresh, so the state machine for one account is:
//!
//! ```text
//!  due ──► call the token endpoint ──answer──► keep it (sealed, `oauth_pending`) ──► commit
//!                 │                                                               (fenced write)
//!                 ├─ invalid_grant ─► a kept answer for this token? apply it : UNAUTHORIZED
//!                 ├─ 5xx / timeout ─► back off (5 s doubling to 5 min), try again
//!                 └─ other 4xx ────► back off (1 min doubling to 30 min), logged
//! ```
//!
//! * **Kept before anything else.** The answer is stored (sealed with the master key) the moment
//!   it arrives, before the commit, by a task of its own that retries until the store takes it and
//!   that losing leadership does not cancel. A kept answer is applied by whichever leader comes next (a leader killed between
//!   the answer and the commit loses nothing), and only while the account still holds the refresh
//!   token that was spent (so a stale answer never overwrites a newer login).
//! * **Fenced.** The commit carries the leadership term (`Mutation::CheckTerm`): a replica that lost
//!   leadership while it waited on the token endpoint cannot overwrite what the new leader wrote.
//! * **Never in a loop.** `invalid_grant` takes the account out (UNAUTHORIZED, with the reason, an
//!   audit entry and a metric) until an operator logs in again; it is not retried.
//!
//! Nothing here logs a token.

use crate::crypto::{self, MasterKey};
use crate::model::{
    now_ms, Account, AccountHealth, AccountKind, AccountState, AuditRecord, Millis, Mutation, OAuthPending,
};
use crate::store::{DynStore, StoreError};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

/// Who the states and audit entries this job writes name.
pub const ACTOR: &str = "control-plane:oauth-refresh";
/// The default of `oauth.refresh_ahead_ms`.
pub const DEFAULT_REFRESH_AHEAD_MS: i64 = 5 * 60 * 1000;
/// How often the job looks for due accounts.
pub const TICK: Duration = Duration::from_secs(1);
/// Refreshes running at once.
const PARALLEL: usize = 8;

/// What a token endpoint answered to a refresh.
#[derive(Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Refreshed {
    pub access_token: String,
    /// The rotated refresh token (None: the endpoint kept the old one).
    pub refresh_token: Option<String>,
    pub expires_at_ms: Option<Millis>,
    #[serde(default)]
    pub scopes: Vec<String>,
}

impl std::fmt::Debug for Refreshed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refreshed")
            .field("expires_at_ms", &self.expires_at_ms)
            .field("rotated", &self.refresh_token.is_some())
            .finish_non_exhaustive()
    }
}

/// Why a refresh did not give tokens. Messages never carry a token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RefreshError {
    /// The refresh token is revoked or was already used: only a new login helps.
    #[error("refresh token rejected (invalid_grant): {0}")]
    InvalidGrant(String),
    /// Another refusal (a client or configuration problem): retried slowly.
    #[error("token endpoint refused the refresh: {0}")]
    Rejected(String),
    /// A server error, timeout or connection failure: retried with backoff.
    #[error("token endpoint unavailable: {0}")]
    Transient(String),
}

/// The token endpoint, as the job uses it (`relay-oauth` in production).
#[async_trait::async_trait]
pub trait TokenEndpoint: Send + Sync + 'static {
    /// Spends `refresh_token`; `settings` are the live `oauth.*` settings; `proxy_url` is the
    /// account's outbound proxy.
    async fn refresh(
        &self,
        settings: &BTreeMap<String, String>,
        refresh_token: &str,
        proxy_url: Option<&str>,
    ) -> Result<Refreshed, RefreshError>;
}

/// Why the job stopped.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// This replica's term is stale: another replica leads now.
    #[error("fenced: {0}")]
    Fenced(StoreError),
}

/// SHA-256 (hex) of a token: how kept answers name the token they spent.
pub fn token_hash(token: &str) -> String {
    crypto::hex(&Sha256::digest(token.as_bytes()))
}

fn pending_context(account_id: &str) -> String {
    format!("{account_id}/oauth-pending")
}

fn refresh_context(account_id: &str) -> String {
    format!("{account_id}/refresh")
}

/// Test hook: `RELAY_FAILPOINTS=oauth-after-answer=pause|abort` stops this process right after a
/// refresh answer was kept and before it is committed (tests kill it there).
async fn failpoint(name: &str) {
    let Ok(spec) = std::env::var("RELAY_FAILPOINTS") else {
        return;
    };
    for entry in spec.split(',') {
        match entry.trim().split_once('=') {
            Some((n, "pause")) if n == name => {
                tracing::warn!(failpoint = name, "failpoint: pausing here for good");
                std::future::pending::<()>().await;
            }
            Some((n, "abort")) if n == name => {
                tracing::warn!(failpoint = name, "failpoint: aborting the process");
                std::process::abort();
            }
            _ => {}
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Backoff {
    until: Millis,
    next: Duration,
}

/// What one leadership term remembers between ticks.
#[derive(Default)]
struct Memory {
    backoff: HashMap<String, Backoff>,
    /// (account, token) pairs a 401 already triggered a refresh for, and when.
    after_401: HashMap<String, (String, Millis)>,
    /// Accounts whose refresh token was rejected, waiting out the grace before they are taken out.
    rejected: HashMap<String, Rejection>,
}

struct Rejection {
    /// SHA-256 of the refresh token that was rejected.
    from_hash: String,
    since: Millis,
    why: String,
}

/// The refresh job of one control-plane replica.
pub struct Refresher {
    pub store: DynStore,
    pub key: MasterKey,
    pub endpoint: Arc<dyn TokenEndpoint>,
    /// How long a rejected refresh token waits for another replica's kept answer before the
    /// account is taken out ([`REJECTION_GRACE`]).
    pub rejection_grace: Duration,
}

/// A refresh token rejected with `invalid_grant` may have been spent by a replica that lost
/// leadership while it waited on the token endpoint (paused, partitioned): its answer is kept as
/// soon as that replica runs again. The account is taken out only when no kept answer shows up
/// within this long; meanwhile it keeps serving with its current access token.
pub const REJECTION_GRACE: Duration = Duration::from_secs(60);

enum Reason {
    Expiry,
    Unauthorized,
}

impl Reason {
    fn as_str(&self) -> &'static str {
        match self {
            Reason::Expiry => "expiry",
            Reason::Unauthorized => "unauthorized",
        }
    }
}

/// `oauth.refresh_ahead_ms`, or its default.
fn refresh_ahead(settings: &BTreeMap<String, String>) -> i64 {
    settings
        .get("oauth.refresh_ahead_ms")
        .and_then(|v| v.trim().parse::<i64>().ok())
        .filter(|v| *v > 0)
        .unwrap_or(DEFAULT_REFRESH_AHEAD_MS)
}

impl Refresher {
    /// Runs under leadership term `term` until fenced (or dropped when leadership ends).
    pub async fn run(self: Arc<Self>, term: u64) {
        let mut mem = Memory::default();
        tracing::info!(term, "OAuth refresh job started");
        loop {
            let span = tracing::info_span!("oauth refresh", otel.name = "leader.oauth_refresh", term);
            match self.tick(term, &mut mem).instrument(span).await {
                Ok(()) => {}
                Err(JobError::Fenced(e)) => {
                    tracing::warn!(term, error = %e, "OAuth refresh job stops: this replica no longer leads");
                    return;
                }
            }
            tokio::time::sleep(TICK).await;
        }
    }

    /// One pass: kept answers first, then every due account.
    async fn tick(&self, term: u64, mem: &mut Memory) -> Result<(), JobError> {
        let settings = match self.store.settings().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "OAuth refresh: cannot read settings");
                return Ok(());
            }
        };
        // Answers kept by an earlier attempt (perhaps by another replica that died before the commit).
        match self.store.list_oauth_pending().await {
            Ok(kept) => {
                for p in kept {
                    self.apply_kept(term, &p).await?;
                }
            }
            Err(e) => tracing::warn!(error = %e, "OAuth refresh: cannot read kept answers"),
        }
        let (accounts, states) = match (self.store.list_accounts().await, self.store.list_account_states().await) {
            (Ok(a), Ok(s)) => (a, s),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "OAuth refresh: cannot read accounts");
                return Ok(());
            }
        };
        let now = now_ms();
        let ahead = refresh_ahead(&settings);
        let mut due = Vec::new();
        for a in accounts {
            if a.kind != AccountKind::ClaudeOauth || a.refresh_token_enc.is_none() {
                continue;
            }
            if mem.backoff.get(&a.id).is_some_and(|b| b.until > now) {
                continue;
            }
            if let Some(r) = mem.rejected.get(&a.id) {
                let holds = a
                    .refresh_token_enc
                    .as_ref()
                    .and_then(|s| self.key.open(s, &refresh_context(&a.id)).ok())
                    .is_some_and(|t| token_hash(&t) == r.from_hash);
                if !holds {
                    // A kept answer (or a new login) replaced the rejected token.
                    tracing::info!(account = %a.name, "OAuth refresh: the rejected refresh token was replaced; the account carries on");
                    mem.rejected.remove(&a.id);
                } else if now - r.since < self.rejection_grace.as_millis() as i64 {
                    continue;
                } else {
                    let (why, from_hash) = (r.why.clone(), r.from_hash.clone());
                    mem.rejected.remove(&a.id);
                    metrics::counter!(relay_proto::metrics::OAUTH_REFRESH_TOTAL, "outcome" => "invalid_grant")
                        .increment(1);
                    tracing::error!(account = %a.name, "OAuth refresh: the refresh token was rejected (invalid_grant); the account is out until it logs in again");
                    let reason: String = format!(
                        "refresh token rejected by the token endpoint (invalid_grant: {}); log in again with `relayctl account login`",
                        why.chars().take(200).collect::<String>()
                    );
                    match self.mark_unauthorized(term, &a, &reason).await {
                        Ok(()) => {}
                        Err(e @ StoreError::Fenced { .. }) => return Err(JobError::Fenced(e)),
                        Err(e) => {
                            // Tried again next tick.
                            tracing::warn!(account = %a.name, error = %e, "OAuth refresh: cannot record the rejection");
                            mem.rejected.insert(
                                a.id.clone(),
                                Rejection {
                                    from_hash,
                                    since: 0,
                                    why,
                                },
                            );
                        }
                    }
                    continue;
                }
            }
            let mine = states
                .iter()
                .any(|s| s.account_id == a.id && s.health == AccountHealth::Unauthorized && s.reported_by == ACTOR);
            if mine {
                // Its refresh token was rejected: waits for a new login.
                continue;
            }
            let generation = token_hash(&crypto::hex(&a.credential_enc));
            let unauthorized = states.iter().any(|s| {
                s.account_id == a.id && s.health == AccountHealth::Unauthorized && (s.until == 0 || s.until > now)
            });
            let expiring = a.credential_expires_at.is_some_and(|e| e - now <= ahead);
            if expiring {
                due.push((a, Reason::Expiry));
            } else if unauthorized {
                // At most once per token, and not more than once a minute.
                let tried = mem
                    .after_401
                    .get(&a.id)
                    .is_some_and(|(g, at)| *g == generation || now - at < 60_000);
                if !tried {
                    mem.after_401.insert(a.id.clone(), (generation, now));
                    due.push((a, Reason::Unauthorized));
                }
            }
        }
        use futures::StreamExt;
        let settings = &settings;
        let results: Vec<(String, Outcome)> = futures::stream::iter(due)
            .map(|(a, why)| async move {
                let id = a.id.clone();
                (id, self.refresh_one(term, a, why, settings).await)
            })
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        for (id, outcome) in results {
            match outcome {
                Outcome::Done => {
                    mem.backoff.remove(&id);
                }
                Outcome::Retry { first, max } => {
                    let next = mem.backoff.get(&id).map_or(first, |b| (b.next * 2).min(max));
                    mem.backoff.insert(
                        id,
                        Backoff {
                            until: now_ms() + next.as_millis() as i64,
                            next,
                        },
                    );
                }
                Outcome::Fenced(e) => return Err(JobError::Fenced(e)),
                Outcome::Rejected { from_hash, why } => {
                    mem.rejected.entry(id).or_insert(Rejection {
                        from_hash,
                        since: now_ms(),
                        why,
                    });
                }
            }
        }
        Ok(())
    }

    async fn refresh_one(&self, term: u64, a: Account, why: Reason, settings: &BTreeMap<String, String>) -> Outcome {
        let Some(sealed_rt) = &a.refresh_token_enc else {
            return Outcome::Done;
        };
        let Ok(rt) = self.key.open(sealed_rt, &refresh_context(&a.id)) else {
            tracing::error!(account = %a.name, "OAuth refresh: the stored refresh token cannot be opened (wrong master key?)");
            return Outcome::Retry {
                first: Duration::from_secs(300),
                max: Duration::from_secs(3600),
            };
        };
        let proxy = match &a.proxy_url_enc {
            Some(sealed) => match self.key.open(sealed, &crate::api::admin::proxy_seal_context(&a.id)) {
                Ok(p) => Some(p),
                Err(_) => {
                    tracing::error!(account = %a.name, "OAuth refresh: the stored proxy URL cannot be opened");
                    return Outcome::Retry {
                        first: Duration::from_secs(300),
                        max: Duration::from_secs(3600),
                    };
                }
            },
            None => (!a.proxy_url.is_empty()).then(|| a.proxy_url.clone()),
        };
        let from_hash = token_hash(&rt);
        // The token endpoint call and the keeping of its answer run on a task of their own: if
        // leadership ends meanwhile and this job is dropped, the answer is still kept (a dropped
        // answer would lose the account), and the next leader applies it.
        let spend = tokio::spawn({
            let (endpoint, store, key, settings) = (
                self.endpoint.clone(),
                self.store.clone(),
                self.key.clone(),
                settings.clone(),
            );
            let (id, name, from_hash) = (a.id.clone(), a.name.clone(), from_hash.clone());
            async move {
                let started = std::time::Instant::now();
                let answer = endpoint.refresh(&settings, &rt, proxy.as_deref()).await;
                metrics::histogram!(relay_proto::metrics::OAUTH_REFRESH_DURATION_SECONDS)
                    .record(started.elapsed().as_secs_f64());
                let r = match answer {
                    Ok(r) => r,
                    Err(e) => return Err(e),
                };
                let sealed = serde_json::to_string(&r)
                    .ok()
                    .and_then(|json| key.seal(&json, &pending_context(&id)).ok());
                let Some(sealed) = sealed else {
                    // Cannot happen with a valid key; the answer is still committed by the caller.
                    tracing::error!(account = %name, "OAuth refresh: cannot seal the answer to keep it");
                    return Ok((r, None));
                };
                let kept = OAuthPending {
                    account_id: id,
                    from_hash,
                    sealed,
                    created_at: now_ms(),
                };
                let mut pause = Duration::from_millis(200);
                loop {
                    match store.stash_oauth(&kept).await {
                        Ok(()) => return Ok((r, Some(kept))),
                        // The account is gone: nothing to keep.
                        Err(StoreError::NotFound { .. }) => return Ok((r, None)),
                        Err(e) => {
                            tracing::error!(account = %name, error = %e, "OAuth refresh: cannot keep the answer in the store yet; retrying");
                            tokio::time::sleep(pause).await;
                            pause = (pause * 2).min(Duration::from_secs(10));
                        }
                    }
                }
            }
        });
        let answer = match spend.await {
            Ok(a) => a,
            Err(_) => return Outcome::Done,
        };
        match answer {
            Ok((r, _kept)) => {
                failpoint("oauth-after-answer").await;
                match self.commit(term, &a.id, &from_hash, &r, why.as_str()).await {
                    Ok(()) => Outcome::Done,
                    // The kept answer waits for the replica that leads now.
                    Err(e @ StoreError::Fenced { .. }) => Outcome::Fenced(e),
                    Err(e) => {
                        // Kept: the next tick applies it.
                        tracing::error!(account = %a.name, error = %e, "OAuth refresh: cannot commit the new tokens; retrying");
                        metrics::counter!(relay_proto::metrics::OAUTH_REFRESH_TOTAL, "outcome" => "commit_failed")
                            .increment(1);
                        Outcome::Done
                    }
                }
            }
            Err(RefreshError::InvalidGrant(why)) => {
                // Someone may have spent this token and kept the answer (a replica that died or lost
                // leadership): that answer is the account's live token, applied on the next tick.
                let kept = self.store.list_oauth_pending().await.unwrap_or_default();
                if kept.iter().any(|p| p.account_id == a.id && p.from_hash == from_hash) {
                    return Outcome::Done;
                }
                // Or the account changed meanwhile (a new login): nothing to do.
                match self.store.get_account(&a.id).await {
                    Ok(Some(cur)) if cur.refresh_token_enc == a.refresh_token_enc => {}
                    _ => return Outcome::Done,
                }
                tracing::warn!(
                    account = %a.name,
                    grace_secs = self.rejection_grace.as_secs(),
                    "OAuth refresh: the refresh token was rejected (invalid_grant); waiting for a kept answer from another replica before taking the account out"
                );
                Outcome::Rejected { from_hash, why }
            }
            Err(RefreshError::Transient(why)) => {
                metrics::counter!(relay_proto::metrics::OAUTH_REFRESH_TOTAL, "outcome" => "transient").increment(1);
                tracing::warn!(account = %a.name, error = %why, "OAuth refresh failed; retrying with backoff");
                Outcome::Retry {
                    first: Duration::from_secs(5),
                    max: Duration::from_secs(300),
                }
            }
            Err(RefreshError::Rejected(why)) => {
                metrics::counter!(relay_proto::metrics::OAUTH_REFRESH_TOTAL, "outcome" => "rejected").increment(1);
                tracing::error!(account = %a.name, error = %why, "OAuth refresh refused; check the oauth.* settings");
                Outcome::Retry {
                    first: Duration::from_secs(60),
                    max: Duration::from_secs(1800),
                }
            }
        }
    }

    /// Applies a kept answer when the account still holds the token it spent; drops it otherwise.
    async fn apply_kept(&self, term: u64, p: &OAuthPending) -> Result<(), JobError> {
        let Ok(json) = self.key.open(&p.sealed, &pending_context(&p.account_id)) else {
            tracing::error!(account_id = %p.account_id, "OAuth refresh: a kept answer cannot be opened; dropping it");
            let _ = self.store.drop_oauth_pending(&p.account_id, &p.from_hash).await;
            return Ok(());
        };
        let Ok(r) = serde_json::from_str::<Refreshed>(&json) else {
            let _ = self.store.drop_oauth_pending(&p.account_id, &p.from_hash).await;
            return Ok(());
        };
        match self.commit(term, &p.account_id, &p.from_hash, &r, "kept answer").await {
            Ok(()) => Ok(()),
            Err(e @ StoreError::Fenced { .. }) => Err(JobError::Fenced(e)),
            Err(e) => {
                tracing::warn!(account_id = %p.account_id, error = %e, "OAuth refresh: cannot commit a kept answer yet");
                Ok(())
            }
        }
    }

    /// Writes the new tokens to the account, fenced by `term`, if it still holds the refresh token
    /// whose hash is `from_hash`; then forgets the kept answer. Concurrent edits are retried.
    async fn commit(
        &self,
        term: u64,
        account_id: &str,
        from_hash: &str,
        r: &Refreshed,
        why: &str,
    ) -> Result<(), StoreError> {
        for _ in 0..5 {
            let Some(cur) = self.store.get_account(account_id).await? else {
                return self.store.drop_oauth_pending(account_id, from_hash).await;
            };
            let holds = cur
                .refresh_token_enc
                .as_ref()
                .and_then(|s| self.key.open(s, &refresh_context(&cur.id)).ok())
                .is_some_and(|t| token_hash(&t) == from_hash);
            if !holds {
                // Already applied, or replaced by a new login.
                return self.store.drop_oauth_pending(account_id, from_hash).await;
            }
            let seal = |v: &str, ctx: &str| {
                self.key
                    .seal(v, ctx)
                    .map_err(|_| StoreError::internal_msg("cannot seal a credential"))
            };
            let mut row = cur.clone();
            row.credential_enc = seal(&r.access_token, &cur.id)?;
            row.credential_hint = crypto::credential_hint(&r.access_token);
            if let Some(t) = &r.refresh_token {
                row.refresh_token_enc = Some(seal(t, &refresh_context(&cur.id))?);
            }
            row.credential_expires_at = r.expires_at_ms;
            if !r.scopes.is_empty() {
                row.scopes = r.scopes.clone();
            }
            // Data planes drop what they knew of the old token (a 401 it earned, its breaker).
            row.reset_generation = cur.reset_generation.saturating_add(1);
            row.updated_at = now_ms();
            let mut muts = vec![
                Mutation::CheckTerm { term },
                Mutation::UpdateAccount {
                    row,
                    expect_revision: cur.revision,
                },
            ];
            // A new token ends "unauthorized"; rate limits belong to the account and stay.
            for st in self.store.list_account_states().await? {
                if st.account_id == cur.id && st.health == AccountHealth::Unauthorized {
                    muts.push(Mutation::ClearAccountState {
                        account_id: st.account_id,
                        scope: st.scope,
                    });
                }
            }
            let audit = AuditRecord {
                actor: ACTOR.into(),
                action: "account.oauth_refresh".into(),
                target: cur.id.clone(),
                detail: serde_json::json!({
                    "account": cur.name, "why": why, "term": term,
                    "expires_at_ms": r.expires_at_ms, "refresh_token_rotated": r.refresh_token.is_some(),
                })
                .to_string(),
            };
            match self.store.apply(muts, audit).await {
                Ok(_) => {
                    metrics::counter!(relay_proto::metrics::OAUTH_REFRESH_TOTAL, "outcome" => "ok").increment(1);
                    tracing::info!(account = %cur.name, why, "OAuth tokens refreshed");
                    if let Err(e) = self.store.drop_oauth_pending(account_id, from_hash).await {
                        // Harmless: a kept answer whose token the account no longer holds is dropped later.
                        tracing::debug!(error = %e, "cannot drop a committed answer yet");
                    }
                    return Ok(());
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Conflict {
            kind: "account",
            name: account_id.to_string(),
        })
    }

    async fn mark_unauthorized(&self, term: u64, a: &Account, reason: &str) -> Result<(), StoreError> {
        let st = AccountState {
            account_id: a.id.clone(),
            scope: String::new(),
            health: AccountHealth::Unauthorized,
            reason: reason.to_string(),
            until: 0,
            since: now_ms(),
            reported_by: ACTOR.into(),
            revision: 0,
        };
        let audit = AuditRecord {
            actor: ACTOR.into(),
            action: crate::config::ACTION_OAUTH_REFRESH_FAILED.into(),
            target: a.id.clone(),
            detail: serde_json::json!({ "account": a.name, "reason": reason, "term": term }).to_string(),
        };
        let write = vec![Mutation::CheckTerm { term }, Mutation::SetAccountState(st)];
        crate::config::apply_state_write(&self.store, write, audit)
            .await
            .map(|_| ())
    }
}

enum Outcome {
    Done,
    /// `invalid_grant`: waits out [`REJECTION_GRACE`] for a kept answer.
    Rejected {
        from_hash: String,
        why: String,
    },
    Retry {
        first: Duration,
        max: Duration,
    },
    Fenced(StoreError),
}

/// The production token endpoint: `relay-oauth`'s client, with the live `oauth.*` settings.
pub struct OAuthEndpoint {
    pub client: relay_oauth::TokenClient,
}

#[async_trait::async_trait]
impl TokenEndpoint for OAuthEndpoint {
    async fn refresh(
        &self,
        settings: &BTreeMap<String, String>,
        refresh_token: &str,
        proxy_url: Option<&str>,
    ) -> Result<Refreshed, RefreshError> {
        use relay_oauth::OAuthError;
        let cfg = relay_oauth::OAuthConfig::from_settings(settings);
        let proxy = match proxy_url {
            Some(u) => Some(
                relay_net::client::ProxySpec::parse(u)
                    .map_err(|e| RefreshError::Rejected(format!("the account's proxy URL: {e}")))?,
            ),
            None => None,
        };
        match self.client.refresh(&cfg, refresh_token, proxy.as_ref()).await {
            Ok(t) => Ok(Refreshed {
                access_token: t.access_token,
                refresh_token: t.refresh_token,
                expires_at_ms: t.expires_at_ms,
                scopes: t.scopes,
            }),
            Err(OAuthError::InvalidGrant(m)) => Err(RefreshError::InvalidGrant(m)),
            Err(OAuthError::Transient(m)) => Err(RefreshError::Transient(m)),
            Err(e) => Err(RefreshError::Rejected(e.to_string())),
        }
    }
}
