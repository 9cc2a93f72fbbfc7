//! Who may read what through the admin API.
//!
//! Three kinds of caller: the node admin token (everything, reads and
//! changes), a tenant read token (`dmsc-node admin-token create --tenant T
//! --read-only`: that tenant's agents, audit entries and policy, no changes),
//! and no token at all (everything readable while `[admin] open_reads` is
//! true, the default, so `dmsc-node status` on the host works as it always
//! did; node health only — `/live`, `/ready`, `/v1/check` — when it is false).
//!
//! Every read endpoint asks [`read_scope`] once and filters what it returns
//! by the [`ReadScope`]; an endpoint that cannot be split by tenant (metrics,
//! revocations, the token list) asks [`require_all`]. The filtering of the
//! status report is a pure function ([`scope_status`]) so its tests need no
//! node.

// The `Err` of these functions is the HTTP answer itself, made once per
// refused admin call and returned as is: boxing it would buy nothing.
#![allow(clippy::result_large_err)]

use std::time::SystemTime;

use hyper::{Request, Response, StatusCode};

use super::status::StatusReport;
use super::{json, Body, Shared};
use crate::security::read_tokens::is_read_token;

/// What a reader may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadScope {
    /// Every tenant: the node admin token, or no token while reads are open.
    All,
    /// One tenant's agents, audit entries and policy only.
    Tenant(String),
}

impl ReadScope {
    /// True if this reader may see what belongs to `tenant`.
    pub fn allows(&self, tenant: &str) -> bool {
        match self {
            ReadScope::All => true,
            ReadScope::Tenant(t) => t == tenant,
        }
    }

    /// The one tenant this reader is limited to, if any.
    pub fn tenant(&self) -> Option<&str> {
        match self {
            ReadScope::All => None,
            ReadScope::Tenant(t) => Some(t),
        }
    }
}

/// What the caller's `Authorization` header proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Caller {
    Anonymous,
    Admin,
    /// A tenant read token of this tenant.
    Tenant(String),
}

fn unauthorized(why: String) -> Response<Body> {
    let mut r = json(
        StatusCode::UNAUTHORIZED,
        &serde_json::json!({ "error": why }),
    );
    r.headers_mut().insert(
        hyper::header::WWW_AUTHENTICATE,
        hyper::header::HeaderValue::from_static("Bearer"),
    );
    r
}

fn admin_token_hint(s: &Shared) -> String {
    format!(
        "the node admin token is in `{}` (CLI: --admin-token FILE)",
        s.config
            .data_dir
            .join(crate::security::ADMIN_TOKEN_FILE)
            .display()
    )
}

/// Who the caller is. A token that is presented but wrong is a 401 even
/// where no token is needed: a caller who meant to be someone should learn
/// that it is not.
pub(crate) fn caller<B>(req: &Request<B>, s: &Shared) -> Result<Caller, Response<Body>> {
    let Some(value) = req.headers().get(hyper::header::AUTHORIZATION) else {
        return Ok(Caller::Anonymous);
    };
    let Some(token) = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")) else {
        return Err(unauthorized(
            "the admin API takes `Authorization: Bearer <token>` only".into(),
        ));
    };
    if s.security.admin_token_ok(token) {
        return Ok(Caller::Admin);
    }
    if is_read_token(token) {
        return s
            .security
            .read_tokens
            .check(token, SystemTime::now())
            .map(Caller::Tenant)
            .map_err(|e| unauthorized(e.to_string()));
    }
    Err(unauthorized(format!(
        "the bearer token is neither this node's admin token nor a tenant read token; {}",
        admin_token_hint(s)
    )))
}

