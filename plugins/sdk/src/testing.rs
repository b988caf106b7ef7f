//! Run a projection or an observer natively, in a plugin crate's `cargo test`: a projection
//! against an in-memory state ([`Harness`]), an observer collecting its actions
//! ([`ObserverHarness`]). The crate's top-level examples show whole tests.
//!
//! Events come from the harness ([`Harness::event`], [`Harness::emit`], stamped with
//! [`Harness::at`]'s time) or from the JSONL files `projector replay` reads
//! ([`Harness::apply_jsonl`], [`read_jsonl`], [`events_from_jsonl`]). A projection's documents
//! are read one by one ([`Harness::doc`]) or filtered as the HTTP API filters them
//! ([`Harness::query`]).

mod jsonl;
mod query;

use std::collections::{BTreeMap, HashMap};
use std::marker::PhantomData;
use std::path::Path;

use serde::de::DeserializeOwned;

use crate::{Action, ActionKind, Backend, BatchError, Event, Observer, Projection};

pub use jsonl::{events_from_jsonl, read_jsonl, JsonlError};
pub use query::QueryError;

/// Documents in memory: collection → key → JSON bytes.
#[derive(Debug, Default, Clone)]
pub struct MemoryBackend {
    pub docs: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
}

impl Backend for MemoryBackend {
    fn get(&mut self, collection: &str, key: &str) -> Option<Vec<u8>> {
        self.docs.get(collection)?.get(key).cloned()
    }
    fn put(&mut self, collection: &str, key: &str, document: &[u8]) {
        self.docs
            .entry(collection.to_owned())
            .or_default()
            .insert(key.to_owned(), document.to_vec());
    }
    fn delete(&mut self, collection: &str, key: &str) {
        if let Some(docs) = self.docs.get_mut(collection) {
            docs.remove(key);
        }
    }
}

/// Builds events the way the host numbers them: versions per stream, positions across streams.
#[derive(Debug, Default)]
struct Events {
    versions: HashMap<String, u64>,
    position: u64,
    /// The time [`Harness::at`] set; until then each event is a millisecond after the last.
    clock: Option<u64>,
}

impl Events {
    fn next(&mut self, stream: &str, event_type: &str, payload: serde_json::Value) -> Event {
        let version = self.versions.entry(stream.to_owned()).or_insert(0);
        *version += 1;
        self.position += 1;
        Event {
            id: format!("{stream}-{version}"),
            stream: stream.to_owned(),
            stream_type: String::new(),
            event_type: event_type.to_owned(),
            version: *version,
            position: self.position,
            timestamp_ms: self.clock.unwrap_or(1_700_000_000_000 + self.position),
            payload: payload.to_string().into_bytes(),
            headers: Vec::new(),
        }
    }

    /// Moves the numbering past events built elsewhere (a JSONL file, by hand), so the next
    /// event of a stream follows its last one, as on the host.
    fn follow<'e>(&mut self, events: impl IntoIterator<Item = &'e Event>) {
        for event in events {
            let version = self.versions.entry(event.stream.clone()).or_insert(0);
            *version = (*version).max(event.version);
            self.position = self.position.max(event.position);
        }
    }
}

/// A batch's failure as a JSONL file's: the failed event named by its line, as `projector
/// replay` names it. `lines` are the numbers of the batch's events' lines.
fn jsonl_failure(err: BatchError, lines: &[usize], events: &[Event], path: &Path) -> JsonlError {
    let path = Some(path.to_owned());
    match err
        .event_index()
        .and_then(|i| Some((lines.get(i)?, events.get(i)?)))
    {
        Some((line, event)) => JsonlError::Event {
            path,
            line: *line,
            event_id: event.id.clone(),
            message: err.message,
        },
        None => JsonlError::Batch {
            path,
            message: err.message,
        },
    }
}

/// The events of a file the plugin subscribes to, as a batch, with their lines.
fn subscribed_lines(
    descriptor: &crate::Descriptor,
    numbered: Vec<(usize, Event)>,
) -> (Vec<usize>, Vec<Event>) {
    numbered
        .into_iter()
        .filter(|(_, e)| descriptor.subscribes_to(&e.event_type))
        .unzip()
}

