//! The sandbox and its limits, proven with real misbehaving plugins.

use std::sync::Arc;
use std::time::{Duration, Instant};

use projector::runtime::{Limits, MemoryDocuments, Plugin, Runtime, RuntimeConfig, RuntimeError};
use serde_json::json;

use crate::support::{fixture_path, plugin_path, Events};

fn runtime(limits: Limits) -> Runtime {
    Runtime::new(RuntimeConfig {
        limits,
        cache_dir: None,
        ..Default::default()
    })
    .expect("engine starts")
}

fn misbehave(limits: Limits) -> (Runtime, Plugin) {
    let rt = runtime(limits);
    let plugin = rt
        .load_file(&fixture_path("misbehave"))
        .expect("fixture loads");
    (rt, plugin)
}

fn docs() -> Arc<MemoryDocuments> {
    Arc::new(MemoryDocuments::default())
}

/// After any failure the same plugin must still work: the host, not just the process, is fine.
fn assert_still_works(plugin: &Plugin) {
    let mut ev = Events::default();
    let out = plugin
        .handle(vec![ev.next("s", "Count", json!({}))], docs())
        .expect("a normal batch succeeds after the failure");
    assert_eq!(out.writes["out"]["s"].as_deref(), Some(&b"1"[..]));
}

#[test]
fn an_infinite_loop_is_stopped_at_the_deadline() {
    let deadline_ms = 300;
    let (_rt, plugin) = misbehave(Limits {
        deadline_ms,
        ..Limits::default()
    });
    let mut ev = Events::default();
    let start = Instant::now();
    let err = plugin
        .handle(vec![ev.next("s", "Loop", json!({}))], docs())
        .unwrap_err();
    let took = start.elapsed();
    assert!(
        matches!(
            err,
            RuntimeError::DeadlineExceeded {
                deadline_ms: 300,
                ..
            }
        ),
        "{err}"
    );
    // Stopped, not left to run: how close to the deadline is the bench's business (a busy
    // machine delays the ticker), so the bound here is loose.
    assert!(
        took < Duration::from_millis(deadline_ms * 10),
        "stopped after {took:?}, deadline {deadline_ms} ms"
    );
    assert_still_works(&plugin);
}

/// The deadline clock lives as long as any plugin does: a plugin kept after its runtime is
/// dropped still has its deadline.
#[test]
fn a_plugin_that_outlives_its_runtime_keeps_its_deadline() {
    let (rt, plugin) = misbehave(Limits {
        deadline_ms: 200,
        ..Limits::default()
    });
    drop(rt);
    let mut ev = Events::default();
    let event = ev.next("s", "Loop", json!({}));
    // Without a clock the call would never return: bounded here by a channel's timeout.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(plugin.handle(vec![event], docs()));
    });
    let err = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the call ended within 30 s")
        .unwrap_err();
    assert!(
        matches!(err, RuntimeError::DeadlineExceeded { .. }),
        "{err}"
    );
}

/// Instances come from a fixed pool (32 slots): calls beyond it wait for a slot, none fails
/// to instantiate. Forty calls that each hold their instance until the deadline overlap.
#[test]
fn more_calls_at_once_than_instance_slots_wait_for_one() {
    let (_rt, plugin) = misbehave(Limits {
        deadline_ms: 200,
        ..Limits::default()
    });
    let plugin = Arc::new(plugin);
    let calls: Vec<_> = (0..40)
        .map(|i| {
            let plugin = plugin.clone();
            std::thread::spawn(move || {
                let mut ev = Events::default();
                plugin.handle(vec![ev.next(&format!("s{i}"), "Loop", json!({}))], docs())
            })
        })
        .collect();
    for call in calls {
        let err = call.join().unwrap().unwrap_err();
        assert!(
            matches!(err, RuntimeError::DeadlineExceeded { .. }),
            "{err}"
        );
    }
    assert_still_works(&plugin);
}

#[test]
fn a_memory_bomb_hits_the_memory_limit() {
    let (_rt, plugin) = misbehave(Limits {
        memory_mb: 32,
        ..Limits::default()
    });
    let mut ev = Events::default();
    let err = plugin
        .handle(vec![ev.next("s", "Bomb", json!({}))], docs())
        .unwrap_err();
    assert!(
        matches!(err, RuntimeError::MemoryLimit { limit_mb: 32, .. }),
        "{err}"
    );
    assert_still_works(&plugin);
}

