//! What the host checks of a plugin's output before a store sees it.

use crate::event::unstorable_escape;
use crate::runtime::BatchOutput;

/// Plugins write bytes; the read model serves JSON. A document that is not JSON, or that a
/// store cannot hold (PostgreSQL takes no NUL character in text or `jsonb`), is the plugin's
/// bug and is refused before it reaches a table, instead of failing every commit.
pub(crate) fn check_documents(output: &BatchOutput) -> Result<(), String> {
    for (collection, docs) in &output.writes {
        if let Some(key) = docs.keys().find(|k| k.contains('\0')) {
            return Err(format!("{collection}/{key:?}, a key with a NUL character"));
        }
        for (key, doc) in docs.iter().filter_map(|(k, d)| Some((k, d.as_ref()?))) {
            if let Some(what) = unstorable_escape(doc) {
                return Err(format!("{collection}/{key}, which holds {what}"));
            }
            if let Err(err) = serde_json::from_slice::<&serde_json::value::RawValue>(doc) {
                return Err(format!("{collection}/{key}, which is not JSON: {err}"));
            }
            if nesting(doc) > MAX_NESTING {
                return Err(format!(
                    "{collection}/{key}, which nests deeper than {MAX_NESTING} levels"
                ));
            }
        }
    }
    Ok(())
}

/// The deepest nesting a store accepts (SQLite's JSONB limit is 1000).
const MAX_NESTING: usize = 1000;

/// How deeply arrays and objects nest in valid JSON text.
fn nesting(json: &[u8]) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0, false, false);
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_counts_brackets_outside_strings() {
        assert_eq!(nesting(br#"{"a": [1, {"b": "]]]{{{\\\"["}]}"#), 3);
        assert_eq!(nesting(b"42"), 0);
        let deep = format!("{}{}", "[".repeat(1001), "]".repeat(1001));
        assert_eq!(nesting(deep.as_bytes()), 1001);
    }

    #[test]
    fn nul_and_half_surrogate_escapes_are_found_and_escaped_backslashes_are_not() {
        let nul = Some("a NUL character (\\u0000)");
        let half = Some("an unpaired UTF-16 surrogate escape");
        assert_eq!(unstorable_escape(br#"{"a": "x\u0000"}"#), nul);
        assert_eq!(unstorable_escape(br#"{"a": "\\\u0000"}"#), nul);
        assert_eq!(unstorable_escape(br#"{"a": "\\u0000"}"#), None);
        assert_eq!(unstorable_escape(br#"{"a": "\u0001"}"#), None);
        assert_eq!(unstorable_escape(br#"{"a": "\ud83d\ude00 ok"}"#), None);
        assert_eq!(unstorable_escape(br#"{"a": "cut \ud83d"}"#), half);
        assert_eq!(unstorable_escape(br#"{"\ud800": 1}"#), half);
        assert_eq!(unstorable_escape(br#"{"a": "\ude00"}"#), half);
        assert_eq!(unstorable_escape(br#"{"a": "\ud83d\u0041"}"#), half);
        assert_eq!(unstorable_escape(br#"{"a": "\\ud800"}"#), None);
    }

    #[test]
    fn documents_too_deep_for_the_store_are_the_plugins_fault() {
        let mut output = BatchOutput::default();
        let deep = format!("{}{}", "[".repeat(1001), "]".repeat(1001));
        output
            .writes
            .entry("c".into())
            .or_default()
            .insert("k".into(), Some(deep.into_bytes()));
        let err = check_documents(&output).unwrap_err();
        assert!(
            err.contains("c/k") && err.contains("deeper than 1000"),
            "{err}"
        );
    }

    /// A string cut inside a surrogate pair (a plugin that slices UTF-16) is JSON to a lax
    /// parser, but neither store can keep it: refused with the document's name, not retried.
    #[test]
    fn documents_with_half_a_surrogate_pair_are_the_plugins_fault() {
        let mut output = BatchOutput::default();
        output
            .writes
            .entry("c".into())
            .or_default()
            .insert("k".into(), Some(br#"{"name": "ab\ud83d"}"#.to_vec()));
        let err = check_documents(&output).unwrap_err();
        assert!(err.contains("c/k") && err.contains("surrogate"), "{err}");
    }
}
