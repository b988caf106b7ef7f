//! Events from the JSONL files `projector replay` reads, numbered as it numbers them, so a
//! file replayed by the host and loaded in a test yields the same events.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::Event;

/// One line: the fields of `POST /events`, plus what the log would assign (version, position,
/// timestamp), all optional so a hand-written file stays short. The host's `Line`, field for
/// field.
#[derive(Deserialize)]
struct Line {
    id: Option<String>,
    stream: String,
    #[serde(default)]
    stream_type: String,
    #[serde(rename = "type")]
    event_type: String,
    payload: Box<RawValue>,
    version: Option<u64>,
    position: Option<u64>,
    timestamp_ms: Option<u64>,
    #[serde(default)]
    headers: Vec<(String, String)>,
}

/// Events from JSONL that could not be read, or that the plugin failed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonlError {
    /// The file could not be read.
    Io { path: PathBuf, message: String },
    /// Lines that are not valid events: every bad line (not only the first), in file order,
    /// each with its 1-based number and what is wrong with it.
    Lines {
        path: Option<PathBuf>,
        lines: Vec<(usize, String)>,
    },
    /// The plugin failed on the event of line `line`.
    Event {
        path: Option<PathBuf>,
        line: usize,
        event_id: String,
        message: String,
    },
    /// The plugin failed on the batch as a whole, no single event.
    Batch {
        path: Option<PathBuf>,
        message: String,
    },
}

impl JsonlError {
    /// The 1-based number of the (first) line at fault, if a line is.
    pub fn line(&self) -> Option<usize> {
        match self {
            Self::Lines { lines, .. } => lines.first().map(|(line, _)| *line),
            Self::Event { line, .. } => Some(*line),
            Self::Io { .. } | Self::Batch { .. } => None,
        }
    }

    fn with_path(self, file: &Path) -> Self {
        let file = Some(file.to_owned());
        match self {
            Self::Lines { lines, .. } => Self::Lines { path: file, lines },
            Self::Event {
                line,
                event_id,
                message,
                ..
            } => Self::Event {
                path: file,
                line,
                event_id,
                message,
            },
            Self::Batch { message, .. } => Self::Batch {
                path: file,
                message,
            },
            io @ Self::Io { .. } => io,
        }
    }
}

/// `file:7` as the host writes it, `line 7` for text that came from no file.
fn at(path: &Option<PathBuf>, line: usize) -> String {
    match path {
        Some(path) => format!("{}:{line}", path.display()),
        None => format!("line {line}"),
    }
}

impl fmt::Display for JsonlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io { path, message } => write!(f, "cannot read {}: {message}", path.display()),
            Self::Lines { path, lines } => match lines.as_slice() {
                [(line, reason)] => write!(f, "{}: {reason}", at(path, *line)),
                _ => {
                    match path {
                        Some(path) => {
                            write!(f, "{} bad lines in {}:", lines.len(), path.display())?
                        }
                        None => write!(f, "{} bad lines:", lines.len())?,
                    }
                    for (line, reason) in lines {
                        write!(f, "\n  {}: {reason}", at(path, *line))?;
                    }
                    Ok(())
                }
            },
            Self::Event {
                path,
                line,
                event_id,
                message,
            } => write!(f, "{}: event {event_id}: {message}", at(path, *line)),
            Self::Batch {
                path: Some(path),
                message,
            } => write!(f, "{}: plugin failed on a batch: {message}", path.display()),
            Self::Batch {
                path: None,
                message,
            } => write!(f, "plugin failed on a batch: {message}"),
        }
    }
}

impl std::error::Error for JsonlError {}

/// The events of JSONL text, one object per line as `projector replay` reads them (blank lines
/// skipped), numbered as it numbers them: a missing `version` is the stream's previous one
/// plus 1, a missing `position` the event's place in the file (1-based), a missing
/// `timestamp_ms` 0 and a missing `id` `{stream}-{version}`; never the clock, so every load of
/// a file yields the same events.
pub fn events_from_jsonl(text: &str) -> Result<Vec<Event>, JsonlError> {
    Ok(numbered(text)?.into_iter().map(|(_, e)| e).collect())
}

/// [`events_from_jsonl`] of a file; errors name the file and the line.
pub fn read_jsonl(path: impl AsRef<Path>) -> Result<Vec<Event>, JsonlError> {
    Ok(read_numbered(path.as_ref())?
        .into_iter()
        .map(|(_, e)| e)
        .collect())
}

pub(super) fn read_numbered(path: &Path) -> Result<Vec<(usize, Event)>, JsonlError> {
    let text = std::fs::read_to_string(path).map_err(|err| JsonlError::Io {
        path: path.to_owned(),
        message: err.to_string(),
    })?;
    numbered(&text).map_err(|err| err.with_path(path))
}

