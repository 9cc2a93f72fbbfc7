//! The lab: hosts, networks and routers as Linux network namespaces.
//!
//! Shape, and why:
//! - every network is a Linux bridge inside one "switch" namespace of the
//!   lab (not in the root namespace: the machine's own interfaces and
//!   firewall are never touched, and deleting the lab's namespaces removes
//!   every bridge and veth with them);
//! - a host is a namespace with one veth into its network's bridge; its
//!   interface is named after the network; a network `k` is
//!   `10.99.k.0/24`, its router (if any) is `.1`, hosts get `.2`, `.3`, ...;
//! - a router is a namespace with one interface in each of two networks,
//!   forwarding, and (for NAT) masquerading on the outside interface and
//!   dropping unsolicited inbound connections, like a home or cloud NAT.
//!   [`Nat::EndpointIndependent`] is plain `masquerade` (Linux keeps the
//!   source port, so one mapping serves every destination: hole punching
//!   works); [`Nat::Symmetric`] is `masquerade fully-random` (a new port per
//!   flow: a peer cannot predict it, so the pair stays relayed);
//! - partitions and blocked UDP are nftables rules in the hosts' own
//!   `inet dmsc_chaos` table, in separate chains so that [`Lab::heal`] and
//!   [`Lab::unblock_udp`] undo exactly their own rules.
//!
//! Namespaces are named `dmsc-<pid>-<lab>-<name>`: unique per lab, and
//! a later run deletes those left by a process that no longer exists (a
//! crashed or killed run), with every process still inside them.

use crate::{run, show, Error, Result};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

/// How a router translates addresses for the network behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// Plain routing, no translation.
    None,
    /// `masquerade`: endpoint-independent mapping (port preserved).
    EndpointIndependent,
    /// `masquerade fully-random`: a new random port per flow (symmetric).
    Symmetric,
}

#[derive(Debug)]
struct Network {
    index: u8,
    next_host: u8,
    gateway: Option<Ipv4Addr>,
}

#[derive(Debug)]
struct Host {
    ns: String,
    net: String,
    addr: Ipv4Addr,
}

/// A set of namespaces forming hosts, networks and routers. Dropping it
/// kills every process in them and deletes them.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    switch: String,
    networks: BTreeMap<String, Network>,
    hosts: BTreeMap<String, Host>,
    /// Namespaces of routers (they have no single address).
    routers: BTreeMap<String, String>,
    /// Every namespace created, in order: teardown deletes these, also
    /// those of a host or router whose setup failed half-way.
    created: Vec<String>,
    dir: tempfile::TempDir,
}

const TABLE: &str = "dmsc_chaos";

impl Lab {
    /// A new, empty lab; first deletes namespaces left by dead earlier runs.
    pub fn new() -> Result<Lab> {
        clean_stale()?;
        // Several labs in one process (tests) each get their own number.
        static LABS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let k = LABS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let prefix = format!("dmsc-{}-{k}-", std::process::id());
        // Same pid as a crashed run (pid reuse): its leftovers are ours to remove.
        for ns in list_namespaces()? {
            if ns.starts_with(&prefix) {
                delete_namespace(&ns);
            }
        }
        let switch = format!("{prefix}sw");
        add_namespace(&switch)?;
        let switch_ns = switch.clone();
        // DMSC_CHAOS_KEEP=1 keeps configs and node logs for a post-mortem.
        let keep = std::env::var_os("DMSC_CHAOS_KEEP").is_some();
        let dir = tempfile::Builder::new()
            .prefix("dmsc-chaos-")
            .disable_cleanup(keep)
            .tempdir()
            .map_err(Error::io("create the lab's run directory"))?;
        if keep {
            eprintln!(
                "dmsc-chaos: keeping the lab's files in {}",
                dir.path().display()
            );
        }
        Ok(Lab {
            prefix,
            switch: switch_ns,
            networks: BTreeMap::new(),
            hosts: BTreeMap::new(),
            routers: BTreeMap::new(),
            created: vec![switch],
            dir,
        })
    }

