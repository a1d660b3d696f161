//! The connection pool of one host on one event loop: idle HTTP/1.1 connections reused LIFO.
//!
//! hyper-util's legacy client was the first pool here. Under load it opened about two
//! connections per request in flight (a checkout miss starts a connect *and* waits for an idle
//! connection, and keeps both), so the target saw fewer requests per wakeup and spent more CPU
//! on each; it also costs a keyed pool lookup per request. A host's pool lane needs much less:
//! every connection goes to the same `host:port`, in-flight requests are already capped by the
//! host's gate, and the lane is used by one event loop. So this pool is a stack of idle
//! `SendRequest`s: a request takes the most recently used one (its socket is the most likely
//! to be warm and still open), or connects when there is none, and gives it back once the whole
//! response has been read. At most `max_connections` idle connections are kept, and none longer
//! than [`IDLE_TIMEOUT`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, HOST};
use http::uri::PathAndQuery;
use http::{Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::ClientConfig;
use tower_service::Service;

use super::call::{error_chain, CallError, ResponseBody, UpstreamResponse, MAX_RESPONSE_BYTES};

/// How long an idle connection is kept for reuse. Shorter than common server keep-alive
/// timeouts (nginx 75 s, HAProxy and Go's defaults) would only add reconnects; servers that
/// close sooner (Node's 5 s) are noticed when the closed connection is skipped at checkout.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// The TLS-or-plain connector every connection of a host is made with.
pub type Connector = HttpsConnector<HttpConnector>;

type Sender = SendRequest<Full<Bytes>>;

struct Idle {
    sender: Sender,
    since: Instant,
}

/// Idle connections of one host on one event loop.
pub struct ConnPool {
    idle: Mutex<Vec<Idle>>,
    connector: Connector,
    max_idle: usize,
    /// Connections open right now, idle or busy: counted up when one is made, down when its
    /// task ends (closed by either side).
    open: Arc<AtomicUsize>,
}

impl std::fmt::Debug for ConnPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnPool")
            .field("idle", &self.idle_count())
            .field("max_idle", &self.max_idle)
            .finish_non_exhaustive()
    }
}

impl ConnPool {
    /// An empty pool that connects with `connector` and keeps up to `max_idle` idle connections.
    pub fn new(connector: Connector, max_idle: usize) -> Self {
        Self {
            idle: Mutex::new(Vec::new()),
            connector,
            max_idle: max_idle.max(1),
            open: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Connections open right now, idle or busy.
    pub fn open_count(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Idle connections held right now.
    pub fn idle_count(&self) -> usize {
        self.idle.lock().map(|idle| idle.len()).unwrap_or(0)
    }

    /// Sends `request` (absolute URI) on a pooled or new connection and reads the whole answer.
    ///
    /// A pooled connection that turns out to be closed before the request was written is
    /// dropped and the next one is tried, so a target closing idle connections never fails a
    /// request. Once a request has been written it is never sent again.
    pub async fn send(&self, request: Request<Full<Bytes>>) -> Result<UpstreamResponse, CallError> {
        self.send_with(request, ResponseBody::Relay).await
    }

    /// [`ConnPool::send`], doing `mode` with the response body.
    pub async fn send_with(
        &self,
        request: Request<Full<Bytes>>,
        mode: ResponseBody,
    ) -> Result<UpstreamResponse, CallError> {
        let (mut request, target) = origin_form(request)?;
        loop {
            let (mut sender, pooled) = match self.checkout() {
                Some(sender) => (sender, true),
                // Boxed: the connect state (a TLS stream mid-handshake is over a kilobyte)
                // would otherwise make every request's future that much bigger to move.
                None => (Box::pin(self.connect(&target)).await?, false),
            };
            if pooled && sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let (parts, body) = response.into_parts();
                    if mode == ResponseBody::Discard {
                        if drain(body, MAX_RESPONSE_BYTES).await {
                            self.checkin(sender);
                        }
                        return Ok(UpstreamResponse {
                            status: parts.status,
                            headers: parts.headers,
                            body: Bytes::new(),
                            // Timed by `call_with`, around the whole call.
                            latency: Duration::ZERO,
                        });
                    }
                    let body = match Limited::new(body, MAX_RESPONSE_BYTES).collect().await {
                        Ok(body) => body.to_bytes(),
                        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                            // The target did answer: its status decides what that means.
                            return Err(CallError::TooLarge(parts.status));
                        }
                        Err(e) => {
                            return Err(CallError::Broken(format!("reading response body: {e}")))
                        }
                    };
                    self.checkin(sender);
                    return Ok(UpstreamResponse {
                        status: parts.status,
                        headers: parts.headers,
                        body,
                        // Timed by `call_with`, around the whole call.
                        latency: Duration::ZERO,
                    });
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if pooled => request = unsent,
                    _ => return Err(CallError::Broken(error_chain(e.error()))),
                },
            }
        }
    }

