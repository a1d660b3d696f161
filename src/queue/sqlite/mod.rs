//! The embedded default [`Store`](super::Store): one SQLite file in WAL mode.
//!
//! # Shape
//!
//! - **One writer thread** (`hookyard-sqlite-writer`) owns the only write connection. Every
//!   mutation (enqueue, claim, complete, release, replay, purge) is a job sent to it over a
//!   channel and answered through a `tokio::sync::oneshot`. The writer takes whatever is queued
//!   (up to [`SqliteOptions::max_batch`]) and runs it in **one transaction with one fsync**
//!   (group commit). One failing job does not fail its neighbours: rare jobs run inside a
//!   savepoint of their own, and the hot ones (enqueue, claim, delivery result) are refused,
//!   if at all, before they write (see `JobKind::needs_savepoint`).
//! - **Reads** (`event`, `list_dead_letters`, `fallbacks`, `stats`, `find_idempotent`,
//!   `next_due_at`, `ping`) run on a small pool of read-only connections via
//!   `tokio::task::spawn_blocking`; WAL lets them run while the writer commits, so a slow admin
//!   query never delays an enqueue.
//!
//! # Invariants
//!
//! - A job's reply is sent only after the transaction holding it has committed (with
//!   `synchronous=FULL`, after the WAL is fsynced). A reply of `Accepted` therefore means
//!   durable, and a `Duplicate` never points at an event whose commit later failed.
//! - If the commit fails, every job of the batch is answered `Unavailable` and the writer's
//!   in-memory state (queue depth counters) is rolled back with it. If SQLite aborts the
//!   transaction part-way (disk full, I/O error), the jobs already run are answered
//!   `Unavailable` and the jobs not yet run lead the next batch.
//! - The channel is unbounded but each caller has at most one job outstanding (it awaits the
//!   reply), so its length is bounded by the number of concurrent callers.
//! - `events.due_at` is the time the event next becomes claimable: the retry/first-attempt time
//!   while `pending`, the lease expiry while `in_flight`, NULL once finished. Claiming is then
//!   two range scans of the `(queue, state, due_at)` index, never a table scan.
//! - The per-queue depth counter (pending + in flight) lives only in the writer thread, is
//!   loaded at open, and changes only with committed transactions.
//! - Only the writer thread writes (read connections are `query_only`), which is what makes
//!   the in-memory depth counters and the lease checks trustworthy.
//! - A promise of durability is made only for the files this store opened: a batch holding an
//!   enqueue checks their device and inode before it runs (changed: its enqueues are refused
//!   with `Unavailable` before they write, the rest of the batch carries on) and just after its
//!   COMMIT (changed meanwhile: its enqueues get `OutcomeUnknown`). Deliveries of what the old
//!   file holds carry on. See the `health` module, which also keeps the last write outcome that
//!   `ping` (readiness) reports.
//! - Nothing here panics on I/O trouble: SQLite errors become [`StoreError::Unavailable`],
//!   undecodable rows [`StoreError::Corrupt`], malformed DLQ cursors
//!   [`StoreError::InvalidInput`], and calls after [`Queue::close`] [`StoreError::Closed`].
//! - The returned futures must be polled inside a Tokio runtime (reads use `spawn_blocking`).
//!
//! # Files
//!
//! This file holds the handle ([`SqliteStore`], [`SqliteOptions`]), opening and closing, and
//! the [`Queue`] and [`Ledger`] impls that send each call to the writer or a read connection.
//! The rest: `sql` (statement text), `connect` (opening connections), `writer` (the writer
//! thread and group commit), `tx` (the write transactions), `reads` (the read queries), `rows`
//! (value decoding), and `schema`, `checkpoint`, `health`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::oneshot;

mod checkpoint;
mod connect;
mod health;
mod reads;
mod rows;
mod schema;
mod sql;
#[cfg(test)]
mod tests;
mod tx;
mod writer;

pub use schema::SCHEMA_VERSION;

use connect::{load_depths, open_reader, open_writer};
use reads::{read_dead_letters, read_event, read_fallbacks, read_stats};
use sql::NEXT_DUE;
use tx::{tx_claim, tx_complete, tx_enqueue, tx_purge_chunk, tx_release, tx_replay, tx_undefer};
use writer::{writer_loop, Job, JobKind, WriteJob, WriterState};

