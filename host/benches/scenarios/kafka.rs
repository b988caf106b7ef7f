//! `projector-bench -- kafka`: the Kafka source against a tansu broker the bench starts
//! (`scripts/kafka-test-broker.sh`), with `serve` in-process on SQLite and account-balance.
//!
//! - `kafka-catchup`: `BENCH_KAFKA_EVENTS` (200,000) messages over 10,000 streams in 4
//!   partitions produced first, then the server started: time from the first message in the
//!   log until the projection has applied them all (log written and projected), events/s;
//!   the group join before it is printed apart (`join_secs`, and `evps_with_join`). Target
//!   ≥ 200,000.
//! - `kafka-consume`: the same messages read by a bare consumer and decoded, nothing written:
//!   the ceiling of `kafka-catchup` on this broker and machine; then `kafka-live`'s rate
//!   produced to it: produce ack → the bare consumer has the message, the ceiling of
//!   `kafka-live` (`kafka-consume-live`).
//!
//! `PROJECTOR_*` settings apply to the server and the bare consumer (`kafka.options` as
//! `PROJECTOR_KAFKA__OPTIONS__FETCH_QUEUE_BACKOFF_MS=…`); `BENCH_KAFKA_PRODUCER`
//! (`key=value,…`) sets librdkafka options of the bench's producer.
//! - `kafka-live`: `BENCH_KAFKA_RATE` (1,000) events/s produced for `BENCH_KAFKA_SECS` (10) s,
//!   open loop; each event read back with `wait_for_event` right after its produce ack: ack →
//!   queryable p50/p99 (target p99 ≤ 10 ms).
//! - `kafka-ryw`: the banking seed: 100 accounts opened, each waited for with
//!   `wait_for_event`, then 1,000 deposits, each waited for: per-operation latency.
//!
//! Prints `RESULT scenario=kafka-… events=… evps=… p50_ms=… p99_ms=…`.

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use tokio::sync::watch;

use projector::config::{Config, SourceKind};

use super::{report, root, tempdir};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A broker of the bench's own: its address, and what stops it.
struct Broker {
    address: String,
    dir: std::path::PathBuf,
}

