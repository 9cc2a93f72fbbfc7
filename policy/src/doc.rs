//! A tenant's policy document: what it is written as, and the checked form
//! the request path evaluates.
//!
//! The document is TOML (or JSON, when it starts with `{`): exports, imports,
//! rate limits, data-tag rules and masking rules of one tenant. Parsing
//! reports every problem at once, each with the path of the entry it is
//! about, and nothing of a document with a problem is ever used. The checked
//! [`Policy`] indexes exports by consumer tenant, so a decision costs a
//! couple of hash lookups however many rules there are. See
//! `docs/tenancy.md` for a full example.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::PolicyError;

/// Largest policy document accepted (the signed bytes, before encoding).
pub const MAX_POLICY_BYTES: usize = 256 * 1024;

/// Data tags every tenant knows; a policy may add its own (`data_tags`).
pub const BUILTIN_DATA_TAGS: &[&str] = &[
    "public",
    "internal",
    "confidential",
    "restricted",
    "pii",
    "phi",
    "pci",
    "financial",
    "secret",
];

/// Most rules of each kind in one document (exports, imports, masks, agents,
/// per-caller and per-target limits): bounds the work a document can ask for.
pub const MAX_RULES: usize = 10_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    tenant: String,
    version: u64,
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
    /// Tenant-specific data tag names, beyond [`BUILTIN_DATA_TAGS`].
    #[serde(default)]
    data_tags: Vec<String>,
    #[serde(default)]
    export: Vec<RawExport>,
    #[serde(default)]
    import: Vec<RawImport>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    agents: BTreeMap<String, RawAgent>,
    #[serde(default)]
    region: Option<RawGate>,
    #[serde(default)]
    mask: Vec<RawMask>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExport {
    to: Vec<String>,
    #[serde(default)]
    agents: Vec<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    data_tags: Vec<String>,
    #[serde(default)]
    untagged: Untagged,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImport {
    from: Vec<String>,
    #[serde(default)]
    agents: Vec<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    data_tags: Vec<String>,
    #[serde(default)]
    untagged: Untagged,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    tenant: Option<RawLimit>,
    caller: Option<RawLimit>,
    #[serde(default)]
    callers: BTreeMap<String, RawLimit>,
    target: Option<RawLimit>,
    #[serde(default)]
    targets: BTreeMap<String, RawLimit>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimit {
    rps: Option<f64>,
    burst: Option<u32>,
    concurrent: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    accepts: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGate {
    data_tags: Vec<String>,
    #[serde(default)]
    untagged: Untagged,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMask {
    name: String,
    #[serde(default)]
    detectors: Vec<String>,
    #[serde(default)]
    patterns: Vec<String>,
    #[serde(default)]
    on: Boundary,
    #[serde(default)]
    responses: bool,
    #[serde(default)]
    unparseable: Unparseable,
}

/// What happens to a request that carries no data tag at a gate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Untagged {
    #[default]
    Allow,
    Deny,
}

/// Where a masking rule applies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Boundary {
    /// Requests that leave the tenant (to another tenant's agent).
    #[default]
    CrossTenant,
    /// Requests that leave the caller's region (the home node is elsewhere).
    CrossRegion,
    /// Every request of the tenant.
    Always,
}

/// What a masking rule does with a body it cannot parse (compressed, binary,
/// over the buffer limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unparseable {
    /// Refused (415, or 413 over the buffer limit) and audited: fail closed.
    #[default]
    Refuse,
    /// Passed unmasked (audited).
    Pass,
}

/// Requests per second and burst, and at most `concurrent` at once.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Limit {
    /// `(per second, burst)`.
    pub rate: Option<(f64, u32)>,
    pub concurrent: Option<u32>,
}

/// A tenant's rate limits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    /// The whole tenant, mesh-wide.
    pub tenant: Option<Limit>,
    /// Each calling agent, unless `callers` names it.
    pub caller: Option<Limit>,
    pub callers: BTreeMap<String, Limit>,
    /// Each target agent, unless `targets` names it.
    pub target: Option<Limit>,
    pub targets: BTreeMap<String, Limit>,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        self.tenant.is_none()
            && self.caller.is_none()
            && self.callers.is_empty()
            && self.target.is_none()
            && self.targets.is_empty()
    }
}

