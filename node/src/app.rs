//! The node, assembled: identity -> overlay -> gossip -> registry view ->
//! delegation (ingress listeners, overlay delegation streams) -> admin API.
//!
//! `App::build` binds everything (port 0 works everywhere) and returns what it
//! bound in [`Bound`], so tests and the demo never guess ports. `App::run`
//! serves until the shutdown future resolves, then leaves the mesh politely:
//! it stops taking new work and announces `left` through gossip, waits for
//! the requests in flight up to the grace period ([`crate::drain`]), stops
//! gossip, and closes the overlay.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use dmsc_gossip::{Gossip, GossipConfig, LinkTransport};
use dmsc_transport::{BiStream, Channel, NodeIdentity, Overlay, OverlayConfig, RevocationSet};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{info, warn, Instrument};

use crate::admin::report::status_report;
use crate::admin::status::StatusReport;
use crate::admin::Shared;
use crate::config::NodeConfig;
use crate::control::agents::AgentsCtx;
use crate::control::clock::serve_control;
use crate::control::credentials::watch_credentials;
use crate::control::sync::{sync_loop, Sync};
use crate::forward::budget::BodyBudget;
use crate::forward::client::Upstream;
use crate::forward::local::LocalAgents;
use crate::forward::Delegator;
use crate::ingress::listen::{Listeners, Protocols};
use crate::ingress::{Ingress, IngressParts};
use crate::metrics::Metrics;
use crate::proto::gossip::{revoked_key, NodeAnnouncement};
use crate::route::MeshView;
use crate::security::Security;
use crate::{admin, NodeError};

pub use crate::admin::Bound;

/// A built node. Drop it to stop everything at once; `run` to serve and drain.
#[derive(Debug)]
pub struct App {
    shared: Arc<Shared>,
    body_budget: Arc<BodyBudget>,
    limiter: Arc<crate::limits::Limiter>,
    tasks: JoinSet<()>,
    audit: Option<dmsc_audit::AuditTask>,
}

impl App {
    /// The node's identity from its configured credentials: readable,
    /// a key that belongs to the certificate, and the configured name, if
    /// any, the certificate's (`run --validate-only` checks the same).
    pub fn identity(config: &NodeConfig) -> Result<NodeIdentity, NodeError> {
        let identity = NodeIdentity::load(&config.ca, &config.cert, &config.key)?;
        if let Some(configured) = &config.name {
            if configured != identity.name() {
                return Err(NodeError::NameMismatch {
                    configured: configured.clone(),
                    cert: identity.name().to_string(),
                    path: config.cert.clone(),
                });
            }
        }
        Ok(identity)
    }

