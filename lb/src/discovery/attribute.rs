//! Which routed services a change in Consul touched. The lb holds two blocking queries on
//! Consul whatever the number of services, the catalog's service list (names and tags) and
//! every check's state (`/v1/health/state/any`); this module compares each answer with the
//! last one and names the services to read again. Knows nothing of HTTP or routing tables.
//!
//! What neither answer shows: a change to an instance's registration (its port, say) that
//! leaves its service's tags and its checks as they were moves the catalog's index and
//! nothing else. A catalog answer at an index that no change of checks explains therefore
//! asks for a sweep, every routed service read again, and so does a slow backstop timer,
//! for such a change that arrives in one answer with an explained one.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a catalog change waits for the checks' answer at the same index before it counts
/// as unexplained: both blocking queries wake on the same write, milliseconds apart.
const EXPLAIN_WITHIN: Duration = Duration::from_millis(100);
/// Sweeps at most this often: a Consul where unexplained changes keep coming is read in
/// full once a second, not once per change.
const SWEEP_GAP: Duration = Duration::from_secs(1);
/// The backstop: every routed service is read again this often.
pub(super) const SWEEP_EVERY: Duration = Duration::from_secs(300);
/// Indices at which checks changed, kept to explain a catalog answer that comes later.
const EXPLAINED_KEPT: usize = 64;

/// A check's identity: its node and its check ID (IDs are unique per node only).
pub(super) type CheckKey = (String, String);

/// What the lb needs of one check: whose it is and whether it changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct CheckSeen {
    /// Empty for a node's own checks.
    pub service: String,
    pub status: String,
    pub modify_index: u64,
}

/// One answer of the checks' blocking query.
#[derive(Debug, Clone)]
pub(super) struct Checks {
    pub index: u64,
    pub checks: Arc<HashMap<CheckKey, CheckSeen>>,
}

/// An answer is news when its index moved, even if no check did: a catalog change at that
/// index may be waiting for it.
impl PartialEq for Checks {
    fn eq(&self, other: &Self) -> bool {
        self.index == other.index
            && (Arc::ptr_eq(&self.checks, &other.checks) || self.checks == other.checks)
    }
}

/// Why a sweep is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sweep {
    Unexplained,
    Periodic,
}

#[derive(Debug)]
pub(super) struct Attribution {
    checks: Option<Arc<HashMap<CheckKey, CheckSeen>>>,
    tags: Option<BTreeMap<String, Vec<String>>>,
    catalog_index: u64,
    /// Indices at which a change of checks touched a service, most recent last.
    explained: VecDeque<u64>,
    /// A catalog change nothing explained yet, and until when to wait for its explanation.
    pending: Option<(u64, Instant)>,
    last_sweep: Instant,
}

impl Attribution {
    pub fn new(now: Instant) -> Attribution {
        Attribution {
            checks: None,
            tags: None,
            catalog_index: 0,
            explained: VecDeque::new(),
            pending: None,
            last_sweep: now,
        }
    }

    /// A checks answer: the services whose checks appeared, vanished or changed, and every
    /// service with a check on a node whose own check did. The first answer touches nothing:
    /// every service is read when its watch starts.
    pub fn checks(&mut self, answer: &Checks) -> BTreeSet<String> {
        let new = &answer.checks;
        let Some(old) = self.checks.replace(new.clone()) else {
            return BTreeSet::new();
        };
        let mut touched = BTreeSet::new();
        let mut nodes = BTreeSet::new();
        let mut mark = |(node, _): &CheckKey, seen: &CheckSeen| {
            if seen.service.is_empty() {
                nodes.insert(node.clone());
            } else {
                touched.insert(seen.service.clone());
            }
        };
        for (key, seen) in new.iter() {
            if old.get(key) != Some(seen) {
                mark(key, seen);
            }
        }
        for (key, seen) in old.iter() {
            if !new.contains_key(key) {
                mark(key, seen);
            }
        }
        if !nodes.is_empty() {
            // A node's own check (its agent gone, maintenance) decides for every instance on
            // it, which `passing` reads include.
            for ((node, _), seen) in old.iter().chain(new.iter()) {
                if !seen.service.is_empty() && nodes.contains(node) {
                    touched.insert(seen.service.clone());
                }
            }
        }
        if !touched.is_empty() || !nodes.is_empty() {
            if self.explained.len() == EXPLAINED_KEPT {
                self.explained.pop_front();
            }
            self.explained.push_back(answer.index);
            if self.pending.is_some_and(|(index, _)| index == answer.index) {
                self.pending = None;
            }
        }
        touched
    }

