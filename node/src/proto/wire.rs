//! The delegation wire format: one delegation per overlay bidirectional stream.
//!
//! After the stream preamble (`transport::frame`, channel `Delegate`), each
//! direction carries *parts*, each a big-endian `u32` length, a kind byte and
//! a payload:
//!
//! - caller -> home node: `Head` ([`RequestHead`], postcard), then `Data`
//!   parts (raw body bytes, never re-encoded), optionally one `Trailers`
//!   part, then the stream finishes;
//! - home node -> caller: `Head` ([`ResponseHead`]), `Data` parts,
//!   optionally `Trailers` (what gRPC needs for its status), then finish.
//!
//! The head carries everything the home node needs to re-authorise and
//! deliver without trusting the caller's routing: tenant, caller, target
//! agent, the remaining deadline, a trace id and the HTTP request head. The
//! format has its own version byte inside each head so a future change can be
//! refused with a clear error instead of misread. Decoding is sans-I/O
//! ([`PartDecoder`]) and property-tested.
//!
//! Versions: 2 added a typed failure to the response head (what went wrong,
//! where, for which agent), so the calling node never parses an error body.
//! A node decodes both; it answers in the version of the request, and sends
//! version 2 requests only to peers that announce it (`wire` in their gossip
//! announcement): during a rolling upgrade old and new nodes keep talking.

use bytes::{BufMut, Bytes, BytesMut};
use dmsc_transport::frame::{FrameDecoder, FrameError, MAX_FRAME};
use hyper::header::HeaderMap;
use serde::{Deserialize, Serialize};

/// Newest version of the delegation heads this node writes and accepts.
pub const DELEGATION_VERSION: u8 = 3;
/// Oldest version still decoded (and answered in kind).
pub const OLDEST_VERSION: u8 = 1;

const KIND_HEAD: u8 = 1;
const KIND_DATA: u8 = 2;
const KIND_TRAILERS: u8 = 3;

/// Largest body chunk put in one `Data` part.
pub const MAX_DATA: usize = MAX_FRAME - 1;

/// Headers travel as a postcard sequence of `(name, value)` pairs (names
/// lowercase, values raw bytes), read straight into and out of a
/// [`HeaderMap`]: no list of owned strings in between (see [`header_list`]).
pub type WireHeaders = HeaderMap;

/// The request of one delegation, as the caller's node sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestHead {
    pub version: u8,
    pub tenant: String,
    /// Who asked (for audit and destination-side policy).
    pub caller: String,
    /// The agent name the caller's node selected; the home node re-checks it.
    pub agent: String,
    /// Milliseconds left of the caller's deadline when the head was sent.
    pub deadline_ms: u64,
    pub trace_id: String,
    pub method: String,
    /// Path and query.
    pub path: String,
    /// 2 when the caller spoke HTTP/2 (gRPC needs it end to end), else 1.
    pub http: u8,
    #[serde(with = "header_list")]
    pub headers: WireHeaders,
    /// The request has no body (the home node sends none, not an empty chunked one).
    pub empty_body: bool,
    /// Version 3: the caller's tenant (the consumer of a cross-tenant call;
    /// `tenant` otherwise). Versions 1 and 2 decode with `tenant`.
    pub caller_tenant: String,
    /// Version 3: the request's data tags, sorted (the home node checks
    /// them against the target's policy). Older versions: none.
    pub data_tags: Vec<String>,
}

/// The request head of versions 1 and 2 (no caller tenant, no data tags).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct RequestHeadV2 {
    version: u8,
    tenant: String,
    caller: String,
    agent: String,
    deadline_ms: u64,
    trace_id: String,
    method: String,
    path: String,
    http: u8,
    #[serde(with = "header_list")]
    headers: WireHeaders,
    empty_body: bool,
}

/// The response head the home node sends back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseHead {
    pub version: u8,
    pub status: u16,
    #[serde(with = "header_list")]
    pub headers: WireHeaders,
    /// False when the home node is sure the agent never saw the request
    /// (unknown agent, connect refused, circuit open): safe to retry elsewhere.
    pub delivered: bool,
    /// Version 2: set when the home node (not the agent) failed the
    /// delegation; no body follows. Version 1 heads decode with `None`.
    pub failure: Option<WireFailure>,
}

