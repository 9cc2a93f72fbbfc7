//! Tenant data keys on this node: the key store ([`dmsc_keys::KeyStore`])
//! that seals the tenant payload of the audit log (and whatever else the
//! node keeps at rest for a tenant), and the operator statements that
//! rotate or destroy those keys mesh-wide.
//!
//! Statements mirror revocations: signed by the operator CA, verified
//! against the roots, persisted in `<data_dir>/tenant-key-statements.jsonl`,
//! re-published by every node under `tenant-key/<tenant>`. Unlike a
//! revocation (a fact that never changes), a tenant's statements form a
//! sequence, and gossip keeps one value per key: the value is the newest
//! `delete` plus the newest statement when that is a later `rotate-key`, so
//! a node that was away across "delete, then rotate" still shreds the old
//! keys before making a new one. Each node applies each statement once (the
//! key store records the sequence number with the key change itself).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use dmsc_keys::{Applied, KeyAction, KeyError, KeyStore};
use dmsc_transport::TenantKeyStatement;
use rustls::pki_types::CertificateDer;
use tracing::{info, warn};

/// The persisted statements' file name in the data dir.
pub const STATEMENTS_FILE: &str = "tenant-key-statements.jsonl";

/// Why a tenant key statement was not applied.
#[derive(Debug, thiserror::Error)]
pub enum TenantKeyError {
    #[error(transparent)]
    Statement(#[from] dmsc_transport::TransportError),
    #[error(transparent)]
    Keys(#[from] KeyError),
}

/// The audit log's [`dmsc_audit::Sealer`]: the node's key store, with
/// errors worded for `audit tail`.
#[derive(Debug, Clone)]
pub struct AuditSealer(pub Arc<KeyStore>);

impl dmsc_audit::Sealer for AuditSealer {
    fn seal(&self, tenant: &str, context: &str, plaintext: &[u8]) -> Result<String, String> {
        self.0
            .seal(tenant, context, plaintext)
            .map_err(|e| e.to_string())
    }

    fn open(&self, context: &str, sealed: &str) -> Result<Vec<u8>, String> {
        self.0.open(context, sealed).map_err(|e| match e {
            KeyError::Shredded { .. } => format!("key destroyed: {e}"),
            KeyError::NoKey { .. } => format!("no key: {e}"),
            other => other.to_string(),
        })
    }
}

/// What a tenant retains: the newest delete, and the newest statement.
#[derive(Debug, Clone, Default)]
struct Retained {
    delete: Option<TenantKeyStatement>,
    last: Option<TenantKeyStatement>,
}

impl Retained {
    fn all(&self) -> Vec<TenantKeyStatement> {
        let mut v: Vec<TenantKeyStatement> = self.delete.iter().cloned().collect();
        if let Some(l) = &self.last {
            if self.delete.as_ref().map(|d| d.seq) != Some(l.seq) {
                v.push(l.clone());
            }
        }
        v.sort_by_key(|s| s.seq);
        v
    }

    fn knows(&self, s: &TenantKeyStatement) -> bool {
        self.all()
            .iter()
            .any(|k| k.seq == s.seq && k.action == s.action)
    }
}

/// What applying one statement did on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatementOutcome {
    /// New here: this node's keys changed; audited and to be re-published.
    Applied {
        /// The id of the key made (by a rotate, or by a late delete that
        /// started the newer rotate's generation).
        key_id: Option<u32>,
        /// The keys destroyed by a delete.
        keys_destroyed: Option<u64>,
    },
    /// Already known or superseded: nothing changed.
    Known,
}

/// The node's tenant keys and the statements it has applied.
#[derive(Debug)]
pub struct TenantKeys {
    pub store: Arc<KeyStore>,
    retained: Mutex<BTreeMap<String, Retained>>,
    path: PathBuf,
}

impl TenantKeys {
    /// Opens the key store in `data_dir` and loads persisted statements that
    /// verify against `roots`, re-applying them in order (a no-op unless a
    /// crash came between the two writes).
    pub fn load(data_dir: &Path, roots: &[CertificateDer<'_>]) -> Result<Self, TenantKeyError> {
        let store = Arc::new(KeyStore::load(data_dir)?);
        let keys = TenantKeys {
            store,
            retained: Mutex::default(),
            path: data_dir.join(STATEMENTS_FILE),
        };
        let text = match std::fs::read_to_string(&keys.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(TenantKeyError::Statement(
                    dmsc_transport::TransportError::ReadFile {
                        path: keys.path.clone(),
                        source,
                    },
                ))
            }
        };
        let mut loaded: Vec<TenantKeyStatement> = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match TenantKeyStatement::parse(line.as_bytes())
                .and_then(|s| s.verify(roots).map(|()| s))
            {
                Ok(s) => loaded.push(s),
                Err(e) => {
                    warn!(path = %keys.path.display(), error = %e, "skipping a persisted tenant key statement")
                }
            }
        }
        loaded.sort_by_key(|s| s.seq);
        for s in loaded {
            if let Err(e) = keys.apply_verified(&s) {
                warn!(tenant = %s.tenant, action = %s.action, error = %e, "cannot re-apply a persisted tenant key statement");
            }
        }
        Ok(keys)
    }

