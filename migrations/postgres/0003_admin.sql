-- Operator tools: what became of each dead letter, what operators did, paused projections and
-- the admin commands queued for the instance that runs a projection.

-- kind: why an event became a dead letter (`malformed`, `plugin`, `parked`); rows of earlier
-- versions were all malformed rows or events parked behind one.
-- state: `open` (its stream waits behind it), `retried` or `skipped` (by an operator, at
-- resolved_at).
-- plugin_version: the plugin version that failed on it (plugin faults).
-- event: the event itself (JSON text), to run again on a retry; NULL for a malformed row.
ALTER TABLE __SCHEMA__.dead_letters
    ADD COLUMN IF NOT EXISTS kind           text NOT NULL DEFAULT 'malformed',
    ADD COLUMN IF NOT EXISTS state          text NOT NULL DEFAULT 'open',
    ADD COLUMN IF NOT EXISTS resolved_at    bigint,
    ADD COLUMN IF NOT EXISTS plugin_version text,
    ADD COLUMN IF NOT EXISTS event          text;
UPDATE __SCHEMA__.dead_letters SET kind = 'parked' WHERE parked_behind IS NOT NULL;
-- The events parked behind a letter, and the heads of parked streams.
CREATE INDEX IF NOT EXISTS dead_letters_parked_behind
    ON __SCHEMA__.dead_letters (projection, version, parked_behind);

-- Operators' actions through the admin API, on a projection version or one of its letters.
CREATE TABLE IF NOT EXISTS __SCHEMA__.admin_actions (
    id         bigserial PRIMARY KEY,
    projection text   NOT NULL,
    version    text   NOT NULL,
    -- The dead letter's position, for actions on one.
    target     bigint,
    action     text   NOT NULL,
    at         bigint NOT NULL,
    outcome    text   NOT NULL
);
CREATE INDEX IF NOT EXISTS admin_actions_target
    ON __SCHEMA__.admin_actions (projection, version, target);

-- Paused by an operator: kept across restarts (registering again leaves it alone).
ALTER TABLE __SCHEMA__.projections ADD COLUMN IF NOT EXISTS paused boolean NOT NULL DEFAULT false;

-- Admin commands (JSON) for whichever instance runs a projection, and their answers.
CREATE TABLE IF NOT EXISTS __SCHEMA__.admin_commands (
    id          bigserial PRIMARY KEY,
    projection  text   NOT NULL,
    command     text   NOT NULL,
    created_at  bigint NOT NULL,
    answer      text,
    answered_at bigint
);
CREATE INDEX IF NOT EXISTS admin_commands_pending
    ON __SCHEMA__.admin_commands (projection, id) WHERE answer IS NULL;
CREATE INDEX IF NOT EXISTS admin_commands_answered
    ON __SCHEMA__.admin_commands (answered_at) WHERE answered_at IS NOT NULL;
