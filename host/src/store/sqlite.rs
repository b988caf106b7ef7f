//! The embedded default: one SQLite file (WAL) holding the outbox, the catalog and the read
//! models. One connection writes (SQLite has one writer anyway; queueing in-process beats
//! spinning on SQLITE_BUSY), a small pool reads.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, SqlitePool};

use super::{
    dead_letter_from_row, document_from_row, now_ms, parked_from_rows, table_name, DeadLetter,
    Document, Lease, ListQuery, ProjectionStatus, Store, StoreError,
};
use crate::runtime::{BatchOutput, Descriptor};

const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../../migrations/sqlite/0001_init.sql")),
    (
        2,
        include_str!("../../../migrations/sqlite/0002_dead_letters.sql"),
    ),
];

/// Rows per multi-row statement: 4 binds each, far below SQLite's bind limit, large enough
/// that a batch of 1000 documents is a handful of statements.
const ROWS_PER_STATEMENT: usize = 500;

/// The two pools over one SQLite file.
#[derive(Clone)]
pub struct Sqlite {
    pub(crate) write: SqlitePool,
    pub(crate) read: SqlitePool,
}

impl Sqlite {
    /// Opens (creating if needed) the database at `url` (`sqlite://path/to/file.db`) and
    /// brings its schema up to date.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let open_err = |reason: String| StoreError::Open {
            url: url.to_owned(),
            reason,
        };
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| open_err(e.to_string()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            // Rows cross from sqlx's worker thread in a channel; a batch-sized buffer saves a
            // thread hand-off every 50 rows (the default).
            .row_buffer_size(4096)
            // A page cache that holds a catch-up's working set.
            .pragma("cache_size", "-65536")
            .pragma("temp_store", "memory");
        if let Some(dir) = options.get_filename().parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| open_err(format!("creating {}: {e}", dir.display())))?;
            }
        }
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await
            .map_err(|e| open_err(e.to_string()))?;
        migrate(&write).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await
            .map_err(|e| open_err(e.to_string()))?;
        Ok(Self { write, read })
    }
}

impl Sqlite {
    /// Folds the WAL into the database file and closes both pools, leaving one
    /// self-contained file.
    pub async fn close(self) -> Result<(), StoreError> {
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&self.write)
            .await
            .map_err(StoreError::db("checkpointing the WAL"))?;
        self.write.close().await;
        self.read.close().await;
        Ok(())
    }
}

async fn migrate(pool: &SqlitePool) -> Result<(), StoreError> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
    )
    .execute(pool)
    .await
    .map_err(StoreError::db("creating schema_migrations"))?;
    for (version, sql) in MIGRATIONS {
        let mut tx = pool.begin().await.map_err(StoreError::db("migrating"))?;
        let applied: Option<i64> =
            sqlx::query_scalar("SELECT version FROM schema_migrations WHERE version = ?")
                .bind(version)
                .fetch_optional(&mut *tx)
                .await
                .map_err(StoreError::db("reading schema_migrations"))?;
        if applied.is_some() {
            continue;
        }
        sqlx::raw_sql(sql)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(format!("applying migration {version}")))?;
        sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)")
            .bind(version)
            .bind(now_ms())
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db("recording a migration"))?;
        tx.commit().await.map_err(StoreError::db("migrating"))?;
    }
    Ok(())
}

fn json_path(field: &str) -> String {
    // Fields are validated to [A-Za-z0-9_.] (see Descriptor::validate): safe in a literal.
    format!("json_extract(doc, '$.{field}')")
}

