//! The sandboxed WebAssembly runtime: compiles plugins once (with an on-disk cache), and runs
//! one `handle` call per batch in a fresh store with a memory cap, a deadline and an output cap.
//! Instances come from a fixed pool whose slots keep their zeroed memory mapped between calls.

mod bindings;
mod cache;
mod check;
mod descriptor;
mod host;
mod inspect;
mod sandbox;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap};

use crate::event::Event;
use bindings::observer::ObserverPre;
use bindings::projection::projector::plugin::types as wit;
use bindings::projection::{Projection, ProjectionPre};
pub use bindings::SUPPORTED_CONTRACTS;
pub use descriptor::{CollectionSpec, Descriptor};
use host::HostState;
pub use host::{BatchOutput, DocumentReader, MemoryDocuments};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Per-call limits. Every plugin call gets all of them; none can be switched off.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Linear memory a plugin instance may grow to.
    pub memory_mb: usize,
    /// Wall time one call (`describe` or one batch's `handle`) may take.
    pub deadline_ms: u64,
    /// Bytes of documents one batch may write.
    pub max_output_mb: usize,
    /// Log lines (the `log` import plus stdout/stderr lines) kept per call; the rest are
    /// counted and reported as one line.
    pub max_log_lines: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_mb: 128,
            deadline_ms: 5_000,
            max_output_mb: 64,
            max_log_lines: 100,
        }
    }
}

impl Limits {
    fn memory_bytes(&self) -> usize {
        self.memory_mb.saturating_mul(1 << 20)
    }
    fn output_bytes(&self) -> usize {
        self.max_output_mb.saturating_mul(1 << 20)
    }
}

/// A failure of a plugin call or of loading a plugin.
///
/// Loading refuses bytes for one reason each, in the order it finds them: not a component
/// ([`RuntimeError::NotAComponent`]), one the engine cannot compile
/// ([`RuntimeError::InvalidComponent`]), another contract version
/// ([`RuntimeError::UnsupportedContract`]), another world ([`RuntimeError::WrongWorld`]), an
/// import the host lacks ([`RuntimeError::UnsupportedImport`]), a failing `describe`
/// ([`RuntimeError::DescribeFailed`]), a descriptor the host refuses
/// ([`RuntimeError::InvalidDescriptor`]). [`RuntimeError::code`] names each for an API.
///
/// When the host cuts a call short (deadline, memory cap, output cap, a trap, a broken
/// contract), `at` is the event the call was on: the index in the batch the guest last gave to
/// `log.begin-event` (contract 0.1.1), `None` for a plugin on 0.1.0 (which never calls it),
/// before the first event and after the last. `event` then says where that event sits (id,
/// position, stream@version), for the message; it is empty when `at` is `None`.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot read plugin {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not a component: not WebAssembly at all, or a core module.
    #[error(
        "{origin} is not a WebAssembly component: {reason}; build the plugin with \
         `cargo build --release --target wasm32-wasip2` and use the .wasm file it writes"
    )]
    NotAComponent { origin: String, reason: String },
    /// A component the engine cannot compile: malformed, using a feature the engine does not
    /// enable, or with more memories, tables or instances than a plugin may have.
    #[error(
        "{origin} is not a valid projector plugin: {reason}; it may be truncated or use a \
         WebAssembly feature the host does not enable: rebuild it for wasm32-wasip2"
    )]
    InvalidComponent { origin: String, reason: String },
    /// A component that is neither a projection nor an observer; `exports` is what it exports.
    #[error(
        "{origin} is not a projector plugin: {reason}, where a projection exports `describe` \
         and `handle` and an observer `describe` and `on-events`; build it against a world of \
         projector:plugin (the SDK's `export_projection!` or `export_observer!` does)"
    )]
    WrongWorld {
        origin: String,
        exports: Vec<String>,
        reason: String,
    },
    /// A component built against a version of the contract the host does not bind: `found`,
    /// from the name of `interface`.
    #[error(
        "{origin} is built against projector:plugin@{found} (it names {interface}), a \
         contract version this host does not support; it supports {}: rebuild the plugin \
         against one of them",
        .supported.join(" and ")
    )]
    UnsupportedContract {
        origin: String,
        found: String,
        interface: String,
        supported: &'static [&'static str],
    },
    /// A component of the right world and contract that imports something else the host does
    /// not provide (an interface of its own, `wasi:http`), or a contract interface of another
    /// type.
    #[error(
        "{origin} imports what the host does not provide: {reason}; a projection may import \
         projector:plugin's `state` and `log` and WASI 0.2, nothing else"
    )]
    UnsupportedImport { origin: String, reason: String },
    /// `describe()` trapped, panicked or ran into a limit.
    #[error(
        "{origin}: describe() failed, so the host cannot tell which projection it is: \
         {reason}; describe() must return the descriptor without panicking, trapping or \
         reaching a limit"
    )]
    DescribeFailed { origin: String, reason: String },
    /// `describe()` returned a descriptor that [`Descriptor::validate`] refuses.
    #[error(
        "{origin} describes itself with a descriptor the host refuses: {reason}; fix what \
         describe() returns"
    )]
    InvalidDescriptor { origin: String, reason: String },
    #[error("plugin {plugin} trapped{}: {message}", on_event(.at, .event))]
    Trap {
        plugin: String,
        message: String,
        at: Option<usize>,
        event: String,
    },
    #[error("plugin {plugin} exceeded its deadline of {deadline_ms} ms{}", on_event(.at, .event))]
    DeadlineExceeded {
        plugin: String,
        deadline_ms: u64,
        at: Option<usize>,
        event: String,
    },
    #[error("plugin {plugin} exceeded its memory limit of {limit_mb} MiB{}", on_event(.at, .event))]
    MemoryLimit {
        plugin: String,
        limit_mb: usize,
        at: Option<usize>,
        event: String,
    },
    #[error(
        "plugin {plugin} wrote more than {limit_mb} MiB of documents in one batch{}",
        on_event(.at, .event)
    )]
    OutputLimit {
        plugin: String,
        limit_mb: usize,
        at: Option<usize>,
        event: String,
    },
    #[error("plugin {plugin} broke the contract{}: {message}", on_event(.at, .event))]
    Contract {
        plugin: String,
        message: String,
        at: Option<usize>,
        event: String,
    },
    /// The guest named the failure: an error it returned, or a panic it reported. `index` is
    /// [`WHOLE_BATCH`] when it blamed the batch as a whole, no single event.
    #[error("plugin {plugin} failed {}: {message}", guest_failed_on(*.index, .at))]
    Guest {
        plugin: String,
        index: usize,
        event_id: String,
        /// Where the event sits: its id, position, stream and version.
        at: String,
        message: String,
    },
    /// The batch's documents include one no store can keep; which event wrote it is unknown.
    #[error("plugin {plugin} wrote {message}")]
    Output { plugin: String, message: String },
    #[error("plugin {plugin}: reading a document failed: {source}")]
    State { plugin: String, source: BoxError },
    #[error("wasm engine: {0}")]
    Engine(String),
}

