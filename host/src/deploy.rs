//! Plugins while the host runs: upload, swap, rebuild beside the live version, cut over,
//! roll back, remove. See DESIGN.md invariant 6.
//!
//! The store's catalog is the truth ([`crate::store::catalog`]): which code each projection
//! version runs, which version serves, which is being built. A change is written there first,
//! in one transaction, then applied here by [`Deployer::sync`]; every other instance applies it
//! the same way when it sees the catalog's revision move (polled every [`SYNC_EVERY`]). So
//! what an instance runs is always what the catalog says, after a restart too.
//!
//! - Same version, new code: a **swap**. The projection's code is replaced; its runner takes
//!   the new code at its next batch, from its checkpoint. Refused if the collections, indexes
//!   or event types differ: that changes the read model's shape, so it is a new version.
//! - New version: a **rebuild** beside the serving one, in its own tables from position 0
//!   (or from its own checkpoint, for a version built before: a rollback). Once its checkpoint
//!   has reached the serving version's, the catalog's one-row compare-and-set makes it serve
//!   ([`Store::cut_over`]); the old version's runner stops and reads waiting on it move to the
//!   new one. With `manual` the cut-over waits for [`Deployer::activate`].

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use axum::http::StatusCode;
use serde::Serialize;
use tokio::sync::watch;

use crate::config::Config;
use crate::registry::{Entry, Registry};
use crate::runner::Projection;
use crate::runtime::{Descriptor, Plugin, Runtime, RuntimeError};
use crate::source::Source;
use crate::store::catalog::{CatalogEntry, CutOver, Placement, StoredPlugin};
use crate::store::{Store, StoreError};
use crate::supervisor::{self, Supervised};

/// How often an instance looks at the catalog's revision (and tries due cut-overs).
pub const SYNC_EVERY: Duration = Duration::from_millis(250);

/// How often `serve --watch` looks at the plugins folder.
const WATCH_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("{0}")]
    Invalid(RuntimeError),
    #[error("the plugin describes itself as {found:?}, but was uploaded as {expected:?}: upload it to /admin/plugins/{found}")]
    NameMismatch { expected: String, found: String },
    #[error("version {version} of {name} is running with other {what}; a change of the read model's shape needs a new version: bump the version to rebuild")]
    ShapeChanged {
        name: String,
        version: String,
        what: String,
    },
    /// An observer uploaded under a projection's name, or the other way round.
    #[error("{name} is a {running}; a plugin of the {uploaded} world cannot replace it: give it a name of its own")]
    WorldChanged {
        name: String,
        running: String,
        uploaded: String,
    },
    #[error("{name} is rebuilding version {version} already: wait for its cut-over, or drop it")]
    Building { name: String, version: String },
    #[error("no projection named {0:?}")]
    UnknownProjection(String),
    #[error("{name} has no version {version:?} in the catalog (versions: {known})")]
    UnknownVersion {
        name: String,
        version: String,
        known: String,
    },
    #[error(
        "version {version} of {name} serves reads: activate another version before dropping it"
    )]
    ActiveVersion { name: String, version: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("compiling the plugin stopped: {0}")]
    Aborted(String),
}

