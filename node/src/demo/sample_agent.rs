//! A small built-in A2A agent for the demo, the README and tests: it serves
//! an agent card (A2A 0.3 or 1.0 shape) and answers `message/send` /
//! `SendMessage` with a message naming itself, `message/stream` /
//! `SendStreamingMessage` with a few SSE events of a task of its own (a new
//! id each time, kept so that `tasks/get` / `GetTask`, `tasks/cancel` /
//! `CancelTask` and `ListTasks` find it, as an SDK client expects), other
//! JSON-RPC methods with Method not found, and anything else with an echo. Skills, delay and a failure switch are
//! configurable, so tests can make it slow or failing on demand.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::proto::http::{full, Body, BoxError};

/// One advertised skill.
#[derive(Debug, Clone, Default)]
pub struct SampleSkill {
    pub id: String,
    pub name: String,
    pub description: String,
    pub tags: Vec<String>,
    pub examples: Vec<String>,
}

impl SampleSkill {
    /// `id:description:tag1,tag2` (the CLI's `--skill` syntax).
    pub fn parse(spec: &str) -> Result<SampleSkill, String> {
        let mut it = spec.splitn(3, ':');
        let id = it.next().unwrap_or_default().trim().to_string();
        if id.is_empty() {
            return Err(format!("skill `{spec}`: expected id:description:tag1,tag2"));
        }
        let description = it.next().unwrap_or_default().trim().to_string();
        let tags = it
            .next()
            .unwrap_or_default()
            .split(',')
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect();
        Ok(SampleSkill {
            name: id.replace(['-', '_'], " "),
            id,
            description,
            tags,
            examples: Vec::new(),
        })
    }
}

/// A2A dialect of the card the sample agent serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CardDialect {
    V03,
    V10,
}

#[derive(Debug, Clone)]
pub struct SampleConfig {
    pub name: String,
    pub description: String,
    pub skills: Vec<SampleSkill>,
    /// Added before every answer.
    pub delay: Duration,
    pub dialect: CardDialect,
}

/// Switches and counters shared with a running sample agent.
#[derive(Debug, Default)]
pub struct SampleState {
    /// Answer every request with 500 while set.
    pub fail: AtomicBool,
    /// Requests answered (excluding card fetches).
    pub served: AtomicU64,
    /// Extra delay in ms (on top of the configured one).
    pub extra_delay_ms: AtomicU64,
    /// Requests that arrived carrying an `Authorization` header (the mesh
    /// consumes callers' bearer tokens; an agent should never see one).
    pub saw_authorization: AtomicU64,
    /// The headers of the last request answered (excluding card fetches),
    /// so a test can see what the mesh told the agent.
    pub last_headers: std::sync::Mutex<Option<hyper::HeaderMap>>,
    /// The tasks its streamed answers made (the latest [`MAX_TASKS`]).
    tasks: std::sync::Mutex<Tasks>,
}

/// How many tasks a sample agent remembers.
pub const MAX_TASKS: usize = 1000;

/// A task of a streamed answer, as `tasks/get` and `ListTasks` show it.
#[derive(Debug, Clone)]
struct SampleTask {
    id: String,
    context: String,
    /// What the stream said last.
    text: String,
    /// The text of its artifact (once the stream has sent it).
    artifact: Option<String>,
    done: bool,
}

/// The tasks a sample agent remembers, oldest first.
#[derive(Debug, Default)]
struct Tasks {
    order: VecDeque<String>,
    by_id: HashMap<String, SampleTask>,
}

impl Tasks {
    fn put(&mut self, task: SampleTask) {
        if !self.by_id.contains_key(&task.id) {
            self.order.push_back(task.id.clone());
            while self.order.len() > MAX_TASKS {
                if let Some(old) = self.order.pop_front() {
                    self.by_id.remove(&old);
                }
            }
        }
        self.by_id.insert(task.id.clone(), task);
    }
}

