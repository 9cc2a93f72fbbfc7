//! The home node's side of a delegation: a peer node opened a stream to
//! reach one of this node's agents. The head is read, the same tenant
//! policy as at the ingress runs against the calling node's verified
//! certificate scope ([`crate::policy::inbound`]), and the request goes to
//! the agent with [`deliver_local`], under this node's own deadline ceiling.
//! Failures go back typed (wire version 2) or rendered (version 1 callers),
//! in the version of the request; every inbound delegation is counted and
//! audited here too.

use std::time::Duration;

use dmsc_registry::AgentId;
use dmsc_transport::{BiStream, StreamSend};
use http_body_util::BodyExt;
use hyper::{Method, Response};
use tokio::time::Instant;
use tracing::{debug, warn, Instrument};

use super::fault::BodyWatch;
use super::local::{deliver_local, ToAgent};
use super::remote::{ended_already, read_part, send_body, stream_body, CopyStopped};
use super::Delegator;
use crate::proto::http::{Body, BoxError, ErrorKind, MeshError};
use crate::proto::outcome::Failure;
use crate::proto::wire::{self, Part, PartDecoder, ResponseHead, OLDEST_VERSION};

/// How long a home node waits for the head of an incoming delegation.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a home node waits for the calling node to acknowledge the end
/// of an answer before it lets the stream go.
const ACK_WAIT: Duration = Duration::from_secs(2);

impl Delegator {
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
        let mut head = match head {
            Ok(h) => h,
            Err(e) => {
                warn!(peer = %peer, error = %e, "refused delegation");
                let me = MeshError::new(ErrorKind::BadRequest, &self.me, e.to_string());
                // Unreadable: answer in the oldest version, which every peer reads.
                let _ = write_error(&mut send, &me, false, OLDEST_VERSION).await;
                return;
            }
        };
        let version = head.version;
        // Shutting down: not delivered, so the calling node tries another
        // candidate (it stops choosing this node once gossip says it left).
        if self.drain.is_draining() {
            let me = MeshError::new(
                ErrorKind::Overloaded,
                &self.me,
                format!(
                    "node {} is shutting down and takes no new delegations",
                    self.me
                ),
            );
            debug!(peer = %peer, agent = %head.agent, "draining: refused a new delegation");
            let _ = write_error(&mut send, &me, false, version).await;
            self.metrics
                .record_inbound(crate::metrics::OTHER_TENANT, "draining");
            return;
        }
        // Counted in the node's drain until the answer is acknowledged.
        let _work = self.drain.begin();
        let id = AgentId {
            tenant: head.tenant.clone(),
            name: head.agent.clone(),
        };
        let span =
            tracing::info_span!("delegation-in", from = %peer, agent = %id, trace = %head.trace_id);
        let started = Instant::now();
        let (outcome, status) = async {
            // Destination-side check: the caller's tenant within the calling
            // node's certificate scope, the target our own agent, and the
            // tenant policy (exports, imports, data tags) as this node holds it.
            let decision = crate::policy::inbound(
                &self.me,
                crate::policy::Inbound {
                    node: &peer,
                    scope: scope.as_deref(),
                    tenant: &head.tenant,
                    caller_tenant: &head.caller_tenant,
                    agent: &head.agent,
                    caller: &head.caller,
                },
                || self.agents.get(&id),
            )
            .and_then(|agent| {
                let policies = &self.security.policies;
                let provider = policies.get(&head.tenant);
                let consumer = if head.caller_tenant == head.tenant {
                    provider.clone()
                } else {
                    policies.get(&head.caller_tenant)
                };
                // Tags only matter to a policy's rules: none, no lookup.
                let tags = if consumer.is_none() && provider.is_none() {
                    Vec::new()
                } else {
                    super::agent_tags(&self.mesh.read(), &id)
                };
                crate::policy::outbound(
                    consumer.as_deref(),
                    provider.as_deref(),
                    crate::policy::Route {
                        caller: &head.caller,
                        caller_tenant: &head.caller_tenant,
                        tenant: &head.tenant,
                        target: dmsc_policy::Addressed::Agent {
                            name: &head.agent,
                            tags: &tags,
                        },
                        data_tags: &head.data_tags,
                        // Only the consumer's policy has region rules.
                        crosses_region: consumer.is_some() && self.crosses_region(&peer),
                    },
                )
                .and_then(|()| {
                    crate::policy::config_accepts(
                        &head.caller,
                        &head.caller_tenant,
                        &head.tenant,
                        &head.agent,
                        agent.spec.accepts.as_deref(),
                        &head.data_tags,
                    )
                })
                .map(|()| agent)
            });
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
                                rule: denial.rule().map(str::to_string),
                            },
                        ));
                        if denial.is_tag_violation() {
                            ErrorKind::PolicyViolation
                        } else {
                            ErrorKind::Forbidden
                        }
                    } else {
                        ErrorKind::UnknownAgent
                    };
                    let me = MeshError::new(kind, &self.me, denial.to_string()).agent(&id);
                    let _ = write_error(&mut send, &me, false, version).await;
                    return (
                        me.kind.as_str().to_string(),
                        Some(me.kind.status().as_u16()),
                    );
                }
            };
            // The target's own limit: this node sees every request to it.
            // Held until the response is written.
            // A node's own fetches (cards) are not the tenant's requests.
            // Only the calling node's own (its verified name), not any
            // `node:` a head claims.
            let own = head.caller.strip_prefix(super::NODE_CALLER) == Some(&*peer);
            let _permit = match (!own)
                .then(|| {
                    self.limiter
                        .admit_target(&head.tenant, &head.caller, &head.agent)
                })
                .transpose()
            {
                Ok(p) => p.flatten(),
                Err(e) => {
                    let e = e.agent(&id);
                    let _ = write_error(&mut send, &e, false, version).await;
                    return (e.kind.as_str().to_string(), Some(e.kind.status().as_u16()));
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
                let _ = write_error(&mut send, &me, false, version).await;
                return (
                    me.kind.as_str().to_string(),
                    Some(me.kind.status().as_u16()),
                );
            };
            let headers = std::mem::take(&mut head.headers);
            // The calling node is this side's caller: a stream it cuts or
            // garbles is its failure, not the agent's.
            let watch = BodyWatch::default();
            let body = if head.empty_body {
                // Take the stream's end if it came with the head, so that
                // dropping it later sends the peer nothing.
                ended_already(&mut recv, &mut decoder);
                crate::proto::http::empty()
            } else {
                let declared = super::remote::declared_len(&headers);
                watch.watch(stream_body(recv, decoder, declared))
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
                    // The head carries what is left of the caller's
                    // deadline (less after a hop or a retry): well under
                    // the default is the caller's own short one.
                    short_deadline: budget < self.cfg.timeout / 2,
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
            // The agent's tenant masks what its agents answer before it
            // leaves this node (`responses = true` rules).
            let result = match result {
                Ok(resp) => self
                    .mask_answer(
                        &head.caller,
                        &head.caller_tenant,
                        &head.tenant,
                        &format!("agent:{}", head.agent),
                        &peer,
                        resp,
                    )
                    .await
                    .map_err(Failure::MaybeDelivered),
                Err(f) => Err(f),
            };
            match result {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let outcome = if resp.status().is_server_error() {
                        "agent-error"
                    } else {
                        "ok"
                    };
                    match write_response(&mut send, resp, version).await {
                        Ok(()) => (outcome.to_string(), Some(status)),
                        // The caller gave up mid-response (cancelled, went
                        // away): the agent's response was dropped at once,
                        // which cancels its work (hyper resets its HTTP/2
                        // stream or closes its HTTP/1.1 connection). Counted
                        // as before the head; the agent is not blamed.
                        Err(CopyStopped::PeerGone) => {
                            send.reset(dmsc_transport::overlay::RESET_CANCELLED);
                            debug!("caller gave up mid-response");
                            ("cancelled".to_string(), Some(status))
                        }
                        Err(CopyStopped::Failed(e)) => {
                            // Reset, never finish: a cut-off body must not look complete.
                            send.reset(dmsc_transport::overlay::RESET_CANCELLED);
                            debug!(error = %e, "response copy stopped (agent or caller went away)");
                            ("cut-off".to_string(), Some(status))
                        }
                    }
                }
                Err(f) => {
                    let e = f.error();
                    let _ = write_error(&mut send, e, f.maybe_delivered(), version).await;
                    (e.kind.as_str().to_string(), Some(e.kind.status().as_u16()))
                }
            }
        }
        .instrument(span)
        .await;
        // The serving side keeps its own record of every delegation it was
        // asked for: who (as the calling node vouched, over a verified
        // overlay connection) reached which of its agents, and how it went.
        // Labelled by tenant only for this node's own agents: a tenant name
        // a peer made up must not add label sets to the metrics for good.
        let tenant_label = if self.agents.get(&id).is_some() {
            head.tenant.as_str()
        } else {
            crate::metrics::OTHER_TENANT
        };
        self.metrics.record_inbound(tenant_label, &outcome);
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
        // Finished is not received: a node that closes its overlay right
        // after the last byte was written would lose what is still unacked.
        // Waiting for the acknowledgement (one round trip) keeps the drain
        // count up until the calling node has the whole answer.
        let _ = tokio::time::timeout(ACK_WAIT, send.stopped()).await;
    }
}

