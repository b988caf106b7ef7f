//! Host bindings for the `projector:plugin@0.1.2` worlds.
//!
//! Plugins built against `projector:plugin@0.1.0` need no module of their own: wasmtime's
//! `Linker` resolves an import of `projector:plugin/log@0.1.0` to the definition of
//! `log@0.1.2` (semver-compatible names; the functions later versions added are simply not imported), as
//! `tests/all/contract.rs` proves with a 0.1.0 build of `account-balance`. A breaking contract
//! version (0.2.0) gets its own module beside this one, so plugins built against this one keep
//! loading.

pub mod projection {
    wasmtime::component::bindgen!({
        world: "projection",
        path: "../wit",
        imports: { default: trappable },
    });
}

/// The observer world shares the projection's types and imports: one set of host functions
/// serves both worlds from one linker.
pub mod observer {
    wasmtime::component::bindgen!({
        world: "observer",
        path: "../wit",
        imports: { default: trappable },
        with: {
            "projector:plugin/types": super::projection::projector::plugin::types,
            "projector:plugin/log": super::projection::projector::plugin::log,
            "projector:plugin/config": super::projection::projector::plugin::config,
        },
    });
}

/// The `projector:plugin` versions a plugin may be built against, oldest first; the last is
/// the one bound above (`wit/plugin.wit`), the others link to it semver-compatibly. A newer
/// patch (0.1.3) would link too, but the host cannot know what it added, so it is refused by
/// name rather than left to fail on a missing function.
pub const SUPPORTED_CONTRACTS: &[&str] = &["0.1.0", "0.1.1", "0.1.2"];

#[cfg(test)]
mod tests {
    #[test]
    fn the_newest_supported_contract_is_the_one_bound() {
        let wit = include_str!("../../../wit/plugin.wit");
        let newest = super::SUPPORTED_CONTRACTS
            .last()
            .copied()
            .unwrap_or_default();
        assert!(
            wit.lines()
                .any(|line| line == format!("package projector:plugin@{newest};")),
            "wit/plugin.wit is not projector:plugin@{newest}: update SUPPORTED_CONTRACTS"
        );
    }
}
