-- Group limits: the group's total across its keys, as a key's (0 = unlimited).
ALTER TABLE groups ADD COLUMN rpm BIGINT NOT NULL DEFAULT 0;
ALTER TABLE groups ADD COLUMN tpm BIGINT NOT NULL DEFAULT 0;
ALTER TABLE groups ADD COLUMN max_concurrency BIGINT NOT NULL DEFAULT 0;
ALTER TABLE groups ADD COLUMN daily_budget BIGINT NOT NULL DEFAULT 0; -- micro-USD
ALTER TABLE groups ADD COLUMN monthly_budget BIGINT NOT NULL DEFAULT 0; -- micro-USD
-- Budget spend (UsageIngest.Spend, polled by every data plane) sums the cost per key since the
-- start of the day or month: this index answers it from the index alone. It leads with ts, so it
-- serves every time-range query the old one did, which it replaces.
CREATE INDEX usage_events_ts_key_cost ON usage_events (ts, api_key_id, cost_pico_usd);
DROP INDEX usage_events_ts;
