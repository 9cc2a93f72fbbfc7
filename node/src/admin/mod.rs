//! The admin HTTP API (localhost by default): `/live`, `/ready`, `/metrics`,
//! `/v1/status`, and `/v1/agents` (GET the agent table, POST
//! `{"tenant","url","name"?}` to onboard an agent, DELETE
//! `/v1/agents/<tenant>/<name>` to remove one), `/v1/tokens` (POST
//! `{"tenant","agent","ttl_secs"?}`: a one-time join token), `/v1/revocations`
//! (GET the list, POST a statement from `dmsc-node ca revoke`),
//! `/v1/tenant-keys` (GET each tenant's key ids and statements, POST a
//! statement from `dmsc-node tenant rotate-key|delete`), and
//! `/v1/check` (clock skew and reachability of every peer), `/v1/intercept`
//! (interception bindings, [`intercept`]), `/v1/audit`
//! (recent audit entries, [`audit`]) and `/v1/admin-tokens` (POST
//! `{"tenant","read_only":true,"ttl_secs"?}`: a tenant read token; GET the
//! list; DELETE `/v1/admin-tokens/<id>`). Who may read what is
//! [`scope::read_scope`]; changes need the node admin token. Plain HTTP/1.1; it is an operator's and a scraper's port,
//! not a data path, so it stays small; it sits behind the same listener
//! limits as the ingress ([`crate::ingress::listen`]).

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::config::NodeConfig;
use crate::control::agents::AgentsCtx;
use crate::metrics::Metrics;
use crate::route::MeshView;
use crate::security::Security;
use dmsc_gossip::Gossip;
use dmsc_transport::Overlay;
use report::{metrics_text, status_report};

pub mod audit;
mod intercept;
mod policies;
pub mod report;
pub mod scope;
pub mod status;

pub(crate) use scope::read_scope;
pub use scope::ReadScope;

/// The addresses a built node actually listens on.
#[derive(Debug, Clone)]
pub struct Bound {
    pub overlay: std::net::SocketAddr,
    pub admin: std::net::SocketAddr,
    /// One per `[[ingress]]` entry, in config order.
    pub ingress: Vec<std::net::SocketAddr>,
}

/// What the admin API reads and changes: handed to its handlers by the
/// app, never outside the crate (tests and tools use `App`'s accessors).
pub(crate) struct Shared {
    pub(crate) config: NodeConfig,
    pub(crate) security: Arc<Security>,
    pub(crate) overlay: Overlay,
    pub(crate) gossip: Arc<Gossip>,
    pub(crate) mesh: Arc<MeshView>,
    pub(crate) agents: AgentsCtx,
    pub(crate) intent: Arc<crate::intent::Intent>,
    /// The MQTT bridge's sessions (none without `[mqtt]`).
    pub(crate) edge: Vec<Arc<crate::edge::Bridge>>,
    /// Transparent interception (started with the node if `[intercept]` is
    /// set, else at the first `intercept enable`).
    pub(crate) intercept: Arc<crate::intercept::Slot>,
    pub(crate) metrics: Metrics,
    pub(crate) started: std::time::Instant,
    pub(crate) bound: Bound,
    pub(crate) ready: std::sync::atomic::AtomicBool,
    /// Shutdown: `/ready` and `status` say when the node drains.
    pub(crate) drain: Arc<crate::drain::Drain>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("bound", &self.bound)
            .finish()
    }
}

type Body = Full<Bytes>;

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    reply(status, "application/json", format!("{v}\n"))
}

/// `GET /v1/learned`: examples learned from callers' choices, merged
/// across nodes, of the tenants the caller may read.
fn learned_list(s: &Shared, scope: &ReadScope) -> Response<Body> {
    let merged = s
        .intent
        .learned
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .merged();
    let list: Vec<serde_json::Value> = merged
        .into_iter()
        .filter(|((t, _), _)| scope.allows(t))
        .map(|((tenant, agent), examples)| {
            serde_json::json!({"tenant": tenant, "agent": agent, "examples": examples})
        })
        .collect();
    json(StatusCode::OK, &serde_json::json!({ "learned": list }))
}

