//! A schema-1 SQLite file as released builds wrote it, for the migration tests.
//!
//! The DDL is frozen here on purpose (not imported from the crate): it is what users' existing
//! files hold, whatever the current schema becomes.

use std::path::Path;

use rusqlite::{params, Connection};

/// The version-1 schema, verbatim.
pub const SCHEMA_V1: &str = "
CREATE TABLE events (
    rid                INTEGER PRIMARY KEY,
    id                 TEXT NOT NULL UNIQUE,
    event_type         TEXT NOT NULL,
    queue              TEXT NOT NULL,
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
    state              INTEGER NOT NULL,
    due_at             INTEGER,
    lease_token        TEXT,
    attempts_made      INTEGER NOT NULL DEFAULT 0,
    round              INTEGER NOT NULL DEFAULT 1,
    delivered_at       INTEGER,
    dead_lettered_at   INTEGER,
    dead_letter_reason TEXT,
    body               BLOB NOT NULL
);
CREATE INDEX events_claim ON events(queue, state, due_at);
CREATE INDEX events_dlq ON events(dead_lettered_at, id) WHERE state = 3;
CREATE INDEX events_delivered ON events(delivered_at) WHERE state = 2;

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

/// One schema-1 `events` row; the fields the tests vary.
pub struct V1Event<'a> {
    pub id: &'a str,
    pub event_type: &'a str,
    pub queue: &'a str,
    pub target: &'a str,
    pub body: &'a [u8],
    /// 0 pending, 1 in flight, 2 delivered, 3 dead-lettered.
    pub state: i64,
    /// Due time while pending, lease expiry while in flight.
    pub due_at: Option<i64>,
    pub lease_token: Option<&'a str>,
    pub attempts_made: i64,
    pub received_at: i64,
    pub delivered_at: Option<i64>,
    pub dead_lettered_at: Option<i64>,
    pub dead_letter_reason: Option<&'a str>,
}

/// Creates a schema-1 file at `path` (WAL, `user_version` 1), as a v1 build left it.
pub fn create(path: &Path) -> Connection {
    let conn = Connection::open(path).unwrap();
    conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get::<_, String>(0))
        .unwrap();
    conn.execute_batch(SCHEMA_V1).unwrap();
    conn.pragma_update(None, "user_version", 1).unwrap();
    conn
}

/// Inserts `ev` the way a v1 build stored it.
pub fn insert(conn: &Connection, ev: &V1Event<'_>) {
    conn.execute(
        "INSERT INTO events (id, event_type, queue, target, content_type, trace_id,
             idempotency_key, signature, timeout_ms, retry_delays_ms, jitter, received_at,
             fallback, state, due_at, lease_token, attempts_made, round, delivered_at,
             dead_lettered_at, dead_letter_reason, body)
         VALUES (?1, ?2, ?3, ?4, 'application/json', ?5, NULL, 'standard_webhooks', 2000,
                 '[20,40]', 0.0, ?6, NULL, ?7, ?8, ?9, ?10, 1, ?11, ?12, ?13, ?14)",
        params![
            ev.id,
            ev.event_type,
            ev.queue,
            ev.target,
            format!("trace-{}", ev.id),
            ev.received_at,
            ev.state,
            ev.due_at,
            ev.lease_token,
            ev.attempts_made,
            ev.delivered_at,
            ev.dead_lettered_at,
            ev.dead_letter_reason,
            ev.body,
        ],
    )
    .unwrap();
}

/// Records a schema-1 attempt row.
pub fn insert_attempt(
    conn: &Connection,
    event_id: &str,
    attempt: i64,
    at: i64,
    status: Option<i64>,
) {
    conn.execute(
        "INSERT INTO attempts (event_id, round, attempt, started_at, latency_ms, status, error)
         VALUES (?1, 1, ?2, ?3, 5, ?4, CASE WHEN ?4 IS NULL THEN 'connect' END)",
        params![event_id, attempt, at, status],
    )
    .unwrap();
}
