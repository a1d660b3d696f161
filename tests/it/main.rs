//! hookyard's integration tests: one binary, real sockets, real SQLite files.
//!
//! Every test starts its own sidecar on free loopback ports (`util::Sidecar`) and its own
//! receivers: the verifying `hookyard::receive::Receiver`, or one of the misbehaving
//! upstreams in `util::upstream` (stalls, resets, refuses, counts).

mod admin;
mod async_path;
mod breaker;
mod cli;
mod config_check;
mod crash;
mod deploy;
mod edge;
mod jobs;
mod metrics;
mod openapi;
mod ordering;
mod redis;
mod reload;
mod retry_policy;
mod secrets;
#[path = "../common/sqlite_v1.rs"]
mod sqlite_v1;
mod store_faults;
mod sync_path;
mod tls;
mod util;
