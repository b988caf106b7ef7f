//! One runner per projection: read after the checkpoint, hand the batch to the plugin in one
//! call, commit its documents with the new checkpoint in one transaction, publish the position.
//!
//! When it stops: a plugin failure stops this projection only (status `failed`, error kept,
//! waiters answered at once); a database error is retried with backoff forever, since the
//! batch is intact and the database usually comes back; shutdown stops between batches.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use crate::config::RunnerConfig;
use crate::consistency::Progress;
use crate::event::{unstorable_escape, Event};
use crate::metrics::ProjectionMetrics;
use crate::runtime::{
    BatchHandler, BatchOutput, BoxError, Descriptor, DocumentReader, RuntimeError,
};
use crate::source::{Source, SourceError};
use crate::store::{DeadLetter, ProjectionStatus, Store, StoreError};

/// A projection as the rest of the host sees it: its plugin, its progress, its health.
pub struct Projection {
    pub plugin: Arc<dyn BatchHandler>,
    pub metrics: ProjectionMetrics,
    progress: watch::Sender<Progress>,
    health: Mutex<Health>,
    documents: Arc<Mutex<DocumentCache>>,
    /// Batches read but not committed yet, oldest first: the last position of each, and when
    /// its first event was appended (ms since the epoch). The front is the oldest event the
    /// read model does not have.
    unapplied: Mutex<VecDeque<(u64, u64)>>,
}

/// The health of a projection, as `GET /projections` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    pub status: ProjectionStatus,
    /// Why it failed.
    pub error: Option<String>,
    /// The error it is retrying after (a database outage), if any.
    pub retrying: Option<String>,
}

impl Projection {
    pub fn new(plugin: Arc<dyn BatchHandler>, checkpoint: u64) -> Self {
        Self {
            plugin,
            metrics: ProjectionMetrics::default(),
            // A projection that starts from position 0 has empty tables: the cache then holds
            // every document there is, and a miss needs no query.
            documents: Arc::new(Mutex::new(DocumentCache::new(checkpoint == 0))),
            progress: watch::Sender::new(Progress {
                position: checkpoint,
                failed: false,
            }),
            // Until this instance holds the projection's lease.
            health: Mutex::new(Health {
                status: ProjectionStatus::Standby,
                error: None,
                retrying: None,
            }),
            unapplied: Mutex::new(VecDeque::new()),
        }
    }

    /// How long ago the oldest event this projection has read but not applied was appended;
    /// 0 when it has applied everything it has read. Events not read yet are newer still:
    /// the runner reads as soon as the head moves.
    pub fn lag_seconds(&self) -> f64 {
        let oldest = self.unapplied().front().map(|&(_, appended)| appended);
        oldest.map_or(0.0, |appended| {
            now_ms().saturating_sub(appended) as f64 / 1000.0
        })
    }