    fn checkout(&self) -> Option<Sender> {
        let mut idle = self.idle.lock().ok()?;
        while let Some(conn) = idle.pop() {
            if !conn.sender.is_closed() && conn.since.elapsed() < IDLE_TIMEOUT {
                return Some(conn.sender);
            }
        }
        None
    }

    fn checkin(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        // The oldest sit at the front; drop the expired ones so a burst's leftovers do not
        // hold sockets open forever.
        if idle
            .first()
            .is_some_and(|oldest| oldest.since.elapsed() >= IDLE_TIMEOUT)
        {
            idle.retain(|conn| conn.since.elapsed() < IDLE_TIMEOUT && !conn.sender.is_closed());
        }
        if idle.len() < self.max_idle {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    async fn connect(&self, target: &Uri) -> Result<Sender, CallError> {
        let mut connector = self.connector.clone();
        let stream = connector
            .call(target.clone())
            .await
            .map_err(|e| CallError::Connect(error_chain(&*e)))?;
        let (sender, connection) = http1::Builder::new()
            .writev(false)
            .handshake(stream)
            .await
            .map_err(|e| CallError::Connect(error_chain(&e)))?;
        // The connection is driven by a task on this event loop, which is the only one that
        // uses this pool lane.
        let open = self.open.clone();
        open.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
        Ok(sender)
    }
}

/// Plain or TLS by the target's scheme, with the host's connect timeout.
pub fn connector(connect_timeout: Duration, tls: &Arc<ClientConfig>) -> Connector {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    // The TLS layer hands plain-http URLs through and wraps https ones.
    http.enforce_http(false);
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(ClientConfig::clone(tls))
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}

/// Reads and drops a response body; true when it ended cleanly within `limit` bytes, so the
/// connection is ready for another request. A longer or broken body leaves the connection to
/// be closed: reading on would only cost bandwidth for bytes nobody wants.
async fn drain(mut body: hyper::body::Incoming, limit: usize) -> bool {
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return false;
        };
        seen += frame.data_ref().map_or(0, Bytes::len);
        if seen > limit {
            return false;
        }
    }
    true
}

