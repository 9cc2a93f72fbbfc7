//! Response and request bodies that carry guards: an outstanding count or a
//! writer task lives exactly as long as the body it belongs to.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};

use crate::proto::http::{Body, BoxError};

/// A response body that holds guards (outstanding count, writer task)
/// until the body is done or dropped.
pub(crate) struct Guarded {
    inner: Body,
    _guards: Vec<Box<dyn Send + Sync>>,
}

impl hyper::body::Body for Guarded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pub(crate) fn guarded(body: Body, guards: Vec<Box<dyn Send + Sync>>) -> Body {
    Guarded {
        inner: body,
        _guards: guards,
    }
    .boxed()
}

/// Aborts a task when dropped (a request-body writer lives as long as its
/// response).
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Frames already read, then the rest of the body.
struct Prefixed {
    frames: VecDeque<Frame<Bytes>>,
    rest: Body,
}

impl hyper::body::Body for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(f) = self.frames.pop_front() {
            return Poll::Ready(Some(Ok(f)));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let held: u64 = self
            .frames
            .iter()
            .filter_map(|f| f.data_ref())
            .map(|d| d.len() as u64)
            .sum();
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + held);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + held);
        }
        hint
    }
}

/// `frames` (read already, e.g. to look at a body's start), then `rest`.
pub(crate) fn prefixed(frames: VecDeque<Frame<Bytes>>, rest: Body) -> Body {
    Prefixed { frames, rest }.boxed()
}

/// A body whose first bytes were read already (`head`), then the rest as
/// it comes: a request too large to hold whole, routed by its start.
pub(crate) fn prepended(head: Bytes, rest: Incoming) -> Body {
    prefixed(VecDeque::from([Frame::data(head)]), incoming(rest))
}

pub(crate) fn incoming(body: Incoming) -> Body {
    body.map_err(|e| Box::new(e) as BoxError).boxed()
}
