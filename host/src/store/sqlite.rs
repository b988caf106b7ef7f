//! The embedded default: one SQLite file (WAL) holding the outbox, the catalog and the read
//! models. One connection writes (SQLite has one writer anyway; queueing in-process beats
//! spinning on SQLITE_BUSY), a small pool reads.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, QueryBuilder, SqlitePool};

use super::catalog::{CatalogEntry, CutOver, Placement, StoredPlugin};
use super::fields::{self, FieldValue};
use super::{
    attach_actions, dead_letter_from_row, document_from_row, event_text, field_column, now_ms,
    parked_from_rows, parked_streams_from_rows, table_name, AdminAction, Batch, DeadLetter,
    Document, Lease, LetterCounts, ListQuery, ParkedStream, ProjectionStatus, Store, StoreError,
    ACTION_COLUMNS, ANSWERED_COMMANDS_KEPT_MS, LETTER_COLUMNS,
};
use super::{catalog_entries, descriptor_json, stored_plugin_from_row, PLUGIN_COLUMNS};
use super::{counts, logged_from_row, LOGGED_COLUMNS};
use crate::observer::{ActionState, Counts, Logged, Update};
use crate::runtime::Descriptor;

pub(crate) mod lent;
pub(crate) mod readers;
pub(crate) mod writer;

use lent::{Args, DbError};
use readers::Readers;
use rusqlite::types::ToSqlOutput;
use writer::Writer;

/// Documents in a batch above which its transaction leaves the runtime's worker thread.
const HEAVY_BATCH: usize = 256;

const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../../migrations/sqlite/0001_init.sql")),
    (
        2,
        include_str!("../../../migrations/sqlite/0002_dead_letters.sql"),
    ),
    (3, include_str!("../../../migrations/sqlite/0003_admin.sql")),
    (
        4,
        include_str!("../../../migrations/sqlite/0004_plugins.sql"),
    ),
    (5, include_str!("../../../migrations/sqlite/0005_kafka.sql")),
    (
        6,
        include_str!("../../../migrations/sqlite/0006_observers.sql"),
    ),
    (
        7,
        include_str!("../../../migrations/sqlite/0007_code_changed.sql"),
    ),
    (
        8,
        include_str!("../../../migrations/sqlite/0008_kafka_rows.sql"),
    ),
];

/// Rows per multi-row statement: large enough that a batch of 1000 documents is a handful of
/// statements.
const ROWS_PER_STATEMENT: usize = 500;

/// Binds per statement, within SQLite's limit (32766), for collections with many fields.
const MAX_BINDS: usize = 30_000;

/// How often the database file's identity is checked when nothing writes.
const FILE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// How often the WAL is folded into the database: often enough that it stays a few MB under
/// a full write load, rarely enough that each checkpoint's fsync is shared by many commits.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);

/// The two pools over one SQLite file.
#[derive(Clone)]
pub struct Sqlite {
    /// sqlx's write connection, for all but the hot path's writes.
    pub(crate) write: SqlitePool,
    /// The hot path's write connection: appends and batch commits.
    pub(crate) writer: Arc<Writer>,
    pub(crate) read: SqlitePool,
    /// The hot reads' connections.
    pub(crate) readers: Arc<Readers>,
    /// Folds the WAL into the database, off the write path.
    checkpointer: SqlitePool,
    file: Arc<DbFile>,
}

/// The database file was deleted or replaced under the running server: what is written now
/// goes to a file no path names, and a restart would open another (empty) one.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the database file {path} {reason}: writes are refused until the server is restarted on the right file")]
pub struct FileLost {
    pub path: String,
    pub reason: String,
}

/// The file this process opened, by device and inode, checked against what its path names
/// now: on a timer, before each batch commits and after each append commits (an append is
/// acknowledged only if its file is still the one the path names).
struct DbFile {
    path: PathBuf,
    /// `None` for an in-memory database: nothing to watch.
    identity: Option<(u64, u64)>,
    lost: OnceLock<FileLost>,
}

impl DbFile {
    fn open(path: &Path) -> Self {
        let identity = std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
        Self {
            path: path.to_owned(),
            identity,
            lost: OnceLock::new(),
        }
    }

    fn check(&self) -> Result<(), FileLost> {
        if let Some(lost) = self.lost.get() {
            return Err(lost.clone());
        }
        let Some(opened) = self.identity else {
            return Ok(());
        };
        let reason = match std::fs::metadata(&self.path) {
            Ok(now) if (now.dev(), now.ino()) == opened => return Ok(()),
            Ok(_) => "was replaced by another file",
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => "was deleted",
            // Anything else (a permission change, a stale mount) says nothing of identity.
            Err(_) => return Ok(()),
        };
        let lost = self.lost.get_or_init(|| {
            let lost = FileLost {
                path: self.path.display().to_string(),
                reason: reason.into(),
            };
            tracing::error!(
                path = %lost.path,
                reason,
                open_file = %open_copy(&self.path).unwrap_or_else(|| "not found".into()),
                "the database file is gone from under the server: writes are refused from now \
                 on. The file still open (open_file) holds everything acknowledged: copy it \
                 back to the path before restarting"
            );
            lost
        });
        Err(lost.clone())
    }
}

/// Where this process's open database file can still be read after its path lost it
/// (`/proc/self/fd/N` of a file the kernel shows as "… (deleted)" or as its old path).
fn open_copy(path: &Path) -> Option<String> {
    let wanted = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    for entry in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy();
        let target = target.strip_suffix(" (deleted)").unwrap_or(&target);
        if Path::new(target) == wanted || Path::new(target) == path {
            return Some(format!(
                "/proc/{}/fd/{}",
                std::process::id(),
                entry.file_name().to_string_lossy()
            ));
        }
    }
    None
}

