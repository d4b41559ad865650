//! Consul in, routing tables out. The first routed services (`LB_CONSUL_SERVICE_WATCHES`)
//! are each followed by a blocking query of their own; the rest through three blocking
//! queries whatever their number (the catalog, the critical and the warning checks) that
//! tell which of them changed (`attribute`), each then read again through a few connections
//! shared by all. A single publisher task turns what the watches report into a new
//! `RoutingTable`, published with one `ArcSwap::store`.
//!
//! Invariants: a watch that fails keeps its last answer (the table never empties because Consul
//! is down); a watch return that changes nothing builds nothing; updates that arrive together
//! are applied in one build; the connections to Consul do not grow past the setting with the
//! services (an agent refuses more than `limits.http_max_conns_per_client`, 200 by default,
//! per client address).

mod attribute;
mod desired;
mod pace;
mod propagation;
mod snapshot;
mod watches;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_consul::{Client, ServiceEntry};
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio::task::JoinHandle;

use crate::routing::{BackendSpec, BuildCache, RoutingTable, TableSpec};
use crate::Shared;
use attribute::{Action, Attribution, CheckList, Checks, Sweep};
pub use desired::{table_spec, Changes, DesiredTable};
pub use pace::Pace;
use watches::{
    watch_catalog, watch_census, watch_check_list, watch_service, watch_weights, Instances, Routed,
    ServiceReads,
};

const BACKOFF_BASE: Duration = Duration::from_millis(200);
/// With a snapshot file and no answer from Consul this long after the start, the lb serves
/// the snapshot: a reachable Consul answers in milliseconds, and a restarted lb should serve
/// within a second.
const SNAPSHOT_AFTER: Duration = Duration::from_millis(400);
/// Reads in flight at once of services without a blocking query of their own: with the three
/// long polls and the census, eight connections whatever the number of such services. Four
/// reads of a few milliseconds each follow a burst of changes as fast as Consul writes them.
const CONCURRENT_READS: usize = 4;

/// Services with instances without checks read on every catalog change, at most; with more,
/// the sweep that follows a change nothing explains finds theirs.
const UNCHECKED_READ_MAX: usize = 64;
/// Blocking queries held whatever the services: the catalog and the check lists (and the
/// version weights, unless they are not watched).
const LONG_POLLS: i64 = 1 + CheckList::ALL.len() as i64;

fn long_polls(shared: &Shared) -> i64 {
    LONG_POLLS + i64::from(!shared.config.weights_kv_prefix.is_empty())
}

enum Update {
    Services(Routed),
    Status(CheckList, Checks),
    Census(Checks),
    Health {
        service: String,
        instances: Instances,
    },
    Weights(watches::Weights),
}

