//! How the node speaks to an agent: the protocol pinned in config or learnt
//! by the health checks (`control::health`), read by delivery
//! (`forward::local`) to call an HTTP/2-only agent over HTTP/2.

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};

/// `protocol` of an edge agent's spec: reached over MQTT (see the `edge`
/// module).
pub const EDGE_PROTOCOL: &str = "mqtt";

/// How the node talks to an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 (HTTP/2 callers reach it over HTTP/1.1 too, except with
    /// gRPC unless pinned).
    Http1,
    /// HTTP/2 with prior knowledge, not gRPC.
    H2c,
    /// gRPC over h2c.
    Grpc,
}

impl Protocol {
    /// Discovery order.
    pub(crate) const ALL: [Protocol; 3] = [Protocol::Http1, Protocol::Grpc, Protocol::H2c];

    /// The config spelling (`protocol = "grpc" | "h2c" | "http1"`).
    pub fn parse(s: &str) -> Option<Protocol> {
        Protocol::ALL.into_iter().find(|p| p.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::H2c => "h2c",
            Protocol::Grpc => "grpc",
        }
    }

    /// The agent cannot be spoken to over HTTP/1.1.
    pub fn http2_only(self) -> bool {
        matches!(self, Protocol::H2c | Protocol::Grpc)
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            Protocol::Http1 => 1,
            Protocol::H2c => 2,
            Protocol::Grpc => 3,
        }
    }

    pub(crate) fn from_code(c: u8) -> Option<Protocol> {
        Protocol::ALL.into_iter().find(|p| p.code() == c)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the node knows of one agent's protocol: pinned in config, or learnt
/// by the health checks (shared by them and delivery, hence atomic).
#[derive(Debug)]
pub struct ProtocolState {
    pinned: Option<Protocol>,
    learnt: AtomicU8,
}

impl ProtocolState {
    pub fn new(pinned: Option<Protocol>) -> ProtocolState {
        ProtocolState {
            pinned,
            learnt: AtomicU8::new(0),
        }
    }

    pub fn pinned(&self) -> Option<Protocol> {
        self.pinned
    }

    /// The protocol in use: pinned, else the last one that answered.
    pub fn current(&self) -> Option<Protocol> {
        self.pinned
            .or_else(|| Protocol::from_code(self.learnt.load(Ordering::Relaxed)))
    }

    /// Whether to call the agent over HTTP/2, for a caller that spoke
    /// HTTP/2 (`caller_http2`) or HTTP/1.1, with a gRPC request (`grpc`) or
    /// not. An HTTP/2-only agent gets HTTP/2 whatever the caller spoke; a
    /// pinned `http1` agent gets HTTP/1.1; an agent found to answer HTTP/1.1
    /// gets HTTP/1.1 except for gRPC from an HTTP/2 caller (gRPC needs
    /// HTTP/2's trailers): many agents (uvicorn, Node's `http`) do not speak
    /// h2c at all, and an HTTP/2 caller (curl over TLS, a browser) must
    /// still reach them. An agent not probed yet gets the caller's version.
    pub fn use_http2(&self, caller_http2: bool, grpc: bool) -> bool {
        match (self.pinned, self.current()) {
            (Some(Protocol::Http1), _) => false,
            (_, Some(p)) if p.http2_only() => true,
            (_, Some(Protocol::Http1)) => caller_http2 && grpc,
            _ => caller_http2,
        }
    }

    /// Records what answered; true if it changed.
    pub(crate) fn learn(&self, p: Option<Protocol>) -> bool {
        let code = p.map_or(0, Protocol::code);
        self.learnt.swap(code, Ordering::Relaxed) != code
    }
}
