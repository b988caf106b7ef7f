//! The host side of one plugin call: the store's data, and the `state` and `log` imports.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::projection::projector::plugin::{config, log, state, types};
use super::sandbox::{self, GuestOutput, Limiter};
use super::{BoxError, Descriptor, Limits};
use crate::event::Event;

/// Committed documents a plugin's `state.get` reads through to (the store, in the pipeline).
/// Called from the plugin's thread, synchronously, only for documents the batch has not
/// written yet.
pub trait DocumentReader: Send + Sync {
    fn get(&self, collection: &str, key: &str) -> Result<Option<Vec<u8>>, BoxError>;
}

/// An in-memory [`DocumentReader`], also the read model of `projector replay`.
#[derive(Debug, Default)]
pub struct MemoryDocuments {
    docs: Mutex<BTreeMap<String, BTreeMap<String, Vec<u8>>>>,
}

impl MemoryDocuments {
    /// Applies a batch's output.
    pub fn apply(&self, output: BatchOutput) {
        let mut docs = self.docs.lock().unwrap_or_else(PoisonError::into_inner);
        for (collection, writes) in output.writes {
            let coll = docs.entry(collection).or_default();
            for (key, doc) in writes {
                match doc {
                    Some(doc) => coll.insert(key, doc),
                    None => coll.remove(&key),
                };
            }
        }
    }

    /// A snapshot: collection → key → document.
    pub fn snapshot(&self) -> BTreeMap<String, BTreeMap<String, Vec<u8>>> {
        self.docs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl DocumentReader for MemoryDocuments {
    fn get(&self, collection: &str, key: &str) -> Result<Option<Vec<u8>>, BoxError> {
        let docs = self.docs.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(docs.get(collection).and_then(|c| c.get(key)).cloned())
    }
}

/// What one successful batch wrote: collection → key → document (`None`: deleted), in key
/// order, each document once however often the plugin wrote it; or, from an observer, the
/// actions it decided, in event order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchOutput {
    pub writes: BTreeMap<String, BTreeMap<String, Option<Vec<u8>>>>,
    pub actions: Vec<crate::observer::Decided>,
}

impl BatchOutput {
    pub fn documents(&self) -> usize {
        self.writes.values().map(BTreeMap::len).sum()
    }
}

pub(crate) struct HostState {
    plugin: Arc<str>,
    wasi: WasiCtx,
    table: ResourceTable,
    stdout: GuestOutput,
    stderr: GuestOutput,
    pub limiter: Limiter,
    docs: Arc<dyn DocumentReader>,
    /// The operator's `[plugins.<name>]` settings, for the `config` import.
    config: Arc<BTreeMap<String, String>>,
    collections: HashSet<String>,
    writes: HashMap<String, HashMap<String, Option<Vec<u8>>>>,
    output_bytes: usize,
    max_output_bytes: usize,
    log_lines_left: usize,
    log_lines_dropped: usize,
    pub output_exceeded: bool,
    pub state_error: Option<BoxError>,
    pub contract_violation: Option<String>,
    pub panic: Option<(u32, String)>,
    /// The event the guest said it is on (`log.begin-event`, contract 0.1.1): where a call
    /// was when the host cut it short. `None` before the first event, once the guest is past
    /// its events, and always for a plugin built against 0.1.0.
    pub current_event: Option<usize>,
}

/// Bytes of stdout/stderr kept per call; past it output is counted, not stored.
const STDIO_CAP: usize = 16 * 1024;

impl HostState {
    pub fn new(
        plugin: &str,
        limits: &Limits,
        descriptor: &Descriptor,
        events: &[Event],
        docs: Arc<dyn DocumentReader>,
        config: Arc<BTreeMap<String, String>>,
    ) -> Self {
        let stdout = GuestOutput::new(STDIO_CAP);
        let stderr = GuestOutput::new(STDIO_CAP);
        Self {
            plugin: plugin.into(),
            wasi: sandbox::wasi_context(events, &stdout, &stderr),
            table: ResourceTable::new(),
            stdout,
            stderr,
            limiter: Limiter {
                memory_bytes: limits.memory_bytes(),
                memory_exceeded: false,
            },
            docs,
            config,
            collections: descriptor
                .collections
                .iter()
                .map(|c| c.name.clone())
                .collect(),
            writes: HashMap::new(),
            output_bytes: 0,
            max_output_bytes: limits.output_bytes(),
            log_lines_left: limits.max_log_lines,
            log_lines_dropped: 0,
            output_exceeded: false,
            state_error: None,
            contract_violation: None,
            panic: None,
            current_event: None,
        }
    }

