//! The dispatcher delivers an observer's logged actions.
//!
//! When work starts and stops:
//! - it runs beside the observer's runner, on the instance that holds the observer's lease,
//!   and stops with it; another instance's dispatcher picks the log up where it stands;
//! - actions are loaded from the log in log order (per stream, event order), a page at a time,
//!   as the runner commits more;
//! - one action per stream is in flight, up to `max_in_flight` streams at once; the next action
//!   of a stream starts only once the one before it is delivered (or skipped);
//! - an attempt that may succeed later (5xx, 408, 429, a timeout, a connection error) is tried
//!   again after a backoff with full jitter, never before `Retry-After`; after `max_attempts`, or
//!   at once for a permanent failure (another 4xx, a host outside the allow-list), the action is
//!   dead and its stream waits behind it until an operator retries or skips it;
//! - outcomes are written to the log in batches; a crash before a delivery is written delivers
//!   it again with the same `Idempotency-Key`, which is the receiver's to deduplicate.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinSet;

use super::action::{ActionKind, ActionState, Logged, Update};
use super::schedule;
use super::webhook::{Attempt, Client};
use crate::config::DeliveryConfig;
use crate::metrics::{DeliveryMetrics, DeliveryOutcome};
use crate::runner::Projection;
use crate::source::{AppendError, NewEvent, Source};
use crate::store::Store;

/// Actions loaded per page, and the most kept in memory.
const PAGE: u32 = 5_000;
const MAX_QUEUED: usize = 20_000;

/// How often dead actions are looked at again (an operator on another instance may have
/// retried or skipped them); a local retry or skip is seen at once.
const DEAD_POLL: Duration = Duration::from_secs(1);

/// Outcomes are written when this many are waiting, or this long after the last write, or when
/// nothing is in flight.
const WRITE_BATCH: usize = 512;
const WRITE_EVERY: Duration = Duration::from_millis(20);

/// How often the log is read when nothing wakes the dispatcher (a commit wakes it at once).
const IDLE_POLL: Duration = Duration::from_secs(1);

pub struct Dispatcher {
    observer: Arc<Projection>,
    store: Arc<dyn Store>,
    source: Arc<dyn Source>,
    config: DeliveryConfig,
    client: Client,
}

/// An attempt's result, back from its task.
struct Finished {
    stream: String,
    attempt: Attempt,
    took: Duration,
}

#[derive(Default)]
struct Queues {
    /// Loaded actions per stream, the head first.
    streams: HashMap<String, VecDeque<Logged>>,
    /// Streams whose head is due now.
    ready: VecDeque<String>,
    /// Streams whose head is due later: (due at, ms since the epoch; stream).
    later: BinaryHeap<Reverse<(i64, String)>>,
    /// Streams with an attempt in flight.
    busy: HashSet<String>,
    /// Streams waiting behind a dead action: stream → the action's id.
    blocked: HashMap<String, i64>,
    /// The last log id loaded.
    loaded_to: i64,
    queued: usize,
    /// Whether the last page came back short: nothing more to load until the runner commits.
    drained: bool,
}

impl Queues {
    fn add(&mut self, action: Logged, now: i64) {
        self.loaded_to = self.loaded_to.max(action.id);
        self.queued += 1;
        let stream = action.stream.clone();
        let queue = self.streams.entry(stream.clone()).or_default();
        queue.push_back(action);
        if queue.len() == 1 && !self.busy.contains(&stream) {
            self.schedule(&stream, now);
        }
    }

    /// Puts a stream's head where it belongs: blocked (dead), ready, or due later.
    fn schedule(&mut self, stream: &str, now: i64) {
        let Some(head) = self.streams.get(stream).and_then(|q| q.front()) else {
            self.streams.remove(stream);
            return;
        };
        if head.state == ActionState::Dead {
            self.blocked.insert(stream.to_owned(), head.id);
        } else if head.next_at <= now {
            self.ready.push_back(stream.to_owned());
        } else {
            self.later.push(Reverse((head.next_at, stream.to_owned())));
        }
    }

