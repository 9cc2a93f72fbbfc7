//! What the mesh reads from A2A traffic, in both dialects (DESIGN.md, "A2A
//! on the wire"): the text of a message, for routing by intent.
//!
//! A2A 0.3 sends JSON-RPC `message/send` / `message/stream` with parts
//! `{"kind": "text", "text": ...}`; A2A 1.0 sends `SendMessage` /
//! `SendStreamingMessage` with parts `{"text": ...}`, or the HTTP+JSON
//! binding (`POST /message:send`; 0.3's is `POST /v1/message:send`, its
//! parts named `content`) with the message at the top level. Only
//! `text` matters here, so one walk covers all three.
//!
//! It also recognizes the requests for an agent's authenticated ("extended")
//! card, whose answer the home node rewrites like the well-known card
//! (`forward::extended`).

use serde_json::Value;

/// JSON-RPC methods that carry a message to route by intent.
pub const MESSAGE_METHODS: [&str; 4] = [
    "message/send",
    "message/stream",
    "SendMessage",
    "SendStreamingMessage",
];

/// The text parts of an A2A message request, joined by spaces.
pub fn intent_text(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let message = match v.get("method").and_then(Value::as_str) {
        Some(m) if MESSAGE_METHODS.contains(&m) => v.pointer("/params/message")?,
        Some(_) => return None,
        // HTTP+JSON binding: the request object itself.
        None => v.get("message")?,
    };
    message_text(message)
}

/// The text parts of one A2A message (either dialect), joined by spaces.
fn message_text(message: &Value) -> Option<String> {
    // A2A 0.3's HTTP+JSON binding (`POST /v1/message:send`, a2a-sdk 0.3's
    // REST transport) names the parts `content`.
    let texts: Vec<&str> = message
        .get("parts")
        .or_else(|| message.get("content"))?
        .as_array()?
        .iter()
        .filter_map(|p| p.get("text").and_then(Value::as_str))
        .collect();
    (!texts.is_empty()).then(|| texts.join(" "))
}

/// JSON-RPC methods that answer with the agent's authenticated extended
/// card as their `result`: A2A 0.3 and A2A 1.0.
pub const EXTENDED_CARD_METHODS: [&str; 2] =
    ["agent/getAuthenticatedExtendedCard", "GetExtendedAgentCard"];

/// REST paths (suffixes: an interface may sit under any prefix, and A2A 1.0
/// puts a tenant before it) that answer `GET` with the extended card: A2A
/// 0.3 `/v1/card` and the deprecated `/agent/authenticatedExtendedCard`;
/// A2A 1.0 `/extendedAgentCard` (a2a-sdk 1.x also `/{tenant}/...`).
pub const EXTENDED_CARD_PATHS: [&str; 3] = [
    "/v1/card",
    "/agent/authenticatedExtendedCard",
    "/extendedAgentCard",
];

/// True when a JSON-RPC request body asks for the extended card. The body is
/// read as the agent reads it (the whole body one JSON object; of repeated
/// keys the last counts, as in Python's `json`), so escapes or duplicate
/// keys cannot hide the method from the mesh and still reach the agent.
pub fn asks_extended_card(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body).is_ok_and(|v| {
        v.get("method")
            .and_then(Value::as_str)
            .is_some_and(|m| EXTENDED_CARD_METHODS.contains(&m))
    })
}

/// True for a request path (query allowed) that ends in one of
/// [`EXTENDED_CARD_PATHS`], compared after percent-decoding, as the agent's
/// router compares it (Starlette routes on the decoded path), so
/// `/extendedAgent%43ard` is recognized too.
pub fn is_extended_card_path(path_and_query: &str) -> bool {
    let path = path_and_query.split('?').next().unwrap_or_default();
    let path = percent_decode(path.as_bytes());
    EXTENDED_CARD_PATHS
        .iter()
        .any(|p| path.ends_with(p.as_bytes()))
}

