//! Signed policy documents: the form a policy travels and rests in.
//!
//! The signature covers the document's exact bytes (after a domain
//! separator), not a canonical re-encoding: the bytes the operator signed
//! are the bytes every node parses, so two parsers can never disagree about
//! what was signed. The envelope is JSON:
//!
//! ```json
//! {"v":1,"doc":"<base64 of the document>","signer":"<PEM>"|null,"sig":"<hex>"}
//! ```
//!
//! `signer` absent means the operator CA signed (any mesh root verifies it);
//! otherwise it is a tenant admin certificate (`ca issue-tenant`) that a
//! root signed, valid now, not revoked, for exactly the document's tenant.

use std::time::SystemTime;

use base64::Engine as _;
use dmsc_transport::identity;
use dmsc_transport::pki::CertificateAuthority;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::doc::{Policy, MAX_POLICY_BYTES};
use crate::PolicyError;

const DOMAIN: &[u8] = b"dmsc-policy-v1\0";

/// Largest envelope accepted (a maximal document, base64, and a certificate).
pub const MAX_ENVELOPE_BYTES: usize = MAX_POLICY_BYTES * 4 / 3 + 16 * 1024;

/// A policy document and its signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedPolicy {
    /// Envelope format (1).
    pub v: u8,
    /// The document, base64 (standard alphabet).
    pub doc: String,
    /// The tenant admin certificate (PEM) whose key signed; `None`: the operator CA.
    #[serde(default)]
    pub signer: Option<String>,
    /// ECDSA P-256 SHA-256 signature (ASN.1 DER), hex.
    pub sig: String,
}

/// Who signed a policy that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signer {
    Operator,
    /// A tenant admin certificate, by serial.
    TenantAdmin {
        serial: String,
    },
}

impl std::fmt::Display for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Signer::Operator => f.write_str("operator"),
            Signer::TenantAdmin { serial } => write!(f, "tenant-admin:{serial}"),
        }
    }
}

/// A signed policy that verified: the checked policy, who signed it, and
/// the document's bytes.
#[derive(Debug, Clone)]
pub struct Verified {
    pub policy: Policy,
    pub signer: Signer,
    pub doc: Vec<u8>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn message(doc: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + doc.len());
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(doc);
    m
}

fn verify_with(spki: &[u8], msg: &[u8], sig: &[u8]) -> bool {
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, spki)
        .verify(msg, sig)
        .is_ok()
}

fn spki_of(der: &[u8]) -> Option<Vec<u8>> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some(cert.public_key().subject_public_key.data.to_vec())
}

impl SignedPolicy {
    /// Signs `doc` with the operator CA. The document is checked first: a
    /// document with problems is never signed.
    pub fn sign_operator(ca: &CertificateAuthority, doc: &[u8]) -> Result<Self, PolicyError> {
        Policy::parse(doc)?;
        let sig = ca
            .sign(&message(doc))
            .map_err(|e| PolicyError::Sign(e.to_string()))?;
        Ok(SignedPolicy {
            v: 1,
            doc: base64::engine::general_purpose::STANDARD.encode(doc),
            signer: None,
            sig: hex(&sig),
        })
    }

