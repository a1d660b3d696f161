//! Whether the SQLite store can make an event durable right now: the answer behind `/readyz`
//! and behind every 202.
//!
//! Two kinds of trouble are invisible to SQLite itself, or visible only to the write that
//! meets them:
//!
//! - **The file is no longer the one at the path.** Deleting the database (or its `-wal` or
//!   `-shm` companion) while the store runs leaves SQLite writing, successfully, to an unlinked
//!   inode that nothing will open again; renaming another file over the path does the same. A
//!   commit there is durable only until the process exits. [`FileIdentity`] remembers the
//!   device and inode of the three files as opened; the writer compares them (three `stat`
//!   calls, a few microseconds beside the fsync) before and after every batch that holds an
//!   enqueue, and refuses enqueues while they differ. It never reopens a fresh file by itself:
//!   that would hide the loss of every event still in the old one. Only the original files put
//!   back at the path (same inode, e.g. hard links kept by an operator) or a restart end it.
//! - **Writes fail** (disk full, read-only file system, I/O error, the `max_size_bytes` cap).
//!   [`Health`] records the last write outcome; while it is bad, a readiness check sends one
//!   tiny probe write through the writer, so readiness turns green again as soon as writes
//!   work, even when no traffic arrives to prove it.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// Device and inode of a file, as `stat` reports them.
type Identity = (u64, u64);

#[cfg(unix)]
fn identity_of(path: &Path) -> std::io::Result<Identity> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn identity_of(path: &Path) -> std::io::Result<Identity> {
    // No inode to compare: only a missing file is noticed.
    std::fs::metadata(path).map(|_| (0, 0))
}

/// The database file and its WAL companions as the store opened them.
#[derive(Debug)]
pub struct FileIdentity {
    files: Vec<(PathBuf, Identity)>,
}

/// `path` with `suffix` appended to its file name (`hookyard.db` -> `hookyard.db-wal`).
fn companion(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

impl FileIdentity {
    /// Remembers the identity of `path` and of its `-wal` and `-shm` files. Called once the
    /// writer connection has read the database, so the WAL files exist; one that does not is
    /// not watched.
    pub fn capture(path: &Path) -> std::io::Result<FileIdentity> {
        let mut files = vec![(path.to_path_buf(), identity_of(path)?)];
        for suffix in ["-wal", "-shm"] {
            let p = companion(path, suffix);
            if let Ok(id) = identity_of(&p) {
                files.push((p, id));
            }
        }
        Ok(FileIdentity { files })
    }

    /// `Err(why)` when any of the files is missing from its path or is another file now.
    pub fn check(&self) -> Result<(), String> {
        for (path, id) in &self.files {
            match identity_of(path) {
                Ok(now) if now == *id => {}
                Ok(_) => {
                    return Err(format!(
                        "the database file {} was deleted or replaced while hookyard runs (it \
                         is another file now)",
                        path.display()
                    ))
                }
                Err(e) => {
                    return Err(format!(
                        "the database file {} was deleted or replaced while hookyard runs ({e})",
                        path.display()
                    ))
                }
            }
        }
        Ok(())
    }
}

/// The last write outcome of the store, shared by the writer thread and readiness checks.
#[derive(Debug, Default)]
pub struct Health {
    /// Why the last batch that tried to write failed; `None` once one commits.
    write_error: Mutex<Option<String>>,
    /// Why the last enqueue was refused for room (`max_size_bytes`); `None` once one fits.
    no_room: Mutex<Option<String>>,
}

fn guard(m: &Mutex<Option<String>>) -> MutexGuard<'_, Option<String>> {
    // The value is a plain message: a panic elsewhere cannot leave it half-written.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Health {
    /// Why the store cannot take writes right now, if it cannot.
    pub fn problem(&self) -> Option<String> {
        guard(&self.write_error)
            .clone()
            .or_else(|| guard(&self.no_room).clone())
    }

    /// A batch that tried to write failed with `why`.
    pub fn write_failed(&self, why: &str) {
        let mut state = guard(&self.write_error);
        if state.is_none() {
            tracing::error!(
                error = why,
                "the SQLite store cannot write; events are answered 503 and /readyz is 503 \
                 until a write succeeds again"
            );
        }
        *state = Some(why.to_owned());
    }

    /// A batch that wrote something committed.
    pub fn write_ok(&self) {
        let mut state = guard(&self.write_error);
        if let Some(was) = state.take() {
            tracing::info!(was = %was, "the SQLite store writes again; ready");
        }
    }

    /// The room check for enqueues found room (`None`) or none (`Some(why)`).
    pub fn room(&self, refused: Option<&str>) {
        let mut state = guard(&self.no_room);
        match (refused, state.is_some()) {
            (Some(why), false) => {
                tracing::warn!(
                    reason = why,
                    "the SQLite store is at its size cap; events are answered 503 and /readyz \
                     is 503 until purges or deliveries make room"
                );
                *state = Some(why.to_owned());
            }
            (None, true) => {
                tracing::info!("the SQLite store has room for events again; ready");
                *state = None;
            }
            _ => {}
        }
    }
}

/// The writer's view of [`FileIdentity`]: logs each change between "the file is ours" and
/// "it is gone", once.
#[derive(Debug)]
pub struct IdentityWatch {
    identity: std::sync::Arc<FileIdentity>,
    lost: Option<String>,
}

impl IdentityWatch {
    /// Watches `identity`.
    pub fn new(identity: std::sync::Arc<FileIdentity>) -> Self {
        Self {
            identity,
            lost: None,
        }
    }

    /// Checks the files; `Err(why)` while they are not the ones opened. `pending` is how many
    /// undelivered events the old file holds, for the log line.
    pub fn check(&mut self, pending: u64) -> Result<(), String> {
        match (self.identity.check(), self.lost.is_some()) {
            (Ok(()), false) => Ok(()),
            (Ok(()), true) => {
                tracing::warn!(
                    "the original SQLite database file is back at its path; accepting events \
                     again"
                );
                self.lost = None;
                Ok(())
            }
            (Err(why), was_lost) => {
                if !was_lost {
                    tracing::error!(
                        error = %why,
                        pending_in_old_file = pending,
                        pid = std::process::id(),
                        "the SQLite database file is gone: new events are refused (503) and \
                         /readyz is 503. hookyard does NOT open a fresh file by itself, as that \
                         would hide the loss of the events still in the old one. It keeps \
                         delivering those while this process runs; a RESTART is needed to accept \
                         events again, and starts an empty store. To keep the old events, copy \
                         the deleted file from /proc/<pid>/fd before restarting, or put the \
                         original files back at the path (service resumes by itself then)"
                    );
                }
                self.lost = Some(why.clone());
                Err(why)
            }
        }
    }
}
