//! Masking on the request path: a tenant's masking rules applied to the
//! data that leaves it (requests its callers send across the boundary a
//! rule names; with `responses = true`, responses its agents send), on the
//! calling node, before anything crosses the overlay or reaches the caller.
//!
//! JSON and text bodies are masked whole (requests are buffered for it;
//! responses up to the buffer limit); an event stream is masked event by
//! event as it flows, so SSE keeps streaming. Fail closed: a body a rule
//! must mask but cannot parse (compressed, binary, over the buffer limit) is
//! refused, 415 or 413, unless every rule that applies says
//! `unparseable = "pass"`. The audit log records how many values each rule
//! masked (a `masked` entry), never the values.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use dmsc_mask::{Counts, Unmaskable};
use dmsc_policy::{Masking, Situation};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame};
use hyper::header::{HeaderMap, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::Response;

use crate::proto::http::{Body, BoxError, ErrorKind, MeshError};

fn header(h: &HeaderMap, name: hyper::header::HeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Why a body was not masked.
pub fn unmaskable(me: &str, tenant: &str, what: &str, e: &Unmaskable) -> MeshError {
    let kind = if e.http_status() == 413 {
        ErrorKind::TooLarge
    } else {
        ErrorKind::Unmaskable
    };
    MeshError::new(
        kind,
        me,
        format!("tenant `{tenant}`'s policy requires masking the {what}, which cannot be masked: {e} (rule `{tenant}:mask`)"),
    )
}

/// Masks a buffered request body. `Ok(None)`: nothing to do or nothing
/// matched (the bytes go as they are).
pub fn request(
    m: &Masking,
    headers: &HeaderMap,
    body: &Bytes,
    counts: &mut Counts,
) -> Result<Option<Bytes>, Unmaskable> {
    if body.is_empty() {
        return Ok(None);
    }
    let masked = m.masker.mask_body(
        header(headers, CONTENT_TYPE),
        header(headers, CONTENT_ENCODING),
        body,
        counts,
    );
    match masked {
        Ok(std::borrow::Cow::Borrowed(_)) => Ok(None),
        Ok(std::borrow::Cow::Owned(v)) => Ok(Some(Bytes::from(v))),
        Err(_) if !m.refuse_unparseable => Ok(None),
        Err(e) => Err(e),
    }
}

/// What a masked response reports when its body ends.
pub type OnDone = Box<dyn FnOnce(&Counts) + Send + Sync>;

/// Masks a response as it leaves the provider's tenant: an event stream
/// event by event; anything else buffered (up to `limit`) and masked whole.
pub async fn response(
    m: Masking,
    me: String,
    tenant: String,
    resp: Response<Body>,
    limit: usize,
    done: OnDone,
) -> Result<Response<Body>, MeshError> {
    let (me, tenant) = (me.as_str(), tenant.as_str());
    let kind = dmsc_mask::classify(
        header(resp.headers(), CONTENT_TYPE),
        header(resp.headers(), CONTENT_ENCODING),
    );
    if let Ok(dmsc_mask::BodyKind::EventStream) = kind {
        let (mut parts, body) = resp.into_parts();
        parts.headers.remove(CONTENT_LENGTH);
        let sse = SseBody {
            inner: body,
            masker: Some(m.masker.sse(dmsc_mask::DEFAULT_MAX_EVENT)),
            counts: Counts::new(),
            done: Some(done),
            ended: false,
        };
        return Ok(Response::from_parts(parts, sse.boxed()));
    }
    if let Err(e) = kind {
        if !m.refuse_unparseable {
            return Ok(resp);
        }
        return Err(unmaskable(me, tenant, "response", &e));
    }
    let (mut parts, body) = resp.into_parts();
    if body.size_hint().lower() as usize > limit {
        return Err(unmaskable(
            me,
            tenant,
            "response",
            &Unmaskable::EventTooLarge { limit },
        ));
    }
    // Read frame by frame with a bound (not `Limited`: its boxed error
    // trips rustc's Send check in the spawned connection futures).
    let too_large = |why: String| {
        MeshError::new(
            ErrorKind::TooLarge,
            me,
            format!("tenant `{tenant}`'s policy requires masking the response, which {why} (rule `{tenant}:mask`)"),
        )
    };
    let mut body = body;
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| too_large(format!("failed while read: {e}")))?;
        if let Ok(d) = frame.into_data() {
            if buf.len() + d.len() > limit {
                return Err(too_large(format!("is over the {limit}-byte buffer")));
            }
            buf.extend_from_slice(&d);
        }
    }
    let bytes = buf.freeze();
    let mut counts = Counts::new();
    let out = match m.masker.mask_body(
        header(&parts.headers, CONTENT_TYPE),
        header(&parts.headers, CONTENT_ENCODING),
        &bytes,
        &mut counts,
    ) {
        Ok(std::borrow::Cow::Borrowed(_)) => bytes,
        Ok(std::borrow::Cow::Owned(v)) => Bytes::from(v),
        Err(_) if !m.refuse_unparseable => bytes,
        Err(e) => return Err(unmaskable(me, tenant, "response", &e)),
    };
    done(&counts);
    parts.headers.remove(CONTENT_LENGTH);
    parts.headers.remove(hyper::header::ETAG);
    parts.headers.remove("digest");
    parts.headers.remove("content-digest");
    Ok(Response::from_parts(parts, crate::proto::http::full(out)))
}

/// An event stream masked event by event.
struct SseBody {
    inner: Body,
    masker: Option<dmsc_mask::SseMasker>,
    counts: Counts,
    done: Option<OnDone>,
    ended: bool,
}

impl SseBody {
    fn finish(&mut self) {
        if let Some(done) = self.done.take() {
            done(&self.counts);
        }
    }
}

impl hyper::body::Body for SseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let Some(m) = this.masker.as_mut() else {
                            continue;
                        };
                        match m.feed(&data, &mut this.counts) {
                            Ok(out) if out.is_empty() => continue,
                            Ok(out) => return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out))))),
                            Err(e) => {
                                this.ended = true;
                                this.finish();
                                return Poll::Ready(Some(Err(Box::new(e))));
                            }
                        }
                    }
                    // Trailers pass as they are.
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                Poll::Ready(Some(Err(e))) => {
                    this.ended = true;
                    this.finish();
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    this.ended = true;
                    let tail = match this.masker.take() {
                        Some(m) => m.finish(&mut this.counts),
                        None => Ok(Vec::new()),
                    };
                    this.finish();
                    return match tail {
                        Ok(t) if t.is_empty() => Poll::Ready(None),
                        Ok(t) => Poll::Ready(Some(Ok(Frame::data(Bytes::from(t))))),
                        Err(e) => Poll::Ready(Some(Err(Box::new(e)))),
                    };
                }
            }
        }
    }
}

impl Drop for SseBody {
    fn drop(&mut self) {
        // A stream the caller abandoned still reports what it masked.
        self.finish();
    }
}

/// The situation of a body going from `from` tenant's caller to `to`.
pub fn situation(from: &str, to: &str, cross_region: bool, response: bool) -> Situation {
    Situation {
        cross_tenant: from != to,
        cross_region,
        response,
    }
}
