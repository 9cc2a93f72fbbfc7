//! Delivery to a remote agent's home node: one QUIC bidirectional stream
//! per delegation, the head and body written in the delegation wire format
//! (`proto::wire`), the response head read back (its typed failure, when the
//! home node failed it, becomes this node's [`Failure`]), the body streamed
//! through as it comes.
//!
//! Except when losing the response could still be retried
//! ([`Attempts::holds_response`]: idempotent, replayable, not a stream):
//! then the body is read here until it is whole, [`RESPONSE_HOLD_LIMIT`]
//! bytes arrived, the node's body budget says no, or the deadline passes,
//! and only then handed on. Nothing reaches the caller before that, so a
//! home node or path lost meanwhile is an ordinary maybe-delivered failure
//! and the next candidate is tried. Once handed on, a cut still reaches the
//! caller as an error (the body fails; the edge never ends it cleanly).

use std::time::Duration;

use bytes::Bytes;
use dmsc_registry::AgentId;
use dmsc_transport::{BiStream, Channel, StreamRecv, StreamSend};
use http_body_util::BodyExt;
use hyper::body::Frame;
use hyper::{Response, StatusCode};
use tokio::time::Instant;
use tracing::{debug, Instrument};

use super::body::{guarded, AbortOnDrop};
use super::budget::BodyPermit;
use super::{Delegator, ReqBody};
use crate::proto::http::{Body, BoxError, ErrorKind, MeshError};
use crate::proto::outcome::Failure;
use crate::proto::wire::{
    self, Part, PartDecoder, RequestHeadRef, DELEGATION_VERSION, OLDEST_VERSION,
};
use crate::route::attempts::Attempts;

/// How long past the deadline the calling node waits for the home node's
/// own verdict (it enforces the same deadline and reports where it ran
/// out) before answering the timeout itself.
const HOME_VERDICT_GRACE: Duration = Duration::from_millis(100);
const READ_CHUNK: usize = 64 * 1024;
/// The most of one response the calling node holds back (charged to the
/// node's body budget) so that losing it can still be retried elsewhere;
/// a larger body is handed on once this much has arrived.
pub(crate) const RESPONSE_HOLD_LIMIT: usize = 64 * 1024;

