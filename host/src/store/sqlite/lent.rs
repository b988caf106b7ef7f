//! Statements run through rusqlite on the calling thread, not on sqlx's worker thread: the
//! helpers for them (arguments, a transaction, errors), and the lending of an sqlx connection's
//! handle, which an in-memory database's writes and hot reads use. A file's use connections of
//! the store's own instead ([`super::writer`], [`super::readers`]): lending wakes sqlx's worker.
//!
//! sqlx runs every SQLite statement on the connection's own worker thread: each statement is a
//! round trip between threads, two context switches. A batch's commit is five to ten statements
//! and an append group's about as many, so under live load much of the CPU went to switching
//! threads (measured: ~45 context switches per append, 60% of samples in the kernel). Here a
//! whole transaction runs its statements through rusqlite directly.

use std::fmt;

use rusqlite::types::{ToSqlOutput, Value, ValueRef};
use rusqlite::{Connection, TransactionBehavior};
use sqlx::error::{DatabaseError, ErrorKind};
use sqlx::SqlitePool;

/// A statement's arguments, borrowed where they can be.
pub(crate) type Args<'a> = Vec<ToSqlOutput<'a>>;

/// A text argument, or NULL.
pub(crate) fn text<'a>(value: impl Into<Option<&'a str>>) -> ToSqlOutput<'a> {
    match value.into() {
        Some(text) => ToSqlOutput::Borrowed(ValueRef::Text(text.as_bytes())),
        None => ToSqlOutput::Owned(Value::Null),
    }
}

/// An integer argument, or NULL.
pub(crate) fn int<'a>(value: impl Into<Option<i64>>) -> ToSqlOutput<'a> {
    value
        .into()
        .map_or(ToSqlOutput::Owned(Value::Null), ToSqlOutput::from)
}

