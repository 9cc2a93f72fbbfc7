//! Tenant rate limits that hold mesh-wide, and fair load shedding per
//! tenant (docs/rate-limits.md).
//!
//! The decisions are pure and take `now` ([`table`]: buckets, concurrency
//! and demand per tenant, caller and target; [`share`]: a node's part of a
//! mesh-wide limit; [`fair`]: the per-tenant split of a listener's
//! in-flight budget; [`peers`]: what other nodes published). This module is
//! the glue: one [`Limiter`] per node behind a lock, the 429 it answers
//! (with `Retry-After`), its metrics and its sampled audit entries, and the
//! loop that publishes this node's demand (`usage/<tenant>`) and reads the
//! others'.
//!
//! Limits come from each tenant's policy; whoever applies a policy calls
//! [`Limiter::set`]. A tenant without limits costs one map lookup.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dmsc_gossip::Gossip;

use crate::metrics::{DelegationMetrics, TenantScopeLabels};
use crate::proto::http::{ErrorKind, MeshError};
use crate::security::throttle::{Aggregate, FailureSampler, Sample};
use crate::security::Security;

pub mod bucket;
pub mod fair;
pub mod peers;
pub mod share;
pub mod table;

pub use table::{Held, Limit, Rate, Refused, Scope, TenantLimits};

/// Refusals audited one by one per tenant and scope in each window; the
/// rest of the window is one aggregate entry.
pub const AUDIT_PER_WINDOW: u32 = 10;
/// The audit sampling window.
pub const AUDIT_WINDOW: Duration = Duration::from_secs(10);
/// Tenant and scope pairs sampled individually before they share one
/// overflow window.
const AUDIT_TRACKED: usize = 1024;

/// One node's tenant limits.
pub struct Limiter {
    me: String,
    table: Mutex<table::Table>,
    /// Whether any tenant has limits (else the request path takes no lock).
    any: AtomicBool,
    sampler: Mutex<FailureSampler<Scope, String>>,
    metrics: DelegationMetrics,
    security: Arc<Security>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

/// What an admitted request holds (concurrency slots) until it is dropped:
/// with the response body, so a stream counts until it ends.
#[derive(Debug)]
pub struct Permit {
    limiter: Arc<Limiter>,
    held: Held,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.held.is_empty() {
            self.limiter.table().release(&self.held);
        }
    }
}

impl Limiter {
    pub fn new(me: &str, security: Arc<Security>, metrics: DelegationMetrics) -> Arc<Limiter> {
        Arc::new(Limiter {
            me: me.to_string(),
            table: Mutex::new(table::Table::default()),
            any: AtomicBool::new(false),
            sampler: Mutex::new(FailureSampler::new(
                AUDIT_PER_WINDOW,
                AUDIT_WINDOW,
                AUDIT_TRACKED,
            )),
            metrics,
            security,
        })
    }

    fn table(&self) -> MutexGuard<'_, table::Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets a tenant's limits (`None`: no limits). What the kept limits
    /// hold (tokens, requests in flight) carries over.
    pub fn set(&self, tenant: &str, limits: Option<TenantLimits>) {
        let mut t = self.table();
        t.set(tenant, limits, Instant::now());
        self.any.store(!t.is_empty(), Ordering::Release);
    }

    /// This node's fraction of `tenant`'s mesh-wide limit now (status, tests).
    pub fn fraction(&self, tenant: &str) -> f64 {
        self.table().fraction(tenant, Instant::now())
    }

    /// Checks the tenant's (mesh-wide share) and the caller's limits at the
    /// ingress. `target` names what was asked for (audit only).
    pub fn admit_ingress(
        self: &Arc<Self>,
        tenant: &str,
        caller: &str,
        target: &str,
    ) -> Result<Option<Permit>, MeshError> {
        if !self.any.load(Ordering::Acquire) {
            return Ok(None);
        }
        let r = self.table().admit_ingress(tenant, caller, Instant::now());
        self.decided(tenant, caller, target, r)
    }

    /// Checks the limit of `tenant`'s agent `agent` on its home node.
    pub fn admit_target(
        self: &Arc<Self>,
        tenant: &str,
        caller: &str,
        agent: &str,
    ) -> Result<Option<Permit>, MeshError> {
        if !self.any.load(Ordering::Acquire) {
            return Ok(None);
        }
        let r = self.table().admit_target(tenant, agent, Instant::now());
        self.decided(tenant, caller, &format!("agent:{agent}"), r)
    }

    /// The wait to tell a caller whose request a home node refused by the
    /// target's limit (the refusal crosses the overlay without it).
    pub fn target_wait(&self, tenant: &str, agent: &str) -> Duration {
        self.table().target_wait(tenant, agent)
    }

    fn decided(
        self: &Arc<Self>,
        tenant: &str,
        caller: &str,
        target: &str,
        r: Result<Held, Refused>,
    ) -> Result<Option<Permit>, MeshError> {
        match r {
            Ok(held) if held.is_empty() => Ok(None),
            Ok(held) => Ok(Some(Permit {
                limiter: self.clone(),
                held,
            })),
            Err(refused) => Err(self.refused(tenant, caller, target, refused)),
        }
    }

