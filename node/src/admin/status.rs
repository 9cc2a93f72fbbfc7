//! The status report: built by the node, served on `/v1/status`, rendered by
//! `dmsc-node status`. The CLI is only a client of the admin API, so what an
//! operator reads and what a script parses are the same data.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub node: NodeStatus,
    pub peers: Vec<PeerStatus>,
    #[serde(default)]
    pub paths: PathsStatus,
    pub gossip: GossipStatus,
    /// Every agent this node can route to (its own and the mesh's).
    #[serde(default)]
    pub agents: Vec<AgentStatus>,
    /// This node's agents that have not onboarded yet, with the reason.
    #[serde(default)]
    pub pending_agents: Vec<PendingAgent>,
    #[serde(default)]
    pub certificates: CertStatus,
    #[serde(default)]
    pub intent: IntentStatus,
    /// Transparent interception, if `[intercept]` is set.
    #[serde(default)]
    pub intercept: Option<InterceptStatus>,
    /// The MQTT bridge, if `[mqtt]` is set.
    #[serde(default)]
    pub mqtt: Option<MqttStatus>,
}

/// The MQTT bridge of edge agents.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MqttStatus {
    pub broker: String,
    pub connected: bool,
    pub tenants: Vec<String>,
    /// Of `tenants`, those this node is the active bridge of (it registers
    /// their edge agents); it stands by for the others.
    #[serde(default)]
    pub active: Vec<String>,
    /// Edge agents this node is home to.
    pub agents: usize,
    pub connects: u64,
    pub delegations: u64,
    pub calls: u64,
    pub refused: u64,
    /// Answers that came after their delegation gave up, or twice.
    #[serde(default)]
    pub late_replies: u64,
    /// Calls the broker delivered again (DUP) after the bridge took them.
    #[serde(default)]
    pub duplicates: u64,
    /// One per MQTT session (a tenant with credentials of its own, or an
    /// embedded broker, has its own).
    #[serde(default)]
    pub sessions: Vec<MqttSession>,
}

/// `; ports 80, 8080` for a binding limited to some ports, else nothing.
pub fn ports_text(ports: &[u16]) -> String {
    if ports.is_empty() {
        return String::new();
    }
    let p: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!("; ports {}", p.join(", "))
}

/// Transparent interception on this node.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InterceptStatus {
    /// What cgroup bindings use: `ebpf` or `nftables` (then `fallback`
    /// says why not eBPF); `off` when interception could not start (then
    /// `reason` says why).
    pub mechanism: String,
    pub reason: Option<String>,
    #[serde(default)]
    pub fallback: Option<String>,
    /// Other nftables tables that redirect locally generated connections
    /// too: they may take intercepted connections first.
    #[serde(default)]
    pub competing_tables: Vec<String>,
    /// The eBPF listener (nftables bindings list their own).
    pub listen: Option<String>,
    #[serde(default)]
    pub bound: Vec<crate::intercept::BindingStatus>,
    /// Connects the kernel sent to the listener.
    pub redirected: u64,
    pub http: u64,
    pub passthrough: u64,
    /// Connections to the listener that were not redirected (refused).
    pub unmatched: u64,
}

/// One MQTT session of the bridge.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MqttSession {
    pub broker: String,
    pub client_id: String,
    pub tenants: Vec<String>,
    pub connected: bool,
    /// Why it cannot reach its broker, while it cannot (e.g. bad credentials).
    #[serde(default)]
    pub error: Option<String>,
}

/// Routing by intent on this node.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IntentStatus {
    /// `hybrid` (BM25 + sentence embeddings) or `lexical-only`.
    pub scorer: String,
    pub model_dir: Option<String>,
    /// `best` or `ask` (the default; a request's `dmsc-intent-mode` wins).
    pub mode: String,
    /// Tenants whose cards this node embeds.
    pub tenants: Vec<String>,
}

