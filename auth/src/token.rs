//! One-time, tenant-scoped join tokens.
//!
//! An operator creates a token for one agent of one tenant and hands it to
//! whoever deploys the agent; the agent redeems it once, in an enrollment
//! request, for a certificate. The token is `dmsc-jt.<id>.<secret>`: the id
//! (8 random bytes, hex) finds the entry and can be logged, the secret (32
//! random bytes, base64url) is never stored, only its SHA-256, compared in
//! constant time.
//!
//! The store is a small JSON file, rewritten atomically on every change
//! (temp file in the same directory, fsync, rename, fsync the directory) and
//! created mode 0600. Redeeming marks the token used *and persists it* before
//! reporting success, under the store's mutex: a crash right after a
//! successful redeem cannot make the token usable again, and of two
//! concurrent redeems exactly one wins. A refusal because the caller named a
//! different tenant or agent does not consume the token: the holder may have
//! mistyped, and the token stays bound to what the operator issued it for.
//!
//! The API is synchronous (file I/O under a mutex); async callers wrap it in
//! `spawn_blocking`. Joins are rare, so simplicity beats throughput here.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;

use crate::error::TokenError;

/// Prefix of every join token.
pub const TOKEN_PREFIX: &str = "dmsc-jt";
/// Suggested lifetime of a join token.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// Longest lifetime accepted.
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Entries expired longer than this are removed by [`TokenStore::prune`].
pub const PRUNE_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);

const ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;
/// Length of the base64url (no padding) encoding of the secret.
const SECRET_B64_LEN: usize = 43;

/// A join token as the store knows it, without its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: String,
    pub tenant: String,
    pub agent: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub used_at: Option<OffsetDateTime>,
    /// The local processes that may redeem it at a node's metadata
    /// endpoint (`None`: any holder, by enrollment only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binding: Option<Binding>,
}

/// Which local processes may redeem a token: those in a cgroup v2 group
/// (or below it) or those of one user.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Binding {
    /// A path relative to the cgroup2 mount, with a leading `/`.
    Cgroup(String),
    Uid(u32),
    /// A named network namespace (`/run/netns/<name>`): every process in it.
    Netns(String),
}

impl std::fmt::Display for Binding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Binding::Cgroup(c) => write!(f, "cgroup {c}"),
            Binding::Uid(u) => write!(f, "uid {u}"),
            Binding::Netns(n) => write!(f, "netns {n}"),
        }
    }
}

/// The process redeeming a token, as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub uid: u32,
    /// Its cgroup v2 group (relative to the mount, leading `/`).
    pub cgroup: String,
    /// The name of its network namespace, if it is a named one.
    pub netns: Option<String>,
}

impl Binding {
    /// Whether `holder` is one of the processes this binding names (a
    /// cgroup's descendants are in it).
    pub fn admits(&self, holder: &Holder) -> bool {
        match self {
            Binding::Uid(u) => *u == holder.uid,
            Binding::Netns(n) => holder.netns.as_deref() == Some(n.as_str()),
            Binding::Cgroup(c) => {
                let c = c.trim_end_matches('/');
                holder.cgroup == c
                    || holder
                        .cgroup
                        .strip_prefix(c)
                        .is_some_and(|rest| rest.starts_with('/'))
            }
        }
    }
}

/// Counts for the admin API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenCounts {
    /// Entries in the store.
    pub issued: usize,
    /// Redeemed.
    pub used: usize,
    /// Not redeemed and past their expiry.
    pub expired: usize,
    /// Neither used nor expired: still redeemable.
    pub active: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    #[serde(flatten)]
    info: TokenInfo,
    /// Hex SHA-256 of the secret part.
    secret_hash: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: u32,
    tokens: Vec<Entry>,
}

const FILE_VERSION: u32 = 1;

