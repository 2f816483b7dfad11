-- The name a caller asked for when another model served it (a fallback of
-- its `models` list, or an alias); NULL when the served model is the one asked for.
ALTER TABLE usage ADD COLUMN requested_model TEXT;

-- Model aliases the operator defines: a name standing for an ordered list
-- of models (a JSON array of strings), resolved like a request's `models`.
CREATE TABLE model_aliases (
    alias  TEXT NOT NULL PRIMARY KEY,
    models TEXT NOT NULL
) STRICT, WITHOUT ROWID;
