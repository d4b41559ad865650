//! Session affinity: consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam,
//! "Consistent Hashing with Bounded Loads", SODA 2018).
//!
//! Each backend owns points on a ring of 64-bit hashes, as many as its weight asks; a
//! request's key goes to the first backend clockwise from the key's hash. Adding a fourth
//! backend to three takes over about a quarter of the ring, so about a quarter of the sessions
//! move, and removing or ejecting one moves only its own. The bound: a backend whose
//! requests in flight would pass `factor` times its weight's share of the route's (this one
//! included) is passed over for the next on the ring, so no key, however hot, loads one
//! backend past that while others have room.
//!
//! Hashes are computed the same way by every lb process (FNV-1a, then a 64-bit finaliser), so
//! replicas agree on where a key goes without talking to each other.

use super::Route;

/// Ring points of a backend at the default weight (100); a weight of 1000 has ten times as
/// many. With 160 per backend, three backends' shares are within a few percent of a third.
const POINTS_PER_100: u32 = 160;

/// The ring of a sticky route: `(point, backend index)`, sorted by point.
pub type Ring = Box<[(u64, u32)]>;

/// A 64-bit hash that every lb computes alike: FNV-1a over the bytes, then the finaliser of
/// MurmurHash3 so that nearby inputs spread over the whole ring.
pub fn hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

fn mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The ring over backends identified by their addresses, with their weights.
pub fn ring<'a>(backends: impl Iterator<Item = (&'a str, u32)>) -> Ring {
    let mut points = Vec::new();
    for (i, (addr, weight)) in backends.enumerate() {
        let base = hash(addr.as_bytes());
        let n = (u64::from(POINTS_PER_100) * u64::from(weight.max(1)) / 100).max(1);
        for k in 0..n {
            points.push((mix(base ^ k.wrapping_mul(0x9e37_79b9_7f4a_7c15)), i as u32));
        }
    }
    points.sort_unstable();
    points.into_boxed_slice()
}

impl Route {
    /// The backend for a request keyed `key`, not yet tried: the first on the ring from the
    /// key's point that is not ejected and under its bound; else the first not ejected; else
    /// the first not tried (ejection never takes a route's last backends out of service).
    /// Backends on the node of one whose host went silent for this request come after all
    /// others.
    /// `factor_permille`: the bound's factor, 1,250 for 1.25.
    pub fn pick_affine(
        &self,
        key: u64,
        tried: &super::Tried,
        pin: super::Pin<'_>,
        factor_permille: u64,
    ) -> Option<usize> {
        let ring = &self.ring;
        if ring.is_empty() {
            return None;
        }
        let now = crate::time::now_ms();
        // The bound is over the backends this request may reach.
        let (mut load, mut weight) = (0u64, 0u64);
        for rb in self.backends.iter() {
            if pin.admits(rb) && !rb.backend.is_ejected(now) {
                load += rb.backend.in_flight() as u64;
                weight += u64::from(rb.weight);
            }
        }
        // A pin no backend answers to: nothing to walk the ring for (a client could make
        // every request walk it three times).
        if !self.backends.iter().any(|rb| pin.admits(rb)) {
            return None;
        }
        let start = ring.partition_point(|&(p, _)| p < key);
        let at = |step: usize| ring[(start + step) % ring.len()].1 as usize;
        let untried = |i: usize| !tried.contains(i) && pin.admits(&self.backends[i]);
        let usable = |i: usize| untried(i) && !self.backends[i].backend.is_ejected(now);
        // In flight < factor x (load + 1) x weight share, in integers.
        let under_bound = |i: usize| {
            let rb = &self.backends[i];
            (rb.backend.in_flight() as u64) * 1000 * weight
                < factor_permille * (load + 1) * u64::from(rb.weight)
        };
        let tiers = (&usable, &under_bound, &untried);
        // After a silent host, its node's other instances come last, as in `pick`.
        if tried.any_silent() {
            let elsewhere = |i: usize| !tried.on_silent_node(self, i);
            if let Some(i) = walk(ring.len(), &at, tiers, elsewhere) {
                return Some(i);
            }
        }
        walk(ring.len(), &at, tiers, |_| true)
    }
}

