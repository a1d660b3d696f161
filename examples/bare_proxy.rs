//! The floor of the sync hop: a reverse proxy on the same stack as hookyard (tokio
//! current-thread loops, hyper HTTP/1.1 server and client, mimalloc) that does nothing else.
//!
//! `bench/load/sync_vs_haproxy.sh` measures it beside HAProxy and hookyard when it is built
//! (`cargo build --release --example bare_proxy`). The gap between it and hookyard is the cost
//! of hookyard's own work per request (routing, ids, signing, breaker, shedding gate, deadline,
//! metrics, the delivery headers); the gap between it and HAProxy is the cost of the stack.
//! Not for production: no timeouts, no limits, no error handling beyond dropping the connection.
//!
//! Usage: `bare_proxy <listen addr> <upstream addr>`, e.g. `bare_proxy 127.0.0.1:8080 127.0.0.1:9000`.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Idle upstream connections of one event loop, reused last-in first-out like hookyard's pool.
type Idle = Rc<RefCell<Vec<SendRequest<Full<Bytes>>>>>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn forward(
    idle: Idle,
    upstream: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, BoxError> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await?.to_bytes();
    let reused = idle.borrow_mut().pop();
    let mut sender = match reused {
        Some(sender) => sender,
        None => {
            let stream = tokio::net::TcpStream::connect(upstream).await?;
            stream.set_nodelay(true)?;
            let (sender, connection) = hyper::client::conn::http1::Builder::new()
                .writev(false)
                .handshake(TokioIo::new(stream))
                .await?;
            tokio::task::spawn_local(connection);
            sender
        }
    };
    let mut outbound = Request::new(Full::new(body));
    *outbound.method_mut() = parts.method;
    *outbound.uri_mut() = parts
        .uri
        .path_and_query()
        .map_or_else(|| "/".parse(), |p| p.as_str().parse())?;
    *outbound.headers_mut() = parts.headers;
    sender.ready().await?;
    let (parts, body) = sender.send_request(outbound).await?.into_parts();
    let body = body.collect().await?.to_bytes();
    idle.borrow_mut().push(sender);
    Ok(Response::from_parts(parts, Full::new(body)))
}

fn serve(listener: std::net::TcpListener, upstream: SocketAddr) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let idle: Idle = Rc::default();
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            let idle = idle.clone();
            tokio::task::spawn_local(async move {
                let service = hyper::service::service_fn(move |request| {
                    forward(idle.clone(), upstream, request)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .writev(false)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

fn main() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        return Err("usage: bare_proxy <listen addr> <upstream addr>".into());
    };
    let listen: SocketAddr = listen.parse()?;
    let upstream: SocketAddr = upstream.parse()?;
    let listener = std::net::TcpListener::bind(listen)?;
    listener.set_nonblocking(true)?;
    // One event loop per core, as hookyard runs by default; both accept from the same socket.
    let loops = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (0..loops)
        .map(|_| {
            let listener = listener.try_clone()?;
            Ok(std::thread::spawn(move || serve(listener, upstream)))
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    for thread in threads {
        thread
            .join()
            .map_err(|_| "an event loop panicked")?
            .map_err(|e| format!("an event loop stopped: {e}"))?;
    }
    Ok(())
}
