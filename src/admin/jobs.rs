//! Background jobs of the admin API: bulk dead-letter replay.
//!
//! `POST /v1/dlq/replay` starts a [`ReplayJob`] and answers `202 {"job_id"}` at once;
//! `GET /v1/jobs/{id}` shows how far it got. A replay of a large DLQ takes longer than any
//! sensible request timeout, and a caller that gave up could not tell what had been replayed.
//!
//! A job works in batches of [`BATCH`] ids, one store call each, so no single store write
//! holds up ingress, and wakes the delivery workers after each batch. Finished jobs stay
//! visible for [`KEEP_FINISHED_FOR`], at most [`KEEP_FINISHED`] of them.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::clock::{now_ms, rfc3339};
use crate::context::Context;
use crate::queue::{DlqFilter, EventState, StoreError};

/// Ids per store call (one `dead_letter_ids` page, one `replay`).
pub const BATCH: usize = 500;
/// Finished jobs kept for `GET /v1/jobs/{id}`.
pub const KEEP_FINISHED: usize = 100;
/// How long a finished job stays visible.
pub const KEEP_FINISHED_FOR: Duration = Duration::from_secs(3600);
/// Jobs allowed to run at once; more get 429.
pub const MAX_RUNNING: usize = 4;
/// Attempts per store call before the job fails (a Redis failover, a busy SQLite writer).
const STORE_ATTEMPTS: u32 = 3;

/// What a replay job works on.
#[derive(Debug, Clone)]
pub enum Selection {
    /// These event ids (deduplicated, in the order given).
    Ids(Vec<String>),
    /// Every dead letter the filter matches (an empty filter: all of them).
    Filter(DlqFilter),
}

/// Lifecycle of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Running,
    Done,
    /// A store call failed [`STORE_ATTEMPTS`] times; `errors` says why. What was replayed
    /// before stays replayed.
    Failed,
}

/// How far a replay job got.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct Progress {
    /// Selected: the ids given, or the dead letters the filter matched when the job started
    /// (counted first, before anything is replayed).
    pub matched: u64,
    /// Moved back to their queue (always 0 in a dry run).
    pub replayed: u64,
    /// Selected but not replayed: not in the DLQ (unknown id, already delivered, replayed by
    /// someone else meanwhile).
    pub skipped: u64,
    /// Still to do: matched - replayed - skipped.
    pub remaining: u64,
}

/// Counters besides the progress.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct Counts {
    /// Store calls that replayed (or, in a dry run, counted) a batch.
    pub batches: u64,
    /// Dry run only: how many a real run would replay now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub would_replay: Option<u64>,
}

/// A bulk replay, as `GET /v1/jobs/{id}` shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ReplayJob {
    /// `job_<ulid>`.
    pub id: String,
    /// Always `dlq_replay`.
    pub kind: &'static str,
    pub state: JobState,
    pub dry_run: bool,
    pub progress: Progress,
    pub counts: Counts,
    /// Ids given that were not in the DLQ (id replays only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub missing_ids: Vec<String>,
    /// Store errors, oldest first (retried ones included).
    pub errors: Vec<String>,
    pub started_at_ms: i64,
    pub started_at: String,
    pub finished_at_ms: Option<i64>,
    pub finished_at: Option<String>,
}

/// The jobs of one admin API.
#[derive(Debug, Default)]
pub struct Jobs {
    jobs: Mutex<VecDeque<ReplayJob>>,
}

/// Why a job was not started.
#[derive(Debug, PartialEq, Eq)]
pub struct TooManyJobs;