/// The event index a guest gives for a failure of the batch as a whole (`u32::MAX`, as the
/// contract spells it): in a `handle-error`, a panic report or `log.begin-event`.
pub const WHOLE_BATCH: usize = u32::MAX as usize;

/// Whose fault a failed call is, decided once where the failure is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Deterministic, the plugin's or the event's: running the same events again fails
    /// again, so isolate the event. `at` is the event (index in the batch) when known;
    /// `named` says the guest itself named it (an error it returned, a panic), while `false`
    /// means the host only knows where the call was when it cut it short (deadline, memory,
    /// output cap, trap, broken contract): a limit can be reached by many events together, so
    /// confirm such an event by running it alone.
    Plugin { at: Option<usize>, named: bool },
    /// Not the event's fault (reading a document failed, the engine, reading the plugin's
    /// file): try again.
    Host,
}

impl RuntimeError {
    /// The index in the batch of the event that failed, when the plugin told us (an error it
    /// returned or a panic); `None` when it blamed the batch as a whole.
    pub fn event_index(&self) -> Option<usize> {
        match self {
            Self::Guest { index, .. } if *index != WHOLE_BATCH => Some(*index),
            _ => None,
        }
    }

    /// Whose fault the failure is, and which event it points at.
    pub fn fault(&self) -> Fault {
        match self {
            Self::Guest { .. } => Fault::Plugin {
                at: self.event_index(),
                named: true,
            },
            Self::Trap { at, .. }
            | Self::DeadlineExceeded { at, .. }
            | Self::MemoryLimit { at, .. }
            | Self::OutputLimit { at, .. }
            | Self::Contract { at, .. } => Fault::Plugin {
                at: *at,
                named: false,
            },
            Self::NotAComponent { .. }
            | Self::InvalidComponent { .. }
            | Self::WrongWorld { .. }
            | Self::UnsupportedContract { .. }
            | Self::UnsupportedImport { .. }
            | Self::DescribeFailed { .. }
            | Self::InvalidDescriptor { .. }
            | Self::Output { .. } => Fault::Plugin {
                at: None,
                named: false,
            },
            Self::Read { .. } | Self::State { .. } | Self::Engine(_) => Fault::Host,
        }
    }

