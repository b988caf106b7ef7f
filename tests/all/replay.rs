//! `projector replay`, run as the real binary.

use std::path::Path;
use std::process::Command;

use crate::support::{fixture_path, plugin_path};

/// Runs `projector replay` with `plugin` over `events` (JSONL).
pub fn replay(plugin: &Path, events: &str) -> std::process::Output {
    let dir = std::env::temp_dir().join(format!("projector-replay-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("events.jsonl");
    std::fs::write(&file, events).unwrap();
    Command::new(env!("CARGO_BIN_EXE_projector"))
        .arg("replay")
        .arg("--plugin")
        .arg(plugin)
        .arg("--events")
        .arg(&file)
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .output()
        .expect("projector runs")
}

const ACCOUNTS: &str = r#"{"stream":"acct-1","type":"AccountOpened","payload":{"owner":"alice","currency":"EUR"}}
{"stream":"acct-1","type":"Deposited","payload":{"amount":100}}

{"stream":"acct-2","type":"AccountOpened","payload":{"owner":"bob","currency":"USD"}}
{"stream":"acct-1","type":"Withdrawn","payload":{"amount":30}}
{"stream":"acct-2","type":"AccountClosed","payload":{}}
"#;

#[test]
fn prints_the_read_model() {
    let out = replay(&plugin_path("account-balance"), ACCOUNTS);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let model: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(model["accounts"]["acct-1"]["balance"], 70);
    assert_eq!(model["accounts"]["acct-1"]["last_version"], 3);
    assert_eq!(model["accounts"]["acct-2"]["status"], "closed");
}

#[test]
fn two_runs_are_byte_identical_even_with_clocks_and_randomness() {
    let events = r#"{"stream":"a","type":"Count","payload":{},"timestamp_ms":1700000000000}
{"stream":"a","type":"Clock","payload":{}}
{"stream":"b","type":"Clock","payload":{},"timestamp_ms":1700000005000}
"#;
    let first = replay(&fixture_path("misbehave"), events);
    let second = replay(&fixture_path("misbehave"), events);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(!first.stdout.is_empty());
    assert_eq!(first.stdout, second.stdout);
    let model: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    assert!(model["out"]["a-2"]["random"].is_u64());

    let accounts_first = replay(&plugin_path("account-balance"), ACCOUNTS);
    let accounts_second = replay(&plugin_path("account-balance"), ACCOUNTS);
    assert_eq!(accounts_first.stdout, accounts_second.stdout);
}

#[test]
fn a_malformed_line_is_reported_with_its_number() {
    let events = "{\"stream\":\"a\",\"type\":\"AccountOpened\",\"payload\":{\"owner\":\"x\",\"currency\":\"EUR\"}}\n{\"stream\":\"a\",\"type\":\"Deposited\"\n";
    let out = replay(&plugin_path("account-balance"), events);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("events.jsonl:2:"), "{stderr}");
    assert!(stderr.contains("not a valid event"), "{stderr}");
}

#[test]
fn a_failing_plugin_names_the_event_and_the_guests_message() {
    let events = "{\"stream\":\"a\",\"type\":\"AccountOpened\",\"payload\":{\"owner\":\"x\",\"currency\":\"EUR\"}}\n{\"stream\":\"ghost\",\"type\":\"Deposited\",\"payload\":{\"amount\":1}}\n";
    let out = replay(&plugin_path("account-balance"), events);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("events.jsonl:2: event ghost-1"), "{stderr}");
    assert!(
        stderr.contains("account ghost was never opened"),
        "{stderr}"
    );
}
