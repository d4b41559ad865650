//! What the registrar decided for each container it has looked at on its node, and why: the
//! answer to "why is (not) this container registered". `state` writes it as it decides and
//! writes; `admin` serves it. Plain data: knows neither Docker's API nor Consul's.
//!
//! Bounded: an entry per container that runs (at most `RUNNING_MAX`), and the last
//! `GONE_KEPT` that stopped.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde::Serialize;

/// Entries kept for containers that stopped or went away.
const GONE_KEPT: usize = 100;
/// Containers that run, at most: containers outside the registrar's scope leave only with
/// their event, which a lost event stream could miss.
const RUNNING_MAX: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// In Consul, as `service_id`.
    Registered,
    /// Not opted in or outside the registrar's scope, or opted in with labels that cannot be
    /// used (`reasons` says which and why).
    Skipped,
    /// Taken out of Consul (`reasons` says on which event, or by the reconcile).
    Deregistered,
}

/// One container's last decision.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub container: String,
    pub name: String,
    pub decision: Decision,
    pub reasons: Vec<String>,
    pub service: Option<String>,
    pub service_id: Option<String>,
    pub address: Option<String>,
    /// The instance's check, in words (`HTTP /health every 5s`, `TTL mirroring Docker's
    /// health`, `TCP every 5s`).
    pub check: Option<String>,
    /// Docker's health, for a container with a HEALTHCHECK.
    pub docker_health: Option<&'static str>,
    /// The last write to Consul for it and its result (`register: ok`,
    /// `register: failed: ...`, `deregister: ok`).
    pub consul: Option<String>,
    /// When the decision was made (milliseconds since the epoch).
    pub at_unix_ms: u64,
    /// Outside the registrar's scope (not opted in): the reconcile, which lists only the
    /// containers in scope, does not take such an entry for gone; its own event does.
    #[serde(skip)]
    pub out_of_scope: bool,
}

#[derive(Default)]
struct Entries {
    running: HashMap<String, Entry>,
    gone: VecDeque<Entry>,
}

#[derive(Default)]
pub struct Journal(Mutex<Entries>);

impl Journal {
    /// Records `entry` as the container's decision. The same registration decided again (a
    /// resync) keeps the result of its last Consul write.
    pub fn record(&self, mut entry: Entry) {
        let mut e = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = e.running.get(&entry.container) {
            if entry.consul.is_none() && old.service_id == entry.service_id {
                entry.consul = old.consul.clone();
            }
        }
        e.gone.retain(|g| g.container != entry.container);
        if e.running.len() >= RUNNING_MAX && !e.running.contains_key(&entry.container) {
            return;
        }
        e.running.insert(entry.container.clone(), entry);
    }

    /// Updates the container's entry, if there is one (among those that went too: the
    /// reconcile deregisters what no longer runs).
    pub fn update(&self, container: &str, f: impl FnOnce(&mut Entry)) {
        let mut e = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Entries { running, gone } = &mut *e;
        let entry = match running.get_mut(container) {
            Some(entry) => Some(entry),
            None => gone.iter_mut().rev().find(|g| g.container == container),
        };
        if let Some(entry) = entry {
            f(entry);
        }
    }

    /// The container no longer runs: its entry is kept among the last that went.
    pub fn gone(&self, container: &str) {
        let mut e = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = e.running.remove(container) {
            if e.gone.len() == GONE_KEPT {
                e.gone.pop_front();
            }
            e.gone.push_back(entry);
        }
    }

    /// Keeps as running only the containers in scope that `running` accepts (and those out
    /// of scope: their own event takes them out).
    pub fn retain_running(&self, running: impl Fn(&str) -> bool) {
        let ids: Vec<String> = {
            let e = self.0.lock().unwrap_or_else(|e| e.into_inner());
            e.running
                .values()
                .filter(|entry| !entry.out_of_scope && !running(&entry.container))
                .map(|entry| entry.container.clone())
                .collect()
        };
        for id in ids {
            self.gone(&id);
        }
    }

    /// Every entry, running containers first, each group by name.
    pub fn entries(&self) -> Vec<Entry> {
        let e = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut running: Vec<Entry> = e.running.values().cloned().collect();
        running.sort_by(|a, b| a.name.cmp(&b.name));
        running.extend(e.gone.iter().rev().cloned());
        running
    }
}

impl Entry {
    pub fn new(container: &str, name: &str, decision: Decision) -> Entry {
        Entry {
            container: container.to_string(),
            name: name.to_string(),
            decision,
            reasons: Vec::new(),
            service: None,
            service_id: None,
            address: None,
            check: None,
            docker_health: None,
            consul: None,
            at_unix_ms: switchyard_daemon::clock::unix_ms(),
            out_of_scope: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_entries_then_the_last_ones_gone_bounded() {
        let j = Journal::default();
        j.record(Entry::new("b", "web-b", Decision::Registered));
        j.record(Entry::new("a", "web-a", Decision::Skipped));
        j.update("a", |e| e.reasons.push("label switchyard.port: no".into()));
        let names: Vec<_> = j.entries().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["web-a", "web-b"]);
        j.gone("a");
        j.update("a", |e| e.decision = Decision::Deregistered);
        let e = j.entries();
        assert_eq!(
            (e[1].name.as_str(), e[1].decision),
            ("web-a", Decision::Deregistered)
        );
        for i in 0..GONE_KEPT + 5 {
            j.record(Entry::new(&i.to_string(), "x", Decision::Registered));
            j.gone(&i.to_string());
        }
        assert_eq!(j.entries().len(), 1 + GONE_KEPT);
        j.retain_running(|_| false);
        assert!(j
            .entries()
            .iter()
            .all(|e| e.container != "b" || e.decision == Decision::Registered));
        assert_eq!(j.entries().len(), GONE_KEPT);
    }

    #[test]
    fn a_container_out_of_scope_leaves_by_its_event_not_by_the_reconcile() {
        let j = Journal::default();
        let mut e = Entry::new("o", "other", Decision::Skipped);
        e.out_of_scope = true;
        j.record(e);
        j.retain_running(|_| false);
        assert_eq!(j.entries()[0].container, "o");
        j.gone("o");
        j.record(Entry::new("p", "p", Decision::Registered));
        assert_eq!(j.entries()[0].container, "p", "running first");
        assert_eq!(j.entries()[1].container, "o");
    }
}
