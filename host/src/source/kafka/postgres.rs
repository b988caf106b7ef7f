//! Taking a batch of Kafka messages into the PostgreSQL log: the table `kafka_log` of
//! `postgres.schema`, with the outbox's default columns, which a [`PgOutbox`] reads like any
//! outbox (gap-safe, positions by its trigger). Never the application's outbox table: Debezium
//! reads that one, and would send the events round again.
//!
//! One transaction per batch, as on SQLite: each partition's offset row is locked and compared
//! (the fence against a member that lost the partition), each event id written once, bad
//! messages kept as rows the reader reports as malformed, offsets moved.

use std::collections::{HashMap, HashSet};

use sha2::{Digest, Sha256};

use super::{next_to_apply, plan, touched, AppliedRow, Batch, Written};
use crate::config::OutboxConfig;
use crate::source::pg_outbox::PgOutbox;
use crate::source::{Source, SourceError};
use crate::store::now_ms;
use crate::store::postgres::Postgres;

fn db_err(context: &'static str) -> impl FnOnce(sqlx::Error) -> SourceError {
    move |source| SourceError::Database {
        context: context.to_owned(),
        source,
    }
}

/// The log's table: the outbox layout's default column names, in the host's schema.
pub fn log_config(schema: &str) -> OutboxConfig {
    OutboxConfig {
        table: format!("{schema}.kafka_log"),
        ..OutboxConfig::default()
    }
}