/// The events of a batch the plugin subscribes to: the host skips the others, so indexes in
/// errors and actions count only these.
fn subscribed(descriptor: &crate::Descriptor, events: &[Event]) -> Vec<Event> {
    events
        .iter()
        .filter(|e| descriptor.subscribes_to(&e.event_type))
        .cloned()
        .collect()
}

/// Feeds events to a projection the way the host does: filtered by its subscriptions, in
/// batches, with versions and positions assigned per stream.
pub struct Harness<P> {
    pub state: MemoryBackend,
    events: Events,
    config: BTreeMap<String, String>,
    _projection: PhantomData<P>,
}

impl<P: Projection> Default for Harness<P> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P: Projection> Harness<P> {
    pub fn new() -> Self {
        Self {
            state: MemoryBackend::default(),
            events: Events::default(),
            config: BTreeMap::new(),
            _projection: PhantomData,
        }
    }

    /// Sets a key of the operator's config ([`crate::config`]), as text like the host's.
    pub fn config(mut self, key: &str, value: &str) -> Self {
        self.config.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Builds the next event of `stream` (version and position assigned, not yet applied).
    pub fn event(&mut self, stream: &str, event_type: &str, payload: serde_json::Value) -> Event {
        self.events.next(stream, event_type, payload)
    }

    /// Stamps the events built from now on ([`Harness::event`], [`Harness::emit`]) with
    /// `timestamp_ms`, until set again: `h.at(t).emit(...)`. Without it each event is a
    /// millisecond after the one before.
    pub fn at(&mut self, timestamp_ms: u64) -> &mut Self {
        self.events.clock = Some(timestamp_ms);
        self
    }

    /// Reads the events of a JSONL file as `projector replay` reads and numbers them (see
    /// [`events_from_jsonl`]), not yet applied. Events the harness builds afterwards follow
    /// them (the next version of a stream, the next position).
    pub fn load_jsonl(&mut self, path: impl AsRef<Path>) -> Result<Vec<Event>, JsonlError> {
        let events = read_jsonl(path)?;
        self.events.follow(&events);
        Ok(events)
    }

    /// Applies the events of a JSONL file, those the projection subscribes to, as one batch,
    /// as `projector replay` would. A failure names the line of the event that failed.
    pub fn apply_jsonl(&mut self, path: impl AsRef<Path>) -> Result<(), JsonlError> {
        let path = path.as_ref();
        let numbered = jsonl::read_numbered(path)?;
        // All of them: the file's last event of a stream may be one the plugin skips.
        self.events.follow(numbered.iter().map(|(_, e)| e));
        let (lines, events) = subscribed_lines(&P::describe(), numbered);
        self.apply(&events)
            .map_err(|err| jsonl_failure(err, &lines, &events, path))
    }

    /// Applies events as one batch. The index in an error counts only the events the
    /// projection subscribes to, as the host's does. Events built elsewhere (by hand, from a
    /// file) move the harness's numbering past them.
    pub fn apply(&mut self, events: &[Event]) -> Result<(), BatchError> {
        self.events.follow(events);
        let mut scratch = self.state.clone();
        crate::config::native::with(&self.config, || {
            let wanted = subscribed(&P::describe(), events);
            crate::run_batch::<P>(&wanted, &mut scratch)
        })?;
        // Like the host: a failed batch leaves the state untouched.
        self.state = scratch;
        Ok(())
    }

    /// Builds and applies one event.
    pub fn emit(
        &mut self,
        stream: &str,
        event_type: &str,
        payload: serde_json::Value,
    ) -> Result<(), BatchError> {
        let event = self.event(stream, event_type, payload);
        self.apply(&[event])
    }

    /// The document under `key`, decoded as `T`.
    pub fn doc<T: DeserializeOwned>(&self, collection: &str, key: &str) -> Option<T> {
        let bytes = self.state.docs.get(collection)?.get(key)?;
        serde_json::from_slice(bytes).ok()
    }

    /// The documents of `collection` whose fields equal the filters' values, by key, in key
    /// order: what `GET /projections/{name}/{collection}?{field}={value}&...` returns (without
    /// paging). As there, a filter may name only a field the collection indexes (a dotted path
    /// walks nested objects) and the value is text: "42" matches the number 42 or the string
    /// "42", "true" the boolean or the string. A collection the projection does not declare or
    /// a field it does not index is an error listing the ones it does.
    pub fn query<T: DeserializeOwned>(
        &self,
        collection: &str,
        filters: &[(&str, &str)],
    ) -> Result<Vec<(String, T)>, QueryError> {
        query::query(
            &P::describe(),
            self.state.docs.get(collection),
            collection,
            filters,
        )
    }
}

/// Feeds events to an observer the way the host does (filtered by its subscriptions, in
/// batches, versions and positions assigned per stream) and returns the actions it asks for.
pub struct ObserverHarness<O> {
    events: Events,
    config: BTreeMap<String, String>,
    _observer: PhantomData<O>,
}

impl<O: Observer> Default for ObserverHarness<O> {
    fn default() -> Self {
        Self::new()
    }
}

impl<O: Observer> ObserverHarness<O> {
    pub fn new() -> Self {
        Self {
            events: Events::default(),
            config: BTreeMap::new(),
            _observer: PhantomData,
        }
    }

