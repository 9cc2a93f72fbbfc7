//! Operator statements about a tenant's data keys: `rotate-key` (every node
//! makes a new data key for the tenant) and `delete` (every node destroys
//! the tenant's keys: crypto-shredding).
//!
//! Shaped like revocations ([`crate::revoke`]): a tiny statement signed by
//! the operator CA over a canonical text, verified against the roots, valid
//! whoever re-publishes it. Each carries a sequence number (unix ms when it
//! was signed): nodes apply a tenant's statements once each, in order, and
//! ignore one older than what they already applied, so a replayed
//! statement does nothing. They travel by gossip under
//! `tenant-key/<tenant>`.

use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use crate::identity::valid_name;
use crate::pki::CertificateAuthority;
use crate::statement::{sign_hex, signed_by_roots};
use crate::TransportError;

/// Largest statement accepted from outside (a real one is ~200 bytes).
pub const MAX_TENANT_KEY_STATEMENT_BYTES: usize = 2048;

const DOMAIN: &str = "dmsc-tenant-key-v1";

/// The actions a statement may carry.
pub const ACTIONS: [&str; 2] = ["rotate-key", "delete"];

/// One signed statement about one tenant's keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantKeyStatement {
    /// Format version (1).
    pub v: u8,
    pub tenant: String,
    /// `rotate-key` or `delete`.
    pub action: String,
    /// Unix milliseconds when the operator signed it; orders a tenant's
    /// statements.
    pub seq: u64,
    /// Hex ECDSA P-256 SHA-256 signature (ASN.1 DER) over the canonical text.
    pub sig: String,
}

fn canonical(tenant: &str, action: &str, seq: u64) -> String {
    format!("{DOMAIN}\n{tenant}\n{action}\n{seq}")
}

fn bad(why: String) -> TransportError {
    TransportError::Statement(why)
}

fn check_fields(tenant: &str, action: &str) -> Result<(), TransportError> {
    if !valid_name(tenant) {
        return Err(bad(format!(
            "`{tenant}` is not a tenant name (lowercase letters, digits and `-`, at most 63)"
        )));
    }
    if !ACTIONS.contains(&action) {
        return Err(bad(format!(
            "`{action}` is not a tenant key action (`rotate-key` or `delete`)"
        )));
    }
    Ok(())
}

impl TenantKeyStatement {
    /// Signs `action` for `tenant` with the operator CA, numbered now.
    pub fn sign(
        ca: &CertificateAuthority,
        tenant: &str,
        action: &str,
    ) -> Result<Self, TransportError> {
        let seq = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or_default();
        Self::sign_at(ca, tenant, action, seq)
    }

    /// [`Self::sign`] with an explicit sequence number (tests).
    pub fn sign_at(
        ca: &CertificateAuthority,
        tenant: &str,
        action: &str,
        seq: u64,
    ) -> Result<Self, TransportError> {
        check_fields(tenant, action)?;
        let sig = sign_hex(ca, canonical(tenant, action, seq).as_bytes())?;
        Ok(TenantKeyStatement {
            v: 1,
            tenant: tenant.to_string(),
            action: action.to_string(),
            seq,
            sig,
        })
    }

    /// Parses a statement (JSON), bounded in size; checks its fields but not
    /// its signature.
    pub fn parse(bytes: &[u8]) -> Result<Self, TransportError> {
        if bytes.len() > MAX_TENANT_KEY_STATEMENT_BYTES {
            return Err(bad(format!(
                "tenant key statement is {} bytes, more than {MAX_TENANT_KEY_STATEMENT_BYTES}",
                bytes.len()
            )));
        }
        let s: TenantKeyStatement = serde_json::from_slice(bytes)
            .map_err(|e| bad(format!("not a tenant key statement: {e}")))?;
        if s.v != 1 {
            return Err(bad(format!(
                "tenant key statement format v{} is not supported (this node reads v1)",
                s.v
            )));
        }
        check_fields(&s.tenant, &s.action)?;
        Ok(s)
    }

    pub fn to_json(&self) -> String {
        // Serializing a struct of strings and integers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Checks the signature against the operator roots.
    pub fn verify(&self, roots: &[CertificateDer<'_>]) -> Result<(), TransportError> {
        let msg = canonical(&self.tenant, &self.action, self.seq);
        if signed_by_roots(roots, msg.as_bytes(), &self.sig) {
            return Ok(());
        }
        Err(bad(format!(
            "`{}` statement for tenant `{}` is not signed by the mesh CA",
            self.action, self.tenant
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::certs_from_pem;
    use std::path::Path;

    #[test]
    fn statements_verify_only_against_their_ca_and_cover_every_field() {
        let ca = CertificateAuthority::generate("td").expect("ca");
        let other = CertificateAuthority::generate("td").expect("other");
        let roots = certs_from_pem(&ca.cert_pem, Path::new("ca")).expect("roots");
        let other_roots = certs_from_pem(&other.cert_pem, Path::new("o")).expect("roots");
        let s = TenantKeyStatement::sign_at(&ca, "acme", "delete", 42).expect("sign");
        s.verify(&roots).expect("verifies");
        assert!(s.verify(&other_roots).is_err());
        assert_eq!(
            TenantKeyStatement::parse(s.to_json().as_bytes()).expect("parse"),
            s
        );
        let mut f = s.clone();
        f.tenant = "globex".into();
        assert!(f.verify(&roots).is_err(), "tenant is covered");
        let mut f = s.clone();
        f.action = "rotate-key".into();
        assert!(f.verify(&roots).is_err(), "action is covered");
        let mut f = s;
        f.seq = 43;
        assert!(f.verify(&roots).is_err(), "seq is covered");
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics_and_made_up_statements_never_verify(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            tenant in "[a-z0-9]{1,12}",
            seq in proptest::prelude::any::<u64>(),
            sig in "[0-9a-f]{0,160}",
        ) {
            let _ = TenantKeyStatement::parse(&data);
            let forged = format!(
                r#"{{"v":1,"tenant":"{tenant}","action":"delete","seq":{seq},"sig":"{sig}"}}"#
            );
            if let Ok(s) = TenantKeyStatement::parse(forged.as_bytes()) {
                let ca = CertificateAuthority::generate("td").expect("ca");
                let roots = certs_from_pem(&ca.cert_pem, Path::new("ca")).expect("roots");
                proptest::prop_assert!(s.verify(&roots).is_err());
            }
        }
    }

    #[test]
    fn junk_is_refused() {
        let ca = CertificateAuthority::generate("td").expect("ca");
        assert!(TenantKeyStatement::sign(&ca, "Acme", "delete").is_err());
        assert!(TenantKeyStatement::sign(&ca, "acme", "erase").is_err());
        assert!(TenantKeyStatement::parse(b"{").is_err());
        assert!(TenantKeyStatement::parse(&[b' '; MAX_TENANT_KEY_STATEMENT_BYTES + 1]).is_err());
        assert!(TenantKeyStatement::parse(
            br#"{"v":1,"tenant":"../x","action":"delete","seq":1,"sig":""}"#
        )
        .is_err());
        assert!(TenantKeyStatement::parse(
            br#"{"v":2,"tenant":"x","action":"delete","seq":1,"sig":""}"#
        )
        .is_err());
        assert!(TenantKeyStatement::parse(
            br#"{"v":1,"tenant":"x","action":"delete","seq":1,"sig":"","extra":1}"#
        )
        .is_err());
    }
}
