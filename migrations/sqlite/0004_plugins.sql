-- Hot swap: the plugins the host runs are kept here (uploaded through the admin API, or
-- taken from the plugins folder), so a restart and every other instance load the same set.

-- The code of each projection version: a same-version swap replaces `bytes`.
CREATE TABLE IF NOT EXISTS plugins (
    name        TEXT    NOT NULL,
    version     TEXT    NOT NULL,
    sha256      TEXT    NOT NULL,
    world       TEXT    NOT NULL,
    contract    TEXT    NOT NULL,
    -- The descriptor (JSON): a version's tables can be found (and dropped) without its code.
    descriptor  TEXT    NOT NULL,
    -- `upload`, or `folder` (the plugins folder at start, or `serve --watch`).
    origin      TEXT    NOT NULL,
    uploaded_at INTEGER NOT NULL,
    bytes       BLOB    NOT NULL,
    PRIMARY KEY (name, version)
);

-- The version being rebuilt beside the active one, and whether its cut-over waits for an
-- operator (`POST /admin/projections/{p}/activate`).
ALTER TABLE projections ADD COLUMN building TEXT;
ALTER TABLE projections ADD COLUMN manual_cutover INTEGER NOT NULL DEFAULT 0;

-- Bumped by every change of the plugins or of a projection's active or building version:
-- instances poll this one number and reload only when it moves.
CREATE TABLE IF NOT EXISTS catalog_revision (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    revision INTEGER NOT NULL
);
INSERT INTO catalog_revision (id, revision) VALUES (1, 0) ON CONFLICT DO NOTHING;
