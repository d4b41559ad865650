//! Consul's reads, one loop for every watch: pacing, index handling, backoff with jitter,
//! reporting only real changes, and holding what a Consul that lost its state forgot. Three
//! watches are blocking queries (the catalog, the critical and the warning checks); the
//! census of every check, and each routed service's instances, are read when told that they
//! changed, through a few connections shared by all. Knows nothing of routing tables, nor of how a change is traced to a service.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use switchyard_consul::{next_index, Client, QueryMeta, QueryOptions, ServiceEntry};
use switchyard_daemon::backoff::Backoff;
use tokio::sync::{mpsc, Notify, Semaphore};

use super::attribute::{CheckList, CheckSeen, Checks};
use super::desired::VersionWeights;
use super::{Pace, Update, BACKOFF_BASE};
use crate::metrics::WatchName;
use crate::state::ConsulContact;
use crate::Shared;

/// Counts a watch as failing while its last call failed, and not once it is gone.
struct FailingWatch<'a> {
    contact: &'a ConsulContact,
    failing: bool,
}

impl FailingWatch<'_> {
    fn ok(&mut self, shared: &Shared, meta: QueryMeta) {
        if self.failing {
            self.failing = false;
            self.contact.watch_failing(false);
        }
        self.contact.read_ok();
        let m = &shared.metrics;
        m.consul_last_contact
            .set(meta.last_contact_ms as f64 / 1000.0);
        m.consul_known_leader.set(i64::from(meta.known_leader));
    }

    fn failed(&mut self) {
        if !self.failing {
            self.failing = true;
            self.contact.watch_failing(true);
        }
    }
}

impl Drop for FailingWatch<'_> {
    fn drop(&mut self) {
        if self.failing {
            self.contact.watch_failing(false);
        }
    }
}

/// A watch's value as reported: what Consul said, plus what it forgot and the watch holds.
///
/// When a watch's index goes backwards (a Consul restarted without its state, a server
/// rescheduled without its volume, a restored snapshot), an answer that lacks what the last
/// one had says nothing about those instances: they are held, still reported, until their
/// service is registered again or `LB_STATE_LOSS_GRACE` passes. An answer with the index
/// moving forward is news, and applies at once.
pub(super) trait Holdable: Clone + PartialEq {
    /// `self` (the last report) held in where `fresh` lacks it; `None` when nothing vanished.
    /// With `only_held`, only what `self` already holds is kept: an answer with the index
    /// moving forward is news for everything else, which applies at once.
    fn hold_over(&self, fresh: &Self, only_held: bool) -> Option<Self>;
    /// Whether `fresh`, read while holding, ends the hold: what was held is back.
    fn registered_again(&self, fresh: &Self) -> bool;
    /// How many entries of this report are held.
    fn held(&self) -> usize;
}

/// A routed service's instances, and which of them are held (`Holdable`).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Instances {
    pub entries: Vec<ServiceEntry>,
    /// (node, service ID) of the held entries: IDs are unique per node only.
    pub held: BTreeSet<(String, String)>,
}

/// An instance's identity in Consul: its node and its service ID.
pub(super) fn instance_key(e: &ServiceEntry) -> (String, String) {
    (e.node.node.clone(), e.service.id.clone())
}

impl Holdable for Instances {
    /// Instances passing in the last report that Consul now lacks, or lists without passing
    /// (re-registered, its checks not yet run): the last report's version is kept.
    fn hold_over(&self, fresh: &Self, only_held: bool) -> Option<Self> {
        let key = instance_key;
        let fresh_ok: BTreeSet<_> = fresh
            .entries
            .iter()
            .filter(|e| e.is_passing())
            .map(key)
            .collect();
        let kept: Vec<&ServiceEntry> = self
            .entries
            .iter()
            .filter(|e| {
                let k = key(e);
                e.is_passing() && !fresh_ok.contains(&k) && (!only_held || self.held.contains(&k))
            })
            .collect();
        if kept.is_empty() {
            return None;
        }
        let kept_keys: BTreeSet<_> = kept.iter().map(|e| key(e)).collect();
        let mut entries: Vec<ServiceEntry> = fresh
            .entries
            .iter()
            .filter(|e| !kept_keys.contains(&key(e)))
            .cloned()
            .collect();
        entries.extend(kept.iter().map(|e| (*e).clone()));
        sort_entries(&mut entries);
        Some(Instances {
            entries,
            held: kept_keys,
        })
    }

