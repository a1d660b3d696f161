//! Watches the config file and triggers a reload when it changes.
//!
//! The parent directory is watched, not the file: editors that save through a temp file and
//! rename replace the file's inode, and a deleted-then-recreated file would escape a watch on
//! the file itself. Bursts of events (an editor writes, truncates, renames) are debounced into
//! one reload once the directory has been quiet for [`DEBOUNCE`]. A file that disappears, or is
//! caught half-written, simply fails validation: the old rules keep running and the next event
//! for the file triggers another try.

use std::path::{Path, PathBuf};
use std::time::Duration;

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

/// Starts watching `path`; each debounced change sends one `()` on the returned channel.
pub fn watch(path: &Path) -> notify::Result<(ConfigWatch, mpsc::Receiver<()>)> {
    let file_name = path.file_name().map(|n| n.to_os_string());
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
            .any(|p| p.file_name().map(|n| n.to_os_string()) == file_name);
        if ours {
            let _ = raw_tx.send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    let (tx, rx) = mpsc::channel(1);
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
            // A full channel already holds a pending reload, which will read the newest file.
            let _ = tx.try_send(());
        }
    });
    Ok((ConfigWatch { _watcher: watcher }, rx))
}
