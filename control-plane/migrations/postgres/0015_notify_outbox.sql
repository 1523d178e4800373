-- Webhook notifications (control-plane/src/notify.rs). The outbox: one row per notification,
-- keyed by its dedup key (event kind, subject, episode), so writing the same event twice is a
-- no-op and a new leader neither resends what was sent nor loses what was pending.
-- state: pending | sent | failed.
CREATE TABLE notify_outbox (
    dedup_key       TEXT    NOT NULL PRIMARY KEY,
    kind            TEXT    NOT NULL,
    subject         TEXT    NOT NULL,
    payload         TEXT    NOT NULL,
    created_ms      BIGINT  NOT NULL,
    state           TEXT    NOT NULL DEFAULT 'pending',
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms BIGINT  NOT NULL,
    last_error      TEXT    NOT NULL DEFAULT '',
    done_ms         BIGINT  NOT NULL DEFAULT 0
);
CREATE INDEX notify_outbox_due ON notify_outbox (state, next_attempt_ms);
-- Episodes open now (an account unauthorized, a data plane lost): one per (kind, subject), opened
-- with its event and closed with its "recovered" event, in the same transaction as the outbox row.
CREATE TABLE notify_episodes (
    kind      TEXT   NOT NULL,
    subject   TEXT   NOT NULL,
    episode   TEXT   NOT NULL,
    opened_ms BIGINT NOT NULL,
    PRIMARY KEY (kind, subject)
);
