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

/// The A2A version a request speaks, as far as it says: its `A2A-Version`
/// header (a 1.0 client sends it; an agent takes a missing one as 0.3),
/// else the top-level JSON-RPC `method` of its whole `body` (0.3's are
/// paths such as `message/send`, 1.0's names such as `SendMessage`), else
/// its HTTP+JSON path (0.3's are under `/v1/`). `None`: it does not say (a
/// GET, a gRPC call, a body too large to hold).
pub fn request_dialect(
    headers: &hyper::HeaderMap,
    path: &str,
    body: Option<&[u8]>,
) -> Option<dmsc_registry::Dialect> {
    use dmsc_registry::Dialect;
    if let Some(d) = headers
        .get("a2a-version")
        .and_then(|v| v.to_str().ok())
        .and_then(Dialect::of_version)
    {
        return Some(d);
    }
    // Only the top-level `method` is kept (the rest is skipped, not built;
    // an HTTP+JSON body has none, and a `method` in its message's data
    // says nothing).
    #[derive(serde::Deserialize)]
    struct Method<'a> {
        #[serde(borrow)]
        method: Option<std::borrow::Cow<'a, str>>,
    }
    let method = body.and_then(|b| serde_json::from_slice::<Method<'_>>(b).ok()?.method);
    if let Some(m) = method {
        return Some(if m.contains('/') {
            Dialect::V03
        } else {
            Dialect::V10
        });
    }
    let path = path.split('?').next().unwrap_or_default();
    if path.ends_with("/message:send") || path.ends_with("/message:stream") {
        return Some(
            if path.ends_with("/v1/message:send") || path.ends_with("/v1/message:stream") {
                Dialect::V03
            } else {
                Dialect::V10
            },
        );
    }
    None
}

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

/// The text of a message request of which only the first bytes are at hand
/// (a request too large to hold whole: it streams on, routed by its start).
/// The prefix is no JSON document, so this reads it leniently: every JSON
/// string under a `"text"` key, the last one perhaps cut short. `None` when
/// the prefix names a method that carries no message.
pub fn intent_text_prefix(prefix: &[u8]) -> Option<String> {
    let s = String::from_utf8_lossy(prefix);
    // JSON allows whitespace around the colon (Python's json.dumps writes
    // `"method": "SendMessage"`).
    let methods = string_values(&s, "method");
    if !methods.is_empty()
        && !methods
            .iter()
            .any(|m| MESSAGE_METHODS.contains(&m.as_str()))
    {
        return None;
    }
    let texts: Vec<String> = string_values(&s, "text")
        .into_iter()
        .filter(|t| !t.trim().is_empty())
        .collect();
    (!texts.is_empty()).then(|| texts.join(" "))
}

/// Every JSON string value under the key `key` in `s`, read leniently (the
/// last one perhaps cut short): `"key"`, whitespace, `:`, whitespace, a
/// string.
fn string_values(s: &str, key: &str) -> Vec<String> {
    let quoted = format!("\"{key}\"");
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(at) = rest.find(&quoted) {
        rest = &rest[at + quoted.len()..];
        let Some(value) = rest.trim_start().strip_prefix(':').map(str::trim_start) else {
            continue;
        };
        let Some(value) = value.strip_prefix('"') else {
            continue;
        };
        let (text, used) = json_string_prefix(value);
        out.push(text);
        rest = &value[used..];
    }
    out
}

/// Decodes the JSON string that starts at `s` (after its opening quote) up
/// to its closing quote or the end of `s`: the text and the bytes used.
fn json_string_prefix(s: &str) -> (String, usize) {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return (out, i + 1),
            '\\' => match chars.next() {
                Some((_, 'n')) => out.push('\n'),
                Some((_, 't')) => out.push('\t'),
                Some((_, 'r')) => out.push('\r'),
                Some((_, 'u')) => {
                    let hex: String = chars.by_ref().take(4).map(|(_, c)| c).collect();
                    let c = u32::from_str_radix(&hex, 16)
                        .ok()
                        .and_then(char::from_u32)
                        .unwrap_or(char::REPLACEMENT_CHARACTER);
                    out.push(c);
                }
                Some((_, c)) => out.push(c),
                None => break,
            },
            c => out.push(c),
        }
    }
    (out, s.len())
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

