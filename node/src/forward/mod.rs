//! Delegation: one request, from a resolved target to an agent's response.
//!
//! The path is one straight line: select (registry, under a read lock) ->
//! admit (this node's circuit for that agent) -> deliver, either to a local
//! agent over the pooled HTTP client or to the agent's home node over one
//! QUIC bidirectional stream (`wire` format) -> record the outcome (circuit,
//! outstanding count). The home node runs the same `deliver_local` after
//! [`crate::policy::inbound`] re-checks the head against the calling node's
//! verified tenant scope and finds the target among its own agents of that
//! tenant. A policy refusal (403) comes back not delivered; it is neither
//! retried elsewhere (every home node judges the same certificate) nor
//! charged to the agent, and both nodes audit it as a denial.
//!
//! Blame: a failure the caller caused (its streamed body failed, or it
//! stalled its upload past the deadline; see [`crate::fault`]) is answered
//! to the caller and charged to no agent: neither this node's circuit for
//! the agent nor the agent's error rate hears of it. The home node judges
//! the same way for the stream it receives from the calling node.
//!
//! Retries: a failure that certainly happened before the agent saw the
//! request (connection refused, unknown at the home node, home node
//! unreachable, circuit open) moves on to the next candidate; one that may
//! have reached the agent is retried only for idempotent methods. Both need a
//! replayable (buffered) body and stay within the caller's deadline. The
//! deadline bounds the wait for the response head at every hop (the home
//! node receives what is left of it); a streamed response body then flows
//! for as long as the agent sends it.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use dmsc_registry::{AgentId, SelectError, Target};
use dmsc_transport::{BiStream, Channel, Overlay, StreamRecv, StreamSend};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, CONTENT_TYPE, ETAG, HOST, IF_NONE_MATCH};
use hyper::{Method, Request, Response, StatusCode, Version};
use tokio::time::Instant;
use tracing::{debug, warn, Instrument};

use crate::config::DelegationConfig;
use crate::forward::budget::BodyBudget;
use crate::forward::fault::BodyWatch;
use crate::proto::forwarded::{self, Vouched};
use crate::proto::http::{full, strip_hop_by_hop, Body, BoxError, ErrorKind, MeshError};
use crate::proto::wire::{self, Part, PartDecoder, RequestHead, ResponseHead, DELEGATION_VERSION};
use crate::route::MeshView;
use client::Upstream;
use local::{LocalAgent, LocalAgents, CARD_PATHS};

pub mod budget;
pub mod client;
pub mod fault;
pub mod local;

/// How long a home node waits for the head of an incoming delegation.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
const READ_CHUNK: usize = 64 * 1024;

/// A request body: buffered (replayable, readable for intent) or streamed.
#[derive(Debug)]
pub enum ReqBody {
    Buffered(Bytes),
    Streaming(Body),
}

impl ReqBody {
    pub fn into_body(self) -> Body {
        match self {
            ReqBody::Buffered(b) => full(b),
            ReqBody::Streaming(b) => b,
        }
    }
}

/// One delegation as ingress hands it over.
#[derive(Debug)]
pub struct Delegation {
    pub tenant: String,
    pub caller: String,
    pub target: Target,
    pub deadline: Instant,
    pub trace_id: String,
    pub method: Method,
    pub path: String,
    pub http2: bool,
    pub headers: hyper::HeaderMap,
    pub body: ReqBody,
}

/// How one delivery attempt failed.
#[derive(Debug)]
enum Failure {
    /// The agent certainly never saw the request.
    NotDelivered(MeshError),
    /// It may have.
    MaybeDelivered(MeshError),
    /// The caller caused it (bad or cut request body, stalled upload, a
    /// request the home node judged malformed): charged to no agent, never
    /// retried.
    Caller(MeshError),
}

impl Failure {
    fn error(&self) -> &MeshError {
        match self {
            Failure::NotDelivered(e) | Failure::MaybeDelivered(e) | Failure::Caller(e) => e,
        }
    }

    /// Re-judged as the caller's if the request body says so.
    fn blame(self, watch: &BodyWatch, me: &str) -> Failure {
        match watch.fault(self.error().kind) {
            Some(fault) => {
                let mut e = fault.error(me);
                e.agent = self.error().agent.clone();
                Failure::Caller(e)
            }
            None => self,
        }
    }
}