/// Certificates: what this node presents, issues and refuses.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CertStatus {
    /// Serial of the node certificate in use (after any reload).
    pub node_serial: String,
    /// RFC 3339 expiry of the node's issuing certificate, if it has one.
    pub issuer_not_after: Option<String>,
    /// Agent certificates this node issued since it started (left out for a
    /// tenant token: they span tenants).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agents_issued: Option<u64>,
    /// Revoked certificates known mesh-wide (left out for a tenant token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<usize>,
    /// Join tokens: issued, used, expired, active.
    pub tokens: Option<[usize; 4]>,
    /// Credential reloads since start.
    pub reloads: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentStatus {
    pub tenant: String,
    pub name: String,
    /// Home node.
    pub node: String,
    pub skills: Vec<String>,
    pub tags: Vec<String>,
    /// `healthy`, `unhealthy` or `unknown` (as the home node reports it).
    pub health: String,
    /// This node's circuit for the agent: `closed`, `open`, `half-open`.
    pub circuit: String,
    /// Requests in progress at the agent (home node's count).
    pub in_flight: u32,
    /// Requests this node has outstanding to the agent.
    pub outstanding: u32,
    /// Median latency over recent requests (home node only), else null.
    pub p50_ms: Option<f64>,
    /// The home node's moving average of the agent's latency.
    pub ewma_ms: f64,
    pub error_rate: f64,
    /// True when this node is the agent's home.
    pub local: bool,
    /// How the home node speaks to it (`http1`, `h2c`, `grpc`: pinned or
    /// found by the health checks); only on the home node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingAgent {
    pub tenant: String,
    /// The name it was registered with, if any (what `DELETE
    /// /v1/agents/<tenant>/<name>` takes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub url: String,
    pub error: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub region: String,
    pub spiffe_id: String,
    pub trust_domain: String,
    pub overlay_addr: String,
    pub admin_addr: String,
    pub version: String,
    pub generation: u64,
    pub uptime_secs: u64,
    /// RFC 3339.
    pub cert_not_after: String,
    /// Negative once expired.
    pub cert_expires_in_secs: i64,
    /// Shutting down: no new requests, the ones in flight finishing.
    #[serde(default)]
    pub draining: bool,
    /// Requests the node is working on (from its ingress and from peers).
    #[serde(default)]
    pub in_flight: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub region: String,
    pub addr: String,
    /// `alive`, `suspect`, `dead` or `left`.
    pub state: String,
    /// Round-trip time of the QUIC connection, when one is up.
    pub rtt_ms: Option<f64>,
    /// Milliseconds since this node last saw the peer's heartbeat advance.
    pub last_seen_ms: u64,
    pub generation: u64,
    /// A QUIC connection to the peer is up right now.
    pub connected: bool,
    /// That connection's certificate proves the name shown (SPIFFE ID).
    pub verified: bool,
    /// How the connection's packets travel: `direct` or `relayed`.
    #[serde(default)]
    pub path: Option<String>,
    /// The relay, when relayed.
    #[serde(default)]
    pub via: Option<String>,
    /// `quic` (UDP) or `tcp` (a TCP + TLS relay session).
    #[serde(default)]
    pub transport: Option<String>,
    /// Why a relayed peer is not direct, or how its direct path was found.
    #[serde(default)]
    pub path_note: Option<String>,
    /// What the peer announces: `direct` or `relayed`.
    #[serde(default)]
    pub reachability: String,
    /// The relays the peer announces sessions with.
    #[serde(default)]
    pub relays: Vec<String>,
    /// The largest UDP payload the connection sends now (path MTU
    /// discovery, up to `overlay.max_udp_payload`), when one is up.
    #[serde(default)]
    pub mtu: Option<u16>,
    /// This node's circuit for the path to the peer (`closed`, `open`,
    /// `half-open`): delegations that could not reach it, judged once for
    /// all of its agents (docs/delegation.md).
    #[serde(default)]
    pub circuit: String,
}

