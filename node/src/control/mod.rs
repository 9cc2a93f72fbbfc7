//! The control plane of one node: what keeps the request path's tables
//! true. Onboarding and health of this node's agents ([`agents`]), the
//! registry view following gossip and revocations spreading
//! ([`sync`]), credential rotation ([`credentials`]), and the control
//! channel between nodes ([`clock`]).

pub mod agents;
pub mod clock;
pub mod credentials;
pub mod sync;