/// The scope of a read: what every read endpoint filters by. With no token,
/// [`ReadScope::All`] while `[admin] open_reads` is true, else a 401 that
/// says which tokens would do.
pub(crate) fn read_scope<B>(req: &Request<B>, s: &Shared) -> Result<ReadScope, Response<Body>> {
    match caller(req, s)? {
        Caller::Admin => Ok(ReadScope::All),
        Caller::Tenant(t) => Ok(ReadScope::Tenant(t)),
        Caller::Anonymous if s.config.admin_open_reads => Ok(ReadScope::All),
        Caller::Anonymous => Err(unauthorized(format!(
            "reads need a token on this node ([admin] open_reads = false; only /live, /ready and /v1/check are open): \
             `Authorization: Bearer <token>` with a tenant read token (`dmsc-node admin-token create --tenant T --read-only`) \
             or the node admin token; {}",
            admin_token_hint(s)
        ))),
    }
}

/// Refuses a tenant-scoped reader for what cannot be split by tenant.
pub fn require_all(scope: &ReadScope, what: &str) -> Result<(), Response<Body>> {
    match scope {
        ReadScope::All => Ok(()),
        ReadScope::Tenant(t) => Err(json(
            StatusCode::FORBIDDEN,
            &serde_json::json!({
                "error": format!("{what} covers every tenant; a read token of tenant `{t}` cannot read it (use the node admin token)"),
                "code": "tenant_scope",
            }),
        )),
    }
}

/// Changes need the node admin token: 401 without it, 403 with a tenant
/// read token (it proves who the caller is, and that caller may only read).
pub(crate) fn require_admin<B>(req: &Request<B>, s: &Shared) -> Result<(), Response<Body>> {
    match caller(req, s)? {
        Caller::Admin => Ok(()),
        Caller::Tenant(t) => Err(json(
            StatusCode::FORBIDDEN,
            &serde_json::json!({
                "error": format!("this is a read-only token of tenant `{t}`: it cannot change the node ({} {}); changes need the node admin token",
                    req.method(), req.uri().path()),
                "code": "read_only",
            }),
        )),
        Caller::Anonymous => Err(unauthorized(format!(
            "changing the node needs its admin token: `Authorization: Bearer <token>`; {}",
            admin_token_hint(s)
        ))),
    }
}

