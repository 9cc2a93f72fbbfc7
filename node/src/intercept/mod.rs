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
//! Two ways to redirect: eBPF (cgroup bindings, one listener for all of
//! them) or, where eBPF is unavailable and for user-id bindings, nftables
//! ([`nft`]: a listener per binding). `[intercept] mode` picks, `status`
//! shows which runs and why; bindings come from the config and from
//! `dmsc-node intercept enable|disable` (the admin API) while the node
//! runs, and all of them are undone when it stops.
//!
//! Onboarding ([`onboard`]): an agent process redeems a join token bound
//! to its cgroup or user at a node-local metadata endpoint and registers
//! its card; its connections are intercepted from then on.
//!
//! IPv4 destinations (also from dual-stack sockets); real IPv6
//! destinations are not intercepted.

use std::collections::HashMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use dmsc_ebpf::{Cgroup, Interceptor};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::config::{InterceptBinding, InterceptConfig, InterceptMode, InterceptWho};
use crate::ingress::listen::{Conn, Listeners, Protocols};
use crate::ingress::Ingress;

pub mod dns;
pub mod nft;
pub mod onboard;

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

/// How a binding's connects reach the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mechanism {
    Ebpf,
    Nftables,
}

impl Mechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Ebpf => "ebpf",
            Mechanism::Nftables => "nftables",
        }
    }
}

/// One binding, as `status` and the admin API show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindingStatus {
    /// `cgroup /path` or `uid N`.
    pub who: String,
    pub tenant: String,
    pub agent: Option<String>,
    pub mechanism: Mechanism,
    /// nftables: the binding's own listener.
    pub listen: Option<String>,
    /// The only destination ports intercepted (empty: any).
    #[serde(default)]
    pub ports: Vec<u16>,
}

/// A binding as the listener uses it.
struct Bound {
    spec: InterceptBinding,
    mechanism: Mechanism,
    /// Its in-process ingress: its tenant, and its name as the caller in
    /// audit entries and `dmsc-caller`.
    ingress: Arc<Ingress>,
    /// eBPF: the group the programs are attached to.
    cgroup: Option<Cgroup>,
    /// nftables: its rule, and the task accepting on its port.
    nft: Option<NftPart>,
}

/// An nftables binding's part.
struct NftPart {
    rule: nft::Rule,
    task: tokio::task::AbortHandle,
    /// A namespace binding: the namespace (its own table, its listener
    /// inside it) and the routes this node added there.
    netns: Option<(String, Vec<String>)>,
}

impl Bound {
    fn status(&self) -> BindingStatus {
        BindingStatus {
            who: self.spec.who.to_string(),
            tenant: self.spec.tenant.clone(),
            agent: self.spec.agent.clone(),
            mechanism: self.mechanism,
            listen: self.nft.as_ref().map(|n| match &n.netns {
                None => format!("127.0.0.1:{}", n.rule.port),
                Some((ns, _)) => format!("127.0.0.1:{} in netns {ns}", n.rule.port),
            }),
            ports: self.spec.ports.clone(),
        }
    }
}

/// Where an accepted connection came in.
#[derive(Debug, Clone, Copy)]
enum Via {
    /// The eBPF listener: the original destination is in the kernel's map.
    Ebpf,
    /// A binding's nftables port: `SO_ORIGINAL_DST`.
    Nft(u32),
}

type MakeIngress = Box<dyn Fn(&str, &str) -> Arc<Ingress> + Send + Sync>;

