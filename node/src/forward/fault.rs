//! Whose fault a failed delivery is: the caller's or the agent's.
//!
//! A circuit breaker and an error rate are judgements about an agent; a
//! request that fails because its *caller* sent a malformed chunked body,
//! cut its upload, or stalled it past the deadline says nothing about the
//! agent, and counting it would let one client keep an agent dark for
//! everyone. The only party that knows where a request body's bytes come
//! from is the body itself, so a streamed request body is wrapped in a
//! [`BodyWatch`] that records what happened to it: an error from the caller's
//! side (the only way a request body fails), or that the agent's side is
//! waiting for the next bytes from the caller. Delivery code asks the watch
//! after a failure instead of guessing from the HTTP client's error text.
//!
//! "Waiting" ends when the caller's side *wakes* the body, not when the
//! agent's side next polls it: an agent that reads slowly leaves the body
//! unpolled while the caller's bytes sit ready (with HTTP/2 each window's
//! worth arrives only after the node read the last one), and the last poll's
//! `Pending` would otherwise blame the caller for the agent's slowness.
//!
//! Buffered bodies need no watch: they are read whole at ingress, and a
//! failure there is answered with 400 before any agent is involved.

use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Wake, Waker};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, SizeHint};

use crate::proto::http::{Body, BoxError, ErrorKind, MeshError};

/// The last thing the agent's side saw when it asked the body for data.
const READY: u8 = 0;
/// It asked, and the caller's side has not woken it since.
const WAITING_ON_CALLER: u8 = 1;
/// The body ended cleanly.
const DONE: u8 = 2;
/// The caller's side failed (bad framing, cut upload, reset stream).
const FAILED: u8 = 3;

#[derive(Debug, Default)]
struct State {
    at: AtomicU8,
    error: OnceLock<String>,
    /// The agent's side's waker while it waits; the body is polled with
    /// this state as its waker, so the caller's side wakes it first.
    waiter: Mutex<Option<Waker>>,
}

impl Wake for State {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // The caller's side has something (bytes, the end, an error): from
        // here on the agent's side is the one not asking.
        let _ = self.at.compare_exchange(
            WAITING_ON_CALLER,
            READY,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        let waiter = self.waiter.lock().ok().and_then(|mut w| w.take());
        if let Some(waiter) = waiter {
            waiter.wake();
        }
    }
}

/// Watches one streamed request body; cheap to clone (all clones see the
/// same body).
#[derive(Debug, Clone, Default)]
pub struct BodyWatch(Arc<State>);

/// Why a failed delivery is the caller's doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallerFault {
    /// The request body failed on the caller's side.
    BodyFailed(String),
    /// The deadline passed while the agent's side waited for more of the
    /// request body from the caller.
    Stalled,
}

impl CallerFault {
    /// What the caller is told (if it is still there to hear it).
    pub fn error(&self, me: &str) -> MeshError {
        match self {
            CallerFault::BodyFailed(why) => MeshError::new(
                ErrorKind::BadRequest,
                me,
                format!("the request body failed before the agent answered: {why}"),
            ),
            CallerFault::Stalled => MeshError::new(
                ErrorKind::Timeout,
                me,
                "the deadline passed while the agent was waiting for the rest of the request body",
            ),
        }
    }
}

impl BodyWatch {
    /// `body`, reporting to this watch.
    pub fn watch(&self, body: Body) -> Body {
        Watched {
            inner: body,
            state: self.0.clone(),
        }
        .boxed()
    }

    /// The caller's fault in a failure of kind `kind`, if it is one: any
    /// failure once the body failed; a timeout while the agent's side was
    /// waiting on the caller's upload.
    pub fn fault(&self, kind: ErrorKind) -> Option<CallerFault> {
        match self.0.at.load(Ordering::Acquire) {
            FAILED => Some(CallerFault::BodyFailed(
                self.0.error.get().cloned().unwrap_or_default(),
            )),
            WAITING_ON_CALLER if kind == ErrorKind::Timeout => Some(CallerFault::Stalled),
            _ => None,
        }
    }

    /// True once the body failed on the caller's side.
    pub fn failed(&self) -> bool {
        self.0.at.load(Ordering::Acquire) == FAILED
    }
}

struct Watched {
    inner: Body,
    state: Arc<State>,
}

