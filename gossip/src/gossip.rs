//! The running gossip instance of one node.
//!
//! Wraps a chitchat server with: the membership tracker (sampled every half
//! gossip interval by a task this struct owns), graceful leave, and a view
//! of peers that shows each node name once, at its newest generation (a
//! restarted node is a new chitchat generation; its old one is history).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chitchat::{spawn_chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::info;

use crate::link::{CompactPeers, GossipStats, LinkTransport};
use crate::membership::{MemberState, MembershipTracker, Observation};
use crate::{wire, KEY_GOSSIP_WIRE, KEY_LEFT};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum GossipError {
    #[error("gossip could not start: {0}")]
    Start(String),
    #[error("invalid gossip setting: {0}")]
    Config(String),
}

/// Gossip settings. See `BENCHMARKS.md` for how the defaults were chosen.
#[derive(Debug, Clone)]
pub struct GossipConfig {
    pub node_name: String,
    /// Distinguishes restarts of one node; start time in ms is the usual choice.
    pub generation: u64,
    /// Address peers gossip to (the overlay address).
    pub advertise: SocketAddr,
    /// Only nodes with the same cluster id exchange state (the trust domain).
    pub cluster_id: String,
    /// Bootstrap peers (`host:port`).
    pub seeds: Vec<String>,
    pub interval: Duration,
    pub phi_threshold: f64,
    /// A node's heartbeat quiet for this long makes it `suspect`.
    pub suspect_after: Duration,
    /// How long dead and departed nodes stay listed before they are forgotten.
    pub dead_grace: Duration,
    /// Read and send compact digests ([`crate::wire`]) with peers that do
    /// too. Off: this node speaks chitchat's encoding only (for comparison).
    pub compact_digests: bool,
}

/// Defaults chosen from the measurements in BENCHMARKS.md (detection time vs bandwidth).
pub mod defaults {
    use std::time::Duration;
    /// Gossip round interval: the longest that still detects a crashed node
    /// mesh-wide within 3 s at 500 nodes (2.75 s simulated), which keeps a
    /// 100-node mesh's gossip under 20 KB/s per node (BENCHMARKS.md).
    pub const INTERVAL: Duration = Duration::from_millis(250);
    /// Phi threshold of the failure detector.
    pub const PHI: f64 = 8.0;
}

impl GossipConfig {
    pub fn new(node_name: &str, advertise: SocketAddr, cluster_id: &str) -> Self {
        GossipConfig {
            node_name: node_name.to_string(),
            generation: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or_default(),
            advertise,
            cluster_id: cluster_id.to_string(),
            seeds: Vec::new(),
            interval: defaults::INTERVAL,
            phi_threshold: defaults::PHI,
            suspect_after: defaults::INTERVAL * 5,
            dead_grace: Duration::from_secs(3600),
            compact_digests: true,
        }
    }
}

/// A peer as `status` shows it.
#[derive(Debug, Clone)]
pub struct Member {
    pub name: String,
    pub generation: u64,
    pub addr: SocketAddr,
    pub state: MemberState,
    /// Time since this node last saw the peer's heartbeat advance.
    pub last_seen: Duration,
    pub heartbeat: u64,
    /// The peer's key-values (small by design; see DESIGN.md).
    pub values: BTreeMap<String, String>,
}

type Tracker = Arc<Mutex<MembershipTracker<ChitchatId>>>;

/// One node in a [`Gossip::scan_since`] answer.
#[derive(Debug, Clone)]
pub struct NodeScan {
    pub name: String,
    pub generation: u64,
    pub state: MemberState,
    /// The node state's version in chitchat: it changes whenever a key does.
    pub version: u64,
    /// The node's keys under the prefix; `None` when the caller already has
    /// this generation and version. From [`Gossip::scan_changes`] only the
    /// keys set since the caller's version unless `complete`.
    pub values: Option<Vec<(String, String)>>,
    /// `values` holds every key of the node under the prefix (always so
    /// from [`Gossip::scan_since`]).
    pub complete: bool,
    /// Keys under the prefix deleted since the caller's version (only in an
    /// answer that is not `complete`).
    pub deleted: Vec<String>,
}