/// The agent's response, in the version of the request.
async fn write_response(
    send: &mut StreamSend,
    resp: Response<Body>,
    version: u8,
) -> Result<(), CopyStopped> {
    let (parts, body) = resp.into_parts();
    let head = ResponseHead {
        version,
        status: parts.status.as_u16(),
        headers: parts.headers,
        delivered: true,
        failure: None,
    };
    let head = wire::encode_response_head(&head).map_err(|e| CopyStopped::Failed(e.into()))?;
    send_body(head.to_vec(), body, send).await
}

/// A failure of this node's, typed (version 2) or, for a version 1
/// caller, rendered into status, headers and a problem-details body.
async fn write_error(
    send: &mut StreamSend,
    e: &MeshError,
    delivered: bool,
    version: u8,
) -> Result<(), BoxError> {
    let mut p = if version >= 2 {
        let head = ResponseHead {
            version,
            status: e.kind.status().as_u16(),
            headers: hyper::HeaderMap::new(),
            delivered,
            failure: Some(e.to_wire()),
        };
        wire::encode_response_head(&head)?.to_vec()
    } else {
        let (parts, body) = e.response(None).into_parts();
        let bytes = body.collect().await?.to_bytes();
        let head = ResponseHead {
            version,
            status: parts.status.as_u16(),
            headers: parts.headers,
            delivered,
            failure: None,
        };
        let mut p = wire::encode_response_head(&head)?.to_vec();
        wire::encode_data(bytes, &mut p);
        p
    };
    send.write_chunks(&mut p).await?;
    send.finish()?;
    Ok(())
}
