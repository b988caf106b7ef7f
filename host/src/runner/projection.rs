//! A projection as the rest of the host sees it: its plugin, progress, health and lag. The
//! runner moves it on; readers, the API and the supervisor look at it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use serde::Serialize;
use tokio::sync::watch;

use super::cache::DocumentCache;
use crate::consistency::{Committed, Progress};
use crate::event::Event;
use crate::metrics::ProjectionMetrics;
use crate::runtime::{BatchHandler, Descriptor};
use crate::store::ProjectionStatus;

/// A projection as the rest of the host sees it: its plugin, its progress, its health.
pub struct Projection {
    /// The plugin's code, replaced by a same-version swap between two batches.
    plugin: RwLock<Plugged>,
    /// What the plugin declared when this version started here; a swap keeps it (a change of
    /// shape is a new version).
    descriptor: Descriptor,
    /// Building beside the active version (a rebuild): it serves no read, holds no append back
    /// and records no status of the projection's.
    building: AtomicBool,
    pub metrics: ProjectionMetrics,
    /// An observer's deliveries (unused by a projection).
    pub delivery: crate::metrics::DeliveryMetrics,
    /// Wakes an observer's dispatcher: an operator retried or skipped a dead action.
    nudge: Arc<tokio::sync::Notify>,
    /// While building: the serving version, whose dispatcher delivers the actions this one
    /// logs (see [`Projection::wake_serving_dispatcher`]).
    delivered_by: Mutex<std::sync::Weak<Projection>>,
    /// Whether its plugin is an observer (a swap keeps the world).
    observer: bool,
    /// What it has committed, and the reads waiting for it.
    pub(super) progress: Committed,
    health: Mutex<Health>,
    pub(super) documents: Arc<Mutex<DocumentCache>>,
    /// Batches read but not committed yet, oldest first: the last position of each, and when
    /// its first event was appended (ms since the epoch). The front is the oldest event the
    /// read model does not have.
    unapplied: Mutex<VecDeque<(u64, u64)>>,
    /// When it (re)started on this instance (ms since the epoch): events appended before are
    /// its backlog, and catching up on them holds no append back (see `backpressure`).
    started_ms: AtomicU64,
    /// Its checkpoint then: with `started_ms`, how fast it has gone since.
    started_at: AtomicU64,
    /// Where its log starts (before the first event it read, when it started from nothing):
    /// PostgreSQL positions are tokens that start far above 0.
    origin: AtomicU64,
    /// While this instance runs it: no dead letter of it lies above this position (its
    /// checkpoint when it started here, raised to each letter it commits since, before the
    /// commit is published). `u64::MAX` while another instance runs it. A read that waited
    /// for a later position need not ask the store whether that event was set aside: under
    /// live load, every read.
    no_letter_after: AtomicU64,
}

/// The code a projection runs, how many times it was swapped here, and what the swap pause
/// is measured from.
struct Plugged {
    handler: Arc<dyn BatchHandler>,
    generation: u64,
    /// The generation of the last batch run, and when that call ended.
    ran: Option<(u64, std::time::Instant)>,
    /// When the code was last swapped: monotonic, and wall clock (ms).
    swapped: Option<(std::time::Instant, u64)>,
}

/// The health of a projection, as `GET /projections` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    pub status: ProjectionStatus,
    /// Why it failed.
    pub error: Option<String>,
    /// The error it is retrying after (a database outage), if any.
    pub retrying: Option<String>,
}

impl Projection {
    pub fn new(plugin: Arc<dyn BatchHandler>, checkpoint: u64) -> Self {
        let descriptor = plugin.descriptor().clone();
        Self::stored_as(plugin, descriptor, checkpoint)
    }

