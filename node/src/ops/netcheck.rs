//! `dmsc-node netcheck`: what the network between this host and the mesh
//! lets through, in plain words (after `tailscale netcheck`). It binds a
//! throwaway overlay endpoint with the node's certificate on an ephemeral
//! UDP port (so it runs beside a live node), opens relay sessions to every
//! configured relay and bootstrap peer that is one, and reports:
//! - UDP: did any relay answer over UDP (QUIC session or UDP probe)?
//! - the public address(es) relays see for this host;
//! - NAT mapping: the same address seen by two observers (relays, or a
//!   relay and a bootstrap peer asked `whoami`) means the NAT maps
//!   per source (endpoint-independent: hole punching works), different ones
//!   mean it maps per destination (peers stay relayed); one observer:
//!   unknown;
//! - per relay: QUIC and TCP session set-up, RTT;
//! - per bootstrap peer: a full handshake and its RTT.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmsc_transport::{NodeIdentity, Overlay, OverlayConfig, RelayAddr, Transport};
use serde::Serialize;

use crate::config::{resolve_hosts, NodeConfig};
use crate::NodeError;

/// How long sessions get to come up and UDP probes to be answered.
const SETTLE: Duration = Duration::from_millis(3000);

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Whether QUIC over UDP leaves this host: a relay answered over QUIC,
    /// a UDP probe was answered, or a bootstrap peer saw this host's own
    /// address; `None` (JSON null) when there was nothing to ask.
    pub udp: Option<bool>,
    /// Whether a relay took a session over TCP + TLS; `None` (JSON null)
    /// without a relay to try.
    pub tcp: Option<bool>,
    /// `endpoint-independent`, `endpoint-dependent` or `unknown`.
    pub mapping: String,
    /// This host's address as each relay or bootstrap peer saw it.
    pub observed: Vec<Observed>,
    pub relays: Vec<RelayReport>,
    pub peers: Vec<PeerReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Observed {
    pub relay: String,
    pub address: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RelayReport {
    pub addr: String,
    pub quic: bool,
    pub quic_rtt_ms: Option<f64>,
    pub tcp: bool,
    pub tcp_rtt_ms: Option<f64>,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct PeerReport {
    pub addr: String,
    pub name: Option<String>,
    pub rtt_ms: Option<f64>,
    pub error: Option<String>,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0 * 100.0).round() / 100.0
}

/// Runs the checks for `config`.
pub async fn netcheck(config: &NodeConfig) -> Result<Report, NodeError> {
    let identity = Arc::new(NodeIdentity::load(&config.ca, &config.cert, &config.key)?);
    let bind = SocketAddr::new(config.overlay_listen.ip(), 0);
    let (overlay, _inbound) = Overlay::bind(OverlayConfig::new(bind, identity)).await?;
    // Same name as the running node: never take over its relay sessions.
    overlay.paths().set_probe_only();
    let mut candidates: Vec<RelayAddr> = crate::config::resolve_relays(&config.relays).await;
    let relays: Vec<SocketAddr> = candidates.iter().map(|r| r.overlay).collect();
    let peers = resolve_hosts("a bootstrap peer", &config.bootstrap).await;
    // Relays: the configured ones, plus bootstrap peers that turn out to be.
    for p in &peers {
        if !relays.contains(p) {
            let a = RelayAddr {
                overlay: *p,
                tcp: *p,
            };
            if overlay.try_relay(a, Transport::Quic).await.ok {
                candidates.push(a);
            }
        }
    }
    for r in &candidates {
        overlay.add_relay(*r);
    }
    let started = Instant::now();
    let paths = overlay.paths();
    while started.elapsed() < SETTLE {
        let seen = paths.observed().len();
        if seen >= candidates.len() && paths.udp_answered_within(SETTLE) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut relay_reports = Vec::new();
    for r in &candidates {
        let q = overlay.try_relay(*r, Transport::Quic).await;
        let t = overlay.try_relay(*r, Transport::Tcp).await;
        relay_reports.push(RelayReport {
            addr: r.overlay.to_string(),
            quic: q.ok,
            quic_rtt_ms: q.rtt.map(ms),
            tcp: t.ok,
            tcp_rtt_ms: t.rtt.map(ms),
            detail: if q.ok {
                q.detail
            } else {
                format!("QUIC: {}; TCP: {}", q.detail, t.detail)
            },
        });
    }
    let mut observed: Vec<(SocketAddr, SocketAddr)> = paths.observed();
    // A peer that saw this host's own (unmapped) address heard it over UDP.
    let mut peer_saw_udp = false;
    // Bootstrap peers that are not relays observe us too (a relay and a
    // direct peer are two observers).
    for p in &peers {
        if candidates.iter().any(|c| c.overlay == *p) {
            continue;
        }
        let asked = tokio::time::timeout(
            Duration::from_secs(3),
            crate::control::clock::observed_by(&overlay, *p),
        )
        .await;
        if let Ok(Ok(o)) = asked {
            if !dmsc_transport::path::is_mapped(o) {
                observed.push((*p, o));
                peer_saw_udp = true;
            }
        }
    }
    let mut distinct: Vec<SocketAddr> = observed.iter().map(|(_, o)| *o).collect();
    distinct.sort();
    distinct.dedup();
    let observers = {
        let mut r: Vec<SocketAddr> = observed.iter().map(|(r, _)| *r).collect();
        r.sort();
        r.dedup();
        r.len()
    };
    let mapping = match (observers, distinct.len()) {
        (0 | 1, _) => "unknown",
        (_, 1) => "endpoint-independent",
        _ => "endpoint-dependent",
    };
    let mut peer_reports = Vec::new();
    for p in &peers {
        let t = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(4), overlay.probe(*p)).await;
        peer_reports.push(match r {
            Ok(Ok(name)) => PeerReport {
                addr: p.to_string(),
                name: Some(name),
                rtt_ms: Some(ms(t.elapsed())),
                error: None,
            },
            Ok(Err(e)) => PeerReport {
                addr: p.to_string(),
                name: None,
                rtt_ms: None,
                error: Some(e.to_string()),
            },
            Err(_) => PeerReport {
                addr: p.to_string(),
                name: None,
                rtt_ms: None,
                error: Some("no answer within 4s".into()),
            },
        });
    }
    let udp = if relay_reports.iter().any(|r| r.quic)
        || paths.udp_answered_within(SETTLE * 2)
        || peer_saw_udp
    {
        Some(true)
    } else if relay_reports.is_empty() {
        None
    } else {
        Some(false)
    };
    let tcp = (!relay_reports.is_empty()).then(|| relay_reports.iter().any(|r| r.tcp));
    overlay.shutdown().await;
    Ok(Report {
        udp,
        tcp,
        mapping: mapping.to_string(),
        observed: observed
            .iter()
            .map(|(r, o)| Observed {
                relay: r.to_string(),
                address: o.to_string(),
            })
            .collect(),
        relays: relay_reports,
        peers: peer_reports,
    })
}

impl Report {
    /// The report in words.
    pub fn text(&self) -> String {
        let mut out = String::from("netcheck\n");
        out.push_str(&format!(
            "  * UDP: {}\n",
            match self.udp {
                Some(true) => "yes",
                Some(false) => "no (blocked: the node will reach the mesh through a relay over TCP)",
                None => "unknown (no relay to ask and no bootstrap peer saw this host: set overlay.relays)",
            }
        ));
        if self.observed.is_empty() {
            out.push_str("  * Public address: unknown (no relay saw this host over UDP)\n");
        }
        for o in &self.observed {
            let who = if self.relays.iter().any(|r| r.addr == o.relay) {
                "relay"
            } else {
                "peer"
            };
            out.push_str(&format!(
                "  * Public address: {} (as {who} {} sees it)\n",
                o.address, o.relay
            ));
        }
        out.push_str(&format!(
            "  * NAT mapping: {}\n",
            match self.mapping.as_str() {
                "endpoint-independent" => "endpoint-independent (every relay and peer asked sees the same address: hole punching can work)",
                "endpoint-dependent" => "endpoint-dependent (the address differs per destination, a symmetric NAT: relayed peers stay relayed)",
                _ => "unknown (needs two relays or bootstrap peers to compare)",
            }
        ));
        out.push_str(&format!(
            "  * TCP fallback: {}\n",
            match self.tcp {
                Some(true) => "reachable",
                Some(false) => "not reachable",
                None => "no relay to try",
            }
        ));
        if !self.relays.is_empty() {
            out.push_str("  * Relays:\n");
        }
        for r in &self.relays {
            let rtt = |ok: bool, v: Option<f64>| match (ok, v) {
                (true, Some(v)) => format!("{v}ms"),
                (true, None) => "ok".into(),
                _ => "no".into(),
            };
            out.push_str(&format!(
                "      - {}: quic {}, tcp {} ({})\n",
                r.addr,
                rtt(r.quic, r.quic_rtt_ms),
                rtt(r.tcp, r.tcp_rtt_ms),
                r.detail
            ));
        }
        if !self.peers.is_empty() {
            out.push_str("  * Bootstrap peers:\n");
        }
        for p in &self.peers {
            match (&p.name, p.rtt_ms, &p.error) {
                (Some(n), Some(rtt), _) => {
                    out.push_str(&format!("      - {} (node {n}): {rtt}ms\n", p.addr))
                }
                (_, _, Some(e)) => out.push_str(&format!("      - {}: {e}\n", p.addr)),
                _ => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(udp: Option<bool>, relays: &[&str], observed: &[(&str, &str)]) -> Report {
        Report {
            udp,
            tcp: None,
            mapping: "unknown".into(),
            observed: observed
                .iter()
                .map(|(r, a)| Observed {
                    relay: r.to_string(),
                    address: a.to_string(),
                })
                .collect(),
            relays: relays
                .iter()
                .map(|r| RelayReport {
                    addr: r.to_string(),
                    quic: true,
                    quic_rtt_ms: None,
                    tcp: false,
                    tcp_rtt_ms: None,
                    detail: String::new(),
                })
                .collect(),
            peers: Vec::new(),
        }
    }

    #[test]
    fn udp_is_unknown_without_anyone_to_ask_and_observers_are_named_for_what_they_are() {
        let text = report(None, &[], &[]).text();
        assert!(text.contains("UDP: unknown (no relay to ask"), "{text}");
        let json = serde_json::to_value(report(None, &[], &[])).expect("json");
        assert_eq!(json["udp"], serde_json::Value::Null);

        let text = report(
            Some(true),
            &["10.0.0.1:7401"],
            &[
                ("10.0.0.1:7401", "1.2.3.4:5"),
                ("10.0.0.2:7401", "1.2.3.4:5"),
            ],
        )
        .text();
        assert!(text.contains("UDP: yes"), "{text}");
        assert!(text.contains("(as relay 10.0.0.1:7401 sees it)"), "{text}");
        assert!(text.contains("(as peer 10.0.0.2:7401 sees it)"), "{text}");
        assert!(report(Some(false), &["10.0.0.1:7401"], &[])
            .text()
            .contains("UDP: no (blocked"));
    }
}
