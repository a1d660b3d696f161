//! The SQLite schema, its version, and the migrations from older versions.
//!
//! The version lives in `PRAGMA user_version`. Opening a file runs, in one `IMMEDIATE`
//! transaction, either the creation of the current schema (version 0: a new file) or every
//! migration from the file's version to the current one, so a crash mid-migration leaves the
//! old schema and its data untouched.
//!
//! # Version 2: hot state apart from the immutable payload
//!
//! In version 1 one `events` row held both what never changes (body, target, signing scheme,
//! retry schedule) and what changes on every claim and completion (state, due time, lease).
//! Each state change rewrote the whole row, body included (about 1.2 KiB for a 1 KiB body, so
//! three rows per 4 KiB page): a claim and a completion each dirtied about one page per event,
//! which the writer then wrote to the WAL and copied back at checkpoint. Version 2 keeps the
//! state in a small `events` row (about 60 events per page) and the rest in `event_payloads`,
//! written once at enqueue and only read afterwards, so a batch of claims or completions dirties
//! a handful of pages whatever the body size.

//!
//! # Version 4: a claim index without history
//!
//! `events_claim` became a partial index (`WHERE state < 2`): delivered and dead-lettered
//! events no longer sit in it until the retention purge, and a completion deletes one entry
//! instead of moving it. Queries that use it repeat `state < 2` so SQLite can prove they may.
//!
//! # Version 5: who deferred an event
//!
//! `events.deferred_by` names the host whose open circuit breaker deferred a pending event
//! (NULL otherwise). When that breaker closes, one indexed update makes those events due at
//! once; at startup every such event is made due, since the breaker that deferred it is gone.
//! The partial index holds only the few events deferred right now.
//!
//! # Version 6: ordering keys
//!
//! `events.ordering_key` and `events.sequence` place an event in its key (per queue), and
//! `ordering_keys` holds each key's last sequence and its current event (`active_rid`: the one
//! pending or leased now). Later events of a busy key are stored in state 4 (held), outside
//! the claim index, so a claim never even reads them; `events_held` finds the next in sequence
//! when the current one is delivered or dead-lettered. A key's row outlives its events so its
//! sequence never restarts.
//!
//! # Version 3: lease expiries counted
//!
//! `events.lease_expiries` counts the leases of an event that ran out without a result since
//! its last result. A delivery that kills its worker every time (a panic, an OOM kill, a
//! crash) never reports an attempt, so its retry matrix never runs out; this count lets the
//! claim dead-letter it instead of handing it out forever.

use rusqlite::{Connection, TransactionBehavior};

use crate::queue::StoreError;

/// The schema version this build writes; stored in `PRAGMA user_version`.
pub const SCHEMA_VERSION: i64 = 6;

/// The current schema, for a new file.
///
/// `events` (mutable state) and `event_payloads` (written once) share their `rid`: an event is
/// always inserted into both in one transaction and purged from both in one transaction.
pub const SCHEMA: &str = "
CREATE TABLE events (
    rid                INTEGER PRIMARY KEY,
    id                 TEXT NOT NULL UNIQUE,
    queue              TEXT NOT NULL,
    state              INTEGER NOT NULL,
    due_at             INTEGER,
    lease_token        TEXT,
    attempts_made      INTEGER NOT NULL DEFAULT 0,
    round              INTEGER NOT NULL DEFAULT 1,
    delivered_at       INTEGER,
    dead_lettered_at   INTEGER,
    dead_letter_reason TEXT,
    lease_expiries     INTEGER NOT NULL DEFAULT 0,
    deferred_by        TEXT,
    ordering_key       TEXT,
    sequence           INTEGER
);
CREATE INDEX events_claim ON events(queue, state, due_at) WHERE state < 2;
CREATE INDEX events_deferred ON events(deferred_by) WHERE deferred_by IS NOT NULL;
CREATE INDEX events_held ON events(queue, ordering_key, sequence) WHERE state = 4;