/// The persisted set of join tokens. `Send + Sync`; share it in an `Arc`.
#[derive(Debug)]
pub struct TokenStore {
    path: PathBuf,
    entries: Mutex<BTreeMap<String, Entry>>,
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn secret_hash(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

/// Equality whose time does not depend on where the inputs differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn check_name(what: &'static str, value: &str) -> Result<(), TokenError> {
    if crate::is_valid_name(value) {
        Ok(())
    } else {
        Err(TokenError::InvalidName {
            what,
            value: crate::jwt::shown(value),
        })
    }
}

/// Splits `dmsc-jt.<id>.<secret>`, checking the shape of both parts.
fn split_token(token: &str) -> Result<(&str, &str), TokenError> {
    let rest = token
        .strip_prefix(TOKEN_PREFIX)
        .and_then(|r| r.strip_prefix('.'))
        .ok_or_else(|| TokenError::Malformed(format!("does not start with `{TOKEN_PREFIX}.`")))?;
    let (id, secret) = rest
        .split_once('.')
        .ok_or_else(|| TokenError::Malformed("expected `dmsc-jt.<id>.<secret>`".to_owned()))?;
    if id.len() != ID_BYTES * 2
        || !id
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    {
        return Err(TokenError::Malformed(format!(
            "the id must be {} lowercase hex digits",
            ID_BYTES * 2
        )));
    }
    if secret.len() != SECRET_B64_LEN
        || URL_SAFE_NO_PAD
            .decode(secret)
            .map_or(true, |s| s.len() != SECRET_BYTES)
    {
        return Err(TokenError::Malformed(format!(
            "the secret must be {SECRET_BYTES} bytes in base64url"
        )));
    }
    Ok((id, secret))
}

impl TokenStore {
    /// Opens the store at `path`, creating an empty one (mode 0600) if the
    /// file does not exist. The directory must exist.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, TokenError> {
        let path = path.as_ref().to_path_buf();
        let store_err = |detail: String| TokenError::Store {
            path: path.display().to_string(),
            detail,
        };
        let entries = match std::fs::read(&path) {
            Ok(bytes) => {
                if let Ok(meta) = std::fs::metadata(&path) {
                    let mode = meta.permissions().mode() & 0o777;
                    if mode & 0o077 != 0 {
                        tracing::warn!(
                            path = %path.display(),
                            mode = format!("{mode:o}"),
                            "join token store is readable by others; it should be 0600"
                        );
                    }
                }
                let file: File = serde_json::from_slice(&bytes)
                    .map_err(|e| store_err(format!("not a join token store: {e}")))?;
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
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let empty = BTreeMap::new();
                write_atomic(&path, &empty).map_err(store_err)?;
                empty
            }
            Err(e) => return Err(store_err(format!("cannot read: {e}"))),
        };
        Ok(TokenStore {
            path,
            entries: Mutex::new(entries),
        })
    }

    /// The file backing the store.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates a token for `agent` of `tenant`, valid for `ttl` from now.
    /// Returns the token (shown once, never stored) and its info.
    pub fn create(
        &self,
        tenant: &str,
        agent: &str,
        ttl: Duration,
    ) -> Result<(String, TokenInfo), TokenError> {
        self.create_at(tenant, agent, ttl, OffsetDateTime::now_utc())
    }

