//! A second language: `account-balance-py` (plugins/account-balance-py, Python built with
//! componentize-py by scripts/python-plugins.sh) does the job of the Rust `account-balance`.
//! Both run the same generated events in the same batches on the host's runtime, and must
//! describe themselves alike (but for the name), build equal `accounts` collections, and fail
//! a batch at the same event with the same message.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use projector::event::Event;
use projector::runtime::{Limits, MemoryDocuments, Plugin, Runtime, RuntimeConfig, RuntimeError};
use serde_json::{json, Value};

use crate::support::{plugin_path, plugins_dir, repo_root, Events};

/// Built by scripts/python-plugins.sh (which scripts/build-plugins.sh runs), in a folder of its
/// own so that `projector serve` on target/plugins does not load it.
fn python_plugin_path() -> PathBuf {
    plugins_dir()
        .join("variants")
        .join("account-balance-py")
        .join("account-balance-py.wasm")
}

/// The Rust and the Python plugin. Compiled code is cached under target/: the Python
/// component (CPython and its snapshot, ~18 MB) costs Cranelift seconds per compile, and every
/// test here loads it.
fn load_both() -> (Plugin, Plugin) {
    let runtime = Runtime::new(RuntimeConfig {
        limits: Limits::default(),
        cache_dir: Some(repo_root().join("target/test-cache/second-language")),
        ..Default::default()
    })
    .expect("engine starts");
    let load = |path: PathBuf| {
        runtime
            .load_file(&path)
            .unwrap_or_else(|err| panic!("{}: {err}", path.display()))
    };
    let rust = load(plugin_path("account-balance"));
    let python = load(python_plugin_path());
    (rust, python)
}

/// xorshift64*: the same events on every run, no dependency.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

const ACCOUNTS: u64 = 50;
const EVENTS: usize = 4_000;

/// `EVENTS` events over `ACCOUNTS` accounts, of all four types the plugins subscribe to (and
/// one they do not): every account opened before anything else happens to it; deposits and
/// withdrawals (balances go below zero), amounts up to 10^12 and now and then a negative one;
/// closings, an event on a closed account, an account opened again; owners with quotes,
/// control characters and non-ASCII text; payloads with fields the plugins ignore.
fn generated_events() -> Vec<Event> {
    let mut rng = Rng(0x5eed_0fac_c057);
    let mut ev = Events::default();
    let mut opened = vec![false; ACCOUNTS as usize];
    let owners = [
        "alice",
        "bob",
        "Zoë \"Z\"",
        "line\nbreak\t\u{1}",
        "李雷",
        "o'neil\\",
    ];
    let currencies = ["EUR", "USD", "CHF", "JPY"];
    let mut events = Vec::with_capacity(EVENTS);
    while events.len() < EVENTS {
        let n = rng.below(ACCOUNTS) as usize;
        let stream = format!("acct-{n:02}");
        let roll = rng.below(100);
        let event = if !opened[n] || roll == 0 {
            opened[n] = true;
            let owner = owners[rng.below(owners.len() as u64) as usize];
            let currency = currencies[rng.below(currencies.len() as u64) as usize];
            let payload = if roll == 1 {
                json!({"owner": owner, "currency": currency, "branch": {"id": n, "tags": []}})
            } else {
                json!({"owner": owner, "currency": currency})
            };
            ev.next(&stream, "AccountOpened", payload)
        } else if roll < 50 {
            let amount = (rng.below(1_000_000_000_000) as i64) * if roll < 3 { -1 } else { 1 };
            ev.next(&stream, "Deposited", json!({"amount": amount}))
        } else if roll < 93 {
            let amount = rng.below(2_000_000_000_000) as i64;
            ev.next(
                &stream,
                "Withdrawn",
                json!({"amount": amount, "memo": "atm"}),
            )
        } else if roll < 97 {
            // Closed accounts stay in the stream: later events still count on them.
            ev.next(&stream, "AccountClosed", json!({}))
        } else {
            // Not subscribed: the host skips it, as `projector replay` and the runner do.
            ev.next(&stream, "NicknameChanged", json!({"nick": "x"}))
        };
        events.push(event);
    }
    events
}

