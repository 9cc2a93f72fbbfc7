//! Transparent interception: agents call the mesh with no code change.
//!
//! An unmodified agent in a bound cgroup connects to an agent's real
//! address (or, later, to a `.dmsc` name's virtual address); the kernel
//! (`dmsc_ebpf`: a cgroup connect hook) sends the connection to this
//! node's interception listener instead, and keeps where it was going. The
//! listener takes that original destination back for each connection it
//! accepts, names it (`<agent>.<tenant>.dmsc` from this node's own agents'
//! URLs and `[[intercept.map]]`), and serves the connection through an
//! in-process ingress of the binding's tenant: the request then takes the
//! normal path (policy, routing, audit) as if the agent had called the
//! ingress with that `Host`. Everything here is per connection; requests
//! cost what they cost at the ingress.
//!
//! A connection that does not start like HTTP (TLS, or a protocol where the
//! server speaks first) passes through untouched to its original
//! destination, from the node (outside the cgroup, so not redirected).
//!
//! Who calls: the binding (`intercept:<tenant>/<agent>`), as the kernel
//! saw the connection come from its cgroup; no credential in the agent.
//!
//! Names: `[intercept] dns` answers `.dmsc` names with virtual addresses
//! ([`dns`]); a connection to one is named back from it.
//!
//! Not yet: the nftables fallback (without eBPF interception is off and
//! `status` says why), IPv6, the CLI, onboarding.

use std::collections::HashMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dmsc_ebpf::{Cgroup, Interceptor};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::config::InterceptConfig;
use crate::ingress::Ingress;

pub mod dns;

/// How long a connection may stay silent before it is taken for a
/// protocol where the server speaks first (and passed through).
const DETECT_TIMEOUT: Duration = Duration::from_secs(1);

/// What `status` shows.
#[derive(Debug, Default)]
pub struct InterceptStats {
    pub http: AtomicU64,
    pub passthrough: AtomicU64,
    /// Connections to the listener with no original destination (not
    /// redirected by the kernel: refused).
    pub unmatched: AtomicU64,
}

/// A binding as the listener uses it.
struct Bound {
    cgroup: String,
    /// Its in-process ingress: its tenant, and its name as the caller in
    /// audit entries and `dmsc-caller` (`intercept:<tenant>/<agent>`, or
    /// the cgroup when the binding names no agent).
    ingress: Arc<Ingress>,
}

/// Interception as configured and running.
pub struct Intercept {
    ic: Mutex<Interceptor>,
    pub listen: SocketAddrV4,
    bindings: HashMap<u32, Bound>,
    /// Address (port 0: any) -> mesh name.
    names: HashMap<SocketAddrV4, String>,
    /// The virtual addresses the DNS responder gave out.
    pub vips: Arc<Mutex<dns::Vips>>,
    /// The virtual range (network, prefix): no real host behind it.
    vip_range: (std::net::Ipv4Addr, u8),
    pub stats: InterceptStats,
}

impl std::fmt::Debug for Intercept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Intercept")
            .field("listen", &self.listen)
            .field("bindings", &self.bindings.len())
            .finish_non_exhaustive()
    }
}

/// Interception's state for `status`: on (with what) or off (and why).
#[derive(Debug)]
pub enum State {
    On(Arc<Intercept>),
    Off(String),
}

impl Intercept {
    /// Loads the programs, binds every cgroup and maps every named address.
    /// `own`: this node's agents, `(url address, mesh name)`.
    /// `ingress(tenant, caller)` makes the in-process ingress of a binding.
    pub fn start(
        cfg: &InterceptConfig,
        own: Vec<(SocketAddrV4, String)>,
        ingress: impl Fn(&str, &str) -> Arc<Ingress>,
    ) -> Result<Intercept, String> {
        let mut ic = Interceptor::load().map_err(|e| e.to_string())?;
        let mut bindings = HashMap::new();
        for (i, b) in cfg.bindings.iter().enumerate() {
            let id = i as u32 + 1;
            let cg = Cgroup::resolve(&b.cgroup).map_err(|e| e.to_string())?;
            ic.bind(&cg, id, cfg.listen).map_err(|e| e.to_string())?;
            let caller = match &b.agent {
                Some(a) => format!("intercept:{}/{a}", b.tenant),
                None => format!("intercept:{}:cgroup:{}", b.tenant, b.cgroup),
            };
            bindings.insert(
                id,
                Bound {
                    cgroup: b.cgroup.clone(),
                    ingress: ingress(&b.tenant, &caller),
                },
            );
        }
        let mut names = HashMap::new();
        for (i, (addr, name)) in own.into_iter().chain(cfg.map.iter().cloned()).enumerate() {
            if let Err(e) = crate::ingress::parse_host(&name) {
                return Err(format!("intercept.map: {e}"));
            }
            ic.add_dest(addr, i as u32).map_err(|e| e.to_string())?;
            names.insert(addr, name);
        }
        ic.add_vip_range(cfg.vip_range.0, cfg.vip_range.1)
            .map_err(|e| e.to_string())?;
        Ok(Intercept {
            ic: Mutex::new(ic),
            listen: cfg.listen,
            bindings,
            names,
            vips: Arc::new(Mutex::new(dns::Vips::new(cfg.vip_range.0, cfg.vip_range.1))),
            vip_range: cfg.vip_range,
            stats: InterceptStats::default(),
        })
    }

