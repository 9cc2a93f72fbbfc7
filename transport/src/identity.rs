//! SPIFFE identities and a node's loaded credentials.
//!
//! A node's name is never what a peer says: it is the path of the SPIFFE URI
//! SAN (`spiffe://<trust-domain>/node/<name>`) in a certificate that verified
//! against the mesh CA. This module parses those IDs out of DER certificates
//! and loads a node's PEM files into the form rustls wants.

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::TransportError;

/// What a SPIFFE ID names inside a trust domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Workload {
    /// `spiffe://<td>/node/<name>`
    Node(String),
    /// `spiffe://<td>/tenant/<t>/agent/<a>`
    Agent { tenant: String, agent: String },
    /// `spiffe://<td>` with no path: the trust domain itself (carried by the CA).
    TrustDomain,
}

/// A parsed `spiffe://` URI.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub workload: Workload,
}

/// Names (trust domains, node names, tenants, agents) are DNS-label-like so
/// they can appear in SPIFFE paths and in `<agent>.<tenant>.dmsc` host names.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Trust domains may hold dots (`mesh.example.org`), each label a [`valid_name`].
pub fn valid_trust_domain(td: &str) -> bool {
    td.len() <= 253 && td.split('.').all(valid_name)
}

impl SpiffeId {
    pub fn node(trust_domain: &str, name: &str) -> Self {
        SpiffeId {
            trust_domain: trust_domain.to_string(),
            workload: Workload::Node(name.to_string()),
        }
    }

    pub fn trust_domain(trust_domain: &str) -> Self {
        SpiffeId {
            trust_domain: trust_domain.to_string(),
            workload: Workload::TrustDomain,
        }
    }

    /// Parses `spiffe://td[/path]`, refusing anything this mesh does not issue.
    pub fn parse(uri: &str) -> Result<Self, TransportError> {
        let bad = |why: &str| TransportError::Identity(format!("`{uri}`: {why}"));
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("not a spiffe:// URI"))?;
        let (td, path) = match rest.split_once('/') {
            Some((td, path)) => (td, Some(path)),
            None => (rest, None),
        };
        if !valid_trust_domain(td) {
            return Err(bad("invalid trust domain"));
        }
        let segments: Vec<&str> = path.map(|p| p.split('/').collect()).unwrap_or_default();
        let workload = match segments.as_slice() {
            [] => Workload::TrustDomain,
            ["node", name] if valid_name(name) => Workload::Node(name.to_string()),
            ["tenant", t, "agent", a] if valid_name(t) && valid_name(a) => Workload::Agent {
                tenant: t.to_string(),
                agent: a.to_string(),
            },
            _ => {
                return Err(bad(
                    "path is neither /node/<name> nor /tenant/<t>/agent/<a>",
                ))
            }
        };
        Ok(SpiffeId {
            trust_domain: td.to_string(),
            workload,
        })
    }

    /// The node name, if this ID names a node.
    pub fn node_name(&self) -> Option<&str> {
        match &self.workload {
            Workload::Node(n) => Some(n),
            _ => None,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}", self.trust_domain)?;
        match &self.workload {
            Workload::Node(n) => write!(f, "/node/{n}"),
            Workload::Agent { tenant, agent } => write!(f, "/tenant/{tenant}/agent/{agent}"),
            Workload::TrustDomain => Ok(()),
        }
    }
}

/// The facts about a certificate that the mesh acts on.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub spiffe: SpiffeId,
    pub subject: String,
    pub issuer: String,
    /// Lowercase hex, no separators, no leading zeros ([`normalize_serial`]).
    pub serial_hex: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// True for CA certificates (basic constraints cA): never a workload identity.
    pub is_ca: bool,
    /// The tenants the certificate is limited to (its `urn:dmsc:tenant:<t>`
    /// URI SANs): an issuing certificate signs agents of those tenants only,
    /// a node certificate acts for them only. `None`: no limit.
    pub tenants: Option<Vec<String>>,
}

/// The one spelling of a certificate serial the mesh compares: lowercase hex
/// without `:`/spaces/`0x` and without leading zeros, so `01:AB`, `0x1ab`
/// and `1ab` all name the same certificate.
pub fn normalize_serial(s: &str) -> String {
    let s = s.trim();
    let s = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    let hex: String = s
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let trimmed = hex.trim_start_matches('0');
    if trimmed.is_empty() {
        "0".to_string()
    } else {
        trimmed.to_string()
    }
}

fn unix(secs: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64)
}

