//! The application's outbox table on PostgreSQL, read directly: no CDC, no broker.
//!
//! # Positions, and why no late-committing row is ever skipped
//!
//! A sequence or identity column does not order an outbox: transaction T1 takes id 10, T2
//! takes id 11 and commits first, a reader passes 11, then T1 commits 10 behind it and the row
//! is never read. projector therefore orders rows by the transaction that wrote them and reads
//! only what no running transaction can still add to. A `BEFORE INSERT` trigger sets each
//! row's position to `xid8 << 20 | n`, where `xid8` is the writing transaction's 64-bit
//! top-level id (`pg_current_xact_id()`) and `n` counts the rows that transaction has
//! inserted (1, 2, ...), so positions follow the transaction id, then insertion order within
//! it. Readers read positions below `bound << 20`, where `bound` is the *watermark*.
//!
//! # The watermark: the oldest transaction that can still write this outbox
//!
//! Only a session connected to the outbox's database can write to it (a prepared transaction
//! keeps the database of the session that prepared it). A transaction can hold an id long
//! before it inserts its outbox row (it writes `accounts` first, or calls
//! `pg_current_xact_id()`), so every transaction of the database that has an id counts, not
//! only those that have touched the table yet. The watcher computes, in one statement (the
//! `bound` statement),
//!
//! ```text
//! bound = min( X,                       -- pg_snapshot_xmax of the statement's snapshot
//!              backend_xid of each session of this database (pg_stat_activity),
//!              transaction of each prepared transaction of this database )
//! ```
//!
//! with the 32-bit ids widened against `X` (an id within 2^31 before `X` is `X` minus the
//! distance; one at or after `X` cannot lower the bound). Then, in a *later* statement, it
//! reads the head below `bound`, and readers read below the newest bound. Why nothing is
//! skipped: `X` is the snapshot's xmax (latest completed id + 1), taken when the statement
//! starts, and the sessions are read while it runs, after that. Take a transaction `t` with id
//! `x < bound` that writes this outbox. `x < X`, so `x` was assigned before the snapshot (some
//! id at or after `x` had already completed, and ids are handed out in order), and a session
//! publishes its id (`PGPROC.xid`) before releasing the lock that assigns it. So when the
//! sessions are read, `t` is either running and seen (then `bound <= x`: a contradiction), or
//! prepared and seen in the prepared list, read after the sessions (a transaction being
//! prepared is in the prepared list before it leaves its session, so it is in one of the two
//! reads), or already finished: then every row it wrote is visible to the later statement that
//! reads rows, and no row can ever appear below `x << 20` again. Any transaction that gets its
//! id after the snapshot gets one at or above `X >= bound`. A bound once computed stays valid
//! (later ids are all higher), so readers keep the highest one seen.
//!
//! The cluster-wide rule stays as a floor that costs nothing: each read and head statement
//! also takes its own snapshot's xmin (every transaction below it has finished, and later ones
//! get larger ids) and reads below the greater of the two. So the common path is one
//! statement, as it always was; the watcher runs the `bound` statement (then reads the head
//! again) only when committed rows wait and the head did not move, that is when an open
//! transaction holds the cluster's xmin: within a round trip it sees through a transaction of
//! another database, or names the one of this database that holds the rows back.
//!
//! Consequences: an open transaction in another database of the cluster never holds
//! projections back; one in this database holds them (committed rows wait, the watermark is
//! *held*) for as long as it is open, whatever it wrote first. `backend_xid` and `datid` are
//! visible to every role (unlike the session's start, state and query, which need
//! `pg_read_all_stats`), so the rule needs no privilege; when a session's entry cannot be read
//! at all (`<backend information not available>`), or when reading a standby (whose
//! `pg_stat_activity` does not show the primary's sessions), the watermark falls back to the
//! snapshot's xmin: the oldest transaction of the whole cluster. The statements run outside
//! any explicit transaction, so each reads `pg_stat_activity` fresh (it is cached per
//! transaction).
//!
//! A hold is reported: `projector_watermark_held_seconds`, the holder (id, pid, age, database,
//! application) in `GET /projections`, and past `outbox.watermark_warn_ms` a warning in the
//! log and a 503 from `/readyz`. The watcher re-reads the watermark every few milliseconds
//! while it is held. Positions are sparse tokens, not counts. A transaction may insert at most
//! 2^20 - 1 outbox rows, and transaction ids must stay below 2^43 (8.8 trillion).
//!
//! Rows are announced by `NOTIFY` (a statement trigger, and the append path), with a slow poll
//! for writers that bypass both.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgListener, PgRow};
use sqlx::Row;
use tokio::sync::{watch, Notify};

use super::group::{Appends, Request};
use super::{validate, AppendError, Appended, NewEvent, Placed, Source, SourceError};
use crate::config::OutboxConfig;
use crate::consistency::StreamVersion;
use crate::event::Event;
use crate::metrics::{Watermark, WatermarkHold, WatermarkHolder};
use crate::store::postgres::Postgres;

/// Bits of a position that count rows within one transaction.
const ROW_BITS: u32 = 20;

/// First and longest pause before re-reading a watermark held back by an open transaction.
const HELD_FIRST: Duration = Duration::from_millis(2);
const HELD_MAX: Duration = Duration::from_millis(100);

/// In an append's INSERT: names this instance (`$8`, its tag) as the transaction's origin, for
/// the notify trigger's payload. The instance's own listener then skips the echo of its own
/// appends (their rows already woke the watcher), which would cost a head read each.
const ORIGIN: &str = "set_config('projector.origin', $8::text, true) <> ''";

/// Shortest pause between two warnings about one hold.
const WARN_EVERY: Duration = Duration::from_secs(30);

/// Tries of an append that keeps losing races for its streams' next versions.
const MAX_APPEND_ATTEMPTS: u64 = 20;

/// Outbox DDL takes the store's lock: instances starting together do not race.
use crate::store::postgres::DDL_LOCK;

fn db_err(context: &str) -> impl FnOnce(sqlx::Error) -> SourceError + '_ {
    move |source| SourceError::Database {
        context: context.to_owned(),
        source,
    }
}

/// `"name"`, or `"schema"."name"`.
fn quote(name: &str) -> String {
    name.split('.')
        .map(|part| format!("\"{part}\""))
        .collect::<Vec<_>>()
        .join(".")
}

/// The statements, built once from the configured names and the columns the table has.
struct Statements {
    /// Rows after `$1` and below the position limit `$3`.
    read: String,
    /// The same read, packed by PostgreSQL into one JSON array.
    read_packed: String,
    /// The watermark and what holds it (see the module docs); no parameters.
    bound: String,
    /// The newest position below the limit `$1`, and the newest committed one.
    head: String,
    position_of: Option<String>,
    /// The position of an event by its id (`$1`, text).
    position_of_event: String,
    /// Whether the id column is a `uuid` (an id that is not one is then nowhere).
    uuid_ids: bool,
    /// Where the events of a range landed; `None` without versions or when the stream column
    /// does not compare as text (uuid, citext...): a stream asked in another spelling would
    /// be missed.
    placed_between: Option<String>,
    positions_of: Option<String>,
    version_at: Option<String>,
    versions: Option<String>,
    existing_ids: String,
    insert: String,
    /// Takes the advisory locks of a set of streams, in one global order.
    lock_streams: String,
    has_version: bool,
}

pub struct PgOutbox {
    db: Postgres,
    sql: Arc<Statements>,
    channel: String,
    head: Arc<watch::Sender<u64>>,
    /// Readers read positions below this: the newest watermark seen, `<< ROW_BITS`. Only ever
    /// raised (a watermark once computed stays valid).
    limit: Arc<AtomicU64>,
    watermark: Arc<Watermark>,
    /// Wakes the head watcher (after this instance's own appends).
    wake: Arc<Notify>,
    /// Group commit: see [`write`].
    appends: Appends,
    /// The payload of this instance's notifications, which its own listener passes over.
    tag: String,
    /// Dropped with the outbox: its watcher and listener then end and free their connections.
    _closed: watch::Sender<()>,
}

impl PgOutbox {
    pub(crate) fn db(&self) -> &Postgres {
        &self.db
    }

    /// Prepares the outbox table (creating it, or adding the position column and triggers to
    /// an existing one) and starts watching it.
    pub async fn open(db: Postgres, config: &OutboxConfig) -> Result<Self, SourceError> {
        let columns = prepare(&db, config).await?;
        let (database_oid, role): (i64, String) = sqlx::query_as(
            "SELECT oid::bigint, current_user::text FROM pg_database \
             WHERE datname = current_database()",
        )
        .fetch_one(&db.pool)
        .await
        .map_err(db_err("reading the outbox database's id"))?;
        let sql = statements(config, &columns, database_oid);
        let channel = channel_name(&config.table);
        let limit = Arc::new(AtomicU64::new(0));
        let head = Arc::new(watch::Sender::new(0));
        refresh(&db, &sql.bound, &sql.head, &limit, &head).await?;
        let sql = Arc::new(sql);
        let tag = uuid::Uuid::new_v4().to_string();
        let wake = Arc::new(Notify::new());
        let announce = (!config.notify_trigger).then(|| Arc::new(Notify::new()));
        let appender = Arc::new(Appender {
            sql: sql.clone(),
            wake: wake.clone(),
            db: db.clone(),
            announce: announce.clone(),
            origin: tag.clone(),
        });
        let appends = Appends::start(move |group| {
            let appender = appender.clone();
            async move { write(&appender, group).await }
        });
        let outbox = Self {
            db,
            sql,
            channel,
            head,
            limit,
            watermark: Arc::new(Watermark::new(Duration::from_millis(
                config.watermark_warn_ms,
            ))),
            wake,
            appends,
            tag,
            _closed: watch::Sender::new(()),
        };
        outbox.watch(Duration::from_millis(config.poll_interval_ms), role);
        if let Some(announce) = announce {
            outbox.announce(announce);
        }
        Ok(outbox)
    }

