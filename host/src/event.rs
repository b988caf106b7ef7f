//! The host's event type: what sources produce, runners batch and plugins receive.

use serde::{Deserialize, Serialize};

/// One stored event. `payload` is the event's JSON, kept as raw text so it crosses into the
/// plugin without being parsed or re-encoded by the host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub id: String,
    pub stream: String,
    #[serde(default)]
    pub stream_type: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub version: u64,
    pub position: u64,
    #[serde(default)]
    pub timestamp_ms: u64,
    pub payload: Box<serde_json::value::RawValue>,
    #[serde(default)]
    pub headers: Vec<(String, String)>,
}

impl Event {
    pub fn payload_bytes(&self) -> &[u8] {
        self.payload.get().as_bytes()
    }

    /// Approximate size in memory and on the wire, for cutting batches by bytes.
    pub fn size_hint(&self) -> usize {
        self.id.len()
            + self.stream.len()
            + self.stream_type.len()
            + self.event_type.len()
            + self.payload.get().len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
            + 64
    }
}

/// Whether JSON text holds the escape `\u0000` (not an escaped backslash followed by `u0000`).
pub(crate) fn has_nul_escape(json: &[u8]) -> bool {
    // Most documents have no backslash at all: one fast scan settles them.
    json.contains(&b'\\')
        && json.windows(6).enumerate().any(|(i, w)| {
            w == b"\\u0000" && json[..i].iter().rev().take_while(|&&b| b == b'\\').count() % 2 == 0
        })
}
