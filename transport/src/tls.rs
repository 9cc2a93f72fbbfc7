//! rustls configurations for the overlay: mutual TLS 1.3 against the mesh CA.
//!
//! Both directions run the same check: the chain must lead to a mesh root,
//! be within its validity, and the leaf must carry exactly one SPIFFE ID that
//! names a *node* in *our* trust domain. DNS names play no part (a peer is
//! addressed by IP and identified by its SPIFFE ID), so the server-side check
//! is a custom verifier built on rustls' own webpki path validation rather
//! than on `WebPkiServerVerifier`, which insists on a DNS/IP SAN match.
//!
//! Revocations ([`crate::revoke`]) are checked in the same place: a chain in
//! which any certificate is revoked is refused at the handshake, so a
//! revoked node cannot reconnect anywhere once the statement has gossiped.
//! Node certificates must be issued by a root directly: a node's issuing
//! certificate signs agents, never other nodes.
//!
//! Agent ingress ([`ingress_server_config`], [`verify_agent`]) works the
//! other way round: the TLS handshake only proves the client holds the key
//! of the certificate it sent, and the chain is judged right after, at the
//! HTTP layer, so a refused agent gets a 401 that says *why* (expired,
//! revoked, other CA) instead of a bare TLS alert.
//!
//! A refusal is logged here, where the precise reason is known ("issued by
//! `CN=other`, expected the mesh CA `CN=dmsc mesh CA td`"); the other side
//! only learns a TLS alert, and the overlay logs that.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};

use crate::identity::{cert_info, issuer_of, NodeIdentity, SpiffeId, Workload};
use crate::revoke::RevocationSet;
use crate::TransportError;

/// ALPN protocol id of the overlay; bumped on an incompatible wire change.
pub const ALPN: &[u8] = b"dmsc/1";
/// ALPN of a probe: a full handshake that checks the peer accepts our
/// certificate (`dmsc-node check`), which the peer must not adopt as a
/// connection (it would displace the pooled one).
pub const ALPN_PROBE: &[u8] = b"dmsc-probe/1";
/// ALPN of TCP + TLS relay sessions (`relay`): same certificates and
/// verifiers as the overlay, another protocol on the wire.
pub const ALPN_RELAY: &[u8] = b"dmsc-relay/1";

/// The crypto provider used everywhere (ring: small, no C++/cmake build).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Checks a peer's leaf certificate beyond path validation: exactly one
/// SPIFFE ID, naming a node of our trust domain.
#[derive(Debug)]
struct MeshPolicy {
    trust_domain: String,
    root_subjects: Vec<String>,
    revoked: Arc<RevocationSet>,
    refusals: Arc<RefusalLog>,
}

/// The last refusals of peer certificates, with their reasons, for
/// `dmsc-node check` (a peer with another CA never becomes a peer, so the
/// refusal is the only trace of the mismatch on this side).
#[derive(Debug, Default)]
pub struct RefusalLog {
    recent: std::sync::Mutex<std::collections::VecDeque<(std::time::SystemTime, String)>>,
}

impl RefusalLog {
    const KEEP: usize = 32;

    pub fn push(&self, reason: String) {
        // Names in it come from a peer's certificate: keep them printable.
        let reason: String = reason
            .chars()
            .take(400)
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        let mut r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if r.len() == Self::KEEP {
            r.pop_front();
        }
        r.push_back((std::time::SystemTime::now(), reason));
    }

    /// Refusals within `window`, oldest first.
    pub fn since(&self, window: std::time::Duration) -> Vec<(std::time::SystemTime, String)> {
        let now = std::time::SystemTime::now();
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(t, _)| now.duration_since(*t).unwrap_or_default() <= window)
            .cloned()
            .collect()
    }
}

