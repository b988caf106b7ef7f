//! The production store: PostgreSQL, usually the application's own database. projector's
//! catalog and read models live in one schema of their own (`projector` by default); documents
//! are JSONB; a batch is one transaction of set-based statements (`UNNEST` arrays), whatever
//! its size.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool, QueryBuilder};
use tokio::sync::{oneshot, watch};

use super::catalog::{CatalogEntry, CutOver, Placement, StoredPlugin};
use super::{
    attach_actions, dead_letter_from_row, document_from_row, event_text, field_column, now_ms,
    parked_from_rows, parked_streams_from_rows, table_name, AdminAction, Batch, DeadLetter,
    Document, Lease, LetterCounts, ListQuery, ParkedStream, ProjectionStatus, Store, StoreError,
    ACTION_COLUMNS, ANSWERED_COMMANDS_KEPT_MS, LETTER_COLUMNS,
};
use super::{catalog_entries, descriptor_json, stored_plugin_from_row, PLUGIN_COLUMNS};
use super::{counts, logged_from_row, LOGGED_COLUMNS};
use crate::config::PostgresConfig;
use crate::observer::{ActionState, Counts, Logged, Update};
use crate::runtime::Descriptor;

const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        include_str!("../../../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        include_str!("../../../migrations/postgres/0002_dead_letters.sql"),
    ),
    (
        3,
        include_str!("../../../migrations/postgres/0003_admin.sql"),
    ),
    (
        4,
        include_str!("../../../migrations/postgres/0004_plugins.sql"),
    ),
    (
        6,
        include_str!("../../../migrations/postgres/0006_observers.sql"),
    ),
    (
        7,
        include_str!("../../../migrations/postgres/0007_code_changed.sql"),
    ),
];

/// How often a held lease checks that its connection (and so the lock) is still there.
const LEASE_CHECK: Duration = Duration::from_secs(1);

/// Serialises DDL across instances starting at once (`CREATE ... IF NOT EXISTS` races).
/// The advisory lock every DDL of the host takes, so instances starting together do not race.
pub(crate) const DDL_LOCK: i64 = 0x7072_6f6a_6464_6c00; // "projddl\0"

#[derive(Clone)]
pub struct Postgres {
    pub(crate) pool: PgPool,
    options: PgConnectOptions,
    /// The schema of the catalog and read models, quoted.
    schema: String,
    /// `SET LOCAL synchronous_commit = ...` for batch commits that need not be durable
    /// (validated by the config).
    commit_setting: String,
    /// The same setting's value alone.
    lazy_commit: String,
    /// Per projection, the session a standby tries the lease on: kept between tries, so
    /// standing by costs no new connection (a server process each) every poll.
    lease_candidates: Arc<Mutex<HashMap<String, PgConnection>>>,
}

impl Postgres {
    /// Connects to `url` and brings projector's schema up to date.
    pub async fn open(url: &str, config: &PostgresConfig) -> Result<Self, StoreError> {
        let open_err = |reason: String| StoreError::Open {
            url: redact(url),
            reason,
        };
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| open_err(e.to_string()))?
            .application_name("projector");
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .min_connections(config.min_connections)
            .acquire_timeout(Duration::from_millis(config.acquire_timeout_ms))
            .connect_with(options.clone())
            .await
            .map_err(|e| open_err(e.to_string()))?;
        let db = Self {
            pool,
            options,
            schema: format!("\"{}\"", config.schema),
            commit_setting: format!(
                "SET LOCAL synchronous_commit = {}",
                config.synchronous_commit
            ),
            lazy_commit: config.synchronous_commit.clone(),
            lease_candidates: Arc::default(),
        };
        db.migrate().await?;
        Ok(db)
    }

    /// A session to try a lease on.
    async fn fresh_lease_session(&self) -> Result<PgConnection, StoreError> {
        self.connect()
            .await
            .map_err(StoreError::db("connecting for a lease"))
    }

    /// A new connection outside the pool (for LISTEN and leases, which hold it).
    pub(crate) async fn connect(&self) -> Result<PgConnection, sqlx::Error> {
        PgConnection::connect_with(&self.options).await
    }

    /// Moves the catalog's revision, in the transaction of the change.
    async fn bump_revision(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    ) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "UPDATE {}.catalog_revision SET revision = revision + 1 WHERE id = 1",
            self.schema
        ))
        .execute(&mut **tx)
        .await
        .map_err(StoreError::db("moving the catalog's revision"))?;
        Ok(())
    }

    /// The schema of the catalog and read models, quoted.
    pub(crate) fn schema(&self) -> &str {
        &self.schema
    }

    fn table(&self, projection: &Descriptor, collection: &str) -> String {
        format!("{}.\"{}\"", self.schema, table_name(projection, collection))
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(StoreError::db("migrating"))?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(DDL_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db("locking for migrations"))?;
        let schema = &self.schema;
        sqlx::raw_sql(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema}; \
             CREATE TABLE IF NOT EXISTS {schema}.schema_migrations \
             (version bigint PRIMARY KEY, applied_at bigint NOT NULL)"
        ))
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db("creating the schema"))?;
        for (version, sql) in MIGRATIONS {
            let applied: Option<i64> = sqlx::query_scalar(&format!(
                "SELECT version FROM {schema}.schema_migrations WHERE version = $1"
            ))
            .bind(version)
            .fetch_optional(&mut *tx)
            .await
            .map_err(StoreError::db("reading schema_migrations"))?;
            if applied.is_some() {
                continue;
            }
            sqlx::raw_sql(&sql.replace("__SCHEMA__", schema))
                .execute(&mut *tx)
                .await
                .map_err(StoreError::db(format!("applying migration {version}")))?;
            sqlx::query(&format!(
                "INSERT INTO {schema}.schema_migrations (version, applied_at) VALUES ($1, $2)"
            ))
            .bind(version)
            .bind(now_ms())
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db("recording a migration"))?;
        }
        tx.commit().await.map_err(StoreError::db("migrating"))
    }
}

