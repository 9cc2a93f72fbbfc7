//! Ingress: where agents send their requests to the mesh.
//!
//! One listener per `[[ingress]]` entry. An unauthenticated listener (local
//! agents) gives every caller its configured tenant; an authenticated one
//! (TLS, `auth = ["mtls", "jwt"]`) takes tenant and agent from the caller's
//! verified client certificate (`spiffe://<td>/tenant/<t>/agent/<a>`) or
//! bearer JWT, and answers 401 (no or bad credentials) or 403 (another
//! tenant's address) with the reason, audited, before anything reaches an
//! agent. TLS ingress also serves enrollment (`POST /v1/enroll`, join token)
//! and renewal (`POST /v1/renew`, current certificate). HTTP/1.1, h2 and
//! h2c (or h2 by ALPN) are detected per connection. Both request forms work: proxy form (an agent
//! with `HTTP_PROXY` sends `GET http://billing.acme.dmsc/...`) and origin
//! form (intercepted traffic, target in `Host`). The target comes from the
//! host name:
//!
//! - `<agent>.<tenant>.dmsc`      -> that agent
//! - `<tag>.cap.<tenant>.dmsc`    -> the best agent with a skill tagged `<tag>`
//! - `mesh.<tenant>.dmsc`         -> by intent: the `dmsc-intent` header, or the
//!   text of an A2A `message/send` / `SendMessage` (and streaming) request,
//!   among the agents serving the request's binding; a follow-up (a task
//!   method, a message in a known task or context, a reply to an ask) goes
//!   to the agent that has the task ([`crate::intent::followup`])
//!
//! Bodies up to `delegation.max_buffered_body` with a known length are read
//! first (so a failed attempt can be retried elsewhere and intent can be
//! read), each within the node-wide body budget ([`crate::forward::budget`]: 503
//! and `Retry-After` when it is spent); others stream through untouched.
//! Nothing else of the body is parsed on the hot path.
//!
//! What the caller says about itself is not passed on: the `dmsc-*` headers
//! it sends are consumed or removed, a second `Host` is refused, its address
//! is appended to `X-Forwarded-For`, and the agent's node states the
//! verified caller ([`crate::proto::forwarded`]). A `dmsc-timeout` (or a
//! gRPC call's `grpc-timeout`) beyond `delegation.max_timeout_ms` is
//! clamped to it. Enrollment and renewal are
//! rate-limited per source address ([`crate::security::throttle`]).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use dmsc_registry::Target;
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper::header::HOST;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::debug;

use crate::config::{DelegationConfig, IngressSpec};
use crate::forward::budget::BodyBudget;
use crate::forward::budget::BodyPermit;
use crate::forward::{Delegation, Delegator, ReqBody};
use crate::limits::FairShed;
use crate::proto::http::{
    full, parse_grpc_timeout, parse_timeout, Body, BoxError, ErrorKind, MeshError,
};
use listen::{Conn, Server};

pub mod listen;
use crate::policy::caller::{Authenticator, ConnIdentity};
use crate::security::throttle::Attempt;
use crate::security::{Refusal, Security, TlsIngress};
use rustls::pki_types::CertificateDer;

/// Header a caller declares its request's data tags in (`pii, phi`).
const DATA_TAGS: &str = "dmsc-data-tags";

/// The registry target a host target names (for audit entries).
fn host_target(t: &HostTarget) -> Target {
    match t {
        HostTarget::Agent(a) => Target::Agent(a.clone()),
        HostTarget::Tag(t) => Target::Tag(t.clone()),
        HostTarget::Intent => Target::Intent(String::new()),
    }
}

/// Bound on a TLS handshake at the ingress.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Largest enrollment request body.
const MAX_ENROLL_BODY: usize = 64 * 1024;

/// Why a body could not be buffered.
#[derive(Debug, thiserror::Error)]
enum BufferError {
    #[error("{0}")]
    Body(#[from] hyper::Error),
    #[error("the body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the node's budget for buffered request bodies is spent")]
    OverBudget,
}

/// An early refusal (before the body is read): a small HTTP/2 request body
/// is read off first. Answering with the body unread ends the stream with
/// RST_STREAM(NO_ERROR) after the response, which RFC 9113 allows but some
/// clients (curl 7.88) report as a stream error instead of the response
/// (the 401, 429 or 400 that says why).
async fn refused(req: Request<Incoming>, response: Response<Body>) -> Response<Body> {
    read_off_small_h2_body(req).await;
    response
}

/// Reads and drops a small HTTP/2 request body (declared up to 64 KiB,
/// within half a second).
async fn read_off_small_h2_body(req: Request<Incoming>) {
    const SMALL: u64 = 64 * 1024;
    if req.version() != hyper::Version::HTTP_2
        || req.body().size_hint().exact().is_none_or(|n| n > SMALL)
    {
        return;
    }
    let _ = tokio::time::timeout(
        std::time::Duration::from_millis(500),
        req.into_body().collect(),
    )
    .await;
}

/// What [`read_buffered`] read.
enum Read {
    /// The whole body.
    Whole(Bytes),
    /// The first bytes (at least `limit`) of a body over the limit, and the
    /// rest of it unread: only when the caller asked to keep large bodies.
    Start(Bytes, Incoming),
}

/// Reads a body whole, at most `limit` bytes, growing `permit` as the
/// bytes arrive (a body that declared its length reserved it already).
/// With `keep_large`, a body over the limit is not refused: its start is
/// returned with the rest unread.
async fn read_buffered(
    mut body: Incoming,
    limit: usize,
    permit: &mut BodyPermit,
    keep_large: bool,
) -> Result<Read, BufferError> {
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        // Trailers of a buffered body are dropped, as before.
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        total += data.len();
        if total > limit && !keep_large {
            return Err(BufferError::TooLarge { limit });
        }
        if !permit.grow_to(total) {
            return Err(BufferError::OverBudget);
        }
        chunks.push(data);
        if total > limit {
            return Ok(Read::Start(concat(chunks, total), body));
        }
    }
    Ok(Read::Whole(concat(chunks, total)))
}

