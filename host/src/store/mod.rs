//! Where read models live. A [`Store`] keeps each projection version's documents and its
//! checkpoint, and commits a batch's documents and the checkpoint in one transaction.

pub mod catalog;
mod fields;
pub mod postgres;
pub mod sqlite;

use async_trait::async_trait;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::event::Event;
use crate::observer::{ActionKind, ActionState, Counts, Logged, Update};
use crate::runtime::{BatchOutput, Descriptor};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {context}: {source}")]
    Database {
        context: String,
        source: sqlx::Error,
    },
    #[error("cannot open the database {url}: {reason}")]
    Open { url: String, reason: String },
    #[error("document {collection}/{key} written by {projection} is not valid JSON: {reason}")]
    InvalidDocument {
        projection: String,
        collection: String,
        key: String,
        reason: String,
    },
    /// The checkpoint is not where this runner left it: another instance ran the projection
    /// meanwhile. The batch is dropped, not committed twice.
    #[error("the checkpoint of {projection} moved away from {expected}: another instance runs it")]
    Fenced { projection: String, expected: u64 },
    #[error(transparent)]
    FileLost(#[from] sqlite::FileLost),
    /// A catalog row this host cannot read (written by a newer projector, or edited by hand).
    #[error("the plugin catalog's entry for {name} {version} is unreadable: {reason}")]
    Catalog {
        name: String,
        version: String,
        reason: String,
    },
}

impl StoreError {
    pub(crate) fn db(context: impl Into<String>) -> impl FnOnce(sqlx::Error) -> Self {
        let context = context.into();
        move |source| Self::Database { context, source }
    }
}

/// One stored document.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Document {
    pub key: String,
    /// How many times the document has been written.
    pub version: i64,
    /// When it was last written, in milliseconds since the Unix epoch.
    pub updated_at: i64,
    #[serde(rename = "document")]
    #[schema(value_type = serde_json::Value)]
    pub json: Box<serde_json::value::RawValue>,
}

/// An event a projection could not take, kept with the reason; or an event parked behind one.
/// (`PartialEq` by hand: [`Event`] has none; its event compares by its JSON.)
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DeadLetter {
    pub position: u64,
    pub event_id: Option<String>,
    /// The stream it belongs to, when the row names one; later events of that stream are
    /// parked behind it.
    pub stream: Option<String>,
    pub reason: String,
    /// The position of the dead letter this event is parked behind (`None`: it is the first).
    pub parked_behind: Option<u64>,
    pub kind: LetterKind,
    /// Whether an operator has dealt with it yet.
    pub state: LetterState,
    /// When an operator retried it successfully or skipped it (ms since the epoch).
    pub resolved_at: Option<i64>,
    /// The plugin version that failed on it (plugin faults).
    pub plugin_version: Option<String>,
    /// The event itself, to run again on a retry (`None` for a malformed row, which is read
    /// again from the source).
    #[serde(skip)]
    #[schema(ignore)]
    pub event: Option<Event>,
    /// What operators did to it, oldest first (filled on reads).
    pub actions: Vec<AdminAction>,
}

impl DeadLetter {
    /// Still keeping its stream parked: not retried successfully, not skipped.
    pub fn is_open(&self) -> bool {
        self.state == LetterState::Open
    }
}

/// Why an event became a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LetterKind {
    /// The source could not decode the row.
    Malformed,
    /// The plugin failed on it (an error, a panic, a limit, a document the store refuses).
    Plugin,
    /// Not at fault itself: parked behind an earlier dead letter of its stream.
    Parked,
}

impl LetterKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Plugin => "plugin",
            Self::Parked => "parked",
        }
    }

    pub fn parse(s: &str) -> Self {
        match s {
            "malformed" => Self::Malformed,
            "parked" => Self::Parked,
            _ => Self::Plugin,
        }
    }
}

/// Where a dead letter stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LetterState {
    /// Set aside; its stream is parked behind it.
    Open,
    /// Run again successfully by an operator's retry.
    Retried,
    /// Passed over by an operator: its stream went on without it.
    Skipped,
}

impl LetterState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Retried => "retried",
            Self::Skipped => "skipped",
        }
    }

    pub fn parse(s: &str) -> Self {
        match s {
            "retried" => Self::Retried,
            "skipped" => Self::Skipped,
            _ => Self::Open,
        }
    }
}