/// A masking rule as the document states it (compiled per situation: [`Policy::masking`]).
#[derive(Debug, Clone, PartialEq)]
pub struct MaskRule {
    pub name: String,
    pub detectors: Vec<String>,
    pub patterns: Vec<String>,
    pub on: Boundary,
    pub responses: bool,
    pub unparseable: Unparseable,
}

/// A set of names, or every name (`"*"`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Names {
    Any,
    Set(HashSet<String>),
}

impl Names {
    pub(crate) fn contains(&self, name: &str) -> bool {
        match self {
            Names::Any => true,
            Names::Set(s) => s.contains(name),
        }
    }

    pub(crate) fn intersects(&self, names: &[String]) -> bool {
        match self {
            Names::Any => !names.is_empty(),
            Names::Set(s) => names.iter().any(|n| s.contains(n)),
        }
    }

    fn is_empty(&self) -> bool {
        matches!(self, Names::Set(s) if s.is_empty())
    }
}

/// Which data tags may pass a boundary.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Gate {
    pub(crate) allowed: BTreeSet<String>,
    pub(crate) untagged: Untagged,
}

/// One export (the listed tenants may call these agents of ours) or import
/// (our callers may call these agents of the listed tenants): agents by name,
/// or agents with a skill tagged one of `tags`, and the data tags that may
/// pass with the call.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Allow {
    /// Its position in the document, for the rule a refusal names.
    pub(crate) index: usize,
    pub(crate) agents: Names,
    pub(crate) tags: Names,
    pub(crate) data: Gate,
}

/// Which list an [`Allow`] entry is in.
#[derive(Debug, Clone, Copy)]
enum Side {
    Export,
    Import,
}

/// An allowlist indexed by the other tenant, and its entries for any tenant.
type Indexed = (HashMap<String, Vec<Allow>>, Vec<Allow>);

/// Checks and indexes the `[[export]]` or `[[import]]` entries:
/// `(tenants, agents, tags, data_tags, untagged)` each.
fn allowlist<'a>(
    side: Side,
    own: &str,
    entries: impl Iterator<
        Item = (
            &'a Vec<String>,
            &'a Vec<String>,
            &'a Vec<String>,
            &'a Vec<String>,
            Untagged,
        ),
    >,
    known: &BTreeSet<String>,
    p: &mut Vec<String>,
) -> Indexed {
    let (list, field, verb) = match side {
        Side::Export => ("export", "to", "exports"),
        Side::Import => ("import", "from", "imports"),
    };
    let (mut by_tenant, mut any): Indexed = Default::default();
    for (i, (tenants, agents, tags, data_tags, untagged)) in entries.enumerate() {
        let path = format!("{list}[{i}]");
        let tenants = names(&format!("{path}.{field}"), tenants, p);
        if tenants.is_empty() {
            p.push(format!(
                "{path}.{field}: names no tenant (`*` for every tenant)"
            ));
        }
        if tenants.contains(own) && tenants != Names::Any {
            p.push(format!(
                "{path}.{field}: `{own}` is this policy's own tenant (a tenant's agents always reach each other)"
            ));
        }
        let agents = names(&format!("{path}.agents"), agents, p);
        let tags = names(&format!("{path}.tags"), tags, p);
        if agents.is_empty() && tags.is_empty() {
            p.push(format!("{path}: {verb} nothing (give `agents` or `tags`)"));
        }
        let entry = Allow {
            index: i,
            agents,
            tags,
            data: gate(&path, data_tags, untagged, known, p),
        };
        match tenants {
            Names::Any => any.push(entry),
            Names::Set(set) => {
                for t in set {
                    by_tenant.entry(t).or_default().push(entry.clone());
                }
            }
        }
    }
    (by_tenant, any)
}

/// The masking one situation needs: the rules that apply, compiled, and
/// whether a body they cannot parse is refused.
#[derive(Debug, Clone)]
pub struct Masking {
    pub masker: dmsc_mask::Masker,
    /// Some applicable rule says `unparseable = "refuse"`.
    pub refuse_unparseable: bool,
}