impl Delegator {
    /// Sends a delegation to a remote agent's home node over the overlay.
    pub(super) async fn deliver_remote(
        &self,
        node: &str,
        id: &AgentId,
        mut head: RequestHeadRef<'_>,
        body: ReqBody,
        deadline: Instant,
        plan: &Attempts,
    ) -> Result<Response<Body>, Failure> {
        let not_delivered = |detail: String| {
            Failure::NotDelivered(
                MeshError::new(ErrorKind::Unreachable, &self.me, detail).agent(id),
            )
        };
        // The home node could not be reached: the path's failure, not the
        // agent's.
        let path_failed = |detail: String, maybe_delivered: bool| Failure::Path {
            error: MeshError::new(ErrorKind::Unreachable, &self.me, detail).agent(id),
            maybe_delivered,
        };
        let Some((addr, speaks)) = self.mesh.node_route(node) else {
            return Err(not_delivered(format!(
                "home node `{node}` cannot be reached now: {}",
                self.mesh.unroutable_reason(node)
            )));
        };
        // The newest version both sides speak (an older peer during a
        // rolling upgrade gets the version it reads, and answers in it).
        head.version = speaks.clamp(OLDEST_VERSION, DELEGATION_VERSION);
        if head.version < 3 && (head.caller_tenant != head.tenant || !head.data_tags.is_empty()) {
            // A head before version 3 cannot say whose call it is or what
            // data it carries: the home node could not check its policy.
            return Err(not_delivered(format!(
                "home node `{node}` speaks delegation wire version {} and cannot check a cross-tenant or data-tagged call (version 3 can); upgrade it",
                head.version
            )));
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let stream = match tokio::time::timeout(
            remaining,
            self.overlay.open_stream(addr, Channel::Delegate),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(path_failed(
                    format!("home node `{node}` unreachable: {e}"),
                    false,
                ))
            }
            Err(_) => {
                // Within the caller's deadline: a timeout (not charged when
                // the caller chose a short one).
                return Err(Failure::Path {
                    error: MeshError::new(
                        ErrorKind::Timeout,
                        &self.me,
                        format!("home node `{node}` could not be reached within the deadline"),
                    )
                    .agent(id),
                    maybe_delivered: false,
                });
            }
        };
        let BiStream {
            mut send,
            mut recv,
            peer,
            ..
        } = stream;
        if *peer != *node {
            // A stale address now belongs to another node: not our target.
            send.reset(dmsc_transport::overlay::RESET_CANCELLED);
            return Err(path_failed(
                format!("the address of home node `{node}` now answers as `{peer}`"),
                false,
            ));
        }
        let mut parts: Vec<Bytes> = match wire::encode_request_head(head) {
            Ok(p) => {
                // Room for the body's part header and bytes too.
                let mut parts = Vec::with_capacity(4);
                parts.extend(p);
                parts
            }
            Err(e) => return Err(not_delivered(format!("cannot encode the request: {e}"))),
        };
        let mut guards: Vec<Box<dyn Send + Sync>> = Vec::new();
        if let ReqBody::Buffered(bytes) = body {
            // The common case: head and body in one write.
            wire::encode_data(bytes, &mut parts);
            if let Err(e) = send.write_chunks(&mut parts).await {
                return Err(path_failed(format!("home node `{node}`: {e}"), false));
            }
            let _ = send.finish();
        } else {
            let body = body.into_body();
            if let Err(e) = send.write_chunks(&mut parts).await {
                return Err(path_failed(format!("home node `{node}`: {e}"), false));
            }
            let task = tokio::spawn(pump_body(body, send).in_current_span());
            guards.push(Box::new(AbortOnDrop(task)));
        }
        // The home node enforces the deadline itself and says so; give its
        // verdict a moment to arrive before answering for it.
        let remaining = (deadline + HOME_VERDICT_GRACE).saturating_duration_since(Instant::now());
        let mut decoder = PartDecoder::new();
        let head = match tokio::time::timeout(remaining, read_part(&mut recv, &mut decoder)).await {
            Err(_) => {
                recv.stop(dmsc_transport::overlay::RESET_CANCELLED);
                return Err(Failure::MaybeDelivered(
                    MeshError::new(
                        ErrorKind::Timeout,
                        &self.me,
                        format!("no response from `{id}` (via node `{node}`) within the deadline"),
                    )
                    .agent(id),
                ));
            }
            Ok(Ok(Some(Part::Head(h)))) => wire::decode_response_head(&h),
            Ok(Ok(other)) => {
                return Err(Failure::MaybeDelivered(
                    MeshError::new(
                        ErrorKind::Unreachable,
                        &self.me,
                        format!("home node `{node}` sent {other:?} instead of a response head"),
                    )
                    .agent(id),
                ))
            }
            Ok(Err(e @ wire::WireError::ConnectionLost(_))) => {
                return Err(path_failed(
                    format!("the connection to home node `{node}` was lost mid-delegation: {e}"),
                    true,
                ))
            }
            Ok(Err(e)) => {
                return Err(Failure::MaybeDelivered(
                    MeshError::new(
                        ErrorKind::Unreachable,
                        &self.me,
                        format!("home node `{node}` failed mid-delegation: {e}"),
                    )
                    .agent(id),
                ))
            }
        };
        // The home node answered (a failure of its own included): the path
        // to it works.
        self.mesh.record_path(node, true);
        let mut head = head.map_err(|e| {
            Failure::MaybeDelivered(
                MeshError::new(
                    ErrorKind::Unreachable,
                    &self.me,
                    format!("home node `{node}`: {e}"),
                )
                .agent(id),
            )
        })?;
        if let Some(failure) = head.failure {
            // Version 2: the home node (not the agent) failed it, typed.
            let e = MeshError::from_wire(failure);
            return Err(if e.kind == ErrorKind::BadRequest && head.delivered {
                // The home node took the delegation and judged the request
                // (or the stream it arrived on) malformed: nothing the
                // agent did. (A head it could not read stays "not
                // delivered", so another candidate is tried.)
                Failure::Caller(e)
            } else if head.delivered {
                Failure::MaybeDelivered(e)
            } else {
                Failure::NotDelivered(e)
            });
        }
        if !head.delivered {
            // A version 1 home node renders its failures into the response;
            // what counts for the retry rules is that nothing was delivered.
            return Err(not_delivered(format!(
                "home node `{node}` answered {} without delivering (delegation wire version {})",
                head.status, head.version
            )));
        }
        let headers = std::mem::take(&mut head.headers);
        let content_type = headers
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let body = if is_grpc_trailers_only(&headers) {
            // gRPC "Trailers-Only": the status came in the head and nothing
            // follows. An empty body lets hyper end the stream with that
            // HEADERS frame; a streamed one would add an empty DATA frame
            // that ends it instead, which gRPC clients refuse ("Stream
            // removed"), losing the agent's status.
            let _ = ended_already(&mut recv, &mut decoder);
            crate::proto::http::empty()
        } else if plan.holds_response(content_type) {
            // Empty reservations always succeed.
            let mut permit = self.budget.try_reserve(0);
            match hold(
                recv,
                decoder,
                deadline,
                permit.as_mut(),
                declared_len(&headers),
            )
            .await
            {
                Ok(held) => {
                    guards.extend(permit.map(|p| Box::new(p) as Box<dyn Send + Sync>));
                    held
                }
                Err(e) => {
                    debug!(agent = %id, node = %node, error = %e, "response lost while held back");
                    return Err(Failure::MaybeDelivered(
                        MeshError::new(
                            ErrorKind::Unreachable,
                            &self.me,
                            format!("the response through home node `{node}` broke off before it was whole (the agent cut it, or the node or the path was lost; nothing had reached the caller): {e}"),
                        )
                        .agent(id),
                    ));
                }
            }
        } else {
            stream_body(recv, decoder, declared_len(&headers))
        };
        let mut resp = Response::new(guarded(body, guards));
        *resp.status_mut() = StatusCode::from_u16(head.status).unwrap_or(StatusCode::BAD_GATEWAY);
        *resp.headers_mut() = headers;
        Ok(resp)
    }
}

