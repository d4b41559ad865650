//! Switchyard's registrar: Docker Engine events in, Consul agent registrations out, one per
//! opted-in container or swarm task on this node.
//!
//! # Layout
//! Data flows one way: a Docker event (or the resync's list) -> [`docker`] (a `ContainerInfo`)
//! -> [`labels`] (validated `ServiceLabels`) -> [`instance`] (pure: a `ServiceInstance`) ->
//! [`state`] (what is registered; on resync, [`reconcile`] plans the changes) -> [`consul`] (the
//! one adapter) -> the Consul agent. Each module imports only from those listed before it:
//!
//! - [`config`]: the whole configuration as one value. [`metrics`]: every metric and label
//!   value, declared once. [`journal`]: what was decided for each container, and why.
//! - [`docker`]: the engine (bollard): connect, list, inspect, the event stream as
//!   `DockerEvent`s.
//! - [`labels`]: a container's labels as validated `ServiceLabels`, or every reason they are not.
//! - [`instance`]: pure; a container and its parsed labels as a Consul `ServiceInstance`.
//! - [`reconcile`]: pure; desired vs owned -> changes; the agent's checks vs the catalog's ->
//!   instances to register again.
//! - [`consul`]: the one adapter that talks to the Consul agent; counts, logs, sets `consul_up`.
//! - [`state`]: what is registered; applies events in order and runs the resync, driving
//!   `docker`, `instance` and `reconcile` and writing through `consul`.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`.
//! - `run` (here): wires them up and hands the event loop to `state`.
//!
//! Everything that changes Consul happens on one task, in event order: events from the stream
//! (read on their own task so the daemon never waits on Consul I/O), the resync tick, and the
//! full reconcile after every (re)subscription.

pub mod admin;
pub mod config;
pub mod consul;
pub mod docker;
pub mod instance;
pub mod journal;
pub mod labels;
pub mod metrics;
pub mod reconcile;
pub mod state;

use std::future::Future;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context as _;
use switchyard_consul::Client;

use crate::config::Config;
use crate::consul::Consul;
use crate::metrics::Metrics;
use crate::state::Registrar;

/// Runs until `shutdown` resolves. Never exits on a Docker or Consul failure: it backs off,
/// reconnects and reconciles.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let journal = Arc::new(journal::Journal::default());
    let ready = Arc::new(AtomicBool::new(false));
    let admin_listener = tokio::net::TcpListener::bind(cfg.admin_listen)
        .await
        .with_context(|| format!("binding the admin listener {}", cfg.admin_listen))?;
    tokio::spawn(admin::serve(
        admin_listener,
        metrics.clone(),
        journal.clone(),
        ready.clone(),
    ));
    let client = Client::connect(&cfg.consul).context("Consul client")?;
    tokio::pin!(shutdown);
    let connected =
        docker::connect_retrying(cfg.node.as_deref(), &metrics, shutdown.as_mut()).await;
    let Some((docker, node)) = connected else {
        return Ok(());
    };
    tracing::info!(node = %node, consul = %client.addr(), docker_api = %docker.client_version(), "registrar starting");
    let consul = Consul::new(client, metrics.clone());
    let mut registrar = Registrar::new(cfg, docker, node, consul, metrics, journal);
    registrar.watch_docker(&ready, shutdown).await;
    Ok(())
}
