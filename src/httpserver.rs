//! Serving HTTP/1.1 connections with graceful shutdown: from a listener (the admin API), or
//! handed over by the ingress acceptor (one event loop per core, see `server.rs`).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// How long a client may take to send a request's headers once it starts one.
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
}

impl<H: Handler> Connections<H> {
    fn new(handler: Arc<H>) -> Self {
        let mut builder = http1::Builder::new();
        // A client gets this long to send a request's headers, so idle or trickling
        // connections (slowloris) cannot pin sockets and memory forever.
        builder
            .writev(false)
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT);
        Self {
            handler,
            builder,
            graceful: GracefulShutdown::new(),
        }
    }

    /// Serves one connection on a task of the current event loop; `closed` runs when it ends.
    fn serve(&self, stream: TcpStream, closed: impl FnOnce() + Send + 'static) {
        let handler = self.handler.clone();
        let service = service_fn(move |req| {
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler.handle(req).await) }
        });
        let conn = self.builder.serve_connection(TokioIo::new(stream), service);
        let conn = self.graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
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
