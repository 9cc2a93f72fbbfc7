//! The A2A Agent Card, read and written without loss in both dialects.
//!
//! Owns: parsing and validating an agent card (A2A 0.3 and 1.0), exporting it
//! again byte-for-value identical, rewriting every agent endpoint URL to the
//! mesh address, and the card digest that gossip carries.
//!
//! Why it is shaped so: the mesh serves cards it did not write. A card is kept
//! as typed fields for what the mesh reads (name, skills, interfaces, ...)
//! plus a flattened `extra` map at card, skill and interface level, so fields
//! this code does not know (extensions, signatures, a newer spec revision) pass
//! through untouched. A typed optional field that arrived as JSON `null` is
//! remembered and written back as `null`, so `to_json()` equals the imported
//! JSON value exactly. Validation walks the raw JSON first and reports every
//! problem at once with its JSON path, because an agent author fixing a card
//! wants the whole list, not one error per deploy.
//!
//! The serde derives are plain (no validation, no `null` restoration): use
//! [`AgentCard::parse`] and [`AgentCard::to_json`] at the edges.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::record::SkillTags;

/// Largest card accepted by [`AgentCard::parse`]. Real cards are a few KiB;
/// the limit keeps a hostile agent from making its home node buffer and index
/// megabytes.
pub const MAX_CARD_BYTES: usize = 1 << 20;

/// A2A Agent Card (`/.well-known/agent-card.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentCard {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// A2A 0.3: the agent's main endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// A2A 0.3: transport of `url` (`JSONRPC`, `GRPC`, `HTTP+JSON`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_transport: Option<String>,
    /// A2A 0.3 carries the protocol version on the card.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<String>,
    /// A2A 0.3: further endpoints of the same agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub additional_interfaces: Option<Vec<Interface>>,
    /// A2A 1.0: all endpoints of the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supported_interfaces: Option<Vec<Interface>>,
    pub skills: Vec<Skill>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_input_modes: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_output_modes: Option<Vec<String>>,
    /// Kept as JSON: the mesh passes security schemes through and does not
    /// interpret them here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_schemes: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<Value>,
    /// Every field this model does not name, kept verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
    /// Typed optional fields that arrived as `null` (written back as `null`).
    #[serde(skip)]
    nulls: Vec<String>,
}

/// One skill of an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Skill {
    pub id: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub examples: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_modes: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_modes: Option<Vec<String>>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
    #[serde(skip)]
    nulls: Vec<String>,
}

/// One endpoint of an agent: an entry of `additionalInterfaces` (0.3, uses
/// `transport`) or `supportedInterfaces` (1.0, uses `protocolBinding` and
/// `protocolVersion`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_binding: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
    #[serde(skip)]
    nulls: Vec<String>,
}

/// Which A2A revision a card follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Dialect {
    /// A2A 0.3 (and 0.2): top-level `url`, `additionalInterfaces`.
    V03,
    /// A2A 1.0: `supportedInterfaces`.
    V10,
}

impl Dialect {
    /// The dialect of a stated protocol version (`0.3.0`, `1.0`, `1`);
    /// `None` for any other.
    pub fn of_version(v: &str) -> Option<Dialect> {
        let v = v.trim();
        if v == "1" || v.starts_with("1.") {
            Some(Dialect::V10)
        } else if v.starts_with("0.") {
            Some(Dialect::V03)
        } else {
            None
        }
    }
}

impl fmt::Display for Dialect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dialect::V03 => "0.3",
            Dialect::V10 => "1.0",
        })
    }
}

/// One thing wrong with a card, at a JSON path such as `skills[2].tags[0]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldProblem {
    pub field: String,
    pub problem: String,
}

impl fmt::Display for FieldProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "card: {}", self.problem)
        } else {
            write!(f, "`{}`: {}", self.field, self.problem)
        }
    }
}

/// Why a card was refused. `Invalid` lists every problem found, not just the first.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CardError {
    #[error("invalid agent card: not valid JSON: {0}")]
    Syntax(String),
    #[error("invalid agent card: {len} bytes is over the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("invalid agent card: {}", join_problems(.0))]
    Invalid(Vec<FieldProblem>),
}

impl CardError {
    /// The field problems (empty for syntax and size errors).
    pub fn problems(&self) -> &[FieldProblem] {
        match self {
            CardError::Invalid(p) => p,
            _ => &[],
        }
    }
}