    /// The lab's run directory (configs, certificates, logs); removed on
    /// drop unless `DMSC_CHAOS_KEEP` is set.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Adds a network (a bridge) `10.99.<n>.0/24`, `n` counting from 0.
    pub fn network(&mut self, name: &str) -> Result<()> {
        check_ifname(name)?;
        if self.networks.contains_key(name) {
            return Err(Error::Setup(format!("network `{name}` exists")));
        }
        let index = u8::try_from(self.networks.len())
            .map_err(|_| Error::Setup("too many networks".into()))?;
        let sw = self.switch.clone();
        ip(&sw, &["link", "add", &br(name), "type", "bridge"])?;
        ip(&sw, &["link", "set", &br(name), "up"])?;
        self.networks.insert(
            name.to_string(),
            Network {
                index,
                next_host: 2,
                gateway: None,
            },
        );
        Ok(())
    }

    /// Adds host `name` on network `net`; returns its address.
    pub fn host(&mut self, name: &str, net: &str) -> Result<Ipv4Addr> {
        let ns = self.ns_name(name)?;
        let addr = self.attach(&ns, name, net, None)?;
        let gateway = self.net(net)?.gateway;
        if let Some(gw) = gateway {
            ip(&ns, &["route", "add", "default", "via", &gw.to_string()])?;
        }
        base_table(&ns)?;
        self.hosts.insert(
            name.to_string(),
            Host {
                ns,
                net: net.to_string(),
                addr,
            },
        );
        Ok(addr)
    }

    /// Adds router `name` between `inside` (it becomes that network's
    /// gateway, `.1`, and its hosts' default route) and `outside`, where it
    /// gets a host address; returns that outside address.
    pub fn router(
        &mut self,
        name: &str,
        inside: &str,
        outside: &str,
        nat: Nat,
    ) -> Result<Ipv4Addr> {
        let ns = self.ns_name(name)?;
        let gw = {
            let n = self.net(inside)?;
            if n.gateway.is_some() {
                return Err(Error::Setup(format!("network `{inside}` has a router")));
            }
            Ipv4Addr::new(10, 99, n.index, 1)
        };
        self.attach(&ns, name, inside, Some(gw))?;
        let public = self.attach(&ns, name, outside, None)?;
        run(Command::new("ip")
            .args(["netns", "exec", &ns, "sysctl", "-qw"])
            .arg("net.ipv4.ip_forward=1"))?;
        let masquerade = match nat {
            Nat::None => None,
            Nat::EndpointIndependent => Some("masquerade"),
            Nat::Symmetric => Some("masquerade fully-random"),
        };
        if let Some(m) = masquerade {
            nft(
                &ns,
                &format!(
                    "table ip {TABLE}_nat {{
  chain nat_post {{ type nat hook postrouting priority srcnat; policy accept; oifname \"{outside}\" {m}; }}
}}
table inet {TABLE}_fw {{
  chain forward_filter {{ type filter hook forward priority filter; policy accept;
    iifname \"{outside}\" ct state established,related accept;
    iifname \"{outside}\" drop; }}
}}"
                ),
            )?;
        }
        for h in self.hosts.values().filter(|h| h.net == inside) {
            ip(
                &h.ns,
                &["route", "replace", "default", "via", &gw.to_string()],
            )?;
        }
        if let Some(n) = self.networks.get_mut(inside) {
            n.gateway = Some(gw);
        }
        self.routers.insert(name.to_string(), ns);
        Ok(public)
    }

    /// The namespace name prefix of this lab (`dmsc-<pid>-<lab>-`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The address of host `name`.
    pub fn addr(&self, name: &str) -> Result<Ipv4Addr> {
        Ok(self.get(name)?.addr)
    }

    /// The namespace of host or router `name`.
    pub fn ns(&self, name: &str) -> Result<String> {
        if let Some(ns) = self.routers.get(name) {
            return Ok(ns.clone());
        }
        Ok(self.get(name)?.ns.clone())
    }

    /// A command that runs `program` inside host `name`'s namespace.
    pub fn command(&self, name: &str, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(name)?]).arg(program);
        Ok(cmd)
    }

