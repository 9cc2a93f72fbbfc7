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
//! - [`policy`]: which tenant a caller, and a calling node, may act for:
//!   pure decisions, the same at the ingress and on the home node.
//! - [`drain`]: graceful shutdown: the node's count of requests in
//!   flight and the switch that makes every entrance refuse new work.
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
pub mod drain;
pub mod edge;
pub mod forward;
pub mod ingress;
pub mod intent;
pub mod intercept;
pub mod limits;
pub mod metrics;
pub mod policy;
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
    #[error(transparent)]
    Security(#[from] security::SecurityError),
    #[error("cannot encode this node's gossip announcement: {0}")]
    Announcement(serde_json::Error),
}

impl NodeError {
    /// Exit code for the binary: 64 (EX_USAGE) for configuration problems.
    pub fn exit_code(&self) -> i32 {
        // Unreadable or malformed credential files are configuration too.
        let file = |t: &dmsc_transport::TransportError| {
            matches!(
                t,
                dmsc_transport::TransportError::ReadFile { .. }
                    | dmsc_transport::TransportError::BadPem { .. }
                    | dmsc_transport::TransportError::NoPem { .. }
                    | dmsc_transport::TransportError::Identity(_)
                    | dmsc_transport::TransportError::Statement(_)
            )
        };
        match self {
            NodeError::Config(_) | NodeError::NameMismatch { .. } => 64,
            NodeError::Security(security::SecurityError::NoJwksSource) => 64,
            NodeError::Transport(t)
            | NodeError::Security(security::SecurityError::Transport(t))
                if file(t) =>
            {
                64
            }
            _ => 1,
        }
    }
}

/// The layers of [`crate`] in import order: a module may use the modules of
/// its own layer and of layers before it, never one after it. Checked by a
/// test that reads every source file, so a new import against the grain
/// fails CI instead of growing a cycle back.
#[cfg(test)]
mod layering {
    use std::path::{Path, PathBuf};

    /// Top-level modules, lowest layer first. `demo` and `ops` stand apart:
    /// they may use everything, and nothing on the request path uses them.
    const LAYERS: &[&str] = &[
        "proto",
        "config",
        "metrics",
        "security",
        "policy",
        "limits",
        "route",
        "intent",
        "forward",
        "ingress",
        "control",
        "edge",
        "intercept",
        "admin",
        "app",
        "ops",
        "demo",
    ];

    fn layer_of(module: &str) -> Option<usize> {
        LAYERS.iter().position(|l| *l == module)
    }

    fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).expect("read src dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                sources(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    /// The top-level module a file belongs to (`forward/local.rs` -> `forward`).
    fn module_of(src: &Path, file: &Path) -> Option<String> {
        let rel = file.strip_prefix(src).ok()?;
        let first = rel.components().next()?.as_os_str().to_str()?;
        Some(first.trim_end_matches(".rs").to_string())
    }

    /// Every `crate::<module>` a source file names (in `use` or in paths).
    fn crate_refs(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = text;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.push(name);
            }
        }
        out
    }

    #[test]
    fn modules_import_only_earlier_layers() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&src, &mut files);
        let mut violations = Vec::new();
        for f in &files {
            let Some(module) = module_of(&src, f) else {
                continue;
            };
            let Some(mine) = layer_of(&module) else {
                // lib.rs, main.rs: the root and the binary see everything.
                continue;
            };
            let text = std::fs::read_to_string(f).expect("read source");
            // Only code: a test module may reach up to build fixtures, and
            // a doc link is not an import.
            let code: String = text
                .split("#[cfg(test)]")
                .next()
                .unwrap_or_default()
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            for r in crate_refs(&code) {
                if let Some(theirs) = layer_of(&r) {
                    if theirs > mine {
                        violations.push(format!(
                            "{} (layer `{module}`) uses `crate::{r}`, a later layer",
                            f.strip_prefix(&src).unwrap_or(f).display()
                        ));
                    }
                }
            }
        }
        assert!(violations.is_empty(), "{}", violations.join("\n"));
        // The check itself must see the tree (a moved src dir would pass vacuously).
        assert!(files.len() > 20, "only {} sources found", files.len());
    }

    #[test]
    fn the_check_catches_an_upward_import() {
        assert_eq!(crate_refs("use crate::forward::Delegator;"), ["forward"]);
        let (forward, route) = (layer_of("forward"), layer_of("route"));
        assert!(route < forward, "route sits below forward");
    }
}