fn concat(mut chunks: Vec<Bytes>, total: usize) -> Bytes {
    match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.swap_remove(0),
        _ => {
            let mut all = bytes::BytesMut::with_capacity(total);
            for c in chunks {
                all.extend_from_slice(&c);
            }
            all.freeze()
        }
    }
}

/// The mesh error with `Retry-After` (whole seconds, at least 1): 503 at a
/// node bound, 429 at a caller's rate limit; either may succeed later.
fn retry_later(e: MeshError, after: std::time::Duration) -> Response<Body> {
    e.retry_after(after).response(None)
}

pub use crate::proto::host::{parse_host, HostTarget, NotMeshAddress};

/// The host a request is for: the absolute URI (proxy form, h2
/// `:authority`) or the `Host` header, without a port.
fn request_host<B>(req: &Request<B>) -> Option<String> {
    let raw = match req.uri().host() {
        Some(h) => h.to_string(),
        None => req.headers().get(HOST)?.to_str().ok()?.to_string(),
    };
    let host = match raw.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) && !h.ends_with(']') => h.to_string(),
        _ => raw,
    };
    Some(host)
}

fn trace_id<B>(req: &Request<B>) -> String {
    // W3C traceparent: version-traceid-parentid-flags.
    if let Some(id) = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split('-').nth(1))
        .filter(|id| id.len() == 32)
    {
        return id.to_string();
    }
    if let Some(id) = req
        .headers()
        .get("dmsc-trace-id")
        .and_then(|v| v.to_str().ok())
    {
        return id.chars().take(64).collect();
    }
    crate::proto::hex(&rand::random::<[u8; 16]>())
}

/// One ingress listener.
#[derive(Clone)]
pub struct Ingress {
    spec: IngressSpec,
    listen: SocketAddr,
    /// `ingress:<addr>`, for audit entries and unauthenticated callers.
    label: String,
    /// This node's name (errors say where they happened).
    me: String,
    /// Deadlines and body limits.
    cfg: DelegationConfig,
    /// Node-wide budget for buffered request bodies.
    budget: Arc<BodyBudget>,
    /// Where parsed, authenticated, authorised requests go.
    delegator: Arc<Delegator>,
    security: Arc<Security>,
    tls: Option<Arc<TlsIngress>>,
    /// Per-tenant shedding, on a listener that serves several tenants.
    fair: Option<Arc<FairShed>>,
}

/// What one ingress listener needs from the node.
pub struct IngressParts {
    pub spec: IngressSpec,
    pub listen: SocketAddr,
    pub me: String,
    pub cfg: DelegationConfig,
    pub budget: Arc<BodyBudget>,
    pub delegator: Arc<Delegator>,
    pub security: Arc<Security>,
    pub tls: Option<Arc<TlsIngress>>,
    pub fair: Option<Arc<FairShed>>,
}

impl Ingress {
    pub fn new(p: IngressParts) -> Ingress {
        Ingress {
            label: format!("ingress:{}", p.listen),
            spec: p.spec,
            listen: p.listen,
            me: p.me,
            cfg: p.cfg,
            budget: p.budget,
            delegator: p.delegator,
            security: p.security,
            tls: p.tls,
            fair: p.fair,
        }
    }
}

impl Ingress {
    /// Names this ingress's unauthenticated callers in audit entries and
    /// errors (default `ingress:<listen address>`).
    pub fn with_label(mut self, label: String) -> Ingress {
        self.label = label;
        self
    }

    /// Serves one in-process HTTP/1.1 connection (the MQTT bridge's calls
    /// into the mesh): the same path as a TCP caller of this listener.
    pub(crate) async fn serve_io<I>(self: &Arc<Self>, io: I)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let this = self.clone();
        let auth = Arc::new(ConnIdentity::default());
        let svc = hyper::service::service_fn(move |req| this.clone().answer(auth.clone(), req));
        if let Err(e) = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, svc)
            .await
        {
            debug!(error = %e, "in-process ingress connection ended");
        }
    }
}

impl Ingress {
    /// Serves one intercepted connection (HTTP/1.1 or HTTP/2 with prior
    /// knowledge): requests whose `Host` is not a mesh name go to
    /// `target_host`, the mesh name of the address the client dialled.
    pub(crate) async fn serve_intercepted(
        self: &Arc<Self>,
        conn: Conn,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
        target_host: Option<String>,
    ) {
        let auth = Arc::new(ConnIdentity {
            peer: Some(peer),
            target_host,
            ..Default::default()
        });
        self.serve_conn(conn, TokioIo::new(stream), auth).await
    }
}

impl std::fmt::Debug for Ingress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingress")
            .field("listen", &self.listen)
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

/// An authentication refusal as a mesh error (its kind by its status).
fn refusal_error(r: &Refusal, me: &str) -> MeshError {
    let kind = match r.status {
        hyper::StatusCode::UNAUTHORIZED => ErrorKind::Unauthorized,
        hyper::StatusCode::FORBIDDEN => ErrorKind::Forbidden,
        hyper::StatusCode::BAD_REQUEST => ErrorKind::BadRequest,
        hyper::StatusCode::SERVICE_UNAVAILABLE => ErrorKind::NoneAvailable,
        _ => ErrorKind::Internal,
    };
    MeshError::new(kind, me, format!("{} ({})", r.reason, r.code))
}

/// 405 as a problem document, with the methods that are served (`Allow`,
/// which RFC 9110 requires).
fn method_not_allowed(me: &str, detail: &str, allow: &'static str) -> Response<Body> {
    let body = serde_json::json!({
        "type": "https://dmsc.dev/errors/bad-request",
        "title": "bad-request",
        "status": 405,
        "detail": detail,
        "node": me,
    });
    let mut r = Response::new(full(body.to_string()));
    *r.status_mut() = hyper::StatusCode::METHOD_NOT_ALLOWED;
    let h = r.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/problem+json"),
    );
    h.insert(
        "dmsc-error",
        hyper::header::HeaderValue::from_static("bad-request"),
    );
    h.insert(
        hyper::header::ALLOW,
        hyper::header::HeaderValue::from_static(allow),
    );
    r
}

