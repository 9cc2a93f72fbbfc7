//! HTTP plumbing shared by ingress, forwarding and the admin API: one body
//! type, the pooled upstream clients, hop-by-hop header handling, and the
//! structured errors the mesh itself answers with.
//!
//! Errors follow the dialect of the request: a JSON-RPC request (A2A 0.3 or
//! 1.0) gets a JSON-RPC error object with its `id` echoed; anything else
//! gets RFC 9457 problem details. Either way the body says what failed and
//! where (`node`, `agent`), and the `dmsc-error` header carries a stable
//! machine-readable kind.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde_json::{json, Value};

/// Ceiling on any deadline, from a header or the wire (no overflow, no
/// request held for days).
pub const MAX_DEADLINE: Duration = Duration::from_secs(3600);

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The one body type requests and responses are converted to.
pub type Body = BoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}

pub fn empty() -> Body {
    Empty::new().map_err(|e| match e {}).boxed()
}

/// Headers that belong to one connection, not to the request (RFC 9110 7.6.1).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    // Names made once, not parsed from text on every request.
    const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
    const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
    for h in [
        hyper::header::CONNECTION,
        PROXY_CONNECTION,
        KEEP_ALIVE,
        hyper::header::TRANSFER_ENCODING,
        hyper::header::UPGRADE,
        hyper::header::PROXY_AUTHORIZATION,
        hyper::header::PROXY_AUTHENTICATE,
    ] {
        headers.remove(h);
    }
    // `te: trailers` is how gRPC says it understands trailers; keep only that.
    if headers
        .get(hyper::header::TE)
        .is_some_and(|v| v.as_bytes() != b"trailers")
    {
        headers.remove(hyper::header::TE);
    }
}

