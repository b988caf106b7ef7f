//! The WASM side: bindings for the `projection` world and the adapter the export macro uses.

use std::marker::PhantomData;

pub mod bindings {
    wit_bindgen::generate!({
        world: "projection",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "__export_projection",
        default_bindings_module: "::projector_sdk::guest::bindings",
    });
}

use bindings::projector::plugin::{log as host_log, state as host_state, types};

use crate::{Backend, Descriptor, Event, Projection};

/// Serves the SDK's [`Backend`] from the host's `state` import.
struct HostState;

impl Backend for HostState {
    fn get(&mut self, collection: &str, key: &str) -> Option<Vec<u8>> {
        host_state::get(collection, key)
    }
    fn put(&mut self, collection: &str, key: &str, document: &[u8]) {
        host_state::put(collection, key, document)
    }
    fn delete(&mut self, collection: &str, key: &str) {
        host_state::delete(collection, key)
    }
}

/// Tells the host which event the SDK is on (`u32::MAX`: none, the batch as a whole).
pub(crate) fn begin_event(index: u32) {
    host_log::begin_event(index);
}

pub(crate) fn log(level: crate::log::Level, message: &str) {
    use crate::log::Level;
    let level = match level {
        Level::Trace => host_log::Level::Trace,
        Level::Debug => host_log::Level::Debug,
        Level::Info => host_log::Level::Info,
        Level::Warn => host_log::Level::Warn,
        Level::Error => host_log::Level::Error,
    };
    host_log::log(level, message);
}

/// A panic aborts the instance (wasm has no unwinding); before it does, tell the host why and
/// which event caused it (none in `describe`), since the trap alone cannot.
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let payload = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".to_owned());
            let message = match info.location() {
                Some(at) => format!("{payload} (at {}:{})", at.file(), at.line()),
                None => payload,
            };
            let index = crate::CURRENT_EVENT.load(std::sync::atomic::Ordering::Relaxed);
            host_log::report_panic(index, &message);
        }));
    });
}

/// Implements the world's exports for any [`Projection`].
pub struct Adapter<P>(PhantomData<P>);

impl<P: Projection + 'static> bindings::Guest for Adapter<P> {
    fn describe() -> types::Descriptor {
        // A panic here refuses the plugin at load: the host's error then carries its message.
        install_panic_hook();
        let Descriptor {
            name,
            version,
            event_types,
            collections,
        } = P::describe();
        types::Descriptor {
            name,
            version,
            event_types,
            collections: collections
                .into_iter()
                .map(|c| types::Collection {
                    name: c.name,
                    indexes: c.indexes,
                })
                .collect(),
        }
    }

    fn handle(events: Vec<types::Event>) -> Result<(), types::HandleError> {
        install_panic_hook();
        let events: Vec<Event> = events
            .into_iter()
            .map(|e| Event {
                id: e.id,
                stream: e.stream,
                stream_type: e.stream_type,
                event_type: e.event_type,
                version: e.version,
                position: e.position,
                timestamp_ms: e.timestamp_ms,
                payload: e.payload,
                headers: e.headers,
            })
            .collect();
        crate::run_batch::<P>(&events, &mut HostState).map_err(|err| types::HandleError {
            event_index: u32::try_from(err.index).unwrap_or(u32::MAX),
            message: err.message,
        })
    }
}
