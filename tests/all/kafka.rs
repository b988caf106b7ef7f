//! The Kafka source against a real Kafka-protocol broker (tansu, started by `scripts/test.sh`:
//! `PROJECTOR_TEST_KAFKA`), with messages produced by rdkafka in each shape Debezium's outbox
//! EventRouter writes (see KAFKA.md): decoded into events, each event id applied once, bad
//! messages dead-lettered, read-your-writes by event id, and crashes mid-catch-up.

use std::collections::BTreeMap;
use std::time::Duration;

use fantoccini::Locator;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};

use crate::support::{eventually, on_both_stores, plugin_set, tempdir, Api, Backend, Server};

const NAME: &str = "account-balance";

fn broker() -> String {
    std::env::var("PROJECTOR_TEST_KAFKA").unwrap_or_else(|_| {
        panic!(
            "PROJECTOR_TEST_KAFKA is not set: run the tests with `bash scripts/test.sh`, which \
             starts a throwaway broker, or point it at one (scripts/kafka-test-broker.sh start \
             DIR prints the address)"
        )
    })
}

/// A topic and group of the test's own, on the shared broker.
struct Setup {
    topic: String,
    group: String,
    prefix: String,
}

impl Setup {
    fn new() -> Self {
        let unique = uuid::Uuid::new_v4().simple().to_string();
        let prefix = format!("t{}.outbox.event.", &unique[..12]);
        Self {
            topic: format!("{prefix}Account"),
            group: format!("g{unique}"),
            prefix,
        }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("PROJECTOR_SOURCE__KIND", "kafka".into()),
            ("PROJECTOR_KAFKA__BROKERS", broker()),
            ("PROJECTOR_KAFKA__TOPICS", self.topic.clone()),
            ("PROJECTOR_KAFKA__TOPIC_PREFIX", self.prefix.clone()),
            ("PROJECTOR_KAFKA__GROUP_ID", self.group.clone()),
            // The broker holds a JoinGroup about half the session timeout.
            ("PROJECTOR_KAFKA__SESSION_TIMEOUT_MS", "6000".into()),
        ]
    }

    fn server(
        &self,
        backend: &Backend,
        data: &std::path::Path,
        plugins: &std::path::Path,
    ) -> Server {
        let env = self.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Server::start_on(backend, plugins, data, &env)
    }
}

fn producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", broker())
        .set("linger.ms", "5")
        .create()
        .expect("a producer")
}

/// One message as Debezium would write it.
struct Out {
    key: Option<String>,
    value: Option<String>,
    headers: Vec<(&'static str, String)>,
}

/// The default shape: raw key, raw `id` and `eventType` headers, the payload's jsonb text as
/// a JSON string.
fn debezium(stream: &str, id: &str, event_type: &str, payload: &Value) -> Out {
    Out {
        key: Some(stream.to_owned()),
        value: Some(serde_json::to_string(&payload.to_string()).unwrap()),
        headers: vec![
            ("__debezium.context.connectorName", "outbox".into()),
            ("id", id.to_owned()),
            ("eventType", event_type.to_owned()),
        ],
    }
}

/// Produces `messages` in order: the partition each landed in, in the same order.
async fn produce(producer: &FutureProducer, topic: &str, messages: &[Out]) -> Vec<i32> {
    // Enqueued at once (the producer batches them), then every delivery awaited; when the
    // local queue is full, the oldest delivery is awaited to make room.
    let mut partitions = Vec::with_capacity(messages.len());
    let mut deliveries = std::collections::VecDeque::with_capacity(messages.len());
    for m in messages {
        let mut headers = OwnedHeaders::new();
        for (name, value) in &m.headers {
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_str()),
            });
        }
        let mut record = FutureRecord::<str, str>::to(topic).headers(headers);
        if let Some(key) = &m.key {
            record = record.key(key.as_str());
        }
        if let Some(value) = &m.value {
            record = record.payload(value.as_str());
        }
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    deliveries.push_back(delivery);
                    break;
                }
                Err((err, back)) => {
                    record = back;
                    let oldest = deliveries
                        .pop_front()
                        .unwrap_or_else(|| panic!("cannot enqueue with nothing in flight: {err}"));
                    partitions.push(delivered(oldest).await);
                }
            }
        }
    }
    for delivery in deliveries {
        partitions.push(delivered(delivery).await);
    }
    partitions
}

