//! Tenant policies between nodes: the two control questions they need.
//!
//! - `policy <tenant>`: a peer that saw `policy/<tenant>` announced with a
//!   newer version asks for the signed document; the answer is the envelope
//!   as this node holds it (the asker verifies it: the signature, not the
//!   sender, makes it valid), or nothing.
//! - `denied\n<json>`: a calling node refused a request for one of this
//!   node's agents by tenant policy; the request never came here, so the
//!   calling node reports the refusal and this node audits it too (each
//!   denial is then on record on both nodes, with the rule). Reports are for
//!   this node's own agents only and are bounded on both sides.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dmsc_transport::{BiStream, Channel, Overlay};
use serde::{Deserialize, Serialize};

use crate::forward::Delegator;

/// Largest control question (a denial report).
pub const MAX_QUESTION: usize = 4096;

/// Denial reports in flight from this node; more are dropped (logged).
const MAX_REPORTS_IN_FLIGHT: usize = 16;

/// Home nodes a refusal is reported to, at most.
const MAX_REPORT_NODES: usize = 4;

/// A refusal the calling node reports to the target's home node(s).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DenialReport {
    pub tenant: String,
    /// What was addressed: `agent:<name>`, `tag:<tag>` or `intent`.
    pub target: String,
    pub caller: String,
    pub reason: String,
    pub rule: Option<String>,
}

/// Answers `policy <tenant>` with the signed envelope held here.
pub async fn answer_policy(s: &mut BiStream, d: &Delegator, tenant: &str) {
    match d.security.policies.held(tenant) {
        Some(h) => {
            if s.send.write_all(h.envelope.as_bytes()).await.is_ok() {
                let _ = s.send.finish();
            }
        }
        None => {
            let _ = s.send.finish();
        }
    }
}

/// Audits a denial a calling node reports, if it concerns our agents (the
/// named one, or any of the tenant's for a capability or intent address).
pub fn take_report(s: &BiStream, d: &Delegator, json: &[u8]) {
    let Ok(r) = serde_json::from_slice::<DenialReport>(json) else {
        tracing::debug!(peer = %s.peer, "unreadable denial report");
        return;
    };
    let ours = match r.target.strip_prefix("agent:") {
        Some(name) => d
            .agents
            .get(&dmsc_registry::AgentId::new(r.tenant.as_str(), name))
            .is_some(),
        None => d.agents.all().iter().any(|a| a.id.tenant == r.tenant),
    };
    if !ours {
        return;
    }
    d.security.record(dmsc_audit::Event::tenant(
        r.tenant,
        dmsc_audit::Denied {
            caller: format!("{} (via node {})", r.caller, s.peer),
            target: r.target,
            reason: format!("refused by calling node `{}`: {}", s.peer, r.reason),
            rule: r.rule,
        },
    ));
}

/// Why a policy could not be fetched from a peer.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Stream(#[from] dmsc_transport::TransportError),
    #[error("the peer holds no policy of that tenant")]
    Empty,
    #[error("the answer is larger than {0} bytes")]
    TooLarge(usize),
    #[error("no answer within 5 s")]
    Timeout,
}

/// Asks the peer at `addr` for `tenant`'s signed policy.
pub async fn fetch_policy(
    overlay: &Overlay,
    addr: std::net::SocketAddr,
    tenant: &str,
) -> Result<Vec<u8>, FetchError> {
    let ask = async {
        let mut s = overlay.open_stream(addr, Channel::Control).await?;
        s.send
            .write_all(format!("policy {tenant}").as_bytes())
            .await?;
        s.send.finish()?;
        let mut buf = Vec::new();
        while let Some(b) = s.recv.read_chunk(64 * 1024).await? {
            buf.extend_from_slice(&b);
            if buf.len() > dmsc_policy::signed::MAX_ENVELOPE_BYTES {
                return Err(FetchError::TooLarge(
                    dmsc_policy::signed::MAX_ENVELOPE_BYTES,
                ));
            }
        }
        if buf.is_empty() {
            return Err(FetchError::Empty);
        }
        Ok(buf)
    };
    tokio::time::timeout(Duration::from_secs(5), ask)
        .await
        .map_err(|_| FetchError::Timeout)?
}

static REPORTS_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

impl Delegator {
    /// Reports a tenant-policy refusal of a request for `target` of
    /// `tenant` to the home nodes of the agents it could have reached (the
    /// named agent's; for a capability or intent address, of the tenant's
    /// agents with that tag, or all of them), at most a few, other nodes
    /// only. Fire and forget, bounded.
    pub(crate) fn report_denial(
        &self,
        caller: &str,
        tenant: &str,
        target: &dmsc_registry::Target,
        e: &crate::proto::http::MeshError,
    ) {
        let mut nodes: Vec<String> = Vec::new();
        {
            let reg = self.mesh.read();
            for entry in reg.tenant_entries(tenant) {
                let hit = match target {
                    dmsc_registry::Target::Agent(n) => entry.id.name == *n,
                    dmsc_registry::Target::Tag(t) => {
                        entry.record.tags().any(|x| x.eq_ignore_ascii_case(t))
                    }
                    dmsc_registry::Target::Intent(_) => true,
                };
                if hit && *entry.node != *self.me && !nodes.iter().any(|n| **n == *entry.node) {
                    nodes.push(entry.node.to_string());
                }
                if nodes.len() >= MAX_REPORT_NODES {
                    break;
                }
            }
        }
        for node in nodes {
            if let Some((addr, _)) = self.mesh.node_route(&node) {
                self.send_report(addr, node, caller, tenant, target, e);
            }
        }
    }

    fn send_report(
        &self,
        addr: std::net::SocketAddr,
        node: String,
        caller: &str,
        tenant: &str,
        target: &dmsc_registry::Target,
        e: &crate::proto::http::MeshError,
    ) {
        if REPORTS_IN_FLIGHT.fetch_add(1, Ordering::Relaxed) >= MAX_REPORTS_IN_FLIGHT {
            REPORTS_IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
            tracing::debug!(%node, "too many denial reports in flight; this one is audited here only");
            return;
        }
        let report = DenialReport {
            tenant: tenant.to_string(),
            target: crate::forward::describe(target),
            caller: caller.chars().take(512).collect(),
            reason: e.detail.chars().take(2048).collect(),
            rule: crate::forward::rule_of(&e.detail),
        };
        let overlay = self.overlay.clone();
        tokio::spawn(async move {
            let send = async {
                let mut s = overlay.open_stream(addr, Channel::Control).await?;
                let mut q = b"denied\n".to_vec();
                q.extend_from_slice(&serde_json::to_vec(&report).unwrap_or_default());
                s.send.write_all(&q).await?;
                s.send.finish()?;
                Ok::<_, dmsc_transport::TransportError>(())
            };
            match tokio::time::timeout(Duration::from_secs(5), send).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%node, error = %e, "denial report not delivered"),
                Err(_) => tracing::debug!(%node, "denial report timed out"),
            }
            REPORTS_IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
        });
    }
}