/// `DELETE /v1/learned/{tenant}/{agent}[?text=...]`: removes one learned
/// example (or all of the agent's) on every node.
fn learned_remove(
    req: &Request<hyper::body::Incoming>,
    tenant: &str,
    agent: &str,
    s: &Shared,
) -> Response<Body> {
    let text: Option<String> = req.uri().query().and_then(|q| {
        q.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == "text").then(|| audit::decode(v))
        })
    });
    let removed = s
        .intent
        .learned
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(tenant, agent, text.as_deref());
    if removed > 0 {
        s.intent.save_learned();
    }
    s.intent.apply_learned(&s.mesh);
    tracing::info!(tenant = %tenant, agent = %agent, removed, "learned examples removed by the operator");
    json(
        if removed == 0 {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::OK
        },
        &serde_json::json!({ "removed": removed }),
    )
}

/// `GET /v1/agents`: the agent table (of the reader's tenant only, for a
/// tenant read token).
fn agents_list(s: &Shared, scope: &ReadScope) -> Response<Body> {
    let mut agents = report::agent_statuses(s);
    agents.retain(|a| scope.allows(&a.tenant));
    match serde_json::to_value(agents) {
        Ok(v) => json(StatusCode::OK, &serde_json::json!({ "agents": v })),
        Err(e) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &serde_json::json!({"error": e.to_string()}),
        ),
    }
}

/// `POST /v1/agents`: onboard an agent.
async fn agents_add(req: Request<hyper::body::Incoming>, s: &Shared) -> Response<Body> {
    use http_body_util::BodyExt;
    let body = match http_body_util::Limited::new(req.into_body(), 1 << 20)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({"error": e.to_string()}),
            )
        }
    };
    let spec: crate::config::RawAgent = match serde_json::from_slice(&body) {
        Ok(s) => s,
        Err(e) => {
            return json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({"error": format!("expected {{\"tenant\", \"url\", \"name\"?}}: {e}")}),
            )
        }
    };
    match s.agents.add(&spec).await {
        Ok(a) => {
            let card = a.card();
            json(
                StatusCode::CREATED,
                &serde_json::json!({
                    "tenant": a.id.tenant,
                    "name": a.id.name,
                    "node": s.security.identity().name(),
                    "digest": card.digest,
                    "skills": card.card.skill_tags(),
                    "mesh_url": format!("http://{}.{}.dmsc", a.id.name, a.id.tenant),
                }),
            )
        }
        Err(e) => {
            use crate::control::agents::AgentError;
            match e {
                AgentError::Spec(_) => json(
                    StatusCode::BAD_REQUEST,
                    &serde_json::json!({"error": e.to_string()}),
                ),
                AgentError::Duplicate(_) | AgentError::Elsewhere { .. } => json(
                    StatusCode::CONFLICT,
                    &serde_json::json!({"error": e.to_string()}),
                ),
                // Kept and retried every health round, as a declared agent
                // is (listed as pending in `status`; DELETE stops it): say
                // so, rather than a failure that is not one.
                _ => json(
                    StatusCode::ACCEPTED,
                    &serde_json::json!({
                        "pending": true,
                        "error": e.to_string(),
                        "retry": "every health round until it onboards; DELETE /v1/agents/<tenant>/<name> stops it",
                    }),
                ),
            }
        }
    }
}

/// `DELETE /v1/agents/<tenant>/<name>`.
async fn agent_delete(tenant: &str, name: &str, s: &Shared) -> Response<Body> {
    let id = dmsc_registry::AgentId {
        tenant: tenant.to_string(),
        name: name.to_string(),
    };
    if s.agents.remove(&id).await {
        reply(StatusCode::NO_CONTENT, "text/plain", "")
    } else {
        json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": format!("`{id}` is not an agent of this node")}),
        )
    }
}

/// Reads a JSON request body of the `shape` the error message names.
async fn read_json<T: serde::de::DeserializeOwned>(
    req: Request<hyper::body::Incoming>,
    shape: &str,
) -> Result<T, Response<Body>> {
    let body = read_body(req).await?;
    serde_json::from_slice(&body).map_err(|e| {
        json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({"error": format!("expected {shape}: {e}")}),
        )
    })
}

async fn read_body(req: Request<hyper::body::Incoming>) -> Result<Bytes, Response<Body>> {
    read_body_up_to(req, 64 * 1024).await
}

