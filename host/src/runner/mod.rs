//! One runner per projection: read after the checkpoint, hand the batch to the plugin in one
//! call, commit its documents with the new checkpoint in one transaction, publish the position.
//!
//! When it stops, and when it goes on:
//! - a plugin fault (a returned error, a panic, a trap, a limit, a document no store can keep)
//!   is the event's: with `on_error = "park"` the runner finds the event ([`isolate`]),
//!   dead-letters it, parks its stream and applies everything else; with `"stop"` the
//!   projection stops (status `failed`, error kept, waiters answered at once);
//! - a host fault (the database, a document read) is retried with backoff forever, since the
//!   batch is intact and the database usually comes back;
//! - operator commands (pause, resume, restart, retry, skip) are carried out between batches;
//! - shutdown stops between batches.

mod cache;
mod isolate;
mod projection;
mod resolve;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::config::{OnError, RunnerConfig};
use crate::control::{Command, CommandError, Commands, Outcome, Request};
use crate::event::Event;
use crate::metrics::ProjectionMetrics;
use crate::runtime::{BatchOutput, Fault, RuntimeError};
use crate::source::{Source, SourceError};
use crate::store::{
    Batch, DeadLetter, LetterKind, LetterState, ProjectionStatus, Store, StoreError,
};
use crate::supervisor;
use cache::{Overlay, StoreReader};
pub use projection::{Health, Projection};

pub struct Runner {
    projection: Arc<Projection>,
    store: Arc<dyn Store>,
    source: Arc<dyn Source>,
    config: RunnerConfig,
    /// Shutdown, as long work (an isolation) checks it between plugin calls.
    stopping: Option<watch::Receiver<bool>>,
}

/// Why a stage did not produce its result. Classified once, where the failure happens.
enum Problem {
    /// A host fault (the database, a document read): try again after a pause.
    Host(String),
    /// The plugin's fault on these events: isolate the event (or stop, by policy).
    Plugin(PluginFailure),
    /// Nothing this runner can do will help (the source cannot be used): stop.
    Fatal(String),
    /// A malformed outbox row: set it aside and go on after it (the letter is kept only when
    /// the projection subscribes to the row's type, or the type is unreadable).
    Malformed {
        letter: Box<DeadLetter>,
        subscribed: bool,
    },
}

/// A plugin call that failed by the plugin's fault.
#[derive(Debug, Clone)]
struct PluginFailure {
    /// The event (index in the call's batch) it failed on, when known.
    at: Option<usize>,
    /// Whether the plugin itself named the event (an error it returned, a panic), rather than
    /// the host knowing only where the call was when a limit cut it short.
    named: bool,
    /// Whether the call ran into its deadline: such a failure costs a whole deadline.
    timed_out: bool,
    reason: String,
}

/// A batch the plugin has handled: its documents are in the cache, not yet committed.
#[derive(Default)]
struct Handled {
    output: BatchOutput,
    dead_letters: Vec<DeadLetter>,
    /// The checkpoint the batch follows, and the one it moves to.
    from: u64,
    last: u64,
}

/// Why [`Runner::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// Shutdown was asked for.
    Stopped,
    /// The projection failed (its status says why).
    Failed,
    /// Another instance moved the checkpoint: this one must stand by.
    Fenced,
    /// An operator asked for a restart.
    Restart,
}

/// Exponential backoff between retries, reset by the next success.
struct Backoff {
    delay: Duration,
    max: Duration,
    failing: bool,
}

pub(crate) const FIRST_RETRY: Duration = Duration::from_millis(50);

/// Streams parked behind an open dead letter: stream → the letter's position.
type Parked = HashMap<String, u64>;

/// The pipeline's state between steps. Events up to `handled_to` are handled: committed, or
/// in `pending`.
struct Pipeline {
    handled_to: u64,
    pending: Option<Handled>,
    prefetched: Option<Vec<Event>>,
    parked: Parked,
    backoff: Backoff,
    paused: bool,
}

impl Runner {
    pub fn new(
        projection: Arc<Projection>,
        store: Arc<dyn Store>,
        source: Arc<dyn Source>,
        config: RunnerConfig,
    ) -> Self {
        Self {
            projection,
            store,
            source,
            config,
            stopping: None,
        }
    }

