-- Events a projection could not take: malformed outbox rows, and the later events of their
-- stream, parked behind them so the stream's order is never broken. Written in the same
-- transaction as the checkpoint that passes them.
CREATE TABLE IF NOT EXISTS dead_letters (
    projection    TEXT    NOT NULL,
    version       TEXT    NOT NULL,
    position      INTEGER NOT NULL,
    event_id      TEXT,
    stream        TEXT,
    reason        TEXT    NOT NULL,
    -- The position of the dead letter this event is parked behind (NULL: the first).
    parked_behind INTEGER,
    created_at    INTEGER NOT NULL,
    PRIMARY KEY (projection, version, position)
);
