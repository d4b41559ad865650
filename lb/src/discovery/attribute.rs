//! Which routed services a change in Consul touched, so that only those are read again. Knows
//! nothing of HTTP or routing tables.
//!
//! Consul 1.8 has no "what changed since index N" read that stays small, so the lb combines
//! three blocking queries whose cost does not grow with every change:
//! - the critical and the warning checks (`/v1/health/state/critical`, `.../warning`): each
//!   wakes only when its set changes, and is as small as that set. A check that fails,
//!   recovers or is removed while failing shows here, naming its service; a node's own check
//!   (its agent gone) names every service with a check on that node.
//! - the catalog's service list (names and tags): it wakes when an instance is registered or
//!   deregistered, but does not say which. A list answer explains such a change when it
//!   covers its index and shows an instance registered failing (a check no census had) or
//!   leaving maintenance by deregistration (the registrar puts every instance in maintenance
//!   before it deregisters it). Any other asks for a census, every check in the datacenter
//!   (`/v1/health/state/any`), read once and compared with the last census: an instance with
//!   a check that came or went names its service. The census is what costs Consul (about
//!   8 MB at 20,000 checks), so it follows the catalog and is spaced by its own cost
//!   (`watches`); the 5-minute backstop renews it too.
//!
//! What none of them shows: a change to an instance without checks whose service's tags stay
//! the same (a new port, say). Services known to have such instances are read again on every
//! catalog change (the caller knows them); a catalog change after which a census finds no
//! check that came or went asks for a sweep, every routed service read again (a new instance
//! without checks in a service that had none); so does a slow backstop timer, for such a
//! change that lands in one answer with an explained one.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a catalog change waits for a check list to explain it before a census is read:
/// the lists and the catalog wake on the same write, milliseconds apart (the lists usually
/// first: at 5,000 services the catalog's answer takes some 40 ms to make and read).
const EXPLAIN_WITHIN: Duration = Duration::from_millis(50);
/// The check Consul adds to an instance in maintenance (`<prefix><service ID>`). The
/// registrar puts every instance in maintenance before it deregisters it.
const MAINTENANCE: &str = "_service_maintenance:";
/// Indexes at which list answers showed an instance come or go, remembered to explain the
/// catalog's changes.
const LISTED_KEPT: usize = 64;
/// A catalog change whose census has not come by then (Consul failing) is swept.
const CENSUS_WITHIN: Duration = Duration::from_secs(5);
/// Sweeps at most this often: a Consul where unexplained changes keep coming is read in
/// full once a second, not once per change.
const SWEEP_GAP: Duration = Duration::from_secs(1);
/// The backstop: every routed service is read again this often.
pub(super) const SWEEP_EVERY: Duration = Duration::from_secs(300);

/// A check's identity: its node and its check ID (IDs are unique per node only).
pub(super) type CheckKey = (String, String);

/// What the lb needs of one check: whose it is and its status.
#[derive(Debug, Clone)]
pub(super) struct CheckSeen {
    /// Empty for a node's own checks.
    pub service: String,
    pub status: String,
    /// The instance's ID (empty for a node's own checks).
    pub instance: String,
    /// The index of the write that registered the check.
    pub created: u64,
}

/// A check changed when its service or its status did.
impl PartialEq for CheckSeen {
    fn eq(&self, other: &Self) -> bool {
        self.service == other.service && self.status == other.status
    }
}

impl Eq for CheckSeen {}

/// One answer of a checks read.
#[derive(Debug, Clone)]
pub(super) struct Checks {
    pub index: u64,
    pub checks: Arc<HashMap<CheckKey, CheckSeen>>,
    /// When the read began: a census explains the catalog changes seen before then. (Its
    /// index cannot say: it is the checks' index, which a change without checks leaves.)
    pub began: Instant,
    /// The first answer after failed reads.
    pub recovered: bool,
}

/// Every read is news, even one that finds the same checks: a catalog change may be waiting
/// for a census to say that it explains nothing.
impl PartialEq for Checks {
    fn eq(&self, other: &Self) -> bool {
        self.began == other.began
            && self.index == other.index
            && (Arc::ptr_eq(&self.checks, &other.checks) || self.checks == other.checks)
    }
}

/// The check states followed with a blocking query of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CheckList {
    Critical,
    Warning,
}