/// Whether `url` names an in-memory database (one no other connection or process can open).
pub(crate) fn in_memory(url: &str) -> bool {
    url.contains(":memory:") || url.contains("mode=memory")
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
        // No ping before each acquire: an SQLite connection is a file handle, not a socket that
        // can drop, and the ping is a hop through sqlx's worker thread on every append, batch
        // and read (about a tenth of the CPU under live load). What can go wrong with one is
        // handled where it shows: `after_release` below, and `DbFile`'s checks.
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            // It shares the write lock with the hot path's connection (see `writer`).
            .after_connect(|conn, _| Box::pin(lent::wait_for_lock_on(conn)))
            // A write that failed mid-transaction (disk full, I/O error) can leave the
            // connection believing it is still inside it: SQLite rolled back already, the
            // driver's ROLLBACK then fails, and every later BEGIN would be refused ("non-zero
            // transaction depth") until a restart. Such a connection is replaced.
            .after_release(|conn, _| {
                Box::pin(async move {
                    if conn.is_in_transaction() {
                        // The drop's rollback is queued on the connection: let it run first.
                        if conn.ping().await.is_err() || conn.is_in_transaction() {
                            tracing::warn!(
                                "replacing the database's write connection: a failed write left \
                                 it inside a transaction it cannot leave"
                            );
                            return Ok(false);
                        }
                    }
                    Ok(true)
                })
            })
            // The WAL is folded into the database by the checkpointer below, not by whichever
            // commit crosses 1000 pages: that commit (an append, a batch) would wait for the
            // checkpoint's writes and fsyncs, and so would everything queued behind it.
            .connect_with(options.clone().pragma("wal_autocheckpoint", "0"))
            .await
            .map_err(|e| open_err(e.to_string()))?;
        migrate(&write).await?;
        let checkpointer = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await
            .map_err(|e| open_err(e.to_string()))?;
        let file = Arc::new(DbFile::open(options.get_filename()));
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .test_before_acquire(false)
            .connect_with(options.clone().read_only(true))
            .await
            .map_err(|e| open_err(e.to_string()))?;
        let (readers, writer) = if in_memory(url) {
            (Readers::lent(read.clone()), Writer::lent(write.clone()))
        } else {
            let path = options.get_filename().to_owned();
            (
                Readers::open(path.clone(), 4)
                    .map_err(|e| open_err(format!("opening a read connection: {e}")))?,
                Writer::open(path)
                    .map_err(|e| open_err(format!("opening the write connection: {e}")))?,
            )
        };
        let (readers, writer) = (Arc::new(readers), Arc::new(writer));
        let (watched, pool) = (Arc::downgrade(&file), checkpointer.clone());
        tokio::spawn(async move {
            // PASSIVE: copies what no reader still needs, never blocks the writer.
            let mut tick = tokio::time::interval(CHECKPOINT_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if watched.strong_count() == 0 || pool.is_closed() {
                    return;
                }
                if let Err(err) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                    .execute(&pool)
                    .await
                {
                    tracing::warn!(error = %err, "checkpointing the WAL failed; retrying");
                }
            }
        });
        let watched = Arc::downgrade(&file);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(FILE_CHECK_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(file) = watched.upgrade() else {
                    return;
                };
                if file.check().is_err() {
                    return;
                }
            }
        });
        Ok(Self {
            write,
            writer,
            read,
            readers,
            checkpointer,
            file,
        })
    }

    /// Fails once the database file is no longer the one this process opened.
    pub(crate) fn check_file(&self) -> Result<(), FileLost> {
        self.file.check()
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
        self.readers.close();
        self.writer.close().await;
        self.checkpointer.close().await;
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

/// Writes `rows` into `table`, one prepared statement stepped per row: in-process, a row is a
/// few microseconds, and a statement prepared once per shape and transaction costs less than
/// parsing one multi-row statement per batch.
///
/// Most updates leave the indexed fields as they were: the first statement writes a row only
/// where every field column already holds the new value (or the row is new), without setting
/// the columns, so SQLite leaves every index alone. A row it skipped (its fields changed) is
/// written by a second statement that sets the columns too.
fn upsert(
    db: &rusqlite::Connection,
    table: &str,
    columns: &[String],
    rows: &[Put<'_>],
    now: i64,
) -> Result<(), StoreError> {
    let statement = |changing_fields: bool| {
        let mut sql = format!("INSERT INTO \"{table}\" (key, doc, version, updated_at");
        for column in columns {
            sql.push_str(", ");
            sql.push_str(column);
        }
        sql.push_str(&format!(
            ") VALUES (?, ?, 1, ?{}) ON CONFLICT(key) DO UPDATE SET doc = excluded.doc, \
             version = \"{table}\".version + 1, updated_at = excluded.updated_at",
            ", ?".repeat(columns.len())
        ));
        if !columns.is_empty() {
            let same: Vec<String> = columns
                .iter()
                .map(|c| format!("\"{table}\".{c} IS excluded.{c}"))
                .collect();
            let same = same.join(" AND ");
            if changing_fields {
                for column in columns {
                    sql.push_str(&format!(", {column} = excluded.{column}"));
                }
                sql.push_str(&format!(" WHERE NOT ({same})"));
            } else {
                sql.push_str(&format!(" WHERE {same}"));
            }
        }
        sql
    };
    let context = format!("writing documents to {table}");
    let failed = || StoreError::sqlite(&context);
    let mut same = db.prepare(&statement(false)).map_err(failed())?;
    let mut changing = None;
    let mut args: Args<'_> = Vec::with_capacity(3 + columns.len());
    for put in rows {
        args.clear();
        args.extend([lent::text(put.key), lent::text(put.doc), lent::int(now)]);
        args.extend(put.values.iter().map(FieldValue::to_sql_output));
        let params = rusqlite::params_from_iter(&args);
        if same.execute(params.clone()).map_err(failed())? == 0 {
            if changing.is_none() {
                changing = Some(db.prepare(&statement(true)).map_err(failed())?);
            }
            if let Some(changing) = changing.as_mut() {
                changing.execute(params).map_err(failed())?;
            }
        }
    }
    Ok(())
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

impl DbError for StoreError {
    fn db(context: &str, source: sqlx::Error) -> Self {
        Self::db(context)(source)
    }
}

/// A stored document as JSON text: written as text, or as JSONB by earlier versions.
const DOC_JSON: &str = "iif(typeof(doc) = 'text', doc, json(doc))";

/// A document from a row of `SELECT key, {DOC_JSON}, version, updated_at`.
fn document_from_sqlite(row: &rusqlite::Row<'_>, context: &str) -> Result<Document, StoreError> {
    let column = |e| StoreError::sqlite(context)(e);
    super::document(
        row.get(0).map_err(column)?,
        row.get(1).map_err(column)?,
        row.get(2).map_err(column)?,
        row.get(3).map_err(column)?,
    )
}

/// A batch's dead-letter bookkeeping, in its transaction: released rows removed, letters
/// written (replacing any at the same position), a resolved letter's state, operators'
/// actions. No statement for what the batch does not carry.
fn write_letters(
    db: &rusqlite::Connection,
    projection: &Descriptor,
    batch: &Batch<'_>,
    now: i64,
) -> Result<(), StoreError> {
    let (name, version) = (projection.name.as_str(), projection.version.as_str());
    for chunk in batch.released.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "DELETE FROM dead_letters WHERE projection = ? AND version = ? AND position IN ({})",
            lent::placeholders(chunk.len())
        );
        let mut args: Args<'_> = vec![lent::text(name), lent::text(version)];
        args.extend(chunk.iter().map(|p| lent::int(*p as i64)));
        lent::execute::<StoreError>(db, &sql, &args, "releasing parked events")?;
    }
    for chunk in batch.dead_letters.chunks(ROWS_PER_STATEMENT / 2) {
        let events: Vec<Option<String>> = chunk.iter().map(event_text).collect();
        let sql = format!(
            "INSERT INTO dead_letters (projection, version, position, event_id, stream, reason, \
             parked_behind, kind, state, resolved_at, plugin_version, event, created_at) \
             VALUES {} ON CONFLICT (projection, version, position) DO UPDATE SET \
             event_id = excluded.event_id, stream = excluded.stream, reason = excluded.reason, \
             parked_behind = excluded.parked_behind, kind = excluded.kind, \
             state = excluded.state, resolved_at = excluded.resolved_at, \
             plugin_version = excluded.plugin_version, event = excluded.event",
            lent::values(&format!("({})", lent::placeholders(13)), chunk.len())
        );
        let mut args: Args<'_> = Vec::with_capacity(chunk.len() * 13);
        for (letter, event) in chunk.iter().zip(&events) {
            args.extend([
                lent::text(name),
                lent::text(version),
                lent::int(letter.position as i64),
                lent::text(letter.event_id.as_deref()),
                lent::text(letter.stream.as_deref()),
                lent::text(letter.reason.as_str()),
                lent::int(letter.parked_behind.map(|p| p as i64)),
                lent::text(letter.kind.as_str()),
                lent::text(letter.state.as_str()),
                lent::int(letter.resolved_at),
                lent::text(letter.plugin_version.as_deref()),
                lent::text(event.as_deref()),
                lent::int(now),
            ]);
        }
        lent::execute::<StoreError>(db, &sql, &args, "writing dead letters")?;
    }
    if let Some((position, state)) = batch.resolved {
        let resolved = lent::execute::<StoreError>(
            db,
            "UPDATE dead_letters SET state = ?, resolved_at = ? \
             WHERE projection = ? AND version = ? AND position = ? AND state = 'open'",
            &[
                lent::text(state.as_str()),
                lent::int(now),
                lent::text(name),
                lent::text(version),
                lent::int(position as i64),
            ],
            "resolving a dead letter",
        )?;
        // Resolved meanwhile (by another instance): this one's view is stale.
        if resolved != 1 {
            return Err(StoreError::Fenced {
                projection: projection.name.clone(),
                expected: batch.from,
            });
        }
    }
    insert_actions(db, projection, batch.actions)
}

/// Records operators' actions.
fn insert_actions(
    db: &rusqlite::Connection,
    projection: &Descriptor,
    actions: &[AdminAction],
) -> Result<(), StoreError> {
    for chunk in actions.chunks(ROWS_PER_STATEMENT / 2) {
        let sql = format!(
            "INSERT INTO admin_actions (projection, version, target, action, at, outcome) \
             VALUES {}",
            lent::values("(?, ?, ?, ?, ?, ?)", chunk.len())
        );
        let mut args: Args<'_> = Vec::with_capacity(chunk.len() * 6);
        for action in chunk {
            args.extend([
                lent::text(projection.name.as_str()),
                lent::text(projection.version.as_str()),
                lent::int(action.target.map(|p| p as i64)),
                lent::text(action.action.as_str()),
                lent::int(action.at),
                lent::text(action.outcome.as_str()),
            ]);
        }
        lent::execute::<StoreError>(db, &sql, &args, "recording admin actions")?;
    }
    Ok(())
}

impl Sqlite {
    /// Fills the actions of `letters` (in position order) with one query.
    async fn fill_actions(
        &self,
        projection: &Descriptor,
        letters: &mut [DeadLetter],
    ) -> Result<(), StoreError> {
        let (Some(first), Some(last)) = (letters.first(), letters.last()) else {
            return Ok(());
        };
        let rows = sqlx::query(&format!(
            "SELECT {ACTION_COLUMNS} FROM admin_actions WHERE projection = ? AND version = ? \
             AND target BETWEEN ? AND ? ORDER BY id"
        ))
        .bind(&projection.name)
        .bind(&projection.version)
        .bind(first.position as i64)
        .bind(last.position as i64)
        .fetch_all(&self.read)
        .await
        .map_err(StoreError::db("reading admin actions"))?;
        attach_actions(letters, &rows)
    }

    /// Dead letters by a condition on the row (after `projection = ? AND version = ?`), in
    /// position order, with their events and actions.
    async fn letters_where(
        &self,
        projection: &Descriptor,
        condition: &str,
        value: i64,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {LETTER_COLUMNS}, event FROM dead_letters \
             WHERE projection = ? AND version = ? AND {condition} ORDER BY position"
        ))
        .bind(&projection.name)
        .bind(&projection.version)
        .bind(value)
        .fetch_all(&self.read)
        .await
        .map_err(StoreError::db("reading dead letters"))?;
        let mut letters = rows
            .iter()
            .map(dead_letter_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        self.fill_actions(projection, &mut letters).await?;
        Ok(letters)
    }
}

