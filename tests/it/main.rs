//! hookyard's integration tests: one binary, real sockets, real SQLite files.
//!
//! Every test starts its own sidecar on free loopback ports (`util::Sidecar`) and its own
//! receivers: the verifying `hookyard::receive::Receiver`, or one of the misbehaving
//! upstreams in `util::upstream` (stalls, resets, refuses, counts).

mod admin;
mod async_path;
mod config_check;
mod crash;
mod redis;
mod reload;
#[path = "../common/sqlite_v1.rs"]
mod sqlite_v1;
mod store_faults;
mod sync_path;
mod tls;
mod util;
