//! Finding the event a failed batch failed on, without giving up the rest of the batch.
//!
//! When a call fails by the plugin's fault, the runner knows one of three things:
//! - the plugin named the event (an error it returned, a panic): the events before it are run
//!   again and kept, the event becomes a dead letter, the events after it are run on;
//! - the host knows where the call was when a limit cut it short (the deadline, the memory or
//!   output cap, a trap): the same, except that the event is first run alone, since a limit can
//!   be reached by many events together; only if it fails alone is it the culprit;
//! - nothing (a plugin on the 0.1.0 contract, a document the stores cannot keep): the batch is
//!   halved until the culprit is alone.
//!
//! Each sub-batch is a fresh plugin instance that sees the documents written by the sub-batches
//! before it, so every event is applied exactly once, in order. Once an event is dead-lettered
//! its stream is parked: its later events are set aside in order, never run past it.

use std::sync::Arc;

use super::{parked_letter, Parked, PluginFailure, Problem, Runner};
use crate::event::Event;
use crate::metrics::ProjectionMetrics;
use crate::runtime::BatchOutput;
use crate::store::{DeadLetter, LetterKind, LetterState};

/// What an isolation kept and set aside.
#[derive(Default)]
pub(super) struct Isolated {
    /// The documents of every event that succeeded, later writes over earlier ones; an
    /// observer's actions, in event order.
    pub output: BatchOutput,
    /// Culprits and the events parked behind them.
    pub letters: Vec<DeadLetter>,
}

impl Isolated {
    fn keep(&mut self, output: BatchOutput) {
        for (collection, writes) in output.writes {
            self.output
                .writes
                .entry(collection)
                .or_default()
                .extend(writes);
        }
        if !output.actions.is_empty() {
            self.output.actions.extend(output.actions);
            // Sub-batches run in position order, but the log must be in event order whatever
            // the split.
            self.output.actions.sort_by_key(|a| a.position);
        }
    }
}

/// Culprits one batch may have before the runner stops the projection instead: a plugin that
/// fails on every event (a bad deploy) should halt, not park every stream.
const MAX_CULPRITS: usize = 50;

/// Calls of one isolation that may run into the deadline (each costs a whole deadline) before
/// the projection is stopped instead: finding a culprit by halving a batch whose calls time out
/// (a plugin on contract 0.1.0) would cost a deadline per step.
const MAX_TIMEOUTS: usize = 6;

/// Work left, run from the back.
enum Step {
    /// Run these events; `failed`: how a call on exactly these events already failed.
    Run(Vec<Event>, Option<PluginFailure>),
    /// The plugin named this event as failing.
    Blame(Event, String),
    /// A limit cut the call short on this event: run it alone to be sure.
    Confirm(Event, String),
}