impl MeshPolicy {
    fn check_identity(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<String, rustls::Error> {
        let info = cert_info(end_entity).map_err(|e| self.refuse(e.to_string()))?;
        if info.spiffe.trust_domain != self.trust_domain {
            return Err(self.refuse(format!(
                "certificate `{}` names trust domain `{}`, this mesh is `{}`",
                info.spiffe, info.spiffe.trust_domain, self.trust_domain
            )));
        }
        if let Some(r) = self
            .revoked
            .revoked_in(std::iter::once(end_entity).chain(intermediates))
        {
            tracing::warn!(peer = %info.spiffe, serial = %r.serial, reason = %r.reason, "refused overlay peer certificate: revoked");
            self.refusals.push(format!(
                "certificate `{}` is revoked (serial {}: {})",
                info.spiffe, r.serial, r.reason
            ));
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        let name = match &info.spiffe.workload {
            Workload::Node(name) if !info.is_ca => name.clone(),
            _ => {
                return Err(self.refuse(format!(
                    "certificate `{}` is not a node identity",
                    info.spiffe
                )))
            }
        };
        if !self.root_subjects.contains(&info.issuer) {
            return Err(self.refuse(format!(
                "node certificate `{}` was issued by `{}`, not by a mesh root; node certificates come from `dmsc-node ca issue-node`",
                info.spiffe, info.issuer
            )));
        }
        Ok(name)
    }

    fn refuse(&self, reason: String) -> rustls::Error {
        tracing::warn!(%reason, "refused overlay peer certificate");
        rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
    }

    /// Turns a path-validation failure into a log line that says what to fix.
    fn explain(&self, end_entity: &CertificateDer<'_>, err: rustls::Error) -> rustls::Error {
        let reason = path_failure(&err, end_entity, &self.root_subjects);
        let info = cert_info(end_entity).ok();
        let subject = info
            .as_ref()
            .map(|i| i.spiffe.to_string())
            .unwrap_or_else(|| "<no SPIFFE ID>".into());
        tracing::warn!(peer = %subject, %reason, "refused overlay peer certificate");
        // Kept for `check` only when the certificate claims to be a node of
        // this mesh: that is a CA mismatch (or an expired node), while a
        // random scanner's self-signed certificate is not worth an alarm.
        if info.is_some_and(|i| {
            i.spiffe.trust_domain == self.trust_domain
                && matches!(i.spiffe.workload, Workload::Node(_))
        }) {
            self.refusals
                .push(format!("certificate `{subject}` {reason}"));
        }
        err
    }
}

/// Why path validation refused `leaf`, as a phrase that follows
/// "certificate X ...": the one wording for the overlay's log lines, the
/// ingress's 401 bodies and `dmsc-node check`.
fn path_failure(err: &rustls::Error, leaf: &CertificateDer<'_>, roots: &[String]) -> String {
    match err {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        | rustls::Error::InvalidCertificate(CertificateError::BadSignature) => {
            let issuer = issuer_of(leaf);
            if roots.contains(&issuer) {
                // Two CAs of one name (e.g. `ca init` run twice for the
                // same trust domain): the name alone explains nothing.
                format!(
                    "is not from this mesh: issued by a CA named `{issuer}` like the mesh CA, \
                     but with another key (its signature does not verify against the mesh CA's)"
                )
            } else {
                format!(
                    "is not from this mesh: issued by `{issuer}`, expected the mesh CA `{}`",
                    roots.join("` or `")
                )
            }
        }
        rustls::Error::InvalidCertificate(CertificateError::Expired)
        | rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. }) => {
            "has expired".to_string()
        }
        rustls::Error::InvalidCertificate(CertificateError::NotValidYet)
        | rustls::Error::InvalidCertificate(CertificateError::NotValidYetContext { .. }) => {
            "is not valid yet (check clocks)".to_string()
        }
        other => format!("is refused: {other}"),
    }
}

/// Verifies the certificate a server presents to us when we dial.
#[derive(Debug)]
struct MeshServerVerifier {
    roots: Arc<RootCertStore>,
    algs: WebPkiSupportedAlgorithms,
    policy: MeshPolicy,
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)
            .map_err(|e| self.policy.explain(end_entity, e))?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )
        .map_err(|e| self.policy.explain(end_entity, e))?;
        self.policy.check_identity(end_entity, intermediates)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // TLS 1.2 is disabled in the config; refuse loudly if ever reached.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Verifies the certificate a dialing peer presents to us.
#[derive(Debug)]
struct MeshClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    policy: MeshPolicy,
}