/// Reads until one whole part is available; `None` at a clean end of stream.
pub(super) async fn read_part(
    recv: &mut StreamRecv,
    decoder: &mut PartDecoder,
) -> Result<Option<Part>, wire::WireError> {
    loop {
        if let Some(p) = decoder.next_part()? {
            return Ok(Some(p));
        }
        let chunk = recv.read_chunk(READ_CHUNK).await.map_err(|e| match e {
            dmsc_transport::TransportError::ConnectionLost(e) => wire::WireError::ConnectionLost(e),
            e => wire::WireError::Stream(e.to_string()),
        })?;
        match chunk {
            Some(bytes) => decoder.push_bytes(bytes),
            None => {
                decoder.finish()?;
                return Ok(None);
            }
        }
    }
}

/// Reads a response body until it is whole, [`RESPONSE_HOLD_LIMIT`] bytes
/// arrived, `permit` cannot cover more, or `deadline` passes; then it is
/// the body to hand on: what was held, followed by the rest of the stream
/// if there is more. An error while holding means the response was lost
/// before any of it was handed on.
async fn hold(
    mut recv: StreamRecv,
    mut decoder: PartDecoder,
    deadline: Instant,
    mut permit: Option<&mut BodyPermit>,
    declared: Option<u64>,
) -> Result<Body, wire::WireError> {
    let mut held: Vec<Frame<Bytes>> = Vec::new();
    let mut bytes = 0usize;
    let whole = loop {
        let part = match tokio::time::timeout_at(deadline, read_part(&mut recv, &mut decoder)).await
        {
            // Slow to finish: hand on what came, the rest follows as it comes.
            Err(_) => break false,
            Ok(part) => part?,
        };
        match part {
            None => break true,
            Some(Part::Data(d)) if d.is_empty() => {}
            Some(Part::Data(d)) => {
                bytes += d.len();
                held.push(Frame::data(d));
                let covered = permit.as_mut().is_none_or(|p| p.grow_or_not(bytes));
                if bytes >= RESPONSE_HOLD_LIMIT || !covered {
                    break false;
                }
            }
            Some(Part::Trailers(t)) => held.push(Frame::trailers(t)),
            Some(Part::Head(_)) => return Err(wire::WireError::Unexpected("second head")),
        }
    };
    let held = futures_util::stream::iter(held.into_iter().map(Ok::<_, BoxError>));
    Ok(if whole {
        http_body_util::StreamBody::new(held).boxed()
    } else {
        let left = declared.map(|n| n.saturating_sub(bytes as u64));
        http_body_util::StreamBody::new(futures_util::StreamExt::chain(
            held,
            frames(recv, decoder, left),
        ))
        .boxed()
    })
}

