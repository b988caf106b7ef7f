//! Taking a batch of Kafka messages into the SQLite outbox: one transaction writes the events
//! (each event id once), the messages no event can be made of (as rows the reader reports as
//! malformed, so they are dead-lettered and their streams parked like any malformed row), and
//! moves each partition's offset, compared and set.

use std::collections::{HashMap, HashSet};

use rusqlite::OptionalExtension;
use tokio::sync::watch;

use super::{next_to_apply, plan, touched, AppliedRow, Batch, Written};
use crate::source::SourceError;
use crate::store::now_ms;
use crate::store::sqlite::lent::{self, Args, DbError};
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

/// Takes `batch` into the outbox in one transaction on the store's write connection (see
/// [`crate::store::sqlite::writer`]): the projections' commits write on it too, so the two
/// take turns instead of contending for SQLite's lock.
pub(crate) async fn write(
    db: &Sqlite,
    head: &watch::Sender<u64>,
    group: &str,
    batch: &Batch,
) -> Result<Written, SourceError> {
    db.check_file()?;
    let (written, last) = db
        .writer
        .immediate(false, "writing a Kafka batch", |tx| {
            write_batch(tx, group, batch)
        })
        .await?;
    if let Some(last) = last {
        head.send_if_modified(|h| {
            let moved = last as u64 > *h;
            *h = (*h).max(last as u64);
            moved
        });
    }
    Ok(written)
}

/// The statements of [`write`]: what was written, and the last position written.
fn write_batch(
    tx: &rusqlite::Connection,
    group: &str,
    batch: &Batch,
) -> Result<(Written, Option<i64>), SourceError> {
    let failed = |context: &'static str| SourceError::sqlite(context);
    // The fence: every partition must still be where this consumer found it.
    let mut fenced = Vec::new();
    for range in &batch.partitions {
        let stored: Option<i64> = tx
            .prepare_cached(
                "SELECT next_offset FROM kafka_offsets WHERE group_id = ? AND topic = ? AND partition = ?",
            )
            .and_then(|mut s| {
                s.query_row((group, range.topic.as_str(), range.partition), |r| r.get(0))
                    .optional()
            })
            .map_err(failed("reading a Kafka offset"))?;
        if let Some(stored) = stored.filter(|stored| *stored != range.from) {
            fenced.push((range.topic.clone(), range.partition, stored));
        }
    }
    if !fenced.is_empty() {
        let written = Written {
            fenced,
            ..Written::default()
        };
        return Ok((written, None));
    }
    // Current versions of the streams, and which ids exist already.
    let (streams, ids) = touched(batch, str::to_owned);
    let mut versions: HashMap<String, u64> = HashMap::new();
    for chunk in streams.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "SELECT stream, MAX(version) FROM outbox WHERE stream IN ({}) GROUP BY stream",
            lent::placeholders(chunk.len())
        );
        let args = rusqlite::params_from_iter(chunk);
        lent::for_each_row::<SourceError>(tx, &sql, args, "reading stream versions", |row| {
            let stream: String = row.get(0).map_err(failed("reading stream versions"))?;
            let version = row.get::<_, i64>(1).unwrap_or(0).max(0) as u64;
            versions.insert(stream, version);
            Ok(())
        })?;
    }
    let mut seen: HashSet<String> = HashSet::new();
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "SELECT id FROM outbox WHERE id IN ({})",
            lent::placeholders(chunk.len())
        );
        let args = rusqlite::params_from_iter(chunk);
        lent::for_each_row::<SourceError>(tx, &sql, args, "checking event ids", |row| {
            seen.insert(row.get(0).map_err(failed("checking event ids"))?);
            Ok(())
        })?;
    }
    let (rows, written) = plan(batch, &mut versions, &mut seen, str::to_owned);
    let mut last = None;
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO outbox (id, stream, stream_type, event_type, version, payload, headers, \
             timestamp_ms, kafka_topic, kafka_partition, kafka_offset) VALUES {} RETURNING position",
            lent::values(&format!("({})", lent::placeholders(11)), chunk.len())
        );
        let mut args: Args<'_> = Vec::with_capacity(chunk.len() * 11);
        for r in chunk {
            args.extend([
                lent::text(r.id.as_str()),
                lent::text(r.stream.as_str()),
                lent::text(r.stream_type.as_str()),
                lent::text(r.event_type.as_str()),
                lent::int(r.version as i64),
                // Not JSON on purpose for a malformed row: the reader reads it alone and
                // reports it, with the marker header's reason.
                lent::text(r.payload.as_deref().unwrap_or("!")),
                lent::text(r.headers.as_str()),
                lent::int(r.timestamp_ms),
                lent::text(r.topic),
                lent::int(i64::from(r.partition)),
                lent::int(r.offset),
            ]);
        }
        let context = "writing Kafka messages to the outbox";
        let args = rusqlite::params_from_iter(&args);
        lent::for_each_row::<SourceError>(tx, &sql, args, context, |row| {
            let position: i64 = row.get(0).map_err(failed(context))?;
            last = Some(last.map_or(position, |l: i64| l.max(position)));
            Ok(())
        })?;
    }
    let now = now_ms();
    for range in &batch.partitions {
        lent::execute::<SourceError>(
            tx,
            "INSERT INTO kafka_offsets (group_id, topic, partition, next_offset, updated_at) \
             VALUES (?, ?, ?, ?, ?) ON CONFLICT (group_id, topic, partition) \
             DO UPDATE SET next_offset = excluded.next_offset, updated_at = excluded.updated_at",
            &[
                lent::text(group),
                lent::text(range.topic.as_str()),
                lent::int(i64::from(range.partition)),
                lent::int(range.to),
                lent::int(now),
            ],
            "moving a Kafka offset",
        )?;
    }
    Ok((written, last))
}
