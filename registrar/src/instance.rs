//! Pure: what one container should look like in Consul. Container state and labels in, a
//! `ServiceInstance` (or the reasons its labels are unusable) out. Knows neither bollard nor HTTP.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use switchyard_consul::settings::parse_duration;
use switchyard_consul::tags::{parse_route, MAX_WEIGHT};
use switchyard_consul::{CheckRegistration, CheckStatus, ServiceRegistration};

use crate::docker::{ContainerInfo, DockerHealth};
use crate::labels::{choose_network, default_service_name, opted_in, LabelError};

/// Service meta keys that mark an entry as ours.
pub const META_NODE: &str = "switchyard-node";
pub const META_CONTAINER: &str = "switchyard-container";
pub const META_SPEC: &str = "switchyard-spec";

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
    let p = &s.label_prefix;
    let label = |k: &str| c.labels.get(&format!("{p}.{k}")).map(|v| v.trim());
    let mut errors = Vec::new();
    let mut err = |k: &str, kind: &'static str, reason: String| {
        errors.push(LabelError {
            label: format!("{p}.{k}"),
            reason,
            kind,
        });
    };

    let name = match label("service") {
        Some(n) => n.to_string(),
        None => default_service_name(c),
    };
    if name.is_empty()
        || name.len() > 128
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        err(
            "service",
            "bad_service",
            format!("{name:?} is not a usable service name (letters, digits, '-', '_', '.')"),
        );
    }

    let port = match label("port") {
        Some(v) => match v.parse::<u16>() {
            Ok(p) if p > 0 => Some(p),
            _ => {
                err("port", "bad_port", format!("{v:?} is not a port number"));
                None
            }
        },
        None => match c.exposed_tcp_ports.as_slice() {
            [one] => Some(*one),
            [] => {
                err(
                    "port",
                    "no_port",
                    "the image exposes no TCP port; set the label".into(),
                );
                None
            }
            many => {
                err(
                    "port",
                    "ambiguous_port",
                    format!("the image exposes {many:?}; set the label to choose"),
                );
                None
            }
        },
    };

    let mut tags = Vec::new();
    if let Some(routes) = label("route") {
        for r in routes.split(',').map(str::trim).filter(|r| !r.is_empty()) {
            match parse_route(r) {
                Ok(_) => tags.push(format!("{}.route={r}", s.tag_prefix)),
                Err(why) => err("route", "bad_route", format!("{r:?}: {why}")),
            }
        }
    }
    if let Some(w) = label("weight") {
        match w.parse::<u32>() {
            Ok(n) if n <= MAX_WEIGHT => tags.push(format!("{}.weight={n}", s.tag_prefix)),
            _ => err(
                "weight",
                "bad_weight",
                format!("{w:?} is not an integer 0..={MAX_WEIGHT}"),
            ),
        }
    }
    if let Some(extra) = label("tags") {
        for t in extra.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if t.len() > 255 || t.chars().any(char::is_control) {
                err("tags", "bad_tag", format!("{t:?} is not a usable tag"));
            } else {
                tags.push(t.to_string());
            }
        }
    }

    let duration = |k: &str, default: Duration, err: &mut dyn FnMut(&str, &'static str, String)| {
        match label(k) {
            None => Some(default),
            Some(v) => match parse_duration(v).filter(|d| *d >= Duration::from_millis(100)) {
                Some(d) => Some(d),
                None => {
                    err(
                        k,
                        "bad_duration",
                        format!("{v:?} is not a duration like 5s (at least 100ms)"),
                    );
                    None
                }
            },
        }
    };
    let interval = duration("check.interval", s.check_interval, &mut err);
    let timeout = duration("check.timeout", s.check_timeout, &mut err);
    let path = label("check.path").map(str::to_string);
    if let Some(path) = &path {
        if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            err(
                "check.path",
                "bad_check_path",
                format!("{path:?} must be an absolute URL path"),
            );
        }
    }

    let address = match choose_network(c, label("network").or(s.network.as_deref())) {
        Ok(ip) => Some(ip),
        Err((kind, reason)) => {
            err("network", kind, reason);
            None
        }
    };

    let (Some(port), Some(address), Some(interval), Some(timeout)) =
        (port, address, interval, timeout)
    else {
        return Decision::Invalid(errors);
    };
    if !errors.is_empty() {
        return Decision::Invalid(errors);
    }

    let id = service_id(&name, &s.node, &c.id);
    let check_id = format!("{id}:check");
    let deregister = Some(consul_duration(s.deregister_critical_after));
    let (check, ttl_check) = match (&path, c.health) {
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
    };
    let mut meta = HashMap::new();
    meta.insert(META_NODE.to_string(), s.node.clone());
    meta.insert(META_CONTAINER.to_string(), c.id.clone());
    if let Some(task) = c.labels.get(SWARM_TASK) {
        meta.insert("swarm-task".to_string(), task.clone());
    }
    let mut registration = ServiceRegistration {
        id,
        name,
        tags,
        address,
        port,
        meta,
        checks: vec![check],
    };
    // The spec hash lets a resync tell a changed registration from an unchanged one, since the
    // agent does not echo check definitions back.
    let spec = spec_hash(&registration);
    registration.meta.insert(META_SPEC.to_string(), spec);
    Decision::Register(Box::new(ServiceInstance {
        container_id: c.id.clone(),
        registration,
        ttl_check,
        docker_health: c.health,
    }))
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
