//! dmsc-auth: who is calling, for agent ingress.
//!
//! A node admits a remote agent in one of two ways, and this crate owns the
//! checks behind both, with no HTTP server code (the node wires them to its
//! listeners):
//!
//! - an OAuth 2.0 bearer JWT from the operator's identity provider, checked
//!   against a JWKS ([`jwt`], [`jwks`]): the policy is a pure function of the
//!   token, the key set and the time, so the fuzz target and the benchmark
//!   drive exactly what production runs; only the key set refresh does I/O;
//! - a one-time, tenant-scoped join token ([`token`]) redeemed in an
//!   enrollment request ([`enroll`]) that gets the agent a certificate.
//!
//! Every refusal is an [`AuthError`] or [`TokenError`] with a short human
//! `reason()` (the 401 body and the audit log) and a stable machine `code()`
//! (metrics labels, tests, clients that branch on it).

#![forbid(unsafe_code)]

pub mod enroll;
pub mod error;
pub mod jwks;
pub mod jwt;
pub mod token;

pub use enroll::{parse_enroll, parse_renew, EnrollRequest, EnrollResponse, RenewRequest};
pub use error::{AuthError, TokenError};
pub use jwks::{Jwks, JwksSource, JwksStatus};
pub use jwt::{parse_header, JwtCaller, JwtConfig, JwtHeader, JwtPolicy, JwtValidator};
pub use token::{TokenCounts, TokenInfo, TokenStore};

/// Maximum length of a tenant or agent name.
pub const MAX_NAME_LEN: usize = 63;

/// Is `name` a valid tenant or agent name: 1 to 63 characters of lowercase
/// `a-z`, `0-9` and `-`, not starting or ending with `-`.
///
/// The same rule as a DNS label, because names end up in SPIFFE IDs and
/// agent host names (`agent.tenant.dmsc`).
pub fn is_valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_NAME_LEN
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Formats a time as RFC 3339 for error messages; never fails (falls back to
/// the Unix timestamp for years RFC 3339 cannot express).
pub(crate) fn rfc3339(t: &time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("@{}", t.unix_timestamp()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "acme", "team-1", "0", &"a".repeat(63)] {
            assert!(is_valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "Acme",
            "a_b",
            "a.b",
            "é",
            &"a".repeat(64),
            " a",
        ] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn rfc3339_formats() {
        let t = time::OffsetDateTime::from_unix_timestamp(0).expect("epoch");
        assert_eq!(rfc3339(&t), "1970-01-01T00:00:00Z");
    }
}
