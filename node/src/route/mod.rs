//! This node's view of the mesh's agents: the registry fed from gossip, plus
//! what only this node knows about each agent (its own outstanding requests
//! and its circuit breaker).
//!
//! The registry is read-mostly: selection takes a read lock for a few
//! microseconds. The sync loop asks gossip only for the nodes whose state
//! version moved since the last scan, diffs their raw values against what
//! it applied before, and takes the write lock only for what changed, so an
//! unchanged mesh costs neither copying nor re-indexing. Agents of nodes that are dead or
//! left are dropped at the scan that first sees them so, which is how a
//! failed node's agents leave every candidate set within the failure
//! detection time; records whose TTL lapsed (a node alive but no longer
//! refreshing them) are dropped too.

pub mod attempts;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use dmsc_gossip::MemberState;
use dmsc_registry::{
    AgentCard, AgentId, AgentRecord, Circuit, CircuitConfig, CircuitState, LoadReport, LocalState,
    Registry,
};

use crate::proto::gossip::NodeAnnouncement;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Critical sections are single map or state-machine operations; a
    // poisoned lock leaves them consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// What this node alone knows about one agent.
#[derive(Debug)]
pub struct AgentLocal {
    /// Requests this node has sent to the agent and not yet seen finish.
    pub outstanding: AtomicU32,
    pub circuit: Mutex<Circuit>,
}

/// Decrements an agent's outstanding count when the request is done
/// (dropped with the response body, so streams count until they end).
#[derive(Debug)]
pub struct Outstanding(Arc<AgentLocal>);

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A hash of a gossiped value, to notice that it changed.
fn value_hash(v: &str) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(v)
}

/// What the last scans said about one node.
#[derive(Debug)]
struct NodeCache {
    name: String,
    generation: u64,
    version: u64,
    live: bool,
    addr: Option<SocketAddr>,
    /// Newest delegation wire version the node announced.
    wire: u8,
    /// Hashes of its `agent/` and `load/` values by agent, while it is live:
    /// what changed since the last scan (the values themselves live in
    /// gossip and, decoded, in the registry; a third copy costs ~350 bytes
    /// per agent). Empty while it is not live: nothing of it is registered.
    /// Keyed by `tenant/name` in one string ([`cache_key`]): half the
    /// size of an [`AgentId`] and one allocation instead of two.
    records: HashMap<Box<str>, (u64, u64)>,
    /// Its `node` record, as announced.
    ann: Option<NodeAnnouncement>,
    /// Relays: the nodes with a live session (`relay/clients`).
    relay_clients: Option<Vec<String>>,
}

/// How long an agent whose home node went away is remembered for the
/// error a caller gets (503 "home node down", not 404 "unknown agent").
const RECENTLY_GONE: Duration = Duration::from_secs(300);
/// Bound of that memory (a whole large node going away fits).
const MAX_RECENTLY_GONE: usize = 100_000;

/// Where node `e` is reached (its overlay address and wire version), or
/// why it cannot be. A relayed node (announced so, or on a mapped address
/// whatever it says) counts as reachable only through a live relay that
/// lists it among its sessions: a claim no relay backs is no route. The
/// backing relay must be another live node with the relay role, or this
/// node (`me`) itself with a session for it (`own_clients`).
fn route_of(
    e: &NodeCache,
    cache: &HashMap<String, NodeCache>,
    me: &str,
    own_clients: &[String],
) -> Result<(SocketAddr, u8), &'static str> {
    if !e.live {
        return Err("gossip sees it down");
    }
    let Some(addr) = e.addr else {
        return Err("it announced no overlay address");
    };
    let backed = match &e.ann {
        Some(a)
            if a.reachability != "direct" || dmsc_transport::path::is_mapped(a.overlay_addr) =>
        {
            a.via.iter().filter(|r| **r != e.name).any(|r| {
                if r == me {
                    return own_clients.contains(&e.name);
                }
                cache.get(r).is_some_and(|rc| {
                    rc.live
                        && rc
                            .ann
                            .as_ref()
                            .is_some_and(|ra| ra.roles.iter().any(|x| x == "relay"))
                        && rc
                            .relay_clients
                            .as_ref()
                            .is_some_and(|c| c.contains(&e.name))
                })
            })
        }
        _ => true,
    };
    if backed {
        Ok((addr, e.wire))
    } else {
        Err("it is reachable only through relays, and no live relay has a session with it")
    }
}

/// The key of an agent in [`NodeCache::records`].
fn cache_key(id: &AgentId) -> Box<str> {
    format!("{}/{}", id.tenant, id.name).into_boxed_str()
}

impl NodeCache {
    /// Takes in its `node` record; true if that changed.
    fn set_ann(&mut self, ann: Option<NodeAnnouncement>) -> bool {
        self.addr = ann.as_ref().map(|a| a.overlay_addr);
        self.wire = ann.as_ref().map(|a| a.wire).unwrap_or(1);
        let changed = self.ann != ann;
        self.ann = ann;
        changed
    }

    fn new(name: &str, generation: u64) -> NodeCache {
        NodeCache {
            name: name.to_string(),
            generation,
            version: 0,
            live: false,
            addr: None,
            ann: None,
            relay_clients: None,
            wire: 1,
            records: HashMap::new(),
        }
    }
}

