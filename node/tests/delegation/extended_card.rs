//! The authenticated ("extended") agent card through the mesh
//! (docs/delegation.md, "Forwarding"): an agent serves it in each of the
//! five ways the A2A SDKs ask for it (JSON-RPC `agent/getAuthenticatedExtendedCard`
//! and `GetExtendedAgentCard`; REST `GET /v1/card`,
//! `/agent/authenticatedExtendedCard`, `/extendedAgentCard`), with its real
//! address in every URL. Called by name from its home node and across the
//! overlay, no answer may carry that address: the card's URLs are the mesh
//! address, the JSON-RPC envelope and `id` are kept. A JSON-RPC error or an
//! error status is no card and passes through byte for byte; a card too
//! large to rewrite is refused in the request's dialect, never passed on.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use dmsc_node::demo::mesh::LocalMesh;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::{eventually, header, mesh_of};

const MESH: &str = "http://ext.acme.dmsc";

/// An A2A 0.3 card of the agent at `addr` (every URL at the agent).
fn card_v03(addr: SocketAddr, name: &str) -> Value {
    json!({
        "name": name,
        "description": "serves an extended card",
        "version": "1",
        "protocolVersion": "0.3.0",
        "url": format!("http://{addr}/"),
        "preferredTransport": "JSONRPC",
        "additionalInterfaces": [
            {"url": format!("http://{addr}/"), "transport": "JSONRPC"},
            {"url": format!("http://{addr}/rest"), "transport": "HTTP+JSON"}
        ],
        "documentationUrl": format!("http://{addr}/docs"),
        "supportsAuthenticatedExtendedCard": true,
        "capabilities": {"streaming": false},
        "defaultInputModes": ["text/plain"],
        "defaultOutputModes": ["text/plain"],
        "skills": [{"id": "ext", "name": "ext", "tags": ["ext"]}],
        "signatures": [{"protected": "eyJhbGciOiJFUzI1NiJ9", "signature": "c2ln"}]
    })
}

/// An A2A 1.0 card of the agent at `addr`.
fn card_v10(addr: SocketAddr) -> Value {
    json!({
        "name": "ext",
        "description": "extended, 1.0",
        "version": "1",
        "supportedInterfaces": [
            {"url": format!("http://{addr}/"), "protocolBinding": "JSONRPC", "protocolVersion": "1.0"},
            {"url": format!("http://{addr}/v1"), "protocolBinding": "HTTP+JSON", "protocolVersion": "1.0"}
        ],
        "capabilities": {"extendedAgentCard": true},
        "securitySchemes": {"oidc": {"openIdConnectSecurityScheme": {"openIdConnectUrl": format!("http://{addr}/.well-known/openid-configuration")}}},
        "skills": [{"id": "ext", "name": "ext", "tags": ["ext"]}, {"id": "secret", "name": "for members", "tags": ["private"]}]
    })
}

/// The JSON-RPC error an agent without an extended card answers.
fn not_configured(id: &Value) -> String {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32007, "message": "Authenticated Extended Card is not configured"}}).to_string()
}

