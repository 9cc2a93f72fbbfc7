//! The agents this node is home to, as the request path sees them: their
//! endpoint, card, health, the protocol they speak, and the counters the
//! node keeps for them (in flight, latency, error rate). The control layer
//! onboards and health-checks them (`control::agents`); forwarding only reads
//! this table, and delivers to them ([`deliver_local`]: for local callers and
//! for delegations arriving from peers alike).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dmsc_registry::{AgentCard, AgentId, AgentRecord, Health, LoadReport};
use hyper::Uri;

use hyper::header::{HeaderValue, CONTENT_TYPE, ETAG, HOST, IF_NONE_MATCH};
use hyper::{Method, Request, Response, StatusCode, Version};
use tracing::debug;

use super::body::{guarded, incoming};
use super::client::Upstream;
use super::extended::{self, CardAsk};
use super::fault::BodyWatch;
use crate::config::RawAgent;
pub use crate::proto::agent::{Protocol, ProtocolState};
use crate::proto::forwarded::{self, Vouched};
use crate::proto::http::{full, strip_hop_by_hop, Body, ErrorKind, MeshError};
use crate::proto::outcome::Failure;
use crate::route::now_ms;

/// The answer of an edge agent, as [`EdgeLink::deliver`] returns it.
pub type EdgeAnswer<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Response<Body>, Failure>> + Send + 'a>,
>;

/// How delivery reaches edge agents: the MQTT bridge (the `edge` module,
/// a later layer) implements it and the node sets it in [`Upstream`].
pub trait EdgeLink: Send + Sync + std::fmt::Debug {
    /// Delivers one delegation to an edge agent of this node.
    fn deliver<'a>(
        &'a self,
        agent: &'a LocalAgent,
        me: &'a str,
        call: EdgeCall<'a>,
    ) -> EdgeAnswer<'a>;
    /// Where an edge agent is reached (its spec's `url`), e.g.
    /// `mqtt://broker:1883/dmsc/acme/agents/meter/req`.
    fn endpoint(&self, id: &AgentId) -> String;
}

/// One delegation for an edge agent, as the request path hands it over.
pub struct EdgeCall<'a> {
    pub method: Method,
    pub path: &'a str,
    pub content_type: Option<String>,
    /// The caller's `Accept` (`text/event-stream`: it takes a stream).
    pub accept: Option<String>,
    pub body: Body,
    pub deadline: tokio::time::Instant,
    pub caller: &'a str,
    pub caller_tenant: &'a str,
}

/// Card paths, newest first.
pub const CARD_PATHS: [&str; 2] = ["/.well-known/agent-card.json", "/.well-known/agent.json"];

/// The address the mesh gives an agent, which every URL of its cards
/// (well-known and extended) is rewritten to: `http://<agent>.<tenant>.dmsc`.
pub fn mesh_url(id: &AgentId) -> String {
    format!("http://{}.{}.dmsc", id.name, id.tenant)
}

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

/// One version of an agent's card: replaced whole when the agent serves a
/// new one, so a reader never sees the card of one version with the digest
/// of another.
#[derive(Debug)]
pub struct CardVersion {
    /// The card as the agent serves it.
    pub card: AgentCard,
    /// The card as the mesh serves it (every URL rewritten to the mesh
    /// name), pre-encoded; its digest is the one gossiped and the ETag, so
    /// a card fetched through the mesh from anywhere has the same digest.
    pub mesh_card: Bytes,
    /// The same, parsed: where a request addressed to a routed name goes
    /// ([`routed_path`]).
    pub served: AgentCard,
    pub digest: String,
    /// Interfaces of the card the served card leaves out: on other ports
    /// than the registered URL's, where the mesh cannot reach them.
    pub left_out: Vec<String>,
}

/// Where an agent's card comes from, which decides whether the node
/// fetches it again (only a card the agent serves can change behind the
/// node's back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CardSource {
    /// Fetched from the agent's well-known path; re-fetched periodically.
    Fetched,
    /// Built from the skills declared in config.
    Declared,
    /// Handed to the node by the agent itself (the metadata endpoint).
    Handed,
    /// Published by an edge agent over MQTT (the bridge follows it).
    Edge,
}

/// What a conditional re-fetch of a card sends: where the card was found
/// and the validators the agent sent with it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CardValidators {
    /// The URL the card was fetched from.
    pub url: String,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