    /// Statements this node retains for `tenant` (oldest first), as the
    /// gossip value carries them.
    pub fn statements(&self, tenant: &str) -> Vec<TenantKeyStatement> {
        self.retained
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
            .map(Retained::all)
            .unwrap_or_default()
    }

    /// Every tenant with retained statements and its gossip value.
    pub fn gossip_values(&self) -> Vec<(String, String)> {
        let map = self.retained.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .map(|(t, r)| (t.clone(), gossip_value(&r.all())))
            .collect()
    }

    /// Verifies `s` against `roots` and applies it (see [`Self::apply_verified`]).
    pub fn apply(
        &self,
        s: &TenantKeyStatement,
        roots: &[CertificateDer<'_>],
    ) -> Result<StatementOutcome, TenantKeyError> {
        if self
            .retained
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&s.tenant)
            .is_some_and(|r| r.knows(s))
        {
            return Ok(StatementOutcome::Known);
        }
        s.verify(roots)?;
        self.apply_verified(s)
    }

    /// Applies a verified statement to the key store (which applies each
    /// statement once, in a crash-safe way: see [`KeyStore::apply`]), and
    /// retains and persists it if it is the tenant's newest delete or newest
    /// statement.
    fn apply_verified(&self, s: &TenantKeyStatement) -> Result<StatementOutcome, TenantKeyError> {
        let action: KeyAction = s.action.parse()?;
        let mut map = self.retained.lock().unwrap_or_else(|p| p.into_inner());
        let r = map.entry(s.tenant.clone()).or_default();
        if r.knows(s) {
            return Ok(StatementOutcome::Known);
        }
        let applied = self.store.apply(&s.tenant, action, s.seq)?;
        let mut retained = false;
        if action == KeyAction::Delete && r.delete.as_ref().is_none_or(|d| s.seq > d.seq) {
            r.delete = Some(s.clone());
            retained = true;
        }
        if r.last.as_ref().is_none_or(|l| s.seq > l.seq) {
            r.last = Some(s.clone());
            retained = true;
        }
        if retained {
            let all: Vec<TenantKeyStatement> = map.values().flat_map(Retained::all).collect();
            if let Err(e) = save(&self.path, &all) {
                warn!(error = %e, "cannot persist tenant key statements; they stay in memory and in gossip");
            }
        }
        drop(map);
        Ok(match applied {
            Applied::Rotated { key_id } => {
                info!(tenant = %s.tenant, seq = s.seq, key_id, "tenant data key rotated");
                StatementOutcome::Applied {
                    key_id: Some(key_id),
                    keys_destroyed: None,
                }
            }
            Applied::Shredded { keys, new_key } => {
                info!(tenant = %s.tenant, seq = s.seq, keys, "tenant data keys destroyed");
                StatementOutcome::Applied {
                    key_id: new_key,
                    keys_destroyed: Some(keys as u64),
                }
            }
            Applied::AlreadyApplied { .. } => StatementOutcome::Known,
        })
    }
}

/// The gossip value for a tenant's retained statements.
pub fn gossip_value(statements: &[TenantKeyStatement]) -> String {
    let v: Vec<serde_json::Value> = statements
        .iter()
        .filter_map(|s| serde_json::to_value(s).ok())
        .collect();
    serde_json::Value::Array(v).to_string()
}

/// Parses a gossip value (a JSON array of statements, at most a few).
pub fn parse_gossip_value(value: &str) -> Vec<TenantKeyStatement> {
    if value.len() > 4 * dmsc_transport::tenant_key::MAX_TENANT_KEY_STATEMENT_BYTES {
        return Vec::new();
    }
    let Ok(items) = serde_json::from_str::<Vec<serde_json::Value>>(value) else {
        return Vec::new();
    };
    items
        .iter()
        .take(4)
        .filter_map(|v| TenantKeyStatement::parse(v.to_string().as_bytes()).ok())
        .collect()
}

