//! Group commit for appends, for either outbox.
//!
//! One task owns a source's appends. It takes the first request waiting, and with it every
//! request that arrived while the previous group was being written (up to
//! [`MAX_GROUP_EVENTS`]), and hands them to the source's writer as one group. Nothing waits for
//! a group to fill: an append alone is written at once; under load, requests pile up during one
//! write and go together in the next, so the cost of a transaction (its round trips, its WAL
//! flush, on PostgreSQL the time its id holds the outbox's watermark) is shared by all of them.
//! Each request keeps its own checks and its own answer; the writer answers each after the
//! group's transaction is durable. A caller that goes away is answered by nobody, and its
//! events are written all the same, as they would have been by an append in flight.

use std::future::Future;

use tokio::sync::{mpsc, oneshot};

use super::{AppendError, Appended, NewEvent, SourceError};

/// Most events written in one group.
pub const MAX_GROUP_EVENTS: usize = 10_000;

/// Append requests waiting for the writer; more wait for room (none is refused for want of
/// it).
const QUEUED: usize = 4096;

/// One append: its events, and where its own answer goes.
pub struct Request {
    pub events: Vec<NewEvent>,
    pub reply: oneshot::Sender<Result<Vec<Appended>, AppendError>>,
}

impl Request {
    pub fn answer(self, outcome: Result<Vec<Appended>, AppendError>) {
        let _ = self.reply.send(outcome);
    }
}

/// Where appends are sent.
#[derive(Clone)]
pub struct Appends(mpsc::Sender<Request>);

impl Appends {
    /// Starts the task that hands groups to `write`, which answers every request it is given.
    /// The task ends when the last `Appends` is dropped.
    pub fn start<W, F>(mut write: W) -> Self
    where
        W: FnMut(Vec<Request>) -> F + Send + 'static,
        F: Future<Output = ()> + Send,
    {
        let (sender, mut requests) = mpsc::channel::<Request>(QUEUED);
        tokio::spawn(async move {
            while let Some(first) = requests.recv().await {
                let mut events = first.events.len();
                let mut group = vec![first];
                while events < MAX_GROUP_EVENTS {
                    match requests.try_recv() {
                        Ok(next) => {
                            events += next.events.len();
                            group.push(next);
                        }
                        Err(_) => break,
                    }
                }
                write(group).await;
            }
        });
        Self(sender)
    }

    /// Appends `events` (validated already) with the next group; their answer.
    pub async fn append(&self, events: Vec<NewEvent>) -> Result<Vec<Appended>, AppendError> {
        let stopped =
            || AppendError::Source(SourceError::Setup("the append writer stopped".into()));
        let (reply, answer) = oneshot::channel();
        self.0
            .send(Request { events, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}