/// The status report as `scope` may see it: a tenant sees its own agents
/// and pending agents, the peers that are home to them, and the node-level
/// facts that say nothing about other tenants (this node, its paths, gossip
/// health). Join-token counts, certificates issued and relay client names
/// span tenants and are left out.
pub fn scope_status(mut report: StatusReport, scope: &ReadScope) -> StatusReport {
    let ReadScope::Tenant(tenant) = scope else {
        return report;
    };
    report.agents.retain(|a| &a.tenant == tenant);
    report.pending_agents.retain(|p| &p.tenant == tenant);
    let homes: std::collections::HashSet<&str> =
        report.agents.iter().map(|a| a.node.as_str()).collect();
    let peers = std::mem::take(&mut report.peers);
    report.peers = peers
        .into_iter()
        .filter(|p| homes.contains(p.name.as_str()))
        .collect();
    let c = &mut report.certificates;
    c.tokens = None;
    c.agents_issued = None;
    c.revoked = None;
    if let Some(r) = &mut report.paths.relay {
        r.clients.clear();
    }
    report.intent.tenants.retain(|t| t == tenant);
    // Node-wide: bindings of every tenant.
    report.intercept = None;
    if let Some(m) = &mut report.mqtt {
        m.tenants.retain(|t| t == tenant);
        m.active.retain(|t| t == tenant);
        m.sessions.retain(|s| s.tenants.contains(tenant));
        for s in &mut m.sessions {
            s.tenants.retain(|t| t == tenant);
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::super::status::*;
    use super::*;

    fn agent(tenant: &str, name: &str, node: &str) -> AgentStatus {
        AgentStatus {
            tenant: tenant.into(),
            name: name.into(),
            node: node.into(),
            skills: vec![],
            tags: vec![],
            health: "healthy".into(),
            circuit: "closed".into(),
            in_flight: 0,
            outstanding: 0,
            p50_ms: None,
            ewma_ms: 0.0,
            error_rate: 0.0,
            local: node == "n0",
            protocol: None,
        }
    }

    fn peer(name: &str) -> PeerStatus {
        PeerStatus {
            name: name.into(),
            region: "r".into(),
            addr: "127.0.0.1:1".into(),
            state: "alive".into(),
            rtt_ms: None,
            last_seen_ms: 0,
            generation: 1,
            connected: true,
            verified: true,
            path: None,
            via: None,
            transport: None,
            path_note: None,
            reachability: "direct".into(),
            relays: vec![],
            mtu: None,
            circuit: "closed".into(),
        }
    }

    fn report() -> StatusReport {
        StatusReport {
            intercept: None,
            node: NodeStatus {
                name: "n0".into(),
                region: "r".into(),
                spiffe_id: "spiffe://td/node/n0".into(),
                trust_domain: "td".into(),
                overlay_addr: "127.0.0.1:1".into(),
                admin_addr: "127.0.0.1:2".into(),
                version: "0".into(),
                generation: 1,
                uptime_secs: 1,
                cert_not_after: "x".into(),
                cert_expires_in_secs: 1,
                draining: false,
                in_flight: 0,
            },
            peers: vec![peer("n1"), peer("n2")],
            paths: PathsStatus {
                relay: Some(RelayRoleStatus {
                    clients: vec!["n2".into()],
                    datagrams: 1,
                    bytes: 1,
                    refused: 0,
                }),
                ..Default::default()
            },
            gossip: GossipStatus {
                interval_ms: 1,
                phi_threshold: 8.0,
                rounds: 1,
                alive: 3,
                suspect: 0,
                dead: 0,
                left: 0,
                bytes_sent: 0,
                bytes_received: 0,
            },
            agents: vec![
                agent("acme", "a1", "n0"),
                agent("acme", "a2", "n1"),
                agent("globex", "g1", "n2"),
            ],
            pending_agents: vec![
                PendingAgent {
                    tenant: "globex".into(),
                    name: None,
                    url: "http://g".into(),
                    error: "down".into(),
                },
                PendingAgent {
                    tenant: "acme".into(),
                    name: Some("a".into()),
                    url: "http://a".into(),
                    error: "down".into(),
                },
            ],
            certificates: CertStatus {
                tokens: Some([3, 1, 1, 1]),
                agents_issued: Some(4),
                revoked: Some(2),
                ..Default::default()
            },
            intent: IntentStatus::default(),
            mqtt: None,
        }
    }

    #[test]
    fn a_tenant_sees_its_agents_and_their_homes_only() {
        let r = scope_status(report(), &ReadScope::Tenant("acme".into()));
        let names: Vec<&str> = r.agents.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["a1", "a2"]);
        assert_eq!(r.pending_agents.len(), 1);
        assert_eq!(r.pending_agents[0].tenant, "acme");
        let peers: Vec<&str> = r.peers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(peers, ["n1"], "n2 is home to globex only");
        assert_eq!(r.certificates.tokens, None);
        assert_eq!(r.certificates.agents_issued, None);
        assert_eq!(r.certificates.revoked, None);
        assert!(!r.render().contains("agent certificate(s) issued"));
        assert!(r.paths.relay.as_ref().is_some_and(|x| x.clients.is_empty()));
        assert_eq!(r.node.name, "n0", "node facts stay");
        let text = serde_json::to_string(&r).expect("json");
        assert!(!text.contains("globex"), "{text}");
    }

    #[test]
    fn the_admin_scope_sees_everything() {
        let r = scope_status(report(), &ReadScope::All);
        assert_eq!(r.agents.len(), 3);
        assert_eq!(r.peers.len(), 2);
        assert_eq!(r.certificates.tokens, Some([3, 1, 1, 1]));
        assert!(ReadScope::All.allows("globex"));
        assert!(!ReadScope::Tenant("acme".into()).allows("globex"));
        assert!(require_all(&ReadScope::Tenant("acme".into()), "x").is_err());
        assert!(require_all(&ReadScope::All, "x").is_ok());
    }
}