    pub async fn build(config: NodeConfig) -> Result<App, NodeError> {
        let identity = Arc::new(Self::identity(&config)?);
        let name = identity.name().to_string();
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
        ocfg.impair = impairment()?;
        ocfg.direct_upgrade = config.direct_upgrade;
        ocfg.max_udp_payload = config.max_udp_payload;
        let (overlay, mut inbound) = Overlay::bind(ocfg).await?;
        let direct_addr = config.advertise.unwrap_or_else(|| overlay.local_addr());
        let relay = start_relay(&config, &overlay, direct_addr).await?;
        // A relay's TCP listener is assumed on its overlay address (unless
        // the entry names its port) until its gossip record says otherwise.
        for r in crate::config::resolve_relays(&config.relays).await {
            overlay.add_relay(r);
        }
        let established = overlay.establish(config.reachability, direct_addr).await;
        info!(
            advertised = %established.advertised,
            relayed = established.relayed,
            reason = %established.reason,
            "overlay reachability"
        );
        // A relay nobody can dial relays for no one: keep serving sessions
        // that reach it, but do not announce the role.
        let relay = match relay {
            Some(_) if established.relayed => {
                warn!("relay.enabled, but this node is not reachable directly: not announced as a relay (give it a reachable address, or reachability = \"direct\")");
                None
            }
            r => r,
        };
        let overlay_addr = established.advertised;

        // Inbound dispatch: one place where overlay channels meet their consumers.
        let (gossip_tx, gossip_rx) = mpsc::channel::<(SocketAddr, Bytes)>(1024);
        tasks.spawn(
            async move {
                while let Some(msg) = inbound.recv().await {
                    match msg.channel {
                        Channel::Gossip => {
                            let _ = gossip_tx.try_send((msg.from, msg.payload));
                        }
                        Channel::Delegate | Channel::Control | Channel::Relay => {
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
        gcfg.compact_digests = config.compact_digests;
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
            roles: if relay.is_some() {
                vec!["relay".to_string()]
            } else {
                Vec::new()
            },
            wire: crate::proto::wire::DELEGATION_VERSION,
            reachability: if established.relayed {
                "relayed"
            } else {
                "direct"
            }
            .to_string(),
            via: Vec::new(),
            relay: relay
                .as_ref()
                .map(|r| crate::proto::gossip::RelayInfo { tcp: r.tcp }),
        };
        let node_record = announcement.clone();
        let announcement = serde_json::to_string(&announcement).map_err(NodeError::Announcement)?;
        // Every revocation this node knows is re-published under its own
        // state, so a node that was away learns it from whoever it meets.
        let mut initial = vec![(dmsc_gossip::KEY_NODE.to_string(), announcement)];
        for r in revoked.all() {
            initial.push((revoked_key(&r.serial), r.to_json()));
        }
        for (tenant, value) in security.tenant_keys.gossip_values() {
            initial.push((crate::proto::gossip::tenant_key_key(&tenant), value));
        }
        let gossip = Gossip::start(gcfg, &transport, initial).await?;
        let gossip = Arc::new(gossip);

        let mesh = Arc::new(MeshView::new(
            &name,
            config.delegation.circuit.clone(),
            config.delegation.selection,
        ));
        mesh.set_intent_margin(config.delegation.intent_margin);
        mesh.write().set_fusion(config.intent.fusion);
        // A configured model that cannot be read is a configuration error
        // naming the file (exit 64), not a silent lexical fallback.
        let intent = Arc::new(
            crate::intent::Intent::load(&name, config.intent.clone(), &config.data_dir).map_err(
                |e| {
                    NodeError::Config(crate::config::ConfigError(vec![format!(
                        "intent.model_dir: {e}"
                    )]))
                },
            )?,
        );
        for t in config
            .ingress
            .iter()
            .filter_map(|i| i.tenant.as_deref())
            .chain(config.agents.iter().map(|a| a.tenant.as_str()))
        {
            intent.serve_tenant(t);
        }
        // Lexical intent indexes (and the cards that feed them) only for the
        // tenants this node routes intent for: those it serves or is
        // configured for now, any other from its first intent request.
        {
            let mut reg = mesh.write();
            reg.index_intent_on_demand();
            for t in intent.tenants() {
                reg.index_intent(&t);
            }
        }
        tasks.spawn(intent.clone().run(mesh.clone()).in_current_span());
        tasks.spawn(
            crate::intent::learned_loop(
                intent.clone(),
                mesh.clone(),
                gossip.clone(),
                config.gossip_interval,
            )
            .in_current_span(),
        );
        // A relay accepts an advertised address gossip gives for the node
        // (a node behind 1:1 NAT whose relay sees another address).
        if let Some(server) = overlay.relay() {
            let m = mesh.clone();
            server.set_claim_check(Arc::new(move |name, addr| {
                m.announcements()
                    .1
                    .iter()
                    .any(|a| a.name == name && a.overlay_addr == addr)
            }));
        }
        let delegation_metrics = crate::metrics::DelegationMetrics::default();
        let drain = crate::drain::Drain::new();
        let local_agents = Arc::new(LocalAgents::default());
        let upstream = Upstream::new();
        let body_budget = crate::forward::budget::BodyBudget::new(
            config.delegation.max_buffered_total,
            delegation_metrics.buffered_bytes.clone(),
            delegation_metrics.budget_refusals.clone(),
        );
        let limiter =
            crate::limits::Limiter::new(&name, security.clone(), delegation_metrics.clone());
        // A tenant's limits are its policy's: set now for the policies
        // loaded at start, again whenever one comes into force, and
        // cleared when one is dropped.
        {
            let l = limiter.clone();
            security.policies.watch(Box::new(move |tenant, p| {
                l.set(
                    tenant,
                    p.and_then(|p| crate::limits::TenantLimits::from_policy(&p.limits)),
                );
            }));
        }
        tasks.spawn(
            limiter
                .clone()
                .run(gossip.clone(), config.gossip_interval)
                .in_current_span(),
        );
        let delegator = Arc::new(Delegator {
            me: name.clone(),
            mesh: mesh.clone(),
            agents: local_agents.clone(),
            upstream: upstream.clone(),
            overlay: overlay.clone(),
            cfg: config.delegation.clone(),
            metrics: delegation_metrics.clone(),
            budget: body_budget.clone(),
            security: security.clone(),
            region: config.region.clone(),
            limiter: limiter.clone(),
            intent: intent.clone(),
            drain: drain.clone(),
        });
        let agents = AgentsCtx {
            agents: local_agents,
            mesh: mesh.clone(),
            upstream,
            gossip: gossip.clone(),
            cfg: config.delegation.clone(),
        };
        // One connection budget for every ingress and admin listener.
        let listener_metrics = crate::metrics::ListenerMetrics::default();
        let listeners = Listeners::new(&name, config.limits.clone(), listener_metrics.clone())
            .with_drain(drain.clone());
        let mut ingress_addrs = Vec::new();
        let scope = identity.info.tenants.clone();
        for spec in &config.ingress {
            if let Some(t) = spec
                .tenant
                .as_ref()
                .filter(|t| !crate::policy::in_scope(scope.as_deref(), t))
            {
                warn!(
                    listen = %spec.listen,
                    tenant = %t,
                    scope = %scope.as_deref().unwrap_or_default().join(","),
                    "this ingress serves a tenant outside the node certificate's scope: every home node will refuse its delegations (403)"
                );
            }
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
            // A listener of several tenants splits its in-flight budget
            // fairly between them; a plain one serves one tenant.
            let fair = spec.tenant.is_none().then(|| {
                crate::limits::FairShed::new(
                    &format!("ingress:{addr}"),
                    config.limits.max_in_flight_per_listener,
                    delegation_metrics.clone(),
                )
            });
            let ingress = Ingress::new(IngressParts {
                spec: spec.clone(),
                listen: addr,
                me: name.clone(),
                cfg: config.delegation.clone(),
                budget: body_budget.clone(),
                delegator: delegator.clone(),
                security: security.clone(),
                tls,
                fair,
            });
            let server = listeners.server(format!("ingress:{addr}"), Protocols::Auto);
            tasks.spawn(ingress.serve(listener, server).in_current_span());
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
        overlay.serve_streams(stream_handler(delegator.clone()));
        // An ingress of one tenant that callers inside the node use (MQTT
        // calls from the edge, intercepted connections): the same path as
        // a TCP caller of a listener of that tenant.
        let in_process = {
            let (name, delegation, body_budget, delegator, security) = (
                name.clone(),
                config.delegation.clone(),
                body_budget.clone(),
                delegator.clone(),
                security.clone(),
            );
            move |tenant: &str, listen: SocketAddr, label: String| {
                Ingress::new(IngressParts {
                    spec: crate::config::IngressSpec {
                        listen,
                        tenant: Some(tenant.to_string()),
                        tls: false,
                        mtls: false,
                        jwt: false,
                        allow_tls12: false,
                    },
                    listen,
                    me: name.clone(),
                    cfg: delegation.clone(),
                    budget: body_budget.clone(),
                    delegator: delegator.clone(),
                    security: security.clone(),
                    tls: None,
                    fair: None,
                })
                .with_label(label)
            }
        };
        let mut edge = Vec::new();
        if let Some(mqtt) = config.mqtt.clone() {
            // Edge agents over MQTT: delivery reaches the bridge through
            // the upstream; calls from the edge enter through an
            // in-process ingress of their tenant.
            if let Some(at) = &mqtt.embedded {
                let fronts = crate::edge::embedded::start(at, &mqtt)
                    .map_err(|e| NodeError::Config(crate::config::ConfigError(vec![e])))?;
                for f in fronts {
                    tasks.spawn(crate::edge::embedded::serve(f).in_current_span());
                }
            }
            let mut ingress = std::collections::HashMap::new();
            let mut sessions = Vec::new();
            for session in mqtt.sessions(&name) {
                let (bridge, eventloop) = crate::edge::Bridge::new(session, &name)
                    .map_err(|e| NodeError::Config(crate::config::ConfigError(vec![e])))?;
                for tenant in bridge.tenants() {
                    let label = format!("mqtt:{}:{tenant}", bridge.broker());
                    let i = in_process(tenant, config.admin_listen, label);
                    ingress.insert(tenant.clone(), Arc::new(i));
                }
                info!(broker = %bridge.broker(), tenants = ?bridge.tenants(), "MQTT bridge starting");
                edge.push(bridge.clone());
                sessions.push((bridge, eventloop));
            }
            let _ = agents
                .upstream
                .edge
                .set(Arc::new(crate::edge::Link(edge.clone())));
            let parts = crate::edge::EdgeParts {
                agents: agents.clone(),
                ingress,
            };
            for (bridge, eventloop) in sessions {
                tasks.spawn(bridge.run(eventloop, parts.clone()).in_current_span());
            }
        }
        // Interception: now if configured, else at the first `intercept
        // enable` (with the defaults).
        let start = {
            let (name, config) = (name.clone(), config.clone());
            let parts = (security.clone(), agents.clone(), listeners.clone());
            let in_process = in_process.clone();
            move |icfg: crate::config::InterceptConfig| {
                let (name, config, parts) = (name.clone(), config.clone(), parts.clone());
                let make = {
                    let listen = SocketAddr::V4(icfg.listen);
                    let in_process = in_process.clone();
                    move |tenant: &str, caller: &str| {
                        Arc::new(in_process(tenant, listen, caller.to_string()))
                    }
                };
                let fut: std::pin::Pin<
                    Box<dyn std::future::Future<Output = crate::intercept::State> + Send>,
                > = Box::pin(
                    async move { start_intercept(&icfg, &name, &config, parts, make).await }
                        .in_current_span(),
                );
                fut
            }
        };
        let intercept = match config.intercept.clone() {
            Some(icfg) => Arc::new(crate::intercept::Slot::started(start(icfg).await)),
            None => Arc::new(crate::intercept::Slot::lazy(Box::new(move || {
                start(crate::config::InterceptConfig::defaults())
            }))),
        };
        tasks.spawn(
            sync_loop(Sync {
                gossip: gossip.clone(),
                mesh: mesh.clone(),
                security: security.clone(),
                overlay: overlay.clone(),
                cards: delegator.clone(),
                every: (config.gossip_interval / 2).max(Duration::from_millis(20)),
            })
            .in_current_span(),
        );
        tasks.spawn(
            watch_credentials(security.clone(), overlay.clone(), config.reload_interval)
                .in_current_span(),
        );
        tasks.spawn(
            announce_paths(
                gossip.clone(),
                overlay.clone(),
                node_record,
                relay.map(|r| r.events),
                security.clone(),
                mesh.clone(),
            )
            .in_current_span(),
        );
        tasks.spawn(
            crate::control::agents::run(agents.clone(), config.agents.clone()).in_current_span(),
        );

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
            intent,
            edge,
            intercept,
            metrics: Metrics::new(delegation_metrics, security_metrics, listener_metrics),
            started: Instant::now(),
            bound: bound.clone(),
            ready: AtomicBool::new(false),
            drain,
        });
        // The admin API answers while the node drains (`/ready` says so).
        let server = listeners.server_undrained(format!("admin:{admin_addr}"), Protocols::Http1);
        tasks.spawn(admin::serve(admin_listener, shared.clone(), server).in_current_span());
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
            body_budget,
            limiter,
            tasks,
            audit,
        })
    }

    pub fn bound_overlay(&self) -> SocketAddr {
        self.shared.bound.overlay
    }

    pub fn bound(&self) -> Bound {
        self.shared.bound.clone()
    }

    /// The node's trust state (credentials, revocations, audit).
    pub fn security(&self) -> &Arc<Security> {
        &self.shared.security
    }

    /// The node's registry view (records, load, circuits).
    pub fn mesh(&self) -> &Arc<MeshView> {
        &self.shared.mesh
    }

    pub fn overlay(&self) -> &Overlay {
        &self.shared.overlay
    }

    pub fn gossip(&self) -> &Arc<Gossip> {
        &self.shared.gossip
    }

    pub fn config(&self) -> &NodeConfig {
        &self.shared.config
    }

    /// This node's own agents: onboarding and removal.
    pub fn agents(&self) -> &AgentsCtx {
        &self.shared.agents
    }

    /// The node's metrics (delegation, listener and security counters).
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// The node-wide budget for buffered request bodies.
    pub fn body_budget(&self) -> &Arc<BodyBudget> {
        &self.body_budget
    }

    /// The node's tenant limits: set a tenant's with
    /// [`crate::limits::Limiter::set`] when its policy changes.
    pub fn limiter(&self) -> &Arc<crate::limits::Limiter> {
        &self.limiter
    }

    /// The Prometheus text `/metrics` serves.
    pub async fn metrics_text(&self) -> String {
        crate::admin::report::metrics_text(&self.shared).await
    }

    /// The agent table `GET /v1/agents` serves.
    pub fn agent_statuses(&self) -> Vec<crate::admin::status::AgentStatus> {
        crate::admin::report::agent_statuses(&self.shared)
    }

    pub async fn status(&self) -> StatusReport {
        status_report(&self.shared).await
    }

    /// Serves until `shutdown` resolves, then drains: announce leaving,
    /// stop gossip, close the overlay (bounded).
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        self.run_with(shutdown, std::future::pending).await
    }

