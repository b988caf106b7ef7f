//! The embedded default: one SQLite file (WAL) holding the outbox, the catalog and the read
//! models. One connection writes (SQLite has one writer anyway; queueing in-process beats
//! spinning on SQLITE_BUSY), a small pool reads.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, SqlitePool};

use super::fields::{self, FieldValue};
use super::{
    dead_letter_from_row, document_from_row, field_column, now_ms, parked_from_rows, table_name,
    DeadLetter, Document, Lease, ListQuery, ProjectionStatus, Store, StoreError,
};
use crate::runtime::{BatchOutput, Descriptor};

const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../../migrations/sqlite/0001_init.sql")),
    (
        2,
        include_str!("../../../migrations/sqlite/0002_dead_letters.sql"),
    ),
];

/// Rows per multi-row statement: large enough that a batch of 1000 documents is a handful of
/// statements.
const ROWS_PER_STATEMENT: usize = 500;

/// Binds per statement, within SQLite's limit (32766), for collections with many fields.
const MAX_BINDS: usize = 30_000;

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

/// A document to write, with the values of its collection's indexed fields.
struct Put<'a> {
    key: &'a str,
    doc: &'a str,
    values: Vec<FieldValue<'a>>,
}

/// One multi-row upsert of `rows` into `table`; returns how many rows it inserted or updated.
///
/// Without `changing_fields`, existing rows are updated only where every field column already
/// holds the new value, and the columns are not set: SQLite then leaves every index alone.
/// With it, only the rows whose field values differ are updated, columns included (what the
/// first statement skipped).
async fn upsert(
    tx: &mut sqlx::SqliteConnection,
    table: &str,
    columns: &[String],
    rows: &[Put<'_>],
    now: i64,
    changing_fields: bool,
) -> Result<u64, StoreError> {
    let mut sql = QueryBuilder::new(format!(
        "INSERT INTO \"{table}\" (key, doc, version, updated_at"
    ));
    for column in columns {
        sql.push(", ").push(column);
    }
    sql.push(") ");
    sql.push_values(rows, |mut row, put| {
        row.push_bind(put.key)
            .push_bind(put.doc)
            .push("1")
            .push_bind(now);
        for value in &put.values {
            row.push_bind(value);
        }
    });
    sql.push(format!(
        " ON CONFLICT(key) DO UPDATE SET doc = excluded.doc, \
         version = \"{table}\".version + 1, updated_at = excluded.updated_at"
    ));
    if !columns.is_empty() {
        let same: Vec<String> = columns
            .iter()
            .map(|c| format!("\"{table}\".{c} IS excluded.{c}"))
            .collect();
        let same = same.join(" AND ");
        if changing_fields {
            for column in columns {
                sql.push(format!(", {column} = excluded.{column}"));
            }
            sql.push(format!(" WHERE NOT ({same})"));
        } else {
            sql.push(format!(" WHERE {same}"));
        }
    }
    let done = sql
        .build()
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db(format!("writing documents to {table}")))?;
    Ok(done.rows_affected())
}

/// Brings a read-model table's field columns in line with the declared fields: a table made
/// before a field was declared (or by an older projector, which indexed expressions) gets the
/// missing columns, filled from its documents.
async fn upgrade_field_columns(
    tx: &mut sqlx::SqliteConnection,
    table: &str,
    fields: &[&str],
) -> Result<(), StoreError> {
    let existing: Vec<String> = sqlx::query_scalar("SELECT name FROM pragma_table_info(?)")
        .bind(table)
        .fetch_all(&mut *tx)
        .await
        .map_err(StoreError::db(format!("reading the columns of {table}")))?;
    // Columns of fields no longer declared are not kept up to date: dropped, so a field
    // declared again is filled afresh rather than found stale.
    let declared: Vec<String> = fields.iter().map(|f| field_column(f)).collect();
    for column in &existing {
        let quoted = format!("\"{column}\"");
        if column.starts_with("f_") && !declared.contains(&quoted) {
            let drop = [
                format!("DROP INDEX IF EXISTS \"{table}_{column}\""),
                format!("ALTER TABLE \"{table}\" DROP COLUMN {quoted}"),
            ];
            execute_all(tx, drop, &format!("dropping {column} from {table}")).await?;
        }
    }
    for (field, column) in fields.iter().zip(&declared) {
        if !existing.iter().any(|c| format!("\"{c}\"") == *column) {
            let add = [
                format!("ALTER TABLE \"{table}\" ADD COLUMN {column}"),
                format!("UPDATE \"{table}\" SET {column} = json_extract(doc, '$.{field}')"),
            ];
            execute_all(tx, add, &format!("adding {column} to {table}")).await?;
        }
    }
    // Expression indexes (`{table}_ix_…`) are what earlier versions made, and make again if one
    // runs on this file after an upgrade: it then also wrote documents as JSONB without filling
    // the columns. Those rows are brought up to date, once.
    let indexes: Vec<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?")
            .bind(table)
            .fetch_all(&mut *tx)
            .await
            .map_err(StoreError::db(format!("reading the indexes of {table}")))?;
    let legacy: Vec<&String> = indexes
        .iter()
        .filter(|name| name.starts_with(&format!("{table}_ix_")))
        .collect();
    if !legacy.is_empty() {
        let mut refresh = format!("UPDATE \"{table}\" SET doc = json(doc)");
        for (field, column) in fields.iter().zip(&declared) {
            refresh.push_str(&format!(", {column} = json_extract(doc, '$.{field}')"));
        }
        refresh.push_str(" WHERE typeof(doc) = 'blob'");
        let mut statements = vec![refresh];
        statements.extend(legacy.iter().map(|index| format!("DROP INDEX \"{index}\"")));
        execute_all(tx, statements, &format!("upgrading {table}")).await?;
    }
    Ok(())
}

