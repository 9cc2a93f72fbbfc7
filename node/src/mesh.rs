//! This node's view of the mesh's agents: the registry fed from gossip, plus
//! what only this node knows about each agent (its own outstanding requests
//! and its circuit breaker).
//!
//! The registry is read-mostly: selection takes a read lock for a few
//! microseconds; the sync loop takes the write lock only to apply what
//! changed since the last gossip scan (records are diffed as raw strings, so
//! an unchanged mesh costs no re-indexing). Agents of nodes that are dead or
//! left are dropped at the scan that first sees them so, which is how a
//! failed node's agents leave every candidate set within the failure
//! detection time; records whose TTL lapsed (a node alive but no longer
//! refreshing them) are dropped too.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime};

use dmsc_gossip::MemberState;
use dmsc_registry::{
    AgentCard, AgentId, AgentRecord, Circuit, CircuitConfig, CircuitState, LoadReport, LocalState,
    Registry,
};

use crate::app::NodeAnnouncement;

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

/// The registry plus per-agent local state and the node address book.
#[derive(Debug)]
pub struct MeshView {
    pub me: String,
    registry: RwLock<Registry>,
    local: RwLock<HashMap<AgentId, Arc<AgentLocal>>>,
    circuit_cfg: CircuitConfig,
    /// Node name -> overlay address, from the gossiped `node` key.
    nodes: RwLock<HashMap<String, SocketAddr>>,
    /// Last raw record/load value seen per agent, to apply only changes.
    seen: Mutex<HashMap<AgentId, (String, String, String)>>,
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
            nodes: RwLock::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
            cards: Mutex::new(HashMap::new()),
        }
    }

    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, Registry> {
        self.registry.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Registry> {
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
        let mut c = lock(&l.circuit);
        let before = c.state(Instant::now());
        if ok {
            c.on_success(Instant::now());
        } else {
            c.on_failure(Instant::now());
        }
        let after = c.state(Instant::now());
        if before != after {
            tracing::info!(agent = %id, from = %before, to = %after, "circuit changed");
        }
    }

    pub fn circuit_state(&self, id: &AgentId) -> CircuitState {
        lock(&self.local(id).circuit).state(Instant::now())
    }

    pub fn outstanding(&self, id: &AgentId) -> u32 {
        self.local
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|l| l.outstanding.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    pub fn node_addr(&self, node: &str) -> Option<SocketAddr> {
        self.nodes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .copied()
    }

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
                .filter(|e| e.record.digest == digest && !reg.has_card(&e.id))
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
    }

    /// Applies one gossip scan: `node` keys for the address book, `agent/`
    /// and `load/` keys for the registry. `members` are the other nodes
    /// with their state and all their keys.
    /// Returns the overlay addresses of nodes that are dead or left.
    pub fn apply_scan(&self, members: Vec<dmsc_gossip::ScannedNode>) -> Vec<SocketAddr> {
        let mut nodes = HashMap::new();
        let mut gone_nodes = Vec::new();
        let mut live: HashMap<AgentId, (String, String, String)> = HashMap::new();
        for (node, state, kvs) in members {
            if matches!(state, MemberState::Dead | MemberState::Left) {
                if let Some(a) = kvs
                    .iter()
                    .find(|(k, _)| k == dmsc_gossip::KEY_NODE)
                    .and_then(|(_, v)| serde_json::from_str::<NodeAnnouncement>(v).ok())
                {
                    gone_nodes.push(a.overlay_addr);
                }
                continue;
            }
            let mut loads: HashMap<AgentId, String> = HashMap::new();
            let mut records: Vec<(AgentId, String)> = Vec::new();
            for (k, v) in kvs {
                if k == dmsc_gossip::KEY_NODE {
                    if let Ok(a) = serde_json::from_str::<NodeAnnouncement>(&v) {
                        nodes.insert(node.clone(), a.overlay_addr);
                    }
                } else if let Some((t, n)) = dmsc_registry::parse_agent_key(&k) {
                    records.push((AgentId { tenant: t, name: n }, v));
                } else if let Some((t, n)) = dmsc_registry::parse_load_key(&k) {
                    loads.insert(AgentId { tenant: t, name: n }, v);
                }
            }
            for (id, rec) in records {
                let load = loads.remove(&id).unwrap_or_default();
                live.insert(id, (node.clone(), rec, load));
            }
        }
        *self.nodes.write().unwrap_or_else(|p| p.into_inner()) = nodes;

        let mut seen = lock(&self.seen);
        // (agent, Some((home node, record, load))) to upsert, None to remove.
        type Change = (AgentId, Option<(String, AgentRecord, LoadReport)>);
        let mut changes: Vec<Change> = Vec::new();
        for (id, (node, rec, load)) in &live {
            let same = seen
                .get(id)
                .is_some_and(|(n, r, l)| n == node && r == rec && l == load);
            if same {
                continue;
            }
            match AgentRecord::decode(rec) {
                Ok(r) => {
                    let l = LoadReport::decode(load).unwrap_or_default();
                    changes.push((id.clone(), Some((node.clone(), r, l))));
                }
                Err(e) => {
                    tracing::debug!(agent = %id, node = %node, error = %e, "ignoring undecodable agent record");
                }
            }
        }
        let gone: Vec<AgentId> = seen
            .keys()
            .filter(|id| !live.contains_key(*id))
            .cloned()
            .collect();
        for id in &gone {
            changes.push((id.clone(), None));
        }
        *seen = live;
        drop(seen);

        let now = now_ms();
        let cards = lock(&self.cards).clone();
        let mut reg = self.write();
        for (id, change) in changes {
            match change {
                Some((node, record, load)) => {
                    let digest = record.digest.clone();
                    let was = reg.get(&id).map(|e| (e.node.clone(), e.record.clone()));
                    match was {
                        Some((n, r)) if n == node && r == record => {}
                        _ => {
                            if reg.get(&id).is_none() {
                                tracing::info!(agent = %id, node = %node, "agent registered");
                            }
                            reg.upsert(&node, id.clone(), record);
                            if let Some(card) = cards.get(&digest) {
                                reg.set_card(&id, card);
                            }
                        }
                    }
                    reg.set_load(&id, load);
                }
                None => {
                    // Own agents are not in gossip scans (they are ours).
                    if reg.get(&id).is_some_and(|e| e.node != self.me) {
                        tracing::info!(agent = %id, "agent left the registry (node gone or deregistered)");
                        reg.remove(&id);
                    }
                }
            }
        }
        for id in reg.expire(now) {
            tracing::info!(agent = %id, "agent registration expired");
        }
        // A restarted node at the same address is alive under its new
        // generation; never close the connection of a live node.
        let live_addrs: Vec<SocketAddr> = self
            .nodes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .copied()
            .collect();
        gone_nodes.retain(|a| !live_addrs.contains(a));
        gone_nodes
    }

    /// Agents whose cards this node has not seen yet (digest unknown).
    pub fn missing_cards(&self) -> Vec<(AgentId, String)> {
        let all: Vec<(AgentId, String)> = self
            .read()
            .iter()
            .filter(|e| !e.record.digest.is_empty() && !e.has_card())
            .map(|e| (e.id.clone(), e.record.digest.clone()))
            .collect();
        let cards = lock(&self.cards);
        all.into_iter()
            .filter(|(_, d)| !cards.contains_key(d))
            .collect()
    }
}

impl LocalState for MeshView {
    fn outstanding(&self, id: &AgentId) -> u32 {
        MeshView::outstanding(self, id)
    }

    fn admits(&self, id: &AgentId) -> bool {
        // A read-only look: an open circuit whose wait is over counts as
        // admitting (the real half-open transition happens in `admit`).
        self.local
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .is_none_or(|l| lock(&l.circuit).state(Instant::now()) != CircuitState::Open)
    }
}
