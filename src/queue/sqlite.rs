//! The embedded default [`Store`]: one SQLite file in WAL mode.
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
//!   [`StoreError::InvalidInput`], and calls after [`Store::close`] [`StoreError::Closed`].
//! - The returned futures must be polled inside a Tokio runtime (reads use `spawn_blocking`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use rusqlite::config::DbConfig;
use rusqlite::types::Type;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row};
use tokio::sync::oneshot;

mod checkpoint;
mod health;
mod schema;

pub use schema::SCHEMA_VERSION;

use super::{
    AttemptRecord, ClaimedEvent, DeadLetter, Disposition, DlqFilter, EnqueueOutcome, EventRecord,
    EventState, FallbackReason, FallbackRecord, IdempotencyClaim, KeySequence, NewEvent, Page,
    QueueStats, Reconciliation, SignatureScheme, Store, StoreError, StoreFuture, UnixMillis,
    LEASE_EXPIRED_REASON, MAX_LEASE_EXPIRIES,
};

/// Histogram of how many enqueues shared one transaction (one fsync).
pub const ENQUEUE_BATCH_SIZE_METRIC: &str = "hookyard_enqueue_batch_size";

// `events.state` values. Integers keep the claim index small.
const PENDING: i64 = 0;
const IN_FLIGHT: i64 = 1;
const DELIVERED: i64 = 2;
const DEAD_LETTERED: i64 = 3;
/// Waiting for an earlier event of its ordering key; outside the claim index (`state < 2`).
const HELD: i64 = 4;

/// Rows handled per purge / replay step, so a large purge is many short transactions that
/// enqueues can interleave with instead of one long one that stalls ingress.
const MAINTENANCE_CHUNK: usize = 1000;

/// Columns of `event_payloads` read into a [`ClaimedEvent`], in the order [`claimed_from_row`]
/// expects.
const PAYLOAD_COLUMNS: &str = "event_type, target, body, content_type, trace_id, \
     idempotency_key, signature, timeout_ms, retry_delays_ms, jitter";

/// Due events of one queue, oldest due first. Each half is a range scan of `events_claim`
/// stopped at `limit`, so at most `2 * limit` rows are sorted whatever the backlog.
const CLAIM_PICK: &str = "
SELECT rid, state FROM (
    SELECT * FROM (SELECT rid, due_at, state FROM events
                   WHERE queue = ?1 AND state = 0 AND state < 2 AND due_at <= ?2
                   ORDER BY due_at LIMIT ?3)
    UNION ALL
    SELECT * FROM (SELECT rid, due_at, state FROM events
                   WHERE queue = ?1 AND state = 1 AND state < 2 AND due_at <= ?2
                   ORDER BY due_at LIMIT ?3)
) ORDER BY due_at, rid LIMIT ?3";

// `state < 2` in the statements below is redundant with their `state = ..` terms; it is there
// so SQLite can prove they may use the partial index `events_claim` (schema 4).

/// The earliest due time in a queue, pending or in flight: two index seeks rather than one MIN
/// over `state IN (..)`, which SQLite would answer by scanning.
const NEXT_DUE: &str = "SELECT MIN(m) FROM (
    SELECT MIN(due_at) AS m FROM events WHERE queue = ?1 AND state = 0 AND state < 2
    UNION ALL
    SELECT MIN(due_at) AS m FROM events WHERE queue = ?1 AND state = 1 AND state < 2)";
/// Ready events of a queue and the oldest due time among them.
const COUNT_READY: &str = "SELECT COUNT(*), MIN(due_at) FROM events
    WHERE queue = ?1 AND state = 0 AND state < 2 AND due_at <= ?2";
/// Pending events of a queue due later.
const COUNT_DELAYED: &str = "SELECT COUNT(*) FROM events
    WHERE queue = ?1 AND state = 0 AND state < 2 AND due_at > ?2";
/// Leased events of a queue.
const COUNT_IN_FLIGHT: &str =
    "SELECT COUNT(*) FROM events WHERE queue = ?1 AND state = 1 AND state < 2";
/// Events of a queue held behind an earlier event of their key (index `events_held`).
const COUNT_HELD: &str = "SELECT COUNT(*) FROM events WHERE queue = ?1 AND state = 4";
/// The next event of an ordering key, lowest sequence first (index `events_held`).
const NEXT_HELD: &str =
    "SELECT rid FROM events WHERE queue = ?1 AND ordering_key = ?2 AND state = 4
     ORDER BY sequence LIMIT 1";
/// Dead letters of a queue (index `events_dead_queue`).
const COUNT_DEAD: &str = "SELECT COUNT(*) FROM events WHERE queue = ?1 AND state = 3";

/// One page of dead letters, newest first (see `read_dead_letters` for the parameters).
const DLQ_PAGE: &str =
    "SELECT e.id, p.event_type, e.queue, p.target, p.trace_id, e.dead_letter_reason,
            e.attempts_made, a.status, a.error, p.received_at, e.dead_lettered_at,
            e.ordering_key, e.sequence
     FROM events e
     JOIN event_payloads p ON p.rid = e.rid
     LEFT JOIN attempts a
            ON a.seq = (SELECT MAX(seq) FROM attempts WHERE event_id = e.id)
     WHERE e.state = 3
       AND (?1 IS NULL OR p.event_type = ?1)
       AND (?2 IS NULL OR e.queue = ?2)
       AND e.dead_lettered_at >= ?3
       AND e.dead_lettered_at < ?4
       AND (e.dead_lettered_at, e.id) < (?5, ?6)
     ORDER BY e.dead_lettered_at DESC, e.id DESC
     LIMIT ?7";

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

/// The SQLite-backed [`Store`]. Cheap to clone: clones share one writer thread and read pool.
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

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn limit_i64(v: usize) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn corrupt_col(idx: usize, msg: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(idx, Type::Text, msg.into())
}

fn get_u64(row: &Row<'_>, idx: usize) -> rusqlite::Result<u64> {
    let v: i64 = row.get(idx)?;
    u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(idx, v))
}

fn get_u32(row: &Row<'_>, idx: usize) -> rusqlite::Result<u32> {
    let v: i64 = row.get(idx)?;
    u32::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(idx, v))
}

fn get_status(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<u16>> {
    let v: Option<i64> = row.get(idx)?;
    v.map(|v| u16::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(idx, v)))
        .transpose()
}

fn get_fallback(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<FallbackReason>> {
    let v: Option<String> = row.get(idx)?;
    v.map(|s| {
        FallbackReason::parse(&s)
            .ok_or_else(|| corrupt_col(idx, format!("unknown fallback reason {s:?}")))
    })
    .transpose()
}

/// An event's key and sequence from two columns (both NULL for an unkeyed event).
fn get_ordering(
    row: &Row<'_>,
    key: usize,
    sequence: usize,
) -> rusqlite::Result<Option<KeySequence>> {
    match row.get::<_, Option<String>>(key)? {
        None => Ok(None),
        Some(key_value) => Ok(Some(KeySequence {
            key: key_value,
            sequence: get_u64(row, sequence)?,
        })),
    }
}

fn get_state(row: &Row<'_>, idx: usize) -> rusqlite::Result<EventState> {
    match row.get::<_, i64>(idx)? {
        PENDING => Ok(EventState::Pending),
        IN_FLIGHT => Ok(EventState::InFlight),
        DELIVERED => Ok(EventState::Delivered),
        DEAD_LETTERED => Ok(EventState::DeadLettered),
        HELD => Ok(EventState::Held),
        other => Err(corrupt_col(idx, format!("unknown event state {other}"))),
    }
}

/// `<rid>.<128 random bits in hex>`. The random part makes it unique for all practical
/// purposes and unguessable, so a worker cannot complete a lease it was not given; the row id
/// lets the result find its row by integer primary key instead of searching the text index on
/// event ids (one of the writer's costs per delivery).
fn new_lease_token(rid: i64) -> String {
    format!("{rid}.{:032x}", rand::random::<u128>())
}

/// The row id a lease token was issued for; `None` for tokens issued before tokens carried it.
fn lease_rid(token: &str) -> Option<i64> {
    token.split_once('.')?.0.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// Opening

fn apply_common_pragmas(conn: &Connection, options: &SqliteOptions) -> Result<(), StoreError> {
    conn.busy_timeout(options.busy_timeout)?;
    apply_plan_stability(conn)?;
    // Every hot statement is `prepare_cached`; the default cache (16) is smaller than the
    // writer's working set and would re-prepare statements on every batch.
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

/// Turns on SQLite's query planner stability guarantee (QPSG).
///
/// Without it SQLite plans some statements for the values bound at the time (the bundled build
/// has STAT4), and marks them to be re-planned whenever such a parameter is bound again: every
/// `LIMIT ?n` is one (SQLite folds the bound limit into the plan as a constant). The claim
/// statement binds its limit on every call, so every claim re-parsed and re-planned the whole
/// two-scan union: about 5% of the writer thread during deliveries. With QPSG a statement keeps
/// the plan it was prepared with, whatever is bound; no statement here needs value-specific
/// plans (there are no statistics tables, and every partial-index condition is a literal).
fn apply_plan_stability(conn: &Connection) -> Result<(), StoreError> {
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    Ok(())
}

/// Opens the write connection; also returns the page count at which enqueues stop when a
/// size cap is configured.
fn open_writer(
    path: &Path,
    options: &SqliteOptions,
) -> Result<(Connection, Option<i64>), StoreError> {
    let conn = Connection::open(path)?;
    apply_common_pragmas(&conn, options)?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Unavailable(format!(
            "{}: WAL mode unavailable (journal_mode is {mode})",
            path.display()
        )));
    }
    // Each write job runs in a savepoint, whose undo pages (the statement journal) outgrow
    // SQLite's in-memory spill threshold in a large batch and went to a temp file created and
    // deleted per batch. They are only needed until the batch commits, so keep them in memory.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    let sync = if options.fsync { "FULL" } else { "OFF" };
    conn.pragma_update(None, "synchronous", sync)?;
    // After a burst the WAL is truncated back to this size at checkpoint instead of keeping
    // its high-water mark on disk forever.
    conn.query_row("PRAGMA journal_size_limit = 67108864", [], |r| {
        r.get::<_, i64>(0)
    })?;
    let mut enqueue_page_limit = None;
    if let Some(max) = options.max_size_bytes {
        let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let pages = (to_i64(max) / page_size.max(1)).max(1);
        // The hard cap for every write; SQLite never sets it below the current size, so
        // reopening a larger file still works.
        conn.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |r| {
            r.get::<_, i64>(0)
        })?;
        enqueue_page_limit = Some(pages - pages / 10);
    }
    Ok((conn, enqueue_page_limit))
}