use super::{
    AttemptRecord, ClaimedEvent, Completion, DeadLetter, Disposition, DlqFilter, EnqueueOutcome,
    EventRecord, FallbackRecord, IdempotencyClaim, Ledger, NewEvent, Page, Queue, QueueStats,
    StoreError, StoreFuture, UnixMillis,
};

/// Histogram of how many enqueues shared one transaction (one fsync).
pub const ENQUEUE_BATCH_SIZE_METRIC: &str = "hookyard_enqueue_batch_size";

/// Rows handled per purge / replay step, so a large purge is many short transactions that
/// enqueues can interleave with instead of one long one that stalls ingress.
const MAINTENANCE_CHUNK: usize = 1000;

/// Tuning for [`SqliteStore::open`].
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// fsync every commit (`synchronous=FULL`), so an acknowledged enqueue survives power loss.
    /// `false` sets `synchronous=OFF`: only for measuring what fsync costs, never in production.
    pub fsync: bool,
    /// Most write jobs folded into one transaction.
    pub max_batch: usize,
    /// Read connections kept open between reads (more are opened under load, then dropped).
    pub read_pool: usize,
    /// How long a statement waits for a lock held by another connection before failing.
    pub busy_timeout: Duration,
    /// Upper bound on the database size. Writes that would grow the file past it fail with
    /// [`StoreError::Unavailable`] (ingress answers 503) instead of filling the disk that the
    /// service next to the sidecar also needs. `None`: bounded only by the disk.
    pub max_size_bytes: Option<u64>,
    /// WAL frames (pages) written between two checkpoints; the writer checkpoints itself, and
    /// so bounds the WAL, at 4 times this (see the `checkpoint` module).
    pub checkpoint_frames: u32,
    /// Run checkpoints on a thread of their own instead of the writer's. `false` is for tests
    /// of the writer's bound: the writer then checkpoints only at that bound.
    pub background_checkpoints: bool,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            fsync: true,
            max_batch: 512,
            read_pool: 4,
            busy_timeout: Duration::from_secs(5),
            max_size_bytes: None,
            checkpoint_frames: 1000,
            background_checkpoints: true,
        }
    }
}

impl SqliteOptions {
    /// The same options with fsync turned off (`synchronous=OFF`); for benchmarks only.
    pub fn without_fsync(mut self) -> Self {
        self.fsync = false;
        self
    }
}

/// The SQLite-backed [`Store`](super::Store). Cheap to clone: clones share one writer thread
/// and read pool.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    options: SqliteOptions,
    closed: AtomicBool,
    /// Taken (dropped) by `close`; the writer exits once it has drained the channel.
    writer_tx: Mutex<Option<mpsc::Sender<Box<dyn Job>>>>,
    writer_thread: Mutex<Option<JoinHandle<()>>>,
    readers: Mutex<Vec<Connection>>,
    commits: Arc<AtomicU64>,
    /// The files as opened, so a readiness check notices them deleted or replaced.
    identity: Arc<health::FileIdentity>,
    /// The writer's last write outcome.
    health: Arc<health::Health>,
    /// A readiness probe write is queued or running: `/readyz` needs no token, so a burst of
    /// probes must not become a burst of writes.
    probing: AtomicBool,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .field("options", &self.inner.options)
            .field("closed", &self.inner.closed.load(Ordering::Relaxed))
            .finish()
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match e {
            // A value that does not decode means the file holds something this code did not
            // write: report corruption rather than a transient outage.
            rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::IntegralValueOutOfRange(..) => StoreError::Corrupt(e.to_string()),
            other => StoreError::Unavailable(other.to_string()),
        }
    }
}

fn io_unavailable(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Unavailable(format!("{what} {}: {e}", path.display()))
}

fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>, StoreError> {
    m.lock()
        .map_err(|_| StoreError::Unavailable("sqlite store lock poisoned".into()))
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, its parent directories and schema,
    /// and starts the writer thread.
    ///
    /// Fails with [`StoreError::Unavailable`] when the file cannot be created or opened, and
    /// [`StoreError::Corrupt`] when it holds a schema version this build does not know.
    pub fn open(path: &Path, options: SqliteOptions) -> Result<SqliteStore, StoreError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| io_unavailable("cannot create directory", parent, e))?;
        }
        let (mut writer, enqueue_page_limit) = open_writer(path, &options)?;
        schema::ensure(&mut writer)?;
        let depths = load_depths(&writer)?;
        // Open one reader now so a broken read path shows up at startup, not on first use.
        let reader = open_reader(path, &options)?;
        let checkpoints = checkpoint::Checkpoints::start(&writer, path, &options)?;
        // After the reads above, so the WAL and shared-memory files exist and are watched too.
        let identity = Arc::new(
            health::FileIdentity::capture(path)
                .map_err(|e| io_unavailable("cannot stat", path, e))?,
        );
        let health = Arc::new(health::Health::default());
        let mut state = WriterState::new(depths, enqueue_page_limit);
        state.health = Arc::clone(&health);
        state.identity = Some(health::IdentityWatch::new(Arc::clone(&identity)));

        let (tx, rx) = mpsc::channel::<Box<dyn Job>>();
        let commits = Arc::new(AtomicU64::new(0));
        let max_batch = options.max_batch.max(1);
        let fsync = options.fsync;
        let thread_commits = Arc::clone(&commits);
        let handle = std::thread::Builder::new()
            .name("hookyard-sqlite-writer".into())
            .spawn(move || {
                writer_loop(
                    writer,
                    checkpoints,
                    rx,
                    state,
                    max_batch,
                    fsync,
                    &thread_commits,
                )
            })
            .map_err(|e| StoreError::Unavailable(format!("cannot start writer thread: {e}")))?;

        Ok(SqliteStore {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                options,
                closed: AtomicBool::new(false),
                writer_tx: Mutex::new(Some(tx)),
                writer_thread: Mutex::new(Some(handle)),
                readers: Mutex::new(vec![reader]),
                commits,
                identity,
                health,
                probing: AtomicBool::new(false),
            }),
        })
    }

    /// The database file this store was opened on.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The options this store was opened with.
    pub fn options(&self) -> &SqliteOptions {
        &self.inner.options
    }

    /// Number of write transactions committed since open. With group commit this grows more
    /// slowly than the number of writes; tests and benchmarks use it to see batching happen.
    pub fn commits(&self) -> u64 {
        self.inner.commits.load(Ordering::Relaxed)
    }

    fn check_open(&self) -> Result<(), StoreError> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(StoreError::Closed)
        } else {
            Ok(())
        }
    }

    /// The error for a job whose reply never came: closed if we are shutting down, otherwise
    /// the writer thread died (which it should not: it never panics on SQLite errors).
    fn writer_gone(&self) -> StoreError {
        if self.inner.closed.load(Ordering::Acquire) {
            StoreError::Closed
        } else {
            StoreError::Unavailable("sqlite writer thread stopped".into())
        }
    }

    /// Runs `f` on the writer thread inside the current batch transaction.
    async fn write<T, F>(&self, kind: JobKind, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &mut WriterState) -> Result<T, StoreError> + Send + 'static,
    {
        self.check_open()?;
        let (reply, rx) = oneshot::channel();
        {
            let guard = lock(&self.inner.writer_tx)?;
            let sender = guard.as_ref().ok_or(StoreError::Closed)?;
            sender
                .send(Box::new(WriteJob { f, reply, kind }))
                .map_err(|_| self.writer_gone())?;
        }
        rx.await.map_err(|_| self.writer_gone())?
    }

    /// Runs `f` on a pooled read connection on the blocking thread pool.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.check_open()?;
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let pooled = lock(&inner.readers)?.pop();
            let mut conn = match pooled {
                Some(c) => c,
                None => open_reader(&inner.path, &inner.options)?,
            };
            let result = f(&mut conn);
            // A connection that just failed with an I/O-class error is not trusted again; a
            // fresh one is opened next time. After close, connections are not pooled.
            let healthy = !matches!(result, Err(StoreError::Unavailable(_)));
            if healthy && !inner.closed.load(Ordering::Acquire) {
                let mut pool = lock(&inner.readers)?;
                if pool.len() < inner.options.read_pool {
                    pool.push(conn);
                }
            }
            result
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("sqlite read task failed: {e}")))?
    }
}

/// Clears a flag when dropped.
struct ClearOnDrop<'a>(&'a AtomicBool);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

// ---------------------------------------------------------------------------------------------
// The trait

