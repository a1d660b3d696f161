//! Serving HTTP/1.1 connections with graceful shutdown: from a listener (the admin API), or
//! handed over by the ingress acceptor (one event loop per core, see `server.rs`).

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// How long a connection may take to deliver a request's headers: from when it opens, or from
/// the end of its previous request, until its next request's headers are in. Idle keep-alive
/// connections and trickling ones (slowloris) are closed after this long.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Request handler of one listener.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request.
    fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
    ) -> impl Future<Output = Response<Full<Bytes>>> + Send;
}

/// Serves `handler` on `listener` until `shutdown` resolves, then stops accepting and waits up
/// to `drain` for requests in flight to finish.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let connections = Connections::new(handler);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = accept(&listener) => accepted,
            () = &mut shutdown => break,
        };
        connections.serve(stream, || {});
    }
    drop(listener);
    connections.drain(drain).await;
}

/// Serves `handler` on the connections that arrive on `streams` (accepted on another thread,
/// see `server.rs`) until `shutdown` resolves or the sender is gone, then waits up to `drain`
/// for requests in flight to finish. `closed` runs when each connection ends.
pub async fn serve_streams<H: Handler>(
    mut streams: mpsc::UnboundedReceiver<std::net::TcpStream>,
    handler: Arc<H>,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
    closed: impl Fn() + Clone + Send + 'static,
) {
    let connections = Connections::new(handler);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            stream = streams.recv() => match stream {
                Some(s) => s,
                None => break,
            },
            () = &mut shutdown => break,
        };
        // Registers the socket with this thread's event loop.
        match TcpStream::from_std(stream) {
            Ok(stream) => connections.serve(stream, closed.clone()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot register an accepted connection");
                closed();
            }
        }
    }
    connections.drain(drain).await;
}

/// Waits for the next connection. Errors (usually EMFILE) are logged and retried after a
/// short pause instead of spinning.
pub async fn accept(listener: &TcpListener) -> TcpStream {
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
                let _ = stream.set_nodelay(true);
                return stream;
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The HTTP/1.1 connections of one event loop, tracked for graceful shutdown.
struct Connections<H> {
    handler: Arc<H>,
    builder: http1::Builder,
    graceful: GracefulShutdown,
    header_timeout: Duration,
}

impl<H: Handler> Connections<H> {
    fn new(handler: Arc<H>) -> Self {
        Self::with_header_timeout(handler, HEADER_READ_TIMEOUT)
    }

    fn with_header_timeout(handler: Arc<H>, header_timeout: Duration) -> Self {
        let mut builder = http1::Builder::new();
        builder.writev(false);
        Self {
            handler,
            builder,
            graceful: GracefulShutdown::new(),
            header_timeout,
        }
    }

    /// Serves one connection on a task of the current event loop; `closed` runs when it ends.
    fn serve(&self, stream: TcpStream, closed: impl FnOnce() + Send + 'static) {
        let handler = self.handler.clone();
        let waiting = Arc::new(HeadWait::new());
        let service_waiting = waiting.clone();
        let service = service_fn(move |req| {
            let handler = handler.clone();
            let waiting = service_waiting.clone();
            waiting.request_started();
            async move {
                let response = handler.handle(req).await;
                waiting.request_finished();
                Ok::<_, Infallible>(response)
            }
        });
        let conn = self.builder.serve_connection(TokioIo::new(stream), service);
        let conn = self.graceful.watch(conn);
        let header_timeout = self.header_timeout;
        tokio::spawn(async move {
            tokio::select! {
                // The connection first: it is what wakes this task nearly every time.
                biased;
                result = conn => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                }
                () = waiting.expired(header_timeout) => {
                    tracing::debug!(?header_timeout, "closing a connection that sent no request headers in time");
                }
            }
            closed();
        });
    }

    /// Asks every connection to finish its request in flight and close, waiting up to `drain`.
    async fn drain(self, drain: Duration) {
        if tokio::time::timeout(drain, self.graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("requests still in flight after {drain:?}; closing them");
        }
    }
}

