//! Certificate revocation: statements signed by the operator CA, a set every
//! verifier consults, and its persisted form.
//!
//! Why not X.509 CRLs: a CRL applies only to certificates its *signer*
//! issued, so the operator CA could not revoke an agent certificate that a
//! node's issuing certificate signed, and every node would need to rebuild
//! its verifiers from a CRL list on each change. A revocation here is a tiny
//! signed statement "serial S is revoked, because R, at T", checked against
//! every certificate of a presented chain (leaf and intermediates), so one
//! revocation of a node's issuing certificate also kills every agent
//! certificate it signed. Serials are 128-bit random, so a serial names one
//! certificate mesh-wide.
//!
//! Statements travel by gossip (`revoked/<serial>`); any node can re-publish
//! one because the signature, not the publisher, makes it valid.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use crate::identity::normalize_serial;
use crate::pki::CertificateAuthority;
use crate::statement::{sign_hex, signed_by_roots};
use crate::TransportError;

/// Largest revocation statement accepted from outside (a real one is ~250 bytes).
pub const MAX_REVOCATION_BYTES: usize = 4096;

const DOMAIN: &str = "dmsc-revocation-v1";

/// One revoked certificate, signed by an operator root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revocation {
    /// Format version (1).
    pub v: u8,
    /// Normalized serial of the revoked certificate.
    pub serial: String,
    /// Free text, e.g. `key-compromise`, `superseded`.
    pub reason: String,
    /// Unix seconds when the operator signed it.
    pub revoked_at: u64,
    /// Hex ECDSA P-256 SHA-256 signature (ASN.1 DER) over the canonical text.
    pub sig: String,
}

fn canonical(serial: &str, reason: &str, revoked_at: u64) -> String {
    format!("{DOMAIN}\n{serial}\n{reason}\n{revoked_at}")
}

impl Revocation {
    /// Signs a revocation of `serial` with the operator CA.
    pub fn sign(
        ca: &CertificateAuthority,
        serial: &str,
        reason: &str,
    ) -> Result<Self, TransportError> {
        let serial = normalize_serial(serial);
        if serial.is_empty() || !serial.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TransportError::Statement(format!(
                "`{serial}` is not a certificate serial (hex digits)"
            )));
        }
        if reason.len() > 200 || reason.contains('\n') {
            return Err(TransportError::Statement(
                "revocation reason must be one line of at most 200 bytes".into(),
            ));
        }
        let revoked_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let sig = sign_hex(ca, canonical(&serial, reason, revoked_at).as_bytes())?;
        Ok(Revocation {
            v: 1,
            serial,
            reason: reason.to_string(),
            revoked_at,
            sig,
        })
    }

    /// Parses a statement (JSON), bounded in size; does not check the signature.
    pub fn parse(bytes: &[u8]) -> Result<Self, TransportError> {
        if bytes.len() > MAX_REVOCATION_BYTES {
            return Err(TransportError::Statement(format!(
                "revocation is {} bytes, more than {MAX_REVOCATION_BYTES}",
                bytes.len()
            )));
        }
        let r: Revocation = serde_json::from_slice(bytes)
            .map_err(|e| TransportError::Statement(format!("not a revocation statement: {e}")))?;
        if r.v != 1 {
            return Err(TransportError::Statement(format!(
                "revocation format v{} is not supported (this node reads v1)",
                r.v
            )));
        }
        if r.serial != normalize_serial(&r.serial) {
            return Err(TransportError::Statement(format!(
                "revocation serial `{}` is not normalized",
                r.serial
            )));
        }
        Ok(r)
    }

    pub fn to_json(&self) -> String {
        // Serializing a struct of strings and integers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Checks the signature against the operator roots; the statement is
    /// valid if any root signed it (two roots during a root rotation).
    pub fn verify(&self, roots: &[CertificateDer<'_>]) -> Result<(), TransportError> {
        let msg = canonical(&self.serial, &self.reason, self.revoked_at);
        if signed_by_roots(roots, msg.as_bytes(), &self.sig) {
            return Ok(());
        }
        Err(TransportError::Statement(format!(
            "revocation of serial {} is not signed by the mesh CA",
            self.serial
        )))
    }
}

/// Every serial whose revocation condemns a chain, leaf first: each
/// certificate's own and those it was renewed from.
pub fn chain_serials<'a>(chain: impl IntoIterator<Item = &'a CertificateDer<'a>>) -> Vec<String> {
    chain
        .into_iter()
        .flat_map(|c| crate::identity::revocation_serials(c))
        .collect()
}

