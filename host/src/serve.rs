//! `projector serve`: open the database, load the plugins, start a runner per projection and
//! the HTTP API; stop cleanly (between batches) on shutdown.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;

use crate::api::{self, server, AppState};
use crate::config::Config;
use crate::config::SourceKind;
use crate::consistency::Appends;
use crate::data_lock::{DataLock, LockError};
use crate::deploy::Deployer;
use crate::registry::Registry;
use crate::runtime::{Runtime, RuntimeConfig, RuntimeError};
use crate::source::kafka::{KafkaError, KafkaSource};
use crate::source::outbox::SqliteOutbox;
use crate::source::pg_outbox::PgOutbox;
use crate::source::{Source, SourceError};
use crate::store::postgres::{redact, Postgres};
use crate::store::sqlite::Sqlite;
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Plugin(#[from] RuntimeError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("cannot list plugins in {path}: {source}")]
    Plugins {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Deploy(crate::deploy::DeployError),
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("two plugins are both projection {name:?}: {first} and {second}")]
    DuplicateProjection {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("unsupported database URL {0:?} (expected sqlite://FILE or postgres://USER@HOST/DB)")]
    DatabaseUrl(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("HTTP server: {0}")]
    Http(std::io::Error),
}

/// Every `*.wasm` directly in `dir`, in name order.
fn plugin_files(dir: &Path) -> Result<Vec<PathBuf>, ServeError> {
    let list_err = |source| ServeError::Plugins {
        path: dir.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(list_err)? {
        let path = entry.map_err(list_err)?.path();
        if path.is_file() && path.extension().is_some_and(|e| e == "wasm") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Refuses a folder where two files are the same projection: which one to run would depend
/// on the order files are listed in.
fn check_duplicates(runtime: &Runtime, files: &[PathBuf]) -> Result<(), ServeError> {
    let mut by_name: BTreeMap<String, PathBuf> = BTreeMap::new();
    for path in files {
        let plugin = runtime.load_file(path)?;
        let name = plugin.name().to_owned();
        if let Some(first) = by_name.get(&name) {
            return Err(ServeError::DuplicateProjection {
                name,
                first: first.clone(),
                second: path.clone(),
            });
        }
        by_name.insert(name, path.clone());
    }
    Ok(())
}

/// The folder of a SQLite database file, where its server's lock lives; `None` for an
/// in-memory database, which no other process can open.
///
/// PostgreSQL gets no lock: several instances on one database is the designed way to scale out
/// (leases decide who runs what), and the data dir then holds only the compiled-plugin cache,
/// whose entries are written to a temporary name and renamed, safe to share.
fn sqlite_folder(url: &str) -> Option<PathBuf> {
    use sqlx::sqlite::SqliteConnectOptions;
    use std::str::FromStr;
    if crate::store::sqlite::in_memory(url) {
        return None;
    }
    // An unparsable URL is Sqlite::open's to report, with its own message.
    let options = SqliteConnectOptions::from_str(url).ok()?;
    let dir = options.get_filename().parent()?;
    Some(if dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        dir.to_owned()
    })
}

/// Runs until `shutdown` completes. `on_listening` is told the bound address (useful with
/// port 0).
pub async fn serve(
    config: Config,
    on_listening: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    // Before anything opens files, so the connection cap below is computed from the limit
    // every part of the server then shares.
    let fd_limit = server::raise_fd_limit();
    let url = config.database_url();
    // Taken before the database is opened (and migrated), released after the last runner
    // has stopped writing.
    let data_lock = match url.starts_with("sqlite:").then(|| sqlite_folder(&url)) {
        Some(Some(dir)) => Some(DataLock::acquire(&dir)?),
        _ => None,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let kafka = config.source.kind == SourceKind::Kafka;
    let mut consuming = None;
    let (store, source): (Arc<dyn Store>, Arc<dyn Source>) = if url.starts_with("sqlite:") {
        let db = Sqlite::open(&url).await?;
        let outbox = Arc::new(SqliteOutbox::new(db.clone()).await?);
        if kafka {
            let (started, task) =
                KafkaSource::start(&config.kafka, outbox.clone(), stop_rx.clone())?;
            consuming = Some((started.stats, task));
        }
        (Arc::new(db), outbox)
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        let db = Postgres::open(&url, &config.postgres).await?;
        // With Kafka the log is the host's own table, never the outbox Debezium reads.
        let log = if kafka {
            crate::source::kafka::postgres::log_config(&config.postgres.schema)
        } else {
            config.outbox.clone()
        };
        tracing::info!(database = %redact(&url), log = %log.table, "using PostgreSQL");
        let outbox = Arc::new(PgOutbox::open(db.clone(), &log).await?);
        if kafka {
            crate::source::kafka::postgres::prepare(&db).await?;
            let (started, task) =
                KafkaSource::start(&config.kafka, outbox.clone(), stop_rx.clone())?;
            consuming = Some((started.stats, task));
        }
        (Arc::new(db), outbox)
    } else {
        return Err(ServeError::DatabaseUrl(redact(&url)));
    };

    let runtime = Arc::new(Runtime::new(RuntimeConfig {
        limits: config.limits.clone(),
        cache_dir: Some(config.data_dir.join("cache")),
        plugin_settings: config
            .plugins
            .settings
            .iter()
            .map(|(name, settings)| (name.clone(), Arc::new(settings.clone())))
            .collect(),
    })?);
    let files = plugin_files(&config.plugins.dir)?;
    check_duplicates(&runtime, &files)?;
    if files.is_empty() {
        tracing::warn!(dir = %config.plugins.display(), "no plugins in the folder: serving what the catalog holds (upload with PUT /admin/plugins/NAME)");
    }

    let registry = Arc::new(Registry::default());
    let config = Arc::new(config);
    let deployer = Deployer::new(
        store.clone(),
        source.clone(),
        runtime,
        registry.clone(),
        config.clone(),
        stop_rx.clone(),
    );
    deployer.seed(files).await.map_err(ServeError::Deploy)?;
    deployer.sync(true).await?;
    let following = tokio::spawn(deployer.clone().run());
    if config.watch_plugins {
        tracing::info!(dir = %config.plugins.display(), "watching the plugins folder: a changed file is deployed");
        tokio::spawn(deployer.clone().watch(config.plugins.dir.clone()));
    }
    if config.admin.token.is_empty() {
        tracing::info!("admin API off: set admin.token (PROJECTOR_ADMIN__TOKEN) to enable it");
    }

    let app = api::router(AppState {
        appends: Appends::new(source.clone()),
        source,
        store,
        projections: registry.clone(),
        deploy: deployer.clone(),
        config: Arc::new(config.http.clone()),
        admin: Arc::new(config.admin.clone()),
        backpressure: config.backpressure(),
        kafka: consuming.as_ref().map(|(stats, _)| stats.clone()),
        http: Arc::default(),
    });
    let limits = server::Limits::new(&config.http, fd_limit);
    let listener = server::bind(&config.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.listen.clone(),
            source,
        })?;
    let addr = listener.local_addr().map_err(ServeError::Http)?;
    tracing::info!(
        %addr,
        max_connections = limits.max_connections,
        header_read_timeout_ms = config.http.header_read_timeout_ms,
        idle_timeout_ms = config.http.idle_timeout_ms,
        "listening"
    );
    on_listening(addr);
    server::serve(listener, app, limits, shutdown).await;
    let _ = stop_tx.send(true);
    let _ = following.await;
    if let Some((_, task)) = consuming {
        let _ = task.await;
    }
    for supervised in registry.all_supervised() {
        supervised.stopped().await;
    }
    drop(data_lock);
    Ok(())
}
