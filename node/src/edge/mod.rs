//! Edge agents over MQTT v5: the bridge between a broker and the mesh.
//!
//! Edge devices and constrained agents speak MQTT to a broker; the rest of
//! the mesh speaks HTTP. A node with `[mqtt]` keeps one MQTT v5 session
//! with the broker (rumqttc; persistent session, QoS 1, reconnect with
//! backoff) and bridges the tenants it names, on the topics of
//! [`topics`]:
//!
//! - **registration**: an agent publishes its A2A card, retained, on
//!   `dmsc/<t>/agents/<name>/card`; the node validates it and makes the
//!   agent one of its own (gossiped, routable by name, capability and
//!   intent from any node, load reported). `offline` on its status topic
//!   (its last will) marks it unhealthy; an empty retained card removes it.
//! - **HTTP -> MQTT**: a delegation for an edge agent reaches this node
//!   like any other ([`crate::forward::local::deliver_local`]) and is
//!   published on the agent's `req` topic with a response topic, a
//!   correlation id, the deadline as message expiry and the caller in
//!   user properties; the answer on the node's `replies` topic becomes the
//!   HTTP response.
//! - **MQTT -> HTTP**: a message on `dmsc/<t>/call/<host>` is a request
//!   from tenant `<t>` into the mesh: it goes through an in-process
//!   ingress of that tenant (the same policy, limits, routing and audit
//!   as an HTTP caller) and the answer is published on its response topic.
//!
//! Answers may be streamed (`dmsc-stream: more` … `end`, server-sent events
//! on the HTTP side); `mqtts://` brokers are verified against `[mqtt] ca`.
//!
//! **Active/standby.** Several nodes may bridge one tenant on one broker
//! (for availability). Each announces `edge/<tenant>` = the broker in
//! gossip while connected; the live one with the lowest name is the
//! tenant's *active* bridge and registers the agents whose cards it holds,
//! the others hold the same retained cards and stand by. A standby takes
//! over when the active one is gone from gossip or has lost the broker,
//! and registers an agent only once no other live node has it (break
//! before make: one home node at a time). Agents declared in `[[agents]]`
//! stay with the node that declares them. Calls from the edge reach one
//! bridge anyway (a shared subscription).
//!
//! **Sessions.** A tenant with credentials of its own
//! (`[mqtt.credentials.<tenant>]`) gets an MQTT session of its own, so the
//! broker's ACLs confine the node per tenant; the other tenants share one.
//! With `embedded = true` the node runs a broker per tenant in process
//! ([`embedded`]) and keeps one session with each.

pub mod embedded;
pub mod topics;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dmsc_registry::{AgentCard, AgentId, Health};
use http_body_util::BodyExt as _;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish, PublishProperties, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use tokio::sync::mpsc;
use tracing::{debug, info, warn, Instrument as _};

use crate::config::MqttConfig;
use crate::control::agents::AgentsCtx;
use crate::forward::body::AbortOnDrop;
use crate::forward::local::{lock, EdgeAnswer, EdgeCall, EdgeLink, LocalAgent};
use crate::ingress::Ingress;
use crate::proto::http::{full, Body, ErrorKind, MeshError};
use crate::proto::outcome::Failure;
use topics::Topic;

/// `protocol` of an edge agent's spec.
pub use crate::proto::agent::EDGE_PROTOCOL as PROTOCOL;

/// User property: the HTTP status of an answer (default 200).
pub const STATUS_PROPERTY: &str = "dmsc-status";
/// User properties of a delegation: who calls, from which tenant.
pub const CALLER_PROPERTY: &str = "dmsc-caller";
pub const CALLER_TENANT_PROPERTY: &str = "dmsc-caller-tenant";
/// User properties of a delegation: the HTTP method and path called.
pub const METHOD_PROPERTY: &str = "dmsc-method";
pub const PATH_PROPERTY: &str = "dmsc-path";
/// User property of an error answer: the mesh error kind.
pub const ERROR_PROPERTY: &str = "dmsc-error";
/// User property of a streamed answer: `more` on every message but the
/// last, `end` on the last.
pub const STREAM_PROPERTY: &str = "dmsc-stream";
/// User property of a delegation: the caller's `Accept` (an SSE caller
/// accepts `text/event-stream`: the agent may then stream).
pub const ACCEPT_PROPERTY: &str = "dmsc-accept";
/// Calls remembered for duplicate suppression (QoS 1 redelivers).
const SEEN_CALLS: usize = 4096;

/// How long a starting bridge listens to gossip before it may become a
/// tenant's active bridge (a few gossip rounds).
const SETTLE: Duration = Duration::from_secs(3);

/// Longest pause between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What the bridge counts (shown in `status` and logs).
#[derive(Debug, Default)]
pub struct EdgeStats {
    pub connects: AtomicU64,
    pub delegations: AtomicU64,
    pub calls: AtomicU64,
    /// Messages refused: bad topic use, bad payload, too large, no response topic.
    pub refused: AtomicU64,
    /// Answers that came after their delegation gave up, or twice.
    pub late_replies: AtomicU64,
    /// Calls the broker delivered again (DUP) after the bridge took them.
    pub duplicates: AtomicU64,
}

/// One answer message from an edge agent.
#[derive(Debug)]
struct Reply {
    /// The agent's `dmsc-status`; `Err`: why the answer cannot be used
    /// (over the message limit, a status that is not a number).
    status: Result<u16, String>,
    content_type: Option<String>,
    payload: Bytes,
    /// `None`: a whole answer; `Some(false)`: part of a stream, more to
    /// come; `Some(true)`: the stream's last message.
    stream: Option<bool>,
}

/// An edge agent known from its retained card: registered while this node
/// is its tenant's active bridge.
#[derive(Debug, Clone)]
struct Held {
    card: AgentCard,
    /// What its status topic said last (`None`: nothing yet).
    status: Option<Health>,
}

