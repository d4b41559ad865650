//! Pure: what one container should look like in Consul. Container state and its parsed labels
//! in, a `ServiceInstance` (or the reasons its labels are unusable) out. Knows neither bollard
//! nor HTTP.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use switchyard_consul::{stamp, CheckRegistration, CheckStatus, ServiceRegistration};

use crate::docker::{ContainerInfo, DockerHealth};
use crate::labels::{self, opted_in, LabelError, ServiceLabels};

/// Service meta keys that mark an entry as ours.
pub const META_NODE: &str = "switchyard-node";
pub const META_CONTAINER: &str = "switchyard-container";
pub const META_SPEC: &str = "switchyard-spec";
/// When the instance was last registered again because the catalog did not hold it as the
/// agent did (Unix ms): a registration that differs from the agent's copy, which every
/// Consul version syncs (newer ones skip an identical one).
pub const META_AGAIN: &str = "switchyard-registered-again";

const SWARM_TASK: &str = "com.docker.swarm.task.name";

/// Docker's health as the status of the TTL check that mirrors it.
impl DockerHealth {
    pub fn check_status(self) -> CheckStatus {
        match self {
            DockerHealth::Healthy => CheckStatus::Passing,
            DockerHealth::Starting | DockerHealth::Unhealthy => CheckStatus::Critical,
        }
    }
}

/// Settings that shape every registration.
#[derive(Debug, Clone)]
pub struct InstanceSettings {
    pub node: String,
    pub label_prefix: String,
    pub tag_prefix: String,
    pub network: Option<String>,
    pub check_interval: Duration,
    pub check_timeout: Duration,
    pub deregister_critical_after: Duration,
    pub ttl: Duration,
}

/// One container as a Consul service instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInstance {
    pub container_id: String,
    pub registration: ServiceRegistration,
    /// The TTL check mirroring Docker's health, when that is the check used.
    pub ttl_check: Option<String>,
    pub docker_health: Option<DockerHealth>,
    /// When Docker reported `docker_health` (microseconds since the epoch), if an event said
    /// so: the TTL check's output carries it to the lb ([`stamp`]).
    pub health_at: Option<u64>,
}

impl ServiceInstance {
    /// Whether Consul holds what `other` asks for: the spec hash covers everything but the
    /// time stamps, which only say when an event happened.
    pub fn same_spec(&self, other: &ServiceInstance) -> bool {
        self.registration.meta.get(META_SPEC) == other.registration.meta.get(META_SPEC)
    }

    /// Marks the registration as made for Docker's start event at `at_us`.
    pub fn started_at(&mut self, at_us: u64) {
        self.registration
            .meta
            .insert(stamp::META_STARTED_AT.to_string(), at_us.to_string());
    }