fn percent_decode(s: &[u8]) -> Vec<u8> {
    let hex = |b: u8| char::from(b).to_digit(16);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' && i + 2 < s.len() {
            if let (Some(h), Some(l)) = (hex(s[i + 1]), hex(s[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

/// The A2A metadata key a request's data tags are declared under.
pub const DATA_TAGS_KEY: &str = "dmsc.dataTags";

/// Data tags an A2A request declares: `dmsc.dataTags` (an array of strings,
/// or one comma-separated string) in the request's `metadata`, or in its
/// message's (JSON-RPC `params`, or the HTTP+JSON request object).
pub fn data_tags(body: &[u8]) -> Vec<String> {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return Vec::new();
    };
    let root = v.get("params").unwrap_or(&v);
    let mut out = Vec::new();
    for meta in [root.get("metadata"), root.pointer("/message/metadata")]
        .into_iter()
        .flatten()
    {
        match meta.get(DATA_TAGS_KEY) {
            Some(Value::String(s)) => out.push(s.clone()),
            Some(Value::Array(a)) => {
                out.extend(a.iter().filter_map(Value::as_str).map(str::to_string))
            }
            _ => {}
        }
    }
    out
}

/// The text of an A2A JSON-RPC answer: a message result (0.3: the message
/// itself; 1.0: `{"message": ...}`) or a task's status message.
pub fn reply_text(response: &Value) -> Option<String> {
    let result = response.get("result")?;
    let message = result
        .get("message")
        .or_else(|| result.pointer("/status/message"))
        .or_else(|| result.pointer("/task/status/message"))
        .unwrap_or(result);
    message_text(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_dialects_yield_the_text() {
        let v03 = br#"{"jsonrpc":"2.0","id":1,"method":"message/send","params":{"message":{"role":"user","messageId":"m","parts":[{"kind":"text","text":"summarize this invoice"}]}}}"#;
        assert_eq!(intent_text(v03).as_deref(), Some("summarize this invoice"));
        let v10 = br#"{"jsonrpc":"2.0","id":"a","method":"SendStreamingMessage","params":{"message":{"role":"ROLE_USER","messageId":"m","parts":[{"text":"translate"},{"text":"to French"}]}}}"#;
        assert_eq!(intent_text(v10).as_deref(), Some("translate to French"));
        let rest03 = br#"{"message":{"messageId":"m","role":"ROLE_USER","content":[{"text":"weather in Lyon"}]}}"#;
        assert_eq!(intent_text(rest03).as_deref(), Some("weather in Lyon"));
        let rest = br#"{"message":{"role":"ROLE_USER","parts":[{"text":"weather in Paris"}]}}"#;
        assert_eq!(intent_text(rest).as_deref(), Some("weather in Paris"));
        let other = br#"{"jsonrpc":"2.0","id":1,"method":"tasks/get","params":{"id":"t"}}"#;
        assert_eq!(intent_text(other), None);
        assert_eq!(intent_text(b"not json"), None);
    }

    #[test]
    fn extended_card_requests_are_recognized() {
        for body in [
            &br#"{"jsonrpc":"2.0","id":"x","method":"agent/getAuthenticatedExtendedCard","params":{}}"#[..],
            br#"{"jsonrpc":"2.0","id":3,"method":"GetExtendedAgentCard"}"#,
            // escaped, and a repeated key whose last value counts
            br#"{"jsonrpc":"2.0","id":3,"method":"\u0047etExtendedAgentCard"}"#,
            br#"{"method":"message/send","jsonrpc":"2.0","id":3,"method":"GetExtendedAgentCard"}"#,
        ] {
            assert!(asks_extended_card(body), "{}", String::from_utf8_lossy(body));
        }
        for body in [
            &br#"{"jsonrpc":"2.0","id":1,"method":"message/send","params":{}}"#[..],
            br#"{"jsonrpc":"2.0","id":1,"method":"GetExtendedAgentCard"} trailing"#,
            br#"[{"jsonrpc":"2.0","id":1,"method":"GetExtendedAgentCard"}]"#,
            b"not json",
        ] {
            assert!(
                !asks_extended_card(body),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        for path in [
            "/v1/card",
            "/a2a/v1/card?x=1",
            "/agent/authenticatedExtendedCard",
            "/extendedAgentCard",
            "/acme/extendedAgentCard",
            "/extendedAgent%43ard",
            "/v1%2Fcard",
        ] {
            assert!(is_extended_card_path(path), "{path}");
        }
        for path in [
            "/",
            "/v1/cards",
            "/card",
            "/.well-known/agent-card.json",
            "/x?p=/v1/card",
            "/%",
        ] {
            assert!(!is_extended_card_path(path), "{path}");
        }
    }

    #[test]
    fn data_tags_come_from_either_metadata() {
        let v03 = br#"{"jsonrpc":"2.0","id":1,"method":"message/send","params":{"metadata":{"dmsc.dataTags":["pii"]},"message":{"metadata":{"dmsc.dataTags":"phi, pci"},"parts":[]}}}"#;
        assert_eq!(data_tags(v03), vec!["pii", "phi, pci"]);
        let rest = br#"{"message":{"parts":[]},"metadata":{"dmsc.dataTags":["confidential"]}}"#;
        assert_eq!(data_tags(rest), vec!["confidential"]);
        assert!(data_tags(b"{}").is_empty() && data_tags(b"nope").is_empty());
    }
}
