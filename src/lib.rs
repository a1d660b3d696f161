//! hookyard: a hybrid sync/async webhook dispatcher.
//!
//! Data flows one way: [`ingress`] -> [`routing`] -> [`relay`] | [`queue`] -> [`delivery`], and
//! both the relay and delivery reach a target through [`upstream`].
//! [`Dispatcher`] is the library's front door: build it from a config with
//! [`Dispatcher::from_config`] and hand it [`Event`]s with [`Dispatcher::dispatch`]. The state
//! the running tasks share (rules and hosts in force, the store) is one [`Context`].

pub mod admin;
pub mod circuit;
pub mod cli;
pub mod clock;
pub mod config;
pub mod context;
pub mod delivery;
pub mod dispatcher;
pub mod event;
pub mod headers;
pub mod httpserver;
pub mod ingress;
pub mod metric_series;
pub mod metrics;
pub mod queue;
/// The `hookyard receive` test receiver; behind the default `receiver` feature so an embedder
/// can leave it out.
// Always in the crate's own unit tests: the delivery loop's tests deliver into it.
#[cfg(any(feature = "receiver", test))]
pub mod receive;
pub mod relay;
pub mod reload;
pub mod routing;
pub mod secret;
pub mod server;
pub mod signing;
pub mod upstream;

pub use context::Context;
pub use dispatcher::{Dispatcher, Outcome};
pub use event::Event;