impl CheckList {
    pub const ALL: [CheckList; 2] = [CheckList::Critical, CheckList::Warning];

    pub fn as_str(self) -> &'static str {
        match self {
            CheckList::Critical => "critical",
            CheckList::Warning => "warning",
        }
    }
}

/// Why a sweep is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sweep {
    Unexplained,
    /// Consul answers again after failed reads.
    Resync,
    Periodic,
}

/// What a catalog answer says.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct CatalogNews {
    /// Services that came, went or changed their tags.
    pub touched: BTreeSet<String>,
    /// A census is wanted now.
    pub census: bool,
    /// The catalog's index moved: an instance came, went or changed, somewhere.
    pub moved: bool,
}

type CheckMap = Arc<HashMap<CheckKey, CheckSeen>>;

/// A catalog change on its way to being explained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// Waiting for a check list to show a check that came or went at `index`, until `until`.
    Lists {
        since: Instant,
        until: Instant,
        index: u64,
    },
    /// A census was asked for: one read after `since` settles it; `until` bounds the wait.
    Census { since: Instant, until: Instant },
    /// Nothing explained it: a sweep.
    Sweep(Sweep),
}

/// What the caller is to do now (`Attribution::next`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Action {
    Census,
    Sweep(Sweep),
}

#[derive(Debug)]
pub(super) struct Attribution {
    census: Option<CheckMap>,
    lists: [Option<CheckMap>; 2],
    tags: Option<BTreeMap<String, Vec<String>>>,
    catalog_index: u64,
    pending: Option<Pending>,
    /// Indexes of the writes the lists showed registering an instance (its new check's
    /// `CreateIndex`) or deregistering one from maintenance (the index of the answer in
    /// which its maintenance check left: a deregistration removes the checks in the same
    /// write as the instance): a catalog change at exactly one of them is explained.
    listed: std::collections::VecDeque<u64>,
    /// A node's own check changed since `take_node_changed` was last asked.
    node_changed: std::cell::Cell<bool>,
    last_sweep: Instant,
}

impl Attribution {
    pub fn new(now: Instant) -> Attribution {
        Attribution {
            census: None,
            lists: [None, None],
            tags: None,
            catalog_index: 0,
            pending: None,
            listed: Default::default(),
            node_changed: std::cell::Cell::new(false),
            last_sweep: now,
        }
    }

    /// A catalog answer (the routed services and their tags): the services that came, went
    /// or changed their tags. An answer at a new index (an instance came or went, somewhere) that the
    /// check lists do not explain within `EXPLAIN_WITHIN` asks for a census (`next`).
    ///
    /// The first answer after failed reads (`recovered`) asks for a sweep: anything may have
    /// changed while Consul was away, and a Consul that restarted may even be back at the
    /// same index.
    pub fn catalog(
        &mut self,
        index: u64,
        tags: &BTreeMap<String, Vec<String>>,
        recovered: bool,
        now: Instant,
    ) -> CatalogNews {
        let before = std::mem::replace(&mut self.catalog_index, index);
        let moved = before != index;
        // An index gone backwards without a failed read (a restored snapshot, a server back
        // without its data) says as little about what changed as an outage does.
        let recovered = recovered || index < before;
        let Some(old) = self.tags.replace(tags.clone()) else {
            // The first: every service is read as its watch starts; the census is the
            // baseline the next ones are compared with.
            return CatalogNews {
                touched: BTreeSet::new(),
                census: true,
                moved: false,
            };
        };
        let mut news = CatalogNews {
            moved,
            ..CatalogNews::default()
        };
        if old != *tags {
            // Services that came, went or changed their tags. (One that went may still be
            // routed, held after a Consul lost its state: its watch reads what is left.)
            news.touched = tags
                .keys()
                .chain(old.keys())
                .filter(|name| old.get(*name) != tags.get(*name))
                .cloned()
                .collect();
        }
        if recovered {
            self.pending = Some(Pending::Sweep(Sweep::Resync));
        }
        // A change of tags explains the move.
        if moved && news.touched.is_empty() && !recovered {
            let listed = self.listed_at(index);
            self.pending = match self.pending {
                // A census already asked for must be read after this change too.
                Some(Pending::Census { until, .. }) => {
                    news.census = true;
                    Some(Pending::Census { since: now, until })
                }
                Some(Pending::Lists { until, .. }) => Some(Pending::Lists {
                    since: now,
                    until,
                    index,
                }),
                Some(Pending::Sweep(why)) => Some(Pending::Sweep(why)),
                None if listed => None,
                None => Some(Pending::Lists {
                    since: now,
                    until: now + EXPLAIN_WITHIN,
                    index,
                }),
            };
        }
        news
    }

