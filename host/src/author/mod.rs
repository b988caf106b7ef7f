//! The plugin author's commands: `projector new` writes a plugin crate that builds and tests as
//! written; `projector build` turns a plugin crate into a component and says what it declares.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::runtime::{Limits, Plugin, Runtime, RuntimeConfig, RuntimeError};

#[derive(Debug, thiserror::Error)]
pub enum AuthorError {
    #[error(
        "{0:?} is not a plugin name: use lowercase letters, digits, `-` and `_`, starting with a \
         letter (it names the crate and the projection)"
    )]
    BadName(String),
    #[error("{0} exists already: choose another name or remove it")]
    Exists(PathBuf),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no Cargo.toml in {0}: run `projector build` in a plugin crate (or name its folder)")]
    NoCrate(PathBuf),
    #[error("cannot run {program}: {source}; install Rust with rustup (https://rustup.rs)")]
    Tool {
        program: String,
        source: std::io::Error,
    },
    #[error("{what} failed ({status}); its output is above")]
    Failed {
        what: String,
        status: std::process::ExitStatus,
    },
    #[error("cargo metadata for {dir}: {reason}")]
    Metadata { dir: PathBuf, reason: String },
    #[error("the build wrote no {0}: is the crate's `crate-type` [\"cdylib\", \"rlib\"]?")]
    NoComponent(PathBuf),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// Where a new crate gets the SDK from.
#[derive(Debug, Clone)]
pub enum Sdk {
    Path(PathBuf),
    /// The published crate, by version.
    Version(String),
}

impl Sdk {
    /// `PROJECTOR_SDK` (a path), else the SDK of the checkout this binary was built from when
    /// it is still there, else the published crate of the contract this host binds.
    pub fn locate() -> Self {
        if let Some(path) = std::env::var_os("PROJECTOR_SDK") {
            return Self::Path(PathBuf::from(path));
        }
        let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/sdk");
        match built_from.canonicalize() {
            Ok(path) if path.join("Cargo.toml").is_file() => Self::Path(path),
            _ => Self::Version(
                crate::runtime::SUPPORTED_CONTRACTS
                    .last()
                    .copied()
                    .unwrap_or("0.1")
                    .to_owned(),
            ),
        }
    }

    fn dependency(&self) -> String {
        match self {
            // TOML basic strings: a Windows path's backslashes need escaping.
            Self::Path(path) => format!(
                "{{ path = \"{}\" }}",
                path.display().to_string().replace('\\', "\\\\")
            ),
            Self::Version(version) => format!("\"{version}\""),
        }
    }
}

/// Writes the crate `dir/<name>` (a projection, or an observer) and returns its folder.
pub fn new_plugin(
    parent: &Path,
    name: &str,
    observer: bool,
    sdk: &Sdk,
) -> Result<PathBuf, AuthorError> {
    let valid = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !valid {
        return Err(AuthorError::BadName(name.to_owned()));
    }
    let dir = parent.join(name);
    if dir.exists() {
        return Err(AuthorError::Exists(dir));
    }
    let type_name: String = name
        .split(['-', '_'])
        .map(|part| {
            let mut chars = part.chars();
            match chars.next() {
                Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
                None => String::new(),
            }
        })
        .collect();
    let fill = |template: &str| {
        template
            .replace("{{name}}", name)
            .replace("{{type}}", &type_name)
            .replace("{{sdk}}", &sdk.dependency())
            .replace("{{kind}}", if observer { "observer" } else { "projection" })
    };
    let lib = if observer {
        include_str!("observer.rs.tmpl")
    } else {
        include_str!("projection.rs.tmpl")
    };
    let files = [
        ("Cargo.toml", fill(include_str!("Cargo.toml.tmpl"))),
        ("src/lib.rs", fill(lib)),
        ("events.jsonl", include_str!("events.jsonl.tmpl").to_owned()),
        ("README.md", fill(include_str!("README.md.tmpl"))),
        (".gitignore", "/target\n".to_owned()),
    ];
    for (file, text) in files {
        let path = dir.join(file);
        let write = |source| AuthorError::Write {
            path: path.clone(),
            source,
        };
        if let Some(folder) = path.parent() {
            std::fs::create_dir_all(folder).map_err(write)?;
        }
        std::fs::write(&path, text).map_err(write)?;
    }
    Ok(dir)
}

/// A built component and what it declares.
pub struct Built {
    pub path: PathBuf,
    pub bytes: u64,
    pub plugin: Plugin,
}

