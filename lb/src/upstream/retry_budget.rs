//! The client's retry budget: retries as a share of requests, one atomic, no lock. It knows
//! nothing of why a request is retried.

use std::sync::atomic::{AtomicI64, Ordering};

/// Retries allowed as a share of requests, so that a failing fleet is not hit by a retry storm.
/// Balances are kept in thousandths of a retry in one atomic.
pub struct RetryBudget {
    balance: AtomicI64,
    deposit: i64,
}

const RETRY_COST: i64 = 1000;
const RETRY_RESERVE: i64 = 10 * RETRY_COST;
const RETRY_CAP: i64 = 100 * RETRY_COST;

impl RetryBudget {
    pub fn new(ratio: f64) -> RetryBudget {
        RetryBudget {
            balance: AtomicI64::new(RETRY_RESERVE),
            deposit: (ratio * RETRY_COST as f64) as i64,
        }
    }

    pub fn deposit(&self) {
        if self.deposit > 0 && self.balance.load(Ordering::Relaxed) < RETRY_CAP {
            self.balance.fetch_add(self.deposit, Ordering::Relaxed);
        }
    }

    pub fn withdraw(&self) -> bool {
        self.balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b >= RETRY_COST).then_some(b - RETRY_COST)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_budget_has_a_reserve_and_refills_from_requests() {
        let b = RetryBudget::new(0.5);
        for _ in 0..10 {
            assert!(b.withdraw());
        }
        assert!(!b.withdraw());
        b.deposit();
        b.deposit();
        assert!(b.withdraw());
        assert!(!b.withdraw());
    }
}
