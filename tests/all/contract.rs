//! The plugin contract across versions, and what the host learns about a call it cut short:
//! plugins on the 0.1.1 contract tell the host which event they are on (`log.begin-event`), so
//! a deadline, the memory cap, the output cap or a trap names its event, as a returned error
//! and a panic do.

use std::sync::Arc;

use projector::event::Event;
use projector::runtime::{
    BoxError, DocumentReader, Fault, Limits, MemoryDocuments, Plugin, Runtime, RuntimeConfig,
    RuntimeError,
};
use serde_json::{json, Value};

use crate::support::{fixture_path, plugins_dir, repo_root, Events};

fn runtime(limits: Limits) -> Runtime {
    Runtime::new(RuntimeConfig {
        limits,
        cache_dir: None,
        ..Default::default()
    })
    .expect("engine starts")
}

fn docs() -> Arc<MemoryDocuments> {
    Arc::new(MemoryDocuments::default())
}

fn doc(bytes: &Option<Vec<u8>>) -> Value {
    serde_json::from_slice(bytes.as_deref().expect("a document, not a delete")).unwrap()
}

/// `account-balance` as built against `projector:plugin@0.1.0`, before `log.begin-event`.
fn account_balance_0_1_0() -> std::path::PathBuf {
    repo_root().join("tests/fixtures/account-balance-0.1.0.wasm")
}

#[test]
fn the_0_1_0_fixture_is_built_against_the_old_contract() {
    let bytes = std::fs::read(account_balance_0_1_0()).unwrap();
    let has = |s: &str| bytes.windows(s.len()).any(|w| w == s.as_bytes());
    assert!(has("projector:plugin/log@0.1.0"), "imports log@0.1.0");
    assert!(!has("projector:plugin/log@0.1.1"));
    assert!(!has("begin-event"));
    // And today's build is on the newest one.
    let bytes = std::fs::read(plugins_dir().join("account-balance.wasm")).unwrap();
    let has = |s: &str| bytes.windows(s.len()).any(|w| w == s.as_bytes());
    assert!(has("projector:plugin/log@0.1.2"), "imports log@0.1.2");
}

/// wasmtime links a plugin's `@0.1.0` imports to the host's `@0.1.1` definitions
/// (semver-compatible names; the extra `begin-event` is no concern of the old plugin).
#[test]
fn a_plugin_built_against_0_1_0_loads_and_runs() {
    let rt = runtime(Limits::default());
    let plugin = rt
        .load_file(&account_balance_0_1_0())
        .expect("0.1.0 plugin loads");
    assert_eq!(plugin.name(), "account-balance");
    assert_eq!(plugin.descriptor().version, "1.0.0");
    let mut ev = Events::default();
    let batch = vec![
        ev.next(
            "acct-1",
            "AccountOpened",
            json!({"owner": "alice", "currency": "EUR"}),
        ),
        ev.next("acct-1", "Deposited", json!({"amount": 100})),
        ev.next(
            "acct-2",
            "AccountOpened",
            json!({"owner": "bob", "currency": "USD"}),
        ),
        ev.next("acct-1", "Withdrawn", json!({"amount": 40})),
        ev.next("acct-2", "AccountClosed", json!({})),
    ];
    let read_model = docs();
    let out = plugin
        .handle(batch, read_model.clone())
        .expect("batch runs");
    let accounts = &out.writes["accounts"];
    assert_eq!(accounts.len(), 2);
    assert_eq!(
        doc(&accounts["acct-1"]),
        json!({"owner": "alice", "currency": "EUR", "balance": 60, "tx_count": 2,
               "status": "open", "last_version": 3})
    );
    assert_eq!(
        doc(&accounts["acct-2"]),
        json!({"owner": "bob", "currency": "USD", "balance": 0, "tx_count": 1,
               "status": "closed", "last_version": 2})
    );

    read_model.apply(out);

    // The next batch reads the documents back; its returned errors still name the event.
    let out = plugin
        .handle(
            vec![ev.next("acct-1", "Deposited", json!({"amount": 5}))],
            read_model.clone(),
        )
        .unwrap();
    assert_eq!(doc(&out.writes["accounts"]["acct-1"])["balance"], 65);
    let batch = vec![
        ev.next("acct-1", "Deposited", json!({"amount": 1})),
        ev.next("acct-1", "Deposited", json!({"amount": "ten"})),
    ];
    let err = plugin.handle(batch, read_model).unwrap_err();
    assert_eq!(err.event_index(), Some(1), "{err}");
    assert_eq!(
        err.fault(),
        Fault::Plugin {
            at: Some(1),
            named: true
        }
    );
}