impl SqliteStore {
    /// A delivery result as one writer job; with `take_next_until`, also the hand-over of the
    /// event's ordering key to its next event (see [`Queue::complete_and_take_next`]).
    fn record_result(
        &self,
        event_id: &str,
        lease_token: &str,
        attempt: Option<AttemptRecord>,
        disposition: Disposition,
        now_ms: UnixMillis,
        take_next_until: Option<UnixMillis>,
    ) -> impl std::future::Future<Output = Result<Completion, StoreError>> + Send + '_ {
        let (event_id, lease_token) = (event_id.to_owned(), lease_token.to_owned());
        self.write(JobKind::Delivery, move |conn, ws| {
            tx_complete(
                conn,
                ws,
                &event_id,
                &lease_token,
                attempt,
                disposition,
                now_ms,
                take_next_until,
            )
        })
    }
}

impl Queue for SqliteStore {
    fn enqueue(
        &self,
        event: NewEvent,
        idempotency: Option<IdempotencyClaim>,
        max_depth: u64,
    ) -> StoreFuture<'_, EnqueueOutcome> {
        Box::pin(self.write(JobKind::Enqueue, move |conn, ws| {
            tx_enqueue(conn, ws, &event, idempotency.as_ref(), max_depth)
        }))
    }

    fn find_idempotent(
        &self,
        event_type: &str,
        key: &str,
        now_ms: UnixMillis,
    ) -> StoreFuture<'_, Option<String>> {
        let (event_type, key) = (event_type.to_owned(), key.to_owned());
        Box::pin(self.read(move |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT event_id FROM idempotency
                     WHERE event_type = ?1 AND key = ?2 AND expires_at > ?3",
                )?
                .query_row(params![event_type, key, now_ms], |r| r.get(0))
                .optional()?)
        }))
    }

    fn claim_due(
        &self,
        queue: &str,
        now_ms: UnixMillis,
        limit: usize,
        lease_ms: u64,
    ) -> StoreFuture<'_, Vec<ClaimedEvent>> {
        let queue = queue.to_owned();
        Box::pin(self.write(JobKind::Delivery, move |conn, ws| {
            tx_claim(conn, ws, &queue, now_ms, limit, lease_ms)
        }))
    }

    fn next_due_at(&self, queue: &str) -> StoreFuture<'_, Option<UnixMillis>> {
        let queue = queue.to_owned();
        Box::pin(self.read(move |conn| {
            Ok(conn
                .prepare_cached(NEXT_DUE)?
                .query_row(params![queue], |r| r.get(0))?)
        }))
    }

    fn complete(
        &self,
        event_id: &str,
        lease_token: &str,
        attempt: Option<AttemptRecord>,
        disposition: Disposition,
        now_ms: UnixMillis,
    ) -> StoreFuture<'_, bool> {
        let done = self.record_result(event_id, lease_token, attempt, disposition, now_ms, None);
        Box::pin(async move { Ok(done.await?.recorded) })
    }

    fn complete_and_take_next(
        &self,
        event_id: &str,
        lease_token: &str,
        attempt: Option<AttemptRecord>,
        disposition: Disposition,
        now_ms: UnixMillis,
        lease_ms: u64,
    ) -> StoreFuture<'_, Completion> {
        let until = now_ms.saturating_add(i64::try_from(lease_ms).unwrap_or(i64::MAX));
        Box::pin(self.record_result(
            event_id,
            lease_token,
            attempt,
            disposition,
            now_ms,
            Some(until),
        ))
    }

    fn undefer(&self, host: &str, now_ms: UnixMillis) -> StoreFuture<'_, u64> {
        let host = host.to_owned();
        Box::pin(self.write(JobKind::Other, move |conn, _| {
            tx_undefer(conn, Some(&host), now_ms)
        }))
    }

    fn undefer_all(&self, now_ms: UnixMillis) -> StoreFuture<'_, u64> {
        Box::pin(self.write(JobKind::Other, move |conn, _| {
            tx_undefer(conn, None, now_ms)
        }))
    }

    fn release(&self, leases: Vec<(String, String)>, now_ms: UnixMillis) -> StoreFuture<'_, ()> {
        Box::pin(self.write(JobKind::Other, move |conn, _| {
            tx_release(conn, &leases, now_ms)
        }))
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let writer_alive = lock(&self.inner.writer_thread)?
                .as_ref()
                .is_some_and(|h| !h.is_finished());
            if !writer_alive {
                return Err(self.writer_gone());
            }
            // Ready means an enqueue would be durable now, not merely that the file answers a
            // read: a deleted file still does (through the connections holding it open).
            self.inner
                .identity
                .check()
                .map_err(StoreError::Unavailable)?;
            if let Some(problem) = self.inner.health.problem() {
                // The last write failed. Try one now rather than wait for traffic to prove the
                // store well again: a store kept out of rotation would never see any. One
                // probe at a time; checks meanwhile report the last known problem.
                if self.inner.probing.swap(true, Ordering::AcqRel) {
                    return Err(StoreError::Unavailable(problem));
                }
                // Cleared on drop too: a check abandoned mid-probe (its client went away)
                // must not leave every later check without one.
                let _probing = ClearOnDrop(&self.inner.probing);
                let probe = self
                    .write(JobKind::Probe, |conn, ws| {
                        ws.check_room(conn)?;
                        // Rewrites the header's user_version with the value it holds: a real
                        // page written and fsynced, without touching any table.
                        conn.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))?;
                        Ok(())
                    })
                    .await;
                drop(_probing);
                probe?;
            }
            self.read(|conn| {
                conn.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))?;
                Ok(())
            })
            .await
        })
    }

    fn close(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            // Refuse new work first, then drop the only sender: the writer finishes the jobs
            // already queued (they were accepted before close) and exits.
            self.inner.closed.store(true, Ordering::Release);
            drop(lock(&self.inner.writer_tx)?.take());
            let handle = lock(&self.inner.writer_thread)?.take();
            if let Some(handle) = handle {
                tokio::task::spawn_blocking(move || handle.join())
                    .await
                    .map_err(|e| StoreError::Unavailable(format!("joining writer failed: {e}")))?
                    .map_err(|_| StoreError::Unavailable("sqlite writer thread panicked".into()))?;
            }
            lock(&self.inner.readers)?.clear();
            Ok(())
        })
    }
}

