//! Forwarding: one delegation, from a resolved target to an agent's
//! response, as a typed [`Outcome`].
//!
//! The path is one straight line: select (registry, under a read lock) ->
//! admit (this node's circuit for that agent) -> deliver, either to a local
//! agent over the pooled HTTP client ([`local`]) or to the agent's home node
//! over one QUIC bidirectional stream ([`remote`]) -> judge a failure with
//! the retry rules ([`crate::route::attempts`]) -> the outcome, from which
//! metrics and the audit record are made here and the response at the edge
//! (ingress). The home node's side ([`home`]) re-checks the head with the
//! same tenant policy as the ingress against the calling node's verified
//! scope, then delivers with the same [`local::deliver_local`]. A policy
//! refusal (403) comes back not delivered; it is neither retried elsewhere
//! (every home node judges the same certificate) nor charged to the agent,
//! and both nodes audit it as a denial.
//!
//! Blame: a failure the caller caused (its streamed body failed, or it
//! stalled its upload past the deadline; see [`fault`]) is answered to the
//! caller and charged to no agent: neither this node's circuit for the agent
//! nor the agent's error rate hears of it. The home node judges the same way
//! for the stream it receives from the calling node.
//!
//! Deadlines: the deadline bounds the wait for the response head at every
//! hop (the home node receives what is left of it and enforces it itself,
//! reporting where it ran out); a streamed response body then flows for as
//! long as the agent sends it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dmsc_registry::{AgentId, SelectError, Target};
use dmsc_transport::Overlay;
use http_body_util::BodyExt;
use hyper::Method;
use tokio::time::Instant;
use tracing::{debug, warn, Instrument};

use crate::config::DelegationConfig;
use crate::proto::http::{full, Body, ErrorKind, MeshError};
use crate::proto::outcome::{Failure, Outcome, Served};
use crate::proto::wire::{RequestHeadRef, DELEGATION_VERSION};
use crate::route::attempts::{Attempts, Charge, Next};
use crate::route::MeshView;
use body::guarded;
use client::Upstream;
use fault::BodyWatch;
use local::{deliver_local, LocalAgents, ToAgent, CARD_PATHS};

pub(crate) mod body;
pub mod budget;
pub mod client;
mod extended;
pub mod fault;
pub mod h1;
mod home;
pub mod local;
pub mod mask;
mod remote;

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
    /// The target's tenant.
    pub tenant: String,
    pub caller: String,
    /// The caller's tenant (another than `tenant` for a cross-tenant call
    /// that both tenants' policies allow).
    pub caller_tenant: String,
    /// The request's data tags, sorted and deduplicated.
    pub data_tags: Vec<String>,
    pub target: Target,
    pub deadline: Instant,
    /// The caller asked for less time than the node's default timeout: a
    /// timeout is then its choice and not charged to the agent (else one
    /// client with `dmsc-timeout: 1ms` could open an agent's circuit for
    /// every caller).
    pub short_deadline: bool,
    pub trace_id: String,
    pub method: Method,
    pub path: String,
    pub http2: bool,
    pub headers: hyper::HeaderMap,
    pub body: ReqBody,
    /// For an intent: the query's embedding (made before selection, off
    /// the registry's lock); `None`: lexical ranking.
    pub intent: Option<crate::intent::QueryVector>,
    /// Why the target was chosen before selection (a follow-up of an
    /// intent-routed task), put before selection's own reason in
    /// `dmsc-route`.
    pub route_note: Option<String>,
    /// The A2A protocol binding (`JSONRPC`, `HTTP+JSON`, `GRPC`) and
    /// version of the request: an intent goes only to agents that serve
    /// both.
    pub speaks: dmsc_registry::Speaks<'static>,
}

