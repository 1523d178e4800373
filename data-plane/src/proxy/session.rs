//! Session stage: a Messages request's sticky-session key (per group: the same session id from
//! another tenant's client is another session) and the account the [`SessionStore`] has bound
//! it to. The retry loop tries that account first and binds the session to whichever account
//! answered.

use super::admission::ClientRequest;
use super::sticky::{self, SessionStore};

/// A request's session, when it has one.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Session {
    /// The session key (`{group id}:{session}`); None for count_tokens or no session.
    pub key: Option<String>,
    /// The account the session is bound to, if any.
    pub bound: Option<String>,
}

/// Looks up the request's session (count_tokens requests have none).
pub async fn lookup(store: &dyn SessionStore, req: &ClientRequest) -> Session {
    if !req.is_messages {
        return Session::default();
    }
    let key = sticky::session_key(&req.parts.headers, &req.body).map(|s| format!("{}:{s}", req.key.group_id));
    let bound = match &key {
        Some(k) => store.get(k).await,
        None => None,
    };
    Session { key, bound }
}

impl Session {
    /// After a successful attempt on `account_id`: binds the session to it (counting a move
    /// when it was bound to another account).
    pub async fn answered_by(&self, store: &dyn SessionStore, account_id: &str) {
        let Some(k) = &self.key else { return };
        if self.bound.as_deref() == Some(account_id) {
            return;
        }
        if self.bound.is_some() {
            metrics::counter!(relay_proto::metrics::STICKY_MOVES_TOTAL).increment(1);
        }
        store.bind(k, account_id).await;
    }
}
