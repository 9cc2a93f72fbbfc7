//! The node, assembled: identity -> overlay -> gossip -> registry view ->
//! delegation (ingress listeners, overlay delegation streams) -> admin API.
//!
//! `App::build` binds everything (port 0 works everywhere) and returns what it
//! bound in [`Bound`], so tests and the demo never guess ports. `App::run`
//! serves until the shutdown future resolves, then leaves the mesh politely:
//! it announces `left` through gossip, stops gossip, and closes the overlay.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use dmsc_gossip::{Gossip, GossipConfig, LinkTransport, MemberState};
use dmsc_transport::{BiStream, Channel, NodeIdentity, Overlay, OverlayConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{info, warn, Instrument};

use crate::agents::{AgentsCtx, LocalAgents};
use crate::config::NodeConfig;
use crate::delegate::Delegator;
use crate::http::Upstream;
use crate::ingress::Ingress;
use crate::mesh::MeshView;
use crate::metrics::Metrics;
use crate::status::{GossipStatus, NodeStatus, PeerStatus, StatusReport};
use crate::{admin, NodeError};

/// The addresses a built node actually listens on.
#[derive(Debug, Clone)]
pub struct Bound {
    pub overlay: SocketAddr,
    pub admin: SocketAddr,
    /// One per `[[ingress]]` entry, in config order.
    pub ingress: Vec<SocketAddr>,
}

/// What a node publishes about itself under the gossip key `node`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeAnnouncement {
    pub name: String,
    pub region: String,
    pub overlay_addr: SocketAddr,
    pub spiffe_id: String,
    pub version: String,
    pub started_at: u64,
    #[serde(default)]
    pub roles: Vec<String>,
}

/// State shared by the admin API and the app.
pub struct Shared {
    pub config: NodeConfig,
    pub identity: Arc<NodeIdentity>,
    pub overlay: Overlay,
    pub gossip: Arc<Gossip>,
    pub mesh: Arc<MeshView>,
    pub agents: AgentsCtx,
    pub delegator: Arc<Delegator>,
    pub metrics: Metrics,
    pub started: Instant,
    pub bound: Bound,
    pub ready: AtomicBool,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("bound", &self.bound)
            .finish()
    }
}

/// A built node. Drop it to stop everything at once; `run` to serve and drain.
#[derive(Debug)]
pub struct App {
    shared: Arc<Shared>,
    tasks: JoinSet<()>,
}

impl App {
    pub async fn build(config: NodeConfig) -> Result<App, NodeError> {
        let identity = Arc::new(NodeIdentity::load(&config.ca, &config.cert, &config.key)?);
        let name = identity.name().to_string();
        if let Some(configured) = &config.name {
            if *configured != name {
                return Err(NodeError::NameMismatch {
                    configured: configured.clone(),
                    cert: name,
                    path: config.cert.clone(),
                });
            }
        }
        let span = tracing::info_span!("node", node = %name);
        Self::build_inner(config, identity).instrument(span).await
    }