impl DeployError {
    pub fn status(&self) -> StatusCode {
        match self {
            // The engine itself failing is ours, not the upload's.
            Self::Invalid(invalid) if matches!(invalid.fault(), crate::runtime::Fault::Host) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Invalid(_) | Self::NameMismatch { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::ShapeChanged { .. }
            | Self::ActiveVersion { .. }
            | Self::WorldChanged { .. }
            | Self::Building { .. } => StatusCode::CONFLICT,
            Self::UnknownProjection(_) | Self::UnknownVersion { .. } => StatusCode::NOT_FOUND,
            Self::Store(_) | Self::Aborted(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            // Which check failed: not_a_component, wrong_world, unsupported_contract, ...
            Self::Invalid(invalid) => invalid.code(),
            Self::NameMismatch { .. } => "name_mismatch",
            Self::ShapeChanged { .. } => "shape_changed",
            Self::WorldChanged { .. } => "world_changed",
            Self::Building { .. } => "rebuild_running",
            Self::UnknownProjection(_) => "unknown_projection",
            Self::UnknownVersion { .. } => "unknown_version",
            Self::ActiveVersion { .. } => "active_version",
            Self::Store(_) => "store_unavailable",
            Self::Aborted(_) => "unavailable",
        }
    }
}

/// What an upload did.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Deployed {
    pub name: String,
    pub version: String,
    pub sha256: String,
    /// `created` (a new projection), `swapped` (new code for a running version),
    /// `rebuilding` (a new version, built beside the serving one), `unchanged`.
    pub action: &'static str,
    /// The version serving reads now.
    pub active: String,
    /// The version being built, if any.
    pub building: Option<String>,
    /// Whether the building version waits for `activate`.
    pub manual_cutover: bool,
}

/// A plugin loaded on this instance.
#[derive(Clone, Serialize, utoipa::ToSchema)]
pub struct Loaded {
    #[serde(flatten)]
    pub stored: StoredPlugin,
    /// `active` or `building`.
    pub role: &'static str,
    /// When this instance loaded this code, ms since the epoch.
    pub loaded_at: i64,
    #[serde(skip)]
    plugin: Arc<Plugin>,
}

/// Swaps and cut-overs, by projection and outcome (`swapped`, `refused`, `cut_over`), for
/// `/metrics`.
#[derive(Default)]
pub struct DeployMetrics {
    swaps: Mutex<BTreeMap<(String, &'static str), u64>>,
}

impl DeployMetrics {
    fn count(&self, projection: &str, outcome: &'static str) {
        *self
            .swaps
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry((projection.to_owned(), outcome))
            .or_default() += 1;
    }

    /// `((projection, outcome), count)`, sorted.
    pub fn swaps(&self) -> Vec<((String, &'static str), u64)> {
        self.swaps
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }
}

pub struct Deployer {
    store: Arc<dyn Store>,
    source: Arc<dyn Source>,
    runtime: Arc<Runtime>,
    registry: Arc<Registry>,
    config: Arc<Config>,
    shutdown: watch::Receiver<bool>,
    /// The code loaded here, by (name, version).
    loaded: Mutex<HashMap<(String, String), Loaded>>,
    /// The catalog as last applied here: its revision, and which projections cut over by
    /// themselves.
    applied: Mutex<(i64, HashMap<String, bool>)>,
    /// One change at a time on this instance (uploads, syncs, cut-overs).
    changing: tokio::sync::Mutex<()>,
    pub metrics: DeployMetrics,
}

impl Deployer {
    pub fn new(
        store: Arc<dyn Store>,
        source: Arc<dyn Source>,
        runtime: Arc<Runtime>,
        registry: Arc<Registry>,
        config: Arc<Config>,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            source,
            runtime,
            registry,
            config,
            shutdown,
            loaded: Mutex::new(HashMap::new()),
            applied: Mutex::new((-1, HashMap::new())),
            changing: tokio::sync::Mutex::new(()),
            metrics: DeployMetrics::default(),
        })
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Compiles and validates `bytes` off the async threads: a component of the projection
    /// world, whose `describe()` succeeds within the limits.
    async fn compile(&self, origin: String, bytes: Arc<Vec<u8>>) -> Result<Plugin, DeployError> {
        let runtime = self.runtime.clone();
        tokio::task::spawn_blocking(move || runtime.load_bytes(&origin, &bytes))
            .await
            .map_err(|e| DeployError::Aborted(e.to_string()))?
            .map_err(DeployError::Invalid)
    }

