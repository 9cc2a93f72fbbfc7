//! Prometheus metrics of one node: one registry, refreshed from the live
//! counters of the overlay and gossip at scrape time (the data path only
//! bumps atomics; nothing is computed for metrics unless someone asks).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub direction: String,
    pub result: String,
}

/// Every metric a node exports.
pub struct Metrics {
    registry: Registry,
    pub peers: Family<StateLabel, Gauge>,
    pub gossip_rounds: Counter<u64, AtomicU64>,
    pub gossip_bytes_sent: Counter<u64, AtomicU64>,
    pub gossip_bytes_received: Counter<u64, AtomicU64>,
    pub overlay_bytes_sent: Counter<u64, AtomicU64>,
    pub overlay_bytes_received: Counter<u64, AtomicU64>,
    pub overlay_messages_dropped: Counter<u64, AtomicU64>,
    pub handshakes: Family<HandshakeLabels, Counter<u64, AtomicU64>>,
    pub connections: Gauge<i64, AtomicI64>,
    pub cert_expiry_seconds: Gauge<i64, AtomicI64>,
    pub uptime_seconds: Gauge<i64, AtomicI64>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("dmsc");
        let m = Metrics {
            peers: Family::default(),
            gossip_rounds: Counter::default(),
            gossip_bytes_sent: Counter::default(),
            gossip_bytes_received: Counter::default(),
            overlay_bytes_sent: Counter::default(),
            overlay_bytes_received: Counter::default(),
            overlay_messages_dropped: Counter::default(),
            handshakes: Family::default(),
            connections: Gauge::default(),
            cert_expiry_seconds: Gauge::default(),
            uptime_seconds: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "peers",
            "Peers known through gossip, by state (alive, suspect, dead, left)",
            m.peers.clone(),
        );
        registry.register(
            "gossip_rounds",
            "Gossip rounds this node has run",
            m.gossip_rounds.clone(),
        );
        registry.register(
            "gossip_sent_bytes",
            "Gossip message bytes sent (before QUIC framing)",
            m.gossip_bytes_sent.clone(),
        );
        registry.register(
            "gossip_received_bytes",
            "Gossip message bytes received",
            m.gossip_bytes_received.clone(),
        );
        registry.register(
            "overlay_sent_bytes",
            "Overlay stream bytes sent (frames, all channels)",
            m.overlay_bytes_sent.clone(),
        );
        registry.register(
            "overlay_received_bytes",
            "Overlay stream bytes received (frames, all channels)",
            m.overlay_bytes_received.clone(),
        );
        registry.register(
            "overlay_messages_dropped",
            "Overlay messages dropped (peer unreachable, queue full, malformed)",
            m.overlay_messages_dropped.clone(),
        );
        registry.register(
            "overlay_handshakes",
            "Overlay TLS handshakes by direction (inbound, outbound) and result (ok, failed)",
            m.handshakes.clone(),
        );
        registry.register(
            "overlay_connections",
            "Live overlay QUIC connections",
            m.connections.clone(),
        );
        registry.register(
            "cert_expiry_seconds",
            "Seconds until this node's certificate expires (negative: expired)",
            m.cert_expiry_seconds.clone(),
        );
        registry.register(
            "uptime_seconds",
            "Seconds since this node started",
            m.uptime_seconds.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Sets a counter to an absolute value read from an atomic elsewhere.
    pub fn set_counter(c: &Counter<u64, AtomicU64>, v: u64) {
        c.inner().store(v, Ordering::Relaxed);
    }

    pub fn set_handshakes(&self, direction: &str, result: &str, v: u64) {
        let c = self.handshakes.get_or_create(&HandshakeLabels {
            direction: direction.into(),
            result: result.into(),
        });
        Self::set_counter(&c, v);
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
