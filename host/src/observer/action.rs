//! An observer's side effect as data: what the plugin decided, and how the action log keeps it.

use serde::{Deserialize, Serialize};

/// A side effect an observer asked for. The host executes it; the guest never does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ActionKind {
    /// An HTTP request, made by the dispatcher's pooled client.
    Webhook {
        method: String,
        url: String,
        headers: Vec<(String, String)>,
        /// Kept in the log's `body` column, not in the JSON spec.
        #[serde(skip)]
        body: Vec<u8>,
    },
    /// An event to append to the outbox, with an id derived from the action's key.
    Emit {
        stream: String,
        stream_type: String,
        event_type: String,
        /// The payload (JSON), kept in the log's `body` column.
        #[serde(skip)]
        payload: Vec<u8>,
    },
    /// A line in the host's log, tagged with the observer.
    Log { message: String },
}

impl ActionKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Webhook { .. } => "webhook",
            Self::Emit { .. } => "emit",
            Self::Log { .. } => "log",
        }
    }

    /// The bytes stored beside the spec: a webhook's body, an emit's payload.
    pub fn body(&self) -> &[u8] {
        match self {
            Self::Webhook { body, .. } => body,
            Self::Emit { payload, .. } => payload,
            Self::Log { .. } => &[],
        }
    }

    /// The spec as stored (everything but the body), and back.
    pub fn spec(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_stored(spec: &str, body: Vec<u8>) -> Result<Self, serde_json::Error> {
        let mut kind: Self = serde_json::from_str(spec)?;
        match &mut kind {
            Self::Webhook { body: b, .. } => *b = body,
            Self::Emit { payload, .. } => *payload = body,
            Self::Log { .. } => {}
        }
        Ok(kind)
    }
}

/// An action an observer decided on one event, before it is logged. Its key
/// (observer, `event_id`, `index`) is the same however often the event is observed again: the
/// log keeps the first and refuses the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decided {
    pub event_id: String,
    /// The action's index among the actions its event caused (0, 1, ...).
    pub index: u32,
    pub stream: String,
    /// The event's source position: actions of a stream are delivered in this order.
    pub position: u64,
    pub kind: ActionKind,
}

/// The idempotency key of an action: what a receiver deduplicates on.
pub fn key(observer: &str, event_id: &str, index: u32) -> String {
    format!("{observer}:{event_id}:{index}")
}

/// Where a logged action stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ActionState {
    /// Waiting for its (next) attempt.
    Pending,
    /// Delivered.
    Done,
    /// Failed permanently or ran out of attempts; its stream's later actions wait behind it.
    Dead,
    /// Passed over by an operator.
    Skipped,
}

impl ActionState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Done => "done",
            Self::Dead => "dead",
            Self::Skipped => "skipped",
        }
    }

    pub fn parse(s: &str) -> Self {
        match s {
            "done" => Self::Done,
            "dead" => Self::Dead,
            "skipped" => Self::Skipped,
            _ => Self::Pending,
        }
    }
}

/// An action as the log holds it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Logged {
    /// Log order: per stream, event order.
    pub id: i64,
    pub observer: String,
    pub key: String,
    pub event_id: String,
    pub index: u32,
    pub stream: String,
    pub position: u64,
    #[serde(flatten)]
    pub kind: ActionKind,
    pub state: ActionState,
    pub attempts: u32,
    /// When the next attempt is due (ms since the epoch).
    pub next_at: i64,
    /// The last HTTP status received, if any.
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    /// When it was logged and last changed (ms since the epoch).
    pub created_at: i64,
    pub updated_at: i64,
}

/// A change of one logged action's delivery state, written in batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub id: i64,
    pub state: ActionState,
    pub attempts: u32,
    pub next_at: i64,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
}

/// How many actions of an observer stand where.
#[derive(Debug, Clone, Copy, Default, Serialize, utoipa::ToSchema)]
pub struct Counts {
    pub pending: u64,
    pub done: u64,
    pub dead: u64,
    pub skipped: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_action_reads_back_with_its_body() {
        let kind = ActionKind::Webhook {
            method: "POST".into(),
            url: "http://h/x".into(),
            headers: vec![("a".into(), "b".into())],
            body: b"{\"x\":1}".to_vec(),
        };
        let spec = kind.spec();
        assert!(!spec.contains("body"), "{spec}");
        let back = ActionKind::from_stored(&spec, kind.body().to_vec()).unwrap();
        assert_eq!(back, kind);
    }
}
