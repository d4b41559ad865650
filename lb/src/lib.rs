//! Switchyard's lb: a reverse proxy whose routing table is driven by Consul.
//!
//! # Layout
//! - [`config`]: the whole configuration as one value (env and flags).
//! - [`discovery`]: Consul blocking queries in, one new [`routing::RoutingTable`] out.
//! - [`routing`]: the immutable table, route lookup and balancing picks.
//! - [`backend`]: per-address state that survives reloads: in-flight, ejection, connection pool.
//! - [`proxy`]: the request path (lookup, pick, forward, retry) and [`body`] its body types.
//! - [`server`]: accepting client connections (HTTP/1.1, HTTP/2, upgrades) and draining them;
//!   [`parking`] lets idle plain HTTP/1.1 connections drop their buffers.
//! - [`tls`]: certificates by SNI, their reloads, and the TLS handshake.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`, `/routes` on a separate listener.
//! - [`metrics`]: every metric name, declared once.
//!
//! Data flows one way: Consul -> `discovery` -> `ArcSwap<RoutingTable>` -> `proxy`.

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

use crate::config::Config;
use crate::server::tls;
pub use crate::state::Shared;

/// Runs the lb until `shutdown` resolves, then drains: readiness turns false at once, the proxy
/// keeps accepting for `drain_delay` (so load balancers in front notice), stops accepting, and
/// waits up to `shutdown_timeout` for in-flight requests.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let client = switchyard_consul::Client::new(&config.consul_addr, config.consul_token.clone())
        .context("Consul client")?;
    let proxy_listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding the proxy listener {}", config.listen))?;
    let admin_listener = TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("binding the admin listener {}", config.admin_listen))?;
    let shared = Arc::new(Shared::new(config));
    let config = &shared.config;
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
    tracing::info!(
        listen = %proxy_listener.local_addr()?,
        tls_listen = ?tls.as_ref().map(|(_, l)| l.local_addr()).transpose()?,
        admin = %admin_listener.local_addr()?,
        consul = %client.base(),
        balance = ?config.balance,
        h2c = config.h2c,
        "lb starting"
    );
    let drain_delay = config.drain_delay;
    let shutdown_timeout = config.shutdown_timeout;

    let (stop_discovery, discovery_rx) = watch::channel(false);
    let (stop_proxy, proxy_rx) = watch::channel(false);
    let (stop_admin, admin_rx) = watch::channel(false);
    let discovery = tokio::spawn(discovery::watch_consul(
        shared.clone(),
        client,
        discovery_rx,
    ));
    let admin = tokio::spawn(admin::serve_admin(
        shared.clone(),
        admin_listener,
        admin_rx.clone(),
    ));
    let proxy = tokio::spawn(server::serve_proxy(
        shared.clone(),
        proxy_listener,
        None,
        proxy_rx.clone(),
        shutdown_timeout,
    ));
    let (tls_proxy, cert_watch) = match tls {
        Some((tls, listener)) => (
            Some(tokio::spawn(server::serve_proxy(
                shared.clone(),
                listener,
                Some(tls.clone()),
                proxy_rx,
                shutdown_timeout,
            ))),
            Some(tokio::spawn(tls::watch_certificates(
                tls,
                shared.clone(),
                shared.config.tls_reload_interval,
                admin_rx.clone(),
            ))),
        ),
        None => (None, None),
    };

    shutdown.await;
    shared.shutting_down.store(true, Ordering::Release);
    tracing::info!(drain_delay = ?drain_delay, "shutdown requested: readiness is false, still accepting");
    tokio::time::sleep(drain_delay).await;
    let _ = stop_proxy.send(true);
    let mut left = proxy.await.unwrap_or(0);
    if let Some(tls_proxy) = tls_proxy {
        // Both listeners report the process-wide open counts: the larger is the total.
        left = left.max(tls_proxy.await.unwrap_or(0));
    }
    let _ = stop_discovery.send(true);
    let _ = stop_admin.send(true);
    let _ = discovery.await;
    let _ = admin.await;
    if let Some(w) = cert_watch {
        let _ = w.await;
    }
    tracing::info!(connections_cut = left, "lb stopped");
    Ok(())
}
