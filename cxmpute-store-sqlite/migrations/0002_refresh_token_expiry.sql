-- Housekeeping deletes expired refresh tokens each maintenance round: by
-- this index, not a scan of every token.
CREATE INDEX refresh_tokens_by_expiry ON refresh_tokens (expires_at);
