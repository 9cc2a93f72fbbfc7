//! The last hop of a delegation, from this node to one of its own agents
//! over HTTP/1.1 (plain `http://`): a lean client that works in the
//! delegation's own task.
//!
//! Why not hyper's pooled client, as before: each request went through a
//! pool checkout and a channel to a connection task of its own, and the
//! answer came back the same way, so every delegation cost two more task
//! wake-ups and the machinery around them on the busiest path of a home
//! node. Here the task that serves the delegation writes the request and
//! reads the answer on a pooled connection itself. An answer whose body
//! arrived with its head (the usual small JSON answer) is handed on as one
//! buffer and the connection goes back to the pool at once; a longer or
//! streamed one (chunked, server-sent events, read to the close) is a body
//! that reads the socket as it is polled and gives the connection back once
//! read to its end. HTTP/2 agents (gRPC) keep hyper's client.
//!
//! What it does, per RFC 9112:
//! - the request: origin-form target, the caller's headers as forwarding
//!   left them, `content-length` when the length is known (declared, or a
//!   buffered body), chunked otherwise; whatever of the body is ready goes
//!   in the same write as the head;
//! - an answer that comes before the request body is all sent is taken (the
//!   rest of the upload is dropped, the connection is not reused);
//! - interim answers (`100 Continue`, `103 Early Hints`) are skipped; an
//!   unasked-for `101` is an error;
//! - the answer's body: none for `HEAD`, 1xx, 204 and 304; chunked when
//!   `transfer-encoding` ends in it (trailers become a trailers frame);
//!   `content-length` otherwise (differing values are an error); else read
//!   to the close;
//! - reuse: only an HTTP/1.1 answer without `connection: close`, read to
//!   its end with nothing after it, on a connection whose request went out
//!   whole. An idle connection the agent closed is noticed at checkout (the
//!   runtime has seen it readable: the agent's FIN) and dropped; idle ones
//!   expire after 1.5 s (sooner if the agent's `Keep-Alive` says so), under
//!   the servers' own idle timeouts, and at most 256 are kept per agent
//!   address. A body-less idempotent request (GET, HEAD, OPTIONS, DELETE)
//!   that a reused connection loses before any byte of the answer (the
//!   agent closed it as the request went out) is sent once more on a new
//!   connection.
//!
//! Errors say what happened in words a caller can act on; only a failed
//! connect is "not delivered" (the next candidate may be tried).

use std::collections::HashMap;
use std::io::Write as _;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Frame, SizeHint};
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH, TRANSFER_ENCODING};
use hyper::{Method, Request, Response, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::proto::http::{empty, full, Body, BoxError};

/// How long a connection may wait idle in the pool: less than the idle
/// timeouts of the servers agents run on (gunicorn 2 s, uvicorn and
/// Node.js 5 s), so that a request never goes out on a connection the
/// agent is closing at that moment (a race no client can see coming). An
/// agent that states a shorter `Keep-Alive: timeout` gets that, less half
/// a second.
pub(crate) const IDLE_LIMIT: Duration = Duration::from_millis(1500);
/// What is kept off an agent's stated keep-alive timeout.
const IDLE_MARGIN: Duration = Duration::from_millis(500);
/// The most idle connections kept per agent address.
const MAX_IDLE: usize = 256;
/// How long a connect may take (then the agent is unreachable).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest answer head read (hyper's default buffer limit).
const MAX_HEAD: usize = 400 * 1024;
/// The most header fields an answer may have (hyper's default).
const MAX_HEADERS: usize = 100;
/// Bytes gathered before a write while the request body is copied.
const WRITE_BATCH: usize = 64 * 1024;
/// How much is read from the socket at a time.
const READ_SIZE: usize = 16 * 1024;
/// The longest chunk-size line, and the most trailer bytes, accepted.
const MAX_CHUNK_LINE: usize = 4 * 1024;
const MAX_TRAILERS: usize = 64 * 1024;

/// Why a request to an agent failed.
#[derive(Debug)]
pub enum H1Error {
    /// No connection could be made: nothing was delivered.
    Connect(std::io::Error),
    /// Reading or writing the connection failed.
    Io(std::io::Error),
    /// The agent closed the connection before its answer's head was whole.
    Closed,
    /// The agent's answer is not HTTP/1.1 as RFC 9112 frames it.
    Malformed(String),
    /// The request body (the caller's upload) failed.
    Body(BoxError),
}

impl H1Error {
    /// True if nothing reached the agent.
    pub fn is_connect(&self) -> bool {
        matches!(self, H1Error::Connect(_))
    }
}

impl std::fmt::Display for H1Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            H1Error::Connect(e) => write!(f, "could not connect: {e}"),
            H1Error::Io(e) => write!(f, "connection failed: {e}"),
            H1Error::Closed => f.write_str("the agent closed the connection before it answered"),
            H1Error::Malformed(why) => write!(f, "malformed answer: {why}"),
            H1Error::Body(e) => write!(f, "the request body failed: {e}"),
        }
    }
}

