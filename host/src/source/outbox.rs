//! The outbox in the embedded SQLite database: `POST /events` appends to it, runners read it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::value::RawValue;
use sqlx::{QueryBuilder, Row};
use tokio::sync::watch;

use super::{validate, AppendError, Appended, NewEvent, Source, SourceError};
use crate::event::Event;
use crate::store::now_ms;
use crate::store::sqlite::Sqlite;

/// How often the head is re-read in case another process wrote to the file. Appends through
/// this process wake runners at once; this is only the fallback.
const FALLBACK_POLL: Duration = Duration::from_secs(1);

/// Rows or values per multi-row statement (8 binds a row: well under SQLite's bind limit).
const ROWS_PER_STATEMENT: usize = 500;

pub struct SqliteOutbox {
    db: Sqlite,
    head: Arc<watch::Sender<u64>>,
}

fn db_err(context: &str) -> impl FnOnce(sqlx::Error) -> SourceError + '_ {
    move |source| SourceError::Database {
        context: context.to_owned(),
        source,
    }
}

impl SqliteOutbox {
    pub async fn new(db: Sqlite) -> Result<Self, SourceError> {
        let head = read_head(&db).await?;
        let head = Arc::new(watch::Sender::new(head));
        let poll = Arc::downgrade(&head);
        let poll_db = db.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(FALLBACK_POLL).await;
                let Some(head) = poll.upgrade() else { break };
                match read_head(&poll_db).await {
                    Ok(position) => {
                        head.send_if_modified(|h| raise(h, position));
                    }
                    Err(err) => tracing::warn!(error = %err, "polling the outbox head failed"),
                }
            }
        });
        Ok(Self { db, head })
    }
}

fn raise(head: &mut u64, position: u64) -> bool {
    if position > *head {
        *head = position;
        true
    } else {
        false
    }
}

async fn read_head(db: &Sqlite) -> Result<u64, SourceError> {
    let head: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(position), 0) FROM outbox")
        .fetch_one(&db.read)
        .await
        .map_err(db_err("reading the outbox head"))?;
    Ok(head as u64)
}

