//! The pipeline and isolation without the binary: an in-memory [`Source`] and [`Store`], and a
//! scripted [`BatchHandler`] that fails on the events whose payload asks for it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use super::*;
use crate::control::Reply;
use crate::runtime::{BatchHandler, CollectionSpec, Descriptor, DocumentReader, Failed};
use crate::store::{AdminAction, Document, Lease, LetterCounts, ListQuery, ParkedStream};

// ---------------------------------------------------------------------------------------------
// In-memory source

struct MemSource {
    events: Mutex<Vec<Event>>,
    head: watch::Sender<u64>,
}

impl MemSource {
    fn new(events: Vec<Event>) -> Arc<Self> {
        let head = events.last().map_or(0, |e| e.position);
        Arc::new(Self {
            events: Mutex::new(events),
            head: watch::Sender::new(head),
        })
    }
}

#[async_trait]
impl Source for MemSource {
    async fn read(
        &self,
        after: u64,
        max_events: usize,
        _max_bytes: usize,
    ) -> Result<Vec<Event>, SourceError> {
        let events = self.events.lock().unwrap();
        Ok(events
            .iter()
            .filter(|e| e.position > after)
            .take(max_events)
            .cloned()
            .collect())
    }
    fn head(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }
    async fn position_of(&self, stream: &str, version: u64) -> Result<Option<u64>, SourceError> {
        let events = self.events.lock().unwrap();
        Ok(events
            .iter()
            .find(|e| e.stream == stream && e.version == version)
            .map(|e| e.position))
    }
    async fn version_at(&self, stream: &str, position: u64) -> Result<u64, SourceError> {
        let events = self.events.lock().unwrap();
        Ok(events
            .iter()
            .filter(|e| e.stream == stream && e.position <= position)
            .map(|e| e.version)
            .max()
            .unwrap_or(0))
    }
}

// ---------------------------------------------------------------------------------------------
// In-memory store

#[derive(Default)]
struct MemState {
    docs: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    checkpoint: u64,
    letters: BTreeMap<u64, DeadLetter>,
    actions: Vec<AdminAction>,
    paused: bool,
    commits: usize,
    /// Each commit's checkpoint and whether it asked to be durable.
    durable: Vec<(u64, bool)>,
}

#[derive(Default)]
struct MemStore {
    state: Mutex<MemState>,
    /// Commits to refuse with a database error before letting one through.
    fail_commits: AtomicUsize,
}

fn db_error() -> StoreError {
    StoreError::Database {
        context: "test".into(),
        source: sqlx::Error::PoolTimedOut,
    }
}

