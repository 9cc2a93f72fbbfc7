//! Follow-ups of intent-routed work, as A2A SDK clients send them: after a
//! message to `mesh.acme.dmsc` returns a task, `tasks/get`, `tasks/cancel`
//! (`GetTask`, `CancelTask`) and a second message carrying its `taskId`
//! reach the agent that has the task, in both dialects and as the answer
//! streams; an unknown task id gets A2A's TaskNotFound (-32001). Intent
//! picks only agents that serve the request's binding. A reply in an
//! ask's task takes the question asked to the agent it names.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dmsc_node::demo::mesh::LocalMesh;
use dmsc_node::demo::sample_agent::{card, CardDialect, SampleConfig, SampleSkill};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};

use super::{eventually, header, loopback, mesh_of};

/// A small A2A agent that keeps tasks (the sample agent answers messages
/// only): a message without `taskId` makes a task `<name>-t<n>`; one with
/// an unknown `taskId`, and a task method for an unknown id, get -32001,
/// as the SDKs' servers answer ("Task ... does not exist").
struct TaskAgent {
    addr: SocketAddr,
    /// Texts of the messages received.
    texts: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TaskAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Default)]
struct Tasks {
    made: u32,
    /// id -> context
    known: std::collections::HashMap<String, String>,
}

/// Which bindings the agent's card declares.
#[derive(Clone, Copy, PartialEq)]
enum Binding {
    JsonRpc,
    HttpJson,
}