#[async_trait]
impl Store for Sqlite {
    async fn register(&self, projection: &Descriptor) -> Result<u64, StoreError> {
        let checkpoint = self.prepare(projection).await?;
        sqlx::query(
            "INSERT INTO projections (name, version, status, error, updated_at) VALUES (?, ?, 'running', NULL, ?) \
             ON CONFLICT(name) DO UPDATE SET version = excluded.version, status = 'running', error = NULL, \
             updated_at = excluded.updated_at",
        )
        .bind(&projection.name)
        .bind(&projection.version)
        .bind(now_ms())
        .execute(&self.write)
        .await
        .map_err(StoreError::db("recording the projection"))?;
        Ok(checkpoint)
    }

    async fn catalog_revision(&self) -> Result<i64, StoreError> {
        sqlx::query_scalar("SELECT revision FROM catalog_revision WHERE id = 1")
            .fetch_one(&self.read)
            .await
            .map_err(StoreError::db("reading the catalog's revision"))
    }

    async fn catalog(&self) -> Result<Vec<CatalogEntry>, StoreError> {
        let projections: Vec<(String, String, Option<String>, bool)> = sqlx::query_as(
            "SELECT name, version, building, manual_cutover FROM projections ORDER BY name",
        )
        .fetch_all(&self.read)
        .await
        .map_err(StoreError::db("reading the catalog"))?;
        let plugins = sqlx::query(&format!(
            "SELECT {PLUGIN_COLUMNS} FROM plugins ORDER BY name, version"
        ))
        .fetch_all(&self.read)
        .await
        .map_err(StoreError::db("reading the catalog's plugins"))?;
        let plugins = plugins
            .iter()
            .map(stored_plugin_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(catalog_entries(projections, plugins))
    }

    async fn plugin_code(
        &self,
        name: &str,
        version: &str,
    ) -> Result<Option<(String, Vec<u8>)>, StoreError> {
        sqlx::query_as("SELECT sha256, bytes FROM plugins WHERE name = ? AND version = ?")
            .bind(name)
            .bind(version)
            .fetch_optional(&self.read)
            .await
            .map_err(StoreError::db("reading a plugin's code"))
    }

    async fn save_plugin(
        &self,
        plugin: &StoredPlugin,
        bytes: &[u8],
        placement: Placement,
    ) -> Result<(), StoreError> {
        self.check_file()?;
        let descriptor = descriptor_json(plugin)?;
        let mut tx = self
            .write
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(StoreError::db("storing a plugin"))?;
        sqlx::query(
            "INSERT INTO plugins (name, version, sha256, world, contract, descriptor, origin, uploaded_at, bytes, code_changed_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (name, version) DO UPDATE SET sha256 = excluded.sha256, world = excluded.world, \
             contract = excluded.contract, descriptor = excluded.descriptor, origin = excluded.origin, \
             uploaded_at = excluded.uploaded_at, bytes = excluded.bytes, code_changed_at = excluded.code_changed_at",
        )
        .bind(&plugin.name)
        .bind(&plugin.version)
        .bind(&plugin.sha256)
        .bind(&plugin.world)
        .bind(&plugin.contract)
        .bind(&descriptor)
        .bind(&plugin.origin)
        .bind(plugin.uploaded_at)
        .bind(bytes)
        .bind(plugin.code_changed_at)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db("storing a plugin"))?;
        let now = now_ms();
        let placed = match placement {
            Placement::Active => sqlx::query(
                "INSERT INTO projections (name, version, status, error, updated_at) VALUES (?, ?, 'running', NULL, ?) \
                 ON CONFLICT(name) DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at, \
                 building = CASE WHEN building = excluded.version THEN NULL ELSE building END",
            )
            .bind(&plugin.name)
            .bind(&plugin.version)
            .bind(now),
            Placement::Build { manual } => sqlx::query(
                "UPDATE projections SET building = ?, manual_cutover = ?, updated_at = ? WHERE name = ?",
            )
            .bind(&plugin.version)
            .bind(manual)
            .bind(now)
            .bind(&plugin.name),
            Placement::Keep => sqlx::query("SELECT 1"),
        };
        placed
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db("placing a plugin"))?;
        bump_revision(&mut tx).await?;
        tx.commit()
            .await
            .map_err(StoreError::db("storing a plugin"))?;
        Ok(())
    }

    async fn cut_over(&self, name: &str, from: &str, to: &str) -> Result<CutOver, StoreError> {
        self.check_file()?;
        // One writer at a time: the checkpoints compared here cannot move before the commit.
        let mut tx = self
            .write
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(StoreError::db("cutting over"))?;
        let planned: Option<(i64,)> = sqlx::query_as(
            "SELECT 1 FROM projections WHERE name = ? AND version = ? AND building = ?",
        )
        .bind(name)
        .bind(from)
        .bind(to)
        .fetch_optional(&mut *tx)
        .await
        .map_err(StoreError::db("cutting over"))?;
        if planned.is_none() {
            return Ok(CutOver::Changed);
        }
        let positions: Vec<(String, i64)> = sqlx::query_as(
            "SELECT version, position FROM checkpoints WHERE projection = ? AND version IN (?, ?)",
        )
        .bind(name)
        .bind(from)
        .bind(to)
        .fetch_all(&mut *tx)
        .await
        .map_err(StoreError::db("cutting over"))?;
        let at = |v: &str| {
            positions
                .iter()
                .find(|(version, _)| version == v)
                .map(|p| p.1)
        };
        if at(to).unwrap_or(0) < at(from).unwrap_or(0) {
            return Ok(CutOver::Behind);
        }
        sqlx::query(
            "UPDATE projections SET version = ?, building = NULL, manual_cutover = 0, updated_at = ? WHERE name = ?",
        )
        .bind(to)
        .bind(now_ms())
        .bind(name)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db("cutting over"))?;
        bump_revision(&mut tx).await?;
        tx.commit().await.map_err(StoreError::db("cutting over"))?;
        Ok(CutOver::Done)
    }

    async fn build_version(
        &self,
        name: &str,
        version: &str,
        manual: bool,
    ) -> Result<bool, StoreError> {
        let mut tx = self
            .write
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(StoreError::db("starting a build"))?;
        let changed = sqlx::query(
            "UPDATE projections SET building = ?, manual_cutover = ?, updated_at = ? \
             WHERE name = ? AND EXISTS (SELECT 1 FROM plugins WHERE name = ? AND version = ?)",
        )
        .bind(version)
        .bind(manual)
        .bind(now_ms())
        .bind(name)
        .bind(name)
        .bind(version)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db("starting a build"))?
        .rows_affected();
        if changed == 0 {
            return Ok(false);
        }
        bump_revision(&mut tx).await?;
        tx.commit()
            .await
            .map_err(StoreError::db("starting a build"))?;
        Ok(true)
    }

    async fn drop_version(&self, projection: &Descriptor) -> Result<(), StoreError> {
        let (name, version) = (&projection.name, &projection.version);
        let mut tx = self
            .write
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(StoreError::db("dropping a version"))?;
        for collection in &projection.collections {
            let table = table_name(projection, &collection.name);
            sqlx::query(&format!("DROP TABLE IF EXISTS \"{table}\""))
                .execute(&mut *tx)
                .await
                .map_err(StoreError::db(format!("dropping {table}")))?;
        }
        for statement in [
            "DELETE FROM checkpoints WHERE projection = ? AND version = ?",
            "DELETE FROM dead_letters WHERE projection = ? AND version = ?",
            "DELETE FROM admin_actions WHERE projection = ? AND version = ?",
            "DELETE FROM plugins WHERE name = ? AND version = ?",
            "UPDATE projections SET building = NULL WHERE name = ? AND building = ?",
        ] {
            sqlx::query(statement)
                .bind(name)
                .bind(version)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::db("dropping a version"))?;
        }
        bump_revision(&mut tx).await?;
        tx.commit()
            .await
            .map_err(StoreError::db("dropping a version"))?;
        Ok(())
    }

    async fn drop_projection(&self, name: &str) -> Result<(), StoreError> {
        let mut tx = self
            .write
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(StoreError::db("removing a projection"))?;
        for statement in [
            "DELETE FROM projections WHERE name = ?",
            "DELETE FROM plugins WHERE name = ?",
            "DELETE FROM checkpoints WHERE projection = ?",
            "DELETE FROM dead_letters WHERE projection = ?",
            "DELETE FROM admin_commands WHERE projection = ?",
        ] {
            sqlx::query(statement)
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::db("removing a projection"))?;
        }
        bump_revision(&mut tx).await?;
        tx.commit()
            .await
            .map_err(StoreError::db("removing a projection"))?;
        Ok(())
    }

    async fn prepare(&self, projection: &Descriptor) -> Result<u64, StoreError> {
        // Immediate: it reads before it writes, and the hot path writes beside it on another
        // connection (see `writer`).
        let mut tx = self
            .write
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(StoreError::db("preparing a projection version"))?;
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

    // WAL with synchronous=NORMAL for every commit: durable across a process crash, so
    // `batch.durable` changes nothing here.
    async fn commit(&self, projection: &Descriptor, batch: &Batch<'_>) -> Result<(), StoreError> {
        let Batch {
            output, from, to, ..
        } = *batch;
        let now = now_ms();
        self.check_file()?;
        // Documents are validated and their fields extracted before the write lock is taken.
        let mut tables = Vec::with_capacity(output.writes.len());
        for (collection, writes) in &output.writes {
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
            tables.push((table_name(projection, collection), columns, puts, deletes));
        }
        let heavy = output.writes.values().map(|w| w.len()).sum::<usize>() > HEAVY_BATCH;
        self.writer
            .immediate(heavy, "committing a batch", |db| {
                write_letters(db, projection, batch, now)?;
                log_actions(db, projection, &output.actions, now)?;
                for (table, columns, puts, deletes) in &tables {
                    upsert(db, table, columns, puts, now)?;
                    if !deletes.is_empty() {
                        let context = format!("deleting documents from {table}");
                        let mut delete = db
                            .prepare(&format!("DELETE FROM \"{table}\" WHERE key = ?"))
                            .map_err(StoreError::sqlite(&context))?;
                        for key in deletes {
                            delete
                                .execute([key])
                                .map_err(StoreError::sqlite(&context))?;
                        }
                    }
                }
                let moved = lent::execute::<StoreError>(
                    db,
                    "UPDATE checkpoints SET position = ?, updated_at = ? \
                 WHERE projection = ? AND version = ? AND position = ?",
                    &[
                        lent::int(to as i64),
                        lent::int(now),
                        lent::text(projection.name.as_str()),
                        lent::text(projection.version.as_str()),
                        lent::int(from as i64),
                    ],
                    "moving the checkpoint",
                )?;
                if moved != 1 {
                    return Err(StoreError::Fenced {
                        projection: projection.name.clone(),
                        expected: from,
                    });
                }
                Ok(())
            })
            .await
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
             AND parked_behind IS NULL AND stream IS NOT NULL AND state = 'open' GROUP BY stream",
        )
        .bind(&projection.name)
        .bind(&projection.version)
        .fetch_all(&self.read)
        .await
        .map_err(StoreError::db("reading parked streams"))?;
        parked_from_rows(&rows)
    }

    async fn parked(&self, projection: &Descriptor) -> Result<Vec<ParkedStream>, StoreError> {
        let rows = sqlx::query(
            "SELECT h.stream, h.position, h.reason, (SELECT COUNT(*) FROM dead_letters p \
             WHERE p.projection = h.projection AND p.version = h.version \
             AND p.parked_behind = h.position) \
             FROM dead_letters h WHERE h.projection = ? AND h.version = ? \
             AND h.parked_behind IS NULL AND h.stream IS NOT NULL AND h.state = 'open' \
             ORDER BY h.stream, h.position",
        )
        .bind(&projection.name)
        .bind(&projection.version)
        .fetch_all(&self.read)
        .await
        .map_err(StoreError::db("reading parked streams"))?;
        parked_streams_from_rows(&rows)
    }

    async fn letter_counts(&self, projection: &Descriptor) -> Result<LetterCounts, StoreError> {
        let counts: (i64, i64, i64) = sqlx::query_as(
            "SELECT \
             (SELECT COUNT(*) FROM dead_letters WHERE projection = ?1 AND version = ?2 \
              AND state = 'open' AND parked_behind IS NULL), \
             (SELECT COUNT(*) FROM dead_letters WHERE projection = ?1 AND version = ?2 \
              AND state = 'open' AND parked_behind IS NULL AND stream IS NOT NULL), \
             (SELECT COUNT(*) FROM dead_letters p WHERE p.projection = ?1 AND p.version = ?2 \
              AND p.parked_behind IN (SELECT h.position FROM dead_letters h \
              WHERE h.projection = ?1 AND h.version = ?2 AND h.parked_behind IS NULL \
              AND h.stream IS NOT NULL AND h.state = 'open'))",
        )
        .bind(&projection.name)
        .bind(&projection.version)
        .fetch_one(&self.read)
        .await
        .map_err(StoreError::db("counting dead letters"))?;
        Ok(counts.into())
    }

    async fn dead_letters(
        &self,
        projection: &Descriptor,
        after: u64,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        // Without the events: a page of them is not worth reading for a listing.
        let rows = sqlx::query(&format!(
            "SELECT {LETTER_COLUMNS}, NULL FROM dead_letters \
             WHERE projection = ? AND version = ? AND position > ? ORDER BY position LIMIT ?"
        ))
        .bind(&projection.name)
        .bind(&projection.version)
        .bind(after as i64)
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await
        .map_err(StoreError::db("reading dead letters"))?;
        let mut letters = rows
            .iter()
            .map(dead_letter_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        self.fill_actions(projection, &mut letters).await?;
        Ok(letters)
    }

    async fn dead_letter(
        &self,
        projection: &Descriptor,
        position: u64,
    ) -> Result<Option<DeadLetter>, StoreError> {
        let letters = self
            .letters_where(projection, "position = ?", position as i64)
            .await?;
        Ok(letters.into_iter().next())
    }

    async fn parked_behind(
        &self,
        projection: &Descriptor,
        position: u64,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        self.letters_where(projection, "parked_behind = ?", position as i64)
            .await
    }

    async fn record_action(
        &self,
        projection: &Descriptor,
        action: &AdminAction,
    ) -> Result<(), StoreError> {
        self.writer
            .immediate(false, "recording an admin action", |db| {
                insert_actions(db, projection, std::slice::from_ref(action))
            })
            .await
    }

    async fn paused(&self, projection: &str) -> Result<bool, StoreError> {
        let paused: Option<bool> =
            sqlx::query_scalar("SELECT paused FROM projections WHERE name = ?")
                .bind(projection)
                .fetch_optional(&self.read)
                .await
                .map_err(StoreError::db("reading whether the projection is paused"))?;
        Ok(paused.unwrap_or(false))
    }

    async fn set_paused(&self, projection: &str, paused: bool) -> Result<(), StoreError> {
        sqlx::query("UPDATE projections SET paused = ?, updated_at = ? WHERE name = ?")
            .bind(paused)
            .bind(now_ms())
            .bind(projection)
            .execute(&self.write)
            .await
            .map_err(StoreError::db("pausing or resuming the projection"))?;
        Ok(())
    }

    async fn submit_command(&self, projection: &str, command: &str) -> Result<i64, StoreError> {
        let now = now_ms();
        // Answers read long ago go; the partial index makes this a lookup of nothing mostly.
        sqlx::query("DELETE FROM admin_commands WHERE answered_at < ?")
            .bind(now - ANSWERED_COMMANDS_KEPT_MS)
            .execute(&self.write)
            .await
            .map_err(StoreError::db("removing answered admin commands"))?;
        sqlx::query_scalar(
            "INSERT INTO admin_commands (projection, command, created_at) VALUES (?, ?, ?) \
             RETURNING id",
        )
        .bind(projection)
        .bind(command)
        .bind(now)
        .fetch_one(&self.write)
        .await
        .map_err(StoreError::db("queueing an admin command"))
    }

    async fn pending_commands(&self, projection: &str) -> Result<Vec<(i64, String)>, StoreError> {
        sqlx::query_as(
            "SELECT id, command FROM admin_commands WHERE projection = ? AND answer IS NULL \
             ORDER BY id",
        )
        .bind(projection)
        .fetch_all(&self.read)
        .await
        .map_err(StoreError::db("reading admin commands"))
    }

    async fn answer_command(&self, id: i64, answer: &str, claim: bool) -> Result<bool, StoreError> {
        let sql = if claim {
            "UPDATE admin_commands SET answer = ?, answered_at = ? WHERE id = ? AND answer IS NULL"
        } else {
            "UPDATE admin_commands SET answer = ?, answered_at = ? WHERE id = ?"
        };
        let done = sqlx::query(sql)
            .bind(answer)
            .bind(now_ms())
            .bind(id)
            .execute(&self.write)
            .await
            .map_err(StoreError::db("answering an admin command"))?;
        Ok(done.rows_affected() == 1)
    }

    async fn command_answer(&self, id: i64) -> Result<Option<String>, StoreError> {
        let answer: Option<Option<String>> =
            sqlx::query_scalar("SELECT answer FROM admin_commands WHERE id = ?")
                .bind(id)
                .fetch_optional(&self.read)
                .await
                .map_err(StoreError::db("reading an admin command's answer"))?;
        Ok(answer.flatten())
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
        let context = format!("reading {table}");
        let sql =
            format!("SELECT key, {DOC_JSON}, version, updated_at FROM \"{table}\" WHERE key = ?");
        self.readers
            .read(false, &context, |db| {
                let mut statement = db
                    .prepare_cached(&sql)
                    .map_err(StoreError::sqlite(&context))?;
                let mut rows = statement
                    .query([key])
                    .map_err(StoreError::sqlite(&context))?;
                match rows.next().map_err(StoreError::sqlite(&context))? {
                    Some(row) => document_from_sqlite(row, &context).map(Some),
                    None => Ok(None),
                }
            })
            .await
    }

    async fn documents(
        &self,
        projection: &Descriptor,
        collection: &str,
        keys: &[&str],
    ) -> Result<Vec<Document>, StoreError> {
        let table = table_name(projection, collection);
        let context = format!("reading {table}");
        self.readers
            .read(keys.len() > HEAVY_BATCH, &context, |db| {
                let mut found = Vec::new();
                for chunk in keys.chunks(ROWS_PER_STATEMENT) {
                    let sql = format!(
                        "SELECT key, {DOC_JSON}, version, updated_at FROM \"{table}\" WHERE key IN ({})",
                        lent::placeholders(chunk.len())
                    );
                    let args = rusqlite::params_from_iter(chunk);
                    lent::for_each_row::<StoreError>(db, &sql, args, &context, |row| {
                        found.push(document_from_sqlite(row, &context)?);
                        Ok(())
                    })?;
                }
                Ok(found)
            })
            .await
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
            // "true" the boolean; each alternative is an equality the field column's index
            // serves.
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
        self.check_file()?;
        sqlx::query("SELECT 1")
            .execute(&self.read)
            .await
            .map_err(StoreError::db("ping"))?;
        Ok(())
    }

    async fn open_actions(
        &self,
        observer: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<Logged>, StoreError> {
        self.check_file()?;
        let rows = sqlx::query(&format!(
            "SELECT {LOGGED_COLUMNS} FROM observer_actions WHERE observer = ? AND id > ? \
             AND state IN ('pending', 'dead') ORDER BY id LIMIT ?"
        ))
        .bind(observer)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await
        .map_err(StoreError::db("reading open observer actions"))?;
        rows.iter().map(logged_from_row).collect()
    }

    async fn actions_by_id(&self, observer: &str, ids: &[i64]) -> Result<Vec<Logged>, StoreError> {
        self.check_file()?;
        let mut found = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            let mut sql = QueryBuilder::new(format!(
                "SELECT {LOGGED_COLUMNS} FROM observer_actions WHERE observer = "
            ));
            sql.push_bind(observer).push(" AND id IN (");
            let mut list = sql.separated(", ");
            for id in chunk {
                list.push_bind(*id);
            }
            sql.push(") ORDER BY id");
            let rows = sql
                .build()
                .fetch_all(&self.read)
                .await
                .map_err(StoreError::db("reading observer actions"))?;
            for row in &rows {
                found.push(logged_from_row(row)?);
            }
        }
        Ok(found)
    }

    async fn update_actions(&self, updates: &[Update]) -> Result<(), StoreError> {
        if updates.is_empty() {
            return Ok(());
        }
        self.check_file()?;
        let now = now_ms();
        let mut tx = self
            .write
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(StoreError::db("beginning an action update"))?;
        // Most updates are deliveries: one statement for all of them.
        let (done, other): (Vec<&Update>, Vec<&Update>) = updates
            .iter()
            .partition(|u| u.state == ActionState::Done && u.last_error.is_none());
        for chunk in done.chunks(ROWS_PER_STATEMENT) {
            let mut sql =
                QueryBuilder::new("UPDATE observer_actions SET state = 'done', updated_at = ");
            sql.push_bind(now).push(", attempts = CASE id");
            for u in chunk {
                sql.push(" WHEN ")
                    .push_bind(u.id)
                    .push(" THEN ")
                    .push_bind(i64::from(u.attempts));
            }
            sql.push(" END, last_status = CASE id");
            for u in chunk {
                sql.push(" WHEN ")
                    .push_bind(u.id)
                    .push(" THEN ")
                    .push_bind(u.last_status.map(i64::from));
            }
            sql.push(" END WHERE id IN (");
            let mut list = sql.separated(", ");
            for u in chunk {
                list.push_bind(u.id);
            }
            sql.push(")");
            sql.build()
                .execute(&mut *tx)
                .await
                .map_err(StoreError::db("recording delivered actions"))?;
        }
        for u in other {
            sqlx::query(
                "UPDATE observer_actions SET state = ?, attempts = ?, next_at = ?, \
                 last_status = ?, last_error = ?, updated_at = ? WHERE id = ?",
            )
            .bind(u.state.as_str())
            .bind(i64::from(u.attempts))
            .bind(u.next_at)
            .bind(u.last_status.map(i64::from))
            .bind(&u.last_error)
            .bind(now)
            .bind(u.id)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db("recording an action's attempt"))?;
        }
        tx.commit()
            .await
            .map_err(StoreError::db("committing action updates"))
    }

    async fn list_actions(
        &self,
        observer: &str,
        state: ActionState,
        after: i64,
        limit: u32,
    ) -> Result<Vec<Logged>, StoreError> {
        self.check_file()?;
        let rows = sqlx::query(&format!(
            "SELECT {LOGGED_COLUMNS} FROM observer_actions WHERE observer = ? AND state = ? \
             AND id > ? ORDER BY id LIMIT ?"
        ))
        .bind(observer)
        .bind(state.as_str())
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await
        .map_err(StoreError::db("listing observer actions"))?;
        rows.iter().map(logged_from_row).collect()
    }

    async fn action_counts(&self, observer: &str) -> Result<Counts, StoreError> {
        self.check_file()?;
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT state, COUNT(*) FROM observer_actions WHERE observer = ? GROUP BY state",
        )
        .bind(observer)
        .fetch_all(&self.read)
        .await
        .map_err(StoreError::db("counting observer actions"))?;
        Ok(counts(rows))
    }

    async fn resolve_action(
        &self,
        observer: &str,
        id: i64,
        retry: bool,
    ) -> Result<Option<Logged>, StoreError> {
        self.check_file()?;
        let (state, attempts) = if retry {
            ("pending", "0")
        } else {
            ("skipped", "attempts")
        };
        let row = sqlx::query(&format!(
            "UPDATE observer_actions SET state = '{state}', attempts = {attempts}, next_at = 0, \
             updated_at = ? WHERE observer = ? AND id = ? AND state = 'dead' \
             RETURNING {LOGGED_COLUMNS}"
        ))
        .bind(now_ms())
        .bind(observer)
        .bind(id)
        .fetch_optional(&self.write)
        .await
        .map_err(StoreError::db("resolving a dead action"))?;
        row.as_ref().map(logged_from_row).transpose()
    }
}