/// Runs discovery until `shutdown` flips.
pub async fn watch_consul(
    shared: Arc<Shared>,
    client: Client,
    mut shutdown: watch::Receiver<bool>,
) {
    let (tx, mut rx) = mpsc::channel::<Update>(1024);
    let catalog = tokio::spawn(watch_catalog(shared.clone(), client.clone(), tx.clone()));
    let mut background = vec![catalog];
    for list in CheckList::ALL {
        let task = watch_check_list(shared.clone(), client.clone(), list, tx.clone());
        background.push(tokio::spawn(task));
    }
    let census = Arc::new(Notify::new());
    // Reads made a few at a time (the census, services without a blocking query) go through
    // connections of their own, apart from the long polls'.
    let reads_client = client.with_own_pool();
    let task = watch_census(
        shared.clone(),
        reads_client.clone(),
        census.clone(),
        tx.clone(),
    );
    background.push(tokio::spawn(task));
    let weights_prefix = shared.config.weights_kv_prefix.clone();
    if !weights_prefix.is_empty() {
        let task = watch_weights(shared.clone(), client.clone(), weights_prefix, tx.clone());
        background.push(tokio::spawn(task));
    }
    shared.metrics.consul_watches.set(long_polls(&shared));
    let snapshot_file = shared.config.snapshot_file.clone();
    let (snapshot_tx, writer) = match &snapshot_file {
        Some(path) => {
            let (stx, srx) = watch::channel(Arc::new(snapshot::Services::new()));
            let failed = shared.metrics.snapshot_errors.with_label_values(&["write"]);
            (
                Some(stx),
                Some(snapshot::spawn_writer(path.clone(), srx, failed)),
            )
        }
        None => (None, None),
    };
    let mut snapshot_due = snapshot_file
        .as_ref()
        .map(|_| tokio::time::Instant::now() + SNAPSHOT_AFTER);
    let mut publisher = Publisher {
        shared: shared.clone(),
        client,
        reads_client,
        tx,
        desired: DesiredTable::with_linger(shared.config.route_linger),
        watchers: HashMap::new(),
        reads: Arc::new(Semaphore::new(CONCURRENT_READS)),
        attribution: Attribution::new(Instant::now()),
        census,
        unchecked: HashSet::new(),
        blocking: 0,
        awaiting_first: HashSet::new(),
        weights_pending: !shared.config.weights_kv_prefix.is_empty(),
        catalog_seen_at: None,
        published: false,
        cache: BuildCache::default(),
        generation: 0,
        warned: Warned::default(),
        propagation: propagation::Propagation::default(),
        raw: snapshot_tx.as_ref().map(|_| snapshot::Services::new()),
        snapshot_tx,
        from_snapshot: false,
    };
    loop {
        let deadline = publisher
            .catalog_seen_at
            .filter(|_| !publisher.published)
            .map(|t| t + shared.config.initial_sync_timeout);
        let linger_end = publisher.desired.next_expiry();
        let sweep_due = publisher.attribution.due();
        tokio::select! {
            update = rx.recv() => {
                let Some(update) = update else { break };
                publisher.apply(update);
                // Coalesce everything already queued into one build.
                while let Ok(update) = rx.try_recv() {
                    publisher.apply(update);
                }
                publisher.maybe_publish(false);
            }
            _ = async { tokio::time::sleep_until(snapshot_due.expect("guarded")).await }, if snapshot_due.is_some() => {
                snapshot_due = None;
                if !publisher.published && publisher.catalog_seen_at.is_none() {
                    let path = snapshot_file.as_deref().expect("due only with a file");
                    publisher.serve_snapshot(path);
                }
            }
            _ = tokio::time::sleep_until(sweep_due.into()) => publisher.attribute_later(),
            _ = async { tokio::time::sleep_until(linger_end.expect("guarded").into()).await }, if linger_end.is_some() => {
                publisher.desired.expire(Instant::now());
                publisher.maybe_publish(false);
            }
            _ = async { tokio::time::sleep_until(deadline.expect("guarded").into()).await }, if deadline.is_some() => {
                tracing::warn!(waiting_for = ?publisher.awaiting_first, "initial sync timed out; publishing the table with the services that answered");
                publisher.maybe_publish(true);
            }
            _ = shutdown.changed() => break,
        }
    }
    for task in background {
        task.abort();
    }
    for (_, w) in publisher.watchers.drain() {
        w.task.abort();
    }
    // The writer ends once its channel closes (after the write it may be doing: two writers
    // must not share the temporary file); what changed since is written now.
    drop(publisher.snapshot_tx.take());
    if let Some(w) = writer {
        if tokio::time::timeout(Duration::from_secs(5), w)
            .await
            .is_err()
        {
            tracing::warn!("the snapshot writer did not finish; not writing at shutdown");
            return;
        }
    }
    if let (Some(path), Some(raw), false) = (snapshot_file, publisher.raw, publisher.from_snapshot)
    {
        if publisher.catalog_seen_at.is_some() {
            let failed = shared.metrics.snapshot_errors.with_label_values(&["write"]);
            let _ = tokio::task::spawn_blocking(move || snapshot::write_now(&path, &raw, &failed))
                .await;
        }
    }
}

/// A routed service's watch, and how to tell it that the service changed (unless it follows
/// the service with a blocking query of its own).
struct Watcher {
    task: JoinHandle<()>,
    trigger: Arc<Notify>,
    blocking: bool,
}

struct Publisher {
    shared: Arc<Shared>,
    /// For blocking queries.
    client: Client,
    /// For the reads made a few at a time.
    reads_client: Client,
    tx: mpsc::Sender<Update>,
    desired: DesiredTable,
    watchers: HashMap<String, Watcher>,
    /// Permits for service reads: `CONCURRENT_READS`.
    reads: Arc<Semaphore>,
    attribution: Attribution,
    /// Asks for a census (see `attribute`).
    census: Arc<Notify>,
    /// Routed services with an instance that has no checks of its own.
    unchecked: HashSet<String>,
    /// Watchers with a blocking query of their own (`LB_CONSUL_SERVICE_WATCHES` at most).
    blocking: usize,
    awaiting_first: HashSet<String>,
    /// The version weights have not answered yet: the first table waits for them too (until
    /// the initial sync's time is up), or a dark version would be lit until they did.
    weights_pending: bool,
    catalog_seen_at: Option<Instant>,
    published: bool,
    cache: BuildCache,
    generation: u64,
    warned: Warned,
    propagation: propagation::Propagation,
    /// With a snapshot file: every routed service's instances as Consul described them.
    raw: Option<snapshot::Services>,
    snapshot_tx: Option<watch::Sender<Arc<snapshot::Services>>>,
    /// The table came from the snapshot and Consul has not answered for all of it yet.
    from_snapshot: bool,
}

