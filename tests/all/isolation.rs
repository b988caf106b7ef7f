//! A bad event costs one stream, not the projection: the real binary and the `poison` fixture
//! on both stores. The culprits become dead letters, their streams are parked, everything else
//! is applied once; an operator retries or skips them through the admin API.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{eventually, fixture_path, on_both_stores, tempdir, Api, Backend, Server};

pub const TOKEN: &str = "s3cret-admin-token";

/// One appended event, as the test keeps it.
#[derive(Clone, Debug)]
pub struct Appended {
    pub stream: String,
    pub version: u64,
    pub position: u64,
    pub payload: Value,
}

/// How the poisoned events fail, and a word of the reason each must give.
const POISONS: [(&str, &str); 5] = [
    ("error", "poisoned event"),
    ("panic", "panicked"),
    ("loop", "deadline"),
    ("bomb", "memory limit"),
    ("oversize", "MiB of documents"),
];

/// Limits that make each poison fail fast enough for a test.
pub const LIMITS: [(&str, &str); 4] = [
    ("PROJECTOR_LIMITS__DEADLINE_MS", "1000"),
    ("PROJECTOR_LIMITS__MEMORY_MB", "64"),
    ("PROJECTOR_LIMITS__MAX_OUTPUT_MB", "1"),
    ("PROJECTOR_ADMIN__TOKEN", TOKEN),
];

