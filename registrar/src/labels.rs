//! Label parsing: a container's `switchyard.*` labels, read with what Docker reports about it,
//! as validated values or every reason they are unusable. Knows nothing of the Consul
//! registration built from them.
//!
//! Labels (prefix `switchyard`, configurable):
//! `.enable=true` opts in; `.service`, `.port`, `.route` (comma-separated), `.weight`, `.tags`
//! (comma-separated), `.check.path`, `.check.interval`, `.check.timeout`, `.network`.

use std::collections::{BTreeMap, HashMap};

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

/// Swarm service name without its stack prefix, else the container name.
pub fn default_service_name(c: &ContainerInfo) -> String {
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
pub fn choose_network(
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
