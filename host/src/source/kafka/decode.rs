//! One Kafka message from Debezium's outbox EventRouter, decoded into an event, in every shape
//! a deployment may give it (see KAFKA.md): a JSON string holding the jsonb text (decoded
//! twice), the expanded object (`table.expand.json.payload=true`), the raw jsonb text
//! (StringConverter), either inside a `{"schema", "payload"}` envelope (JsonConverter with
//! `schemas.enable=true`); keys and headers raw or JSON-quoted (JsonConverter); a tombstone.

use std::collections::BTreeMap;

use serde_json::value::RawValue;
use serde_json::Value;

use crate::config::KafkaConfig;

/// A message as it came, whatever its client.
#[derive(Debug, Clone, Default)]
pub struct Message<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub headers: Vec<(&'a str, Option<&'a [u8]>)>,
    /// The record's timestamp, ms since the epoch (when Debezium processed the change).
    pub timestamp_ms: Option<i64>,
}

/// An event decoded from a message.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub id: String,
    pub stream: String,
    pub stream_type: String,
    pub event_type: String,
    /// The payload as JSON text.
    pub payload: Box<RawValue>,
    /// From the configured version header; `None`: counted per stream by the host.
    pub version: Option<u64>,
    /// The message's headers (JSON-quoted ones unquoted), Debezium's own context left out.
    pub headers: BTreeMap<String, String>,
    pub timestamp_ms: u64,
}

impl PartialEq for Decoded {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
            && self.stream == other.stream
            && self.stream_type == other.stream_type
            && self.event_type == other.event_type
            && self.payload.get() == other.payload.get()
            && self.version == other.version
            && self.headers == other.headers
            && self.timestamp_ms == other.timestamp_ms
    }
}

/// What a message is.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoding {
    Event(Decoded),
    /// A null value: nothing to apply (counted).
    Tombstone,
    /// A message no event can be made of: set aside as a dead letter with the reason; `stream`
    /// when its key could be read (its stream is parked behind it).
    Bad {
        stream: Option<String>,
        /// The `id` header, when there is one: a read waiting for that event learns it was set
        /// aside.
        id: Option<String>,
        /// The event type, when a header names it: a projection that does not take that type
        /// passes the message by, as it would the event.
        event_type: Option<String>,
        reason: String,
    },
}

/// Where the event type and stream type come from, parsed once from the settings.
#[derive(Debug, Clone)]
pub struct Rules {
    event_type: Place,
    stream_type: Place,
    topic_prefix: String,
    version_header: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Place {
    Header(String),
    Field(String),
    Fixed(String),
    Topic,
}

impl Rules {
    pub fn new(config: &KafkaConfig) -> Result<Self, String> {
        let place = |setting: &str, value: &str, topic_ok: bool| -> Result<Place, String> {
            match value.split_once(':') {
                Some(("header", name)) if !name.is_empty() => Ok(Place::Header(name.to_owned())),
                Some(("field", name)) if !name.is_empty() => Ok(Place::Field(name.to_owned())),
                Some(("fixed", name)) if !name.is_empty() => Ok(Place::Fixed(name.to_owned())),
                None if topic_ok && value == "topic" => Ok(Place::Topic),
                _ => Err(format!(
                    "{setting} {value:?} is not header:NAME, field:NAME, fixed:VALUE{}",
                    if topic_ok { " or topic" } else { "" }
                )),
            }
        };
        Ok(Self {
            event_type: place("kafka.event_type", &config.event_type, false)?,
            stream_type: place("kafka.stream_type", &config.stream_type, true)?,
            topic_prefix: config.topic_prefix.clone(),
            version_header: Some(config.version_header.clone()).filter(|h| !h.is_empty()),
        })
    }