/// The partition the message landed in.
async fn delivered(delivery: rdkafka::producer::DeliveryFuture) -> i32 {
    delivery
        .await
        .expect("delivery reported")
        .map_err(|(e, _)| e)
        .expect("produced")
        .partition
}

/// Waits until every partition is taken into the log (lag 0) and the log holds `events`
/// events, then until the projection has applied them all; the log's head.
async fn all_taken(api: &Api, events: u64) -> u64 {
    let head = eventually(Duration::from_secs(120), || async {
        let (_, all) = api.get("/projections").await;
        let partitions = all["kafka"]["partitions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let lag: i64 = partitions
            .iter()
            .map(|p| p["lag"].as_i64().unwrap_or(1))
            .sum();
        let (_, summary) = api.get(&format!("/projections/{NAME}")).await;
        let head = summary["head"].as_u64().unwrap_or(0);
        (!partitions.is_empty() && lag == 0 && head >= events)
            .then_some(head)
            .ok_or(format!("lag {lag}, head {head}: {}", all["kafka"]))
    })
    .await;
    let (status, body) = api
        .get(&format!(
            "/projections/{NAME}?min_position={head}&timeout_ms=60000"
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    head
}

/// `streams` accounts opened, then deposits (of 1 to `amounts`) round-robin up to `events`
/// messages: the messages, and each account's expected balance.
fn opened_then_deposits(
    streams: usize,
    events: usize,
    amounts: usize,
) -> (Vec<Out>, BTreeMap<String, i64>) {
    let mut messages = Vec::with_capacity(events);
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    for s in 0..streams {
        messages.push(debezium(
            &format!("acct-{s}"),
            &id(),
            "AccountOpened",
            &json!({"owner": "o", "currency": "EUR"}),
        ));
    }
    for e in 0..events - streams {
        let stream = format!("acct-{}", e % streams);
        let amount = (e % amounts) as i64 + 1;
        *expected.entry(stream.clone()).or_default() += amount;
        messages.push(debezium(
            &stream,
            &id(),
            "Deposited",
            &json!({"amount": amount}),
        ));
    }
    (messages, expected)
}

/// Rows in the host's log: the SQLite outbox, or PostgreSQL's `kafka_log`.
async fn log_count(backend: &Backend, data: &std::path::Path) -> i64 {
    match backend {
        Backend::Sqlite => {
            let url = format!("sqlite://{}?mode=ro", data.join("projector.db").display());
            let db = sqlx::SqlitePool::connect(&url).await.unwrap();
            let n = sqlx::query_scalar("SELECT count(*) FROM outbox")
                .fetch_one(&db)
                .await
                .unwrap();
            db.close().await;
            n
        }
        Backend::Postgres { url } => {
            let db = sqlx::PgPool::connect(url).await.unwrap();
            let n = sqlx::query_scalar("SELECT count(*) FROM projector.kafka_log")
                .fetch_one(&db)
                .await
                .unwrap();
            db.close().await;
            n
        }
    }
}

fn id() -> String {
    uuid::Uuid::new_v4().to_string()
}

async fn read(api: &Api, path: &str) -> (u16, Value) {
    api.get(path).await
}

on_both_stores! {
async fn every_debezium_shape_decodes_into_the_read_model(backend) {
    let setup = Setup::new();
    let server = setup.server(&backend, &tempdir("kafka-shapes"), &plugin_set(&[NAME], &[]));
    let api = server.api();
    let p = producer();
    let opened = id();
    let mut messages = vec![debezium(
        "acct-1",
        &opened,
        "AccountOpened",
        &json!({"owner": "alice", "currency": "EUR"}),
    )];
    // table.expand.json.payload=true: the object itself.
    messages.push(Out {
        value: Some(r#"{"amount":10}"#.into()),
        ..debezium("acct-1", &id(), "Deposited", &json!({}))
    });
    // StringConverter: the raw jsonb text.
    messages.push(Out {
        value: Some(r#"{"amount": 20}"#.into()),
        ..debezium("acct-1", &id(), "Deposited", &json!({}))
    });
    // JsonConverter with schemas: an envelope around the string form.
    messages.push(Out {
        value: Some(
            json!({"schema": {"type": "string"}, "payload": r#"{"amount": 30}"#}).to_string(),
        ),
        ..debezium("acct-1", &id(), "Deposited", &json!({}))
    });
    // JsonConverter keys and headers: quoted (a quoted key lands on another partition: a
    // deployment quotes all its keys, so this stream is all quoted).
    let quoted = id();
    let quoted_out = |id: &str, event_type: &str, payload: &str| Out {
        key: Some("\"acct-q\"".into()),
        value: Some(serde_json::to_string(payload).unwrap()),
        headers: vec![
            ("id", format!("\"{id}\"")),
            ("eventType", format!("\"{event_type}\"")),
        ],
    };
    messages.push(quoted_out(
        &id(),
        "AccountOpened",
        r#"{"owner": "quinn", "currency": "EUR"}"#,
    ));
    messages.push(quoted_out(&quoted, "Deposited", r#"{"amount": 40}"#));
    // A tombstone: skipped.
    messages.push(Out {
        key: Some("acct-1".into()),
        value: None,
        headers: vec![],
    });
    produce(&p, &setup.topic, &messages).await;
    let (status, doc) = read(
        &api,
        &format!("/projections/{NAME}/accounts/acct-q?wait_for_event={quoted}&timeout_ms=60000"),
    )
    .await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["document"]["owner"], "quinn");
    assert_eq!(doc["document"]["balance"], 40, "{doc}");
    let last = messages[3].headers[1].1.clone();
    let (status, doc) = read(
        &api,
        &format!("/projections/{NAME}/accounts/acct-1?wait_for_event={last}&timeout_ms=60000"),
    )
    .await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["document"]["owner"], "alice");
    assert_eq!(doc["document"]["balance"], 60, "{doc}");
    assert_eq!(doc["document"]["tx_count"], 3);
    all_taken(&api, 6).await;
    let (_, all) = api.get("/projections").await;
    assert_eq!(all["kafka"]["events"], 6, "{all}");
    assert_eq!(all["kafka"]["tombstones"], 1, "{all}");
    // An event id never produced: 504 once the wait is over.
    let (status, body) = read(
        &api,
        &format!(
            "/projections/{NAME}/accounts/acct-1?wait_for_event={}&timeout_ms=300",
            id()
        ),
    )
    .await;
    assert_eq!(status, 504, "{body}");
}

async fn a_bad_message_is_dead_lettered_with_where_it_was_and_its_stream_parked(backend) {
    let setup = Setup::new();
    let server = setup.server(&backend, &tempdir("kafka-bad"), &plugin_set(&[NAME], &[]));
    let api = server.api();
    let p = producer();
    let bad = id();
    let after = id();
    let other = id();
    produce(
        &p,
        &setup.topic,
        &[
            debezium(
                "acct-1",
                &id(),
                "AccountOpened",
                &json!({"owner": "a", "currency": "EUR"}),
            ),
            Out {
                value: Some("{not json".into()),
                ..debezium("acct-1", &bad, "Deposited", &json!({}))
            },
            debezium("acct-1", &after, "Deposited", &json!({"amount": 5})),
            debezium(
                "acct-2",
                &id(),
                "AccountOpened",
                &json!({"owner": "b", "currency": "EUR"}),
            ),
            debezium("acct-2", &other, "Deposited", &json!({"amount": 7})),
        ],
    )
    .await;
    // The other stream goes on.
    let (status, doc) = read(
        &api,
        &format!("/projections/{NAME}/accounts/acct-2?wait_for_event={other}&timeout_ms=60000"),
    )
    .await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["document"]["balance"], 7);
    // A read waiting for the bad event learns it was set aside.
    let (status, body) = read(
        &api,
        &format!("/projections/{NAME}/accounts/acct-1?wait_for_event={bad}&timeout_ms=10000"),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "dead_lettered");
    let (_, letters) = api.get(&format!("/projections/{NAME}/_dead_letters")).await;
    let letter = &letters["items"][0];
    let reason = letter["reason"].as_str().unwrap();
    assert!(reason.contains("not JSON"), "{reason}");
    assert!(reason.contains(&setup.topic), "names the topic: {reason}");
    assert_eq!(letter["stream"], "acct-1");
    let (_, parked) = api.get(&format!("/projections/{NAME}/_parked")).await;
    assert_eq!(parked["items"][0]["stream"], "acct-1", "{parked}");
}

/// Lag per partition is exact: the projection paused after applying some of the messages,
/// `projector_kafka_lag_messages` and `GET /projections/{p}` both say produced − applied for
/// each partition, counting applied from the read model itself, and the page (in chromium)
/// shows it; 0 again once resumed.
async fn a_projections_lag_per_partition_is_produced_minus_applied(backend) {
    let setup = Setup::new();
    let mut env = setup.env();
    env.push(("PROJECTOR_ADMIN__TOKEN", crate::isolation::TOKEN.into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = Server::start_on(
        &backend,
        &plugin_set(&[NAME], &[]),
        &tempdir("kafka-lag"),
        &env,
    );
    let api = server.api();
    let p = producer();
    let accounts = 100;
    let (first, _) = opened_then_deposits(accounts, 500, 5);
    let mut landed = produce(&p, &setup.topic, &first).await;
    // The account each message went to: its partition.
    let mut partition_of: BTreeMap<String, i32> = BTreeMap::new();
    for (m, partition) in first.iter().zip(&landed) {
        partition_of.insert(m.key.clone().unwrap(), *partition);
    }
    all_taken(&api, 500).await;
    let (status, body) = crate::isolation::admin(&api, &format!("/admin/projections/{NAME}/pause")).await;
    assert_eq!(status, 200, "{body}");
    eventually(Duration::from_secs(30), || async {
        let (_, s) = api.get(&format!("/projections/{NAME}")).await;
        (s["status"] == "paused").then_some(()).ok_or(s.to_string())
    })
    .await;
    let (more, _) = opened_then_deposits(accounts, 600, 7);
    landed.extend(produce(&p, &setup.topic, &more[accounts..]).await);
    // Every message taken into the log; the projection stays where it paused.
    eventually(Duration::from_secs(60), || async {
        let (_, all) = api.get("/projections").await;
        let events = all["kafka"]["events"].as_u64().unwrap_or(0);
        let partitions = all["kafka"]["partitions"].as_array().cloned().unwrap_or_default();
        let lag: i64 = partitions.iter().map(|p| p["lag"].as_i64().unwrap_or(1)).sum();
        (events == 1000 && lag == 0).then_some(()).ok_or(all["kafka"].to_string())
    })
    .await;
    let mut produced: BTreeMap<i32, i64> = BTreeMap::new();
    for partition in &landed {
        *produced.entry(*partition).or_default() += 1;
    }
    let mut applied: BTreeMap<i32, i64> = BTreeMap::new();
    for (account, partition) in &partition_of {
        let (status, doc) = read(&api, &format!("/projections/{NAME}/accounts/{account}")).await;
        assert_eq!(status, 200, "{account}: {doc}");
        // Its opening and each deposit.
        *applied.entry(*partition).or_default() += 1 + doc["document"]["tx_count"].as_i64().unwrap();
    }
    let expected: BTreeMap<i32, i64> = produced
        .iter()
        .map(|(partition, n)| (*partition, n - applied.get(partition).copied().unwrap_or(0)))
        .collect();
    assert_eq!(expected.values().sum::<i64>(), 500, "produced {produced:?}, applied {applied:?}");
    let lags = || async {
        let (_, summary) = api.get(&format!("/projections/{NAME}")).await;
        let from_summary: BTreeMap<i32, i64> = summary["partitions"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|p| (p["partition"].as_i64().unwrap() as i32, p["lag"].as_i64().unwrap_or(-1)))
            .collect();
        let (_, metrics) = api.get_text("/metrics").await;
        let needle = format!("projector_kafka_lag_messages{{projection=\"{NAME}\",topic=\"{}\",partition=\"", setup.topic);
        let from_metrics: BTreeMap<i32, i64> = metrics
            .lines()
            .filter_map(|line| line.strip_prefix(needle.as_str()))
            .filter_map(|rest| {
                let (partition, value) = rest.split_once("\"} ")?;
                Some((partition.parse().ok()?, value.trim().parse().ok()?))
            })
            .collect();
        (from_summary, from_metrics)
    };
    eventually(Duration::from_secs(30), || async {
        let (from_summary, from_metrics) = lags().await;
        (from_summary == expected && from_metrics == expected)
            .then_some(())
            .ok_or(format!("expected {expected:?}; GET /projections/{NAME}: {from_summary:?}; /metrics: {from_metrics:?}"))
    })
    .await;
    // The operator's page shows the same: a row for each partition the projection reads.
    let driver = crate::ui::driver().await;
    let client = crate::ui::browser(&driver).await;
    client.goto(&format!("{}/ui", api.base)).await.unwrap();
    let rows = format!("#partitions tr[data-reader='{NAME}']");
    eventually(Duration::from_secs(30), || async {
        let mut shown: BTreeMap<i32, i64> = BTreeMap::new();
        let found = client.find_all(Locator::Css(&rows)).await.map_err(|e| e.to_string())?;
        for row in found {
            let mut cells = Vec::new();
            for cell in row.find_all(Locator::Css("td")).await.map_err(|e| e.to_string())? {
                cells.push(cell.text().await.map_err(|e| e.to_string())?);
            }
            // Reader, topic, partition, next offset, high watermark, lag.
            let (Some(partition), Some(lag)) = (cells.get(2), cells.get(5)) else {
                return Err(format!("a row of {cells:?}"));
            };
            shown.insert(
                partition.parse().map_err(|e| format!("{partition:?}: {e}"))?,
                lag.parse().map_err(|e| format!("{lag:?}: {e}"))?,
            );
        }
        (shown == expected).then_some(()).ok_or(format!("the page shows {shown:?}, expected {expected:?}"))
    })
    .await;
    let store = match &backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres { .. } => "postgres",
    };
    crate::ui::screenshot(&client, &format!("kafka-partitions-{store}")).await;
    client.close().await.unwrap();
    let (status, body) = crate::isolation::admin(&api, &format!("/admin/projections/{NAME}/resume")).await;
    assert_eq!(status, 200, "{body}");
    eventually(Duration::from_secs(60), || async {
        let (from_summary, from_metrics) = lags().await;
        let zero: BTreeMap<i32, i64> = expected.keys().map(|p| (*p, 0)).collect();
        (from_summary == zero && from_metrics == zero)
            .then_some(())
            .ok_or(format!("{from_summary:?} {from_metrics:?}"))
    })
    .await;
}

/// Debezium re-sends after a crash: the same events under new offsets are applied once.
async fn the_same_messages_produced_twice_are_applied_once(backend) {
    let setup = Setup::new();
    let server = setup.server(&backend, &tempdir("kafka-dup"), &plugin_set(&[NAME], &[]));
    let api = server.api();
    let p = producer();
    let accounts = 100;
    let mut messages = Vec::new();
    for a in 0..accounts {
        messages.push(debezium(
            &format!("acct-{a}"),
            &id(),
            "AccountOpened",
            &json!({"owner": "o", "currency": "EUR"}),
        ));
    }
    for d in 0..5000 {
        messages.push(debezium(
            &format!("acct-{}", d % accounts),
            &id(),
            "Deposited",
            &json!({"amount": 1}),
        ));
    }
    produce(&p, &setup.topic, &messages).await;
    produce(&p, &setup.topic, &messages).await;
    all_taken(&api, 5100).await;
    // All of the second copy seen (counted as duplicates), nothing applied twice.
    eventually(Duration::from_secs(60), || async {
        let (_, all) = api.get("/projections").await;
        let dups = all["kafka"]["duplicates"].as_u64().unwrap_or(0);
        (dups == 5100)
            .then_some(())
            .ok_or(format!("duplicates {dups}"))
    })
    .await;
    let (_, head) = api.get(&format!("/projections/{NAME}")).await;
    let checkpoint = head["head"].as_u64().unwrap();
    for a in 0..accounts {
        let (status, doc) = read(
            &api,
            &format!(
                "/projections/{NAME}/accounts/acct-{a}?min_position={checkpoint}&timeout_ms=30000"
            ),
        )
        .await;
        assert_eq!(status, 200, "{doc}");
        assert_eq!(doc["document"]["balance"], 50, "acct-{a}: {doc}");
        assert_eq!(doc["document"]["tx_count"], 50);
    }
}

/// kill -9 at random points of a catch-up: every restart seeks to the offsets the database
/// holds; the read model ends exact.
async fn a_consumer_killed_ten_times_mid_catch_up_ends_exact(backend) {
    let setup = Setup::new();
    let data = tempdir("kafka-kill");
    let plugins = plugin_set(&[NAME], &[]);
    let p = producer();
    let streams = 1000;
    let events = 50_000;
    let (messages, expected) = opened_then_deposits(streams, events, 7);
    produce(&p, &setup.topic, &messages).await;
    let mut rng_state = 0x9e37_79b9_u64;
    for kill in 0..10 {
        let mut server = setup.server(&backend, &data, &plugins);
        let api = server.api();
        // Killed once this run has taken a pseudo-random number of messages (or the log is
        // complete): a different point of the catch-up each time.
        rng_state = rng_state.wrapping_mul(6364136223846793005).wrapping_add(1);
        let step = 500 + rng_state % 5000;
        eventually(Duration::from_secs(60), || async {
            let (_, all) = api.get("/projections").await;
            let taken = all["kafka"]["events"].as_u64().unwrap_or(0);
            let partitions = all["kafka"]["partitions"].as_array().cloned().unwrap_or_default();
            let done = !partitions.is_empty()
                && partitions.iter().all(|p| p["lag"].as_i64() == Some(0));
            (taken >= step || done)
                .then_some(())
                .ok_or(format!("{taken} of {step} taken (kill {kill})"))
        })
        .await;
        server.kill();
    }
    let server = setup.server(&backend, &data, &plugins);
    let api = server.api();
    let head = all_taken(&api, events as u64).await;
    assert_eq!(log_count(&backend, &data).await, events as i64, "every event in the log once");
    for (stream, balance) in &expected {
        let (status, doc) = read(
            &api,
            &format!("/projections/{NAME}/accounts/{stream}?min_position={head}&timeout_ms=60000"),
        )
        .await;
        assert_eq!(status, 200, "{doc}");
        assert_eq!(doc["document"]["balance"], *balance, "{stream}: {doc}");
    }
}

}

#[tokio::test]
async fn appends_over_http_are_refused_when_events_come_from_kafka() {
    let setup = Setup::new();
    let server = setup.server(
        &Backend::Sqlite,
        &tempdir("kafka-append"),
        &plugin_set(&[NAME], &[]),
    );
    let (status, body) = server
        .api()
        .post(
            "/events",
            &json!({"stream": "s", "stream_type": "T", "type": "E", "payload": {}}),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "source_is_kafka");
}

/// Producers compress (Kafka Connect's `producer.compression.type`, a topic's
/// `compression.type`): messages in batches compressed with each codec Kafka has are all read
/// and applied.
#[tokio::test]
async fn messages_compressed_with_every_kafka_codec_are_applied() {
    let setup = Setup::new();
    let server = setup.server(
        &Backend::Sqlite,
        &tempdir("kafka-codecs"),
        &plugin_set(&[NAME], &[]),
    );
    let api = server.api();
    let codecs = ["gzip", "snappy", "lz4", "zstd"];
    for (n, codec) in codecs.iter().enumerate() {
        let p: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", broker())
            .set("linger.ms", "5")
            .set("compression.type", *codec)
            .create()
            .unwrap_or_else(|e| panic!("a {codec} producer: {e}"));
        let stream = format!("acct-{codec}");
        let mut messages = vec![debezium(
            &stream,
            &id(),
            "AccountOpened",
            &json!({"owner": codec, "currency": "EUR"}),
        )];
        for _ in 0..=n {
            messages.push(debezium(
                &stream,
                &id(),
                "Deposited",
                &json!({"amount": 10}),
            ));
        }
        produce(&p, &setup.topic, &messages).await;
    }
    let events: usize = (1..=codecs.len()).map(|n| n + 1).sum();
    let head = all_taken(&api, events as u64).await;
    for (n, codec) in codecs.iter().enumerate() {
        let (status, doc) = read(
            &api,
            &format!(
                "/projections/{NAME}/accounts/acct-{codec}?min_position={head}&timeout_ms=30000"
            ),
        )
        .await;
        assert_eq!(status, 200, "{codec}: {doc}");
        assert_eq!(doc["document"]["owner"], *codec, "{doc}");
        assert_eq!(doc["document"]["balance"], 10 * (n + 1), "{codec}: {doc}");
    }
}

/// The consumer is built with TLS and SASL: a `SASL_SSL` configuration with SCRAM (which
/// needs OpenSSL) starts and serves, where a build without them stops at the start.
#[tokio::test]
async fn a_tls_and_sasl_configuration_is_accepted() {
    let setup = Setup::new();
    let mut env = setup.env();
    env.extend([
        (
            "PROJECTOR_KAFKA__OPTIONS__SECURITY_PROTOCOL",
            "SASL_SSL".to_owned(),
        ),
        (
            "PROJECTOR_KAFKA__OPTIONS__SASL_MECHANISMS",
            "SCRAM-SHA-512".to_owned(),
        ),
        (
            "PROJECTOR_KAFKA__OPTIONS__SASL_USERNAME",
            "projector".to_owned(),
        ),
        (
            "PROJECTOR_KAFKA__OPTIONS__SASL_PASSWORD",
            "secret".to_owned(),
        ),
    ]);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = Server::start_on(
        &Backend::Sqlite,
        &plugin_set(&[NAME], &[]),
        &tempdir("kafka-tls"),
        &env,
    );
    let (status, body) = server.api().get("/healthz").await;
    assert_eq!(status, 200, "{body}");
}

/// `kafka.options` reach librdkafka as they are: one it does not know stops the start with
/// an error naming it, instead of a consumer running without the setting (TLS, SASL). The
/// error leaves the value out: the property may be a misspelt secret.
#[tokio::test]
async fn a_kafka_option_librdkafka_does_not_know_stops_the_start_named_without_its_value() {
    let setup = Setup::new();
    let data = tempdir("kafka-options");
    let stderr = data.join("stderr");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_projector"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .arg("--plugins")
        .arg(plugin_set(&[NAME], &[]))
        .envs(setup.env())
        // A misspelt secret: named in the error, its value never shown.
        .env(
            "PROJECTOR_KAFKA__OPTIONS__SASL_PASWORD",
            "hunter2-not-shown",
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr).expect("create the stderr file"));
    let mut child = command.spawn().expect("start projector");
    let status = eventually(Duration::from_secs(30), || {
        let status = child
            .try_wait()
            .expect("the server's status")
            .ok_or_else(|| "the server is still running".to_owned());
        async move { status }
    })
    .await;
    let log = std::fs::read_to_string(&stderr).unwrap_or_default();
    assert!(!status.success(), "the server exited with {status}: {log}");
    assert!(
        log.contains("sasl.pasword"),
        "the error names the property: {log}"
    );
    assert!(
        !log.contains("hunter2-not-shown"),
        "the error shows the value: {log}"
    );
}

/// Scale-out on PostgreSQL: two instances in one group share the partitions; one is killed
/// mid-catch-up (its partitions move to the other within the session timeout), a third joins;
/// the read model ends exact.
#[tokio::test]
async fn instances_in_one_group_share_the_partitions_through_a_kill_and_a_join() {
    let backend = Backend::postgres().await;
    let setup = Setup::new();
    let plugins = plugin_set(&[NAME], &[]);
    let p = producer();
    let streams = 400;
    let events = 20_000;
    let (messages, expected) = opened_then_deposits(streams, events, 5);
    // The topic exists (and has its partitions) once the accounts are opened.
    produce(&p, &setup.topic, &messages[..streams]).await;
    let mut a = setup.server(&backend, &tempdir("group-a"), &plugins);
    let b = setup.server(&backend, &tempdir("group-b"), &plugins);
    let (api_a, api_b) = (a.api(), b.api());
    // Both members hold partitions before the deposits are produced.
    eventually(Duration::from_secs(60), || async {
        let (_, x) = api_a.get("/projections").await;
        let (_, y) = api_b.get("/projections").await;
        let held = |v: &Value| v["kafka"]["partitions"].as_array().map_or(0, Vec::len);
        (held(&x) > 0 && held(&y) > 0 && held(&x) + held(&y) == 4)
            .then_some(())
            .ok_or(format!("a holds {}, b holds {}", held(&x), held(&y)))
    })
    .await;
    produce(&p, &setup.topic, &messages[streams..]).await;
    eventually(Duration::from_secs(60), || async {
        let (_, x) = api_a.get("/projections").await;
        let taken = x["kafka"]["events"].as_u64().unwrap_or(0);
        (taken > 0)
            .then_some(())
            .ok_or("a took nothing yet".to_owned())
    })
    .await;
    a.kill();
    let c = setup.server(&backend, &tempdir("group-c"), &plugins);
    let api_c = c.api();
    // B and C end up holding all four partitions, and the log holds every event once.
    eventually(Duration::from_secs(90), || async {
        let (_, y) = api_b.get("/projections").await;
        let (_, z) = api_c.get("/projections").await;
        let parts = |v: &Value| {
            v["kafka"]["partitions"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        };
        let all: Vec<Value> = parts(&y).into_iter().chain(parts(&z)).collect();
        let distinct: std::collections::BTreeSet<String> =
            all.iter().map(|p| p["partition"].to_string()).collect();
        let lag: i64 = all.iter().map(|p| p["lag"].as_i64().unwrap_or(1)).sum();
        (distinct.len() == 4 && all.len() == 4 && lag == 0)
            .then_some(())
            .ok_or(format!("partitions {all:?}"))
    })
    .await;
    // The log itself, from the database: every event once (the lag above is each member's
    // view; the count is the truth).
    let unused = tempdir("unused");
    eventually(Duration::from_secs(90), || async {
        let total = log_count(&backend, &unused).await;
        (total == events as i64)
            .then_some(())
            .ok_or(format!("{total} events in the log"))
    })
    .await;
    let (_, summary) = api_b.get(&format!("/projections/{NAME}")).await;
    let head = summary["head"].as_u64().unwrap();
    for (stream, balance) in &expected {
        let (status, doc) = api_b
            .get(&format!(
                "/projections/{NAME}/accounts/{stream}?min_position={head}&timeout_ms=60000"
            ))
            .await;
        assert_eq!(status, 200, "{doc}");
        assert_eq!(doc["document"]["balance"], *balance, "{stream}: {doc}");
    }
    let total = log_count(&backend, &tempdir("unused")).await;
    assert_eq!(total, events as i64, "every event in the log once");
}
