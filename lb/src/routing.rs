//! The routing table: an immutable value mapping (host, path) to a route and its backends, and
//! the balancing picks over it. Lookups and picks take no lock and allocate nothing.
//!
//! A table is built whole from a `TableSpec` (what Consul says) and published by one
//! `ArcSwap::store`; it knows nothing about Consul or hyper servers.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use prometheus::{Histogram, IntCounter};
use switchyard_consul::tags::{path_matches, RouteKey, UpstreamProto};

use crate::backend::{now_ms, Backend};
use crate::config::Balance;
use crate::metrics::{Metrics, STATUS_CLASSES};

/// One backend of a route as discovery sees it. Shared strings: a spec is assembled from
/// every service's parsed instances on each change, so copies must be cheap.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct BackendSpec {
    pub addr: Arc<str>,
    pub weight: u32,
    pub service: Arc<str>,
    pub instance_id: Arc<str>,
    pub proto: UpstreamProto,
    pub redirect_https: bool,
}

/// The whole desired routing, as plain data: comparing two specs tells whether a rebuild would
/// change anything.
pub type TableSpec = BTreeMap<RouteKey, Vec<BackendSpec>>;

pub struct RouteBackend {
    pub backend: Arc<Backend>,
    pub weight: u32,
    pub spec: BackendSpec,
    /// Responses by status class, each resolved on its first use: resolving a labelled series
    /// costs microseconds, and a table of 10,000 backends would pay it 50,000 times per build.
    responses: Arc<[OnceLock<IntCounter>; 5]>,
}

impl RouteBackend {
    /// Counts a response of status class `class` (0 = 1xx .. 4 = 5xx).
    pub fn count_response(&self, class: usize, route: &str, metrics: &Metrics) {
        self.responses[class]
            .get_or_init(|| {
                metrics.requests.with_label_values(&[
                    route,
                    &*self.spec.addr,
                    STATUS_CLASSES[class],
                ])
            })
            .inc();
    }
}

pub struct Route {
    pub key: RouteKey,
    /// `host/prefix` (`*` for any host): the metric label and the admin name.
    pub name: String,
    pub backends: Box<[RouteBackend]>,
    /// Cumulative weights, for weighted picks; empty when all weights are equal.
    cumulative: Box<[u64]>,
    total_weight: u64,
    next: AtomicUsize,
    pub latency: Histogram,
    /// Some instance of the route asked for plain HTTP to be redirected to HTTPS.
    pub redirect_https: bool,
}

pub struct RoutingTable {
    pub generation: u64,
    exact: HashMap<String, Box<[Arc<Route>]>>,
    any_host: Box<[Arc<Route>]>,
    pub routes: Box<[Arc<Route>]>,
}

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
    pub fn empty() -> RoutingTable {
        RoutingTable {
            generation: 0,
            exact: HashMap::new(),
            any_host: Box::new([]),
            routes: Box::new([]),
        }
    }

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
            for state in ["healthy", "ejected"] {
                let _ = metrics.backends.remove_label_values(&[&old.name, state]);
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

    /// The route for a request: routes of the exact host first, then any-host routes; within
    /// each, the longest matching prefix. `host` must be lower-case without port.
    pub fn lookup(&self, host: &str, path: &str) -> Option<&Arc<Route>> {
        fn find<'t>(routes: &'t [Arc<Route>], path: &str) -> Option<&'t Arc<Route>> {
            routes.iter().find(|r| path_matches(&r.key.prefix, path))
        }
        self.exact
            .get(host)
            .and_then(|routes| find(routes, path))
            .or_else(|| find(&self.any_host, path))
    }
}

