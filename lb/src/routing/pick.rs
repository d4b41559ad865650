//! Balancing picks over a route's backends: round robin, weighted, and power of two choices
//! by in-flight requests, skipping ejected and already-tried backends. Lock-free.

use std::sync::atomic::Ordering;

use super::{Pin, Route};
use crate::config::Balance;
use crate::time::now_ms;

/// Indices of backends already tried by this request; retries avoid them. A try that found
/// its backend's host silent also steers the next picks away from that node's other
/// instances: they share its fate, and a request should pay for one dead host at most.
#[derive(Default, Clone, Copy)]
pub struct Tried {
    idx: [usize; TRIED_MAX],
    len: u8,
    /// One bit per entry of `idx`: its host went silent.
    silent: u16,
}

/// Tries remembered per request; more are not avoided (a route of more backends whose
/// passes at a cap filled them).
const TRIED_MAX: usize = 12;
const _: () = assert!(TRIED_MAX <= u16::BITS as usize);

impl Tried {
    pub fn push(&mut self, i: usize) {
        if let Some(slot) = self.idx.get_mut(self.len as usize) {
            *slot = i;
            self.len += 1;
        }
    }
    /// Takes back the try of backend `i` just pushed (a pooled connection found closed).
    pub fn forget(&mut self, i: usize) {
        if let Some(last) = (self.len as usize).checked_sub(1) {
            if self.idx[last] == i {
                self.len -= 1;
                self.silent &= !(1 << last);
            }
        }
    }
    pub fn contains(&self, i: usize) -> bool {
        self.idx[..self.len as usize].contains(&i)
    }
    /// The try of backend `i` found its host silent: a connect that timed out or found no
    /// route, or a send its host stopped acknowledging.
    pub fn mark_silent(&mut self, i: usize) {
        if let Some(slot) = self.idx[..self.len as usize].iter().rposition(|&t| t == i) {
            self.silent |= 1 << slot;
        }
    }
    /// Some backend tried by this request found its host silent.
    pub(super) fn any_silent(&self) -> bool {
        self.silent != 0
    }
    /// Whether backend `i` of `route` is on the node of a backend whose host went silent.
    pub(super) fn on_silent_node(&self, route: &Route, i: usize) -> bool {
        let node = &route.backends[i].spec.node;
        (0..self.len as usize)
            .filter(|s| self.silent & (1 << s) != 0)
            .any(|s| route.backends[self.idx[s]].spec.node == *node)
    }
}

impl Route {
    /// Picks a backend not yet tried. Ejected backends are skipped while any other is left, so
    /// ejection never takes the last backends of a route out of service. After a try found
    /// its host silent, backends on that node are skipped while any untried backend on
    /// another node is left, even an ejected one.
    /// Only backends `pin` admits are picked.
    ///
    /// Dark backends come last in a route (see `build`): an unpinned pick runs over the lit
    /// ones alone, so a dark backend's place is not handed to its neighbour and the lit
    /// ones keep their even (or weighted) shares.
    pub fn pick(&self, balance: Balance, tried: &Tried, pin: Pin<'_>) -> Option<usize> {
        let n = match pin {
            Pin::Lit => self.lit,
            Pin::Version(_) => self.backends.len(),
        };
        if n == 0 {
            return None;
        }
        let now = now_ms();
        let admits = |i: usize| !tried.contains(i) && pin.admits(&self.backends[i]);
        if tried.any_silent() {
            let elsewhere = |i: usize| admits(i) && !tried.on_silent_node(self, i);
            if let Some(i) = self.pick_among(balance, n, now, elsewhere) {
                return Some(i);
            }
        }
        self.pick_among(balance, n, now, admits)
    }

    /// A pick among the first `n` backends that `ok` admits: one not ejected, else any.
    fn pick_among(
        &self,
        balance: Balance,
        n: usize,
        now: u64,
        ok: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let healthy = |i: usize| ok(i) && !self.backends[i].backend.is_ejected(now);
        self.pick_where(balance, n, &healthy)
            .or_else(|| self.pick_where(balance, n, &ok))
    }

    /// A pick among the first `n` backends.
    fn pick_where(&self, balance: Balance, n: usize, ok: &dyn Fn(usize) -> bool) -> Option<usize> {
        let probe = |start: usize| (0..n).map(|k| (start + k) % n).find(|&i| ok(i));
        match balance {
            Balance::RoundRobin => probe(self.next.fetch_add(1, Ordering::Relaxed) % n),
            Balance::Weighted => {
                let k = self.next.fetch_add(1, Ordering::Relaxed) as u64;
                probe(self.spread(k, n))
            }
            Balance::P2c => {
                let a = probe(self.weighted_random(n))?;
                let b = match probe(self.weighted_random(n)) {
                    Some(b) if b != a => b,
                    _ => match probe((a + 1) % n) {
                        Some(b) => b,
                        None => return Some(a),
                    },
                };
                // Compare in-flight per unit of weight without dividing.
                let load = |i: usize| self.backends[i].backend.in_flight() as u64;
                let w = |i: usize| u64::from(self.backends[i].weight);
                if load(b) * w(a) < load(a) * w(b) {
                    Some(b)
                } else {
                    Some(a)
                }
            }
        }
    }

    /// The weight of the first `n` backends.
    fn total_of(&self, n: usize) -> u64 {
        if n == self.backends.len() {
            self.total_weight
        } else {
            self.cumulative.get(n.wrapping_sub(1)).copied().unwrap_or(0)
        }
    }

    fn weighted_random(&self, n: usize) -> usize {
        if self.cumulative.is_empty() {
            fastrand::usize(..n)
        } else {
            self.index_of_weight(fastrand::u64(..self.total_of(n).max(1)))
        }
    }

    /// The k-th point of a golden-ratio sequence over the weight line of the first `n`
    /// backends: deterministic, spreads consecutive picks evenly and matches the weights
    /// exactly over many picks.
    fn spread(&self, k: u64, n: usize) -> usize {
        let x = k.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        if self.cumulative.is_empty() {
            ((u128::from(x) * n as u128) >> 64) as usize
        } else {
            let w = ((u128::from(x) * u128::from(self.total_of(n))) >> 64) as u64;
            self.index_of_weight(w)
        }
    }

    fn index_of_weight(&self, w: u64) -> usize {
        self.cumulative.partition_point(|&c| c <= w)
    }

    pub fn healthy_count(&self) -> usize {
        let now = now_ms();
        self.backends
            .iter()
            .filter(|b| !b.backend.is_ejected(now))
            .count()
    }
}