/// A failure as it crosses the overlay (version 2): the calling node
/// rebuilds the typed error from it and renders it for its caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireFailure {
    /// Stable kind name (`timeout`, `forbidden`, ...: `ErrorKind::as_str`).
    pub kind: String,
    pub detail: String,
    /// The node that decided.
    pub node: String,
    /// `tenant/agent` when one was involved.
    pub agent: Option<String>,
}

/// The version 1 response head (no failure field).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ResponseHeadV1 {
    version: u8,
    status: u16,
    #[serde(with = "header_list")]
    headers: WireHeaders,
    delivered: bool,
}

/// One decoded part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// A postcard-encoded head; decode with [`decode_request_head`] or
    /// [`decode_response_head`].
    Head(Bytes),
    Data(Bytes),
    Trailers(WireHeaders),
}

/// Why delegation bytes were refused.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("empty part (no kind byte)")]
    Empty,
    #[error("unknown part kind {0}")]
    Kind(u8),
    #[error("undecodable {what}: {reason}")]
    Decode { what: &'static str, reason: String },
    #[error("delegation version {0} (this node speaks {OLDEST_VERSION} to {DELEGATION_VERSION})")]
    Version(u8),
    #[error("overlay stream: {0}")]
    Stream(String),
    /// The overlay connection under the stream was lost.
    #[error("overlay connection lost: {0}")]
    ConnectionLost(String),
    #[error("unexpected {0} on a delegation stream")]
    Unexpected(&'static str),
}

fn part_header(kind: u8, len: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(5);
    b.put_u32((len + 1) as u32);
    b.put_u8(kind);
    b.freeze()
}

/// The bytes a header map takes on the wire, about (names, values and
/// their lengths): the size a head's buffer starts at, so encoding it does
/// not grow the buffer step by step.
fn headers_len(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum()
}

/// Encodes a head into a buffer of `size` bytes to start with.
fn encode_head<T: Serialize>(head: &T, size: usize) -> Result<[Bytes; 2], WireError> {
    let body =
        postcard::to_extend(head, Vec::with_capacity(size)).map_err(|e| WireError::Decode {
            what: "head",
            reason: e.to_string(),
        })?;
    if body.len() > MAX_DATA {
        return Err(FrameError::TooLarge(body.len()).into());
    }
    Ok([part_header(KIND_HEAD, body.len()), Bytes::from(body)])
}

/// A request head to send, borrowing from the delegation (no string copied
/// per attempt). Encodes exactly as [`RequestHead`]: the same fields in the
/// same order; before version 3 without the last two (the version 1 and 2
/// layout is a prefix of version 3's).
#[derive(Debug, Clone, Copy)]
pub struct RequestHeadRef<'a> {
    pub version: u8,
    pub tenant: &'a str,
    pub caller: &'a str,
    pub agent: &'a str,
    pub deadline_ms: u64,
    pub trace_id: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub http: u8,
    pub headers: &'a HeaderMap,
    pub empty_body: bool,
    pub caller_tenant: &'a str,
    pub data_tags: &'a [String],
}

impl Serialize for RequestHeadRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let v3 = self.version >= 3;
        let mut st = s.serialize_struct("RequestHead", if v3 { 13 } else { 11 })?;
        st.serialize_field("version", &self.version)?;
        st.serialize_field("tenant", self.tenant)?;
        st.serialize_field("caller", self.caller)?;
        st.serialize_field("agent", self.agent)?;
        st.serialize_field("deadline_ms", &self.deadline_ms)?;
        st.serialize_field("trace_id", self.trace_id)?;
        st.serialize_field("method", self.method)?;
        st.serialize_field("path", self.path)?;
        st.serialize_field("http", &self.http)?;
        st.serialize_field("headers", &header_list::Ser(self.headers))?;
        st.serialize_field("empty_body", &self.empty_body)?;
        if v3 {
            st.serialize_field("caller_tenant", self.caller_tenant)?;
            st.serialize_field("data_tags", self.data_tags)?;
        }
        st.end()
    }
}

