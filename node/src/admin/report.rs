//! What the admin API reports, built from live state: the status report,
//! the agent table, the Prometheus text and the peer checks behind
//! `dmsc-node check`.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use dmsc_gossip::MemberState;
use tracing::warn;

use super::status::{GossipStatus, NodeStatus, PeerStatus, StatusReport};
use super::Shared;
use crate::control::clock::clock_skew;
use crate::metrics::Metrics;
use crate::proto::gossip::NodeAnnouncement;

/// Seconds until this node's certificate expires (negative: expired).
fn cert_expires_in(s: &Shared) -> i64 {
    match s
        .security
        .identity()
        .info
        .not_after
        .duration_since(SystemTime::now())
    {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// Names the overlay read from verified certificates, by peer address.
type Verified = std::collections::HashMap<SocketAddr, String>;

/// Gossip names are what peers *say*; where a live connection proves a
/// different name for the same address, the gossip entry is an impostor:
/// the name its certificate proves.
fn impostor<'a>(m: &dmsc_gossip::Member, verified: &'a Verified) -> Option<&'a String> {
    verified
        .get(&m.addr)
        .filter(|cert_name| **cert_name != m.name)
}

/// Where a state is counted: alive, suspect, dead, left.
fn state_index(state: MemberState) -> usize {
    match state {
        MemberState::Alive => 0,
        MemberState::Suspect => 1,
        MemberState::Dead => 2,
        MemberState::Left => 3,
    }
}

/// Builds the status report from live state.
/// One counter of the MQTT bridge, summed over its sessions.
fn edge_total(s: &Shared, f: fn(&crate::edge::EdgeStats) -> &std::sync::atomic::AtomicU64) -> u64 {
    s.edge
        .iter()
        .map(|b| f(&b.stats).load(std::sync::atomic::Ordering::Relaxed))
        .sum()
}