    /// A census, every check in the datacenter: the services whose checks appeared,
    /// vanished or changed since the last one. A catalog change waiting for it is explained
    /// when a check came or went (an instance registered or deregistered with its checks);
    /// when none did, a sweep is due.
    pub fn census(&mut self, answer: &Checks) -> BTreeSet<String> {
        let (touched, came_or_went) = match self.census.replace(answer.checks.clone()) {
            Some(old) => {
                let new = &answer.checks;
                (self.diff(&old, new), came_or_went(&old, new))
            }
            // The first is a baseline: what it would explain, it cannot tell.
            None => (BTreeSet::new(), false),
        };
        if let Some(Pending::Lists { since, .. } | Pending::Census { since, .. }) = self.pending {
            if answer.began >= since {
                self.pending = (!came_or_went).then_some(Pending::Sweep(Sweep::Unexplained));
            }
        }
        touched
    }

    /// Whether a list answer showed an instance come or go at `index`.
    fn listed_at(&self, index: u64) -> bool {
        self.listed.contains(&index)
    }

    fn listed(&mut self, index: u64) {
        if index == 0 || self.listed_at(index) {
            return;
        }
        if self.listed.len() == LISTED_KEPT {
            self.listed.pop_front();
        }
        self.listed.push_back(index);
    }

    /// A critical or warning list: the services whose checks entered it, left it or
    /// changed in it. A check never seen before (in no census) that enters it is an
    /// instance registered failing; an instance's maintenance check that leaves it, an
    /// instance deregistered (the registrar puts instances in maintenance first). Either
    /// explains a catalog change at an index this answer covers. (Any other check that
    /// leaves a list may have recovered or left the catalog: only a census can tell.)
    pub fn status(&mut self, list: CheckList, answer: &Checks) -> BTreeSet<String> {
        let old = self.lists[list as usize].replace(answer.checks.clone());
        // The first answer after failed reads is a new baseline too: a check that entered
        // and left the list meanwhile (an instance registered failing that then passed)
        // shows in neither answer, and the services read before this one (the catalog's own
        // recovery asks for that) may have found it failing. They are read again after it.
        let old = old.filter(|_| !answer.recovered);
        let Some(old) = old else {
            // A list's first answer is only a baseline: a check that changed between a
            // service's read and this answer shows in neither. When the catalog answered
            // first, services may have been read before it (the lists failed at the start,
            // say): they are read again.
            if self.tags.is_some() {
                self.pending = Some(Pending::Sweep(Sweep::Resync));
            }
            return BTreeSet::new();
        };
        // A maintenance check is no registration: the instance was there before it.
        let registered: Vec<(&CheckKey, &CheckSeen)> = match self.census.as_deref() {
            Some(census) => answer
                .checks
                .iter()
                .filter(|(k, _)| {
                    !old.contains_key(*k)
                        && !census.contains_key(*k)
                        && !k.1.starts_with(MAINTENANCE)
                })
                .collect(),
            None => Vec::new(),
        };
        let deregistered: Vec<(String, String)> = old
            .keys()
            .filter(|k| !answer.checks.contains_key(*k))
            .filter_map(|(node, id)| {
                let instance = id.strip_prefix(MAINTENANCE)?;
                Some((node.clone(), instance.to_string()))
            })
            .collect();
        if !registered.is_empty() || !deregistered.is_empty() {
            let created: Vec<u64> = registered.iter().map(|(_, seen)| seen.created).collect();
            if let Some(census) = self.census.as_mut() {
                let census = Arc::make_mut(census);
                // The census learns of the new checks here, so that the next one sees them
                // go when their instance is deregistered; and forgets the checks of an
                // instance deregistered, so that the next one does not take their going
                // for a change it explains.
                for (key, seen) in registered {
                    census.insert(key.clone(), seen.clone());
                }
                for (node, instance) in &deregistered {
                    census.retain(|(n, _), seen| n != node || seen.instance != *instance);
                }
            }
            for index in created {
                self.listed(index);
            }
            if !deregistered.is_empty() {
                self.listed(answer.index);
            }
            if let Some(Pending::Lists { index, .. }) = self.pending {
                if self.listed_at(index) {
                    self.pending = None;
                }
            }
        }
        self.diff(&old, &answer.checks)
    }

