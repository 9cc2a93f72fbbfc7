//! dmsc-ebpf: transparent interception of agents' outbound connections.
//!
//! Why: the requirements make interception without agent code changes a
//! MUST. An unmodified agent connects to `billing.acme.dmsc:80` (or to an
//! agent's real `IP:PORT`); a cgroup `connect4` program rewrites that
//! connect to the node's interception listener and remembers the original
//! destination, so the node can route the connection as if the agent had
//! called its ingress with that `Host`. The agent never sees it: its
//! `getpeername` answers the original address.
//!
//! The programs (`bpf/intercept.bpf.c`) are C, compiled by clang in the
//! build script (this toolchain has no Rust BPF target) and loaded with aya.
//! How the node learns the original destination of a connection it
//! accepted: `connect4` records it by the client socket's cookie, a
//! `sockops` program copies it, once the connection is established, to a
//! map keyed by the client's own address, which the node sees as the peer
//! of the accepted socket ([`Interceptor::take_orig`]).
//!
//! The links are file descriptors this process owns (aya uses
//! `bpf_link_create` on kernels from 5.7; older ones are refused): nothing
//! stays attached after the process exits, crash included, and nothing is
//! pinned. IPv4 destinations, from IPv4 sockets and from dual-stack IPv6
//! sockets (`::ffff:a.b.c.d`, which reach `connect6`); real IPv6
//! destinations are not redirected (the listener is IPv4).

pub mod cgroup;
mod layout;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};

pub use cgroup::Cgroup;
pub use layout::Orig;

/// Why interception by eBPF is not available or failed.
#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error("eBPF interception is not built in: {0}")]
    NotBuilt(&'static str),
    #[error("kernel {0} is older than 5.7: BPF links (which die with the node) are unavailable")]
    OldKernel(String),
    #[error("cgroup {path}: {reason}")]
    Cgroup { path: String, reason: String },
    #[error("loading the interception programs: {0}")]
    Load(String),
    #[error("attaching to cgroup {path}: {reason}")]
    Attach { path: String, reason: String },
    #[error("interception map {map}: {reason}")]
    Map { map: &'static str, reason: String },
}

/// Whether this build carries the programs (clang was found at build time).
pub fn built() -> bool {
    cfg!(not(dmsc_no_bpf))
}

/// Counters of the programs (summed over CPUs).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Connects rewritten to the listener.
    pub redirected: u64,
    /// Connects let through because their original could not be recorded.
    pub unrecorded: u64,
    /// Redirected connections established (original handed to the node).
    pub established: u64,
}

/// The loaded programs and what is attached where. Dropping it detaches
/// everything.
pub struct Interceptor {
    ebpf: aya::Ebpf,
    /// Link ids per bound cgroup id.
    links: HashMap<u64, Links>,
}

struct Links {
    binding: u32,
    /// The binding's port filter (empty: every port).
    ports: Vec<u16>,
    /// connect4, connect6, getpeername4, getpeername6.
    sock_addr: Vec<(
        &'static str,
        aya::programs::cgroup_sock_addr::CgroupSockAddrLinkId,
    )>,
    sockops: aya::programs::sock_ops::SockOpsLinkId,
}

impl std::fmt::Debug for Interceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interceptor")
            .field("bound_cgroups", &self.links.keys().collect::<Vec<_>>())
            .finish()
    }
}

const CONNECT4: &str = "dmsc_connect4";
const CONNECT6: &str = "dmsc_connect6";
const GETPEERNAME4: &str = "dmsc_getpeername4";
const GETPEERNAME6: &str = "dmsc_getpeername6";
const SOCK_ADDR: [&str; 4] = [CONNECT4, CONNECT6, GETPEERNAME4, GETPEERNAME6];
const SOCKOPS: &str = "dmsc_sockops";

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> InterceptError {
    move |e| InterceptError::Map {
        map,
        reason: e.to_string(),
    }
}

