//! The desired routing table, kept up to date from each routed service's instances: a change
//! to one service re-parses that service only and recomputes only the routes it uses.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_consul::tags::{parse_tags, RouteKey, TagError};
use switchyard_consul::ServiceEntry;

use crate::routing::{BackendSpec, Rewrite, TableSpec};
use crate::state::Unrouted;

/// Each routed service's share of the table, parsed once when that service changes, and the
/// table spec kept up to date route by route: a change to one instance re-parses one service
/// and recomputes only the routes that service uses. Routes are recomputed once per
/// `take_changed`, however many of their services changed since (a first sync of many
/// services sharing one route must not rebuild it once per service).
#[derive(Default)]
pub struct DesiredTable {
    parts: HashMap<String, Vec<(RouteKey, Option<BackendSpec>)>>,
    /// The services that route to each route.
    users: HashMap<RouteKey, BTreeSet<String>>,
    spec: TableSpec,
    /// Routes whose services changed since the last `take_changed`.
    dirty: BTreeSet<RouteKey>,
    /// How long a route whose last instance left stays, without backends (`503`), before it
    /// goes (`404`): during a deploy or an outage "try again" is the truthful answer, where
    /// "no such resource" would be cached by clients. Zero: routes go at once.
    linger: Duration,
    /// Routes kept without instances, and until when.
    lingering: BTreeMap<RouteKey, Instant>,
    /// Lingering routes whose time is up, to go at the next `take_changed`.
    expired: BTreeSet<RouteKey>,
    /// Services' traffic split between their versions (Consul KV).
    weights: HashMap<String, VersionWeights>,
}

/// A service's traffic split between its versions, by version name (Consul KV).
pub type VersionWeights = BTreeMap<String, u32>;

/// The routes that changed, with their backends before (`None`: the route is new).
pub type Changes = BTreeMap<RouteKey, Option<Vec<BackendSpec>>>;

impl DesiredTable {
    /// An empty table whose routes linger for `linger` after their last instance left.
    pub fn with_linger(linger: Duration) -> DesiredTable {
        DesiredTable {
            linger,
            ..DesiredTable::default()
        }
    }

