//! Bounds on what an unauthenticated client can make the node do:
//! enrollment and renewal are rate-limited per source address, and their
//! failures are audited one by one only up to a number per address and
//! window, then as one aggregate entry per window.
//!
//! Without them, one connection could try thousands of join tokens a second
//! and each failure would write an audit line (a guessing oracle and a
//! disk-filling flood in one). Both pieces are pure: they take `now` and
//! return decisions, so their tests hit exact boundaries without sleeping;
//! [`crate::security::Security`] holds them behind a lock.
//!
//! Addresses are keyed per IPv4 address and per IPv6 /64 (one host commonly
//! owns a whole /64). Both maps are bounded: a rate-limit bucket that has
//! refilled carries no information and is forgotten; past the bound, new
//! addresses share one overflow bucket (and one overflow aggregate), so a
//! flood from many addresses costs memory proportional to the bound, not to
//! the flood.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// How many addresses each map tracks before they share an overflow entry.
pub const MAX_TRACKED: usize = 4096;

/// The unit a limit applies to: an IPv4 address or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SourceKey(IpAddr);

impl SourceKey {
    pub fn of(ip: IpAddr) -> SourceKey {
        match ip {
            IpAddr::V4(_) => SourceKey(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => SourceKey(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    SourceKey(IpAddr::V6(prefix.into()))
                }
            },
        }
    }
}

impl std::fmt::Display for SourceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(a) => write!(f, "{a}"),
            IpAddr::V6(a) => write!(f, "{a}/64"),
        }
    }
}

/// Token buckets per source: `rate` requests a second, bursts of `burst`.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    max_tracked: usize,
    buckets: HashMap<SourceKey, Bucket>,
    /// Shared by sources beyond `max_tracked`.
    overflow: Bucket,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            at: now,
        }
    }

    fn refill(&mut self, rate: f64, burst: f64, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * rate).min(burst);
        self.at = now;
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self, rate: f64, burst: f64, now: Instant) -> Result<(), Duration> {
        self.refill(rate, burst, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }
}

impl RateLimiter {
    pub fn new(rate_per_sec: f64, burst: u32, max_tracked: usize, now: Instant) -> RateLimiter {
        let burst = f64::from(burst.max(1));
        RateLimiter {
            rate: rate_per_sec,
            burst,
            max_tracked,
            buckets: HashMap::new(),
            overflow: Bucket::full(burst, now),
        }
    }

    /// Admits one request from `src`, or says when to come back.
    pub fn check(&mut self, src: SourceKey, now: Instant) -> Result<(), Duration> {
        let (rate, burst) = (self.rate, self.burst);
        if !self.buckets.contains_key(&src) && self.buckets.len() >= self.max_tracked {
            // Forget the buckets that have refilled: they limit nothing.
            self.buckets.retain(|_, b| {
                b.refill(rate, burst, now);
                b.tokens < burst
            });
        }
        if let Some(b) = self.buckets.get_mut(&src) {
            return b.take(rate, burst, now);
        }
        if self.buckets.len() >= self.max_tracked {
            return self.overflow.take(rate, burst, now);
        }
        let mut b = Bucket::full(burst, now);
        let r = b.take(rate, burst, now);
        self.buckets.insert(src, b);
        r
    }

    /// Sources tracked individually.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

/// What to do with one failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sample {
    /// Audit it individually.
    Audit,
    /// Count it into the window's aggregate.
    Count,
}

/// One aggregate audit entry: what a source did in a window beyond the
/// failures audited individually. The source is an address by default;
/// the tenant rate limits sample per tenant ([`crate::limits`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aggregate<K, S = SourceKey> {
    /// What kind of attempt (the caller's own label, e.g. the auth method).
    pub kind: K,
    /// `None`: the sources beyond the tracking bound, together.
    pub source: Option<S>,
    /// Failures not audited individually.
    pub failed: u64,
    /// Requests refused by the rate limit.
    pub throttled: u64,
    pub window: Duration,
}

