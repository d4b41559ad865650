//! Switchyard's lb: a reverse proxy whose routing table is driven by Consul.
//!
//! # Layout
//! Bottom up; a module imports only from layers below its own (`scripts/check-layers`).
//! - [`config`], [`metrics`], [`time`], [`field_list`], [`worker`]: the configuration as one
//!   value; every metric and label value, declared once; the clocks; HTTP's comma-separated
//!   lists; which worker thread is running.
//! - [`access_log`] (beside `upstream`): the access log's queue and writer thread.
//! - [`upstream`]: the lb as an HTTP client: per-backend state (in-flight, ejection, the pool),
//!   the HTTP/1.1 codec, the HTTP/2 handle, the retry budget. No routes, clients or shared
//!   state.
//! - [`routing`]: the immutable [`routing::RoutingTable`], its incremental build, the picks.
//! - [`state`]: [`Shared`], the runtime state in typed parts.
//! - [`discovery`]: Consul blocking queries in, one new table out. [`proxy`]: the request path
//!   (route, forward, retry, forwarding fields, local answers, upgrades).
//! - [`server`]: listeners, connections, parking, TLS, the drain.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`, `/routes`, `/why` on a separate listener.
//! - `run` (here): bind, start the workers, spawn, wait for shutdown, drain, stop.
//!
//! # Threads
//! Each of `LB_WORKERS` workers is a thread with a single-threaded tokio runtime of its own,
//! as nginx and HAProxy run one event loop per worker: a connection, its tasks, its timers
//! and the idle upstream connections its requests reuse stay on one thread, with no work
//! stealing and no wake-ups across threads (but for an h2c backend's one connection, which
//! runs on worker 0 and carries every worker's requests). On Linux every worker accepts from
//! a listening socket of its own, the kernel choosing each new connection's
//! ([`server::listen`]); a worker that holds two more than another hands it over
//! ([`server::spread`]). Worker 0 is
//! the thread that calls [`run`], and also runs discovery, the admin listener and the
//! certificate watch.
//!
//! Data flows one way: Consul -> `discovery` -> `ArcSwap<RoutingTable>` in [`Shared`] ->
//! `proxy` -> `upstream` -> a backend's socket.

pub mod access_log;
pub mod admin;
pub mod config;
pub mod discovery;
pub mod field_list;
pub mod metrics;
pub mod proxy;
pub mod rlimit;
pub mod routing;
pub mod server;
pub mod sockopt;
pub mod splice;
pub mod state;
pub mod time;
pub mod upstream;
pub mod worker;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::server::tls;
pub use crate::state::Shared;

/// Runs the lb until `shutdown` resolves, then drains: readiness turns false at once, the proxy
/// keeps accepting for `drain_delay` (so load balancers in front notice), stops accepting, and
/// waits up to `shutdown_timeout` for in-flight requests.
///
/// Call it on a current-thread runtime: it is worker 0, and starts the other workers' threads
/// itself (`config.workers`, by default one per CPU the process may run on).
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let client = switchyard_consul::Client::connect(&config.consul).context("Consul client")?;
    // Before any backend is made: each keeps its idle connections per worker.
    worker::set_count(config.workers.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    }));
    let shared = Arc::new(Shared::new(config));
    let listeners = Listeners::bind(&shared).await?;
    let config = &shared.config;
    tracing::info!(
        listen = %listeners.proxy.local_addr()?,
        tls_listen = ?listeners.tls.as_ref().map(|(_, l)| l.local_addr()).transpose()?,
        admin = %listeners.admin.local_addr()?,
        consul = %client.addr(),
        balance = ?config.balance,
        h2c = config.h2c,
        workers = worker::count(),
        "lb starting"
    );
    let tasks = Tasks::spawn(&shared, client, listeners)?;
    shutdown.await;
    shared.shutting_down.store(true, Ordering::Release);
    let drain_delay = config.drain_delay;
    tracing::info!(drain_delay = ?drain_delay, "shutdown requested: readiness is false, still accepting");
    tokio::time::sleep(drain_delay).await;
    let left = tasks.stop().await;
    // The lines of the last requests, cut ones included, go out before the process does.
    if let Some(log) = &shared.access_log {
        log.finish(std::time::Duration::from_secs(2)).await;
    }
    tracing::info!(connections_cut = left, "lb stopped");
    Ok(())
}