    fn unapplied(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, u64)>> {
        self.unapplied
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A batch was read: remembered until a commit passes it.
    fn read_batch(&self, events: &[Event]) {
        let (Some(first), Some(last)) = (events.first(), events.last()) else {
            return;
        };
        let mut unapplied = self.unapplied();
        if unapplied
            .back()
            .is_some_and(|&(end, _)| end >= last.position)
        {
            return;
        }
        // A source without timestamps (0) counts from now, when the host first saw it.
        let appended = if first.timestamp_ms > 0 {
            first.timestamp_ms
        } else {
            now_ms()
        };
        unapplied.push_back((last.position, appended));
    }

    /// The checkpoint moved to `position`: batches up to it are applied.
    fn applied_to(&self, position: u64) {
        let mut unapplied = self.unapplied();
        while unapplied.front().is_some_and(|&(end, _)| end <= position) {
            unapplied.pop_front();
        }
    }

    pub fn descriptor(&self) -> &Descriptor {
        self.plugin.descriptor()
    }

    pub fn name(&self) -> &str {
        &self.descriptor().name
    }

    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    /// The position committed so far.
    pub fn checkpoint(&self) -> u64 {
        self.progress.borrow().position
    }

    pub fn health(&self) -> Health {
        self.health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn update_health(&self, change: impl FnOnce(&mut Health)) {
        change(&mut self.health.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// Takes the projection up (again) at `checkpoint`: after a lease is won, the documents
    /// cached before may be stale (another instance ran meanwhile).
    pub(crate) fn resume_at(&self, checkpoint: u64) {
        *self
            .documents
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = DocumentCache::new(checkpoint == 0);
        self.update_health(|h| {
            h.status = ProjectionStatus::Running;
            h.retrying = None;
        });
        self.progress.send_replace(Progress {
            position: checkpoint,
            failed: false,
        });
    }

    /// Another instance runs it: follow its checkpoint so reads that wait still get answered.
    pub(crate) fn follow(&self, checkpoint: u64) {
        self.update_health(|h| {
            h.status = ProjectionStatus::Standby;
            h.retrying = None;
        });
        self.progress.send_if_modified(|p| {
            let moved = checkpoint > p.position;
            p.position = p.position.max(checkpoint);
            moved
        });
    }

    /// Another instance holds the lease: what this one read is the other's to apply now, and
    /// its age is not this instance's lag.
    pub(crate) fn stand_by(&self) {
        self.unapplied().clear();
    }

    /// Stopped for good: the status says why, and waiters are answered at once.
    fn mark_failed(&self, error: &str) {
        self.update_health(|h| {
            h.status = ProjectionStatus::Failed;
            h.error = Some(error.to_owned());
            h.retrying = None;
        });
        self.progress.send_modify(|p| p.failed = true);
    }
}

pub struct Runner {
    projection: Arc<Projection>,
    store: Arc<dyn Store>,
    source: Arc<dyn Source>,
    config: RunnerConfig,
}

/// Why a stage did not produce its result.
enum Problem {
    /// Transient (a database error): try again after a pause.
    Retry(String),
    /// The plugin's fault: stop this projection.
    Fail(String),
    /// A malformed outbox row: set it aside and go on after it (the letter is kept only when
    /// the projection subscribes to the row's type, or the type is unreadable).
    DeadLetter {
        letter: DeadLetter,
        subscribed: bool,
    },
}

/// A batch the plugin has handled: its documents are in the cache, not yet committed.
struct Handled {
    output: BatchOutput,
    dead_letters: Vec<DeadLetter>,
    /// The checkpoint the batch follows, and the one it moves to.
    from: u64,
    last: u64,
}

/// Why [`Runner::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// Shutdown was asked for.
    Stopped,
    /// The projection failed (its status says why).
    Failed,
    /// Another instance moved the checkpoint: this one must stand by.
    Fenced,
}

/// How a commit attempt ended.
enum Committed {
    Yes,
    /// Shutdown came first.
    Stopped,
    Fenced,
    /// The store refused the batch for what it holds: retrying cannot help.
    Refused(String),
}

/// Exponential backoff between retries, reset by the next success.
struct Backoff {
    delay: Duration,
    max: Duration,
    failing: bool,
}

pub(crate) const FIRST_RETRY: Duration = Duration::from_millis(50);

impl Runner {
    pub fn new(
        projection: Arc<Projection>,
        store: Arc<dyn Store>,
        source: Arc<dyn Source>,
        config: RunnerConfig,
    ) -> Self {
        Self {
            projection,
            store,
            source,
            config,
        }
    }

    /// Runs until `shutdown` turns true or the plugin fails.
    ///
    /// A pipeline of three stages: while batch N commits, batch N+1 is handled (its reads see
    /// N's documents through the cache) and batch N+2 is read. Only one commit is in flight, and
    /// the checkpoint is published only once its commit is durable.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> RunEnd {
        let name = self.projection.name().to_owned();
        let mut head = self.source.head();
        let mut backoff = Backoff {
            delay: FIRST_RETRY,
            max: Duration::from_millis(self.config.max_retry_backoff_ms).max(FIRST_RETRY),
            failing: false,
        };
        // Streams parked behind a dead letter, with its position: their events are set aside
        // too, so a stream's order is never broken.
        let mut parked = loop {
            match self
                .store
                .parked_streams(self.projection.descriptor())
                .await
            {
                Ok(parked) => break parked,
                Err(err) => {
                    if !self
                        .pause(&mut backoff, err.to_string(), &mut shutdown)
                        .await
                    {
                        return RunEnd::Stopped;
                    }
                }
            }
        };
        // Events up to here are handled: committed, or in `pending`.
        let mut handled_to = self.projection.checkpoint();
        let mut pending: Option<Handled> = None;
        let mut prefetched: Option<Vec<Event>> = None;
        // What an earlier run of this projection read and never committed is read again.
        self.projection.unapplied().clear();
        tracing::info!(projection = %name, checkpoint = handled_to, "runner started");
        while !*shutdown.borrow() {
            let events = match prefetched.take() {
                Some(events) if !events.is_empty() => events,
                // Caught up: commit what is pending without another read first.
                Some(_) if pending.is_some() => Vec::new(),
                _ => {
                    // Marked seen before reading, so an append after the read still wakes us.
                    head.borrow_and_update();
                    match self.read(handled_to).await {
                        Ok(events) => {
                            // Caught up and idle, no commit would clear it.
                            if pending.is_none() {
                                self.recovered(&mut backoff);
                            }
                            events
                        }
                        Err(Problem::Retry(error)) => {
                            self.pause(&mut backoff, error, &mut shutdown).await;
                            continue;
                        }
                        Err(Problem::Fail(error)) => {
                            self.fail(error).await;
                            return RunEnd::Failed;
                        }
                        Err(Problem::DeadLetter {
                            letter,
                            subscribed: wanted,
                        }) => {
                            // Its own batch: no documents, the dead letter, the checkpoint
                            // past it; committed after the batch in flight.
                            if wanted {
                                tracing::error!(projection = %name, position = letter.position, event_id = ?letter.event_id, stream = ?letter.stream, reason = %letter.reason, "malformed outbox row dead-lettered; its stream is parked");
                            }
                            if let Some(batch) = pending.take() {
                                match self.commit(batch, true, &mut backoff, &mut shutdown).await {
                                    Committed::Yes => {}
                                    Committed::Stopped => break,
                                    Committed::Fenced => return RunEnd::Fenced,
                                    Committed::Refused(error) => {
                                        self.fail(error).await;
                                        return RunEnd::Failed;
                                    }
                                }
                            }
                            let mut letter = letter;
                            if let Some(stream) = letter.stream.as_ref().filter(|_| wanted) {
                                match parked.get(stream) {
                                    Some(&behind) => letter.parked_behind = Some(behind),
                                    None => {
                                        parked.insert(stream.clone(), letter.position);
                                    }
                                }
                            }
                            let from = handled_to;
                            handled_to = letter.position;
                            pending = Some(Handled {
                                output: BatchOutput::default(),
                                from,
                                last: letter.position,
                                dead_letters: if wanted { vec![letter] } else { Vec::new() },
                            });
                            continue;
                        }
                    }
                }
            };
            if events.is_empty() && pending.is_none() {
                tokio::select! {
                    _ = head.changed() => {}
                    // A dropped shutdown sender means shutdown too (and must not spin).
                    changed = shutdown.changed() => if changed.is_err() { break },
                }
                continue;
            }
            let last = events.last().map(|e| e.position);
            let mut stop = shutdown.clone();
            let commit = async {
                match pending.take() {
                    // Another batch is behind this one: a catch-up commit.
                    Some(batch) => {
                        self.commit(batch, last.is_none(), &mut backoff, &mut stop)
                            .await
                    }
                    None => Committed::Yes,
                }
            };
            let from = handled_to;
            let handle = async {
                match last {
                    Some(last) => Some(self.process(events, &parked, from, last).await),
                    None => None,
                }
            };
            let read_next = async {
                match last {
                    Some(last) => self.read(last).await.ok(),
                    None => None,
                }
            };
            let (committed, handled, next) = tokio::join!(commit, handle, read_next);
            match committed {
                Committed::Yes => {}
                Committed::Stopped => break,
                Committed::Fenced => return RunEnd::Fenced,
                Committed::Refused(error) => {
                    self.fail(error).await;
                    return RunEnd::Failed;
                }
            }
            match handled {
                None => {}
                Some(Ok(batch)) => {
                    self.projection
                        .documents
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .apply(&batch.output, self.config.cached_documents);
                    handled_to = batch.last;
                    pending = Some(batch);
                    prefetched = next;
                }
                Some(Err(Problem::Retry(error))) => {
                    self.pause(&mut backoff, error, &mut shutdown).await;
                }
                Some(Err(Problem::Fail(error))) => {
                    self.fail(error).await;
                    return RunEnd::Failed;
                }
                // Only reads set rows aside; a batch that reached the plugin does not.
                Some(Err(Problem::DeadLetter { letter, .. })) => {
                    self.fail(letter.reason).await;
                    return RunEnd::Failed;
                }
            }
        }
        if let Some(batch) = pending.take() {
            // Shutting down: one attempt, so a clean stop leaves nothing to redo.
            let (_, mut stopped) = watch::channel(true);
            match self.commit(batch, true, &mut backoff, &mut stopped).await {
                Committed::Fenced => return RunEnd::Fenced,
                Committed::Refused(error) => {
                    self.fail(error).await;
                    return RunEnd::Failed;
                }
                Committed::Yes | Committed::Stopped => {}
            }
        }
        tracing::info!(projection = %name, checkpoint = self.projection.checkpoint(), "runner stopped");
        RunEnd::Stopped
    }

    async fn read(&self, after: u64) -> Result<Vec<Event>, Problem> {
        let start = std::time::Instant::now();
        let read = self
            .source
            .read(
                after,
                self.config.max_batch_events,
                self.config.max_batch_bytes,
            )
            .await;
        ProjectionMetrics::add_time(&self.projection.metrics.read_micros, start.elapsed());
        if let Ok(events) = &read {
            self.projection.read_batch(events);
        }
        read.map_err(|err| match err {
            // The row will not get better by waiting: stop and say where it is (parking
            // it as a dead letter is the failure-isolation work still to come).
            SourceError::Malformed {
                position,
                ref id,
                ref stream,
                ref event_type,
                ref reason,
            } => Problem::DeadLetter {
                letter: DeadLetter {
                    position,
                    event_id: id.clone(),
                    stream: stream.clone(),
                    reason: format!("malformed outbox row: {reason}"),
                    parked_behind: None,
                },
                subscribed: event_type
                    .as_ref()
                    .is_none_or(|t| self.projection.descriptor().subscribes_to(t)),
            },
            SourceError::Setup(_) => Problem::Fail(err.to_string()),
            SourceError::Database { .. } => Problem::Retry(err.to_string()),
        })
    }

    /// Commits a handled batch, retrying database errors until it succeeds, shutdown comes
    /// or the checkpoint turns out to have moved under it.
    async fn commit(
        &self,
        batch: Handled,
        durable: bool,
        backoff: &mut Backoff,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Committed {
        loop {
            let start = std::time::Instant::now();
            match self
                .store
                .commit(
                    self.projection.descriptor(),
                    &batch.output,
                    &batch.dead_letters,
                    batch.from,
                    batch.last,
                    durable,
                )
                .await
            {
                Ok(()) => {
                    self.projection.applied_to(batch.last);
                    // Our commit held the outbox's watermark back while it ran.
                    self.source.nudge();
                    let metrics = &self.projection.metrics;
                    ProjectionMetrics::add_time(&metrics.commit_micros, start.elapsed());
                    ProjectionMetrics::add(&metrics.batches, 1);
                    ProjectionMetrics::add(&metrics.documents, batch.output.documents() as u64);
                    ProjectionMetrics::add(&metrics.dead_letters, batch.dead_letters.len() as u64);
                    self.projection.progress.send_replace(Progress {
                        position: batch.last,
                        failed: false,
                    });
                    self.recovered(backoff);
                    return Committed::Yes;
                }
                Err(err @ StoreError::InvalidDocument { .. }) => {
                    return Committed::Refused(err.to_string());
                }
                Err(err @ StoreError::Fenced { .. }) => {
                    tracing::warn!(projection = %self.projection.name(), error = %err, "batch dropped: standing by");
                    return Committed::Fenced;
                }
                Err(err) => {
                    if !self.pause(backoff, err.to_string(), shutdown).await {
                        return Committed::Stopped;
                    }
                }
            }
        }
    }

    /// After a success: the error retried before is gone.
    fn recovered(&self, backoff: &mut Backoff) {
        if backoff.failing {
            tracing::info!(projection = %self.projection.name(), "recovered");
            self.projection.update_health(|h| h.retrying = None);
            backoff.failing = false;
            backoff.delay = FIRST_RETRY;
        }
    }

    /// Waits out a transient error; `false` if shutdown came first.
    async fn pause(
        &self,
        backoff: &mut Backoff,
        error: String,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        tracing::warn!(projection = %self.projection.name(), error = %error, retry_in_ms = backoff.delay.as_millis() as u64, "batch not committed, retrying");
        ProjectionMetrics::add(&self.projection.metrics.retries, 1);
        self.projection.update_health(|h| h.retrying = Some(error));
        backoff.failing = true;
        let delay = backoff.delay;
        backoff.delay = (backoff.delay * 2).min(backoff.max);
        if *shutdown.borrow() {
            return false;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            changed = shutdown.changed() => changed.is_ok() && !*shutdown.borrow(),
        }
    }

    async fn fail(&self, error: String) {
        let name = self.projection.name();
        tracing::error!(projection = %name, checkpoint = self.projection.checkpoint(), error = %error, "projection failed and stopped");
        record_failure(&self.projection, self.store.as_ref(), &error).await;
    }

    /// [`Runner::run`] in a task of its own, watched: should the runner panic (a bug), its
    /// projection is marked failed with the reason instead of silently standing still.
    pub async fn run_supervised(self, shutdown: watch::Receiver<bool>) -> RunEnd {
        let projection = self.projection.clone();
        let store = self.store.clone();
        match tokio::spawn(self.run(shutdown)).await {
            Ok(end) => end,
            Err(err) => {
                let error = format!("the runner crashed: {err}");
                tracing::error!(projection = %projection.name(), error = %error, "projection failed and stopped");
                record_failure(&projection, store.as_ref(), &error).await;
                RunEnd::Failed
            }
        }
    }

    /// Filters a batch to the plugin's event types and runs it; an empty filtered batch still
    /// moves the checkpoint.
    async fn process(
        &self,
        events: Vec<Event>,
        parked: &HashMap<String, u64>,
        from: u64,
        last: u64,
    ) -> Result<Handled, Problem> {
        let descriptor = self.projection.descriptor();
        let mut dead_letters = Vec::new();
        let wanted: Vec<Event> = events
            .into_iter()
            .filter(|e| descriptor.subscribes_to(&e.event_type))
            .filter(|e| match parked.get(&e.stream) {
                None => true,
                Some(&behind) => {
                    dead_letters.push(DeadLetter {
                        position: e.position,
                        event_id: Some(e.id.clone()),
                        stream: Some(e.stream.clone()),
                        reason: format!("parked behind the dead letter at position {behind}"),
                        parked_behind: Some(behind),
                    });
                    false
                }
            })
            .collect();
        let output = if wanted.is_empty() {
            BatchOutput::default()
        } else {
            self.handle(wanted).await?
        };
        check_documents(&output)
            .map_err(|err| Problem::Fail(format!("{} wrote {err}", descriptor.name)))?;
        Ok(Handled {
            output,
            dead_letters,
            from,
            last,
        })
    }

    /// After a restart or a takeover the cache starts empty, and a plugin reading its
    /// documents one `get` at a time would cost a query each. Documents are most often keyed by
    /// the stream id, so those are fetched for the whole batch in one query per collection.
    async fn prefetch(&self, events: &[Event]) -> Result<(), Problem> {
        let descriptor = self.projection.descriptor();
        let cache = || {
            self.projection
                .documents
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
        };
        if cache().complete {
            return Ok(());
        }
        let mut streams: Vec<&str> = events.iter().map(|e| e.stream.as_str()).collect();
        streams.sort_unstable();
        streams.dedup();
        for collection in &descriptor.collections {
            let name = collection.name.as_str();
            // Keys already cached may belong to the batch still committing: never refetched.
            let missing: Vec<&str> = {
                let cache = cache();
                streams
                    .iter()
                    .copied()
                    .filter(|key| cache.get(name, key).is_none())
                    .collect()
            };
            if missing.is_empty() {
                continue;
            }
            let found = self
                .store
                .documents(descriptor, name, &missing)
                .await
                .map_err(|err| Problem::Retry(format!("prefetching documents: {err}")))?;
            let mut found: HashMap<String, Arc<[u8]>> = found
                .into_iter()
                .map(|d| (d.key, Arc::from(d.json.get().as_bytes())))
                .collect();
            let mut cache = cache();
            for key in missing {
                cache.remember(name, key, found.remove(key), self.config.cached_documents);
            }
        }
        Ok(())
    }

    async fn handle(&self, events: Vec<Event>) -> Result<BatchOutput, Problem> {
        self.prefetch(&events).await?;
        let plugin = self.projection.plugin.clone();
        let reader = Arc::new(StoreReader {
            store: self.store.clone(),
            descriptor: self.projection.descriptor().clone(),
            runtime: tokio::runtime::Handle::current(),
            cache: self.projection.documents.clone(),
            capacity: self.config.cached_documents,
        });
        let first = events.first().map(|e| e.position).unwrap_or(0);
        let metrics = &self.projection.metrics;
        ProjectionMetrics::add(&metrics.events, events.len() as u64);
        let start = std::time::Instant::now();
        let result = tokio::task::spawn_blocking(move || plugin.handle(events, reader)).await;
        ProjectionMetrics::add_time(&metrics.plugin_micros, start.elapsed());
        match result {
            Ok(Ok(output)) => Ok(output),
            Ok(Err(RuntimeError::State { source, .. })) => {
                Err(Problem::Retry(format!("reading a document: {source}")))
            }
            // A guest error names its event; anything else is pinned to the batch.
            Ok(Err(err @ RuntimeError::Guest { .. })) => Err(Problem::Fail(err.to_string())),
            Ok(Err(err)) => Err(Problem::Fail(format!(
                "{err} (batch from position {first})"
            ))),
            Err(join) => Err(Problem::Fail(format!("plugin call aborted: {join}"))),
        }
    }
}

async fn record_failure(projection: &Projection, store: &dyn Store, error: &str) {
    projection.mark_failed(error);
    if let Err(err) = store
        .set_status(projection.name(), ProjectionStatus::Failed, Some(error))
        .await
    {
        tracing::warn!(projection = %projection.name(), error = %err, "could not record the failure");
    }
}

/// Plugins write bytes; the read model serves JSON. A document that is not JSON, or that a
/// store cannot hold (PostgreSQL takes no NUL character in text or `jsonb`), is the plugin's
/// bug and is refused before it reaches a table, instead of failing every commit.
fn check_documents(output: &BatchOutput) -> Result<(), String> {
    for (collection, docs) in &output.writes {
        if let Some(key) = docs.keys().find(|k| k.contains('\0')) {
            return Err(format!("{collection}/{key:?}, a key with a NUL character"));
        }
        for (key, doc) in docs.iter().filter_map(|(k, d)| Some((k, d.as_ref()?))) {
            if let Some(what) = unstorable_escape(doc) {
                return Err(format!("{collection}/{key}, which holds {what}"));
            }
            if let Err(err) = serde_json::from_slice::<&serde_json::value::RawValue>(doc) {
                return Err(format!("{collection}/{key}, which is not JSON: {err}"));
            }
            if nesting(doc) > MAX_NESTING {
                return Err(format!(
                    "{collection}/{key}, which nests deeper than {MAX_NESTING} levels"
                ));
            }
        }
    }
    Ok(())
}

/// The wall clock in ms since the epoch (0 before it).
fn now_ms() -> u64 {
    crate::store::now_ms().max(0) as u64
}

/// The deepest nesting a store accepts (SQLite's JSONB limit is 1000).
const MAX_NESTING: usize = 1000;

/// How deeply arrays and objects nest in valid JSON text.
fn nesting(json: &[u8]) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0, false, false);
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// Documents as the store has them or is about to: the committed ones, plus those of the one
/// handled batch whose commit is in flight. Bounded.
///
/// Why it is never stale: a batch's documents go in (`apply`) before the next batch is handled,
/// and only `apply` evicts, at a moment when the previous commit is durable; so what eviction
/// drops is in the database, and the in-flight batch's documents are always here. A read-through
/// (`remember`) never evicts: it would drop documents not yet committed.
/// One collection's cached documents by key (`None`: known not to exist).
type CachedCollection = HashMap<String, Option<Arc<[u8]>>>;

struct DocumentCache {
    /// By collection, then key: a lookup by borrowed names allocates nothing.
    docs: HashMap<String, CachedCollection>,
    /// Documents held, over all collections.
    len: usize,
    /// Whether every committed document is in `docs` (so a miss means "no document").
    complete: bool,
}

impl DocumentCache {
    fn new(complete: bool) -> Self {
        Self {
            docs: HashMap::new(),
            len: 0,
            complete,
        }
    }

    fn get(&self, collection: &str, key: &str) -> Option<Option<Arc<[u8]>>> {
        match self.docs.get(collection).and_then(|docs| docs.get(key)) {
            Some(doc) => Some(doc.clone()),
            None if self.complete => Some(None),
            None => None,
        }
    }

    fn insert(&mut self, collection: &str, key: &str, doc: Option<Arc<[u8]>>) {
        let docs = match self.docs.get_mut(collection) {
            Some(docs) => docs,
            None => self.docs.entry(collection.to_owned()).or_default(),
        };
        // Most keys are cached already (a catch-up rewrites the same documents): no new key.
        match docs.get_mut(key) {
            Some(cached) => *cached = doc,
            None => {
                docs.insert(key.to_owned(), doc);
                self.len += 1;
            }
        }
    }

    /// Keeps a document read from the store, if there is room.
    fn remember(&mut self, collection: &str, key: &str, doc: Option<Arc<[u8]>>, capacity: usize) {
        if self.len < capacity {
            self.insert(collection, key, doc);
        }
    }

    /// Takes in a handled batch's documents. Call only when no other commit is in flight.
    fn apply(&mut self, output: &BatchOutput, capacity: usize) {
        if self.len + output.documents() > capacity {
            self.docs.clear();
            self.len = 0;
            self.complete = false;
        }
        for (collection, writes) in &output.writes {
            for (key, doc) in writes {
                self.insert(collection, key, doc.as_deref().map(Arc::from));
            }
        }
    }
}

/// `state.get` for a plugin in the pipeline: the committed document, from the cache or read
/// from the store on the plugin's (blocking) thread.
struct StoreReader {
    store: Arc<dyn Store>,
    descriptor: Descriptor,
    runtime: tokio::runtime::Handle,
    cache: Arc<Mutex<DocumentCache>>,
    capacity: usize,
}

impl DocumentReader for StoreReader {
    fn get(&self, collection: &str, key: &str) -> Result<Option<Vec<u8>>, BoxError> {
        // No store holds such a key (and PostgreSQL would refuse the query).
        if self.descriptor.collection(collection).is_none() || key.contains('\0') {
            return Ok(None);
        }
        let cache = || self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(doc) = cache().get(collection, key) {
            return Ok(doc.map(|d| d.to_vec()));
        }
        let doc = self
            .runtime
            .block_on(self.store.document(&self.descriptor, collection, key))?
            .map(|d| Arc::<[u8]>::from(d.json.get().as_bytes()));
        cache().remember(collection, key, doc.clone(), self.capacity);
        Ok(doc.map(|d| d.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_counts_brackets_outside_strings() {
        assert_eq!(nesting(br#"{"a": [1, {"b": "]]]{{{\\\"["}]}"#), 3);
        assert_eq!(nesting(b"42"), 0);
        let deep = format!("{}{}", "[".repeat(1001), "]".repeat(1001));
        assert_eq!(nesting(deep.as_bytes()), 1001);
    }

    #[test]
    fn nul_and_half_surrogate_escapes_are_found_and_escaped_backslashes_are_not() {
        let nul = Some("a NUL character (\\u0000)");
        let half = Some("an unpaired UTF-16 surrogate escape");
        assert_eq!(unstorable_escape(br#"{"a": "x\u0000"}"#), nul);
        assert_eq!(unstorable_escape(br#"{"a": "\\\u0000"}"#), nul);
        assert_eq!(unstorable_escape(br#"{"a": "\\u0000"}"#), None);
        assert_eq!(unstorable_escape(br#"{"a": "\u0001"}"#), None);
        assert_eq!(unstorable_escape(br#"{"a": "\ud83d\ude00 ok"}"#), None);
        assert_eq!(unstorable_escape(br#"{"a": "cut \ud83d"}"#), half);
        assert_eq!(unstorable_escape(br#"{"\ud800": 1}"#), half);
        assert_eq!(unstorable_escape(br#"{"a": "\ude00"}"#), half);
        assert_eq!(unstorable_escape(br#"{"a": "\ud83d\u0041"}"#), half);
        assert_eq!(unstorable_escape(br#"{"a": "\\ud800"}"#), None);
    }

    #[test]
    fn documents_too_deep_for_the_store_are_the_plugins_fault() {
        let mut output = BatchOutput::default();
        let deep = format!("{}{}", "[".repeat(1001), "]".repeat(1001));
        output
            .writes
            .entry("c".into())
            .or_default()
            .insert("k".into(), Some(deep.into_bytes()));
        let err = check_documents(&output).unwrap_err();
        assert!(
            err.contains("c/k") && err.contains("deeper than 1000"),
            "{err}"
        );
    }

    /// A string cut inside a surrogate pair (a plugin that slices UTF-16) is JSON to a lax
    /// parser, but neither store can keep it: refused with the document's name, not retried.
    #[test]
    fn documents_with_half_a_surrogate_pair_are_the_plugins_fault() {
        let mut output = BatchOutput::default();
        output
            .writes
            .entry("c".into())
            .or_default()
            .insert("k".into(), Some(br#"{"name": "ab\ud83d"}"#.to_vec()));
        let err = check_documents(&output).unwrap_err();
        assert!(err.contains("c/k") && err.contains("surrogate"), "{err}");
    }
}
