//! The crate's errors: [`AuthError`] for bearer JWTs, key sets, configuration
//! and enrollment requests, [`TokenError`] for join tokens (a second enum
//! because the token store has its own life cycle and callers branch on its
//! variants, e.g. "used" versus "expired").
//!
//! Both carry a stable machine `code()` and a short human `reason()`. The
//! reason goes into the 401 body and the audit log, so it names what is
//! wrong and never echoes a secret (a join token's secret, a JWT's
//! signature); the code is for metrics labels and clients.

use time::OffsetDateTime;

use crate::rfc3339;

/// Why a caller, a key set, a configuration or an enrollment request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The JWT configuration is unusable; every problem is listed.
    #[error("invalid JWT configuration: {}", .0.join("; "))]
    Config(Vec<String>),
    /// The JWKS could not be loaded (at start; later failures keep the last good set).
    #[error("cannot load the JWKS from {location}: {detail}")]
    JwksUnavailable { location: String, detail: String },
    /// The JWKS document itself is invalid.
    #[error("invalid JWKS: {0}")]
    JwksInvalid(String),
    /// Not three base64url parts, bad JSON, too long.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// `alg: none` in any spelling: an unsigned token.
    #[error("algorithm `none` is not accepted")]
    AlgNone,
    /// An algorithm outside the configured list (or any HMAC algorithm).
    #[error("algorithm `{0}` is not accepted")]
    AlgNotAccepted(String),
    /// The header's `crit` names extensions this validator does not implement.
    #[error("header parameter `crit` is not supported")]
    CritUnsupported,
    /// No key with the token's `kid`, even after refreshing the JWKS.
    #[error("no key `{0}` in the JWKS")]
    UnknownKid(String),
    /// The token has no `kid` and the JWKS does not hold exactly one key.
    #[error("token has no `kid` and the JWKS holds {keys} keys")]
    NoKid { keys: usize },
    /// The key named by `kid` cannot verify the header's algorithm.
    #[error("key `{kid}` is {key_kind}, it cannot verify `{alg}`")]
    KeyMismatch {
        kid: String,
        key_kind: &'static str,
        alg: String,
    },
    /// The signature is wrong.
    #[error("signature does not verify with key `{kid}`")]
    BadSignature { kid: String },
    /// `exp` (plus leeway) is in the past.
    #[error("token expired at {}", rfc3339(.at))]
    Expired { at: OffsetDateTime },
    /// `nbf` (minus leeway) is in the future.
    #[error("token not valid before {}", rfc3339(.at))]
    NotYetValid { at: OffsetDateTime },
    /// `iss` is not one of the configured issuers.
    #[error("issuer `{0}` is not accepted")]
    IssuerNotAccepted(String),
    /// No `aud` value is one of the configured audiences.
    #[error("audience `{got}` is not accepted (expected `{expected}`)")]
    AudienceNotAccepted { got: String, expected: String },
    /// A required claim is absent.
    #[error("claim `{0}` missing")]
    ClaimMissing(String),
    /// A claim has the wrong type or is not a valid name.
    #[error("claim `{claim}` {detail}")]
    ClaimInvalid { claim: String, detail: String },
    /// An enrollment or renewal body is unusable.
    #[error("invalid enrollment request: {0}")]
    EnrollInvalid(String),
    /// An enrollment or renewal body is over the size limit.
    #[error("enrollment request is {len} bytes, more than the {max} allowed")]
    EnrollTooLarge { len: usize, max: usize },
}

impl AuthError {
    /// Stable machine code, e.g. `jwt_expired`.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Config(_) => "config_invalid",
            AuthError::JwksUnavailable { .. } => "jwks_unavailable",
            AuthError::JwksInvalid(_) => "jwks_invalid",
            AuthError::Malformed(_) => "jwt_malformed",
            AuthError::AlgNone => "jwt_alg_none",
            AuthError::AlgNotAccepted(_) => "jwt_alg_not_accepted",
            AuthError::CritUnsupported => "jwt_crit_unsupported",
            AuthError::UnknownKid(_) => "jwt_unknown_kid",
            AuthError::NoKid { .. } => "jwt_no_kid",
            AuthError::KeyMismatch { .. } => "jwt_key_mismatch",
            AuthError::BadSignature { .. } => "jwt_bad_signature",
            AuthError::Expired { .. } => "jwt_expired",
            AuthError::NotYetValid { .. } => "jwt_not_yet_valid",
            AuthError::IssuerNotAccepted(_) => "jwt_issuer_not_accepted",
            AuthError::AudienceNotAccepted { .. } => "jwt_audience_not_accepted",
            AuthError::ClaimMissing(_) => "jwt_claim_missing",
            AuthError::ClaimInvalid { .. } => "jwt_claim_invalid",
            AuthError::EnrollInvalid(_) => "enroll_invalid",
            AuthError::EnrollTooLarge { .. } => "enroll_too_large",
        }
    }

    /// Short human reason for the 401 body and the audit log (the Display text).
    pub fn reason(&self) -> String {
        self.to_string()
    }
}

