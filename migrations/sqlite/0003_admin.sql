-- Operator tools: what became of each dead letter, what operators did, paused projections and
-- the admin commands queued for the instance that runs a projection.

-- Why an event became a dead letter (`malformed`, `plugin`, `parked`); rows of earlier
-- versions were all malformed rows or events parked behind one.
ALTER TABLE dead_letters ADD COLUMN kind TEXT NOT NULL DEFAULT 'malformed';
UPDATE dead_letters SET kind = 'parked' WHERE parked_behind IS NOT NULL;
-- `open` (its stream waits behind it), `retried` or `skipped` (by an operator, at
-- resolved_at).
ALTER TABLE dead_letters ADD COLUMN state TEXT NOT NULL DEFAULT 'open';
ALTER TABLE dead_letters ADD COLUMN resolved_at INTEGER;
-- The plugin version that failed on it (plugin faults).
ALTER TABLE dead_letters ADD COLUMN plugin_version TEXT;
-- The event itself (JSON), to run again on a retry; NULL for a malformed row.
ALTER TABLE dead_letters ADD COLUMN event TEXT;
-- The events parked behind a letter, and the heads of parked streams.
CREATE INDEX IF NOT EXISTS dead_letters_parked_behind
    ON dead_letters (projection, version, parked_behind);

-- Operators' actions through the admin API, on a projection version or one of its letters.
CREATE TABLE IF NOT EXISTS admin_actions (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    projection TEXT    NOT NULL,
    version    TEXT    NOT NULL,
    -- The dead letter's position, for actions on one.
    target     INTEGER,
    action     TEXT    NOT NULL,
    at         INTEGER NOT NULL,
    outcome    TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS admin_actions_target ON admin_actions (projection, version, target);

-- Paused by an operator: kept across restarts (registering again leaves it alone).
ALTER TABLE projections ADD COLUMN paused INTEGER NOT NULL DEFAULT 0;

-- Admin commands (JSON) for whichever instance runs a projection, and their answers.
CREATE TABLE IF NOT EXISTS admin_commands (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    projection  TEXT    NOT NULL,
    command     TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    answer      TEXT,
    answered_at INTEGER
);
CREATE INDEX IF NOT EXISTS admin_commands_pending
    ON admin_commands (projection, id) WHERE answer IS NULL;
CREATE INDEX IF NOT EXISTS admin_commands_answered
    ON admin_commands (answered_at) WHERE answered_at IS NOT NULL;