    /// As [`App::run`]; the future `again()` makes (a second signal,
    /// made only after the first) cuts the drain short.
    pub async fn run_with<F>(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
        again: impl FnOnce() -> F,
    ) where
        F: std::future::Future<Output = ()>,
    {
        tokio::select! {
            _ = shutdown => {}
            Some(res) = self.tasks.join_next() => {
                if let Err(e) = res {
                    warn!(error = %e, "a node task ended unexpectedly; shutting down");
                }
            }
        }
        self.stop_with(again()).await;
    }

    /// Leaves the mesh and stops everything, after the requests in flight
    /// (up to `[limits] shutdown_grace_ms`).
    pub async fn stop(self) {
        self.stop_with(std::future::pending()).await
    }

    /// Whether the node has begun to shut down (it takes no new requests).
    pub fn draining(&self) -> bool {
        self.shared.drain.is_draining()
    }

    /// Requests this node is working on (ingress and from peers).
    pub fn in_flight(&self) -> usize {
        self.shared.drain.in_flight()
    }

    /// As [`App::stop`]; `force` resolving ends the drain at once.
    ///
    /// The order is the graceful drain of a proxy: stop taking new work
    /// (not ready, listeners closed, new requests and delegations refused,
    /// departure gossiped so peers route elsewhere), wait for the work in
    /// flight up to the grace period, then close everything.
    pub async fn stop_with(mut self, force: impl std::future::Future<Output = ()>) {
        let name = self.shared.security.identity().name().to_string();
        self.shared.ready.store(false, Ordering::Release);
        let grace = self.shared.config.limits.shutdown_grace;
        let in_flight = self.shared.drain.start();
        info!(
            node = %name,
            in_flight,
            grace_ms = grace.as_millis() as u64,
            "shutting down: draining (no new requests; announcing departure)"
        );
        // Calls from the edge stop coming to this node's MQTT sessions
        // (they stay at the broker for the replies of a restart).
        for b in &self.shared.edge {
            b.leave(Duration::from_secs(1)).await;
        }
        // Interception undone first: the agents' connections go direct
        // again (nothing listens for them once the node is gone).
        self.shared.intercept.close().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.shared.gossip.leave()).await;
        let started = Instant::now();
        match self.shared.drain.wait(grace, force).await {
            crate::drain::Drained::Done => info!(
                node = %name,
                waited_ms = started.elapsed().as_millis() as u64,
                "drained: every request in flight finished"
            ),
            crate::drain::Drained::Cut(left) => warn!(
                node = %name,
                cut = left,
                grace_ms = grace.as_millis() as u64,
                "grace period over: cutting the requests still in flight ([limits] shutdown_grace_ms)"
            ),
            crate::drain::Drained::Forced(left) => warn!(
                node = %name,
                cut = left,
                "told again to stop: cutting the requests still in flight"
            ),
        }
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

/// Serves the streams peers open to this node, each in the task the
/// overlay accepted it in: delegations and control questions.
fn stream_handler(delegator: Arc<Delegator>) -> dmsc_transport::overlay::StreamHandler {
    let span = tracing::Span::current();
    Arc::new(move |mut s: BiStream| {
        let d = delegator.clone();
        Box::pin(
            async move {
                // The delegation's future is several KiB: boxed where it is
                // made, so the instrumented wrapper and the box around it
                // move only this block's few words.
                match s.channel {
                    Channel::Delegate => Box::pin(d.serve_stream(s)).await,
                    Channel::Control => serve_control(s, d).await,
                    Channel::Gossip | Channel::Relay => {
                        s.send.reset(dmsc_transport::overlay::RESET_BUSY);
                    }
                }
            }
            .instrument(span.clone()),
        )
    })
}

/// `DMSC_IMPAIR` (chaos tests on kernels without netem): loss and delay on
/// the overlay's outgoing UDP, e.g. `loss=0.05,delay_ms=50`.
fn impairment() -> Result<Option<dmsc_transport::Impair>, NodeError> {
    match std::env::var("DMSC_IMPAIR") {
        Ok(v) if !v.trim().is_empty() => {
            let imp = dmsc_transport::Impair::parse(&v).map_err(|e| {
                NodeError::Config(crate::config::ConfigError(vec![format!(
                    "DMSC_IMPAIR: {e}"
                )]))
            })?;
            warn!(loss = imp.loss, delay = ?imp.delay, "DMSC_IMPAIR: the overlay drops and delays its own UDP datagrams (test networks only)");
            Ok(Some(imp))
        }
        _ => Ok(None),
    }
}

/// The relay role, when `[relay] enabled`.
struct RelayRole {
    tcp: SocketAddr,
    events: tokio::sync::mpsc::Receiver<dmsc_transport::relay::RelayEvent>,
}

async fn start_relay(
    config: &NodeConfig,
    overlay: &Overlay,
    direct: SocketAddr,
) -> Result<Option<RelayRole>, NodeError> {
    let Some(settings) = &config.relay else {
        return Ok(None);
    };
    let listen = config.tcp_listen.unwrap_or(config.overlay_listen);
    let (_, events, bound) = overlay.start_relay(listen, settings.limits).await?;
    // Announce the TCP listener at the address peers dial for the overlay.
    let tcp = if bound.ip().is_unspecified() {
        SocketAddr::new(direct.ip(), bound.port())
    } else {
        bound
    };
    Ok(Some(RelayRole { tcp, events }))
}

/// Keeps the `node` record's `via` list (the relays this node has sessions
/// with) and, on a relay, the `relay/clients` list current in gossip, and
/// writes relay refusals to the audit log.
async fn announce_paths(
    gossip: Arc<Gossip>,
    overlay: Overlay,
    mut record: NodeAnnouncement,
    mut events: Option<tokio::sync::mpsc::Receiver<dmsc_transport::relay::RelayEvent>>,
    security: Arc<Security>,
    mesh: Arc<MeshView>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut clients = String::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            ev = async {
                match events.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                match ev {
                    Some(ev) => security.record(dmsc_audit::Event::global(dmsc_audit::Denied {
                        caller: if ev.peer.parse::<SocketAddr>().is_ok() {
                            format!("addr:{}", ev.peer)
                        } else {
                            format!("node:{}", ev.peer)
                        },
                        target: "relay".to_string(),
                        reason: ev.reason,
                        rule: Some("relay-claim".into()),
                    })),
                    None => events = None,
                }
                continue;
            }
        }
        let mut via: Vec<String> = overlay
            .paths()
            .sessions()
            .iter()
            .map(|s| s.relay.to_string())
            .collect();
        via.sort();
        via.dedup();
        if via != record.via {
            record.via = via;
            if let Ok(json) = serde_json::to_string(&record) {
                gossip.set(dmsc_gossip::KEY_NODE, &json).await;
            }
        }
        if let Some(relay) = overlay.relay() {
            let names = relay.client_names();
            mesh.set_own_relay_clients(names.clone());
            let now = names.join(",");
            if now != clients {
                clients = now;
                gossip
                    .set(crate::proto::gossip::KEY_RELAY_CLIENTS, &clients)
                    .await;
            }
        }
    }
}

