-- The request log (relayctl requests …) groups usage rows by the client request they belong to:
-- a record's attempts are fetched by request id, and pages are walked by each request's latest
-- event time (see control-plane/src/requests.rs).
CREATE INDEX IF NOT EXISTS usage_events_request ON usage_events (request_id, ts);
-- A stream's event count and the longest gap between two events (ms), per attempt.
ALTER TABLE usage_events ADD COLUMN stream_events BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_events ADD COLUMN max_event_gap_ms BIGINT NOT NULL DEFAULT 0;
-- relay's own words on how the request or attempt failed ('' on success).
ALTER TABLE usage_events ADD COLUMN error_message TEXT NOT NULL DEFAULT '';
