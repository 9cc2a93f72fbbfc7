//! The operator CA and certificate issuance, with no `openssl` anywhere.
//!
//! `dmsc-node ca init` makes a self-signed root that carries the trust domain
//! as its SPIFFE URI SAN (`spiffe://<td>`), so every later command reads the
//! trust domain from the CA itself instead of trusting a flag to match.
//! Node certificates are ECDSA P-256, valid for client and server auth (a node
//! both dials and accepts), and carry `spiffe://<td>/node/<name>`; a node
//! issued for some tenants only (`--tenant`) carries one
//! `urn:dmsc:tenant:<t>` URI SAN per tenant on both its certificates: the
//! issuing certificate signs agents of those tenants only, and home nodes
//! deliver the node's delegations for those tenants only.

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
use x509_parser::prelude::FromDer;

use crate::identity::{cert_info, valid_name, valid_trust_domain, SpiffeId};
use crate::TransportError;

/// File names inside a CA directory and a node credential directory.
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
pub const NODE_CERT: &str = "node.pem";
pub const NODE_KEY: &str = "node.key";
/// The node's issuing certificate (an intermediate CA the operator signed
/// for that node) and its key: what the node signs agent certificates with.
pub const ISSUER_CERT: &str = "issuer.pem";
pub const ISSUER_KEY: &str = "issuer.key";

/// Default lifetimes.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
pub const NODE_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Agent certificates are short-lived: a leaked one is worth a day at most.
pub const AGENT_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// Renewal ancestors an agent certificate remembers (with 24 h certificates
/// renewed daily: about a week; an older stolen certificate has expired and
/// could not renew anyway).
pub const MAX_ANCESTORS: usize = 8;
/// The longest agent certificate a node issues, whatever it is asked.
pub const AGENT_VALIDITY_MAX: Duration = Duration::from_secs(30 * 24 * 3600);
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

fn check_node_name(name: &str) -> Result<(), TransportError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(TransportError::Identity(format!(
            "node name `{name}` must be 1-63 of a-z, 0-9 and - (not at either end)"
        )))
    }
}

fn check_tenants(tenants: &[String]) -> Result<(), TransportError> {
    match tenants.iter().find(|t| !valid_name(t)) {
        Some(t) => Err(TransportError::Identity(format!(
            "tenant `{t}` must be 1-63 of a-z, 0-9 and -"
        ))),
        None => Ok(()),
    }
}