    /// The service is registered again once Consul has a passing instance of it.
    fn registered_again(&self, fresh: &Self) -> bool {
        fresh.entries.iter().any(ServiceEntry::is_passing)
    }

    fn held(&self) -> usize {
        self.held.len()
    }
}

/// The routed services, and which of them are held (`Holdable`).
#[derive(Debug, Clone, PartialEq, Default)]
pub(super) struct Routed {
    pub names: BTreeSet<String>,
    pub held: BTreeSet<String>,
    /// Each routed service's tags (the union over its instances), to tell which changed.
    pub tags: BTreeMap<String, Vec<String>>,
    /// The catalog's index: an answer at a new index is news even when nothing above moved,
    /// since a change it does not show may be behind it.
    pub index: u64,
    /// The first answer after failed reads: anything may have changed meanwhile (the index
    /// of a Consul that restarted can even come back the same).
    pub recovered: bool,
}

/// The names of the last report that the fresh one lacks (with `only_held`, only those
/// already held): what a hold keeps.
fn vanished<'a>(
    last: impl Iterator<Item = &'a String>,
    fresh_has: impl Fn(&str) -> bool,
    held: &BTreeSet<String>,
    only_held: bool,
) -> BTreeSet<String> {
    last.filter(|n| !fresh_has(n) && (!only_held || held.contains(*n)))
        .cloned()
        .collect()
}

impl Holdable for Routed {
    fn hold_over(&self, fresh: &Self, only_held: bool) -> Option<Self> {
        let has = |n: &str| fresh.names.contains(n);
        let vanished = vanished(self.names.iter(), has, &self.held, only_held);
        if vanished.is_empty() {
            return None;
        }
        let mut merged = fresh.clone();
        merged.names.extend(vanished.iter().cloned());
        merged.held = vanished;
        Some(merged)
    }

    /// Each service is held until it is back: `hold_over` lets go of those that are.
    fn registered_again(&self, _fresh: &Self) -> bool {
        false
    }

    fn held(&self) -> usize {
        self.held.len()
    }
}

/// Nothing to hold: a checks answer only says which services to read again, and each
/// service's watch holds its own instances.
impl Holdable for Checks {
    fn hold_over(&self, _fresh: &Self, _only_held: bool) -> Option<Self> {
        None
    }

    fn registered_again(&self, _fresh: &Self) -> bool {
        false
    }

    fn held(&self) -> usize {
        0
    }
}

/// Services' version weights from Consul KV (`LB_WEIGHTS_KV_PREFIX<service>` holding
/// `{"v1": 90, "v2": 10}`), and which of them are held (`Holdable`).
#[derive(Debug, Clone, PartialEq, Default)]
pub(super) struct Weights {
    pub services: HashMap<String, VersionWeights>,
    pub held: BTreeSet<String>,
}

/// A Consul that lost its state forgets its KV too: what it no longer lists is held, as
/// instances are, rather than sending a dark version its instances' full share at once.
impl Holdable for Weights {
    fn hold_over(&self, fresh: &Self, only_held: bool) -> Option<Self> {
        let has = |s: &str| fresh.services.contains_key(s);
        let vanished = vanished(self.services.keys(), has, &self.held, only_held);
        if vanished.is_empty() {
            return None;
        }
        let mut merged = fresh.clone();
        for s in &vanished {
            merged.services.insert(s.clone(), self.services[s].clone());
        }
        merged.held = vanished;
        Some(merged)
    }

