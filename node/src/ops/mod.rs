//! Operator commands that are more than a flag parse: `dmsc-node ca ...`
//! ([`ca`]), `check`, `token create`, `admin-token create|list|revoke`,
//! `revoke apply`, `audit verify`, `audit report`. They live here, not
//! in the binary, so tests drive them directly; the ones that talk to a
//! running node are clients of its admin API, like `status`.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::admin::status::{admin_call, StatusError};
use crate::config::NodeConfig;

pub mod ca;
pub mod netcheck;
pub mod policy;

/// Certificates expiring sooner than this fail `check`.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(7 * 24 * 3600);

/// One line of `dmsc-node check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub ok: bool,
    pub line: String,
}

impl Finding {
    fn ok(line: impl Into<String>) -> Self {
        Finding {
            ok: true,
            line: line.into(),
        }
    }
    fn fail(line: impl Into<String>) -> Self {
        Finding {
            ok: false,
            line: line.into(),
        }
    }
}

fn check_key_file(what: &str, path: &Path, out: &mut Vec<Finding>) {
    match std::fs::File::open(path) {
        Err(e) => out.push(Finding::fail(format!(
            "{what} `{}` is unreadable: {e}",
            path.display()
        ))),
        Ok(f) => match f.metadata() {
            Ok(m) if m.permissions().mode() & 0o004 != 0 => out.push(Finding::fail(format!(
                "{what} `{}` is world-readable (mode {:o}); run `chmod 600 {}`",
                path.display(),
                m.permissions().mode() & 0o777,
                path.display()
            ))),
            Ok(m) if m.permissions().mode() & 0o040 != 0 => out.push(Finding::ok(format!(
                "{what} `{}` is group-readable (mode {:o}); 600 is safer",
                path.display(),
                m.permissions().mode() & 0o777
            ))),
            Ok(_) => out.push(Finding::ok(format!(
                "{what} `{}` is readable by its owner only",
                path.display()
            ))),
            Err(e) => out.push(Finding::fail(format!("{what} `{}`: {e}", path.display()))),
        },
    }
}

fn check_cert_file(what: &str, path: &Path, now: SystemTime, out: &mut Vec<Finding>) {
    let pem = match std::fs::read_to_string(path) {
        Ok(p) => p,
        Err(e) => {
            out.push(Finding::fail(format!(
                "{what} `{}` is unreadable: {e}",
                path.display()
            )));
            return;
        }
    };
    let certs = match dmsc_transport::identity::certs_from_pem(&pem, path) {
        Ok(c) => c,
        Err(e) => {
            out.push(Finding::fail(format!("{what}: {e}")));
            return;
        }
    };
    for c in &certs {
        let Ok(info) = dmsc_transport::identity::cert_info(c) else {
            continue;
        };
        match info.not_after.duration_since(now) {
            Err(_) => out.push(Finding::fail(format!(
                "{what} `{}` ({}) has expired",
                path.display(),
                info.subject
            ))),
            Ok(left) if left < EXPIRY_WARNING => out.push(Finding::fail(format!(
                "{what} `{}` ({}) expires in {} h (less than 7 days): renew it",
                path.display(),
                info.subject,
                left.as_secs() / 3600
            ))),
            Ok(left) => out.push(Finding::ok(format!(
                "{what} `{}` ({}) valid for {} more days",
                path.display(),
                info.subject,
                left.as_secs() / 86400
            ))),
        }
    }
}