    /// When the next lingering route's time is up.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.lingering.values().min().copied()
    }

    /// Lets lingering routes whose time is up go (at the next `take_changed`).
    pub fn expire(&mut self, now: Instant) {
        let due: Vec<RouteKey> = self
            .lingering
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            self.lingering.remove(&key);
            self.expired.insert(key.clone());
            self.dirty.insert(key);
        }
    }

    /// How many routes linger without instances now.
    pub fn lingering(&self) -> usize {
        self.lingering.len()
    }

    /// Replaces a service's share from its instances. Routes exist for every routed instance;
    /// only passing ones become backends, so a route whose instances all fail answers 503.
    /// `on_tag_error(service, instance, error)` hears of every malformed tag.
    pub fn set(
        &mut self,
        service: &str,
        entries: &[ServiceEntry],
        prefix: &str,
        on_tag_error: impl FnMut(&str, &str, &TagError),
    ) {
        self.set_held(service, entries, &BTreeSet::new(), prefix, on_tag_error);
    }

    /// `set`, where the instances in `held` (node, service ID) are kept over a Consul that
    /// lost its state (shown as such; routed as before). Returns the instances with routes
    /// that are not backends, and why.
    pub fn set_held(
        &mut self,
        service: &str,
        entries: &[ServiceEntry],
        held: &BTreeSet<(String, String)>,
        prefix: &str,
        mut on_tag_error: impl FnMut(&str, &str, &TagError),
    ) -> Vec<Unrouted> {
        let mut unrouted = Vec::new();
        let name: Arc<str> = service.into();
        let mut part = Vec::new();
        let none: Arc<[String]> = Arc::new([]);
        for e in entries {
            let (routing, errors) = parse_tags(prefix, e.service.tags.iter().map(String::as_str));
            for err in &errors {
                on_tag_error(service, &e.service.id, err);
            }
            let passing = e.is_passing();
            let why = if !routing.enabled {
                Some("opted out (tag enable=false)")
            } else if !passing {
                Some("not passing")
            } else if routing.weight == 0 {
                Some("weight 0")
            } else if e.service.port == 0 {
                Some("no port")
            } else {
                None
            };
            if let Some(why) = why.filter(|_| !routing.routes.is_empty()) {
                unrouted.push(Unrouted {
                    instance: e.service.id.clone(),
                    node: e.node.node.clone(),
                    addr: backend_addr(e),
                    routes: routing.routes.iter().map(ToString::to_string).collect(),
                    why,
                    failing: e
                        .checks
                        .iter()
                        .filter(|c| c.status != "passing")
                        .map(|c| (c.check_id.clone(), c.status.clone()))
                        .collect(),
                });
            }
            if !routing.enabled {
                continue;
            }
            let backend =
                (passing && routing.weight > 0 && e.service.port != 0).then(|| BackendSpec {
                    addr: backend_addr(e).into(),
                    weight: routing.weight,
                    service: name.clone(),
                    instance_id: e.service.id.as_str().into(),
                    node: e.node.node.as_str().into(),
                    proto: routing.proto,
                    redirect_https: routing.redirect_https,
                    held: !held.is_empty()
                        && held.contains(&(e.node.node.clone(), e.service.id.clone())),
                    upgrades: if routing.upgrades.is_empty() {
                        none.clone()
                    } else {
                        routing.upgrades.into()
                    },
                    rewrite: Rewrite::compile(&routing.rewrite).map(Arc::new),
                    sticky: routing.sticky.clone().map(Arc::new),
                    version: routing.version.as_deref().map(Into::into),
                    dark: false,
                });
            for key in routing.routes {
                part.push((key, backend.clone()));
            }
        }
        self.replace(service, Some(part));
        unrouted
    }

    /// The version weights of every service that has some; the routes of services whose
    /// weights changed are recomputed at the next `take_changed`.
    pub fn set_weights(&mut self, weights: HashMap<String, VersionWeights>) {
        let mut changed: BTreeSet<&String> = BTreeSet::new();
        for (s, w) in &weights {
            if self.weights.get(s) != Some(w) {
                changed.insert(s);
            }
        }
        changed.extend(self.weights.keys().filter(|s| !weights.contains_key(*s)));
        for s in changed {
            if let Some(part) = self.parts.get(s) {
                self.dirty.extend(part.iter().map(|(k, _)| k.clone()));
            }
        }
        self.weights = weights;
    }

    /// Drops the services `keep` refuses.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        let gone: Vec<String> = self.parts.keys().filter(|n| !keep(n)).cloned().collect();
        for name in gone {
            self.replace(&name, None);
        }
    }

    fn replace(&mut self, service: &str, part: Option<Vec<(RouteKey, Option<BackendSpec>)>>) {
        let old = match part {
            Some(p) => self.parts.insert(service.to_string(), p),
            None => self.parts.remove(service),
        };
        let new = self.parts.get(service);
        if old.as_ref() == new {
            return;
        }
        let mut affected: BTreeSet<RouteKey> = BTreeSet::new();
        affected.extend(old.iter().flatten().map(|(k, _)| k.clone()));
        affected.extend(new.into_iter().flatten().map(|(k, _)| k.clone()));
        for key in &affected {
            let uses = new.is_some_and(|p| p.iter().any(|(k, _)| k == key));
            if uses {
                self.users
                    .entry(key.clone())
                    .or_default()
                    .insert(service.to_string());
            } else if let Some(users) = self.users.get_mut(key) {
                users.remove(service);
                if users.is_empty() {
                    self.users.remove(key);
                }
            }
        }
        self.dirty.extend(affected);
    }

    /// The route's backends from its services' shares; `Some(before)` when they changed.
    fn recompute(&mut self, key: RouteKey) -> Option<(RouteKey, Option<Vec<BackendSpec>>)> {
        let value = self.users.get(&key).map(|users| {
            let mut backends: Vec<BackendSpec> = users
                .iter()
                .flat_map(|s| self.parts[s].iter())
                .filter(|(k, _)| *k == key)
                .filter_map(|(_, b)| b.clone())
                .collect();
            backends.sort_unstable();
            // Two instances on one address are one backend to us.
            backends.dedup_by(|a, b| a.addr == b.addr);
            apply_weights(&mut backends, &self.weights);
            backends
        });
        let expired = self.expired.remove(&key);
        let value = match value {
            Some(v) => {
                self.lingering.remove(&key);
                Some(v)
            }
            // The route's last instance left: it stays, empty, for the linger period.
            None if !expired && !self.linger.is_zero() && self.spec.contains_key(&key) => {
                self.lingering
                    .entry(key.clone())
                    .or_insert_with(|| Instant::now() + self.linger);
                Some(Vec::new())
            }
            None => {
                self.lingering.remove(&key);
                None
            }
        };
        if self.spec.get(&key) == value.as_ref() {
            return None;
        }
        let before = match value {
            Some(v) => self.spec.insert(key.clone(), v),
            None => self.spec.remove(&key),
        };
        Some((key, before))
    }

    /// The whole desired table, as of the last `take_changed`.
    pub fn spec(&self) -> &TableSpec {
        &self.spec
    }

    /// Brings the spec up to date and returns the routes that differ from the last call's
    /// (a route changed and changed back is no change).
    pub fn take_changed(&mut self) -> Changes {
        std::mem::take(&mut self.dirty)
            .into_iter()
            .filter_map(|key| self.recompute(key))
            .collect()
    }
}

