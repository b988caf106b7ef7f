//! The values of a document's declared (indexed) fields, read on the host.
//!
//! SQLite keeps them in plain columns, filled from these values, instead of indexing
//! `json_extract` expressions: an index on an expression over `doc` is rewritten on every
//! update of `doc` (SQLite decides which indexes an UPDATE touches from the columns it sets,
//! never from the values), while most updates of a read model leave the indexed fields as
//! they were. With the values at hand the store can update those rows without setting the
//! columns, and so without touching an index (see `Sqlite::commit`).
//!
//! The values follow `json_extract`'s mapping, so a filter means the same on tables filled
//! either way: a string is TEXT, an integer that fits 64 bits INTEGER, any other number REAL,
//! `true`/`false` the INTEGERs 1/0, `null` or a missing field NULL, an array or object its
//! JSON text.

use std::borrow::Cow;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::sqlite::{SqliteArgumentValue, SqliteTypeInfo};
use sqlx::{Encode, Sqlite, Type};

/// One declared field's value in one document.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum FieldValue<'a> {
    Null,
    Integer(i64),
    Real(f64),
    Text(Cow<'a, str>),
}

impl FieldValue<'_> {
    /// As an argument of a statement on the SQLite store's lent handle.
    pub(crate) fn to_sql_output(&self) -> rusqlite::types::ToSqlOutput<'_> {
        use rusqlite::types::{ToSqlOutput, Value, ValueRef};
        match self {
            Self::Null => ToSqlOutput::Owned(Value::Null),
            Self::Integer(n) => ToSqlOutput::Owned(Value::Integer(*n)),
            Self::Real(x) => ToSqlOutput::Owned(Value::Real(*x)),
            Self::Text(text) => ToSqlOutput::Borrowed(ValueRef::Text(text.as_bytes())),
        }
    }
}

/// The values of `fields` (dotted paths, as declared) in the JSON document `doc`, in the
/// order of `fields`.
pub(crate) fn extract<'a>(
    doc: &'a str,
    fields: &[&str],
) -> Result<Vec<FieldValue<'a>>, serde_json::Error> {
    // One pass over the document for every first path segment; nested paths descend from
    // there (rare, and each level is small).
    let mut firsts: Vec<&str> = fields.iter().map(|f| first_segment(f)).collect();
    firsts.sort_unstable();
    firsts.dedup();
    let top = pick(doc, &firsts)?;
    fields
        .iter()
        .map(|field| {
            let mut segments = field.split('.');
            let first = segments.next().unwrap_or_default();
            let mut raw = firsts.binary_search(&first).ok().and_then(|i| top[i]);
            for segment in segments {
                raw = match raw {
                    Some(inner) => pick(inner.get(), &[segment])?[0],
                    None => None,
                };
            }
            raw.map_or(Ok(FieldValue::Null), leaf)
        })
        .collect()
}

fn first_segment(field: &str) -> &str {
    field.split('.').next().unwrap_or(field)
}

/// The raw values of `names` in `json` if it is an object (the first of repeated keys, as
/// `json_extract` reads them); nothing for anything else.
fn pick<'a>(json: &'a str, names: &[&str]) -> Result<Vec<Option<&'a RawValue>>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(json);
    let found = Pick { names }.deserialize(&mut de)?;
    de.end()?;
    Ok(found)
}

fn leaf(raw: &RawValue) -> Result<FieldValue<'_>, serde_json::Error> {
    let text = raw.get();
    Ok(match text.as_bytes().first() {
        Some(b'"') => {
            let mut de = serde_json::Deserializer::from_str(text);
            FieldValue::Text(Key.deserialize(&mut de)?)
        }
        Some(b't') => FieldValue::Integer(1),
        Some(b'f') => FieldValue::Integer(0),
        Some(b'{' | b'[') => FieldValue::Text(compact(text)),
        Some(b'n') | None => FieldValue::Null,
        Some(_) => match text.parse::<i64>() {
            Ok(n) => FieldValue::Integer(n),
            Err(_) => text
                .parse::<f64>()
                .map_or(FieldValue::Null, FieldValue::Real),
        },
    })
}

/// JSON text without the whitespace between tokens, as `json_extract` renders an array or an
/// object (strings, numbers and escapes stay as written, as there).
fn compact(json: &str) -> Cow<'_, str> {
    let spaced = |b: u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    if !json.bytes().any(spaced) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in json.chars() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
        } else if c.is_ascii() && spaced(c as u8) {
            continue;
        }
        out.push(c);
    }
    Cow::Owned(out)
}

struct Pick<'n> {
    names: &'n [&'n str],
}