impl std::error::Error for H1Error {}

fn malformed(why: impl Into<String>) -> H1Error {
    H1Error::Malformed(why.into())
}

/// Pooled HTTP/1.1 connections to this node's agents, by address.
#[derive(Clone, Debug, Default)]
pub struct H1Client {
    pool: Arc<Pool>,
}

#[derive(Debug, Default)]
struct Pool {
    idle: Mutex<HashMap<Box<str>, Vec<Idle>>>,
}

#[derive(Debug)]
struct Idle {
    io: TcpStream,
    expires: Instant,
}

impl Pool {
    /// The most recently used live connection to `key`, if any.
    fn checkout(&self, key: &str) -> Option<TcpStream> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(key)?;
        let now = Instant::now();
        while let Some(c) = list.pop() {
            if c.expires > now && still_open(&c.io) {
                return Some(c.io);
            }
        }
        None
    }

    /// Keeps `io` for reuse for at most `idle` (nothing if that is zero).
    fn put(&self, key: &str, io: TcpStream, idle: Duration) {
        if idle.is_zero() {
            return;
        }
        let mut idle_list = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // The key is copied only the first time (a lookup allocates nothing).
        if !idle_list.contains_key(key) {
            idle_list.insert(key.into(), Vec::new());
        }
        let Some(list) = idle_list.get_mut(key) else {
            return;
        };
        // The oldest are at the front; drop those that expired.
        let now = Instant::now();
        let expired = list.iter().take_while(|c| c.expires <= now).count();
        list.drain(..expired);
        if list.len() < MAX_IDLE {
            list.push(Idle {
                io,
                expires: now + idle,
            });
        }
    }
}

/// An idle connection is fit for reuse if it has nothing to read: the
/// runtime only tries the socket when it saw it readable (the agent closed
/// it, or sent something unasked), so this is no system call in the usual
/// case.
fn still_open(io: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(io.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// How long a connection that served this answer may wait idle: the
/// agent's own `Keep-Alive: timeout=N`, less a margin, if that is shorter
/// than [`IDLE_LIMIT`].
fn idle_limit(headers: &HeaderMap) -> Duration {
    const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
    let stated = headers
        .get(KEEP_ALIVE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.split(',')
                .filter_map(|p| p.trim().strip_prefix("timeout="))
                .find_map(|n| n.trim().parse::<u64>().ok())
        })
        .map(|secs| Duration::from_secs(secs).saturating_sub(IDLE_MARGIN));
    stated.map_or(IDLE_LIMIT, |s| s.min(IDLE_LIMIT))
}

/// A failure that a connection the agent closed while it sat in the pool
/// shows when it is used: the request went out, the answer never began.
fn lost_to_a_close(e: &H1Error) -> bool {
    use std::io::ErrorKind as K;
    match e {
        H1Error::Closed => true,
        H1Error::Io(e) => matches!(
            e.kind(),
            K::ConnectionReset | K::BrokenPipe | K::ConnectionAborted | K::UnexpectedEof
        ),
        _ => false,
    }
}

/// A request that may be sent again after it was lost that way: idempotent
/// (RFC 9110 9.2.2) and without a body, so nothing needs replaying.
fn resendable(parts: &hyper::http::request::Parts, body: &Body) -> bool {
    use hyper::body::Body as _;
    let idempotent = matches!(
        parts.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::DELETE | Method::TRACE
    );
    idempotent && body.is_end_stream()
}

/// How the request body is framed.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Upload {
    Length(u64),
    Chunked,
}

impl H1Client {
    pub fn new() -> H1Client {
        H1Client::default()
    }

