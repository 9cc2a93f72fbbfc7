//! Which protocol each local agent speaks, and whether it is alive.
//!
//! An agent is declared with a URL and nothing more, so the node finds out
//! how to talk to it. HTTP/1.1 first, as most A2A agents speak it; when the
//! connection succeeds but the HTTP/1.1 exchange fails at the protocol level
//! (an HTTP/2-only server, such as a default grpc-go, grpcio or tonic server,
//! answers the request line with a GOAWAY and closes), HTTP/2 with prior
//! knowledge (h2c): the standard gRPC health protocol
//! (`grpc.health.v1.Health/Check`, whose serving status counts, and whose
//! `UNIMPLEMENTED` means a gRPC server without the health service: alive),
//! then, if the answer is not gRPC at all, a plain h2c `GET` of the health
//! path. A refused or silent connection proves nothing about the protocol:
//! the agent is unhealthy and what was learnt stays.
//!
//! What answered is remembered per agent ([`ProtocolState`]) and checked
//! first next time; delivery reads it to call an HTTP/2-only agent over
//! HTTP/2 even when the caller spoke HTTP/1.1. `protocol = "…"` in
//! `[[agents]]` pins it: only that protocol is probed and used.
//!
//! The gRPC answer is decoded by pure functions (length-prefixed frame,
//! `grpc-status` from the trailers or a trailers-only head, the one-field
//! `HealthCheckResponse`), so a protobuf runtime is not a dependency of the
//! node and the decoders are tested on bytes alone.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use dmsc_registry::AgentId;
use http_body_util::BodyExt;
use hyper::header::{HeaderMap, HeaderValue, CONTENT_TYPE, TE};
use hyper::{Method, Request, StatusCode, Uri, Version};
use tracing::info;

use crate::forward::client::Upstream;
use crate::forward::local::{Protocol, ProtocolState};
use crate::proto::http::{empty, error_chain, full};

/// The gRPC health method (grpc.health.v1), relative to the agent's URL.
pub const GRPC_HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
/// How long one probe may take, connection and answer included.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Plenty for a `HealthCheckResponse` (a few bytes) or a health page.
const MAX_ANSWER: usize = 64 * 1024;
/// An empty `HealthCheckRequest` (service "": the server as a whole),
/// length-prefixed: not compressed, length 0.
const EMPTY_CHECK_REQUEST: [u8; 5] = [0; 5];

/// Why an agent is not healthy (logged when its health changes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Down {
    #[error("bad health URL: {0}")]
    BadUri(String),
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("answered HTTP {0}")]
    Status(StatusCode),
    #[error("gRPC health check says {0}")]
    NotServing(ServingStatus),
    #[error("gRPC health check failed with status {code}: {message}")]
    GrpcStatus { code: u32, message: String },
    #[error("gRPC health answer: {0}")]
    Decode(#[from] GrpcDecodeError),
    /// Connected, but the exchange failed at the protocol level.
    #[error("{protocol} exchange failed: {reason}")]
    Protocol { protocol: Protocol, reason: String },
    #[error("answers none of HTTP/1.1, gRPC or h2c ({0})")]
    NoProtocol(String),
}

/// One probe over one protocol.
#[derive(Debug)]
enum Attempt {
    /// The agent answered in this protocol: alive, or why not.
    Answered(Protocol, Result<(), Down>),
    /// Nothing answered (refused, silent): says nothing about the protocol.
    Unreachable(Down),
    /// Something answered, but not in this protocol.
    WrongProtocol(Down),
}

/// Health-checks one agent at `health` (its health path) and `grpc` (its
/// gRPC health method): `Ok` with the protocol that answered when it is
/// alive. Updates what `state` knows of the agent's protocol.
pub async fn check(
    upstream: &Upstream,
    agent: &AgentId,
    state: &ProtocolState,
    health: &Uri,
    grpc: &Uri,
) -> Result<Protocol, Down> {
    if let Some(p) = state.pinned() {
        return match probe(upstream, p, health, grpc).await {
            Attempt::Answered(_, verdict) => verdict.map(|()| p),
            Attempt::Unreachable(why) | Attempt::WrongProtocol(why) => Err(why),
        };
    }
    let known = state.current();
    let mut wrong = Vec::new();
    // What answered last time first; if that fails at the protocol level
    // (the agent changed, or its connection broke mid-exchange), discovery
    // from the start, so that a gRPC server is found as gRPC again and not
    // as the plain h2c server it also is.
    let order = known.into_iter().chain(Protocol::ALL);
    for p in order {
        match probe(upstream, p, health, grpc).await {
            Attempt::Answered(p, verdict) => {
                if state.learn(Some(p)) {
                    info!(%agent, protocol = %p, "agent answers health checks over {}", describe(p));
                }
                return verdict.map(|()| p);
            }
            Attempt::Unreachable(why) => return Err(why),
            Attempt::WrongProtocol(why) => wrong.push(why.to_string()),
        }
    }
    // Something listens but speaks none of them: forget what was learnt,
    // so delivery follows the caller again.
    state.learn(None);
    Err(Down::NoProtocol(wrong.join("; ")))
}

