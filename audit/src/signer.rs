//! Checkpoint signing (with the node's own key) and checking.
//!
//! Signing goes through rcgen, which already parses the node's PKCS#8 PEM
//! key; checking uses ring directly for the ECDSA verification and
//! x509-parser for the certificate (its `verify` feature checks the
//! certificate's own signature against a root). The signed message is
//! domain-separated and versioned (`dmsc-audit-checkpoint-v1`) so a
//! checkpoint signature can never be replayed as, say, a TLS signature.

use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rcgen::{KeyPair, SigningKey as _};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
use x509_parser::time::ASN1Time;

use crate::event::Checkpoint;
use crate::line::line_hash;
use crate::AuditError;

/// The bytes a checkpoint signs.
pub fn checkpoint_message(node: &str, seq: u64, head: &str) -> Vec<u8> {
    format!("dmsc-audit-checkpoint-v1\n{node}\n{seq}\n{head}").into_bytes()
}

/// The node's key and certificate, used to sign checkpoints.
pub struct Signer {
    key: KeyPair,
    cert_der: Vec<u8>,
    cert_b64: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").finish_non_exhaustive()
    }
}

impl Signer {
    /// A signer from the node's PKCS#8 ECDSA P-256 key and its certificate
    /// (the first `CERTIFICATE` block of `cert_pem`). Refuses a certificate
    /// whose public key is not the key's.
    pub fn from_pem(key_pem: &str, cert_pem: &str) -> Result<Self, AuditError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| {
            AuditError::Signer(format!(
                "the node key is not a PKCS#8 PEM private key ({e}); use the node.key written by `dmsc-node`"
            ))
        })?;
        if key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            return Err(AuditError::Signer(
                "the node key must be ECDSA P-256 (the mesh PKI issues only those)".into(),
            ));
        }
        let der = first_cert_der(cert_pem)?;
        let (_, cert) = X509Certificate::from_der(&der)
            .map_err(|e| AuditError::Signer(format!("the node certificate does not parse: {e}")))?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(AuditError::Signer(
                "the node certificate is not for the node key (public keys differ); pass the matching node.pem and node.key".into(),
            ));
        }
        Ok(Signer {
            key,
            cert_b64: B64.encode(&der),
            cert_der: der,
        })
    }

    /// Reads the key and certificate PEM files.
    pub fn load(key_path: &Path, cert_path: &Path) -> Result<Self, AuditError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| AuditError::Io {
                path: p.to_path_buf(),
                op: "reading the signing credentials",
                source,
            })
        };
        Self::from_pem(&read(key_path)?, &read(cert_path)?).map_err(|e| match e {
            AuditError::Signer(m) => AuditError::Signer(format!(
                "{m} (key `{}`, certificate `{}`)",
                key_path.display(),
                cert_path.display()
            )),
            other => other,
        })
    }

    /// A fresh key with a self-signed certificate whose CN is `node`, for
    /// tests and benchmarks. Its checkpoints only prove anything when the
    /// verifier is told to trust exactly this certificate.
    pub fn generate_self_signed(node: &str) -> Result<Self, AuditError> {
        let err = |e: rcgen::Error| AuditError::Signer(format!("generating a test signer: {e}"));
        let key = KeyPair::generate().map_err(err)?;
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, node);
        let cert = params.self_signed(&key).map_err(err)?;
        Ok(Signer {
            cert_b64: B64.encode(cert.der()),
            cert_der: cert.der().to_vec(),
            key,
        })
    }

    /// The certificate (DER) that goes into every checkpoint.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    pub(crate) fn sign(&self, node: &str, seq: u64, head: &str) -> Result<Checkpoint, AuditError> {
        let sig = self
            .key
            .sign(&checkpoint_message(node, seq, head))
            .map_err(|e| AuditError::Signer(format!("signing checkpoint {seq}: {e}")))?;
        Ok(Checkpoint {
            head: head.to_string(),
            seq,
            cert: self.cert_b64.clone(),
            sig: B64.encode(sig),
        })
    }
}

/// DER of every `CERTIFICATE` block in `pem`.
pub(crate) fn certs_der(pem: &str) -> Result<Vec<Vec<u8>>, AuditError> {
    let mut out = Vec::new();
    for block in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let block = block.map_err(|e| AuditError::Signer(format!("bad PEM block: {e}")))?;
        if block.label == "CERTIFICATE" {
            out.push(block.contents);
        }
    }
    Ok(out)
}

fn first_cert_der(pem: &str) -> Result<Vec<u8>, AuditError> {
    certs_der(pem)?.into_iter().next().ok_or_else(|| {
        AuditError::Signer("no CERTIFICATE block in the node certificate PEM".into())
    })
}

/// Does `cert` name `node`? A SPIFFE node identity (`spiffe://<td>/node/<n>`)
/// in the SAN decides if present; otherwise the subject CN must be `node`.
fn names_node(cert: &X509Certificate<'_>, node: &str) -> bool {
    let mut saw_node_uri = false;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                if let Some(rest) = uri.strip_prefix("spiffe://") {
                    if let Some((_, n)) = rest.split_once("/node/") {
                        saw_node_uri = true;
                        if n == node {
                            return true;
                        }
                    }
                }
            }
        }
    }
    !saw_node_uri
        && cert
            .subject()
            .iter_common_name()
            .any(|cn| cn.as_str().ok() == Some(node))
}