fn join_problems(p: &[FieldProblem]) -> String {
    p.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

const CARD_OPTIONAL: &[&str] = &[
    "description",
    "version",
    "url",
    "preferredTransport",
    "protocolVersion",
    "additionalInterfaces",
    "supportedInterfaces",
    "defaultInputModes",
    "defaultOutputModes",
    "securitySchemes",
    "security",
    "capabilities",
    "provider",
];
const SKILL_OPTIONAL: &[&str] = &[
    "description",
    "tags",
    "examples",
    "inputModes",
    "outputModes",
];
const INTERFACE_OPTIONAL: &[&str] = &["protocolBinding", "protocolVersion", "transport"];

impl AgentCard {
    /// Parses and validates a card. Every problem is reported at once.
    pub fn parse(bytes: &[u8]) -> Result<AgentCard, CardError> {
        if bytes.len() > MAX_CARD_BYTES {
            return Err(CardError::TooLarge {
                len: bytes.len(),
                max: MAX_CARD_BYTES,
            });
        }
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| CardError::Syntax(e.to_string()))?;
        Self::from_value(value)
    }

    /// Validates a JSON value and converts it into a card.
    pub fn from_value(value: Value) -> Result<AgentCard, CardError> {
        let problems = validate(&value);
        if !problems.is_empty() {
            return Err(CardError::Invalid(problems));
        }
        let nulls = null_fields(&value, CARD_OPTIONAL);
        let skill_nulls: Vec<Vec<String>> = array_items(&value, "skills")
            .map(|s| null_fields(s, SKILL_OPTIONAL))
            .collect();
        let add_nulls: Vec<Vec<String>> = array_items(&value, "additionalInterfaces")
            .map(|s| null_fields(s, INTERFACE_OPTIONAL))
            .collect();
        let sup_nulls: Vec<Vec<String>> = array_items(&value, "supportedInterfaces")
            .map(|s| null_fields(s, INTERFACE_OPTIONAL))
            .collect();
        let mut card: AgentCard = serde_json::from_value(value).map_err(|e| {
            // Validation covers every typed field, so this is a gap in
            // `validate`; still report it as a card problem, never panic.
            CardError::Invalid(vec![FieldProblem {
                field: String::new(),
                problem: e.to_string(),
            }])
        })?;
        card.nulls = nulls;
        for (s, n) in card.skills.iter_mut().zip(skill_nulls) {
            s.nulls = n;
        }
        if let Some(list) = card.additional_interfaces.as_mut() {
            for (i, n) in list.iter_mut().zip(add_nulls) {
                i.nulls = n;
            }
        }
        if let Some(list) = card.supported_interfaces.as_mut() {
            for (i, n) in list.iter_mut().zip(sup_nulls) {
                i.nulls = n;
            }
        }
        Ok(card)
    }

    /// The card as JSON, equal to the value it was parsed from (plus any
    /// changes made since, such as [`AgentCard::rewrite_urls`]).
    pub fn to_json(&self) -> Value {
        // Serializing plain data with string keys into a Value cannot fail;
        // fall back to Null rather than panic if serde ever disagrees.
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        restore_nulls(&mut v, &self.nulls);
        if let Some(Value::Array(items)) = v.get_mut("skills") {
            for (item, s) in items.iter_mut().zip(&self.skills) {
                restore_nulls(item, &s.nulls);
            }
        }
        for (key, list) in [
            ("additionalInterfaces", &self.additional_interfaces),
            ("supportedInterfaces", &self.supported_interfaces),
        ] {
            if let (Some(Value::Array(items)), Some(list)) = (v.get_mut(key), list) {
                for (item, i) in items.iter_mut().zip(list) {
                    restore_nulls(item, &i.nulls);
                }
            }
        }
        v
    }

    /// Compact JSON bytes of [`AgentCard::to_json`].
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.to_json()).unwrap_or_default()
    }

    /// A2A 1.0 when the card has `supportedInterfaces` or declares a
    /// protocol version `1.x` (on the card or an interface); otherwise 0.3.
    pub fn dialect(&self) -> Dialect {
        let v1 = |v: &Option<String>| v.as_deref().is_some_and(|v| v.starts_with("1."));
        if self.supported_interfaces.is_some()
            || v1(&self.protocol_version)
            || self
                .additional_interfaces
                .iter()
                .flatten()
                .any(|i| v1(&i.protocol_version))
        {
            Dialect::V10
        } else {
            Dialect::V03
        }
    }

    /// Lowercase hex SHA-256 of the canonical JSON (object keys sorted, as
    /// `serde_json::Value` keeps them without `preserve_order`).
    pub fn digest(&self) -> String {
        let bytes = self.to_bytes();
        let hash = Sha256::digest(&bytes);
        let mut out = String::with_capacity(64);
        for b in hash {
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        out
    }

    /// Fits the card to where the mesh reaches the agent: its registered
    /// URL (`registered`, e.g. `http://10.0.0.5:9101/agents/billing`), to
    /// be followed by [`Self::rewrite_urls`].
    ///
    /// - The mesh forwards every call to the registered URL's port, so an
    ///   interface the card lists on another port (a2a-sdk's samples serve
    ///   gRPC on a second one) could not be reached through the mesh: it is
    ///   left out, and returned so the node can say so. Only when some
    ///   interface is on the registered port (an agent behind a proxy whose
    ///   card names only public URLs keeps them all).
    /// - The mesh name stands for the registered URL, path included: an
    ///   endpoint under the registered path loses that prefix
    ///   (`http://10.0.0.5:9101/agents/billing/` becomes `.../`), since the
    ///   node adds it back to every call.
    pub fn fit_to(&mut self, registered: &str) -> Vec<String> {
        let Some((base, rest)) = Origin::of(registered) else {
            return Vec::new();
        };
        let base_path = rest
            .split(['?', '#'])
            .next()
            .unwrap_or_default()
            .trim_end_matches('/')
            .to_string();
        let port_of = |u: &str| {
            Origin::of(u)
                .map(|(o, _)| o.port)
                .or_else(|| grpc_target(u).map(|(_, p)| p))
        };
        let on_base = |u: &str| port_of(u) == Some(base.port);
        let any_on_base = self.endpoint_urls().any(on_base);
        let mut left_out = Vec::new();
        if any_on_base {
            for list in [
                &mut self.additional_interfaces,
                &mut self.supported_interfaces,
            ]
            .into_iter()
            .flatten()
            {
                list.retain(|i| {
                    let keep = port_of(&i.url).is_none() || on_base(&i.url);
                    if !keep {
                        let binding = i
                            .protocol_binding
                            .as_deref()
                            .or(i.transport.as_deref())
                            .unwrap_or("?");
                        left_out.push(format!("{binding} at {}", i.url));
                    }
                    keep
                });
            }
        }
        if !base_path.is_empty() {
            let strip = |u: &mut String| {
                let Some((o, rest)) = Origin::of(u) else {
                    return;
                };
                if o.port != base.port {
                    return;
                }
                if let Some(after) = under_path(rest, &base_path) {
                    let head = &u[..u.len() - rest.len()];
                    *u = format!("{head}{after}");
                }
            };
            if let Some(u) = self.url.as_mut() {
                strip(u);
            }
            for list in [
                &mut self.additional_interfaces,
                &mut self.supported_interfaces,
            ]
            .into_iter()
            .flatten()
            {
                list.iter_mut().for_each(|i| strip(&mut i.url));
            }
        }
        left_out
    }

    /// Points every URL of the agent's own endpoints at `mesh_url`, keeping
    /// each URL's path, query and fragment: with `mesh_url` =
    /// `http://billing.acme.dmsc`, `http://10.0.0.5:9101/a2a/v1` becomes
    /// `http://billing.acme.dmsc/a2a/v1`, so gRPC or REST interfaces at
    /// sub-paths keep working through the mesh.
    ///
    /// The agent's hosts are those of `url`, `additionalInterfaces[].url`
    /// and `supportedInterfaces[].url`. Every other string in the card that
    /// is an http(s) URL at one of those hosts, whatever its scheme or port
    /// (a `documentationUrl`, an OAuth URL in a security scheme, an
    /// extension field), is rewritten too, so a client never learns the
    /// agent's real address. URLs at other hosts (the provider's web site)
    /// are left alone, and so is free text that merely mentions a URL.
    pub fn rewrite_urls(&mut self, mesh_url: &str) {
        let mesh = mesh_url.trim_end_matches('/');
        let hosts: BTreeSet<String> = self
            .endpoint_urls()
            .filter_map(|u| {
                Origin::of(u)
                    .map(|(o, _)| o.host)
                    .or_else(|| grpc_target(u).map(|(h, _)| h))
            })
            .collect();
        if hosts.is_empty() {
            return;
        }
        // A gRPC interface given as a bare `host:port` target (what a gRPC
        // channel takes, and how a2a-sdk's samples write it) becomes the
        // mesh name in the same form: `billing.acme.dmsc:80`.
        let mesh_target = {
            let authority = mesh.split_once("://").map_or(mesh, |(_, a)| a);
            let authority = authority.split('/').next().unwrap_or(authority);
            if authority
                .rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
            {
                authority.to_string()
            } else {
                format!("{authority}:80")
            }
        };
        let rw_target = |s: &mut String| {
            if Origin::of(s).is_none() {
                if let Some((h, _)) = grpc_target(s) {
                    if hosts.contains(&h) {
                        *s = mesh_target.clone();
                    }
                }
            }
        };
        let rw = |s: &mut String| {
            if let Some((o, rest)) = Origin::of(s) {
                if hosts.contains(&o.host) {
                    *s = format!("{mesh}{rest}");
                }
            }
        };
        let rw_opt = |s: &mut Option<String>| {
            if let Some(s) = s.as_mut() {
                rw(s)
            }
        };
        rw_opt(&mut self.url);
        if let Some(u) = self.url.as_mut() {
            rw_target(u);
        }
        rw_opt(&mut self.description);
        rw_opt(&mut self.version);
        for list in [
            &mut self.additional_interfaces,
            &mut self.supported_interfaces,
        ]
        .into_iter()
        .flatten()
        {
            for i in list {
                rw(&mut i.url);
                rw_target(&mut i.url);
                rewrite_value_map(&mut i.extra, &rw);
            }
        }
        for s in &mut self.skills {
            rw_opt(&mut s.description);
            for list in [&mut s.examples, &mut s.tags].into_iter().flatten() {
                list.iter_mut().for_each(rw);
            }
            rewrite_value_map(&mut s.extra, &rw);
        }
        for v in [
            &mut self.security_schemes,
            &mut self.security,
            &mut self.capabilities,
            &mut self.provider,
        ]
        .into_iter()
        .flatten()
        {
            rewrite_value(v, &rw);
        }
        rewrite_value_map(&mut self.extra, &rw);
    }

    /// Every endpoint URL the card declares, in card order.
    pub fn endpoint_urls(&self) -> impl Iterator<Item = &str> {
        self.url.as_deref().into_iter().chain(
            [&self.additional_interfaces, &self.supported_interfaces]
                .into_iter()
                .flatten()
                .flatten()
                .map(|i| i.url.as_str()),
        )
    }

    /// The A2A protocol binding and version of each endpoint the card
    /// lists, as far as it says (`("JSONRPC", V10)`, deduplicated, in card
    /// order): a `supportedInterfaces` entry's own `protocolVersion` (1.0
    /// when it has none: the version that has that list); the top-level
    /// `url` and `additionalInterfaces` take the card's `protocolVersion`
    /// (0.3 cards carry it) unless an entry states its own. Empty when the
    /// card states no version at all (a card built from config): unknown.
    pub fn a2a_interfaces(&self) -> Vec<(String, Dialect)> {
        let of = Dialect::of_version;
        let card_version = self.protocol_version.as_deref().and_then(of);
        let top = self.url.as_ref().map(|_| {
            (
                self.preferred_transport.as_deref().unwrap_or("JSONRPC"),
                card_version,
            )
        });
        let additional = self.additional_interfaces.iter().flatten().map(|i| {
            (
                i.transport
                    .as_deref()
                    .or(i.protocol_binding.as_deref())
                    .unwrap_or(""),
                i.protocol_version.as_deref().map_or(card_version, of),
            )
        });
        let supported = self.supported_interfaces.iter().flatten().map(|i| {
            (
                i.protocol_binding
                    .as_deref()
                    .or(i.transport.as_deref())
                    .unwrap_or(""),
                i.protocol_version.as_deref().map_or(Some(Dialect::V10), of),
            )
        });
        let mut out: Vec<(String, Dialect)> = Vec::new();
        for (b, v) in top.into_iter().chain(additional).chain(supported) {
            let Some(v) = v else { continue };
            if !b.is_empty()
                && !out
                    .iter()
                    .any(|(ob, ov)| ob.eq_ignore_ascii_case(b) && *ov == v)
            {
                out.push((b.to_string(), v));
            }
        }
        out
    }

    /// The path (and query) of the agent's endpoint for the A2A protocol
    /// binding `binding` (`JSONRPC`, `HTTP+JSON`), preferring one of
    /// version `dialect`; `None` when the card lists no http(s) endpoint for
    /// it. On a card fitted to the agent's registered URL
    /// ([`AgentCard::fit_to`]) this is the path a request through the mesh
    /// takes.
    pub fn endpoint_path(&self, binding: &str, dialect: Option<Dialect>) -> Option<String> {
        let card_dialect = self.dialect();
        // (url, binding, version) of every endpoint, in card order.
        let top = self.url.as_deref().map(|u| {
            (
                u,
                self.preferred_transport.as_deref().unwrap_or("JSONRPC"),
                Some(card_dialect),
            )
        });
        let version = |v: &Option<String>, default: Dialect| {
            v.as_deref().map_or(Some(default), Dialect::of_version)
        };
        let additional = self.additional_interfaces.iter().flatten().map(|i| {
            (
                i.url.as_str(),
                i.transport
                    .as_deref()
                    .or(i.protocol_binding.as_deref())
                    .unwrap_or(""),
                version(&i.protocol_version, card_dialect),
            )
        });
        let supported = self.supported_interfaces.iter().flatten().map(|i| {
            (
                i.url.as_str(),
                i.protocol_binding
                    .as_deref()
                    .or(i.transport.as_deref())
                    .unwrap_or(""),
                version(&i.protocol_version, Dialect::V10),
            )
        });
        let matching: Vec<(&str, Option<Dialect>)> = top
            .into_iter()
            .chain(additional)
            .chain(supported)
            .filter(|(_, b, _)| b.eq_ignore_ascii_case(binding))
            .map(|(u, _, v)| (u, v))
            .collect();
        let best = matching
            .iter()
            .find(|(_, v)| dialect.is_some() && *v == dialect)
            .or(matching.first())?;
        let (_, rest) = Origin::of(best.0)?;
        let rest = rest.split('#').next().unwrap_or_default();
        Some(if rest.starts_with('/') {
            rest.to_string()
        } else {
            format!("/{rest}")
        })
    }

    /// Protocol bindings the agent serves (`JSONRPC`, `GRPC`, `HTTP+JSON`),
    /// deduplicated, in card order. A 0.3 card without `preferredTransport`
    /// serves JSON-RPC (the spec's default).
    pub fn protocols(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let mut push = |p: &str| {
            if !out.iter().any(|o| o == p) {
                out.push(p.to_string());
            }
        };
        if self.url.is_some() {
            push(self.preferred_transport.as_deref().unwrap_or("JSONRPC"));
        }
        for i in [&self.additional_interfaces, &self.supported_interfaces]
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Some(p) = i.protocol_binding.as_deref().or(i.transport.as_deref()) {
                push(p);
            }
        }
        out
    }

    /// Skill ids, names and tags: what gossip carries per skill.
    pub fn skill_tags(&self) -> Vec<SkillTags> {
        self.skills
            .iter()
            .map(|s| SkillTags {
                id: s.id.clone(),
                name: s.name.clone(),
                tags: s.tags.clone().unwrap_or_default(),
            })
            .collect()
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn rewrite_value(v: &mut Value, rw: &dyn Fn(&mut String)) {
    match v {
        Value::String(s) => rw(s),
        Value::Array(items) => items.iter_mut().for_each(|i| rewrite_value(i, rw)),
        Value::Object(m) => rewrite_value_map(m, rw),
        _ => {}
    }
}

fn rewrite_value_map(m: &mut Map<String, Value>, rw: &dyn Fn(&mut String)) {
    m.values_mut().for_each(|v| rewrite_value(v, rw));
}

/// Scheme, host and port of an absolute http(s) URL, compared
/// case-insensitively with the default port made explicit.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

impl Origin {
    /// The origin and the rest of the URL (path, query, fragment; may be empty).
    fn of(url: &str) -> Option<(Origin, &str)> {
        let (scheme, rest) = url.split_once("://")?;
        let scheme = scheme.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "http" => 80,
            "https" => 443,
            _ => return None,
        };
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        // userinfo is not part of the origin
        let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        if hostport.is_empty() || hostport.chars().any(|c| c.is_whitespace() || c == '\\') {
            return None;
        }
        // IPv6 literal: [::1]:8080
        let (host, port) = if let Some(after) = hostport.strip_prefix('[') {
            let (h, p) = after.split_once(']')?;
            (format!("[{h}]"), p.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (hostport.to_string(), None),
            }
        };
        if host.is_empty() || host == "[]" {
            return None;
        }
        let port = match port {
            None | Some("") => default_port,
            Some(p) => p.parse().ok()?,
        };
        Some((
            Origin {
                scheme,
                host: host.to_ascii_lowercase(),
                port,
            },
            tail,
        ))
    }
}