impl SampleState {
    /// The headers of the last request answered (excluding card fetches).
    pub fn last_headers(&self) -> Option<hyper::HeaderMap> {
        self.last_headers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn tasks(&self) -> std::sync::MutexGuard<'_, Tasks> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running sample agent; dropping it stops it (and closes its connections).
#[derive(Debug)]
pub struct SampleAgent {
    pub addr: SocketAddr,
    pub state: Arc<SampleState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SampleAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SampleAgent {
    pub async fn start(listen: SocketAddr, cfg: SampleConfig) -> std::io::Result<SampleAgent> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(SampleState::default());
        let ctx = Arc::new((cfg, state.clone(), addr));
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    Ok((stream, _)) = listener.accept() => {
                        let ctx = ctx.clone();
                        conns.spawn(async move {
                            let svc = hyper::service::service_fn(move |req| {
                                let ctx = ctx.clone();
                                async move { Ok::<_, Infallible>(handle(req, &ctx.0, &ctx.1, ctx.2).await) }
                            });
                            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                                .serve_connection(TokioIo::new(stream), svc)
                                .await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(SampleAgent { addr, state, task })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// The card this agent serves.
pub fn card(cfg: &SampleConfig, addr: SocketAddr) -> Value {
    let skills: Vec<Value> = cfg
        .skills
        .iter()
        .map(|s| {
            json!({
                "id": s.id, "name": s.name, "description": s.description,
                "tags": s.tags, "examples": s.examples,
                "inputModes": ["text/plain"], "outputModes": ["text/plain"],
            })
        })
        .collect();
    let url = format!("http://{addr}/");
    let mut card = json!({
        "name": cfg.name,
        "description": cfg.description,
        "version": "1.0.0",
        "provider": {"organization": "dmsc sample agents", "url": "https://example.invalid"},
        "capabilities": {"streaming": true},
        "defaultInputModes": ["text/plain"],
        "defaultOutputModes": ["text/plain"],
        "skills": skills,
    });
    match cfg.dialect {
        CardDialect::V03 => {
            card["protocolVersion"] = "0.3.0".into();
            card["url"] = url.into();
            card["preferredTransport"] = "JSONRPC".into();
        }
        // It answers both versions at one endpoint (as a2a-sdk 1.x does
        // with its 0.3 compatibility on), and says so.
        CardDialect::V10 => {
            card["supportedInterfaces"] = json!([
                {"url": url, "protocolBinding": "JSONRPC", "protocolVersion": "1.0"},
                {"url": url, "protocolBinding": "JSONRPC", "protocolVersion": "0.3"}
            ]);
        }
    }
    card
}

fn reply_message(text: &str, v10: bool) -> Value {
    if v10 {
        json!({"message": {"role": "ROLE_AGENT", "messageId": format!("m-{:x}", rand::random::<u64>()), "parts": [{"text": text}]}})
    } else {
        json!({"kind": "message", "role": "agent", "messageId": format!("m-{:x}", rand::random::<u64>()), "parts": [{"kind": "text", "text": text}]})
    }
}

/// A task in the request's dialect: working, or completed with its one
/// artifact.
fn task_json(t: &SampleTask, v10: bool) -> Value {
    let message = agent_message(&t.text, v10, t);
    let artifact = t.artifact.as_deref().unwrap_or_default();
    let parts = if v10 {
        json!([{"text": artifact}])
    } else {
        json!([{"kind": "text", "text": artifact}])
    };
    let state = match (t.done, v10) {
        (false, false) => "working",
        (true, false) => "completed",
        (false, true) => "TASK_STATE_WORKING",
        (true, true) => "TASK_STATE_COMPLETED",
    };
    let mut task = json!({"id": t.id, "contextId": t.context,
        "status": {"state": state, "message": message}});
    if t.artifact.is_some() {
        task["artifacts"] = json!([{"artifactId": "a-1", "parts": parts}]);
    }
    if !v10 {
        task["kind"] = json!("task");
    }
    task
}

/// The agent's message within task `t`.
fn agent_message(text: &str, v10: bool, t: &SampleTask) -> Value {
    let mut m = reply_message(text, v10);
    let mut m = if v10 { m["message"].take() } else { m };
    m["taskId"] = json!(t.id);
    m["contextId"] = json!(t.context);
    m
}

/// Event `i` of the three a streamed answer has, as A2A wants a task's
/// stream (one Message per stream at most): the task, working; an
/// artifact; the final status, completed. Each carries its text.
fn stream_event(i: u32, t: &SampleTask, v10: bool) -> Value {
    let (id, context, text) = (&t.id, &t.context, &t.text);
    match (i, v10) {
        (0, false) => task_json(t, false),
        (0, true) => json!({"task": task_json(t, true)}),
        (1, false) => json!({"kind": "artifact-update", "taskId": id, "contextId": context,
            "artifact": {"artifactId": "a-1", "parts": [{"kind": "text", "text": text}]},
            "lastChunk": true}),
        (1, true) => json!({"artifactUpdate": {"taskId": id, "contextId": context,
            "artifact": {"artifactId": "a-1", "parts": [{"text": text}]}, "lastChunk": true}}),
        (_, false) => json!({"kind": "status-update", "taskId": id, "contextId": context,
            "status": {"state": "completed", "message": agent_message(text, false, t)}, "final": true}),
        (_, true) => json!({"statusUpdate": {"taskId": id, "contextId": context,
            "status": {"state": "TASK_STATE_COMPLETED", "message": agent_message(text, true, t)}}}),
    }
}

async fn handle(
    req: Request<Incoming>,
    cfg: &SampleConfig,
    state: &Arc<SampleState>,
    addr: SocketAddr,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    if req.headers().contains_key(hyper::header::AUTHORIZATION) {
        state
            .saw_authorization
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    if req.method() == Method::GET && crate::forward::local::CARD_PATHS.contains(&path.as_str()) {
        let mut r = Response::new(full(card(cfg, addr).to_string()));
        r.headers_mut().insert(
            "content-type",
            hyper::header::HeaderValue::from_static("application/json"),
        );
        return r;
    }
    let method = req.method().clone();
    *state.last_headers.lock().unwrap_or_else(|p| p.into_inner()) = Some(req.headers().clone());
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let delay = cfg.delay + Duration::from_millis(state.extra_delay_ms.load(Ordering::Relaxed));
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    state.served.fetch_add(1, Ordering::Relaxed);
    let mut resp = if state.fail.load(Ordering::Relaxed) {
        let mut r = Response::new(full(format!("{} is failing on purpose\n", cfg.name)));
        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        r
    } else {
        answer(&method, &body, cfg, state)
    };
    if let Ok(v) = hyper::header::HeaderValue::from_str(&cfg.name) {
        resp.headers_mut().insert("x-served-by", v);
    }
    resp
}

/// A JSON-RPC answer: `result`, or `error` when it is `Err((code, message))`.
fn rpc_answer(id: Value, result: Result<Value, (i64, &str)>) -> Response<Body> {
    let r = match result {
        Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
        Err((code, message)) => {
            json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
        }
    };
    let mut resp = Response::new(full(r.to_string()));
    resp.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// A2A's JSON-RPC error codes (the same in 0.3 and 1.0).
const TASK_NOT_FOUND: (i64, &str) = (-32001, "Task not found");
const TASK_NOT_CANCELABLE: (i64, &str) = (-32002, "Task cannot be canceled");
const NO_TASK_ID: (i64, &str) = (-32602, "Invalid params: `params.id` names no task");
const METHOD_NOT_FOUND: (i64, &str) = (-32601, "Method not found");

/// The conversation a request's message continues (its `contextId`), or a
/// new one.
fn context_of(rpc: Option<&Value>) -> String {
    rpc.and_then(|v| v.pointer("/params/message/contextId"))
        .and_then(Value::as_str)
        .map_or_else(
            || format!("ctx-{:x}", rand::random::<u64>()),
            str::to_string,
        )
}

fn answer(
    method: &Method,
    body: &Bytes,
    cfg: &SampleConfig,
    state: &Arc<SampleState>,
) -> Response<Body> {
    let rpc: Option<Value> = serde_json::from_slice(body).ok();
    let rpc_method = rpc
        .as_ref()
        .and_then(|v| v.get("method"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let id = rpc
        .as_ref()
        .and_then(|v| v.get("id").cloned())
        .unwrap_or(Value::Null);
    let text = crate::proto::a2a::intent_text(body).unwrap_or_default();
    let said = format!("{} handled: {text}", cfg.name);
    match rpc_method.as_deref() {
        Some(m @ ("message/send" | "SendMessage")) => {
            let v10 = m == "SendMessage";
            let mut reply = reply_message(&said, v10);
            let message = if v10 {
                &mut reply["message"]
            } else {
                &mut reply
            };
            message["contextId"] = json!(context_of(rpc.as_ref()));
            rpc_answer(id, Ok(reply))
        }
        Some(m @ ("tasks/get" | "GetTask" | "tasks/cancel" | "CancelTask")) => {
            let v10 = m.starts_with(char::is_uppercase);
            let asked = rpc
                .as_ref()
                .and_then(|v| v.pointer("/params/id"))
                .and_then(Value::as_str);
            let found = asked.and_then(|t| state.tasks().by_id.get(t).cloned());
            let result = match (found, matches!(m, "tasks/cancel" | "CancelTask")) {
                _ if asked.is_none() => Err(NO_TASK_ID),
                (None, _) => Err(TASK_NOT_FOUND),
                // Every task here is done, or about to be in 200 ms.
                (Some(_), true) => Err(TASK_NOT_CANCELABLE),
                (Some(t), false) => Ok(task_json(&t, v10)),
            };
            rpc_answer(id, result)
        }
        Some("ListTasks") => {
            let params = rpc.as_ref().and_then(|v| v.get("params"));
            let context = params
                .and_then(|p| p.get("contextId"))
                .and_then(Value::as_str);
            let size = params
                .and_then(|p| p.get("pageSize"))
                .and_then(Value::as_u64)
                .unwrap_or(50)
                .clamp(1, 100) as usize;
            // The page token is how many tasks the pages before skipped.
            let skip = params
                .and_then(|p| p.get("pageToken"))
                .and_then(Value::as_str)
                .and_then(|t| t.parse::<usize>().ok())
                .unwrap_or(0);
            let tasks = state.tasks();
            let matching: Vec<&SampleTask> = tasks
                .order
                .iter()
                .rev()
                .filter_map(|t| tasks.by_id.get(t))
                .filter(|t| context.is_none_or(|c| c == t.context))
                .collect();
            let page: Vec<Value> = matching
                .iter()
                .skip(skip)
                .take(size)
                .map(|t| task_json(t, true))
                .collect();
            let next = if skip + size < matching.len() {
                (skip + size).to_string()
            } else {
                String::new()
            };
            let result = json!({"tasks": page, "nextPageToken": next, "pageSize": size,
                "totalSize": matching.len()});
            rpc_answer(id, Ok(result))
        }
        Some(m @ ("message/stream" | "SendStreamingMessage")) => {
            let v10 = m == "SendStreamingMessage";
            let name = cfg.name.clone();
            let context = rpc
                .as_ref()
                .and_then(|v| v.pointer("/params/message/contextId"))
                .and_then(Value::as_str)
                .map_or_else(
                    || format!("ctx-{:x}", rand::random::<u64>()),
                    str::to_string,
                );
            let mut task = SampleTask {
                id: format!("task-{:x}", rand::random::<u64>()),
                context,
                text: String::new(),
                artifact: None,
                done: false,
            };
            let state = state.clone();
            let events = futures_util::stream::unfold(0u32, move |i| {
                let id = id.clone();
                let said = format!("{name} part {}/3: {text}", i + 1);
                if i == 1 {
                    task.artifact = Some(said.clone());
                }
                task.text = said;
                task.done = i >= 2;
                let task = task.clone();
                let state = state.clone();
                async move {
                    if i >= 3 {
                        return None;
                    }
                    if i > 0 {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    state.tasks().put(task.clone());
                    let ev =
                        json!({"jsonrpc": "2.0", "id": id, "result": stream_event(i, &task, v10)});
                    let frame = Frame::data(Bytes::from(format!("data: {ev}\n\n")));
                    Some((Ok::<_, BoxError>(frame), i + 1))
                }
            });
            let mut resp = Response::new(http_body_util::StreamBody::new(events).boxed());
            resp.headers_mut().insert(
                "content-type",
                hyper::header::HeaderValue::from_static("text/event-stream"),
            );
            resp
        }
        // Any other JSON-RPC request: A2A methods this agent does not
        // serve (resubscribe, push configs, ...) get JSON-RPC's own error,
        // which SDK clients read; an echo would be no JSON-RPC answer.
        Some(_) if rpc.as_ref().is_some_and(|v| v["jsonrpc"] == "2.0") => {
            rpc_answer(id, Err(METHOD_NOT_FOUND))
        }
        _ => {
            let mut resp = Response::new(full(body.clone()));
            if let Ok(v) = hyper::header::HeaderValue::from_str(method.as_str()) {
                resp.headers_mut().insert("x-echo-method", v);
            }
            resp
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn call(agent: &SampleAgent, rpc: Value) -> String {
        let client = crate::forward::client::Upstream::new().h1;
        let req = Request::post(agent.url())
            .header("content-type", "application/json")
            .body(full(rpc.to_string()))
            .expect("request");
        let resp = client.request(req).await.expect("answer");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8(body.to_vec()).expect("utf-8")
    }

    async fn call_json(agent: &SampleAgent, rpc: Value) -> Value {
        serde_json::from_str(&call(agent, rpc).await).expect("a JSON answer")
    }

    fn rpc(method: &str, params: Value) -> Value {
        json!({"jsonrpc": "2.0", "id": 7, "method": method, "params": params})
    }

    /// The task id of a streamed answer's first event.
    fn streamed_task(sse: &str, v10: bool) -> (String, String) {
        let first = sse.lines().next().expect("an event");
        let ev: Value =
            serde_json::from_str(first.strip_prefix("data: ").expect("data")).expect("json");
        let task = if v10 {
            &ev["result"]["task"]
        } else {
            &ev["result"]
        };
        (
            task["id"].as_str().expect("id").to_string(),
            task["contextId"].as_str().expect("context").to_string(),
        )
    }

    #[tokio::test]
    async fn streamed_tasks_can_be_fetched_listed_and_not_cancelled_in_both_dialects() {
        for (v10, stream, get, cancel) in [
            (false, "message/stream", "tasks/get", "tasks/cancel"),
            (true, "SendStreamingMessage", "GetTask", "CancelTask"),
        ] {
            let cfg = SampleConfig {
                name: "s".into(),
                description: "sample".into(),
                skills: Vec::new(),
                delay: Duration::ZERO,
                dialect: if v10 {
                    CardDialect::V10
                } else {
                    CardDialect::V03
                },
            };
            let agent = SampleAgent::start(([127, 0, 0, 1], 0).into(), cfg)
                .await
                .expect("start");
            let message = json!({"message": {"role": "user", "messageId": "m1",
                "contextId": "c-1", "parts": [{"kind": "text", "text": "hi"}]}});
            let (first, context) =
                streamed_task(&call(&agent, rpc(stream, message.clone())).await, v10);
            let (second, _) = streamed_task(&call(&agent, rpc(stream, message)).await, v10);
            assert_ne!(first, second, "every stream is a task of its own");
            assert_eq!(context, "c-1", "the caller's context is kept");

            let got = call_json(&agent, rpc(get, json!({"id": first}))).await;
            assert_eq!(got["id"], 7);
            assert_eq!(got["result"]["id"], first.as_str());
            let done = if v10 {
                "TASK_STATE_COMPLETED"
            } else {
                "completed"
            };
            assert_eq!(got["result"]["status"]["state"], done, "{got}");
            let text = &got["result"]["artifacts"][0]["parts"][0]["text"];
            assert_eq!(text, "s part 2/3: hi", "the streamed artifact: {got}");

            let none = call_json(&agent, rpc(get, json!({"id": "nope"}))).await;
            let no_id = call_json(&agent, rpc(get, json!({}))).await;
            assert_eq!(no_id["error"]["code"], -32602, "{no_id}");
            let other = call_json(&agent, rpc("tasks/resubscribe", json!({"id": first}))).await;
            assert_eq!(other["error"]["code"], -32601, "{other}");
            assert_eq!(none["error"]["code"], -32001, "{none}");
            let cancel = call_json(&agent, rpc(cancel, json!({"id": first}))).await;
            assert_eq!(cancel["error"]["code"], -32002, "{cancel}");

            if v10 {
                let list = call_json(
                    &agent,
                    rpc("ListTasks", json!({"contextId": "c-1", "pageSize": 1})),
                )
                .await;
                assert_eq!(list["result"]["totalSize"], 2, "{list}");
                assert_eq!(
                    list["result"]["tasks"][0]["id"],
                    second.as_str(),
                    "newest first"
                );
                assert_eq!(list["result"]["tasks"].as_array().map(Vec::len), Some(1));
            }
        }
    }
}