    pub fn bindings(&self) -> usize {
        self.bindings.len()
    }

    /// Connects the kernel redirected, and those established.
    pub fn kernel_stats(&self) -> Option<dmsc_ebpf::Stats> {
        self.ic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stats()
            .ok()
    }

    fn name_of(&self, dst: SocketAddrV4) -> Option<String> {
        self.names
            .get(&dst)
            .or_else(|| self.names.get(&SocketAddrV4::new(*dst.ip(), 0)))
            .cloned()
            .or_else(|| {
                self.vips
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .name(*dst.ip())
                    .map(str::to_string)
            })
    }

    fn is_virtual(&self, ip: std::net::Ipv4Addr) -> bool {
        let (net, prefix) = self.vip_range;
        let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        u32::from(ip) & mask == u32::from(net) & mask
    }

    /// Accepts intercepted connections until the node stops.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        info!(listen = %self.listen, bindings = self.bindings.len(), "interception listening (eBPF)");
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    debug!(error = %e, "interception accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let this = self.clone();
            tokio::spawn(async move { this.connection(stream, peer).await });
        }
    }

    async fn connection(&self, stream: TcpStream, peer: SocketAddr) {
        let SocketAddr::V4(p4) = peer else {
            self.stats.unmatched.fetch_add(1, Relaxed);
            return;
        };
        let take = || {
            self.ic
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take_orig(p4)
        };
        let orig = match take() {
            Ok(Some(o)) => Some(o),
            // The kernel writes the entry before the client's final ACK;
            // one short wait covers a scheduler that is behind.
            Ok(None) => {
                tokio::time::sleep(Duration::from_millis(1)).await;
                take().ok().flatten()
            }
            Err(e) => {
                warn!(error = %e, "interception map lookup failed");
                None
            }
        };
        let Some(orig) = orig else {
            // Not redirected: someone dialled the listener itself.
            self.stats.unmatched.fetch_add(1, Relaxed);
            debug!(%peer, "connection to the interception listener without an original destination: closed");
            return;
        };
        let Some(bound) = self.bindings.get(&orig.binding) else {
            self.stats.unmatched.fetch_add(1, Relaxed);
            return;
        };
        let mut first = [0u8; 16];
        let n = match tokio::time::timeout(DETECT_TIMEOUT, stream.peek(&mut first)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) => return,
            Err(_) => 0,
        };
        if looks_like_http(&first[..n]) {
            self.stats.http.fetch_add(1, Relaxed);
            let target = self.name_of(orig.dst);
            debug!(%peer, dst = %orig.dst, target = ?target, cgroup = %bound.cgroup, uid = orig.uid, "intercepted HTTP connection");
            bound.ingress.serve_intercepted(stream, peer, target).await;
        } else if self.is_virtual(*orig.dst.ip()) {
            // No host behind a virtual address to pass it to.
            self.stats.unmatched.fetch_add(1, Relaxed);
            debug!(%peer, dst = %orig.dst, "not HTTP, to a virtual address: closed");
        } else {
            self.stats.passthrough.fetch_add(1, Relaxed);
            passthrough(stream, orig.dst).await;
        }
    }
}

/// The start of an HTTP/1 request line, or HTTP/2's connection preface.
fn looks_like_http(b: &[u8]) -> bool {
    const METHODS: [&[u8]; 9] = [
        b"GET ",
        b"POST ",
        b"PUT ",
        b"DELETE ",
        b"HEAD ",
        b"OPTIONS ",
        b"PATCH ",
        b"TRACE ",
        b"PRI * HTTP/2",
    ];
    // (A peek may return fewer bytes than a method name: then what came
    // must be the start of one, and at least four bytes of it.)
    b.len() >= 4
        && METHODS.iter().any(|m| {
            if b.len() >= m.len() {
                b.starts_with(m)
            } else {
                m.starts_with(b)
            }
        })
}

/// Relays a connection that is not HTTP to where it was going.
async fn passthrough(mut client: TcpStream, dst: SocketAddrV4) {
    match TcpStream::connect(dst).await {
        Ok(mut upstream) => {
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        }
        Err(e) => debug!(%dst, error = %e, "passthrough connect failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_is_told_from_other_protocols_by_its_first_bytes() {
        for yes in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"POST /x",
            b"PRI * HTTP/2.0\r\n",
            b"DELETE /a",
        ] {
            assert!(looks_like_http(yes), "{}", String::from_utf8_lossy(yes));
        }
        for no in [
            &b"\x16\x03\x01\x02\x00"[..],
            b"SSH-2.0-x",
            b"",
            b"G",
            b"HELLO",
        ] {
            assert!(!looks_like_http(no), "{}", String::from_utf8_lossy(no));
        }
    }
}
