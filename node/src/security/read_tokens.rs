//! Tenant-scoped, read-only admin tokens.
//!
//! The node admin token can do everything; a tenant's operators should see
//! their own agents, audit entries and policy and nothing of the other
//! tenants on the node, and change nothing. A read token is
//! `dmsc-rt.<id>.<secret>`: the id (8 random bytes, hex) finds the entry and
//! may be logged or shown by `admin-token list`; the secret (32 random bytes,
//! hex) is never stored, only its SHA-256, compared in constant time.
//! A token is bound to one tenant at creation and may carry an expiry.
//!
//! The store is `<data_dir>/admin-read-tokens.json`, mode 0600, rewritten
//! atomically on every change (temp file in the same directory, fsync,
//! rename, fsync the directory), so a crash leaves the old or the new set,
//! never half of one. Lookups take `now` as a parameter: expiry boundaries
//! are tested without sleeping. File I/O happens under a mutex and only on
//! create/revoke (rare operator actions); checks are in memory.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::proto::hex;

/// Prefix of every tenant read token.
pub const READ_TOKEN_PREFIX: &str = "dmsc-rt";
/// The store file in the data directory.
pub const READ_TOKENS_FILE: &str = "admin-read-tokens.json";
/// Longest lifetime `--ttl` accepts (a token without one never expires).
pub const MAX_TTL: Duration = Duration::from_secs(366 * 24 * 3600);

const ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;
const FILE_VERSION: u32 = 1;

/// Why a read token could not be made, found or stored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReadTokenError {
    #[error("`{0}` is not a tenant name (1-63 of a-z, 0-9 and -, not starting or ending with -)")]
    BadTenant(String),
    #[error("a ttl of {0} s is over the limit of {max} s (a token without --ttl never expires; revoke it with `dmsc-node admin-token revoke`)", max = MAX_TTL.as_secs())]
    TtlTooLong(u64),
    #[error("not a tenant read token (expected `{READ_TOKEN_PREFIX}.<id>.<secret>` as printed by `dmsc-node admin-token create`)")]
    Malformed,
    #[error("tenant read token `{0}` is unknown to this node (revoked, or made by another node)")]
    Unknown(String),
    #[error("tenant read token `{id}` expired at unix {at}; make a new one with `dmsc-node admin-token create`")]
    Expired { id: String, at: u64 },
    #[error("tenant read token store `{path}`: {detail}; fix or remove the file (it is recreated empty, and every read token must be made again)")]
    Store { path: String, detail: String },
}

/// A read token as the store knows it, without its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadTokenInfo {
    pub id: String,
    pub tenant: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds; `None`: never expires.
    pub expires_at: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    #[serde(flatten)]
    info: ReadTokenInfo,
    /// Hex SHA-256 of the secret part.
    secret_hash: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: u32,
    tokens: Vec<Entry>,
}

/// The persisted tenant read tokens of one node. `Send + Sync`.
#[derive(Debug)]
pub struct ReadTokens {
    path: PathBuf,
    entries: Mutex<BTreeMap<String, Entry>>,
}