#[async_trait]
impl Store for MemStore {
    async fn register(&self, _: &Descriptor) -> Result<u64, StoreError> {
        Ok(self.state.lock().unwrap().checkpoint)
    }
    async fn checkpoint(&self, _: &Descriptor) -> Result<u64, StoreError> {
        Ok(self.state.lock().unwrap().checkpoint)
    }
    // The runner never touches the catalog: the deploy tests run on the real stores.
    async fn prepare(&self, _: &Descriptor) -> Result<u64, StoreError> {
        Ok(self.state.lock().unwrap().checkpoint)
    }
    async fn catalog_revision(&self) -> Result<i64, StoreError> {
        Ok(0)
    }
    async fn catalog(&self) -> Result<Vec<crate::store::catalog::CatalogEntry>, StoreError> {
        Ok(Vec::new())
    }
    async fn plugin_code(&self, _: &str, _: &str) -> Result<Option<(String, Vec<u8>)>, StoreError> {
        Ok(None)
    }
    async fn save_plugin(
        &self,
        _: &crate::store::catalog::StoredPlugin,
        _: &[u8],
        _: crate::store::catalog::Placement,
    ) -> Result<(), StoreError> {
        Err(db_error())
    }
    async fn cut_over(
        &self,
        _: &str,
        _: &str,
        _: &str,
    ) -> Result<crate::store::catalog::CutOver, StoreError> {
        Err(db_error())
    }
    async fn build_version(&self, _: &str, _: &str, _: bool) -> Result<bool, StoreError> {
        Err(db_error())
    }
    async fn drop_version(&self, _: &Descriptor) -> Result<(), StoreError> {
        Err(db_error())
    }
    async fn drop_projection(&self, _: &str) -> Result<(), StoreError> {
        Err(db_error())
    }
    async fn commit(&self, projection: &Descriptor, batch: &Batch<'_>) -> Result<(), StoreError> {
        if self
            .fail_commits
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(db_error());
        }
        let mut s = self.state.lock().unwrap();
        s.durable.push((batch.to, batch.durable));
        if s.checkpoint != batch.from {
            return Err(StoreError::Fenced {
                projection: projection.name.clone(),
                expected: batch.from,
            });
        }
        for (collection, writes) in &batch.output.writes {
            let docs = s.docs.entry(collection.clone()).or_default();
            for (key, doc) in writes {
                match doc {
                    Some(doc) => docs.insert(key.clone(), doc.clone()),
                    None => docs.remove(key),
                };
            }
        }
        for letter in batch.dead_letters {
            s.letters.insert(letter.position, letter.clone());
        }
        for position in batch.released {
            s.letters.remove(position);
        }
        if let Some((position, state)) = batch.resolved {
            if let Some(letter) = s.letters.get_mut(&position) {
                letter.state = state;
                letter.resolved_at = Some(1);
            }
        }
        s.actions.extend(batch.actions.iter().cloned());
        s.checkpoint = batch.to;
        s.commits += 1;
        Ok(())
    }
    async fn parked_streams(&self, d: &Descriptor) -> Result<HashMap<String, u64>, StoreError> {
        Ok(self
            .parked(d)
            .await?
            .into_iter()
            .map(|p| (p.stream, p.behind))
            .collect())
    }
    async fn letter_counts(&self, d: &Descriptor) -> Result<LetterCounts, StoreError> {
        let parked = self.parked(d).await?;
        let s = self.state.lock().unwrap();
        Ok(LetterCounts {
            open: s
                .letters
                .values()
                .filter(|l| l.is_open() && l.parked_behind.is_none())
                .count() as u64,
            parked_streams: parked.len() as u64,
            parked_events: parked.iter().map(|p| p.events).sum(),
        })
    }
    async fn parked(&self, _: &Descriptor) -> Result<Vec<ParkedStream>, StoreError> {
        let s = self.state.lock().unwrap();
        Ok(s.letters
            .values()
            .filter(|l| l.is_open() && l.parked_behind.is_none())
            .filter_map(|l| {
                Some(ParkedStream {
                    stream: l.stream.clone()?,
                    behind: l.position,
                    reason: l.reason.clone(),
                    events: s
                        .letters
                        .values()
                        .filter(|p| p.parked_behind == Some(l.position))
                        .count() as u64,
                })
            })
            .collect())
    }
    async fn dead_letters(
        &self,
        _: &Descriptor,
        after: u64,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let s = self.state.lock().unwrap();
        Ok(s.letters
            .range(after + 1..)
            .take(limit as usize)
            .map(|(_, l)| l.clone())
            .collect())
    }
    async fn dead_letter(&self, _: &Descriptor, at: u64) -> Result<Option<DeadLetter>, StoreError> {
        Ok(self.state.lock().unwrap().letters.get(&at).cloned())
    }
    async fn parked_behind(&self, _: &Descriptor, at: u64) -> Result<Vec<DeadLetter>, StoreError> {
        let s = self.state.lock().unwrap();
        Ok(s.letters
            .values()
            .filter(|l| l.parked_behind == Some(at))
            .cloned()
            .collect())
    }
    async fn record_action(&self, _: &Descriptor, a: &AdminAction) -> Result<(), StoreError> {
        self.state.lock().unwrap().actions.push(a.clone());
        Ok(())
    }
    async fn paused(&self, _: &str) -> Result<bool, StoreError> {
        Ok(self.state.lock().unwrap().paused)
    }
    async fn set_paused(&self, _: &str, paused: bool) -> Result<(), StoreError> {
        self.state.lock().unwrap().paused = paused;
        Ok(())
    }
    async fn submit_command(&self, _: &str, _: &str) -> Result<i64, StoreError> {
        Err(db_error())
    }
    async fn pending_commands(&self, _: &str) -> Result<Vec<(i64, String)>, StoreError> {
        Ok(Vec::new())
    }
    async fn answer_command(&self, _: i64, _: &str, _: bool) -> Result<bool, StoreError> {
        Ok(true)
    }
    async fn command_answer(&self, _: i64) -> Result<Option<String>, StoreError> {
        Ok(None)
    }
    async fn try_lease(&self, _: &str) -> Result<Option<Lease>, StoreError> {
        Ok(Some(Lease::exclusive()))
    }
    async fn set_status(
        &self,
        _: &str,
        _: ProjectionStatus,
        _: Option<&str>,
    ) -> Result<(), StoreError> {
        Ok(())
    }
    async fn document(
        &self,
        _: &Descriptor,
        c: &str,
        key: &str,
    ) -> Result<Option<Document>, StoreError> {
        let s = self.state.lock().unwrap();
        Ok(s.docs.get(c).and_then(|d| d.get(key)).map(|doc| Document {
            key: key.into(),
            version: 1,
            updated_at: 0,
            json: serde_json::value::RawValue::from_string(String::from_utf8(doc.clone()).unwrap())
                .unwrap(),
        }))
    }
    async fn documents(
        &self,
        d: &Descriptor,
        c: &str,
        keys: &[&str],
    ) -> Result<Vec<Document>, StoreError> {
        let mut out = Vec::new();
        for key in keys {
            out.extend(self.document(d, c, key).await?);
        }
        Ok(out)
    }
    async fn list(
        &self,
        _: &Descriptor,
        _: &str,
        _: &ListQuery,
    ) -> Result<Vec<Document>, StoreError> {
        Ok(Vec::new())
    }
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
    // The runner logs actions through `commit`; the dispatcher's queries are not its concern.
    async fn open_actions(
        &self,
        _: &str,
        _: i64,
        _: u32,
    ) -> Result<Vec<crate::observer::Logged>, StoreError> {
        Ok(Vec::new())
    }
    async fn actions_by_id(
        &self,
        _: &str,
        _: &[i64],
    ) -> Result<Vec<crate::observer::Logged>, StoreError> {
        Ok(Vec::new())
    }
    async fn update_actions(&self, _: &[crate::observer::Update]) -> Result<(), StoreError> {
        Ok(())
    }
    async fn list_actions(
        &self,
        _: &str,
        _: crate::observer::ActionState,
        _: i64,
        _: u32,
    ) -> Result<Vec<crate::observer::Logged>, StoreError> {
        Ok(Vec::new())
    }
    async fn action_counts(&self, _: &str) -> Result<crate::observer::Counts, StoreError> {
        Ok(crate::observer::Counts::default())
    }
    async fn resolve_action(
        &self,
        _: &str,
        _: i64,
        _: bool,
    ) -> Result<Option<crate::observer::Logged>, StoreError> {
        Ok(None)
    }
}