    /// Runs until `shutdown` turns true or the projection fails; takes no commands.
    pub async fn run(self, shutdown: watch::Receiver<bool>) -> RunEnd {
        let (_keep, commands) = mpsc::channel(1);
        self.run_commanded(shutdown, Arc::new(tokio::sync::Mutex::new(commands)))
            .await
    }

    /// [`Runner::run_commanded`] in a task of its own, watched: should the runner panic (a
    /// bug), its projection is marked failed with the reason instead of silently standing
    /// still.
    pub async fn run_supervised(
        self,
        shutdown: watch::Receiver<bool>,
        commands: Commands,
    ) -> RunEnd {
        let projection = self.projection.clone();
        let store = self.store.clone();
        let run = self.run_commanded(shutdown, commands);
        match tokio::spawn(tracing::Instrument::instrument(
            run,
            tracing::Span::current(),
        ))
        .await
        {
            Ok(end) => end,
            Err(err) => {
                let error = format!("the runner crashed: {err}");
                tracing::error!(projection = %projection.name(), error = %error, "projection failed and stopped");
                record_failure(&projection, store.as_ref(), &error).await;
                RunEnd::Failed
            }
        }
    }

    /// Runs until shutdown, failure, fencing or a restart command; carries out the commands
    /// that arrive meanwhile, and gives the channel back.
    ///
    /// A pipeline of three stages: while batch N commits, batch N+1 is handled (its reads see
    /// N's documents through the cache) and batch N+2 is read. Only one commit is in flight, and
    /// the checkpoint is published only once its commit is durable.
    pub async fn run_commanded(
        mut self,
        mut shutdown: watch::Receiver<bool>,
        commands: Commands,
    ) -> RunEnd {
        self.stopping = Some(shutdown.clone());
        let mut commands = commands.lock_owned().await;
        let end = match self.start(&mut shutdown).await {
            Some(mut pipeline) => {
                let end = self
                    .drive(&mut pipeline, &mut shutdown, &mut commands)
                    .await;
                match end {
                    RunEnd::Stopped | RunEnd::Restart => self.finish(&mut pipeline, end).await,
                    end => end,
                }
            }
            None => RunEnd::Stopped,
        };
        tracing::info!(projection = %self.projection.name(), checkpoint = self.projection.checkpoint(), ?end, "runner stopped");
        end
    }

    /// Loads what the pipeline starts from; `None` if shutdown came first.
    async fn start(&self, shutdown: &mut watch::Receiver<bool>) -> Option<Pipeline> {
        let mut backoff = Backoff {
            delay: FIRST_RETRY,
            max: Duration::from_millis(self.config.max_retry_backoff_ms).max(FIRST_RETRY),
            failing: false,
        };
        let descriptor = self.projection.descriptor();
        let (parked, paused) = loop {
            let loaded = async {
                let parked = self.store.parked(descriptor).await?;
                let paused = self.store.paused(&descriptor.name).await?;
                Ok::<_, StoreError>((parked, paused))
            };
            match loaded.await {
                Ok(loaded) => break loaded,
                Err(err) => {
                    if !self.pause(&mut backoff, err.to_string(), shutdown).await {
                        return None;
                    }
                }
            }
        };
        let metrics = &self.projection.metrics;
        ProjectionMetrics::set(&metrics.parked_streams, parked.len() as u64);
        ProjectionMetrics::set(
            &metrics.parked_events,
            parked.iter().map(|p| p.events).sum(),
        );
        // What an earlier run of this projection read and never committed is read again.
        self.projection.unapplied().clear();
        let handled_to = self.projection.checkpoint();
        if paused {
            self.projection
                .update_health(|h| h.status = ProjectionStatus::Paused);
        }
        tracing::info!(projection = %self.projection.name(), checkpoint = handled_to, parked = parked.len(), paused, "runner started");
        Some(Pipeline {
            handled_to,
            pending: None,
            prefetched: None,
            parked: parked.into_iter().map(|p| (p.stream, p.behind)).collect(),
            backoff,
            paused,
        })
    }

