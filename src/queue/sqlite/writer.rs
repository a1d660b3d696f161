//! The writer thread: the only write connection, group commit of queued jobs in one
//! transaction per batch, the in-memory queue depths ([`WriterState`]) kept in step with what
//! commits, and how each job is answered once its batch's fate is known.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use rusqlite::Connection;
use tokio::sync::oneshot;

use super::{checkpoint, health, ENQUEUE_BATCH_SIZE_METRIC};
use crate::queue::StoreError;

/// What the writer thread keeps between jobs.
///
/// Queue depth (pending + in flight) per queue is the committed count plus the uncommitted
/// changes of the current batch and of the job running now, so a failed job or batch is
/// forgotten exactly as SQLite forgets its rows.
pub(super) struct WriterState {
    committed: HashMap<String, u64>,
    batch: HashMap<String, i64>,
    job: HashMap<String, i64>,
    /// Pages in use above which enqueues are refused (see [`SqliteOptions::max_size_bytes`]).
    enqueue_page_limit: Option<i64>,
    /// Where the writer reports its write outcomes for readiness.
    pub(super) health: Arc<health::Health>,
    /// The files as opened; `None` in tests that drive a bare connection.
    pub(super) identity: Option<health::IdentityWatch>,
    /// The last room check refused (kept here so `health` is touched only on a change).
    out_of_room: bool,
    /// The job running now was refused by the room check (not a write failure).
    room_refused_job: bool,
}

impl WriterState {
    pub(super) fn new(committed: HashMap<String, u64>, enqueue_page_limit: Option<i64>) -> Self {
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
    pub(super) fn check_room(&mut self, conn: &Connection) -> Result<(), StoreError> {
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

    pub(super) fn current(&self, queue: &str) -> u64 {
        let base = self.committed.get(queue).copied().unwrap_or(0);
        let delta =
            self.batch.get(queue).copied().unwrap_or(0) + self.job.get(queue).copied().unwrap_or(0);
        base.saturating_add_signed(delta)
    }

    pub(super) fn adjust(&mut self, queue: &str, delta: i64) {
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
pub(super) enum JobKind {
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
pub(super) enum Fate<'a> {
    Committed,
    /// Rolled back, or never committed: nothing of the batch is stored.
    Failed(&'a str),
    /// Committed, but the database file was found deleted or replaced right after: whether
    /// the write survives a restart is unknown.
    Unconfirmed(&'a str),
}

/// How a job's own run went, for the writer's health bookkeeping.
#[derive(Debug)]
pub(super) enum Ran {
    Ok,
    /// Refused or failed with an error that says nothing about the disk (a duplicate, bad
    /// input, a corrupt row).
    Refused,
    /// Failed with an I/O-class error (`Unavailable`).
    Failed(String),
}

/// Sends a job's reply once the fate of its transaction is known.
pub(super) type Finish = Box<dyn FnOnce(Fate<'_>) + Send>;

/// A type-erased write job.
pub(super) trait Job: Send {
    fn kind(&self) -> JobKind;
    /// Runs the job; `Ran::Ok` if it succeeded (its savepoint is kept).
    fn run(self: Box<Self>, conn: &Connection, ws: &mut WriterState) -> (Ran, Finish);
    /// Answers without running (the batch was aborted before reaching it).
    fn fail(self: Box<Self>, err: StoreError);
}

pub(super) struct WriteJob<T, F> {
    pub(super) f: F,
    pub(super) reply: oneshot::Sender<Result<T, StoreError>>,
    pub(super) kind: JobKind,
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

pub(super) fn writer_loop(
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
pub(super) fn run_batch(
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
pub(super) fn cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}