/// A service's version weights applied to its backends of one route: each version gets its
/// weight's share of the service's total weight on the route (so that other services of the
/// route keep theirs), split between its instances by their own weights. A version without a
/// weight, or with 0, is dark: only requests pinned to it reach it.
fn apply_weights(backends: &mut [BackendSpec], weights: &HashMap<String, VersionWeights>) {
    if weights.is_empty() {
        return;
    }
    let services: BTreeSet<Arc<str>> = backends.iter().map(|b| b.service.clone()).collect();
    for service in services {
        let Some(w) = weights.get(&*service) else {
            continue;
        };
        let share = |b: &BackendSpec| {
            b.version
                .as_deref()
                .and_then(|v| w.get(v))
                .copied()
                .unwrap_or(0)
        };
        let mine = |b: &&mut BackendSpec| b.service == service;
        let total: u64 = backends
            .iter_mut()
            .filter(mine)
            .map(|b| u64::from(b.weight))
            .sum();
        // Each present version's own weight sum, and the shares of the versions present.
        let mut by_version: BTreeMap<Option<Arc<str>>, u64> = BTreeMap::new();
        for b in backends.iter_mut().filter(mine) {
            *by_version.entry(b.version.clone()).or_default() += u64::from(b.weight);
        }
        let shares: u64 = by_version
            .keys()
            .map(|v| v.as_deref().and_then(|v| w.get(v)).copied().unwrap_or(0))
            .map(u64::from)
            .sum();
        for b in backends.iter_mut().filter(mine) {
            let s = u64::from(share(b));
            if s == 0 || shares == 0 {
                b.dark = true;
                continue;
            }
            let own = by_version[&b.version].max(1);
            let weight = total * s * u64::from(b.weight) / (shares * own);
            b.weight = weight.clamp(1, u64::from(u32::MAX)) as u32;
        }
    }
}

/// The desired table from every routed service's instances, parsed from scratch.
pub fn table_spec(
    services: &HashMap<String, Vec<ServiceEntry>>,
    prefix: &str,
    mut on_tag_error: impl FnMut(&str, &str, &TagError),
) -> TableSpec {
    let mut parts = DesiredTable::default();
    for (service, entries) in services {
        parts.set(service, entries, prefix, &mut on_tag_error);
    }
    parts.take_changed();
    parts.spec
}

