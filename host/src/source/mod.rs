//! Where events come from. A [`Source`] hands runners the events after a position, in position
//! order, and tells them when new ones arrive.

pub mod group;
pub mod kafka;
pub mod outbox;
pub mod pg_outbox;

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::watch;

use crate::event::Event;

/// An event to append, as `POST /events` takes it.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewEvent {
    /// A UUID; generated when absent. Appending an id that exists is a conflict.
    #[schema(format = Uuid)]
    pub id: Option<String>,
    /// 1 to 256 bytes, no NUL (checked by [`validate`]).
    #[schema(min_length = 1, max_length = 256, pattern = "^[^\\x00]*$")]
    pub stream: String,
    #[schema(min_length = 1, max_length = 128, pattern = "^[^\\x00]*$")]
    pub stream_type: String,
    #[serde(rename = "type")]
    #[schema(min_length = 1, max_length = 128, pattern = "^[^\\x00]*$")]
    pub event_type: String,
    /// Any JSON; kept as sent, digit for digit.
    #[schema(value_type = serde_json::Value)]
    pub payload: Box<RawValue>,
    /// The stream's current version the caller expects (0: the stream must not exist).
    pub expected_version: Option<u64>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// Where an appended event landed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Appended {
    pub id: String,
    pub stream: String,
    pub version: u64,
    pub position: u64,
}

/// Where an event landed, without the event: what waiting reads are matched against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub stream: String,
    pub version: u64,
    pub position: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("event source: {context}: {source}")]
    Database {
        context: String,
        source: sqlx::Error,
    },
    #[error("the outbox row at position {position}{} is malformed: {reason}", id.as_ref().map(|id| format!(" (id {id})")).unwrap_or_default())]
    Malformed {
        position: u64,
        id: Option<String>,
        /// The stream, when the row names one: its later events are parked behind this one.
        stream: Option<String>,
        /// The event type, when readable: projections that do not subscribe to it pass the
        /// row by.
        event_type: Option<String>,
        reason: String,
    },
    #[error(transparent)]
    FileLost(#[from] crate::store::sqlite::FileLost),
    /// The failure of a group commit, shared by every request of the group.
    #[error(transparent)]
    Group(std::sync::Arc<SourceError>),
    #[error("cannot use the outbox: {0}")]
    Setup(String),
}

#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("stream {stream} is at version {current}, not the expected {expected}")]
    VersionConflict {
        stream: String,
        expected: u64,
        current: u64,
    },
    #[error("an event with id {id} already exists")]
    DuplicateId { id: String },
    #[error("events[{index}]: {reason}")]
    Invalid { index: usize, reason: String },
    #[error("this source does not accept appends")]
    Unsupported,
    #[error("other appends to the same streams kept winning; try again")]
    Contended,
    #[error(transparent)]
    Source(#[from] SourceError),
}

/// The seam between the pipeline and an event source (the outbox; Kafka later).
#[async_trait]
pub trait Source: Send + Sync {
    /// Events with a position above `after`, in position order: at most `max_events`, and
    /// stopping after the event that crosses `max_bytes`. A malformed row ends the batch before
    /// it; when it is the first row, the read fails with [`SourceError::Malformed`] naming it,
    /// so the caller can set it aside and read on after its position.
    async fn read(
        &self,
        after: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Vec<Event>, SourceError>;

    /// The newest position known; changes whenever events arrive.
    fn head(&self) -> watch::Receiver<u64>;

    /// The position of the event with this id, if it is in the log.
    async fn position_of_event(&self, id: &str) -> Result<Option<u64>, SourceError> {
        let _ = id;
        Ok(None)
    }

    /// The position of a stream's version, if it has been appended.
    async fn position_of(&self, stream: &str, version: u64) -> Result<Option<u64>, SourceError>;

    /// The stream, version and position of the events with a position in `(after, upto]`, in
    /// position order, at most `limit`: one statement however many reads wait. `None` when
    /// this source cannot match streams by their text (the caller then asks
    /// [`Source::positions_of`]).
    async fn placed_between(
        &self,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Option<Vec<Placed>>, SourceError> {
        let _ = (after, upto, limit);
        Ok(None)
    }

    /// The positions of many stream versions (`None`: not appended), in the order asked. The
    /// outboxes answer in one statement; this default asks one by one.
    async fn positions_of(
        &self,
        wanted: &[crate::consistency::StreamVersion],
    ) -> Result<Vec<Option<u64>>, SourceError> {
        let mut positions = Vec::with_capacity(wanted.len());
        for w in wanted {
            positions.push(self.position_of(&w.stream, w.version).await?);
        }
        Ok(positions)
    }

    /// The stream's newest version at or below `position` (0: none).
    async fn version_at(&self, stream: &str, position: u64) -> Result<u64, SourceError>;

    /// Says that this process just committed a write transaction of its own (a batch). A source
    /// whose head waits for open transactions to end (the PostgreSQL outbox) re-reads it now
    /// instead of at its next timed check.
    fn nudge(&self) {}

    /// The watermark's hold, for a source whose head waits for open transactions (the
    /// PostgreSQL outbox); `None` for the others.
    fn watermark(&self) -> Option<&crate::metrics::Watermark> {
        None
    }

    /// Appends events atomically: all or none.
    async fn append(&self, events: Vec<NewEvent>) -> Result<Vec<Appended>, AppendError> {
        let _ = events;
        Err(AppendError::Unsupported)
    }
}

/// Checks what can be checked before touching the database, and writes ids in the one form
/// the database gives back (lowercase, hyphenated).
pub(crate) fn validate(events: &mut [NewEvent]) -> Result<(), AppendError> {
    if events.is_empty() {
        return Err(AppendError::Invalid {
            index: 0,
            reason: "no events to append".into(),
        });
    }
    for (index, e) in events.iter_mut().enumerate() {
        let invalid = |reason: String| AppendError::Invalid { index, reason };
        for (field, value, max) in [
            ("stream", &e.stream, 256),
            ("stream_type", &e.stream_type, 128),
            ("type", &e.event_type, 128),
        ] {
            if value.is_empty() || value.len() > max {
                return Err(invalid(format!("`{field}` must be 1 to {max} bytes")));
            }
        }
        if let Some(id) = &mut e.id {
            match uuid::Uuid::parse_str(id) {
                Ok(uuid) => *id = uuid.hyphenated().to_string(),
                Err(_) => return Err(invalid(format!("`id` {id:?} is not a UUID"))),
            }
        }
        for (field, value) in [
            ("stream", &e.stream),
            ("stream_type", &e.stream_type),
            ("type", &e.event_type),
        ] {
            if value.contains('\0') {
                return Err(invalid(format!("`{field}` holds a NUL character")));
            }
        }
        if let Some((path, problem)) = crate::event::payload_problem(e.payload.get()) {
            return Err(invalid(format!("`payload{path}` {problem}")));
        }
    }
    Ok(())
}