/// The registry plus per-agent local state and the node address book.
#[derive(Debug)]
pub struct MeshView {
    pub me: String,
    registry: RwLock<Registry>,
    local: RwLock<HashMap<AgentId, Arc<AgentLocal>>>,
    circuit_cfg: CircuitConfig,
    /// This node's circuits for the paths to other nodes (created at a
    /// path's first failure): a home node that cannot be reached, or whose
    /// connection is lost mid-delegation, is judged here once for all its
    /// agents instead of being charged to each of them.
    paths: RwLock<HashMap<String, Mutex<Circuit>>>,
    /// Node name -> overlay address, from the gossiped `node` key.
    /// Live nodes: overlay address and the delegation wire version they speak.
    nodes: RwLock<HashMap<String, (SocketAddr, u8)>>,
    /// Agents whose home node went down or left recently: the node, and
    /// when (so a call by name says "home node down", not "unknown agent").
    recently_gone: Mutex<HashMap<AgentId, (String, Instant)>>,
    /// Live nodes' `node` records, and a counter bumped when they change.
    announcements: Mutex<Vec<NodeAnnouncement>>,
    /// On a relay: the nodes with a live session here (gossip does not show
    /// a node its own state).
    own_relay_clients: Mutex<Vec<String>>,
    announcements_version: std::sync::atomic::AtomicU64,
    /// What the last scans said per node (raw values), to apply only changes.
    per_node: Mutex<HashMap<String, NodeCache>>,
    /// Unix ms of the last TTL expiry pass.
    last_expiry: std::sync::atomic::AtomicU64,
    /// Agent cards by digest (local agents' and remote ones fetched on demand).
    cards: Mutex<HashMap<String, Arc<AgentCard>>>,
}

impl MeshView {
    pub fn new(me: &str, circuit_cfg: CircuitConfig, choice: dmsc_registry::Choice) -> MeshView {
        let mut registry = Registry::new();
        registry.set_choice(choice);
        MeshView {
            me: me.to_string(),
            registry: RwLock::new(registry),
            local: RwLock::new(HashMap::new()),
            circuit_cfg,
            paths: RwLock::new(HashMap::new()),
            nodes: RwLock::new(HashMap::new()),
            recently_gone: Mutex::new(HashMap::new()),
            announcements: Mutex::new(Vec::new()),
            own_relay_clients: Mutex::new(Vec::new()),
            announcements_version: Default::default(),
            per_node: Mutex::new(HashMap::new()),
            last_expiry: std::sync::atomic::AtomicU64::new(0),
            cards: Mutex::new(HashMap::new()),
        }
    }

    /// Intent routing's margin of equal scores (`delegation.intent_margin`).
    pub fn set_intent_margin(&self, margin: f32) {
        self.write().set_intent_margin(margin);
    }

    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, Registry> {
        self.registry.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn write(&self) -> std::sync::RwLockWriteGuard<'_, Registry> {
        self.registry.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The local state of `id`, created on first use.
    pub fn local(&self, id: &AgentId) -> Arc<AgentLocal> {
        if let Some(l) = self.local.read().unwrap_or_else(|p| p.into_inner()).get(id) {
            return l.clone();
        }
        self.local
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.clone())
            .or_insert_with(|| {
                Arc::new(AgentLocal {
                    outstanding: AtomicU32::new(0),
                    circuit: Mutex::new(Circuit::new(self.circuit_cfg.clone())),
                })
            })
            .clone()
    }

    /// Counts one request to `id` until the returned guard drops.
    pub fn begin(&self, id: &AgentId) -> (Arc<AgentLocal>, Outstanding) {
        let l = self.local(id);
        l.outstanding.fetch_add(1, Ordering::Relaxed);
        (l.clone(), Outstanding(l))
    }

    /// Asks the circuit of `id` for permission to send (moves an open
    /// circuit whose wait is over to half-open and counts the probe).
    pub fn admit(&self, id: &AgentId) -> bool {
        lock(&self.local(id).circuit).admit(Instant::now())
    }

    pub fn record_outcome(&self, id: &AgentId, ok: bool) {
        let l = self.local(id);
        let changed = judge(&mut lock(&l.circuit), ok);
        if let Some((from, to)) = changed {
            tracing::info!(agent = %id, %from, %to, "circuit changed");
        }
    }

    /// Asks the circuit of the path to `node` for permission to send (this
    /// node's own agents need no path).
    pub fn admit_path(&self, node: &str) -> bool {
        let paths = self.paths.read().unwrap_or_else(|p| p.into_inner());
        paths
            .get(node)
            .is_none_or(|c| lock(c).admit(Instant::now()))
    }

    /// Records whether the path to `node` carried a delegation to its home
    /// node (an answer of any kind from it counts as the path working).
    pub fn record_path(&self, node: &str, ok: bool) {
        if node == self.me {
            return;
        }
        let changed = if ok {
            // A path that never failed has no circuit to tell.
            let paths = self.paths.read().unwrap_or_else(|p| p.into_inner());
            let changed = paths.get(node).and_then(|c| judge(&mut lock(c), true));
            changed
        } else {
            let mut paths = self.paths.write().unwrap_or_else(|p| p.into_inner());
            let c = paths
                .entry(node.to_string())
                .or_insert_with(|| Mutex::new(Circuit::new(self.circuit_cfg.clone())));
            let changed = judge(&mut lock(c), false);
            changed
        };
        if let Some((from, to)) = changed {
            tracing::info!(node, %from, %to, "path circuit changed");
        }
    }

    /// The circuit of the path to `node` (closed for a path that never
    /// failed).
    pub fn path_state(&self, node: &str) -> CircuitState {
        let paths = self.paths.read().unwrap_or_else(|p| p.into_inner());
        paths
            .get(node)
            .map_or(CircuitState::Closed, |c| lock(c).state(Instant::now()))
    }

    /// Drops this node's state for an agent that left, unless requests to
    /// it are still in flight (their guards hold it).
    fn forget_local(&self, id: &AgentId) {
        let mut local = self.local.write().unwrap_or_else(|p| p.into_inner());
        if local
            .get(id)
            .is_some_and(|l| l.outstanding.load(Ordering::Relaxed) == 0)
        {
            local.remove(id);
        }
    }

    /// The circuit of `id` as requests last left it (closed for an agent
    /// never called). Read-only: a status page over 100k agents must not
    /// create state for each.
    pub fn circuit_state(&self, id: &AgentId) -> CircuitState {
        let local = self.local.read().unwrap_or_else(|p| p.into_inner());
        match local.get(id) {
            Some(l) => lock(&l.circuit).state(Instant::now()),
            None => CircuitState::Closed,
        }
    }

