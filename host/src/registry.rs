//! The projections this instance runs, by name: for each, the version that serves reads and
//! the one being built beside it. It changes while the host runs (a plugin added, swapped,
//! rebuilt or removed; see [`crate::deploy`]); readers take what is there when they look.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};

use crate::runner::Projection;
use crate::supervisor::Supervised;

/// One projection's versions on this instance.
#[derive(Clone)]
pub struct Entry {
    /// Serves every read.
    pub active: Arc<Supervised>,
    /// Catching up beside it, to take over once it has.
    pub building: Option<Arc<Supervised>>,
}

#[derive(Default)]
pub struct Registry {
    projections: RwLock<BTreeMap<String, Entry>>,
}

impl Registry {
    /// Adds or replaces the projection of that name (its active version); the one replaced,
    /// if any.
    pub fn insert(&self, supervised: Arc<Supervised>) -> Option<Entry> {
        let name = supervised.projection.name().to_owned();
        self.write().insert(
            name,
            Entry {
                active: supervised,
                building: None,
            },
        )
    }

    /// Sets the projection's entry as a whole.
    pub fn set(&self, name: &str, entry: Entry) {
        self.write().insert(name.to_owned(), entry);
    }

    pub fn remove(&self, name: &str) -> Option<Entry> {
        self.write().remove(name)
    }

    pub fn entry(&self, name: &str) -> Option<Entry> {
        self.read().get(name).cloned()
    }

    /// Every projection's entry, by name.
    pub fn entries(&self) -> Vec<(String, Entry)> {
        self.read()
            .iter()
            .map(|(name, entry)| (name.clone(), entry.clone()))
            .collect()
    }

    /// The supervisor of the version that serves.
    pub fn supervised(&self, name: &str) -> Option<Arc<Supervised>> {
        self.read().get(name).map(|e| e.active.clone())
    }

    /// The version that serves.
    pub fn get(&self, name: &str) -> Option<Arc<Projection>> {
        self.read().get(name).map(|e| e.active.projection.clone())
    }

    /// The projection's version `version`, if this instance has it loaded (serving or
    /// building).
    pub fn version(&self, name: &str, version: &str) -> Option<Arc<Projection>> {
        let projections = self.read();
        let entry = projections.get(name)?;
        std::iter::once(&entry.active)
            .chain(entry.building.as_ref())
            .map(|s| &s.projection)
            .find(|p| p.descriptor().version == version)
            .cloned()
    }

    /// Every projection's serving version, by name.
    pub fn projections(&self) -> Vec<Arc<Projection>> {
        self.read()
            .values()
            .map(|e| e.active.projection.clone())
            .collect()
    }

    /// Every supervisor, serving and building: what shutdown waits for.
    pub fn all_supervised(&self) -> Vec<Arc<Supervised>> {
        self.read()
            .values()
            .flat_map(|e| std::iter::once(e.active.clone()).chain(e.building.clone()))
            .collect()
    }

    pub fn names(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Entry>> {
        self.projections
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Entry>> {
        self.projections
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }
}
