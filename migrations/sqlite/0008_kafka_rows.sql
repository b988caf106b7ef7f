-- The Kafka message each log row was made of (NULL for events appended over HTTP), so that a
-- projection's lag per partition is exact: the partition's high watermark minus the offset
-- after the newest row of the partition it has applied (see source::kafka). The index finds
-- that row, and a partition's newest, in a few page reads.
ALTER TABLE outbox ADD COLUMN kafka_topic TEXT;
ALTER TABLE outbox ADD COLUMN kafka_partition INTEGER;
ALTER TABLE outbox ADD COLUMN kafka_offset INTEGER;
CREATE INDEX IF NOT EXISTS outbox_kafka_partition
    ON outbox (kafka_topic, kafka_partition, position) WHERE kafka_topic IS NOT NULL;