/// Why a checkpoint does not verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CheckpointFault {
    /// Its certificate does not chain to the roots given: the wrong CA
    /// bundle, or a key of another CA.
    Untrusted(String),
    /// Anything else: the checkpoint or the lines it covers were altered.
    Invalid(String),
}

impl std::fmt::Display for CheckpointFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckpointFault::Untrusted(s) | CheckpointFault::Invalid(s) => f.write_str(s),
        }
    }
}

/// Checks one checkpoint line. Returns the SHA-256 fingerprint of the
/// signer's certificate, or why it does not verify.
pub(crate) fn check_checkpoint(
    node: &str,
    line_seq: u64,
    line_prev: &str,
    ts_ms: u64,
    cp: &Checkpoint,
    roots: &[Vec<u8>],
) -> Result<String, CheckpointFault> {
    use CheckpointFault::{Invalid, Untrusted};
    if cp.seq != line_seq {
        return Err(Invalid(format!(
            "checkpoint says seq {} but sits on line seq {line_seq}",
            cp.seq
        )));
    }
    if cp.head != line_prev {
        return Err(Invalid(format!(
            "checkpoint head {} is not the line's prev {line_prev}",
            cp.head
        )));
    }
    let der = B64
        .decode(&cp.cert)
        .map_err(|e| Invalid(format!("checkpoint cert is not base64: {e}")))?;
    let (_, cert) = X509Certificate::from_der(&der)
        .map_err(|e| Invalid(format!("checkpoint cert is not an X.509 certificate: {e}")))?;
    if !names_node(&cert, node) {
        return Err(Invalid(format!(
            "checkpoint cert ({}) is not a certificate of node `{node}`",
            cert.subject()
        )));
    }
    if !roots.is_empty() {
        let chained = roots.iter().any(|root| {
            X509Certificate::from_der(root).is_ok_and(|(_, root)| {
                root.subject().as_raw() == cert.issuer().as_raw()
                    && cert.verify_signature(Some(root.public_key())).is_ok()
            })
        });
        if !chained {
            return Err(Untrusted(format!(
                "checkpoint cert ({}) was not issued by any of the trusted roots",
                cert.subject()
            )));
        }
        let at = i64::try_from(ts_ms / 1000)
            .ok()
            .and_then(|s| ASN1Time::from_timestamp(s).ok());
        if !at.is_some_and(|t| cert.validity().is_valid_at(t)) {
            return Err(Invalid(format!(
                "checkpoint cert ({}) was not valid at the checkpoint's time ({ts_ms} ms)",
                cert.subject()
            )));
        }
    }
    let sig = B64
        .decode(&cp.sig)
        .map_err(|e| Invalid(format!("checkpoint sig is not base64: {e}")))?;
    let key = ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_ASN1,
        cert.public_key().subject_public_key.data.as_ref(),
    );
    key.verify(&checkpoint_message(node, cp.seq, &cp.head), &sig)
        .map_err(|_| {
            Invalid(format!(
                "signature does not verify over head {} at seq {}",
                cp.head, cp.seq
            ))
        })?;
    Ok(line_hash(&der))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_check_round_trip() {
        let s = Signer::generate_self_signed("n1").expect("signer");
        let head = crate::line::GENESIS_PREV;
        let cp = s.sign("n1", 0, head).expect("sign");
        assert!(check_checkpoint("n1", 0, head, 0, &cp, &[]).is_ok());
        // Wrong node name in the message or the cert.
        assert!(check_checkpoint("n2", 0, head, 0, &cp, &[]).is_err());
        // A different head.
        let mut other = cp.clone();
        other.head = "1".repeat(64);
        assert!(check_checkpoint("n1", 0, &other.head, 0, &other, &[]).is_err());
        // As its own root (self-signed), at a time the cert is valid.
        let now_ms = crate::writer::now_ms();
        let own = vec![s.cert_der().to_vec()];
        assert!(check_checkpoint("n1", 0, head, now_ms, &cp, &own).is_ok());
        // rcgen's default validity starts in 1975: a 1970 checkpoint is outside it.
        let early = check_checkpoint("n1", 0, head, 0, &cp, &own);
        assert!(early
            .expect_err("before not_before")
            .to_string()
            .contains("not valid at"));
        // Roots that do not include the self-signed cert.
        let stranger = Signer::generate_self_signed("n1").expect("signer");
        let err = check_checkpoint("n1", 0, head, now_ms, &cp, &[stranger.cert_der().to_vec()])
            .expect_err("stranger root");
        assert!(matches!(err, CheckpointFault::Untrusted(_)), "{err}");
    }

    #[test]
    fn from_pem_refuses_a_mismatched_cert() {
        let a = KeyPair::generate().expect("key");
        let b = KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "n1");
        let cert_b = params.self_signed(&b).expect("cert");
        assert!(Signer::from_pem(&b.serialize_pem(), &cert_b.pem()).is_ok());
        let err = Signer::from_pem(&a.serialize_pem(), &cert_b.pem()).expect_err("mismatch");
        assert!(err.to_string().contains("public keys differ"), "{err}");
    }
}
