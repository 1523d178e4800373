-- An outbound proxy URL with a user and password is a secret: `proxy_url`
-- keeps only its redacted form (for display) and the full URL is sealed here
-- under the master key, like the upstream credential. NULL: no secret part.
ALTER TABLE accounts ADD COLUMN proxy_url_enc BLOB;