/// The rest of a delegation stream as an HTTP body (data and trailers);
/// `declared`: the body's `content-length`, if it has one.
pub(super) fn stream_body(recv: StreamRecv, decoder: PartDecoder, declared: Option<u64>) -> Body {
    http_body_util::StreamBody::new(frames(recv, decoder, declared)).boxed()
}

/// A gRPC response whose head already carries its `grpc-status`: the
/// "Trailers-Only" form, which has no body and no trailers.
fn is_grpc_trailers_only(headers: &hyper::HeaderMap) -> bool {
    headers.contains_key("grpc-status") && crate::proto::http::is_grpc(headers)
}

/// The `content-length` of a message with these headers, if it has one.
pub(super) fn declared_len(headers: &hyper::HeaderMap) -> Option<u64> {
    headers
        .get(hyper::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Whether the stream, with nothing left in `decoder`, has already ended
/// cleanly (its FIN came with the data just decoded). A body whose length
/// is known is dropped by hyper as soon as that many bytes went out, never
/// polled for its end; a QUIC stream dropped before its end was read sends
/// the peer a STOP_SENDING, one extra packet per delegation. So once a
/// body's declared length has arrived, its end is taken here if it is
/// already there (only then: a body of unknown length is read to its end
/// by hyper anyway); a chunk that came instead is kept in `decoder`, and an
/// error is left for the next read to report.
pub(super) fn ended_already(recv: &mut StreamRecv, decoder: &mut PartDecoder) -> bool {
    use futures_util::FutureExt as _;
    if !decoder.is_empty() {
        return false;
    }
    match recv.read_chunk(READ_CHUNK).now_or_never() {
        Some(Ok(None)) => true,
        Some(Ok(Some(bytes))) => {
            decoder.push_bytes(bytes);
            false
        }
        Some(Err(_)) | None => false,
    }
}

/// The rest of a delegation stream as HTTP body frames.
/// `left`: how many bytes of a declared length are still to come.
fn frames(
    recv: StreamRecv,
    decoder: PartDecoder,
    left: Option<u64>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, BoxError>> + Send {
    futures_util::stream::unfold(Some((recv, decoder, left)), |state| async move {
        let (mut recv, mut decoder, mut left) = state?;
        loop {
            match read_part(&mut recv, &mut decoder).await {
                Ok(Some(Part::Data(d))) => {
                    if d.is_empty() {
                        continue;
                    }
                    left = left.map(|n| n.saturating_sub(d.len() as u64));
                    if left == Some(0) && ended_already(&mut recv, &mut decoder) {
                        // Read to its end: dropping it now sends nothing.
                        return Some((Ok(Frame::data(d)), None));
                    }
                    return Some((Ok(Frame::data(d)), Some((recv, decoder, left))));
                }
                Ok(Some(Part::Trailers(t))) => {
                    return Some((Ok(Frame::trailers(t)), Some((recv, decoder, left))));
                }
                Ok(Some(Part::Head(_))) => {
                    let e: BoxError = Box::new(wire::WireError::Unexpected("second head"));
                    return Some((Err(e), None));
                }
                Ok(None) => return None,
                Err(e) => return Some((Err(Box::new(e) as BoxError), None)),
            }
        }
    })
}

/// Most bytes [`send_body`] gathers before it writes.
const COALESCE_LIMIT: usize = 64 * 1024;

/// Why [`send_body`] stopped before the end.
#[derive(Debug)]
pub(super) enum CopyStopped {
    /// The peer stopped reading (STOP_SENDING, a reset, its connection
    /// gone): nobody wants the rest, and the body was dropped at once.
    PeerGone,
    /// The body failed, or writing into the stream did.
    Failed(BoxError),
}

impl std::fmt::Display for CopyStopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CopyStopped::PeerGone => f.write_str("the peer stopped reading"),
            CopyStopped::Failed(e) => std::fmt::Display::fmt(e, f),
        }
    }
}