    async fn build_inner(
        config: NodeConfig,
        identity: Arc<NodeIdentity>,
    ) -> Result<App, NodeError> {
        let name = identity.name().to_string();
        let mut tasks = JoinSet::new();

        let (overlay, mut inbound) =
            Overlay::bind(OverlayConfig::new(config.overlay_listen, identity.clone())).await?;
        let overlay_addr = config.advertise.unwrap_or_else(|| overlay.local_addr());

        // Inbound dispatch: one place where overlay channels meet their consumers.
        let (gossip_tx, gossip_rx) = mpsc::channel::<(SocketAddr, Bytes)>(1024);
        tasks.spawn(
            async move {
                while let Some(msg) = inbound.recv().await {
                    match msg.channel {
                        Channel::Gossip => {
                            let _ = gossip_tx.try_send((msg.from, msg.payload));
                        }
                        Channel::Delegate => {
                            tracing::debug!(peer = %msg.peer, "ignoring a delegation sent as a one-way message");
                        }
                    }
                }
            }
            .in_current_span(),
        );

        let transport = LinkTransport::new(Arc::new(overlay.clone()), overlay_addr, gossip_rx);
        let mut gcfg = GossipConfig::new(&name, overlay_addr, identity.trust_domain());
        gcfg.seeds = config.bootstrap.clone();
        gcfg.interval = config.gossip_interval;
        gcfg.phi_threshold = config.phi_threshold;
        gcfg.suspect_after = config
            .suspect_after
            .unwrap_or(config.gossip_interval * 5)
            .max(Duration::from_millis(500));
        gcfg.dead_grace = config.dead_grace;
        let started_at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let announcement = NodeAnnouncement {
            name: name.clone(),
            region: config.region.clone(),
            overlay_addr,
            spiffe_id: identity.spiffe.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at,
            roles: Vec::new(),
        };
        let announcement =
            serde_json::to_string(&announcement).map_err(|e| NodeError::Internal(e.to_string()))?;
        let gossip = Gossip::start(
            gcfg,
            &transport,
            vec![(dmsc_gossip::KEY_NODE.to_string(), announcement)],
        )
        .await?;
        let gossip = Arc::new(gossip);

        let mesh = Arc::new(MeshView::new(
            &name,
            config.delegation.circuit.clone(),
            config.delegation.selection,
        ));
        let delegation_metrics = crate::metrics::DelegationMetrics::default();
        let local_agents = Arc::new(LocalAgents::default());
        let upstream = Upstream::new();
        let delegator = Arc::new(Delegator {
            me: name.clone(),
            mesh: mesh.clone(),
            agents: local_agents.clone(),
            upstream: upstream.clone(),
            overlay: overlay.clone(),
            cfg: config.delegation.clone(),
            metrics: delegation_metrics.clone(),
        });
        let agents = AgentsCtx {
            agents: local_agents,
            mesh: mesh.clone(),
            upstream,
            gossip: gossip.clone(),
            cfg: config.delegation.clone(),
        };
        let mut ingress_addrs = Vec::new();
        for spec in &config.ingress {
            let listener = tokio::net::TcpListener::bind(spec.listen)
                .await
                .map_err(|source| NodeError::Bind {
                    what: "ingress",
                    addr: spec.listen,
                    source,
                })?;
            let addr = listener.local_addr().map_err(|source| NodeError::Bind {
                what: "ingress",
                addr: spec.listen,
                source,
            })?;
            let ingress = Ingress {
                tenant: spec.tenant.clone(),
                listen: addr,
                delegator: delegator.clone(),
            };
            tasks.spawn(ingress.serve(listener).in_current_span());
            info!(addr = %addr, tenant = %spec.tenant, "ingress listening (HTTP/1.1, h2, h2c)");
            ingress_addrs.push(addr);
        }
        if let Some(streams) = overlay.incoming_streams() {
            tasks.spawn(stream_loop(streams, delegator.clone()).in_current_span());
        }
        tasks.spawn(
            sync_loop(
                gossip.clone(),
                mesh.clone(),
                delegator.clone(),
                (config.gossip_interval / 2).max(Duration::from_millis(20)),
            )
            .in_current_span(),
        );
        tasks.spawn(crate::agents::run(agents.clone(), config.agents.clone()).in_current_span());

        let admin_listener = tokio::net::TcpListener::bind(config.admin_listen)
            .await
            .map_err(|source| NodeError::Bind {
                what: "admin",
                addr: config.admin_listen,
                source,
            })?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| NodeError::Bind {
                what: "admin",
                addr: config.admin_listen,
                source,
            })?;
        let bound = Bound {
            overlay: overlay_addr,
            admin: admin_addr,
            ingress: ingress_addrs,
        };
        let shared = Arc::new(Shared {
            config,
            identity,
            overlay,
            gossip,
            mesh,
            agents,
            delegator,
            metrics: Metrics::new(delegation_metrics),
            started: Instant::now(),
            bound: bound.clone(),
            ready: AtomicBool::new(false),
        });
        tasks.spawn(admin::serve(admin_listener, shared.clone()).in_current_span());
        shared.ready.store(true, Ordering::Release);
        info!(
            node = %name,
            overlay = %bound.overlay,
            admin = %bound.admin,
            spiffe = %shared.identity.spiffe,
            "dmsc-node ready"
        );
        Ok(App { shared, tasks })
    }

    pub fn bound(&self) -> Bound {
        self.shared.bound.clone()
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub async fn status(&self) -> StatusReport {
        status_report(&self.shared).await
    }

    /// Serves until `shutdown` resolves, then drains: announce leaving,
    /// stop gossip, close the overlay (bounded).
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::select! {
            _ = shutdown => {}
            Some(res) = self.tasks.join_next() => {
                if let Err(e) = res {
                    warn!(error = %e, "a node task ended unexpectedly; shutting down");
                }
            }
        }
        self.stop().await;
    }

    /// Leaves the mesh and stops everything.
    pub async fn stop(mut self) {
        let name = self.shared.identity.name().to_string();
        info!(node = %name, "shutting down: announcing departure");
        self.shared.ready.store(false, Ordering::Release);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.shared.gossip.leave()).await;
        self.shared.gossip.stop().await;
        self.tasks.abort_all();
        self.shared.overlay.shutdown().await;
        info!(node = %name, "stopped");
    }
}

