//! How much each transaction carries, and how long the mirror waits between transactions.
//!
//! A transaction must be acknowledged within the producer's timeouts, so its size follows
//! time, not bytes alone: it carries what the link sends in `transaction_duration` (5 s by
//! default), as measured on the transactions that filled their budget, and never more than
//! `bandwidth` allows in that time. The budget is bounded below by [`MIN_BUDGET`] and above
//! by `transaction_size`; it shrinks to a quarter after a transaction that failed (a time-out
//! is the usual cause on a slow link, and a smaller one costs little), and grows back, at
//! most doubling per transaction, as full transactions commit within their time.
//!
//! The `bandwidth` cap is a token bucket charged with each committed transaction's bytes: the
//! mirror waits after a transaction until the bucket allows the next, so an open transaction
//! never waits on the cap (which would let it outlast its time-out).

#![deny(clippy::expect_used, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

/// The smallest transaction budget: below this the per-transaction overhead dominates.
pub(crate) const MIN_BUDGET: usize = 64 * 1024;
/// The first budget without a cap or a measurement: drains a fast link's backlog in a few
/// transactions before the first measurement, and takes 8 s on a 512 KiB/s link.
const FIRST_BUDGET: usize = 4 * 1024 * 1024;

/// Sizes transactions and spaces them; lives as long as the mirror (across sessions), so a
/// new session starts from what the last one learnt.
#[derive(Debug)]
pub(crate) struct Pacer {
    target: Duration,
    max: usize,
    budget: usize,
    bandwidth: Option<Bandwidth>,
}

impl Pacer {
    /// A pacer of transactions that take `target`, of at most `max` bytes, at most
    /// `bandwidth` bytes per second on average.
    pub(crate) fn new(target: Duration, max: usize, bandwidth: Option<u64>) -> Pacer {
        let max = max.max(MIN_BUDGET);
        let mut pacer = Pacer {
            target,
            max,
            budget: FIRST_BUDGET,
            bandwidth: bandwidth.map(Bandwidth::new),
        };
        pacer.budget = pacer.bounded(FIRST_BUDGET as f64);
        pacer
    }

    /// Record bytes the next transaction may carry.
    pub(crate) fn budget(&self) -> usize {
        self.budget
    }

    /// `bytes` within the bounds and within what the cap allows in the target time.
    fn bounded(&self, bytes: f64) -> usize {
        let capped = match &self.bandwidth {
            Some(bw) => bytes.min(bw.rate * self.target.as_secs_f64()),
            None => bytes,
        };
        (capped as usize).clamp(MIN_BUDGET, self.max)
    }

    /// A transaction of `bytes` committed after `elapsed`; `full` when it carried its whole
    /// budget (so its time measures the link, not how much there was to send). Returns how
    /// long to wait before the next transaction begins.
    pub(crate) fn committed(&mut self, bytes: usize, elapsed: Duration, full: bool) -> Duration {
        if full {
            let seconds = elapsed.as_secs_f64().max(0.001);
            let carried = bytes as f64 / seconds * self.target.as_secs_f64();
            let grown = carried.min(self.budget as f64 * 2.0);
            self.budget = self.bounded(grown);
        }
        match &mut self.bandwidth {
            Some(bw) => bw.take(bytes),
            None => Duration::ZERO,
        }
    }

    /// A transaction failed (timed out, aborted, or its session ended): the next is smaller.
    pub(crate) fn failed(&mut self) {
        self.budget = self.bounded(self.budget as f64 / 4.0);
    }
}

/// A token bucket over record bytes.
#[derive(Debug)]
pub(crate) struct Bandwidth {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bandwidth {
    pub(crate) fn new(rate: u64) -> Bandwidth {
        Bandwidth {
            rate: rate as f64,
            tokens: 0.0,
            last: Instant::now(),
        }
    }