impl TaskAgent {
    async fn start(name: &str, words: &str, binding: Binding) -> TaskAgent {
        let listener = tokio::net::TcpListener::bind(loopback())
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let cfg = SampleConfig {
            name: name.to_string(),
            description: words.to_string(),
            skills: vec![SampleSkill {
                id: format!("{name}-skill"),
                name: name.to_string(),
                description: words.to_string(),
                tags: vec![name.to_string()],
                examples: vec![words.to_string()],
            }],
            delay: Duration::ZERO,
            dialect: CardDialect::V10,
        };
        let mut c = card(&cfg, addr);
        if binding == Binding::HttpJson {
            c["supportedInterfaces"][0]["protocolBinding"] = "HTTP+JSON".into();
        }
        let card = Bytes::from(c.to_string());
        let texts: Arc<Mutex<Vec<String>>> = Arc::default();
        let tasks: Arc<Mutex<Tasks>> = Arc::default();
        let (name, seen) = (name.to_string(), texts.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (card, name, seen, tasks) =
                    (card.clone(), name.clone(), seen.clone(), tasks.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (card, name, seen, tasks) =
                            (card.clone(), name.clone(), seen.clone(), tasks.clone());
                        async move {
                            Ok::<_, Infallible>(
                                answer(req, &card, &name, &seen, &tasks, binding).await,
                            )
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        TaskAgent { addr, texts, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn texts(&self) -> Vec<String> {
        self.texts.lock().expect("lock").clone()
    }
}

fn reply(ctype: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut()
        .insert("content-type", ctype.parse().expect("content type"));
    r
}

async fn answer(
    req: Request<Incoming>,
    card: &Bytes,
    name: &str,
    seen: &Mutex<Vec<String>>,
    tasks: &Mutex<Tasks>,
    binding: Binding,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    if path.starts_with("/.well-known/") {
        return reply("application/json", String::from_utf8_lossy(card).into());
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let v: Value = serde_json::from_slice(&body).unwrap_or_default();
    let rest = v.get("method").is_none();
    if rest != (binding == Binding::HttpJson) {
        let mut r = reply("text/plain", "Not Found".into());
        *r.status_mut() = StatusCode::NOT_FOUND;
        return r;
    }
    let method = v["method"].as_str().unwrap_or("SendMessage").to_string();
    let v10 = !method.contains('/');
    let rpc_id = v["id"].clone();
    let task_json = |id: &str, ctx: &str, state: &str| {
        let t = if v10 {
            json!({"id": id, "contextId": ctx, "status": {"state": format!("TASK_STATE_{}", state.to_uppercase())},
                   "history": [{"role": "ROLE_AGENT", "messageId": "a", "taskId": id, "contextId": ctx,
                                "parts": [{"text": format!("{name} has {id}")}]}]})
        } else {
            json!({"kind": "task", "id": id, "contextId": ctx, "status": {"state": state},
                   "history": [{"kind": "message", "role": "agent", "messageId": "a", "taskId": id,
                                "contextId": ctx, "parts": [{"kind": "text", "text": format!("{name} has {id}")}]}]})
        };
        t
    };
    let not_found = |id: &str| {
        json!({"jsonrpc": "2.0", "id": rpc_id, "error": {"code": -32001, "message": format!("Task {id} does not exist")}})
            .to_string()
    };
    let wrap = |result: Value| {
        if rest {
            result.to_string()
        } else {
            json!({"jsonrpc": "2.0", "id": rpc_id, "result": result}).to_string()
        }
    };
    match method.as_str() {
        "message/send" | "SendMessage" | "message/stream" | "SendStreamingMessage" => {
            let m = v
                .pointer("/params/message")
                .or_else(|| v.get("message"))
                .cloned()
                .unwrap_or_default();
            let text: Vec<&str> = m["parts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p["text"].as_str())
                .collect();
            seen.lock().expect("lock").push(text.join(" "));
            let (id, ctx) = match m["taskId"].as_str() {
                Some(id) => match tasks.lock().expect("lock").known.get(id) {
                    Some(ctx) => (id.to_string(), ctx.clone()),
                    None => return reply("application/json", not_found(id)),
                },
                None => {
                    let mut t = tasks.lock().expect("lock");
                    t.made += 1;
                    let id = format!("{name}-t{}", t.made);
                    let ctx = m["contextId"]
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| format!("{name}-c{}", t.made));
                    t.known.insert(id.clone(), ctx.clone());
                    (id, ctx)
                }
            };
            let task = task_json(&id, &ctx, "completed");
            if method.contains("tream") {
                let first = if v10 { json!({"task": task}) } else { task };
                let update = if v10 {
                    json!({"statusUpdate": {"taskId": id, "contextId": ctx, "status": {"state": "TASK_STATE_COMPLETED"}}})
                } else {
                    json!({"kind": "status-update", "taskId": id, "contextId": ctx, "status": {"state": "completed"}, "final": true})
                };
                let events = format!("data: {}\n\ndata: {}\n\n", wrap(first), wrap(update));
                return reply("text/event-stream", events);
            }
            let result = if v10 { json!({"task": task}) } else { task };
            reply("application/json", wrap(result))
        }
        "tasks/get" | "tasks/cancel" | "GetTask" | "CancelTask" => {
            let id = v["params"]["id"].as_str().unwrap_or_default().to_string();
            let ctx = tasks.lock().expect("lock").known.get(&id).cloned();
            match ctx {
                Some(ctx) => {
                    let state = if method.contains("ancel") {
                        "canceled"
                    } else {
                        "completed"
                    };
                    reply("application/json", wrap(task_json(&id, &ctx, state)))
                }
                None => reply("application/json", not_found(&id)),
            }
        }
        _ => reply(
            "application/json",
            json!({"jsonrpc": "2.0", "id": rpc_id, "error": {"code": -32601, "message": "Method not found"}})
                .to_string(),
        ),
    }
}

/// A message request's params, in one dialect.
type MakeMessage = fn(&str, Option<&str>) -> Value;

fn rpc(method: &str, params: Value) -> String {
    json!({"jsonrpc": "2.0", "id": "q", "method": method, "params": params}).to_string()
}

fn message03(text: &str, task: Option<&str>) -> Value {
    let mut m = json!({"kind": "message", "role": "user", "messageId": "m", "parts": [{"kind": "text", "text": text}]});
    if let Some(t) = task {
        m["taskId"] = t.into();
    }
    json!({ "message": m })
}

fn message10(text: &str, task: Option<&str>) -> Value {
    let mut m = json!({"role": "ROLE_USER", "messageId": "m", "parts": [{"text": text}]});
    if let Some(t) = task {
        m["taskId"] = t.into();
    }
    json!({ "message": m })
}

/// One call to `mesh.acme.dmsc` on node 0: status, `dmsc-agent`,
/// `dmsc-route`, the body as JSON (an SSE answer: its first event).
async fn to_mesh(
    mesh: &LocalMesh,
    path: &str,
    body: String,
) -> (StatusCode, String, String, Value) {
    let (resp, body) = mesh
        .call(0, "POST", "mesh.acme.dmsc", path, &[], body)
        .await
        .expect("call");
    let text = String::from_utf8_lossy(&body).to_string();
    let first = text
        .strip_prefix("data: ")
        .map(|s| s.split("\n\n").next().unwrap_or_default().to_string())
        .unwrap_or(text);
    let v = serde_json::from_str(&first).unwrap_or(Value::String(first));
    (
        resp.status(),
        header(&resp, "dmsc-agent"),
        header(&resp, "dmsc-route"),
        v,
    )
}

async fn two_agents() -> (LocalMesh, TaskAgent, TaskAgent) {
    let mesh = mesh_of(&["n0", "n1"], |_, _| {}).await;
    let payroll =
        TaskAgent::start("payroll", "salary paycheck payslip wages", Binding::JsonRpc).await;
    let travel = TaskAgent::start("travel", "flight hotel booking trip", Binding::JsonRpc).await;
    mesh.attach(0, &payroll.url(), None).await.expect("attach");
    mesh.attach(1, &travel.url(), None).await.expect("attach");
    eventually(Duration::from_secs(10), "both routable", || {
        mesh.routable_everywhere("payroll") && mesh.routable_everywhere("travel")
    })
    .await;
    (mesh, payroll, travel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_ups_of_an_intent_routed_task_reach_the_agent_that_has_it() {
    let (mesh, payroll, travel) = two_agents().await;
    // travel lives on the other node: follow-ups cross the overlay too
    for (v10, send, get, cancel) in [
        (false, "message/send", "tasks/get", "tasks/cancel"),
        (true, "SendMessage", "GetTask", "CancelTask"),
    ] {
        let msg = |text: &str, task: Option<&str>| {
            if v10 {
                message10(text, task)
            } else {
                message03(text, task)
            }
        };
        let (s, agent, _, v) = to_mesh(
            &mesh,
            "/",
            rpc(send, msg("travel: book a flight and hotel trip", None)),
        )
        .await;
        assert_eq!((s, agent.as_str()), (StatusCode::OK, "acme/travel"), "{v}");
        let task = if v10 {
            &v["result"]["task"]
        } else {
            &v["result"]
        };
        let id = task["id"].as_str().expect("task id").to_string();

        for method in [get, cancel] {
            let (s, agent, route, v) = to_mesh(&mesh, "/", rpc(method, json!({"id": id}))).await;
            assert_eq!(
                (s, agent.as_str()),
                (StatusCode::OK, "acme/travel"),
                "{method}: {v}"
            );
            assert!(
                route.starts_with(&format!("follow-up of task {id}")),
                "{route}"
            );
            assert_eq!(v["result"]["id"], id.as_str(), "{v}");
        }
        // A second message in the task, whose words would pick payroll.
        let (s, agent, route, v) = to_mesh(
            &mesh,
            "/",
            rpc(send, msg("and my payroll salary paycheck?", Some(&id))),
        )
        .await;
        assert_eq!(
            (s, agent.as_str()),
            (StatusCode::OK, "acme/travel"),
            "{route} {v}"
        );
        assert!(v.get("error").is_none(), "{v}");

        // An unknown task: A2A's TaskNotFound, in the request's dialect.
        let (s, _, _, v) = to_mesh(&mesh, "/", rpc(get, json!({"id": "nobody-made-this"}))).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["error"]["code"], -32001, "{v}");
        assert_eq!(v["id"], "q");
        let (_, _, _, v) = to_mesh(
            &mesh,
            "/",
            rpc(
                send,
                msg("payroll salary paycheck", Some("nobody-made-this")),
            ),
        )
        .await;
        assert_eq!(v["error"]["code"], -32001, "{v}");
    }
    // A streamed answer is read as it passes: its task is known after.
    let (s, agent, _, v) = to_mesh(
        &mesh,
        "/",
        rpc(
            "SendStreamingMessage",
            message10("payroll salary paycheck wages", None),
        ),
    )
    .await;
    assert_eq!((s, agent.as_str()), (StatusCode::OK, "acme/payroll"), "{v}");
    let id = v["result"]["task"]["id"].as_str().expect("id").to_string();
    let (_, agent, _, v) = to_mesh(&mesh, "/", rpc("GetTask", json!({"id": id}))).await;
    assert_eq!(agent, "acme/payroll", "{v}");
    // Only the first message of each task reached travel by its words.
    assert_eq!(travel.texts().len(), 4, "{:?}", travel.texts());
    assert!(payroll.texts().iter().all(|t| !t.contains("flight")));

    // Listing a conversation's tasks goes where the conversation is; a
    // listing of every task is not something the mesh can do (A2A's
    // UnsupportedOperationError), said in the request's binding.
    let context = v["result"]["contextId"]
        .as_str()
        .expect("context")
        .to_string();
    let (s, agent, route, v) =
        to_mesh(&mesh, "/", rpc("ListTasks", json!({"contextId": context}))).await;
    assert_eq!((s, agent.as_str()), (StatusCode::OK, "acme/payroll"), "{v}");
    assert!(route.starts_with("tasks of context"), "{route}");
    let (s, _, _, v) = to_mesh(&mesh, "/", rpc("ListTasks", json!({}))).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["error"]["code"], -32004, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("contextId"),
        "{v}"
    );
    let (resp, body) = mesh
        .call(
            0,
            "GET",
            "mesh.acme.dmsc",
            "/tasks?contextId=nobody",
            &[],
            String::new(),
        )
        .await
        .expect("call");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(header(&resp, "dmsc-error"), "unsupported");
    assert!(String::from_utf8_lossy(&body).contains("context `nobody` is not one"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_ups_are_the_callers_own() {
    let (mesh, _payroll, _travel) = two_agents().await;
    let (_, agent, _, v) = to_mesh(
        &mesh,
        "/",
        rpc("message/send", message03("travel flight hotel trip", None)),
    )
    .await;
    assert_eq!(agent, "acme/travel");
    let id = v["result"]["id"].as_str().expect("id").to_string();
    // node 1's caller did not route it (another node, another scope)
    let (resp, body) = mesh
        .call(
            1,
            "POST",
            "mesh.acme.dmsc",
            "/",
            &[],
            rpc("tasks/get", json!({"id": id})),
        )
        .await
        .expect("call");
    let v: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(v["error"]["code"], -32001, "{v}");
    // while the caller that did gets it
    let (_, agent, _, v) = to_mesh(&mesh, "/", rpc("tasks/get", json!({"id": id}))).await;
    assert_eq!(agent, "acme/travel", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intent_picks_only_agents_serving_the_requests_binding() {
    let mesh = mesh_of(&["n0"], |_, _| {}).await;
    // The words match the REST-only agent best.
    let rest = TaskAgent::start(
        "ledger",
        "ledger invoice accounts payable",
        Binding::HttpJson,
    )
    .await;
    let rpc_agent = TaskAgent::start("books", "invoice", Binding::JsonRpc).await;
    mesh.attach(0, &rest.url(), None).await.expect("attach");
    mesh.attach(0, &rpc_agent.url(), None)
        .await
        .expect("attach");
    eventually(Duration::from_secs(10), "both routable", || {
        mesh.routable_everywhere("ledger") && mesh.routable_everywhere("books")
    })
    .await;
    let text = "ledger invoice accounts payable";
    let (s, agent, route, v) = to_mesh(&mesh, "/", rpc("SendMessage", message10(text, None))).await;
    assert_eq!(
        (s, agent.as_str()),
        (StatusCode::OK, "acme/books"),
        "{route} {v}"
    );
    assert!(v.get("error").is_none(), "{v}");
    let (s, agent, route, v) =
        to_mesh(&mesh, "/message:send", message10(text, None).to_string()).await;
    assert_eq!(
        (s, agent.as_str()),
        (StatusCode::OK, "acme/ledger"),
        "{route} {v}"
    );
    assert!(v["task"]["id"].is_string(), "{v}");
    // An agent serves HTTP+JSON: the router's card offers that binding.
    let card = super::acme_router_card(&mesh, 0).await;
    assert_eq!(
        card["supportedInterfaces"][1]["protocolBinding"], "HTTP+JSON",
        "{card}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_in_an_asks_task_takes_the_question_to_the_chosen_agent() {
    let mesh = mesh_of(&["n0"], |_, raw| {
        raw.intent.mode = Some("ask".into());
    })
    .await;
    let payroll = TaskAgent::start("payroll", "pay questions", Binding::JsonRpc).await;
    let benefits = TaskAgent::start("benefits", "pay questions too", Binding::JsonRpc).await;
    mesh.attach(0, &payroll.url(), None).await.expect("attach");
    mesh.attach(0, &benefits.url(), None).await.expect("attach");
    eventually(Duration::from_secs(10), "both routable", || {
        mesh.routable_everywhere("payroll") && mesh.routable_everywhere("benefits")
    })
    .await;
    let asked = "pay questions about my stub";
    for v10 in [false, true] {
        let (send, msg): (&str, MakeMessage) = if v10 {
            ("SendMessage", message10)
        } else {
            ("message/send", message03)
        };
        let (_, _, _, v) = to_mesh(&mesh, "/", rpc(send, msg(asked, None))).await;
        let task = if v10 {
            &v["result"]["task"]
        } else {
            &v["result"]
        };
        let ask_task = task["id"].as_str().expect("ask task").to_string();
        assert!(ask_task.starts_with("dmsc-ask-"), "{v}");
        let names: Vec<String> = task["metadata"]["dmsc.candidates"]
            .as_array()
            .expect("candidates")
            .iter()
            .filter_map(|c| c["name"].as_str().map(str::to_string))
            .collect();
        // by number: the second offered
        let (s, agent, route, v) = to_mesh(&mesh, "/", rpc(send, msg("2", Some(&ask_task)))).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(agent, format!("acme/{}", names[1]), "{route} {v}");
        assert!(route.starts_with("answer to ask"), "{route}");
        assert!(v.get("error").is_none(), "{v}");
        // by name, any case
        let (_, agent, _, _) = to_mesh(
            &mesh,
            "/",
            rpc(send, msg(&names[0].to_uppercase(), Some(&ask_task))),
        )
        .await;
        assert_eq!(agent, format!("acme/{}", names[0]));
        // not a candidate: says how to choose
        let (_, _, _, v) =
            to_mesh(&mesh, "/", rpc(send, msg("the cheap one", Some(&ask_task)))).await;
        let m = v["error"]["message"].as_str().unwrap_or_default();
        assert!(m.contains(&names[0]) && m.contains(".acme.dmsc"), "{v}");
    }
    // Each agent got the question asked, never the bare reply.
    for t in payroll.texts().iter().chain(benefits.texts().iter()) {
        assert_eq!(t, asked);
    }
    assert_eq!(payroll.texts().len() + benefits.texts().len(), 4);
}