#[test]
fn a_panic_names_the_event_that_caused_it() {
    let (_rt, plugin) = misbehave(Limits::default());
    let mut ev = Events::default();
    let batch = [
        ev.next("a", "Count", json!({})),
        ev.next("b", "Count", json!({})),
        ev.next("c", "Panic", json!({})),
        ev.next("d", "Count", json!({})),
    ];
    let err = plugin.handle(batch.to_vec(), docs()).unwrap_err();
    match &err {
        RuntimeError::Guest {
            index,
            event_id,
            message,
            ..
        } => {
            assert_eq!(*index, 2);
            assert_eq!(event_id, "c-1");
            assert!(message.contains("asked to panic by event c-1"), "{message}");
        }
        other => panic!("expected a guest error, got {other}"),
    }
    assert_eq!(err.event_index(), Some(2));
    assert_still_works(&plugin);
}

#[test]
fn files_environment_and_sockets_are_out_of_reach() {
    let (_rt, plugin) = misbehave(Limits::default());
    let mut ev = Events::default();
    let out = plugin
        .handle(vec![ev.next("s", "Escape", json!({}))], docs())
        .expect("attempts fail inside the guest, the call itself succeeds");
    let report: serde_json::Value =
        serde_json::from_slice(out.writes["out"]["s"].as_ref().unwrap()).unwrap();
    for attempt in ["file", "dir", "home", "socket"] {
        let result = report[attempt].as_str().unwrap();
        assert!(result.starts_with("Err("), "{attempt} succeeded: {result}");
    }
    assert_eq!(
        report["env_count"], 0,
        "the guest saw environment variables"
    );
    assert_still_works(&plugin);
}

#[test]
fn oversized_output_is_refused() {
    let (_rt, plugin) = misbehave(Limits {
        max_output_mb: 16,
        ..Limits::default()
    });
    let mut ev = Events::default();
    let err = plugin
        .handle(vec![ev.next("s", "Flood", json!({}))], docs())
        .unwrap_err();
    assert!(
        matches!(err, RuntimeError::OutputLimit { limit_mb: 16, .. }),
        "{err}"
    );
    assert_still_works(&plugin);
}

#[test]
fn a_chatty_plugin_is_rate_limited_not_failed() {
    use std::sync::Mutex;
    use tracing_subscriber::layer::{Context, SubscriberExt};

    type Logged = Vec<(String, String)>;
    /// Every event logged on this thread, as (field, value) pairs.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<Logged>>>);
    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Captured {
        fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
            struct Fields(Vec<(String, String)>);
            impl tracing::field::Visit for Fields {
                fn record_debug(
                    &mut self,
                    field: &tracing::field::Field,
                    value: &dyn std::fmt::Debug,
                ) {
                    self.0.push((field.name().to_owned(), format!("{value:?}")));
                }
                fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                    self.0.push((field.name().to_owned(), value.to_owned()));
                }
            }
            let mut fields = Fields(Vec::new());
            event.record(&mut fields);
            self.0.lock().unwrap().push(fields.0);
        }
    }
    let field = |event: &[(String, String)], name: &str| {
        event
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };

    const BUDGET: usize = 50;
    let (_rt, plugin) = misbehave(Limits {
        max_log_lines: BUDGET,
        ..Limits::default()
    });
    let mut ev = Events::default();
    for call in 0..2 {
        // The fixture logs 10,000 lines through the `log` import and prints 10,000 more.
        let captured = Captured::default();
        let subscriber = tracing_subscriber::registry().with(captured.clone());
        tracing::subscriber::with_default(subscriber, || {
            plugin
                .handle(vec![ev.next("s", "Chatter", json!({}))], docs())
                .expect("printing 10,000 lines is allowed; the host drops the excess")
        });
        let logged = captured.0.lock().unwrap().clone();
        let (dropped, passed): (Vec<_>, Vec<_>) = logged
            .iter()
            .filter(|e| field(e, "plugin").as_deref() == Some("misbehave"))
            .partition(|e| field(e, "dropped_lines").is_some());
        // The budget's worth passes (the `log` calls come first; stdout is read after)...
        let messages: Vec<String> = passed
            .iter()
            .map(|e| field(e, "message").unwrap_or_default())
            .collect();
        assert_eq!(
            messages.len(),
            BUDGET,
            "call {call}: lines let through, the last {:?}",
            messages.last()
        );
        let expected: Vec<String> = (0..BUDGET).map(|i| format!("log line {i}")).collect();
        assert_eq!(messages, expected, "call {call}: the lines let through");
        // ...and the rest is dropped, counted in one warning.
        assert_eq!(dropped.len(), 1, "call {call}: {dropped:?}");
        let lines: usize = field(dropped[0], "dropped_lines").unwrap().parse().unwrap();
        let bytes: usize = field(dropped[0], "dropped_bytes").unwrap().parse().unwrap();
        assert!(
            lines > 10_000 - BUDGET,
            "call {call}: {lines} lines dropped: the printed ones are missing"
        );
        assert!(
            bytes > 0,
            "call {call}: stdout past its cap was not counted"
        );
        assert!(
            field(dropped[0], "message").is_some_and(|m| m.contains("dropped")),
            "{dropped:?}"
        );
    }
}