    /// Tells the other instances of appends (when no trigger does): one notification for
    /// whatever appends were made since the last one went out, sent beside the appends rather
    /// than in their round trips, so an append is answered (and this instance's projections
    /// woken) without waiting for it.
    fn announce(&self, appended: Arc<Notify>) {
        let (db, channel, own) = (self.db.clone(), self.channel.clone(), self.tag.clone());
        let mut closed = self._closed.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = appended.notified() => {}
                    _ = closed.changed() => break,
                }
                if let Err(err) = sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(&channel)
                    .bind(&own)
                    .execute(&db.pool)
                    .await
                {
                    tracing::warn!(error = %err, "notifying other instances of an append failed");
                }
            }
        });
    }

    /// Keeps `head` at the newest safe position: on every notification, on a slow poll, and
    /// every few milliseconds while committed rows wait behind an open transaction; and keeps
    /// the watermark's hold up to date.
    fn watch(&self, poll: Duration, role: String) {
        let notified = self.wake.clone();
        let head = Arc::downgrade(&self.head);
        let listening = listen(
            self.db.clone(),
            self.channel.clone(),
            self.tag.clone(),
            notified.clone(),
        );
        let mut closed = self._closed.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                _ = listening => {}
                _ = closed.changed() => {}
            }
        });
        let mut closed = self._closed.subscribe();
        let db = self.db.clone();
        let (bound_sql, head_sql) = (self.sql.bound.clone(), self.sql.head.clone());
        let limit = self.limit.clone();
        let mut holds = Holds::new(self.watermark.clone(), role);
        tokio::spawn(async move {
            let mut held: Option<Duration> = None;
            loop {
                let wait = held.unwrap_or(poll);
                tokio::select! {
                    _ = notified.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                    _ = closed.changed() => break,
                }
                let Some(sender) = head.upgrade() else { break };
                match refresh(&db, &bound_sql, &head_sql, &limit, &sender).await {
                    Ok((bound, h, advanced)) => {
                        if h.committed > h.safe {
                            // Short waits while the watermark moves (this instance's own
                            // commits hold it for a moment); longer ones while it is stuck.
                            held = Some(match held {
                                Some(d) if !advanced => (d * 2).min(HELD_MAX),
                                _ => HELD_FIRST,
                            });
                        } else {
                            held = None;
                        }
                        holds.update(bound.as_ref(), &h);
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "reading the outbox head failed");
                        held = None;
                    }
                }
            }
        });
    }
}

