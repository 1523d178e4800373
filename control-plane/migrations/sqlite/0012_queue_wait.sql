-- How long a request waited for an account before the attempt this row records (bounded by
-- queue.max_wait_ms), and for what: '' (no wait), 'slot', 'cooldown', 'recovery'.
ALTER TABLE usage_events ADD COLUMN queue_wait_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_events ADD COLUMN waited_for TEXT NOT NULL DEFAULT '';
