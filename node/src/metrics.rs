//! Prometheus metrics of one node: one registry, refreshed from the live
//! counters of the overlay and gossip at scrape time (the data path only
//! bumps atomics; nothing is computed for metrics unless someone asks).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabel {
    pub event: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub direction: String,
    pub result: String,
}

/// The `tenant` label of inbound delegations for an agent this node does
/// not host (whatever tenant name the calling node sent).
pub const OTHER_TENANT: &str = "(not hosted here)";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DelegationLabels {
    pub tenant: String,
    /// `ok`, `agent-error` (the agent answered 5xx) or the mesh error kind.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantScopeLabels {
    pub tenant: String,
    /// `tenant` (mesh-wide), `caller` or `target`.
    pub scope: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantListenerLabels {
    pub tenant: String,
    pub listener: String,
}

/// Counters the delegation path bumps directly (cheap: atomics behind a
/// read-mostly label map).
#[derive(Clone, Debug)]
pub struct DelegationMetrics {
    pub requests: Family<DelegationLabels, Counter<u64, AtomicU64>>,
    pub duration: Histogram,
    pub retries: Counter<u64, AtomicU64>,
    /// Delegations this node served as the home node, by tenant and outcome.
    pub inbound: Family<DelegationLabels, Counter<u64, AtomicU64>>,
    /// Bytes of buffered request bodies held now (the body budget's count).
    pub buffered_bytes: Gauge<i64, AtomicI64>,
    /// Requests refused with 503 because the body budget was spent.
    pub budget_refusals: Counter<u64, AtomicU64>,
    /// Requests refused (429) by a tenant rate limit, by tenant and scope.
    pub rate_limited: Family<TenantScopeLabels, Counter<u64, AtomicU64>>,
    /// Requests shed (503) on a multi-tenant listener because their tenant
    /// held its fair share of the listener's in-flight budget.
    pub tenant_shed: Family<TenantListenerLabels, Counter<u64, AtomicU64>>,
    /// All delegations recorded (the sum over `requests`), for tests and status.
    count: Arc<AtomicU64>,
    /// `requests` and `inbound` counters found by borrowed labels.
    requests_by: ByTenantOutcome,
    inbound_by: ByTenantOutcome,
}

type Count = Counter<u64, AtomicU64>;

/// The counters of a (tenant, outcome) family, found by `&str` labels: the
/// family's own lookup takes an owned label set, two strings built per
/// delegation. The family is never pruned, so a counter found once stays
/// the one the family exports.
#[derive(Clone, Debug, Default)]
struct ByTenantOutcome(Arc<RwLock<HashMap<Box<str>, ByOutcome>>>);

type ByOutcome = HashMap<Box<str>, Count>;

impl ByTenantOutcome {
    fn inc(&self, family: &Family<DelegationLabels, Count>, tenant: &str, outcome: &str) {
        let known = self.0.read().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = known.get(tenant).and_then(|m| m.get(outcome)) {
            c.inc();
            return;
        }
        drop(known);
        let c = family
            .get_or_create(&DelegationLabels {
                tenant: tenant.to_string(),
                outcome: outcome.to_string(),
            })
            .clone();
        c.inc();
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(tenant.into())
            .or_default()
            .insert(outcome.into(), c);
    }
}

impl Default for DelegationMetrics {
    fn default() -> Self {
        DelegationMetrics {
            requests: Family::default(),
            // 100 us .. ~3.3 s, doubling.
            duration: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.0001, 2.0, 16,
            )),
            retries: Counter::default(),
            inbound: Family::default(),
            buffered_bytes: Gauge::default(),
            budget_refusals: Counter::default(),
            rate_limited: Family::default(),
            tenant_shed: Family::default(),
            count: Arc::default(),
            requests_by: ByTenantOutcome::default(),
            inbound_by: ByTenantOutcome::default(),
        }
    }
}