/// Reads a request body of at most `limit` bytes.
async fn read_body_up_to(
    req: Request<hyper::body::Incoming>,
    limit: usize,
) -> Result<Bytes, Response<Body>> {
    use http_body_util::BodyExt;
    match http_body_util::Limited::new(req.into_body(), limit)
        .collect()
        .await
    {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) => Err(json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({"error": e.to_string()}),
        )),
    }
}

/// `POST /v1/tokens`: a one-time join token for one agent of one tenant.
async fn tokens_route(req: Request<hyper::body::Incoming>, s: &Shared) -> Response<Body> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Ask {
        tenant: String,
        agent: String,
        ttl_secs: Option<u64>,
        /// Only processes of this cgroup (or user) may redeem it, at the
        /// metadata endpoint.
        cgroup: Option<String>,
        uid: Option<u32>,
        netns: Option<String>,
    }
    let ask: Ask = match read_json(
        req,
        r#"{"tenant", "agent", "ttl_secs"?, "cgroup"? | "uid"? | "netns"?}"#,
    )
    .await
    {
        Ok(a) => a,
        Err(r) => return r,
    };
    let binding = match (&ask.cgroup, ask.uid, &ask.netns) {
        (None, None, None) => None,
        (cgroup, uid, netns) => match (crate::config::WhoSpec {
            cgroup: cgroup.as_deref(),
            uid,
            netns: netns.as_deref(),
        })
        .parse()
        {
            Ok(b) => Some(b),
            Err(e) => return json(StatusCode::BAD_REQUEST, &serde_json::json!({"error": e})),
        },
    };
    let ttl = std::time::Duration::from_secs(ask.ttl_secs.unwrap_or(3600));
    // The token store fsyncs: off the async workers.
    let sec = s.security.clone();
    let made = tokio::task::spawn_blocking(move || {
        sec.create_token(&ask.tenant, &ask.agent, ttl, binding)
    })
    .await
    .unwrap_or_else(|e| {
        Err(crate::security::Refusal::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("token task failed: {e}"),
        ))
    });
    match made {
        Ok((token, info)) => json(
            StatusCode::CREATED,
            &serde_json::json!({
                "token": token,
                "id": info.id,
                "tenant": info.tenant,
                "agent": info.agent,
                "binding": info.binding,
                "expires_at": info.expires_at.unix_timestamp(),
            }),
        ),
        Err(r) => json(
            r.status,
            &serde_json::json!({"error": r.reason, "code": r.code}),
        ),
    }
}

/// `GET /v1/revocations`, `POST /v1/revocations` (a signed statement).
/// `GET /v1/revocations`.
fn revocations_list(s: &Shared) -> Response<Body> {
    json(
        StatusCode::OK,
        &serde_json::json!({ "revocations": s.security.revoked.all() }),
    )
}

/// `POST /v1/revocations`: apply a statement signed by `dmsc-node ca revoke`.
async fn revocations_apply(req: Request<hyper::body::Incoming>, s: &Shared) -> Response<Body> {
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let r = match dmsc_transport::Revocation::parse(&body) {
        Ok(r) => r,
        Err(e) => {
            return json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({"error": e.to_string()}),
            )
        }
    };
    match s.security.apply_revocation(r.clone(), "admin") {
        Ok(new) => {
            crate::control::sync::publish_revocation(&s.gossip, &r).await;
            let closed = s.overlay.close_revoked();
            crate::control::sync::drop_revoked_policies(&s.gossip, &s.security);
            json(
                if new {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                },
                &serde_json::json!({
                    "serial": r.serial,
                    "new": new,
                    "closed_connections": closed,
                }),
            )
        }
        Err(e) => json(
            StatusCode::FORBIDDEN,
            &serde_json::json!({"error": e.to_string()}),
        ),
    }
}

/// `GET /v1/tenant-keys`: each tenant's key ids on this node (never key
/// material) and the statements it applied.
fn tenant_keys_list(s: &Shared) -> Response<Body> {
    let tk = &s.security.tenant_keys;
    let tenants: Vec<serde_json::Value> = tk
        .store
        .list()
        .into_iter()
        .map(|i| {
            let statements = tk.statements(&i.tenant);
            serde_json::json!({
                "tenant": i.tenant,
                "keys": i.keys,
                "shredded": i.shredded,
                "destroyed_below": i.destroyed_below,
                "applied_seq": i.applied_seq,
                "statements": statements,
            })
        })
        .collect();
    json(StatusCode::OK, &serde_json::json!({ "tenants": tenants }))
}