// ---------------------------------------------------------------------------------------------
// Scripted plugin: per stream, `{"count", "versions": [...]}`; an event whose payload has
// `"fail"` fails the way it says (unless fixed).

struct Scripted {
    descriptor: Descriptor,
    fixed: AtomicBool,
    calls: AtomicUsize,
    /// Host faults an event marked `"fail": "flaky"` still causes.
    flaky: AtomicUsize,
}

impl Scripted {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            descriptor: Descriptor {
                name: "scripted".into(),
                version: "1".into(),
                event_types: Vec::new(),
                collections: vec![CollectionSpec {
                    name: "streams".into(),
                    indexes: Vec::new(),
                }],
            },
            fixed: AtomicBool::new(false),
            calls: AtomicUsize::new(0),
            flaky: AtomicUsize::new(0),
        })
    }
}

impl BatchHandler for Scripted {
    fn descriptor(&self) -> &Descriptor {
        &self.descriptor
    }

    fn handle(
        &self,
        events: Vec<Event>,
        docs: Arc<dyn DocumentReader>,
    ) -> Result<BatchOutput, Failed> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut output = BatchOutput::default();
        let mut mine: HashMap<String, Value> = HashMap::new();
        for (i, e) in events.iter().enumerate() {
            let payload: Value = serde_json::from_str(e.payload.get()).unwrap();
            let fail = payload["fail"]
                .as_str()
                .filter(|_| !self.fixed.load(Ordering::SeqCst));
            let error = match fail {
                Some("error") => Some(RuntimeError::Guest {
                    plugin: "scripted".into(),
                    index: i,
                    event_id: e.id.clone(),
                    at: String::new(),
                    message: format!("refused {}", e.id),
                }),
                Some("limit") => Some(RuntimeError::DeadlineExceeded {
                    plugin: "scripted".into(),
                    deadline_ms: 1,
                    at: Some(i),
                    event: String::new(),
                }),
                Some("unnamed") => Some(RuntimeError::Trap {
                    plugin: "scripted".into(),
                    message: "somewhere".into(),
                    at: None,
                    event: String::new(),
                }),
                // A limit reached only by a batch of more than 3 events: no single culprit.
                Some("together") if events.len() > 3 => Some(RuntimeError::MemoryLimit {
                    plugin: "scripted".into(),
                    limit_mb: 1,
                    at: Some(i),
                    event: String::new(),
                }),
                Some("flaky")
                    if self
                        .flaky
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok() =>
                {
                    Some(RuntimeError::State {
                        plugin: "scripted".into(),
                        source: "database hiccup".into(),
                    })
                }
                Some("host") => Some(RuntimeError::State {
                    plugin: "scripted".into(),
                    source: "database gone".into(),
                }),
                _ => None,
            };
            if let Some(error) = error {
                return Err(Failed {
                    error: Box::new(error),
                    events,
                });
            }
            if payload["ignore"] == json!(true) {
                continue;
            }
            let doc = match mine.get(&e.stream) {
                Some(doc) => doc.clone(),
                None => match docs.get("streams", &e.stream).unwrap() {
                    Some(bytes) => serde_json::from_slice(&bytes).unwrap(),
                    None => json!({"count": 0, "versions": []}),
                },
            };
            let mut doc = doc;
            doc["count"] = json!(doc["count"].as_u64().unwrap() + 1);
            doc["versions"]
                .as_array_mut()
                .unwrap()
                .push(json!(e.version));
            mine.insert(e.stream.clone(), doc);
        }
        let writes = output.writes.entry("streams".into()).or_default();
        for (key, doc) in mine {
            writes.insert(key, Some(serde_json::to_vec(&doc).unwrap()));
        }
        Ok(output)
    }
}

