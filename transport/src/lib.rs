//! dmsc-transport: who a node is and how nodes talk to each other.
//!
//! This crate owns everything between "a node has a certificate" and "a peer
//! received a message": SPIFFE identities ([`identity`]), the operator CA and
//! certificate issuance ([`pki`]), the rustls configurations that make every
//! overlay link mutual TLS 1.3 against the mesh CA ([`tls`]), the versioned
//! frame format ([`frame`]) and the QUIC overlay itself ([`overlay`]).
//!
//! Nothing above this crate sees a quinn or rustls type: the overlay hands out
//! peer names read from verified certificates, socket addresses and bytes.

#![forbid(unsafe_code)]

pub mod error;
pub mod frame;
pub mod identity;
pub mod overlay;
pub mod path;
pub mod pki;
pub mod relay;
pub mod revoke;
pub mod statement;
pub mod tenant_key;
pub mod tls;

pub use error::TransportError;
pub use frame::Channel;
pub use identity::{NodeIdentity, SpiffeId};
pub use overlay::{
    BiStream, Established, Inbound, Overlay, OverlayConfig, OverlayStats, PeerLink, StreamRecv,
    StreamSend, TenantScope,
};
pub use path::{Impair, PathInfo, Reachability, Transport};
pub use relay::client::RelayAddr;
pub use revoke::{Revocation, RevocationSet};
pub use tenant_key::TenantKeyStatement;