impl Postgres {
    /// A batch that carries documents alone, in one statement (so its own transaction): the
    /// checkpoint's move first, and every write conditional on it, so a fenced batch writes
    /// nothing. One round trip where BEGIN, the writes, the move and COMMIT take four: the
    /// path of every batch that reaches the head, where readers wait. A batch that need not
    /// be durable sets `synchronous_commit` for its own transaction in the same statement.
    async fn commit_documents(
        &self,
        projection: &Descriptor,
        batch: &Batch<'_>,
        now: i64,
    ) -> Result<(), StoreError> {
        let mut sql = format!(
            "WITH moved AS (UPDATE {}.checkpoints SET position = $1, updated_at = $2 \
             WHERE projection = $3 AND version = $4 AND position = $5 RETURNING 1)",
            self.schema
        );
        let mut splits = Vec::with_capacity(batch.output.writes.len());
        let mut next = 6;
        for (i, (collection, writes)) in batch.output.writes.iter().enumerate() {
            let table = self.table(projection, collection);
            let split = split(projection, collection, writes)?;
            if !split.keys.is_empty() {
                sql.push_str(&format!(
                    ", w{i} AS (INSERT INTO {table} AS t (key, doc, version, updated_at) \
                     SELECT k, d::jsonb, 1, $2 FROM UNNEST(${}::text[], ${}::text[]) AS u(k, d) \
                     WHERE EXISTS (SELECT 1 FROM moved) {UPSERT})",
                    next,
                    next + 1
                ));
                next += 2;
            }
            if !split.deletes.is_empty() {
                sql.push_str(&format!(
                    ", d{i} AS (DELETE FROM {table} WHERE key = ANY(${next}::text[]) \
                     AND EXISTS (SELECT 1 FROM moved))"
                ));
                next += 1;
            }
            splits.push(split);
        }
        if batch.durable {
            sql.push_str(" SELECT COUNT(*) FROM moved");
        } else {
            sql.push_str(&format!(
                " SELECT COUNT(*) FROM moved, \
                 (SELECT set_config('synchronous_commit', ${next}, true)) AS lazy"
            ));
        }
        let mut query = sqlx::query_scalar::<_, i64>(&sql)
            .bind(batch.to as i64)
            .bind(now)
            .bind(&projection.name)
            .bind(&projection.version)
            .bind(batch.from as i64);
        for split in &splits {
            if !split.keys.is_empty() {
                query = query.bind(&split.keys).bind(&split.docs);
            }
            if !split.deletes.is_empty() {
                query = query.bind(&split.deletes);
            }
        }
        if !batch.durable {
            query = query.bind(&self.lazy_commit);
        }
        let moved = query
            .fetch_one(&self.pool)
            .await
            .map_err(StoreError::db("committing a batch"))?;
        if moved != 1 {
            return Err(StoreError::Fenced {
                projection: projection.name.clone(),
                expected: batch.from,
            });
        }
        Ok(())
    }

    /// A batch's dead-letter bookkeeping, in its transaction: released rows removed, letters
    /// written (replacing any at the same position), a resolved letter's state, operators'
    /// actions. No statement for what the batch does not carry.
    async fn write_letters(
        &self,
        tx: &mut PgConnection,
        projection: &Descriptor,
        batch: &Batch<'_>,
        now: i64,
    ) -> Result<(), StoreError> {
        let schema = &self.schema;
        if !batch.released.is_empty() {
            let positions: Vec<i64> = batch.released.iter().map(|p| *p as i64).collect();
            sqlx::query(&format!(
                "DELETE FROM {schema}.dead_letters WHERE projection = $1 AND version = $2 \
                 AND position = ANY($3::bigint[])"
            ))
            .bind(&projection.name)
            .bind(&projection.version)
            .bind(&positions)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db("releasing parked events"))?;
        }
        if !batch.dead_letters.is_empty() {
            // One row per position (the last given wins): an upsert may not touch a row twice.
            let letters: BTreeMap<u64, &DeadLetter> = batch
                .dead_letters
                .iter()
                .map(|letter| (letter.position, letter))
                .collect();
            let letters: Vec<&DeadLetter> = letters.into_values().collect();
            let text = |f: fn(&DeadLetter) -> Option<&str>| -> Vec<Option<String>> {
                letters
                    .iter()
                    .map(|l| f(l).map(|s| pg_text(s).into_owned()))
                    .collect()
            };
            let int = |f: fn(&DeadLetter) -> Option<i64>| -> Vec<Option<i64>> {
                letters.iter().map(|l| f(l)).collect()
            };
            let events: Vec<Option<String>> = letters.iter().map(|l| event_text(l)).collect();
            sqlx::query(&format!(
                "INSERT INTO {schema}.dead_letters AS d (projection, version, position, event_id, \
                 stream, reason, parked_behind, kind, state, resolved_at, plugin_version, event, \
                 created_at) \
                 SELECT $1, $2, p, e, s, r, b, k, st, ra, pv, ev, $3 FROM UNNEST($4::bigint[], \
                 $5::text[], $6::text[], $7::text[], $8::bigint[], $9::text[], $10::text[], \
                 $11::bigint[], $12::text[], $13::text[]) AS u(p, e, s, r, b, k, st, ra, pv, ev) \
                 ON CONFLICT (projection, version, position) DO UPDATE SET \
                 event_id = excluded.event_id, stream = excluded.stream, reason = excluded.reason, \
                 parked_behind = excluded.parked_behind, kind = excluded.kind, \
                 state = excluded.state, resolved_at = excluded.resolved_at, \
                 plugin_version = excluded.plugin_version, event = excluded.event"
            ))
            .bind(&projection.name)
            .bind(&projection.version)
            .bind(now)
            .bind(int(|l| Some(l.position as i64)))
            .bind(text(|l| l.event_id.as_deref()))
            .bind(text(|l| l.stream.as_deref()))
            .bind(text(|l| Some(l.reason.as_str())))
            .bind(int(|l| l.parked_behind.map(|p| p as i64)))
            .bind(text(|l| Some(l.kind.as_str())))
            .bind(text(|l| Some(l.state.as_str())))
            .bind(int(|l| l.resolved_at))
            .bind(text(|l| l.plugin_version.as_deref()))
            .bind(&events)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db("writing dead letters"))?;
        }
        if let Some((position, state)) = batch.resolved {
            let resolved = sqlx::query(&format!(
                "UPDATE {schema}.dead_letters SET state = $1, resolved_at = $2 \
                 WHERE projection = $3 AND version = $4 AND position = $5 AND state = 'open'"
            ))
            .bind(state.as_str())
            .bind(now)
            .bind(&projection.name)
            .bind(&projection.version)
            .bind(position as i64)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db("resolving a dead letter"))?;
            // Resolved meanwhile (by another instance): this one's view is stale.
            if resolved.rows_affected() != 1 {
                return Err(StoreError::Fenced {
                    projection: projection.name.clone(),
                    expected: batch.from,
                });
            }
        }
        self.insert_actions(tx, projection, batch.actions).await
    }

    /// Records operators' actions, in one statement.
    async fn insert_actions(
        &self,
        conn: &mut PgConnection,
        projection: &Descriptor,
        actions: &[AdminAction],
    ) -> Result<(), StoreError> {
        if actions.is_empty() {
            return Ok(());
        }
        let targets: Vec<Option<i64>> =
            actions.iter().map(|a| a.target.map(|p| p as i64)).collect();
        let names: Vec<String> = actions
            .iter()
            .map(|a| pg_text(&a.action).into_owned())
            .collect();
        let at: Vec<i64> = actions.iter().map(|a| a.at).collect();
        let outcomes: Vec<String> = actions
            .iter()
            .map(|a| pg_text(&a.outcome).into_owned())
            .collect();
        // WITH ORDINALITY: ids follow the given order, which is the actions' order on reads.
        sqlx::query(&format!(
            "INSERT INTO {}.admin_actions (projection, version, target, action, at, outcome) \
             SELECT $1, $2, t, a, w, o FROM UNNEST($3::bigint[], $4::text[], $5::bigint[], \
             $6::text[]) WITH ORDINALITY AS u(t, a, w, o, n) ORDER BY n",
            self.schema
        ))
        .bind(&projection.name)
        .bind(&projection.version)
        .bind(&targets)
        .bind(&names)
        .bind(&at)
        .bind(&outcomes)
        .execute(&mut *conn)
        .await
        .map_err(StoreError::db("recording admin actions"))?;
        Ok(())
    }

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
            "SELECT {ACTION_COLUMNS} FROM {}.admin_actions WHERE projection = $1 \
             AND version = $2 AND target BETWEEN $3 AND $4 ORDER BY id",
            self.schema
        ))
        .bind(&projection.name)
        .bind(&projection.version)
        .bind(first.position as i64)
        .bind(last.position as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::db("reading admin actions"))?;
        attach_actions(letters, &rows)
    }

    /// Dead letters by a condition on the row (`$3` its value), in position order, with their
    /// events and actions.
    async fn letters_where(
        &self,
        projection: &Descriptor,
        condition: &str,
        value: i64,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {LETTER_COLUMNS}, event FROM {}.dead_letters \
             WHERE projection = $1 AND version = $2 AND {condition} ORDER BY position",
            self.schema
        ))
        .bind(&projection.name)
        .bind(&projection.version)
        .bind(value)
        .fetch_all(&self.pool)
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

