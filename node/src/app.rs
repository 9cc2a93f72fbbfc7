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
use dmsc_transport::{BiStream, Channel, NodeIdentity, Overlay, OverlayConfig, RevocationSet};
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
use crate::security::Security;
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
    pub security: Arc<Security>,
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
    audit: Option<dmsc_audit::AuditTask>,
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

        let revoked = Arc::new(RevocationSet::new());
        let (security, audit) = Security::build(&config, identity.clone(), revoked.clone()).await?;
        let security = Arc::new(security);
        let mut ocfg = OverlayConfig::new(config.overlay_listen, identity.clone());
        ocfg.revoked = revoked.clone();
        let (overlay, mut inbound) = Overlay::bind(ocfg).await?;
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
                        Channel::Delegate | Channel::Control => {
                            tracing::debug!(peer = %msg.peer, "ignoring a stream-only channel sent as a one-way message");
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
        // Every revocation this node knows is re-published under its own
        // state, so a node that was away learns it from whoever it meets.
        let mut initial = vec![(dmsc_gossip::KEY_NODE.to_string(), announcement)];
        for r in revoked.all() {
            initial.push((revoked_key(&r.serial), r.to_json()));
        }
        let gossip = Gossip::start(gcfg, &transport, initial).await?;
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
            body_budget: crate::budget::BodyBudget::new(
                config.delegation.max_buffered_total,
                delegation_metrics.buffered_bytes.clone(),
                delegation_metrics.budget_refusals.clone(),
            ),
            security: security.clone(),
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
            let tls = if spec.tls {
                Some(security.tls_ingress(spec.mtls, spec.allow_tls12)?)
            } else {
                None
            };
            let ingress = Ingress {
                spec: spec.clone(),
                listen: addr,
                delegator: delegator.clone(),
                security: security.clone(),
                tls,
            };
            tasks.spawn(ingress.serve(listener).in_current_span());
            info!(
                addr = %addr,
                tenant = spec.tenant.as_deref().unwrap_or("<from the caller>"),
                tls = spec.tls,
                mtls = spec.mtls,
                jwt = spec.jwt,
                "ingress listening"
            );
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
        tasks.spawn(
            crate::security::watch_credentials(
                security.clone(),
                overlay.clone(),
                config.reload_interval,
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
        let security_metrics = security.metrics.clone();
        let shared = Arc::new(Shared {
            config,
            security,
            overlay,
            gossip,
            mesh,
            agents,
            delegator,
            metrics: Metrics::new(delegation_metrics, security_metrics),
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
            spiffe = %identity.spiffe,
            "dmsc-node ready"
        );
        Ok(App {
            shared,
            tasks,
            audit,
        })
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
        let name = self.shared.security.identity().name().to_string();
        info!(node = %name, "shutting down: announcing departure");
        self.shared.ready.store(false, Ordering::Release);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.shared.gossip.leave()).await;
        self.shared.gossip.stop().await;
        self.tasks.abort_all();
        self.shared.overlay.shutdown().await;
        if let Some(audit) = self.audit.take() {
            // Drains what is queued, writes a signed checkpoint, fsyncs.
            if let Err(e) = audit.shutdown_within(Duration::from_secs(5)).await {
                warn!(error = %e, "audit log did not close cleanly");
            }
        }
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
                    Channel::Control => {
                        set.spawn(serve_control(s).in_current_span());
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

/// The gossip key of a revocation.
pub fn revoked_key(serial: &str) -> String {
    format!("{}{serial}", KEY_REVOKED_PREFIX)
}

/// Gossip key prefix of revocations: `revoked/<serial>`.
pub const KEY_REVOKED_PREFIX: &str = "revoked/";

/// Takes in the revocations peers publish: each is checked against the
/// mesh CA, persisted, re-published under this node's state, and the live
/// connections it condemns are closed.
fn apply_revocations(scan: &[dmsc_gossip::NodeScan], gossip: &Arc<Gossip>, delegator: &Delegator) {
    let mut any = false;
    for (key, value) in scan
        .iter()
        .filter_map(|n| n.values.as_ref())
        .flatten()
        .filter(|(k, _)| k.starts_with(KEY_REVOKED_PREFIX))
    {
        let r = match dmsc_transport::Revocation::parse(value.as_bytes()) {
            Ok(r) if revoked_key(&r.serial) == *key => r,
            Ok(_) | Err(_) => {
                tracing::debug!(key = %key, "ignoring a malformed revocation in gossip");
                continue;
            }
        };
        match delegator.security.apply_revocation(r.clone(), "gossip") {
            Ok(true) => {
                let g = gossip.clone();
                tokio::spawn(async move { publish_revocation(&g, &r).await }.in_current_span());
                any = true;
            }
            Ok(false) => {}
            Err(e) => {
                tracing::debug!(key = %key, error = %e, "ignoring a revocation that does not verify")
            }
        }
    }
    if any {
        delegator.overlay.close_revoked();
    }
}

/// Publishes a revocation under this node's gossip state.
pub async fn publish_revocation(gossip: &Gossip, r: &dmsc_transport::Revocation) {
    gossip.set(&revoked_key(&r.serial), &r.to_json()).await;
}

/// Answers a peer's control question. The only one today: `clock`, the
/// node's wall clock in unix milliseconds (for `dmsc-node check`).
async fn serve_control(mut s: BiStream) {
    let mut q = Vec::new();
    let read = async {
        while q.len() < 64 {
            match s.recv.read_chunk(64).await {
                Ok(Some(b)) => q.extend_from_slice(&b),
                _ => break,
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .is_err()
    {
        s.send.reset(dmsc_transport::overlay::RESET_BUSY);
        return;
    }
    if q != b"clock" {
        s.send.reset(dmsc_transport::overlay::RESET_BUSY);
        return;
    }
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default();
    if s.send.write_all(&now.to_be_bytes()).await.is_ok() {
        let _ = s.send.finish();
    }
}

/// Asks a peer for its clock; returns (peer clock - our clock at the
/// midpoint, round trip), in milliseconds.
pub async fn clock_skew(overlay: &Overlay, addr: SocketAddr) -> Result<(i64, u64), String> {
    let now_ms = || {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_default()
    };
    let t0 = now_ms();
    let mut s = overlay
        .open_stream(addr, Channel::Control)
        .await
        .map_err(|e| e.to_string())?;
    s.send
        .write_all(b"clock")
        .await
        .map_err(|e| e.to_string())?;
    s.send.finish().map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    while buf.len() < 8 {
        match s.recv.read_chunk(8).await {
            Ok(Some(b)) => buf.extend_from_slice(&b),
            Ok(None) => break,
            Err(e) => return Err(e.to_string()),
        }
    }
    let t1 = now_ms();
    let bytes: [u8; 8] = buf
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or("short clock answer")?;
    let theirs = u64::from_be_bytes(bytes) as i64;
    Ok((theirs - (t0 + t1) / 2, (t1 - t0).max(0) as u64))
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
                apply_revocations(&scan, &gossip, &delegator);
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
    let identity = s.security.identity();
    let not_after = identity.info.not_after;
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
    let rfc3339 = |t: SystemTime| {
        time::OffsetDateTime::from(t)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    };
    let certificates = crate::status::CertStatus {
        node_serial: identity.info.serial_hex.clone(),
        issuer_not_after: s.security.issuer().map(|i| rfc3339(i.info.not_after)),
        agents_issued: s.security.issued(),
        revoked: s.security.revoked.len(),
        tokens: s.security.token_counts(),
        reloads: s.security.reloads(),
    };
    StatusReport {
        certificates,
        agents,
        pending_agents,
        node: NodeStatus {
            name: identity.name().to_string(),
            region: s.config.region.clone(),
            spiffe_id: identity.spiffe.to_string(),
            trust_domain: identity.trust_domain().to_string(),
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
    m.security.revoked.set(s.security.revoked.len() as i64);
    if let Some(a) = &s.security.audit {
        let st = a.stats();
        Metrics::set_counter(&m.security.audit_appended, st.appended);
        Metrics::set_counter(&m.security.audit_queue_full_waits, st.queue_full_waits);
    }
    m.encode()
}

/// What `dmsc-node check` asks the running node: every connected peer's
/// clock skew (over a control stream, error bounded by half the RTT) and
/// whether each bootstrap peer accepts this node's certificate (a CA
/// mismatch shows up here as a refused handshake).
pub async fn peer_checks(s: &Shared) -> serde_json::Value {
    let mut peers = Vec::new();
    for p in s.overlay.peers() {
        let (skew, rtt, error) = match tokio::time::timeout(
            Duration::from_secs(3),
            clock_skew(&s.overlay, p.addr),
        )
        .await
        {
            Ok(Ok((skew, rtt))) => (Some(skew), Some(rtt), None),
            Ok(Err(e)) => (None, None, Some(e)),
            Err(_) => (None, None, Some("no clock answer within 3 s".to_string())),
        };
        peers.push(serde_json::json!({
            "name": p.name, "addr": p.addr.to_string(),
            "skew_ms": skew, "rtt_ms": rtt, "error": error,
        }));
    }
    let mut bootstrap = Vec::new();
    for b in &s.config.bootstrap {
        let addrs: Vec<SocketAddr> = match tokio::net::lookup_host(b.as_str()).await {
            Ok(a) => a.collect(),
            Err(e) => {
                bootstrap
                    .push(serde_json::json!({"peer": b, "error": format!("cannot resolve: {e}")}));
                continue;
            }
        };
        for addr in addrs {
            let error =
                match tokio::time::timeout(Duration::from_secs(5), s.overlay.probe(addr)).await {
                    Ok(Ok(_)) => None,
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(_) => Some("no answer within 5 s".to_string()),
                };
            bootstrap
                .push(serde_json::json!({"peer": b, "addr": addr.to_string(), "error": error}));
        }
    }
    // Peers that tried and were refused never show up as peers: their
    // refusals are the trace of a CA mismatch (or a revoked node) here.
    let refused: Vec<serde_json::Value> = s
        .overlay
        .refusals(Duration::from_secs(600))
        .into_iter()
        .map(|(t, reason)| {
            let ago = SystemTime::now()
                .duration_since(t)
                .unwrap_or_default()
                .as_secs();
            serde_json::json!({"secs_ago": ago, "reason": reason})
        })
        .collect();
    serde_json::json!({ "peers": peers, "bootstrap": bootstrap, "refused": refused })
}
