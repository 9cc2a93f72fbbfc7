//! The agents this node is home to: onboarding, health, and what the mesh
//! learns about them through gossip.
//!
//! Onboarding needs no SDK: the node fetches the agent's A2A card
//! (`/.well-known/agent-card.json`, falling back to the 0.2-era
//! `/.well-known/agent.json`), validates it, and registers the agent under
//! `<tenant>/<name>`. Agents without a card are declared with their skills in
//! config and the node builds the card. A card that fails validation is
//! reported field by field and the agent stays *pending*, retried every
//! health interval: a bad or late agent never stops the node.
//!
//! Each registered agent is published as two small gossip keys: the record
//! (`agent/<tenant>/<name>`: card digest, skill ids and tags, protocols,
//! health, expiry) refreshed well within its TTL, and its load
//! (`load/<tenant>/<name>`), republished when it changes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU8};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dmsc_registry::{slug, AgentCard, AgentId, Health};
use http_body_util::BodyExt;
use hyper::{Method, Request, StatusCode, Uri};
use tracing::{info, warn};

use crate::config::{check_spec, RawAgent};
use crate::control::health::{self, GRPC_HEALTH_CHECK};
use crate::forward::client::{Client, Upstream};
use crate::forward::local::{
    lock, AgentStats, LocalAgent, LocalAgents, Protocol, ProtocolState, CARD_PATHS,
};
use crate::proto::agent::EDGE_PROTOCOL;
use crate::proto::http::empty;
use crate::route::MeshView;

const FETCH_TIMEOUT: Duration = Duration::from_secs(3);
const MAX_CARD: usize = 1 << 20;

/// Why an agent could not be onboarded.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid agent spec: {0}")]
    Spec(String),
    #[error("cannot fetch the agent card from {url}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("agent card from {url}: {error}")]
    Card {
        url: String,
        error: dmsc_registry::CardError,
    },
    #[error("agent `{0}` is already registered on this node (set a distinct `name`)")]
    Duplicate(AgentId),
}

/// Fetches a card: `agent-card.json`, then `agent.json` if that is 404;
/// over h2c for an agent pinned to an HTTP/2-only protocol, and over h2c
/// again when an unpinned agent took the connection but could not speak
/// HTTP/1.1 (an HTTP/2-only server answers the request line with a GOAWAY).
async fn fetch_card(
    base: &Uri,
    upstream: &Upstream,
    pinned: Option<Protocol>,
) -> Result<(AgentCard, String), AgentError> {
    let mut h2 = pinned.is_some_and(Protocol::http2_only);
    let mut last = String::new();
    for path in CARD_PATHS {
        let url = join(base, path);
        let fail = |reason: String| AgentError::Fetch {
            url: url.clone(),
            reason,
        };
        let uri: Uri = url.parse().map_err(|e| fail(format!("{e}")))?;
        let request = |uri: Uri| {
            Request::builder()
                .method(Method::GET)
                .uri(uri)
                .header("accept", "application/json")
                .body(empty())
                .map_err(|e| fail(e.to_string()))
        };
        let fetch = |client: &Client, uri: Uri| {
            let req = request(uri);
            let client = client.clone();
            async move {
                tokio::time::timeout(FETCH_TIMEOUT, client.request(req?))
                    .await
                    .map_err(|_| fail(format!("no answer within {FETCH_TIMEOUT:?}")))
            }
        };
        let client = |h2: bool| if h2 { &upstream.h2 } else { &upstream.h1 };
        let resp = match fetch(client(h2), uri.clone()).await? {
            Ok(r) => r,
            Err(e) if pinned.is_none() && !e.is_connect() && !h2 => {
                // Connected, but no HTTP/1.1 answer: try HTTP/2 (prior knowledge).
                h2 = true;
                fetch(client(h2), uri)
                    .await?
                    .map_err(|h2| fail(format!("HTTP/1.1: {e:#}; HTTP/2: {h2:#}")))?
            }
            Err(e) => return Err(fail(format!("{e:#}"))),
        };
        if resp.status() == StatusCode::NOT_FOUND {
            last = format!("{url}: 404");
            continue;
        }
        if !resp.status().is_success() {
            return Err(fail(format!("HTTP {}", resp.status())));
        }
        let body = http_body_util::Limited::new(resp.into_body(), MAX_CARD)
            .collect()
            .await
            .map_err(|e| fail(format!("reading the card: {e}")))?
            .to_bytes();
        let card = AgentCard::parse(&body).map_err(|error| AgentError::Card {
            url: url.clone(),
            error,
        })?;
        return Ok((card, url));
    }
    Err(AgentError::Fetch {
        url: join(base, CARD_PATHS[0]),
        reason: format!("no agent card (tried both well-known paths; {last})"),
    })
}

