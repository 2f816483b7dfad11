-- The response cache: a key's default time to live for calls that send no
-- `X-Cxmpute-Cache` header (NULL: such calls are not cached) and whether it
-- shares cached answers across accounts (set by an admin); and, per settled
-- call, whether it was answered from the cache (no provider, no reward).
ALTER TABLE api_keys ADD COLUMN cache_ttl_secs INTEGER CHECK (cache_ttl_secs > 0);
ALTER TABLE api_keys ADD COLUMN cache_shared INTEGER NOT NULL DEFAULT 0 CHECK (cache_shared IN (0, 1));
ALTER TABLE usage ADD COLUMN cache_hit INTEGER NOT NULL DEFAULT 0 CHECK (cache_hit IN (0, 1));