    fn registered_again(&self, _fresh: &Self) -> bool {
        false
    }

    fn held(&self) -> usize {
        self.held.len()
    }
}

/// Follows the version weights under `prefix` with a blocking query and reports each change.
pub(super) async fn watch_weights(
    shared: Arc<Shared>,
    client: Client,
    prefix: String,
    tx: mpsc::Sender<Update>,
) {
    watch(
        &shared,
        WatchName::Weights,
        "weights",
        |q| {
            let (client, prefix) = (client.clone(), prefix.clone());
            async move { client.kv_list(&prefix, &q).await }
        },
        |resp, last: Option<&Weights>, _| {
            Verdict::Value(weights_of(&shared, &prefix, resp.value, last))
        },
        |weights| {
            let tx = tx.clone();
            async move { tx.send(Update::Weights(weights)).await.is_ok() }
        },
    )
    .await;
}

/// The weights in a KV answer. A value that is not a JSON object of version names to
/// weights (0..=1000) is refused, warned about and counted, and the service keeps the
/// weights it had: a typo must not send a dark version traffic.
fn weights_of(
    shared: &Shared,
    prefix: &str,
    pairs: Vec<switchyard_consul::KvPair>,
    last: Option<&Weights>,
) -> Weights {
    let mut services = HashMap::new();
    for pair in pairs {
        let Some(service) = pair.key.strip_prefix(prefix).filter(|s| !s.is_empty()) else {
            continue;
        };
        let parsed = pair
            .bytes()
            .and_then(|b| serde_json::from_slice::<BTreeMap<String, u32>>(&b).ok())
            .filter(|w| {
                w.iter().all(|(v, n)| {
                    switchyard_consul::tags::is_version(v)
                        && *n <= switchyard_consul::tags::MAX_WEIGHT
                })
            });
        match parsed {
            Some(w) => {
                services.insert(service.to_string(), w);
            }
            None => {
                shared.metrics.version_weights_errors.inc();
                tracing::warn!(key = %pair.key, "ignoring version weights that are not a JSON object of version names to weights 0..=1000");
                if let Some(kept) = last.and_then(|l| l.services.get(service)) {
                    services.insert(service.to_string(), kept.clone());
                }
            }
        }
    }
    Weights {
        services,
        held: BTreeSet::new(),
    }
}

fn sort_entries(entries: &mut [ServiceEntry]) {
    entries.sort_by(|a, b| (&a.node.node, &a.service.id).cmp(&(&b.node.node, &b.service.id)));
}

/// Whether the reads before this one failed (`watch` tells its judge).
#[derive(Debug, Clone, Copy)]
struct Recovered(bool);

