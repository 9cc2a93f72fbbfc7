//! `dmsc-keys`: per-node, per-tenant data keys, and crypto-shredding.
//!
//! Everything a node keeps at rest for a tenant (the tenant fields of its
//! audit lines, policy copies, cached cards, queued messages) is sealed with
//! that tenant's data key, so destroying the key destroys the data wherever
//! the bytes have been copied: deleting a tenant ("crypto-shredding") is one
//! small file operation per node instead of a hunt through logs and caches.
//!
//! # Layout
//!
//! `<data_dir>/tenant-keys/kek` holds the key-encryption key (KEK): 32
//! random bytes, mode 0600, made on first use. It is deliberately not the
//! node's TLS key (`node.key` rotates with its certificate; data sealed a year
//! ago must still open). `<data_dir>/tenant-keys/<tenant>.json` holds that
//! tenant's data keys, each wrapped (ChaCha20-Poly1305) by the KEK with the
//! tenant and key id as associated data, plus the tenant's bookkeeping: the
//! last operator statement applied and, after a delete, which key ids were
//! destroyed. Each file is replaced atomically (temp file, fsync, rename,
//! fsync of the directory), so a crash leaves the old or the new state.
//!
//! # Semantics
//!
//! * [`KeyStore::seal`] always uses the tenant's newest key, making the
//!   first one on first use; [`KeyStore::open`] works with any key still
//!   present, so data sealed before a [`KeyStore::rotate`] stays readable.
//! * [`KeyStore::shred`] overwrites the tenant's file with zeros, syncs, and
//!   replaces it with a tombstone that lists no keys but remembers which key
//!   ids existed: `open` of anything sealed with them says
//!   [`KeyError::Shredded`] (not "no key"), and `seal` for that tenant is
//!   refused ([`KeyError::SealRefused`]) until a later rotate makes a new key
//!   generation (ids keep counting up, never reused). Refusing rather than
//!   silently making a new key means a deleted tenant's data is not written
//!   again by accident; callers decide what to write instead (the audit log
//!   withholds the fields).
//! * Operator statements ([`KeyStore::apply`]) carry a sequence number and
//!   are applied at most once per tenant, in order, atomically with the key
//!   change they cause, so a replayed or older statement changes nothing.
//!
//! The AEAD is ring's ChaCha20-Poly1305 (ring is already in the build) with
//! random 96-bit nonces: safe for far more seals per key than a tenant makes
//! between rotations (the collision bound reaches 2^-32 after ~2^32 seals).
//! The associated data binds the tenant, the key id and a caller-chosen
//! context (e.g. `audit:<node>:<seq>`), so a sealed value cannot be moved to
//! another tenant, key or place without failing to open.

#![forbid(unsafe_code)]

mod fsutil;
mod token;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use ring::rand::{SecureRandom as _, SystemRandom};
use serde::{Deserialize, Serialize};

pub use token::{is_sealed, valid_tenant, Token, MAX_TOKEN, TOKEN_PREFIX};
use token::{NONCE_LEN, TAG_LEN};

/// The key store's directory inside the node's data dir.
pub const KEYS_DIR: &str = "tenant-keys";
/// The key-encryption key's file name inside [`KEYS_DIR`].
pub const KEK_FILE: &str = "kek";
const KEY_LEN: usize = 32;
const WRAP_DOMAIN: &str = "dmsc-tenant-key-v1";
const SEAL_DOMAIN: &str = "dmsc-sealed-v1";

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("tenant `{tenant}`: data key {key_id} was destroyed by a tenant delete (crypto-shredded); what it sealed cannot be read any more")]
    Shredded { tenant: String, key_id: u32 },
    #[error("tenant `{tenant}`: this node has no data key {key_id}; the value was sealed on another node (keys are per node) or this node's `tenant-keys/` directory was replaced")]
    NoKey { tenant: String, key_id: u32 },
    #[error("tenant `{tenant}`: its keys were deleted (crypto-shredded), so nothing new is sealed for it; an operator `dmsc-node tenant rotate-key` statement starts a new key generation")]
    SealRefused { tenant: String },
    #[error("`{tenant}` is not a tenant name (lowercase letters, digits and `-`, at most 63)")]
    BadTenant { tenant: String },
    #[error("not a sealed value: {0}")]
    Malformed(String),
    #[error("sealed value of tenant `{tenant}` (key {key_id}) does not open: it was altered, moved to another tenant or place, or sealed by another node")]
    Tampered { tenant: String, key_id: u32 },
    #[error("tenant key store `{path}`: {op} failed: {source}; check that the data directory exists and is writable by the node")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("tenant key store `{path}` is damaged: {reason}; restore it from a backup or move it aside (data sealed with its keys then cannot be opened)")]
    Corrupt { path: PathBuf, reason: String },
    #[error("the system random number generator failed")]
    Rng,
}