    /// Sets a key of the operator's config ([`crate::config`]), as text like the host's.
    pub fn config(mut self, key: &str, value: &str) -> Self {
        self.config.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Builds the next event of `stream` (version and position assigned, not yet observed).
    pub fn event(&mut self, stream: &str, event_type: &str, payload: serde_json::Value) -> Event {
        self.events.next(stream, event_type, payload)
    }

    /// Stamps the events built from now on ([`ObserverHarness::event`],
    /// [`ObserverHarness::observe`]) with `timestamp_ms`, until set again:
    /// `h.at(t).observe(...)`. Without it each event is a millisecond after the one before.
    pub fn at(&mut self, timestamp_ms: u64) -> &mut Self {
        self.events.clock = Some(timestamp_ms);
        self
    }

    /// Reads the events of a JSONL file as `projector replay` reads and numbers them (see
    /// [`events_from_jsonl`]), not yet observed. Events the harness builds afterwards follow
    /// them (the next version of a stream, the next position).
    pub fn load_jsonl(&mut self, path: impl AsRef<Path>) -> Result<Vec<Event>, JsonlError> {
        let events = read_jsonl(path)?;
        self.events.follow(&events);
        Ok(events)
    }

    /// Runs the observer over the events of a JSONL file, those it subscribes to, as one
    /// batch. A failure names the line of the event that failed.
    pub fn run_jsonl(&mut self, path: impl AsRef<Path>) -> Result<Vec<Action>, JsonlError> {
        let path = path.as_ref();
        let numbered = jsonl::read_numbered(path)?;
        // All of them: the file's last event of a stream may be one the plugin skips.
        self.events.follow(numbered.iter().map(|(_, e)| e));
        let (lines, events) = subscribed_lines(&O::describe(), numbered);
        self.run(&events)
            .map_err(|err| jsonl_failure(err, &lines, &events, path))
    }

    /// Runs the observer over events as one batch. Indexes (in the actions and in an error)
    /// count only the events the observer subscribes to, as the host's do. Events built
    /// elsewhere (by hand, from a file) move the harness's numbering past them.
    pub fn run(&mut self, events: &[Event]) -> Result<Vec<Action>, BatchError> {
        self.events.follow(events);
        crate::config::native::with(&self.config, || {
            let wanted = subscribed(&O::describe(), events);
            crate::run_observer_batch::<O>(&wanted)
        })
    }

    /// Builds one event and returns what the observer does about it.
    pub fn observe(
        &mut self,
        stream: &str,
        event_type: &str,
        payload: serde_json::Value,
    ) -> Result<Vec<ActionKind>, BatchError> {
        let event = self.event(stream, event_type, payload);
        let actions = self.run(&[event])?;
        Ok(actions.into_iter().map(|action| action.kind).collect())
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use serde_json::json;

    use super::*;
    use crate::prelude::*;

    /// Accounts indexed by owner, status, city (a nested field) and tier (a number); not by
    /// balance. Fails on a `Deposited` of a negative amount.
    struct Accounts;

    #[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
    struct Account {
        owner: String,
        status: String,
        address: Address,
        tier: u32,
        balance: i64,
        opened_ms: u64,
    }

    #[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
    struct Address {
        city: String,
    }

    impl Projection for Accounts {
        fn describe() -> Descriptor {
            Descriptor::new("accounts", "1.0.0")
                .events(&["Opened", "Deposited"])
                .collection("accounts", &["owner", "status", "address.city", "tier"])
                .collection("audit", &[])
        }
        fn handle(event: &Event, state: &mut State) -> Result<()> {
            #[derive(Deserialize)]
            struct Opened {
                owner: String,
                city: String,
                tier: u32,
            }
            #[derive(Deserialize)]
            struct Deposited {
                amount: i64,
            }
            match event.event_type.as_str() {
                "Opened" => {
                    let Opened { owner, city, tier } = event.payload()?;
                    let account = Account {
                        owner,
                        status: "open".into(),
                        address: Address { city },
                        tier,
                        balance: 0,
                        opened_ms: event.timestamp_ms,
                    };
                    state.put("accounts", &event.stream, account);
                }
                _ => {
                    let Deposited { amount } = event.payload()?;
                    if amount < 0 {
                        return Err(Error::msg("a deposit is never negative"));
                    }
                    state.upsert("accounts", &event.stream, |a: &mut Account| {
                        a.balance += amount
                    })?;
                }
            }
            Ok(())
        }
    }

    fn opened(owner: &str, city: &str, tier: u32) -> serde_json::Value {
        json!({"owner": owner, "city": city, "tier": tier})
    }

    fn three_accounts() -> Harness<Accounts> {
        let mut h = Harness::<Accounts>::new();
        h.emit("acct-2", "Opened", opened("alice", "Graz", 1))
            .unwrap();
        h.emit("acct-1", "Opened", opened("alice", "Wien", 42))
            .unwrap();
        h.emit("acct-3", "Opened", opened("bob", "Graz", 1))
            .unwrap();
        h
    }

    fn keys<T>(found: &[(String, T)]) -> Vec<&str> {
        found.iter().map(|(key, _)| key.as_str()).collect()
    }

    /// A file of its own in the temp folder, removed when dropped.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, text: &str) -> Self {
            let path = std::env::temp_dir()
                .join(format!("projector-sdk-{}-{name}.jsonl", std::process::id()));
            std::fs::write(&path, text).unwrap();
            Self(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn a_query_on_a_mistyped_index_fails_and_on_the_declared_one_passes() {
        let h = three_accounts();
        let err = h
            .query::<Account>("accounts", &[("ownr", "alice")])
            .unwrap_err();
        assert_eq!(
            err,
            QueryError::UnknownField {
                collection: "accounts".into(),
                field: "ownr".into(),
                indexes: vec![
                    "owner".into(),
                    "status".into(),
                    "address.city".into(),
                    "tier".into()
                ],
            }
        );
        let shown = err.to_string();
        assert!(shown.contains("`ownr`"), "{shown}");
        assert!(
            shown.contains("(it indexes: `owner`, `status`, `address.city`, `tier`)"),
            "{shown}"
        );

        let found = h
            .query::<Account>("accounts", &[("owner", "alice")])
            .unwrap();
        assert_eq!(keys(&found), ["acct-1", "acct-2"], "in key order");
        assert_eq!(found[0].1.address.city, "Wien");
    }

    #[test]
    fn a_query_on_a_field_every_document_has_but_no_index_fails() {
        let h = three_accounts();
        let err = h
            .query::<Account>("accounts", &[("owner", "alice"), ("balance", "0")])
            .unwrap_err();
        assert!(
            matches!(&err, QueryError::UnknownField { field, .. } if field == "balance"),
            "{err:?}"
        );
        let err = h
            .query::<serde_json::Value>("audit", &[("owner", "alice")])
            .unwrap_err();
        assert!(err.to_string().ends_with("(it indexes: none)"), "{err}");
    }

    #[test]
    fn a_query_on_an_undeclared_collection_fails_naming_the_declared_ones() {
        let h = three_accounts();
        let err = h.query::<Account>("acounts", &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"projection "accounts" has no collection "acounts" (it declares: `accounts`, `audit`)"#
        );
        // Declared but never written: empty, as on the host.
        let none = h.query::<serde_json::Value>("audit", &[]).unwrap();
        assert!(none.is_empty());
    }

    #[test]
    fn a_query_filters_on_every_field_nested_paths_and_numbers_by_their_text() {
        let h = three_accounts();
        let all = h.query::<Account>("accounts", &[]).unwrap();
        assert_eq!(keys(&all), ["acct-1", "acct-2", "acct-3"]);
        let graz = h
            .query::<Account>("accounts", &[("address.city", "Graz")])
            .unwrap();
        assert_eq!(keys(&graz), ["acct-2", "acct-3"]);
        let both = h
            .query::<Account>("accounts", &[("address.city", "Graz"), ("owner", "bob")])
            .unwrap();
        assert_eq!(keys(&both), ["acct-3"]);
        let tier = h
            .query::<serde_json::Value>("accounts", &[("tier", "42")])
            .unwrap();
        assert_eq!(keys(&tier), ["acct-1"], "\"42\" matches the number 42");
        let nobody = h
            .query::<Account>("accounts", &[("owner", "carol")])
            .unwrap();
        assert!(nobody.is_empty());
    }

    #[test]
    fn a_query_names_the_document_and_field_that_do_not_decode() {
        let h = three_accounts();
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)] // Only decoded, to see where decoding fails.
        struct Wrong {
            address: WrongAddress,
        }
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct WrongAddress {
            city: u32,
        }
        let err = h
            .query::<Wrong>("accounts", &[("owner", "bob")])
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("document accounts/acct-3 does not decode: address.city: invalid type: string \"Graz\""),
            "{err}"
        );
    }