    /// Counts, audits (sampled) and words one refusal.
    fn refused(&self, tenant: &str, caller: &str, target: &str, r: Refused) -> MeshError {
        self.metrics
            .rate_limited
            .get_or_create(&TenantScopeLabels {
                tenant: tenant.to_string(),
                scope: r.scope.as_str().to_string(),
            })
            .inc();
        let mut due = Vec::new();
        let sample = self
            .sampler
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .failed(r.scope, tenant.to_string(), Instant::now(), &mut due);
        if self.security.audit.is_some() {
            match sample {
                Sample::Audit => self.security.record(dmsc_audit::Event::tenant(
                    tenant,
                    dmsc_audit::RateLimited {
                        caller: caller.to_string(),
                        target: target.to_string(),
                        scope: r.scope.as_str().to_string(),
                        limit: r.limit.clone(),
                        refused: 1,
                        window_s: None,
                    },
                )),
                Sample::Count => {
                    self.security.metrics.audit_sampled_out.inc();
                }
            }
            self.write_aggregates(due);
        }
        let whose = match r.scope {
            Scope::Tenant => format!("tenant `{tenant}`"),
            Scope::Caller => format!("caller `{caller}` of tenant `{tenant}`"),
            // `agent:<name>` as audited; said as the other scopes are.
            Scope::Target => match target.strip_prefix("agent:") {
                Some(agent) => format!("agent `{agent}` of tenant `{tenant}`"),
                None => format!("`{target}` of tenant `{tenant}`"),
            },
        };
        MeshError::new(
            ErrorKind::RateLimited,
            &self.me,
            format!(
                "rate limit of {whose} reached ({}); retry after {} s",
                r.limit,
                crate::proto::http::retry_after_secs(r.retry_after)
            ),
        )
        .retry_after(r.retry_after)
    }

    fn write_aggregates(&self, due: Vec<Aggregate<Scope, String>>) {
        for a in due {
            self.security.record(dmsc_audit::Event {
                tenant: a.source.clone(),
                kind: dmsc_audit::RateLimited {
                    caller: String::new(),
                    target: String::new(),
                    scope: a.kind.as_str().to_string(),
                    limit: match &a.source {
                        Some(_) => "see the entries before".to_string(),
                        None => "tenants beyond the sampling bound, together".to_string(),
                    },
                    refused: a.failed,
                    window_s: Some(a.window.as_secs()),
                }
                .into(),
            });
        }
    }

    /// One round of the glue: publish this node's demand where it changed,
    /// take in the others', close audit windows, forget idle state.
    async fn round(&self, gossip: &Gossip, peers: &mut peers::PeerUsage) {
        let now = Instant::now();
        let updates = self.table().usage_updates(now);
        for (tenant, value) in updates {
            let key = peers::usage_key(&tenant);
            match value {
                Some(v) => gossip.set(&key, &v).await,
                None => gossip.delete(&key).await,
            }
        }
        let scan = gossip
            .scan_since(peers::KEY_USAGE_PREFIX, &peers.cursor())
            .await;
        peers.apply(scan);
        let (live, sums) = peers.sums();
        {
            let mut t = self.table();
            t.set_peers(live, sums);
            t.prune(now);
        }
        if self.security.audit.is_some() {
            let mut due = Vec::new();
            self.sampler
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .flush(now, &mut due);
            self.write_aggregates(due);
        }
    }

    /// Publishes and learns demand every `every` (a gossip round: a value
    /// changes at most once per round) until dropped.
    pub async fn run(self: Arc<Self>, gossip: Arc<Gossip>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut peers = peers::PeerUsage::default();
        self.table().set_warmup(warmup(every));
        loop {
            tick.tick().await;
            self.round(&gossip, &mut peers).await;
        }
    }
}

/// The warm-up for a gossip round of `every`: a peer that starts seeing
/// a tenant publishes within a round and is heard everywhere a round or
/// two later.
pub fn warmup(every: Duration) -> Duration {
    (every * 3).max(Duration::from_millis(300))
}

/// Per-tenant shedding on one multi-tenant listener ([`fair`]).
#[derive(Debug)]
pub struct FairShed {
    listener: String,
    share: Mutex<fair::FairShare>,
    metrics: DelegationMetrics,
}

/// A request's place in its tenant's share of a listener; released on drop.
#[derive(Debug)]
pub struct FairSlot {
    shed: Arc<FairShed>,
    tenant: String,
}

impl Drop for FairSlot {
    fn drop(&mut self) {
        self.shed
            .share
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .release(&self.tenant);
    }
}

impl FairShed {
    pub fn new(listener: &str, budget: usize, metrics: DelegationMetrics) -> Arc<FairShed> {
        Arc::new(FairShed {
            listener: listener.to_string(),
            share: Mutex::new(fair::FairShare::new(budget)),
            metrics,
        })
    }

    /// A slot for a request of `tenant`, or the 503 that sheds it.
    pub fn admit(self: &Arc<Self>, tenant: &str, me: &str) -> Result<FairSlot, MeshError> {
        let mut s = self.share.lock().unwrap_or_else(|p| p.into_inner());
        if s.try_admit(tenant) {
            return Ok(FairSlot {
                shed: self.clone(),
                tenant: tenant.to_string(),
            });
        }
        let allowance = s.allowance(tenant);
        drop(s);
        self.metrics
            .tenant_shed
            .get_or_create(&crate::metrics::TenantListenerLabels {
                tenant: tenant.to_string(),
                listener: self.listener.clone(),
            })
            .inc();
        Err(MeshError::new(
            ErrorKind::Overloaded,
            me,
            format!(
                "{} is answering its share of requests for tenant `{tenant}` ({allowance} at once while other tenants are busy); retry in a second",
                self.listener
            ),
        )
        .retry_after(Duration::from_secs(1)))
    }
}
