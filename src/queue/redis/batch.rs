//! Group commit for the Redis store: a task that gathers the calls of concurrent callers into
//! one batch and runs the batch as one Redis command, the way the SQLite writer
//! (`queue/sqlite/writer.rs`) gathers jobs into one transaction.
//!
//! One batch is in flight at a time. While it runs, new calls queue up, and the next batch
//! takes everything that queued (up to a bound): under load the batches grow by themselves,
//! and a lone call still goes out at once, with no timer in its way. Each caller gets its own
//! result back, never a neighbour's.

use std::future::Future;

use tokio::sync::{mpsc, oneshot};

use crate::queue::StoreError;

type Reply<O> = oneshot::Sender<Result<O, StoreError>>;

/// The handle callers submit to; the task ends when every handle is dropped.
pub(super) struct Batcher<I, O> {
    tx: mpsc::UnboundedSender<(I, Reply<O>)>,
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// Spawns the batching task. `run` executes one batch and must answer one result per item,
    /// in the order given; items it leaves unanswered are told their outcome is unknown.
    pub(super) fn spawn<F, Fut>(max_batch: usize, mut run: F) -> Self
    where
        F: FnMut(Vec<I>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<Result<O, StoreError>>> + Send,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<(I, Reply<O>)>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut items = vec![first];
                while items.len() < max_batch {
                    match rx.try_recv() {
                        Ok(next) => items.push(next),
                        Err(_) => break,
                    }
                }
                let (items, replies): (Vec<I>, Vec<Reply<O>>) = items.into_iter().unzip();
                let results = run(items).await;
                for (result, reply) in results.into_iter().zip(replies) {
                    // A caller that gave up waiting has dropped its receiver: nothing to tell.
                    let _ = reply.send(result);
                }
            }
        });
        Batcher { tx }
    }

    /// Queues `item` for the next batch and waits for its own result.
    ///
    /// `gave_up` is the error for a caller whose batch did not answer (the task stopped, or
    /// the result was never sent): the item may or may not have run.
    pub(super) async fn submit(
        &self,
        item: I,
        gave_up: fn(String) -> StoreError,
    ) -> Result<O, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((item, reply))
            .map_err(|_| StoreError::Closed)?;
        answer
            .await
            .unwrap_or_else(|_| Err(gave_up("redis batch ended without an answer".into())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn concurrent_calls_share_batches_and_keep_their_own_results() {
        let batches = Arc::new(AtomicUsize::new(0));
        let seen = batches.clone();
        let (gate_tx, gate_rx) = tokio::sync::watch::channel(false);
        let batcher = Arc::new(Batcher::spawn(8, move |items: Vec<u32>| {
            seen.fetch_add(1, Ordering::SeqCst);
            let mut gate = gate_rx.clone();
            async move {
                // The first batch waits until every other call has queued behind it.
                let _ = gate.wait_for(|open| *open).await;
                items
                    .into_iter()
                    .map(|i| {
                        if i % 3 == 0 {
                            Err(StoreError::Unavailable(format!("no {i}")))
                        } else {
                            Ok(i * 10)
                        }
                    })
                    .collect()
            }
        }));
        let mut calls = Vec::new();
        for i in 1..=17u32 {
            let b = batcher.clone();
            calls.push(tokio::spawn(async move {
                (i, b.submit(i, StoreError::OutcomeUnknown).await)
            }));
            tokio::task::yield_now().await;
        }
        tokio::task::yield_now().await;
        gate_tx.send(true).unwrap();
        for call in calls {
            let (i, r) = call.await.unwrap();
            match r {
                Ok(v) => assert_eq!(v, i * 10),
                Err(StoreError::Unavailable(m)) => assert_eq!(m, format!("no {i}")),
                Err(e) => panic!("{i}: {e}"),
            }
        }
        // 17 calls in batches of at most 8: the first alone, then at least two more.
        let n = batches.load(Ordering::SeqCst);
        assert!((3..=5).contains(&n), "{n} batches");
    }

    #[tokio::test]
    async fn an_unanswered_item_is_an_unknown_outcome() {
        let batcher = Batcher::spawn(4, |_items: Vec<u32>| async { Vec::<Result<u32, _>>::new() });
        let r = batcher.submit(1, StoreError::OutcomeUnknown).await;
        assert!(matches!(r, Err(StoreError::OutcomeUnknown(_))), "{r:?}");
    }
}
