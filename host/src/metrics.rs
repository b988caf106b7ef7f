//! Counters of one projection, updated by its runner, and the source's watermark, kept by its
//! watcher; rendered by `GET /metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

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
    /// From the last batch on the old code (or the swap, if later) to the first batch on the
    /// new code, for each same-version swap.
    pub swap_pause: Histogram,
    /// The last swap's pause, in microseconds (a gauge; 0 before the first).
    pub last_swap_pause_micros: AtomicU64,
    /// Each batch's plugin call.
    pub batch_duration: Histogram,
    /// Each batch's commit (documents and checkpoint in one transaction).
    pub commit_duration: Histogram,
}

/// The HTTP side: each request's duration by route and status, and how long reads waited for
/// read-your-writes. One per server, in the app state.
#[derive(Debug, Default)]
pub struct HttpMetrics {
    /// Reads that named a position or a version: from arrival until the projection reached it.
    pub read_wait: Histogram,
    /// (route template, status) → durations.
    requests:
        std::sync::Mutex<std::collections::BTreeMap<(String, u16), std::sync::Arc<Histogram>>>,
}

impl HttpMetrics {
    pub fn observe_request(&self, route: &str, status: u16, took: Duration) {
        let histogram = {
            let mut requests = self
                .requests
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            requests
                .entry((route.to_owned(), status))
                .or_default()
                .clone()
        };
        histogram.observe(took);
    }

    pub fn requests(&self) -> Vec<((String, u16), std::sync::Arc<Histogram>)> {
        self.requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// What the process uses, from `/proc/self` (Linux; elsewhere nothing is reported).
pub struct ProcessMetrics {
    pub resident_bytes: Option<u64>,
    pub cpu_seconds: Option<f64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub start_time_seconds: Option<f64>,
}

impl ProcessMetrics {
    pub fn read() -> Self {
        let page = 4096u64;
        // Clock ticks per second: 100 on every Linux this runs on (sysconf(_SC_CLK_TCK)).
        let ticks = 100.0;
        let statm = std::fs::read_to_string("/proc/self/statm").ok();
        let resident_bytes = statm
            .as_deref()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|pages| pages * page);
        // Fields after the command's closing parenthesis: state is field 3, utime 14, stime
        // 15, starttime 22 (1-based, as proc(5) numbers them).
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        let fields: Vec<&str> = stat
            .as_deref()
            .and_then(|s| s.rsplit_once(')'))
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
        let cpu_seconds = match (field(14), field(15)) {
            (Some(user), Some(system)) => Some((user + system) / ticks),
            _ => None,
        };
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        });
        let start_time_seconds = match (boot, field(22)) {
            (Some(boot), Some(start)) => Some(boot + start / ticks),
            _ => None,
        };
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as u64);
        let max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Max open files"))
                    .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
            });
        Self {
            resident_bytes,
            cpu_seconds,
            open_fds,
            max_fds,
            start_time_seconds,
        }
    }
}

/// How an observer's actions fare, by kind (webhook, emit, log) and outcome.
#[derive(Debug)]
pub struct DeliveryMetrics {
    /// kind × outcome, counted.
    outcomes: [[AtomicU64; 3]; 3],
    /// Attempts made.
    pub attempts: AtomicU64,
    /// How long each attempt took.
    pub duration: Histogram,
    /// Loaded and waiting (a gauge).
    pub queued: AtomicU64,
    /// Attempts in flight now (a gauge).
    pub in_flight: AtomicU64,
    /// Streams waiting behind a dead action (a gauge).
    pub blocked: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryOutcome {
    Delivered,
    /// An attempt failed and another is scheduled.
    Retried,
    Dead,
}

pub const ACTION_KINDS: [&str; 3] = ["webhook", "emit", "log"];
pub const DELIVERY_OUTCOMES: [DeliveryOutcome; 3] = [
    DeliveryOutcome::Delivered,
    DeliveryOutcome::Retried,
    DeliveryOutcome::Dead,
];

impl DeliveryOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Retried => "retried",
            Self::Dead => "dead",
        }
    }
}

impl Default for DeliveryMetrics {
    fn default() -> Self {
        Self {
            outcomes: Default::default(),
            attempts: AtomicU64::new(0),
            duration: Histogram::new(DURATION_BOUNDS),
            queued: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            blocked: AtomicU64::new(0),
        }
    }
}

