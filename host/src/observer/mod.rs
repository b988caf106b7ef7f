//! Observers: plugins that react to events with side effects, as data. The runner logs what an
//! observer decided in the same transaction as its checkpoint; the [`dispatch`]er delivers the
//! log: per stream in order, retried with backoff, dead-lettered at the end.

pub mod action;

pub use action::{ActionKind, ActionState, Counts, Decided, Logged, Update};
pub mod dispatch;
pub mod schedule;
pub mod webhook;

pub use dispatch::Dispatcher;
