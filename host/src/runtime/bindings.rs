//! Host bindings for the `projector:plugin@0.1.1` worlds.
//!
//! Plugins built against `projector:plugin@0.1.0` need no module of their own: wasmtime's
//! `Linker` resolves an import of `projector:plugin/log@0.1.0` to the definition of
//! `log@0.1.1` (semver-compatible names; the functions 0.1.1 added are simply not imported), as
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
