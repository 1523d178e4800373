-- The names of deleted resources, so usage reports keep naming them: usage rows keep only ids,
-- and a deleted account's row is gone. Written in the same transaction as the delete (API keys
-- are revoked, never deleted, so only accounts land here today). Keyed by (kind, id).
CREATE TABLE deleted_names (
    kind       TEXT   NOT NULL,
    id         TEXT   NOT NULL,
    name       TEXT   NOT NULL,
    deleted_at BIGINT NOT NULL,
    PRIMARY KEY (kind, id)
);
