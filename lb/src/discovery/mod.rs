//! Consul in, routing tables out. One blocking watch on the catalog finds routed services, one
//! blocking watch per routed service follows its instances' health, and a single builder task
//! turns what they report into a new `RoutingTable`, published with one `ArcSwap::store`.
//!
//! Invariants: a watch that fails keeps its last answer (the table never empties because Consul
//! is down); a watch return that changes nothing builds nothing; updates that arrive together
//! are applied in one build.

mod pace;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use switchyard_consul::tags::{parse_tags, RouteKey, TagError};
use switchyard_consul::{next_index, Client, QueryMeta, QueryOptions, ServiceEntry};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::routing::{BackendSpec, BuildCache, RoutingTable, TableSpec};
use crate::Shared;
pub use pace::Pace;
use switchyard_consul::backoff::Backoff;

const BACKOFF_BASE: Duration = Duration::from_millis(200);
/// Consul's default `limits.http_max_conns_per_client` is 200: warn before the lb reaches it.
const WATCHES_WARN_AT: usize = 180;

/// What the rest of the lb may know about discovery's health.
#[derive(Default)]
pub struct DiscoveryState {
    /// Watches whose last Consul call failed.
    failing: AtomicUsize,
    /// Unix ms of the last successful Consul read; 0 before the first.
    last_ok_unix_ms: AtomicU64,
    /// Set once the catalog has answered at least once.
    catalog_ok: AtomicBool,
}

impl DiscoveryState {
    /// Seconds since Consul last confirmed the table; 0 while every watch is healthy.
    pub fn table_age(&self) -> Option<f64> {
        let last = self.last_ok_unix_ms.load(Ordering::Relaxed);
        if last == 0 {
            return None;
        }
        if self.failing.load(Ordering::Relaxed) == 0 && self.catalog_ok.load(Ordering::Relaxed) {
            return Some(0.0);
        }
        Some(unix_ms().saturating_sub(last) as f64 / 1000.0)
    }