/// When a connection began waiting for its next request's headers, for the header deadline.
///
/// hyper's own `header_read_timeout` arms and cancels a timer for every request on a
/// keep-alive connection: 1.5k instructions per sync request under callgrind, about 3% of
/// hookyard's work besides signing. This clock costs a timestamp per request instead, and
/// its one timer per connection is re-armed only when it comes due.
struct HeadWait {
    opened: Instant,
    /// Milliseconds after `opened` since when the connection has waited for headers, or
    /// [`HeadWait::IN_REQUEST`] while a request is being answered.
    since_ms: AtomicU64,
}

impl HeadWait {
    const IN_REQUEST: u64 = u64::MAX;

    fn new() -> Self {
        Self {
            opened: Instant::now(),
            since_ms: AtomicU64::new(0),
        }
    }

    /// hyper has parsed a request's headers and calls the handler.
    fn request_started(&self) {
        self.since_ms.store(Self::IN_REQUEST, Ordering::Relaxed);
    }

    /// The handler answered; the wait for the next request's headers starts.
    fn request_finished(&self) {
        let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.since_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once the connection has waited `limit` for a request's headers.
    async fn expired(&self, limit: Duration) {
        let mut due = self.opened + limit;
        loop {
            tokio::time::sleep_until(due).await;
            match self.since_ms.load(Ordering::Relaxed) {
                // Answering takes as long as it takes (the rule's deadline bounds it).
                Self::IN_REQUEST => due = Instant::now() + limit,
                ms => {
                    let waiting_since = self.opened + Duration::from_millis(ms);
                    if waiting_since + limit <= Instant::now() {
                        return;
                    }
                    due = waiting_since + limit;
                }
            }
        }
    }
}

/// A JSON response with `status`.
pub fn json(status: http::StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Answers 200 after `delay`.
    struct Slow {
        delay: Duration,
    }

    impl Handler for Slow {
        async fn handle(self: Arc<Self>, _request: Request<Incoming>) -> Response<Full<Bytes>> {
            tokio::time::sleep(self.delay).await;
            Response::new(Full::new(Bytes::from_static(b"ok")))
        }
    }

    const LIMIT: Duration = Duration::from_millis(200);

    /// A listener whose connections get `LIMIT` to deliver each request's headers.
    async fn start(delay: Duration) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let connections = Connections::with_header_timeout(Arc::new(Slow { delay }), LIMIT);
            loop {
                let stream = accept(&listener).await;
                connections.serve(stream, || {});
            }
        });
        addr
    }

    const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";

    /// Reads one whole `200 ok` response (hyper sends it in one write).
    async fn read_ok(client: &mut TcpStream) {
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(
            text.starts_with("HTTP/1.1 200") && text.ends_with("ok"),
            "{text}"
        );
    }

    /// Waits for the server to close the connection; returns how long that took.
    async fn closed_after(client: &mut TcpStream) -> Duration {
        let started = Instant::now();
        let mut buf = [0u8; 512];
        let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .expect("the server closes the connection");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        started.elapsed()
    }

    #[tokio::test]
    async fn a_connection_trickling_its_headers_is_closed_after_the_header_timeout() {
        let addr = start(Duration::ZERO).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: a\r\n")
            .await
            .unwrap();
        let waited = closed_after(&mut client).await;
        assert!(waited >= LIMIT / 2, "closed after only {waited:?}");
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_is_closed_the_header_timeout_after_its_last_answer() {
        let addr = start(Duration::ZERO).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(REQUEST).await.unwrap();
        read_ok(&mut client).await;
        let waited = closed_after(&mut client).await;
        assert!(waited >= LIMIT / 2, "closed after only {waited:?}");
    }

    #[tokio::test]
    async fn a_busy_connection_outlives_the_header_timeout() {
        let addr = start(Duration::ZERO).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        // Requests a third of the limit apart for three times the limit.
        for _ in 0..9 {
            client.write_all(REQUEST).await.unwrap();
            read_ok(&mut client).await;
            tokio::time::sleep(LIMIT / 3).await;
        }
    }

    #[tokio::test]
    async fn a_request_answered_slower_than_the_header_timeout_still_gets_its_answer() {
        let addr = start(LIMIT * 3).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(REQUEST).await.unwrap();
        read_ok(&mut client).await;
        // And the connection is usable for the next request.
        client.write_all(REQUEST).await.unwrap();
        read_ok(&mut client).await;
    }
}
