//! Decisions on the request path: may a caller of one tenant reach a target
//! of another, may a request with these data tags reach this agent or leave
//! this region.
//!
//! Pure and allocation-free on the allowed path: facts in, `Ok(())` or a
//! [`Refusal`] naming the rule that refused out. The same functions run on
//! the calling node (before anything leaves it) and on the home node (which
//! trusts no calling node's judgement), so both refuse with the same rule.
//! A cross-tenant call needs both sides: the provider's export *and* the
//! consumer's import; a tenant without a policy exports and imports nothing.

use crate::doc::{Allow, Gate, Names, Policy, Untagged};

/// What a caller addressed in the provider's tenant.
#[derive(Debug, Clone, Copy)]
pub enum Addressed<'a> {
    /// One agent (`<agent>.<tenant>.dmsc`, or the agent selection picked),
    /// with the tags of its skills.
    Agent { name: &'a str, tags: &'a [String] },
    /// `<tag>.cap.<tenant>.dmsc`: any agent with a skill tagged so.
    Tag(&'a str),
    /// `mesh.<tenant>.dmsc`: whichever agent intent routing picks; the agent
    /// it picks is checked again as [`Addressed::Agent`].
    Intent,
}

impl std::fmt::Display for Addressed<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addressed::Agent { name, .. } => write!(f, "agent `{name}`"),
            Addressed::Tag(t) => write!(f, "capability `{t}`"),
            Addressed::Intent => f.write_str("routing by intent"),
        }
    }
}

/// A call from one tenant into another.
#[derive(Debug, Clone, Copy)]
pub struct Crossing<'a> {
    /// The consumer tenant (the caller's).
    pub from: &'a str,
    /// The provider tenant (the target's).
    pub to: &'a str,
    pub target: Addressed<'a>,
    /// The request's data tags, sorted and deduplicated.
    pub data_tags: &'a [String],
}

/// Why a request is refused: the rule (`<tenant>:<entry>`) and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason} (rule `{rule}`)")]
pub struct Refusal {
    /// The tenant whose policy refused, and the entry: `acme:export`,
    /// `globex:import[1].data_tags`, `acme:agents.billing.accepts`, ...
    pub rule: String,
    pub reason: String,
    /// A data-tag rule refused (403 `policy_violation`), not a missing allowlist entry.
    pub tags: bool,
}

fn matches(agents: &Names, tags: &Names, target: Addressed<'_>) -> bool {
    match target {
        Addressed::Agent { name, tags: t } => agents.contains(name) || tags.intersects(t),
        Addressed::Tag(t) => tags.contains(t),
        Addressed::Intent => true,
    }
}

/// Checks `data_tags` at a gate: `Err(tag)` names the first that may not
/// pass (`None`: an untagged request the gate refuses).
fn admits(gate: &Gate, data_tags: &[String]) -> Result<(), Option<String>> {
    if data_tags.is_empty() {
        return match gate.untagged {
            Untagged::Allow => Ok(()),
            Untagged::Deny => Err(None),
        };
    }
    match data_tags.iter().find(|t| !gate.allowed.contains(*t)) {
        None => Ok(()),
        Some(t) => Err(Some(t.clone())),
    }
}

fn tag_refusal(rule: String, who: &str, tag: Option<String>, boundary: &str) -> Refusal {
    let reason = match tag {
        Some(t) => format!("data tagged `{t}` may not cross {boundary} ({who})"),
        None => format!("untagged data may not cross {boundary} ({who}: `untagged = \"deny\"`)"),
    };
    Refusal {
        rule,
        reason,
        tags: true,
    }
}

/// One side of a cross-tenant call: an allowlist of one tenant (its exports
/// or its imports), indexed by the other tenant.
struct Side<'p> {
    by_tenant: &'p std::collections::HashMap<String, Vec<Allow>>,
    any: &'p [Allow],
    /// `export` or `import`, for rules and reasons.
    list: &'static str,
    /// The tenant whose list it is.
    owner: &'p str,
    /// How data crosses at this side: `into` (export) or `out of` (import).
    direction: &'static str,
}