    /// A catalog answer (the routed services and their tags): the services that stayed and
    /// whose tags changed. An answer at a new index that changes no service's tags, and that
    /// no change of checks explains, is pending: a sweep follows unless the checks' answer at
    /// the same index comes first.
    pub fn catalog(
        &mut self,
        index: u64,
        tags: &BTreeMap<String, Vec<String>>,
        now: Instant,
    ) -> BTreeSet<String> {
        let moved = std::mem::replace(&mut self.catalog_index, index) != index;
        let Some(old) = self.tags.replace(tags.clone()) else {
            return BTreeSet::new();
        };
        if old == *tags {
            if moved && !self.explained.contains(&index) {
                self.pending = Some((index, now + EXPLAIN_WITHIN));
            }
            return BTreeSet::new();
        }
        tags.iter()
            .filter(|(name, t)| old.get(*name).is_some_and(|o| o != *t))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// When the next sweep is due: a pending change's wait is over (but not sooner than
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

    fn checks(index: u64, list: &[(&str, &str, &str, &str, u64)]) -> Checks {
        Checks {
            index,
            checks: Arc::new(
                list.iter()
                    .map(|(node, id, service, status, modify)| {
                        (
                            (node.to_string(), id.to_string()),
                            CheckSeen {
                                service: service.to_string(),
                                status: status.to_string(),
                                modify_index: *modify,
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

    #[test]
    fn checks_touch_their_service_and_node_checks_touch_the_node() {
        let t0 = Instant::now();
        let mut a = Attribution::new(t0);
        let base = [
            ("n1", "serfHealth", "", "passing", 1),
            ("n1", "c-web-1", "web", "passing", 5),
            ("n2", "serfHealth", "", "passing", 1),
            ("n2", "c-api-1", "api", "passing", 6),
            ("n2", "c-db-1", "db", "passing", 6),
        ];
        assert!(a.checks(&checks(6, &base)).is_empty(), "first answer");
        // Same checks at a later index (a write elsewhere): nothing.
        assert!(a.checks(&checks(7, &base)).is_empty());
        // web's check fails; a new instance of api comes with its check.
        let mut next = base.to_vec();
        next[1] = ("n1", "c-web-1", "web", "critical", 8);
        next.push(("n1", "c-api-2", "api", "passing", 8));
        assert_eq!(a.checks(&checks(8, &next)), set(&["web", "api"]));
        // db's check vanishes (deregistered).
        next.retain(|c| c.1 != "c-db-1");
        assert_eq!(a.checks(&checks(9, &next)), set(&["db"]));
        // n2's agent is gone: everything with a check on n2.
        let n2 = next.iter().position(|c| c.0 == "n2").unwrap();
        next[n2] = ("n2", "serfHealth", "", "critical", 10);
        assert_eq!(a.checks(&checks(10, &next)), set(&["api"]));
    }

    #[test]
    fn an_unexplained_catalog_change_asks_for_one_sweep() {
        let t0 = Instant::now();
        let mut a = Attribution::new(t0);
        let base = [("n1", "c-web-1", "web", "passing", 5)];
        a.checks(&checks(5, &base));
        let t = tags(&[("web", "lb.route=a/"), ("api", "lb.route=b/")]);
        assert!(a.catalog(5, &t, t0).is_empty(), "first answer");
        assert_eq!(a.due(), t0 + SWEEP_EVERY);

        // A new instance of web with its check: the catalog and the checks move together,
        // in either order; no sweep.
        let t1 = t0 + Duration::from_secs(10);
        assert!(a.catalog(8, &t, t1).is_empty());
        assert_eq!(a.due(), t1 + EXPLAIN_WITHIN);
        let more = [base[0], ("n1", "c-web-2", "web", "passing", 8)];
        assert_eq!(a.checks(&checks(8, &more)), set(&["web"]));
        assert_eq!(a.due(), t0 + SWEEP_EVERY);
        let even_more = [more[0], more[1], ("n1", "c-web-3", "web", "passing", 9)];
        a.checks(&checks(9, &even_more));
        assert!(a.catalog(9, &t, t1).is_empty());
        assert_eq!(a.sweep(t1 + Duration::from_secs(1)), None);

        // A tag change names its service.
        let t2 = tags(&[("web", "lb.route=a/"), ("api", "lb.route=c/")]);
        assert_eq!(a.catalog(10, &t2, t1), set(&["api"]));

        // An instance without checks changes its port: only the catalog moves. Nothing
        // explains it, so one sweep follows, and only one.
        let t3 = t1 + Duration::from_secs(5);
        assert!(a.catalog(11, &t2, t3).is_empty());
        assert_eq!(a.sweep(t3), None, "waits for the checks");
        assert_eq!(a.sweep(t3 + EXPLAIN_WITHIN), Some(Sweep::Unexplained));
        assert_eq!(a.sweep(t3 + EXPLAIN_WITHIN), None);

        // Another right after waits out the gap between sweeps.
        let t4 = t3 + EXPLAIN_WITHIN + Duration::from_millis(10);
        a.catalog(12, &t2, t4);
        assert_eq!(a.due(), t3 + EXPLAIN_WITHIN + SWEEP_GAP);

        // The backstop.
        let mut b = Attribution::new(t0);
        assert_eq!(b.sweep(t0 + SWEEP_EVERY), Some(Sweep::Periodic));
        assert_eq!(b.due(), t0 + SWEEP_EVERY + SWEEP_EVERY);
    }
}