    pub fn decode(&self, message: &Message<'_>) -> Decoding {
        let key = message.key.map(unquote);
        let id_header = message
            .headers
            .iter()
            .find(|(name, _)| *name == "id")
            .and_then(|(_, v)| v.map(unquote))
            .filter(|id| !id.is_empty());
        let type_header = match &self.event_type {
            Place::Header(name) => message
                .headers
                .iter()
                .find(|(header, _)| header == name)
                .and_then(|(_, v)| v.map(unquote))
                .filter(|t| !t.is_empty()),
            _ => None,
        };
        let bad = |reason: String| Decoding::Bad {
            stream: key.clone().filter(|k| !k.is_empty()),
            id: id_header.clone(),
            event_type: type_header.clone(),
            reason: format!(
                "{reason} (message {}/{}@{})",
                message.topic, message.partition, message.offset
            ),
        };
        let Some(value) = message.value else {
            return Decoding::Tombstone;
        };
        let Some(stream) = key.clone().filter(|k| !k.is_empty()) else {
            return bad("the message has no key (the stream id)".into());
        };
        let headers: BTreeMap<String, String> = message
            .headers
            .iter()
            .filter_map(|(name, value)| Some(((*name).to_owned(), unquote(value.as_ref()?))))
            .collect();
        let payload = match payload(value) {
            Ok(payload) => payload,
            Err(reason) => return bad(reason),
        };
        let Some(id) = headers.get("id").filter(|id| !id.is_empty()).cloned() else {
            return bad("the message has no `id` header (the outbox row's id)".into());
        };
        let event_type = match self.find(&self.event_type, message.topic, &headers, &payload) {
            Ok(t) => t,
            Err(reason) => return bad(format!("no event type: {reason}")),
        };
        let stream_type = match self.find(&self.stream_type, message.topic, &headers, &payload) {
            Ok(t) => t,
            Err(reason) => return bad(format!("no stream type: {reason}")),
        };
        let version = match self.version_header.as_ref().and_then(|h| headers.get(h)) {
            None => None,
            Some(text) => match text.parse::<u64>() {
                Ok(v) if v > 0 => Some(v),
                _ => return bad(format!("the version header is not a version: {text:?}")),
            },
        };
        let payload = match serde_json::value::to_raw_value(&payload) {
            Ok(raw) => raw,
            Err(e) => return bad(format!("the payload cannot be kept: {e}")),
        };
        Decoding::Event(Decoded {
            id,
            stream,
            stream_type,
            event_type,
            payload,
            version,
            headers: headers
                .into_iter()
                .filter(|(name, _)| !name.starts_with("__debezium"))
                .collect(),
            timestamp_ms: message.timestamp_ms.unwrap_or(0).max(0) as u64,
        })
    }

    fn find(
        &self,
        place: &Place,
        topic: &str,
        headers: &BTreeMap<String, String>,
        payload: &Value,
    ) -> Result<String, String> {
        let found = match place {
            Place::Header(name) => headers
                .get(name)
                .cloned()
                .ok_or_else(|| format!("no header {name:?}")),
            Place::Field(name) => payload
                .get(name)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| format!("the payload has no text field {name:?}")),
            Place::Fixed(value) => Ok(value.clone()),
            Place::Topic => Ok(topic
                .strip_prefix(&self.topic_prefix)
                .unwrap_or(topic)
                .to_owned()),
        }?;
        if found.is_empty() {
            return Err("it is empty".into());
        }
        Ok(found)
    }
}

/// The payload, whatever the converter: an envelope is opened, a JSON string holding JSON is
/// decoded again (a string that holds no JSON is the payload itself: a top-level scalar).
fn payload(value: &[u8]) -> Result<Value, String> {
    let mut decoded: Value = serde_json::from_slice(value).map_err(|e| {
        format!(
            "the value is not JSON ({e}): {}",
            String::from_utf8_lossy(&value[..value.len().min(80)])
        )
    })?;
    if let Value::Object(map) = &mut decoded {
        if map.len() == 2 && map.contains_key("schema") && map.contains_key("payload") {
            decoded = map.remove("payload").unwrap_or(Value::Null);
        }
    }
    if let Value::String(text) = &decoded {
        if let Ok(inner) = serde_json::from_str::<Value>(text) {
            return Ok(inner);
        }
    }
    Ok(decoded)
}