    /// Takes a plugin uploaded as `name` (or, with `None`, whatever it names itself): swaps,
    /// rebuilds or creates, as its version says. Nothing changes unless it is valid.
    pub async fn deploy(
        &self,
        name: Option<&str>,
        bytes: Vec<u8>,
        origin: &'static str,
        manual: bool,
    ) -> Result<Deployed, DeployError> {
        let bytes = Arc::new(bytes);
        let label = name.map_or_else(|| origin.to_owned(), |n| format!("upload of {n}"));
        let plugin = self.compile(label, bytes.clone()).await?;
        let descriptor = plugin.descriptor().clone();
        if let Some(expected) = name {
            if descriptor.name != expected {
                return Err(DeployError::NameMismatch {
                    expected: expected.to_owned(),
                    found: descriptor.name,
                });
            }
        }
        let sha256 = plugin.info().sha256.clone();
        let _changing = self.changing.lock().await;
        let entry = self.catalog_entry(&descriptor.name).await?;
        let stored = StoredPlugin {
            name: descriptor.name.clone(),
            version: descriptor.version.clone(),
            sha256: sha256.clone(),
            world: plugin.info().world.clone(),
            contract: plugin.info().contract.clone(),
            descriptor: descriptor.clone(),
            origin: origin.into(),
            uploaded_at: crate::store::now_ms(),
            code_changed_at: None,
        };
        let mut stored = stored;
        // A version rebuilt beside itself is stored as `V~rN`: code of version V goes to it.
        if let Some(entry) = &entry {
            let storage = std::iter::once(entry.active.as_str())
                .chain(entry.building.as_deref())
                .find(|v| base_version(v) == descriptor.version && *v != descriptor.version);
            if let Some(storage) = storage {
                stored.version = storage.to_owned();
                stored.descriptor.version = storage.to_owned();
            }
        }
        let descriptor = stored.descriptor.clone();
        let (placement, action) = match &entry {
            None => (Placement::Active, "created"),
            // Registered by a projector from before the catalog: nothing to build beside.
            Some(entry) if entry.plugin(&entry.active).is_none() => (Placement::Active, "created"),
            Some(entry) => {
                if let Some(active) = entry.plugin(&entry.active) {
                    if active.world != stored.world {
                        return Err(DeployError::WorldChanged {
                            name: descriptor.name.clone(),
                            running: active.world.clone(),
                            uploaded: stored.world.clone(),
                        });
                    }
                }
                let serving = entry.active == descriptor.version;
                let building = entry.building.as_deref() == Some(&descriptor.version);
                let same = entry.plugin(&descriptor.version);
                if (serving || building) && same.is_some_and(|p| p.sha256 == sha256) {
                    return Ok(deployed(entry, &stored, "unchanged"));
                }
                if let (true, Some(same)) = (serving || building, same) {
                    if let Some(what) = shape_change(&same.descriptor, &descriptor) {
                        self.metrics.count(&descriptor.name, "refused");
                        return Err(DeployError::ShapeChanged {
                            name: descriptor.name.clone(),
                            version: descriptor.version.clone(),
                            what,
                        });
                    }
                }
                if let Some(old) = same.filter(|p| p.sha256 != sha256) {
                    // Other code under a version that has run: what it wrote before stays the
                    // old code's work. Said loudly, and kept, so an operator can rebuild.
                    if serving || building {
                        stored.code_changed_at = Some(stored.uploaded_at);
                        tracing::warn!(projection = %descriptor.name, version = %descriptor.version, old_sha256 = %old.sha256, new_sha256 = %sha256, origin, "other code under the same version: documents written before keep what the old code made; POST /admin/projections/{}/rebuild rebuilds them", descriptor.name);
                    }
                } else if let Some(same) = same {
                    stored.code_changed_at = same.code_changed_at;
                }
                if serving {
                    (Placement::Active, "swapped")
                } else if building {
                    (Placement::Keep, "swapped")
                } else {
                    // A version built before with other code starts again from nothing: its
                    // tables hold what the other code made of the events.
                    if let Some(old) = same.filter(|p| p.sha256 != sha256) {
                        self.store.drop_version(&old.descriptor).await?;
                    }
                    (Placement::Build { manual }, "rebuilding")
                }
            }
        };
        self.store.prepare(&descriptor).await?;
        self.store.save_plugin(&stored, &bytes, placement).await?;
        // Compiled already: the sync below finds it by its hash instead of compiling again.
        self.keep_loaded(stored.clone(), Arc::new(plugin));
        tracing::info!(projection = %stored.name, version = %stored.version, sha256 = %stored.sha256, action, origin, "plugin deployed");
        self.sync_locked(true).await?;
        let entry = self.catalog_entry(&stored.name).await?;
        Ok(match entry {
            Some(entry) => deployed(&entry, &stored, action),
            None => Deployed {
                name: stored.name,
                version: stored.version.clone(),
                sha256,
                action,
                active: stored.version,
                building: None,
                manual_cutover: false,
            },
        })
    }

    async fn catalog_entry(&self, name: &str) -> Result<Option<CatalogEntry>, StoreError> {
        Ok(self
            .store
            .catalog()
            .await?
            .into_iter()
            .find(|e| e.name == name))
    }

