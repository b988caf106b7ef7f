-- projector's catalog on PostgreSQL, in its own schema (`__SCHEMA__` is `postgres.schema`,
-- `projector` by default). The outbox is the application's table: see source/pg_outbox.rs.

-- One row per projection name: which plugin version is active and whether it runs.
CREATE TABLE IF NOT EXISTS __SCHEMA__.projections (
    name       text   PRIMARY KEY,
    version    text   NOT NULL,
    status     text   NOT NULL,
    error      text,
    updated_at bigint NOT NULL
);

-- How far each projection version has applied the outbox; written in the same transaction as
-- the read-model documents of the batch that moved it.
CREATE TABLE IF NOT EXISTS __SCHEMA__.checkpoints (
    projection text   NOT NULL,
    version    text   NOT NULL,
    position   bigint NOT NULL,
    updated_at bigint NOT NULL,
    PRIMARY KEY (projection, version)
);
