-- Why a usage row's counts cannot be fully trusted: "" (they can), "unparsed"
-- (the answer's usage could not be read), "suspect" (a count beyond what one
-- request can reach was clamped; see relay_proto::bounds), comma separated.
ALTER TABLE usage_events ADD COLUMN anomaly TEXT NOT NULL DEFAULT '';