    /// Rebuilds the serving version beside itself, from position 0 with its current code, and
    /// cuts over once caught up: after a fix shipped under the same version, the documents the
    /// old code wrote are made again. Stored as `V~rN` (N counting rebuilds of V).
    pub async fn rebuild(&self, name: &str) -> Result<Deployed, DeployError> {
        let _changing = self.changing.lock().await;
        let entry = self
            .catalog_entry(name)
            .await?
            .ok_or_else(|| DeployError::UnknownProjection(name.to_owned()))?;
        if let Some(building) = &entry.building {
            return Err(DeployError::Building {
                name: name.to_owned(),
                version: building.clone(),
            });
        }
        let active = entry
            .plugin(&entry.active)
            .cloned()
            .ok_or_else(|| unknown_version(&entry, &entry.active))?;
        let (_, bytes) = self
            .store
            .plugin_code(name, &entry.active)
            .await?
            .ok_or_else(|| unknown_version(&entry, &entry.active))?;
        let base = base_version(&entry.active).to_owned();
        let next = entry
            .plugins
            .iter()
            .filter_map(|p| p.version.strip_prefix(&format!("{base}~r")))
            .filter_map(|n| n.parse::<u32>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let mut stored = active.clone();
        stored.version = format!("{base}~r{next}");
        stored.descriptor.version = stored.version.clone();
        stored.origin = "rebuild".into();
        stored.uploaded_at = crate::store::now_ms();
        stored.code_changed_at = None;
        self.store.prepare(&stored.descriptor).await?;
        self.store
            .save_plugin(&stored, &bytes, Placement::Build { manual: false })
            .await?;
        tracing::info!(projection = %name, version = %entry.active, rebuild = %stored.version, "rebuilding the serving version beside itself");
        self.sync_locked(true).await?;
        let entry = self
            .catalog_entry(name)
            .await?
            .ok_or_else(|| DeployError::UnknownProjection(name.to_owned()))?;
        Ok(deployed(&entry, &stored, "rebuilding"))
    }

    /// Makes `version` serve: at once if it is the one building and has caught up, else once
    /// it has (an older version catches up from its own checkpoint first: a rollback).
    pub async fn activate(&self, name: &str, version: &str) -> Result<Deployed, DeployError> {
        let entry = {
            let _changing = self.changing.lock().await;
            let entry = self
                .catalog_entry(name)
                .await?
                .ok_or_else(|| DeployError::UnknownProjection(name.to_owned()))?;
            let stored = entry
                .plugin(version)
                .cloned()
                .ok_or_else(|| unknown_version(&entry, version))?;
            if entry.active != version {
                self.store.build_version(name, version, false).await?;
                self.sync_locked(true).await?;
            }
            let _ = stored;
            entry
        };
        if entry.active != version {
            self.cut_over_due().await;
        }
        let entry = self
            .catalog_entry(name)
            .await?
            .ok_or_else(|| DeployError::UnknownProjection(name.to_owned()))?;
        let stored = entry
            .plugin(version)
            .cloned()
            .ok_or_else(|| unknown_version(&entry, version))?;
        let action = if entry.active == version {
            "active"
        } else {
            "building"
        };
        Ok(deployed(&entry, &stored, action))
    }

    /// Drops an inactive version's tables and code (a building one stops first).
    pub async fn drop_version(&self, name: &str, version: &str) -> Result<(), DeployError> {
        let _changing = self.changing.lock().await;
        let entry = self
            .catalog_entry(name)
            .await?
            .ok_or_else(|| DeployError::UnknownProjection(name.to_owned()))?;
        if entry.active == version {
            return Err(DeployError::ActiveVersion {
                name: name.to_owned(),
                version: version.to_owned(),
            });
        }
        let stored = entry
            .plugin(version)
            .cloned()
            .ok_or_else(|| unknown_version(&entry, version))?;
        if let Some(local) = self.registry.entry(name) {
            if let Some(building) = local
                .building
                .filter(|b| b.projection.descriptor().version == version)
            {
                self.registry.set(
                    name,
                    Entry {
                        active: local.active,
                        building: None,
                    },
                );
                building.stop().await;
            }
        }
        self.store.drop_version(&stored.descriptor).await?;
        self.sync_locked(true).await?;
        Ok(())
    }

    /// Removes a projection: its runners stop, every version's tables go.
    pub async fn remove(&self, name: &str) -> Result<(), DeployError> {
        let _changing = self.changing.lock().await;
        let entry = self
            .catalog_entry(name)
            .await?
            .ok_or_else(|| DeployError::UnknownProjection(name.to_owned()))?;
        if let Some(local) = self.registry.remove(name) {
            self.retire(local).await;
        }
        for plugin in &entry.plugins {
            self.store.drop_version(&plugin.descriptor).await?;
        }
        self.store.drop_projection(name).await?;
        self.sync_locked(true).await?;
        Ok(())
    }

    /// What this instance runs: each projection's serving and building versions.
    pub fn loaded(&self) -> Vec<Loaded> {
        let mut loaded: Vec<Loaded> = self
            .loaded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter_map(|plugin| {
                let role = self.role(&plugin.stored.name, &plugin.stored.version)?;
                Some(Loaded {
                    role,
                    ..plugin.clone()
                })
            })
            .collect();
        loaded.sort_by(|a, b| {
            (&a.stored.name, &a.stored.version).cmp(&(&b.stored.name, &b.stored.version))
        });
        loaded
    }

    /// `active` or `building`, if this instance runs that version.
    fn role(&self, name: &str, version: &str) -> Option<&'static str> {
        let entry = self.registry.entry(name)?;
        if entry.active.projection.descriptor().version == version {
            Some("active")
        } else if entry
            .building
            .is_some_and(|b| b.projection.descriptor().version == version)
        {
            Some("building")
        } else {
            None
        }
    }