/// What follows `prefix` (a path without a trailing `/`) in `rest` (a URL's
/// path, query and fragment), when `rest` is at or under that path:
/// `/agents/pfx/x` under `/agents/pfx` is `/x`; `/agents/pfxy` is not under.
pub fn under_path<'a>(rest: &'a str, prefix: &str) -> Option<&'a str> {
    let after = rest.strip_prefix(prefix)?;
    (after.is_empty() || after.starts_with(['/', '?', '#'])).then_some(after)
}

/// True for an absolute `http://` or `https://` URL with a host.
pub fn is_http_url(s: &str) -> bool {
    Origin::of(s).is_some()
}

/// The gRPC protocol binding, however a card spells it.
fn is_grpc_binding(b: &str) -> bool {
    b.eq_ignore_ascii_case("grpc")
}

/// A bare gRPC target, `host:port` or `[v6]:port` (no scheme, no path):
/// its lowercased host and its port.
fn grpc_target(s: &str) -> Option<(String, u16)> {
    if s.contains("://") || s.contains(['/', '?', '#', '@']) || s.chars().any(char::is_whitespace) {
        return None;
    }
    let (host, port) = if let Some(after) = s.strip_prefix('[') {
        let (h, p) = after.split_once(']')?;
        (format!("[{h}]"), p.strip_prefix(':')?)
    } else {
        let (h, p) = s.rsplit_once(':')?;
        if h.contains(':') {
            return None;
        }
        (h.to_string(), p)
    };
    if host.is_empty() || host == "[]" {
        return None;
    }
    Some((host.to_ascii_lowercase(), port.parse().ok()?))
}

