//! Observers end to end: the `relay` fixture asks for one webhook per event; a real receiver
//! (`receiver.rs`) fails, stalls and deduplicates; the host must deliver every action exactly
//! once as far as the receiver's dedup can tell, per stream in event order, with bounded
//! attempts, across kill -9, and never again on a replay.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::receiver::{Behaviour, Receiver};
use crate::support::{
    eventually, on_both_stores, plugin_path, plugin_set, tempdir, Api, Backend, Server,
};

const OBSERVER: &str = "relay";
const TOKEN: &str = "observer-test-token";

/// A config file: the relay's URL, its delivery settings, the admin token.
fn config(dir: &Path, receiver: &Receiver, delivery: &str) -> PathBuf {
    let path = dir.join("projector.toml");
    let text = format!(
        "[admin]\ntoken = \"{TOKEN}\"\n\n[plugins.relay]\nurl = \"{url}\"\n\n\
         [observers.relay]\nallow_hosts = [\"{addr}\"]\n{delivery}\n",
        url = receiver.url(),
        addr = receiver.addr,
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn start(backend: &Backend, receiver: &Receiver, delivery: &str, extra: &[&str]) -> Server {
    let data = tempdir("observer");
    let file = config(&data, receiver, delivery);
    let mut examples = vec![];
    examples.extend_from_slice(extra);
    let plugins = plugin_set(&examples, &[OBSERVER]);
    Server::start_on(
        backend,
        &plugins,
        &data,
        &[("PROJECTOR_CONFIG", file.to_str().unwrap())],
    )
}

/// Appends `per_stream` events to each of `streams` streams, interleaved, in requests of up to
/// 500; returns the expected keys, and each stream's event ids in order.
async fn append(
    api: &Api,
    streams: usize,
    per_stream: usize,
    prefix: &str,
) -> (HashSet<String>, HashMap<String, Vec<String>>) {
    let mut keys = HashSet::new();
    let mut order: HashMap<String, Vec<String>> = HashMap::new();
    let mut batch = Vec::new();
    for n in 0..per_stream {
        for s in 0..streams {
            let stream = format!("{prefix}-{s}");
            let id = uuid::Uuid::new_v4().to_string();
            keys.insert(format!("{OBSERVER}:{id}:0"));
            order.entry(stream.clone()).or_default().push(id.clone());
            batch.push(json!({
                "id": id, "stream": stream, "stream_type": "Account", "type": "Deposited",
                "payload": {"amount": n + 1},
            }));
            if batch.len() == 500 {
                post_events(api, std::mem::take(&mut batch)).await;
            }
        }
    }
    if !batch.is_empty() {
        post_events(api, batch).await;
    }
    (keys, order)
}

async fn post_events(api: &Api, events: Vec<Value>) {
    let (status, body) = api.post("/events", &json!({ "events": events })).await;
    assert_eq!(status, 201, "{body}");
}

async fn observer(api: &Api) -> Value {
    let (status, body) = api.get(&format!("/observers/{OBSERVER}")).await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn admin(api: &Api, path: &str) -> (u16, Value) {
    let response = api
        .http
        .post(format!("{}{path}", api.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Waits until the receiver has accepted every expected key.
async fn all_accepted(receiver: &Receiver, expected: &HashSet<String>, within: Duration) {
    eventually(within, || async {
        let accepted = receiver.accepted();
        if accepted.len() >= expected.len() {
            Ok(())
        } else {
            Err(format!("{} of {} accepted", accepted.len(), expected.len()))
        }
    })
    .await
}

/// The receiver's view checked: each expected key accepted exactly once, nothing unexpected,
/// per stream in event order, every repeat with the same body, attempts within `max`.
fn check_delivery(
    receiver: &Receiver,
    expected: &HashSet<String>,
    order: &HashMap<String, Vec<String>>,
    max_attempts: Option<u32>,
) -> (usize, u32) {
    let log = receiver.log.lock().unwrap();
    let accepted: HashSet<&String> = log.accepted.iter().collect();
    assert_eq!(accepted.len(), log.accepted.len(), "a key accepted twice");
    assert_eq!(log.accepted.len(), expected.len(), "accepted count");
    for key in &log.accepted {
        assert!(expected.contains(key), "unexpected key {key}");
    }
    for arrival in &log.arrivals {
        assert!(
            expected.contains(&arrival.key),
            "a request with an unknown key {}",
            arrival.key
        );
    }
    assert!(
        log.conflicts.is_empty(),
        "one key, two bodies: {:?}",
        log.conflicts.first()
    );
    // Per stream: accepted in event order.
    let position: HashMap<&str, usize> = log
        .accepted
        .iter()
        .enumerate()
        .map(|(i, k)| (k.as_str(), i))
        .collect();
    for (stream, ids) in order {
        let at: Vec<usize> = ids
            .iter()
            .map(|id| position[format!("{OBSERVER}:{id}:0").as_str()])
            .collect();
        assert!(
            at.windows(2).all(|w| w[0] < w[1]),
            "stream {stream} accepted out of order"
        );
    }
    let mut attempts: HashMap<&str, u32> = HashMap::new();
    for arrival in &log.arrivals {
        *attempts.entry(arrival.key.as_str()).or_default() += 1;
    }
    let most = attempts.values().copied().max().unwrap_or(0);
    if let Some(max) = max_attempts {
        assert!(
            most <= max,
            "an action was attempted {most} times, above {max}"
        );
        for arrival in &log.arrivals {
            assert!(
                arrival.attempt >= 1 && arrival.attempt <= max,
                "attempt header {}",
                arrival.attempt
            );
        }
    }
    (log.arrivals.len(), most)
}

const FLAKY: &str = "timeout_ms = 300\nretry_base_ms = 100\nretry_factor = 2.0\nretry_max_ms = 1000\nmax_attempts = 20\n";

fn flaky() -> Behaviour {
    Behaviour {
        fail_rate: 0.30,
        stall_rate: 0.05,
        stall: Duration::from_millis(900),
        ..Behaviour::default()
    }
}

on_both_stores! {
    /// 10,000 events against a receiver that fails 30 % and stalls 5 %: every action accepted
    /// once, per stream in order, attempts within the maximum.
    async fn every_action_is_delivered_once_in_stream_order_through_failures(backend) {
        let receiver = Receiver::start(flaky()).await;
        let server = start(&backend, &receiver, FLAKY, &[]);
        let api = server.api();
        let (expected, order) = append(&api, 200, 50, "acct").await;
        all_accepted(&receiver, &expected, Duration::from_secs(300)).await;
        let (arrivals, most) = check_delivery(&receiver, &expected, &order, Some(20));
        let summary = eventually(Duration::from_secs(30), || async {
            let s = observer(&api).await;
            if s["actions"]["done"] == expected.len() { Ok(s) } else { Err(s.to_string()) }
        })
        .await;
        assert_eq!(summary["actions"]["dead"], 0, "{summary}");
        println!("{} actions, {arrivals} requests, at most {most} attempts for one", expected.len());
    }

    /// The same with the host killed five times during delivery: nothing lost, every repeat
    /// under the same key.
    async fn kill_nine_during_delivery_loses_nothing_and_repeats_keep_their_keys(backend) {
        let receiver = Receiver::start(flaky()).await;
        let mut server = start(&backend, &receiver, FLAKY, &[]);
        let api = server.api();
        let (expected, order) = append(&api, 200, 50, "acct").await;
        for kill in 1..=5 {
            // Kill once a further share of the actions has been accepted.
            let goal = expected.len() * kill / 7;
            eventually(Duration::from_secs(300), || async {
                let n = receiver.accepted().len();
                if n >= goal { Ok(()) } else { Err(format!("{n} of {goal}")) }
            })
            .await;
            server.kill();
            server.restart();
        }
        let api = server.api();
        all_accepted(&receiver, &expected, Duration::from_secs(300)).await;
        let (arrivals, _) = check_delivery(&receiver, &expected, &order, None);
        let repeats = arrivals - expected.len();
        eventually(Duration::from_secs(30), || async {
            let s = observer(&api).await;
            if s["actions"]["done"] == expected.len() { Ok(()) } else { Err(s.to_string()) }
        })
        .await;
        println!("{} actions through 5 kills: {arrivals} requests ({repeats} repeats, all under their keys)", expected.len());
    }

    /// A 400 dead-letters the action at once, with the status; its stream waits behind it while
    /// others go on; after the receiver is fixed, the admin retry delivers it and the waiting
    /// actions follow in order.
    async fn a_rejected_action_waits_for_the_operator_and_its_stream_follows(backend) {
        let receiver = Receiver::start(Behaviour {
            reject_streams: ["bad-0".to_owned()].into(),
            ..Behaviour::default()
        })
        .await;
        let server = start(&backend, &receiver, FLAKY, &[]);
        let api = server.api();
        let (bad_keys, bad_order) = append(&api, 1, 3, "bad").await;
        let (good_keys, _) = append(&api, 2, 3, "good").await;
        all_accepted(&receiver, &good_keys, Duration::from_secs(60)).await;
        let dead = eventually(Duration::from_secs(30), || async {
            let (_, page) = api.get(&format!("/observers/{OBSERVER}/_dead_letters")).await;
            match page["items"].as_array() {
                Some(items) if items.len() == 1 => Ok(items[0].clone()),
                _ => Err(page.to_string()),
            }
        })
        .await;
        let first = &bad_order["bad-0"][0];
        assert_eq!(dead["event_id"], *first, "{dead}");
        assert_eq!(dead["last_status"], 400, "{dead}");
        assert_eq!(dead["attempts"], 1, "dead at once: {dead}");
        assert_eq!(dead["state"], "dead");
        // Nothing of the stream got through; its two later actions wait.
        assert!(receiver.accepted().iter().all(|k| !bad_keys.contains(k)));
        let summary = observer(&api).await;
        assert_eq!(summary["actions"]["pending"], 2, "{summary}");
        assert_eq!(summary["actions"]["dead"], 1, "{summary}");
        receiver.broken.store(false, std::sync::atomic::Ordering::Relaxed);
        let (status, body) = admin(&api, &format!("/admin/observers/{OBSERVER}/dead-letters/{}/retry", dead["id"])).await;
        assert_eq!(status, 200, "{body}");
        let all: HashSet<String> = bad_keys.union(&good_keys).cloned().collect();
        all_accepted(&receiver, &all, Duration::from_secs(60)).await;
        let order = bad_order;
        let accepted = receiver.accepted();
        let at = |id: &String| accepted.iter().position(|k| *k == format!("{OBSERVER}:{id}:0")).unwrap();
        let ids = &order["bad-0"];
        assert!(at(&ids[0]) < at(&ids[1]) && at(&ids[1]) < at(&ids[2]), "the stream's actions out of order");
        // Retrying it again is refused: it is delivered.
        let (status, body) = admin(&api, &format!("/admin/observers/{OBSERVER}/dead-letters/{}/retry", dead["id"])).await;
        assert_eq!(status, 409, "{body}");
        assert_eq!(body["error"]["code"], "not_dead", "{body}");
    }

    /// Resetting the observer's checkpoint to 0 and rebuilding a projection beside it run the
    /// events again; the receiver sees no new request.
    async fn a_reset_or_a_rebuild_delivers_nothing_new(backend) {
        let receiver = Receiver::start(Behaviour::default()).await;
        let server = start(&backend, &receiver, FLAKY, &["account-balance"]);
        let api = server.api();
        let (expected, _) = append(&api, 20, 10, "acct").await;
        all_accepted(&receiver, &expected, Duration::from_secs(60)).await;
        let head = observer(&api).await["head"].as_u64().unwrap();
        eventually(Duration::from_secs(30), || async {
            let s = observer(&api).await;
            if s["checkpoint"].as_u64() >= Some(head) && s["actions"]["done"] == expected.len() { Ok(()) } else { Err(s.to_string()) }
        })
        .await;
        let requests = receiver.requests.load(std::sync::atomic::Ordering::Relaxed);
        let (status, body) = admin(&api, &format!("/admin/observers/{OBSERVER}/reset?position=0")).await;
        assert_eq!(status, 200, "{body}");
        // Observed again up to the head: on-events ran over every event once more.
        eventually(Duration::from_secs(60), || async {
            let s = observer(&api).await;
            if s["checkpoint"].as_u64() >= Some(head) { Ok(()) } else { Err(s.to_string()) }
        })
        .await;
        let reset = observer(&api).await;
        assert_eq!(reset["actions"]["done"], expected.len(), "{reset}");
        assert_eq!(reset["actions"]["pending"], 0, "{reset}");
        // A rebuild of a projection: the account-balance v2 variant, from position 0.
        let v2 = plugin_path("account-balance").parent().unwrap().join("variants/account-balance-v2/account-balance.wasm");
        let bytes = std::fs::read(&v2).unwrap();
        let response = api.http.put(format!("{}/admin/plugins/account-balance", api.base))
            .bearer_auth(TOKEN).header("content-type", "application/wasm").body(bytes).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 202);
        eventually(Duration::from_secs(60), || async {
            let (_, p) = api.get("/projections/account-balance").await;
            if p["version"] == "2.0.0" { Ok(()) } else { Err(p.to_string()) }
        })
        .await;
        let after = receiver.requests.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(after, requests, "{} new requests after a reset and a rebuild", after - requests);
        println!("reset to 0 and a projection rebuild: {} events observed again, 0 new requests", expected.len());
    }
}

/// With base 100 ms and factor 2, the gaps between one action's attempts stay under each
/// attempt's ceiling (full jitter: anywhere from 0 up).
#[tokio::test]
async fn retries_follow_the_backoff_schedule_within_the_jitter_bounds() {
    let receiver = Receiver::start(Behaviour {
        failing_streams: ["sched-0".to_owned()].into(),
        ..Behaviour::default()
    })
    .await;
    let delivery = "timeout_ms = 1000\nretry_base_ms = 100\nretry_factor = 2.0\nretry_max_ms = 60000\nmax_attempts = 6\n";
    let server = start(&Backend::Sqlite, &receiver, delivery, &[]);
    let api = server.api();
    append(&api, 1, 1, "sched").await;
    let dead = eventually(Duration::from_secs(60), || async {
        let (_, page) = api
            .get(&format!("/observers/{OBSERVER}/_dead_letters"))
            .await;
        match page["items"].as_array() {
            Some(items) if items.len() == 1 => Ok(items[0].clone()),
            _ => Err(page.to_string()),
        }
    })
    .await;
    assert_eq!(dead["attempts"], 6, "{dead}");
    assert_eq!(dead["last_status"], 500, "{dead}");
    assert!(
        dead["last_error"]
            .as_str()
            .unwrap()
            .contains("gave up after 6 attempts"),
        "{dead}"
    );
    let arrivals = receiver.arrivals();
    assert_eq!(arrivals.len(), 6, "{arrivals:?}");
    assert!(arrivals.iter().all(|a| a.status == 500));
    let attempts: Vec<u32> = arrivals.iter().map(|a| a.attempt).collect();
    assert_eq!(attempts, [1, 2, 3, 4, 5, 6]);
    // What one attempt's own request and the dispatcher's loop may add to a gap.
    let slack = Duration::from_millis(250);
    let mut lines = BTreeMap::new();
    for (n, pair) in arrivals.windows(2).enumerate() {
        let gap = pair[1].at - pair[0].at;
        let ceiling = Duration::from_millis(100 * (1 << n));
        lines.insert(
            n + 1,
            format!(
                "after attempt {}: {:>4} ms (ceiling {:>4} ms)",
                n + 1,
                gap.as_millis(),
                ceiling.as_millis()
            ),
        );
        assert!(
            gap <= ceiling + slack,
            "gap {} of {gap:?} above {ceiling:?} + {slack:?}",
            n + 1
        );
    }
    for line in lines.values() {
        println!("{line}");
    }
}

/// A webhook to a host outside the allow-list is dead-lettered with the reason; the receiver
/// (listening there too) sees no request.
#[tokio::test]
async fn a_webhook_outside_the_allow_list_is_dead_lettered_without_a_request() {
    let receiver = Receiver::start(Behaviour::default()).await;
    let server = start(&Backend::Sqlite, &receiver, FLAKY, &[]);
    let api = server.api();
    // `localhost` reaches the same receiver, but only `127.0.0.1:PORT` is allowed.
    let elsewhere = format!("http://localhost:{}/hook", receiver.addr.port());
    post_events(
        &api,
        vec![json!({
            "stream": "acct-x", "stream_type": "Account", "type": "Deposited",
            "payload": {"amount": 1, "url": elsewhere},
        })],
    )
    .await;
    let dead = eventually(Duration::from_secs(30), || async {
        let (_, page) = api
            .get(&format!("/observers/{OBSERVER}/_dead_letters"))
            .await;
        match page["items"].as_array() {
            Some(items) if items.len() == 1 => Ok(items[0].clone()),
            _ => Err(page.to_string()),
        }
    })
    .await;
    let error = dead["last_error"].as_str().unwrap();
    assert!(
        error.contains("not in the observer's allow_hosts"),
        "{dead}"
    );
    assert!(error.contains("localhost"), "{dead}");
    assert_eq!(dead["attempts"], 1);
    assert_eq!(
        receiver.requests.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

/// An event `on-events` fails on is dead-lettered and its stream parked, like a projection's;
/// the other streams' actions are delivered, and the metrics count them.
#[tokio::test]
async fn an_event_the_observer_fails_on_parks_its_stream_only() {
    let receiver = Receiver::start(Behaviour::default()).await;
    let server = start(&Backend::Sqlite, &receiver, FLAKY, &[]);
    let api = server.api();
    let event = |stream: &str, payload: Value| json!({"stream": stream, "stream_type": "Account", "type": "Deposited", "payload": payload});
    post_events(
        &api,
        vec![
            event("good-1", json!({"amount": 1})),
            event("sick-1", json!({"fail": true})),
            event("sick-1", json!({"amount": 2})),
            event("good-1", json!({"amount": 3})),
        ],
    )
    .await;
    eventually(Duration::from_secs(30), || async {
        let n = receiver.accepted().len();
        if n == 2 {
            Ok(())
        } else {
            Err(format!("{n} accepted"))
        }
    })
    .await;
    let (_, letters) = api
        .get(&format!("/projections/{OBSERVER}/_dead_letters"))
        .await;
    let items = letters["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{letters}");
    assert_eq!(items[0]["kind"], "plugin", "{letters}");
    assert!(
        items[0]["reason"]
            .as_str()
            .unwrap()
            .contains("asked to fail"),
        "{letters}"
    );
    assert_eq!(items[1]["kind"], "parked", "{letters}");
    let summary = observer(&api).await;
    assert_eq!(summary["event_dead_letters"], 1, "{summary}");
    assert_eq!(summary["actions"]["done"], 2, "{summary}");
    let (_, metrics) = api.get_text("/metrics").await;
    assert!(
        metrics.contains(
            "projector_actions_total{observer=\"relay\",kind=\"webhook\",outcome=\"delivered\"} 2"
        ),
        "{metrics}"
    );
    // Observers are not projections: listed apart.
    let (_, projections) = api.get("/projections").await;
    assert!(
        projections["projections"].as_array().unwrap().is_empty(),
        "{projections}"
    );
}

/// An `emit` appends its event once, with an id derived from the action's key: the observer
/// sees it (and relays it) once, even after its checkpoint is reset and the emit decided again.
#[tokio::test]
async fn an_emitted_event_is_appended_once_even_when_decided_again() {
    let receiver = Receiver::start(Behaviour::default()).await;
    let server = start(&Backend::Sqlite, &receiver, FLAKY, &[]);
    let api = server.api();
    post_events(&api, vec![json!({
        "stream": "order-1", "stream_type": "Order", "type": "Emit", "payload": {"stream": "derived-1"},
    })]).await;
    let relayed = || {
        receiver
            .log
            .lock()
            .unwrap()
            .arrivals
            .iter()
            .filter(|a| a.status == 200)
            .count()
    };
    // The Emit event's webhook, then the Relayed event's.
    eventually(Duration::from_secs(30), || async {
        let n = receiver.accepted().len();
        if n == 2 {
            Ok(())
        } else {
            Err(format!("{n} accepted"))
        }
    })
    .await;
    let (status, derived) = api.get("/observers/relay").await;
    assert_eq!(status, 200);
    let head = derived["head"].as_u64().unwrap();
    assert_eq!(head, 2, "the emitted event is the log's second: {derived}");
    let (status, body) = admin(&api, &format!("/admin/observers/{OBSERVER}/reset")).await;
    assert_eq!(status, 200, "{body}");
    eventually(Duration::from_secs(30), || async {
        let s = observer(&api).await;
        if s["checkpoint"].as_u64() >= Some(head) && s["actions"]["done"] == 3 {
            Ok(())
        } else {
            Err(s.to_string())
        }
    })
    .await;
    let after = observer(&api).await;
    assert_eq!(after["head"], head, "appended again: {after}");
    assert_eq!(relayed(), 2);
}
