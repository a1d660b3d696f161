//! `ingress:` limits that guard the receiving edge: request timeout, connection count and
//! buffered body bytes.

use std::time::Duration;

use super::Compiler;
use crate::config::schema::IngressSection;
use crate::config::EdgeLimits;

impl Compiler<'_> {
    pub(super) fn edge(&mut self, ingress: &IngressSection) -> EdgeLimits {
        let default = EdgeLimits::default();
        EdgeLimits {
            request_timeout: Duration::from_millis(self.positive(
                &ingress.request_timeout_ms,
                default.request_timeout.as_millis() as u64,
                "ingress.request_timeout_ms",
                // An hour: past that it is no longer a defence against slow clients.
                3_600_000,
            )),
            max_connections: self.positive(
                &ingress.max_connections,
                default.max_connections as u64,
                "ingress.max_connections",
                10_000_000,
            ) as usize,
            max_buffered_body_bytes: self.positive(
                &ingress.max_buffered_body_bytes,
                default.max_buffered_body_bytes as u64,
                "ingress.max_buffered_body_bytes",
                i64::MAX,
            ) as usize,
        }
    }
}