#[test]
fn clocks_and_randomness_are_virtual_and_repeatable() {
    let (_rt, plugin) = misbehave(Limits::default());
    let run = || {
        let mut ev = Events::default();
        let batch = [
            ev.next("a", "Count", json!({})),
            ev.next("a", "Clock", json!({})),
        ];
        let out = plugin.handle(batch.to_vec(), docs()).unwrap();
        let doc: serde_json::Value =
            serde_json::from_slice(out.writes["out"]["a-2"].as_ref().unwrap()).unwrap();
        (batch[1].timestamp_ms, doc)
    };
    let (timestamp, first) = run();
    let (_, second) = run();
    assert_eq!(first, second, "two runs over the same events differ");
    assert_eq!(
        first["now_ms"], timestamp,
        "the wall clock is the batch's last event time"
    );
    assert_eq!(first["instant"], "0ns", "the monotonic clock stands still");
}

#[test]
fn account_balance_folds_a_batch() {
    let rt = runtime(Limits::default());
    let plugin = rt.load_file(&plugin_path("account-balance")).unwrap();
    assert_eq!(plugin.name(), "account-balance");
    assert_eq!(
        plugin.descriptor().collections[0].indexes,
        ["owner", "status"]
    );
    let mut ev = Events::default();
    let batch = [
        ev.next(
            "acct-1",
            "AccountOpened",
            json!({"owner": "alice", "currency": "EUR"}),
        ),
        ev.next("acct-1", "Deposited", json!({"amount": 100})),
        ev.next(
            "acct-2",
            "AccountOpened",
            json!({"owner": "bob", "currency": "EUR"}),
        ),
        ev.next("acct-1", "Withdrawn", json!({"amount": 40})),
    ];
    let docs = docs();
    let out = plugin.handle(batch.to_vec(), docs.clone()).unwrap();
    assert_eq!(out.documents(), 2, "one write per document, not per event");
    docs.apply(out);
    // The next batch reads the committed document through the reader.
    let out = plugin
        .handle(
            vec![ev.next("acct-1", "Deposited", json!({"amount": 5}))],
            docs.clone(),
        )
        .unwrap();
    let doc: serde_json::Value =
        serde_json::from_slice(out.writes["accounts"]["acct-1"].as_ref().unwrap()).unwrap();
    assert_eq!(doc["balance"], 65);
    assert_eq!(doc["tx_count"], 3);
    assert_eq!(doc["last_version"], 4);
}

#[test]
fn a_guest_error_carries_the_index_and_message() {
    let rt = runtime(Limits::default());
    let plugin = rt.load_file(&plugin_path("account-balance")).unwrap();
    let mut ev = Events::default();
    let batch = [
        ev.next(
            "a",
            "AccountOpened",
            json!({"owner": "x", "currency": "EUR"}),
        ),
        ev.next("a", "Deposited", json!({"amount": "ten"})),
    ];
    let err = plugin.handle(batch.to_vec(), docs()).unwrap_err();
    assert_eq!(err.event_index(), Some(1));
    assert!(
        err.to_string().contains("invalid Deposited payload"),
        "{err}"
    );
}

#[test]
fn something_that_is_not_a_plugin_is_rejected_with_the_reason() {
    let rt = runtime(Limits::default());
    let err = rt
        .load_bytes("garbage.wasm", b"definitely not wasm")
        .err()
        .unwrap();
    assert!(matches!(err, RuntimeError::NotAComponent { .. }), "{err}");
    assert!(err.to_string().contains("garbage.wasm"), "{err}");

    // A valid component that exports nothing: the error names what is missing.
    let empty_component = b"\0asm\x0d\x00\x01\x00";
    let err = rt.load_bytes("empty.wasm", empty_component).err().unwrap();
    let text = err.to_string();
    assert!(matches!(err, RuntimeError::WrongWorld { .. }), "{text}");
    assert!(
        text.contains("describe") || text.contains("handle"),
        "{text}"
    );
}

#[test]
fn a_second_start_loads_the_compiled_plugin_from_the_cache() {
    let cache = tempdir();
    let config = || RuntimeConfig {
        limits: Limits::default(),
        cache_dir: Some(cache.clone()),
        ..Default::default()
    };
    let first = Runtime::new(config()).unwrap();
    let plugin = first.load_file(&plugin_path("account-balance")).unwrap();
    assert!(!plugin.loaded_from_cache());
    drop((plugin, first));
    let second = Runtime::new(config()).unwrap();
    let plugin = second.load_file(&plugin_path("account-balance")).unwrap();
    assert!(plugin.loaded_from_cache());
    let entries = std::fs::read_dir(&cache).unwrap().count();
    assert_eq!(entries, 1, "one artifact, no temp files left behind");
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("projector-test-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
