//! Everything between hookyard and one target host: its connection pool, gate, breaker, the
//! signed request, and the one attempt ([`Host::attempt`]) that the sync relay
//! ([`crate::relay`]) and async delivery ([`crate::delivery`]) share. They differ only in the
//! policy around it: a deadline and fallback, or a retry schedule.
//!
//! Each step is its own type ([`breaker::Breaker`], [`gate::Gate`], [`call::call_with`]),
//! testable alone; `attempt` stacks them.

mod attempt;
pub mod breaker;
pub mod call;
pub mod gate;
pub mod host;
pub mod pool;
pub mod request;

pub use attempt::{Attempted, Refusal};
pub use call::{CallError, ResponseBody, UpstreamResponse};
pub use host::{Host, HostMap};
pub use request::Envelope;
