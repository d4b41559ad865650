//! Building a routing table from the desired one, incrementally: routes whose backends did not
//! change are reused, backend state and metric handles carry over, and the label values of
//! whatever left the table are removed.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use switchyard_consul::tags::{RouteKey, UpstreamProto};

use super::{affinity, BackendSpec, Route, RouteBackend, RoutingTable, TableSpec};
use crate::metrics::{BackendState, Label, LocalReason, Metrics, StatusClass};
use crate::upstream::Backend;

/// What the last build produced, so the next one rebuilds only the routes whose backends
/// changed: backend state (pools, ejections) and metric handles carry over, and the label
/// values of whatever left the table are removed.
#[derive(Default)]
pub struct BuildCache {
    routes: HashMap<RouteKey, Arc<Route>>,
    /// Backend state by address and protocol, with the number of routes using it.
    backends: HashMap<(Arc<str>, UpstreamProto), (Arc<Backend>, usize)>,
}

impl BuildCache {
    pub fn backends(&self) -> impl Iterator<Item = &Arc<Backend>> {
        self.backends.values().map(|(b, _)| b)
    }

    fn acquire(&mut self, spec: &BackendSpec, max_idle: usize) -> Arc<Backend> {
        let entry = self
            .backends
            .entry((spec.addr.clone(), spec.proto))
            .or_insert_with(|| {
                let b = Backend::new(spec.addr.to_string(), spec.proto, max_idle);
                (Arc::new(b), 0)
            });
        entry.1 += 1;
        entry.0.clone()
    }

    fn release(&mut self, spec: &BackendSpec) {
        let key = (spec.addr.clone(), spec.proto);
        if let Some(entry) = self.backends.get_mut(&key) {
            entry.1 -= 1;
            if entry.1 == 0 {
                self.backends.remove(&key);
            }
        }
    }
}

impl RoutingTable {
    /// Builds a table from a spec. Routes whose backends are unchanged since the last build
    /// (as `cache` remembers it) are reused as they are; the others are built anew, keeping
    /// the state and metric handles of the backends that stay. With `changed` (the routes that
    /// differ from the last build), only those are compared and rebuilt.
    pub fn build<V>(
        spec: &TableSpec,
        changed: Option<&BTreeMap<RouteKey, V>>,
        generation: u64,
        cache: &mut BuildCache,
        metrics: &Metrics,
        max_idle: usize,
    ) -> RoutingTable {
        let gone: Vec<RouteKey> = match changed {
            Some(changed) => changed
                .keys()
                .filter(|k| !spec.contains_key(*k) && cache.routes.contains_key(*k))
                .cloned()
                .collect(),
            None => cache
                .routes
                .keys()
                .filter(|k| !spec.contains_key(*k))
                .cloned()
                .collect(),
        };
        for key in gone {
            let old = cache.routes.remove(&key).expect("listed above");
            let _ = metrics.request_duration.remove_label_values(&[&old.name]);
            for reason in LocalReason::ALL {
                let _ = metrics
                    .local_responses
                    .remove_label_values(&[&old.name, reason.as_str()]);
            }
            for state in BackendState::ALL {
                let _ = metrics
                    .backends
                    .remove_label_values(&[&old.name, state.as_str()]);
            }
            for rb in old.backends.iter() {
                drop_backend(cache, metrics, &old.name, rb);
            }
        }

        let mut routes = Vec::with_capacity(spec.len());
        for (key, specs) in spec {
            let old = cache.routes.get(key);
            let unchanged = |o: &&Arc<Route>| match changed {
                Some(changed) => !changed.contains_key(key),
                None => same_backends(o, specs),
            };
            if let Some(old) = old.filter(unchanged) {
                routes.push(old.clone());
                continue;
            }
            let route = Arc::new(build_route(
                key,
                specs,
                old.cloned(),
                cache,
                metrics,
                max_idle,
            ));
            cache.routes.insert(key.clone(), route.clone());
            routes.push(route);
        }

        let mut exact: HashMap<String, Vec<Arc<Route>>> = HashMap::new();
        let mut any_host = Vec::new();
        for r in &routes {
            match &r.key.host {
                Some(h) => exact.entry(h.clone()).or_default().push(r.clone()),
                None => any_host.push(r.clone()),
            }
        }
        let by_longest_prefix = |v: &mut Vec<Arc<Route>>| {
            v.sort_by_key(|r| std::cmp::Reverse(r.key.prefix.len()));
        };
        for v in exact.values_mut() {
            by_longest_prefix(v);
        }
        by_longest_prefix(&mut any_host);
        RoutingTable {
            generation,
            exact: exact
                .into_iter()
                .map(|(h, v)| (h, v.into_boxed_slice()))
                .collect(),
            any_host: any_host.into_boxed_slice(),
            routes: routes.into_boxed_slice(),
        }
    }
}
fn same_backends(route: &Route, specs: &[BackendSpec]) -> bool {
    route.backends.len() == specs.len()
        && route
            .backends
            .iter()
            .zip(lit_first(specs))
            .all(|(rb, s)| rb.spec == *s)
}