/// Runs statements in order (DDL and the like, no binds).
async fn execute_all(
    tx: &mut sqlx::SqliteConnection,
    statements: impl IntoIterator<Item = String>,
    context: &str,
) -> Result<(), StoreError> {
    for sql in statements {
        sqlx::query(&sql)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(context.to_owned()))?;
    }
    Ok(())
}

/// A stored document as JSON text: written as text, or as JSONB by earlier versions.
const DOC_JSON: &str = "iif(typeof(doc) = 'text', doc, json(doc))";

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
            let fields = collection.fields();
            let columns: String = fields
                .iter()
                .map(|f| format!(", {}", field_column(f)))
                .collect();
            let ddl = format!(
                "CREATE TABLE IF NOT EXISTS \"{table}\" (key TEXT PRIMARY KEY, doc BLOB NOT NULL, \
                 version INTEGER NOT NULL, updated_at INTEGER NOT NULL{columns}) WITHOUT ROWID"
            );
            sqlx::query(&ddl)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::db(format!("creating {table}")))?;
            upgrade_field_columns(&mut tx, &table, &fields).await?;
            for field in &fields {
                let column = field_column(field);
                let index = format!("{table}_{}", column.trim_matches('"'));
                sqlx::query(&format!(
                    "CREATE INDEX IF NOT EXISTS \"{index}\" ON \"{table}\" ({column})"
                ))
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
            let fields = projection
                .collection(collection)
                .map(|c| c.fields())
                .unwrap_or_default();
            let columns: Vec<String> = fields.iter().map(|f| field_column(f)).collect();
            let mut puts = Vec::with_capacity(writes.len());
            let mut deletes = Vec::new();
            for (key, doc) in writes {
                let Some(doc) = doc else {
                    deletes.push(key.as_str());
                    continue;
                };
                let invalid = |reason: String| StoreError::InvalidDocument {
                    projection: projection.name.clone(),
                    collection: collection.clone(),
                    key: key.clone(),
                    reason,
                };
                let doc = std::str::from_utf8(doc).map_err(|e| invalid(e.to_string()))?;
                let values = fields::extract(doc, &fields).map_err(|e| invalid(e.to_string()))?;
                puts.push(Put { key, doc, values });
            }
            let rows = (MAX_BINDS / (3 + columns.len())).clamp(1, ROWS_PER_STATEMENT);
            for chunk in puts.chunks(rows) {
                // Most updates leave the indexed fields as they were: those rows (and new
                // ones) are written without setting the field columns, so no index entry is
                // touched. Rows whose fields changed are skipped here and updated by a second
                // statement only when there are any.
                let written = upsert(&mut tx, &table, &columns, chunk, now, false).await?;
                if written < chunk.len() as u64 {
                    upsert(&mut tx, &table, &columns, chunk, now, true).await?;
                }
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
            "SELECT key, {DOC_JSON}, version, updated_at FROM \"{table}\" WHERE key = ?"
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
                "SELECT key, {DOC_JSON}, version, updated_at FROM \"{table}\" WHERE key IN ("
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
            "SELECT key, {DOC_JSON}, version, updated_at FROM \"{table}\" WHERE 1 = 1"
        ));
        for (field, value) in &query.filters {
            let expr = field_column(field);
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

#[cfg(test)]
mod tests {
    use sqlx::{Connection, Row};

    use super::fields::{extract, FieldValue};

    /// Tables filled by earlier versions (and by the column backfill) hold `json_extract`'s
    /// values; the host's must be the same, or a filter would mean two things.
    #[tokio::test]
    async fn host_field_values_are_json_extracts() {
        let mut db = sqlx::SqliteConnection::connect("sqlite::memory:")
            .await
            .unwrap();
        let docs = [
            r#"{"s":"plain","e":"tab\tquote\"uni\u00e9","i":-7,"z":0,"big":9223372036854775807}"#,
            r#"{"huge":18446744073709551616,"r":2.5,"x":1e3,"t":true,"f":false,"n":null}"#,
            r#"{"o":{"s":"in","deep":{"i":3}},"a":[1,"two",null],"k":1,"k":2}"#,
            "{\"o\" : { \"s\" : \"a b\" ,\n \"deep\": {\"i\": [1, \"\\\" x\"]}}, \"a\": [ ]}",
            r#"[1,2,3]"#,
            r#""just a string""#,
        ];
        let fields = [
            "s",
            "e",
            "i",
            "z",
            "big",
            "huge",
            "r",
            "x",
            "t",
            "f",
            "n",
            "o.s",
            "o.deep.i",
            "a",
            "k",
            "missing",
            "o.missing",
            "s.sub",
        ];
        for doc in docs {
            let host = extract(doc, &fields).unwrap();
            for (field, value) in fields.iter().zip(host) {
                let row = sqlx::query(&format!(
                    "SELECT json_extract(?1, '$.{field}') AS v, typeof(json_extract(?1, '$.{field}')) AS t"
                ))
                .bind(doc)
                .fetch_one(&mut db)
                .await
                .unwrap();
                let kind: String = row.get("t");
                let expected = match kind.as_str() {
                    "null" => FieldValue::Null,
                    "integer" => FieldValue::Integer(row.get("v")),
                    "real" => FieldValue::Real(row.get("v")),
                    "text" => FieldValue::Text(row.get::<String, _>("v").into()),
                    other => panic!("{other}"),
                };
                assert_eq!(value, expected, "{field} of {doc}");
            }
        }
    }
}