/// One request as it goes to a local agent.
struct ToAgent<'a> {
    method: Method,
    path: &'a str,
    http2: bool,
    headers: hyper::HeaderMap,
    body: Body,
    deadline: Instant,
    /// Who the node vouches for (as authenticated at ingress, or as the
    /// calling node stated over the verified overlay).
    caller: &'a str,
    tenant: &'a str,
    trace_id: &'a str,
    /// Watches a streamed request body (blame for failures).
    watch: &'a BodyWatch,
}

/// The delegation engine of a node (shared by ingress and the overlay side).
#[derive(Debug)]
pub struct Delegator {
    pub me: String,
    pub mesh: Arc<MeshView>,
    pub agents: Arc<LocalAgents>,
    pub upstream: Upstream,
    pub overlay: Overlay,
    pub cfg: DelegationConfig,
    pub metrics: crate::metrics::DelegationMetrics,
    /// Node-wide budget for request bodies buffered at ingress.
    pub body_budget: Arc<BodyBudget>,
    /// Audit trail (and the rest of the node's security state).
    pub security: Arc<crate::security::Security>,
}

/// A response body that holds guards (outstanding count, writer task)
/// until the body is done or dropped.
struct Guarded {
    inner: Body,
    _guards: Vec<Box<dyn Send + Sync>>,
}

impl hyper::body::Body for Guarded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn guarded(body: Body, guards: Vec<Box<dyn Send + Sync>>) -> Body {
    Guarded {
        inner: body,
        _guards: guards,
    }
    .boxed()
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

/// Aborts a task when dropped (a request-body writer lives as long as its
/// response).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn incoming(body: Incoming) -> Body {
    body.map_err(|e| Box::new(e) as BoxError).boxed()
}

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS
    )
}

fn is_card_path(path: &str) -> bool {
    let p = path.split('?').next().unwrap_or(path);
    CARD_PATHS.contains(&p)
}

fn select_error(me: &str, e: SelectError) -> MeshError {
    let kind = match &e {
        SelectError::UnknownAgent { .. } => ErrorKind::UnknownAgent,
        SelectError::NoMatch { .. } => ErrorKind::NoMatch,
        _ => ErrorKind::NoneAvailable,
    };
    // The registry's messages already name the tenant and the target.
    MeshError::new(kind, me, e.to_string())
}

