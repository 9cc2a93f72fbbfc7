//! The gossip keys a node publishes under its own state (besides the
//! registry's `agent/` and `load/` keys, defined in `dmsc-registry`).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// What a node publishes about itself under the gossip key `node`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeAnnouncement {
    pub name: String,
    pub region: String,
    pub overlay_addr: SocketAddr,
    pub spiffe_id: String,
    pub version: String,
    pub started_at: u64,
    #[serde(default)]
    pub roles: Vec<String>,
    /// Newest delegation wire version the node speaks (absent: 1, a node
    /// from before the field).
    #[serde(default = "wire_v1")]
    pub wire: u8,
}

fn wire_v1() -> u8 {
    1
}

/// Gossip key prefix of revocations: `revoked/<serial>`.
pub const KEY_REVOKED_PREFIX: &str = "revoked/";

/// The gossip key of a revocation.
pub fn revoked_key(serial: &str) -> String {
    format!("{KEY_REVOKED_PREFIX}{serial}")
}
