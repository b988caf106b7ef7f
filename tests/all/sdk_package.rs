//! The SDK crate (`plugins/sdk`) stands alone: packaged or vendored, it carries the contract it
//! builds against and inherits nothing from the plugins' workspace.

use crate::support::repo_root;

/// The contract's one source of truth is `wit/`; the SDK builds from its own copy (so a copy of
/// the crate elsewhere still finds it), which must not drift from it.
#[test]
fn the_sdks_wit_is_a_byte_for_byte_copy_of_the_contract() {
    let root = repo_root();
    let contract = std::fs::read(root.join("wit/plugin.wit")).expect("wit/plugin.wit");
    let copy = std::fs::read(root.join("plugins/sdk/wit/plugin.wit"))
        .expect("plugins/sdk/wit/plugin.wit (the SDK's copy of the contract)");
    assert!(
        copy == contract,
        "plugins/sdk/wit/plugin.wit differs from wit/plugin.wit: after changing the contract, \
         copy it into the SDK (cp wit/plugin.wit plugins/sdk/wit/plugin.wit)"
    );
}

/// `cargo package` resolves `workspace = true` from the workspace it runs in; a copy of the
/// crate outside it would not build. The version is the contract's, so a plugin author can
/// tell which contract an SDK release speaks.
#[test]
fn the_sdks_manifest_inherits_nothing_and_carries_the_contracts_version() {
    let root = repo_root();
    let text = std::fs::read_to_string(root.join("plugins/sdk/Cargo.toml")).unwrap();
    let manifest: toml::Table = text.parse().unwrap();
    fn inherited(path: &str, value: &toml::Value, found: &mut Vec<String>) {
        if let toml::Value::Table(table) = value {
            for (key, inner) in table {
                if key == "workspace" {
                    found.push(path.to_owned());
                }
                inherited(&format!("{path}.{key}"), inner, found);
            }
        }
    }
    let mut found = Vec::new();
    inherited("", &toml::Value::Table(manifest.clone()), &mut found);
    assert!(
        found.is_empty(),
        "plugins/sdk/Cargo.toml inherits {found:?} from the workspace"
    );

    let version = manifest["package"]["version"].as_str().unwrap();
    let wit = std::fs::read_to_string(root.join("wit/plugin.wit")).unwrap();
    let contract = wit
        .lines()
        .find_map(|line| line.trim().strip_prefix("package projector:plugin@"))
        .and_then(|rest| rest.strip_suffix(';'))
        .expect("wit/plugin.wit declares its package");
    assert_eq!(
        version, contract,
        "the SDK's version follows the contract it implements"
    );
}