    pub fn outstanding(&self, id: &AgentId) -> u32 {
        self.local
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|l| l.outstanding.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// On a relay: records the nodes with a live session here.
    pub fn set_own_relay_clients(&self, names: Vec<String>) {
        *lock(&self.own_relay_clients) = names;
    }

    /// Live nodes' `node` records and their version (bumped on change), so
    /// the sync loop hands relays and `via` lists to the overlay only when
    /// they changed.
    pub fn announcements(&self) -> (u64, Vec<NodeAnnouncement>) {
        let a = lock(&self.announcements);
        (
            self.announcements_version.load(Ordering::Relaxed),
            a.clone(),
        )
    }

    /// True if `node` announced `region` (false when unknown or not seen).
    pub fn in_region(&self, node: &str, region: &str) -> bool {
        lock(&self.per_node)
            .get(node)
            .and_then(|c| c.ann.as_ref())
            .is_some_and(|a| a.region == region)
    }

    /// A live node's overlay address and the delegation wire version it speaks.
    pub fn node_route(&self, node: &str) -> Option<(SocketAddr, u8)> {
        self.nodes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .copied()
    }

    /// The node `id` lived on, when that node went down or left within
    /// [`RECENTLY_GONE`] and `id` has no home since.
    pub fn recently_gone(&self, id: &AgentId) -> Option<(String, Duration)> {
        let g = lock(&self.recently_gone);
        let (node, at) = g.get(id)?;
        let ago = at.elapsed();
        (ago < RECENTLY_GONE).then(|| (node.clone(), ago))
    }

    /// Why `node` has no route (see [`Self::node_route`]), as a phrase;
    /// worked out when asked (a failed delegation), not on every scan.
    pub fn unroutable_reason(&self, node: &str) -> &'static str {
        let cache = lock(&self.per_node);
        let own_clients = lock(&self.own_relay_clients).clone();
        match cache.get(node) {
            None => "gossip does not know it",
            Some(e) => route_of(e, &cache, &self.me, &own_clients)
                .err()
                .unwrap_or("it had none a moment ago"),
        }
    }

    /// The cached card with this digest.
    pub fn card(&self, digest: &str) -> Option<Arc<AgentCard>> {
        lock(&self.cards).get(digest).cloned()
    }

    /// Caches a card and feeds its text to the intent index of every
    /// registered agent whose record carries that digest.
    pub fn add_card(&self, card: AgentCard) {
        let digest = card.digest();
        let card = Arc::new(card);
        lock(&self.cards).insert(digest.clone(), card.clone());
        let ids: Vec<AgentId> = {
            let reg = self.read();
            reg.iter()
                .filter(|e| e.record.digest() == digest && !reg.has_card(&e.id))
                .map(|e| e.id.clone())
                .collect()
        };
        if !ids.is_empty() {
            let mut reg = self.write();
            for id in ids {
                reg.set_card(&id, &card);
            }
        }
    }

    /// Drops the cached card with this digest unless an agent's record
    /// still names it: a card replaced by a new version (a redeployed
    /// agent) would otherwise stay cached for good, on every node.
    pub fn forget_card(&self, digest: &str) {
        // Lock order: the registry, released, then `cards`.
        let named = self.read().iter().any(|e| e.record.digest() == digest);
        if !named {
            lock(&self.cards).remove(digest);
        }
    }

    /// Registers (or refreshes) one of this node's own agents.
    pub fn upsert_own(&self, id: AgentId, record: AgentRecord, load: LoadReport) {
        // Lock order: never hold the registry while taking `cards` (or the
        // reverse); `missing_cards` and `add_card` rely on it too.
        let card = lock(&self.cards).get(&record.digest).cloned();
        let mut reg = self.write();
        reg.upsert(&self.me, id.clone(), record);
        reg.set_load(&id, load);
        if let Some(card) = card {
            reg.set_card(&id, &card);
        }
    }

    /// Updates the load of one of this node's own agents (no re-indexing).
    pub fn set_load(&self, id: &AgentId, load: LoadReport) {
        self.write().set_load(id, load);
    }

    pub fn remove_own(&self, id: &AgentId) {
        self.write().remove(id);
        self.forget_local(id);
        // Another node may hold it too (an edge agent's bridge that took
        // over): its record, kept out while the agent was ours, comes in.
        self.refetch_holders(std::slice::from_ref(id));
    }

    /// Makes the next scan bring back, in full, the records of `ids` that
    /// live nodes still hold. The registry keeps one home per agent; when
    /// that home lets go (or was this node), another node that also
    /// announced the agent (two bridges of one tenant for a moment, a
    /// redeployed agent) becomes its home at once, instead of the agent
    /// being missing until that node next changes its record.
    fn refetch_holders(&self, ids: &[AgentId]) {
        if ids.is_empty() {
            return;
        }
        let keys: std::collections::HashSet<Box<str>> = ids.iter().map(cache_key).collect();
        let mut cache = lock(&self.per_node);
        for e in cache
            .values_mut()
            .filter(|e| e.live && !e.records.is_empty())
        {
            // The smaller side is walked: a node gone with 100k agents
            // costs each peer entry its own size, not 100k lookups.
            let before = e.records.len();
            if before <= keys.len() {
                e.records.retain(|k, _| !keys.contains(k));
            } else {
                for k in &keys {
                    e.records.remove(k);
                }
            }
            if e.records.len() != before {
                // A full scan of it; the forgotten hashes make its
                // records of `ids` new again.
                e.version = 0;
            }
        }
    }

    /// `name -> (generation, version)` of every node this view has applied,
    /// for [`dmsc_gossip::Gossip::scan_since`].
    pub fn scan_cursor(&self) -> HashMap<String, (u64, u64)> {
        lock(&self.per_node)
            .iter()
            .map(|(n, c)| (n.clone(), (c.generation, c.version)))
            .collect()
    }

