//! Where read models live. A [`Store`] keeps each projection version's documents and its
//! checkpoint, and commits a batch's documents and the checkpoint in one transaction.

mod fields;
pub mod postgres;
pub mod sqlite;

use async_trait::async_trait;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::runtime::{BatchOutput, Descriptor};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {context}: {source}")]
    Database {
        context: String,
        source: sqlx::Error,
    },
    #[error("cannot open the database {url}: {reason}")]
    Open { url: String, reason: String },
    #[error("document {collection}/{key} written by {projection} is not valid JSON: {reason}")]
    InvalidDocument {
        projection: String,
        collection: String,
        key: String,
        reason: String,
    },
    /// The checkpoint is not where this runner left it: another instance ran the projection
    /// meanwhile. The batch is dropped, not committed twice.
    #[error("the checkpoint of {projection} moved away from {expected}: another instance runs it")]
    Fenced { projection: String, expected: u64 },
}

impl StoreError {
    pub(crate) fn db(context: impl Into<String>) -> impl FnOnce(sqlx::Error) -> Self {
        let context = context.into();
        move |source| Self::Database { context, source }
    }
}

/// One stored document.
#[derive(Debug, Clone, Serialize)]
pub struct Document {
    pub key: String,
    /// How many times the document has been written.
    pub version: i64,
    /// When it was last written, in milliseconds since the Unix epoch.
    pub updated_at: i64,
    #[serde(rename = "document")]
    pub json: Box<serde_json::value::RawValue>,
}

/// An event a projection could not take, kept with the reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    pub position: u64,
    pub event_id: Option<String>,
    /// The stream it belongs to, when the row names one; later events of that stream are
    /// parked behind it.
    pub stream: Option<String>,
    pub reason: String,
    /// The position of the dead letter this event is parked behind (`None`: it is the first).
    pub parked_behind: Option<u64>,
}

/// A page of a collection: equality filters on indexed fields, key order, keyset pagination.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub filters: Vec<(String, String)>,
    /// Only keys after this one (the previous page's cursor).
    pub after: Option<String>,
    pub limit: u32,
}

/// A projection's persisted state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProjectionStatus {
    Running,
    Failed,
    /// Another instance holds the projection's lease; this one serves reads and waits to take
    /// over. Never stored.
    Standby,
}

impl ProjectionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Failed => "failed",
            Self::Standby => "standby",
        }
    }
}

/// The seam between the pipeline and a database (SQLite now, PostgreSQL next).
#[async_trait]
pub trait Store: Send + Sync {
    /// Creates the tables and indexes of `projection`'s version if missing, makes it the
    /// active version, and returns its checkpoint.
    async fn register(&self, projection: &Descriptor) -> Result<u64, StoreError>;

    /// The projection version's committed position.
    async fn checkpoint(&self, projection: &Descriptor) -> Result<u64, StoreError>;

    /// Writes a batch's documents and dead letters and moves the checkpoint from `from` to
    /// `to`, atomically. [`StoreError::Fenced`] if the checkpoint is no longer at `from`.
    /// `durable: false` lets a store return before the commit is flushed (a catch-up batch with
    /// more behind it: a crash can only lose such batches whole, and they are projected
    /// again); a batch that reaches the head, where readers wait, is always durable.
    async fn commit(
        &self,
        projection: &Descriptor,
        output: &BatchOutput,
        dead_letters: &[DeadLetter],
        from: u64,
        to: u64,
        durable: bool,
    ) -> Result<(), StoreError>;

    /// Streams with a dead letter, each with the position of its first one.
    async fn parked_streams(
        &self,
        projection: &Descriptor,
    ) -> Result<std::collections::HashMap<String, u64>, StoreError>;