    async fn drive(
        &self,
        p: &mut Pipeline,
        shutdown: &mut watch::Receiver<bool>,
        commands: &mut mpsc::Receiver<Request>,
    ) -> RunEnd {
        let mut head = self.source.head();
        while !*shutdown.borrow() {
            // Operator commands, between batches.
            while let Ok(request) = commands.try_recv() {
                if let Some(end) = self.command(request, p, shutdown).await {
                    return end;
                }
            }
            if p.paused {
                if let Err(end) = self.settle(p, shutdown).await {
                    return end;
                }
                tokio::select! {
                    request = commands.recv() => match request {
                        Some(request) => if let Some(end) = self.command(request, p, shutdown).await {
                            return end;
                        },
                        None => return RunEnd::Stopped,
                    },
                    changed = shutdown.changed() => if changed.is_err() { break },
                }
                continue;
            }
            let events = match p.prefetched.take() {
                Some(events) if !events.is_empty() => events,
                // Caught up: commit what is pending without another read first.
                Some(_) if p.pending.is_some() => Vec::new(),
                // Nothing past what is handled has been announced: no read (a round trip to
                // the database, two on PostgreSQL) until the head moves. While failing, the
                // read is the probe that clears the error, so it is made.
                _ if *head.borrow_and_update() <= p.handled_to && !p.backoff.failing => Vec::new(),
                _ => {
                    // Marked seen before reading, so an append after the read still wakes us.
                    head.borrow_and_update();
                    match self.read(p.handled_to).await {
                        Ok(events) => {
                            // Caught up and idle, no commit would clear it.
                            if p.pending.is_none() {
                                self.recovered(&mut p.backoff);
                            }
                            events
                        }
                        Err(Problem::Host(error)) => {
                            self.pause(&mut p.backoff, error, shutdown).await;
                            continue;
                        }
                        Err(Problem::Plugin(failure)) => return self.fail(failure.reason).await,
                        Err(Problem::Fatal(error)) => return self.fail(error).await,
                        Err(Problem::Malformed { letter, subscribed }) => {
                            if let Err(end) = self.set_aside(p, *letter, subscribed, shutdown).await
                            {
                                return end;
                            }
                            continue;
                        }
                    }
                }
            };
            if events.is_empty() && p.pending.is_none() {
                tokio::select! {
                    _ = head.changed() => {}
                    request = commands.recv() => match request {
                        Some(request) => if let Some(end) = self.command(request, p, shutdown).await {
                            return end;
                        },
                        None => return RunEnd::Stopped,
                    },
                    // A dropped shutdown sender means shutdown too (and must not spin).
                    changed = shutdown.changed() => if changed.is_err() { break },
                }
                continue;
            }
            let last = events.last().map(|e| e.position);
            let mut stop = shutdown.clone();
            let pending = p.pending.take();
            let commit = async {
                match pending {
                    // Another batch is behind this one: a catch-up commit.
                    Some(batch) => {
                        self.commit(batch, last.is_none(), &mut p.backoff, &mut stop)
                            .await
                    }
                    None => Ok(()),
                }
            };
            let from = p.handled_to;
            let parked = &mut p.parked;
            let handle = async {
                match last {
                    Some(last) => Some(self.process(events, parked, from, last).await),
                    None => None,
                }
            };
            let announced = *head.borrow();
            let read_next = async {
                match last {
                    // At the head: the next read waits for an announcement.
                    Some(last) if announced <= last => None,
                    Some(last) => self.read(last).await.ok(),
                    None => None,
                }
            };
            let (committed, handled, next) = tokio::join!(commit, handle, read_next);
            if let Err(end) = committed {
                return end;
            }
            match handled {
                None => {}
                Some(Ok(batch)) => {
                    self.projection
                        .documents
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .apply(&batch.output, self.config.cached_documents);
                    p.handled_to = batch.last;
                    p.pending = Some(batch);
                    p.prefetched = next;
                }
                Some(Err(Problem::Host(error))) => {
                    self.pause(&mut p.backoff, error, shutdown).await;
                }
                Some(Err(Problem::Plugin(failure))) => return self.fail(failure.reason).await,
                Some(Err(Problem::Fatal(error))) => return self.fail(error).await,
                // Only reads set rows aside; a batch that reached the plugin does not.
                Some(Err(Problem::Malformed { letter, .. })) => {
                    return self.fail(letter.reason).await
                }
            }
        }
        RunEnd::Stopped
    }

    /// Stopping cleanly: one attempt to commit what is pending, so a clean stop leaves nothing
    /// to redo.
    async fn finish(&self, p: &mut Pipeline, end: RunEnd) -> RunEnd {
        if let Some(batch) = p.pending.take() {
            let (_, mut stopped) = watch::channel(true);
            match self.commit(batch, true, &mut p.backoff, &mut stopped).await {
                Ok(()) | Err(RunEnd::Stopped) => {}
                Err(other) => return other,
            }
        }
        end
    }