    /// The TTL check's output for `docker_health`, with when Docker reported it if known.
    pub fn ttl_output(&self) -> String {
        let health = self.docker_health.unwrap_or(DockerHealth::Starting);
        let text = format!("Docker health: {}", health.as_str());
        match self.health_at {
            Some(at) => stamp::note(&text, at),
            None => text,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Not opted in, or not running: nothing to register.
    Ignore,
    Register(Box<ServiceInstance>),
    Invalid(Vec<LabelError>),
}

/// The Consul service ID: unique per agent and stable for the container's life.
pub fn service_id(name: &str, node: &str, container_id: &str) -> String {
    let short = &container_id[..container_id.len().min(12)];
    format!("{name}-{}-{short}", sanitize(node))
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

pub fn decide(c: &ContainerInfo, s: &InstanceSettings) -> Decision {
    if !opted_in(&c.labels, &s.label_prefix) || !c.running {
        return Decision::Ignore;
    }
    match labels::parse(c, &s.label_prefix, s.network.as_deref()) {
        Ok(wanted) => Decision::Register(Box::new(build(c, wanted, s))),
        Err(errors) => Decision::Invalid(errors),
    }
}

/// The registration the labels ask for, the settings filling in what they leave unset.
fn build(c: &ContainerInfo, wanted: ServiceLabels, s: &InstanceSettings) -> ServiceInstance {
    let id = service_id(&wanted.name, &s.node, &c.id);
    let (check, ttl_check) = check(&id, &wanted, c.health, s);
    let mut tags: Vec<String> = wanted
        .routes
        .iter()
        .map(|r| format!("{}.route={r}", s.tag_prefix))
        .collect();
    tags.extend(
        wanted
            .weight
            .map(|n| format!("{}.weight={n}", s.tag_prefix)),
    );
    tags.extend(wanted.tags);
    tags.extend(
        wanted
            .lb
            .iter()
            .map(|(k, v)| format!("{}.{k}={v}", s.tag_prefix)),
    );
    let mut meta = HashMap::new();
    meta.insert(META_NODE.to_string(), s.node.clone());
    meta.insert(META_CONTAINER.to_string(), c.id.clone());
    if let Some(task) = c.labels.get(SWARM_TASK) {
        meta.insert("swarm-task".to_string(), task.clone());
    }
    let mut registration = ServiceRegistration {
        id,
        name: wanted.name,
        tags,
        address: wanted.address,
        port: wanted.port,
        meta,
        checks: vec![check],
    };
    // The spec hash lets a resync tell a changed registration from an unchanged one, since the
    // agent does not echo check definitions back.
    let spec = spec_hash(&registration);
    registration.meta.insert(META_SPEC.to_string(), spec);
    ServiceInstance {
        container_id: c.id.clone(),
        registration,
        ttl_check,
        docker_health: c.health,
        health_at: None,
    }
}

/// The instance's one check: HTTP when the labels name a path, else a TTL check mirroring
/// Docker's health when the image has a HEALTHCHECK, else TCP. Returns the TTL check's ID too.
fn check(
    id: &str,
    wanted: &ServiceLabels,
    health: Option<DockerHealth>,
    s: &InstanceSettings,
) -> (CheckRegistration, Option<String>) {
    let (address, port) = (&wanted.address, wanted.port);
    let interval = wanted.check_interval.unwrap_or(s.check_interval);
    let timeout = wanted.check_timeout.unwrap_or(s.check_timeout);
    let check_id = format!("{id}:check");
    let deregister = Some(consul_duration(s.deregister_critical_after));
    match (&wanted.check_path, health) {
        (Some(path), _) => (
            CheckRegistration {
                check_id: Some(check_id),
                name: Some(format!("HTTP {path}")),
                http: Some(format!("http://{address}:{port}{path}")),
                interval: Some(consul_duration(interval)),
                timeout: Some(consul_duration(timeout)),
                deregister_critical_service_after: deregister,
                ..Default::default()
            },
            None,
        ),
        (None, Some(health)) => (
            CheckRegistration {
                check_id: Some(check_id.clone()),
                name: Some("Docker health".into()),
                ttl: Some(consul_duration(s.ttl)),
                status: Some(health.check_status()),
                deregister_critical_service_after: deregister,
                ..Default::default()
            },
            Some(check_id),
        ),
        (None, None) => (
            CheckRegistration {
                check_id: Some(check_id),
                name: Some("TCP".into()),
                tcp: Some(format!("{address}:{port}")),
                interval: Some(consul_duration(interval)),
                timeout: Some(consul_duration(timeout)),
                deregister_critical_service_after: deregister,
                ..Default::default()
            },
            None,
        ),
    }
}

/// Consul's Go duration syntax for a std duration.
pub fn consul_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// FNV-1a over the registration's JSON: stable across runs and versions of Rust.
fn spec_hash(r: &ServiceRegistration) -> String {
    let mut sorted = r.clone();
    sorted.tags.sort();
    let meta: BTreeMap<_, _> = sorted.meta.iter().collect();
    let json = serde_json::to_vec(&(
        &sorted.id,
        &sorted.name,
        &sorted.tags,
        &sorted.address,
        sorted.port,
        meta,
        &sorted.checks,
    ))
    .expect("registration serializes");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in json {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> InstanceSettings {
        InstanceSettings {
            node: "node1".into(),
            label_prefix: "switchyard".into(),
            tag_prefix: "lb".into(),
            network: None,
            check_interval: Duration::from_secs(5),
            check_timeout: Duration::from_secs(2),
            deregister_critical_after: Duration::from_secs(600),
            ttl: Duration::from_secs(90),
        }
    }

    fn container(labels: &[(&str, &str)]) -> ContainerInfo {
        ContainerInfo {
            id: "0123456789abcdef0123".into(),
            name: "web1".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            running: true,
            health: None,
            networks: vec![("bridge".into(), "172.17.0.5".into())],
            exposed_tcp_ports: vec![8000],
        }
    }

    fn registered(c: &ContainerInfo) -> ServiceInstance {
        match decide(c, &settings()) {
            Decision::Register(i) => *i,
            other => panic!("expected a registration, got {other:?}"),
        }
    }

    #[test]
    fn opt_in_and_running_are_required() {
        assert_eq!(decide(&container(&[]), &settings()), Decision::Ignore);
        assert_eq!(
            decide(&container(&[("switchyard.enable", "false")]), &settings()),
            Decision::Ignore
        );
        let mut stopped = container(&[("switchyard.enable", "true")]);
        stopped.running = false;
        assert_eq!(decide(&stopped, &settings()), Decision::Ignore);
    }

    #[test]
    fn defaults_from_the_container() {
        let i = registered(&container(&[("switchyard.enable", "true")]));
        let r = &i.registration;
        assert_eq!(r.name, "web1");
        assert_eq!(r.id, "web1-node1-0123456789ab");
        assert_eq!((r.address.as_str(), r.port), ("172.17.0.5", 8000));
        assert_eq!(r.meta[META_NODE], "node1");
        assert_eq!(r.checks[0].tcp.as_deref(), Some("172.17.0.5:8000"));
        assert_eq!(
            r.checks[0].deregister_critical_service_after.as_deref(),
            Some("600s")
        );
    }

    #[test]
    fn swarm_task_labels_and_stack_networks() {
        let mut c = container(&[
            ("switchyard.enable", "true"),
            ("switchyard.route", "api.example.com/v1, /"),
            ("switchyard.weight", "50"),
            ("switchyard.tags", "blue,v2"),
            ("switchyard.check.path", "/health"),
            ("com.docker.swarm.service.name", "shop_web"),
            ("com.docker.stack.namespace", "shop"),
            ("com.docker.swarm.task.name", "shop_web.1.abc"),
        ]);
        c.networks = vec![
            ("ingress".into(), "10.0.0.5".into()),
            ("other".into(), "10.0.9.5".into()),
            ("shop_default".into(), "10.0.2.6".into()),
        ];
        let r = registered(&c).registration;
        assert_eq!(r.name, "web");
        assert_eq!(r.address, "10.0.2.6");
        assert_eq!(
            r.tags,
            vec![
                "lb.route=api.example.com/v1",
                "lb.route=/",
                "lb.weight=50",
                "blue",
                "v2"
            ]
        );
        assert_eq!(
            r.checks[0].http.as_deref(),
            Some("http://10.0.2.6:8000/health")
        );
        assert_eq!(r.meta["swarm-task"], "shop_web.1.abc");
        c.labels.insert("switchyard.network".into(), "other".into());
        assert_eq!(registered(&c).registration.address, "10.0.9.5");
    }

    #[test]
    fn docker_health_becomes_a_ttl_check() {
        let mut c = container(&[("switchyard.enable", "true")]);
        c.health = Some(DockerHealth::Starting);
        let i = registered(&c);
        assert_eq!(
            i.ttl_check.as_deref(),
            Some("web1-node1-0123456789ab:check")
        );
        assert_eq!(i.registration.checks[0].ttl.as_deref(), Some("90s"));
        assert_eq!(i.registration.checks[0].status, Some(CheckStatus::Critical));
    }

    #[test]
    fn bad_labels_are_all_reported() {
        let mut c = container(&[
            ("switchyard.enable", "true"),
            ("switchyard.port", "http"),
            ("switchyard.route", "bad host/x"),
            ("switchyard.weight", "9999"),
            ("switchyard.check.interval", "often"),
            ("switchyard.service", "no spaces"),
        ]);
        c.networks.push(("second".into(), "10.1.1.1".into()));
        let Decision::Invalid(errors) = decide(&c, &settings()) else {
            panic!("expected errors")
        };
        let kinds: Vec<_> = errors.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            vec![
                "bad_service",
                "bad_port",
                "bad_route",
                "bad_weight",
                "bad_duration",
                "ambiguous_network"
            ]
        );
        assert!(errors[1].to_string().contains("switchyard.port"));
    }

    #[test]
    fn lb_settings_become_tags_whole_and_bad_ones_are_reported() {
        let c = container(&[
            ("switchyard.enable", "true"),
            ("switchyard.route", "/api"),
            ("switchyard.lb.strip", "true"),
            (
                "switchyard.lb.response.set.cache-control",
                "private, max-age=0",
            ),
        ]);
        let tags = registered(&c).registration.tags;
        assert_eq!(
            tags,
            [
                "lb.route=/api",
                "lb.response.set.cache-control=private, max-age=0",
                "lb.strip=true",
            ]
        );
        let c = container(&[
            ("switchyard.enable", "true"),
            ("switchyard.lb.strip", "maybe"),
            ("switchyard.lb.request.set.content-length", "0"),
        ]);
        let Decision::Invalid(errors) = decide(&c, &settings()) else {
            panic!("expected errors")
        };
        let labels: Vec<_> = errors.iter().map(|e| e.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "switchyard.lb.request.set.content-length",
                "switchyard.lb.strip"
            ]
        );
        assert!(errors.iter().all(|e| e.kind == "bad_lb_setting"));
    }

    #[test]
    fn port_defaults_need_exactly_one_exposed_port() {
        let mut c = container(&[("switchyard.enable", "true")]);
        c.exposed_tcp_ports = vec![];
        assert!(matches!(decide(&c, &settings()), Decision::Invalid(e) if e[0].kind == "no_port"));
        c.exposed_tcp_ports = vec![80, 443];
        assert!(
            matches!(decide(&c, &settings()), Decision::Invalid(e) if e[0].kind == "ambiguous_port")
        );
    }

    #[test]
    fn spec_hash_tracks_changes_only() {
        let a = registered(&container(&[("switchyard.enable", "true")]));
        let b = registered(&container(&[("switchyard.enable", "true")]));
        assert_eq!(
            a.registration.meta[META_SPEC],
            b.registration.meta[META_SPEC]
        );
        let c = registered(&container(&[
            ("switchyard.enable", "true"),
            ("switchyard.weight", "5"),
        ]));
        assert_ne!(
            a.registration.meta[META_SPEC],
            c.registration.meta[META_SPEC]
        );
    }
}