/// Serves delegation streams that peers open to this node (it is the
/// agents' home node). Each stream is a task of this loop's set.
async fn stream_loop(mut rx: mpsc::Receiver<BiStream>, delegator: Arc<Delegator>) {
    let mut set = JoinSet::new();
    loop {
        tokio::select! {
            s = rx.recv() => {
                let Some(mut s) = s else { break };
                match s.channel {
                    Channel::Delegate => {
                        let d = delegator.clone();
                        set.spawn(async move { d.serve_stream(s).await }.in_current_span());
                    }
                    Channel::Gossip => {
                        s.send.reset(dmsc_transport::overlay::RESET_BUSY);
                    }
                }
            }
            Some(_) = set.join_next(), if !set.is_empty() => {}
        }
    }
}

/// Keeps the registry in step with gossip, and fetches the cards of remote
/// agents this node has not seen yet (their text feeds intent matching).
async fn sync_loop(
    gossip: Arc<Gossip>,
    mesh: Arc<MeshView>,
    delegator: Arc<Delegator>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut cards = tokio::time::interval(Duration::from_millis(500));
    cards.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failed: std::collections::HashMap<String, Instant> = Default::default();
    let mut closed: std::collections::HashSet<SocketAddr> = Default::default();
    let mut in_progress: std::collections::HashSet<String> = Default::default();
    let mut fetching: JoinSet<(String, bool)> = JoinSet::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let scan = gossip.scan_since("", &mesh.scan_cursor()).await;
                let gone = mesh.apply_scan(scan);
                for addr in &gone {
                    // Once per death: in-flight delegations to a dead node
                    // fail now (idempotent ones retry elsewhere) instead of
                    // waiting for the QUIC idle timeout. Not again while it
                    // stays dead, so a node that comes back can reconnect.
                    if closed.insert(*addr) {
                        delegator.overlay.close_peer(*addr);
                    }
                }
                closed.retain(|a| gone.contains(a));
            }
            _ = cards.tick() => {
                // Fetches run beside the scans (a dead home node must not
                // hold up the scan that notices it), a few at a time.
                failed.retain(|_, t: &mut Instant| t.elapsed() < Duration::from_secs(10));
                for (id, digest) in mesh.missing_cards() {
                    if fetching.len() >= 8 {
                        break;
                    }
                    if failed.contains_key(&digest) || !in_progress.insert(digest.clone()) {
                        continue;
                    }
                    let (d, m) = (delegator.clone(), mesh.clone());
                    fetching.spawn(
                        async move {
                            let ok = match crate::delegate::fetch_card(&d, &id).await {
                                Ok(card) if card.digest() == digest => {
                                    m.add_card(card);
                                    true
                                }
                                Ok(_) => false,
                                Err(e) => {
                                    tracing::debug!(agent = %id, error = %e, "card fetch failed");
                                    false
                                }
                            };
                            (digest, ok)
                        }
                        .in_current_span(),
                    );
                }
            }
            Some(done) = fetching.join_next(), if !fetching.is_empty() => {
                if let Ok((digest, ok)) = done {
                    in_progress.remove(&digest);
                    if !ok {
                        failed.insert(digest, Instant::now());
                    }
                }
            }
        }
    }
}

/// Builds the status report from live state.
pub async fn status_report(s: &Shared) -> StatusReport {
    let members = s.gossip.members().await;
    let now = SystemTime::now();
    let not_after = s.identity.info.not_after;
    let expires_in = match not_after.duration_since(now) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    // Names the overlay read from verified certificates, by peer address.
    // Gossip names are what peers *say*; where a live connection proves a
    // different name for the same address, the gossip entry is an impostor.
    let verified: std::collections::HashMap<SocketAddr, String> = s
        .overlay
        .peers()
        .into_iter()
        .map(|p| (p.addr, p.name))
        .collect();
    let mut counts = [0usize; 4];
    let peers: Vec<PeerStatus> = members
        .iter()
        .filter(|m| match verified.get(&m.addr) {
            Some(cert_name) if *cert_name != m.name => {
                warn!(
                    claimed = %m.name,
                    certificate = %cert_name,
                    addr = %m.addr,
                    "gossip names a peer differently from its certificate; not listing it"
                );
                false
            }
            _ => true,
        })
        .map(|m| {
            counts[match m.state {
                MemberState::Alive => 0,
                MemberState::Suspect => 1,
                MemberState::Dead => 2,
                MemberState::Left => 3,
            }] += 1;
            let ann: Option<NodeAnnouncement> = m
                .values
                .get(dmsc_gossip::KEY_NODE)
                .and_then(|v| serde_json::from_str(v).ok());
            let rtt = s.overlay.rtt(m.addr);
            PeerStatus {
                name: m.name.clone(),
                region: ann.map(|a| a.region).unwrap_or_else(|| "?".into()),
                addr: m.addr.to_string(),
                state: m.state.to_string(),
                rtt_ms: rtt.map(|r| r.as_secs_f64() * 1000.0),
                last_seen_ms: m.last_seen.as_millis() as u64,
                generation: m.generation,
                connected: rtt.is_some(),
                verified: verified.get(&m.addr).is_some_and(|n| *n == m.name),
            }
        })
        .collect();
    let gstats = s.gossip.stats();
    let agents = agent_statuses(s);
    let pending_agents = s
        .agents
        .agents
        .pending()
        .into_iter()
        .map(|(spec, error)| crate::status::PendingAgent {
            tenant: spec.tenant,
            url: spec.url,
            error,
        })
        .collect();
    StatusReport {
        agents,
        pending_agents,
        node: NodeStatus {
            name: s.identity.name().to_string(),
            region: s.config.region.clone(),
            spiffe_id: s.identity.spiffe.to_string(),
            trust_domain: s.identity.trust_domain().to_string(),
            overlay_addr: s.bound.overlay.to_string(),
            admin_addr: s.bound.admin.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            generation: s.gossip.config().generation,
            uptime_secs: s.started.elapsed().as_secs(),
            cert_not_after: time::OffsetDateTime::from(not_after)
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            cert_expires_in_secs: expires_in,
        },
        peers,
        gossip: GossipStatus {
            interval_ms: s.gossip.config().interval.as_millis() as u64,
            phi_threshold: s.gossip.config().phi_threshold,
            rounds: s.gossip.rounds(),
            alive: counts[0],
            suspect: counts[1],
            dead: counts[2],
            left: counts[3],
            bytes_sent: gstats.bytes_sent.load(Ordering::Relaxed),
            bytes_received: gstats.bytes_received.load(Ordering::Relaxed),
        },
    }
}