    /// The services touched between two answers: by their own checks, and through their
    /// node's checks (which decide for every instance on the node: `passing` reads include
    /// them).
    fn diff(
        &self,
        old: &HashMap<CheckKey, CheckSeen>,
        new: &HashMap<CheckKey, CheckSeen>,
    ) -> BTreeSet<String> {
        let mut touched = BTreeSet::new();
        let mut nodes = BTreeSet::new();
        let mut mark = |(node, _): &CheckKey, seen: &CheckSeen| {
            if seen.service.is_empty() {
                nodes.insert(node.clone());
            } else {
                touched.insert(seen.service.clone());
            }
        };
        for (key, seen) in new {
            if old.get(key) != Some(seen) {
                mark(key, seen);
            }
        }
        for (key, seen) in old {
            if !new.contains_key(key) {
                mark(key, seen);
            }
        }
        if !nodes.is_empty() {
            // Instances without checks of their own depend on their node's checks too, and
            // no check names them: the caller reads the services it knows have such.
            self.node_changed.set(true);
            let census = self.census.iter().flat_map(|c| c.iter());
            for ((node, _), seen) in census.chain(old.iter()).chain(new.iter()) {
                if !seen.service.is_empty() && nodes.contains(node) {
                    touched.insert(seen.service.clone());
                }
            }
        }
        touched
    }

    /// Whether a node's own check changed since the last time this was asked.
    pub fn take_node_changed(&mut self) -> bool {
        self.node_changed.take()
    }

    /// When `next` has something to do: a wait for the lists or for a census is over, a
    /// sweep is due (not sooner than `SWEEP_GAP` after the last one), or the backstop.
    pub fn due(&self) -> Instant {
        let periodic = self.last_sweep + SWEEP_EVERY;
        let gap = self.last_sweep + SWEEP_GAP;
        match self.pending {
            Some(Pending::Lists { until, .. }) => until.min(periodic),
            Some(Pending::Census { until, .. }) => until.max(gap).min(periodic),
            Some(Pending::Sweep(_)) => gap.min(periodic),
            None => periodic,
        }
    }

    /// What to do at `now`, if anything: read a census, or sweep (and why). A sweep taken
    /// resets the timers.
    pub fn next(&mut self, now: Instant) -> Option<Action> {
        if now < self.due() {
            return None;
        }
        if let Some(Pending::Lists { since, .. }) = self.pending {
            if now < self.last_sweep + SWEEP_EVERY {
                self.pending = Some(Pending::Census {
                    since,
                    until: now + CENSUS_WITHIN,
                });
                return Some(Action::Census);
            }
        }
        let why = match self.pending.take() {
            Some(Pending::Sweep(why)) => why,
            Some(_) => Sweep::Unexplained,
            None => Sweep::Periodic,
        };
        self.last_sweep = now;
        Some(Action::Sweep(why))
    }
}

/// Whether a check is in one map and not the other.
fn came_or_went(old: &HashMap<CheckKey, CheckSeen>, new: &HashMap<CheckKey, CheckSeen>) -> bool {
    old.len() != new.len() || old.keys().any(|k| !new.contains_key(k))
}

#[cfg(test)]
mod tests {
    use super::*;

    type Row<'a> = (&'a str, &'a str, &'a str, &'a str);

    fn checks(index: u64, list: &[Row]) -> Checks {
        read_at(index, list, Instant::now())
    }