/// One `urn:dmsc:tenant:<t>` URI SAN per tenant.
fn tenant_sans(tenants: &[String]) -> Result<Vec<SanType>, TransportError> {
    tenants
        .iter()
        .map(|t| {
            Ok(SanType::URI(
                format!("{}{t}", crate::identity::TENANT_URN).try_into()?,
            ))
        })
        .collect()
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

    /// Everything `ca issue-node` writes: the node certificate (with `sans`,
    /// DNS names or IP addresses, for agents that reach the node's TLS
    /// ingress by name) and the node's issuing certificate.
    pub fn issue_node_credentials(
        &self,
        name: &str,
        validity: Duration,
        sans: &[String],
    ) -> Result<NodeCredentials, TransportError> {
        self.issue_node_credentials_for(name, validity, sans, &[])
    }

    /// Same, with both certificates limited to `tenants` (empty: any
    /// tenant): a node that hosts only `acme`'s agents cannot be made to
    /// mint a certificate for another tenant, even with its key stolen, and
    /// other nodes deliver its delegations for `acme` only.
    pub fn issue_node_credentials_for(
        &self,
        name: &str,
        validity: Duration,
        sans: &[String],
        tenants: &[String],
    ) -> Result<NodeCredentials, TransportError> {
        check_tenants(tenants)?;
        let node = self.issue_leaf(name, now() - BACKDATE, now() + validity, sans, tenants)?;
        let issuer = self.issue_node_issuer(name, validity, tenants)?;
        Ok(NodeCredentials { node, issuer })
    }

    /// An intermediate CA for one node (path length 0: it can sign agent
    /// certificates, never another CA). It carries the bare trust domain
    /// (`spiffe://<td>`), so it can never pass as a node or agent identity,
    /// and, when `tenants` is not empty, one `urn:dmsc:tenant:<t>` URI SAN
    /// per tenant it may issue for ([`crate::identity::issuer_tenants`]).
    pub fn issue_node_issuer(
        &self,
        name: &str,
        validity: Duration,
        tenants: &[String],
    ) -> Result<IssuedCert, TransportError> {
        check_node_name(name)?;
        check_tenants(tenants)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "dmsc");
        dn.push(DnType::CommonName, format!("dmsc issuer {name}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.subject_alt_names = vec![SanType::URI(
            SpiffeId::trust_domain(&self.trust_domain)
                .to_string()
                .try_into()?,
        )];
        params.subject_alt_names.extend(tenant_sans(tenants)?);
        params.use_authority_key_identifier_extension = true;
        params.not_before = now() - BACKDATE;
        params.not_after = now() + validity;
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A tenant admin certificate: its key signs policy documents of
    /// `tenant` only (`urn:dmsc:tenant-admin:<t>`, no SPIFFE ID and no TLS
    /// key usage, so it authenticates nothing else), signed by this root.
    pub fn issue_tenant_admin(
        &self,
        tenant: &str,
        validity: Duration,
    ) -> Result<IssuedCert, TransportError> {
        check_tenants(&[tenant.to_string()])?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "dmsc");
        dn.push(DnType::CommonName, format!("dmsc tenant admin {tenant}"));
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(
            format!("{}{tenant}", crate::identity::TENANT_ADMIN_URN).try_into()?,
        )];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now() - BACKDATE;
        params.not_after = now() + validity;
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs `msg` with the CA key (ECDSA P-256, SHA-256, ASN.1 DER
    /// signature): revocations are statements of the operator CA.
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, TransportError> {
        use rcgen::SigningKey;
        Ok(self.key.sign(msg)?)
    }

    /// Issues a node certificate with explicit validity bounds (tests use this
    /// to make expired certificates).
    pub fn issue_node_between(
        &self,
        name: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<IssuedCert, TransportError> {
        self.issue_leaf(name, not_before, not_after, &[], &[])
    }

    fn issue_leaf(
        &self,
        name: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
        sans: &[String],
        tenants: &[String],
    ) -> Result<IssuedCert, TransportError> {
        check_node_name(name)?;
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
        for san in sans {
            params.subject_alt_names.push(match san.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(san.as_str().try_into()?),
            });
        }
        params.subject_alt_names.extend(tenant_sans(tenants)?);
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

/// Checks that `pem` is a PKCS#10 request whose signature verifies (what
/// issuance will need), without issuing anything.
pub fn check_csr(pem: &str) -> Result<(), TransportError> {
    rcgen::CertificateSigningRequestParams::from_pem(pem)
        .map(|_| ())
        .map_err(|e| {
            TransportError::Identity(format!(
                "the certificate request is not usable: {e} (send a PEM PKCS#10 request signed by its key)"
            ))
        })
}

/// A node certificate and the node's issuing certificate.
#[derive(Debug, Clone)]
pub struct NodeCredentials {
    pub node: IssuedCert,
    pub issuer: IssuedCert,
}

impl NodeCredentials {
    /// Writes `node.pem`, `node.key`, `issuer.pem`, `issuer.key` (keys 0600)
    /// and a copy of the CA as `ca.pem`.
    pub fn write_dir(&self, dir: &Path, ca_pem: &str) -> Result<(), TransportError> {
        self.node.write_node_dir(dir, ca_pem)?;
        write_file(&dir.join(ISSUER_CERT), &self.issuer.cert_pem, 0o644)?;
        write_file(&dir.join(ISSUER_KEY), &self.issuer.key_pem, 0o600)
    }
}

/// Where an agent certificate's key comes from.
#[derive(Debug, Clone, Copy)]
pub enum AgentKey<'a> {
    /// The agent sent a PKCS#10 request (PEM); its key never leaves it.
    Csr(&'a str),
    /// The node generates a key pair and returns the private key once.
    Generate,
}

/// An agent certificate as handed out at enrollment.
#[derive(Debug, Clone)]
pub struct AgentCert {
    pub spiffe: SpiffeId,
    /// Leaf first, then the node's issuing certificate.
    pub chain_pem: String,
    /// Only when the node generated the key.
    pub key_pem: Option<String>,
    pub serial_hex: String,
    pub not_after: std::time::SystemTime,
}

/// A node's issuing certificate and key, loaded: signs agent certificates.
pub struct NodeIssuer {
    pub trust_domain: String,
    pub cert_pem: String,
    pub info: crate::identity::CertInfo,
    /// Tenants this issuer may sign for; `None`: any.
    pub tenants: Option<Vec<String>>,
    key: KeyPair,
}

impl std::fmt::Debug for NodeIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIssuer")
            .field("subject", &self.info.subject)
            .finish_non_exhaustive()
    }
}