/// The bridge's handle: delivery to edge agents.
pub struct Bridge {
    client: AsyncClient,
    client_id: String,
    cfg: MqttConfig,
    node: String,
    connected: AtomicBool,
    /// The broker's maximum packet size (from its CONNACK).
    broker_max: std::sync::atomic::AtomicU32,
    /// Delegations waiting for their answer, by correlation id.
    pending: Mutex<HashMap<Bytes, mpsc::UnboundedSender<Reply>>>,
    /// Recent calls from the edge (response topic + correlation): a QoS 1
    /// duplicate is not run twice.
    seen: Mutex<std::collections::VecDeque<(String, Bytes)>>,
    /// Why the last attempt to reach the broker failed (until it connects).
    last_error: Mutex<Option<String>>,
    /// Calls from the edge in progress, bounded per tenant (`max_calls`).
    calls: HashMap<String, Arc<tokio::sync::Semaphore>>,
    /// Edge agents by their retained cards, registered or standing by.
    held: Mutex<HashMap<AgentId, Held>>,
    /// Tenants this node is the active bridge of.
    active: Mutex<std::collections::BTreeSet<String>>,
    /// Signalled on every UNSUBACK (see [`Bridge::leave`]).
    unsubscribed: tokio::sync::Notify,
    /// Not active before this: gossip has had time to say which peers
    /// already bridge these tenants (else a node joining a mesh with an
    /// active bridge registers its edge agents too, for a moment).
    settled_at: tokio::time::Instant,
    pub stats: EdgeStats,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge")
            .field("broker", &format!("{}:{}", self.cfg.host, self.cfg.port))
            .field("tenants", &self.cfg.tenants)
            .finish()
    }
}

/// What the event loop needs besides the bridge.
#[derive(Clone)]
pub struct EdgeParts {
    pub agents: AgentsCtx,
    /// One in-process ingress per bridged tenant (MQTT -> HTTP calls).
    pub ingress: HashMap<String, Arc<Ingress>>,
}

