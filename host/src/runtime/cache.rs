//! Compiled plugins cached on disk, so a restart does not pay Cranelift again.
//!
//! The key is the component's SHA-256 plus the engine's compatibility hash (wasmtime version
//! and every setting that changes code generation), so an upgrade or a config change can never
//! load a stale artifact.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Instant;

use wasmtime::component::Component;
use wasmtime::Engine;

use super::RuntimeError;

/// `sha256` is the hex digest of `bytes`, computed once by the caller, which reports it too.
pub(crate) fn load(
    engine: &Engine,
    cache_dir: Option<&Path>,
    origin: &str,
    bytes: &[u8],
    sha256: &str,
) -> Result<(Component, bool), RuntimeError> {
    let start = Instant::now();
    let invalid = |err: wasmtime::Error| RuntimeError::InvalidComponent {
        origin: origin.to_owned(),
        reason: format!("{err:#}"),
    };
    let Some(dir) = cache_dir else {
        let component = Component::new(engine, bytes).map_err(invalid)?;
        log_compiled(origin, start);
        return Ok((component, false));
    };
    let path = entry_path(engine, dir, sha256);
    if path.exists() {
        // SAFETY: the file is one this host wrote (below) with this engine configuration, which
        // the compatibility hash in its name guarantees; wasmtime re-checks the header.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(component) => {
                tracing::info!(
                    plugin = origin,
                    cache = %path.display(),
                    ms = start.elapsed().as_secs_f64() * 1e3,
                    "loaded compiled plugin from cache"
                );
                return Ok((component, true));
            }
            Err(err) => tracing::warn!(
                plugin = origin,
                cache = %path.display(),
                error = %format!("{err:#}"),
                "cached plugin unusable, compiling again"
            ),
        }
    }
    let compiled = engine.precompile_component(bytes).map_err(invalid)?;
    // SAFETY: produced just now by this engine.
    let component = unsafe { Component::deserialize(engine, &compiled) }.map_err(invalid)?;
    log_compiled(origin, start);
    if let Err(err) = store_entry(dir, &path, &compiled) {
        // A read-only or full disk costs the next start a compile, nothing more.
        tracing::warn!(cache = %path.display(), error = %err, "could not cache compiled plugin");
    }
    Ok((component, false))
}

fn log_compiled(origin: &str, start: Instant) {
    tracing::info!(
        plugin = origin,
        ms = start.elapsed().as_secs_f64() * 1e3,
        "compiled plugin"
    );
}

fn entry_path(engine: &Engine, dir: &Path, sha256: &str) -> PathBuf {
    let mut hasher = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    dir.join(format!("{sha256}-{:016x}.cwasm", hasher.finish()))
}

fn store_entry(dir: &Path, path: &Path, compiled: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    // Write then rename: a crash mid-write must not leave a truncated artifact under the key.
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, compiled)?;
    std::fs::rename(&tmp, path)
}
