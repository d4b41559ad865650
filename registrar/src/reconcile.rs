//! Pure: the changes that make Consul hold exactly the instances Docker says should exist,
//! and the instances the catalog does not hold as their agent does. Used at start, after
//! every reconnect, and on the resync tick; events apply single changes. No I/O: it neither
//! asks Docker nor calls Consul.

use std::collections::{BTreeMap, HashMap};

use switchyard_consul::{AgentCheck, AgentService, CheckState};

use crate::instance::{ServiceInstance, META_NODE, META_SPEC};
use crate::metrics::DriftKind;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Register {
        instance: Box<ServiceInstance>,
        drift: Drift,
    },
    Deregister {
        id: String,
        drift: Drift,
    },
}

/// Why a change is needed; `None` for the expected ones (an event we are applying).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drift {
    /// Docker has it, Consul does not (Consul restarted empty, a missed event).
    Missing,
    /// Both have it, but Consul's copy is out of date.
    Changed,
    /// Consul has an entry of ours for a container that is gone or stopping.
    Stale,
    /// The agent has it, the catalog does not have it as the agent does.
    Unsynced,
    None,
}

impl Drift {
    /// What was repaired, for the metric; `None` for an expected change.
    pub fn kind(self) -> Option<DriftKind> {
        match self {
            Drift::Missing => Some(DriftKind::Missing),
            Drift::Changed => Some(DriftKind::Changed),
            Drift::Stale => Some(DriftKind::Stale),
            Drift::Unsynced => Some(DriftKind::Unsynced),
            Drift::None => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        self.kind().map_or("none", DriftKind::as_str)
    }
}

/// Entries of the agent's services that this registrar owns (node meta matches).
pub fn owned(
    services: impl IntoIterator<Item = AgentService>,
    node: &str,
) -> BTreeMap<String, AgentService> {
    services
        .into_iter()
        .filter(|s| s.meta.get(META_NODE).is_some_and(|n| n == node))
        .map(|s| (s.id.clone(), s))
        .collect()
}

/// Registers what is desired and missing or changed; deregisters what is owned and not desired.
/// `desired` is keyed by service ID.
pub fn plan(
    desired: &BTreeMap<String, ServiceInstance>,
    owned: &BTreeMap<String, AgentService>,
) -> Vec<Change> {
    let mut changes = Vec::new();
    for (id, want) in desired {
        let drift = match owned.get(id) {
            None => Drift::Missing,
            Some(have) if have.meta.get(META_SPEC) != want.registration.meta.get(META_SPEC) => {
                Drift::Changed
            }
            Some(_) => continue,
        };
        changes.push(Change::Register {
            instance: Box::new(want.clone()),
            drift,
        });
    }
    for id in owned.keys() {
        if !desired.contains_key(id) {
            changes.push(Change::Deregister {
                id: id.clone(),
                drift: Drift::Stale,
            });
        }
    }
    changes
}

/// The instances among `ours` (service IDs) whose checks the catalog does not hold as the
/// agent does: absent (the agent's sync of the registration failed, as it does while Consul
/// has no leader) or with another status (a change of the check that did not reach the
/// servers). The agent sends what failed again only at its next full sync, a minute or two
/// later, or with its next change. `catalog`: the checks `/v1/health/node` lists for the
/// agent's node.
///
/// `None` when that list lacks the node's own `serfHealth`: then it says nothing of our
/// instances, since the node is not in the catalog (servers rebuilt empty, which the agent
/// mends itself when they return) or the token may not read it (Consul filters out what a
/// token may not read rather than refuse).
/// Each such instance comes with how the two differ, for the log.
pub fn unsynced(
    agent: &HashMap<String, AgentCheck>,
    catalog: &[CheckState],
    ours: impl Fn(&str) -> bool,
) -> Option<BTreeMap<String, String>> {
    if !catalog.iter().any(|c| c.check_id == SERF_HEALTH) {
        return None;
    }
    let held: HashMap<&str, &str> = catalog
        .iter()
        .map(|c| (c.check_id.as_str(), c.status.as_str()))
        .collect();
    let mut differ = BTreeMap::new();
    for c in agent.values().filter(|c| ours(&c.service_id)) {
        let how = match held.get(c.check_id.as_str()) {
            Some(s) if *s == c.status => continue,
            Some(s) => format!(
                "check {} {} on the agent, {s} in the catalog",
                c.check_id, c.status
            ),
            None => format!(
                "check {} {} on the agent, missing from the catalog",
                c.check_id, c.status
            ),
        };
        differ.insert(c.service_id.clone(), how);
    }
    Some(differ)
}

/// The check Consul's servers keep for every node from gossip.
const SERF_HEALTH: &str = "serfHealth";

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_consul::ServiceRegistration;