    /// [`create`](Self::create) with an explicit creation time.
    pub fn create_at(
        &self,
        tenant: &str,
        agent: &str,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<(String, TokenInfo), TokenError> {
        self.create_bound(tenant, agent, ttl, None, now)
    }

    /// [`create_at`](Self::create_at) for a token only the processes of
    /// `binding` may redeem (see [`redeem_held`](Self::redeem_held)).
    pub fn create_bound(
        &self,
        tenant: &str,
        agent: &str,
        ttl: Duration,
        binding: Option<Binding>,
        now: OffsetDateTime,
    ) -> Result<(String, TokenInfo), TokenError> {
        check_name("tenant", tenant)?;
        check_name("agent", agent)?;
        if ttl.is_zero() || ttl > MAX_TTL {
            return Err(TokenError::InvalidTtl(format!(
                "of {} s is outside 1 s to {} days",
                ttl.as_secs(),
                MAX_TTL.as_secs() / 86_400
            )));
        }
        let mut rng = rand::rngs::OsRng;
        let mut id_bytes = [0u8; ID_BYTES];
        let mut secret_bytes = [0u8; SECRET_BYTES];
        rng.fill_bytes(&mut id_bytes);
        rng.fill_bytes(&mut secret_bytes);
        let id = hex(&id_bytes);
        let secret = URL_SAFE_NO_PAD.encode(secret_bytes);
        let info = TokenInfo {
            id: id.clone(),
            tenant: tenant.to_owned(),
            agent: agent.to_owned(),
            created_at: now,
            // ttl is at most 30 days, so this cannot overflow a year 9999 date
            // from any real clock; saturate anyway.
            expires_at: now
                .checked_add(time::Duration::seconds(
                    i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
                ))
                .unwrap_or(now),
            used_at: None,
            binding,
        };
        let entry = Entry {
            info: info.clone(),
            secret_hash: secret_hash(&secret),
        };
        self.update(|entries| {
            if entries.contains_key(&id) {
                // 2^-64 per pair; refuse rather than overwrite.
                return Err(TokenError::Store {
                    path: self.path.display().to_string(),
                    detail: "random id collision, try again".to_owned(),
                });
            }
            entries.insert(id.clone(), entry);
            Ok(())
        })?;
        tracing::info!(id, tenant, agent, expires_at = %crate::rfc3339(&info.expires_at), "join token created");
        Ok((format!("{TOKEN_PREFIX}.{id}.{secret}"), info))
    }

    /// Redeems a token at time `now`. `expect` is what the caller claims to
    /// be (tenant and agent, each optional); a mismatch is refused without
    /// consuming the token. On success the token is marked used and the
    /// store persisted before this returns.
    pub fn redeem(
        &self,
        token: &str,
        expect: (Option<&str>, Option<&str>),
        now: OffsetDateTime,
    ) -> Result<TokenInfo, TokenError> {
        self.redeem_inner(token, expect, None, now)
    }

    /// Redeems a bound token for the local process `holder`: refused,
    /// without consuming it, when the token has no binding or its binding
    /// does not admit the holder.
    pub fn redeem_held(
        &self,
        token: &str,
        holder: &Holder,
        now: OffsetDateTime,
    ) -> Result<TokenInfo, TokenError> {
        self.redeem_inner(token, (None, None), Some(holder), now)
    }

    fn redeem_inner(
        &self,
        token: &str,
        expect: (Option<&str>, Option<&str>),
        holder: Option<&Holder>,
        now: OffsetDateTime,
    ) -> Result<TokenInfo, TokenError> {
        let (id, secret) = split_token(token)?;
        let hash = secret_hash(secret);
        self.update(|entries| {
            let entry = entries.get_mut(id).ok_or(TokenError::Unknown)?;
            if !ct_eq(entry.secret_hash.as_bytes(), hash.as_bytes()) {
                return Err(TokenError::Unknown);
            }
            let info = &mut entry.info;
            if let Some(at) = info.used_at {
                return Err(TokenError::Used {
                    id: id.to_owned(),
                    at,
                });
            }
            if now >= info.expires_at {
                return Err(TokenError::Expired {
                    id: id.to_owned(),
                    at: info.expires_at,
                });
            }
            if let (None, Some(b)) = (holder, &info.binding) {
                // A bound token is for its processes at the metadata
                // endpoint, never for a remote enrollment.
                return Err(TokenError::HolderMismatch {
                    id: id.to_owned(),
                    bound: b.to_string(),
                    caller: "a remote enrollment (redeem it at the node's metadata endpoint)"
                        .into(),
                });
            }
            if let Some(h) = holder {
                match &info.binding {
                    None => return Err(TokenError::NotBound { id: id.to_owned() }),
                    Some(b) if !b.admits(h) => {
                        return Err(TokenError::HolderMismatch {
                            id: id.to_owned(),
                            bound: b.to_string(),
                            caller: format!(
                                "uid {} in cgroup {}{}",
                                h.uid,
                                h.cgroup,
                                h.netns
                                    .as_ref()
                                    .map(|n| format!(" in netns {n}"))
                                    .unwrap_or_default()
                            ),
                        })
                    }
                    Some(_) => {}
                }
            }
            let (tenant, agent) = expect;
            if let Some(tenant) = tenant.filter(|t| *t != info.tenant) {
                return Err(TokenError::TenantMismatch {
                    id: id.to_owned(),
                    token_tenant: info.tenant.clone(),
                    expected: crate::jwt::shown(tenant),
                });
            }
            if let Some(agent) = agent.filter(|a| *a != info.agent) {
                return Err(TokenError::AgentMismatch {
                    id: id.to_owned(),
                    token_agent: info.agent.clone(),
                    expected: crate::jwt::shown(agent),
                });
            }
            info.used_at = Some(now);
            Ok(info.clone())
        })
        .inspect(|info| {
            tracing::info!(
                id = info.id,
                tenant = info.tenant,
                agent = info.agent,
                "join token redeemed"
            )
        })
    }

    /// All entries, oldest first.
    pub fn list(&self) -> Vec<TokenInfo> {
        let mut all: Vec<TokenInfo> = self.lock().values().map(|e| e.info.clone()).collect();
        all.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        all
    }

    /// Issued / used / expired / active counts at `now`.
    pub fn counts(&self, now: OffsetDateTime) -> TokenCounts {
        let entries = self.lock();
        let mut c = TokenCounts {
            issued: entries.len(),
            ..TokenCounts::default()
        };
        for e in entries.values() {
            if e.info.used_at.is_some() {
                c.used += 1;
            } else if now >= e.info.expires_at {
                c.expired += 1;
            } else {
                c.active += 1;
            }
        }
        c
    }

    /// Removes entries (used or not) that expired more than
    /// [`PRUNE_AFTER`] before `now`; returns how many. Kept that long so
    /// "already used" / "expired" stay precise answers for a while.
    pub fn prune(&self, now: OffsetDateTime) -> Result<usize, TokenError> {
        let cutoff = now - PRUNE_AFTER;
        self.update(|entries| {
            let before = entries.len();
            entries.retain(|_, e| e.info.expires_at >= cutoff);
            Ok(before - entries.len())
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        // A panic while holding the lock cannot leave the map half-updated:
        // `update` only commits a fully built copy.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies `f` to a copy of the entries, persists the copy, then makes it
    /// current; nothing changes (in memory or on disk) if `f` or the write fails.
    fn update<T>(
        &self,
        f: impl FnOnce(&mut BTreeMap<String, Entry>) -> Result<T, TokenError>,
    ) -> Result<T, TokenError> {
        let mut entries = self.lock();
        let mut next = entries.clone();
        let out = f(&mut next)?;
        write_atomic(&self.path, &next).map_err(|detail| TokenError::Store {
            path: self.path.display().to_string(),
            detail,
        })?;
        *entries = next;
        Ok(out)
    }
}

/// Writes the store (see [`write_private_atomic`]).
fn write_atomic(path: &Path, entries: &BTreeMap<String, Entry>) -> Result<(), String> {
    let file = File {
        version: FILE_VERSION,
        tokens: entries.values().cloned().collect(),
    };
    let mut json = serde_json::to_vec_pretty(&file).map_err(|e| format!("cannot encode: {e}"))?;
    json.push(b'\n');
    write_private_atomic(path, &json)
}

/// Replaces the file at `path` with `bytes`, readable by its owner only:
/// a temp file (0600) in the same directory, fsync, rename over the old
/// file, fsync the directory so the rename itself is durable. A crash
/// leaves the old file or the new one, never a mix.
pub fn write_private_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| "the path has no file name".to_owned())?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write (in `{}`): {e}", dir.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    fn store() -> (tempfile::TempDir, TokenStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = TokenStore::open(dir.path().join("tokens.json")).expect("open");
        (dir, store)
    }

    #[test]
    fn token_format() {
        let (_d, s) = store();
        let (token, info) = s.create("acme", "bot-1", DEFAULT_TTL).expect("create");
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0], "dmsc-jt");
        assert_eq!(parts[1], info.id);
        assert_eq!(parts[1].len(), 16);
        assert_eq!(URL_SAFE_NO_PAD.decode(parts[2]).expect("b64").len(), 32);
        assert_eq!(info.expires_at - info.created_at, time::Duration::hours(1));
        // The secret never reaches the disk, its hash does.
        let disk = std::fs::read_to_string(s.path()).expect("read");
        assert!(!disk.contains(parts[2]));
        assert!(disk.contains(&secret_hash(parts[2])));
    }

    #[test]
    fn a_bound_token_is_redeemed_only_by_its_processes_and_a_refusal_keeps_it() {
        let (_d, s) = store();
        let cg = Some(Binding::Cgroup("/agents/billing".into()));
        let (token, _) = s
            .create_bound("acme", "billing", DEFAULT_TTL, cg, now())
            .expect("create");
        let holder = |uid, cgroup: &str| Holder {
            uid,
            cgroup: cgroup.into(),
            netns: None,
        };
        for wrong in ["/agents/billing2", "/agents", "/other/agents/billing"] {
            let e = s
                .redeem_held(&token, &holder(0, wrong), now())
                .expect_err(wrong);
            assert_eq!(e.code(), "token_holder_mismatch", "{wrong}: {e}");
        }
        // Below the group counts as in it; the token was not spent above.
        let info = s
            .redeem_held(&token, &holder(1000, "/agents/billing/worker-1"), now())
            .expect("its own process");
        assert_eq!(
            (info.tenant.as_str(), info.agent.as_str()),
            ("acme", "billing")
        );
        assert_eq!(
            s.redeem_held(&token, &holder(1000, "/agents/billing"), now())
                .expect_err("once")
                .code(),
            "token_used"
        );
        // By uid.
        let (token, _) = s
            .create_bound("acme", "bot", DEFAULT_TTL, Some(Binding::Uid(1001)), now())
            .expect("create");
        assert!(s.redeem_held(&token, &holder(1002, "/"), now()).is_err());
        assert!(s.redeem_held(&token, &holder(1001, "/"), now()).is_ok());
        // By network namespace.
        let (token, _) = s
            .create_bound(
                "acme",
                "boxed",
                DEFAULT_TTL,
                Some(Binding::Netns("agents-1".into())),
                now(),
            )
            .expect("create");
        assert!(s.redeem_held(&token, &holder(0, "/"), now()).is_err());
        let mut inside = holder(0, "/");
        inside.netns = Some("agents-1".into());
        assert!(s.redeem_held(&token, &inside, now()).is_ok());
        // A token with no binding is not for the metadata endpoint (and
        // stays usable for enrollment).
        let (token, _) = s.create("acme", "bot", DEFAULT_TTL).expect("create");
        let e = s
            .redeem_held(&token, &holder(0, "/x"), now())
            .expect_err("unbound");
        assert_eq!(e.code(), "token_not_bound");
        assert!(s.redeem(&token, (None, None), now()).is_ok());
        // The binding survives a reopen.
        let (token, _) = s
            .create_bound("acme", "bot", DEFAULT_TTL, Some(Binding::Uid(7)), now())
            .expect("create");
        let again = TokenStore::open(s.path()).expect("reopen");
        // Not at enrollment (no holder), and that refusal does not spend it.
        assert_eq!(
            again
                .redeem(&token, (None, None), now())
                .expect_err("bound")
                .code(),
            "token_holder_mismatch"
        );
        assert!(again.redeem_held(&token, &holder(7, "/"), now()).is_ok());
    }

    #[test]
    fn create_validates() {
        let (_d, s) = store();
        let e = s
            .create("Acme", "bot", DEFAULT_TTL)
            .expect_err("bad tenant");
        assert_eq!(e.code(), "token_invalid_name");
        assert!(s.create("acme", "-bot", DEFAULT_TTL).is_err());
        assert!(s.create("acme", "bot", Duration::ZERO).is_err());
        let e = s
            .create("acme", "bot", MAX_TTL + Duration::from_secs(1))
            .expect_err("too long");
        assert_eq!(e.code(), "token_invalid_ttl");
        assert!(s.create("acme", "bot", MAX_TTL).is_ok());
    }

    #[test]
    fn redeem_once() {
        let (_d, s) = store();
        let (token, _) = s.create("acme", "bot", DEFAULT_TTL).expect("create");
        let t = now();
        let info = s
            .redeem(&token, (Some("acme"), Some("bot")), t)
            .expect("redeem");
        assert_eq!(info.used_at, Some(t));
        assert_eq!((info.tenant.as_str(), info.agent.as_str()), ("acme", "bot"));
        let e = s.redeem(&token, (None, None), t).expect_err("reuse");
        assert!(matches!(e, TokenError::Used { .. }), "{e}");
        assert!(e.reason().contains("was already used at"), "{e}");
    }

    #[test]
    fn wrong_secret_is_unknown_and_does_not_consume() {
        let (_d, s) = store();
        let (token, info) = s.create("acme", "bot", DEFAULT_TTL).expect("create");
        let other = URL_SAFE_NO_PAD.encode([7u8; 32]);
        let forged = format!("dmsc-jt.{}.{other}", info.id);
        assert_eq!(
            s.redeem(&forged, (None, None), now()),
            Err(TokenError::Unknown)
        );
        let unknown = format!("dmsc-jt.0000000000000000.{other}");
        assert_eq!(
            s.redeem(&unknown, (None, None), now()),
            Err(TokenError::Unknown)
        );
        assert!(s.redeem(&token, (None, None), now()).is_ok());
    }

    #[test]
    fn malformed() {
        let (_d, s) = store();
        for bad in [
            "",
            "dmsc-jt",
            "dmsc-jt.",
            "jt.0011223344556677.x",
            "dmsc-jt.0011223344556677",
            "dmsc-jt.00112233445566.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "dmsc-jt.00112233445566GG.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "dmsc-jt.0011223344556677.AAAA",
            "dmsc-jt.0011223344556677.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA+",
        ] {
            let e = s.redeem(bad, (None, None), now()).expect_err(bad);
            assert_eq!(e.code(), "token_malformed", "{bad}: {e}");
        }
    }

    #[test]
    fn expired() {
        let (_d, s) = store();
        let created = now() - time::Duration::hours(2);
        let (token, info) = s
            .create_at("acme", "bot", DEFAULT_TTL, created)
            .expect("create");
        let e = s.redeem(&token, (None, None), now()).expect_err("expired");
        assert_eq!(
            e,
            TokenError::Expired {
                id: info.id.clone(),
                at: info.expires_at
            }
        );
        assert!(e
            .reason()
            .starts_with(&format!("join token `{}` expired at 20", info.id)));
        // Not consumed either: at a time inside its life it would still work.
        assert!(s
            .redeem(&token, (None, None), created + time::Duration::minutes(30))
            .is_ok());
    }

    #[test]
    fn mismatch_does_not_consume() {
        let (_d, s) = store();
        let (token, info) = s.create("acme", "bot", DEFAULT_TTL).expect("create");
        let e = s
            .redeem(&token, (Some("other"), None), now())
            .expect_err("tenant");
        assert_eq!(
            e.reason(),
            format!("join token `{}` is for tenant `acme`, not `other`", info.id)
        );
        let e = s
            .redeem(&token, (Some("acme"), Some("nope")), now())
            .expect_err("agent");
        assert_eq!(e.code(), "token_agent_mismatch");
        // An agent named without a tenant is checked too.
        let e = s
            .redeem(&token, (None, Some("nope")), now())
            .expect_err("agent alone");
        assert_eq!(e.code(), "token_agent_mismatch");
        assert!(s.redeem(&token, (Some("acme"), None), now()).is_ok());
    }

    #[test]
    fn persists_across_reopen_with_mode_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokens.json");
        let (used, unused) = {
            let s = TokenStore::open(&path).expect("open");
            let (a, _) = s.create("acme", "a", DEFAULT_TTL).expect("a");
            let (b, _) = s.create("acme", "b", DEFAULT_TTL).expect("b");
            s.redeem(&a, (None, None), now()).expect("redeem");
            (a, b)
        };
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let s = TokenStore::open(&path).expect("reopen");
        assert!(matches!(
            s.redeem(&used, (None, None), now()),
            Err(TokenError::Used { .. })
        ));
        assert!(s.redeem(&unused, (None, None), now()).is_ok());
        // No temp files left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("tokens.json")]);
    }

    #[test]
    fn concurrent_redeem_exactly_one_wins() {
        let (_d, s) = store();
        let s = Arc::new(s);
        for _ in 0..5 {
            let (token, _) = s.create("acme", "bot", DEFAULT_TTL).expect("create");
            let n = 8;
            let barrier = Arc::new(Barrier::new(n));
            let handles: Vec<_> = (0..n)
                .map(|_| {
                    let (s, b, token) = (s.clone(), barrier.clone(), token.clone());
                    std::thread::spawn(move || {
                        b.wait();
                        s.redeem(&token, (None, None), now())
                    })
                })
                .collect();
            let results: Vec<_> = handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect();
            let wins = results.iter().filter(|r| r.is_ok()).count();
            assert_eq!(wins, 1, "{results:?}");
            assert!(results
                .iter()
                .filter_map(|r| r.as_ref().err())
                .all(|e| matches!(e, TokenError::Used { .. })));
        }
    }

    #[test]
    fn counts_and_prune() {
        let (_d, s) = store();
        let t = now();
        let (a, _) = s.create_at("acme", "a", DEFAULT_TTL, t).expect("a");
        s.create_at("acme", "b", DEFAULT_TTL, t).expect("b");
        s.create_at("acme", "c", DEFAULT_TTL, t - time::Duration::days(9))
            .expect("c");
        s.create_at("acme", "d", DEFAULT_TTL, t - time::Duration::days(2))
            .expect("d");
        s.redeem(&a, (None, None), t).expect("redeem");
        assert_eq!(
            s.counts(t),
            TokenCounts {
                issued: 4,
                used: 1,
                expired: 2,
                active: 1
            }
        );
        assert_eq!(s.prune(t).expect("prune"), 1);
        // Oldest first; a and b share a creation time.
        let mut agents: Vec<String> = s.list().into_iter().map(|i| i.agent).collect();
        assert_eq!(agents.remove(0), "d");
        agents.sort();
        assert_eq!(agents, vec!["a", "b"]);
        assert_eq!(TokenStore::open(s.path()).expect("reopen").list().len(), 3);
    }

    #[test]
    fn corrupt_store_is_refused_with_its_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokens.json");
        std::fs::write(&path, b"{nope").expect("write");
        let e = TokenStore::open(&path).expect_err("corrupt");
        assert_eq!(e.code(), "token_store");
        assert!(e.reason().contains("tokens.json"), "{e}");
        let e = TokenStore::open(dir.path().join("missing-dir/tokens.json")).expect_err("no dir");
        assert!(e.reason().contains("missing-dir"), "{e}");
    }

    #[test]
    fn constant_time_eq() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}