CREATE TABLE ordering_keys (
    queue       TEXT NOT NULL,
    key         TEXT NOT NULL,
    last_seq    INTEGER NOT NULL,
    active_rid  INTEGER,
    PRIMARY KEY (queue, key)
) WITHOUT ROWID;
CREATE INDEX events_dead_queue ON events(queue) WHERE state = 3;
CREATE INDEX events_dlq ON events(dead_lettered_at, id) WHERE state = 3;
CREATE INDEX events_delivered ON events(delivered_at) WHERE state = 2;

CREATE TABLE event_payloads (
    rid                INTEGER PRIMARY KEY,
    event_type         TEXT NOT NULL,
    target             TEXT NOT NULL,
    content_type       TEXT,
    trace_id           TEXT NOT NULL,
    idempotency_key    TEXT,
    signature          TEXT NOT NULL,
    timeout_ms         INTEGER NOT NULL,
    retry_delays_ms    TEXT NOT NULL,
    jitter             REAL NOT NULL,
    received_at        INTEGER NOT NULL,
    fallback           TEXT,
    -- Last on purpose: a large body spills into overflow pages, and SQLite must walk them to
    -- reach any column stored after it.
    body               BLOB NOT NULL
);

CREATE TABLE attempts (
    seq         INTEGER PRIMARY KEY,
    event_id    TEXT NOT NULL,
    round       INTEGER NOT NULL,
    attempt     INTEGER NOT NULL,
    started_at  INTEGER NOT NULL,
    latency_ms  INTEGER NOT NULL,
    status      INTEGER,
    error       TEXT
);
CREATE INDEX attempts_event ON attempts(event_id);

CREATE TABLE idempotency (
    event_type  TEXT NOT NULL,
    key         TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    expires_at  INTEGER NOT NULL,
    PRIMARY KEY (event_type, key)
) WITHOUT ROWID;
CREATE INDEX idempotency_expiry ON idempotency(expires_at);

CREATE TABLE fallbacks (
    seq         INTEGER PRIMARY KEY,
    at_ms       INTEGER NOT NULL,
    event_id    TEXT NOT NULL,
    trace_id    TEXT NOT NULL,
    event_type  TEXT NOT NULL,
    reason      TEXT NOT NULL,
    target      TEXT NOT NULL
);
CREATE INDEX fallbacks_at ON fallbacks(at_ms);
CREATE INDEX fallbacks_event ON fallbacks(event_id);
";

/// Version 1 to 2: split each `events` row into its state row and its payload row. Every
/// event keeps its `rid`, state, lease, attempt count and round, so queued and leased events
/// are claimed (and leases expire) exactly as before the upgrade. `attempts`, `idempotency`
/// and `fallbacks` are unchanged.
const MIGRATE_1_TO_2: &str = "
CREATE TABLE event_payloads (
    rid                INTEGER PRIMARY KEY,
    event_type         TEXT NOT NULL,
    target             TEXT NOT NULL,
    content_type       TEXT,
    trace_id           TEXT NOT NULL,
    idempotency_key    TEXT,
    signature          TEXT NOT NULL,
    timeout_ms         INTEGER NOT NULL,
    retry_delays_ms    TEXT NOT NULL,
    jitter             REAL NOT NULL,
    received_at        INTEGER NOT NULL,
    fallback           TEXT,
    body               BLOB NOT NULL
);
INSERT INTO event_payloads (rid, event_type, target, content_type, trace_id, idempotency_key,
                            signature, timeout_ms, retry_delays_ms, jitter, received_at,
                            fallback, body)
    SELECT rid, event_type, target, content_type, trace_id, idempotency_key, signature,
           timeout_ms, retry_delays_ms, jitter, received_at, fallback, body
    FROM events;
CREATE TABLE events_v2 (
    rid                INTEGER PRIMARY KEY,
    id                 TEXT NOT NULL UNIQUE,
    queue              TEXT NOT NULL,
    state              INTEGER NOT NULL,
    due_at             INTEGER,
    lease_token        TEXT,
    attempts_made      INTEGER NOT NULL DEFAULT 0,
    round              INTEGER NOT NULL DEFAULT 1,
    delivered_at       INTEGER,
    dead_lettered_at   INTEGER,
    dead_letter_reason TEXT
);
INSERT INTO events_v2 (rid, id, queue, state, due_at, lease_token, attempts_made, round,
                       delivered_at, dead_lettered_at, dead_letter_reason)
    SELECT rid, id, queue, state, due_at, lease_token, attempts_made, round, delivered_at,
           dead_lettered_at, dead_letter_reason
    FROM events;
