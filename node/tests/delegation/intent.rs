//! Routing by intent: ask mode answers in the caller's dialect (A2A 0.3,
//! A2A 1.0, plain HTTP), an authenticated caller's choice is learned and
//! reaches another node by gossip, an operator removes it on every node;
//! with the model installed, a node routes a paraphrase by meaning and
//! says which scorer ran; a corrupt model directory is a startup error.

use std::time::Duration;

use dmsc_node::admin::status::admin_call;
use dmsc_node::demo::mesh::{message_send, send_message_v10, LocalMesh};
use dmsc_node::demo::sample_agent::{CardDialect, SampleAgent, SampleConfig, SampleSkill};
use hyper::{Method, StatusCode};

use super::security::{client_config, es256_key, jwt, tls_call, JWT_AUD};
use super::{eventually, header, loopback};

async fn skilled(name: &str, description: &str, tags: &[&str], examples: &[&str]) -> SampleAgent {
    SampleAgent::start(
        loopback(),
        SampleConfig {
            name: name.to_string(),
            description: description.to_string(),
            skills: vec![SampleSkill {
                id: format!("{name}-skill"),
                name: name.to_string(),
                description: description.to_string(),
                tags: tags.iter().map(|t| t.to_string()).collect(),
                examples: examples.iter().map(|t| t.to_string()).collect(),
            }],
            delay: Duration::ZERO,
            // both versions (a card of 1.0 that lists 0.3 too): the tests
            // here route requests of either by intent
            dialect: CardDialect::V10,
        },
    )
    .await
    .expect("sample agent")
}

async fn admin_json(
    m: &LocalMesh,
    i: usize,
    method: Method,
    path: &str,
) -> (u16, serde_json::Value) {
    let token = m.admin_token(i);
    let (status, body) = admin_call(
        m.nodes[i].bound().admin,
        method,
        path,
        Some(&token),
        bytes::Bytes::new(),
    )
    .await
    .expect("admin");
    (status, serde_json::from_str(&body).unwrap_or_default())
}

