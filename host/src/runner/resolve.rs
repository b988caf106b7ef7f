//! An operator's retry or skip of a dead letter: the runner runs the letter's event (retry)
//! and the events parked behind it again, in order, with the plugin loaded now, and commits
//! the documents, the letters' new states and the action with an unchanged checkpoint — in one
//! transaction, so a crash leaves the state before or after, never half.

use super::{Pipeline, Problem, Runner};
use crate::control::{CommandError, Outcome};
use crate::event::Event;
use crate::metrics::ProjectionMetrics;
use crate::store::{AdminAction, Batch, DeadLetter, LetterKind, LetterState};

impl Runner {
    pub(super) async fn resolve(
        &self,
        p: &mut Pipeline,
        position: u64,
        skip: bool,
    ) -> Result<Outcome, CommandError> {
        let action = if skip { "skip" } else { "retry" };
        let descriptor = self.projection.descriptor();
        let unavailable = |err: &dyn std::fmt::Display| CommandError::unavailable(err);
        let letter = self
            .store
            .dead_letter(descriptor, position)
            .await
            .map_err(|e| unavailable(&e))?
            .ok_or(CommandError::UnknownDeadLetter { position })?;
        if !letter.is_open() {
            return Err(CommandError::NotOpen {
                position,
                state: letter.state.as_str().into(),
            });
        }
        if let Some(behind) = letter.parked_behind {
            return Err(CommandError::Parked { position, behind });
        }
        let parked_events = self
            .store
            .parked_behind(descriptor, position)
            .await
            .map_err(|e| unavailable(&e))?;
        // The events to run again, in order. A row without its event (a malformed row, or a
        // letter written before events were kept) is read again from the source; one still
        // malformed blocks the stream anew: it becomes the head, the rest stay parked behind it.
        let mut events: Vec<Event> = Vec::with_capacity(parked_events.len() + 1);
        let mut held: Vec<DeadLetter> = Vec::new();
        let mut blocked_at: Option<u64> = None;
        let candidates = (!skip)
            .then_some(&letter)
            .into_iter()
            .chain(parked_events.iter());
        for candidate in candidates {
            if let Some(head) = blocked_at {
                let mut parked = candidate.clone();
                parked.parked_behind = Some(head);
                parked.kind = LetterKind::Parked;
                parked.reason = format!("parked behind the dead letter at position {head}");
                held.push(parked);
                continue;
            }
            let event = match &candidate.event {
                Some(event) => event.clone(),
                None => match self.reread(candidate.position).await? {
                    Ok(event) => event,
                    Err(reason) => {
                        let mut head = candidate.clone();
                        head.reason = reason;
                        head.kind = LetterKind::Malformed;
                        head.parked_behind = None;
                        held.push(head);
                        blocked_at = Some(candidate.position);
                        continue;
                    }
                },
            };
            // A row read again may be of a type this projection does not take: passed by.
            if self
                .projection
                .descriptor()
                .subscribes_to(&event.event_type)
            {
                events.push(event);
            }
        }
        tracing::info!(projection = %self.projection.name(), position, action, events = events.len(), "running a dead letter's stream again");

        // The stream is not parked while its events run again; isolation parks it anew if one
        // of them fails.
        if let Some(stream) = &letter.stream {
            p.parked.remove(stream);
        }
        let mut output = crate::runtime::BatchOutput::default();
        let mut letters: Vec<DeadLetter> = Vec::new();
        if !events.is_empty() {
            ProjectionMetrics::add(&self.projection.metrics.events, events.len() as u64);
            match self.call(events, None).await {
                Ok(out) => output = out,
                Err((Problem::Plugin(failure), back)) => {
                    let isolated = self
                        .isolate(back, failure, &mut p.parked)
                        .await
                        .map_err(|e| self.unparked_again(p, &letter, e))?;
                    output = isolated.output;
                    letters = isolated.letters;
                }
                Err((problem, _)) => return Err(self.unparked_again(p, &letter, problem)),
            }
        }
        if let Some(blocker) = blocked_at {
            // An event before the blocking row failed: that is the stream's head now.
            let earlier = letters
                .iter()
                .find(|l| l.parked_behind.is_none() && l.kind != LetterKind::Parked)
                .map(|l| l.position);
            match earlier {
                Some(head) => {
                    for letter in &mut held {
                        letter.parked_behind = Some(head);
                        letter.kind = LetterKind::Parked;
                        letter.reason = format!("parked behind the dead letter at position {head}");
                    }
                }
                None => {
                    if let Some(stream) = &letter.stream {
                        p.parked.insert(stream.clone(), blocker);
                    }
                }
            }
            letters.extend(held);
        }
        let failed_again = letters.iter().any(|l| l.position == position);
        let released: Vec<u64> = parked_events
            .iter()
            .map(|l| l.position)
            .filter(|pos| !letters.iter().any(|l| l.position == *pos))
            .collect();
        let applied = released.len() as u64 + u64::from(!skip && !failed_again);
        let head = letters
            .iter()
            .filter(|l| l.kind != LetterKind::Parked && l.parked_behind.is_none())
            .map(|l| l.position)
            .min();
        let outcome_text = match head {
            Some(at) if at == position => format!(
                "failed again: {}",
                letters
                    .iter()
                    .find(|l| l.position == at)
                    .map_or("", |l| l.reason.as_str())
            ),
            Some(at) => format!("applied {applied} events; the event at {at} failed"),
            None => format!("applied {applied} events; stream unparked"),
        };
        let actions = [AdminAction {
            action: action.into(),
            target: Some(position),
            at: crate::store::now_ms(),
            outcome: outcome_text.clone(),
        }];
        let checkpoint = self.projection.checkpoint();
        let batch = Batch {
            output: &output,
            dead_letters: &letters,
            released: &released,
            resolved: (!failed_again).then_some((
                position,
                if skip {
                    LetterState::Skipped
                } else {
                    LetterState::Retried
                },
            )),
            actions: &actions,
            from: checkpoint,
            to: checkpoint,
            durable: true,
        };
        let (_, mut once) = tokio::sync::watch::channel(false);
        if let Err(end) = self.commit_batch(&batch, &mut p.backoff, &mut once).await {
            // Not committed: the state is as before.
            if let Some(stream) = &letter.stream {
                p.parked.insert(stream.clone(), position);
            }
            return Err(CommandError::unavailable(format!(
                "the {action} was not committed ({end:?}); nothing changed"
            )));
        }
        self.projection
            .documents
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .apply(&output, self.config.cached_documents);
        self.refresh_parked_gauges().await;
        tracing::info!(projection = %self.projection.name(), position, action, outcome = %outcome_text, "dead letter acted on");
        Ok(Outcome {
            status: self.projection.status().as_str().into(),
            message: outcome_text,
            applied: Some(applied),
            dead_letter: head,
        })
    }

