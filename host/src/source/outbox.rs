//! The outbox in the embedded SQLite database: `POST /events` appends to it, runners read it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::types::ValueRef;
use rusqlite::OptionalExtension;
use serde_json::value::RawValue;
use sqlx::{QueryBuilder, Row};
use tokio::sync::watch;

use super::group::{Appends, Request};
use super::{validate, AppendError, Appended, NewEvent, Placed, Source, SourceError};
use crate::consistency::StreamVersion;
use crate::event::Event;
use crate::store::now_ms;
use crate::store::sqlite::lent::{self, DbError};
use crate::store::sqlite::Sqlite;

/// How often the head is re-read in case another process wrote to the file. Appends through
/// this process wake runners at once; this is only the fallback.
const FALLBACK_POLL: Duration = Duration::from_secs(1);

pub struct SqliteOutbox {
    db: Sqlite,
    head: Arc<watch::Sender<u64>>,
    /// Group commit: see [`write`].
    appends: Appends,
}

impl DbError for SourceError {
    fn db(context: &str, source: sqlx::Error) -> Self {
        db_err(context)(source)
    }
}

fn db_err(context: &str) -> impl FnOnce(sqlx::Error) -> SourceError + '_ {
    move |source| SourceError::Database {
        context: context.to_owned(),
        source,
    }
}

impl SqliteOutbox {
    /// Takes a batch of Kafka messages into the outbox (see `source::kafka`).
    pub async fn ingest(
        &self,
        group: &str,
        batch: &super::kafka::Batch,
    ) -> Result<super::kafka::Written, SourceError> {
        super::kafka::sqlite::write(&self.db, &self.head, group, batch).await
    }

    /// The next offset of every partition `group` has taken.
    pub async fn kafka_offsets(
        &self,
        group: &str,
    ) -> Result<HashMap<(String, i32), i64>, SourceError> {
        super::kafka::sqlite::offsets(&self.db, group).await
    }