impl hyper::body::Body for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        // Waiting until proven otherwise: a wake that comes while the body is
        // polled (from another thread) then turns it to READY, not lost.
        if self.state.at.load(Ordering::Acquire) != FAILED {
            self.state.at.store(WAITING_ON_CALLER, Ordering::Release);
        }
        if let Ok(mut waiter) = self.state.waiter.lock() {
            match waiter.as_mut() {
                Some(w) => w.clone_from(cx.waker()),
                None => *waiter = Some(cx.waker().clone()),
            }
        }
        let waker = Waker::from(self.state.clone());
        let polled = Pin::new(&mut self.inner).poll_frame(&mut Context::from_waker(&waker));
        let at = match &polled {
            Poll::Pending => return polled,
            Poll::Ready(None) => DONE,
            Poll::Ready(Some(Err(e))) => {
                let _ = self.state.error.set(e.to_string());
                FAILED
            }
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => DONE,
            Poll::Ready(Some(Ok(_))) => READY,
        };
        // A failure is final: nothing after it may make it look healthy.
        if self.state.at.load(Ordering::Acquire) != FAILED {
            self.state.at.store(at, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::body::Body as _;

    type Tx = tokio::sync::mpsc::UnboundedSender<Result<Frame<Bytes>, BoxError>>;

    fn channel_body() -> (Tx, Body) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let s =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|f| (f, rx)) },
            );
        (tx, http_body_util::StreamBody::new(s).boxed())
    }

    /// Polls the body once, as the agent's side does when it wants data.
    async fn poll_once(body: &mut Body) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx).is_pending()))
            .await
    }

    #[tokio::test]
    async fn a_failed_body_blames_the_caller_for_any_failure() {
        let watch = BodyWatch::default();
        let (tx, body) = channel_body();
        let mut body = watch.watch(body);
        tx.send(Ok(Frame::data(Bytes::from_static(b"abc"))))
            .expect("send");
        assert!(body.frame().await.is_some());
        assert_eq!(watch.fault(ErrorKind::Unreachable), None);
        tx.send(Err("invalid chunk size line".into()))
            .expect("send");
        assert!(matches!(body.frame().await, Some(Err(_))));
        assert_eq!(
            watch.fault(ErrorKind::Unreachable),
            Some(CallerFault::BodyFailed("invalid chunk size line".into()))
        );
        assert!(watch.failed());
    }

    #[tokio::test]
    async fn waiting_on_the_caller_blames_it_for_a_timeout_only() {
        let watch = BodyWatch::default();
        let (tx, body) = channel_body();
        let mut body = watch.watch(body);
        assert_eq!(watch.fault(ErrorKind::Timeout), None);
        // The agent's side asks for data that the caller does not send.
        assert!(poll_once(&mut body).await);
        assert_eq!(watch.fault(ErrorKind::Timeout), Some(CallerFault::Stalled));
        // An agent that fails meanwhile (connection reset) is still charged.
        assert_eq!(watch.fault(ErrorKind::Unreachable), None);
        // Once the caller sent what was asked, a timeout is the agent's.
        tx.send(Ok(Frame::data(Bytes::from_static(b"x"))))
            .expect("send");
        assert!(body.frame().await.is_some());
        assert_eq!(watch.fault(ErrorKind::Timeout), None);
        drop(tx);
        assert!(body.frame().await.is_none());
        assert_eq!(watch.fault(ErrorKind::Timeout), None);
    }

    /// An agent that reads slowly stops polling while the caller's next
    /// bytes arrive: the caller's side woke the body, so a timeout now is
    /// the agent's even though the last poll found nothing.
    #[tokio::test]
    async fn bytes_that_arrive_unread_make_a_timeout_the_agents() {
        let watch = BodyWatch::default();
        let (tx, body) = channel_body();
        let mut body = watch.watch(body);
        assert!(poll_once(&mut body).await);
        assert_eq!(watch.fault(ErrorKind::Timeout), Some(CallerFault::Stalled));
        tx.send(Ok(Frame::data(Bytes::from_static(b"more"))))
            .expect("send");
        // Not polled again: the agent's side is busy (or slow).
        assert_eq!(watch.fault(ErrorKind::Timeout), None);
        // It asks again, takes the bytes, and asks for more the caller has
        // not sent: waiting on the caller once more.
        assert!(body.frame().await.is_some());
        assert!(poll_once(&mut body).await);
        assert_eq!(watch.fault(ErrorKind::Timeout), Some(CallerFault::Stalled));
    }
}
