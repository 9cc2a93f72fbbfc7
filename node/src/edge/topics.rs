//! The MQTT topic grammar of the edge bridge, without I/O.
//!
//! Everything of a tenant lives under `dmsc/<tenant>/`, so one broker ACL
//! pattern per tenant (`dmsc/acme/#`) confines its clients:
//!
//! | topic | who publishes | what |
//! |---|---|---|
//! | `dmsc/<t>/agents/<name>/card` | edge agent (retained) | its A2A card; empty clears it (clean leave) |
//! | `dmsc/<t>/agents/<name>/status` | edge agent (last will) | `online` / `offline` |
//! | `dmsc/<t>/agents/<name>/req` | node | a delegation for the agent (response topic + correlation data) |
//! | `dmsc/<t>/call/<host>` | edge agent | a call into the mesh, `<host>` as in HTTP (`billing.acme.dmsc`) |
//! | `dmsc/<t>/replies/<node>` | edge agent | answers to the node's delegations |

/// The first level of every bridged topic.
pub const ROOT: &str = "dmsc";

/// A topic the bridge reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topic<'a> {
    Card { tenant: &'a str, name: &'a str },
    Status { tenant: &'a str, name: &'a str },
    Call { tenant: &'a str, host: &'a str },
    Reply { tenant: &'a str, node: &'a str },
}

/// Reads a topic the bridge subscribes to; `None` for anything else
/// (including the node's own request topics).
pub fn parse(topic: &str) -> Option<Topic<'_>> {
    let mut it = topic.split('/');
    if it.next()? != ROOT {
        return None;
    }
    let tenant = it.next().filter(|t| !t.is_empty())?;
    let parsed = match (it.next()?, it.next(), it.next()) {
        ("agents", Some(name), Some("card")) if !name.is_empty() => Topic::Card { tenant, name },
        ("agents", Some(name), Some("status")) if !name.is_empty() => {
            Topic::Status { tenant, name }
        }
        ("call", Some(host), None) if !host.is_empty() => Topic::Call { tenant, host },
        ("replies", Some(node), None) if !node.is_empty() => Topic::Reply { tenant, node },
        _ => return None,
    };
    // Nothing may follow the levels read above.
    match it.next() {
        None => Some(parsed),
        Some(_) => None,
    }
}

/// Whether an edge caller of `tenant` may have its answer published on
/// `topic`: under its own `dmsc/<tenant>/`, no wildcards, and not one of
/// the bridge's own topics (cards, statuses, requests, calls, replies):
/// else a caller could make the node publish where only agents or the node
/// should.
pub fn valid_response_topic(topic: &str, tenant: &str) -> bool {
    let Some(rest) = topic.strip_prefix(&format!("{ROOT}/{tenant}/")) else {
        return false;
    };
    let first = rest.split('/').next().unwrap_or_default();
    !rest.is_empty()
        && !topic.contains(['+', '#'])
        && !matches!(first, "agents" | "call" | "replies")
}

/// Where the node publishes delegations for `name`.
pub fn request(tenant: &str, name: &str) -> String {
    format!("{ROOT}/{tenant}/agents/{name}/req")
}

/// Where this node reads the answers to its delegations in `tenant`.
pub fn replies(tenant: &str, node: &str) -> String {
    format!("{ROOT}/{tenant}/replies/{node}")
}

/// An agent's card topic.
pub fn card(tenant: &str, name: &str) -> String {
    format!("{ROOT}/{tenant}/agents/{name}/card")
}

/// An agent's status topic.
pub fn status(tenant: &str, name: &str) -> String {
    format!("{ROOT}/{tenant}/agents/{name}/status")
}

/// The call topic for `host`.
pub fn call(tenant: &str, host: &str) -> String {
    format!("{ROOT}/{tenant}/call/{host}")
}

/// The filters this node subscribes to for `tenant`. `shared`: calls
/// through a shared subscription, so that where several nodes bridge a
/// tenant on one broker each call reaches one of them (MQTT v5).
pub fn subscriptions(tenant: &str, node: &str, shared: bool) -> [String; 4] {
    let calls = format!("{ROOT}/{tenant}/call/+");
    [
        format!("{ROOT}/{tenant}/agents/+/card"),
        format!("{ROOT}/{tenant}/agents/+/status"),
        if shared {
            format!("$share/dmsc-{tenant}/{calls}")
        } else {
            calls
        },
        replies(tenant, node),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_topics_the_bridge_reads_parse_and_nothing_else_does() {
        assert_eq!(
            parse(&card("acme", "meter")),
            Some(Topic::Card {
                tenant: "acme",
                name: "meter"
            })
        );
        assert_eq!(
            parse(&status("acme", "meter")),
            Some(Topic::Status {
                tenant: "acme",
                name: "meter"
            })
        );
        assert_eq!(
            parse(&call("acme", "billing.acme.dmsc")),
            Some(Topic::Call {
                tenant: "acme",
                host: "billing.acme.dmsc"
            })
        );
        assert_eq!(
            parse(&replies("acme", "n1")),
            Some(Topic::Reply {
                tenant: "acme",
                node: "n1"
            })
        );
        for other in [
            "",
            "dmsc",
            "dmsc/acme",
            "dmsc//agents/x/card",
            "dmsc/acme/agents//card",
            "dmsc/acme/agents/x/card/more",
            "dmsc/acme/agents/x/req",
            "dmsc/acme/call/",
            "dmsc/acme/call/a/b",
            "other/acme/agents/x/card",
        ] {
            assert_eq!(parse(other), None, "{other:?}");
        }
    }

    #[test]
    fn a_response_topic_is_the_callers_own() {
        assert!(valid_response_topic("dmsc/acme/edge/meter/answers", "acme"));
        for bad in [
            "dmsc/globex/edge/x",
            "dmsc/acme/",
            "dmsc/acme/agents/billing/req",
            "dmsc/acme/agents/billing/card",
            "dmsc/acme/call/billing.acme.dmsc",
            "dmsc/acme/replies/n1",
            "dmsc/acme/edge/+",
            "dmsc/acme/edge/#",
            "elsewhere/acme/x",
        ] {
            assert!(!valid_response_topic(bad, "acme"), "{bad}");
        }
    }

    #[test]
    fn every_subscription_stays_inside_the_tenant() {
        for s in subscriptions("acme", "n1", true)
            .into_iter()
            .chain(subscriptions("acme", "n1", false))
        {
            let filter = s.strip_prefix("$share/dmsc-acme/").unwrap_or(&s);
            assert!(filter.starts_with("dmsc/acme/"), "{s}");
        }
    }
}
