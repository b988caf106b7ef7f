//! The plugin author's path outside this repository: `projector new`, `cargo test`,
//! `projector build`, `projector replay`, each as a user runs it.

use std::path::Path;
use std::process::Command;

use crate::support::{repo_root, tempdir};

fn projector(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_projector"))
        .args(args)
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", shared_target())
        .output()
        .expect("projector runs")
}

/// Built crates share one target folder across runs: the SDK and serde compile once.
fn shared_target() -> std::path::PathBuf {
    repo_root().join("target/author-tests")
}

fn ok(out: &std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cargo_test(dir: &Path) {
    let out = Command::new("cargo")
        .args(["test", "--quiet"])
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", shared_target())
        .output()
        .expect("cargo runs");
    ok(&out, "cargo test");
}

#[test]
fn new_test_build_replay_works_outside_the_repository() {
    let outside = tempdir("author");
    assert!(!outside.starts_with(repo_root()));
    let said = ok(&projector(&["new", "demo"], &outside), "projector new");
    assert!(said.contains("cargo test && projector build"), "{said}");
    let demo = outside.join("demo");
    for file in ["Cargo.toml", "src/lib.rs", "events.jsonl", "README.md"] {
        assert!(demo.join(file).is_file(), "{file} written");
    }
    cargo_test(&demo);
    let built = ok(&projector(&["build"], &demo), "projector build");
    let path = built.lines().next().unwrap().trim().to_owned();
    assert!(path.ends_with("demo.wasm"), "{built}");
    assert!(built.contains("world projection"), "{built}");
    assert!(built.contains("demo 0.1.0"), "{built}");
    assert!(
        built.contains("collection carts (indexed: status)"),
        "{built}"
    );
    let cache = outside.join("cache");
    let cache = cache.to_str().unwrap();
    let model = ok(
        &projector(
            &[
                "replay",
                "--plugin",
                &path,
                "--events",
                "events.jsonl",
                "--cache-dir",
                cache,
            ],
            &demo,
        ),
        "projector replay",
    );
    let model: serde_json::Value = serde_json::from_str(&model).unwrap();
    assert_eq!(model["carts"]["cart-1"]["item_count"], 1, "{model}");
    assert_eq!(model["carts"]["cart-1"]["status"], "checked_out", "{model}");
    assert_eq!(model["carts"]["cart-2"]["items"]["plum"], 2, "{model}");
    // The same name again is refused, saying why.
    let again = projector(&["new", "demo"], &outside);
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.starts_with("error: ") && stderr.contains("exists already"),
        "{stderr}"
    );
}

#[test]
fn a_new_observer_tests_and_builds_as_written() {
    let outside = tempdir("author-observer");
    ok(
        &projector(&["new", "checkout-hook", "--observer"], &outside),
        "projector new --observer",
    );
    let crate_dir = outside.join("checkout-hook");
    cargo_test(&crate_dir);
    let built = ok(
        &projector(&["build", crate_dir.to_str().unwrap()], &outside),
        "projector build DIR",
    );
    assert!(built.contains("world observer"), "{built}");
    assert!(built.contains("events: CheckedOut"), "{built}");
}

/// `replay --keep-going`: every bad line and failing event reported, once each, the partial
/// model printed, exit code 2; without it, the first failure alone and no model.
#[test]
fn replay_keeps_going_past_bad_lines_and_failing_events() {
    let dir = tempdir("replay-keep-going");
    let events = dir.join("events.jsonl");
    std::fs::write(
        &events,
        [
            r#"{"stream":"a","type":"AccountOpened","payload":{"owner":"x","currency":"EUR"}}"#,
            r#"{"stream":"a","type":"Deposited""#,
            r#"{"stream":"ghost","type":"Deposited","payload":{"amount":1}}"#,
            r#"{"stream":"a","type":"Deposited","payload":{"amount":"lots"}}"#,
            r#"{"stream":"a","type":"Deposited","payload":{"amount":5}}"#,
            r#"{"type":"Deposited","payload":{}}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let plugin = crate::support::plugin_path("account-balance");
    let cache = dir.join("cache");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "replay",
            "--plugin",
            plugin.to_str().unwrap(),
            "--events",
            events.to_str().unwrap(),
            "--cache-dir",
            cache.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        Command::new(env!("CARGO_BIN_EXE_projector"))
            .args(&args)
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap()
    };
    let out = run(&["--keep-going"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for line in [
        ":2: not a valid event",
        ":3: event ghost-1",
        ":4: event a-2",
        ":6: not a valid event",
    ] {
        assert_eq!(stderr.matches(line).count(), 1, "{line} once in:\n{stderr}");
    }
    assert!(
        stderr.contains("amount: invalid type"),
        "the field is named: {stderr}"
    );
    assert!(!stderr.contains("stack backtrace"), "{stderr}");
    let model: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(model["accounts"]["a"]["balance"], 5, "{model}");
    // Without --keep-going: the bad lines, all of them, and no model.
    let out = run(&[]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("2 bad lines"), "{stderr}");
    assert_eq!(stderr.matches("error: ").count(), 1, "{stderr}");
}