/// POSTs to an admin route with the test's token.
pub async fn admin(api: &Api, path: &str) -> (u16, Value) {
    let response = api
        .http
        .post(format!("{}{path}", api.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("POST");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Appends `(stream, payload)` pairs in order, 1000 per request; returns them as appended.
pub async fn append_all(api: &Api, events: &[(String, Value)]) -> Vec<Appended> {
    let mut appended = Vec::with_capacity(events.len());
    for chunk in events.chunks(1000) {
        let body: Vec<Value> = chunk
            .iter()
            .map(|(stream, payload)| {
                json!({"stream": stream, "stream_type": "Thing", "type": "Happened", "payload": payload})
            })
            .collect();
        let (status, answer) = api.post("/events", &json!({ "events": body })).await;
        assert_eq!(status, 201, "{answer}");
        for (e, (stream, payload)) in answer["events"].as_array().unwrap().iter().zip(chunk) {
            appended.push(Appended {
                stream: stream.clone(),
                version: e["version"].as_u64().unwrap(),
                position: e["position"].as_u64().unwrap(),
                payload: payload.clone(),
            });
        }
    }
    appended
}

/// Polls `GET /projections/{name}` until its checkpoint reaches `position` (or it fails).
pub async fn wait_checkpoint(api: &Api, name: &str, position: u64, within: Duration) -> Value {
    eventually(within, || async {
        let (status, body) = api.get(&format!("/projections/{name}")).await;
        assert_ne!(body["status"], "failed", "{body}");
        if status == 200 && body["checkpoint"].as_u64().unwrap_or(0) >= position {
            Ok(body)
        } else {
            Err(format!("not at {position}: {body}"))
        }
    })
    .await
}

/// Every document of a collection, by key.
pub async fn all_documents(api: &Api, path: &str) -> BTreeMap<String, Value> {
    let mut docs = BTreeMap::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{path}?limit=500");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let (status, body) = api.get(&url).await;
        assert_eq!(status, 200, "{body}");
        for item in body["items"].as_array().unwrap() {
            docs.insert(
                item["key"].as_str().unwrap().to_owned(),
                item["document"].clone(),
            );
        }
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return docs,
        }
    }
}

/// Every dead letter, paged.
pub async fn all_dead_letters(api: &Api, name: &str) -> Vec<Value> {
    let mut letters = Vec::new();
    let mut after = 0;
    loop {
        let (status, body) = api
            .get(&format!(
                "/projections/{name}/_dead_letters?after={after}&limit=500"
            ))
            .await;
        assert_eq!(status, 200, "{body}");
        letters.extend(body["items"].as_array().unwrap().iter().cloned());
        match body["next_after"].as_u64() {
            Some(next) => after = next,
            None => return letters,
        }
    }
}

/// `projector replay` of `events` with `plugin`: the collection `streams`, by key.
fn replay(plugin: &Path, events: &[&Appended]) -> BTreeMap<String, Value> {
    let lines: Vec<String> = events
        .iter()
        .map(|e| {
            json!({"stream": e.stream, "stream_type": "Thing", "type": "Happened",
                   "payload": e.payload, "version": e.version})
            .to_string()
        })
        .collect();
    let out = crate::replay::replay(plugin, &lines.join("\n"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let model: BTreeMap<String, BTreeMap<String, Value>> =
        serde_json::from_slice(&out.stdout).unwrap();
    model.get("streams").cloned().unwrap_or_default()
}

/// A poisoned event: its index in the log, how it fails, a word of its reason.
type Poisoned = (usize, &'static str, &'static str);

/// 1,000 streams × 50 events, round robin; 10 of them poisoned, two of each kind, in
/// different streams, mid-stream. Returns the events and the poisoned ones' indexes.
fn poisoned_log() -> (Vec<(String, Value)>, Vec<Poisoned>) {
    let mut events = Vec::with_capacity(50_000);
    let mut poisoned = Vec::new();
    for round in 0..50u64 {
        for s in 0..1000u64 {
            let stream = format!("s-{s:04}");
            let mut payload = json!({"amount": round + 1});
            // Streams 7, 107, … 907 are poisoned at rounds 5 to 14.
            if s % 100 == 7 && round == 5 + s / 100 {
                let (how, why) = POISONS[(s / 100) as usize % POISONS.len()];
                payload["poison"] = json!(how);
                poisoned.push((events.len(), how, why));
            }
            events.push((stream, payload));
        }
    }
    (events, poisoned)
}

on_both_stores! {
    /// 50,000 events over 1,000 streams, 10 poisoned (an error, a panic, an endless loop, a
    /// memory bomb, an oversized document; two of each): exactly those 10 become dead letters,
    /// exactly the later events of their streams are parked, every other document is what
    /// `projector replay` makes of the unaffected events. Then, with the fixed plugin, five
    /// are retried and five skipped.
    async fn poisoned_catch_up_costs_ten_streams_then_retry_and_skip_clear_them(backend) {
        let plugins = tempdir("plugins");
        let data = tempdir("data");
        let mut server = Server::start_on(&backend, &plugins, &data, &LIMITS);
        let (log, poisoned) = poisoned_log();
        let appended = append_all(&server.api(), &log).await;
        let head = appended.last().unwrap().position;

        // A catch-up: the plugin arrives after the events.
        std::fs::copy(fixture_path("poison"), plugins.join("poison.wasm")).unwrap();
        server.restart();
        let api = server.api();
        let summary = wait_checkpoint(&api, "poison", head, Duration::from_secs(300)).await;
        assert_eq!(summary["status"], "running", "{summary}");
        assert_eq!(summary["parked_streams"], 10, "{summary}");

        let culprits: BTreeMap<u64, (&Appended, &str)> = poisoned
            .iter()
            .map(|&(i, _, why)| (appended[i].position, (&appended[i], why)))
            .collect();
        let bad_streams: BTreeMap<&str, &Appended> =
            culprits.values().map(|(e, _)| (e.stream.as_str(), *e)).collect();
        let letters = all_dead_letters(&api, "poison").await;
        let heads: Vec<&Value> = letters.iter().filter(|l| l["kind"] == "plugin").collect();
        assert_eq!(heads.len(), 10, "{heads:#?}");
        for letter in &heads {
            let position = letter["position"].as_u64().unwrap();
            let (event, why) = culprits.get(&position).unwrap_or_else(|| panic!("not a poisoned event: {letter}"));
            assert_eq!(letter["stream"], event.stream.as_str());
            assert!(letter["event_id"].as_str().is_some_and(|id| id.len() == 36), "{letter}");
            let reason = letter["reason"].as_str().unwrap();
            assert!(reason.contains(why), "{why:?} not in {reason:?}");
            assert_eq!(letter["state"], "open");
            assert_eq!(letter["plugin_version"], "1.0.0");
        }
        let parked: BTreeSet<u64> = letters
            .iter()
            .filter(|l| l["kind"] == "parked")
            .map(|l| l["position"].as_u64().unwrap())
            .collect();
        let expected_parked: BTreeSet<u64> = appended
            .iter()
            .filter(|e| bad_streams.get(e.stream.as_str()).is_some_and(|bad| e.version > bad.version))
            .map(|e| e.position)
            .collect();
        assert_eq!(parked, expected_parked);
        assert_eq!(letters.len(), 10 + expected_parked.len());

        // Every stream's document is the replay of its events before any poison.
        let applied: Vec<&Appended> = appended
            .iter()
            .filter(|e| bad_streams.get(e.stream.as_str()).is_none_or(|bad| e.version < bad.version))
            .collect();
        let expected = replay(&fixture_path("poison"), &applied);
        let docs = all_documents(&api, "/projections/poison/streams").await;
        assert_eq!(docs.len(), 1000);
        assert_eq!(docs, expected);
        for doc in docs.values() {
            // Applied once each: as many events counted as the last version says.
            assert_eq!(doc["count"], doc["last_version"], "{doc}");
        }

        let (status, parked_view) = api.get("/projections/poison/_parked").await;
        assert_eq!(status, 200);
        assert_eq!(parked_view["items"].as_array().unwrap().len(), 10, "{parked_view}");
        let (status, ready) = api.get("/readyz").await;
        assert_eq!(status, 200, "parked streams still serve: {ready}");
        assert!(ready.to_string().contains("parked_streams"), "{ready}");
        let (_, metrics) = api.get("/metrics").await;
        let metrics = metrics.as_str().unwrap();
        assert!(metrics.contains("projector_dead_letters_total{projection=\"poison\",reason=\"plugin\"} 10"), "{metrics}");
        assert!(metrics.contains("projector_parked_streams{projection=\"poison\"} 10"), "{metrics}");

        // A read waiting for a parked version says so.
        let (stream, first_bad) = bad_streams.iter().next().map(|(s, e)| (s.to_string(), *e)).unwrap();
        let later = first_bad.version + 1;
        let (status, body) = api
            .get(&format!("/projections/poison/streams/{stream}?wait_for={stream}@{later}"))
            .await;
        assert_eq!(status, 409, "{body}");
        assert_eq!(body["error"]["code"], "dead_lettered");

        // The fixed plugin, same name and version, after a restart.
        std::fs::copy(
            fixture_path("poison-fixed/poison"),
            plugins.join("poison.wasm"),
        )
        .unwrap();
        server.restart();
        let api = server.api();
        wait_checkpoint(&api, "poison", head, Duration::from_secs(60)).await;
        let sum: u64 = (1..=50).sum();
        for (n, (&position, (event, _))) in culprits.iter().enumerate() {
            let skip = n % 2 == 1;
            let action = if skip { "skip" } else { "retry" };
            let (status, body) = admin(
                &api,
                &format!("/admin/projections/poison/dead-letters/{position}/{action}"),
            )
            .await;
            assert_eq!(status, 200, "{action} {position}: {body}");
            let behind = 50 - event.version;
            let applied = if skip { behind } else { behind + 1 };
            assert_eq!(body["outcome"]["applied"], applied, "{body}");
            let (status, doc) = api
                .get(&format!(
                    "/projections/poison/streams/{0}?wait_for={0}@50",
                    event.stream
                ))
                .await;
            assert_eq!(status, 200, "{doc}");
            let doc = &doc["document"];
            assert_eq!(doc["last_version"], 50, "{doc}");
            if skip {
                assert_eq!(doc["count"], 49, "{doc}");
                assert_eq!(doc["sum"], sum - event.version, "{doc}");
            } else {
                assert_eq!(doc["count"], 50, "{doc}");
                assert_eq!(doc["sum"], sum, "{doc}");
            }
            // Done once: a second action on it is refused.
            let (status, body) = admin(
                &api,
                &format!("/admin/projections/poison/dead-letters/{position}/retry"),
            )
            .await;
            assert_eq!(status, 409, "{body}");
        }
        // The formerly parked read now answers.
        let (status, body) = api
            .get(&format!("/projections/poison/streams/{stream}?wait_for={stream}@{later}"))
            .await;
        assert_eq!(status, 200, "{body}");
        let (_, parked_view) = api.get("/projections/poison/_parked").await;
        assert_eq!(parked_view["items"], json!([]), "{parked_view}");
        let letters = all_dead_letters(&api, "poison").await;
        assert_eq!(letters.len(), 10, "parked rows are released: {letters:#?}");
        for letter in &letters {
            let state = letter["state"].as_str().unwrap();
            assert!(state == "retried" || state == "skipped", "{letter}");
            assert!(letter["resolved_at"].is_i64(), "{letter}");
            let actions = letter["actions"].as_array().unwrap();
            assert_eq!(actions.len(), 1, "{letter}");
            assert_eq!(actions[0]["action"], if state == "retried" { "retry" } else { "skip" });
        }
        let summary = api.projection("poison").await;
        assert_eq!(summary["parked_streams"], 0, "{summary}");
    }

    /// The host is killed (SIGKILL) while a retry runs: after a restart the dead letter's stream
    /// is either as before the retry (still parked, the letter open) or as after it, never
    /// half-applied; a retry then completes it.
    async fn a_retry_killed_midway_leaves_the_state_before_or_after(backend) {
        let plugins = tempdir("plugins");
        let data = tempdir("data");
        std::fs::copy(fixture_path("poison"), plugins.join("poison.wasm")).unwrap();
        let mut server = Server::start_on(&backend, &plugins, &data, &[("PROJECTOR_ADMIN__TOKEN", TOKEN)]);
        // v2 fails; v3..v8 are slow (they spin) and wait parked behind it.
        let mut log = vec![("k".to_owned(), json!({"amount": 1})), ("k".to_owned(), json!({"amount": 2, "poison": "error"}))];
        for v in 3..=8 {
            log.push(("k".to_owned(), json!({"amount": v, "spin": 150_000_000u64})));
        }
        let appended = append_all(&server.api(), &log).await;
        let head = appended.last().unwrap().position;
        let dead = appended[1].position;
        wait_checkpoint(&server.api(), "poison", head, Duration::from_secs(60)).await;

        std::fs::copy(fixture_path("poison-fixed/poison"), plugins.join("poison.wasm")).unwrap();
        server.restart();
        let api = server.api();
        wait_checkpoint(&api, "poison", head, Duration::from_secs(60)).await;
        let retry = tokio::spawn({
            let api = api.clone();
            async move { admin(&api, &format!("/admin/projections/poison/dead-letters/{dead}/retry")).await }
        });
        // Killed once the retry is running the plugin.
        let log_file = server.data_dir.join("server.log");
        eventually(Duration::from_secs(30), || async {
            let log = std::fs::read_to_string(&log_file).unwrap_or_default();
            match log.contains("running a dead letter's stream again") {
                true => Ok(()),
                false => Err("the retry never started".to_owned()),
            }
        })
        .await;
        server.kill();
        let _ = retry.await;
        server.restart();
        let api = server.api();
        wait_checkpoint(&api, "poison", head, Duration::from_secs(60)).await;
        let (_, doc) = api.get("/projections/poison/streams/k").await;
        let letters = all_dead_letters(&api, "poison").await;
        let version = doc["document"]["last_version"].as_u64().unwrap();
        let before = version == 1
            && letters.len() == 7
            && letters[0]["state"] == "open";
        let after = version == 8 && letters.len() == 1 && letters[0]["state"] == "retried";
        assert!(before || after, "half a retry: {doc}\n{letters:#?}");
        if before {
            let (status, body) = admin(&api, &format!("/admin/projections/poison/dead-letters/{dead}/retry")).await;
            assert_eq!(status, 200, "{body}");
            let (_, doc) = api.get("/projections/poison/streams/k").await;
            assert_eq!(doc["document"]["count"], 8, "{doc}");
        }
    }
}

/// With `on_error = "stop"` in the config file for this projection, a poisoned event stops it
/// as before isolation existed: failed, nothing set aside; a restart command fails again on the
/// same event.
#[tokio::test]
async fn on_error_stop_halts_the_projection_and_restart_runs_it_again() {
    let plugins = tempdir("plugins");
    std::fs::copy(fixture_path("poison"), plugins.join("poison.wasm")).unwrap();
    let data = tempdir("data");
    let config = data.join("projector.toml");
    std::fs::write(
        &config,
        format!("[admin]\ntoken = \"{TOKEN}\"\n\n[projections.poison]\non_error = \"stop\"\n"),
    )
    .unwrap();
    let config = config.display().to_string();
    let server = Server::start_on(
        &Backend::Sqlite,
        &plugins,
        &data,
        &[("PROJECTOR_CONFIG", &config)],
    );
    let api = server.api();
    let appended = append_all(
        &api,
        &[
            ("a".into(), json!({"amount": 1})),
            ("b".into(), json!({"poison": "error"})),
            ("c".into(), json!({"amount": 3})),
        ],
    )
    .await;
    let summary = eventually(Duration::from_secs(30), || async {
        let summary = api.projection("poison").await;
        match summary["status"] == "failed" {
            true => Ok(summary),
            false => Err(summary.to_string()),
        }
    })
    .await;
    assert!(
        summary["checkpoint"].as_u64().unwrap() < appended[1].position,
        "{summary}"
    );
    assert!(
        summary["error"]
            .as_str()
            .unwrap()
            .contains("poisoned event"),
        "{summary}"
    );
    assert!(all_dead_letters(&api, "poison").await.is_empty());
    let (status, _) = api.get("/readyz").await;
    assert_eq!(status, 503);
    let (status, body) = admin(&api, "/admin/projections/poison/restart").await;
    assert_eq!(status, 200, "{body}");
    // It runs again, and stops again on the same event: a second failure in the log.
    let log_file = server.data_dir.join("server.log");
    eventually(Duration::from_secs(30), || async {
        let log = std::fs::read_to_string(&log_file).unwrap_or_default();
        match log.matches("projection failed and stopped").count() {
            2.. => Ok(()),
            n => Err(format!("{n} failures logged")),
        }
    })
    .await;
    let summary = api.projection("poison").await;
    assert_eq!(summary["status"], "failed", "{summary}");
    assert!(
        summary["error"]
            .as_str()
            .unwrap()
            .contains("poisoned event"),
        "{summary}"
    );
    assert!(summary["checkpoint"].as_u64().unwrap() < appended[1].position);
}

/// Two instances on one PostgreSQL database: a command sent to the instance standing by
/// reaches the one that runs the projection, and its answer comes back.
#[tokio::test]
async fn a_command_to_a_standby_instance_reaches_the_running_one() {
    let backend = Backend::postgres().await;
    let plugins = tempdir("plugins");
    std::fs::copy(fixture_path("poison"), plugins.join("poison.wasm")).unwrap();
    let env = [("PROJECTOR_ADMIN__TOKEN", TOKEN)];
    let first = Server::start_on(&backend, &plugins, &tempdir("data"), &env);
    let appended = append_all(
        &first.api(),
        &[
            ("a".into(), json!({"amount": 1})),
            ("a".into(), json!({"amount": 2, "poison": "error"})),
            ("a".into(), json!({"amount": 3})),
        ],
    )
    .await;
    let head = appended[2].position;
    wait_checkpoint(&first.api(), "poison", head, Duration::from_secs(60)).await;
    let second = Server::start_on(&backend, &plugins, &tempdir("data"), &env);
    let (running, standby) = eventually(Duration::from_secs(30), || async {
        let one = first.api().projection("poison").await;
        let two = second.api().projection("poison").await;
        match (one["status"].as_str(), two["status"].as_str()) {
            (Some("running"), Some("standby")) => Ok((first.api(), second.api())),
            (Some("standby"), Some("running")) => Ok((second.api(), first.api())),
            _ => Err(format!("{one}\n{two}")),
        }
    })
    .await;
    let dead = appended[1].position;
    let (status, body) = admin(
        &standby,
        &format!("/admin/projections/poison/dead-letters/{dead}/skip"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["outcome"]["applied"], 1, "{body}");
    let (status, doc) = running
        .get("/projections/poison/streams/a?wait_for=a@3")
        .await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["document"]["count"], 2, "{doc}");
    assert_eq!(doc["document"]["sum"], 4, "{doc}");
    let letters = all_dead_letters(&standby, "poison").await;
    assert_eq!(letters.len(), 1, "{letters:#?}");
    assert_eq!(letters[0]["state"], "skipped");
}
