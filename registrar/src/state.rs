//! The registrar's state: what it has registered, the containers told to stop, the events
//! already seen. Applies one Docker event at a time and runs the full two-way resync. Reaches
//! Consul only through the adapter in `consul`, never its API.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bollard::Docker;
use switchyard_consul::{AgentCheck, CheckState};
use switchyard_daemon::backoff::Backoff;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::consul::Consul;
use crate::docker::{self, DockerEvent, EventKind};
use crate::instance::{self, Decision, InstanceSettings, ServiceInstance, META_CONTAINER};
use crate::journal::{self, Entry, Journal};
use crate::labels;
use crate::metrics::{FailureOp, Metrics};
use crate::reconcile::{self, Change, Drift};

/// Events already handled, to drop the replay of the ones at `since` after a resubscribe.
const DEDUPE_WINDOW: usize = 1024;
/// Events taken from the stream at once, at most (see `maintain_stopping`).
const BATCH_MAX: usize = 256;
/// Why a catalog answer that refuses or filters the node's checks leaves nothing to compare.
const NEEDS_NODE_READ: &str =
    "the registrar's Consul token needs node:read, or the node is not in the catalog yet";
/// How long an instance may differ between the agent and the catalog before it is
/// registered again. A healthy agent syncs a change in about a millisecond, but after a
/// leader is elected or a server joins it holds every change back until a full sync it runs
/// within 3 s (Consul's stagger, longer only past 128 nodes): what still differs after this
/// is not being synced.
const SYNC_GRACE: Duration = Duration::from_secs(5);
/// How soon the catalog is compared again when it could not be read (no leader) or
/// instances differ: repairs land seconds after an election, not a resync later. An
/// instance registered again waits twice this before it may be again, and twice as long
/// after every repair that did not take, up to the resync period.
const CATALOG_RETRY: Duration = Duration::from_secs(2);

pub struct Registrar {
    cfg: Config,
    docker: Docker,
    consul: Consul,
    metrics: Arc<Metrics>,
    journal: Arc<Journal>,
    settings: InstanceSettings,
    /// What this registrar has registered, by container ID.
    registered: HashMap<String, ServiceInstance>,
    /// Containers told to stop that may still run (stop grace period): never re-register them.
    stopping: HashSet<String>,
    /// Stopping containers whose instance a burst's first pass put in maintenance already.
    in_maintenance: HashSet<String>,
    /// (container, label) pairs already warned about.
    warned: HashSet<(String, String)>,
    recent: VecDeque<(i64, String, String)>,
    last_event_nano: i64,
    /// Service IDs the last comparison found differing between the agent and the catalog,
    /// with when they were first seen to.
    unsynced: HashMap<String, Instant>,
    /// Instances registered again for that: when they may be again, and how many times.
    again: HashMap<String, (Instant, u32)>,
    /// Whether the comparison's "cannot compare" warning was given since the last one that ran.
    compare_warned: bool,
}

/// What comparing the agent with the catalog found; says when to compare again.
enum CatalogCheck {
    /// Both hold our instances alike (or we have none, or may not read the catalog):
    /// compare again after the next resync.
    InSync,
    /// Differences to look at again after this.
    Again(Duration),
}

impl Registrar {
    pub fn new(
        cfg: Config,
        docker: Docker,
        node: String,
        consul: Consul,
        metrics: Arc<Metrics>,
        journal: Arc<Journal>,
    ) -> Registrar {
        let settings = InstanceSettings {
            node,
            label_prefix: cfg.label_prefix.clone(),
            tag_prefix: cfg.tag_prefix.clone(),
            network: cfg.network.clone(),
            check_interval: cfg.check_interval,
            check_timeout: cfg.check_timeout,
            deregister_critical_after: cfg.deregister_critical_after,
            ttl: cfg.ttl,
        };
        Registrar {
            cfg,
            docker,
            consul,
            metrics,
            journal,
            settings,
            registered: HashMap::new(),
            stopping: HashSet::new(),
            in_maintenance: HashSet::new(),
            warned: HashSet::new(),
            recent: VecDeque::with_capacity(DEDUPE_WINDOW),
            last_event_nano: switchyard_daemon::clock::since_epoch().as_nanos() as i64,
            unsynced: HashMap::new(),
            again: HashMap::new(),
            compare_warned: false,
        }
    }