    /// Commits what is pending, durably: before a command acts on the committed state.
    async fn settle(
        &self,
        p: &mut Pipeline,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), RunEnd> {
        match p.pending.take() {
            Some(batch) => self.commit(batch, true, &mut p.backoff, shutdown).await,
            None => Ok(()),
        }
    }

    /// A malformed row: its own batch (no documents, the dead letter, the checkpoint past
    /// it), committed after the batch in flight.
    async fn set_aside(
        &self,
        p: &mut Pipeline,
        mut letter: DeadLetter,
        subscribed: bool,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), RunEnd> {
        if subscribed {
            tracing::error!(projection = %self.projection.name(), position = letter.position, event_id = ?letter.event_id, stream = ?letter.stream, reason = %letter.reason, "malformed outbox row dead-lettered; its stream is parked");
        }
        self.settle(p, shutdown).await?;
        if let Some(stream) = letter.stream.as_ref().filter(|_| subscribed) {
            match p.parked.get(stream) {
                Some(&behind) => {
                    letter.parked_behind = Some(behind);
                    letter.kind = LetterKind::Parked;
                }
                None => {
                    p.parked.insert(stream.clone(), letter.position);
                }
            }
            ProjectionMetrics::set(
                &self.projection.metrics.parked_streams,
                p.parked.len() as u64,
            );
        }
        let from = p.handled_to;
        p.handled_to = letter.position;
        p.pending = Some(Handled {
            output: BatchOutput::default(),
            from,
            last: letter.position,
            dead_letters: if subscribed { vec![letter] } else { Vec::new() },
        });
        Ok(())
    }

