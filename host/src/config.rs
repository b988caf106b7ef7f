//! One TOML file, overridden by `PROJECTOR_*` environment variables, overridden by flags.
//!
//! An environment variable names a setting by its path with `__` between sections:
//! `PROJECTOR_LISTEN`, `PROJECTOR_RUNNER__MAX_BATCH_EVENTS`, `PROJECTOR_LIMITS__DEADLINE_MS`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::runtime::Limits;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP API listens on.
    pub listen: String,
    /// Where the embedded database and the compiled-plugin cache live.
    pub data_dir: PathBuf,
    /// `sqlite://FILE` or `postgres://USER:PASSWORD@HOST:PORT/DB`; empty means
    /// `sqlite://<data_dir>/projector.db`.
    pub database_url: String,
    /// Folder of plugins: every `*.wasm` in it is loaded (not its subfolders); or a table with
    /// the folder as `dir` and each plugin's settings as `[plugins.<name>]`.
    pub plugins: PluginsConfig,
    /// Deploy a plugin file of the folder again whenever it changes (`serve --watch`).
    pub watch_plugins: bool,
    pub runner: RunnerConfig,
    pub limits: Limits,
    pub http: HttpConfig,
    pub postgres: PostgresConfig,
    pub outbox: OutboxConfig,
    /// Where events come from: the outbox (default) or Kafka.
    pub source: SourceConfig,
    pub kafka: KafkaConfig,
    pub admin: AdminConfig,
    /// Settings of single projections, by name (`[projections.account-balance]`).
    pub projections: std::collections::BTreeMap<String, ProjectionConfig>,
    /// How each observer's actions are delivered, by name (`[observers.large-withdrawal-alert]`).
    pub observers: std::collections::BTreeMap<String, DeliveryConfig>,
}

/// The plugins folder and the settings each plugin reads through its `config` import.
///
/// In the file either `plugins = "DIR"`, or a table: `[plugins] dir = "DIR"` and one table per
/// plugin, `[plugins.large-withdrawal-alert] url = "..."`. A setting reaches the plugin as text:
/// a string as written, a number or boolean in its TOML spelling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginsConfig {
    pub dir: PathBuf,
    pub settings: std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        Self {
            dir: "target/plugins".into(),
            settings: Default::default(),
        }
    }
}

impl PluginsConfig {
    pub fn display(&self) -> std::path::Display<'_> {
        self.dir.display()
    }
}

impl Serialize for PluginsConfig {
    // Without settings, a plain path: so `PROJECTOR_PLUGINS=DIR` overrides it as a value.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        if self.settings.is_empty() {
            return self.dir.serialize(serializer);
        }
        let mut map = serializer.serialize_map(Some(self.settings.len() + 1))?;
        map.serialize_entry("dir", &self.dir)?;
        for (name, settings) in &self.settings {
            map.serialize_entry(name, settings)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for PluginsConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Dir(PathBuf),
            Table(toml::Table),
        }
        let mut config = Self::default();
        let table = match Raw::deserialize(deserializer)? {
            Raw::Dir(dir) => {
                config.dir = dir;
                return Ok(config);
            }
            Raw::Table(table) => table,
        };
        for (key, value) in table {
            match (key.as_str(), value) {
                ("dir", toml::Value::String(dir)) => config.dir = dir.into(),
                ("dir", other) => {
                    return Err(D::Error::custom(format!(
                        "plugins.dir must be a path, not {}",
                        other.type_str()
                    )))
                }
                (name, toml::Value::Table(values)) => {
                    let mut settings = std::collections::BTreeMap::new();
                    for (k, v) in values {
                        let text = match v {
                            toml::Value::String(s) => s,
                            toml::Value::Table(_) => {
                                return Err(D::Error::custom(format!(
                                    "plugins.{name}.{k} is a table: a plugin's settings are \
                                     values (strings, numbers, booleans, arrays)"
                                )))
                            }
                            other => other.to_string(),
                        };
                        settings.insert(k, text);
                    }
                    config.settings.insert(name.to_owned(), settings);
                }
                (name, _) => {
                    return Err(D::Error::custom(format!(
                        "plugins.{name} must be a table of the plugin's settings \
                         ([plugins.{name}]), or `dir`"
                    )))
                }
            }
        }
        Ok(config)
    }
}