/// Checks the files a config names, then (if the node answers on `admin`)
/// its peers: reachability with our certificate (a CA mismatch shows as a
/// refused handshake) and clock skew.
pub async fn check(config: &NodeConfig, admin: SocketAddr, max_skew: Duration) -> Vec<Finding> {
    let mut out = Vec::new();
    let now = SystemTime::now();
    check_cert_file("CA bundle", &config.ca, now, &mut out);
    check_cert_file("node certificate", &config.cert, now, &mut out);
    check_key_file("node key", &config.key, &mut out);
    if let (Some(c), Some(k)) = (&config.issuer_cert, &config.issuer_key) {
        check_cert_file("issuing certificate", c, now, &mut out);
        check_key_file("issuing key", k, &mut out);
    }
    match dmsc_transport::NodeIdentity::load(&config.ca, &config.cert, &config.key) {
        Ok(id) => match dmsc_transport::tls::verify_own_chain(&id) {
            Ok(()) => out.push(Finding::ok(format!(
                "node certificate `{}` chains to the CA in `{}`",
                id.spiffe,
                config.ca.display()
            ))),
            Err(e) => out.push(Finding::fail(format!(
                "CA mismatch: node certificate `{}` {e}",
                id.spiffe
            ))),
        },
        Err(e) => out.push(Finding::fail(format!("node credentials do not load: {e}"))),
    }
    if admin.port() == 0 {
        out.push(Finding::fail(
            "admin.listen has port 0 (chosen at start): pass --admin ADDR of the running node for the peer checks".to_string(),
        ));
        return out;
    }
    match admin_call(
        admin,
        hyper::Method::GET,
        "/v1/check",
        None,
        bytes::Bytes::new(),
    )
    .await
    {
        Err(e) => out.push(Finding::fail(format!(
            "{e}; peer checks (CA mismatch, clock skew) need the running node"
        ))),
        Ok((status, body)) if status != 200 => out.push(Finding::fail(format!(
            "admin API at {admin} answered {status} to /v1/check: {body}"
        ))),
        Ok((_, body)) => peer_findings(&body, max_skew, &mut out),
    }
    out
}

fn peer_findings(body: &str, max_skew: Duration, out: &mut Vec<Finding>) {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(body) else {
        out.push(Finding::fail("unreadable /v1/check answer".to_string()));
        return;
    };
    let peers = v["peers"].as_array().cloned().unwrap_or_default();
    if peers.is_empty() {
        out.push(Finding::ok("no connected peers to compare clocks with"));
    }
    let max = max_skew.as_millis() as i64;
    for p in peers {
        let name = p["name"].as_str().unwrap_or("?");
        match (p["skew_ms"].as_i64(), p["rtt_ms"].as_u64()) {
            (Some(skew), Some(rtt)) if skew.abs() > max => out.push(Finding::fail(format!(
                "clock skew with peer `{name}` is {skew} ms (bound {max} ms, rtt {rtt} ms): fix NTP on one of them"
            ))),
            (Some(skew), Some(rtt)) => out.push(Finding::ok(format!(
                "clock skew with peer `{name}`: {skew} ms (rtt {rtt} ms)"
            ))),
            _ => out.push(Finding::fail(format!(
                "peer `{name}` did not answer the clock check: {}",
                p["error"].as_str().unwrap_or("?")
            ))),
        }
    }
    if let Some(r) = v["own_revoked"].as_object() {
        out.push(Finding::fail(format!(
            "this node's own certificate `{}` is revoked mesh-wide (serial {}, {}): peers refuse its \
             next connection; issue a new one (`dmsc-node ca issue-node`) and replace the cert and \
             key files (they are reloaded without a restart)",
            r.get("spiffe").and_then(|x| x.as_str()).unwrap_or("?"),
            r.get("serial").and_then(|x| x.as_str()).unwrap_or("?"),
            r.get("reason").and_then(|x| x.as_str()).unwrap_or("?"),
        )));
    }
    for r in v["refused"].as_array().cloned().unwrap_or_default() {
        out.push(Finding::fail(format!(
            "{} s ago this node refused a peer's certificate: {} (another CA, trust domain, expiry or revocation on that peer)",
            r["secs_ago"],
            r["reason"].as_str().unwrap_or("?")
        )));
    }
    for b in v["bootstrap"].as_array().cloned().unwrap_or_default() {
        let peer = b["peer"].as_str().unwrap_or("?");
        match b["error"].as_str() {
            None => out.push(Finding::ok(format!(
                "bootstrap peer {peer} accepts this node's certificate"
            ))),
            Some(e) => {
                let hint = if ["certificate", "refused", "UnknownIssuer", "unknown ca"]
                    .iter()
                    .any(|w| e.contains(w))
                {
                    " (CA mismatch: the peer and this node trust different CAs, or one certificate is expired or revoked)"
                } else {
                    ""
                };
                out.push(Finding::fail(format!("bootstrap peer {peer}: {e}{hint}")))
            }
        }
    }
}

