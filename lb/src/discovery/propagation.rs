//! How long a change took from Docker to this lb's table. The registrar stamps when Docker
//! reported it ([`switchyard_consul::stamp`]); here each service's answer is compared with the
//! last one, to notice an instance that shows for the first time, starts to pass, or stops
//! passing, and the delay from its stamp is observed once the table that shows the change is
//! published. Knows Consul's entries and the metrics; not how tables are built.
//!
//! Only changes this lb could have seen happen are measured: none before its first table,
//! and no stamp from before it (an instance registered while the lb was down is not late).

use std::collections::HashMap;

use switchyard_consul::{stamp, ServiceEntry};

use crate::metrics::{Label, Metrics, Phase};

/// Services forgotten (no longer routed) remembered with when, at most: past it, the memory
/// starts again (a service coming back may then have one change measured from too long ago).
const FORGOTTEN_MAX: usize = 10_000;

/// What was last known of an instance: whether it passed, and the health and stop stamps
/// already seen (each measured once at most, however often the instance flaps).
#[derive(Clone, Copy, Default)]
struct Seen {
    passing: bool,
    healthy_at: Option<u64>,
    stopped_at: Option<u64>,
}

#[derive(Default)]
pub struct Propagation {
    /// Per service: its instances by (node, service ID), as last seen.
    services: HashMap<String, HashMap<(String, String), Seen>>,
    /// Services that stopped being routed, and when: a stamp from before is not measured
    /// when they come back.
    forgotten: HashMap<String, u64>,
    /// Changes seen and not yet in a published table, with their Docker time.
    pending: Vec<(Phase, u64)>,
    /// Passing instances that left without their stop being seen (deregistered before this
    /// lb read their maintenance): counted, not measured.
    missed: u64,
    /// When the first table was published (microseconds since the epoch).
    since_us: Option<u64>,
}

impl Propagation {
    /// A service's answer: notes what changed since the last one.
    pub fn service(&mut self, service: &str, entries: &[ServiceEntry]) {
        let mut before = self.services.remove(service).unwrap_or_default();
        let since = self
            .since_us
            .map(|s| s.max(self.forgotten.get(service).copied().unwrap_or(0)));
        let mut now = HashMap::with_capacity(entries.len());
        for e in entries {
            let key = (e.node.node.clone(), e.service.id.clone());
            let was = before.remove(&key);
            let passing = e.is_passing();
            let healthy_at = e.checks.iter().filter_map(|c| c.output_at).max();
            let stopped_at = e.checks.iter().filter_map(|c| c.notes_at).max();
            let seen = was.unwrap_or_default();
            if let Some(since) = since {
                let mut note = |phase: Phase, at: Option<u64>, already: Option<u64>| {
                    if let Some(at) = at.filter(|at| *at >= since && Some(*at) != already) {
                        self.pending.push((phase, at));
                    }
                };
                if was.is_none() {
                    let at = e.service.meta.get(stamp::META_STARTED_AT);
                    note(
                        Phase::Registered,
                        at.and_then(|v| stamp::parse_meta(v)),
                        None,
                    );
                }
                if passing && !seen.passing {
                    note(Phase::Healthy, healthy_at, seen.healthy_at);
                }
                if !passing && seen.passing {
                    note(Phase::Stopped, stopped_at, seen.stopped_at);
                }
            }
            let seen = Seen {
                passing,
                healthy_at: healthy_at.or(seen.healthy_at),
                stopped_at: stopped_at.or(seen.stopped_at),
            };
            now.insert(key, seen);
        }
        if self.since_us.is_some() {
            self.missed += before.values().filter(|s| s.passing).count() as u64;
        }
        if !now.is_empty() {
            self.services.insert(service.to_string(), now);
        }
    }