/// Splits an absolute-URI request into the origin-form request an HTTP/1.1 server expects
/// (`POST /path?query` with a `Host` header) and the URI to connect to.
fn origin_form(
    mut request: Request<Full<Bytes>>,
) -> Result<(Request<Full<Bytes>>, Uri), CallError> {
    let target = request.uri().clone();
    let authority = target
        .authority()
        .ok_or_else(|| CallError::Connect("target has no host".to_string()))?;
    if !request.headers().contains_key(HOST) {
        let host = HeaderValue::from_str(authority.as_str()).map_err(|_| {
            CallError::Connect(format!("target host {authority} is not a valid header"))
        })?;
        request.headers_mut().insert(HOST, host);
    }
    let path = target
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    *request.uri_mut() = Uri::from(path);
    Ok((request, target))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A minimal HTTP/1.1 target on loopback that counts the connections it accepts and keeps
    /// every request head, so the tests see exactly what went over the wire.
    struct Target {
        addr: SocketAddr,
        accepted: Arc<AtomicUsize>,
        heads: Arc<Mutex<Vec<String>>>,
    }

    impl Target {
        /// `close_after_answer`: close each connection after one response, without saying so
        /// in a `Connection: close` header (as a server whose keep-alive timer fired does).
        async fn start(answer_delay: Duration, close_after_answer: bool) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let accepted = Arc::new(AtomicUsize::new(0));
            let heads = Arc::new(Mutex::new(Vec::new()));
            let (count, seen) = (accepted.clone(), heads.clone());
            tokio::spawn(async move {
                loop {
                    let (stream, _) = listener.accept().await.unwrap();
                    count.fetch_add(1, Ordering::SeqCst);
                    let seen = seen.clone();
                    tokio::spawn(serve(stream, seen, answer_delay, close_after_answer));
                }
            });
            Self {
                addr,
                accepted,
                heads,
            }
        }

        fn accepted(&self) -> usize {
            self.accepted.load(Ordering::SeqCst)
        }
    }

    async fn serve(
        mut stream: TcpStream,
        seen: Arc<Mutex<Vec<String>>>,
        delay: Duration,
        close_after_answer: bool,
    ) {
        let mut buf = Vec::new();
        loop {
            let head_end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                let mut chunk = [0u8; 4096];
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            while buf.len() < head_end + length {
                let mut chunk = [0u8; 4096];
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            buf.drain(..head_end + length);
            seen.lock().unwrap().push(head);
            tokio::time::sleep(delay).await;
            let answer =
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok";
            if stream.write_all(answer).await.is_err() || close_after_answer {
                return;
            }
        }
    }

    fn pool() -> ConnPool {
        let tls = crate::config::TlsTrust::new(Vec::new()).unwrap();
        ConnPool::new(connector(Duration::from_secs(1), &tls.client_config), 8)
    }

    fn request(addr: SocketAddr) -> Request<Full<Bytes>> {
        Request::post(format!("http://{addr}/hook?kind=test"))
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    }

    #[tokio::test]
    async fn sequential_requests_reuse_one_connection_in_origin_form_with_a_host_header() {
        let target = Target::start(Duration::ZERO, false).await;
        let pool = pool();
        for _ in 0..20 {
            let answer = pool.send(request(target.addr)).await.unwrap();
            assert_eq!(answer.status, 200);
            assert_eq!(&answer.body[..], b"ok");
        }
        assert_eq!(target.accepted(), 1, "one connection, reused");
        assert_eq!(pool.idle_count(), 1);
        let heads = target.heads.lock().unwrap();
        assert_eq!(heads.len(), 20);
        assert!(
            heads[0].starts_with("POST /hook?kind=test HTTP/1.1\r\n"),
            "{}",
            heads[0]
        );
        assert!(
            heads[0]
                .to_ascii_lowercase()
                .contains(&format!("\r\nhost: {}\r\n", target.addr)),
            "{}",
            heads[0]
        );
    }

    #[tokio::test]
    async fn a_connection_the_target_closed_while_idle_is_replaced_without_failing_a_request() {
        let target = Target::start(Duration::ZERO, true).await;
        let pool = pool();
        for i in 0..5 {
            let answer = pool.send(request(target.addr)).await;
            assert_eq!(
                answer.map(|a| a.status).ok(),
                Some(http::StatusCode::OK),
                "request {i}"
            );
            // Time for the target's FIN to arrive, as between real requests.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(target.accepted(), 5);
        assert_eq!(pool.idle_count(), 0, "closed connections are not kept");
    }

    #[tokio::test]
    async fn concurrent_requests_open_no_more_connections_than_are_in_flight() {
        let target = Target::start(Duration::from_millis(5), false).await;
        let pool = Arc::new(pool());
        for _ in 0..10 {
            let calls: Vec<_> = (0..8)
                .map(|_| {
                    let (pool, addr) = (pool.clone(), target.addr);
                    tokio::spawn(async move { pool.send(request(addr)).await })
                })
                .collect();
            for call in calls {
                assert_eq!(call.await.unwrap().unwrap().status, 200);
            }
        }
        assert!(
            target.accepted() <= 8,
            "80 requests, 8 at a time, opened {} connections",
            target.accepted()
        );
        assert_eq!(target.heads.lock().unwrap().len(), 80);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let port = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let err = pool().send(request(port)).await.unwrap_err();
        assert!(matches!(err, CallError::Connect(_)), "{err:?}");
    }
}
