//! Label parsing: a container's `switchyard.*` labels, read with what Docker reports about it,
//! as validated values or every reason they are unusable. Knows nothing of the Consul
//! registration built from them.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use switchyard_consul::tags::{parse_route, parse_tags, DEFAULT_PREFIX, MAX_WEIGHT};
use switchyard_daemon::settings::parse_duration;

use crate::docker::ContainerInfo;

const SWARM_SERVICE: &str = "com.docker.swarm.service.name";
const STACK_NAMESPACE: &str = "com.docker.stack.namespace";

/// A label that could not be used; the container is skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelError {
    pub label: String,
    pub reason: String,
    /// Bounded metric label.
    pub kind: &'static str,
}

impl std::fmt::Display for LabelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "label {}: {}", self.label, self.reason)
    }
}

pub fn opted_in(labels: &HashMap<String, String>, prefix: &str) -> bool {
    labels
        .get(&format!("{prefix}.enable"))
        .is_some_and(|v| v == "true")
}

/// What a container's labels ask for, validated. Optional labels left unset stay `None`:
/// the registrar's settings fill them in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceLabels {
    pub name: String,
    pub port: u16,
    /// The address on the chosen network.
    pub address: String,
    /// Each one valid in the lb's route grammar, as written.
    pub routes: Vec<String>,
    pub weight: Option<u32>,
    /// Extra tags, as written.
    pub tags: Vec<String>,
    /// The lb's settings for this instance (`.lb.KEY=VALUE`), each one valid: tag
    /// `<tag prefix>.KEY=VALUE`, in key order.
    pub lb: Vec<(String, String)>,
    pub check_path: Option<String>,
    pub check_interval: Option<Duration>,
    pub check_timeout: Option<Duration>,
}

/// Reads every label, then fails with every error found, so one warning names them all.
///
/// Labels (prefix `switchyard`, configurable):
/// `.enable=true` opts in; `.service`, `.port`, `.route` (comma-separated), `.weight`, `.tags`
/// (comma-separated), `.lb.KEY` (one lb tag each), `.check.path`, `.check.interval`,
/// `.check.timeout`, `.network`.
pub fn parse(
    c: &ContainerInfo,
    prefix: &str,
    default_network: Option<&str>,
) -> Result<ServiceLabels, Vec<LabelError>> {
    let mut r = Reader {
        c,
        prefix,
        errors: Vec::new(),
    };
    let name = r.service_name();
    let port = r.port();
    let routes = r.routes();
    let weight = r.weight();
    let tags = r.tags();
    let lb = r.lb_settings();
    let check_interval = r.duration("check.interval");
    let check_timeout = r.duration("check.timeout");
    let check_path = r.check_path();
    let address = r.address(default_network);
    let (Some(port), Some(address)) = (port, address) else {
        return Err(r.errors);
    };
    if !r.errors.is_empty() {
        return Err(r.errors);
    }
    Ok(ServiceLabels {
        name,
        port,
        address,
        routes,
        weight,
        tags,
        lb,
        check_path,
        check_interval,
        check_timeout,
    })
}

/// One container's labels under the prefix, and the errors found in them so far.
struct Reader<'a> {
    c: &'a ContainerInfo,
    prefix: &'a str,
    errors: Vec<LabelError>,
}

