//! Observers: react to events with side effects (a webhook, an event to append, a log line)
//! that the host carries out, never the guest. An observer only returns its actions as data;
//! the host keys each one by (observer, event id, the action's index among that event's
//! actions), so however often a batch is replayed, an action is delivered once.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{begin_event, event_failed, BatchError, Descriptor, Error, Event, Result, NO_EVENT};

/// An observer: turns events into actions for the host to carry out.
pub trait Observer {
    /// The observer's name, version and event types; its collections stay empty.
    fn describe() -> Descriptor;

    /// React to one event by adding actions. Returning an error fails the whole batch: none
    /// of its actions is carried out and the host reports this event as the culprit.
    fn on_event(event: &Event, actions: &mut Actions) -> Result<()>;
}

/// An HTTP request for the host to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Webhook {
    pub fn new(method: &str, url: &str) -> Self {
        Self {
            method: method.to_owned(),
            url: url.to_owned(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn post(url: &str) -> Self {
        Self::new("POST", url)
    }

    /// Sets a header, replacing one of the same name (compared case-insensitively, as HTTP
    /// does) so a request never carries two conflicting values.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers
            .retain(|(key, _)| !key.eq_ignore_ascii_case(name));
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// Sets the body to `value` as JSON, with `content-type: application/json`.
    pub fn json<T: Serialize + ?Sized>(self, value: &T) -> Result<Self> {
        let body = serde_json::to_vec(value)?;
        Ok(self.header("content-type", "application/json").body(body))
    }

    /// The body decoded as JSON (for tests).
    pub fn body_json<T: DeserializeOwned>(&self) -> Result<T> {
        crate::decode_json(&self.body)
            .map_err(|err| Error::msg(format!("webhook body to {}: {err}", self.url)))
    }
}

/// An event for the host to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emit {
    pub stream: String,
    pub stream_type: String,
    pub event_type: String,
    /// UTF-8 JSON; `{}` until [`Emit::json`] sets it, since every event's payload is JSON.
    pub payload: Vec<u8>,
}

impl Emit {
    pub fn new(stream: &str, stream_type: &str, event_type: &str) -> Self {
        Self {
            stream: stream.to_owned(),
            stream_type: stream_type.to_owned(),
            event_type: event_type.to_owned(),
            payload: b"{}".to_vec(),
        }
    }

    /// Sets the payload to `value` as JSON.
    pub fn json<T: Serialize + ?Sized>(mut self, value: &T) -> Result<Self> {
        self.payload = serde_json::to_vec(value)?;
        Ok(self)
    }

    /// The payload decoded as JSON (for tests).
    pub fn payload_json<T: DeserializeOwned>(&self) -> Result<T> {
        crate::decode_json(&self.payload)
            .map_err(|err| Error::msg(format!("{} payload: {err}", self.event_type)))
    }
}

/// What an action does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionKind {
    Webhook(Webhook),
    Emit(Emit),
    /// A line for the host's log.
    Log(String),
}

/// One action and the index (in the batch) of the event that caused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action {
    pub event_index: u32,
    pub kind: ActionKind,
}

/// The actions an observer adds for one event, in the order the host carries them out.
pub struct Actions<'a> {
    event_index: u32,
    actions: &'a mut Vec<Action>,
}

impl Actions<'_> {
    pub fn webhook(&mut self, webhook: Webhook) {
        self.push(ActionKind::Webhook(webhook));
    }

    pub fn emit(&mut self, emit: Emit) {
        self.push(ActionKind::Emit(emit));
    }

    pub fn log(&mut self, message: impl Into<String>) {
        self.push(ActionKind::Log(message.into()));
    }

    fn push(&mut self, kind: ActionKind) {
        self.actions.push(Action {
            event_index: self.event_index,
            kind,
        });
    }
}

/// Runs `O` over one batch: the single code path behind both the WASM export and the native
/// test harness.
pub fn run_observer_batch<O: Observer>(events: &[Event]) -> Result<Vec<Action>, BatchError> {
    let mut actions = Vec::new();
    for (index, event) in events.iter().enumerate() {
        let event_index = u32::try_from(index).unwrap_or(NO_EVENT);
        begin_event(event_index);
        let mut for_event = Actions {
            event_index,
            actions: &mut actions,
        };
        O::on_event(event, &mut for_event).map_err(|err| event_failed(index, event, &err))?;
    }
    begin_event(NO_EVENT);
    Ok(actions)
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use crate::testing::ObserverHarness;
    use crate::ActionKind;

    /// Two actions per `Twice`, one per `Once`, an error for `Fail`; ignores `Skipped`.
    struct Echo;

    impl Observer for Echo {
        fn describe() -> Descriptor {
            Descriptor::new("echo", "1.0.0").events(&["Once", "Twice", "Fail"])
        }
        fn on_event(event: &Event, actions: &mut Actions) -> Result<()> {
            match event.event_type.as_str() {
                "Fail" => return Err(Error::msg("asked to")),
                "Twice" => actions.log(format!("first {}", event.id)),
                _ => {}
            }
            actions.emit(Emit::new(&event.stream, "Echo", "Echoed"));
            Ok(())
        }
    }

    #[test]
    fn actions_carry_the_index_of_their_event_in_order() {
        let mut h = ObserverHarness::<Echo>::new();
        let batch = [
            h.event("a", "Once", serde_json::json!({})),
            h.event("a", "Skipped", serde_json::json!({})),
            h.event("b", "Twice", serde_json::json!({})),
        ];
        let actions = h.run(&batch).unwrap();
        let indexes: Vec<u32> = actions.iter().map(|a| a.event_index).collect();
        // `Skipped` never reaches the observer: `Twice` is the batch's event #1, as on the host.
        assert_eq!(indexes, [0, 1, 1]);
        assert_eq!(actions[1].kind, ActionKind::Log("first b-1".into()));
        let ActionKind::Emit(emit) = &actions[2].kind else {
            panic!("{actions:?}");
        };
        assert_eq!(
            emit.payload, b"{}",
            "an emitted event's payload is JSON even unset"
        );
    }

    #[test]
    fn an_error_fails_the_batch_naming_the_event() {
        let mut h = ObserverHarness::<Echo>::new();
        let batch = [
            h.event("a", "Once", serde_json::json!({})),
            h.event("a", "Fail", serde_json::json!({})),
        ];
        let err = h.run(&batch).unwrap_err();
        assert_eq!(err.event_index(), Some(1));
        assert_eq!(
            err.to_string(),
            "event #1: Fail (version 2 of stream a): asked to"
        );
    }

    #[test]
    fn json_sets_the_body_and_one_content_type() {
        let hook = Webhook::new("PUT", "http://x/")
            .header("Content-Type", "text/plain")
            .header("x-key", "1")
            .json(&serde_json::json!({"a": 1}))
            .unwrap();
        assert_eq!(hook.method, "PUT");
        assert_eq!(hook.body, br#"{"a":1}"#);
        let headers: Vec<(&str, &str)> = hook
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            headers,
            [("x-key", "1"), ("content-type", "application/json")]
        );
        let raw = Webhook::post("http://x/").body("plain");
        assert_eq!(
            (raw.method.as_str(), raw.body.as_slice()),
            ("POST", &b"plain"[..])
        );
    }
}
