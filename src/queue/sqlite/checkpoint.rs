//! WAL checkpoints, mostly away from the writer thread.
//!
//! SQLite's default (`wal_autocheckpoint`) runs a checkpoint inside the commit that takes the
//! WAL past 1000 pages: the writer copies those pages into the database file and fsyncs it
//! while every caller of that batch, and every job queued behind it, waits. That was about 10%
//! of the writer thread during accepts. Here the writer only notes the WAL's length after each
//! commit (a WAL hook) and, every [`SqliteOptions::checkpoint_frames`] new frames, nudges a
//! checkpointer thread with a connection of its own, which runs `wal_checkpoint(PASSIVE)`
//! while the writer carries on.
//!
//! # The bound
//!
//! A background checkpoint copies frames, but only the writer can start the WAL over from
//! its beginning, and SQLite does so only when a write transaction begins after *every* frame
//! was copied. Under steady load the writer has always appended more by the time a background
//! checkpoint finishes, so the WAL would never restart and would grow without bound. The
//! writer therefore checkpoints itself, between two batches, once the WAL holds
//! [`FORCE_FACTOR`] times `checkpoint_frames` frames: nothing is appended while it runs, so it
//! copies what the checkpointer has not (little, if the checkpointer keeps up) and the next
//! batch restarts the WAL. The WAL thus never holds much more than `FORCE_FACTOR *
//! checkpoint_frames` frames plus one batch, whether or not the checkpointer runs at all (as
//! with `wal_autocheckpoint`, a reader holding an old snapshot can still delay the restart).
//! After a restart, `journal_size_limit` truncates the file.
//!
//! # Durability
//!
//! The checkpointer's connection uses the writer's `synchronous` level, so a checkpoint
//! fsyncs the database file before the writer may overwrite the frames it copied.

use std::cell::Cell;
use std::os::raw::c_int;
use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;

use rusqlite::hooks::Wal;
use rusqlite::Connection;

use super::connect::apply_common_pragmas;
use super::SqliteOptions;
use crate::queue::StoreError;

/// The writer checkpoints itself once the WAL holds this many times
/// [`SqliteOptions::checkpoint_frames`] frames.
pub const FORCE_FACTOR: u32 = 4;

thread_local! {
    /// Frames in the WAL after the last commit on this thread's connection, as reported by
    /// SQLite's WAL hook. Thread-local because the hook is a plain function and each store's
    /// writer connection lives on (and commits from) its own thread.
    static WAL_FRAMES: Cell<u32> = const { Cell::new(0) };
}

fn record_wal_frames(_: &Wal, frames: c_int) -> rusqlite::Result<()> {
    WAL_FRAMES.set(u32::try_from(frames).unwrap_or(0));
    Ok(())
}

/// Runs a passive checkpoint; returns (frames in the WAL, frames copied to the database).
fn checkpoint(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get(1)?, r.get(2)?))
    })
}

/// The writer's side: decides after each batch whether to nudge the checkpointer or to
/// checkpoint itself.
pub struct Checkpoints {
    every: u32,
    force_at: u32,
    /// `None` when background checkpoints are off (only the writer's bound then applies).
    nudge: Option<mpsc::SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
    /// WAL length at the last nudge.
    nudged_at: u32,
}

impl Checkpoints {
    /// Installs the WAL hook on the writer connection (which also turns SQLite's automatic
    /// checkpoints off) and starts the checkpointer thread if `options` ask for it.
    pub fn start(
        writer: &Connection,
        path: &Path,
        options: &SqliteOptions,
    ) -> Result<Checkpoints, StoreError> {
        writer.wal_hook(Some(record_wal_frames));
        let every = options.checkpoint_frames.max(1);
        let mut checkpoints = Checkpoints {
            every,
            force_at: every.saturating_mul(FORCE_FACTOR),
            nudge: None,
            thread: None,
            nudged_at: 0,
        };
        if options.background_checkpoints {
            let conn = Connection::open(path)?;
            apply_common_pragmas(&conn, options)?;
            let sync = if options.fsync { "FULL" } else { "OFF" };
            conn.pragma_update(None, "synchronous", sync)?;
            // One pending nudge is enough: the checkpoint it starts copies everything so far.
            let (tx, rx) = mpsc::sync_channel::<()>(1);
            // Not `hookyard-sqlite-...`: thread names are cut to 15 bytes in /proc, and
            // profiles find the writer by that prefix.
            let thread = std::thread::Builder::new()
                .name("hookyard-wal-checkpointer".into())
                .spawn(move || checkpointer_loop(conn, rx))
                .map_err(|e| {
                    StoreError::Unavailable(format!("cannot start checkpointer thread: {e}"))
                })?;
            checkpoints.nudge = Some(tx);
            checkpoints.thread = Some(thread);
        }
        Ok(checkpoints)
    }

    /// Called by the writer between batches.
    pub fn after_batch(&mut self, writer: &Connection) {
        let frames = WAL_FRAMES.get();
        if frames < self.nudged_at {
            // The WAL started over.
            self.nudged_at = 0;
        }
        if frames >= self.force_at {
            match checkpoint(writer) {
                Ok((log, copied)) => tracing::debug!(log, copied, "writer checkpointed the WAL"),
                Err(e) => tracing::warn!(error = %e, "sqlite WAL checkpoint failed"),
            }
            // Checked again after the next commit, which starts the WAL over if this one
            // copied everything.
            WAL_FRAMES.set(0);
            self.nudged_at = 0;
        } else if frames >= self.nudged_at.saturating_add(self.every) {
            if let Some(nudge) = &self.nudge {
                // Full means a nudge is already pending; Disconnected cannot happen before
                // `stop` (the checkpointer exits only when this sender is dropped).
                let _ = nudge.try_send(());
                self.nudged_at = frames;
            }
        }
    }

    /// Stops the checkpointer thread (after its current checkpoint, if any).
    pub fn stop(&mut self) {
        self.nudge = None;
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("sqlite checkpointer thread panicked");
            }
        }
    }
}

impl Drop for Checkpoints {
    fn drop(&mut self) {
        self.stop();
    }
}

fn checkpointer_loop(conn: Connection, nudges: mpsc::Receiver<()>) {
    while nudges.recv().is_ok() {
        if let Err(e) = checkpoint(&conn) {
            tracing::warn!(error = %e, "background sqlite WAL checkpoint failed");
        }
    }
    if let Err((_, e)) = conn.close() {
        tracing::warn!(error = %e, "closing the sqlite checkpoint connection failed");
    }
}