/// This node's reachability and relay sessions.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PathsStatus {
    /// `direct` or `relayed`.
    pub reachability: String,
    /// Why (the decision taken at start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The overlay address peers use for this node.
    pub advertised: String,
    /// `ok`, `blocked` (relay sessions over TCP only) or `unknown`.
    pub udp: String,
    pub sessions: Vec<RelaySessionStatus>,
    /// Set when this node is a relay.
    pub relay: Option<RelayRoleStatus>,
    /// Something an operator should look at: e.g. relays known but no
    /// session with any of them (a node that cannot reach its relays and
    /// whose "direct" address may be a private one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelaySessionStatus {
    pub relay: String,
    pub addr: String,
    pub transport: String,
    pub rtt_ms: Option<f64>,
    /// This node's address as that relay sees it.
    pub observed: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelayRoleStatus {
    pub clients: Vec<String>,
    pub datagrams: u64,
    pub bytes: u64,
    pub refused: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GossipStatus {
    pub interval_ms: u64,
    pub phi_threshold: f64,
    pub rounds: u64,
    pub alive: usize,
    pub suspect: usize,
    pub dead: usize,
    pub left: usize,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// `1d 2h`, `3m 4s`, `850ms`: short and readable.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s == 0 {
        return format!("{}ms", d.as_millis());
    }
    let (days, hours, mins, secs) = (s / 86400, s / 3600 % 24, s / 60 % 60, s % 60);
    if days > 0 {
        format!("{days}d {hours}h")
    } else if hours > 0 {
        format!("{hours}h {mins}m")
    } else if mins > 0 {
        format!("{mins}m {secs}s")
    } else {
        format!("{secs}s")
    }
}