    /// Dead letters after `after`, in position order.
    async fn dead_letters(
        &self,
        projection: &Descriptor,
        after: u64,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, StoreError>;

    /// Tries to become the one instance that runs `projection`; `None` while another holds
    /// it. Held until the [`Lease`] is dropped or its connection dies.
    async fn try_lease(&self, projection: &str) -> Result<Option<Lease>, StoreError>;

    async fn set_status(
        &self,
        projection: &str,
        status: ProjectionStatus,
        error: Option<&str>,
    ) -> Result<(), StoreError>;

    async fn document(
        &self,
        projection: &Descriptor,
        collection: &str,
        key: &str,
    ) -> Result<Option<Document>, StoreError>;

    /// The documents of `collection` with these keys (those that exist), in one query or a
    /// few.
    async fn documents(
        &self,
        projection: &Descriptor,
        collection: &str,
        keys: &[&str],
    ) -> Result<Vec<Document>, StoreError>;

    async fn list(
        &self,
        projection: &Descriptor,
        collection: &str,
        query: &ListQuery,
    ) -> Result<Vec<Document>, StoreError>;

    /// Whether the database answers.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// The right to run one projection, held until dropped.
pub struct Lease {
    lost: watch::Receiver<bool>,
    _hold: Box<dyn Send + Sync>,
}

impl Lease {
    /// `lost` turns true when the lease is gone (its connection died); `hold` is dropped with
    /// the lease, releasing it.
    pub fn new(lost: watch::Receiver<bool>, hold: impl Send + Sync + 'static) -> Self {
        Self {
            lost,
            _hold: Box::new(hold),
        }
    }

    /// A lease that is never lost (one process owns the database).
    pub fn exclusive() -> Self {
        let (tx, rx) = watch::channel(false);
        Self::new(rx, tx)
    }

    /// Resolves once the lease is lost.
    pub async fn lost(&mut self) {
        while !*self.lost.borrow_and_update() {
            if self.lost.changed().await.is_err() {
                return;
            }
        }
    }
}

/// The table of one collection of one projection version. Names are validated to
/// `[a-z0-9_-]` but `-`/`.` are folded to `_` and long names are cut, so a short hash of the
/// exact names keeps two projections from ever sharing a table.
pub fn table_name(projection: &Descriptor, collection: &str) -> String {
    let fold = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect()
    };
    let digest = Sha256::digest(
        format!(
            "{}\0{}\0{}",
            projection.name, projection.version, collection
        )
        .as_bytes(),
    );
    // At most 63 bytes (PostgreSQL's limit): the readable part is cut, the hash never.
    let mut readable = format!(
        "rm_{}_{}_{}",
        fold(&projection.name),
        fold(&projection.version),
        fold(collection)
    );
    readable.truncate(54);
    format!(
        "{readable}_{:02x}{:02x}{:02x}{:02x}",
        digest[0], digest[1], digest[2], digest[3]
    )
}

/// The column holding a declared field's value (`f_` and a hash of the field), quoted.
pub(crate) fn field_column(field: &str) -> String {
    let digest = Sha256::digest(field.as_bytes());
    format!(
        "\"f_{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}\"",
        digest[0], digest[1], digest[2], digest[3], digest[4], digest[5]
    )
}

/// Decodes `key, doc (JSON text), version, updated_at`, as both stores select them.
pub(crate) fn document_from_row<R>(row: &R) -> Result<Document, StoreError>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let err = || StoreError::db("reading a document");
    let key: String = row.try_get(0).map_err(err())?;
    let json: String = row.try_get(1).map_err(err())?;
    let json = serde_json::value::RawValue::from_string(json).map_err(|e| {
        StoreError::InvalidDocument {
            projection: String::new(),
            collection: String::new(),
            key: key.clone(),
            reason: e.to_string(),
        }
    })?;
    Ok(Document {
        key,
        json,
        version: row.try_get(2).map_err(err())?,
        updated_at: row.try_get(3).map_err(err())?,
    })
}

/// Decodes `position, event_id, stream, reason, parked_behind`, as both stores select them.
pub(crate) fn dead_letter_from_row<R>(row: &R) -> Result<DeadLetter, StoreError>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let err = || StoreError::db("reading dead letters");
    Ok(DeadLetter {
        position: row.try_get::<i64, _>(0).map_err(err())? as u64,
        event_id: row.try_get(1).map_err(err())?,
        stream: row.try_get(2).map_err(err())?,
        reason: row.try_get(3).map_err(err())?,
        parked_behind: row
            .try_get::<Option<i64>, _>(4)
            .map_err(err())?
            .map(|p| p as u64),
    })
}

/// Decodes `stream, position` pairs of parked streams.
pub(crate) fn parked_from_rows<R>(
    rows: &[R],
) -> Result<std::collections::HashMap<String, u64>, StoreError>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let err = || StoreError::db("reading parked streams");
    rows.iter()
        .map(|row| {
            let stream: String = row.try_get(0).map_err(err())?;
            let position: i64 = row.try_get(1).map_err(err())?;
            Ok((stream, position as u64))
        })
        .collect()
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