/// The metadata endpoint of onboarding (`[intercept] metadata_socket`,
/// `metadata_listen`), undone when interception stops.
fn start_metadata(
    cfg: &crate::config::InterceptConfig,
    ic: &Arc<crate::intercept::Intercept>,
    security: Arc<crate::security::Security>,
    agents: crate::control::agents::AgentsCtx,
) -> Result<(), String> {
    use crate::intercept::onboard::{self, Metadata};
    if cfg.metadata_socket.is_none() && cfg.metadata_listen.is_none() {
        return Ok(());
    }
    let meta = Arc::new(Metadata {
        intercept: ic.clone(),
        security,
        agents,
        connections: Arc::new(tokio::sync::Semaphore::new(
            crate::intercept::onboard::MAX_CONNECTIONS,
        )),
    });
    if let Some(path) = &cfg.metadata_socket {
        let l = Metadata::bind_unix(path)?;
        let p = path.clone();
        ic.on_stop(move || {
            let _ = std::fs::remove_file(p);
        });
        info!(socket = %path.display(), "metadata endpoint (onboarding) listening");
        ic.spawn(meta.clone().serve_unix(l));
    }
    if let Some(at) = cfg.metadata_listen {
        if let Some(cidr) = onboard::ensure_local_address(at)? {
            info!(address = %cidr, "put the metadata address on lo");
            ic.on_stop(move || onboard::remove_local_address(&cidr));
        }
        let std_l = std::net::TcpListener::bind(at)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| format!("intercept.metadata_listen = {at}: {e}"))?;
        let l = tokio::net::TcpListener::from_std(std_l)
            .map_err(|e| format!("intercept.metadata_listen = {at}: {e}"))?;
        info!(listen = %at, "metadata endpoint (onboarding) listening");
        ic.spawn(meta.serve_tcp(l));
    }
    Ok(())
}