fn join(base: &Uri, path: &str) -> String {
    format!("{}{}", base.to_string().trim_end_matches('/'), path)
}

/// A card for an agent declared in config with its skills.
fn declared_card(spec: &RawAgent) -> Result<AgentCard, AgentError> {
    let skills: Vec<serde_json::Value> = spec
        .skills
        .iter()
        .flatten()
        .map(|s| {
            let mut o = serde_json::json!({
                "id": s.id,
                "name": s.name.clone().unwrap_or_else(|| s.id.clone()),
                "tags": s.tags,
            });
            if let Some(d) = &s.description {
                o["description"] = d.clone().into();
            }
            if !s.examples.is_empty() {
                o["examples"] = s.examples.clone().into();
            }
            o
        })
        .collect();
    let card = serde_json::json!({
        "name": spec.name.clone().unwrap_or_default(),
        "description": spec.description.clone().unwrap_or_default(),
        "version": "0",
        "url": spec.url,
        "capabilities": {},
        "defaultInputModes": ["text/plain"],
        "defaultOutputModes": ["text/plain"],
        "skills": skills,
    });
    AgentCard::parse(card.to_string().as_bytes()).map_err(|error| AgentError::Card {
        url: "(declared in config)".into(),
        error,
    })
}

/// A spec's problems, or its endpoint.
fn checked_base(spec: &RawAgent) -> Result<Uri, AgentError> {
    check_spec(spec).map_err(AgentError::Spec)?;
    spec.url
        .parse()
        .map_err(|e| AgentError::Spec(format!("url: {e}")))
}

/// Onboards one agent: card, name, registration in `agents` and `mesh`.
pub async fn onboard(
    spec: &RawAgent,
    upstream: &Upstream,
    agents: &LocalAgents,
    mesh: &MeshView,
) -> Result<Arc<LocalAgent>, AgentError> {
    let base = checked_base(spec)?;
    let (card, health_default) = if spec.skills.is_some() {
        (declared_card(spec)?, "/".to_string())
    } else {
        let (card, url) = fetch_card(&base, upstream, pinned(spec)).await?;
        let path = CARD_PATHS
            .iter()
            .find(|p| url.ends_with(*p))
            .copied()
            .unwrap_or(CARD_PATHS[0]);
        (card, path.to_string())
    };
    let name = spec.name.clone().unwrap_or_else(|| slug(&card.name));
    let id = AgentId {
        tenant: spec.tenant.clone(),
        name,
    };
    let agent = local_agent(
        id.clone(),
        spec.clone(),
        base,
        card,
        spec.health_path.clone().unwrap_or(health_default),
        pinned(spec),
        mesh,
    );
    agents
        .insert(agent.clone())
        .map_err(AgentError::Duplicate)?;
    agents.clear_pending(spec);
    info!(agent = %id, url = %spec.url, skills = agent.card.skills.len(), "agent onboarded");
    Ok(agent)
}

/// The card as the mesh serves it: every URL rewritten to the mesh name.
fn mesh_card(card: &AgentCard, id: &AgentId) -> AgentCard {
    let mut mesh_card = card.clone();
    mesh_card.rewrite_urls(&crate::forward::local::mesh_url(id));
    mesh_card
}

/// A new local agent, its mesh card registered in `mesh`; healthy until a
/// check (or, for an edge agent, its status) says otherwise.
fn local_agent(
    id: AgentId,
    spec: RawAgent,
    base: Uri,
    card: AgentCard,
    health_path: String,
    protocol: Option<Protocol>,
    mesh: &MeshView,
) -> Arc<LocalAgent> {
    let served = mesh_card(&card, &id);
    let digest = served.digest();
    let mesh_card_bytes = Bytes::from(served.to_bytes());
    mesh.add_card(served);
    Arc::new(LocalAgent {
        id,
        spec,
        base,
        card,
        mesh_card: mesh_card_bytes,
        digest,
        health: AtomicU8::new(1),
        in_flight: AtomicU32::new(0),
        stats: Mutex::new(AgentStats::default()),
        health_path,
        protocol: ProtocolState::new(protocol),
        published: Mutex::new(None),
    })
}

fn pinned(spec: &RawAgent) -> Option<Protocol> {
    spec.protocol.as_deref().and_then(Protocol::parse)
}

