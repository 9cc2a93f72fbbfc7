//! Chaos tests for dmsc: real `dmsc-node` processes on emulated hosts.
//!
//! Why namespaces and not the in-memory simulations: `gossip/tests/sim.rs`
//! and `node/tests/multiprocess.rs` prove the protocols on one loopback;
//! this crate proves the *deployed* shape. Each host is a Linux network
//! namespace with its own interfaces, addresses and firewall; networks are
//! bridges; routers forward and masquerade (NAT); partitions and blocked
//! UDP are nftables rules. Nothing leaves the lab: every address is in
//! 10.99.0.0/16, no namespace has a route out, and the namespaces (and every
//! process in them) are removed when the [`Lab`] is dropped, also on panic.
//!
//! - [`lab`]: hosts, networks, routers with NAT, partitions, blocked UDP;
//! - [`node`]: the mesh CA, node configs, `dmsc-node` processes in hosts,
//!   `status --json`;
//! - [`load`]: a minimal blocking HTTP/1.1 load generator (keep-alive),
//!   run as `dmsc-chaos load` inside a namespace, since the workspace
//!   forbids the `unsafe` a `setns` from the test process would need;
//! - [`udp`]: UDP echo and probe, to check the lab's NATs and filters;
//! - [`bench`]: `dmsc-chaos bench-relay`, issue 11's relay benchmarks;
//! - [`hybrid`]: the `topology-examples/hybrid-cloud` lab behind
//!   `dmsc-chaos up hybrid-cloud`.

pub mod bench;
pub mod hybrid;
pub mod lab;
pub mod load;
pub mod node;
pub mod udp;

pub use lab::{Lab, Nat};
pub use load::{LoadSpec, Summary};
pub use node::{MeshCa, NodeConfig, NodeProc};

use std::process::Command;

/// Everything that can go wrong while building or driving a lab.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot run `{cmd}`: {source} (is it installed and on PATH?)")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("invalid lab setup: {0}")]
    Setup(String),
    #[error(
        "node `{name}` did not print `dmsc-node ready` ({why}; limit {secs} s); its last log lines:\n{log}"
    )]
    NotReady {
        name: String,
        why: String,
        secs: u64,
        log: String,
    },
    #[error("cannot parse the output of {what}: {detail}")]
    Parse { what: String, detail: String },
    #[error("HTTP: {0}")]
    Http(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

/// Renders a command as a shell-like line for error messages.
pub(crate) fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().to_string();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion; its stdout on success, else an error with
/// its stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().map_err(|source| Error::Spawn {
        cmd: show(cmd),
        source,
    })?;
    if !out.status.success() {
        return Err(Error::Command {
            cmd: show(cmd),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// Why the lab cannot run on this machine, if it cannot: not root, or
/// `ip`/`nft` missing or unable to create a namespace.
pub fn preflight() -> Option<String> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        });
    if uid.as_deref() != Some("0") {
        return Some(format!(
            "not root (effective uid {}): network namespaces, veth pairs and nftables need CAP_NET_ADMIN; run the tests as root (CI does)",
            uid.as_deref().unwrap_or("unknown")
        ));
    }
    for (tool, arg, package) in [("ip", "-V", "iproute2"), ("nft", "--version", "nftables")] {
        if let Err(e) = run(Command::new(tool).arg(arg)) {
            return Some(format!("`{tool}` is not usable ({e}); install {package}"));
        }
    }
    None
}