fn describe(p: Protocol) -> &'static str {
    match p {
        Protocol::Http1 => "HTTP/1.1",
        Protocol::H2c => "HTTP/2 (h2c, not gRPC)",
        Protocol::Grpc => "gRPC (HTTP/2 only)",
    }
}

async fn probe(upstream: &Upstream, p: Protocol, health: &Uri, grpc: &Uri) -> Attempt {
    let (client, req) = match p {
        Protocol::Http1 => (&upstream.h1, get(health, Version::HTTP_11)),
        Protocol::H2c => (&upstream.h2, get(health, Version::HTTP_2)),
        Protocol::Grpc => (&upstream.h2, grpc_check(grpc)),
    };
    let req = match req {
        Ok(r) => r,
        Err(e) => return Attempt::Unreachable(Down::BadUri(e.to_string())),
    };
    let (head, body) = match tokio::time::timeout(PROBE_TIMEOUT, client.request(req)).await {
        Err(_) => return Attempt::Unreachable(Down::Timeout(PROBE_TIMEOUT)),
        Ok(Err(e)) if e.is_connect() => {
            return Attempt::Unreachable(Down::Connect(error_chain(&e)))
        }
        Ok(Err(e)) => {
            return Attempt::WrongProtocol(Down::Protocol {
                protocol: p,
                reason: error_chain(&e),
            })
        }
        Ok(Ok(resp)) => resp.into_parts(),
    };
    // A health page is read only to keep the connection reusable (a slow or
    // endless one is given up on); a gRPC answer needs message and trailers.
    let body = tokio::time::timeout(
        PROBE_TIMEOUT,
        http_body_util::Limited::new(body, MAX_ANSWER).collect(),
    )
    .await
    .ok()
    .and_then(Result::ok);
    if p != Protocol::Grpc {
        let verdict = if head.status.is_server_error() {
            Err(Down::Status(head.status))
        } else {
            Ok(())
        };
        return Attempt::Answered(p, verdict);
    }
    let (bytes, trailers) = match body {
        Some(c) => {
            let trailers = c.trailers().cloned();
            (c.to_bytes(), trailers)
        }
        None => (Bytes::new(), None),
    };
    match grpc_health(&head.headers, &bytes, trailers.as_ref()) {
        Ok(GrpcHealth::NotGrpc) => Attempt::WrongProtocol(Down::Protocol {
            protocol: p,
            reason: format!("HTTP {} without grpc-status", head.status),
        }),
        Ok(GrpcHealth::Status(ServingStatus::Serving)) | Ok(GrpcHealth::Unimplemented) => {
            Attempt::Answered(p, Ok(()))
        }
        Ok(GrpcHealth::Status(s)) => Attempt::Answered(p, Err(Down::NotServing(s))),
        Ok(GrpcHealth::Failed { code, message }) => {
            Attempt::Answered(p, Err(Down::GrpcStatus { code, message }))
        }
        Err(e) => Attempt::Answered(p, Err(Down::Decode(e))),
    }
}

fn get(
    uri: &Uri,
    version: Version,
) -> Result<Request<crate::proto::http::Body>, hyper::http::Error> {
    Request::builder()
        .method(Method::GET)
        .uri(uri.clone())
        .version(version)
        .body(empty())
}

fn grpc_check(uri: &Uri) -> Result<Request<crate::proto::http::Body>, hyper::http::Error> {
    Request::builder()
        .method(Method::POST)
        .uri(uri.clone())
        .version(Version::HTTP_2)
        .header(CONTENT_TYPE, HeaderValue::from_static("application/grpc"))
        .header(TE, HeaderValue::from_static("trailers"))
        .body(full(Bytes::from_static(&EMPTY_CHECK_REQUEST)))
}