fn refusal_response(r: &Refusal, me: &str, bearer: bool) -> Response<Body> {
    let mut resp = refusal_error(r, me).response(None);
    *resp.status_mut() = r.status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(&r.code) {
        resp.headers_mut().insert("dmsc-auth-error", v);
    }
    if bearer && r.status == hyper::StatusCode::UNAUTHORIZED {
        let desc: String = r
            .reason
            .chars()
            .filter(|c| *c != '"' && *c != '\\')
            .collect();
        // RFC 6750 3.1: a request without credentials gets no error code.
        let challenge = if r.code == "no_credentials" {
            "Bearer".to_string()
        } else {
            format!("Bearer error=\"invalid_token\", error_description=\"{desc}\"")
        };
        if let Ok(v) = hyper::header::HeaderValue::from_str(&challenge) {
            resp.headers_mut()
                .insert(hyper::header::WWW_AUTHENTICATE, v);
        }
    }
    resp
}

impl Ingress {
    /// Who is calling, by this listener's rules.
    fn authenticator(&self) -> Authenticator<'_> {
        Authenticator {
            security: &self.security,
            spec: &self.spec,
            listener: &self.label,
        }
    }

    /// Accepts connections until the task is dropped, with the limits of
    /// [`crate::ingress::listen`]; a TLS listener completes the handshake and judges
    /// the client certificate before any HTTP is read.
    pub async fn serve(self, listener: TcpListener, server: Server) {
        let this = Arc::new(self);
        server
            .run(listener, move |stream, peer, conn| {
                let this = this.clone();
                async move {
                    match this.tls.as_ref().map(|t| t.acceptor()) {
                        None => {
                            let auth = Arc::new(ConnIdentity {
                                peer: Some(peer),
                                ..Default::default()
                            });
                            this.serve_conn(conn, TokioIo::new(stream), auth).await
                        }
                        Some(acceptor) => {
                            let tls = match tokio::time::timeout(
                                TLS_HANDSHAKE_TIMEOUT,
                                acceptor.accept(stream),
                            )
                            .await
                            {
                                Ok(Ok(s)) => s,
                                Ok(Err(e)) => {
                                    debug!(peer = %peer, error = %e, "ingress TLS handshake failed");
                                    return;
                                }
                                Err(_) => {
                                    debug!(peer = %peer, "ingress TLS handshake timed out");
                                    return;
                                }
                            };
                            let chain: Vec<CertificateDer<'static>> = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                                .unwrap_or_default();
                            let verdict = (!chain.is_empty() && this.spec.mtls)
                                .then(|| this.security.verify_agent(&chain));
                            let serials = dmsc_transport::revoke::chain_serials(chain.iter());
                            let auth = Arc::new(ConnIdentity {
                                peer: Some(peer),
                                chain,
                                serials,
                                verdict,
                                target_host: None,
                            });
                            this.serve_conn(conn, TokioIo::new(tls), auth).await
                        }
                    }
                }
            })
            .await
    }

    async fn serve_conn<I>(self: &Arc<Self>, conn: Conn, io: I, auth: Arc<ConnIdentity>)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let this = self.clone();
        let svc = tower::service_fn(move |req| this.clone().answer(auth.clone(), req));
        conn.serve(io, svc).await
    }

    /// A connection's service: [`Self::handle`], its future boxed where it
    /// is made. That future is several KiB, and the service layers above
    /// move theirs by value, so only this pointer is copied from layer to
    /// layer.
    async fn answer(
        self: Arc<Self>,
        auth: Arc<ConnIdentity>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, std::convert::Infallible> {
        Ok(Box::pin(self.handle(req, &auth)).await)
    }

    /// `POST /v1/enroll` and `POST /v1/renew` (TLS listeners only).
    async fn enrollment(&self, req: Request<Incoming>, auth: &ConnIdentity) -> Response<Body> {
        let me = &self.me;
        if self.tls.is_none() {
            return MeshError::new(
                ErrorKind::BadRequest,
                me,
                "enrollment is served on TLS ingress listeners only (the response carries credentials)",
            )
            .response(None);
        }
        if req.method() != hyper::Method::POST {
            return method_not_allowed(me, &format!("{} takes POST", req.uri().path()), "POST");
        }
        let renew = req.uri().path() == "/v1/renew";
        let attempt = if renew {
            Attempt::Renew
        } else {
            Attempt::Enroll
        };
        let source = auth
            .peer
            .map(|p| p.ip())
            .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
        if let Err(wait) = self.security.admit_enrollment(attempt, source) {
            return retry_later(
                MeshError::new(
                    ErrorKind::RateLimited,
                    me,
                    format!("too many enrollment and renewal requests from {source}; retry later"),
                ),
                wait,
            );
        }
        let body = match http_body_util::Limited::new(req.into_body(), MAX_ENROLL_BODY)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return MeshError::new(ErrorKind::BadRequest, me, format!("request body: {e}"))
                    .response(None)
            }
        };
        let peer = auth
            .peer
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let sec = self.security.clone();
        let blocking = |f: Box<dyn FnOnce() -> Result<_, Refusal> + Send>| async move {
            // Issuance signs and the token store fsyncs: off the async workers.
            tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
                Err(Refusal::new(
                    hyper::StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    format!("enrollment task failed: {e}"),
                ))
            })
        };
        let result = if renew {
            match self.authenticator().cert_caller(
                auth,
                "renewal needs the current agent certificate as TLS client certificate",
            ) {
                Ok(who) => {
                    let who = who.clone();
                    blocking(Box::new(move || sec.renew(&who, &body))).await
                }
                Err(r) => {
                    let e = self.authenticator().cert_refusal_event(
                        dmsc_audit::AuthMethod::Mtls,
                        &r,
                        auth,
                    );
                    self.security
                        .record_attempt_failure(Attempt::Renew, source, e);
                    Err(r)
                }
            }
        } else {
            blocking(Box::new(move || sec.enroll(&body, peer))).await
        };
        match result {
            Ok(resp) => {
                let json = serde_json::to_vec(&resp).unwrap_or_default();
                let mut r = Response::new(full(json));
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/json"),
                );
                r
            }
            Err(refusal) => refusal_response(&refusal, me, false),
        }
    }

    async fn handle(&self, req: Request<Incoming>, auth: &ConnIdentity) -> Response<Body> {
        let me = &self.me;
        // A gRPC caller reads every refusal as a gRPC status (grpcio turns a
        // bare HTTP 400 into INTERNAL "Received http2 header with status").
        let grpc = crate::proto::http::is_grpc(req.headers());
        let refuse = |e: MeshError| {
            if grpc {
                e.grpc_response()
            } else {
                e.response(None)
            }
        };
        if req.method() == hyper::Method::CONNECT {
            // A tunnel to a mesh name was opened by the listener
            // (`listen::tunnel_to_mesh`); this one asks for another host,
            // or a tunnel inside the tunnel.
            return method_not_allowed(
                me,
                &format!(
                    "CONNECT is offered to mesh names only (<agent>.<tenant>.dmsc:<port>, \
                     <tag>.cap.<tenant>.dmsc, mesh.<tenant>.dmsc), once per connection; \
                     not to `{}`",
                    req.uri()
                ),
                "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS",
            );
        }
        if crate::proto::forwarded::duplicate_host(req.headers()) {
            let r = refuse(MeshError::new(
                ErrorKind::BadRequest,
                me,
                "the request has more than one Host header",
            ));
            return refused(req, r).await;
        }
        let host = match (request_host(&req), &auth.target_host) {
            // Intercepted: the Host names the address dialled, not a mesh
            // target; the address's mesh name stands in for it.
            (Some(h), Some(t)) if parse_host(&h).is_err() => t.clone(),
            (None, Some(t)) => t.clone(),
            (Some(h), _) => h,
            (None, None) => {
                let r = refuse(MeshError::new(
                    ErrorKind::BadTarget,
                    me,
                    "request has no Host",
                ));
                return refused(req, r).await;
            }
        };
        let parsed = parse_host(&host);
        if parsed.is_err() && matches!(req.uri().path(), "/v1/enroll" | "/v1/renew") {
            return self.enrollment(req, auth).await;
        }
        let caller = match self.authenticator().caller(req.headers(), auth).await {
            Ok(c) => c,
            Err(r) => {
                let r = if grpc {
                    refuse(refusal_error(&r, me))
                } else {
                    refusal_response(&r, me, self.spec.jwt)
                };
                return refused(req, r).await;
            }
        };
        let (tenant, target) = match parsed {
            Ok(t) => t,
            Err(e) => {
                let r = refuse(MeshError::new(ErrorKind::BadTarget, me, e.to_string()));
                return refused(req, r).await;
            }
        };
        // Data tags the caller declares (`dmsc-data-tags`); the A2A
        // metadata adds to them below when a policy has tag rules.
        let consumer_policy = self.security.policies.get(&caller.tenant);
        let header_tags = req
            .headers()
            .get_all(DATA_TAGS)
            .iter()
            .filter_map(|v| v.to_str().ok());
        let mut data_tags = match dmsc_policy::parse_tags(header_tags, consumer_policy.as_deref()) {
            Ok(t) => t,
            Err(e) => {
                let r = refuse(MeshError::new(
                    ErrorKind::BadRequest,
                    me,
                    format!("`{DATA_TAGS}`: {e}"),
                ));
                return refused(req, r).await;
            }
        };
        let provider_policy = if caller.tenant == tenant {
            consumer_policy.clone()
        } else {
            self.security.policies.get(&tenant)
        };
        let tag_rules = consumer_policy
            .as_deref()
            .is_some_and(|p| p.has_tag_rules())
            || provider_policy
                .as_deref()
                .is_some_and(|p| p.has_tag_rules());
        // The caller's tenant masks what leaves it: the body is read whole
        // for it (a body too large for that is refused by the delegation
        // when a rule must mask it).
        let mask_rules = consumer_policy
            .as_deref()
            .is_some_and(|p| p.may_mask_request(caller.tenant != tenant));
        // Fair shedding and rate limits, before the body is read: a
        // refusal under flood costs no more than a policy denial. Both are
        // held until the response (its body, for the limits) is done. The
        // calling tenant's limits: its callers' requests are what it spends.
        let _slot = match self.fair.as_ref().map(|f| f.admit(&caller.tenant, me)) {
            Some(Err(e)) => return refused(req, refuse(e)).await,
            Some(Ok(slot)) => Some(slot),
            None => None,
        };
        let limits = match self
            .delegator
            .limiter
            .admit_ingress(&caller.tenant, &caller.id, &host)
        {
            Ok(p) => p,
            Err(e) => return refused(req, refuse(e)).await,
        };
        let cfg = &self.cfg;
        // The caller's deadline: `dmsc-timeout`, else a gRPC call's own
        // `grpc-timeout` (a gRPC client allowing 90 s must not be cut at
        // the node's default), else the node's default; never past
        // `max_timeout`.
        let asked = match req.headers().get("dmsc-timeout") {
            Some(v) => match v.to_str().ok().and_then(parse_timeout) {
                Some(t) => Some(t),
                // Ignored, it would give the caller the default (30 s) while
                // it asked for something else.
                None => {
                    let r = refuse(MeshError::new(
                        ErrorKind::BadRequest,
                        me,
                        format!(
                            "dmsc-timeout `{}` is not a duration above 0 (500ms, 5s, 2m, 1h; a bare number is milliseconds)",
                            String::from_utf8_lossy(v.as_bytes())
                        ),
                    ));
                    return refused(req, r).await;
                }
            },
            None => req
                .headers()
                .get("grpc-timeout")
                .and_then(|v| v.to_str().ok())
                .and_then(parse_grpc_timeout),
        };
        let timeout = asked.unwrap_or(cfg.timeout).min(cfg.max_timeout);
        let short_deadline = timeout < cfg.timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let trace = trace_id(&req);
        let http2 = req.version() == hyper::Version::HTTP_2;
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        let method = req.method().clone();
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        // Intent text is free text: UTF-8 as clients send it (not only the
        // visible ASCII `to_str` accepts); invalid bytes are replaced.
        let header_intent = req
            .headers()
            .get("dmsc-intent")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let intent_mode = header("dmsc-intent-mode");
        let intent_choice = header("dmsc-intent-choice");
        let (parts, body) = req.into_parts();
        let needs_text = target == HostTarget::Intent && header_intent.is_none();
        // Policy reads bodies of unknown length too; a body that declares
        // more than the limit streams (header tags only; masking refuses it).
        let exact = body.size_hint().exact();
        let buffer = body.is_end_stream()
            || needs_text
            || exact.is_some_and(|n| n as usize <= cfg.max_buffered_body)
            || ((tag_rules || mask_rules) && exact.is_none());
        // Held until the delegation is done: the buffered bytes live as long.
        let mut permit: Option<BodyPermit> = None;
        // The text of an intent request too large to hold whole.
        let mut start_text: Option<String> = None;
        let body = if buffer {
            let budget = &self.budget;
            let over_budget = || {
                retry_later(
                    MeshError::new(
                        ErrorKind::Overloaded,
                        me,
                        format!(
                            "this node is holding its limit of buffered request bodies ({} bytes); retry later",
                            budget.limit()
                        ),
                    ),
                    std::time::Duration::from_secs(1),
                )
            };
            let declared = body.size_hint().exact().unwrap_or(0) as usize;
            let Some(p) = budget.try_reserve(declared.min(cfg.max_buffered_body)) else {
                return over_budget();
            };
            let p = permit.insert(p);
            // An intent request over the limit streams on, routed by the
            // text of its start (masking needs it whole: refused as before).
            let keep_large = needs_text && !mask_rules;
            let read = tokio::time::timeout_at(
                deadline,
                read_buffered(body, cfg.max_buffered_body, p, keep_large),
            )
            .await;
            let Ok(read) = read else {
                return refuse(MeshError::new(
                    ErrorKind::Timeout,
                    me,
                    "the deadline passed while reading the request body",
                ));
            };
            match read {
                Ok(Read::Whole(b)) => ReqBody::Buffered(b),
                Ok(Read::Start(start, rest)) => {
                    start_text = crate::proto::a2a::intent_text_prefix(&start);
                    ReqBody::Streaming(crate::forward::body::prepended(start, rest))
                }
                Err(BufferError::OverBudget) => return over_budget(),
                Err(e) => {
                    let kind = if mask_rules && matches!(e, BufferError::TooLarge { .. }) {
                        ErrorKind::TooLarge
                    } else {
                        ErrorKind::BadRequest
                    };
                    return refuse(MeshError::new(
                        kind,
                        me,
                        format!(
                            "reading the request body (limit {} bytes): {e}",
                            cfg.max_buffered_body
                        ),
                    ));
                }
            }
        } else {
            ReqBody::Streaming(body.map_err(|e| Box::new(e) as BoxError).boxed())
        };
        if tag_rules {
            if let ReqBody::Buffered(b) = &body {
                let found = crate::proto::a2a::data_tags(b);
                match dmsc_policy::parse_tags(
                    found.iter().map(String::as_str),
                    consumer_policy.as_deref(),
                ) {
                    Ok(more) => {
                        data_tags.extend(more);
                        data_tags.sort_unstable();
                        data_tags.dedup();
                    }
                    Err(e) => {
                        return MeshError::new(
                            ErrorKind::BadRequest,
                            me,
                            format!("A2A metadata `dmsc.dataTags`: {e}"),
                        )
                        .into_response(grpc, Some(b))
                    }
                }
            }
        }
        // The tenant policy, before anything leaves this node: the
        // addressed agent (with its tags) or capability; intent routing
        // stays in the tenant the host names, and the agent it picks is
        // checked again after selection.
        let verdict = {
            let agent_tags;
            let addressed = match &target {
                HostTarget::Agent(a) => {
                    // Tags only matter to a policy's rules: none, no lookup.
                    agent_tags = if consumer_policy.is_none() && provider_policy.is_none() {
                        Vec::new()
                    } else {
                        crate::forward::agent_tags(
                            &self.delegator.mesh.read(),
                            &dmsc_registry::AgentId::new(tenant.as_str(), a.as_str()),
                        )
                    };
                    dmsc_policy::Addressed::Agent {
                        name: a,
                        tags: &agent_tags,
                    }
                }
                HostTarget::Tag(t) => dmsc_policy::Addressed::Tag(t),
                HostTarget::Intent => dmsc_policy::Addressed::Intent,
            };
            crate::policy::outbound(
                consumer_policy.as_deref(),
                provider_policy.as_deref(),
                crate::policy::Route {
                    caller: &caller.id,
                    caller_tenant: &caller.tenant,
                    tenant: &tenant,
                    target: addressed,
                    data_tags: &data_tags,
                    // Not known before selection; checked for the agent picked.
                    crosses_region: false,
                },
            )
        };
        if let Err(denial) = verdict {
            let request_bytes = match &body {
                ReqBody::Buffered(b) => Some(b.clone()),
                ReqBody::Streaming(_) => None,
            };
            let addressed = host_target(&target);
            // A tenant nobody serves (no agent known, no policy) is only a
            // name someone typed into a Host header: its denial is audited
            // under the caller's tenant, so no key or state is made for it.
            // (The answer is the same either way: no probing for tenants.)
            let audited = if caller.tenant != tenant
                && provider_policy.is_none()
                && self
                    .delegator
                    .mesh
                    .read()
                    .tenant_entries(&tenant)
                    .next()
                    .is_none()
            {
                &caller.tenant
            } else {
                &tenant
            };
            let e = self
                .delegator
                .refuse(&caller.id, audited, host.clone(), denial);
            self.delegator
                .report_denial(&caller.id, &tenant, &addressed, &e);
            return e.into_response(grpc, request_bytes.as_deref());
        }
        let binding = crate::proto::a2a::binding(
            grpc,
            &path,
            match &body {
                ReqBody::Buffered(b) => Some(&b[..]),
                ReqBody::Streaming(_) => None,
            },
        );
        // Follow-ups of intent-routed work (a task method, a message in a
        // known task or context, a reply to an ask) go where the work is.
        let by_intent = target == HostTarget::Intent;
        // Sent to a router's endpoint: the agent picked gets it at its own.
        let routed = by_intent || matches!(target, HostTarget::Tag(_));
        // Where the mesh picks the agent by meaning, it picks one that
        // speaks the request's A2A version too.
        let a2a = if routed {
            crate::proto::a2a::request_dialect(
                &parts.headers,
                &path,
                match &body {
                    ReqBody::Buffered(b) => Some(&b[..]),
                    ReqBody::Streaming(_) => None,
                },
            )
        } else {
            None
        };
        // Whose follow-ups these are (intent routing only).
        let followup_scope = by_intent
            .then(|| crate::intent::followup::Scope::new(&tenant, &caller.tenant, &caller.id));
        let mut follow: Option<Follow> = None;
        let mut body = body;
        let target = match target {
            HostTarget::Agent(a) => Target::Agent(a),
            HostTarget::Tag(t) => Target::Tag(t),
            HostTarget::Intent
                if method == hyper::Method::GET && crate::forward::local::is_card_path(&path) =>
            {
                // The tenant's router card: where an A2A client starts.
                let rest = self
                    .delegator
                    .mesh
                    .read()
                    .tenant_entries(&tenant)
                    .any(|e| dmsc_registry::serves_binding(e.record.protocols(), "HTTP+JSON"));
                let card = crate::intent::card::router_card(&tenant, rest);
                let mut r = Response::new(full(card.to_string()));
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/json"),
                );
                return r;
            }
            HostTarget::Intent => {
                let found = match &body {
                    ReqBody::Buffered(b) => crate::proto::a2a::follow_up(&path, b),
                    ReqBody::Streaming(_) => None,
                };
                let found = found.zip(followup_scope.as_ref());
                match found
                    .map(|(f, scope)| self.follow_up(&tenant, &caller, scope, f, &body, grpc))
                {
                    Some(Err(e)) => {
                        let req_bytes: Option<Bytes> = match &body {
                            ReqBody::Buffered(b) => Some(b.clone()),
                            _ => None,
                        };
                        return e.into_response(grpc, req_bytes.as_deref());
                    }
                    Some(Ok(Some(f))) => {
                        if let Some(b) = f.body.clone() {
                            body = ReqBody::Buffered(b);
                        }
                        let t = Target::Agent(f.agent.clone());
                        follow = Some(f);
                        t
                    }
                    None | Some(Ok(None)) => {
                        let text = match (&header_intent, &body) {
                            (Some(t), _) => Some(t.clone()),
                            (None, ReqBody::Buffered(b)) => crate::proto::a2a::intent_text(b),
                            (None, ReqBody::Streaming(_)) => start_text.clone(),
                        };
                        match text {
                            Some(t) if !t.trim().is_empty() => Target::Intent(t),
                            found => {
                                let req_bytes: Option<Bytes> = match &body {
                                    ReqBody::Buffered(b) => Some(b.clone()),
                                    _ => None,
                                };
                                let what = if found.is_some() {
                                    "routing by intent needs text to route by: the `dmsc-intent` header or the message's text parts are empty"
                                } else {
                                    "routing by intent needs a `dmsc-intent` header or an A2A message/send (SendMessage) request with text parts"
                                };
                                return MeshError::new(ErrorKind::BadRequest, me, what)
                                    .into_response(grpc, req_bytes.as_deref());
                            }
                        }
                    }
                }
            }
        };
        let prepared = match follow.as_mut() {
            Some(f) => crate::intent::Prepared {
                query: None,
                lesson: f.lesson.take(),
            },
            None => match self
                .intent_step(
                    &tenant,
                    &caller,
                    &target,
                    &body,
                    (
                        consumer_policy.as_deref(),
                        provider_policy.as_deref(),
                        &data_tags,
                    ),
                    (
                        intent_mode.as_deref(),
                        intent_choice.as_deref(),
                        &path,
                        header_intent.as_deref(),
                        dmsc_registry::Speaks { binding, a2a },
                    ),
                )
                .await
            {
                Ok(p) => p,
                Err(resp) => return resp,
            },
        };
        let mut headers = parts.headers;
        if follow.as_ref().is_some_and(|f| f.body.is_some()) {
            // the ask's reply became the asked request: another length
            headers.remove(hyper::header::CONTENT_LENGTH);
        }
        if caller.bearer {
            headers.remove(hyper::header::AUTHORIZATION);
        }
        // What the caller says in the mesh's namespace was read above or is
        // not for the agent; the agent's node states the verified caller.
        crate::proto::forwarded::strip_mesh_headers(&mut headers);
        if routed {
            let v = format!(
                "{} {}",
                binding.unwrap_or("-"),
                a2a.map_or_else(|| "-".to_string(), |d| d.to_string())
            );
            if let Ok(v) = hyper::header::HeaderValue::from_str(&v) {
                headers.insert(crate::proto::forwarded::ROUTED, v);
            }
        }
        if let Some(peer) = auth.peer {
            crate::proto::forwarded::append_forwarded_for(&mut headers, peer.ip());
        }
        let routed_by_start = (matches!(target, Target::Intent(_))
            && header_intent.is_none()
            && start_text.is_some())
        .then(|| {
            format!(
                "routed by the text in the request's first {} bytes (the request is larger)",
                cfg.max_buffered_body
            )
        });
        // The request's dialect decides how an error is rendered (a JSON-RPC
        // request gets a JSON-RPC error with its id).
        let request_bytes = match &body {
            ReqBody::Buffered(b) => Some(b.clone()),
            ReqBody::Streaming(_) => None,
        };
        let outcome = self
            .delegator
            .delegate(Delegation {
                tenant,
                caller: caller.id,
                caller_tenant: caller.tenant,
                data_tags,
                target,
                deadline,
                short_deadline,
                trace_id: trace,
                method,
                path,
                http2,
                headers,
                body,
                intent: prepared.query,
                route_note: follow.map(|f| f.why).or(routed_by_start),
                speaks: dmsc_registry::Speaks {
                    binding,
                    a2a: a2a.filter(|_| by_intent),
                },
            })
            .await;
        drop(permit);
        if let (Some(lesson), crate::proto::outcome::Outcome::Served(_, resp)) =
            (prepared.lesson, &outcome)
        {
            if resp.status().is_success() {
                self.delegator.intent.learn(lesson, &self.delegator.mesh);
            }
        }
        // What the agent answers names its tasks: remembered for the
        // follow-ups, read as the answer passes.
        let served_by = outcome.served().map(|s| s.agent.name.clone());
        let mut resp = outcome.render(request_bytes.as_deref(), grpc);
        if let (Some(scope), Some(agent)) = (followup_scope, served_by) {
            let intent = self.delegator.intent.clone();
            resp = crate::intent::followup::observe(resp, move |refs| {
                intent
                    .followups
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .record(&scope, refs, &agent, std::time::Instant::now());
            });
        }
        match limits {
            Some(p) => resp.map(|b| crate::forward::body::guarded(b, vec![Box::new(p)])),
            None => resp,
        }
    }
}

