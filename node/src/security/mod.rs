//! The node's security offload: the credentials it presents, the ones it
//! issues, the revocations it enforces, the callers it authenticates and
//! the audit trail it keeps. Agents carry none of this logic.
//!
//! - Credentials are reloaded when their files change (`control::credentials::watch_credentials`):
//!   new overlay and ingress handshakes use them at once, live connections
//!   stay up. A CA file with two roots verifies both during a root rotation.
//! - Agents enroll with a one-time, tenant-scoped join token (`POST
//!   /v1/enroll` on a TLS ingress) and renew with their current certificate
//!   (`POST /v1/renew`, mTLS). The tenant and agent of a certificate come
//!   from the token or the presented certificate, never from the request.
//! - Revocations are statements signed by the operator CA; they are
//!   persisted in `<data_dir>/revoked.jsonl`, re-published by every node
//!   that learns them (`revoked/<serial>` in its gossip state, so a node that
//!   was away learns them from anyone), and enforced by the overlay
//!   verifiers and the ingress on every request.
//! - Tenant data keys ([`tenant_keys`]): the tenant payload of audit lines is
//!   sealed with the tenant's key in the audit writer; operator `rotate-key`
//!   / `delete` statements spread like revocations (`tenant-key/<tenant>`)
//!   and a delete destroys this node's keys (crypto-shredding).
//! - Every decision goes to the audit log ([`Security::record`]); appends
//!   never wait on the disk unless the writer is 64k entries behind.
//! - Enrollment and renewal are rate-limited per source address, and their
//!   failures are audited one by one only up to a sample per address and
//!   window, then summed into one entry per window ([`throttle`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use dmsc_audit::{AuditHandle, Event};
use dmsc_auth::token::TokenStore;
use dmsc_auth::JwtValidator;
use dmsc_transport::pki::{AgentKey, NodeIssuer};
use dmsc_transport::tls::AgentIdentity;
use dmsc_transport::{NodeIdentity, Overlay, Revocation, RevocationSet};
use hyper::StatusCode;
use rustls::pki_types::CertificateDer;
use serde::Serialize;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::config::NodeConfig;

pub mod policies;
pub mod read_tokens;
pub mod tenant_keys;
pub mod throttle;

fn not_hosted(issuer: &NodeIssuer, tenant: &str) -> Refusal {
    Refusal::new(
        StatusCode::FORBIDDEN,
        "tenant_not_hosted",
        format!(
            "this node's issuing certificate may only issue for tenants `{}`, not `{tenant}`",
            issuer.tenants.as_deref().unwrap_or_default().join("`, `")
        ),
    )
}

/// How long a validated JWT is trusted without checking it again.
pub const JWT_CACHE_TTL: Duration = Duration::from_secs(60);
/// Distinct tokens remembered at most.
const JWT_CACHE_MAX: usize = 10_000;

