-- The client's own id for its request (its x-request-id, else request-id header), kept
-- alongside request_id (relay's own): "" when the client sent none, or one that is not
-- 1..=128 visible ASCII characters (see relay_proto::bounds::client_request_id).
ALTER TABLE usage_events ADD COLUMN client_request_id TEXT NOT NULL DEFAULT '';