fn learned_of(v: &serde_json::Value, agent: &str) -> Vec<String> {
    v["learned"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["agent"] == agent)
        .flat_map(|e| e["examples"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t.as_str().map(str::to_string))
        .collect()
}

const TEXT: &str = "pay stub looks weird this month";

/// Routes `text` by intent through node 0: status, `dmsc-agent`, `dmsc-route`.
async fn route_intent(mesh: &LocalMesh, text: &str) -> (StatusCode, String, String) {
    let (resp, _) = mesh
        .call(
            0,
            "POST",
            "mesh.acme.dmsc",
            "/",
            &[("dmsc-intent", text)],
            "x",
        )
        .await
        .expect("call");
    // The route quotes the text, which may be any UTF-8.
    let route = resp
        .headers()
        .get("dmsc-route")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    (resp.status(), header(&resp, "dmsc-agent"), route)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ask_mode_in_every_dialect_and_learning_from_choices_across_two_nodes() {
    let jwks = tempfile::tempdir().expect("dir");
    let key = es256_key("k1");
    let jwks_path = jwks.path().join("jwks.json");
    std::fs::write(
        &jwks_path,
        serde_json::json!({ "keys": [key.jwk] }).to_string(),
    )
    .expect("jwks");
    let mesh = LocalMesh::start(&["n0", "n1"], "acme", |i, raw| {
        raw.gossip.interval_ms = Some(100);
        raw.delegation.health_interval_ms = Some(200);
        if i == 0 {
            super::security::jwt_ingress(raw, &jwks_path);
        }
    })
    .await
    .expect("mesh");
    // Two agents the words cannot tell apart for "pay ...".
    let payroll = skilled("payroll", "Answers pay questions", &["pay"], &["pay run"]).await;
    let benefits = skilled(
        "benefits",
        "Answers pay questions too",
        &["pay"],
        &["pay plan"],
    )
    .await;
    mesh.attach(0, &payroll.url(), None).await.expect("attach");
    mesh.attach(1, &benefits.url(), None).await.expect("attach");
    eventually(Duration::from_secs(10), "both routable everywhere", || {
        mesh.routable_everywhere("payroll") && mesh.routable_everywhere("benefits")
    })
    .await;
    let ask = [("dmsc-intent-mode", "ask")];

    // The router has a card, where an A2A client starts (both dialects'
    // URL fields name the router, not an agent).
    let card = super::acme_router_card(&mesh, 0).await;
    assert_eq!(card["url"], "http://mesh.acme.dmsc/", "{card}");
    assert_eq!(
        card["supportedInterfaces"][0]["url"], "http://mesh.acme.dmsc/",
        "{card}"
    );
    // No agent of this tenant serves HTTP+JSON: the card does not offer it.
    assert_eq!(
        card["supportedInterfaces"].as_array().map(Vec::len),
        Some(1),
        "{card}"
    );

    // A2A 0.3: a task in input-required listing both.
    let (resp, body) = mesh
        .call(0, "POST", "mesh.acme.dmsc", "/", &ask, message_send(TEXT))
        .await
        .expect("call");
    assert_eq!(resp.status(), StatusCode::OK);
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v["result"]["status"]["state"], "input-required", "{v}");
    let names: Vec<&str> = v["result"]["metadata"]["dmsc.candidates"]
        .as_array()
        .expect("candidates")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert!(
        names.contains(&"payroll") && names.contains(&"benefits"),
        "{v}"
    );
    let urls = v["result"]["status"]["message"]["parts"][1]["data"]["candidates"].to_string();
    assert!(urls.contains("http://benefits.acme.dmsc/"), "{urls}");
    assert!(!resp.headers()["dmsc-ask-id"].is_empty());

    // A2A 1.0 (on the other node): the protobuf-JSON shape.
    let (resp, body) = mesh
        .call(
            1,
            "POST",
            "mesh.acme.dmsc",
            "/",
            &ask,
            send_message_v10(TEXT),
        )
        .await
        .expect("call");
    assert_eq!(resp.status(), StatusCode::OK);
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v["id"], "r-1");
    assert_eq!(
        v["result"]["task"]["status"]["state"], "TASK_STATE_INPUT_REQUIRED",
        "{v}"
    );

    // Plain HTTP: 300 with the list.
    let (resp, body) = mesh
        .call(
            0,
            "POST",
            "mesh.acme.dmsc",
            "/",
            &[("dmsc-intent-mode", "ask"), ("dmsc-intent", TEXT)],
            "hello",
        )
        .await
        .expect("call");
    assert_eq!(resp.status(), StatusCode::MULTIPLE_CHOICES);
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v["candidates"].as_array().map(Vec::len), Some(2), "{v}");

    // Best mode (the default) still routes.
    let (resp, _) = mesh
        .call(0, "POST", "mesh.acme.dmsc", "/", &[], message_send(TEXT))
        .await
        .expect("call");
    assert_eq!(resp.status(), StatusCode::OK);

    // An anonymous caller (plain ingress) choosing teaches nothing.
    let (resp, _) = mesh
        .call(0, "POST", "mesh.acme.dmsc", "/", &ask, message_send(TEXT))
        .await
        .expect("call");
    let id = resp.headers()["dmsc-ask-id"]
        .to_str()
        .expect("id")
        .to_string();
    // Polling the ask's task: no state to get, said as A2A says it.
    let get = format!(
        r#"{{"jsonrpc":"2.0","id":7,"method":"tasks/get","params":{{"id":"dmsc-ask-{id}"}}}}"#
    );
    let (resp, body) = mesh
        .call(0, "POST", "mesh.acme.dmsc", "/", &[], get)
        .await
        .expect("call");
    let body = String::from_utf8_lossy(&body).to_string();
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["error"]["code"], -32004, "{body}");
    assert_eq!(v["id"], 7, "{body}");
    assert!(body.contains("this mesh's question"), "{body}");
    assert_eq!(resp.status(), StatusCode::OK);
    let (resp, _) = mesh
        .call(
            0,
            "POST",
            "benefits.acme.dmsc",
            "/",
            &[("dmsc-intent-choice", id.as_str())],
            message_send(TEXT),
        )
        .await
        .expect("call");
    assert_eq!(resp.status(), StatusCode::OK);
    let (_, v) = admin_json(&mesh, 0, Method::GET, "/v1/learned").await;
    assert!(learned_of(&v, "benefits").is_empty(), "{v}");

    // An authenticated caller asks, then calls its choice by name: learned.
    let tls = mesh.nodes[0].bound().ingress[1];
    let token = jwt(&key, "k1", super::security::claims("acme", JWT_AUD, 300));
    let bearer = format!("Bearer {token}");
    let cfg = || client_config(&mesh.ca.cert_pem, None);
    let (status, headers, body) = tls_call(
        tls,
        cfg(),
        "POST",
        "mesh.acme.dmsc",
        "/",
        &[("authorization", &bearer), ("dmsc-intent-mode", "ask")],
        message_send(TEXT),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let id = headers["dmsc-ask-id"].to_str().expect("id").to_string();
    let (status, _, body) = tls_call(
        tls,
        cfg(),
        "POST",
        "benefits.acme.dmsc",
        "/",
        &[("authorization", &bearer), ("dmsc-intent-choice", &id)],
        message_send(TEXT),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, v) = admin_json(&mesh, 0, Method::GET, "/v1/learned").await;
    assert_eq!(learned_of(&v, "benefits"), vec![TEXT.to_string()], "{v}");

    // Gossip takes it to node 1, whose ranking now uses it: no ask there.
    let mut learned_on_1 = false;
    for _ in 0..100 {
        let (_, v) = admin_json(&mesh, 1, Method::GET, "/v1/learned").await;
        if learned_of(&v, "benefits") == vec![TEXT.to_string()] {
            learned_on_1 = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(learned_on_1, "node 1 never saw the learned example");
    let (resp, body) = mesh
        .call(1, "POST", "mesh.acme.dmsc", "/", &ask, message_send(TEXT))
        .await
        .expect("call");
    assert_eq!(resp.status(), StatusCode::OK);
    let agent = resp.headers()["dmsc-agent"]
        .to_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        agent.contains("benefits"),
        "routed, not asked: {agent} {body:?}"
    );
    assert!(resp.headers().get("dmsc-ask-id").is_none(), "{agent}");

    // The operator removes it on node 1; node 0 forgets it too.
    let path = "/v1/learned/acme/benefits?text=pay+stub+looks+weird+this%20month";
    let (status, v) = admin_json(&mesh, 1, Method::DELETE, path).await;
    assert_eq!((status, v["removed"].as_u64()), (200, Some(1)), "{v}");
    let mut gone_on_0 = false;
    for _ in 0..100 {
        let (_, v) = admin_json(&mesh, 0, Method::GET, "/v1/learned").await;
        if learned_of(&v, "benefits").is_empty() {
            gone_on_0 = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone_on_0, "node 0 kept the removed example");
    let (status, _) = admin_json(&mesh, 1, Method::DELETE, path).await;
    assert_eq!(status, 404);
    drop((payroll, benefits, jwks));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_model_directory_is_a_startup_error_naming_the_file() {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("config.json"), "{ not json").expect("write");
    let bad = dir.path().to_path_buf();
    let err = LocalMesh::start(&["n0"], "acme", |_, raw| {
        raw.intent.model_dir = Some(bad.clone());
    })
    .await
    .expect_err("a corrupt model directory stops the node");
    let msg = format!("{err:#}");
    assert!(msg.contains("config.json"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_model_a_paraphrase_is_routed_by_meaning() {
    let Some(model) = dmsc_embed::model_for_tests() else {
        return;
    };
    routes_paraphrases_by_meaning(model).await;
}

/// The same with the larger model (an MPNet, 768 dimensions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mpnet_a_paraphrase_is_routed_by_meaning() {
    let Some(model) = dmsc_embed::model_for_tests_named(dmsc_embed::MPNET) else {
        return;
    };
    routes_paraphrases_by_meaning(model).await;
}

/// Two agents whose cards share no words, attached to node 1 and routable
/// everywhere.
async fn payroll_and_facilities(mesh: &LocalMesh) -> (SampleAgent, SampleAgent) {
    let payroll = skilled(
        "payroll",
        "Runs payroll: salaries, payslips, tax withholding.",
        &["payroll", "salary"],
        &["Why is my salary late?"],
    )
    .await;
    let facilities = skilled(
        "facilities",
        "Building maintenance: leaks, broken lights, heating, desks.",
        &["facilities", "maintenance"],
        &["The heating on floor 3 is off"],
    )
    .await;
    mesh.attach(1, &payroll.url(), None).await.expect("attach");
    mesh.attach(1, &facilities.url(), None)
        .await
        .expect("attach");
    eventually(Duration::from_secs(10), "routable", || {
        mesh.routable_everywhere("payroll") && mesh.routable_everywhere("facilities")
    })
    .await;
    (payroll, facilities)
}

async fn routes_paraphrases_by_meaning(model: std::path::PathBuf) {
    let mesh = LocalMesh::start(&["n0", "n1"], "acme", |i, raw| {
        raw.gossip.interval_ms = Some(100);
        raw.delegation.health_interval_ms = Some(200);
        if i == 0 {
            raw.intent.model_dir = Some(model.clone());
        }
    })
    .await
    .expect("mesh");
    let (payroll, facilities) = payroll_and_facilities(&mesh).await;
    // The cards are embedded in the background on the node with the model.
    eventually(Duration::from_secs(20), "cards embedded on n0", || {
        ["payroll", "facilities"].iter().all(|n| {
            let id = dmsc_registry::AgentId::new("acme", *n);
            mesh.nodes[0]
                .mesh()
                .read()
                .get(&id)
                .is_some_and(|e| e.has_vectors())
        })
    })
    .await;
    // No word of either card: only meaning can route it.
    let (status, agent, route) =
        route_intent(&mesh, "water is dripping from the ceiling onto my keyboard").await;
    assert_eq!(status, StatusCode::OK, "{route}");
    assert!(route.contains("hybrid"), "{route}");
    assert!(agent.contains("facilities"), "{agent}: {route}");
    assert!(
        route.contains("meaning 0."),
        "the raw scores are shown: {route}"
    );
    let (_, agent, route) =
        route_intent(&mesh, "my last paycheck was smaller than it should be").await;
    assert!(agent.contains("payroll"), "{agent}: {route}");
    // Letters that mean nothing share no word with any card and are near
    // nothing: no match, not a confident route to the nearest noise.
    for noise in ["qzxv plorbt", "qzxv plorbt wugga", "zzkq vrrp blen"] {
        let (status, agent, route) = route_intent(&mesh, noise).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{noise}: {agent} {route}");
    }
    // A long text is cut to the model's window, and the route says so.
    let long = "my paycheck is wrong ".repeat(2000);
    let (resp, _) = mesh
        .call(0, "POST", "mesh.acme.dmsc", "/", &[], message_send(&long))
        .await
        .expect("call");
    let route = resp.headers()["dmsc-route"]
        .to_str()
        .unwrap_or_default()
        .to_string();
    assert!(route.contains("truncated"), "{route}");
    // Odd text never breaks routing: other scripts, emoji, a NUL.
    for odd in [
        "🙂🙂🙂",
        "请帮我重置密码",
        "Wasser tropft von der Decke",
        "a\u{0}b",
    ] {
        let (resp, body) = mesh
            .call(0, "POST", "mesh.acme.dmsc", "/", &[], message_send(odd))
            .await
            .expect("call");
        let status = resp.status().as_u16();
        assert!(status == 200 || status == 404, "{odd:?}: {status} {body:?}");
    }
    // status says which scorer runs
    let (_, s0) = admin_json(&mesh, 0, Method::GET, "/v1/status").await;
    let (_, s1) = admin_json(&mesh, 1, Method::GET, "/v1/status").await;
    assert_eq!(s0["intent"]["scorer"], "hybrid", "{}", s0["intent"]);
    assert_eq!(s1["intent"]["scorer"], "lexical-only", "{}", s1["intent"]);
    drop((payroll, facilities));
}

/// A `dmsc-intent` header is free text: UTF-8 beyond ASCII is read as
/// such (it was taken for no header at all), lexical-only here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intent_header_in_utf8_is_read_as_text() {
    let mesh = LocalMesh::start(&["n0", "n1"], "acme", |_, raw| {
        raw.gossip.interval_ms = Some(100);
        raw.delegation.health_interval_ms = Some(200);
    })
    .await
    .expect("mesh");
    let (payroll, facilities) = payroll_and_facilities(&mesh).await;
    let text = "salaire 💶 — salary déjà late";
    let (status, agent, route) = route_intent(&mesh, text).await;
    assert_eq!(status, StatusCode::OK, "{route}");
    assert_eq!(agent, "acme/payroll", "{route}");
    assert!(route.contains(text), "the text as sent: {route}");
    assert!(route.contains("(best: BM25 "), "{route}");
    drop((payroll, facilities));
}

/// An intent request larger than the node holds whole (`max_buffered_body`)
/// is routed by the text in its first bytes, and reaches the agent whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_too_large_to_hold_is_routed_by_its_start() {
    let mesh = LocalMesh::start(&["n0", "n1"], "acme", |_, raw| {
        raw.gossip.interval_ms = Some(100);
        raw.delegation.max_buffered_body = Some(64 * 1024);
    })
    .await
    .expect("mesh");
    let (payroll, _facilities) = payroll_and_facilities(&mesh).await;
    // 256 KiB of text, four times the limit; the words that route it first.
    let text = format!("my salary payslip is wrong {}", "and more ".repeat(30_000));
    let body = message_send(&text);
    let len = body.len();
    assert!(len > 4 * 64 * 1024);
    for node in [0, 1] {
        let (resp, _) = mesh
            .call(node, "POST", "mesh.acme.dmsc", "/", &[], body.clone())
            .await
            .expect("call");
        let h = |n: &str| header(&resp, n);
        assert_eq!(
            resp.status(),
            StatusCode::OK,
            "node {node}: {}",
            h("dmsc-route")
        );
        assert!(
            h("dmsc-agent").contains("payroll"),
            "node {node}: {}",
            h("dmsc-route")
        );
        assert!(
            h("dmsc-route").contains("first 65536 bytes"),
            "node {node}: {}",
            h("dmsc-route")
        );
        let seen = payroll
            .state
            .last_headers()
            .and_then(|h| h.get("content-length").cloned())
            .and_then(|v| v.to_str().ok().and_then(|v| v.parse::<usize>().ok()));
        assert_eq!(
            seen,
            Some(len),
            "node {node}: the agent got the whole request"
        );
    }
    mesh.stop().await;
}

/// An A2A 1.0 agent whose card puts its JSON-RPC endpoint at
/// `/a2a/jsonrpc` and its HTTP+JSON one under `/a2a/rest` (as a2a-sdk's
/// `rpc_url` and `path_prefix` do); it answers only there, with the path it
/// was called at.
async fn agent_at_paths(
    name: &str,
    tags: &[&str],
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use http_body_util::{BodyExt as _, Full};
    let listener = tokio::net::TcpListener::bind(loopback())
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let card = serde_json::json!({
        "name": name, "description": "adds numbers", "version": "1.0.0",
        "capabilities": {}, "defaultInputModes": ["text/plain"], "defaultOutputModes": ["text/plain"],
        "supportedInterfaces": [
            {"url": format!("http://{addr}/a2a/jsonrpc"), "protocolBinding": "JSONRPC", "protocolVersion": "1.0"},
            {"url": format!("http://{addr}/a2a/rest"), "protocolBinding": "HTTP+JSON", "protocolVersion": "1.0"}
        ],
        "skills": [{"id": "math", "name": "math", "description": "adds numbers", "tags": tags}]
    })
    .to_string();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let card = card.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let card = card.clone();
                        async move {
                            let path = req.uri().path().to_string();
                            let _ = req.into_body().collect().await;
                            let (status, body) = match path.as_str() {
                            "/.well-known/agent-card.json" => (200, card),
                            "/a2a/jsonrpc" | "/a2a/rest/message:send" => (
                                200,
                                serde_json::json!({"jsonrpc": "2.0", "id": 1, "result": {"path": path}}).to_string(),
                            ),
                            _ => (404, String::new()),
                        };
                            let mut resp =
                                hyper::Response::new(Full::new(bytes::Bytes::from(body)));
                            *resp.status_mut() = StatusCode::from_u16(status).expect("status");
                            resp.headers_mut()
                                .insert("content-type", "application/json".parse().expect("hv"));
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

/// What a caller sent to the router (`mesh.<tenant>.dmsc`, whose
/// interfaces are at `/`) reaches the endpoint the picked agent's card
/// names for that binding; and only an agent that speaks the request's A2A
/// version is picked (an A2A 0.3 agent cannot answer `SendMessage`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intent_reaches_the_agents_own_endpoint_in_its_a2a_version() {
    let mesh = super::mesh_of(&["n0", "n1"], |_, _| {}).await;
    // The 0.3 agent (its card says 0.3 only) matches the words best.
    let old = SampleAgent::start(
        loopback(),
        SampleConfig {
            name: "oldmath".into(),
            description: "adds numbers, sums and totals".into(),
            skills: vec![SampleSkill {
                id: "oldmath-skill".into(),
                name: "oldmath".into(),
                description: "adds numbers, sums and totals".into(),
                tags: vec!["math".into(), "add".into(), "sum".into()],
                examples: vec!["add 2 and 3".into()],
            }],
            delay: Duration::ZERO,
            dialect: CardDialect::V03,
        },
    )
    .await
    .expect("sample agent");
    let (addr, server) = agent_at_paths("pathy", &["math"]).await;
    super::attach_routable(&mesh, 0, &old, "oldmath").await;
    super::attach_url_routable(&mesh, 0, &format!("http://{addr}"), "pathy").await;
    let v10 = send_message_v10("add 2 and 3 math sum");
    for node in [0, 1] {
        // A2A 1.0 JSON-RPC at the router's `/`: the 1.0 agent, at its path.
        let (resp, body) = mesh
            .call(
                node,
                "POST",
                "mesh.acme.dmsc",
                "/",
                &[("a2a-version", "1.0"), ("content-type", "application/json")],
                v10.clone(),
            )
            .await
            .expect("call");
        let body = String::from_utf8_lossy(&body).into_owned();
        assert_eq!(resp.status(), StatusCode::OK, "node {node}: {body}");
        assert_eq!(
            header(&resp, "dmsc-agent"),
            "acme/pathy",
            "node {node}: {body}"
        );
        assert!(
            body.contains("\"path\":\"/a2a/jsonrpc\""),
            "node {node}: {body}"
        );
        // The same in HTTP+JSON: under its REST endpoint.
        let rest = serde_json::json!({"message": {"role": "ROLE_USER", "messageId": "m1", "parts": [{"text": "add 2 and 3 math sum"}]}}).to_string();
        let (resp, body) = mesh
            .call(
                node,
                "POST",
                "mesh.acme.dmsc",
                "/message:send",
                &[("a2a-version", "1.0"), ("content-type", "application/json")],
                rest,
            )
            .await
            .expect("call");
        let body = String::from_utf8_lossy(&body).into_owned();
        assert_eq!(resp.status(), StatusCode::OK, "node {node}: {body}");
        assert!(
            body.contains("\"path\":\"/a2a/rest/message:send\""),
            "node {node}: {body}"
        );
        // A2A 0.3 `message/send`: the 0.3 agent, which matches best.
        let (resp, body) = mesh
            .call(
                node,
                "POST",
                "mesh.acme.dmsc",
                "/",
                &[("content-type", "application/json")],
                message_send("add 2 and 3 math sum"),
            )
            .await
            .expect("call");
        assert_eq!(
            resp.status(),
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(header(&resp, "dmsc-agent"), "acme/oldmath");
    }
    // Called by name, the path is the caller's (its card's URL says where).
    let (resp, body) = mesh
        .call(
            1,
            "POST",
            "pathy.acme.dmsc",
            "/a2a/jsonrpc",
            &[("a2a-version", "1.0")],
            v10,
        )
        .await
        .expect("call");
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&body)
    );
    server.abort();
    mesh.stop().await;
}