/// Every listener, bound before any task starts, so a taken port or a bad certificate fails
/// the start with a message that names it.
struct Listeners {
    proxy: TcpListener,
    admin: TcpListener,
    tls: Option<(Arc<tls::Tls>, TcpListener)>,
}

impl Listeners {
    async fn bind(shared: &Shared) -> anyhow::Result<Listeners> {
        let config = &shared.config;
        let proxy =
            server::listen::bind(config.listen, worker::count(), config.client_notsent_lowat)
                .with_context(|| format!("binding the proxy listener {}", config.listen))?;
        let admin = TcpListener::bind(config.admin_listen)
            .await
            .with_context(|| format!("binding the admin listener {}", config.admin_listen))?;
        let tls = match config.tls_listen {
            None => None,
            Some(addr) => {
                let tls = tls::Tls::new(
                    &config.tls_certs,
                    config.http2,
                    config.tls_handshake_timeout,
                    &shared.metrics,
                )
                .map_err(|e| anyhow::anyhow!("loading TLS certificates:\n{e}"))?;
                let listener =
                    server::listen::bind(addr, worker::count(), config.client_notsent_lowat)
                        .with_context(|| format!("binding the TLS listener {addr}"))?;
                Some((Arc::new(tls), listener))
            }
        };
        Ok(Listeners { proxy, admin, tls })
    }
}

/// The lb's tasks, with what stops each: the listeners first (they drain), then discovery,
/// admin and the certificate watch.
struct Tasks {
    stop_proxy: watch::Sender<bool>,
    stop_discovery: watch::Sender<bool>,
    stop_admin: watch::Sender<bool>,
    proxy: JoinHandle<usize>,
    tls_proxy: Option<JoinHandle<usize>>,
    discovery: JoinHandle<()>,
    admin: JoinHandle<()>,
    cert_watch: Option<JoinHandle<()>>,
    /// Workers 1 and up.
    workers: Vec<Worker>,
}

impl Tasks {
    fn spawn(
        shared: &Arc<Shared>,
        client: switchyard_consul::Client,
        l: Listeners,
    ) -> anyhow::Result<Tasks> {
        let shutdown_timeout = shared.config.shutdown_timeout;
        let (stop_discovery, discovery_rx) = watch::channel(false);
        let (stop_proxy, proxy_rx) = watch::channel(false);
        let (stop_admin, admin_rx) = watch::channel(false);
        let serve = |listener, spread, tls| {
            let rx = proxy_rx.clone();
            tokio::spawn(server::serve_proxy(
                shared.clone(),
                listener,
                spread,
                tls,
                rx,
                shutdown_timeout,
            ))
        };
        let mut spread = server::spread::spread(worker::count()).into_iter();
        let mut tls_spread = server::spread::spread(worker::count()).into_iter();
        let (Some(spread0), Some(tls_spread0)) = (spread.next(), tls_spread.next()) else {
            unreachable!("at least one worker");
        };
        let mut workers = Vec::with_capacity(worker::count() - 1);
        for (i, spreads) in (1..).zip(spread.zip(tls_spread)) {
            // On a failure, the workers started so far stop when `stop_proxy` is dropped.
            workers.push(
                Worker::start(i, shared, &l, spreads, proxy_rx.clone())
                    .with_context(|| format!("starting worker {i}"))?,
            );
        }
        let proxy = serve(l.proxy, spread0, None);
        let (tls_proxy, cert_watch) = match l.tls {
            Some((tls, listener)) => (
                Some(serve(listener, tls_spread0, Some(tls.clone()))),
                Some(tokio::spawn(tls::watch_certificates(
                    tls,
                    shared.clone(),
                    shared.config.tls_reload_interval,
                    admin_rx.clone(),
                ))),
            ),
            None => (None, None),
        };
        Ok(Tasks {
            discovery: tokio::spawn(discovery::watch_consul(
                shared.clone(),
                client,
                discovery_rx,
            )),
            admin: tokio::spawn(admin::serve_admin(shared.clone(), l.admin, admin_rx)),
            proxy,
            tls_proxy,
            cert_watch,
            stop_proxy,
            stop_discovery,
            stop_admin,
            workers,
        })
    }

