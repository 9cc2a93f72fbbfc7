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
//! A fetched card is fetched again ([`CardRefresh`] decides when: every
//! `card_refresh_interval`, staggered, and at once after the agent recovers),
//! conditionally, so an unchanged card costs a 304; a card with a new digest
//! replaces the old one in what is served, gossiped and indexed
//! ([`AgentsCtx::apply_card`]). A failed re-fetch keeps the last good card.
//!
//! Each registered agent is published as two small gossip keys: the record
//! (`agent/<tenant>/<name>`: card digest, skill ids and tags, protocols,
//! health, expiry) refreshed well within its TTL, and its load
//! (`load/<tenant>/<name>`), republished when it changes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU8};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dmsc_registry::{slug, AgentCard, AgentId, Health};
use http_body_util::BodyExt;
use hyper::header::{HeaderValue, ETAG, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED};
use hyper::{Method, Request, StatusCode, Uri};
use tokio::task::JoinSet;
use tracing::{debug, info, warn, Instrument};

use crate::config::{check_spec, RawAgent};
use crate::control::health::{self, GRPC_HEALTH_CHECK};
use crate::forward::client::{Client, Upstream};
use crate::forward::local::{
    lock, AgentStats, CardSource, CardValidators, CardVersion, LocalAgent, LocalAgents, Protocol,
    ProtocolState, CARD_PATHS,
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
    #[error("cannot fetch the agent card from {url}: {reason} (an agent without a card, such as a gRPC server: declare its `name` and `skills`, and `protocol = \"grpc\"` for gRPC, and the node builds its card)")]
    Fetch { url: String, reason: String },
    #[error("agent card from {url}: {error}")]
    Card {
        url: String,
        error: dmsc_registry::CardError,
    },
    #[error("agent `{0}` is already registered on this node (set a distinct `name`)")]
    Duplicate(AgentId),
    /// Names are unique per tenant across the mesh: one home per agent.
    #[error("agent `{id}` is already served by node `{node}`: an agent name is unique in its tenant across the mesh (set a distinct `name`, or remove it there first)")]
    Elsewhere { id: AgentId, node: String },
}

/// What a card fetch brought: the card and what to send next time to get
/// a 304 for it, or `None` when the agent answered 304 to `known`.
pub type Fetched = Option<(AgentCard, CardValidators)>;