// ---------------------------------------------------------------------------------------------

fn event(position: u64, stream: &str, version: u64, payload: Value) -> Event {
    Event {
        id: format!("00000000-0000-0000-0000-{position:012}"),
        stream: stream.into(),
        stream_type: "T".into(),
        event_type: "E".into(),
        version,
        position,
        timestamp_ms: 0,
        payload: serde_json::value::RawValue::from_string(payload.to_string()).unwrap(),
        headers: Vec::new(),
    }
}

/// `streams` streams round-robin, `per_stream` events each; `bad` maps positions to how they
/// fail.
fn events(streams: u64, per_stream: u64, bad: &[(u64, &str)]) -> Vec<Event> {
    let mut out = Vec::new();
    for v in 1..=per_stream {
        for s in 0..streams {
            let position = out.len() as u64 + 1;
            let payload = match bad.iter().find(|(p, _)| *p == position) {
                Some((_, how)) => json!({"fail": how}),
                None => json!({}),
            };
            out.push(event(position, &format!("s{s}"), v, payload));
        }
    }
    out
}

struct Running {
    source: Arc<MemSource>,
    store: Arc<MemStore>,
    plugin: Arc<Scripted>,
    projection: Arc<Projection>,
    commands: mpsc::Sender<Request>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<RunEnd>,
}

