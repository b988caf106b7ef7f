-- The event log (outbox). `position` is the source order: SQLite has one writer at a time, so
-- positions commit in order and a reader can never pass a row that commits later.
CREATE TABLE IF NOT EXISTS outbox (
    position     INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT    NOT NULL UNIQUE,
    stream       TEXT    NOT NULL,
    stream_type  TEXT    NOT NULL,
    event_type   TEXT    NOT NULL,
    version      INTEGER NOT NULL,
    payload      TEXT    NOT NULL,
    headers      TEXT    NOT NULL DEFAULT '[]',
    timestamp_ms INTEGER NOT NULL,
    UNIQUE (stream, version)
);

-- One row per projection name: which plugin version is active and whether it runs.
CREATE TABLE IF NOT EXISTS projections (
    name       TEXT    PRIMARY KEY,
    version    TEXT    NOT NULL,
    status     TEXT    NOT NULL,
    error      TEXT,
    updated_at INTEGER NOT NULL
);

-- How far each projection version has applied the log; written in the same transaction as
-- the read-model documents of the batch that moved it.
CREATE TABLE IF NOT EXISTS checkpoints (
    projection TEXT    NOT NULL,
    version    TEXT    NOT NULL,
    position   INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (projection, version)
);
