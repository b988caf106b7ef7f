//! The Kafka source: Debezium's outbox EventRouter topics, taken into the host's own log.
//!
//! Every instance joins one consumer group (`kafka.group_id`): the group's members share the
//! partitions (cooperative-sticky rebalancing). A member writes what it consumes into the
//! host's outbox, in one transaction per batch that also moves each partition's offset in the
//! database, compared and set: a member that lost a partition in a rebalance cannot write it
//! again, and a restart (or the member taking a partition over) seeks to the offset the
//! database holds. Offsets are also committed to Kafka after each batch, for Kafka's tooling to
//! show the group's lag; they are never read back.
//!
//! From the log on, everything is the outbox's: projections, checkpoints, dead letters,
//! read-your-writes, hot swap. Why a log of its own rather than projections reading Kafka
//! directly: each event is applied once by its id (Debezium re-sends everything since its last
//! offset flush after a crash, under new offsets), over the whole log rather than a window; a
//! projection rebuilt beside the live one, or added later, replays the log without asking
//! Kafka's retention; and `wait_for_event` finds an event by id.
//!
//! Per-stream order: the key is the stream, so a stream lives in one partition, and a
//! partition's messages are written in offset order. Versions come from a header when the
//! connector places one (`kafka.version_header`), else they are counted per stream in the
//! order the log takes events.

pub mod decode;
pub mod postgres;
pub(crate) mod sqlite;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::message::{Headers, Message as _};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;
use tokio::sync::watch;

use self::decode::{Decoding, Message, Rules};
use super::outbox::SqliteOutbox;
use super::pg_outbox::PgOutbox;
use super::SourceError;
use crate::config::KafkaConfig;

/// The host's log as the Kafka consumer writes it: the SQLite outbox, or the PostgreSQL
/// `kafka_log` table.
#[async_trait::async_trait]
pub trait KafkaLog: Send + Sync {
    /// Writes a batch in one transaction (nothing of it when a partition was fenced).
    async fn ingest(&self, group: &str, batch: &Batch) -> Result<Written, SourceError>;
    /// The next offset of every partition `group` has taken.
    async fn kafka_offsets(&self, group: &str) -> Result<HashMap<(String, i32), i64>, SourceError>;
    /// Where a projection whose checkpoint is `checkpoint` stands in each partition `group`
    /// has taken: see [`PartitionRows::next_to_apply`].
    async fn applied_offsets(
        &self,
        group: &str,
        checkpoint: u64,
    ) -> Result<HashMap<(String, i32), i64>, SourceError>;
}

/// What the log holds of one partition, as seen from a checkpoint: enough to say how far a
/// projection at that checkpoint has come in the partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PartitionRows {
    /// The next offset the consumer takes into the log.
    pub taken_to: i64,
    /// The position of the partition's newest row, if it has any.
    pub newest: Option<i64>,
    /// The position and offset of its newest row at or below the checkpoint.
    pub applied: Option<(i64, i64)>,
    /// The offset of its oldest row.
    pub first_offset: Option<i64>,
}

/// A row of the stores' `applied_offsets` query: topic, partition, the partition's next offset
/// taken, its newest row's position, its newest row's position and offset at or below the
/// checkpoint, its oldest row's offset.
pub(crate) type AppliedRow = (
    String,
    i32,
    i64,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);

/// Each partition's next offset to apply, from the stores' `applied_offsets` rows.
pub(crate) fn next_to_apply(rows: Vec<AppliedRow>) -> HashMap<(String, i32), i64> {
    rows.into_iter()
        .map(
            |(topic, partition, taken_to, newest, position, offset, first_offset)| {
                let rows = PartitionRows {
                    taken_to,
                    newest,
                    applied: position.zip(offset),
                    first_offset,
                };
                ((topic, partition), rows.next_to_apply())
            },
        )
        .collect()
}

impl PartitionRows {
    /// The first offset of the partition a projection at the checkpoint has not passed: the
    /// one after the newest row it has applied; everything the consumer took once that row is
    /// the partition's newest (tombstones and re-sent duplicates after it make no rows); the
    /// oldest row's while it has applied none.
    pub fn next_to_apply(&self) -> i64 {
        match (self.newest, self.applied) {
            (None, _) => self.taken_to,
            (Some(newest), Some((position, _))) if position >= newest => self.taken_to,
            (Some(_), Some((_, offset))) => offset + 1,
            (Some(_), None) => self.first_offset.unwrap_or(0),
        }
    }
}