impl Delegator {
    /// Routes one delegation and returns the response to give the caller.
    pub async fn delegate(&self, d: Delegation) -> Response<Body> {
        let target_desc = match &d.target {
            Target::Agent(n) => format!("agent:{n}"),
            Target::Tag(t) => format!("tag:{t}"),
            Target::Intent(_) => "intent".to_string(),
        };
        let span = tracing::info_span!("delegation", tenant = %d.tenant, target = %target_desc, trace = %d.trace_id);
        let tenant = d.tenant.clone();
        // Kept for the audit record only when there is an audit log.
        let audited = self
            .security
            .audit
            .is_some()
            .then(|| (d.caller.clone(), d.trace_id.clone()));
        let started = std::time::Instant::now();
        let resp = self.delegate_inner(d).instrument(span).await;
        let outcome = match resp
            .headers()
            .get("dmsc-error")
            .and_then(|v| v.to_str().ok())
        {
            Some(kind) => kind.to_string(),
            None if resp.status().is_server_error() => "agent-error".to_string(),
            None => "ok".to_string(),
        };
        self.metrics.record(&tenant, &outcome, started.elapsed());
        if let Some((caller, trace)) = audited {
            let header = |name: &str| {
                resp.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            self.security.record(dmsc_audit::Event::tenant(
                tenant,
                dmsc_audit::Delegation {
                    caller,
                    target: target_desc,
                    route: header("dmsc-route").unwrap_or_default(),
                    agent: header("dmsc-agent"),
                    serving_node: header("dmsc-node"),
                    outcome,
                    status: Some(resp.status().as_u16()),
                    duration_ms: started.elapsed().as_millis() as u64,
                    trace_id: Some(trace),
                },
            ));
        }
        resp
    }

    async fn delegate_inner(&self, d: Delegation) -> Response<Body> {
        let Delegation {
            tenant,
            caller,
            target,
            deadline,
            trace_id,
            method,
            path,
            http2,
            headers,
            body,
        } = d;
        let request_bytes = match &body {
            ReqBody::Buffered(b) => Some(b.clone()),
            ReqBody::Streaming(_) => None,
        };
        let err = |e: MeshError| e.response(request_bytes.as_deref());
        // A streamed body goes to one agent only, so one watch covers it.
        let watch = BodyWatch::default();
        let mut streaming = match body {
            ReqBody::Streaming(b) => Some(watch.watch(b)),
            ReqBody::Buffered(_) => None,
        };
        let mut exclude: Vec<AgentId> = Vec::new();
        let mut last: Option<MeshError> = None;
        for attempt in 0..=self.cfg.retries {
            if Instant::now() >= deadline {
                return err(MeshError::new(
                    ErrorKind::Timeout,
                    &self.me,
                    "the deadline passed before an agent answered",
                ));
            }
            let selection = {
                let reg = self.mesh.read();
                reg.select(
                    &tenant,
                    &target,
                    &*self.mesh,
                    &exclude,
                    &mut rand::thread_rng(),
                )
            };
            let sel = match selection {
                Ok(s) => s,
                Err(e) => {
                    let e = select_error(&self.me, e);
                    return err(match last {
                        Some(prev) if attempt > 0 => MeshError::new(
                            prev.kind,
                            &self.me,
                            format!("{}; no other candidate: {}", prev.detail, e.detail),
                        ),
                        _ => e,
                    });
                }
            };
            let id = sel.id.clone();
            if !self.mesh.admit(&id) {
                exclude.push(id);
                continue;
            }
            let body = match &request_bytes {
                Some(b) => ReqBody::Buffered(b.clone()),
                None => match streaming.take() {
                    Some(b) => ReqBody::Streaming(b),
                    None => break,
                },
            };
            let (_, outstanding) = self.mesh.begin(&id);
            debug!(agent = %id, node = %sel.node, attempt, why = %sel.why, "delegating");
            let result = if sel.node == self.me {
                match self.agents.get(&id) {
                    Some(agent) => {
                        deliver_local(
                            &agent,
                            &self.upstream,
                            &self.me,
                            ToAgent {
                                method: method.clone(),
                                path: &path,
                                http2,
                                headers: headers.clone(),
                                body: body.into_body(),
                                deadline,
                                caller: &caller,
                                tenant: &tenant,
                                trace_id: &trace_id,
                                watch: &watch,
                            },
                        )
                        .await
                    }
                    None => Err(Failure::NotDelivered(
                        MeshError::new(
                            ErrorKind::UnknownAgent,
                            &self.me,
                            "agent deregistered from this node",
                        )
                        .agent(&id),
                    )),
                }
            } else {
                let head = RequestHead {
                    version: DELEGATION_VERSION,
                    tenant: tenant.clone(),
                    caller: caller.clone(),
                    agent: id.name.clone(),
                    deadline_ms: deadline
                        .saturating_duration_since(Instant::now())
                        .as_millis() as u64,
                    trace_id: trace_id.clone(),
                    method: method.to_string(),
                    path: path.clone(),
                    http: if http2 { 2 } else { 1 },
                    headers: wire::to_wire_headers(&headers),
                    empty_body: matches!(&body, ReqBody::Buffered(b) if b.is_empty()),
                };
                self.deliver_remote(&sel.node, &id, head, body, deadline)
                    .await
            };
            match result.map_err(|f| f.blame(&watch, &self.me)) {
                Ok(mut resp) => {
                    // An answer to a request whose body then failed says
                    // nothing about the agent.
                    if !watch.failed() {
                        self.mesh
                            .record_outcome(&id, !resp.status().is_server_error());
                    }
                    let h = resp.headers_mut();
                    if let Ok(v) = HeaderValue::from_str(&id.to_string()) {
                        h.insert("dmsc-agent", v);
                    }
                    if !h.contains_key("dmsc-node") {
                        if let Ok(v) = HeaderValue::from_str(&sel.node) {
                            h.insert("dmsc-node", v);
                        }
                    }
                    if let Ok(v) = HeaderValue::from_str(&sel.why) {
                        h.insert("dmsc-route", v);
                    }
                    debug!(agent = %id, node = %sel.node, status = resp.status().as_u16(), attempt, "delegated");
                    return resp.map(|b| guarded(b, vec![Box::new(outstanding)]));
                }
                Err(Failure::NotDelivered(e)) if e.kind == ErrorKind::Forbidden => {
                    warn!(agent = %id, node = %sel.node, error = %e, "refused by the home node's tenant policy");
                    self.security.record(dmsc_audit::Event::tenant(
                        tenant.clone(),
                        dmsc_audit::Denied {
                            caller: caller.clone(),
                            target: format!("agent:{}", id.name),
                            reason: format!("home node `{}` refused: {}", sel.node, e.detail),
                        },
                    ));
                    return err(e);
                }
                Err(Failure::NotDelivered(e)) => {
                    self.mesh.record_outcome(&id, false);
                    warn!(agent = %id, node = %sel.node, error = %e, "not delivered; trying the next candidate");
                    exclude.push(id);
                    last = Some(e);
                    if request_bytes.is_none() {
                        break;
                    }
                    self.metrics.retries.inc();
                }
                Err(Failure::Caller(e)) => {
                    debug!(agent = %id, node = %sel.node, error = %e, "the caller's side failed; the agent is not charged");
                    return err(e);
                }
                Err(Failure::MaybeDelivered(e)) => {
                    self.mesh.record_outcome(&id, false);
                    if request_bytes.is_some()
                        && idempotent(&method)
                        && e.kind != ErrorKind::Timeout
                    {
                        warn!(agent = %id, error = %e, "failed after sending; retrying (idempotent)");
                        self.metrics.retries.inc();
                        exclude.push(id);
                        last = Some(e);
                        continue;
                    }
                    return err(e);
                }
            }
        }
        err(last.unwrap_or_else(|| {
            MeshError::new(
                ErrorKind::NoneAvailable,
                &self.me,
                "no candidate admitted the request",
            )
        }))
    }

    /// Sends a delegation to a remote agent's home node over the overlay.
    async fn deliver_remote(
        &self,
        node: &str,
        id: &AgentId,
        head: RequestHead,
        body: ReqBody,
        deadline: Instant,
    ) -> Result<Response<Body>, Failure> {
        let not_delivered = |detail: String| {
            Failure::NotDelivered(
                MeshError::new(ErrorKind::Unreachable, &self.me, detail).agent(id),
            )
        };
        let Some(addr) = self.mesh.node_addr(node) else {
            return Err(not_delivered(format!(
                "home node `{node}` has no known overlay address"
            )));
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        let stream = match tokio::time::timeout(
            remaining,
            self.overlay.open_stream(addr, Channel::Delegate),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(not_delivered(format!(
                    "home node `{node}` unreachable: {e}"
                )))
            }
            Err(_) => {
                return Err(not_delivered(format!(
                    "home node `{node}` did not answer in time"
                )))
            }
        };
        let BiStream {
            mut send,
            mut recv,
            peer,
            ..
        } = stream;
        if *peer != *node {
            // A stale address now belongs to another node: not our target.
            send.reset(dmsc_transport::overlay::RESET_CANCELLED);
            return Err(not_delivered(format!(
                "the address of home node `{node}` now answers as `{peer}`"
            )));
        }
        let mut parts: Vec<Bytes> = match wire::encode_request_head(&head) {
            Ok(p) => p.to_vec(),
            Err(e) => return Err(not_delivered(format!("cannot encode the request: {e}"))),
        };
        let mut guards: Vec<Box<dyn Send + Sync>> = Vec::new();
        if let ReqBody::Buffered(bytes) = body {
            // The common case: head and body in one write.
            wire::encode_data(bytes, &mut parts);
            if let Err(e) = send.write_chunks(&mut parts).await {
                return Err(not_delivered(format!("home node `{node}`: {e}")));
            }
            let _ = send.finish();
        } else {
            let body = body.into_body();
            if let Err(e) = send.write_chunks(&mut parts).await {
                return Err(not_delivered(format!("home node `{node}`: {e}")));
            }
            let task = tokio::spawn(pump_body(body, send).in_current_span());
            guards.push(Box::new(AbortOnDrop(task)));
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let mut decoder = PartDecoder::new();
        let head = match tokio::time::timeout(remaining, read_part(&mut recv, &mut decoder)).await {
            Err(_) => {
                recv.stop(dmsc_transport::overlay::RESET_CANCELLED);
                return Err(Failure::MaybeDelivered(
                    MeshError::new(
                        ErrorKind::Timeout,
                        &self.me,
                        format!("no response from `{id}` (via node `{node}`) within the deadline"),
                    )
                    .agent(id),
                ));
            }
            Ok(Ok(Some(Part::Head(h)))) => wire::decode_response_head(&h),
            Ok(Ok(other)) => {
                return Err(Failure::MaybeDelivered(
                    MeshError::new(
                        ErrorKind::Unreachable,
                        &self.me,
                        format!("home node `{node}` sent {other:?} instead of a response head"),
                    )
                    .agent(id),
                ))
            }
            Ok(Err(e)) => {
                return Err(Failure::MaybeDelivered(
                    MeshError::new(
                        ErrorKind::Unreachable,
                        &self.me,
                        format!("home node `{node}` failed mid-delegation: {e}"),
                    )
                    .agent(id),
                ))
            }
        };
        let head = head.map_err(|e| {
            Failure::MaybeDelivered(
                MeshError::new(
                    ErrorKind::Unreachable,
                    &self.me,
                    format!("home node `{node}`: {e}"),
                )
                .agent(id),
            )
        })?;
        let mut resp = Response::new(guarded(stream_body(recv, decoder), guards));
        *resp.status_mut() = StatusCode::from_u16(head.status).unwrap_or(StatusCode::BAD_GATEWAY);
        *resp.headers_mut() = wire::from_wire_headers(&head.headers);
        let mesh_error = resp
            .headers()
            .get("dmsc-error")
            .and_then(|v| v.to_str().ok())
            .and_then(ErrorKind::parse);
        if !head.delivered || mesh_error.is_some() {
            // The home node answered for the agent (refused connection, not
            // its agent, the agent failed mid-request, deadline): its
            // problem body says why; the retry rules and the caller's error
            // dialect then apply as for a local failure.
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            let detail = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| {
                    v.get("detail")
                        .or_else(|| v.pointer("/error/message"))
                        .and_then(|d| d.as_str())
                        .map(str::to_string)
                })
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            let e = MeshError::new(mesh_error.unwrap_or(ErrorKind::Unreachable), node, detail)
                .agent(id);
            if e.kind == ErrorKind::BadRequest && head.delivered {
                // The home node took the delegation and judged the request
                // (or the stream it arrived on) malformed: nothing the
                // agent did. (A head it could not read stays "not
                // delivered", so another candidate is tried.)
                return Err(Failure::Caller(e));
            }
            return Err(if head.delivered {
                Failure::MaybeDelivered(e)
            } else {
                Failure::NotDelivered(e)
            });
        }
        Ok(resp)
    }

    /// Serves one delegation stream from a peer node (this node is home).
    pub async fn serve_stream(&self, stream: BiStream) {
        let BiStream {
            peer,
            scope,
            mut send,
            mut recv,
            ..
        } = stream;
        let mut decoder = PartDecoder::new();
        let head =
            match tokio::time::timeout(HEAD_TIMEOUT, read_part(&mut recv, &mut decoder)).await {
                Ok(Ok(Some(Part::Head(h)))) => wire::decode_request_head(&h),
                Ok(Ok(_)) | Err(_) => {
                    debug!(peer = %peer, "delegation stream without a head; dropping");
                    send.reset(dmsc_transport::overlay::RESET_CANCELLED);
                    return;
                }
                Ok(Err(e)) => {
                    debug!(peer = %peer, error = %e, "unreadable delegation stream");
                    send.reset(dmsc_transport::overlay::RESET_CANCELLED);
                    return;
                }
            };
        let head = match head {
            Ok(h) => h,
            Err(e) => {
                warn!(peer = %peer, error = %e, "refused delegation");
                let me = MeshError::new(ErrorKind::BadRequest, &self.me, e.to_string());
                let _ = write_error(&mut send, &me, false, None).await;
                return;
            }
        };
        let id = AgentId {
            tenant: head.tenant.clone(),
            name: head.agent.clone(),
        };
        self.metrics.inbound.inc();
        let span =
            tracing::info_span!("delegation-in", from = %peer, agent = %id, trace = %head.trace_id);
        let started = Instant::now();
        let (outcome, status) = async {
            // Destination-side check: the head's tenant within the calling
            // node's certificate scope, the target our own agent of it.
            let decision = crate::policy::inbound(
                &self.me,
                crate::policy::Inbound {
                    node: &peer,
                    scope: scope.as_deref(),
                    tenant: &head.tenant,
                    agent: &head.agent,
                    caller: &head.caller,
                },
                || self.agents.get(&id),
            );
            let agent = match decision {
                Ok(agent) => agent,
                Err(denial) => {
                    let kind = if denial.is_forbidden() {
                        warn!(%denial, "refused delegation");
                        self.security.record(dmsc_audit::Event::tenant(
                            head.tenant.clone(),
                            dmsc_audit::Denied {
                                caller: format!("{} (via node {peer})", head.caller),
                                target: format!("agent:{}", head.agent),
                                reason: denial.to_string(),
                            },
                        ));
                        ErrorKind::Forbidden
                    } else {
                        ErrorKind::UnknownAgent
                    };
                    let me = MeshError::new(kind, &self.me, denial.to_string()).agent(&id);
                    let _ = write_error(&mut send, &me, false, None).await;
                    return (
                        me.kind.as_str().to_string(),
                        Some(me.kind.status().as_u16()),
                    );
                }
            };
            // This node's own ceiling, whatever the calling node asks for.
            let budget = Duration::from_millis(head.deadline_ms).min(self.cfg.max_timeout);
            let deadline = Instant::now() + budget;
            let Ok(method) = Method::from_bytes(head.method.as_bytes()) else {
                let me = MeshError::new(
                    ErrorKind::BadRequest,
                    &self.me,
                    format!("invalid HTTP method `{}`", head.method),
                );
                let _ = write_error(&mut send, &me, false, None).await;
                return (
                    me.kind.as_str().to_string(),
                    Some(me.kind.status().as_u16()),
                );
            };
            let headers = wire::from_wire_headers(&head.headers);
            // The calling node is this side's caller: a stream it cuts or
            // garbles is its failure, not the agent's.
            let watch = BodyWatch::default();
            let body = if head.empty_body {
                crate::proto::http::empty()
            } else {
                watch.watch(stream_body(recv, decoder))
            };
            let delivery = deliver_local(
                &agent,
                &self.upstream,
                &self.me,
                ToAgent {
                    method,
                    path: &head.path,
                    http2: head.http == 2,
                    headers,
                    body,
                    deadline,
                    caller: &head.caller,
                    tenant: &head.tenant,
                    trace_id: &head.trace_id,
                    watch: &watch,
                },
            );
            // A caller that gives up (deadline, client gone) stops the stream:
            // stop working for it at once.
            let result = tokio::select! {
                r = delivery => r,
                _ = send.stopped() => {
                    debug!("caller gave up before the response head");
                    return ("cancelled".to_string(), None);
                }
            };
            match result {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let outcome = if resp.status().is_server_error() {
                        "agent-error"
                    } else {
                        "ok"
                    };
                    if let Err(e) = write_response(&mut send, resp).await {
                        // Reset, never finish: a cut-off body must not look complete.
                        send.reset(dmsc_transport::overlay::RESET_CANCELLED);
                        debug!(error = %e, "response copy stopped (agent or caller went away)");
                        return ("cut-off".to_string(), Some(status));
                    }
                    (outcome.to_string(), Some(status))
                }
                Err(Failure::NotDelivered(e)) => {
                    let _ = write_error(&mut send, &e, false, None).await;
                    (e.kind.as_str().to_string(), Some(e.kind.status().as_u16()))
                }
                Err(Failure::MaybeDelivered(e)) | Err(Failure::Caller(e)) => {
                    let _ = write_error(&mut send, &e, true, None).await;
                    (e.kind.as_str().to_string(), Some(e.kind.status().as_u16()))
                }
            }
        }
        .instrument(span)
        .await;
        // The serving side keeps its own record of every delegation it was
        // asked for: who (as the calling node vouched, over a verified
        // overlay connection) reached which of its agents, and how it went.
        if self.security.audit.is_some() {
            self.security.record(dmsc_audit::Event::tenant(
                head.tenant.clone(),
                dmsc_audit::Delegation {
                    caller: format!("{} (via node {peer})", head.caller),
                    target: format!("agent:{}", head.agent),
                    route: "inbound".into(),
                    agent: Some(id.to_string()),
                    serving_node: Some(self.me.clone()),
                    outcome,
                    status,
                    duration_ms: started.elapsed().as_millis() as u64,
                    trace_id: Some(head.trace_id.clone()),
                },
            ));
        }
    }
}

