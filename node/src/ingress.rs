//! Ingress: where agents send their requests to the mesh.
//!
//! One listener per `[[ingress]]` entry, each bound to a tenant (callers get
//! per-request identities in a later issue). HTTP/1.1, h2 and h2c are
//! detected per connection. Both request forms work: proxy form (an agent
//! with `HTTP_PROXY` sends `GET http://billing.acme.dmsc/...`) and origin
//! form (intercepted traffic, target in `Host`). The target comes from the
//! host name:
//!
//! - `<agent>.<tenant>.dmsc`      -> that agent
//! - `<tag>.cap.<tenant>.dmsc`    -> the best agent with a skill tagged `<tag>`
//! - `mesh.<tenant>.dmsc`         -> by intent: the `dmsc-intent` header, or the
//!   text of an A2A `message/send` / `SendMessage` (and streaming) request
//!
//! Bodies up to `delegation.max_buffered_body` with a known length are read
//! first (so a failed attempt can be retried elsewhere and intent can be
//! read); others stream through untouched. Nothing else of the body is
//! parsed on the hot path.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use dmsc_registry::Target;
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper::header::HOST;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tracing::{debug, Instrument};

use crate::delegate::{Delegation, Delegator, ReqBody};
use crate::http::{parse_timeout, Body, BoxError, ErrorKind, MeshError};

/// What a host name asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostTarget {
    Agent(String),
    Tag(String),
    Intent,
}

/// Parses `<agent>.<tenant>.dmsc`, `<tag>.cap.<tenant>.dmsc`, `mesh.<tenant>.dmsc`.
pub fn parse_host(host: &str) -> Result<(String, HostTarget), String> {
    let h = host.trim_end_matches('.').to_ascii_lowercase();
    let usage =
        "mesh addresses are <agent>.<tenant>.dmsc, <tag>.cap.<tenant>.dmsc or mesh.<tenant>.dmsc";
    let Some(rest) = h.strip_suffix(".dmsc") else {
        return Err(format!("`{host}` is not a mesh address: {usage}"));
    };
    let labels: Vec<&str> = rest.split('.').collect();
    match labels.as_slice() {
        ["mesh", tenant] => Ok((tenant.to_string(), HostTarget::Intent)),
        [agent, tenant] if !agent.is_empty() && !tenant.is_empty() => {
            Ok((tenant.to_string(), HostTarget::Agent(agent.to_string())))
        }
        [tag, "cap", tenant] if !tag.is_empty() && !tenant.is_empty() => {
            Ok((tenant.to_string(), HostTarget::Tag(tag.to_string())))
        }
        _ => Err(format!("`{host}` is not a mesh address: {usage}")),
    }
}

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
    format!("{:032x}", rand::random::<u128>())
}

/// One ingress listener.
#[derive(Debug, Clone)]
pub struct Ingress {
    pub tenant: String,
    pub listen: SocketAddr,
    pub delegator: Arc<Delegator>,
}

impl Ingress {
    /// Accepts connections until the task is dropped; each connection is a
    /// task of this loop's own set, so stopping the loop stops them.
    pub async fn serve(self, listener: TcpListener) {
        let this = Arc::new(self);
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            debug!(error = %e, "ingress accept failed");
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let this = this.clone();
                    conns.spawn(
                        async move {
                            let svc = service_fn(move |req| {
                                let this = this.clone();
                                async move { Ok::<_, std::convert::Infallible>(this.handle(req).await) }
                            });
                            if let Err(e) = auto::Builder::new(TokioExecutor::new())
                                .serve_connection(TokioIo::new(stream), svc)
                                .await
                            {
                                debug!(peer = %peer, error = %e, "ingress connection ended");
                            }
                        }
                        .in_current_span(),
                    );
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let me = &self.delegator.me;
        let Some(host) = request_host(&req) else {
            return MeshError::new(ErrorKind::BadTarget, me, "request has no Host").response(None);
        };
        let (tenant, target) = match parse_host(&host) {
            Ok(t) => t,
            Err(e) => return MeshError::new(ErrorKind::BadTarget, me, e).response(None),
        };
        if tenant != self.tenant {
            return MeshError::new(
                ErrorKind::Forbidden,
                me,
                format!(
                    "this ingress serves tenant `{}`; `{host}` belongs to tenant `{tenant}` and cross-tenant delegation is not allowed",
                    self.tenant
                ),
            )
            .response(None);
        }
        let cfg = &self.delegator.cfg;
        let timeout = req
            .headers()
            .get("dmsc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_timeout)
            .unwrap_or(cfg.timeout);
        let deadline = tokio::time::Instant::now() + timeout;
        let trace = trace_id(&req);
        let http2 = req.version() == hyper::Version::HTTP_2;
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        let method = req.method().clone();
        let header_intent = req
            .headers()
            .get("dmsc-intent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let (parts, body) = req.into_parts();
        let needs_text = target == HostTarget::Intent && header_intent.is_none();
        let buffer = body.is_end_stream()
            || needs_text
            || body
                .size_hint()
                .exact()
                .is_some_and(|n| n as usize <= cfg.max_buffered_body);
        let body = if buffer {
            let read = tokio::time::timeout_at(
                deadline,
                http_body_util::Limited::new(body, cfg.max_buffered_body).collect(),
            )
            .await;
            let Ok(read) = read else {
                return MeshError::new(
                    ErrorKind::Timeout,
                    me,
                    "the deadline passed while reading the request body",
                )
                .response(None);
            };
            match read {
                Ok(c) => ReqBody::Buffered(c.to_bytes()),
                Err(e) => {
                    return MeshError::new(
                        ErrorKind::BadRequest,
                        me,
                        format!(
                            "reading the request body (limit {} bytes): {e}",
                            cfg.max_buffered_body
                        ),
                    )
                    .response(None)
                }
            }
        } else {
            ReqBody::Streaming(body.map_err(|e| Box::new(e) as BoxError).boxed())
        };
        let target = match target {
            HostTarget::Agent(a) => Target::Agent(a),
            HostTarget::Tag(t) => Target::Tag(t),
            HostTarget::Intent => {
                let text = match (&header_intent, &body) {
                    (Some(t), _) => Some(t.clone()),
                    (None, ReqBody::Buffered(b)) => crate::a2a::intent_text(b),
                    _ => None,
                };
                match text {
                    Some(t) if !t.trim().is_empty() => Target::Intent(t),
                    _ => {
                        let req_bytes: Option<Bytes> = match &body {
                            ReqBody::Buffered(b) => Some(b.clone()),
                            _ => None,
                        };
                        return MeshError::new(
                            ErrorKind::BadRequest,
                            me,
                            "routing by intent needs a `dmsc-intent` header or an A2A message/send (SendMessage) request with text parts",
                        )
                        .response(req_bytes.as_deref());
                    }
                }
            }
        };
        self.delegator
            .delegate(Delegation {
                tenant,
                caller: format!("ingress:{}", self.listen),
                target,
                deadline,
                trace_id: trace,
                method,
                path,
                http2,
                headers: parts.headers,
                body,
            })
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
