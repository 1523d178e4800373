-- Daily usage rollups: what cost reports need, kept when retention deletes the raw usage rows.
-- One row per UTC day (its start, ms), key, group, account and model; fed in the same transaction
-- as the raw rows it counts (only rows actually inserted, so a redelivered event never counts
-- twice), never deleted by retention.
CREATE TABLE usage_daily (
    day                   BIGINT NOT NULL,
    api_key_id            TEXT NOT NULL,
    group_id              TEXT NOT NULL,
    account_id            TEXT NOT NULL,
    model                 TEXT NOT NULL,
    requests              BIGINT NOT NULL,
    errors                BIGINT NOT NULL,
    anomalies             BIGINT NOT NULL,
    input_tokens          BIGINT NOT NULL,
    output_tokens         BIGINT NOT NULL,
    cache_write_5m_tokens BIGINT NOT NULL,
    cache_write_1h_tokens BIGINT NOT NULL,
    cache_read_tokens     BIGINT NOT NULL,
    cost_pico_usd         BIGINT NOT NULL,
    PRIMARY KEY (day, api_key_id, group_id, account_id, model)
);
-- Raw usage rows are complete from this time on (retention deleted what is older); reports read
-- the rollups for the whole days before it. No row: nothing was ever deleted.
CREATE TABLE usage_raw_floor (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    floor_ms BIGINT NOT NULL
);
-- The rows stored before this migration.
INSERT INTO usage_daily
SELECT ts - (((ts % 86400000) + 86400000) % 86400000), api_key_id, group_id, account_id, model,
       COUNT(*),
       SUM(CASE WHEN http_status >= 400 OR error_type <> '' THEN 1 ELSE 0 END),
       SUM(CASE WHEN anomaly <> '' THEN 1 ELSE 0 END),
       LEAST(SUM(input_tokens), 9223372036854775807), LEAST(SUM(output_tokens), 9223372036854775807), LEAST(SUM(cache_write_5m_tokens), 9223372036854775807),
       LEAST(SUM(cache_write_1h_tokens), 9223372036854775807), LEAST(SUM(cache_read_tokens), 9223372036854775807), LEAST(SUM(cost_pico_usd), 9223372036854775807)
FROM usage_events
GROUP BY 1, 2, 3, 4, 5;
