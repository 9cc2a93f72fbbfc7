//! Asking when unsure: the candidates, in the caller's dialect, and the
//! asks waiting for the caller's choice.
//!
//! In ask mode (`[intent] mode = "ask"` or `dmsc-intent-mode: ask`) an
//! intent whose best two matches are close, or whose best match is weak,
//! is not guessed: the caller gets the candidates (name, description, mesh
//! URL) and calls the one it chose by name.
//!
//! - A2A 0.3 (`message/send`, `message/stream`): a `task` in state
//!   `input-required` whose status message says what to choose from (a text
//!   part) and lists the candidates (a data part); a stream gets it as its
//!   one event.
//! - A2A 1.0 (`SendMessage`, `SendStreamingMessage`, HTTP+JSON
//!   `/message:send`): the same task, protobuf-JSON shaped
//!   (`TASK_STATE_INPUT_REQUIRED`, `ROLE_AGENT`, parts without `kind`).
//!   The candidates are also in the message's `metadata` under
//!   `dmsc.candidates` in both dialects.
//! - Anything else: `300 Multiple Choices` with a JSON body.
//!
//! Every ask has an id (`dmsc-ask-id` header, `dmsc.askId` in the task's
//! metadata). A call by name that carries `dmsc-intent-choice: <id>`, or
//! the same text from the same caller within the window, resolves it; the
//! text is then learned as an example of the chosen agent ([`super::learn`]).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde_json::{json, Value};

use crate::proto::http::{full, Body};

/// One agent offered to the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub name: String,
    pub description: String,
    /// `http://<agent>.<tenant>.dmsc/`
    pub url: String,
    pub score: f32,
}

impl Candidate {
    fn json(&self) -> Value {
        json!({"name": self.name, "description": self.description, "url": self.url,
               "score": (self.score * 1000.0).round() / 1000.0})
    }
}

/// A fresh ask id (16 hex digits).
pub fn new_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Asks per caller kept until resolved or expired.
const PER_CALLER: usize = 16;
/// Callers with pending asks, at most.
const CALLERS: usize = 10_000;

#[derive(Debug)]
struct Asked {
    id: String,
    text: String,
    candidates: Vec<String>,
    at: Instant,
}

/// Asks waiting for a choice, by (tenant, caller).
#[derive(Debug)]
pub struct Pending {
    window: Duration,
    by_caller: HashMap<(String, String), VecDeque<Asked>>,
}

impl Pending {
    pub fn new(window: Duration) -> Pending {
        Pending {
            window,
            by_caller: HashMap::new(),
        }
    }

    /// Remembers an ask; returns its id.
    pub fn remember(
        &mut self,
        tenant: &str,
        caller: &str,
        text: &str,
        candidates: Vec<String>,
        now: Instant,
    ) -> String {
        let id = new_id();
        if self.by_caller.len() >= CALLERS {
            let w = self.window;
            self.by_caller
                .retain(|_, q| q.back().is_some_and(|a| now.duration_since(a.at) < w));
            if self.by_caller.len() >= CALLERS {
                return id; // full of live asks: this one is answered, not remembered
            }
        }
        let q = self
            .by_caller
            .entry((tenant.to_string(), caller.to_string()))
            .or_default();
        if q.len() >= PER_CALLER {
            q.pop_front();
        }
        q.push_back(Asked {
            id: id.clone(),
            text: text.to_string(),
            candidates,
            at: now,
        });
        id
    }

    /// Does the caller have asks pending (cheap; checked before reading
    /// the body)?
    pub fn has(&self, tenant: &str, caller: &str) -> bool {
        self.by_caller
            .contains_key(&(tenant.to_string(), caller.to_string()))
    }

    /// A call by name to `agent`: if it resolves one of the caller's asks
    /// (by `choice` id, else by the same `text`) and `agent` was a
    /// candidate, the ask is done and its text returned (to learn).
    pub fn resolve(
        &mut self,
        tenant: &str,
        caller: &str,
        agent: &str,
        choice: Option<&str>,
        text: Option<&str>,
        now: Instant,
    ) -> Option<String> {
        let k = (tenant.to_string(), caller.to_string());
        let q = self.by_caller.get_mut(&k)?;
        let w = self.window;
        q.retain(|a| now.duration_since(a.at) < w);
        if q.is_empty() {
            self.by_caller.remove(&k);
            return None;
        }
        let q = self.by_caller.get_mut(&k)?;
        let pos = q.iter().rposition(|a| match (choice, text) {
            (Some(c), _) => a.id == c,
            (None, Some(t)) => a.text.trim() == t.trim(),
            (None, None) => false,
        })?;
        if !q[pos].candidates.iter().any(|c| c == agent) {
            return None;
        }
        let asked = q.remove(pos)?;
        if q.is_empty() {
            self.by_caller.remove(&k);
        }
        Some(asked.text)
    }
}

