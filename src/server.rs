//! Runs the sidecar: listeners, delivery workers, the purge task, and graceful shutdown.
//!
//! Shutdown order matters for the no-loss promise: stop accepting events, let sync calls in
//! flight finish within their deadline, let deliveries in flight record their results, then
//! close the store. Anything still leased at a crash is reclaimed when its lease expires.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::Admin;
use crate::clock::now_ms;
use crate::config::Settings;
use crate::dispatcher::{Dispatcher, StartError};
use crate::ingress::Ingress;
use crate::reload::Reloader;

/// How often expired dead letters, delivered history and idempotency keys are purged.
const PURGE_EVERY: Duration = Duration::from_secs(60);

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running sidecar.
pub struct RunningServer {
    /// The data plane's bound address (useful with port 0).
    pub ingress_addr: SocketAddr,
    /// The admin API's bound address.
    pub admin_addr: SocketAddr,
    pub dispatcher: Arc<Dispatcher>,
    pub reloader: Arc<Reloader>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    ingress_threads: Vec<std::thread::JoinHandle<()>>,
}

/// `count` listening sockets on one address with SO_REUSEPORT, so the kernel spreads incoming
/// connections over the ingress event loops. With port 0 the first socket picks the port and
/// the others join it. SO_REUSEPORT would also let a second hookyard of the same user join the
/// port; the admin listener is bound without it, so a second instance with the same config
/// fails to start instead of silently splitting traffic.
fn bind_ingress(addr: SocketAddr, count: usize) -> Result<Vec<std::net::TcpListener>, ServeError> {
    use socket2::{Domain, Socket, Type};
    let fail = |source: std::io::Error| ServeError::Bind {
        what: "listen",
        addr,
        source,
    };
    let mut sockets = Vec::with_capacity(count);
    let mut bound = addr;
    for _ in 0..count.max(1) {
        let socket = Socket::new(Domain::for_address(bound), Type::STREAM, None).map_err(fail)?;
        socket.set_reuse_address(true).map_err(fail)?;
        socket.set_reuse_port(true).map_err(fail)?;
        socket.set_nonblocking(true).map_err(fail)?;
        socket.bind(&bound.into()).map_err(fail)?;
        socket.listen(1024).map_err(fail)?;
        let listener: std::net::TcpListener = socket.into();
        bound = listener.local_addr().map_err(fail)?;
        sockets.push(listener);
    }
    Ok(sockets)
}

/// Runs one ingress event loop on its own thread: a single-threaded runtime, so a sync request
/// is received, forwarded through this loop's own upstream pool lane, and answered without
/// crossing threads.
fn spawn_ingress_thread(
    lane: usize,
    socket: std::net::TcpListener,
    dispatcher: Arc<Dispatcher>,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("hookyard-ingress-{lane}"))
        .spawn(move || {
            crate::sync::host::set_lane(lane);
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, lane, "cannot start an ingress event loop");
                    return;
                }
            };
            runtime.block_on(async move {
                let listener = match TcpListener::from_std(socket) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, lane, "cannot register the ingress socket");
                        return;
                    }
                };
                let stopped = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                crate::httpserver::serve(listener, Ingress::new(dispatcher), stopped, drain).await;
            });
        })
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { what, addr, source })
}