/// Reads the admin token file a node wrote (`<data_dir>/admin.token`).
pub fn read_admin_token(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map(|t| t.trim().to_string())
        .map_err(|e| {
            format!(
                "cannot read the admin token `{}`: {e} (the node writes it to <data_dir>/admin.token; pass --admin-token FILE)",
                path.display()
            )
        })
}

/// `dmsc-node token create`: asks the node for a one-time join token.
pub async fn token_create(
    admin: SocketAddr,
    admin_token: &str,
    ask: TokenAsk<'_>,
) -> Result<serde_json::Value, StatusError> {
    let body = serde_json::json!({
        "tenant": ask.tenant,
        "agent": ask.agent,
        "ttl_secs": ask.ttl.as_secs(),
        "cgroup": ask.cgroup,
        "uid": ask.uid,
        "netns": ask.netns,
    });
    post_json(admin, admin_token, "/v1/tokens", body.to_string()).await
}

/// What `dmsc-node token create` asks for.
#[derive(Debug, Clone, Copy)]
pub struct TokenAsk<'a> {
    pub tenant: &'a str,
    pub agent: &'a str,
    pub ttl: Duration,
    /// Only this cgroup's (or user's) processes may redeem it, at the
    /// metadata endpoint.
    pub cgroup: Option<&'a str>,
    pub uid: Option<u32>,
    pub netns: Option<&'a str>,
}

/// `dmsc-node admin-token create --tenant T --read-only`: asks the node for
/// a read-only token of one tenant (printed once; the node keeps a hash).
pub async fn admin_token_create(
    admin: SocketAddr,
    admin_token: &str,
    tenant: &str,
    ttl: Option<Duration>,
) -> Result<serde_json::Value, StatusError> {
    let body = serde_json::json!({
        "tenant": tenant,
        "read_only": true,
        "ttl_secs": ttl.map(|t| t.as_secs()),
    });
    post_json(admin, admin_token, "/v1/admin-tokens", body.to_string()).await
}

/// `dmsc-node admin-token list`: the node's tenant read tokens (no secrets).
pub async fn admin_token_list(
    admin: SocketAddr,
    admin_token: &str,
) -> Result<serde_json::Value, StatusError> {
    let (status, text) = admin_call(
        admin,
        hyper::Method::GET,
        "/v1/admin-tokens",
        Some(admin_token),
        bytes::Bytes::new(),
    )
    .await?;
    if status != 200 {
        return Err(StatusError::Http {
            addr: admin,
            status,
            body: text,
        });
    }
    serde_json::from_str(&text).map_err(|e| StatusError::Decode {
        addr: admin,
        reason: e.to_string(),
    })
}

/// `dmsc-node admin-token revoke ID`.
pub async fn admin_token_revoke(
    admin: SocketAddr,
    admin_token: &str,
    id: &str,
) -> Result<(), StatusError> {
    let (status, text) = admin_call(
        admin,
        hyper::Method::DELETE,
        &format!("/v1/admin-tokens/{id}"),
        Some(admin_token),
        bytes::Bytes::new(),
    )
    .await?;
    if status != 204 {
        return Err(StatusError::Http {
            addr: admin,
            status,
            body: text,
        });
    }
    Ok(())
}