/// What kind of failure the mesh reports; also the `dmsc-error` header value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    BadTarget,
    Unauthorized,
    Forbidden,
    UnknownAgent,
    NoMatch,
    NoneAvailable,
    Unreachable,
    Timeout,
    BadRequest,
    /// The node is at a resource bound (e.g. the body budget); retry later.
    Overloaded,
    /// The caller exceeded a rate limit; retry later.
    RateLimited,
    /// A data-tag rule of a tenant policy refused the request (403).
    PolicyViolation,
    /// Policy says the body must be masked, but it cannot be parsed (415).
    Unmaskable,
    /// Policy says the body must be masked, but it is over the buffer limit (413).
    TooLarge,
    /// A follow-up to `mesh.<tenant>.dmsc` names a task this node did not
    /// route (A2A's TaskNotFound, -32001).
    TaskNotFound,
    /// An A2A operation the mesh cannot do for `mesh.<tenant>.dmsc` (A2A's
    /// UnsupportedOperationError, -32004), e.g. listing every task.
    Unsupported,
    Internal,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::BadTarget => "bad-target",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::UnknownAgent => "unknown-agent",
            ErrorKind::NoMatch => "no-match",
            ErrorKind::NoneAvailable => "none-available",
            ErrorKind::Unreachable => "unreachable",
            ErrorKind::Timeout => "timeout",
            ErrorKind::BadRequest => "bad-request",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::RateLimited => "rate-limited",
            // As the tenancy docs name it.
            ErrorKind::PolicyViolation => "policy_violation",
            ErrorKind::Unmaskable => "unmaskable",
            ErrorKind::TooLarge => "too-large",
            ErrorKind::TaskNotFound => "task-not-found",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Internal => "internal",
        }
    }

    /// The kind named by a `dmsc-error` header value.
    pub fn parse(s: &str) -> Option<ErrorKind> {
        [
            ErrorKind::BadTarget,
            ErrorKind::Unauthorized,
            ErrorKind::Forbidden,
            ErrorKind::UnknownAgent,
            ErrorKind::NoMatch,
            ErrorKind::NoneAvailable,
            ErrorKind::Unreachable,
            ErrorKind::Timeout,
            ErrorKind::BadRequest,
            ErrorKind::Overloaded,
            ErrorKind::RateLimited,
            ErrorKind::PolicyViolation,
            ErrorKind::Unmaskable,
            ErrorKind::TooLarge,
            ErrorKind::TaskNotFound,
            ErrorKind::Unsupported,
            ErrorKind::Internal,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }

    pub fn status(self) -> StatusCode {
        match self {
            // A2A's HTTP mapping of UnsupportedOperationError is 400.
            ErrorKind::BadTarget | ErrorKind::BadRequest | ErrorKind::Unsupported => {
                StatusCode::BAD_REQUEST
            }
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorKind::Forbidden | ErrorKind::PolicyViolation => StatusCode::FORBIDDEN,
            ErrorKind::Unmaskable => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::UnknownAgent | ErrorKind::NoMatch | ErrorKind::TaskNotFound => {
                StatusCode::NOT_FOUND
            }
            ErrorKind::NoneAvailable | ErrorKind::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::Unreachable => StatusCode::BAD_GATEWAY,
            ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The gRPC status code a gRPC caller gets for it.
    pub fn grpc_code(self) -> u16 {
        match self {
            ErrorKind::BadTarget | ErrorKind::BadRequest => 3, // INVALID_ARGUMENT
            ErrorKind::Unauthorized => 16,                     // UNAUTHENTICATED
            ErrorKind::Forbidden | ErrorKind::PolicyViolation => 7, // PERMISSION_DENIED
            ErrorKind::Unmaskable | ErrorKind::TooLarge => 9,  // FAILED_PRECONDITION
            ErrorKind::UnknownAgent | ErrorKind::NoMatch | ErrorKind::TaskNotFound => 5, // NOT_FOUND
            ErrorKind::NoneAvailable | ErrorKind::Unreachable => 14, // UNAVAILABLE
            ErrorKind::Timeout => 4,                                 // DEADLINE_EXCEEDED
            ErrorKind::Overloaded | ErrorKind::RateLimited => 8,     // RESOURCE_EXHAUSTED
            ErrorKind::Unsupported => 12,                            // UNIMPLEMENTED
            ErrorKind::Internal => 13,                               // INTERNAL
        }
    }

    /// The `google.rpc.Code` name of an HTTP+JSON error body, as A2A 1.0
    /// maps its own errors (an unsupported operation is a failed
    /// precondition there, where gRPC callers get UNIMPLEMENTED).
    fn rpc_status(self) -> &'static str {
        match self {
            ErrorKind::Unsupported => "FAILED_PRECONDITION",
            k => match k.grpc_code() {
                3 => "INVALID_ARGUMENT",
                4 => "DEADLINE_EXCEEDED",
                5 => "NOT_FOUND",
                7 => "PERMISSION_DENIED",
                8 => "RESOURCE_EXHAUSTED",
                9 => "FAILED_PRECONDITION",
                12 => "UNIMPLEMENTED",
                14 => "UNAVAILABLE",
                16 => "UNAUTHENTICATED",
                _ => "INTERNAL",
            },
        }
    }

    /// The A2A error reason (`ErrorInfo`, domain `a2a-protocol.org`) of
    /// the kinds A2A itself defines.
    fn a2a_reason(self) -> Option<&'static str> {
        match self {
            ErrorKind::TaskNotFound => Some("TASK_NOT_FOUND"),
            ErrorKind::Unsupported => Some("UNSUPPORTED_OPERATION"),
            ErrorKind::BadRequest | ErrorKind::BadTarget => Some("INVALID_REQUEST"),
            ErrorKind::Internal => Some("INTERNAL_ERROR"),
            _ => None,
        }
    }

    /// JSON-RPC error code: -32600 for a bad request, -32001 (A2A "task not
    /// found" family is -32001..-32006; the mesh uses -32050..) otherwise.
    fn jsonrpc_code(self) -> i64 {
        match self {
            ErrorKind::BadRequest | ErrorKind::BadTarget => -32600,
            ErrorKind::Unauthorized => -32055,
            ErrorKind::Forbidden => -32050,
            ErrorKind::PolicyViolation => -32058,
            ErrorKind::Unmaskable | ErrorKind::TooLarge => -32059,
            ErrorKind::UnknownAgent | ErrorKind::NoMatch => -32051,
            // A2A's own code: SDK clients raise their TaskNotFound error for it.
            ErrorKind::TaskNotFound => -32001,
            ErrorKind::Unsupported => -32004,
            ErrorKind::NoneAvailable => -32052,
            ErrorKind::Unreachable => -32053,
            ErrorKind::Timeout => -32054,
            ErrorKind::Overloaded => -32056,
            ErrorKind::RateLimited => -32057,
            ErrorKind::Internal => -32603,
        }
    }
}