/// Why a join token could not be created or redeemed, or the store failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Not of the form `dmsc-jt.<id>.<secret>`.
    #[error("malformed join token: {0}")]
    Malformed(String),
    /// No token with this id, or the secret does not match (indistinguishable on purpose).
    #[error("no such join token")]
    Unknown,
    #[error("join token `{id}` was already used at {}", rfc3339(.at))]
    Used { id: String, at: OffsetDateTime },
    #[error("join token `{id}` expired at {}", rfc3339(.at))]
    Expired { id: String, at: OffsetDateTime },
    /// The caller claims another tenant; the token is not consumed.
    #[error("join token `{id}` is for tenant `{token_tenant}`, not `{expected}`")]
    TenantMismatch {
        id: String,
        token_tenant: String,
        expected: String,
    },
    /// The caller claims another agent; the token is not consumed.
    #[error("join token `{id}` is for agent `{token_agent}`, not `{expected}`")]
    AgentMismatch {
        id: String,
        token_agent: String,
        expected: String,
    },
    /// Redeemed by a process the token is not bound to (another cgroup or
    /// user); the token is not consumed.
    #[error("join token `{id}` is bound to {bound}, and the caller is {caller}")]
    HolderMismatch {
        id: String,
        bound: String,
        caller: String,
    },
    /// A token without a process binding, where one is required (the
    /// node-local metadata endpoint); not consumed.
    #[error(
        "join token `{id}` is not bound to a cgroup or user (create it with --cgroup or --uid)"
    )]
    NotBound { id: String },
    /// A tenant or agent name that breaks the naming rule.
    #[error("{what} `{value}` is not a valid name (1-63 of a-z, 0-9, '-', not starting or ending with '-')")]
    InvalidName { what: &'static str, value: String },
    /// A time to live of zero or over the maximum.
    #[error("join token lifetime {0}")]
    InvalidTtl(String),
    /// The store file could not be read, parsed or written.
    #[error("join token store `{path}`: {detail}")]
    Store { path: String, detail: String },
}

impl TokenError {
    /// Stable machine code, e.g. `token_used`.
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::Malformed(_) => "token_malformed",
            TokenError::Unknown => "token_unknown",
            TokenError::Used { .. } => "token_used",
            TokenError::Expired { .. } => "token_expired",
            TokenError::TenantMismatch { .. } => "token_tenant_mismatch",
            TokenError::AgentMismatch { .. } => "token_agent_mismatch",
            TokenError::HolderMismatch { .. } => "token_holder_mismatch",
            TokenError::NotBound { .. } => "token_not_bound",
            TokenError::InvalidName { .. } => "token_invalid_name",
            TokenError::InvalidTtl(_) => "token_invalid_ttl",
            TokenError::Store { .. } => "token_store",
        }
    }

    /// Short human reason (the Display text).
    pub fn reason(&self) -> String {
        self.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_and_codes() {
        let at = OffsetDateTime::from_unix_timestamp(1_700_000_000).expect("time");
        let e = AuthError::Expired { at };
        assert_eq!(e.code(), "jwt_expired");
        assert_eq!(e.reason(), "token expired at 2023-11-14T22:13:20Z");
        assert_eq!(
            AuthError::AlgNotAccepted("HS256".into()).reason(),
            "algorithm `HS256` is not accepted"
        );
        assert_eq!(
            AuthError::ClaimMissing("tenant".into()).reason(),
            "claim `tenant` missing"
        );
        let t = TokenError::TenantMismatch {
            id: "ab".into(),
            token_tenant: "a".into(),
            expected: "b".into(),
        };
        assert_eq!(t.reason(), "join token `ab` is for tenant `a`, not `b`");
        assert_eq!(t.code(), "token_tenant_mismatch");
    }
}