    /// A projection whose version is stored under `descriptor`'s version rather than the
    /// plugin's own (`V~rN`: V rebuilt beside itself); its shape is the plugin's.
    pub fn stored_as(
        plugin: Arc<dyn BatchHandler>,
        descriptor: Descriptor,
        checkpoint: u64,
    ) -> Self {
        Self {
            descriptor,
            observer: plugin.is_observer(),
            delivery: Default::default(),
            nudge: Arc::default(),
            delivered_by: Mutex::default(),
            plugin: RwLock::new(Plugged {
                handler: plugin,
                generation: 0,
                ran: None,
                swapped: None,
            }),
            building: AtomicBool::new(false),
            metrics: ProjectionMetrics::default(),
            // A projection that starts from position 0 has empty tables: the cache then holds
            // every document there is, and a miss needs no query.
            documents: Arc::new(Mutex::new(DocumentCache::new(checkpoint == 0))),
            progress: Committed::new(Progress {
                position: checkpoint,
                ..Progress::default()
            }),
            // Until this instance holds the projection's lease.
            health: Mutex::new(Health {
                status: ProjectionStatus::Standby,
                error: None,
                retrying: None,
            }),
            unapplied: Mutex::new(VecDeque::new()),
            started_ms: AtomicU64::new(now_ms()),
            started_at: AtomicU64::new(checkpoint),
            origin: AtomicU64::new(0),
            no_letter_after: AtomicU64::new(u64::MAX),
        }
    }

    /// Whether `position` is surely not a dead letter: this instance runs the projection and
    /// has set aside nothing at or after it. `false` says only "ask the store".
    pub fn surely_applied(&self, position: u64) -> bool {
        position > self.no_letter_after.load(Ordering::Acquire)
    }

    /// A commit of this instance's with dead letters up to `position`: called before the
    /// commit is published, so a read woken by it sees the letters.
    pub(crate) fn lettered(&self, position: u64) {
        self.no_letter_after.fetch_max(position, Ordering::AcqRel);
    }

    /// Its lag for backpressure, in ms: as [`Projection::lag_seconds`], counting only events
    /// appended since it started here. A catch-up or a rebuild from position 0 is hours
    /// behind by design and must not hold every write back; once through its backlog, its
    /// lag counts.
    pub fn live_lag_ms(&self) -> u64 {
        let started = self.started_ms.load(Ordering::Relaxed);
        match self.unapplied().front() {
            Some(&(_, appended)) if appended >= started => now_ms().saturating_sub(appended),
            _ => 0,
        }
    }

    /// How far it has come towards `head`, 0 to 1, by position from where its log starts: an
    /// estimate on PostgreSQL, whose positions are tokens, exact on SQLite.
    pub fn progress_towards(&self, head: u64) -> f64 {
        let origin = self.origin.load(Ordering::Relaxed);
        let checkpoint = self.checkpoint().max(origin);
        if head <= checkpoint {
            return 1.0;
        }
        (checkpoint - origin) as f64 / (head - origin) as f64
    }

    /// Positions applied per second since it started here (0 before a second has passed).
    pub fn positions_per_second(&self) -> f64 {
        let elapsed_ms = now_ms().saturating_sub(self.started_ms.load(Ordering::Relaxed));
        if elapsed_ms < 1000 {
            return 0.0;
        }
        let done = self
            .checkpoint()
            .saturating_sub(self.started_at.load(Ordering::Relaxed));
        done as f64 * 1000.0 / elapsed_ms as f64
    }

    /// How long ago the oldest event this projection has read but not applied was appended;
    /// 0 when it has applied everything it has read. Events not read yet are newer still:
    /// the runner reads as soon as the head moves.
    pub fn lag_seconds(&self) -> f64 {
        let oldest = self.unapplied().front().map(|&(_, appended)| appended);
        oldest.map_or(0.0, |appended| {
            now_ms().saturating_sub(appended) as f64 / 1000.0
        })
    }

    /// [`Projection::lag_seconds`] for an operator: the age of the oldest event it has not
    /// applied, read or not. A paused or failed projection reads nothing, so its next event is
    /// looked up in `source` (one read of one event); a running one knows from what it read.
    /// Where the lookup fails, what it knows.
    pub async fn lag_seconds_behind(&self, source: &dyn crate::source::Source) -> f64 {
        let known = self.lag_seconds();
        let checkpoint = self.checkpoint();
        if known > 0.0
            || !matches!(
                self.status(),
                ProjectionStatus::Paused | ProjectionStatus::Failed
            )
            || checkpoint >= *source.head().borrow()
        {
            return known;
        }
        match source.read(checkpoint, 1, usize::MAX).await {
            // A source without timestamps (0) tells no age.
            Ok(events) => events
                .first()
                .filter(|next| next.timestamp_ms > 0)
                .map_or(known, |next| {
                    now_ms().saturating_sub(next.timestamp_ms) as f64 / 1000.0
                }),
            Err(err) => {
                tracing::debug!(projection = %self.descriptor().name, error = %err, "cannot read the next event for the lag");
                known
            }
        }
    }

