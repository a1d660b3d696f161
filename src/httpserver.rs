//! Serving HTTP/1.1 connections with graceful shutdown: from a listener (the admin API), or
//! handed over by the ingress acceptor (one event loop per core, see `server.rs`).
//!
//! This is the edge every client meets first, and it holds each one to limits so that no
//! client, however slow or numerous, can take what others need: an idle connection is closed
//! after [`HEADER_READ_TIMEOUT`]; a request's headers and body must arrive within the
//! handler's request timeout (a late body is answered `408`); connections are capped per
//! listener ([`fd_limit`] keeps the caps under the descriptor limit); and the bodies held in
//! memory share one [`BodyBudget`].

mod body;
pub mod fd_limit;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::metrics::EdgeRefusal;

pub use body::{read_body, BodyBudget, BodyError, BodyLimits, BudgetCharge};

/// How long a connection may wait for a request to begin: from when it opens, or from the end
/// of its previous request, until the request's first byte. Idle keep-alive connections are
/// closed after this long. Once a request's first byte is in, its headers and body get the
/// handler's [`Handler::request_timeout`] instead.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Most bytes hyper buffers per connection (headers, and body pieces on their way).
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// Request handler of one listener.
pub trait Handler: Send + Sync + 'static {
    /// How long a request's headers and whole body may take to arrive, from its first byte.
    /// Asked per request, so that a reload applies to the next one.
    fn request_timeout(&self) -> Duration;

    /// Answers one request whose body must be in by `deadline`.
    fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        deadline: Instant,
    ) -> impl Future<Output = Response<Full<Bytes>>> + Send;
}

