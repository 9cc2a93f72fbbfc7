//! The tenant policies this node enforces: the highest valid version of
//! each tenant's signed document, persisted in `<data_dir>/policies/` so a
//! restart enforces them before gossip catches up.
//!
//! A document arrives from the admin API (`POST /v1/policies`) or from a
//! peer (gossip announces `policy/<tenant>` = `<version>:<digest>`, the
//! document is fetched from a peer that has it). Either way it is verified
//! here against the mesh roots and the revocations; an older version, or
//! the same version with other bytes, is refused. Each node re-announces
//! what it holds, so a document outlives the node it was applied on. The
//! request path reads [`PolicyStore::get`]: one read lock and an `Arc` clone.
//!
//! A copy at rest is tenant data: it is sealed with the tenant's data key
//! (`<tenant>.sealed`, [`dmsc_keys`]). After the tenant's keys are
//! destroyed (`tenant delete`) the copy cannot be read, is not loaded, and
//! no new copy is written until a new key generation exists; the policy then
//! lives in memory and in its peers' copies only.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use dmsc_policy::{Policy, PolicyError, SignedPolicy, Signer};
use rustls::pki_types::CertificateDer;

/// One tenant's policy as this node holds it.
#[derive(Debug)]
pub struct Held {
    pub policy: Arc<Policy>,
    /// The signed envelope as received (served to peers that fetch it).
    pub envelope: Arc<str>,
    pub signer: Signer,
    /// The document's text (for `policy show` and `diff`).
    pub doc: Arc<[u8]>,
}

/// Why a policy was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("tenant `{tenant}` already has policy version {held}; version {offered} is older")]
    Older {
        tenant: String,
        held: u64,
        offered: u64,
    },
    #[error("tenant `{tenant}` already has a different policy with version {version} (digest {held}); raise the version to replace it")]
    Conflict {
        tenant: String,
        version: u64,
        held: String,
    },
}

impl ApplyError {
    /// Stable machine code (`invalid`, `bad_signature`, `other_tenant_key`, `older_version`, `version_conflict`).
    pub fn code(&self) -> &'static str {
        match self {
            ApplyError::Policy(e) => e.code(),
            ApplyError::Older { .. } => "older_version",
            ApplyError::Conflict { .. } => "version_conflict",
        }
    }

    /// Every problem, one per entry (for API answers and the CLI).
    pub fn problems(&self) -> Vec<String> {
        match self {
            ApplyError::Policy(PolicyError::Invalid(p)) => p.clone(),
            e => vec![e.to_string()],
        }
    }
}

/// What applying a document did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// A new version is in force (`previous`: the version it replaced).
    New {
        tenant: String,
        version: u64,
        digest: String,
        signer: String,
        previous: Option<u64>,
    },
    /// This node already holds exactly this document.
    Unchanged { tenant: String, version: u64 },
}

/// The policies this node holds, by tenant.
pub struct PolicyStore {
    dir: PathBuf,
    held: RwLock<HashMap<String, Arc<Held>>>,
    /// Seals copies at rest with the tenant's key.
    keys: Arc<dmsc_keys::KeyStore>,
    /// Told of every policy that comes into force (rate limits follow).
    watchers: RwLock<Vec<Watcher>>,
    /// Held while one document is applied (checked, persisted, inserted).
    applying: std::sync::Mutex<()>,
}

/// Called with each policy that comes into force (`Some`), and with a
/// tenant whose policy was dropped (`None`: its signer was revoked).
pub type Watcher = Box<dyn Fn(&str, Option<&Policy>) + Send + Sync>;

impl std::fmt::Debug for PolicyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyStore")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// The context a sealed policy copy is bound to.
const SEAL_CONTEXT: &str = "policy";

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

/// `policy/<tenant>` value: `<version>:<digest>`.
pub fn announcement(version: u64, digest: &str) -> String {
    format!("{version}:{digest}")
}

/// Parses a `policy/<tenant>` value.
pub fn parse_announcement(v: &str) -> Option<(u64, &str)> {
    let (version, digest) = v.split_once(':')?;
    let ok = digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit());
    ok.then_some(())?;
    Some((version.parse().ok()?, digest))
}