/// Sends `parts` (already encoded, e.g. a response head) and then `body`
/// into the stream, and finishes it. Whatever the body has ready is taken
/// into the same write, and a body that ends at once is finished with it:
/// a small answer leaves as one QUIC packet (head, data and FIN), not one
/// per part (each packet costs a system call and a wake-up on both sides).
///
/// While it waits on the body it also watches the peer: a peer that stops
/// reading ends the copy at once ([`CopyStopped::PeerGone`]) and `body` is
/// dropped, which cancels its source (an agent's response: hyper resets
/// the HTTP/2 stream or closes the HTTP/1.1 connection). Without the watch
/// a source that is silent for long (a watch, a long poll, SSE) would be
/// noticed only at its next write. One watch serves the whole copy and is
/// polled only when the body has nothing ready.
pub(super) async fn send_body(
    mut parts: Vec<Bytes>,
    mut body: Body,
    send: &mut StreamSend,
) -> Result<(), CopyStopped> {
    use futures_util::FutureExt as _;
    let gone = send.stopped();
    tokio::pin!(gone);
    loop {
        let pending: usize = parts.iter().map(Bytes::len).sum();
        if pending >= COALESCE_LIMIT {
            write_parts(send, &mut parts, gone.as_mut()).await?;
        }
        let frame = if parts.is_empty() {
            tokio::select! {
                // The body first: the watch is polled only when it waits.
                biased;
                f = body.frame() => f,
                () = &mut gone => return Err(CopyStopped::PeerGone),
            }
        } else {
            match body.frame().now_or_never() {
                Some(f) => f,
                None => {
                    // Nothing more right now: send what there is and wait.
                    write_parts(send, &mut parts, gone.as_mut()).await?;
                    continue;
                }
            }
        };
        let Some(frame) = frame else { break };
        match frame.map_err(CopyStopped::Failed)?.into_data() {
            Ok(data) => wire::encode_data(data, &mut parts),
            Err(f) => {
                if let Ok(t) = f.into_trailers() {
                    parts.extend(
                        wire::encode_trailers(&t).map_err(|e| CopyStopped::Failed(e.into()))?,
                    );
                }
            }
        }
    }
    if !parts.is_empty() {
        write_parts(send, &mut parts, gone).await?;
    }
    send.finish().map_err(|e| CopyStopped::Failed(e.into()))?;
    Ok(())
}

/// Writes and empties `parts`. A write fails once the peer stopped
/// reading: that is the peer gone, not a failure of the copy.
async fn write_parts(
    send: &mut StreamSend,
    parts: &mut Vec<Bytes>,
    gone: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> Result<(), CopyStopped> {
    use futures_util::FutureExt as _;
    let written = send.write_chunks(parts).await;
    parts.clear();
    written.map_err(|e| match gone.now_or_never() {
        Some(()) => CopyStopped::PeerGone,
        None => CopyStopped::Failed(e.into()),
    })
}

/// The request body of a streamed remote delegation (runs beside the
/// response read).
async fn pump_body(body: Body, mut send: StreamSend) {
    // The home node stopping the request stream (its agent answered
    // without reading it all, or it gave up) ends the copy at once too,
    // and with it the caller's upload.
    if let Err(e) = send_body(Vec::new(), body, &mut send).await {
        debug!(error = %e, "body copy into the overlay stopped");
        send.reset(dmsc_transport::overlay::RESET_CANCELLED);
    }
}
