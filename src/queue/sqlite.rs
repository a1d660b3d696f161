//! TEMPORARY placeholder replaced by the wt-queue branch.
use super::*;
/// Options.
#[derive(Debug, Clone, Default)]
pub struct SqliteOptions {
    pub fsync: bool,
}
/// Store.
#[derive(Debug)]
pub struct SqliteStore;
impl SqliteStore {
    /// Open.
    pub fn open(_p: &std::path::Path, _o: SqliteOptions) -> Result<Self, StoreError> {
        Err(StoreError::Closed)
    }
}
impl Store for SqliteStore {
    fn enqueue(
        &self,
        _event: NewEvent,
        _idempotency: Option<IdempotencyClaim>,
        _max_depth: u64,
    ) -> StoreFuture<'_, EnqueueOutcome> {
        Box::pin(async { Err(StoreError::Closed) })
    }
    fn find_idempotent(
        &self,
        _event_type: &str,
        _key: &str,
        _now_ms: UnixMillis,
    ) -> StoreFuture<'_, Option<String>> {
        Box::pin(async { Err(StoreError::Closed) })
    }
    fn claim_due(
        &self,
        _queue: &str,
        _now_ms: UnixMillis,
        _limit: usize,
        _lease_ms: u64,
    ) -> StoreFuture<'_, Vec<ClaimedEvent>> {
        Box::pin(async { Err(StoreError::Closed) })
    }
    fn next_due_at(&self, _queue: &str) -> StoreFuture<'_, Option<UnixMillis>> {
        Box::pin(async { Err(StoreError::Closed) })
    }
    fn complete(
        &self,
        _event_id: &str,
        _lease_token: &str,
        _attempt: Option<AttemptRecord>,
        _disposition: Disposition,
        _now_ms: UnixMillis,
    ) -> StoreFuture<'_, bool> {
        Box::pin(async { Err(StoreError::Closed) })
    }
    fn release(&self, _leases: Vec<(String, String)>, _now_ms: UnixMillis) -> StoreFuture<'_, ()> {
        Box::pin(async { Err(StoreError::Closed) })
    }
    fn event(&self, _event_id: &str) -> StoreFuture<'_, Option<EventRecord>> {
        Box::pin(async { Err(StoreError::Closed) })
    }
    fn list_dead_letters(
        &self,
        _filter: DlqFilter,
        _cursor: Option<String>,
        _limit: usize,
    ) -> StoreFuture<'_, Page<DeadLetter>> {
        Box::pin(async { Err(StoreError::Closed) })
    }
    fn replay(&self, _event_ids: Vec<String>, _now_ms: UnixMillis) -> StoreFuture<'_, Vec<String>> {
        Box::pin(async { Err(StoreError::Closed) })
    }
    fn replay_matching(&self, _filter: DlqFilter, _now_ms: UnixMillis) -> StoreFuture<'_, u64> {
        Box::pin(async { Err(StoreError::Closed) })
    }
    fn fallbacks(
        &self,
        _since_ms: UnixMillis,
        _limit: usize,
    ) -> StoreFuture<'_, Vec<FallbackRecord>> {
        Box::pin(async { Err(StoreError::Closed) })
    }
    fn purge(&self, _before_ms: UnixMillis, _now_ms: UnixMillis) -> StoreFuture<'_, u64> {
        Box::pin(async { Err(StoreError::Closed) })
    }
    fn stats(&self, _queue: &str, _now_ms: UnixMillis) -> StoreFuture<'_, QueueStats> {
        Box::pin(async { Err(StoreError::Closed) })
    }
    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(async { Err(StoreError::Closed) })
    }
    fn close(&self) -> StoreFuture<'_, ()> {
        Box::pin(async { Err(StoreError::Closed) })
    }
}