    /// Whether `name`'s building version waits for an operator's `activate`.
    pub fn manual_cutover(&self, name: &str) -> bool {
        self.applied
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .1
            .get(name)
            .copied()
            .unwrap_or(false)
    }

    fn keep_loaded(&self, stored: StoredPlugin, plugin: Arc<Plugin>) {
        self.loaded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                (stored.name.clone(), stored.version.clone()),
                Loaded {
                    stored,
                    role: "active",
                    loaded_at: crate::store::now_ms(),
                    plugin,
                },
            );
    }

    /// The plugin for a catalog entry's version: the one loaded here if its code is the
    /// catalog's, else read from the catalog and compiled (the compile cache makes a repeat
    /// cheap).
    async fn load(&self, stored: &StoredPlugin) -> Result<Arc<Plugin>, String> {
        let key = (stored.name.clone(), stored.version.clone());
        if let Some(loaded) = self
            .loaded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            .filter(|l| l.stored.sha256 == stored.sha256)
        {
            return Ok(loaded.plugin.clone());
        }
        let (sha256, bytes) = self
            .store
            .plugin_code(&stored.name, &stored.version)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "its code is no longer in the catalog".to_owned())?;
        let origin = format!("{} {} from the catalog", stored.name, stored.version);
        let plugin = self
            .compile(origin, Arc::new(bytes))
            .await
            .map_err(|e| e.to_string())?;
        let mut stored = stored.clone();
        stored.sha256 = sha256;
        let plugin = Arc::new(plugin);
        self.keep_loaded(stored, plugin.clone());
        Ok(plugin)
    }

    /// Applies the catalog if its revision moved since the last time (or always, `force`).
    pub async fn sync(&self, force: bool) -> Result<(), StoreError> {
        let _changing = self.changing.lock().await;
        self.sync_locked(force).await
    }