/// Fetches a card: `agent-card.json`, then `agent.json` if that is 404;
/// over h2c for an agent pinned to an HTTP/2-only protocol, and over h2c
/// again when an unpinned agent took the connection but could not speak
/// HTTP/1.1 (an HTTP/2-only server answers the request line with a GOAWAY).
/// With `known` (a re-fetch), the request to the URL the card came from is
/// conditional (`If-None-Match`, `If-Modified-Since`).
async fn fetch_card(
    base: &Uri,
    upstream: &Upstream,
    pinned: Option<Protocol>,
    known: Option<&CardValidators>,
) -> Result<Fetched, AgentError> {
    let mut h2 = pinned.is_some_and(Protocol::http2_only);
    let mut last = String::new();
    for path in CARD_PATHS {
        let url = join(base, path);
        let fail = |reason: String| AgentError::Fetch {
            url: url.clone(),
            reason,
        };
        let uri: Uri = url.parse().map_err(|e| fail(format!("{e}")))?;
        let conditional = known.filter(|k| k.url == url);
        let request = |uri: Uri| {
            let mut req = Request::builder()
                .method(Method::GET)
                .uri(uri)
                .header("accept", "application/json");
            if let Some(k) = conditional {
                if let Some(etag) = &k.etag {
                    req = req.header(IF_NONE_MATCH, etag.as_str());
                }
                if let Some(at) = &k.last_modified {
                    req = req.header(IF_MODIFIED_SINCE, at.as_str());
                }
            }
            req.body(empty()).map_err(|e| fail(e.to_string()))
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
        if resp.status() == StatusCode::NOT_MODIFIED && conditional.is_some() {
            return Ok(None);
        }
        if resp.status() == StatusCode::NOT_FOUND {
            last = format!("{url}: 404");
            continue;
        }
        if !resp.status().is_success() {
            return Err(fail(format!("HTTP {}", resp.status())));
        }
        let header = |name| {
            resp.headers()
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
                .map(str::to_string)
        };
        let validators = CardValidators {
            url: url.clone(),
            etag: header(ETAG),
            last_modified: header(LAST_MODIFIED),
        };
        // The card's size limit holds however long the agent takes to
        // send it: the whole read is under the fetch timeout.
        let body = tokio::time::timeout(
            FETCH_TIMEOUT,
            http_body_util::Limited::new(resp.into_body(), MAX_CARD).collect(),
        )
        .await
        .map_err(|_| fail(format!("card not read within {FETCH_TIMEOUT:?}")))?
        .map_err(|e| fail(format!("reading the card: {e}")))?
        .to_bytes();
        let card = AgentCard::parse(&body).map_err(|error| AgentError::Card {
            url: url.clone(),
            error,
        })?;
        return Ok(Some((card, validators)));
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
    let (card, health_default, source, validators) = if spec.skills.is_some() {
        (
            declared_card(spec)?,
            "/".to_string(),
            CardSource::Declared,
            None,
        )
    } else {
        let Some((card, validators)) = fetch_card(&base, upstream, pinned(spec), None).await?
        else {
            // Only a conditional request is answered 304, and this is none.
            return Err(AgentError::Fetch {
                url: join(&base, CARD_PATHS[0]),
                reason: "304 Not Modified to an unconditional request".into(),
            });
        };
        let path = CARD_PATHS
            .iter()
            .find(|p| validators.url.ends_with(*p))
            .copied()
            .unwrap_or(CARD_PATHS[0]);
        (
            card,
            path.to_string(),
            CardSource::Fetched,
            Some(validators),
        )
    };
    let name = spec.name.clone().unwrap_or_else(|| slug(&card.name));
    let id = AgentId {
        tenant: spec.tenant.clone(),
        name,
    };
    // Another live node's agent of that name: registering it here would
    // give the name two homes, and callers the wrong one.
    if let Some(node) = mesh
        .read()
        .get(&id)
        .map(|e| e.node.to_string())
        .filter(|n| *n != mesh.me)
    {
        return Err(AgentError::Elsewhere { id, node });
    }
    let agent = local_agent(
        id.clone(),
        spec.clone(),
        base,
        card,
        spec.health_path.clone().unwrap_or(health_default),
        pinned(spec),
        source,
        mesh,
    );
    *lock(&agent.validators) = validators;
    agents
        .insert(agent.clone())
        .map_err(AgentError::Duplicate)?;
    agents.clear_pending(spec);
    info!(agent = %id, url = %spec.url, skills = agent.card().card.skills.len(), "agent onboarded");
    Ok(agent)
}

/// The card as the mesh serves it: fitted to the agent's registered URL
/// (`base`; none for an edge agent) and every URL rewritten to the mesh
/// name; and the interfaces left out because the mesh cannot reach them.
pub(crate) fn mesh_card(
    card: &AgentCard,
    id: &AgentId,
    base: Option<&Uri>,
) -> (AgentCard, Vec<String>) {
    let mut mesh_card = card.clone();
    let left_out = base.map_or_else(Vec::new, |b| mesh_card.fit_to(&b.to_string()));
    mesh_card.rewrite_urls(&crate::forward::local::mesh_url(id));
    (mesh_card, left_out)
}

/// One version of an agent's card, and the served card to cache in the
/// mesh view.
fn card_version(card: AgentCard, id: &AgentId, base: Option<&Uri>) -> (CardVersion, AgentCard) {
    let (served, left_out) = mesh_card(&card, id, base);
    let version = CardVersion {
        digest: served.digest(),
        mesh_card: Bytes::from(served.to_bytes()),
        served: served.clone(),
        card,
        left_out,
    };
    (version, served)
}

/// Says which interfaces the served card leaves out (at onboarding and when
/// the card changes).
fn warn_left_out(id: &AgentId, version: &CardVersion) {
    if !version.left_out.is_empty() {
        warn!(
            agent = %id,
            left_out = %version.left_out.join(", "),
            "the mesh reaches this agent at its registered URL only, so the card it serves \
             leaves out interfaces on other ports; register such a port as an agent of its own \
             to reach it through the mesh"
        );
    }
}

/// A new local agent, its mesh card registered in `mesh`; healthy until a
/// check (or, for an edge agent, its status) says otherwise.
#[allow(clippy::too_many_arguments)]
fn local_agent(
    id: AgentId,
    spec: RawAgent,
    base: Uri,
    card: AgentCard,
    health_path: String,
    protocol: Option<Protocol>,
    card_source: CardSource,
    mesh: &MeshView,
) -> Arc<LocalAgent> {
    let edge = spec.protocol.as_deref() == Some(EDGE_PROTOCOL);
    let (version, served) = card_version(card, &id, (!edge).then_some(&base));
    warn_left_out(&id, &version);
    mesh.add_card(served);
    Arc::new(LocalAgent {
        id,
        spec,
        base,
        card: RwLock::new(Arc::new(version)),
        card_source,
        validators: Mutex::new(None),
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
                if !matches!(
                    e,
                    AgentError::Spec(_) | AgentError::Duplicate(_) | AgentError::Elsewhere { .. }
                ) {
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
            CardSource::Handed,
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
            if old.digest() == mesh_card(&card, &id, None).0.digest() {
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
            CardSource::Edge,
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
        // Not onboarded yet: it only stops being retried.
        let was_pending = self.agents.remove_pending(id);
        let Some(a) = self.agents.remove(id) else {
            if was_pending {
                info!(agent = %id, "pending agent removed");
            }
            return was_pending;
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
    /// what changed and refresh records at a third of their TTL. Returns
    /// the agents that came back healthy after failing a check (a restart
    /// is often a redeploy: their cards are fetched again at once).
    pub async fn health_round(&self) -> Vec<AgentId> {
        let mut recovered = Vec::new();
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
                            Ok(_) => {
                                info!(agent = %a.id, "agent healthy again");
                                recovered.push(a.id.clone());
                            }
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
        recovered
    }

    /// Fetches an agent's card again and, if it changed, replaces it
    /// everywhere (see [`AgentsCtx::apply_card`]). The agent loop does the
    /// two halves apart, so that no fetch holds up a round.
    pub async fn refresh_card(&self, agent: &Arc<LocalAgent>) -> Result<Refreshed, AgentError> {
        let fetched = refetch_card(agent.clone(), self.upstream.clone()).await?;
        Ok(self.apply_card(agent, fetched).await)
    }

    /// Takes in what a re-fetch brought: a card with another digest
    /// replaces the stored one (the card served at the well-known paths,
    /// the record gossiped with its skills and digest, and with it the
    /// intent index and embeddings, which follow the digest); the same
    /// card again only updates the validators.
    pub async fn apply_card(&self, agent: &Arc<LocalAgent>, fetched: Fetched) -> Refreshed {
        let Some((card, validators)) = fetched else {
            return Refreshed::Unchanged;
        };
        // Removed (or replaced) while its card was on the way.
        if !self
            .agents
            .get(&agent.id)
            .is_some_and(|a| Arc::ptr_eq(&a, agent))
        {
            return Refreshed::Gone;
        }
        *lock(&agent.validators) = Some(validators);
        let base = (!agent.is_edge()).then_some(&agent.base);
        let (version, served) = card_version(card, &agent.id, base);
        let old = agent.card();
        if version.digest == old.digest {
            return Refreshed::Unchanged;
        }
        let to = version.digest.clone();
        let skills = |c: &AgentCard| {
            c.skills
                .iter()
                .map(|s| s.id.as_str())
                .collect::<Vec<_>>()
                .join(",")
        };
        info!(
            agent = %agent.id,
            before = %skills(&old.card),
            after = %skills(&version.card),
            "agent card changed; the mesh serves and routes by the new one"
        );
        warn_left_out(&agent.id, &version);
        // Cached before the record names it, so the record finds it.
        self.mesh.add_card(served);
        agent.set_card(version);
        self.publish(agent).await;
        self.mesh.forget_card(&old.digest);
        Refreshed::Changed {
            from: old.digest.clone(),
            to,
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

/// What a card re-fetch changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refreshed {
    /// A 304, or the same card (digest) again.
    Unchanged,
    /// A new card replaced the old one (digests as the mesh serves them).
    Changed { from: String, to: String },
    /// The agent was removed or replaced while its card was fetched.
    Gone,
}

/// Fetches an agent's card again, conditionally (the validators of the
/// last fetch), in the protocol its health checks found.
async fn refetch_card(agent: Arc<LocalAgent>, upstream: Upstream) -> Result<Fetched, AgentError> {
    let known = lock(&agent.validators).clone();
    fetch_card(
        &agent.base,
        &upstream,
        agent.protocol.current(),
        known.as_ref(),
    )
    .await
}

/// Card fetches in flight at once, over all agents of a node.
const MAX_REFRESHES: usize = 8;

/// When each agent's card is fetched again. Pure (time is passed in), so
/// the stagger, the one-fetch-per-agent rule and the log-once rule are
/// tested without sleeping.
#[derive(Debug)]
pub struct CardRefresh {
    every: Duration,
    agents: HashMap<AgentId, RefreshState>,
}

#[derive(Debug)]
struct RefreshState {
    next: Instant,
    in_flight: bool,
    /// Asked for again while a fetch was in flight (it may predate a redeploy).
    again: bool,
    failing: bool,
}

/// A change in whether an agent's card can be fetched: logged once, not
/// every round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchTurn {
    /// The first failure after a success (or after onboarding).
    Failing,
    /// The first success after failures.
    Recovered,
}

impl CardRefresh {
    pub fn new(every: Duration) -> CardRefresh {
        CardRefresh {
            every,
            agents: HashMap::new(),
        }
    }

    /// The first re-fetch of an agent just seen (its card was fetched when
    /// it onboarded): within `(every/2, every]`, spread by its id, so that
    /// agents onboarded together do not fetch together ever after.
    fn first(&self, id: &AgentId, now: Instant) -> Instant {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        id.hash(&mut h);
        let share = (h.finish() % 1024) as f64 / 1024.0;
        now + self.every / 2 + self.every.mul_f64(share / 2.0)
    }

    /// The agents (of `agents`, those with a fetched card) whose card is
    /// due at `now` and not being fetched, at most as many as keep
    /// [`MAX_REFRESHES`] in flight; they are marked in flight. Agents no
    /// longer listed are forgotten.
    pub fn due<'a>(
        &mut self,
        now: Instant,
        agents: impl IntoIterator<Item = &'a AgentId>,
    ) -> Vec<AgentId> {
        let listed: std::collections::HashSet<&AgentId> = agents.into_iter().collect();
        self.agents.retain(|id, _| listed.contains(id));
        for id in listed {
            if !self.agents.contains_key(id) {
                let next = self.first(id, now);
                self.agents.insert(
                    id.clone(),
                    RefreshState {
                        next,
                        in_flight: false,
                        again: false,
                        failing: false,
                    },
                );
            }
        }
        let busy = self.agents.values().filter(|s| s.in_flight).count();
        let mut due: Vec<(&AgentId, Instant)> = self
            .agents
            .iter()
            .filter(|(_, s)| !s.in_flight && s.next <= now)
            .map(|(id, s)| (id, s.next))
            .collect();
        // The longest overdue first; the id breaks ties deterministically.
        due.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(b.0)));
        let due: Vec<AgentId> = due
            .into_iter()
            .take(MAX_REFRESHES.saturating_sub(busy))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &due {
            if let Some(s) = self.agents.get_mut(id) {
                s.in_flight = true;
            }
        }
        due
    }

    /// Fetch `id`'s card at the next chance (it came back healthy); after
    /// the fetch in flight, if there is one.
    pub fn now(&mut self, id: &AgentId, now: Instant) {
        match self.agents.get_mut(id) {
            Some(s) if s.in_flight => s.again = true,
            Some(s) => s.next = now,
            None => {
                self.agents.insert(
                    id.clone(),
                    RefreshState {
                        next: now,
                        in_flight: false,
                        again: false,
                        failing: false,
                    },
                );
            }
        }
    }

    /// A fetch of `id`'s card ended at `now`: the next one is an interval
    /// later (or at once if asked for meanwhile). Returns whether this
    /// turned the agent's fetches failing or working again.
    pub fn done(&mut self, id: &AgentId, now: Instant, ok: bool) -> Option<FetchTurn> {
        let every = self.every;
        let s = self.agents.get_mut(id)?;
        s.in_flight = false;
        s.next = if std::mem::take(&mut s.again) {
            now
        } else {
            now + every
        };
        let turn = match (s.failing, ok) {
            (false, false) => Some(FetchTurn::Failing),
            (true, true) => Some(FetchTurn::Recovered),
            _ => None,
        };
        s.failing = !ok;
        turn
    }
}

/// One card re-fetch: the agent and what came of it.
type Refetch = (Arc<LocalAgent>, Result<Fetched, AgentError>);

impl AgentsCtx {
    /// Starts the card fetches that are due. Only cards fetched from the
    /// agent are fetched again: a declared card is the config's, a handed
    /// one the agent's own to hand again, an edge card follows MQTT.
    fn start_refreshes(&self, refresh: &mut CardRefresh, fetches: &mut JoinSet<Refetch>) {
        let fetched: Vec<Arc<LocalAgent>> = self
            .agents
            .all()
            .into_iter()
            .filter(|a| a.card_source == CardSource::Fetched)
            .collect();
        let due = refresh.due(Instant::now(), fetched.iter().map(|a| &a.id));
        for id in due {
            let Some(agent) = fetched.iter().find(|a| a.id == id).cloned() else {
                continue;
            };
            let upstream = self.upstream.clone();
            fetches.spawn(
                async move {
                    let r = refetch_card(agent.clone(), upstream).await;
                    (agent, r)
                }
                .in_current_span(),
            );
        }
    }

    /// Takes in one finished re-fetch; a failure keeps the last good card
    /// and is logged at warn once per failing streak.
    async fn finish_refresh(&self, refresh: &mut CardRefresh, (agent, result): Refetch) {
        let turn = refresh.done(&agent.id, Instant::now(), result.is_ok());
        match result {
            Ok(fetched) => {
                if turn == Some(FetchTurn::Recovered) {
                    info!(agent = %agent.id, "agent card can be fetched again");
                }
                let r = self.apply_card(&agent, fetched).await;
                debug!(agent = %agent.id, result = ?r, "agent card fetched again");
            }
            Err(e) if turn == Some(FetchTurn::Failing) => {
                warn!(agent = %agent.id, url = %agent.spec.url, error = %e, "cannot fetch the agent card again; the mesh keeps serving and routing by the last good one");
            }
            Err(e) => debug!(agent = %agent.id, error = %e, "agent card still cannot be fetched"),
        }
    }
}

/// How often the loop looks for due card fetches: often enough for the
/// interval, never busier than every 10 ms.
fn refresh_tick(every: Duration) -> Duration {
    (every / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// The agent loop: onboard the configured agents, then health, load and
/// card-refresh rounds. The card fetches run beside the rounds (a slow
/// agent holds up nobody), owned by this loop: dropping it ends them.
pub async fn run(ctx: AgentsCtx, configured: Vec<RawAgent>) {
    for spec in &configured {
        if let Err(e) = ctx.add(spec).await {
            warn!(tenant = %spec.tenant, url = %spec.url, error = %e, "agent not onboarded yet; will retry");
        }
    }
    let mut health = tokio::time::interval(ctx.cfg.health_interval);
    let mut load = tokio::time::interval(ctx.cfg.load_interval);
    let mut cards = tokio::time::interval(refresh_tick(ctx.cfg.card_refresh_interval));
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    load.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    cards.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = HashMap::new();
    let mut refresh = CardRefresh::new(ctx.cfg.card_refresh_interval);
    let mut fetches: JoinSet<Refetch> = JoinSet::new();
    loop {
        tokio::select! {
            _ = health.tick() => {
                let now = Instant::now();
                for id in ctx.health_round().await {
                    refresh.now(&id, now);
                }
                ctx.start_refreshes(&mut refresh, &mut fetches);
            }
            _ = load.tick() => ctx.load_round(&mut last).await,
            _ = cards.tick() => ctx.start_refreshes(&mut refresh, &mut fetches),
            Some(done) = fetches.join_next(), if !fetches.is_empty() => match done {
                Ok(done) => ctx.finish_refresh(&mut refresh, done).await,
                // A fetch does not panic; if one did, its agent would stay
                // "in flight" for good: say so loudly.
                Err(e) => warn!(error = %e, "a card fetch task failed"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: &str) -> AgentId {
        AgentId::new("acme", n)
    }

    #[test]
    fn first_refetch_is_staggered_within_the_second_half_of_the_interval() {
        let every = Duration::from_secs(60);
        let r = CardRefresh::new(every);
        let t0 = Instant::now();
        let firsts: Vec<Instant> = (0..50)
            .map(|i| r.first(&id(&format!("a{i}")), t0))
            .collect();
        assert!(firsts
            .iter()
            .all(|t| *t >= t0 + every / 2 && *t <= t0 + every));
        let distinct: std::collections::HashSet<_> = firsts.iter().collect();
        assert!(distinct.len() > 40, "spread, not all at once");
        // Deterministic: the same agent gets the same slot.
        assert_eq!(r.first(&id("a1"), t0), firsts[1]);
    }

    #[test]
    fn one_fetch_per_agent_then_an_interval_later() {
        let every = Duration::from_secs(60);
        let mut r = CardRefresh::new(every);
        let t0 = Instant::now();
        let a = id("a");
        assert!(r.due(t0, [&a]).is_empty(), "just onboarded");
        let t1 = t0 + every;
        assert_eq!(r.due(t1, [&a]), vec![a.clone()]);
        assert!(r.due(t1 + every * 5, [&a]).is_empty(), "one in flight");
        let t2 = t1 + Duration::from_secs(2);
        assert_eq!(r.done(&a, t2, true), None);
        assert!(r
            .due(t2 + every - Duration::from_millis(1), [&a])
            .is_empty());
        assert_eq!(r.due(t2 + every, [&a]), vec![a.clone()]);
    }

    #[test]
    fn recovery_fetches_at_once_or_right_after_the_fetch_in_flight() {
        let every = Duration::from_secs(60);
        let mut r = CardRefresh::new(every);
        let t0 = Instant::now();
        let a = id("a");
        assert!(r.due(t0, [&a]).is_empty());
        r.now(&a, t0);
        assert_eq!(r.due(t0, [&a]), vec![a.clone()]);
        // Came back again while that fetch was out: once more after it.
        r.now(&a, t0);
        assert!(r.due(t0, [&a]).is_empty());
        r.done(&a, t0 + Duration::from_secs(1), true);
        assert_eq!(r.due(t0 + Duration::from_secs(1), [&a]), vec![a.clone()]);
        // An agent the scheduler has not seen yet.
        let b = id("b");
        r.now(&b, t0);
        assert_eq!(r.due(t0, [&a, &b]), vec![b.clone()]);
    }

    #[test]
    fn failures_are_reported_once_per_streak() {
        let mut r = CardRefresh::new(Duration::from_secs(1));
        let t0 = Instant::now();
        let a = id("a");
        r.now(&a, t0);
        r.due(t0, [&a]);
        assert_eq!(r.done(&a, t0, false), Some(FetchTurn::Failing));
        for i in 1..5 {
            let t = t0 + Duration::from_secs(i);
            assert_eq!(r.due(t, [&a]), vec![a.clone()]);
            assert_eq!(r.done(&a, t, false), None, "not every round");
        }
        let t = t0 + Duration::from_secs(5);
        r.due(t, [&a]);
        assert_eq!(r.done(&a, t, true), Some(FetchTurn::Recovered));
        let t = t0 + Duration::from_secs(6);
        r.due(t, [&a]);
        assert_eq!(r.done(&a, t, true), None);
    }

    #[test]
    fn in_flight_fetches_are_bounded_and_gone_agents_forgotten() {
        let mut r = CardRefresh::new(Duration::from_secs(1));
        let t0 = Instant::now();
        let ids: Vec<AgentId> = (0..20).map(|i| id(&format!("a{i:02}"))).collect();
        for i in &ids {
            r.now(i, t0);
        }
        let first = r.due(t0, &ids);
        assert_eq!(first.len(), MAX_REFRESHES);
        assert!(r.due(t0, &ids).is_empty(), "all slots taken");
        r.done(&first[0], t0, true);
        assert_eq!(r.due(t0, &ids).len(), 1);
        // Removed agents leave the schedule (and free their slots).
        let kept = &ids[..2];
        r.due(t0, kept);
        assert_eq!(r.agents.len(), 2);
        assert_eq!(r.done(&ids[10], t0, false), None, "unknown: ignored");
    }
}