/// The delegation engine of a node (shared by ingress and the overlay side).
#[derive(Debug)]
pub struct Delegator {
    pub(crate) me: String,
    pub(crate) mesh: Arc<MeshView>,
    pub(crate) agents: Arc<LocalAgents>,
    pub(crate) upstream: Upstream,
    pub(crate) overlay: Overlay,
    pub(crate) cfg: DelegationConfig,
    pub(crate) metrics: crate::metrics::DelegationMetrics,
    /// The node's budget for bodies held in memory: request bodies buffered
    /// at ingress, and responses held back until whole (see [`remote`]).
    pub(crate) budget: Arc<budget::BodyBudget>,
    /// Audit trail (and the rest of the node's security state).
    pub(crate) security: Arc<crate::security::Security>,
    /// This node's region (a tenant policy may keep data tags inside it).
    pub(crate) region: String,
    /// Tenant limits: a target's limit is checked here, on its home node.
    pub(crate) limiter: Arc<crate::limits::Limiter>,
    /// Routing by intent: the model, asks, learned examples.
    pub(crate) intent: Arc<crate::intent::Intent>,
    /// The node's shutdown state: delegations from peers are refused once
    /// it drains, and counted while they run.
    pub(crate) drain: Arc<crate::drain::Drain>,
}

/// A request that may safely be sent again: an idempotent method, or any
/// method with an `Idempotency-Key` (the caller vouches that the agent
/// deduplicates by it; draft-ietf-httpapi-idempotency-key-header).
fn idempotent(m: &Method, headers: &hyper::HeaderMap) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS
    ) || headers.contains_key(IDEMPOTENCY_KEY)
}

const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The caller id of a node's own requests (card fetches): exempt from the
/// tenants' target limits.
pub(crate) const NODE_CALLER: &str = "node:";

fn select_error(me: &str, tenant: &str, target: &Target, e: SelectError) -> MeshError {
    let kind = match &e {
        SelectError::UnknownAgent { .. } => ErrorKind::UnknownAgent,
        SelectError::NoMatch { .. } | SelectError::NoBinding { .. } => ErrorKind::NoMatch,
        _ => ErrorKind::NoneAvailable,
    };
    // The registry's messages already name the tenant and the target.
    let mut err = MeshError::new(kind, me, e.to_string());
    if let Target::Agent(name) = target {
        err = err.agent(AgentId::new(tenant, name.as_str()));
    }
    if kind == ErrorKind::NoneAvailable {
        // Unhealthy or behind an open circuit: worth asking again soon.
        err = err.retry_after(Duration::from_secs(1));
    }
    err
}

pub(crate) fn describe(target: &Target) -> String {
    match target {
        Target::Agent(n) => format!("agent:{n}"),
        Target::Tag(t) => format!("tag:{t}"),
        Target::Intent(_) => "intent".to_string(),
    }
}

impl Delegator {
    /// Routes one delegation; records its metrics and audit entry from the
    /// outcome, which the caller's edge renders.
    pub async fn delegate(&self, d: Delegation) -> Outcome {
        let target = describe(&d.target);
        let span = tracing::info_span!("delegation", tenant = %d.tenant, target = %target, trace = %d.trace_id);
        let tenant = d.tenant.clone();
        // Kept for the audit record only when there is an audit log.
        let audited = self
            .security
            .audit
            .is_some()
            .then(|| (d.caller.clone(), d.trace_id.clone()));
        let started = std::time::Instant::now();
        let (caller_tenant, caller_id) = (d.caller_tenant.clone(), d.caller.clone());
        let outcome = self.run(d).instrument(span.clone()).await;
        let outcome = self
            .mask_response(&caller_id, &caller_tenant, &tenant, &target, outcome)
            .instrument(span)
            .await;
        self.metrics
            .record(&tenant, outcome.label(), started.elapsed());
        if let Some((caller, trace)) = audited {
            let served = outcome.served();
            self.security.record(dmsc_audit::Event::tenant(
                tenant,
                dmsc_audit::Delegation {
                    caller,
                    target,
                    route: served.map(|s| s.why.clone()).unwrap_or_default(),
                    agent: served.map(|s| s.agent.to_string()),
                    serving_node: served.map(|s| s.node.clone()),
                    outcome: outcome.label().to_string(),
                    status: Some(outcome.status().as_u16()),
                    duration_ms: started.elapsed().as_millis() as u64,
                    trace_id: Some(trace),
                },
            ));
        }
        outcome
    }

