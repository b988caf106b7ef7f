-- Hot swap: the plugins the host runs are kept here (uploaded through the admin API, or
-- taken from the plugins folder), so a restart and every other instance load the same set.

-- The code of each projection version: a same-version swap replaces `bytes`.
-- descriptor: JSON, so a version's tables can be found (and dropped) without its code.
-- origin: `upload`, or `folder` (the plugins folder at start, or `serve --watch`).
CREATE TABLE IF NOT EXISTS __SCHEMA__.plugins (
    name        text   NOT NULL,
    version     text   NOT NULL,
    sha256      text   NOT NULL,
    world       text   NOT NULL,
    contract    text   NOT NULL,
    descriptor  text   NOT NULL,
    origin      text   NOT NULL,
    uploaded_at bigint NOT NULL,
    bytes       bytea  NOT NULL,
    PRIMARY KEY (name, version)
);

-- The version being rebuilt beside the active one, and whether its cut-over waits for an
-- operator (`POST /admin/projections/{p}/activate`).
ALTER TABLE __SCHEMA__.projections
    ADD COLUMN IF NOT EXISTS building       text,
    ADD COLUMN IF NOT EXISTS manual_cutover boolean NOT NULL DEFAULT false;

-- Bumped by every change of the plugins or of a projection's active or building version:
-- instances poll this one number and reload only when it moves.
CREATE TABLE IF NOT EXISTS __SCHEMA__.catalog_revision (
    id       integer PRIMARY KEY CHECK (id = 1),
    revision bigint  NOT NULL
);
INSERT INTO __SCHEMA__.catalog_revision (id, revision) VALUES (1, 0) ON CONFLICT DO NOTHING;