impl Runner {
    /// Runs `events` (whose call failed with `failure`) as sub-batches until every event is
    /// applied or set aside. `parked` gains the streams of the culprits. Host faults end the
    /// isolation: the whole batch is retried after the pause.
    pub(super) async fn isolate(
        &self,
        events: Vec<Event>,
        failure: PluginFailure,
        parked: &mut Parked,
    ) -> Result<Isolated, Problem> {
        let name = self.projection.name().to_owned();
        let start = std::time::Instant::now();
        let batch = events.len();
        tracing::warn!(projection = %name, events = batch, at = ?failure.at, reason = %failure.reason, "batch failed by the plugin's fault: isolating the event");
        let mut done = Isolated::default();
        let mut calls = 0u64;
        let mut timeouts = usize::from(failure.timed_out);
        let mut culprits = 0usize;
        let mut work = vec![Step::Run(events, Some(failure))];
        while let Some(step) = work.pop() {
            if self.stopping() {
                ProjectionMetrics::add(&self.projection.metrics.isolation_calls, calls);
                return Err(Problem::Host(
                    "stopping in the middle of an isolation: the batch is handled again".into(),
                ));
            }
            if timeouts > MAX_TIMEOUTS || culprits > MAX_CULPRITS {
                ProjectionMetrics::add(&self.projection.metrics.isolation_calls, calls);
                let last = done
                    .letters
                    .iter()
                    .rev()
                    .find(|l| l.kind == LetterKind::Plugin)
                    .map_or("", |l| l.reason.as_str());
                return Err(Problem::Fatal(format!(
                    "the plugin failed on more events of one batch than isolation handles \
                     ({culprits} set aside, {timeouts} calls past the deadline; the last: {last}): \
                     stopped rather than park stream after stream. Fix the plugin, then restart \
                     the projection"
                )));
            }
            match step {
                Step::Run(mut events, failed) => {
                    let before = events.len();
                    events.retain(|e| match parked.get(&e.stream) {
                        Some(&behind) => {
                            done.letters.push(parked_letter(e, behind));
                            false
                        }
                        None => true,
                    });
                    if events.is_empty() {
                        continue;
                    }
                    // A known failure holds for exactly the events it was seen on.
                    let failure = match failed.filter(|_| events.len() == before) {
                        Some(failure) => failure,
                        None => {
                            calls += 1;
                            match self.call(events, Some(Arc::new(done.output.clone()))).await {
                                Ok(output) => {
                                    done.keep(output);
                                    continue;
                                }
                                Err((Problem::Plugin(failure), back)) => {
                                    timeouts += usize::from(failure.timed_out);
                                    events = back;
                                    failure
                                }
                                Err((problem, _)) => return Err(problem),
                            }
                        }
                    };
                    match failure.at.filter(|&i| i < events.len()) {
                        Some(i) => {
                            let after = events.split_off(i + 1);
                            let Some(culprit) = events.pop() else {
                                continue;
                            };
                            work.push(Step::Run(after, None));
                            work.push(if failure.named {
                                Step::Blame(culprit, failure.reason)
                            } else {
                                Step::Confirm(culprit, failure.reason)
                            });
                            work.push(Step::Run(events, None));
                        }
                        None if events.len() == 1 => {
                            if let Some(culprit) = events.pop() {
                                work.push(Step::Blame(culprit, failure.reason));
                            }
                        }
                        None => {
                            let second = events.split_off(events.len() / 2);
                            work.push(Step::Run(second, None));
                            work.push(Step::Run(events, None));
                        }
                    }
                }
                Step::Confirm(event, reason) => {
                    if let Some(&behind) = parked.get(&event.stream) {
                        done.letters.push(parked_letter(&event, behind));
                        continue;
                    }
                    calls += 1;
                    let alone = self
                        .call(vec![event], Some(Arc::new(done.output.clone())))
                        .await;
                    match alone {
                        // Not its fault alone: the batch reached a limit together.
                        Ok(output) => done.keep(output),
                        Err((Problem::Plugin(failure), mut back)) => {
                            match back.pop().inspect(|_| {
                                timeouts += usize::from(failure.timed_out);
                            }) {
                                Some(event) => work.push(Step::Blame(event, failure.reason)),
                                None => return Err(Problem::Fatal(reason)),
                            }
                        }
                        Err((problem, _)) => return Err(problem),
                    }
                }
                Step::Blame(event, reason) => {
                    if let Some(&behind) = parked.get(&event.stream) {
                        done.letters.push(parked_letter(&event, behind));
                        continue;
                    }
                    tracing::error!(projection = %name, position = event.position, event_id = %event.id, stream = %event.stream, reason = %reason, "event dead-lettered; its stream is parked");
                    culprits += 1;
                    parked.insert(event.stream.clone(), event.position);
                    done.letters.push(self.plugin_letter(event, reason));
                }
            }
        }
        ProjectionMetrics::add(&self.projection.metrics.isolation_calls, calls);
        tracing::info!(projection = %name, events = batch, dead_letters = done.letters.iter().filter(|l| l.kind == LetterKind::Plugin).count(), calls, ms = start.elapsed().as_millis() as u64, "isolation done");
        Ok(done)
    }

    /// The dead letter for an event the plugin failed on.
    pub(super) fn plugin_letter(&self, event: Event, reason: String) -> DeadLetter {
        DeadLetter {
            position: event.position,
            event_id: Some(event.id.clone()),
            stream: Some(event.stream.clone()),
            reason,
            parked_behind: None,
            kind: LetterKind::Plugin,
            state: LetterState::Open,
            resolved_at: None,
            plugin_version: Some(self.projection.descriptor().version.clone()),
            event: Some(event),
            actions: Vec::new(),
        }
    }
}