    /// The attempts of one delegation, with no metrics or audit of its own
    /// (background card fetches use it directly).
    async fn run(&self, d: Delegation) -> Outcome {
        let Delegation {
            tenant,
            caller,
            caller_tenant,
            data_tags,
            target,
            deadline,
            short_deadline,
            trace_id,
            method,
            path,
            http2,
            headers,
            body,
            intent,
            route_note,
            speaks,
        } = d;
        let request_bytes = match &body {
            ReqBody::Buffered(b) => Some(b.clone()),
            ReqBody::Streaming(_) => None,
        };
        // A streamed body goes to one agent only, so one watch covers it.
        let watch = BodyWatch::default();
        let mut streaming = match body {
            ReqBody::Streaming(b) => Some(watch.watch(b)),
            ReqBody::Buffered(_) => None,
        };
        let mut plan = Attempts::new(
            self.cfg.retries,
            request_bytes.is_some(),
            idempotent(&method, &headers),
        );
        let mut refused: Option<crate::policy::Denial> = None;
        // The caller's tenant's masking rules, for data leaving it; the
        // masked body is kept for the situation it was made for.
        let consumer = self.security.policies.get(&caller_tenant);
        let provider = if caller_tenant == tenant {
            consumer.clone()
        } else {
            self.security.policies.get(&tenant)
        };
        let mut masked_for: Option<(dmsc_policy::Situation, Bytes)> = None;
        let mut headers = headers;
        loop {
            if !plan.begin() {
                return Outcome::Failed(plan.exhausted(&self.me));
            }
            if Instant::now() >= deadline {
                return Outcome::Failed(MeshError::new(
                    ErrorKind::Timeout,
                    &self.me,
                    "the deadline passed before an agent answered",
                ));
            }
            let selection = {
                let reg = self.mesh.read();
                reg.select_bound(
                    &tenant,
                    &target,
                    intent.as_ref().map(|q| &*q.vector),
                    speaks,
                    &*self.mesh,
                    plan.excluded(),
                    &mut rand::thread_rng(),
                )
                .map(|sel| {
                    // The tenant policy for the agent picked (its name and
                    // tags), under the same read of the registry.
                    // Tags only matter to a policy's rules: none, no lookup.
                    let tags = if consumer.is_none() && provider.is_none() {
                        Vec::new()
                    } else {
                        agent_tags(&reg, &sel.id)
                    };
                    // Only the consumer's policy has region rules (its gate
                    // and its masking): without one, no need to know.
                    let cross_region = consumer.is_some() && self.crosses_region(&sel.node);
                    let verdict = crate::policy::outbound(
                        consumer.as_deref(),
                        provider.as_deref(),
                        crate::policy::Route {
                            caller: &caller,
                            caller_tenant: &caller_tenant,
                            tenant: &tenant,
                            target: dmsc_policy::Addressed::Agent {
                                name: &sel.id.name,
                                tags: &tags,
                            },
                            data_tags: &data_tags,
                            crosses_region: cross_region,
                        },
                    );
                    (sel, verdict, cross_region)
                })
            };
            let (sel, cross_region) = match selection {
                Ok((mut s, Ok(()), cross_region)) => {
                    if let Some(note) = &route_note {
                        s.why = format!("{note}; {}", s.why);
                    }
                    if intent.as_ref().is_some_and(|q| q.truncated) {
                        s.why.push_str("; query truncated to the model's window");
                    }
                    (s, cross_region)
                }
                Ok((s, Err(denial), _)) => {
                    // Not this agent; another that the policy allows may
                    // serve (a capability exported by some agents only).
                    // Not an attempt: the retry budget is for failures.
                    plan.pass_over(s.id);
                    refused.get_or_insert(denial);
                    continue;
                }
                Err(e) => {
                    if let Some(denial) = refused {
                        return Outcome::Failed(self.refuse(
                            &caller,
                            &tenant,
                            describe(&target),
                            denial,
                        ));
                    }
                    let mut e = select_error(&self.me, &tenant, &target, e);
                    // A named agent whose home node just went away is not
                    // unknown: it may be back (or elsewhere) soon.
                    if let (ErrorKind::UnknownAgent, Target::Agent(name)) = (e.kind, &target) {
                        let id = AgentId::new(&tenant, name.as_str());
                        if let Some((node, ago)) = self.mesh.recently_gone(&id) {
                            e = MeshError::new(
                                ErrorKind::NoneAvailable,
                                &self.me,
                                format!(
                                    "agent `{id}`: its home node `{node}` went away {}s ago (down or left, as gossip sees it), and no other node serves it; retry later",
                                    ago.as_secs()
                                ),
                            )
                            .agent(&id)
                            .retry_after(Duration::from_secs(1));
                        }
                    }
                    return Outcome::Failed(plan.no_candidate(&self.me, e));
                }
            };
            let id = sel.id.clone();
            if !self.mesh.admit(&id) || !self.mesh.admit_path(&sel.node) {
                plan.skip(id);
                continue;
            }
            let situation = mask::situation(&caller_tenant, &tenant, cross_region, false);
            let masking = consumer.as_deref().and_then(|p| p.masking(situation));
            let request_bytes = match (masking, &request_bytes) {
                (None, _) => request_bytes.clone(),
                (Some(_), Some(_)) if masked_for.as_ref().is_some_and(|(s, _)| *s == situation) => {
                    masked_for.as_ref().map(|(_, b)| b.clone())
                }
                (Some(m), Some(b)) => {
                    let mut counts = dmsc_mask::Counts::new();
                    match mask::request(m, &headers, b, &mut counts) {
                        Ok(out) => {
                            if out.is_some() {
                                // The agent gets the masked length.
                                headers.remove(hyper::header::CONTENT_LENGTH);
                            }
                            let out = out.unwrap_or_else(|| b.clone());
                            self.audit_masked(
                                &caller_tenant,
                                &caller,
                                &target,
                                "request",
                                "masked",
                                &counts,
                                None,
                            );
                            masked_for = Some((situation, out.clone()));
                            Some(out)
                        }
                        Err(e) => {
                            let e = mask::unmaskable(&self.me, &caller_tenant, "request", &e);
                            self.audit_masked(
                                &caller_tenant,
                                &caller,
                                &target,
                                "request",
                                "refused",
                                &counts,
                                Some(&e.detail),
                            );
                            return Outcome::Failed(e);
                        }
                    }
                }
                (Some(m), None) => {
                    // A body too large to buffer cannot be masked.
                    if m.refuse_unparseable {
                        let e = MeshError::new(
                            ErrorKind::TooLarge,
                            &self.me,
                            format!(
                                "tenant `{caller_tenant}`'s policy requires masking the request, whose body is over the {}-byte buffer limit (rule `{caller_tenant}:mask`)",
                                self.cfg.max_buffered_body
                            ),
                        );
                        self.audit_masked(
                            &caller_tenant,
                            &caller,
                            &target,
                            "request",
                            "refused",
                            &dmsc_mask::Counts::new(),
                            Some(&e.detail),
                        );
                        return Outcome::Failed(e);
                    }
                    None
                }
            };
            let body = match &request_bytes {
                Some(b) => ReqBody::Buffered(b.clone()),
                None => match streaming.take() {
                    Some(b) => ReqBody::Streaming(b),
                    None => return Outcome::Failed(plan.exhausted(&self.me)),
                },
            };
            // A local agent's own limit is checked here (this node is its
            // home); a remote one's on its home node.
            let mut target_permit = None;
            if sel.node == self.me && !caller.starts_with(NODE_CALLER) {
                match self.limiter.admit_target(&tenant, &caller, &id.name) {
                    Ok(p) => target_permit = p,
                    Err(e) => {
                        debug!(agent = %id, error = %e, "target rate limit");
                        match plan.failed(id.clone(), Failure::NotDelivered(e)).next {
                            Next::Retry => continue,
                            Next::Stop(e) => return Outcome::Failed(e),
                        }
                    }
                }
            }
            let (_, outstanding) = self.mesh.begin(&id);
            debug!(agent = %id, node = %sel.node, attempt = plan.made(), why = %sel.why, "delegating");
            let result = if sel.node == self.me {
                let local = self.agents.get(&id);
                if let Some(agent) = &local {
                    // This node is the agent's home: its config's accept list.
                    if let Err(denial) = crate::policy::config_accepts(
                        &caller,
                        &caller_tenant,
                        &tenant,
                        &id.name,
                        agent.spec.accepts.as_deref(),
                        &data_tags,
                    ) {
                        return Outcome::Failed(self.refuse(
                            &caller,
                            &tenant,
                            describe(&target),
                            denial,
                        ));
                    }
                }
                match local {
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
                                short_deadline,
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
                let head = RequestHeadRef {
                    version: DELEGATION_VERSION,
                    tenant: &tenant,
                    caller: &caller,
                    agent: &id.name,
                    deadline_ms: deadline
                        .saturating_duration_since(Instant::now())
                        .as_millis() as u64,
                    trace_id: &trace_id,
                    method: method.as_str(),
                    path: &path,
                    http: if http2 { 2 } else { 1 },
                    headers: &headers,
                    empty_body: matches!(&body, ReqBody::Buffered(b) if b.is_empty()),
                    caller_tenant: &caller_tenant,
                    data_tags: &data_tags,
                };
                self.deliver_remote(&sel.node, &id, head, body, deadline, &plan)
                    .await
            };
            let failure = match result {
                Ok(resp) => {
                    // An answer to a request whose body then failed says
                    // nothing about the agent.
                    if !watch.failed() {
                        self.mesh
                            .record_outcome(&id, !resp.status().is_server_error());
                    }
                    debug!(agent = %id, node = %sel.node, status = resp.status().as_u16(), attempt = plan.made(), "delegated");
                    let served = Served {
                        agent: id,
                        node: sel.node,
                        why: sel.why,
                        attempts: plan.made(),
                    };
                    let mut guards: Vec<Box<dyn Send + Sync>> = vec![Box::new(outstanding)];
                    if let Some(p) = target_permit {
                        guards.push(Box::new(p));
                    }
                    return Outcome::Served(served, resp.map(|b| guarded(b, guards)));
                }
                Err(f) => local::blame(f, &watch, &self.me),
            };
            // A home node's refusal by the target's limit crosses the
            // overlay without its wait; this node knows the same limits.
            let failure = match failure {
                Failure::NotDelivered(e)
                    if e.kind == ErrorKind::RateLimited && e.retry_after.is_none() =>
                {
                    let wait = self.limiter.target_wait(&tenant, &id.name);
                    Failure::NotDelivered(e.retry_after(wait))
                }
                // A home node that is full or shutting down: soon, or elsewhere.
                Failure::NotDelivered(e)
                    if e.kind == ErrorKind::Overloaded && e.retry_after.is_none() =>
                {
                    Failure::NotDelivered(e.retry_after(Duration::from_secs(1)))
                }
                f => f,
            };
            let home_refused = matches!(&failure, Failure::NotDelivered(e)
                if matches!(e.kind, ErrorKind::Forbidden | ErrorKind::PolicyViolation));
            if home_refused {
                let e = failure.error();
                warn!(agent = %id, node = %sel.node, error = %e, "refused by the home node's tenant policy");
                self.security.record(dmsc_audit::Event::tenant(
                    tenant.clone(),
                    dmsc_audit::Denied {
                        caller: caller.clone(),
                        target: format!("agent:{}", id.name),
                        reason: format!("home node `{}` refused: {}", sel.node, e.detail),
                        rule: rule_of(&e.detail),
                    },
                ));
            }
            if matches!(failure, Failure::Caller(_)) {
                debug!(agent = %id, node = %sel.node, error = %failure.error(), "the caller's side failed; the agent is not charged");
            }
            let callers_timeout = short_deadline && failure.error().kind == ErrorKind::Timeout;
            if callers_timeout {
                debug!(agent = %id, node = %sel.node, "timed out within the caller's own short deadline; the agent is not charged");
            }
            let why = failure.error().detail.clone();
            let verdict = plan.failed(id.clone(), failure);
            match verdict.charge {
                Charge::Agent if !callers_timeout => self.mesh.record_outcome(&id, false),
                Charge::Path if !callers_timeout => self.mesh.record_path(&sel.node, false),
                Charge::Agent | Charge::Path | Charge::Nobody => {}
            }
            match verdict.next {
                Next::Retry => {
                    warn!(agent = %id, node = %sel.node, error = %why, "failed; trying the next candidate");
                    self.metrics.retries.inc();
                }
                Next::Stop(e) => return Outcome::Failed(e),
            }
        }
    }
}

pub(crate) use crate::route::agent_tags;

/// The rule a refusal's text names (`... (rule `acme:export`)`), for the
/// audit entry of a refusal that came back from a home node.
pub(crate) fn rule_of(detail: &str) -> Option<String> {
    let start = detail.rfind("(rule `")? + "(rule `".len();
    let end = start + detail.get(start..)?.find('`')?;
    Some(detail.get(start..end)?.to_string())
}

impl Delegator {
    /// Records what masking did to one body (nothing when no rule masked
    /// anything and nothing was refused).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn audit_masked(
        &self,
        tenant: &str,
        caller: &str,
        target: &Target,
        direction: &str,
        outcome: &str,
        counts: &dmsc_mask::Counts,
        reason: Option<&str>,
    ) {
        if counts.is_empty() && reason.is_none() {
            return;
        }
        self.security.record(dmsc_audit::Event::tenant(
            tenant.to_string(),
            dmsc_audit::Masked {
                direction: direction.to_string(),
                caller: caller.to_string(),
                target: describe(target),
                outcome: outcome.to_string(),
                masked: counts.as_map().clone(),
                reason: reason.map(str::to_string),
            },
        ));
    }

