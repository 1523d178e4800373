-- Subscription accounts' quota windows as the fleet last saw them (one row per
-- account, the newest observation wins). Not config: no revision, no audit.
CREATE TABLE account_quotas (
    account_id  TEXT PRIMARY KEY REFERENCES accounts(id) ON DELETE CASCADE,
    observed_at BIGINT NOT NULL,
    observed_by TEXT NOT NULL,
    status      TEXT NOT NULL,
    reset_at    BIGINT NOT NULL,
    -- JSON: [{"name","utilization","reset_ms","status"}]
    windows     TEXT NOT NULL
);

-- A token endpoint's answer to a refresh, kept (sealed) the moment it arrives and
-- until the rotated tokens are committed to the account: Anthropic rotates the
-- refresh token, so losing this answer would lose the account. `from_hash` is the
-- SHA-256 of the refresh token that was spent; the answer applies only while the
-- account still holds that token.
CREATE TABLE oauth_pending (
    account_id  TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    from_hash   TEXT NOT NULL,
    sealed      BYTEA NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (account_id, from_hash)
);