/// Runs one statement (prepared once per transaction) with `args`; the rows it changed.
pub(crate) fn execute<E: DbError>(
    db: &Connection,
    sql: &str,
    args: &[ToSqlOutput<'_>],
    context: &str,
) -> Result<usize, E> {
    db.prepare_cached(sql)
        .and_then(|mut statement| statement.execute(rusqlite::params_from_iter(args)))
        .map_err(E::sqlite(context))
}

/// Runs the query `sql` (prepared once per connection) with `args`, handing each row to
/// `each`; the first error ends it.
pub(crate) fn for_each_row<E: DbError>(
    db: &Connection,
    sql: &str,
    args: impl rusqlite::Params,
    context: &str,
    mut each: impl FnMut(&rusqlite::Row<'_>) -> Result<(), E>,
) -> Result<(), E> {
    let mut statement = db.prepare_cached(sql).map_err(E::sqlite(context))?;
    let mut rows = statement.query(args).map_err(E::sqlite(context))?;
    while let Some(row) = rows.next().map_err(E::sqlite(context))? {
        each(row)?;
    }
    Ok(())
}

/// `rows` copies of `row` (`"(?, ?, 1)"`), for a multi-row `VALUES`.
pub(crate) fn values(row: &str, rows: usize) -> String {
    let mut sql = String::with_capacity((row.len() + 2) * rows);
    for i in 0..rows {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(row);
    }
    sql
}

/// `n` placeholders, comma-separated, for an `IN (…)` list.
pub(crate) fn placeholders(n: usize) -> String {
    values("?", n)
}

/// An error type that can say a database statement failed, and in what.
pub(crate) trait DbError {
    fn db(context: &str, source: sqlx::Error) -> Self;

    /// A statement on the lent handle failed.
    fn sqlite(context: &str) -> impl FnOnce(rusqlite::Error) -> Self
    where
        Self: Sized,
    {
        move |err| Self::db(context, as_sqlx(err))
    }
}

/// Runs `work` in one `BEGIN IMMEDIATE` transaction on `pool`'s connection and commits it:
/// the writes of an in-memory database, which the store cannot open a connection of its own
/// on (see [`super::writer`]). As [`transaction`] otherwise.
pub(crate) async fn immediate<R, E: DbError>(
    pool: &SqlitePool,
    heavy: bool,
    context: &str,
    work: impl FnOnce(&Connection) -> Result<R, E>,
) -> Result<R, E> {
    lend(pool, heavy, context, |db| transaction(db, context, work)).await
}

/// Runs `work` in one `BEGIN IMMEDIATE` transaction on `db` and commits it; rolled back if
/// `work` fails. `context` names the transaction in the errors of beginning and committing;
/// `work` names its own statements. `db` is left in autocommit mode if it can be: a failed
/// COMMIT can leave SQLite inside the transaction, and whoever uses the connection next (sqlx,
/// whose bookkeeping does not see transactions begun here) must not find it there.
pub(crate) fn transaction<R, E: DbError>(
    db: &mut Connection,
    context: &str,
    work: impl FnOnce(&Connection) -> Result<R, E>,
) -> Result<R, E> {
    let outcome = match db.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => match work(&tx) {
            Ok(value) => tx.commit().map(|()| value).map_err(E::sqlite(context)),
            Err(err) => {
                let _ = tx.rollback();
                Err(err)
            }
        },
        Err(e) => Err(E::sqlite(context)(e)),
    };
    if !db.is_autocommit() {
        let _ = db.execute_batch("ROLLBACK");
    }
    outcome
}

/// Runs `work`'s reads on one of `pool`'s connections, lent as in [`immediate`] but outside
/// any transaction (each statement reads one snapshot): the reads of an in-memory database,
/// which the store cannot open connections of its own on.
pub(crate) async fn read<R, E: DbError>(
    pool: &SqlitePool,
    heavy: bool,
    context: &str,
    work: impl FnOnce(&Connection) -> Result<R, E>,
) -> Result<R, E> {
    lend(pool, heavy, context, |db| work(db)).await
}

/// Lends `pool`'s connection's handle to `work` as a rusqlite connection, on this thread (off
/// the runtime's worker first when `heavy`). A handle given back inside a transaction it
/// cannot leave is replaced.
async fn lend<R, E: DbError>(
    pool: &SqlitePool,
    heavy: bool,
    context: &str,
    work: impl FnOnce(&mut Connection) -> Result<R, E>,
) -> Result<R, E> {
    let mut conn = pool.acquire().await.map_err(|e| E::db(context, e))?;
    let mut handle = conn.lock_handle().await.map_err(|e| E::db(context, e))?;
    let raw = handle.as_raw_handle().as_ptr();
    let run = || {
        // SAFETY: `raw` is the open connection sqlx lent us: its worker thread waits on the
        // handle's lock until `handle` drops, so nothing else uses it meanwhile, and it outlives
        // `db`. `from_handle` does not take ownership: dropping `db` does not close it.
        let mut db = match unsafe { Connection::from_handle(raw) } {
            Ok(db) => db,
            Err(e) => return (Err(E::sqlite(context)(e)), true),
        };
        let outcome = work(&mut db);
        (outcome, db.is_autocommit())
    };
    let (outcome, clean) = on_this_thread(heavy, run);
    drop(handle);
    if !clean {
        tracing::warn!(
            "replacing a database connection: a failed statement left it inside a \
             transaction it cannot leave"
        );
        conn.close_on_drop();
    }
    outcome
}

/// Runs `run` here; when `heavy`, off the runtime's worker first (`block_in_place`), so the
/// tasks queued on it are not held up behind a catch-up batch.
pub(crate) fn on_this_thread<R>(heavy: bool, run: impl FnOnce() -> R) -> R {
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|rt| rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if heavy && multi_thread {
        tokio::task::block_in_place(run)
    } else {
        run()
    }
}

/// How a write connection waits for SQLite's write lock while the other holds it (the store
/// has two: see [`super::writer`]): in steps of 100 µs, for about 10 s in all. SQLite's own
/// handler (`busy_timeout`) sleeps 1, 2, 5, 10… ms, far longer than either holds the lock.
pub(crate) fn wait_for_lock(tries: i32) -> bool {
    const STEP: std::time::Duration = std::time::Duration::from_micros(100);
    if tries >= 100_000 {
        return false;
    }
    std::thread::sleep(STEP);
    true
}

/// Makes one of sqlx's write connections wait for the lock as [`wait_for_lock`] does.
pub(crate) async fn wait_for_lock_on(conn: &mut sqlx::SqliteConnection) -> Result<(), sqlx::Error> {
    let mut handle = conn.lock_handle().await?;
    // SAFETY: as in `lend`: the handle is lent to us until `handle` drops, and `from_handle`
    // does not take ownership (dropping `db` leaves it open).
    let db =
        unsafe { Connection::from_handle(handle.as_raw_handle().as_ptr()) }.map_err(as_sqlx)?;
    db.busy_handler(Some(wait_for_lock)).map_err(as_sqlx)
}

/// rusqlite's error as sqlx's, so the store's and the outbox's error types (and everything
/// that matches on them: retries, answers) stay as they are.
pub(crate) fn as_sqlx(err: rusqlite::Error) -> sqlx::Error {
    sqlx::Error::Database(Box::new(SqliteError(err)))
}

/// rusqlite's error as a [`DatabaseError`].
#[derive(Debug)]
struct SqliteError(rusqlite::Error);

impl fmt::Display for SqliteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SqliteError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl DatabaseError for SqliteError {
    fn message(&self) -> &str {
        match &self.0 {
            rusqlite::Error::SqliteFailure(_, Some(message)) => message,
            _ => "SQLite error",
        }
    }

    fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
        match &self.0 {
            rusqlite::Error::SqliteFailure(e, _) => Some(e.extended_code.to_string().into()),
            _ => None,
        }
    }

    fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self
    }

    fn kind(&self) -> ErrorKind {
        match &self.0 {
            rusqlite::Error::SqliteFailure(e, _) => match e.extended_code {
                rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                | rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY => ErrorKind::UniqueViolation,
                rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY => ErrorKind::ForeignKeyViolation,
                rusqlite::ffi::SQLITE_CONSTRAINT_NOTNULL => ErrorKind::NotNullViolation,
                rusqlite::ffi::SQLITE_CONSTRAINT_CHECK => ErrorKind::CheckViolation,
                _ => ErrorKind::Other,
            },
            _ => ErrorKind::Other,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};

    /// A store error for the tests: its context and its source, as text.
    #[derive(Debug)]
    pub(crate) struct Failed(pub(crate) String);

    impl DbError for Failed {
        fn db(context: &str, source: sqlx::Error) -> Self {
            Self(format!("{context}: {source}"))
        }
    }

    /// A fresh WAL database file with a table `t (x INTEGER PRIMARY KEY, side TEXT)`, and sqlx's
    /// write connection on it set up as the store's.
    pub(crate) async fn wal_file() -> (std::path::PathBuf, SqlitePool) {
        let dir = std::env::temp_dir().join(format!("projector-sqlite-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.db");
        let options = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .after_connect(|conn, _| Box::pin(wait_for_lock_on(conn)))
            .connect_with(options)
            .await
            .unwrap();
        sqlx::query("CREATE TABLE t (x INTEGER PRIMARY KEY, side TEXT)")
            .execute(&pool)
            .await
            .unwrap();
        (path, pool)
    }

    async fn count(pool: &SqlitePool) -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM t")
            .fetch_one(pool)
            .await
            .unwrap()
    }

    /// What a failed transaction wrote is rolled back, its error names the statement, and the
    /// connection goes back to sqlx usable: its own transactions and the next lent one work.
    #[tokio::test]
    async fn a_failed_transaction_leaves_nothing_and_the_connection_usable() {
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .unwrap();
        sqlx::query("CREATE TABLE t (x INTEGER PRIMARY KEY)")
            .execute(&pool)
            .await
            .unwrap();
        let err = immediate(&pool, false, "test", |db| {
            execute::<Failed>(db, "INSERT INTO t VALUES (?)", &[int(1)], "first insert")?;
            execute::<Failed>(db, "INSERT INTO t VALUES (?)", &[int(1)], "second insert")
        })
        .await
        .unwrap_err();
        assert!(err.0.starts_with("second insert: "), "{err:?}");
        assert!(err.0.contains("UNIQUE"), "{err:?}");
        assert_eq!(count(&pool).await, 0, "the first insert is rolled back");
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("INSERT INTO t VALUES (2)")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let changed = immediate(&pool, false, "test", |db| {
            execute::<Failed>(db, "INSERT INTO t VALUES (?)", &[int(3)], "insert")
        })
        .await
        .unwrap();
        assert_eq!((changed, count(&pool).await), (1, 2));
    }

    #[test]
    fn values_repeat_the_row() {
        assert_eq!(values("(?, 1)", 3), "(?, 1), (?, 1), (?, 1)");
        assert_eq!(placeholders(2), "?, ?");
    }
}
