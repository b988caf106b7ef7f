//! projector: event-sourcing projections and observers as sandboxed WebAssembly components.

pub mod event;
pub mod replay;
pub mod runtime;