/// `POST /v1/tenant-keys`: apply a statement signed by `dmsc-node tenant
/// rotate-key|delete`, then spread it by gossip.
async fn tenant_keys_apply(req: Request<hyper::body::Incoming>, s: &Shared) -> Response<Body> {
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let st = match dmsc_transport::TenantKeyStatement::parse(&body) {
        Ok(st) => st,
        Err(e) => {
            return json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({"error": e.to_string()}),
            )
        }
    };
    match s.security.apply_tenant_key_statement(&st, "admin") {
        Ok(outcome) => {
            use crate::security::tenant_keys::StatementOutcome;
            let new = matches!(outcome, StatementOutcome::Applied { .. });
            crate::control::sync::publish_tenant_keys(&s.gossip, &s.security, &st.tenant).await;
            let (key_id, destroyed) = match outcome {
                StatementOutcome::Applied {
                    key_id,
                    keys_destroyed,
                } => (key_id, keys_destroyed),
                StatementOutcome::Known => (None, None),
            };
            json(
                if new {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                },
                &serde_json::json!({
                    "tenant": st.tenant,
                    "action": st.action,
                    "seq": st.seq,
                    "new": new,
                    "key_id": key_id,
                    "keys_destroyed": destroyed,
                }),
            )
        }
        Err(crate::security::tenant_keys::TenantKeyError::Statement(e)) => json(
            StatusCode::FORBIDDEN,
            &serde_json::json!({"error": e.to_string()}),
        ),
        Err(e) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &serde_json::json!({"error": e.to_string()}),
        ),
    }
}

/// Only IP literals and `localhost` are accepted as `Host`: a web page the
/// operator opens cannot reach this port through DNS rebinding.
fn host_ok<B>(req: &Request<B>) -> bool {
    let Some(host) = req.headers().get(hyper::header::HOST) else {
        return true; // HTTP/1.0 without Host: not a browser
    };
    let Ok(host) = host.to_str() else {
        return false;
    };
    let name = match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

/// `POST /v1/admin-tokens`: a read-only token for one tenant's operators.
async fn admin_tokens_create(req: Request<hyper::body::Incoming>, s: &Shared) -> Response<Body> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Ask {
        tenant: String,
        read_only: bool,
        ttl_secs: Option<u64>,
    }
    let ask: Ask = match read_json(req, r#"{"tenant", "read_only": true, "ttl_secs"?}"#).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    if !ask.read_only {
        return json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({"error": "only read-only tenant tokens exist (\"read_only\": true); changes need the node admin token"}),
        );
    }
    let ttl = ask.ttl_secs.map(std::time::Duration::from_secs);
    // The store fsyncs: off the async workers.
    let sec = s.security.clone();
    let made = tokio::task::spawn_blocking(move || {
        sec.read_tokens
            .create(&ask.tenant, ttl, std::time::SystemTime::now())
    })
    .await;
    match made {
        Ok(Ok((token, info))) => json(
            StatusCode::CREATED,
            &serde_json::json!({
                "token": token,
                "id": info.id,
                "tenant": info.tenant,
                "read_only": true,
                "expires_at": info.expires_at,
            }),
        ),
        Ok(Err(e)) => {
            let status = match e {
                crate::security::read_tokens::ReadTokenError::Store { .. } => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
                _ => StatusCode::BAD_REQUEST,
            };
            json(status, &serde_json::json!({"error": e.to_string()}))
        }
        Err(e) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &serde_json::json!({"error": format!("token task failed: {e}")}),
        ),
    }
}

/// `DELETE /v1/admin-tokens/<id>`.
async fn admin_token_revoke(id: String, s: &Shared) -> Response<Body> {
    let sec = s.security.clone();
    let shown = id.clone();
    match tokio::task::spawn_blocking(move || sec.read_tokens.revoke(&id)).await {
        Ok(Ok(true)) => reply(StatusCode::NO_CONTENT, "text/plain", ""),
        Ok(Ok(false)) => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": format!("no tenant read token `{shown}` on this node (see GET /v1/admin-tokens)")}),
        ),
        Ok(Err(e)) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &serde_json::json!({"error": e.to_string()}),
        ),
        Err(e) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &serde_json::json!({"error": format!("token task failed: {e}")}),
        ),
    }
}

