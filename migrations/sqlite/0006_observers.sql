-- Observers: the action log. A batch's actions are written with the observer's checkpoint, in
-- the same transaction; the key (observer, event_id, idx) refuses an action decided again (a
-- replay, a reset, a rebuild), so nothing is delivered twice. `id` is log order: per stream,
-- event order. `spec` is the action as JSON without its body; `body` a webhook's body or an
-- emitted event's payload.
CREATE TABLE IF NOT EXISTS observer_actions (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    observer    TEXT    NOT NULL,
    event_id    TEXT    NOT NULL,
    idx         INTEGER NOT NULL,
    stream      TEXT    NOT NULL,
    position    INTEGER NOT NULL,
    kind        TEXT    NOT NULL,
    spec        TEXT    NOT NULL,
    body        BLOB    NOT NULL,
    state       TEXT    NOT NULL DEFAULT 'pending',
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_at     INTEGER NOT NULL DEFAULT 0,
    last_status INTEGER,
    last_error  TEXT,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    UNIQUE (observer, event_id, idx)
);

-- What the dispatcher loads: the actions not delivered yet, and the dead ones its streams wait
-- behind.
CREATE INDEX IF NOT EXISTS observer_actions_open
    ON observer_actions (observer, id) WHERE state IN ('pending', 'dead');
