//! What a component is, read from its header and its type before any of its code runs: a
//! refused upload then says what it got (not WebAssembly, a core module, another world,
//! another contract) instead of relaying a linker error about one function.

use wasmtime::component::Component;
use wasmtime::Engine;

use super::bindings::SUPPORTED_CONTRACTS;
use super::RuntimeError;

/// The package every interface of the contract belongs to.
const PACKAGE: &str = "projector:plugin/";

/// The world a projection exports, and the functions that make it one.
pub(crate) const PROJECTION: &str = "projection";
const PROJECTION_EXPORTS: [&str; 2] = ["describe", "handle"];
pub(crate) const OBSERVER: &str = "observer";
const OBSERVER_EXPORTS: [&str; 2] = ["describe", "on-events"];

/// Refuses bytes that are no component before they reach the compiler, whose error for a core
/// module or a text file would not say what to do.
pub(crate) fn check_header(origin: &str, bytes: &[u8]) -> Result<(), RuntimeError> {
    let refuse = |reason: String| {
        Err(RuntimeError::NotAComponent {
            origin: origin.to_owned(),
            reason,
        })
    };
    let Some(header) = bytes.get(..8) else {
        return refuse(format!(
            "{} bytes are too few for a WebAssembly header",
            bytes.len()
        ));
    };
    if &header[..4] != b"\0asm" {
        return refuse(
            "it does not start with the magic bytes \\0asm of a WebAssembly binary (the text \
             format, an archive or source code will not do)"
                .to_owned(),
        );
    }
    // The header's last two bytes are its layer: 0 a core module, 1 a component.
    match u16::from_le_bytes([header[6], header[7]]) {
        1 => Ok(()),
        0 => refuse(
            "it is a core WebAssembly module, not a component (what wasm32-unknown-unknown \
             and wasm32-wasip1 build)"
                .to_owned(),
        ),
        layer => refuse(format!(
            "its header names layer {layer}, neither a core module (0) nor a component (1)"
        )),
    }
}

/// The contract version the component is built against: the newest version among the
/// `projector:plugin` interfaces it imports or exports, each of which must be one the host
/// binds. `None` when it names no interface of the contract at all.
pub(crate) fn contract(
    engine: &Engine,
    origin: &str,
    component: &Component,
) -> Result<Option<&'static str>, RuntimeError> {
    let ty = component.component_type();
    let names = ty
        .imports(engine)
        .map(|(name, _)| name)
        .chain(ty.exports(engine).map(|(name, _)| name));
    let mut newest: Option<usize> = None;
    for name in names {
        let Some(interface) = name.strip_prefix(PACKAGE) else {
            continue;
        };
        let version = interface.split_once('@').map(|(_, version)| version);
        match version.and_then(|v| SUPPORTED_CONTRACTS.iter().position(|s| *s == v)) {
            Some(index) => newest = newest.max(Some(index)),
            None => {
                return Err(RuntimeError::UnsupportedContract {
                    origin: origin.to_owned(),
                    found: version.unwrap_or("(no version)").to_owned(),
                    interface: name.to_owned(),
                    supported: SUPPORTED_CONTRACTS,
                })
            }
        }
    }
    Ok(newest.and_then(|index| SUPPORTED_CONTRACTS.get(index).copied()))
}

/// The names the component exports, in its order.
pub(crate) fn exports(engine: &Engine, component: &Component) -> Vec<String> {
    component
        .component_type()
        .exports(engine)
        .map(|(name, _)| name.to_owned())
        .collect()
}

/// Which of the contract's worlds the exports look like (by name; the types are the linker's
/// to check).
pub(crate) fn world_of(exports: &[String]) -> Option<&'static str> {
    let has_all = |wanted: &[&str]| wanted.iter().all(|w| exports.iter().any(|e| e == w));
    if has_all(&PROJECTION_EXPORTS) {
        Some(PROJECTION)
    } else if has_all(&OBSERVER_EXPORTS) {
        Some(OBSERVER)
    } else {
        None
    }
}

/// The world a component exports (projection or observer); refuses one that exports
/// neither, naming what it exports.
pub(crate) fn check_world(origin: &str, exports: &[String]) -> Result<&'static str, RuntimeError> {
    match world_of(exports) {
        Some(world) => Ok(world),
        world => Err(RuntimeError::WrongWorld {
            origin: origin.to_owned(),
            exports: exports.to_vec(),
            reason: exports_reason(world, exports),
        }),
    }
}

/// "it exports `a`, `b` (the observer world)", or that it exports nothing.
pub(crate) fn exports_reason(world: Option<&str>, exports: &[String]) -> String {
    if exports.is_empty() {
        return "it exports nothing".to_owned();
    }
    let names = exports
        .iter()
        .map(|e| format!("`{e}`"))
        .collect::<Vec<_>>()
        .join(", ");
    match world {
        Some(world) => format!("it exports {names} (the {world} world)"),
        None => format!("it exports {names}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(result: Result<(), RuntimeError>) -> &'static str {
        result.err().map(|e| e.code()).unwrap_or("ok")
    }

    #[test]
    fn the_header_tells_a_component_from_a_module_and_from_anything_else() {
        assert_eq!(code(check_header("x", b"\0asm\x0d\x00\x01\x00")), "ok");
        assert_eq!(
            code(check_header("x", b"\0asm\x01\x00\x00\x00")),
            "not_a_component"
        );
        assert_eq!(code(check_header("x", b"\0asm")), "not_a_component");
        assert_eq!(code(check_header("x", b"(component)")), "not_a_component");
        let err = check_header("m.wasm", b"\0asm\x01\x00\x00\x00").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("core WebAssembly module"), "{text}");
        assert!(text.contains("--target wasm32-wasip2"), "{text}");
    }

    #[test]
    fn exports_name_their_world() {
        let names = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(world_of(&names(&["describe", "handle"])), Some(PROJECTION));
        assert_eq!(world_of(&names(&["on-events", "describe"])), Some(OBSERVER));
        assert_eq!(world_of(&names(&["describe"])), None);
        assert_eq!(
            check_world("o.wasm", &names(&["describe", "on-events"])).unwrap(),
            OBSERVER
        );
        let err = check_world("d.wasm", &names(&["describe"])).unwrap_err();
        assert_eq!(err.code(), "wrong_world");
        let text = err.to_string();
        assert!(text.contains("`describe`"), "{text}");
        assert!(text.contains("`on-events`"), "{text}");
        let err = check_world("e.wasm", &[]).unwrap_err();
        assert!(err.to_string().contains("exports nothing"), "{err}");
    }
}