impl StatusReport {
    /// The table `dmsc-node status` prints.
    pub fn render(&self) -> String {
        let n = &self.node;
        let expiry = if n.cert_expires_in_secs < 0 {
            format!(
                "EXPIRED {} ago",
                human(Duration::from_secs(n.cert_expires_in_secs.unsigned_abs()))
            )
        } else {
            format!(
                "{} (in {})",
                n.cert_not_after,
                human(Duration::from_secs(n.cert_expires_in_secs as u64))
            )
        };
        let mut out = String::new();
        out.push_str(&format!("node     {} ({})\n", n.name, n.spiffe_id));
        out.push_str(&format!("region   {}\n", n.region));
        out.push_str(&format!(
            "overlay  {}   admin {}\n",
            n.overlay_addr, n.admin_addr
        ));
        out.push_str(&format!(
            "uptime   {}   version {}\n",
            human(Duration::from_secs(n.uptime_secs)),
            n.version
        ));
        out.push_str(&format!("cert     expires {expiry}\n"));
        if n.draining {
            out.push_str(&format!(
                "state    DRAINING: no new requests, {} in flight\n",
                n.in_flight
            ));
        }
        let c = &self.certificates;
        let counts = match (c.agents_issued, c.revoked) {
            (Some(i), Some(r)) => {
                format!("; {i} agent certificate(s) issued since start, {r} revoked mesh-wide")
            }
            _ => String::new(),
        };
        out.push_str(&format!(
            "certs    serial {}; issuer {}{counts}; {} reload(s){}\n",
            c.node_serial,
            c.issuer_not_after
                .as_deref()
                .map(|t| format!("expires {t}"))
                .unwrap_or_else(|| "none (no enrollment)".into()),
            c.reloads,
            c.tokens
                .map(|[i, u, e, a]| format!(
                    "; join tokens {i} issued, {u} used, {e} expired, {a} active"
                ))
                .unwrap_or_default()
        ));
        let i = &self.intent;
        if !i.scorer.is_empty() {
            out.push_str(&format!(
                "intent   {}{}; mode {}{}\n",
                i.scorer,
                i.model_dir
                    .as_deref()
                    .map(|d| format!(" (model {d})"))
                    .unwrap_or_else(|| " (no [intent] model_dir)".into()),
                i.mode,
                // The tenants it would embed for: only with a model.
                if i.tenants.is_empty() || i.model_dir.is_none() {
                    String::new()
                } else {
                    format!("; embeds {}", i.tenants.join(", "))
                }
            ));
        }
        if let Some(i) = &self.intercept {
            match &i.reason {
                Some(why) => out.push_str(&format!("intercept OFF: {why}\n")),
                None => {
                    out.push_str(&format!(
                        "intercept {}{} for {} bindings; {} redirected (eBPF), {} HTTP, {} passed through, {} refused\n",
                        i.mechanism,
                        i.listen.as_deref().map(|l| format!(" on {l}")).unwrap_or_default(),
                        i.bound.len(),
                        i.redirected,
                        i.http,
                        i.passthrough,
                        i.unmatched
                    ));
                    if let Some(why) = &i.fallback {
                        out.push_str(&format!("  eBPF unavailable ({why}): nftables\n"));
                    }
                    if !i.competing_tables.is_empty() {
                        out.push_str(&format!(
                            "  warning: nftables tables {} also redirect local connections and may take them first\n",
                            i.competing_tables.join(", ")
                        ));
                    }
                    for b in &i.bound {
                        out.push_str(&format!(
                            "  {} -> {}{} ({}{}){}\n",
                            b.who,
                            b.tenant,
                            b.agent
                                .as_deref()
                                .map(|a| format!("/{a}"))
                                .unwrap_or_default(),
                            b.mechanism.as_str(),
                            b.listen
                                .as_deref()
                                .map(|l| format!(" on {l}"))
                                .unwrap_or_default(),
                            ports_text(&b.ports)
                        ));
                    }
                }
            }
        }
        if let Some(m) = &self.mqtt {
            out.push_str(&format!(
                "mqtt     {} {} for {}; {} edge agents; {} delegations, {} calls from the edge, {} messages refused, {} connects\n",
                m.broker,
                if m.connected { "connected" } else { "NOT CONNECTED" },
                m.tenants
                    .iter()
                    .map(|t| if m.active.contains(t) {
                        format!("{t} (active)")
                    } else if m.connected {
                        format!("{t} (standby)")
                    } else {
                        t.clone()
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
                m.agents,
                m.delegations,
                m.calls,
                m.refused,
                m.connects
            ));
            for x in &m.sessions {
                if let Some(e) = &x.error {
                    out.push_str(&format!("         {} ({}): {e}\n", x.broker, x.client_id));
                }
            }
        }
        let g = &self.gossip;
        out.push_str(&format!(
            "gossip   {} alive, {} suspect, {} dead, {} left; every {}ms, phi {}\n\n",
            g.alive, g.suspect, g.dead, g.left, g.interval_ms, g.phi_threshold
        ));
        let pa = &self.paths;
        out.push_str(&format!(
            "paths    {} at {}{}; UDP {}",
            pa.reachability,
            pa.advertised,
            pa.reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default(),
            pa.udp
        ));
        for x in &pa.sessions {
            out.push_str(&format!(
                "; relay {} over {}{}{}",
                x.relay,
                x.transport,
                x.rtt_ms.map(|r| format!(" {r:.2}ms")).unwrap_or_default(),
                x.observed
                    .as_ref()
                    .map(|o| format!(" (sees us at {o})"))
                    .unwrap_or_default()
            ));
        }
        if let Some(r) = &pa.relay {
            out.push_str(&format!(
                "; relaying for {} node(s): {} datagrams, {} bytes, {} refused",
                r.clients.len(),
                r.datagrams,
                r.bytes,
                r.refused
            ));
        }
        if let Some(w) = &pa.warning {
            out.push_str(&format!("\n         WARNING: {w}"));
        }
        out.push_str("\n\n");
        let header = [
            "NAME",
            "REGION",
            "ADDRESS",
            "STATE",
            "PATH",
            "RTT",
            "LAST-SEEN",
        ];
        let rows: Vec<[String; 7]> = self
            .peers
            .iter()
            .map(|p| {
                let how = match p.mtu {
                    Some(mtu) => format!("{}, mtu {mtu}", p.transport.as_deref().unwrap_or("quic")),
                    None => p.transport.as_deref().unwrap_or("quic").to_string(),
                };
                let mut path = match (&p.path, &p.via) {
                    (Some(path), Some(via)) => format!("{path} via {via} ({how})"),
                    (Some(path), None) => format!("{path} ({how})"),
                    _ => "-".into(),
                };
                if !p.circuit.is_empty() && p.circuit != "closed" {
                    path.push_str(&format!("; circuit {}", p.circuit));
                }
                [
                    p.name.clone(),
                    p.region.clone(),
                    p.addr.clone(),
                    p.state.clone(),
                    path,
                    p.rtt_ms
                        .map(|r| format!("{r:.2}ms"))
                        .unwrap_or_else(|| "-".into()),
                    format!("{} ago", human(Duration::from_millis(p.last_seen_ms))),
                ]
            })
            .collect();
        if rows.is_empty() {
            out.push_str("no peers yet (check overlay.bootstrap and `dmsc-node` logs)\n");
        } else {
            out.push_str(&table(&header, &rows));
            for p in &self.peers {
                if let (Some("relayed"), Some(note)) = (p.path.as_deref(), &p.path_note) {
                    out.push_str(&format!("  {}: {note}\n", p.name));
                }
            }
        }
        out.push('\n');
        let header = [
            "TENANT",
            "AGENT",
            "SKILLS/TAGS",
            "NODE",
            "HEALTH",
            "CIRCUIT",
            "IN-FLIGHT",
            "P50",
        ];
        let rows: Vec<[String; 8]> = self
            .agents
            .iter()
            .map(|a| {
                let mut skills = a.tags.join(",");
                if skills.is_empty() {
                    skills = a.skills.join(",");
                }
                [
                    a.tenant.clone(),
                    a.name.clone(),
                    skills,
                    a.node.clone(),
                    a.health.clone(),
                    a.circuit.clone(),
                    a.in_flight.to_string(),
                    match a.p50_ms {
                        Some(p) => format!("{p:.1}ms"),
                        None if a.ewma_ms > 0.0 => format!("~{:.1}ms", a.ewma_ms),
                        None => "-".into(),
                    },
                ]
            })
            .collect();
        if rows.is_empty() {
            out.push_str(
                "no agents registered (add [[agents]] to the config or POST /v1/agents)\n",
            );
        } else {
            out.push_str(&table(&header, &rows));
        }
        for p in &self.pending_agents {
            let name = p
                .name
                .as_deref()
                .map(|n| format!("/{n}"))
                .unwrap_or_default();
            out.push_str(&format!(
                "pending  {}{name} {}: {}\n",
                p.tenant, p.url, p.error
            ));
        }
        out
    }
}

/// Left-aligned columns, two spaces apart, last column unpadded.
pub fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(str::len);
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: &[String]| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  "));
            }
        }
        l.push('\n');
        l
    };
    let mut out = line(&header.map(String::from));
    for r in rows {
        out.push_str(&line(r));
    }
    out
}