impl Jobs {
    /// A job by id, if it is running or finished recently.
    pub fn get(&self, id: &str) -> Option<ReplayJob> {
        let mut jobs = self.lock();
        evict(&mut jobs, now_ms());
        jobs.iter().find(|j| j.id == id).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<ReplayJob>> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut ReplayJob)) {
        if let Some(job) = self.lock().iter_mut().find(|j| j.id == id) {
            f(job);
        }
    }

    /// Starts a replay in the background and returns its id.
    pub fn start_replay(
        self: &Arc<Self>,
        ctx: Arc<Context>,
        selection: Selection,
        dry_run: bool,
    ) -> Result<String, TooManyJobs> {
        let now = now_ms();
        let id = format!("job_{}", ulid::Ulid::new().to_string().to_lowercase());
        {
            let mut jobs = self.lock();
            evict(&mut jobs, now);
            if jobs.iter().filter(|j| j.state == JobState::Running).count() >= MAX_RUNNING {
                return Err(TooManyJobs);
            }
            jobs.push_back(ReplayJob {
                id: id.clone(),
                kind: "dlq_replay",
                state: JobState::Running,
                dry_run,
                progress: Progress::default(),
                counts: Counts::default(),
                missing_ids: Vec::new(),
                errors: Vec::new(),
                started_at_ms: now,
                started_at: rfc3339(now),
                finished_at_ms: None,
                finished_at: None,
            });
        }
        let jobs = self.clone();
        let job_id = id.clone();
        tokio::spawn(async move {
            let run = Run {
                jobs: &jobs,
                id: &job_id,
                ctx: &ctx,
                dry_run,
                started_ms: now,
            };
            let result = match selection {
                Selection::Ids(ids) => run.ids(ids).await,
                Selection::Filter(filter) => run.filter(filter).await,
            };
            let finished = now_ms();
            jobs.update(&job_id, |j| {
                j.state = match result {
                    Ok(()) => JobState::Done,
                    Err(()) => JobState::Failed,
                };
                if j.state == JobState::Done {
                    // Counted but gone from the DLQ before the replay reached them.
                    j.progress.skipped += j.progress.remaining;
                    j.progress.remaining = 0;
                }
                j.finished_at_ms = Some(finished);
                j.finished_at = Some(rfc3339(finished));
            });
            tracing::info!(job = %job_id, "dead-letter replay job finished");
        });
        Ok(id)
    }
}

/// Drops finished jobs older than [`KEEP_FINISHED_FOR`] and the oldest beyond
/// [`KEEP_FINISHED`]; running jobs always stay.
fn evict(jobs: &mut VecDeque<ReplayJob>, now: i64) {
    let keep_ms = KEEP_FINISHED_FOR.as_millis() as i64;
    jobs.retain(|j| j.finished_at_ms.is_none_or(|f| now - f < keep_ms));
    let mut finished = jobs.iter().filter(|j| j.finished_at_ms.is_some()).count();
    jobs.retain(|j| {
        if finished > KEEP_FINISHED && j.finished_at_ms.is_some() {
            finished -= 1;
            false
        } else {
            true
        }
    });
}

/// One job's run.
struct Run<'a> {
    jobs: &'a Jobs,
    id: &'a str,
    ctx: &'a Context,
    dry_run: bool,
    started_ms: i64,
}