/// Reads the single SPIFFE URI SAN and the validity of a DER certificate.
pub fn cert_info(der: &[u8]) -> Result<CertInfo, TransportError> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| TransportError::Identity(format!("unparsable certificate: {e}")))?;
    let mut spiffe = None;
    let mut tenants = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                if let Some(t) = uri.strip_prefix(TENANT_URN) {
                    tenants.push(t.to_string());
                } else if uri.starts_with("spiffe://") {
                    if spiffe.is_some() {
                        return Err(TransportError::Identity(
                            "more than one SPIFFE URI SAN".into(),
                        ));
                    }
                    spiffe = Some(SpiffeId::parse(uri)?);
                }
            }
        }
    }
    let spiffe = spiffe.ok_or_else(|| {
        TransportError::Identity(format!(
            "certificate `{}` carries no spiffe:// URI SAN",
            cert.subject()
        ))
    })?;
    let is_ca = cert
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca);
    Ok(CertInfo {
        spiffe,
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial_hex: normalize_serial(&cert.raw_serial_as_string()),
        not_before: unix(cert.validity().not_before.timestamp()),
        not_after: unix(cert.validity().not_after.timestamp()),
        is_ca,
        tenants: (!tenants.is_empty()).then_some(tenants),
    })
}

/// URI SAN prefix naming a serial an agent certificate was renewed from.
pub const RENEWED_FROM_URN: &str = "urn:dmsc:renewed-from:";

/// URI SAN prefix that limits a node's issuing certificate, and its node
/// certificate, to a tenant.
pub const TENANT_URN: &str = "urn:dmsc:tenant:";

/// URI SAN prefix of a tenant admin certificate (`ca issue-tenant`): its key
/// signs policy documents of exactly that tenant. Such a certificate carries
/// no SPIFFE ID, so it can never pass as a node or agent identity.
pub const TENANT_ADMIN_URN: &str = "urn:dmsc:tenant-admin:";

/// The tenant a tenant admin certificate is for (its one
/// `urn:dmsc:tenant-admin:<t>` URI SAN); `None` if it has none, several, or
/// does not parse.
pub fn tenant_admin_of(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let mut it = uri_sans(&cert, TENANT_ADMIN_URN);
    let t = it.next()?.to_string();
    it.next().is_none().then_some(t)
}

/// True if `der` is within its validity period at `now`.
pub fn valid_at(der: &[u8], now: SystemTime) -> bool {
    X509Certificate::from_der(der).is_ok_and(|(_, c)| {
        unix(c.validity().not_before.timestamp()) <= now
            && now <= unix(c.validity().not_after.timestamp())
    })
}

/// The rest of every URI SAN of `cert` that starts with `prefix`.
fn uri_sans<'a>(cert: &'a X509Certificate<'_>, prefix: &'a str) -> impl Iterator<Item = &'a str> {
    let names = match cert.subject_alternative_name() {
        Ok(Some(san)) => san.value.general_names.as_slice(),
        _ => &[],
    };
    names.iter().filter_map(move |n| match n {
        GeneralName::URI(u) => u.strip_prefix(prefix),
        _ => None,
    })
}

/// The serials whose revocation condemns a certificate: its own and those
/// it says it was renewed from (`urn:dmsc:renewed-from:<serial>` URI SANs),
/// normalized; empty if it does not parse.
pub fn revocation_serials(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    std::iter::once(normalize_serial(&cert.raw_serial_as_string()))
        .chain(uri_sans(&cert, RENEWED_FROM_URN).map(normalize_serial))
        .collect()
}

/// The serials a certificate says it was renewed from, normalized.
pub fn renewed_from(der: &[u8]) -> Vec<String> {
    revocation_serials(der).into_iter().skip(1).collect()
}

/// The tenants a certificate (an issuing or a node certificate) is limited
/// to (its `urn:dmsc:tenant:<t>` URI SANs); `None` when it carries none
/// (any tenant) or does not parse. [`CertInfo::tenants`] holds the same for
/// a certificate parsed whole.
pub fn issuer_tenants(der: &[u8]) -> Option<Vec<String>> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let tenants: Vec<String> = uri_sans(&cert, TENANT_URN).map(str::to_string).collect();
    (!tenants.is_empty()).then_some(tenants)
}

/// True if `issuer`'s key made the signature on `leaf` (both DER).
pub fn signed_by(leaf: &[u8], issuer: &[u8]) -> bool {
    let (Ok((_, leaf)), Ok((_, issuer))) = (
        X509Certificate::from_der(leaf),
        X509Certificate::from_der(issuer),
    ) else {
        return false;
    };
    leaf.verify_signature(Some(issuer.public_key())).is_ok()
}

/// Serial (normalized) of a DER certificate, whatever it carries; `None` if
/// it does not parse.
pub fn serial_of(der: &[u8]) -> Option<String> {
    X509Certificate::from_der(der)
        .ok()
        .map(|(_, c)| normalize_serial(&c.raw_serial_as_string()))
}

/// Issuer distinguished name of a DER certificate, for error messages.
pub fn issuer_of(der: &[u8]) -> String {
    X509Certificate::from_der(der)
        .map(|(_, c)| c.issuer().to_string())
        .unwrap_or_else(|_| "<unparsable certificate>".into())
}

