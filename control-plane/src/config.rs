//! The config publisher: follows the store's head and publishes, through a `watch` channel, the
//! complete config at head ([`Published`], built by `api::publish` in the form data planes
//! receive, credentials opened) with the changes between the heads it published before, so every
//! Watch stream builds its snapshot or delta without touching the database.
//!
//! It wakes on the store's change hint (own commits; `NOTIFY` from other
//! replicas) and on a poll, so a lost notification costs at most one poll
//! interval. A burst of writes is seen by streams as the latest head only
//! (coalescing). When the store's head moves backwards within an epoch (a
//! database restored from a backup), it starts a new epoch, so every data plane
//! takes a full snapshot.
//!
//! A head reached only by account-state writes (a data plane's report, a failed OAuth refresh:
//! the audit actions in [`STATE_ONLY_ACTIONS`], written through [`apply_state_write`], which
//! refuses anything else) is published by patching the last snapshot: its account states are
//! read again, the rest is kept, and the hash is finished from the kept hasher state
//! ([`relay_proto::patch::StatesHasher`]); no credential is opened. Every other write (accounts,
//! keys, groups, prices, settings, tokens) goes through the full build, which opens only the
//! credentials and proxy URLs sealed anew since the last head (the others are kept by their
//! sealed bytes). Both give the same config (`tests/incremental_config.rs` compares them with a
//! build from scratch on both stores).

use crate::api::publish::{patch_states, snapshot, CredentialError, Opened, Published};
use crate::crypto::MasterKey;
use crate::model::{self, AuditRecord, Mutation, Version};
use crate::store::{DynStore, StoreError};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Credential(#[from] CredentialError),
}

/// The audit action of a data plane's account-state report.
pub const ACTION_ACCOUNT_STATE: &str = "account.state";
/// The audit action of "unauthorized" set after an OAuth refresh the token endpoint refused.
pub const ACTION_OAUTH_REFRESH_FAILED: &str = "account.oauth_refresh_failed";
/// Audit actions of writes that change account states and nothing else: the publisher patches
/// its last snapshot when every revision since it carries one of these. Written only through
/// [`apply_state_write`].
pub const STATE_ONLY_ACTIONS: &[&str] = &[ACTION_ACCOUNT_STATE, ACTION_OAUTH_REFRESH_FAILED];

/// The most revisions one patch covers; a publisher further behind builds in full.
const MAX_PATCH_REVISIONS: u64 = 1024;

/// Applies a write that changes account states only (sets and clears, with their guards),
/// audited with one of [`STATE_ONLY_ACTIONS`]. Anything else is refused (`StoreError::Invalid`)
/// before it reaches the store: the publisher trusts these actions to mean "states only".
pub async fn apply_state_write(
    store: &DynStore,
    mutations: Vec<Mutation>,
    audit: AuditRecord,
) -> Result<Version, StoreError> {
    let states_only = mutations.iter().all(|m| {
        matches!(
            m,
            Mutation::SetAccountState(_)
                | Mutation::ClearAccountState { .. }
                | Mutation::RequireResetGeneration { .. }
                | Mutation::CheckTerm { .. }
        )
    });
    if !STATE_ONLY_ACTIONS.contains(&audit.action.as_str()) || !states_only {
        return Err(StoreError::Invalid(format!(
            "a state-only write ({}) may change account states only",
            audit.action
        )));
    }
    store.apply(mutations, audit).await
}

/// Follows the store and publishes the head. Holds the receiver side for
/// Watch streams; the task stops when every handle is dropped.
pub struct ConfigPublisher {
    rx: watch::Receiver<Arc<Published>>,
}