    /// A stable snake_case name of the failure, for an API's error body: an upload refused at
    /// load gets `not_a_component`, `invalid_component`, `wrong_world`,
    /// `unsupported_contract`, `unsupported_import`, `describe_failed` or
    /// `invalid_descriptor`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Read { .. } => "unreadable",
            Self::NotAComponent { .. } => "not_a_component",
            Self::InvalidComponent { .. } => "invalid_component",
            Self::WrongWorld { .. } => "wrong_world",
            Self::UnsupportedContract { .. } => "unsupported_contract",
            Self::UnsupportedImport { .. } => "unsupported_import",
            Self::DescribeFailed { .. } => "describe_failed",
            Self::InvalidDescriptor { .. } => "invalid_descriptor",
            Self::Trap { .. } => "trap",
            Self::DeadlineExceeded { .. } => "deadline_exceeded",
            Self::MemoryLimit { .. } => "memory_limit",
            Self::OutputLimit { .. } => "output_limit",
            Self::Contract { .. } => "contract_violation",
            Self::Guest { .. } => "guest_error",
            Self::Output { .. } => "invalid_output",
            Self::State { .. } => "state_read_failed",
            Self::Engine(_) => "engine",
        }
    }
}

/// " on event #i of the batch (where it sits)", or nothing when the event is not known.
fn on_event(at: &Option<usize>, event: &str) -> String {
    match at {
        Some(index) => format!(" on event #{index} of the batch ({event})"),
        None => String::new(),
    }
}

fn guest_failed_on(index: usize, at: &str) -> String {
    if index == WHOLE_BATCH {
        "on the batch as a whole".to_owned()
    } else {
        format!("on event #{index} of the batch ({at})")
    }
}

#[derive(Debug, Clone, Default)]
pub struct RuntimeConfig {
    pub limits: Limits,
    /// Where compiled plugins are cached; `None` compiles on every load.
    pub cache_dir: Option<PathBuf>,
    /// Each plugin's `[plugins.<name>]` settings, by plugin name, for its `config` import.
    pub plugin_settings:
        std::collections::BTreeMap<String, Arc<std::collections::BTreeMap<String, String>>>,
}

/// Plugin calls that may run at once, each in an instance slot of the engine's pool; a call
/// beyond them waits for a slot (see [`Slots`]) instead of failing.
const INSTANCE_SLOTS: u32 = 32;

/// Guest memory a slot keeps mapped (zeroed, not returned to the kernel) between calls: a
/// fresh instance per batch then starts without a page fault for every page the last batch
/// touched (~1,400 faults per 5,000-event batch of `account-balance`, ~8 % of a catch-up).
const KEEP_RESIDENT: usize = 16 << 20;

/// How often the deadline clock ticks: the deadline's precision.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// The engine and everything shared by all plugins.
pub struct Runtime {
    engine: Engine,
    slots: Arc<Slots>,
    linker: Linker<HostState>,
    config: RuntimeConfig,
    ticker: Arc<Ticker>,
}

