//! The card of `mesh.<tenant>.dmsc`, the tenant's router by intent.
//!
//! A2A clients start from a card: a2a-sdk's `A2ACardResolver` (both
//! majors) fetches `/.well-known/agent-card.json` of a base URL before it
//! sends anything, so without a card at `http://mesh.<tenant>.dmsc` the
//! SDK's standard flow could not use routing by intent at all. This card
//! is the mesh's own (no agent's address is in it), in both dialects at
//! once: A2A 0.3's `url`/`preferredTransport` and A2A 1.0's
//! `supportedInterfaces` (a 1.x client prefers the latter and speaks 1.0,
//! a 0.3 client reads the former; each ignores the other's fields). Both
//! are answered at the same address: the node reads either dialect, over
//! JSON-RPC and over HTTP+JSON (REST). A REST message can only go to an
//! agent that serves REST, so the card lists HTTP+JSON only while some
//! agent of the tenant does (an SDK that prefers REST would otherwise pick
//! a binding no agent can take).

use serde_json::{json, Value};

/// The router card of `tenant`; `rest`: some agent of the tenant serves
/// HTTP+JSON, so the card lists that binding too.
pub fn router_card(tenant: &str, rest: bool) -> Value {
    let url = format!("http://mesh.{tenant}.dmsc/");
    let mut additional = vec![json!({"url": url, "transport": "JSONRPC"})];
    let mut supported =
        vec![json!({"url": url, "protocolBinding": "JSONRPC", "protocolVersion": "1.0"})];
    if rest {
        additional.push(json!({"url": url, "transport": "HTTP+JSON"}));
        supported
            .push(json!({"url": url, "protocolBinding": "HTTP+JSON", "protocolVersion": "1.0"}));
    }
    json!({
        "name": format!("mesh.{tenant}.dmsc"),
        "description": format!(
            "The dmsc mesh's router for tenant `{tenant}`: each message goes to the \
             agent of the tenant whose skills best match its text (or, with \
             `dmsc-intent-mode: ask`, the candidates come back to choose from). \
             Follow-up calls go to the chosen agent by name: <agent>.{tenant}.dmsc."
        ),
        "version": env!("CARGO_PKG_VERSION"),
        "protocolVersion": "0.3.0",
        "url": url,
        "preferredTransport": "JSONRPC",
        // SDK clients pick from what the card lists.
        "additionalInterfaces": additional,
        "supportedInterfaces": supported,
        "provider": {"organization": "dmsc mesh", "url": url},
        "capabilities": {"streaming": true},
        "defaultInputModes": ["text/plain"],
        "defaultOutputModes": ["text/plain", "application/json"],
        "skills": [{
            "id": "route-by-intent",
            "name": "Route by intent",
            "description": format!(
                "Delegates the message to the best-matching agent of tenant `{tenant}`"
            ),
            "tags": ["router", "intent"],
            "examples": ["Which agent can help me with my last invoice?"]
        }]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_router_card_is_a_valid_card_in_both_dialects() {
        let without_rest = router_card("acme", false);
        dmsc_registry::AgentCard::from_value(without_rest.clone()).expect("a valid card");
        assert_eq!(
            without_rest["supportedInterfaces"].as_array().map(Vec::len),
            Some(1)
        );
        assert_eq!(
            without_rest["additionalInterfaces"][0]["transport"],
            "JSONRPC"
        );
        let v = router_card("acme", true);
        let card = dmsc_registry::AgentCard::from_value(v.clone()).expect("a valid card");
        assert_eq!(card.url.as_deref(), Some("http://mesh.acme.dmsc/"));
        let si = card.supported_interfaces.as_ref().expect("1.0 interfaces");
        assert_eq!(si[0].url, "http://mesh.acme.dmsc/");
        assert_eq!(si[0].protocol_binding.as_deref(), Some("JSONRPC"));
        assert_eq!(si[1].protocol_binding.as_deref(), Some("HTTP+JSON"));
        assert_eq!(v["additionalInterfaces"][1]["transport"], "HTTP+JSON");
        // What a2a-sdk 0.3's AgentCard model requires.
        for k in [
            "name",
            "description",
            "url",
            "version",
            "capabilities",
            "defaultInputModes",
            "defaultOutputModes",
            "skills",
        ] {
            assert!(v.get(k).is_some(), "{k}");
        }
        for k in ["id", "name", "description", "tags"] {
            assert!(v["skills"][0].get(k).is_some(), "skill {k}");
        }
    }
}