impl ConfigPublisher {
    /// Loads the head once (so the first Watch stream has something to send)
    /// and starts following.
    pub async fn start(store: DynStore, key: MasterKey, poll: Duration) -> Result<Self, ConfigError> {
        let first = Arc::new(build_full(&store, &key).await?);
        let (tx, rx) = watch::channel(first);
        tokio::spawn(follow(store, key, poll, tx));
        Ok(Self { rx })
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Published>> {
        self.rx.clone()
    }

    pub fn current(&self) -> Arc<Published> {
        self.rx.borrow().clone()
    }
}

async fn follow(store: DynStore, key: MasterKey, poll: Duration, tx: watch::Sender<Arc<Published>>) {
    let hint = store.change_hint();
    loop {
        tokio::select! {
            _ = hint.notified() => {}
            _ = tokio::time::sleep(poll) => {}
            _ = tx.closed() => return,
        }
        let current = tx.borrow().clone();
        match next_head(&store, &key, &current).await {
            Ok(Some((next, built))) => {
                tracing::debug!(version = %next.snapshot.version, ?built, "config head moved");
                tx.send_replace(Arc::new(next));
            }
            Ok(None) => {}
            Err(e) => {
                metrics::counter!(relay_proto::metrics::CONFIG_REFRESH_ERRORS_TOTAL).increment(1);
                tracing::warn!(error = %e, "cannot refresh config from the store; serving the last head");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// How the publisher reached a new head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Built {
    /// The last snapshot with the account states read again (only states changed since).
    Patched,
    /// Everything loaded again; only credentials and proxy URLs sealed anew are opened.
    Full,
}

/// Builds the complete config at the store's head, from scratch.
pub async fn build_full(store: &DynStore, key: &MasterKey) -> Result<Published, ConfigError> {
    let state = store.load_config().await?;
    let tokens = store.list_admin_tokens().await?;
    Ok(Published::first(snapshot(&state, &tokens, key, &Opened::default())?))
}

/// The head that follows `current` when the store moved: patched when only account states
/// changed since (see the module doc), else built in full. `None` when the head did not move,
/// or moved backwards (then a new epoch is started, and the next call builds it).
pub async fn next_head(
    store: &DynStore,
    key: &MasterKey,
    current: &Published,
) -> Result<Option<(Published, Built)>, ConfigError> {
    let head = store.head().await?;
    let have = current.snapshot.version;
    if head == have {
        return Ok(None);
    }
    if (head.epoch, head.revision) < (have.epoch, have.revision) {
        // The store went back in time under us: restored from a backup.
        rewound(store, head, have).await?;
        return Ok(None);
    }
    if states_only_since(store, have, head).await? {
        if let Some(next) = patch_states(store, current, head).await? {
            return Ok(Some((next, Built::Patched)));
        }
    }
    let state = store.load_config().await?;
    let tokens = store.list_admin_tokens().await?;
    let next = snapshot(&state, &tokens, key, &current.snapshot.opened)?;
    Ok(Some((current.then(next), Built::Full)))
}

/// Whether every write from `have` (exclusive) to `head` (inclusive) changed account states
/// only: exactly one audit entry per revision, each with a [`STATE_ONLY_ACTIONS`] action.
async fn states_only_since(store: &DynStore, have: Version, head: Version) -> Result<bool, StoreError> {
    if head.epoch != have.epoch || head.revision <= have.revision || head.revision - have.revision > MAX_PATCH_REVISIONS
    {
        return Ok(false);
    }
    let wanted = have.revision + 1..=head.revision;
    let judge = |entries: &[model::AuditEntry]| -> Option<bool> {
        let mut seen = BTreeSet::new();
        for e in entries.iter().filter(|e| wanted.contains(&e.revision)) {
            if !STATE_ONLY_ACTIONS.contains(&e.action.as_str()) || !seen.insert(e.revision) {
                return Some(false);
            }
        }
        // Not every revision seen: cannot tell from these entries.
        (seen.len() as u64 == head.revision - have.revision).then_some(true)
    };
    // The newest entries first (the primary key, backwards): later writes may have landed.
    let gap = u32::try_from(head.revision - have.revision).unwrap_or(u32::MAX);
    let newest = store.list_audit(gap.saturating_add(64), None).await?;
    if let Some(answer) = judge(&newest) {
        return Ok(answer);
    }
    let revisions: Vec<u64> = wanted.clone().collect();
    Ok(judge(&store.audit_at_revisions(&revisions).await?).unwrap_or(false))
}

/// History was rewound to `head` while `seen` (a later revision of the same
/// epoch) had been published: start a new epoch, so every data plane gets a
/// full snapshot instead of trusting revisions that now mean something else.
pub async fn rewound(store: &DynStore, head: Version, seen: Version) -> Result<(), StoreError> {
    let reason = format!("history rewound: head {head}, seen {seen}");
    let new = store
        .start_new_epoch(head, seen.epoch.saturating_add(1), &reason)
        .await?;
    if new != head {
        metrics::counter!(relay_proto::metrics::CONFIG_EPOCHS_STARTED_TOTAL).increment(1);
        tracing::warn!(%head, %seen, epoch = new.epoch, "the store's history was rewound (restored from a backup?); started a new epoch: every data plane takes a full snapshot");
    }
    Ok(())
}
