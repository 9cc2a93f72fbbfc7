//! Circuit breaker for one agent as seen from one node, sans I/O.
//!
//! Owns: the closed / open / half-open state machine and its counters. The
//! caller passes the time in (`std::time::Instant`), so tests drive it with
//! made-up instants and the node keeps one per (tenant, agent) without timers.
//!
//! Why it is shaped so: a node must stop sending to an agent that fails,
//! without waiting for gossip to say so, and must find out by itself when
//! it recovers. The circuit opens after `consecutive_failures` failures in a
//! row (a dead agent) or when the error rate over a sliding `window` reaches
//! `error_rate` with at least `min_requests` outcomes (a sick agent); it
//! stays open for `open_for`, then lets `half_open_probes` requests through;
//! a probe success closes it, a probe failure opens it again for twice as
//! long (capped at [`MAX_OPEN_FOR`]). The window is 10 buckets of counters,
//! so memory is constant however busy the agent is.
//!
//! Limitation: outcomes are not tied to the admission that produced them; a
//! slow request admitted while closed that finishes during half-open counts
//! as the probe. With `open_for` longer than request timeouts this is rare,
//! and it errs towards one extra open period or an early close, both of
//! which the next outcomes correct. A probe that never reports (its caller
//! vanished) frees its slot after `open_for`, so the circuit cannot stick
//! in half-open.

use std::fmt;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Longest an open period grows to after repeated failed probes.
pub const MAX_OPEN_FOR: Duration = Duration::from_secs(60);

const BUCKETS: usize = 10;

#[derive(Debug, Clone, PartialEq)]
pub struct CircuitConfig {
    /// Open after this many failures in a row.
    pub consecutive_failures: u32,
    /// Open when failures / outcomes over `window` reaches this...
    pub error_rate: f32,
    /// ...with at least this many outcomes in the window.
    pub min_requests: u32,
    pub window: Duration,
    /// First open period; doubles after each failed probe up to [`MAX_OPEN_FOR`].
    pub open_for: Duration,
    /// Requests let through at once while half-open.
    pub half_open_probes: u32,
}

impl Default for CircuitConfig {
    fn default() -> Self {
        CircuitConfig {
            consecutive_failures: 5,
            error_rate: 0.5,
            min_requests: 20,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(5),
            half_open_probes: 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

impl fmt::Display for CircuitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half-open",
        })
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    epoch: u64,
    ok: u32,
    err: u32,
}

#[derive(Debug, Clone, Copy)]
enum Inner {
    Closed,
    Open { until: Instant },
    HalfOpen { in_flight: u32, last_probe: Instant },
}

#[derive(Debug, Clone)]
pub struct Circuit {
    cfg: CircuitConfig,
    inner: Inner,
    consecutive: u32,
    open_for: Duration,
    /// Time origin of the bucket epochs (first event seen).
    base: Option<Instant>,
    buckets: [Bucket; BUCKETS],
}

impl Circuit {
    pub fn new(cfg: CircuitConfig) -> Circuit {
        let open_for = cfg.open_for;
        Circuit {
            cfg,
            inner: Inner::Closed,
            consecutive: 0,
            open_for,
            base: None,
            buckets: [Bucket::default(); BUCKETS],
        }
    }

    pub fn config(&self) -> &CircuitConfig {
        &self.cfg
    }

