//! Waking idle delivery workers when an event becomes due.

use tokio::sync::futures::Notified;
use tokio::sync::Notify;

/// Told whenever something made an event due in this process (an accepted enqueue, a replay,
/// a breaker's deferred events released), so an idle worker claims it at once instead of at
/// its next look at the store. Another instance's enqueues are not seen here: workers also
/// look at the store on their own schedule.
#[derive(Debug, Default)]
pub struct Wakeup(Notify);

impl Wakeup {
    /// Wakes every worker waiting now (or holding a [`Wakeup::notified`] made before this).
    pub fn notify(&self) {
        self.0.notify_waiters();
    }

    /// A future that completes at the next [`Wakeup::notify`]. Make it *before* looking at
    /// the store: a notify between that look and the wait is then kept, not lost.
    pub fn notified(&self) -> Notified<'_> {
        self.0.notified()
    }
}