/// Where a body is going, as masking rules see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Situation {
    /// It crosses a tenant boundary.
    pub cross_tenant: bool,
    /// It crosses a region boundary.
    pub cross_region: bool,
    /// It is a response (rules with `responses = true` only).
    pub response: bool,
}

impl Situation {
    fn index(self) -> usize {
        usize::from(self.cross_tenant)
            | usize::from(self.cross_region) << 1
            | usize::from(self.response) << 2
    }

    fn admits(self, r: &MaskRule) -> bool {
        (!self.response || r.responses)
            && match r.on {
                Boundary::Always => true,
                Boundary::CrossTenant => self.cross_tenant,
                Boundary::CrossRegion => self.cross_region,
            }
    }
}

/// A checked policy document of one tenant.
#[derive(Debug, Clone)]
pub struct Policy {
    pub tenant: String,
    pub version: u64,
    /// SHA-256 of the document's exact bytes, hex.
    pub digest: String,
    pub limits: Limits,
    pub masks: Vec<MaskRule>,
    pub(crate) known_tags: BTreeSet<String>,
    /// Exports by consumer tenant, and those to any tenant.
    pub(crate) exports_to: HashMap<String, Vec<Allow>>,
    pub(crate) exports_any: Vec<Allow>,
    pub(crate) imports_from: HashMap<String, Vec<Allow>>,
    pub(crate) imports_any: Vec<Allow>,
    /// Data tags each named agent may receive (absent: any).
    pub(crate) accepts: HashMap<String, BTreeSet<String>>,
    pub(crate) region: Option<Gate>,
    /// Compiled masking per [`Situation`] (eight of them; `None`: no rule applies).
    pub(crate) maskings: Vec<Option<Masking>>,
    /// Number of rules, for `status` and benchmarks.
    pub rules: usize,
}