impl Publisher {
    /// Consul has not answered since the start: the snapshot's services are taken as if
    /// Consul had described them, and published, marked as from the snapshot. Consul's
    /// answers replace them service by service as they come.
    fn serve_snapshot(&mut self, path: &std::path::Path) {
        let (services, written) = match snapshot::load(path) {
            Ok(Some(loaded)) => loaded,
            Ok(None) => {
                tracing::info!(path = %path.display(), "Consul has not answered and there is no snapshot yet");
                return;
            }
            Err(e) => {
                self.shared
                    .metrics
                    .snapshot_errors
                    .with_label_values(&["load"])
                    .inc();
                tracing::error!(error = %e, "refusing the snapshot; starting without a table until Consul answers");
                return;
            }
        };
        let age_s = crate::time::unix_ms().saturating_sub(written) / 1000;
        tracing::warn!(
            path = %path.display(),
            services = services.len(),
            age_s,
            "Consul has not answered: serving the snapshot until it does"
        );
        for (service, entries) in services {
            self.set_service(&service, entries, &Default::default());
        }
        self.from_snapshot = true;
        self.shared.metrics.table_from_snapshot.set(1);
        self.maybe_publish(true);
    }

    /// A service's instances into the desired table (and the snapshot's copy).
    fn set_service(
        &mut self,
        service: &str,
        entries: Vec<ServiceEntry>,
        held: &BTreeSet<(String, String)>,
    ) {
        let (warned, shared) = (&mut self.warned, &self.shared);
        let ids: HashSet<&str> = entries.iter().map(|e| e.service.id.as_str()).collect();
        warned.keep_instances(service, &ids);
        self.propagation.service(service, &entries);
        let unrouted = self.desired.set_held(
            service,
            &entries,
            held,
            &shared.config.tag_prefix,
            |service, instance, err| {
                if warned.first(service, instance, &err.tag) {
                    tracing::warn!(service, instance, tag = %err.tag, reason = err.detail, "ignoring malformed routing tag");
                    shared
                        .metrics
                        .route_tag_errors
                        .with_label_values(&[err.kind.as_str()])
                        .inc();
                }
            },
        );
        {
            let mut views = shared.unrouted.lock().unwrap_or_else(|e| e.into_inner());
            if unrouted.is_empty() {
                views.remove(service);
            } else {
                views.insert(service.to_string(), unrouted);
            }
        }
        if let Some(raw) = &mut self.raw {
            // As Consul described them: what is only held is not kept for the next start.
            let entries = if held.is_empty() {
                entries
            } else {
                entries
                    .into_iter()
                    .filter(|e| !held.contains(&watches::instance_key(e)))
                    .collect()
            };
            raw.insert(service.to_string(), Arc::new(entries));
        }
    }

    fn apply(&mut self, update: Update) {
        match update {
            Update::Services(routed) => {
                self.apply_services(routed.names);
                // Watches with a blocking query of their own need none of this.
                if self.watchers.len() > self.blocking {
                    let news = self.attribution.catalog(
                        routed.index,
                        &routed.tags,
                        routed.recovered,
                        Instant::now(),
                    );
                    self.touch(news.touched);
                    if news.census {
                        self.census.notify_one();
                    }
                    // Few, or the sweep that follows a change nothing explains is cheaper
                    // (it is spaced; these reads would not be).
                    if news.moved && self.unchecked.len() <= UNCHECKED_READ_MAX {
                        self.touch(self.unchecked.iter().cloned().collect());
                    }
                }
            }
            Update::Status(list, checks) => {
                let touched = self.attribution.status(list, &checks);
                self.touch(touched);
                self.touch_unchecked_on_node_change();
            }
            Update::Census(checks) => {
                let touched = self.attribution.census(&checks);
                self.touch(touched);
                self.touch_unchecked_on_node_change();
            }
            Update::Health { service, instances } => self.apply_health(service, instances),
            Update::Weights(w) => {
                self.weights_pending = false;
                self.desired.set_weights(w.services);
            }
        }
    }

