//! rustls configurations for the overlay: mutual TLS 1.3 against the mesh CA.
//!
//! Both directions run the same check: the chain must lead to a mesh root,
//! be within its validity, and the leaf must carry exactly one SPIFFE ID that
//! names a *node* in *our* trust domain. DNS names play no part (a peer is
//! addressed by IP and identified by its SPIFFE ID), so the server-side check
//! is a custom verifier built on rustls' own webpki path validation rather
//! than on `WebPkiServerVerifier`, which insists on a DNS/IP SAN match.
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

use crate::identity::{cert_info, issuer_of, NodeIdentity, Workload};
use crate::TransportError;

/// ALPN protocol id of the overlay; bumped on an incompatible wire change.
pub const ALPN: &[u8] = b"dmsc/1";

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
}

impl MeshPolicy {
    fn check_identity(&self, end_entity: &CertificateDer<'_>) -> Result<String, rustls::Error> {
        let info = cert_info(end_entity).map_err(|e| self.refuse(e.to_string()))?;
        if info.spiffe.trust_domain != self.trust_domain {
            return Err(self.refuse(format!(
                "certificate `{}` names trust domain `{}`, this mesh is `{}`",
                info.spiffe, info.spiffe.trust_domain, self.trust_domain
            )));
        }
        match info.spiffe.workload {
            Workload::Node(name) => Ok(name),
            _ => Err(self.refuse(format!(
                "certificate `{}` is not a node identity",
                info.spiffe
            ))),
        }
    }

    fn refuse(&self, reason: String) -> rustls::Error {
        tracing::warn!(%reason, "refused overlay peer certificate");
        rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
    }

    /// Turns a path-validation failure into a log line that says what to fix.
    fn explain(&self, end_entity: &CertificateDer<'_>, err: rustls::Error) -> rustls::Error {
        let reason = match &err {
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
            | rustls::Error::InvalidCertificate(CertificateError::BadSignature) => format!(
                "issued by `{}`, expected the mesh CA `{}`",
                issuer_of(end_entity),
                self.root_subjects.join("` or `")
            ),
            rustls::Error::InvalidCertificate(CertificateError::Expired)
            | rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. }) => {
                "certificate has expired".to_string()
            }
            rustls::Error::InvalidCertificate(CertificateError::NotValidYet)
            | rustls::Error::InvalidCertificate(CertificateError::NotValidYetContext { .. }) => {
                "certificate is not valid yet (check clocks)".to_string()
            }
            other => other.to_string(),
        };
        let subject = cert_info(end_entity)
            .map(|i| i.spiffe.to_string())
            .unwrap_or_else(|_| "<no SPIFFE ID>".into());
        tracing::warn!(peer = %subject, %reason, "refused overlay peer certificate");
        err
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
        self.policy.check_identity(end_entity)?;
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
        self.policy.check_identity(end_entity)?;
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

fn policy(identity: &NodeIdentity) -> MeshPolicy {
    MeshPolicy {
        trust_domain: identity.trust_domain().to_string(),
        root_subjects: identity.root_subjects.clone(),
    }
}

/// The config a node uses when it dials a peer: TLS 1.3 only, our node
/// certificate as client certificate, the mesh verifier for the server.
pub fn client_config(identity: &NodeIdentity) -> Result<ClientConfig, TransportError> {
    let provider = provider();
    let verifier = MeshServerVerifier {
        roots: root_store(identity)?,
        algs: provider.signature_verification_algorithms,
        policy: policy(identity),
    };
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// The config a node uses when it accepts a peer: TLS 1.3 only, client
/// certificates required and verified by the mesh verifier.
pub fn server_config(identity: &NodeIdentity) -> Result<ServerConfig, TransportError> {
    let provider = provider();
    let inner =
        WebPkiClientVerifier::builder_with_provider(root_store(identity)?, provider.clone())
            .build()
            .map_err(|e| TransportError::Identity(format!("client verifier: {e}")))?;
    let verifier = MeshClientVerifier {
        inner,
        policy: policy(identity),
    };
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}
