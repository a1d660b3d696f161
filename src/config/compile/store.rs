//! `store:`: SQLite or Redis and the keys each takes, and — once the rules are known — that a
//! Redis `claim_idle_ms` leaves room for the longest rule timeout.

use std::path::{Path, PathBuf};

use super::rules::DEFAULT_ASYNC_TIMEOUT_MS;
use super::{Compiler, MAX_TIMEOUT_MS};
use crate::config::schema::{StoreKind, StoreSection};
use crate::config::tree::SecretKind;
use crate::config::{Problem, StoreSettings};
use crate::routing::RuleTable;

/// Default Redis `claim_idle_ms` when the longest rule timeout allows it.
const DEFAULT_CLAIM_IDLE_MS: u64 = 30_000;

/// Least headroom `claim_idle_ms` must leave above the longest rule timeout.
pub const CLAIM_IDLE_MARGIN_MS: u64 = 1_000;

impl Compiler<'_> {
    pub(super) fn store(&mut self, config_path: &Path, s: &StoreSection) -> Option<StoreSettings> {
        let kind = s
            .kind
            .as_ref()
            .map(|k| k.value)
            .unwrap_or(StoreKind::Sqlite);
        match kind {
            StoreKind::Sqlite => {
                if let Some(url) = &s.url {
                    self.problem(Problem::spanned(
                        url,
                        "url is for kind: redis; SQLite takes path",
                    ));
                }
                for key in [&s.claim_idle_ms, &s.wait_replicas, &s.wait_timeout_ms]
                    .into_iter()
                    .flatten()
                {
                    self.problem(Problem::spanned(
                        key,
                        "claim_idle_ms, wait_replicas and wait_timeout_ms are for kind: redis",
                    ));
                }
                let raw = match &s.path {
                    Some(p) => self.expand(p)?,
                    None => "./data/hookyard.db".to_string(),
                };
                let mut path = PathBuf::from(raw);
                // A relative path is relative to the config file, so `serve --config x/y.yaml`
                // from any directory opens the same database.
                if path.is_relative() {
                    if let Some(dir) = config_path.parent() {
                        path = dir.join(path);
                    }
                }
                let max_size_bytes = s
                    .max_size_mb
                    .as_ref()
                    .map(|_| self.positive(&s.max_size_mb, 0, "max_size_mb", 1 << 30) << 20);
                Some(StoreSettings::Sqlite {
                    path,
                    fsync: s.fsync.unwrap_or(true),
                    max_size_bytes,
                })
            }
            StoreKind::Redis => {
                let Some(url) = &s.url else {
                    let at = s.kind.as_ref()?;
                    self.problem(Problem::spanned(
                        at,
                        "kind: redis needs url: redis://host:port",
                    ));
                    return None;
                };
                let text = self.expand_secret(url, SecretKind::Url)?;
                let raw = text.expose();
                if !(raw.starts_with("redis://")
                    || raw.starts_with("rediss://")
                    || raw.starts_with("redis+unix://"))
                {
                    let p = self.secret_problem(
                        url,
                        SecretKind::Url,
                        "store.url must start with redis://, rediss:// or redis+unix://",
                    );
                    self.problem(p);
                    return None;
                }
                if let Some(prefix) = s.key_prefix.as_deref() {
                    // The prefix becomes a cluster hash tag `{prefix}`: braces would break it.
                    if prefix.is_empty() || prefix.contains(['{', '}']) {
                        let at = s.kind.as_ref()?;
                        self.problem(Problem::spanned(
                            at,
                            "store.key_prefix must be non-empty and free of braces",
                        ));
                    }
                }
                // 0 stands for "not set": `check_claim_idle` fills in the default once the
                // rules (and so the longest timeout) are known.
                let claim_idle_ms = s
                    .claim_idle_ms
                    .as_ref()
                    .map(|_| self.positive(&s.claim_idle_ms, 0, "claim_idle_ms", 86_400_000))
                    .unwrap_or(0);
                let wait_replicas = match &s.wait_replicas {
                    Some(p) if !(0..=100).contains(&p.value) => {
                        self.problem(Problem::spanned(
                            p,
                            format!("wait_replicas must be between 0 and 100, got {}", p.value),
                        ));
                        0
                    }
                    Some(p) => p.value as u32,
                    None => 0,
                };
                let wait_timeout_ms =
                    self.positive(&s.wait_timeout_ms, 1000, "wait_timeout_ms", MAX_TIMEOUT_MS);
                Some(StoreSettings::Redis {
                    url: text,
                    key_prefix: s.key_prefix.clone().unwrap_or_else(|| "hookyard".into()),
                    claim_idle_ms,
                    wait_replicas,
                    wait_timeout_ms,
                })
            }
        }
    }

    /// Redis: a leased event idle for `claim_idle_ms` is handed to another instance. If that
    /// can happen while its first delivery is still inside its deadline, the event is delivered
    /// twice, so the idle time must exceed the longest rule timeout by a margin (signing, the
    /// tail of the HTTP exchange, recording the result). Unset, it defaults to whichever is
    /// larger of 30 s and that timeout + 5 s.
    pub(super) fn check_claim_idle(
        &mut self,
        store: StoreSettings,
        s: &StoreSection,
        rules: &RuleTable,
    ) -> StoreSettings {
        let StoreSettings::Redis {
            url,
            key_prefix,
            claim_idle_ms,
            wait_replicas,
            wait_timeout_ms,
        } = store
        else {
            return store;
        };
        let longest = rules
            .rules()
            .iter()
            .map(|r| r.timeout.as_millis() as u64)
            .max()
            .unwrap_or(DEFAULT_ASYNC_TIMEOUT_MS);
        let claim_idle_ms = match (&s.claim_idle_ms, claim_idle_ms) {
            (Some(p), set) if set > 0 && set < longest + CLAIM_IDLE_MARGIN_MS => {
                self.problem(Problem::spanned(
                    p,
                    format!(
                        "claim_idle_ms ({set}) must be at least the longest rule timeout_ms ({longest}) + {CLAIM_IDLE_MARGIN_MS}: \
                         a shorter idle time hands a delivery still in flight to another instance, which delivers it twice"
                    ),
                ));
                set
            }
            (_, 0) => DEFAULT_CLAIM_IDLE_MS.max(longest + 5_000),
            (_, set) => set,
        };
        StoreSettings::Redis {
            url,
            key_prefix,
            claim_idle_ms,
            wait_replicas,
            wait_timeout_ms,
        }
    }
}
