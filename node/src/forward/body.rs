//! Response and request bodies that carry guards: an outstanding count or a
//! writer task lives exactly as long as the body it belongs to.

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

/// A body whose first bytes were read already (`head`), then the rest as
/// it comes: a request too large to hold whole, routed by its start.
pub(crate) struct Prepended {
    head: Option<Bytes>,
    rest: Incoming,
}

impl hyper::body::Body for Prepended {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(head) = self.head.take() {
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
        Pin::new(&mut self.rest)
            .poll_frame(cx)
            .map_err(|e| Box::new(e) as BoxError)
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let n = self.head.as_ref().map_or(0, |h| h.len() as u64);
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + n);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + n);
        }
        hint
    }
}

pub(crate) fn prepended(head: Bytes, rest: Incoming) -> Body {
    Prepended {
        head: Some(head),
        rest,
    }
    .boxed()
}

pub(crate) fn incoming(body: Incoming) -> Body {
    body.map_err(|e| Box::new(e) as BoxError).boxed()
}
