//! Loading uploaded bytes: what cannot be loaded as a projection is refused with a stable code
//! naming the reason, and what loads reports its world, contract version and digest. The
//! account-balance variants a hot swap uploads load beside the plugin they replace.

use std::path::PathBuf;
use std::sync::Arc;

use projector::event::Event;
use projector::runtime::{
    Fault, Limits, MemoryDocuments, Plugin, Runtime, RuntimeConfig, RuntimeError,
    SUPPORTED_CONTRACTS,
};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::support::{fixture_path, plugin_path, plugins_dir, repo_root, Events};

fn runtime() -> Runtime {
    Runtime::new(RuntimeConfig {
        limits: Limits::default(),
        cache_dir: None,
        ..Default::default()
    })
    .expect("engine starts")
}

fn read(path: &PathBuf) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// Loads `bytes`, expecting a refusal with `code` that is the plugin's fault and names the
/// upload; returns the error for the message's details.
fn refused(origin: &str, bytes: &[u8], code: &str) -> RuntimeError {
    let err = match runtime().load_bytes(origin, bytes) {
        Ok(plugin) => panic!("{origin} loaded as {}", plugin.name()),
        Err(err) => err,
    };
    assert_eq!(err.code(), code, "{err}");
    assert_eq!(
        err.fault(),
        Fault::Plugin {
            at: None,
            named: false
        },
        "{err}"
    );
    assert!(err.to_string().contains(origin), "{err}");
    err
}

