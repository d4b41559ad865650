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
//!   deregistered, but does not say which. Each such answer asks for a census, every check in
//!   the datacenter (`/v1/health/state/any`), read once and compared with the last census: an
//!   instance with a check that came or went names its service. The census is what costs
//!   Consul (about 8 MB at 20,000 checks), so it follows the catalog and is spaced by its own
//!   cost (`watches`).
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct CheckSeen {
    /// Empty for a node's own checks.
    pub service: String,
    pub status: String,
}

/// One answer of a checks read.
#[derive(Debug, Clone)]
pub(super) struct Checks {
    pub index: u64,
    pub checks: Arc<HashMap<CheckKey, CheckSeen>>,
    /// When the read began: a census explains the catalog changes seen before then. (Its
    /// index cannot say: it is the checks' index, which a change without checks leaves.)
    pub began: Instant,
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
    Periodic,
}

/// What a catalog answer says.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct CatalogNews {
    /// Services that stayed and whose tags changed.
    pub touched: BTreeSet<String>,
    /// Instances may have come or gone: a census is wanted.
    pub census: bool,
}

type CheckMap = Arc<HashMap<CheckKey, CheckSeen>>;

#[derive(Debug)]
pub(super) struct Attribution {
    census: Option<CheckMap>,
    lists: [Option<CheckMap>; 2],
    tags: Option<BTreeMap<String, Vec<String>>>,
    catalog_index: u64,
    /// A catalog change that waits for a census read after it (since when, and until when).
    pending: Option<(Instant, Instant)>,
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
            last_sweep: now,
        }
    }

    /// A catalog answer (the routed services and their tags). Every answer at a new index
    /// wants a census; one that changes no service's tags waits for it to be explained.
    pub fn catalog(
        &mut self,
        index: u64,
        tags: &BTreeMap<String, Vec<String>>,
        now: Instant,
    ) -> CatalogNews {
        let moved = std::mem::replace(&mut self.catalog_index, index) != index;
        let Some(old) = self.tags.replace(tags.clone()) else {
            // The first: every service is read as its watch starts; the census is the
            // baseline the next ones are compared with.
            return CatalogNews {
                touched: BTreeSet::new(),
                census: true,
            };
        };
        if old == *tags {
            if moved {
                // The census must be read after the latest such change; the wait runs from
                // the first.
                let until = self.pending.map_or(now + CENSUS_WITHIN, |(_, until)| until);
                self.pending = Some((now, until));
            }
            return CatalogNews {
                touched: BTreeSet::new(),
                census: moved,
            };
        }
        CatalogNews {
            touched: tags
                .iter()
                .filter(|(name, t)| old.get(*name).is_some_and(|o| o != *t))
                .map(|(name, _)| name.clone())
                .collect(),
            census: true,
        }
    }

    /// A census, every check in the datacenter: the services whose checks appeared,
    /// vanished or changed since the last one. A catalog change waiting for it is explained
    /// when a check came or went (an instance registered or deregistered with its checks);
    /// when none did, the sweep is due.
    pub fn census(&mut self, answer: &Checks, now: Instant) -> BTreeSet<String> {
        let (touched, came_or_went) = match self.census.replace(answer.checks.clone()) {
            Some(old) => {
                let new = &answer.checks;
                let came_or_went =
                    old.len() != new.len() || old.keys().any(|k| !new.contains_key(k));
                (self.diff(&old, new), came_or_went)
            }
            None => (BTreeSet::new(), true),
        };
        if let Some((since, _)) = self.pending {
            if answer.began >= since {
                self.pending = if came_or_went {
                    None
                } else {
                    Some((since, now))
                };
            }
        }
        touched
    }

    /// A critical or warning list: the services whose checks entered it, left it or
    /// changed in it.
    pub fn status(&mut self, list: CheckList, answer: &Checks) -> BTreeSet<String> {
        match self.lists[list as usize].replace(answer.checks.clone()) {
            Some(old) => self.diff(&old, &answer.checks),
            None => BTreeSet::new(),
        }
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
            let census = self.census.iter().flat_map(|c| c.iter());
            for ((node, _), seen) in census.chain(old.iter()).chain(new.iter()) {
                if !seen.service.is_empty() && nodes.contains(node) {
                    touched.insert(seen.service.clone());
                }
            }
        }
        touched
    }

    /// When the next sweep is due: a catalog change went unexplained (but not sooner than
    /// `SWEEP_GAP` after the last sweep), or the backstop.
    pub fn due(&self) -> Instant {
        let periodic = self.last_sweep + SWEEP_EVERY;
        match self.pending {
            Some((_, until)) => until.max(self.last_sweep + SWEEP_GAP).min(periodic),
            None => periodic,
        }
    }

    /// Whether a sweep is due at `now`, and why; a sweep taken resets the timers.
    pub fn sweep(&mut self, now: Instant) -> Option<Sweep> {
        if now < self.due() {
            return None;
        }
        let why = if self.pending.take().is_some() {
            Sweep::Unexplained
        } else {
            Sweep::Periodic
        };
        self.last_sweep = now;
        Some(why)
    }
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
            checks: Arc::new(
                list.iter()
                    .map(|(node, id, service, status)| {
                        (
                            (node.to_string(), id.to_string()),
                            CheckSeen {
                                service: service.to_string(),
                                status: status.to_string(),
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

    #[test]
    fn status_lists_name_the_services_whose_checks_moved() {
        let t0 = Instant::now();
        let mut a = Attribution::new(t0);
        a.census(&checks(6, &BASE), t0);
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
        // The warning list is its own.
        assert!(a.status(CheckList::Warning, &checks(9, &[])).is_empty());
    }

    #[test]
    fn a_census_names_instances_that_came_or_went() {
        let t0 = Instant::now();
        let mut a = Attribution::new(t0);
        assert!(a.census(&checks(6, &BASE), t0).is_empty(), "first census");
        assert!(a.census(&checks(7, &BASE), t0).is_empty(), "same checks");
        let mut next = BASE.to_vec();
        next.push(("n1", "c-api-2", "api", "passing"));
        next.retain(|c| c.1 != "c-db-1");
        assert_eq!(a.census(&checks(8, &next), t0), set(&["api", "db"]));
    }

    #[test]
    fn a_catalog_change_no_census_explains_asks_for_one_sweep() {
        let t0 = Instant::now();
        let mut a = Attribution::new(t0);
        let t = tags(&[("web", "lb.route=a/"), ("api", "lb.route=b/")]);
        assert_eq!(
            a.catalog(5, &t, t0),
            CatalogNews {
                touched: set(&[]),
                census: true
            },
            "the first answer wants the baseline census"
        );
        a.census(&checks(5, &BASE), t0);
        assert_eq!(a.due(), t0 + SWEEP_EVERY);
        // A timeout's answer at the same index: nothing.
        assert!(!a.catalog(5, &t, t0).census);

        // A new instance of web with its check: the census explains the catalog's change.
        let t1 = t0 + Duration::from_secs(10);
        assert!(a.catalog(8, &t, t1).census);
        assert_eq!(a.due(), t1 + CENSUS_WITHIN);
        let mut more = BASE.to_vec();
        more.push(("n1", "c-web-2", "web", "passing"));
        assert_eq!(a.census(&read_at(8, &more, t1), t1), set(&["web"]));
        assert_eq!(a.due(), t0 + SWEEP_EVERY);

        // A tag change names its service.
        let t2 = tags(&[("web", "lb.route=a/"), ("api", "lb.route=c/")]);
        assert_eq!(a.catalog(10, &t2, t1).touched, set(&["api"]));

        // An instance without checks changes its port: the catalog moves, the census shows
        // nothing, and one sweep follows, only one.
        let t3 = t1 + Duration::from_secs(5);
        assert!(a.catalog(11, &t2, t3).census);
        assert_eq!(a.sweep(t3), None, "waits for the census");
        // A census read before the change settles nothing.
        a.census(&read_at(10, &more, t1), t3);
        assert_eq!(a.sweep(t3), None);
        a.census(&read_at(10, &more, t3), t3);
        assert_eq!(a.sweep(t3), Some(Sweep::Unexplained));
        assert_eq!(a.sweep(t3), None);

        // Another right after waits out the gap between sweeps; one whose census never
        // comes (Consul failing) is swept when the wait for it is over.
        let t4 = t3 + Duration::from_millis(10);
        a.catalog(12, &t2, t4);
        a.census(&read_at(10, &more, t4), t4);
        assert_eq!(a.due(), t3 + SWEEP_GAP);
        a.sweep(t3 + SWEEP_GAP);
        let t5 = t3 + Duration::from_secs(10);
        a.catalog(13, &t2, t5);
        assert_eq!(a.sweep(t5 + CENSUS_WITHIN), Some(Sweep::Unexplained));

        // The backstop.
        let mut b = Attribution::new(t0);
        assert_eq!(b.sweep(t0 + SWEEP_EVERY), Some(Sweep::Periodic));
        assert_eq!(b.due(), t0 + SWEEP_EVERY + SWEEP_EVERY);
    }
}