/// How an observer's actions are delivered (`[observers.<name>]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Hosts its webhooks may call (`host` or `host:port`; `*.example.com` for subdomains).
    /// Empty: none. A webhook elsewhere is dead-lettered without a request.
    pub allow_hosts: Vec<String>,
    /// One request's time limit, connecting included.
    pub timeout_ms: u64,
    /// The first retry's delay ceiling; each later one is `retry_factor` times more, up to
    /// `retry_max_ms`, and the actual delay is drawn uniformly below it (full jitter).
    pub retry_base_ms: u64,
    pub retry_factor: f64,
    pub retry_max_ms: u64,
    /// Attempts in all (the first included) before an action is dead-lettered.
    pub max_attempts: u32,
    /// Actions in flight at once, each of another stream.
    pub max_in_flight: usize,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            allow_hosts: Vec::new(),
            timeout_ms: 10_000,
            retry_base_ms: 1_000,
            retry_factor: 2.0,
            retry_max_ms: 300_000,
            max_attempts: 10,
            max_in_flight: 64,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            data_dir: "projector-data".into(),
            database_url: String::new(),
            plugins: PluginsConfig::default(),
            watch_plugins: false,
            runner: RunnerConfig::default(),
            limits: Limits::default(),
            http: HttpConfig::default(),
            postgres: PostgresConfig::default(),
            outbox: OutboxConfig::default(),
            source: SourceConfig::default(),
            kafka: KafkaConfig::default(),
            admin: AdminConfig::default(),
            projections: Default::default(),
            observers: Default::default(),
        }
    }
}

/// Where events come from.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SourceConfig {
    pub kind: SourceKind,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// The host reads the outbox table itself (and takes appends through `POST /events`).
    #[default]
    Outbox,
    /// Debezium's outbox EventRouter topics, consumed from Kafka (see `source::kafka`).
    Kafka,
}

/// The Kafka source (`source.kind = "kafka"`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// `host:port[,host:port...]`.
    pub brokers: String,
    /// Topics, comma-separated; one starting with `^` is a regular expression.
    pub topics: String,
    /// The consumer group every instance joins: its members share the partitions.
    pub group_id: String,
    /// How long a member may be silent before its partitions move to the others.
    pub session_timeout_ms: u64,
    /// How long the broker may hold a fetch open waiting for messages: a live event's latency.
    pub fetch_wait_ms: u64,
    /// Where the event type comes from: `header:NAME`, `field:NAME` (a top-level field of the
    /// payload) or `fixed:TYPE`.
    pub event_type: String,
    /// Where the stream type comes from: `topic` (the topic without `topic_prefix`) or
    /// `header:NAME`.
    pub stream_type: String,
    /// Stripped from a topic's name to make the stream type.
    pub topic_prefix: String,
    /// A header carrying the event's version in its stream (Debezium's
    /// `table.fields.additional.placement=version:header:version`); empty: versions are
    /// counted per stream in arrival order.
    pub version_header: String,
    /// Most messages written in one transaction.
    pub max_batch_messages: usize,
    /// librdkafka consumer properties passed through as they are (`security.protocol`,
    /// `sasl.*`, `ssl.*`, fetch tuning). Those projector sets itself are refused
    /// (`KafkaConfig::RESERVED`).
    pub options: BTreeMap<String, String>,
}

const OFFSETS_IN_THE_DATABASE: &str =
    "offsets live in the database, committed with each batch; a partition without one starts at its beginning";

impl KafkaConfig {
    /// Consumer properties the source sets itself, and why.
    pub const RESERVED: &'static [(&'static str, &'static str)] = &[
        ("bootstrap.servers", "use kafka.brokers"),
        ("metadata.broker.list", "use kafka.brokers"),
        ("group.id", "use kafka.group_id"),
        ("session.timeout.ms", "use kafka.session_timeout_ms"),
        ("fetch.wait.max.ms", "use kafka.fetch_wait_ms"),
        ("enable.auto.commit", OFFSETS_IN_THE_DATABASE),
        ("enable.auto.offset.store", OFFSETS_IN_THE_DATABASE),
        ("auto.offset.reset", OFFSETS_IN_THE_DATABASE),
        (
            "partition.assignment.strategy",
            "partitions are assigned incrementally (cooperative-sticky)",
        ),
        (
            "statistics.interval.ms",
            "the lag metrics come from librdkafka's statistics, every second",
        ),
    ];
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            topics: "^outbox\\.event\\..*".into(),
            group_id: "projector".into(),
            session_timeout_ms: 10_000,
            fetch_wait_ms: 10,
            event_type: "header:eventType".into(),
            stream_type: "topic".into(),
            topic_prefix: "outbox.event.".into(),
            version_header: String::new(),
            max_batch_messages: 5000,
            options: BTreeMap::new(),
        }
    }
}

