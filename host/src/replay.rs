//! `projector replay`: run a plugin over a JSONL file of events, in memory, and print the read
//! model it builds. The plugin author's loop: no database, no server, deterministic output.

use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::event::Event;
use crate::runtime::{MemoryDocuments, Plugin, RuntimeError};

/// The read model: collection → key → document.
/// Documents by collection and key, each the exact JSON text the plugin wrote.
pub type ReadModel = BTreeMap<String, BTreeMap<String, Box<RawValue>>>;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {reason}")]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    /// Every bad line of the file, each with its number.
    #[error("{} bad lines in {path}:\n{}", .errors.len(), .errors.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Lines {
        path: PathBuf,
        errors: Vec<ReplayError>,
    },
    #[error("{path}:{line}: event {event_id}: {source}")]
    Plugin {
        path: PathBuf,
        line: usize,
        event_id: String,
        source: Box<RuntimeError>,
    },
    #[error("{path}: plugin failed on a batch: {source}")]
    Batch {
        path: PathBuf,
        source: Box<RuntimeError>,
    },
    #[error("plugin wrote a document that is not JSON: {collection}/{key}: {reason}")]
    Document {
        collection: String,
        key: String,
        reason: String,
    },
}

/// Events with the number of the line each came from.
pub type Numbered = Vec<(usize, Event)>;

/// One line of the file: the fields of `POST /events`, plus what the log would assign
/// (version, position, timestamp), all optional so a hand-written file stays short.
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

/// Reads and numbers the events of a JSONL file (blank lines skipped). Versions, positions and
/// ids missing from a line are derived from the file itself, never from the clock, so two
/// replays of one file see the same events. Every bad line is reported, not only the first.
pub fn read_events(path: &Path) -> Result<Vec<(usize, Event)>, ReplayError> {
    let (events, mut bad) = read_events_lenient(path)?;
    match bad.len() {
        0 => Ok(events),
        1 => Err(bad.remove(0)),
        _ => Err(ReplayError::Lines {
            path: path.to_owned(),
            errors: bad,
        }),
    }
}

/// The events of the file's good lines, and an error for each bad one.
pub fn read_events_lenient(path: &Path) -> Result<(Numbered, Vec<ReplayError>), ReplayError> {
    let mut bad_lines = Vec::new();
    let io = |source| ReplayError::Io {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut versions: HashMap<String, u64> = HashMap::new();
    let mut events = Vec::new();
    for (index, text) in std::io::BufReader::new(file).lines().enumerate() {
        let line_no = index + 1;
        let text = text.map_err(io)?;
        if text.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| ReplayError::Line {
            path: path.to_owned(),
            line: line_no,
            reason,
        };
        let line: Line = match serde_json::from_str(&text) {
            Ok(line) => line,
            Err(err) => {
                bad_lines.push(bad(format!("not a valid event: {err}")));
                continue;
            }
        };
        if line.stream.is_empty() || line.event_type.is_empty() {
            bad_lines.push(bad("`stream` and `type` must not be empty".into()));
            continue;
        }
        let last = versions.entry(line.stream.clone()).or_insert(0);
        let version = line.version.unwrap_or(*last + 1);
        if version <= *last {
            bad_lines.push(bad(format!(
                "version {version} of stream {} is not after version {last}",
                line.stream
            )));
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
                payload: line.payload,
                headers: line.headers,
            },
        ));
    }
    Ok((events, bad_lines))
}

/// Runs `plugin` over the file's events in batches of `batch_size` and returns the read model.
pub fn replay(plugin: &Plugin, path: &Path, batch_size: usize) -> Result<ReadModel, ReplayError> {
    let replayed = replay_with(plugin, path, batch_size, false)?;
    match replayed.failures.into_iter().next() {
        Some(failure) => Err(failure),
        None => Ok(replayed.model),
    }
}

/// What a replay made, and what it passed over.
pub struct Replayed {
    pub model: ReadModel,
    /// Bad lines and events the plugin failed on, in file order; with `keep_going` the model is
    /// everything else, otherwise the replay stopped at the first.
    pub failures: Vec<ReplayError>,
}

/// [`replay`]; with `keep_going`, bad lines are skipped and an event the plugin fails on is
/// left out (the rest of its batch applied), each reported in `failures`, so the model is the
/// partial one.
pub fn replay_with(
    plugin: &Plugin,
    path: &Path,
    batch_size: usize,
    keep_going: bool,
) -> Result<Replayed, ReplayError> {
    let (events, bad_lines) = if keep_going {
        read_events_lenient(path)?
    } else {
        (read_events(path)?, Vec::new())
    };
    let mut failures = bad_lines;
    let events: Vec<(usize, Event)> = events
        .into_iter()
        .filter(|(_, e)| plugin.descriptor().subscribes_to(&e.event_type))
        .collect();
    let docs = Arc::new(MemoryDocuments::default());
    for chunk in events.chunks(batch_size.max(1)) {
        let mut chunk: Vec<&(usize, Event)> = chunk.iter().collect();
        while !chunk.is_empty() {
            let batch: Vec<Event> = chunk.iter().map(|(_, e)| e.clone()).collect();
            let source = match plugin.handle(batch, docs.clone()) {
                Ok(output) => {
                    docs.apply(output);
                    break;
                }
                Err(source) => source,
            };
            let at = source.event_index().filter(|&i| i < chunk.len());
            let failure = match at.map(|i| chunk[i]) {
                Some((line, event)) => ReplayError::Plugin {
                    path: path.to_owned(),
                    line: *line,
                    event_id: event.id.clone(),
                    source: Box::new(source),
                },
                None => ReplayError::Batch {
                    path: path.to_owned(),
                    source: Box::new(source),
                },
            };
            failures.push(failure);
            match at {
                // The batch again without the event it failed on.
                Some(i) if keep_going => {
                    chunk.remove(i);
                }
                _ => {
                    return Ok(Replayed {
                        model: model_of(&docs)?,
                        failures,
                    })
                }
            }
        }
    }
    failures.sort_by_key(|f| match f {
        ReplayError::Line { line, .. } | ReplayError::Plugin { line, .. } => *line,
        _ => usize::MAX,
    });
    Ok(Replayed {
        model: model_of(&docs)?,
        failures,
    })
}

fn model_of(docs: &MemoryDocuments) -> Result<ReadModel, ReplayError> {
    let mut model = ReadModel::new();
    for (collection, docs) in docs.snapshot() {
        let out = model.entry(collection.clone()).or_default();
        for (key, bytes) in docs {
            let doc = String::from_utf8(bytes)
                .map_err(|err| err.to_string())
                .and_then(|text| RawValue::from_string(text).map_err(|err| err.to_string()))
                .map_err(|reason| ReplayError::Document {
                    collection: collection.clone(),
                    key: key.clone(),
                    reason,
                })?;
            out.insert(key, doc);
        }
    }
    Ok(model)
}
