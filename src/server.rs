//! Runs the sidecar: listeners, delivery workers, the purge task, and graceful shutdown.
//!
//! Shutdown order matters for the no-loss promise: stop accepting events, let sync calls in
//! flight finish within their deadline, let deliveries in flight record their results, then
//! close the store. Anything still leased at a crash is reclaimed when its lease expires.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::admin::Admin;
use crate::clock::now_ms;
use crate::config::Settings;
use crate::context::Context;
use crate::dispatcher::Dispatcher;
use crate::httpserver::fd_limit::ADMIN_MAX_CONNECTIONS;
use crate::httpserver::BodyBudget;
use crate::ingress::Ingress;
use crate::metrics::EdgeRefusal;
use crate::queue::StoreError;
use crate::reload::Reloader;

/// How often expired dead letters, delivered history and idempotency keys are purged.
const PURGE_EVERY: Duration = Duration::from_secs(60);

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot open store: {0}")]
    Store(#[from] StoreError),
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
    /// The state the running tasks share (settings in force, hosts, store).
    pub context: Arc<Context>,
    pub reloader: Arc<Reloader>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    ingress_threads: Vec<std::thread::JoinHandle<()>>,
}

/// Hands each accepted ingress connection to the event loop with the fewest open connections.
///
/// The first design had one `SO_REUSEPORT` socket per loop, and the kernel spread connections
/// by a hash of their addresses: for 64 connections over two loops that is 32 ± 4 each in a
/// typical draw, and worse now and then, so one loop could be saturated while the other had
/// spare time, differently for every new set of connections. One acceptor that counts each
/// loop's open connections keeps them even. (In the benchmark this made no clear difference to
/// throughput, within the machine's noise.)
struct Balancer {
    lanes: Vec<Lane>,
    /// The most connections open across all loops, asked at each accept so a reload of
    /// `ingress.max_connections` applies to the next one.
    max_connections: Box<dyn Fn() -> usize + Send>,
}

struct Lane {
    streams: mpsc::UnboundedSender<std::net::TcpStream>,
    open: Arc<AtomicUsize>,
}

impl Balancer {
    /// The loop to give the next connection to: the least loaded, the lowest index on a tie.
    fn pick(&self) -> Option<&Lane> {
        self.lanes
            .iter()
            .min_by_key(|lane| lane.open.load(Ordering::Relaxed))
    }

