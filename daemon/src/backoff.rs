//! Exponential backoff with jitter for loops that retry a remote forever (Consul, Docker).

use std::time::Duration;

/// Exponential backoff with jitter: the n-th wait is uniform in [cap/2, cap] where
/// cap = min(max, base * 2^n). Half-jitter keeps a floor so a dead Consul is not hammered.
pub struct Backoff {
    attempt: u32,
    base: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            attempt: 0,
            base,
            max: max.max(base),
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let cap = self
            .base
            .saturating_mul(1 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = cap / 2;
        half + Duration::from_nanos(fastrand::u64(..=half.as_nanos() as u64))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn failing(&self) -> bool {
        self.attempt > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let waits: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        let caps = [100, 200, 400, 800, 1000, 1000, 1000, 1000];
        for (w, cap) in waits.iter().zip(caps) {
            let cap = Duration::from_millis(cap);
            assert!(
                *w >= cap / 2 && *w <= cap,
                "{w:?} outside [{:?}, {cap:?}]",
                cap / 2
            );
        }
        assert!(b.failing());
        b.reset();
        assert!(!b.failing());
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
