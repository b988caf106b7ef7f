//! Run a projection or an observer natively, in a plugin crate's `cargo test`: a projection
//! against an in-memory state ([`Harness`]), an observer collecting its actions
//! ([`ObserverHarness`]). The crate's top-level examples show whole tests.

use std::collections::{BTreeMap, HashMap};
use std::marker::PhantomData;

use serde::de::DeserializeOwned;

use crate::{Action, ActionKind, Backend, BatchError, Event, Observer, Projection};

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

/// Builds events the way the host numbers them: versions per stream, positions across streams.
#[derive(Debug, Default)]
struct Events {
    versions: HashMap<String, u64>,
    position: u64,
}

impl Events {
    fn next(&mut self, stream: &str, event_type: &str, payload: serde_json::Value) -> Event {
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
}

/// The events of a batch the plugin subscribes to: the host skips the others, so indexes in
/// errors and actions count only these.
fn subscribed(descriptor: &crate::Descriptor, events: &[Event]) -> Vec<Event> {
    events
        .iter()
        .filter(|e| descriptor.subscribes_to(&e.event_type))
        .cloned()
        .collect()
}

/// Feeds events to a projection the way the host does: filtered by its subscriptions, in
/// batches, with versions and positions assigned per stream.
pub struct Harness<P> {
    pub state: MemoryBackend,
    events: Events,
    config: BTreeMap<String, String>,
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
            events: Events::default(),
            config: BTreeMap::new(),
            _projection: PhantomData,
        }
    }

    /// Sets a key of the operator's config ([`crate::config`]), as text like the host's.
    pub fn config(mut self, key: &str, value: &str) -> Self {
        self.config.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Builds the next event of `stream` (version and position assigned, not yet applied).
    pub fn event(&mut self, stream: &str, event_type: &str, payload: serde_json::Value) -> Event {
        self.events.next(stream, event_type, payload)
    }

    /// Applies events as one batch. The index in an error counts only the events the
    /// projection subscribes to, as the host's does.
    pub fn apply(&mut self, events: &[Event]) -> Result<(), BatchError> {
        let mut scratch = self.state.clone();
        crate::config::native::with(&self.config, || {
            let wanted = subscribed(&P::describe(), events);
            crate::run_batch::<P>(&wanted, &mut scratch)
        })?;
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

/// Feeds events to an observer the way the host does (filtered by its subscriptions, in
/// batches, versions and positions assigned per stream) and returns the actions it asks for.
pub struct ObserverHarness<O> {
    events: Events,
    config: BTreeMap<String, String>,
    _observer: PhantomData<O>,
}

impl<O: Observer> Default for ObserverHarness<O> {
    fn default() -> Self {
        Self::new()
    }
}

impl<O: Observer> ObserverHarness<O> {
    pub fn new() -> Self {
        Self {
            events: Events::default(),
            config: BTreeMap::new(),
            _observer: PhantomData,
        }
    }

    /// Sets a key of the operator's config ([`crate::config`]), as text like the host's.
    pub fn config(mut self, key: &str, value: &str) -> Self {
        self.config.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Builds the next event of `stream` (version and position assigned, not yet observed).
    pub fn event(&mut self, stream: &str, event_type: &str, payload: serde_json::Value) -> Event {
        self.events.next(stream, event_type, payload)
    }

    /// Runs the observer over events as one batch. Indexes (in the actions and in an error)
    /// count only the events the observer subscribes to, as the host's do.
    pub fn run(&mut self, events: &[Event]) -> Result<Vec<Action>, BatchError> {
        crate::config::native::with(&self.config, || {
            let wanted = subscribed(&O::describe(), events);
            crate::run_observer_batch::<O>(&wanted)
        })
    }

    /// Builds one event and returns what the observer does about it.
    pub fn observe(
        &mut self,
        stream: &str,
        event_type: &str,
        payload: serde_json::Value,
    ) -> Result<Vec<ActionKind>, BatchError> {
        let event = self.event(stream, event_type, payload);
        let actions = self.run(&[event])?;
        Ok(actions.into_iter().map(|action| action.kind).collect())
    }
}