/// The events with the number of the line each came from.
fn numbered(text: &str) -> Result<Vec<(usize, Event)>, JsonlError> {
    let mut versions: HashMap<String, u64> = HashMap::new();
    let mut events = Vec::new();
    let mut bad = Vec::new();
    // `lines` drops a `\r` before the `\n`, as the host's line reader does.
    for (index, text) in text.lines().enumerate() {
        let line_no = index + 1;
        if text.trim().is_empty() {
            continue;
        }
        // A bad line takes no version and no position: the numbers of the good lines after it
        // are the ones the host gives them when it reports the bad lines and goes on.
        let line: Line = match serde_json::from_str(text) {
            Ok(line) => line,
            Err(err) => {
                bad.push((line_no, format!("not a valid event: {err}")));
                continue;
            }
        };
        if line.stream.is_empty() || line.event_type.is_empty() {
            bad.push((line_no, "`stream` and `type` must not be empty".into()));
            continue;
        }
        let last = versions.entry(line.stream.clone()).or_insert(0);
        let version = line.version.unwrap_or(*last + 1);
        if version <= *last {
            bad.push((
                line_no,
                format!(
                    "version {version} of stream {} is not after version {last}",
                    line.stream
                ),
            ));
            continue;
        }
        *last = version;
        let position = line.position.unwrap_or(events.len() as u64 + 1);
        events.push((
            line_no,
            Event {
                id: line
                    .id
                    .unwrap_or_else(|| format!("{}-{version}", line.stream)),
                stream: line.stream,
                stream_type: line.stream_type,
                event_type: line.event_type,
                version,
                position,
                timestamp_ms: line.timestamp_ms.unwrap_or(0),
                payload: line.payload.get().as_bytes().to_vec(),
                headers: line.headers,
            },
        ));
    }
    if bad.is_empty() {
        Ok(events)
    } else {
        Err(JsonlError::Lines {
            path: None,
            lines: bad,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_numbers_are_assigned_as_replay_assigns_them() {
        let text = r#"{"stream":"a","type":"Opened","payload":{"owner":"alice"}}

{"stream":"b","type":"Opened","payload":{ "owner" : "bob" },"stream_type":"Account"}
{"stream":"a","type":"Deposited","payload":{"amount":5},"version":7,"position":40,"timestamp_ms":1700000000000,"id":"e-1","headers":[["k","v"]]}
{"stream":"a","type":"Deposited","payload":null}
"#;
        let events = events_from_jsonl(text).unwrap();
        let numbers: Vec<(&str, &str, u64, u64, u64)> = events
            .iter()
            .map(|e| {
                (
                    e.id.as_str(),
                    e.stream.as_str(),
                    e.version,
                    e.position,
                    e.timestamp_ms,
                )
            })
            .collect();
        assert_eq!(
            numbers,
            [
                ("a-1", "a", 1, 1, 0),
                ("b-1", "b", 1, 2, 0),
                ("e-1", "a", 7, 40, 1_700_000_000_000),
                // The place in the file, not one past the previous line's given position.
                ("a-8", "a", 8, 4, 0),
            ]
        );
        // The payload as written, spaces and all.
        assert_eq!(events[1].payload, br#"{ "owner" : "bob" }"#);
        assert_eq!(events[1].stream_type, "Account");
        assert_eq!(events[2].header("k"), Some("v"));
        assert_eq!(events[3].payload, b"null");
    }

    #[test]
    fn crlf_lines_read_like_lf_lines() {
        let text = "{\"stream\":\"a\",\"type\":\"E\",\"payload\":{}}\r\n\r\n{\"stream\":\"a\",\"type\":\"E\",\"payload\":{}}\r\n";
        let events = events_from_jsonl(text).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].version, 2);
    }

    #[test]
    fn every_bad_line_is_named_by_its_number() {
        let text = r#"{"stream":"a","type":"E","payload":{}}
not json
{"stream":"","type":"E","payload":{}}

{"stream":"a","type":"E","payload":{},"version":1}
{"stream":"a","type":"E"}
{"stream":"a","type":"E","payload":{}}
"#;
        let err = events_from_jsonl(text).unwrap_err();
        let JsonlError::Lines { path: None, lines } = &err else {
            panic!("{err:?}");
        };
        let numbers: Vec<usize> = lines.iter().map(|(line, _)| *line).collect();
        assert_eq!(numbers, [2, 3, 5, 6]);
        assert!(lines[0].1.starts_with("not a valid event: "), "{err}");
        assert_eq!(lines[1].1, "`stream` and `type` must not be empty");
        assert_eq!(lines[2].1, "version 1 of stream a is not after version 1");
        assert!(lines[3].1.contains("missing field `payload`"), "{err}");
        assert_eq!(err.line(), Some(2));
        let shown = err.to_string();
        assert!(shown.starts_with("4 bad lines:\n  line 2: "), "{shown}");
        assert!(shown.contains("\n  line 5: version 1"), "{shown}");

        let one = events_from_jsonl("\n{}\n").unwrap_err();
        assert!(
            one.to_string()
                .starts_with("line 2: not a valid event: missing field `stream`"),
            "{one}"
        );
    }

    #[test]
    fn a_file_is_named_in_its_errors() {
        let dir = std::env::temp_dir().join(format!("projector-sdk-jsonl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("events.jsonl");
        std::fs::write(
            &file,
            "{\"stream\":\"a\",\"type\":\"E\",\"payload\":{}}\n[]\n",
        )
        .unwrap();
        let err = read_jsonl(&file).unwrap_err();
        let missing = read_jsonl(dir.join("absent.jsonl")).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(err.line(), Some(2));
        assert!(
            err.to_string()
                .starts_with(&format!("{}:2: not a valid event: ", file.display())),
            "{err}"
        );
        assert!(
            matches!(&missing, JsonlError::Io { .. }) && missing.line().is_none(),
            "{missing:?}"
        );
        assert!(missing.to_string().starts_with("cannot read "), "{missing}");
    }
}