/// Keeps the deadline ticker running while anything that runs plugin calls (the runtime, any
/// plugin it loaded) is alive: a plugin that outlives its runtime still gets its deadlines.
struct Ticker {
    stop: Arc<AtomicBool>,
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Runtime {
    pub fn new(config: RuntimeConfig) -> Result<Self, RuntimeError> {
        let mut wasm = Config::new();
        wasm.wasm_component_model(true)
            .epoch_interruption(true)
            .cranelift_opt_level(wasmtime::OptLevel::Speed);
        let mut pool = PoolingAllocationConfig::default();
        // Per-component maxima times the slots: a plugin beyond them is refused at load, and
        // a loaded one can never exhaust a total while it holds a slot.
        pool.total_component_instances(INSTANCE_SLOTS)
            .max_memories_per_component(2)
            .total_memories(2 * INSTANCE_SLOTS)
            .max_core_instances_per_component(20)
            .total_core_instances(20 * INSTANCE_SLOTS)
            .max_tables_per_component(20)
            .total_tables(20 * INSTANCE_SLOTS)
            .table_elements(sandbox::MAX_TABLE_ELEMENTS)
            .max_memory_size(config.limits.memory_bytes())
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(64 << 10)
            // Reuse the slots already warm before touching a cold one: the memory kept
            // resident is then bounded by the calls that ran at once, not by the pool's size.
            .max_unused_warm_slots(0);
        wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&wasm).map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        // The projection world's imports are a superset of the observer's: one linker serves
        // both.
        Projection::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)
            .map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        let ticker_stop = Arc::new(AtomicBool::new(false));
        // Without the ticker no call would ever reach its deadline: refuse to run at all.
        spawn_epoch_ticker(&engine, ticker_stop.clone()).map_err(|err| {
            RuntimeError::Engine(format!(
                "cannot start the deadline ticker thread ({err}): plugin calls would run \
                 without a deadline"
            ))
        })?;
        Ok(Self {
            engine,
            slots: Arc::new(Slots::new(INSTANCE_SLOTS as usize)),
            linker,
            config,
            ticker: Arc::new(Ticker { stop: ticker_stop }),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.config.limits
    }

    pub fn load_file(&self, path: &Path) -> Result<Plugin, RuntimeError> {
        let bytes = std::fs::read(path).map_err(|source| RuntimeError::Read {
            path: path.to_owned(),
            source,
        })?;
        self.load_bytes(&path.display().to_string(), &bytes)
    }

    /// Compiles (or loads from the cache), links, and asks the plugin to describe itself.
    /// Bytes that are no loadable projection are refused with the reason
    /// ([`RuntimeError::code`]), checked from the cheapest up: the header, the component's
    /// type (contract version, world), the link, then `describe()`.
    pub fn load_bytes(&self, origin: &str, bytes: &[u8]) -> Result<Plugin, RuntimeError> {
        inspect::check_header(origin, bytes)?;
        let sha256 = format!("{:x}", Sha256::digest(bytes));
        let (component, from_cache) = cache::load(
            &self.engine,
            self.config.cache_dir.as_deref(),
            origin,
            bytes,
            &sha256,
        )?;
        // The version first: another contract's world may well look like another world.
        let contract = inspect::contract(&self.engine, origin, &component)?;
        let exports = inspect::exports(&self.engine, &component);
        let world = inspect::check_world(origin, &exports)?;
        let instance_pre = self.linker.instantiate_pre(&component).map_err(|err| {
            RuntimeError::UnsupportedImport {
                origin: origin.to_owned(),
                reason: format!("{err:#}"),
            }
        })?;
        // The names are the world's; their types may still be another's.
        let wrong_types = |err: wasmtime::Error| RuntimeError::WrongWorld {
            origin: origin.to_owned(),
            reason: format!(
                "{}, but not with the {world}'s types ({err:#})",
                inspect::exports_reason(None, &exports)
            ),
            exports: exports.clone(),
        };
        let pre = if world == inspect::OBSERVER {
            Pre::Observer(ObserverPre::new(instance_pre).map_err(wrong_types)?)
        } else {
            Pre::Projection(ProjectionPre::new(instance_pre).map_err(wrong_types)?)
        };
        // Exports of the projection's types come from its `types` interface: a component
        // that names no interface of the contract was not built against it.
        let Some(contract) = contract else {
            return Err(RuntimeError::WrongWorld {
                origin: origin.to_owned(),
                reason: format!(
                    "{}, but names no interface of projector:plugin",
                    inspect::exports_reason(None, &exports)
                ),
                exports,
            });
        };
        let mut plugin = Plugin {
            name: origin.to_owned(),
            pre,
            engine: self.engine.clone(),
            slots: self.slots.clone(),
            _ticker: self.ticker.clone(),
            limits: self.config.limits.clone(),
            descriptor: Descriptor::default(),
            from_cache,
            settings: Arc::default(),
            info: PluginInfo {
                world: world.to_owned(),
                contract: contract.to_owned(),
                sha256,
            },
        };
        let raw = plugin.describe().map_err(|err| match err.fault() {
            // The engine's trouble (no instance to be had), not the plugin's: try again.
            Fault::Host => err,
            Fault::Plugin { .. } => RuntimeError::DescribeFailed {
                origin: origin.to_owned(),
                reason: describe_failure(&err),
            },
        })?;
        plugin.descriptor =
            Descriptor::validate(raw, world == inspect::OBSERVER).map_err(|reason| {
                RuntimeError::InvalidDescriptor {
                    origin: origin.to_owned(),
                    reason,
                }
            })?;
        plugin.name = plugin.descriptor.name.clone();
        plugin.settings = self
            .config
            .plugin_settings
            .get(&plugin.name)
            .cloned()
            .unwrap_or_default();
        Ok(plugin)
    }
}

/// Why `describe()` failed, without the batch and event wording of a `handle` failure: a
/// describe call has no events.
fn describe_failure(err: &RuntimeError) -> String {
    match err {
        RuntimeError::Guest { message, .. } => message.clone(),
        RuntimeError::Trap { message, .. } => format!("it trapped: {message}"),
        RuntimeError::DeadlineExceeded { deadline_ms, .. } => {
            format!("it ran past the deadline of {deadline_ms} ms")
        }
        RuntimeError::MemoryLimit { limit_mb, .. } => {
            format!("it grew its memory past the limit of {limit_mb} MiB")
        }
        RuntimeError::OutputLimit { limit_mb, .. } => {
            format!("it wrote more than {limit_mb} MiB of documents")
        }
        RuntimeError::Contract { message, .. } => format!("it broke the contract: {message}"),
        other => other.to_string(),
    }
}

/// What a loaded plugin is, beyond its descriptor: for an API to show, and to tell two uploads
/// apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginInfo {
    /// The world the component exports: `projection` or `observer`.
    pub world: String,
    /// The `projector:plugin` version the component was built against, one of
    /// [`SUPPORTED_CONTRACTS`] (e.g. `0.1.1`).
    pub contract: String,
    /// The SHA-256 of the component's bytes, lowercase hex.
    pub sha256: String,
}