/// Builds the crate in `dir` for wasm32-wasip2 (adding the target first if rustup can), then
/// loads the component as the host would: a component the host would refuse fails here.
pub fn build_plugin(dir: &Path, cache_dir: Option<PathBuf>) -> Result<Built, AuthorError> {
    let manifest = dir.join("Cargo.toml");
    if !manifest.is_file() {
        return Err(AuthorError::NoCrate(dir.to_owned()));
    }
    add_wasm_target()?;
    run(
        Command::new("cargo")
            .args([
                "build",
                "--release",
                "--target",
                "wasm32-wasip2",
                "--manifest-path",
            ])
            .arg(&manifest),
        "cargo build --release --target wasm32-wasip2",
    )?;
    let path = component_path(&manifest)?;
    let bytes = std::fs::metadata(&path)
        .map_err(|_| AuthorError::NoComponent(path.clone()))?
        .len();
    let runtime = Runtime::new(RuntimeConfig {
        limits: Limits::default(),
        cache_dir,
        ..Default::default()
    })?;
    let plugin = runtime.load_file(&path)?;
    Ok(Built {
        path,
        bytes,
        plugin,
    })
}

/// `rustup target add wasm32-wasip2` when rustup is there and the target is not (idempotent);
/// without rustup the build says what is missing.
fn add_wasm_target() -> Result<(), AuthorError> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output();
    match installed {
        Ok(out) if String::from_utf8_lossy(&out.stdout).contains("wasm32-wasip2") => Ok(()),
        Ok(_) => run(
            Command::new("rustup").args(["target", "add", "wasm32-wasip2"]),
            "rustup target add wasm32-wasip2",
        ),
        Err(_) => Ok(()),
    }
}

fn run(command: &mut Command, what: &str) -> Result<(), AuthorError> {
    let program = command.get_program().to_string_lossy().into_owned();
    let status = command
        .status()
        .map_err(|source| AuthorError::Tool { program, source })?;
    if status.success() {
        Ok(())
    } else {
        Err(AuthorError::Failed {
            what: what.to_owned(),
            status,
        })
    }
}

/// Where cargo put the crate's component: its target directory (which a workspace or
/// `CARGO_TARGET_DIR` may move), `wasm32-wasip2/release/<crate name>.wasm`.
fn component_path(manifest: &Path) -> Result<PathBuf, AuthorError> {
    let dir = manifest.parent().unwrap_or(Path::new(".")).to_owned();
    let metadata = |reason: String| AuthorError::Metadata {
        dir: dir.clone(),
        reason,
    };
    let out = Command::new("cargo")
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--manifest-path",
        ])
        .arg(manifest)
        .output()
        .map_err(|source| AuthorError::Tool {
            program: "cargo".into(),
            source,
        })?;
    if !out.status.success() {
        return Err(metadata(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| metadata(e.to_string()))?;
    let target = meta["target_directory"]
        .as_str()
        .ok_or_else(|| metadata("no target_directory".into()))?;
    let canonical = manifest
        .canonicalize()
        .unwrap_or_else(|_| manifest.to_owned());
    let package = meta["packages"]
        .as_array()
        .and_then(|packages| {
            packages.iter().find(|p| {
                p["manifest_path"]
                    .as_str()
                    .is_some_and(|m| Path::new(m) == canonical)
            })
        })
        .or_else(|| meta["packages"].get(0))
        .ok_or_else(|| metadata("no package in the crate".into()))?;
    let name = package["name"]
        .as_str()
        .ok_or_else(|| metadata("a package without a name".into()))?;
    Ok(Path::new(target)
        .join("wasm32-wasip2/release")
        .join(format!("{}.wasm", name.replace('-', "_"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_crate_names_its_type_and_refuses_bad_names() {
        let dir = std::env::temp_dir().join(format!("projector-new-{}", uuid::Uuid::new_v4()));
        let sdk = Sdk::Version("0.1.2".into());
        let crate_dir = new_plugin(&dir, "order-summary", false, &sdk).unwrap();
        let lib = std::fs::read_to_string(crate_dir.join("src/lib.rs")).unwrap();
        assert!(lib.contains("pub struct OrderSummary;"), "{lib}");
        assert!(lib.contains("Descriptor::new(\"order-summary\""), "{lib}");
        let toml = std::fs::read_to_string(crate_dir.join("Cargo.toml")).unwrap();
        assert!(toml.contains("projector-sdk = \"0.1.2\""), "{toml}");
        assert!(
            toml.contains("crate-type = [\"cdylib\", \"rlib\"]"),
            "{toml}"
        );
        assert!(matches!(
            new_plugin(&dir, "order-summary", false, &sdk),
            Err(AuthorError::Exists(_))
        ));
        for bad in ["Order", "9lives", "a b", "", "x/y"] {
            assert!(
                matches!(
                    new_plugin(&dir, bad, true, &sdk),
                    Err(AuthorError::BadName(_))
                ),
                "{bad:?}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