/// Where a follow-up of intent-routed work goes, and why (`dmsc-route`).
struct Follow {
    agent: String,
    why: String,
    /// A reply to an ask, rewritten into the request first asked about.
    body: Option<Bytes>,
    /// A resolved ask, to learn if the call succeeds.
    lesson: Option<crate::intent::Lesson>,
}

impl Ingress {
    /// A request to `mesh.<tenant>.dmsc` that continues earlier work: the
    /// agent that has the task or context ([`crate::intent::followup`]);
    /// `Ok(None)`: nothing known, route by intent (a message naming only a
    /// context this node did not see). A task nobody here made is A2A's
    /// TaskNotFound.
    fn follow_up(
        &self,
        tenant: &str,
        caller: &crate::policy::caller::Caller,
        scope: &crate::intent::followup::Scope,
        found: crate::proto::a2a::FollowUp,
        body: &ReqBody,
        grpc: bool,
    ) -> Result<Option<Follow>, MeshError> {
        use crate::intent::followup::ASK_TASK_PREFIX;
        use crate::proto::a2a::{FollowUp, Ref};
        let me = &self.me;
        let now = std::time::Instant::now();
        let intent = &self.delegator.intent;
        let not_found = |what: String| {
            MeshError::new(
                ErrorKind::TaskNotFound,
                me,
                format!(
                    "{what} is not known to this node: a follow-up sent to mesh.{tenant}.dmsc reaches the agent \
                     that answered the first request when it comes to the node that routed that request, \
                     from the same caller, within an hour, and the first answer was a stream or a JSON \
                     body of at most {} bytes; otherwise call the agent by name \
                     (`<agent>.{tenant}.dmsc`, named by `dmsc-agent` in its answer)",
                    crate::intent::followup::MAX_JSON
                ),
            )
        };
        // A task method (get, cancel, resubscribe), not a message in it.
        let task_method = matches!(found, FollowUp::TaskCall(_));
        let (task, context) = match found {
            FollowUp::TaskCall(id) => (Some(id), None),
            FollowUp::Message { task, context } => (task, context),
            FollowUp::ListTasks { context } => {
                // A conversation's tasks are at the agent that has it; a
                // listing of every task would have to ask every agent.
                let known = context.as_ref().and_then(|id| {
                    let mut known = intent.followups.lock().unwrap_or_else(|p| p.into_inner());
                    known.agent(scope, &Ref::Context(id.clone()), now)
                });
                return match (known, context) {
                    (Some(agent), Some(id)) => Ok(Some(Follow {
                        agent,
                        why: format!("tasks of context {id}"),
                        body: None,
                        lesson: None,
                    })),
                    // Over gRPC the body is protobuf, not read: no
                    // contextId can help there.
                    (_, _) if grpc => Err(MeshError::new(
                        ErrorKind::Unsupported,
                        me,
                        format!(
                            "mesh.{tenant}.dmsc does not list tasks over gRPC (the mesh does not read protobuf \
                             requests): list an agent's tasks at the agent (`<agent>.{tenant}.dmsc`, named by \
                             `dmsc-agent` in its answers), or over JSON-RPC or HTTP+JSON with the contextId"
                        ),
                    )),
                    (_, context) => Err(MeshError::new(
                        ErrorKind::Unsupported,
                        me,
                        format!(
                            "mesh.{tenant}.dmsc lists only the tasks of a conversation this node routed for this caller{}: \
                             pass its contextId, or list an agent's tasks at the agent (`<agent>.{tenant}.dmsc`, \
                             named by `dmsc-agent` in its answers)",
                            context.map(|c| format!(" (context `{c}` is not one)")).unwrap_or_default()
                        ),
                    )),
                };
            }
        };
        // An ask is the mesh's question, not an agent's task: there is no
        // state to get, cancel or subscribe to, only a reply to give.
        if let Some(id) = task
            .as_deref()
            .filter(|id| task_method && id.starts_with(ASK_TASK_PREFIX))
        {
            return Err(MeshError::new(
                ErrorKind::Unsupported,
                me,
                format!(
                    "`{id}` is this mesh's question, not an agent's task: it has no state to get, cancel or \
                     subscribe to (its candidates are in the answer that asked). Reply in it with a message \
                     naming a candidate (its name or number), or call the agent you choose by name \
                     (`<agent>.{tenant}.dmsc`)"
                ),
            ));
        }
        // An answer in an ask's task (or, without a task, its context).
        let ask = task
            .as_deref()
            .or(context.as_deref())
            .filter(|id| id.starts_with(ASK_TASK_PREFIX));
        if let Some(ask_task) = ask {
            return self
                .ask_reply(tenant, caller, scope, ask_task, body)
                .map(Some);
        }
        let mut known = intent.followups.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(id) = task {
            return match known.agent(scope, &Ref::Task(id.clone()), now) {
                Some(agent) => Ok(Some(Follow {
                    agent,
                    why: format!("follow-up of task {id}"),
                    body: None,
                    lesson: None,
                })),
                None => Err(not_found(format!("task `{id}`"))),
            };
        }
        Ok(context.and_then(|id| {
            let agent = known.agent(scope, &Ref::Context(id.clone()), now)?;
            Some(Follow {
                agent,
                why: format!("follow-up of context {id}"),
                body: None,
                lesson: None,
            })
        }))
    }