pub(crate) async fn status_report(s: &Shared) -> StatusReport {
    let members = s.gossip.members_with(|k| k == dmsc_gossip::KEY_NODE).await;
    let identity = s.security.identity();
    let not_after = identity.info.not_after;
    let expires_in = cert_expires_in(s);
    let links = s.overlay.peers();
    let verified: Verified = links.iter().map(|p| (p.addr, p.name.clone())).collect();
    // A relayed peer is listed under its mapped address; its connection may
    // be keyed by the address it dialed us from: find it by name then.
    let link_of = |m: &dmsc_gossip::Member| {
        links
            .iter()
            .find(|l| l.addr == m.addr)
            .or_else(|| {
                dmsc_transport::path::is_mapped(m.addr)
                    .then(|| links.iter().find(|l| l.name == m.name))
                    .flatten()
            })
            .cloned()
    };
    let mut counts = [0usize; 4];
    let peers: Vec<PeerStatus> = members
        .iter()
        .filter(|m| match impostor(m, &verified) {
            Some(cert_name) => {
                warn!(
                    claimed = %m.name,
                    certificate = %cert_name,
                    addr = %m.addr,
                    "gossip names a peer differently from its certificate; not listing it"
                );
                false
            }
            _ => true,
        })
        .map(|m| {
            counts[state_index(m.state)] += 1;
            let ann: Option<NodeAnnouncement> = m
                .values
                .get(dmsc_gossip::KEY_NODE)
                .and_then(|v| serde_json::from_str(v).ok());
            let link = link_of(m);
            let rtt = link.as_ref().map(|l| l.rtt);
            let reachability = ann
                .as_ref()
                .map(|a| a.reachability.clone())
                .unwrap_or_else(|| "direct".into());
            let via_claimed = ann.as_ref().map(|a| a.via.clone()).unwrap_or_default();
            PeerStatus {
                path: link.as_ref().map(|l| l.path.path.to_string()),
                via: link.as_ref().and_then(|l| l.path.via.clone()),
                transport: link.as_ref().map(|l| l.path.transport.to_string()),
                path_note: link.as_ref().and_then(|l| l.path.note.clone()),
                mtu: link.as_ref().map(|l| l.mtu),
                circuit: s.mesh.path_state(&m.name).to_string(),
                reachability,
                relays: via_claimed,
                name: m.name.clone(),
                region: ann.map(|a| a.region).unwrap_or_else(|| "?".into()),
                addr: m.addr.to_string(),
                state: m.state.to_string(),
                rtt_ms: rtt.map(|r| r.as_secs_f64() * 1000.0),
                last_seen_ms: m.last_seen.as_millis() as u64,
                generation: m.generation,
                connected: rtt.is_some(),
                verified: link.as_ref().is_some_and(|l| l.name == m.name)
                    || verified.get(&m.addr).is_some_and(|n| *n == m.name),
            }
        })
        .collect();
    let gstats = s.gossip.stats();
    let agents = agent_statuses(s);
    let pending_agents = s
        .agents
        .agents
        .pending()
        .into_iter()
        .map(|(spec, error)| super::status::PendingAgent {
            tenant: spec.tenant,
            name: spec.name,
            url: spec.url,
            error,
        })
        .collect();
    let rfc3339 = |t: SystemTime| {
        time::OffsetDateTime::from(t)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    };
    let certificates = super::status::CertStatus {
        node_serial: identity.info.serial_hex.clone(),
        issuer_not_after: s.security.issuer().map(|i| rfc3339(i.info.not_after)),
        agents_issued: Some(s.security.issued()),
        revoked: Some(s.security.revoked.len()),
        tokens: s.security.token_counts(),
        reloads: s.security.reloads(),
    };
    let intent = super::status::IntentStatus {
        scorer: s.intent.scorer().to_string(),
        model_dir: s.intent.model_dir(),
        mode: if s.intent.cfg.ask { "ask" } else { "best" }.to_string(),
        tenants: s.intent.tenants(),
    };
    let mqtt = (!s.edge.is_empty()).then(|| {
        let mut brokers: Vec<String> = s.edge.iter().map(|b| b.broker()).collect();
        brokers.dedup();
        super::status::MqttStatus {
            broker: brokers.join(", "),
            connected: s.edge.iter().all(|b| b.connected()),
            tenants: s.edge.iter().flat_map(|b| b.tenants().to_vec()).collect(),
            active: s.edge.iter().flat_map(|b| b.active_tenants()).collect(),
            agents: s.agents.agents.all().iter().filter(|a| a.is_edge()).count(),
            connects: edge_total(s, |st| &st.connects),
            delegations: edge_total(s, |st| &st.delegations),
            calls: edge_total(s, |st| &st.calls),
            refused: edge_total(s, |st| &st.refused),
            late_replies: edge_total(s, |st| &st.late_replies),
            duplicates: edge_total(s, |st| &st.duplicates),
            sessions: s
                .edge
                .iter()
                .map(|b| super::status::MqttSession {
                    broker: b.broker(),
                    client_id: b.client_id().to_string(),
                    tenants: b.tenants().to_vec(),
                    connected: b.connected(),
                    error: b.last_error(),
                })
                .collect(),
        }
    });
    let intercept = s.intercept.get().map(|st| {
        use std::sync::atomic::Ordering::Relaxed;
        match st {
            crate::intercept::State::Off(why) => super::status::InterceptStatus {
                mechanism: "off".into(),
                reason: Some(why.clone()),
                ..Default::default()
            },
            crate::intercept::State::On(ic) => super::status::InterceptStatus {
                mechanism: ic.mechanism().as_str().into(),
                reason: None,
                fallback: ic.fallback().map(str::to_string),
                competing_tables: ic.competing(),
                listen: ic.fallback().is_none().then(|| ic.listen.to_string()),
                bound: ic.bindings(),
                redirected: ic.kernel_stats().map(|k| k.redirected).unwrap_or(0),
                http: ic.stats.http.load(Relaxed),
                passthrough: ic.stats.passthrough.load(Relaxed),
                unmatched: ic.stats.unmatched.load(Relaxed),
            },
        }
    });
    StatusReport {
        intercept,
        intent,
        mqtt,
        certificates,
        agents,
        pending_agents,
        node: NodeStatus {
            name: identity.name().to_string(),
            region: s.config.region.clone(),
            spiffe_id: identity.spiffe.to_string(),
            trust_domain: identity.trust_domain().to_string(),
            overlay_addr: s.bound.overlay.to_string(),
            admin_addr: s.bound.admin.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            generation: s.gossip.config().generation,
            uptime_secs: s.started.elapsed().as_secs(),
            cert_not_after: time::OffsetDateTime::from(not_after)
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            cert_expires_in_secs: expires_in,
            draining: s.drain.is_draining(),
            in_flight: s.drain.in_flight(),
        },
        peers,
        paths: paths_status(s),
        gossip: GossipStatus {
            interval_ms: s.gossip.config().interval.as_millis() as u64,
            phi_threshold: s.gossip.config().phi_threshold,
            rounds: s.gossip.rounds(),
            alive: counts[0],
            suspect: counts[1],
            dead: counts[2],
            left: counts[3],
            bytes_sent: gstats.bytes_sent.load(Ordering::Relaxed),
            bytes_received: gstats.bytes_received.load(Ordering::Relaxed),
        },
    }
}