impl ClientCertVerifier for MeshClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|e| self.policy.explain(end_entity, e))?;
        self.policy.check_identity(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn root_store(identity: &NodeIdentity) -> Result<Arc<RootCertStore>, TransportError> {
    let mut roots = RootCertStore::empty();
    for r in &identity.roots {
        roots.add(r.clone())?;
    }
    Ok(Arc::new(roots))
}

/// What the overlay's verifiers consult and report to, beyond the identity.
#[derive(Debug, Clone, Default)]
pub struct PeerGuard {
    pub revoked: Arc<RevocationSet>,
    pub refusals: Arc<RefusalLog>,
}

/// rustls' own path validation of client chains against the mesh roots.
fn webpki_client_verifier(
    identity: &NodeIdentity,
) -> Result<Arc<dyn ClientCertVerifier>, TransportError> {
    WebPkiClientVerifier::builder_with_provider(root_store(identity)?, provider())
        .build()
        .map_err(|e| TransportError::Identity(format!("client verifier: {e}")))
}

fn policy(identity: &NodeIdentity, guard: &PeerGuard) -> MeshPolicy {
    MeshPolicy {
        trust_domain: identity.trust_domain().to_string(),
        root_subjects: identity.root_subjects.clone(),
        revoked: guard.revoked.clone(),
        refusals: guard.refusals.clone(),
    }
}

/// The config a node uses when it dials a peer: TLS 1.3 only, our node
/// certificate as client certificate, the mesh verifier for the server.
pub fn client_config(
    identity: &NodeIdentity,
    guard: &PeerGuard,
) -> Result<ClientConfig, TransportError> {
    let provider = provider();
    let verifier = MeshServerVerifier {
        roots: root_store(identity)?,
        algs: provider.signature_verification_algorithms,
        policy: policy(identity, guard),
    };
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    // A resumed TLS 1.3 session skips certificate verification, so a
    // revoked peer could come back on an old ticket: always full handshakes
    // (overlay connections are long-lived; the cost is per connection).
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

/// The config a node uses when it accepts a peer: TLS 1.3 only, client
/// certificates required and verified by the mesh verifier.
pub fn server_config(
    identity: &NodeIdentity,
    guard: &PeerGuard,
) -> Result<ServerConfig, TransportError> {
    let provider = provider();
    let verifier = MeshClientVerifier {
        inner: webpki_client_verifier(identity)?,
        policy: policy(identity, guard),
    };
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    cfg.alpn_protocols = vec![ALPN.to_vec(), ALPN_PROBE.to_vec()];
    no_resumption(&mut cfg);
    Ok(cfg)
}

/// Server side of "no resumption": no tickets, no session cache, so every
/// handshake verifies the client's chain against the current revocations.
fn no_resumption(cfg: &mut ServerConfig) {
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    cfg.ticketer = Arc::new(NoTickets);
}

#[derive(Debug)]
struct NoTickets;

impl rustls::server::ProducesTickets for NoTickets {
    fn enabled(&self) -> bool {
        false
    }
    fn lifetime(&self) -> u32 {
        0
    }
    fn encrypt(&self, _plain: &[u8]) -> Option<Vec<u8>> {
        None
    }
    fn decrypt(&self, _cipher: &[u8]) -> Option<Vec<u8>> {
        None
    }
}

/// ALPN ids an agent-facing ingress offers.
pub const INGRESS_ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Accepts any client certificate, or none, at the handshake: rustls still
/// checks the client's CertificateVerify signature (proof that it holds the
/// key), and [`verify_agent`] judges the chain right after, where a refusal
/// can be answered with a reason.
#[derive(Debug)]
struct DeferredClientVerifier {
    hints: Vec<DistinguishedName>,
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for DeferredClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The TLS config of an agent-facing ingress listener: the node certificate
/// as server certificate, TLS 1.3 only unless `allow_tls12`, client
/// certificates requested (not required) when `client_certs`; h2 and
/// http/1.1 by ALPN.
pub fn ingress_server_config(
    identity: &NodeIdentity,
    client_certs: bool,
    allow_tls12: bool,
) -> Result<ServerConfig, TransportError> {
    let provider = provider();
    let versions: &[&rustls::SupportedProtocolVersion] = if allow_tls12 {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let builder =
        ServerConfig::builder_with_provider(provider.clone()).with_protocol_versions(versions)?;
    let builder = if client_certs {
        let hints = root_store(identity)?.subjects();
        builder.with_client_cert_verifier(Arc::new(DeferredClientVerifier {
            hints,
            algs: provider.signature_verification_algorithms,
        }))
    } else {
        builder.with_no_client_auth()
    };
    let mut cfg = builder.with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    cfg.alpn_protocols = INGRESS_ALPN.iter().map(|p| p.to_vec()).collect();
    // The client chain is judged per connection after the handshake, so a
    // resumed session would carry no chain to judge: full handshakes only.
    no_resumption(&mut cfg);
    Ok(cfg)
}

/// An agent identity proven by a client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentIdentity {
    pub spiffe: SpiffeId,
    pub tenant: String,
    pub agent: String,
    pub serial_hex: String,
    pub not_after: std::time::SystemTime,
    /// Serials this certificate was renewed from, newest first.
    pub renewed_from: Vec<String>,
}

/// Why a client certificate chain proves no agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRefused {
    /// The reason, fit for a 401 body.
    pub reason: String,
    /// The agent the chain proves in every other respect, when only a
    /// revocation refused it: its tenant is verified (the chain, the trust
    /// domain and the issuer's tenant limit all held), so the refusal can be
    /// audited in that tenant's log.
    pub revoked: Option<Box<AgentIdentity>>,
}

impl From<String> for AgentRefused {
    fn from(reason: String) -> Self {
        AgentRefused {
            reason,
            revoked: None,
        }
    }
}

impl std::fmt::Display for AgentRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// Judges a client certificate chain presented at the agent ingress: it must
/// chain to a mesh root (through a node's issuing certificate), be within
/// its validity, carry an agent SPIFFE ID of our trust domain (of a tenant
/// its issuer may issue for), and contain no revoked certificate. The
/// revocation is checked last, so a revoked chain still names the agent
/// it proves ([`AgentRefused::revoked`]).
pub fn verify_agent(
    chain: &[CertificateDer<'_>],
    identity: &NodeIdentity,
    revoked: &RevocationSet,
    now: UnixTime,
) -> Result<AgentIdentity, AgentRefused> {
    let who = verify_agent_chain(chain, identity, now)?;
    match revoked.revoked_in(chain.iter()) {
        Some(r) => Err(AgentRefused {
            reason: format!(
                "certificate `{}` is revoked (serial {}: {})",
                who.spiffe, r.serial, r.reason
            ),
            // Only when the agent's own certificate (or one it was renewed
            // from) is what is revoked: under a revoked issuing
            // certificate, whoever holds its key can mint any tenant's name.
            revoked: revoked
                .revoked_in(chain.iter().skip(1))
                .is_none()
                .then(|| Box::new(who)),
        }),
        None => Ok(who),
    }
}

/// [`verify_agent`] but for revocation.
fn verify_agent_chain(
    chain: &[CertificateDer<'_>],
    identity: &NodeIdentity,
    now: UnixTime,
) -> Result<AgentIdentity, AgentRefused> {
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err(String::from("no client certificate").into());
    };
    let info = cert_info(leaf).map_err(|e| e.to_string())?;
    webpki_client_verifier(identity)
        .map_err(|e| e.to_string())?
        .verify_client_cert(leaf, intermediates, now)
        .map_err(|e| {
            format!(
                "certificate `{}` {}",
                info.spiffe,
                path_failure(&e, leaf, &identity.root_subjects)
            )
        })?;
    if info.spiffe.trust_domain != identity.trust_domain() {
        return Err(format!(
            "certificate `{}` names trust domain `{}`, this mesh is `{}`",
            info.spiffe,
            info.spiffe.trust_domain,
            identity.trust_domain()
        )
        .into());
    }
    // The issuing certificate that signed it may be limited to tenants.
    // Which one signed is decided by the signature, not by the name: a
    // client may present extra certificates with the issuer's name.
    if let Workload::Agent { tenant, .. } = &info.spiffe.workload {
        for signer in intermediates
            .iter()
            .filter(|c| crate::identity::signed_by(leaf, c))
        {
            if let Some(allowed) = crate::identity::issuer_tenants(signer) {
                if !allowed.iter().any(|t| t == tenant) {
                    return Err(format!(
                        "certificate `{}` was signed by `{}`, which may only issue for tenants `{}`",
                        info.spiffe,
                        info.issuer,
                        allowed.join("`, `")
                    )
                    .into());
                }
            }
        }
    }
    match &info.spiffe.workload {
        Workload::Agent { tenant, agent } if !info.is_ca => Ok(AgentIdentity {
            tenant: tenant.clone(),
            agent: agent.clone(),
            spiffe: info.spiffe.clone(),
            serial_hex: info.serial_hex.clone(),
            not_after: info.not_after,
            renewed_from: crate::identity::renewed_from(leaf),
        }),
        _ => Err(format!(
            "certificate `{}` is not an agent identity (spiffe://<td>/tenant/<t>/agent/<a>)",
            info.spiffe
        )
        .into()),
    }
}

/// Checks that a node's own certificate chains to the roots it trusts (what
/// `dmsc-node check` calls a CA mismatch: peers holding the same bundle
/// would refuse this node).
pub fn verify_own_chain(identity: &NodeIdentity) -> Result<(), String> {
    let Some((leaf, intermediates)) = identity.chain.split_first() else {
        return Err("no certificate".into());
    };
    webpki_client_verifier(identity)
        .map_err(|e| e.to_string())?
        .verify_client_cert(leaf, intermediates, UnixTime::now())
        .map(|_| ())
        .map_err(|e| path_failure(&e, leaf, &identity.root_subjects))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{AgentKey, CertificateAuthority, NodeIssuer, AGENT_VALIDITY, NODE_VALIDITY};

    #[test]
    fn an_issuer_limited_to_a_tenant_cannot_vouch_for_another() {
        let ca = CertificateAuthority::generate("td").expect("ca");
        let creds = ca
            .issue_node_credentials_for("n1", NODE_VALIDITY, &[], &["acme".to_string()])
            .expect("creds");
        let identity =
            NodeIdentity::from_pem(&ca.cert_pem, &creds.node.cert_pem, &creds.node.key_pem)
                .expect("identity");
        let issuer =
            NodeIssuer::load_pem(&creds.issuer.cert_pem, &creds.issuer.key_pem).expect("issuer");
        assert_eq!(issuer.tenants.as_deref(), Some(&["acme".to_string()][..]));
        assert!(issuer.may_issue_for("acme") && !issuer.may_issue_for("globex"));
        let refused = issuer
            .issue_agent("globex", "a", AgentKey::Generate, AGENT_VALIDITY)
            .expect_err("other tenant");
        assert!(refused
            .to_string()
            .contains("may only issue for tenants `acme`"));

        let revoked = RevocationSet::new();
        let chain_of = |pem: &str| {
            crate::identity::certs_from_pem(pem, std::path::Path::new("c")).expect("pem")
        };
        let ok = issuer
            .issue_agent("acme", "a", AgentKey::Generate, AGENT_VALIDITY)
            .expect("acme");
        let who = verify_agent(
            &chain_of(&ok.chain_pem),
            &identity,
            &revoked,
            UnixTime::now(),
        )
        .expect("acme agent accepted");
        assert_eq!(who.tenant, "acme");

        // The issuing key signs a globex certificate directly (a stolen key):
        // it chains to the mesh CA, and is still refused.
        let key = rcgen::KeyPair::from_pem(&creds.issuer.key_pem).expect("key");
        let signer = rcgen::Issuer::from_ca_cert_pem(&creds.issuer.cert_pem, &key).expect("issuer");
        let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://td/tenant/globex/agent/a".try_into().expect("uri"),
        )];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let forged = params.signed_by(&leaf_key, &signer).expect("sign");
        let chain = chain_of(&format!("{}{}", forged.pem(), creds.issuer.cert_pem));
        let e = verify_agent(&chain, &identity, &revoked, UnixTime::now()).expect_err("forged");
        assert!(e.revoked.is_none());
        let e = e.reason;
        assert!(e.contains("may only issue for tenants `acme`"), "{e}");
        // A decoy with the issuer's name (and no tenant limit) placed first
        // in the chain changes nothing: the signature decides the issuer.
        let decoy_key = rcgen::KeyPair::generate().expect("key");
        let mut decoy = rcgen::CertificateParams::default();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::OrganizationName, "dmsc");
        dn.push(rcgen::DnType::CommonName, "dmsc issuer n1");
        decoy.distinguished_name = dn;
        decoy.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        let decoy = decoy.self_signed(&decoy_key).expect("decoy");
        let chain = chain_of(&format!(
            "{}{}{}",
            forged.pem(),
            decoy.pem(),
            creds.issuer.cert_pem
        ));
        let e = verify_agent(&chain, &identity, &revoked, UnixTime::now())
            .expect_err("decoy")
            .reason;
        assert!(e.contains("may only issue for tenants `acme`"), "{e}");

        // Revoked: refused, naming the agent the chain proves otherwise;
        // a forged chain that is also revoked names nobody.
        for c in [&ok.chain_pem, &forged.pem()] {
            let serial = crate::identity::cert_info(&chain_of(c)[0])
                .expect("info")
                .serial_hex;
            revoked.insert(crate::Revocation::sign(&ca, &serial, "key-compromise").expect("sign"));
        }
        let e = verify_agent(
            &chain_of(&ok.chain_pem),
            &identity,
            &revoked,
            UnixTime::now(),
        )
        .expect_err("revoked");
        assert!(e.reason.contains("is revoked"), "{}", e.reason);
        assert_eq!(e.revoked.map(|w| w.tenant).as_deref(), Some("acme"));
        let chain = chain_of(&format!("{}{}", forged.pem(), creds.issuer.cert_pem));
        let e = verify_agent(&chain, &identity, &revoked, UnixTime::now()).expect_err("forged");
        assert!(e.revoked.is_none(), "{e:?}");
        // Its issuing certificate revoked: refused, naming nobody (whoever
        // holds a revoked issuer's key can mint any name under it).
        let issuer_revoked = RevocationSet::new();
        let issuer_serial = crate::identity::cert_info(&chain_of(&creds.issuer.cert_pem)[0])
            .expect("info")
            .serial_hex;
        issuer_revoked
            .insert(crate::Revocation::sign(&ca, &issuer_serial, "key-compromise").expect("sign"));
        let e = verify_agent(
            &chain_of(&ok.chain_pem),
            &identity,
            &issuer_revoked,
            UnixTime::now(),
        )
        .expect_err("issuer revoked");
        assert!(e.reason.contains("is revoked"), "{}", e.reason);
        assert!(e.revoked.is_none(), "{e:?}");

        // An unrestricted issuer (no tenant SANs) issues for anyone.
        let open = ca
            .issue_node_credentials("n2", NODE_VALIDITY, &[])
            .expect("creds");
        let open =
            NodeIssuer::load_pem(&open.issuer.cert_pem, &open.issuer.key_pem).expect("issuer");
        assert!(open.tenants.is_none() && open.may_issue_for("globex"));
    }

    /// A second CA made for the same trust domain has the mesh CA's name:
    /// the refusal says so instead of naming one CA twice.
    #[test]
    fn a_ca_with_the_mesh_cas_name_and_another_key_is_named_as_such() {
        let ca = CertificateAuthority::generate("td").expect("ca");
        let twin = CertificateAuthority::generate("td").expect("twin");
        let creds = twin
            .issue_node_credentials("n1", NODE_VALIDITY, &[])
            .expect("creds");
        // Trusts `ca`, holds a certificate from `twin`.
        let identity =
            NodeIdentity::from_pem(&ca.cert_pem, &creds.node.cert_pem, &creds.node.key_pem)
                .expect("identity");
        let e = verify_own_chain(&identity).expect_err("another CA");
        assert!(
            e.contains("issued by a CA named `") && e.contains("with another key"),
            "{e}"
        );
    }
}