/// Text PostgreSQL can store: a NUL character (which a plugin's error message may carry) is
/// replaced.
fn pg_text(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        Cow::Owned(text.replace('\0', "\u{fffd}"))
    } else {
        Cow::Borrowed(text)
    }
}

/// The URL without its password, for error messages and logs.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}

/// `doc #> '{a,b}'` for a declared field `a.b` (validated to `[A-Za-z0-9_.]`: safe in a
/// literal).
fn json_path(field: &str) -> String {
    format!("(doc #> '{{{}}}')", field.replace('.', ","))
}

/// `pg_try_advisory_lock` on `conn`, bounded in time: a half-open connection would otherwise
/// hang the try (and the takeover it is for) for as long as TCP keeps retransmitting.
async fn try_advisory_lock(
    mut conn: PgConnection,
    key: i64,
) -> Result<(PgConnection, bool), StoreError> {
    let tried = tokio::time::timeout(
        LEASE_CHECK * 5,
        sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(&mut conn),
    )
    .await;
    match tried {
        Ok(Ok(granted)) => Ok((conn, granted)),
        Ok(Err(err)) => Err(StoreError::db("taking a lease")(err)),
        Err(_) => Err(StoreError::db("taking a lease")(sqlx::Error::Io(
            std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 5 s"),
        ))),
    }
}