/// Bounds for attempt durations: 1 ms to 30 s.
const DURATION_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl DeliveryMetrics {
    pub fn count(&self, kind: &str, outcome: DeliveryOutcome) {
        let k = ACTION_KINDS.iter().position(|k| *k == kind).unwrap_or(0);
        let o = DELIVERY_OUTCOMES
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or(0);
        self.outcomes[k][o].fetch_add(1, Ordering::Relaxed);
    }

    pub fn counted(&self, kind: usize, outcome: usize) -> u64 {
        self.outcomes[kind][outcome].load(Ordering::Relaxed)
    }
}

/// A Prometheus histogram: cumulative bucket counts, their sum, in seconds.
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds in seconds, ascending; `+Inf` is the count.
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_micros: AtomicU64,
}

/// Bounds for pauses: 1 ms to 10 s.
const PAUSE_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

impl Default for Histogram {
    fn default() -> Self {
        Self::new(PAUSE_BOUNDS)
    }
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: Duration) {
        let seconds = value.as_secs_f64();
        for (bound, bucket) in self.bounds.iter().zip(&self.buckets) {
            if seconds <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(value.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The sample lines of `name` with `labels` (`key="value"` pairs, comma-separated).
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        use std::fmt::Write;
        let sep = if labels.is_empty() { "" } else { "," };
        for (bound, bucket) in self.bounds.iter().zip(&self.buckets) {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {}",
                bucket.load(Ordering::Relaxed)
            );
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {sum:.6}");
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }
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

/// The source's watermark while it is held: committed events wait behind an open transaction
/// that could still write below them. Kept by the PostgreSQL outbox's watcher, read by
/// `/metrics`, `GET /projections` and `/readyz`.
#[derive(Debug)]
pub struct Watermark {
    hold: std::sync::Mutex<Option<WatermarkHold>>,
    /// How long a hold lasts before it is reported as stale reads.
    pub warn_after: Duration,
}

#[derive(Debug, Clone)]
pub struct WatermarkHold {
    /// Since when the watermark has not moved while committed rows waited.
    pub since: Instant,
    /// The newest position readers may read.
    pub safe_position: u64,
    /// The newest committed position.
    pub committed_position: u64,
    /// The oldest open transaction that can still write the outbox (none when the hold is a
    /// commit in flight the watcher has not seen end yet).
    pub holder: Option<WatermarkHolder>,
}

/// An open transaction holding the watermark.
#[derive(Debug, Clone, PartialEq)]
pub struct WatermarkHolder {
    /// Its 64-bit transaction id (`pg_current_xact_id()` in that transaction).
    pub xid: u64,
    /// Its server process (`pg_stat_activity.pid`); none for a prepared transaction.
    pub pid: Option<i32>,
    /// The global id of a prepared transaction (`COMMIT PREPARED` or `ROLLBACK PREPARED` it).
    pub prepared_gid: Option<String>,
    pub database: Option<String>,
    pub application_name: Option<String>,
    /// When it began: its `xact_start` when visible, else when projector first saw it.
    pub started: Instant,
    /// Its session belongs to another role and projector's role may not see its details
    /// (start, state, query): grant it `pg_read_all_stats`.
    pub details_hidden: bool,
}

impl Watermark {
    pub fn new(warn_after: Duration) -> Self {
        Self {
            hold: std::sync::Mutex::new(None),
            warn_after,
        }
    }

    pub fn set(&self, hold: Option<WatermarkHold>) {
        // A panic elsewhere while holding this lock leaves a value that is still whole.
        *self.hold.lock().unwrap_or_else(|e| e.into_inner()) = hold;
    }

    /// Whether committed rows wait behind an open transaction.
    pub fn is_held(&self) -> bool {
        self.hold
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    pub fn hold(&self) -> Option<WatermarkHold> {
        self.hold.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Seconds the watermark has been held (0: not held).
    pub fn held_seconds(&self) -> f64 {
        self.hold().map_or(0.0, |h| h.since.elapsed().as_secs_f64())
    }
}

impl WatermarkHold {
    /// Held past the threshold: reads are stale.
    pub fn is_stale(&self, warn_after: Duration) -> bool {
        self.since.elapsed() >= warn_after
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "held": true,
            "held_seconds": round_ms(self.since.elapsed()),
            "safe_position": self.safe_position,
            "committed_position": self.committed_position,
            "holder": self.holder.as_ref().map(WatermarkHolder::to_json),
        })
    }
}

impl WatermarkHolder {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "xid": self.xid,
            "pid": self.pid,
            "prepared_gid": self.prepared_gid,
            "database": self.database,
            "application_name": self.application_name,
            "age_seconds": round_ms(self.started.elapsed()),
            "details_hidden": self.details_hidden,
        })
    }
}

fn round_ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}