/// The admin API (`/admin/...`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// The bearer token every admin request must carry; empty: the admin API is off (403).
    pub token: String,
    /// The largest plugin `PUT /admin/plugins/{name}` takes, in MiB (413 beyond).
    pub max_plugin_mb: usize,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            token: String::new(),
            max_plugin_mb: 64,
        }
    }
}

/// What a runner does when the plugin fails on an event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Dead-letter the event, park its stream behind it, go on with the others.
    #[default]
    Park,
    /// Stop the projection (status `failed`) until an operator restarts it.
    Stop,
}

/// Settings of one projection; each overrides the `[runner]` one.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProjectionConfig {
    pub on_error: Option<OnError>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunnerConfig {
    /// Most events in one batch (one `handle` call, one transaction). Live traffic never waits
    /// to fill a batch; a backlog is read in batches this big.
    pub max_batch_events: usize,
    /// Most bytes of events in one batch.
    pub max_batch_bytes: usize,
    /// Longest pause between retries after a database error.
    pub max_retry_backoff_ms: u64,
    /// Committed documents kept in memory per projection, so a batch reads them without a
    /// query.
    pub cached_documents: usize,
    /// When the plugin fails on an event: `park` (dead-letter it, park its stream) or `stop`.
    pub on_error: OnError,
    /// Backpressure: while a live projection is further behind than this, appends wait for
    /// it (0: off, for pure ingestion). Instance-wide: read from `[runner]` only.
    pub max_lag_ms: u64,
    /// Past this lag, appends are refused with 503 and `Retry-After` (0: five times
    /// `max_lag_ms`).
    pub refuse_lag_ms: u64,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            max_batch_events: 5_000,
            max_batch_bytes: 8 << 20,
            max_retry_backoff_ms: 5_000,
            cached_documents: 100_000,
            on_error: OnError::Park,
            max_lag_ms: 1_000,
            refuse_lag_ms: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// `timeout_ms` of a read that waits (`wait_for` / `min_position`) when it names none.
    pub wait_timeout_ms: u64,
    /// Cap on a read's `timeout_ms`.
    pub max_wait_timeout_ms: u64,
    /// Page size of a list when it names no `limit`, and the cap on `limit`.
    pub default_page_size: u32,
    pub max_page_size: u32,
    /// How long a client has to send a request's headers: from the connection's accept for its
    /// first request, from the first byte for a later one. A slow or silent client is closed
    /// after it rather than holding a connection and its file descriptor.
    pub header_read_timeout_ms: u64,
    /// How long a keep-alive connection may sit with no request in flight before it is closed.
    /// A request being answered (a read that waits up to `max_wait_timeout_ms`) is never idle.
    pub idle_timeout_ms: u64,
    /// Most connections open at once; beyond it new connections wait in the listen backlog
    /// until one closes. Lowered at start to fit the process's file-descriptor limit.
    pub max_connections: u32,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            wait_timeout_ms: 5_000,
            max_wait_timeout_ms: 60_000,
            default_page_size: 100,
            max_page_size: 1_000,
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            max_connections: 10_000,
        }
    }
}

/// Settings used when `database_url` is a PostgreSQL URL.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// Schema of projector's catalog and read-model tables (created if missing).
    pub schema: String,
    /// Most connections in the pool (readers, commits, appends).
    pub max_connections: u32,
    /// Connections kept open when idle.
    pub min_connections: u32,
    /// How long a request waits for a free connection before failing.
    pub acquire_timeout_ms: u64,
    /// `synchronous_commit` of catch-up batch commits, those with more events already read
    /// behind them, and of batches that move only the checkpoint (a batch that reaches the
    /// head with anything to write, where readers wait, and outbox appends use the database's
    /// own setting). `off` is safe here: a batch's documents and checkpoint
    /// commit together, so a database crash can only lose the newest batches whole, and they
    /// are projected again from the outbox.
    pub synchronous_commit: String,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            schema: "projector".into(),
            max_connections: 16,
            min_connections: 2,
            acquire_timeout_ms: 5_000,
            synchronous_commit: "off".into(),
        }
    }
}

