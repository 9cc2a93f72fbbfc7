//! The outcome of a delegation, as a value: served (by which agent, on
//! which node, why it was chosen, after how many attempts) or failed (a
//! [`MeshError`]: what kind, where, for which agent). Metrics, the audit
//! record, the `dmsc-*` response headers and the JSON-RPC or
//! problem-details body are all derived from it, once, at the edge
//! ([`Outcome::render`]); nothing is written into headers to be read back.

use dmsc_registry::AgentId;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Response, StatusCode};

use super::http::{Body, MeshError};

/// Who served a delegation, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub agent: AgentId,
    /// The agent's home node.
    pub node: String,
    /// Why selection chose it (`dmsc-route`).
    pub why: String,
    /// Candidates tried, this one included.
    pub attempts: u32,
}

/// How one delivery attempt failed, as the retry rules need it.
#[derive(Debug)]
pub enum Failure {
    /// The agent certainly never saw the request.
    NotDelivered(MeshError),
    /// It may have.
    MaybeDelivered(MeshError),
    /// The caller caused it (bad or cut request body, stalled upload, a
    /// request the home node judged malformed): charged to no agent, never
    /// retried.
    Caller(MeshError),
    /// The path to the agent's home node failed: no stream could be opened
    /// to it, or its connection was lost before it answered. Nothing is
    /// known about the agent: charged to this node's circuit for the path,
    /// not to the agent. With `maybe_delivered` the request had been sent.
    Path {
        error: MeshError,
        maybe_delivered: bool,
    },
}

impl Failure {
    pub fn error(&self) -> &MeshError {
        match self {
            Failure::NotDelivered(e)
            | Failure::MaybeDelivered(e)
            | Failure::Caller(e)
            | Failure::Path { error: e, .. } => e,
        }
    }

    /// Whether the request may have reached the agent.
    pub fn maybe_delivered(&self) -> bool {
        match self {
            Failure::NotDelivered(_) => false,
            Failure::Path {
                maybe_delivered, ..
            } => *maybe_delivered,
            Failure::MaybeDelivered(_) | Failure::Caller(_) => true,
        }
    }
}

/// A finished delegation.
#[derive(Debug)]
pub enum Outcome {
    Served(Served, Response<Body>),
    Failed(MeshError),
}

/// The response headers the mesh owns; an agent's own are dropped.
const MESH_HEADERS: [&str; 4] = ["dmsc-agent", "dmsc-node", "dmsc-route", "dmsc-error"];

impl Outcome {
    /// The metrics and audit label: `ok`, `agent-error` (the agent answered
    /// 5xx) or the mesh error kind.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Served(_, r) if r.status().is_server_error() => "agent-error",
            Outcome::Served(..) => "ok",
            Outcome::Failed(e) => e.kind.as_str(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Outcome::Served(_, r) => r.status(),
            Outcome::Failed(e) => e.kind.status(),
        }
    }

    pub fn served(&self) -> Option<&Served> {
        match self {
            Outcome::Served(s, _) => Some(s),
            Outcome::Failed(_) => None,
        }
    }

    /// The response for the caller: the agent's, with who served it and
    /// why (`dmsc-agent`, `dmsc-node`, `dmsc-route`), or the mesh's error in
    /// the dialect of the request: a gRPC status for a gRPC call, else by
    /// the request's body `request` (JSON-RPC or problem details).
    pub fn render(self, request: Option<&[u8]>, grpc: bool) -> Response<Body> {
        match self {
            Outcome::Failed(e) if grpc => e.grpc_response(),
            Outcome::Failed(e) => e.response(request),
            Outcome::Served(s, mut resp) => {
                let h = resp.headers_mut();
                for name in MESH_HEADERS {
                    h.remove(name);
                }
                let mut set = |name: &'static str, value: &str| {
                    if let Ok(v) = HeaderValue::from_str(value) {
                        h.insert(HeaderName::from_static(name), v);
                    }
                };
                set("dmsc-agent", &s.agent.to_string());
                set("dmsc-node", &s.node);
                set("dmsc-route", &s.why);
                resp
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::http::{full, ErrorKind};

    #[test]
    fn the_edge_renders_who_served_and_drops_an_agents_own_mesh_headers() {
        let mut agent_resp = Response::new(full("hi"));
        agent_resp
            .headers_mut()
            .insert("dmsc-error", HeaderValue::from_static("timeout"));
        agent_resp
            .headers_mut()
            .insert("dmsc-agent", HeaderValue::from_static("acme/forged"));
        let served = Served {
            agent: AgentId::new("acme", "billing"),
            node: "eu-1".into(),
            why: "only acme/billing".into(),
            attempts: 1,
        };
        let o = Outcome::Served(served, agent_resp);
        assert_eq!(o.label(), "ok");
        let r = o.render(None, false);
        assert_eq!(r.headers()["dmsc-agent"], "acme/billing");
        assert_eq!(r.headers()["dmsc-node"], "eu-1");
        assert!(r.headers().get("dmsc-error").is_none());

        let e = MeshError::new(ErrorKind::Forbidden, "us-1", "not your tenant");
        let o = Outcome::Failed(e);
        assert_eq!(
            (o.label(), o.status()),
            ("forbidden", StatusCode::FORBIDDEN)
        );
        let r = o.render(None, false);
        assert_eq!(r.headers()["dmsc-error"], "forbidden");
        assert_eq!(r.headers()["dmsc-node"], "us-1");
    }
}
