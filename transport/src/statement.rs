//! What every operator-signed statement (revocations, tenant key
//! statements) shares: the signature is ECDSA P-256 SHA-256 (ASN.1 DER) by
//! the operator CA key over a domain-separated canonical text, carried as
//! hex, and valid if any of the trusted roots made it (two during a root
//! rotation). One implementation, so a fix to the check fixes every kind.

use rustls::pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::pki::CertificateAuthority;
use crate::TransportError;

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Signs `msg` with the operator CA; the signature as hex.
pub fn sign_hex(ca: &CertificateAuthority, msg: &[u8]) -> Result<String, TransportError> {
    Ok(hex(&ca.sign(msg)?))
}

/// True if `sig_hex` is a signature over `msg` by the key of any of `roots`.
pub fn signed_by_roots(roots: &[CertificateDer<'_>], msg: &[u8], sig_hex: &str) -> bool {
    let Some(sig) = unhex(sig_hex) else {
        return false;
    };
    roots.iter().any(|root| {
        let Ok((_, cert)) = X509Certificate::from_der(root) else {
            return false;
        };
        let spki = cert.public_key().subject_public_key.data.as_ref();
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, spki)
            .verify(msg, &sig)
            .is_ok()
    })
}