impl<K, S: std::fmt::Display> Aggregate<K, S> {
    /// The audit `reason`, e.g. `37 more failed attempts and 950 requests
    /// refused by the rate limit from 10.0.0.7 within 10s`.
    pub fn reason(&self) -> String {
        let from = match &self.source {
            Some(s) => s.to_string(),
            None => "addresses beyond the tracking bound".to_string(),
        };
        let mut what = Vec::new();
        if self.failed > 0 {
            what.push(format!("{} more failed attempts", self.failed));
        }
        if self.throttled > 0 {
            what.push(format!(
                "{} requests refused by the rate limit",
                self.throttled
            ));
        }
        format!(
            "{} from {from} within {}s (sampled: not audited one by one)",
            what.join(" and "),
            self.window.as_secs()
        )
    }
}

#[derive(Debug)]
struct Window {
    started: Instant,
    audited: u32,
    failed: u64,
    throttled: u64,
}

/// Audits the first `per_window` failures of each source per window
/// individually and sums the rest into one aggregate per window.
#[derive(Debug)]
pub struct FailureSampler<K, S = SourceKey> {
    per_window: u32,
    window: Duration,
    max_tracked: usize,
    windows: HashMap<(K, Option<S>), Window>,
}

impl<K: Clone + Eq + std::hash::Hash, S: Clone + Eq + std::hash::Hash> FailureSampler<K, S> {
    pub fn new(per_window: u32, window: Duration, max_tracked: usize) -> FailureSampler<K, S> {
        FailureSampler {
            per_window,
            window,
            max_tracked,
            windows: HashMap::new(),
        }
    }

    /// A failed attempt of `kind` from `src`: audit it or count it. Any
    /// aggregates now due are appended to `due`.
    pub fn failed(
        &mut self,
        kind: K,
        src: S,
        now: Instant,
        due: &mut Vec<Aggregate<K, S>>,
    ) -> Sample {
        let per_window = self.per_window;
        let w = self.window_for(kind, src, now, due);
        if w.audited < per_window {
            w.audited += 1;
            Sample::Audit
        } else {
            w.failed += 1;
            Sample::Count
        }
    }

    /// A request of `kind` from `src` refused by the rate limit: never
    /// audited alone, always counted.
    pub fn throttled(&mut self, kind: K, src: S, now: Instant, due: &mut Vec<Aggregate<K, S>>) {
        self.window_for(kind, src, now, due).throttled += 1;
    }

    /// Closes the windows that are over, appending their aggregates (if
    /// anything was left unaudited) to `due`.
    pub fn flush(&mut self, now: Instant, due: &mut Vec<Aggregate<K, S>>) {
        let window = self.window;
        self.windows.retain(|(kind, source), w| {
            if now.saturating_duration_since(w.started) < window {
                return true;
            }
            if w.failed > 0 || w.throttled > 0 {
                due.push(Aggregate {
                    kind: kind.clone(),
                    source: source.clone(),
                    failed: w.failed,
                    throttled: w.throttled,
                    window,
                });
            }
            false
        });
    }

    fn window_for(
        &mut self,
        kind: K,
        src: S,
        now: Instant,
        due: &mut Vec<Aggregate<K, S>>,
    ) -> &mut Window {
        let mut key = (kind, Some(src));
        let over = self
            .windows
            .get(&key)
            .is_some_and(|w| now.saturating_duration_since(w.started) >= self.window);
        if over || (!self.windows.contains_key(&key) && self.windows.len() >= self.max_tracked) {
            self.flush(now, due);
        }
        if !self.windows.contains_key(&key) && self.windows.len() >= self.max_tracked {
            key.1 = None;
        }
        self.windows.entry(key).or_insert(Window {
            started: now,
            audited: 0,
            failed: 0,
            throttled: 0,
        })
    }