/// True for a gRPC call that answers with the agent's card: A2A 1.0's
/// `A2AService/GetExtendedAgentCard`, A2A 0.3's `A2AService/GetAgentCard`
/// (whatever the proto package). Its answer is protobuf, which the mesh
/// does not rewrite, so the call is refused (fail closed).
pub fn is_grpc_card_call(path: &str) -> bool {
    path.trim_start_matches('/')
        .split_once('/')
        .is_some_and(|(service, method)| {
            (service == "A2AService" || service.ends_with(".A2AService"))
                && matches!(method, "GetExtendedAgentCard" | "GetAgentCard")
        })
}

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

/// The A2A protocol binding a request uses, as agent cards name them: a
/// JSON-RPC body is `JSONRPC`, a gRPC call `GRPC`, an HTTP+JSON path
/// (`/message:send`, `/v1/message:stream`, `/tasks/...`) `HTTP+JSON`;
/// `None` when the request says nothing (e.g. a `dmsc-intent` header over
/// an opaque body).
pub fn binding(grpc: bool, path: &str, body: Option<&[u8]>) -> Option<&'static str> {
    if grpc {
        return Some("GRPC");
    }
    if body.is_some_and(|b| crate::proto::http::jsonrpc_id(b).is_some()) {
        return Some("JSONRPC");
    }
    let path = path.split('?').next().unwrap_or_default();
    let rest = path.ends_with("/message:send")
        || path.ends_with("/message:stream")
        || path.contains("/tasks/")
        || path.ends_with("/tasks");
    rest.then_some("HTTP+JSON")
}

/// JSON-RPC methods about one existing task, in both dialects: a request
/// to `mesh.<tenant>.dmsc` with one of these goes where the task is.
pub const TASK_METHODS: [&str; 16] = [
    "tasks/get",
    "tasks/cancel",
    "tasks/resubscribe",
    "tasks/pushNotificationConfig/set",
    "tasks/pushNotificationConfig/get",
    "tasks/pushNotificationConfig/list",
    "tasks/pushNotificationConfig/delete",
    "GetTask",
    "CancelTask",
    "SubscribeToTask",
    "CreateTaskPushNotificationConfig",
    "SetTaskPushNotificationConfig",
    "GetTaskPushNotificationConfig",
    "ListTaskPushNotificationConfig",
    "ListTaskPushNotificationConfigs",
    "DeleteTaskPushNotificationConfig",
];

/// What a request names that an earlier answer made: a task (by its id)
/// or a conversation (by its context id).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Ref {
    Task(String),
    Context(String),
}

impl std::fmt::Display for Ref {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ref::Task(id) => write!(f, "task {id}"),
            Ref::Context(id) => write!(f, "context {id}"),
        }
    }
}

/// A request that continues something an agent started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FollowUp {
    /// A task method (`tasks/get`, `CancelTask`, ..., or the HTTP+JSON
    /// `/tasks/{id}` paths): it can only go to the agent that has the task.
    TaskCall(String),
    /// A message in an existing task (`taskId`) and/or conversation
    /// (`contextId`), task first.
    Message {
        task: Option<String>,
        context: Option<String>,
    },
    /// A listing of tasks (1.0's `ListTasks`, HTTP+JSON `GET /tasks`, gRPC
    /// `ListTasks`), of one conversation when it names a `contextId`.
    ListTasks { context: Option<String> },
}

/// `tasks/<id>` (A2A 1.0 resource names; a2a-sdk's gRPC transport) or a
/// plain id.
fn task_id_of(v: &Value) -> Option<String> {
    let s = v.as_str()?.trim();
    let id = match s.strip_prefix("tasks/") {
        Some(rest) => rest.split('/').next().unwrap_or_default(),
        None => s,
    };
    (!id.is_empty()).then(|| id.to_string())
}

