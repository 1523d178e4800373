-- Bumped by every change that clears an account's health (an operator's reset
-- or enable, a new credential, base URL or proxy): a data plane that sees it
-- move drops what it knew locally about the account (its circuit breaker too).
ALTER TABLE accounts ADD COLUMN reset_generation BIGINT NOT NULL DEFAULT 0;
-- The resources a data plane took out of service in the config it acked
-- (JSON: [{"kind","id","error"}]).
ALTER TABLE proxies ADD COLUMN rejected TEXT NOT NULL DEFAULT '[]';
-- Deltas are computed from the published configs themselves (see
-- relay_proto::changed), not from a log of what each write named: the log
-- missed cascades (the states a deleted account took with it) and nothing
-- reads it any more.
DROP TABLE config_log;
