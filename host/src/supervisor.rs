//! One supervisor per projection: it owns the projection's runner, takes operator commands
//! over a channel, and decides where the projection runs.
//!
//! Where: the store's lease lets one instance at a time run a projection; the others stand by,
//! follow its checkpoint, and take over when the lease comes free.
//!
//! Commands: while this instance runs the projection, its runner carries them out between
//! batches (a failed projection's supervisor answers them itself: restart, pause, resume).
//! While another instance runs it, a command is queued in the store for that instance, whose
//! supervisor polls the queue, carries it out and writes the answer back.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::config::{DeliveryConfig, RunnerConfig};
use crate::control::{Command, CommandError, Commands, Outcome, Reply, Request};
use crate::observer::Dispatcher;
use crate::runner::{Projection, RunEnd, Runner, FIRST_RETRY};
use crate::source::Source;
use crate::store::{AdminAction, ProjectionStatus, Store, StoreError};

/// How often a standby instance tries to take a projection over (and reads its checkpoint).
const STANDBY_POLL: Duration = Duration::from_millis(500);

/// How often the running instance looks for commands queued by other instances.
const COMMAND_POLL: Duration = Duration::from_millis(500);

/// Commands waiting for a supervisor, at most.
const QUEUE: usize = 16;

/// A running projection as the registry holds it: what it is, and where to send commands.
pub struct Supervised {
    pub projection: Arc<Projection>,
    commands: mpsc::Sender<Request>,
    /// Stops this supervisor alone (a version retired or removed while the host runs).
    stop: watch::Sender<bool>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Supervised {
    /// Stops the supervisor (its runner between two batches) and waits until it has.
    pub async fn stop(&self) {
        let _ = self.stop.send(true);
        self.stopped().await;
    }

    /// Waits until the supervisor has stopped (on shutdown, or after [`Supervised::stop`]).
    pub async fn stopped(&self) {
        let task = self
            .task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// Sends a command and waits for its answer, at most `timeout`.
    pub async fn send(&self, command: Command, timeout: Duration) -> Reply {
        let (request, answer) = Request::new(command);
        let seconds = timeout.as_secs().max(1);
        let gone = || CommandError::unavailable("the projection's supervisor has stopped");
        tokio::time::timeout(timeout, async {
            self.commands.send(request).await.map_err(|_| gone())?;
            answer.await.map_err(|_| gone())?
        })
        .await
        .unwrap_or(Err(CommandError::Timeout { seconds }))
    }
}

/// Starts supervising `projection` until `shutdown` (or [`Supervised::stop`]); the handle for
/// the registry.
/// An observer's actions are delivered by a dispatcher beside its runner (`delivery`: how).
pub fn spawn(
    projection: Arc<Projection>,
    store: Arc<dyn Store>,
    source: Arc<dyn Source>,
    config: RunnerConfig,
    delivery: Option<DeliveryConfig>,
    mut shutdown: watch::Receiver<bool>,
) -> Arc<Supervised> {
    let (stop, stopping) = watch::channel(false);
    let relay = stop.clone();
    tokio::spawn(async move {
        loop {
            if *shutdown.borrow_and_update() {
                let _ = relay.send(true);
                return;
            }
            tokio::select! {
                changed = shutdown.changed() => if changed.is_err() {
                    let _ = relay.send(true);
                    return;
                },
                _ = relay.closed() => return,
            }
        }
    });
    let (tx, rx) = mpsc::channel(QUEUE);
    let rx: Commands = Arc::new(tokio::sync::Mutex::new(rx));
    let supervisor = Supervisor {
        projection: projection.clone(),
        store,
        source,
        config,
        delivery,
        own: tx.clone(),
    };
    // Every line its runner and dispatcher log names the projection and version (the JSON log
    // carries the span's fields on each line).
    let span = tracing::info_span!(
        "projection",
        projection = %projection.name(),
        version = %projection.descriptor().version
    );
    let task = tokio::spawn(tracing::Instrument::instrument(
        supervisor.run(rx, stopping),
        span,
    ));
    Arc::new(Supervised {
        projection,
        commands: tx,
        stop,
        task: std::sync::Mutex::new(Some(task)),
    })
}

/// Stops a dispatcher when dropped; it finishes the attempts in flight on its own.
struct DispatchGuard {
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for DispatchGuard {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        drop(self.task.take());
    }
}

struct Supervisor {
    projection: Arc<Projection>,
    store: Arc<dyn Store>,
    source: Arc<dyn Source>,
    config: RunnerConfig,
    delivery: Option<DeliveryConfig>,
    /// Its own queue, for commands that arrive through the store.
    own: mpsc::Sender<Request>,
}

impl Supervisor {
    async fn run(self, commands: Commands, mut shutdown: watch::Receiver<bool>) {
        let name = self.projection.name().to_owned();
        // Per version: a rebuild may run on another instance than the version that serves.
        let lease = format!("{name}@{}", self.projection.descriptor().version);
        let mut standing_by = false;
        let mut backoff = FIRST_RETRY;
        let max_backoff = Duration::from_millis(self.config.max_retry_backoff_ms).max(FIRST_RETRY);
        while !*shutdown.borrow() {
            let taken = async {
                match self.store.try_lease(&lease).await? {
                    Some(lease) => Ok(Some((
                        lease,
                        self.store.checkpoint(self.projection.descriptor()).await?,
                    ))),
                    None => Ok::<_, StoreError>(None),
                }
            };
            let pause = match taken.await {
                Ok(Some((mut lease, checkpoint))) => {
                    backoff = FIRST_RETRY;
                    if std::mem::take(&mut standing_by) {
                        tracing::info!(projection = %name, checkpoint, "lease taken: this instance runs the projection now");
                    }
                    match self
                        .hold(checkpoint, &mut lease, &commands, &mut shutdown)
                        .await
                    {
                        Held::Shutdown => return,
                        Held::Lost => {
                            tracing::warn!(projection = %name, "lease lost: standing by");
                            standing_by = true;
                            STANDBY_POLL
                        }
                    }
                }
                Ok(None) => {
                    backoff = FIRST_RETRY;
                    self.projection.stand_by();
                    if !standing_by {
                        tracing::info!(projection = %name, "another instance runs this projection: standing by");
                        standing_by = true;
                    }
                    match self.store.checkpoint(self.projection.descriptor()).await {
                        Ok(checkpoint) => self.projection.follow(checkpoint),
                        Err(err) => self
                            .projection
                            .update_health(|h| h.retrying = Some(err.to_string())),
                    }
                    STANDBY_POLL
                }
                Err(err) => {
                    tracing::warn!(projection = %name, error = %err, retry_in_ms = backoff.as_millis() as u64, "cannot take the projection's lease, retrying");
                    self.projection
                        .update_health(|h| h.retrying = Some(err.to_string()));
                    let pause = backoff;
                    backoff = (backoff * 2).min(max_backoff);
                    pause
                }
            };
            // Standing by: commands go to the instance that runs the projection.
            let wait = tokio::time::sleep(pause);
            tokio::pin!(wait);
            let mut commands = commands.lock().await;
            loop {
                tokio::select! {
                    _ = &mut wait => break,
                    request = commands.recv() => match request {
                        Some(request) => self.forward(request),
                        None => return,
                    },
                    changed = shutdown.changed() => if changed.is_err() || *shutdown.borrow() { return },
                }
            }
        }
    }

    /// Runs the projection while the lease is held: again after a restart command; waiting
    /// for an operator after a failure (another instance would fail on the same event).
    async fn hold(
        &self,
        mut checkpoint: u64,
        lease: &mut crate::store::Lease,
        commands: &Commands,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Held {
        // A future of its own, polled beside the others: a queue read that waits on a database
        // that is down must not keep the supervisor from seeing the lease go.
        let polling = self.poll_queue();
        tokio::pin!(polling);
        // An observer's deliveries go on while its runner restarts or waits for an operator:
        // the actions it logged are not the failed event's.
        let _dispatching = self.dispatch();
        loop {
            self.projection.resume_at(checkpoint);
            let (stop_tx, stop_rx) = watch::channel(false);
            let runner = Runner::new(
                self.projection.clone(),
                self.store.clone(),
                self.source.clone(),
                self.config.clone(),
            );
            let run = runner.run_supervised(stop_rx, commands.clone());
            tokio::pin!(run);
            let end = loop {
                tokio::select! {
                    ended = &mut run => break ended,
                    _ = lease.lost() => {
                        let _ = stop_tx.send(true);
                        run.await;
                        return Held::Lost;
                    }
                    changed = shutdown.changed() => if changed.is_err() || *shutdown.borrow() {
                        let _ = stop_tx.send(true);
                        run.await;
                        return Held::Shutdown;
                    },
                    _ = &mut polling => {}
                }
            };
            match end {
                RunEnd::Stopped => return Held::Shutdown,
                RunEnd::Fenced => return Held::Lost,
                RunEnd::Restart => {}
                RunEnd::Failed => {
                    // Waits for an operator: restart runs it again.
                    let mut commands = commands.lock().await;
                    loop {
                        tokio::select! {
                            request = commands.recv() => match request {
                                Some(request) => if self.while_failed(request).await { break },
                                None => return Held::Shutdown,
                            },
                            _ = lease.lost() => return Held::Lost,
                            changed = shutdown.changed() => if changed.is_err() || *shutdown.borrow() {
                                return Held::Shutdown;
                            },
                            _ = &mut polling => {}
                        }
                    }
                }
            }
            checkpoint = match self.store.checkpoint(self.projection.descriptor()).await {
                Ok(checkpoint) => checkpoint,
                Err(_) => self.projection.checkpoint(),
            };
            if self.projection.is_building() {
                continue;
            }
            if let Err(err) = self
                .store
                .set_status(self.projection.name(), ProjectionStatus::Running, None)
                .await
            {
                tracing::warn!(projection = %self.projection.name(), error = %err, "could not record the restart");
            }
        }
    }

    /// Starts the observer's dispatcher; it stops when the guard is dropped.
    fn dispatch(&self) -> Option<DispatchGuard> {
        let delivery = self.delivery.clone()?;
        if !self.projection.is_observer() {
            return None;
        }
        let dispatcher = match Dispatcher::new(
            self.projection.clone(),
            self.store.clone(),
            self.source.clone(),
            delivery,
        ) {
            Ok(dispatcher) => dispatcher,
            Err(err) => {
                tracing::error!(observer = %self.projection.name(), error = %err, "cannot build the observer's HTTP client: its actions are not delivered");
                return None;
            }
        };
        let (stop, stopping) = watch::channel(false);
        let task = tokio::spawn(tracing::Instrument::instrument(
            dispatcher.run(stopping),
            tracing::Span::current(),
        ));
        Some(DispatchGuard {
            stop,
            task: Some(task),
        })
    }

    /// A command for a failed projection; `true` when it is to run again.
    async fn while_failed(&self, request: Request) -> bool {
        let reason = self.projection.health().error.unwrap_or_default();
        match request.command {
            Command::Restart => {
                record(
                    self.store.as_ref(),
                    &self.projection,
                    &request.command,
                    "restarted after a failure",
                )
                .await;
                tracing::info!(projection = %self.projection.name(), "restarting a failed projection");
                request.answer(Ok(Outcome {
                    status: "running".into(),
                    message: format!("{} restarts from its checkpoint", self.projection.name()),
                    ..Outcome::default()
                }));
                true
            }
            Command::Pause | Command::Resume => {
                let reply = set_paused(self.store.as_ref(), &self.projection, &request.command)
                    .await
                    .map(|paused| Outcome {
                        status: "failed".into(),
                        message: format!(
                            "{}; it stays failed until restarted",
                            if paused { "paused" } else { "resumed" }
                        ),
                        ..Outcome::default()
                    });
                request.answer(reply);
                false
            }
            Command::Retry { .. } | Command::Skip { .. } | Command::Reset { .. } => {
                request.answer(Err(CommandError::Failed { reason }));
                false
            }
        }
    }

    /// Takes queued commands every [`COMMAND_POLL`], forever.
    async fn poll_queue(&self) {
        let mut every = tokio::time::interval(COMMAND_POLL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            self.take_queued().await;
        }
    }

    /// Commands other instances queued for this one: each goes through the local queue, and
    /// its answer back to the store.
    async fn take_queued(&self) {
        let queued = match self.store.pending_commands(self.projection.name()).await {
            Ok(queued) => queued,
            Err(err) => {
                tracing::debug!(projection = %self.projection.name(), error = %err, "cannot read queued commands");
                return;
            }
        };
        for (id, text) in queued {
            let reply: Reply = match serde_json::from_str::<Command>(&text) {
                Ok(command) => {
                    let (request, answer) = Request::new(command);
                    // Claimed first: only the instance whose claim lands runs it, and the next
                    // poll does not run it twice.
                    let placeholder = serde_json::json!({"pending": true}).to_string();
                    if !matches!(
                        self.store.answer_command(id, &placeholder, true).await,
                        Ok(true)
                    ) {
                        continue;
                    }
                    if self.own.try_send(request).is_err() {
                        Err(CommandError::unavailable("the command queue is full"))
                    } else {
                        let store = self.store.clone();
                        tokio::spawn(async move {
                            let reply = answer.await.unwrap_or_else(|_| {
                                Err(CommandError::unavailable("the runner stopped"))
                            });
                            answer_in_store(store.as_ref(), id, &reply).await;
                        });
                        continue;
                    }
                }
                Err(err) => Err(CommandError::unavailable(format!(
                    "unreadable queued command: {err}"
                ))),
            };
            answer_in_store(self.store.as_ref(), id, &reply).await;
        }
    }

    /// Standing by: queues the command for the instance that runs the projection and waits
    /// for its answer.
    fn forward(&self, request: Request) {
        let store = self.store.clone();
        let name = self.projection.name().to_owned();
        tokio::spawn(async move {
            let reply = forward(store.as_ref(), &name, &request.command).await;
            request.answer(reply);
        });
    }
}

/// Records an operator's action that commits nothing else (pause, resume, restart).
pub(crate) async fn record(
    store: &dyn Store,
    projection: &Projection,
    command: &Command,
    outcome: &str,
) {
    let action = AdminAction {
        action: command.name().into(),
        target: command.target(),
        at: crate::store::now_ms(),
        outcome: outcome.into(),
    };
    if let Err(err) = store.record_action(projection.descriptor(), &action).await {
        tracing::warn!(projection = %projection.name(), error = %err, "could not record an admin action");
    }
}

/// Keeps the pause flag a pause or resume command sets, and records it; whether paused.
pub(crate) async fn set_paused(
    store: &dyn Store,
    projection: &Projection,
    command: &Command,
) -> Result<bool, CommandError> {
    let paused = *command == Command::Pause;
    store
        .set_paused(projection.name(), paused)
        .await
        .map_err(CommandError::unavailable)?;
    record(
        store,
        projection,
        command,
        if paused { "paused" } else { "resumed" },
    )
    .await;
    Ok(paused)
}

/// How long a forwarded command may wait for the running instance's answer.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(60);

async fn forward(store: &dyn Store, projection: &str, command: &Command) -> Reply {
    let text = serde_json::to_string(command)
        .map_err(|e| CommandError::unavailable(format!("encoding the command: {e}")))?;
    let id = store
        .submit_command(projection, &text)
        .await
        .map_err(|e| CommandError::unavailable(e.to_string()))?;
    tracing::info!(projection, command = ?command, id, "command queued for the instance that runs the projection");
    let deadline = tokio::time::Instant::now() + FORWARD_TIMEOUT;
    let mut every = tokio::time::interval(Duration::from_millis(100));
    loop {
        every.tick().await;
        if tokio::time::Instant::now() > deadline {
            let timeout = CommandError::Timeout {
                seconds: FORWARD_TIMEOUT.as_secs(),
            };
            // Cancelled unless an instance has taken it: a command nobody ran in time must not
            // run later, when whoever asked has been told it timed out.
            let cancelled = serde_json::to_string(&Reply::Err(timeout.clone()))
                .map_err(CommandError::unavailable)?;
            match store.answer_command(id, &cancelled, true).await {
                Ok(false) => {} // taken meanwhile: its answer comes
                _ => return Err(timeout),
            }
        }
        match store.command_answer(id).await {
            Ok(Some(answer)) => match serde_json::from_str::<Answer>(&answer) {
                Ok(Answer::Done(reply)) => return reply,
                Ok(Answer::Pending { .. }) => {}
                Err(err) => {
                    return Err(CommandError::unavailable(format!(
                        "unreadable answer: {err}"
                    )))
                }
            },
            Ok(None) => {}
            Err(err) => return Err(CommandError::unavailable(err.to_string())),
        }
    }
}

/// A queued command's answer as stored: taken and running, or done.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum Answer {
    Pending { pending: bool },
    Done(Reply),
}

async fn answer_in_store(store: &dyn Store, id: i64, reply: &Reply) {
    let text = serde_json::to_string(reply).unwrap_or_else(|e| {
        serde_json::json!({"Err": {"error": "unavailable", "message": e.to_string()}}).to_string()
    });
    if let Err(err) = store.answer_command(id, &text, false).await {
        tracing::warn!(id, error = %err, "cannot answer a queued command");
    }
}

enum Held {
    Shutdown,
    Lost,
}
