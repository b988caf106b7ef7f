//! Write transactions on the hot path (an append group, a batch's commit, a Kafka batch taken
//! into the outbox) run on a write connection the store opens itself, on the calling thread.
//!
//! Lending sqlx's write connection ([`super::lent`]) wakes its worker thread twice a
//! transaction, and under live load there are two such transactions an append. sqlx keeps its
//! own write connection for the rest (the catalog, statuses, observers' logs): SQLite lets one
//! of the two write at a time, and every transaction on either takes the write lock before it
//! reads (`BEGIN IMMEDIATE`, or one statement), so neither can find its snapshot stale; one
//! that finds the lock taken waits for it, in short steps ([`lent::wait_for_lock`]).

use std::path::{Path, PathBuf};

use rusqlite::Connection;
use sqlx::SqlitePool;

use super::lent::{self, DbError};

pub(crate) struct Writer {
    from: From,
}

enum From {
    File(PathBuf, tokio::sync::Mutex<Slot>),
    /// An in-memory database is private to sqlx's connections: its writes are lent.
    Lent(SqlitePool),
}

enum Slot {
    Open(Connection),
    /// A failure left the connection inside a transaction: the next write opens another.
    Dropped,
    Closed,
}

impl Writer {
    /// The write connection on the file at `path`, opened now (on the file this process opened,
    /// even if its path comes to name another).
    pub(crate) fn open(path: PathBuf) -> rusqlite::Result<Self> {
        let db = open(&path)?;
        Ok(Self {
            from: From::File(path, tokio::sync::Mutex::new(Slot::Open(db))),
        })
    }

    /// Writes lent from `pool` (an in-memory database).
    pub(crate) fn lent(pool: SqlitePool) -> Self {
        Self {
            from: From::Lent(pool),
        }
    }

    /// Runs `work` in one `BEGIN IMMEDIATE` transaction and commits it (see
    /// [`lent::transaction`]), on this thread: off the runtime's worker first when `heavy` (a
    /// catch-up batch), so reads are not held up behind it. Transactions run one at a time, in
    /// the order they asked.
    pub(crate) async fn immediate<R, E: DbError>(
        &self,
        heavy: bool,
        context: &str,
        work: impl FnOnce(&Connection) -> Result<R, E>,
    ) -> Result<R, E> {
        let (path, slot) = match &self.from {
            From::File(path, slot) => (path, slot),
            From::Lent(pool) => return lent::immediate(pool, heavy, context, work).await,
        };
        // The tasks ready on this worker go first (the runner's read of its next batch, the
        // requests that join the next append group): a transaction here holds the thread until
        // it commits. Without it, catch-up and bulk appends ran 10–15% slower (measured).
        tokio::task::yield_now().await;
        let mut slot = slot.lock().await;
        if let Slot::Dropped = *slot {
            *slot = Slot::Open(open(path).map_err(E::sqlite(context))?);
        }
        let Slot::Open(db) = &mut *slot else {
            return Err(E::db(context, sqlx::Error::PoolClosed));
        };
        let (outcome, clean) = lent::on_this_thread(heavy, || {
            let outcome = lent::transaction(db, context, work);
            (outcome, db.is_autocommit())
        });
        if !clean {
            tracing::warn!(
                "replacing the database's write connection: a failed write left it inside a \
                 transaction it cannot leave"
            );
            *slot = Slot::Dropped;
        }
        outcome
    }

    /// Closes the connection; writes from now on fail.
    pub(crate) async fn close(&self) {
        if let From::File(_, slot) = &self.from {
            *slot.lock().await = Slot::Closed;
        }
    }
}

/// A write connection set up as sqlx's (see `Sqlite::open`): sqlx's defaults enforce foreign
/// keys; the WAL is folded by the store's checkpointer, not by a commit.
fn open(path: &Path) -> rusqlite::Result<Connection> {
    let db = Connection::open(path)?;
    db.busy_handler(Some(lent::wait_for_lock))?;
    db.execute_batch(
        "PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL; PRAGMA cache_size = -65536; \
         PRAGMA temp_store = memory; PRAGMA wal_autocheckpoint = 0",
    )?;
    Ok(db)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::lent::tests::{wal_file, Failed};

    /// A WAL database with sqlx's write connection set up as the store's, and our writer.
    async fn database() -> (SqlitePool, Writer) {
        let (path, pool) = wal_file().await;
        (pool, Writer::open(path).unwrap())
    }

    async fn count(pool: &SqlitePool, side: &str) -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM t WHERE side = ?")
            .bind(side)
            .fetch_one(pool)
            .await
            .unwrap()
    }

    /// Both write connections write at once, each transaction reading before it writes: every
    /// one commits (the loser of the lock waits for it, none fails as busy), nothing is lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn both_write_connections_write_at_once_and_every_transaction_commits() {
        let (pool, writer) = database().await;
        let writer = std::sync::Arc::new(writer);
        let ours = {
            let writer = writer.clone();
            tokio::spawn(async move {
                for _ in 0..300 {
                    writer
                        .immediate(false, "ours", |db| {
                            let next: i64 = db
                                .query_row("SELECT COALESCE(MAX(x), 0) + 1 FROM t", [], |r| {
                                    r.get(0)
                                })
                                .map_err(Failed::sqlite("reading"))?;
                            lent::execute::<Failed>(
                                db,
                                "INSERT INTO t VALUES (?, 'ours')",
                                &[lent::int(next)],
                                "inserting",
                            )
                        })
                        .await
                        .unwrap();
                }
            })
        };
        let theirs = {
            let pool = pool.clone();
            tokio::spawn(async move {
                for _ in 0..300 {
                    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.unwrap();
                    let next: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(x), 0) + 1 FROM t")
                        .fetch_one(&mut *tx)
                        .await
                        .unwrap();
                    sqlx::query("INSERT INTO t VALUES (?, 'theirs')")
                        .bind(next)
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    tx.commit().await.unwrap();
                }
            })
        };
        ours.await.unwrap();
        theirs.await.unwrap();
        assert_eq!(
            (count(&pool, "ours").await, count(&pool, "theirs").await),
            (300, 300)
        );
    }

    /// A transaction whose work fails leaves nothing; the writer goes on; once closed, it
    /// refuses, naming what was asked.
    #[tokio::test]
    async fn a_failed_transaction_leaves_nothing_and_a_closed_writer_refuses() {
        let (pool, writer) = database().await;
        let err = writer
            .immediate(false, "test", |db| {
                lent::execute::<Failed>(db, "INSERT INTO t VALUES (1, 'ours')", &[], "first")?;
                lent::execute::<Failed>(db, "INSERT INTO t VALUES (1, 'ours')", &[], "second")
            })
            .await
            .unwrap_err();
        assert!(err.0.starts_with("second: "), "{err:?}");
        assert_eq!(
            count(&pool, "ours").await,
            0,
            "the first insert is rolled back"
        );
        writer
            .immediate(false, "test", |db| {
                lent::execute::<Failed>(db, "INSERT INTO t VALUES (2, 'ours')", &[], "insert")
            })
            .await
            .unwrap();
        assert_eq!(count(&pool, "ours").await, 1);
        writer.close().await;
        let closed = writer
            .immediate(false, "after close", |_| Ok::<_, Failed>(()))
            .await
            .unwrap_err();
        assert!(closed.0.starts_with("after close: "), "{closed:?}");
    }
}