/// An operator's action through the admin API, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct AdminAction {
    /// `pause`, `resume`, `restart`, `retry`, `skip`, ...
    pub action: String,
    /// The dead letter's position, for actions on one.
    pub target: Option<u64>,
    /// When, in ms since the epoch.
    pub at: i64,
    /// How it ended, in words (`applied 3 events`, `failed again: ...`).
    pub outcome: String,
}

/// How many dead letters of a projection wait for an operator, and what they hold back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct LetterCounts {
    /// Open letters an operator can retry or skip (not counting the events parked behind
    /// them), a malformed row without a stream included.
    pub open: u64,
    /// Streams parked behind an open letter.
    pub parked_streams: u64,
    /// Events parked behind those letters.
    pub parked_events: u64,
}

impl From<(i64, i64, i64)> for LetterCounts {
    /// The three counts as both stores' query returns them: open, parked streams, parked events.
    fn from((open, streams, events): (i64, i64, i64)) -> Self {
        Self {
            open: open as u64,
            parked_streams: streams as u64,
            parked_events: events as u64,
        }
    }
}

/// A stream held back behind a dead letter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ParkedStream {
    pub stream: String,
    /// The position of the open dead letter it waits behind.
    pub behind: u64,
    pub reason: String,
    /// Events parked behind it.
    pub events: u64,
}

/// One commit: a batch's documents, the dead letters it sets aside, the checkpoint's move,
/// and what an operator's retry or skip changes. All of it lands in one transaction or none.
/// (`Default` by hand: no documents, nothing else, checkpoint 0 → 0, durable.)
#[derive(Debug)]
pub struct Batch<'a> {
    pub output: &'a BatchOutput,
    /// Written as given, replacing a letter at the same position (a retry that failed again
    /// updates its reason; a parked event that failed becomes the stream's new head).
    pub dead_letters: &'a [DeadLetter],
    /// Parked events now applied: their rows are removed.
    pub released: &'a [u64],
    /// A dead letter an operator's action resolved, and how.
    pub resolved: Option<(u64, LetterState)>,
    /// Operator actions to record.
    pub actions: &'a [AdminAction],
    /// The checkpoint the batch follows, and the one it moves to (equal for a retry/skip).
    pub from: u64,
    pub to: u64,
    /// `false` lets a store return before the commit is flushed: a crash can only lose such
    /// batches whole, with every batch after them, and they are projected again. The runner
    /// clears it for a catch-up batch with more behind it, and for a batch that moves the
    /// checkpoint alone; a batch that reaches the head with anything to write, where readers
    /// wait, is durable.
    pub durable: bool,
}

impl Batch<'_> {
    /// Documents and the checkpoint's move alone: no dead-letter bookkeeping, no operator's
    /// or observer's actions to record.
    pub fn only_documents(&self) -> bool {
        self.dead_letters.is_empty()
            && self.released.is_empty()
            && self.resolved.is_none()
            && self.actions.is_empty()
            && self.output.actions.is_empty()
    }

    /// Nothing but the checkpoint's move: events an observer decided no action for, or that
    /// a projection writes nothing for. Handled again after a crash, they write nothing again.
    pub fn moves_only_the_checkpoint(&self) -> bool {
        self.only_documents() && self.output.documents() == 0
    }
}

/// A page of a collection: equality filters on indexed fields, key order, keyset pagination.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub filters: Vec<(String, String)>,
    /// Only keys after this one (the previous page's cursor).
    pub after: Option<String>,
    pub limit: u32,
}

/// A projection's persisted state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProjectionStatus {
    Running,
    Failed,
    /// Another instance holds the projection's lease; this one serves reads and waits to take
    /// over. Never stored.
    Standby,
    /// An operator paused it: it reads nothing until resumed. Kept by [`Store::set_paused`].
    Paused,
}

impl ProjectionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Failed => "failed",
            Self::Standby => "standby",
            Self::Paused => "paused",
        }
    }
}

