-- Rate limits per API key (requests and tokens per minute; NULL: none).
ALTER TABLE api_keys ADD COLUMN rpm INTEGER CHECK (rpm > 0);
ALTER TABLE api_keys ADD COLUMN tpm INTEGER CHECK (tpm > 0);

-- One pair of counters per scope (a key or an account) for its current
-- window; a later window starts them again. Hosts one store owns count in
-- memory: these are for stores hosts share, kept alike by every backend.
CREATE TABLE rate_counters (
    scope        TEXT    NOT NULL PRIMARY KEY,
    window_start INTEGER NOT NULL,
    requests     INTEGER NOT NULL,
    tokens       INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