    #[test]
    fn at_stamps_the_events_built_after_it() {
        let mut h = Harness::<Accounts>::new();
        let before = h.event("a", "Opened", json!({}));
        assert_eq!(before.timestamp_ms, 1_700_000_000_001);
        h.at(1_800_000_000_000)
            .emit("acct-1", "Opened", opened("alice", "Graz", 1))
            .unwrap();
        let again = h.event("b", "Opened", json!({}));
        assert_eq!(again.timestamp_ms, 1_800_000_000_000, "until set again");
        h.at(5)
            .emit("acct-2", "Opened", opened("bob", "Graz", 1))
            .unwrap();
        let opened_at = |key| h.doc::<Account>("accounts", key).unwrap().opened_ms;
        assert_eq!(
            (opened_at("acct-1"), opened_at("acct-2")),
            (1_800_000_000_000, 5)
        );
    }

    const FILE: &str = r#"{"stream":"acct-1","type":"Opened","payload":{"owner":"alice","city":"Graz","tier":1}}
{"stream":"acct-1","type":"Renamed","payload":{}}

{"stream":"acct-2","type":"Opened","payload":{"owner":"bob","city":"Wien","tier":2},"timestamp_ms":1700000000000}
{"stream":"acct-1","type":"Deposited","payload":{"amount":100}}
"#;

