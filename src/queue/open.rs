//! Which store a deployment runs on, and opening it.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use super::redis::{RedisOptions, RedisStore};
use super::sqlite::{SqliteOptions, SqliteStore};
use super::{Store, StoreError};
use crate::secret::Redacted;

/// Where the async queue lives.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum StoreSettings {
    Sqlite {
        path: PathBuf,
        fsync: bool,
        max_size_bytes: Option<u64>,
    },
    Redis {
        /// May carry a password; shown as `redis://***@host:port`.
        url: Redacted,
        key_prefix: String,
        /// Idle time after which another instance takes over a leased event.
        claim_idle_ms: u64,
        /// Replicas that must acknowledge each enqueue (`WAIT`); 0 = none.
        wait_replicas: u32,
        /// Bound on that `WAIT`.
        wait_timeout_ms: u64,
    },
}

/// Opens the store `settings` name: the SQLite file (created with its schema if new, migrated
/// if older) or a connection to Redis (its scripts loaded and consumer groups made).
pub async fn open(settings: &StoreSettings) -> Result<Arc<dyn Store>, StoreError> {
    match settings {
        StoreSettings::Sqlite {
            path,
            fsync,
            max_size_bytes,
        } => {
            let options = SqliteOptions {
                fsync: *fsync,
                max_size_bytes: *max_size_bytes,
                ..Default::default()
            };
            let path = path.clone();
            // Opening runs the schema migration and an integrity check: blocking file work.
            let store = tokio::task::spawn_blocking(move || SqliteStore::open(&path, options))
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))??;
            Ok(Arc::new(store))
        }
        StoreSettings::Redis {
            url,
            key_prefix,
            claim_idle_ms,
            wait_replicas,
            wait_timeout_ms,
        } => {
            let options = RedisOptions {
                key_prefix: key_prefix.clone(),
                claim_idle_ms: *claim_idle_ms,
                wait_replicas: *wait_replicas,
                wait_timeout_ms: *wait_timeout_ms,
                ..Default::default()
            };
            let store = RedisStore::open(url.expose(), options).await?;
            Ok(Arc::new(store))
        }
    }
}