/// Why the node's trust state could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error(transparent)]
    Transport(#[from] dmsc_transport::TransportError),
    #[error("cannot create the data directory `{}`: {source}", path.display())]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin token `{}`: {why}; fix or remove the file (a new one is made when it is missing)", path.display())]
    AdminToken { path: PathBuf, why: String },
    #[error("join token store: {0}")]
    Tokens(#[from] dmsc_auth::TokenError),
    #[error(transparent)]
    ReadTokens(#[from] read_tokens::ReadTokenError),
    #[error("jwt: {0}")]
    Jwt(#[from] dmsc_auth::AuthError),
    #[error("jwt: set jwks_file or jwks_url")]
    NoJwksSource,
    #[error("audit log: {0}")]
    Audit(#[from] dmsc_audit::AuditError),
    #[error("tenant keys: {0}")]
    TenantKeys(#[from] tenant_keys::TenantKeyError),
}

/// The admin token file in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Reads the admin token (creating it, 0600, on first start) and returns
/// its hash. Mutating admin calls (onboarding agents, join tokens,
/// revocations) need it: the admin port is on localhost, but so are the
/// agents of every tenant, and none of them may mint another tenant's
/// credentials.
fn admin_token(path: &Path) -> Result<[u8; 32], SecurityError> {
    use sha2::Digest;
    use std::os::unix::fs::PermissionsExt;
    let unusable = |why: String| SecurityError::AdminToken {
        path: path.to_path_buf(),
        why,
    };
    let token = match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => {
            if let Ok(m) = std::fs::metadata(path) {
                if m.permissions().mode() & 0o077 != 0 {
                    warn!(path = %path.display(), mode = format!("{:o}", m.permissions().mode() & 0o777), "the admin token is readable by other users: chmod 600 it");
                }
            }
            t.trim().to_string()
        }
        Ok(_) => return Err(unusable("the file is empty".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let t = format!(
                "{:032x}{:032x}",
                rand::random::<u128>(),
                rand::random::<u128>()
            );
            dmsc_transport::pki::write_file(path, &format!("{t}\n"), 0o600)?;
            info!(path = %path.display(), "created the admin token (needed by `token create`, `revoke apply`, POST /v1/agents)");
            t
        }
        Err(e) => return Err(unusable(e.to_string())),
    };
    Ok(sha2::Sha256::digest(token.as_bytes()).into())
}

/// Audit entries allowed to wait for queue room at once (each is a task).
const MAX_AUDIT_WAITERS: usize = 4096;

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

/// A refusal with the status to answer and the reason to give.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub status: StatusCode,
    /// Stable machine code (`token_used`, `jwt_expired`, `cert_revoked`...).
    pub code: String,
    pub reason: String,
}

impl Refusal {
    pub fn new(status: StatusCode, code: impl Into<String>, reason: impl Into<String>) -> Self {
        Refusal {
            status,
            code: code.into(),
            reason: reason.into(),
        }
    }
}

/// What an agent gets back from enrollment or renewal.
#[derive(Debug, Clone, Serialize)]
pub struct EnrollResponse {
    pub spiffe_id: String,
    /// PEM, leaf first, then the node's issuing certificate.
    pub certificate_chain: String,
    /// PEM; only when the node generated the key (no CSR was sent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
    /// The mesh CA bundle (PEM) to verify nodes with.
    pub ca: String,
    pub serial: String,
    /// RFC 3339.
    pub not_after: String,
}

/// TLS settings of one agent-facing listener, swapped on credential reload.
pub struct TlsIngress {
    acceptor: RwLock<TlsAcceptor>,
    client_certs: bool,
    allow_tls12: bool,
}

impl TlsIngress {
    pub fn new(
        identity: &NodeIdentity,
        client_certs: bool,
        allow_tls12: bool,
    ) -> Result<Self, SecurityError> {
        Ok(TlsIngress {
            acceptor: RwLock::new(Self::build(identity, client_certs, allow_tls12)?),
            client_certs,
            allow_tls12,
        })
    }

    fn build(
        identity: &NodeIdentity,
        client_certs: bool,
        allow_tls12: bool,
    ) -> Result<TlsAcceptor, SecurityError> {
        let cfg = dmsc_transport::tls::ingress_server_config(identity, client_certs, allow_tls12)?;
        Ok(TlsAcceptor::from(Arc::new(cfg)))
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        read(&self.acceptor).clone()
    }

    fn reload(&self, identity: &NodeIdentity) -> Result<(), SecurityError> {
        *write(&self.acceptor) = Self::build(identity, self.client_certs, self.allow_tls12)?;
        Ok(())
    }
}

/// The files a node's credentials come from.
#[derive(Debug, Clone)]
struct Paths {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    issuer: Option<(PathBuf, PathBuf)>,
    revoked: PathBuf,
}

/// The security state of one node.
pub struct Security {
    me: String,
    identity: RwLock<Arc<NodeIdentity>>,
    pub revoked: Arc<RevocationSet>,
    /// Tenant policies in force here (`<data_dir>/policies/`).
    pub policies: Arc<crate::security::policies::PolicyStore>,
    issuer: RwLock<Option<Arc<NodeIssuer>>>,
    tokens: TokenStore,
    pub jwt: Option<JwtValidator>,
    pub audit: Option<AuditHandle>,
    /// Per-tenant data keys (seal/open of tenant data at rest: audit
    /// payload, and whatever else the node persists for a tenant) and the
    /// operator statements that rotate or destroy them.
    pub tenant_keys: Arc<tenant_keys::TenantKeys>,
    issued: AtomicU64,
    reloads: AtomicU64,
    pub metrics: crate::metrics::SecurityMetrics,
    agent_ttl: Duration,
    paths: Paths,
    /// The CA bundle as PEM, handed to enrolling agents (follows reloads).
    ca_pem: RwLock<String>,
    /// Audit appends waiting for queue room (bounded: see `record`).
    audit_waiting: Arc<std::sync::atomic::AtomicUsize>,
    /// SHA-256 of the admin token that mutating admin calls must present.
    admin_token_hash: [u8; 32],
    /// Tenant-scoped, read-only admin tokens (`dmsc-node admin-token create`).
    pub read_tokens: read_tokens::ReadTokens,
    /// Recently validated bearer tokens (by SHA-256): see `validate_jwt`.
    jwt_cache:
        Mutex<std::collections::HashMap<[u8; 32], (dmsc_auth::JwtCaller, std::time::Instant)>>,
    tls: Mutex<Vec<Arc<TlsIngress>>>,
    /// Rate limit and audit sampling of `/v1/enroll` and `/v1/renew`.
    enroll_guard: crate::security::throttle::EnrollGuard,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl Security {
    /// Loads what the config names: the issuing certificate (optional: no
    /// enrollment without it), the join token store, persisted revocations,
    /// the JWKS, and opens the audit log.
    pub async fn build(
        config: &NodeConfig,
        identity: Arc<NodeIdentity>,
        revoked: Arc<RevocationSet>,
    ) -> Result<(Security, Option<dmsc_audit::AuditTask>), SecurityError> {
        let me = identity.name().to_string();
        let data = &config.data_dir;
        std::fs::create_dir_all(data).map_err(|source| SecurityError::DataDir {
            path: data.clone(),
            source,
        })?;
        let paths = Paths {
            ca: config.ca.clone(),
            cert: config.cert.clone(),
            key: config.key.clone(),
            issuer: config.issuer_cert.clone().zip(config.issuer_key.clone()),
            revoked: data.join("revoked.jsonl"),
        };
        let issuer = match &paths.issuer {
            Some((c, k)) => Some(Arc::new(NodeIssuer::load(c, k)?)),
            None => None,
        };
        let n = revoked.load(&paths.revoked, &identity.roots)?;
        if n > 0 {
            info!(count = n, "loaded persisted revocations");
        }
        let tenant_keys = Arc::new(tenant_keys::TenantKeys::load(data, &identity.roots)?);
        let policies = {
            let revoked = revoked.clone();
            crate::security::policies::PolicyStore::open(
                data.join("policies"),
                &identity.roots,
                move |serial| revoked.get(serial).is_some(),
                tenant_keys.store.clone(),
            )
            .map_err(|source| SecurityError::DataDir {
                path: data.join("policies"),
                source,
            })?
        };
        let admin_token_hash = admin_token(&data.join(ADMIN_TOKEN_FILE))?;
        let tokens = TokenStore::open(data.join("join-tokens.json"))?;
        let read_tokens = read_tokens::ReadTokens::open(data.join(read_tokens::READ_TOKENS_FILE))?;
        let jwt = match &config.jwt {
            Some(j) => {
                let source = match (&j.jwks_file, &j.jwks_url) {
                    (Some(f), _) => dmsc_auth::JwksSource::File(f.clone()),
                    (None, Some(u)) => dmsc_auth::JwksSource::Url(u.clone()),
                    (None, None) => return Err(SecurityError::NoJwksSource),
                };
                let mut cfg =
                    dmsc_auth::JwtConfig::new(j.issuers.clone(), j.audiences.clone(), source);
                cfg.tenant_claim = j.tenant_claim.clone();
                cfg.agent_claim = j.agent_claim.clone();
                cfg.refresh = j.refresh;
                cfg.leeway = j.leeway;
                Some(JwtValidator::new(cfg).await?)
            }
            None => None,
        };
        let (audit, task) = match &config.audit {
            Some(a) => {
                let signer = match dmsc_audit::Signer::load(&config.key, &config.cert) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        warn!(error = %e, "audit checkpoints will not be signed");
                        None
                    }
                };
                let mut cfg = dmsc_audit::AuditConfig::new(&a.dir, &me);
                cfg.fsync = a.fsync.parse::<dmsc_audit::FsyncPolicy>()?;
                cfg.checkpoint_every = a.checkpoint_every;
                cfg.checkpoint_interval = a.checkpoint_interval;
                cfg.linger = a.linger;
                cfg.sealer = Some(Arc::new(tenant_keys::AuditSealer(
                    tenant_keys.store.clone(),
                )));
                let (h, t) = dmsc_audit::AuditLog::open(cfg, signer)?;
                (Some(h), Some(t))
            }
            None => (None, None),
        };
        Ok((
            Security {
                me,
                identity: RwLock::new(identity),
                revoked,
                policies: Arc::new(policies),
                issuer: RwLock::new(issuer),
                tokens,
                jwt,
                audit,
                tenant_keys,
                issued: AtomicU64::new(0),
                reloads: AtomicU64::new(0),
                metrics: crate::metrics::SecurityMetrics::default(),
                agent_ttl: config.agent_cert_ttl,
                ca_pem: RwLock::new(std::fs::read_to_string(&paths.ca).unwrap_or_default()),
                audit_waiting: Arc::default(),
                admin_token_hash,
                read_tokens,
                jwt_cache: Mutex::default(),
                paths,
                tls: Mutex::new(Vec::new()),
                enroll_guard: crate::security::throttle::EnrollGuard::new(&config.enrollment),
            },
            task,
        ))
    }

    /// True if `presented` is the admin token (constant-time comparison of
    /// hashes, so timing says nothing about the token).
    pub fn admin_token_ok(&self, presented: &str) -> bool {
        use sha2::Digest;
        let h: [u8; 32] = sha2::Sha256::digest(presented.trim().as_bytes()).into();
        h.iter()
            .zip(self.admin_token_hash.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }

    /// Validates a bearer JWT, remembering good ones for a short while: an
    /// agent sends the same token on every request until it expires, and a
    /// signature check costs tens of microseconds (BENCHMARKS.md). A cached
    /// verdict lasts at most [`JWT_CACHE_TTL`] and never past the token's
    /// `exp`: a token signed with a key later removed from the JWKS keeps
    /// working until the JWKS refresh notices (`jwt.refresh_secs`) plus up
    /// to this minute.
    pub async fn validate_jwt(
        &self,
        token: &str,
    ) -> Result<dmsc_auth::JwtCaller, dmsc_auth::AuthError> {
        use sha2::Digest;
        let Some(v) = &self.jwt else {
            return Err(dmsc_auth::AuthError::Config(vec![
                "this node validates no JWTs (no [jwt] section)".into(),
            ]));
        };
        let key: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        let now = std::time::Instant::now();
        {
            let cache = self.jwt_cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((caller, until)) = cache.get(&key) {
                if now < *until && time::OffsetDateTime::now_utc() < caller.expires_at {
                    return Ok(caller.clone());
                }
            }
        }
        let caller = v.validate(token).await?;
        let mut cache = self.jwt_cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= JWT_CACHE_MAX {
            // Rare (10k distinct live tokens on one node): start over
            // rather than track recency on every hit.
            cache.clear();
        }
        cache.insert(key, (caller.clone(), now + JWT_CACHE_TTL));
        Ok(caller)
    }

    pub fn identity(&self) -> Arc<NodeIdentity> {
        read(&self.identity).clone()
    }

    pub fn issuer(&self) -> Option<Arc<NodeIssuer>> {
        read(&self.issuer).clone()
    }

    /// Agent certificates issued since the node started.
    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::Relaxed)
    }

    /// Join tokens: issued, used, expired, active.
    pub fn token_counts(&self) -> Option<[usize; 4]> {
        let c = self.tokens.counts(time::OffsetDateTime::now_utc());
        Some([c.issued, c.used, c.expired, c.active])
    }

    /// Credential reloads applied since the node started.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// A TLS ingress that follows credential reloads.
    pub fn tls_ingress(
        &self,
        client_certs: bool,
        allow_tls12: bool,
    ) -> Result<Arc<TlsIngress>, SecurityError> {
        let t = Arc::new(TlsIngress::new(
            &self.identity(),
            client_certs,
            allow_tls12,
        )?);
        self.tls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(t.clone());
        Ok(t)
    }

    /// Appends to the audit log without waiting; if the writer is far
    /// behind, a task waits for room so the entry is not lost.
    pub fn record(&self, e: Event) {
        self.count(&e.kind);
        self.append(e);
    }

    /// Admits one enrollment or renewal request from `ip`, or says when it
    /// may come back (answered 429 with `Retry-After`).
    pub fn admit_enrollment(
        &self,
        attempt: crate::security::throttle::Attempt,
        ip: std::net::IpAddr,
    ) -> Result<(), Duration> {
        let mut due = Vec::new();
        let r = self
            .enroll_guard
            .admit(attempt, ip, std::time::Instant::now(), &mut due);
        if r.is_err() {
            self.metrics.enroll_throttled.inc();
        }
        self.append_aggregates(due);
        r
    }

    /// Records a failed enrollment or renewal attempt from `ip`: audited
    /// alone while the source is within its sample, else summed into the
    /// window's aggregate entry. Counted in the metrics either way.
    pub fn record_attempt_failure(
        &self,
        attempt: crate::security::throttle::Attempt,
        ip: std::net::IpAddr,
        e: Event,
    ) {
        let mut due = Vec::new();
        let sample = self
            .enroll_guard
            .failed(attempt, ip, std::time::Instant::now(), &mut due);
        match sample {
            crate::security::throttle::Sample::Audit => self.record(e),
            crate::security::throttle::Sample::Count => {
                self.count(&e.kind);
                self.metrics.audit_sampled_out.inc();
            }
        }
        self.append_aggregates(due);
    }

    /// Writes the aggregate entries of sampling windows that are over
    /// (run periodically, so a flood's last window is not left unwritten).
    pub fn flush_sampled_failures(&self) {
        let mut due = Vec::new();
        self.enroll_guard.flush(std::time::Instant::now(), &mut due);
        self.append_aggregates(due);
    }

    fn append_aggregates(
        &self,
        due: Vec<crate::security::throttle::Aggregate<crate::security::throttle::Attempt>>,
    ) {
        for a in due {
            self.append(a.event());
        }
    }

    /// Counts an event in the metrics.
    fn count(&self, kind: &dmsc_audit::EventKind) {
        let m = &self.metrics;
        match kind {
            dmsc_audit::EventKind::AuthFailure(f) => {
                let method = match f.method {
                    dmsc_audit::AuthMethod::Mtls => "mtls",
                    dmsc_audit::AuthMethod::Jwt => "jwt",
                    dmsc_audit::AuthMethod::Token => "token",
                };
                m.auth_failures
                    .get_or_create(&crate::metrics::MethodLabel {
                        method: method.into(),
                    })
                    .inc();
            }
            dmsc_audit::EventKind::Denied(_) => {
                m.denials.inc();
            }
            dmsc_audit::EventKind::Enrollment(_) => {
                m.enrollments.inc();
            }
            dmsc_audit::EventKind::Revocation(_) => {
                m.revocations.inc();
            }
            dmsc_audit::EventKind::Delegation(_)
            | dmsc_audit::EventKind::Masked(_)
            | dmsc_audit::EventKind::Policy(_)
            | dmsc_audit::EventKind::TenantKey(_)
            | dmsc_audit::EventKind::RateLimited(_)
            | dmsc_audit::EventKind::Onboarding(_) => {}
        }
    }

    /// Appends to the audit log (see [`Self::record`]).
    fn append(&self, e: Event) {
        let m = &self.metrics;
        if let Some(a) = &self.audit {
            if let Err(e) = a.offer(e) {
                // The writer is a full queue behind. Wait for room, but
                // with a bound on waiters: a flood of refused requests must
                // not turn into unbounded tasks. Beyond it, entries are
                // dropped and counted (`dmsc_audit_dropped_total`).
                if self.audit_waiting.fetch_add(1, Ordering::AcqRel) >= MAX_AUDIT_WAITERS {
                    self.audit_waiting.fetch_sub(1, Ordering::AcqRel);
                    m.audit_dropped.inc();
                    return;
                }
                let (a, waiting) = (a.clone(), self.audit_waiting.clone());
                tokio::spawn(async move {
                    if let Err(err) = a.record(e).await {
                        warn!(error = %err, "audit entry not recorded");
                    }
                    waiting.fetch_sub(1, Ordering::AcqRel);
                });
            }
        }
    }

    /// Creates a one-time join token (admin API / `dmsc-node token create`).
    /// `binding`: only those local processes may redeem it, at the
    /// metadata endpoint (`None`: any holder, by enrollment).
    pub fn create_token(
        &self,
        tenant: &str,
        agent: &str,
        ttl: Duration,
        binding: Option<dmsc_auth::token::Binding>,
    ) -> Result<(String, dmsc_auth::token::TokenInfo), Refusal> {
        // A token this node could never honour is refused now, not at
        // enrollment (a bound token is redeemed for no certificate).
        if binding.is_none() {
            if let Some(i) = self.issuer().filter(|i| !i.may_issue_for(tenant)) {
                return Err(not_hosted(&i, tenant));
            }
        }
        let store = &self.tokens;
        store
            .create_bound(tenant, agent, ttl, binding, time::OffsetDateTime::now_utc())
            .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, e.code(), e.reason()))
    }

    /// Redeems a bound join token for the local process `holder` (the
    /// metadata endpoint). Blocking file I/O: call it on the blocking pool.
    pub fn redeem_held(
        &self,
        token: &str,
        holder: &dmsc_auth::token::Holder,
    ) -> Result<dmsc_auth::token::TokenInfo, dmsc_auth::TokenError> {
        self.tokens
            .redeem_held(token, holder, time::OffsetDateTime::now_utc())
    }

    /// What the store knows of a token, by its public id (not spent).
    pub fn token_info(&self, id: &str) -> Option<dmsc_auth::token::TokenInfo> {
        self.tokens.list().into_iter().find(|t| t.id == id)
    }

    fn no_issuer(&self) -> Refusal {
        Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_issuer",
            "this node has no issuing certificate (tls.issuer_cert/issuer_key; `dmsc-node ca issue-node` writes them)",
        )
    }

    fn issue(
        &self,
        tenant: &str,
        agent: &str,
        csr: Option<&str>,
        ancestors: &[String],
    ) -> Result<dmsc_transport::pki::AgentCert, Refusal> {
        let issuer = self.issuer().ok_or_else(|| self.no_issuer())?;
        if !issuer.may_issue_for(tenant) {
            return Err(not_hosted(&issuer, tenant));
        }
        let key = match csr {
            Some(pem) => AgentKey::Csr(pem),
            None => AgentKey::Generate,
        };
        let cert = issuer
            .issue_agent_renewing(tenant, agent, key, self.agent_ttl, ancestors)
            .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, "bad_csr", e.to_string()))?;
        self.issued.fetch_add(1, Ordering::Relaxed);
        Ok(cert)
    }

    fn response(&self, cert: dmsc_transport::pki::AgentCert) -> EnrollResponse {
        let not_after = time::OffsetDateTime::from(cert.not_after)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let ca = read(&self.ca_pem).clone();
        EnrollResponse {
            spiffe_id: cert.spiffe.to_string(),
            certificate_chain: cert.chain_pem,
            private_key: cert.key_pem,
            ca,
            serial: cert.serial_hex,
            not_after,
        }
    }

    /// `POST /v1/enroll`: redeem a join token for a certificate.
    pub fn enroll(&self, body: &[u8], peer: SocketAddr) -> Result<EnrollResponse, Refusal> {
        let refuse = |r: Refusal, tenant: Option<String>, claimed: Option<String>| {
            self.record_attempt_failure(
                crate::security::throttle::Attempt::Enroll,
                peer.ip(),
                Event {
                    tenant,
                    kind: dmsc_audit::AuthFailure {
                        listener: "enroll".into(),
                        method: dmsc_audit::AuthMethod::Token,
                        reason: r.reason.clone(),
                        peer: peer.to_string(),
                        claimed,
                    }
                    .into(),
                },
            );
            r
        };
        let req = dmsc_auth::enroll::parse_enroll(body).map_err(|e| {
            refuse(
                Refusal::new(StatusCode::BAD_REQUEST, e.code(), e.reason()),
                None,
                None,
            )
        })?;
        let store = &self.tokens;
        // Everything that can fail after the token is spent is checked
        // before spending it: a one-time token is not burnt by a bad CSR.
        let Some(issuer) = self.issuer() else {
            return Err(self.no_issuer());
        };
        // The tenant the certificate would be for: the one claimed, else the
        // token's own (looked up by its public id, without spending it).
        let token_id = req.token.split('.').nth(1).unwrap_or_default();
        let tenant = req.tenant.clone().or_else(|| {
            self.tokens
                .list()
                .into_iter()
                .find(|t| t.id == token_id)
                .map(|t| t.tenant)
        });
        if let Some(t) = tenant.filter(|t| !issuer.may_issue_for(t)) {
            return Err(refuse(not_hosted(&issuer, &t), Some(t.clone()), None));
        }
        if let Some(csr) = &req.csr_pem {
            dmsc_transport::pki::check_csr(csr).map_err(|e| {
                refuse(
                    Refusal::new(StatusCode::BAD_REQUEST, "bad_csr", e.to_string()),
                    req.tenant.clone(),
                    None,
                )
            })?;
        }
        let claimed = req
            .tenant
            .as_ref()
            .map(|t| format!("{t}/{}", req.agent.as_deref().unwrap_or("*")));
        // Each field given is checked (an agent named without a tenant too).
        let expect = (req.tenant.as_deref(), req.agent.as_deref());
        let info = store
            .redeem(&req.token, expect, time::OffsetDateTime::now_utc())
            .map_err(|e| {
                let status = match e {
                    dmsc_auth::TokenError::TenantMismatch { .. }
                    | dmsc_auth::TokenError::AgentMismatch { .. } => StatusCode::FORBIDDEN,
                    dmsc_auth::TokenError::Malformed(_) => StatusCode::BAD_REQUEST,
                    dmsc_auth::TokenError::Store { .. } => StatusCode::INTERNAL_SERVER_ERROR,
                    _ => StatusCode::UNAUTHORIZED,
                };
                refuse(
                    Refusal::new(status, e.code(), e.reason()),
                    req.tenant.clone(),
                    claimed.clone(),
                )
            })?;
        let cert = self
            .issue(&info.tenant, &info.agent, req.csr_pem.as_deref(), &[])
            .map_err(|r| refuse(r, Some(info.tenant.clone()), claimed.clone()))?;
        self.record_issued(
            &info.tenant,
            &info.agent,
            &cert,
            dmsc_audit::EnrollVia::Token(info.id.clone()),
        );
        info!(tenant = %info.tenant, agent = %info.agent, serial = %cert.serial_hex, "agent enrolled");
        Ok(self.response(cert))
    }

    fn record_issued(
        &self,
        tenant: &str,
        agent: &str,
        cert: &dmsc_transport::pki::AgentCert,
        via: dmsc_audit::EnrollVia,
    ) {
        self.record(Event::tenant(
            tenant,
            dmsc_audit::Enrollment {
                agent: agent.to_string(),
                serial: cert.serial_hex.clone(),
                not_after: unix(cert.not_after),
                via,
            },
        ));
    }

    /// `POST /v1/renew`: a fresh certificate for the identity the caller
    /// proved with its current (valid, unrevoked) certificate.
    pub fn renew(&self, who: &AgentIdentity, body: &[u8]) -> Result<EnrollResponse, Refusal> {
        let req = dmsc_auth::enroll::parse_renew(body)
            .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, e.code(), e.reason()))?;
        // The new certificate remembers what it renews (and what that
        // renewed), so revoking any of them revokes it too.
        let ancestors: Vec<String> = std::iter::once(who.serial_hex.clone())
            .chain(who.renewed_from.iter().cloned())
            .collect();
        let cert = self.issue(&who.tenant, &who.agent, req.csr_pem.as_deref(), &ancestors)?;
        self.record_issued(
            &who.tenant,
            &who.agent,
            &cert,
            dmsc_audit::EnrollVia::Renewal(who.serial_hex.clone()),
        );
        Ok(self.response(cert))
    }

    /// Judges a client certificate chain from the agent ingress.
    pub fn verify_agent(
        &self,
        chain: &[CertificateDer<'_>],
    ) -> Result<AgentIdentity, dmsc_transport::tls::AgentRefused> {
        dmsc_transport::tls::verify_agent(
            chain,
            &self.identity(),
            &self.revoked,
            rustls::pki_types::UnixTime::now(),
        )
    }

    /// Verifies and records a revocation; true if it was new here. The
    /// caller publishes it and closes affected connections.
    pub fn apply_revocation(
        &self,
        r: Revocation,
        source: &str,
    ) -> Result<bool, dmsc_transport::TransportError> {
        if self.revoked.get(&r.serial).is_some() {
            return Ok(false);
        }
        r.verify(&self.identity().roots)?;
        let new = self.revoked.insert(r.clone());
        if new {
            if let Err(e) = self.revoked.save(&self.paths.revoked) {
                warn!(error = %e, "cannot persist revocations; they stay in memory and in gossip");
            }
            warn!(serial = %r.serial, reason = %r.reason, source, "certificate revoked");
            let own = self.identity();
            if self.revoked.revoked_in(own.chain.iter()).is_some() {
                tracing::error!(
                    serial = %r.serial,
                    node = %own.spiffe,
                    "this node's own certificate is revoked: peers refuse its next connection; \
                     issue a new one (`dmsc-node ca issue-node`) and replace the cert and key files"
                );
            }
            self.record(Event::global(dmsc_audit::Revocation {
                serial: r.serial.clone(),
                reason: r.reason.clone(),
                source: source.to_string(),
            }));
        }
        Ok(new)
    }

    /// Verifies and applies an operator statement about a tenant's data keys
    /// (rotate: a new key on this node; delete: this node's keys of that
    /// tenant destroyed), audited. The caller re-publishes it when new.
    pub fn apply_tenant_key_statement(
        &self,
        s: &dmsc_transport::TenantKeyStatement,
        source: &str,
    ) -> Result<tenant_keys::StatementOutcome, tenant_keys::TenantKeyError> {
        let outcome = self.tenant_keys.apply(s, &self.identity().roots)?;
        if let tenant_keys::StatementOutcome::Applied {
            key_id,
            keys_destroyed,
        } = &outcome
        {
            warn!(tenant = %s.tenant, action = %s.action, seq = s.seq, source, "tenant key statement applied");
            self.record(Event::tenant(
                s.tenant.clone(),
                dmsc_audit::TenantKey {
                    action: s.action.clone(),
                    seq: s.seq,
                    key_id: *key_id,
                    keys_destroyed: *keys_destroyed,
                    source: source.to_string(),
                },
            ));
        }
        Ok(outcome)
    }

    /// Opens the sealed tenant payload of an audit line with this node's
    /// keys, for display (see [`dmsc_audit::open_line`]).
    pub fn open_audit_line(&self, line: &mut dmsc_audit::Line) -> dmsc_audit::SealState {
        let sealer = tenant_keys::AuditSealer(self.tenant_keys.store.clone());
        dmsc_audit::open_line(line, Some(&sealer))
    }

    /// Verifies and applies a signed tenant policy (from the admin API or a
    /// peer: `source`), audited either way. The caller announces a new one.
    pub fn apply_policy(
        &self,
        bytes: &[u8],
        source: &str,
    ) -> Result<crate::security::policies::Applied, crate::security::policies::ApplyError> {
        use crate::security::policies::Applied;
        let roots = self.identity().roots.clone();
        let revoked = &self.revoked;
        let result = self
            .policies
            .apply(bytes, &roots, |serial| revoked.get(serial).is_some());
        match &result {
            Ok(Applied::New {
                tenant,
                version,
                digest,
                signer,
                previous,
            }) => {
                info!(%tenant, version, ?previous, %signer, source, "tenant policy applied");
                self.record(Event::tenant(
                    tenant.clone(),
                    dmsc_audit::PolicyChange {
                        outcome: "applied".into(),
                        version: *version,
                        digest: digest.clone(),
                        signer: signer.clone(),
                        source: source.to_string(),
                        code: None,
                        reason: None,
                    },
                ));
            }
            Ok(Applied::Unchanged { .. }) => {}
            Err(e) => {
                // What the refused document claims, for the record (its
                // claims are not trusted: it did not verify).
                let claimed = dmsc_policy::SignedPolicy::parse(bytes)
                    .ok()
                    .and_then(|s| s.doc_bytes().ok())
                    .map(|d| (dmsc_policy::digest(&d), dmsc_policy::Policy::parse(&d).ok()));
                let (digest, doc) = claimed.unwrap_or_default();
                warn!(source, error = %e, "tenant policy refused");
                self.record(Event {
                    tenant: doc.as_ref().map(|p| p.tenant.clone()),
                    kind: dmsc_audit::PolicyChange {
                        outcome: "refused".into(),
                        version: doc.as_ref().map_or(0, |p| p.version),
                        digest,
                        signer: String::new(),
                        source: source.to_string(),
                        code: Some(e.code().to_string()),
                        reason: Some(e.to_string()),
                    }
                    .into(),
                });
            }
        }
        result
    }

    /// Reloads credentials from disk if their files changed since `seen`;
    /// applies them to the overlay and every TLS ingress.
    pub fn reload_if_changed(&self, overlay: &Overlay, seen: &mut Vec<FileStamp>) {
        let now = stamps(&self.paths);
        if now == *seen {
            return;
        }
        let identity = match NodeIdentity::load(&self.paths.ca, &self.paths.cert, &self.paths.key) {
            Ok(i) => Arc::new(i),
            Err(e) => {
                // Often a half-written pair (cert updated, key not yet):
                // keep the old credentials and look again next time.
                warn!(error = %e, "credential files changed but do not load; keeping the current ones");
                return;
            }
        };
        // Never switch to credentials that peers would refuse.
        let problem = if let Err(e) = dmsc_transport::tls::verify_own_chain(&identity) {
            Some(format!("it does not chain to the CA bundle: {e}"))
        } else if let Some(r) = self.revoked.revoked_in(identity.chain.iter()) {
            Some(format!("serial {} is revoked ({})", r.serial, r.reason))
        } else {
            None
        };
        if let Some(problem) = problem {
            warn!(%problem, "credential files changed but the new node certificate is unusable; keeping the current one");
            self.metrics.reloads_refused.inc();
            *seen = now;
            return;
        }
        if let Err(e) = overlay.reload_identity(&identity) {
            warn!(error = %e, "cannot apply the reloaded node certificate");
            return;
        }
        for t in self.tls.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            if let Err(e) = t.reload(&identity) {
                warn!(error = %e, "cannot apply the reloaded certificate to an ingress");
            }
        }
        if let Some((c, k)) = &self.paths.issuer {
            match NodeIssuer::load(c, k) {
                Ok(i) => *write(&self.issuer) = Some(Arc::new(i)),
                Err(e) => warn!(error = %e, "cannot reload the issuing certificate"),
            }
        }
        info!(serial = %identity.info.serial_hex, "node credentials reloaded");
        *write(&self.ca_pem) = std::fs::read_to_string(&self.paths.ca).unwrap_or_default();
        *write(&self.identity) = identity;
        self.reloads.fetch_add(1, Ordering::Relaxed);
        *seen = now;
    }
}

/// What identifies one version of a credential file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp(Option<(SystemTime, u64)>);

impl Security {
    /// The current stamps of the credential files (see [`Security::reload_if_changed`]).
    pub fn credential_stamps(&self) -> Vec<FileStamp> {
        stamps(&self.paths)
    }

    /// Drops join tokens that expired more than a week ago (rewrites the store, fsync).
    pub fn prune_tokens(&self) {
        if let Err(e) = self.tokens.prune(time::OffsetDateTime::now_utc()) {
            warn!(error = %e, "cannot prune join tokens");
        }
    }
}

fn stamps(p: &Paths) -> Vec<FileStamp> {
    let mut files: Vec<&Path> = vec![&p.ca, &p.cert, &p.key];
    if let Some((c, k)) = &p.issuer {
        files.push(c);
        files.push(k);
    }
    files
        .into_iter()
        .map(|f| {
            FileStamp(
                std::fs::metadata(f)
                    .ok()
                    .and_then(|m| Some((m.modified().ok()?, m.len()))),
            )
        })
        .collect()
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}