    /// Masks a response served by a local agent for a caller of this node
    /// (a remote agent's response was masked by its home node, which sends
    /// nothing unmasked over the overlay: [`Self::mask_answer`]).
    async fn mask_response(
        &self,
        caller: &str,
        caller_tenant: &str,
        tenant: &str,
        target: &str,
        outcome: Outcome,
    ) -> Outcome {
        let Outcome::Served(served, resp) = outcome else {
            return outcome;
        };
        if served.node != self.me {
            return Outcome::Served(served, resp);
        }
        let me = self.me.clone();
        match self
            .mask_answer(caller, caller_tenant, tenant, target, &me, resp)
            .await
        {
            Ok(resp) => Outcome::Served(served, resp),
            Err(e) => Outcome::Failed(e),
        }
    }

    /// Masks an agent's answer by its tenant's rules with `responses =
    /// true`, when they apply to where it goes (to a caller of
    /// `caller_tenant` on node `to`); audits the counts, or the refusal.
    pub(crate) async fn mask_answer(
        &self,
        caller: &str,
        caller_tenant: &str,
        tenant: &str,
        target: &str,
        to: &str,
        resp: hyper::Response<crate::proto::http::Body>,
    ) -> Result<hyper::Response<crate::proto::http::Body>, MeshError> {
        let Some(provider) = self.security.policies.get(tenant) else {
            return Ok(resp);
        };
        let situation = mask::situation(caller_tenant, tenant, self.crosses_region(to), true);
        let Some(m) = provider.masking(situation).cloned() else {
            return Ok(resp);
        };
        drop(provider);
        let security = self.security.clone();
        let (t, c, tg) = (tenant.to_string(), caller.to_string(), target.to_string());
        let done: mask::OnDone = Box::new(move |counts: &dmsc_mask::Counts| {
            if counts.is_empty() {
                return;
            }
            security.record(dmsc_audit::Event::tenant(
                t,
                dmsc_audit::Masked {
                    direction: "response".into(),
                    caller: c,
                    target: tg,
                    outcome: "masked".into(),
                    masked: counts.as_map().clone(),
                    reason: None,
                },
            ));
        });
        let masked = mask::response(
            m,
            self.me.clone(),
            tenant.to_string(),
            resp,
            self.cfg.max_buffered_body,
            done,
        )
        .await;
        if let Err(e) = &masked {
            self.security.record(dmsc_audit::Event::tenant(
                tenant.to_string(),
                dmsc_audit::Masked {
                    direction: "response".into(),
                    caller: caller.to_string(),
                    target: target.to_string(),
                    outcome: "refused".into(),
                    masked: Default::default(),
                    reason: Some(e.detail.clone()),
                },
            ));
        }
        masked
    }

