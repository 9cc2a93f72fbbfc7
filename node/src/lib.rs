//! dmsc-node: the application that assembles a mesh node.
//!
//! Read it top down: each layer imports only the layers listed before it,
//! and a request walks them in order (ARCHITECTURE in docs/architecture.md):
//!
//! - [`proto`]: protocol types: the delegation wire format, the HTTP body
//!   type and header rules, the mesh's error kinds, A2A texts, gossip keys.
//! - [`config`]: layered settings, validated into typed values.
//! - [`metrics`]: the node's Prometheus registry.
//! - [`security`]: the node's trust state: its credentials, the ones it
//!   issues, revocations, bearer-token validation, the audit trail.
//! - [`route`]: the registry view of this node (gossiped records, load,
//!   circuits, outstanding requests) and selection.
//! - [`forward`]: delivery: to a local agent, to a remote agent's home node
//!   over the overlay, and the home node's side of that stream.
//! - [`ingress`]: where agents send requests: listeners, TLS, request
//!   parsing, caller authentication; hands each request to [`forward`].
//! - [`control`]: what keeps the tables true: agent onboarding and health,
//!   gossip sync, revocations, credential rotation, the clock channel.
//! - [`admin`]: the operator API (router, status, metrics, checks).
//! - [`app`]: assembles the layers and runs them, nothing else.
//!
//! Apart from the request path: [`ops`] (the operator commands behind the
//! CLI) and [`demo`] (a local mesh with sample agents).

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod config;
pub mod control;
pub mod forward;
pub mod ingress;
pub mod metrics;
pub mod proto;
pub mod route;
pub mod security;

pub mod demo;
pub mod ops;

pub use app::{App, Bound};
pub use config::{ConfigError, NodeConfig, RawConfig};

use std::net::SocketAddr;
use std::path::PathBuf;

/// Errors of building and running a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Transport(#[from] dmsc_transport::TransportError),
    #[error(transparent)]
    Gossip(#[from] dmsc_gossip::GossipError),
    #[error("config says name = `{configured}` but the certificate `{}` is for node `{cert}`: fix one of them", path.display())]
    NameMismatch {
        configured: String,
        cert: String,
        path: PathBuf,
    },
    #[error("cannot bind the {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

impl NodeError {
    /// Exit code for the binary: 64 (EX_USAGE) for configuration problems.
    pub fn exit_code(&self) -> i32 {
        match self {
            NodeError::Config(_) | NodeError::NameMismatch { .. } => 64,
            NodeError::Transport(dmsc_transport::TransportError::ReadFile { .. })
            | NodeError::Transport(dmsc_transport::TransportError::BadPem { .. })
            | NodeError::Transport(dmsc_transport::TransportError::NoPem { .. })
            | NodeError::Transport(dmsc_transport::TransportError::Identity(_)) => 64,
            _ => 1,
        }
    }
}