impl RequestHead {
    pub fn as_ref(&self) -> RequestHeadRef<'_> {
        RequestHeadRef {
            version: self.version,
            tenant: &self.tenant,
            caller: &self.caller,
            agent: &self.agent,
            deadline_ms: self.deadline_ms,
            trace_id: &self.trace_id,
            method: &self.method,
            path: &self.path,
            http: self.http,
            headers: &self.headers,
            empty_body: self.empty_body,
            caller_tenant: &self.caller_tenant,
            data_tags: &self.data_tags,
        }
    }
}

/// Encodes a request head in its `version` (before 3: without the caller
/// tenant and the data tags).
pub fn encode_request_head(head: RequestHeadRef<'_>) -> Result<[Bytes; 2], WireError> {
    let strings = [
        head.tenant,
        head.caller,
        head.agent,
        head.trace_id,
        head.method,
        head.path,
        head.caller_tenant,
    ];
    let size = strings.iter().map(|s| s.len() + 2).sum::<usize>()
        + head.data_tags.iter().map(|t| t.len() + 2).sum::<usize>()
        + headers_len(head.headers)
        + 32;
    encode_head(&head, size)
}

/// Encodes a response head in its `version` (1: without the failure, which
/// the caller then renders into status, headers and body itself).
pub fn encode_response_head(head: &ResponseHead) -> Result<[Bytes; 2], WireError> {
    if head.version == 1 {
        return encode_head(
            &ResponseHeadV1 {
                version: 1,
                status: head.status,
                headers: head.headers.clone(),
                delivered: head.delivered,
            },
            headers_len(&head.headers) + 16,
        );
    }
    let failure = head
        .failure
        .as_ref()
        .map_or(0, |f| f.kind.len() + f.detail.len() + f.node.len() + 16);
    encode_head(head, headers_len(&head.headers) + failure + 16)
}

/// A body chunk as parts (split at [`MAX_DATA`]), payloads not copied.
pub fn encode_data(mut data: Bytes, out: &mut Vec<Bytes>) {
    while !data.is_empty() {
        let chunk = data.split_to(data.len().min(MAX_DATA));
        out.push(part_header(KIND_DATA, chunk.len()));
        out.push(chunk);
    }
}

pub fn encode_trailers(trailers: &HeaderMap) -> Result<[Bytes; 2], WireError> {
    let body = postcard::to_stdvec(&header_list::Ser(trailers)).map_err(|e| WireError::Decode {
        what: "trailers",
        reason: e.to_string(),
    })?;
    if body.len() > MAX_DATA {
        return Err(FrameError::TooLarge(body.len()).into());
    }
    Ok([part_header(KIND_TRAILERS, body.len()), Bytes::from(body)])
}

/// Decodes a request head of any version this node speaks (the fields are
/// the same; the version says which response head the caller reads).
pub fn decode_request_head(bytes: &[u8]) -> Result<RequestHead, WireError> {
    let decode = |e: postcard::Error| WireError::Decode {
        what: "request head",
        reason: e.to_string(),
    };
    if check_version(bytes)? < 3 {
        let h: RequestHeadV2 = postcard::from_bytes(bytes).map_err(decode)?;
        return Ok(RequestHead {
            version: h.version,
            caller_tenant: h.tenant.clone(),
            tenant: h.tenant,
            caller: h.caller,
            agent: h.agent,
            deadline_ms: h.deadline_ms,
            trace_id: h.trace_id,
            method: h.method,
            path: h.path,
            http: h.http,
            headers: h.headers,
            empty_body: h.empty_body,
            data_tags: Vec::new(),
        });
    }
    postcard::from_bytes(bytes).map_err(decode)
}

/// Decodes a response head of any version this node speaks.
pub fn decode_response_head(bytes: &[u8]) -> Result<ResponseHead, WireError> {
    let decode = |e: postcard::Error| WireError::Decode {
        what: "response head",
        reason: e.to_string(),
    };
    if check_version(bytes)? == 1 {
        let v1: ResponseHeadV1 = postcard::from_bytes(bytes).map_err(decode)?;
        return Ok(ResponseHead {
            version: 1,
            status: v1.status,
            headers: v1.headers,
            delivered: v1.delivered,
            failure: None,
        });
    }
    postcard::from_bytes(bytes).map_err(decode)
}