/// A node's credentials: its chain, its key, the mesh CA roots and the
/// identity its own certificate carries.
#[derive(Debug)]
pub struct NodeIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub roots: Vec<CertificateDer<'static>>,
    pub spiffe: SpiffeId,
    pub info: CertInfo,
    /// Subjects of the CA roots, for messages such as "expected the mesh CA `CN=..`".
    pub root_subjects: Vec<String>,
}

impl NodeIdentity {
    /// Loads `ca.pem` (one or more roots), `node.pem` (leaf first) and `node.key`.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TransportError> {
        let ca_pem = read(ca)?;
        let cert_pem = read(cert)?;
        let key_pem = read(key)?;
        Self::from_pem_named(&ca_pem, &cert_pem, &key_pem, (ca, cert, key))
    }

    /// Same as [`NodeIdentity::load`] from in-memory PEM text.
    pub fn from_pem(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Self, TransportError> {
        let n = Path::new("<memory>");
        Self::from_pem_named(ca_pem, cert_pem, key_pem, (n, n, n))
    }

    fn from_pem_named(
        ca_pem: &str,
        cert_pem: &str,
        key_pem: &str,
        (ca, cert, key): (&Path, &Path, &Path),
    ) -> Result<Self, TransportError> {
        let roots = certs_from_pem(ca_pem, ca)?;
        let chain = certs_from_pem(cert_pem, cert)?;
        let key_der = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| {
            TransportError::BadPem {
                path: key.to_path_buf(),
                what: "private key",
                reason: e.to_string(),
            }
        })?;
        let info = cert_info(&chain[0])?;
        // A key of another pair would only fail at the first handshake
        // (rustls checks it when a configuration is built): say so here,
        // naming both files.
        let signing = crate::tls::provider()
            .key_provider
            .load_private_key(key_der.clone_key())
            .map_err(|e| TransportError::BadPem {
                path: key.to_path_buf(),
                what: "private key",
                reason: e.to_string(),
            })?;
        if let Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) =
            rustls::sign::CertifiedKey::new(chain.clone(), signing).keys_match()
        {
            return Err(TransportError::BadPem {
                path: key.to_path_buf(),
                what: "private key",
                reason: format!("it does not belong to the certificate `{}`", cert.display()),
            });
        }
        if info.spiffe.node_name().is_none() {
            return Err(TransportError::Identity(format!(
                "`{}` names `{}`, which is not a node identity (spiffe://<td>/node/<name>)",
                cert.display(),
                info.spiffe
            )));
        }
        let mut root_subjects = Vec::new();
        for r in &roots {
            let ri = cert_info(r).map_err(|e| TransportError::BadPem {
                path: ca.to_path_buf(),
                what: "mesh CA certificate",
                reason: e.to_string(),
            })?;
            if ri.spiffe.trust_domain != info.spiffe.trust_domain {
                return Err(TransportError::Identity(format!(
                    "node certificate is for trust domain `{}` but the CA in `{}` is for `{}`",
                    info.spiffe.trust_domain,
                    ca.display(),
                    ri.spiffe.trust_domain
                )));
            }
            root_subjects.push(ri.subject);
        }
        Ok(NodeIdentity {
            spiffe: info.spiffe.clone(),
            info,
            chain,
            key: key_der,
            roots,
            root_subjects,
        })
    }

    pub fn name(&self) -> &str {
        self.spiffe.node_name().unwrap_or_default()
    }

    pub fn trust_domain(&self) -> &str {
        &self.spiffe.trust_domain
    }
}

fn read(path: &Path) -> Result<String, TransportError> {
    std::fs::read_to_string(path).map_err(|source| TransportError::ReadFile {
        path: path.to_path_buf(),
        source,
    })
}

/// All CERTIFICATE blocks of a PEM text; at least one.
pub fn certs_from_pem(
    pem: &str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TransportError::BadPem {
            path: path.to_path_buf(),
            what: "certificate",
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TransportError::NoPem {
            path: path.to_path_buf(),
            what: "certificate",
        });
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_round_trip() {
        for s in [
            "spiffe://mesh.local/node/eu-1",
            "spiffe://td/tenant/acme/agent/billing-1",
            "spiffe://td",
        ] {
            assert_eq!(SpiffeId::parse(s).expect(s).to_string(), s);
        }
    }

    #[test]
    fn spiffe_ids_refuse_junk() {
        for s in [
            "http://td/node/a",
            "spiffe://TD/node/a",
            "spiffe://td/node/",
            "spiffe://td/node/a/b",
            "spiffe://td/tenant/a",
            "spiffe://td/node/UPPER",
            "spiffe://td/node/-a",
        ] {
            assert!(SpiffeId::parse(s).is_err(), "{s} should be refused");
        }
    }
}