/// Fetches a remote agent's card through the mesh (from its home node,
/// which serves it from its cache with the mesh URLs).
pub async fn fetch_card(d: &Delegator, id: &AgentId) -> Result<dmsc_registry::AgentCard, String> {
    let resp = d
        .delegate(Delegation {
            tenant: id.tenant.clone(),
            caller: format!("node:{}", d.me),
            target: Target::Agent(id.name.clone()),
            deadline: Instant::now() + Duration::from_secs(3),
            trace_id: format!("{:032x}", rand::random::<u128>()),
            method: Method::GET,
            path: CARD_PATHS[0].to_string(),
            http2: false,
            headers: hyper::HeaderMap::new(),
            body: ReqBody::Buffered(Bytes::new()),
        })
        .await;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status()));
    }
    // (Not `Limited`: its boxed error trips rustc's Send check in spawned
    // futures; the home node serves a card it already validated, so a
    // plain collect with a size check after is enough.)
    let body = match resp.into_body().collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => return Err(e.to_string()),
    };
    if body.len() > 1 << 20 {
        return Err(format!("card of {} bytes is too large", body.len()));
    }
    dmsc_registry::AgentCard::parse(&body).map_err(|e| e.to_string())
}

/// Delivers to an agent of this node; used for local callers and for
/// delegations arriving from peers alike. The agent's error rate counts
/// what the agent did, never what the caller did (see [`crate::fault`]).
async fn deliver_local(
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
        caller,
        tenant,
        trace_id,
        watch,
    } = to;
    if (method == Method::GET || method == Method::HEAD) && is_card_path(path) {
        return Ok(serve_card(agent, &headers, me));
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
    let remaining = deadline.saturating_duration_since(Instant::now());
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
    let client = if agent.protocol.use_http2(http2) {
        *req.version_mut() = Version::HTTP_2;
        &upstream.h2
    } else {
        *req.version_mut() = Version::HTTP_11;
        &upstream.h1
    };
    // Counts until the response body is done (or this future is dropped
    // because the caller went away): the gossiped in-flight load.
    let in_flight = InFlight::new(agent.clone());
    let started = std::time::Instant::now();
    let result = tokio::time::timeout(remaining, client.request(req)).await;
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
                    "agent `{}` did not answer within the deadline ({remaining:?})",
                    agent.id
                ),
            )
            .agent(&agent.id),
        ),
        Ok(Err(e)) => {
            let detail = format!("agent `{}` at {}: {e:#}", agent.id, agent.spec.url);
            let err = MeshError::new(ErrorKind::Unreachable, me, detail).agent(&agent.id);
            if e.is_connect() {
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
            if let Ok(v) = HeaderValue::from_str(me) {
                parts.headers.insert("dmsc-node", v);
            }
            let body = guarded(incoming(body), vec![Box::new(in_flight)]);
            return Ok(Response::from_parts(parts, body));
        }
    };
    match failure.blame(watch, me) {
        f @ Failure::Caller(_) => {
            debug!(agent = %agent.id, error = ?f, "the caller's side failed; the agent is not charged");
            Err(f)
        }
        f => {
            observe(false);
            Err(f)
        }
    }
}