/// The agent table: every registered agent, with this node's view of it.
pub fn agent_statuses(s: &Shared) -> Vec<crate::status::AgentStatus> {
    let reg = s.mesh.read();
    reg.iter()
        .map(|e| {
            let local = s.agents.agents.get(&e.id);
            let mut tags: Vec<String> = e
                .record
                .skills
                .iter()
                .flat_map(|k| k.tags.iter().cloned())
                .collect();
            tags.sort();
            tags.dedup();
            crate::status::AgentStatus {
                tenant: e.id.tenant.clone(),
                name: e.id.name.clone(),
                node: e.node.clone(),
                skills: e.record.skills.iter().map(|k| k.id.clone()).collect(),
                tags,
                health: e.record.health.to_string(),
                circuit: s.mesh.circuit_state(&e.id).to_string(),
                in_flight: e.load.in_flight,
                outstanding: s.mesh.outstanding(&e.id),
                p50_ms: local
                    .as_ref()
                    .and_then(|a| a.stats.lock().unwrap_or_else(|p| p.into_inner()).p50_ms()),
                ewma_ms: f64::from(e.load.ewma_ms),
                error_rate: f64::from(e.load.error_rate),
                local: local.is_some(),
            }
        })
        .collect()
}

/// Refreshes the metrics registry from live state and encodes it.
pub async fn metrics_text(s: &Shared) -> String {
    let report = status_report(s).await;
    let m = &s.metrics;
    for (state, n) in [
        ("alive", report.gossip.alive),
        ("suspect", report.gossip.suspect),
        ("dead", report.gossip.dead),
        ("left", report.gossip.left),
    ] {
        m.peers
            .get_or_create(&crate::metrics::StateLabel {
                state: state.into(),
            })
            .set(n as i64);
    }
    Metrics::set_counter(&m.gossip_rounds, report.gossip.rounds);
    Metrics::set_counter(&m.gossip_bytes_sent, report.gossip.bytes_sent);
    Metrics::set_counter(&m.gossip_bytes_received, report.gossip.bytes_received);
    let o = s.overlay.stats();
    let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    Metrics::set_counter(&m.overlay_bytes_sent, ld(&o.bytes_sent));
    Metrics::set_counter(&m.overlay_bytes_received, ld(&o.bytes_received));
    Metrics::set_counter(&m.overlay_messages_dropped, ld(&o.messages_dropped));
    m.set_handshakes("inbound", "ok", ld(&o.handshakes_ok_inbound));
    m.set_handshakes("inbound", "failed", ld(&o.handshakes_failed_inbound));
    m.set_handshakes("outbound", "ok", ld(&o.handshakes_ok_outbound));
    m.set_handshakes("outbound", "failed", ld(&o.handshakes_failed_outbound));
    m.connections.set(s.overlay.peers().len() as i64);
    m.cert_expiry_seconds.set(report.node.cert_expires_in_secs);
    m.uptime_seconds.set(s.started.elapsed().as_secs() as i64);
    m.agents.set(s.mesh.read().len() as i64);
    m.encode()
}