/// The serving status of a `HealthCheckResponse` (grpc.health.v1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServingStatus {
    Unknown,
    Serving,
    NotServing,
    /// Only for a named service; the node asks about the server ("").
    ServiceUnknown,
    /// A value this version of the protocol does not define.
    Other(u64),
}

impl ServingStatus {
    fn from_wire(v: u64) -> ServingStatus {
        match v {
            0 => ServingStatus::Unknown,
            1 => ServingStatus::Serving,
            2 => ServingStatus::NotServing,
            3 => ServingStatus::ServiceUnknown,
            v => ServingStatus::Other(v),
        }
    }
}

impl fmt::Display for ServingStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServingStatus::Unknown => f.write_str("UNKNOWN"),
            ServingStatus::Serving => f.write_str("SERVING"),
            ServingStatus::NotServing => f.write_str("NOT_SERVING"),
            ServingStatus::ServiceUnknown => f.write_str("SERVICE_UNKNOWN"),
            ServingStatus::Other(v) => write!(f, "serving status {v}"),
        }
    }
}

/// What a gRPC health check answer says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrpcHealth {
    /// No `grpc-status` and not `application/grpc`: not a gRPC server.
    NotGrpc,
    /// `OK`, with the serving status of the server.
    Status(ServingStatus),
    /// `UNIMPLEMENTED`: a gRPC server without the health service.
    Unimplemented,
    /// Any other `grpc-status`.
    Failed { code: u32, message: String },
}

/// A gRPC answer that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrpcDecodeError {
    #[error("grpc-status `{0}` is not a number")]
    BadStatus(String),
    #[error("a gRPC response without grpc-status")]
    NoStatus,
    #[error("grpc-status 0 but no message")]
    NoMessage,
    #[error("message frame cut short: {have} of {need} bytes")]
    Truncated { need: usize, have: usize },
    #[error("compressed message (no encoding was offered)")]
    Compressed,
    #[error("bad frame flag {0:#04x}")]
    BadFlag(u8),
    #[error("protobuf: {0}")]
    Protobuf(&'static str),
}

/// `grpc-status` UNIMPLEMENTED.
const UNIMPLEMENTED: u32 = 12;