/// The agent's card as the mesh serves it (URLs rewritten), with an ETag.
fn serve_card(agent: &LocalAgent, headers: &hyper::HeaderMap, me: &str) -> Response<Body> {
    let etag = format!("\"{}\"", agent.digest);
    let not_modified = headers
        .get(IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut resp = if not_modified {
        let mut r = Response::new(crate::proto::http::empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        Response::new(full(agent.mesh_card.clone()))
    };
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(me) {
        h.insert("dmsc-node", v);
    }
    resp
}

/// Reads until one whole part is available; `None` at a clean end of stream.
async fn read_part(
    recv: &mut StreamRecv,
    decoder: &mut PartDecoder,
) -> Result<Option<Part>, wire::WireError> {
    loop {
        if let Some(p) = decoder.next_part()? {
            return Ok(Some(p));
        }
        let chunk = recv
            .read_chunk(READ_CHUNK)
            .await
            .map_err(|e| wire::WireError::Stream(e.to_string()))?;
        match chunk {
            Some(bytes) => decoder.push(&bytes),
            None => {
                decoder.finish()?;
                return Ok(None);
            }
        }
    }
}

/// The rest of a delegation stream as an HTTP body (data and trailers).
fn stream_body(recv: StreamRecv, decoder: PartDecoder) -> Body {
    let s = futures_util::stream::unfold(Some((recv, decoder)), |state| async move {
        let (mut recv, mut decoder) = state?;
        loop {
            match read_part(&mut recv, &mut decoder).await {
                Ok(Some(Part::Data(d))) => {
                    if d.is_empty() {
                        continue;
                    }
                    return Some((Ok(Frame::data(d)), Some((recv, decoder))));
                }
                Ok(Some(Part::Trailers(t))) => {
                    return Some((
                        Ok(Frame::trailers(wire::from_wire_headers(&t))),
                        Some((recv, decoder)),
                    ));
                }
                Ok(Some(Part::Head(_))) => {
                    let e: BoxError = Box::new(wire::WireError::Unexpected("second head"));
                    return Some((Err(e), None));
                }
                Ok(None) => return None,
                Err(e) => return Some((Err(Box::new(e) as BoxError), None)),
            }
        }
    });
    http_body_util::StreamBody::new(s).boxed()
}

/// Copies an HTTP body into a delegation stream, then finishes it.
/// Copies an HTTP body (data and trailers) into a delegation stream and
/// finishes it. On an error the caller resets the stream.
async fn copy_body(mut body: Body, send: &mut StreamSend) -> Result<(), BoxError> {
    while let Some(frame) = body.frame().await {
        match frame?.into_data() {
            Ok(data) => {
                let mut p = Vec::with_capacity(2);
                wire::encode_data(data, &mut p);
                send.write_chunks(&mut p).await?;
            }
            Err(f) => {
                if let Ok(t) = f.into_trailers() {
                    send.write_chunks(&mut wire::encode_trailers(&t)?.to_vec())
                        .await?;
                }
            }
        }
    }
    send.finish()?;
    Ok(())
}

/// The request body of a streamed remote delegation (runs beside the
/// response read).
async fn pump_body(body: Body, mut send: StreamSend) {
    if let Err(e) = copy_body(body, &mut send).await {
        debug!(error = %e, "body copy into the overlay stopped");
        send.reset(dmsc_transport::overlay::RESET_CANCELLED);
    }
}

async fn write_response(send: &mut StreamSend, resp: Response<Body>) -> Result<(), BoxError> {
    let (parts, body) = resp.into_parts();
    let head = ResponseHead {
        version: DELEGATION_VERSION,
        status: parts.status.as_u16(),
        headers: wire::to_wire_headers(&parts.headers),
        delivered: true,
        failure: None,
    };
    send.write_chunks(&mut wire::encode_response_head(&head)?.to_vec())
        .await?;
    copy_body(body, send).await
}

async fn write_error(
    send: &mut StreamSend,
    e: &MeshError,
    delivered: bool,
    request: Option<&[u8]>,
) -> Result<(), BoxError> {
    let resp = e.response(request);
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await?.to_bytes();
    let head = ResponseHead {
        version: DELEGATION_VERSION,
        status: parts.status.as_u16(),
        headers: wire::to_wire_headers(&parts.headers),
        delivered,
        failure: None,
    };
    let mut p = wire::encode_response_head(&head)?.to_vec();
    wire::encode_data(bytes, &mut p);
    send.write_chunks(&mut p).await?;
    send.finish()?;
    Ok(())
}
