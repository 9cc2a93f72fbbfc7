//! `dmsc-node policy ...` and `ca issue-tenant`: signing a tenant's policy
//! document offline (operator CA key, or a tenant admin key), handing it to
//! a node, reading what a node enforces, and diffing a document against it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dmsc_policy::SignedPolicy;
use dmsc_transport::pki::CertificateAuthority;

use crate::admin::status::{admin_call, StatusError};

/// Why a policy command failed.
#[derive(Debug, thiserror::Error)]
pub enum PolicyCmdError {
    #[error("cannot {what} `{}`: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Policy(#[from] dmsc_policy::PolicyError),
    #[error(transparent)]
    Transport(#[from] dmsc_transport::TransportError),
    /// Not transparent: the exit code looks for the admin API's error in
    /// the chain (a transparent wrapper would skip it).
    #[error("{0}")]
    Admin(#[from] StatusError),
    #[error("give --ca-dir (operator CA) or --cert and --key (a tenant admin key from `ca issue-tenant`)")]
    NoKey,
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, PolicyCmdError> {
    std::fs::read(path).map_err(|source| PolicyCmdError::Io {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn write(path: &Path, contents: &str, mode: u32) -> Result<(), PolicyCmdError> {
    dmsc_transport::pki::write_file(path, contents, mode).map_err(PolicyCmdError::from)
}

/// `ca issue-tenant`: a tenant admin certificate and key in `out`
/// (`tenant-<t>.pem`, `tenant-<t>.key` 0600).
pub fn issue_tenant(
    ca_dir: &Path,
    tenant: &str,
    out: &Path,
    days: u64,
) -> Result<String, PolicyCmdError> {
    let ca = CertificateAuthority::load(ca_dir)?;
    let issued = ca.issue_tenant_admin(tenant, Duration::from_secs(days * 24 * 3600))?;
    std::fs::create_dir_all(out).map_err(|source| PolicyCmdError::Io {
        what: "create the directory",
        path: out.to_path_buf(),
        source,
    })?;
    let cert = out.join(format!("tenant-{tenant}.pem"));
    let key = out.join(format!("tenant-{tenant}.key"));
    write(&cert, &issued.cert_pem, 0o644)?;
    write(&key, &issued.key_pem, 0o600)?;
    Ok(format!(
        "tenant admin key for tenant `{tenant}` (signs that tenant's policy only; valid {days} days): {} and {}",
        cert.display(),
        key.display()
    ))
}

/// How a document is signed.
#[derive(Debug, Clone)]
pub enum SignWith {
    Operator { ca_dir: PathBuf },
    TenantAdmin { cert: PathBuf, key: PathBuf },
}

/// `policy sign`: checks the document (every problem at once) and signs
/// its exact bytes; returns the envelope (JSON).
pub fn sign(doc: &Path, with: &SignWith) -> Result<String, PolicyCmdError> {
    let bytes = read(doc, "read the policy document")?;
    let signed = match with {
        SignWith::Operator { ca_dir } => {
            SignedPolicy::sign_operator(&CertificateAuthority::load(ca_dir)?, &bytes)?
        }
        SignWith::TenantAdmin { cert, key } => {
            let cert = String::from_utf8_lossy(&read(cert, "read the tenant admin certificate")?)
                .into_owned();
            let key =
                String::from_utf8_lossy(&read(key, "read the tenant admin key")?).into_owned();
            SignedPolicy::sign_tenant_admin(&cert, &key, &bytes)?
        }
    };
    Ok(signed.to_json())
}

/// `policy apply FILE`: hands a signed policy to a node.
pub async fn apply(
    admin: SocketAddr,
    token: &str,
    file: &Path,
) -> Result<(u16, serde_json::Value), PolicyCmdError> {
    let body = read(file, "read the signed policy")?;
    let (status, text) = admin_call(
        admin,
        hyper::Method::POST,
        "/v1/policies",
        Some(token),
        body.into(),
    )
    .await?;
    let v = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    Ok((status, v))
}

/// `policy show [TENANT]`: what a node enforces.
pub async fn show(
    admin: SocketAddr,
    tenant: Option<&str>,
    token: Option<&str>,
) -> Result<serde_json::Value, PolicyCmdError> {
    let path = match tenant {
        Some(t) => format!("/v1/policies/{t}"),
        None => "/v1/policies".to_string(),
    };
    let (status, text) =
        admin_call(admin, hyper::Method::GET, &path, token, Default::default()).await?;
    if !(200..300).contains(&status) {
        return Err(StatusError::Http {
            addr: admin,
            status,
            body: text,
        }
        .into());
    }
    serde_json::from_str(&text).map_err(|e| {
        StatusError::Decode {
            addr: admin,
            reason: e.to_string(),
        }
        .into()
    })
}

/// The document text of a file that is either a policy document or a
/// signed envelope.
pub fn document_text(path: &Path) -> Result<String, PolicyCmdError> {
    let bytes = read(path, "read")?;
    let doc = match SignedPolicy::parse(&bytes) {
        Ok(s) => s.doc_bytes()?,
        Err(_) => bytes,
    };
    Ok(String::from_utf8_lossy(&doc).into_owned())
}

/// A line diff of `old` and `new` (longest common subsequence), `-`/`+`/` `
/// prefixed; empty when equal.
pub fn diff(old: &str, new: &str) -> String {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    if a == b {
        return String::new();
    }
    // lcs[i][j]: common lines of a[i..] and b[j..] (documents are at most
    // 256 KiB, so a quadratic table of line counts is fine).
    let mut lcs = vec![vec![0u32; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    // The edit script, removals before additions (as diff(1) prints them).
    let (mut i, mut j) = (0, 0);
    let mut ops: Vec<(char, &str)> = Vec::new();
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            ops.push((' ', a[i]));
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            ops.push(('-', a[i]));
            i += 1;
        } else {
            ops.push(('+', b[j]));
            j += 1;
        }
    }
    // Unchanged lines only near a change; a skipped run is one `...`.
    let near = |k: usize| {
        let from = k.saturating_sub(DIFF_CONTEXT);
        let to = (k + DIFF_CONTEXT + 1).min(ops.len());
        ops[from..to].iter().any(|(t, _)| *t != ' ')
    };
    let mut out = String::new();
    let mut skipped = false;
    for (k, (tag, line)) in ops.iter().enumerate() {
        if *tag == ' ' && !near(k) {
            if !skipped {
                out.push_str("  ...\n");
                skipped = true;
            }
            continue;
        }
        skipped = false;
        out.push_str(&format!("{tag} {line}\n"));
    }
    out
}

/// Unchanged lines `policy diff` shows around each change.
const DIFF_CONTEXT: usize = 3;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diffs_show_removed_and_added_lines() {
        assert_eq!(diff("a\nb\n", "a\nb\n"), "");
        assert_eq!(diff("a\nb\nc\n", "a\nx\nc\n"), "  a\n- b\n+ x\n  c\n");
        assert_eq!(diff("", "a\n"), "+ a\n");
        // Far from the change, unchanged lines are one `...`.
        let old: String = (1..=20).map(|n| format!("{n}\n")).collect();
        let new = old.replace("\n10\n", "\nten\n");
        assert_eq!(
            diff(&old, &new),
            "  ...\n  7\n  8\n  9\n- 10\n+ ten\n  11\n  12\n  13\n  ...\n"
        );
    }
}
