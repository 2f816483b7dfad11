-- The model catalogue: what nodes may serve, one row per service and model.
CREATE TABLE catalogue (
    service      TEXT    NOT NULL,
    model        TEXT    NOT NULL,
    min_tier     INTEGER NOT NULL,
    target_nodes INTEGER NOT NULL,
    PRIMARY KEY (service, model)
) STRICT, WITHOUT ROWID;
