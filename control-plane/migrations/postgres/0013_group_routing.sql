-- Groups that fail over and that an operator steers.
-- state: active | paused | activated (`relayctl group pause|resume|activate`), with when it was
-- last set (0 = never) and by which actor.
ALTER TABLE groups ADD COLUMN state TEXT NOT NULL DEFAULT 'active';
ALTER TABLE groups ADD COLUMN state_since BIGINT NOT NULL DEFAULT 0;
ALTER TABLE groups ADD COLUMN state_by TEXT NOT NULL DEFAULT '';
-- A group's fallback groups, in order (position 0 first). A group that is someone's fallback
-- cannot be deleted (the reference is not cascaded); a deleted group's own list goes with it.
-- The store refuses self-references, repeats and cycles in the write that sets a list.
CREATE TABLE group_fallbacks (
    group_id    TEXT    NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
    position    INTEGER NOT NULL,
    fallback_id TEXT    NOT NULL REFERENCES groups(id),
    PRIMARY KEY (group_id, position),
    UNIQUE (group_id, fallback_id),
    CHECK (group_id <> fallback_id)
);
CREATE INDEX group_fallbacks_fallback ON group_fallbacks (fallback_id);