    /// True when `node` announced another region than this node's (a node
    /// not seen yet counts as elsewhere: the gate fails closed).
    pub(crate) fn crosses_region(&self, node: &str) -> bool {
        node != self.me && !self.mesh.in_region(node, &self.region)
    }

    /// Renders a tenant-policy refusal of the calling node: audited here,
    /// 403 for the caller (`policy_violation` for a data-tag rule).
    pub(crate) fn refuse(
        &self,
        caller: &str,
        tenant: &str,
        target: String,
        denial: crate::policy::Denial,
    ) -> MeshError {
        let reason = denial.to_string();
        self.security.record(dmsc_audit::Event::tenant(
            tenant.to_string(),
            dmsc_audit::Denied {
                caller: caller.to_string(),
                target,
                reason: reason.clone(),
                rule: denial.rule().map(str::to_string),
            },
        ));
        let kind = if denial.is_tag_violation() {
            ErrorKind::PolicyViolation
        } else {
            ErrorKind::Forbidden
        };
        MeshError::new(kind, &self.me, reason)
    }
}

/// Why a card could not be fetched through the mesh.
#[derive(Debug, thiserror::Error)]
pub enum CardFetchError {
    #[error(transparent)]
    Mesh(#[from] MeshError),
    #[error("the home node answered {0}")]
    Status(hyper::StatusCode),
    #[error("reading the card: {0}")]
    Body(String),
    #[error("card of {0} bytes is too large")]
    TooLarge(usize),
    #[error(transparent)]
    Card(#[from] dmsc_registry::CardError),
}

/// Fetches a remote agent's card through the mesh (from its home node,
/// which serves it from its cache with the mesh URLs). A background fetch,
/// not a delegation: it appears in neither the metrics nor the audit log.
pub async fn fetch_card(
    d: &Delegator,
    id: &AgentId,
) -> Result<dmsc_registry::AgentCard, CardFetchError> {
    let outcome = d
        .run(Delegation {
            tenant: id.tenant.clone(),
            caller: format!("{NODE_CALLER}{}", d.me),
            caller_tenant: id.tenant.clone(),
            data_tags: Vec::new(),
            target: Target::Agent(id.name.clone()),
            deadline: Instant::now() + Duration::from_secs(3),
            short_deadline: false,
            trace_id: format!("{:032x}", rand::random::<u128>()),
            method: Method::GET,
            path: CARD_PATHS[0].to_string(),
            http2: false,
            headers: hyper::HeaderMap::new(),
            body: ReqBody::Buffered(Bytes::new()),
            intent: None,
            route_note: None,
            speaks: dmsc_registry::Speaks::default(),
        })
        .await;
    let resp = match outcome {
        Outcome::Served(_, resp) => resp,
        Outcome::Failed(e) => return Err(e.into()),
    };
    if !resp.status().is_success() {
        return Err(CardFetchError::Status(resp.status()));
    }
    // (Not `Limited`: its boxed error trips rustc's Send check in spawned
    // futures; the home node serves a card it already validated, so a
    // plain collect with a size check after is enough.)
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| CardFetchError::Body(e.to_string()))?
        .to_bytes();
    if body.len() > 1 << 20 {
        return Err(CardFetchError::TooLarge(body.len()));
    }
    Ok(dmsc_registry::AgentCard::parse(&body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idempotency_key_makes_any_method_idempotent() {
        let none = hyper::HeaderMap::new();
        let mut keyed = hyper::HeaderMap::new();
        keyed.insert("Idempotency-Key", "\"8e03978e\"".parse().expect("value"));
        for m in [Method::GET, Method::HEAD, Method::PUT, Method::DELETE] {
            assert!(idempotent(&m, &none), "{m}");
        }
        for m in [Method::POST, Method::PATCH] {
            assert!(!idempotent(&m, &none), "{m}");
            assert!(idempotent(&m, &keyed), "{m} with a key");
        }
    }
}
