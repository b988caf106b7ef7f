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

/// What in valid JSON text no store can take, if anything: the escape `\u0000` (PostgreSQL
/// stores no NUL character) or a `\u` escape of half a UTF-16 surrogate pair (no valid
/// Unicode; PostgreSQL's `jsonb` and Rust's JSON parsers refuse it).
pub(crate) fn unstorable_escape(json: &[u8]) -> Option<&'static str> {
    // Most documents have no backslash at all: one fast scan settles them.
    if !json.contains(&b'\\') {
        return None;
    }
    let hex = |at: usize| -> Option<u16> {
        let digits = std::str::from_utf8(json.get(at..at + 4)?).ok()?;
        u16::from_str_radix(digits, 16).ok()
    };
    let mut i = 0;
    while i < json.len() {
        if json[i] != b'\\' {
            i += 1;
            continue;
        }
        // Outside strings a backslash is not JSON; inside, it starts exactly one escape.
        if json.get(i + 1) != Some(&b'u') {
            i += 2;
            continue;
        }
        // Not four hex digits: not JSON, which the parser reports.
        match hex(i + 2)? {
            0 => return Some("a NUL character (\\u0000)"),
            0xD800..=0xDBFF => {
                let low = (json.get(i + 6..i + 8) == Some(b"\\u"))
                    .then(|| hex(i + 8))
                    .flatten();
                if !matches!(low, Some(0xDC00..=0xDFFF)) {
                    return Some("an unpaired UTF-16 surrogate escape");
                }
                i += 12;
            }
            0xDC00..=0xDFFF => return Some("an unpaired UTF-16 surrogate escape"),
            _ => i += 6,
        }
    }
    None
}
