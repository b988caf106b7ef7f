//! The host's event type: what sources produce, runners batch and plugins receive.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

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
    pub payload: Box<RawValue>,
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

/// What in a payload no reader could take as meant, and where (`.a[2].b`): a key given twice
/// (readers disagree on which counts; PostgreSQL's jsonb keeps the last), or a string no store
/// can keep ([`unstorable_escape`]). `json` is valid JSON (already taken as a `RawValue`).
/// Values are only ever taken as raw text, never converted, so a number of any size or
/// precision passes untouched.
pub(crate) fn payload_problem(json: &str) -> Option<(String, String)> {
    let mut path = Vec::new();
    // A key no store can keep is caught by the scan of the whole text.
    first_problem(json, &mut path).or_else(|| {
        unstorable_escape(json.as_bytes()).map(|what| (String::new(), unstorable(what)))
    })
}

enum Step {
    Key(String),
    Index(usize),
}

fn first_problem(json: &str, path: &mut Vec<Step>) -> Option<(String, String)> {
    match json.trim_start().as_bytes().first() {
        Some(b'{') => {
            let members = serde_json::from_str::<RawObject>(json).ok()?.0;
            let mut keys = std::collections::HashSet::with_capacity(members.len());
            for (key, value) in members {
                let fresh = keys.insert(key.clone());
                path.push(Step::Key(key));
                let found = match fresh {
                    true => first_problem(value.get(), path),
                    false => Some((render(path), "is given twice".into())),
                };
                path.pop();
                if found.is_some() {
                    return found;
                }
            }
            None
        }
        Some(b'[') => {
            let items = serde_json::from_str::<Vec<&RawValue>>(json).ok()?;
            for (index, item) in items.into_iter().enumerate() {
                path.push(Step::Index(index));
                let found = first_problem(item.get(), path);
                path.pop();
                if found.is_some() {
                    return found;
                }
            }
            None
        }
        Some(b'"') => {
            unstorable_escape(json.as_bytes()).map(|what| (render(path), unstorable(what)))
        }
        _ => None,
    }
}

fn unstorable(what: &str) -> String {
    format!("holds {what}, which the stores cannot keep")
}

fn render(path: &[Step]) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            Step::Key(k) if !k.is_empty() && k.chars().all(|c| c.is_alphanumeric() || c == '_') => {
                out.push('.');
                out.push_str(k);
            }
            Step::Key(k) => out.push_str(&format!("[{}]", serde_json::Value::from(k.as_str()))),
            Step::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// A JSON object's members in their order, keys decoded, values left as raw text (so
/// nothing is converted, and a key given twice is seen twice).
pub(crate) struct RawObject<'a>(pub Vec<(String, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for RawObject<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Members<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Members<'a> {
            type Value = RawObject<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> Result<Self::Value, M::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry::<String, &'de RawValue>()? {
                    members.push(member);
                }
                Ok(RawObject(members))
            }
        }
        d.deserialize_map(Members(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod payload_problem_tests {
    use super::payload_problem;

    fn path(json: &str) -> Option<String> {
        payload_problem(json).map(|(path, _)| path)
    }

    #[test]
    fn names_the_first_key_given_twice_by_its_path() {
        assert_eq!(path(r#"{"a":1,"b":2}"#), None);
        assert_eq!(path(r#"{"a":1,"a":2}"#).as_deref(), Some(".a"));
        assert_eq!(
            path(r#"{"items":[{"p":1},{"p":1,"q":{"x":1,"x":1}}]}"#).as_deref(),
            Some(".items[1].q.x")
        );
        assert_eq!(
            path(r#"{"a b":{"c":1,"c":2}}"#).as_deref(),
            Some(r#"["a b"].c"#)
        );
        // Equal keys in different objects are fine; numbers of any size pass untouched.
        assert_eq!(path(r#"[{"a":1},{"a":18446744073709551616e400}]"#), None);
        assert_eq!(path("-0"), None);
    }

    #[test]
    fn names_a_string_no_store_can_keep() {
        let (at, what) = payload_problem(r#"{"a":["ok","cut \ud83d"]}"#).unwrap();
        assert_eq!(at, ".a[1]");
        assert!(what.contains("surrogate"), "{what}");
        let (at, what) = payload_problem(r#"{"\u0000":1}"#).unwrap();
        assert_eq!(at, "");
        assert!(what.contains("NUL"), "{what}");
    }
}