/// The advisory-lock key of a projection's lease. Advisory locks are per database: the schema
/// keeps two deployments sharing one database apart.
fn lease_key(schema: &str, projection: &str) -> i64 {
    let digest = Sha256::digest(format!("projector lease\0{schema}\0{projection}").as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(bytes)
}

#[async_trait]
impl Store for Postgres {
    async fn register(&self, projection: &Descriptor) -> Result<u64, StoreError> {
        let checkpoint = self.prepare(projection).await?;
        sqlx::query(&format!(
            "INSERT INTO {}.projections (name, version, status, error, updated_at) \
             VALUES ($1, $2, 'running', NULL, $3) \
             ON CONFLICT (name) DO UPDATE SET version = excluded.version, status = 'running', \
             error = NULL, updated_at = excluded.updated_at",
            self.schema
        ))
        .bind(&projection.name)
        .bind(&projection.version)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(StoreError::db("recording the projection"))?;
        Ok(checkpoint)
    }

    async fn catalog_revision(&self) -> Result<i64, StoreError> {
        sqlx::query_scalar(&format!(
            "SELECT revision FROM {}.catalog_revision WHERE id = 1",
            self.schema
        ))
        .fetch_one(&self.pool)
        .await
        .map_err(StoreError::db("reading the catalog's revision"))
    }

    async fn catalog(&self) -> Result<Vec<CatalogEntry>, StoreError> {
        let schema = &self.schema;
        let projections: Vec<(String, String, Option<String>, bool)> = sqlx::query_as(&format!(
            "SELECT name, version, building, manual_cutover FROM {schema}.projections ORDER BY name"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::db("reading the catalog"))?;
        let plugins = sqlx::query(&format!(
            "SELECT {PLUGIN_COLUMNS} FROM {schema}.plugins ORDER BY name, version"
        ))
        .fetch_all(&self.pool)
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
        sqlx::query_as(&format!(
            "SELECT sha256, bytes FROM {}.plugins WHERE name = $1 AND version = $2",
            self.schema
        ))
        .bind(name)
        .bind(version)
        .fetch_optional(&self.pool)
        .await
        .map_err(StoreError::db("reading a plugin's code"))
    }

    async fn save_plugin(
        &self,
        plugin: &StoredPlugin,
        bytes: &[u8],
        placement: Placement,
    ) -> Result<(), StoreError> {
        let schema = &self.schema;
        let descriptor = descriptor_json(plugin)?;
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(StoreError::db("storing a plugin"))?;
        sqlx::query(&format!(
            "INSERT INTO {schema}.plugins (name, version, sha256, world, contract, descriptor, origin, uploaded_at, bytes, code_changed_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             ON CONFLICT (name, version) DO UPDATE SET sha256 = excluded.sha256, world = excluded.world, \
             contract = excluded.contract, descriptor = excluded.descriptor, origin = excluded.origin, \
             uploaded_at = excluded.uploaded_at, bytes = excluded.bytes, code_changed_at = excluded.code_changed_at"
        ))
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
        match placement {
            Placement::Active => {
                sqlx::query(&format!(
                    "INSERT INTO {schema}.projections (name, version, status, error, updated_at) \
                     VALUES ($1, $2, 'running', NULL, $3) \
                     ON CONFLICT (name) DO UPDATE SET version = excluded.version, \
                     updated_at = excluded.updated_at, building = CASE WHEN \
                     {schema}.projections.building = excluded.version THEN NULL \
                     ELSE {schema}.projections.building END"
                ))
                .bind(&plugin.name)
                .bind(&plugin.version)
                .bind(now)
                .execute(&mut *tx)
                .await
            }
            Placement::Build { manual } => {
                sqlx::query(&format!(
                    "UPDATE {schema}.projections SET building = $1, manual_cutover = $2, \
                     updated_at = $3 WHERE name = $4"
                ))
                .bind(&plugin.version)
                .bind(manual)
                .bind(now)
                .bind(&plugin.name)
                .execute(&mut *tx)
                .await
            }
            Placement::Keep => sqlx::query("SELECT 1").execute(&mut *tx).await,
        }
        .map_err(StoreError::db("placing a plugin"))?;
        self.bump_revision(&mut tx).await?;
        tx.commit()
            .await
            .map_err(StoreError::db("storing a plugin"))?;
        Ok(())
    }

    async fn cut_over(&self, name: &str, from: &str, to: &str) -> Result<CutOver, StoreError> {
        let schema = &self.schema;
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(StoreError::db("cutting over"))?;
        let planned: Option<i32> = sqlx::query_scalar(&format!(
            "SELECT 1 FROM {schema}.projections WHERE name = $1 AND version = $2 AND building = $3 \
             FOR UPDATE"
        ))
        .bind(name)
        .bind(from)
        .bind(to)
        .fetch_optional(&mut *tx)
        .await
        .map_err(StoreError::db("cutting over"))?;
        if planned.is_none() {
            return Ok(CutOver::Changed);
        }
        // Share-locked: the active version's next commit waits for this decision, so the
        // comparison holds until the commit below.
        let positions: Vec<(String, i64)> = sqlx::query_as(&format!(
            "SELECT version, position FROM {schema}.checkpoints \
             WHERE projection = $1 AND version IN ($2, $3) FOR SHARE"
        ))
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
        sqlx::query(&format!(
            "UPDATE {schema}.projections SET version = $1, building = NULL, manual_cutover = false, \
             updated_at = $2 WHERE name = $3"
        ))
        .bind(to)
        .bind(now_ms())
        .bind(name)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db("cutting over"))?;
        self.bump_revision(&mut tx).await?;
        tx.commit().await.map_err(StoreError::db("cutting over"))?;
        Ok(CutOver::Done)
    }

    async fn build_version(
        &self,
        name: &str,
        version: &str,
        manual: bool,
    ) -> Result<bool, StoreError> {
        let schema = &self.schema;
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(StoreError::db("starting a build"))?;
        let changed = sqlx::query(&format!(
            "UPDATE {schema}.projections SET building = $1, manual_cutover = $2, updated_at = $3 \
             WHERE name = $4 AND EXISTS (SELECT 1 FROM {schema}.plugins WHERE name = $4 AND version = $1)"
        ))
        .bind(version)
        .bind(manual)
        .bind(now_ms())
        .bind(name)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db("starting a build"))?
        .rows_affected();
        if changed == 0 {
            return Ok(false);
        }
        self.bump_revision(&mut tx).await?;
        tx.commit()
            .await
            .map_err(StoreError::db("starting a build"))?;
        Ok(true)
    }

    async fn drop_version(&self, projection: &Descriptor) -> Result<(), StoreError> {
        let schema = &self.schema;
        let (name, version) = (&projection.name, &projection.version);
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(StoreError::db("dropping a version"))?;
        for collection in &projection.collections {
            let table = self.table(projection, &collection.name);
            sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
                .execute(&mut *tx)
                .await
                .map_err(StoreError::db(format!("dropping {table}")))?;
        }
        for statement in [
            "DELETE FROM {schema}.checkpoints WHERE projection = $1 AND version = $2",
            "DELETE FROM {schema}.dead_letters WHERE projection = $1 AND version = $2",
            "DELETE FROM {schema}.admin_actions WHERE projection = $1 AND version = $2",
            "DELETE FROM {schema}.plugins WHERE name = $1 AND version = $2",
            "UPDATE {schema}.projections SET building = NULL WHERE name = $1 AND building = $2",
        ] {
            sqlx::query(&statement.replace("{schema}", schema))
                .bind(name)
                .bind(version)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::db("dropping a version"))?;
        }
        self.bump_revision(&mut tx).await?;
        tx.commit()
            .await
            .map_err(StoreError::db("dropping a version"))?;
        Ok(())
    }

    async fn drop_projection(&self, name: &str) -> Result<(), StoreError> {
        let schema = &self.schema;
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(StoreError::db("removing a projection"))?;
        for statement in [
            "DELETE FROM {schema}.projections WHERE name = $1",
            "DELETE FROM {schema}.plugins WHERE name = $1",
            "DELETE FROM {schema}.checkpoints WHERE projection = $1",
            "DELETE FROM {schema}.dead_letters WHERE projection = $1",
            "DELETE FROM {schema}.admin_commands WHERE projection = $1",
        ] {
            sqlx::query(&statement.replace("{schema}", schema))
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::db("removing a projection"))?;
        }
        self.bump_revision(&mut tx).await?;
        tx.commit()
            .await
            .map_err(StoreError::db("removing a projection"))?;
        Ok(())
    }

    async fn prepare(&self, projection: &Descriptor) -> Result<u64, StoreError> {
        let schema = &self.schema;
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(StoreError::db("preparing a projection version"))?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(DDL_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db("locking for DDL"))?;
        for collection in &projection.collections {
            let bare = table_name(projection, &collection.name);
            let table = self.table(projection, &collection.name);
            // Each indexed field is a stored generated column with a plain index: an update
            // that leaves the indexed values alone is then HOT (no index entry written) when
            // the page has room, which the fill factor keeps.
            let fields = collection.fields();
            let mut columns = String::new();
            for field in &fields {
                columns.push_str(&format!(
                    ", {} jsonb GENERATED ALWAYS AS {} STORED",
                    field_column(field),
                    json_path(field)
                ));
            }
            let ddl = format!(
                "CREATE TABLE IF NOT EXISTS {table} (key text COLLATE \"C\" PRIMARY KEY, \
                 doc jsonb NOT NULL, version bigint NOT NULL, updated_at bigint NOT NULL{columns}) \
                 WITH (fillfactor = 80)"
            );
            sqlx::query(&ddl)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::db(format!("creating {table}")))?;
            // A table made before a field was declared (or by an older projector) gets the
            // missing columns.
            let existing: Vec<String> = sqlx::query_scalar(
                "SELECT attname::text FROM pg_attribute WHERE attrelid = $1::regclass \
                 AND attnum > 0 AND NOT attisdropped",
            )
            .bind(&table)
            .fetch_all(&mut *tx)
            .await
            .map_err(StoreError::db(format!("reading the columns of {table}")))?;
            for field in &fields {
                let column = field_column(field);
                if !existing.iter().any(|c| format!("\"{c}\"") == column) {
                    sqlx::query(&format!(
                        "ALTER TABLE {table} ADD COLUMN {column} jsonb GENERATED ALWAYS AS {} STORED",
                        json_path(field)
                    ))
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::db(format!("adding {column} to {table}")))?;
                }
            }
            for field in &fields {
                // At most 63 bytes and unique in the schema: the table's hash (the end of its
                // name), the field's hash, then as much of the field as fits.
                let digest = Sha256::digest(field.as_bytes());
                let mut readable = field.replace('.', "_");
                readable.truncate(39);
                let index = format!(
                    "ixg_{}_{:02x}{:02x}{:02x}{:02x}_{readable}",
                    &bare[bare.len().saturating_sub(8)..],
                    digest[0],
                    digest[1],
                    digest[2],
                    digest[3],
                );
                let ddl = format!(
                    "CREATE INDEX IF NOT EXISTS \"{index}\" ON {table} ({})",
                    field_column(field)
                );
                sqlx::query(&ddl)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::db(format!("creating index {index}")))?;
            }
        }
        let now = now_ms();
        sqlx::query(&format!(
            "INSERT INTO {schema}.checkpoints (projection, version, position, updated_at) \
             VALUES ($1, $2, 0, $3) ON CONFLICT DO NOTHING"
        ))
        .bind(&projection.name)
        .bind(&projection.version)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db("creating the checkpoint"))?;
        tx.commit()
            .await
            .map_err(StoreError::db("preparing a projection version"))?;
        self.checkpoint(projection).await
    }

    async fn checkpoint(&self, projection: &Descriptor) -> Result<u64, StoreError> {
        let position: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT position FROM {}.checkpoints WHERE projection = $1 AND version = $2",
            self.schema
        ))
        .bind(&projection.name)
        .bind(&projection.version)
        .fetch_optional(&self.pool)
        .await
        .map_err(StoreError::db("reading the checkpoint"))?;
        Ok(position.unwrap_or(0) as u64)
    }

    async fn commit(&self, projection: &Descriptor, batch: &Batch<'_>) -> Result<(), StoreError> {
        let Batch {
            output,
            from,
            to,
            durable,
            ..
        } = *batch;
        let now = now_ms();
        if batch.only_documents() {
            return self.commit_documents(projection, batch, now).await;
        }
        // One round trip for both.
        let begin = if durable {
            "BEGIN".to_owned()
        } else {
            format!("BEGIN; {}", self.commit_setting)
        };
        let mut tx = self
            .pool
            .begin_with(begin)
            .await
            .map_err(StoreError::db("beginning a batch"))?;
        self.write_letters(&mut tx, projection, batch, now).await?;
        self.log_actions(&mut tx, projection, &output.actions, now)
            .await?;
        for (collection, writes) in &output.writes {
            let table = self.table(projection, collection);
            let Split {
                keys,
                docs,
                deletes,
            } = split(projection, collection, writes)?;
            if !keys.is_empty() {
                // One statement for the whole batch: the arrays travel as two parameters.
                sqlx::query(&format!(
                    "INSERT INTO {table} AS t (key, doc, version, updated_at) \
                     SELECT k, d::jsonb, 1, $3 FROM UNNEST($1::text[], $2::text[]) AS u(k, d) \
                     {UPSERT}"
                ))
                .bind(&keys)
                .bind(&docs)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::db(format!("writing documents to {table}")))?;
            }
            if !deletes.is_empty() {
                sqlx::query(&format!("DELETE FROM {table} WHERE key = ANY($1::text[])"))
                    .bind(&deletes)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::db(format!("deleting documents from {table}")))?;
            }
        }
        let moved = sqlx::query(&format!(
            "UPDATE {}.checkpoints SET position = $1, updated_at = $2 \
             WHERE projection = $3 AND version = $4 AND position = $5",
            self.schema
        ))
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

    async fn parked_streams(
        &self,
        projection: &Descriptor,
    ) -> Result<std::collections::HashMap<String, u64>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT stream, MIN(position) FROM {}.dead_letters WHERE projection = $1 \
             AND version = $2 AND parked_behind IS NULL AND stream IS NOT NULL \
             AND state = 'open' GROUP BY stream",
            self.schema
        ))
        .bind(&projection.name)
        .bind(&projection.version)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::db("reading parked streams"))?;
        parked_from_rows(&rows)
    }

    async fn parked(&self, projection: &Descriptor) -> Result<Vec<ParkedStream>, StoreError> {
        let schema = &self.schema;
        let rows = sqlx::query(&format!(
            "SELECT h.stream, h.position, h.reason, (SELECT COUNT(*) FROM {schema}.dead_letters p \
             WHERE p.projection = h.projection AND p.version = h.version \
             AND p.parked_behind = h.position) \
             FROM {schema}.dead_letters h WHERE h.projection = $1 AND h.version = $2 \
             AND h.parked_behind IS NULL AND h.stream IS NOT NULL AND h.state = 'open' \
             ORDER BY h.stream COLLATE \"C\", h.position"
        ))
        .bind(&projection.name)
        .bind(&projection.version)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::db("reading parked streams"))?;
        parked_streams_from_rows(&rows)
    }

    async fn letter_counts(&self, projection: &Descriptor) -> Result<LetterCounts, StoreError> {
        let schema = &self.schema;
        let counts: (i64, i64, i64) = sqlx::query_as(&format!(
            "SELECT \
             (SELECT COUNT(*) FROM {schema}.dead_letters WHERE projection = $1 AND version = $2 \
              AND state = 'open' AND parked_behind IS NULL), \
             (SELECT COUNT(*) FROM {schema}.dead_letters WHERE projection = $1 AND version = $2 \
              AND state = 'open' AND parked_behind IS NULL AND stream IS NOT NULL), \
             (SELECT COUNT(*) FROM {schema}.dead_letters p WHERE p.projection = $1 \
              AND p.version = $2 AND p.parked_behind IN (SELECT h.position \
              FROM {schema}.dead_letters h WHERE h.projection = $1 AND h.version = $2 \
              AND h.parked_behind IS NULL AND h.stream IS NOT NULL AND h.state = 'open'))"
        ))
        .bind(&projection.name)
        .bind(&projection.version)
        .fetch_one(&self.pool)
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
            "SELECT {LETTER_COLUMNS}, NULL::text FROM {}.dead_letters \
             WHERE projection = $1 AND version = $2 AND position > $3 ORDER BY position LIMIT $4",
            self.schema
        ))
        .bind(&projection.name)
        .bind(&projection.version)
        .bind(after as i64)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
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
            .letters_where(projection, "position = $3", position as i64)
            .await?;
        Ok(letters.into_iter().next())
    }

    async fn parked_behind(
        &self,
        projection: &Descriptor,
        position: u64,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        self.letters_where(projection, "parked_behind = $3", position as i64)
            .await
    }

    async fn record_action(
        &self,
        projection: &Descriptor,
        action: &AdminAction,
    ) -> Result<(), StoreError> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(StoreError::db("recording an admin action"))?;
        self.insert_actions(&mut conn, projection, std::slice::from_ref(action))
            .await
    }

    async fn paused(&self, projection: &str) -> Result<bool, StoreError> {
        let paused: Option<bool> = sqlx::query_scalar(&format!(
            "SELECT paused FROM {}.projections WHERE name = $1",
            self.schema
        ))
        .bind(projection)
        .fetch_optional(&self.pool)
        .await
        .map_err(StoreError::db("reading whether the projection is paused"))?;
        Ok(paused.unwrap_or(false))
    }

    async fn set_paused(&self, projection: &str, paused: bool) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "UPDATE {}.projections SET paused = $1, updated_at = $2 WHERE name = $3",
            self.schema
        ))
        .bind(paused)
        .bind(now_ms())
        .bind(projection)
        .execute(&self.pool)
        .await
        .map_err(StoreError::db("pausing or resuming the projection"))?;
        Ok(())
    }

    async fn submit_command(&self, projection: &str, command: &str) -> Result<i64, StoreError> {
        let schema = &self.schema;
        let now = now_ms();
        // Answers read long ago go in the same statement; the partial index makes that a
        // lookup of nothing mostly.
        sqlx::query_scalar(&format!(
            "WITH gone AS (DELETE FROM {schema}.admin_commands WHERE answered_at < $4) \
             INSERT INTO {schema}.admin_commands (projection, command, created_at) \
             VALUES ($1, $2, $3) RETURNING id"
        ))
        .bind(projection)
        .bind(pg_text(command).as_ref())
        .bind(now)
        .bind(now - ANSWERED_COMMANDS_KEPT_MS)
        .fetch_one(&self.pool)
        .await
        .map_err(StoreError::db("queueing an admin command"))
    }

    async fn pending_commands(&self, projection: &str) -> Result<Vec<(i64, String)>, StoreError> {
        sqlx::query_as(&format!(
            "SELECT id, command FROM {}.admin_commands WHERE projection = $1 AND answer IS NULL \
             ORDER BY id",
            self.schema
        ))
        .bind(projection)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::db("reading admin commands"))
    }

    async fn answer_command(&self, id: i64, answer: &str, claim: bool) -> Result<bool, StoreError> {
        let only_new = if claim { " AND answer IS NULL" } else { "" };
        let done = sqlx::query(&format!(
            "UPDATE {}.admin_commands SET answer = $1, answered_at = $2 WHERE id = $3{only_new}",
            self.schema
        ))
        .bind(pg_text(answer).as_ref())
        .bind(now_ms())
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(StoreError::db("answering an admin command"))?;
        Ok(done.rows_affected() == 1)
    }

    async fn command_answer(&self, id: i64) -> Result<Option<String>, StoreError> {
        let answer: Option<Option<String>> = sqlx::query_scalar(&format!(
            "SELECT answer FROM {}.admin_commands WHERE id = $1",
            self.schema
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(StoreError::db("reading an admin command's answer"))?;
        Ok(answer.flatten())
    }

    async fn try_lease(&self, projection: &str) -> Result<Option<Lease>, StoreError> {
        let key = lease_key(&self.schema, projection);
        let cached = self
            .lease_candidates
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(projection);
        let (mut conn, granted) = match cached {
            // A kept session may have died meanwhile (a restart, a dropped link): then one
            // more try on a fresh one, so standing by never reports a stale socket.
            Some(conn) => match try_advisory_lock(conn, key).await {
                Ok(tried) => tried,
                Err(_) => try_advisory_lock(self.fresh_lease_session().await?, key).await?,
            },
            None => try_advisory_lock(self.fresh_lease_session().await?, key).await?,
        };
        if !granted {
            self.lease_candidates
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(projection.to_owned(), conn);
            return Ok(None);
        }
        // The lock lives as long as this session: a task keeps the connection, checks it, and
        // says when it is gone (the lock with it).
        let (lost_tx, lost_rx) = watch::channel(false);
        let (release_tx, mut release_rx) = oneshot::channel::<()>();
        let name = projection.to_owned();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut release_rx => {
                        let _ = sqlx::query("SELECT pg_advisory_unlock($1)").bind(key).execute(&mut conn).await;
                        let _ = conn.close().await;
                        return;
                    }
                    _ = tokio::time::sleep(LEASE_CHECK) => {
                        // A half-open connection can hang a ping for minutes: bounded.
                        let pinged = tokio::time::timeout(LEASE_CHECK * 5, conn.ping()).await;
                        if let Err(err) = pinged.map_err(|_| "no answer within 5 s".to_owned())
                            .and_then(|r| r.map_err(|e| e.to_string()))
                        {
                            tracing::warn!(projection = %name, error = %err, "lease connection lost: stopping this projection's runner");
                            let _ = lost_tx.send(true);
                            return;
                        }
                    }
                }
            }
        });
        Ok(Some(Lease::new(lost_rx, release_tx)))
    }

    async fn set_status(
        &self,
        projection: &str,
        status: ProjectionStatus,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "UPDATE {}.projections SET status = $1, error = $2, updated_at = $3 WHERE name = $4",
            self.schema
        ))
        .bind(status.as_str())
        .bind(error)
        .bind(now_ms())
        .bind(projection)
        .execute(&self.pool)
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
        let table = self.table(projection, collection);
        let row = sqlx::query(&format!(
            "SELECT key, doc::text, version, updated_at FROM {table} WHERE key = $1"
        ))
        .bind(key)
        .fetch_optional(&self.pool)
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
        let table = self.table(projection, collection);
        let rows = sqlx::query(&format!(
            "SELECT key, doc::text, version, updated_at FROM {table} WHERE key = ANY($1::text[])"
        ))
        .bind(keys)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::db(format!("reading {table}")))?;
        rows.iter().map(document_from_row).collect()
    }

    async fn list(
        &self,
        projection: &Descriptor,
        collection: &str,
        query: &ListQuery,
    ) -> Result<Vec<Document>, StoreError> {
        let table = self.table(projection, collection);
        let mut sql = QueryBuilder::new(format!(
            "SELECT key, doc::text, version, updated_at FROM {table} WHERE true"
        ));
        for (field, value) in &query.filters {
            // A query string has no types: "42" matches the number 42 and the string "42",
            // "true" the boolean; one `= ANY` the field column's index serves.
            let mut candidates = vec![serde_json::Value::String(value.clone()).to_string()];
            if let Ok(n) = value.parse::<i64>() {
                candidates.push(n.to_string());
            } else if let Ok(x) = value.parse::<f64>() {
                if x.is_finite() {
                    candidates.push(serde_json::Value::from(x).to_string());
                }
            } else if let Ok(b) = value.parse::<bool>() {
                candidates.push(b.to_string());
            }
            sql.push(format!(" AND {} = ANY(", field_column(field)))
                .push_bind(candidates)
                .push("::jsonb[])");
        }
        if let Some(after) = &query.after {
            sql.push(" AND key > ").push_bind(after.clone());
        }
        // Keys are `COLLATE "C"`: byte order, as on SQLite, and the primary key serves it.
        sql.push(" ORDER BY key LIMIT ")
            .push_bind(i64::from(query.limit));
        let rows = sql
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::db(format!("listing {table}")))?;
        rows.iter().map(document_from_row).collect()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
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
        let rows = sqlx::query(&format!(
            "SELECT {LOGGED_COLUMNS} FROM {}.observer_actions WHERE observer = $1 AND id > $2 \
             AND state IN ('pending', 'dead') ORDER BY id LIMIT $3",
            self.schema
        ))
        .bind(observer)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::db("reading open observer actions"))?;
        rows.iter().map(logged_from_row).collect()
    }

    async fn actions_by_id(&self, observer: &str, ids: &[i64]) -> Result<Vec<Logged>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {LOGGED_COLUMNS} FROM {}.observer_actions WHERE observer = $1 \
             AND id = ANY($2) ORDER BY id",
            self.schema
        ))
        .bind(observer)
        .bind(ids)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::db("reading observer actions"))?;
        rows.iter().map(logged_from_row).collect()
    }

    async fn update_actions(&self, updates: &[Update]) -> Result<(), StoreError> {
        if updates.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = updates.iter().map(|u| u.id).collect();
        let states: Vec<&str> = updates.iter().map(|u| u.state.as_str()).collect();
        let attempts: Vec<i64> = updates.iter().map(|u| i64::from(u.attempts)).collect();
        let next_at: Vec<i64> = updates.iter().map(|u| u.next_at).collect();
        let status: Vec<Option<i64>> = updates
            .iter()
            .map(|u| u.last_status.map(i64::from))
            .collect();
        let errors: Vec<Option<String>> = updates.iter().map(|u| u.last_error.clone()).collect();
        sqlx::query(&format!(
            "UPDATE {}.observer_actions AS a SET state = u.state, attempts = u.attempts, \
             next_at = u.next_at, last_status = u.last_status, last_error = u.last_error, \
             updated_at = $7 \
             FROM UNNEST($1::bigint[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[], \
             $6::text[]) AS u(id, state, attempts, next_at, last_status, last_error) \
             WHERE a.id = u.id",
            self.schema
        ))
        .bind(&ids)
        .bind(&states)
        .bind(&attempts)
        .bind(&next_at)
        .bind(&status)
        .bind(&errors)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(StoreError::db("recording action deliveries"))?;
        Ok(())
    }

    async fn list_actions(
        &self,
        observer: &str,
        state: ActionState,
        after: i64,
        limit: u32,
    ) -> Result<Vec<Logged>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {LOGGED_COLUMNS} FROM {}.observer_actions WHERE observer = $1 \
             AND state = $2 AND id > $3 ORDER BY id LIMIT $4",
            self.schema
        ))
        .bind(observer)
        .bind(state.as_str())
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::db("listing observer actions"))?;
        rows.iter().map(logged_from_row).collect()
    }

    async fn action_counts(&self, observer: &str) -> Result<Counts, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(&format!(
            "SELECT state, COUNT(*) FROM {}.observer_actions WHERE observer = $1 GROUP BY state",
            self.schema
        ))
        .bind(observer)
        .fetch_all(&self.pool)
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
        let (state, attempts) = if retry {
            ("pending", "0")
        } else {
            ("skipped", "attempts")
        };
        let row = sqlx::query(&format!(
            "UPDATE {}.observer_actions SET state = '{state}', attempts = {attempts}, \
             next_at = 0, updated_at = $1 WHERE observer = $2 AND id = $3 AND state = 'dead' \
             RETURNING {LOGGED_COLUMNS}",
            self.schema
        ))
        .bind(now_ms())
        .bind(observer)
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(StoreError::db("resolving a dead action"))?;
        row.as_ref().map(logged_from_row).transpose()
    }
}

