//! Invariant 2: a batch's documents and the checkpoint commit together, so a SIGKILL at any
//! moment leaves a prefix of the stream applied and a restart goes on from there.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::support::{on_both_stores, plugin_path, plugin_set, tempdir, Api, Backend, Server};

/// How much history a test builds: accounts opened, then operations round-robin over them.
#[derive(Clone, Copy)]
struct Scale {
    accounts: usize,
    ops_per_account: usize,
}

const SMALL: Scale = Scale {
    accounts: 100,
    ops_per_account: 49,
};

async fn all_documents(api: &Api, min_position: u64) -> BTreeMap<String, Value> {
    let mut docs = BTreeMap::new();
    let mut cursor = String::new();
    loop {
        let (status, body) = api
            .get(&format!(
                "/projections/account-balance/accounts?limit=1000&min_position={min_position}&timeout_ms=60000{cursor}"
            ))
            .await;
        assert_eq!(status, 200, "{body}");
        for item in body["items"].as_array().unwrap() {
            docs.insert(
                item["key"].as_str().unwrap().to_owned(),
                item["document"].clone(),
            );
        }
        match body["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => return docs,
        }
    }
}

/// Fills the outbox of `data` (no projection running) with accounts opened and operations on
/// them; returns the events as JSONL lines and the position after each request of 500.
async fn fill_outbox(
    backend: &Backend,
    data: &std::path::Path,
    scale: Scale,
    rng: &mut rand::rngs::StdRng,
) -> (Vec<String>, Vec<u64>) {
    let writer = Server::start_on(backend, &plugin_set(&[], &[]), data, &[]);
    let api = writer.api();
    let mut events = Vec::new();
    for a in 0..scale.accounts {
        events.push(json!({"stream": format!("acct-{a:03}"), "stream_type": "Account",
            "type": "AccountOpened", "payload": {"owner": format!("owner-{a}"), "currency": "EUR"}}));
    }
    for i in 0..scale.accounts * scale.ops_per_account {
        let kind = if rng.next_u32().is_multiple_of(3) {
            "Withdrawn"
        } else {
            "Deposited"
        };
        let amount = 1 + rng.next_u32() % 100;
        events.push(
            json!({"stream": format!("acct-{:03}", i % scale.accounts), "stream_type": "Account",
            "type": kind, "payload": {"amount": amount}}),
        );
    }
    let mut positions = Vec::new();
    for chunk in events.chunks(500) {
        let (status, body) = api.post("/events", &json!({ "events": chunk })).await;
        assert_eq!(status, 201, "{body}");
        positions.push(body["position"].as_u64().unwrap());
    }
    (events.iter().map(|e| e.to_string()).collect(), positions)
}

/// The read model of one uninterrupted `projector replay` over `lines`.
fn replayed(data: &std::path::Path, lines: &[String]) -> BTreeMap<String, Value> {
    let file = data.join("events.jsonl");
    let mut out = std::fs::File::create(&file).unwrap();
    for line in lines {
        writeln!(out, "{line}").unwrap();
    }
    let replay = std::process::Command::new(env!("CARGO_BIN_EXE_projector"))
        .args(["replay", "--plugin"])
        .arg(plugin_path("account-balance"))
        .arg("--events")
        .arg(&file)
        .arg("--cache-dir")
        .arg(data.join("cache"))
        .output()
        .unwrap();
    assert!(
        replay.status.success(),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    let expected: Value = serde_json::from_slice(&replay.stdout).unwrap();
    serde_json::from_value(expected["accounts"].clone()).unwrap()
}

fn assert_every_event_applied_once(served: &BTreeMap<String, Value>, scale: Scale) {
    assert_eq!(served.len(), scale.accounts);
    for (key, doc) in served {
        assert_eq!(
            doc["tx_count"], scale.ops_per_account as u64,
            "{key}: {doc}"
        );
        assert_eq!(
            doc["last_version"],
            scale.ops_per_account as u64 + 1,
            "{key}: {doc}"
        );
    }
}

on_both_stores! {
    async fn sigkill_mid_catch_up_ten_times_loses_and_repeats_nothing(backend) {
        // Small batches: many commits, so the kills land between and during them.
        sigkill_ten_times(&backend, SMALL, "40").await;
    }
}

/// The PostgreSQL acceptance run: 100,000 events, default batches.
#[tokio::test]
async fn postgres_sigkill_ten_times_during_a_100k_event_catch_up() {
    let scale = Scale {
        accounts: 1000,
        ops_per_account: 99,
    };
    sigkill_ten_times(&Backend::postgres().await, scale, "2000").await;
}

/// Kills the server at ten random points of its catch-up (once the checkpoint has passed a
/// randomly chosen request's events, plus a random pause to land mid-batch too), then checks
/// the final read model against a replay.
async fn sigkill_ten_times(backend: &Backend, scale: Scale, batch: &str) {
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let data = tempdir("restart");
    let (lines, positions) = fill_outbox(backend, &data, scale, &mut rng).await;
    let head = *positions.last().unwrap();
    let mut targets: Vec<u64> = (0..10)
        .map(|_| positions[rng.next_u32() as usize % (positions.len() - 1)])
        .collect();
    targets.sort_unstable();

    let env = [("PROJECTOR_RUNNER__MAX_BATCH_EVENTS", batch)];
    let plugins = plugin_set(&["account-balance"], &[]);
    let mut server = Server::start_on(backend, &plugins, &data, &env);
    let mut mid_catch_up = 0;
    for (round, target) in targets.into_iter().enumerate() {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let checkpoint = loop {
            let checkpoint = server.api().projection("account-balance").await["checkpoint"]
                .as_u64()
                .unwrap();
            if checkpoint >= target {
                break checkpoint;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "stuck at {checkpoint}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        tokio::time::sleep(Duration::from_millis(u64::from(rng.next_u32() % 15))).await;
        server.kill();
        println!(
            "round {round}: killed at checkpoint {checkpoint} (or a batch or two later) of {head}"
        );
        if checkpoint < head {
            mid_catch_up += 1;
        }
        server.restart();
    }
    assert!(
        mid_catch_up >= 5,
        "only {mid_catch_up} of 10 kills landed mid-catch-up"
    );

    let served = all_documents(&server.api(), head).await;
    assert_every_event_applied_once(&served, scale);
    assert_eq!(served, replayed(&data, &lines));
}

on_both_stores! {
    /// The runner handles batch N+1 while N commits, reading N's documents from its cache; a cache
    /// far smaller than the working set is dropped and refilled all the time, and must never
    /// serve a stale document. Batches of 60 over 100 round-robin accounts make consecutive
    /// batches share accounts, so a document of the batch still committing is read again.
    async fn a_tiny_document_cache_changes_nothing_but_speed(backend) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let data = tempdir("tiny-cache");
        let (lines, positions) = fill_outbox(&backend, &data, SMALL, &mut rng).await;
        let head = *positions.last().unwrap();
        let env = [
            ("PROJECTOR_RUNNER__MAX_BATCH_EVENTS", "60"),
            ("PROJECTOR_RUNNER__CACHED_DOCUMENTS", "7"),
        ];
        let server =
            Server::start_on(&backend, &plugin_set(&["account-balance"], &[]), &data, &env);
        let served = all_documents(&server.api(), head).await;
        assert_every_event_applied_once(&served, SMALL);
        assert_eq!(served, replayed(&data, &lines));
    }
}
