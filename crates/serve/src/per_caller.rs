//! A request allowance per caller (a token's subject): `burst` requests at once, refilled at
//! `per_second`, with governor's keyed GCRA limiter. One caller spending its allowance slows
//! nobody else.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Debug)]
pub struct PerCallerLimit {
    limiter: governor::DefaultKeyedRateLimiter<String>,
    checks: AtomicU64,
}

/// Every this many checks, callers whose allowance is whole again are forgotten, which bounds
/// the memory a flood of distinct callers can take.
const FORGET_EVERY: u64 = 10_000;

impl PerCallerLimit {
    /// `per_second` must be positive and `burst` at least one (the services' configuration
    /// checks both); anything else is clamped to the slowest allowance.
    pub fn new(per_second: f64, burst: u32) -> Self {
        let period = Duration::try_from_secs_f64(1.0 / per_second).unwrap_or(Duration::MAX);
        let quota = governor::Quota::with_period(period)
            .unwrap_or_else(|| governor::Quota::per_second(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
        Self {
            limiter: governor::RateLimiter::keyed(quota),
            checks: AtomicU64::new(0),
        }
    }

    /// Takes one request from `caller`'s allowance; `false` when it is spent.
    pub fn allow(&self, caller: &str) -> bool {
        let checks = self.checks.fetch_add(1, Ordering::Relaxed);
        if checks % FORGET_EVERY == FORGET_EVERY - 1 {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
        self.limiter.check_key(&caller.to_owned()).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allowance_is_per_caller() {
        let limit = PerCallerLimit::new(0.0001, 2);
        assert!(limit.allow("a"));
        assert!(limit.allow("a"));
        assert!(!limit.allow("a"), "a's burst is spent");
        assert!(limit.allow("b"), "b is not slowed by a");
    }

    #[test]
    fn a_spent_allowance_refills_over_time() {
        let limit = PerCallerLimit::new(50.0, 1);
        assert!(limit.allow("a"));
        assert!(!limit.allow("a"));
        std::thread::sleep(Duration::from_millis(60));
        assert!(limit.allow("a"), "one request back after 1/50 s");
    }
}