impl Interceptor {
    /// Loads the programs into the kernel (nothing is attached yet). The
    /// calling process's own cgroup is never redirected.
    pub fn load() -> Result<Interceptor, InterceptError> {
        if !built() {
            return Err(InterceptError::NotBuilt(
                "clang was not found when dmsc was built (install clang and libbpf-dev and rebuild)",
            ));
        }
        #[cfg(dmsc_no_bpf)]
        let object: &[u8] = &[];
        #[cfg(not(dmsc_no_bpf))]
        let object: &[u8] =
            aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/intercept.bpf.o"));
        let kernel = aya::util::KernelVersion::current()
            .map_err(|e| InterceptError::Load(format!("kernel version: {e}")))?;
        if kernel < aya::util::KernelVersion::new(5, 7, 0) {
            return Err(InterceptError::OldKernel(format!("{kernel:?}")));
        }
        let mut ebpf = aya::Ebpf::load(object).map_err(|e| InterceptError::Load(e.to_string()))?;
        for name in SOCK_ADDR {
            let p: &mut aya::programs::CgroupSockAddr = program(&mut ebpf, name)?;
            p.load()
                .map_err(|e| InterceptError::Load(format!("{name}: {e}")))?;
        }
        let p: &mut aya::programs::SockOps = program(&mut ebpf, SOCKOPS)?;
        p.load()
            .map_err(|e| InterceptError::Load(format!("{SOCKOPS}: {e}")))?;
        let mut me = Interceptor {
            ebpf,
            links: HashMap::new(),
        };
        if let Ok(own) = cgroup::own() {
            let mut config: aya::maps::Array<_, u64> = me.map("config")?;
            config.set(0, own.id, 0).map_err(map_err("config"))?;
        }
        Ok(me)
    }

    fn map<'a, T>(&'a mut self, name: &'static str) -> Result<T, InterceptError>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
    {
        let m = self.ebpf.map_mut(name).ok_or(InterceptError::Map {
            map: name,
            reason: "not in the object".into(),
        })?;
        T::try_from(m).map_err(map_err(name))
    }

    /// Redirects connects of processes in `cg` (and below it) to the
    /// selected destinations to `listener`; `binding` names the binding in
    /// what [`take_orig`](Self::take_orig) returns; `ports`, if not empty,
    /// are the only destination ports redirected. Refused if the calling
    /// process itself is inside `cg` (its own connects would loop).
    pub fn bind(
        &mut self,
        cg: &Cgroup,
        binding: u32,
        listener: SocketAddrV4,
        ports: &[u16],
    ) -> Result<(), InterceptError> {
        if let Ok(own) = cgroup::own() {
            if own.path.starts_with(&cg.path) {
                return Err(InterceptError::Cgroup {
                    path: cg.display(),
                    reason: format!(
                        "this node runs inside it ({}): its own connections would be redirected to itself",
                        own.display()
                    ),
                });
            }
        }
        if self.links.contains_key(&cg.id) {
            self.unbind(cg)?;
        }
        let file = std::fs::File::open(&cg.path).map_err(|e| InterceptError::Cgroup {
            path: cg.display(),
            reason: e.to_string(),
        })?;
        let attach_err = |e: aya::programs::ProgramError| InterceptError::Attach {
            path: cg.display(),
            reason: chain(&e),
        };
        // A BPF link takes no attach flags (the kernel refuses any with
        // EINVAL) and always coexists with other programs on the group,
        // like BPF_F_ALLOW_MULTI; aya passes `Single` as 0.
        let mode = aya::programs::links::CgroupAttachMode::Single;
        {
            let mut filter: aya::maps::HashMap<_, [u32; 2], u32> = self.map("ports")?;
            for p in ports {
                filter
                    .insert([binding, u32::from(*p)], 1, 0)
                    .map_err(map_err("ports"))?;
            }
        }
        let mut sock_addr = Vec::new();
        for name in SOCK_ADDR {
            let p: &mut aya::programs::CgroupSockAddr = program(&mut self.ebpf, name)?;
            match p.attach(&file, mode) {
                Ok(link) => sock_addr.push((name, link)),
                Err(e) => {
                    // Undo the part already attached.
                    for (name, link) in sock_addr {
                        let p: &mut aya::programs::CgroupSockAddr = program(&mut self.ebpf, name)?;
                        let _ = p.detach(link);
                    }
                    return Err(attach_err(e));
                }
            }
        }
        let p: &mut aya::programs::SockOps = program(&mut self.ebpf, SOCKOPS)?;
        let sockops = match p.attach(&file, mode) {
            Ok(l) => l,
            Err(e) => {
                for (name, link) in sock_addr {
                    let p: &mut aya::programs::CgroupSockAddr = program(&mut self.ebpf, name)?;
                    let _ = p.detach(link);
                }
                return Err(attach_err(e));
            }
        };
        self.links.insert(
            cg.id,
            Links {
                binding,
                ports: ports.to_vec(),
                sock_addr,
                sockops,
            },
        );
        let mut bindings: aya::maps::HashMap<_, u64, [u32; 4]> = self.map("bindings")?;
        bindings
            .insert(
                cg.id,
                layout::binding(binding, listener, !ports.is_empty()),
                0,
            )
            .map_err(map_err("bindings"))
    }