    fn read_at(index: u64, list: &[Row], began: Instant) -> Checks {
        Checks {
            index,
            began,
            recovered: false,
            checks: Arc::new(
                list.iter()
                    .map(|(node, id, service, status)| {
                        (
                            (node.to_string(), id.to_string()),
                            CheckSeen {
                                service: service.to_string(),
                                status: status.to_string(),
                                instance: id
                                    .trim_start_matches(MAINTENANCE)
                                    .trim_start_matches("c-")
                                    .to_string(),
                                // As if registered in this answer's write.
                                created: index,
                            },
                        )
                    })
                    .collect(),
            ),
        }
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn tags(list: &[(&str, &str)]) -> BTreeMap<String, Vec<String>> {
        list.iter()
            .map(|(name, tag)| (name.to_string(), vec![tag.to_string()]))
            .collect()
    }

    const BASE: [Row; 5] = [
        ("n1", "serfHealth", "", "passing"),
        ("n1", "c-web-1", "web", "passing"),
        ("n2", "serfHealth", "", "passing"),
        ("n2", "c-api-1", "api", "passing"),
        ("n2", "c-db-1", "db", "passing"),
    ];

    /// Past the first answers: a census of `BASE`, the catalog with `web`, no check failing.
    fn settled(t0: Instant) -> (Attribution, BTreeMap<String, Vec<String>>) {
        let mut a = Attribution::new(t0);
        let t = tags(&[("web", "lb.route=a/")]);
        a.status(CheckList::Critical, &checks(5, &[]));
        a.catalog(5, &t, false, t0);
        a.census(&read_at(5, &BASE, t0));
        (a, t)
    }

    #[test]
    fn status_lists_name_the_services_whose_checks_moved() {
        let t0 = Instant::now();
        let mut a = Attribution::new(t0);
        a.census(&checks(6, &BASE));
        let critical = CheckList::Critical;
        assert!(
            a.status(critical, &checks(6, &[])).is_empty(),
            "first answer"
        );
        // web fails, then recovers.
        let failing = [("n1", "c-web-1", "web", "critical")];
        assert_eq!(a.status(critical, &checks(7, &failing)), set(&["web"]));
        assert_eq!(a.status(critical, &checks(8, &[])), set(&["web"]));
        // n2's agent is gone: every service with a check on n2.
        let node = [("n2", "serfHealth", "", "critical")];
        assert_eq!(a.status(critical, &checks(9, &node)), set(&["api", "db"]));
        assert!(a.take_node_changed() && !a.take_node_changed());
        // The warning list is its own.
        assert!(a.status(CheckList::Warning, &checks(9, &[])).is_empty());
        assert!(a.listed.is_empty(), "no new check so far");
    }

    #[test]
    fn a_list_that_first_answers_after_the_catalog_asks_for_a_sweep() {
        let t0 = Instant::now();
        // The usual start: the lists answer before the catalog.
        let (mut a, _) = settled(t0);
        a.status(CheckList::Warning, &checks(5, &[]));
        assert_eq!(a.next(t0), None);
        // The lists failed at the start and answer after the catalog: services were read
        // before them, and a check that changed meanwhile would show in neither.
        let mut b = Attribution::new(t0);
        b.catalog(5, &tags(&[("web", "lb.route=a/")]), false, t0);
        b.census(&read_at(5, &BASE, t0));
        b.status(CheckList::Critical, &checks(6, &[]));
        assert_eq!(b.next(t0 + SWEEP_GAP), Some(Action::Sweep(Sweep::Resync)));
    }

    #[test]
    fn a_list_answering_again_after_failed_reads_asks_for_a_sweep() {
        let t0 = Instant::now();
        let (mut a, _) = settled(t0);
        // An instance registered failing passed while the list's reads failed: the answer
        // after them is the one before, and no service it names. Only a sweep after this
        // answer reads the instance passing.
        let mut again = checks(9, &[]);
        again.recovered = true;
        assert!(a.status(CheckList::Critical, &again).is_empty());
        assert_eq!(a.next(t0 + SWEEP_GAP), Some(Action::Sweep(Sweep::Resync)));
        // Read normally, the same list asks for nothing.
        let (mut b, _) = settled(t0);
        assert!(b.status(CheckList::Critical, &checks(9, &[])).is_empty());
        assert_eq!(b.next(t0 + SWEEP_GAP), None);
    }

    #[test]
    fn a_census_names_instances_that_came_or_went() {
        let t0 = Instant::now();
        let mut a = Attribution::new(t0);
        assert!(a.census(&checks(6, &BASE)).is_empty(), "first census");
        assert!(a.census(&checks(7, &BASE)).is_empty(), "same checks");
        let mut next = BASE.to_vec();
        next.push(("n1", "c-api-2", "api", "passing"));
        next.retain(|c| c.1 != "c-db-1");
        assert_eq!(a.census(&checks(8, &next)), set(&["api", "db"]));
    }

    #[test]
    fn a_catalog_change_is_explained_by_the_lists_a_census_or_a_sweep() {
        let t0 = Instant::now();
        let mut a = Attribution::new(t0);
        let t = tags(&[("web", "lb.route=a/"), ("api", "lb.route=b/")]);
        a.status(CheckList::Critical, &checks(5, &[]));
        let first = a.catalog(5, &t, false, t0);
        assert!(first.census, "the first answer wants the baseline census");
        a.census(&read_at(5, &BASE, t0));
        assert_eq!(a.due(), t0 + SWEEP_EVERY);
        // A timeout's answer at the same index: nothing.
        assert!(!a.catalog(5, &t, false, t0).moved);

        // An instance registered failing: the critical list explains it, no census.
        let t1 = t0 + Duration::from_secs(10);
        assert!(a.catalog(8, &t, false, t1).moved);
        assert_eq!(a.due(), t1 + EXPLAIN_WITHIN);
        let new = [("n1", "c-web-2", "web", "critical")];
        a.status(CheckList::Critical, &checks(7, &[]));
        assert_eq!(
            a.status(CheckList::Critical, &checks(8, &new)),
            set(&["web"])
        );
        assert_eq!(a.next(t1 + EXPLAIN_WITHIN), None);
        // In the other order too: the list first, then the catalog.
        let newer = [new[0], ("n1", "c-web-3", "web", "critical")];
        a.status(CheckList::Critical, &checks(9, &newer));
        a.catalog(9, &t, false, t1);
        assert_eq!(a.next(t1 + EXPLAIN_WITHIN), None);

        // An instance registered passing: the lists say nothing, a census is read, and it
        // explains the change.
        let t2 = t1 + Duration::from_secs(10);
        a.catalog(10, &t, false, t2);
        assert_eq!(a.next(t2), None, "waits for the lists");
        assert_eq!(a.next(t2 + EXPLAIN_WITHIN), Some(Action::Census));
        let mut more = BASE.to_vec();
        more.push(("n1", "c-web-4", "web", "passing"));
        assert_eq!(
            a.census(&read_at(10, &more, t2 + EXPLAIN_WITHIN)),
            set(&["web"])
        );
        assert_eq!(a.due(), t0 + SWEEP_EVERY);

        // A tag change names its service.
        let t3 = tags(&[("web", "lb.route=a/"), ("api", "lb.route=c/")]);
        assert_eq!(a.catalog(11, &t3, false, t2).touched, set(&["api"]));
        // A service that goes (or is held after a Consul lost its state) and comes back.
        let only_web = tags(&[("web", "lb.route=a/")]);
        assert_eq!(a.catalog(12, &only_web, false, t2).touched, set(&["api"]));
        assert_eq!(a.catalog(13, &t3, false, t2).touched, set(&["api"]));
        assert_eq!(a.next(t2 + EXPLAIN_WITHIN), None);

        // An instance without checks changes its port: the catalog moves, neither the lists
        // nor the census show anything, and one sweep follows, only one.
        let t4 = t2 + Duration::from_secs(5);
        a.catalog(14, &t3, false, t4);
        assert_eq!(a.next(t4 + EXPLAIN_WITHIN), Some(Action::Census));
        // A census read before the change settles nothing.
        a.census(&read_at(11, &more, t2));
        assert_eq!(a.next(t4 + EXPLAIN_WITHIN), None);
        a.census(&read_at(11, &more, t4 + EXPLAIN_WITHIN));
        let t5 = t4 + EXPLAIN_WITHIN;
        assert_eq!(a.next(t5), Some(Action::Sweep(Sweep::Unexplained)));
        assert_eq!(a.next(t5), None);

        // Another right after waits out the gap between sweeps; one whose census never
        // comes (Consul failing) is swept when the wait for it is over.
        a.catalog(15, &t3, false, t5);
        a.next(t5 + EXPLAIN_WITHIN);
        a.census(&read_at(11, &more, t5 + EXPLAIN_WITHIN));
        assert_eq!(a.due(), t5 + SWEEP_GAP);
        assert_eq!(
            a.next(t5 + SWEEP_GAP),
            Some(Action::Sweep(Sweep::Unexplained))
        );
        let t6 = t5 + Duration::from_secs(10);
        a.catalog(16, &t3, false, t6);
        assert_eq!(a.next(t6 + EXPLAIN_WITHIN), Some(Action::Census));
        assert_eq!(
            a.next(t6 + EXPLAIN_WITHIN + CENSUS_WITHIN),
            Some(Action::Sweep(Sweep::Unexplained))
        );

        // Back after failed reads: a sweep, even at the same index.
        let t7 = t6 + Duration::from_secs(10);
        a.catalog(16, &t3, true, t7);
        assert_eq!(a.next(t7), Some(Action::Sweep(Sweep::Resync)));
        // An index gone backwards, with no failed read: a sweep too, whatever the tags say.
        let t8 = t7 + Duration::from_secs(10);
        a.catalog(3, &only_web, false, t8);
        assert_eq!(a.next(t8), Some(Action::Sweep(Sweep::Resync)));

        // The backstop.
        let mut b = Attribution::new(t0);
        assert_eq!(
            b.next(t0 + SWEEP_EVERY),
            Some(Action::Sweep(Sweep::Periodic))
        );
        assert_eq!(b.due(), t0 + SWEEP_EVERY + SWEEP_EVERY);
    }

    #[test]
    fn by_index_a_slow_catalog_answer_is_explained_and_so_is_a_deregistration_from_maintenance() {
        let t0 = Instant::now();
        let (mut a, t) = settled(t0);
        // Registered failing at 6; the catalog's answer comes long after the list's.
        let new = [("n1", "c-web-2", "web", "critical")];
        assert_eq!(
            a.status(CheckList::Critical, &checks(6, &new)),
            set(&["web"])
        );
        let late = t0 + Duration::from_secs(1);
        assert!(a.catalog(6, &t, false, late).moved);
        assert_eq!(a.next(late + EXPLAIN_WITHIN), None, "explained, no census");
        // It passes (7), is put in maintenance (8) and deregistered (9): the maintenance
        // check leaving the list explains the catalog's move, whichever answers first.
        a.status(CheckList::Critical, &checks(7, &[]));
        let maintenance = [("n1", "_service_maintenance:web-2", "web", "critical")];
        assert_eq!(
            a.status(CheckList::Critical, &checks(8, &maintenance)),
            set(&["web"])
        );
        let t1 = late + Duration::from_secs(1);
        a.catalog(9, &t, false, t1);
        assert_eq!(
            a.status(CheckList::Critical, &checks(9, &[])),
            set(&["web"])
        );
        assert_eq!(a.next(t1 + EXPLAIN_WITHIN), None, "explained, no census");
        // A check that recovers explains nothing: a catalog change at its index (a passing
        // instance deregistered in the same answer) still asks for a census.
        let failing = [("n2", "c-api-1", "api", "critical")];
        a.status(CheckList::Critical, &checks(10, &failing));
        let t2 = t1 + Duration::from_secs(1);
        a.catalog(11, &t, false, t2);
        a.status(CheckList::Critical, &checks(11, &[]));
        assert_eq!(a.next(t2 + EXPLAIN_WITHIN), Some(Action::Census));
        // That census finds the passing instance gone; the instance deregistered from
        // maintenance was forgotten already, so it alone does not explain the change.
        let mut after = BASE.to_vec();
        after.retain(|c| c.1 != "c-db-1");
        assert_eq!(
            a.census(&read_at(11, &after, t2 + EXPLAIN_WITHIN)),
            set(&["db"])
        );
        assert_eq!(a.due(), t0 + SWEEP_EVERY);
    }

    #[test]
    fn an_instance_the_lists_saw_come_is_seen_going_by_the_census() {
        let t0 = Instant::now();
        let (mut a, t) = settled(t0);
        // Registered failing: the list explains it, no census is read.
        let new = [("n1", "c-web-2", "web", "critical")];
        a.catalog(6, &t, false, t0);
        a.status(CheckList::Critical, &checks(6, &new));
        assert_eq!(a.next(t0 + EXPLAIN_WITHIN), None);
        // It passes, then is deregistered: the census does not have it, and must still see
        // it go (else a sweep would read every service).
        a.status(CheckList::Critical, &checks(7, &[]));
        let t1 = t0 + Duration::from_secs(10);
        a.catalog(8, &t, false, t1);
        assert_eq!(a.next(t1 + EXPLAIN_WITHIN), Some(Action::Census));
        assert_eq!(
            a.census(&read_at(8, &BASE, t1 + EXPLAIN_WITHIN)),
            set(&["web"])
        );
        assert_eq!(a.due(), t0 + SWEEP_EVERY);
    }
}
