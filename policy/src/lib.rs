//! Tenant policy: the per-tenant documents that say what crosses a tenant's
//! boundary and how much of the mesh a tenant may use.
//!
//! - [`doc`]: the document (TOML or JSON) and its checked form, [`Policy`];
//!   every problem of a document is reported at once.
//! - [`signed`]: the signed envelope it travels in, signed by the operator
//!   CA or by a tenant admin key certified for exactly that tenant; the
//!   signature covers the document's exact bytes.
//! - [`eval`]: the decisions the request path asks (cross-tenant calls,
//!   data tags at a tenant or region boundary), pure and cheap.
//!
//! No I/O here: the node distributes documents by gossip (`policy/<tenant>`
//! = version and digest; the document itself is fetched from a peer),
//! persists them, and calls these functions on both nodes of a delegation.

#![forbid(unsafe_code)]

pub mod doc;
pub mod eval;
pub mod signed;

pub use doc::{
    digest, Boundary, Limit, Limits, MaskRule, Masking, Policy, Situation, Unparseable, Untagged,
};
pub use eval::{accepts, cross_tenant, leaves_region, parse_tags, Addressed, Crossing, Refusal};
pub use signed::{SignedPolicy, Signer, Verified};

/// Why a policy document cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The document (or its envelope) has problems: all of them, one per entry.
    #[error("invalid policy: {}", .0.join("; "))]
    Invalid(Vec<String>),
    /// The signature does not hold.
    #[error("policy signature refused: {0}")]
    Signature(String),
    /// A tenant admin key signed another tenant's document.
    #[error("policy of tenant `{doc}` signed with tenant `{key}`'s admin key: a tenant admin key signs its own tenant's policy only")]
    OtherTenant { key: String, doc: String },
    /// Signing failed (the key, the certificate).
    #[error("cannot sign the policy: {0}")]
    Sign(String),
}

impl PolicyError {
    /// Stable machine code for audit entries and API errors.
    pub fn code(&self) -> &'static str {
        match self {
            PolicyError::Invalid(_) => "invalid",
            PolicyError::Signature(_) => "bad_signature",
            PolicyError::OtherTenant { .. } => "other_tenant_key",
            PolicyError::Sign(_) => "sign_failed",
        }
    }
}
