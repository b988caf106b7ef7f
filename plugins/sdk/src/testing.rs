//! Run a projection natively, against an in-memory state, in a plugin crate's `cargo test`.
//! The crate's top-level example shows a whole test.

use std::collections::{BTreeMap, HashMap};
use std::marker::PhantomData;

use serde::de::DeserializeOwned;

use crate::{Backend, BatchError, Event, Projection};

/// Documents in memory: collection → key → JSON bytes.
#[derive(Debug, Default, Clone)]
pub struct MemoryBackend {
    pub docs: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
}

impl Backend for MemoryBackend {
    fn get(&mut self, collection: &str, key: &str) -> Option<Vec<u8>> {
        self.docs.get(collection)?.get(key).cloned()
    }
    fn put(&mut self, collection: &str, key: &str, document: &[u8]) {
        self.docs
            .entry(collection.to_owned())
            .or_default()
            .insert(key.to_owned(), document.to_vec());
    }
    fn delete(&mut self, collection: &str, key: &str) {
        if let Some(docs) = self.docs.get_mut(collection) {
            docs.remove(key);
        }
    }
}

/// Feeds events to a projection the way the host does: filtered by its subscriptions, in
/// batches, with versions and positions assigned per stream.
pub struct Harness<P> {
    pub state: MemoryBackend,
    versions: HashMap<String, u64>,
    position: u64,
    _projection: PhantomData<P>,
}

impl<P: Projection> Default for Harness<P> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P: Projection> Harness<P> {
    pub fn new() -> Self {
        Self {
            state: MemoryBackend::default(),
            versions: HashMap::new(),
            position: 0,
            _projection: PhantomData,
        }
    }

    /// Builds the next event of `stream` (version and position assigned, not yet applied).
    pub fn event(&mut self, stream: &str, event_type: &str, payload: serde_json::Value) -> Event {
        let version = self.versions.entry(stream.to_owned()).or_insert(0);
        *version += 1;
        self.position += 1;
        Event {
            id: format!("{stream}-{version}"),
            stream: stream.to_owned(),
            stream_type: String::new(),
            event_type: event_type.to_owned(),
            version: *version,
            position: self.position,
            timestamp_ms: 1_700_000_000_000 + self.position,
            payload: payload.to_string().into_bytes(),
            headers: Vec::new(),
        }
    }

    /// Applies events as one batch. The index in an error counts only the events the
    /// projection subscribes to, as the host's does.
    pub fn apply(&mut self, events: &[Event]) -> Result<(), BatchError> {
        let descriptor = P::describe();
        let wanted: Vec<Event> = events
            .iter()
            .filter(|e| descriptor.subscribes_to(&e.event_type))
            .cloned()
            .collect();
        let mut scratch = self.state.clone();
        crate::run_batch::<P>(&wanted, &mut scratch)?;
        // Like the host: a failed batch leaves the state untouched.
        self.state = scratch;
        Ok(())
    }

    /// Builds and applies one event.
    pub fn emit(
        &mut self,
        stream: &str,
        event_type: &str,
        payload: serde_json::Value,
    ) -> Result<(), BatchError> {
        let event = self.event(stream, event_type, payload);
        self.apply(&[event])
    }

    /// The document under `key`, decoded as `T`.
    pub fn doc<T: DeserializeOwned>(&self, collection: &str, key: &str) -> Option<T> {
        let bytes = self.state.docs.get(collection)?.get(key)?;
        serde_json::from_slice(bytes).ok()
    }
}