    /// Applies one gossip scan: the `node` key feeds the address book,
    /// `agent/` and `load/` keys the registry. Only nodes whose state
    /// changed carry values; a node going dead or left takes its agents out
    /// of the registry, coming back puts them in again. Returns the overlay
    /// addresses of nodes that are dead (not those that left: they drain).
    pub fn apply_scan(&self, scans: Vec<dmsc_gossip::NodeScan>) -> Vec<SocketAddr> {
        enum Op {
            /// Node, agent, record, and its load when that came too.
            Upsert(String, AgentId, String, Option<String>),
            Load(AgentId, String),
            /// Node, agent: removed if the registry has it from that node.
            Remove(String, AgentId),
        }
        let mut ops: Vec<Op> = Vec::new();
        let mut gone_nodes = Vec::new();
        let mut cache = lock(&self.per_node);
        let mut present = std::collections::HashSet::new();
        // Node records or liveness changed: the announcements need a rebuild.
        let mut anns_dirty = false;
        for scan in scans {
            present.insert(scan.name.clone());
            let live = !matches!(scan.state, MemberState::Dead | MemberState::Left);
            let entry = cache
                .entry(scan.name.clone())
                .or_insert_with(|| NodeCache::new(&scan.name, scan.generation));
            if entry.generation != scan.generation {
                // Restarted: its old agents go; the new generation's come in.
                if entry.live {
                    let n = &entry.name;
                    ops.extend(
                        entry
                            .records
                            .keys()
                            .filter_map(|k| AgentId::parse(k))
                            .map(|id| Op::Remove(n.clone(), id)),
                    );
                }
                *entry = NodeCache::new(&scan.name, scan.generation);
                anns_dirty = true;
            }
            let had_values = scan.values.is_some();
            let complete = scan.complete;
            if let Some(values) = scan.values {
                let mut records: HashMap<AgentId, String> = HashMap::new();
                let mut loads: HashMap<AgentId, String> = HashMap::new();
                for (k, v) in values {
                    if k == dmsc_gossip::KEY_NODE {
                        let ann = serde_json::from_str::<NodeAnnouncement>(&v).ok();
                        anns_dirty |= entry.set_ann(ann);
                    } else if k == crate::proto::gossip::KEY_RELAY_CLIENTS {
                        entry.relay_clients = Some(
                            v.split(',')
                                .filter(|n| !n.is_empty())
                                .map(str::to_string)
                                .collect(),
                        );
                    } else if let Some((t, n)) = dmsc_registry::parse_agent_key(&k) {
                        records.insert(AgentId { tenant: t, name: n }, v);
                    } else if let Some((t, n)) = dmsc_registry::parse_load_key(&k) {
                        loads.insert(AgentId { tenant: t, name: n }, v);
                    }
                }
                let mut gone: Vec<AgentId> = Vec::new();
                for k in &scan.deleted {
                    if k == dmsc_gossip::KEY_NODE {
                        anns_dirty |= entry.set_ann(None);
                    } else if k == crate::proto::gossip::KEY_RELAY_CLIENTS {
                        entry.relay_clients = None;
                    } else if let Some((t, n)) = dmsc_registry::parse_agent_key(k) {
                        gone.push(AgentId { tenant: t, name: n });
                    }
                }
                // A node that is not live has nothing in the registry (and
                // no hashes here): its values wait until it is live again.
                if live {
                    if scan.complete {
                        // Every agent of the node: the ones not in it left.
                        gone.extend(
                            entry
                                .records
                                .keys()
                                .filter_map(|k| AgentId::parse(k))
                                .filter(|id| !records.contains_key(id)),
                        );
                    }
                    for id in gone {
                        if entry.records.remove(&*cache_key(&id)).is_some() {
                            ops.push(Op::Remove(scan.name.clone(), id));
                        }
                    }
                    for (id, r) in records {
                        // A delta without the load key: the load is unchanged.
                        let load = loads.remove(&id);
                        let rh = value_hash(&r);
                        let lh = load.as_deref().map(value_hash);
                        match entry.records.get_mut(&*cache_key(&id)) {
                            Some(before) if before.0 == rh => {
                                if let Some((lh, l)) =
                                    lh.zip(load).filter(|(lh, _)| *lh != before.1)
                                {
                                    before.1 = lh;
                                    ops.push(Op::Load(id, l));
                                }
                            }
                            before => {
                                let lh = lh.or(before.map(|b| b.1)).unwrap_or_default();
                                entry.records.insert(cache_key(&id), (rh, lh));
                                ops.push(Op::Upsert(scan.name.clone(), id, r, load));
                            }
                        }
                    }
                    // Loads changed alone (their records as before).
                    for (id, l) in loads {
                        if let Some(before) = entry.records.get_mut(&*cache_key(&id)) {
                            let lh = value_hash(&l);
                            if before.1 != lh {
                                before.1 = lh;
                                ops.push(Op::Load(id, l));
                            }
                        }
                    }
                }
                entry.version = scan.version;
            }
            if live != entry.live {
                anns_dirty = true;
                if !live {
                    let n = entry.name.clone();
                    let ids: Vec<AgentId> = entry
                        .records
                        .drain()
                        .filter_map(|(k, _)| AgentId::parse(&k))
                        .collect();
                    {
                        let now = Instant::now();
                        let mut g = lock(&self.recently_gone);
                        g.retain(|_, (_, t)| now.duration_since(*t) < RECENTLY_GONE);
                        if g.len() < MAX_RECENTLY_GONE {
                            g.extend(ids.iter().map(|id| (id.clone(), (n.clone(), now))));
                        }
                    }
                    ops.extend(ids.into_iter().map(|id| Op::Remove(n.clone(), id)));
                } else if !had_values || !complete {
                    // Back without a change, or with only what changed
                    // while it was away: nothing of it is registered here
                    // any more, so the next scan (half a round away) asks
                    // for all its values and readmits its agents.
                    entry.version = 0;
                }
                entry.live = live;
            }
            // Only a dead node's connection is closed: one that left is
            // draining, finishing the delegations it serves, and closes
            // its overlay itself when done.
            if scan.state == MemberState::Dead {
                gone_nodes.extend(entry.addr);
            }
        }
        // Nodes gossip forgot entirely (past their dead grace).
        cache.retain(|_, e| {
            let keep = present.contains(&e.name);
            anns_dirty |= !keep;
            if !keep && e.live {
                ops.extend(
                    e.records
                        .keys()
                        .filter_map(|k| AgentId::parse(k))
                        .map(|id| Op::Remove(e.name.clone(), id)),
                );
            }
            keep
        });
        // A forgotten node's path circuit goes with it (a node that comes
        // back under the name starts closed).
        {
            let mut paths = self.paths.write().unwrap_or_else(|p| p.into_inner());
            if !paths.is_empty() {
                paths.retain(|n, _| cache.values().any(|e| e.name == *n));
            }
        }
        let own_clients = lock(&self.own_relay_clients).clone();
        let nodes: HashMap<String, (SocketAddr, u8)> = cache
            .values()
            .filter_map(|e| {
                let route = route_of(e, &cache, &self.me, &own_clients).ok()?;
                Some((e.name.clone(), route))
            })
            .collect();
        let anns: Option<Vec<NodeAnnouncement>> = anns_dirty.then(|| {
            cache
                .values()
                .filter(|e| e.live)
                .filter_map(|e| e.ann.clone())
                .collect()
        });
        drop(cache);
        *self.nodes.write().unwrap_or_else(|p| p.into_inner()) = nodes;
        if let Some(anns) = anns {
            let mut a = lock(&self.announcements);
            if *a != anns {
                *a = anns;
                self.announcements_version.fetch_add(1, Ordering::Relaxed);
            }
        }

        let now = now_ms();
        // Digests of cards replaced by a new version (forgotten below).
        let mut replaced = Vec::new();
        // Agents whose home let go of them: another node may hold them too.
        let mut orphans: Vec<AgentId> = Vec::new();
        if !ops.is_empty() {
            // Lock order: cards, released, then the registry.
            let cards = lock(&self.cards).clone();
            let mut reg = self.write();
            for op in ops {
                match op {
                    Op::Upsert(node, id, raw, _)
                        if reg.get(&id).is_some_and(|e| *e.node == *self.me) =>
                    {
                        // Ours: a peer's record does not take it over (two
                        // bridges of one tenant, for a moment, both
                        // register an edge agent). Kept in that node's cache
                        // entry, it comes in if this node lets go.
                        tracing::debug!(agent = %id, node = %node, bytes = raw.len(), "a peer announces an agent of this node; keeping ours");
                    }
                    Op::Upsert(node, id, raw, load) => match AgentRecord::decode(&raw) {
                        Ok(record) => {
                            if reg.get(&id).is_none() {
                                tracing::info!(agent = %id, node = %node, "agent registered");
                            }
                            let digest = record.digest.clone();
                            if let Some(old) = reg
                                .get(&id)
                                .map(|e| e.record.digest())
                                .filter(|d| !d.is_empty() && *d != digest)
                            {
                                replaced.push(old.to_string());
                            }
                            reg.upsert(&node, id.clone(), record);
                            if let Some(load) = load {
                                reg.set_load(&id, LoadReport::decode(&load).unwrap_or_default());
                            }
                            if let Some(card) = cards.get(&digest) {
                                reg.set_card(&id, card);
                            }
                        }
                        Err(e) => {
                            tracing::debug!(agent = %id, node = %node, error = %e, "ignoring undecodable agent record");
                        }
                    },
                    Op::Load(id, load) => {
                        reg.set_load(&id, LoadReport::decode(&load).unwrap_or_default());
                    }
                    Op::Remove(node, id) => {
                        // Only from the node that had it: an agent that
                        // moved (an edge agent's bridge handed over) stays
                        // with its new home. Own agents never come from
                        // scans (they are ours).
                        if reg
                            .get(&id)
                            .is_some_and(|e| *e.node == *node && *e.node != *self.me)
                        {
                            tracing::info!(agent = %id, "agent left the registry (node gone or deregistered)");
                            reg.remove(&id);
                            self.forget_local(&id);
                            orphans.push(id);
                        }
                    }
                }
            }
        }
        for digest in replaced {
            self.forget_card(&digest);
        }
        // Only those still missing (a restarted node's agents were removed
        // and came back in the same scan).
        {
            let reg = self.read();
            orphans.retain(|id| reg.get(id).is_none());
        }
        self.refetch_holders(&orphans);
        // TTL expiry walks every record: once a second is plenty.
        let last = self.last_expiry.load(Ordering::Relaxed);
        let expired = if now.saturating_sub(last) >= 1000 {
            self.last_expiry.store(now, Ordering::Relaxed);
            self.write().expire(now)
        } else {
            Vec::new()
        };
        for id in expired {
            tracing::info!(agent = %id, "agent registration expired");
        }
        gone_nodes
    }

