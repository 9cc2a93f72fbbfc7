//! The node-wide budget for request bodies held in memory.
//!
//! Ingress buffers bodies up to `delegation.max_buffered_body` so a failed
//! attempt can be retried and intent read; each buffer is small, but many
//! slow callers holding one each add up without limit. So every buffered
//! body first reserves its bytes from one budget per node
//! (`delegation.max_buffered_total`): its declared length before a byte is
//! read, or, for bodies of unknown length, each chunk as it arrives. A
//! reservation is a [`BodyPermit`] that gives its bytes back when dropped,
//! which is when the delegation that holds the body is done. A body that
//! does not fit is refused with 503 and `Retry-After`, never an allocation
//! the node cannot afford. A response held back until it is whole (so that
//! losing it can be retried, `forward::remote`) is charged to the same
//! budget; when it does not fit it is handed on as it comes, not refused.
//!
//! The count of reserved bytes *is* the exported gauge (one atomic, updated
//! with compare-and-swap so the limit holds under concurrency); the peak is
//! kept beside it so an operator (or a test) can see that it never passed
//! the limit.

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

/// Bytes of request bodies this node may hold buffered at once.
#[derive(Debug)]
pub struct BodyBudget {
    limit: usize,
    /// Reserved bytes; the `dmsc_buffered_body_bytes` gauge.
    used: Gauge<i64, AtomicI64>,
    peak: AtomicUsize,
    /// Bodies refused because the budget was spent.
    refused: Counter<u64, AtomicU64>,
}

/// Bytes reserved from a [`BodyBudget`], given back on drop.
#[derive(Debug)]
pub struct BodyPermit {
    budget: Arc<BodyBudget>,
    held: usize,
}

impl BodyBudget {
    /// A budget of `limit` bytes that reports into `used` and `refused`.
    pub fn new(
        limit: usize,
        used: Gauge<i64, AtomicI64>,
        refused: Counter<u64, AtomicU64>,
    ) -> Arc<BodyBudget> {
        Arc::new(BodyBudget {
            limit,
            used,
            peak: AtomicUsize::new(0),
            refused,
        })
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes reserved now.
    pub fn used(&self) -> usize {
        self.used.get().max(0) as usize
    }

    /// The most bytes ever reserved at once.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// Bodies refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.get()
    }

    /// Reserves `n` bytes, or `None` (counted) if they do not fit.
    pub fn try_reserve(self: &Arc<Self>, n: usize) -> Option<BodyPermit> {
        let mut permit = BodyPermit {
            budget: self.clone(),
            held: 0,
        };
        permit.grow_to(n).then_some(permit)
    }

    /// `count`: a refusal is counted (a body refused), else the caller
    /// just stops asking (a held response handed on instead).
    fn take(&self, n: usize, count: bool) -> bool {
        if n == 0 {
            return true;
        }
        let cell = self.used.inner();
        let mut cur = cell.load(Ordering::Relaxed);
        loop {
            let next = (cur.max(0) as usize).saturating_add(n);
            if next > self.limit {
                if count {
                    self.refused.inc();
                }
                return false;
            }
            match cell.compare_exchange_weak(cur, next as i64, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.peak.fetch_max(next, Ordering::Relaxed);
                    return true;
                }
                Err(now) => cur = now,
            }
        }
    }

    fn give(&self, n: usize) {
        if n > 0 {
            self.used.dec_by(n as i64);
        }
    }
}

impl BodyPermit {
    /// Grows the reservation to `total` bytes; false (and unchanged) if the
    /// budget cannot cover it.
    pub fn grow_to(&mut self, total: usize) -> bool {
        self.grow(total, true)
    }

    /// [`BodyPermit::grow_to`] for a holder that has a fallback when the
    /// budget is spent (a held response is handed on as it is): not counted
    /// as a refusal.
    pub fn grow_or_not(&mut self, total: usize) -> bool {
        self.grow(total, false)
    }

    fn grow(&mut self, total: usize, count: bool) -> bool {
        if total <= self.held {
            return true;
        }
        if !self.budget.take(total - self.held, count) {
            return false;
        }
        self.held = total;
        true
    }

    pub fn held(&self) -> usize {
        self.held
    }
}

impl Drop for BodyPermit {
    fn drop(&mut self) {
        self.budget.give(self.held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(limit: usize) -> Arc<BodyBudget> {
        BodyBudget::new(limit, Gauge::default(), Counter::default())
    }

    #[test]
    fn reservations_stop_at_the_limit_and_come_back_on_drop() {
        let b = budget(100);
        let a = b.try_reserve(60).expect("fits");
        assert!(b.try_reserve(41).is_none());
        assert_eq!(b.refused(), 1);
        let mut c = b.try_reserve(40).expect("exactly fits");
        assert_eq!(b.used(), 100);
        assert!(!c.grow_to(41));
        assert_eq!(c.held(), 40);
        drop(a);
        assert_eq!(b.used(), 40);
        assert!(c.grow_to(100));
        assert_eq!(b.used(), 100);
        drop(c);
        assert_eq!(b.used(), 0);
        assert_eq!(b.peak(), 100);
        // Empty bodies always pass, even with the budget spent.
        let _full = b.try_reserve(100).expect("fits");
        let mut held = b.try_reserve(0).expect("empty");
        // A holder with a fallback is told no, and no refusal is counted.
        let refused = b.refused();
        assert!(!held.grow_or_not(1));
        assert_eq!((held.held(), b.refused()), (0, refused));
    }

    #[test]
    fn the_limit_holds_under_concurrency() {
        let b = budget(1000);
        std::thread::scope(|s| {
            for _ in 0..8 {
                let b = b.clone();
                s.spawn(move || {
                    for _ in 0..2000 {
                        if let Some(mut p) = b.try_reserve(300) {
                            let _ = p.grow_to(400);
                        }
                    }
                });
            }
        });
        assert!(b.peak() <= 1000, "peak {}", b.peak());
        assert_eq!(b.used(), 0);
    }
}