fn sentence(text: &str, candidates: &[Candidate]) -> String {
    let mut s: String = text.chars().take(120).collect();
    if s.len() < text.len() {
        s.push_str("...");
    }
    let names: Vec<String> = candidates
        .iter()
        .map(|c| format!("{} ({})", c.name, c.url))
        .collect();
    format!(
        "Several agents could handle \"{s}\": {}. Call the one you choose by name, or reply here with its name or number.",
        names.join(", ")
    )
}

/// The ask, in the dialect of the request (`body`: its buffered bytes).
pub fn render(
    body: Option<&[u8]>,
    path: &str,
    ask_id: &str,
    text: &str,
    candidates: &[Candidate],
) -> Response<Body> {
    let request: Option<Value> = body.and_then(|b| serde_json::from_slice(b).ok());
    let list: Vec<Value> = candidates.iter().map(Candidate::json).collect();
    let say = sentence(text, candidates);
    let meta = json!({"dmsc.askId": ask_id, "dmsc.candidates": list});
    let method = request
        .as_ref()
        .and_then(|r| r.get("method"))
        .and_then(Value::as_str);
    let rpc_id = request.as_ref().and_then(|r| r.get("id")).cloned();
    let task_id = format!("dmsc-ask-{ask_id}");
    let context = request
        .as_ref()
        .and_then(|r| {
            r.pointer("/params/message/contextId")
                .or_else(|| r.pointer("/message/contextId"))
        })
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| task_id.clone());
    let v03 = || {
        json!({
            "kind": "task", "id": task_id, "contextId": context,
            "status": {"state": "input-required", "message": {
                "kind": "message", "role": "agent", "messageId": format!("{task_id}-m"),
                "taskId": task_id, "contextId": context,
                "parts": [{"kind": "text", "text": say}, {"kind": "data", "data": {"candidates": list}}],
                "metadata": meta}},
            "metadata": meta,
        })
    };
    let v10 = || {
        json!({"task": {
            "id": task_id, "contextId": context,
            "status": {"state": "TASK_STATE_INPUT_REQUIRED", "message": {
                "role": "ROLE_AGENT", "messageId": format!("{task_id}-m"),
                "taskId": task_id, "contextId": context,
                "parts": [{"text": say}],
                "metadata": meta}},
            "metadata": meta,
        }})
    };
    let (status, ctype, out): (StatusCode, &str, Bytes) = match method {
        Some("message/send") => (
            StatusCode::OK,
            "application/json",
            json!({"jsonrpc": "2.0", "id": rpc_id, "result": v03()})
                .to_string()
                .into(),
        ),
        Some("SendMessage") => {
            let task = v10();
            (
                StatusCode::OK,
                "application/json",
                json!({"jsonrpc": "2.0", "id": rpc_id, "result": task})
                    .to_string()
                    .into(),
            )
        }
        Some("message/stream") => (
            StatusCode::OK,
            "text/event-stream",
            format!(
                "data: {}\n\n",
                json!({"jsonrpc": "2.0", "id": rpc_id, "result": v03()})
            )
            .into(),
        ),
        Some("SendStreamingMessage") => (
            StatusCode::OK,
            "text/event-stream",
            format!(
                "data: {}\n\n",
                json!({"jsonrpc": "2.0", "id": rpc_id, "result": v10()})
            )
            .into(),
        ),
        // HTTP+JSON binding: the request object holds the message; a 0.3
        // client's message has `kind` fields, a 1.0 client's does not.
        None if request.as_ref().is_some_and(|r| r.get("message").is_some()) => {
            let v03_client = request
                .as_ref()
                .and_then(|r| r.get("message"))
                .is_some_and(|m| {
                    m.get("kind").is_some()
                        || m.get("parts")
                            .and_then(Value::as_array)
                            .is_some_and(|p| p.iter().any(|p| p.get("kind").is_some()))
                });
            let task = if v03_client { v03() } else { v10() };
            if path
                .split('?')
                .next()
                .is_some_and(|p| p.ends_with("message:stream"))
            {
                (
                    StatusCode::OK,
                    "text/event-stream",
                    format!("data: {task}\n\n").into(),
                )
            } else {
                (StatusCode::OK, "application/json", task.to_string().into())
            }
        }
        _ => (
            StatusCode::MULTIPLE_CHOICES,
            "application/json",
            json!({"ask_id": ask_id, "text": text, "detail": say, "candidates": list})
                .to_string()
                .into(),
        ),
    };
    let mut resp = Response::new(full(out));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    if let Ok(v) = HeaderValue::from_str(ask_id) {
        h.insert("dmsc-ask-id", v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    fn cands() -> Vec<Candidate> {
        ["payroll", "benefits"]
            .iter()
            .map(|n| Candidate {
                name: n.to_string(),
                description: format!("{n} agent"),
                url: format!("http://{n}.acme.dmsc/"),
                score: 0.9,
            })
            .collect()
    }

    async fn body(r: Response<Body>) -> (StatusCode, String, Value) {
        let status = r.status();
        let ct = r.headers()[CONTENT_TYPE]
            .to_str()
            .unwrap_or_default()
            .to_string();
        let b = r
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let s = String::from_utf8_lossy(&b).to_string();
        let json = s.strip_prefix("data: ").unwrap_or(&s).trim().to_string();
        (
            status,
            ct,
            serde_json::from_str(&json).unwrap_or(Value::Null),
        )
    }

    #[tokio::test]
    async fn asks_in_every_dialect() {
        let send03 = br#"{"jsonrpc":"2.0","id":7,"method":"message/send","params":{"message":{"kind":"message","role":"user","messageId":"m","parts":[{"kind":"text","text":"my pay"}]}}}"#;
        let (s, ct, v) = body(render(Some(send03), "/", "ab", "my pay", &cands())).await;
        assert_eq!((s, ct.as_str()), (StatusCode::OK, "application/json"));
        assert_eq!(v["id"], 7);
        assert_eq!(v["result"]["kind"], "task");
        assert_eq!(v["result"]["status"]["state"], "input-required");
        let parts = &v["result"]["status"]["message"]["parts"];
        assert!(parts[0]["text"]
            .as_str()
            .is_some_and(|t| t.contains("payroll")));
        assert_eq!(
            parts[1]["data"]["candidates"][1]["url"],
            "http://benefits.acme.dmsc/"
        );
        assert_eq!(v["result"]["metadata"]["dmsc.askId"], "ab");

        let send10 = br#"{"jsonrpc":"2.0","id":"x","method":"SendMessage","params":{"message":{"role":"ROLE_USER","messageId":"m","parts":[{"text":"my pay"}]}}}"#;
        let (s, _, v) = body(render(Some(send10), "/", "ab", "my pay", &cands())).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["id"], "x");
        let task = &v["result"]["task"];
        assert_eq!(task["status"]["state"], "TASK_STATE_INPUT_REQUIRED");
        assert_eq!(task["status"]["message"]["role"], "ROLE_AGENT");
        assert!(task["status"]["message"]["parts"][0].get("kind").is_none());
        assert_eq!(task["metadata"]["dmsc.candidates"][0]["name"], "payroll");

        let stream = br#"{"jsonrpc":"2.0","id":1,"method":"SendStreamingMessage","params":{"message":{"parts":[{"text":"my pay"}]}}}"#;
        let (_, ct, v) = body(render(Some(stream), "/", "ab", "my pay", &cands())).await;
        assert_eq!(ct, "text/event-stream");
        assert_eq!(
            v["result"]["task"]["status"]["state"],
            "TASK_STATE_INPUT_REQUIRED"
        );

        let rest = br#"{"message":{"parts":[{"text":"my pay"}]}}"#;
        let (s, _, v) = body(render(
            Some(rest),
            "/message:send",
            "ab",
            "my pay",
            &cands(),
        ))
        .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["task"]["status"]["state"], "TASK_STATE_INPUT_REQUIRED");
        let (_, ct, v) = body(render(
            Some(rest),
            "/message:stream",
            "ab",
            "my pay",
            &cands(),
        ))
        .await;
        assert_eq!(ct, "text/event-stream");
        assert_eq!(v["task"]["status"]["state"], "TASK_STATE_INPUT_REQUIRED");
        let rest03 = br#"{"message":{"kind":"message","parts":[{"kind":"text","text":"my pay"}]}}"#;
        let (_, _, v) = body(render(
            Some(rest03),
            "/v1/message:send",
            "ab",
            "my pay",
            &cands(),
        ))
        .await;
        assert_eq!(v["status"]["state"], "input-required", "{v}");

        let (s, _, v) = body(render(Some(b"plain"), "/", "ab", "my pay", &cands())).await;
        assert_eq!(s, StatusCode::MULTIPLE_CHOICES);
        assert_eq!(v["candidates"][0]["name"], "payroll");
        assert_eq!(v["ask_id"], "ab");
    }

    #[test]
    fn pending_asks_resolve_by_id_or_text_within_the_window() {
        let now = Instant::now();
        let mut p = Pending::new(Duration::from_secs(60));
        let id = p.remember(
            "acme",
            "c",
            "my pay",
            vec!["payroll".into(), "benefits".into()],
            now,
        );
        // not a candidate
        assert_eq!(
            p.resolve("acme", "c", "facilities", Some(&id), None, now),
            None
        );
        // another caller
        assert_eq!(
            p.resolve("acme", "d", "payroll", Some(&id), None, now),
            None
        );
        assert_eq!(
            p.resolve("acme", "c", "payroll", Some(&id), None, now),
            Some("my pay".into())
        );
        // resolved once
        assert_eq!(
            p.resolve("acme", "c", "payroll", Some(&id), None, now),
            None
        );
        p.remember("acme", "c", "my pay", vec!["payroll".into()], now);
        assert_eq!(
            p.resolve("acme", "c", "payroll", None, Some(" my pay "), now),
            Some("my pay".into())
        );
        p.remember("acme", "c", "late", vec!["payroll".into()], now);
        let later = now + Duration::from_secs(61);
        assert_eq!(
            p.resolve("acme", "c", "payroll", None, Some("late"), later),
            None
        );
    }
}