    /// Sends `req` (an absolute `http://` URI) and reads the answer's head.
    pub async fn request(&self, req: Request<Body>) -> Result<Response<Body>, H1Error> {
        let (parts, body) = req.into_parts();
        let authority = parts
            .uri
            .authority()
            .ok_or_else(|| malformed("the agent's URL has no host"))?;
        let key = authority.as_str();
        let (mut io, reused) = match self.pool.checkout(key) {
            Some(io) => (io, true),
            None => (connect(authority).await?, false),
        };
        let head_only = parts.method == Method::HEAD;
        let (framing, head) = encode_head(&parts, &body)?;
        let again = (reused && resendable(&parts, &body)).then(|| head.clone());
        let mut buf = BytesMut::with_capacity(READ_SIZE);
        let (mut answer, sent) = match exchange(&mut io, head, body, framing, &mut buf).await {
            Ok(done) => done,
            Err(e) => match again {
                Some(head) if lost_to_a_close(&e) && buf.is_empty() => {
                    tracing::debug!(agent = %key, error = %e, "a pooled connection was closed by the agent as the request went out; sending it again on a new one");
                    io = connect(authority).await?;
                    exchange(&mut io, head, empty(), framing, &mut buf).await?
                }
                _ => return Err(e),
            },
        };
        let reuse = sent && answer.version == Version::HTTP_11 && !answer.close;
        let idle = idle_limit(&answer.headers);
        let mut resp = Response::new(empty());
        *resp.status_mut() = answer.status;
        *resp.version_mut() = answer.version;
        if answer.headers.contains_key(TRANSFER_ENCODING) {
            // The transfer coding frames the body; a length beside it is void.
            answer.headers.remove(CONTENT_LENGTH);
        }
        let decode = match body_framing(head_only, answer.status, &answer.headers)? {
            Framing::Empty => None,
            Framing::Length(n) if buf.len() as u64 >= n => {
                // The usual small answer: here whole already.
                let data = buf.split_to(n as usize).freeze();
                if !data.is_empty() {
                    *resp.body_mut() = full(data);
                }
                None
            }
            Framing::Length(n) => Some(Decode::Length(n)),
            Framing::Chunked => Some(Decode::Chunked(Chunked::Size)),
            Framing::Close => Some(Decode::Close),
        };
        *resp.headers_mut() = answer.headers;
        match decode {
            // Read whole: the connection may serve the next request.
            None => {
                if reuse && buf.is_empty() {
                    self.pool.put(key, io, idle);
                }
            }
            Some(decode) => {
                let reuse = (reuse && !matches!(decode, Decode::Close))
                    .then(|| (self.pool.clone(), Box::<str>::from(key), idle));
                *resp.body_mut() = Streamed {
                    io: Some(io),
                    buf,
                    decode,
                    reuse,
                }
                .boxed();
            }
        }
        Ok(resp)
    }
}

async fn connect(authority: &hyper::http::uri::Authority) -> Result<TcpStream, H1Error> {
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port = authority.port_u16().unwrap_or(80);
    let io = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host, port)))
        .await
        .map_err(|_| {
            H1Error::Connect(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no connection within {CONNECT_TIMEOUT:?}"),
            ))
        })?
        .map_err(H1Error::Connect)?;
    io.set_nodelay(true).map_err(H1Error::Connect)?;
    Ok(io)
}

