//! The routing table: an immutable value mapping (host, path) to a route and its backends, and
//! the balancing picks over it. Lookups and picks take no lock and allocate nothing.
//!
//! A table is built whole from a `TableSpec` (what Consul says) and published by one
//! `ArcSwap::store`; it knows nothing about Consul or hyper servers.

mod affinity;
mod build;
mod pick;
mod rewrite;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, OnceLock};

use prometheus::{Histogram, IntCounter};
use switchyard_consul::tags::{path_matches, RouteKey, Sticky, UpstreamProto};

use crate::metrics::{Label, Metrics, StatusClass};
use crate::upstream::Backend;

pub use affinity::hash as affinity_hash;
pub use build::BuildCache;
pub use pick::Tried;
pub use rewrite::{Edits, Rewrite};

/// One backend of a route as discovery sees it. Shared strings: a spec is assembled from
/// every service's parsed instances on each change, so copies must be cheap.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct BackendSpec {
    pub addr: Arc<str>,
    pub weight: u32,
    pub service: Arc<str>,
    pub instance_id: Arc<str>,
    /// The Consul node the instance is registered on: its host, so that a retry after its
    /// host went silent can go to another (see `Tried::mark_silent`).
    pub node: Arc<str>,
    pub proto: UpstreamProto,
    pub redirect_https: bool,
    /// Kept over a Consul that lost its state (see discovery's state-loss guard).
    pub held: bool,
    /// Upgrade protocols this instance accepts beyond the lb's list (tag `upgrade`).
    pub upgrades: Arc<[String]>,
    /// How requests to this instance and its responses change on the way (tags `strip`,
    /// `prepend`, `host`, `request.*`, `response.*`); `None` for most, at no cost.
    pub rewrite: Option<Arc<Rewrite>>,
    /// Session affinity asked by this instance's tags (tag `sticky`).
    pub sticky: Option<Arc<Sticky>>,
    /// The version this instance runs (tag `version`).
    pub version: Option<Arc<str>>,
    /// Its version's weight in Consul KV is 0: only requests pinned to the version reach it.
    pub dark: bool,
}

#[cfg(test)]
impl RoutingTable {
    /// A table of one route, `/`, to `backends`.
    pub fn for_tests(backends: Vec<BackendSpec>) -> RoutingTable {
        let key = switchyard_consul::tags::parse_route("/").unwrap();
        let spec: TableSpec = [(key, backends)].into();
        RoutingTable::build::<()>(
            &spec,
            None,
            1,
            &mut BuildCache::default(),
            &Metrics::new(),
            4,
        )
    }
}