    /// Tells the watches of `services` to read again (those routed and without a blocking
    /// query of their own; a read already asked for and not yet made is not asked twice).
    fn touch(&self, services: BTreeSet<String>) {
        for name in services {
            if let Some(w) = self.watchers.get(&name).filter(|w| !w.blocking) {
                w.trigger.notify_one();
            }
        }
    }

    /// A node's own check changed: instances without checks of their own depend on it, and
    /// no check names their services.
    fn touch_unchecked_on_node_change(&mut self) {
        if self.attribution.take_node_changed() && self.unchecked.len() <= UNCHECKED_READ_MAX {
            self.touch(self.unchecked.iter().cloned().collect());
        }
    }

    /// What the attribution has to do once time has passed (see `attribute`): read a
    /// census, or sweep.
    fn attribute_later(&mut self) {
        while let Some(action) = self.attribution.next(Instant::now()) {
            match action {
                Action::Census => self.census.notify_one(),
                // With every service on a blocking query of its own there is nothing to read.
                Action::Sweep(_) if self.watchers.len() == self.blocking => {}
                Action::Sweep(why) => {
                    // The backstop also renews the census: instances the lists saw come and
                    // go join and leave it only through a census, and it must not keep
                    // them for good when every change is explained without one.
                    if why == Sweep::Periodic {
                        self.census.notify_one();
                    }
                    self.sweep(why)
                }
            }
        }
    }

    /// Every routed service without a blocking query of its own is read again.
    fn sweep(&mut self, why: Sweep) {
        let reason = match why {
            Sweep::Unexplained => crate::metrics::SweepReason::Unexplained,
            Sweep::Resync => crate::metrics::SweepReason::Resync,
            Sweep::Periodic => crate::metrics::SweepReason::Periodic,
        };
        self.shared.metrics.consul_sweeps.inc(reason);
        tracing::debug!(
            reason = reason.as_str(),
            services = self.watchers.len() - self.blocking,
            "reading every routed service again"
        );
        for w in self.watchers.values().filter(|w| !w.blocking) {
            w.trigger.notify_one();
        }
    }

    /// The routed services changed: stop the watches of those gone, start the new ones.
    fn apply_services(&mut self, names: BTreeSet<String>) {
        self.catalog_seen_at.get_or_insert_with(Instant::now);
        let mut blocking = self.blocking;
        self.watchers.retain(|name, w| {
            let keep = names.contains(name);
            if !keep {
                w.task.abort();
                blocking -= usize::from(w.blocking);
            }
            keep
        });
        self.blocking = blocking;
        self.desired.retain(|name| names.contains(name));
        if let Some(raw) = &mut self.raw {
            raw.retain(|name, _| names.contains(name));
        }
        self.warned.keep_services(|name| names.contains(name));
        (self.propagation).retain(|name| names.contains(name), crate::time::unix_us());
        (self.shared.unrouted.lock())
            .unwrap_or_else(|e| e.into_inner())
            .retain(|name, _| names.contains(name));
        self.awaiting_first.retain(|name| names.contains(name));
        self.unchecked.retain(|name| names.contains(name));
        for name in names {
            if !self.watchers.contains_key(&name) {
                tracing::info!(service = %name, "watching routed service");
                let trigger = Arc::new(Notify::new());
                // The first services each get a blocking query (the cheapest way to follow
                // one service, for Consul and for convergence), as many as the setting allows.
                let blocking = self.blocking < self.shared.config.consul_service_watches;
                self.blocking += usize::from(blocking);
                let how = ServiceReads {
                    blocking,
                    trigger: trigger.clone(),
                    reads: self.reads.clone(),
                };
                let client = if blocking {
                    &self.client
                } else {
                    &self.reads_client
                };
                let task = watch_service(
                    self.shared.clone(),
                    client.clone(),
                    name.clone(),
                    how,
                    self.tx.clone(),
                );
                let task = tokio::spawn(task);
                let watcher = Watcher {
                    task,
                    trigger,
                    blocking,
                };
                self.watchers.insert(name.clone(), watcher);
                self.awaiting_first.insert(name);
            }
        }
        self.shared
            .metrics
            .consul_watches
            .set(long_polls(&self.shared) + self.blocking as i64);
    }

    /// A routed service's instances changed: its share of the desired table is parsed anew.
    fn apply_health(&mut self, service: String, Instances { entries, held }: Instances) {
        // A late answer from a watch that was just stopped must not resurrect it.
        if !self.watchers.contains_key(&service) {
            return;
        }
        self.awaiting_first.remove(&service);
        // An instance without checks of its own: its changes show only in the catalog's
        // index (see `attribute`).
        let unchecked = entries
            .iter()
            .any(|e| !e.checks.iter().any(|c| !c.service_name.is_empty()));
        if unchecked {
            self.unchecked.insert(service.clone());
        } else {
            self.unchecked.remove(&service);
        }
        self.set_service(&service, entries, &held);
    }