impl Side<'_> {
    /// Passes if an entry for `other` covers `target` and its gate admits
    /// the data tags; else the first entry's tag refusal, or `missing`.
    fn pass(
        &self,
        other: &str,
        target: Addressed<'_>,
        data_tags: &[String],
        missing: impl FnOnce() -> Refusal,
    ) -> Result<(), Refusal> {
        let named = self
            .by_tenant
            .get(other)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let mut first_tag_refusal = None;
        for e in named
            .iter()
            .chain(self.any)
            .filter(|e| matches(&e.agents, &e.tags, target))
        {
            match admits(&e.data, data_tags) {
                Ok(()) => return Ok(()),
                Err(tag) => {
                    first_tag_refusal.get_or_insert_with(|| {
                        tag_refusal(
                            format!("{}:{}[{}].data_tags", self.owner, self.list, e.index),
                            &format!("{} of tenant `{}`", self.list, self.owner),
                            tag,
                            &format!("{} tenant `{}`", self.direction, self.owner),
                        )
                    });
                }
            }
        }
        Err(first_tag_refusal.unwrap_or_else(missing))
    }
}

/// May a caller of tenant `c.from` reach `c.target` of tenant `c.to`?
/// `consumer` and `provider` are those tenants' policies, if they have one.
pub fn cross_tenant(
    consumer: Option<&Policy>,
    provider: Option<&Policy>,
    c: Crossing<'_>,
) -> Result<(), Refusal> {
    // The provider's side first: an export covering the target...
    let no_export = || Refusal {
        rule: format!("{}:export", c.to),
        reason: format!(
            "cross-tenant call refused: tenant `{}` does not export {} to tenant `{}`",
            c.to, c.target, c.from
        ),
        tags: false,
    };
    // A tenant without a policy (or one this node never heard of: the two
    // look alike, so a caller cannot probe which tenants exist) exports
    // nothing.
    let provider = provider.ok_or_else(|| {
        no_policy(
            no_export(),
            c.to,
            format!("exports nothing (to tenant `{}` neither)", c.from),
        )
    })?;
    Side {
        by_tenant: &provider.exports_to,
        any: &provider.exports_any,
        list: "export",
        owner: c.to,
        direction: "into",
    }
    .pass(c.from, c.target, c.data_tags, no_export)?;
    // ...then the consumer's: an import of it.
    let no_import = || Refusal {
        rule: format!("{}:import", c.from),
        reason: format!(
            "cross-tenant call refused: tenant `{}` does not import {} from tenant `{}`",
            c.from, c.target, c.to
        ),
        tags: false,
    };
    let consumer = consumer.ok_or_else(|| {
        no_policy(
            no_import(),
            c.from,
            format!("imports nothing (from tenant `{}` neither)", c.to),
        )
    })?;
    Side {
        by_tenant: &consumer.imports_from,
        any: &consumer.imports_any,
        list: "import",
        owner: c.from,
        direction: "out of",
    }
    .pass(c.to, c.target, c.data_tags, no_import)?;
    if let Addressed::Agent { name, .. } = c.target {
        accepts(Some(provider), name, c.data_tags)?;
    }
    Ok(())
}

/// `refusal` (its rule kept) reworded for a `tenant` that has no policy:
/// it `does` nothing across tenants.
fn no_policy(refusal: Refusal, tenant: &str, does: String) -> Refusal {
    Refusal {
        reason: format!("cross-tenant call refused: tenant `{tenant}` has no policy, so it {does}"),
        ..refusal
    }
}

/// May `agent` of the policy's tenant receive data with these tags? An
/// agent the policy names under `[agents.<name>] accepts` receives those
/// tags only; others receive any.
pub fn accepts(policy: Option<&Policy>, agent: &str, data_tags: &[String]) -> Result<(), Refusal> {
    let Some(p) = policy else { return Ok(()) };
    let Some(allowed) = p.accepts.get(agent) else {
        return Ok(());
    };
    match data_tags.iter().find(|t| !allowed.contains(*t)) {
        None => Ok(()),
        Some(t) => Err(Refusal {
            rule: format!("{}:agents.{agent}.accepts", p.tenant),
            reason: format!(
                "agent `{agent}` of tenant `{}` may not receive data tagged `{t}`",
                p.tenant
            ),
            tags: true,
        }),
    }
}

