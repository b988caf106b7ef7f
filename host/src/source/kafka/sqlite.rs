//! Taking a batch of Kafka messages into the SQLite outbox: one transaction writes the events
//! (each event id once), the messages no event can be made of (as rows the reader reports as
//! malformed, so they are dead-lettered and their streams parked like any malformed row), and
//! moves each partition's offset, compared and set.

use std::collections::{HashMap, HashSet};

use sqlx::{QueryBuilder, Row};
use tokio::sync::watch;

use super::{next_to_apply, plan, touched, AppliedRow, Batch, Written};
use crate::source::SourceError;
use crate::store::now_ms;
use crate::store::sqlite::Sqlite;

const ROWS_PER_STATEMENT: usize = 500;

fn db_err(context: &'static str) -> impl FnOnce(sqlx::Error) -> SourceError {
    move |source| SourceError::Database {
        context: context.to_owned(),
        source,
    }
}

/// The next offset of every partition `group` has taken, by (topic, partition).
pub(crate) async fn offsets(
    db: &Sqlite,
    group: &str,
) -> Result<HashMap<(String, i32), i64>, SourceError> {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT topic, partition, next_offset FROM kafka_offsets WHERE group_id = ?",
    )
    .bind(group)
    .fetch_all(&db.read)
    .await
    .map_err(db_err("reading the Kafka offsets"))?;
    Ok(rows
        .into_iter()
        .map(|(topic, partition, next)| ((topic, partition as i32), next))
        .collect())
}

/// What the log holds of each partition `group` has taken, seen from `checkpoint`: four
/// lookups a partition on the `outbox_kafka_partition` index.
pub(crate) async fn applied_offsets(
    db: &Sqlite,
    group: &str,
    checkpoint: u64,
) -> Result<HashMap<(String, i32), i64>, SourceError> {
    const OF_PARTITION: &str =
        "FROM outbox o WHERE o.kafka_topic = k.topic AND o.kafka_partition = k.partition";
    let rows: Vec<AppliedRow> =
        sqlx::query_as(&format!(
            "SELECT k.topic, k.partition, k.next_offset, \
             (SELECT MAX(o.position) {OF_PARTITION}), \
             (SELECT MAX(o.position) {OF_PARTITION} AND o.position <= ?2), \
             (SELECT o.kafka_offset {OF_PARTITION} AND o.position <= ?2 ORDER BY o.position DESC LIMIT 1), \
             (SELECT o.kafka_offset {OF_PARTITION} ORDER BY o.position LIMIT 1) \
             FROM kafka_offsets k WHERE k.group_id = ?1"
        ))
        .bind(group)
        .bind(checkpoint as i64)
        .fetch_all(&db.read)
        .await
        .map_err(db_err("reading where a projection stands in the Kafka partitions"))?;
    Ok(next_to_apply(rows))
}

pub(crate) async fn write(
    db: &Sqlite,
    head: &watch::Sender<u64>,
    group: &str,
    batch: &Batch,
) -> Result<Written, SourceError> {
    db.check_file()?;
    let mut tx = db
        .write
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(db_err("beginning a Kafka batch"))?;
    // The fence: every partition must still be where this consumer found it.
    let mut fenced = Vec::new();
    for range in &batch.partitions {
        let stored: Option<i64> = sqlx::query_scalar(
            "SELECT next_offset FROM kafka_offsets WHERE group_id = ? AND topic = ? AND partition = ?",
        )
        .bind(group)
        .bind(&range.topic)
        .bind(range.partition)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_err("reading a Kafka offset"))?;
        if let Some(stored) = stored.filter(|stored| *stored != range.from) {
            fenced.push((range.topic.clone(), range.partition, stored));
        }
    }
    if !fenced.is_empty() {
        return Ok(Written {
            fenced,
            ..Written::default()
        });
    }
    // Current versions of the streams, and which ids exist already.
    let (streams, ids) = touched(batch, str::to_owned);
    let mut versions: HashMap<String, u64> = HashMap::new();
    for chunk in streams.chunks(ROWS_PER_STATEMENT) {
        let mut sql =
            QueryBuilder::new("SELECT stream, MAX(version) FROM outbox WHERE stream IN (");
        let mut list = sql.separated(", ");
        for stream in chunk {
            list.push_bind(stream.as_str());
        }
        sql.push(") GROUP BY stream");
        for row in sql
            .build()
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err("reading stream versions"))?
        {
            let stream: String = row.try_get(0).map_err(db_err("reading stream versions"))?;
            let version = row.try_get::<i64, _>(1).unwrap_or(0).max(0) as u64;
            versions.insert(stream, version);
        }
    }
    let mut seen: HashSet<String> = HashSet::new();
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let mut sql = QueryBuilder::new("SELECT id FROM outbox WHERE id IN (");
        let mut list = sql.separated(", ");
        for id in chunk {
            list.push_bind(id.as_str());
        }
        sql.push(")");
        for row in sql
            .build()
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err("checking event ids"))?
        {
            seen.insert(row.try_get(0).map_err(db_err("checking event ids"))?);
        }
    }
    let (rows, written) = plan(batch, &mut versions, &mut seen, str::to_owned);
    let mut last = None;
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut sql = QueryBuilder::new(
            "INSERT INTO outbox (id, stream, stream_type, event_type, version, payload, headers, timestamp_ms, \
             kafka_topic, kafka_partition, kafka_offset) ",
        );
        sql.push_values(chunk, |mut row, r| {
            row.push_bind(r.id.as_str())
                .push_bind(r.stream.as_str())
                .push_bind(r.stream_type.as_str())
                .push_bind(r.event_type.as_str())
                .push_bind(r.version as i64)
                // Not JSON on purpose for a malformed row: the reader reads it alone and
                // reports it, with the marker header's reason.
                .push_bind(r.payload.clone().unwrap_or_else(|| "!".to_owned()))
                .push_bind(r.headers.as_str())
                .push_bind(r.timestamp_ms)
                .push_bind(r.topic)
                .push_bind(r.partition)
                .push_bind(r.offset);
        });
        sql.push(" RETURNING position");
        let positions: Vec<i64> = sql
            .build_query_scalar()
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err("writing Kafka messages to the outbox"))?;
        last = positions.into_iter().max().or(last);
    }
    let now = now_ms();
    for range in &batch.partitions {
        sqlx::query(
            "INSERT INTO kafka_offsets (group_id, topic, partition, next_offset, updated_at) \
             VALUES (?, ?, ?, ?, ?) ON CONFLICT (group_id, topic, partition) \
             DO UPDATE SET next_offset = excluded.next_offset, updated_at = excluded.updated_at",
        )
        .bind(group)
        .bind(&range.topic)
        .bind(range.partition)
        .bind(range.to)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db_err("moving a Kafka offset"))?;
    }
    tx.commit()
        .await
        .map_err(db_err("committing a Kafka batch"))?;
    if let Some(last) = last {
        head.send_if_modified(|h| {
            let moved = last as u64 > *h;
            *h = (*h).max(last as u64);
            moved
        });
    }
    Ok(written)
}