/// Health-checks one agent in the protocol it speaks (see [`health`]): an
/// HTTP answer below 500 or a serving gRPC server is alive (a declared
/// agent may have no route at `/`); refused, reset or silent is not.
async fn check_health(agent: &LocalAgent, upstream: &Upstream) -> Result<Protocol, health::Down> {
    let bad = |e: hyper::http::Error| health::Down::BadUri(e.to_string());
    let page = agent.uri_for(&agent.health_path).map_err(bad)?;
    let grpc = agent.uri_for(GRPC_HEALTH_CHECK).map_err(bad)?;
    health::check(upstream, &agent.id, &agent.protocol, &page, &grpc).await
}

/// Everything the agent loop needs.
#[derive(Clone)]
pub struct AgentsCtx {
    pub agents: Arc<LocalAgents>,
    pub mesh: Arc<MeshView>,
    pub upstream: Upstream,
    pub gossip: Arc<dmsc_gossip::Gossip>,
    pub cfg: crate::config::DelegationConfig,
}

impl AgentsCtx {
    /// Publishes an agent's record and load now.
    pub async fn publish(&self, agent: &LocalAgent) {
        let record = agent.record(self.cfg.agent_ttl);
        let load = agent.load();
        self.mesh.upsert_own(agent.id.clone(), record.clone(), load);
        self.gossip
            .set(
                &dmsc_registry::agent_key(&agent.id.tenant, &agent.id.name),
                &record.encode(),
            )
            .await;
        self.gossip
            .set(
                &dmsc_registry::load_key(&agent.id.tenant, &agent.id.name),
                &load.encode(),
            )
            .await;
        *lock(&agent.published) = Some((Instant::now(), record.health));
    }

    /// Onboards, health-checks and publishes; on failure the spec stays
    /// pending (retried). The check comes first so that the first record
    /// tells the truth and delivery knows the agent's protocol from the
    /// first call (an HTTP/2-only agent must not get an HTTP/1.1 request).
    pub async fn add(&self, spec: &RawAgent) -> Result<Arc<LocalAgent>, AgentError> {
        if spec.protocol.as_deref() == Some(EDGE_PROTOCOL) {
            // An edge agent declared in config: its card from its skills,
            // its health from its MQTT status (up until it says otherwise).
            check_spec(spec).map_err(AgentError::Spec)?;
            let Some(bridge) = self.upstream.edge.get() else {
                return Err(AgentError::Spec(
                    "protocol = \"mqtt\" needs an MQTT bridge ([mqtt])".into(),
                ));
            };
            let name = spec.name.clone().unwrap_or_default();
            // Its card's URL is its mesh name (it has no HTTP endpoint).
            let mut named = spec.clone();
            named.url = format!("http://{name}.{}.dmsc", spec.tenant);
            let card = declared_card(&named)?;
            let id = AgentId::new(&spec.tenant, &name);
            let endpoint = bridge.endpoint(&id);
            return self.add_edge(id, card, endpoint).await;
        }
        match onboard(spec, &self.upstream, &self.agents, &self.mesh).await {
            Ok(a) => {
                if let Err(e) = check_health(&a, &self.upstream).await {
                    warn!(agent = %a.id, url = %a.spec.url, reason = %e, "agent onboarded but failed its health check");
                    a.set_health(Health::Unhealthy);
                }
                self.publish(&a).await;
                Ok(a)
            }
            Err(e) => {
                if !matches!(e, AgentError::Spec(_) | AgentError::Duplicate(_)) {
                    self.agents.set_pending(spec.clone(), e.to_string());
                }
                Err(e)
            }
        }
    }

    /// Registers an agent from the card it handed to the node itself (the
    /// metadata endpoint of `intercept`): no fetch; health-checked and
    /// published like any other. `spec.url` is its endpoint.
    pub async fn add_card(
        &self,
        spec: &RawAgent,
        card: AgentCard,
    ) -> Result<Arc<LocalAgent>, AgentError> {
        let base = checked_base(spec)?;
        let name = spec.name.clone().unwrap_or_else(|| slug(&card.name));
        let id = AgentId {
            tenant: spec.tenant.clone(),
            name,
        };
        if self.agents.get(&id).is_some() {
            return Err(AgentError::Duplicate(id));
        }
        let agent = local_agent(
            id.clone(),
            spec.clone(),
            base,
            card,
            spec.health_path.clone().unwrap_or_else(|| "/".into()),
            pinned(spec),
            &self.mesh,
        );
        self.agents
            .insert(agent.clone())
            .map_err(AgentError::Duplicate)?;
        if let Err(e) = check_health(&agent, &self.upstream).await {
            warn!(agent = %agent.id, url = %agent.spec.url, reason = %e, "agent registered but failed its health check");
            agent.set_health(Health::Unhealthy);
        }
        self.publish(&agent).await;
        info!(agent = %id, url = %spec.url, "agent registered with its own card");
        Ok(agent)
    }