    /// Up to `limit` agents whose cards this node has not seen yet (digest
    /// unknown) and wants: tenants with a lexical intent index (cards feed
    /// only intent routing), not `skip`ped by the caller. Cheap to call
    /// every tick with a large registry: nothing is copied but the answer.
    ///
    /// An agent whose card is cached but not set on it (its record landed
    /// while [`MeshView::add_card`] was handing that card out) gets it here,
    /// so such agents never crowd out the ones still to fetch.
    pub fn missing_cards(
        &self,
        limit: usize,
        skip: impl Fn(&AgentId, &str) -> bool,
    ) -> Vec<(AgentId, String)> {
        if limit == 0 {
            return Vec::new();
        }
        // A few more than asked: some may turn out to be cached below.
        let candidates: Vec<(AgentId, String)> = {
            let reg = self.read();
            reg.iter()
                .filter(|e| {
                    !e.record.digest().is_empty()
                        && !e.has_card()
                        && reg.intent_indexed(&e.id.tenant)
                        && !skip(&e.id, e.record.digest())
                })
                .take(limit.saturating_mul(4))
                .map(|e| (e.id.clone(), e.record.digest().to_string()))
                .collect()
        };
        let mut wanted = Vec::new();
        let mut cached = Vec::new();
        {
            let cards = lock(&self.cards);
            for (id, digest) in candidates {
                match cards.get(&digest) {
                    Some(card) => cached.push((id, card.clone())),
                    None => wanted.push((id, digest)),
                }
            }
        }
        if !cached.is_empty() {
            let mut reg = self.write();
            for (id, card) in cached {
                reg.set_card(&id, &card);
            }
        }
        wanted.truncate(limit);
        wanted
    }