    /// Moves the heads now due to `ready`; when the next one is due otherwise.
    fn promote(&mut self, now: i64) -> Option<i64> {
        while let Some(Reverse((at, _))) = self.later.peek() {
            if *at > now {
                return Some(*at);
            }
            if let Some(Reverse((_, stream))) = self.later.pop() {
                self.ready.push_back(stream);
            }
        }
        None
    }

    fn pop_head(&mut self, stream: &str) -> Option<Logged> {
        let queue = self.streams.get_mut(stream)?;
        let head = queue.pop_front();
        if head.is_some() {
            self.queued -= 1;
        }
        head
    }
}

impl Dispatcher {
    pub fn new(
        observer: Arc<Projection>,
        store: Arc<dyn Store>,
        source: Arc<dyn Source>,
        config: DeliveryConfig,
    ) -> Result<Self, reqwest::Error> {
        let client = Client::new(&config)?;
        Ok(Self {
            observer,
            store,
            source,
            config,
            client,
        })
    }

    fn name(&self) -> &str {
        self.observer.name()
    }

    fn metrics(&self) -> &DeliveryMetrics {
        &self.observer.delivery
    }

    /// Delivers until `stop` turns true (or its sender is gone); what is in flight then is
    /// finished and written first.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut committed = self.observer.progress();
        let mut seen_action_batches = committed.borrow_and_update().action_batches;
        let nudged = self.observer.nudged();
        let mut q = Queues::default();
        let mut flying: JoinSet<Finished> = JoinSet::new();
        let mut updates: Vec<Update> = Vec::new();
        let mut dead_checked = Instant::now();
        let mut loaded = Instant::now();
        let mut written = Instant::now();
        // A version being rebuilt logs actions that the serving version's dispatcher delivers;
        // once it takes over, its own does.
        while self.observer.is_building() {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = stop.changed() => return,
            }
        }
        tracing::info!(observer = %self.name(), "dispatcher started");
        loop {
            let now = now_ms();
            if *stop.borrow() {
                break;
            }
            if (!q.drained || loaded.elapsed() >= IDLE_POLL) && q.queued < MAX_QUEUED / 2 {
                loaded = Instant::now();
                match self
                    .store
                    .open_actions(self.name(), q.loaded_to, PAGE)
                    .await
                {
                    Ok(page) => {
                        q.drained = (page.len() as u32) < PAGE;
                        for action in page {
                            q.add(action, now);
                        }
                    }
                    Err(err) => {
                        tracing::warn!(observer = %self.name(), error = %err, "cannot read the action log; trying again");
                        q.drained = true;
                    }
                }
            }
            // Outcomes in batches: one transaction for many deliveries.
            if !updates.is_empty()
                && (updates.len() >= WRITE_BATCH
                    || written.elapsed() >= WRITE_EVERY
                    || flying.is_empty())
            {
                self.write(&mut updates).await;
                written = Instant::now();
            }
            if !q.blocked.is_empty() && dead_checked.elapsed() >= DEAD_POLL {
                dead_checked = Instant::now();
                self.recheck_dead(&mut q, now).await;
            }
            let next_due = q.promote(now);
            while flying.len() < self.config.max_in_flight {
                let Some(stream) = q.ready.pop_front() else {
                    break;
                };
                let Some(head) = q.streams.get(&stream).and_then(|s| s.front()).cloned() else {
                    continue;
                };
                q.busy.insert(stream.clone());
                flying.spawn(self.attempt(head));
            }
            self.set_gauges(&q, flying.len());
            let wait_until = next_due
                .map(|at| Duration::from_millis(at.saturating_sub(now).max(0) as u64))
                .unwrap_or(IDLE_POLL)
                .min(if q.blocked.is_empty() {
                    IDLE_POLL
                } else {
                    DEAD_POLL
                })
                .min(if updates.is_empty() {
                    IDLE_POLL
                } else {
                    WRITE_EVERY
                });
            tokio::select! {
                Some(done) = flying.join_next(), if !flying.is_empty() => {
                    if let Ok(done) = done {
                        self.finished(&mut q, done, &mut updates);
                    }
                    // Take every other result that is ready, so their updates share a write.
                    while let Some(Ok(done)) = flying.try_join_next() {
                        self.finished(&mut q, done, &mut updates);
                    }
                }
                changed = committed.changed() => {
                    let action_batches = committed.borrow_and_update().action_batches;
                    if changed.is_ok() && action_batches != seen_action_batches {
                        seen_action_batches = action_batches;
                        q.drained = false;
                    }
                }
                () = nudged.notified() => {
                    dead_checked = Instant::now();
                    self.recheck_dead(&mut q, now_ms()).await;
                }
                _ = tokio::time::sleep(wait_until) => {}
                _ = stop.changed() => {}
            }
        }
        while let Some(done) = flying.join_next().await {
            if let Ok(done) = done {
                self.finished(&mut q, done, &mut updates);
            }
        }
        self.write(&mut updates).await;
        self.set_gauges(&Queues::default(), 0);
        tracing::info!(observer = %self.name(), "dispatcher stopped");
    }

    /// One attempt at the stream's head, in a task of its own.
    fn attempt(
        &self,
        action: Logged,
    ) -> impl std::future::Future<Output = Finished> + Send + 'static {
        let client = self.client.clone();
        let source = self.source.clone();
        let observer = self.name().to_owned();
        async move {
            let started = Instant::now();
            let attempt = action.attempts + 1;
            let result = match &action.kind {
                ActionKind::Webhook { .. } => client.send(&action, attempt).await,
                ActionKind::Emit {
                    stream,
                    stream_type,
                    event_type,
                    payload,
                } => {
                    emit(
                        source.as_ref(),
                        &observer,
                        &action,
                        stream,
                        stream_type,
                        event_type,
                        payload,
                    )
                    .await
                }
                ActionKind::Log { message } => {
                    tracing::info!(observer = %observer, event_id = %action.event_id, key = %action.key, "{message}");
                    Attempt::Delivered { status: 0 }
                }
            };
            Finished {
                stream: action.stream,
                attempt: result,
                took: started.elapsed(),
            }
        }
    }

    fn finished(&self, q: &mut Queues, done: Finished, updates: &mut Vec<Update>) {
        let now = now_ms();
        q.busy.remove(&done.stream);
        let Some(head) = q.streams.get_mut(&done.stream).and_then(|s| s.front_mut()) else {
            return;
        };
        head.attempts += 1;
        let kind = head.kind.as_str();
        let metrics = self.metrics();
        metrics
            .attempts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        metrics.duration.observe(done.took);
        let (status, error, retry_after, permanent) = match done.attempt {
            Attempt::Delivered { status } => {
                metrics.count(kind, DeliveryOutcome::Delivered);
                updates.push(Update {
                    id: head.id,
                    state: ActionState::Done,
                    attempts: head.attempts,
                    next_at: head.next_at,
                    last_status: (status != 0).then_some(status),
                    last_error: None,
                });
                q.pop_head(&done.stream);
                q.schedule(&done.stream, now);
                return;
            }
            Attempt::Retry {
                status,
                error,
                retry_after,
            } => (status, error, retry_after, false),
            Attempt::Permanent { status, error } => (status, error, None, true),
        };
        if permanent || head.attempts >= self.config.max_attempts {
            metrics.count(kind, DeliveryOutcome::Dead);
            head.state = ActionState::Dead;
            let error = if permanent {
                error
            } else {
                format!("{error} (gave up after {} attempts)", head.attempts)
            };
            tracing::error!(observer = %self.name(), key = %head.key, stream = %head.stream, attempts = head.attempts, status = ?status, error = %error, "action dead-lettered; its stream waits behind it");
            head.last_error = Some(error);
        } else {
            metrics.count(kind, DeliveryOutcome::Retried);
            let unit = rand::random::<f64>();
            let delay = schedule::delay(&self.config, head.attempts, retry_after, unit);
            head.next_at = now + delay.as_millis() as i64;
            tracing::debug!(observer = %self.name(), key = %head.key, attempts = head.attempts, retry_in_ms = delay.as_millis() as u64, error = %error, "action attempt failed; retrying");
            head.last_error = Some(error);
        }
        head.last_status = status;
        updates.push(Update {
            id: head.id,
            state: head.state,
            attempts: head.attempts,
            next_at: head.next_at,
            last_status: head.last_status,
            last_error: head.last_error.clone(),
        });
        q.schedule(&done.stream, now);
    }

    /// Dead heads an operator has retried or skipped since: their streams go on.
    async fn recheck_dead(&self, q: &mut Queues, now: i64) {
        if q.blocked.is_empty() {
            return;
        }
        let ids: Vec<i64> = q.blocked.values().copied().collect();
        let fresh = match self.store.actions_by_id(self.name(), &ids).await {
            Ok(fresh) => fresh,
            Err(err) => {
                tracing::warn!(observer = %self.name(), error = %err, "cannot read dead actions");
                return;
            }
        };
        for action in fresh {
            // Still dead; or pending only because its death is not written yet (a retry by
            // an operator starts its attempts from 0 again).
            let retried = action.state == ActionState::Pending && action.attempts == 0;
            if action.state == ActionState::Dead
                || (action.state == ActionState::Pending && !retried)
            {
                continue;
            }
            let stream = action.stream.clone();
            q.blocked.remove(&stream);
            match action.state {
                ActionState::Pending => {
                    if let Some(head) = q.streams.get_mut(&stream).and_then(|s| s.front_mut()) {
                        *head = action;
                    }
                }
                _ => {
                    q.pop_head(&stream);
                }
            }
            q.schedule(&stream, now);
        }
    }

    /// Writes outcomes; kept for the next try if the database is away (a crash meanwhile
    /// delivers those actions again, with the same key).
    async fn write(&self, updates: &mut Vec<Update>) {
        if updates.is_empty() {
            return;
        }
        // One action may have failed an attempt and been delivered since: only its last
        // outcome counts (a store may apply the updates in any order).
        let mut seen = HashSet::with_capacity(updates.len());
        let mut last: Vec<Update> = Vec::with_capacity(updates.len());
        for update in updates.iter().rev() {
            if seen.insert(update.id) {
                last.push(update.clone());
            }
        }
        *updates = last;
        match self.store.update_actions(updates).await {
            Ok(()) => updates.clear(),
            Err(err) => {
                tracing::warn!(observer = %self.name(), error = %err, pending = updates.len(), "cannot record deliveries; trying again");
            }
        }
    }

    fn set_gauges(&self, q: &Queues, in_flight: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        let metrics = self.metrics();
        metrics.in_flight.store(in_flight as u64, Relaxed);
        metrics.queued.store(q.queued as u64, Relaxed);
        metrics.blocked.store(q.blocked.len() as u64, Relaxed);
    }
}

