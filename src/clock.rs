//! Wall-clock time in the units the store and headers use.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        // A clock before 1970 is a broken host; 0 keeps arithmetic sane rather than panicking.
        .unwrap_or(0)
}

/// RFC 3339 rendering of a unix-ms time, for humans (CLI tables, logs).
pub fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Parses RFC 3339 (`2026-11-23T10:00:00Z`) into unix ms.
pub fn parse_rfc3339(s: &str) -> Result<i64, humantime::TimestampError> {
    let t = humantime::parse_rfc3339_weak(s)?;
    Ok(t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0))
}