fn backend_addr(e: &ServiceEntry) -> String {
    let host = e.address();
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{}", e.service.port)
    } else {
        format!("{host}:{}", e.service.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(service: &str, id: &str, port: u16, route: &str, status: &str) -> ServiceEntry {
        serde_json::from_value(serde_json::json!({
            "Node": {"Node": "n1", "Address": "10.0.0.1"},
            "Service": {"ID": id, "Service": service, "Tags": [format!("lb.route={route}")], "Port": port},
            "Checks": [{"CheckID": format!("{id}:check"), "Status": status}]
        }))
        .unwrap()
    }

    fn addrs(parts: &DesiredTable, route: &str) -> Option<Vec<String>> {
        let key = switchyard_consul::tags::parse_route(route).unwrap();
        parts
            .spec()
            .get(&key)
            .map(|v| v.iter().map(|b| b.addr.to_string()).collect())
    }

    #[test]
    fn desired_table_recomputes_only_what_changed_and_merges_shared_routes() {
        let mut p = DesiredTable::default();
        let none = |_: &str, _: &str, _: &TagError| {};
        p.set("a", &[entry("a", "a1", 1, "/", "passing")], "lb", none);
        p.set("b", &[entry("b", "b1", 2, "/", "passing")], "lb", none);
        p.set(
            "c",
            &[entry("c", "c1", 3, "c.example/", "passing")],
            "lb",
            none,
        );
        assert_eq!(p.take_changed().len(), 2, "two routes appeared");
        assert_eq!(
            addrs(&p, "/"),
            Some(vec!["10.0.0.1:1".into(), "10.0.0.1:2".into()])
        );

        // One instance turns critical: only its route changes, and keeps the other service.
        p.set("b", &[entry("b", "b1", 2, "/", "critical")], "lb", none);
        let changed = p.take_changed();
        assert_eq!(changed.len(), 1);
        assert_eq!(addrs(&p, "/"), Some(vec!["10.0.0.1:1".into()]));

        // A change undone before the next build is no change.
        p.set(
            "c",
            &[entry("c", "c1", 3, "c.example/", "critical")],
            "lb",
            none,
        );
        p.set(
            "c",
            &[entry("c", "c1", 3, "c.example/", "passing")],
            "lb",
            none,
        );
        assert!(p.take_changed().is_empty());

        // A service that goes away takes its routes with it, and only those.
        p.retain(|name| name != "c");
        let changed = p.take_changed();
        assert_eq!(changed.len(), 1);
        assert_eq!(addrs(&p, "c.example/"), None);
        assert_eq!(addrs(&p, "/"), Some(vec!["10.0.0.1:1".into()]));

        // The incremental spec equals one parsed from scratch.
        let all: HashMap<String, Vec<ServiceEntry>> = [
            ("a".to_string(), vec![entry("a", "a1", 1, "/", "passing")]),
            ("b".to_string(), vec![entry("b", "b1", 2, "/", "critical")]),
        ]
        .into();
        assert_eq!(&table_spec(&all, "lb", none), p.spec());
    }

    #[test]
    fn routes_linger_without_instances_then_go() {
        let mut p = DesiredTable::with_linger(Duration::from_secs(60));
        let none = |_: &str, _: &str, _: &TagError| {};
        p.set("a", &[entry("a", "a1", 1, "/a", "passing")], "lb", none);
        p.take_changed();
        // Every instance deregistered: the route stays, empty.
        p.set("a", &[], "lb", none);
        assert_eq!(p.take_changed().len(), 1);
        assert_eq!(addrs(&p, "/a"), Some(vec![]));
        assert_eq!(p.lingering(), 1);
        // The service leaves the catalog too: still lingering, no change.
        p.retain(|_| false);
        assert!(p.take_changed().is_empty());
        // Back within the linger period: routed again, no longer lingering.
        p.set("a", &[entry("a", "a2", 2, "/a", "passing")], "lb", none);
        p.take_changed();
        assert_eq!(addrs(&p, "/a"), Some(vec!["10.0.0.1:2".into()]));
        assert_eq!(p.lingering(), 0);
        // Gone again, and the period passes: the route goes.
        p.set("a", &[], "lb", none);
        p.take_changed();
        let until = p.next_expiry().unwrap();
        p.expire(until - Duration::from_secs(1));
        assert!(p.take_changed().is_empty(), "not yet");
        p.expire(until);
        assert_eq!(p.take_changed().len(), 1);
        assert_eq!(addrs(&p, "/a"), None);
        assert_eq!((p.lingering(), p.next_expiry()), (0, None));
    }
}

#[cfg(test)]
mod weight_tests {
    use super::*;

    fn spec(service: &str, addr: &str, version: Option<&str>, weight: u32) -> BackendSpec {
        BackendSpec {
            version: version.map(Into::into),
            ..BackendSpec::for_tests(service, addr, weight)
        }
    }

    #[test]
    fn versions_split_their_service_share_and_other_services_keep_theirs() {
        let mut b = vec![
            spec("web", "a:1", Some("v1"), 100),
            spec("web", "b:1", Some("v1"), 100),
            spec("web", "c:1", Some("v2"), 100),
            spec("web", "d:1", None, 100),
            spec("other", "e:1", None, 100),
        ];
        let w: VersionWeights = [("v1".to_string(), 90), ("v2".to_string(), 10)].into();
        apply_weights(&mut b, &[("web".to_string(), w)].into());
        let got: Vec<(u32, bool)> = b.iter().map(|b| (b.weight, b.dark)).collect();
        // web's 400 split 90/10 between v1 (two instances) and v2; the unversioned one is
        // dark; the other service keeps its 100.
        assert_eq!(
            got,
            [
                (180, false),
                (180, false),
                (40, false),
                (100, true),
                (100, false)
            ]
        );
        let mut all_dark = vec![spec("web", "a:1", Some("v1"), 100)];
        let zero: VersionWeights = [("v1".to_string(), 0)].into();
        apply_weights(&mut all_dark, &[("web".to_string(), zero)].into());
        assert!(all_dark[0].dark);
    }
}