    /// Accepts until `shutdown`, then drops the listener and the loops' channels.
    async fn run(self, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
        loop {
            let stream = tokio::select! {
                s = crate::httpserver::accept(&listener) => s,
                _ = shutdown.wait_for(|stop| *stop) => break,
            };
            let open: usize = self
                .lanes
                .iter()
                .map(|l| l.open.load(Ordering::Relaxed))
                .sum();
            if open >= (self.max_connections)() {
                crate::httpserver::refuse(stream, EdgeRefusal::MaxConnections);
                continue;
            }
            let Some(lane) = self.pick() else { break };
            // Deregistered here, registered again by the loop that serves it.
            let stream = match stream.into_std() {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot hand over an accepted connection");
                    continue;
                }
            };
            lane.open.fetch_add(1, Ordering::Relaxed);
            if lane.streams.send(stream).is_err() {
                // That loop has stopped (shutdown is under way): the connection is dropped.
                lane.open.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

/// Runs one ingress event loop on its own thread: a single-threaded runtime, so a sync request
/// is received, forwarded through this loop's own upstream pool lane, and answered without
/// crossing threads.
fn spawn_ingress_thread(
    lane: usize,
    streams: mpsc::UnboundedReceiver<std::net::TcpStream>,
    open: Arc<AtomicUsize>,
    ingress: Arc<Ingress>,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("hookyard-ingress-{lane}"))
        .spawn(move || {
            crate::upstream::host::set_lane(lane);
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
                let stopped = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                let closed = move || {
                    open.fetch_sub(1, Ordering::Relaxed);
                };
                crate::httpserver::serve_streams(streams, ingress, stopped, drain, closed).await;
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
    let ingress_listener = bind("listen", settings.listen).await?;
    let ingress_threads_wanted = settings.ingress_threads.max(1);
    let admin_listener = bind("admin_listen", settings.admin_listen).await?;
    let ingress_addr = ingress_listener
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
    let descriptors = crate::httpserver::fd_limit::plan(&settings);
    tracing::info!(
        soft_limit_before = descriptors.soft_before,
        soft_limit = descriptors.soft,
        reserved = descriptors.reserved,
        max_connections = settings.edge.max_connections.min(descriptors.ingress_cap),
        configured_max_connections = settings.edge.max_connections,
        "file descriptors: ingress connections are capped below the limit, the rest is kept for upstream connections, the store and the admin port"
    );
    let store = crate::queue::open(&settings.store).await?;
    let ctx = Context::new(settings, store);
    let dispatcher = Dispatcher::new(ctx.clone());
    // Every series the rules can produce exists, at zero, from the first scrape.
    crate::metric_series::register_all(&ctx.snapshot().settings);
    let budget = BodyBudget::new();
    let reloader = Reloader::new(ctx.clone(), config_path);
    let (shutdown, shutdown_rx) = watch::channel(false);

    let stop = |rx: &watch::Receiver<bool>| {
        let mut rx = rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let sync_drain = max_sync_timeout(&ctx) + Duration::from_millis(500);
    let tasks = vec![
        tokio::spawn(crate::httpserver::serve(
            admin_listener,
            Admin::new(ctx.clone(), reloader.clone(), metrics, budget.clone()),
            stop(&shutdown_rx),
            Duration::from_secs(2),
            ADMIN_MAX_CONNECTIONS,
        )),
        tokio::spawn(crate::delivery::run(ctx.clone(), shutdown_rx.clone())),
        tokio::spawn(purge(ctx.clone(), shutdown_rx.clone())),
        // The watch is registered before `start` returns, so no change after it is missed.
        tokio::spawn(watch_config(
            reloader.clone(),
            crate::config::watch::watch(
                reloader.path(),
                Some(ctx.snapshot().settings.content_hash.clone()),
            ),
            shutdown_rx.clone(),
        )),
    ];
    let mut ingress_threads = Vec::with_capacity(ingress_threads_wanted);
    let mut lanes = Vec::with_capacity(ingress_threads_wanted);
    for i in 0..ingress_threads_wanted {
        let (streams, received) = mpsc::unbounded_channel();
        let open = Arc::new(AtomicUsize::new(0));
        let thread = spawn_ingress_thread(
            i + 1,
            received,
            open.clone(),
            Ingress::new(dispatcher.clone(), budget.clone()),
            shutdown_rx.clone(),
            sync_drain,
        )
        .map_err(|source| ServeError::Bind {
            what: "listen",
            addr: ingress_addr,
            source,
        })?;
        ingress_threads.push(thread);
        lanes.push(Lane { streams, open });
    }
    let mut tasks = tasks;
    let ingress_cap = descriptors.ingress_cap;
    let limits_from = ctx.clone();
    let balancer = Balancer {
        lanes,
        max_connections: Box::new(move || {
            ingress_cap.min(limits_from.snapshot().settings.edge.max_connections)
        }),
    };
    tasks.push(tokio::spawn(
        balancer.run(ingress_listener, shutdown_rx.clone()),
    ));
    tracing::info!(%ingress_addr, %admin_addr, event_loops = ingress_threads.len(), "hookyard is serving");
    Ok(RunningServer {
        ingress_addr,
        admin_addr,
        context: ctx,
        reloader,
        shutdown,
        tasks,
        ingress_threads,
    })
}

fn max_sync_timeout(ctx: &Context) -> Duration {
    ctx.snapshot()
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

async fn purge(ctx: Arc<Context>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PURGE_EVERY) => {}
            _ = shutdown.changed() => return,
        }
        let settings = ctx.snapshot().settings.clone();
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
        match ctx
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
        if let Err(e) = self.context.store().close().await {
            tracing::warn!(error = %e, "closing the store failed");
        }
        tracing::info!("hookyard stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The acceptor over a real listener: connections alternate while the loops are even, and
    /// go to the loop whose connections closed once they are not.
    #[tokio::test]
    async fn each_connection_goes_to_the_loop_with_the_fewest_open() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx0, mut rx0) = mpsc::unbounded_channel();
        let (tx1, mut rx1) = mpsc::unbounded_channel();
        let open = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
        let balancer = Balancer {
            lanes: vec![
                Lane {
                    streams: tx0,
                    open: open[0].clone(),
                },
                Lane {
                    streams: tx1,
                    open: open[1].clone(),
                },
            ],
            max_connections: Box::new(|| usize::MAX),
        };
        let (stop, stop_rx) = watch::channel(false);
        let acceptor = tokio::spawn(balancer.run(listener, stop_rx));

        let total = || open.iter().map(|o| o.load(Ordering::SeqCst)).sum::<usize>();
        let mut clients = Vec::new();
        // Connects a client and returns the loop its connection was handed to.
        let mut connect_one = async || {
            let before = total();
            clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
            while total() == before {
                tokio::task::yield_now().await;
            }
            let (to0, to1) = (rx0.try_recv().is_ok(), rx1.try_recv().is_ok());
            assert!(to0 != to1, "exactly one loop gets each connection");
            if to0 {
                0
            } else {
                1
            }
        };
        let mut order = Vec::new();
        for _ in 0..6 {
            order.push(connect_one().await);
        }
        assert_eq!(order, [0, 1, 0, 1, 0, 1]);

        // Two of loop 1's connections close: the next two go to loop 1.
        open[1].fetch_sub(2, Ordering::SeqCst);
        assert_eq!([connect_one().await, connect_one().await], [1, 1]);

        let _ = stop.send(true);
        acceptor.await.unwrap();
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "listener closed"
        );
    }
}