fn array_items<'a>(v: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    v.get(key).and_then(Value::as_array).into_iter().flatten()
}

fn null_fields(v: &Value, keys: &[&str]) -> Vec<String> {
    keys.iter()
        .filter(|k| v.get(**k).is_some_and(Value::is_null))
        .map(|k| (*k).to_string())
        .collect()
}

fn restore_nulls(v: &mut Value, nulls: &[String]) {
    if let Value::Object(m) = v {
        for k in nulls {
            m.entry(k.clone()).or_insert(Value::Null);
        }
    }
}

struct Problems(Vec<FieldProblem>);

impl Problems {
    fn add(&mut self, field: impl Into<String>, problem: impl Into<String>) {
        self.0.push(FieldProblem {
            field: field.into(),
            problem: problem.into(),
        });
    }

    /// Optional string: absent or null is fine.
    fn opt_string(&mut self, obj: &Map<String, Value>, path: &str, key: &str) {
        match obj.get(key) {
            None | Some(Value::Null) | Some(Value::String(_)) => {}
            Some(_) => self.add(join(path, key), "must be a string"),
        }
    }

    fn required_nonempty(&mut self, obj: &Map<String, Value>, path: &str, key: &str) {
        match obj.get(key) {
            None => self.add(join(path, key), "missing"),
            Some(Value::String(s)) if !s.trim().is_empty() => {}
            Some(_) => self.add(join(path, key), "must be a non-empty string"),
        }
    }

