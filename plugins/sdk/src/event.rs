use serde::de::DeserializeOwned;

use crate::Error;

/// One domain event (see the `event` record in `wit/plugin.wit`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    pub id: String,
    pub stream: String,
    pub stream_type: String,
    pub event_type: String,
    pub version: u64,
    pub position: u64,
    pub timestamp_ms: u64,
    /// UTF-8 JSON; decode it with [`Event::payload`].
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl Event {
    /// Decodes the JSON payload into `T`, naming the event type on failure.
    pub fn payload<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.payload)
            .map_err(|err| Error::msg(format!("invalid {} payload: {err}", self.event_type)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}
