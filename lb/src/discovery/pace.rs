//! Pacing for the Consul watch loops: a token bucket so a blocking query that keeps returning
//! early degrades to polling instead of a busy loop, and jittered exponential backoff on errors.

use std::time::Duration;

use tokio::time::Instant;

/// Token bucket: `burst` calls back to back, then `rate` per second.
pub struct Pace {
    tokens: f64,
    burst: f64,
    rate: f64,
    last: Instant,
}

impl Pace {
    pub fn new(rate: f64, burst: u32) -> Pace {
        Pace {
            tokens: f64::from(burst),
            burst: f64::from(burst),
            rate,
            last: Instant::now(),
        }
    }

    /// How long to wait before the next call may go out, taking its token.
    pub fn delay(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Duration::ZERO
        } else {
            let wait = (1.0 - self.tokens) / self.rate;
            self.tokens = 0.0;
            self.last = now + Duration::from_secs_f64(wait);
            Duration::from_secs_f64(wait)
        }
    }

    pub async fn acquire(&mut self) {
        let d = self.delay(Instant::now());
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
    }
}

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
    fn bucket_allows_burst_then_paces() {
        let t0 = Instant::now();
        let mut p = Pace::new(2.0, 2);
        assert_eq!(p.delay(t0), Duration::ZERO);
        assert_eq!(p.delay(t0), Duration::ZERO);
        assert_eq!(p.delay(t0), Duration::from_millis(500));
        // The wait was charged: right after it another call waits a full interval.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(p.delay(t1), Duration::from_millis(500));
        // After a long quiet spell the burst is back, but not more.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!(p.delay(t2), Duration::ZERO);
        assert_eq!(p.delay(t2), Duration::ZERO);
        assert!(p.delay(t2) > Duration::ZERO);
    }

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
