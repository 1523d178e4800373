-- Console sessions ended by signing out, until they would have expired anyway: the session
-- cookie is signed and stateless, so a copy of it (a stolen cookie) stays valid until its
-- expiry unless every replica can see that it was signed out. `session` is the cookie's random
-- nonce, never the cookie. Not config: no revision, no audit.
CREATE TABLE console_signouts (
    session     TEXT PRIMARY KEY,
    expires_at  BIGINT NOT NULL
);
CREATE INDEX console_signouts_expires ON console_signouts (expires_at);
