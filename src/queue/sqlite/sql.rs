//! The SQL text the store runs more than once, as named constants, and the integer codes of
//! `events.state`. Kept apart so the index tests (in `tests.rs`) can check every plan.

// `events.state` values. Integers keep the claim index small.
pub(super) const PENDING: i64 = 0;
pub(super) const IN_FLIGHT: i64 = 1;
pub(super) const DELIVERED: i64 = 2;
pub(super) const DEAD_LETTERED: i64 = 3;
/// Waiting for an earlier event of its ordering key; outside the claim index (`state < 2`).
pub(super) const HELD: i64 = 4;

/// Columns of `event_payloads` read into a [`ClaimedEvent`], in the order [`claimed_from_row`]
/// expects.
pub(super) const PAYLOAD_COLUMNS: &str = "event_type, target, body, content_type, trace_id, \
     idempotency_key, signature, timeout_ms, retry_delays_ms, jitter";

/// Due events of one queue, oldest due first. Each half is a range scan of `events_claim`
/// stopped at `limit`, so at most `2 * limit` rows are sorted whatever the backlog.
pub(super) const CLAIM_PICK: &str = "
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
pub(super) const NEXT_DUE: &str = "SELECT MIN(m) FROM (
    SELECT MIN(due_at) AS m FROM events WHERE queue = ?1 AND state = 0 AND state < 2
    UNION ALL
    SELECT MIN(due_at) AS m FROM events WHERE queue = ?1 AND state = 1 AND state < 2)";
/// Ready events of a queue and the oldest due time among them.
pub(super) const COUNT_READY: &str = "SELECT COUNT(*), MIN(due_at) FROM events
    WHERE queue = ?1 AND state = 0 AND state < 2 AND due_at <= ?2";
/// Pending events of a queue due later.
pub(super) const COUNT_DELAYED: &str = "SELECT COUNT(*) FROM events
    WHERE queue = ?1 AND state = 0 AND state < 2 AND due_at > ?2";
/// Leased events of a queue.
pub(super) const COUNT_IN_FLIGHT: &str =
    "SELECT COUNT(*) FROM events WHERE queue = ?1 AND state = 1 AND state < 2";
/// Events of a queue held behind an earlier event of their key (index `events_held`).
pub(super) const COUNT_HELD: &str = "SELECT COUNT(*) FROM events WHERE queue = ?1 AND state = 4";
/// The next event of an ordering key, lowest sequence first (index `events_held`).
pub(super) const NEXT_HELD: &str =
    "SELECT rid FROM events WHERE queue = ?1 AND ordering_key = ?2 AND state = 4
     ORDER BY sequence LIMIT 1";
/// Dead letters of a queue (index `events_dead_queue`).
pub(super) const COUNT_DEAD: &str = "SELECT COUNT(*) FROM events WHERE queue = ?1 AND state = 3";

/// One page of dead letters, newest first (see `read_dead_letters` for the parameters).
pub(super) const DLQ_PAGE: &str =
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