/// Counts the engine pool's free instance slots, so a call waits for one rather than failing
/// to instantiate when every slot is taken.
struct Slots {
    free: Mutex<usize>,
    freed: Condvar,
}

struct Slot<'a>(&'a Slots);

impl Slots {
    fn new(count: usize) -> Self {
        Self {
            free: Mutex::new(count),
            freed: Condvar::new(),
        }
    }

    fn acquire(&self) -> Slot<'_> {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        while *free == 0 {
            free = self
                .freed
                .wait(free)
                .unwrap_or_else(PoisonError::into_inner);
        }
        *free -= 1;
        Slot(self)
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        self.0.freed.notify_one();
    }
}

/// Advances the engine's epoch: a store whose deadline (in ticks) passes traps at its next
/// loop back-edge or function entry. Far cheaper than fuel, and enough for a wall-time limit.
/// Fails when the thread cannot be started.
fn spawn_epoch_ticker(engine: &Engine, stop: Arc<AtomicBool>) -> std::io::Result<()> {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("projector-epoch".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(EPOCH_TICK);
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => break,
                }
            }
        })
        .map(drop)
}

/// What a runner drives: something that describes itself and turns a batch of events into
/// document writes. The WASM [`Plugin`] is the product's; the benchmark puts the same logic
/// compiled natively behind it to measure what the sandbox costs.
pub trait BatchHandler: Send + Sync {
    fn descriptor(&self) -> &Descriptor;
    /// Takes the batch by value: the events move into the call instead of being copied. On
    /// failure they come back, so the caller can run them again (isolating a bad event)
    /// without having kept a copy of every batch.
    fn handle(
        &self,
        events: Vec<Event>,
        docs: Arc<dyn DocumentReader>,
    ) -> Result<BatchOutput, Failed>;
    /// Whether its batches decide actions (an observer) rather than write documents.
    fn is_observer(&self) -> bool {
        false
    }
}

/// A failed batch call: why, and the batch's events, given back.
#[derive(Debug)]
pub struct Failed {
    pub error: Box<RuntimeError>,
    pub events: Vec<Event>,
}

impl BatchHandler for Plugin {
    fn descriptor(&self) -> &Descriptor {
        &self.descriptor
    }
    fn handle(
        &self,
        events: Vec<Event>,
        docs: Arc<dyn DocumentReader>,
    ) -> Result<BatchOutput, Failed> {
        self.handle_batch(events, docs)
    }
    fn is_observer(&self) -> bool {
        Plugin::is_observer(self)
    }
}

/// A component's world, linked and ready to instantiate.
enum Pre {
    Projection(ProjectionPre<HostState>),
    Observer(ObserverPre<HostState>),
}

/// A loaded plugin (a projection or an observer), ready to run batches. Cheap to share across
/// threads.
pub struct Plugin {
    name: String,
    pre: Pre,
    /// Its `[plugins.<name>]` settings (the `config` import).
    settings: Arc<std::collections::BTreeMap<String, String>>,
    engine: Engine,
    slots: Arc<Slots>,
    /// Held so the deadline clock keeps ticking for as long as this plugin can be called.
    _ticker: Arc<Ticker>,
    limits: Limits,
    descriptor: Descriptor,
    from_cache: bool,
    info: PluginInfo,
}

