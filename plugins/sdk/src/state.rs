//! The documents a projection reads and writes during one batch.
//!
//! Every document touched in a batch is cached here, in its typed form once a handler has
//! used it as one, so ten events on one account cost one host `get`, no JSON round trip between
//! them, and one host `put` when the batch ends.

use std::any::Any;
use std::collections::HashMap;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::Error;

/// Where documents come from and go to: the host's `state` import in WASM, a map in tests.
pub trait Backend {
    fn get(&mut self, collection: &str, key: &str) -> Option<Vec<u8>>;
    fn put(&mut self, collection: &str, key: &str, document: &[u8]);
    fn delete(&mut self, collection: &str, key: &str);
}

trait Doc: Any {
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
    fn to_json(&self) -> serde_json::Result<Vec<u8>>;
}

impl<T: Serialize + 'static> Doc for T {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
    fn to_json(&self) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec(self)
    }
}

enum Slot {
    Absent,
    Raw(Vec<u8>),
    Typed(Box<dyn Doc>),
}

struct Entry {
    slot: Slot,
    dirty: bool,
}

/// Typed access to the read model's documents (JSON, keyed by collection and key).
pub struct State<'a> {
    backend: &'a mut dyn Backend,
    collections: HashMap<String, HashMap<String, Entry>>,
}

impl<'a> State<'a> {
    pub fn new(backend: &'a mut dyn Backend) -> Self {
        Self {
            backend,
            collections: HashMap::new(),
        }
    }

    fn entry(&mut self, collection: &str, key: &str) -> &mut Entry {
        if !self.collections.contains_key(collection) {
            self.collections
                .insert(collection.to_owned(), HashMap::new());
        }
        let docs = self
            .collections
            .get_mut(collection)
            .expect("collection inserted above");
        if !docs.contains_key(key) {
            let slot = match self.backend.get(collection, key) {
                Some(bytes) => Slot::Raw(bytes),
                None => Slot::Absent,
            };
            docs.insert(key.to_owned(), Entry { slot, dirty: false });
        }
        docs.get_mut(key).expect("entry inserted above")
    }

    /// The document as a `T`, or `None` when there is none.
    pub fn get<T: DeserializeOwned + Serialize + Clone + 'static>(
        &mut self,
        collection: &str,
        key: &str,
    ) -> Result<Option<T>, Error> {
        Ok(typed_mut::<T>(self.entry(collection, key), collection, key)?.cloned())
    }

    /// Replaces (or creates) the document.
    pub fn put<T: Serialize + 'static>(&mut self, collection: &str, key: &str, document: T) {
        let docs = self.collections.entry(collection.to_owned()).or_default();
        docs.insert(
            key.to_owned(),
            Entry {
                slot: Slot::Typed(Box::new(document)),
                dirty: true,
            },
        );
    }

    pub fn delete(&mut self, collection: &str, key: &str) {
        let docs = self.collections.entry(collection.to_owned()).or_default();
        docs.insert(
            key.to_owned(),
            Entry {
                slot: Slot::Absent,
                dirty: true,
            },
        );
    }

    /// Changes an existing document in place; returns `false` (and changes nothing) when there
    /// is no document under `key`.
    pub fn update<T: DeserializeOwned + Serialize + 'static>(
        &mut self,
        collection: &str,
        key: &str,
        change: impl FnOnce(&mut T),
    ) -> Result<bool, Error> {
        let entry = self.entry(collection, key);
        let Some(doc) = typed_mut::<T>(entry, collection, key)? else {
            return Ok(false);
        };
        change(doc);
        entry.dirty = true;
        Ok(true)
    }

    /// Like [`State::update`] for a change that can fail (an overflow, a rule of the domain):
    /// the error fails the event. Check before changing: fields changed before the error are
    /// dropped with the failed batch, never committed.
    pub fn try_update<T: DeserializeOwned + Serialize + 'static>(
        &mut self,
        collection: &str,
        key: &str,
        change: impl FnOnce(&mut T) -> Result<(), Error>,
    ) -> Result<bool, Error> {
        let entry = self.entry(collection, key);
        let Some(doc) = typed_mut::<T>(entry, collection, key)? else {
            return Ok(false);
        };
        change(doc)?;
        entry.dirty = true;
        Ok(true)
    }

    /// Like [`State::update`], starting from `T::default()` when there is no document yet.
    pub fn upsert<T: DeserializeOwned + Serialize + Default + 'static>(
        &mut self,
        collection: &str,
        key: &str,
        change: impl FnOnce(&mut T),
    ) -> Result<(), Error> {
        let entry = self.entry(collection, key);
        if matches!(entry.slot, Slot::Absent) {
            entry.slot = Slot::Typed(Box::new(T::default()));
        }
        if let Some(doc) = typed_mut::<T>(entry, collection, key)? {
            change(doc);
        }
        entry.dirty = true;
        Ok(())
    }

    /// Writes every changed document to the backend, in no particular order (the host sorts).
    pub fn flush(self) -> serde_json::Result<()> {
        for (collection, docs) in self.collections {
            for (key, entry) in docs {
                if !entry.dirty {
                    continue;
                }
                match entry.slot {
                    Slot::Absent => self.backend.delete(&collection, &key),
                    Slot::Raw(bytes) => self.backend.put(&collection, &key, &bytes),
                    Slot::Typed(doc) => self.backend.put(&collection, &key, &doc.to_json()?),
                }
            }
        }
        Ok(())
    }
}

/// Turns the entry's document into a `T` in place (decoding raw JSON, or converting a document
/// a handler stored as another type) and lends it out.
fn typed_mut<'e, T: DeserializeOwned + Serialize + 'static>(
    entry: &'e mut Entry,
    collection: &str,
    key: &str,
) -> Result<Option<&'e mut T>, Error> {
    let decode = |bytes: &[u8]| {
        crate::decode_json::<T>(bytes).map_err(|err| {
            Error::msg(format!(
                "document {collection}/{key} does not decode as {}: {err}",
                std::any::type_name::<T>()
            ))
        })
    };
    let converted = match &entry.slot {
        Slot::Absent => return Ok(None),
        Slot::Raw(bytes) => Some(decode(bytes)?),
        Slot::Typed(doc) if doc.as_any().is::<T>() => None,
        Slot::Typed(doc) => Some(decode(&doc.to_json()?)?),
    };
    if let Some(doc) = converted {
        entry.slot = Slot::Typed(Box::new(doc));
    }
    match &mut entry.slot {
        Slot::Typed(doc) => Ok(doc.as_any_mut().downcast_mut::<T>()),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::State;
    use crate::testing::MemoryBackend;
    use crate::Backend;

    #[derive(Debug, Clone, Default, Serialize, Deserialize)]
    struct Cart {
        items: Vec<Item>,
    }

    #[derive(Debug, Clone, Default, Serialize, Deserialize)]
    struct Item {
        price: i64,
    }

    #[test]
    fn a_document_that_does_not_decode_names_the_path_of_the_field() {
        let mut backend = MemoryBackend::default();
        backend.put("carts", "c-1", br#"{"items":[{"price":1},{"price":"x"}]}"#);
        let mut state = State::new(&mut backend);
        let err = state.get::<Cart>("carts", "c-1").unwrap_err();
        assert!(
            err.message().starts_with(
                r#"document carts/c-1 does not decode as projector_sdk::state::tests::Cart: items[1].price: invalid type: string "x", expected i64"#
            ),
            "{err}"
        );
    }
}