    fn opt_url(&mut self, obj: &Map<String, Value>, path: &str, key: &str) {
        match obj.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if is_http_url(s) => {}
            Some(_) => self.add(join(path, key), "must be an absolute http or https URL"),
        }
    }

    /// An endpoint URL: an absolute http(s) URL, or, for the gRPC binding
    /// (`grpc`: true), a bare `host:port` target as gRPC channels take it.
    fn endpoint_url(&mut self, obj: &Map<String, Value>, path: &str, key: &str, grpc: bool) {
        match obj.get(key) {
            Some(Value::String(s)) if grpc && (is_http_url(s) || grpc_target(s).is_some()) => {}
            Some(Value::String(_)) if grpc => self.add(
                join(path, key),
                "must be an absolute http or https URL, or host:port for the gRPC binding",
            ),
            _ => self.opt_url(obj, path, key),
        }
    }

    fn opt_string_array(&mut self, obj: &Map<String, Value>, path: &str, key: &str) {
        match obj.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    if !item.is_string() {
                        self.add(format!("{}[{i}]", join(path, key)), "must be a string");
                    }
                }
            }
            Some(_) => self.add(join(path, key), "must be an array of strings"),
        }
    }

    fn interfaces(&mut self, obj: &Map<String, Value>, key: &str) {
        match obj.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    let path = format!("{key}[{i}]");
                    let Some(o) = item.as_object() else {
                        self.add(path, "must be an object");
                        continue;
                    };
                    let grpc = ["protocolBinding", "transport"].iter().any(|k| {
                        o.get(*k)
                            .and_then(Value::as_str)
                            .is_some_and(is_grpc_binding)
                    });
                    match o.get("url") {
                        None => self.add(join(&path, "url"), "missing"),
                        Some(_) => self.endpoint_url(o, &path, "url", grpc),
                    }
                    for k in INTERFACE_OPTIONAL {
                        self.opt_string(o, &path, k);
                    }
                }
            }
            Some(_) => self.add(key, "must be an array of interface objects"),
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn validate(v: &Value) -> Vec<FieldProblem> {
    let mut p = Problems(Vec::new());
    let Some(card) = v.as_object() else {
        p.add("", "must be a JSON object");
        return p.0;
    };
    p.required_nonempty(card, "", "name");
    for k in [
        "description",
        "version",
        "preferredTransport",
        "protocolVersion",
    ] {
        p.opt_string(card, "", k);
    }
    let grpc = card
        .get("preferredTransport")
        .and_then(Value::as_str)
        .is_some_and(is_grpc_binding);
    p.endpoint_url(card, "", "url", grpc);
    p.interfaces(card, "additionalInterfaces");
    p.interfaces(card, "supportedInterfaces");
    p.opt_string_array(card, "", "defaultInputModes");
    p.opt_string_array(card, "", "defaultOutputModes");
    match card.get("skills") {
        None => p.add("skills", "missing (an empty array is fine)"),
        Some(Value::Array(skills)) => {
            for (i, s) in skills.iter().enumerate() {
                let path = format!("skills[{i}]");
                let Some(o) = s.as_object() else {
                    p.add(path, "must be an object");
                    continue;
                };
                p.required_nonempty(o, &path, "id");
                p.required_nonempty(o, &path, "name");
                p.opt_string(o, &path, "description");
                for k in ["tags", "examples", "inputModes", "outputModes"] {
                    p.opt_string_array(o, &path, k);
                }
            }
        }
        Some(_) => p.add("skills", "must be an array"),
    }
    let has_url = card.get("url").is_some_and(Value::is_string);
    let has_interfaces = card
        .get("supportedInterfaces")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty());
    // An invalid `url` was reported above; do not report it twice.
    let url_reported = card.get("url").is_some_and(|u| !u.is_null());
    if !has_url && !has_interfaces && !url_reported {
        p.add(
            "url",
            "missing: a card needs `url` (A2A 0.3) or a non-empty `supportedInterfaces` (A2A 1.0)",
        );
    }
    p.0
}

