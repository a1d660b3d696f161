//! Watches the config file and triggers a reload when its content changes.
//!
//! The parent directory is watched, not the file: editors that save through a temp file and
//! rename replace the file's inode, and a deleted-then-recreated file would escape a watch on
//! the file itself. A Kubernetes ConfigMap volume never touches the file's own name at all: the
//! file is a symlink through `..data`, and an update swaps `..data` to a new directory. So the
//! names that count are the file's own and the first hop of its symlink target, and a change is
//! the file's *content* hash changing, whatever path led there. Bursts of events (an editor
//! writes, truncates, renames) are debounced into one check once the directory has been quiet
//! for [`DEBOUNCE`]. A file that disappears, or is caught half-written, simply fails
//! validation: the old rules keep running and the next change triggers another try.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use notify::{Event, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Quiet time after the last file event before reloading.
pub const DEBOUNCE: Duration = Duration::from_millis(50);

/// Keeps the OS watch alive; dropping it stops watching.
pub struct ConfigWatch {
    _watcher: RecommendedWatcher,
}

impl std::fmt::Debug for ConfigWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConfigWatch")
    }
}

/// Hex SHA-256 of the file's bytes, `None` when it cannot be read.
fn content_hash(path: &Path) -> Option<String> {
    std::fs::read(path)
        .ok()
        .map(|bytes| hex::encode(Sha256::digest(bytes)))
}

/// The names in the file's directory whose change can change what the path reads: the file
/// itself and, when it is a symlink with a relative target (`..data/config.yaml`), the first
/// component of that target (`..data`).
fn names_that_matter(path: &Path) -> HashSet<OsString> {
    let mut names: HashSet<OsString> = path.file_name().map(OsString::from).into_iter().collect();
    if let Ok(target) = std::fs::read_link(path) {
        if let Some(Component::Normal(first)) = target.components().next() {
            names.insert(first.to_os_string());
        }
    }
    names
}

/// Starts watching `path`, whose content hashed to `loaded_hash` when it was loaded; each
/// debounced change of its content sends one `()` on the returned channel.
pub fn watch(
    path: &Path,
    loaded_hash: Option<String>,
) -> notify::Result<(ConfigWatch, mpsc::Receiver<()>)> {
    let names = names_that_matter(path);
    let dir: PathBuf = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let (raw_tx, mut raw_rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        let ours = event
            .paths
            .iter()
            .any(|p| p.file_name().is_some_and(|n| names.contains(n)));
        if ours {
            let _ = raw_tx.send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    let (tx, rx) = mpsc::channel(1);
    let path = path.to_path_buf();
    let mut last_hash = loaded_hash;
    tokio::spawn(async move {
        while raw_rx.recv().await.is_some() {
            // Debounce: keep absorbing events until the file has been quiet for DEBOUNCE.
            loop {
                match tokio::time::timeout(DEBOUNCE, raw_rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            let hash = content_hash(&path);
            if hash.is_some() && hash == last_hash {
                continue; // touched, or an unrelated change in the directory
            }
            last_hash = hash;
            // A full channel already holds a pending reload, which will read the newest file.
            let _ = tx.try_send(());
        }
    });
    Ok((ConfigWatch { _watcher: watcher }, rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_a_change_of_content_triggers_and_unrelated_names_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, "a: 1\n").unwrap();
        let (_watch, mut changes) = watch(&path, content_hash(&path)).unwrap();
        let quiet = Duration::from_millis(300);

        std::fs::write(&path, "a: 1\n").unwrap();
        std::fs::write(dir.path().join("hookyard.db-wal"), "x").unwrap();
        assert!(
            tokio::time::timeout(quiet, changes.recv()).await.is_err(),
            "the same bytes again, and another file, are no change"
        );

        std::fs::write(&path, "a: 2\n").unwrap();
        assert!(tokio::time::timeout(Duration::from_secs(5), changes.recv())
            .await
            .is_ok());
    }
}