/// The seam between the pipeline and a database (SQLite, PostgreSQL).
#[async_trait]
pub trait Store: Send + Sync {
    /// Creates the tables and indexes of `projection`'s version if missing, makes it the
    /// active version, and returns its checkpoint.
    async fn register(&self, projection: &Descriptor) -> Result<u64, StoreError>;

    /// Creates the tables, indexes and checkpoint of `projection`'s version if missing,
    /// without making it active (a version built beside the active one); its checkpoint.
    async fn prepare(&self, projection: &Descriptor) -> Result<u64, StoreError>;

    /// The catalog's revision: moved by every change of a plugin or of a projection's active
    /// or building version.
    async fn catalog_revision(&self) -> Result<i64, StoreError>;

    /// Every projection in the catalog, with its stored plugins (not their code).
    async fn catalog(&self) -> Result<Vec<catalog::CatalogEntry>, StoreError>;

    /// A stored plugin's code: `(sha256, bytes)`.
    async fn plugin_code(
        &self,
        name: &str,
        version: &str,
    ) -> Result<Option<(String, Vec<u8>)>, StoreError>;

    /// Stores a plugin's code (replacing that version's) and places it, in one transaction
    /// that moves the catalog's revision. The version's tables exist already
    /// ([`Store::prepare`]).
    async fn save_plugin(
        &self,
        plugin: &catalog::StoredPlugin,
        bytes: &[u8],
        placement: catalog::Placement,
    ) -> Result<(), StoreError>;

    /// Makes `to` serve instead of `from`, if the catalog still has `to` building over `from`
    /// and `to`'s checkpoint has reached `from`'s: one transaction, so every reader and every
    /// instance sees one version or the other.
    async fn cut_over(
        &self,
        name: &str,
        from: &str,
        to: &str,
    ) -> Result<catalog::CutOver, StoreError>;

    /// Builds `version` (already in the catalog) beside the active one and cuts over as soon
    /// as it has caught up; `false` if the catalog has no such version.
    async fn build_version(
        &self,
        name: &str,
        version: &str,
        manual: bool,
    ) -> Result<bool, StoreError>;

    /// Drops an inactive version: its tables, checkpoint, dead letters and code. A version
    /// being built stops building.
    async fn drop_version(&self, projection: &Descriptor) -> Result<(), StoreError>;

    /// Removes a projection from the catalog (its versions' tables are dropped one by one
    /// with [`Store::drop_version`] first).
    async fn drop_projection(&self, name: &str) -> Result<(), StoreError>;

    /// The projection version's committed position.
    async fn checkpoint(&self, projection: &Descriptor) -> Result<u64, StoreError>;

