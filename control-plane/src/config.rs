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

use crate::api::publish::{snapshot, CredentialError, Published};
use crate::crypto::MasterKey;
use crate::model::Version;
use crate::store::{DynStore, StoreError};
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

/// Follows the store and publishes the head. Holds the receiver side for
/// Watch streams; the task stops when every handle is dropped.
pub struct ConfigPublisher {
    rx: watch::Receiver<Arc<Published>>,
}

impl ConfigPublisher {
    /// Loads the head once (so the first Watch stream has something to send)
    /// and starts following.
    pub async fn start(store: DynStore, key: MasterKey, poll: Duration) -> Result<Self, ConfigError> {
        let state = store.load_config().await?;
        let tokens = store.list_admin_tokens().await?;
        let first = Arc::new(Published::first(snapshot(&state, &tokens, &key)?));
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
        match refresh(&store, &key, &current).await {
            Ok(Some(next)) => {
                tracing::debug!(version = %next.snapshot.version, "config head moved");
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

async fn refresh(store: &DynStore, key: &MasterKey, current: &Published) -> Result<Option<Published>, ConfigError> {
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
    let state = store.load_config().await?;
    let tokens = store.list_admin_tokens().await?;
    Ok(Some(current.then(snapshot(&state, &tokens, key)?)))
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