    fn instance(id: &str, spec: &str) -> ServiceInstance {
        let mut meta = HashMap::new();
        meta.insert(META_NODE.to_string(), "n1".to_string());
        meta.insert(META_SPEC.to_string(), spec.to_string());
        ServiceInstance {
            container_id: id.into(),
            registration: ServiceRegistration {
                id: id.into(),
                name: "web".into(),
                meta,
                ..Default::default()
            },
            ttl_check: None,
            docker_health: None,
            health_at: None,
        }
    }

    fn agent(id: &str, node: &str, spec: &str) -> AgentService {
        let mut meta = HashMap::new();
        meta.insert(META_NODE.to_string(), node.to_string());
        meta.insert(META_SPEC.to_string(), spec.to_string());
        AgentService {
            id: id.into(),
            service: "web".into(),
            tags: vec![],
            address: String::new(),
            port: 0,
            meta,
        }
    }

    #[test]
    fn an_instance_is_unsynced_when_the_catalog_lacks_its_check_or_its_status() {
        let check = |id: &str, service: &str, status: &str| AgentCheck {
            node: "agent-1".into(),
            check_id: id.into(),
            status: status.into(),
            service_id: service.into(),
        };
        let held = |id: &str, service: &str, status: &str| CheckState {
            node: "agent-1".into(),
            check_id: id.into(),
            service_name: "web".into(),
            service_id: service.into(),
            status: status.into(),
            create_index: 1,
            modify_index: 1,
        };
        let agent: HashMap<String, AgentCheck> = [
            check("service:a", "a", "passing"),  // in sync
            check("service:b", "b", "passing"),  // never reached the servers
            check("service:c", "c", "critical"), // the catalog still says passing
            check("service:x", "x", "passing"),  // not ours
        ]
        .into_iter()
        .map(|c| (c.check_id.clone(), c))
        .collect();
        let catalog = vec![
            held("serfHealth", "", "passing"),
            held("service:a", "a", "passing"),
            held("service:c", "c", "passing"),
        ];
        let got = unsynced(&agent, &catalog, |id| id != "x").expect("comparable");
        assert_eq!(got.keys().collect::<Vec<_>>(), ["b", "c"]);
        assert_eq!(
            got["b"],
            "check service:b passing on the agent, missing from the catalog"
        );
        assert_eq!(
            got["c"],
            "check service:c critical on the agent, passing in the catalog"
        );
        // Without the node's serfHealth (not in the catalog, or filtered by the token's
        // ACLs) there is nothing to compare with: no instance is called unsynced.
        let filtered = vec![held("service:a", "a", "passing")];
        assert_eq!(unsynced(&agent, &filtered, |id| id != "x"), None);
        assert_eq!(unsynced(&agent, &[], |id| id != "x"), None);
    }

    #[test]
    fn converges_both_ways_and_leaves_others_alone() {
        let desired: BTreeMap<_, _> = [("a", "1"), ("b", "2"), ("c", "3")]
            .into_iter()
            .map(|(id, spec)| (id.to_string(), instance(id, spec)))
            .collect();
        let all = vec![
            agent("a", "n1", "1"),      // in sync
            agent("b", "n1", "old"),    // changed
            agent("gone", "n1", "x"),   // stale: ours, no container
            agent("theirs", "n2", "y"), // another node's registrar: not ours
        ];
        let owned = owned(all, "n1");
        assert!(!owned.contains_key("theirs"));
        let summary: Vec<(String, Drift)> = plan(&desired, &owned)
            .into_iter()
            .map(|c| match c {
                Change::Register { instance, drift } => {
                    (format!("+{}", instance.registration.id), drift)
                }
                Change::Deregister { id, drift } => (format!("-{id}"), drift),
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("+b".into(), Drift::Changed),
                ("+c".into(), Drift::Missing),
                ("-gone".into(), Drift::Stale)
            ]
        );
    }
}
