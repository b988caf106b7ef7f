//! What operators can ask of a projection, and how the answer comes back. The admin API sends
//! a [`Command`] to the projection's supervisor and waits for the reply; it never reaches into
//! a runner's state. The same values travel between instances as JSON (see
//! [`crate::supervisor`]), so a command reaches whichever instance runs the projection.

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// An operator's command to one projection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    /// Stop reading events (kept across restarts) until resumed.
    Pause,
    Resume,
    /// Start the runner again: a failed projection runs again from its checkpoint.
    Restart,
    /// Run the dead letter at `position` and the events parked behind it again, in order.
    Retry {
        position: u64,
    },
    /// Mark the dead letter at `position` skipped and apply the events parked behind it.
    Skip {
        position: u64,
    },
    /// An observer's checkpoint moved to `position` (0: the start): it observes the events
    /// after it again. The actions it decides again are logged already and not delivered twice.
    Reset {
        position: u64,
    },
}

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Restart => "restart",
            Self::Retry { .. } => "retry",
            Self::Skip { .. } => "skip",
            Self::Reset { .. } => "reset",
        }
    }

    /// The dead letter it acts on, if any.
    pub fn target(&self) -> Option<u64> {
        match self {
            Self::Retry { position } | Self::Skip { position } => Some(*position),
            _ => None,
        }
    }
}

/// What a command did, in words and figures.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Outcome {
    /// The projection's status afterwards (`running`, `paused`, ...).
    pub status: String,
    /// What happened, for a person.
    pub message: String,
    /// Events applied by a retry or skip.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied: Option<u64>,
    /// The dead letter a retry or skip left open, when an event failed again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<u64>,
}

/// Why a command was not carried out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "error", rename_all = "snake_case")]
pub enum CommandError {
    #[error("no dead letter at position {position}")]
    UnknownDeadLetter { position: u64 },
    #[error("the dead letter at position {position} was {state} already")]
    NotOpen { position: u64, state: String },
    #[error(
        "the event at position {position} is parked behind the dead letter at {behind}: retry or skip that one"
    )]
    Parked { position: u64, behind: u64 },
    #[error("the projection has failed ({reason}); restart it first")]
    Failed { reason: String },
    #[error("the projection is {status}; {hint}")]
    WrongState { status: String, hint: String },
    #[error("no instance answered within {seconds} s (is one running the projection?)")]
    Timeout { seconds: u64 },
    #[error("{message}")]
    Unavailable { message: String },
}

impl CommandError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::UnknownDeadLetter { .. } => StatusCode::NOT_FOUND,
            Self::NotOpen { .. }
            | Self::Parked { .. }
            | Self::Failed { .. }
            | Self::WrongState { .. } => StatusCode::CONFLICT,
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::UnknownDeadLetter { .. } => "unknown_dead_letter",
            Self::NotOpen { .. } => "dead_letter_resolved",
            Self::Parked { .. } => "parked_behind",
            Self::Failed { .. } => "projection_failed",
            Self::WrongState { .. } => "wrong_state",
            Self::Timeout { .. } => "command_timeout",
            Self::Unavailable { .. } => "unavailable",
        }
    }

    /// Not carried out for a reason of ours (the database, a stopping runner).
    pub fn unavailable(message: impl std::fmt::Display) -> Self {
        Self::Unavailable {
            message: message.to_string(),
        }
    }
}

pub type Reply = Result<Outcome, CommandError>;

/// Where a supervisor's commands arrive; the runner holds it while it runs, the supervisor
/// when no runner does (a panicking runner lets go of it as it unwinds).
pub type Commands = std::sync::Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Request>>>;

/// A command on its way to a supervisor, with where to send the reply.
#[derive(Debug)]
pub struct Request {
    pub command: Command,
    pub reply: oneshot::Sender<Reply>,
}

impl Request {
    pub fn new(command: Command) -> (Self, oneshot::Receiver<Reply>) {
        let (reply, answer) = oneshot::channel();
        (Self { command, reply }, answer)
    }

    pub fn answer(self, reply: Reply) {
        // The asker may have given up waiting; the command was carried out all the same.
        let _ = self.reply.send(reply);
    }
}