impl Run<'_> {
    /// Calls the store, retrying a failed call; every error is recorded on the job.
    async fn store_call<T, F>(&self, mut call: impl FnMut() -> F) -> Result<T, ()>
    where
        F: std::future::Future<Output = Result<T, StoreError>>,
    {
        let mut attempt = 1;
        loop {
            match call().await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let permanent = matches!(e, StoreError::InvalidInput(_) | StoreError::Closed);
                    tracing::warn!(job = %self.id, error = %e, attempt, "dead-letter replay job: store call failed");
                    self.jobs.update(self.id, |j| j.errors.push(e.to_string()));
                    if permanent || attempt >= STORE_ATTEMPTS {
                        return Err(());
                    }
                    tokio::time::sleep(Duration::from_millis(250 * 4u64.pow(attempt - 1))).await;
                    attempt += 1;
                }
            }
        }
    }

    async fn ids(&self, ids: Vec<String>) -> Result<(), ()> {
        let mut seen = std::collections::HashSet::new();
        let ids: Vec<String> = ids.into_iter().filter(|i| seen.insert(i.clone())).collect();
        let total = ids.len() as u64;
        self.jobs.update(self.id, |j| {
            j.progress.matched = total;
            j.progress.remaining = total;
            if self.dry_run {
                j.counts.would_replay = Some(0);
            }
        });
        let store = self.ctx.store();
        for batch in ids.chunks(BATCH) {
            let in_dlq: Vec<String> = if self.dry_run {
                let mut found = Vec::new();
                for id in batch {
                    if let Some(e) = self.store_call(|| store.event(id)).await? {
                        if e.state == EventState::DeadLettered {
                            found.push(id.clone());
                        }
                    }
                }
                found
            } else {
                let replayed = self
                    .store_call(|| store.replay(batch.to_vec(), now_ms()))
                    .await?;
                self.ctx.wakeup().notify();
                replayed
            };
            let missing: Vec<String> = batch
                .iter()
                .filter(|id| !in_dlq.contains(id))
                .cloned()
                .collect();
            self.jobs.update(self.id, |j| {
                let found = in_dlq.len() as u64;
                if self.dry_run {
                    *j.counts.would_replay.get_or_insert(0) += found;
                } else {
                    j.progress.replayed += found;
                }
                j.progress.skipped += missing.len() as u64;
                j.progress.remaining -= batch.len() as u64;
                j.counts.batches += 1;
                j.missing_ids.extend(missing);
            });
        }
        Ok(())
    }

    async fn filter(&self, mut filter: DlqFilter) -> Result<(), ()> {
        // Only what was dead-lettered when the job started: an event replayed here that fails
        // again is not replayed twice, and both passes below see the same set.
        let bound = self.started_ms + 1;
        filter.until_ms = Some(filter.until_ms.map_or(bound, |u| u.min(bound)));
        let store = self.ctx.store();
        // Pass 1 counts, so progress has a total.
        let mut cursor = None;
        loop {
            let page = self
                .store_call(|| store.dead_letter_ids(filter.clone(), cursor.clone(), BATCH))
                .await?;
            let n = page.items.len() as u64;
            self.jobs.update(self.id, |j| {
                j.progress.matched += n;
                j.progress.remaining += n;
                if self.dry_run {
                    j.counts.batches += 1;
                }
            });
            match page.next_cursor {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        if self.dry_run {
            self.jobs.update(self.id, |j| {
                j.counts.would_replay = Some(j.progress.matched);
                j.progress.remaining = 0;
            });
            return Ok(());
        }
        // Pass 2 replays page by page. The keyset cursor only moves towards older entries, so
        // replayed events leaving the DLQ do not shift the pages still to come.
        let mut cursor = None;
        loop {
            let page = self
                .store_call(|| store.dead_letter_ids(filter.clone(), cursor.clone(), BATCH))
                .await?;
            let ids = page.items;
            if !ids.is_empty() {
                let listed = ids.len() as u64;
                let replayed = self
                    .store_call(|| store.replay(ids.clone(), now_ms()))
                    .await?
                    .len() as u64;
                self.ctx.wakeup().notify();
                self.jobs.update(self.id, |j| {
                    j.progress.replayed += replayed;
                    j.progress.skipped += listed - replayed;
                    j.progress.remaining = j.progress.remaining.saturating_sub(listed);
                    // One dead-lettered in the start's millisecond after the count: still
                    // matched, so the numbers keep adding up.
                    let seen = j.progress.replayed + j.progress.skipped;
                    j.progress.matched = j.progress.matched.max(seen + j.progress.remaining);
                    j.counts.batches += 1;
                });
            }
            match page.next_cursor {
                Some(next) => cursor = Some(next),
                None => return Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(id: &str, at: i64) -> ReplayJob {
        ReplayJob {
            id: id.into(),
            kind: "dlq_replay",
            state: JobState::Done,
            dry_run: false,
            progress: Progress::default(),
            counts: Counts::default(),
            missing_ids: Vec::new(),
            errors: Vec::new(),
            started_at_ms: at,
            started_at: rfc3339(at),
            finished_at_ms: Some(at),
            finished_at: Some(rfc3339(at)),
        }
    }

    #[test]
    fn finished_jobs_are_kept_for_a_while_and_bounded_in_number() {
        let now = 10_000_000;
        let mut jobs: VecDeque<ReplayJob> = (0..KEEP_FINISHED as i64 + 5)
            .map(|i| finished(&format!("j{i}"), now - 1000 + i))
            .collect();
        let mut running = finished("running", now);
        running.state = JobState::Running;
        running.finished_at_ms = None;
        jobs.push_front(running);
        jobs.push_front(finished("old", now - KEEP_FINISHED_FOR.as_millis() as i64));
        evict(&mut jobs, now);
        assert_eq!(jobs.len(), KEEP_FINISHED + 1);
        assert_eq!(jobs[0].id, "running", "a running job is never evicted");
        assert_eq!(jobs[1].id, "j5", "the oldest finished ones go first");
        assert!(!jobs.iter().any(|j| j.id == "old"), "expired");
    }
}
