//! The hot reads (a runner's outbox read, a document by key) run on read connections the store
//! opens itself, on the calling thread, with no thread to wake.
//!
//! A read through sqlx, or on a handle lent from it ([`super::lent`]), wakes the connection's
//! worker thread: a command down a channel, the worker parking on the handle's lock, then
//! waking again when the handle is given back. Under live load every append is read twice (by
//! the runner, then by the client's `wait_for` read of its document), and those wake-ups, with
//! the parking of tokio's workers they cause, were the largest share of the server's CPU. A WAL
//! database serves readers beside its writer, so these reads need no one else's thread.

use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use sqlx::SqlitePool;
use tokio::sync::Semaphore;

use super::lent::{self, DbError};

/// Read connections on one database file, at most `max` at once.
pub(crate) struct Readers {
    from: From,
    /// The connections not in use; one per permit left.
    idle: Mutex<Vec<Connection>>,
    permits: Semaphore,
}

enum From {
    File(PathBuf),
    /// An in-memory database is private to the connections sqlx opened on it: its reads are
    /// lent from sqlx's read pool.
    Lent(SqlitePool),
}

impl Readers {
    /// `max` connections on the file at `path`, opened now: they stay on the file this process
    /// opened even if its path comes to name another.
    pub(crate) fn open(path: PathBuf, max: usize) -> rusqlite::Result<Self> {
        let idle = (0..max)
            .map(|_| open(&path))
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(Self {
            from: From::File(path),
            idle: Mutex::new(idle),
            permits: Semaphore::new(max),
        })
    }

    /// Reads lent from `pool` (an in-memory database).
    pub(crate) fn lent(pool: SqlitePool) -> Self {
        Self {
            from: From::Lent(pool),
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(Semaphore::MAX_PERMITS),
        }
    }

    /// Runs `work`'s reads on one of the connections, on this thread (off the runtime's worker
    /// first when `heavy`). Outside any transaction: each statement reads one snapshot.
    pub(crate) async fn read<R, E: DbError>(
        &self,
        heavy: bool,
        context: &str,
        work: impl FnOnce(&Connection) -> Result<R, E>,
    ) -> Result<R, E> {
        let path = match &self.from {
            From::File(path) => path,
            From::Lent(pool) => return lent::read(pool, heavy, context, work).await,
        };
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| E::db(context, sqlx::Error::PoolClosed))?;
        let taken = self.idle().pop();
        // None idle under a permit: a read panicked with it. Its place is taken by a new one.
        let db = match taken {
            Some(db) => db,
            None => open(path).map_err(E::sqlite(context))?,
        };
        let outcome = lent::on_this_thread(heavy, || work(&db));
        self.idle().push(db);
        outcome
    }

    /// Closes the connections; reads from now on fail.
    pub(crate) fn close(&self) {
        self.permits.close();
        self.idle().clear();
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Connection>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A read-only connection set up as sqlx's are (see `Sqlite::open`).
fn open(path: &PathBuf) -> rusqlite::Result<Connection> {
    let db = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    db.busy_timeout(Duration::from_secs(10))?;
    db.execute_batch("PRAGMA cache_size = -65536; PRAGMA temp_store = memory")?;
    Ok(db)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::lent::tests::{wal_file, Failed};

    /// A WAL database written through sqlx, and `n` readers of our own on its file.
    async fn database(n: usize) -> (SqlitePool, Readers) {
        let (path, pool) = wal_file().await;
        (pool, Readers::open(path, n).unwrap())
    }

    async fn count(readers: &Readers) -> i64 {
        readers
            .read(false, "counting", |db| {
                db.query_row("SELECT COUNT(*) FROM t", [], |row| row.get(0))
                    .map_err(Failed::sqlite("counting"))
            })
            .await
            .unwrap()
    }

    /// A read sees every commit made before it and nothing of a transaction still open.
    #[tokio::test]
    async fn a_read_sees_what_was_committed_and_nothing_uncommitted() {
        let (pool, readers) = database(2).await;
        sqlx::query("INSERT INTO t (x) VALUES (1), (2)")
            .execute(&pool)
            .await
            .unwrap();
        assert_eq!(count(&readers).await, 2);
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("INSERT INTO t (x) VALUES (3)")
            .execute(&mut *tx)
            .await
            .unwrap();
        assert_eq!(count(&readers).await, 2, "an open transaction is not seen");
        tx.commit().await.unwrap();
        assert_eq!(count(&readers).await, 3);
    }

    /// A read that panics loses its connection, not a place: the next reads (as many at once
    /// as before) get a new one. A failed statement names what was read.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_that_panics_or_fails_leaves_the_readers_usable() {
        let (_pool, readers) = database(1).await;
        let readers = std::sync::Arc::new(readers);
        let panicking = readers.clone();
        let panicked = tokio::spawn(async move {
            panicking
                .read::<(), Failed>(false, "panicking", |_| panic!("a bug in a read"))
                .await
        })
        .await;
        assert!(panicked.is_err(), "the read panicked");
        assert_eq!(count(&readers).await, 0);
        let err = readers
            .read(true, "reading u", |db| {
                db.query_row("SELECT COUNT(*) FROM u", [], |row| row.get::<_, i64>(0))
                    .map_err(Failed::sqlite("reading u"))
            })
            .await
            .unwrap_err();
        assert!(err.0.starts_with("reading u: "), "{err:?}");
        assert!(err.0.contains("no such table"), "{err:?}");
        assert_eq!(count(&readers).await, 0);
        readers.close();
        let closed = readers
            .read(false, "after close", |_| Ok::<_, Failed>(()))
            .await
            .unwrap_err();
        assert!(closed.0.starts_with("after close: "), "{closed:?}");
    }
}