    /// A reply in an ask's task: the agent it names (by name or number)
    /// gets the request first asked about.
    fn ask_reply(
        &self,
        tenant: &str,
        caller: &crate::policy::caller::Caller,
        scope: &crate::intent::followup::Scope,
        ask_task: &str,
        body: &ReqBody,
    ) -> Result<Follow, MeshError> {
        use crate::intent::followup::{chosen, with_asked_text};
        let me = &self.me;
        let now = std::time::Instant::now();
        let intent = &self.delegator.intent;
        let by_name = format!(
            "call the agent you choose by name (`<agent>.{tenant}.dmsc`) with your request"
        );
        let bad = |what: String| MeshError::new(ErrorKind::BadRequest, me, what);
        let Some(ask) = intent
            .followups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ask(scope, ask_task, now)
        else {
            return Err(MeshError::new(
                ErrorKind::TaskNotFound,
                me,
                format!(
                    "ask `{ask_task}` is not known to this node (an ask is answered on the node that asked, \
                     by the caller asked, within an hour); {by_name}"
                ),
            ));
        };
        let ReqBody::Buffered(b) = body else {
            return Err(bad(format!(
                "the reply to ask `{ask_task}` could not be read; {by_name}"
            )));
        };
        if ask.text.is_empty() {
            return Err(bad(format!(
                "the text of ask `{ask_task}` was too long to keep; {by_name}"
            )));
        }
        let reply = crate::proto::a2a::intent_text(b).unwrap_or_default();
        let Some(agent) = chosen(&reply, &ask.candidates).cloned() else {
            let list: Vec<String> = ask
                .candidates
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{} ({c})", i + 1))
                .collect();
            return Err(bad(format!(
                "reply to ask `{ask_task}` with the name or number of one of its candidates: {}; or {by_name}",
                list.join(", ")
            )));
        };
        let Some(rewritten) = with_asked_text(b, &ask.text) else {
            return Err(bad(format!(
                "the reply to ask `{ask_task}` is not an A2A message; {by_name}"
            )));
        };
        // An authenticated caller of the tenant teaches its routing, as
        // when it calls the chosen agent by name.
        let lesson = (!caller.id.starts_with("ingress:") && caller.tenant == tenant)
            .then(|| {
                intent
                    .asks
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .resolve(tenant, &caller.id, &agent, Some(&ask.id), None, now)
            })
            .flatten()
            .map(|text| crate::intent::Lesson {
                tenant: tenant.to_string(),
                agent: agent.clone(),
                caller: caller.id.clone(),
                text,
            });
        Ok(Follow {
            why: format!("answer to ask {}: {agent}", ask.id),
            agent,
            body: Some(rewritten),
            lesson,
        })
    }
}

