//! The admin HTTP API (localhost by default): `/live`, `/ready`, `/metrics`,
//! `/v1/status`, and `/v1/agents` (GET the agent table, POST
//! `{"tenant","url","name"?}` to onboard an agent, DELETE
//! `/v1/agents/<tenant>/<name>` to remove one), `/v1/tokens` (POST
//! `{"tenant","agent","ttl_secs"?}`: a one-time join token), `/v1/revocations`
//! (GET the list, POST a statement from `dmsc-node ca revoke`),
//! `/v1/tenant-keys` (GET each tenant's key ids and statements, POST a
//! statement from `dmsc-node tenant rotate-key|delete`), and
//! `/v1/check` (clock skew and reachability of every peer). Plain HTTP/1.1; it is an operator's and a scraper's port,
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

mod policies;
pub mod report;
pub mod status;

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
    pub(crate) metrics: Metrics,
    pub(crate) started: std::time::Instant,
    pub(crate) bound: Bound,
    pub(crate) ready: std::sync::atomic::AtomicBool,
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

/// `GET /v1/agents`: the agent table.
fn agents_list(s: &Shared) -> Response<Body> {
    match serde_json::to_value(report::agent_statuses(s)) {
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
        Ok(a) => json(
            StatusCode::CREATED,
            &serde_json::json!({
                "tenant": a.id.tenant,
                "name": a.id.name,
                "node": s.security.identity().name(),
                "digest": a.digest,
                "skills": a.card.skill_tags(),
                "mesh_url": format!("http://{}.{}.dmsc", a.id.name, a.id.tenant),
            }),
        ),
        Err(e) => {
            let status = match e {
                crate::control::agents::AgentError::Spec(_) => StatusCode::BAD_REQUEST,
                crate::control::agents::AgentError::Duplicate(_) => StatusCode::CONFLICT,
                _ => StatusCode::UNPROCESSABLE_ENTITY,
            };
            json(status, &serde_json::json!({"error": e.to_string()}))
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

async fn read_body(req: Request<hyper::body::Incoming>) -> Result<Bytes, Response<Body>> {
    use http_body_util::BodyExt;
    match http_body_util::Limited::new(req.into_body(), 64 * 1024)
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
    }
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let ask: Ask = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => {
            return json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({"error": format!("expected {{\"tenant\", \"agent\", \"ttl_secs\"?}}: {e}")}),
            )
        }
    };
    let ttl = std::time::Duration::from_secs(ask.ttl_secs.unwrap_or(3600));
    // The token store fsyncs: off the async workers.
    let sec = s.security.clone();
    let made = tokio::task::spawn_blocking(move || sec.create_token(&ask.tenant, &ask.agent, ttl))
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

/// Mutating calls need `Authorization: Bearer <admin token>`.
fn authorized<B>(req: &Request<B>, s: &Shared) -> bool {
    req.headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| s.security.admin_token_ok(t))
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
    Policies,
    Policy,
    TenantKeys,
}

impl Endpoint {
    /// The methods it answers (for 405 and `Allow`).
    fn allow(self) -> &'static str {
        match self {
            Endpoint::Agents
            | Endpoint::Revocations
            | Endpoint::Policies
            | Endpoint::TenantKeys => "GET, HEAD, POST",
            Endpoint::Agent => "DELETE",
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
            ("/v1/policies", Endpoint::Policies),
            ("/v1/policies/{tenant}", Endpoint::Policy),
            ("/v1/tenant-keys", Endpoint::TenantKeys),
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
    if mutating && !authorized(&req, &s) {
        return json(
            StatusCode::UNAUTHORIZED,
            &serde_json::json!({"error": format!(
                "changing the node needs its admin token: `Authorization: Bearer <token>` with the token from `{}` (CLI: --admin-token FILE)",
                s.config.data_dir.join(crate::security::ADMIN_TOKEN_FILE).display()
            )}),
        );
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
    let (tenant, name) = (param("tenant"), param("name"));
    let get = matches!(*req.method(), Method::GET | Method::HEAD);
    match (endpoint, req.method().clone()) {
        (Endpoint::Live, _) if get => reply(StatusCode::OK, "text/plain", "live\n"),
        (Endpoint::Ready, _) if get => {
            if s.ready.load(Ordering::Acquire) {
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
        (Endpoint::Status, _) if get => match serde_json::to_vec_pretty(&status_report(&s).await) {
            Ok(body) => reply(StatusCode::OK, "application/json", body),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("status encoding failed: {e}\n"),
            ),
        },
        (Endpoint::Agents, _) if get => agents_list(&s),
        (Endpoint::Agents, Method::POST) => agents_add(req, &s).await,
        (Endpoint::Agent, Method::DELETE) => agent_delete(&tenant, &name, &s).await,
        (Endpoint::Tokens, Method::POST) => tokens_route(req, &s).await,
        (Endpoint::Revocations, _) if get => revocations_list(&s),
        (Endpoint::Revocations, Method::POST) => revocations_apply(req, &s).await,
        (Endpoint::Policies, _) if get => policies::list(&s),
        (Endpoint::Policies, Method::POST) => policies::apply(req, &s).await,
        (Endpoint::Policy, _) if get => policies::show(&s, &tenant),
        (Endpoint::TenantKeys, _) if get => tenant_keys_list(&s),
        (Endpoint::TenantKeys, Method::POST) => tenant_keys_apply(req, &s).await,
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
