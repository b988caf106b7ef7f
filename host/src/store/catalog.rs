//! The catalog of plugins a store keeps: the code of every projection version, which version
//! serves reads and which is being built beside it. Every instance on the database loads the
//! same set from it, and follows its changes (see [`crate::deploy`]).

use serde::Serialize;

use crate::runtime::Descriptor;

/// One projection version's plugin as the catalog keeps it (its code is read apart, by
/// [`crate::store::Store::plugin_code`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct StoredPlugin {
    pub name: String,
    pub version: String,
    /// Of the component's bytes, hex.
    pub sha256: String,
    /// The WIT world it implements (`projection`).
    pub world: String,
    /// The `projector:plugin` contract version it was built against.
    pub contract: String,
    pub descriptor: Descriptor,
    /// `upload` (the admin API) or `folder` (the plugins folder, or `serve --watch`).
    pub origin: String,
    /// When this code was stored, ms since the epoch.
    pub uploaded_at: i64,
    /// When other code last replaced this version's under the same version (a swap): what
    /// that version wrote before is the old code's work until it is rebuilt.
    pub code_changed_at: Option<i64>,
}

/// A projection as the catalog has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CatalogEntry {
    pub name: String,
    /// The version that serves reads.
    pub active: String,
    /// The version being rebuilt beside it, if any.
    pub building: Option<String>,
    /// Whether the building version waits for `activate` instead of cutting over by itself.
    pub manual_cutover: bool,
    /// Every version with code in the catalog, active and building included.
    pub plugins: Vec<StoredPlugin>,
}

impl CatalogEntry {
    pub fn plugin(&self, version: &str) -> Option<&StoredPlugin> {
        self.plugins.iter().find(|p| p.version == version)
    }
}

/// What storing a plugin does to its projection, in the same transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// It serves: a new projection, or new code for the active version (a swap).
    Active,
    /// It is built beside the active version; `manual`: cut over only when told.
    Build { manual: bool },
    /// New code for the version being built: the projection's versions stay as they are.
    Keep,
}

/// How a cut-over attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutOver {
    /// Done: the building version serves now.
    Done,
    /// The building version is behind the active one's checkpoint: not yet.
    Behind,
    /// The catalog no longer has that version building over that active one (another
    /// instance cut over, or an operator changed the plan).
    Changed,
}