fn open_reader(path: &Path, options: &SqliteOptions) -> Result<Connection, StoreError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI;
    let conn = Connection::open_with_flags(path, flags)?;
    apply_common_pragmas(&conn, options)?;
    // Read-write open (WAL readers need the shm file) but refuse writes: only the writer
    // thread writes, which is what makes group commit and the depth counters correct.
    conn.pragma_update(None, "query_only", "ON")?;
    Ok(conn)
}

fn load_depths(conn: &Connection) -> Result<HashMap<String, u64>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT queue, COUNT(*) FROM events WHERE state < 2 OR state = 4 GROUP BY queue",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, get_u64(r, 1)?)))?;
    let mut depths = HashMap::new();
    for row in rows {
        let (queue, n) = row?;
        depths.insert(queue, n);
    }
    Ok(depths)
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
// Writer thread

/// What the writer thread keeps between jobs.
///
/// Queue depth (pending + in flight) per queue is the committed count plus the uncommitted
/// changes of the current batch and of the job running now, so a failed job or batch is
/// forgotten exactly as SQLite forgets its rows.
struct WriterState {
    committed: HashMap<String, u64>,
    batch: HashMap<String, i64>,
    job: HashMap<String, i64>,
    /// Pages in use above which enqueues are refused (see [`SqliteOptions::max_size_bytes`]).
    enqueue_page_limit: Option<i64>,
    /// Where the writer reports its write outcomes for readiness.
    health: Arc<health::Health>,
    /// The files as opened; `None` in tests that drive a bare connection.
    identity: Option<health::IdentityWatch>,
    /// The last room check refused (kept here so `health` is touched only on a change).
    out_of_room: bool,
    /// The job running now was refused by the room check (not a write failure).
    room_refused_job: bool,
}

impl WriterState {
    fn new(committed: HashMap<String, u64>, enqueue_page_limit: Option<i64>) -> Self {
        Self {
            committed,
            batch: HashMap::new(),
            job: HashMap::new(),
            enqueue_page_limit,
            health: Arc::default(),
            identity: None,
            out_of_room: false,
            room_refused_job: false,
        }
    }

    /// `Err(why)` while the database files at the path are not the ones this store opened.
    fn check_identity(&mut self) -> Result<(), String> {
        let pending = self.committed.values().sum();
        match &mut self.identity {
            Some(watch) => watch.check(pending),
            None => Ok(()),
        }
    }

    fn set_room(&mut self, refused: Option<&str>) {
        self.room_refused_job = refused.is_some();
        if self.out_of_room != refused.is_some() {
            self.out_of_room = refused.is_some();
            self.health.room(refused);
        }
    }

    /// Refuses an enqueue once the database is near its size cap. The last tenth of the cap is
    /// kept for claims, completions and purges: without it a full store could not even record
    /// the deliveries that would let it drain.
    fn check_room(&mut self, conn: &Connection) -> Result<(), StoreError> {
        let Some(limit) = self.enqueue_page_limit else {
            return Ok(());
        };
        // Both pragmas read the header as seen by this transaction: cheap, and they include
        // this batch's growth. Free-list pages are reused before the file grows.
        let used: i64 = conn.query_row(
            "SELECT (SELECT page_count FROM pragma_page_count()) \
                  - (SELECT freelist_count FROM pragma_freelist_count())",
            [],
            |r| r.get(0),
        )?;
        if used >= limit {
            let why = "database size limit reached (max_size_bytes)";
            self.set_room(Some(why));
            return Err(StoreError::Unavailable(why.into()));
        }
        self.set_room(None);
        Ok(())
    }

    fn current(&self, queue: &str) -> u64 {
        let base = self.committed.get(queue).copied().unwrap_or(0);
        let delta =
            self.batch.get(queue).copied().unwrap_or(0) + self.job.get(queue).copied().unwrap_or(0);
        base.saturating_add_signed(delta)
    }

    fn adjust(&mut self, queue: &str, delta: i64) {
        match self.job.get_mut(queue) {
            Some(d) => *d += delta,
            None => {
                self.job.insert(queue.to_owned(), delta);
            }
        }
    }

    fn keep_job(&mut self) {
        for (queue, delta) in self.job.drain() {
            *self.batch.entry(queue).or_insert(0) += delta;
        }
    }

    fn drop_job(&mut self) {
        self.job.clear();
    }

    fn keep_batch(&mut self) {
        for (queue, delta) in self.batch.drain() {
            let n = self.committed.entry(queue).or_insert(0);
            *n = n.saturating_add_signed(delta);
        }
    }

    fn drop_batch(&mut self) {
        self.job.clear();
        self.batch.clear();
    }
}

/// What a write job is, for the writer: whether its batch must be fsynced, and whether it
/// needs a savepoint of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobKind {
    /// An enqueue: its answer promises durability, so its batch is fsynced.
    Enqueue,
    /// A claim or a delivery result: the hot bookkeeping of deliveries.
    Delivery,
    /// Anything else (release, replay, purge): rare, and free to fail part-way.
    Other,
    /// A readiness probe while writes were failing: a tiny write that must reach the disk.
    Probe,
}

impl JobKind {
    /// Enqueues and deliveries run without a savepoint. A savepoint per job made SQLite copy
    /// every page the batch had already dirtied (the last leaves of each table and index)
    /// into its statement journal before the job touched it again: about 10% of the writer
    /// thread during accepts, and again during deliveries.
    ///
    /// They can, because every check that can refuse one (idempotency, depth, room; a row
    /// that does not decode) comes before its first write, and after that only a SQLite error
    /// can fail it. One that fails having written part of its work cannot be undone alone, so
    /// its whole batch is aborted (every job answered `Unavailable`, the rest retried in the
    /// next batch), as when SQLite itself rolls a batch back. Changes to these jobs must keep
    /// their refusals ahead of their writes.
    fn needs_savepoint(self) -> bool {
        matches!(self, JobKind::Other | JobKind::Probe)
    }

    /// Whether the batch holding this job must be fsynced, and written only to the files this
    /// store opened: its success promises the caller durability.
    fn promises_durability(self) -> bool {
        matches!(self, JobKind::Enqueue | JobKind::Probe)
    }
}

