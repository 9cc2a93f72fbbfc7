//! Tenant policy: who may act for which tenant, decided the same way on
//! both nodes a delegation crosses.
//!
//! - At the ingress, [`ingress`]: an authenticated caller reaches its own
//!   tenant's addresses only.
//! - On the home node, [`inbound`]: the request head a calling node sends
//!   names a tenant, and the home node does not take its word for it. The
//!   calling node's *verified overlay certificate* may limit it to some
//!   tenants (`urn:dmsc:tenant:<t>` URI SANs, written by
//!   `ca issue-node --tenant`); a head for a tenant outside that scope is
//!   refused, whatever the calling node's ingress let through (a
//!   misconfigured node, or a compromised one forging heads). Only then is
//!   the target looked up among this node's agents of that tenant, so a node
//!   outside its scope learns nothing about which agents exist. A node
//!   certificate without tenant SANs is unscoped, as before scopes existed.
//!
//! - Between tenants, [`outbound`] on the calling node (at the ingress, and
//!   again for the agent that selection picks) and on the home node: a
//!   cross-tenant call needs the provider tenant's export *and* the consumer
//!   tenant's import in their signed policies ([`crate::security::policies`]); data tags must
//!   pass every gate on the way. The rules themselves are `dmsc_policy`'s.
//!
//! Pure on purpose: facts in, a typed decision out, no I/O and no logging,
//! so the rules are tested exhaustively here and each caller renders a
//! refusal once at its edge (the 403 body, the audit entry, the log line).
//! Nothing here knows HTTP; [`Denial::is_forbidden`] tells a renderer
//! whether it is a policy refusal or a plain "not here".

pub mod caller;

use dmsc_policy::{Addressed, Crossing, Policy, Refusal};

/// Why a delegation is refused. `Display` is the reason given to the
/// caller and written to the audit log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    /// A tenant policy refused: no export or import for a cross-tenant
    /// call, or a data tag that may not pass.
    #[error("caller `{caller}` of tenant `{caller_tenant}`: {refusal}")]
    Policy {
        caller: String,
        caller_tenant: String,
        refusal: Refusal,
    },
    /// A calling node delegated for a tenant its certificate does not cover.
    #[error(
        "node `{node}` may act only for tenants `{}` (the tenant scope of its certificate), not for tenant `{tenant}` (caller `{caller}`)",
        scope.join("`, `")
    )]
    OutsideNodeScope {
        node: String,
        scope: Vec<String>,
        tenant: String,
        caller: String,
    },
    /// The target is not an agent of that tenant on this node (a stale
    /// registry entry at the calling node, or a made-up name).
    #[error("`{tenant}/{agent}` is not an agent of node `{node}`")]
    NotHere {
        tenant: String,
        agent: String,
        node: String,
    },
}

impl Denial {
    /// The policy rule that refused, for the audit entry.
    pub fn rule(&self) -> Option<&str> {
        match self {
            Denial::Policy { refusal, .. } => Some(&refusal.rule),
            Denial::OutsideNodeScope { .. } => Some("node-scope"),
            Denial::NotHere { .. } => None,
        }
    }

    /// A data-tag rule refused (`policy_violation`), not a missing allowlist entry.
    pub fn is_tag_violation(&self) -> bool {
        matches!(self, Denial::Policy { refusal, .. } if refusal.tags)
    }

    /// True for a policy refusal (403, audited as a denial); false for
    /// [`Denial::NotHere`], which the calling node may retry elsewhere.
    pub fn is_forbidden(&self) -> bool {
        !matches!(self, Denial::NotHere { .. })
    }
}

/// True if a node whose certificate has tenant `scope` (`None`: unscoped)
/// may act for `tenant`.
pub fn in_scope(scope: Option<&[String]>, tenant: &str) -> bool {
    scope.is_none_or(|s| s.iter().any(|t| t == tenant))
}

/// Where a request goes, as far as policy cares.
#[derive(Debug, Clone, Copy)]
pub struct Route<'a> {
    pub caller: &'a str,
    pub caller_tenant: &'a str,
    /// The target's tenant.
    pub tenant: &'a str,
    pub target: Addressed<'a>,
    pub data_tags: &'a [String],
    /// The calling node and the home node are in different regions.
    pub crosses_region: bool,
}

