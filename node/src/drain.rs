//! Graceful shutdown: the node's one count of the requests it is working
//! on, and the switch that tells every entrance to stop taking new ones.
//!
//! A request counts from the moment an ingress listener or the overlay
//! hands it to the node until its response has left: a [`Work`] guard
//! rides in the same response body as the existing guards (the listener's
//! activity guard, the agent's outstanding count), so a stream counts until
//! its last frame. The per-agent counts of the registry and of the local
//! agents cannot serve here: they begin at selection and miss a request
//! still reading its body or being judged by policy, and a request to a
//! local agent would be counted twice.
//!
//! [`Drain::start`] flips the node to draining: listeners stop accepting
//! and answer new requests 503 with `Retry-After`, the home side refuses new
//! delegations as not delivered (the calling node tries another
//! candidate). [`Drain::wait`] then waits, up to the grace period, for the
//! count to reach zero. Both halves are plain state with no I/O of their
//! own, so the node's `stop` decides the order.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

/// The node's shutdown state and its count of requests in flight.
#[derive(Debug)]
pub struct Drain {
    draining: AtomicBool,
    started: watch::Sender<bool>,
    in_flight: AtomicUsize,
    idle: Notify,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            draining: AtomicBool::new(false),
            started: watch::Sender::new(false),
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
        }
    }
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every request in flight finished.
    Done,
    /// The grace period ran out with this many still in flight.
    Cut(usize),
    /// Told to stop at once (a second signal) with this many in flight.
    Forced(usize),
}

impl Drain {
    pub fn new() -> Arc<Drain> {
        Arc::new(Drain::default())
    }

    /// Counts one request until the guard drops.
    pub fn begin(self: &Arc<Self>) -> Work {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Work(self.clone())
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Whether the node has stopped taking new work.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Stops taking new work (idempotent); the requests in flight now.
    pub fn start(&self) -> usize {
        self.draining.store(true, Ordering::Release);
        self.started.send_replace(true);
        self.in_flight()
    }

    /// Resolves once draining has started (at once if it has).
    pub async fn started(&self) {
        let mut rx = self.started.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Waits until nothing is in flight, at most `grace`, or until `force`
    /// resolves.
    pub async fn wait(
        &self,
        grace: Duration,
        force: impl std::future::Future<Output = ()>,
    ) -> Drained {
        let idle = async {
            loop {
                // Registered before the check, so a last guard dropping in
                // between still wakes us.
                let notified = self.idle.notified();
                if self.in_flight() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::select! {
            _ = idle => Drained::Done,
            _ = tokio::time::sleep(grace) => Drained::Cut(self.in_flight()),
            _ = force => Drained::Forced(self.in_flight()),
        }
    }
}

/// One request in flight, counted until dropped.
#[derive(Debug)]
pub struct Work(Arc<Drain>);

impl Drop for Work {
    fn drop(&mut self) {
        // Only a drain waits for zero: outside one, the last request of a
        // quiet moment need not take the waiters' lock.
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 && self.0.is_draining() {
            self.0.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_for_the_last_guard_or_the_grace_period() {
        let d = Drain::new();
        let a = d.begin();
        let b = d.begin();
        assert_eq!(d.start(), 2);
        assert!(d.is_draining());
        d.started().await;
        let waiter = {
            let d = d.clone();
            tokio::spawn(async move {
                d.wait(Duration::from_secs(10), std::future::pending())
                    .await
            })
        };
        drop(a);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiter.is_finished(), "one is still in flight");
        drop(b);
        assert_eq!(waiter.await.expect("task"), Drained::Done);

        let _c = d.begin();
        let t0 = tokio::time::Instant::now();
        let r = d.wait(Duration::from_secs(3), std::future::pending()).await;
        assert_eq!(r, Drained::Cut(1));
        assert_eq!(t0.elapsed(), Duration::from_secs(3));
        let r = d.wait(Duration::from_secs(3), async {}).await;
        assert_eq!(r, Drained::Forced(1));
    }

    #[tokio::test]
    async fn nothing_in_flight_is_drained_at_once() {
        let d = Drain::new();
        d.start();
        let r = d
            .wait(Duration::from_secs(60), std::future::pending())
            .await;
        assert_eq!(r, Drained::Done);
    }
}
