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
            ingress_listener,
            Ingress::new(dispatcher.clone()),
            stop(&shutdown_rx),
            sync_drain,
        )),
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
            shutdown_rx,
        )),
    ];
    tracing::info!(%ingress_addr, %admin_addr, "hookyard is serving");
    Ok(RunningServer {
        ingress_addr,
        admin_addr,
        dispatcher,
        reloader,
        shutdown,
        tasks,
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
        for task in self.tasks {
            let _ = task.await;
        }
        if let Err(e) = self.dispatcher.store().close().await {
            tracing::warn!(error = %e, "closing the store failed");
        }
        tracing::info!("hookyard stopped");
    }
}