/// What an operator statement asks of every node's key store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyAction {
    /// Make a new data key; new data uses it, old data stays readable.
    RotateKey,
    /// Destroy every data key of the tenant (crypto-shredding).
    Delete,
}

impl KeyAction {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyAction::RotateKey => "rotate-key",
            KeyAction::Delete => "delete",
        }
    }
}

impl std::fmt::Display for KeyAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for KeyAction {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        match s {
            "rotate-key" => Ok(KeyAction::RotateKey),
            "delete" => Ok(KeyAction::Delete),
            other => Err(KeyError::Malformed(format!(
                "`{other}` is not a tenant key action (`rotate-key` or `delete`)"
            ))),
        }
    }
}

/// What [`KeyStore::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// A new key with this id is now the tenant's newest.
    Rotated { key_id: u32 },
    /// This many keys were destroyed. `new_key`: the delete was older than
    /// a rotate already applied here (this node missed it), so after
    /// destroying everything the store made the new generation that rotate
    /// asked for, with this id.
    Shredded { keys: usize, new_key: Option<u32> },
    /// A statement with this sequence number or a newer one was already
    /// applied; nothing changed.
    AlreadyApplied { applied_seq: u64 },
}

/// One tenant's key state, for status output (no key material).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TenantKeyInfo {
    pub tenant: String,
    /// Ids of the keys present, oldest first; the last one seals.
    pub keys: Vec<u32>,
    /// Whether a delete destroyed keys and no rotate followed it.
    pub shredded: bool,
    /// Key ids below this were destroyed by a delete.
    pub destroyed_below: u32,
    /// Sequence number of the last operator statement applied (0: none).
    pub applied_seq: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredKey {
    id: u32,
    /// Unix seconds.
    created_at: u64,
    /// base64url(nonce || KEK-sealed key || tag).
    wrapped: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantFile {
    v: u8,
    tenant: String,
    applied_seq: u64,
    /// The id the next key gets (ids start at 1 and are never reused).
    next_id: u32,
    /// Every key id below this was destroyed by a delete.
    destroyed_below: u32,
    /// A delete happened and no rotate since: seals are refused.
    sealing_refused: bool,
    /// Sequence number of the last delete statement applied (0: none).
    #[serde(default)]
    deleted_seq: u64,
    keys: Vec<StoredKey>,
}

impl TenantFile {
    fn new(tenant: &str) -> Self {
        TenantFile {
            v: 1,
            tenant: tenant.to_string(),
            applied_seq: 0,
            next_id: 1,
            destroyed_below: 0,
            sealing_refused: false,
            deleted_seq: 0,
            keys: Vec::new(),
        }
    }
}

struct Tenant {
    file: TenantFile,
    keys: BTreeMap<u32, LessSafeKey>,
}

impl Tenant {
    fn newest(&self) -> Option<(u32, &LessSafeKey)> {
        self.keys.iter().next_back().map(|(id, k)| (*id, k))
    }

    fn info(&self) -> TenantKeyInfo {
        TenantKeyInfo {
            tenant: self.file.tenant.clone(),
            keys: self.keys.keys().copied().collect(),
            shredded: self.file.sealing_refused,
            destroyed_below: self.file.destroyed_below,
            applied_seq: self.file.applied_seq,
        }
    }
}

/// A node's tenant keys. Cheap to share (`Arc<KeyStore>`); every method is
/// synchronous and touches the disk only to create, rotate or destroy keys.
pub struct KeyStore {
    dir: PathBuf,
    kek: LessSafeKey,
    rng: SystemRandom,
    nonces: Mutex<NoncePool>,
    tenants: RwLock<HashMap<String, Tenant>>,
}

/// Random nonces for [`KeyStore::seal`], read from the OS generator a page
/// at a time: the audit writer seals every tenant line, and one `getrandom`
/// system call per line was a visible share of a delegation's CPU. The
/// bytes are the same OS randomness, only fetched in bulk; each is handed
/// out once.
struct NoncePool {
    buf: [u8; NONCE_POOL],
    used: usize,
}

/// Bytes fetched per refill: 341 nonces.
const NONCE_POOL: usize = 4096;

impl NoncePool {
    fn new() -> Self {
        NoncePool {
            buf: [0; NONCE_POOL],
            used: NONCE_POOL,
        }
    }

    fn take(&mut self, rng: &SystemRandom) -> Result<[u8; NONCE_LEN], KeyError> {
        if self.used + NONCE_LEN > NONCE_POOL {
            rng.fill(&mut self.buf).map_err(|_| KeyError::Rng)?;
            self.used = 0;
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&self.buf[self.used..self.used + NONCE_LEN]);
        // Never hand the same bytes out twice.
        self.buf[self.used..self.used + NONCE_LEN].fill(0);
        self.used += NONCE_LEN;
        Ok(nonce)
    }
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn wrap_aad(tenant: &str, id: u32) -> Vec<u8> {
    format!("{WRAP_DOMAIN}\n{tenant}\n{id}").into_bytes()
}

fn seal_aad(tenant: &str, id: u32, context: &str) -> Vec<u8> {
    format!("{SEAL_DOMAIN}\n{tenant}\n{id}\n{context}").into_bytes()
}

fn aead_key(bytes: &[u8]) -> Option<LessSafeKey> {
    UnboundKey::new(&CHACHA20_POLY1305, bytes)
        .ok()
        .map(LessSafeKey::new)
}

impl KeyStore {
    /// Opens (creating if needed) `<data_dir>/tenant-keys/`: reads or makes
    /// the KEK and unwraps every tenant's keys. Blocking file I/O: call it
    /// at startup.
    pub fn load(data_dir: &Path) -> Result<KeyStore, KeyError> {
        let dir = data_dir.join(KEYS_DIR);
        create_private_dir(&dir)?;
        let rng = SystemRandom::new();
        let kek_path = dir.join(KEK_FILE);
        let kek_bytes = match std::fs::read(&kek_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut b = vec![0u8; KEY_LEN];
                rng.fill(&mut b).map_err(|_| KeyError::Rng)?;
                fsutil::write_atomic(&kek_path, &b)?;
                tracing::info!(path = %kek_path.display(), "created the tenant key-encryption key; back it up (see docs/tenant-keys.md)");
                b
            }
            Err(source) => {
                return Err(KeyError::Io {
                    path: kek_path,
                    op: "reading the key-encryption key",
                    source,
                })
            }
        };
        if kek_bytes.len() != KEY_LEN {
            return Err(KeyError::Corrupt {
                path: kek_path,
                reason: format!(
                    "the key-encryption key is {} bytes, not {KEY_LEN}",
                    kek_bytes.len()
                ),
            });
        }
        let kek = aead_key(&kek_bytes).ok_or_else(|| KeyError::Corrupt {
            path: kek_path.clone(),
            reason: "not usable as a ChaCha20-Poly1305 key".into(),
        })?;
        let store = KeyStore {
            dir,
            kek,
            rng,
            nonces: Mutex::new(NoncePool::new()),
            tenants: RwLock::new(HashMap::new()),
        };
        store.load_all()?;
        Ok(store)
    }

    /// The store's directory (`<data_dir>/tenant-keys`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn tenant_path(&self, tenant: &str) -> PathBuf {
        self.dir.join(format!("{tenant}.json"))
    }

    fn load_all(&self) -> Result<(), KeyError> {
        let rd = std::fs::read_dir(&self.dir).map_err(|source| KeyError::Io {
            path: self.dir.clone(),
            op: "listing the key store",
            source,
        })?;
        let mut map = HashMap::new();
        for entry in rd.flatten() {
            let name = entry.file_name();
            let Some(tenant) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if !valid_tenant(tenant) {
                continue;
            }
            let t = self.load_tenant(tenant)?;
            map.insert(tenant.to_string(), t);
        }
        *self.tenants.write().unwrap_or_else(|p| p.into_inner()) = map;
        Ok(())
    }

    fn load_tenant(&self, tenant: &str) -> Result<Tenant, KeyError> {
        let path = self.tenant_path(tenant);
        let corrupt = |reason: String| KeyError::Corrupt {
            path: path.clone(),
            reason,
        };
        let mut bytes = std::fs::read(&path).map_err(|source| KeyError::Io {
            path: path.clone(),
            op: "reading a tenant's keys",
            source,
        })?;
        if bytes.iter().all(|b| *b == 0) {
            // A delete was cut short after zeroing the old file: its
            // complete replacement waits in the temp file.
            let tmp = fsutil::tmp_path(&path);
            let next = std::fs::read(&tmp).ok().filter(|b| {
                serde_json::from_slice::<TenantFile>(b).is_ok_and(|f| f.tenant == tenant)
            });
            let Some(next) = next else {
                return Err(corrupt(
                    "the file is zeroed (a delete was interrupted) and no complete replacement is beside it".into(),
                ));
            };
            std::fs::rename(&tmp, &path).map_err(|source| KeyError::Io {
                path: path.clone(),
                op: "finishing an interrupted delete",
                source,
            })?;
            fsutil::sync_dir(&self.dir)?;
            tracing::warn!(path = %path.display(), "finished a tenant key delete that a crash interrupted");
            bytes = next;
        }
        let file: TenantFile = serde_json::from_slice(&bytes)
            .map_err(|e| corrupt(format!("not a tenant key file: {e}")))?;
        if file.v != 1 || file.tenant != tenant {
            return Err(corrupt(format!(
                "format v{} for tenant `{}` (expected v1 for `{tenant}`)",
                file.v, file.tenant
            )));
        }
        let mut keys = BTreeMap::new();
        for k in &file.keys {
            let mut buf = URL_SAFE_NO_PAD
                .decode(&k.wrapped)
                .map_err(|_| corrupt(format!("key {} is not base64url", k.id)))?;
            if buf.len() != NONCE_LEN + KEY_LEN + TAG_LEN {
                return Err(corrupt(format!("key {} has the wrong length", k.id)));
            }
            let mut nonce = [0u8; NONCE_LEN];
            nonce.copy_from_slice(&buf[..NONCE_LEN]);
            let plain = self
                .kek
                .open_in_place(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(wrap_aad(tenant, k.id)),
                    &mut buf[NONCE_LEN..],
                )
                .map_err(|_| {
                    corrupt(format!(
                        "key {} does not unwrap with this node's key-encryption key (was `kek` replaced?)",
                        k.id
                    ))
                })?;
            let key =
                aead_key(plain).ok_or_else(|| corrupt(format!("key {} is unusable", k.id)))?;
            keys.insert(k.id, key);
        }
        Ok(Tenant { file, keys })
    }

    fn save(&self, file: &TenantFile) -> Result<(), KeyError> {
        // Serializing plain strings and integers cannot fail.
        let bytes = serde_json::to_vec_pretty(file).unwrap_or_default();
        fsutil::write_atomic(&self.tenant_path(&file.tenant), &bytes)
    }

    /// A fresh data key with id `id` for `tenant`, and its KEK-wrapped form.
    fn new_key(&self, tenant: &str, id: u32) -> Result<(StoredKey, LessSafeKey), KeyError> {
        let mut key = [0u8; KEY_LEN];
        self.rng.fill(&mut key).map_err(|_| KeyError::Rng)?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| KeyError::Rng)?;
        let mut buf = key.to_vec();
        self.kek
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(wrap_aad(tenant, id)),
                &mut buf,
            )
            .map_err(|_| KeyError::Rng)?;
        let mut wrapped = nonce.to_vec();
        wrapped.extend_from_slice(&buf);
        let stored = StoredKey {
            id,
            created_at: now_secs(),
            wrapped: URL_SAFE_NO_PAD.encode(&wrapped),
        };
        let k = aead_key(&key).ok_or(KeyError::Rng)?;
        Ok((stored, k))
    }

    /// Applies `action` to `t`: computes the new file, writes it with one
    /// atomic replacement (after zeroing the old file for a delete), and
    /// only then changes the in-memory state, so a failed write changes
    /// nothing and a crash leaves the old or the new state.
    fn change(
        &self,
        t: &mut Tenant,
        action: KeyAction,
        seq: Option<u64>,
    ) -> Result<Applied, KeyError> {
        let mut file = t.file.clone();
        let tenant = file.tenant.clone();
        match action {
            KeyAction::RotateKey => {
                if let Some(seq) = seq {
                    if seq <= file.applied_seq {
                        return Ok(Applied::AlreadyApplied {
                            applied_seq: file.applied_seq,
                        });
                    }
                    file.applied_seq = seq;
                }
                let id = file.next_id;
                let (stored, key) = self.new_key(&tenant, id)?;
                file.next_id = id.saturating_add(1);
                file.sealing_refused = false;
                file.keys.push(stored);
                self.save(&file)?;
                t.file = file;
                t.keys.insert(id, key);
                Ok(Applied::Rotated { key_id: id })
            }
            KeyAction::Delete => {
                let mut regenerate = false;
                if let Some(seq) = seq {
                    if seq <= file.deleted_seq {
                        return Ok(Applied::AlreadyApplied {
                            applied_seq: file.applied_seq,
                        });
                    }
                    file.deleted_seq = seq;
                    // Anything applied after this delete's number, yet not a
                    // delete (that would have a higher deleted_seq), was a
                    // rotate: the delete arrived late.
                    regenerate = seq < file.applied_seq;
                    file.applied_seq = file.applied_seq.max(seq);
                }
                let destroyed = t.keys.len();
                file.keys.clear();
                file.destroyed_below = file.next_id;
                file.sealing_refused = true;
                let mut new_key = None;
                if regenerate {
                    let id = file.next_id;
                    let (stored, key) = self.new_key(&tenant, id)?;
                    file.next_id = id.saturating_add(1);
                    file.sealing_refused = false;
                    file.keys.push(stored);
                    new_key = Some((id, key));
                }
                let path = self.tenant_path(&tenant);
                // Serializing plain strings and integers cannot fail.
                let bytes = serde_json::to_vec_pretty(&file).unwrap_or_default();
                fsutil::write_atomic_then(&path, &bytes, || fsutil::overwrite_zeros(&path))?;
                t.file = file;
                t.keys.clear();
                let new_id = new_key.map(|(id, key)| {
                    t.keys.insert(id, key);
                    id
                });
                Ok(Applied::Shredded {
                    keys: destroyed,
                    new_key: new_id,
                })
            }
        }
    }

    /// Seals `plaintext` for `tenant` with its newest key (made on first
    /// use), bound to `context` (the same string must be given to
    /// [`Self::open`]). Returns the text form (`sealed:v1:…`).
    pub fn seal(&self, tenant: &str, context: &str, plaintext: &[u8]) -> Result<String, KeyError> {
        {
            let map = self.tenants.read().unwrap_or_else(|p| p.into_inner());
            if let Some(t) = map.get(tenant) {
                if t.file.sealing_refused {
                    return Err(KeyError::SealRefused {
                        tenant: tenant.to_string(),
                    });
                }
                if let Some((id, key)) = t.newest() {
                    return self.seal_with(tenant, id, key, context, plaintext);
                }
            }
        }
        if !valid_tenant(tenant) {
            return Err(KeyError::BadTenant {
                tenant: tenant.to_string(),
            });
        }
        let mut map = self.tenants.write().unwrap_or_else(|p| p.into_inner());
        let t = map.entry(tenant.to_string()).or_insert_with(|| Tenant {
            file: TenantFile::new(tenant),
            keys: BTreeMap::new(),
        });
        if t.file.sealing_refused {
            return Err(KeyError::SealRefused {
                tenant: tenant.to_string(),
            });
        }
        if t.newest().is_none() {
            self.change(t, KeyAction::RotateKey, None)?;
        }
        let (id, key) = t.newest().ok_or(KeyError::Rng)?;
        self.seal_with(tenant, id, key, context, plaintext)
    }

    fn seal_with(
        &self,
        tenant: &str,
        id: u32,
        key: &LessSafeKey,
        context: &str,
        plaintext: &[u8],
    ) -> Result<String, KeyError> {
        let nonce = self
            .nonces
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(&self.rng)?;
        // nonce | ciphertext | tag in one buffer, sealed in place.
        let mut sealed = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(plaintext);
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(seal_aad(tenant, id, context)),
                &mut sealed[NONCE_LEN..],
            )
            .map_err(|_| KeyError::Rng)?;
        sealed.extend_from_slice(tag.as_ref());
        Ok(token::encode(tenant, id, &sealed))
    }

    /// Opens a value from [`Self::seal`] with the same `context`, with
    /// whichever of the tenant's keys sealed it, if this node still has it.
    pub fn open(&self, context: &str, sealed: &str) -> Result<Vec<u8>, KeyError> {
        let tok = Token::parse(sealed)?;
        let map = self.tenants.read().unwrap_or_else(|p| p.into_inner());
        let t = map.get(&tok.tenant);
        let Some(key) = t.and_then(|t| t.keys.get(&tok.key_id)) else {
            let destroyed = t.is_some_and(|t| tok.key_id < t.file.destroyed_below);
            return Err(if destroyed {
                KeyError::Shredded {
                    tenant: tok.tenant,
                    key_id: tok.key_id,
                }
            } else {
                KeyError::NoKey {
                    tenant: tok.tenant,
                    key_id: tok.key_id,
                }
            });
        };
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&tok.sealed[..NONCE_LEN]);
        let mut body = tok.sealed[NONCE_LEN..].to_vec();
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(seal_aad(&tok.tenant, tok.key_id, context)),
                &mut body,
            )
            .map_err(|_| KeyError::Tampered {
                tenant: tok.tenant.clone(),
                key_id: tok.key_id,
            })?;
        let n = plain.len();
        body.truncate(n);
        Ok(body)
    }

    /// Adds a new key for `tenant` and returns its id: new seals use it, old
    /// data stays readable. After a delete this starts a new generation.
    pub fn rotate(&self, tenant: &str) -> Result<u32, KeyError> {
        self.apply_inner(tenant, KeyAction::RotateKey, None)
            .map(|a| match a {
                Applied::Rotated { key_id } => key_id,
                _ => 0,
            })
    }

    /// Destroys every key of `tenant` (crypto-shredding) and returns how
    /// many there were; later seals are refused until a rotate.
    pub fn shred(&self, tenant: &str) -> Result<usize, KeyError> {
        self.apply_inner(tenant, KeyAction::Delete, None)
            .map(|a| match a {
                Applied::Shredded { keys, .. } => keys,
                _ => 0,
            })
    }

    /// Applies an operator statement numbered `seq` for `tenant`, once: a
    /// rotate unless a statement with that number or a newer one was
    /// applied, a delete unless a delete with that number or a newer one was
    /// (a delete older than an applied rotate still shreds, then makes the
    /// new generation: see [`Applied::Shredded`]). The change and the
    /// numbers are written in one atomic file replacement.
    pub fn apply(&self, tenant: &str, action: KeyAction, seq: u64) -> Result<Applied, KeyError> {
        self.apply_inner(tenant, action, Some(seq))
    }

    fn apply_inner(
        &self,
        tenant: &str,
        action: KeyAction,
        seq: Option<u64>,
    ) -> Result<Applied, KeyError> {
        if !valid_tenant(tenant) {
            return Err(KeyError::BadTenant {
                tenant: tenant.to_string(),
            });
        }
        let mut map = self.tenants.write().unwrap_or_else(|p| p.into_inner());
        let t = map.entry(tenant.to_string()).or_insert_with(|| Tenant {
            file: TenantFile::new(tenant),
            keys: BTreeMap::new(),
        });
        self.change(t, action, seq)
    }

    /// Key state of one tenant, if this node has any for it.
    pub fn info(&self, tenant: &str) -> Option<TenantKeyInfo> {
        let map = self.tenants.read().unwrap_or_else(|p| p.into_inner());
        map.get(tenant).map(Tenant::info)
    }

    /// Key state of every tenant, by name.
    pub fn list(&self) -> Vec<TenantKeyInfo> {
        let map = self.tenants.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<TenantKeyInfo> = map.values().map(Tenant::info).collect();
        v.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        v
    }
}

fn create_private_dir(dir: &Path) -> Result<(), KeyError> {
    use std::os::unix::fs::DirBuilderExt as _;
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => Ok(()),
        Err(source) => Err(KeyError::Io {
            path: dir.to_path_buf(),
            op: "creating the key store directory",
            source,
        }),
    }
}

#[cfg(test)]
mod tests;