impl Postgres {
    /// Logs a batch's decided actions in its transaction, in one statement; an action whose
    /// key is logged already (decided again by a replay) is passed over.
    async fn log_actions(
        &self,
        tx: &mut sqlx::PgConnection,
        observer: &Descriptor,
        actions: &[crate::observer::Decided],
        now: i64,
    ) -> Result<(), StoreError> {
        if actions.is_empty() {
            return Ok(());
        }
        let event_ids: Vec<&str> = actions.iter().map(|a| a.event_id.as_str()).collect();
        let indexes: Vec<i64> = actions.iter().map(|a| i64::from(a.index)).collect();
        let streams: Vec<&str> = actions.iter().map(|a| a.stream.as_str()).collect();
        let positions: Vec<i64> = actions.iter().map(|a| a.position as i64).collect();
        let kinds: Vec<&str> = actions.iter().map(|a| a.kind.as_str()).collect();
        let specs: Vec<String> = actions.iter().map(|a| a.kind.spec()).collect();
        let bodies: Vec<&[u8]> = actions.iter().map(|a| a.kind.body()).collect();
        // WITH ORDINALITY: ids follow the batch's order, which is each stream's event order.
        sqlx::query(&format!(
            "INSERT INTO {}.observer_actions (observer, event_id, idx, stream, position, kind, \
             spec, body, created_at, updated_at) \
             SELECT $1, e, i, s, p, k, sp, b, $9, $9 FROM UNNEST($2::text[], $3::bigint[], \
             $4::text[], $5::bigint[], $6::text[], $7::text[], $8::bytea[]) \
             WITH ORDINALITY AS t(e, i, s, p, k, sp, b, n) ORDER BY n \
             ON CONFLICT (observer, event_id, idx) DO NOTHING",
            self.schema
        ))
        .bind(&observer.name)
        .bind(&event_ids)
        .bind(&indexes)
        .bind(&streams)
        .bind(&positions)
        .bind(&kinds)
        .bind(&specs)
        .bind(&bodies)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db("logging observer actions"))?;
        Ok(())
    }
}

