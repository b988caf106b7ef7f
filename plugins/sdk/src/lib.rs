//! Write projector plugins in plain Rust: projections and observers.
//!
//! A projection is a type implementing [`Projection`]: it describes itself and handles one
//! event at a time against a [`State`] of JSON documents. [`export_projection!`] turns it into a
//! WebAssembly component for the host; [`testing::Harness`] runs the very same code natively, so
//! `cargo test` in a plugin crate needs no WASM at all.
//!
//! ```
//! use projector_sdk::prelude::*;
//!
//! struct Counter;
//!
//! impl Projection for Counter {
//!     fn describe() -> Descriptor {
//!         Descriptor::new("counter", "1.0.0").collection("counts", &[])
//!     }
//!     fn handle(event: &Event, state: &mut State) -> Result<()> {
//!         state.upsert("counts", &event.stream, |n: &mut u64| *n += 1)
//!     }
//! }
//! projector_sdk::export_projection!(Counter);
//!
//! // The same code, natively, in a test:
//! let mut h = projector_sdk::testing::Harness::<Counter>::new();
//! h.emit("cart-1", "ItemAdded", serde_json::json!({})).unwrap();
//! h.emit("cart-1", "ItemAdded", serde_json::json!({})).unwrap();
//! assert_eq!(h.doc::<u64>("counts", "cart-1"), Some(2));
//! ```
//!
//! An observer is a type implementing [`Observer`]: for each event it adds [`Actions`] (a
//! [`Webhook`] to call, an [`Emit`]ted event to append, a log line), which the host carries out
//! once each, with retries; the guest itself reaches nothing outside. [`export_observer!`]
//! exports it and [`testing::ObserverHarness`] returns its actions in tests. Both kinds read the
//! operator's settings for the plugin with [`config`].
//!
//! ```
//! use projector_sdk::prelude::*;
//! use projector_sdk::ActionKind;
//!
//! struct CartAbandoned;
//!
//! impl Observer for CartAbandoned {
//!     fn describe() -> Descriptor {
//!         Descriptor::new("cart-abandoned", "1.0.0").events(&["CartAbandoned"])
//!     }
//!     fn on_event(event: &Event, actions: &mut Actions) -> Result<()> {
//!         let url = config::get("url").ok_or_else(|| Error::msg("set `url`"))?;
//!         actions.webhook(Webhook::post(&url).json(&serde_json::json!({"cart": event.stream}))?);
//!         Ok(())
//!     }
//! }
//! projector_sdk::export_observer!(CartAbandoned);
//!
//! let mut h = projector_sdk::testing::ObserverHarness::<CartAbandoned>::new()
//!     .config("url", "https://crm.example/hooks/cart");
//! let actions = h.observe("cart-1", "CartAbandoned", serde_json::json!({})).unwrap();
//! let [ActionKind::Webhook(hook)] = actions.as_slice() else { panic!("{actions:?}") };
//! assert_eq!(hook.url, "https://crm.example/hooks/cart");
//! assert_eq!(hook.body, br#"{"cart":"cart-1"}"#);
//! ```

pub mod config;
mod event;
pub mod log;
mod observer;
mod state;
pub mod testing;

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod guest;

pub use event::Event;
pub use observer::{run_observer_batch, Action, ActionKind, Actions, Emit, Observer, Webhook};
pub use serde;
pub use serde_json;
pub use state::{Backend, State};

/// The usual imports for a plugin crate.
pub mod prelude {
    pub use crate::config;
    pub use crate::{Actions, Descriptor, Emit, Error, Event, Observer, Projection, Result};
    pub use crate::{State, Webhook};
    pub use serde::{Deserialize, Serialize};
}

/// What a projection or an observer tells the host about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub name: String,
    pub version: String,
    /// Event types to receive; empty means every type.
    pub event_types: Vec<String>,
    pub collections: Vec<Collection>,
}

/// A collection of documents and the JSON fields the host indexes for queries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collection {
    pub name: String,
    pub indexes: Vec<String>,
}

impl Descriptor {
    pub fn new(name: &str, version: &str) -> Self {
        Self {
            name: name.to_owned(),
            version: version.to_owned(),
            event_types: Vec::new(),
            collections: Vec::new(),
        }
    }

    /// Subscribe to these event types only (the default is all).
    pub fn events(mut self, types: &[&str]) -> Self {
        self.event_types = types.iter().map(|t| (*t).to_owned()).collect();
        self
    }