    #[test]
    fn apply_jsonl_replays_a_file_and_later_events_follow_it() {
        let file = TempFile::new("apply", FILE);
        let mut h = Harness::<Accounts>::new();
        h.apply_jsonl(&file.0).unwrap();
        let alice = h.doc::<Account>("accounts", "acct-1").unwrap();
        assert_eq!(
            (alice.balance, alice.opened_ms),
            (100, 0),
            "no timestamp: 0"
        );
        let bob = h.doc::<Account>("accounts", "acct-2").unwrap();
        assert_eq!(bob.opened_ms, 1_700_000_000_000);
        assert_eq!(
            keys(&h.query::<Account>("accounts", &[("owner", "bob")]).unwrap()),
            ["acct-2"]
        );
        // The file's `acct-1` ends at version 3 (the unsubscribed `Renamed` counts), position 4.
        let next = h.event("acct-1", "Deposited", json!({"amount": 1}));
        assert_eq!(
            (next.id.as_str(), next.version, next.position),
            ("acct-1-4", 4, 5)
        );
    }

    #[test]
    fn apply_jsonl_names_the_line_of_the_event_that_failed_and_changes_nothing() {
        let text = FILE.replace(r#"{"amount":100}"#, r#"{"amount":-1}"#);
        let file = TempFile::new("fail", &text);
        let mut h = Harness::<Accounts>::new();
        let err = h.apply_jsonl(&file.0).unwrap_err();
        assert_eq!(err.line(), Some(5));
        let JsonlError::Event {
            event_id, message, ..
        } = &err
        else {
            panic!("{err:?}");
        };
        assert_eq!(event_id, "acct-1-3");
        assert!(message.ends_with("a deposit is never negative"), "{err}");
        assert!(
            err.to_string().starts_with(&format!(
                "{}:5: event acct-1-3: Deposited (version 3 of stream acct-1)",
                file.0.display()
            )),
            "{err}"
        );
        assert!(h.state.docs.is_empty(), "a failed batch changes nothing");

        let payload = FILE.replace(r#""tier":2"#, r#""tier":"two""#);
        let file = TempFile::new("payload", &payload);
        let err = h.apply_jsonl(&file.0).unwrap_err();
        assert_eq!(err.line(), Some(4));
        assert!(
            err.to_string()
                .contains("invalid Opened payload: tier: invalid type: string \"two\""),
            "{err}"
        );
    }

    #[test]
    fn load_jsonl_numbers_as_replay_and_the_harness_follows() {
        let file = TempFile::new("load", FILE);
        let mut h = Harness::<Accounts>::new();
        let events = h.load_jsonl(&file.0).unwrap();
        let numbers: Vec<(&str, u64, u64)> = events
            .iter()
            .map(|e| (e.id.as_str(), e.version, e.position))
            .collect();
        assert_eq!(
            numbers,
            [
                ("acct-1-1", 1, 1),
                ("acct-1-2", 2, 2),
                ("acct-2-1", 1, 3),
                ("acct-1-3", 3, 4)
            ]
        );
        assert_eq!(h.event("acct-2", "Deposited", json!({})).version, 2);
        h.apply(&events).unwrap();
        assert_eq!(h.doc::<Account>("accounts", "acct-1").unwrap().balance, 100);
    }

    /// Logs each event's id and timestamp.
    struct Stamps;

    impl Observer for Stamps {
        fn describe() -> Descriptor {
            Descriptor::new("stamps", "1.0.0").events(&["Opened", "Deposited"])
        }
        fn on_event(event: &Event, actions: &mut Actions) -> Result<()> {
            if event.event_type == "Deposited"
                && event.payload::<serde_json::Value>()?["amount"] == -1
            {
                return Err(Error::msg("refused"));
            }
            actions.log(format!("{} at {}", event.id, event.timestamp_ms));
            Ok(())
        }
    }

    fn logs(actions: &[Action]) -> Vec<(u32, String)> {
        actions
            .iter()
            .map(|a| match &a.kind {
                ActionKind::Log(line) => (a.event_index, line.clone()),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn an_observer_runs_over_a_jsonl_file_and_at_sets_its_clock() {
        let file = TempFile::new("observe", FILE);
        let mut h = ObserverHarness::<Stamps>::new();
        let actions = h.run_jsonl(&file.0).unwrap();
        assert_eq!(
            logs(&actions),
            [
                (0, "acct-1-1 at 0".to_owned()),
                (1, "acct-2-1 at 1700000000000".to_owned()),
                (2, "acct-1-3 at 0".to_owned()),
            ],
            "indexes count the subscribed events only"
        );
        let kinds = h.at(7).observe("acct-1", "Opened", json!({})).unwrap();
        assert_eq!(kinds, [ActionKind::Log("acct-1-4 at 7".into())]);

        let loaded = ObserverHarness::<Stamps>::new()
            .load_jsonl(&file.0)
            .unwrap();
        assert_eq!(loaded.len(), 4);

        let failing = TempFile::new("observe-fail", &FILE.replace("100", "-1"));
        let err = h.run_jsonl(&failing.0).unwrap_err();
        assert_eq!(err.line(), Some(5));
    }
}
