//! A plugin's self-description, checked before anything is built from it: names end up in
//! table names and URLs, so they are held to a strict alphabet.

use serde::{Deserialize, Serialize};

use super::bindings::projection::projector::plugin::types as wit;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Descriptor {
    pub name: String,
    pub version: String,
    /// Empty: every event type.
    pub event_types: Vec<String>,
    pub collections: Vec<CollectionSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CollectionSpec {
    pub name: String,
    pub indexes: Vec<String>,
}

/// Index fields per collection: each is a column and an index to maintain on every write (and
/// SQLite compares them all in one expression, whose depth it limits).
const MAX_INDEXES: usize = 64;

impl CollectionSpec {
    /// The indexed fields, each once, sorted: the order stores keep their columns in.
    pub fn fields(&self) -> Vec<&str> {
        let mut fields: Vec<&str> = self.indexes.iter().map(String::as_str).collect();
        fields.sort_unstable();
        fields.dedup();
        fields
    }
}

impl Descriptor {
    /// Checks what a plugin declared; an observer (`observer`) writes no documents, so it may
    /// declare no collection.
    pub(crate) fn validate(raw: wit::Descriptor, observer: bool) -> Result<Self, String> {
        check_name(
            if observer {
                "observer name"
            } else {
                "projection name"
            },
            &raw.name,
        )?;
        if observer && !raw.collections.is_empty() {
            return Err(format!(
                "an observer writes no documents, but it declares {} collection(s)",
                raw.collections.len()
            ));
        }
        if raw.version.is_empty()
            || raw.version.len() > 32
            || !raw
                .version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        {
            return Err(format!(
                "version {:?} must be 1-32 characters of [A-Za-z0-9._-]",
                raw.version
            ));
        }
        let mut collections = Vec::with_capacity(raw.collections.len());
        for c in raw.collections {
            check_name("collection name", &c.name)?;
            if collections
                .iter()
                .any(|seen: &CollectionSpec| seen.name == c.name)
            {
                return Err(format!("collection {:?} is declared twice", c.name));
            }
            if c.indexes.len() > MAX_INDEXES {
                return Err(format!(
                    "collection {:?} declares {} index fields; at most {MAX_INDEXES}",
                    c.name,
                    c.indexes.len()
                ));
            }
            for field in &c.indexes {
                let ok = !field.is_empty()
                    && field.len() <= 128
                    && field.split('.').all(|part| {
                        !part.is_empty()
                            && part
                                .chars()
                                .all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
                    });
                if !ok {
                    return Err(format!(
                        "index field {field:?} of collection {:?} must be a name or dotted path of [A-Za-z0-9_]",
                        c.name
                    ));
                }
            }
            collections.push(CollectionSpec {
                name: c.name,
                indexes: c.indexes,
            });
        }
        Ok(Self {
            name: raw.name,
            version: raw.version,
            event_types: raw.event_types,
            collections,
        })
    }

    pub fn subscribes_to(&self, event_type: &str) -> bool {
        self.event_types.is_empty() || self.event_types.iter().any(|t| t == event_type)
    }

    pub fn collection(&self, name: &str) -> Option<&CollectionSpec> {
        self.collections.iter().find(|c| c.name == name)
    }
}

fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 48
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {name:?} must be 1-48 characters of [a-z0-9_-], starting with a letter"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(name: &str, index: &str) -> wit::Descriptor {
        wit::Descriptor {
            name: name.into(),
            version: "1.0.0".into(),
            event_types: vec![],
            collections: vec![wit::Collection {
                name: "docs".into(),
                indexes: vec![index.into()],
            }],
        }
    }

    #[test]
    fn accepts_plain_names_and_dotted_index_paths() {
        let d = Descriptor::validate(raw("account-balance", "owner.address.city"), false).unwrap();
        assert_eq!(d.collections[0].indexes, ["owner.address.city"]);
    }

    #[test]
    fn rejects_names_that_could_escape_a_table_name_or_url() {
        for bad in ["", "Upper", "a b", "x;drop", "../up", "1abc"] {
            assert!(
                Descriptor::validate(raw(bad, "f"), false).is_err(),
                "{bad:?}"
            );
        }
        for bad in ["", "a..b", "a'b", "a-b", "$.x"] {
            assert!(
                Descriptor::validate(raw("ok", bad), false).is_err(),
                "{bad:?}"
            );
        }
    }
}
