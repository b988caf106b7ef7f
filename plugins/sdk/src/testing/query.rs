//! A collection's documents filtered as `GET /projections/{p}/{collection}?{field}={value}`
//! filters them: only on the fields the collection indexes, results in key order.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::Descriptor;

/// A query the host would refuse, or a document that does not decode as asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryError {
    /// The projection declares no such collection (the API's 404 `unknown_collection`).
    UnknownCollection {
        projection: String,
        collection: String,
        /// The collections the projection declares.
        collections: Vec<String>,
    },
    /// A filter on a field the collection does not index (the API's 400 `invalid_filter`).
    UnknownField {
        collection: String,
        field: String,
        /// The fields the collection indexes, as declared.
        indexes: Vec<String>,
    },
    /// A matching document does not decode as the type asked for.
    Decode {
        collection: String,
        key: String,
        message: String,
    },
}

impl fmt::Display for QueryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownCollection {
                projection,
                collection,
                collections,
            } => write!(
                f,
                "projection {projection:?} has no collection {collection:?} (it declares: {})",
                listed(collections)
            ),
            Self::UnknownField {
                collection,
                field,
                indexes,
            } => write!(
                f,
                "cannot filter {collection} on `{field}`: only indexed fields can be filtered \
                 (it indexes: {})",
                listed(indexes)
            ),
            Self::Decode {
                collection,
                key,
                message,
            } => write!(f, "document {collection}/{key} does not decode: {message}"),
        }
    }
}

impl std::error::Error for QueryError {}

fn listed(names: &[String]) -> String {
    if names.is_empty() {
        return "none".into();
    }
    let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    quoted.join(", ")
}

/// The documents of `docs` (one collection's, by key) that match every filter, decoded as `T`,
/// after checking the query against `descriptor` as the host does.
pub(super) fn query<T: DeserializeOwned>(
    descriptor: &Descriptor,
    docs: Option<&BTreeMap<String, Vec<u8>>>,
    collection: &str,
    filters: &[(&str, &str)],
) -> Result<Vec<(String, T)>, QueryError> {
    let Some(spec) = descriptor.collections.iter().find(|c| c.name == collection) else {
        return Err(QueryError::UnknownCollection {
            projection: descriptor.name.clone(),
            collection: collection.to_owned(),
            collections: descriptor
                .collections
                .iter()
                .map(|c| c.name.clone())
                .collect(),
        });
    };
    if let Some((field, _)) = filters
        .iter()
        .find(|(field, _)| !spec.indexes.iter().any(|i| i == field))
    {
        return Err(QueryError::UnknownField {
            collection: collection.to_owned(),
            field: (*field).to_owned(),
            indexes: spec.indexes.clone(),
        });
    }
    let decode_error = |key: &str, message: String| QueryError::Decode {
        collection: collection.to_owned(),
        key: key.to_owned(),
        message,
    };
    let mut found = Vec::new();
    // A BTreeMap of `String`s iterates in byte order: the host's key order on both stores.
    for (key, bytes) in docs.into_iter().flatten() {
        let doc: Value = crate::decode_json(bytes).map_err(|err| decode_error(key, err))?;
        if filters
            .iter()
            .all(|(field, wanted)| matches(field_value(&doc, field), wanted))
        {
            let typed = crate::decode_json(bytes).map_err(|err| decode_error(key, err))?;
            found.push((key.clone(), typed));
        }
    }
    Ok(found)
}

/// The value at a dotted path, descending through objects only (as the host's field columns
/// do): `owner.city` of `{"owner": {"city": "Graz"}}`, nothing through an array.
fn field_value<'d>(doc: &'d Value, field: &str) -> Option<&'d Value> {
    field
        .split('.')
        .try_fold(doc, |value, segment| value.as_object()?.get(segment))
}

/// Whether a field's value equals a query string's, which has no type: "42" matches the string
/// "42" and the number 42 (or 42.0), "1.5" the number 1.5, "true" the string and the boolean.
/// `null`, a missing field, an array and an object match nothing. This is what both stores
/// agree on: SQLite alone also matches `true` with "1" and an array with its JSON text.
fn matches(value: Option<&Value>, wanted: &str) -> bool {
    match value {
        Some(Value::String(s)) => s == wanted,
        Some(Value::Number(n)) => {
            if let Ok(int) = wanted.parse::<i64>() {
                match n.as_i64() {
                    Some(have) => have == int,
                    // A float, or an integer past i64 (a REAL to SQLite): compared as numbers.
                    None => n.as_f64() == Some(int as f64),
                }
            } else if let Ok(float) = wanted.parse::<f64>() {
                n.as_f64() == Some(float)
            } else {
                false
            }
        }
        Some(Value::Bool(b)) => wanted.parse::<bool>() == Ok(*b),
        Some(Value::Null | Value::Array(_) | Value::Object(_)) | None => false,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_query_string_matches_strings_numbers_and_booleans_by_their_text() {
        let doc = json!({
            "s": "42", "i": 42, "f": 42.0, "x": 1.5, "big": 18446744073709551615u64,
            "t": true, "n": null, "a": [1], "o": {"k": "v"}, "neg": -3
        });
        let hit = |field: &str, wanted: &str| matches(field_value(&doc, field), wanted);
        assert!(hit("s", "42") && hit("i", "42") && hit("f", "42"));
        assert!(hit("i", "42.0") && hit("f", "42.0") && !hit("s", "42.0"));
        assert!(hit("x", "1.5") && !hit("x", "1"));
        assert!(hit("neg", "-3") && !hit("neg", "3"));
        assert!(hit("big", "18446744073709551615"));
        assert!(hit("t", "true") && !hit("t", "false") && !hit("t", "1"));
        assert!(!hit("n", "null") && !hit("n", ""));
        assert!(!hit("missing", "") && !hit("a", "[1]") && !hit("o", r#"{"k":"v"}"#));
        assert!(hit("o.k", "v") && !hit("o.k.x", "v") && !hit("s.x", "42"));
    }
}