/// What a path of the admin API names.
#[derive(Debug, Clone, Copy)]
enum Endpoint {
    Live,
    Ready,
    Metrics,
    Status,
    Check,
    Agents,
    Agent,
    Tokens,
    Revocations,
    Audit,
    AdminTokens,
    AdminToken,
    Policies,
    Policy,
    TenantKeys,
    Learned,
    LearnedAgent,
    Intercept,
}

impl Endpoint {
    /// The methods it answers (for 405 and `Allow`).
    fn allow(self) -> &'static str {
        match self {
            Endpoint::Agents
            | Endpoint::Revocations
            | Endpoint::AdminTokens
            | Endpoint::Policies
            | Endpoint::TenantKeys => "GET, HEAD, POST",
            Endpoint::Agent | Endpoint::AdminToken | Endpoint::LearnedAgent => "DELETE",
            Endpoint::Intercept => "GET, HEAD, POST, DELETE",
            Endpoint::Tokens => "POST",
            _ => "GET, HEAD",
        }
    }
}

fn router() -> &'static matchit::Router<Endpoint> {
    static ROUTER: std::sync::OnceLock<matchit::Router<Endpoint>> = std::sync::OnceLock::new();
    ROUTER.get_or_init(|| {
        let mut r = matchit::Router::new();
        for (path, e) in [
            ("/live", Endpoint::Live),
            ("/ready", Endpoint::Ready),
            ("/metrics", Endpoint::Metrics),
            ("/v1/status", Endpoint::Status),
            ("/v1/check", Endpoint::Check),
            ("/v1/agents", Endpoint::Agents),
            ("/v1/agents/{tenant}/{name}", Endpoint::Agent),
            ("/v1/tokens", Endpoint::Tokens),
            ("/v1/revocations", Endpoint::Revocations),
            ("/v1/audit", Endpoint::Audit),
            ("/v1/admin-tokens", Endpoint::AdminTokens),
            ("/v1/admin-tokens/{id}", Endpoint::AdminToken),
            ("/v1/policies", Endpoint::Policies),
            ("/v1/policies/{tenant}", Endpoint::Policy),
            ("/v1/tenant-keys", Endpoint::TenantKeys),
            ("/v1/learned", Endpoint::Learned),
            ("/v1/learned/{tenant}/{name}", Endpoint::LearnedAgent),
            ("/v1/intercept", Endpoint::Intercept),
        ] {
            // The table above is fixed and its paths are distinct.
            #[allow(clippy::expect_used)]
            r.insert(path, e).expect("admin routes are distinct");
        }
        r
    })
}

