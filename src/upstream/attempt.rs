//! One attempt at a host, the same for a sync relay and an async delivery: breaker → gate →
//! build the request → deadline call → metrics → the host's health back to its breaker.
//!
//! The two paths differ only in policy, which stays with their callers: a sync relay sheds at
//! the host's `shed_at` and falls back or answers an error; an async delivery waits for a slot,
//! defers while the breaker is open and retries on its schedule.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use super::call::{self, CallError, ResponseBody, UpstreamResponse};
use super::host::Host;
use crate::event::DeliveryMode;

/// Why an attempt was not made; nothing about the host's health was learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The breaker is open (or its probes are out); try again after this long.
    CircuitOpen { retry_after: Duration },
    /// A sync call found the host at its shed threshold.
    Shed,
    /// An async delivery found every connection slot of the host taken.
    GateFull,
}

/// An attempt that was made: what the host answered (or why it did not), and how long it took.
#[derive(Debug)]
pub struct Attempted {
    pub result: Result<UpstreamResponse, CallError>,
    pub latency: Duration,
}

impl Host {
    /// Makes one attempt in `mode` under `deadline`, building the request only once the host
    /// admitted it. The host's health is judged the same way for both modes: an answer below
    /// 500 is healthy (a 4xx is the caller's error or the receiver pacing us), a 5xx, timeout
    /// or broken connection is a failure. A future dropped before `deadline` records nothing:
    /// the host was not given its full time.
    pub async fn attempt(
        &self,
        mode: DeliveryMode,
        deadline: Duration,
        body: ResponseBody,
        build: impl FnOnce() -> Request<Full<Bytes>>,
    ) -> Result<Attempted, Refusal> {
        let ticket = self
            .breaker
            .admit()
            .map_err(|open| Refusal::CircuitOpen {
                retry_after: open.retry_after,
            })?
            .until(deadline);
        let permit = match mode {
            DeliveryMode::Sync => self.gate.try_enter_sync(),
            DeliveryMode::Async => self.gate.try_enter(),
        };
        let Some(_permit) = permit else {
            ticket.forgo();
            return Err(match mode {
                DeliveryMode::Sync => {
                    self.metrics.shed();
                    Refusal::Shed
                }
                DeliveryMode::Async => {
                    self.metrics.slot_wait();
                    Refusal::GateFull
                }
            });
        };
        let request = build();
        let started = Instant::now();
        let result = call::call_with(self, request, deadline, body).await;
        let latency = started.elapsed();
        let class = match &result {
            Ok(r) => crate::metrics::status_class(r.status.as_u16()),
            Err(e) => e.class(),
        };
        self.metrics.attempt(mode, class, latency);
        let healthy = match &result {
            Ok(r) => !r.status.is_server_error(),
            // The host answered; only the relay cannot carry the body.
            Err(CallError::TooLarge(status)) => !status.is_server_error(),
            Err(CallError::Timeout(_) | CallError::Connect(_) | CallError::Broken(_)) => false,
        };
        if healthy {
            ticket.success();
        } else {
            ticket.failure();
        }
        Ok(Attempted { result, latency })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::config::{HostPolicy, TlsTrust};

    /// A loopback target that answers each connection's first request with the next status
    /// of `statuses`, then closes it.
    async fn target(statuses: Vec<u16>) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for status in statuses {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut buf = Vec::new();
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    let mut chunk = [0u8; 1024];
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let answer = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            }
        });
        addr
    }

    fn request(addr: std::net::SocketAddr) -> Request<Full<Bytes>> {
        Request::post(format!("http://{addr}/"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    /// Both modes judge the host alike: below 500 healthy (429 included), 5xx and a refused
    /// connection failures; a refusal by the gate records nothing.
    #[tokio::test]
    async fn both_modes_report_the_same_health_to_the_breaker() {
        let addr = target(vec![200, 429, 503, 404]).await;
        let tls = TlsTrust::new(Vec::new()).unwrap();
        let host = Arc::new(Host::new(
            addr.to_string().into(),
            &HostPolicy::default(),
            &tls,
            None,
        ));
        let deadline = Duration::from_secs(5);
        for (mode, status) in [
            (DeliveryMode::Sync, 200),
            (DeliveryMode::Async, 429),
            (DeliveryMode::Sync, 503),
            (DeliveryMode::Async, 404),
        ] {
            let attempted = host
                .attempt(mode, deadline, ResponseBody::Discard, || request(addr))
                .await
                .unwrap();
            assert_eq!(attempted.result.unwrap().status.as_u16(), status);
        }
        let counts = host.breaker.snapshot();
        assert_eq!(
            (counts.calls, counts.failures),
            (4, 1),
            "only the 503 failed"
        );

        // Nothing listens any more: a connection error is a failure.
        let gone = host
            .attempt(DeliveryMode::Async, deadline, ResponseBody::Discard, || {
                request(addr)
            })
            .await
            .unwrap();
        assert!(gone.result.is_err());
        assert_eq!(host.breaker.snapshot().failures, 2);

        // Every slot taken: refused before any call, and nothing recorded.
        let held: Vec<_> = std::iter::from_fn(|| host.gate.try_enter()).collect();
        assert!(!held.is_empty());
        let refused = host
            .attempt(DeliveryMode::Async, deadline, ResponseBody::Discard, || {
                unreachable!("no request is built for a refused attempt")
            })
            .await
            .unwrap_err();
        assert_eq!(refused, Refusal::GateFull);
        let refused = host
            .attempt(DeliveryMode::Sync, deadline, ResponseBody::Relay, || {
                unreachable!("no request is built for a refused attempt")
            })
            .await
            .unwrap_err();
        assert_eq!(refused, Refusal::Shed);
        assert_eq!(host.breaker.snapshot().calls, 5);
    }
}
