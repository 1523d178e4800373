-- Capture (opt-in bodies). Rules are config (revisioned, audited, published to data planes),
-- kept as one JSON document per rule so both stores read them alike.
CREATE TABLE capture_rules (
    id       TEXT   NOT NULL PRIMARY KEY,
    rule     TEXT   NOT NULL,
    revision BIGINT NOT NULL
);
-- Captured requests: one per request id, the capture document zstd-compressed as the data plane
-- shipped it. Removed by TTL (expires_ms) and with the request log's retention.
CREATE TABLE request_captures (
    request_id    TEXT    NOT NULL PRIMARY KEY,
    rule_id       TEXT    NOT NULL,
    api_key_id    TEXT    NOT NULL,
    node_id       TEXT    NOT NULL,
    captured_ms   BIGINT  NOT NULL,
    expires_ms    BIGINT  NOT NULL,
    truncated     BOOLEAN NOT NULL,
    document_zstd BYTEA   NOT NULL
);
CREATE INDEX request_captures_captured ON request_captures (captured_ms);
CREATE INDEX request_captures_expires ON request_captures (expires_ms) WHERE expires_ms > 0;
