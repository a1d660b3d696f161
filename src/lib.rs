//! hookyard: a hybrid sync/async webhook dispatcher.
//!
//! Data flows one way: [`ingress`] -> [`routing`] -> [`sync`] | [`queue`] -> [`delivery`].

pub mod queue;
pub mod receive;
pub mod signing;
