-- Subscription (OAuth) accounts: what the login or the imported credentials said about the account.
-- Scopes space-separated; empty strings when unknown (API-key accounts, setup tokens).
ALTER TABLE accounts ADD COLUMN oauth_scopes TEXT NOT NULL DEFAULT '';
ALTER TABLE accounts ADD COLUMN subscription_type TEXT NOT NULL DEFAULT '';
ALTER TABLE accounts ADD COLUMN organization TEXT NOT NULL DEFAULT '';