/// What a watch does with one successful read.
enum Verdict<T> {
    /// A value to compare with the last one and report when it differs.
    Value(T),
    /// A read not to trust: keep the last value, reset the index and retry after a backoff.
    Distrust(&'static str),
}

/// The blocking-query loop shared by every watch: pace the reads, carry `X-Consul-Index`
/// (reset when it goes backwards, and after any failure so the first read after an outage
/// returns at once), back off with jitter on errors forever, keep the last value, hold what a
/// Consul that lost its state forgot (`Holdable`), and report only real changes.
/// `on_change` returns false when nobody listens any more.
async fn watch<Raw, T, R, ReadFut, J, C, ChangeFut>(
    shared: &Shared,
    watch: WatchName,
    name: &str,
    mut read: R,
    mut judge: J,
    mut on_change: C,
) where
    T: Holdable,
    R: FnMut(QueryOptions) -> ReadFut,
    ReadFut: std::future::Future<
        Output = Result<switchyard_consul::Response<Raw>, switchyard_consul::Error>,
    >,
    J: FnMut(switchyard_consul::Response<Raw>, Option<&T>, Recovered) -> Verdict<T>,
    C: FnMut(T) -> ChangeFut,
    ChangeFut: std::future::Future<Output = bool>,
{
    let cfg = &shared.config;
    let mut pace = Pace::new(cfg.consul_rate, cfg.consul_burst);
    let mut backoff = Backoff::new(BACKOFF_BASE, cfg.consul_backoff_max);
    let mut health = FailingWatch {
        contact: &shared.consul,
        failing: false,
    };
    let mut index = 0;
    // The index of the last answer taken (the query index is reset after errors; this is
    // not): an answer below it comes from a Consul that lost its state, whose indices are
    // the baseline from then on. (With stale reads, a follower that lags looks the same:
    // holding what it does not know yet is right then too.)
    let mut high = 0;
    // The last report, and what Consul itself said last when they differ (a hold).
    let mut last: Option<T> = None;
    let mut hold: Option<(T, Instant)> = None;
    let mut held = HeldGauge {
        gauge: shared
            .metrics
            .consul_held
            .with_label_values(&[watch.as_str()]),
        count: 0,
    };
    loop {
        pace.acquire().await;
        let q = QueryOptions {
            index,
            wait: Some(cfg.consul_wait),
            stale: cfg.consul_stale,
            timeout: None,
        };
        let until = hold.as_ref().map(|(_, until)| *until);
        let answer = tokio::select! {
            answer = read(q) => answer,
            // The grace is over: report what Consul says (the read starts again).
            _ = async { tokio::time::sleep_until(until.expect("guarded").into()).await }, if until.is_some() => {
                let (fresh, _) = hold.take().expect("guarded");
                tracing::info!(watch = watch.as_str(), name, "state-loss grace over; applying Consul's answer");
                // A read this cut short is made again at once.
                index = 0;
                if !report(&mut last, fresh, &mut held, &mut on_change).await {
                    return;
                }
                continue;
            }
        };
        match answer {
            Ok(resp) => {
                health.ok(shared, resp.meta);
                let got = resp.meta.index;
                let recovered = Recovered(backoff.failing());
                match judge(resp, last.as_ref(), recovered) {
                    Verdict::Distrust(why) => {
                        shared
                            .metrics
                            .consul_watch_errors
                            .with_label_values(&[watch.as_str(), why])
                            .inc();
                        if why == crate::metrics::NOTHING_VISIBLE {
                            tracing::warn!(
                                watch = watch.as_str(),
                                name,
                                reason = why,
                                "Consul lists no service, not even its own: the lb's token may read nothing (it needs service:read and node:read; LB_CONSUL_TOKEN or LB_CONSUL_TOKEN_FILE); keeping the last answer"
                            );
                        } else {
                            tracing::warn!(
                                watch = watch.as_str(),
                                name,
                                reason = why,
                                "ignoring a Consul answer; keeping the last one"
                            );
                        }
                        index = 0;
                        backoff_within(backoff.next_delay(), &hold).await;
                    }
                    Verdict::Value(fresh) => {
                        if backoff.failing() {
                            tracing::info!(watch = watch.as_str(), name, "Consul watch recovered");
                        }
                        backoff.reset();
                        tracing::debug!(
                            watch = watch.as_str(),
                            name,
                            sent = index,
                            got,
                            "Consul read"
                        );
                        index = next_index(index, got);
                        let backwards = got < high;
                        high = got;
                        let was_holding = hold.is_some();
                        let value = with_hold(
                            &mut hold,
                            last.as_ref(),
                            fresh,
                            backwards,
                            cfg.state_loss_grace,
                        );
                        if hold.is_some() && !was_holding {
                            tracing::warn!(
                                watch = watch.as_str(),
                                name,
                                held = value.held(),
                                grace = ?cfg.state_loss_grace,
                                "Consul's index went backwards: it lost state; holding what it forgot"
                            );
                        }
                        if !report(&mut last, value, &mut held, &mut on_change).await {
                            return;
                        }
                    }
                }
            }
            Err(e) => {
                health.failed();
                shared
                    .metrics
                    .consul_watch_errors
                    .with_label_values(&[watch.as_str(), e.kind()])
                    .inc();
                let delay = backoff.next_delay();
                if e.kind() == "acl_denied" {
                    tracing::warn!(watch = watch.as_str(), name, error = %e, retry_in = ?delay, "Consul refuses the lb's token (it needs service:read and node:read; LB_CONSUL_TOKEN or LB_CONSUL_TOKEN_FILE); keeping the last answer");
                } else {
                    tracing::warn!(watch = watch.as_str(), name, error = %e, retry_in = ?delay, "Consul watch failed; keeping the last answer");
                }
                index = 0;
                backoff_within(delay, &hold).await;
            }
        }
    }
}

/// What a watch reports for a `fresh` answer, given its last report, and the hold it keeps
/// (Consul's own answer and the grace's end). An answer with the index gone `backwards`
/// starts a hold of what it forgot, unless it already has what a hold waits for; while
/// holding, a forward answer's news applies to everything not held, and what is back, or
/// nothing left to hold, ends the hold. Without a hold, an answer is reported as it is.
fn with_hold<T: Holdable>(
    hold: &mut Option<(T, Instant)>,
    last: Option<&T>,
    fresh: T,
    backwards: bool,
    grace: std::time::Duration,
) -> T {
    let Some(reported) = last else {
        return fresh;
    };
    if !backwards && hold.is_none() {
        return fresh;
    }
    let merged = if reported.registered_again(&fresh) {
        None
    } else {
        reported.hold_over(&fresh, !backwards)
    };
    match merged {
        Some(merged) => {
            let until = hold
                .as_ref()
                .map_or_else(|| Instant::now() + grace, |(_, until)| *until);
            *hold = Some((fresh, until));
            merged
        }
        None => {
            *hold = None;
            fresh
        }
    }
}

/// Waits `delay`, but no longer than a hold's grace: a hold must not outlast it by a backoff.
async fn backoff_within<T>(delay: std::time::Duration, hold: &Option<(T, Instant)>) {
    let delay = match hold {
        Some((_, until)) => delay.min(until.saturating_duration_since(Instant::now())),
        None => delay,
    };
    tokio::time::sleep(delay).await;
}

/// A watch's share of `lb_consul_held`, given back when the watch stops (a service that
/// leaves takes its held instances with it).
struct HeldGauge {
    gauge: prometheus::IntGauge,
    count: usize,
}

impl HeldGauge {
    fn set(&mut self, count: usize) {
        self.gauge.add(count as i64 - self.count as i64);
        self.count = count;
    }
}

impl Drop for HeldGauge {
    fn drop(&mut self) {
        self.gauge.sub(self.count as i64);
    }
}

/// Reports `value` when it differs from the last report, keeping the held gauge in step.
async fn report<T, C, ChangeFut>(
    last: &mut Option<T>,
    value: T,
    held: &mut HeldGauge,
    on_change: &mut C,
) -> bool
where
    T: Holdable,
    C: FnMut(T) -> ChangeFut,
    ChangeFut: std::future::Future<Output = bool>,
{
    if last.as_ref() == Some(&value) {
        return true;
    }
    held.set(value.held());
    *last = Some(value.clone());
    on_change(value).await
}

/// Follows `/v1/catalog/services` and reports the set of routed services when it changes.
pub(super) async fn watch_catalog(shared: Arc<Shared>, client: Client, tx: mpsc::Sender<Update>) {
    let route_tag = format!("{}.route=", shared.config.tag_prefix);
    watch(
        &shared,
        WatchName::Catalog,
        "services",
        |q| {
            let client = client.clone();
            async move { client.catalog_services(&q).await }
        },
        |resp, _, Recovered(recovered)| {
            // Consul's own service is in every datacenter's catalog: a catalog without any
            // service is one the lb's token may not read (none set, under a default-deny
            // policy), not a datacenter that emptied.
            if resp.value.is_empty() {
                return Verdict::Distrust(crate::metrics::NOTHING_VISIBLE);
            }
            shared.consul.catalog_answered();
            let tags: BTreeMap<String, Vec<String>> = resp
                .value
                .into_iter()
                .filter(|(_, tags)| tags.iter().any(|t| t.starts_with(&route_tag)))
                .collect();
            Verdict::Value(Routed {
                names: tags.keys().cloned().collect(),
                held: BTreeSet::new(),
                tags,
                index: resp.meta.index,
                recovered,
            })
        },
        |routed| {
            let tx = tx.clone();
            async move { tx.send(Update::Services(routed)).await.is_ok() }
        },
    )
    .await;
}

/// Follows one check state (`critical`, `warning`) with a blocking query and reports each
/// answer that differs.
pub(super) async fn watch_check_list(
    shared: Arc<Shared>,
    client: Client,
    list: CheckList,
    tx: mpsc::Sender<Update>,
) {
    watch(
        &shared,
        WatchName::Checks,
        list.as_str(),
        |q| {
            let client = client.clone();
            async move { client.health_state(list.as_str(), &q).await }
        },
        |resp, _, Recovered(recovered)| checks_of(&shared, resp, Instant::now(), recovered),
        |checks| {
            let tx = tx.clone();
            async move { tx.send(Update::Status(list, checks)).await.is_ok() }
        },
    )
    .await;
}

/// A census is read no more than this share of the time: at 20,000 checks one costs Consul
/// about 100 ms, and instances coming and going without pause must not keep it busy.
const CENSUS_SPACING: u32 = 3;

/// Reads every check in the datacenter (`/v1/health/state/any`) when `trigger` says
/// instances may have come or gone (and at the start), each read spaced from the last by
/// `CENSUS_SPACING` times what that one took, and reports each answer.
pub(super) async fn watch_census(
    shared: Arc<Shared>,
    client: Client,
    trigger: Arc<Notify>,
    tx: mpsc::Sender<Update>,
) {
    let last: Arc<std::sync::Mutex<Option<(Instant, std::time::Duration)>>> = Arc::default();
    // Not even the first census is read before it is asked for: with every routed service
    // on a blocking query of its own, none is.
    let asked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    watch(
        &shared,
        WatchName::Checks,
        "any",
        |q| {
            let (client, trigger, last) = (client.clone(), trigger.clone(), last.clone());
            let asked = asked.clone();
            async move {
                // Index 0 after the first read is a retry after a failure: it goes at once.
                if q.index > 0 || !asked.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    trigger.notified().await;
                }
                let spaced = *last.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((ended, took)) = spaced {
                    tokio::time::sleep_until((ended + took * CENSUS_SPACING).into()).await;
                }
                let began = Instant::now();
                let now = QueryOptions {
                    index: 0,
                    wait: None,
                    stale: q.stale,
                    timeout: None,
                };
                let answer = client.health_state("any", &now).await;
                *last.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((Instant::now(), began.elapsed()));
                answer
            }
        },
        |resp, _, _| {
            // The read just ended: `last` is its own.
            let (ended, took) = last
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .unwrap_or((Instant::now(), std::time::Duration::ZERO));
            checks_of(&shared, resp, ended - took, false)
        },
        |checks| {
            let tx = tx.clone();
            async move { tx.send(Update::Census(checks)).await.is_ok() }
        },
    )
    .await;
}