impl Plugin {
    /// Whether the compiled code came from the on-disk cache rather than a compile.
    pub fn loaded_from_cache(&self) -> bool {
        self.from_cache
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn descriptor(&self) -> &Descriptor {
        &self.descriptor
    }

    /// The component's world, contract version and digest.
    pub fn info(&self) -> &PluginInfo {
        &self.info
    }

    /// Whether it is an observer (its batches decide actions) rather than a projection.
    pub fn is_observer(&self) -> bool {
        matches!(self.pre, Pre::Observer(_))
    }

    fn store(&self, events: &[Event], docs: Arc<dyn DocumentReader>) -> Store<HostState> {
        let state = HostState::new(
            &self.name,
            &self.limits,
            &self.descriptor,
            events,
            docs,
            self.settings.clone(),
        );
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limiter);
        let ticks = self
            .limits
            .deadline_ms
            .div_ceil(EPOCH_TICK.as_millis() as u64);
        store.set_epoch_deadline(ticks.max(1));
        store.epoch_deadline_trap();
        store
    }

    fn describe(&self) -> Result<wit::Descriptor, RuntimeError> {
        // Declared before the store: dropped after it, when its instance is back in the pool.
        let _slot = self.slots.acquire();
        let mut store = self.store(&[], Arc::new(MemoryDocuments::default()));
        let result = match &self.pre {
            Pre::Projection(pre) => pre
                .instantiate(&mut store)
                .map(|instance| instance.call_describe(&mut store)),
            Pre::Observer(pre) => pre
                .instantiate(&mut store)
                .map(|instance| instance.call_describe(&mut store)),
        };
        let result = match result {
            Ok(result) => result,
            Err(err) => {
                store.data_mut().flush_logs();
                return Err(self.classify(&mut store, err, &[], Stage::Instantiate));
            }
        };
        store.data_mut().flush_logs();
        result.map_err(|err| self.classify(&mut store, err, &[], Stage::Call))
    }

    /// Runs one batch: a fresh instance, one `handle` call. The documents the plugin wrote are
    /// returned, sorted by collection and key; nothing is written anywhere on failure.
    pub fn handle(
        &self,
        events: Vec<Event>,
        docs: Arc<dyn DocumentReader>,
    ) -> Result<BatchOutput, RuntimeError> {
        self.handle_batch(events, docs)
            .map_err(|failed| *failed.error)
    }

    /// [`Plugin::handle`], giving the events back on failure. Documents no store can keep
    /// (not JSON, a NUL, half a surrogate pair, nested too deep) fail the call too: the
    /// plugin's bug, found before a table sees it.
    pub fn handle_batch(
        &self,
        events: Vec<Event>,
        docs: Arc<dyn DocumentReader>,
    ) -> Result<BatchOutput, Failed> {
        // Declared before the store: dropped after it, when its instance is back in the pool.
        let _slot = self.slots.acquire();
        let mut store = self.store(&events, docs);
        let wit_events: Vec<wit::Event> = events.into_iter().map(to_wit).collect();
        let instantiated = match &self.pre {
            Pre::Projection(pre) => pre.instantiate(&mut store).map(|instance| {
                instance
                    .call_handle(&mut store, &wit_events)
                    .map(|r| r.map(|()| None))
            }),
            Pre::Observer(pre) => pre.instantiate(&mut store).map(|instance| {
                instance
                    .call_on_events(&mut store, &wit_events)
                    .map(|r| r.map(Some))
            }),
        };
        let result = match instantiated {
            Ok(result) => result,
            Err(err) => {
                store.data_mut().flush_logs();
                let error = self.classify(&mut store, err, &wit_events, Stage::Instantiate);
                return Err(give_back(error, wit_events));
            }
        };
        store.data_mut().flush_logs();
        let error = match result {
            Ok(Ok(Some(actions))) => match self.decided(&wit_events, actions) {
                Ok(actions) => {
                    return Ok(BatchOutput {
                        actions,
                        ..BatchOutput::default()
                    })
                }
                Err(error) => error,
            },
            Ok(Ok(None)) => {
                let output = store.into_data().into_output();
                match check::check_documents(&output) {
                    Ok(()) => return Ok(output),
                    Err(message) => RuntimeError::Output {
                        plugin: self.name.clone(),
                        message,
                    },
                }
            }
            Ok(Err(err)) => self.guest_error(&wit_events, err.event_index, err.message),
            Err(err) => self.classify(&mut store, err, &wit_events, Stage::Call),
        };
        Err(give_back(error, wit_events))
    }

