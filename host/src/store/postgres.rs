//! The production store: PostgreSQL, usually the application's own database. projector's
//! catalog and read models live in one schema of their own (`projector` by default); documents
//! are JSONB; a batch is one transaction of set-based statements (`UNNEST` arrays), whatever
//! its size.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool, QueryBuilder};
use tokio::sync::{oneshot, watch};

use super::{
    dead_letter_from_row, document_from_row, field_column, now_ms, parked_from_rows, table_name,
    DeadLetter, Document, Lease, ListQuery, ProjectionStatus, Store, StoreError,
};
use crate::config::PostgresConfig;
use crate::runtime::{BatchOutput, Descriptor};

const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        include_str!("../../../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        include_str!("../../../migrations/postgres/0002_dead_letters.sql"),
    ),
];

/// How often a held lease checks that its connection (and so the lock) is still there.
const LEASE_CHECK: Duration = Duration::from_secs(1);

/// Serialises DDL across instances starting at once (`CREATE ... IF NOT EXISTS` races).
const DDL_LOCK: i64 = 0x7072_6f6a_6464_6c00; // "projddl\0"

#[derive(Clone)]
pub struct Postgres {
    pub(crate) pool: PgPool,
    options: PgConnectOptions,
    /// The schema of the catalog and read models, quoted.
    schema: String,
    /// `SET LOCAL synchronous_commit = ...` for batch commits (validated by the config).
    commit_setting: String,
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
        let schema = &self.schema;
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(StoreError::db("registering a projection"))?;
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
            "INSERT INTO {schema}.projections (name, version, status, error, updated_at) \
             VALUES ($1, $2, 'running', NULL, $3) \
             ON CONFLICT (name) DO UPDATE SET version = excluded.version, status = 'running', \
             error = NULL, updated_at = excluded.updated_at"
        ))
        .bind(&projection.name)
        .bind(&projection.version)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db("recording the projection"))?;
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
            .map_err(StoreError::db("registering a projection"))?;
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

    async fn commit(
        &self,
        projection: &Descriptor,
        output: &BatchOutput,
        dead_letters: &[DeadLetter],
        from: u64,
        to: u64,
        durable: bool,
    ) -> Result<(), StoreError> {
        let now = now_ms();
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
        if !dead_letters.is_empty() {
            let column = |f: fn(&DeadLetter) -> Option<String>| -> Vec<Option<String>> {
                dead_letters.iter().map(f).collect()
            };
            let positions: Vec<i64> = dead_letters.iter().map(|d| d.position as i64).collect();
            let behind: Vec<Option<i64>> = dead_letters
                .iter()
                .map(|d| d.parked_behind.map(|p| p as i64))
                .collect();
            sqlx::query(&format!(
                "INSERT INTO {}.dead_letters (projection, version, position, event_id, stream, \
                 reason, parked_behind, created_at) \
                 SELECT $1, $2, p, e, s, r, b, $3 FROM UNNEST($4::bigint[], $5::text[], \
                 $6::text[], $7::text[], $8::bigint[]) AS u(p, e, s, r, b) ON CONFLICT DO NOTHING",
                self.schema
            ))
            .bind(&projection.name)
            .bind(&projection.version)
            .bind(now)
            .bind(&positions)
            .bind(column(|d| d.event_id.clone()))
            .bind(column(|d| d.stream.clone()))
            .bind(column(|d| Some(d.reason.clone())))
            .bind(&behind)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db("writing dead letters"))?;
        }
        for (collection, writes) in &output.writes {
            let table = self.table(projection, collection);
            let mut keys = Vec::with_capacity(writes.len());
            let mut docs = Vec::with_capacity(writes.len());
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
                        keys.push(key.as_str());
                        docs.push(text);
                    }
                    None => deletes.push(key.as_str()),
                }
            }
            if !keys.is_empty() {
                // One statement for the whole batch: the arrays travel as two parameters.
                sqlx::query(&format!(
                    "INSERT INTO {table} AS t (key, doc, version, updated_at) \
                     SELECT k, d::jsonb, 1, $3 FROM UNNEST($1::text[], $2::text[]) AS u(k, d) \
                     ON CONFLICT (key) DO UPDATE SET doc = excluded.doc, \
                     version = t.version + 1, updated_at = excluded.updated_at"
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
             AND version = $2 AND stream IS NOT NULL GROUP BY stream",
            self.schema
        ))
        .bind(&projection.name)
        .bind(&projection.version)
        .fetch_all(&self.pool)
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
        let rows = sqlx::query(&format!(
            "SELECT position, event_id, stream, reason, parked_behind FROM {}.dead_letters \
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
        rows.iter().map(dead_letter_from_row).collect()
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
            // "true" the boolean; one `= ANY` the expression index serves.
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