    /// Declare a collection and the JSON fields (names or dotted paths) queries filter on.
    pub fn collection(mut self, name: &str, indexes: &[&str]) -> Self {
        self.collections.push(Collection {
            name: name.to_owned(),
            indexes: indexes.iter().map(|i| (*i).to_owned()).collect(),
        });
        self
    }

    /// Whether events of this type reach the projection.
    pub fn subscribes_to(&self, event_type: &str) -> bool {
        self.event_types.is_empty() || self.event_types.iter().any(|t| t == event_type)
    }
}

/// A projection: folds events into documents.
pub trait Projection {
    fn describe() -> Descriptor;

    /// Apply one event. Returning an error fails the whole batch: nothing of it is committed
    /// and the host reports this event as the culprit.
    fn handle(event: &Event, state: &mut State) -> Result<()>;
}

/// A plugin's error: a message for the operator. Any `std::error::Error` (a payload that does
/// not decode, say) converts into it with `?`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(String);

impl Error {
    pub fn msg(message: impl std::fmt::Display) -> Self {
        Self(message.to_string())
    }
    pub fn message(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl<E: std::error::Error> From<E> for Error {
    fn from(err: E) -> Self {
        Self(err.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Decodes JSON into `T`, naming the path of the field at fault (`items[0].price: invalid
/// type: ...`): serde_json alone names only a line and a column of text nobody sees.
pub(crate) fn decode_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|err| err.to_string())?;
    de.end().map_err(|err| err.to_string())?;
    Ok(value)
}

/// A failed batch: the index of the event that failed and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchError {
    /// The failed event's index in the batch, or [`BatchError::WHOLE_BATCH`] when no single
    /// event failed (the documents could not be written back at the end of the batch).
    pub index: usize,
    pub message: String,
}

impl BatchError {
    /// The `index` of a failure of the batch as a whole: `u32::MAX`, as the contract's
    /// `handle-error` spells it.
    pub const WHOLE_BATCH: usize = u32::MAX as usize;

    /// The index of the event that failed; `None` when the batch as a whole did.
    pub fn event_index(&self) -> Option<usize> {
        (self.index != Self::WHOLE_BATCH).then_some(self.index)
    }
}

impl std::fmt::Display for BatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.event_index() {
            Some(index) => write!(f, "event #{index}: {}", self.message),
            None => write!(f, "the batch as a whole: {}", self.message),
        }
    }
}

impl std::error::Error for BatchError {}

/// [`CURRENT_EVENT`] when the SDK is not inside one event: before the first and while it
/// writes back the batch's documents.
const NO_EVENT: u32 = u32::MAX;

/// The index of the event being handled, for the panic hook to report.
pub(crate) static CURRENT_EVENT: std::sync::atomic::AtomicU32 =
    std::sync::atomic::AtomicU32::new(NO_EVENT);

/// The error of the batch's event `index`, naming the event so the operator can find it.
fn event_failed(index: usize, event: &Event, err: &Error) -> BatchError {
    BatchError {
        index,
        message: format!(
            "{} (version {} of stream {}): {}",
            event.event_type, event.version, event.stream, err
        ),
    }
}

/// Records which event the SDK is on, for its panic hook and (in WASM) for the host, which
/// names it when it cuts the call short (deadline, memory, output cap, trap).
fn begin_event(index: u32) {
    CURRENT_EVENT.store(index, std::sync::atomic::Ordering::Relaxed);
    #[cfg(target_arch = "wasm32")]
    guest::begin_event(index);
}

/// Runs `P` over one batch and flushes the documents it changed to `backend`: the single code
/// path behind both the WASM export and the native test harness.
pub fn run_batch<P: Projection>(
    events: &[Event],
    backend: &mut dyn Backend,
) -> Result<(), BatchError> {
    let mut state = State::new(backend);
    for (index, event) in events.iter().enumerate() {
        begin_event(u32::try_from(index).unwrap_or(NO_EVENT));
        P::handle(event, &mut state).map_err(|err| event_failed(index, event, &err))?;
    }
    // Past the events: writing back the documents is the batch's doing, not its last event's.
    begin_event(NO_EVENT);
    state.flush().map_err(|err| BatchError {
        index: BatchError::WHOLE_BATCH,
        message: format!(
            "flushing the batch's documents failed, a document could not be serialized: {err}"
        ),
    })
}