    /// Stops redirecting `cg`'s connects; false if it was not bound.
    pub fn unbind(&mut self, cg: &Cgroup) -> Result<bool, InterceptError> {
        let Some(links) = self.links.remove(&cg.id) else {
            return Ok(false);
        };
        let detach_err = |e: aya::programs::ProgramError| InterceptError::Attach {
            path: cg.display(),
            reason: format!("detach: {e}"),
        };
        // The binding first: from then on the programs let its connects
        // through, whatever becomes of the detaching. (Already gone is fine.)
        {
            let mut bindings: aya::maps::HashMap<_, u64, [u32; 4]> = self.map("bindings")?;
            let _ = bindings.remove(&cg.id);
            let mut filter: aya::maps::HashMap<_, [u32; 2], u32> = self.map("ports")?;
            for p in &links.ports {
                let _ = filter.remove(&[links.binding, u32::from(*p)]);
            }
        }
        for (name, link) in links.sock_addr {
            let p: &mut aya::programs::CgroupSockAddr = program(&mut self.ebpf, name)?;
            p.detach(link).map_err(detach_err)?;
        }
        let p: &mut aya::programs::SockOps = program(&mut self.ebpf, SOCKOPS)?;
        p.detach(links.sockops).map_err(detach_err)?;
        Ok(true)
    }

    /// The cgroups bound now, by id.
    pub fn bound(&self) -> Vec<u64> {
        self.links.keys().copied().collect()
    }

    /// Connects to `dst` (port 0: any port of that address) from a bound
    /// cgroup are redirected; `target` is handed back in [`Orig`].
    pub fn add_dest(&mut self, dst: SocketAddrV4, target: u32) -> Result<(), InterceptError> {
        let mut dests: aya::maps::HashMap<_, [u32; 2], [u32; 2]> = self.map("dests")?;
        dests
            .insert(layout::addr(dst), [target, 0], 0)
            .map_err(map_err("dests"))
    }

    pub fn remove_dest(&mut self, dst: SocketAddrV4) -> Result<(), InterceptError> {
        let mut dests: aya::maps::HashMap<_, [u32; 2], [u32; 2]> = self.map("dests")?;
        let _ = dests.remove(&layout::addr(dst));
        Ok(())
    }

    /// Connects to any address of `net/prefix` (the virtual range of
    /// `.dmsc` names), any port, from a bound cgroup are redirected.
    pub fn add_vip_range(&mut self, net: Ipv4Addr, prefix: u8) -> Result<(), InterceptError> {
        let mut vips: aya::maps::LpmTrie<_, u32, u32> = self.map("vips")?;
        let key = aya::maps::lpm_trie::Key::new(u32::from(prefix.min(32)), layout::ip(net));
        vips.insert(&key, 1, 0).map_err(map_err("vips"))
    }

    /// The original destination of a connection the listener accepted from
    /// `peer` (its client's address), taken out of the map; `None` if the
    /// connection was not redirected.
    pub fn take_orig(&mut self, peer: SocketAddrV4) -> Result<Option<Orig>, InterceptError> {
        let mut peers: aya::maps::HashMap<_, [u32; 2], [u32; 8]> = self.map("orig_by_peer")?;
        let key = layout::addr(peer);
        match peers.get(&key, 0) {
            Ok(v) => {
                let _ = peers.remove(&key);
                Ok(Some(layout::orig(v)))
            }
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err("orig_by_peer")(e)),
        }
    }

    /// The programs' counters.
    pub fn stats(&mut self) -> Result<Stats, InterceptError> {
        let stats: aya::maps::PerCpuArray<_, u64> = self.map("stats")?;
        let sum = |i: u32| -> Result<u64, InterceptError> {
            Ok(stats.get(&i, 0).map_err(map_err("stats"))?.iter().sum())
        };
        Ok(Stats {
            redirected: sum(0)?,
            unrecorded: sum(1)?,
            established: sum(2)?,
        })
    }
}

/// An error with its causes (aya's syscall errors keep the errno in the source).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

fn program<'a, T>(ebpf: &'a mut aya::Ebpf, name: &str) -> Result<&'a mut T, InterceptError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf
        .program_mut(name)
        .ok_or_else(|| InterceptError::Load(format!("program {name} is not in the object")))?;
    p.try_into()
        .map_err(|e| InterceptError::Load(format!("{name}: {e}")))
}
