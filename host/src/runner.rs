//! One runner per projection: read after the checkpoint, hand the batch to the plugin in one
//! call, commit its documents with the new checkpoint in one transaction, publish the position.
//!
//! When it stops: a plugin failure stops this projection only (status `failed`, error kept,
//! waiters answered at once); a database error is retried with backoff forever, since the
//! batch is intact and the database usually comes back; shutdown stops between batches.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use crate::config::RunnerConfig;
use crate::consistency::Progress;
use crate::event::Event;
use crate::runtime::{
    BatchHandler, BatchOutput, BoxError, Descriptor, DocumentReader, RuntimeError,
};
use crate::source::Source;
use crate::store::{ProjectionStatus, Store};

/// A projection as the rest of the host sees it: its plugin, its progress, its health.
pub struct Projection {
    pub plugin: Arc<dyn BatchHandler>,
    progress: watch::Sender<Progress>,
    health: Mutex<Health>,
    documents: Arc<Mutex<DocumentCache>>,
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
            // A projection that starts from position 0 has empty tables: the cache then holds
            // every document there is, and a miss needs no query.
            documents: Arc::new(Mutex::new(DocumentCache::new(checkpoint == 0))),
            progress: watch::Sender::new(Progress {
                position: checkpoint,
                failed: false,
            }),
            health: Mutex::new(Health {
                status: ProjectionStatus::Running,
                error: None,
                retrying: None,
            }),
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

    fn update_health(&self, change: impl FnOnce(&mut Health)) {
        change(&mut self.health.lock().unwrap_or_else(PoisonError::into_inner));
    }
}

pub struct Runner {
    projection: Arc<Projection>,
    store: Arc<dyn Store>,
    source: Arc<dyn Source>,
    config: RunnerConfig,
}

enum Step {
    Committed,
    Idle,
    Retry(String),
    Fail(String),
}

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
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let name = self.projection.name().to_owned();
        let mut head = self.source.head();
        let mut backoff = Duration::from_millis(50);
        let max_backoff = Duration::from_millis(self.config.max_retry_backoff_ms.max(50));
        tracing::info!(projection = %name, checkpoint = self.projection.checkpoint(), "runner started");
        loop {
            if *shutdown.borrow() {
                break;
            }
            // Seen before reading, so an append that lands after the read still wakes us.
            head.borrow_and_update();
            match self.step().await {
                Step::Committed => {
                    if backoff > Duration::from_millis(50) {
                        tracing::info!(projection = %name, "recovered");
                        self.projection.update_health(|h| h.retrying = None);
                        backoff = Duration::from_millis(50);
                    }
                }
                Step::Idle => {
                    tokio::select! {
                        _ = head.changed() => {}
                        _ = shutdown.changed() => {}
                    }
                }
                Step::Retry(error) => {
                    tracing::warn!(projection = %name, error = %error, retry_in_ms = backoff.as_millis() as u64, "batch not committed, retrying");
                    self.projection.update_health(|h| h.retrying = Some(error));
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => {}
                    }
                    backoff = (backoff * 2).min(max_backoff);
                }
                Step::Fail(error) => {
                    tracing::error!(projection = %name, checkpoint = self.projection.checkpoint(), error = %error, "projection failed and stopped");
                    self.projection.update_health(|h| {
                        h.status = ProjectionStatus::Failed;
                        h.error = Some(error.clone());
                        h.retrying = None;
                    });
                    self.projection.progress.send_modify(|p| p.failed = true);
                    if let Err(err) = self
                        .store
                        .set_status(&name, ProjectionStatus::Failed, Some(&error))
                        .await
                    {
                        tracing::warn!(projection = %name, error = %err, "could not record the failure");
                    }
                    return;
                }
            }
        }
        tracing::info!(projection = %name, checkpoint = self.projection.checkpoint(), "runner stopped");
    }

    async fn step(&self) -> Step {
        let checkpoint = self.projection.checkpoint();
        let events = match self
            .source
            .read(
                checkpoint,
                self.config.max_batch_events,
                self.config.max_batch_bytes,
            )
            .await
        {
            Ok(events) => events,
            Err(err) => return Step::Retry(err.to_string()),
        };
        let Some(last) = events.last().map(|e| e.position) else {
            return Step::Idle;
        };
        let descriptor = self.projection.descriptor();
        let wanted: Vec<Event> = events
            .into_iter()
            .filter(|e| descriptor.subscribes_to(&e.event_type))
            .collect();
        let output = if wanted.is_empty() {
            // Nothing for this plugin; the checkpoint still moves past these events.
            BatchOutput::default()
        } else {
            match self.handle(wanted).await {
                Ok(output) => output,
                Err(step) => return step,
            }
        };
        if let Err(err) = check_documents(&output) {
            return Step::Fail(format!("{} wrote {err}", descriptor.name));
        }
        match self.store.commit(descriptor, &output, last).await {
            Ok(()) => {
                self.projection
                    .documents
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .apply(&output, self.config.cached_documents);
                self.projection.progress.send_replace(Progress {
                    position: last,
                    failed: false,
                });
                Step::Committed
            }
            Err(err) => Step::Retry(err.to_string()),
        }
    }

    async fn handle(&self, events: Vec<Event>) -> Result<BatchOutput, Step> {
        let plugin = self.projection.plugin.clone();
        let reader = Arc::new(StoreReader {
            store: self.store.clone(),
            descriptor: self.projection.descriptor().clone(),
            runtime: tokio::runtime::Handle::current(),
            cache: self.projection.documents.clone(),
            capacity: self.config.cached_documents,
        });
        let first = events.first().map(|e| e.position).unwrap_or(0);
        let result = tokio::task::spawn_blocking(move || {
            let result = plugin.handle(&events, reader);
            (result, events)
        })
        .await;
        match result {
            Ok((Ok(output), _)) => Ok(output),
            Ok((Err(RuntimeError::State { source, .. }), _)) => {
                Err(Step::Retry(format!("reading a document: {source}")))
            }
            Ok((Err(err), events)) => {
                let at = err
                    .event_index()
                    .and_then(|i| events.get(i))
                    .map(|e| format!(" at position {} ({}@{})", e.position, e.stream, e.version))
                    .unwrap_or_else(|| format!(" in the batch from position {first}"));
                Err(Step::Fail(format!("{err}{at}")))
            }
            Err(join) => Err(Step::Fail(format!("plugin call aborted: {join}"))),
        }
    }
}