fn secret_hash(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// True if `presented` looks like a read token (so the admin API can say
/// which kind of token was wrong).
pub fn is_read_token(presented: &str) -> bool {
    presented
        .trim()
        .starts_with(&format!("{READ_TOKEN_PREFIX}."))
}

fn split(token: &str) -> Result<(&str, &str), ReadTokenError> {
    let rest = token
        .trim()
        .strip_prefix(READ_TOKEN_PREFIX)
        .and_then(|r| r.strip_prefix('.'))
        .ok_or(ReadTokenError::Malformed)?;
    let (id, secret) = rest.split_once('.').ok_or(ReadTokenError::Malformed)?;
    let is_hex = |s: &str, bytes: usize| {
        s.len() == bytes * 2
            && s.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    };
    if is_hex(id, ID_BYTES) && is_hex(secret, SECRET_BYTES) {
        Ok((id, secret))
    } else {
        Err(ReadTokenError::Malformed)
    }
}

impl ReadTokens {
    /// Opens the store at `path` (an absent file is an empty store, written
    /// on the first create). The directory must exist.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ReadTokenError> {
        let path = path.as_ref().to_path_buf();
        let store_err = |detail: String| ReadTokenError::Store {
            path: path.display().to_string(),
            detail,
        };
        let entries = match std::fs::read(&path) {
            Ok(bytes) => {
                if let Ok(meta) = std::fs::metadata(&path) {
                    let mode = meta.permissions().mode() & 0o777;
                    if mode & 0o077 != 0 {
                        tracing::warn!(path = %path.display(), mode = format!("{mode:o}"),
                            "tenant read token store is readable by others; it should be 0600");
                    }
                }
                let file: File = serde_json::from_slice(&bytes)
                    .map_err(|e| store_err(format!("not a read token store: {e}")))?;
                if file.version != FILE_VERSION {
                    return Err(store_err(format!(
                        "format version {} is not supported (expected {FILE_VERSION})",
                        file.version
                    )));
                }
                file.tokens
                    .into_iter()
                    .map(|e| (e.info.id.clone(), e))
                    .collect()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(store_err(e.to_string())),
        };
        Ok(ReadTokens {
            path,
            entries: Mutex::new(entries),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist(&self, entries: &BTreeMap<String, Entry>) -> Result<(), ReadTokenError> {
        write_atomic(&self.path, entries).map_err(|detail| ReadTokenError::Store {
            path: self.path.display().to_string(),
            detail,
        })
    }

    /// Makes a read token for `tenant`; returns it (shown once, never
    /// stored) and what the store keeps.
    pub fn create(
        &self,
        tenant: &str,
        ttl: Option<Duration>,
        now: SystemTime,
    ) -> Result<(String, ReadTokenInfo), ReadTokenError> {
        if !dmsc_auth::is_valid_name(tenant) {
            return Err(ReadTokenError::BadTenant(tenant.chars().take(80).collect()));
        }
        if let Some(t) = ttl.filter(|t| *t > MAX_TTL) {
            return Err(ReadTokenError::TtlTooLong(t.as_secs()));
        }
        let id = hex(&rand::random::<[u8; ID_BYTES]>());
        let secret = hex(&rand::random::<[u8; SECRET_BYTES]>());
        let info = ReadTokenInfo {
            id: id.clone(),
            tenant: tenant.to_string(),
            created_at: unix(now),
            expires_at: ttl.map(|t| unix(now) + t.as_secs()),
        };
        let mut entries = self.lock();
        let mut next = entries.clone();
        next.insert(
            id.clone(),
            Entry {
                info: info.clone(),
                secret_hash: secret_hash(&secret),
            },
        );
        // On disk first: a token the caller holds is one the node knows after a restart.
        self.persist(&next)?;
        *entries = next;
        Ok((format!("{READ_TOKEN_PREFIX}.{id}.{secret}"), info))
    }

    /// The tenant `presented` reads for, if it is a live token of this store.
    pub fn check(&self, presented: &str, now: SystemTime) -> Result<String, ReadTokenError> {
        let (id, secret) = split(presented)?;
        let entries = self.lock();
        let entry = entries
            .get(id)
            .filter(|e| ct_eq(e.secret_hash.as_bytes(), secret_hash(secret).as_bytes()))
            .ok_or_else(|| ReadTokenError::Unknown(id.to_string()))?;
        match entry.info.expires_at {
            Some(at) if unix(now) >= at => Err(ReadTokenError::Expired {
                id: id.to_string(),
                at,
            }),
            _ => Ok(entry.info.tenant.clone()),
        }
    }

    /// Every token, without secrets.
    pub fn list(&self) -> Vec<ReadTokenInfo> {
        self.lock().values().map(|e| e.info.clone()).collect()
    }

    /// Forgets the token with `id`; false if there was none.
    pub fn revoke(&self, id: &str) -> Result<bool, ReadTokenError> {
        let mut entries = self.lock();
        if !entries.contains_key(id) {
            return Ok(false);
        }
        let mut next = entries.clone();
        next.remove(id);
        self.persist(&next)?;
        *entries = next;
        Ok(true)
    }
}

/// Writes the store, readable by the node only, atomically.
fn write_atomic(path: &Path, entries: &BTreeMap<String, Entry>) -> Result<(), String> {
    let file = File {
        version: FILE_VERSION,
        tokens: entries.values().cloned().collect(),
    };
    let mut json = serde_json::to_vec_pretty(&file).map_err(|e| format!("cannot encode: {e}"))?;
    json.push(b'\n');
    dmsc_auth::token::write_private_atomic(path, &json)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn a_token_reads_for_its_tenant_until_it_expires_and_survives_a_reopen() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join(READ_TOKENS_FILE);
        let store = ReadTokens::open(&path).expect("open");
        let (tok, info) = store
            .create("acme", Some(Duration::from_secs(60)), t(1000))
            .expect("create");
        assert!(is_read_token(&tok));
        assert_eq!(info.expires_at, Some(1060));
        assert_eq!(store.check(&tok, t(1059)).as_deref(), Ok("acme"));
        assert!(matches!(
            store.check(&tok, t(1060)),
            Err(ReadTokenError::Expired { at: 1060, .. })
        ));
        // Only a hash on disk, mode 0600.
        let text = std::fs::read_to_string(&path).expect("read");
        let secret = tok.rsplit('.').next().expect("secret");
        assert!(!text.contains(secret), "{text}");
        assert!(text.contains(&secret_hash(secret)));
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = ReadTokens::open(&path).expect("reopen");
        assert_eq!(again.check(&tok, t(1001)).as_deref(), Ok("acme"));
        assert_eq!(again.list(), vec![info]);
    }

    #[test]
    fn wrong_secrets_unknown_ids_and_revoked_tokens_are_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let store = ReadTokens::open(dir.path().join(READ_TOKENS_FILE)).expect("open");
        let (tok, info) = store.create("acme", None, t(0)).expect("create");
        assert_eq!(info.expires_at, None);
        assert_eq!(store.check(&tok, t(u32::MAX.into())).as_deref(), Ok("acme"));
        let other_secret = hex(&[7u8; SECRET_BYTES]);
        let forged = format!("{READ_TOKEN_PREFIX}.{}.{other_secret}", info.id);
        assert_eq!(
            store.check(&forged, t(1)),
            Err(ReadTokenError::Unknown(info.id.clone()))
        );
        for bad in [
            "",
            "dmsc-rt.",
            "dmsc-jt.0011223344556677.x",
            "dmsc-rt.zz.abc",
        ] {
            assert_eq!(
                store.check(bad, t(1)),
                Err(ReadTokenError::Malformed),
                "{bad}"
            );
        }
        assert_eq!(store.revoke(&info.id), Ok(true));
        assert_eq!(store.revoke(&info.id), Ok(false));
        assert!(matches!(
            store.check(&tok, t(1)),
            Err(ReadTokenError::Unknown(_))
        ));
    }

    #[test]
    fn bad_tenants_and_long_ttls_are_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join(READ_TOKENS_FILE);
        let store = ReadTokens::open(&path).expect("open");
        assert!(matches!(
            store.create("Acme Corp", None, t(0)),
            Err(ReadTokenError::BadTenant(_))
        ));
        assert!(matches!(
            store.create("acme", Some(MAX_TTL + Duration::from_secs(1)), t(0)),
            Err(ReadTokenError::TtlTooLong(_))
        ));
        assert!(!path.exists());
    }
}