    /// Follows the engine's events until `shutdown`. After every (re)subscription it resyncs
    /// before applying what queued meanwhile, and resyncs again on every tick.
    pub async fn watch_docker(
        &mut self,
        ready: &AtomicBool,
        mut shutdown: Pin<&mut impl Future<Output = ()>>,
    ) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            // Subscribe first, then reconcile, then apply what queued meanwhile: no gap.
            let (tx, mut rx) = mpsc::unbounded_channel();
            let reader = tokio::spawn(docker::forward_events(
                self.docker.clone(),
                self.last_event_nano,
                tx,
            ));
            self.metrics.docker_up.set(1);
            let mut next_resync = tokio::time::Instant::now();
            let mut next_compare: Option<tokio::time::Instant> = None;
            loop {
                tokio::select! {
                    biased;
                    _ = &mut shutdown => {
                        reader.abort();
                        return;
                    }
                    event = rx.recv() => match event {
                        Some(e) => {
                            let mut batch = vec![e];
                            while batch.len() < BATCH_MAX {
                                match rx.try_recv() {
                                    Ok(e) => batch.push(e),
                                    Err(_) => break,
                                }
                            }
                            self.maintain_stopping(&batch).await;
                            for e in batch {
                                self.handle(e).await;
                            }
                        }
                        None => break,
                    },
                    _ = tokio::time::sleep_until(next_resync) => {
                        next_resync = tokio::time::Instant::now() + self.resync_then_wait(ready, &mut backoff).await;
                        next_compare = Some(tokio::time::Instant::now());
                    }
                    _ = tokio::time::sleep_until(next_compare.unwrap_or(next_resync)), if next_compare.is_some() => {
                        next_compare = match self.compare_with_catalog().await {
                            CatalogCheck::InSync => None,
                            CatalogCheck::Again(after) => Some(tokio::time::Instant::now() + after),
                        };
                    }
                }
            }
            self.metrics.docker_up.set(0);
            self.metrics.docker_reconnects.inc();
            match reader.await {
                Ok(Err(e)) => {
                    self.metrics.failed(FailureOp::DockerEvents);
                    tracing::warn!(error = %e, "Docker event stream failed; resubscribing");
                }
                _ => tracing::warn!("Docker event stream ended; resubscribing"),
            }
            let wait = backoff.next_delay();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = &mut shutdown => return,
            }
        }
    }

    /// Resyncs, and says how long until the next one: the period after a success (the first
    /// one makes the registrar ready), a backoff after a failure.
    async fn resync_then_wait(&mut self, ready: &AtomicBool, backoff: &mut Backoff) -> Duration {
        match self.resync().await {
            Ok(()) => {
                ready.store(true, Ordering::Release);
                backoff.reset();
                self.cfg.resync
            }
            Err(e) => {
                let wait = backoff.next_delay().min(self.cfg.resync);
                tracing::warn!(error = %format!("{e:#}"), retry_in = ?wait, "reconcile failed; keeping what is registered");
                wait
            }
        }
    }

    fn in_scope(&self, labels: &HashMap<String, String>) -> bool {
        labels::opted_in(labels, &self.cfg.label_prefix)
            && match &self.cfg.only_label {
                None => true,
                Some((k, None)) => labels.contains_key(k),
                Some((k, Some(v))) => labels.get(k) == Some(v),
            }
    }

    /// Stops that come together (a service scaled down) reach Consul together: every
    /// stopping instance of the burst goes into maintenance, which stops its traffic, before
    /// the first of them waits for the catalog and is deregistered. One after the other,
    /// the last of five would wait for the four before it. The maintenances themselves are
    /// entered at once, for the same reason.
    async fn maintain_stopping(&mut self, batch: &[DockerEvent]) {
        let stopping: Vec<_> = batch
            .iter()
            .filter(|e| e.kind == EventKind::Stopping)
            .filter(|e| !self.seen(e) && self.in_scope(&e.labels))
            .filter_map(|e| Some((e, self.registered.get(&e.id)?)))
            .collect();
        if stopping.len() < 2 {
            return;
        }
        let entered = futures_util::future::join_all(stopping.iter().map(|(e, instance)| {
            self.consul
                .enter_maintenance(&instance.registration, &e.action, micros(e.time_nano))
        }))
        .await;
        let entered: Vec<String> = stopping
            .iter()
            .zip(entered)
            .filter(|(_, r)| r.is_ok())
            .map(|((e, _), _)| e.id.clone())
            .collect();
        self.in_maintenance.extend(entered);
    }

    /// Whether `e` was handled already: Docker repeats events across a resubscription.
    fn seen(&self, e: &DockerEvent) -> bool {
        self.recent
            .iter()
            .any(|(t, id, action)| *t == e.time_nano && *id == e.id && *action == e.action)
    }

    async fn handle(&mut self, e: DockerEvent) {
        self.last_event_nano = self.last_event_nano.max(e.time_nano);
        if self.seen(&e) {
            return;
        }
        let key = (e.time_nano, e.id.clone(), e.action.clone());
        if self.recent.len() == DEDUPE_WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(key);
        if !self.in_scope(&e.labels) {
            self.out_of_scope(&e);
            return;
        }
        let action = e.action.split(':').next().unwrap_or("other");
        self.metrics.events.with_label_values(&[action]).inc();
        tracing::debug!(container = %short(&e.id), action = %e.action, "event");
        match e.kind {
            EventKind::Started => {
                self.stopping.remove(&e.id);
                match docker::inspect(&self.docker, &e.id).await {
                    Ok(Some(info)) => {
                        if let Some(mut instance) = self.decide(&info) {
                            instance.started_at(micros(e.time_nano));
                            self.register(instance, Drift::None).await;
                        }
                    }
                    Ok(None) => {}
                    Err(err) => {
                        self.metrics.failed(FailureOp::DockerInspect);
                        tracing::warn!(container = %short(&e.id), error = %err, "inspect failed; the next resync retries");
                    }
                }
            }
            EventKind::Stopping => {
                self.stopping.insert(e.id.clone());
                self.deregister_container(&e.id, &e.action, micros(e.time_nano))
                    .await;
            }
            EventKind::Gone => {
                self.stopping.remove(&e.id);
                self.deregister_container(&e.id, &e.action, micros(e.time_nano))
                    .await;
                self.journal.gone(&e.id);
            }
            EventKind::Health(h) => {
                let Some(instance) = self.registered.get_mut(&e.id) else {
                    return;
                };
                instance.docker_health = Some(h);
                instance.health_at = Some(micros(e.time_nano));
                self.journal
                    .update(&e.id, |j| j.docker_health = Some(h.as_str()));
                if let Some(check) = &instance.ttl_check {
                    let output = instance.ttl_output();
                    self.consul
                        .update_ttl(check, h.check_status(), &output)
                        .await;
                }
            }
            EventKind::Other => {}
        }
    }

    /// The journal's word on a container outside the registrar's scope, from its event alone
    /// (nothing is asked of Docker for it).
    fn out_of_scope(&self, e: &DockerEvent) {
        match e.kind {
            EventKind::Started => {
                let name = e.labels.get("name").map_or("", String::as_str);
                let mut entry = Entry::new(&e.id, name, journal::Decision::Skipped);
                let prefix = &self.cfg.label_prefix;
                entry.reasons.push(if labels::opted_in(&e.labels, prefix) {
                    "outside REGISTRAR_ONLY_LABEL".to_string()
                } else {
                    format!("not opted in: label {prefix}.enable=true is missing")
                });
                entry.out_of_scope = true;
                self.journal.record(entry);
            }
            EventKind::Gone => self.journal.gone(&e.id),
            _ => {}
        }
    }

    /// The instance for a running container, warning (once) about unusable labels. The
    /// journal hears every decision.
    fn decide(&mut self, info: &docker::ContainerInfo) -> Option<ServiceInstance> {
        if !self.in_scope(&info.labels) {
            return None;
        }
        match instance::decide(info, &self.settings) {
            Decision::Register(i) => {
                self.journal.record(registered_entry(&info.name, &i));
                Some(*i)
            }
            Decision::Ignore => None,
            Decision::Invalid(errors) => {
                let mut entry = Entry::new(&info.id, &info.name, journal::Decision::Skipped);
                entry.reasons = errors.iter().map(ToString::to_string).collect();
                self.journal.record(entry);
                for err in errors {
                    if self.warned.insert((info.id.clone(), err.label.clone())) {
                        self.metrics
                            .label_errors
                            .with_label_values(&[err.kind])
                            .inc();
                        tracing::warn!(container = %info.name, id = %short(&info.id), label = %err.label, reason = %err.reason, "skipping container: unusable label");
                    }
                }
                None
            }
        }
    }

    async fn register(&mut self, instance: ServiceInstance, drift: Drift) {
        let unchanged = self
            .registered
            .get(&instance.container_id)
            .is_some_and(|have| have.same_spec(&instance));
        if unchanged && drift == Drift::None {
            return;
        }
        // A registration made again (a resync that found Consul's copy changed) keeps the
        // time Docker reported the health it mirrors.
        let mut instance = instance;
        if let Some(have) = self.registered.get(&instance.container_id) {
            if instance.health_at.is_none() && have.docker_health == instance.docker_health {
                instance.health_at = have.health_at;
            }
        }
        let result = self.consul.register(&instance.registration, drift).await;
        self.journal.update(&instance.container_id, |j| {
            j.consul = Some(written("register", &result));
        });
        if result.is_ok() {
            self.registered
                .insert(instance.container_id.clone(), instance);
            self.metrics.registered.set(self.registered.len() as i64);
        }
    }

    async fn deregister_container(&mut self, container: &str, why: &str, at_us: u64) {
        let Some(instance) = self.registered.remove(container) else {
            return;
        };
        self.metrics.registered.set(self.registered.len() as i64);
        let entered = self.in_maintenance.remove(container);
        let result = self
            .consul
            .drain_and_deregister(&instance.registration, why, at_us, entered)
            .await;
        self.journal.update(container, |j| {
            j.decision = journal::Decision::Deregistered;
            j.reasons = vec![format!("on Docker's {why:?} event")];
            j.consul = Some(written("deregister", &result));
            j.at_unix_ms = switchyard_daemon::clock::unix_ms();
        });
    }

    /// Full two-way reconcile: Docker's running, opted-in containers against the entries this
    /// node owns in Consul.
    async fn resync(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        let desired = self.desired().await?;
        let services = self.consul.agent_services().await?;
        let owned = reconcile::owned(services.into_values(), &self.settings.node);
        let changes = reconcile::plan(&desired, &owned);
        // What Consul already holds in sync counts as registered; when Docker's health is
        // the one an event reported, the TTL output keeps that event's time.
        let mut before = std::mem::take(&mut self.registered);
        self.registered = desired
            .values()
            .filter(|i| owned.contains_key(&i.registration.id))
            .map(|i| {
                let mut i = i.clone();
                if let Some(had) = before.remove(&i.container_id) {
                    if had.docker_health == i.docker_health {
                        i.health_at = had.health_at;
                    }
                }
                (i.container_id.clone(), i)
            })
            .collect();
        for change in changes {
            match change {
                Change::Register { instance, drift } => self.register(*instance, drift).await,
                Change::Deregister { id, drift } => {
                    let why = "no running container";
                    let result = self.consul.deregister(&id, why, drift).await;
                    if let Some(container) = owned.get(&id).and_then(|s| s.meta.get(META_CONTAINER))
                    {
                        self.journal.update(container, |j| {
                            j.decision = journal::Decision::Deregistered;
                            j.reasons = vec![format!("by the reconcile: {why}")];
                            j.consul = Some(written("deregister", &result));
                        });
                    }
                }
            }
        }
        self.refresh_ttls().await;
        self.metrics.registered.set(self.registered.len() as i64);
        self.metrics.resyncs.inc();
        self.metrics
            .resync_duration
            .observe(started.elapsed().as_secs_f64());
        tracing::debug!(desired = desired.len(), owned = owned.len(), took = ?started.elapsed(), "reconciled");
        Ok(())
    }

    /// Compares our instances on the agent with what the catalog holds for the agent's node,
    /// and registers again, which makes the agent sync it, what has differed for
    /// [`SYNC_GRACE`]. The agent retries a sync that failed (no leader during an election, a
    /// server lost, a refusal by the servers' ACLs) only at its next full sync, a minute or two
    /// later, and the lbs read the catalog: without this an instance started during an
    /// election can stay unrouted that long.
    async fn compare_with_catalog(&mut self) -> CatalogCheck {
        let ours: HashSet<String> = self
            .registered
            .values()
            .map(|i| i.registration.id.clone())
            .collect();
        if ours.is_empty() {
            self.unsynced.clear();
            self.again.clear();
            return CatalogCheck::InSync;
        }
        let (checks, catalog, node) = match self.read_both(&ours).await {
            Ok(read) => read,
            Err(then) => {
                // A difference counts only while comparisons see it: one seen before an
                // election must not be repaired the moment a leader is back, while the
                // agent still holds its changes for the full sync it is about to run.
                self.unsynced.clear();
                return then;
            }
        };
        let Some(differ) = reconcile::unsynced(&checks, &catalog, |id| ours.contains(id)) else {
            self.unsynced.clear();
            self.cannot_compare(
                &node,
                "the catalog lists no serfHealth check for the node",
                NEEDS_NODE_READ,
            );
            return CatalogCheck::InSync;
        };
        if std::mem::take(&mut self.compare_warned) {
            tracing::info!(node = %node, "the agent and the catalog are compared again");
        }
        let now = Instant::now();
        self.unsynced.retain(|id, _| differ.contains_key(id));
        self.again.retain(|id, _| differ.contains_key(id));
        for id in differ.keys() {
            self.unsynced.entry(id.clone()).or_insert(now);
        }
        let due: Vec<ServiceInstance> = self
            .registered
            .values()
            .filter(|i| {
                let id = &i.registration.id;
                self.unsynced
                    .get(id)
                    .is_some_and(|seen| now.duration_since(*seen) >= SYNC_GRACE)
                    && self.again.get(id).is_none_or(|(next, _)| now >= *next)
            })
            .cloned()
            .collect();
        for instance in due {
            let id = instance.registration.id.clone();
            let times = self.again.get(&id).map_or(0, |(_, n)| *n) + 1;
            // 4 s, 8, 16, ...: the first wait is longer than the agent's own hold-back.
            let wait = CATALOG_RETRY
                .saturating_mul(1 << times.min(16))
                .min(self.cfg.resync);
            self.again.insert(id.clone(), (now + wait, times));
            let how = differ.get(&id).map_or("", String::as_str);
            tracing::warn!(id = %id, node = %node, how, times, "the catalog does not hold this instance as the agent does; registering it again so that the agent syncs it");
            self.register(again(instance), Drift::Unsynced).await;
        }
        if differ.is_empty() {
            CatalogCheck::InSync
        } else {
            CatalogCheck::Again(CATALOG_RETRY)
        }
    }

    /// The agent's checks, the catalog's for the agent's node, and its name; or, when they
    /// cannot be had, when to try again.
    async fn read_both(
        &mut self,
        ours: &HashSet<String>,
    ) -> Result<(HashMap<String, AgentCheck>, Vec<CheckState>, String), CatalogCheck> {
        let checks = match self.consul.agent_checks().await {
            Ok(checks) => checks,
            Err(e) => {
                self.cannot_compare(
                    "",
                    &e.to_string(),
                    "reading the agent's checks failed; trying again every 2 s",
                );
                return Err(CatalogCheck::Again(CATALOG_RETRY));
            }
        };
        // Every registration of ours carries a check, each naming the agent's node.
        let Some(node) = checks
            .values()
            .find(|c| ours.contains(&c.service_id))
            .map(|c| c.node.clone())
        else {
            return Err(CatalogCheck::InSync);
        };
        match self.consul.catalog_checks(&node).await {
            Ok(Some(catalog)) => Ok((checks, catalog, node)),
            Ok(None) => {
                tracing::debug!(
                    "Consul knows no leader; comparing the agent with the catalog again soon"
                );
                Err(CatalogCheck::Again(CATALOG_RETRY))
            }
            Err(e) if e.kind() == "acl_denied" => {
                self.cannot_compare(&node, &e.to_string(), NEEDS_NODE_READ);
                Err(CatalogCheck::InSync)
            }
            Err(e) => {
                self.cannot_compare(
                    &node,
                    &e.to_string(),
                    "reading the catalog failed; trying again every 2 s",
                );
                Err(CatalogCheck::Again(CATALOG_RETRY))
            }
        }
    }

    /// No comparison this time, and why: a failed read (counted in
    /// `registrar_failures_total{op="consul_catalog"}` too), or a catalog that says nothing of
    /// the node. Said once, and again only after a comparison has run.
    fn cannot_compare(&mut self, node: &str, why: &str, what: &str) {
        if !self.compare_warned {
            self.compare_warned = true;
            tracing::warn!(
                node,
                why,
                "the agent and the catalog are not compared: {what}"
            );
        }
    }

    /// What Docker says should be registered, by service ID: the running, opted-in containers
    /// not told to stop. Forgets stopping and warned containers that no longer run.
    async fn desired(&mut self) -> anyhow::Result<BTreeMap<String, ServiceInstance>> {
        let opt_in = format!("{}.enable=true", self.cfg.label_prefix);
        let only = self.cfg.only_label.as_ref().map(|(k, v)| match v {
            Some(v) => format!("{k}={v}"),
            None => k.clone(),
        });
        let ids = docker::list_opted_in(&self.docker, &opt_in, only.as_deref())
            .await
            .inspect_err(|_| {
                self.metrics.failed(FailureOp::DockerList);
            })?;
        let running: HashSet<&str> = ids.iter().map(String::as_str).collect();
        self.journal.retain_running(|id| running.contains(id));
        self.stopping.retain(|id| running.contains(id.as_str()));
        self.in_maintenance
            .retain(|id| running.contains(id.as_str()));
        self.warned.retain(|(id, _)| running.contains(id.as_str()));
        let mut desired = BTreeMap::new();
        for id in &ids {
            if self.stopping.contains(id) {
                continue;
            }
            match docker::inspect(&self.docker, id).await {
                Ok(Some(info)) => {
                    if let Some(i) = self.decide(&info) {
                        desired.insert(i.registration.id.clone(), i);
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    self.metrics.failed(FailureOp::DockerInspect);
                    return Err(e).context("inspecting containers");
                }
            }
        }
        Ok(desired)
    }

    /// Refreshing TTL checks keeps them alive; a registrar that dies lets them expire.
    async fn refresh_ttls(&self) {
        for i in self.registered.values() {
            if let (Some(check), Some(health)) = (&i.ttl_check, i.docker_health) {
                self.consul
                    .update_ttl(check, health.check_status(), &i.ttl_output())
                    .await;
            }
        }
    }
}