/// Opens the store, binds both listeners and starts every task.
pub async fn start(config_path: PathBuf, settings: Settings) -> Result<RunningServer, ServeError> {
    let metrics = crate::metrics::install();
    let ingress_sockets = bind_ingress(settings.listen, settings.ingress_threads)?;
    let admin_listener = bind("admin_listen", settings.admin_listen).await?;
    let ingress_addr = ingress_sockets[0]
        .local_addr()
        .map_err(|source| ServeError::Bind {
            what: "listen",
            addr: settings.listen,
            source,
        })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| ServeError::Bind {
            what: "admin_listen",
            addr: settings.admin_listen,
            source,
        })?;
    let dispatcher = Dispatcher::from_config(settings).await?;
    let reloader = Reloader::new(dispatcher.clone(), config_path);
    let (shutdown, shutdown_rx) = watch::channel(false);

    let stop = |rx: &watch::Receiver<bool>| {
        let mut rx = rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let sync_drain = max_sync_timeout(&dispatcher) + Duration::from_millis(500);
    let tasks = vec![
        tokio::spawn(crate::httpserver::serve(
            admin_listener,
            Admin::new(dispatcher.clone(), reloader.clone(), metrics),
            stop(&shutdown_rx),
            Duration::from_secs(2),
        )),
        tokio::spawn(crate::delivery::run(
            dispatcher.clone(),
            shutdown_rx.clone(),
        )),
        tokio::spawn(purge(dispatcher.clone(), shutdown_rx.clone())),
        // The watch is registered before `start` returns, so no change after it is missed.
        tokio::spawn(watch_config(
            reloader.clone(),
            crate::config::watch::watch(reloader.path()),
            shutdown_rx.clone(),
        )),
    ];
    let mut ingress_threads = Vec::with_capacity(ingress_sockets.len());
    for (i, socket) in ingress_sockets.into_iter().enumerate() {
        let thread = spawn_ingress_thread(
            i + 1,
            socket,
            dispatcher.clone(),
            shutdown_rx.clone(),
            sync_drain,
        )
        .map_err(|source| ServeError::Bind {
            what: "listen",
            addr: ingress_addr,
            source,
        })?;
        ingress_threads.push(thread);
    }
    tracing::info!(%ingress_addr, %admin_addr, event_loops = ingress_threads.len(), "hookyard is serving");
    Ok(RunningServer {
        ingress_addr,
        admin_addr,
        dispatcher,
        reloader,
        shutdown,
        tasks,
        ingress_threads,
    })
}

fn max_sync_timeout(dispatcher: &Dispatcher) -> Duration {
    dispatcher
        .snapshot()
        .settings
        .rules
        .rules()
        .iter()
        .map(|r| r.timeout)
        .max()
        .unwrap_or(Duration::ZERO)
}

/// Reloads on every debounced change of the config file. If the watch cannot be set up (an
/// exotic filesystem), SIGHUP and the admin API still reload; the failure is logged.
async fn watch_config(
    reloader: Arc<Reloader>,
    watch: notify::Result<(
        crate::config::watch::ConfigWatch,
        tokio::sync::mpsc::Receiver<()>,
    )>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (_watch, mut changes) = match watch {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, path = %reloader.path().display(), "cannot watch the config file; reload with SIGHUP or POST /v1/config/reload");
            return;
        }
    };
    loop {
        tokio::select! {
            change = changes.recv() => {
                if change.is_none() {
                    return;
                }
                // The outcome is logged, counted and shown on /v1/config by the reloader.
                let _ = reloader.reload("file").await;
            }
            _ = shutdown.changed() => return,
        }
    }
}

async fn purge(dispatcher: Arc<Dispatcher>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PURGE_EVERY) => {}
            _ = shutdown.changed() => return,
        }
        let settings = dispatcher.snapshot().settings.clone();
        // One purge horizon for all queues: the longest retention, so no queue loses dead
        // letters earlier than it asked.
        let retention = settings
            .queues
            .named
            .values()
            .map(|q| q.dlq_retention)
            .chain(std::iter::once(settings.queues.default.dlq_retention))
            .max()
            .unwrap_or_default();
        let now = now_ms();
        match dispatcher
            .store()
            .purge(now - retention.as_millis() as i64, now)
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                purged = n,
                "purged expired dead letters and delivered history"
            ),
            Err(e) => tracing::warn!(error = %e, "purge failed; will retry"),
        }
    }
}

impl RunningServer {
    /// Stops accepting, drains, closes the store.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let threads = self.ingress_threads;
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
        for task in self.tasks {
            let _ = task.await;
        }
        if let Err(e) = self.dispatcher.store().close().await {
            tracing::warn!(error = %e, "closing the store failed");
        }
        tracing::info!("hookyard stopped");
    }
}