    /// Keeps `tenant`'s lexical intent index, building it now if this node
    /// did not route intent for the tenant before (its cards are fetched
    /// from then on). A tenant without agents here is not kept: any label
    /// of `mesh.<tenant>.dmsc` reaches this, and the scope must not grow
    /// with made-up names; its first request once it has agents builds it.
    /// The index is built under the read lock (selection goes on) and
    /// installed under the write lock.
    pub fn ensure_intent(&self, tenant: &str) {
        let built = self.read().build_intent_index(tenant);
        if let Some(built) = built {
            self.write().install_intent_index(built);
        }
    }
}

impl LocalState for MeshView {
    fn outstanding(&self, id: &AgentId) -> u32 {
        MeshView::outstanding(self, id)
    }

    fn admits(&self, id: &AgentId, node: &str) -> bool {
        // A read-only look: an open circuit whose wait is over counts as
        // admitting (the real half-open transition happens in `admit` and
        // `admit_path`).
        let agent = self
            .local
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .is_none_or(|l| lock(&l.circuit).state(Instant::now()) != CircuitState::Open);
        agent && (node == self.me || self.path_state(node) != CircuitState::Open)
    }
}

/// Records one outcome on a circuit; the change of state, if any.
fn judge(c: &mut Circuit, ok: bool) -> Option<(CircuitState, CircuitState)> {
    let now = Instant::now();
    let before = c.state(now);
    if ok {
        c.on_success(now);
    } else {
        c.on_failure(now);
    }
    let after = c.state(now);
    (before != after).then_some((before, after))
}