/// Exports a [`Projection`] as the component's `projection` world. Natively it expands to
/// nothing, so the same crate builds and tests on the host.
#[macro_export]
macro_rules! export_projection {
    ($ty:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            type __ProjectorGuest = $crate::guest::Adapter<$ty>;
            $crate::guest::bindings::__export_projection!(
                __ProjectorGuest with_types_in $crate::guest::bindings
            );
        };
    };
}

/// Exports an [`Observer`] as the component's `observer` world. Natively it expands to nothing,
/// so the same crate builds and tests on the host.
#[macro_export]
macro_rules! export_observer {
    ($ty:ty) => {
        // The bindings need a module: their export glue names its types by path.
        #[cfg(target_arch = "wasm32")]
        type __ProjectorObserverImpl = $ty;

        #[cfg(target_arch = "wasm32")]
        #[doc(hidden)]
        mod __projector_observer {
            $crate::__observer_bindings!();

            pub struct Adapter;

            impl Guest for Adapter {
                fn describe() -> Descriptor {
                    $crate::guest::observer_describe::<super::__ProjectorObserverImpl>()
                }
                fn on_events(events: Vec<Event>) -> Result<Vec<Action>, HandleError> {
                    $crate::guest::observer_on_events::<super::__ProjectorObserverImpl>(events)
                }
            }

            __export_observer_impl!(Adapter with_types_in self);
        }
    };
}

/// Writes a document straight to the host, bypassing [`State`]'s per-batch buffer. Only for
/// the host's own test fixtures; plugins use [`State`].
#[doc(hidden)]
pub fn guest_state_put(collection: &str, key: &str, document: &[u8]) {
    #[cfg(target_arch = "wasm32")]
    guest::bindings::projector::plugin::state::put(collection, key, document);
    #[cfg(not(target_arch = "wasm32"))]
    let _ = (collection, key, document);
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use crate::prelude::*;
    use crate::testing::Harness;

    /// Stores a document serde_json cannot serialize (a map with non-string keys) when the
    /// payload asks for it: the write-back at the end of the batch fails.
    struct Unserializable;

    impl Projection for Unserializable {
        fn describe() -> Descriptor {
            Descriptor::new("unserializable", "1.0.0").collection("docs", &[])
        }
        fn handle(event: &Event, state: &mut State) -> Result<()> {
            #[derive(Deserialize)]
            struct Payload {
                #[serde(default)]
                bad: bool,
            }
            if event.payload::<Payload>()?.bad {
                let doc: BTreeMap<Vec<u8>, u8> = BTreeMap::from([(vec![1], 1)]);
                state.put("docs", &event.stream, doc);
            } else {
                state.upsert("docs", &event.stream, |n: &mut u64| *n += 1)?;
            }
            Ok(())
        }
    }

    #[test]
    fn a_failed_flush_blames_the_batch_not_its_last_event() {
        let mut h = Harness::<Unserializable>::new();
        let batch = [
            h.event("a", "E", serde_json::json!({"bad": true})),
            h.event("b", "E", serde_json::json!({})),
            h.event("c", "E", serde_json::json!({})),
        ];
        let err = h.apply(&batch).unwrap_err();
        assert_eq!(err.index, crate::BatchError::WHOLE_BATCH);
        assert_eq!(err.event_index(), None);
        assert!(
            err.message
                .contains("flushing the batch's documents failed"),
            "{err}"
        );
        assert!(
            err.to_string().starts_with("the batch as a whole: "),
            "{err}"
        );
        assert!(h.state.docs.is_empty(), "a failed batch changes nothing");
    }

    #[test]
    fn the_crates_wit_is_a_copy_of_the_repositorys_contract() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        // Outside the repository (a packaged or vendored copy) there is nothing to compare.
        let Ok(contract) = std::fs::read(dir.join("../../wit/plugin.wit")) else {
            return;
        };
        let copy = std::fs::read(dir.join("wit/plugin.wit")).unwrap();
        assert!(
            copy == contract,
            "plugins/sdk/wit/plugin.wit differs from wit/plugin.wit: copy wit/plugin.wit over it"
        );
    }

    #[test]
    fn a_failed_event_is_named() {
        let mut h = Harness::<Unserializable>::new();
        let batch = [
            h.event("a", "E", serde_json::json!({})),
            h.event("b", "E", serde_json::json!("not an object")),
        ];
        let err = h.apply(&batch).unwrap_err();
        assert_eq!(err.event_index(), Some(1));
        assert!(err.to_string().starts_with("event #1: "), "{err}");
    }
}
