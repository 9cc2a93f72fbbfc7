//! The local bookkeeping of one limit on one node: a token bucket whose
//! rate and size may change between any two requests, a concurrency count,
//! and a demand meter. Pure: every call takes `now`.
//!
//! Why not governor: its quota is fixed when a limiter is built, and a
//! node's share of a mesh-wide limit changes with every gossip round.
//! Rebuilding the limiter on each change would hand out a fresh burst each
//! time (a full bucket), which is exactly the excess the mesh-wide bound
//! forbids. A bucket that refills at the old rate up to `now` and then takes
//! the new rate and size is a handful of lines (below), and carries its
//! state across changes.

use std::time::{Duration, Instant};

/// How long a refusal of a limit that admits nothing (rate 0) asks the
/// caller to wait.
pub const CLOSED_WAIT: Duration = Duration::from_secs(60);

/// A token bucket with a rate and a size given at each call.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket of `size` tokens.
    pub fn full(size: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: size,
            at: now,
        }
    }

    /// Refills at `per_sec` up to `now` and caps at `size` (a smaller size
    /// than before drops the surplus at once).
    fn refill(&mut self, per_sec: f64, size: f64, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * per_sec.max(0.0)).min(size);
        self.at = self.at.max(now);
    }

    /// Takes a token, or says how long until one is there.
    pub fn take(&mut self, per_sec: f64, size: f64, now: Instant) -> Result<(), Duration> {
        self.refill(per_sec, size, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(self.wait(per_sec))
        }
    }

    /// Puts back a token taken for a request that a later check refused
    /// (so one refused request does not cost the caller at every level).
    pub fn give_back(&mut self, size: f64) {
        self.tokens = (self.tokens + 1.0).min(size);
    }

    fn wait(&self, per_sec: f64) -> Duration {
        if per_sec <= 0.0 {
            return CLOSED_WAIT;
        }
        Duration::from_secs_f64(((1.0 - self.tokens) / per_sec).min(CLOSED_WAIT.as_secs_f64()))
    }

    /// Full again (it limits nothing and can be forgotten).
    pub fn is_full(&mut self, per_sec: f64, size: f64, now: Instant) -> bool {
        self.refill(per_sec, size, now);
        self.tokens >= size
    }
}

/// Requests in flight under one limit.
#[derive(Debug, Clone, Copy, Default)]
pub struct Concurrency {
    pub in_flight: u32,
}

impl Concurrency {
    /// One more, if that stays within `max`.
    pub fn try_acquire(&mut self, max: u32) -> bool {
        if self.in_flight < max {
            self.in_flight += 1;
            true
        } else {
            false
        }
    }

    pub fn release(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }
}

/// The period over which demand is measured.
pub const DEMAND_PERIOD: Duration = Duration::from_secs(1);

/// The shortest span a rate is measured over.
pub const DEMAND_MIN_SPAN: Duration = Duration::from_millis(100);

/// Requests a second asked of this node (admitted and refused alike: a
/// node whose callers are refused still has that demand, and its share
/// must follow it). The rate is the last whole period's, or the current
/// period's so far when that is higher, so a rise counts at once (and a
/// steady rate reads the same on every node from the start).
#[derive(Debug, Clone, Copy)]
pub struct Demand {
    start: Instant,
    count: u64,
    last: f64,
}

impl Demand {
    pub fn new(now: Instant) -> Demand {
        Demand {
            start: now,
            count: 0,
            last: 0.0,
        }
    }

    fn roll(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.start);
        if elapsed >= DEMAND_PERIOD {
            // An idle gap longer than a period dilutes the old count.
            self.last = self.count as f64 / elapsed.as_secs_f64();
            self.count = 0;
            self.start = now;
        }
    }

    /// One request asked.
    pub fn note(&mut self, now: Instant) {
        self.roll(now);
        self.count += 1;
    }

    /// Requests a second, now: the current period's rate so far (over at
    /// least `DEMAND_MIN_SPAN`, so a first handful of requests does not
    /// read as a flood) when higher than the last period's.
    pub fn rate(&mut self, now: Instant) -> f64 {
        self.roll(now);
        let span = now
            .saturating_duration_since(self.start)
            .max(DEMAND_MIN_SPAN)
            .as_secs_f64();
        self.last.max(self.count as f64 / span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_bucket_admits_its_size_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::full(3.0, t0);
        for _ in 0..3 {
            assert!(b.take(10.0, 3.0, t0).is_ok());
        }
        assert_eq!(b.take(10.0, 3.0, t0), Err(100 * MS));
        assert_eq!(b.take(10.0, 3.0, t0 + 99 * MS).map_err(|_| ()), Err(()));
        assert!(b.take(10.0, 3.0, t0 + 100 * MS).is_ok());
        assert!(b.take(10.0, 3.0, t0 + 100 * MS).is_err());
    }

    #[test]
    fn a_rate_change_applies_from_now_and_keeps_the_state() {
        let t0 = Instant::now();
        let mut b = Bucket::full(1.0, t0);
        assert!(b.take(1.0, 1.0, t0).is_ok());
        // 500 ms at 1/s refilled half a token; the rate is now 10/s: the
        // other half takes 50 ms more, not a fresh bucket.
        assert!(b.take(1.0, 1.0, t0 + 500 * MS).is_err());
        assert_eq!(b.take(10.0, 1.0, t0 + 500 * MS), Err(50 * MS));
        assert!(b.take(10.0, 1.0, t0 + 549 * MS).is_err());
        assert!(b.take(10.0, 1.0, t0 + 550 * MS).is_ok());
    }

    #[test]
    fn a_smaller_size_drops_the_surplus() {
        let t0 = Instant::now();
        let mut b = Bucket::full(10.0, t0);
        assert!(b.take(1.0, 2.0, t0).is_ok());
        assert!(b.take(1.0, 2.0, t0).is_ok());
        assert!(b.take(1.0, 2.0, t0).is_err(), "capped at 2");
    }

    #[test]
    fn a_closed_limit_asks_for_a_long_wait() {
        let t0 = Instant::now();
        let mut b = Bucket::full(0.0, t0);
        assert_eq!(
            b.take(0.0, 0.0, t0 + Duration::from_secs(5)),
            Err(CLOSED_WAIT)
        );
    }

    #[test]
    fn concurrency_is_bounded_and_released() {
        let mut c = Concurrency::default();
        assert!(c.try_acquire(2));
        assert!(c.try_acquire(2));
        assert!(!c.try_acquire(2));
        c.release();
        assert!(c.try_acquire(2));
    }

    #[test]
    fn demand_follows_the_last_period_and_counts_a_rise_at_once() {
        let t0 = Instant::now();
        let mut d = Demand::new(t0);
        for _ in 0..5 {
            d.note(t0);
        }
        assert_eq!(d.rate(t0), 50.0, "5 over the shortest span");
        assert_eq!(d.rate(t0 + 500 * MS), 10.0, "so far this period");
        assert_eq!(d.rate(t0 + 1000 * MS), 5.0, "the last whole period");
        for _ in 0..8 {
            d.note(t0 + 1500 * MS);
        }
        assert_eq!(d.rate(t0 + 1500 * MS), 16.0);
        // A long idle gap: the old count is spread over it.
        assert_eq!(d.rate(t0 + 5000 * MS), 2.0);
        assert_eq!(d.rate(t0 + 7000 * MS), 0.0);
    }
}