#[async_trait::async_trait]
impl KafkaLog for SqliteOutbox {
    async fn ingest(&self, group: &str, batch: &Batch) -> Result<Written, SourceError> {
        SqliteOutbox::ingest(self, group, batch).await
    }
    async fn kafka_offsets(&self, group: &str) -> Result<HashMap<(String, i32), i64>, SourceError> {
        SqliteOutbox::kafka_offsets(self, group).await
    }
    async fn applied_offsets(
        &self,
        group: &str,
        checkpoint: u64,
    ) -> Result<HashMap<(String, i32), i64>, SourceError> {
        SqliteOutbox::applied_offsets(self, group, checkpoint).await
    }
}

#[async_trait::async_trait]
impl KafkaLog for PgOutbox {
    async fn ingest(&self, group: &str, batch: &Batch) -> Result<Written, SourceError> {
        postgres::write(self.db(), self, group, batch).await
    }
    async fn kafka_offsets(&self, group: &str) -> Result<HashMap<(String, i32), i64>, SourceError> {
        postgres::offsets(self.db(), group).await
    }
    async fn applied_offsets(
        &self,
        group: &str,
        checkpoint: u64,
    ) -> Result<HashMap<(String, i32), i64>, SourceError> {
        postgres::applied_offsets(self.db(), group, checkpoint).await
    }
}

/// The header that marks a log row made of a message no event could be made of; its value is
/// the reason. The outbox reader reports such a row as malformed.
pub const MALFORMED_HEADER: &str = "projector.malformed";

/// Messages taken from Kafka, in consumption order, and the partitions they cover.
#[derive(Debug, Default)]
pub struct Batch {
    pub messages: Vec<Taken>,
    pub partitions: Vec<Range>,
}

#[derive(Debug)]
pub struct Taken {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub decoding: Decoding,
}

/// A partition's part of a batch: the database's next offset must be `from`; it becomes `to`.
#[derive(Debug, Clone)]
pub struct Range {
    pub topic: String,
    pub partition: i32,
    pub from: i64,
    pub to: i64,
}

/// What a batch did.
#[derive(Debug, Default, Clone)]
pub struct Written {
    pub events: u64,
    pub duplicates: u64,
    pub tombstones: u64,
    pub bad: u64,
    /// Partitions another member moved meanwhile: `(topic, partition, the database's next
    /// offset)`. Nothing of the batch was written.
    pub fenced: Vec<(String, i32, i64)>,
}

/// Counters and per-partition positions, for `/metrics` and `GET /projections`.
pub struct KafkaStats {
    inner: Mutex<StatsInner>,
    log: Arc<dyn KafkaLog>,
    group: String,
}

#[derive(Debug, Default, Clone)]
struct StatsInner {
    events: u64,
    duplicates: u64,
    tombstones: u64,
    bad: u64,
    /// (topic, partition) -> (next offset to take, high watermark: -1 until librdkafka's
    /// statistics report it from a fetch, whether this member has written a batch of it)
    partitions: HashMap<(String, i32), (i64, i64, bool)>,
}

/// One partition as `/metrics` shows it.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
    /// `None` until a fetch response has told it.
    pub high_watermark: Option<i64>,
    pub lag: Option<i64>,
}