/// The request head, and how its body will be framed.
fn encode_head(
    parts: &hyper::http::request::Parts,
    body: &Body,
) -> Result<(Upload, Vec<u8>), H1Error> {
    use hyper::body::Body as _;
    let declared = match parts.headers.get(CONTENT_LENGTH) {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| H1Error::Body("the request's content-length is invalid".into()))?,
        ),
        None => None,
    };
    let hint = body.size_hint();
    let framing = declared
        .or(hint.exact())
        .map_or(Upload::Chunked, Upload::Length);
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut head = Vec::with_capacity(256 + hint.exact().unwrap_or(0).min(16 * 1024) as usize);
    head.extend_from_slice(parts.method.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        if name == TRANSFER_ENCODING {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    match framing {
        // A body-less GET (or DELETE, ...) says nothing, as clients do.
        Upload::Length(0) if declared.is_none() && !has_payload_semantics(&parts.method) => {}
        Upload::Length(n) if declared.is_none() => {
            // Writing into a Vec cannot fail.
            let _ = write!(head, "content-length: {n}\r\n");
        }
        Upload::Length(_) => {}
        Upload::Chunked => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    head.extend_from_slice(b"\r\n");
    Ok((framing, head))
}

fn has_payload_semantics(m: &Method) -> bool {
    m == Method::POST || m == Method::PUT || m == Method::PATCH
}

/// The answer's head as read.
struct Answer {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    /// The agent said `connection: close` (or spoke HTTP/1.0).
    close: bool,
}

/// Writes the request and reads the answer's head; true with it if the
/// request went out whole.
async fn exchange(
    io: &mut TcpStream,
    head: Vec<u8>,
    body: Body,
    framing: Upload,
    buf: &mut BytesMut,
) -> Result<(Answer, bool), H1Error> {
    let (mut rd, mut wr) = io.split();
    let write = write_request(&mut wr, head, body, framing);
    let read = read_answer(&mut rd, buf);
    tokio::pin!(write, read);
    let mut sent = false;
    let mut write_failed = None;
    loop {
        tokio::select! {
            biased;
            w = &mut write, if !sent && write_failed.is_none() => match w {
                Ok(()) => sent = true,
                Err(Write::Body(e)) => return Err(H1Error::Body(e)),
                // The agent may have answered and closed (an early 413):
                // its answer, if it sent one, says more than the write.
                Err(Write::Io(e)) => write_failed = Some(e),
            },
            r = &mut read => {
                return match (r, write_failed) {
                    (Ok(answer), _) => Ok((answer, sent)),
                    (Err(_), Some(e)) => Err(H1Error::Io(e)),
                    (Err(e), None) => Err(e),
                }
            }
        }
    }
}

enum Write {
    Io(std::io::Error),
    Body(BoxError),
}

/// The head and the body, framed; whatever the body has ready is taken
/// into the same write.
async fn write_request<W: AsyncWrite + Unpin>(
    wr: &mut W,
    mut out: Vec<u8>,
    mut body: Body,
    framing: Upload,
) -> Result<(), Write> {
    use futures_util::FutureExt as _;
    let mut left = match framing {
        Upload::Length(n) => n,
        Upload::Chunked => 0,
    };
    loop {
        let frame = if out.is_empty() {
            body.frame().await
        } else {
            match body.frame().now_or_never() {
                Some(f) => f,
                None => {
                    wr.write_all(&out).await.map_err(Write::Io)?;
                    out.clear();
                    continue;
                }
            }
        };
        let Some(frame) = frame else { break };
        let Ok(data) = frame.map_err(Write::Body)?.into_data() else {
            // Trailers of an HTTP/1.1 request are not passed on.
            continue;
        };
        if data.is_empty() {
            continue;
        }
        match framing {
            Upload::Length(_) => {
                let n = data.len() as u64;
                if n > left {
                    return Err(Write::Body(
                        "the request body is longer than its content-length".into(),
                    ));
                }
                left -= n;
                out.extend_from_slice(&data);
            }
            Upload::Chunked => {
                // Writing into a Vec cannot fail.
                let _ = write!(out, "{:x}\r\n", data.len());
                out.extend_from_slice(&data);
                out.extend_from_slice(b"\r\n");
            }
        }
        if out.len() >= WRITE_BATCH {
            wr.write_all(&out).await.map_err(Write::Io)?;
            out.clear();
        }
    }
    match framing {
        Upload::Length(_) if left > 0 => {
            // Never end a cut upload as if it were whole.
            return Err(Write::Body(
                format!("the request body ended {left} bytes short of its content-length").into(),
            ));
        }
        Upload::Length(_) => {}
        Upload::Chunked => out.extend_from_slice(b"0\r\n\r\n"),
    }
    if !out.is_empty() {
        wr.write_all(&out).await.map_err(Write::Io)?;
    }
    Ok(())
}

/// Reads until a final answer's head is whole (interim ones skipped) and
/// leaves what followed it in `buf`.
async fn read_answer<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
) -> Result<Answer, H1Error> {
    loop {
        if !buf.is_empty() {
            if let Some((answer, len)) = parse_answer(buf)? {
                buf.advance(len);
                if answer.status.is_informational() {
                    if answer.status == StatusCode::SWITCHING_PROTOCOLS {
                        return Err(malformed(
                            "101 Switching Protocols, which was not asked for",
                        ));
                    }
                    continue;
                }
                return Ok(answer);
            }
            if buf.len() >= MAX_HEAD {
                return Err(malformed(format!(
                    "the head is larger than {} KiB",
                    MAX_HEAD / 1024
                )));
            }
        }
        buf.reserve(READ_SIZE);
        let n = rd.read_buf(buf).await.map_err(H1Error::Io)?;
        if n == 0 {
            return Err(if buf.is_empty() {
                H1Error::Closed
            } else {
                malformed("the connection closed in the middle of the head")
            });
        }
    }
}

/// A head from `buf` and its length, or `None` if it is not whole yet.
fn parse_answer(buf: &[u8]) -> Result<Option<(Answer, usize)>, H1Error> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut fields);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(malformed(e.to_string())),
    };
    let status = parsed
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| malformed("no valid status code"))?;
    let version = match parsed.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    let mut headers = HeaderMap::with_capacity(parsed.headers.len());
    let mut close = version != Version::HTTP_11;
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| malformed(format!("bad header name `{}`", h.name)))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| malformed(format!("bad value of header `{name}`")))?;
        if name == hyper::header::CONNECTION && has_token(&value, "close") {
            close = true;
        }
        headers.append(name, value);
    }
    Ok(Some((
        Answer {
            status,
            version,
            headers,
            close,
        },
        len,
    )))
}

fn has_token(v: &HeaderValue, token: &str) -> bool {
    v.to_str()
        .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        .unwrap_or(false)
}

/// How an answer's body is framed (RFC 9112 section 6.3).
#[derive(Debug, PartialEq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    Close,
}