    /// Windows open now.
    pub fn open(&self) -> usize {
        self.windows.len()
    }
}

/// The two unauthenticated-to-start endpoints the guard covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Attempt {
    /// `POST /v1/enroll` (a join token).
    Enroll,
    /// `POST /v1/renew` (the current certificate).
    Renew,
}

impl Attempt {
    fn listener(self) -> &'static str {
        match self {
            Attempt::Enroll => "enroll",
            Attempt::Renew => "renew",
        }
    }

    fn method(self) -> dmsc_audit::AuthMethod {
        match self {
            Attempt::Enroll => dmsc_audit::AuthMethod::Token,
            Attempt::Renew => dmsc_audit::AuthMethod::Mtls,
        }
    }
}

impl Aggregate<Attempt> {
    /// The aggregate as an audit entry: an ordinary `auth_failure` whose
    /// reason carries the counts (the log format is unchanged).
    pub fn event(&self) -> dmsc_audit::Event {
        dmsc_audit::Event::global(dmsc_audit::AuthFailure {
            listener: self.kind.listener().to_string(),
            method: self.kind.method(),
            reason: self.reason(),
            peer: self.source.map(|s| s.to_string()).unwrap_or_default(),
            claimed: None,
        })
    }
}

/// The rate limit and the failure sampler of one node's enrollment and
/// renewal endpoints, behind one lock (each decision is a few map lookups).
#[derive(Debug)]
pub struct EnrollGuard {
    inner: std::sync::Mutex<(RateLimiter, FailureSampler<Attempt>)>,
}