impl DelegationMetrics {
    pub fn record(&self, tenant: &str, outcome: &str, elapsed: std::time::Duration) {
        self.requests_by.inc(&self.requests, tenant, outcome);
        self.duration.observe(elapsed.as_secs_f64());
        self.count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// One delegation this node served as the home node (for a peer).
    pub fn record_inbound(&self, tenant: &str, outcome: &str) {
        self.inbound_by.inc(&self.inbound, tenant, outcome);
    }

    /// Delegations recorded since start.
    pub fn total(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    pub method: String,
}

/// Counters of the security offload, bumped where the decisions are made.
#[derive(Clone, Debug, Default)]
pub struct SecurityMetrics {
    pub auth_failures: Family<MethodLabel, Counter<u64, AtomicU64>>,
    pub denials: Counter<u64, AtomicU64>,
    pub enrollments: Counter<u64, AtomicU64>,
    pub revocations: Counter<u64, AtomicU64>,
    pub revoked: Gauge<i64, AtomicI64>,
    pub audit_appended: Counter<u64, AtomicU64>,
    pub audit_queue_full_waits: Counter<u64, AtomicU64>,
    pub audit_dropped: Counter<u64, AtomicU64>,
    /// Enrollment and renewal requests refused by the per-address rate limit.
    pub enroll_throttled: Counter<u64, AtomicU64>,
    /// Failed enrollment/renewal attempts counted into an aggregate audit
    /// entry instead of one entry each.
    pub audit_sampled_out: Counter<u64, AtomicU64>,
    /// Changed credential files whose node certificate was not applied
    /// because peers would refuse it (not from the mesh CA, or revoked).
    pub reloads_refused: Counter<u64, AtomicU64>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    /// `ingress:<addr>` or `admin:<addr>`.
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TimeoutLabels {
    pub listener: String,
    /// `header` (no complete request head in time) or `idle` (no request in flight for the idle timeout).
    pub reason: String,
}

/// Counters of the ingress and admin listeners ([`crate::ingress::listen`]), bumped
/// where the listener refuses, sheds or closes.
#[derive(Clone, Debug, Default)]
pub struct ListenerMetrics {
    pub connections: Family<ListenerLabel, Gauge<i64, AtomicI64>>,
    pub connections_refused: Family<ListenerLabel, Counter<u64, AtomicU64>>,
    pub connections_timed_out: Family<TimeoutLabels, Counter<u64, AtomicU64>>,
    pub requests_shed: Family<ListenerLabel, Counter<u64, AtomicU64>>,
    pub accept_errors: Family<ListenerLabel, Counter<u64, AtomicU64>>,
}

impl ListenerMetrics {
    fn label(listener: &str) -> ListenerLabel {
        ListenerLabel {
            listener: listener.to_string(),
        }
    }

    /// Connections refused on `listener` so far.
    pub fn refused(&self, listener: &str) -> u64 {
        self.connections_refused
            .get_or_create(&Self::label(listener))
            .get()
    }

    /// Requests shed on `listener` so far.
    pub fn shed(&self, listener: &str) -> u64 {
        self.requests_shed
            .get_or_create(&Self::label(listener))
            .get()
    }

    /// Connections of `listener` closed for `reason` (`header`, `idle`) so far.
    pub fn timed_out(&self, listener: &str, reason: &str) -> u64 {
        self.connections_timed_out
            .get_or_create(&TimeoutLabels {
                listener: listener.to_string(),
                reason: reason.to_string(),
            })
            .get()
    }

    /// Connections open on `listener` now.
    pub fn open(&self, listener: &str) -> i64 {
        self.connections.get_or_create(&Self::label(listener)).get()
    }
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
    pub probes_answered: Counter<u64, AtomicU64>,
    pub connections: Gauge<i64, AtomicI64>,
    pub cert_expiry_seconds: Gauge<i64, AtomicI64>,
    pub uptime_seconds: Gauge<i64, AtomicI64>,
    pub agents: Gauge<i64, AtomicI64>,
    pub relay_datagrams: Counter<u64, AtomicU64>,
    pub relay_bytes: Counter<u64, AtomicU64>,
    pub relay_refused: Family<ReasonLabel, Counter<u64, AtomicU64>>,
    pub relay_sessions: Gauge<i64, AtomicI64>,
    /// MQTT sessions of the edge bridge connected now.
    pub mqtt_connected: Gauge<i64, AtomicI64>,
    pub mqtt_events: Family<EventLabel, Counter<u64, AtomicU64>>,
    pub path_relayed: Family<StateLabel, Counter<u64, AtomicU64>>,
    pub path_direct_upgrades: Counter<u64, AtomicU64>,
    pub path_direct_lost: Counter<u64, AtomicU64>,
    pub delegation: DelegationMetrics,
    pub security: SecurityMetrics,
    pub listeners: ListenerMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(
            DelegationMetrics::default(),
            SecurityMetrics::default(),
            ListenerMetrics::default(),
        )
    }
}

impl Metrics {
    pub fn new(
        delegation: DelegationMetrics,
        security: SecurityMetrics,
        listeners: ListenerMetrics,
    ) -> Self {
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
            probes_answered: Counter::default(),
            connections: Gauge::default(),
            cert_expiry_seconds: Gauge::default(),
            uptime_seconds: Gauge::default(),
            agents: Gauge::default(),
            relay_datagrams: Counter::default(),
            relay_bytes: Counter::default(),
            relay_refused: Family::default(),
            relay_sessions: Gauge::default(),
            mqtt_connected: Gauge::default(),
            mqtt_events: Family::default(),
            path_relayed: Family::default(),
            path_direct_upgrades: Counter::default(),
            path_direct_lost: Counter::default(),
            delegation,
            security,
            listeners,
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
            "overlay_probes_answered",
            "Probe connections of peers checking that this node accepts their certificate (dmsc-node check), answered and closed without pooling",
            m.probes_answered.clone(),
        );
        registry.register(
            "relay_datagrams",
            "Datagrams this relay forwarded between mesh nodes",
            m.relay_datagrams.clone(),
        );
        registry.register(
            "relay_bytes",
            "Datagram bytes this relay forwarded (QUIC ciphertext)",
            m.relay_bytes.clone(),
        );
        registry.register(
            "relay_refused",
            "Datagrams or sessions this relay refused, by reason (unknown destination, limit, claim, queue full, malformed)",
            m.relay_refused.clone(),
        );
        registry.register(
            "relay_sessions",
            "Live relay sessions this relay serves",
            m.relay_sessions.clone(),
        );
        registry.register(
            "mqtt_sessions_connected",
            "MQTT sessions of the edge bridge connected to their broker now (alert when below the sessions configured: their tenants' edge agents are unreachable through this node)",
            m.mqtt_connected.clone(),
        );
        registry.register(
            "mqtt_events",
            "MQTT edge bridge events (event = connects, delegations to edge agents, calls from the edge, refused messages, late_replies, duplicates dropped)",
            m.mqtt_events.clone(),
        );
        registry.register(
            "overlay_relayed_datagrams",
            "Overlay datagrams this node sent or received through relays, or dropped on the relayed path (state = sent, received, dropped)",
            m.path_relayed.clone(),
        );
        registry.register(
            "overlay_direct_upgrades",
            "Relayed peers moved to a direct path by hole punching",
            m.path_direct_upgrades.clone(),
        );
        registry.register(
            "overlay_direct_lost",
            "Direct paths to relayed peers that stopped answering (traffic back through a relay)",
            m.path_direct_lost.clone(),
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
        registry.register(
            "agents",
            "Agents this node can route to (its own and the mesh's)",
            m.agents.clone(),
        );
        registry.register(
            "delegations",
            "Delegations this node routed for its callers, by tenant and outcome",
            m.delegation.requests.clone(),
        );
        registry.register(
            "delegation_duration_seconds",
            "Time from a delegation's arrival at ingress to the response head (or the error)",
            m.delegation.duration.clone(),
        );
        registry.register(
            "delegation_retries",
            "Delegation attempts moved to another candidate after a failure",
            m.delegation.retries.clone(),
        );
        registry.register(
            "delegations_inbound",
            "Delegations peers sent to this node's agents over the overlay, by tenant and outcome (this node enforcing the deadline shows as outcome=\"timeout\"; tenant=\"(not hosted here)\" for an agent this node does not host)",
            m.delegation.inbound.clone(),
        );
        registry.register(
            "buffered_body_bytes",
            "Bytes of request bodies buffered at ingress now (bounded by delegation.max_buffered_total)",
            m.delegation.buffered_bytes.clone(),
        );
        registry.register(
            "body_budget_refusals",
            "Requests refused with 503 because buffering their body would exceed delegation.max_buffered_total",
            m.delegation.budget_refusals.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests refused with 429 by a tenant rate limit, by tenant and scope (tenant, caller, target)",
            m.delegation.rate_limited.clone(),
        );
        registry.register(
            "tenant_shed",
            "Requests shed with 503 on a multi-tenant listener: their tenant held its fair share of the in-flight budget",
            m.delegation.tenant_shed.clone(),
        );
        let sec = &m.security;
        registry.register(
            "auth_failures",
            "Callers refused at ingress or enrollment, by method (mtls, jwt, token)",
            sec.auth_failures.clone(),
        );
        registry.register(
            "policy_denials",
            "Authenticated requests refused by tenant policy (e.g. another tenant's address)",
            sec.denials.clone(),
        );
        registry.register(
            "agent_certificates_issued",
            "Agent certificates this node issued (enrollment and renewal)",
            sec.enrollments.clone(),
        );
        registry.register(
            "revocations_applied",
            "Revocations this node learned (admin API or gossip) and enforced",
            sec.revocations.clone(),
        );
        registry.register(
            "revoked_certificates",
            "Revoked certificates known to this node",
            sec.revoked.clone(),
        );
        registry.register(
            "audit_appended",
            "Audit log lines written (events and checkpoints)",
            sec.audit_appended.clone(),
        );
        registry.register(
            "audit_queue_full_waits",
            "Audit appends that waited because the writer was a full queue behind",
            sec.audit_queue_full_waits.clone(),
        );
        registry.register(
            "audit_dropped",
            "Audit entries dropped because thousands of appends were already waiting for a full queue (a flood)",
            sec.audit_dropped.clone(),
        );
        let l = &m.listeners;
        registry.register(
            "listener_connections",
            "Open connections of each ingress and admin listener",
            l.connections.clone(),
        );
        registry.register(
            "listener_connections_refused",
            "Connections closed at once because the listener's or the node's connection limit ([limits] max_connections*) was reached",
            l.connections_refused.clone(),
        );
        registry.register(
            "listener_connections_timed_out",
            "Connections the node closed by reason: header (no complete request head within [limits] header_read_timeout_ms) or idle (no request in flight for idle_timeout_ms)",
            l.connections_timed_out.clone(),
        );
        registry.register(
            "listener_requests_shed",
            "Requests answered 503 with Retry-After because the listener was serving [limits] max_in_flight_per_listener requests",
            l.requests_shed.clone(),
        );
        registry.register(
            "listener_accept_errors",
            "Failed accepts (e.g. out of file descriptors); the listener pauses 50 ms, growing to 1 s, while they persist",
            l.accept_errors.clone(),
        );
        registry.register(
            "enroll_throttled",
            "Enrollment and renewal requests refused with 429 by the per-address rate limit",
            sec.enroll_throttled.clone(),
        );
        registry.register(
            "audit_sampled_out",
            "Failed enrollment and renewal attempts summed into an aggregate audit entry instead of one entry each",
            sec.audit_sampled_out.clone(),
        );
        registry.register(
            "credential_reloads_refused",
            "Changed credential files the node did not apply because their node certificate does not chain to the CA bundle or is revoked (the current certificate stays in use)",
            sec.reloads_refused.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn count(f: &Family<DelegationLabels, Count>, tenant: &str, outcome: &str) -> u64 {
        f.get_or_create(&DelegationLabels {
            tenant: tenant.into(),
            outcome: outcome.into(),
        })
        .get()
    }

    #[test]
    fn delegations_are_counted_in_the_exported_families() {
        let m = DelegationMetrics::default();
        let d = std::time::Duration::from_millis(1);
        m.record("acme", "ok", d);
        m.record("acme", "ok", d);
        m.record("acme", "timeout", d);
        m.record("globex", "ok", d);
        m.record_inbound("acme", "ok");
        // A clone (what the app hands around) counts into the same families.
        let c = m.clone();
        c.record("acme", "ok", d);
        c.record_inbound("acme", "ok");
        assert_eq!(count(&m.requests, "acme", "ok"), 3);
        assert_eq!(count(&m.requests, "acme", "timeout"), 1);
        assert_eq!(count(&m.requests, "globex", "ok"), 1);
        assert_eq!(count(&m.inbound, "acme", "ok"), 2);
        assert_eq!(count(&m.inbound, "globex", "ok"), 0);
        assert_eq!(m.total(), 5);
    }
}