/// The tags of an agent's skills, as its gossiped record lists them.
pub(crate) fn agent_tags(
    reg: &dmsc_registry::Registry,
    id: &dmsc_registry::AgentId,
) -> Vec<String> {
    reg.get(id)
        .map(|e| e.record.tags().map(|t| t.to_ascii_lowercase()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmsc_gossip::NodeScan;
    use dmsc_registry::{Health, NoLocal, SkillTags, Target};

    fn record() -> String {
        AgentRecord {
            digest: "d".into(),
            skills: vec![SkillTags {
                id: "s".into(),
                name: "s".into(),
                tags: vec!["t".into()],
            }],
            protocols: vec!["jsonrpc".into()],
            a2a: Vec::new(),
            health: Health::Healthy,
            expires_ms: now_ms() + 60_000,
        }
        .encode()
    }

    fn scan(gen: u64, version: u64, state: MemberState, values: bool) -> NodeScan {
        let ann = serde_json::json!({"name": "x", "region": "r", "overlay_addr": "127.0.0.1:7409",
            "spiffe_id": "spiffe://t/node/x", "version": "0", "started_at": 0});
        NodeScan {
            name: "x".into(),
            generation: gen,
            state,
            version,
            values: values.then(|| {
                vec![
                    ("agent/acme/a".to_string(), record()),
                    ("node".to_string(), ann.to_string()),
                ]
            }),
            complete: true,
            deleted: Vec::new(),
        }
    }

    fn view() -> MeshView {
        MeshView::new(
            "me",
            CircuitConfig::default(),
            dmsc_registry::Choice::PowerOfTwo,
        )
    }

    fn selectable(m: &MeshView) -> bool {
        m.read()
            .select(
                "acme",
                &Target::Tag("t".into()),
                &NoLocal,
                &[],
                &mut rand::thread_rng(),
            )
            .is_ok()
    }

    fn relayed_scan(via: &str) -> NodeScan {
        let ann = serde_json::json!({"name": "x", "region": "r", "overlay_addr": "240.1.2.3:7409",
            "spiffe_id": "spiffe://t/node/x", "version": "0", "started_at": 0,
            "reachability": "relayed", "via": [via]});
        NodeScan {
            name: "x".into(),
            generation: 1,
            state: MemberState::Alive,
            version: 1,
            values: Some(vec![
                ("agent/acme/a".to_string(), record()),
                ("node".to_string(), ann.to_string()),
            ]),
            complete: true,
            deleted: Vec::new(),
        }
    }

    fn relay_scan(clients: &str) -> NodeScan {
        let ann = serde_json::json!({"name": "r", "region": "r", "overlay_addr": "127.0.0.1:7400",
            "spiffe_id": "spiffe://t/node/r", "version": "0", "started_at": 0,
            "roles": ["relay"], "relay": {"tcp": "127.0.0.1:7400"}});
        NodeScan {
            name: "r".into(),
            generation: 1,
            state: MemberState::Alive,
            version: 1,
            values: Some(vec![
                ("node".to_string(), ann.to_string()),
                ("relay/clients".to_string(), clients.to_string()),
            ]),
            complete: true,
            deleted: Vec::new(),
        }
    }

    /// A home node that cannot be reached is judged once, on the path's
    /// circuit: none of its agents is chosen while it is open, no agent's
    /// circuit hears of it, a probe after the open period closes it, and a
    /// node gossip forgets takes its path's circuit along.
    #[test]
    fn a_failing_path_is_judged_once_for_all_of_its_nodes_agents() {
        let v = MeshView::new(
            "me",
            CircuitConfig {
                consecutive_failures: 2,
                open_for: Duration::from_millis(50),
                ..CircuitConfig::default()
            },
            dmsc_registry::Choice::PowerOfTwo,
        );
        v.apply_scan(vec![scan(1, 1, MemberState::Alive, true)]);
        let here = |v: &MeshView| {
            v.read()
                .select(
                    "acme",
                    &Target::Tag("t".into()),
                    v,
                    &[],
                    &mut rand::thread_rng(),
                )
                .map(|s| s.node)
        };
        assert_eq!(here(&v).as_deref(), Ok("x"));
        v.record_path("x", false);
        assert_eq!(v.path_state("x"), CircuitState::Closed);
        v.record_path("x", false);
        assert_eq!(v.path_state("x"), CircuitState::Open);
        assert!(!v.admit_path("x"));
        assert!(here(&v).is_err(), "no agent behind an open path is chosen");
        assert_eq!(
            v.circuit_state(&AgentId::new("acme", "a")),
            CircuitState::Closed
        );
        // This node's own agents need no path; a working path leaves no state.
        v.record_path("me", false);
        v.record_path("y", true);
        assert!(v.admit_path("me"));
        assert_eq!(v.paths.read().expect("paths").len(), 1);
        std::thread::sleep(Duration::from_millis(60));
        assert!(v.admit_path("x"), "the probe after the open period");
        v.record_path("x", true);
        assert_eq!(v.path_state("x"), CircuitState::Closed);
        assert_eq!(here(&v).as_deref(), Ok("x"));
        v.record_path("x", false);
        v.record_path("x", false);
        v.apply_scan(Vec::new());
        assert!(v.paths.read().expect("paths").is_empty());
    }

    #[test]
    fn a_relayed_node_is_routable_only_through_a_relay_that_lists_it() {
        let m = || {
            MeshView::new(
                "me",
                CircuitConfig::default(),
                dmsc_registry::Choice::PowerOfTwo,
            )
        };
        // Claims relay r, which does not list it: no route.
        let v = m();
        v.apply_scan(vec![relay_scan("y"), relayed_scan("r")]);
        assert!(v.node_route("x").is_none());
        assert!(v.unroutable_reason("x").contains("only through relays"));
        assert_eq!(v.unroutable_reason("nobody"), "gossip does not know it");
        // r lists it: routable.
        let v = m();
        v.apply_scan(vec![relay_scan("x,y"), relayed_scan("r")]);
        assert!(v.node_route("x").is_some());
        // Through this node's own relay (gossip never shows a node its own
        // state): routable once this relay has a session for it.
        let v = m();
        v.apply_scan(vec![relayed_scan("me")]);
        assert!(v.node_route("x").is_none());
        v.set_own_relay_clients(vec!["x".into()]);
        let v2 = m();
        v2.set_own_relay_clients(vec!["x".into()]);
        v2.apply_scan(vec![relayed_scan("me")]);
        assert!(v2.node_route("x").is_some());
    }

    #[test]
    fn scans_apply_changes_deaths_returns_and_restarts() {
        let m = view();
        assert!(m
            .apply_scan(vec![scan(1, 5, MemberState::Alive, true)])
            .is_empty());
        assert!(selectable(&m));
        assert_eq!(m.scan_cursor().get("x"), Some(&(1, 5)));
        assert!(m.node_route("x").is_some());
        // Unchanged (no values): still there.
        m.apply_scan(vec![scan(1, 5, MemberState::Alive, false)]);
        assert!(selectable(&m));
        // Dead: out of every candidate set, and reported for disconnection.
        let gone = m.apply_scan(vec![scan(1, 5, MemberState::Dead, false)]);
        assert_eq!(gone, vec!["127.0.0.1:7409".parse().expect("addr")]);
        assert!(!selectable(&m));
        assert!(m.node_route("x").is_none());
        // Back alive with nothing changed: routable at once, and its agents
        // come back with the next scan, which asks for its values.
        assert!(m
            .apply_scan(vec![scan(1, 5, MemberState::Alive, false)])
            .is_empty());
        assert!(m.node_route("x").is_some());
        assert_eq!(m.scan_cursor().get("x"), Some(&(1, 0)));
        m.apply_scan(vec![scan(1, 5, MemberState::Alive, true)]);
        assert!(selectable(&m));
        // The key deleted (deregistered): gone.
        let mut s = scan(1, 6, MemberState::Alive, true);
        if let Some(v) = s.values.as_mut() {
            v.retain(|(k, _)| k == "node");
        }
        m.apply_scan(vec![s]);
        assert!(!selectable(&m));
        // A restart (new generation) with the agent again.
        m.apply_scan(vec![scan(2, 1, MemberState::Alive, true)]);
        assert!(selectable(&m));
        // Forgotten by gossip altogether: gone.
        m.apply_scan(vec![]);
        assert!(!selectable(&m));
        assert!(m.scan_cursor().is_empty());
    }

    #[test]
    fn cards_are_wanted_only_for_intent_tenants_and_a_stranded_one_is_set() {
        let m = view();
        m.write().index_intent_on_demand();
        let card = dmsc_registry::AgentCard::parse(
            br#"{"name":"Doc","url":"http://h/","description":"Reads receipts",
                 "skills":[{"id":"ocr","name":"OCR","tags":["ocr"]}]}"#,
        )
        .expect("card");
        let rec = AgentRecord::from_card(&card, Health::Healthy, now_ms() + 60_000);
        let (a, b) = (AgentId::new("acme", "a"), AgentId::new("acme", "b"));
        m.write().upsert("x", a.clone(), rec.clone());
        m.write().upsert("x", b.clone(), rec);
        assert!(
            m.missing_cards(8, |_, _| false).is_empty(),
            "not routed for"
        );
        // a made-up tenant never enters the scope
        m.ensure_intent("nobody");
        assert!(!m.read().intent_indexed("nobody"));
        m.ensure_intent("acme");
        assert!(m.read().intent_indexed("acme"));
        let wanted = m.missing_cards(8, |_, _| false);
        assert_eq!(wanted.len(), 2);
        assert!(
            m.missing_cards(8, |id, _| *id == a).len() == 1,
            "skip is honoured"
        );
        // cached, but not set on the agents (a record that landed while the
        // card was handed out): set now, not fetched again
        lock(&m.cards).insert(card.digest(), Arc::new(card));
        assert!(m.missing_cards(8, |_, _| false).is_empty());
        assert!(m.read().has_card(&a) && m.read().has_card(&b));
    }

    /// Two nodes announce one agent (for a moment, two MQTT bridges of one
    /// tenant both register its edge agent): when the one the registry has
    /// it from lets go, the other's record takes over at the next scan, and
    /// this node's own agent is never taken over by a peer's record.
    #[test]
    fn an_agent_two_nodes_announce_keeps_a_home_when_one_lets_go() {
        let a = AgentId::new("acme", "a");
        let named = |name: &str, version: u64, with_agent: bool| {
            let ann = serde_json::json!({"name": name, "region": "r", "overlay_addr": "127.0.0.1:7409",
                "spiffe_id": format!("spiffe://t/node/{name}"), "version": "0", "started_at": 0});
            let mut values = vec![("node".to_string(), ann.to_string())];
            if with_agent {
                values.push(("agent/acme/a".to_string(), record()));
            }
            NodeScan {
                name: name.into(),
                values: Some(values),
                ..scan(1, version, MemberState::Alive, false)
            }
        };
        // A scan lists every node; an unchanged one without values.
        let same = |name: &str, version: u64| NodeScan {
            values: None,
            ..named(name, version, false)
        };
        let home = |m: &MeshView| m.read().get(&a).map(|e| e.node.to_string());
        let m = view();
        m.apply_scan(vec![named("y", 3, true)]);
        m.apply_scan(vec![same("y", 3), named("x", 5, true)]);
        assert_eq!(home(&m).as_deref(), Some("x"), "the newer announcement");
        // x lets go (its key deleted): y's record comes back with the very
        // next scan, which asks y for everything.
        m.apply_scan(vec![
            same("y", 3),
            NodeScan {
                complete: false,
                deleted: vec!["agent/acme/a".into()],
                ..named("x", 6, false)
            },
        ]);
        assert_eq!(home(&m), None);
        assert_eq!(m.scan_cursor().get("y"), Some(&(1, 0)));
        m.apply_scan(vec![named("y", 3, true), same("x", 6)]);
        assert_eq!(home(&m).as_deref(), Some("y"));

        // This node's own agent: a peer's record does not take it over,
        // and comes in when this node lets go.
        let m = view();
        let own = AgentRecord::decode(&record()).expect("record");
        m.upsert_own(a.clone(), own, LoadReport::default());
        m.apply_scan(vec![named("y", 3, true)]);
        assert_eq!(home(&m).as_deref(), Some("me"));
        m.remove_own(&a);
        assert_eq!(home(&m), None);
        m.apply_scan(vec![named("y", 3, true)]);
        assert_eq!(home(&m).as_deref(), Some("y"));
    }

    #[test]
    fn deltas_apply_only_what_changed() {
        let m = view();
        let a = AgentId::new("acme", "a");
        let mut s = scan(1, 5, MemberState::Alive, true);
        if let Some(v) = s.values.as_mut() {
            v.push(("load/acme/a".into(), "3".into()));
        }
        m.apply_scan(vec![s]);
        assert_eq!(m.read().load(&a).map(|l| l.in_flight), Some(3));
        let delta = |version: u64, values: Vec<(String, String)>, deleted: Vec<String>| NodeScan {
            values: Some(values),
            complete: false,
            deleted,
            ..scan(1, version, MemberState::Alive, false)
        };
        // Only the load changed: the agent stays, with the new load.
        m.apply_scan(vec![delta(
            6,
            vec![("load/acme/a".into(), "7".into())],
            vec![],
        )]);
        assert_eq!(m.read().load(&a).map(|l| l.in_flight), Some(7));
        assert!(selectable(&m));
        assert!(
            m.node_route("x").is_some(),
            "a delta without `node` keeps the route"
        );
        // A renewed record without its load: the load stays.
        let mut r = AgentRecord::decode(&record()).expect("record");
        r.expires_ms += 1;
        m.apply_scan(vec![delta(
            7,
            vec![("agent/acme/a".into(), r.encode())],
            vec![],
        )]);
        assert_eq!(m.read().load(&a).map(|l| l.in_flight), Some(7));
        assert_eq!(
            m.read().get(&a).map(|e| e.record.expires_ms()),
            Some(r.expires_ms)
        );
        // A second agent in a delta joins; the first one's deletion removes it.
        m.apply_scan(vec![delta(
            8,
            vec![("agent/acme/b".into(), record())],
            vec!["agent/acme/a".into(), "load/acme/a".into()],
        )]);
        assert!(m.read().get(&a).is_none());
        assert!(m.read().get(&AgentId::new("acme", "b")).is_some());
        assert_eq!(m.scan_cursor().get("x"), Some(&(1, 8)));
        // The node key deleted: no route.
        m.apply_scan(vec![delta(9, vec![], vec!["node".into()])]);
        assert!(m.node_route("x").is_none());

        // Dead, then back with a change made meanwhile: the delta alone
        // would not bring back its other agents, so the cursor goes to 0
        // and the next (complete) scan readmits them all.
        let m = view();
        m.apply_scan(vec![scan(1, 5, MemberState::Alive, true)]);
        m.apply_scan(vec![scan(1, 5, MemberState::Dead, false)]);
        assert!(!selectable(&m));
        m.apply_scan(vec![delta(
            6,
            vec![("load/acme/a".into(), "1".into())],
            vec![],
        )]);
        assert_eq!(m.scan_cursor().get("x"), Some(&(1, 0)));
        m.apply_scan(vec![scan(1, 6, MemberState::Alive, true)]);
        assert!(selectable(&m), "readmitted by the complete scan");
    }
}