/// May `caller`, of `caller_tenant`, reach `target` of `tenant` with a
/// request carrying `data_tags`? Within a tenant only the target agent's
/// accepted data tags apply; between tenants the provider's export and the
/// consumer's import, and their data-tag gates; across regions the
/// consumer's region gate. Run at the ingress, for the agent that selection
/// picked, and on the home node. `consumer` and `provider` are the
/// policies of `caller_tenant` and `tenant` (the same one within a tenant),
/// looked up once per request by the caller.
pub fn outbound(
    consumer: Option<&Policy>,
    provider: Option<&Policy>,
    r: Route<'_>,
) -> Result<(), Denial> {
    let Route {
        caller,
        caller_tenant,
        tenant,
        target,
        data_tags,
        crosses_region,
    } = r;
    let region = if crosses_region {
        dmsc_policy::leaves_region(consumer, data_tags)
    } else {
        Ok(())
    };
    let decided = region.and_then(|()| {
        if caller_tenant == tenant {
            match target {
                Addressed::Agent { name, .. } => dmsc_policy::accepts(provider, name, data_tags),
                _ => Ok(()),
            }
        } else {
            dmsc_policy::cross_tenant(
                consumer,
                provider,
                Crossing {
                    from: caller_tenant,
                    to: tenant,
                    target,
                    data_tags,
                },
            )
        }
    });
    decided.map_err(|refusal| Denial::Policy {
        caller: caller.to_string(),
        caller_tenant: caller_tenant.to_string(),
        refusal,
    })
}

/// Home node: may this agent, whose `[[agents]]` config declares the data
/// tags it `accepts` (`None`: any), receive a request with `data_tags`?
pub fn config_accepts(
    caller: &str,
    caller_tenant: &str,
    tenant: &str,
    agent: &str,
    accepts: Option<&[String]>,
    data_tags: &[String],
) -> Result<(), Denial> {
    let Some(allowed) = accepts else {
        return Ok(());
    };
    match data_tags.iter().find(|t| !allowed.contains(*t)) {
        None => Ok(()),
        Some(t) => Err(Denial::Policy {
            caller: caller.to_string(),
            caller_tenant: caller_tenant.to_string(),
            refusal: Refusal {
                rule: format!("{tenant}:config.agents.{agent}.accepts"),
                reason: format!(
                    "agent `{agent}` of tenant `{tenant}` may not receive data tagged `{t}` (its node's [[agents]] accepts)"
                ),
                tags: true,
            },
        }),
    }
}

/// A delegation arriving at its home node: who sent it, as the verified
/// overlay connection proves, and what its head asks for.
#[derive(Debug, Clone, Copy)]
pub struct Inbound<'a> {
    /// The calling node's name, from its verified certificate.
    pub node: &'a str,
    /// The calling node's tenant scope, from the same certificate.
    pub scope: Option<&'a [String]>,
    /// The tenant the head names (the target agent's).
    pub tenant: &'a str,
    /// The caller's tenant: the one the calling node acts for.
    pub caller_tenant: &'a str,
    /// The agent the head names.
    pub agent: &'a str,
    /// The caller as the calling node vouches for it (named in reasons only).
    pub caller: &'a str,
}