    pub fn into_output(self) -> BatchOutput {
        BatchOutput {
            writes: self
                .writes
                .into_iter()
                .map(|(collection, docs)| (collection, docs.into_iter().collect()))
                .collect(),
            actions: Vec::new(),
        }
    }

    fn check_collection(&mut self, collection: &str) -> wasmtime::Result<()> {
        if self.collections.contains(collection) {
            return Ok(());
        }
        let message =
            format!("wrote to collection {collection:?}, which its descriptor does not declare");
        self.contract_violation = Some(message.clone());
        Err(wasmtime::Error::msg(message))
    }

    fn emit_log(&mut self, level: log::Level, message: &str) {
        if self.log_lines_left == 0 {
            self.log_lines_dropped += 1;
            return;
        }
        self.log_lines_left -= 1;
        let plugin = &*self.plugin;
        match level {
            log::Level::Trace => tracing::trace!(plugin, "{message}"),
            log::Level::Debug => tracing::debug!(plugin, "{message}"),
            log::Level::Info => tracing::info!(plugin, "{message}"),
            log::Level::Warn => tracing::warn!(plugin, "{message}"),
            log::Level::Error => tracing::error!(plugin, "{message}"),
        }
    }

    /// Sends what the guest printed to the host's log, within the call's line budget.
    pub fn flush_logs(&mut self) {
        let mut dropped_bytes = 0;
        for (output, level) in [
            (self.stdout.clone(), log::Level::Info),
            (self.stderr.clone(), log::Level::Warn),
        ] {
            let (text, dropped) = output.take();
            dropped_bytes += dropped;
            for line in text.lines().filter(|l| !l.is_empty()) {
                self.emit_log(level, line);
            }
        }
        if self.log_lines_dropped > 0 || dropped_bytes > 0 {
            tracing::warn!(
                plugin = &*self.plugin,
                dropped_lines = self.log_lines_dropped,
                dropped_bytes,
                "plugin output over its per-call budget was dropped"
            );
            self.log_lines_dropped = 0;
        }
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl types::Host for HostState {}

impl state::Host for HostState {
    fn get(&mut self, collection: String, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        if let Some(written) = self.writes.get(&collection).and_then(|c| c.get(&key)) {
            return Ok(written.clone());
        }
        match self.docs.get(&collection, &key) {
            Ok(doc) => Ok(doc),
            Err(err) => {
                let message = format!("reading {collection}/{key}: {err}");
                self.state_error = Some(err);
                Err(wasmtime::Error::msg(message))
            }
        }
    }

    fn put(&mut self, collection: String, key: String, document: Vec<u8>) -> wasmtime::Result<()> {
        self.check_collection(&collection)?;
        self.output_bytes = self.output_bytes.saturating_add(document.len() + key.len());
        if self.output_bytes > self.max_output_bytes {
            self.output_exceeded = true;
            return Err(wasmtime::Error::msg("output limit exceeded"));
        }
        self.writes
            .entry(collection)
            .or_default()
            .insert(key, Some(document));
        Ok(())
    }

    fn delete(&mut self, collection: String, key: String) -> wasmtime::Result<()> {
        self.check_collection(&collection)?;
        self.output_bytes = self.output_bytes.saturating_add(key.len());
        self.writes.entry(collection).or_default().insert(key, None);
        Ok(())
    }
}

impl log::Host for HostState {
    fn log(&mut self, level: log::Level, message: String) -> wasmtime::Result<()> {
        self.emit_log(level, &message);
        Ok(())
    }

    fn report_panic(&mut self, event_index: u32, message: String) -> wasmtime::Result<()> {
        self.panic = Some((event_index, message));
        Ok(())
    }

    fn begin_event(&mut self, event_index: u32) -> wasmtime::Result<()> {
        self.current_event = (event_index != u32::MAX).then_some(event_index as usize);
        Ok(())
    }
}

impl config::Host for HostState {
    fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(self.config.get(&key).cloned())
    }

    fn entries(&mut self) -> wasmtime::Result<Vec<(String, String)>> {
        Ok(self
            .config
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}