    pub(super) fn unapplied(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, u64)>> {
        self.unapplied
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A batch was read: remembered until a commit passes it.
    pub(super) fn read_batch(&self, events: &[Event]) {
        let (Some(first), Some(last)) = (events.first(), events.last()) else {
            return;
        };
        if self.checkpoint() == 0 {
            let _ = self.origin.compare_exchange(
                0,
                first.position.saturating_sub(1),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        let mut unapplied = self.unapplied();
        if unapplied
            .back()
            .is_some_and(|&(end, _)| end >= last.position)
        {
            return;
        }
        // A source without timestamps (0) counts from now, when the host first saw it.
        let appended = if first.timestamp_ms > 0 {
            first.timestamp_ms
        } else {
            now_ms()
        };
        unapplied.push_back((last.position, appended));
    }

    /// The checkpoint moved to `position`: batches up to it are applied.
    pub(super) fn applied_to(&self, position: u64) {
        let mut unapplied = self.unapplied();
        while unapplied.front().is_some_and(|&(end, _)| end <= position) {
            unapplied.pop_front();
        }
    }

    pub fn descriptor(&self) -> &Descriptor {
        &self.descriptor
    }

    /// The code the next batch runs, and its generation (0 until the first swap).
    pub fn plugin(&self) -> (Arc<dyn BatchHandler>, u64) {
        let plugged = self.plugin.read().unwrap_or_else(PoisonError::into_inner);
        (plugged.handler.clone(), plugged.generation)
    }

    /// Replaces the code: the next batch runs `plugin`, from the checkpoint. The caller has
    /// checked that it keeps the version's shape ([`Descriptor::same_shape`]).
    pub fn swap_plugin(&self, plugin: Arc<dyn BatchHandler>) {
        let mut plugged = self.plugin.write().unwrap_or_else(PoisonError::into_inner);
        plugged.handler = plugin;
        plugged.generation += 1;
        plugged.swapped = Some((std::time::Instant::now(), now_ms()));
    }

    /// A batch call starts on `generation`'s code, its first event appended at
    /// `first_appended_ms`: the first on new code records the swap's pause, from the later of
    /// the swap and the end of the last call on the old code. A batch whose events came after
    /// the swap waited for events, not for the swap, and records nothing.
    pub(super) fn batch_starts(&self, generation: u64, first_appended_ms: u64) {
        let plugged = self.plugin.read().unwrap_or_else(PoisonError::into_inner);
        let (Some((ran, ended)), Some((swapped, swapped_ms))) = (plugged.ran, plugged.swapped)
        else {
            return;
        };
        if ran < generation && first_appended_ms <= swapped_ms {
            let pause = swapped.max(ended).elapsed();
            self.metrics.swap_pause.observe(pause);
            ProjectionMetrics::set(
                &self.metrics.last_swap_pause_micros,
                pause.as_micros() as u64,
            );
            tracing::info!(projection = %self.name(), pause_ms = pause.as_secs_f64() * 1000.0, "first batch on the swapped code");
        }
    }

    /// A batch call on `generation`'s code has ended.
    pub(super) fn batch_ended(&self, generation: u64) {
        let mut plugged = self.plugin.write().unwrap_or_else(PoisonError::into_inner);
        plugged.ran = Some((generation, std::time::Instant::now()));
    }

    /// Whether this is a version being built beside the active one.
    pub fn is_building(&self) -> bool {
        self.building.load(Ordering::Relaxed)
    }

    pub(crate) fn set_building(&self, building: bool) {
        self.building.store(building, Ordering::Relaxed);
    }

    /// While this version is built beside `serving`, the actions it logs are delivered by
    /// `serving`'s dispatcher.
    pub(crate) fn deliver_through(&self, serving: &Arc<Projection>) {
        *self
            .delivered_by
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Arc::downgrade(serving);
    }

    /// A batch of this version that logged observer actions committed. Its own dispatcher
    /// sees that in its progress (`action_batches`); while it is being built, the serving
    /// version's dispatcher delivers those actions, and is told here.
    pub(crate) fn wake_serving_dispatcher(&self) {
        if !self.is_building() {
            return;
        }
        let serving = self
            .delivered_by
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .upgrade();
        if let Some(serving) = serving {
            serving.progress.update(|p| p.action_batches += 1);
        }
    }

    /// This version stopped serving (another took over, or it was removed): reads waiting on
    /// it are woken to look up the version that serves now.
    pub(crate) fn retire(&self) {
        self.progress.update(|p| p.retired = true);
    }

    pub fn name(&self) -> &str {
        &self.descriptor().name
    }

    /// Whether it is an observer: its batches decide actions for a dispatcher to deliver.
    pub fn is_observer(&self) -> bool {
        self.observer
    }

    /// Tells the observer's dispatcher that dead actions changed (a retry, a skip).
    pub fn nudge(&self) {
        self.nudge.notify_one();
    }

    pub(crate) fn nudged(&self) -> Arc<tokio::sync::Notify> {
        self.nudge.clone()
    }

    /// Every change of the progress, for observers; a read that waits uses
    /// [`Projection::committed`].
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    /// What it has committed, and the reads waiting for it.
    pub fn committed(&self) -> &Committed {
        &self.progress
    }

    /// The position committed so far.
    pub fn checkpoint(&self) -> u64 {
        self.progress.get().position
    }

    /// Its status alone, without copying the error texts (appends ask on every request).
    pub fn status(&self) -> ProjectionStatus {
        self.health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .status
    }

    pub fn health(&self) -> Health {
        self.health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn update_health(&self, change: impl FnOnce(&mut Health)) {
        change(&mut self.health.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// Takes the projection up (again) at `checkpoint`: after a lease is won, the documents
    /// cached before may be stale (another instance ran meanwhile).
    pub(crate) fn resume_at(&self, checkpoint: u64) {
        // Letters at or below the checkpoint are the store's to tell; from here this instance
        // sees every new one.
        self.no_letter_after.store(checkpoint, Ordering::Release);
        self.started_ms.store(now_ms(), Ordering::Relaxed);
        self.started_at.store(checkpoint, Ordering::Relaxed);
        *self
            .documents
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = DocumentCache::new(checkpoint == 0);
        self.update_health(|h| {
            h.status = ProjectionStatus::Running;
            h.retrying = None;
        });
        self.progress.update(|p| {
            *p = Progress {
                position: checkpoint,
                failed: false,
                retired: p.retired,
                // The dispatcher reads the action log again after a restart.
                action_batches: p.action_batches + 1,
            }
        });
    }

    /// Another instance runs it: follow its checkpoint so reads that wait still get answered.
    pub(crate) fn follow(&self, checkpoint: u64) {
        // Before the position moves: the other instance's letters are unknown here.
        self.no_letter_after.store(u64::MAX, Ordering::Release);
        self.update_health(|h| {
            h.status = ProjectionStatus::Standby;
            h.retrying = None;
        });
        self.progress
            .update(|p| p.position = p.position.max(checkpoint));
    }

    /// Another instance holds the lease: what this one read is the other's to apply now, and
    /// its age is not this instance's lag.
    pub(crate) fn stand_by(&self) {
        self.no_letter_after.store(u64::MAX, Ordering::Release);
        self.unapplied().clear();
    }

    /// Stopped for good: the status says why, and waiters are answered at once.
    pub(crate) fn mark_failed(&self, error: &str) {
        self.update_health(|h| {
            h.status = ProjectionStatus::Failed;
            h.error = Some(error.to_owned());
            h.retrying = None;
        });
        self.progress.update(|p| p.failed = true);
    }
}

/// The wall clock in ms since the epoch (0 before it).
pub(super) fn now_ms() -> u64 {
    crate::store::now_ms().max(0) as u64
}
