//! dmsc-gossip: who is in the mesh, and the small replicated state each node owns.
//!
//! chitchat does the scuttlebutt reconciliation and the phi-accrual failure
//! detection; this crate decides what it runs over and what its results mean:
//!
//! - [`link`]: the simulation boundary. chitchat sees its own `Transport`
//!   trait; [`link::LinkTransport`] implements it on top of a [`link::Link`]
//!   that moves opaque bytes to a `SocketAddr`. The overlay (real QUIC, mutual
//!   TLS) is one `Link`; [`sim::SimNetwork`] (in-memory, links that can be cut,
//!   an MTU) is the other. Gossip never touches plaintext UDP.
//! - [`wire`]: compact digests, a sans-I/O transcoder over chitchat's bytes
//!   that makes each digest entry a few bytes instead of 40-60 (the bulk of
//!   gossip traffic at 100 nodes), with peers that read them.
//! - [`membership`]: a sans-I/O tracker that turns chitchat's alive/dead view
//!   plus heartbeat progress into alive / suspect / dead / left.
//! - [`Gossip`]: the running instance a node holds.
//!
//! chitchat is pinned to 0.11: 0.13 made message (de)serialization
//! crate-private, which leaves no way to carry its messages over a transport
//! of our own.

#![forbid(unsafe_code)]

pub mod link;
pub mod membership;
pub mod sim;
pub mod wire;

mod gossip;

pub use gossip::{
    defaults as gossip_defaults, Gossip, GossipConfig, GossipError, Member, NodeScan,
};
pub use link::{CompactPeers, GossipStats, Link, LinkTransport};
pub use membership::MemberState;

/// Key every node sets when it leaves on purpose (SIGTERM), so peers show
/// `left` instead of waiting for the failure detector to say `dead`.
pub const KEY_LEFT: &str = "left";
/// Key holding the node's self-description (JSON, set by the node crate).
pub const KEY_NODE: &str = "node";
/// Key saying which compact gossip format the node reads ([`wire::VERSION`]);
/// peers without it get chitchat's own encoding.
pub const KEY_GOSSIP_WIRE: &str = "gossip-wire";
