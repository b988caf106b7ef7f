//! Where read models live. A [`Store`] keeps each projection version's documents and its
//! checkpoint, and commits a batch's documents and the checkpoint in one transaction.

pub mod sqlite;

use async_trait::async_trait;
use serde::Serialize;
use sha2::{Digest, Sha256};

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
}

impl ProjectionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Failed => "failed",
        }
    }
}

/// The seam between the pipeline and a database (SQLite now, PostgreSQL next).
#[async_trait]
pub trait Store: Send + Sync {
    /// Creates the tables and indexes of `projection`'s version if missing, makes it the
    /// active version, and returns its checkpoint.
    async fn register(&self, projection: &Descriptor) -> Result<u64, StoreError>;

    /// Writes a batch's documents and moves the checkpoint to `checkpoint`, atomically.
    async fn commit(
        &self,
        projection: &Descriptor,
        output: &BatchOutput,
        checkpoint: u64,
    ) -> Result<(), StoreError>;

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

    async fn list(
        &self,
        projection: &Descriptor,
        collection: &str,
        query: &ListQuery,
    ) -> Result<Vec<Document>, StoreError>;

    /// Whether the database answers.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// The table of one collection of one projection version. Names are validated to
/// `[a-z0-9_-]` but `-`/`.` are folded to `_`, so a short hash of the exact names keeps two
/// projections from ever sharing a table.
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
    format!(
        "rm_{}_{}_{}_{:02x}{:02x}{:02x}{:02x}",
        fold(&projection.name),
        fold(&projection.version),
        fold(collection),
        digest[0],
        digest[1],
        digest[2],
        digest[3]
    )
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