impl Broker {
    fn start() -> Self {
        let dir = tempdir("kafka-broker");
        let out = std::process::Command::new("bash")
            .arg(root().join("scripts/kafka-test-broker.sh"))
            .arg("start")
            .arg(&dir)
            .output()
            .expect("run scripts/kafka-test-broker.sh");
        assert!(out.status.success(), "the broker did not start: {out:?}");
        Self {
            address: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            dir,
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(root().join("scripts/kafka-test-broker.sh"))
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

/// librdkafka settings from `name` (`key=value,key=value`) over `config`: how the bench's
/// producer batches (Debezium's, Kafka Connect's, differ).
fn overrides(mut config: ClientConfig, name: &str) -> ClientConfig {
    for pair in std::env::var(name).unwrap_or_default().split(',') {
        if let Some((key, value)) = pair.split_once('=') {
            config.set(key.trim(), value.trim());
        }
    }
    config
}

fn producer(broker: &str) -> FutureProducer {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", broker)
        .set("linger.ms", "1")
        .set("queue.buffering.max.messages", "1000000");
    overrides(config, "BENCH_KAFKA_PRODUCER")
        .create()
        .expect("a producer")
}

/// A Debezium-shaped record (default converters): the payload's jsonb text as a JSON string.
fn record<'a>(
    topic: &'a str,
    stream: &'a str,
    id: &'a str,
    event_type: &'a str,
    value: &'a str,
) -> FutureRecord<'a, str, str> {
    FutureRecord::to(topic).key(stream).payload(value).headers(
        OwnedHeaders::new()
            .insert(Header {
                key: "id",
                value: Some(id),
            })
            .insert(Header {
                key: "eventType",
                value: Some(event_type),
            }),
    )
}

fn value(payload: serde_json::Value) -> String {
    serde_json::to_string(&payload.to_string()).unwrap_or_default()
}

/// Enqueues every record (waiting when the local queue is full), then awaits the deliveries.
async fn produce_all(
    producer: &FutureProducer,
    records: Vec<(String, String, String, String)>,
    topic: &str,
) {
    let mut deliveries = Vec::with_capacity(records.len());
    for (stream, id, event_type, value) in &records {
        let mut r = record(topic, stream, id, event_type, value);
        loop {
            match producer.send_result(r) {
                Ok(d) => {
                    deliveries.push(d);
                    break;
                }
                Err((_, back)) => {
                    r = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    }
    for d in deliveries {
        let _ = d.await;
    }
}

/// `serve` in-process on SQLite with the Kafka source: the server's future (run it beside the
/// client: it is not `Send`), where its address arrives, and what stops it.
fn server(
    broker: &str,
    topic: &str,
    group: &str,
) -> (
    impl std::future::Future<Output = Result<(), projector::serve::ServeError>>,
    tokio::sync::oneshot::Receiver<std::net::SocketAddr>,
    watch::Sender<bool>,
) {
    let dir = tempdir("kafka");
    // `PROJECTOR_*` settings in the environment apply (`PROJECTOR_KAFKA__OPTIONS__…`).
    let mut config = Config::load(None, std::env::vars()).unwrap();
    config.listen = "127.0.0.1:0".into();
    config.data_dir = dir;
    // The projection alone (the plugins folder also holds an observer, which would compete
    // for the same write lock).
    let plugins = tempdir("kafka-plugins");
    std::fs::copy(
        root().join("target/plugins/account-balance.wasm"),
        plugins.join("account-balance.wasm"),
    )
    .expect("target/plugins/account-balance.wasm (bash scripts/build-plugins.sh)");
    config.plugins.dir = plugins;
    config.source.kind = SourceKind::Kafka;
    config.kafka.brokers = broker.to_owned();
    config.kafka.topics = topic.to_owned();
    config.kafka.group_id = group.to_owned();
    config.kafka.session_timeout_ms = 6000;
    // Catch-up is not held back by the live-lag bound.
    config.runner.max_lag_ms = 0;
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let (stop, mut stopped) = watch::channel(false);
    let future = projector::serve::serve(
        config,
        move |addr| {
            let _ = addr_tx.send(addr);
        },
        async move {
            let _ = stopped.changed().await;
        },
    );
    (future, addr_rx, stop)
}

/// The catch-up's messages: `streams` accounts opened, then deposits round-robin.
fn catchup_records(events: usize, streams: usize) -> Vec<(String, String, String, String)> {
    let mut records = Vec::with_capacity(events);
    for s in 0..streams {
        records.push((
            format!("acct-{s}"),
            uuid::Uuid::new_v4().to_string(),
            "AccountOpened".to_owned(),
            value(json!({"owner": "o", "currency": "EUR"})),
        ));
    }
    for e in 0..events - streams {
        records.push((
            format!("acct-{}", e % streams),
            uuid::Uuid::new_v4().to_string(),
            "Deposited".to_owned(),
            value(json!({"amount": 1})),
        ));
    }
    records
}

const TOPIC: &str = "outbox.event.Account";

/// A broker holding the catch-up's messages in `TOPIC`: it, the messages, the streams.
async fn catchup_broker() -> (Broker, usize, usize) {
    let broker = Broker::start();
    let events = env_usize("BENCH_KAFKA_EVENTS", 200_000);
    let streams = 10_000.min(events / 2).max(1);
    let p = producer(&broker.address);
    let produced = Instant::now();
    produce_all(&p, catchup_records(events, streams), TOPIC).await;
    println!(
        "produced {events} messages in {:.1} s",
        produced.elapsed().as_secs_f64()
    );
    (broker, events, streams)
}

/// `kafka-consume`: the ceiling under `kafka-catchup`, the catch-up's messages read by a bare
/// consumer with the source's settings and decoded by its rules, nothing written: how fast
/// this broker on this machine hands them out, and the cores it takes meanwhile.
pub async fn consume() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message as _};
    let (broker, events, _) = catchup_broker().await;
    let topic = TOPIC;
    let defaults = Config::load(None, std::env::vars()).unwrap().kafka;
    let rules = projector::source::kafka::decode::Rules::new(&defaults).unwrap();
    let mut config = ClientConfig::new();
    for (key, value) in &defaults.options {
        config.set(key, value);
    }
    config
        .set("bootstrap.servers", &broker.address)
        .set("group.id", "bench-consume")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", "6000")
        .set("fetch.wait.max.ms", defaults.fetch_wait_ms.to_string());
    let consumer: BaseConsumer = config.create().expect("a consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let joined = Instant::now();
    let (read, consumer) = tokio::task::spawn_blocking(move || {
        let (mut read, mut decoded) = (0usize, 0usize);
        let mut first = None;
        let deadline = Instant::now() + Duration::from_secs(300);
        while read < events && Instant::now() < deadline {
            let Some(m) = consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let m = m.expect("a message");
            if first.is_none() {
                first = Some((Instant::now(), super::cpu_secs(), super::machine_jiffies()));
            }
            read += 1;
            let headers = m
                .headers()
                .map(|h| h.iter().map(|h| (h.key, h.value)).collect())
                .unwrap_or_default();
            let message = projector::source::kafka::decode::Message {
                topic: m.topic(),
                partition: m.partition(),
                offset: m.offset(),
                key: m.key(),
                value: m.payload(),
                headers,
                timestamp_ms: m.timestamp().to_millis(),
            };
            if matches!(
                rules.decode(&message),
                projector::source::kafka::decode::Decoding::Event(_)
            ) {
                decoded += 1;
            }
        }
        let (at, cpu, (busy, total)) = first.expect("no message arrived");
        let (busy2, total2) = super::machine_jiffies();
        let secs = at.elapsed().as_secs_f64();
        let machine = if total2 > total {
            (busy2 - busy) / (total2 - total)
                * std::thread::available_parallelism().map_or(1, |n| n.get()) as f64
        } else {
            0.0
        };
        (
            (
                read,
                decoded,
                secs,
                (at - joined).as_secs_f64(),
                (super::cpu_secs() - cpu) / secs,
                machine,
            ),
            consumer,
        )
    })
    .await
    .expect("the consumer thread");
    let (read, decoded, secs, join, cpu_process, cpu_machine) = read;
    report(
        "kafka-consume",
        read,
        secs,
        &mut [],
        &format!(
            "decoded={decoded} join_secs={join:.2} cpu_process={cpu_process:.2} \
             cpu_machine={cpu_machine:.2} (bare consumer + decode, nothing written: the ceiling \
             of kafka-catchup; cores from the first message; the rest of cpu_machine is the broker)"
        ),
    );

    // Live: the ceiling under kafka-live, produce ack -> the bare consumer has the message.
    let rate = env_usize("BENCH_KAFKA_RATE", 1000);
    let total = rate * env_usize("BENCH_KAFKA_SECS", 10);
    let received = std::thread::spawn(move || {
        let mut at = std::collections::HashMap::with_capacity(total);
        let deadline = Instant::now() + Duration::from_secs(120);
        while at.len() < total && Instant::now() < deadline {
            let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let id = m.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == "id")
                    .and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).into_owned()))
            });
            if let Some(id) = id {
                at.insert(id, Instant::now());
            }
        }
        at
    });
    let p = producer(&broker.address);
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now();
    let mut acks = Vec::with_capacity(total);
    for n in 0..total {
        tokio::time::sleep_until((start + interval * n as u32).into()).await;
        let p = p.clone();
        acks.push(tokio::spawn(async move {
            let id = uuid::Uuid::new_v4().to_string();
            let stream = format!("acct-{}", n % 100);
            let v = value(json!({"amount": 1}));
            p.send(
                record(topic, &stream, &id, "Deposited", &v),
                Duration::from_secs(30),
            )
            .await
            .ok()
            .map(|_| (id, Instant::now()))
        }));
    }
    let mut acked = Vec::with_capacity(total);
    for a in acks {
        if let Some(pair) = a.await.ok().flatten() {
            acked.push(pair);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let received = tokio::task::spawn_blocking(move || received.join())
        .await
        .expect("the consumer thread")
        .expect("the consumer thread");
    let mut latencies: Vec<f64> = acked
        .iter()
        .filter_map(|(id, ack)| {
            received
                .get(id)
                .map(|got| got.saturating_duration_since(*ack).as_secs_f64() * 1000.0)
        })
        .collect();
    let missing = acked.len() - latencies.len();
    report(
        "kafka-consume-live",
        total,
        elapsed,
        &mut latencies,
        &format!(
            "rate={rate} missing={missing} (produce ack -> a bare consumer has it: the ceiling of \
             kafka-live; 0 when it came before the ack)"
        ),
    );
}

pub async fn catchup() {
    let (broker, events, streams) = catchup_broker().await;
    let topic = TOPIC;
    let start = Instant::now();
    let (server, addr, stop) = server(&broker.address, topic, "bench-catchup");
    let client = async move {
        let base = format!("http://{}", addr.await.expect("the server's address"));
        let http = reqwest::Client::new();
        let mut taken_at = None;
        // The group join (the broker holds the first JoinGroup about half the session
        // timeout: KAFKA.md) is timed apart: the rate is the catch-up's, from the first
        // message in the log.
        let mut first_at = None;
        loop {
            let all: serde_json::Value = http
                .get(format!("{base}/projections"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let taken = all["kafka"]["events"].as_u64().unwrap_or(0);
            if taken > 0 && first_at.is_none() {
                first_at = Some(start.elapsed());
            }
            if taken >= events as u64 && taken_at.is_none() {
                taken_at = Some(start.elapsed());
            }
            let p = &all["projections"][0];
            if taken >= events as u64 && p["checkpoint"] == p["head"] && p["lag"] == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let total = start.elapsed().as_secs_f64();
        let join = first_at.map_or(0.0, |t| t.as_secs_f64());
        let log_secs = taken_at.map_or(total, |t| t.as_secs_f64()) - join;
        report(
            "kafka-catchup",
            events,
            total - join,
            &mut [],
            &format!(
                "log_evps={:.0} join_secs={join:.2} evps_with_join={:.0} streams={streams} partitions=4 \
                 (from the first message in the log; join_secs: the server's start to it)",
                events as f64 / log_secs,
                events as f64 / total
            ),
        );
        let _ = stop.send(true);
    };
    let (served, ()) = tokio::join!(server, client);
    served.expect("serve");
}

pub async fn live() {
    let broker = Broker::start();
    let rate = env_usize("BENCH_KAFKA_RATE", 1000);
    let secs = env_usize("BENCH_KAFKA_SECS", 10);
    let topic = TOPIC;
    let p = producer(&broker.address);
    // The topic and its partitions exist before the server subscribes.
    produce_all(
        &p,
        (0..100)
            .map(|s| {
                (
                    format!("acct-{s}"),
                    uuid::Uuid::new_v4().to_string(),
                    "AccountOpened".to_owned(),
                    value(json!({"owner": "o", "currency": "EUR"})),
                )
            })
            .collect(),
        topic,
    )
    .await;
    let (server, addr, stop) = server(&broker.address, topic, "bench-live");
    let client = async move {
        let base = format!("http://{}", addr.await.expect("the server's address"));
        let http = reqwest::Client::new();
        // Ready: the opened accounts are applied.
        loop {
            let all: serde_json::Value = http
                .get(format!("{base}/projections"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if all["kafka"]["events"].as_u64().unwrap_or(0) >= 100 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let total = rate * secs;
        let interval = Duration::from_secs_f64(1.0 / rate as f64);
        let start = Instant::now();
        let mut reads = Vec::with_capacity(total);
        for n in 0..total {
            let due = start + interval * n as u32;
            tokio::time::sleep_until(due.into()).await;
            let (p, http, base) = (p.clone(), http.clone(), base.clone());
            reads.push(tokio::spawn(async move {
            let id = uuid::Uuid::new_v4().to_string();
            let stream = format!("acct-{}", n % 100);
            let v = value(json!({"amount": 1}));
            let delivered = p
                .send(record(topic, &stream, &id, "Deposited", &v), Duration::from_secs(30))
                .await;
            if delivered.is_err() {
                return None;
            }
            let acked = Instant::now();
            let r = http
                .get(format!(
                    "{base}/projections/account-balance/accounts/{stream}?wait_for_event={id}&timeout_ms=30000"
                ))
                .send()
                .await
                .ok()?;
            r.status()
                .is_success()
                .then(|| acked.elapsed().as_secs_f64() * 1000.0)
        }));
        }
        let mut latencies = Vec::with_capacity(total);
        let mut failed = 0;
        for r in reads {
            match r.await.ok().flatten() {
                Some(ms) => latencies.push(ms),
                None => failed += 1,
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        report(
            "kafka-live",
            total,
            elapsed,
            &mut latencies,
            &format!("rate={rate} failed={failed} (produce ack -> queryable)"),
        );
        let _ = stop.send(true);
    };
    let (served, ()) = tokio::join!(server, client);
    served.expect("serve");
}

pub async fn ryw() {
    let broker = Broker::start();
    let topic = TOPIC;
    let p = producer(&broker.address);
    // Creates the topic before the server subscribes.
    produce_all(
        &p,
        vec![(
            "warmup".into(),
            uuid::Uuid::new_v4().to_string(),
            "Noise".into(),
            value(json!({})),
        )],
        topic,
    )
    .await;
    let (server, addr, stop) = server(&broker.address, topic, "bench-ryw");
    let client = async move {
        let base = format!("http://{}", addr.await.expect("the server's address"));
        let http = reqwest::Client::new();
        let wait = |stream: String, event_type: &'static str, payload: serde_json::Value| {
            let (p, http, base) = (p.clone(), http.clone(), base.clone());
            async move {
                let id = uuid::Uuid::new_v4().to_string();
                let v = value(payload);
                let started = Instant::now();
                p.send(
                    record(topic, &stream, &id, event_type, &v),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)
                .expect("produced");
                let r = http
                .get(format!(
                    "{base}/projections/account-balance/accounts/{stream}?wait_for_event={id}&timeout_ms=60000"
                ))
                .send()
                .await
                .expect("read");
                assert!(r.status().is_success(), "{}", r.status());
                started.elapsed().as_secs_f64() * 1000.0
            }
        };
        let start = Instant::now();
        let mut latencies = Vec::new();
        for a in 0..100 {
            latencies.push(
                wait(
                    format!("acct-{a}"),
                    "AccountOpened",
                    json!({"owner": "o", "currency": "EUR"}),
                )
                .await,
            );
        }
        let opened = start.elapsed().as_secs_f64();
        for n in 0..1000 {
            latencies.push(
                wait(
                    format!("acct-{}", n % 100),
                    "Deposited",
                    json!({"amount": 1}),
                )
                .await,
            );
        }
        let elapsed = start.elapsed().as_secs_f64();
        report(
            "kafka-ryw",
            1100,
            elapsed,
            &mut latencies,
            &format!(
                "accounts_opened_s={opened:.2} (each operation: produce, then wait_for_event)"
            ),
        );
        let _ = stop.send(true);
    };
    let (served, ()) = tokio::join!(server, client);
    served.expect("serve");
}