/// The agent table: every registered agent, with this node's view of it,
/// ordered by tenant, then name.
pub(crate) fn agent_statuses(s: &Shared) -> Vec<super::status::AgentStatus> {
    let reg = s.mesh.read();
    let mut all: Vec<super::status::AgentStatus> = reg
        .iter()
        .map(|e| {
            let local = s.agents.agents.get(&e.id);
            let load = reg.load(&e.id).unwrap_or_default();
            let mut tags: Vec<String> = e.record.tags().map(str::to_string).collect();
            tags.sort();
            tags.dedup();
            super::status::AgentStatus {
                tenant: e.id.tenant.clone(),
                name: e.id.name.clone(),
                node: e.node.to_string(),
                skills: e.record.skills().map(|k| k.id.to_string()).collect(),
                tags,
                health: e.record.health().to_string(),
                circuit: s.mesh.circuit_state(&e.id).to_string(),
                in_flight: load.in_flight,
                outstanding: s.mesh.outstanding(&e.id),
                p50_ms: local
                    .as_ref()
                    .and_then(|a| a.stats.lock().unwrap_or_else(|p| p.into_inner()).p50_ms()),
                ewma_ms: f64::from(load.ewma_ms),
                error_rate: f64::from(load.error_rate),
                protocol: local
                    .as_ref()
                    .and_then(|a| a.protocol.current())
                    .map(|p| p.as_str().to_string()),
                local: local.is_some(),
            }
        })
        .collect();
    all.sort_by(|a, b| (&a.tenant, &a.name).cmp(&(&b.tenant, &b.name)));
    all
}