fn body_framing(
    head_only: bool,
    status: StatusCode,
    headers: &HeaderMap,
) -> Result<Framing, H1Error> {
    if head_only
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Empty);
    }
    if let Some(last) = headers.get_all(TRANSFER_ENCODING).iter().next_back() {
        let chunked = last
            .to_str()
            .ok()
            .and_then(|s| s.rsplit(',').next())
            .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"));
        return Ok(if chunked {
            Framing::Chunked
        } else {
            Framing::Close
        });
    }
    let mut length = None;
    for v in headers.get_all(CONTENT_LENGTH) {
        for part in v.to_str().unwrap_or("x").split(',') {
            let n: u64 = part
                .trim()
                .parse()
                .map_err(|_| malformed("invalid content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(malformed("differing content-length values"));
            }
            length = Some(n);
        }
    }
    Ok(length.map_or(Framing::Close, Framing::Length))
}

/// What is left of an answer's body to read.
#[derive(Debug)]
enum Decode {
    Length(u64),
    Chunked(Chunked),
    Close,
}

/// Where a chunked body's decoding stands.
#[derive(Debug, PartialEq)]
enum Chunked {
    Size,
    Data(u64),
    DataEnd,
    Trailers(HeaderMap),
    Done,
}

/// One step of decoding.
#[derive(Debug)]
enum Step {
    Frame(Frame<Bytes>),
    /// More bytes are needed.
    More,
    End,
}

impl Chunked {
    /// Decodes from the front of `buf` (sans I/O).
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Step, H1Error> {
        loop {
            match self {
                Chunked::Size => {
                    let Some(line) = line_len(buf, MAX_CHUNK_LINE, "a chunk-size line")? else {
                        return Ok(Step::More);
                    };
                    let size = parse_chunk_size(&buf[..line])?;
                    buf.advance(line + 2);
                    *self = if size == 0 {
                        Chunked::Trailers(HeaderMap::new())
                    } else {
                        Chunked::Data(size)
                    };
                }
                Chunked::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    let n = (*left).min(buf.len() as u64);
                    let data = buf.split_to(n as usize).freeze();
                    *left -= n;
                    if *left == 0 {
                        *self = Chunked::DataEnd;
                    }
                    return Ok(Step::Frame(Frame::data(data)));
                }
                Chunked::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Step::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(malformed("a chunk does not end with CRLF"));
                    }
                    buf.advance(2);
                    *self = Chunked::Size;
                }
                Chunked::Trailers(fields) => {
                    let Some(line) = line_len(buf, MAX_TRAILERS, "the trailers")? else {
                        return Ok(Step::More);
                    };
                    if line == 0 {
                        buf.advance(2);
                        let fields = std::mem::take(fields);
                        *self = Chunked::Done;
                        if !fields.is_empty() {
                            return Ok(Step::Frame(Frame::trailers(fields)));
                        }
                        continue;
                    }
                    let text = &buf[..line];
                    let colon = text
                        .iter()
                        .position(|&b| b == b':')
                        .ok_or_else(|| malformed("a trailer line without a colon"))?;
                    let name = HeaderName::from_bytes(&text[..colon])
                        .map_err(|_| malformed("bad trailer name"))?;
                    let value = HeaderValue::from_bytes(text[colon + 1..].trim_ascii())
                        .map_err(|_| malformed("bad trailer value"))?;
                    fields.append(name, value);
                    buf.advance(line + 2);
                }
                Chunked::Done => return Ok(Step::End),
            }
        }
    }
}

/// The length of the line at the front of `buf` (without its CRLF), if it
/// is whole.
fn line_len(buf: &[u8], limit: usize, what: &str) -> Result<Option<usize>, H1Error> {
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(i) => Ok(Some(i)),
        None if buf.len() > limit => Err(malformed(format!("{what} is too long"))),
        None => Ok(None),
    }
}

fn parse_chunk_size(line: &[u8]) -> Result<u64, H1Error> {
    // Extensions (`;name=value`) are allowed and ignored.
    let digits = line
        .split(|&b| b == b';')
        .next()
        .unwrap_or(line)
        .trim_ascii();
    if digits.is_empty() || digits.len() > 15 {
        return Err(malformed("a bad chunk size"));
    }
    let text = std::str::from_utf8(digits).map_err(|_| malformed("a bad chunk size"))?;
    u64::from_str_radix(text, 16).map_err(|_| malformed("a bad chunk size"))
}

/// An answer's body read from the connection as it is polled; the
/// connection goes back to the pool once the body is read to its end.
struct Streamed {
    io: Option<TcpStream>,
    buf: BytesMut,
    decode: Decode,
    /// Where the connection goes back to, and for how long, if it may be
    /// reused.
    reuse: Option<(Arc<Pool>, Box<str>, Duration)>,
}

impl Streamed {
    /// The body was read to its end: the connection may serve another.
    fn finish(&mut self) {
        if let (Some(io), Some((pool, key, idle))) = (self.io.take(), self.reuse.take()) {
            if self.buf.is_empty() {
                pool.put(&key, io, idle);
            }
        }
    }