/// `dmsc-node intercept enable|disable|status`: one call to the node's
/// `/v1/intercept` (see `admin::intercept`); the node's answer, or its
/// error message.
pub async fn intercept_call(
    admin: SocketAddr,
    admin_token: Option<&str>,
    method: hyper::Method,
    path_and_query: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value, StatusError> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let (status, text) =
        admin_call(admin, method, path_and_query, admin_token, body.into()).await?;
    if !(200..300).contains(&status) {
        let body = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or(text);
        return Err(StatusError::Http {
            addr: admin,
            status,
            body,
        });
    }
    serde_json::from_str(&text).map_err(|e| StatusError::Decode {
        addr: admin,
        reason: e.to_string(),
    })
}

/// `dmsc-node revoke apply FILE`: hands a signed revocation to the node,
/// which checks it and spreads it by gossip.
pub async fn revoke_apply(
    admin: SocketAddr,
    admin_token: &str,
    statement: String,
) -> Result<serde_json::Value, StatusError> {
    post_json(admin, admin_token, "/v1/revocations", statement).await
}

/// `dmsc-node tenant apply FILE` (and `tenant rotate-key|delete` without
/// `--out`): hands a signed tenant key statement to the node, which applies
/// it and spreads it by gossip.
pub async fn tenant_key_apply(
    admin: SocketAddr,
    admin_token: &str,
    statement: String,
) -> Result<serde_json::Value, StatusError> {
    post_json(admin, admin_token, "/v1/tenant-keys", statement).await
}

/// `dmsc-node audit tail`: the node's tenant key store in `data_dir`, if it
/// has one, to open sealed payload with (never creates one: `tail` reads).
pub fn audit_sealer(
    data_dir: &Path,
) -> Result<Option<crate::security::tenant_keys::AuditSealer>, dmsc_keys::KeyError> {
    let kek = data_dir.join(dmsc_keys::KEYS_DIR).join(dmsc_keys::KEK_FILE);
    if !kek.exists() {
        return Ok(None);
    }
    let store = dmsc_keys::KeyStore::load(data_dir)?;
    Ok(Some(crate::security::tenant_keys::AuditSealer(
        std::sync::Arc::new(store),
    )))
}

async fn post_json(
    admin: SocketAddr,
    admin_token: &str,
    path: &str,
    body: String,
) -> Result<serde_json::Value, StatusError> {
    let (status, text) = admin_call(
        admin,
        hyper::Method::POST,
        path,
        Some(admin_token),
        body.into(),
    )
    .await?;
    if !(200..300).contains(&status) {
        return Err(StatusError::Http {
            addr: admin,
            status,
            body: text,
        });
    }
    serde_json::from_str(&text).map_err(|e| StatusError::Decode {
        addr: admin,
        reason: e.to_string(),
    })
}

/// `dmsc-node audit verify`: one line of summary, and whether the log is intact.
pub fn audit_verify(
    dir: &Path,
    ca: Option<&Path>,
) -> Result<(String, bool), dmsc_audit::AuditError> {
    let opts = match ca {
        Some(p) => {
            let pem = std::fs::read_to_string(p).map_err(|source| dmsc_audit::AuditError::Io {
                path: p.to_path_buf(),
                op: "reading the CA bundle",
                source,
            })?;
            dmsc_audit::VerifyOptions::with_roots_pem(&pem)?
        }
        None => dmsc_audit::VerifyOptions::default(),
    };
    let r = dmsc_audit::verify(dir, &opts)?;
    let against = if ca.is_some() {
        ""
    } else {
        " (against the certificates they carry only: give --ca to check that they come from this mesh's nodes)"
    };
    Ok(match &r.problem {
        None => {
            let count =
                |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
            (
                format!(
                    "{}: {}, {} verified{against}, {} after the last checkpoint; tenants: {}",
                    r.path.display(),
                    count(r.entries, "entry", "entries"),
                    count(r.checkpoints, "signed checkpoint", "signed checkpoints"),
                    count(r.unsealed, "entry", "entries"),
                    r.tenants.iter().cloned().collect::<Vec<_>>().join(", ")
                ),
                true,
            )
        }
        // A foreign signer is a forgery or the wrong bundle: said as such.
        Some(p) if p.kind == dmsc_audit::ProblemKind::UntrustedSigner => {
            (format!("{}: UNTRUSTED: {p}", r.path.display()), false)
        }
        Some(p) => (format!("{}: TAMPERED: {p}", r.path.display()), false),
    })
}

