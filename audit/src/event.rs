//! What the node records: one typed struct per event kind.
//!
//! The line format keeps `kind` and `detail` as separate top-level fields
//! (with `prev` between them), so [`EventKind`] is not a serde-tagged enum:
//! each variant wraps a plain struct that becomes `detail`, and
//! [`EventKind::name`] gives `kind`. The tenant is not repeated inside
//! `detail`: it is the line's top-level `tenant`, which `tail --tenant`
//! filters on. Checkpoints and crash recoveries are written by the log itself
//! and so are not [`EventKind`]s; a reader gets all of them from
//! [`crate::Line::body`].

use serde::{Deserialize, Serialize};

/// One event for the audit log: the tenant it concerns (if any) and what
/// happened. The writer adds `seq`, `ts`, `node` and `prev`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub tenant: Option<String>,
    pub kind: EventKind,
}

impl Event {
    /// An event concerning `tenant`.
    pub fn tenant(tenant: impl Into<String>, kind: impl Into<EventKind>) -> Self {
        Event {
            tenant: Some(tenant.into()),
            kind: kind.into(),
        }
    }

    /// An event not tied to a tenant (e.g. a failed handshake before any
    /// identity is known).
    pub fn global(kind: impl Into<EventKind>) -> Self {
        Event {
            tenant: None,
            kind: kind.into(),
        }
    }
}

/// The kinds of event a node records. `kind` in the line is [`Self::name`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    Delegation(Delegation),
    Denied(Denied),
    AuthFailure(AuthFailure),
    Enrollment(Enrollment),
    Revocation(Revocation),
    TenantKey(TenantKey),
    Policy(PolicyChange),
    Masked(Masked),
    RateLimited(RateLimited),
    Onboarding(Onboarding),
}

impl EventKind {
    /// The `kind` string written in the line.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Delegation(_) => KIND_DELEGATION,
            EventKind::Denied(_) => KIND_DENIED,
            EventKind::AuthFailure(_) => KIND_AUTH_FAILURE,
            EventKind::Enrollment(_) => KIND_ENROLLMENT,
            EventKind::Revocation(_) => KIND_REVOCATION,
            EventKind::TenantKey(_) => KIND_TENANT_KEY,
            EventKind::Policy(_) => KIND_POLICY,
            EventKind::Masked(_) => KIND_MASKED,
            EventKind::RateLimited(_) => KIND_RATE_LIMITED,
            EventKind::Onboarding(_) => KIND_ONBOARDING,
        }
    }
}

pub(crate) const KIND_DELEGATION: &str = "delegation";
pub(crate) const KIND_DENIED: &str = "denied";
pub(crate) const KIND_AUTH_FAILURE: &str = "auth_failure";
pub(crate) const KIND_ENROLLMENT: &str = "enrollment";
pub(crate) const KIND_REVOCATION: &str = "revocation";
pub(crate) const KIND_TENANT_KEY: &str = "tenant_key";
pub(crate) const KIND_POLICY: &str = "policy";
pub(crate) const KIND_MASKED: &str = "masked";
pub(crate) const KIND_RATE_LIMITED: &str = "rate_limited";
pub(crate) const KIND_ONBOARDING: &str = "onboarding";
pub(crate) const KIND_CHECKPOINT: &str = "checkpoint";
pub(crate) const KIND_RECOVERY: &str = "recovery";

/// Serializes the `detail` object of an event without an enum wrapper.
pub(crate) struct DetailRef<'a>(pub(crate) &'a EventKind);

impl Serialize for DetailRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            EventKind::Delegation(d) => d.serialize(s),
            EventKind::Denied(d) => d.serialize(s),
            EventKind::AuthFailure(d) => d.serialize(s),
            EventKind::Enrollment(d) => d.serialize(s),
            EventKind::Revocation(d) => d.serialize(s),
            EventKind::TenantKey(d) => d.serialize(s),
            EventKind::Policy(d) => d.serialize(s),
            EventKind::Masked(d) => d.serialize(s),
            EventKind::RateLimited(d) => d.serialize(s),
            EventKind::Onboarding(d) => d.serialize(s),
        }
    }
}

/// A delegation this node routed (one per caller request, after retries).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delegation {
    /// The calling agent's identity.
    pub caller: String,
    /// What was asked for: `agent:<name>`, `tag:<tag>` or `intent`.
    pub target: String,
    /// Why this agent was chosen (e.g. `p2c load 0.3 vs 0.7`, `only candidate`).
    pub route: String,
    /// The agent that served it, if one was reached.
    pub agent: Option<String>,
    /// The node that agent sits behind, if one was reached.
    pub serving_node: Option<String>,
    /// `ok`, `agent-error` or the mesh error kind (as in the metrics label).
    pub outcome: String,
    /// HTTP status returned to the caller, if a response was produced.
    pub status: Option<u16>,
    pub duration_ms: u64,
    pub trace_id: Option<String>,
}

/// A request the tenant policy refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Denied {
    pub caller: String,
    pub target: String,
    pub reason: String,
    /// The policy rule that refused (`<tenant>:<entry>`, e.g. `acme:export`,
    /// `globex:import[0].data_tags`), when a tenant policy decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
}