    pub fn consul_up(&self) -> bool {
        self.failing.load(Ordering::Relaxed) == 0
            && self.last_ok_unix_ms.load(Ordering::Relaxed) > 0
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

enum Update {
    Services(BTreeSet<String>),
    Health {
        service: String,
        entries: Vec<ServiceEntry>,
    },
}

/// Runs discovery until `shutdown` flips.
pub async fn watch_consul(
    shared: Arc<Shared>,
    client: Client,
    mut shutdown: watch::Receiver<bool>,
) {
    let (tx, mut rx) = mpsc::channel::<Update>(1024);
    let catalog = tokio::spawn(watch_catalog(shared.clone(), client.clone(), tx.clone()));
    let mut builder = Builder {
        shared: shared.clone(),
        client,
        tx,
        parts: SpecParts::default(),
        watchers: HashMap::new(),
        awaiting_first: HashSet::new(),
        catalog_seen_at: None,
        published: false,
        cache: BuildCache::default(),
        generation: 0,
        warned: HashSet::new(),
    };
    loop {
        let deadline = builder
            .catalog_seen_at
            .filter(|_| !builder.published)
            .map(|t| t + shared.config.initial_sync_timeout);
        tokio::select! {
            update = rx.recv() => {
                let Some(update) = update else { break };
                builder.apply(update);
                // Coalesce everything already queued into one build.
                while let Ok(update) = rx.try_recv() {
                    builder.apply(update);
                }
                builder.maybe_publish(false);
            }
            _ = async { tokio::time::sleep_until(deadline.expect("guarded").into()).await }, if deadline.is_some() => {
                tracing::warn!(waiting_for = ?builder.awaiting_first, "initial sync timed out; publishing the table with the services that answered");
                builder.maybe_publish(true);
            }
            _ = shutdown.changed() => break,
        }
    }
    catalog.abort();
    for (_, w) in builder.watchers.drain() {
        w.abort();
    }
}

struct Builder {
    shared: Arc<Shared>,
    client: Client,
    tx: mpsc::Sender<Update>,
    parts: SpecParts,
    watchers: HashMap<String, JoinHandle<()>>,
    awaiting_first: HashSet<String>,
    catalog_seen_at: Option<Instant>,
    published: bool,
    cache: BuildCache,
    generation: u64,
    /// (service, tag) pairs already warned about, so a bad tag is logged and counted once.
    warned: HashSet<(String, String)>,
}

impl Builder {
    fn apply(&mut self, update: Update) {
        match update {
            Update::Services(names) => {
                self.catalog_seen_at.get_or_insert_with(Instant::now);
                self.watchers.retain(|name, handle| {
                    let keep = names.contains(name);
                    if !keep {
                        handle.abort();
                    }
                    keep
                });
                self.parts.retain(|name| names.contains(name));
                self.shared
                    .metrics
                    .consul_watches
                    .set(names.len() as i64 + 1);
                self.awaiting_first.retain(|name| names.contains(name));
                for name in names {
                    if !self.watchers.contains_key(&name) {
                        if self.watchers.len() == WATCHES_WARN_AT {
                            tracing::warn!(
                                watches = WATCHES_WARN_AT,
                                "many routed services: the lb holds one blocking query (one HTTP \
                                 connection) per routed service, and Consul refuses more than \
                                 limits.http_max_conns_per_client (default 200) per client \
                                 address; raise that limit on the agent the lb talks to"
                            );
                        }
                        tracing::info!(service = %name, "watching routed service");
                        let task = watch_service(
                            self.shared.clone(),
                            self.client.clone(),
                            name.clone(),
                            self.tx.clone(),
                        );
                        self.watchers.insert(name.clone(), tokio::spawn(task));
                        self.awaiting_first.insert(name);
                    }
                }
            }
            Update::Health { service, entries } => {
                // A late answer from a watch that was just stopped must not resurrect it.
                if self.watchers.contains_key(&service) {
                    self.awaiting_first.remove(&service);
                    let (warned, shared) = (&mut self.warned, &self.shared);
                    self.parts.set(
                        &service,
                        &entries,
                        &shared.config.tag_prefix,
                        |service, instance, err| {
                            if warned.insert((instance.to_string(), err.tag.clone())) {
                                tracing::warn!(service, instance, tag = %err.tag, reason = err.detail, "ignoring malformed routing tag");
                                shared
                                    .metrics
                                    .route_tag_errors
                                    .with_label_values(&[err.kind.as_str()])
                                    .inc();
                            }
                        },
                    );
                }
            }
        }
    }

    fn maybe_publish(&mut self, force: bool) {
        if self.catalog_seen_at.is_none() {
            return;
        }
        if !self.published && !force && !self.awaiting_first.is_empty() {
            return;
        }
        let started = Instant::now();
        let changed = self.parts.take_changed();
        if self.published && changed.is_empty() {
            return;
        }
        if self.published {
            log_diff(&changed, self.parts.spec());
        }
        self.generation += 1;
        let m = &self.shared.metrics;
        let table = RoutingTable::build(
            self.parts.spec(),
            Some(&changed),
            self.generation,
            &mut self.cache,
            m,
            self.shared.config.upstream_max_idle,
        );
        let routes = table.routes.len();
        self.shared.table.store(Some(Arc::new(table)));
        m.table_reloads.inc();
        m.table_routes.set(routes as i64);
        m.table_reload_duration
            .observe(started.elapsed().as_secs_f64());
        if !self.published {
            tracing::info!(
                routes,
                generation = self.generation,
                "first routing table published"
            );
            self.published = true;
            self.shared.table_loaded.store(true, Ordering::Release);
        }
    }
}

/// Each routed service's share of the table, parsed once when that service changes, and the
/// table spec kept up to date route by route: a change to one instance re-parses one service
/// and recomputes only the routes that service uses. Routes are recomputed once per
/// `take_changed`, however many of their services changed since (a first sync of many
/// services sharing one route must not rebuild it once per service).
#[derive(Default)]
pub struct SpecParts {
    parts: HashMap<String, Vec<(RouteKey, Option<BackendSpec>)>>,
    /// The services that route to each route.
    users: HashMap<RouteKey, BTreeSet<String>>,
    spec: TableSpec,
    /// Routes whose services changed since the last `take_changed`.
    dirty: BTreeSet<RouteKey>,
}

/// The routes that changed, with their backends before (`None`: the route is new).
pub type Changes = BTreeMap<RouteKey, Option<Vec<BackendSpec>>>;

impl SpecParts {
    /// Replaces a service's share from its instances. Routes exist for every routed instance;
    /// only passing ones become backends, so a route whose instances all fail answers 503.
    /// `on_tag_error(service, instance, error)` hears of every malformed tag.
    pub fn set(
        &mut self,
        service: &str,
        entries: &[ServiceEntry],
        prefix: &str,
        mut on_tag_error: impl FnMut(&str, &str, &TagError),
    ) {
        let name: Arc<str> = service.into();
        let mut part = Vec::new();
        for e in entries {
            let (routing, errors) = parse_tags(prefix, e.service.tags.iter().map(String::as_str));
            for err in &errors {
                on_tag_error(service, &e.service.id, err);
            }
            if !routing.enabled {
                continue;
            }
            let passing = e.checks.iter().all(|c| c.status == "passing");
            let backend =
                (passing && routing.weight > 0 && e.service.port != 0).then(|| BackendSpec {
                    addr: backend_addr(e).into(),
                    weight: routing.weight,
                    service: name.clone(),
                    instance_id: e.service.id.as_str().into(),
                    proto: routing.proto,
                    redirect_https: routing.redirect_https,
                });
            for key in routing.routes {
                part.push((key, backend.clone()));
            }
        }
        self.replace(service, Some(part));
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
            backends
        });
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

/// The desired table from every routed service's instances, parsed from scratch.
pub fn table_spec(
    services: &HashMap<String, Vec<ServiceEntry>>,
    prefix: &str,
    mut on_tag_error: impl FnMut(&str, &str, &TagError),
) -> TableSpec {
    let mut parts = SpecParts::default();
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

/// Logs what changed, from the changed routes only.
fn log_diff(changed: &Changes, spec: &TableSpec) {
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    let (mut routes_added, mut routes_removed) = (0, 0);
    let addrs = |v: Option<&Vec<BackendSpec>>| {
        v.into_iter()
            .flatten()
            .map(|b| b.addr.clone())
            .collect::<BTreeSet<_>>()
    };
    for (key, before) in changed {
        let now = spec.get(key);
        routes_added += usize::from(before.is_none());
        routes_removed += usize::from(now.is_none());
        let (o, n) = (addrs(before.as_ref()), addrs(now));
        added.extend(n.difference(&o).map(|a| format!("{key} +{a}")));
        removed.extend(o.difference(&n).map(|a| format!("{key} -{a}")));
    }
    tracing::info!(
        routes_added,
        routes_removed,
        backends_added = added.len(),
        backends_removed = removed.len(),
        changes = %added.iter().chain(removed.iter()).take(8).cloned().collect::<Vec<_>>().join(", "),
        "routing table changed"
    );
}

/// Marks a watch as failing while it is, and not once it is gone.
struct Health<'a> {
    state: &'a DiscoveryState,
    failing: bool,
}

impl Health<'_> {
    fn ok(&mut self, shared: &Shared, meta: QueryMeta) {
        if self.failing {
            self.failing = false;
            self.state.failing.fetch_sub(1, Ordering::Relaxed);
        }
        self.state
            .last_ok_unix_ms
            .store(unix_ms(), Ordering::Relaxed);
        let m = &shared.metrics;
        m.consul_last_contact
            .set(meta.last_contact_ms as f64 / 1000.0);
        m.consul_known_leader.set(i64::from(meta.known_leader));
    }

    fn failed(&mut self) {
        if !self.failing {
            self.failing = true;
            self.state.failing.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Health<'_> {
    fn drop(&mut self) {
        if self.failing {
            self.state.failing.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// What a watch does with one successful read.
enum Verdict<T> {
    /// A value to compare with the last one and report when it differs.
    Value(T),
    /// A read not to trust: keep the last value, reset the index and retry after a backoff.
    Distrust(&'static str),
}

/// The blocking-query loop shared by every watch: pace the reads, carry `X-Consul-Index`
/// (reset when it goes backwards, and after any failure so the first read after an outage
/// returns at once), back off with jitter on errors forever, keep the last value, and report
/// only real changes. `on_change` returns false when nobody listens any more.
async fn watch<Raw, T, R, ReadFut, J, C, ChangeFut>(
    shared: &Shared,
    watch: &'static str,
    name: &str,
    mut read: R,
    mut judge: J,
    mut on_change: C,
) where
    T: PartialEq + Clone,
    R: FnMut(QueryOptions) -> ReadFut,
    ReadFut: std::future::Future<
        Output = Result<switchyard_consul::Response<Raw>, switchyard_consul::Error>,
    >,
    J: FnMut(switchyard_consul::Response<Raw>, Option<&T>) -> Verdict<T>,
    C: FnMut(T) -> ChangeFut,
    ChangeFut: std::future::Future<Output = bool>,
{
    let cfg = &shared.config;
    let mut pace = Pace::new(cfg.consul_rate, cfg.consul_burst);
    let mut backoff = Backoff::new(BACKOFF_BASE, cfg.consul_backoff_max);
    let mut health = Health {
        state: &shared.discovery,
        failing: false,
    };
    let mut index = 0;
    let mut last: Option<T> = None;
    loop {
        pace.acquire().await;
        let q = QueryOptions {
            index,
            wait: Some(cfg.consul_wait),
            stale: cfg.consul_stale,
        };
        match read(q).await {
            Ok(resp) => {
                health.ok(shared, resp.meta);
                let got = resp.meta.index;
                match judge(resp, last.as_ref()) {
                    Verdict::Distrust(why) => {
                        shared
                            .metrics
                            .consul_watch_errors
                            .with_label_values(&[watch, why])
                            .inc();
                        tracing::warn!(
                            watch,
                            name,
                            reason = why,
                            "ignoring a Consul answer; keeping the last one"
                        );
                        index = 0;
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                    Verdict::Value(value) => {
                        if backoff.failing() {
                            tracing::info!(watch, name, "Consul watch recovered");
                        }
                        backoff.reset();
                        tracing::debug!(watch, name, sent = index, got, "Consul read");
                        index = next_index(index, got);
                        if last.as_ref() != Some(&value) {
                            last = Some(value.clone());
                            if !on_change(value).await {
                                return;
                            }
                        }
                    }
                }
            }
            Err(e) => {
                health.failed();
                shared
                    .metrics
                    .consul_watch_errors
                    .with_label_values(&[watch, e.kind()])
                    .inc();
                let delay = backoff.next_delay();
                tracing::warn!(watch, name, error = %e, retry_in = ?delay, "Consul watch failed; keeping the last answer");
                index = 0;
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Follows `/v1/catalog/services` and reports the set of routed services when it changes.
async fn watch_catalog(shared: Arc<Shared>, client: Client, tx: mpsc::Sender<Update>) {
    let route_tag = format!("{}.route=", shared.config.tag_prefix);
    watch(
        &shared,
        "catalog",
        "services",
        |q| {
            let client = client.clone();
            async move { client.catalog_services(&q).await }
        },
        |resp, _| {
            shared.discovery.catalog_ok.store(true, Ordering::Relaxed);
            Verdict::Value(
                resp.value
                    .into_iter()
                    .filter(|(_, tags)| tags.iter().any(|t| t.starts_with(&route_tag)))
                    .map(|(name, _)| name)
                    .collect::<BTreeSet<String>>(),
            )
        },
        |routed| {
            let tx = tx.clone();
            async move { tx.send(Update::Services(routed)).await.is_ok() }
        },
    )
    .await;
}

/// Follows `/v1/health/service/<name>` (every instance, passing or not) and reports its
/// instances when they change.
async fn watch_service(
    shared: Arc<Shared>,
    client: Client,
    service: String,
    tx: mpsc::Sender<Update>,
) {
    watch(
        &shared,
        "health",
        &service,
        |q| {
            let (client, service) = (client.clone(), service.clone());
            async move { client.health_service(&service, false, &q).await }
        },
        |resp, last: Option<&Vec<ServiceEntry>>| {
            // An empty answer at index <= 1 is how a racing ACL token or a freshly restarted
            // server looks; do not let it wipe instances we know about.
            if resp.value.is_empty() && resp.meta.index <= 1 && last.is_some_and(|l| !l.is_empty())
            {
                return Verdict::Distrust(crate::metrics::DISTRUSTED_ANSWER);
            }
            let mut entries = resp.value;
            entries
                .sort_by(|a, b| (&a.node.node, &a.service.id).cmp(&(&b.node.node, &b.service.id)));
            Verdict::Value(entries)
        },
        |entries| {
            let (tx, service) = (tx.clone(), service.clone());
            async move { tx.send(Update::Health { service, entries }).await.is_ok() }
        },
    )
    .await;
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

    fn addrs(parts: &SpecParts, route: &str) -> Option<Vec<String>> {
        let key = switchyard_consul::tags::parse_route(route).unwrap();
        parts
            .spec()
            .get(&key)
            .map(|v| v.iter().map(|b| b.addr.to_string()).collect())
    }

    #[test]
    fn spec_parts_recompute_only_what_changed_and_merge_shared_routes() {
        let mut p = SpecParts::default();
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
}
