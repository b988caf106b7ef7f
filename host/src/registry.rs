//! The projections this instance runs, by name. It can change while the host runs (a plugin
//! added, swapped or removed); readers take what is there at the moment they look.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};

use crate::runner::Projection;
use crate::supervisor::Supervised;

#[derive(Default)]
pub struct Registry {
    projections: RwLock<BTreeMap<String, Arc<Supervised>>>,
}

impl Registry {
    /// Adds or replaces the projection of that name; the one replaced, if any.
    pub fn insert(&self, supervised: Arc<Supervised>) -> Option<Arc<Supervised>> {
        let name = supervised.projection.name().to_owned();
        self.write().insert(name, supervised)
    }

    pub fn remove(&self, name: &str) -> Option<Arc<Supervised>> {
        self.write().remove(name)
    }

    /// The supervised projection of that name.
    pub fn supervised(&self, name: &str) -> Option<Arc<Supervised>> {
        self.read().get(name).cloned()
    }

    pub fn get(&self, name: &str) -> Option<Arc<Projection>> {
        self.read().get(name).map(|s| s.projection.clone())
    }

    /// Every projection, by name.
    pub fn projections(&self) -> Vec<Arc<Projection>> {
        self.read().values().map(|s| s.projection.clone()).collect()
    }

    pub fn names(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Supervised>>> {
        self.projections
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Supervised>>> {
        self.projections
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }
}
