//! `dmsc-node ca ...`: the operator's offline CA. Creating it, issuing a
//! node's credentials (node certificate, issuing certificate for agents)
//! and signing revocations. Each returns what to tell the operator; the
//! binary prints it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dmsc_transport::pki::{self, CertificateAuthority};
use dmsc_transport::{Revocation, TransportError};

/// Why a CA command failed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("cannot {what} `{}`: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{}` holds no certificate that parses", .0.display())]
    Unparsable(PathBuf),
    #[error("give --serial or --cert")]
    NothingToRevoke,
}

/// `ca init`: a new root CA in `out` (`ca.pem`, `ca.key` 0600).
pub fn init(trust_domain: &str, out: &Path) -> Result<String, CaError> {
    let ca = CertificateAuthority::generate(trust_domain)?;
    std::fs::create_dir_all(out).map_err(|source| CaError::Io {
        what: "create the directory",
        path: out.to_path_buf(),
        source,
    })?;
    ca.save(out)?;
    Ok(format!(
        "created CA for trust domain `{trust_domain}`: {} and {} (keep ca.key offline)",
        out.join(pki::CA_CERT).display(),
        out.join(pki::CA_KEY).display()
    ))
}

/// What `ca issue-node` is asked for.
#[derive(Debug, Clone)]
pub struct IssueNode {
    pub ca_dir: PathBuf,
    pub name: String,
    pub out: PathBuf,
    pub days: u64,
    /// Names of the TLS ingress (empty: localhost and 127.0.0.1).
    pub sans: Vec<String>,
    /// Tenants the node may serve (empty: any).
    pub tenants: Vec<String>,
}

/// `ca issue-node`: node certificate and key, the node's issuing
/// certificate for agents, and a copy of the CA certificate, in `out`.
pub fn issue_node(req: &IssueNode) -> Result<String, CaError> {
    let ca = CertificateAuthority::load(&req.ca_dir)?;
    let sans = if req.sans.is_empty() {
        vec!["localhost".into(), "127.0.0.1".into()]
    } else {
        req.sans.clone()
    };
    ca.issue_node_credentials_for(
        &req.name,
        Duration::from_secs(req.days * 86400),
        &sans,
        &req.tenants,
    )?
    .write_dir(&req.out, &ca.cert_pem)?;
    let out = &req.out;
    let scope = if req.tenants.is_empty() {
        String::new()
    } else {
        format!(
            "\nboth certificates are scoped to tenants `{}`",
            req.tenants.join("`, `")
        )
    };
    Ok(format!(
        "issued spiffe://{}/node/{} valid {} days: {}, {}, {}; issuing certificate for agents: {}, {}{scope}",
        ca.trust_domain,
        req.name,
        req.days,
        out.join(pki::NODE_CERT).display(),
        out.join(pki::NODE_KEY).display(),
        out.join(pki::CA_CERT).display(),
        out.join(pki::ISSUER_CERT).display(),
        out.join(pki::ISSUER_KEY).display()
    ))
}

/// `ca revoke`: a revocation of `serial` (or of the leaf in `cert`),
/// signed with the CA key.
pub fn revoke(
    ca_dir: &Path,
    serial: Option<String>,
    cert: Option<&Path>,
    reason: &str,
) -> Result<Revocation, CaError> {
    let ca = CertificateAuthority::load(ca_dir)?;
    let serial = match (serial, cert) {
        (Some(s), _) => s,
        (None, Some(path)) => {
            let pem = std::fs::read_to_string(path).map_err(|source| CaError::Io {
                what: "read the certificate",
                path: path.to_path_buf(),
                source,
            })?;
            let der = dmsc_transport::identity::certs_from_pem(&pem, path)?;
            der.first()
                .and_then(|d| dmsc_transport::identity::serial_of(d))
                .ok_or_else(|| CaError::Unparsable(path.to_path_buf()))?
        }
        (None, None) => return Err(CaError::NothingToRevoke),
    };
    Ok(Revocation::sign(&ca, &serial, reason)?)
}

/// Writes a revocation statement where `ca revoke --out` says.
pub fn write_revocation(r: &Revocation, path: &Path) -> Result<(), CaError> {
    Ok(pki::write_file(path, &(r.to_json() + "\n"), 0o644)?)
}

/// `tenant rotate-key|delete`: a statement about `tenant`'s data keys,
/// signed with the CA key.
pub fn tenant_key_statement(
    ca_dir: &Path,
    tenant: &str,
    action: &str,
) -> Result<dmsc_transport::TenantKeyStatement, CaError> {
    let ca = CertificateAuthority::load(ca_dir)?;
    Ok(dmsc_transport::TenantKeyStatement::sign(
        &ca, tenant, action,
    )?)
}

/// Writes a tenant key statement where `--out` says.
pub fn write_tenant_key_statement(
    s: &dmsc_transport::TenantKeyStatement,
    path: &Path,
) -> Result<(), CaError> {
    Ok(pki::write_file(path, &(s.to_json() + "\n"), 0o644)?)
}