/// Interception as configured and running.
pub struct Intercept {
    mode: InterceptMode,
    /// The loaded programs, or why there are none.
    ebpf: Result<Mutex<Interceptor>, String>,
    /// The eBPF listener's address.
    pub listen: SocketAddrV4,
    /// This node's nftables table.
    table: String,
    /// Other tables that redirect locally generated connections too (seen
    /// when ours was last written).
    competing: Mutex<Vec<String>>,
    bindings: RwLock<HashMap<u32, Bound>>,
    next_id: AtomicU32,
    /// One change (enable, disable, stop) at a time.
    change: tokio::sync::Mutex<()>,
    /// Set by [`Intercept::stop`]: no binding after it.
    stopped: std::sync::atomic::AtomicBool,
    /// Address (port 0: any) -> mesh name.
    names: HashMap<SocketAddrV4, String>,
    /// The virtual addresses the DNS responder gave out.
    pub vips: Arc<Mutex<dns::Vips>>,
    /// The virtual range (network, prefix): no real host behind it.
    vip_range: (std::net::Ipv4Addr, u8),
    make_ingress: MakeIngress,
    /// The node's listener budgets: every interception listener is one
    /// (connection limits, header and idle timeouts, in-flight limit).
    listeners: Listeners,
    /// What to undo at stop besides the bindings (the metadata socket,
    /// an address put on `lo`).
    on_stop: Mutex<Vec<Box<dyn FnOnce() + Send>>>,
    pub stats: InterceptStats,
}

impl std::fmt::Debug for Intercept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Intercept")
            .field("listen", &self.listen)
            .field("bindings", &self.bindings().len())
            .finish_non_exhaustive()
    }
}

/// Interception's state for `status`: on (with what) or off (and why).
#[derive(Debug)]
pub enum State {
    On(Arc<Intercept>),
    Off(String),
}

/// Starts interception with the defaults (a node without `[intercept]`).
pub type Starter = Box<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = State> + Send>> + Send + Sync,
>;

/// Interception on a node: started with the node when `[intercept]` is set,
/// else at the first `intercept enable`, with the defaults (no DNS, no
/// metadata endpoint, the eBPF listener on 127.0.0.1:15080).
pub struct Slot {
    state: tokio::sync::OnceCell<State>,
    starter: Option<Starter>,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("state", &self.state.get())
            .finish()
    }
}

impl Slot {
    pub fn started(state: State) -> Slot {
        Slot {
            state: tokio::sync::OnceCell::new_with(Some(state)),
            starter: None,
        }
    }

    pub fn lazy(starter: Starter) -> Slot {
        Slot {
            state: tokio::sync::OnceCell::new(),
            starter: Some(starter),
        }
    }

    /// The state, if interception was started.
    pub fn get(&self) -> Option<&State> {
        self.state.get()
    }

    /// The state, starting interception first if it was not. The start
    /// runs in a task of its own: a caller that goes away (a dropped admin
    /// request) does not leave it half done.
    pub async fn ensure(self: &Arc<Self>) -> &State {
        if let Some(s) = self.state.get() {
            return s;
        }
        let me = self.clone();
        let _ = tokio::spawn(async move {
            me.state
                .get_or_init(|| async {
                    match &me.starter {
                        Some(start) => start().await,
                        None => State::Off("interception could not be started".into()),
                    }
                })
                .await;
        })
        .await;
        self.state
            .get_or_init(|| async { State::Off("interception could not be started".into()) })
            .await
    }

    /// At node stop: undoes what runs, and starts nothing after.
    pub async fn close(&self) {
        let state = self
            .state
            .get_or_init(|| async { State::Off("the node is stopping".into()) })
            .await;
        if let State::On(ic) = state {
            ic.stop().await;
        }
    }
}

/// The named network namespaces (`/run/netns/*`).
fn named_netns() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A listener on 127.0.0.1 (an ephemeral port) inside the named network
/// namespace: opened by a thread that enters it (`setns`) and then ends;
/// the socket stays in the namespace.
fn listener_in(ns: &str) -> Result<std::net::TcpListener, String> {
    let path = format!("/run/netns/{ns}");
    let name = ns.to_string();
    std::thread::spawn(move || -> Result<std::net::TcpListener, String> {
        let f = std::fs::File::open(&path)
            .map_err(|e| format!("network namespace {name}: {path}: {e}"))?;
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("entering network namespace {name}: {e}"))?;
        reserved_listener().map_err(|e| format!("in network namespace {name} (is its lo up?): {e}"))
    })
    .join()
    .map_err(|_| format!("opening a listener in network namespace {ns} failed"))?
}

