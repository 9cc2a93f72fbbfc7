//! The control plane of one node: what keeps the request path's tables
//! true. Onboarding and health of this node's agents ([`agents`],
//! [`health`]: which protocol each speaks and whether it is alive), the
//! registry view following gossip and revocations spreading
//! ([`sync`]), credential rotation ([`credentials`]), and the control
//! channel between nodes ([`clock`], and [`policy`] for tenant policies).

pub mod agents;
pub mod clock;
pub mod credentials;
pub mod health;
pub mod policy;
pub mod sync;