    /// Writes a batch's documents and dead letters and moves the checkpoint from `batch.from`
    /// to `batch.to`, atomically. [`StoreError::Fenced`] if the checkpoint is no longer at
    /// `from`.
    async fn commit(&self, projection: &Descriptor, batch: &Batch<'_>) -> Result<(), StoreError>;

    /// Streams parked behind an open dead letter, each with that letter's position.
    async fn parked_streams(
        &self,
        projection: &Descriptor,
    ) -> Result<std::collections::HashMap<String, u64>, StoreError>;

    /// Parked streams with the letter each waits behind and how many events wait, by stream.
    async fn parked(&self, projection: &Descriptor) -> Result<Vec<ParkedStream>, StoreError>;

    /// The open letters and what they park, counted in the database: a status page asks for
    /// them every second, and listing 10,000 parked streams to count them would not do.
    async fn letter_counts(&self, projection: &Descriptor) -> Result<LetterCounts, StoreError>;

    /// Dead letters (open or resolved, parked events included) after `after`, in position
    /// order, each with its recorded actions.
    async fn dead_letters(
        &self,
        projection: &Descriptor,
        after: u64,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, StoreError>;

    /// One dead letter, with its event and actions.
    async fn dead_letter(
        &self,
        projection: &Descriptor,
        position: u64,
    ) -> Result<Option<DeadLetter>, StoreError>;

    /// The events parked behind the dead letter at `position`, in position order, with their
    /// events.
    async fn parked_behind(
        &self,
        projection: &Descriptor,
        position: u64,
    ) -> Result<Vec<DeadLetter>, StoreError>;

    /// Records an operator's action that commits nothing else (pause, resume, restart).
    async fn record_action(
        &self,
        projection: &Descriptor,
        action: &AdminAction,
    ) -> Result<(), StoreError>;

    /// Whether an operator paused the projection (kept across restarts and instances).
    async fn paused(&self, projection: &str) -> Result<bool, StoreError>;

    async fn set_paused(&self, projection: &str, paused: bool) -> Result<(), StoreError>;

    /// Queues an admin command (JSON) for whichever instance runs `projection`; its id.
    async fn submit_command(&self, projection: &str, command: &str) -> Result<i64, StoreError>;

    /// Commands for `projection` not answered yet, oldest first: `(id, command)`.
    async fn pending_commands(&self, projection: &str) -> Result<Vec<(i64, String)>, StoreError>;

    /// Answers a queued command (JSON). `claim`: only if nobody has answered (or taken) it
    /// yet, so one instance alone runs it. Whether the answer was written.
    async fn answer_command(&self, id: i64, answer: &str, claim: bool) -> Result<bool, StoreError>;

    /// The answer to a queued command, once there is one.
    async fn command_answer(&self, id: i64) -> Result<Option<String>, StoreError>;

    /// Tries to become the one instance that runs `projection`; `None` while another holds
    /// it. Held until the [`Lease`] is dropped or its connection dies.
    async fn try_lease(&self, projection: &str) -> Result<Option<Lease>, StoreError>;

    async fn set_status(
        &self,
        projection: &str,
        status: ProjectionStatus,
        error: Option<&str>,
    ) -> Result<(), StoreError>;

    async fn document(
        &self,
        projection: &Descriptor,
        collection: &str,
        key: &str,
    ) -> Result<Option<Document>, StoreError>;

    /// The documents of `collection` with these keys (those that exist), in one query or a
    /// few.
    async fn documents(
        &self,
        projection: &Descriptor,
        collection: &str,
        keys: &[&str],
    ) -> Result<Vec<Document>, StoreError>;

    async fn list(
        &self,
        projection: &Descriptor,
        collection: &str,
        query: &ListQuery,
    ) -> Result<Vec<Document>, StoreError>;

    /// Whether the database answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// An observer's actions not delivered yet and its dead ones, after log id `after`, in
    /// log order, at most `limit`.
    async fn open_actions(
        &self,
        observer: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<Logged>, StoreError>;

    /// The logged actions with these ids.
    async fn actions_by_id(&self, observer: &str, ids: &[i64]) -> Result<Vec<Logged>, StoreError>;

    /// Writes delivery outcomes, all in one transaction.
    async fn update_actions(&self, updates: &[Update]) -> Result<(), StoreError>;

    /// An observer's actions in `state`, from log id `after` on, in log order.
    async fn list_actions(
        &self,
        observer: &str,
        state: ActionState,
        after: i64,
        limit: u32,
    ) -> Result<Vec<Logged>, StoreError>;

    async fn action_counts(&self, observer: &str) -> Result<Counts, StoreError>;

    /// An operator's retry (`retry`) or skip of a dead action: pending again with its attempts
    /// reset, or skipped. `None` when the observer has no dead action `id`.
    async fn resolve_action(
        &self,
        observer: &str,
        id: i64,
        retry: bool,
    ) -> Result<Option<Logged>, StoreError>;
}

/// The right to run one projection, held until dropped.
pub struct Lease {
    lost: watch::Receiver<bool>,
    _hold: Box<dyn Send + Sync>,
}

impl Lease {
    /// `lost` turns true when the lease is gone (its connection died); `hold` is dropped with
    /// the lease, releasing it.
    pub fn new(lost: watch::Receiver<bool>, hold: impl Send + Sync + 'static) -> Self {
        Self {
            lost,
            _hold: Box::new(hold),
        }
    }

    /// A lease that is never lost (one process owns the database).
    pub fn exclusive() -> Self {
        let (tx, rx) = watch::channel(false);
        Self::new(rx, tx)
    }

    /// Resolves once the lease is lost.
    pub async fn lost(&mut self) {
        while !*self.lost.borrow_and_update() {
            if self.lost.changed().await.is_err() {
                return;
            }
        }
    }
}

/// The table of one collection of one projection version. Names are validated to
/// `[a-z0-9_-]` but `-`/`.` are folded to `_` and long names are cut, so a short hash of the
/// exact names keeps two projections from ever sharing a table.
pub fn table_name(projection: &Descriptor, collection: &str) -> String {
    let fold = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect()
    };
    let digest = Sha256::digest(
        format!(
            "{}\0{}\0{}",
            projection.name, projection.version, collection
        )
        .as_bytes(),
    );
    // At most 63 bytes (PostgreSQL's limit): the readable part is cut, the hash never.
    let mut readable = format!(
        "rm_{}_{}_{}",
        fold(&projection.name),
        fold(&projection.version),
        fold(collection)
    );
    readable.truncate(54);
    format!(
        "{readable}_{:02x}{:02x}{:02x}{:02x}",
        digest[0], digest[1], digest[2], digest[3]
    )
}

/// The column holding a declared field's value (`f_` and a hash of the field), quoted.
pub(crate) fn field_column(field: &str) -> String {
    let digest = Sha256::digest(field.as_bytes());
    format!(
        "\"f_{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}\"",
        digest[0], digest[1], digest[2], digest[3], digest[4], digest[5]
    )
}

/// The columns of a stored plugin (not its code), as [`stored_plugin_from_row`] decodes them.
pub(crate) const PLUGIN_COLUMNS: &str =
    "name, version, sha256, world, contract, descriptor, origin, uploaded_at, code_changed_at";

pub(crate) fn stored_plugin_from_row<R>(row: &R) -> Result<catalog::StoredPlugin, StoreError>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let err = || StoreError::db("reading the plugin catalog");
    let name: String = row.try_get(0).map_err(err())?;
    let version: String = row.try_get(1).map_err(err())?;
    let descriptor: String = row.try_get(5).map_err(err())?;
    let descriptor = serde_json::from_str(&descriptor).map_err(|e| StoreError::Catalog {
        name: name.clone(),
        version: version.clone(),
        reason: format!("its descriptor: {e}"),
    })?;
    Ok(catalog::StoredPlugin {
        name,
        version,
        sha256: row.try_get(2).map_err(err())?,
        world: row.try_get(3).map_err(err())?,
        contract: row.try_get(4).map_err(err())?,
        descriptor,
        origin: row.try_get(6).map_err(err())?,
        uploaded_at: row.try_get(7).map_err(err())?,
        code_changed_at: row.try_get(8).map_err(err())?,
    })
}

/// Projections `(name, active, building, manual)` and their plugins, as one catalog.
pub(crate) fn catalog_entries(
    projections: Vec<(String, String, Option<String>, bool)>,
    plugins: Vec<catalog::StoredPlugin>,
) -> Vec<catalog::CatalogEntry> {
    let mut by_name: std::collections::BTreeMap<String, Vec<catalog::StoredPlugin>> =
        std::collections::BTreeMap::new();
    for plugin in plugins {
        by_name.entry(plugin.name.clone()).or_default().push(plugin);
    }
    projections
        .into_iter()
        .map(
            |(name, active, building, manual_cutover)| catalog::CatalogEntry {
                plugins: by_name.remove(&name).unwrap_or_default(),
                name,
                active,
                building,
                manual_cutover,
            },
        )
        .collect()
}

/// A descriptor as the catalog keeps it (JSON).
pub(crate) fn descriptor_json(plugin: &catalog::StoredPlugin) -> Result<String, StoreError> {
    serde_json::to_string(&plugin.descriptor).map_err(|e| StoreError::Catalog {
        name: plugin.name.clone(),
        version: plugin.version.clone(),
        reason: e.to_string(),
    })
}

/// Decodes `key, doc (JSON text), version, updated_at`, as both stores select them.
pub(crate) fn document_from_row<R>(row: &R) -> Result<Document, StoreError>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let err = || StoreError::db("reading a document");
    document(
        row.try_get(0).map_err(err())?,
        row.try_get(1).map_err(err())?,
        row.try_get(2).map_err(err())?,
        row.try_get(3).map_err(err())?,
    )
}

