//! Switchyard's lb: a reverse proxy whose routing table is driven by Consul.
//!
//! # Layout
//! Bottom up; a module imports only from layers below its own (`scripts/check-layers`).
//! - [`config`], [`metrics`], [`time`], [`field_list`]: the configuration as one value; every
//!   metric and label value, declared once; the clocks; HTTP's comma-separated lists.
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
//! - `run` (here): bind, spawn, wait for shutdown, drain, stop.
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
pub mod routing;
pub mod server;
pub mod state;
pub mod time;
pub mod upstream;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::server::tls;
pub use crate::state::Shared;

/// Runs the lb until `shutdown` resolves, then drains: readiness turns false at once, the proxy
/// keeps accepting for `drain_delay` (so load balancers in front notice), stops accepting, and
/// waits up to `shutdown_timeout` for in-flight requests.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let client = switchyard_consul::Client::connect(&config.consul).context("Consul client")?;
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
        "lb starting"
    );
    let tasks = Tasks::spawn(&shared, client, listeners);
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
        let proxy = TcpListener::bind(config.listen)
            .await
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
                let listener = TcpListener::bind(addr)
                    .await
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
}

impl Tasks {
    fn spawn(shared: &Arc<Shared>, client: switchyard_consul::Client, l: Listeners) -> Tasks {
        let shutdown_timeout = shared.config.shutdown_timeout;
        let (stop_discovery, discovery_rx) = watch::channel(false);
        let (stop_proxy, proxy_rx) = watch::channel(false);
        let (stop_admin, admin_rx) = watch::channel(false);
        let serve = |listener, tls| {
            let rx = proxy_rx.clone();
            tokio::spawn(server::serve_proxy(
                shared.clone(),
                listener,
                tls,
                rx,
                shutdown_timeout,
            ))
        };
        let proxy = serve(l.proxy, None);
        let (tls_proxy, cert_watch) = match l.tls {
            Some((tls, listener)) => (
                Some(serve(listener, Some(tls.clone()))),
                Some(tokio::spawn(tls::watch_certificates(
                    tls,
                    shared.clone(),
                    shared.config.tls_reload_interval,
                    admin_rx.clone(),
                ))),
            ),
            None => (None, None),
        };
        Tasks {
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
        }
    }

    /// Stops accepting, waits for the drain, then stops the rest; returns the connections
    /// the drain's time limit cut.
    async fn stop(self) -> usize {
        let _ = self.stop_proxy.send(true);
        let mut left = self.proxy.await.unwrap_or(0);
        if let Some(tls_proxy) = self.tls_proxy {
            // Both listeners report the process-wide open counts: the larger is the total.
            left = left.max(tls_proxy.await.unwrap_or(0));
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