    fn fail(&mut self, e: H1Error) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.io = None;
        Poll::Ready(Some(Err(Box::new(e))))
    }

    fn step(&mut self) -> Result<Step, H1Error> {
        match &mut self.decode {
            Decode::Length(0) => Ok(Step::End),
            Decode::Length(left) => {
                if self.buf.is_empty() {
                    return Ok(Step::More);
                }
                let n = (*left).min(self.buf.len() as u64);
                *left -= n;
                Ok(Step::Frame(Frame::data(
                    self.buf.split_to(n as usize).freeze(),
                )))
            }
            Decode::Chunked(c) => c.decode(&mut self.buf),
            Decode::Close if self.buf.is_empty() => Ok(Step::More),
            Decode::Close => Ok(Step::Frame(Frame::data(self.buf.split().freeze()))),
        }
    }
}

impl hyper::body::Body for Streamed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if this.io.is_none() {
                return Poll::Ready(None);
            }
            match this.step() {
                Ok(Step::Frame(f)) => {
                    // A reader that stops at the declared length (hyper
                    // does) never polls the end: give the connection back
                    // with the last bytes.
                    if matches!(this.decode, Decode::Length(0)) {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(f)));
                }
                Ok(Step::End) => {
                    this.finish();
                    this.io = None;
                    return Poll::Ready(None);
                }
                Ok(Step::More) => {}
                Err(e) => return this.fail(e),
            }
            let Some(io) = this.io.as_ref() else {
                return Poll::Ready(None);
            };
            if let Err(e) = ready!(io.poll_read_ready(cx)) {
                return this.fail(H1Error::Io(e));
            }
            this.buf.reserve(READ_SIZE);
            match io.try_read_buf(&mut this.buf) {
                Ok(0) => {
                    if matches!(this.decode, Decode::Close) {
                        this.io = None;
                        return Poll::Ready(None);
                    }
                    return this.fail(malformed("the connection closed before the body's end"));
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return this.fail(H1Error::Io(e)),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.io.is_none() || matches!(self.decode, Decode::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.decode {
            Decode::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

impl std::fmt::Debug for Streamed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streamed")
            .field("decode", &self.decode)
            .field("buffered", &self.buf.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;

    fn request(method: Method, url: &str, body: Body) -> Request<Body> {
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = url.parse().expect("a valid URL");
        req
    }

    /// A GET's answer body, which must come.
    async fn get(client: &H1Client, url: &str) -> String {
        let resp = client
            .request(request(Method::GET, url, empty()))
            .await
            .expect("the agent answers");
        text(resp).await
    }

    async fn text(resp: Response<Body>) -> String {
        let bytes = resp
            .into_body()
            .collect()
            .await
            .expect("the body reads whole")
            .to_bytes();
        String::from_utf8(bytes.to_vec()).expect("UTF-8")
    }

    /// An agent on a loopback port (its URL without a trailing slash): each
    /// connection goes to `serve` with its number (from 0); counts them.
    async fn agent_at<F, Fut>(serve: F) -> (String, Arc<AtomicUsize>)
    where
        F: Fn(TcpStream, usize) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("bound"));
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (io, _) = listener.accept().await.expect("accept");
                tokio::spawn(serve(io, count.fetch_add(1, Ordering::SeqCst)));
            }
        });
        (url, accepted)
    }

    /// A whole answer with a body of "ok".
    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

    /// Reads one request head off `io`; false if the connection ended.
    async fn read_request(io: &mut TcpStream) -> bool {
        let mut buf = vec![0u8; 4096];
        let mut seen = Vec::new();
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        true
    }

    /// A hyper HTTP/1.1 server (keep-alive, its defaults) that echoes the
    /// request body (`/reject`: 413 without reading it); counts the
    /// connections it accepted and keeps every body it read whole.
    async fn hyper_echo() -> (String, Arc<AtomicUsize>, Arc<Mutex<Vec<Bytes>>>) {
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let seen = bodies.clone();
        let (url, accepted) = agent_at(move |io, _| {
            let seen = seen.clone();
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let seen = seen.clone();
                async move {
                    let path = req.uri().path().to_string();
                    if path == "/reject" {
                        let mut resp = Response::new(
                            http_body_util::Full::new(Bytes::from_static(b"too large"))
                                .map_err(|e| match e {})
                                .boxed(),
                        );
                        *resp.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
                        return Ok(resp);
                    }
                    let body = req.into_body().collect().await?.to_bytes();
                    seen.lock().expect("lock").push(body.clone());
                    let answer = if path == "/stream" {
                        // No length: hyper sends it chunked.
                        let chunks: Vec<Result<_, hyper::Error>> =
                            (0..3).map(|_| Ok(Frame::data(body.clone()))).collect();
                        http_body_util::StreamBody::new(futures_util::stream::iter(chunks)).boxed()
                    } else {
                        http_body_util::Full::new(body)
                            .map_err(|e| match e {})
                            .boxed()
                    };
                    Ok::<_, hyper::Error>(Response::new(answer))
                }
            });
            async move {
                let io = hyper_util::rt::TokioIo::new(io);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            }
        })
        .await;
        (url, accepted, bodies)
    }

    #[tokio::test]
    async fn answers_whole_and_streamed_reuse_one_connection() {
        let (url, accepted, _) = hyper_echo().await;
        let client = H1Client::new();
        for i in 0..3 {
            let body = format!("hello {i}");
            let resp = client
                .request(request(
                    Method::POST,
                    &format!("{url}/echo"),
                    full(body.clone()),
                ))
                .await
                .expect("the agent answers");
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(text(resp).await, body);
        }
        // Chunked answer, read as it is polled; then the connection is reused.
        let resp = client
            .request(request(Method::POST, &format!("{url}/stream"), full("ab")))
            .await
            .expect("the agent answers");
        assert!(resp.headers().contains_key(TRANSFER_ENCODING));
        assert_eq!(text(resp).await, "ababab");
        assert_eq!(get(&client, &format!("{url}/echo")).await, "");
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one pooled connection");
    }

    #[tokio::test]
    async fn a_streamed_upload_goes_chunked_and_a_cut_one_never_looks_whole() {
        let (url, _, bodies) = hyper_echo().await;
        let client = H1Client::new();
        // Unknown length: chunked, and the echo has all of it.
        let chunks = vec![
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"one "))),
            Ok(Frame::data(Bytes::from_static(b"two"))),
        ];
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(chunks)).boxed();
        let resp = client
            .request(request(Method::POST, &format!("{url}/echo"), body))
            .await
            .expect("the agent answers");
        assert_eq!(text(resp).await, "one two");
        // A declared length the upload falls short of: an error, and the
        // agent is never told the body ended.
        let chunks = vec![
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"12345"))),
            Err("the caller went away".into()),
        ];
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(chunks)).boxed();
        let mut req = request(Method::POST, &format!("{url}/echo"), body);
        req.headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from_static("10"));
        let err = client.request(req).await.expect_err("a cut upload fails");
        assert!(matches!(err, H1Error::Body(_)), "{err}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let bodies = bodies.lock().expect("lock");
        assert_eq!(
            bodies.len(),
            1,
            "only the whole upload was read: {bodies:?}"
        );
    }

    #[tokio::test]
    async fn an_answer_before_the_upload_is_all_sent_is_taken() {
        let (url, accepted, _) = hyper_echo().await;
        let client = H1Client::new();
        // 8 MiB: far more than the socket buffers hold, so the agent's
        // answer comes while the upload is still going.
        let big = Bytes::from(vec![b'x'; 8 << 20]);
        let resp = client
            .request(request(Method::POST, &format!("{url}/reject"), full(big)))
            .await
            .expect("the agent answers");
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(text(resp).await, "too large");
        // That connection is not reused (the rest of the upload was not sent).
        let resp = client
            .request(request(Method::POST, &format!("{url}/echo"), full("after")))
            .await
            .expect("the agent answers");
        assert_eq!(text(resp).await, "after");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// A server that closes a kept-alive connection while it is idle in the
    /// pool (as uvicorn does after 5 s): the next request takes a new one.
    #[tokio::test]
    async fn an_idle_connection_the_agent_closed_is_not_reused() {
        let (url, _) = agent_at(|mut io, _| async move {
            if read_request(&mut io).await {
                let _ = io.write_all(OK).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                // Closed while idle.
            }
        })
        .await;
        let client = H1Client::new();
        for _ in 0..3 {
            assert_eq!(get(&client, &url).await, "ok");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// An agent whose first connection answers one request and then closes
    /// as the second arrives (as a server whose keep-alive timeout fires
    /// just then does); later connections answer every request.
    async fn closing_agent() -> (String, Arc<AtomicUsize>) {
        agent_at(|mut io, n| async move {
            for served in 0.. {
                if !read_request(&mut io).await || (n == 0 && served == 1) {
                    return; // closed (the second time with the request unanswered)
                }
                if io.write_all(OK).await.is_err() {
                    return;
                }
            }
        })
        .await
    }

    #[tokio::test]
    async fn a_get_lost_to_an_agents_close_is_sent_again_and_a_post_is_not() {
        let client = H1Client::new();
        let (url, accepted) = closing_agent().await;
        // The second time on a new connection.
        for _ in 0..2 {
            assert_eq!(get(&client, &url).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // A POST may have been acted on: never sent twice.
        let (url, _) = closing_agent().await;
        let resp = client
            .request(request(Method::POST, &url, full("pay")))
            .await
            .expect("the first POST is answered");
        assert_eq!(text(resp).await, "ok");
        let err = client
            .request(request(Method::POST, &url, full("pay")))
            .await
            .expect_err("the second POST is lost");
        assert!(lost_to_a_close(&err), "{err}");
    }

    #[tokio::test]
    async fn connections_idle_past_the_agents_keep_alive_are_not_reused() {
        assert_eq!(idle_limit(&HeaderMap::new()), IDLE_LIMIT);
        let ka = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("keep-alive", HeaderValue::from_static(v));
            idle_limit(&h)
        };
        assert_eq!(ka("timeout=1, max=100"), Duration::from_millis(500));
        assert_eq!(ka("timeout=5"), IDLE_LIMIT);
        assert_eq!(ka("timeout=0"), Duration::ZERO);
        // An agent that says it keeps idle connections 1 s: one idle for
        // 0.7 s is not reused, one idle for 0.1 s is.
        let (url, accepted) = agent_at(|mut io, _| async move {
            while read_request(&mut io).await {
                let answer =
                    b"HTTP/1.1 200 OK\r\nkeep-alive: timeout=1\r\ncontent-length: 2\r\n\r\nok";
                if io.write_all(answer).await.is_err() {
                    return;
                }
            }
        })
        .await;
        let client = H1Client::new();
        for pause in [100, 700, 0] {
            assert_eq!(get(&client, &url).await, "ok");
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        // One connection for the first two, a new one after the long pause.
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// Decodes `wire` fed one byte at a time: the decoder never depends on
    /// where reads split.
    fn decode_bytewise(wire: &[u8]) -> Result<(Vec<u8>, Option<HeaderMap>), H1Error> {
        let mut c = Chunked::Size;
        let mut buf = BytesMut::new();
        let (mut data, mut trailers) = (Vec::new(), None);
        let mut fed = 0;
        loop {
            match c.decode(&mut buf)? {
                Step::Frame(f) => match f.into_data() {
                    Ok(d) => data.extend_from_slice(&d),
                    Err(f) => trailers = f.into_trailers().ok(),
                },
                Step::End => return Ok((data, trailers)),
                Step::More if fed == wire.len() => return Err(H1Error::Closed),
                Step::More => {
                    buf.extend_from_slice(&wire[fed..fed + 1]);
                    fed += 1;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_reads() {
        let (data, trailers) =
            decode_bytewise(b"5;ext=1\r\nhello\r\nA\r\n, world!!!\r\n0\r\n\r\n").expect("decodes");
        assert_eq!(data, b"hello, world!!!");
        assert!(trailers.is_none());
        let (data, trailers) =
            decode_bytewise(b"3\r\nabc\r\n0\r\ngrpc-status: 0\r\nx-done: yes\r\n\r\n")
                .expect("decodes");
        assert_eq!(data, b"abc");
        let t = trailers.expect("trailers");
        assert_eq!(t["grpc-status"], "0");
        assert_eq!(t["x-done"], "yes");
        for bad in [
            &b"zz\r\n"[..],
            b"3\r\nabcX\r\n",
            b"ffffffffffffffffff\r\n",
            b"0\r\nno colon\r\n\r\n",
        ] {
            assert!(
                matches!(decode_bytewise(bad), Err(H1Error::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // Cut before the terminal chunk: never a clean end.
        assert!(decode_bytewise(b"3\r\nabc\r\n").is_err());
    }

    #[test]
    fn answer_bodies_are_framed_as_rfc_9112_says() {
        let h = |pairs: &[(&str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.append(
                    HeaderName::from_bytes(k.as_bytes()).expect("name"),
                    v.parse().expect("value"),
                );
            }
            m
        };
        let ok = StatusCode::OK;
        let f =
            |head: bool, s: StatusCode, m: &HeaderMap| body_framing(head, s, m).expect("framed");
        assert_eq!(f(true, ok, &h(&[("content-length", "5")])), Framing::Empty);
        assert_eq!(f(false, StatusCode::NO_CONTENT, &h(&[])), Framing::Empty);
        assert_eq!(
            f(
                false,
                StatusCode::NOT_MODIFIED,
                &h(&[("content-length", "5")])
            ),
            Framing::Empty
        );
        assert_eq!(
            f(false, ok, &h(&[("content-length", "5")])),
            Framing::Length(5)
        );
        assert_eq!(
            f(false, ok, &h(&[("content-length", "5, 5")])),
            Framing::Length(5)
        );
        assert_eq!(
            f(
                false,
                ok,
                &h(&[
                    ("transfer-encoding", "gzip, chunked"),
                    ("content-length", "5")
                ])
            ),
            Framing::Chunked
        );
        assert_eq!(
            f(false, ok, &h(&[("transfer-encoding", "gzip")])),
            Framing::Close
        );
        assert_eq!(f(false, ok, &h(&[])), Framing::Close);
        assert!(body_framing(
            false,
            ok,
            &h(&[("content-length", "5"), ("content-length", "6")])
        )
        .is_err());
        assert!(body_framing(false, ok, &h(&[("content-length", "-1")])).is_err());
    }
}