/// A node's running gossip. Dropping it stops chitchat and the sampler.
pub struct Gossip {
    handle: ChitchatHandle,
    tracker: Tracker,
    sampler: JoinHandle<()>,
    cfg: GossipConfig,
    stats: Arc<GossipStats>,
}

impl std::fmt::Debug for Gossip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gossip")
            .field("node", &self.cfg.node_name)
            .finish()
    }
}

impl Drop for Gossip {
    fn drop(&mut self) {
        self.sampler.abort();
        self.handle.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The tracker is updated by single map operations; a poisoned lock
    // leaves it consistent, so recover the guard.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Gossip {
    /// Starts gossiping over `transport`, publishing `initial` key-values.
    pub async fn start(
        cfg: GossipConfig,
        transport: &LinkTransport,
        initial: Vec<(String, String)>,
    ) -> Result<Gossip, GossipError> {
        if cfg.interval.is_zero() {
            return Err(GossipError::Config("gossip interval must be > 0".into()));
        }
        if cfg.phi_threshold.is_nan() || cfg.phi_threshold <= 0.0 {
            return Err(GossipError::Config("phi threshold must be > 0".into()));
        }
        let id = ChitchatId::new(cfg.node_name.clone(), cfg.generation, cfg.advertise);
        let fd = FailureDetectorConfig {
            phi_threshold: cfg.phi_threshold,
            initial_interval: cfg.interval,
            dead_node_grace_period: cfg.dead_grace,
            ..FailureDetectorConfig::default()
        };
        let chitchat_cfg = ChitchatConfig {
            chitchat_id: id,
            cluster_id: cfg.cluster_id.clone(),
            gossip_interval: cfg.interval,
            listen_addr: cfg.advertise,
            seed_nodes: cfg.seeds.clone(),
            failure_detector_config: fd,
            marked_for_deletion_grace_period: cfg.dead_grace,
            catchup_callback: None,
            // chitchat publishes a copy of every live node's whole state on
            // a watch channel at each membership or version change; nothing
            // here reads it (membership comes from `node_states`), and at
            // 100k agents each copy is tens of MB. Keep it empty.
            extra_liveness_predicate: Some(Box::new(|_| false)),
        };
        let mut initial = initial;
        if cfg.compact_digests {
            initial.push((KEY_GOSSIP_WIRE.to_string(), wire::VERSION.to_string()));
        }
        let handle = spawn_chitchat(chitchat_cfg, initial, transport)
            .await
            .map_err(|e| GossipError::Start(e.to_string()))?;
        let tracker: Tracker = Arc::new(Mutex::new(MembershipTracker::new(cfg.suspect_after)));
        let compact = cfg.compact_digests.then(|| transport.compact_peers());
        let sampler = tokio::spawn(sample_loop(
            handle.chitchat(),
            tracker.clone(),
            compact,
            cfg.interval / 2,
        ));
        info!(node = %cfg.node_name, generation = cfg.generation, seeds = ?cfg.seeds, interval = ?cfg.interval, "gossip started");
        Ok(Gossip {
            stats: transport.stats(),
            handle,
            tracker,
            sampler,
            cfg,
        })
    }

    pub fn config(&self) -> &GossipConfig {
        &self.cfg
    }

    pub fn stats(&self) -> Arc<GossipStats> {
        self.stats.clone()
    }

    fn handle(&self) -> &ChitchatHandle {
        &self.handle
    }

    /// Sets one of this node's keys; it spreads with the next rounds.
    pub async fn set(&self, key: &str, value: &str) {
        self.handle()
            .with_chitchat(|c| c.self_node_state().set(key, value))
            .await;
    }

    /// Deletes one of this node's keys; peers learn of the deletion by gossip.
    pub async fn delete(&self, key: &str) {
        self.handle()
            .with_chitchat(|c| c.self_node_state().delete(key))
            .await;
    }

    /// Every other node (newest generation per name) with its membership
    /// state and, when its state changed since what the caller `have`s
    /// (`name -> (generation, version)`), all its keys starting with
    /// `prefix`. Unchanged nodes cost no copying.
    pub async fn scan_since(
        &self,
        prefix: &str,
        have: &HashMap<String, (u64, u64)>,
    ) -> Vec<NodeScan> {
        self.scan(prefix, have, false).await
    }

    /// Like [`scan_since`](Self::scan_since), but a changed node carries only
    /// the keys set or deleted since the caller's version: a node with 100k
    /// agents whose load report changed costs one key, not 100k. The answer
    /// is `complete` instead when a delta cannot be trusted: a node or
    /// generation the caller has not seen, a caller version of 0, or
    /// tombstones newer than the caller's version already collected (its
    /// deletions would be missed).
    pub async fn scan_changes(
        &self,
        prefix: &str,
        have: &HashMap<String, (u64, u64)>,
    ) -> Vec<NodeScan> {
        self.scan(prefix, have, true).await
    }

    async fn scan(
        &self,
        prefix: &str,
        have: &HashMap<String, (u64, u64)>,
        deltas: bool,
    ) -> Vec<NodeScan> {
        let chitchat = self.handle().chitchat();
        let c = chitchat.lock().await;
        let now = Instant::now();
        let tracker = lock(&self.tracker);
        let mut newest: HashMap<&str, (&ChitchatId, &chitchat::NodeState, MemberState)> =
            HashMap::new();
        for (id, state) in c.node_states() {
            if *id.node_id == *self.cfg.node_name {
                continue;
            }
            let Some((member_state, _)) = tracker.state(id, now) else {
                continue;
            };
            match newest.get(&*id.node_id) {
                Some((old, _, _)) if old.generation_id >= id.generation_id => {}
                _ => {
                    newest.insert(&id.node_id, (id, state, member_state));
                }
            }
        }
        newest
            .into_values()
            .map(|(id, state, member_state)| {
                let version = state.max_version();
                let had = have
                    .get(&*id.node_id)
                    .filter(|&&(g, _)| g == id.generation_id)
                    .map(|&(_, v)| v);
                let mut scan = NodeScan {
                    name: id.node_id.to_string(),
                    generation: id.generation_id,
                    state: member_state,
                    version,
                    values: None,
                    complete: true,
                    deleted: Vec::new(),
                };
                match had {
                    Some(v) if v == version => {}
                    Some(v) if deltas && v > 0 && v < version && state.last_gc_version() <= v => {
                        let mut set = Vec::new();
                        for (k, vv) in state.key_values_including_deleted() {
                            if vv.version <= v || !k.starts_with(prefix) {
                                continue;
                            }
                            if vv.is_deleted() {
                                scan.deleted.push(k.to_string());
                            } else {
                                set.push((k.to_string(), vv.value.clone()));
                            }
                        }
                        scan.values = Some(set);
                        scan.complete = false;
                    }
                    _ => {
                        scan.values = Some(
                            state
                                .iter_prefix(prefix)
                                .map(|(k, v)| (k.to_string(), v.value.clone()))
                                .collect(),
                        );
                    }
                }
                scan
            })
            .collect()
    }

    /// Gossip rounds this node has initiated.
    pub fn rounds(&self) -> u64 {
        self.stats.rounds.load(Ordering::Relaxed)
    }

    /// Every other node this node knows, each name once at its newest
    /// generation, with all its keys.
    pub async fn members(&self) -> Vec<Member> {
        self.members_with(|_| true).await
    }

    /// Like [`members`](Self::members), with only the keys `keep` accepts
    /// (a node with 100k agents in gossip should not copy them all to count
    /// its peers).
    pub async fn members_with(&self, keep: impl Fn(&str) -> bool) -> Vec<Member> {
        let chitchat = self.handle().chitchat();
        let c = chitchat.lock().await;
        let now = Instant::now();
        let tracker = lock(&self.tracker);
        let mut newest: HashMap<&str, Member> = HashMap::new();
        for (id, state) in c.node_states() {
            if *id.node_id == *self.cfg.node_name {
                continue;
            }
            let Some((member_state, last_seen)) = tracker.state(id, now) else {
                continue;
            };
            let m = Member {
                name: id.node_id.to_string(),
                generation: id.generation_id,
                addr: id.gossip_advertise_addr,
                state: member_state,
                last_seen,
                heartbeat: u64::from(state.heartbeat()),
                values: state
                    .key_values()
                    .filter(|(k, _)| keep(k))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            };
            match newest.get(&*id.node_id) {
                Some(old) if old.generation >= m.generation => {}
                _ => {
                    newest.insert(&id.node_id, m);
                }
            }
        }
        let mut out: Vec<Member> = newest.into_values().collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The value of `key` on every node that has it (newest generation).
    pub async fn values_of(&self, key: &str) -> Vec<(String, String)> {
        let chitchat = self.handle().chitchat();
        let c = chitchat.lock().await;
        c.node_states()
            .iter()
            .filter_map(|(id, s)| s.get(key).map(|v| (id.node_id.to_string(), v.to_string())))
            .collect()
    }

    /// Announces departure: sets `left`, pushes it to every live peer at
    /// once, and waits (bounded) for the exchange to complete.
    pub async fn leave(&self) {
        let peers: Vec<SocketAddr> = self
            .handle()
            .with_chitchat(|c| {
                c.self_node_state().set(KEY_LEFT, "true");
                c.live_nodes()
                    .filter(|id| *id != c.self_chitchat_id())
                    .map(|id| id.gossip_advertise_addr)
                    .collect()
            })
            .await;
        for p in &peers {
            let _ = self.handle().gossip(*p);
        }
        // Syn -> SynAck -> Ack carries the key; a few RTTs on any sane link.
        let wait =
            (self.cfg.interval * 2).clamp(Duration::from_millis(300), Duration::from_secs(1));
        tokio::time::sleep(wait).await;
        info!(node = %self.cfg.node_name, peers = peers.len(), "announced leaving the mesh");
    }

    /// Stops gossip and waits, bounded, until chitchat's loop has exited.
    pub async fn stop(&self) {
        self.sampler.abort();
        let done = self.handle.termination_watcher();
        if self.handle.initiate_shutdown().is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), done).await;
        }
    }
}