/// The application's outbox table on PostgreSQL. The defaults are Debezium's outbox columns,
/// so projector reads an outbox a team already has; optional columns are used where present.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboxConfig {
    /// The table, optionally schema-qualified (`app.outbox`). Created if missing.
    pub table: String,
    pub id_column: String,
    /// The stream (aggregate) id.
    pub stream_column: String,
    pub stream_type_column: String,
    pub type_column: String,
    pub payload_column: String,
    /// Per-stream version (optional: without it versions read as 0 and appends cannot use
    /// `expected_version`).
    pub version_column: String,
    /// A JSON array of `[key, value]` pairs (optional).
    pub headers_column: String,
    /// A `timestamptz` (optional: without it events carry timestamp 0).
    pub timestamp_column: String,
    /// Added by projector, with the trigger that fills it (see the README: outbox positions).
    pub position_column: String,
    /// Install a trigger that notifies projector when a transaction inserts into the outbox.
    /// Without it, rows from other writers are seen at the next poll.
    pub notify_trigger: bool,
    /// How often the outbox is polled for rows no notification announced.
    pub poll_interval_ms: u64,
    /// How long the watermark may be held (committed rows waiting behind an open transaction
    /// of the outbox's database) before the log warns, naming the transaction, and `/readyz`
    /// answers 503.
    pub watermark_warn_ms: u64,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            table: "outbox".into(),
            id_column: "id".into(),
            stream_column: "aggregateid".into(),
            stream_type_column: "aggregatetype".into(),
            type_column: "type".into(),
            payload_column: "payload".into(),
            version_column: "version".into(),
            headers_column: "headers".into(),
            timestamp_column: "created_at".into(),
            position_column: "position".into(),
            notify_trigger: true,
            poll_interval_ms: 1_000,
            watermark_warn_ms: 5_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("environment variable {name}={value:?}: {reason}")]
    Env {
        name: String,
        value: String,
        reason: String,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Variables with the prefix that are not settings.
const NOT_SETTINGS: &[&str] = &[
    "PROJECTOR_CONFIG",
    "PROJECTOR_LOG",
    "PROJECTOR_LOG_FORMAT",
    "PROJECTOR_SDK",
    "PROJECTOR_URL",
    "PROJECTOR_TOKEN",
    "PROJECTOR_CACHE_DIR",
    "PROJECTOR_PLUGINS_BUILT",
    "PROJECTOR_TEST_POSTGRES",
    "PROJECTOR_TEST_KAFKA",
    "PROJECTOR_CACHE",
];

impl Config {
    /// Defaults, then the file (if any), then the `PROJECTOR_*` variables in `env`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut merged = toml::Value::try_from(Config::default())
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            let from_file: toml::Value = toml::from_str(&text).map_err(|e| ConfigError::File {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
            merge(&mut merged, from_file);
            // Check the file alone so its errors name the file.
            merged
                .clone()
                .try_into::<Config>()
                .map_err(|e| ConfigError::File {
                    path: path.to_owned(),
                    reason: e.to_string(),
                })?;
        }
        for (name, value) in env {
            let Some(path) = name.strip_prefix("PROJECTOR_") else {
                continue;
            };
            if NOT_SETTINGS.contains(&name.as_str()) {
                continue;
            }
            let env_err = |reason: String| ConfigError::Env {
                name: name.clone(),
                value: value.clone(),
                reason,
            };
            let keys: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
            // librdkafka's properties are open-ended: `PROJECTOR_KAFKA__OPTIONS__SASL_USERNAME`
            // sets `sasl.username` (no property has an underscore).
            if let [section, options, property] = keys.as_slice() {
                if section == "kafka" && options == "options" {
                    if let Some(toml::Value::Table(table)) = merged
                        .get_mut("kafka")
                        .and_then(|kafka| kafka.get_mut("options"))
                    {
                        table.insert(
                            property.replace('_', "."),
                            toml::Value::String(value.clone()),
                        );
                        continue;
                    }
                }
            }
            let slot = keys
                .iter()
                .try_fold(&mut merged, |node, key| node.get_mut(key.as_str()))
                .ok_or_else(|| env_err("no such setting".into()))?;
            *slot = match slot {
                toml::Value::Integer(_) => toml::Value::Integer(
                    value
                        .parse()
                        .map_err(|e| env_err(format!("expected an integer: {e}")))?,
                ),
                toml::Value::Boolean(_) => toml::Value::Boolean(
                    value
                        .parse()
                        .map_err(|e| env_err(format!("expected true or false: {e}")))?,
                ),
                toml::Value::String(_) => toml::Value::String(value.clone()),
                _ => return Err(env_err("this setting is a section, not a value".into())),
            };
        }
        let config: Config = merged
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.to_string()))?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let positive = [
            (
                "runner.max_batch_events",
                self.runner.max_batch_events as u64,
            ),
            ("runner.max_batch_bytes", self.runner.max_batch_bytes as u64),
            ("limits.memory_mb", self.limits.memory_mb as u64),
            ("limits.deadline_ms", self.limits.deadline_ms),
            ("limits.max_output_mb", self.limits.max_output_mb as u64),
            ("http.max_page_size", u64::from(self.http.max_page_size)),
            (
                "postgres.max_connections",
                u64::from(self.postgres.max_connections),
            ),
            ("outbox.poll_interval_ms", self.outbox.poll_interval_ms),
            // 0 would report every momentary hold (any commit in flight) as stale reads.
            ("outbox.watermark_warn_ms", self.outbox.watermark_warn_ms),
            (
                "http.default_page_size",
                u64::from(self.http.default_page_size),
            ),
            (
                "http.header_read_timeout_ms",
                self.http.header_read_timeout_ms,
            ),
            ("http.idle_timeout_ms", self.http.idle_timeout_ms),
            ("http.max_connections", u64::from(self.http.max_connections)),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(ConfigError::Invalid(format!("{name} must be above 0")));
            }
        }
        for (key, reason) in KafkaConfig::RESERVED {
            if self.kafka.options.contains_key(*key) {
                return Err(ConfigError::Invalid(format!(
                    "kafka.options.\"{key}\" is set by projector: {reason}"
                )));
            }
        }
        for (name, d) in &self.observers {
            let positive = [
                ("timeout_ms", d.timeout_ms),
                ("retry_base_ms", d.retry_base_ms),
                ("max_attempts", u64::from(d.max_attempts)),
                ("max_in_flight", d.max_in_flight as u64),
            ];
            for (key, value) in positive {
                if value == 0 {
                    return Err(ConfigError::Invalid(format!(
                        "observers.{name}.{key} must be above 0"
                    )));
                }
            }
            if !(d.retry_factor >= 1.0 && d.retry_factor.is_finite()) {
                return Err(ConfigError::Invalid(format!(
                    "observers.{name}.retry_factor {} must be at least 1",
                    d.retry_factor
                )));
            }
        }
        // A 32-bit guest addresses 4 GiB, which is also what each pooled memory slot reserves.
        if self.limits.memory_mb > 4096 {
            return Err(ConfigError::Invalid(format!(
                "limits.memory_mb {} is above 4096, all a 32-bit plugin can address",
                self.limits.memory_mb
            )));
        }
        if !["on", "off", "local", "remote_write", "remote_apply"]
            .contains(&self.postgres.synchronous_commit.as_str())
        {
            return Err(ConfigError::Invalid(format!(
                "postgres.synchronous_commit {:?} is not one of on, off, local, remote_write, remote_apply",
                self.postgres.synchronous_commit
            )));
        }
        let o = &self.outbox;
        let names = [
            ("postgres.schema", &self.postgres.schema),
            ("outbox.id_column", &o.id_column),
            ("outbox.stream_column", &o.stream_column),
            ("outbox.stream_type_column", &o.stream_type_column),
            ("outbox.type_column", &o.type_column),
            ("outbox.payload_column", &o.payload_column),
            ("outbox.version_column", &o.version_column),
            ("outbox.headers_column", &o.headers_column),
            ("outbox.timestamp_column", &o.timestamp_column),
            ("outbox.position_column", &o.position_column),
        ];
        for (name, value) in names {
            if !is_identifier(value) {
                return Err(ConfigError::Invalid(format!(
                    "{name} {value:?} is not an SQL identifier ([A-Za-z_][A-Za-z0-9_]*, at most 63 bytes)"
                )));
            }
        }
        if !o.table.split('.').all(is_identifier) || o.table.split('.').count() > 2 {
            return Err(ConfigError::Invalid(format!(
                "outbox.table {:?} is not TABLE or SCHEMA.TABLE of SQL identifiers",
                o.table
            )));
        }
        Ok(())
    }

    /// The database URL, defaulting to a SQLite file in the data directory.
    /// The runner settings of one projection: `[runner]` with its own overrides.
    pub fn runner_for(&self, projection: &str) -> RunnerConfig {
        let mut runner = self.runner.clone();
        if let Some(on_error) = self.projections.get(projection).and_then(|p| p.on_error) {
            runner.on_error = on_error;
        }
        runner
    }

    /// How `observer`'s actions are delivered: `[observers.<name>]`, or the defaults.
    pub fn delivery_for(&self, observer: &str) -> DeliveryConfig {
        self.observers.get(observer).cloned().unwrap_or_default()
    }

    /// How appends hold back for the projections (see `backpressure`).
    pub fn backpressure(&self) -> crate::backpressure::Backpressure {
        let max_lag_ms = self.runner.max_lag_ms;
        let refuse_lag_ms = match self.runner.refuse_lag_ms {
            0 => max_lag_ms.saturating_mul(5),
            n => n.max(max_lag_ms),
        };
        crate::backpressure::Backpressure {
            max_lag_ms,
            refuse_lag_ms,
        }
    }

    pub fn database_url(&self) -> String {
        if self.database_url.is_empty() {
            format!("sqlite://{}", self.data_dir.join("projector.db").display())
        } else {
            self.database_url.clone()
        }
    }
}

