//! What the mesh reads from A2A traffic, in both dialects (DESIGN.md, "A2A
//! on the wire"): the text of a message, for routing by intent.
//!
//! A2A 0.3 sends JSON-RPC `message/send` / `message/stream` with parts
//! `{"kind": "text", "text": ...}`; A2A 1.0 sends `SendMessage` /
//! `SendStreamingMessage` with parts `{"text": ...}`, or the HTTP+JSON
//! binding (`POST /message:send`) with the message at the top level. Only
//! `text` matters here, so one walk covers all three.

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
    let texts: Vec<&str> = message
        .get("parts")?
        .as_array()?
        .iter()
        .filter_map(|p| p.get("text").and_then(Value::as_str))
        .collect();
    (!texts.is_empty()).then(|| texts.join(" "))
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
        let rest = br#"{"message":{"role":"ROLE_USER","parts":[{"text":"weather in Paris"}]}}"#;
        assert_eq!(intent_text(rest).as_deref(), Some("weather in Paris"));
        let other = br#"{"jsonrpc":"2.0","id":1,"method":"tasks/get","params":{"id":"t"}}"#;
        assert_eq!(intent_text(other), None);
        assert_eq!(intent_text(b"not json"), None);
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
