-- The application's database and its outbox, as Debezium's EventRouter expects it.
CREATE DATABASE app;
\c app
CREATE TABLE outbox (
    id            uuid PRIMARY KEY,
    aggregatetype text NOT NULL,
    aggregateid   text NOT NULL,
    type          text NOT NULL,
    payload       jsonb
);
