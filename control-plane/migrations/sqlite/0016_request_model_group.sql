-- The request log's record carries the model the client asked for beside the one answered and
-- billed (`model`), and the key's group when the request was served (not looked up later).
ALTER TABLE usage_events ADD COLUMN model_requested TEXT NOT NULL DEFAULT '';
ALTER TABLE usage_events ADD COLUMN group_id TEXT NOT NULL DEFAULT '';
-- Rows stored before this migration: the group their key is in now is the best knowledge there is.
UPDATE usage_events SET group_id = (SELECT k.group_id FROM api_keys k WHERE k.id = usage_events.api_key_id)
    WHERE EXISTS (SELECT 1 FROM api_keys k WHERE k.id = usage_events.api_key_id);