/// `dmsc-node audit report`: counts one tenant's entries in the log at
/// `path` (the audit directory or its `audit.jsonl`), streaming. Lines that
/// do not parse are counted in [`dmsc_audit::report::Report::unreadable`];
/// a read error ends the report with the error.
pub fn audit_report(
    path: &Path,
    tenant: &str,
    since_ms: Option<u64>,
) -> Result<dmsc_audit::report::Report, dmsc_audit::AuditError> {
    let mut report = dmsc_audit::report::Report::new(tenant, since_ms);
    for line in dmsc_audit::tail(path, None)? {
        match line {
            Ok(l) => report.add(&l),
            Err(dmsc_audit::AuditError::Corrupt { .. }) => report.unreadable += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(report)
}

/// Unix milliseconds as RFC 3339 (UTC), for the report's text.
pub fn rfc3339_ms(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("unix ms {ms}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmsc_transport::pki::CertificateAuthority;

    fn failing(f: &[Finding], needle: &str) -> bool {
        f.iter().any(|f| !f.ok && f.line.contains(needle))
    }

    #[tokio::test]
    async fn check_names_expiring_certificates_ca_mismatch_and_an_unreachable_node() {
        let dir = tempfile::tempdir().expect("dir");
        let ca = CertificateAuthority::generate("td").expect("ca");
        ca.issue_node_credentials("n1", Duration::from_secs(3 * 86400), &[])
            .expect("issue")
            .write_dir(dir.path(), &ca.cert_pem)
            .expect("write");
        let cfg = crate::RawConfig::loopback("n1", dir.path(), None)
            .validate()
            .expect("config");
        let unreachable: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let f = check(&cfg, unreachable, Duration::from_secs(1)).await;
        assert!(failing(&f, "expires in"), "{f:#?}");
        assert!(failing(&f, "less than 7 days"), "{f:#?}");
        assert!(failing(&f, "cannot reach the node's admin API"), "{f:#?}");
        assert!(
            f.iter()
                .any(|f| f.ok && f.line.contains("readable by its owner only")),
            "{f:#?}"
        );
        assert!(!failing(&f, "CA mismatch:"), "{f:#?}");

        // Another CA in ca.pem: the node certificate no longer matches it.
        let other = CertificateAuthority::generate("td").expect("other");
        std::fs::write(dir.path().join("ca.pem"), &other.cert_pem).expect("write");
        let f = check(&cfg, unreachable, Duration::from_secs(1)).await;
        assert!(failing(&f, "CA mismatch: node certificate"), "{f:#?}");
    }

    #[test]
    fn peer_findings_flag_skew_and_refusals() {
        let body = serde_json::json!({
            "peers": [
                {"name": "a", "skew_ms": 12, "rtt_ms": 1},
                {"name": "b", "skew_ms": -5000, "rtt_ms": 2},
                {"name": "c", "error": "timed out"},
            ],
            "bootstrap": [{"peer": "x:1", "error": "overlay connection to x failed: peer refused this node's certificate"}],
            "refused": [{"secs_ago": 3, "reason": "certificate `spiffe://td/node/rogue` is not from this mesh: issued by `CN=other`"}],
        })
        .to_string();
        let mut f = Vec::new();
        peer_findings(&body, Duration::from_millis(1000), &mut f);
        assert!(f.iter().any(|f| f.ok && f.line.contains("peer `a`: 12 ms")));
        assert!(failing(&f, "clock skew with peer `b` is -5000 ms"));
        assert!(failing(&f, "peer `c` did not answer"));
        assert!(failing(&f, "CA mismatch"));
        assert!(failing(&f, "refused a peer's certificate: certificate `spiffe://td/node/rogue` is not from this mesh"));
    }
}