/// Refreshes the metrics registry from live state and encodes it.
/// (Not through [`status_report`]: its agent table and peer details are
/// a copy of the whole registry, and a scrape should not cost that.)
pub(crate) async fn metrics_text(s: &Shared) -> String {
    let verified: Verified = s
        .overlay
        .peers()
        .into_iter()
        .map(|p| (p.addr, p.name))
        .collect();
    let mut counts = [0usize; 4];
    for member in s.gossip.members_with(|_| false).await {
        if impostor(&member, &verified).is_none() {
            counts[state_index(member.state)] += 1;
        }
    }
    let gstats = s.gossip.stats();
    let m = &s.metrics;
    for (state, n) in [
        ("alive", counts[0]),
        ("suspect", counts[1]),
        ("dead", counts[2]),
        ("left", counts[3]),
    ] {
        m.peers
            .get_or_create(&crate::metrics::StateLabel {
                state: state.into(),
            })
            .set(n as i64);
    }
    Metrics::set_counter(&m.gossip_rounds, s.gossip.rounds());
    Metrics::set_counter(
        &m.gossip_bytes_sent,
        gstats.bytes_sent.load(Ordering::Relaxed),
    );
    Metrics::set_counter(
        &m.gossip_bytes_received,
        gstats.bytes_received.load(Ordering::Relaxed),
    );
    let o = s.overlay.stats();
    let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    Metrics::set_counter(&m.overlay_bytes_sent, ld(&o.bytes_sent));
    Metrics::set_counter(&m.overlay_bytes_received, ld(&o.bytes_received));
    Metrics::set_counter(&m.overlay_messages_dropped, ld(&o.messages_dropped));
    let ps = &s.overlay.paths().stats;
    for (state, c) in [
        ("sent", &ps.relayed_sent),
        ("received", &ps.relayed_received),
        ("dropped", &ps.relayed_dropped),
    ] {
        let f = m.path_relayed.get_or_create(&crate::metrics::StateLabel {
            state: state.into(),
        });
        Metrics::set_counter(&f, ld(c));
    }
    Metrics::set_counter(&m.path_direct_upgrades, ld(&ps.direct_upgrades));
    Metrics::set_counter(&m.path_direct_lost, ld(&ps.direct_lost));
    if let Some(r) = s.overlay.relay() {
        let st = &r.stats;
        Metrics::set_counter(&m.relay_datagrams, ld(&st.datagrams));
        Metrics::set_counter(&m.relay_bytes, ld(&st.bytes));
        m.relay_sessions.set(ld(&st.sessions) as i64);
        for (reason, c) in [
            ("unknown_destination", &st.refused_unknown),
            ("limit", &st.refused_limit),
            ("claim", &st.refused_claim),
            ("handshake", &st.refused_handshake),
            ("queue_full", &st.refused_queue),
            ("malformed", &st.malformed),
        ] {
            let f = m.relay_refused.get_or_create(&crate::metrics::ReasonLabel {
                reason: reason.into(),
            });
            Metrics::set_counter(&f, ld(c));
        }
    }
    m.set_handshakes("inbound", "ok", ld(&o.handshakes_ok_inbound));
    m.set_handshakes("inbound", "failed", ld(&o.handshakes_failed_inbound));
    m.set_handshakes("outbound", "ok", ld(&o.handshakes_ok_outbound));
    m.set_handshakes("outbound", "failed", ld(&o.handshakes_failed_outbound));
    Metrics::set_counter(&m.probes_answered, ld(&o.probes_answered));
    if !s.edge.is_empty() {
        m.mqtt_connected
            .set(s.edge.iter().filter(|b| b.connected()).count() as i64);
        for (event, v) in [
            ("connects", edge_total(s, |st| &st.connects)),
            ("delegations", edge_total(s, |st| &st.delegations)),
            ("calls", edge_total(s, |st| &st.calls)),
            ("refused", edge_total(s, |st| &st.refused)),
            ("late_replies", edge_total(s, |st| &st.late_replies)),
            ("duplicates", edge_total(s, |st| &st.duplicates)),
        ] {
            let c = m.mqtt_events.get_or_create(&crate::metrics::EventLabel {
                event: event.into(),
            });
            Metrics::set_counter(&c, v);
        }
    }
    m.connections.set(s.overlay.peers().len() as i64);
    m.cert_expiry_seconds.set(cert_expires_in(s));
    m.uptime_seconds.set(s.started.elapsed().as_secs() as i64);
    m.agents.set(s.mesh.read().len() as i64);
    m.security.revoked.set(s.security.revoked.len() as i64);
    if let Some(a) = &s.security.audit {
        let st = a.stats();
        Metrics::set_counter(&m.security.audit_appended, st.appended);
        Metrics::set_counter(&m.security.audit_queue_full_waits, st.queue_full_waits);
    }
    m.encode()
}