    /// An observer's actions, keyed: each gets its index among its event's actions. An action
    /// naming no event of the batch breaks the contract; so does more output than the limit.
    fn decided(
        &self,
        events: &[wit::Event],
        actions: Vec<wit::Action>,
    ) -> Result<Vec<crate::observer::Decided>, RuntimeError> {
        let mut per_event = vec![0u32; events.len()];
        let mut bytes = 0usize;
        let mut decided = Vec::with_capacity(actions.len());
        for action in actions {
            let index = action.event_index as usize;
            let (Some(event), Some(count)) = (events.get(index), per_event.get_mut(index)) else {
                return Err(RuntimeError::Contract {
                    plugin: self.name.clone(),
                    message: format!(
                        "returned an action for event #{index}, which a batch of {} events does \
                         not have",
                        events.len()
                    ),
                    at: None,
                    event: String::new(),
                });
            };
            let kind = match action.kind {
                wit::ActionKind::Webhook(w) => crate::observer::ActionKind::Webhook {
                    method: w.method,
                    url: w.url,
                    headers: w.headers,
                    body: w.body,
                },
                wit::ActionKind::Emit(e) => crate::observer::ActionKind::Emit {
                    stream: e.stream,
                    stream_type: e.stream_type,
                    event_type: e.event_type,
                    payload: e.payload,
                },
                wit::ActionKind::Log(message) => crate::observer::ActionKind::Log { message },
            };
            bytes = bytes.saturating_add(kind.body().len() + kind.spec().len());
            if bytes > self.limits.output_bytes() {
                return Err(RuntimeError::OutputLimit {
                    plugin: self.name.clone(),
                    limit_mb: self.limits.max_output_mb,
                    at: Some(index),
                    event: locate(events, index).1,
                });
            }
            decided.push(crate::observer::Decided {
                event_id: event.id.clone(),
                index: *count,
                stream: event.stream.clone(),
                position: event.position,
                kind,
            });
            *count += 1;
        }
        // Delivered per stream in event order: the log keeps them in that order.
        decided.sort_by_key(|d| d.position);
        Ok(decided)
    }

    /// A failure the guest named: an error it returned or a panic it reported. An index past
    /// the batch (u32::MAX says so on purpose) names no event: the batch as a whole failed.
    fn guest_error(&self, events: &[wit::Event], index: u32, message: String) -> RuntimeError {
        let index = index as usize;
        if index >= events.len() {
            let message = if index == WHOLE_BATCH {
                message
            } else {
                format!(
                    "{message} (the plugin named event #{index}, which a batch of {} events \
                     does not have)",
                    events.len()
                )
            };
            return RuntimeError::Guest {
                plugin: self.name.clone(),
                index: WHOLE_BATCH,
                event_id: String::new(),
                at: String::new(),
                message,
            };
        }
        let (event_id, at) = locate(events, index);
        RuntimeError::Guest {
            plugin: self.name.clone(),
            index,
            event_id,
            at,
            message,
        }
    }

    /// Names the real cause of a failed call: the host's own records first (they know why an
    /// import refused or a grow failed), then the trap code; and the event the call was on.
    fn classify(
        &self,
        store: &mut Store<HostState>,
        err: wasmtime::Error,
        events: &[wit::Event],
        stage: Stage,
    ) -> RuntimeError {
        let plugin = self.name.clone();
        let state = store.data_mut();
        let at = state.current_event.filter(|&i| i < events.len());
        let event = at.map(|i| locate(events, i).1).unwrap_or_default();
        if state.output_exceeded {
            return RuntimeError::OutputLimit {
                plugin,
                limit_mb: self.limits.max_output_mb,
                at,
                event,
            };
        }
        if let Some(source) = state.state_error.take() {
            return RuntimeError::State { plugin, source };
        }
        if let Some(message) = state.contract_violation.take() {
            return RuntimeError::Contract {
                plugin,
                message,
                at,
                event,
            };
        }
        if state.limiter.memory_exceeded {
            return RuntimeError::MemoryLimit {
                plugin,
                limit_mb: self.limits.memory_mb,
                at,
                event,
            };
        }
        if let Some((index, message)) = state.panic.take() {
            return self.guest_error(events, index, format!("panicked: {message}"));
        }
        match err.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => RuntimeError::DeadlineExceeded {
                plugin,
                deadline_ms: self.limits.deadline_ms,
                at,
                event,
            },
            // Instantiating failed without the guest running into anything: the engine's
            // resources (the pool's memory, say), not the plugin.
            None if stage == Stage::Instantiate => {
                RuntimeError::Engine(format!("instantiating plugin {plugin}: {err:#}"))
            }
            _ => RuntimeError::Trap {
                plugin,
                message: format!("{err:#}"),
                at,
                event,
            },
        }
    }
}