    /// Charges `bytes`; returns how long to wait until the bucket is no longer in debt.
    pub(crate) fn take(&mut self, bytes: usize) -> Duration {
        let now = Instant::now();
        let burst = (self.rate / 10.0).max(64.0 * 1024.0);
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(burst);
        self.last = now;
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1024 * 1024;

    #[test]
    fn a_capped_link_carries_target_times_bandwidth_per_transaction() {
        let p = Pacer::new(Duration::from_secs(5), 64 * MIB, Some(MIB as u64));
        assert_eq!(
            p.budget(),
            4 * MIB,
            "the first budget is below the cap's 5 MiB"
        );
        let mut p = p;
        // A fast link: full transactions grow the budget, up to what the cap sends in 5 s.
        for _ in 0..10 {
            p.committed(p.budget(), Duration::from_millis(100), true);
        }
        assert_eq!(p.budget(), 5 * MIB);
    }

    #[test]
    fn a_slow_link_gets_transactions_of_its_measured_rate() {
        let mut p = Pacer::new(Duration::from_secs(5), 64 * MIB, None);
        // 4 MiB took 8 s: 512 KiB/s, so 2.5 MiB fit in 5 s.
        p.committed(4 * MIB, Duration::from_secs(8), true);
        assert_eq!(p.budget(), 5 * MIB / 2);
    }

    #[test]
    fn growth_is_at_most_double_and_bounded_above() {
        let mut p = Pacer::new(Duration::from_secs(5), 16 * MIB, None);
        p.committed(4 * MIB, Duration::from_millis(1), true);
        assert_eq!(p.budget(), 8 * MIB);
        p.committed(8 * MIB, Duration::from_millis(1), true);
        p.committed(16 * MIB, Duration::from_millis(1), true);
        assert_eq!(p.budget(), 16 * MIB, "transaction_size bounds it");
    }

    #[test]
    fn a_transaction_that_did_not_fill_its_budget_measures_nothing() {
        let mut p = Pacer::new(Duration::from_secs(5), 64 * MIB, None);
        p.committed(1000, Duration::from_secs(4), false);
        assert_eq!(p.budget(), 4 * MIB);
    }

    #[test]
    fn a_failure_shrinks_the_budget_down_to_the_minimum() {
        let mut p = Pacer::new(Duration::from_secs(5), 64 * MIB, None);
        p.failed();
        assert_eq!(p.budget(), MIB);
        for _ in 0..10 {
            p.failed();
        }
        assert_eq!(p.budget(), MIN_BUDGET);
        // ... and grows back with full transactions that commit in time.
        p.committed(MIN_BUDGET, Duration::from_millis(10), true);
        assert_eq!(p.budget(), 2 * MIN_BUDGET);
    }

    #[test]
    fn the_cap_waits_after_a_transaction_for_its_bytes() {
        let mut p = Pacer::new(Duration::from_secs(5), 64 * MIB, Some(MIB as u64));
        let wait = p.committed(2 * MIB, Duration::from_millis(100), false);
        // 2 MiB at 1 MiB/s, less the little the bucket refilled since it was made.
        assert!(
            wait > Duration::from_millis(1900) && wait <= Duration::from_secs(2),
            "{wait:?}"
        );
        let uncapped = Pacer::new(Duration::from_secs(5), 64 * MIB, None).committed(
            2 * MIB,
            Duration::from_millis(100),
            true,
        );
        assert_eq!(uncapped, Duration::ZERO);
    }

    #[test]
    fn bandwidth_allows_a_burst_then_asks_to_wait_for_the_rest() {
        let mut bw = Bandwidth::new(1_000_000);
        bw.tokens = 100_000.0; // a full burst at this rate
        assert_eq!(bw.take(100_000), Duration::ZERO);
        // Another 500 kB at 1 MB/s: about half a second more (less whatever time refilled).
        let wait = bw.take(500_000);
        assert!(
            wait > Duration::from_millis(400) && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
    }

    #[test]
    fn bandwidth_burst_is_capped() {
        let mut bw = Bandwidth::new(1_000_000);
        bw.last -= Duration::from_secs(3600); // an hour idle refills a burst, not an hour's worth
        assert_eq!(bw.take(100_000), Duration::ZERO);
        assert!(bw.take(100_000) > Duration::from_millis(90));
    }
}