    /// The snapshot's side of a change: the table stops being the snapshot's once Consul
    /// has answered for all of it, and what Consul said goes to the writer.
    fn follow_snapshot(&mut self) {
        let Some(seen) = self.catalog_seen_at else {
            return;
        };
        // Every service answered, or the first sync's time is up (a service whose watch
        // keeps failing must not keep the table marked, nor stop the snapshot, for good).
        let synced = self.awaiting_first.is_empty()
            || seen.elapsed() >= self.shared.config.initial_sync_timeout;
        if !synced {
            return;
        }
        if self.from_snapshot {
            self.from_snapshot = false;
            self.shared.metrics.table_from_snapshot.set(0);
            tracing::info!("Consul answered for every service; the snapshot is replaced");
        }
        // What Consul said, for the next start; written at the writer's pace.
        if let (Some(tx), Some(raw)) = (&self.snapshot_tx, &self.raw) {
            tx.send_if_modified(|current| {
                let changed = current.as_ref() != raw;
                if changed {
                    *current = Arc::new(raw.clone());
                }
                changed
            });
        }
    }

    fn maybe_publish(&mut self, force: bool) {
        if self.catalog_seen_at.is_none() && !self.from_snapshot {
            return;
        }
        self.follow_snapshot();
        if !self.published && !force && (!self.awaiting_first.is_empty() || self.weights_pending) {
            return;
        }
        let started = Instant::now();
        let changed = self.desired.take_changed();
        // A route may start lingering without a change to the table (it had no backend).
        self.shared
            .metrics
            .routes_lingering
            .set(self.desired.lingering() as i64);
        if self.published && changed.is_empty() {
            // The live table already shows whatever changed.
            self.propagation
                .published(crate::time::unix_us(), &self.shared.metrics);
            return;
        }
        if self.published {
            log_diff(&changed, self.desired.spec());
        }
        self.generation += 1;
        let m = &self.shared.metrics;
        // Build and publish under the series lock: see `Shared::series`.
        let series = self.shared.series.lock().unwrap_or_else(|e| e.into_inner());
        let table = RoutingTable::build(
            self.desired.spec(),
            Some(&changed),
            self.generation,
            &mut self.cache,
            m,
            self.shared.config.upstream_max_idle,
        );
        let routes = table.routes.len();
        self.shared.table.store(Some(Arc::new(table)));
        drop(series);
        self.propagation.published(crate::time::unix_us(), m);
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
        }
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
/// Malformed tags already warned about, by service, then instance and tag: each is logged and
/// counted once, and forgotten with its instance or service, so the set follows what Consul
/// holds instead of growing with every instance that ever had a bad tag.
#[derive(Default)]
struct Warned(HashMap<String, HashSet<(String, String)>>);

impl Warned {
    /// Whether this is the first warning of `tag` on `instance`.
    fn first(&mut self, service: &str, instance: &str, tag: &str) -> bool {
        let seen = match self.0.get_mut(service) {
            Some(seen) => seen,
            None => self.0.entry(service.to_string()).or_default(),
        };
        seen.insert((instance.to_string(), tag.to_string()))
    }

    fn keep_instances(&mut self, service: &str, ids: &HashSet<&str>) {
        if let Some(seen) = self.0.get_mut(service) {
            seen.retain(|(instance, _)| ids.contains(instance.as_str()));
            if seen.is_empty() {
                self.0.remove(service);
            }
        }
    }

    fn keep_services(&mut self, keep: impl Fn(&str) -> bool) {
        self.0.retain(|service, _| keep(service));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_are_forgotten_with_their_instance_and_service() {
        let mut w = Warned::default();
        assert!(w.first("web", "web-1", "lb.weight=x"));
        assert!(!w.first("web", "web-1", "lb.weight=x"), "warned once");
        assert!(w.first("web", "web-2", "lb.weight=x"));
        assert!(w.first("api", "api-1", "lb.route=?"));
        w.keep_instances("web", &HashSet::from(["web-2"]));
        assert!(
            w.first("web", "web-1", "lb.weight=x"),
            "web-1 left and came back"
        );
        w.keep_instances("web", &HashSet::new());
        assert!(!w.0.contains_key("web"), "an empty service is dropped");
        w.keep_services(|s| s != "api");
        assert!(w.0.is_empty());
    }
}