fn sha256(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

fn variant(name: &str) -> PathBuf {
    plugins_dir()
        .join("variants")
        .join(name)
        .join("account-balance.wasm")
}

fn load(path: &PathBuf) -> (Plugin, Vec<u8>) {
    let bytes = read(path);
    let plugin = runtime()
        .load_bytes(&path.display().to_string(), &bytes)
        .unwrap_or_else(|err| panic!("{err}"));
    (plugin, bytes)
}

#[test]
fn random_bytes_are_not_a_component() {
    let mut noise = vec![0u8; 4096];
    let mut x: u32 = 0x9e37_79b9;
    for byte in &mut noise {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *byte = x as u8;
    }
    for (origin, bytes) in [
        ("noise.wasm", noise.as_slice()),
        ("empty.wasm", b"".as_slice()),
        ("text.wat", b"(component)".as_slice()),
    ] {
        let err = refused(origin, bytes, "not_a_component");
        let text = err.to_string();
        assert!(text.contains("--target wasm32-wasip2"), "{text}");
    }
    let err = refused("noise.wasm", &noise, "not_a_component");
    assert!(err.to_string().contains("magic bytes"), "{err}");
}

#[test]
fn a_core_module_is_not_a_component() {
    // The smallest core module: the magic bytes, version 1, layer 0, no sections.
    let err = refused("module.wasm", b"\0asm\x01\x00\x00\x00", "not_a_component");
    let text = err.to_string();
    assert!(text.contains("core WebAssembly module"), "{text}");
    assert!(text.contains("--target wasm32-wasip2"), "{text}");
}

#[test]
fn an_observer_loads_as_an_observer() {
    let plugin = runtime()
        .load_bytes("relay.wasm", &read(&fixture_path("relay")))
        .expect("an observer loads");
    assert!(plugin.is_observer());
    assert_eq!(plugin.info().world, "observer");
    assert_eq!(plugin.info().contract, "0.1.2");
    assert_eq!(plugin.name(), "relay");
    assert!(plugin.descriptor().collections.is_empty());
    let projection = runtime()
        .load_bytes(
            "account-balance.wasm",
            &read(&plugin_path("account-balance")),
        )
        .unwrap();
    assert!(!projection.is_observer());
    assert_eq!(projection.info().world, "projection");
}

#[test]
fn a_component_exporting_nothing_is_the_wrong_world() {
    let err = refused("empty.wasm", b"\0asm\x0d\x00\x01\x00", "wrong_world");
    assert!(err.to_string().contains("exports nothing"), "{err}");
}

#[test]
fn a_contract_version_the_host_does_not_bind_is_named() {
    let err = refused(
        "future.wasm",
        &read(&fixture_path("future-contract")),
        "unsupported_contract",
    );
    match &err {
        RuntimeError::UnsupportedContract {
            found, supported, ..
        } => {
            assert_eq!(found, "0.9.0");
            assert_eq!(*supported, SUPPORTED_CONTRACTS);
        }
        other => panic!("{other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains("projector:plugin@0.9.0"), "{text}");
    assert!(text.contains("0.1.0 and 0.1.1"), "{text}");
}

#[test]
fn a_describe_that_panics_is_refused_with_the_panic() {
    let err = refused(
        "describe-panic.wasm",
        &read(&fixture_path("describe-panic")),
        "describe_failed",
    );
    let text = err.to_string();
    assert!(
        text.contains("panicked: describe-panic cannot describe itself"),
        "{text}"
    );
    assert!(!text.contains("batch"), "describe has no batch: {text}");
}

#[test]
fn a_descriptor_the_host_refuses_is_named() {
    let err = refused(
        "bad-descriptor.wasm",
        &read(&fixture_path("bad-descriptor")),
        "invalid_descriptor",
    );
    assert!(err.to_string().contains("\"Bad Descriptor\""), "{err}");
}

#[test]
fn an_import_the_host_lacks_is_named() {
    let err = refused(
        "extra-import.wasm",
        &read(&fixture_path("extra-import")),
        "unsupported_import",
    );
    assert!(err.to_string().contains("fixture:extra/clock"), "{err}");
}

#[test]
fn every_refusal_has_a_code_of_its_own() {
    let (origin, reason) = (String::from("x"), String::from("y"));
    let refusals = [
        RuntimeError::NotAComponent {
            origin: origin.clone(),
            reason: reason.clone(),
        },
        RuntimeError::InvalidComponent {
            origin: origin.clone(),
            reason: reason.clone(),
        },
        RuntimeError::WrongWorld {
            origin: origin.clone(),
            exports: vec![],
            reason: reason.clone(),
        },
        RuntimeError::UnsupportedContract {
            origin: origin.clone(),
            found: "9.9.9".into(),
            interface: "projector:plugin/log@9.9.9".into(),
            supported: SUPPORTED_CONTRACTS,
        },
        RuntimeError::UnsupportedImport {
            origin: origin.clone(),
            reason: reason.clone(),
        },
        RuntimeError::DescribeFailed {
            origin: origin.clone(),
            reason: reason.clone(),
        },
        RuntimeError::InvalidDescriptor { origin, reason },
    ];
    let codes: Vec<&str> = refusals.iter().map(RuntimeError::code).collect();
    assert_eq!(
        codes,
        [
            "not_a_component",
            "invalid_component",
            "wrong_world",
            "unsupported_contract",
            "unsupported_import",
            "describe_failed",
            "invalid_descriptor",
        ]
    );
    for err in &refusals {
        assert_eq!(
            err.fault(),
            Fault::Plugin {
                at: None,
                named: false
            },
            "an upload's fault: {err}"
        );
    }
    assert_eq!(RuntimeError::Engine("x".into()).fault(), Fault::Host);
}

#[test]
fn a_loaded_plugin_reports_its_world_contract_and_digest() {
    let old = repo_root().join("tests/fixtures/account-balance-0.1.0.wasm");
    let (plugin, bytes) = load(&old);
    assert_eq!(plugin.info().world, "projection");
    assert_eq!(plugin.info().contract, "0.1.0");
    assert_eq!(plugin.info().sha256, sha256(&bytes));
    assert_eq!(plugin.info().sha256.len(), 64);

    let (plugin, bytes) = load(&plugin_path("account-balance"));
    assert_eq!(plugin.info().world, "projection");
    assert_eq!(plugin.info().contract, "0.1.2");
    assert_eq!(plugin.info().sha256, sha256(&bytes));
}

/// A batch over two accounts, and the documents `account-balance` 1.0.0 writes for it.
fn batch() -> (Vec<Event>, Value) {
    let mut ev = Events::default();
    let events = vec![
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
    let docs = json!({
        "acct-1": {"owner": "alice", "currency": "EUR", "balance": 60, "tx_count": 2,
                   "status": "open", "last_version": 3},
        "acct-2": {"owner": "bob", "currency": "USD", "balance": 0, "tx_count": 1,
                   "status": "closed", "last_version": 2},
    });
    (events, docs)
}

fn accounts(plugin: &Plugin) -> Value {
    let out = plugin
        .handle(batch().0, Arc::new(MemoryDocuments::default()))
        .unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(out.writes.keys().collect::<Vec<_>>(), ["accounts"]);
    out.writes["accounts"]
        .iter()
        .map(|(key, doc)| {
            let doc = doc.as_deref().expect("a document, not a delete");
            let doc: Value = serde_json::from_slice(doc).expect("JSON");
            (key.clone(), doc)
        })
        .collect()
}

#[test]
fn the_same_version_variant_differs_in_code_only() {
    let (live, live_bytes) = load(&plugin_path("account-balance"));
    let (same, same_bytes) = load(&variant("account-balance-same"));
    assert_ne!(live_bytes, same_bytes, "other code bytes");
    assert_ne!(same.info().sha256, live.info().sha256);
    assert_eq!(same.name(), live.name());
    assert_eq!(same.descriptor(), live.descriptor());
    assert_eq!(same.info().contract, "0.1.2");
    assert_eq!(accounts(&same), batch().1);
    assert_eq!(accounts(&same), accounts(&live));
}

#[test]
fn the_v2_variant_has_another_version_and_stamps_its_documents() {
    let (live, _) = load(&plugin_path("account-balance"));
    let (v2, _) = load(&variant("account-balance-v2"));
    assert_eq!(v2.name(), live.name());
    assert_ne!(v2.descriptor().version, live.descriptor().version);
    assert_eq!(v2.descriptor().version, "2.0.0");
    let mut rest = v2.descriptor().clone();
    rest.version = live.descriptor().version.clone();
    assert_eq!(&rest, live.descriptor(), "only the version differs");
    let mut expected = batch().1;
    for doc in expected.as_object_mut().expect("an object").values_mut() {
        doc["schema"] = json!(2);
    }
    assert_eq!(accounts(&v2), expected);
}