/// One agent this node is home to.
#[derive(Debug)]
pub struct LocalAgent {
    pub id: AgentId,
    pub spec: RawAgent,
    /// The agent's endpoint, requests go to `base` + path.
    pub base: Uri,
    /// The current card (see [`LocalAgent::card`]).
    pub(crate) card: RwLock<Arc<CardVersion>>,
    pub card_source: CardSource,
    /// For a fetched card: what the next fetch sends to get a 304.
    pub(crate) validators: Mutex<Option<CardValidators>>,
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
    /// An edge agent, reached over MQTT (through an [`EdgeLink`]).
    pub fn is_edge(&self) -> bool {
        self.spec.protocol.as_deref() == Some(crate::proto::agent::EDGE_PROTOCOL)
    }

    /// The agent's current card.
    pub fn card(&self) -> Arc<CardVersion> {
        self.card.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The digest of the agent's current card (as the mesh serves it).
    pub fn digest(&self) -> String {
        self.card().digest.clone()
    }

    /// Replaces the agent's card; the old one.
    pub(crate) fn set_card(&self, card: CardVersion) -> Arc<CardVersion> {
        let mut held = self.card.write().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *held, Arc::new(card))
    }

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
        let card = self.card();
        AgentRecord {
            digest: card.digest.clone(),
            skills: card.card.skill_tags(),
            protocols: card.card.protocols(),
            a2a: dmsc_registry::record::a2a_strings(&card.card),
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

    /// Drops the pending specs of tenant `id.tenant` named `id.name` (a
    /// spec without a name, named by its card, cannot be matched before
    /// its card is read); true if any was.
    pub(crate) fn remove_pending(&self, id: &AgentId) -> bool {
        let mut p = lock(&self.pending);
        let before = p.len();
        p.retain(|(s, _)| !(s.tenant == id.tenant && s.name.as_deref() == Some(id.name.as_str())));
        p.len() != before
    }
}

/// One request in progress at a local agent, counted until dropped.
struct InFlight(Arc<LocalAgent>);

impl InFlight {
    fn new(agent: Arc<LocalAgent>) -> InFlight {
        agent
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        InFlight(agent)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

pub(crate) fn is_card_path(path: &str) -> bool {
    let p = path.split('?').next().unwrap_or(path);
    CARD_PATHS.contains(&p)
}

/// One request as it goes to a local agent.
pub(crate) struct ToAgent<'a> {
    pub(crate) method: Method,
    pub(crate) path: &'a str,
    pub(crate) http2: bool,
    pub(crate) headers: hyper::HeaderMap,
    pub(crate) body: Body,
    pub(crate) deadline: tokio::time::Instant,
    /// The caller allowed less than the node's default timeout: a timeout
    /// is its own choice and not the agent's error (see
    /// [`crate::forward::Delegation::short_deadline`]).
    pub(crate) short_deadline: bool,
    /// Who the node vouches for (as authenticated at ingress, or as the
    /// calling node stated over the verified overlay).
    pub(crate) caller: &'a str,
    pub(crate) tenant: &'a str,
    pub(crate) trace_id: &'a str,
    /// Watches a streamed request body (blame for failures).
    pub(crate) watch: &'a BodyWatch,
}

/// Re-judges a failure as the caller's if the request body says so.
pub(crate) fn blame(failure: Failure, watch: &BodyWatch, me: &str) -> Failure {
    match watch.fault(failure.error().kind) {
        Some(fault) => {
            let mut e = fault.error(me);
            e.agent = failure.error().agent.clone();
            Failure::Caller(e)
        }
        None => failure,
    }
}

/// Delivers to an agent of this node; used for local callers and for
/// delegations arriving from peers alike. The agent's error rate counts
/// what the agent did, never what the caller did (see [`super::fault`]).
pub(crate) async fn deliver_local(
    agent: &Arc<LocalAgent>,
    upstream: &Upstream,
    me: &str,
    to: ToAgent<'_>,
) -> Result<Response<Body>, Failure> {
    let ToAgent {
        method,
        path,
        http2,
        mut headers,
        body,
        deadline,
        short_deadline,
        caller,
        tenant,
        trace_id,
        watch,
    } = to;
    // Sent to a router's endpoint (an intent, a capability): the ingress
    // said so, for this node only.
    let routed_to = headers.remove(crate::proto::forwarded::ROUTED);
    // What the caller did, or a timeout within its own short deadline, is
    // not the agent's error rate.
    let charged = |f: &Failure| {
        let callers = matches!(f, Failure::Caller(_));
        let own_deadline = short_deadline && f.error().kind == ErrorKind::Timeout;
        !(callers || own_deadline)
    };
    if (method == Method::GET || method == Method::HEAD) && is_card_path(path) {
        return Ok(serve_card(agent, &headers));
    }
    if agent.is_edge() {
        let Some(bridge) = upstream.edge.get() else {
            return Err(Failure::NotDelivered(
                MeshError::new(ErrorKind::Unreachable, me, "this node has no MQTT bridge")
                    .agent(&agent.id),
            ));
        };
        let in_flight = InFlight::new(agent.clone());
        let started = std::time::Instant::now();
        let header = |name| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let call = EdgeCall {
            content_type: header(CONTENT_TYPE),
            accept: header(hyper::header::ACCEPT),
            method,
            path,
            body,
            deadline,
            caller,
            caller_tenant: tenant,
        };
        drop(headers);
        let result = bridge.deliver(agent, me, call).await;
        // What the caller did is not the agent's error rate.
        match &result {
            Ok(r) => lock(&agent.stats).observe(started.elapsed(), !r.status().is_server_error()),
            Err(f) if charged(f) => lock(&agent.stats).observe(started.elapsed(), false),
            Err(_) => {}
        }
        // Counts until the answer is done: a streamed one ends with its
        // last message, not when its first arrives.
        return result.map(|r| r.map(|b| guarded(b, vec![Box::new(in_flight)])));
    }
    // A gRPC server resets every stream that is not gRPC: that would be a
    // failure charged to the agent (anyone's curl, or a monitoring probe,
    // could open its circuit for every gRPC caller). It is the caller's.
    // (Unless its card says it serves another binding on this port too, as
    // a tonic server beside an axum router may.)
    if agent.protocol.current() == Some(crate::proto::agent::Protocol::Grpc)
        && !crate::proto::http::is_grpc(&headers)
        && (agent.card_source == CardSource::Declared
            || agent
                .card()
                .served
                .protocols()
                .iter()
                .all(|p| p.eq_ignore_ascii_case("GRPC")))
    {
        return Err(Failure::Caller(
            MeshError::new(
                ErrorKind::BadRequest,
                me,
                format!(
                    "{} is a gRPC server: call it with a gRPC client (content-type \
                     application/grpc); this request is {method} {path}",
                    agent.id
                ),
            )
            .agent(&agent.id),
        ));
    }
    // The card over gRPC is protobuf, which the mesh does not rewrite: it
    // would hand the caller the agent's real addresses.
    if crate::proto::http::is_grpc(&headers) && crate::proto::a2a::is_grpc_card_call(path) {
        return Err(Failure::Caller(
            MeshError::new(
                ErrorKind::BadRequest,
                me,
                format!(
                    "the mesh does not pass an agent card over gRPC (it could not rewrite the \
                     agent's addresses in it); fetch it over JSON-RPC or REST at {}/",
                    mesh_url(&agent.id)
                ),
            )
            .agent(&agent.id),
        ));
    }
    // Sent to a router's endpoint (an intent, a capability): on to this
    // agent's endpoint for the request's binding.
    let routed = routed_to
        .as_ref()
        .and_then(|r| routed_path(&agent.card(), &method, path, r, &headers));
    let path = routed.as_deref().unwrap_or(path);
    // A request for the extended card: its answer is rewritten below.
    let (card_ask, body) = match extended::rest_ask(&method, path) {
        Some(ask) => (Some(ask), body),
        None if extended::may_be_jsonrpc(&method, &headers, &body) => {
            match tokio::time::timeout_at(deadline, extended::peek(body)).await {
                Ok(Ok((ask, body))) => (ask.then_some(CardAsk::JsonRpc), body),
                // Nothing reached the agent: the caller's upload failed or
                // stalled, which is charged to no agent.
                Ok(Err(e)) => {
                    return Err(Failure::Caller(
                        MeshError::new(
                            ErrorKind::BadRequest,
                            me,
                            format!("the request body failed before the agent answered: {e}"),
                        )
                        .agent(&agent.id),
                    ))
                }
                Err(_) => {
                    return Err(Failure::Caller(
                        MeshError::new(
                            ErrorKind::Timeout,
                            me,
                            "the deadline passed while reading the request body",
                        )
                        .agent(&agent.id),
                    ))
                }
            }
        }
        None => (None, body),
    };
    if card_ask.is_some() {
        // The answer is rewritten, so it must come uncompressed.
        headers.remove(hyper::header::ACCEPT_ENCODING);
    }
    let uri = agent.uri_for(path).map_err(|e| {
        Failure::Caller(
            MeshError::new(ErrorKind::BadRequest, me, format!("bad path `{path}`: {e}"))
                .agent(&agent.id),
        )
    })?;
    strip_hop_by_hop(&mut headers);
    headers.remove(HOST);
    if let Some(a) = agent.base.authority() {
        if let Ok(v) = HeaderValue::from_str(a.as_str()) {
            headers.insert(HOST, v);
        }
    }
    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
    forwarded::vouch(
        &mut headers,
        Vouched {
            caller,
            tenant,
            trace_id,
            remaining,
        },
    );
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    // An HTTP/2-only agent (learnt by its health checks, or pinned) is
    // called over HTTP/2 whatever the caller spoke; the headers an HTTP/1.1
    // request may carry that HTTP/2 forbids went with the hop-by-hop ones.
    let grpc = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let h2 = agent.protocol.use_http2(http2, grpc);
    // What failed, and whether nothing reached the agent.
    let call = async {
        if h2 {
            *req.version_mut() = Version::HTTP_2;
            match upstream.h2.request(req).await {
                Ok(resp) => Ok(resp.map(incoming)),
                Err(e) => Err((crate::proto::http::error_chain(&e), e.is_connect())),
            }
        } else {
            *req.version_mut() = Version::HTTP_11;
            upstream
                .delegations
                .request(req)
                .await
                .map_err(|e| (e.to_string(), e.is_connect()))
        }
    };
    // Counts until the response body is done (or this future is dropped
    // because the caller went away): the gossiped in-flight load.
    let in_flight = InFlight::new(agent.clone());
    let started = std::time::Instant::now();
    let result = tokio::time::timeout(remaining, call).await;
    let observe = |ok: bool| {
        agent
            .stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(started.elapsed(), ok)
    };
    let failure = match result {
        Err(_) => Failure::MaybeDelivered(
            MeshError::new(
                ErrorKind::Timeout,
                me,
                format!(
                    "agent `{}` did not answer in the {} ms left of the caller's deadline \
                     (`dmsc-timeout`, a gRPC call's own, else the node's default)",
                    agent.id,
                    remaining.as_millis()
                ),
            )
            .agent(&agent.id),
        ),
        Ok(Err((why, connect))) => {
            // The agent's address stays in the log: callers (of any node,
            // any tenant the policy lets in) learn only its mesh name.
            debug!(agent = %agent.id, url = %agent.spec.url, error = %why, "agent request failed");
            let detail = format!("agent `{}`: {why}", agent.id);
            let err = MeshError::new(ErrorKind::Unreachable, me, detail).agent(&agent.id);
            if connect {
                Failure::NotDelivered(err)
            } else {
                Failure::MaybeDelivered(err)
            }
        }
        Ok(Ok(resp)) => {
            if !watch.failed() {
                observe(!resp.status().is_server_error());
            }
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            hide_agent_address(agent, &mut parts.headers);
            // The HTTP version is the hop's: the caller hears the node's
            // (an HTTP/1.0 agent's answer reached an HTTP/1.1 caller with
            // an `HTTP/1.0` status line).
            parts.version = Version::HTTP_11;
            let body = guarded(body, vec![Box::new(in_flight)]);
            let resp = Response::from_parts(parts, body);
            return match card_ask {
                Some(ask) => extended::rewrite_answer(agent, me, ask, resp, deadline).await,
                None => Ok(resp),
            };
        }
    };
    match blame(failure, watch, me) {
        f @ Failure::Caller(_) => {
            debug!(agent = %agent.id, error = ?f, "the caller's side failed; the agent is not charged");
            Err(f)
        }
        f => {
            if charged(&f) {
                observe(false);
            }
            Err(f)
        }
    }
}

/// Points a redirect (`Location`, `Content-Location`) at the agent's own
/// URL to its mesh name instead, as the card's URLs are: a client that
/// followed the agent's real address would bypass the mesh (its policy,
/// audit and mutual TLS). The registered path is dropped as in the card.
fn hide_agent_address(agent: &LocalAgent, headers: &mut hyper::HeaderMap) {
    for name in [hyper::header::LOCATION, hyper::header::CONTENT_LOCATION] {
        let Some(value) = headers.get(&name).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        if let Some(new) = mesh_location(&agent.base, &mesh_url(&agent.id), value) {
            if let Ok(v) = HeaderValue::from_str(&new) {
                headers.insert(name, v);
            }
        }
    }
}

/// `location` at `base`'s origin (and under its path) as the same place
/// under `mesh` (`http://<agent>.<tenant>.dmsc`); `None` for any other URL
/// (relative ones included: they resolve against the mesh name already).
fn mesh_location(base: &Uri, mesh: &str, location: &str) -> Option<String> {
    let origin = format!("{}://{}", base.scheme_str()?, base.authority()?);
    let head = location.get(..origin.len())?;
    if !head.eq_ignore_ascii_case(&origin) {
        return None;
    }
    let rest = &location[origin.len()..];
    if !(rest.is_empty() || rest.starts_with(['/', '?', '#'])) {
        return None;
    }
    let prefix = base.path().trim_end_matches('/');
    let rest = match dmsc_registry::card::under_path(rest, prefix) {
        Some(after) if !prefix.is_empty() => after,
        _ => rest,
    };
    Some(format!("{}{rest}", mesh.trim_end_matches('/')))
}

/// The agent's card as the mesh serves it (URLs rewritten), with an ETag.
fn serve_card(agent: &LocalAgent, headers: &hyper::HeaderMap) -> Response<Body> {
    let card = agent.card();
    let etag = format!("\"{}\"", card.digest);
    let not_modified = headers
        .get(IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| etag_matches(v, &etag));
    let mut resp = if not_modified {
        let mut r = Response::new(crate::proto::http::empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        Response::new(full(card.mesh_card.clone()))
    };
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(ETAG, v);
    }
    resp
}

/// The path on this agent of a request sent to a router's endpoint: a
/// name the mesh resolves to one of several agents, `mesh.<tenant>.dmsc`
/// (intent) or `<tag>.cap.<tenant>.dmsc` (capability), as the ingress said
/// in `dmsc-routed` (`<binding> <version>`, [`ROUTED`]). The caller sent it
/// to the router's endpoint, whose JSON-RPC and HTTP+JSON interfaces are at
/// `/` (the router card, [`crate::intent::card`]), knowing nothing of the
/// agent picked: a JSON-RPC `POST /` goes to the agent's JSON-RPC
/// endpoint, an HTTP+JSON path (`/message:send`, `/tasks/<id>`, 0.3's
/// `/v1/...`) under its HTTP+JSON endpoint, each as its card names it (for
/// the request's A2A version, when the card names one per version).
/// `None`: the path stays (nothing to move).
///
/// [`ROUTED`]: crate::proto::forwarded::ROUTED
fn routed_path(
    card: &CardVersion,
    method: &Method,
    path: &str,
    routed: &HeaderValue,
    headers: &hyper::HeaderMap,
) -> Option<String> {
    let (said_binding, said_version) = routed.to_str().ok()?.split_once(' ')?;
    let (p, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    let rest_path = || {
        crate::proto::a2a::binding(false, p, None) == Some("HTTP+JSON")
            || crate::proto::a2a::EXTENDED_CARD_PATHS
                .iter()
                .any(|c| p.ends_with(c))
    };
    let binding = match said_binding {
        "JSONRPC" | "HTTP+JSON" => said_binding,
        // not known at the ingress (a body it did not hold whole)
        "-" if *method == Method::POST && p == "/" => "JSONRPC",
        "-" if rest_path() => "HTTP+JSON",
        _ => return None,
    };
    let dialect = dmsc_registry::Dialect::of_version(said_version)
        .or_else(|| crate::proto::a2a::request_dialect(headers, p, None));
    let endpoint = card.served.endpoint_path(binding, dialect)?;
    // The endpoint's own query (`?api-version=2`) stays, before the
    // request's.
    let (endpoint, endpoint_query) = match endpoint.split_once('?') {
        Some((e, q)) => (e, Some(q)),
        None => (endpoint.as_str(), None),
    };
    let prefix = endpoint.trim_end_matches('/');
    if prefix.is_empty() && endpoint_query.is_none() {
        return None;
    }
    let moved = if binding == "JSONRPC" {
        if p != "/" {
            return None;
        }
        endpoint.to_string()
    } else if p.starts_with(&format!("{prefix}/")) {
        return None;
    } else {
        format!("{prefix}{p}")
    };
    Some(match (endpoint_query, query) {
        (Some(e), Some(q)) => format!("{moved}?{e}&{q}"),
        (Some(q), None) | (None, Some(q)) => format!("{moved}?{q}"),
        (None, None) => moved,
    })
}

/// `If-None-Match` compares weakly (RFC 9110, 13.1.2): `W/"x"` matches
/// `"x"`, as caches and clients send it back.
fn etag_matches(if_none_match: &str, etag: &str) -> bool {
    let opaque = |t: &str| t.trim().trim_start_matches("W/").to_string();
    let ours = opaque(etag);
    if_none_match
        .split(',')
        .any(|t| t.trim() == "*" || opaque(t) == ours)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_routed_request_moves_to_the_endpoint_the_card_names() {
        let card = AgentCard::from_value(serde_json::json!({
            "name": "p", "description": "d", "version": "1",
            "supportedInterfaces": [
                {"url": "http://p.acme.dmsc/a2a?v=2", "protocolBinding": "JSONRPC", "protocolVersion": "1.0"},
                {"url": "http://p.acme.dmsc/old", "protocolBinding": "JSONRPC", "protocolVersion": "0.3"},
                {"url": "http://p.acme.dmsc/rest/", "protocolBinding": "HTTP+JSON"}
            ],
            "skills": []
        }))
        .expect("card");
        let cv = CardVersion {
            mesh_card: Bytes::new(),
            served: card.clone(),
            digest: String::new(),
            card,
            left_out: Vec::new(),
        };
        let none = hyper::HeaderMap::new();
        let moved = |m: Method, path: &str, said: &'static str| {
            routed_path(&cv, &m, path, &HeaderValue::from_static(said), &none)
        };
        assert_eq!(
            moved(Method::POST, "/", "JSONRPC 1.0").as_deref(),
            Some("/a2a?v=2")
        );
        assert_eq!(
            moved(Method::POST, "/", "JSONRPC 0.3").as_deref(),
            Some("/old")
        );
        // what the ingress could not tell, from the request itself
        assert_eq!(moved(Method::POST, "/", "- -").as_deref(), Some("/a2a?v=2"));
        assert_eq!(
            moved(Method::POST, "/message:send?x=1", "HTTP+JSON 1.0").as_deref(),
            Some("/rest/message:send?x=1")
        );
        assert_eq!(
            moved(Method::GET, "/tasks/t1", "- -").as_deref(),
            Some("/rest/tasks/t1")
        );
        // already there, or nothing to move
        assert_eq!(
            moved(Method::POST, "/rest/message:send", "HTTP+JSON 1.0"),
            None
        );
        assert_eq!(moved(Method::POST, "/other", "JSONRPC 1.0"), None);
        assert_eq!(moved(Method::GET, "/", "- -"), None);
    }

    #[test]
    fn redirects_to_the_agent_point_at_its_mesh_name() {
        let base: Uri = "http://127.0.0.1:29201/agents/pfx".parse().expect("uri");
        let mesh = "http://pfx.acme.dmsc";
        let at = |l: &str| mesh_location(&base, mesh, l);
        assert_eq!(
            at("http://127.0.0.1:29201/agents/pfx/message:send/").as_deref(),
            Some("http://pfx.acme.dmsc/message:send/")
        );
        assert_eq!(
            at("HTTP://127.0.0.1:29201/other?x=1").as_deref(),
            Some("http://pfx.acme.dmsc/other?x=1")
        );
        assert_eq!(
            at("http://127.0.0.1:29201").as_deref(),
            Some("http://pfx.acme.dmsc")
        );
        // Another port, another host, a longer port number, relative: left alone.
        assert_eq!(at("http://127.0.0.1:29202/x"), None);
        assert_eq!(at("http://127.0.0.1:292011/x"), None);
        assert_eq!(at("https://login.example/"), None);
        assert_eq!(at("/relative"), None);
    }
}