    /// Where a projection at `checkpoint` stands in each partition `group` has taken.
    pub async fn applied_offsets(
        &self,
        group: &str,
        checkpoint: u64,
    ) -> Result<HashMap<(String, i32), i64>, SourceError> {
        super::kafka::sqlite::applied_offsets(&self.db, group, checkpoint).await
    }

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
        let appends = {
            let (db, head) = (db.clone(), head.clone());
            Appends::start(move |group| {
                let (db, head) = (db.clone(), head.clone());
                async move { write(&db, &head, group).await }
            })
        };
        Ok(Self { db, head, appends })
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

/// Events past this many behind the head make a read heavy: it leaves the runtime's worker.
const HEAVY_READ: u64 = 256;

impl SqliteOutbox {
    /// Up to `max_events` after `after`, in order, on one of the store's own read connections
    /// (see [`crate::store::sqlite::readers`]). A malformed row ends the read: the good rows before it go out first,
    /// then it is reported alone, named.
    async fn read_events(&self, after: u64, max_events: usize) -> Result<Vec<Event>, SourceError> {
        let heavy = self.head.borrow().saturating_sub(after) > HEAVY_READ;
        self.db.readers.read(heavy, "reading the outbox", |db| {
            let mut statement = db
                .prepare(
                    "SELECT position, id, stream, stream_type, event_type, version, payload, \
                     headers, timestamp_ms FROM outbox WHERE position > ? ORDER BY position LIMIT ?",
                )
                .map_err(SourceError::sqlite("reading the outbox"))?;
            let mut rows = statement
                .query((after as i64, max_events as i64))
                .map_err(SourceError::sqlite("reading the outbox"))?;
            let mut events = Vec::with_capacity(max_events.min(4096));
            while let Some(row) = rows
                .next()
                .map_err(SourceError::sqlite("reading the outbox"))?
            {
                match event_from_row(row) {
                    Ok(event) => events.push(event),
                    Err(SourceError::Malformed { .. }) if !events.is_empty() => break,
                    Err(err) => return Err(err),
                }
            }
            Ok(events)
        })
        .await
    }
}

/// One outbox row; another process may have written any SQLite type in any column: no
/// panics here.
fn event_from_row(row: &rusqlite::Row<'_>) -> Result<Event, SourceError> {
    let position = match row.get_ref(0) {
        Ok(ValueRef::Integer(position)) => position as u64,
        Ok(other) => {
            let reason = format!("the position is {:?}, not an integer", other.data_type());
            return Err(db_err("reading an outbox position")(sqlx::Error::Decode(
                reason.into(),
            )));
        }
        Err(e) => return Err(SourceError::sqlite("reading an outbox position")(e)),
    };
    let text_at = |i: usize| match row.get_ref(i) {
        Ok(ValueRef::Text(text)) => {
            std::str::from_utf8(text).map_err(|e| format!("column {i} is not UTF-8 text: {e}"))
        }
        Ok(other) => Err(format!("column {i} is not text: {:?}", other.data_type())),
        Err(e) => Err(format!("column {i}: {e}")),
    };
    // What names a malformed row is copied only when one is found: a good row's strings are
    // copied once, into its event.
    let malformed = |reason: String| SourceError::Malformed {
        position,
        id: text_at(1).ok().map(str::to_owned),
        stream: text_at(2).ok().map(str::to_owned),
        // No type (a Kafka message whose type could not be read): every projection sets it
        // aside.
        event_type: text_at(4).ok().filter(|t| !t.is_empty()).map(str::to_owned),
        reason,
    };
    let text = |i: usize| text_at(i).map_err(&malformed);
    let int = |i: usize| match row.get_ref(i) {
        Ok(ValueRef::Integer(n)) => Ok(n),
        Ok(other) => Err(malformed(format!(
            "column {i} is not an integer: {:?}",
            other.data_type()
        ))),
        Err(e) => Err(malformed(format!("column {i}: {e}"))),
    };
    let headers: Vec<(String, String)> = serde_json::from_str(text(7)?)
        .map_err(|e| malformed(format!("headers are not a list of pairs: {e}")))?;
    // A Kafka message no event could be made of, kept with why (see `source::kafka`).
    if let Some((_, reason)) = headers
        .iter()
        .find(|(name, _)| name == super::kafka::MALFORMED_HEADER)
    {
        return Err(malformed(reason.clone()));
    }
    let payload = RawValue::from_string(text(6)?.to_owned())
        .map_err(|e| malformed(format!("payload is not JSON: {e}")))?;
    Ok(Event {
        position,
        id: text(1)?.to_owned(),
        stream: text(2)?.to_owned(),
        stream_type: text(3)?.to_owned(),
        event_type: text(4)?.to_owned(),
        version: int(5)? as u64,
        payload,
        headers,
        timestamp_ms: int(8)? as u64,
    })
}

#[async_trait]
impl Source for SqliteOutbox {
    async fn read(
        &self,
        after: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Vec<Event>, SourceError> {
        let mut events = self.read_events(after, max_events).await?;
        let mut bytes = 0;
        if let Some(cut) = events.iter().position(|e| {
            bytes += e.size_hint();
            bytes >= max_bytes
        }) {
            events.truncate(cut + 1);
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

    async fn placed_between(
        &self,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Option<Vec<Placed>>, SourceError> {
        let rows = sqlx::query(
            "SELECT stream, version, position FROM outbox \
             WHERE position > ? AND position <= ? ORDER BY position LIMIT ?",
        )
        .bind(after as i64)
        .bind(upto as i64)
        .bind(limit as i64)
        .fetch_all(&self.db.read)
        .await
        .map_err(db_err("reading where events landed"))?;
        // A row another process wrote with no text stream or no whole version cannot be
        // waited for: passed by, as the runners set it aside.
        Ok(Some(
            rows.iter()
                .filter_map(|row| {
                    Some(Placed {
                        stream: row.try_get(0).ok()?,
                        version: row.try_get::<i64, _>(1).ok()? as u64,
                        position: row.try_get::<i64, _>(2).ok()? as u64,
                    })
                })
                .collect(),
        ))
    }

    async fn positions_of(
        &self,
        wanted: &[StreamVersion],
    ) -> Result<Vec<Option<u64>>, SourceError> {
        let mut found: HashMap<String, HashMap<u64, u64>> = HashMap::new();
        // Two binds a version: one statement for up to 4,096, far below SQLite's bind limit.
        for chunk in wanted.chunks(4096) {
            let mut sql = QueryBuilder::new("WITH w(s, v) AS (VALUES ");
            let mut list = sql.separated(", ");
            for w in chunk {
                list.push("(");
                list.push_bind_unseparated(w.stream.as_str());
                list.push_unseparated(", ");
                list.push_bind_unseparated(w.version as i64);
                list.push_unseparated(")");
            }
            sql.push(
                ") SELECT o.stream, o.version, o.position FROM w \
                 JOIN outbox AS o ON o.stream = w.s AND o.version = w.v",
            );
            let rows = sql
                .build()
                .fetch_all(&self.db.read)
                .await
                .map_err(db_err("looking up stream versions"))?;
            for row in rows {
                let (Ok(stream), Ok(version), Ok(position)) = (
                    row.try_get::<String, _>(0),
                    row.try_get::<i64, _>(1),
                    row.try_get::<i64, _>(2),
                ) else {
                    continue;
                };
                // SQLite compares text byte for byte: the stream read back is the one asked.
                found
                    .entry(stream)
                    .or_default()
                    .insert(version as u64, position as u64);
            }
        }
        Ok(wanted
            .iter()
            .map(|w| {
                found
                    .get(w.stream.as_str())
                    .and_then(|v| v.get(&w.version))
                    .copied()
            })
            .collect())
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

    async fn position_of_event(&self, id: &str) -> Result<Option<u64>, SourceError> {
        let position: Option<i64> = sqlx::query_scalar("SELECT position FROM outbox WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.db.read)
            .await
            .map_err(db_err("looking up an event by id"))?;
        Ok(position.map(|p| p as u64))
    }

    async fn append(&self, mut events: Vec<NewEvent>) -> Result<Vec<Appended>, AppendError> {
        validate(&mut events)?;
        self.db.check_file().map_err(SourceError::from)?;
        self.appends.append(events).await
    }
}

/// The SQLite writer of a group (see [`group`](super::group)): one transaction for all its
/// requests, then each answered.
///
/// Fair share: the write connection is handed out first come, first served, and a group takes
/// it once. A projection's batch commit that asks for it while a group is being written gets
/// it next, whatever number of appends is queued: it never waits more than one group.
async fn write(db: &Sqlite, head: &watch::Sender<u64>, group: Vec<Request>) {
    let (outcomes, last) = match write_group(db, &group).await {
        Ok(done) => done,
        Err(err) => {
            // Nothing of the group was written: every request gets the reason.
            let err = Arc::new(err);
            let outcomes = group
                .iter()
                .map(|_| Err(AppendError::Source(SourceError::Group(err.clone()))))
                .collect();
            (outcomes, None)
        }
    };
    if let Some(last) = last {
        head.send_if_modified(|h| raise(h, last));
    }
    for (request, outcome) in group.into_iter().zip(outcomes) {
        request.answer(outcome);
    }
}

type Outcomes = Vec<Result<Vec<Appended>, AppendError>>;

/// Writes a group in one transaction: each request's answer, and the newest position written.
/// An `Err` means the transaction failed and nothing of the group was written.
async fn write_group(
    db: &Sqlite,
    group: &[Request],
) -> Result<(Outcomes, Option<u64>), SourceError> {
    let now = now_ms();
    // IMMEDIATE: the write lock is taken before versions are read, so another process's append
    // cannot slip in between the check and the insert.
    let written = db
        .writer
        .immediate(false, "appending events", |tx| write_rows(tx, group, now))
        .await?;
    if written.1.is_some() {
        // Acknowledged only if the file it went to is still the database's: an append to a
        // deleted file would be lost at the next start.
        db.check_file()?;
    }
    Ok(written)
}

/// [`write_group`]'s statements, in its transaction.
fn write_rows(
    tx: &rusqlite::Connection,
    group: &[Request],
    now: i64,
) -> Result<(Outcomes, Option<u64>), SourceError> {
    // Current versions of every stream in the group: in-process, one prepared statement
    // stepped per stream is cheaper than parsing a statement that lists them all.
    let mut streams: Vec<&str> = group
        .iter()
        .flat_map(|r| r.events.iter().map(|e| e.stream.as_str()))
        .collect();
    streams.sort_unstable();
    streams.dedup();
    let mut versions: HashMap<&str, u64> = HashMap::new();
    // Streams whose newest version is not a whole number: requests touching them are refused.
    let mut broken: HashMap<&str, String> = HashMap::new();
    let read = |e| SourceError::sqlite("reading stream versions")(e);
    let mut newest = tx
        .prepare("SELECT MAX(version) FROM outbox WHERE stream = ?")
        .map_err(read)?;
    for stream in streams {
        let mut rows = newest.query([stream]).map_err(read)?;
        let Some(row) = rows.next().map_err(read)? else {
            continue;
        };
        // Another writer may have stored anything in the column: a version that is not a
        // whole number names its row rather than panicking the append.
        match row.get_ref(0).map_err(read)? {
            ValueRef::Null => {}
            ValueRef::Integer(version) if version >= 0 => {
                versions.insert(stream, version as u64);
            }
            _ => {
                broken.insert(stream, String::new());
            }
        }
    }
    // Caller-chosen ids that exist already.
    let given: Vec<&str> = group
        .iter()
        .flat_map(|r| r.events.iter().filter_map(|e| e.id.as_deref()))
        .collect();
    let mut taken: HashSet<String> = HashSet::new();
    if !given.is_empty() {
        let read = |e| SourceError::sqlite("checking event ids")(e);
        let mut exists = tx
            .prepare("SELECT 1 FROM outbox WHERE id = ?")
            .map_err(read)?;
        for id in given {
            if exists.exists([id]).map_err(read)? {
                taken.insert(id.to_owned());
            }
        }
    }
    // Each request in arrival order against the versions the requests before it left.
    let mut outcomes: Vec<Option<Result<(), AppendError>>> = Vec::with_capacity(group.len());
    let mut rows = Vec::new();
    let mut owner = Vec::new();
    for (index, request) in group.iter().enumerate() {
        match check(request, &versions, &broken, &taken) {
            Ok(()) => {
                for event in &request.events {
                    let current = versions.entry(event.stream.as_str()).or_insert(0);
                    *current += 1;
                    let id = event
                        .id
                        .clone()
                        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
                    taken.insert(id.clone());
                    let headers: Vec<(&String, &String)> = event.headers.iter().collect();
                    let headers = serde_json::to_string(&headers).unwrap_or_else(|_| "[]".into());
                    rows.push((id, *current, headers, event));
                    owner.push(index);
                }
                outcomes.push(None);
            }
            Err(Refusal::BrokenStream(stream)) => {
                let err = bad_version(tx, stream);
                outcomes.push(Some(Err(err.into())));
            }
            Err(Refusal::Append(err)) => outcomes.push(Some(Err(err))),
        }
    }
    let mut appended: Vec<Vec<Appended>> = group.iter().map(|_| Vec::new()).collect();
    let mut last = None;
    if !rows.is_empty() {
        let append = |e| SourceError::sqlite("appending events")(e);
        let mut insert = tx
            .prepare(
                "INSERT INTO outbox (id, stream, stream_type, event_type, version, payload, \
                 headers, timestamp_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING position",
            )
            .map_err(append)?;
        for ((id, version, headers, event), owner) in rows.iter().zip(owner) {
            let args = [
                lent::text(id.as_str()),
                lent::text(event.stream.as_str()),
                lent::text(event.stream_type.as_str()),
                lent::text(event.event_type.as_str()),
                lent::int(*version as i64),
                lent::text(event.payload.get()),
                lent::text(headers.as_str()),
                lent::int(now),
            ];
            let position: i64 = insert
                .query_row(rusqlite::params_from_iter(&args), |row| row.get(0))
                .map_err(append)?;
            appended[owner].push(Appended {
                id: id.clone(),
                stream: event.stream.clone(),
                version: *version,
                position: position as u64,
            });
            last = Some(position as u64);
        }
    }
    let outcomes = outcomes
        .into_iter()
        .zip(appended)
        .map(|(refused, appended)| match refused {
            Some(Err(err)) => Err(err),
            _ => Ok(appended),
        })
        .collect();
    Ok((outcomes, last))
}

enum Refusal<'a> {
    Append(AppendError),
    BrokenStream(&'a str),
}

/// Whether a request can be written on top of `versions`: its expected versions hold and its
/// ids are new (in the log, in the group so far, and within the request).
fn check<'a>(
    request: &'a Request,
    versions: &HashMap<&str, u64>,
    broken: &HashMap<&str, String>,
    taken: &HashSet<String>,
) -> Result<(), Refusal<'a>> {
    let mut mine: HashSet<&str> = HashSet::new();
    for event in &request.events {
        if let Some(id) = event.id.as_deref() {
            if taken.contains(id) || !mine.insert(id) {
                return Err(Refusal::Append(AppendError::DuplicateId {
                    id: id.to_owned(),
                }));
            }
        }
    }
    let mut running: HashMap<&str, u64> = HashMap::new();
    for event in &request.events {
        let stream = event.stream.as_str();
        if broken.contains_key(stream) {
            return Err(Refusal::BrokenStream(stream));
        }
        let current = running
            .entry(stream)
            .or_insert_with(|| versions.get(stream).copied().unwrap_or(0));
        if let Some(expected) = event.expected_version {
            if expected != *current {
                return Err(Refusal::Append(AppendError::VersionConflict {
                    stream: event.stream.clone(),
                    expected,
                    current: *current,
                }));
            }
        }
        *current += 1;
    }
    Ok(())
}

/// The error for a stream whose newest version is not a whole number: the first such row
/// of the stream, named by position and id.
fn bad_version(tx: &rusqlite::Connection, stream: &str) -> SourceError {
    let row = tx
        .query_row(
            "SELECT position, id, event_type, quote(version), typeof(version) FROM outbox \
             WHERE stream = ? AND NOT (typeof(version) = 'integer' AND version >= 0) \
             ORDER BY position LIMIT 1",
            [stream],
            |row| {
                Ok((
                    row.get::<_, i64>(0).unwrap_or_default(),
                    row.get::<_, String>(1).ok(),
                    row.get::<_, String>(2).ok(),
                    row.get::<_, String>(3).unwrap_or_default(),
                    row.get::<_, String>(4).unwrap_or_default(),
                ))
            },
        )
        .optional();
    let (position, id, event_type, value, kind) = match row {
        Ok(Some(row)) => row,
        Ok(None) => {
            return SourceError::Setup(format!(
                "the newest version of stream {stream} is not a whole number, yet no row of \
                 it has such a version"
            ))
        }
        Err(err) => {
            return SourceError::sqlite(&format!(
                "finding the row with a bad version in stream {stream}"
            ))(err)
        }
    };
    SourceError::Malformed {
        position: position as u64,
        id,
        stream: Some(stream.to_owned()),
        event_type,
        reason: format!(
            "its version {value} ({kind}) is not a whole number, so stream {stream} cannot be \
             appended to until the row is repaired"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn outbox() -> (Sqlite, SqliteOutbox) {
        let dir = std::env::temp_dir().join(format!("projector-outbox-{}", uuid::Uuid::new_v4()));
        let db = Sqlite::open(&format!("sqlite://{}", dir.join("p.db").display()))
            .await
            .unwrap();
        let outbox = SqliteOutbox::new(db.clone()).await.unwrap();
        (db, outbox)
    }

    fn event(stream: &str, payload: &str) -> NewEvent {
        serde_json::from_value(serde_json::json!({
            "stream": stream, "stream_type": "T", "type": "Happened",
            "payload": serde_json::from_str::<serde_json::Value>(payload).unwrap(),
            "headers": {"trace": "t-1"},
        }))
        .unwrap()
    }

    fn request(events: Vec<NewEvent>) -> Request {
        Request {
            events,
            reply: tokio::sync::oneshot::channel().0,
        }
    }

    fn expecting(stream: &str, version: u64) -> NewEvent {
        let mut e = event(stream, "{}");
        e.expected_version = Some(version);
        e
    }

    fn with_id(stream: &str, id: &str) -> NewEvent {
        let mut e = event(stream, "{}");
        e.id = Some(id.to_owned());
        e
    }

    /// One group, one transaction: each request is checked against the versions the requests
    /// before it left, and a refused one costs nobody else.
    #[tokio::test]
    async fn a_group_refuses_only_its_stale_requests() {
        let (db, outbox) = outbox().await;
        outbox
            .append(vec![event("a", "{}"), event("b", "{}")])
            .await
            .unwrap();
        let id = "6f0c1b9e-6a43-4f43-9a0e-3f0f8d1b7c11";
        let group = vec![
            request(vec![expecting("a", 1)]),                    // a@2
            request(vec![expecting("a", 1)]),                    // stale: a is at 2 now
            request(vec![expecting("b", 1), expecting("c", 0)]), // b@2, c@1
            request(vec![expecting("c", 0), event("b", "{}")]),  // stale on c: all of it refused
            request(vec![with_id("d", id)]),                     // d@1
            request(vec![with_id("e", id)]),                     // the id is taken by the last
            request(vec![expecting("a", 2), event("a", "{}")]),  // a@3, a@4
        ];
        let (outcomes, last) = write_group(&db, &group).await.unwrap();
        let versions: Vec<Result<Vec<(String, u64)>, String>> = outcomes
            .into_iter()
            .map(|o| {
                o.map(|a| a.into_iter().map(|a| (a.stream, a.version)).collect())
                    .map_err(|e| e.to_string())
            })
            .collect();
        let ok = |v: &[(&str, u64)]| Ok(v.iter().map(|(s, n)| (s.to_string(), *n)).collect());
        assert_eq!(versions[0], ok(&[("a", 2)]));
        assert_eq!(
            versions[1],
            Err("stream a is at version 2, not the expected 1".into())
        );
        assert_eq!(versions[2], ok(&[("b", 2), ("c", 1)]));
        assert_eq!(
            versions[3],
            Err("stream c is at version 1, not the expected 0".into())
        );
        assert_eq!(versions[4], ok(&[("d", 1)]));
        assert_eq!(
            versions[5],
            Err(format!("an event with id {id} already exists"))
        );
        assert_eq!(versions[6], ok(&[("a", 3), ("a", 4)]));
        // The outbox holds exactly the accepted events, each stream in version order.
        let rows: Vec<(String, i64, i64)> =
            sqlx::query_as("SELECT stream, version, position FROM outbox ORDER BY position")
                .fetch_all(&db.read)
                .await
                .unwrap();
        let written: Vec<(&str, i64)> = rows.iter().map(|(s, v, _)| (s.as_str(), *v)).collect();
        assert_eq!(
            written,
            [
                ("a", 1),
                ("b", 1),
                ("a", 2),
                ("b", 2),
                ("c", 1),
                ("d", 1),
                ("a", 3),
                ("a", 4)
            ]
        );
        assert_eq!(last, rows.last().map(|r| r.2 as u64));
    }

    /// Requests sent together are answered each with its own events, whatever group they
    /// land in.
    #[tokio::test]
    async fn concurrent_appends_each_get_their_own_answer() {
        let (_db, outbox) = outbox().await;
        let outbox = Arc::new(outbox);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..200 {
            let outbox = outbox.clone();
            tasks.spawn(async move {
                (
                    i,
                    outbox
                        .append(vec![event(&format!("s-{}", i % 7), "{}")])
                        .await,
                )
            });
        }
        let mut answers = tasks.join_all().await;
        answers.sort_by_key(|(i, _)| *i);
        let answers = answers.into_iter().map(|(_, a)| a);
        let mut positions = HashSet::new();
        for (i, answer) in answers.into_iter().enumerate() {
            let appended = answer.unwrap();
            assert_eq!(appended.len(), 1);
            assert_eq!(appended[0].stream, format!("s-{}", i % 7));
            assert!(positions.insert(appended[0].position));
        }
        assert_eq!(positions.len(), 200);
    }

    #[tokio::test]
    async fn a_read_returns_the_events_as_appended_in_order_after_the_position_asked() {
        let (_db, outbox) = outbox().await;
        let payloads = [
            r#"{"x": 1, "nested": {"y": [1, 2.5, null]}, "s": "é\"\\n"}"#,
            "[]",
            "42",
        ];
        let appended = outbox
            .append(vec![
                event("a", payloads[0]),
                event("b", payloads[1]),
                event("a", payloads[2]),
            ])
            .await
            .unwrap();
        let read = outbox.read(0, 10, usize::MAX).await.unwrap();
        assert_eq!(read.len(), 3);
        for ((e, a), payload) in read.iter().zip(&appended).zip(payloads) {
            assert_eq!(
                (&e.id, &e.stream, e.version, e.position),
                (&a.id, &a.stream, a.version, a.position)
            );
            assert_eq!(e.stream_type, "T");
            assert_eq!(e.event_type, "Happened");
            let (got, sent): (serde_json::Value, serde_json::Value) = (
                serde_json::from_str(e.payload.get()).unwrap(),
                serde_json::from_str(payload).unwrap(),
            );
            assert_eq!(got, sent);
            assert!(e.timestamp_ms > 0);
        }
        assert_eq!(read[2].version, 2, "second event of stream a");
        assert_eq!(read[0].headers, [("trace".to_owned(), "t-1".to_owned())]);
        // `after` and the limit are honoured.
        let tail = outbox.read(1, 1, usize::MAX).await.unwrap();
        assert_eq!(tail.len(), 1);
        assert_eq!(tail[0].position, 2);
    }

    #[tokio::test]
    async fn a_row_with_a_wrongly_typed_column_is_named_not_a_panic() {
        let (db, outbox) = outbox().await;
        sqlx::query(
            "INSERT INTO outbox (id, stream, stream_type, event_type, version, payload, headers, timestamp_ms) \
             VALUES ('x', 'b', 'T', 'Happened', 'one', x'7b7d', '[]', 0)",
        )
        .execute(&db.write)
        .await
        .unwrap();
        let err = outbox.read(0, 10, usize::MAX).await.unwrap_err();
        assert!(
            matches!(&err, SourceError::Malformed { position: 1, .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_stream_with_a_non_integer_version_refuses_appends_naming_the_row() {
        let (db, outbox) = outbox().await;
        outbox.append(vec![event("a", "{}")]).await.unwrap();
        // Another writer, bypassing the API: a version SQLite keeps as text.
        sqlx::query(
            "INSERT INTO outbox (id, stream, stream_type, event_type, version, payload, headers, timestamp_ms) \
             VALUES ('bad-row', 'a', 'T', 'Happened', 'abc', '{}', '[]', 0)",
        )
        .execute(&db.write)
        .await
        .unwrap();
        let err = outbox.append(vec![event("a", "{}")]).await.unwrap_err();
        match &err {
            AppendError::Source(SourceError::Malformed {
                position: 2,
                id: Some(id),
                stream: Some(stream),
                reason,
                ..
            }) => {
                assert_eq!((id.as_str(), stream.as_str()), ("bad-row", "a"));
                assert!(reason.contains("abc"), "{reason}");
            }
            other => panic!("not the malformed row: {other:?}"),
        }
        let message = err.to_string();
        assert!(
            message.contains("position 2")
                && message.contains("bad-row")
                && message.contains("stream a"),
            "{message}"
        );
        // Nothing was appended, and other streams are not held up.
        let b = outbox.append(vec![event("b", "{}")]).await.unwrap();
        assert_eq!((b[0].version, b[0].position), (1, 3));
    }

    #[tokio::test]
    async fn a_row_with_a_broken_payload_is_named_by_its_position() {
        let (db, outbox) = outbox().await;
        outbox.append(vec![event("a", "{}")]).await.unwrap();
        // Another writer, bypassing the API's validation.
        sqlx::query(
            "INSERT INTO outbox (id, stream, stream_type, event_type, version, payload, headers, timestamp_ms) \
             VALUES ('x', 'b', 'T', 'Happened', 1, '{not json', '[]', 0)",
        )
        .execute(&db.write)
        .await
        .unwrap();
        // The good row before it comes out first...
        let good = outbox.read(0, 10, usize::MAX).await.unwrap();
        assert_eq!(good.len(), 1);
        // ...then the bad one alone, named, with its stream.
        let err = outbox.read(1, 10, usize::MAX).await.unwrap_err();
        assert!(
            matches!(&err, SourceError::Malformed { position: 2, reason, stream: Some(s), .. }
                if reason.contains("payload is not JSON") && s == "b"),
            "{err}"
        );
    }
}