    async fn sync_locked(&self, force: bool) -> Result<(), StoreError> {
        let revision = self.store.catalog_revision().await?;
        let last = self
            .applied
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0;
        if revision == last && !force {
            return Ok(());
        }
        let catalog = self.store.catalog().await?;
        let mut manual = HashMap::new();
        for entry in &catalog {
            manual.insert(entry.name.clone(), entry.manual_cutover);
            if let Err(error) = self.apply(entry).await {
                tracing::error!(projection = %entry.name, %error, "cannot apply the catalog's plugins for this projection; it keeps what it ran");
            }
        }
        for name in self.registry.names() {
            if !catalog.iter().any(|e| e.name == name) {
                if let Some(local) = self.registry.remove(&name) {
                    tracing::info!(projection = %name, "removed from the catalog: stopping it");
                    self.retire(local).await;
                }
                self.loaded
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .retain(|(n, _), _| *n != name);
            }
        }
        // Code no version runs any more (replaced, cut over from, dropped) is let go.
        self.loaded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|(name, version), _| self.role(name, version).is_some());
        *self.applied.lock().unwrap_or_else(PoisonError::into_inner) = (revision, manual);
        Ok(())
    }

    /// Makes this instance run what the catalog says for one projection.
    async fn apply(&self, entry: &CatalogEntry) -> Result<(), String> {
        let name = &entry.name;
        let active_plugin = entry.plugin(&entry.active).ok_or_else(|| {
            format!(
                "the catalog has no code for its active version {}",
                entry.active
            )
        })?;
        let active_code = self.load(active_plugin).await?;
        let local = self.registry.entry(name);
        let mut next = match local.clone() {
            None => {
                let supervised = self
                    .start(active_code, &active_plugin.descriptor, false)
                    .await?;
                tracing::info!(projection = %name, version = %entry.active, "projection started");
                Entry {
                    active: supervised,
                    building: None,
                }
            }
            Some(local) if local.active.projection.descriptor().version == entry.active => {
                self.swap_if_new(&local.active, active_code);
                local
            }
            Some(local) => {
                // Cut over (here or by another instance): the building version serves now.
                let promoted = match local.building.clone() {
                    Some(b) if b.projection.descriptor().version == entry.active => {
                        self.swap_if_new(&b, active_code);
                        b
                    }
                    _ => {
                        self.start(active_code, &active_plugin.descriptor, false)
                            .await?
                    }
                };
                promoted.projection.set_building(false);
                if let Err(err) = self
                    .store
                    .set_status(name, crate::store::ProjectionStatus::Running, None)
                    .await
                {
                    tracing::warn!(projection = %name, error = %err, "could not record the cut-over's status");
                }
                self.metrics.count(name, "cut_over");
                tracing::info!(projection = %name, from = %local.active.projection.descriptor().version, to = %entry.active, checkpoint = promoted.projection.checkpoint(), "cut over: the new version serves");
                let old = Entry {
                    active: local.active.clone(),
                    building: local.building.filter(|b| !Arc::ptr_eq(b, &promoted)),
                };
                let next = Entry {
                    active: promoted,
                    building: None,
                };
                self.registry.set(name, next.clone());
                self.retire(old).await;
                next
            }
        };
        // The version being built.
        let want = entry.building.as_deref();
        let have = next
            .building
            .as_ref()
            .map(|b| b.projection.descriptor().version.clone());
        if have.as_deref() != want {
            if let Some(old) = next.building.take() {
                tracing::info!(projection = %name, version = %old.projection.descriptor().version, "rebuild stopped");
                old.stop().await;
            }
            if let Some(version) = want {
                let stored = entry
                    .plugin(version)
                    .ok_or_else(|| format!("the catalog has no code for version {version}"))?;
                let code = self.load(stored).await?;
                let supervised = self.start(code, &stored.descriptor, true).await?;
                tracing::info!(projection = %name, version, from = supervised.projection.checkpoint(), "rebuilding beside the active version");
                next.building = Some(supervised);
            }
        } else if let (Some(building), Some(version)) = (&next.building, want) {
            if let Some(stored) = entry.plugin(version) {
                let code = self.load(stored).await?;
                self.swap_if_new(building, code);
            }
        }
        if let Some(building) = &next.building {
            building.projection.deliver_through(&next.active.projection);
        }
        self.registry.set(name, next);
        Ok(())
    }

    fn swap_if_new(&self, supervised: &Supervised, code: Arc<Plugin>) {
        let projection = &supervised.projection;
        let (running, _) = projection.plugin();
        // The same `Arc` when nothing changed.
        let same = std::ptr::eq(
            Arc::as_ptr(&running) as *const u8,
            Arc::as_ptr(&code) as *const u8,
        );
        if !same {
            projection.swap_plugin(code);
            self.metrics.count(projection.name(), "swapped");
            tracing::info!(projection = %projection.name(), version = %projection.descriptor().version, checkpoint = projection.checkpoint(), "plugin swapped: the next batch runs the new code");
        }
    }

    /// How `observer`'s actions are delivered (its `[observers.<name>]` settings).
    pub fn delivery_for(&self, observer: &str) -> crate::config::DeliveryConfig {
        self.config.delivery_for(observer)
    }

    /// Starts a supervisor for a version; `building` beside the serving one. `stored` is the
    /// version as the catalog keeps it: the plugin's own, or `V~rN` for V rebuilt beside itself.
    async fn start(
        &self,
        code: Arc<Plugin>,
        stored: &crate::runtime::Descriptor,
        building: bool,
    ) -> Result<Arc<Supervised>, String> {
        let checkpoint = self
            .store
            .prepare(stored)
            .await
            .map_err(|e| e.to_string())?;
        let observer = code.is_observer();
        let projection = Arc::new(Projection::stored_as(code, stored.clone(), checkpoint));
        projection.set_building(building);
        let name = projection.name().to_owned();
        Ok(supervisor::spawn(
            projection,
            self.store.clone(),
            self.source.clone(),
            self.config.runner_for(&name),
            observer.then(|| self.config.delivery_for(&name)),
            self.shutdown.clone(),
        ))
    }

    /// Versions that no longer serve: reads waiting on them move on, their runners stop.
    async fn retire(&self, entry: Entry) {
        let versions: Vec<Arc<Supervised>> = std::iter::once(entry.active)
            .chain(entry.building)
            .collect();
        for supervised in &versions {
            supervised.projection.retire();
        }
        for supervised in versions {
            supervised.stop().await;
        }
    }

    /// Cuts over every projection whose building version has caught up with the serving one
    /// (unless it waits for an operator).
    pub async fn cut_over_due(&self) {
        for (name, entry) in self.registry.entries() {
            let Some(building) = entry.building else {
                continue;
            };
            if self.manual_cutover(&name) {
                continue;
            }
            let (from, to) = (
                entry.active.projection.descriptor().version.clone(),
                building.projection.descriptor().version.clone(),
            );
            if building.projection.checkpoint() < entry.active.projection.checkpoint() {
                continue;
            }
            match self.store.cut_over(&name, &from, &to).await {
                Ok(CutOver::Done) => {
                    if let Err(err) = self.sync(true).await {
                        tracing::warn!(projection = %name, error = %err, "cut over in the catalog; applying it here on the next sync");
                    }
                }
                Ok(CutOver::Behind) => {}
                Ok(CutOver::Changed) => {
                    let _ = self.sync(true).await;
                }
                Err(err) => {
                    tracing::warn!(projection = %name, error = %err, "cannot cut over yet");
                }
            }
        }
    }

    /// Follows the catalog and cuts over due rebuilds until shutdown.
    pub async fn run(self: Arc<Self>) {
        let mut shutdown = self.shutdown.clone();
        let mut every = tokio::time::interval(SYNC_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                changed = shutdown.changed() => if changed.is_err() || *shutdown.borrow() { return },
            }
            if let Err(err) = self.sync(false).await {
                tracing::debug!(error = %err, "cannot read the plugin catalog; retrying");
                continue;
            }
            self.cut_over_due().await;
        }
    }

    /// The plugins folder at start: each file is deployed like an upload, except that a
    /// projection whose serving code was uploaded keeps it (an upload wins over the folder,
    /// until the projection is removed or the file changes under `serve --watch`).
    pub async fn seed(&self, files: Vec<PathBuf>) -> Result<(), DeployError> {
        let catalog = self.store.catalog().await?;
        for path in files {
            let bytes = match std::fs::read(&path) {
                Ok(bytes) => bytes,
                Err(source) => {
                    return Err(DeployError::Invalid(RuntimeError::Read { path, source }))
                }
            };
            let plugin = self
                .compile(path.display().to_string(), Arc::new(bytes.clone()))
                .await?;
            let name = plugin.descriptor().name.clone();
            let uploaded = catalog.iter().find(|e| e.name == name).and_then(|e| {
                e.plugin(&e.active)
                    .filter(|p| p.origin == "upload")
                    .map(|p| p.version.clone())
            });
            if let Some(version) = uploaded {
                tracing::info!(projection = %name, version = %version, file = %path.display(), "an uploaded plugin serves this projection: the folder's file is not applied");
                continue;
            }
            self.deploy(None, bytes, "folder", false).await?;
        }
        Ok(())
    }

    /// `serve --watch`: deploys a plugin file of `dir` when it changes, until shutdown.
    pub async fn watch(self: Arc<Self>, dir: PathBuf) {
        let mut seen = stamps(&dir);
        let mut shutdown = self.shutdown.clone();
        let mut every = tokio::time::interval(WATCH_EVERY);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                changed = shutdown.changed() => if changed.is_err() || *shutdown.borrow() { return },
            }
            let now = stamps(&dir);
            for (path, stamp) in &now {
                if seen.get(path) == Some(stamp) {
                    continue;
                }
                let Ok(bytes) = std::fs::read(path) else {
                    continue;
                };
                match self.deploy(None, bytes, "folder", false).await {
                    Ok(done) => {
                        tracing::info!(file = %path.display(), projection = %done.name, version = %done.version, action = done.action, "plugin file changed: deployed")
                    }
                    Err(error) => {
                        tracing::warn!(file = %path.display(), %error, "plugin file changed but cannot be deployed; the running version stays")
                    }
                }
            }
            seen = now;
        }
    }
}

