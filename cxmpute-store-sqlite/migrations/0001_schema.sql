-- The broker's whole state. Money is INTEGER micro-credits everywhere; times
-- are INTEGER milliseconds since the epoch; secrets are stored only as their
-- 32-byte SHA-256 (BLOB). STRICT tables refuse a value of the wrong type, so a
-- bug cannot slip a float or a string into a balance.

CREATE TABLE users (
    id               TEXT    NOT NULL PRIMARY KEY,
    email            TEXT    NOT NULL UNIQUE,
    -- A balance is never negative: the CHECK backs the broker's own rule.
    credits          INTEGER NOT NULL CHECK (credits >= 0),
    is_admin         INTEGER NOT NULL,
    suspended_reason TEXT,
    suspended_by     TEXT,
    suspended_at     INTEGER,
    created_at       INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

CREATE TABLE credit_grants (
    seq      INTEGER NOT NULL PRIMARY KEY,
    user_id  TEXT    NOT NULL REFERENCES users (id),
    amount   INTEGER NOT NULL,
    by_whom  TEXT    NOT NULL,
    reason   TEXT    NOT NULL,
    at       INTEGER NOT NULL
) STRICT;
-- A user's grants, oldest first.
CREATE INDEX credit_grants_by_user ON credit_grants (user_id, seq);

CREATE TABLE api_keys (
    id               TEXT    NOT NULL PRIMARY KEY,
    user_id          TEXT    NOT NULL REFERENCES users (id),
    hash             BLOB    NOT NULL UNIQUE, -- every request looks its key up here
    name             TEXT    NOT NULL,
    prefix           TEXT    NOT NULL,
    credit_limit     INTEGER,
    credits_left     INTEGER CHECK (credits_left >= 0),
    permitted_routes TEXT    NOT NULL, -- JSON array of route paths
    created_at       INTEGER NOT NULL,
    last_used_at     INTEGER,
    revoked_at       INTEGER
) STRICT, WITHOUT ROWID;
CREATE INDEX api_keys_by_user ON api_keys (user_id, created_at);

CREATE TABLE providers (
    id               TEXT    NOT NULL PRIMARY KEY,
    user_id          TEXT UNIQUE, -- one provider account per user; NULLs never collide
    email            TEXT    NOT NULL,
    key_hash         BLOB    NOT NULL UNIQUE,
    earnings         INTEGER NOT NULL CHECK (earnings >= 0),
    suspended_reason TEXT,
    suspended_by     TEXT,
    suspended_at     INTEGER,
    created_at       INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

CREATE TABLE provisions (
    id             TEXT    NOT NULL PRIMARY KEY,
    provider_id    TEXT    NOT NULL REFERENCES providers (id),
    endpoint       TEXT,
    node_secret    TEXT    NOT NULL,
    device         TEXT    NOT NULL, -- JSON as the node reported it
    country        TEXT    NOT NULL,
    region         TEXT    NOT NULL,
    city           TEXT    NOT NULL,
    tier           INTEGER NOT NULL,
    state          TEXT    NOT NULL,
    last_heartbeat INTEGER NOT NULL,
    created_at     INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
CREATE INDEX provisions_by_provider ON provisions (provider_id, created_at);
-- The expiry sweep and the live listing only ever look at nodes not ended.
CREATE INDEX provisions_live_by_heartbeat ON provisions (last_heartbeat) WHERE state <> 'ended';
CREATE INDEX provisions_live_by_age ON provisions (created_at) WHERE state <> 'ended';

CREATE TABLE pool_entries (
    provision_id TEXT    NOT NULL REFERENCES provisions (id) ON DELETE CASCADE,
    seq          INTEGER NOT NULL,
    provider_id  TEXT    NOT NULL,
    service      TEXT    NOT NULL,
    model        TEXT    NOT NULL,
    endpoint     TEXT    NOT NULL,
    node_secret  TEXT    NOT NULL,
    tier         INTEGER NOT NULL,
    region       TEXT    NOT NULL,
    -- Entries by provision: replaced and deleted together with their node.
    PRIMARY KEY (provision_id, seq)
) STRICT, WITHOUT ROWID;

CREATE TABLE reservations (
    request_id TEXT    NOT NULL PRIMARY KEY,
    user_id    TEXT    NOT NULL REFERENCES users (id),
    key_id     TEXT    NOT NULL REFERENCES api_keys (id),
    route      TEXT    NOT NULL,
    amount     INTEGER NOT NULL CHECK (amount >= 0),
    created_at INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
-- The stale-reservation sweep.
CREATE INDEX reservations_by_age ON reservations (created_at);

-- One row per settled request: the usage record and the settlement's
-- idempotency key at once (a request id is settled iff its row is here).
-- Rows are appended in rowid order; only the small request_id index takes
-- random inserts (request ids are random), which keeps the pages a batch of
-- settlements dirties, and so the log it writes, small.
CREATE TABLE usage (
    seq           INTEGER NOT NULL PRIMARY KEY,
    request_id    TEXT    NOT NULL UNIQUE,
    user_id       TEXT    NOT NULL,
    key_id        TEXT    NOT NULL,
    route         TEXT    NOT NULL,
    model         TEXT    NOT NULL,
    provision_id  TEXT,
    provider_id   TEXT,
    input_tokens  INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    units         INTEGER NOT NULL,
    success       INTEGER NOT NULL,
    latency_ms    INTEGER NOT NULL,
    app           TEXT,
    at            INTEGER NOT NULL,
    charged       INTEGER NOT NULL CHECK (charged >= 0),
    reward        INTEGER NOT NULL CHECK (reward >= 0 AND reward <= charged)
) STRICT;
-- A user's usage, newest first.
CREATE INDEX usage_by_user ON usage (user_id, at DESC, request_id DESC);

-- Running totals kept by the same transactions that move the money, so an
-- audit can compare them with the sums over `usage` and `reservations`.
CREATE TABLE ledger (
    id          INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    settlements INTEGER NOT NULL,
    charged     INTEGER NOT NULL,
    rewarded    INTEGER NOT NULL,
    reserved    INTEGER NOT NULL CHECK (reserved >= 0)
) STRICT;
INSERT INTO ledger (id, settlements, charged, rewarded, reserved) VALUES (1, 0, 0, 0, 0);

CREATE TABLE prices (
    service                   TEXT    NOT NULL,
    -- '' for the service's default price, '=' || model otherwise: a model
    -- named '' stays distinct from no model.
    model_key                 TEXT    NOT NULL,
    model                     TEXT,
    per_request               INTEGER NOT NULL,
    per_million_input_tokens  INTEGER NOT NULL,
    per_million_output_tokens INTEGER NOT NULL,
    per_million_units         INTEGER NOT NULL,
    PRIMARY KEY (service, model_key)
) STRICT, WITHOUT ROWID;

CREATE TABLE login_codes (
    email      TEXT    NOT NULL PRIMARY KEY,
    code_hash  BLOB    NOT NULL,
    expires_at INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    attempts   INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

-- When codes were issued, per email, for the rate limit.
CREATE TABLE login_code_issues (
    email TEXT    NOT NULL,
    at    INTEGER NOT NULL
) STRICT;
CREATE INDEX login_code_issues_by_email ON login_code_issues (email, at);

CREATE TABLE refresh_tokens (
    hash       BLOB    NOT NULL PRIMARY KEY,
    family     TEXT    NOT NULL,
    user_id    TEXT    NOT NULL,
    expires_at INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    used       INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
CREATE INDEX refresh_tokens_by_family ON refresh_tokens (family);

CREATE TABLE revoked_token_families (
    family TEXT NOT NULL PRIMARY KEY
) STRICT, WITHOUT ROWID;

CREATE TABLE notifications (
    id         TEXT    NOT NULL PRIMARY KEY,
    title      TEXT    NOT NULL,
    banner     TEXT    NOT NULL,
    popup      TEXT    NOT NULL,
    starts_at  INTEGER NOT NULL,
    ends_at    INTEGER NOT NULL,
    placements TEXT    NOT NULL -- JSON array
) STRICT, WITHOUT ROWID;

CREATE TABLE stats (
    scope           TEXT    NOT NULL,
    day             INTEGER NOT NULL, -- days since 1970-01-01
    requests        INTEGER NOT NULL,
    failures        INTEGER NOT NULL,
    input_tokens    INTEGER NOT NULL,
    output_tokens   INTEGER NOT NULL,
    units           INTEGER NOT NULL,
    latency_ms_sum  INTEGER NOT NULL,
    latency_buckets TEXT    NOT NULL, -- JSON array of counts
    charged         INTEGER NOT NULL,
    rewarded        INTEGER NOT NULL,
    -- Stats by (scope, day): one scope's range, and every scope under a prefix.
    PRIMARY KEY (scope, day)
) STRICT, WITHOUT ROWID;

-- Applied stats batch ids: a retried batch adds nothing.
CREATE TABLE stats_batches (
    id TEXT NOT NULL PRIMARY KEY
) STRICT, WITHOUT ROWID;
