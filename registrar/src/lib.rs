//! Switchyard's registrar: Docker Engine events in, Consul agent registrations out, one per
//! opted-in container or swarm task on this node.
//!
//! # Layout
//! - [`config`]: the whole configuration as one value.
//! - [`docker`]: the engine (bollard): list, inspect, the event stream as `DockerEvent`s.
//! - [`labels`]: a container's labels as validated values, or every reason they are not.
//! - [`instance`]: pure; a container and its labels as a Consul `ServiceInstance`.
//! - [`reconcile`]: pure; desired vs owned -> changes.
//! - [`consul`]: the one adapter that talks to the Consul agent.
//! - [`state`]: what is registered; applies events and runs the resync.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`. [`metrics`]: every metric, declared once.
//!
//! Everything that changes Consul happens on one task, in event order: events from the stream
//! (read on their own task so the daemon never waits on Consul I/O), the resync tick, and the
//! full reconcile after every (re)subscription.

pub mod admin;
pub mod config;
pub mod consul;
pub mod docker;
pub mod instance;
pub mod labels;
pub mod metrics;
pub mod reconcile;
pub mod state;

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use switchyard_consul::backoff::Backoff;
use switchyard_consul::Client;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::instance::InstanceSettings;
use crate::metrics::{FailureOp, Metrics};
use crate::state::{now_nanos, Registrar, DEDUPE_WINDOW};

/// Runs until `shutdown` resolves. Never exits on a Docker or Consul failure: it backs off,
/// reconnects and reconciles.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let admin_listener = tokio::net::TcpListener::bind(cfg.admin_listen)
        .await
        .with_context(|| format!("binding the admin listener {}", cfg.admin_listen))?;
    tokio::spawn(admin::serve(admin_listener, metrics.clone(), ready.clone()));
    let consul =
        Client::new(&cfg.consul_addr, cfg.consul_token.clone()).context("Consul client")?;
    tokio::pin!(shutdown);

    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let (docker, node) = loop {
        let attempt = async {
            let docker = docker::connect().await?;
            let node = match &cfg.node {
                Some(n) => n.clone(),
                None => docker::node_name(&docker).await?,
            };
            Ok::<_, docker::DockerError>((docker, node))
        };
        match attempt.await {
            Ok(pair) => break pair,
            Err(e) => {
                metrics.failed(FailureOp::DockerConnect);
                let wait = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?wait, "Docker engine unavailable");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => continue,
                    _ = &mut shutdown => return Ok(()),
                }
            }
        }
    };
    tracing::info!(node = %node, consul = %consul.base(), docker_api = %docker.client_version(), "registrar starting");
    let settings = InstanceSettings {
        node,
        label_prefix: cfg.label_prefix.clone(),
        tag_prefix: cfg.tag_prefix.clone(),
        network: cfg.network.clone(),
        check_interval: cfg.check_interval,
        check_timeout: cfg.check_timeout,
        deregister_critical_after: cfg.deregister_critical_after,
        ttl: cfg.ttl,
    };
    let mut r = Registrar {
        cfg,
        docker,
        consul: consul::Consul::new(consul, metrics.clone()),
        metrics,
        settings,
        registered: HashMap::new(),
        stopping: HashSet::new(),
        warned: HashSet::new(),
        recent: VecDeque::with_capacity(DEDUPE_WINDOW),
        last_event_nano: now_nanos(),
    };

    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        // Subscribe first, then reconcile, then apply what queued meanwhile: no gap.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(docker::forward_events(
            r.docker.clone(),
            r.last_event_nano,
            tx,
        ));
        r.metrics.docker_up.set(1);
        let mut next_resync = tokio::time::Instant::now();
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => {
                    reader.abort();
                    return Ok(());
                }
                event = rx.recv() => match event {
                    Some(e) => r.handle(e).await,
                    None => break,
                },
                _ = tokio::time::sleep_until(next_resync) => {
                    next_resync = tokio::time::Instant::now() + match r.resync().await {
                        Ok(()) => {
                            ready.store(true, Ordering::Release);
                            backoff.reset();
                            r.cfg.resync
                        }
                        Err(e) => {
                            let wait = backoff.next_delay().min(r.cfg.resync);
                            tracing::warn!(error = %format!("{e:#}"), retry_in = ?wait, "reconcile failed; keeping what is registered");
                            wait
                        }
                    };
                }
            }
        }
        r.metrics.docker_up.set(0);
        r.metrics.docker_reconnects.inc();
        match reader.await {
            Ok(Err(e)) => {
                r.metrics.failed(FailureOp::DockerEvents);
                tracing::warn!(error = %e, "Docker event stream failed; resubscribing");
            }
            _ => tracing::warn!("Docker event stream ended; resubscribing"),
        }
        let wait = backoff.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = &mut shutdown => return Ok(()),
        }
    }
}