/// The version is the head's first field, one postcard byte: check it
/// before decoding the rest, so a head of another version gets a clear error.
fn check_version(bytes: &[u8]) -> Result<u8, WireError> {
    match bytes.first() {
        Some(&v) if (OLDEST_VERSION..=DELEGATION_VERSION).contains(&v) => Ok(v),
        Some(&v) => Err(WireError::Version(v)),
        None => Err(WireError::Decode {
            what: "head",
            reason: "empty".into(),
        }),
    }
}

/// Incremental decoder of parts: push bytes as they arrive, take parts out.
#[derive(Debug, Default)]
pub struct PartDecoder {
    frames: FrameDecoder,
}

impl PartDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.frames.push(bytes);
    }

    /// No bytes pending (not even part of a frame).
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// [`Self::push`] without a copy (see [`FrameDecoder::push_bytes`]).
    pub fn push_bytes(&mut self, bytes: Bytes) {
        self.frames.push_bytes(bytes);
    }

    pub fn next_part(&mut self) -> Result<Option<Part>, WireError> {
        let Some(mut frame) = self.frames.next_frame()? else {
            return Ok(None);
        };
        if frame.is_empty() {
            return Err(WireError::Empty);
        }
        let kind = frame[0];
        let payload = frame.split_off(1);
        match kind {
            KIND_HEAD => Ok(Some(Part::Head(payload))),
            KIND_DATA => Ok(Some(Part::Data(payload))),
            KIND_TRAILERS => {
                let list: header_list::De =
                    postcard::from_bytes(&payload).map_err(|e| WireError::Decode {
                        what: "trailers",
                        reason: e.to_string(),
                    })?;
                Ok(Some(Part::Trailers(list.0)))
            }
            k => Err(WireError::Kind(k)),
        }
    }

    /// At end of stream: leftover bytes mean the peer cut a part short.
    pub fn finish(&self) -> Result<(), WireError> {
        Ok(self.frames.finish()?)
    }
}

/// (De)serializes a [`HeaderMap`] as the sequence of `(str, bytes)` pairs
/// the wire has always carried (byte for byte what a `Vec<(String,
/// Vec<u8>)>` encodes to in postcard), borrowing names and values from the
/// input instead of allocating a string and a vector per header. Entries
/// that are not valid HTTP are skipped on the way in (a peer node validated
/// them once already; a bad one is not worth failing the whole delegation
/// over).
pub(crate) mod header_list {
    use hyper::header::{HeaderMap, HeaderName, HeaderValue};
    use serde::de::{Deserializer, SeqAccess, Visitor};
    use serde::ser::{SerializeSeq as _, Serializer};
    use serde::{Deserialize, Serialize};

    pub fn serialize<S: Serializer>(map: &HeaderMap, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(map.len()))?;
        for (name, value) in map {
            seq.serialize_element(&(name.as_str(), Raw(value.as_bytes())))?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<HeaderMap, D::Error> {
        d.deserialize_seq(ListVisitor)
    }

    /// A value as bytes: the same postcard encoding as a `Vec<u8>`
    /// (a length, then the bytes), written in one go.
    struct Raw<'a>(&'a [u8]);