/// The upsert of a batch's documents, after `INSERT INTO table AS t ... SELECT ...`.
const UPSERT: &str = "ON CONFLICT (key) DO UPDATE SET doc = excluded.doc, \
                      version = t.version + 1, updated_at = excluded.updated_at";

/// A collection's writes as the arrays the statements bind: documents to upsert (keys and
/// their JSON text) and keys to delete.
struct Split<'a> {
    keys: Vec<&'a str>,
    docs: Vec<&'a str>,
    deletes: Vec<&'a str>,
}

fn split<'a>(
    projection: &Descriptor,
    collection: &str,
    writes: &'a BTreeMap<String, Option<Vec<u8>>>,
) -> Result<Split<'a>, StoreError> {
    let mut split = Split {
        keys: Vec::with_capacity(writes.len()),
        docs: Vec::with_capacity(writes.len()),
        deletes: Vec::new(),
    };
    for (key, doc) in writes {
        match doc {
            Some(doc) => {
                let text = std::str::from_utf8(doc).map_err(|e| StoreError::InvalidDocument {
                    projection: projection.name.clone(),
                    collection: collection.to_owned(),
                    key: key.clone(),
                    reason: e.to_string(),
                })?;
                split.keys.push(key.as_str());
                split.docs.push(text);
            }
            None => split.deletes.push(key.as_str()),
        }
    }
    Ok(split)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redact("postgres://app:s3cret@db:5432/app"),
            "postgres://app:***@db:5432/app"
        );
        assert_eq!(redact("postgres://db/app"), "postgres://db/app");
    }

    #[test]
    fn lease_keys_differ_per_projection() {
        assert_ne!(lease_key("s", "a"), lease_key("s", "b"));
        assert_ne!(lease_key("s", "a"), lease_key("t", "a"));
        assert_eq!(lease_key("s", "a"), lease_key("s", "a"));
    }
}