impl Ingress {
    /// Intent before delegating: the query's embedding, an ask (ask mode),
    /// learning from a call that resolves one ([`crate::intent`]).
    async fn intent_step(
        &self,
        tenant: &str,
        caller: &crate::policy::caller::Caller,
        target: &Target,
        body: &ReqBody,
        // the consumer's and the provider's policies (looked up once by
        // `handle`) and the request's data tags
        (consumer, provider, data_tags): (
            Option<&dmsc_policy::Policy>,
            Option<&dmsc_policy::Policy>,
            &[String],
        ),
        // the request's intent headers, path and A2A binding and version
        (mode, choice, path, header_text, speaks): (
            Option<&str>,
            Option<&str>,
            &str,
            Option<&str>,
            dmsc_registry::Speaks<'_>,
        ),
    ) -> Result<crate::intent::Prepared, Response<Body>> {
        let body = match body {
            ReqBody::Buffered(b) => Some(&b[..]),
            ReqBody::Streaming(_) => None,
        };
        let allowed = |name: &str, tags: &[String]| {
            crate::policy::outbound(
                consumer,
                provider,
                crate::policy::Route {
                    caller: &caller.id,
                    caller_tenant: &caller.tenant,
                    tenant,
                    target: dmsc_policy::Addressed::Agent { name, tags },
                    data_tags,
                    crosses_region: false,
                },
            )
            .is_ok()
        };
        crate::intent::prepare(
            &self.delegator.intent,
            &self.delegator.mesh,
            crate::intent::Step {
                tenant,
                caller: &caller.id,
                caller_tenant: &caller.tenant,
                authenticated: !caller.id.starts_with("ingress:"),
                target,
                body,
                mode,
                choice,
                allowed: &allowed,
                path,
                header_text,
                speaks,
            },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_map_to_targets() {
        assert_eq!(
            parse_host("billing.acme.dmsc"),
            Ok(("acme".into(), HostTarget::Agent("billing".into())))
        );
        assert_eq!(
            parse_host("Invoices.cap.acme.dmsc."),
            Ok(("acme".into(), HostTarget::Tag("invoices".into())))
        );
        assert_eq!(
            parse_host("mesh.acme.dmsc"),
            Ok(("acme".into(), HostTarget::Intent))
        );
        assert!(parse_host("example.com").is_err());
        assert!(parse_host("a.b.c.d.dmsc").is_err());
        assert!(parse_host(".acme.dmsc").is_err());
        assert!(parse_host("acme.dmsc").is_err());
        assert!(parse_host("x.cap..dmsc").is_err());
        assert!(parse_host("a.b.cap.acme.dmsc").is_err());
        assert!(parse_host("a b.acme.dmsc").is_err());
        assert!(parse_host("a\"b.acme.dmsc").is_err());
        assert!(parse_host("sensor_2.acme.dmsc").is_ok());
        assert!(matches!(
            parse_host("BILLING.Acme.DMSC"),
            Ok((t, HostTarget::Agent(a))) if t == "acme" && a == "billing"
        ));
    }

    #[test]
    fn trace_ids_are_32_hex_digits_as_formatted() {
        for id in [
            0u128,
            1,
            u128::MAX,
            0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
        ] {
            assert_eq!(crate::proto::hex(&id.to_be_bytes()), format!("{id:032x}"));
        }
    }

    #[test]
    fn ports_are_stripped_from_host_headers() {
        let req = Request::builder()
            .uri("/x")
            .header("host", "billing.acme.dmsc:15001")
            .body(())
            .expect("request");
        assert_eq!(request_host(&req).as_deref(), Some("billing.acme.dmsc"));
        let req = Request::builder()
            .uri("http://billing.acme.dmsc/x")
            .body(())
            .expect("request");
        assert_eq!(request_host(&req).as_deref(), Some("billing.acme.dmsc"));
    }
}