/// Serves `handler` on `listener` with at most `max_connections` open, until `shutdown`
/// resolves; then stops accepting and waits up to `drain` for requests in flight to finish.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
    max_connections: usize,
) {
    let connections = Connections::new(handler);
    let open = Arc::new(AtomicUsize::new(0));
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = accept(&listener) => accepted,
            () = &mut shutdown => break,
        };
        if open.load(Ordering::Relaxed) >= max_connections {
            refuse(stream, EdgeRefusal::AdminMaxConnections);
            continue;
        }
        open.fetch_add(1, Ordering::Relaxed);
        let open = open.clone();
        connections.serve(stream, move || {
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
    drop(listener);
    connections.drain(drain).await;
}

/// Closes a connection past a connection cap at once: its client sees the close instead of
/// waiting in the accept queue, and it holds no descriptor.
pub fn refuse<S>(stream: S, reason: EdgeRefusal) {
    drop(stream);
    crate::metrics::edge_refusal(reason);
    // One line per second at most: a flood must not turn into a flood of log lines.
    static LAST_LOGGED_S: AtomicU64 = AtomicU64::new(0);
    let now_s = u64::try_from(crate::clock::now_ms() / 1000).unwrap_or(0);
    if LAST_LOGGED_S.swap(now_s, Ordering::Relaxed) != now_s {
        tracing::warn!(
            reason = reason.as_str(),
            "refusing new connections: the connection cap is reached"
        );
    }
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
        // hyper's read buffer grows to ~400 KiB per connection while a body streams in; with
        // thousands of connections that alone would be gigabytes. 64 KiB still reads bodies in
        // large pieces and bounds a request's headers to 64 KiB.
        builder.max_buf_size(READ_BUFFER_BYTES);
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
        let service = service_fn(move |req: Request<Incoming>| {
            let handler = handler.clone();
            let waiting = service_waiting.clone();
            let deadline = waiting.request_started() + handler.request_timeout();
            async move {
                let response = if lacks_host(&req) {
                    json(
                        StatusCode::BAD_REQUEST,
                        &serde_json::json!({"error": "bad_request", "reason": "an HTTP/1.1 request must carry a Host header"}),
                    )
                } else {
                    handler.handle(req, deadline).await
                };
                waiting.request_finished();
                Ok::<_, Infallible>(response)
            }
        });
        let io = TokioIo::new(FirstByte {
            stream,
            waiting: waiting.clone(),
        });
        let conn = self.builder.serve_connection(io, service);
        let conn = self.graceful.watch(conn);
        let header_timeout = self.header_timeout;
        let handler = self.handler.clone();
        tokio::spawn(async move {
            tokio::select! {
                // The connection first: it is what wakes this task nearly every time.
                biased;
                result = conn => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                }
                () = waiting.expired(header_timeout, || handler.request_timeout()) => {
                    tracing::debug!("closing a connection whose request did not arrive in time");
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

/// RFC 9112 makes `Host` mandatory in HTTP/1.1 requests; hyper leaves enforcing it to us.
fn lacks_host(request: &Request<Incoming>) -> bool {
    request.version() == Version::HTTP_11 && !request.headers().contains_key(http::header::HOST)
}

/// Where a connection is between requests, for its deadlines.
///
/// hyper's own `header_read_timeout` arms and cancels a timer for every request on a
/// keep-alive connection: 1.5k instructions per sync request under callgrind, about 3% of
/// hookyard's work besides signing. This clock costs a timestamp or two per request instead,
/// and its one timer per connection is re-armed only when it comes due.
struct HeadWait {
    opened: Instant,
    /// Milliseconds after `opened` since when the connection has waited for headers, or
    /// [`HeadWait::IN_REQUEST`] while a request is being answered.
    since_ms: AtomicU64,
    /// Milliseconds after `opened` when the next request's first byte arrived, or
    /// [`HeadWait::NO_BYTE`] while none has.
    first_byte_ms: AtomicU64,
}

impl HeadWait {
    const IN_REQUEST: u64 = u64::MAX;
    const NO_BYTE: u64 = u64::MAX;

    fn new() -> Self {
        Self {
            opened: Instant::now(),
            since_ms: AtomicU64::new(0),
            first_byte_ms: AtomicU64::new(Self::NO_BYTE),
        }
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    /// Bytes came in: the first of a request starts its request timeout.
    fn bytes_read(&self) {
        if self.first_byte_ms.load(Ordering::Relaxed) == Self::NO_BYTE
            && self.since_ms.load(Ordering::Relaxed) != Self::IN_REQUEST
        {
            self.first_byte_ms
                .store(self.elapsed_ms(), Ordering::Relaxed);
        }
    }

    /// hyper has parsed a request's headers and calls the handler. Returns when the request
    /// began: its first byte, or now if it was already buffered (pipelined) when it began.
    fn request_started(&self) -> Instant {
        self.since_ms.store(Self::IN_REQUEST, Ordering::Relaxed);
        match self.first_byte_ms.swap(Self::NO_BYTE, Ordering::Relaxed) {
            Self::NO_BYTE => Instant::now(),
            ms => self.opened + Duration::from_millis(ms),
        }
    }

    /// The handler answered; the wait for the next request starts.
    fn request_finished(&self) {
        self.since_ms.store(self.elapsed_ms(), Ordering::Relaxed);
    }

    /// Resolves once the connection has waited `idle_limit` for a request to begin, or a
    /// begun request's headers have taken longer than `request_limit()`.
    async fn expired(&self, idle_limit: Duration, request_limit: impl Fn() -> Duration) {
        let mut due = self.opened + idle_limit.min(request_limit());
        loop {
            tokio::time::sleep_until(due).await;
            let now = Instant::now();
            match self.since_ms.load(Ordering::Relaxed) {
                // Answering takes as long as it takes (the rule's deadline bounds it), and the
                // handler holds the body to its own deadline.
                Self::IN_REQUEST => due = now + idle_limit,
                ms => {
                    let request_limit = request_limit();
                    let mut deadline = self.opened + Duration::from_millis(ms) + idle_limit;
                    let first_byte = self.first_byte_ms.load(Ordering::Relaxed);
                    if first_byte != Self::NO_BYTE {
                        deadline = deadline
                            .min(self.opened + Duration::from_millis(first_byte) + request_limit);
                    }
                    if deadline <= now {
                        if first_byte != Self::NO_BYTE {
                            crate::metrics::edge_refusal(EdgeRefusal::RequestTimeout);
                        }
                        return;
                    }
                    // A request that begins before the idle deadline must still be held to
                    // its own, shorter one: look again within a request timeout.
                    due = deadline.min(now + request_limit);
                }
            }
        }
    }
}

/// A connection's socket that tells its [`HeadWait`] when bytes arrive.
struct FirstByte {
    stream: TcpStream,
    waiting: Arc<HeadWait>,
}

impl AsyncRead for FirstByte {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.waiting.bytes_read();
        }
        polled
    }
}

impl AsyncWrite for FirstByte {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
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
        request_timeout: Duration,
    }

    impl Handler for Slow {
        fn request_timeout(&self) -> Duration {
            self.request_timeout
        }

        async fn handle(
            self: Arc<Self>,
            _request: Request<Incoming>,
            _deadline: Instant,
        ) -> Response<Full<Bytes>> {
            tokio::time::sleep(self.delay).await;
            Response::new(Full::new(Bytes::from_static(b"ok")))
        }
    }

    const LIMIT: Duration = Duration::from_millis(200);

    /// A listener whose connections get `LIMIT` to begin each request, and 10 s for its headers.
    async fn start(delay: Duration) -> std::net::SocketAddr {
        start_with(delay, LIMIT, Duration::from_secs(10)).await
    }

    async fn start_with(
        delay: Duration,
        idle_limit: Duration,
        request_timeout: Duration,
    ) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let handler = Arc::new(Slow {
                delay,
                request_timeout,
            });
            let connections = Connections::with_header_timeout(handler, idle_limit);
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

    #[tokio::test]
    async fn headers_trickling_past_the_request_timeout_are_cut_off_before_the_idle_limit() {
        let addr = start_with(Duration::ZERO, Duration::from_secs(10), LIMIT).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        // A header line every tenth of the request timeout, never finishing.
        let trickle = async {
            loop {
                tokio::time::sleep(LIMIT / 10).await;
                if client.write_all(b"x-a: b\r\n").await.is_err() {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), trickle).await;
        let waited = started.elapsed();
        assert!(
            waited >= LIMIT && waited < Duration::from_secs(3),
            "closed after {waited:?}, the request timeout is {LIMIT:?}"
        );
    }

    #[tokio::test]
    async fn an_http_1_1_request_without_host_is_refused_with_400() {
        let addr = start(Duration::ZERO).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 512];
        let n = client.read(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("HTTP/1.1 400"), "{text}");
        assert!(text.contains("Host header"), "{text}");
        // HTTP/1.0 has no such rule.
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
        let n = client.read(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("HTTP/1.0 200"), "{text}");
    }
}
