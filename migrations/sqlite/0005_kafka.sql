-- The Kafka source: how far each partition of each topic has been taken into the outbox, by
-- consumer group. Moved in the transaction that writes the partition's messages, compared and
-- set: an instance that lost the partition in a rebalance cannot write it again.
CREATE TABLE IF NOT EXISTS kafka_offsets (
    group_id    TEXT    NOT NULL,
    topic       TEXT    NOT NULL,
    partition   INTEGER NOT NULL,
    -- The next offset to take.
    next_offset INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (group_id, topic, partition)
);
