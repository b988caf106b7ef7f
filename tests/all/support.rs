//! Shared test plumbing: the compiled plugins, event builders.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use projector::event::Event;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ has a parent")
        .to_owned()
}

/// The folder of compiled plugins; builds them first unless the test script already did
/// (it sets `PROJECTOR_PLUGINS_BUILT`).
pub fn plugins_dir() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = repo_root();
            if std::env::var_os("PROJECTOR_PLUGINS_BUILT").is_none() {
                let status = Command::new("bash")
                    .arg(root.join("scripts/build-plugins.sh"))
                    .status()
                    .expect("run scripts/build-plugins.sh");
                assert!(status.success(), "building the plugins failed");
            }
            root.join("target/plugins")
        })
        .clone()
}

pub fn plugin_path(name: &str) -> PathBuf {
    plugins_dir().join(format!("{name}.wasm"))
}

pub fn fixture_path(name: &str) -> PathBuf {
    plugins_dir().join("fixtures").join(format!("{name}.wasm"))
}

/// Builds events with per-stream versions and global positions, like the outbox does.
#[derive(Default)]
pub struct Events {
    versions: std::collections::HashMap<String, u64>,
    position: u64,
}

impl Events {
    pub fn next(&mut self, stream: &str, event_type: &str, payload: serde_json::Value) -> Event {
        let version = self.versions.entry(stream.to_owned()).or_insert(0);
        *version += 1;
        self.position += 1;
        Event {
            id: format!("{stream}-{version}"),
            stream: stream.to_owned(),
            stream_type: "Test".into(),
            event_type: event_type.to_owned(),
            version: *version,
            position: self.position,
            timestamp_ms: 1_700_000_000_000 + self.position * 1000,
            payload: serde_json::value::to_raw_value(&payload).expect("payload serializes"),
            headers: vec![],
        }
    }
}
