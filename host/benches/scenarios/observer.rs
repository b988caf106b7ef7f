//! `projector-bench -- observer`: the `relay` observer (one webhook per event) in-process on
//! SQLite, delivering to a local keep-alive receiver (the integration tests' `receiver.rs`).
//!
//! `BENCH_OBSERVER_EVENTS` (100,000) events over 10,000 streams are appended over HTTP, 500 per
//! request, as fast as the server takes them, while the observer delivers. `actions_per_s` is
//! the actions accepted by the receiver over the time from the first append to the last
//! acceptance (target ≥ 10,000); each action's latency runs from its event's commit (the append
//! returning) to the receiver's first acceptance of its key. Every action must be accepted
//! exactly once.
//!
//! Prints `RESULT scenario=observer events=… actions_per_s=… p50_ms=… p99_ms=… requests=…`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::watch;

use projector::config::{Config, DeliveryConfig};

#[path = "../../../tests/all/receiver.rs"]
#[allow(dead_code)]
mod receiver;

use super::{percentile, root, tempdir};
use receiver::{Behaviour, Receiver};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub async fn observer() {
    let events = env_usize("BENCH_OBSERVER_EVENTS", 100_000);
    let streams = 10_000.min(events).max(1);
    let receiver = Receiver::start(Behaviour::default()).await;
    let plugins = tempdir("observer-plugins");
    std::fs::copy(
        root().join("target/plugins/fixtures/relay.wasm"),
        plugins.join("relay.wasm"),
    )
    .expect("target/plugins/fixtures/relay.wasm (bash scripts/build-plugins.sh)");
    let mut config = Config::load(None, Vec::new()).unwrap();
    config.listen = "127.0.0.1:0".into();
    config.data_dir = tempdir("observer");
    config.plugins.dir = plugins;
    config
        .plugins
        .settings
        .insert("relay".into(), [("url".to_owned(), receiver.url())].into());
    config.observers.insert(
        "relay".into(),
        DeliveryConfig {
            allow_hosts: vec![receiver.addr.to_string()],
            ..DeliveryConfig::default()
        },
    );
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let (stop, mut stopped) = watch::channel(false);
    let server = projector::serve::serve(
        config,
        move |addr| {
            let _ = addr_tx.send(addr);
        },
        async move {
            let _ = stopped.changed().await;
        },
    );
    let client = async move {
        let base = format!("http://{}", addr_rx.await.expect("the server's address"));
        let http = reqwest::Client::new();
        let mut committed: HashMap<String, Instant> = HashMap::with_capacity(events);
        let start = Instant::now();
        let mut batch = Vec::with_capacity(500);
        let mut ids = Vec::with_capacity(500);
        for e in 0..events {
            let id = uuid::Uuid::new_v4().to_string();
            batch.push(json!({
                "id": id, "stream": format!("acct-{}", e % streams), "stream_type": "Account",
                "type": "Deposited", "payload": {"amount": 1},
            }));
            ids.push(id);
            if batch.len() == 500 || e + 1 == events {
                let response = http
                    .post(format!("{base}/events"))
                    .json(&json!({ "events": std::mem::take(&mut batch) }))
                    .send()
                    .await
                    .expect("append");
                assert_eq!(response.status().as_u16(), 201, "append refused");
                let at = Instant::now();
                for id in ids.drain(..) {
                    committed.insert(format!("relay:{id}:0"), at);
                }
            }
        }
        let appended = start.elapsed();
        let deadline = Instant::now() + Duration::from_secs(600);
        while receiver.accepted().len() < events {
            assert!(
                Instant::now() < deadline,
                "only {} of {events} actions accepted",
                receiver.accepted().len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let log = receiver.log.lock().unwrap();
        let mut first: HashMap<&str, Instant> = HashMap::with_capacity(events);
        for a in &log.arrivals {
            if a.status == 200 {
                first.entry(a.key.as_str()).or_insert(a.at);
            }
        }
        let last = first.values().max().copied().unwrap_or(start);
        let secs = (last - start).as_secs_f64();
        let mut latencies: Vec<f64> = first
            .iter()
            .map(|(key, at)| {
                let commit = committed[*key];
                at.saturating_duration_since(commit).as_secs_f64() * 1000.0
            })
            .collect();
        latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
        assert_eq!(
            log.accepted.len(),
            events,
            "an action accepted twice or missing"
        );
        let rate = events as f64 / secs;
        println!(
            "| observer | {events:>8} actions | appended in {:.2} s | delivered by {secs:.2} s | {rate:>8.0} actions/s | p50 {:.1} ms | p99 {:.1} ms | {} requests",
            appended.as_secs_f64(),
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            log.arrivals.len()
        );
        println!(
            "RESULT scenario=observer events={events} actions_per_s={rate:.0} p50_ms={:.3} p99_ms={:.3} requests={} append_secs={:.3} secs={secs:.3}",
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            log.arrivals.len(),
            appended.as_secs_f64()
        );
        drop(log);
        let _ = stop.send(true);
    };
    let (served, ()) = tokio::join!(server, client);
    served.expect("the server ran");
}
