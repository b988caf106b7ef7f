-- Events a projection could not take: malformed outbox rows, and the later events of their
-- stream, parked behind them so the stream's order is never broken. Written in the same
-- transaction as the checkpoint that passes them.
CREATE TABLE IF NOT EXISTS __SCHEMA__.dead_letters (
    projection    text   NOT NULL,
    version       text   NOT NULL,
    position      bigint NOT NULL,
    event_id      text,
    stream        text,
    reason        text   NOT NULL,
    -- The position of the dead letter this event is parked behind (NULL: the first).
    parked_behind bigint,
    created_at    bigint NOT NULL,
    PRIMARY KEY (projection, version, position)
);