/// The revocations a node knows, shared by every verifier of the node.
/// Reads (one per handshake and per ingress request) vastly outnumber
/// writes (one per revocation), hence the `RwLock`.
#[derive(Debug, Default)]
pub struct RevocationSet {
    by_serial: RwLock<HashMap<String, Revocation>>,
    version: AtomicU64,
}

impl RevocationSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a (verified) revocation; true if it was new.
    pub fn insert(&self, r: Revocation) -> bool {
        let mut map = self.by_serial.write().unwrap_or_else(|p| p.into_inner());
        if map.contains_key(&r.serial) {
            return false;
        }
        map.insert(r.serial.clone(), r);
        self.version.fetch_add(1, Ordering::Release);
        true
    }

    pub fn get(&self, serial: &str) -> Option<Revocation> {
        let map = self.by_serial.read().unwrap_or_else(|p| p.into_inner());
        map.get(&normalize_serial(serial)).cloned()
    }

    pub fn len(&self) -> usize {
        self.by_serial
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bumped on every insert: callers re-check live connections when it moves.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    pub fn all(&self) -> Vec<Revocation> {
        let map = self.by_serial.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<Revocation> = map.values().cloned().collect();
        v.sort_by(|a, b| a.serial.cmp(&b.serial));
        v
    }

    /// The first revoked certificate of a presented chain (leaf first),
    /// counting the serials a certificate was renewed from: revoking a
    /// stolen certificate also revokes what it was renewed into.
    pub fn revoked_in<'a>(
        &self,
        chain: impl IntoIterator<Item = &'a CertificateDer<'a>>,
    ) -> Option<Revocation> {
        if self.is_empty() {
            return None;
        }
        self.revoked_among(&chain_serials(chain))
    }

    /// The first revoked serial among `serials` (from [`chain_serials`]):
    /// for callers that check one chain many times, e.g. per request on a
    /// long-lived connection, without parsing its certificates each time.
    pub fn revoked_among(&self, serials: &[String]) -> Option<Revocation> {
        let map = self.by_serial.read().unwrap_or_else(|p| p.into_inner());
        if map.is_empty() {
            return None;
        }
        serials.iter().find_map(|s| map.get(s).cloned())
    }

    /// Loads persisted revocations (one JSON statement per line), keeping
    /// only those that verify against `roots`. A missing file is empty.
    pub fn load(&self, path: &Path, roots: &[CertificateDer<'_>]) -> Result<usize, TransportError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(source) => {
                return Err(TransportError::ReadFile {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let mut n = 0;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match Revocation::parse(line.as_bytes()).and_then(|r| r.verify(roots).map(|()| r)) {
                Ok(r) => {
                    self.insert(r);
                    n += 1;
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "skipping a persisted revocation")
                }
            }
        }
        Ok(n)
    }

    /// Writes every revocation (atomically: temp file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<(), TransportError> {
        let mut text = String::new();
        for r in self.all() {
            text.push_str(&r.to_json());
            text.push('\n');
        }
        let tmp = path.with_extension("tmp");
        crate::pki::write_file(&tmp, &text, 0o644)?;
        std::fs::rename(&tmp, path).map_err(|source| TransportError::WriteFile {
            path: path.to_path_buf(),
            source,
        })?;
        if let Some(dir) = path.parent() {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::certs_from_pem;

    #[test]
    fn signed_revocations_verify_only_against_their_ca() {
        let ca = CertificateAuthority::generate("td").expect("ca");
        let other = CertificateAuthority::generate("td").expect("other");
        let r = Revocation::sign(&ca, "01:AB:cd", "key-compromise").expect("sign");
        assert_eq!(r.serial, "1abcd");
        let roots = certs_from_pem(&ca.cert_pem, Path::new("ca")).expect("roots");
        let other_roots = certs_from_pem(&other.cert_pem, Path::new("o")).expect("roots");
        r.verify(&roots).expect("verifies");
        assert!(r.verify(&other_roots).is_err());
        // Two roots (rotation): valid if either signed.
        let both = [other_roots[0].clone(), roots[0].clone()];
        r.verify(&both).expect("verifies with a bundle");

        let parsed = Revocation::parse(r.to_json().as_bytes()).expect("parse");
        assert_eq!(parsed, r);
        let mut forged = r.clone();
        forged.serial = "1abce".into();
        assert!(forged.verify(&roots).is_err(), "serial is covered");
        let mut forged = r;
        forged.reason = "oops".into();
        assert!(forged.verify(&roots).is_err(), "reason is covered");
    }

    #[test]
    fn the_set_finds_revoked_chain_members_and_persists() {
        let ca = CertificateAuthority::generate("td").expect("ca");
        let roots = certs_from_pem(&ca.cert_pem, Path::new("ca")).expect("roots");
        let creds = ca
            .issue_node_credentials("n1", crate::pki::NODE_VALIDITY, &[])
            .expect("creds");
        let issuer =
            crate::pki::NodeIssuer::load_pem(&creds.issuer.cert_pem, &creds.issuer.key_pem)
                .expect("issuer");
        let agent = issuer
            .issue_agent(
                "acme",
                "a1",
                crate::pki::AgentKey::Generate,
                crate::pki::AGENT_VALIDITY,
            )
            .expect("agent");
        let chain = certs_from_pem(&agent.chain_pem, Path::new("chain")).expect("chain");
        assert_eq!(chain.len(), 2);
        let set = RevocationSet::new();
        assert!(set.revoked_in(&chain).is_none());
        // Revoking the issuing certificate revokes what it signed.
        let r = Revocation::sign(&ca, &issuer.info.serial_hex, "node retired").expect("sign");
        assert!(set.insert(r.clone()));
        assert!(!set.insert(r));
        assert_eq!(
            set.revoked_in(&chain).map(|r| r.serial),
            Some(issuer.info.serial_hex.clone())
        );

        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("revoked.jsonl");
        set.save(&path).expect("save");
        let back = RevocationSet::new();
        assert_eq!(back.load(&path, &roots).expect("load"), 1);
        assert!(back.revoked_in(&chain).is_some());
        let other = CertificateAuthority::generate("td").expect("other");
        let other_roots = certs_from_pem(&other.cert_pem, Path::new("o")).expect("roots");
        assert_eq!(
            RevocationSet::new()
                .load(&path, &other_roots)
                .expect("load"),
            0
        );
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics_and_made_up_statements_never_verify(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            serial in "[0-9a-f]{1,32}",
            sig in "[0-9a-f]{0,160}",
        ) {
            let _ = Revocation::parse(&data);
            let forged = format!(
                r#"{{"v":1,"serial":"{serial}","reason":"x","revoked_at":1,"sig":"{sig}"}}"#
            );
            if let Ok(r) = Revocation::parse(forged.as_bytes()) {
                let ca = CertificateAuthority::generate("td").expect("ca");
                let roots = certs_from_pem(&ca.cert_pem, Path::new("ca")).expect("roots");
                proptest::prop_assert!(r.verify(&roots).is_err());
            }
        }
    }

    #[test]
    fn junk_is_refused() {
        assert!(Revocation::parse(b"{").is_err());
        assert!(Revocation::parse(&[b' '; MAX_REVOCATION_BYTES + 1]).is_err());
        assert!(
            Revocation::parse(br#"{"v":2,"serial":"1","reason":"","revoked_at":0,"sig":""}"#)
                .is_err()
        );
        assert!(
            Revocation::parse(br#"{"v":1,"serial":"01","reason":"","revoked_at":0,"sig":""}"#)
                .is_err()
        );
    }
}