/// What became of a batch's transaction, told to each of its jobs.
#[derive(Debug, Clone, Copy)]
enum Fate<'a> {
    Committed,
    /// Rolled back, or never committed: nothing of the batch is stored.
    Failed(&'a str),
    /// Committed, but the database file was found deleted or replaced right after: whether
    /// the write survives a restart is unknown.
    Unconfirmed(&'a str),
}

/// How a job's own run went, for the writer's health bookkeeping.
#[derive(Debug)]
enum Ran {
    Ok,
    /// Refused or failed with an error that says nothing about the disk (a duplicate, bad
    /// input, a corrupt row).
    Refused,
    /// Failed with an I/O-class error (`Unavailable`).
    Failed(String),
}

/// Sends a job's reply once the fate of its transaction is known.
type Finish = Box<dyn FnOnce(Fate<'_>) + Send>;

/// A type-erased write job.
trait Job: Send {
    fn kind(&self) -> JobKind;
    /// Runs the job; `Ran::Ok` if it succeeded (its savepoint is kept).
    fn run(self: Box<Self>, conn: &Connection, ws: &mut WriterState) -> (Ran, Finish);
    /// Answers without running (the batch was aborted before reaching it).
    fn fail(self: Box<Self>, err: StoreError);
}

struct WriteJob<T, F> {
    f: F,
    reply: oneshot::Sender<Result<T, StoreError>>,
    kind: JobKind,
}

impl<T, F> Job for WriteJob<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection, &mut WriterState) -> Result<T, StoreError> + Send,
{
    fn kind(&self) -> JobKind {
        self.kind
    }

    fn run(self: Box<Self>, conn: &Connection, ws: &mut WriterState) -> (Ran, Finish) {
        let WriteJob { f, reply, kind } = *self;
        match f(conn, ws) {
            Ok(value) => (
                Ran::Ok,
                Box::new(move |fate: Fate<'_>| {
                    let answer = match fate {
                        Fate::Committed => Ok(value),
                        Fate::Failed(msg) => Err(StoreError::Unavailable(msg.to_owned())),
                        // Deliveries of events already in the file stay valid there; only a
                        // promise of durability is in doubt.
                        Fate::Unconfirmed(_) if !kind.promises_durability() => Ok(value),
                        Fate::Unconfirmed(msg) => Err(StoreError::OutcomeUnknown(msg.to_owned())),
                    };
                    // The caller may have given up waiting; nothing to do then.
                    let _ = reply.send(answer);
                }),
            ),
            Err(e) => (
                match &e {
                    StoreError::Unavailable(msg) => Ran::Failed(msg.clone()),
                    _ => Ran::Refused,
                },
                Box::new(move |_: Fate<'_>| {
                    let _ = reply.send(Err(e));
                }),
            ),
        }
    }

    fn fail(self: Box<Self>, err: StoreError) {
        let _ = self.reply.send(Err(err));
    }
}

fn writer_loop(
    mut conn: Connection,
    mut checkpoints: checkpoint::Checkpoints,
    rx: mpsc::Receiver<Box<dyn Job>>,
    mut ws: WriterState,
    max_batch: usize,
    fsync: bool,
    commits: &AtomicU64,
) {
    let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(max_batch);
    // Only an enqueue's answer promises durability (the 202). A batch of bookkeeping alone
    // (claims, delivery results, retries) commits with synchronous=NORMAL: in WAL mode that is
    // still atomic and survives a process crash, and the next enqueue's fsync makes it durable
    // too. Power loss in between can only replay a delivery (at-least-once), never lose an
    // event. This keeps one fsync per accepted batch instead of one per delivery batch.
    let mut synced_full = fsync;
    loop {
        // `recv` fails only once every sender is gone *and* the channel is empty, so on close
        // the jobs already queued are still executed and answered.
        if batch.is_empty() {
            match rx.recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        // A batch that will promise durability is first checked against the files this store
        // opened (three stats, microseconds beside its fsync). Checking before anything runs,
        // rather than just before COMMIT, lets the rest of the batch (claims and results of
        // deliveries from the old file) commit as usual; `run_batch` checks again after
        // COMMIT, for a file that went away meanwhile.
        let promises = batch.iter().any(|job| job.kind().promises_durability());
        if promises {
            if let Err(why) = ws.check_identity() {
                // The file at the path is not the one being written: no new promise can be
                // kept. Deliveries of the events already in the old file carry on.
                let (refused, rest): (Vec<_>, Vec<_>) = batch
                    .drain(..)
                    .partition(|job| job.kind().promises_durability());
                for job in refused {
                    job.fail(StoreError::Unavailable(why.clone()));
                }
                batch = rest;
                if batch.is_empty() {
                    continue;
                }
            }
        }
        if fsync {
            let needs_fsync = batch.iter().any(|job| job.kind().promises_durability());
            if needs_fsync != synced_full {
                let level = if needs_fsync { "FULL" } else { "NORMAL" };
                match conn.pragma_update(None, "synchronous", level) {
                    Ok(()) => synced_full = needs_fsync,
                    // Staying at FULL is always safe. Failing to get back to FULL is not: an
                    // enqueue must never be answered without its fsync.
                    Err(e) if needs_fsync => {
                        let msg = format!("cannot restore synchronous=FULL: {e}");
                        for job in batch.drain(..) {
                            job.fail(StoreError::Unavailable(msg.clone()));
                        }
                        continue;
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot relax sqlite synchronous level"),
                }
            }
        }
        // Jobs an aborted batch never reached come back and lead the next batch. Every batch
        // consumes at least one job, so this cannot spin.
        batch = run_batch(&mut conn, std::mem::take(&mut batch), &mut ws, commits);
        checkpoints.after_batch(&conn);
    }
    checkpoints.stop();
    if let Err((_, e)) = conn.close() {
        tracing::warn!(error = %e, "closing the sqlite write connection failed");
    }
}

/// Runs `jobs` in one transaction and answers them once it has committed (or failed). Returns
/// the jobs not yet run when SQLite aborted the transaction part-way, for the next batch.
///
/// Also keeps the store's [`health::Health`]: a batch that fails to write marks it unable to
/// write, one that commits a write marks it able again.
fn run_batch(
    conn: &mut Connection,
    jobs: Vec<Box<dyn Job>>,
    ws: &mut WriterState,
    commits: &AtomicU64,
) -> Vec<Box<dyn Job>> {
    let mut jobs = jobs.into_iter();
    let tx = &*conn;
    match cached(tx, "BEGIN IMMEDIATE") {
        Ok(()) => {}
        Err(e) => {
            // Nothing can be written at all: answer everyone rather than retry in a loop.
            let msg = e.to_string();
            ws.health.write_failed(&msg);
            for job in jobs {
                job.fail(StoreError::Unavailable(msg.clone()));
            }
            return Vec::new();
        }
    }
    let changes_at_begin = tx.total_changes();
    let mut finishes: Vec<Finish> = Vec::with_capacity(jobs.len());
    let mut enqueues = 0usize;
    let mut promises = 0usize;
    let mut probed = false;
    let mut write_error: Option<String> = None;
    let mut aborted: Option<String> = None;
    for job in jobs.by_ref() {
        let kind = job.kind();
        let savepoint = kind.needs_savepoint();
        if savepoint {
            if let Err(e) = cached(tx, "SAVEPOINT job") {
                aborted = Some(e.to_string());
                job.fail(StoreError::from(e));
                break;
            }
        }
        let changes_before = tx.total_changes();
        ws.room_refused_job = false;
        let (ran, finish) = job.run(tx, ws);
        finishes.push(finish);
        if let Ran::Ok = ran {
            if savepoint {
                if let Err(e) = cached(tx, "RELEASE job") {
                    aborted = Some(e.to_string());
                    break;
                }
            }
            ws.keep_job();
            enqueues += usize::from(kind == JobKind::Enqueue);
            promises += usize::from(kind.promises_durability());
            probed |= kind == JobKind::Probe;
        } else {
            ws.drop_job();
            // A refusal for room is the size cap speaking (kept apart, in `set_room`); any other
            // I/O-class failure means this store could not write.
            if let Ran::Failed(msg) = ran {
                if !ws.room_refused_job {
                    write_error = Some(msg);
                }
            }
            // Some errors (disk full, I/O) make SQLite roll back the whole transaction; the
            // jobs after it would then run in autocommit mode, outside the group commit.
            if tx.is_autocommit() {
                aborted = Some("transaction rolled back by SQLite after an error".into());
                break;
            }
            // The failed job must leave no trace; if that cannot be guaranteed, nothing in
            // this batch commits. Without a savepoint, that holds only if none of its
            // statements changed a row (a failed statement undoes itself).
            let undone = if savepoint {
                cached(tx, "ROLLBACK TO job")
                    .and_then(|()| cached(tx, "RELEASE job"))
                    .map_err(|e| format!("cannot roll back a failed job: {e}"))
            } else if tx.total_changes() != changes_before {
                Err("a write job failed after writing part of its work".into())
            } else {
                Ok(())
            };
            if let Err(msg) = undone {
                aborted = Some(msg);
                break;
            }
        }
    }
    let wrote = probed || tx.total_changes() != changes_at_begin;

    let outcome = match aborted {
        Some(msg) => Err(msg),
        None => cached(tx, "COMMIT").map_err(|e| e.to_string()),
    };
    // Whatever failed (a job, or COMMIT itself), nothing of this batch may stay pending.
    if outcome.is_err() && !tx.is_autocommit() {
        if let Err(e) = cached(tx, "ROLLBACK") {
            tracing::error!(error = %e, "cannot roll back a failed sqlite write batch");
        }
    }
    match outcome {
        Ok(()) => {
            ws.keep_batch();
            commits.fetch_add(1, Ordering::Relaxed);
            if enqueues > 0 {
                metrics::histogram!(ENQUEUE_BATCH_SIZE_METRIC).record(enqueues as f64);
            }
            match &write_error {
                Some(msg) => ws.health.write_failed(msg),
                None if wrote => ws.health.write_ok(),
                None => {}
            }
            // The file may have gone while COMMIT ran: then the events went to a file that no
            // restart will open, and their callers are told the outcome is unknown.
            let unconfirmed = if promises > 0 {
                ws.check_identity().err()
            } else {
                None
            };
            let fate = match &unconfirmed {
                Some(why) => Fate::Unconfirmed(why),
                None => Fate::Committed,
            };
            for finish in finishes {
                finish(fate);
            }
        }
        Err(msg) => {
            ws.drop_batch();
            ws.health.write_failed(&msg);
            tracing::error!(error = %msg, "sqlite write batch failed");
            for finish in finishes {
                finish(Fate::Failed(&msg));
            }
            return jobs.collect();
        }
    }
    Vec::new()
}

/// Runs one transaction control statement (`BEGIN IMMEDIATE`, `COMMIT`, `ROLLBACK`, `SAVEPOINT
/// job`, `RELEASE job`, `ROLLBACK TO job`) from the statement cache. Every batch and every job
/// in it runs some; parsing them each time (as rusqlite's `Transaction` and `savepoint` do)
/// cost the writer several percent of its time.
fn cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}

// ---------------------------------------------------------------------------------------------
// Write jobs (run on the writer thread, inside the batch transaction)

fn tx_enqueue(
    conn: &Connection,
    ws: &mut WriterState,
    ev: &NewEvent,
    idem: Option<&IdempotencyClaim>,
    max_depth: u64,
) -> Result<EnqueueOutcome, StoreError> {
    // Every refusal below comes before the first write: enqueues run without a savepoint
    // (see `JobKind::needs_savepoint`).
    // Dedupe before the depth check: a retried request whose first copy was accepted should
    // learn its event id, not be told to back off.
    if let Some(claim) = idem {
        let existing: Option<(String, i64)> = conn
            .prepare_cached(
                "SELECT event_id, expires_at FROM idempotency WHERE event_type = ?1 AND key = ?2",
            )?
            .query_row(params![claim.event_type, claim.key], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        if let Some((event_id, expires_at)) = existing {
            if expires_at > ev.received_at_ms {
                return Ok(EnqueueOutcome::Duplicate { event_id });
            }
        }
    }
    if ws.current(&ev.queue) >= max_depth {
        return Ok(EnqueueOutcome::QueueFull);
    }
    ws.check_room(conn)?;
    let delays = serde_json::to_string(&ev.retry_delays_ms)
        .map_err(|e| StoreError::Corrupt(format!("cannot encode retry delays: {e}")))?;
    // The key's place is read before the first write; a key with an event pending or leased
    // holds this one back.
    let ordering = match &ev.ordering_key {
        None => None,
        Some(key) => {
            let row: Option<(i64, Option<i64>)> = conn
                .prepare_cached(
                    "SELECT last_seq, active_rid FROM ordering_keys WHERE queue = ?1 AND key = ?2",
                )?
                .query_row(params![ev.queue, key], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let (last_seq, busy) =
                row.map_or((0, false), |(last, active)| (last, active.is_some()));
            Some((key, last_seq + 1, busy))
        }
    };
    let state = match ordering {
        Some((_, _, true)) => HELD,
        _ => PENDING,
    };
    conn.prepare_cached(
        "INSERT INTO events (id, queue, state, due_at, ordering_key, sequence)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        ev.id,
        ev.queue,
        state,
        ev.due_at_ms,
        ordering.map(|(key, _, _)| key),
        ordering.map(|(_, seq, _)| seq)
    ])?;
    let rid = conn.last_insert_rowid();
    if let Some((key, seq, _)) = ordering {
        conn.prepare_cached(
            "INSERT INTO ordering_keys (queue, key, last_seq, active_rid) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (queue, key)
             DO UPDATE SET last_seq = excluded.last_seq,
                           active_rid = COALESCE(active_rid, excluded.active_rid)",
        )?
        .execute(params![ev.queue, key, seq, rid])?;
    }
    conn.prepare_cached(
        "INSERT INTO event_payloads (rid, event_type, target, content_type, trace_id,
             idempotency_key, signature, timeout_ms, retry_delays_ms, jitter, received_at,
             fallback, body)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
    )?
    .execute(params![
        rid,
        ev.event_type,
        ev.target,
        ev.content_type,
        ev.trace_id,
        ev.idempotency_key,
        ev.signature.as_str(),
        to_i64(ev.timeout_ms),
        delays,
        ev.jitter,
        ev.received_at_ms,
        ev.fallback.map(FallbackReason::as_str),
        &ev.body[..],
    ])?;
    if let Some(claim) = idem {
        // An expired claim for the same key is replaced in place.
        conn.prepare_cached(
            "INSERT INTO idempotency (event_type, key, event_id, expires_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (event_type, key)
             DO UPDATE SET event_id = excluded.event_id, expires_at = excluded.expires_at",
        )?
        .execute(params![claim.event_type, claim.key, ev.id, claim.expires_at_ms])?;
    }
    if let Some(reason) = ev.fallback {
        conn.prepare_cached(
            "INSERT INTO fallbacks (at_ms, event_id, trace_id, event_type, reason, target)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            ev.received_at_ms,
            ev.id,
            ev.trace_id,
            ev.event_type,
            reason.as_str(),
            ev.target
        ])?;
    }
    ws.adjust(&ev.queue, 1);
    Ok(EnqueueOutcome::Accepted)
}