    /// Signs `doc` with a tenant admin key (`ca issue-tenant`); the document
    /// must be of that certificate's tenant.
    pub fn sign_tenant_admin(
        cert_pem: &str,
        key_pem: &str,
        doc: &[u8],
    ) -> Result<Self, PolicyError> {
        let policy = Policy::parse(doc)?;
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| PolicyError::Sign(format!("the tenant admin certificate: {e}")))?;
        let tenant = identity::tenant_admin_of(&der).ok_or_else(|| {
            PolicyError::Sign(
                "the certificate is not a tenant admin certificate (`ca issue-tenant`)".into(),
            )
        })?;
        if tenant != policy.tenant {
            return Err(PolicyError::Sign(format!(
                "the key is tenant `{tenant}`'s; the document is tenant `{}`'s",
                policy.tenant
            )));
        }
        let key = rcgen::KeyPair::from_pem(key_pem)
            .map_err(|e| PolicyError::Sign(format!("the tenant admin key: {e}")))?;
        if spki_of(&der).as_deref() != Some(key.public_key_raw()) {
            return Err(PolicyError::Sign(
                "the key does not belong to the tenant admin certificate".into(),
            ));
        }
        use rcgen::SigningKey as _;
        let sig = key
            .sign(&message(doc))
            .map_err(|e| PolicyError::Sign(e.to_string()))?;
        Ok(SignedPolicy {
            v: 1,
            doc: base64::engine::general_purpose::STANDARD.encode(doc),
            signer: Some(cert_pem.to_string()),
            sig: hex(&sig),
        })
    }

    /// Parses an envelope (JSON), bounded in size; checks nothing else.
    pub fn parse(bytes: &[u8]) -> Result<Self, PolicyError> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(PolicyError::Invalid(vec![format!(
                "the signed policy is {} bytes, more than {MAX_ENVELOPE_BYTES}",
                bytes.len()
            )]));
        }
        let s: SignedPolicy = serde_json::from_slice(bytes).map_err(|e| {
            PolicyError::Invalid(vec![format!(
                "not a signed policy (`dmsc-node policy sign` makes one): {e}"
            )])
        })?;
        if s.v != 1 {
            return Err(PolicyError::Invalid(vec![format!(
                "signed policy format v{} is not supported (this node reads v1)",
                s.v
            )]));
        }
        Ok(s)
    }

    pub fn to_json(&self) -> String {
        // A struct of strings and an integer always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The document's bytes.
    pub fn doc_bytes(&self) -> Result<Vec<u8>, PolicyError> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.doc)
            .map_err(|e| PolicyError::Invalid(vec![format!("`doc` is not base64: {e}")]))
    }

    /// Checks the signature against the mesh `roots` and parses the
    /// document. `revoked` says whether a certificate serial is revoked.
    pub fn verify(
        &self,
        roots: &[CertificateDer<'_>],
        now: SystemTime,
        revoked: impl Fn(&str) -> bool,
    ) -> Result<Verified, PolicyError> {
        let doc = self.doc_bytes()?;
        let sig = unhex(&self.sig)
            .ok_or_else(|| PolicyError::Signature("the signature is not hex".into()))?;
        let msg = message(&doc);
        let signer = match &self.signer {
            None => {
                let ok = roots
                    .iter()
                    .filter_map(|r| spki_of(r))
                    .any(|k| verify_with(&k, &msg, &sig));
                if !ok {
                    return Err(PolicyError::Signature(
                        "not signed by the mesh CA (and no tenant admin certificate is attached)"
                            .into(),
                    ));
                }
                Signer::Operator
            }
            Some(pem) => {
                let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| {
                    PolicyError::Signature(format!("the signer certificate does not parse: {e}"))
                })?;
                if !roots.iter().any(|r| identity::signed_by(&der, r)) {
                    return Err(PolicyError::Signature(format!(
                        "the signer certificate was not issued by the mesh CA (issuer `{}`)",
                        identity::issuer_of(&der)
                    )));
                }
                if !identity::valid_at(&der, now) {
                    return Err(PolicyError::Signature(
                        "the signer certificate is expired or not yet valid".into(),
                    ));
                }
                let serial = identity::serial_of(&der).unwrap_or_default();
                if revoked(&serial) {
                    return Err(PolicyError::Signature(format!(
                        "the signer certificate (serial {serial}) is revoked"
                    )));
                }
                let Some(tenant) = identity::tenant_admin_of(&der) else {
                    return Err(PolicyError::Signature(
                        "the signer certificate is not a tenant admin certificate".into(),
                    ));
                };
                let key = spki_of(&der).unwrap_or_default();
                if !verify_with(&key, &msg, &sig) {
                    return Err(PolicyError::Signature(format!(
                        "the signature does not verify with tenant `{tenant}`'s admin key"
                    )));
                }
                // Parse before comparing tenants, but only after the
                // signature held: an unsigned document gets no parser time.
                let policy = Policy::parse(&doc)?;
                if policy.tenant != tenant {
                    return Err(PolicyError::OtherTenant {
                        key: tenant,
                        doc: policy.tenant,
                    });
                }
                return Ok(Verified {
                    policy,
                    signer: Signer::TenantAdmin { serial },
                    doc,
                });
            }
        };
        Ok(Verified {
            policy: Policy::parse(&doc)?,
            signer,
            doc,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const DOC: &str = "tenant = \"acme\"\nversion = 2\n";

    fn roots(ca: &CertificateAuthority) -> Vec<CertificateDer<'static>> {
        vec![CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).expect("pem")]
    }

    #[test]
    fn operator_signed_documents_verify_with_the_exact_bytes() {
        let ca = CertificateAuthority::generate("td").expect("ca");
        let s = SignedPolicy::sign_operator(&ca, DOC.as_bytes()).expect("sign");
        let back = SignedPolicy::parse(s.to_json().as_bytes()).expect("parse");
        let v = back
            .verify(&roots(&ca), SystemTime::now(), |_| false)
            .expect("verifies");
        assert_eq!(v.signer, Signer::Operator);
        assert_eq!(v.doc, DOC.as_bytes());
        assert_eq!((v.policy.tenant.as_str(), v.policy.version), ("acme", 2));
        // One byte changed (even whitespace, which a canonical form would
        // drop) breaks the signature.
        let mut forged = back.clone();
        forged.doc = base64::engine::general_purpose::STANDARD.encode(format!("{DOC} "));
        let e = forged
            .verify(&roots(&ca), SystemTime::now(), |_| false)
            .expect_err("changed bytes");
        assert!(matches!(e, PolicyError::Signature(_)), "{e}");
        // Another mesh's CA.
        let other = CertificateAuthority::generate("td").expect("ca");
        assert!(back
            .verify(&roots(&other), SystemTime::now(), |_| false)
            .is_err());
    }

    #[test]
    fn a_tenant_admin_signs_its_own_tenant_only() {
        let ca = CertificateAuthority::generate("td").expect("ca");
        let acme = ca
            .issue_tenant_admin("acme", Duration::from_secs(3600))
            .expect("issue");
        let s = SignedPolicy::sign_tenant_admin(&acme.cert_pem, &acme.key_pem, DOC.as_bytes())
            .expect("sign");
        let v = s
            .verify(&roots(&ca), SystemTime::now(), |_| false)
            .expect("verifies");
        assert!(matches!(v.signer, Signer::TenantAdmin { .. }));
        // Revoked signer.
        let e = s
            .verify(&roots(&ca), SystemTime::now(), |_| true)
            .expect_err("revoked");
        assert!(e.to_string().contains("revoked"), "{e}");
        // Expired signer.
        let later = SystemTime::now() + Duration::from_secs(7200);
        assert!(s.verify(&roots(&ca), later, |_| false).is_err());
        // The signing helper refuses another tenant's document...
        let globex_doc = b"tenant = \"globex\"\nversion = 9\n";
        let e = SignedPolicy::sign_tenant_admin(&acme.cert_pem, &acme.key_pem, globex_doc)
            .expect_err("other tenant");
        assert!(e.to_string().contains("tenant `acme`"), "{e}");
        // ...and a forged envelope (acme's key over globex's document) is
        // refused by the verifier with the tenant named.
        let key = rcgen::KeyPair::from_pem(&acme.key_pem).expect("key");
        use rcgen::SigningKey as _;
        let forged = SignedPolicy {
            v: 1,
            doc: base64::engine::general_purpose::STANDARD.encode(globex_doc),
            signer: Some(acme.cert_pem.clone()),
            sig: hex(&key.sign(&message(globex_doc)).expect("sign")),
        };
        let e = forged
            .verify(&roots(&ca), SystemTime::now(), |_| false)
            .expect_err("other tenant");
        assert!(
            matches!(&e, PolicyError::OtherTenant { key, doc } if key == "acme" && doc == "globex"),
            "{e}"
        );
        // A tenant admin certificate of another mesh.
        let other = CertificateAuthority::generate("td").expect("ca");
        let stranger = other
            .issue_tenant_admin("acme", Duration::from_secs(3600))
            .expect("issue");
        let s =
            SignedPolicy::sign_tenant_admin(&stranger.cert_pem, &stranger.key_pem, DOC.as_bytes())
                .expect("sign");
        let e = s
            .verify(&roots(&ca), SystemTime::now(), |_| false)
            .expect_err("other mesh");
        assert!(e.to_string().contains("not issued by the mesh CA"), "{e}");
    }

    #[test]
    fn garbage_envelopes_are_refused_with_a_reason() {
        assert!(SignedPolicy::parse(b"{}").is_err());
        assert!(SignedPolicy::parse(b"not json").is_err());
        let e = SignedPolicy::parse(&vec![b' '; MAX_ENVELOPE_BYTES + 1]).expect_err("big");
        assert!(e.to_string().contains("more than"), "{e}");
        let ca = CertificateAuthority::generate("td").expect("ca");
        let mut s = SignedPolicy::sign_operator(&ca, DOC.as_bytes()).expect("sign");
        s.sig = "zz".into();
        assert!(s.verify(&roots(&ca), SystemTime::now(), |_| false).is_err());
    }
}