impl KafkaStats {
    fn new(log: Arc<dyn KafkaLog>, group: String) -> Self {
        Self {
            inner: Mutex::default(),
            log,
            group,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StatsInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `(events, duplicates, tombstones, bad)` taken by this instance since start.
    pub fn counts(&self) -> (u64, u64, u64, u64) {
        let s = self.lock();
        (s.events, s.duplicates, s.tombstones, s.bad)
    }

    /// The partitions this instance holds, with their lag: the high watermark minus the next
    /// offset to take.
    pub fn partitions(&self) -> Vec<PartitionLag> {
        let mut all: Vec<PartitionLag> = self
            .lock()
            .partitions
            .iter()
            .map(|((topic, partition), (next, high, _))| PartitionLag {
                topic: topic.clone(),
                partition: *partition,
                next_offset: *next,
                high_watermark: (*high >= 0).then_some(*high),
                lag: (*high >= 0).then(|| (high - next).max(0)),
            })
            .collect();
        all.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        all
    }

    /// Where a projection whose checkpoint is `checkpoint` stands in each partition this
    /// instance holds: the next offset it applies, the partition's high watermark, and the
    /// messages between (exact: each log row keeps its offset). A partition another member
    /// holds is that member's to report: only the holder knows its watermark.
    pub async fn applied(&self, checkpoint: u64) -> Result<Vec<PartitionLag>, SourceError> {
        let applied = self.log.applied_offsets(&self.group, checkpoint).await?;
        Ok(self
            .partitions()
            .into_iter()
            .filter_map(|held| {
                let next = *applied.get(&(held.topic.clone(), held.partition))?;
                Some(PartitionLag {
                    lag: held.high_watermark.map(|high| (high - next).max(0)),
                    next_offset: next,
                    ..held
                })
            })
            .collect())
    }
}

/// What the rebalance callback and the consuming loop share.
#[derive(Default)]
struct Assignment {
    /// The next offset to take, by partition held.
    next: HashMap<(String, i32), i64>,
    /// Partitions revoked since the loop last looked: their buffered messages are dropped.
    revoked: HashSet<(String, i32)>,
}

struct Context {
    outbox: Arc<dyn KafkaLog>,
    group: String,
    runtime: tokio::runtime::Handle,
    assignment: Arc<Mutex<Assignment>>,
    stats: Arc<KafkaStats>,
}

impl ClientContext for Context {
    /// librdkafka's statistics (every second): each partition's high watermark as the last
    /// fetch response gave it (a broker's ListOffsets may answer one short).
    fn stats(&self, statistics: rdkafka::statistics::Statistics) {
        let mut s = self.stats.lock();
        for (topic, t) in statistics.topics {
            for (partition, p) in t.partitions {
                if let Some((next, high, _)) = s.partitions.get_mut(&(topic.clone(), partition)) {
                    // Only once fetching: before, the figure is not the broker's watermark.
                    if p.fetch_state == "active" && p.hi_offset >= 0 {
                        *high = p.hi_offset.max(*next);
                    }
                }
            }
        }
    }
}

impl ConsumerContext for Context {
    /// Assigned partitions start where the database says (not where Kafka's committed offsets
    /// say); revoked ones are dropped from what the loop may write.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            rdkafka::consumer::RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                // The callback runs inside the consuming task's poll: the read is short, and
                // nothing else may go on in this task meanwhile anyway.
                let stored = tokio::task::block_in_place(|| {
                    self.runtime
                        .block_on(self.outbox.kafka_offsets(&self.group))
                });
                let stored = match stored {
                    Ok(stored) => stored,
                    Err(err) => {
                        tracing::error!(error = %err, "cannot read the Kafka offsets from the database; starting the assigned partitions from the beginning (each event id is still taken once)");
                        HashMap::new()
                    }
                };
                let mut assignment = self
                    .assignment
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let held: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                for (topic, partition) in held {
                    let key = (topic.clone(), partition);
                    let offset = stored.get(&key).copied().unwrap_or(0);
                    let _ = tpl.set_partition_offset(&topic, partition, Offset::Offset(offset));
                    assignment.next.insert(key.clone(), offset);
                    assignment.revoked.remove(&key);
                    self.stats
                        .lock()
                        .partitions
                        .insert(key, (offset, -1, false));
                    tracing::info!(topic, partition, offset, "partition assigned");
                }
                let assigned = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(err) = assigned {
                    tracing::error!(error = %err, "cannot take the assigned partitions");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let mut assignment = self
                    .assignment
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                for e in tpl.elements() {
                    let key = (e.topic().to_owned(), e.partition());
                    assignment.next.remove(&key);
                    self.stats.lock().partitions.remove(&key);
                    tracing::info!(
                        topic = e.topic(),
                        partition = e.partition(),
                        "partition revoked"
                    );
                    assignment.revoked.insert(key);
                }
                let unassigned = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(err) = unassigned {
                    tracing::error!(error = %err, "cannot give the revoked partitions back");
                }
            }
            other => tracing::warn!(error = ?other, "rebalance error"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("kafka: {0}")]
    Settings(String),
    #[error("kafka: {0}")]
    Client(#[from] rdkafka::error::KafkaError),
}

/// A property librdkafka refused, named without its value: rdkafka's own message ends with
/// the value, and a misspelt secret (`sasl.pasword`) would reach the log.
fn without_value(err: rdkafka::error::KafkaError) -> KafkaError {
    match err {
        rdkafka::error::KafkaError::ClientConfig(_, reason, key, _) => {
            KafkaError::Settings(format!("kafka.options: {reason} (property `{key}`)"))
        }
        other => KafkaError::Client(other),
    }
}

/// The consuming side, started by `serve` with `source.kind = "kafka"`.
pub struct KafkaSource {
    pub stats: Arc<KafkaStats>,
}

impl KafkaSource {
    /// Joins the group and takes messages into `outbox` until `shutdown`.
    pub fn start(
        config: &KafkaConfig,
        outbox: Arc<dyn KafkaLog>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), KafkaError> {
        let rules = Rules::new(config).map_err(KafkaError::Settings)?;
        let stats = Arc::new(KafkaStats::new(outbox.clone(), config.group_id.clone()));
        let assignment = Arc::new(Mutex::new(Assignment::default()));
        let context = Context {
            outbox: outbox.clone(),
            group: config.group_id.clone(),
            runtime: tokio::runtime::Handle::current(),
            assignment: assignment.clone(),
            stats: stats.clone(),
        };
        let mut client = ClientConfig::new();
        // A topic created after the subscription (the first event of a new aggregate type) is
        // found within a second, not librdkafka's default 5 minutes.
        client.set("topic.metadata.refresh.interval.ms", "1000");
        for (key, value) in &config.options {
            client.set(key, value);
        }
        let consumer: StreamConsumer<Context> = client
            .set("bootstrap.servers", &config.brokers)
            .set("group.id", &config.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("session.timeout.ms", config.session_timeout_ms.to_string())
            .set("fetch.wait.max.ms", config.fetch_wait_ms.to_string())
            .set("statistics.interval.ms", "1000")
            .create_with_context(context)
            .map_err(without_value)?;
        let topics: Vec<&str> = config
            .topics
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect();
        if topics.is_empty() {
            return Err(KafkaError::Settings("kafka.topics names no topic".into()));
        }
        consumer.subscribe(&topics)?;
        tracing::info!(brokers = %config.brokers, topics = ?topics, group = %config.group_id, "consuming from Kafka");
        let task = tokio::spawn(consume(
            consumer,
            rules,
            outbox,
            config.group_id.clone(),
            config.max_batch_messages.max(1),
            assignment,
            stats.clone(),
            shutdown,
        ));
        Ok((Self { stats }, task))
    }
}

#[allow(clippy::too_many_arguments)]
async fn consume(
    consumer: StreamConsumer<Context>,
    rules: Rules,
    outbox: Arc<dyn KafkaLog>,
    group: String,
    max_batch: usize,
    assignment: Arc<Mutex<Assignment>>,
    stats: Arc<KafkaStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        // The first message waits as long as it takes; the rest of a batch are those already
        // fetched. No lingering for more: while a batch is written the next one gathers in
        // librdkafka's queue, so a catch-up finds its batches full and a live message waits for
        // nothing but the write before it.
        let first = tokio::select! {
            message = consumer.recv() => message,
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() { break }
                continue;
            }
        };
        let mut batch = Batch::default();
        let mut pending = vec![first];
        while pending.len() < max_batch {
            // A zero timeout polls once: a message already fetched is ready.
            match tokio::time::timeout(Duration::ZERO, consumer.recv()).await {
                Ok(message) => pending.push(message),
                Err(_) => break,
            }
        }
        let mut ranges: HashMap<(String, i32), Range> = HashMap::new();
        {
            let mut held = assignment.lock().unwrap_or_else(PoisonError::into_inner);
            let revoked = std::mem::take(&mut held.revoked);
            for message in pending {
                let message = match message {
                    Ok(message) => message,
                    Err(err) => {
                        tracing::warn!(error = %err, "consuming from Kafka failed; going on");
                        continue;
                    }
                };
                let key = (message.topic().to_owned(), message.partition());
                if revoked.contains(&key) && !held.next.contains_key(&key) {
                    continue;
                }
                let Some(next) = held.next.get(&key).copied() else {
                    continue;
                };
                // Already taken (a re-delivery after a seek): skip.
                if message.offset() < next {
                    continue;
                }
                let headers: Vec<(&str, Option<&[u8]>)> = message
                    .headers()
                    .map(|h| h.iter().map(|h| (h.key, h.value)).collect())
                    .unwrap_or_default();
                let decoded = rules.decode(&Message {
                    topic: message.topic(),
                    partition: message.partition(),
                    offset: message.offset(),
                    key: message.key(),
                    value: message.payload(),
                    headers,
                    timestamp_ms: message.timestamp().to_millis(),
                });
                ranges
                    .entry(key.clone())
                    .or_insert_with(|| Range {
                        topic: key.0.clone(),
                        partition: key.1,
                        from: next,
                        to: next,
                    })
                    .to = message.offset() + 1;
                held.next.insert(key, message.offset() + 1);
                batch.messages.push(Taken {
                    topic: message.topic().to_owned(),
                    partition: message.partition(),
                    offset: message.offset(),
                    decoding: decoded,
                });
            }
        }
        if batch.messages.is_empty() {
            continue;
        }
        batch.partitions = ranges.into_values().collect();
        loop {
            let started = std::time::Instant::now();
            match outbox.ingest(&group, &batch).await {
                Ok(written) if !written.fenced.is_empty() => {
                    tracing::warn!(fenced = ?written.fenced, "partitions moved by another member: seeking to the database's offsets");
                    reseek(&consumer, &assignment, &batch, &written.fenced);
                    break;
                }
                Ok(written) => {
                    tracing::debug!(
                        messages = batch.messages.len(),
                        partitions = batch.partitions.len(),
                        write_ms = started.elapsed().as_secs_f64() * 1000.0,
                        "Kafka batch written to the log"
                    );
                    backoff = Duration::from_millis(50);
                    record(&consumer, &stats, &batch, &written);
                    break;
                }
                Err(err) => {
                    tracing::warn!(error = %err, retry_in_ms = backoff.as_millis() as u64, "cannot write a Kafka batch; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        changed = shutdown.changed() => if changed.is_err() || *shutdown.borrow() { return },
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
    tracing::info!("Kafka consumer stopped");
}

/// The batch was not written: every partition it touched starts again where the database
/// says (the fenced ones) or where the batch started (the others).
fn reseek(
    consumer: &StreamConsumer<Context>,
    assignment: &Mutex<Assignment>,
    batch: &Batch,
    fenced: &[(String, i32, i64)],
) {
    let mut held = assignment.lock().unwrap_or_else(PoisonError::into_inner);
    for range in &batch.partitions {
        let offset = fenced
            .iter()
            .find(|(t, p, _)| *t == range.topic && *p == range.partition)
            .map_or(range.from, |(_, _, stored)| *stored);
        let key = (range.topic.clone(), range.partition);
        if let Some(next) = held.next.get_mut(&key) {
            *next = offset;
            if let Err(err) = consumer.seek(
                &range.topic,
                range.partition,
                Offset::Offset(offset),
                Duration::from_secs(5),
            ) {
                tracing::warn!(topic = %range.topic, partition = range.partition, error = %err, "cannot seek");
            }
        }
    }
}

/// After a batch is durable: counters, the partitions' positions and watermarks, and the
/// offsets committed to Kafka for its tooling (never read back).
fn record(
    consumer: &StreamConsumer<Context>,
    stats: &KafkaStats,
    batch: &Batch,
    written: &Written,
) {
    let mut tpl = TopicPartitionList::new();
    {
        let mut s = stats.lock();
        s.events += written.events;
        s.duplicates += written.duplicates;
        s.tombstones += written.tombstones;
        s.bad += written.bad;
        for range in &batch.partitions {
            let key = (range.topic.clone(), range.partition);
            // A watermark not told yet stays unknown: the batch says nothing of what follows.
            let high = s.partitions.get(&key).map_or(-1, |&(_, high, _)| high);
            let high = if high < 0 { high } else { high.max(range.to) };
            s.partitions.insert(key, (range.to, high, true));
            let _ =
                tpl.add_partition_offset(&range.topic, range.partition, Offset::Offset(range.to));
        }
    }
    let committed: KafkaResult<()> = consumer.commit(&tpl, CommitMode::Async);
    if let Err(err) = committed {
        tracing::debug!(error = %err, "committing offsets to Kafka (for its tooling) failed");
    }
}

/// One row of the log a batch writes: an event, or a message kept as malformed (`payload`
/// `None`, the reason in the marker header).
#[derive(Debug)]
pub(crate) struct LogRow<'a> {
    /// The message it was made of: where a projection that applied it stands in the partition.
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub id: String,
    pub stream: String,
    pub stream_type: String,
    pub event_type: String,
    pub version: u64,
    pub payload: Option<String>,
    pub headers: String,
    pub timestamp_ms: i64,
}

/// The streams and ids (as the log keys them, `id_of`) a batch touches: what a store looks up
/// before [`plan`].
pub(crate) fn touched(batch: &Batch, id_of: impl Fn(&str) -> String) -> (Vec<String>, Vec<String>) {
    let mut streams = Vec::new();
    let mut ids = Vec::new();
    for message in &batch.messages {
        match &message.decoding {
            Decoding::Event(e) => {
                streams.push(e.stream.clone());
                ids.push(id_of(&e.id));
            }
            Decoding::Bad { stream, id, .. } => {
                streams.push(stream.clone().unwrap_or_default());
                if let Some(id) = id {
                    ids.push(id_of(id));
                }
            }
            Decoding::Tombstone => {}
        }
    }
    streams.sort_unstable();
    streams.dedup();
    (streams, ids)
}

/// The rows a batch adds to the log, given each stream's newest version and the ids the log
/// holds (both updated as rows are planned): each event id once, a version from its header
/// (one not above the stream's newest is a re-sent event) or the stream's next. Store-neutral:
/// the stores differ only in their SQL.
pub(crate) fn plan<'a>(
    batch: &'a Batch,
    versions: &mut HashMap<String, u64>,
    seen: &mut HashSet<String>,
    id_of: impl Fn(&str) -> String,
) -> (Vec<LogRow<'a>>, Written) {
    let mut written = Written::default();
    let mut rows = Vec::with_capacity(batch.messages.len());
    for message in &batch.messages {
        match &message.decoding {
            Decoding::Tombstone => written.tombstones += 1,
            Decoding::Event(e) => {
                // Debezium re-sends after a crash (new offsets, same ids): written once.
                let id = id_of(&e.id);
                if !seen.insert(id.clone()) {
                    written.duplicates += 1;
                    continue;
                }
                let current = versions.entry(e.stream.clone()).or_insert(0);
                let version = match e.version {
                    Some(v) if v <= *current => {
                        written.duplicates += 1;
                        continue;
                    }
                    Some(v) => v,
                    None => *current + 1,
                };
                *current = version;
                let headers: Vec<(&String, &String)> = e.headers.iter().collect();
                rows.push(LogRow {
                    topic: &message.topic,
                    partition: message.partition,
                    offset: message.offset,
                    id,
                    stream: e.stream.clone(),
                    stream_type: e.stream_type.clone(),
                    event_type: e.event_type.clone(),
                    version,
                    payload: Some(e.payload.get().to_owned()),
                    headers: serde_json::to_string(&headers).unwrap_or_else(|_| "[]".into()),
                    timestamp_ms: e.timestamp_ms as i64,
                });
                written.events += 1;
            }
            Decoding::Bad {
                stream,
                id,
                event_type,
                reason,
            } => {
                let id = id_of(&id.clone().unwrap_or_else(|| {
                    format!(
                        "kafka:{}:{}:{}",
                        message.topic, message.partition, message.offset
                    )
                }));
                // The same bad message re-sent: set aside once.
                if !seen.insert(id.clone()) {
                    written.duplicates += 1;
                    continue;
                }
                let stream = stream.clone().unwrap_or_default();
                let current = versions.entry(stream.clone()).or_insert(0);
                *current += 1;
                rows.push(LogRow {
                    topic: &message.topic,
                    partition: message.partition,
                    offset: message.offset,
                    id,
                    stream,
                    stream_type: String::new(),
                    event_type: event_type.clone().unwrap_or_default(),
                    version: *current,
                    payload: None,
                    headers: serde_json::to_string(&[(MALFORMED_HEADER, reason.as_str())])
                        .unwrap_or_else(|_| "[]".into()),
                    timestamp_ms: crate::store::now_ms(),
                });
                written.bad += 1;
            }
        }
    }
    (rows, written)
}

#[cfg(test)]
mod tests {
    use super::PartitionRows;

    fn rows(newest: Option<i64>, applied: Option<(i64, i64)>) -> PartitionRows {
        PartitionRows {
            taken_to: 50,
            newest,
            applied,
            first_offset: Some(3),
        }
    }

    #[test]
    fn a_projection_stands_after_the_newest_row_it_applied() {
        // Rows at positions 10 (offset 7) and 20 (offset 12); the checkpoint passed the first.
        assert_eq!(rows(Some(20), Some((10, 7))).next_to_apply(), 8);
    }

    #[test]
    fn past_the_partitions_newest_row_everything_taken_is_passed() {
        // Tombstones and re-sent duplicates after offset 12 make no rows: passed with it.
        assert_eq!(rows(Some(20), Some((20, 12))).next_to_apply(), 50);
        // A partition of tombstones only.
        assert_eq!(rows(None, None).next_to_apply(), 50);
    }

    #[test]
    fn before_its_first_row_a_projection_stands_at_that_rows_offset() {
        assert_eq!(rows(Some(20), None).next_to_apply(), 3);
    }
}