    /// Stops accepting, waits for the drain, then stops the rest; returns the connections
    /// the drain's time limit cut.
    async fn stop(self) -> usize {
        let _ = self.stop_proxy.send(true);
        let mut left = self.proxy.await.unwrap_or(0);
        // Every listener reports the process-wide open counts: the largest is the total.
        if let Some(tls_proxy) = self.tls_proxy {
            left = left.max(tls_proxy.await.unwrap_or(0));
        }
        for w in self.workers {
            left = left.max(w.stop().await);
        }
        let _ = self.stop_discovery.send(true);
        let _ = self.stop_admin.send(true);
        let _ = self.discovery.await;
        let _ = self.admin.await;
        if let Some(w) = self.cert_watch {
            let _ = w.await;
        }
        left
    }
}

/// A worker thread (1 and up): its own current-thread runtime serving its own listening
/// sockets for the proxy's addresses, until `stop` flips and its drain is over.
struct Worker {
    thread: std::thread::JoinHandle<()>,
    /// The connections its drain left open, once it is over.
    done: oneshot::Receiver<usize>,
}

impl Worker {
    /// Starts worker `i`. Its runtime and listeners are made here, so a failure is the
    /// start's; the thread only runs them.
    fn start(
        i: usize,
        shared: &Arc<Shared>,
        l: &Listeners,
        (spread, tls_spread): (server::spread::Spread, server::spread::Spread),
        stop: watch::Receiver<bool>,
    ) -> anyhow::Result<Worker> {
        // One thread per runtime: the server relies on a task it spawned not running
        // while its own code runs (`server::Listener::serve`, a tunnel and its pin).
        let runtime = WorkerRuntime(Some(
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("its runtime")?,
        ));
        let (proxy, tls) = {
            // Registered with the worker's own reactor, which wakes only its thread.
            let _in = runtime.get().enter();
            let lowat = shared.config.client_notsent_lowat;
            let proxy = server::listen::another(&l.proxy, lowat).context("the proxy listener")?;
            let tls = match &l.tls {
                None => None,
                Some((tls, listener)) => Some((
                    tls.clone(),
                    server::listen::another(listener, lowat).context("the TLS listener")?,
                )),
            };
            (proxy, tls)
        };
        let shared = shared.clone();
        let (finished, done) = oneshot::channel();
        let serve = async move {
            let drain = shared.config.shutdown_timeout;
            let plain =
                server::serve_proxy(shared.clone(), proxy, spread, None, stop.clone(), drain);
            match tls {
                None => plain.await,
                Some((tls, listener)) => {
                    let tls =
                        server::serve_proxy(shared, listener, tls_spread, Some(tls), stop, drain);
                    let (a, b) = tokio::join!(plain, tls);
                    a.max(b)
                }
            }
        };
        let thread = std::thread::Builder::new()
            .name(format!("lb-worker-{i}"))
            .spawn(move || {
                worker::enter(i);
                let mut left = 0;
                block_on(runtime.get(), Box::pin(async { left = serve.await }));
                // The runtime goes first: connections the drain cut are dropped, and their
                // access log lines queued, before the process's last flush.
                drop(runtime);
                let _ = finished.send(left);
            })
            .context("its thread")?;
        Ok(Worker { thread, done })
    }

    /// Waits for the worker's drain and its thread's end; returns the connections the drain
    /// cut.
    async fn stop(self) -> usize {
        let left = self.done.await.unwrap_or(0);
        let _ = tokio::task::spawn_blocking(move || self.thread.join()).await;
        left
    }
}

/// Runs `work` on `runtime` to its end: worker 0's `run` (from `main`) and every other
/// worker's serving alike. One future type makes one copy of the scheduler's loop, which the
/// compiler inlines here; with two, it inlined neither (+0.5% instructions per request).
#[inline(never)]
pub fn block_on(runtime: &tokio::runtime::Runtime, work: Pin<Box<dyn Future<Output = ()> + '_>>) {
    runtime.block_on(work)
}

/// A worker's runtime. Dropped, it shuts down without waiting for blocking threads (a
/// worker starts none). Waiting would panic where a failed start drops it: inside worker 0's
/// runtime.
struct WorkerRuntime(Option<tokio::runtime::Runtime>);

impl WorkerRuntime {
    fn get(&self) -> &tokio::runtime::Runtime {
        self.0.as_ref().expect("taken only when dropped")
    }
}

impl Drop for WorkerRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}
