//! projector: event-sourcing projections and observers as sandboxed WebAssembly components.

pub mod event;
pub mod replay;
pub mod runtime;
pub mod source;
pub mod store;
pub mod config;
pub mod consistency;
pub mod runner;
pub mod api;
pub mod serve;
