//! Protocol types: the values every layer above speaks, with no I/O and no
//! node state. The delegation wire format between nodes ([`wire`]), the HTTP
//! body type, header rules and the mesh's own error kinds ([`http`]), the
//! `dmsc-*` headers the node owns ([`forwarded`]), what
//! the A2A dialects carry that the mesh reads ([`a2a`]), mesh
//! addresses ([`host`]), the protocol an
//! agent speaks ([`agent`]), the gossip keys
//! a node publishes ([`gossip`]), and the typed outcome of a delegation
//! ([`outcome`]).

pub mod a2a;
pub mod agent;
pub mod forwarded;
pub mod gossip;
pub mod host;
pub mod http;
pub mod outcome;
pub mod wire;

/// `bytes` as lowercase hex, two digits a byte: how ids, secrets and hashes
/// are written (a trace id is the hex of 16 random bytes). Without the
/// formatter: a new trace id is made on every request that brings none.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}