/// A document read as its key, its JSON text, its version and when it was last written.
pub(crate) fn document(
    key: String,
    json: String,
    version: i64,
    updated_at: i64,
) -> Result<Document, StoreError> {
    let json = serde_json::value::RawValue::from_string(json).map_err(|e| {
        StoreError::InvalidDocument {
            projection: String::new(),
            collection: String::new(),
            key: key.clone(),
            reason: e.to_string(),
        }
    })?;
    Ok(Document {
        key,
        json,
        version,
        updated_at,
    })
}

impl PartialEq for DeadLetter {
    fn eq(&self, other: &Self) -> bool {
        let event = |e: &Option<Event>| e.as_ref().and_then(|e| serde_json::to_string(e).ok());
        self.position == other.position
            && self.event_id == other.event_id
            && self.stream == other.stream
            && self.reason == other.reason
            && self.parked_behind == other.parked_behind
            && self.kind == other.kind
            && self.state == other.state
            && self.resolved_at == other.resolved_at
            && self.plugin_version == other.plugin_version
            && self.actions == other.actions
            && event(&self.event) == event(&other.event)
    }
}

impl Default for Batch<'_> {
    fn default() -> Self {
        static NOTHING: BatchOutput = BatchOutput {
            writes: std::collections::BTreeMap::new(),
            actions: Vec::new(),
        };
        Self {
            output: &NOTHING,
            dead_letters: &[],
            released: &[],
            resolved: None,
            actions: &[],
            from: 0,
            to: 0,
            durable: true,
        }
    }
}