/// The first backend on the ring (`at(step)` for `steps` steps) that `ok` admits: usable and
/// under its bound, else usable, else untried. Generic, so that the common walk with
/// nothing more to admit costs what it did without the `ok` test.
fn walk(
    steps: usize,
    at: &impl Fn(usize) -> usize,
    (usable, under_bound, untried): (
        &impl Fn(usize) -> bool,
        &impl Fn(usize) -> bool,
        &impl Fn(usize) -> bool,
    ),
    ok: impl Fn(usize) -> bool,
) -> Option<usize> {
    let ring = || (0..steps).map(at);
    ring()
        .find(|&i| ok(i) && usable(i) && under_bound(i))
        .or_else(|| ring().find(|&i| ok(i) && usable(i)))
        .or_else(|| ring().find(|&i| ok(i) && untried(i)))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use switchyard_consul::tags::Sticky;

    use super::super::{BackendSpec, Pin, RoutingTable, Tried};
    use super::*;

    const SESSIONS: u64 = 10_000;

    fn table(addrs: &[&str]) -> RoutingTable {
        let backends = addrs
            .iter()
            .map(|a| BackendSpec {
                sticky: Some(Arc::new(Sticky::LbCookie("s".into()))),
                ..BackendSpec::for_tests("web", a, 100)
            })
            .collect();
        RoutingTable::for_tests(backends)
    }

    /// Where each of the sessions goes, by backend address.
    fn place(t: &RoutingTable, factor: u64) -> Vec<String> {
        let r = &t.routes[0];
        (0..SESSIONS)
            .map(|s| {
                let i = r
                    .pick_affine(hash(&s.to_le_bytes()), &Tried::default(), Pin::Lit, factor)
                    .unwrap();
                r.backends[i].spec.addr.to_string()
            })
            .collect()
    }

    fn moved(a: &[String], b: &[String]) -> f64 {
        a.iter().zip(b).filter(|(x, y)| x != y).count() as f64 / SESSIONS as f64
    }

    /// Scaling 3 -> 4 moves about a quarter of the sessions (all to the new backend), 4 -> 3
    /// and an ejection move only the leaving backend's own. Printed for BENCHMARKS.md.
    #[test]
    fn sessions_move_as_little_as_consistent_hashing_allows() {
        let three = table(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]);
        let four = table(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80"]);
        let (p3, p4) = (place(&three, 1250), place(&four, 1250));
        let up = moved(&p3, &p4);
        assert!(p3
            .iter()
            .zip(&p4)
            .all(|(a, b)| a == b || b == "10.0.0.4:80"));
        let own = p4.iter().filter(|a| *a == "10.0.0.4:80").count() as f64 / SESSIONS as f64;
        let down = moved(&p4, &p3);
        // Ejecting the fourth: only its own sessions go elsewhere.
        let s = crate::upstream::BackendSettings::for_tests();
        assert!(four.routes[0].backends[3]
            .backend
            .record_failure(&s, crate::metrics::UpstreamErrorKind::Connect));
        let ejected = place(&four, 1250);
        let eject = moved(&p4, &ejected);
        assert!(p4
            .iter()
            .zip(&ejected)
            .all(|(a, b)| a == b || a == "10.0.0.4:80"));
        println!(
            "sessions moved: 3->4 {up:.4}, 4->3 {down:.4}, one ejection {eject:.4} \
             (the fourth backend's own share: {own:.4})"
        );
        for f in [up, down, eject] {
            assert!((0.18..=0.32).contains(&f), "{f}");
        }
        assert_eq!(down, own);
        assert_eq!(eject, own);
    }

    /// A session whose backend's host went silent is retried on another node, while one is
    /// left; it falls back to the silent node's other backend only after that.
    #[test]
    fn a_retry_after_a_silent_host_leaves_its_node() {
        let backends = [
            ("10.0.0.1:80", "n1"),
            ("10.0.0.2:80", "n1"),
            ("10.0.0.3:80", "n2"),
        ]
        .map(|(a, node)| BackendSpec {
            node: node.into(),
            sticky: Some(Arc::new(Sticky::LbCookie("s".into()))),
            ..BackendSpec::for_tests("web", a, 100)
        });
        let t = RoutingTable::for_tests(backends.to_vec());
        let r = &t.routes[0];
        let node = |i: usize| &*r.backends[i].spec.node;
        let mut on_n1 = 0;
        for s in 0..1_000u64 {
            let key = hash(&s.to_le_bytes());
            let first = r
                .pick_affine(key, &Tried::default(), Pin::Lit, 1250)
                .unwrap();
            if node(first) != "n1" {
                continue;
            }
            on_n1 += 1;
            let mut tried = Tried::default();
            tried.push(first);
            tried.mark_silent(first);
            let retry = r.pick_affine(key, &tried, Pin::Lit, 1250).unwrap();
            assert_eq!(node(retry), "n2", "session {s}");
            tried.push(retry);
            let last = r.pick_affine(key, &tried, Pin::Lit, 1250).unwrap();
            assert!(node(last) == "n1" && last != first, "session {s}");
        }
        assert!(on_n1 > 300, "{on_n1}");
    }

    /// Under a skewed key distribution (Zipf, s = 1.1, over 1,000 keys; 10,000 requests held
    /// in flight), the bound keeps every backend within its factor of the average.
    #[test]
    fn a_hot_key_spills_past_the_bound() {
        let addrs = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80"];
        let keys = 1_000usize;
        let weights: Vec<f64> = (1..=keys).map(|k| 1.0 / (k as f64).powf(1.1)).collect();
        let total: f64 = weights.iter().sum();
        let mut rng = fastrand::Rng::with_seed(7);
        let draws: Vec<usize> = (0..SESSIONS)
            .map(|_| {
                let mut x = rng.f64() * total;
                weights
                    .iter()
                    .position(|w| {
                        x -= w;
                        x <= 0.0
                    })
                    .unwrap_or(keys - 1)
            })
            .collect();
        let mut report = Vec::new();
        for factor in [1250, 10_000] {
            let t = table(&addrs);
            let r = &t.routes[0];
            let mut load = [0u64; 4];
            for &k in &draws {
                let i = r
                    .pick_affine(hash(&k.to_le_bytes()), &Tried::default(), Pin::Lit, factor)
                    .unwrap();
                r.backends[i].backend.start_request();
                load[i] += 1;
            }
            let avg = SESSIONS as f64 / 4.0;
            let max = *load.iter().max().unwrap() as f64 / avg;
            report.push(format!(
                "factor {}: max/avg {max:.3} {load:?}",
                factor as f64 / 1000.0
            ));
            if factor == 1250 {
                assert!(max <= 1.25 + 4.0 / avg, "{load:?}");
            }
        }
        println!("skewed keys: {}", report.join("; "));
    }
}