/// Whether a node's gossip says it reads this build's compact digests.
fn reads_compact(state: &chitchat::NodeState) -> bool {
    state
        .get(KEY_GOSSIP_WIRE)
        .is_some_and(|v| v.split(',').any(|f| f.trim() == wire::VERSION))
}

/// Every half round: feeds the membership tracker, and refreshes which
/// peers get compact digests (`compact`; `None` when this node sends none).
async fn sample_loop(
    chitchat: Arc<tokio::sync::Mutex<chitchat::Chitchat>>,
    tracker: Tracker,
    compact: Option<CompactPeers>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let c = chitchat.lock().await;
        let now = Instant::now();
        let live: std::collections::HashSet<&ChitchatId> = c.live_nodes().collect();
        let mut t = lock(&tracker);
        for (id, state) in c.node_states() {
            let obs = Observation {
                heartbeat: u64::from(state.heartbeat()),
                live: live.contains(id),
                left: state.get(KEY_LEFT).is_some(),
            };
            t.observe(id, obs, now);
        }
        t.retain(|id| c.node_states().contains_key(id));
        drop(t);
        if let Some(compact) = &compact {
            let readers: std::collections::HashSet<SocketAddr> = c
                .node_states()
                .iter()
                .filter(|(_, s)| reads_compact(s))
                .map(|(id, _)| id.gossip_advertise_addr)
                .collect();
            let mut w = compact.write().unwrap_or_else(|p| p.into_inner());
            if *w != readers {
                *w = readers;
            }
        }
        drop(c);
    }
}