impl<'de> DeserializeSeed<'de> for Pick<'_> {
    type Value = Vec<Option<&'de RawValue>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Pick<'_> {
    type Value = Vec<Option<&'de RawValue>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON document")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = vec![None; self.names.len()];
        while let Some(key) = map.next_key_seed(Key)? {
            match self.names.iter().position(|n| *n == key) {
                Some(i) if found[i].is_none() => found[i] = Some(map.next_value()?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(found)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(vec![None; self.names.len()])
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(vec![None; self.names.len()])
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(vec![None; self.names.len()])
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(vec![None; self.names.len()])
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(vec![None; self.names.len()])
    }

    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(vec![None; self.names.len()])
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(vec![None; self.names.len()])
    }
}

/// A JSON string, borrowed from the document unless it has escapes.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(s))
    }

    fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(s.to_owned()))
    }
}

impl Type<Sqlite> for FieldValue<'_> {
    fn type_info() -> SqliteTypeInfo {
        <str as Type<Sqlite>>::type_info()
    }

    fn compatible(_: &SqliteTypeInfo) -> bool {
        true
    }
}

impl<'q> Encode<'q, Sqlite> for &'q FieldValue<'q> {
    fn encode_by_ref(&self, buf: &mut Vec<SqliteArgumentValue<'q>>) -> Result<IsNull, BoxDynError> {
        let value: &'q FieldValue<'q> = self;
        buf.push(match value {
            FieldValue::Null => return Ok(IsNull::Yes),
            FieldValue::Integer(n) => SqliteArgumentValue::Int64(*n),
            FieldValue::Real(x) => SqliteArgumentValue::Double(*x),
            FieldValue::Text(s) => SqliteArgumentValue::Text(Cow::Borrowed(s.as_ref())),
        });
        Ok(IsNull::No)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(doc: &str, fields: &[&str]) -> Vec<FieldValue<'static>> {
        extract(doc, fields)
            .unwrap()
            .into_iter()
            .map(|v| match v {
                FieldValue::Text(s) => FieldValue::Text(Cow::Owned(s.into_owned())),
                FieldValue::Null => FieldValue::Null,
                FieldValue::Integer(n) => FieldValue::Integer(n),
                FieldValue::Real(x) => FieldValue::Real(x),
            })
            .collect()
    }

    fn text(s: &str) -> FieldValue<'static> {
        FieldValue::Text(Cow::Owned(s.to_owned()))
    }

    #[test]
    fn scalars_map_as_json_extract_maps_them() {
        let doc = r#"{"s":"a\"b","i":-42,"big":18446744073709551615,"r":1.5,"t":true,"f":false,"n":null,"o":{"x":[1, 2]},"a":[1,"x"]}"#;
        assert_eq!(
            values(doc, &["s", "i", "big", "r", "t", "f", "n", "missing", "a"]),
            [
                text("a\"b"),
                FieldValue::Integer(-42),
                FieldValue::Real(18446744073709551615.0),
                FieldValue::Real(1.5),
                FieldValue::Integer(1),
                FieldValue::Integer(0),
                FieldValue::Null,
                FieldValue::Null,
                text(r#"[1,"x"]"#),
            ]
        );
    }

    #[test]
    fn dotted_paths_descend_and_stop_at_non_objects() {
        let doc = r#"{"owner": { "address" : {"city":"Graz"}},"list":[{"city":"x"}],"s":"x"}"#;
        assert_eq!(
            values(
                doc,
                &[
                    "owner.address.city",
                    "owner.name",
                    "list.city",
                    "s.x",
                    "owner"
                ]
            ),
            [
                text("Graz"),
                FieldValue::Null,
                FieldValue::Null,
                FieldValue::Null,
                text(r#"{"address":{"city":"Graz"}}"#),
            ]
        );
    }

    #[test]
    fn arrays_and_objects_lose_the_space_between_tokens_but_not_inside_strings() {
        let doc = "{\"a\": [ 1,\n\t\"x y\" , {\"k\" : \"\\\" \"} ]}";
        assert_eq!(values(doc, &["a"]), [text(r#"[1,"x y",{"k":"\" "}]"#)]);
    }

    #[test]
    fn the_first_of_repeated_keys_counts_and_escaped_keys_match() {
        let doc = r#"{"k":1,"k":2,"\u006bey":"v"}"#;
        assert_eq!(
            values(doc, &["k", "key"]),
            [FieldValue::Integer(1), text("v")]
        );
    }

    #[test]
    fn documents_that_are_not_objects_have_no_fields() {
        assert_eq!(values("[1,2]", &["a"]), [FieldValue::Null]);
        assert_eq!(values("\"s\"", &["a"]), [FieldValue::Null]);
        assert!(extract("{\"a\":", &["a"]).is_err());
    }
}