/// The state columns of a just-claimed `events` row.
struct ClaimedState {
    id: String,
    queue: String,
    attempts_made: u32,
    ordering: Option<KeySequence>,
}

fn claimed_from_row(
    state: ClaimedState,
    row: &Row<'_>,
    lease_token: String,
    lease_until_ms: UnixMillis,
) -> rusqlite::Result<ClaimedEvent> {
    let signature: String = row.get(6)?;
    let delays: String = row.get(8)?;
    let body: Vec<u8> = row.get(2)?;
    Ok(ClaimedEvent {
        id: state.id,
        event_type: row.get(0)?,
        queue: state.queue,
        target: row.get(1)?,
        body: Bytes::from(body),
        content_type: row.get(3)?,
        trace_id: row.get(4)?,
        idempotency_key: row.get(5)?,
        signature: SignatureScheme::parse(&signature)
            .ok_or_else(|| corrupt_col(6, format!("unknown signature scheme {signature:?}")))?,
        timeout_ms: get_u64(row, 7)?,
        retry_delays_ms: serde_json::from_str(&delays)
            .map_err(|e| corrupt_col(8, format!("bad retry delays {delays:?}: {e}")))?,
        jitter: row.get(9)?,
        attempt: state.attempts_made.saturating_add(1),
        lease_token,
        lease_until_ms,
        ordering: state.ordering,
    })
}

fn tx_claim(
    conn: &Connection,
    ws: &mut WriterState,
    queue: &str,
    now_ms: UnixMillis,
    limit: usize,
    lease_ms: u64,
) -> Result<Vec<ClaimedEvent>, StoreError> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let picked = conn
        .prepare_cached(CLAIM_PICK)?
        .query_map(params![queue, now_ms, limit_i64(limit)], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let lease_until = now_ms.saturating_add(to_i64(lease_ms));

    // Every picked event is read and decoded before any is written: a row that does not
    // decode fails the claim while it has changed nothing, which is what lets claims run
    // without a savepoint (see `JobKind::needs_savepoint`).
    let mut state_row = conn.prepare_cached(
        "SELECT id, queue, attempts_made, lease_expiries, round, ordering_key, sequence
         FROM events WHERE rid = ?1",
    )?;
    let mut payload = conn.prepare_cached(&format!(
        "SELECT {PAYLOAD_COLUMNS} FROM event_payloads WHERE rid = ?1"
    ))?;
    let mut leases = Vec::with_capacity(picked.len());
    for (rid, picked_state) in picked {
        let (state, lease_expiries, round) = state_row.query_row(params![rid], |row| {
            Ok((
                ClaimedState {
                    id: row.get(0)?,
                    queue: row.get(1)?,
                    attempts_made: get_u32(row, 2)?,
                    ordering: get_ordering(row, 5, 6)?,
                },
                row.get::<_, i64>(3)?,
                row.get::<_, i64>(4)?,
            ))
        })?;
        let token = new_lease_token(rid);
        // A pick in flight is a lease that ran out without a result.
        let expired = i64::from(picked_state == IN_FLIGHT);
        let lease = if lease_expiries + expired >= i64::from(MAX_LEASE_EXPIRIES) {
            Lease::DeadLetter { state, round }
        } else {
            let ev = payload
                .query_row(params![rid], |row| {
                    claimed_from_row(state, row, token.clone(), lease_until)
                })
                .optional()?
                .ok_or_else(|| StoreError::Corrupt(format!("event row {rid} has no payload")))?;
            Lease::Deliver(ev)
        };
        leases.push((rid, token, expired, lease));
    }

    // While in flight, due_at holds the lease expiry: that is when the event is due again.
    // Only the small state row is written; the payload is read, never rewritten.
    let mut update = conn.prepare_cached(
        "UPDATE events SET state = 1, lease_token = ?1, due_at = ?2,
             lease_expiries = lease_expiries + ?4
         WHERE rid = ?3",
    )?;
    let mut claimed = Vec::with_capacity(leases.len());
    for (rid, token, expired, lease) in leases {
        update.execute(params![token, lease_until, rid, expired])?;
        match lease {
            Lease::Deliver(ev) => claimed.push(ev),
            Lease::DeadLetter { state, round } => {
                dead_letter_expired(conn, ws, rid, &state, round, now_ms)?
            }
        }
    }
    Ok(claimed)
}