/// A failure the mesh answers itself.
#[derive(Debug, Clone)]
pub struct MeshError {
    pub kind: ErrorKind,
    pub detail: String,
    /// The node that decided.
    pub node: String,
    /// `tenant/agent` when one was involved.
    pub agent: Option<String>,
    /// When the caller may try again (`Retry-After`, whole seconds, at
    /// least 1); set on the calling node, not carried over the overlay.
    pub retry_after: Option<Duration>,
}

impl MeshError {
    pub fn new(kind: ErrorKind, node: &str, detail: impl Into<String>) -> MeshError {
        MeshError {
            kind,
            detail: detail.into(),
            node: node.to_string(),
            agent: None,
            retry_after: None,
        }
    }

    /// Tells the caller when to try again.
    pub fn retry_after(mut self, after: Duration) -> MeshError {
        self.retry_after = Some(after);
        self
    }

    fn set_retry_after(&self, h: &mut HeaderMap) {
        if let Some(after) = self.retry_after {
            h.insert(
                hyper::header::RETRY_AFTER,
                HeaderValue::from(retry_after_secs(after)),
            );
        }
    }

    pub fn agent(mut self, agent: impl ToString) -> MeshError {
        self.agent = Some(agent.to_string());
        self
    }

    /// The same error as a `google.rpc.Status` in JSON (AIP-193), the form
    /// A2A 1.0's HTTP+JSON binding answers errors in: SDK clients of that
    /// binding read `error.message`, and map the first `ErrorInfo`'s reason
    /// (domain `a2a-protocol.org`) to their own error types. Carried as the
    /// `error` member of the problem details, so one body serves both.
    fn status_object(&self) -> Value {
        let mut details = Vec::with_capacity(2);
        if let Some(reason) = self.kind.a2a_reason() {
            details.push(json!({
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": reason,
                "domain": "a2a-protocol.org",
            }));
        }
        let mut metadata = serde_json::Map::new();
        metadata.insert("node".into(), Value::String(self.node.clone()));
        if let Some(agent) = &self.agent {
            metadata.insert("agent".into(), Value::String(agent.clone()));
        }
        details.push(json!({
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": self.kind.as_str().to_ascii_uppercase().replace('-', "_"),
            "domain": "dmsc.dev",
            "metadata": metadata,
        }));
        json!({
            "code": self.kind.status().as_u16(),
            "status": self.kind.rpc_status(),
            "message": self.detail,
            "details": details,
        })
    }

