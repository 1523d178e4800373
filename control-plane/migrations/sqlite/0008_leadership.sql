-- Leadership of the control plane's singleton jobs (usage retention, OAuth token refresh).
-- One row, 'leader': `term` grows by one each time a replica becomes leader (claim_term), and a
-- leader's writes carry its term (Mutation::CheckTerm), so a stale leader's write is refused.
-- holder/mechanism/since_ms/detail say who leads, how it was elected and since when.
CREATE TABLE leadership (
    name      TEXT PRIMARY KEY,
    term      BIGINT NOT NULL,
    holder    TEXT,
    mechanism TEXT,
    since_ms  BIGINT,
    detail    TEXT
);