/// What a claim does with one picked event.
// Lives only between a claim's reads and its writes, and nearly every one is a `Deliver`:
// boxing that variant would cost an allocation per claimed event for nothing.
#[allow(clippy::large_enum_variant)]
enum Lease {
    Deliver(ClaimedEvent),
    /// Its leases kept running out without a result.
    DeadLetter {
        state: ClaimedState,
        round: i64,
    },
}

/// Dead-letters an event whose leases kept running out, recording why as its last attempt.
fn dead_letter_expired(
    conn: &Connection,
    ws: &mut WriterState,
    rid: i64,
    state: &ClaimedState,
    round: i64,
    now_ms: UnixMillis,
) -> Result<(), StoreError> {
    tracing::error!(
        event_id = %state.id,
        queue = %state.queue,
        lease_expiries = MAX_LEASE_EXPIRIES,
        "every recent delivery of this event ended without a result (a crash or panic in \
         the worker?); moving it to the dead-letter queue"
    );
    conn.prepare_cached(
        "UPDATE events SET state = 3, due_at = NULL, lease_token = NULL,
             dead_lettered_at = ?1, dead_letter_reason = ?2
         WHERE rid = ?3",
    )?
    .execute(params![now_ms, LEASE_EXPIRED_REASON, rid])?;
    conn.prepare_cached(
        "INSERT INTO attempts (event_id, round, attempt, started_at, latency_ms, status, error)
         VALUES (?1, ?2, ?3, ?4, 0, NULL, ?5)",
    )?
    .execute(params![
        state.id,
        round,
        i64::from(state.attempts_made) + 1,
        now_ms,
        LEASE_EXPIRED_REASON
    ])?;
    if let Some(ordering) = &state.ordering {
        release_next_of_key(conn, &state.queue, &ordering.key, now_ms)?;
    }
    ws.adjust(&state.queue, -1);
    Ok(())
}

/// The key's current event is delivered or dead-lettered: its next held event (lowest
/// sequence) becomes pending, due at once, and the key's current event; a key with none held
/// is free, so its next enqueue is pending at once.
fn release_next_of_key(
    conn: &Connection,
    queue: &str,
    key: &str,
    now_ms: UnixMillis,
) -> Result<(), StoreError> {
    let next: Option<i64> = conn
        .prepare_cached(NEXT_HELD)?
        .query_row(params![queue, key], |r| r.get(0))
        .optional()?;
    if let Some(rid) = next {
        // Its own due time if already past (it has waited that long: claims go oldest due
        // first), else now.
        conn.prepare_cached(
            "UPDATE events SET state = 0, due_at = MIN(COALESCE(due_at, ?1), ?1) WHERE rid = ?2",
        )?
        .execute(params![now_ms, rid])?;
    }
    conn.prepare_cached("UPDATE ordering_keys SET active_rid = ?3 WHERE queue = ?1 AND key = ?2")?
        .execute(params![queue, key, next])?;
    Ok(())
}

fn tx_complete(
    conn: &Connection,
    ws: &mut WriterState,
    event_id: &str,
    lease_token: &str,
    attempt: Option<AttemptRecord>,
    disposition: Disposition,
    now_ms: UnixMillis,
) -> Result<bool, StoreError> {
    let counts = !matches!(disposition, Disposition::Defer { .. });
    let mut deferred_by = None;
    let (state, due_at, delivered_at, dead_at, reason) = match disposition {
        Disposition::Delivered => (DELIVERED, None, Some(now_ms), None, None),
        Disposition::Retry { due_at_ms } => (PENDING, Some(due_at_ms), None, None, None),
        Disposition::Defer { due_at_ms, breaker } => {
            deferred_by = breaker;
            (PENDING, Some(due_at_ms), None, None, None)
        }
        Disposition::DeadLetter { reason } => {
            (DEAD_LETTERED, None, None, Some(now_ms), Some(reason))
        }
    };
    // The lease check and the state change are one statement: a lease that expired and was
    // claimed by another worker has a new token, so the stale worker's result matches no row
    // and is ignored. An expired lease nobody re-claimed still counts.
    // No savepoint (see `JobKind::needs_savepoint`): what RETURNING decodes, the claim that
    // issued this lease decoded already, so after this write only a SQLite error can fail.
    let by_rid = lease_rid(lease_token);
    let updated: Option<(String, i64, i64, Option<String>)> = conn
        .prepare_cached(if by_rid.is_some() {
            "UPDATE events SET state = ?1, due_at = ?2, lease_token = NULL, lease_expiries = 0,
                 attempts_made = attempts_made + ?3, delivered_at = ?4, dead_lettered_at = ?5,
                 dead_letter_reason = ?6, deferred_by = ?10
             WHERE rid = ?9 AND id = ?7 AND state = 1 AND lease_token = ?8
             RETURNING queue, attempts_made, round, ordering_key"
        } else {
            "UPDATE events SET state = ?1, due_at = ?2, lease_token = NULL, lease_expiries = 0,
                 attempts_made = attempts_made + ?3, delivered_at = ?4, dead_lettered_at = ?5,
                 dead_letter_reason = ?6, deferred_by = ?10
             WHERE id = ?7 AND state = 1 AND lease_token = ?8 AND ?9 IS NULL
             RETURNING queue, attempts_made, round, ordering_key"
        })?
        .query_row(
            params![
                state,
                due_at,
                i64::from(counts),
                delivered_at,
                dead_at,
                reason,
                event_id,
                lease_token,
                by_rid,
                deferred_by
            ],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    let Some((queue, attempts_made, round, ordering_key)) = updated else {
        return Ok(false);
    };
    if counts {
        if let Some(a) = attempt {
            conn.prepare_cached(
                "INSERT INTO attempts (event_id, round, attempt, started_at, latency_ms, status, error)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                event_id,
                round,
                // The store's count is authoritative: the lease check proved this is the
                // attempt it handed out.
                attempts_made,
                a.started_at_ms,
                to_i64(a.latency_ms),
                a.status,
                a.error
            ])?;
        }
    }
    if state == DELIVERED || state == DEAD_LETTERED {
        if let Some(key) = ordering_key {
            release_next_of_key(conn, &queue, &key, now_ms)?;
        }
        ws.adjust(&queue, -1);
    }
    Ok(true)
}

/// Makes the pending events deferred by `host`'s breaker (every breaker, for `None`) due at
/// `now_ms`, or sooner if they already were. Uses the partial `events_deferred` index.
fn tx_undefer(
    conn: &Connection,
    host: Option<&str>,
    now_ms: UnixMillis,
) -> Result<u64, StoreError> {
    let changed = conn
        .prepare_cached(
            "UPDATE events SET due_at = MIN(due_at, ?1), deferred_by = NULL
             WHERE deferred_by IS NOT NULL AND (?2 IS NULL OR deferred_by = ?2) AND state = 0",
        )?
        .execute(params![now_ms, host])?;
    Ok(changed as u64)
}

fn tx_release(
    conn: &Connection,
    leases: &[(String, String)],
    now_ms: UnixMillis,
) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(
        "UPDATE events SET state = 0, due_at = ?1, lease_token = NULL
         WHERE id = ?2 AND state = 1 AND lease_token = ?3",
    )?;
    for (id, token) in leases {
        stmt.execute(params![now_ms, id, token])?;
    }
    Ok(())
}