/// Forwards notifications on `channel` to `notified`, except this instance's own (payload
/// `own`: its appends wake the watcher directly); reconnects on its own after an outage (and
/// then wakes the watcher, since notifications may have been missed).
async fn listen(db: Postgres, channel: String, own: String, notified: Arc<Notify>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut listener = match PgListener::connect_with(&db.pool).await {
            Ok(listener) => listener,
            Err(err) => {
                tracing::warn!(error = %err, "cannot LISTEN for outbox notifications; polling meanwhile");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        if let Err(err) = listener.listen(&channel).await {
            tracing::warn!(error = %err, "cannot LISTEN for outbox notifications; polling meanwhile");
            tokio::time::sleep(backoff).await;
            continue;
        }
        backoff = Duration::from_millis(100);
        notified.notify_one();
        loop {
            // `try_recv` returns None when the connection drops; the next call reconnects.
            match listener.try_recv().await {
                Ok(Some(n)) if n.payload() == own => {}
                Ok(Some(_)) => notified.notify_one(),
                Ok(None) => {
                    tracing::warn!("outbox notification connection lost; reconnecting");
                    notified.notify_one();
                }
                Err(err) => {
                    tracing::warn!(error = %err, "outbox notifications failed; reconnecting");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    break;
                }
            }
        }
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

struct Head {
    /// The newest position no open transaction can add below.
    safe: u64,
    /// The newest committed position (above `safe` while an older transaction is open).
    committed: u64,
    /// The position limit `safe` was read below: the watermark `<< ROW_BITS`.
    limit: u64,
}

/// The watermark, and the oldest open transaction that can still write the outbox.
struct Bound {
    /// A transaction id: every transaction below it that can write the outbox has ended.
    xid: u64,
    /// The cluster-wide rule was used (a session's entry was unreadable, or a standby).
    cluster_wide: bool,
    holder: Option<Holder>,
}

/// An open transaction below the snapshot's xmax, as `bound` reads it.
struct Holder {
    xid: u64,
    pid: Option<i32>,
    prepared_gid: Option<String>,
    database: Option<String>,
    application_name: Option<String>,
    /// Milliseconds since it began, when visible.
    age_ms: Option<i64>,
    details_hidden: bool,
}

/// Reads the head below the watermark, and sends it. The head statement takes the greater of
/// the cluster-wide rule (its own snapshot's xmin: one statement, one round trip) and the
/// narrow bound computed before (`limit`). Only when committed rows wait and the head did not
/// move does the watcher compute the narrow bound (a statement of its own, before a second
/// head read, see the module docs), so the common path costs what it always did, and a hold
/// by another database's transaction is seen through within one round of the watcher.
async fn refresh(
    db: &Postgres,
    bound_sql: &str,
    head_sql: &str,
    limit: &AtomicU64,
    sender: &watch::Sender<u64>,
) -> Result<(Option<Bound>, Head, bool), SourceError> {
    let mut head = read_head(db, head_sql, limit.load(Ordering::SeqCst)).await?;
    let mut advanced = sender.send_if_modified(|p| raise(p, head.safe));
    let mut bound = None;
    if head.committed > head.safe && !advanced {
        let narrow = read_bound(db, bound_sql).await?;
        let before = limit.fetch_max(narrow.xid << ROW_BITS, Ordering::SeqCst);
        if narrow.xid << ROW_BITS > before.max(head.limit) {
            head = read_head(db, head_sql, limit.load(Ordering::SeqCst)).await?;
            advanced = sender.send_if_modified(|p| raise(p, head.safe));
        }
        bound = Some(narrow);
    }
    Ok((bound, head, advanced))
}

async fn read_bound(db: &Postgres, sql: &str) -> Result<Bound, SourceError> {
    let err = db_err("reading the outbox watermark");
    let row = sqlx::query(sql).fetch_one(&db.pool).await.map_err(err)?;
    let err = || db_err("reading the outbox watermark");
    let next: i64 = row.try_get(0).map_err(err())?;
    let oldest: i64 = row.try_get(1).map_err(err())?;
    let cluster_wide: bool = row.try_get(2).map_err(err())?;
    let session = match row.try_get::<Option<i64>, _>(3).map_err(err())? {
        Some(xid) => Some(Holder {
            xid: xid as u64,
            pid: row.try_get(4).map_err(err())?,
            prepared_gid: None,
            age_ms: row.try_get(5).map_err(err())?,
            application_name: row.try_get(6).map_err(err())?,
            details_hidden: row
                .try_get::<Option<bool>, _>(7)
                .map_err(err())?
                .unwrap_or(false),
            database: row.try_get(8).map_err(err())?,
        }),
        None => None,
    };
    let prepared = match row.try_get::<Option<i64>, _>(9).map_err(err())? {
        Some(xid) => Some(Holder {
            xid: xid as u64,
            pid: None,
            prepared_gid: row.try_get(10).map_err(err())?,
            age_ms: row.try_get(11).map_err(err())?,
            application_name: None,
            details_hidden: false,
            database: row.try_get(12).map_err(err())?,
        }),
        None => None,
    };
    let holder = match (session, prepared) {
        (Some(s), Some(p)) => Some(if p.xid < s.xid { p } else { s }),
        (s, p) => s.or(p),
    };
    let narrow = holder
        .as_ref()
        .map_or(next as u64, |h| h.xid.min(next as u64));
    Ok(Bound {
        xid: if cluster_wide { oldest as u64 } else { narrow },
        cluster_wide,
        holder,
    })
}

async fn read_head(db: &Postgres, sql: &str, below: u64) -> Result<Head, SourceError> {
    let row = sqlx::query(sql)
        .bind(below as i64)
        .fetch_one(&db.pool)
        .await
        .map_err(db_err("reading the outbox head"))?;
    let get = |i: usize| -> Result<i64, SourceError> {
        row.try_get::<Option<i64>, _>(i)
            .map(Option::unwrap_or_default)
            .map_err(db_err("reading the outbox head"))
    };
    Ok(Head {
        safe: get(0)? as u64,
        committed: get(1)? as u64,
        limit: get(2)? as u64,
    })
}

/// Follows the watermark's holds for the watcher: publishes them, and warns about long ones.
struct Holds {
    watermark: Arc<Watermark>,
    role: String,
    /// The limit at the last check: a hold starts over when the watermark moves.
    last_limit: u64,
    since: Option<Instant>,
    /// The holder seen last, and when it was first seen (its age when its start is hidden).
    seen: Option<(u64, Instant)>,
    warned: Option<Instant>,
    hinted_privileges: bool,
    hinted_cluster_wide: bool,
}

impl Holds {
    fn new(watermark: Arc<Watermark>, role: String) -> Self {
        Self {
            watermark,
            role,
            last_limit: 0,
            since: None,
            seen: None,
            warned: None,
            hinted_privileges: false,
            hinted_cluster_wide: false,
        }
    }

    /// After a check: `bound` when the narrow watermark was read in it (only while held).
    fn update(&mut self, bound: Option<&Bound>, head: &Head) {
        let now = Instant::now();
        let moved = head.limit > self.last_limit;
        self.last_limit = self.last_limit.max(head.limit);
        if bound.is_some_and(|b| b.cluster_wide) && !self.hinted_cluster_wide {
            self.hinted_cluster_wide = true;
            tracing::warn!(
                "the outbox reader cannot see every session of the database (an entry of \
                 pg_stat_activity is unreadable, or this is a standby): projections wait for \
                 every open transaction of the cluster"
            );
        }
        if head.committed <= head.safe {
            self.since = None;
            self.seen = None;
            self.warned = None;
            self.watermark.set(None);
            return;
        }
        // Under load the watermark is held for a moment at nearly every check, but moves:
        // a hold is measured from the last time it moved.
        let since = match self.since {
            Some(since) if !moved => since,
            _ => now,
        };
        self.since = Some(since);
        let Some(bound) = bound else {
            // Not read this time (the head moved): the holder named before, if the hold
            // goes on without the watermark moving.
            let holder = self
                .watermark
                .hold()
                .filter(|_| !moved)
                .and_then(|h| h.holder);
            self.watermark.set(Some(WatermarkHold {
                since,
                safe_position: head.safe,
                committed_position: head.committed,
                holder,
            }));
            return;
        };
        let holder = bound.holder.as_ref().map(|h| {
            let first_seen = match self.seen {
                Some((xid, at)) if xid == h.xid => at,
                _ => now,
            };
            self.seen = Some((h.xid, first_seen));
            if h.details_hidden && !self.hinted_privileges {
                self.hinted_privileges = true;
                tracing::warn!(
                    role = %self.role,
                    holder_xid = h.xid,
                    holder_pid = h.pid,
                    "an open transaction holds the outbox watermark, and its start, state and \
                     query are hidden from projector's role: GRANT pg_read_all_stats TO {} to \
                     see them (the watermark is narrowed to this database either way)",
                    self.role
                );
            }
            let started = match h.age_ms {
                Some(ms) => now
                    .checked_sub(Duration::from_millis(ms.max(0) as u64))
                    .unwrap_or(first_seen),
                None => first_seen,
            };
            WatermarkHolder {
                xid: h.xid,
                pid: h.pid,
                prepared_gid: h.prepared_gid.clone(),
                database: h.database.clone(),
                application_name: h.application_name.clone(),
                started,
                details_hidden: h.details_hidden,
            }
        });
        let hold = WatermarkHold {
            since,
            safe_position: head.safe,
            committed_position: head.committed,
            holder,
        };
        let warn_after = self.watermark.warn_after;
        if hold.is_stale(warn_after) && self.warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            self.warned = Some(now);
            self.warn(&hold);
        }
        self.watermark.set(Some(hold));
    }

    fn warn(&mut self, hold: &WatermarkHold) {
        let held_ms = hold.since.elapsed().as_millis() as u64;
        let Some(h) = &hold.holder else {
            tracing::warn!(
                held_ms,
                safe_position = hold.safe_position,
                committed_position = hold.committed_position,
                "committed outbox rows wait behind the watermark"
            );
            return;
        };
        tracing::warn!(
            held_ms,
            safe_position = hold.safe_position,
            committed_position = hold.committed_position,
            holder_xid = h.xid,
            holder_pid = h.pid,
            holder_prepared_gid = h.prepared_gid.as_deref(),
            holder_database = h.database.as_deref(),
            holder_application = h.application_name.as_deref(),
            holder_age_ms = h.started.elapsed().as_millis() as u64,
            "committed outbox rows wait for open transaction {} to end: projections and reads \
             that wait are held until it commits or rolls back (end it with \
             pg_terminate_backend(pid), or COMMIT/ROLLBACK PREPARED gid)",
            h.xid
        );
    }
}

/// Names projector's objects on the outbox table (indexes, functions): a hash of the table's
/// name, so they fit PostgreSQL's 63 bytes and never collide when cut.
fn tag(table: &str) -> String {
    let digest = Sha256::digest(table.as_bytes());
    format!(
        "{:02x}{:02x}{:02x}{:02x}",
        digest[0], digest[1], digest[2], digest[3]
    )
}

fn channel_name(table: &str) -> String {
    let mut channel = format!("projector_{}", table.replace('.', "_"));
    channel.truncate(63);
    channel
}

/// The optional columns the table has, and the types that change how they are read.
struct Columns {
    version: bool,
    headers: bool,
    /// `Some(true)`: a timestamp type; `Some(false)`: an integer of milliseconds.
    timestamp: Option<bool>,
    id_is_uuid: bool,
    /// Every column's type (`format_type`), to cast values read and written.
    types: HashMap<String, String>,
}

/// Creates the table if missing; otherwise checks the required columns and adds the position
/// column; installs the triggers. One instance at a time (DDL lock).
async fn prepare(db: &Postgres, c: &OutboxConfig) -> Result<Columns, SourceError> {
    let table = quote(&c.table);
    let mut tx = db
        .pool
        .begin()
        .await
        .map_err(db_err("preparing the outbox"))?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(DDL_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(db_err("locking for DDL"))?;
    let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(&table)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_err("looking for the outbox table"))?;
    if exists.is_none() {
        let ddl = format!(
            "CREATE TABLE {table} (\
             \"{id}\" uuid PRIMARY KEY, \
             \"{stream_type}\" text NOT NULL, \
             \"{stream}\" text NOT NULL, \
             \"{ty}\" text NOT NULL, \
             \"{payload}\" json, \
             \"{version}\" bigint, \
             \"{headers}\" jsonb NOT NULL DEFAULT '[]', \
             \"{ts}\" timestamptz NOT NULL DEFAULT now(), \
             \"{pos}\" bigint NOT NULL)",
            id = c.id_column,
            stream_type = c.stream_type_column,
            stream = c.stream_column,
            ty = c.type_column,
            payload = c.payload_column,
            version = c.version_column,
            headers = c.headers_column,
            ts = c.timestamp_column,
            pos = c.position_column,
        );
        sqlx::query(&ddl)
            .execute(&mut *tx)
            .await
            .map_err(db_err("creating the outbox table"))?;
        tracing::info!(table = %c.table, "created the outbox table");
    }
    let rows = sqlx::query(
        // Types without their modifiers: a cast to varchar(n) would cut a value silently,
        // where the INSERT into the column refuses it.
        "SELECT attname::text, format_type(atttypid, NULL) FROM pg_attribute \
         WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped",
    )
    .bind(&table)
    .fetch_all(&mut *tx)
    .await
    .map_err(db_err("reading the outbox columns"))?;
    let mut types: HashMap<String, String> = HashMap::new();
    for row in rows {
        let name: String = row
            .try_get(0)
            .map_err(db_err("reading the outbox columns"))?;
        let ty: String = row
            .try_get(1)
            .map_err(db_err("reading the outbox columns"))?;
        types.insert(name, ty);
    }
    for (setting, column) in [
        ("outbox.id_column", &c.id_column),
        ("outbox.stream_column", &c.stream_column),
        ("outbox.stream_type_column", &c.stream_type_column),
        ("outbox.type_column", &c.type_column),
        ("outbox.payload_column", &c.payload_column),
    ] {
        if !types.contains_key(column.as_str()) {
            return Err(SourceError::Setup(format!(
                "the outbox table {} has no column {column:?} ({setting})",
                c.table
            )));
        }
    }
    // Versions are compared and incremented as numbers: a text column would order "9" after
    // "10", and one non-number in it would fail every read.
    if let Some(ty) = types.get(c.version_column.as_str()) {
        if !matches!(ty.as_str(), "smallint" | "integer" | "bigint" | "numeric") {
            return Err(SourceError::Setup(format!(
                "the outbox column {:?} (outbox.version_column) is {ty}, not an integer type; \
                 change its type, or set outbox.version_column to a column the table does not \
                 have to run without versions",
                c.version_column
            )));
        }
    }
    let pos = &c.position_column;
    if let Some(ty) = types.get(pos.as_str()) {
        if ty != "bigint" {
            return Err(SourceError::Setup(format!(
                "the outbox column {pos:?} (outbox.position_column) is {ty}, not the bigint \
                 projector keeps positions in; name another column"
            )));
        }
    } else {
        // An existing outbox: its rows are numbered once, in (timestamp, id) order, below any
        // position a transaction can get from now on.
        let order = if types.contains_key(c.timestamp_column.as_str()) {
            format!("\"{}\", \"{}\"", c.timestamp_column, c.id_column)
        } else {
            format!("\"{}\"", c.id_column)
        };
        sqlx::raw_sql(&format!(
            "ALTER TABLE {table} ADD COLUMN \"{pos}\" bigint; \
             UPDATE {table} AS o SET \"{pos}\" = n.rn FROM \
             (SELECT ctid, row_number() OVER (ORDER BY {order}) AS rn FROM {table}) AS n \
             WHERE o.ctid = n.ctid; \
             ALTER TABLE {table} ALTER COLUMN \"{pos}\" SET NOT NULL"
        ))
        .execute(&mut *tx)
        .await
        .map_err(db_err("adding the position column to the outbox"))?;
        tracing::info!(table = %c.table, column = %pos, "added the position column to the outbox");
    }
    // Object names from a hash of the table's name: always within PostgreSQL's 63 bytes, and
    // never two projector objects truncated to one name.
    let tag = tag(&c.table);
    let prefix = match c.table.rsplit_once('.') {
        Some((schema, _)) => format!("\"{schema}\"."),
        None => String::new(),
    };
    let position_fn = format!("{prefix}\"projector_position_{tag}\"");
    let notify_fn = format!("{prefix}\"projector_notify_{tag}\"");
    let position_index = format!("projector_position_{tag}");
    let channel = channel_name(&c.table);
    // Functions are replaced without locking the table; the rest is only created when missing,
    // since index and trigger DDL waits for the application's open transactions.
    let mut ddl = format!(
        "SET LOCAL lock_timeout = '10s'; \
         CREATE OR REPLACE FUNCTION {position_fn}() RETURNS trigger LANGUAGE plpgsql AS $fn$ \
         DECLARE xid bigint := pg_current_xact_id()::text::bigint; n bigint; \
         BEGIN \
           n := coalesce(nullif(current_setting('projector.outbox_rows', true), ''), '0')::bigint + 1; \
           IF n >= {max_rows} THEN RAISE EXCEPTION 'projector: a transaction may insert at most {max_rows_1} outbox rows'; END IF; \
           IF xid >= {max_xid} THEN RAISE EXCEPTION 'projector: transaction id % is beyond the outbox position range', xid; END IF; \
           PERFORM set_config('projector.outbox_rows', n::text, true); \
           NEW.\"{pos}\" := (xid << {ROW_BITS}) | n; \
           RETURN NEW; \
         END $fn$; \
         CREATE OR REPLACE FUNCTION {notify_fn}() RETURNS trigger LANGUAGE plpgsql AS $fn$ \
         BEGIN PERFORM pg_notify('{channel}', coalesce(current_setting('projector.origin', true), '')); \
         RETURN NULL; END $fn$;",
        max_rows = 1u64 << ROW_BITS,
        max_rows_1 = (1u64 << ROW_BITS) - 1,
        max_xid = 1u64 << (63 - ROW_BITS),
    );
    let qualified = |name: &str| format!("{prefix}\"{name}\"");
    let mut missing_indexes = Vec::new();
    for (name, columns) in [
        (position_index.clone(), format!("\"{pos}\"")),
        (
            format!("projector_stream_version_{tag}"),
            format!("\"{}\", \"{}\"", c.stream_column, c.version_column),
        ),
    ] {
        if name.starts_with("projector_stream_version")
            && !types.contains_key(c.version_column.as_str())
        {
            continue;
        }
        let found: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(qualified(&name))
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err("looking for the outbox indexes"))?;
        if found.is_none() {
            missing_indexes.push(format!(
                "CREATE UNIQUE INDEX \"{name}\" ON {table} ({columns});"
            ));
        }
    }
    for index in missing_indexes {
        ddl.push_str(&index);
    }
    sqlx::raw_sql(&ddl)
        .execute(&mut *tx)
        .await
        .map_err(db_err("installing the outbox position trigger and indexes"))?;
    let triggers: Vec<(String, String)> = sqlx::query_as(
        "SELECT tgname::text, tgenabled::text FROM pg_trigger \
         WHERE tgrelid = $1::regclass AND NOT tgisinternal",
    )
    .bind(&table)
    .fetch_all(&mut *tx)
    .await
    .map_err(db_err("reading the outbox triggers"))?;
    let state = |name: &str| {
        triggers
            .iter()
            .find(|(t, _)| t == name)
            .map(|(_, enabled)| enabled.as_str())
    };
    let mut ddl = String::new();
    if state("projector_position").is_none() {
        ddl.push_str(&format!(
            "CREATE TRIGGER projector_position BEFORE INSERT ON {table} \
             FOR EACH ROW EXECUTE FUNCTION {position_fn}();"
        ));
    }
    // Fired even in replication sessions (`session_replication_role = replica`), where a plain
    // trigger is skipped and a row would get no position.
    if state("projector_position") != Some("A") {
        ddl.push_str(&format!(
            "ALTER TABLE {table} ENABLE ALWAYS TRIGGER projector_position;"
        ));
    }
    match (c.notify_trigger, state("projector_notify").is_some()) {
        (true, false) => ddl.push_str(&format!(
            "CREATE TRIGGER projector_notify AFTER INSERT ON {table} \
             FOR EACH STATEMENT EXECUTE FUNCTION {notify_fn}();"
        )),
        (false, true) => ddl.push_str(&format!("DROP TRIGGER projector_notify ON {table};")),
        _ => {}
    }
    if !ddl.is_empty() {
        sqlx::raw_sql(&ddl)
            .execute(&mut *tx)
            .await
            .map_err(db_err("installing the outbox triggers"))?;
    }
    // Positions carry transaction ids: rows restored from another cluster can be ahead of
    // this one's, and new rows would then sort below rows already read.
    let ahead: Option<i64> = sqlx::query_scalar(&format!(
        "SELECT max(\"{pos}\") >> {ROW_BITS} FROM {table} \
         WHERE \"{pos}\" >> {ROW_BITS} >= pg_snapshot_xmax(pg_current_snapshot())::text::bigint"
    ))
    .fetch_one(&mut *tx)
    .await
    .map_err(db_err("checking the outbox positions"))?;
    if let Some(xid) = ahead {
        return Err(SourceError::Setup(format!(
            "outbox rows carry positions of transaction {xid}, ahead of this cluster's \
             transaction ids: was the table restored from another cluster? Renumber it \
             (UPDATE ... SET {pos} = row_number) and reset the projections' checkpoints"
        )));
    }
    tx.commit().await.map_err(db_err("preparing the outbox"))?;
    let timestamp = types.get(c.timestamp_column.as_str()).and_then(|ty| {
        if ty.starts_with("timestamp") {
            Some(true)
        } else if matches!(ty.as_str(), "bigint" | "integer") {
            Some(false)
        } else {
            tracing::warn!(column = %c.timestamp_column, r#type = %ty, "the outbox timestamp column is neither a timestamp nor an integer: events carry timestamp 0");
            None
        }
    });
    Ok(Columns {
        version: types.contains_key(c.version_column.as_str()),
        headers: types.contains_key(c.headers_column.as_str()),
        timestamp,
        id_is_uuid: types.get(c.id_column.as_str()).is_some_and(|t| t == "uuid"),
        types,
    })
}

fn statements(c: &OutboxConfig, columns: &Columns, database_oid: i64) -> Statements {
    let t = quote(&c.table);
    let q = |name: &str| format!("\"{name}\"");
    let (pos, id, stream, stream_type, ty, payload) = (
        q(&c.position_column),
        q(&c.id_column),
        q(&c.stream_column),
        q(&c.stream_type_column),
        q(&c.type_column),
        q(&c.payload_column),
    );
    let version = if columns.version {
        q(&c.version_column)
    } else {
        "NULL::bigint".into()
    };
    // Read every column as text or bigint whatever the table declares (varchar, uuid, integer,
    // json...), and write text into each column as its own type.
    let as_column = |value: &str, column: &str| match columns.types.get(column) {
        Some(ty) => format!("{value}::{ty}"),
        None => value.to_owned(),
    };
    let headers = if columns.headers {
        format!("{}::text", q(&c.headers_column))
    } else {
        "NULL::text".into()
    };
    let timestamp = match columns.timestamp {
        // date_part is a double: far cheaper per row than extract's numeric; 'infinity' or
        // NULL read as 0 rather than failing every read of the batch.
        Some(true) => format!(
            "COALESCE(CASE WHEN isfinite({ts}) THEN floor(date_part('epoch', {ts}) * 1000)::bigint END, 0)",
            ts = q(&c.timestamp_column)
        ),
        Some(false) => format!("COALESCE({}::bigint, 0)", q(&c.timestamp_column)),
        None => "0::bigint".into(),
    };
    // Evaluated once per statement (an InitPlan): the greater of the statement's own
    // snapshot's xmin (every transaction below it has finished) and the narrow bound `$3`
    // the watcher computed in an earlier statement (see the module docs).
    let watermark = format!(
        "(SELECT GREATEST($3::bigint, \
         pg_snapshot_xmin(pg_current_snapshot())::text::bigint << {ROW_BITS}))"
    );
    let id_array = if columns.id_is_uuid {
        "uuid[]"
    } else {
        "text[]"
    };
    let mut insert_columns = vec![id.clone(), stream_type.clone(), stream.clone(), ty.clone()];
    insert_columns.push(payload.clone());
    let mut selected = vec![
        "i".to_owned(),
        as_column("st", &c.stream_type_column),
        as_column("s", &c.stream_column),
        as_column("ty", &c.type_column),
        as_column("p", &c.payload_column),
    ];
    if columns.headers {
        insert_columns.push(q(&c.headers_column));
        selected.push(as_column("h", &c.headers_column));
    }
    let version_value = as_column("version", &c.version_column);
    // Streams compared in the column's own type (uuid, citext, varchar...): the index serves
    // the lookup and equal values match however they were spelled.
    let stream_param = as_column("$1", &c.stream_column);
    let streams_param = match columns.types.get(&c.stream_column) {
        Some(ty) => format!("$1::text[]::{ty}[]"),
        None => "$1::text[]".into(),
    };
    let stream_of_d = as_column("d.s", &c.stream_column);
    let as_json = |value: &str, column: &str| match columns.types.get(column).map(String::as_str) {
        Some("jsonb" | "json") => value.to_owned(),
        _ => format!("{value}::json"),
    };
    Statements {
        read: format!(
            "SELECT {pos}, {id}::text, {stream}::text, {stream_type}::text, {ty}::text, \
             {payload}::text, {version}::bigint, {headers}, {timestamp} FROM {t} \
             WHERE {pos} > $1 AND {pos} < {watermark} ORDER BY {pos} LIMIT $2"
        ),
        // A row with a NULL where a value is required, or a payload that is not JSON, makes
        // this statement fail or flag it: the row read then names it.
        read_packed: format!(
            "SELECT json_agg(json_build_array({pos}, {id}::text, {stream}::text, \
             {stream_type}::text, {ty}::text, COALESCE({version}::bigint, 0), {payload_json}, \
             {headers_json}, {timestamp}, ({id} IS NULL OR {stream} IS NULL OR \
             {stream_type} IS NULL OR {ty} IS NULL OR {payload} IS NULL)) ORDER BY {pos})::text \
             FROM (SELECT * FROM {t} WHERE {pos} > $1 AND {pos} < {watermark} \
             ORDER BY {pos} LIMIT $2) AS b",
            // JSON columns go in as they are (a cast to json would lex them again).
            payload_json = as_json(&payload, &c.payload_column),
            headers_json = if columns.headers {
                format!(
                    "COALESCE({}, '[]')",
                    as_json(&q(&c.headers_column), &c.headers_column)
                )
            } else {
                "'[]'::json".into()
            },
        ),
        bound: bound_statement(database_oid),
        head: format!(
            "SELECT (SELECT max({pos}) FROM {t} WHERE {pos} < w.l), (SELECT max({pos}) FROM {t}), \
             w.l FROM (SELECT GREATEST($1::bigint, \
             pg_snapshot_xmin(pg_current_snapshot())::text::bigint << {ROW_BITS}) AS l) AS w"
        ),
        position_of_event: if columns.types.get(&c.id_column).map(String::as_str) == Some("uuid") {
            format!("SELECT {pos} FROM {t} WHERE {id} = $1::uuid")
        } else {
            format!("SELECT {pos} FROM {t} WHERE {id}::text = $1")
        },
        uuid_ids: columns.types.get(&c.id_column).map(String::as_str) == Some("uuid"),
        position_of: columns
            .version
            .then(|| format!("SELECT {pos} FROM {t} WHERE {stream} = {stream_param} AND {version} = $2")),
        placed_between: (columns.version
            && matches!(
                columns.types.get(&c.stream_column).map(String::as_str),
                Some("text" | "character varying")
            ))
        .then(|| {
            format!(
                "SELECT {stream}::text, {version}::bigint, {pos} FROM {t} \
                 WHERE {pos} > $1 AND {pos} <= $2 ORDER BY {pos} LIMIT $3"
            )
        }),
        positions_of: columns.version.then(|| {
            format!(
                "SELECT w.n, o.{pos} FROM UNNEST($1::text[], $2::bigint[]) WITH ORDINALITY \
                 AS w(s, v, n) JOIN {t} AS o ON o.{stream} = {} AND o.{version} = w.v",
                as_column("w.s", &c.stream_column)
            )
        }),
        version_at: columns.version.then(|| {
            format!(
                "SELECT COALESCE(MAX({version}), 0)::bigint FROM {t} WHERE {stream} = {stream_param} \
                 AND {pos} <= $2"
            )
        }),
        versions: columns.version.then(|| {
            format!(
                "SELECT {stream}::text, MAX({version})::bigint FROM {t} \
                 WHERE {stream} = ANY({streams_param}) GROUP BY {stream}"
            )
        }),
        existing_ids: format!(
            "SELECT {id}::text FROM {t} WHERE {id} = ANY($1::{id_array}) LIMIT 1"
        ),
        insert: if columns.version {
            format!(
                "WITH u AS (SELECT * FROM UNNEST($1::{id_array}, $2::text[], $3::text[], \
                 $4::text[], $5::text[], $6::bigint[], $7::text[]) WITH ORDINALITY \
                 AS u(i, st, s, ty, p, e, h, n)), \
                 cur AS (SELECT d.s, COALESCE((SELECT MAX({version}) FROM {t} \
                 WHERE {stream} = {stream_of_d}), 0) AS v FROM (SELECT DISTINCT s FROM u) AS d), \
                 numbered AS (SELECT u.*, cur.v + row_number() OVER (PARTITION BY u.s ORDER BY u.n) \
                 AS version FROM u JOIN cur ON cur.s = u.s) \
                 INSERT INTO {t} ({}, {version}) SELECT {}, {version_value} FROM numbered \
                 WHERE NOT EXISTS (SELECT 1 FROM numbered WHERE e IS NOT NULL AND e <> version - 1) \
                 AND {ORIGIN} ORDER BY n RETURNING {id}::text, {pos}, {version}::bigint",
                insert_columns.join(", "),
                selected.join(", "),
            )
        } else {
            format!(
                "INSERT INTO {t} ({}) SELECT {} FROM UNNEST($1::{id_array}, $2::text[], \
                 $3::text[], $4::text[], $5::text[], $6::bigint[], $7::text[]) WITH ORDINALITY \
                 AS u(i, st, s, ty, p, e, h, n) WHERE {ORIGIN} ORDER BY n RETURNING {id}::text, {pos}, NULL::bigint",
                insert_columns.join(", "),
                selected.join(", "),
            )
        },
        lock_streams: format!(
            "SELECT pg_advisory_xact_lock(hashtext('{t}'), hashtext(s)) \
             FROM (SELECT DISTINCT s FROM UNNEST($1::text[]) AS s ORDER BY 1) AS l"
        ),
        has_version: columns.version,
    }
}

/// The watermark statement (see the module docs): one row of `next` (the snapshot's xmax),
/// `oldest` (its xmin), whether to fall back to the cluster-wide rule, the oldest session of
/// the database holding an id below `next` (xid, pid, age in ms, application, details
/// hidden, database) and the oldest prepared transaction of the database below `next` (xid,
/// gid, age in ms, database).
///
/// The order of the reads is forced by the plan's shape, not left to the planner: `next` and
/// `oldest` come from the statement's snapshot, taken before it runs; the sessions are read
/// (once per transaction, so both scans see the same copy) by the aggregate `a`; the prepared
/// transactions are read by a subquery that refers to `a`, so it runs after `a` has read every
/// session.
/// SQL: how far the 32-bit id `xid` lies before the 64-bit `n.next`, modulo 2^32. A running
/// transaction below `next` is at most 2^31 ids back (wraparound protection keeps every live
/// id within that window), so a distance of 1 to 2^31 - 1 places it; 0 or more than that
/// means it is at or after `next`, and cannot lower the watermark.
fn distance_back(xid: &str) -> String {
    format!("((n.next - {xid}::text::bigint) & 4294967295)")
}

/// SQL: the 32-bit id `xid` made 64-bit against `n.next` (meaningful when `distance_back` is
/// in the window).
fn widen(xid: &str) -> String {
    format!("n.next - {}", distance_back(xid))
}

fn bound_statement(database_oid: i64) -> String {
    format!(
        "SELECT n.next, n.oldest, (a.unknown > 0 OR n.recovery), \
         h.xid, h.pid, h.age_ms, h.app, h.hidden, h.db, \
         p.xid, p.gid, p.age_ms, p.db \
         FROM (SELECT pg_snapshot_xmax(c.s)::text::bigint AS next, \
               pg_snapshot_xmin(c.s)::text::bigint AS oldest, pg_is_in_recovery() AS recovery \
               FROM (SELECT pg_current_snapshot() AS s) AS c) AS n \
         CROSS JOIN LATERAL (SELECT count(*) FILTER \
               (WHERE w.query = '<backend information not available>') AS unknown \
               FROM pg_stat_get_activity(NULL) AS w) AS a \
         LEFT JOIN LATERAL (SELECT {session_xid} AS xid, w.pid, \
               floor(date_part('epoch', now() - w.xact_start) * 1000)::bigint AS age_ms, \
               w.application_name AS app, w.query = '<insufficient privilege>' AS hidden, \
               (SELECT datname::text FROM pg_database d WHERE d.oid = w.datid) AS db \
               FROM pg_stat_get_activity(NULL) AS w \
               WHERE w.backend_xid IS NOT NULL \
               AND (w.datid = {database_oid} OR a.unknown > 0 OR n.recovery) \
               AND {session_back} BETWEEN 1 AND 2147483647 \
               ORDER BY 1 LIMIT 1) AS h ON true \
         LEFT JOIN LATERAL (SELECT {prepared_xid} AS xid, t.gid, \
               floor(date_part('epoch', now() - t.prepared) * 1000)::bigint AS age_ms, \
               (SELECT datname::text FROM pg_database d WHERE d.oid = t.dbid) AS db \
               FROM pg_prepared_xact() AS t \
               WHERE (t.dbid = {database_oid} OR a.unknown > 0 OR n.recovery) \
               AND {prepared_back} BETWEEN 1 AND 2147483647 \
               ORDER BY 1 LIMIT 1) AS p ON true",
        session_xid = widen("w.backend_xid"),
        session_back = distance_back("w.backend_xid"),
        prepared_xid = widen("t.transaction"),
        prepared_back = distance_back("t.transaction"),
    )
}

fn event_from_row(row: &PgRow) -> Result<Event, SourceError> {
    let position = row
        .try_get::<Option<i64>, _>(0)
        .map_err(db_err("reading an outbox position"))?
        .unwrap_or_default() as u64;
    let id = row.try_get::<Option<String>, _>(1).ok().flatten();
    let stream = row.try_get::<Option<String>, _>(2).ok().flatten();
    // No type (a Kafka message whose type could not be read): every projection sets it aside.
    let event_type = row
        .try_get::<Option<String>, _>(4)
        .ok()
        .flatten()
        .filter(|t| !t.is_empty());
    let malformed = |reason: String| SourceError::Malformed {
        position,
        id: id.clone(),
        stream: stream.clone(),
        event_type: event_type.clone(),
        reason,
    };
    // A Kafka message no event could be made of, kept with why (see `source::kafka`).
    if let Ok(Some(text)) = row.try_get::<Option<String>, _>(7) {
        if let Ok(headers) = parse_headers(&text) {
            if let Some((_, reason)) = headers
                .iter()
                .find(|(name, _)| name == super::kafka::MALFORMED_HEADER)
            {
                return Err(malformed(reason.clone()));
            }
        }
    }
    let text = |i: usize, what: &str| -> Result<String, SourceError> {
        match row.try_get::<Option<String>, _>(i) {
            Ok(Some(value)) => Ok(value),
            Ok(None) => Err(malformed(format!("{what} is NULL"))),
            Err(e) => Err(malformed(format!("{what} is not text: {e}"))),
        }
    };
    let payload = RawValue::from_string(text(5, "the payload")?)
        .map_err(|e| malformed(format!("the payload is not JSON: {e}")))?;
    let headers = match row
        .try_get::<Option<String>, _>(7)
        .map_err(|e| malformed(format!("the headers are not text: {e}")))?
    {
        None => Vec::new(),
        Some(text) => parse_headers(&text).map_err(malformed)?,
    };
    let version = row
        .try_get::<Option<i64>, _>(6)
        .map_err(|e| malformed(format!("the version is not an integer: {e}")))?
        .unwrap_or(0);
    Ok(Event {
        position,
        id: text(1, "the id")?,
        stream: text(2, "the stream (aggregate id)")?,
        stream_type: text(3, "the stream type (aggregate type)")?,
        event_type: text(4, "the event type")?,
        version: version.max(0) as u64,
        payload,
        headers,
        timestamp_ms: row
            .try_get::<Option<i64>, _>(8)
            .ok()
            .flatten()
            .unwrap_or(0)
            .max(0) as u64,
    })
}

/// One row as `read_packed` gets it: the columns in order, and whether one is missing.
#[derive(serde::Deserialize)]
struct PackedRow(
    u64,
    String,
    String,
    String,
    String,
    i64,
    Box<RawValue>,
    Box<RawValue>,
    i64,
    bool,
);

impl PgOutbox {
    /// The fast path: PostgreSQL packs the batch into one JSON array, parsed in one pass,
    /// instead of decoding every column of every row (9 µs an event through the row decoder,
    /// half the catch-up). `None` when a row needs the row read to be reported.
    async fn read_packed(
        &self,
        after: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Option<Vec<Event>>, sqlx::Error> {
        let packed: Option<String> = sqlx::query_scalar(&self.sql.read_packed)
            .bind(after as i64)
            .bind(max_events as i64)
            .bind(self.limit.load(Ordering::SeqCst) as i64)
            .fetch_one(&self.db.pool)
            .await?;
        let Some(packed) = packed else {
            return Ok(Some(Vec::new()));
        };
        let Ok(rows) = serde_json::from_str::<Vec<PackedRow>>(&packed) else {
            return Ok(None);
        };
        let mut events = Vec::with_capacity(rows.len());
        let mut bytes = 0;
        for row in rows {
            if row.9 {
                if events.is_empty() {
                    return Ok(None);
                }
                break;
            }
            let Ok(headers) = parse_headers(row.7.get()) else {
                if events.is_empty() {
                    return Ok(None);
                }
                break;
            };
            let event = Event {
                position: row.0,
                id: row.1,
                stream: row.2,
                stream_type: row.3,
                event_type: row.4,
                version: row.5.max(0) as u64,
                payload: row.6,
                headers,
                timestamp_ms: row.8.max(0) as u64,
            };
            bytes += event.size_hint();
            events.push(event);
            if bytes >= max_bytes {
                break;
            }
        }
        Ok(Some(events))
    }
}

/// Headers as `[["k", "v"], ...]` (what projector writes) or `{"k": "v"}`.
fn parse_headers(text: &str) -> Result<Vec<(String, String)>, String> {
    if let Ok(pairs) = serde_json::from_str::<Vec<(String, String)>>(text) {
        return Ok(pairs);
    }
    serde_json::from_str::<std::collections::BTreeMap<String, String>>(text)
        .map(|map| map.into_iter().collect())
        .map_err(|e| format!("the headers are neither [[key, value], ...] nor {{key: value}}: {e}"))
}

#[async_trait]
impl Source for PgOutbox {
    async fn read(
        &self,
        after: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Vec<Event>, SourceError> {
        if let Ok(Some(events)) = self.read_packed(after, max_events, max_bytes).await {
            return Ok(events);
        }
        // The database's error, or the malformed row, named by reading row by row.
        let rows = sqlx::query(&self.sql.read)
            .bind(after as i64)
            .bind(max_events as i64)
            .bind(self.limit.load(Ordering::SeqCst) as i64)
            .fetch_all(&self.db.pool)
            .await
            .map_err(db_err("reading the outbox"))?;
        let mut events = Vec::with_capacity(rows.len());
        let mut bytes = 0;
        for row in &rows {
            let event = match event_from_row(row) {
                Ok(event) => event,
                // Good rows before it go out first; then it is reported alone.
                Err(SourceError::Malformed { .. }) if !events.is_empty() => break,
                Err(err) => return Err(err),
            };
            bytes += event.size_hint();
            events.push(event);
            if bytes >= max_bytes {
                break;
            }
        }
        Ok(events)
    }

    fn head(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    fn nudge(&self) {
        // Only a hold the commit may have caused is worth a look now; otherwise the head is
        // as fresh as the last append or notification left it, and a look would cost a
        // statement per batch.
        if self.watermark.is_held() {
            self.wake.notify_one();
        }
    }

    fn watermark(&self) -> Option<&Watermark> {
        Some(&self.watermark)
    }

    async fn position_of(&self, stream: &str, version: u64) -> Result<Option<u64>, SourceError> {
        let Some(sql) = &self.sql.position_of else {
            return Ok(None);
        };
        let position: Option<Option<i64>> = sqlx::query_scalar(sql)
            .bind(stream)
            .bind(version as i64)
            .fetch_optional(&self.db.pool)
            .await
            .map_err(db_err("looking up a stream version"))?;
        Ok(position.flatten().map(|p| p as u64))
    }

    async fn position_of_event(&self, id: &str) -> Result<Option<u64>, SourceError> {
        if self.sql.uuid_ids && uuid::Uuid::parse_str(id).is_err() {
            return Ok(None);
        }
        let position: Option<Option<i64>> = sqlx::query_scalar(&self.sql.position_of_event)
            .bind(id)
            .fetch_optional(&self.db.pool)
            .await
            .map_err(db_err("looking up an event by id"))?;
        Ok(position.flatten().map(|p| p as u64))
    }

    async fn placed_between(
        &self,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Option<Vec<Placed>>, SourceError> {
        if !self.sql.has_version {
            // Without versions no read waits for one successfully: nothing to match.
            return Ok(Some(Vec::new()));
        }
        let Some(sql) = &self.sql.placed_between else {
            return Ok(None);
        };
        let rows = sqlx::query(sql)
            .bind(after as i64)
            .bind(upto as i64)
            .bind(limit as i64)
            .fetch_all(&self.db.pool)
            .await
            .map_err(db_err("reading where events landed"))?;
        // A row with no stream or version cannot be waited for: passed by.
        Ok(Some(
            rows.iter()
                .filter_map(|row| {
                    Some(Placed {
                        stream: row.try_get::<Option<String>, _>(0).ok()??,
                        version: row.try_get::<Option<i64>, _>(1).ok()?? as u64,
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
        let mut positions = vec![None; wanted.len()];
        let Some(sql) = &self.sql.positions_of else {
            return Ok(positions);
        };
        if wanted.is_empty() {
            return Ok(positions);
        }
        let streams: Vec<&str> = wanted.iter().map(|w| w.stream.as_str()).collect();
        let versions: Vec<i64> = wanted.iter().map(|w| w.version as i64).collect();
        let rows = sqlx::query(sql)
            .bind(&streams)
            .bind(&versions)
            .fetch_all(&self.db.pool)
            .await
            .map_err(db_err("looking up stream versions"))?;
        // Matched by the asked item's ordinal: the column's type decides which spellings are
        // equal, so the stream read back may be spelled otherwise.
        for row in rows {
            let (Ok(n), Ok(Some(position))) =
                (row.try_get::<i64, _>(0), row.try_get::<Option<i64>, _>(1))
            else {
                continue;
            };
            if let Some(slot) = usize::try_from(n - 1)
                .ok()
                .and_then(|i| positions.get_mut(i))
            {
                *slot = Some(position as u64);
            }
        }
        Ok(positions)
    }

    async fn version_at(&self, stream: &str, position: u64) -> Result<u64, SourceError> {
        let Some(sql) = &self.sql.version_at else {
            return Ok(0);
        };
        let version: i64 = sqlx::query_scalar(sql)
            .bind(stream)
            .bind(position as i64)
            .fetch_one(&self.db.pool)
            .await
            .map_err(db_err("reading a stream's version"))?;
        Ok(version as u64)
    }

    /// One statement, so one round trip: versions are computed in SQL from the streams'
    /// current maxima, expectations checked there (nothing is inserted unless all hold), and
    /// the unique (stream, version) index catches two appends racing for a stream.
    async fn append(&self, mut events: Vec<NewEvent>) -> Result<Vec<Appended>, AppendError> {
        validate(&mut events)?;
        if !self.sql.has_version {
            if let Some(index) = events.iter().position(|e| e.expected_version.is_some()) {
                return Err(AppendError::Invalid {
                    index,
                    reason: "`expected_version` needs a version column in the outbox table \
                             (outbox.version_column)"
                        .into(),
                });
            }
        }
        self.appends.append(events).await
    }
}

/// The PostgreSQL writer of a group (see [`group`](super::group)). The common case: all the
/// group's events in one statement, one transaction: one WAL flush, and one transaction id
/// holding the watermark for a moment instead of one per request. When that statement is
/// refused (an expectation of some request does not hold, an id repeats, a race), each request
/// is written alone, so a refusal costs its own request only.
async fn write(appender: &Appender, group: Vec<Request>) {
    if group.len() > 1 {
        let all: Vec<NewEvent> = group
            .iter()
            .flat_map(|r| r.events.iter().cloned())
            .collect();
        if let Ok(appended) = appender.insert(&all).await {
            let mut appended = appended.into_iter();
            for request in group {
                let mine = appended.by_ref().take(request.events.len()).collect();
                request.answer(Ok(mine));
            }
            return;
        }
    }
    for request in group {
        let outcome = appender.insert(&request.events).await;
        request.answer(outcome);
    }
}

/// What appends need of the outbox, shared with the group writer's task.
struct Appender {
    db: Postgres,
    sql: Arc<Statements>,
    /// Wakes the head watcher (after this instance's own appends).
    wake: Arc<Notify>,
    /// When no trigger announces inserts: wakes the task that tells the other instances.
    announce: Option<Arc<Notify>>,
    /// This instance's tag: see [`ORIGIN`].
    origin: String,
}

impl Appender {
    /// Inserts `events` (validated) in one statement: all or none.
    async fn insert(&self, events: &[NewEvent]) -> Result<Vec<Appended>, AppendError> {
        let mut seen = HashSet::new();
        if let Some(dup) = events
            .iter()
            .filter_map(|e| e.id.as_deref())
            .find(|id| !seen.insert(*id))
        {
            return Err(AppendError::DuplicateId { id: dup.to_owned() });
        }
        let ids: Vec<String> = events
            .iter()
            .map(|e| {
                e.id.clone()
                    .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
            })
            .collect();
        let stream_types: Vec<&str> = events.iter().map(|e| e.stream_type.as_str()).collect();
        let streams: Vec<&str> = events.iter().map(|e| e.stream.as_str()).collect();
        let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        let payloads: Vec<&str> = events.iter().map(|e| e.payload.get()).collect();
        let expected: Vec<Option<i64>> = events
            .iter()
            .map(|e| e.expected_version.map(|v| v as i64))
            .collect();
        let headers: Vec<String> = events
            .iter()
            .map(|e| {
                let pairs: Vec<(&String, &String)> = e.headers.iter().collect();
                serde_json::to_string(&pairs).unwrap_or_else(|_| "[]".into())
            })
            .collect();
        // First try: one statement, no locks. After a collision (a version race, a deadlock
        // between appends touching the same streams in another order), queue behind
        // per-stream advisory locks taken in one order, so the retry cannot collide again
        // with another locked append.
        let mut locked = false;
        let mut attempt = 0;
        let rows = loop {
            attempt += 1;
            if attempt > MAX_APPEND_ATTEMPTS {
                return Err(AppendError::Contended);
            }
            let insert = || {
                sqlx::query(&self.sql.insert)
                    .bind(&ids)
                    .bind(&stream_types)
                    .bind(&streams)
                    .bind(&types)
                    .bind(&payloads)
                    .bind(&expected)
                    .bind(&headers)
                    .bind(&self.origin)
            };
            let inserted = if locked {
                self.insert_locked(&streams, insert()).await
            } else {
                insert().fetch_all(&self.db.pool).await
            };
            match inserted {
                Ok(rows) if rows.len() == events.len() => break rows,
                // Nothing inserted: an expectation did not hold, or a race moved a version.
                Ok(_) => match self.conflict(events).await? {
                    Some(conflict) => return Err(conflict),
                    None => locked = true,
                },
                Err(err) => {
                    let (code, message) = match err.as_database_error() {
                        Some(e) => (e.code().map(|c| c.into_owned()), e.message().to_owned()),
                        None => (None, String::new()),
                    };
                    match code.as_deref() {
                        // A unique index: a repeated id, or (any index on stream and
                        // version) another append took the version first.
                        Some("23505") => {
                            if let Some(id) = self.existing_id(&ids).await? {
                                return Err(AppendError::DuplicateId { id });
                            }
                            if let Some(conflict) = self.conflict(events).await? {
                                return Err(conflict);
                            }
                            locked = true;
                        }
                        // Deadlock or serialization failure between racing appends.
                        Some("40P01" | "40001") => locked = true,
                        // A value the column cannot hold (too long, not a uuid, ...).
                        Some(c) if c.starts_with("22") => {
                            return Err(AppendError::Invalid {
                                index: 0,
                                reason: format!("the outbox table refused a value: {message}"),
                            })
                        }
                        _ => return Err(db_err("appending events")(err).into()),
                    }
                    // Jitter, so racing appends stop colliding.
                    let micros = rand::random::<u64>() % (200 * attempt);
                    tokio::time::sleep(Duration::from_micros(micros)).await;
                }
            }
        };
        // This instance's runners need not wait for the other instances' notification.
        self.wake.notify_one();
        if let Some(announce) = &self.announce {
            announce.notify_one();
        }
        let mut returned = Vec::with_capacity(rows.len());
        for row in rows {
            let id: String = row.try_get(0).map_err(db_err("appending events"))?;
            let position: i64 = row.try_get(1).map_err(db_err("appending events"))?;
            let version: Option<i64> = row.try_get(2).map_err(db_err("appending events"))?;
            returned.push((id, position, version));
        }
        Ok(place(events, ids, returned)?)
    }
}

/// Where each appended event landed, from the rows the INSERT gave back: `(id, position,
/// version)`, matched by id. An event whose id is in no row (a trigger or rule on the table
/// rewrote it) is an error naming it, not position 0: the append has committed by then, but
/// where that event is cannot be told.
fn place(
    events: &[NewEvent],
    ids: Vec<String>,
    rows: Vec<(String, i64, Option<i64>)>,
) -> Result<Vec<Appended>, SourceError> {
    let mut placed: HashMap<String, (u64, u64)> = rows
        .into_iter()
        .map(|(id, position, version)| {
            let version = version.unwrap_or(0).max(0) as u64;
            (id, (position as u64, version))
        })
        .collect();
    events
        .iter()
        .zip(ids)
        .map(|(event, id)| match placed.remove(&id) {
            Some((position, version)) => Ok(Appended {
                position,
                id,
                stream: event.stream.clone(),
                version,
            }),
            None => Err(SourceError::Setup(format!(
                "the append committed, but no row the outbox gave back has the id of event \
                 {id} (stream {}), so its position is unknown: does a trigger or rule on the \
                 outbox table change ids?",
                event.stream
            ))),
        })
        .collect()
}

impl Appender {
    /// Runs the insert in a transaction that first takes the advisory lock of each stream, in
    /// one global order: appends to the same streams then go one after the other.
    async fn insert_locked<'q>(
        &self,
        streams: &[&str],
        insert: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<Vec<PgRow>, sqlx::Error> {
        let mut tx = self.db.pool.begin().await?;
        sqlx::query(&self.sql.lock_streams)
            .bind(streams)
            .execute(&mut *tx)
            .await?;
        let rows = insert.fetch_all(&mut *tx).await?;
        tx.commit().await?;
        Ok(rows)
    }

    /// The first expectation of `events` the streams' current versions break, if any.
    async fn conflict(&self, events: &[NewEvent]) -> Result<Option<AppendError>, AppendError> {
        let Some(sql) = &self.sql.versions else {
            return Ok(None);
        };
        let streams: Vec<&str> = events.iter().map(|e| e.stream.as_str()).collect();
        let rows = sqlx::query(sql)
            .bind(&streams)
            .fetch_all(&self.db.pool)
            .await
            .map_err(db_err("reading stream versions"))?;
        let mut versions: HashMap<String, u64> = HashMap::new();
        for row in rows {
            let stream: String = row.try_get(0).map_err(db_err("reading stream versions"))?;
            let version: Option<i64> = row.try_get(1).map_err(db_err("reading stream versions"))?;
            versions.insert(stream, version.unwrap_or(0).max(0) as u64);
        }
        for event in events {
            let current = versions.entry(event.stream.clone()).or_insert(0);
            if let Some(expected) = event.expected_version {
                if expected != *current {
                    return Ok(Some(AppendError::VersionConflict {
                        stream: event.stream.clone(),
                        expected,
                        current: *current,
                    }));
                }
            }
            *current += 1;
        }
        Ok(None)
    }

    async fn existing_id(&self, ids: &[String]) -> Result<Option<String>, AppendError> {
        sqlx::query_scalar(&self.sql.existing_ids)
            .bind(ids)
            .fetch_optional(&self.db.pool)
            .await
            .map_err(|e| db_err("checking event ids")(e).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_read_as_pairs_or_an_object() {
        assert_eq!(
            parse_headers(r#"[["a", "1"], ["b", "2"]]"#).unwrap(),
            [("a".into(), "1".into()), ("b".into(), "2".into())]
        );
        assert_eq!(
            parse_headers(r#"{"b": "2", "a": "1"}"#).unwrap(),
            [("a".into(), "1".into()), ("b".into(), "2".into())]
        );
        assert!(parse_headers("[1]").unwrap_err().contains("headers"));
    }

    fn new_event(stream: &str) -> NewEvent {
        serde_json::from_value(serde_json::json!({
            "stream": stream, "stream_type": "T", "type": "Happened", "payload": {},
        }))
        .unwrap()
    }

    #[test]
    fn appended_events_are_placed_by_id_and_an_unmatched_id_is_named() {
        let events = [new_event("a"), new_event("b")];
        let ids = vec!["id-1".to_owned(), "id-2".to_owned()];
        // Rows come back in any order.
        let rows = vec![
            ("id-2".to_owned(), (2 << ROW_BITS) | 2, Some(1)),
            ("id-1".to_owned(), (2 << ROW_BITS) | 1, Some(4)),
        ];
        let placed = place(&events, ids.clone(), rows).unwrap();
        assert_eq!(
            placed
                .iter()
                .map(|a| (a.id.as_str(), a.stream.as_str(), a.position, a.version))
                .collect::<Vec<_>>(),
            [
                ("id-1", "a", (2 << ROW_BITS) | 1, 4),
                ("id-2", "b", (2 << ROW_BITS) | 2, 1),
            ]
        );
        let rows = vec![
            ("id-1".to_owned(), (2 << ROW_BITS) | 1, Some(4)),
            ("ID-2".to_owned(), (2 << ROW_BITS) | 2, Some(1)),
        ];
        let err = place(&events, ids, rows).unwrap_err().to_string();
        assert!(
            err.contains("event id-2") && err.contains("stream b"),
            "{err}"
        );
    }

    /// A fresh database on the cluster `PROJECTOR_TEST_POSTGRES` names (`scripts/test.sh`
    /// starts one); `None` without it.
    async fn fresh_database() -> Option<Postgres> {
        use sqlx::Connection;
        let Ok(admin_url) = std::env::var("PROJECTOR_TEST_POSTGRES") else {
            eprintln!("PROJECTOR_TEST_POSTGRES is not set: skipped");
            return None;
        };
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(&admin_url).await.unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .unwrap();
        let _ = admin.close().await;
        let (base, _) = admin_url.rsplit_once('/').unwrap();
        let config = crate::config::PostgresConfig::default();
        Some(
            Postgres::open(&format!("{base}/{name}"), &config)
                .await
                .unwrap(),
        )
    }

    #[tokio::test]
    async fn an_appended_id_the_table_does_not_give_back_is_an_error_naming_it() {
        let Some(db) = fresh_database().await else {
            return;
        };
        let outbox = PgOutbox::open(db.clone(), &OutboxConfig::default())
            .await
            .unwrap();
        // Another party's trigger gives every row an id of its own.
        sqlx::raw_sql(
            "CREATE FUNCTION rewrite_id() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN NEW.id := gen_random_uuid(); RETURN NEW; END $$; \
             CREATE TRIGGER a_rewrite_id BEFORE INSERT ON outbox \
             FOR EACH ROW EXECUTE FUNCTION rewrite_id();",
        )
        .execute(&db.pool)
        .await
        .unwrap();
        let id = uuid::Uuid::new_v4().to_string();
        let event: NewEvent = serde_json::from_value(serde_json::json!({
            "id": id, "stream": "s", "stream_type": "T", "type": "Happened", "payload": {},
        }))
        .unwrap();
        let result = outbox.append(vec![event]).await;
        let err = match result {
            Ok(appended) => panic!("appended without a position: {appended:?}"),
            Err(err) => err,
        };
        let message = err.to_string();
        assert!(message.contains(&id), "{message}");
        assert!(message.contains("committed"), "{message}");
    }

    #[tokio::test]
    async fn the_trigger_names_this_instance_in_its_own_appends_notification_only() {
        let Some(db) = fresh_database().await else {
            return;
        };
        let outbox = PgOutbox::open(db.clone(), &OutboxConfig::default())
            .await
            .unwrap();
        let mut listener = PgListener::connect_with(&db.pool).await.unwrap();
        listener.listen(&outbox.channel).await.unwrap();
        async fn next(listener: &mut PgListener) -> String {
            tokio::time::timeout(Duration::from_secs(10), listener.recv())
                .await
                .expect("a notification within 10 s")
                .unwrap()
                .payload()
                .to_owned()
        }
        // Its own append: the instance's listener can tell it apart and skip it.
        outbox.append(vec![new_event("a")]).await.unwrap();
        assert_eq!(next(&mut listener).await, outbox.tag);
        // Another writer's insert (the setting is local to an append's transaction, so it
        // never leaks into a later one on the same connection): every instance must wake.
        sqlx::query(
            "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) \
             VALUES (gen_random_uuid(), 'T', 'b', 'Happened', '{}')",
        )
        .execute(&db.pool)
        .await
        .unwrap();
        assert_eq!(next(&mut listener).await, "");
    }

    #[tokio::test]
    async fn short_transaction_ids_are_widened_across_an_epoch() {
        let Some(db) = fresh_database().await else {
            return;
        };
        let epoch = 1i64 << 32;
        // (next, 32-bit id) -> the 64-bit id, or None when it is not before `next`.
        let cases = [
            (1000, 990, Some(990)),
            (1000, 1000, None),
            (1000, 1001, None),
            (epoch + 5, 4_294_967_290, Some(4_294_967_290)),
            (epoch + 5, 3, Some(epoch + 3)),
            (epoch + 5, 7, None),
            (
                3 * epoch + 100,
                100 - 2_000_000_000i64 + epoch,
                Some(3 * epoch + 100 - 2_000_000_000),
            ),
        ];
        let sql = format!(
            "SELECT {} BETWEEN 1 AND 2147483647, {} FROM (SELECT $1::bigint AS next, \
             $2::text::xid AS x) AS n",
            distance_back("n.x"),
            widen("n.x")
        );
        for (next, xid, expected) in cases {
            let (before, widened): (bool, i64) = sqlx::query_as(&sql)
                .bind(next)
                .bind(xid.to_string())
                .fetch_one(&db.pool)
                .await
                .unwrap();
            assert_eq!(
                before.then_some(widened),
                expected,
                "next {next}, xid {xid}"
            );
        }
    }

    #[test]
    fn names_are_quoted_part_by_part() {
        assert_eq!(quote("outbox"), "\"outbox\"");
        assert_eq!(quote("app.outbox"), "\"app\".\"outbox\"");
        assert_eq!(channel_name("app.outbox"), "projector_app_outbox");
    }
}