/// The poison fixture over 100 events on 10 streams; event #37 (stream s7, version 4) carries
/// `payload` on top of its amount.
fn poison_batch(extra: Value) -> Vec<Event> {
    let mut ev = Events::default();
    (0..100)
        .map(|i| {
            let mut payload = json!({"amount": i});
            if i == 37 {
                for (key, value) in extra.as_object().unwrap() {
                    payload[key] = value.clone();
                }
            }
            ev.next(&format!("s{}", i % 10), "Tick", payload)
        })
        .collect()
}

const EVENT_37: &str = "on event #37 of the batch (id s7-4, position 38, s7@4)";

fn poison(limits: Limits) -> (Runtime, Plugin) {
    let rt = runtime(limits);
    let plugin = rt
        .load_file(&fixture_path("poison"))
        .expect("fixture loads");
    assert_eq!(plugin.name(), "poison");
    assert_eq!(plugin.descriptor().version, "1.0.0");
    (rt, plugin)
}

fn fixed(limits: Limits) -> (Runtime, Plugin) {
    let rt = runtime(limits);
    let path = plugins_dir().join("fixtures/poison-fixed/poison.wasm");
    let plugin = rt.load_file(&path).expect("fixed fixture loads");
    assert_eq!(plugin.name(), "poison");
    assert_eq!(plugin.descriptor().version, "1.0.0");
    (rt, plugin)
}

/// After a poisoned batch, the same plugin runs a clean one.
fn assert_still_works(plugin: &Plugin) {
    let out = plugin.handle(poison_batch(json!({})), docs()).unwrap();
    assert_eq!(out.writes["streams"].len(), 10);
}

const CUT_SHORT: Fault = Fault::Plugin {
    at: Some(37),
    named: false,
};
const NAMED: Fault = Fault::Plugin {
    at: Some(37),
    named: true,
};

#[test]
fn a_poison_free_batch_writes_one_document_per_stream() {
    let (_rt, plugin) = poison(Limits::default());
    let out = plugin.handle(poison_batch(json!({})), docs()).unwrap();
    let streams = &out.writes["streams"];
    assert_eq!(streams.len(), 10);
    assert_eq!(
        doc(&streams["s7"]),
        json!({"count": 10, "last_version": 10, "last_type": "Tick",
               "sum": (0..10).map(|k| 10 * k + 7).sum::<i64>()})
    );
    assert_eq!(plugin.descriptor().collections[0].indexes, ["last_type"]);
}

