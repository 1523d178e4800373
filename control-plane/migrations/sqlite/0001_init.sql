-- relay control plane schema, SQLite (embedded store). Times are unix milliseconds (BIGINT).

-- One row. Every admin write bumps `revision` in its own transaction, holding
-- this row's lock until commit, so commit order equals revision order.
CREATE TABLE config_head (
    singleton INTEGER PRIMARY KEY DEFAULT 1 CHECK (singleton = 1),
    epoch     BIGINT NOT NULL,
    revision  BIGINT NOT NULL
);
INSERT INTO config_head (singleton, epoch, revision)
VALUES (1, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER), 0);

-- What each revision touched; replicas tail it to build deltas.
CREATE TABLE config_log (
    revision BIGINT NOT NULL,
    kind     TEXT   NOT NULL,
    ref_id   TEXT   NOT NULL,
    PRIMARY KEY (revision, kind, ref_id)
);

CREATE TABLE groups (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    revision    BIGINT NOT NULL
);

CREATE TABLE accounts (
    id                     TEXT PRIMARY KEY,
    name                   TEXT NOT NULL UNIQUE,
    kind                   TEXT NOT NULL,
    base_url               TEXT NOT NULL,
    credential_enc         BLOB NOT NULL,
    refresh_token_enc      BLOB,
    credential_hint        TEXT NOT NULL,
    credential_expires_at  BIGINT,
    priority               INTEGER NOT NULL,
    weight                 INTEGER NOT NULL,
    max_concurrency        INTEGER NOT NULL,
    status                 TEXT NOT NULL,
    proxy_url              TEXT NOT NULL DEFAULT '',
    created_at             BIGINT NOT NULL,
    updated_at             BIGINT NOT NULL,
    revision               BIGINT NOT NULL
);

CREATE TABLE account_groups (
    account_id TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    group_id   TEXT NOT NULL REFERENCES groups(id),
    PRIMARY KEY (account_id, group_id)
);

CREATE TABLE api_keys (
    id                TEXT PRIMARY KEY,
    name              TEXT NOT NULL UNIQUE,
    key_hash          TEXT NOT NULL UNIQUE,
    key_prefix        TEXT NOT NULL,
    status            TEXT NOT NULL,
    expires_at        BIGINT,
    group_id          TEXT NOT NULL REFERENCES groups(id),
    allowed_models    TEXT NOT NULL, -- JSON array
    rpm               BIGINT NOT NULL DEFAULT 0,
    tpm               BIGINT NOT NULL DEFAULT 0,
    max_concurrency   BIGINT NOT NULL DEFAULT 0,
    daily_budget      BIGINT NOT NULL DEFAULT 0, -- micro-USD
    monthly_budget    BIGINT NOT NULL DEFAULT 0, -- micro-USD
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL,
    revision          BIGINT NOT NULL
);

-- Prices in micro-USD per million tokens.
CREATE TABLE prices (
    id              TEXT PRIMARY KEY,
    model_pattern   TEXT NOT NULL,
    effective_from  BIGINT NOT NULL,
    input           BIGINT NOT NULL,
    output          BIGINT NOT NULL,
    cache_write_5m  BIGINT NOT NULL,
    cache_write_1h  BIGINT NOT NULL,
    cache_read      BIGINT NOT NULL,
    source          TEXT NOT NULL,
    revision        BIGINT NOT NULL,
    UNIQUE (model_pattern, effective_from)
);

CREATE TABLE settings (
    name     TEXT PRIMARY KEY,
    value    TEXT NOT NULL,
    revision BIGINT NOT NULL
);

CREATE TABLE admin_tokens (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    token_hash  TEXT NOT NULL UNIQUE,
    token_prefix TEXT NOT NULL,
    role        TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    revision    BIGINT NOT NULL
);

CREATE TABLE audit_log (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    at        BIGINT NOT NULL,
    actor     TEXT NOT NULL,
    action    TEXT NOT NULL,
    target    TEXT NOT NULL,
    detail    TEXT NOT NULL,
    revision  BIGINT NOT NULL
);
CREATE INDEX audit_log_at ON audit_log (at);

CREATE TABLE proxies (
    node_id             TEXT PRIMARY KEY,
    build_version       TEXT NOT NULL DEFAULT '',
    acked_epoch         BIGINT,
    acked_revision      BIGINT,
    nack_epoch          BIGINT,
    nack_revision       BIGINT,
    nack_error          TEXT NOT NULL DEFAULT '',
    nack_at             BIGINT NOT NULL DEFAULT 0,
    last_seen           BIGINT NOT NULL,
    connected           INTEGER NOT NULL,
    replica             TEXT NOT NULL DEFAULT ''
);

CREATE TABLE usage_events (
    event_id              TEXT PRIMARY KEY,
    request_id            TEXT NOT NULL,
    ts                    BIGINT NOT NULL,
    node_id               TEXT NOT NULL,
    api_key_id            TEXT NOT NULL,
    account_id            TEXT NOT NULL,
    model                 TEXT NOT NULL,
    input_tokens          BIGINT NOT NULL,
    output_tokens         BIGINT NOT NULL,
    cache_write_5m_tokens BIGINT NOT NULL,
    cache_write_1h_tokens BIGINT NOT NULL,
    cache_read_tokens     BIGINT NOT NULL,
    cost_pico_usd         BIGINT NOT NULL,
    http_status           INTEGER NOT NULL,
    error_type            TEXT NOT NULL,
    stream                INTEGER NOT NULL,
    cancelled             INTEGER NOT NULL,
    latency_ms            BIGINT NOT NULL,
    ttfb_ms               BIGINT NOT NULL,
    upstream_request_id   TEXT NOT NULL,
    web_search_requests   BIGINT NOT NULL,
    received_at           BIGINT NOT NULL
);
CREATE INDEX usage_events_ts ON usage_events (ts);