async fn route(req: Request<hyper::body::Incoming>, s: Arc<Shared>) -> Response<Body> {
    if !host_ok(&req) {
        return reply(
            StatusCode::FORBIDDEN,
            "text/plain",
            "the admin API answers to IP addresses and localhost only\n",
        );
    }
    let mutating = !matches!(*req.method(), Method::GET | Method::HEAD);
    if mutating {
        if let Err(r) = scope::require_admin(&req, &s) {
            return r;
        }
    }
    let path = req.uri().path().to_string();
    let lookup = match path.trim_end_matches('/') {
        "" => "/",
        p => p,
    };
    let Ok(found) = router().at(lookup) else {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("no route {path}; try /live, /ready, /metrics, /v1/status, /v1/agents\n"),
        );
    };
    let endpoint = *found.value;
    let param = |k: &str| found.params.get(k).unwrap_or_default().to_string();
    let (tenant, name, id) = (param("tenant"), param("name"), param("id"));
    let get = matches!(*req.method(), Method::GET | Method::HEAD);
    // Node health is open to all; every other read is scoped (and with
    // `open_reads = false`, needs a token).
    let health = matches!(endpoint, Endpoint::Live | Endpoint::Ready | Endpoint::Check);
    let scope = if get && !health {
        match read_scope(&req, &s) {
            Ok(scope) => scope,
            Err(r) => return r,
        }
    } else {
        ReadScope::All
    };
    // What cannot be split by tenant is for the node admin scope only.
    let whole_node = match endpoint {
        Endpoint::Metrics => Some("/metrics"),
        Endpoint::Revocations => Some("the revocation list"),
        Endpoint::AdminTokens => Some("the token list"),
        Endpoint::TenantKeys => Some("the tenant key list"),
        Endpoint::Intercept => Some("the interception bindings"),
        _ => None,
    };
    if let (true, Some(what)) = (get, whole_node) {
        if let Err(r) = scope::require_all(&scope, what) {
            return r;
        }
    }
    match (endpoint, req.method().clone()) {
        (Endpoint::Live, _) if get => reply(StatusCode::OK, "text/plain", "live\n"),
        (Endpoint::Ready, _) if get => {
            if s.drain.is_draining() {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n")
            } else if s.ready.load(Ordering::Acquire) {
                reply(StatusCode::OK, "text/plain", "ready\n")
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
            }
        }
        (Endpoint::Metrics, _) if get => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics_text(&s).await,
        ),
        (Endpoint::Check, _) if get => json(StatusCode::OK, &report::peer_checks(&s).await),
        (Endpoint::Status, _) if get => {
            match serde_json::to_vec_pretty(&scope::scope_status(status_report(&s).await, &scope)) {
                Ok(body) => reply(StatusCode::OK, "application/json", body),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("status encoding failed: {e}\n"),
                ),
            }
        }
        (Endpoint::Agents, _) if get => agents_list(&s, &scope),
        (Endpoint::Agents, Method::POST) => agents_add(req, &s).await,
        (Endpoint::Agent, Method::DELETE) => agent_delete(&tenant, &name, &s).await,
        (Endpoint::Tokens, Method::POST) => tokens_route(req, &s).await,
        (Endpoint::Revocations, _) if get => revocations_list(&s),
        (Endpoint::Revocations, Method::POST) => revocations_apply(req, &s).await,
        (Endpoint::Audit, _) if get => audit::audit_route(&req, &s).await,
        (Endpoint::AdminTokens, _) if get => json(
            StatusCode::OK,
            &serde_json::json!({ "tokens": s.security.read_tokens.list() }),
        ),
        (Endpoint::AdminTokens, Method::POST) => admin_tokens_create(req, &s).await,
        (Endpoint::AdminToken, Method::DELETE) => admin_token_revoke(id, &s).await,
        (Endpoint::Policies, _) if get => policies::list(&s, &scope),
        (Endpoint::Policies, Method::POST) => policies::apply(req, &s).await,
        (Endpoint::Policy, _) if get => policies::show(&s, &tenant, &scope),
        (Endpoint::TenantKeys, _) if get => tenant_keys_list(&s),
        (Endpoint::TenantKeys, Method::POST) => tenant_keys_apply(req, &s).await,
        (Endpoint::Learned, _) if get => learned_list(&s, &scope),
        (Endpoint::LearnedAgent, Method::DELETE) => learned_remove(&req, &tenant, &name, &s),
        (Endpoint::Intercept, _) if get => intercept::list(&s),
        (Endpoint::Intercept, Method::POST) => intercept::enable(req, &s).await,
        (Endpoint::Intercept, Method::DELETE) => intercept::disable(&req, &s).await,
        (e, _) => {
            let mut r = reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                format!("{path} answers {}\n", e.allow()),
            );
            r.headers_mut().insert(
                hyper::header::ALLOW,
                hyper::header::HeaderValue::from_static(e.allow()),
            );
            r
        }
    }
}

/// Accepts admin connections until the task is aborted, with the limits
/// of [`crate::ingress::listen`] (HTTP/1.1 only).
pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    server: crate::ingress::listen::Server,
) {
    use http_body_util::BodyExt;
    if shared.config.admin_open_reads && !shared.bound.admin.ip().is_loopback() {
        tracing::warn!(
            admin = %shared.bound.admin,
            "the admin API listens beyond localhost with open reads: anyone who reaches it sees every tenant's agents; set [admin] open_reads = false"
        );
    }
    server
        .run(listener, move |stream, _peer, conn| {
            let shared = shared.clone();
            let svc = tower::service_fn(move |req| {
                let shared = shared.clone();
                async move {
                    Ok::<_, Infallible>(
                        route(req, shared)
                            .await
                            .map(|b| b.map_err(|e| match e {}).boxed()),
                    )
                }
            });
            conn.serve(TokioIo::new(stream), svc)
        })
        .await
}