/// A listener on 127.0.0.1 for an nftables binding, on a privileged port
/// (512-1023) when it can have one: if the node dies, its redirect rules
/// stay until it starts again, and a port only root can bind cannot be
/// taken over by a local user to receive the bound processes' connections
/// meanwhile. Without one (the node lacks the capability, or all are
/// taken) an ephemeral port, with a warning.
fn reserved_listener() -> Result<std::net::TcpListener, String> {
    let l = (512..1024u16)
        .rev()
        .find_map(|p| std::net::TcpListener::bind(("127.0.0.1", p)).ok());
    let l = match l {
        Some(l) => l,
        None => {
            warn!("no privileged port free on 127.0.0.1 for an nftables interception listener; using an ephemeral one (a crashed node's rules could then point at a port a local user binds)");
            std::net::TcpListener::bind("127.0.0.1:0")
                .map_err(|e| format!("an interception listener on 127.0.0.1: {e}"))?
        }
    };
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    Ok(l)
}

/// Takes away routes [`Intercept::bind_netns`] added.
fn remove_routes(ns: &str, routes: &[String]) {
    for r in routes {
        let _ = std::process::Command::new("ip")
            .args(["-n", ns, "route", "del", r, "dev", "lo"])
            .output();
    }
}

/// This process's user id (from /proc/self/status).
fn own_uid() -> Option<u32> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find(|l| l.starts_with("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

impl Intercept {
    /// Loads the programs (unless `mode = "nftables"`), removes a table a
    /// crashed run of this node left, and binds what the config binds.
    /// `node`: this node's name (its nftables table); `own`: this node's
    /// agents, `(url address, mesh name)`; `make_ingress(tenant, caller)`
    /// makes the in-process ingress of a binding.
    pub async fn start(
        cfg: &InterceptConfig,
        node: &str,
        own: Vec<(SocketAddrV4, String)>,
        make_ingress: MakeIngress,
        listeners: Listeners,
    ) -> Result<Arc<Intercept>, String> {
        let mut names = HashMap::new();
        for (addr, name) in own.into_iter().chain(cfg.map.iter().cloned()) {
            if let Err(e) = crate::ingress::parse_host(&name) {
                return Err(format!("intercept.map: {e}"));
            }
            names.insert(addr, name);
        }
        let ebpf = if cfg.mode == InterceptMode::Nftables {
            Err("intercept.mode = \"nftables\"".to_string())
        } else {
            Self::load_ebpf(cfg, &names)
        };
        if let (InterceptMode::Ebpf, Err(why)) = (cfg.mode, &ebpf) {
            return Err(format!("{why} (intercept.mode = \"ebpf\": no fallback)"));
        }
        let table = nft::table_name(node);
        if cfg.mode != InterceptMode::Ebpf && nft::available().is_ok() {
            // What a crashed run left behind, here and in every named
            // network namespace.
            if let Err(e) = nft::apply(&nft::remove_script(&table)) {
                warn!(table = %table, error = %e, "could not remove an old interception table");
            }
            for ns in named_netns() {
                let _ = nft::apply_in(Some(&ns), &nft::remove_script(&table));
            }
        }
        let ic = Arc::new(Intercept {
            mode: cfg.mode,
            ebpf: ebpf.map(Mutex::new),
            listen: cfg.listen,
            table,
            competing: Mutex::new(Vec::new()),
            bindings: RwLock::new(HashMap::new()),
            next_id: AtomicU32::new(1),
            change: tokio::sync::Mutex::new(()),
            stopped: std::sync::atomic::AtomicBool::new(false),
            names,
            vips: Arc::new(Mutex::new(dns::Vips::new(cfg.vip_range.0, cfg.vip_range.1))),
            vip_range: cfg.vip_range,
            make_ingress,
            listeners,
            on_stop: Mutex::new(Vec::new()),
            stats: InterceptStats::default(),
        });
        if let Err(why) = &ic.ebpf {
            info!("eBPF interception unavailable ({why}); cgroup bindings use nftables");
        } else {
            let listener = TcpListener::bind(cfg.listen)
                .await
                .map_err(|e| format!("intercept.listen = {}: {e}", cfg.listen))?;
            ic.spawn(ic.clone().serve(listener, Via::Ebpf));
        }
        for b in &cfg.bindings {
            if let Err(e) = ic.enable(b.clone()).await {
                ic.stop().await;
                return Err(format!("intercept.bindings: {}: {e}", b.who));
            }
        }
        Ok(ic)
    }

    fn load_ebpf(
        cfg: &InterceptConfig,
        names: &HashMap<SocketAddrV4, String>,
    ) -> Result<Interceptor, String> {
        let mut ic = Interceptor::load().map_err(|e| e.to_string())?;
        for (i, addr) in names.keys().enumerate() {
            ic.add_dest(*addr, i as u32).map_err(|e| e.to_string())?;
        }
        ic.add_vip_range(cfg.vip_range.0, cfg.vip_range.1)
            .map_err(|e| e.to_string())?;
        Ok(ic)
    }

    /// Why eBPF is not used, if it is not.
    pub fn fallback(&self) -> Option<&str> {
        self.ebpf.as_ref().err().map(String::as_str)
    }

    /// Other nftables tables that also redirect locally generated
    /// connections (named in `status`: they may take ours first).
    pub fn competing(&self) -> Vec<String> {
        self.competing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// What new cgroup bindings use.
    pub fn mechanism(&self) -> Mechanism {
        if self.ebpf.is_ok() {
            Mechanism::Ebpf
        } else {
            Mechanism::Nftables
        }
    }

    pub fn bindings(&self) -> Vec<BindingStatus> {
        let mut v: Vec<BindingStatus> = self
            .bindings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(Bound::status)
            .collect();
        v.sort_by(|a, b| a.who.cmp(&b.who));
        v
    }

    /// Starts intercepting `spec`'s connects. Binding the same group or
    /// user again with the same tenant and agent changes nothing.
    pub async fn enable(self: &Arc<Self>, spec: InterceptBinding) -> Result<BindingStatus, String> {
        let _one = self.change.lock().await;
        if self.stopped.load(Relaxed) {
            return Err("interception is stopping with the node".into());
        }
        if let Some(b) = self.check(&spec)? {
            return Ok(b);
        }
        let id = self.next_id.fetch_add(1, Relaxed);
        let ingress = (self.make_ingress)(&spec.tenant, &spec.caller());
        let bound = match spec.who.clone() {
            InterceptWho::Uid(u) => self.bind_nft(id, spec, nft::Match::Uid(u), ingress).await?,
            InterceptWho::Netns(ns) => self.bind_netns(id, spec, &ns, ingress).await?,
            InterceptWho::Cgroup(rel) => {
                let cg = Cgroup::resolve(&rel).map_err(|e| e.to_string())?;
                match &self.ebpf {
                    Ok(ic) => {
                        ic.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .bind(&cg, id, self.listen, &spec.ports)
                            .map_err(|e| e.to_string())?;
                        Bound {
                            spec,
                            mechanism: Mechanism::Ebpf,
                            ingress,
                            cgroup: Some(cg),
                            nft: None,
                        }
                    }
                    Err(_) => {
                        if let Ok(own) = dmsc_ebpf::cgroup::own() {
                            if own.path.starts_with(&cg.path) {
                                return Err(format!(
                                    "this node runs inside cgroup {} ({}): its own connections would be redirected to itself",
                                    rel,
                                    own.display()
                                ));
                            }
                        }
                        let mount = dmsc_ebpf::cgroup::mount().map_err(|e| e.to_string())?;
                        let m = nft::Match::cgroup(&mount, &cg.path)?;
                        self.bind_nft(id, spec, m, ingress).await?
                    }
                }
            }
        };
        let status = bound.status();
        info!(who = %bound.spec.who, tenant = %bound.spec.tenant, mechanism = bound.mechanism.as_str(), "interception bound");
        self.bindings
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, bound);
        Ok(status)
    }

    async fn bind_nft(
        self: &Arc<Self>,
        id: u32,
        spec: InterceptBinding,
        who: nft::Match,
        ingress: Arc<Ingress>,
    ) -> Result<Bound, String> {
        nft::available()?;
        let listener = TcpListener::from_std(reserved_listener()?).map_err(|e| e.to_string())?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let rule = nft::Rule {
            who,
            port,
            only_ports: spec.ports.clone(),
        };
        let mut rules = self.nft_rules();
        rules.push(rule.clone());
        self.write_table(&rules)?;
        Ok(self.nft_bound(id, spec, ingress, listener, rule, None))
    }

    /// A named network namespace's processes: a listener opened inside it
    /// and a table of its own there that redirects every selected
    /// destination to it. A namespace without a route to a selected
    /// destination (the virtual range, a mapped address) gets one through
    /// its `lo`, taken away again when the binding goes: the route lookup
    /// comes before the redirect.
    async fn bind_netns(
        self: &Arc<Self>,
        id: u32,
        spec: InterceptBinding,
        ns: &str,
        ingress: Arc<Ingress>,
    ) -> Result<Bound, String> {
        nft::available()?;
        let listener = listener_in(ns)?;
        let listener = TcpListener::from_std(listener).map_err(|e| e.to_string())?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let rule = nft::Rule {
            who: nft::Match::All,
            port,
            only_ports: spec.ports.clone(),
        };
        let dests: Vec<SocketAddrV4> = self.names.keys().copied().collect();
        let mut targets: Vec<String> = vec![format!("{}/{}", self.vip_range.0, self.vip_range.1)];
        targets.extend(dests.iter().map(|d| format!("{}/32", d.ip())));
        targets.dedup();
        let mut routes = Vec::new();
        for t in targets {
            let probe = t.split('/').next().unwrap_or_default().to_string();
            let routed = std::process::Command::new("ip")
                .args(["-n", ns, "route", "get", &probe])
                .output()
                .is_ok_and(|o| o.status.success());
            if !routed {
                let added = std::process::Command::new("ip")
                    .args([
                        "-n",
                        ns,
                        "route",
                        "add",
                        &t,
                        "dev",
                        "lo",
                        "src",
                        "127.0.0.1",
                    ])
                    .output()
                    .map_err(|e| format!("cannot run ip: {e}"))?;
                if added.status.success() {
                    routes.push(t);
                } else {
                    remove_routes(ns, &routes);
                    return Err(format!(
                        "netns {ns}: a route for {t}: {}",
                        String::from_utf8_lossy(&added.stderr).trim()
                    ));
                }
            }
        }
        let script = nft::ruleset(
            &self.table,
            std::slice::from_ref(&rule),
            &dests,
            self.vip_range,
        );
        if let Err(e) = nft::apply_in(Some(ns), &script) {
            remove_routes(ns, &routes);
            return Err(format!("netns {ns}: {e}"));
        }
        let netns = Some((ns.to_string(), routes));
        Ok(self.nft_bound(id, spec, ingress, listener, rule, netns))
    }

    /// An nftables binding whose rules are in place: its listener starts.
    fn nft_bound(
        self: &Arc<Self>,
        id: u32,
        spec: InterceptBinding,
        ingress: Arc<Ingress>,
        listener: TcpListener,
        rule: nft::Rule,
        netns: Option<(String, Vec<String>)>,
    ) -> Bound {
        let task = tokio::spawn(self.clone().serve(listener, Via::Nft(id)));
        Bound {
            spec,
            mechanism: Mechanism::Nftables,
            ingress,
            cgroup: None,
            nft: Some(NftPart {
                rule,
                task: task.abort_handle(),
                netns,
            }),
        }
    }

    /// The host table's rules, in binding order (so a process that two
    /// bindings match is always taken by the older one).
    fn nft_rules(&self) -> Vec<nft::Rule> {
        let bindings = self.bindings.read().unwrap_or_else(|p| p.into_inner());
        let mut ids: Vec<&u32> = bindings.keys().collect();
        ids.sort_unstable();
        ids.into_iter()
            .filter_map(|id| bindings.get(id)?.nft.as_ref())
            .filter(|n| n.netns.is_none())
            .map(|n| n.rule.clone())
            .collect()
    }

    /// Writes the table with `rules` (removes it when there are none).
    fn write_table(&self, rules: &[nft::Rule]) -> Result<(), String> {
        if rules.is_empty() {
            return nft::apply(&nft::remove_script(&self.table));
        }
        let competing = nft::competing_tables(&self.table);
        if !competing.is_empty() {
            warn!(tables = ?competing, "other nftables tables also redirect locally generated connections; they may take intercepted connections first");
        }
        *self.competing.lock().unwrap_or_else(|p| p.into_inner()) = competing;
        let dests: Vec<SocketAddrV4> = self.names.keys().copied().collect();
        nft::apply(&nft::ruleset(&self.table, rules, &dests, self.vip_range))
    }

    /// Stops intercepting `who`'s connects; false if it was not bound.
    pub async fn disable(&self, who: &InterceptWho) -> Result<bool, String> {
        let _one = self.change.lock().await;
        self.unbind(who)
    }

    fn unbind(&self, who: &InterceptWho) -> Result<bool, String> {
        let removed = {
            let mut bindings = self.bindings.write().unwrap_or_else(|p| p.into_inner());
            let id = bindings
                .iter()
                .find(|(_, b)| &b.spec.who == who)
                .map(|(id, _)| *id);
            id.and_then(|id| Some((id, bindings.remove(&id)?)))
        };
        let Some((id, b)) = removed else {
            return Ok(false);
        };
        // The redirect goes first, the listener after: a redirect must
        // never point at a port nobody of ours listens on. If the redirect
        // cannot be undone, the binding stays (and says why).
        let undone = match (&b.cgroup, &self.ebpf, &b.nft) {
            (Some(cg), Ok(ic), _) => ic
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .unbind(cg)
                .map(drop)
                .map_err(|e| e.to_string()),
            (_, _, Some(n)) => match &n.netns {
                None => self.write_table(&self.nft_rules()),
                Some((ns, _)) => nft::apply_in(Some(ns), &nft::remove_script(&self.table))
                    .map_err(|e| format!("netns {ns}: {e}")),
            },
            _ => Ok(()),
        };
        if let Err(e) = undone {
            self.bindings
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, b);
            return Err(e);
        }
        if let Some(n) = &b.nft {
            n.task.abort();
            if let Some((ns, routes)) = &n.netns {
                remove_routes(ns, routes);
            }
        }
        info!(who = %who, "interception unbound");
        Ok(true)
    }

    /// What [`Self::enable`] would refuse `spec` for, checked without
    /// changing anything (onboarding checks before it spends a token);
    /// `Some` when it is bound that way already.
    pub fn check(&self, spec: &InterceptBinding) -> Result<Option<BindingStatus>, String> {
        let bindings = self.bindings.read().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = bindings.values().find(|b| b.spec.who == spec.who) {
            if &b.spec == spec {
                return Ok(Some(b.status()));
            }
            return Err(format!(
                "{} is already bound (as {}); disable it first",
                spec.who,
                b.spec.caller()
            ));
        }
        let ebpf_only = self.mode == InterceptMode::Ebpf;
        match &spec.who {
            InterceptWho::Uid(_) | InterceptWho::Netns(_) if ebpf_only => Err(format!(
                "{} needs nftables (intercept.mode = \"ebpf\")",
                spec.who
            )),
            InterceptWho::Uid(u) if own_uid() == Some(*u) => Err(format!(
                "uid {u} is this node's own: its connections would be redirected to itself"
            )),
            InterceptWho::Netns(ns) if !Path::new("/run/netns").join(ns).exists() => Err(format!(
                "network namespace {ns} does not exist (no /run/netns/{ns})"
            )),
            InterceptWho::Cgroup(rel) => Cgroup::resolve(rel)
                .map(|_| None)
                .map_err(|e| e.to_string()),
            _ => Ok(None),
        }
    }

    /// Whether `who` is bound now.
    pub fn is_bound(&self, who: &InterceptWho) -> bool {
        self.bindings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .any(|b| &b.spec.who == who)
    }

    /// Undoes every binding (the node is stopping): programs detached,
    /// this node's nftables table deleted. Nothing is bound after it.
    pub async fn stop(&self) {
        let _one = self.change.lock().await;
        self.stopped.store(true, Relaxed);
        let all: Vec<InterceptWho> = self
            .bindings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|b| b.spec.who.clone())
            .collect();
        for who in all {
            if let Err(e) = self.unbind(&who) {
                warn!(who = %who, error = %e, "interception could not be undone");
            }
        }
        let undo: Vec<_> =
            std::mem::take(&mut *self.on_stop.lock().unwrap_or_else(|p| p.into_inner()));
        for f in undo {
            f();
        }
    }

    /// Runs `task` until interception stops.
    pub fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        use tracing::Instrument as _;
        let handle = tokio::spawn(task.in_current_span()).abort_handle();
        self.on_stop(move || handle.abort());
    }

    /// Runs `f` when interception stops.
    pub fn on_stop(&self, f: impl FnOnce() + Send + 'static) {
        self.on_stop
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(f));
    }

    /// Connects the kernel redirected, and those established.
    pub fn kernel_stats(&self) -> Option<dmsc_ebpf::Stats> {
        self.ebpf
            .as_ref()
            .ok()?
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

    /// Accepts intercepted connections until the node stops (or, for an
    /// nftables binding, until it is disabled), with the limits of every
    /// listener of the node ([`crate::ingress::listen`]).
    async fn serve(self: Arc<Self>, listener: TcpListener, via: Via) {
        let at = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        info!(listen = %at, via = ?via, "interception listening");
        let server = self
            .listeners
            .server(format!("intercept:{at}"), Protocols::Auto);
        server
            .run(listener, move |stream, peer, conn| {
                let this = self.clone();
                async move { this.connection(stream, peer, via, conn).await }
            })
            .await
    }

    /// The binding and original destination of an accepted connection.
    async fn original(
        &self,
        stream: &TcpStream,
        peer: SocketAddr,
        via: Via,
    ) -> Option<(u32, SocketAddrV4)> {
        match via {
            Via::Nft(id) => {
                let dst = socket2::SockRef::from(stream)
                    .original_dst_v4()
                    .ok()?
                    .as_socket_ipv4()?;
                // Not NATed: someone dialled the port itself.
                (stream.local_addr().ok() != Some(SocketAddr::V4(dst))).then_some((id, dst))
            }
            Via::Ebpf => {
                let SocketAddr::V4(p4) = peer else {
                    return None;
                };
                let ic = self.ebpf.as_ref().ok()?;
                let take = || ic.lock().unwrap_or_else(|p| p.into_inner()).take_orig(p4);
                let orig = match take() {
                    Ok(Some(o)) => Some(o),
                    // The kernel writes the entry before the client's final
                    // ACK; one short wait covers a scheduler that is behind.
                    Ok(None) => {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        take().ok().flatten()
                    }
                    Err(e) => {
                        warn!(error = %e, "interception map lookup failed");
                        None
                    }
                }?;
                Some((orig.binding, orig.dst))
            }
        }
    }

    async fn connection(&self, stream: TcpStream, peer: SocketAddr, via: Via, conn: Conn) {
        let Some((binding, dst)) = self.original(&stream, peer, via).await else {
            // Not redirected: someone dialled the listener itself.
            self.stats.unmatched.fetch_add(1, Relaxed);
            debug!(%peer, "connection to the interception listener without an original destination: closed");
            return;
        };
        let found = self
            .bindings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&binding)
            .map(|b| {
                let netns = b.nft.as_ref().is_some_and(|n| n.netns.is_some());
                (b.ingress.clone(), b.spec.who.clone(), netns)
            });
        let Some((ingress, who, in_netns)) = found else {
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
            let target = self.name_of(dst);
            debug!(%peer, %dst, target = ?target, %who, "intercepted HTTP connection");
            ingress.serve_intercepted(conn, stream, peer, target).await;
        } else if self.is_virtual(*dst.ip()) || in_netns {
            // No host behind a virtual address to pass it to; and a
            // namespace's connection would be passed on from the node's
            // own namespace, reaching what the namespace cannot.
            self.stats.unmatched.fetch_add(1, Relaxed);
            debug!(%peer, %dst, "not HTTP, to a virtual address or from a bound namespace: closed");
        } else {
            self.stats.passthrough.fetch_add(1, Relaxed);
            passthrough(stream, dst).await;
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