/// Where a call failed: making the instance, or in the call itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Instantiate,
    Call,
}

/// The id of the batch's event `index`, and a description of where it sits.
fn locate(events: &[wit::Event], index: usize) -> (String, String) {
    match events.get(index) {
        Some(e) => (
            e.id.clone(),
            format!(
                "id {}, position {}, {}@{}",
                e.id, e.position, e.stream, e.version
            ),
        ),
        None => (String::new(), "no such event in the batch".into()),
    }
}

/// A failure with the batch's events, turned back from what the guest was given.
fn give_back(error: RuntimeError, events: Vec<wit::Event>) -> Failed {
    Failed {
        error: Box::new(error),
        events: events.into_iter().map(from_wit).collect(),
    }
}

fn from_wit(event: wit::Event) -> Event {
    // The payload came from a `RawValue`: it is JSON, and UTF-8.
    let payload = String::from_utf8(event.payload)
        .ok()
        .and_then(|text| serde_json::value::RawValue::from_string(text).ok())
        .unwrap_or_else(|| {
            serde_json::value::RawValue::from_string("null".into())
                .unwrap_or_else(|_| unreachable!("null is JSON"))
        });
    Event {
        id: event.id,
        stream: event.stream,
        stream_type: event.stream_type,
        event_type: event.event_type,
        version: event.version,
        position: event.position,
        timestamp_ms: event.timestamp_ms,
        payload,
        headers: event.headers,
    }
}

fn to_wit(event: Event) -> wit::Event {
    wit::Event {
        id: event.id,
        stream: event.stream,
        stream_type: event.stream_type,
        event_type: event.event_type,
        version: event.version,
        position: event.position,
        timestamp_ms: event.timestamp_ms,
        payload: Box::<str>::from(event.payload).into_string().into_bytes(),
        headers: event.headers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest(index: usize) -> RuntimeError {
        RuntimeError::Guest {
            plugin: "p".into(),
            index,
            event_id: "e".into(),
            at: "id e, position 3, s@1".into(),
            message: "no".into(),
        }
    }

    #[test]
    fn a_guest_failure_names_its_event_or_the_whole_batch() {
        let err = guest(2);
        assert_eq!(err.event_index(), Some(2));
        assert_eq!(
            err.fault(),
            Fault::Plugin {
                at: Some(2),
                named: true
            }
        );
        assert_eq!(
            err.to_string(),
            "plugin p failed on event #2 of the batch (id e, position 3, s@1): no"
        );
        let err = guest(WHOLE_BATCH);
        assert_eq!(err.event_index(), None);
        assert_eq!(
            err.fault(),
            Fault::Plugin {
                at: None,
                named: true
            }
        );
        assert_eq!(
            err.to_string(),
            "plugin p failed on the batch as a whole: no"
        );
    }

    #[test]
    fn a_call_cut_short_names_its_event_when_known() {
        let cut = |at: Option<usize>| RuntimeError::DeadlineExceeded {
            plugin: "p".into(),
            deadline_ms: 5,
            at,
            event: at
                .map(|_| "id e, position 3, s@1".into())
                .unwrap_or_default(),
        };
        assert_eq!(
            cut(Some(4)).to_string(),
            "plugin p exceeded its deadline of 5 ms on event #4 of the batch (id e, position 3, s@1)"
        );
        assert_eq!(
            cut(Some(4)).fault(),
            Fault::Plugin {
                at: Some(4),
                named: false
            }
        );
        assert_eq!(
            cut(None).to_string(),
            "plugin p exceeded its deadline of 5 ms"
        );
        assert_eq!(
            cut(None).fault(),
            Fault::Plugin {
                at: None,
                named: false
            }
        );
        assert_eq!(RuntimeError::Engine("x".into()).fault(), Fault::Host);
        let state = RuntimeError::State {
            plugin: "p".into(),
            source: "away".into(),
        };
        assert_eq!(state.fault(), Fault::Host);
    }
}
