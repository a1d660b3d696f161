//! Key names, built here for the `KEYS` each script declares. The scripts build the same
//! names from the prefix in `ARGV[1]` (`lua.rs`); the store suite's key check runs every
//! script against a real server and fails when a script touches a key it did not declare
//! (outside the families it documents as found at run time) or one without the hash tag.
//!
//! Every key carries the one hash tag `{key_prefix}`: on a cluster all of a deployment's keys
//! live in one slot, so every script is single-slot. Per-queue tags would spread queues over
//! slots, but the dead-letter index, the delivered and fallback indexes, the breaker-deferral
//! sets and the idempotency keys are shared by all queues and written by the same scripts as
//! the queue keys (a completion writes the queue's depth and the global `dlq`), so those
//! scripts would cross slots; splitting them per queue is a data-layout change left for later.

use super::RedisStore;

impl RedisStore {
    /// `{prefix}:<rest>`.
    pub(super) fn key(&self, rest: &str) -> String {
        format!("{}:{rest}", self.inner.prefix)
    }

    /// The event hash `ev:<id>`.
    pub(super) fn ev_key(&self, id: &str) -> String {
        format!("{}:ev:{id}", self.inner.prefix)
    }

    /// The attempt list `att:<id>` of an event stored before attempts moved into its hash.
    pub(super) fn att_key(&self, id: &str) -> String {
        format!("{}:att:{id}", self.inner.prefix)
    }

    /// The per-queue key `q:<queue>:<suffix>`.
    pub(super) fn queue_key(&self, queue: &str, suffix: &str) -> String {
        format!("{}:q:{queue}:{suffix}", self.inner.prefix)
    }

    /// The queue's keys named by `suffixes`.
    pub(super) fn queue_keys(&self, queue: &str, suffixes: &[&str]) -> Vec<String> {
        suffixes.iter().map(|s| self.queue_key(queue, s)).collect()
    }

    /// The held set of an ordering key (`held_set` in `lua.rs`: the queue length-prefixed).
    pub(super) fn held_key(&self, queue: &str, ordering_key: &str) -> String {
        format!(
            "{}:okh:{}:{queue}:{ordering_key}",
            self.inner.prefix,
            queue.len()
        )
    }

    /// A breaker's deferral set `bd:<host>`.
    pub(super) fn deferral_key(&self, host: &str) -> String {
        format!("{}:bd:{host}", self.inner.prefix)
    }
}