    /// The response, in the dialect of the request whose body is `request`
    /// (a JSON-RPC request gets a JSON-RPC error with its id).
    ///
    /// A JSON-RPC error goes out with HTTP 200, as JSON-RPC servers (the
    /// A2A SDKs' own) answer theirs: the SDK clients check the HTTP status
    /// before they read a body, so a 404 or 503 reached their users as a
    /// bare "HTTP Error 503" with the mesh's message lost. Only 401 and 429
    /// stay, whose HTTP meaning clients act on (authenticate, slow down).
    /// The kind is in the error's `data` and in `dmsc-error` either way. A
    /// streaming call (`message/stream`, `SendStreamingMessage`, ...) gets
    /// it as one SSE event, the shape its client reads.
    pub fn response(&self, request: Option<&[u8]>) -> Response<Body> {
        let jsonrpc = request.and_then(jsonrpc_call);
        let mut status = self.kind.status();
        let (ctype, body) = match jsonrpc {
            Some((id, streaming)) => {
                let keep = matches!(self.kind, ErrorKind::Unauthorized | ErrorKind::RateLimited);
                if !keep {
                    status = StatusCode::OK;
                }
                let body = json!({
                    "jsonrpc": "2.0",
                    "id": id,
                    "error": {
                        "code": self.kind.jsonrpc_code(),
                        "message": self.detail,
                        "data": {"kind": self.kind.as_str(), "node": self.node, "agent": self.agent},
                    }
                });
                if streaming && !keep {
                    (
                        "text/event-stream",
                        Value::String(format!("data: {body}\n\n")),
                    )
                } else {
                    ("application/json", body)
                }
            }
            None => (
                "application/problem+json",
                json!({
                    "type": format!("https://dmsc.dev/errors/{}", self.kind.as_str()),
                    "title": self.kind.as_str(),
                    "status": self.kind.status().as_u16(),
                    "detail": self.detail,
                    "node": self.node,
                    "agent": self.agent,
                    "error": self.status_object(),
                }),
            ),
        };
        let text = match body {
            Value::String(sse) => sse,
            json => json.to_string(),
        };
        let mut resp = Response::new(full(text));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
        h.insert("dmsc-error", HeaderValue::from_static(self.kind.as_str()));
        self.set_retry_after(h);
        if let Ok(v) = HeaderValue::from_str(&self.node) {
            h.insert("dmsc-node", v);
        }
        resp
    }
}

impl MeshError {
    /// The response in the caller's dialect: a gRPC status for a gRPC
    /// call, else [`MeshError::response`] by the request's body.
    pub fn into_response(self, grpc: bool, request: Option<&[u8]>) -> Response<Body> {
        if grpc {
            self.grpc_response()
        } else {
            self.response(request)
        }
    }

    /// The response for a gRPC caller: trailers-only (HTTP 200, no body)
    /// with `grpc-status` and `grpc-message`, which is how gRPC clients
    /// (grpcio, grpc-go, tonic) read a failure; `dmsc-error` and
    /// `dmsc-node` ride along as metadata.
    pub fn grpc_response(&self) -> Response<Body> {
        let mut resp = Response::new(empty());
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert("grpc-status", HeaderValue::from(self.kind.grpc_code()));
        self.set_retry_after(h);
        if let Ok(v) = HeaderValue::from_str(&grpc_message(&self.to_string())) {
            h.insert("grpc-message", v);
        }
        h.insert("dmsc-error", HeaderValue::from_static(self.kind.as_str()));
        if let Ok(v) = HeaderValue::from_str(&self.node) {
            h.insert("dmsc-node", v);
        }
        resp
    }

    /// As it crosses the overlay in a version 2 response head.
    pub fn to_wire(&self) -> super::wire::WireFailure {
        super::wire::WireFailure {
            kind: self.kind.as_str().to_string(),
            detail: self.detail.clone(),
            node: self.node.clone(),
            agent: self.agent.clone(),
        }
    }

    /// Rebuilt from a response head; a kind this node does not know (a
    /// newer peer's) counts as `unreachable`.
    pub fn from_wire(w: super::wire::WireFailure) -> MeshError {
        MeshError {
            kind: ErrorKind::parse(&w.kind).unwrap_or(ErrorKind::Unreachable),
            detail: w.detail,
            node: w.node,
            agent: w.agent,
            retry_after: None,
        }
    }
}

/// `Retry-After` in whole seconds: rounded up, at least 1.
pub fn retry_after_secs(after: Duration) -> u64 {
    (after.as_secs() + u64::from(after.subsec_nanos() > 0)).max(1)
}

impl std::error::Error for MeshError {}

impl std::fmt::Display for MeshError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} at node {}: {}",
            self.kind.as_str(),
            self.node,
            self.detail
        )
    }
}

