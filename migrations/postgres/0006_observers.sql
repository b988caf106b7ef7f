-- Observers: the action log. A batch's actions are written with the observer's checkpoint, in
-- the same transaction; the key (observer, event_id, idx) refuses an action decided again (a
-- replay, a reset, a rebuild), so nothing is delivered twice. `id` is log order: per stream,
-- event order. `spec` is the action as JSON without its body; `body` a webhook's body or an
-- emitted event's payload.
CREATE TABLE IF NOT EXISTS __SCHEMA__.observer_actions (
    id          bigserial PRIMARY KEY,
    observer    text    NOT NULL,
    event_id    text    NOT NULL,
    idx         bigint  NOT NULL,
    stream      text    NOT NULL,
    position    bigint  NOT NULL,
    kind        text    NOT NULL,
    spec        text    NOT NULL,
    body        bytea    NOT NULL,
    state       text    NOT NULL DEFAULT 'pending',
    attempts    bigint  NOT NULL DEFAULT 0,
    next_at     bigint  NOT NULL DEFAULT 0,
    last_status bigint,
    last_error  text,
    created_at  bigint  NOT NULL,
    updated_at  bigint  NOT NULL,
    UNIQUE (observer, event_id, idx)
);

-- What the dispatcher loads: the actions not delivered yet, and the dead ones its streams wait
-- behind.
CREATE INDEX IF NOT EXISTS observer_actions_open
    ON __SCHEMA__.observer_actions (observer, id) WHERE state IN ('pending', 'dead');