impl PolicyStore {
    /// Opens the store in `dir` (created if missing) and loads what was
    /// persisted, verifying each document again (a document whose signer
    /// was revoked meanwhile is dropped, with a warning).
    pub fn open(
        dir: PathBuf,
        roots: &[CertificateDer<'_>],
        revoked: impl Fn(&str) -> bool,
        keys: Arc<dmsc_keys::KeyStore>,
    ) -> std::io::Result<PolicyStore> {
        std::fs::create_dir_all(&dir)?;
        let store = PolicyStore {
            dir,
            held: RwLock::default(),
            keys,
            watchers: RwLock::default(),
            applying: std::sync::Mutex::default(),
        };
        let mut loaded = 0;
        for entry in std::fs::read_dir(&store.dir)? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("sealed") {
                continue;
            }
            let sealed = std::fs::read_to_string(&path)?;
            let bytes = match store.keys.open(SEAL_CONTEXT, sealed.trim()) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "a persisted policy cannot be opened; peers will supply it");
                    continue;
                }
            };
            match store.check(&bytes, roots, &revoked) {
                Ok((held, _)) => {
                    let tenant = held.policy.tenant.clone();
                    store
                        .held
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(tenant, Arc::new(held));
                    loaded += 1;
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "ignoring a persisted policy that no longer verifies")
                }
            }
        }
        if loaded > 0 {
            tracing::info!(count = loaded, "loaded persisted tenant policies");
        }
        Ok(store)
    }

    fn check(
        &self,
        bytes: &[u8],
        roots: &[CertificateDer<'_>],
        revoked: &impl Fn(&str) -> bool,
    ) -> Result<(Held, String), ApplyError> {
        let signed = SignedPolicy::parse(bytes)?;
        let v = signed.verify(roots, SystemTime::now(), revoked)?;
        let envelope = signed.to_json();
        Ok((
            Held {
                policy: Arc::new(v.policy),
                envelope: envelope.clone().into(),
                signer: v.signer,
                doc: v.doc.into(),
            },
            envelope,
        ))
    }

    /// Verifies and applies a signed document; persists it when new.
    pub fn apply(
        &self,
        bytes: &[u8],
        roots: &[CertificateDer<'_>],
        revoked: impl Fn(&str) -> bool,
    ) -> Result<Applied, ApplyError> {
        let (held, envelope) = self.check(bytes, roots, &revoked)?;
        let p = held.policy.clone();
        // Applies are one at a time; the request path's reads wait only for
        // the insert, never for the sealed copy's fsync.
        let _one = self.applying.lock().unwrap_or_else(|e| e.into_inner());
        let previous = read(&self.held).get(&p.tenant).map(|h| h.policy.clone());
        if let Some(prev) = &previous {
            if prev.version > p.version {
                return Err(ApplyError::Older {
                    tenant: p.tenant.clone(),
                    held: prev.version,
                    offered: p.version,
                });
            }
            if prev.version == p.version {
                if prev.digest == p.digest {
                    return Ok(Applied::Unchanged {
                        tenant: p.tenant.clone(),
                        version: p.version,
                    });
                }
                return Err(ApplyError::Conflict {
                    tenant: p.tenant.clone(),
                    version: p.version,
                    held: prev.digest.clone(),
                });
            }
        }
        let persisted = self
            .keys
            .seal(&p.tenant, SEAL_CONTEXT, envelope.as_bytes())
            .map_err(|e| e.to_string())
            .and_then(|sealed| {
                dmsc_auth::token::write_private_atomic(
                    &self.dir.join(format!("{}.sealed", p.tenant)),
                    sealed.as_bytes(),
                )
            });
        if let Err(e) = persisted {
            // Enforced now and re-fetched from peers after a restart.
            tracing::warn!(tenant = %p.tenant, error = %e, "cannot persist the policy; it is in force in memory");
        }
        let signer = held.signer.to_string();
        self.held
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(p.tenant.clone(), Arc::new(held));
        for w in read(&self.watchers).iter() {
            w(&p.tenant, Some(&p));
        }
        Ok(Applied::New {
            tenant: p.tenant.clone(),
            version: p.version,
            digest: p.digest.clone(),
            signer,
            previous: previous.map(|p| p.version),
        })
    }

    /// Calls `w` with every policy held now and each that comes into force
    /// later.
    pub fn watch(&self, w: Watcher) {
        for h in self.all() {
            w(&h.policy.tenant, Some(&h.policy));
        }
        self.watchers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(w);
    }

    /// Verifies every held policy again (after a revocation) and drops
    /// those that no longer verify, with their persisted copies: a policy
    /// signed with a key that was since revoked is no longer in force, and
    /// any version may replace it. Returns `(tenant, version, why)` of each.
    pub fn drop_unverified(
        &self,
        roots: &[CertificateDer<'_>],
        revoked: impl Fn(&str) -> bool,
    ) -> Vec<(String, u64, String)> {
        let _one = self.applying.lock().unwrap_or_else(|e| e.into_inner());
        let held = self.all();
        let mut dropped = Vec::new();
        for h in held {
            let Err(e) = self.check(h.envelope.as_bytes(), roots, &revoked) else {
                continue;
            };
            let tenant = h.policy.tenant.clone();
            let mut map = self.held.write().unwrap_or_else(|e| e.into_inner());
            // Only the copy that failed (a newer one may have come meanwhile).
            if map.get(&tenant).is_some_and(|c| Arc::ptr_eq(c, &h)) {
                map.remove(&tenant);
                drop(map);
                let _ = std::fs::remove_file(self.dir.join(format!("{tenant}.sealed")));
                for w in read(&self.watchers).iter() {
                    w(&tenant, None);
                }
                dropped.push((tenant, h.policy.version, e.to_string()));
            }
        }
        dropped
    }

    /// The policy of `tenant`, if it has one.
    pub fn get(&self, tenant: &str) -> Option<Arc<Policy>> {
        read(&self.held).get(tenant).map(|h| h.policy.clone())
    }

    /// Everything held about `tenant`'s policy.
    pub fn held(&self, tenant: &str) -> Option<Arc<Held>> {
        read(&self.held).get(tenant).cloned()
    }

    /// Every tenant's policy, sorted by tenant.
    pub fn all(&self) -> Vec<Arc<Held>> {
        let mut v: Vec<_> = read(&self.held).values().cloned().collect();
        v.sort_by(|a, b| a.policy.tenant.cmp(&b.policy.tenant));
        v
    }

    /// The version held for `tenant` (0: none).
    pub fn version(&self, tenant: &str) -> u64 {
        read(&self.held).get(tenant).map_or(0, |h| h.policy.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmsc_transport::pki::CertificateAuthority;
    use rustls::pki_types::pem::PemObject;

    fn signed(ca: &CertificateAuthority, doc: &str) -> Vec<u8> {
        SignedPolicy::sign_operator(ca, doc.as_bytes())
            .expect("sign")
            .to_json()
            .into_bytes()
    }

    #[test]
    fn the_highest_valid_version_wins_and_survives_a_restart() {
        let ca = CertificateAuthority::generate("td").expect("ca");
        let roots = vec![CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).expect("pem")];
        let dir = tempfile::tempdir().expect("dir");
        let keys = || Arc::new(dmsc_keys::KeyStore::load(dir.path()).expect("keys"));
        let store =
            PolicyStore::open(dir.path().join("p"), &roots, |_| false, keys()).expect("open");
        let v2 = signed(&ca, "tenant = \"acme\"\nversion = 2\n");
        let applied = store.apply(&v2, &roots, |_| false).expect("v2");
        assert!(matches!(
            applied,
            Applied::New {
                version: 2,
                previous: None,
                ..
            }
        ));
        assert_eq!(
            store.apply(&v2, &roots, |_| false).expect("again"),
            Applied::Unchanged {
                tenant: "acme".into(),
                version: 2
            }
        );
        let v1 = signed(&ca, "tenant = \"acme\"\nversion = 1\n");
        let e = store.apply(&v1, &roots, |_| false).expect_err("older");
        assert_eq!(e.code(), "older_version");
        let other2 = signed(&ca, "tenant = \"acme\"\nversion = 2\n# other bytes\n");
        let e = store
            .apply(&other2, &roots, |_| false)
            .expect_err("conflict");
        assert_eq!(e.code(), "version_conflict");
        let v3 = signed(&ca, "tenant = \"acme\"\nversion = 3\n");
        assert!(matches!(
            store.apply(&v3, &roots, |_| false).expect("v3"),
            Applied::New {
                version: 3,
                previous: Some(2),
                ..
            }
        ));
        drop(store);
        // At rest the copy is sealed: the document's text is not on disk.
        let raw = std::fs::read_to_string(dir.path().join("p").join("acme.sealed")).expect("copy");
        assert!(
            raw.starts_with("sealed:v1:acme:") && !raw.contains("version"),
            "{raw}"
        );
        let store =
            PolicyStore::open(dir.path().join("p"), &roots, |_| false, keys()).expect("reopen");
        assert_eq!(store.version("acme"), 3);
        assert_eq!(store.version("globex"), 0);
        // After crypto-shredding the copy no longer loads.
        drop(store);
        keys().shred("acme").expect("shred");
        let store =
            PolicyStore::open(dir.path().join("p"), &roots, |_| false, keys()).expect("reopen");
        assert_eq!(store.version("acme"), 0);
    }

    #[test]
    fn announcements_round_trip() {
        let d = "a".repeat(64);
        assert_eq!(
            parse_announcement(&announcement(7, &d)),
            Some((7, d.as_str()))
        );
        assert_eq!(parse_announcement("7:short"), None);
        assert_eq!(parse_announcement("x:aaaa"), None);
    }
}