DROP TABLE events;
ALTER TABLE events_v2 RENAME TO events;
CREATE INDEX events_claim ON events(queue, state, due_at);
CREATE INDEX events_dlq ON events(dead_lettered_at, id) WHERE state = 3;
CREATE INDEX events_delivered ON events(delivered_at) WHERE state = 2;
";

/// Version 2 to 3: count lease expiries. Existing events start at 0.
const MIGRATE_2_TO_3: &str =
    "ALTER TABLE events ADD COLUMN lease_expiries INTEGER NOT NULL DEFAULT 0;";

/// Version 3 to 4: the claim index holds only pending and in-flight events, so delivered and
/// dead-lettered history no longer grows it and a completion only removes an entry; dead
/// letters are counted per queue through their own small index.
const MIGRATE_3_TO_4: &str = "
DROP INDEX events_claim;
CREATE INDEX events_claim ON events(queue, state, due_at) WHERE state < 2;
CREATE INDEX events_dead_queue ON events(queue) WHERE state = 3;
";

/// Version 4 to 5: remember which host's breaker deferred a pending event. Existing events
/// were deferred by nobody this build can wake, and are claimed at their due time as before.
const MIGRATE_4_TO_5: &str = "
ALTER TABLE events ADD COLUMN deferred_by TEXT;
CREATE INDEX events_deferred ON events(deferred_by) WHERE deferred_by IS NOT NULL;
";

/// Version 5 to 6: ordering keys. Existing events have none.
const MIGRATE_5_TO_6: &str = "
ALTER TABLE events ADD COLUMN ordering_key TEXT;
ALTER TABLE events ADD COLUMN sequence INTEGER;
CREATE INDEX events_held ON events(queue, ordering_key, sequence) WHERE state = 4;
CREATE TABLE ordering_keys (
    queue       TEXT NOT NULL,
    key         TEXT NOT NULL,
    last_seq    INTEGER NOT NULL,
    active_rid  INTEGER,
    PRIMARY KEY (queue, key)
) WITHOUT ROWID;
";

/// `MIGRATIONS[i]` brings a file from version `i + 1` to `i + 2`; a file at version `v` runs
/// every one from index `v - 1` on, in order.
const MIGRATIONS: [&str; 5] = [
    MIGRATE_1_TO_2,
    MIGRATE_2_TO_3,
    MIGRATE_3_TO_4,
    MIGRATE_4_TO_5,
    MIGRATE_5_TO_6,
];
const _: () = assert!(
    MIGRATIONS.len() as i64 == SCHEMA_VERSION - 1,
    "one migration per version"
);

/// Creates the schema of a new file, or brings an older file up to [`SCHEMA_VERSION`], in one
/// transaction.
///
/// Fails with [`StoreError::Corrupt`] for a version newer than this build (a downgrade): such
/// a file is refused rather than misread.
pub fn ensure(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    match version {
        0 => tx.execute_batch(SCHEMA)?,
        SCHEMA_VERSION => {}
        1..SCHEMA_VERSION => {
            let queued: i64 = tx.query_row(
                "SELECT COUNT(*) FROM events WHERE state IN (0, 1)",
                [],
                |r| r.get(0),
            )?;
            tracing::info!(
                queued,
                "migrating the sqlite store from schema {version} to {SCHEMA_VERSION}"
            );
            for migration in &MIGRATIONS[(version - 1) as usize..] {
                tx.execute_batch(migration)?;
            }
        }
        other => {
            return Err(StoreError::Corrupt(format!(
                "schema version {other} is not supported (this build knows {SCHEMA_VERSION})"
            )))
        }
    }
    if version != SCHEMA_VERSION {
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    }
    tx.commit()?;
    Ok(())
}