/// A lowercase DNS label for `name`: `[a-z0-9-]`, every run of other
/// characters (and of `-`) becomes one `-`, no leading or trailing `-`, at
/// most 63 characters; an empty result is `agent`.
pub fn slug(name: &str) -> String {
    let mut out = String::with_capacity(name.len().min(63));
    let mut dash = false;
    for c in name.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            if dash && !out.is_empty() {
                out.push('-');
            }
            dash = false;
            out.push(c);
            if out.len() >= 63 {
                break;
            }
        } else {
            dash = true;
        }
    }
    out.truncate(63);
    let trimmed = out.trim_end_matches('-');
    if trimmed.is_empty() {
        "agent".to_string()
    } else {
        trimmed.to_string()
    }
}

/// True when `s` is already a slug (`slug(s) == s`).
pub fn is_slug(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn v03() -> Value {
        json!({
            "name": "Billing Agent",
            "description": "Handles invoices",
            "url": "http://10.0.0.5:9101/a2a/v1",
            "preferredTransport": "JSONRPC",
            "protocolVersion": "0.3.0",
            "version": "1.2.0",
            "additionalInterfaces": [
                {"url": "http://10.0.0.5:9101/a2a/v1", "transport": "JSONRPC"},
                {"url": "http://10.0.0.5:9102", "transport": "GRPC", "x-extra": 1}
            ],
            "capabilities": {"streaming": true},
            "defaultInputModes": ["text/plain"],
            "defaultOutputModes": ["application/json"],
            "securitySchemes": {"oauth": {"type": "oauth2", "flows": {"clientCredentials": {"tokenUrl": "http://10.0.0.5:9101/token", "scopes": {}}}}},
            "security": [{"oauth": []}],
            "provider": {"organization": "Acme", "url": "https://acme.example"},
            "documentationUrl": "http://10.0.0.5:9101/docs",
            "skills": [{
                "id": "summarize-invoice",
                "name": "Summarize invoice",
                "description": "Summarizes an invoice",
                "tags": ["invoice", "summarization"],
                "examples": ["summarize invoice 42"],
                "inputModes": ["text/plain"],
                "x-skill-ext": {"a": [1, 2]}
            }],
            "signatures": [{"protected": "abc", "signature": "def"}]
        })
    }

    fn v10() -> Value {
        json!({
            "name": "Router",
            "description": null,
            "version": "1.0.0",
            "supportedInterfaces": [
                {"url": "https://agent.internal:8443/a2a", "protocolBinding": "JSONRPC", "protocolVersion": "1.0"},
                {"url": "https://agent.internal:8443/grpc", "protocolBinding": "GRPC", "protocolVersion": "1.0", "tenant": "t"}
            ],
            "skills": []
        })
    }

    #[test]
    fn round_trip_both_dialects() {
        for v in [v03(), v10()] {
            let card = AgentCard::parse(&serde_json::to_vec(&v).expect("json")).expect("valid");
            assert_eq!(card.to_json(), v);
            let again = AgentCard::parse(&card.to_bytes()).expect("valid");
            assert_eq!(again, card);
        }
    }

    #[test]
    fn dialects() {
        let a = AgentCard::from_value(v03()).expect("valid");
        let b = AgentCard::from_value(v10()).expect("valid");
        assert_eq!(a.dialect(), Dialect::V03);
        assert_eq!(b.dialect(), Dialect::V10);
        assert_eq!(a.protocols(), vec!["JSONRPC", "GRPC"]);
        assert_eq!(b.protocols(), vec!["JSONRPC", "GRPC"]);
        let mut c = v03();
        c["protocolVersion"] = json!("1.0");
        assert_eq!(
            AgentCard::from_value(c).expect("valid").dialect(),
            Dialect::V10
        );
    }

    #[test]
    fn versions_and_endpoint_paths_as_the_card_states_them() {
        let a = AgentCard::from_value(v03()).expect("valid");
        let b = AgentCard::from_value(v10()).expect("valid");
        let pairs = |c: &AgentCard| -> Vec<(String, Dialect)> { c.a2a_interfaces() };
        assert_eq!(
            pairs(&a),
            [
                ("JSONRPC".to_string(), Dialect::V03),
                ("GRPC".to_string(), Dialect::V03)
            ]
        );
        assert_eq!(
            pairs(&b),
            [
                ("JSONRPC".to_string(), Dialect::V10),
                ("GRPC".to_string(), Dialect::V10)
            ]
        );
        assert_eq!(a.endpoint_path("JSONRPC", None).as_deref(), Some("/a2a/v1"));
        assert_eq!(b.endpoint_path("jsonrpc", None).as_deref(), Some("/a2a"));
        assert_eq!(a.endpoint_path("HTTP+JSON", None), None);
        // an agent that speaks both (a2a-sdk 1.x with its 0.3 compatibility):
        // the endpoint of the request's version first
        let both = AgentCard::from_value(json!({
            "name": "Both", "description": "d", "version": "1",
            "supportedInterfaces": [
                {"url": "http://h:1/rpc", "protocolBinding": "JSONRPC", "protocolVersion": "1.0"},
                {"url": "http://h:1/legacy/rpc", "protocolBinding": "JSONRPC", "protocolVersion": "0.3"},
                {"url": "http://h:1/rest/", "protocolBinding": "HTTP+JSON"}
            ],
            "skills": []
        }))
        .expect("valid");
        assert_eq!(
            pairs(&both),
            [
                ("JSONRPC".to_string(), Dialect::V10),
                ("JSONRPC".to_string(), Dialect::V03),
                ("HTTP+JSON".to_string(), Dialect::V10)
            ]
        );
        let path = |b: &str, d| both.endpoint_path(b, d);
        assert_eq!(path("JSONRPC", None).as_deref(), Some("/rpc"));
        assert_eq!(path("JSONRPC", Some(Dialect::V10)).as_deref(), Some("/rpc"));
        assert_eq!(
            path("JSONRPC", Some(Dialect::V03)).as_deref(),
            Some("/legacy/rpc")
        );
        assert_eq!(
            path("HTTP+JSON", Some(Dialect::V03)).as_deref(),
            Some("/rest/")
        );
        // a card that states no version (one built from config): unknown
        let bare = AgentCard::from_value(json!({
            "name": "n", "description": "d", "version": "0", "url": "http://h:1",
            "capabilities": {}, "defaultInputModes": [], "defaultOutputModes": [], "skills": []
        }))
        .expect("valid");
        assert!(bare.a2a_interfaces().is_empty());
        assert_eq!(bare.endpoint_path("JSONRPC", None).as_deref(), Some("/"));
    }

    #[test]
    fn all_problems_reported_at_once() {
        let v = json!({
            "url": "ftp://x",
            "skills": [
                {"id": "a", "name": "A", "tags": ["ok", 3]},
                {"id": "", "name": "B", "examples": "nope"},
                7
            ],
            "supportedInterfaces": [{"protocolBinding": "GRPC"}],
            "defaultInputModes": {}
        });
        let err = AgentCard::from_value(v).expect_err("invalid");
        let fields: Vec<&str> = err.problems().iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "name",
                "url",
                "supportedInterfaces[0].url",
                "defaultInputModes",
                "skills[0].tags[1]",
                "skills[1].id",
                "skills[1].examples",
                "skills[2]",
            ]
        );
        let msg = err.to_string();
        assert!(
            msg.starts_with(
                "invalid agent card: `name`: missing; `url`: must be an absolute http or https URL"
            ),
            "{msg}"
        );
        assert!(
            msg.contains("`skills[1].id`: must be a non-empty string"),
            "{msg}"
        );
    }

    #[test]
    fn needs_an_endpoint() {
        let err =
            AgentCard::from_value(json!({"name": "x", "skills": [], "supportedInterfaces": []}))
                .expect_err("no endpoint");
        assert_eq!(err.problems()[0].field, "url");
        assert!(matches!(
            AgentCard::parse(b"{not json"),
            Err(CardError::Syntax(_))
        ));
        assert!(matches!(
            AgentCard::parse(&vec![b' '; MAX_CARD_BYTES + 1]),
            Err(CardError::TooLarge { .. })
        ));
        let err = AgentCard::from_value(json!([])).expect_err("array");
        assert_eq!(
            err.to_string(),
            "invalid agent card: card: must be a JSON object"
        );
    }

    #[test]
    fn rewrite_keeps_paths_and_hides_the_agent() {
        let mut card = AgentCard::from_value(v03()).expect("valid");
        let before = card.digest();
        card.rewrite_urls("http://billing.acme.dmsc/");
        assert_ne!(card.digest(), before);
        assert_eq!(card.url.as_deref(), Some("http://billing.acme.dmsc/a2a/v1"));
        let ai = card.additional_interfaces.as_ref().expect("interfaces");
        assert_eq!(ai[1].url, "http://billing.acme.dmsc");
        let text = serde_json::to_string(&card.to_json()).expect("json");
        assert!(!text.contains("10.0.0.5"), "{text}");
        assert!(text.contains("http://billing.acme.dmsc/docs"));
        assert!(text.contains("http://billing.acme.dmsc/token"));
        // the provider's own site is not the agent
        assert!(text.contains("https://acme.example"));

        let mut card = AgentCard::from_value(v10()).expect("valid");
        card.rewrite_urls("http://router.acme.dmsc");
        let si = card.supported_interfaces.as_ref().expect("interfaces");
        assert_eq!(si[0].url, "http://router.acme.dmsc/a2a");
        assert_eq!(si[1].url, "http://router.acme.dmsc/grpc");
        // still a valid card, null kept
        let again = AgentCard::parse(&card.to_bytes()).expect("valid");
        assert_eq!(again.to_json()["description"], Value::Null);
    }

    #[test]
    fn a_card_is_fit_to_the_registered_url_before_the_rewrite() {
        // a2a-sdk's sample shape: JSON-RPC and REST on the HTTP port, gRPC on
        // another; the agent is registered under a path.
        let v = json!({
            "name": "e", "skills": [],
            "supportedInterfaces": [
                {"url": "http://127.0.0.1:8000/agents/e/", "protocolBinding": "JSONRPC", "protocolVersion": "1.0"},
                {"url": "http://127.0.0.1:8000/agents/e/rest", "protocolBinding": "HTTP+JSON", "protocolVersion": "1.0"},
                {"url": "127.0.0.1:50051", "protocolBinding": "GRPC", "protocolVersion": "1.0"}
            ]
        });
        let mut card = AgentCard::from_value(v).expect("valid");
        let left_out = card.fit_to("http://127.0.0.1:8000/agents/e");
        assert_eq!(left_out, vec!["GRPC at 127.0.0.1:50051".to_string()]);
        card.rewrite_urls("http://e.acme.dmsc");
        let urls: Vec<&str> = card.endpoint_urls().collect();
        assert_eq!(urls, ["http://e.acme.dmsc/", "http://e.acme.dmsc/rest"]);
        // Registered at the gRPC port: the HTTP interfaces are the ones left out.
        let mut card = AgentCard::from_value(json!({
            "name": "e", "skills": [],
            "supportedInterfaces": [
                {"url": "http://127.0.0.1:8000/", "protocolBinding": "JSONRPC", "protocolVersion": "1.0"},
                {"url": "127.0.0.1:50051", "protocolBinding": "GRPC", "protocolVersion": "1.0"}
            ]
        }))
        .expect("valid");
        assert_eq!(
            card.fit_to("http://127.0.0.1:50051"),
            vec!["JSONRPC at http://127.0.0.1:8000/".to_string()]
        );
        // Behind a proxy: the card names only public URLs; nothing is left out,
        // and a path that is not the registered one stays.
        let mut card = AgentCard::from_value(v03()).expect("valid");
        let before = card.clone();
        assert!(card.fit_to("http://192.168.1.9:7000/x").is_empty());
        assert_eq!(card.digest(), before.digest());
    }

    #[test]
    fn a_grpc_interface_may_be_a_bare_target_and_is_rewritten_as_one() {
        // a2a-sdk 1.x samples: AgentInterface(protocol_binding=GRPC, url="127.0.0.1:50051")
        let v = json!({
            "name": "g", "skills": [],
            "supportedInterfaces": [
                {"url": "http://127.0.0.1:8000/", "protocolBinding": "JSONRPC", "protocolVersion": "1.0"},
                {"url": "127.0.0.1:50051", "protocolBinding": "GRPC", "protocolVersion": "1.0"}
            ]
        });
        let mut card = AgentCard::from_value(v).expect("a bare gRPC target is valid");
        card.rewrite_urls("http://g.acme.dmsc");
        let si = card.supported_interfaces.as_ref().expect("interfaces");
        assert_eq!(si[0].url, "http://g.acme.dmsc/");
        assert_eq!(si[1].url, "g.acme.dmsc:80");
        let text = serde_json::to_string(&card.to_json()).expect("json");
        assert!(!text.contains("127.0.0.1"), "{text}");
        // 0.3: a top-level gRPC url
        let mut card = AgentCard::from_value(json!({
            "name": "g", "skills": [], "url": "[::1]:50051", "preferredTransport": "GRPC"
        }))
        .expect("valid");
        card.rewrite_urls("http://g.acme.dmsc:8080/");
        assert_eq!(card.url.as_deref(), Some("g.acme.dmsc:8080"));
        // Only for gRPC: a JSON-RPC endpoint still needs an http(s) URL.
        let err = AgentCard::from_value(json!({
            "name": "g", "skills": [],
            "supportedInterfaces": [{"url": "127.0.0.1:8000", "protocolBinding": "JSONRPC"}]
        }))
        .expect_err("not a URL");
        assert!(
            err.to_string().contains("supportedInterfaces[0].url"),
            "{err}"
        );
        let err = AgentCard::from_value(json!({
            "name": "g", "skills": [],
            "supportedInterfaces": [{"url": "no port", "protocolBinding": "GRPC"}]
        }))
        .expect_err("not a target");
        assert!(err.to_string().contains("host:port"), "{err}");
        assert_eq!(grpc_target("h:1"), Some(("h".into(), 1)));
        assert_eq!(grpc_target("H:1"), Some(("h".into(), 1)));
        assert_eq!(grpc_target("::1:5"), None);
        assert_eq!(grpc_target("h:x"), None);
        assert_eq!(grpc_target("h/p:1"), None);
    }

    #[test]
    fn digest_is_canonical() {
        let a = AgentCard::from_value(v03()).expect("valid");
        // same content, different key order and whitespace
        let text = serde_json::to_string_pretty(&v03()).expect("json");
        let b = AgentCard::parse(text.as_bytes()).expect("valid");
        assert_eq!(a.digest(), b.digest());
        assert_eq!(a.digest().len(), 64);
        assert!(a.digest().bytes().all(|c| HEX.contains(&c)));
    }

    #[test]
    fn slugs() {
        assert_eq!(slug("Billing Agent"), "billing-agent");
        assert_eq!(slug("  --Héllo__World!! "), "h-llo-world");
        assert_eq!(slug(""), "agent");
        assert_eq!(slug("!!!"), "agent");
        assert_eq!(slug("a--b"), "a-b");
        let long = "x".repeat(62) + " yz";
        assert_eq!(slug(&long), "x".repeat(62));
        assert_eq!(slug(&"a".repeat(100)).len(), 63);
        assert!(is_slug("billing-agent"));
        assert!(!is_slug("Billing"));
        assert!(!is_slug("a/b"));
    }

    #[test]
    fn origins() {
        let o = |s| Origin::of(s).map(|(o, r)| (o.host, o.port, r.to_string()));
        assert_eq!(
            o("HTTP://Host:80/x?y"),
            Some(("host".into(), 80, "/x?y".into()))
        );
        assert_eq!(o("https://u:p@h"), Some(("h".into(), 443, "".into())));
        assert_eq!(o("http://[::1]:9/"), Some(("[::1]".into(), 9, "/".into())));
        assert_eq!(o("http://"), None);
        assert_eq!(o("http://h:x/"), None);
        assert_eq!(o("mailto:x@y"), None);
        assert_eq!(o("/relative"), None);
    }
}