/// `i` to register again because the catalog did not hold it as the agent did: marked in
/// its meta and its check's notes, so that it differs from the agent's copy. Consul 1.8
/// syncs any registration; newer versions skip one identical to what the agent holds, and
/// would skip a check left identical too, syncing the instance without it (which reads as
/// passing). The agent keeps each check's status and output across the registration.
fn again(mut i: ServiceInstance) -> ServiceInstance {
    let at = switchyard_daemon::clock::unix_ms();
    i.registration
        .meta
        .insert(instance::META_AGAIN.to_string(), at.to_string());
    for c in &mut i.registration.checks {
        c.notes = Some(format!(
            "registered again at {at} (Unix ms): the catalog did not hold it as the agent did"
        ));
    }
    i
}

/// The journal's entry for a container about to be registered as `i`.
fn registered_entry(name: &str, i: &ServiceInstance) -> Entry {
    let r = &i.registration;
    let mut entry = Entry::new(&i.container_id, name, journal::Decision::Registered);
    entry.service = Some(r.name.clone());
    entry.service_id = Some(r.id.clone());
    entry.address = Some(format!("{}:{}", r.address, r.port));
    entry.check = r.checks.first().map(|c| {
        let every = c.interval.as_deref().unwrap_or("?");
        match (&c.http, &c.tcp, &c.ttl) {
            (Some(url), _, _) => format!("HTTP GET {url} every {every}"),
            (_, Some(addr), _) => format!("TCP {addr} every {every}"),
            (_, _, Some(_)) => "TTL mirroring Docker's health".to_string(),
            _ => "none".to_string(),
        }
    });
    entry.docker_health = i.docker_health.map(docker::DockerHealth::as_str);
    entry
}

/// A Consul write's result, for the journal.
fn written(op: &str, result: &Result<(), String>) -> String {
    match result {
        Ok(()) => format!("{op}: ok"),
        Err(e) => format!("{op}: failed: {e}"),
    }
}

/// Docker's event time in microseconds since the epoch (0 for an event from before it).
fn micros(time_nano: i64) -> u64 {
    u64::try_from(time_nano / 1000).unwrap_or(0)
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}