/// SHA-256 of a document's bytes, hex: what gossip carries.
pub fn digest(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// True for names usable in host names and SPIFFE paths (`a-z0-9-`).
fn valid_name(name: &str) -> bool {
    dmsc_transport::identity::valid_name(name)
}

/// Checks a tag list against the known tags; names the unknown ones.
fn check_tags(
    path: &str,
    tags: &[String],
    known: &BTreeSet<String>,
    problems: &mut Vec<String>,
) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for t in tags {
        if known.contains(t) {
            out.insert(t.clone());
        } else {
            problems.push(format!(
                "{path}: unknown data tag `{t}` (known: {}; a policy adds its own under `data_tags`)",
                known.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    out
}

fn names(path: &str, list: &[String], problems: &mut Vec<String>) -> Names {
    if list.iter().any(|n| n == "*") {
        if list.len() > 1 {
            problems.push(format!(
                "{path}: `*` stands alone (it already means every name)"
            ));
        }
        return Names::Any;
    }
    let mut set = HashSet::new();
    for n in list {
        if !valid_name(n) {
            problems.push(format!(
                "{path}: `{n}` is not a valid name (1-63 of a-z, 0-9 and -, or `*`)"
            ));
        } else if !set.insert(n.clone()) {
            problems.push(format!("{path}: `{n}` is listed twice"));
        }
    }
    Names::Set(set)
}

fn limit(path: &str, raw: &RawLimit, problems: &mut Vec<String>) -> Limit {
    let mut out = Limit::default();
    match (raw.rps, raw.burst) {
        (Some(rps), burst) => {
            if !(rps.is_finite() && rps > 0.0 && rps <= 1e7) {
                problems.push(format!(
                    "{path}.rps: {rps} must be a positive number of requests per second (at most 10000000)"
                ));
            }
            let burst = burst.unwrap_or_else(|| rps.ceil().max(1.0) as u32);
            if burst == 0 {
                problems.push(format!("{path}.burst: must be at least 1"));
            }
            out.rate = Some((rps, burst));
        }
        (None, Some(_)) => problems.push(format!("{path}.burst: needs `rps`")),
        (None, None) => {}
    }
    if let Some(c) = raw.concurrent {
        if c == 0 {
            problems.push(format!("{path}.concurrent: must be at least 1"));
        }
        out.concurrent = Some(c);
    }
    if out.rate.is_none() && out.concurrent.is_none() {
        problems.push(format!("{path}: sets neither `rps` nor `concurrent`"));
    }
    out
}

fn gate(
    path: &str,
    tags: &[String],
    untagged: Untagged,
    known: &BTreeSet<String>,
    problems: &mut Vec<String>,
) -> Gate {
    Gate {
        allowed: check_tags(&format!("{path}.data_tags"), tags, known, problems),
        untagged,
    }
}

fn too_many(path: &str, n: usize, problems: &mut Vec<String>) {
    if n > MAX_RULES {
        problems.push(format!("{path}: {n} entries, more than {MAX_RULES}"));
    }
}

impl Policy {
    /// Parses and checks a document. Every problem is reported at once;
    /// `Err` means nothing of it may be used.
    pub fn parse(bytes: &[u8]) -> Result<Policy, PolicyError> {
        if bytes.len() > MAX_POLICY_BYTES {
            return Err(PolicyError::Invalid(vec![format!(
                "the document is {} bytes, more than {MAX_POLICY_BYTES}",
                bytes.len()
            )]));
        }
        let text = std::str::from_utf8(bytes)
            .map_err(|e| PolicyError::Invalid(vec![format!("the document is not UTF-8: {e}")]))?;
        let raw: RawPolicy = if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| {
                PolicyError::Invalid(vec![format!("not a policy document (JSON): {e}")])
            })?
        } else {
            toml::from_str(text).map_err(|e| {
                PolicyError::Invalid(vec![format!("not a policy document (TOML): {e}")])
            })?
        };
        Policy::check(raw, digest(bytes))
    }

    fn check(raw: RawPolicy, digest: String) -> Result<Policy, PolicyError> {
        let mut p = Vec::new();
        if !valid_name(&raw.tenant) {
            p.push(format!(
                "tenant: `{}` is not a valid tenant name (1-63 of a-z, 0-9 and -)",
                raw.tenant
            ));
        }
        if raw.version == 0 {
            p.push("version: must be at least 1 (each update raises it)".into());
        }
        for (what, n) in [
            ("export", raw.export.len()),
            ("import", raw.import.len()),
            ("mask", raw.mask.len()),
            ("agents", raw.agents.len()),
            ("data_tags", raw.data_tags.len()),
            ("limits.callers", raw.limits.callers.len()),
            ("limits.targets", raw.limits.targets.len()),
        ] {
            too_many(what, n, &mut p);
        }
        let mut known: BTreeSet<String> = BUILTIN_DATA_TAGS.iter().map(|t| t.to_string()).collect();
        for (i, t) in raw.data_tags.iter().enumerate() {
            if !valid_name(t) {
                p.push(format!(
                    "data_tags[{i}]: `{t}` is not a valid tag name (1-63 of a-z, 0-9 and -)"
                ));
            } else if !known.insert(t.clone()) {
                p.push(format!("data_tags[{i}]: `{t}` is already a known tag"));
            }
        }
        let (exports_to, exports_any) = allowlist(
            Side::Export,
            &raw.tenant,
            raw.export
                .iter()
                .map(|e| (&e.to, &e.agents, &e.tags, &e.data_tags, e.untagged)),
            &known,
            &mut p,
        );
        let (imports_from, imports_any) = allowlist(
            Side::Import,
            &raw.tenant,
            raw.import
                .iter()
                .map(|e| (&e.from, &e.agents, &e.tags, &e.data_tags, e.untagged)),
            &known,
            &mut p,
        );
        let mut accepts = HashMap::new();
        for (name, a) in &raw.agents {
            let path = format!("agents.{name}");
            if !valid_name(name) {
                p.push(format!("{path}: `{name}` is not a valid agent name"));
            }
            let tags = check_tags(&format!("{path}.accepts"), &a.accepts, &known, &mut p);
            accepts.insert(name.clone(), tags);
        }
        let region = raw
            .region
            .as_ref()
            .map(|g| gate("region", &g.data_tags, g.untagged, &known, &mut p));
        let l = &raw.limits;
        let limits = Limits {
            tenant: l.tenant.as_ref().map(|r| limit("limits.tenant", r, &mut p)),
            caller: l.caller.as_ref().map(|r| limit("limits.caller", r, &mut p)),
            callers: l
                .callers
                .iter()
                .map(|(k, r)| {
                    (
                        k.clone(),
                        limit(&format!("limits.callers.\"{k}\""), r, &mut p),
                    )
                })
                .collect(),
            target: l.target.as_ref().map(|r| limit("limits.target", r, &mut p)),
            targets: l
                .targets
                .iter()
                .map(|(k, r)| {
                    if !valid_name(k) {
                        p.push(format!(
                            "limits.targets.{k}: `{k}` is not a valid agent name"
                        ));
                    }
                    (k.clone(), limit(&format!("limits.targets.{k}"), r, &mut p))
                })
                .collect(),
        };
        let mut masks = Vec::new();
        let mut mask_names = HashSet::new();
        for (i, m) in raw.mask.iter().enumerate() {
            let path = format!("mask[{i}]");
            if !valid_name(&m.name) {
                p.push(format!(
                    "{path}.name: `{}` is not a valid rule name (1-63 of a-z, 0-9 and -)",
                    m.name
                ));
            } else if !mask_names.insert(m.name.clone()) {
                p.push(format!("{path}.name: `{}` is used twice", m.name));
            }
            if m.detectors.is_empty() && m.patterns.is_empty() {
                p.push(format!(
                    "{path}: masks nothing (give `detectors` or `patterns`)"
                ));
            }
            masks.push(MaskRule {
                name: m.name.clone(),
                detectors: m.detectors.clone(),
                patterns: m.patterns.clone(),
                on: m.on,
                responses: m.responses,
                unparseable: m.unparseable,
            });
        }
        let spec = |r: &MaskRule| dmsc_mask::RuleSpec {
            name: r.name.clone(),
            detectors: r.detectors.clone(),
            patterns: r.patterns.clone(),
        };
        if !masks.is_empty() {
            let all: Vec<_> = masks.iter().map(spec).collect();
            if let Err(errs) = dmsc_mask::Masker::new(&all) {
                p.extend(errs.into_iter().map(|e| format!("mask: {e}")));
            }
        }
        if !p.is_empty() {
            return Err(PolicyError::Invalid(p));
        }
        let mut maskings = vec![None; 8];
        for (i, slot) in maskings.iter_mut().enumerate() {
            let s = Situation {
                cross_tenant: i & 1 != 0,
                cross_region: i & 2 != 0,
                response: i & 4 != 0,
            };
            debug_assert_eq!(s.index(), i);
            let rules: Vec<&MaskRule> = masks.iter().filter(|r| s.admits(r)).collect();
            if rules.is_empty() {
                continue;
            }
            let specs: Vec<_> = rules.iter().map(|r| spec(r)).collect();
            // A subset of rules that compiled together compiles alone.
            if let Ok(masker) = dmsc_mask::Masker::new(&specs) {
                *slot = Some(Masking {
                    masker,
                    refuse_unparseable: rules.iter().any(|r| r.unparseable == Unparseable::Refuse),
                });
            }
        }
        let rules = raw.export.len()
            + raw.import.len()
            + raw.mask.len()
            + raw.agents.len()
            + usize::from(raw.region.is_some())
            + l.callers.len()
            + l.targets.len()
            + [&l.tenant, &l.caller, &l.target]
                .iter()
                .filter(|x| x.is_some())
                .count();
        Ok(Policy {
            tenant: raw.tenant,
            version: raw.version,
            digest,
            limits,
            masks,
            known_tags: known,
            exports_to,
            exports_any,
            imports_from,
            imports_any,
            accepts,
            region,
            maskings,
            rules,
        })
    }

    /// The masking a body needs in situation `s`, if any rule applies.
    pub fn masking(&self, s: Situation) -> Option<&Masking> {
        self.maskings.get(s.index()).and_then(Option::as_ref)
    }

    /// True if some masking rule could apply to a request of this tenant
    /// that crosses a tenant boundary or not (`cross_tenant`), in any region.
    pub fn may_mask_request(&self, cross_tenant: bool) -> bool {
        [false, true].into_iter().any(|cross_region| {
            self.masking(Situation {
                cross_tenant,
                cross_region,
                response: false,
            })
            .is_some()
        })
    }

    /// Every data tag this tenant knows, sorted.
    pub fn known_tags(&self) -> impl Iterator<Item = &str> {
        self.known_tags.iter().map(String::as_str)
    }

    /// True when the tenant has data-tag rules (the request path then reads
    /// tags from A2A bodies too, not only the header).
    pub fn has_tag_rules(&self) -> bool {
        !self.accepts.is_empty()
            || self.region.is_some()
            || self
                .exports_to
                .values()
                .flatten()
                .chain(&self.exports_any)
                .any(|e| !e.data.allowed.is_empty() || e.data.untagged == Untagged::Deny)
            || self
                .imports_from
                .values()
                .flatten()
                .chain(&self.imports_any)
                .any(|e| !e.data.allowed.is_empty() || e.data.untagged == Untagged::Deny)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const FULL: &str = r#"
tenant = "acme"
version = 3
description = "acme's policy"
data_tags = ["trade-secret"]

[[export]]
to = ["globex"]
agents = ["billing"]
tags = ["invoice"]
data_tags = ["pii"]
untagged = "allow"

[[import]]
from = ["globex"]
agents = ["*"]
data_tags = ["confidential"]

[limits.tenant]
rps = 100
burst = 50
concurrent = 20

[limits.caller]
rps = 10

[limits.callers."spiffe://td/tenant/acme/agent/batch"]
rps = 50
burst = 100

[limits.targets.billing]
concurrent = 4

[agents.billing]
accepts = ["pii", "financial"]

[region]
data_tags = ["internal"]

[[mask]]
name = "pii"
detectors = ["email", "phone"]
patterns = ["ACME-[0-9]{6}"]
on = "cross-tenant"
responses = true
"#;

    #[test]
    fn a_full_document_parses() {
        let p = Policy::parse(FULL.as_bytes()).expect("valid");
        assert_eq!((p.tenant.as_str(), p.version), ("acme", 3));
        assert_eq!(p.digest, digest(FULL.as_bytes()));
        assert_eq!(p.limits.tenant.and_then(|l| l.rate), Some((100.0, 50)));
        assert_eq!(p.limits.caller.and_then(|l| l.rate), Some((10.0, 10)));
        assert_eq!(
            p.limits.targets.get("billing").and_then(|l| l.concurrent),
            Some(4)
        );
        assert!(p.known_tags().any(|t| t == "trade-secret"));
        assert!(p.has_tag_rules());
        assert_eq!(p.masks.len(), 1);
        assert_eq!(p.rules, 9);
    }

    #[test]
    fn json_documents_parse_too() {
        let p = Policy::parse(
            br#"{"tenant":"beta","version":1,"export":[{"to":["*"],"tags":["search"]}]}"#,
        )
        .expect("valid");
        assert_eq!(p.tenant, "beta");
        assert!(!p.has_tag_rules());
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let doc = r#"
tenant = "Acme!"
version = 0
[[export]]
to = ["globex", "globex"]
data_tags = ["pii", "nuclear"]
[[import]]
from = []
agents = ["ok"]
[limits.tenant]
rps = -1
[limits.caller]
burst = 3
[[mask]]
name = "x"
"#;
        let Err(PolicyError::Invalid(problems)) = Policy::parse(doc.as_bytes()) else {
            panic!("must be refused");
        };
        let all = problems.join("\n");
        for needle in [
            "tenant: `Acme!`",
            "version: must be at least 1",
            "export[0].to: `globex` is listed twice",
            "export[0]: exports nothing",
            "export[0].data_tags: unknown data tag `nuclear` (known: ",
            "import[0].from: names no tenant",
            "limits.tenant.rps: -1",
            "limits.caller.burst: needs `rps`",
            "mask[0]: masks nothing",
        ] {
            assert!(all.contains(needle), "`{needle}` missing from:\n{all}");
        }
        assert!(
            all.contains("pci, phi, pii, public"),
            "unknown tags list the known ones: {all}"
        );
    }

    #[test]
    fn unknown_fields_and_oversized_documents_are_refused() {
        let e = Policy::parse(b"tenant = \"a\"\nversion = 1\nexprot = []\n").expect_err("typo");
        assert!(e.to_string().contains("exprot"), "{e}");
        let big = vec![b'#'; MAX_POLICY_BYTES + 1];
        let e = Policy::parse(&big).expect_err("too big");
        assert!(e.to_string().contains("more than 262144"), "{e}");
    }
}
