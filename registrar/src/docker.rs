//! The Docker side: the engine connection (API version negotiated down to the engine's), the
//! container list, inspect, and the event stream turned into `DockerEvent`s. Nothing here
//! talks to Consul; the event stream is read on its own task and forwarded in order.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bollard::query_parameters::{
    EventsOptionsBuilder, InspectContainerOptions, ListContainersOptionsBuilder,
};
use bollard::Docker;
use futures_util::StreamExt;
use switchyard_daemon::backoff::Backoff;
use tokio::sync::mpsc;

use crate::metrics::{FailureOp, Metrics};

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("cannot reach the Docker engine: {0}")]
    Connect(#[source] bollard::errors::Error),
    #[error("Docker {op} failed: {source}")]
    Api {
        op: &'static str,
        #[source]
        source: bollard::errors::Error,
    },
}

/// Docker's own health state of a container with a HEALTHCHECK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DockerHealth {
    Starting,
    Healthy,
    Unhealthy,
}

impl DockerHealth {
    const ALL: [DockerHealth; 3] = [
        DockerHealth::Starting,
        DockerHealth::Healthy,
        DockerHealth::Unhealthy,
    ];

    /// Reads Docker's word for it: the one spelling [`DockerHealth::as_str`] gives.
    pub fn parse(s: &str) -> Option<DockerHealth> {
        DockerHealth::ALL.into_iter().find(|h| h.as_str() == s)
    }

    /// Docker's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            DockerHealth::Starting => "starting",
            DockerHealth::Healthy => "healthy",
            DockerHealth::Unhealthy => "unhealthy",
        }
    }
}

/// What the registrar needs to know about a container, taken from `docker inspect`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    /// Without the leading `/`.
    pub name: String,
    pub labels: HashMap<String, String>,
    pub running: bool,
    /// `None` when the image has no HEALTHCHECK.
    pub health: Option<DockerHealth>,
    /// (network name, IPv4 address).
    pub networks: Vec<(String, String)>,
    pub exposed_tcp_ports: Vec<u16>,
}

/// A container event that matters to registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerEvent {
    pub id: String,
    pub kind: EventKind,
    pub action: String,
    pub time_nano: i64,
    pub labels: HashMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Running now (start, unpause, restart): inspect and register.
    Started,
    /// Being told to stop (kill with a stopping signal, stop, pause): deregister at once.
    Stopping,
    /// Gone or exited (die, destroy, oom): make sure it is deregistered.
    Gone,
    Health(DockerHealth),
    /// Not ours to act on (exec_*, attach, a reload signal, ...).
    Other,
}

/// Signals that ask a process to reload or report rather than stop.
const NON_STOP_SIGNALS: &[&str] = &[
    "1", "10", "12", "28", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGWINCH", "HUP", "USR1", "USR2",
    "WINCH",
];

pub fn classify(action: &str, attributes: &HashMap<String, String>) -> EventKind {
    if let Some(status) = action.strip_prefix("health_status:") {
        return DockerHealth::parse(status.trim()).map_or(EventKind::Other, EventKind::Health);
    }
    match action {
        "start" | "unpause" | "restart" => EventKind::Started,
        "kill" => match attributes.get("signal") {
            Some(sig) if NON_STOP_SIGNALS.contains(&sig.as_str()) => EventKind::Other,
            _ => EventKind::Stopping,
        },
        "stop" | "pause" => EventKind::Stopping,
        "die" | "destroy" | "oom" => EventKind::Gone,
        _ => EventKind::Other,
    }
}

pub async fn connect() -> Result<Docker, DockerError> {
    let docker = Docker::connect_with_defaults().map_err(DockerError::Connect)?;
    // Engines refuse clients newer than their API (20.10 speaks 1.41); engines 25+ refuse
    // clients older than their minimum. Start from bollard's current version and step down.
    docker
        .negotiate_version()
        .await
        .map_err(DockerError::Connect)
}

/// Connects and learns this node's name (`node` when configured), retrying with backoff while
/// the engine is unavailable; `None` when `shutdown` comes first.
pub async fn connect_retrying(
    node: Option<&str>,
    metrics: &Metrics,
    mut shutdown: Pin<&mut impl Future<Output = ()>>,
) -> Option<(Docker, String)> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let attempt = async {
            let docker = connect().await?;
            let node = match node {
                Some(n) => n.to_string(),
                None => node_name(&docker).await?,
            };
            Ok::<_, DockerError>((docker, node))
        };
        match attempt.await {
            Ok(pair) => return Some(pair),
            Err(e) => {
                metrics.failed(FailureOp::DockerConnect);
                let wait = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?wait, "Docker engine unavailable");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => continue,
                    _ = &mut shutdown => return None,
                }
            }
        }
    }
}

/// This engine's node: the swarm node ID when in a swarm, else its hostname.
pub async fn node_name(docker: &Docker) -> Result<String, DockerError> {
    let info = docker
        .info()
        .await
        .map_err(|source| DockerError::Api { op: "info", source })?;
    let swarm_node = info.swarm.and_then(|s| s.node_id).filter(|n| !n.is_empty());
    Ok(swarm_node.or(info.name).unwrap_or_else(|| "docker".into()))
}

