//! One `projector serve` per SQLite database: an exclusive lock on `projector.lock` in the
//! database's folder (the data dir by default), held for the life of the server.
//!
//! The lock is the kernel's (`flock`), not the file's existence: it goes with the process
//! however it ends, so a server killed with SIGKILL never leaves a stale lock behind. The file
//! is never deleted, because deleting a lock file races with a process that has just opened it.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The file name of the lock in the locked folder.
pub const LOCK_FILE: &str = "projector.lock";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "{path} is locked by another projector serve ({holder}); one server per SQLite database: stop that one first"
    )]
    Held { path: PathBuf, holder: String },
    #[error("cannot lock {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Held while it lives; dropping it (or the process ending) releases the lock.
#[derive(Debug)]
pub struct DataLock {
    path: PathBuf,
    _file: File,
}

impl DataLock {
    /// Takes the lock in `dir` (created if missing), or says who holds it.
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        let path = dir.join(LOCK_FILE);
        // The default data dir is relative: name it so whoever reads the error finds it.
        let path = std::path::absolute(&path).unwrap_or(path);
        let io_err = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io_err)?;
        // Not truncated on open: the holder's pid must survive a second process opening it.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(LockError::Held {
                    holder: holder(&mut file),
                    path,
                })
            }
            Err(TryLockError::Error(source)) => return Err(io_err(source)),
        }
        // The pid is written only once the lock is ours, so it always names the holder (or, for
        // the moment between lock and write, the previous one: `holder` says so).
        file.set_len(0).map_err(io_err)?;
        file.rewind().map_err(io_err)?;
        writeln!(file, "{}", std::process::id()).map_err(io_err)?;
        file.sync_data().map_err(io_err)?;
        tracing::info!(lock = %path.display(), pid = std::process::id(), "data dir locked");
        Ok(Self { path, _file: file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What the lock file says about its holder.
fn holder(file: &mut File) -> String {
    let mut text = String::new();
    match file.read_to_string(&mut text) {
        Ok(_) => match text.trim().parse::<u32>() {
            Ok(pid) => format!("pid {pid}"),
            Err(_) => "pid not yet written: it is starting".into(),
        },
        Err(err) => format!("pid unreadable: {err}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "projector-data-lock-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_second_lock_names_the_holder_and_the_lock_is_free_once_dropped() {
        let dir = tempdir().join("not-yet-made");
        let first = DataLock::acquire(&dir).unwrap();
        assert_eq!(
            std::fs::read_to_string(first.path()).unwrap().trim(),
            std::process::id().to_string()
        );
        // flock locks belong to the open file, so a second open in this process conflicts
        // just as another process would.
        let err = DataLock::acquire(&dir).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains(&format!("pid {}", std::process::id())),
            "{message}"
        );
        assert!(message.contains(LOCK_FILE), "{message}");
        drop(first);
        DataLock::acquire(&dir).unwrap();
    }
}