/// Home node: may this delegation be delivered, and to which agent?
/// `local` finds this node's agent of that tenant by name; it is asked only
/// once the calling node's scope admits the caller's tenant (the tenant
/// policy, [`outbound`], is checked next with the agent's tags). `me` names this node in
/// the reason.
pub fn inbound<A>(
    me: &str,
    req: Inbound<'_>,
    local: impl FnOnce() -> Option<A>,
) -> Result<A, Denial> {
    if !in_scope(req.scope, req.caller_tenant) {
        return Err(Denial::OutsideNodeScope {
            node: req.node.to_string(),
            scope: req.scope.unwrap_or_default().to_vec(),
            tenant: req.caller_tenant.to_string(),
            caller: req.caller.to_string(),
        });
    }
    local().ok_or_else(|| Denial::NotHere {
        tenant: req.tenant.to_string(),
        agent: req.agent.to_string(),
        node: me.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(ts: &[&str]) -> Vec<String> {
        ts.iter().map(|t| t.to_string()).collect()
    }

    fn req<'a>(scope: Option<&'a [String]>, tenant: &'a str) -> Inbound<'a> {
        Inbound {
            node: "n0",
            scope,
            tenant,
            caller_tenant: tenant,
            agent: "billing",
            caller: "ingress:127.0.0.1:15001",
        }
    }

    use crate::security::policies::PolicyStore;

    /// Looks both tenants' policies up, as the request path does, and decides.
    fn decide(store: &PolicyStore, r: Route<'_>) -> Result<(), Denial> {
        let (c, p) = (store.get(r.caller_tenant), store.get(r.tenant));
        outbound(c.as_deref(), p.as_deref(), r)
    }

    fn route<'a>(
        caller: &'a str,
        from: &'a str,
        to: &'a str,
        target: Addressed<'a>,
        data_tags: &'a [String],
    ) -> Route<'a> {
        Route {
            caller,
            caller_tenant: from,
            tenant: to,
            target,
            data_tags,
            crosses_region: false,
        }
    }

    #[test]
    fn cross_tenant_needs_an_export_and_an_import() {
        let ca = dmsc_transport::pki::CertificateAuthority::generate("td").expect("ca");
        let roots = vec![
            <rustls::pki_types::CertificateDer as rustls::pki_types::pem::PemObject>::from_pem_slice(
                ca.cert_pem.as_bytes(),
            )
            .expect("pem"),
        ];
        let dir = tempfile::tempdir().expect("dir");
        let keys = std::sync::Arc::new(dmsc_keys::KeyStore::load(dir.path()).expect("keys"));
        let store = PolicyStore::open(dir.path().join("p"), &roots, |_| false, keys).expect("open");
        let billing = Addressed::Agent {
            name: "billing",
            tags: &[],
        };
        let d = decide(&store, route("jwt:x#a", "globex", "acme", billing, &[])).expect_err("none");
        assert!(d.is_forbidden() && !d.is_tag_violation());
        assert_eq!(d.rule(), Some("acme:export"));
        assert_eq!(
            d.to_string(),
            "caller `jwt:x#a` of tenant `globex`: cross-tenant call refused: tenant `acme` has no policy, so it exports nothing (to tenant `globex` neither) (rule `acme:export`)"
        );
        assert_eq!(
            decide(&store, route("a", "acme", "acme", billing, &[])),
            Ok(())
        );
        let apply = |doc: &str| {
            let s = dmsc_policy::SignedPolicy::sign_operator(&ca, doc.as_bytes()).expect("sign");
            store
                .apply(s.to_json().as_bytes(), &roots, |_| false)
                .expect("apply");
        };
        apply("tenant = \"acme\"\nversion = 1\n[[export]]\nto = [\"globex\"]\nagents = [\"billing\"]\n");
        let d = decide(&store, route("a", "globex", "acme", billing, &[])).expect_err("no import");
        assert_eq!(d.rule(), Some("globex:import"));
        apply("tenant = \"globex\"\nversion = 1\n[[import]]\nfrom = [\"acme\"]\nagents = [\"billing\"]\n");
        assert_eq!(
            decide(&store, route("a", "globex", "acme", billing, &[])),
            Ok(())
        );
        let pii = vec!["pii".to_string()];
        let d = decide(&store, route("a", "globex", "acme", billing, &pii)).expect_err("tags");
        assert!(d.is_tag_violation(), "{d}");
    }

    #[test]
    fn an_unscoped_node_may_act_for_any_tenant() {
        assert!(in_scope(None, "acme") && in_scope(None, "other"));
        assert_eq!(inbound("n1", req(None, "other"), || Some(7)), Ok(7));
    }

    #[test]
    fn a_scoped_node_may_act_for_its_tenants_only() {
        let s = scope(&["acme", "beta"]);
        assert!(in_scope(Some(&s), "acme") && in_scope(Some(&s), "beta"));
        assert!(!in_scope(Some(&s), "other"));
        assert!(
            !in_scope(Some(&[]), "acme"),
            "an empty scope admits nothing"
        );
        assert_eq!(inbound("n1", req(Some(&s), "beta"), || Some(7)), Ok(7));
    }

    #[test]
    fn outside_the_scope_is_refused_before_the_agent_is_looked_up() {
        let s = scope(&["acme", "beta"]);
        let mut looked_up = false;
        let d = inbound("n1", req(Some(&s), "other"), || {
            looked_up = true;
            Some(7)
        })
        .expect_err("outside the scope");
        assert!(
            !looked_up,
            "a node outside its scope learns nothing of our agents"
        );
        assert!(d.is_forbidden());
        let reason = d.to_string();
        for needle in [
            "node `n0`",
            "tenants `acme`, `beta`",
            "not for tenant `other`",
            "caller `ingress:127.0.0.1:15001`",
        ] {
            assert!(reason.contains(needle), "`{needle}` missing from: {reason}");
        }
        // The same refusal whether or not the agent exists.
        assert_eq!(inbound("n1", req(Some(&s), "other"), || None::<u8>), Err(d));
    }

    #[test]
    fn a_target_that_is_not_ours_is_not_here_not_forbidden() {
        let s = scope(&["acme"]);
        for r in [req(None, "acme"), req(Some(&s), "acme")] {
            let d = inbound("n1", r, || None::<u8>).expect_err("not ours");
            assert!(!d.is_forbidden());
            assert_eq!(d.to_string(), "`acme/billing` is not an agent of node `n1`");
        }
    }
}