/// Logs a batch's decided actions in its transaction; an action whose key is logged already
/// (decided again by a replay) is passed over.
fn log_actions(
    db: &rusqlite::Connection,
    observer: &Descriptor,
    actions: &[crate::observer::Decided],
    now: i64,
) -> Result<(), StoreError> {
    const COLUMNS: usize = 10;
    for chunk in actions.chunks(MAX_BINDS / COLUMNS) {
        let sql = format!(
            "INSERT INTO observer_actions (observer, event_id, idx, stream, position, kind, \
             spec, body, created_at, updated_at) VALUES {} \
             ON CONFLICT (observer, event_id, idx) DO NOTHING",
            lent::values(&format!("({})", lent::placeholders(COLUMNS)), chunk.len())
        );
        let mut args: Args<'_> = Vec::with_capacity(chunk.len() * COLUMNS);
        for a in chunk {
            args.extend([
                lent::text(observer.name.as_str()),
                lent::text(a.event_id.as_str()),
                lent::int(i64::from(a.index)),
                lent::text(a.stream.as_str()),
                lent::int(a.position as i64),
                lent::text(a.kind.as_str()),
                ToSqlOutput::from(a.kind.spec()),
                ToSqlOutput::from(a.kind.body()),
                lent::int(now),
                lent::int(now),
            ]);
        }
        lent::execute::<StoreError>(db, &sql, &args, "logging observer actions")?;
    }
    Ok(())
}

/// Moves the catalog's revision, in the transaction of the change.
async fn bump_revision(tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>) -> Result<(), StoreError> {
    sqlx::query("UPDATE catalog_revision SET revision = revision + 1 WHERE id = 1")
        .execute(&mut **tx)
        .await
        .map_err(StoreError::db("moving the catalog's revision"))?;
    Ok(())
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
