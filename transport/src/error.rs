//! The one error type of this crate. Messages name the thing that is wrong
//! and, where there is one, what to do about it.

use std::path::PathBuf;

/// Errors of identities, PKI files and the overlay.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot read `{path}`: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write `{path}`: {source}")]
    WriteFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{path}` holds no PEM {what}")]
    NoPem { path: PathBuf, what: &'static str },
    #[error("`{path}` is not a usable {what}: {reason}")]
    BadPem {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error("certificate has no usable SPIFFE identity: {0}")]
    Identity(String),
    /// A signed operator statement (a revocation, a tenant key action)
    /// that is malformed or not signed by the mesh CA.
    #[error("{0}")]
    Statement(String),
    #[error("certificate generation failed: {0}")]
    CertGen(#[from] rcgen::Error),
    #[error("TLS configuration rejected: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot bind the overlay on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("overlay connection to {addr} failed: {reason}")]
    Connect {
        addr: std::net::SocketAddr,
        reason: String,
    },
    #[error("overlay stream error: {0}")]
    Stream(String),
    /// The connection a stream ran on was lost (timed out, closed, reset):
    /// the path failed, not the stream's peer application.
    #[error("overlay connection lost: {0}")]
    ConnectionLost(String),
    #[error("frame error: {0}")]
    Frame(#[from] crate::frame::FrameError),
    #[error("the overlay is shut down")]
    Closed,
}

impl From<quinn::crypto::rustls::NoInitialCipherSuite> for TransportError {
    fn from(e: quinn::crypto::rustls::NoInitialCipherSuite) -> Self {
        TransportError::Identity(format!("QUIC needs TLS 1.3 AES-128-GCM: {e}"))
    }
}
