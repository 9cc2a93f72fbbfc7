//! Protocol types: the values every layer above speaks, with no I/O and no
//! node state. The delegation wire format between nodes ([`wire`]), the HTTP
//! body type, header rules and the mesh's own error kinds ([`http`]), the
//! `dmsc-*` headers the node owns ([`forwarded`]), what
//! the A2A dialects carry that the mesh reads ([`a2a`]), the protocol an
//! agent speaks ([`agent`]), the gossip keys
//! a node publishes ([`gossip`]), and the typed outcome of a delegation
//! ([`outcome`]).

pub mod a2a;
pub mod agent;
pub mod forwarded;
pub mod gossip;
pub mod http;
pub mod outcome;
pub mod wire;