/// Plugins write bytes; the read model serves JSON. A document that is not JSON is the
/// plugin's bug and is refused before it reaches a table.
fn check_documents(output: &BatchOutput) -> Result<(), String> {
    for (collection, docs) in &output.writes {
        for (key, doc) in docs {
            if let Some(doc) = doc {
                if let Err(err) = serde_json::from_slice::<&serde_json::value::RawValue>(doc) {
                    return Err(format!("{collection}/{key}, which is not JSON: {err}"));
                }
            }
        }
    }
    Ok(())
}

/// Committed documents, as the store has them, so a catch-up does not query the store for every
/// document a batch touches. Bounded: when full it is dropped whole and refilled from misses.
struct DocumentCache {
    docs: HashMap<(String, String), Option<Arc<[u8]>>>,
    /// Whether every committed document is in `docs` (so a miss means "no document").
    complete: bool,
}

impl DocumentCache {
    fn new(complete: bool) -> Self {
        Self {
            docs: HashMap::new(),
            complete,
        }
    }

    fn get(&self, collection: &str, key: &str) -> Option<Option<Arc<[u8]>>> {
        // A tuple key cannot be looked up by borrowed parts; the allocation is far cheaper
        // than the query it saves.
        match self.docs.get(&(collection.to_owned(), key.to_owned())) {
            Some(doc) => Some(doc.clone()),
            None if self.complete => Some(None),
            None => None,
        }
    }

    fn insert(&mut self, collection: &str, key: &str, doc: Option<Arc<[u8]>>, capacity: usize) {
        if self.docs.len() >= capacity {
            self.docs.clear();
            self.complete = false;
        }
        self.docs
            .insert((collection.to_owned(), key.to_owned()), doc);
    }

    /// Applies a committed batch.
    fn apply(&mut self, output: &BatchOutput, capacity: usize) {
        for (collection, writes) in &output.writes {
            for (key, doc) in writes {
                let doc = doc.as_deref().map(Arc::from);
                self.insert(collection, key, doc, capacity);
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
        if self.descriptor.collection(collection).is_none() {
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
        cache().insert(collection, key, doc.clone(), self.capacity);
        Ok(doc.map(|d| d.to_vec()))
    }
}