/// A key or header as text: a JSON string (JsonConverter) loses its quotes.
fn unquote(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    if text.len() >= 2 && text.starts_with('"') && text.ends_with('"') {
        if let Ok(Value::String(inner)) = serde_json::from_str::<Value>(&text) {
            return inner;
        }
    }
    text.into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "593f0169-e25b-4d71-a759-0f43c12dd2b3";
    /// The row's jsonb as PostgreSQL prints it (keys reordered, `": "` spacing).
    const JSONB: &str = r#"{"tags": ["a", "b"], "owner": "alice", "nested": {"x": 1.5, "y": null}, "balance": 100}"#;

    fn rules(change: impl FnOnce(&mut KafkaConfig)) -> Rules {
        let mut config = KafkaConfig::default();
        change(&mut config);
        Rules::new(&config).unwrap()
    }

    fn message<'a>(
        key: &'a [u8],
        value: Option<&'a [u8]>,
        headers: Vec<(&'a str, Option<&'a [u8]>)>,
    ) -> Message<'a> {
        Message {
            topic: "outbox.event.Account",
            partition: 2,
            offset: 17,
            key: Some(key),
            value,
            headers,
            timestamp_ms: Some(1_700_000_000_000),
        }
    }

    fn default_headers() -> Vec<(&'static str, Option<&'static [u8]>)> {
        vec![
            (
                "__debezium.context.connectorName",
                Some(b"outbox".as_slice()),
            ),
            ("id", Some(ID.as_bytes())),
            ("eventType", Some(b"AccountOpened".as_slice())),
        ]
    }

    fn event(decoding: Decoding) -> Decoded {
        match decoding {
            Decoding::Event(e) => e,
            other => panic!("not an event: {other:?}"),
        }
    }

    fn expected_payload() -> Value {
        serde_json::from_str(JSONB).unwrap()
    }

    #[test]
    fn the_default_shape_a_json_string_of_jsonb_text_decodes_twice() {
        let value = serde_json::to_string(JSONB).unwrap();
        let e = event(rules(|_| {}).decode(&message(
            b"acct-1",
            Some(value.as_bytes()),
            default_headers(),
        )));
        assert_eq!(e.id, ID);
        assert_eq!(e.stream, "acct-1");
        assert_eq!(e.stream_type, "Account");
        assert_eq!(e.event_type, "AccountOpened");
        assert_eq!(
            serde_json::from_str::<Value>(e.payload.get()).unwrap(),
            expected_payload()
        );
        assert_eq!(e.version, None);
        assert_eq!(e.timestamp_ms, 1_700_000_000_000);
        assert!(
            e.headers.keys().all(|k| !k.starts_with("__debezium")),
            "{:?}",
            e.headers
        );
    }

    #[test]
    fn an_expanded_payload_is_the_object_itself() {
        let value = br#"{"tags":["a","b"],"owner":"alice","nested":{"x":1.5},"balance":100}"#;
        let e = event(rules(|_| {}).decode(&message(b"acct-1", Some(value), default_headers())));
        assert_eq!(
            e.payload.get(),
            r#"{"balance":100,"nested":{"x":1.5},"owner":"alice","tags":["a","b"]}"#
        );
    }

    #[test]
    fn an_expanded_scalar_falls_back_to_the_string_form() {
        let e = event(rules(|_| {}).decode(&message(
            b"acct-1",
            Some(br#""\"closed\"""#),
            default_headers(),
        )));
        assert_eq!(e.payload.get(), r#""closed""#);
        let e = event(rules(|_| {}).decode(&message(b"acct-1", Some(b"42"), default_headers())));
        assert_eq!(e.payload.get(), "42");
    }

    #[test]
    fn a_json_converter_key_and_headers_lose_their_quotes() {
        let quoted_id = format!("\"{ID}\"");
        let headers = vec![
            ("id", Some(quoted_id.as_bytes())),
            ("eventType", Some(br#""AccountOpened""#.as_slice())),
        ];
        let value = serde_json::to_string(JSONB).unwrap();
        let e =
            event(rules(|_| {}).decode(&message(br#""acct-1""#, Some(value.as_bytes()), headers)));
        assert_eq!(
            (e.id.as_str(), e.stream.as_str(), e.event_type.as_str()),
            (ID, "acct-1", "AccountOpened")
        );
    }

    #[test]
    fn a_string_converter_value_is_the_raw_jsonb_text() {
        let e = event(rules(|_| {}).decode(&message(
            b"acct-1",
            Some(JSONB.as_bytes()),
            default_headers(),
        )));
        assert_eq!(
            serde_json::from_str::<Value>(e.payload.get()).unwrap(),
            expected_payload()
        );
    }

    #[test]
    fn a_schema_envelope_is_opened_around_either_form() {
        let string_form = serde_json::to_string(&serde_json::json!({
            "schema": {"type": "string", "optional": true}, "payload": JSONB
        }))
        .unwrap();
        let expanded = format!(r#"{{"schema":{{"type":"struct"}},"payload":{JSONB}}}"#);
        for value in [string_form, expanded] {
            let e = event(rules(|_| {}).decode(&message(
                b"acct-1",
                Some(value.as_bytes()),
                default_headers(),
            )));
            assert_eq!(
                serde_json::from_str::<Value>(e.payload.get()).unwrap(),
                expected_payload(),
                "{value}"
            );
        }
    }

    #[test]
    fn a_tombstone_is_skipped() {
        assert_eq!(
            rules(|_| {}).decode(&message(b"acct-1", None, default_headers())),
            Decoding::Tombstone
        );
    }

    #[test]
    fn without_a_type_header_the_configured_fallback_names_the_type() {
        let only_id = vec![("id", Some(ID.as_bytes()))];
        let value = br#"{"kind":"Deposited","amount":5}"#;
        let decoded = rules(|_| {}).decode(&message(b"acct-1", Some(value), only_id.clone()));
        assert!(
            matches!(&decoded, Decoding::Bad { reason, stream: Some(s), .. } if reason.contains("eventType") && reason.contains("outbox.event.Account/2@17") && s == "acct-1"),
            "{decoded:?}"
        );
        let by_field = event(
            rules(|c| c.event_type = "field:kind".into()).decode(&message(
                b"acct-1",
                Some(value),
                only_id.clone(),
            )),
        );
        assert_eq!(by_field.event_type, "Deposited");
        let fixed = event(
            rules(|c| c.event_type = "fixed:Happened".into()).decode(&message(
                b"acct-1",
                Some(value),
                only_id.clone(),
            )),
        );
        assert_eq!(fixed.event_type, "Happened");
        let by_header = event(
            rules(|c| c.stream_type = "header:aggregatetype".into()).decode(&message(
                b"acct-1",
                Some(value),
                vec![
                    ("id", Some(ID.as_bytes())),
                    ("eventType", Some(b"X".as_slice())),
                    ("aggregatetype", Some(b"Ledger".as_slice())),
                ],
            )),
        );
        assert_eq!(by_header.stream_type, "Ledger");
    }

    #[test]
    fn a_version_header_gives_the_version() {
        let mut headers = default_headers();
        headers.push(("version", Some(b"7".as_slice())));
        let e = event(
            rules(|c| c.version_header = "version".into()).decode(&message(
                b"acct-1",
                Some(b"{}"),
                headers,
            )),
        );
        assert_eq!(e.version, Some(7));
    }

    #[test]
    fn bad_messages_are_named_with_where_they_are_and_why() {
        let r = rules(|_| {});
        let cases: Vec<(Message, &str)> = vec![
            (
                message(b"acct-1", Some(b"{not json"), default_headers()),
                "not JSON",
            ),
            (
                Message {
                    key: None,
                    ..message(b"", Some(b"{}"), default_headers())
                },
                "no key",
            ),
            (
                message(
                    b"acct-1",
                    Some(b"{}"),
                    vec![("eventType", Some(b"X".as_slice()))],
                ),
                "no `id` header",
            ),
        ];
        for (m, why) in cases {
            match r.decode(&m) {
                Decoding::Bad { reason, .. } => {
                    assert!(reason.contains(why), "{reason}");
                    assert!(reason.contains("outbox.event.Account/2@17"), "{reason}");
                }
                other => panic!("{why}: {other:?}"),
            }
        }
    }

    #[test]
    fn settings_that_name_no_place_are_refused() {
        let config = KafkaConfig {
            event_type: "eventType".into(),
            ..KafkaConfig::default()
        };
        assert!(Rules::new(&config)
            .unwrap_err()
            .contains("kafka.event_type"));
    }
}
