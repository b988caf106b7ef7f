//! Counters of one projection, updated by its runner and rendered by `GET /metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Debug, Default)]
pub struct ProjectionMetrics {
    /// Batches committed.
    pub batches: AtomicU64,
    /// Events handed to the plugin (after filtering by event type).
    pub events: AtomicU64,
    /// Documents written or deleted.
    pub documents: AtomicU64,
    /// Time inside the plugin, in microseconds.
    pub plugin_micros: AtomicU64,
    /// Time committing batches, in microseconds.
    pub commit_micros: AtomicU64,
    /// Time reading batches from the source, in microseconds.
    pub read_micros: AtomicU64,
    /// Reads or commits retried after a database error.
    pub retries: AtomicU64,
    /// Events set aside as dead letters (malformed, or parked behind one) since start.
    pub dead_letters: AtomicU64,
}

impl ProjectionMetrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn add_time(counter: &AtomicU64, elapsed: Duration) {
        counter.fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