    /// Carries out an operator's command; `Some` when the runner must end.
    async fn command(
        &self,
        request: Request,
        p: &mut Pipeline,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<RunEnd> {
        let name = self.projection.name().to_owned();
        tracing::info!(projection = %name, command = ?request.command, "operator command");
        if let Err(end) = self.settle(p, shutdown).await {
            request.answer(Err(CommandError::unavailable(
                "the projection stopped before the command could run",
            )));
            return Some(end);
        }
        let command = request.command.clone();
        let reply = match &command {
            Command::Pause | Command::Resume => {
                match supervisor::set_paused(self.store.as_ref(), &self.projection, &command).await
                {
                    Ok(paused) => {
                        p.paused = paused;
                        self.projection.update_health(|h| {
                            h.status = if paused {
                                ProjectionStatus::Paused
                            } else {
                                ProjectionStatus::Running
                            }
                        });
                        Ok(Outcome {
                            status: self.projection.status().as_str().into(),
                            message: format!(
                                "{name} {}",
                                if paused {
                                    "is paused: it reads no events until resumed"
                                } else {
                                    "runs again"
                                }
                            ),
                            ..Outcome::default()
                        })
                    }
                    Err(err) => Err(err),
                }
            }
            Command::Restart => {
                supervisor::record(self.store.as_ref(), &self.projection, &command, "restarted")
                    .await;
                request.answer(Ok(Outcome {
                    status: "running".into(),
                    message: format!("{name} restarts from its checkpoint"),
                    ..Outcome::default()
                }));
                return Some(RunEnd::Restart);
            }
            Command::Retry { position } => self.resolve(p, *position, false).await,
            Command::Skip { position } => self.resolve(p, *position, true).await,
            Command::Reset { position } => {
                let reply = self.reset(p, *position, shutdown).await;
                let ok = reply.is_ok();
                request.answer(reply);
                // The runner starts again from the checkpoint it moved.
                return ok.then_some(RunEnd::Restart);
            }
        };
        request.answer(reply);
        None
    }

    /// Moves an observer's checkpoint (back, usually) in one commit, recorded as an admin
    /// action. Only observers: a projection's documents would not match a moved checkpoint.
    async fn reset(
        &self,
        p: &mut Pipeline,
        position: u64,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Outcome, CommandError> {
        let name = self.projection.name().to_owned();
        if !self.projection.is_observer() {
            return Err(CommandError::WrongState {
                status: "a projection".into(),
                hint: "only an observer's checkpoint can be reset; rebuild a projection by \
                       uploading a new version"
                    .into(),
            });
        }
        let from = p.handled_to;
        let action = crate::store::AdminAction {
            action: "reset".into(),
            target: Some(position),
            at: crate::store::now_ms(),
            outcome: format!("checkpoint moved from {from} to {position}"),
        };
        let batch = Batch {
            actions: std::slice::from_ref(&action),
            from,
            to: position,
            ..Batch::default()
        };
        self.commit_batch(&batch, &mut p.backoff, shutdown)
            .await
            .map_err(|_| CommandError::unavailable("the observer stopped before the reset"))?;
        p.handled_to = position;
        p.prefetched = None;
        tracing::info!(observer = %name, from, to = position, "observer checkpoint reset");
        Ok(Outcome {
            status: "running".into(),
            message: format!(
                "{name} observes again from position {position} (it was at {from}); actions it \
                 decides again are logged already and are not delivered twice"
            ),
            ..Outcome::default()
        })
    }

    async fn read(&self, after: u64) -> Result<Vec<Event>, Problem> {
        let start = std::time::Instant::now();
        let read = self
            .source
            .read(
                after,
                self.config.max_batch_events,
                self.config.max_batch_bytes,
            )
            .await;
        ProjectionMetrics::add_time(&self.projection.metrics.read_micros, start.elapsed());
        if let Ok(events) = &read {
            self.projection.read_batch(events);
        }
        read.map_err(|err| self.source_problem(err))
    }

    fn source_problem(&self, err: SourceError) -> Problem {
        match err {
            // The row will not get better by waiting: set it aside and say where it is.
            SourceError::Malformed {
                position,
                id,
                stream,
                event_type,
                reason,
            } => Problem::Malformed {
                subscribed: event_type
                    .as_ref()
                    .is_none_or(|t| self.projection.descriptor().subscribes_to(t)),
                letter: Box::new(DeadLetter {
                    position,
                    event_id: id,
                    stream,
                    reason: format!("malformed outbox row: {reason}"),
                    parked_behind: None,
                    kind: LetterKind::Malformed,
                    state: LetterState::Open,
                    resolved_at: None,
                    plugin_version: None,
                    event: None,
                    actions: Vec::new(),
                }),
            },
            err @ SourceError::Setup(_) => Problem::Fatal(err.to_string()),
            // Retried with backoff like an outage; a lost file stays lost until an operator
            // restarts the server, and the projection's error says so meanwhile.
            err @ (SourceError::Database { .. }
            | SourceError::FileLost(_)
            | SourceError::Group(_)) => Problem::Host(err.to_string()),
        }
    }

    /// Commits a handled batch, retrying database errors until it succeeds, shutdown comes
    /// or the checkpoint turns out to have moved under it. The one path for "a batch
    /// committed": metrics, lag, progress.
    async fn commit(
        &self,
        batch: Handled,
        durable: bool,
        backoff: &mut Backoff,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), RunEnd> {
        let mut value = Batch {
            output: &batch.output,
            dead_letters: &batch.dead_letters,
            from: batch.from,
            to: batch.last,
            durable,
            ..Batch::default()
        };
        // No need to wait for the flush of a checkpoint's move alone: losing it loses nothing
        // a reader saw (the documents are the same before and after it).
        value.durable &= !value.moves_only_the_checkpoint();
        self.commit_batch(&value, backoff, shutdown).await?;
        self.projection.applied_to(batch.last);
        let actions = !batch.output.actions.is_empty();
        self.projection.progress.update(|p| {
            p.position = batch.last;
            p.failed = false;
            p.action_batches += u64::from(actions);
        });
        if actions {
            self.projection.wake_serving_dispatcher();
        }
        Ok(())
    }

    async fn commit_batch(
        &self,
        batch: &Batch<'_>,
        backoff: &mut Backoff,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), RunEnd> {
        loop {
            let start = std::time::Instant::now();
            match self.store.commit(self.projection.descriptor(), batch).await {
                Ok(()) => {
                    if let Some(last) = batch.dead_letters.iter().map(|l| l.position).max() {
                        self.projection.lettered(last);
                    }
                    // Our commit held the outbox's watermark back while it ran.
                    self.source.nudge();
                    let metrics = &self.projection.metrics;
                    ProjectionMetrics::add_time(&metrics.commit_micros, start.elapsed());
                    metrics.commit_duration.observe(start.elapsed());
                    ProjectionMetrics::add(&metrics.batches, 1);
                    ProjectionMetrics::add(&metrics.documents, batch.output.documents() as u64);
                    metrics.count_dead_letters(batch.dead_letters);
                    self.recovered(backoff);
                    return Ok(());
                }
                Err(err @ StoreError::InvalidDocument { .. }) => {
                    return Err(self.fail(err.to_string()).await);
                }
                Err(err @ StoreError::Fenced { .. }) => {
                    tracing::warn!(projection = %self.projection.name(), error = %err, "batch dropped: standing by");
                    return Err(RunEnd::Fenced);
                }
                Err(err) => {
                    if !self.pause(backoff, err.to_string(), shutdown).await {
                        return Err(RunEnd::Stopped);
                    }
                }
            }
        }
    }

    /// After a success: the error retried before is gone.
    fn recovered(&self, backoff: &mut Backoff) {
        if backoff.failing {
            tracing::info!(projection = %self.projection.name(), "recovered");
            self.projection.update_health(|h| h.retrying = None);
            backoff.failing = false;
            backoff.delay = FIRST_RETRY;
        }
    }

    /// Waits out a transient error; `false` if shutdown came first.
    async fn pause(
        &self,
        backoff: &mut Backoff,
        error: String,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        tracing::warn!(projection = %self.projection.name(), error = %error, retry_in_ms = backoff.delay.as_millis() as u64, "batch not committed, retrying");
        ProjectionMetrics::add(&self.projection.metrics.retries, 1);
        self.projection.update_health(|h| h.retrying = Some(error));
        backoff.failing = true;
        let delay = backoff.delay;
        backoff.delay = (backoff.delay * 2).min(backoff.max);
        if *shutdown.borrow() {
            return false;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            changed = shutdown.changed() => changed.is_ok() && !*shutdown.borrow(),
        }
    }

    /// Whether shutdown (or the loss of the lease) has been asked for.
    fn stopping(&self) -> bool {
        self.stopping.as_ref().is_some_and(|s| *s.borrow())
    }

    async fn fail(&self, error: String) -> RunEnd {
        let name = self.projection.name();
        tracing::error!(projection = %name, checkpoint = self.projection.checkpoint(), error = %error, "projection failed and stopped");
        record_failure(&self.projection, self.store.as_ref(), &error).await;
        RunEnd::Failed
    }

    /// Filters a batch to the plugin's event types and to streams not parked, and runs it; a
    /// plugin fault is isolated to its event (policy `park`) or stops the projection
    /// (`stop`). An empty filtered batch still moves the checkpoint.
    async fn process(
        &self,
        events: Vec<Event>,
        parked: &mut Parked,
        from: u64,
        last: u64,
    ) -> Result<Handled, Problem> {
        let descriptor = self.projection.descriptor();
        let mut dead_letters = Vec::new();
        let wanted: Vec<Event> = events
            .into_iter()
            .filter(|e| descriptor.subscribes_to(&e.event_type))
            .filter(|e| match parked.get(&e.stream) {
                None => true,
                Some(&behind) => {
                    dead_letters.push(parked_letter(e, behind));
                    false
                }
            })
            .collect();
        let mut handled = Handled {
            output: BatchOutput::default(),
            dead_letters,
            from,
            last,
        };
        if wanted.is_empty() {
            return Ok(handled);
        }
        ProjectionMetrics::add(&self.projection.metrics.events, wanted.len() as u64);
        match self.config.on_error {
            OnError::Stop => handled.output = self.call(wanted, None).await.map_err(|(p, _)| p)?,
            OnError::Park => match self.call(wanted, None).await {
                Ok(output) => handled.output = output,
                Err((Problem::Plugin(failure), events)) => {
                    // Streams parked on a copy: should the isolation end in a host fault, the
                    // batch is handled again from the start, with nothing parked by this try.
                    let mut trial = parked.clone();
                    let isolated = self.isolate(events, failure, &mut trial).await?;
                    *parked = trial;
                    handled.output = isolated.output;
                    handled.dead_letters.extend(isolated.letters);
                    handled.dead_letters.sort_by_key(|l| l.position);
                }
                Err((problem, _)) => return Err(problem),
            },
        }
        ProjectionMetrics::set(&self.projection.metrics.parked_streams, parked.len() as u64);
        Ok(handled)
    }

    /// After a restart or a takeover the cache starts empty, and a plugin reading its
    /// documents one `get` at a time would cost a query each. Documents are most often keyed by
    /// the stream id, so those are fetched for the whole batch in one query per collection.
    async fn prefetch(&self, events: &[Event]) -> Result<(), Problem> {
        let descriptor = self.projection.descriptor();
        let cache = || {
            self.projection
                .documents
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
        };
        if cache().complete {
            return Ok(());
        }
        let mut streams: Vec<&str> = events.iter().map(|e| e.stream.as_str()).collect();
        streams.sort_unstable();
        streams.dedup();
        for collection in &descriptor.collections {
            let name = collection.name.as_str();
            // Keys already cached may belong to the batch still committing: never refetched.
            let missing: Vec<&str> = {
                let cache = cache();
                streams
                    .iter()
                    .copied()
                    .filter(|key| cache.get(name, key).is_none())
                    .collect()
            };
            if missing.is_empty() {
                continue;
            }
            let found = self
                .store
                .documents(descriptor, name, &missing)
                .await
                .map_err(|err| Problem::Host(format!("prefetching documents: {err}")))?;
            let mut found: HashMap<String, Arc<[u8]>> = found
                .into_iter()
                .map(|d| (d.key, Arc::from(d.json.get().as_bytes())))
                .collect();
            let mut cache = cache();
            for key in missing {
                cache.remember(name, key, found.remove(key), self.config.cached_documents);
            }
        }
        Ok(())
    }

    /// One plugin call. `earlier`: documents written by the sub-batches before this one (an
    /// isolation), read in front of the store. On failure the events come back with the
    /// problem, for isolation to split.
    async fn call(
        &self,
        events: Vec<Event>,
        earlier: Option<Arc<BatchOutput>>,
    ) -> Result<BatchOutput, (Problem, Vec<Event>)> {
        if let Err(problem) = self.prefetch(&events).await {
            return Err((problem, events));
        }
        let (plugin, generation) = self.projection.plugin();
        if let Some(first) = events.first() {
            self.projection.batch_starts(generation, first.timestamp_ms);
        }
        let store = Arc::new(StoreReader {
            store: self.store.clone(),
            descriptor: self.projection.descriptor().clone(),
            runtime: tokio::runtime::Handle::current(),
            cache: self.projection.documents.clone(),
            capacity: self.config.cached_documents,
        });
        let reader: Arc<dyn crate::runtime::DocumentReader> = match earlier {
            Some(earlier) => Arc::new(Overlay {
                earlier,
                then: store,
            }),
            None => store,
        };
        let metrics = &self.projection.metrics;
        let start = std::time::Instant::now();
        let result = tokio::task::spawn_blocking(move || plugin.handle(events, reader)).await;
        ProjectionMetrics::add_time(&metrics.plugin_micros, start.elapsed());
        metrics.batch_duration.observe(start.elapsed());
        self.projection.batch_ended(generation);
        match result {
            Ok(Ok(output)) => Ok(output),
            Ok(Err(failed)) => Err((classify(&failed.error), failed.events)),
            Err(join) => Err((
                Problem::Fatal(format!("plugin call aborted: {join}")),
                Vec::new(),
            )),
        }
    }
}

/// A plugin call's failure, classified once: the event's fault, or the host's.
fn classify(err: &RuntimeError) -> Problem {
    match err.fault() {
        Fault::Host => Problem::Host(err.to_string()),
        Fault::Plugin { at, named } => Problem::Plugin(PluginFailure {
            at,
            named,
            timed_out: matches!(err, RuntimeError::DeadlineExceeded { .. }),
            reason: err.to_string(),
        }),
    }
}

/// An event set aside because its stream is parked behind the dead letter at `behind`.
fn parked_letter(e: &Event, behind: u64) -> DeadLetter {
    DeadLetter {
        position: e.position,
        event_id: Some(e.id.clone()),
        stream: Some(e.stream.clone()),
        reason: format!("parked behind the dead letter at position {behind}"),
        parked_behind: Some(behind),
        kind: LetterKind::Parked,
        state: LetterState::Open,
        resolved_at: None,
        plugin_version: None,
        event: Some(e.clone()),
        actions: Vec::new(),
    }
}

async fn record_failure(projection: &Projection, store: &dyn Store, error: &str) {
    projection.mark_failed(error);
    // The projection's recorded status is the serving version's; a failed rebuild shows in
    // its own summary (`building`), and the active version goes on.
    if projection.is_building() {
        return;
    }
    if let Err(err) = store
        .set_status(projection.name(), ProjectionStatus::Failed, Some(error))
        .await
    {
        tracing::warn!(projection = %projection.name(), error = %err, "could not record the failure");
    }
}