/// A body a tenant's masking rules applied to: how many values each rule
/// masked (never the values), or why it was refused or passed unmasked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Masked {
    /// `request` or `response`.
    pub direction: String,
    pub caller: String,
    pub target: String,
    /// `masked`, `refused` (a body that had to be masked but could not be
    /// parsed) or `passed` (the same, let through by `unparseable = "pass"`).
    pub outcome: String,
    /// Values masked per rule name.
    pub masked: std::collections::BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A tenant policy document this node applied or refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyChange {
    /// `applied` or `refused`.
    pub outcome: String,
    pub version: u64,
    /// SHA-256 of the document's bytes, hex (empty when it did not parse).
    pub digest: String,
    /// `operator` or `tenant-admin:<serial>`; empty when refused unverified.
    pub signer: String,
    /// Where it came from: `admin`, or `gossip:<node>`.
    pub source: String,
    /// Why it was refused (`bad_signature`, `other_tenant_key`, `older_version`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// How a peer tried to authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    Mtls,
    Jwt,
    Token,
}

/// A failed authentication on one of the node's listeners.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthFailure {
    /// Which listener (`overlay`, `ingress`, `admin`, ...).
    pub listener: String,
    pub method: AuthMethod,
    pub reason: String,
    /// The peer's socket address.
    pub peer: String,
    /// The identity the peer claimed, if it got far enough to claim one.
    pub claimed: Option<String>,
}

/// How a certificate was obtained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnrollVia {
    /// First enrollment with a one-time token (its id, never the secret).
    Token(String),
    /// Renewal with the still-valid previous certificate (its serial: a
    /// revocation of a stolen certificate should cover what it renewed).
    Renewal(String),
}

/// An agent certificate issued by this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrollment {
    pub agent: String,
    /// Certificate serial, lowercase hex.
    pub serial: String,
    /// End of validity, unix seconds.
    pub not_after: u64,
    pub via: EnrollVia,
}

/// A certificate this node learned is revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// Certificate serial, lowercase hex.
    pub serial: String,
    pub reason: String,
    /// Where the revocation came from (`admin`, `gossip`, `crl`, ...).
    pub source: String,
}

/// An operator statement about a tenant's data keys that this node applied
/// (its tenant is the line's `tenant`). Operator facts, never sealed: a
/// delete must stay readable after the keys it destroyed are gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantKey {
    /// `rotate-key` or `delete`.
    pub action: String,
    /// The statement's sequence number (unix ms when the operator signed it).
    pub seq: u64,
    /// For a rotate: the id of the key this node made.
    pub key_id: Option<u32>,
    /// For a delete: how many keys this node destroyed.
    pub keys_destroyed: Option<u64>,
    /// Where the statement came from (`admin`, `gossip`).
    pub source: String,
}

/// Requests a tenant rate limit refused (429). Under a flood the log is
/// sampled: the first refusals of a tenant and scope in a window are one
/// entry each (`refused: 1`), the rest of the window one entry with the
/// count and `window_s` set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimited {
    /// The calling agent (empty in an aggregate entry).
    pub caller: String,
    /// What was asked for (empty in an aggregate entry).
    pub target: String,
    /// Which limit: `tenant` (mesh-wide), `caller` or `target`.
    pub scope: String,
    /// The limit, as the caller was told (e.g. `10 requests/s (burst 5) mesh-wide`).
    pub limit: String,
    /// How many refusals this entry stands for.
    pub refused: u64,
    /// Set on an aggregate entry: the window it sums, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_s: Option<u64>,
}

/// A local agent process that redeemed a join token at the node's metadata
/// endpoint: who it is (as the kernel says, not as it claims) and what it
/// registered. Refusals are audited too (`outcome` says why).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Onboarding {
    /// The agent the token names (empty if the token was not readable).
    pub agent: String,
    /// The token's public id (never its secret).
    pub token: String,
    /// How the process reached the node: `unix` (its socket's peer
    /// credentials) or `http` (the link-local address).
    pub via: String,
    pub pid: u32,
    pub uid: u32,
    /// The process's cgroup v2 group.
    pub cgroup: String,
    /// Its network namespace, when it is a named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// `ok`, or why it was refused.
    pub outcome: String,
    /// The digest of the card registered (on success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card: Option<String>,
}

/// A signed statement over the chain so far; written by the log itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Hash of the previous line: equal to this line's `prev`.
    pub head: String,
    /// This line's own `seq` (so `head` covers lines `0..seq`).
    pub seq: u64,
    /// The signer's certificate, base64 DER.
    pub cert: String,
    /// ECDSA P-256 SHA-256 (ASN.1 DER) over [`crate::checkpoint_message`], base64.
    pub sig: String,
}

/// Written first after reopening a log whose last line was cut short by a
/// crash: the partial bytes were moved to `saved_to` and cut from the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recovery {
    pub truncated_bytes: u64,
    pub saved_to: Option<String>,
}

macro_rules! into_kind {
    ($($t:ident),*) => {$(
        impl From<$t> for EventKind {
            fn from(v: $t) -> Self {
                EventKind::$t(v)
            }
        }
    )*};
}
into_kind!(
    Delegation,
    Denied,
    AuthFailure,
    Enrollment,
    Revocation,
    TenantKey,
    RateLimited,
    Onboarding
);

impl From<Masked> for EventKind {
    fn from(v: Masked) -> Self {
        EventKind::Masked(v)
    }
}

impl From<PolicyChange> for EventKind {
    fn from(v: PolicyChange) -> Self {
        EventKind::Policy(v)
    }
}