fn start(
    events: Vec<Event>,
    on_error: OnError,
    store: Arc<MemStore>,
    plugin: Arc<Scripted>,
) -> Running {
    let source = MemSource::new(events);
    let checkpoint = store.state.lock().unwrap().checkpoint;
    let source_of_run = source.clone();
    let projection = Arc::new(Projection::new(plugin.clone(), checkpoint));
    projection.resume_at(checkpoint);
    let runner = Runner::new(
        projection.clone(),
        store.clone(),
        source,
        RunnerConfig {
            max_batch_events: 100,
            on_error,
            ..RunnerConfig::default()
        },
    );
    let (tx, rx) = mpsc::channel(4);
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(runner.run_commanded(stopped, Arc::new(tokio::sync::Mutex::new(rx))));
    Running {
        source: source_of_run,
        store,
        plugin,
        projection,
        commands: tx,
        stop,
        task,
    }
}

impl Running {
    async fn reach(&self, position: u64) {
        let mut progress = self.projection.progress();
        tokio::time::timeout(
            Duration::from_secs(10),
            progress.wait_for(|p| p.position >= position || p.failed),
        )
        .await
        .expect("progress within 10 s")
        .unwrap();
    }

    async fn send(&self, command: Command) -> Reply {
        let (request, answer) = Request::new(command);
        self.commands.send(request).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .expect("answer within 10 s")
            .unwrap()
    }

    fn doc(&self, stream: &str) -> Option<Value> {
        let s = self.store.state.lock().unwrap();
        s.docs
            .get("streams")
            .and_then(|d| d.get(stream))
            .map(|b| serde_json::from_slice(b).unwrap())
    }

    fn letters(&self) -> Vec<DeadLetter> {
        self.store
            .state
            .lock()
            .unwrap()
            .letters
            .values()
            .cloned()
            .collect()
    }

    async fn stop(self) -> RunEnd {
        let _ = self.stop.send(true);
        self.task.await.unwrap()
    }
}

