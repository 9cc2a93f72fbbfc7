//! `dmsc-chaos up hybrid-cloud`: the topology of
//! `topology-examples/hybrid-cloud/` brought up in namespaces.
//!
//! The node configs live in that directory as plain TOML an operator would
//! copy (with comments); this module builds the lab they assume (the
//! addresses in the files are the ones the lab hands out, in this order)
//! and starts the nodes and their sample agents. Shape:
//!
//! ```text
//!  wan 10.99.0.0/24 ("the internet")
//!    relay-1 .2   eu-1 .3   us-1 .4      (the relay, two cloud regions)
//!    onprem-gw .5 --NAT-- onprem 10.99.1.0/24: onprem-1 .2
//!    branch-gw .6 --NAT-- branch 10.99.2.0/24: branch-1 .2 (UDP blocked)
//! ```

use crate::lab::{Lab, Nat};
use crate::node::{AgentProc, MeshCa, NodeProc};
use crate::{Error, Result};
use std::path::Path;

/// Hosts in start order: (host, network, the agent it is home to and its tag).
pub const HOSTS: [(&str, &str, &str, &str); 5] = [
    ("relay-1", "wan", "", ""),
    ("eu-1", "wan", "billing-eu", "billing"),
    ("us-1", "wan", "billing-us", "billing"),
    ("onprem-1", "onprem", "ledger", "ledger"),
    ("branch-1", "branch", "inventory", "inventory"),
];

/// The running topology; dropping it stops everything and removes the lab.
#[derive(Debug)]
pub struct Hybrid {
    pub nodes: Vec<NodeProc>,
    pub agents: Vec<AgentProc>,
    // Last: dropped after the processes.
    pub lab: Lab,
}

/// Builds the lab, issues certificates, starts agents and nodes with the
/// configs in `configs` (the `topology-examples/hybrid-cloud` directory).
pub fn up(bin: &Path, configs: &Path) -> Result<Hybrid> {
    let mut lab = Lab::new()?;
    for net in ["wan", "onprem", "branch"] {
        lab.network(net)?;
    }
    for (host, net, ..) in HOSTS.iter().filter(|h| h.1 == "wan") {
        lab.host(host, net)?;
    }
    lab.router("onprem-gw", "onprem", "wan", Nat::EndpointIndependent)?;
    lab.router("branch-gw", "branch", "wan", Nat::Symmetric)?;
    for (host, net, ..) in HOSTS.iter().filter(|h| h.1 != "wan") {
        lab.host(host, net)?;
    }
    lab.block_udp("branch-1")?;
    let ca = MeshCa::init(bin, &lab.dir().join("ca"))?;
    let mut agents = Vec::new();
    let mut nodes = Vec::new();
    for (host, _, agent, tag) in HOSTS {
        if !agent.is_empty() {
            agents.push(AgentProc::start(
                &lab,
                bin,
                host,
                "127.0.0.1:9101",
                agent,
                tag,
            )?);
        }
        let src = configs.join(format!("{host}.toml"));
        let dst = lab.dir().join(format!("{host}.toml"));
        std::fs::copy(&src, &dst).map_err(Error::io(format!("copy {}", src.display())))?;
        ca.issue_node(host, &lab.dir().join(host))?;
        nodes.push(NodeProc::start_file(&lab, bin, host, host, &dst, &[])?);
        eprintln!("{host} is up ({})", lab.addr(host)?);
    }
    Ok(Hybrid { nodes, agents, lab })
}