impl<'a> Reader<'a> {
    fn label(&self, k: &str) -> Option<&'a str> {
        let c = self.c;
        c.labels
            .get(&format!("{}.{k}", self.prefix))
            .map(|v| v.trim())
    }

    fn err(&mut self, k: &str, kind: &'static str, reason: String) {
        self.errors.push(LabelError {
            label: format!("{}.{k}", self.prefix),
            reason,
            kind,
        });
    }

    fn service_name(&mut self) -> String {
        let name = match self.label("service") {
            Some(n) => n.to_string(),
            None => default_service_name(self.c),
        };
        if name.is_empty()
            || name.len() > 128
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            self.err(
                "service",
                "bad_service",
                format!("{name:?} is not a usable service name (letters, digits, '-', '_', '.')"),
            );
        }
        name
    }

    /// The label's port, else the image's one exposed TCP port.
    fn port(&mut self) -> Option<u16> {
        match self.label("port") {
            Some(v) => match v.parse::<u16>() {
                Ok(p) if p > 0 => Some(p),
                _ => {
                    self.err("port", "bad_port", format!("{v:?} is not a port number"));
                    None
                }
            },
            None => match self.c.exposed_tcp_ports.as_slice() {
                [one] => Some(*one),
                [] => {
                    self.err(
                        "port",
                        "no_port",
                        "the image exposes no TCP port; set the label".into(),
                    );
                    None
                }
                many => {
                    self.err(
                        "port",
                        "ambiguous_port",
                        format!("the image exposes {many:?}; set the label to choose"),
                    );
                    None
                }
            },
        }
    }

    fn routes(&mut self) -> Vec<String> {
        let mut routes = Vec::new();
        if let Some(list) = self.label("route") {
            for r in list.split(',').map(str::trim).filter(|r| !r.is_empty()) {
                match parse_route(r) {
                    Ok(_) => routes.push(r.to_string()),
                    Err(why) => self.err("route", "bad_route", format!("{r:?}: {why}")),
                }
            }
        }
        routes
    }

    fn weight(&mut self) -> Option<u32> {
        let w = self.label("weight")?;
        match w.parse::<u32>() {
            Ok(n) if n <= MAX_WEIGHT => Some(n),
            _ => {
                self.err(
                    "weight",
                    "bad_weight",
                    format!("{w:?} is not an integer 0..={MAX_WEIGHT}"),
                );
                None
            }
        }
    }

    fn tags(&mut self) -> Vec<String> {
        let mut tags = Vec::new();
        if let Some(extra) = self.label("tags") {
            for t in extra.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                if t.len() > 255 || t.chars().any(char::is_control) {
                    self.err("tags", "bad_tag", format!("{t:?} is not a usable tag"));
                } else {
                    tags.push(t.to_string());
                }
            }
        }
        tags
    }

    /// `.lb.KEY=VALUE` labels: one lb tag each, written whole, so that a value may hold the
    /// commas `.tags` splits on (`.lb.response.set.cache-control=private, max-age=0`). Each is
    /// checked against the lb's tag grammar here: a typo is reported on the container, where
    /// its owner looks, instead of being dropped by every lb.
    fn lb_settings(&mut self) -> Vec<(String, String)> {
        let head = format!("{}.lb.", self.prefix);
        let mut found: Vec<(&str, &str)> = self
            .c
            .labels
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(&head)?, v.trim())))
            .collect();
        found.sort_unstable();
        let mut out = Vec::with_capacity(found.len());
        for (key, value) in found {
            let tag = format!("{DEFAULT_PREFIX}.{key}={value}");
            let (_, errors) = parse_tags(DEFAULT_PREFIX, [tag.as_str()]);
            match errors.first() {
                Some(e) => self.err(
                    &format!("lb.{key}"),
                    "bad_lb_setting",
                    format!("{value:?}: {}", e.detail),
                ),
                None => out.push((key.to_string(), value.to_string())),
            }
        }
        out
    }

    /// `None` when unset or unusable (then with an error).
    fn duration(&mut self, k: &str) -> Option<Duration> {
        let v = self.label(k)?;
        let d = parse_duration(v).filter(|d| *d >= Duration::from_millis(100));
        if d.is_none() {
            self.err(
                k,
                "bad_duration",
                format!("{v:?} is not a duration like 5s (at least 100ms)"),
            );
        }
        d
    }

    fn check_path(&mut self) -> Option<String> {
        let path = self.label("check.path").map(str::to_string);
        if let Some(path) = &path {
            if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                self.err(
                    "check.path",
                    "bad_check_path",
                    format!("{path:?} must be an absolute URL path"),
                );
            }
        }
        path
    }

    fn address(&mut self, default_network: Option<&str>) -> Option<String> {
        match choose_network(self.c, self.label("network").or(default_network)) {
            Ok(ip) => Some(ip),
            Err((kind, reason)) => {
                self.err("network", kind, reason);
                None
            }
        }
    }
}

/// Swarm service name without its stack prefix, else the container name.
fn default_service_name(c: &ContainerInfo) -> String {
    if let Some(svc) = c.labels.get(SWARM_SERVICE) {
        if let Some(ns) = c.labels.get(STACK_NAMESPACE) {
            if let Some(bare) = svc.strip_prefix(&format!("{ns}_")) {
                return bare.to_string();
            }
        }
        return svc.clone();
    }
    c.name.clone()
}

/// The address to register: the named network's, else the only one, else the first network
/// the container shares with its stack. Ingress is never a backend network.
fn choose_network(
    c: &ContainerInfo,
    wanted: Option<&str>,
) -> Result<String, (&'static str, String)> {
    let usable: BTreeMap<&str, &str> = c
        .networks
        .iter()
        .filter(|(n, ip)| !ip.is_empty() && n != "ingress" && n != "host" && n != "none")
        .map(|(n, ip)| (n.as_str(), ip.as_str()))
        .collect();
    if let Some(want) = wanted.filter(|w| !w.is_empty()) {
        // A stack's networks are named `<stack>_<name>`; accept the short name too.
        let stacked = c
            .labels
            .get(STACK_NAMESPACE)
            .map(|ns| format!("{ns}_{want}"));
        return usable
            .get(want)
            .or_else(|| stacked.as_deref().and_then(|s| usable.get(s)))
            .map(|ip| ip.to_string())
            .ok_or((
                "bad_network",
                format!(
                    "not attached to network {want:?} (attached: {:?})",
                    usable.keys().collect::<Vec<_>>()
                ),
            ));
    }
    match usable.len() {
        0 => Err((
            "no_network",
            "the container has no address on any network".into(),
        )),
        1 => Ok(usable.values().next().expect("one").to_string()),
        _ => {
            let stack = c.labels.get(STACK_NAMESPACE).map(|ns| format!("{ns}_"));
            match stack.and_then(|p| usable.iter().find(|(n, _)| n.starts_with(&p))) {
                Some((_, ip)) => Ok(ip.to_string()),
                None => Err((
                    "ambiguous_network",
                    format!(
                        "attached to several networks {:?}; set the network label",
                        usable.keys().collect::<Vec<_>>()
                    ),
                )),
            }
        }
    }
}