fn same_backends(route: &Route, specs: &[BackendSpec]) -> bool {
    route.backends.len() == specs.len()
        && route
            .backends
            .iter()
            .zip(specs)
            .all(|(rb, s)| rb.spec == *s)
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
    for s in specs {
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
    Route {
        key: key.clone(),
        name,
        backends: rbs.into_boxed_slice(),
        cumulative,
        total_weight,
        next: AtomicUsize::new(0),
        latency,
        redirect_https: specs.iter().any(|s| s.redirect_https),
    }
}

/// Whether two specs share backend state (pool, ejection): same address, same protocol.
fn same_backend(a: &BackendSpec, b: &BackendSpec) -> bool {
    a.addr == b.addr && a.proto == b.proto
}

/// A backend left a route: its label values go, and its state once no route uses it.
fn drop_backend(cache: &mut BuildCache, metrics: &Metrics, route: &str, rb: &RouteBackend) {
    for class in STATUS_CLASSES {
        let _ = metrics
            .requests
            .remove_label_values(&[route, &rb.spec.addr, class]);
    }
    cache.release(&rb.spec);
}

/// Indices of backends already tried by this request; retries avoid them.
#[derive(Default, Clone, Copy)]
pub struct Tried {
    idx: [usize; 12],
    len: usize,
}

impl Tried {
    pub fn push(&mut self, i: usize) {
        if self.len < self.idx.len() {
            self.idx[self.len] = i;
            self.len += 1;
        }
    }
    pub fn forget_last(&mut self) {
        self.len = self.len.saturating_sub(1);
    }
    pub fn contains(&self, i: usize) -> bool {
        self.idx[..self.len].contains(&i)
    }
}

impl Route {
    /// Picks a backend not yet tried. Ejected backends are skipped while any other is left, so
    /// ejection never takes the last backends of a route out of service.
    pub fn pick(&self, balance: Balance, tried: &Tried) -> Option<usize> {
        let n = self.backends.len();
        if n == 0 {
            return None;
        }
        let now = now_ms();
        let healthy = |i: usize| !tried.contains(i) && !self.backends[i].backend.is_ejected(now);
        let untried = |i: usize| !tried.contains(i);
        self.pick_where(balance, &healthy)
            .or_else(|| self.pick_where(balance, &untried))
    }

    fn pick_where(&self, balance: Balance, ok: &dyn Fn(usize) -> bool) -> Option<usize> {
        let n = self.backends.len();
        let probe = |start: usize| (0..n).map(|k| (start + k) % n).find(|&i| ok(i));
        match balance {
            Balance::RoundRobin => probe(self.next.fetch_add(1, Ordering::Relaxed) % n),
            Balance::Weighted => {
                let k = self.next.fetch_add(1, Ordering::Relaxed) as u64;
                probe(self.spread(k))
            }
            Balance::P2c => {
                let a = probe(self.weighted_random())?;
                let b = match probe(self.weighted_random()) {
                    Some(b) if b != a => b,
                    _ => match probe((a + 1) % n) {
                        Some(b) => b,
                        None => return Some(a),
                    },
                };
                // Compare in-flight per unit of weight without dividing.
                let load = |i: usize| self.backends[i].backend.in_flight() as u64;
                let w = |i: usize| u64::from(self.backends[i].weight);
                if load(b) * w(a) < load(a) * w(b) {
                    Some(b)
                } else {
                    Some(a)
                }
            }
        }
    }

    fn weighted_random(&self) -> usize {
        if self.cumulative.is_empty() {
            fastrand::usize(..self.backends.len())
        } else {
            self.index_of_weight(fastrand::u64(..self.total_weight))
        }
    }

    /// The k-th point of a golden-ratio sequence over the weight line: deterministic, spreads
    /// consecutive picks evenly and matches the weights exactly over many picks.
    fn spread(&self, k: u64) -> usize {
        let x = k.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        if self.cumulative.is_empty() {
            ((u128::from(x) * self.backends.len() as u128) >> 64) as usize
        } else {
            let w = ((u128::from(x) * u128::from(self.total_weight)) >> 64) as u64;
            self.index_of_weight(w)
        }
    }

    fn index_of_weight(&self, w: u64) -> usize {
        self.cumulative.partition_point(|&c| c <= w)
    }

    pub fn healthy_count(&self) -> usize {
        let now = now_ms();
        self.backends
            .iter()
            .filter(|b| !b.backend.is_ejected(now))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(routes: &[(&str, &[(&str, u32)])]) -> TableSpec {
        routes
            .iter()
            .map(|(r, backends)| {
                (
                    switchyard_consul::tags::parse_route(r).unwrap(),
                    backends
                        .iter()
                        .map(|(addr, weight)| BackendSpec {
                            addr: (*addr).into(),
                            weight: *weight,
                            service: "svc".into(),
                            instance_id: (*addr).into(),
                            proto: Default::default(),
                            redirect_https: false,
                        })
                        .collect(),
                )
            })
            .collect()
    }

    fn table(routes: &[(&str, &[(&str, u32)])]) -> (RoutingTable, BuildCache, Metrics) {
        let metrics = Metrics::new();
        let mut cache = BuildCache::default();
        let t = RoutingTable::build::<()>(&spec(routes), None, 1, &mut cache, &metrics, 4);
        (t, cache, metrics)
    }

    #[test]
    fn lookup_prefers_exact_host_then_longest_prefix() {
        let (t, _, _) = table(&[
            ("/", &[("a:1", 1)]),
            ("/api", &[("b:1", 1)]),
            ("api.example.com", &[("c:1", 1)]),
            ("api.example.com/v2", &[("d:1", 1)]),
        ]);
        let cases = [
            ("x.com", "/", Some("*/")),
            ("x.com", "/api/users", Some("*/api")),
            ("x.com", "/apix", Some("*/")),
            ("api.example.com", "/api", Some("api.example.com/")),
            ("api.example.com", "/v2/x", Some("api.example.com/v2")),
            ("api.example.com", "/v2beta", Some("api.example.com/")),
        ];
        for (host, path, want) in cases {
            assert_eq!(
                t.lookup(host, path).map(|r| r.name.as_str()),
                want,
                "{host}{path}"
            );
        }
        let (only_host, _, _) = table(&[("api.example.com/v1", &[("a:1", 1)])]);
        assert!(only_host.lookup("api.example.com", "/v2").is_none());
        assert!(only_host.lookup("other", "/v1").is_none());
    }

    fn counts(route: &Route, balance: Balance, n: usize) -> Vec<usize> {
        let mut c = vec![0; route.backends.len()];
        for _ in 0..n {
            c[route.pick(balance, &Tried::default()).unwrap()] += 1;
        }
        c
    }

    #[test]
    fn algorithms_honour_weights() {
        let (t, _, _) = table(&[("/", &[("a:1", 100), ("b:1", 300)])]);
        let r = t.lookup("h", "/").unwrap();
        assert_eq!(counts(r, Balance::RoundRobin, 1000), vec![500, 500]);
        let w = counts(r, Balance::Weighted, 4000);
        assert!((990..=1010).contains(&w[0]), "weighted spread {w:?}");
        // p2c with nothing in flight is a weighted random choice of the lighter of two.
        let p = counts(r, Balance::P2c, 4000);
        assert!(p[1] > p[0], "p2c {p:?}");
    }

    #[test]
    fn p2c_prefers_fewer_in_flight() {
        let (t, _, _) = table(&[("/", &[("a:1", 1), ("b:1", 1)])]);
        let r = t.lookup("h", "/").unwrap();
        for _ in 0..5 {
            r.backends[0].backend.start_request();
        }
        assert_eq!(counts(r, Balance::P2c, 100), vec![0, 100]);
    }

    #[test]
    fn ejected_and_tried_backends_are_skipped_but_never_all() {
        let (t, _, _) = table(&[("/", &[("a:1", 1), ("b:1", 1), ("c:1", 1)])]);
        let r = t.lookup("h", "/").unwrap();
        let s = crate::backend::BackendSettings {
            connect_timeout: std::time::Duration::from_secs(1),
            idle_timeout: std::time::Duration::from_secs(1),
            max_idle: 1,
            eject_failures: 1,
            eject_base: std::time::Duration::from_secs(60),
            eject_max: std::time::Duration::from_secs(60),
        };
        assert!(r.backends[0].backend.record_failure(&s));
        for balance in [Balance::P2c, Balance::RoundRobin, Balance::Weighted] {
            assert_eq!(counts(r, balance, 300)[0], 0, "{balance:?}");
            let mut tried = Tried::default();
            tried.push(1);
            tried.push(2);
            // Only the ejected one is left untried: it is used rather than failing.
            assert_eq!(r.pick(balance, &tried), Some(0), "{balance:?}");
            tried.push(0);
            assert_eq!(r.pick(balance, &tried), None);
        }
    }

    #[test]
    fn rebuild_keeps_backend_state_and_drops_departed_labels() {
        let metrics = Metrics::new();
        let mut cache = BuildCache::default();
        let t1 = RoutingTable::build::<()>(
            &spec(&[("/", &[("a:1", 1), ("b:1", 1)])]),
            None,
            1,
            &mut cache,
            &metrics,
            4,
        );
        let a1 = t1.routes[0].backends[0].backend.clone();
        t1.routes[0].backends[1].count_response(1, "*/", &metrics);
        let t2 = RoutingTable::build::<()>(
            &spec(&[("/", &[("a:1", 1)])]),
            None,
            2,
            &mut cache,
            &metrics,
            4,
        );
        assert!(Arc::ptr_eq(&a1, &t2.routes[0].backends[0].backend));
        let text = metrics.encode();
        assert!(
            !text.contains("b:1"),
            "departed backend label kept:\n{text}"
        );
    }
}