/// An error with its sources, `outer: inner: ...` (hyper's client errors
/// say "client error (Connect)"; the cause is below).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A `grpc-message` value: percent-encoded UTF-8 (gRPC over HTTP/2 spec).
fn grpc_message(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// True for a gRPC request (`content-type: application/grpc[+proto|...]`).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// The `id` of a JSON-RPC request body, if it is one.
pub fn jsonrpc_id(body: &[u8]) -> Option<Value> {
    jsonrpc_call(body).map(|(id, _)| id)
}

/// A2A's streaming methods, in both dialects: their answer is SSE.
const STREAMING_METHODS: [&str; 4] = [
    "message/stream",
    "tasks/resubscribe",
    "SendStreamingMessage",
    "SubscribeToTask",
];

/// The `id` of a JSON-RPC request body, if it is one, and whether its
/// method answers with a stream of events.
fn jsonrpc_call(body: &[u8]) -> Option<(Value, bool)> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace())?;
    if *first != b'{' {
        return None;
    }
    let v: Value = serde_json::from_slice(body).ok()?;
    if v.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return None;
    }
    let streaming = v
        .get("method")
        .and_then(Value::as_str)
        .is_some_and(|m| STREAMING_METHODS.contains(&m));
    Some((v.get("id").cloned().unwrap_or(Value::Null), streaming))
}

/// Parses a gRPC `grpc-timeout` value: up to 8 digits and a unit, `H`,
/// `M`, `S`, `m` (milliseconds), `u` (microseconds) or `n` (nanoseconds).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let v = v.trim();
    let unit = v.chars().last()?;
    let digits = &v[..v.len() - unit.len_utf8()];
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let d = match unit {
        'H' => Duration::from_secs(n * 3600),
        'M' => Duration::from_secs(n * 60),
        'S' => Duration::from_secs(n),
        'm' => Duration::from_millis(n),
        'u' => Duration::from_micros(n),
        'n' => Duration::from_nanos(n),
        _ => return None,
    };
    (!d.is_zero()).then(|| d.min(MAX_DEADLINE))
}