/// Running containers with the opt-in label (and the scope label when set).
pub async fn list_opted_in(
    docker: &Docker,
    opt_in: &str,
    only: Option<&str>,
) -> Result<Vec<String>, DockerError> {
    let mut labels = vec![opt_in.to_string()];
    labels.extend(only.map(str::to_string));
    let mut filters: HashMap<&str, Vec<String>> = HashMap::new();
    filters.insert("label", labels);
    filters.insert("status", vec!["running".into()]);
    let opts = ListContainersOptionsBuilder::default()
        .all(false)
        .filters(&filters)
        .build();
    let list = docker
        .list_containers(Some(opts))
        .await
        .map_err(|source| DockerError::Api { op: "list", source })?;
    Ok(list.into_iter().filter_map(|c| c.id).collect())
}

/// The container's state, or `None` when it no longer exists.
pub async fn inspect(docker: &Docker, id: &str) -> Result<Option<ContainerInfo>, DockerError> {
    let c = match docker
        .inspect_container(id, None::<InspectContainerOptions>)
        .await
    {
        Ok(c) => c,
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => return Ok(None),
        Err(source) => {
            return Err(DockerError::Api {
                op: "inspect",
                source,
            })
        }
    };
    let config = c.config.unwrap_or_default();
    let state = c.state.unwrap_or_default();
    let health = state
        .health
        .and_then(|h| h.status)
        .and_then(|s| DockerHealth::parse(s.as_ref()));
    let has_healthcheck = config
        .healthcheck
        .as_ref()
        .and_then(|h| h.test.as_ref())
        .is_some_and(|t| t.first().is_some_and(|first| first != "NONE"));
    let networks = c
        .network_settings
        .and_then(|n| n.networks)
        .unwrap_or_default()
        .into_iter()
        .map(|(name, ep)| (name, ep.ip_address.unwrap_or_default()))
        .collect();
    let exposed_tcp_ports = config
        .exposed_ports
        .unwrap_or_default()
        .iter()
        .filter_map(|p| p.strip_suffix("/tcp").and_then(|n| n.parse().ok()))
        .collect();
    Ok(Some(ContainerInfo {
        id: c.id.unwrap_or_else(|| id.to_string()),
        name: c
            .name
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_string(),
        labels: config.labels.unwrap_or_default(),
        // A container that is being stopped may still report running; events say otherwise.
        running: state.running.unwrap_or(false) && !state.paused.unwrap_or(false),
        health: if has_healthcheck {
            Some(health.unwrap_or(DockerHealth::Starting))
        } else {
            None
        },
        networks,
        exposed_tcp_ports,
    }))
}

/// Reads container events from `since` (unix seconds with nanos) and forwards them in order.
/// Returns when the stream ends or fails; the caller resubscribes and reconciles.
pub async fn forward_events(
    docker: Docker,
    since: i64,
    tx: mpsc::UnboundedSender<DockerEvent>,
) -> Result<(), DockerError> {
    let mut filters: HashMap<&str, Vec<&str>> = HashMap::new();
    filters.insert("type", vec!["container"]);
    let since = format!("{}.{:09}", since / 1_000_000_000, since % 1_000_000_000);
    let opts = EventsOptionsBuilder::default()
        .since(&since)
        .filters(&filters)
        .build();
    let mut stream = docker.events(Some(opts));
    while let Some(item) = stream.next().await {
        let msg = item.map_err(|source| DockerError::Api {
            op: "events",
            source,
        })?;
        let actor = msg.actor.unwrap_or_default();
        let (Some(id), Some(action)) = (actor.id, msg.action) else {
            continue;
        };
        let attributes = actor.attributes.unwrap_or_default();
        let kind = classify(&action, &attributes);
        if kind == EventKind::Other {
            continue;
        }
        let event = DockerEvent {
            id,
            kind,
            action,
            time_nano: msg
                .time_nano
                .unwrap_or_else(|| msg.time.unwrap_or(0) * 1_000_000_000),
            labels: attributes,
        };
        // The receiver only ends when the registrar stops.
        if tx.send(event).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_health_reads_back_what_it_writes() {
        for h in DockerHealth::ALL {
            assert_eq!(DockerHealth::parse(h.as_str()), Some(h));
        }
        assert_eq!(DockerHealth::parse("none"), None);
        assert_eq!(
            DockerHealth::parse("Healthy"),
            None,
            "Docker's spelling only"
        );
    }

    #[test]
    fn classification() {
        let sig = |s: &str| HashMap::from([("signal".to_string(), s.to_string())]);
        let none = HashMap::new();
        let cases = [
            ("start", &none, EventKind::Started),
            ("kill", &sig("15"), EventKind::Stopping),
            ("kill", &sig("9"), EventKind::Stopping),
            ("kill", &sig("1"), EventKind::Other),
            ("kill", &sig("SIGUSR1"), EventKind::Other),
            ("stop", &none, EventKind::Stopping),
            ("die", &none, EventKind::Gone),
            ("destroy", &none, EventKind::Gone),
            (
                "health_status: healthy",
                &none,
                EventKind::Health(DockerHealth::Healthy),
            ),
            (
                "health_status: unhealthy",
                &none,
                EventKind::Health(DockerHealth::Unhealthy),
            ),
            ("exec_die", &none, EventKind::Other),
        ];
        for (action, attrs, want) in cases {
            assert_eq!(classify(action, attrs), want, "{action} {attrs:?}");
        }
    }
}
