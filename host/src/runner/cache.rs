//! Documents a plugin reads: the bounded cache of committed (and in-flight) documents, and
//! the readers that serve `state.get` from it, the store, or an isolation's earlier writes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::runtime::{BatchOutput, BoxError, Descriptor, DocumentReader};
use crate::store::Store;

/// Documents as the store has them or is about to: the committed ones, plus those of the one
/// handled batch whose commit is in flight. Bounded.
///
/// Why it is never stale: a batch's documents go in (`apply`) before the next batch is handled,
/// and only `apply` evicts, at a moment when the previous commit is durable; so what eviction
/// drops is in the database, and the in-flight batch's documents are always here. A read-through
/// (`remember`) never evicts: it would drop documents not yet committed.
/// One collection's cached documents by key (`None`: known not to exist).
type CachedCollection = HashMap<String, Option<Arc<[u8]>>>;

pub(crate) struct DocumentCache {
    /// By collection, then key: a lookup by borrowed names allocates nothing.
    docs: HashMap<String, CachedCollection>,
    /// Documents held, over all collections.
    len: usize,
    /// Whether every committed document is in `docs` (so a miss means "no document").
    pub(super) complete: bool,
}

impl DocumentCache {
    pub(super) fn new(complete: bool) -> Self {
        Self {
            docs: HashMap::new(),
            len: 0,
            complete,
        }
    }

    pub(super) fn get(&self, collection: &str, key: &str) -> Option<Option<Arc<[u8]>>> {
        match self.docs.get(collection).and_then(|docs| docs.get(key)) {
            Some(doc) => Some(doc.clone()),
            None if self.complete => Some(None),
            None => None,
        }
    }

    pub(super) fn insert(&mut self, collection: &str, key: &str, doc: Option<Arc<[u8]>>) {
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
    pub(super) fn remember(
        &mut self,
        collection: &str,
        key: &str,
        doc: Option<Arc<[u8]>>,
        capacity: usize,
    ) {
        if self.len < capacity {
            self.insert(collection, key, doc);
        }
    }

    /// Takes in a handled batch's documents. Call only when no other commit is in flight.
    pub(super) fn apply(&mut self, output: &BatchOutput, capacity: usize) {
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
pub(super) struct StoreReader {
    pub(super) store: Arc<dyn Store>,
    pub(super) descriptor: Descriptor,
    pub(super) runtime: tokio::runtime::Handle,
    pub(super) cache: Arc<Mutex<DocumentCache>>,
    pub(super) capacity: usize,
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

/// `state.get` during an isolation: the documents written by the sub-batches already run
/// (not committed yet) come first, then the store's.
pub(super) struct Overlay {
    pub(super) earlier: Arc<BatchOutput>,
    pub(super) then: Arc<StoreReader>,
}

impl DocumentReader for Overlay {
    fn get(&self, collection: &str, key: &str) -> Result<Option<Vec<u8>>, BoxError> {
        match self.earlier.writes.get(collection).and_then(|c| c.get(key)) {
            Some(doc) => Ok(doc.clone()),
            None => self.then.get(collection, key),
        }
    }
}