    /// Drops every packet between each host in `a` and each host in `b`,
    /// both ways (by address: for hosts that see each other's own address).
    pub fn partition(&self, a: &[&str], b: &[&str]) -> Result<()> {
        for (side, other) in [(a, b), (b, a)] {
            let others = other
                .iter()
                .map(|h| self.addr(h).map(|a| a.to_string()))
                .collect::<Result<Vec<_>>>()?
                .join(", ");
            for h in side {
                let ns = &self.get(h)?.ns;
                nft(
                    ns,
                    &format!(
                        "add rule inet {TABLE} part_in ip saddr {{ {others} }} drop
add rule inet {TABLE} part_out ip daddr {{ {others} }} drop"
                    ),
                )?;
            }
        }
        Ok(())
    }

    /// Removes every partition.
    pub fn heal(&self) -> Result<()> {
        for h in self.hosts.values() {
            nft(
                &h.ns,
                &format!("flush chain inet {TABLE} part_in\nflush chain inet {TABLE} part_out"),
            )?;
        }
        Ok(())
    }

    /// Drops all UDP to and from host `name` (but not on its loopback).
    pub fn block_udp(&self, name: &str) -> Result<()> {
        nft(
            &self.get(name)?.ns,
            &format!(
                "add rule inet {TABLE} block_in iifname != \"lo\" meta l4proto udp drop
add rule inet {TABLE} block_out oifname != \"lo\" meta l4proto udp drop"
            ),
        )
    }

    /// Undoes [`Lab::block_udp`].
    pub fn unblock_udp(&self, name: &str) -> Result<()> {
        nft(
            &self.get(name)?.ns,
            &format!("flush chain inet {TABLE} block_in\nflush chain inet {TABLE} block_out"),
        )
    }

    /// Sets the MTU of every interface of host or router `name` (not its
    /// loopback): a path MTU that shrinks under running connections.
    /// Packets over it that arrive from the networks' switch-side ports
    /// are dropped without a word, as behind many tunnels.
    pub fn set_mtu(&self, name: &str, mtu: u16) -> Result<()> {
        let ns = self.ns(name)?;
        let out = run(Command::new("ip").args(["-n", &ns, "-o", "link", "show"]))?;
        for line in out.lines() {
            // `2: site@if5: <...> mtu 1500 ...`
            let Some(ifname) = line.split(": ").nth(1) else {
                continue;
            };
            let ifname = ifname.split('@').next().unwrap_or(ifname);
            if ifname != "lo" {
                ip(&ns, &["link", "set", ifname, "mtu", &mtu.to_string()])?;
            }
        }
        Ok(())
    }

    /// Kills every process in the lab's namespaces and deletes them.
    pub fn teardown(&mut self) {
        for ns in self.created.drain(..).rev() {
            delete_namespace(&ns);
        }
        self.hosts.clear();
        self.routers.clear();
    }