#[async_trait]
impl Store for Sqlite {
    async fn register(&self, projection: &Descriptor) -> Result<u64, StoreError> {
        let mut tx = self
            .write
            .begin()
            .await
            .map_err(StoreError::db("registering a projection"))?;
        for collection in &projection.collections {
            let table = table_name(projection, &collection.name);
            let ddl = format!(
                "CREATE TABLE IF NOT EXISTS \"{table}\" (key TEXT PRIMARY KEY, doc BLOB NOT NULL, \
                 version INTEGER NOT NULL, updated_at INTEGER NOT NULL) WITHOUT ROWID"
            );
            sqlx::query(&ddl)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::db(format!("creating {table}")))?;
            for field in &collection.indexes {
                let index = format!("{table}_ix_{}", field.replace('.', "__"));
                let ddl = format!(
                    "CREATE INDEX IF NOT EXISTS \"{index}\" ON \"{table}\" ({})",
                    json_path(field)
                );
                sqlx::query(&ddl)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::db(format!("creating index {index}")))?;
            }
        }
        let now = now_ms();
        sqlx::query(
            "INSERT INTO projections (name, version, status, error, updated_at) VALUES (?, ?, 'running', NULL, ?) \
             ON CONFLICT(name) DO UPDATE SET version = excluded.version, status = 'running', error = NULL, \
             updated_at = excluded.updated_at",
        )
        .bind(&projection.name)
        .bind(&projection.version)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db("recording the projection"))?;
        sqlx::query(
            "INSERT INTO checkpoints (projection, version, position, updated_at) VALUES (?, ?, 0, ?) \
             ON CONFLICT DO NOTHING",
        )
        .bind(&projection.name)
        .bind(&projection.version)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db("creating the checkpoint"))?;
        let checkpoint: i64 = sqlx::query_scalar(
            "SELECT position FROM checkpoints WHERE projection = ? AND version = ?",
        )
        .bind(&projection.name)
        .bind(&projection.version)
        .fetch_one(&mut *tx)
        .await
        .map_err(StoreError::db("reading the checkpoint"))?;
        tx.commit()
            .await
            .map_err(StoreError::db("registering a projection"))?;
        Ok(checkpoint as u64)
    }

    async fn commit(
        &self,
        projection: &Descriptor,
        output: &BatchOutput,
        dead_letters: &[DeadLetter],
        from: u64,
        to: u64,
        // WAL with synchronous=NORMAL for every commit: durable across a process crash.
        _durable: bool,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let mut tx = self
            .write
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(StoreError::db("beginning a batch"))?;
        for chunk in dead_letters.chunks(ROWS_PER_STATEMENT / 2) {
            let mut sql = QueryBuilder::new(
                "INSERT OR IGNORE INTO dead_letters (projection, version, position, event_id, \
                 stream, reason, parked_behind, created_at) ",
            );
            sql.push_values(chunk, |mut row, letter| {
                row.push_bind(&projection.name)
                    .push_bind(&projection.version)
                    .push_bind(letter.position as i64)
                    .push_bind(letter.event_id.as_deref())
                    .push_bind(letter.stream.as_deref())
                    .push_bind(letter.reason.as_str())
                    .push_bind(letter.parked_behind.map(|p| p as i64))
                    .push_bind(now);
            });
            sql.build()
                .execute(&mut *tx)
                .await
                .map_err(StoreError::db("writing dead letters"))?;
        }
        for (collection, writes) in &output.writes {
            let table = table_name(projection, collection);
            let mut puts = Vec::with_capacity(writes.len());
            let mut deletes = Vec::new();
            for (key, doc) in writes {
                match doc {
                    Some(doc) => {
                        let text =
                            std::str::from_utf8(doc).map_err(|e| StoreError::InvalidDocument {
                                projection: projection.name.clone(),
                                collection: collection.clone(),
                                key: key.clone(),
                                reason: e.to_string(),
                            })?;
                        puts.push((key.as_str(), text));
                    }
                    None => deletes.push(key.as_str()),
                }
            }
            for chunk in puts.chunks(ROWS_PER_STATEMENT) {
                let mut sql = QueryBuilder::new(format!(
                    "INSERT INTO \"{table}\" (key, doc, version, updated_at) "
                ));
                // Stored as JSONB: the expression indexes then read fields without re-parsing
                // the text of the old and the new document on every upsert.
                sql.push_values(chunk, |mut row, (key, doc)| {
                    row.push_bind(*key)
                        .push("jsonb(")
                        .push_bind_unseparated(*doc)
                        .push_unseparated(")")
                        .push("1")
                        .push_bind(now);
                });
                sql.push(format!(
                    " ON CONFLICT(key) DO UPDATE SET doc = excluded.doc, \
                     version = \"{table}\".version + 1, updated_at = excluded.updated_at"
                ));
                sql.build()
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::db(format!("writing documents to {table}")))?;
            }
            for chunk in deletes.chunks(ROWS_PER_STATEMENT) {
                let mut sql = QueryBuilder::new(format!("DELETE FROM \"{table}\" WHERE key IN ("));
                let mut keys = sql.separated(", ");
                for key in chunk {
                    keys.push_bind(*key);
                }
                sql.push(")");
                sql.build()
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::db(format!("deleting documents from {table}")))?;
            }
        }
        let moved = sqlx::query(
            "UPDATE checkpoints SET position = ?, updated_at = ? \
             WHERE projection = ? AND version = ? AND position = ?",
        )
        .bind(to as i64)
        .bind(now)
        .bind(&projection.name)
        .bind(&projection.version)
        .bind(from as i64)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db("moving the checkpoint"))?;
        if moved.rows_affected() != 1 {
            return Err(StoreError::Fenced {
                projection: projection.name.clone(),
                expected: from,
            });
        }
        tx.commit()
            .await
            .map_err(StoreError::db("committing a batch"))
    }

    async fn checkpoint(&self, projection: &Descriptor) -> Result<u64, StoreError> {
        let position: Option<i64> = sqlx::query_scalar(
            "SELECT position FROM checkpoints WHERE projection = ? AND version = ?",
        )
        .bind(&projection.name)
        .bind(&projection.version)
        .fetch_optional(&self.read)
        .await
        .map_err(StoreError::db("reading the checkpoint"))?;
        Ok(position.unwrap_or(0) as u64)
    }

    async fn parked_streams(
        &self,
        projection: &Descriptor,
    ) -> Result<std::collections::HashMap<String, u64>, StoreError> {
        let rows = sqlx::query(
            "SELECT stream, MIN(position) FROM dead_letters WHERE projection = ? AND version = ? \
             AND stream IS NOT NULL GROUP BY stream",
        )
        .bind(&projection.name)
        .bind(&projection.version)
        .fetch_all(&self.read)
        .await
        .map_err(StoreError::db("reading parked streams"))?;
        parked_from_rows(&rows)
    }

    async fn dead_letters(
        &self,
        projection: &Descriptor,
        after: u64,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let rows = sqlx::query(
            "SELECT position, event_id, stream, reason, parked_behind FROM dead_letters \
             WHERE projection = ? AND version = ? AND position > ? ORDER BY position LIMIT ?",
        )
        .bind(&projection.name)
        .bind(&projection.version)
        .bind(after as i64)
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await
        .map_err(StoreError::db("reading dead letters"))?;
        rows.iter().map(dead_letter_from_row).collect()
    }

    async fn try_lease(&self, _projection: &str) -> Result<Option<Lease>, StoreError> {
        // One process owns the file (a second one writing to it is fenced at commit).
        Ok(Some(Lease::exclusive()))
    }

    async fn set_status(
        &self,
        projection: &str,
        status: ProjectionStatus,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE projections SET status = ?, error = ?, updated_at = ? WHERE name = ?")
            .bind(status.as_str())
            .bind(error)
            .bind(now_ms())
            .bind(projection)
            .execute(&self.write)
            .await
            .map_err(StoreError::db("recording the projection's status"))?;
        Ok(())
    }

    async fn document(
        &self,
        projection: &Descriptor,
        collection: &str,
        key: &str,
    ) -> Result<Option<Document>, StoreError> {
        let table = table_name(projection, collection);
        let row = sqlx::query(&format!(
            "SELECT key, json(doc), version, updated_at FROM \"{table}\" WHERE key = ?"
        ))
        .bind(key)
        .fetch_optional(&self.read)
        .await
        .map_err(StoreError::db(format!("reading {table}")))?;
        row.as_ref().map(document_from_row).transpose()
    }

    async fn documents(
        &self,
        projection: &Descriptor,
        collection: &str,
        keys: &[&str],
    ) -> Result<Vec<Document>, StoreError> {
        let table = table_name(projection, collection);
        let mut found = Vec::new();
        for chunk in keys.chunks(ROWS_PER_STATEMENT) {
            let mut sql = QueryBuilder::new(format!(
                "SELECT key, json(doc), version, updated_at FROM \"{table}\" WHERE key IN ("
            ));
            let mut list = sql.separated(", ");
            for key in chunk {
                list.push_bind(*key);
            }
            sql.push(")");
            let rows = sql
                .build()
                .fetch_all(&self.read)
                .await
                .map_err(StoreError::db(format!("reading {table}")))?;
            for row in &rows {
                found.push(document_from_row(row)?);
            }
        }
        Ok(found)
    }

    async fn list(
        &self,
        projection: &Descriptor,
        collection: &str,
        query: &ListQuery,
    ) -> Result<Vec<Document>, StoreError> {
        let table = table_name(projection, collection);
        let mut sql = QueryBuilder::new(format!(
            "SELECT key, json(doc), version, updated_at FROM \"{table}\" WHERE 1 = 1"
        ));
        for (field, value) in &query.filters {
            let expr = json_path(field);
            // A query string has no types: "42" matches the number 42 and the string "42",
            // "true" the boolean; each alternative is an equality the expression index serves.
            sql.push(format!(" AND ({expr} = "))
                .push_bind(value.clone());
            if let Ok(n) = value.parse::<i64>() {
                sql.push(format!(" OR {expr} = ")).push_bind(n);
            } else if let Ok(x) = value.parse::<f64>() {
                sql.push(format!(" OR {expr} = ")).push_bind(x);
            } else if let Ok(b) = value.parse::<bool>() {
                sql.push(format!(" OR {expr} = ")).push_bind(i64::from(b));
            }
            sql.push(")");
        }
        if let Some(after) = &query.after {
            sql.push(" AND key > ").push_bind(after.clone());
        }
        sql.push(" ORDER BY key LIMIT ")
            .push_bind(i64::from(query.limit));
        let rows = sql
            .build()
            .fetch_all(&self.read)
            .await
            .map_err(StoreError::db(format!("listing {table}")))?;
        rows.iter().map(document_from_row).collect()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.read)
            .await
            .map_err(StoreError::db("ping"))?;
        Ok(())
    }
}