/// The specs in a route's order: lit ones first, then dark ones (see `pick`).
fn lit_first(specs: &[BackendSpec]) -> impl Iterator<Item = &BackendSpec> {
    let lit = specs.iter().filter(|s| !s.dark);
    lit.chain(specs.iter().filter(|s| s.dark))
}

/// A route built anew; backends it shares with `old` keep their state and counters.
fn build_route(
    key: &RouteKey,
    specs: &[BackendSpec],
    old: Option<Arc<Route>>,
    cache: &mut BuildCache,
    metrics: &Metrics,
    max_idle: usize,
) -> Route {
    let name = key.to_string();
    let latency = old
        .as_ref()
        .map(|o| o.latency.clone())
        .unwrap_or_else(|| metrics.request_duration.with_label_values(&[&name]));
    let mut rbs = Vec::with_capacity(specs.len());
    // Lit backends first: unpinned picks run over them alone (see `pick`).
    let lit = specs.iter().filter(|s| !s.dark).count();
    for s in lit_first(specs) {
        let kept = old
            .as_ref()
            .and_then(|o| o.backends.iter().find(|rb| same_backend(&rb.spec, s)));
        let (backend, responses) = match kept {
            Some(rb) => (rb.backend.clone(), rb.responses.clone()),
            None => (cache.acquire(s, max_idle), Arc::default()),
        };
        rbs.push(RouteBackend {
            backend,
            weight: s.weight.max(1),
            spec: s.clone(),
            responses,
        });
    }
    if let Some(old) = &old {
        for rb in old.backends.iter() {
            if !specs.iter().any(|s| same_backend(s, &rb.spec)) {
                drop_backend(cache, metrics, &name, rb);
            }
        }
    }
    let weights: Vec<u64> = rbs.iter().map(|b| u64::from(b.weight)).collect();
    let total_weight = weights.iter().sum();
    let cumulative: Box<[u64]> = if weights.windows(2).all(|w| w[0] == w[1]) {
        Box::new([])
    } else {
        weights
            .iter()
            .scan(0, |acc, w| {
                *acc += w;
                Some(*acc)
            })
            .collect()
    };
    let sticky = specs
        .iter()
        .filter_map(|s| s.sticky.as_deref())
        .min()
        .cloned();
    let ring = match sticky {
        Some(_) => affinity::ring(rbs.iter().map(|b| (&*b.spec.addr, b.weight))),
        None => Box::new([]),
    };
    Route {
        key: key.clone(),
        name,
        backends: rbs.into_boxed_slice(),
        cumulative,
        total_weight,
        next: AtomicUsize::new(0),
        latency,
        redirect_https: specs.iter().any(|s| s.redirect_https),
        upgrades: common_upgrades(specs),
        sticky,
        ring,
        versioned: specs.iter().any(|s| s.version.is_some()),
        lit,
    }
}

/// The upgrade protocols every spec accepts.
fn common_upgrades(specs: &[BackendSpec]) -> Box<[String]> {
    let Some((first, rest)) = specs.split_first() else {
        return Box::new([]);
    };
    first
        .upgrades
        .iter()
        .filter(|p| rest.iter().all(|s| s.upgrades.contains(p)))
        .cloned()
        .collect()
}

/// Whether two specs share backend state (pool, ejection): same address, same protocol.
fn same_backend(a: &BackendSpec, b: &BackendSpec) -> bool {
    a.addr == b.addr && a.proto == b.proto
}

/// A backend left a route: its label values go, and its state once no route uses it.
fn drop_backend(cache: &mut BuildCache, metrics: &Metrics, route: &str, rb: &RouteBackend) {
    for class in StatusClass::ALL {
        let _ = metrics
            .requests
            .remove_label_values(&[route, &rb.spec.addr, class.as_str()]);
    }
    cache.release(&rb.spec);
}