    fn ns_name(&mut self, name: &str) -> Result<String> {
        if self.hosts.contains_key(name) || self.routers.contains_key(name) {
            return Err(Error::Setup(format!("host `{name}` exists")));
        }
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(Error::Setup(format!("host name `{name}`: use [a-z0-9-]")));
        }
        let ns = format!("{}{name}", self.prefix);
        add_namespace(&ns)?;
        self.created.push(ns.clone());
        ip(&ns, &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Connects namespace `ns` to network `net`: a veth whose inside end is
    /// named after the network; returns the address given to it.
    fn attach(
        &mut self,
        ns: &str,
        name: &str,
        net: &str,
        fixed: Option<Ipv4Addr>,
    ) -> Result<Ipv4Addr> {
        let n = self
            .networks
            .get_mut(net)
            .ok_or_else(|| Error::Setup(format!("no network `{net}`")))?;
        let addr = match fixed {
            Some(a) => a,
            None => {
                let a = Ipv4Addr::new(10, 99, n.index, n.next_host);
                n.next_host = n
                    .next_host
                    .checked_add(1)
                    .ok_or_else(|| Error::Setup(format!("network `{net}` is full")))?;
                a
            }
        };
        // The switch-side port: short and unique (interface names are at
        // most 15 bytes), from the network and host octets.
        let port = format!("p{}-{}", n.index, addr.octets()[3]);
        let sw = self.switch.clone();
        ip(
            &sw,
            &[
                "link", "add", &port, "type", "veth", "peer", "name", net, "netns", ns,
            ],
        )
        .map_err(|e| Error::Setup(format!("connect `{name}` to `{net}`: {e}")))?;
        ip(&sw, &["link", "set", &port, "master", &br(net)])?;
        ip(&sw, &["link", "set", &port, "up"])?;
        ip(ns, &["addr", "add", &format!("{addr}/24"), "dev", net])?;
        ip(ns, &["link", "set", net, "up"])?;
        Ok(addr)
    }

    fn get(&self, name: &str) -> Result<&Host> {
        self.hosts
            .get(name)
            .ok_or_else(|| Error::Setup(format!("no host `{name}`")))
    }

    fn net(&self, name: &str) -> Result<&Network> {
        self.networks
            .get(name)
            .ok_or_else(|| Error::Setup(format!("no network `{name}`")))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn br(net: &str) -> String {
    format!("br-{net}")
}

fn check_ifname(name: &str) -> Result<()> {
    // The bridge is `br-<name>`: 15 bytes at most.
    if name.is_empty()
        || name.len() > 12
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(Error::Setup(format!(
            "network name `{name}`: 1 to 12 characters of [a-z0-9-] (it names interfaces)"
        )));
    }
    Ok(())
}

/// The base firewall of a host: empty chains for partitions and blocks.
fn base_table(ns: &str) -> Result<()> {
    nft(
        ns,
        &format!(
            "table inet {TABLE} {{
  chain part_in {{ type filter hook input priority filter; policy accept; }}
  chain part_out {{ type filter hook output priority filter; policy accept; }}
  chain block_in {{ type filter hook input priority 10; policy accept; }}
  chain block_out {{ type filter hook output priority 10; policy accept; }}
}}"
        ),
    )
}

fn ip(ns: &str, args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(["-n", ns]).args(args)).map(drop)
}

/// Applies an nft script inside namespace `ns` (atomically: one transaction).
fn nft(ns: &str, script: &str) -> Result<()> {
    use std::io::Write;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| Error::Spawn {
        cmd: show(&cmd),
        source,
    })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(Error::io("write an nft script"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(Error::io("wait for nft"))?;
    if !out.status.success() {
        return Err(Error::Command {
            cmd: format!("{} <<< {script}", show(&cmd)),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

fn add_namespace(ns: &str) -> Result<()> {
    run(Command::new("ip").args(["netns", "add", ns])).map(drop)
}

fn list_namespaces() -> Result<Vec<String>> {
    let out = run(Command::new("ip").args(["netns", "list"]))?;
    // Lines look like `name` or `name (id: 3)`.
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect())
}

/// Kills every process in `ns`, then deletes it. Best effort: used on
/// teardown, where an error has nowhere better to go than stderr.
fn delete_namespace(ns: &str) {
    if let Ok(pids) = run(Command::new("ip").args(["netns", "pids", ns])) {
        for pid in pids.split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
    }
    if let Err(e) = run(Command::new("ip").args(["netns", "del", ns])) {
        eprintln!("dmsc-chaos: cannot delete namespace {ns}: {e}");
    }
}

/// Deletes `dmsc-<pid>-*` namespaces whose process is gone.
fn clean_stale() -> Result<()> {
    for ns in list_namespaces()? {
        let Some(pid) = ns
            .strip_prefix("dmsc-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("dmsc-chaos: removing stale namespace {ns} (its run, pid {pid}, is gone)");
            delete_namespace(&ns);
        }
    }
    Ok(())
}