/// What `dmsc-node check` asks the running node: every connected peer's
/// clock skew (over a control stream, error bounded by half the RTT) and
/// whether each bootstrap peer accepts this node's certificate (a CA
/// mismatch shows up here as a refused handshake).
pub(crate) async fn peer_checks(s: &Shared) -> serde_json::Value {
    let mut peers = Vec::new();
    for p in s.overlay.peers() {
        let (skew, rtt, error) = match tokio::time::timeout(
            Duration::from_secs(3),
            clock_skew(&s.overlay, p.addr),
        )
        .await
        {
            Ok(Ok((skew, rtt))) => (Some(skew), Some(rtt), None),
            Ok(Err(e)) => (None, None, Some(e.to_string())),
            Err(_) => (None, None, Some("no clock answer within 3 s".to_string())),
        };
        peers.push(serde_json::json!({
            "name": p.name, "addr": p.addr.to_string(),
            "skew_ms": skew, "rtt_ms": rtt, "error": error,
        }));
    }
    let mut bootstrap = Vec::new();
    for b in &s.config.bootstrap {
        let addrs: Vec<SocketAddr> = match tokio::net::lookup_host(b.as_str()).await {
            Ok(a) => a.collect(),
            Err(e) => {
                bootstrap
                    .push(serde_json::json!({"peer": b, "error": format!("cannot resolve: {e}")}));
                continue;
            }
        };
        for addr in addrs {
            let error =
                match tokio::time::timeout(Duration::from_secs(5), s.overlay.probe(addr)).await {
                    Ok(Ok(_)) => None,
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(_) => Some("no answer within 5 s".to_string()),
                };
            bootstrap
                .push(serde_json::json!({"peer": b, "addr": addr.to_string(), "error": error}));
        }
    }
    // Peers that tried and were refused never show up as peers: their
    // refusals are the trace of a CA mismatch (or a revoked node) here.
    let refused: Vec<serde_json::Value> = s
        .overlay
        .refusals(Duration::from_secs(600))
        .into_iter()
        .map(|(t, reason)| {
            let ago = SystemTime::now()
                .duration_since(t)
                .unwrap_or_default()
                .as_secs();
            serde_json::json!({"secs_ago": ago, "reason": reason})
        })
        .collect();
    // This node's own certificate revoked: peers refuse its next connection.
    let own = s.security.identity();
    let own_revoked = s.security.revoked.revoked_in(own.chain.iter()).map(
        |r| serde_json::json!({"spiffe": own.spiffe.to_string(), "serial": r.serial, "reason": r.reason}),
    );
    serde_json::json!({ "peers": peers, "bootstrap": bootstrap, "refused": refused, "own_revoked": own_revoked })
}

/// This node's side of the path layer: how peers reach it, its relay
/// sessions, and its relay role.
fn paths_status(s: &Shared) -> super::status::PathsStatus {
    let paths = s.overlay.paths();
    let sessions = paths.sessions();
    let observed = paths.observed();
    let udp = if paths.udp_blocked() {
        "blocked"
    } else if paths.udp_answered_within(Duration::from_secs(30))
        || sessions
            .iter()
            .any(|x| x.transport == dmsc_transport::Transport::Quic)
    {
        "ok"
    } else {
        "unknown"
    };
    let known = s.overlay.relays();
    let mine = s.overlay.relay().is_some();
    let warning = (sessions.is_empty() && !known.is_empty() && !mine).then(|| {
        let list: Vec<String> = known.iter().map(|r| r.overlay.to_string()).collect();
        format!(
            "no session with any relay it knows ({}): peers behind NATs cannot reach this \
             node through them, and if this node is behind a NAT or blocks UDP it is cut off \
             (the log says why each attempt failed)",
            list.join(", ")
        )
    });
    super::status::PathsStatus {
        warning,
        reachability: if paths.relayed_mode() {
            "relayed".into()
        } else {
            "direct".into()
        },
        reason: paths.decided(),
        advertised: s.bound.overlay.to_string(),
        udp: udp.into(),
        sessions: sessions
            .iter()
            .map(|x| super::status::RelaySessionStatus {
                relay: x.relay.to_string(),
                addr: x.relay_addr.to_string(),
                transport: x.transport.as_str().into(),
                rtt_ms: x.rtt().map(|r| r.as_secs_f64() * 1000.0),
                observed: observed
                    .iter()
                    .find(|(r, _)| *r == x.relay_addr)
                    .map(|(_, o)| o.to_string())
                    .or_else(|| x.observed.map(|o| o.to_string())),
            })
            .collect(),
        relay: s.overlay.relay().map(|r| super::status::RelayRoleStatus {
            clients: r.client_names(),
            datagrams: r.stats.datagrams.load(Ordering::Relaxed),
            bytes: r.stats.bytes.load(Ordering::Relaxed),
            refused: r.stats.refused_unknown.load(Ordering::Relaxed)
                + r.stats.refused_limit.load(Ordering::Relaxed)
                + r.stats.refused_claim.load(Ordering::Relaxed)
                + r.stats.refused_handshake.load(Ordering::Relaxed)
                + r.stats.refused_queue.load(Ordering::Relaxed),
        }),
    }
}