impl EnrollGuard {
    pub fn new(limits: &crate::config::EnrollmentLimits) -> EnrollGuard {
        EnrollGuard {
            inner: std::sync::Mutex::new((
                RateLimiter::new(
                    limits.rate_per_sec,
                    limits.burst,
                    MAX_TRACKED,
                    Instant::now(),
                ),
                FailureSampler::new(
                    limits.audit_failures_per_window,
                    limits.audit_window,
                    MAX_TRACKED,
                ),
            )),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (RateLimiter, FailureSampler<Attempt>)> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits one request from `ip`, or says when to come back (the refusal
    /// is counted into the source's aggregate).
    pub fn admit(
        &self,
        attempt: Attempt,
        ip: IpAddr,
        now: Instant,
        due: &mut Vec<Aggregate<Attempt>>,
    ) -> Result<(), Duration> {
        let src = SourceKey::of(ip);
        let mut g = self.lock();
        let r = g.0.check(src, now);
        if r.is_err() {
            g.1.throttled(attempt, src, now, due);
        }
        r
    }

    /// A failed attempt from `ip`: audit it, or only count it.
    pub fn failed(
        &self,
        attempt: Attempt,
        ip: IpAddr,
        now: Instant,
        due: &mut Vec<Aggregate<Attempt>>,
    ) -> Sample {
        self.lock().1.failed(attempt, SourceKey::of(ip), now, due)
    }

    /// Closes the sampling windows that are over.
    pub fn flush(&self, now: Instant, due: &mut Vec<Aggregate<Attempt>>) {
        self.lock().1.flush(now, due);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> SourceKey {
        SourceKey::of(s.parse().expect("ip"))
    }

    #[test]
    fn buckets_admit_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(5.0, 20, 16, t0);
        let a = ip("10.0.0.1");
        for _ in 0..20 {
            assert!(l.check(a, t0).is_ok());
        }
        let wait = l.check(a, t0).expect_err("burst spent");
        assert_eq!(wait, Duration::from_millis(200));
        // Another address has its own bucket.
        assert!(l.check(ip("10.0.0.2"), t0).is_ok());
        assert!(l.check(a, t0 + Duration::from_millis(199)).is_err());
        assert!(l.check(a, t0 + Duration::from_millis(200)).is_ok());
        assert!(l.check(a, t0 + Duration::from_millis(200)).is_err());
    }

    #[test]
    fn ipv6_hosts_are_limited_per_64() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(1.0, 1, 16, t0);
        assert!(l.check(ip("2001:db8:1:2::1"), t0).is_ok());
        assert!(l.check(ip("2001:db8:1:2::ffff"), t0).is_err());
        assert!(l.check(ip("2001:db8:1:3::1"), t0).is_ok());
        assert_eq!(ip("::ffff:10.1.2.3"), ip("10.1.2.3"));
        assert_eq!(ip("2001:db8:1:2::9").to_string(), "2001:db8:1:2::/64");
    }

    #[test]
    fn the_bucket_map_is_bounded() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(1.0, 2, 4, t0);
        for i in 0..4 {
            assert!(l.check(ip(&format!("10.0.0.{i}")), t0).is_ok());
        }
        // Full of buckets that still limit: newcomers share the overflow one.
        assert!(l.check(ip("10.0.1.1"), t0).is_ok());
        assert!(l.check(ip("10.0.1.2"), t0).is_ok());
        assert!(l.check(ip("10.0.1.3"), t0).is_err());
        assert_eq!(l.tracked(), 4);
        // Once those have refilled they are forgotten and newcomers tracked.
        let later = t0 + Duration::from_secs(2);
        assert!(l.check(ip("10.0.2.1"), later).is_ok());
        assert_eq!(l.tracked(), 1);
    }

    #[test]
    fn failures_beyond_the_sample_become_one_aggregate_per_window() {
        let t0 = Instant::now();
        let w = Duration::from_secs(10);
        let mut s = FailureSampler::new(3, w, 16);
        let a = ip("10.0.0.1");
        let mut due = Vec::new();
        let samples: Vec<Sample> = (0..10)
            .map(|_| s.failed("token", a, t0, &mut due))
            .collect();
        assert_eq!(samples.iter().filter(|x| **x == Sample::Audit).count(), 3);
        s.throttled("token", a, t0, &mut due);
        s.flush(t0 + w - Duration::from_millis(1), &mut due);
        assert!(due.is_empty(), "window still open");
        s.flush(t0 + w, &mut due);
        assert_eq!(
            due,
            vec![Aggregate {
                kind: "token",
                source: Some(a),
                failed: 7,
                throttled: 1,
                window: w
            }]
        );
        assert_eq!(
            due[0].reason(),
            "7 more failed attempts and 1 requests refused by the rate limit from 10.0.0.1 within 10s (sampled: not audited one by one)"
        );
        assert_eq!(s.open(), 0);
        // A new window samples afresh; one that saw only audited failures
        // leaves no aggregate.
        due.clear();
        assert_eq!(s.failed("token", a, t0 + w, &mut due), Sample::Audit);
        s.flush(t0 + w * 2, &mut due);
        assert!(due.is_empty());
    }

    #[test]
    fn a_new_failure_after_the_window_reports_the_old_one_first() {
        let t0 = Instant::now();
        let w = Duration::from_secs(10);
        let mut s = FailureSampler::new(1, w, 16);
        let a = ip("10.0.0.1");
        let mut due = Vec::new();
        s.failed("token", a, t0, &mut due);
        s.failed("token", a, t0, &mut due);
        assert_eq!(s.failed("token", a, t0 + w, &mut due), Sample::Audit);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].failed, 1);
    }

    #[test]
    fn the_window_map_is_bounded() {
        let t0 = Instant::now();
        let mut s = FailureSampler::new(1, Duration::from_secs(10), 4);
        let mut due = Vec::new();
        for i in 0..100 {
            s.failed(
                "token",
                ip(&format!("10.0.{}.{}", i / 250, i % 250)),
                t0,
                &mut due,
            );
        }
        // Four tracked addresses plus one shared overflow window.
        assert_eq!(s.open(), 5);
        s.flush(t0 + Duration::from_secs(10), &mut due);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].source, None);
        assert_eq!(due[0].failed, 95);
    }
}
