//! Pacing for the Consul watch loops: a token bucket so a blocking query that keeps returning
//! early degrades to polling instead of a busy loop.

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
}
