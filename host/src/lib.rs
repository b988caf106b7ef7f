//! projector: event-sourcing projections and observers as sandboxed WebAssembly components.

pub mod api;
pub mod author;
pub mod backpressure;
pub mod config;
pub mod consistency;
pub mod control;
pub mod data_lock;
pub mod deploy;
pub mod event;
pub mod metrics;
pub mod observer;
pub mod registry;
pub mod replay;
pub mod runner;
pub mod runtime;
pub mod serve;
pub mod source;
pub mod store;
pub mod supervisor;
