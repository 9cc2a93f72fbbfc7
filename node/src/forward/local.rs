//! The agents this node is home to, as the request path sees them: their
//! endpoint, card, health, the protocol they speak, and the counters the
//! node keeps for them (in flight, latency, error rate). The control layer
//! onboards and health-checks them (`control::agents`); forwarding only reads
//! this table.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dmsc_registry::{AgentCard, AgentId, AgentRecord, Health, LoadReport};
use hyper::Uri;

use crate::config::RawAgent;
pub use crate::proto::agent::{Protocol, ProtocolState};
use crate::route::now_ms;

/// Card paths, newest first.
pub const CARD_PATHS: [&str; 2] = ["/.well-known/agent-card.json", "/.well-known/agent.json"];

/// Request statistics the home node keeps per agent (its load report).
#[derive(Debug, Default)]
pub struct AgentStats {
    pub ewma_ms: f64,
    pub error_rate: f64,
    pub served: u64,
    pub latencies: std::collections::VecDeque<f64>,
}

impl AgentStats {
    const ALPHA: f64 = 0.2;
    const WINDOW: usize = 256;

    pub fn observe(&mut self, elapsed: Duration, ok: bool) {
        let ms = elapsed.as_secs_f64() * 1000.0;
        if self.served == 0 {
            self.ewma_ms = ms;
        } else {
            self.ewma_ms += Self::ALPHA * (ms - self.ewma_ms);
        }
        let e = if ok { 0.0 } else { 1.0 };
        self.error_rate += Self::ALPHA * (e - self.error_rate);
        self.served += 1;
        if self.latencies.len() >= Self::WINDOW {
            self.latencies.pop_front();
        }
        self.latencies.push_back(ms);
    }

    pub fn p50_ms(&self) -> Option<f64> {
        if self.latencies.is_empty() {
            return None;
        }
        let mut v: Vec<f64> = self.latencies.iter().copied().collect();
        v.sort_by(|a, b| a.total_cmp(b));
        Some(v[v.len() / 2])
    }
}

/// One agent this node is home to.
#[derive(Debug)]
pub struct LocalAgent {
    pub id: AgentId,
    pub spec: RawAgent,
    /// The agent's endpoint, requests go to `base` + path.
    pub base: Uri,
    /// The card as the agent serves it.
    pub card: AgentCard,
    /// The card as the mesh serves it (every URL rewritten to the mesh
    /// name), pre-encoded; its digest is the one gossiped and the ETag, so
    /// a card fetched through the mesh from anywhere has the same digest.
    pub mesh_card: Bytes,
    pub digest: String,
    pub(crate) health: AtomicU8,
    /// Requests in progress at the agent through this node (from anywhere).
    pub in_flight: AtomicU32,
    pub stats: Mutex<AgentStats>,
    pub health_path: String,
    /// Pinned in config or learnt by the health checks; read by delivery.
    pub protocol: ProtocolState,
    pub(crate) published: Mutex<Option<(Instant, Health)>>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LocalAgent {
    pub fn health(&self) -> Health {
        match self.health.load(Ordering::Relaxed) {
            1 => Health::Healthy,
            2 => Health::Unhealthy,
            _ => Health::Unknown,
        }
    }

    pub(crate) fn set_health(&self, h: Health) -> bool {
        let v = match h {
            Health::Healthy => 1,
            Health::Unhealthy => 2,
            Health::Unknown => 0,
        };
        self.health.swap(v, Ordering::Relaxed) != v
    }

    /// The agent URL for a request path (`/x?y` -> `http://agent:port/prefix/x?y`).
    pub fn uri_for(&self, path_and_query: &str) -> Result<Uri, hyper::http::Error> {
        let prefix = self.base.path().trim_end_matches('/');
        let mut parts = self.base.clone().into_parts();
        parts.path_and_query = Some(format!("{prefix}{path_and_query}").parse()?);
        Ok(Uri::from_parts(parts)?)
    }

    pub fn record(&self, ttl: Duration) -> AgentRecord {
        AgentRecord {
            digest: self.digest.clone(),
            skills: self.card.skill_tags(),
            protocols: self.card.protocols(),
            health: self.health(),
            expires_ms: now_ms() + ttl.as_millis() as u64,
        }
    }

    pub fn load(&self) -> LoadReport {
        let s = lock(&self.stats);
        LoadReport {
            in_flight: self.in_flight.load(Ordering::Relaxed),
            queue: 0,
            ewma_ms: s.ewma_ms as f32,
            error_rate: s.error_rate as f32,
            cpu: 0.0,
        }
    }
}

/// The agents of this node, and those still waiting to onboard.
#[derive(Debug, Default)]
pub struct LocalAgents {
    map: RwLock<HashMap<AgentId, Arc<LocalAgent>>>,
    /// Specs that failed to onboard, with the last error; retried.
    pending: Mutex<Vec<(RawAgent, String)>>,
}

impl LocalAgents {
    pub fn get(&self, id: &AgentId) -> Option<Arc<LocalAgent>> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    pub fn all(&self) -> Vec<Arc<LocalAgent>> {
        let mut v: Vec<_> = self
            .map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    pub fn pending(&self) -> Vec<(RawAgent, String)> {
        lock(&self.pending).clone()
    }

    /// Adds an agent; `Err` with its id if another agent (other URL) has that id.
    pub(crate) fn insert(&self, agent: Arc<LocalAgent>) -> Result<(), AgentId> {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = map.get(&agent.id) {
            if old.spec.url != agent.spec.url {
                return Err(agent.id.clone());
            }
        }
        map.insert(agent.id.clone(), agent);
        Ok(())
    }

    pub fn remove(&self, id: &AgentId) -> Option<Arc<LocalAgent>> {
        self.map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
    }

    pub(crate) fn set_pending(&self, spec: RawAgent, error: String) {
        let mut p = lock(&self.pending);
        p.retain(|(s, _)| s != &spec);
        p.push((spec, error));
    }

    pub(crate) fn clear_pending(&self, spec: &RawAgent) {
        lock(&self.pending).retain(|(s, _)| s != spec);
    }
}