/// The columns of a dead letter, in the order [`dead_letter_from_row`] decodes them (the last
/// one, the event, may be selected as `NULL` where it is not needed).
pub(crate) const LETTER_COLUMNS: &str =
    "position, event_id, stream, reason, parked_behind, kind, state, resolved_at, plugin_version";

/// A dead letter's event as stored (JSON text).
pub(crate) fn event_text(letter: &DeadLetter) -> Option<String> {
    // An `Event` always serializes (strings, numbers and JSON text).
    letter
        .event
        .as_ref()
        .and_then(|e| serde_json::to_string(e).ok())
}

/// Decodes [`LETTER_COLUMNS`] and the event (JSON text or NULL), as both stores select them;
/// `actions` is left empty (see [`attach_actions`]).
pub(crate) fn dead_letter_from_row<R>(row: &R) -> Result<DeadLetter, StoreError>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let err = || StoreError::db("reading dead letters");
    let kind: String = row.try_get(5).map_err(err())?;
    let state: String = row.try_get(6).map_err(err())?;
    let event = row
        .try_get::<Option<String>, _>(9)
        .map_err(err())?
        .map(|text| serde_json::from_str::<Event>(&text))
        .transpose()
        .map_err(|e| {
            StoreError::db("reading a dead letter's event")(sqlx::Error::Decode(e.into()))
        })?;
    Ok(DeadLetter {
        position: row.try_get::<i64, _>(0).map_err(err())? as u64,
        event_id: row.try_get(1).map_err(err())?,
        stream: row.try_get(2).map_err(err())?,
        reason: row.try_get(3).map_err(err())?,
        parked_behind: row
            .try_get::<Option<i64>, _>(4)
            .map_err(err())?
            .map(|p| p as u64),
        kind: LetterKind::parse(&kind),
        state: LetterState::parse(&state),
        resolved_at: row.try_get(7).map_err(err())?,
        plugin_version: row.try_get(8).map_err(err())?,
        event,
        actions: Vec::new(),
    })
}

/// The columns of an admin action, in the order [`attach_actions`] decodes them.
pub(crate) const ACTION_COLUMNS: &str = "target, action, at, outcome";

/// Decodes [`ACTION_COLUMNS`] rows (oldest first) and hands each action to the letter it
/// targets; actions on positions not among `letters` are passed over.
pub(crate) fn attach_actions<R>(letters: &mut [DeadLetter], rows: &[R]) -> Result<(), StoreError>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let err = || StoreError::db("reading admin actions");
    for row in rows {
        let target = row
            .try_get::<Option<i64>, _>(0)
            .map_err(err())?
            .map(|p| p as u64);
        let Some(position) = target else { continue };
        // Letters come in position order.
        let Ok(at) = letters.binary_search_by_key(&position, |l| l.position) else {
            continue;
        };
        letters[at].actions.push(AdminAction {
            action: row.try_get(1).map_err(err())?,
            target,
            at: row.try_get(2).map_err(err())?,
            outcome: row.try_get(3).map_err(err())?,
        });
    }
    Ok(())
}