    /// An isolation or call that could not finish: the stream stays parked as it was.
    fn unparked_again(
        &self,
        p: &mut Pipeline,
        letter: &DeadLetter,
        problem: Problem,
    ) -> CommandError {
        if let Some(stream) = &letter.stream {
            p.parked.insert(stream.clone(), letter.position);
        }
        CommandError::unavailable(match problem {
            Problem::Host(e) | Problem::Fatal(e) => format!("nothing changed: {e}"),
            Problem::Plugin(f) => format!("nothing changed: {}", f.reason),
            Problem::Malformed { letter, .. } => format!("nothing changed: {}", letter.reason),
        })
    }

    /// The outbox row at `position`, read again; the inner `Err` with the reason if it is
    /// still malformed or gone.
    async fn reread(&self, position: u64) -> Result<Result<Event, String>, CommandError> {
        match self
            .source
            .read(position.saturating_sub(1), 1, usize::MAX)
            .await
        {
            Ok(events) => Ok(match events.into_iter().next() {
                Some(event) if event.position == position => Ok(event),
                _ => Err(format!("the outbox row at position {position} is gone")),
            }),
            Err(err @ crate::source::SourceError::Malformed { .. }) => Ok(Err(err.to_string())),
            Err(err) => Err(CommandError::unavailable(err.to_string())),
        }
    }

    async fn refresh_parked_gauges(&self) {
        if let Ok(parked) = self.store.parked(self.projection.descriptor()).await {
            let metrics = &self.projection.metrics;
            ProjectionMetrics::set(&metrics.parked_streams, parked.len() as u64);
            ProjectionMetrics::set(
                &metrics.parked_events,
                parked.iter().map(|p| p.events).sum(),
            );
        }
    }
}