    /// The state at `now` (an expired open period reads as half-open).
    pub fn state(&self, now: Instant) -> CircuitState {
        match self.inner {
            Inner::Closed => CircuitState::Closed,
            Inner::Open { until } if now < until => CircuitState::Open,
            Inner::Open { .. } | Inner::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    /// May a request go to this agent now? Counts a half-open probe when it says yes.
    pub fn admit(&mut self, now: Instant) -> bool {
        match self.inner {
            Inner::Closed => true,
            Inner::Open { until } => {
                if now < until {
                    return false;
                }
                if self.cfg.half_open_probes == 0 {
                    return false;
                }
                self.inner = Inner::HalfOpen {
                    in_flight: 1,
                    last_probe: now,
                };
                true
            }
            Inner::HalfOpen {
                in_flight,
                last_probe,
            } => {
                // A probe silent for a whole open period is presumed lost.
                let in_flight = if now >= last_probe + self.open_for {
                    0
                } else {
                    in_flight
                };
                if in_flight < self.cfg.half_open_probes {
                    self.inner = Inner::HalfOpen {
                        in_flight: in_flight + 1,
                        last_probe: now,
                    };
                    true
                } else {
                    false
                }
            }
        }
    }

    pub fn on_success(&mut self, now: Instant) {
        match self.inner {
            Inner::Closed => {
                self.consecutive = 0;
                self.bucket(now).ok += 1;
            }
            Inner::HalfOpen { .. } => self.close(),
            // A late answer to a request admitted before the circuit opened.
            Inner::Open { .. } => {}
        }
    }

    pub fn on_failure(&mut self, now: Instant) {
        match self.inner {
            Inner::Closed => {
                self.consecutive += 1;
                self.bucket(now).err += 1;
                if self.consecutive >= self.cfg.consecutive_failures.max(1)
                    || self.rate_tripped(now)
                {
                    self.open(now);
                }
            }
            Inner::HalfOpen { .. } => {
                self.open_for = (self.open_for * 2).min(MAX_OPEN_FOR.max(self.cfg.open_for));
                self.open(now);
            }
            Inner::Open { .. } => {}
        }
    }

    /// Outcomes (successes, failures) counted in the window ending at `now`.
    pub fn window_counts(&self, now: Instant) -> (u32, u32) {
        let Some(epoch) = self.epoch(now) else {
            return (0, 0);
        };
        self.buckets
            .iter()
            .filter(|b| b.epoch + (BUCKETS as u64) > epoch && b.epoch <= epoch)
            .filter(|b| b.ok + b.err > 0)
            .fold((0, 0), |(o, e), b| (o + b.ok, e + b.err))
    }

    fn rate_tripped(&self, now: Instant) -> bool {
        let (ok, err) = self.window_counts(now);
        let total = ok + err;
        total >= self.cfg.min_requests.max(1) && err as f32 >= self.cfg.error_rate * total as f32
    }

    fn open(&mut self, now: Instant) {
        self.inner = Inner::Open {
            until: now + self.open_for,
        };
    }

    fn close(&mut self) {
        self.inner = Inner::Closed;
        self.consecutive = 0;
        self.open_for = self.cfg.open_for;
        self.buckets = [Bucket::default(); BUCKETS];
    }

    fn bucket_len(&self) -> Duration {
        (self.cfg.window / BUCKETS as u32).max(Duration::from_millis(1))
    }

    fn epoch(&self, now: Instant) -> Option<u64> {
        let base = self.base?;
        let nanos = now.saturating_duration_since(base).as_nanos() / self.bucket_len().as_nanos();
        Some(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    fn bucket(&mut self, now: Instant) -> &mut Bucket {
        self.base.get_or_insert(now);
        let epoch = self.epoch(now).unwrap_or(0);
        let b = &mut self.buckets[(epoch % BUCKETS as u64) as usize];
        if b.epoch != epoch {
            *b = Bucket {
                epoch,
                ok: 0,
                err: 0,
            };
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn opens_on_consecutive_failures() {
        let t = Instant::now();
        let mut c = Circuit::new(CircuitConfig::default());
        for i in 0..4 {
            assert!(c.admit(t + ms(i)));
            c.on_failure(t + ms(i));
        }
        assert_eq!(c.state(t + ms(4)), CircuitState::Closed);
        c.on_success(t + ms(4)); // resets the run
        for i in 5..9 {
            c.on_failure(t + ms(i));
        }
        assert_eq!(c.state(t + ms(9)), CircuitState::Closed);
        c.on_failure(t + ms(9));
        assert_eq!(c.state(t + ms(10)), CircuitState::Open);
        assert!(!c.admit(t + ms(10)));
        assert!(!c.admit(t + ms(5008)));
    }

    #[test]
    fn opens_on_error_rate_only_with_enough_requests() {
        let t = Instant::now();
        let mut c = Circuit::new(CircuitConfig::default());
        // alternate: never 5 in a row, rate 50%
        for i in 0..19 {
            let now = t + ms(i * 10);
            if i % 2 == 0 {
                c.on_success(now);
            } else {
                c.on_failure(now);
            }
        }
        // 19 outcomes, 9 failures: below min_requests
        assert_eq!(c.state(t + ms(190)), CircuitState::Closed);
        c.on_failure(t + ms(190));
        assert_eq!(c.window_counts(t + ms(190)), (10, 10));
        assert_eq!(c.state(t + ms(191)), CircuitState::Open);
    }

    #[test]
    fn old_outcomes_leave_the_window() {
        let t = Instant::now();
        let mut c = Circuit::new(CircuitConfig {
            error_rate: 0.9,
            ..CircuitConfig::default()
        });
        for i in 0..15 {
            c.on_failure(t + ms(i * 100));
            c.on_success(t + ms(i * 100 + 1));
        }
        assert_eq!(c.window_counts(t + ms(1500)), (15, 15));
        // 10 s later the first outcomes have aged out
        let late = t + ms(12_000);
        let (ok, err) = c.window_counts(late);
        assert!(ok + err < 30, "{ok} {err}");
        assert_eq!(c.window_counts(t + ms(30_000)), (0, 0));
        c.on_failure(t + ms(30_000));
        assert_eq!(c.state(t + ms(30_000)), CircuitState::Closed);
    }

    #[test]
    fn half_open_probe_closes() {
        let t = Instant::now();
        let mut c = Circuit::new(CircuitConfig::default());
        for _ in 0..5 {
            c.on_failure(t);
        }
        assert_eq!(c.state(t + ms(4999)), CircuitState::Open);
        assert_eq!(c.state(t + ms(5000)), CircuitState::HalfOpen);
        assert!(c.admit(t + ms(5000)));
        assert!(!c.admit(t + ms(5001)), "only one probe at a time");
        c.on_success(t + ms(5100));
        assert_eq!(c.state(t + ms(5100)), CircuitState::Closed);
        assert!(c.admit(t + ms(5101)));
        // counters were reset: four failures do not open
        for _ in 0..4 {
            c.on_failure(t + ms(5200));
        }
        assert_eq!(c.state(t + ms(5200)), CircuitState::Closed);
    }

    #[test]
    fn half_open_probe_failure_reopens_for_longer() {
        let t = Instant::now();
        let mut c = Circuit::new(CircuitConfig::default());
        for _ in 0..5 {
            c.on_failure(t);
        }
        assert!(c.admit(t + ms(5000)));
        c.on_failure(t + ms(5000));
        assert_eq!(c.state(t + ms(5001)), CircuitState::Open);
        assert_eq!(c.state(t + ms(14_999)), CircuitState::Open);
        assert_eq!(c.state(t + ms(15_000)), CircuitState::HalfOpen);
        // doubling is capped
        let mut now = t + ms(15_000);
        for _ in 0..10 {
            assert!(c.admit(now));
            c.on_failure(now);
            now += MAX_OPEN_FOR;
        }
        assert_eq!(c.state(now - ms(1)), CircuitState::Open);
        assert_eq!(c.state(now), CircuitState::HalfOpen);
        assert!(c.admit(now));
        c.on_success(now);
        // after closing, the next open period is the configured one again
        for _ in 0..5 {
            c.on_failure(now);
        }
        assert_eq!(c.state(now + ms(5000)), CircuitState::HalfOpen);
    }

    #[test]
    fn lost_probe_frees_its_slot() {
        let t = Instant::now();
        let mut c = Circuit::new(CircuitConfig::default());
        for _ in 0..5 {
            c.on_failure(t);
        }
        assert!(c.admit(t + ms(5000)));
        assert!(!c.admit(t + ms(9999)));
        assert!(c.admit(t + ms(10_000)));
    }

    #[test]
    fn state_names() {
        assert_eq!(CircuitState::HalfOpen.to_string(), "half-open");
        assert_eq!(
            serde_json::to_string(&CircuitState::HalfOpen).expect("json"),
            "\"half-open\""
        );
    }
}
