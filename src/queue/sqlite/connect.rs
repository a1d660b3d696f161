//! Opening SQLite connections: the pragmas every connection gets, the one write connection
//! (WAL, synchronous level, size cap), the read-only pool connections, and the queue depths
//! loaded at open.

use std::collections::HashMap;
use std::path::Path;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags};

use super::rows::{get_u64, to_i64};
use super::SqliteOptions;
use crate::queue::StoreError;

pub(super) fn apply_common_pragmas(
    conn: &Connection,
    options: &SqliteOptions,
) -> Result<(), StoreError> {
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
pub(super) fn apply_plan_stability(conn: &Connection) -> Result<(), StoreError> {
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    Ok(())
}

/// Opens the write connection; also returns the page count at which enqueues stop when a
/// size cap is configured.
pub(super) fn open_writer(
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

pub(super) fn open_reader(path: &Path, options: &SqliteOptions) -> Result<Connection, StoreError> {
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

pub(super) fn load_depths(conn: &Connection) -> Result<HashMap<String, u64>, StoreError> {
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