fn versions(doc: &Value) -> Vec<u64> {
    doc["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

/// Checks every stream but `parked` has all its versions once, in order.
fn assert_complete(run: &Running, streams: u64, per_stream: u64, parked: &[&str]) {
    for s in 0..streams {
        let stream = format!("s{s}");
        if parked.contains(&stream.as_str()) {
            continue;
        }
        let doc = run
            .doc(&stream)
            .unwrap_or_else(|| panic!("{stream} has no document"));
        assert_eq!(
            versions(&doc),
            (1..=per_stream).collect::<Vec<_>>(),
            "{stream}"
        );
    }
}

#[tokio::test]
async fn at_the_head_a_batch_that_writes_documents_is_durable_and_one_that_moves_only_the_checkpoint_is_not(
) {
    let run = start(
        events(2, 2, &[]),
        OnError::Park,
        Arc::default(),
        Scripted::new(),
    );
    run.reach(4).await;
    // An event the projection writes nothing for, appended once the runner is at the head.
    run.source
        .events
        .lock()
        .unwrap()
        .push(event(5, "s0", 3, json!({"ignore": true})));
    run.source.head.send_replace(5);
    run.reach(5).await;
    let durable = run.store.state.lock().unwrap().durable.clone();
    assert_eq!(durable, [(4, true), (5, false)]);
    assert_eq!(run.stop().await, RunEnd::Stopped);
}

#[tokio::test]
async fn a_named_failure_costs_its_stream_only() {
    // 10 streams × 30 events; s3@5 (position 43) fails.
    let run = start(
        events(10, 30, &[(44, "error")]),
        OnError::Park,
        Arc::default(),
        Scripted::new(),
    );
    run.reach(300).await;
    assert_eq!(run.projection.health().status, ProjectionStatus::Running);
    assert_complete(&run, 10, 30, &["s3"]);
    assert_eq!(versions(&run.doc("s3").unwrap()), vec![1, 2, 3, 4]);
    let letters = run.letters();
    let heads: Vec<_> = letters
        .iter()
        .filter(|l| l.kind == LetterKind::Plugin)
        .collect();
    assert_eq!(heads.len(), 1);
    assert_eq!(heads[0].position, 44);
    assert!(heads[0].reason.contains("refused"), "{}", heads[0].reason);
    assert_eq!(heads[0].plugin_version.as_deref(), Some("1"));
    let parked: Vec<u64> = letters
        .iter()
        .filter(|l| l.parked_behind == Some(44))
        .map(|l| l.position)
        .collect();
    assert_eq!(parked, (54..=300).step_by(10).collect::<Vec<_>>());
    assert_eq!(
        ProjectionMetrics::get(&run.projection.metrics.parked_streams),
        1
    );
    run.stop().await;
}

#[tokio::test]
async fn a_read_skips_the_store_only_for_positions_past_every_letter_this_instance_committed() {
    // s3@5 (position 44) fails; s3's later events (54, 64, ... 294) park behind it.
    let run = start(
        events(10, 30, &[(44, "error")]),
        OnError::Park,
        Arc::default(),
        Scripted::new(),
    );
    run.reach(300).await;
    let p = &run.projection;
    // A letter, a parked event, and a clean event below the last letter: the store decides.
    for position in [44, 54, 294, 43, 1] {
        assert!(!p.surely_applied(position), "{position}");
    }
    // Past the last letter this instance committed: no letter there.
    for position in [295, 300] {
        assert!(p.surely_applied(position), "{position}");
    }
    // Another instance runs it now: its letters are unknown here.
    p.follow(300);
    assert!(!p.surely_applied(300));
    run.stop().await;
}

#[tokio::test]
async fn a_limit_hit_on_an_event_is_confirmed_alone_and_an_unnamed_failure_bisected() {
    let run = start(
        events(10, 30, &[(17, "limit"), (128, "unnamed")]),
        OnError::Park,
        Arc::default(),
        Scripted::new(),
    );
    run.reach(300).await;
    let heads: Vec<u64> = run
        .letters()
        .iter()
        .filter(|l| l.kind == LetterKind::Plugin)
        .map(|l| l.position)
        .collect();
    assert_eq!(heads, vec![17, 128]);
    assert_complete(&run, 10, 30, &["s6", "s7"]);
    assert_eq!(versions(&run.doc("s6").unwrap()), vec![1]);
    assert_eq!(
        versions(&run.doc("s7").unwrap()),
        (1..=12).collect::<Vec<_>>()
    );
    // Bisecting 100 events costs about 2 × log2(100) calls, not 100.
    let extra = ProjectionMetrics::get(&run.projection.metrics.isolation_calls);
    assert!(extra <= 20, "{extra} isolation calls");
    run.stop().await;
}

#[tokio::test]
async fn a_limit_reached_together_blames_no_event() {
    let run = start(
        events(10, 3, &[(5, "together")]),
        OnError::Park,
        Arc::default(),
        Scripted::new(),
    );
    run.reach(30).await;
    assert!(run.letters().is_empty(), "{:?}", run.letters());
    assert_complete(&run, 10, 3, &[]);
    run.stop().await;
}

/// A host fault in the middle of an isolation: the batch is handled again from the start, and
/// the culprit found the first time is not taken for parked behind itself.
#[tokio::test]
async fn a_host_fault_during_isolation_redoes_the_batch_cleanly() {
    let plugin = Scripted::new();
    plugin.flaky.store(1, Ordering::SeqCst);
    let run = start(
        events(10, 3, &[(5, "error"), (20, "flaky")]),
        OnError::Park,
        Arc::default(),
        plugin,
    );
    run.reach(30).await;
    let letters = run.letters();
    let head = letters.iter().find(|l| l.position == 5).unwrap();
    assert_eq!(head.kind, LetterKind::Plugin, "{head:?}");
    assert_eq!(head.parked_behind, None);
    assert_eq!(letters.len(), 3, "{letters:?}");
    assert!(ProjectionMetrics::get(&run.projection.metrics.retries) >= 1);
    assert_complete(&run, 10, 3, &["s4"]);
    run.stop().await;
}

/// A plugin that fails on every event (a bad deploy) stops the projection rather than park
/// every stream.
#[tokio::test]
async fn a_plugin_failing_on_everything_stops_instead_of_parking_every_stream() {
    let bad: Vec<(u64, &str)> = (1..=200).map(|p| (p, "error")).collect();
    let run = start(
        events(100, 2, &bad),
        OnError::Park,
        Arc::default(),
        Scripted::new(),
    );
    run.reach(200).await;
    let health = run.projection.health();
    assert_eq!(health.status, ProjectionStatus::Failed);
    assert!(health.error.unwrap().contains("Fix the plugin"));
    assert_eq!(
        run.projection.checkpoint(),
        0,
        "nothing of the batch committed"
    );
    assert_eq!(run.task.await.unwrap(), RunEnd::Failed);
}

#[tokio::test]
async fn on_error_stop_fails_the_projection_as_before() {
    let run = start(
        events(10, 30, &[(44, "error")]),
        OnError::Stop,
        Arc::default(),
        Scripted::new(),
    );
    run.reach(300).await;
    let health = run.projection.health();
    assert_eq!(health.status, ProjectionStatus::Failed);
    assert!(health.error.unwrap().contains("refused"));
    assert!(run.letters().is_empty());
    assert!(run.projection.checkpoint() < 44);
    assert_eq!(run.task.await.unwrap(), RunEnd::Failed);
}

#[tokio::test]
async fn a_host_fault_is_retried_never_dead_lettered() {
    let store = Arc::new(MemStore::default());
    store.fail_commits.store(3, Ordering::SeqCst);
    let run = start(events(5, 10, &[]), OnError::Park, store, Scripted::new());
    run.reach(50).await;
    assert!(run.letters().is_empty());
    assert!(ProjectionMetrics::get(&run.projection.metrics.retries) >= 3);
    assert_complete(&run, 5, 10, &[]);
    run.stop().await;
}

#[tokio::test]
async fn retry_with_a_fixed_plugin_applies_the_parked_events_in_order() {
    let run = start(
        events(10, 30, &[(44, "error")]),
        OnError::Park,
        Arc::default(),
        Scripted::new(),
    );
    run.reach(300).await;
    // Still broken: it fails again, with the stream still parked.
    let again = run.send(Command::Retry { position: 44 }).await.unwrap();
    assert_eq!(again.dead_letter, Some(44));
    assert_eq!(versions(&run.doc("s3").unwrap()), vec![1, 2, 3, 4]);
    // A parked event is not retried on its own.
    assert!(matches!(
        run.send(Command::Retry { position: 54 }).await,
        Err(CommandError::Parked { behind: 44, .. })
    ));
    run.plugin.fixed.store(true, Ordering::SeqCst);
    let done = run.send(Command::Retry { position: 44 }).await.unwrap();
    assert_eq!(done.applied, Some(26));
    assert_eq!(done.dead_letter, None);
    assert_complete(&run, 10, 30, &[]);
    let letters = run.letters();
    assert_eq!(letters.len(), 1, "parked rows released");
    assert_eq!(letters[0].state, LetterState::Retried);
    let actions = run.store.state.lock().unwrap().actions.clone();
    assert_eq!(actions.len(), 2);
    assert!(actions[1].outcome.contains("unparked"), "{:?}", actions[1]);
    assert_eq!(
        ProjectionMetrics::get(&run.projection.metrics.parked_streams),
        0
    );
    assert!(matches!(
        run.send(Command::Retry { position: 44 }).await,
        Err(CommandError::NotOpen { .. })
    ));
    run.stop().await;
}

#[tokio::test]
async fn skip_applies_the_parked_events_without_the_dead_letter() {
    let run = start(
        events(10, 30, &[(44, "error")]),
        OnError::Park,
        Arc::default(),
        Scripted::new(),
    );
    run.reach(300).await;
    let done = run.send(Command::Skip { position: 44 }).await.unwrap();
    assert_eq!(done.applied, Some(25));
    let mut expected: Vec<u64> = (1..=30).collect();
    expected.retain(|&v| v != 5);
    assert_eq!(versions(&run.doc("s3").unwrap()), expected);
    assert_eq!(run.letters()[0].state, LetterState::Skipped);
    run.stop().await;
}

/// A store as an earlier version left it: a malformed row's letter and the events parked
/// behind it, none with its event kept. Retry and skip read them again from the source.
fn upgraded_store() -> Arc<MemStore> {
    let store = Arc::new(MemStore::default());
    {
        let mut s = store.state.lock().unwrap();
        s.checkpoint = 9;
        s.docs.entry("streams".into()).or_default().insert(
            "s0".into(),
            serde_json::to_vec(&json!({"count": 2, "versions": [1, 2]})).unwrap(),
        );
        for position in 3..=9 {
            let (kind, parked_behind) = if position == 3 {
                (LetterKind::Malformed, None)
            } else {
                (LetterKind::Parked, Some(3))
            };
            s.letters.insert(
                position,
                DeadLetter {
                    position,
                    event_id: None,
                    stream: Some("s0".into()),
                    reason: "old".into(),
                    parked_behind,
                    kind,
                    state: LetterState::Open,
                    resolved_at: None,
                    plugin_version: None,
                    event: None,
                    actions: Vec::new(),
                },
            );
        }
    }
    store
}

#[tokio::test]
async fn letters_without_their_event_are_read_again_not_dropped() {
    let run = start(
        events(1, 9, &[]),
        OnError::Park,
        upgraded_store(),
        Scripted::new(),
    );
    let done = run.send(Command::Skip { position: 3 }).await.unwrap();
    assert_eq!(done.applied, Some(6), "{done:?}");
    assert_eq!(
        versions(&run.doc("s0").unwrap()),
        vec![1, 2, 4, 5, 6, 7, 8, 9]
    );
    run.stop().await;

    let run = start(
        events(1, 9, &[]),
        OnError::Park,
        upgraded_store(),
        Scripted::new(),
    );
    let done = run.send(Command::Retry { position: 3 }).await.unwrap();
    assert_eq!(done.applied, Some(7), "{done:?}");
    assert_eq!(
        versions(&run.doc("s0").unwrap()),
        (1..=9).collect::<Vec<_>>()
    );
    assert_eq!(run.letters().len(), 1);
    run.stop().await;
}

#[tokio::test]
async fn a_paused_runner_reads_nothing_until_resumed() {
    let store = Arc::new(MemStore::default());
    store.state.lock().unwrap().paused = true;
    let run = start(events(5, 10, &[]), OnError::Park, store, Scripted::new());
    // Answered by the runner's loop: it is up, and paused since it started.
    let paused = run.send(Command::Pause).await.unwrap();
    assert_eq!(paused.status, "paused");
    assert_eq!(run.plugin.calls.load(Ordering::SeqCst), 0);
    assert_eq!(run.projection.checkpoint(), 0);
    let outcome = run.send(Command::Resume).await.unwrap();
    assert_eq!(outcome.status, "running");
    assert!(!run.store.state.lock().unwrap().paused);
    run.reach(50).await;
    assert_complete(&run, 5, 10, &[]);
    run.stop().await;
}

/// A version being rebuilt logs actions that the serving version's dispatcher delivers: its
/// action batches count in the serving version's progress, which that dispatcher watches, and
/// once it serves, only in its own.
#[test]
fn a_rebuilds_logged_actions_wake_the_serving_versions_dispatcher() {
    let serving = Arc::new(Projection::new(Scripted::new(), 0));
    let building = Arc::new(Projection::new(Scripted::new(), 0));
    building.set_building(true);
    building.deliver_through(&serving);
    let watched = serving.progress();
    let before = watched.borrow().action_batches;
    building.wake_serving_dispatcher();
    assert_eq!(watched.borrow().action_batches, before + 1);
    building.set_building(false);
    building.wake_serving_dispatcher();
    assert_eq!(
        watched.borrow().action_batches,
        before + 1,
        "it serves itself now"
    );
}