/// Decodes `stream, position` pairs of parked streams; a stream with two open heads keeps the
/// first.
pub(crate) fn parked_from_rows<R>(
    rows: &[R],
) -> Result<std::collections::HashMap<String, u64>, StoreError>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let err = || StoreError::db("reading parked streams");
    let mut parked = std::collections::HashMap::with_capacity(rows.len());
    for row in rows {
        let stream: String = row.try_get(0).map_err(err())?;
        let position = row.try_get::<i64, _>(1).map_err(err())? as u64;
        parked
            .entry(stream)
            .and_modify(|p: &mut u64| *p = (*p).min(position))
            .or_insert(position);
    }
    Ok(parked)
}

/// Decodes `stream, position, reason, count` rows, ordered by stream and position, into one
/// [`ParkedStream`] per stream (the first head where a stream has two).
pub(crate) fn parked_streams_from_rows<R>(rows: &[R]) -> Result<Vec<ParkedStream>, StoreError>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let err = || StoreError::db("reading parked streams");
    let mut parked: Vec<ParkedStream> = Vec::with_capacity(rows.len());
    for row in rows {
        let stream: String = row.try_get(0).map_err(err())?;
        if parked.last().is_some_and(|p| p.stream == stream) {
            continue;
        }
        parked.push(ParkedStream {
            stream,
            behind: row.try_get::<i64, _>(1).map_err(err())? as u64,
            reason: row.try_get(2).map_err(err())?,
            events: row.try_get::<i64, _>(3).map_err(err())? as u64,
        });
    }
    Ok(parked)
}

/// How long an answered admin command is kept (its submitter has long read the answer).
pub(crate) const ANSWERED_COMMANDS_KEPT_MS: i64 = 60 * 60 * 1000;

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The columns of a logged action, in the order [`logged_from_row`] decodes them.
pub(crate) const LOGGED_COLUMNS: &str = "id, observer, event_id, idx, stream, position, spec, \
     body, state, attempts, next_at, last_status, last_error, created_at, updated_at";

/// Decodes a [`LOGGED_COLUMNS`] row.
pub(crate) fn logged_from_row<R>(row: &R) -> Result<Logged, StoreError>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let err = || StoreError::db("reading observer actions");
    let observer: String = row.try_get(1).map_err(err())?;
    let event_id: String = row.try_get(2).map_err(err())?;
    let index = row.try_get::<i64, _>(3).map_err(err())? as u32;
    let spec: String = row.try_get(6).map_err(err())?;
    let body: Vec<u8> = row.try_get(7).map_err(err())?;
    let kind = ActionKind::from_stored(&spec, body).map_err(|e| {
        StoreError::db("reading an observer action's spec")(sqlx::Error::Decode(e.into()))
    })?;
    let state: String = row.try_get(8).map_err(err())?;
    Ok(Logged {
        id: row.try_get(0).map_err(err())?,
        key: crate::observer::action::key(&observer, &event_id, index),
        observer,
        event_id,
        index,
        stream: row.try_get(4).map_err(err())?,
        position: row.try_get::<i64, _>(5).map_err(err())? as u64,
        kind,
        state: ActionState::parse(&state),
        attempts: row.try_get::<i64, _>(9).map_err(err())? as u32,
        next_at: row.try_get(10).map_err(err())?,
        last_status: row
            .try_get::<Option<i64>, _>(11)
            .map_err(err())?
            .map(|s| s as u16),
        last_error: row.try_get(12).map_err(err())?,
        created_at: row.try_get(13).map_err(err())?,
        updated_at: row.try_get(14).map_err(err())?,
    })
}

/// Per-state counts from `(state, count)` rows.
pub(crate) fn counts(rows: Vec<(String, i64)>) -> Counts {
    let mut counts = Counts::default();
    for (state, n) in rows {
        let n = n as u64;
        match ActionState::parse(&state) {
            ActionState::Pending => counts.pending += n,
            ActionState::Done => counts.done += n,
            ActionState::Dead => counts.dead += n,
            ActionState::Skipped => counts.skipped += n,
        }
    }
    counts
}