/// Batch sizes as the host's runner makes them (up to `runner.max_batch_events`, 5,000), here
/// varied: single events, small batches and large ones, so documents are read back from the
/// committed read model across batches as well as from within one.
fn batch_sizes(total: usize) -> Vec<usize> {
    let mut rng = Rng(0x0ba7_c4e5);
    let mut sizes = vec![1, 1, 2, 1_000];
    while sizes.iter().sum::<usize>() < total {
        sizes.push(match rng.below(4) {
            0 => 1 + rng.below(3) as usize,
            1 => 1 + rng.below(50) as usize,
            2 => 100 + rng.below(400) as usize,
            _ => 1_000,
        });
    }
    sizes
}

/// Runs `events` (the ones `plugin` subscribes to) in batches of `sizes`, applying each batch's
/// output like the runner commits it; returns the read model's `accounts`, each document
/// parsed, and each batch's writes, parsed.
fn run(plugin: &Plugin, events: &[Event], sizes: &[usize]) -> (Accounts, Vec<Accounts>) {
    let events: Vec<Event> = events
        .iter()
        .filter(|e| plugin.descriptor().subscribes_to(&e.event_type))
        .cloned()
        .collect();
    let docs = Arc::new(MemoryDocuments::default());
    let mut batches = Vec::new();
    let mut rest = events.as_slice();
    for &size in sizes {
        if rest.is_empty() {
            break;
        }
        let (batch, tail) = rest.split_at(size.min(rest.len()));
        rest = tail;
        let output = plugin
            .handle(batch.to_vec(), docs.clone())
            .unwrap_or_else(|err| panic!("{}: {err}", plugin.name()));
        let collections: Vec<&String> = output.writes.keys().collect();
        assert!(
            collections.iter().all(|c| *c == "accounts"),
            "{} wrote {collections:?}",
            plugin.name()
        );
        let written: Accounts = output
            .writes
            .get("accounts")
            .map(|written| {
                written
                    .iter()
                    .map(|(key, doc)| {
                        let doc = doc
                            .as_deref()
                            .unwrap_or_else(|| panic!("{} deleted {key}", plugin.name()));
                        (key.clone(), parse(plugin, key, doc))
                    })
                    .collect()
            })
            .unwrap_or_default();
        batches.push(written);
        docs.apply(output);
    }
    assert!(rest.is_empty(), "batch sizes cover every event");
    let accounts: Accounts = docs
        .snapshot()
        .remove("accounts")
        .unwrap_or_default()
        .into_iter()
        .map(|(key, doc)| {
            let doc = parse(plugin, &key, &doc);
            (key, doc)
        })
        .collect();
    (accounts, batches)
}

type Accounts = BTreeMap<String, Value>;

fn parse(plugin: &Plugin, key: &str, doc: &[u8]) -> Value {
    serde_json::from_slice(doc).unwrap_or_else(|err| {
        panic!(
            "{}: accounts/{key} is not JSON ({err}): {}",
            plugin.name(),
            String::from_utf8_lossy(doc)
        )
    })
}

/// Key by key, so a failure names the first account that differs.
fn assert_same_accounts(rust: &Accounts, python: &Accounts, what: &str) {
    assert_eq!(
        rust.keys().collect::<Vec<_>>(),
        python.keys().collect::<Vec<_>>(),
        "{what}: the same accounts"
    );
    for (key, doc) in rust {
        assert_eq!(
            Some(doc),
            python.get(key),
            "{what}: accounts/{key} (left: Rust)"
        );
    }
}

#[test]
fn the_python_projection_builds_the_same_accounts_as_the_rust_one() {
    let (rust, python) = load_both();
    let events = generated_events();
    let sizes = batch_sizes(events.len());
    let (rust_accounts, rust_batches) = run(&rust, &events, &sizes);
    let (python_accounts, python_batches) = run(&python, &events, &sizes);

    assert_eq!(
        rust_accounts.len(),
        ACCOUNTS as usize,
        "every account was opened"
    );
    let fields = [
        "balance",
        "currency",
        "last_version",
        "owner",
        "status",
        "tx_count",
    ];
    for doc in rust_accounts.values() {
        let mut keys: Vec<&str> = doc
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(keys, fields, "{doc}");
    }
    assert!(
        rust_accounts
            .values()
            .any(|d| d["balance"].as_i64().unwrap() < 0),
        "some balance went below zero"
    );
    assert!(rust_accounts.values().any(|d| d["status"] == "closed"));
    assert!(rust_accounts.values().any(|d| d["status"] == "open"));

    assert_same_accounts(&rust_accounts, &python_accounts, "the read model");
    // Batch by batch too: the same documents written (each once), with the same contents.
    assert_eq!(rust_batches.len(), python_batches.len());
    for (i, (r, p)) in rust_batches.iter().zip(&python_batches).enumerate() {
        assert_same_accounts(r, p, &format!("batch #{i}"));
    }
}