/// Counts the entries of an answer left out because they did not decode (`bad_entry`), and
/// gives the first one's reason to log.
fn count_left_out<'a>(
    shared: &Shared,
    watch: WatchName,
    skipped: &'a [String],
) -> Option<&'a String> {
    let first = skipped.first()?;
    shared
        .metrics
        .consul_watch_errors
        .with_label_values(&[watch.as_str(), crate::metrics::BAD_ENTRY])
        .inc_by(skipped.len() as u64);
    Some(first)
}

/// A checks answer as the lb keeps it; entries that do not decode are left out and counted.
fn checks_of(
    shared: &Shared,
    resp: switchyard_consul::Response<Vec<switchyard_consul::CheckState>>,
    began: Instant,
    recovered: bool,
) -> Verdict<Checks> {
    if let Some(first) = count_left_out(shared, WatchName::Checks, &resp.skipped) {
        tracing::warn!(skipped = resp.skipped.len(), error = %first, "left out checks Consul describes in a form the lb cannot read");
    }
    let checks = resp
        .value
        .into_iter()
        .map(|c| {
            let seen = CheckSeen {
                service: c.service_name,
                status: c.status,
                instance: c.service_id,
                created: c.create_index,
            };
            ((c.node, c.check_id), seen)
        })
        .collect();
    Verdict::Value(Checks {
        index: resp.meta.index,
        checks: Arc::new(checks),
        began,
        recovered,
    })
}