/// Errors of the status client, each saying what to check.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("cannot reach the node's admin API at {addr}: {reason} (is `dmsc-node run` up, and is --admin the node's admin.listen?)")]
    Unreachable { addr: SocketAddr, reason: String },
    #[error("admin API at {addr} answered {status}: {body}")]
    Http {
        addr: SocketAddr,
        status: u16,
        body: String,
    },
    #[error("admin API at {addr} sent an unreadable status: {reason}")]
    Decode { addr: SocketAddr, reason: String },
}

/// GETs `path` from the admin API (plain HTTP/1.1 on localhost).
pub async fn admin_get(addr: SocketAddr, path: &str) -> Result<(u16, String), StatusError> {
    admin_call(addr, hyper::Method::GET, path, None, bytes::Bytes::new()).await
}

/// One request to the admin API (with the admin token for mutating calls);
/// returns status and body text.
pub async fn admin_call(
    addr: SocketAddr,
    method: hyper::Method,
    path: &str,
    token: Option<&str>,
    body: bytes::Bytes,
) -> Result<(u16, String), StatusError> {
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::{connect::HttpConnector, Client};
    let unreachable = |reason: String| StatusError::Unreachable { addr, reason };
    // The same pooled client stack as the node's own (hyper-util), one
    // connection for one call.
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(3)));
    let client: Client<_, Full<bytes::Bytes>> =
        Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(connector);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header(hyper::header::CONTENT_TYPE, "application/json");
    if let Some(t) = token {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {}", t.trim()));
    }
    let req = req
        .body(Full::new(body))
        .map_err(|e| unreachable(e.to_string()))?;
    let fetch = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| unreachable(crate::proto::http::error_chain(&e)))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(30), fetch)
        .await
        .map_err(|_| unreachable("no answer within 30s".into()))?
}

/// Fetches and decodes `/v1/status`.
pub async fn fetch(addr: SocketAddr) -> Result<StatusReport, StatusError> {
    fetch_with(addr, None).await
}

/// [`fetch`] with a bearer token: the node admin token, or a tenant read
/// token (the report then holds that tenant's agents only).
pub async fn fetch_with(
    addr: SocketAddr,
    token: Option<&str>,
) -> Result<StatusReport, StatusError> {
    let (status, body) = admin_call(
        addr,
        hyper::Method::GET,
        "/v1/status",
        token,
        bytes::Bytes::new(),
    )
    .await?;
    if status != 200 {
        return Err(StatusError::Http { addr, status, body });
    }
    serde_json::from_str(&body).map_err(|e| StatusError::Decode {
        addr,
        reason: e.to_string(),
    })
}