    /// Keeps the services still routed; the others are remembered as forgotten `now_us`.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool, now_us: u64) {
        let gone: Vec<String> = self.services.keys().filter(|n| !keep(n)).cloned().collect();
        for name in gone {
            if let Some(instances) = self.services.remove(&name) {
                if self.since_us.is_some() {
                    self.missed += instances.values().filter(|s| s.passing).count() as u64;
                }
            }
            if self.forgotten.len() >= FORGOTTEN_MAX {
                self.forgotten.clear();
            }
            self.forgotten.insert(name, now_us);
        }
    }

    /// A table showing every change noted so far is live at `now_us`: their delays are
    /// observed. The first one starts the measuring.
    pub fn published(&mut self, now_us: u64, metrics: &Metrics) {
        if self.since_us.is_none() {
            self.since_us = Some(now_us);
            self.pending.clear();
            return;
        }
        for _ in 0..std::mem::take(&mut self.missed) {
            metrics.propagation_missed.inc(Phase::Stopped);
        }
        for (phase, at) in self.pending.drain(..) {
            match now_us.checked_sub(at) {
                Some(us) => metrics.propagation[phase.index()].observe(us as f64 / 1e6),
                None => {
                    metrics.propagation_skew.inc(phase);
                    metrics
                        .propagation_skew_seconds
                        .set((at - now_us) as f64 / 1e6);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        id: &str,
        status: &str,
        started: Option<u64>,
        output: &str,
        notes: &str,
    ) -> ServiceEntry {
        let meta = match started {
            Some(at) => format!(r#"{{"{}": "{at}"}}"#, stamp::META_STARTED_AT),
            None => "{}".into(),
        };
        serde_json::from_str(&format!(
            r#"{{"Node": {{"Node": "n1", "Address": "10.0.0.1"}},
                "Service": {{"ID": "{id}", "Service": "web", "Address": "10.0.0.5", "Port": 80, "Meta": {meta}}},
                "Checks": [{{"CheckID": "serfHealth", "Status": "passing", "Output": "Agent alive"}},
                           {{"CheckID": "{id}:check", "Status": "{status}", "ServiceName": "web",
                             "Output": "{output}", "Notes": "{notes}"}}]}}"#
        ))
        .unwrap()
    }

    fn observed(m: &Metrics, phase: Phase) -> (u64, f64) {
        let h = &m.propagation[phase.index()];
        (h.get_sample_count(), h.get_sample_sum())
    }

    #[test]
    fn each_phase_is_measured_from_its_stamp_once_the_table_shows_it() {
        let m = Metrics::new();
        let mut p = Propagation::default();
        // Before the first table: nothing is measured, not even later stamps.
        p.service("web", &[entry("a", "passing", Some(5_000_000), "", "")]);
        p.published(10_000_000, &m);
        // Started at 11 s, seen at 11.25 s.
        p.service(
            "web",
            &[
                entry("a", "passing", Some(5_000_000), "", ""),
                entry(
                    "b",
                    "critical",
                    Some(11_000_000),
                    "Docker health: starting",
                    "",
                ),
            ],
        );
        p.published(11_250_000, &m);
        assert_eq!(observed(&m, Phase::Registered), (1, 0.25));
        // Healthy at 12 s, routed at 12.1 s; a second answer with no change adds nothing.
        let healthy = stamp::note("Docker health: healthy", 12_000_000);
        let both = [
            entry("a", "passing", Some(5_000_000), "", ""),
            entry("b", "passing", Some(11_000_000), &healthy, ""),
        ];
        p.service("web", &both);
        p.published(12_100_000, &m);
        p.service("web", &both);
        p.published(12_200_000, &m);
        let (n, sum) = observed(&m, Phase::Healthy);
        assert_eq!(n, 1);
        assert!((sum - 0.1).abs() < 1e-9, "{sum}");
        // Told to stop at 13 s (maintenance), unrouted at 13.05 s.
        let stopping = stamp::note("switchyard: kill", 13_000_000);
        p.service(
            "web",
            &[
                entry("a", "passing", Some(5_000_000), "", ""),
                entry("b", "critical", Some(11_000_000), &healthy, &stopping),
            ],
        );
        p.published(13_050_000, &m);
        let (n, sum) = observed(&m, Phase::Stopped);
        assert_eq!(n, 1);
        assert!((sum - 0.05).abs() < 1e-9, "{sum}");
        // Its deregistration measures nothing more.
        p.service("web", &[entry("a", "passing", Some(5_000_000), "", "")]);
        p.published(13_100_000, &m);
        assert_eq!(observed(&m, Phase::Stopped).0, 1);
    }

    #[test]
    fn a_stamp_ahead_of_the_clock_is_skew_not_a_delay() {
        let m = Metrics::new();
        let mut p = Propagation::default();
        p.published(10_000_000, &m);
        p.service("web", &[entry("a", "critical", Some(12_000_000), "", "")]);
        p.published(11_000_000, &m);
        assert_eq!(observed(&m, Phase::Registered).0, 0);
        assert_eq!(m.propagation_skew.get(Phase::Registered), 1);
        assert_eq!(m.propagation_skew_seconds.get(), 1.0);
    }

    #[test]
    fn a_stamp_is_measured_once_however_often_the_instance_flaps() {
        let m = Metrics::new();
        let mut p = Propagation::default();
        p.published(10_000_000, &m);
        let healthy = stamp::note("Docker health: healthy", 11_000_000);
        p.service("web", &[entry("a", "critical", None, "", "")]);
        p.service("web", &[entry("a", "passing", None, &healthy, "")]);
        p.published(11_100_000, &m);
        assert_eq!(observed(&m, Phase::Healthy).0, 1);
        // Its node flaps (or its TTL lapses while the registrar is away): back with the same
        // stamp, nothing new to measure.
        p.service("web", &[entry("a", "critical", None, &healthy, "")]);
        p.service("web", &[entry("a", "passing", None, &healthy, "")]);
        p.published(900_000_000, &m);
        assert_eq!(observed(&m, Phase::Healthy).0, 1);
        // Leaves without its stop seen: counted as missed.
        p.service("web", &[]);
        p.published(900_100_000, &m);
        assert_eq!(m.propagation_missed.get(Phase::Stopped), 1);
    }

    #[test]
    fn a_service_routed_again_is_not_measured_from_before() {
        let m = Metrics::new();
        let mut p = Propagation::default();
        p.published(10_000_000, &m);
        p.service("api", &[entry("x", "passing", Some(11_000_000), "", "")]);
        p.published(11_000_100, &m);
        assert_eq!(observed(&m, Phase::Registered).0, 1);
        p.retain(|_| false, 12_000_000);
        // Routed again an hour later: the same instance is not an hour late.
        p.service("api", &[entry("x", "passing", Some(11_000_000), "", "")]);
        p.published(3_612_000_000, &m);
        assert_eq!(observed(&m, Phase::Registered).0, 1);
    }

    #[test]
    fn an_instance_registered_before_the_first_table_is_not_late() {
        let m = Metrics::new();
        let mut p = Propagation::default();
        p.published(10_000_000, &m);
        // A service first answering after the first table, registered before it.
        p.service("api", &[entry("x", "passing", Some(9_000_000), "", "")]);
        p.published(10_500_000, &m);
        assert_eq!(observed(&m, Phase::Registered).0, 0);
        assert_eq!(observed(&m, Phase::Healthy).0, 0);
    }
}