/// The task or conversation a request continues, if any: a JSON-RPC task
/// method's `params.id` (`params.taskId`, `params.name` = `tasks/<id>`), a
/// message's `taskId` / `contextId` (JSON-RPC or HTTP+JSON), or an
/// HTTP+JSON task path (`/tasks/{id}`, `/v1/tasks/{id}:cancel`, ...).
pub fn follow_up(path: &str, body: &[u8]) -> Option<FollowUp> {
    let v: Option<Value> = serde_json::from_slice(body).ok();
    let (bare, query) = path.split_once('?').unwrap_or((path, ""));
    // gRPC (a protobuf body, so no context read) and HTTP+JSON listings.
    if bare.ends_with("/ListTasks") {
        return Some(FollowUp::ListTasks { context: None });
    }
    if bare.ends_with("/tasks") || bare == "tasks" {
        let context = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("contextId="))
            .filter(|c| !c.is_empty())
            .map(|c| String::from_utf8_lossy(&percent_decode(c.as_bytes())).into_owned());
        return Some(FollowUp::ListTasks { context });
    }
    match v
        .as_ref()
        .and_then(|v| v.get("method"))
        .and_then(Value::as_str)
    {
        Some("ListTasks" | "tasks/list") => {
            let context = v
                .as_ref()
                .and_then(|v| v.pointer("/params/contextId"))
                .and_then(Value::as_str)
                .filter(|c| !c.is_empty())
                .map(str::to_string);
            return Some(FollowUp::ListTasks { context });
        }
        Some(m) if TASK_METHODS.contains(&m) => {
            let p = v.as_ref()?.get("params")?;
            let id = ["id", "taskId", "name", "parent"]
                .iter()
                .find_map(|k| p.get(*k).and_then(task_id_of))?;
            return Some(FollowUp::TaskCall(id));
        }
        Some(m) if MESSAGE_METHODS.contains(&m) => {
            return message_refs(v.as_ref()?.pointer("/params/message")?);
        }
        Some(_) => return None,
        None => {}
    }
    // HTTP+JSON: `/tasks/{id}[:cancel|:subscribe][/...]` under any prefix.
    let path = path.split('?').next().unwrap_or_default();
    if let Some((_, rest)) = path
        .rsplit_once("/tasks/")
        .or_else(|| path.strip_prefix("tasks/").map(|r| ("", r)))
    {
        let id = rest.split('/').next().unwrap_or_default();
        let id = id.split(':').next().unwrap_or_default();
        if !id.is_empty() {
            return Some(FollowUp::TaskCall(id.to_string()));
        }
    }
    message_refs(v.as_ref()?.get("message")?)
}