/// Parses a `dmsc-timeout` value: `250ms`, `2s`, `1.5s`, `2m`, `1h`, or
/// plain milliseconds.
pub fn parse_timeout(v: &str) -> Option<Duration> {
    let v = v.trim();
    let (num, unit) = if let Some(n) = v.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = v.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (v, 0.001)
    };
    let n: f64 = num.trim().parse().ok()?;
    // Clamped: a huge value must not overflow (it means "no hurry").
    let secs = (n * unit).min(MAX_DEADLINE.as_secs_f64());
    (n.is_finite() && n > 0.0).then(|| Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("90S"), Some(Duration::from_secs(90)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(
            parse_grpc_timeout("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(
            parse_grpc_timeout("5000000n"),
            Some(Duration::from_millis(5))
        );
        assert_eq!(parse_grpc_timeout("99999999H"), Some(MAX_DEADLINE));
        for bad in [
            "",
            "S",
            "123456789S",
            "1.5S",
            "-1S",
            "10s",
            "10",
            "0m",
            "10 S",
        ] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }

    #[test]
    fn timeouts_parse() {
        assert_eq!(parse_timeout("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_timeout("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_timeout("400"), Some(Duration::from_millis(400)));
        assert_eq!(parse_timeout("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_timeout("soon"), None);
        assert_eq!(parse_timeout("0"), None);
        assert_eq!(parse_timeout("-1s"), None);
        assert_eq!(parse_timeout("1e20s"), Some(MAX_DEADLINE));
    }

    #[test]
    fn errors_follow_the_request_dialect() {
        let e =
            MeshError::new(ErrorKind::Timeout, "eu-1", "deadline of 300ms passed").agent("acme/x");
        let rpc = br#"{"jsonrpc":"2.0","id":7,"method":"message/send","params":{}}"#;
        let r = e.response(Some(rpc));
        // JSON-RPC errors go out as 200, as JSON-RPC servers answer theirs
        // (the A2A SDKs read no body behind a 504).
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["content-type"], "application/json");
        assert_eq!(r.headers()["dmsc-error"], "timeout");
        let r = e.response(Some(b"hello"));
        assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        assert_eq!(r.headers()["dmsc-error"], "timeout");
        // 401 and 429 keep their HTTP meaning.
        let r = MeshError::new(ErrorKind::RateLimited, "eu-1", "slow down").response(Some(rpc));
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()["content-type"], "application/json");
    }

    #[tokio::test]
    async fn problem_details_carry_the_a2a_http_json_status_too() {
        use http_body_util::BodyExt as _;
        async fn body(e: &MeshError) -> Value {
            let b = e.response(None).into_body().collect().await.expect("body");
            serde_json::from_slice::<Value>(&b.to_bytes()).expect("JSON")
        }
        // An A2A error: its reason first, in A2A's domain, as A2A 1.0 maps it.
        let e = MeshError::new(
            ErrorKind::Unsupported,
            "eu-1",
            "list the tasks of one context",
        );
        let v = body(&e).await;
        assert_eq!(v["detail"], "list the tasks of one context");
        assert_eq!(v["error"]["code"], 400);
        assert_eq!(v["error"]["status"], "FAILED_PRECONDITION");
        assert_eq!(v["error"]["message"], "list the tasks of one context");
        let details = v["error"]["details"].as_array().expect("details");
        assert_eq!(details[0]["reason"], "UNSUPPORTED_OPERATION");
        assert_eq!(details[0]["domain"], "a2a-protocol.org");
        assert_eq!(details[1]["reason"], "UNSUPPORTED");
        assert_eq!(details[1]["domain"], "dmsc.dev");
        // A mesh error A2A has no name for: the mesh's reason only.
        let e = MeshError::new(ErrorKind::RateLimited, "eu-1", "slow down").agent("acme/x");
        let v = body(&e).await;
        assert_eq!(v["error"]["status"], "RESOURCE_EXHAUSTED");
        let details = v["error"]["details"].as_array().expect("details");
        assert_eq!(details.len(), 1);
        assert_eq!(details[0]["reason"], "RATE_LIMITED");
        assert_eq!(details[0]["metadata"]["agent"], "acme/x");
    }

    #[tokio::test]
    async fn a_streaming_call_gets_its_error_as_one_sse_event() {
        use http_body_util::BodyExt as _;
        let e = MeshError::new(ErrorKind::UnknownAgent, "eu-1", "no agent `x`");
        for (method, id) in [("message/stream", "1"), ("SendStreamingMessage", "\"s-1\"")] {
            let rpc = format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"{method}","params":{{}}}}"#);
            let r = e.response(Some(rpc.as_bytes()));
            assert_eq!(r.status(), StatusCode::OK);
            assert_eq!(r.headers()["content-type"], "text/event-stream");
            let body = r.into_body().collect().await.expect("body").to_bytes();
            let text = std::str::from_utf8(&body).expect("utf-8");
            let data = text
                .strip_prefix("data: ")
                .and_then(|t| t.strip_suffix("\n\n"))
                .expect("one event");
            let v: Value = serde_json::from_str(data).expect("JSON-RPC");
            assert_eq!(v["id"].to_string(), id);
            assert_eq!(v["error"]["code"], -32051);
            assert_eq!(v["error"]["data"]["kind"], "unknown-agent");
        }
    }

    #[test]
    fn grpc_callers_get_a_trailers_only_status() {
        let e = MeshError::new(ErrorKind::NoneAvailable, "eu-1", "no healthy agent: 100%");
        let r = e.grpc_response();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()["content-type"], "application/grpc");
        let msg = r.headers()["grpc-message"].to_str().expect("ascii");
        assert!(msg.contains("no healthy agent: 100%25"), "{msg}");
        assert!(
            hyper::body::Body::is_end_stream(r.body()),
            "no body: trailers-only"
        );
        let mut h = HeaderMap::new();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        assert!(is_grpc(&h));
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-private").is_none() && h.get("connection").is_none());
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["content-type"], "text/plain");
    }
}