#[cfg(test)]
impl BackendSpec {
    /// A plain HTTP/1.1 backend of `service` at `addr`, with no tag but its weight.
    pub fn for_tests(service: &str, addr: &str, weight: u32) -> BackendSpec {
        BackendSpec {
            addr: addr.into(),
            weight,
            service: service.into(),
            instance_id: addr.into(),
            node: "".into(),
            proto: Default::default(),
            redirect_https: false,
            held: false,
            upgrades: Arc::new([]),
            rewrite: None,
            sticky: None,
            version: None,
            dark: false,
        }
    }
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
    /// Counts a response of status class `class`.
    pub fn count_response(&self, class: StatusClass, route: &str, metrics: &Metrics) {
        self.responses[class.index()]
            .get_or_init(|| {
                metrics
                    .requests
                    .with_label_values(&[route, &*self.spec.addr, class.as_str()])
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
    /// Upgrade protocols that every backend of the route accepts beyond the lb's list: a
    /// switch must not reach an instance that did not ask for it, whichever one is picked.
    pub upgrades: Box<[String]>,
    /// Session affinity: what requests are keyed on (the smallest setting among the
    /// backends that ask, so every lb agrees), and the ring the keys are placed on.
    pub sticky: Option<Sticky>,
    ring: affinity::Ring,
    /// Some backend names its version: requests may pin one (see `Pin`).
    pub versioned: bool,
    /// Backends that are not dark: the first `lit` of `backends`.
    lit: usize,
}

/// Which backends a request may reach: any that is not dark, or only those of one version
/// (a request pinned by header or cookie, dark ones included).
#[derive(Clone, Copy, Default)]
pub enum Pin<'a> {
    #[default]
    Lit,
    Version(&'a [u8]),
}

impl Pin<'_> {
    fn admits(self, b: &RouteBackend) -> bool {
        match self {
            Pin::Lit => !b.spec.dark,
            Pin::Version(v) => b.spec.version.as_deref().map(str::as_bytes) == Some(v),
        }
    }
}

pub struct RoutingTable {
    pub generation: u64,
    exact: HashMap<String, Box<[Arc<Route>]>>,
    any_host: Box<[Arc<Route>]>,
    pub routes: Box<[Arc<Route>]>,
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

    /// How `lookup` decides for (host, path), route by route: the one it takes, and every
    /// other route that matches the host or the path with why it does not take the request.
    /// For the admin's "why" view; walks the whole table.
    pub fn explain(&self, host: &str, path: &str) -> Vec<(&Arc<Route>, Verdict)> {
        let chosen = self.lookup(host, path);
        let mut out = Vec::new();
        for r in self.routes.iter() {
            let host_ok = r.key.host.as_deref().is_none_or(|h| h == host);
            let path_ok = path_matches(&r.key.prefix, path);
            let verdict = match chosen {
                Some(c) if Arc::ptr_eq(c, r) => Verdict::Chosen,
                Some(c) if host_ok && path_ok => {
                    if c.key.host.is_some() && r.key.host.is_none() {
                        Verdict::HostRouteWins(c.name.clone())
                    } else {
                        Verdict::LongerPrefix(c.name.clone())
                    }
                }
                _ if host_ok && !path_ok => Verdict::PathDiffers,
                // Only when nothing took the request: a Host that names no route (a typo, a
                // missing alias) is then the likely cause.
                None if !host_ok && path_ok => Verdict::OtherHost,
                _ => continue,
            };
            out.push((r, verdict));
        }
        out
    }
}

/// Why a route does or does not take a request (see `RoutingTable::explain`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Chosen,
    /// Another route of the same kind matches a longer prefix.
    LongerPrefix(String),
    /// A route of the request's own host matches: any-host routes come after.
    HostRouteWins(String),
    /// The host applies, the path is not at or below the prefix.
    PathDiffers,
    /// Nothing took the request; the path would match, but the route is another host's.
    OtherHost,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Balance;

    fn spec(routes: &[(&str, &[(&str, u32)])]) -> TableSpec {
        routes
            .iter()
            .map(|(r, backends)| {
                (
                    switchyard_consul::tags::parse_route(r).unwrap(),
                    backends
                        .iter()
                        .map(|(addr, weight)| BackendSpec::for_tests("svc", addr, *weight))
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
    fn explain_says_why_each_route_wins_or_loses() {
        let (t, _, _) = table(&[
            ("/", &[("10.0.0.1:80", 100)]),
            ("/api", &[("10.0.0.2:80", 100)]),
            ("shop.example/", &[("10.0.0.3:80", 100)]),
            ("other.example/api", &[("10.0.0.4:80", 100)]),
            ("/static", &[("10.0.0.5:80", 100)]),
        ]);
        let names = |host: &str, path: &str| -> Vec<(String, Verdict)> {
            let mut v: Vec<_> = t
                .explain(host, path)
                .into_iter()
                .map(|(r, v)| (r.name.clone(), v))
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        assert_eq!(
            names("x.example", "/api/v1"),
            [
                ("*/".to_string(), Verdict::LongerPrefix("*/api".into())),
                ("*/api".to_string(), Verdict::Chosen),
                ("*/static".to_string(), Verdict::PathDiffers),
            ]
        );
        let (t, _, _) = table(&[
            ("shop.example/", &[("10.0.0.3:80", 100)]),
            ("/static", &[("10.0.0.5:80", 100)]),
        ]);
        let v: Vec<_> = t
            .explain("shop.exmple", "/cart")
            .into_iter()
            .map(|(r, v)| (r.name.clone(), v))
            .collect();
        assert_eq!(
            v,
            [
                ("*/static".to_string(), Verdict::PathDiffers),
                ("shop.example/".to_string(), Verdict::OtherHost)
            ]
        );
        let shop = names("shop.example", "/api");
        assert!(shop.contains(&("shop.example/".into(), Verdict::Chosen)));
        assert!(shop.contains(&(
            "*/api".into(),
            Verdict::HostRouteWins("shop.example/".into())
        )));
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
            c[route.pick(balance, &Tried::default(), Pin::Lit).unwrap()] += 1;
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

    /// Dark backends take no pick and hand none of theirs to a neighbour: the lit ones keep
    /// even shares (they had 75/25 when a dark one's place went to the next one along).
    #[test]
    fn dark_backends_leave_the_lit_ones_even_and_a_pin_reaches_them() {
        let mut s = spec(&[(
            "/",
            &[("a:1", 100), ("b:1", 100), ("c:1", 100), ("d:1", 100)],
        )]);
        for b in s.values_mut().flatten() {
            let v2 = b.addr.starts_with('b') || b.addr.starts_with('d');
            b.version = Some(if v2 { "v2" } else { "v1" }.into());
            b.dark = v2;
        }
        let metrics = Metrics::new();
        let t = RoutingTable::build::<()>(&s, None, 1, &mut BuildCache::default(), &metrics, 4);
        let r = &t.routes[0];
        let addr = |i: usize| r.backends[i].spec.addr.to_string();
        for balance in [Balance::RoundRobin, Balance::Weighted, Balance::P2c] {
            let mut seen = std::collections::BTreeMap::new();
            for _ in 0..4000 {
                let i = r.pick(balance, &Tried::default(), Pin::Lit).unwrap();
                *seen.entry(addr(i)).or_insert(0) += 1;
            }
            assert_eq!(
                seen.keys().collect::<Vec<_>>(),
                ["a:1", "c:1"],
                "{balance:?}"
            );
            let a = seen["a:1"];
            assert!((1800..=2200).contains(&a), "{balance:?} {seen:?}");
            let i = r
                .pick(balance, &Tried::default(), Pin::Version(b"v2"))
                .unwrap();
            assert!(["b:1", "d:1"].contains(&addr(i).as_str()), "{balance:?}");
            assert_eq!(
                r.pick(balance, &Tried::default(), Pin::Version(b"v9")),
                None
            );
        }
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
        let s = crate::upstream::BackendSettings::for_tests();
        assert!(r.backends[0]
            .backend
            .record_failure(&s, crate::metrics::UpstreamErrorKind::Connect));
        for balance in [Balance::P2c, Balance::RoundRobin, Balance::Weighted] {
            assert_eq!(counts(r, balance, 300)[0], 0, "{balance:?}");
            let mut tried = Tried::default();
            tried.push(1);
            tried.push(2);
            // Only the ejected one is left untried: it is used rather than failing.
            assert_eq!(r.pick(balance, &tried, Pin::Lit), Some(0), "{balance:?}");
            tried.push(0);
            assert_eq!(r.pick(balance, &tried, Pin::Lit), None);
        }
    }

    #[test]
    fn after_a_silent_host_its_nodes_other_backends_come_last() {
        let on = |addr: &str, node: &str| BackendSpec {
            node: node.into(),
            ..BackendSpec::for_tests("svc", addr, 1)
        };
        let backends = vec![
            on("a:1", "n1"),
            on("b:1", "n1"),
            on("c:1", "n2"),
            on("d:1", "n2"),
        ];
        let t = RoutingTable::for_tests(backends);
        let r = &t.routes[0];
        let at = |addr: &str| {
            r.backends
                .iter()
                .position(|b| &*b.spec.addr == addr)
                .unwrap()
        };
        let node = |i: usize| r.backends[i].spec.node.to_string();
        for balance in [Balance::P2c, Balance::RoundRobin, Balance::Weighted] {
            // a failed, but its host answered: b is as good as any.
            let mut tried = Tried::default();
            tried.push(at("a:1"));
            let picks: Vec<usize> = (0..60)
                .map(|_| r.pick(balance, &tried, Pin::Lit).unwrap())
                .collect();
            assert!(picks.contains(&at("b:1")), "{balance:?}");
            // a's host went silent: n2 only, while n2 has an untried backend.
            tried.mark_silent(at("a:1"));
            for _ in 0..60 {
                assert_eq!(
                    node(r.pick(balance, &tried, Pin::Lit).unwrap()),
                    "n2",
                    "{balance:?}"
                );
            }
            // c's host went silent too: b is left on n1, d on n2, both on silent nodes; they
            // are still tried rather than none.
            tried.push(at("c:1"));
            tried.mark_silent(at("c:1"));
            let i = r.pick(balance, &tried, Pin::Lit).unwrap();
            assert!(i == at("b:1") || i == at("d:1"), "{balance:?}");
            // A try taken back takes its silence with it.
            tried.forget(at("c:1"));
            tried.push(at("d:1"));
            assert_eq!(
                node(r.pick(balance, &tried, Pin::Lit).unwrap()),
                "n2",
                "{balance:?}"
            );
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
        t1.routes[0].backends[1].count_response(StatusClass::Success, "*/", &metrics);
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
