//! The gossip keys a node publishes under its own state (besides the
//! registry's `agent/` and `load/` keys, defined in `dmsc-registry`).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// What a node publishes about itself under the gossip key `node`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// `direct` (peers dial `overlay_addr`) or `relayed` (`overlay_addr` is
    /// the node's mapped address; peers reach it through the relays in
    /// `via`). Absent: direct, a node from before relays.
    #[serde(default = "direct", skip_serializing_if = "is_direct")]
    pub reachability: String,
    /// Names of the relays this node keeps sessions with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub via: Vec<String>,
    /// Set on relays: where their TCP + TLS relay listener is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelayInfo>,
}

/// What a relay announces besides its overlay address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayInfo {
    pub tcp: SocketAddr,
}

fn direct() -> String {
    "direct".to_string()
}

fn is_direct(s: &str) -> bool {
    s == "direct"
}

/// Gossip key under which a relay lists the nodes with a live session
/// (comma-separated names): a node that claims a relay which does not list
/// it is not counted as reachable through it.
pub const KEY_RELAY_CLIENTS: &str = "relay/clients";

/// Gossip key prefix of MQTT bridges: `edge/<tenant>` = the broker URL,
/// set while the node's bridge for that tenant is connected. Of the live
/// nodes bridging one tenant on one broker, the one with the lowest name
/// registers its edge agents; the others stand by (see [`crate::edge`]).
pub const KEY_EDGE_PREFIX: &str = "edge/";

/// The gossip key of a tenant's MQTT bridge.
pub fn edge_key(tenant: &str) -> String {
    format!("{KEY_EDGE_PREFIX}{tenant}")
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

/// Gossip key prefix of tenant policies: `policy/<tenant>` =
/// `<version>:<digest>` of the signed document a node holds (the document
/// itself is fetched from a peer, see [`crate::control::policy`]).
pub const KEY_POLICY_PREFIX: &str = "policy/";

/// The gossip key of a tenant's policy.
pub fn policy_key(tenant: &str) -> String {
    format!("{KEY_POLICY_PREFIX}{tenant}")
}

/// Gossip key prefix of tenant key statements: `tenant-key/<tenant>`.
pub const KEY_TENANT_KEY_PREFIX: &str = "tenant-key/";

/// The gossip key of a tenant's key statements (a JSON array: the newest
/// `delete` and the newest statement, when that is not the same one).
pub fn tenant_key_key(tenant: &str) -> String {
    format!("{KEY_TENANT_KEY_PREFIX}{tenant}")
}
