//! The operator CA and certificate issuance, with no `openssl` anywhere.
//!
//! `dmsc-node ca init` makes a self-signed root that carries the trust domain
//! as its SPIFFE URI SAN (`spiffe://<td>`), so every later command reads the
//! trust domain from the CA itself instead of trusting a flag to match.
//! Node certificates are ECDSA P-256, valid for client and server auth (a node
//! both dials and accepts), and carry `spiffe://<td>/node/<name>`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::identity::{cert_info, valid_name, valid_trust_domain, SpiffeId};
use crate::TransportError;

/// File names inside a CA directory and a node credential directory.
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
pub const NODE_CERT: &str = "node.pem";
pub const NODE_KEY: &str = "node.key";

/// Default lifetimes.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
pub const NODE_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Certificates start a little in the past so a peer with a slightly slow
/// clock does not refuse a freshly issued certificate.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// An operator root CA held in memory (from `ca init` or loaded from a directory).
pub struct CertificateAuthority {
    pub trust_domain: String,
    pub cert_pem: String,
    key: KeyPair,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

/// A freshly issued certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive INTEGER
    bytes[0] |= 0x01; // and no leading zero byte to strip
    SerialNumber::from_slice(&bytes)
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

impl CertificateAuthority {
    /// Makes a new self-signed root for `trust_domain`.
    pub fn generate(trust_domain: &str) -> Result<Self, TransportError> {
        if !valid_trust_domain(trust_domain) {
            return Err(TransportError::Identity(format!(
                "trust domain `{trust_domain}` must be lowercase DNS labels (a-z, 0-9, -)"
            )));
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "dmsc");
        dn.push(DnType::CommonName, format!("dmsc mesh CA {trust_domain}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.subject_alt_names = vec![SanType::URI(
            SpiffeId::trust_domain(trust_domain)
                .to_string()
                .try_into()?,
        )];
        params.not_before = now() - BACKDATE;
        params.not_after = now() + CA_VALIDITY;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        Ok(CertificateAuthority {
            trust_domain: trust_domain.to_string(),
            cert_pem: cert.pem(),
            key,
        })
    }

    /// Loads `ca.pem` and `ca.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, TransportError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        let cert_pem =
            fs::read_to_string(&cert_path).map_err(|source| TransportError::ReadFile {
                path: cert_path.clone(),
                source,
            })?;
        let key_pem = fs::read_to_string(&key_path).map_err(|source| TransportError::ReadFile {
            path: key_path.clone(),
            source,
        })?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| TransportError::BadPem {
            path: key_path,
            what: "CA private key",
            reason: e.to_string(),
        })?;
        let der = crate::identity::certs_from_pem(&cert_pem, &cert_path)?;
        let info = cert_info(&der[0])?;
        Ok(CertificateAuthority {
            trust_domain: info.spiffe.trust_domain,
            cert_pem,
            key,
        })
    }

    /// Writes `ca.pem` (0644) and `ca.key` (0600) into `dir`; refuses to
    /// overwrite an existing key, which would orphan every issued certificate.
    pub fn save(&self, dir: &Path) -> Result<(), TransportError> {
        let key_path = dir.join(CA_KEY);
        if key_path.exists() {
            return Err(TransportError::WriteFile {
                path: key_path,
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "a CA key already exists here; remove it first if you really mean to replace the mesh CA",
                ),
            });
        }
        write_file(&dir.join(CA_CERT), &self.cert_pem, 0o644)?;
        write_file(&key_path, &self.key.serialize_pem(), 0o600)
    }

    /// Issues a node certificate valid from now for `validity`.
    pub fn issue_node(&self, name: &str, validity: Duration) -> Result<IssuedCert, TransportError> {
        self.issue_node_between(name, now() - BACKDATE, now() + validity)
    }

    /// Issues a node certificate with explicit validity bounds (tests use this
    /// to make expired certificates).
    pub fn issue_node_between(
        &self,
        name: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<IssuedCert, TransportError> {
        if !valid_name(name) {
            return Err(TransportError::Identity(format!(
                "node name `{name}` must be 1-63 of a-z, 0-9 and - (not at either end)"
            )));
        }
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "dmsc");
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(
            SpiffeId::node(&self.trust_domain, name)
                .to_string()
                .try_into()?,
        )];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

impl IssuedCert {
    /// Writes `node.pem`, `node.key` (0600) and a copy of the CA as `ca.pem`.
    pub fn write_node_dir(&self, dir: &Path, ca_pem: &str) -> Result<(), TransportError> {
        fs::create_dir_all(dir).map_err(|source| TransportError::WriteFile {
            path: dir.to_path_buf(),
            source,
        })?;
        write_file(&dir.join(NODE_CERT), &self.cert_pem, 0o644)?;
        write_file(&dir.join(NODE_KEY), &self.key_pem, 0o600)?;
        write_file(&dir.join(CA_CERT), ca_pem, 0o644)
    }
}

/// Writes a file created with `mode` (the mode is set at creation, so a key
/// is never readable by others even for an instant).
pub fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), TransportError> {
    let err = |source| TransportError::WriteFile {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(err)?;
    }
    let _ = fs::remove_file(path);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(contents.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn ca_init_and_issue_node_write_what_they_promise() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = CertificateAuthority::generate("mesh.test").expect("ca");
        ca.save(dir.path()).expect("save");
        let mode = fs::metadata(dir.path().join(CA_KEY))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(ca.save(dir.path()).is_err(), "must not overwrite a CA key");

        let ca = CertificateAuthority::load(dir.path()).expect("load");
        assert_eq!(ca.trust_domain, "mesh.test");
        let node_dir = dir.path().join("n1");
        ca.issue_node("eu-1", NODE_VALIDITY)
            .expect("issue")
            .write_node_dir(&node_dir, &ca.cert_pem)
            .expect("write");
        let id = crate::NodeIdentity::load(
            &node_dir.join(CA_CERT),
            &node_dir.join(NODE_CERT),
            &node_dir.join(NODE_KEY),
        )
        .expect("identity");
        assert_eq!(id.spiffe.to_string(), "spiffe://mesh.test/node/eu-1");
        assert_eq!(id.name(), "eu-1");
        let mode = fs::metadata(node_dir.join(NODE_KEY))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn bad_names_are_refused() {
        let ca = CertificateAuthority::generate("td").expect("ca");
        assert!(ca.issue_node("Bad_Name", NODE_VALIDITY).is_err());
        assert!(CertificateAuthority::generate("Bad TD").is_err());
    }

    #[test]
    fn serials_differ() {
        assert_ne!(random_serial().to_bytes(), random_serial().to_bytes());
    }
}