#[async_trait]
impl Source for SqliteOutbox {
    async fn read(
        &self,
        after: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Vec<Event>, SourceError> {
        let rows = sqlx::query(
            "SELECT position, id, stream, stream_type, event_type, version, payload, headers, timestamp_ms \
             FROM outbox WHERE position > ? ORDER BY position LIMIT ?",
        )
        .bind(after as i64)
        .bind(max_events as i64)
        .fetch_all(&self.db.read)
        .await
        .map_err(db_err("reading the outbox"))?;
        let mut events = Vec::with_capacity(rows.len());
        let mut bytes = 0;
        for row in rows {
            let position = row.get::<i64, _>(0) as u64;
            let malformed = |reason: String| SourceError::Malformed { position, reason };
            let payload = RawValue::from_string(row.get(6))
                .map_err(|e| malformed(format!("payload is not JSON: {e}")))?;
            let headers: &str = row.get(7);
            let headers = match headers {
                "[]" => Vec::new(),
                _ => serde_json::from_str(headers)
                    .map_err(|e| malformed(format!("headers are not a list of pairs: {e}")))?,
            };
            let event = Event {
                position,
                id: row.get(1),
                stream: row.get(2),
                stream_type: row.get(3),
                event_type: row.get(4),
                version: row.get::<i64, _>(5) as u64,
                payload,
                headers,
                timestamp_ms: row.get::<i64, _>(8) as u64,
            };
            bytes += event.size_hint();
            events.push(event);
            if bytes >= max_bytes {
                break;
            }
        }
        Ok(events)
    }

    fn head(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    async fn position_of(&self, stream: &str, version: u64) -> Result<Option<u64>, SourceError> {
        let position: Option<i64> =
            sqlx::query_scalar("SELECT position FROM outbox WHERE stream = ? AND version = ?")
                .bind(stream)
                .bind(version as i64)
                .fetch_optional(&self.db.read)
                .await
                .map_err(db_err("looking up a stream version"))?;
        Ok(position.map(|p| p as u64))
    }

    async fn version_at(&self, stream: &str, position: u64) -> Result<u64, SourceError> {
        let version: i64 = sqlx::query_scalar(
            "SELECT COALESCE(MAX(version), 0) FROM outbox WHERE stream = ? AND position <= ?",
        )
        .bind(stream)
        .bind(position as i64)
        .fetch_one(&self.db.read)
        .await
        .map_err(db_err("reading a stream's version"))?;
        Ok(version as u64)
    }

    async fn append(&self, events: Vec<NewEvent>) -> Result<Vec<Appended>, AppendError> {
        validate(&events)?;
        let now = now_ms();
        let mut tx = self
            .db
            .write
            .begin()
            .await
            .map_err(db_err("beginning an append"))?;
        // Current versions of every stream in the request, a few statements for the lot.
        let mut versions: HashMap<&str, u64> = HashMap::new();
        let mut streams: Vec<&str> = events.iter().map(|e| e.stream.as_str()).collect();
        streams.sort_unstable();
        streams.dedup();
        for chunk in streams.chunks(ROWS_PER_STATEMENT) {
            let mut sql =
                QueryBuilder::new("SELECT stream, MAX(version) FROM outbox WHERE stream IN (");
            let mut list = sql.separated(", ");
            for stream in chunk {
                list.push_bind(*stream);
            }
            sql.push(") GROUP BY stream");
            let rows = sql
                .build()
                .fetch_all(&mut *tx)
                .await
                .map_err(db_err("reading stream versions"))?;
            for row in rows {
                let stream: String = row.get(0);
                if let Some(s) = chunk.iter().find(|s| **s == stream) {
                    versions.insert(s, row.get::<i64, _>(1) as u64);
                }
            }
        }
        // Caller-chosen ids must be new, in the log and within the request.
        let given: Vec<&str> = events.iter().filter_map(|e| e.id.as_deref()).collect();
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = given.iter().find(|id| !seen.insert(**id)) {
            return Err(AppendError::DuplicateId {
                id: (*dup).to_owned(),
            });
        }
        for chunk in given.chunks(ROWS_PER_STATEMENT) {
            let mut sql = QueryBuilder::new("SELECT id FROM outbox WHERE id IN (");
            let mut list = sql.separated(", ");
            for id in chunk {
                list.push_bind(*id);
            }
            sql.push(") LIMIT 1");
            if let Some(row) = sql
                .build()
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err("checking event ids"))?
            {
                return Err(AppendError::DuplicateId { id: row.get(0) });
            }
        }
        let mut rows = Vec::with_capacity(events.len());
        for event in &events {
            let current = versions.entry(event.stream.as_str()).or_insert(0);
            if let Some(expected) = event.expected_version {
                if expected != *current {
                    // Dropping `tx` rolls back; nothing of the request is written.
                    return Err(AppendError::VersionConflict {
                        stream: event.stream.clone(),
                        expected,
                        current: *current,
                    });
                }
            }
            *current += 1;
            let id = event
                .id
                .clone()
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            let headers: Vec<(&String, &String)> = event.headers.iter().collect();
            let headers = serde_json::to_string(&headers).unwrap_or_else(|_| "[]".into());
            rows.push((id, *current, headers, event));
        }
        let mut appended = Vec::with_capacity(rows.len());
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let mut sql = QueryBuilder::new(
                "INSERT INTO outbox (id, stream, stream_type, event_type, version, payload, headers, timestamp_ms) ",
            );
            sql.push_values(chunk, |mut row, (id, version, headers, event)| {
                row.push_bind(id.as_str())
                    .push_bind(event.stream.as_str())
                    .push_bind(event.stream_type.as_str())
                    .push_bind(event.event_type.as_str())
                    .push_bind(*version as i64)
                    .push_bind(event.payload.get())
                    .push_bind(headers.as_str())
                    .push_bind(now);
            });
            sql.push(" RETURNING position");
            let positions = sql
                .build()
                .fetch_all(&mut *tx)
                .await
                .map_err(db_err("appending events"))?;
            // RETURNING's row order is unspecified; positions are assigned in VALUES order.
            let mut positions: Vec<i64> = positions.iter().map(|r| r.get(0)).collect();
            positions.sort_unstable();
            for ((id, version, _, event), position) in chunk.iter().zip(positions) {
                appended.push(Appended {
                    id: id.clone(),
                    stream: event.stream.clone(),
                    version: *version,
                    position: position as u64,
                });
            }
        }
        tx.commit().await.map_err(db_err("committing an append"))?;
        if let Some(last) = appended.last() {
            self.head.send_if_modified(|h| raise(h, last.position));
        }
        Ok(appended)
    }
}