fn save(path: &Path, all: &[TenantKeyStatement]) -> Result<(), dmsc_transport::TransportError> {
    let mut text = String::new();
    for s in all {
        text.push_str(&s.to_json());
        text.push('\n');
    }
    let tmp = path.with_extension("jsonl.tmp");
    dmsc_transport::pki::write_file(&tmp, &text, 0o644)?;
    std::fs::rename(&tmp, path).map_err(|source| dmsc_transport::TransportError::WriteFile {
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

#[cfg(test)]
mod tests {
    use super::*;
    use dmsc_transport::identity::certs_from_pem;
    use dmsc_transport::pki::CertificateAuthority;

    fn setup() -> (
        tempfile::TempDir,
        CertificateAuthority,
        Vec<CertificateDer<'static>>,
    ) {
        let dir = tempfile::tempdir().expect("dir");
        let ca = CertificateAuthority::generate("td").expect("ca");
        let roots = certs_from_pem(&ca.cert_pem, Path::new("ca")).expect("roots");
        (dir, ca, roots)
    }

    #[test]
    fn statements_apply_once_persist_and_refuse_forgeries() {
        let (dir, ca, roots) = setup();
        let tk = TenantKeys::load(dir.path(), &roots).expect("load");
        let sealed = tk.store.seal("acme", "c", b"x").expect("seal");
        let rot = TenantKeyStatement::sign_at(&ca, "acme", "rotate-key", 10).expect("sign");
        assert_eq!(
            tk.apply(&rot, &roots).expect("apply"),
            StatementOutcome::Applied {
                key_id: Some(2),
                keys_destroyed: None
            }
        );
        assert_eq!(
            tk.apply(&rot, &roots).expect("again"),
            StatementOutcome::Known
        );
        let other = CertificateAuthority::generate("td").expect("other");
        let forged = TenantKeyStatement::sign_at(&other, "acme", "delete", 11).expect("sign");
        assert!(tk.apply(&forged, &roots).is_err());
        assert_eq!(tk.store.open("c", &sealed).expect("still open"), b"x");
        let del = TenantKeyStatement::sign_at(&ca, "acme", "delete", 11).expect("sign");
        assert_eq!(
            tk.apply(&del, &roots).expect("delete"),
            StatementOutcome::Applied {
                key_id: None,
                keys_destroyed: Some(2)
            }
        );
        assert!(matches!(
            tk.store.open("c", &sealed),
            Err(KeyError::Shredded { .. })
        ));
        let value = tk.gossip_values();
        assert_eq!(value.len(), 1);
        let carried = parse_gossip_value(&value[0].1);
        assert_eq!(carried, vec![del.clone()]);
        drop(tk);
        let tk = TenantKeys::load(dir.path(), &roots).expect("reload");
        assert_eq!(tk.statements("acme"), vec![del.clone()]);
        assert_eq!(
            tk.apply(&del, &roots).expect("known"),
            StatementOutcome::Known
        );
        assert!(matches!(
            tk.store.seal("acme", "c", b"y"),
            Err(KeyError::SealRefused { .. })
        ));
    }

    #[test]
    fn a_node_that_missed_delete_then_rotate_shreds_before_the_new_key() {
        let (dir, ca, roots) = setup();
        let tk = TenantKeys::load(dir.path(), &roots).expect("load");
        let old = tk.store.seal("acme", "c", b"old").expect("seal");
        // Elsewhere: delete at 5, then a new generation at 6. This node
        // learns both from one gossip value.
        let del = TenantKeyStatement::sign_at(&ca, "acme", "delete", 5).expect("sign");
        let rot = TenantKeyStatement::sign_at(&ca, "acme", "rotate-key", 6).expect("sign");
        let value = gossip_value(&[del.clone(), rot.clone()]);
        for s in parse_gossip_value(&value) {
            tk.apply(&s, &roots).expect("apply");
        }
        assert!(matches!(
            tk.store.open("c", &old),
            Err(KeyError::Shredded { .. })
        ));
        let new = tk
            .store
            .seal("acme", "c", b"new")
            .expect("new generation seals");
        assert_eq!(tk.store.open("c", &new).expect("open"), b"new");
        assert_eq!(tk.statements("acme"), vec![del.clone(), rot.clone()]);

        // Another node learned the rotate first, the delete later: it still
        // shreds what it had and keeps a usable new key.
        let dir2 = tempfile::tempdir().expect("dir");
        let tk2 = TenantKeys::load(dir2.path(), &roots).expect("load");
        let old2 = tk2.store.seal("acme", "c", b"old").expect("seal");
        tk2.apply(&rot, &roots).expect("rotate");
        tk2.apply(&del, &roots).expect("late delete");
        assert!(matches!(
            tk2.store.open("c", &old2),
            Err(KeyError::Shredded { .. })
        ));
        let kept = tk2
            .store
            .seal("acme", "c", b"x")
            .expect("still seals after the newer rotate");
        drop(tk2);
        // A restart re-applies the persisted statements: nothing changes.
        for d in [&dir, &dir2] {
            let again = TenantKeys::load(d.path(), &roots).expect("reload");
            again
                .store
                .seal("acme", "c", b"y")
                .expect("the new generation survives a restart");
            assert_eq!(again.statements("acme"), vec![del.clone(), rot.clone()]);
        }
        let tk2 = TenantKeys::load(dir2.path(), &roots).expect("reload");
        assert_eq!(tk2.store.open("c", &kept).expect("opens"), b"x");
    }

    #[test]
    fn junk_gossip_values_are_ignored() {
        assert!(parse_gossip_value("").is_empty());
        assert!(parse_gossip_value("{}").is_empty());
        assert!(parse_gossip_value("[1,2,{\"v\":1}]").is_empty());
    }
}