#[test]
fn a_deadline_names_the_event_the_call_was_on() {
    let (_rt, plugin) = poison(Limits {
        deadline_ms: 200,
        ..Limits::default()
    });
    let err = plugin
        .handle(poison_batch(json!({"poison": "loop"})), docs())
        .unwrap_err();
    assert!(
        matches!(
            err,
            RuntimeError::DeadlineExceeded {
                at: Some(37),
                deadline_ms: 200,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.fault(), CUT_SHORT);
    assert_eq!(err.event_index(), None, "the plugin did not name it");
    assert!(err.to_string().ends_with(EVENT_37), "{err}");
    assert_still_works(&plugin);
}

#[test]
fn the_memory_cap_names_the_event_the_call_was_on() {
    let (_rt, plugin) = poison(Limits {
        memory_mb: 32,
        ..Limits::default()
    });
    let err = plugin
        .handle(poison_batch(json!({"poison": "bomb"})), docs())
        .unwrap_err();
    assert!(
        matches!(
            err,
            RuntimeError::MemoryLimit {
                at: Some(37),
                limit_mb: 32,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.fault(), CUT_SHORT);
    assert!(err.to_string().ends_with(EVENT_37), "{err}");
    assert_still_works(&plugin);
}

#[test]
fn the_output_cap_names_the_event_the_call_was_on() {
    let (_rt, plugin) = poison(Limits {
        max_output_mb: 1,
        ..Limits::default()
    });
    let err = plugin
        .handle(poison_batch(json!({"poison": "oversize"})), docs())
        .unwrap_err();
    assert!(
        matches!(
            err,
            RuntimeError::OutputLimit {
                at: Some(37),
                limit_mb: 1,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.fault(), CUT_SHORT);
    assert!(err.to_string().ends_with(EVENT_37), "{err}");
    assert_still_works(&plugin);
}

/// Why the host's `at` is only a suspect (`named: false`): a cap reached by many events
/// together stops the call on whichever event crosses it, and that event alone is fine.
#[test]
fn a_cap_reached_together_stops_on_an_event_that_passes_alone() {
    let (_rt, plugin) = poison(Limits {
        max_output_mb: 1,
        ..Limits::default()
    });
    let mut ev = Events::default();
    let batch: Vec<Event> = (0..100)
        .map(|i| {
            ev.next(
                &format!("s{i}"),
                "Tick",
                json!({"poison": "oversize", "bytes": 32 << 10}),
            )
        })
        .collect();
    let err = plugin.handle(batch.clone(), docs()).unwrap_err();
    let Fault::Plugin {
        at: Some(at),
        named: false,
    } = err.fault()
    else {
        panic!("{err}: {:?}", err.fault());
    };
    assert!(
        (20..40).contains(&at),
        "1 MiB / 32 KiB: the 32nd write crosses, {err}"
    );
    plugin
        .handle(vec![batch[at].clone()], docs())
        .expect("the suspect alone passes");
}

#[test]
fn a_panic_is_named_by_the_plugin() {
    let (_rt, plugin) = poison(Limits::default());
    let err = plugin
        .handle(poison_batch(json!({"poison": "panic"})), docs())
        .unwrap_err();
    match &err {
        RuntimeError::Guest {
            index,
            event_id,
            message,
            ..
        } => {
            assert_eq!(*index, 37);
            assert_eq!(event_id, "s7-4");
            assert!(message.contains("panicked: poisoned event s7-4"), "{err}");
        }
        other => panic!("expected a guest failure, got {other}"),
    }
    assert_eq!(err.event_index(), Some(37));
    assert_eq!(err.fault(), NAMED);
    assert!(err.to_string().contains(EVENT_37), "{err}");
    assert_still_works(&plugin);
}

#[test]
fn a_returned_error_is_named_by_the_plugin() {
    let (_rt, plugin) = poison(Limits::default());
    let err = plugin
        .handle(poison_batch(json!({"poison": "error"})), docs())
        .unwrap_err();
    assert!(
        matches!(err, RuntimeError::Guest { index: 37, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("poisoned event s7-4"), "{err}");
    assert_eq!(err.fault(), NAMED);
}

#[test]
fn a_slow_event_that_finishes_in_time_is_no_failure() {
    let (_rt, plugin) = poison(Limits {
        deadline_ms: 2_000,
        ..Limits::default()
    });
    let out = plugin
        .handle(poison_batch(json!({"spin": 1_000_000})), docs())
        .unwrap();
    assert_eq!(doc(&out.writes["streams"]["s7"])["count"], 10);
}

/// The fixed build of the same name and version ignores the poison.
#[test]
fn the_fixed_plugin_runs_the_poisoned_batch() {
    let (_rt, plugin) = fixed(Limits {
        deadline_ms: 200,
        memory_mb: 32,
        max_output_mb: 1,
        ..Limits::default()
    });
    for how in ["error", "panic", "loop", "bomb", "oversize"] {
        let out = plugin
            .handle(poison_batch(json!({"poison": how})), docs())
            .unwrap_or_else(|err| panic!("{how}: {err}"));
        assert_eq!(
            doc(&out.writes["streams"]["s7"]),
            json!({"count": 10, "last_version": 10, "last_type": "Tick", "sum": 520})
        );
    }
}

/// A document read that fails is not the event's fault: the call is to be retried.
#[test]
fn a_failed_document_read_is_the_hosts_fault() {
    struct Broken;
    impl DocumentReader for Broken {
        fn get(&self, _: &str, _: &str) -> Result<Option<Vec<u8>>, BoxError> {
            Err("the database is away".into())
        }
    }
    let (_rt, plugin) = poison(Limits::default());
    let err = plugin
        .handle(poison_batch(json!({})), Arc::new(Broken))
        .unwrap_err();
    assert!(matches!(err, RuntimeError::State { .. }), "{err}");
    assert_eq!(err.fault(), Fault::Host);
}

/// One build of account-balance per contract version the host binds (0.1.0 and 0.1.1 kept in
/// `tests/fixtures/`, 0.1.2 built today): each loads, reports its version, and makes the same
/// documents from the same events.
#[test]
fn a_plugin_built_against_each_supported_contract_loads_and_agrees() {
    let rt = runtime(Limits::default());
    let builds = [
        ("0.1.0", account_balance_0_1_0()),
        (
            "0.1.1",
            repo_root().join("tests/fixtures/account-balance-0.1.1.wasm"),
        ),
        ("0.1.2", plugins_dir().join("account-balance.wasm")),
    ];
    let supported: Vec<&str> = builds.iter().map(|(v, _)| *v).collect();
    assert_eq!(supported, projector::runtime::SUPPORTED_CONTRACTS);
    let mut models = Vec::new();
    for (version, path) in &builds {
        let plugin = rt
            .load_file(path)
            .unwrap_or_else(|e| panic!("{version}: {e}"));
        assert_eq!(plugin.info().contract, *version);
        let mut ev = Events::default();
        let batch = vec![
            ev.next(
                "a",
                "AccountOpened",
                json!({"owner": "o", "currency": "EUR"}),
            ),
            ev.next("a", "Deposited", json!({"amount": 7})),
            ev.next("a", "Withdrawn", json!({"amount": 2})),
        ];
        let out = plugin.handle(batch, docs()).expect("batch runs");
        models.push(doc(&out.writes["accounts"]["a"]));
    }
    assert!(models.windows(2).all(|w| w[0] == w[1]), "{models:?}");
    assert_eq!(models[0]["balance"], 5);
}