/// Appends an observer's event with an id derived from the action's key: a retried emit finds
/// its id taken and counts as delivered.
async fn emit(
    source: &dyn Source,
    observer: &str,
    action: &Logged,
    stream: &str,
    stream_type: &str,
    event_type: &str,
    payload: &[u8],
) -> Attempt {
    let permanent = |error: String| Attempt::Permanent {
        status: None,
        error,
    };
    let payload = match std::str::from_utf8(payload)
        .ok()
        .and_then(|text| serde_json::value::RawValue::from_string(text.to_owned()).ok())
    {
        Some(payload) => payload,
        None => return permanent("the emitted event's payload is not JSON".into()),
    };
    let id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, action.key.as_bytes()).to_string();
    let event = NewEvent {
        id: Some(id),
        stream: stream.to_owned(),
        stream_type: stream_type.to_owned(),
        event_type: event_type.to_owned(),
        payload,
        expected_version: None,
        headers: [
            ("projector.observer".to_owned(), observer.to_owned()),
            ("projector.caused_by".to_owned(), action.event_id.clone()),
        ]
        .into(),
    };
    match source.append(vec![event]).await {
        Ok(_) | Err(AppendError::DuplicateId { .. }) => Attempt::Delivered { status: 0 },
        Err(err @ (AppendError::Unsupported | AppendError::Invalid { .. })) => {
            permanent(format!("cannot append the emitted event: {err}"))
        }
        Err(err) => Attempt::Retry {
            status: None,
            error: format!("appending the emitted event: {err}"),
            retry_after: None,
        },
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
