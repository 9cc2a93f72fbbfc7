//! dmsc-node: the application that assembles a mesh node.
//!
//! The binary (`src/main.rs`) only parses the command line and calls into
//! this library, so every behaviour here is driven directly by tests:
//! [`config`] (layered settings), [`app`] (build, run, drain), [`admin`]
//! (the operator API), [`status`] (the report and its rendering),
//! [`metrics`] and [`demo`]. A delegation walks [`ingress`] -> [`delegate`]
//! (selection in [`mesh`], delivery locally or over the overlay in the
//! [`wire`] format) -> the agent; [`agents`] onboards this node's own agents.
//! [`security`] holds credentials, enrollment, revocations, caller
//! authentication and the audit trail. What a caller can make the node do
//! is bounded by [`budget`] (buffered bodies), [`throttle`] (enrollment),
//! [`forwarded`] (the headers an agent may believe) and [`fault`] (a
//! caller's failure is never charged to an agent).

#![forbid(unsafe_code)]

pub mod a2a;
pub mod admin;
pub mod agents;
pub mod app;
pub mod budget;
pub mod config;
pub mod delegate;
pub mod demo;
pub mod fault;
pub mod forwarded;
pub mod http;
pub mod ingress;
pub mod mesh;
pub mod metrics;
pub mod ops;
pub mod sample_agent;
pub mod security;
pub mod status;
pub mod testkit;
pub mod throttle;
pub mod wire;

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