struct ExtAgent {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for ExtAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn json_response(status: u16, body: String) -> hyper::Response<Full<Bytes>> {
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("response")
}

async fn answer(
    addr: SocketAddr,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let body = req.into_body().collect().await.expect("body").to_bytes();
    match (method.as_str(), path.as_str()) {
        ("GET", "/.well-known/agent-card.json") => {
            json_response(200, card_v03(addr, "ext").to_string())
        }
        ("GET", "/v1/card") | ("GET", "/agent/authenticatedExtendedCard") => {
            json_response(200, card_v03(addr, "ext").to_string())
        }
        ("GET", "/extendedAgentCard") | ("GET", "/acme/extendedAgentCard") => {
            json_response(200, card_v10(addr).to_string())
        }
        ("GET", "/missing/extendedAgentCard") => json_response(
            404,
            json!({"error": "no extended card", "see": format!("http://{addr}/docs")}).to_string(),
        ),
        ("POST", _) => {
            let rpc: Value = serde_json::from_slice(&body).expect("json-rpc");
            let id = rpc["id"].clone();
            let result = match rpc["method"].as_str() {
                _ if rpc["params"]["fail"] == true => {
                    return json_response(200, not_configured(&id))
                }
                Some("agent/getAuthenticatedExtendedCard") => {
                    let mut card = card_v03(addr, "ext");
                    if rpc["params"]["big"] == true {
                        card["description"] = json!("x".repeat(1 << 20));
                    }
                    card
                }
                Some("GetExtendedAgentCard") => card_v10(addr),
                _ => json!({"echo": format!("http://{addr}/not-a-card")}),
            };
            json_response(
                200,
                json!({"jsonrpc": "2.0", "id": id, "result": result}).to_string(),
            )
        }
        _ => json_response(404, "{}".into()),
    }
}

async fn ext_agent() -> ExtAgent {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| async move {
                    Ok::<_, Infallible>(answer(addr, req).await)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    ExtAgent { addr, task }
}

async fn setup() -> (LocalMesh, ExtAgent) {
    let mesh = mesh_of(&["n0", "n1"], |_, _| {}).await;
    let agent = ext_agent().await;
    mesh.attach(0, &format!("http://{}/", agent.addr), None)
        .await
        .expect("attach");
    eventually(Duration::from_secs(5), "routable", || {
        mesh.routable_everywhere("ext")
    })
    .await;
    (mesh, agent)
}

/// Every URL a card (either dialect) declares as an endpoint.
fn endpoint_urls(card: &Value) -> Vec<String> {
    let mut out: Vec<String> = card["url"]
        .as_str()
        .map(str::to_string)
        .into_iter()
        .collect();
    for key in ["additionalInterfaces", "supportedInterfaces"] {
        for i in card[key].as_array().into_iter().flatten() {
            out.extend(i["url"].as_str().map(str::to_string));
        }
    }
    out
}

/// A rewritten card came back whole: 200, its length right, and nowhere in
/// it the agent's real address `real`.
fn card_answer(resp: &hyper::Response<()>, body: &[u8], real: &str, what: &str) {
    let text = String::from_utf8_lossy(body);
    assert_eq!(resp.status(), 200, "{what}: {text}");
    assert!(!text.contains(real), "{what}: address leaked: {text}");
    assert_eq!(
        header(resp, "content-length"),
        body.len().to_string(),
        "{what}"
    );
}

fn assert_rewritten(card: &Value, what: &str) {
    let urls = endpoint_urls(card);
    assert!(urls.len() >= 2, "{what}: {card}");
    for u in urls {
        assert!(
            u.starts_with(MESH),
            "{what}: `{u}` is not the mesh address: {card}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_cards_are_rewritten_in_every_form_from_both_nodes() {
    let (mesh, agent) = setup().await;
    let real = agent.addr.to_string();
    let json_headers = [("content-type", "application/json")];
    for node in [0, 1] {
        // JSON-RPC, both dialects; the id (a string, a number) echoed.
        for (method, id) in [
            ("agent/getAuthenticatedExtendedCard", json!("req-1")),
            ("GetExtendedAgentCard", json!(42)),
        ] {
            let req = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": {}});
            let (resp, body) = mesh
                .call(
                    node,
                    "POST",
                    "ext.acme.dmsc",
                    "/",
                    &json_headers,
                    req.to_string(),
                )
                .await
                .expect("call");
            let what = format!("{method} via n{node}");
            card_answer(&resp, &body, &real, &what);
            let v: Value = serde_json::from_slice(&body).expect("json");
            assert_eq!(v["jsonrpc"], "2.0", "{what}: {v}");
            assert_eq!(v["id"], id, "{what}: {v}");
            assert_rewritten(&v["result"], &what);
        }
        // The 0.3 card keeps its other URLs rewritten and its signatures
        // as they were (they no longer verify; docs say so).
        let req =
            json!({"jsonrpc": "2.0", "id": 7, "method": "agent/getAuthenticatedExtendedCard"});
        let (_, body) = mesh
            .call(
                node,
                "POST",
                "ext.acme.dmsc",
                "/",
                &json_headers,
                req.to_string(),
            )
            .await
            .expect("call");
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["result"]["documentationUrl"], format!("{MESH}/docs"));
        assert_eq!(
            v["result"]["signatures"],
            card_v03(agent.addr, "ext")["signatures"]
        );

        // REST, both dialects, and the 1.0 tenant form.
        for path in [
            "/v1/card",
            "/agent/authenticatedExtendedCard",
            "/extendedAgentCard",
            "/acme/extendedAgentCard",
        ] {
            let (resp, body) = mesh
                .call(
                    node,
                    "GET",
                    "ext.acme.dmsc",
                    path,
                    &[("accept-encoding", "gzip")],
                    "",
                )
                .await
                .expect("call");
            let what = format!("GET {path} via n{node}");
            card_answer(&resp, &body, &real, &what);
            let card: Value = serde_json::from_slice(&body).expect("json");
            assert_rewritten(&card, &what);
        }
        let (_, body) = mesh
            .call(node, "GET", "ext.acme.dmsc", "/extendedAgentCard", &[], "")
            .await
            .expect("call");
        let card: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(
            card["securitySchemes"]["oidc"]["openIdConnectSecurityScheme"]["openIdConnectUrl"],
            format!("{MESH}/.well-known/openid-configuration")
        );
    }
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_not_a_card_passes_and_a_card_too_large_is_refused() {
    let (mesh, agent) = setup().await;
    let real = agent.addr.to_string();
    let json_headers = [("content-type", "application/json")];
    for node in [0, 1] {
        // A JSON-RPC error to a card request: unchanged, byte for byte.
        let req = json!({"jsonrpc": "2.0", "id": "e-1", "method": "GetExtendedAgentCard", "params": {"fail": true}});
        let (resp, body) = mesh
            .call(
                node,
                "POST",
                "ext.acme.dmsc",
                "/",
                &json_headers,
                req.to_string(),
            )
            .await
            .expect("call");
        assert_eq!(resp.status(), 200);
        assert_eq!(&body[..], not_configured(&json!("e-1")).as_bytes());

        // An error status on a card path: unchanged.
        let (resp, body) = mesh
            .call(
                node,
                "GET",
                "ext.acme.dmsc",
                "/missing/extendedAgentCard",
                &[],
                "",
            )
            .await
            .expect("call");
        assert_eq!(resp.status(), 404);
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["error"], "no extended card");

        // Other methods are not looked at.
        let req = json!({"jsonrpc": "2.0", "id": 3, "method": "tasks/get", "params": {"id": "t"}});
        let (resp, body) = mesh
            .call(
                node,
                "POST",
                "ext.acme.dmsc",
                "/",
                &json_headers,
                req.to_string(),
            )
            .await
            .expect("call");
        assert_eq!(resp.status(), 200);
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["result"]["echo"], format!("http://{real}/not-a-card"));

        // A card over the limit: refused as a JSON-RPC error, id echoed,
        // nothing of it passed on.
        let req = json!({"jsonrpc": "2.0", "id": "big", "method": "agent/getAuthenticatedExtendedCard", "params": {"big": true}});
        let (resp, body) = mesh
            .call(
                node,
                "POST",
                "ext.acme.dmsc",
                "/",
                &json_headers,
                req.to_string(),
            )
            .await
            .expect("call");
        let text = String::from_utf8_lossy(&body);
        let head: String = text.chars().take(300).collect();
        // A JSON-RPC error, over 200 (what the A2A SDKs read).
        assert_eq!(resp.status(), 200, "{head}");
        assert_eq!(
            resp.headers().get("dmsc-error").map(|v| v.as_bytes()),
            Some(&b"unreachable"[..]),
            "{head}"
        );
        assert!(!text.contains(&real), "address leaked: {head}");
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["id"], "big", "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("extended agent card"),
            "{v}"
        );
    }
    mesh.stop().await;
}

/// An agent mounted under a path, whose card (a2a-sdk's sample shape) also
/// lists gRPC on a port of its own: the card the mesh serves names the mesh
/// address without the path (the node adds it to every call), leaves out
/// the gRPC port it cannot reach, and a gRPC call for the card is refused
/// before it reaches the agent (its protobuf answer is not rewritten); the
/// agent's redirects name the mesh address too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_card_is_served_as_the_mesh_can_reach_the_agent() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let card = json!({
        "name": "pfx", "description": "mounted under a path", "version": "1",
        "supportedInterfaces": [
            {"url": format!("http://{addr}/agents/pfx/"), "protocolBinding": "JSONRPC", "protocolVersion": "1.0"},
            {"url": format!("http://{addr}/agents/pfx/rest"), "protocolBinding": "HTTP+JSON", "protocolVersion": "1.0"},
            {"url": "127.0.0.1:1", "protocolBinding": "GRPC", "protocolVersion": "1.0"}
        ],
        "capabilities": {}, "defaultInputModes": ["text/plain"], "defaultOutputModes": ["text/plain"],
        "skills": [{"id": "p", "name": "p", "tags": ["pfx"]}]
    });
    let hits = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let task = {
        let (card, hits) = (card.to_string(), hits.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (card, hits) = (card.clone(), hits.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let (card, hits) = (card.clone(), hits.clone());
                            async move {
                                let path = req.uri().path().to_string();
                                hits.lock().expect("hits").push(path.clone());
                                Ok::<_, Infallible>(match path.as_str() {
                                    "/agents/pfx/.well-known/agent-card.json" => {
                                        json_response(200, card)
                                    }
                                    "/agents/pfx/" => {
                                        json_response(200, json!({"path": path}).to_string())
                                    }
                                    "/agents/pfx/moved" => {
                                        let mut r = json_response(307, "{}".into());
                                        let to = format!("http://{addr}/agents/pfx/message:send/");
                                        r.headers_mut().insert(
                                            "location",
                                            hyper::header::HeaderValue::from_str(&to)
                                                .expect("location"),
                                        );
                                        r
                                    }
                                    _ => json_response(404, "{}".into()),
                                })
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
                });
            }
        })
    };
    let mesh = mesh_of(&["n0", "n1"], |_, _| {}).await;
    super::attach_url_routable(&mesh, 0, &format!("http://{addr}/agents/pfx"), "pfx").await;
    for node in [0, 1] {
        let (resp, body) = mesh
            .call(
                node,
                "GET",
                "pfx.acme.dmsc",
                "/.well-known/agent-card.json",
                &[],
                "",
            )
            .await
            .expect("card");
        assert_eq!(resp.status(), 200);
        let served: Value = serde_json::from_slice(&body).expect("card");
        assert_eq!(
            endpoint_urls(&served),
            ["http://pfx.acme.dmsc/", "http://pfx.acme.dmsc/rest"],
            "node {node}: {served}"
        );
        // The card's own URL works: the agent sees its path once.
        let (resp, body) = mesh
            .call(node, "POST", "pfx.acme.dmsc", "/", &[], "{}")
            .await
            .expect("call");
        assert_eq!(
            resp.status(),
            200,
            "node {node}: {}",
            String::from_utf8_lossy(&body)
        );
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["path"], "/agents/pfx/");
        // A redirect names the mesh address, never the agent's.
        let (resp, _) = mesh
            .call(node, "GET", "pfx.acme.dmsc", "/moved", &[], "")
            .await
            .expect("call");
        assert_eq!(resp.status(), 307);
        assert_eq!(
            header(&resp, "location"),
            "http://pfx.acme.dmsc/message:send/"
        );
        // gRPC for the card: refused with the reason, the agent never asked.
        let mut send = super::h2c(&mesh, node).await;
        let req =
            hyper::Request::post("http://pfx.acme.dmsc/a2a.v1.A2AService/GetExtendedAgentCard")
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
                .expect("request");
        let resp = send.send_request(req).await.expect("answer");
        let resp = resp.map(|_| ());
        assert_eq!(
            header(&resp, "grpc-status"),
            "3",
            "node {node}: INVALID_ARGUMENT"
        );
        assert!(
            header(&resp, "grpc-message").contains("does not pass an agent card over gRPC"),
            "node {node}: {:?}",
            resp.headers()
        );
        let asked = hits
            .lock()
            .expect("hits")
            .iter()
            .any(|p| p.contains("A2AService"));
        assert!(!asked, "node {node}: the agent was asked");
    }
    task.abort();
    mesh.stop().await;
}