/// May a request of the policy's tenant with these tags leave its region?
pub fn leaves_region(policy: Option<&Policy>, data_tags: &[String]) -> Result<(), Refusal> {
    let Some(p) = policy else { return Ok(()) };
    let Some(gate) = &p.region else { return Ok(()) };
    admits(gate, data_tags).map_err(|tag| {
        tag_refusal(
            format!("{}:region", p.tenant),
            &format!("region rule of tenant `{}`", p.tenant),
            tag,
            "a region boundary",
        )
    })
}

/// Reads a data-tag list (`pii, phi` in a header, or the strings of an A2A
/// metadata array): trimmed, lowercased, sorted, deduplicated; an unknown
/// tag is an error that lists the known ones.
pub fn parse_tags<'a>(
    items: impl IntoIterator<Item = &'a str>,
    policy: Option<&Policy>,
) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for raw in items {
        for t in raw.split(',') {
            let t = t.trim().to_ascii_lowercase();
            if t.is_empty() {
                continue;
            }
            let known = match policy {
                Some(p) => p.known_tags.contains(&t),
                None => crate::doc::BUILTIN_DATA_TAGS.contains(&t.as_str()),
            };
            if !known {
                let list: Vec<&str> = match policy {
                    Some(p) => p.known_tags().collect(),
                    None => {
                        let mut v = crate::doc::BUILTIN_DATA_TAGS.to_vec();
                        v.sort_unstable();
                        v
                    }
                };
                return Err(format!(
                    "unknown data tag `{t}` (known: {})",
                    list.join(", ")
                ));
            }
            out.push(t);
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(doc: &str) -> Policy {
        Policy::parse(doc.as_bytes()).expect("valid policy")
    }

    fn acme() -> Policy {
        policy(
            r#"
tenant = "acme"
version = 1
[[export]]
to = ["globex"]
agents = ["billing"]
tags = ["invoice"]
data_tags = ["pii"]
[[export]]
to = ["*"]
tags = ["status"]
untagged = "deny"
data_tags = ["public"]
[agents.billing]
accepts = ["pii", "financial"]
"#,
        )
    }

    fn globex() -> Policy {
        policy(
            r#"
tenant = "globex"
version = 1
[[import]]
from = ["acme"]
agents = ["*"]
tags = ["invoice", "status"]
data_tags = ["pii", "public"]
[region]
data_tags = ["public"]
"#,
        )
    }

    fn crossing<'a>(target: Addressed<'a>, tags: &'a [String]) -> Crossing<'a> {
        Crossing {
            from: "globex",
            to: "acme",
            target,
            data_tags: tags,
        }
    }

    const NONE: &[String] = &[];

    #[test]
    fn both_sides_are_needed() {
        let (a, g) = (acme(), globex());
        let billing = Addressed::Agent {
            name: "billing",
            tags: NONE,
        };
        assert_eq!(
            cross_tenant(Some(&g), Some(&a), crossing(billing, NONE)),
            Ok(())
        );
        assert_eq!(
            cross_tenant(
                Some(&g),
                Some(&a),
                crossing(Addressed::Tag("invoice"), NONE)
            ),
            Ok(())
        );
        // No import: the consumer's side refuses.
        let r = cross_tenant(None, Some(&a), crossing(billing, NONE)).expect_err("no import");
        assert_eq!(r.rule, "globex:import");
        assert!(!r.tags);
        // No export: the provider's side refuses.
        let r = cross_tenant(Some(&g), None, crossing(billing, NONE)).expect_err("no export");
        assert_eq!(r.rule, "acme:export");
        assert_eq!(
            r.to_string(),
            "cross-tenant call refused: tenant `acme` has no policy, so it exports nothing (to tenant `globex` neither) (rule `acme:export`)"
        );
        let empty = Policy {
            exports_to: Default::default(),
            exports_any: Vec::new(),
            ..acme()
        };
        let r =
            cross_tenant(Some(&g), Some(&empty), crossing(billing, NONE)).expect_err("no export");
        assert_eq!(
            r.to_string(),
            "cross-tenant call refused: tenant `acme` does not export agent `billing` to tenant `globex` (rule `acme:export`)"
        );
        // An agent nobody exported.
        let other = Addressed::Agent {
            name: "payroll",
            tags: NONE,
        };
        let r = cross_tenant(Some(&g), Some(&a), crossing(other, NONE)).expect_err("not exported");
        assert_eq!(r.rule, "acme:export");
        // Exported by one of its tags.
        let tags = vec!["invoice".to_string()];
        let tagged = Addressed::Agent {
            name: "payroll",
            tags: &tags,
        };
        assert_eq!(
            cross_tenant(Some(&g), Some(&a), crossing(tagged, NONE)),
            Ok(())
        );
        // Another tenant gets nothing from the globex-only export.
        let c = Crossing {
            from: "initech",
            ..crossing(billing, NONE)
        };
        assert_eq!(
            cross_tenant(Some(&g), Some(&a), c)
                .expect_err("initech")
                .rule,
            "acme:export"
        );
    }

    #[test]
    fn data_tags_must_pass_every_gate() {
        let (a, g) = (acme(), globex());
        let billing = Addressed::Agent {
            name: "billing",
            tags: NONE,
        };
        let pii = vec!["pii".to_string()];
        assert_eq!(
            cross_tenant(Some(&g), Some(&a), crossing(billing, &pii)),
            Ok(())
        );
        let phi = vec!["phi".to_string()];
        let r = cross_tenant(Some(&g), Some(&a), crossing(billing, &phi)).expect_err("phi");
        assert_eq!(r.rule, "acme:export[0].data_tags");
        assert!(r.tags && r.reason.contains("`phi`"), "{r}");
        // `status` is exported to everyone, but not untagged.
        let status = Addressed::Tag("status");
        let r = cross_tenant(Some(&g), Some(&a), crossing(status, NONE)).expect_err("untagged");
        assert_eq!(r.rule, "acme:export[1].data_tags");
        assert!(r.reason.contains("untagged"), "{r}");
        let public = vec!["public".to_string()];
        assert_eq!(
            cross_tenant(Some(&g), Some(&a), crossing(status, &public)),
            Ok(())
        );
        // The agent's own accept list applies on top of the export.
        let financial = vec!["financial".to_string(), "pii".to_string()];
        let r = cross_tenant(Some(&g), Some(&a), crossing(billing, &financial))
            .expect_err("financial not exported");
        assert_eq!(r.rule, "acme:export[0].data_tags");
        let secret = vec!["secret".to_string()];
        let r = accepts(Some(&a), "billing", &secret).expect_err("billing takes no secrets");
        assert_eq!(r.rule, "acme:agents.billing.accepts");
        assert_eq!(accepts(Some(&a), "other", &secret), Ok(()));
        // The region gate.
        assert_eq!(leaves_region(Some(&g), &public), Ok(()));
        assert_eq!(
            leaves_region(Some(&g), &pii).expect_err("pii stays").rule,
            "globex:region"
        );
        assert_eq!(leaves_region(Some(&a), &pii), Ok(()));
    }

    #[test]
    fn tags_parse_and_unknown_ones_are_listed() {
        assert_eq!(
            parse_tags(["pii, PHI ,pii", "confidential"], None),
            Ok(vec!["confidential".into(), "phi".into(), "pii".into()])
        );
        let e = parse_tags(["nuclear"], None).expect_err("unknown");
        assert!(e.contains("`nuclear`") && e.contains("pii"), "{e}");
        let p = policy("tenant = \"a\"\nversion = 1\ndata_tags = [\"trade-secret\"]\n");
        assert_eq!(
            parse_tags(["trade-secret"], Some(&p)),
            Ok(vec!["trade-secret".into()])
        );
    }
}