impl Bridge {
    /// The bridge and its event loop (run it as a task of the node); `Err`
    /// names a TLS file that cannot be used.
    pub fn new(cfg: MqttConfig, node: &str) -> Result<(Arc<Bridge>, EventLoop), String> {
        let client_id = cfg
            .client_id
            .clone()
            .unwrap_or_else(|| format!("dmsc-{node}"));
        let mut opts = MqttOptions::new(client_id.clone(), cfg.host.clone(), cfg.port);
        opts.set_keep_alive(cfg.keep_alive);
        // Small request/response messages: Nagle's algorithm against the
        // broker's delayed ACKs would add ~40 ms to each.
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        opts.set_network_options(net);
        // A persistent session: QoS 1 messages for this node queue at the
        // broker while it reconnects.
        opts.set_clean_start(false);
        opts.set_session_expiry_interval(Some(3600));
        // The most the broker may send us (MQTT v5 Maximum Packet Size;
        // it drops bigger messages unseen): twice `max_message`, so that a
        // call somewhat over the limit reaches us and gets its `too-large`
        // answer instead of silence.
        let packet = (cfg.max_message as u64 * 2 + 4096).min(u64::from(u32::MAX)) as u32;
        opts.set_max_packet_size(Some(packet));
        if let Some((u, p)) = &cfg.credentials {
            opts.set_credentials(u.clone(), p.clone());
        }
        if let Some(tls) = &cfg.tls {
            opts.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(Arc::new(tls_config(tls)?)),
            ));
        }
        let (client, eventloop) = AsyncClient::new(opts, 256);
        let calls = cfg
            .tenants
            .iter()
            .map(|t| {
                let s = Arc::new(tokio::sync::Semaphore::new(cfg.max_calls));
                (t.clone(), s)
            })
            .collect();
        let bridge = Arc::new(Bridge {
            client_id,
            calls,
            held: Mutex::new(HashMap::new()),
            active: Mutex::new(Default::default()),
            unsubscribed: tokio::sync::Notify::new(),
            settled_at: tokio::time::Instant::now() + SETTLE,
            client,
            cfg,
            node: node.to_string(),
            connected: AtomicBool::new(false),
            broker_max: std::sync::atomic::AtomicU32::new(u32::MAX),
            pending: Mutex::new(HashMap::new()),
            seen: Mutex::new(std::collections::VecDeque::new()),
            last_error: Mutex::new(None),
            stats: EdgeStats::default(),
        });
        Ok((bridge, eventloop))
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Why the bridge cannot reach its broker, while it cannot.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }

    pub fn broker(&self) -> String {
        let scheme = if self.cfg.tls.is_some() {
            "mqtts"
        } else {
            "mqtt"
        };
        format!("{scheme}://{}:{}", self.cfg.host, self.cfg.port)
    }

    /// Where an edge agent is reached: the broker and its request topic.
    fn endpoint(&self, tenant: &str, name: &str) -> String {
        format!("{}/{}", self.broker(), topics::request(tenant, name))
    }

    pub fn tenants(&self) -> &[String] {
        &self.cfg.tenants
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The tenants this node is the active bridge of (the others it stands
    /// by for).
    pub fn active_tenants(&self) -> Vec<String> {
        lock(&self.active).iter().cloned().collect()
    }

    /// Live peers that bridge `tenant` on this broker now, by gossip.
    async fn peer_bridges(&self, parts: &EdgeParts) -> HashMap<String, Vec<String>> {
        let broker = self.broker();
        // Only the `edge/` keys of each node (a range of its key map), not a
        // walk over every key of a mesh with many agents, twice a second.
        let scans = parts
            .agents
            .gossip
            .scan_since(crate::proto::gossip::KEY_EDGE_PREFIX, &HashMap::new())
            .await;
        let mut out: HashMap<String, Vec<String>> = HashMap::new();
        for n in scans {
            if !matches!(
                n.state,
                dmsc_gossip::MemberState::Alive | dmsc_gossip::MemberState::Suspect
            ) {
                continue;
            }
            for (k, v) in n.values.iter().flatten() {
                let tenant = k.strip_prefix(crate::proto::gossip::KEY_EDGE_PREFIX);
                if *v == broker && tenant.is_some_and(|t| self.bridged(t)) {
                    out.entry(tenant.unwrap_or_default().to_string())
                        .or_default()
                        .push(n.name.clone());
                }
            }
        }
        out
    }

    /// Brings the registrations of card agents in line with this node's
    /// role per tenant: the active bridge registers what it holds (once no
    /// other live node has the agent), a standby deregisters. Alone and
    /// cut off from the broker, a node keeps its agents (marked unhealthy
    /// by [`Bridge::run`]) rather than have none.
    async fn reconcile(&self, parts: &EdgeParts) {
        if tokio::time::Instant::now() < self.settled_at {
            // Too early to know the peers: hold what arrives, decide later.
            return;
        }
        let peers = self.peer_bridges(parts).await;
        let connected = self.connected();
        for t in &self.cfg.tenants {
            let others = peers.get(t).map(Vec::as_slice).unwrap_or_default();
            let active = connected && others.iter().all(|n| **n > *self.node);
            let keep = active || (!connected && others.is_empty());
            let changed = if active {
                lock(&self.active).insert(t.clone())
            } else {
                lock(&self.active).remove(t)
            };
            if changed {
                if active {
                    info!(tenant = %t, broker = %self.broker(), "MQTT bridge active for the tenant");
                } else {
                    info!(tenant = %t, broker = %self.broker(), standing_by_for = ?others, connected, "MQTT bridge standing by for the tenant");
                }
            }
            let held: Vec<(AgentId, Held)> = lock(&self.held)
                .iter()
                .filter(|(id, _)| id.tenant == *t)
                .map(|(id, h)| (id.clone(), h.clone()))
                .collect();
            for (id, h) in held {
                let mine = parts.agents.agents.get(&id).is_some_and(|a| a.is_edge());
                if !keep {
                    if mine {
                        parts.agents.remove(&id).await;
                        info!(agent = %id, "edge agent handed over (this bridge stands by)");
                    }
                } else if active && !mine {
                    if self.elsewhere(&id, parts) {
                        // Its last home still has it: wait for it to let go.
                        continue;
                    }
                    self.register(&id, h, parts).await;
                }
            }
        }
    }

    /// Whether another node has `id` in this node's registry (its last
    /// home has not let go of it yet).
    fn elsewhere(&self, id: &AgentId, parts: &EdgeParts) -> bool {
        parts
            .agents
            .mesh
            .read()
            .get(id)
            .is_some_and(|e| *e.node != *self.node)
    }

    /// Makes a held edge agent one of this node's.
    async fn register(&self, id: &AgentId, h: Held, parts: &EdgeParts) {
        let endpoint = self.endpoint(&id.tenant, &id.name);
        match parts.agents.add_edge(id.clone(), h.card, endpoint).await {
            Ok(a) => {
                if let Some(s) = h.status {
                    if a.set_health(s) {
                        parts.agents.publish(&a).await;
                    }
                }
                info!(agent = %id, broker = %self.broker(), "edge agent registered over MQTT");
            }
            Err(e) => self.refuse(&topics::card(&id.tenant, &id.name), &e.to_string()),
        }
    }

    /// Leaves the shared subscription of calls from the edge, waiting up
    /// to `within` for the broker to confirm. Called when the node stops:
    /// the session stays at the broker (persistent, for the replies a
    /// restart would still want), and without this its share of the calls
    /// would queue there instead of going to the bridges still running.
    pub async fn leave(&self, within: Duration) {
        if !self.cfg.shared_calls || !self.connected() {
            return;
        }
        let wait = async {
            for t in &self.cfg.tenants {
                let filter = topics::subscriptions(t, &self.node, true)[2].clone();
                if self.client.unsubscribe(filter).await.is_err() {
                    return;
                }
                self.unsubscribed.notified().await;
            }
        };
        if tokio::time::timeout(within, wait).await.is_err() {
            warn!(broker = %self.broker(), "the MQTT broker did not confirm leaving the shared call subscription in time");
        }
    }

    /// Announces (connected) or withdraws this node's bridges in gossip.
    async fn announce(&self, parts: &EdgeParts, connected: bool) {
        for t in &self.cfg.tenants {
            let key = crate::proto::gossip::edge_key(t);
            if connected {
                parts.agents.gossip.set(&key, &self.broker()).await;
            } else {
                parts.agents.gossip.delete(&key).await;
            }
        }
    }

    /// Delivers one delegation to an edge agent: publishes it on the
    /// agent's request topic and waits for the answer until `deadline`.
    pub(crate) async fn deliver(
        self: Arc<Self>,
        agent: &LocalAgent,
        me: &str,
        call: EdgeCall<'_>,
    ) -> Result<Response<Body>, Failure> {
        let EdgeCall {
            method,
            path,
            content_type,
            accept,
            body,
            deadline,
            caller,
            caller_tenant,
        } = call;
        let fail = |kind: ErrorKind, why: String| MeshError::new(kind, me, why).agent(&agent.id);
        if agent.health() == Health::Unhealthy {
            // Its last will said offline (the mesh may not know yet).
            return Err(Failure::NotDelivered(fail(
                ErrorKind::Unreachable,
                format!("edge agent `{}` is offline (its MQTT status)", agent.id),
            )));
        }
        if !self.connected() {
            return Err(Failure::NotDelivered(fail(
                ErrorKind::Unreachable,
                format!("the MQTT broker {} is not connected", self.broker()),
            )));
        }
        let payload = match read_limited(body, self.cfg.max_message).await {
            Ok(b) => b,
            Err(ReadError::TooLong) => {
                return Err(Failure::Caller(fail(
                    ErrorKind::TooLarge,
                    format!(
                        "the request body is over the MQTT message limit ({} bytes)",
                        self.cfg.max_message
                    ),
                )))
            }
            Err(ReadError::Broken(e)) => {
                // The caller's side (or the overlay stream) failed: not the agent.
                return Err(Failure::Caller(fail(
                    ErrorKind::BadRequest,
                    format!("the request body failed before it was whole: {e}"),
                )));
            }
        };
        if !self.fits(payload.len()) {
            return Err(Failure::Caller(fail(
                ErrorKind::TooLarge,
                format!(
                    "{} bytes: over the MQTT broker's packet limit ({} bytes)",
                    payload.len(),
                    self.broker_max.load(Ordering::Relaxed)
                ),
            )));
        }
        let correlation = Bytes::from(format!("{:032x}", rand::random::<u128>()));
        let (tx, mut rx) = mpsc::unbounded_channel();
        lock(&self.pending).insert(correlation.clone(), tx);
        let forget = Forget(self.clone(), correlation.clone());
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let props = PublishProperties {
            message_expiry_interval: Some(remaining.as_secs().max(1) as u32),
            response_topic: Some(topics::replies(&agent.id.tenant, &self.node)),
            correlation_data: Some(correlation),
            content_type,
            user_properties: [
                (CALLER_PROPERTY, Some(caller)),
                (CALLER_TENANT_PROPERTY, Some(caller_tenant)),
                (METHOD_PROPERTY, Some(method.as_str())),
                (PATH_PROPERTY, Some(path)),
                (ACCEPT_PROPERTY, accept.as_deref()),
            ]
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_string(), v?.to_string())))
            .collect(),
            ..Default::default()
        };
        self.stats.delegations.fetch_add(1, Ordering::Relaxed);
        let topic = topics::request(&agent.id.tenant, &agent.id.name);
        let sent = tokio::time::timeout(
            remaining,
            self.client
                .publish_with_properties(topic, QoS::AtLeastOnce, false, payload, props),
        )
        .await;
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(Failure::NotDelivered(fail(
                    ErrorKind::Unreachable,
                    format!("could not publish to the MQTT broker: {e}"),
                )))
            }
            Err(_) => {
                return Err(Failure::NotDelivered(fail(
                    ErrorKind::Timeout,
                    "the MQTT client's queue stayed full until the deadline".into(),
                )))
            }
        }
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let reply = match tokio::time::timeout(remaining, rx.recv()).await {
            Ok(Some(r)) => r,
            Ok(None) => {
                return Err(Failure::MaybeDelivered(fail(
                    ErrorKind::Unreachable,
                    "the MQTT bridge stopped before the agent answered".into(),
                )))
            }
            Err(_) => {
                return Err(Failure::MaybeDelivered(fail(
                    ErrorKind::Timeout,
                    format!(
                        "edge agent `{}` did not answer over MQTT within the deadline",
                        agent.id
                    ),
                )))
            }
        };
        let status = match &reply.status {
            Ok(s) => (200..=599)
                .contains(s)
                .then(|| StatusCode::from_u16(*s).ok())
                .flatten()
                .ok_or_else(|| format!("with dmsc-status {s} (200-599 expected)")),
            Err(why) => Err(why.clone()),
        };
        let status = match status {
            Ok(s) => s,
            Err(why) => {
                return Err(Failure::MaybeDelivered(fail(
                    ErrorKind::Unreachable,
                    format!("edge agent `{}` answered {why}", agent.id),
                )))
            }
        };
        let mut resp = match reply.stream {
            None => {
                let mut r = Response::new(full(reply.payload));
                if let Some(v) = reply
                    .content_type
                    .as_deref()
                    .and_then(|c| HeaderValue::from_str(c).ok())
                {
                    r.headers_mut().insert(CONTENT_TYPE, v);
                }
                r
            }
            _ => {
                // A stream: server-sent events, one per message (an agent
                // that sends `text/event-stream` itself is passed through),
                // each within the delegation's timeout of the last.
                let sse = reply.content_type.as_deref() == Some("text/event-stream");
                let idle = remaining.max(Duration::from_secs(1));
                let first = Some(reply);
                let frames = futures_util::stream::unfold(
                    (first, rx, forget, false),
                    move |(first, mut rx, forget, done)| async move {
                        if done {
                            return None;
                        }
                        let r = match first {
                            Some(r) => r,
                            None => match tokio::time::timeout(idle, rx.recv()).await {
                                Ok(Some(r)) => r,
                                _ => {
                                    let e: crate::proto::http::BoxError =
                                        "the edge agent's stream stopped before its end".into();
                                    return Some((Err(e), (None, rx, forget, true)));
                                }
                            },
                        };
                        if let Err(why) = r.status {
                            let e: crate::proto::http::BoxError =
                                format!("the edge agent's stream failed: it answered {why}").into();
                            return Some((Err(e), (None, rx, forget, true)));
                        }
                        let end = r.stream != Some(false);
                        let data = if sse || r.payload.is_empty() {
                            r.payload
                        } else {
                            sse_event(&r.payload)
                        };
                        Some((Ok(hyper::body::Frame::data(data)), (None, rx, forget, end)))
                    },
                );
                let mut r = Response::new(http_body_util::StreamBody::new(frames).boxed());
                r.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
                r
            }
        };
        *resp.status_mut() = status;
        Ok(resp)
    }

    /// Runs the MQTT session until the node stops: reconnects with
    /// backoff, (re)subscribes on every connect, dispatches messages.
    pub async fn run(self: Arc<Self>, mut eventloop: EventLoop, parts: EdgeParts) {
        let parts = Arc::new(parts);
        let mut backoff = Duration::from_millis(100);
        // Edge agents marked unhealthy because the broker went away.
        let mut cut_off: Vec<AgentId> = Vec::new();
        // Who registers the edge agents: checked twice a second (gossip
        // says when a peer bridging the same tenant comes or goes).
        let (this, p) = (self.clone(), parts.clone());
        let roles = tokio::spawn(
            async move {
                loop {
                    this.reconcile(&p).await;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            .in_current_span(),
        );
        let _roles = AbortOnDrop(roles);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    backoff = Duration::from_millis(100);
                    // Reachable again; a retained `offline` status, delivered
                    // again with the subscriptions below, still wins.
                    for id in cut_off.drain(..) {
                        if let Some(a) = parts.agents.agents.get(&id).filter(|a| a.is_edge()) {
                            if a.set_health(Health::Healthy) {
                                parts.agents.publish(&a).await;
                            }
                        }
                    }
                    // The broker's packet limit: a bigger publish would
                    // fail to encode and cost the whole connection.
                    let limit = ack
                        .properties
                        .and_then(|p| p.max_packet_size)
                        .unwrap_or(u32::MAX);
                    self.broker_max.store(limit, Ordering::Relaxed);
                    self.connected.store(true, Ordering::Relaxed);
                    lock(&self.last_error).take();
                    self.announce(&parts, true).await;
                    self.stats.connects.fetch_add(1, Ordering::Relaxed);
                    info!(broker = %self.broker(), tenants = ?self.cfg.tenants, "MQTT bridge connected");
                    let filters: Vec<Filter> = self
                        .cfg
                        .tenants
                        .iter()
                        .flat_map(|t| topics::subscriptions(t, &self.node, self.cfg.shared_calls))
                        .map(|f| Filter::new(f, QoS::AtLeastOnce))
                        .collect();
                    // From a task: this loop is what drains the client's
                    // queue, so it must never wait on it.
                    let client = self.client.clone();
                    tokio::spawn(async move {
                        if let Err(e) = client.subscribe_many(filters).await {
                            warn!(error = %e, "MQTT subscribe failed");
                        }
                    });
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    for code in &ack.return_codes {
                        if !matches!(code, SubscribeReasonCode::Success(_)) {
                            warn!(?code, "the MQTT broker refused a subscription of the bridge (shared subscriptions unsupported, or its ACL)");
                        }
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => self.dispatch(p, &parts).await,
                Ok(Event::Incoming(Packet::UnsubAck(_))) => self.unsubscribed.notify_one(),
                Ok(_) => {}
                Err(e) => {
                    let why = e.to_string();
                    if self.connected.swap(false, Ordering::Relaxed) {
                        warn!(broker = %self.broker(), error = %e, "MQTT bridge disconnected; reconnecting");
                        // A standby that still has the broker takes over.
                        self.announce(&parts, false).await;
                        // Its edge agents cannot be reached through this node
                        // now: say so in gossip, so that no node routes to them.
                        for a in parts.agents.agents.all() {
                            if a.is_edge() && a.set_health(Health::Unhealthy) {
                                parts.agents.publish(&a).await;
                                cut_off.push(a.id.clone());
                            }
                        }
                    } else {
                        // Never connected (or not since the last loss): a
                        // wrong password or address must not stay silent;
                        // a repeat of the same error is.
                        let changed = lock(&self.last_error).as_deref() != Some(why.as_str());
                        if changed {
                            warn!(broker = %self.broker(), error = %why, "MQTT bridge cannot connect; retrying");
                        } else {
                            debug!(broker = %self.broker(), error = %why, "MQTT broker not reachable yet");
                        }
                    }
                    *lock(&self.last_error) = Some(why);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Whether a message with `payload` bytes fits the broker's packet
    /// limit (with room for topic and properties).
    fn fits(&self, payload: usize) -> bool {
        payload + 4096 <= self.broker_max.load(Ordering::Relaxed) as usize
    }

    fn bridged(&self, tenant: &str) -> bool {
        self.cfg.tenants.iter().any(|t| t == tenant)
    }

    fn refuse(&self, topic: &str, why: &str) {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        warn!(topic, "MQTT message refused: {why}");
    }

    async fn dispatch(self: &Arc<Self>, p: Publish, parts: &Arc<EdgeParts>) {
        let Ok(topic) = std::str::from_utf8(&p.topic) else {
            return self.refuse("<not UTF-8>", "the topic is not UTF-8");
        };
        let Some(parsed) = topics::parse(topic) else {
            return;
        };
        let tenant = match &parsed {
            Topic::Card { tenant, .. }
            | Topic::Status { tenant, .. }
            | Topic::Call { tenant, .. }
            | Topic::Reply { tenant, .. } => *tenant,
        };
        if !self.bridged(tenant) {
            return self.refuse(topic, "not a tenant this node bridges");
        }
        if p.payload.len() > self.cfg.max_message {
            let why = format!(
                "{} bytes, over the limit of {}",
                p.payload.len(),
                self.cfg.max_message
            );
            self.refuse(topic, &why);
            if let (Topic::Reply { node, .. }, Some(props)) = (&parsed, &p.properties) {
                // An answer too large to pass on: its caller learns now,
                // not at its deadline.
                let tx = props
                    .correlation_data
                    .as_ref()
                    .filter(|_| *node == self.node)
                    .and_then(|c| lock(&self.pending).remove(c));
                if let Some(tx) = tx {
                    let _ = tx.send(Reply {
                        status: Err(format!("with {why} (mqtt.max_message)")),
                        content_type: None,
                        payload: Bytes::new(),
                        stream: None,
                    });
                }
            }
            if let (Topic::Call { .. }, Some(props)) = (&parsed, &p.properties) {
                if let Some(rt) = props.response_topic.clone() {
                    if topics::valid_response_topic(&rt, tenant) {
                        let e = MeshError::new(ErrorKind::TooLarge, &self.node, why);
                        let (this, c) = (self.clone(), props.correlation_data.clone());
                        // Not awaited here: this loop drains the client's queue.
                        tokio::spawn(async move { this.answer_error(rt, c, e, false).await });
                    }
                }
            }
            return;
        }
        match parsed {
            Topic::Card { tenant, name } => self.card(tenant, name, &p.payload, parts).await,
            Topic::Status { tenant, name } => {
                let id = AgentId::new(tenant, name);
                let h = match &p.payload[..] {
                    b"offline" => Health::Unhealthy,
                    b"online" => Health::Healthy,
                    _ => return self.refuse(topic, "status is `online` or `offline`"),
                };
                if let Some(held) = lock(&self.held).get_mut(&id) {
                    held.status = Some(h);
                }
                let Some(a) = parts.agents.agents.get(&id).filter(|a| a.is_edge()) else {
                    return;
                };
                if a.set_health(h) {
                    info!(agent = %id, health = ?h, "edge agent status");
                    parts.agents.publish(&a).await;
                }
            }
            Topic::Reply { node, .. } => {
                if node != self.node {
                    return;
                }
                let Some(correlation) = p
                    .properties
                    .as_ref()
                    .and_then(|pr| pr.correlation_data.clone())
                else {
                    return self.refuse(topic, "an answer without correlation data");
                };
                let props = p.properties.unwrap_or_default();
                let stream = match user_property(&props, STREAM_PROPERTY) {
                    None => None,
                    Some("end") => Some(true),
                    Some(_) => Some(false),
                };
                let tx = {
                    let mut pending = lock(&self.pending);
                    // A whole answer or a stream's end closes the entry.
                    if stream == Some(false) {
                        pending.get(&correlation).cloned()
                    } else {
                        pending.remove(&correlation)
                    }
                };
                let Some(tx) = tx else {
                    // QoS 1 may deliver twice; the first answer won.
                    self.stats.late_replies.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                let status = match user_property(&props, STATUS_PROPERTY) {
                    None => Ok(200),
                    Some(s) => s.parse::<u16>().map_err(|_| {
                        format!("with dmsc-status `{s}`, not a number (200-599 expected)")
                    }),
                };
                let _ = tx.send(Reply {
                    status,
                    content_type: props.content_type.clone(),
                    payload: p.payload,
                    stream,
                });
            }
            Topic::Call { tenant, host } => {
                let props = p.properties.clone().unwrap_or_default();
                let Some(response_topic) = props.response_topic.clone() else {
                    return self
                        .refuse(topic, "a call without a response topic cannot be answered");
                };
                if !topics::valid_response_topic(&response_topic, tenant) {
                    return self.refuse(
                        topic,
                        "the response topic must be the caller's own: under dmsc/<tenant>/, not a card, status, request, call or replies topic, no wildcards",
                    );
                }
                let Some(ingress) = parts.ingress.get(tenant).cloned() else {
                    return;
                };
                let key = props
                    .correlation_data
                    .as_ref()
                    .map(|c| (response_topic.clone(), c.clone()));
                // A QoS 1 redelivery (the broker sets DUP) of a call already
                // taken. Without DUP it is a new call, even with a
                // correlation id used before (a device's counter restarts).
                if p.dup
                    && p.qos != QoS::AtMostOnce
                    && key.as_ref().is_some_and(|k| lock(&self.seen).contains(k))
                {
                    self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                    debug!(
                        topic,
                        "MQTT call redelivered (DUP) after it was taken: dropped"
                    );
                    return;
                }
                let permit = self
                    .calls
                    .get(tenant)
                    .and_then(|s| s.clone().try_acquire_owned().ok());
                let Some(permit) = permit else {
                    let why = format!(
                        "{} calls from the edge of tenant `{tenant}` are in progress (mqtt.max_calls); retry later",
                        self.cfg.max_calls
                    );
                    self.refuse(topic, &why);
                    let e = MeshError::new(ErrorKind::Overloaded, &self.node, why);
                    let this = self.clone();
                    let c = props.correlation_data.clone();
                    // Not awaited here: this loop drains the client's queue.
                    tokio::spawn(
                        async move { this.answer_error(response_topic, c, e, false).await },
                    );
                    return;
                };
                // Taken: a redelivery from now on is a duplicate (a call
                // refused above may come again).
                if let Some(key) = key {
                    let mut seen = lock(&self.seen);
                    if seen.len() >= SEEN_CALLS {
                        seen.pop_front();
                    }
                    seen.push_back(key);
                }
                self.stats.calls.fetch_add(1, Ordering::Relaxed);
                let this = self.clone();
                let host = host.to_string();
                tokio::spawn(async move {
                    // Held until the answer is published (a stream's end).
                    let _permit = permit;
                    let resp = call_mesh(&ingress, &host, &props, p.payload).await;
                    this.answer(response_topic, props.correlation_data, resp)
                        .await;
                });
            }
        }
    }

    /// Registers, updates or (empty payload) removes an edge agent.
    async fn card(&self, tenant: &str, name: &str, payload: &[u8], parts: &EdgeParts) {
        let id = AgentId::new(tenant, name);
        if payload.is_empty() {
            lock(&self.held).remove(&id);
            if parts.agents.agents.get(&id).is_some_and(|a| a.is_edge()) {
                parts.agents.remove(&id).await;
                info!(agent = %id, "edge agent left (card cleared)");
            }
            return;
        }
        if !dmsc_transport::identity::valid_name(name) || name == "mesh" {
            return self.refuse(
                &topics::card(tenant, name),
                "the agent name must be 1-63 of a-z, 0-9 and - (not `mesh`)",
            );
        }
        let card = match edge_card(payload, tenant, name) {
            Ok(c) => c,
            Err(e) => {
                return self.refuse(&topics::card(tenant, name), &format!("invalid card: {e}"))
            }
        };
        let held = {
            let mut all = lock(&self.held);
            let status = all.get(&id).and_then(|h| h.status);
            let h = Held { card, status };
            all.insert(id.clone(), h.clone());
            h
        };
        // A standby only holds it; the active bridge registers it now (a
        // new card replaces the old one), or at its next check if another
        // node still has it.
        let registered = parts.agents.agents.get(&id).is_some_and(|a| a.is_edge());
        let active = lock(&self.active).contains(tenant);
        if (registered || active) && !self.elsewhere(&id, parts) {
            self.register(&id, held, parts).await;
        }
    }

    /// Publishes the answer to an edge caller's call: one message, or for
    /// a server-sent-event answer one message per chunk as it comes
    /// (`dmsc-stream: more`) and a last one with `dmsc-stream: end`.
    async fn answer(&self, topic: String, correlation: Option<Bytes>, resp: Response<Body>) {
        let (parts, mut body) = resp.into_parts();
        let content_type = parts
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let kind = parts
            .headers
            .get("dmsc-error")
            .and_then(|v| v.to_str().ok());
        // A mesh error answers an HTTP JSON-RPC caller with 200 (what the
        // A2A SDKs read); an MQTT caller has only `dmsc-status` to go by,
        // so it gets the error's own status.
        let status = kind
            .and_then(ErrorKind::parse)
            .map_or(parts.status, ErrorKind::status);
        let mut base = vec![(STATUS_PROPERTY.to_string(), status.as_u16().to_string())];
        if let Some(kind) = kind {
            base.push((ERROR_PROPERTY.into(), kind.into()));
        }
        let publish = |payload: Bytes, stream: Option<&str>| {
            let mut user_properties = base.clone();
            if let Some(s) = stream {
                user_properties.push((STREAM_PROPERTY.into(), s.into()));
            }
            let props = PublishProperties {
                correlation_data: correlation.clone(),
                content_type: content_type.clone(),
                user_properties,
                ..Default::default()
            };
            self.client.publish_with_properties(
                topic.clone(),
                QoS::AtLeastOnce,
                false,
                payload,
                props,
            )
        };
        let sse = content_type
            .as_deref()
            .is_some_and(|c| c.starts_with("text/event-stream"));
        let too_large = |n: usize| {
            MeshError::new(
                ErrorKind::TooLarge,
                &self.node,
                format!(
                    "the answer ({n} bytes or more) does not fit the MQTT message limit ({} bytes, broker limit {})",
                    self.cfg.max_message,
                    self.broker_max.load(Ordering::Relaxed)
                ),
            )
        };
        if sse {
            let mut failure = None;
            while let Some(frame) = body.frame().await {
                let data = match frame.map(|f| f.into_data()) {
                    Ok(Ok(d)) => d,
                    Ok(Err(_)) => continue,
                    Err(e) => {
                        failure = Some(MeshError::new(
                            ErrorKind::Unreachable,
                            &self.node,
                            format!("the streamed answer broke off: {e}"),
                        ));
                        break;
                    }
                };
                if data.len() > self.cfg.max_message || !self.fits(data.len()) {
                    failure = Some(too_large(data.len()));
                    break;
                }
                if publish(data, Some("more")).await.is_err() {
                    return;
                }
            }
            match failure {
                // The caller learns that the stream was cut, not a clean end.
                Some(e) => self.answer_error(topic, correlation, e, true).await,
                None => {
                    if let Err(e) = publish(Bytes::new(), Some("end")).await {
                        warn!(error = %e, "could not publish an answer to an edge caller");
                    }
                }
            }
            return;
        }
        let limit = self
            .cfg
            .max_message
            .min((self.broker_max.load(Ordering::Relaxed) as usize).saturating_sub(4096));
        match read_limited(body, limit).await {
            Ok(payload) => {
                if let Err(e) = publish(payload, None).await {
                    warn!(error = %e, "could not publish an answer to an edge caller");
                }
            }
            Err(ReadError::TooLong) => {
                self.answer_error(topic, correlation, too_large(limit + 1), false)
                    .await
            }
            Err(ReadError::Broken(e)) => {
                let e = MeshError::new(
                    ErrorKind::Unreachable,
                    &self.node,
                    format!("the answer broke off: {e}"),
                );
                self.answer_error(topic, correlation, e, false).await
            }
        }
    }

    /// Publishes `e` as the answer to an edge caller: its status,
    /// `dmsc-error` and problem body (`dmsc-stream: end` when it ends a
    /// stream).
    async fn answer_error(
        &self,
        topic: String,
        correlation: Option<Bytes>,
        e: MeshError,
        ends_stream: bool,
    ) {
        let (parts, body) = e.response(None).into_parts();
        let payload = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let mut user_properties = vec![
            (
                STATUS_PROPERTY.to_string(),
                parts.status.as_u16().to_string(),
            ),
            (ERROR_PROPERTY.to_string(), e.kind.as_str().to_string()),
        ];
        if ends_stream {
            user_properties.push((STREAM_PROPERTY.into(), "end".into()));
        }
        let props = PublishProperties {
            correlation_data: correlation,
            content_type: parts
                .headers
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            user_properties,
            ..Default::default()
        };
        if let Err(e) = self
            .client
            .publish_with_properties(topic, QoS::AtLeastOnce, false, payload, props)
            .await
        {
            warn!(error = %e, "could not publish an error answer to an edge caller");
        }
    }
}

/// The TLS client of an mqtts broker connection: TLS 1.3 or 1.2 with
/// ring, the broker verified against `ca` (or the system's roots), and the
/// client certificate if one is configured.
fn tls_config(tls: &crate::config::MqttTls) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| format!("mqtt: cannot read `{}`: {e}", p.display()))
    };
    let certs = |p: &std::path::Path| -> Result<Vec<CertificateDer<'static>>, String> {
        let pem = read(p)?;
        let v = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("mqtt: `{}`: {e}", p.display()))?;
        if v.is_empty() {
            return Err(format!("mqtt: `{}` holds no certificate", p.display()));
        }
        Ok(v)
    };
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca {
        Some(ca) => {
            for c in certs(ca)? {
                roots
                    .add(c)
                    .map_err(|e| format!("mqtt: `{}`: {e}", ca.display()))?;
            }
        }
        None => {
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("mqtt: TLS: {e}"))?
    .with_root_certificates(roots);
    match &tls.client {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let chain = certs(cert)?;
            let key = PrivateKeyDer::from_pem_slice(&read(key)?)
                .map_err(|e| format!("mqtt: `{}`: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("mqtt: client certificate: {e}"))
        }
    }
}

/// An edge agent's card, validated like any other. An edge agent has no
/// HTTP endpoint of its own: a card `url` that is missing or not http(s)
/// (e.g. `mqtt://…`) is taken as its mesh name, which is what the mesh
/// serves in every card anyway.
fn edge_card(payload: &[u8], tenant: &str, name: &str) -> Result<AgentCard, String> {
    let mut v: serde_json::Value = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
    if let Some(o) = v.as_object_mut() {
        let http = o
            .get("url")
            .and_then(|u| u.as_str())
            .is_some_and(|u| u.starts_with("http://") || u.starts_with("https://"));
        if !http {
            o.insert("url".into(), format!("http://{name}.{tenant}.dmsc").into());
        }
    }
    AgentCard::from_value(v).map_err(|e| e.to_string())
}

/// A body's bytes, refused past `limit`. (Not `http_body_util::Limited`:
/// its boxed error trips rustc's Send check in spawned futures.)
async fn read_limited(mut body: Body, limit: usize) -> Result<Bytes, ReadError> {
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ReadError::Broken(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > limit {
                return Err(ReadError::TooLong);
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.freeze())
}

/// Why [`read_limited`] gave up.
enum ReadError {
    TooLong,
    /// The body failed (its sender's side went away or broke).
    Broken(String),
}

/// One server-sent event carrying `payload` (one `data:` line per line).
fn sse_event(payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(payload.len() + 16);
    for line in payload.split(|b| *b == b'\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.strip_suffix(b"\r").unwrap_or(line));
        out.push(b'\n');
    }
    out.push(b'\n');
    Bytes::from(out)
}

/// The bridge's sessions as the request path holds them: an edge agent
/// is reached through the session of its tenant.
#[derive(Debug)]
pub struct Link(pub Vec<Arc<Bridge>>);

impl Link {
    fn session(&self, tenant: &str) -> Option<&Arc<Bridge>> {
        self.0.iter().find(|b| b.bridged(tenant))
    }
}

impl EdgeLink for Link {
    fn deliver<'a>(
        &'a self,
        agent: &'a LocalAgent,
        me: &'a str,
        call: EdgeCall<'a>,
    ) -> EdgeAnswer<'a> {
        match self.session(&agent.id.tenant) {
            Some(b) => Box::pin(b.clone().deliver(agent, me, call)),
            None => {
                let e = MeshError::new(
                    ErrorKind::Unreachable,
                    me,
                    format!(
                        "this node does not bridge tenant `{}` over MQTT",
                        agent.id.tenant
                    ),
                )
                .agent(&agent.id);
                Box::pin(std::future::ready(Err(Failure::NotDelivered(e))))
            }
        }
    }

    fn endpoint(&self, id: &AgentId) -> String {
        match self.session(&id.tenant) {
            Some(b) => b.endpoint(&id.tenant, &id.name),
            None => format!("mqtt://-/{}", topics::request(&id.tenant, &id.name)),
        }
    }
}

/// Drops a delegation's pending entry however it ends.
struct Forget(Arc<Bridge>, Bytes);

impl Drop for Forget {
    fn drop(&mut self) {
        lock(&self.0.pending).remove(&self.1);
    }
}

fn user_property<'a>(props: &'a PublishProperties, name: &str) -> Option<&'a str> {
    props
        .user_properties
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// An edge caller's message as an HTTP request to `host` through the
/// tenant's in-process ingress.
async fn call_mesh(
    ingress: &Arc<Ingress>,
    host: &str,
    props: &PublishProperties,
    payload: Bytes,
) -> Response<Body> {
    let method = user_property(props, METHOD_PROPERTY)
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
        .unwrap_or(Method::POST);
    let path = user_property(props, PATH_PROPERTY).unwrap_or("/");
    if !path.starts_with('/') {
        // (An absolute URI would name another host than the topic's.)
        return MeshError::new(
            ErrorKind::BadRequest,
            "mqtt",
            format!("{PATH_PROPERTY} must be a path starting with `/`, not `{path}`"),
        )
        .response(None);
    }
    let bad = |why: String| MeshError::new(ErrorKind::BadRequest, "mqtt", why).response(None);
    let mut req = match Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, host)
        .body(full(payload))
    {
        Ok(r) => r,
        Err(e) => return bad(format!("not a valid request: {e}")),
    };
    if let Some(ct) = props
        .content_type
        .as_deref()
        .and_then(|c| HeaderValue::from_str(c).ok())
    {
        req.headers_mut().insert(CONTENT_TYPE, ct);
    }
    for (k, v) in &props.user_properties {
        // Mesh request headers the caller may set (timeout, intent, tags).
        if k.starts_with("dmsc-") && !k.starts_with("dmsc-caller") {
            if let (Ok(name), Ok(value)) = (
                hyper::header::HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(v),
            ) {
                req.headers_mut().insert(name, value);
            }
        }
    }
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    // Both halves end by themselves once the answer is read (or dropped).
    let server = ingress.clone();
    tokio::spawn(async move { server.serve_io(TokioIo::new(server_io)).await });
    let result = async {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client_io))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "in-process call connection ended");
            }
        });
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        // Streamed as it comes (an SSE answer is published event by event).
        Ok::<_, String>(resp.map(|b| {
            b.map_err(|e| Box::new(e) as crate::proto::http::BoxError)
                .boxed()
        }))
    }
    .await;
    result.unwrap_or_else(|e| {
        MeshError::new(
            ErrorKind::Unreachable,
            "mqtt",
            format!("in-process call failed: {e}"),
        )
        .response(None)
    })
}