    /// Registers (or updates) an edge agent from the card it published over
    /// MQTT; its health comes from its status topic, not from checks.
    /// `endpoint`: where it is reached ([`EdgeLink::endpoint`]).
    pub async fn add_edge(
        &self,
        id: AgentId,
        card: AgentCard,
        endpoint: String,
    ) -> Result<Arc<LocalAgent>, AgentError> {
        let spec = RawAgent {
            tenant: id.tenant.clone(),
            url: endpoint,
            name: Some(id.name.clone()),
            protocol: Some(EDGE_PROTOCOL.to_string()),
            ..Default::default()
        };
        let old = self.agents.get(&id);
        if let Some(old) = &old {
            if !old.is_edge() {
                return Err(AgentError::Duplicate(id));
            }
            if old.digest == mesh_card(&card, &id).digest() {
                // The retained card again (a reconnect): nothing changed.
                return Ok(old.clone());
            }
        }
        let agent = local_agent(
            id.clone(),
            spec,
            Uri::from_static("http://edge.invalid/"),
            card,
            "/".into(),
            None,
            &self.mesh,
        );
        // An updated card keeps what its status last said.
        if let Some(old) = &old {
            agent.set_health(old.health());
        }
        self.agents.remove(&id);
        self.agents
            .insert(agent.clone())
            .map_err(AgentError::Duplicate)?;
        self.publish(&agent).await;
        Ok(agent)
    }

    /// Deregisters an agent: gone from this node, the registry and gossip.
    pub async fn remove(&self, id: &AgentId) -> bool {
        let Some(a) = self.agents.remove(id) else {
            return false;
        };
        self.mesh.remove_own(id);
        self.gossip
            .delete(&dmsc_registry::agent_key(&id.tenant, &id.name))
            .await;
        self.gossip
            .delete(&dmsc_registry::load_key(&id.tenant, &id.name))
            .await;
        info!(agent = %a.id, "agent deregistered");
        true
    }

    /// One health round: retry pending agents, check every agent, publish
    /// what changed and refresh records at a third of their TTL.
    pub async fn health_round(&self) {
        for (spec, _) in self.agents.pending() {
            if let Err(e) = self.add(&spec).await {
                tracing::debug!(url = %spec.url, error = %e, "agent still pending");
            }
        }
        let agents = self.agents.all();
        let checks = agents.iter().map(|a| async move {
            // An edge agent's health is its MQTT status, kept by the bridge.
            if a.is_edge() {
                None
            } else {
                Some(check_health(a, &self.upstream).await)
            }
        });
        let results = futures_util::future::join_all(checks).await;
        for (a, result) in agents.iter().zip(results) {
            let h = match result {
                // An edge agent: as its status last said.
                None => a.health(),
                Some(result) => {
                    let h = if result.is_ok() {
                        Health::Healthy
                    } else {
                        Health::Unhealthy
                    };
                    if a.set_health(h) {
                        match result {
                            Ok(_) => info!(agent = %a.id, "agent healthy again"),
                            Err(e) => {
                                warn!(agent = %a.id, url = %a.spec.url, reason = %e, "agent failed its health check")
                            }
                        }
                    }
                    h
                }
            };
            let due = lock(&a.published).is_none_or(|(at, published)| {
                published != h || at.elapsed() >= self.cfg.agent_ttl / 3
            });
            if due {
                self.publish(a).await;
            }
        }
    }

    /// Republishes load reports that changed at the precision they travel
    /// at (a latency change under its second significant digit is none).
    pub async fn load_round(&self, last: &mut HashMap<AgentId, String>) {
        let agents = self.agents.all();
        last.retain(|id, _| agents.iter().any(|a| &a.id == id));
        for a in agents {
            let load = a.load();
            let value = load.encode();
            if last.get(&a.id) != Some(&value) {
                self.mesh.set_load(&a.id, load);
                self.gossip
                    .set(&dmsc_registry::load_key(&a.id.tenant, &a.id.name), &value)
                    .await;
                last.insert(a.id.clone(), value);
            }
        }
    }
}

/// The agent loop: onboard the configured agents, then health and load rounds.
pub async fn run(ctx: AgentsCtx, configured: Vec<RawAgent>) {
    for spec in &configured {
        if let Err(e) = ctx.add(spec).await {
            warn!(tenant = %spec.tenant, url = %spec.url, error = %e, "agent not onboarded yet; will retry");
        }
    }
    let mut health = tokio::time::interval(ctx.cfg.health_interval);
    let mut load = tokio::time::interval(ctx.cfg.load_interval);
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    load.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = HashMap::new();
    loop {
        tokio::select! {
            _ = health.tick() => ctx.health_round().await,
            _ = load.tick() => ctx.load_round(&mut last).await,
        }
    }
}