/// A plain SQL identifier: safe to quote and splice into statements.
pub fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    s.len() <= 63
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn merge(base: &mut toml::Value, overlay: toml::Value) {
    match (base, overlay) {
        (toml::Value::Table(base), toml::Value::Table(overlay)) => {
            for (key, value) in overlay {
                match base.get_mut(&key) {
                    Some(slot) => merge(slot, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (slot, value) => *slot = value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn kafka_options_pass_through_from_the_file_and_the_environment_but_not_reserved_ones() {
        let dir =
            std::env::temp_dir().join(format!("projector-config-options-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("projector.toml");
        std::fs::write(
            &file,
            "[kafka.options]\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.username\" = \"file\"\n",
        )
        .unwrap();
        let config = Config::load(
            Some(&file),
            env(&[
                ("PROJECTOR_KAFKA__OPTIONS__SASL_USERNAME", "env"),
                ("PROJECTOR_KAFKA__OPTIONS__FETCH_QUEUE_BACKOFF_MS", "5"),
            ]),
        )
        .unwrap();
        let options: Vec<(&str, &str)> = config
            .kafka
            .options
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            options,
            [
                ("fetch.queue.backoff.ms", "5"),
                ("sasl.username", "env"),
                ("security.protocol", "SASL_SSL"),
            ]
        );
        let err = Config::load(
            None,
            env(&[("PROJECTOR_KAFKA__OPTIONS__ENABLE_AUTO_COMMIT", "true")]),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("kafka.options.\"enable.auto.commit\" is set by projector"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn env_overrides_the_file_and_nested_settings_use_double_underscores() {
        let dir = std::env::temp_dir().join(format!("projector-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("projector.toml");
        std::fs::write(
            &file,
            "listen = \"0.0.0.0:9000\"\n[runner]\nmax_batch_events = 10\n",
        )
        .unwrap();
        let config = Config::load(
            Some(&file),
            env(&[
                ("PROJECTOR_LISTEN", "127.0.0.1:1"),
                ("PROJECTOR_LIMITS__DEADLINE_MS", "250"),
                ("PROJECTOR_LOG", "debug"),
                ("PROJECTOR_CONFIG", "/names/the/file/not/a/setting.toml"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(config.listen, "127.0.0.1:1");
        assert_eq!(config.runner.max_batch_events, 10);
        assert_eq!(config.limits.deadline_ms, 250);
    }

    #[test]
    fn mistakes_are_named() {
        let err = Config::load(None, env(&[("PROJECTOR_LIMITS__DEADLINE", "5")])).unwrap_err();
        assert!(
            err.to_string().contains("PROJECTOR_LIMITS__DEADLINE"),
            "{err}"
        );
        let err =
            Config::load(None, env(&[("PROJECTOR_HTTP__MAX_BODY_BYTES", "lots")])).unwrap_err();
        assert!(err.to_string().contains("expected an integer"), "{err}");
        let err =
            Config::load(None, env(&[("PROJECTOR_RUNNER__MAX_BATCH_EVENTS", "0")])).unwrap_err();
        assert!(err.to_string().contains("max_batch_events"), "{err}");
        let err = Config::load(None, env(&[("PROJECTOR_LIMITS__MEMORY_MB", "8192")])).unwrap_err();
        assert!(err.to_string().contains("limits.memory_mb 8192"), "{err}");
    }

    #[test]
    fn the_database_defaults_to_a_file_in_the_data_dir() {
        let config = Config::load(None, env(&[("PROJECTOR_DATA_DIR", "/tmp/x")])).unwrap();
        assert_eq!(config.database_url(), "sqlite:///tmp/x/projector.db");
    }
}