/// The offsets table, created if missing, and the log's columns naming the message each row
/// was made of (see the SQLite migration `0008_kafka_rows.sql`). After the log table exists.
pub(crate) async fn prepare(db: &Postgres) -> Result<(), SourceError> {
    let schema = db.schema();
    let mut tx = db
        .pool
        .begin()
        .await
        .map_err(db_err("preparing the Kafka tables"))?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(crate::store::postgres::DDL_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(db_err("locking for DDL"))?;
    for ddl in [
        format!(
            "CREATE TABLE IF NOT EXISTS {schema}.kafka_offsets (\
             group_id text NOT NULL, topic text NOT NULL, partition integer NOT NULL, \
             next_offset bigint NOT NULL, updated_at bigint NOT NULL, \
             PRIMARY KEY (group_id, topic, partition))"
        ),
        format!(
            "ALTER TABLE {schema}.kafka_log ADD COLUMN IF NOT EXISTS kafka_topic text, \
             ADD COLUMN IF NOT EXISTS kafka_partition integer, \
             ADD COLUMN IF NOT EXISTS kafka_offset bigint"
        ),
        format!(
            "CREATE INDEX IF NOT EXISTS kafka_log_partition ON {schema}.kafka_log \
             (kafka_topic, kafka_partition, position) WHERE kafka_topic IS NOT NULL"
        ),
    ] {
        sqlx::query(&ddl)
            .execute(&mut *tx)
            .await
            .map_err(db_err("creating the Kafka tables"))?;
    }
    tx.commit()
        .await
        .map_err(db_err("creating the Kafka tables"))
}

pub(crate) async fn offsets(
    db: &Postgres,
    group: &str,
) -> Result<HashMap<(String, i32), i64>, SourceError> {
    let rows: Vec<(String, i32, i64)> = sqlx::query_as(&format!(
        "SELECT topic, partition, next_offset FROM {}.kafka_offsets WHERE group_id = $1",
        db.schema()
    ))
    .bind(group)
    .fetch_all(&db.pool)
    .await
    .map_err(db_err("reading the Kafka offsets"))?;
    Ok(rows
        .into_iter()
        .map(|(topic, partition, next)| ((topic, partition), next))
        .collect())
}

/// What the log holds of each partition `group` has taken, seen from `checkpoint` (as on
/// SQLite: four lookups a partition on the `kafka_log_partition` index).
pub(crate) async fn applied_offsets(
    db: &Postgres,
    group: &str,
    checkpoint: u64,
) -> Result<HashMap<(String, i32), i64>, SourceError> {
    let schema = db.schema();
    let of_partition = format!(
        "FROM {schema}.kafka_log o WHERE o.kafka_topic = k.topic AND o.kafka_partition = k.partition"
    );
    let rows: Vec<AppliedRow> =
        sqlx::query_as(&format!(
            "SELECT k.topic, k.partition, k.next_offset, \
             (SELECT MAX(o.position) {of_partition}), \
             (SELECT MAX(o.position) {of_partition} AND o.position <= $2), \
             (SELECT o.kafka_offset {of_partition} AND o.position <= $2 ORDER BY o.position DESC LIMIT 1), \
             (SELECT o.kafka_offset {of_partition} ORDER BY o.position LIMIT 1) \
             FROM {schema}.kafka_offsets k WHERE k.group_id = $1"
        ))
        .bind(group)
        .bind(checkpoint as i64)
        .fetch_all(&db.pool)
        .await
        .map_err(db_err("reading where a projection stands in the Kafka partitions"))?;
    Ok(next_to_apply(rows))
}

/// The log's id column is a `uuid` (as Debezium's outbox): an id that is not one is mapped to
/// one, the same each time, so it is still taken once.
fn uuid_of(id: &str) -> String {
    uuid::Uuid::parse_str(id)
        .unwrap_or_else(|_| {
            let digest = Sha256::digest(id.as_bytes());
            let mut bytes = [0u8; 16];
            bytes.copy_from_slice(&digest[..16]);
            uuid::Builder::from_custom_bytes(bytes).into_uuid()
        })
        .to_string()
}

pub(crate) async fn write(
    db: &Postgres,
    log: &PgOutbox,
    group: &str,
    batch: &Batch,
) -> Result<Written, SourceError> {
    let schema = db.schema();
    let table = format!("{schema}.\"kafka_log\"");
    let mut tx = db
        .pool
        .begin()
        .await
        .map_err(db_err("beginning a Kafka batch"))?;
    let mut fenced = Vec::new();
    for range in &batch.partitions {
        sqlx::query(&format!(
            "INSERT INTO {schema}.kafka_offsets (group_id, topic, partition, next_offset, updated_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING"
        ))
        .bind(group)
        .bind(&range.topic)
        .bind(range.partition)
        .bind(range.from)
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .map_err(db_err("reading a Kafka offset"))?;
        // Locked until the commit: another member's batch for the partition waits, then
        // finds the offset moved.
        let stored: i64 = sqlx::query_scalar(&format!(
            "SELECT next_offset FROM {schema}.kafka_offsets \
             WHERE group_id = $1 AND topic = $2 AND partition = $3 FOR UPDATE"
        ))
        .bind(group)
        .bind(&range.topic)
        .bind(range.partition)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_err("reading a Kafka offset"))?;
        if stored != range.from {
            fenced.push((range.topic.clone(), range.partition, stored));
        }
    }
    if !fenced.is_empty() {
        return Ok(Written {
            fenced,
            ..Written::default()
        });
    }
    let (streams, ids) = touched(batch, uuid_of);
    let mut versions: HashMap<String, u64> = sqlx::query_as::<_, (String, i64)>(&format!(
        "SELECT aggregateid, MAX(version) FROM {table} WHERE aggregateid = ANY($1) GROUP BY 1"
    ))
    .bind(&streams)
    .fetch_all(&mut *tx)
    .await
    .map_err(db_err("reading stream versions"))?
    .into_iter()
    .map(|(s, v)| (s, v.max(0) as u64))
    .collect();
    let mut seen: HashSet<String> = sqlx::query_scalar::<_, String>(&format!(
        "SELECT id::text FROM {table} WHERE id = ANY($1::uuid[])"
    ))
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await
    .map_err(db_err("checking event ids"))?
    .into_iter()
    .collect();
    let (rows, written) = plan(batch, &mut versions, &mut seen, uuid_of);
    // Column by column, for one UNNEST.
    let c_id: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    let c_type_of_stream: Vec<&str> = rows.iter().map(|r| r.stream_type.as_str()).collect();
    let c_stream: Vec<&str> = rows.iter().map(|r| r.stream.as_str()).collect();
    let c_type: Vec<&str> = rows.iter().map(|r| r.event_type.as_str()).collect();
    // NULL for a malformed row: the reader reads it alone and reports it, with the marker's
    // reason.
    let c_payload: Vec<Option<&str>> = rows.iter().map(|r| r.payload.as_deref()).collect();
    let c_version: Vec<i64> = rows.iter().map(|r| r.version as i64).collect();
    let c_headers: Vec<&str> = rows.iter().map(|r| r.headers.as_str()).collect();
    let c_ts: Vec<i64> = rows.iter().map(|r| r.timestamp_ms).collect();
    let c_topic: Vec<&str> = rows.iter().map(|r| r.topic).collect();
    let c_partition: Vec<i32> = rows.iter().map(|r| r.partition).collect();
    let c_offset: Vec<i64> = rows.iter().map(|r| r.offset).collect();
    if !c_id.is_empty() {
        sqlx::query(&format!(
            "INSERT INTO {table} (id, aggregatetype, aggregateid, type, payload, version, headers, created_at, \
             kafka_topic, kafka_partition, kafka_offset) \
             SELECT i, st, s, ty, p::json, v, h::jsonb, to_timestamp(ts / 1000.0), kt, kp, ko \
             FROM UNNEST($1::text[]::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], \
             $7::text[], $8::bigint[], $9::text[], $10::integer[], $11::bigint[]) \
             WITH ORDINALITY AS u(i, st, s, ty, p, v, h, ts, kt, kp, ko, n) ORDER BY n"
        ))
        .bind(&c_id)
        .bind(&c_type_of_stream)
        .bind(&c_stream)
        .bind(&c_type)
        .bind(&c_payload)
        .bind(&c_version)
        .bind(&c_headers)
        .bind(&c_ts)
        .bind(&c_topic)
        .bind(&c_partition)
        .bind(&c_offset)
        .execute(&mut *tx)
        .await
        .map_err(db_err("writing Kafka messages to the log"))?;
    }
    for range in &batch.partitions {
        sqlx::query(&format!(
            "UPDATE {schema}.kafka_offsets SET next_offset = $4, updated_at = $5 \
             WHERE group_id = $1 AND topic = $2 AND partition = $3"
        ))
        .bind(group)
        .bind(&range.topic)
        .bind(range.partition)
        .bind(range.to)
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .map_err(db_err("moving a Kafka offset"))?;
    }
    tx.commit()
        .await
        .map_err(db_err("committing a Kafka batch"))?;
    // The head watcher looks now, not at its next timed check.
    log.nudge();
    Ok(written)
}