fn message_refs(message: &Value) -> Option<FollowUp> {
    let s = |k: &str| {
        message
            .get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let (task, context) = (s("taskId"), s("contextId"));
    (task.is_some() || context.is_some()).then_some(FollowUp::Message { task, context })
}

/// The task and context ids an agent's answer names: a JSON-RPC `result`
/// (or an HTTP+JSON body, or one SSE event's data) that is a Task (`id`,
/// `contextId`), a Message (`taskId`, `contextId`), or an update event,
/// in either dialect (1.0 wraps them: `task`, `message`, `statusUpdate`,
/// `artifactUpdate`).
pub fn answer_refs(answer: &Value) -> Vec<Ref> {
    let mut out = Vec::new();
    let r = answer.get("result").unwrap_or(answer);
    let wrapped = ["task", "message", "statusUpdate", "artifactUpdate"]
        .iter()
        .filter_map(|k| Some((*k == "task", r.get(*k)?)));
    for (wrapped_task, o) in std::iter::once((false, r)).chain(wrapped) {
        if !o.is_object() {
            continue;
        }
        let s = |k: &str| o.get(k).and_then(Value::as_str).filter(|s| !s.is_empty());
        // A Task has its own `id` (a Message has `messageId`, an update
        // event `taskId`).
        let is_task = wrapped_task
            || o.get("kind").and_then(Value::as_str) == Some("task")
            || (o.get("status").is_some() && o.get("messageId").is_none() && s("taskId").is_none());
        if let (true, Some(id)) = (is_task, s("id")) {
            out.push(Ref::Task(id.to_string()));
        }
        if let Some(id) = s("taskId") {
            out.push(Ref::Task(id.to_string()));
        }
        if let Some(id) = s("contextId") {
            out.push(Ref::Context(id.to_string()));
        }
    }
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn grpc_card_calls_are_recognized() {
        for p in [
            "/a2a.v1.A2AService/GetExtendedAgentCard",
            "/lf.a2a.v1.A2AService/GetExtendedAgentCard",
            "/a2a.v1.A2AService/GetAgentCard",
        ] {
            assert!(super::is_grpc_card_call(p), "{p}");
        }
        for p in [
            "/a2a.v1.A2AService/SendMessage",
            "/helloworld.Greeter/GetAgentCard",
            "/GetAgentCard",
        ] {
            assert!(!super::is_grpc_card_call(p), "{p}");
        }
    }

    #[test]
    fn the_text_of_a_cut_request_is_read_from_its_start() {
        let whole = serde_json::json!({
            "jsonrpc": "2.0", "id": 1, "method": "message/send",
            "params": {"message": {"role": "user", "messageId": "m", "parts": [
                {"kind": "text", "text": "refund my \"order\"\nplease é"},
                {"kind": "text", "text": "x".repeat(1000)},
            ]}}
        })
        .to_string();
        let cut = &whole.as_bytes()[..whole.len() - 600];
        assert!(super::intent_text(cut).is_none(), "no JSON document");
        let text = super::intent_text_prefix(cut).expect("text");
        assert!(
            text.starts_with("refund my \"order\"\nplease \u{e9} xxx"),
            "{text}"
        );
        assert!(text.len() < 1000, "the second part is cut");
        let escaped =
            br#"{"method":"SendMessage","params":{"message":{"parts":[{"text":"caf\u00e9 \\ ok"#;
        assert_eq!(
            super::intent_text_prefix(escaped).as_deref(),
            Some("café \\ ok")
        );
        // A method that carries no message: nothing to route by.
        let other = br#"{"jsonrpc":"2.0","id":1,"method":"tasks/get","params":{"text":"x"#;
        assert_eq!(super::intent_text_prefix(other), None);
        // Whitespace between keys and values, as Python's json.dumps and
        // indented documents have it.
        let spaced = br#"{"jsonrpc": "2.0", "method" :
          "SendMessage", "params": {"message": {"parts": [{"text" : "full echo"#;
        assert_eq!(
            super::intent_text_prefix(spaced).as_deref(),
            Some("full echo")
        );
        let spaced_other = br#"{"jsonrpc": "2.0", "method": "tasks/get", "params": {"text": "x"#;
        assert_eq!(super::intent_text_prefix(spaced_other), None);
        // No text at all.
        assert_eq!(
            super::intent_text_prefix(br#"{"method":"SendMessage","params":{"#),
            None
        );
    }

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

    #[test]
    fn task_listings_are_read_in_every_binding() {
        let list = |context: Option<&str>| {
            Some(FollowUp::ListTasks {
                context: context.map(str::to_string),
            })
        };
        let rpc10 =
            br#"{"jsonrpc":"2.0","id":1,"method":"ListTasks","params":{"contextId":"c-1"}}"#;
        assert_eq!(follow_up("/", rpc10), list(Some("c-1")));
        let rpc_all = br#"{"jsonrpc":"2.0","id":1,"method":"ListTasks","params":{}}"#;
        assert_eq!(follow_up("/", rpc_all), list(None));
        assert_eq!(
            follow_up("/v1/tasks?pageSize=5&contextId=c%2F2", b""),
            list(Some("c/2"))
        );
        assert_eq!(follow_up("/tasks", b""), list(None));
        assert_eq!(
            follow_up("/a2a.v1.A2AService/ListTasks", b"\x0a\x03c-1"),
            list(None)
        );
        // A task of its own is still a task call.
        assert_eq!(
            follow_up("/v1/tasks/t-9", b""),
            Some(FollowUp::TaskCall("t-9".into()))
        );
    }

    #[test]
    fn follow_ups_are_read_in_both_dialects() {
        let get03 = br#"{"jsonrpc":"2.0","id":1,"method":"tasks/get","params":{"id":"t-1","historyLength":2}}"#;
        assert_eq!(
            follow_up("/", get03),
            Some(FollowUp::TaskCall("t-1".into()))
        );
        let cancel10 = br#"{"jsonrpc":"2.0","id":"x","method":"CancelTask","params":{"id":"t-2"}}"#;
        assert_eq!(
            follow_up("/", cancel10),
            Some(FollowUp::TaskCall("t-2".into()))
        );
        let named = br#"{"jsonrpc":"2.0","id":"x","method":"SubscribeToTask","params":{"name":"tasks/t-3"}}"#;
        assert_eq!(
            follow_up("/", named),
            Some(FollowUp::TaskCall("t-3".into()))
        );
        let push = br#"{"jsonrpc":"2.0","id":"x","method":"GetTaskPushNotificationConfig","params":{"taskId":"t-4","id":"cfg"}}"#;
        // `id` names the config here, but `taskId` is not consulted first:
        // either names something only that agent knows.
        assert!(matches!(follow_up("/", push), Some(FollowUp::TaskCall(_))));
        let msg = br#"{"jsonrpc":"2.0","id":1,"method":"message/send","params":{"message":{"kind":"message","taskId":"t-5","contextId":"c-5","parts":[{"kind":"text","text":"and then?"}]}}}"#;
        assert_eq!(
            follow_up("/", msg),
            Some(FollowUp::Message {
                task: Some("t-5".into()),
                context: Some("c-5".into())
            })
        );
        let ctx10 = br#"{"jsonrpc":"2.0","id":1,"method":"SendMessage","params":{"message":{"contextId":"c-6","parts":[{"text":"hi"}]}}}"#;
        assert_eq!(
            follow_up("/", ctx10),
            Some(FollowUp::Message {
                task: None,
                context: Some("c-6".into())
            })
        );
        let fresh = br#"{"jsonrpc":"2.0","id":1,"method":"SendMessage","params":{"message":{"parts":[{"text":"hi"}]}}}"#;
        assert_eq!(follow_up("/", fresh), None);
        assert_eq!(
            follow_up("/v1/tasks/t-7:cancel", b""),
            Some(FollowUp::TaskCall("t-7".into()))
        );
        assert_eq!(
            follow_up("/tasks/t-8?historyLength=1", b""),
            Some(FollowUp::TaskCall("t-8".into()))
        );
        let rest = br#"{"message":{"taskId":"t-9","parts":[{"text":"more"}]}}"#;
        assert_eq!(
            follow_up("/message:send", rest),
            Some(FollowUp::Message {
                task: Some("t-9".into()),
                context: None
            })
        );
        assert_eq!(follow_up("/", b"not json"), None);
    }

    #[test]
    fn answers_name_their_task_and_context() {
        let v = |s: &str| serde_json::from_str::<Value>(s).expect("json");
        let task03 = v(
            r#"{"jsonrpc":"2.0","id":1,"result":{"kind":"task","id":"t","contextId":"c","status":{"state":"working"}}}"#,
        );
        assert_eq!(
            answer_refs(&task03),
            [Ref::Task("t".into()), Ref::Context("c".into())]
        );
        let msg03 = v(
            r#"{"jsonrpc":"2.0","id":1,"result":{"kind":"message","messageId":"m","taskId":"t","contextId":"c"}}"#,
        );
        assert_eq!(
            answer_refs(&msg03),
            [Ref::Task("t".into()), Ref::Context("c".into())]
        );
        let task10 = v(
            r#"{"jsonrpc":"2.0","id":1,"result":{"task":{"id":"t","contextId":"c","status":{"state":"TASK_STATE_WORKING"}}}}"#,
        );
        assert_eq!(
            answer_refs(&task10),
            [Ref::Task("t".into()), Ref::Context("c".into())]
        );
        let got10 =
            v(r#"{"jsonrpc":"2.0","id":1,"result":{"id":"t","contextId":"c","status":{}}}"#);
        assert_eq!(
            answer_refs(&got10),
            [Ref::Task("t".into()), Ref::Context("c".into())]
        );
        let upd10 = v(
            r#"{"jsonrpc":"2.0","id":1,"result":{"statusUpdate":{"taskId":"t","contextId":"c"}}}"#,
        );
        assert_eq!(
            answer_refs(&upd10),
            [Ref::Task("t".into()), Ref::Context("c".into())]
        );
        let plain =
            v(r#"{"jsonrpc":"2.0","id":1,"result":{"kind":"message","messageId":"m","parts":[]}}"#);
        assert!(answer_refs(&plain).is_empty());
        let err = v(r#"{"jsonrpc":"2.0","id":1,"error":{"code":-32001,"message":"no"}}"#);
        assert!(answer_refs(&err).is_empty());
    }
}
