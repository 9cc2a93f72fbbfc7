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
    #[error("give --serial, --cert or --node")]
    NothingToRevoke,
    #[error(
        "the CA's ledger `{}` lists no unexpired certificate of node `{name}` \
         (certificates issued before the ledger existed are not in it: revoke \
         them with --cert or --serial)",
        ledger.display()
    )]
    NoneIssued { name: String, ledger: PathBuf },
    #[error("`{}` line {line}: {reason}", path.display())]
    Ledger {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

/// The CA directory's record of what it issued, one JSON line per
/// certificate, so that every certificate of a node can be revoked by the
/// node's name (`ca revoke --node`). Not secret; appended before the
/// credentials are written out, so nothing handed out is missing from it
/// (where it cannot be written, `ca issue-node` says so and names the
/// serials).
pub const LEDGER: &str = "issued.jsonl";

/// One line of the ledger.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Issued {
    /// Serial in hex, as `ca revoke --serial` takes it.
    pub serial: String,
    /// `node` (the node's TLS certificate) or `issuer` (its issuing
    /// certificate for agents).
    pub role: String,
    /// The node's name.
    pub name: String,
    /// Unix seconds.
    pub issued_at: u64,
    pub not_after: u64,
}

fn unix_secs(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The ledger entries of certificate PEMs issued to `name`, by role.
fn ledger_entries(name: &str, certs: &[(&str, &str)]) -> Result<Vec<Issued>, CaError> {
    let now = unix_secs(std::time::SystemTime::now());
    certs
        .iter()
        .map(|(role, pem)| {
            let der = dmsc_transport::identity::certs_from_pem(pem, Path::new(role))?;
            let info = der
                .first()
                .map(|d| dmsc_transport::identity::cert_info(d))
                .transpose()?
                .ok_or_else(|| CaError::Unparsable(PathBuf::from(role)))?;
            Ok(Issued {
                serial: info.serial_hex,
                role: (*role).to_string(),
                name: name.to_string(),
                issued_at: now,
                not_after: unix_secs(info.not_after),
            })
        })
        .collect()
}

/// Appends `entries` to the ledger in `ca_dir`, one JSON line each, and
/// syncs it.
fn append_ledger(ca_dir: &Path, entries: &[Issued]) -> Result<(), CaError> {
    use std::io::Write;
    let lines: String = entries
        .iter()
        .map(|e| serde_json::to_string(e).unwrap_or_default() + "\n")
        .collect();
    let path = ca_dir.join(LEDGER);
    let io = |what, source| CaError::Io {
        what,
        path: path.clone(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| io("open the ledger", e))?;
    f.write_all(lines.as_bytes())
        .and_then(|()| f.sync_data())
        .map_err(|e| io("append to the ledger", e))
}

/// The ledger's unexpired certificates of node `name`.
pub fn issued_to(ca_dir: &Path, name: &str) -> Result<Vec<Issued>, CaError> {
    let path = ca_dir.join(LEDGER);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(CaError::Io {
                what: "read the ledger",
                path,
                source,
            })
        }
    };
    let now = unix_secs(std::time::SystemTime::now());
    let mut found = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let entry: Issued = serde_json::from_str(line).map_err(|e| CaError::Ledger {
            path: path.clone(),
            line: i + 1,
            reason: e.to_string(),
        })?;
        if entry.name == name && entry.not_after > now && !found.contains(&entry) {
            found.push(entry);
        }
    }
    if found.is_empty() {
        return Err(CaError::NoneIssued {
            name: name.to_string(),
            ledger: path,
        });
    }
    Ok(found)
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
    let creds = ca.issue_node_credentials_for(
        &req.name,
        Duration::from_secs(req.days * 86400),
        &sans,
        &req.tenants,
    )?;
    let entries = ledger_entries(
        &req.name,
        &[
            ("node", &creds.node.cert_pem),
            ("issuer", &creds.issuer.cert_pem),
        ],
    )?;
    // A CA directory on read-only media still issues; the operator is told
    // what `ca revoke --node` will not know.
    let unrecorded = append_ledger(&req.ca_dir, &entries).err().map(|e| {
        let serials: Vec<String> = entries
            .iter()
            .map(|i| format!("{} {}", i.role, i.serial))
            .collect();
        format!(
            "\nwarning: {e}: `ca revoke --node {}` will not know these certificates; keep their serials ({})",
            req.name,
            serials.join(", ")
        )
    });
    creds.write_dir(&req.out, &ca.cert_pem)?;
    let out = &req.out;
    let scope = if req.tenants.is_empty() {
        String::new()
    } else {
        format!(
            "\nboth certificates are scoped to tenants `{}`",
            req.tenants.join("`, `")
        )
    };
    let unrecorded = unrecorded.unwrap_or_default();
    Ok(format!(
        "issued spiffe://{}/node/{} valid {} days: {}, {}, {}; issuing certificate for agents: {}, {}{scope}{unrecorded}",
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

/// `ca revoke --node`: revocations of every unexpired certificate the
/// ledger lists for node `name` (its node certificates and its issuing
/// certificates, which also revokes every agent certificate they signed).
pub fn revoke_node(
    ca_dir: &Path,
    name: &str,
    reason: &str,
) -> Result<Vec<(Issued, Revocation)>, CaError> {
    let ca = CertificateAuthority::load(ca_dir)?;
    issued_to(ca_dir, name)?
        .into_iter()
        .map(|i| {
            let r = Revocation::sign(&ca, &i.serial, reason)?;
            Ok((i, r))
        })
        .collect()
}

/// Writes revocation statements where `ca revoke --out` says, one per line.
pub fn write_revocations(rs: &[Revocation], path: &Path) -> Result<(), CaError> {
    let text: String = rs.iter().map(|r| r.to_json() + "\n").collect();
    Ok(pki::write_file(path, &text, 0o644)?)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Issues node `name` into `out`; what `ca issue-node` says.
    fn issue(ca_dir: &Path, out: &Path, name: &str) -> String {
        issue_node(&IssueNode {
            ca_dir: ca_dir.to_path_buf(),
            name: name.into(),
            out: out.to_path_buf(),
            days: 1,
            sans: Vec::new(),
            tenants: Vec::new(),
        })
        .expect("issue")
    }

    #[test]
    fn the_ledger_finds_every_unexpired_certificate_of_a_node() {
        let d = tempfile::tempdir().expect("tempdir");
        let ca_dir = d.path().join("ca");
        init("test.example", &ca_dir).expect("init");
        for (out, name) in [("a1", "a"), ("b", "b"), ("a2", "a")] {
            issue(&ca_dir, &d.path().join(out), name);
        }
        // An expired one of `a`'s, as a CA that ran a year ago wrote it.
        let old = Issued {
            serial: "1234".into(),
            role: "node".into(),
            name: "a".into(),
            issued_at: 1,
            not_after: 2,
        };
        append_ledger(&ca_dir, &[old]).expect("append");

        let found = issued_to(&ca_dir, "a").expect("found");
        let roles: Vec<&str> = found.iter().map(|i| i.role.as_str()).collect();
        assert_eq!(roles, ["node", "issuer", "node", "issuer"]);
        // The serials are those of the certificates written out.
        let pem = std::fs::read_to_string(d.path().join("a2").join(pki::NODE_CERT)).expect("pem");
        let der = dmsc_transport::identity::certs_from_pem(&pem, Path::new("a2")).expect("der");
        let serial = dmsc_transport::identity::serial_of(&der[0]).expect("serial");
        assert_eq!(found[2].serial, serial);
        assert!(found.iter().all(|i| i.serial != "1234"));

        let revoked = revoke_node(&ca_dir, "a", "decommissioned").expect("revoke");
        assert_eq!(revoked.len(), 4);
        assert!(revoked.iter().all(|(i, r)| r.serial == i.serial));
        assert!(matches!(
            issued_to(&ca_dir, "c"),
            Err(CaError::NoneIssued { .. })
        ));
    }

    #[test]
    fn a_ledger_that_cannot_be_written_does_not_stop_issuing() {
        let d = tempfile::tempdir().expect("tempdir");
        let ca_dir = d.path().join("ca");
        init("test.example", &ca_dir).expect("init");
        // Stands in for read-only media (root writes through permissions).
        std::fs::create_dir(ca_dir.join(LEDGER)).expect("dir");
        let said = issue(&ca_dir, &d.path().join("a"), "a");
        assert!(
            said.contains("warning: cannot open the ledger") && said.contains("node "),
            "{said}"
        );
        assert!(d.path().join("a").join(pki::NODE_CERT).exists());
    }

    #[test]
    fn a_damaged_ledger_line_is_named() {
        let d = tempfile::tempdir().expect("tempdir");
        let ca_dir = d.path().join("ca");
        init("test.example", &ca_dir).expect("init");
        let _ = issue(&ca_dir, &d.path().join("a"), "a");
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(ca_dir.join(LEDGER))
            .and_then(|mut f| f.write_all(b"{\"serial\":\n"))
            .expect("append");
        let e = issued_to(&ca_dir, "a").expect_err("damaged");
        assert!(matches!(e, CaError::Ledger { line: 3, .. }), "{e}");
    }
}