    impl Serialize for Raw<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(self.0)
        }
    }

    /// A whole map as a top-level value (trailers parts).
    pub struct Ser<'a>(pub &'a HeaderMap);

    impl Serialize for Ser<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            serialize(self.0, s)
        }
    }

    pub struct De(pub HeaderMap);

    impl<'de> Deserialize<'de> for De {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            deserialize(d).map(De)
        }
    }

    struct ListVisitor;

    impl<'de> Visitor<'de> for ListVisitor {
        type Value = HeaderMap;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list of (name, value) header pairs")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<HeaderMap, A::Error> {
            // The hint comes from the peer: cap what it may make us reserve.
            let mut map = HeaderMap::with_capacity(seq.size_hint().unwrap_or(0).min(64));
            while let Some((name, value)) = seq.next_element::<(&'de str, &'de [u8])>()? {
                if let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_bytes(value),
                ) {
                    // A map holds at most 24,576 names; `append` would panic.
                    map.try_append(name, value)
                        .map_err(|_| serde::de::Error::custom("too many headers"))?;
                }
            }
            Ok(map)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;
    use proptest::prelude::*;

    fn head(path: String, body_headers: WireHeaders) -> RequestHead {
        RequestHead {
            version: DELEGATION_VERSION,
            tenant: "acme".into(),
            caller: "ingress".into(),
            agent: "billing".into(),
            deadline_ms: 1500,
            trace_id: "t-1".into(),
            method: "POST".into(),
            path,
            http: 1,
            headers: body_headers,
            empty_body: false,
            caller_tenant: "globex".into(),
            data_tags: vec!["pii".into()],
        }
    }

    fn headers(list: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in list {
            map.append(*k, HeaderValue::from_static(v));
        }
        map
    }

    /// What every node before this encoding wrote and read: a list of
    /// owned pairs. The map encoding must be the same bytes both ways.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct ListHead {
        version: u8,
        status: u16,
        headers: Vec<(String, Vec<u8>)>,
        delivered: bool,
    }

    #[test]
    fn headers_keep_the_list_encoding_of_earlier_nodes() {
        let map = headers(&[
            ("content-type", "text/plain"),
            ("x-custom", "a"),
            ("x-custom", "b"),
            ("set-cookie", "k=v; Path=/"),
        ]);
        let list: Vec<(String, Vec<u8>)> = map
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
            .collect();
        let new = ResponseHead {
            version: 1,
            status: 200,
            headers: map.clone(),
            delivered: true,
            failure: None,
        };
        let [_, bytes] = encode_response_head(&new).expect("encode");
        let old = ListHead {
            version: 1,
            status: 200,
            headers: list,
            delivered: true,
        };
        assert_eq!(&bytes[..], &postcard::to_stdvec(&old).expect("old")[..]);
        let back: ListHead = postcard::from_bytes(&bytes).expect("an old reader reads it");
        assert_eq!(back, old);
        assert_eq!(decode_response_head(&bytes).expect("decode").headers, map);
        // Entries a peer sends that are not HTTP are dropped, not fatal.
        let bad = ListHead {
            headers: vec![
                ("bad name".into(), b"x".to_vec()),
                ("ok".into(), b"fine".to_vec()),
                ("x-nl".into(), b"a\nb".to_vec()),
            ],
            ..old
        };
        let bytes = postcard::to_stdvec(&bad).expect("encode");
        let got = decode_response_head(&bytes).expect("decode").headers;
        assert_eq!(got, headers(&[("ok", "fine")]));
    }

    #[test]
    fn a_head_with_more_names_than_a_map_holds_is_refused_not_a_panic() {
        let names: Vec<(String, Vec<u8>)> = (0..25_000u32)
            .map(|i| (format!("x{i}"), Vec::new()))
            .collect();
        let bytes = postcard::to_stdvec(&ListHead {
            version: 2,
            status: 200,
            headers: names.clone(),
            delivered: true,
        })
        .expect("encode");
        assert!(bytes.len() < MAX_DATA);
        // (postcard keeps no custom message: the head is "undecodable")
        let err = decode_response_head(&bytes).expect_err("refused");
        assert!(matches!(err, WireError::Decode { .. }), "{err}");
        let trailers = postcard::to_stdvec(&names).expect("encode");
        let mut d = PartDecoder::new();
        d.push(&((trailers.len() + 1) as u32).to_be_bytes());
        d.push(&[KIND_TRAILERS]);
        d.push(&trailers);
        assert!(d.next_part().is_err());
    }

    fn flatten(parts: &[Bytes]) -> Vec<u8> {
        parts.iter().flat_map(|b| b.iter().copied()).collect()
    }

    proptest! {
        #[test]
        fn request_round_trips_in_any_chunking(
            path in "/[a-z0-9/?=&]{0,40}",
            body in proptest::collection::vec(any::<u8>(), 0..5000),
            cut in 1usize..700,
        ) {
            let h = head(path, headers(&[("content-type", "application/json")]));
            let mut parts: Vec<Bytes> = encode_request_head(h.as_ref()).expect("head").to_vec();
            encode_data(Bytes::from(body.clone()), &mut parts);
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            parts.extend(encode_trailers(&trailers).expect("trailers"));
            let wire = flatten(&parts);

            let mut d = PartDecoder::new();
            let mut got = Vec::new();
            for chunk in wire.chunks(cut) {
                d.push(chunk);
                while let Some(p) = d.next_part().expect("decode") {
                    got.push(p);
                }
            }
            d.finish().expect("complete");
            let Part::Head(hb) = &got[0] else { panic!("head first") };
            prop_assert_eq!(decode_request_head(hb).expect("head decodes"), h);
            let data: Vec<u8> = got.iter().filter_map(|p| match p {
                Part::Data(d) => Some(d.to_vec()), _ => None }).flatten().collect();
            prop_assert_eq!(data, body);
            let Some(Part::Trailers(t)) = got.last() else { panic!("trailers last") };
            prop_assert_eq!(t, &trailers);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut d = PartDecoder::new();
            d.push(&bytes);
            while let Ok(Some(p)) = d.next_part() {
                if let Part::Head(h) = p {
                    let _ = decode_request_head(&h);
                    let _ = decode_response_head(&h);
                }
            }
            let _ = d.finish();
        }

        #[test]
        fn truncation_is_detected(cut in 0usize..40) {
            let h = head("/x".into(), HeaderMap::new());
            let wire = flatten(&encode_request_head(h.as_ref()).expect("head"));
            let cut = cut.min(wire.len() - 1);
            let mut d = PartDecoder::new();
            d.push(&wire[..cut]);
            prop_assert!(matches!(d.next_part(), Ok(None)));
            prop_assert!(d.finish().is_err() || cut == 0);
        }
    }

    fn response(version: u8, failure: Option<WireFailure>) -> ResponseHead {
        ResponseHead {
            version,
            status: 504,
            headers: headers(&[("content-type", "text/plain")]),
            delivered: true,
            failure,
        }
    }

    #[test]
    fn response_heads_of_both_versions_round_trip() {
        let failure = WireFailure {
            kind: "timeout".into(),
            detail: "agent `acme/x` did not answer within 300ms".into(),
            node: "eu-1".into(),
            agent: Some("acme/x".into()),
        };
        let v2 = response(2, Some(failure));
        let [_, body] = encode_response_head(&v2).expect("encode");
        assert_eq!(decode_response_head(&body).expect("decode"), v2);
        // A version 1 head (what a node before the bump sends and reads)
        // carries no failure; it decodes with none.
        let v1 = response(1, None);
        let [_, body] = encode_response_head(&v1).expect("encode");
        let old: ResponseHeadV1 = postcard::from_bytes(&body).expect("a v1 reader reads it");
        assert_eq!((old.version, old.status, old.delivered), (1, 504, true));
        assert_eq!(decode_response_head(&body).expect("decode"), v1);
        // Request heads of every version decode; before 3 the caller's
        // tenant is the target's and there are no data tags.
        for v in [1, 2, 3] {
            let mut h = head("/".into(), HeaderMap::new());
            h.version = v;
            let [_, body] = encode_request_head(h.as_ref()).expect("encode");
            // Byte for byte what the derived layouts write.
            let derived = if v < 3 {
                postcard::to_stdvec(&RequestHeadV2 {
                    version: v,
                    tenant: h.tenant.clone(),
                    caller: h.caller.clone(),
                    agent: h.agent.clone(),
                    deadline_ms: h.deadline_ms,
                    trace_id: h.trace_id.clone(),
                    method: h.method.clone(),
                    path: h.path.clone(),
                    http: h.http,
                    headers: h.headers.clone(),
                    empty_body: h.empty_body,
                })
            } else {
                postcard::to_stdvec(&h)
            };
            assert_eq!(&body[..], &derived.expect("derived")[..], "version {v}");
            let back = decode_request_head(&body).expect("decode");
            assert_eq!(back.version, v);
            if v < 3 {
                assert_eq!(
                    (back.caller_tenant.as_str(), back.data_tags.len()),
                    ("acme", 0)
                );
            } else {
                assert_eq!(back, h);
            }
        }
    }

    #[test]
    fn other_versions_are_refused_clearly() {
        let mut h = head("/".into(), HeaderMap::new());
        h.version = 9;
        let [_, body] = encode_request_head(h.as_ref()).expect("encode");
        let err = decode_request_head(&body).expect_err("refused");
        assert!(err.to_string().contains("version 9"), "{err}");
    }
}