/// Each `*.wasm` of `dir` with its modification time and length.
fn stamps(dir: &Path) -> HashMap<PathBuf, (SystemTime, u64)> {
    let mut stamps = HashMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return stamps;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "wasm") {
            continue;
        }
        if let Ok(meta) = entry.metadata() {
            if let Ok(modified) = meta.modified() {
                stamps.insert(path, (modified, meta.len()));
            }
        }
    }
    stamps
}

fn deployed(entry: &CatalogEntry, stored: &StoredPlugin, action: &'static str) -> Deployed {
    Deployed {
        name: stored.name.clone(),
        version: stored.version.clone(),
        sha256: stored.sha256.clone(),
        action,
        active: entry.active.clone(),
        building: entry.building.clone(),
        manual_cutover: entry.manual_cutover,
    }
}

/// The plugin's own version of a stored one: `V` of `V~rN` (V rebuilt beside itself).
pub fn base_version(stored: &str) -> &str {
    stored.split_once("~r").map_or(stored, |(base, _)| base)
}

fn unknown_version(entry: &CatalogEntry, version: &str) -> DeployError {
    DeployError::UnknownVersion {
        name: entry.name.clone(),
        version: version.to_owned(),
        known: entry
            .plugins
            .iter()
            .map(|p| p.version.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// What differs in the read model's shape between two descriptors of one version, if
/// anything: the collections, their indexed fields, the event types taken.
pub fn shape_change(running: &Descriptor, new: &Descriptor) -> Option<String> {
    let collections = |d: &Descriptor| {
        let mut c: Vec<(String, Vec<String>)> = d
            .collections
            .iter()
            .map(|c| {
                (
                    c.name.clone(),
                    c.fields().into_iter().map(str::to_owned).collect(),
                )
            })
            .collect();
        c.sort();
        c
    };
    let event_types = |d: &Descriptor| {
        let mut t = d.event_types.clone();
        t.sort();
        t.dedup();
        t
    };
    if collections(running) != collections(new) {
        return Some("collections or indexed fields".into());
    }
    if event_types(running) != event_types(new) {
        return Some("event types".into());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::CollectionSpec;

    fn descriptor(collections: &[(&str, &[&str])], event_types: &[&str]) -> Descriptor {
        Descriptor {
            name: "p".into(),
            version: "1".into(),
            event_types: event_types.iter().map(|t| t.to_string()).collect(),
            collections: collections
                .iter()
                .map(|(name, indexes)| CollectionSpec {
                    name: name.to_string(),
                    indexes: indexes.iter().map(|i| i.to_string()).collect(),
                })
                .collect(),
        }
    }

    #[test]
    fn a_swap_may_reorder_but_not_change_the_read_models_shape() {
        let running = descriptor(&[("a", &["x", "y"]), ("b", &[])], &["E1", "E2"]);
        let reordered = descriptor(&[("b", &[]), ("a", &["y", "x", "x"])], &["E2", "E1"]);
        assert_eq!(shape_change(&running, &reordered), None);
        let more_collections =
            descriptor(&[("a", &["x", "y"]), ("b", &[]), ("c", &[])], &["E1", "E2"]);
        assert_eq!(
            shape_change(&running, &more_collections).as_deref(),
            Some("collections or indexed fields")
        );
        let other_index = descriptor(&[("a", &["x"]), ("b", &[])], &["E1", "E2"]);
        assert_eq!(
            shape_change(&running, &other_index).as_deref(),
            Some("collections or indexed fields")
        );
        let other_events = descriptor(&[("a", &["x", "y"]), ("b", &[])], &["E1"]);
        assert_eq!(
            shape_change(&running, &other_events).as_deref(),
            Some("event types")
        );
    }
}