fn tx_replay(
    conn: &Connection,
    ws: &mut WriterState,
    ids: &[String],
    now_ms: UnixMillis,
) -> Result<Vec<String>, StoreError> {
    // A new round: attempts_made restarts so the retry schedule and X-Delivery-Attempt count
    // from 1 again; the old round's attempt rows stay as history.
    let mut stmt = conn.prepare_cached(
        "UPDATE events SET state = 0, due_at = ?1, lease_token = NULL, attempts_made = 0,
             lease_expiries = 0, round = round + 1, dead_lettered_at = NULL,
             dead_letter_reason = NULL
         WHERE id = ?2 AND state = 3
         RETURNING queue, rid, ordering_key, sequence",
    )?;
    // A keyed dead letter keeps its sequence: it goes first if its key is free, else waits
    // (held) until the key's current event is done, before the key's later held events.
    let mut take_key = conn.prepare_cached(
        "INSERT INTO ordering_keys (queue, key, last_seq, active_rid) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (queue, key) DO UPDATE SET active_rid = COALESCE(active_rid, excluded.active_rid)
         RETURNING active_rid",
    )?;
    let mut hold = conn.prepare_cached("UPDATE events SET state = 4 WHERE rid = ?1")?;
    let mut replayed = Vec::new();
    for id in ids {
        let row: Option<(String, i64, Option<String>, Option<i64>)> = stmt
            .query_row(params![now_ms, id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .optional()?;
        if let Some((queue, rid, key, sequence)) = row {
            if let Some(key) = key {
                let active: i64 = take_key
                    .query_row(params![queue, key, sequence.unwrap_or(0), rid], |r| {
                        r.get(0)
                    })?;
                if active != rid {
                    hold.execute(params![rid])?;
                }
            }
            // Replay is an operator's decision and is not refused at max_depth.
            ws.adjust(&queue, 1);
            replayed.push(id.clone());
        }
    }
    Ok(replayed)
}

/// Deletes up to `chunk` finished events (with their attempts and fallback records) and up to
/// `chunk` expired idempotency keys. Returns (events, keys) removed.
fn tx_purge_chunk(
    conn: &Connection,
    before_ms: UnixMillis,
    now_ms: UnixMillis,
    chunk: usize,
) -> Result<(u64, u64), StoreError> {
    let victims = conn
        .prepare_cached(
            "SELECT rid, id FROM (SELECT rid, id FROM events
                                  WHERE state = 3 AND dead_lettered_at < ?1 LIMIT ?2)
             UNION ALL
             SELECT rid, id FROM (SELECT rid, id FROM events
                                  WHERE state = 2 AND delivered_at < ?1 LIMIT ?2)",
        )?
        .query_map(params![before_ms, limit_i64(chunk)], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut del_attempts = conn.prepare_cached("DELETE FROM attempts WHERE event_id = ?1")?;
    let mut del_fallbacks = conn.prepare_cached("DELETE FROM fallbacks WHERE event_id = ?1")?;
    let mut del_payload = conn.prepare_cached("DELETE FROM event_payloads WHERE rid = ?1")?;
    let mut del_event = conn.prepare_cached("DELETE FROM events WHERE rid = ?1")?;
    for (rid, id) in &victims {
        del_attempts.execute(params![id])?;
        del_fallbacks.execute(params![id])?;
        del_payload.execute(params![rid])?;
        del_event.execute(params![rid])?;
    }
    let keys = conn
        .prepare_cached(
            "DELETE FROM idempotency WHERE (event_type, key) IN
                 (SELECT event_type, key FROM idempotency WHERE expires_at <= ?1 LIMIT ?2)",
        )?
        .execute(params![now_ms, limit_i64(chunk)])?;
    Ok((victims.len() as u64, keys as u64))
}

// ---------------------------------------------------------------------------------------------
// Reads (run on a pooled read connection)

fn read_event(conn: &mut Connection, id: &str) -> Result<Option<EventRecord>, StoreError> {
    // One read transaction, so the event and its attempts come from the same snapshot.
    let tx = conn.transaction()?;
    let record = tx
        .prepare_cached(
            "SELECT e.id, p.event_type, e.queue, p.target, p.trace_id, e.state, p.received_at,
                    e.due_at, e.delivered_at, e.dead_lettered_at, e.dead_letter_reason, p.fallback,
                    e.ordering_key, e.sequence
             FROM events e JOIN event_payloads p ON p.rid = e.rid WHERE e.id = ?1",
        )?
        .query_row(params![id], |r| {
            let state = get_state(r, 5)?;
            Ok(EventRecord {
                id: r.get(0)?,
                event_type: r.get(1)?,
                queue: r.get(2)?,
                target: r.get(3)?,
                trace_id: r.get(4)?,
                state,
                received_at_ms: r.get(6)?,
                // While in flight due_at is the lease expiry, not a due time: not reported.
                due_at_ms: if state == EventState::Pending {
                    r.get(7)?
                } else {
                    None
                },
                delivered_at_ms: r.get(8)?,
                dead_lettered_at_ms: r.get(9)?,
                dead_letter_reason: r.get(10)?,
                fallback: get_fallback(r, 11)?,
                ordering: get_ordering(r, 12, 13)?,
                attempts: Vec::new(),
            })
        })
        .optional()?;
    let Some(mut record) = record else {
        return Ok(None);
    };
    record.attempts = tx
        .prepare_cached(
            "SELECT attempt, started_at, latency_ms, status, error
             FROM attempts WHERE event_id = ?1 ORDER BY seq",
        )?
        .query_map(params![id], |r| {
            Ok(AttemptRecord {
                attempt: get_u32(r, 0)?,
                started_at_ms: r.get(1)?,
                latency_ms: get_u64(r, 2)?,
                status: get_status(r, 3)?,
                error: r.get(4)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(record))
}

fn encode_cursor(at_ms: UnixMillis, id: &str) -> String {
    format!("{at_ms}:{id}")
}

fn decode_cursor(cursor: &str) -> Result<(UnixMillis, String), StoreError> {
    cursor
        .split_once(':')
        .and_then(|(at, id)| Some((at.parse().ok()?, id.to_owned())))
        .ok_or_else(|| StoreError::InvalidInput(format!("invalid dead-letter cursor {cursor:?}")))
}

fn read_dead_letters(
    conn: &mut Connection,
    filter: &DlqFilter,
    cursor: Option<&str>,
    limit: usize,
) -> Result<Page<DeadLetter>, StoreError> {
    if limit == 0 {
        return Ok(Page {
            items: Vec::new(),
            next_cursor: None,
        });
    }
    // Absent bounds become sentinels rather than `?n IS NULL OR ...`, so every bound stays a
    // range condition on `events_dlq` and a deep page starts where the last one stopped
    // instead of re-reading every earlier row.
    let (after_at, after_id) = match cursor {
        Some(c) => decode_cursor(c)?,
        None => (UnixMillis::MAX, String::new()),
    };
    let since = filter.since_ms.unwrap_or(UnixMillis::MIN);
    let until = filter.until_ms.unwrap_or(UnixMillis::MAX);
    // Newest first, keyset-paged on (dead_lettered_at, id): stable while dead letters come and
    // go, and each page is an index range scan however deep the page.
    let mut items = conn
        .prepare_cached(DLQ_PAGE)?
        .query_map(
            params![
                filter.event_type,
                filter.queue,
                since,
                until,
                after_at,
                after_id,
                limit_i64(limit.saturating_add(1)),
            ],
            |r| {
                Ok(DeadLetter {
                    id: r.get(0)?,
                    event_type: r.get(1)?,
                    queue: r.get(2)?,
                    target: r.get(3)?,
                    trace_id: r.get(4)?,
                    reason: r.get::<_, Option<String>>(5)?.unwrap_or_default(),
                    attempts: get_u32(r, 6)?,
                    last_status: get_status(r, 7)?,
                    last_error: r.get(8)?,
                    received_at_ms: r.get(9)?,
                    dead_lettered_at_ms: r.get(10)?,
                    ordering: get_ordering(r, 11, 12)?,
                })
            },
        )?
        .collect::<Result<Vec<_>, _>>()?;
    // One extra row was fetched only to learn whether another page exists.
    let next_cursor = if items.len() > limit {
        items.truncate(limit);
        items
            .last()
            .map(|d| encode_cursor(d.dead_lettered_at_ms, &d.id))
    } else {
        None
    };
    Ok(Page { items, next_cursor })
}

fn read_fallbacks(
    conn: &mut Connection,
    since_ms: UnixMillis,
    limit: usize,
) -> Result<Vec<FallbackRecord>, StoreError> {
    let rows = conn
        .prepare_cached(
            "SELECT f.event_id, f.trace_id, f.event_type, f.reason, f.target, f.at_ms,
                    e.state, e.delivered_at
             FROM fallbacks f LEFT JOIN events e ON e.id = f.event_id
             WHERE f.at_ms >= ?1
             ORDER BY f.at_ms, f.seq
             LIMIT ?2",
        )?
        .query_map(params![since_ms, limit_i64(limit)], |r| {
            let reason: String = r.get(3)?;
            let state = match r.get::<_, Option<i64>>(6)? {
                Some(DELIVERED) => Reconciliation::Delivered,
                Some(DEAD_LETTERED) => Reconciliation::DeadLettered,
                _ => Reconciliation::Pending,
            };
            Ok(FallbackRecord {
                event_id: r.get(0)?,
                trace_id: r.get(1)?,
                event_type: r.get(2)?,
                reason: FallbackReason::parse(&reason)
                    .ok_or_else(|| corrupt_col(3, format!("unknown fallback reason {reason:?}")))?,
                target: r.get(4)?,
                at_ms: r.get(5)?,
                state,
                delivered_at_ms: if state == Reconciliation::Delivered {
                    r.get(7)?
                } else {
                    None
                },
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

fn read_stats(
    conn: &mut Connection,
    queue: &str,
    now_ms: UnixMillis,
) -> Result<QueueStats, StoreError> {
    let tx = conn.transaction()?;
    // All four are counts over ranges of the (queue, state, due_at) index.
    let (ready, oldest): (u64, Option<i64>) = tx
        .prepare_cached(COUNT_READY)?
        .query_row(params![queue, now_ms], |r| Ok((get_u64(r, 0)?, r.get(1)?)))?;
    let delayed = tx
        .prepare_cached(COUNT_DELAYED)?
        .query_row(params![queue, now_ms], |r| get_u64(r, 0))?;
    let in_flight = tx
        .prepare_cached(COUNT_IN_FLIGHT)?
        .query_row(params![queue], |r| get_u64(r, 0))?;
    let held = tx
        .prepare_cached(COUNT_HELD)?
        .query_row(params![queue], |r| get_u64(r, 0))?;
    let dead_lettered = tx
        .prepare_cached(COUNT_DEAD)?
        .query_row(params![queue], |r| get_u64(r, 0))?;
    let oldest_ready_age_ms = oldest
        .map(|due| u64::try_from(now_ms.saturating_sub(due)).unwrap_or(0))
        .unwrap_or(0);
    Ok(QueueStats {
        ready,
        delayed,
        held,
        in_flight,
        dead_lettered,
        oldest_ready_age_ms,
    })
}

// ---------------------------------------------------------------------------------------------
// The trait

impl Store for SqliteStore {
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
        let (event_id, lease_token) = (event_id.to_owned(), lease_token.to_owned());
        Box::pin(self.write(JobKind::Delivery, move |conn, ws| {
            tx_complete(
                conn,
                ws,
                &event_id,
                &lease_token,
                attempt,
                disposition,
                now_ms,
            )
        }))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Claiming, the next due time and the queue gauges must stay index searches as the
    /// backlog and the history grow.
    #[test]
    fn claim_next_due_and_counts_use_an_index() {
        let conn = Connection::open_in_memory().unwrap();
        // Plans as the store's connections make them.
        apply_plan_stability(&conn).unwrap();
        conn.execute_batch(schema::SCHEMA).unwrap();
        for (sql, index) in [
            (CLAIM_PICK, "events_claim"),
            (NEXT_DUE, "events_claim"),
            (COUNT_READY, "events_claim"),
            (COUNT_DELAYED, "events_claim"),
            (COUNT_IN_FLIGHT, "events_claim"),
            (COUNT_DEAD, "events_dead_queue"),
            (COUNT_HELD, "events_held"),
            (NEXT_HELD, "events_held"),
        ] {
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let args: Vec<Box<dyn rusqlite::ToSql>> =
                vec![Box::new("q"), Box::new(0i64), Box::new(10i64)];
            let n = stmt.parameter_count();
            let plan: Vec<String> = stmt
                .query_map(rusqlite::params_from_iter(args.iter().take(n)), |r| {
                    r.get::<_, String>(3)
                })
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            let plan = plan.join("\n");
            assert!(plan.contains(index), "{sql}\n{plan}");
            assert!(!plan.contains("SCAN events"), "{sql}\n{plan}");
        }
    }

    /// A schema 3 file (full claim index, no per-queue dead-letter index, no `deferred_by`,
    /// no ordering keys) is brought to the current version.
    #[test]
    fn schema_3_gets_the_partial_claim_index() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(schema::SCHEMA).unwrap();
        conn.execute_batch(
            "DROP INDEX events_claim;
             DROP INDEX events_dead_queue;
             DROP INDEX events_deferred;
             ALTER TABLE events DROP COLUMN deferred_by;
             DROP INDEX events_held;
             ALTER TABLE events DROP COLUMN ordering_key;
             ALTER TABLE events DROP COLUMN sequence;
             DROP TABLE ordering_keys;
             CREATE INDEX events_claim ON events(queue, state, due_at);
             PRAGMA user_version = 3;",
        )
        .unwrap();
        schema::ensure(&mut conn).unwrap();
        let index_sql = |name: &str| -> Option<String> {
            conn.query_row(
                "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()
            .unwrap()
        };
        assert!(index_sql("events_claim")
            .unwrap()
            .ends_with("WHERE state < 2"));
        assert!(index_sql("events_dead_queue").is_some());
        assert!(index_sql("events_deferred").is_some());
        assert!(index_sql("events_held")
            .unwrap()
            .ends_with("WHERE state = 4"));
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

    /// Every DLQ page, however deep, is a range search of the partial index, not a scan.
    #[test]
    fn dead_letter_pages_search_the_index() {
        let conn = Connection::open_in_memory().unwrap();
        // Plans as the store's connections make them.
        apply_plan_stability(&conn).unwrap();
        conn.execute_batch(schema::SCHEMA).unwrap();
        let mut stmt = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {DLQ_PAGE}"))
            .unwrap();
        let plan: Vec<String> = stmt
            .query_map(
                params![
                    None::<String>,
                    None::<String>,
                    0i64,
                    10i64,
                    5i64,
                    "evt_x",
                    10i64
                ],
                |r| r.get::<_, String>(3),
            )
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let plan = plan.join("\n");
        assert!(plan.contains("SEARCH e USING INDEX events_dlq"), "{plan}");
    }

    fn test_event(n: u32) -> NewEvent {
        NewEvent {
            id: format!("evt_{n:04}"),
            event_type: "order.created".into(),
            queue: "default".into(),
            target: "http://127.0.0.1:9/hook".into(),
            body: Bytes::from_static(b"{}"),
            content_type: Some("application/json".into()),
            trace_id: format!("trace-{n}"),
            idempotency_key: None,
            signature: SignatureScheme::StandardWebhooks,
            timeout_ms: 1000,
            retry_delays_ms: vec![100],
            jitter: 0.0,
            received_at_ms: 1000,
            due_at_ms: 1000,
            fallback: None,
            ordering_key: None,
        }
    }

    /// A claim binds a different limit almost every time; that must not make SQLite re-parse
    /// and re-plan the claim statement (it did, on every call, before QPSG was turned on).
    #[test]
    fn claims_with_changing_limits_reuse_the_prepared_plan() {
        let dir = tempfile::tempdir().unwrap();
        let conn = writer_for_test(dir.path());
        let mut ws = WriterState::new(HashMap::new(), None);
        for n in 0..20 {
            tx_enqueue(&conn, &mut ws, &test_event(n), None, 100).unwrap();
        }
        let mut claimed = 0;
        for limit in [1, 2, 3, 5, 4] {
            claimed += tx_claim(&conn, &mut ws, "default", 2000, limit, 30_000)
                .unwrap()
                .len();
        }
        assert_eq!(claimed, 15);
        let reprepared = conn
            .prepare_cached(CLAIM_PICK)
            .unwrap()
            .get_status(rusqlite::StatementStatus::RePrepare);
        assert_eq!(reprepared, 0);
    }

    type Reply<T> = oneshot::Receiver<Result<T, StoreError>>;

    fn job<T, F>(kind: JobKind, f: F) -> (Box<dyn Job>, Reply<T>)
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &mut WriterState) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        (Box::new(WriteJob { f, reply, kind }), rx)
    }

    fn enqueue_job(ev: NewEvent) -> (Box<dyn Job>, Reply<EnqueueOutcome>) {
        job(JobKind::Enqueue, move |conn, ws| {
            tx_enqueue(conn, ws, &ev, None, 100)
        })
    }

    fn event_rows(conn: &Connection) -> (i64, i64) {
        conn.query_row(
            "SELECT (SELECT COUNT(*) FROM events), (SELECT COUNT(*) FROM event_payloads)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    }

    fn writer_for_test(dir: &Path) -> Connection {
        let (mut conn, _) = open_writer(&dir.join("q.db"), &SqliteOptions::default()).unwrap();
        schema::ensure(&mut conn).unwrap();
        conn
    }

    /// Enqueues run without a savepoint. One that fails after writing part of its event (here
    /// a trigger refuses its payload row, after its state row went in) cannot be undone alone:
    /// its whole batch must be rolled back and answered, and the jobs after it retried.
    #[test]
    fn an_enqueue_failing_part_way_aborts_its_batch_and_leaves_no_trace() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = writer_for_test(dir.path());
        conn.execute_batch(
            "CREATE TRIGGER refuse_boom BEFORE INSERT ON event_payloads
             WHEN NEW.trace_id = 'trace-2' BEGIN SELECT RAISE(ABORT, 'boom'); END;",
        )
        .unwrap();
        let mut ws = WriterState::new(HashMap::new(), None);
        let commits = AtomicU64::new(0);
        let (j1, mut r1) = enqueue_job(test_event(1));
        let (j2, mut r2) = enqueue_job(test_event(2));
        let (j3, mut r3) = enqueue_job(test_event(3));

        let rest = run_batch(&mut conn, vec![j1, j2, j3], &mut ws, &commits);

        assert!(matches!(r1.try_recv(), Ok(Err(StoreError::Unavailable(_)))));
        assert!(matches!(r2.try_recv(), Ok(Err(StoreError::Unavailable(m))) if m.contains("boom")));
        assert!(r3.try_recv().is_err(), "not run yet, so not answered");
        assert_eq!(rest.len(), 1);
        assert_eq!(event_rows(&conn), (0, 0));
        assert_eq!(ws.current("default"), 0);
        assert_eq!(commits.load(Ordering::Relaxed), 0);

        let rest = run_batch(&mut conn, rest, &mut ws, &commits);
        assert!(rest.is_empty());
        assert_eq!(r3.try_recv().unwrap().unwrap(), EnqueueOutcome::Accepted);
        assert_eq!(event_rows(&conn), (1, 1));
        assert_eq!(ws.current("default"), 1);
    }

    /// A job refused before it writes anything fails alone, savepoint or not.
    #[test]
    fn a_job_refused_before_writing_does_not_fail_its_neighbours() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = writer_for_test(dir.path());
        let mut ws = WriterState::new(HashMap::new(), None);
        let commits = AtomicU64::new(0);
        for (n, kind) in [JobKind::Enqueue, JobKind::Delivery, JobKind::Other]
            .into_iter()
            .enumerate()
        {
            let n = 10 * n as u32;
            let (j1, mut r1) = enqueue_job(test_event(n + 1));
            let (j2, mut r2) = job::<(), _>(kind, |_, ws| {
                ws.adjust("default", 1);
                Err(StoreError::InvalidInput("refused".into()))
            });
            let (j3, mut r3) = enqueue_job(test_event(n + 3));

            let rest = run_batch(&mut conn, vec![j1, j2, j3], &mut ws, &commits);

            assert!(rest.is_empty());
            assert_eq!(r1.try_recv().unwrap().unwrap(), EnqueueOutcome::Accepted);
            assert!(matches!(
                r2.try_recv(),
                Ok(Err(StoreError::InvalidInput(_)))
            ));
            assert_eq!(r3.try_recv().unwrap().unwrap(), EnqueueOutcome::Accepted);
        }
        assert_eq!(event_rows(&conn), (6, 6));
        assert_eq!(ws.current("default"), 6);
    }

    /// A claim that meets a row it cannot decode fails before it has leased anything, so it
    /// fails alone (claims run without a savepoint), and no event is left in flight.
    #[test]
    fn a_claim_meeting_a_corrupt_row_fails_alone_and_leases_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = writer_for_test(dir.path());
        let mut ws = WriterState::new(HashMap::new(), None);
        let commits = AtomicU64::new(0);
        for n in 0..3 {
            tx_enqueue(&conn, &mut ws, &test_event(n), None, 100).unwrap();
        }
        // The second event to be picked no longer decodes.
        conn.execute(
            "UPDATE event_payloads SET signature = 'rot13' WHERE rid =
                 (SELECT rid FROM events WHERE id = 'evt_0001')",
            [],
        )
        .unwrap();
        let (j1, mut r1) = enqueue_job(test_event(10));
        let (j2, mut r2) = job(JobKind::Delivery, |conn, ws| {
            tx_claim(conn, ws, "default", 2000, 10, 30_000)
        });
        let (j3, mut r3) = enqueue_job(test_event(11));

        let rest = run_batch(&mut conn, vec![j1, j2, j3], &mut ws, &commits);

        assert!(rest.is_empty());
        assert!(matches!(r2.try_recv(), Ok(Err(StoreError::Corrupt(_)))));
        assert_eq!(r1.try_recv().unwrap().unwrap(), EnqueueOutcome::Accepted);
        assert_eq!(r3.try_recv().unwrap().unwrap(), EnqueueOutcome::Accepted);
        let in_flight: i64 = conn
            .query_row("SELECT COUNT(*) FROM events WHERE state <> 0", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(in_flight, 0);
        assert_eq!(event_rows(&conn), (5, 5));
    }

    /// The file deleted while a batch runs: the batch commits (to the deleted file, where the
    /// process still delivers from), but its enqueues cannot be promised durable, so they are
    /// answered "outcome unknown"; the other jobs of the batch stand.
    #[test]
    fn an_enqueue_whose_file_vanishes_during_its_batch_has_an_unknown_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = writer_for_test(dir.path());
        let path = dir.path().join("q.db");
        let mut ws = WriterState::new(HashMap::new(), None);
        ws.identity = Some(health::IdentityWatch::new(Arc::new(
            health::FileIdentity::capture(&path).unwrap(),
        )));
        let commits = AtomicU64::new(0);
        let (j1, r1) = enqueue_job(test_event(1));
        let gone = path.clone();
        let (j2, r2) = job(JobKind::Other, move |_, _| {
            std::fs::remove_file(&gone).map_err(|e| StoreError::Unavailable(e.to_string()))
        });
        let rest = run_batch(&mut conn, vec![j1, j2], &mut ws, &commits);
        assert!(rest.is_empty());
        let first = r1.blocking_recv().unwrap();
        assert!(
            matches!(&first, Err(StoreError::OutcomeUnknown(m)) if m.contains("deleted")),
            "{first:?}"
        );
        r2.blocking_recv().unwrap().unwrap();
        assert_eq!(
            event_rows(&conn),
            (1, 1),
            "the event is in the deleted file"
        );
        // (Later batches refuse enqueues before they run: `writer_loop`, covered by the
        // integration tests in `tests/it/store_faults.rs`.)
    }

    #[tokio::test]
    async fn a_store_that_cannot_write_is_not_ready() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("q.db"), SqliteOptions::default()).unwrap();
        store.ping().await.unwrap();

        // The write connection refuses writes from now on, as on a file system remounted
        // read-only (the tests run as root, which file modes do not stop). It cannot be turned
        // back: every later batch fails at `BEGIN IMMEDIATE`. Recovery is covered by the size
        // cap test below and the full-disk test of the integration suite.
        store
            .write(JobKind::Other, |conn, _| {
                conn.pragma_update(None, "query_only", true)?;
                Ok(())
            })
            .await
            .unwrap();
        let refused = store.enqueue(test_event(1), None, 100).await;
        assert!(
            matches!(refused, Err(StoreError::Unavailable(_))),
            "{refused:?}"
        );
        let not_ready = store.ping().await;
        assert!(
            matches!(&not_ready, Err(StoreError::Unavailable(m)) if m.contains("readonly")),
            "{not_ready:?}"
        );
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_store_at_its_size_cap_is_not_ready_until_there_is_room() {
        let dir = tempfile::tempdir().unwrap();
        let options = SqliteOptions {
            max_size_bytes: Some(1 << 20),
            ..SqliteOptions::default()
        };
        let store = SqliteStore::open(&dir.path().join("q.db"), options).unwrap();
        let mut n = 0;
        loop {
            let mut ev = test_event(n);
            ev.body = Bytes::from(vec![b'x'; 64 * 1024]);
            match store.enqueue(ev, None, 1000).await {
                Ok(EnqueueOutcome::Accepted) => n += 1,
                Err(StoreError::Unavailable(_)) => break,
                other => panic!("{other:?}"),
            }
            assert!(n < 100, "the cap never refused");
        }
        assert!(store.ping().await.is_err(), "full is not ready");
        // Deliver and purge everything: room again.
        let claimed = store
            .claim_due("default", 1000, 1000, 60_000)
            .await
            .unwrap();
        for ev in claimed {
            store
                .complete(&ev.id, &ev.lease_token, None, Disposition::Delivered, 1000)
                .await
                .unwrap();
        }
        store.purge(2000, 2000).await.unwrap();
        store.ping().await.unwrap();
        store.close().await.unwrap();
    }

    #[test]
    fn cursor_round_trips() {
        let c = encode_cursor(1234, "evt_a:b");
        assert_eq!(decode_cursor(&c).unwrap(), (1234, "evt_a:b".to_owned()));
        assert!(decode_cursor("nonsense").is_err());
    }
}
