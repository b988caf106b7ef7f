//! Writes `__observer_bindings!`, which generates the `observer` world's bindings in the plugin
//! crate that exports an observer (see `src/guest.rs` for why not in this crate). wit-bindgen
//! reads a relative `path` from the crate that invokes it, so the macro names this crate's WIT
//! folder by its absolute path, known only here. The folder is the crate's own (`wit/`, a copy
//! of the repository's contract), so a vendored or packaged copy of the crate finds it too.

use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=wit/plugin.wit");
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let wit = Path::new(&manifest_dir).join("wit").canonicalize()?;
    // `with` wants the interfaces' versioned names: read the version the contract has now.
    let contract = std::fs::read_to_string(wit.join("plugin.wit"))?;
    let version = contract
        .lines()
        .find_map(|line| line.trim().strip_prefix("package projector:plugin@"))
        .and_then(|rest| rest.strip_suffix(';'))
        .ok_or("wit/plugin.wit declares no `package projector:plugin@<version>;`")?;
    let wit = wit.to_str().ok_or("the WIT folder's path is not UTF-8")?;
    let out_dir = std::env::var("OUT_DIR")?;
    let source = format!(
        r#"/// Generates the `observer` world's bindings: its `Guest` trait, its `export!` macro and
/// the `component-type` section describing it. The interfaces it shares with `projection` are
/// this crate's, so both worlds speak the same Rust types.
#[doc(hidden)]
#[macro_export]
macro_rules! __observer_bindings {{
    () => {{
        ::projector_sdk::guest::wit_bindgen::generate!({{
            world: "observer",
            path: {wit:?},
            runtime_path: "::projector_sdk::guest::wit_bindgen::rt",
            with: {{
                "projector:plugin/types@{version}": ::projector_sdk::guest::bindings::projector::plugin::types,
                "projector:plugin/log@{version}": ::projector_sdk::guest::bindings::projector::plugin::log,
                "projector:plugin/config@{version}": ::projector_sdk::guest::bindings::projector::plugin::config,
            }},
        }});
    }};
}}
"#
    );
    std::fs::write(Path::new(&out_dir).join("observer_bindings.rs"), source)?;
    Ok(())
}
