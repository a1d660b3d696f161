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

/// A source of unix-ms time that tests can drive.
///
/// Production code uses [`Clock::System`]; a test builds a [`ManualClock`] and hands its
/// [`ManualClock::clock`] to the component under test, so time-dependent behaviour (a breaker's
/// rolling window, its recovery period) is checked without sleeping. The match on the variant
/// is the only cost over calling [`now_ms`] directly.
#[derive(Debug, Clone, Default)]
pub enum Clock {
    /// The wall clock.
    #[default]
    System,
    /// A clock that moves only when its [`ManualClock`] says so.
    Manual(std::sync::Arc<std::sync::atomic::AtomicI64>),
}

impl Clock {
    /// Milliseconds since the Unix epoch, by this clock.
    pub fn now_ms(&self) -> i64 {
        match self {
            Self::System => now_ms(),
            Self::Manual(t) => t.load(std::sync::atomic::Ordering::Acquire),
        }
    }
}

/// The handle that moves a [`Clock::Manual`].
#[derive(Debug, Clone)]
pub struct ManualClock(std::sync::Arc<std::sync::atomic::AtomicI64>);

impl ManualClock {
    /// A clock standing at `start_ms`.
    pub fn new(start_ms: i64) -> Self {
        Self(std::sync::Arc::new(std::sync::atomic::AtomicI64::new(
            start_ms,
        )))
    }

    /// The clock to hand to the component under test.
    pub fn clock(&self) -> Clock {
        Clock::Manual(self.0.clone())
    }

    /// Moves the clock forward by `ms`.
    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, std::sync::atomic::Ordering::AcqRel);
    }

    /// The time it shows.
    pub fn now_ms(&self) -> i64 {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
}