/// Reads a gRPC health check answer: the status from the trailers, or
/// from the head of a trailers-only answer, then the message if it is OK.
pub fn grpc_health(
    head: &HeaderMap,
    body: &[u8],
    trailers: Option<&HeaderMap>,
) -> Result<GrpcHealth, GrpcDecodeError> {
    let from = trailers
        .filter(|t| t.contains_key("grpc-status"))
        .unwrap_or(head);
    let Some(code) = grpc_status(from)? else {
        let grpc = head
            .get(CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        return if grpc {
            Err(GrpcDecodeError::NoStatus)
        } else {
            Ok(GrpcHealth::NotGrpc)
        };
    };
    match code {
        0 => {
            let msg = first_message(body)?.ok_or(GrpcDecodeError::NoMessage)?;
            Ok(GrpcHealth::Status(serving_status(msg)?))
        }
        UNIMPLEMENTED => Ok(GrpcHealth::Unimplemented),
        code => Ok(GrpcHealth::Failed {
            code,
            message: from
                .get("grpc-message")
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .unwrap_or_default(),
        }),
    }
}

/// `grpc-status` of a header block, if it has one.
pub fn grpc_status(headers: &HeaderMap) -> Result<Option<u32>, GrpcDecodeError> {
    let Some(v) = headers.get("grpc-status") else {
        return Ok(None);
    };
    let s = String::from_utf8_lossy(v.as_bytes());
    s.trim()
        .parse()
        .map(Some)
        .map_err(|_| GrpcDecodeError::BadStatus(s.into_owned()))
}

/// The first length-prefixed message of a gRPC body (flag byte, 4-byte
/// big-endian length, payload); `None` for an empty body.
pub fn first_message(body: &[u8]) -> Result<Option<&[u8]>, GrpcDecodeError> {
    let Some((&flag, rest)) = body.split_first() else {
        return Ok(None);
    };
    match flag {
        0 => {}
        1 => return Err(GrpcDecodeError::Compressed),
        f => return Err(GrpcDecodeError::BadFlag(f)),
    }
    let Some((len, payload)) = rest.split_first_chunk::<4>() else {
        return Err(GrpcDecodeError::Truncated {
            need: 5,
            have: body.len(),
        });
    };
    let len = u32::from_be_bytes(*len) as usize;
    payload
        .get(..len)
        .map(Some)
        .ok_or(GrpcDecodeError::Truncated {
            need: 5 + len,
            have: body.len(),
        })
}

/// The `status` (field 1, an enum) of a `HealthCheckResponse`; other
/// fields are skipped, an absent status is `UNKNOWN` (proto3 default).
pub fn serving_status(mut msg: &[u8]) -> Result<ServingStatus, GrpcDecodeError> {
    let mut status = 0;
    while !msg.is_empty() {
        let key = varint(&mut msg)?;
        match (key >> 3, key & 7) {
            (0, _) => return Err(GrpcDecodeError::Protobuf("field number 0")),
            (1, 0) => status = varint(&mut msg)?,
            (_, 0) => {
                varint(&mut msg)?;
            }
            (_, 1) => msg = skip(msg, 8)?,
            (_, 2) => {
                let len = usize::try_from(varint(&mut msg)?)
                    .map_err(|_| GrpcDecodeError::Protobuf("length overflow"))?;
                msg = skip(msg, len)?;
            }
            (_, 5) => msg = skip(msg, 4)?,
            _ => return Err(GrpcDecodeError::Protobuf("unsupported wire type")),
        }
    }
    Ok(ServingStatus::from_wire(status))
}

fn skip(msg: &[u8], n: usize) -> Result<&[u8], GrpcDecodeError> {
    msg.get(n..)
        .ok_or(GrpcDecodeError::Protobuf("field cut short"))
}

fn varint(msg: &mut &[u8]) -> Result<u64, GrpcDecodeError> {
    let mut v: u64 = 0;
    for i in 0..10 {
        let Some((&b, rest)) = msg.split_first() else {
            return Err(GrpcDecodeError::Protobuf("varint cut short"));
        };
        *msg = rest;
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(GrpcDecodeError::Protobuf("varint longer than 10 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use prost::Message;
    use tonic_health::pb::{health_check_response, HealthCheckResponse};

    fn framed(msg: &[u8]) -> Vec<u8> {
        let mut v = vec![0];
        v.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        v.extend_from_slice(msg);
        v
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn encoded(status: health_check_response::ServingStatus) -> Vec<u8> {
        HealthCheckResponse {
            status: status as i32,
        }
        .encode_to_vec()
    }

    #[test]
    fn serving_status_reads_what_tonic_health_encodes() {
        use health_check_response::ServingStatus as Pb;
        for (pb, want) in [
            (Pb::Unknown, ServingStatus::Unknown),
            (Pb::Serving, ServingStatus::Serving),
            (Pb::NotServing, ServingStatus::NotServing),
            (Pb::ServiceUnknown, ServingStatus::ServiceUnknown),
        ] {
            assert_eq!(serving_status(&encoded(pb)), Ok(want), "{pb:?}");
        }
        // An unknown field before the status is skipped (forward compatible).
        let mut msg = vec![0x12, 2, b'h', b'i'];
        msg.extend(encoded(Pb::NotServing));
        assert_eq!(serving_status(&msg), Ok(ServingStatus::NotServing));
        assert_eq!(serving_status(&[0x08, 9]), Ok(ServingStatus::Other(9)));
        assert!(serving_status(&[0x08]).is_err());
        assert!(serving_status(&[0x12, 5, 1]).is_err());
        assert!(serving_status(&[0x0b]).is_err(), "wire type 3 (group)");
    }

    #[test]
    fn frames_are_length_prefixed() {
        assert_eq!(first_message(&[]), Ok(None));
        assert_eq!(first_message(&framed(&[])), Ok(Some(&[][..])));
        assert_eq!(
            first_message(&framed(b"\x08\x01")),
            Ok(Some(&b"\x08\x01"[..]))
        );
        assert_eq!(
            first_message(&[0, 0, 0, 0, 3, 8]),
            Err(GrpcDecodeError::Truncated { need: 8, have: 6 })
        );
        assert_eq!(
            first_message(&[0, 0, 0]),
            Err(GrpcDecodeError::Truncated { need: 5, have: 3 })
        );
        assert_eq!(
            first_message(&[1, 0, 0, 0, 0]),
            Err(GrpcDecodeError::Compressed)
        );
        assert_eq!(first_message(b"HTTP/"), Err(GrpcDecodeError::BadFlag(b'H')));
    }

    #[test]
    fn status_comes_from_trailers_or_a_trailers_only_head() {
        let grpc_head = headers(&[("content-type", "application/grpc")]);
        let serving = framed(&encoded(health_check_response::ServingStatus::Serving));
        let not_serving = framed(&encoded(health_check_response::ServingStatus::NotServing));
        let ok = headers(&[("grpc-status", "0")]);
        assert_eq!(
            grpc_health(&grpc_head, &serving, Some(&ok)),
            Ok(GrpcHealth::Status(ServingStatus::Serving))
        );
        assert_eq!(
            grpc_health(&grpc_head, &not_serving, Some(&ok)),
            Ok(GrpcHealth::Status(ServingStatus::NotServing))
        );
        // Trailers-only: the status is in the one HEADERS frame.
        let unimplemented = headers(&[("content-type", "application/grpc"), ("grpc-status", "12")]);
        assert_eq!(
            grpc_health(&unimplemented, &[], None),
            Ok(GrpcHealth::Unimplemented)
        );
        let unavailable = headers(&[
            ("content-type", "application/grpc"),
            ("grpc-status", "14"),
            ("grpc-message", "draining"),
        ]);
        assert_eq!(
            grpc_health(&unavailable, &[], None),
            Ok(GrpcHealth::Failed {
                code: 14,
                message: "draining".into()
            })
        );
        // Trailers win over the head when both have one.
        assert_eq!(
            grpc_health(&unimplemented, &serving, Some(&ok)),
            Ok(GrpcHealth::Status(ServingStatus::Serving))
        );
        // Not gRPC at all: an h2c web server's 404 page.
        let html = headers(&[("content-type", "text/html")]);
        assert_eq!(grpc_health(&html, b"<h1>", None), Ok(GrpcHealth::NotGrpc));
        assert_eq!(
            grpc_health(&HeaderMap::new(), &[], None),
            Ok(GrpcHealth::NotGrpc)
        );
        // gRPC, but broken.
        assert_eq!(
            grpc_health(&grpc_head, &serving, None),
            Err(GrpcDecodeError::NoStatus)
        );
        assert_eq!(
            grpc_health(&grpc_head, &[], Some(&ok)),
            Err(GrpcDecodeError::NoMessage)
        );
        assert_eq!(
            grpc_health(&headers(&[("grpc-status", "ok")]), &[], None),
            Err(GrpcDecodeError::BadStatus("ok".into()))
        );
    }

    #[test]
    fn protocols_parse_and_pin_delivery() {
        assert_eq!(Protocol::parse("grpc"), Some(Protocol::Grpc));
        assert_eq!(Protocol::parse("h2c"), Some(Protocol::H2c));
        assert_eq!(Protocol::parse("http1"), Some(Protocol::Http1));
        assert_eq!(Protocol::parse("http2"), None);
        for p in Protocol::ALL {
            assert_eq!(Protocol::from_code(p.code()), Some(p));
        }

        let unknown = ProtocolState::new(None);
        assert!(!unknown.use_http2(false, false) && unknown.use_http2(true, false));
        assert!(unknown.learn(Some(Protocol::Grpc)));
        assert!(!unknown.learn(Some(Protocol::Grpc)));
        assert!(
            unknown.use_http2(false, false),
            "an h2-only agent gets HTTP/2"
        );
        unknown.learn(Some(Protocol::Http1));
        assert!(!unknown.use_http2(false, false) && !unknown.use_http2(false, true));
        assert!(
            !unknown.use_http2(true, false),
            "an agent that answers HTTP/1.1 gets it from an HTTP/2 caller"
        );
        assert!(unknown.use_http2(true, true), "except gRPC");

        let http1 = ProtocolState::new(Some(Protocol::Http1));
        assert!(
            !http1.use_http2(true, true),
            "pinned http1: HTTP/1.1 for all"
        );
        let h2c = ProtocolState::new(Some(Protocol::H2c));
        assert!(h2c.use_http2(false, false));
        assert_eq!(h2c.current(), Some(Protocol::H2c));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = first_message(&body);
            let _ = serving_status(&body);
            let _ = grpc_health(&headers(&[("grpc-status", "0")]), &body, None);
        }

        #[test]
        fn any_status_value_round_trips(v in any::<i32>()) {
            let msg = HealthCheckResponse { status: v }.encode_to_vec();
            let framed = framed(&msg);
            let got = first_message(&framed).map(|m| m.map(serving_status));
            // prost encodes a negative enum as a 10-byte varint (sign-extended).
            prop_assert_eq!(got, Ok(Some(Ok(ServingStatus::from_wire(i64::from(v) as u64)))));
        }
    }
}