#[test]
fn the_python_descriptor_is_the_rust_ones_but_for_the_name() {
    let (rust, python) = load_both();
    assert_eq!(python.name(), "account-balance-py");
    assert_eq!(python.info().world, "projection");
    assert_eq!(python.info().contract, "0.1.2");
    let mut renamed = python.descriptor().clone();
    renamed.name = rust.descriptor().name.clone();
    assert_eq!(&renamed, rust.descriptor());
    assert_eq!(python.descriptor().version, "1.0.0");
}

/// The event index and message of a batch the guest failed.
fn failure(plugin: &Plugin, events: Vec<Event>) -> (usize, String) {
    match plugin.handle(events, Arc::new(MemoryDocuments::default())) {
        Ok(output) => panic!("{} accepted the batch: {output:?}", plugin.name()),
        Err(RuntimeError::Guest { index, message, .. }) => (index, message),
        Err(other) => panic!(
            "{}: not a failure the guest returned: {other}",
            plugin.name()
        ),
    }
}

/// Account `a` opened: the first event of most cases below.
fn open_a() -> (&'static str, &'static str, Value) {
    let payload = json!({"owner": "ann", "currency": "EUR"});
    ("a", "AccountOpened", payload)
}

/// One event of a failure case: stream, event type, payload.
type Step = (&'static str, &'static str, Value);

#[test]
fn both_fail_a_batch_at_the_same_event_with_the_same_message() {
    let (rust, python) = load_both();
    // What goes wrong, and the batch, whose last event fails unless marked `fails`.
    let cases: Vec<(&str, Vec<Step>)> = vec![
        (
            "an account never opened",
            vec![
                open_a(),
                ("a", "Deposited", json!({"amount": 5})),
                ("ghost", "Deposited", json!({"amount": 10, "fails": true})),
                ("a", "Deposited", json!({"amount": 1})),
            ],
        ),
        (
            "closing an account never opened",
            vec![("ghost", "AccountClosed", json!({}))],
        ),
        (
            "a balance past i64",
            vec![
                open_a(),
                ("a", "Deposited", json!({"amount": i64::MAX})),
                ("a", "Deposited", json!({"amount": 1})),
            ],
        ),
        (
            "a withdrawal of i64::MIN",
            vec![open_a(), ("a", "Withdrawn", json!({"amount": i64::MIN}))],
        ),
        (
            "an amount that is text",
            vec![open_a(), ("a", "Deposited", json!({"amount": "lots"}))],
        ),
        (
            "an amount with a fraction",
            vec![open_a(), ("a", "Withdrawn", json!({"amount": 1.5}))],
        ),
        (
            "an amount past i64",
            vec![open_a(), ("a", "Deposited", json!({"amount": u64::MAX}))],
        ),
        (
            "no currency",
            vec![("a", "AccountOpened", json!({"owner": "ann"}))],
        ),
        (
            "an owner that is a number",
            vec![("a", "AccountOpened", json!({"owner": 7, "currency": "EUR"}))],
        ),
    ];
    for (what, specs) in cases {
        let mut ev = Events::default();
        let events: Vec<Event> = specs
            .into_iter()
            .map(|(stream, event_type, payload)| ev.next(stream, event_type, payload))
            .collect();
        let expected_index = events
            .iter()
            .position(|e| e.payload.get().contains("\"fails\""))
            .unwrap_or(events.len() - 1);
        let (rust_index, rust_message) = failure(&rust, events.clone());
        let (python_index, python_message) = failure(&python, events);
        assert_eq!(rust_index, expected_index, "{what}: {rust_message}");
        assert_eq!(python_index, rust_index, "{what}: {python_message}");
        // serde_json ends a payload's error with where in the text it is; the Python plugin
        // says the same without it.
        let rest = rust_message
            .strip_prefix(python_message.as_str())
            .unwrap_or_else(|| {
                panic!("{what}:\n  Rust:   {rust_message}\n  Python: {python_message}")
            });
        assert!(
            rest.is_empty() || (rest.starts_with(" at line ") && rest.contains(" column ")),
            "{what}:\n  Rust:   {rust_message}\n  Python: {python_message}"
        );
    }
}
