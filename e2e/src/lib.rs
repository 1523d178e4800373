//! relay-e2e: tests only (see tests/).
