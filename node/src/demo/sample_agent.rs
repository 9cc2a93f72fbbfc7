//! A small built-in A2A agent for the demo, the README and tests: it serves
//! an agent card (A2A 0.3 or 1.0 shape) and answers `message/send` /
//! `SendMessage` with a message naming itself, `message/stream` /
//! `SendStreamingMessage` with a few SSE events, and anything else with an
//! echo. Skills, delay and a failure switch are configurable, so tests can
//! make it slow or failing on demand.

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
}

impl SampleState {
    /// The headers of the last request answered (excluding card fetches).
    pub fn last_headers(&self) -> Option<hyper::HeaderMap> {
        self.last_headers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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
        CardDialect::V10 => {
            card["supportedInterfaces"] = json!([
                {"url": url, "protocolBinding": "JSONRPC", "protocolVersion": "1.0"}
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

/// Event `i` of the three a streamed answer has, as A2A wants a task's
/// stream (one Message per stream at most): the task, working; an
/// artifact; the final status, completed. Each carries its text.
fn stream_event(i: u32, text: &str, v10: bool) -> Value {
    const TASK: &str = "sample-task";
    const CONTEXT: &str = "sample-context";
    let message = |text: &str| {
        let mut m = reply_message(text, v10);
        if v10 {
            m["message"].take()
        } else {
            m["taskId"] = json!(TASK);
            m["contextId"] = json!(CONTEXT);
            m
        }
    };
    match (i, v10) {
        (0, false) => json!({"kind": "task", "id": TASK, "contextId": CONTEXT,
            "status": {"state": "working", "message": message(text)}}),
        (0, true) => json!({"task": {"id": TASK, "contextId": CONTEXT,
            "status": {"state": "TASK_STATE_WORKING", "message": message(text)}}}),
        (1, false) => json!({"kind": "artifact-update", "taskId": TASK, "contextId": CONTEXT,
            "artifact": {"artifactId": "a-1", "parts": [{"kind": "text", "text": text}]},
            "lastChunk": true}),
        (1, true) => json!({"artifactUpdate": {"taskId": TASK, "contextId": CONTEXT,
            "artifact": {"artifactId": "a-1", "parts": [{"text": text}]}, "lastChunk": true}}),
        (_, false) => json!({"kind": "status-update", "taskId": TASK, "contextId": CONTEXT,
            "status": {"state": "completed", "message": message(text)}, "final": true}),
        (_, true) => json!({"statusUpdate": {"taskId": TASK, "contextId": CONTEXT,
            "status": {"state": "TASK_STATE_COMPLETED", "message": message(text)}}}),
    }
}

async fn handle(
    req: Request<Incoming>,
    cfg: &SampleConfig,
    state: &SampleState,
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
        answer(&method, &body, cfg)
    };
    if let Ok(v) = hyper::header::HeaderValue::from_str(&cfg.name) {
        resp.headers_mut().insert("x-served-by", v);
    }
    resp
}

fn answer(method: &Method, body: &Bytes, cfg: &SampleConfig) -> Response<Body> {
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
            let r = json!({"jsonrpc": "2.0", "id": id, "result": reply_message(&said, v10)});
            let mut resp = Response::new(full(r.to_string()));
            resp.headers_mut().insert(
                "content-type",
                hyper::header::HeaderValue::from_static("application/json"),
            );
            resp
        }
        Some(m @ ("message/stream" | "SendStreamingMessage")) => {
            let v10 = m == "SendStreamingMessage";
            let name = cfg.name.clone();
            let events = futures_util::stream::unfold(0u32, move |i| {
                let id = id.clone();
                let name = name.clone();
                let text = text.clone();
                async move {
                    if i >= 3 {
                        return None;
                    }
                    if i > 0 {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    let said = format!("{name} part {}/3: {text}", i + 1);
                    let ev =
                        json!({"jsonrpc": "2.0", "id": id, "result": stream_event(i, &said, v10)});
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
        _ => {
            let mut resp = Response::new(full(body.clone()));
            if let Ok(v) = hyper::header::HeaderValue::from_str(method.as_str()) {
                resp.headers_mut().insert("x-echo-method", v);
            }
            resp
        }
    }
}
