-- Account health as the fleet shares it (rate limited, overloaded, ...).
-- Absent = healthy. `until_at` 0 = until reset or credential change.
CREATE TABLE account_states (
    account_id  TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    scope       TEXT NOT NULL DEFAULT '',
    health      TEXT NOT NULL,
    reason      TEXT NOT NULL,
    until_at    BIGINT NOT NULL,
    since_at    BIGINT NOT NULL,
    reported_by TEXT NOT NULL,
    revision    BIGINT NOT NULL,
    PRIMARY KEY (account_id, scope)
);