impl Ledger for SqliteStore {
    fn event(&self, event_id: &str) -> StoreFuture<'_, Option<EventRecord>> {
        let event_id = event_id.to_owned();
        Box::pin(self.read(move |conn| read_event(conn, &event_id)))
    }

    fn list_dead_letters(
        &self,
        filter: DlqFilter,
        cursor: Option<String>,
        limit: usize,
    ) -> StoreFuture<'_, Page<DeadLetter>> {
        Box::pin(self.read(move |conn| read_dead_letters(conn, &filter, cursor.as_deref(), limit)))
    }

    fn replay(&self, event_ids: Vec<String>, now_ms: UnixMillis) -> StoreFuture<'_, Vec<String>> {
        Box::pin(self.write(JobKind::Other, move |conn, ws| {
            tx_replay(conn, ws, &event_ids, now_ms)
        }))
    }

    fn replay_matching(&self, filter: DlqFilter, now_ms: UnixMillis) -> StoreFuture<'_, u64> {
        Box::pin(super::replay_in_pages(
            self,
            filter,
            now_ms,
            MAINTENANCE_CHUNK,
        ))
    }

    fn fallbacks(
        &self,
        since_ms: UnixMillis,
        limit: usize,
    ) -> StoreFuture<'_, Vec<FallbackRecord>> {
        Box::pin(self.read(move |conn| read_fallbacks(conn, since_ms, limit)))
    }

    fn purge(&self, before_ms: UnixMillis, now_ms: UnixMillis) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            // Chunked for the same reason as replay_matching: many short writes, not one long one.
            let mut total = 0u64;
            loop {
                let (events, keys) = self
                    .write(JobKind::Other, move |conn, _| {
                        tx_purge_chunk(conn, before_ms, now_ms, MAINTENANCE_CHUNK)
                    })
                    .await?;
                total += events;
                // Each half of a chunk takes at most 2 * chunk events / chunk keys; fewer
                // than a full chunk of both means nothing is left.
                if events < MAINTENANCE_CHUNK as u64 && keys < MAINTENANCE_CHUNK as u64 {
                    return Ok(total);
                }
            }
        })
    }

    fn stats(&self, queue: &str, now_ms: UnixMillis) -> StoreFuture<'_, QueueStats> {
        let queue = queue.to_owned();
        Box::pin(self.read(move |conn| read_stats(conn, &queue, now_ms)))
    }
}