impl NodeIssuer {
    /// Loads `issuer.pem` and `issuer.key`; the certificate must be a CA of
    /// this trust domain.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TransportError> {
        let cert_pem = fs::read_to_string(cert).map_err(|source| TransportError::ReadFile {
            path: cert.to_path_buf(),
            source,
        })?;
        let key_pem = fs::read_to_string(key).map_err(|source| TransportError::ReadFile {
            path: key.to_path_buf(),
            source,
        })?;
        Self::from_pem_named(&cert_pem, &key_pem, cert, key)
    }

    /// Same as [`NodeIssuer::load`] from in-memory PEM text.
    pub fn load_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TransportError> {
        let n = Path::new("<memory>");
        Self::from_pem_named(cert_pem, key_pem, n, n)
    }

    fn from_pem_named(
        cert_pem: &str,
        key_pem: &str,
        cert: &Path,
        key: &Path,
    ) -> Result<Self, TransportError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| TransportError::BadPem {
            path: key.to_path_buf(),
            what: "issuing key",
            reason: e.to_string(),
        })?;
        let der = crate::identity::certs_from_pem(cert_pem, cert)?;
        let info = cert_info(&der[0])?;
        if !info.is_ca {
            return Err(TransportError::Identity(format!(
                "`{}` is not an issuing (CA) certificate; make one with `dmsc-node ca issue-node`",
                cert.display()
            )));
        }
        // A key that does not belong to the certificate would sign agent
        // certificates nobody can verify (e.g. a half-finished file swap).
        let spki = x509_parser::prelude::X509Certificate::from_der(&der[0])
            .map(|(_, c)| c.public_key().raw.to_vec())
            .unwrap_or_default();
        if rcgen::PublicKeyData::subject_public_key_info(&key) != spki {
            return Err(TransportError::Identity(format!(
                "the issuing key does not belong to the certificate `{}`",
                cert.display()
            )));
        }
        Ok(NodeIssuer {
            trust_domain: info.spiffe.trust_domain.clone(),
            cert_pem: cert_pem.to_string(),
            tenants: info.tenants.clone(),
            info,
            key,
        })
    }

    /// True if this issuer may sign agent certificates of `tenant`.
    pub fn may_issue_for(&self, tenant: &str) -> bool {
        self.tenants
            .as_ref()
            .is_none_or(|ts| ts.iter().any(|t| t == tenant))
    }

    /// Issues `spiffe://<td>/tenant/<tenant>/agent/<agent>` for `validity`
    /// (capped at [`AGENT_VALIDITY_MAX`] and at the issuer's own expiry).
    /// Whatever names a CSR asks for are ignored: the identity is the one the
    /// caller was authorised for, nothing else.
    pub fn issue_agent(
        &self,
        tenant: &str,
        agent: &str,
        key: AgentKey<'_>,
        validity: Duration,
    ) -> Result<AgentCert, TransportError> {
        self.issue_agent_renewing(tenant, agent, key, validity, &[])
    }

    /// Same, for a renewal: `ancestors` (newest first, the serial being
    /// renewed first) are written into the new certificate as
    /// `urn:dmsc:renewed-from:<serial>` URI SANs (at most
    /// [`MAX_ANCESTORS`]), so revoking a stolen certificate also revokes
    /// whatever it was renewed into ([`crate::revoke::RevocationSet`]).
    pub fn issue_agent_renewing(
        &self,
        tenant: &str,
        agent: &str,
        key: AgentKey<'_>,
        validity: Duration,
        ancestors: &[String],
    ) -> Result<AgentCert, TransportError> {
        if !valid_name(tenant) || !valid_name(agent) {
            return Err(TransportError::Identity(format!(
                "tenant `{tenant}` and agent `{agent}` must be 1-63 of a-z, 0-9 and -"
            )));
        }
        if !self.may_issue_for(tenant) {
            return Err(TransportError::Identity(format!(
                "this node's issuing certificate may only issue for tenants `{}`, not `{tenant}`",
                self.tenants.as_deref().unwrap_or_default().join("`, `")
            )));
        }
        let spiffe = SpiffeId {
            trust_domain: self.trust_domain.clone(),
            workload: crate::identity::Workload::Agent {
                tenant: tenant.to_string(),
                agent: agent.to_string(),
            },
        };
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, format!("dmsc tenant {tenant}"));
        dn.push(DnType::CommonName, agent);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(spiffe.to_string().try_into()?)];
        for serial in ancestors.iter().take(MAX_ANCESTORS) {
            let serial = crate::identity::normalize_serial(serial);
            if !serial.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(TransportError::Identity(format!(
                    "`{serial}` is not a certificate serial"
                )));
            }
            params.subject_alt_names.push(SanType::URI(
                format!("{}{serial}", crate::identity::RENEWED_FROM_URN).try_into()?,
            ));
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let start = now() - BACKDATE;
        let issuer_end = OffsetDateTime::from(self.info.not_after);
        let end = (now() + validity.min(AGENT_VALIDITY_MAX)).min(issuer_end);
        params.not_before = start;
        params.not_after = end;
        let serial = random_serial();
        let serial_hex = crate::identity::normalize_serial(
            &serial
                .to_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>(),
        );
        params.serial_number = Some(serial);
        let (cert, key_pem) = match key {
            AgentKey::Csr(pem) => {
                let csr = rcgen::CertificateSigningRequestParams::from_pem(pem).map_err(|e| {
                    TransportError::Identity(format!(
                        "the certificate request is not usable: {e} (send a PEM PKCS#10 request signed by its key)"
                    ))
                })?;
                (params.signed_by(&csr.public_key, &issuer)?, None)
            }
            AgentKey::Generate => {
                let kp = KeyPair::generate()?;
                (params.signed_by(&kp, &issuer)?, Some(kp.serialize_pem()))
            }
        };
        let mut chain_pem = cert.pem();
        chain_pem.push_str(&self.cert_pem);
        Ok(AgentCert {
            spiffe,
            chain_pem,
            key_pem,
            serial_hex,
            not_after: std::time::SystemTime::from(end),
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
    fn a_key_of_another_pair_is_named_when_the_identity_loads() {
        let ca = CertificateAuthority::generate("mesh.test").expect("ca");
        let a = ca.issue_node("a", NODE_VALIDITY).expect("a");
        let b = ca.issue_node("b", NODE_VALIDITY).expect("b");
        assert!(crate::NodeIdentity::from_pem(&ca.cert_pem, &a.cert_pem, &a.key_pem).is_ok());
        let e = crate::NodeIdentity::from_pem(&ca.cert_pem, &a.cert_pem, &b.key_pem)
            .expect_err("b's key with a's certificate");
        assert!(
            matches!(&e, TransportError::BadPem { reason, .. } if reason.contains("does not belong to the certificate")),
            "{e}"
        );
    }

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
    fn tenant_scope_is_on_both_node_certificates_or_on_neither() {
        let ca = CertificateAuthority::generate("td").expect("ca");
        let scoped = ca
            .issue_node_credentials_for("n1", NODE_VALIDITY, &[], &["acme".into(), "beta".into()])
            .expect("scoped");
        let id = crate::NodeIdentity::from_pem(
            &ca.cert_pem,
            &scoped.node.cert_pem,
            &scoped.node.key_pem,
        )
        .expect("scoped node certificate loads as a node identity");
        let both = Some(vec!["acme".to_string(), "beta".to_string()]);
        assert_eq!(id.info.tenants, both, "node.pem carries the scope");
        assert_eq!(id.name(), "n1");
        let issuer =
            NodeIssuer::load_pem(&scoped.issuer.cert_pem, &scoped.issuer.key_pem).expect("issuer");
        assert_eq!(issuer.tenants, both, "issuer.pem carries the same scope");

        let open = ca
            .issue_node_credentials("n2", NODE_VALIDITY, &[])
            .expect("unscoped");
        let id =
            crate::NodeIdentity::from_pem(&ca.cert_pem, &open.node.cert_pem, &open.node.key_pem)
                .expect("identity");
        assert_eq!(id.info.tenants, None, "no --tenant: unscoped, as before");

        assert!(ca
            .issue_node_credentials_for("n3", NODE_VALIDITY, &[], &["Bad Tenant".into()])
            .is_err());
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