/// Starts interception (`[intercept]`): the listener and the kernel
/// programs. Interception that cannot start leaves the node running without
/// it, and says why (in the log and in `status`).
async fn start_intercept(
    cfg: &crate::config::InterceptConfig,
    node: &str,
    config: &NodeConfig,
    (security, agents, listeners): (
        Arc<crate::security::Security>,
        crate::control::agents::AgentsCtx,
        crate::ingress::listen::Listeners,
    ),
    ingress: impl Fn(&str, &str) -> Arc<Ingress> + Send + std::marker::Sync + 'static,
) -> crate::intercept::State {
    // This node's own agents: connections to their URL go to their name.
    let own: Vec<(std::net::SocketAddrV4, String)> = config
        .agents
        .iter()
        .filter_map(|a| {
            let name = a.name.as_ref()?;
            let uri: hyper::Uri = a.url.parse().ok()?;
            let ip: std::net::Ipv4Addr = uri.host()?.parse().ok()?;
            let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
                Some("https") => 443,
                _ => 80,
            });
            Some((
                std::net::SocketAddrV4::new(ip, port),
                format!("{name}.{}.dmsc", a.tenant),
            ))
        })
        .collect();
    match crate::intercept::Intercept::start(cfg, node, own, Box::new(ingress), listeners).await {
        Ok(ic) => {
            if let Some(at) = cfg.dns {
                match tokio::net::UdpSocket::bind(at).await {
                    Ok(sock) => {
                        let up = crate::intercept::dns::upstream(at);
                        info!(dns = %at, upstream = ?up, "answering .dmsc names");
                        ic.spawn(crate::intercept::dns::serve(sock, ic.vips.clone(), up));
                    }
                    Err(e) => warn!(dns = %at, error = %e, "the .dmsc DNS responder cannot listen"),
                }
            }
            if let Err(why) = start_metadata(cfg, &ic, security, agents) {
                warn!("interception off: {why}");
                ic.stop().await;
                return crate::intercept::State::Off(why);
            }
            crate::intercept::State::On(ic)
        }
        Err(why) => {
            warn!("interception off: {why}");
            crate::intercept::State::Off(why)
        }
    }
}