/// How a routed service's watch reads `/v1/health/service/<name>` (every instance, passing
/// or not): with a blocking query of its own when `blocking`; otherwise when `trigger` says
/// the service changed (and at its start, and again after a failed read), through one of the
/// `reads` permits that bound the connections to Consul.
pub(super) struct ServiceReads {
    pub blocking: bool,
    pub trigger: Arc<Notify>,
    pub reads: Arc<Semaphore>,
}

/// Follows one routed service's instances and reports them when they change.
pub(super) async fn watch_service(
    shared: Arc<Shared>,
    client: Client,
    service: String,
    how: ServiceReads,
    tx: mpsc::Sender<Update>,
) {
    let reads_total = shared.metrics.consul_service_reads.clone();
    watch(
        &shared,
        WatchName::Health,
        &service,
        |q| {
            let (client, service) = (client.clone(), service.clone());
            let (trigger, reads) = (how.trigger.clone(), how.reads.clone());
            let reads_total = reads_total.clone();
            let blocking = how.blocking;
            async move {
                if blocking {
                    return client.health_service(&service, false, &q).await;
                }
                // Index 0 is a first read, or one after a failure: it goes at once. Otherwise
                // the last answer stands until a change touches this service.
                if q.index > 0 {
                    trigger.notified().await;
                }
                let _permit = reads
                    .acquire()
                    .await
                    .expect("the semaphore is never closed");
                reads_total.inc();
                let now = QueryOptions {
                    index: 0,
                    wait: None,
                    stale: q.stale,
                    timeout: None,
                };
                client.health_service(&service, false, &now).await
            }
        },
        |resp, last: Option<&Instances>, _| {
            // An empty answer at index <= 1 is how a racing ACL token or a freshly restarted
            // server looks; do not let it wipe instances we know about.
            if resp.value.is_empty()
                && resp.meta.index <= 1
                && last.is_some_and(|l| !l.entries.is_empty())
            {
                return Verdict::Distrust(crate::metrics::DISTRUSTED_ANSWER);
            }
            // One odd instance must not hold up the rest of its service: it is left out.
            if let Some(first) = count_left_out(&shared, WatchName::Health, &resp.skipped) {
                tracing::warn!(
                    service = %service,
                    skipped = resp.skipped.len(),
                    error = %first,
                    "left out instances Consul describes in a form the lb cannot read"
                );
            }
            let mut entries = resp.value;
            sort_entries(&mut entries);
            Verdict::Value(Instances {
                entries,
                held: BTreeSet::new(),
            })
        },
        |instances| {
            let (tx, service) = (tx.clone(), service.clone());
            async move { tx.send(Update::Health { service, instances }).await.is_ok() }
        },
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, node: &str, status: &str) -> ServiceEntry {
        serde_json::from_value(serde_json::json!({
            "Node": {"Node": node, "Address": "10.0.0.1"},
            "Service": {"ID": id, "Service": "web", "Port": 80},
            "Checks": [{"CheckID": "c", "Status": status}]
        }))
        .unwrap()
    }

    fn instances(entries: Vec<ServiceEntry>) -> Instances {
        Instances {
            entries,
            held: BTreeSet::new(),
        }
    }

    #[test]
    fn holds_keep_what_consul_forgot_and_only_that() {
        let before = instances(vec![
            entry("a", "n1", "passing"),
            entry("b", "n2", "passing"),
        ]);
        // A Consul that lost its state knows `a` again, not yet passing, and not `b`.
        let fresh = instances(vec![entry("a", "n1", "critical")]);
        let held = before.hold_over(&fresh, false).unwrap();
        assert_eq!(held.entries.len(), 2);
        assert!(held.held.contains(&("n1".into(), "a".into())));
        assert!(held.held.contains(&("n2".into(), "b".into())));
        assert!(!before.registered_again(&fresh));
        // The same ID on another node is another instance.
        let other = instances(vec![entry("a", "n3", "critical")]);
        let h = before.hold_over(&other, false).unwrap();
        assert_eq!(h.held.len(), 2);

        // News while holding applies to what is not held: `c`, reported after the restart,
        // goes at once when a forward answer lacks it.
        let mut reported = held.clone();
        reported.entries.push(entry("c", "n4", "passing"));
        let forward = instances(vec![entry("a", "n1", "critical")]);
        let next = reported.hold_over(&forward, true).unwrap();
        assert!(next.entries.iter().all(|e| e.service.id != "c"));
        assert_eq!(next.held.len(), 2);

        // A passing instance of the service is back: the hold ends.
        assert!(held.registered_again(&instances(vec![entry("a", "n1", "passing")])));

        // Services: only the held ones are kept on a forward answer.
        let routed = |names: &[&str], held: &[&str]| Routed {
            names: names.iter().map(|s| s.to_string()).collect(),
            held: held.iter().map(|s| s.to_string()).collect(),
            ..Routed::default()
        };
        let r = routed(&["web", "api", "new"], &["web", "api"]);
        let next = r.hold_over(&routed(&["api"], &[]), true).unwrap();
        assert_eq!(next.names, routed(&["web", "api"], &[]).names);
        assert_eq!(next.held, routed(&[], &["web"]).held);
        assert!(r.hold_over(&routed(&["web", "api"], &[]), true).is_none());
    }

    #[test]
    fn a_hold_starts_backwards_and_ends_with_what_it_waits_for() {
        let grace = std::time::Duration::from_secs(60);
        let mut hold = None;
        let before = instances(vec![entry("a", "n1", "passing")]);
        let empty = instances(vec![]);
        // Forward and empty: news, applied.
        let v = with_hold(&mut hold, Some(&before), empty.clone(), false, grace);
        assert!(v.entries.is_empty() && hold.is_none());
        // Backwards and empty: held.
        let v = with_hold(&mut hold, Some(&before), empty.clone(), true, grace);
        assert_eq!(v.held(), 1);
        let until = hold.as_ref().unwrap().1;
        // Forward, still nothing passing: held on, same grace.
        let v2 = with_hold(&mut hold, Some(&v), empty.clone(), false, grace);
        assert_eq!((v2.held(), hold.as_ref().unwrap().1), (1, until));
        // A second restart whose answer has everything: the hold ends (it must not bring
        // the older answer back when the grace runs out).
        let v3 = with_hold(&mut hold, Some(&v2), before.clone(), true, grace);
        assert_eq!((v3.held(), hold.is_none()), (0, true));
        // Backwards with a passing instance already: no hold at all.
        let other = instances(vec![entry("b", "n2", "passing")]);
        let v4 = with_hold(&mut hold, Some(&before), other.clone(), true, grace);
        assert_eq!(v4, other);
        assert!(hold.is_none());
    }
}
