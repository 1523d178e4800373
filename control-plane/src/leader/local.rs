//! Standalone: the control plane on its embedded store is the only replica, so it always leads.
//! It still claims a term at start, so leader-only writes carry one like anywhere else.

use super::{LeaderError, Leadership};
use crate::store::DynStore;

pub const MECHANISM: &str = "standalone";

impl Leadership {
    /// Leads at once and for good, with a freshly claimed term.
    pub async fn standalone(store: &DynStore, replica: &str) -> Result<Self, LeaderError> {
        let since_ms = crate::model::now_ms();
        let term = store
            .claim_term(replica, MECHANISM, "the only control plane (embedded store)", since_ms)
            .await?;
        tracing::info!(
            replica,
            mechanism = MECHANISM,
            term,
            "leader election: standalone, always the leader"
        );
        Ok(Leadership::fixed(MECHANISM, replica, term, since_ms))
    }
}
