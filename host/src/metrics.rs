//! Counters of one projection, updated by its runner and rendered by `GET /metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::store::{DeadLetter, LetterKind};

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
    /// Malformed outbox rows set aside since start.
    pub dead_letters_malformed: AtomicU64,
    /// Events the plugin failed on, set aside since start.
    pub dead_letters_plugin: AtomicU64,
    /// Extra plugin calls spent finding the event a failed batch failed on.
    pub isolation_calls: AtomicU64,
    /// Streams parked behind an open dead letter (a gauge).
    pub parked_streams: AtomicU64,
    /// Events waiting in parked streams (a gauge).
    pub parked_events: AtomicU64,
}

impl ProjectionMetrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn add_time(counter: &AtomicU64, elapsed: Duration) {
        counter.fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn set(gauge: &AtomicU64, value: u64) {
        gauge.store(value, Ordering::Relaxed);
    }

    /// Counts what a committed batch set aside, by why.
    pub fn count_dead_letters(&self, letters: &[DeadLetter]) {
        for letter in letters {
            let counter = match letter.kind {
                LetterKind::Malformed => &self.dead_letters_malformed,
                LetterKind::Plugin => &self.dead_letters_plugin,
                LetterKind::Parked => &self.parked_events,
            };
            Self::add(counter, 1);
        }
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
