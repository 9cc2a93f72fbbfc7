//! Delegation across a real in-process mesh: real QUIC with mutual TLS
//! between nodes, real gossip, real HTTP agents (the built-in sample agent),
//! requests sent to a node's ingress the way an agent would.

mod admin;
mod cancel;
mod card_refresh;
mod drain;
mod edge;
mod extended_card;
mod followup;
mod grpc;
mod hygiene;
mod intent;
mod intercept;
mod limits;
mod listen;
mod midresponse;
mod security;
mod tenancy;
mod tenant_keys;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use dmsc_node::demo::mesh::{message_send, send_message_v10, LocalMesh};
use dmsc_node::demo::sample_agent::{CardDialect, SampleAgent, SampleConfig, SampleSkill};
use http_body_util::BodyExt;

/// The router card of `mesh.acme.dmsc`, as node `i` serves it.
async fn acme_router_card(mesh: &LocalMesh, i: usize) -> serde_json::Value {
    let (resp, body) = mesh
        .call(
            i,
            "GET",
            "mesh.acme.dmsc",
            "/.well-known/agent-card.json",
            &[],
            "",
        )
        .await
        .expect("router card");
    assert_eq!(resp.status(), hyper::StatusCode::OK);
    serde_json::from_slice(&body).expect("json")
}

/// Polls `cond` every 50 ms until it holds or `within` passes.
async fn eventually(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < within, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Attaches `agent` to node `node` and waits until every node can route to it.
async fn attach_routable(mesh: &LocalMesh, node: usize, agent: &SampleAgent, name: &str) {
    attach_url_routable(mesh, node, &agent.url(), name).await;
}

/// Attaches the agent at `url` to `node` and waits until every node can
/// route to `name`.
async fn attach_url_routable(mesh: &LocalMesh, node: usize, url: &str, name: &str) {
    mesh.attach(node, url, None).await.expect("attach");
    eventually(Duration::from_secs(5), "routable", || {
        mesh.routable_everywhere(name)
    })
    .await;
}

/// An HTTP/2 caller (h2c, prior knowledge, as gRPC-style clients speak)
/// on its own connection to node `i`'s ingress.
async fn h2c<B>(mesh: &LocalMesh, i: usize) -> hyper::client::conn::http2::SendRequest<B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect(mesh.ingress(i))
        .await
        .expect("connect to ingress");
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2c with prior knowledge");
    tokio::spawn(conn);
    send
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

async fn agent(name: &str, tags: &[&str], description: &str) -> SampleAgent {
    agent_with(name, tags, description, Duration::ZERO, CardDialect::V03).await
}

/// What [`agent`] runs: one skill with `tags`, an A2A 0.3 card.
fn sample_config(name: &str, tags: &[&str], description: &str) -> SampleConfig {
    SampleConfig {
        name: name.to_string(),
        description: description.to_string(),
        skills: vec![SampleSkill {
            id: format!("{name}-skill"),
            name: description.to_string(),
            description: description.to_string(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            examples: vec![description.to_string()],
        }],
        delay: Duration::ZERO,
        dialect: CardDialect::V03,
    }
}

async fn agent_with(
    name: &str,
    tags: &[&str],
    description: &str,
    delay: Duration,
    dialect: CardDialect,
) -> SampleAgent {
    let cfg = SampleConfig {
        delay,
        dialect,
        ..sample_config(name, tags, description)
    };
    SampleAgent::start(loopback(), cfg)
        .await
        .expect("sample agent")
}

/// The kind of mesh error a caller got, in either shape: a JSON-RPC call's
/// error (HTTP 200, the kind in `error.data`) or a problem document (its
/// `title`, with the HTTP status of the kind). `None` for anything else.
fn refusal_kind(status: hyper::StatusCode, body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let kind = if status == 200 {
        v["error"]["data"]["kind"].as_str()?
    } else {
        v["title"].as_str()?
    };
    Some(kind.to_string())
}

/// Refused by tenant policy, in either shape (see [`refusal_kind`]): a
/// problem document with 403, or a JSON-RPC error.
fn forbidden(status: hyper::StatusCode, body: &str) -> bool {
    (status == 200 || status == 403)
        && matches!(
            refusal_kind(status, body).as_deref(),
            Some("forbidden" | "policy_violation")
        )
}

fn header<B>(resp: &hyper::Response<B>, name: &str) -> String {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

async fn mesh3(tweak: impl Fn(usize, &mut dmsc_node::RawConfig)) -> LocalMesh {
    mesh_of(&["n0", "n1", "n2"], tweak).await
}

/// A mesh of `names` for tenant `acme` with fast gossip, health and load rounds.
async fn mesh_of(names: &[&str], tweak: impl Fn(usize, &mut dmsc_node::RawConfig)) -> LocalMesh {
    LocalMesh::start(names, "acme", |i, raw| {
        raw.gossip.interval_ms = Some(100);
        raw.delegation.health_interval_ms = Some(200);
        raw.delegation.load_interval_ms = Some(100);
        tweak(i, raw)
    })
    .await
    .expect("mesh")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_name_by_capability_and_by_intent_across_nodes() {
    let mesh = mesh3(|_, _| {}).await;
    let billing = agent(
        "billing",
        &["invoice", "billing"],
        "Process and pay invoices",
    )
    .await;
    let translator = agent_with(
        "translator",
        &["translation", "french"],
        "Translate text between English and French",
        Duration::ZERO,
        CardDialect::V10,
    )
    .await;
    let summarizer = agent("summarizer", &["summarization"], "Summarize long reports").await;
    let t0 = Instant::now();
    mesh.attach(0, &billing.url(), None).await.expect("attach");
    mesh.attach(1, &translator.url(), None)
        .await
        .expect("attach");
    mesh.attach(2, &summarizer.url(), None)
        .await
        .expect("attach");
    eventually(Duration::from_secs(5), "agents routable everywhere", || {
        ["billing", "translator", "summarizer"]
            .iter()
            .all(|a| mesh.routable_everywhere(a))
    })
    .await;
    let converged = t0.elapsed();
    assert!(converged < Duration::from_secs(3), "took {converged:?}");

    // By name, from the node that is not billing's home.
    let (resp, body) = mesh
        .call(
            2,
            "POST",
            "billing.acme.dmsc",
            "/",
            &[],
            message_send("pay invoice 42"),
        )
        .await
        .expect("call");
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(header(&resp, "dmsc-agent"), "acme/billing");
    assert_eq!(header(&resp, "dmsc-node"), "n0");
    assert!(String::from_utf8_lossy(&body).contains("billing handled: pay invoice 42"));

    // Proxy form (an agent with HTTP_PROXY pointing at its node): the
    // absolute URI names the target, as curl -x or any HTTP client sends it.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let body = message_send("proxy form");
        let mut s = tokio::net::TcpStream::connect(mesh.ingress(1))
            .await
            .expect("connect");
        let req = format!(
            "POST http://billing.acme.dmsc/ HTTP/1.1\r\nhost: billing.acme.dmsc\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.contains("dmsc-agent: acme/billing"), "{out}");
        assert!(out.contains("billing handled: proxy form"), "{out}");
    }

    // By capability tag.
    let (resp, _) = mesh
        .call(
            0,
            "POST",
            "french.cap.acme.dmsc",
            "/",
            &[],
            send_message_v10("bonjour"),
        )
        .await
        .expect("call");
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "dmsc-agent"), "acme/translator");
    assert_eq!(header(&resp, "dmsc-node"), "n1");
    assert!(
        header(&resp, "dmsc-route").contains("french"),
        "{:?}",
        resp.headers()
    );

    // By intent, both dialects and the header form.
    for (node, body, want) in [
        (
            0,
            message_send("please summarize this long report"),
            "acme/summarizer",
        ),
        (
            1,
            send_message_v10("translate this to French"),
            "acme/translator",
        ),
        (2, message_send("I need to pay an invoice"), "acme/billing"),
    ] {
        let (resp, rbody) = mesh
            .call(node, "POST", "mesh.acme.dmsc", "/", &[], body)
            .await
            .expect("call");
        assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&rbody));
        assert_eq!(header(&resp, "dmsc-agent"), want);
    }
    let (resp, _) = mesh
        .call(
            1,
            "GET",
            "mesh.acme.dmsc",
            "/status",
            &[("dmsc-intent", "invoices billing")],
            "",
        )
        .await
        .expect("call");
    assert_eq!(header(&resp, "dmsc-agent"), "acme/billing");

    // The card through the mesh: URLs rewritten, ETag and 304 work.
    let (resp, card) = mesh
        .call(
            0,
            "GET",
            "translator.acme.dmsc",
            "/.well-known/agent-card.json",
            &[],
            "",
        )
        .await
        .expect("card");
    assert_eq!(resp.status(), 200);
    let text = String::from_utf8_lossy(&card);
    assert!(
        !text.contains(&translator.addr.to_string()),
        "agent address leaked: {text}"
    );
    assert!(text.contains("http://translator.acme.dmsc/"), "{text}");
    let etag = header(&resp, "etag");
    let (resp, _) = mesh
        .call(
            2,
            "GET",
            "translator.acme.dmsc",
            "/.well-known/agent-card.json",
            &[("if-none-match", &etag)],
            "",
        )
        .await
        .expect("card");
    assert_eq!(resp.status(), 304);
    // Compared weakly (RFC 9110), as caches send it back.
    let weak = format!("\"other\", W/{etag}");
    let (resp, _) = mesh
        .call(
            2,
            "GET",
            "translator.acme.dmsc",
            "/.well-known/agent-card.json",
            &[("if-none-match", &weak)],
            "",
        )
        .await
        .expect("card");
    assert_eq!(resp.status(), 304, "{weak}");

    // Tenant isolation and unknown targets fail clearly.
    let (resp, body) = mesh
        .call(0, "GET", "billing.other.dmsc", "/", &[], "")
        .await
        .expect("call");
    assert_eq!(resp.status(), 403);
    assert!(String::from_utf8_lossy(&body).contains("cross-tenant"));
    let (resp, body) = mesh
        .call(0, "POST", "nobody.acme.dmsc", "/", &[], message_send("hi"))
        .await
        .expect("call");
    // A JSON-RPC caller gets the mesh's error as JSON-RPC, over HTTP 200
    // (what the A2A SDKs read), the kind in `dmsc-error` too.
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "dmsc-error"), "unknown-agent");
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json-rpc error");
    assert_eq!(v["error"]["code"], -32051, "{v}");
    assert_eq!(v["id"], 1, "JSON-RPC error echoes the id: {v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("nobody"));

    // Metrics count both sides of a delegation.
    let home = mesh.nodes[0].metrics_text().await;
    let inbound = home
        .lines()
        .find(|l| l.starts_with("dmsc_delegations_inbound_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<u64>().ok())
        .expect("inbound counter");
    assert!(inbound >= 1, "{home}");
    let caller = mesh.nodes[2].metrics_text().await;
    assert!(
        caller.contains("dmsc_delegations_total{tenant=\"acme\",outcome=\"ok\"}"),
        "{caller}"
    );

    // Status shows the agent table.
    let status = mesh.nodes[0].status().await;
    assert_eq!(status.agents.len(), 3, "{:?}", status.agents);
    assert!(status.agents.iter().any(|a| a.name == "translator"
        && a.node == "n1"
        && a.tags.contains(&"french".to_string())));
    assert!(status.render().contains("TENANT"));
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_stops_receiving_and_callers_keep_succeeding() {
    let mesh = mesh3(|_, _| {}).await;
    let a = agent("worker-a", &["work"], "does work").await;
    let b = agent("worker-b", &["work"], "does work").await;
    mesh.attach(1, &a.url(), None).await.expect("attach");
    mesh.attach(2, &b.url(), None).await.expect("attach");
    eventually(Duration::from_secs(5), "both routable", || {
        mesh.routable_everywhere("worker-a") && mesh.routable_everywhere("worker-b")
    })
    .await;
    for _ in 0..20 {
        let (resp, _) = mesh
            .call(
                0,
                "POST",
                "work.cap.acme.dmsc",
                "/",
                &[],
                message_send("job"),
            )
            .await
            .expect("call");
        assert_eq!(resp.status(), 200);
    }
    let (served_a, served_b) = (
        a.state.served.load(Ordering::Relaxed),
        b.state.served.load(Ordering::Relaxed),
    );
    assert_eq!(served_a + served_b, 20);
    // Kill the agent that was getting the work (P2C prefers the one with
    // the lower expected wait, so at this light load one may get it all).
    let (victim, survivor, survivor_name) = if served_a >= served_b {
        (a, b, "acme/worker-b")
    } else {
        (b, a, "acme/worker-a")
    };
    let victim_name = if survivor_name == "acme/worker-b" {
        "worker-a"
    } else {
        "worker-b"
    };
    let victim_addr = victim.addr;
    drop(victim); // the agent process dies: its port refuses connections
                  // Dropping aborts its tasks, which takes effect at their next poll:
                  // wait until the port really refuses, as a dead process's would.
    eventually(
        Duration::from_secs(2),
        "victim port refuses connections",
        || std::net::TcpStream::connect(victim_addr).is_err(),
    )
    .await;
    let before = survivor.state.served.load(Ordering::Relaxed);
    for i in 0..40 {
        let (resp, body) = mesh
            .call(
                0,
                "POST",
                "work.cap.acme.dmsc",
                "/",
                &[],
                message_send("job"),
            )
            .await
            .expect("call");
        assert_eq!(
            resp.status(),
            200,
            "request {i}: {}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(header(&resp, "dmsc-agent"), survivor_name);
    }
    assert_eq!(survivor.state.served.load(Ordering::Relaxed), before + 40);
    // Its home node marks it unhealthy, and every node learns so.
    let id = dmsc_registry::AgentId::new("acme", victim_name);
    eventually(
        Duration::from_secs(5),
        "victim unhealthy everywhere",
        || {
            mesh.nodes.iter().all(|n| {
                n.mesh()
                    .read()
                    .get(&id)
                    .is_some_and(|e| e.record.health() == dmsc_registry::Health::Unhealthy)
            })
        },
    )
    .await;
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erroring_agent_gets_its_circuit_opened_and_later_closed() {
    let mesh = mesh3(|_, raw| {
        raw.delegation.circuit_failures = Some(3);
        raw.delegation.circuit_open_ms = Some(400);
    })
    .await;
    let bad = agent("flaky", &["calc"], "calculates").await;
    let good = agent("steady", &["calc"], "calculates").await;
    mesh.attach(1, &bad.url(), None).await.expect("attach");
    mesh.attach(2, &good.url(), None).await.expect("attach");
    eventually(Duration::from_secs(5), "both routable", || {
        mesh.routable_everywhere("flaky") && mesh.routable_everywhere("steady")
    })
    .await;
    bad.state.fail.store(true, Ordering::Relaxed);
    let id = dmsc_registry::AgentId::new("acme", "flaky");
    let circuit = |m: &LocalMesh| m.nodes[0].mesh().circuit_state(&id).to_string();
    // Errors by name (capability routing would steer around it anyway).
    for i in 0..3 {
        let (resp, _) = mesh
            .call(0, "POST", "flaky.acme.dmsc", "/", &[], message_send("1+1"))
            .await
            .expect("call");
        assert_eq!(resp.status(), 500, "error {i} passes through");
    }
    assert_eq!(circuit(&mesh), "open");
    // While open: the agent sees nothing, by name is refused at once, by
    // capability goes to the steady agent.
    let before = bad.state.served.load(Ordering::Relaxed);
    let (resp, body) = mesh
        .call(0, "POST", "flaky.acme.dmsc", "/", &[], "plain")
        .await
        .expect("call");
    assert_eq!(resp.status(), 503, "{}", String::from_utf8_lossy(&body));
    assert!(
        String::from_utf8_lossy(&body).contains("circuit"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    for _ in 0..10 {
        let (resp, _) = mesh
            .call(
                0,
                "POST",
                "calc.cap.acme.dmsc",
                "/",
                &[],
                message_send("1+1"),
            )
            .await
            .expect("call");
        assert_eq!(resp.status(), 200);
        assert_eq!(header(&resp, "dmsc-agent"), "acme/steady");
    }
    assert_eq!(bad.state.served.load(Ordering::Relaxed), before);
    let status = mesh.nodes[0].status().await;
    assert!(status
        .agents
        .iter()
        .any(|a| a.name == "flaky" && a.circuit == "open"));
    // The agent recovers; after the open period a probe closes the circuit.
    bad.state.fail.store(false, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(450)).await;
    let start = Instant::now();
    while circuit(&mesh) != "closed" {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "circuit stays {}",
            circuit(&mesh)
        );
        let _ = mesh
            .call(
                0,
                "POST",
                "flaky.acme.dmsc",
                "/",
                &[],
                message_send("probe"),
            )
            .await
            .expect("call");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_holds_across_two_hops() {
    let mesh = mesh3(|_, _| {}).await;
    let slow = agent_with(
        "slow",
        &["slow"],
        "takes its time",
        Duration::from_secs(3),
        CardDialect::V03,
    )
    .await;
    attach_routable(&mesh, 2, &slow, "slow").await;
    let start = Instant::now();
    let (resp, body) = mesh
        .call(
            0,
            "POST",
            "slow.acme.dmsc",
            "/",
            &[("dmsc-timeout", "300ms")],
            message_send("hurry"),
        )
        .await
        .expect("call");
    let took = start.elapsed();
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(header(&resp, "dmsc-error"), "timeout");
    assert_eq!(
        refusal_kind(resp.status(), &String::from_utf8_lossy(&body)).as_deref(),
        Some("timeout")
    );
    assert!(took >= Duration::from_millis(290), "took {took:?}");
    // The home node (n2) enforced the deadline itself: it counts an inbound
    // delegation that ran out of time, and it did so while the agent (3 s)
    // had not answered, so it did not wait for the agent either. (Whose
    // verdict reaches the caller first is a race this does not depend on.)
    let home = mesh.nodes[2].metrics().delegation.inbound.clone();
    let timed_out = || {
        home.get_or_create(&dmsc_node::metrics::DelegationLabels {
            tenant: "acme".into(),
            outcome: "timeout".into(),
        })
        .get()
    };
    eventually(
        Duration::from_secs(2),
        "the home node counts the timeout",
        || timed_out() == 1,
    )
    .await;
    assert_eq!(
        slow.state.served.load(Ordering::Relaxed),
        0,
        "the agent had not answered when the home node gave up"
    );
    mesh.stop().await;
}

/// Python's `http.server` as people run it: HTTP/1.0, the answer read to
/// the close (no length). It reaches HTTP/1.1 callers whole and in HTTP/1.1
/// (the version is the hop's), from a local agent and through a second
/// node, on every call (no connection is reused after a close).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_1_0_agents_answers_reach_callers_whole_in_http_1_1() {
    let script = r#"
import http.server, json
CARD = json.dumps({"name": "oldtimer", "description": "an HTTP/1.0 agent", "url": "http://x/",
    "version": "1", "capabilities": {}, "defaultInputModes": ["text/plain"],
    "defaultOutputModes": ["text/plain"],
    "skills": [{"id": "old", "name": "old", "description": "old", "tags": ["old"]}]}).encode()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("content-type", "application/json" if "agent" in self.path else "text/plain")
        self.end_headers()
        self.wfile.write(CARD if "agent" in self.path else b"to the close " * 4000)
    def log_message(self, *a): pass
s = http.server.HTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"#;
    let mut child = tokio::process::Command::new("python3")
        .args(["-c", script])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs");
    let mut out = tokio::io::BufReader::new(child.stdout.take().expect("piped"));
    let mut port = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut out, &mut port)
        .await
        .expect("port");
    let mesh = mesh_of(&["n0", "n1"], |_, _| {}).await;
    attach_url_routable(
        &mesh,
        0,
        &format!("http://127.0.0.1:{}", port.trim()),
        "oldtimer",
    )
    .await;
    for node in [0, 1, 0, 1] {
        let (resp, body) = mesh
            .call(node, "GET", "oldtimer.acme.dmsc", "/", &[], "")
            .await
            .expect("answered");
        assert_eq!(resp.status(), 200, "node {node}");
        assert_eq!(resp.version(), hyper::Version::HTTP_11, "node {node}");
        assert_eq!(body, "to the close ".repeat(4000), "node {node}");
    }
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_response_flows_through_two_nodes_as_it_comes() {
    let mesh = mesh3(|_, _| {}).await;
    let streamer = agent("streamer", &["stream"], "streams answers").await;
    attach_routable(&mesh, 1, &streamer, "streamer").await;
    let body = serde_json::json!({
        "jsonrpc": "2.0", "id": 9, "method": "message/stream",
        "params": {"message": {"role": "user", "messageId": "m", "parts": [{"kind": "text", "text": "go"}]}}
    })
    .to_string();
    let start = Instant::now();
    let resp = mesh
        .send(
            0,
            "POST",
            "streamer.acme.dmsc",
            "/",
            &[],
            dmsc_node::proto::http::full(body),
        )
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let mut events = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("frame").into_data() {
            events.push((start.elapsed(), String::from_utf8_lossy(&data).into_owned()));
        }
    }
    let all: String = events.iter().map(|(_, e)| e.as_str()).collect();
    assert_eq!(all.matches("data: ").count(), 3, "{all}");
    // The agent spaces its events 100 ms apart: the first must arrive well
    // before the last, or the mesh buffered the stream.
    let first = events.first().expect("events").0;
    let last = events.last().expect("events").0;
    assert!(
        last - first >= Duration::from_millis(150),
        "first {first:?} last {last:?}"
    );
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_onboard_and_leave_through_the_admin_api() {
    let mesh = mesh3(|_, _| {}).await;
    let a = agent("helper", &["help"], "helps").await;
    let admin = mesh.nodes[1].bound().admin;
    let client = dmsc_node::forward::client::Upstream::new();
    let bearer = format!("Bearer {}", mesh.admin_token(1));
    let onboard = serde_json::json!({"tenant": "acme", "url": a.url(), "name": "helper-1"});
    // Without the admin token (any local process, any tenant): refused.
    let req = hyper::Request::post(format!("http://{admin}/v1/agents"))
        .body(dmsc_node::proto::http::full(onboard.to_string()))
        .expect("req");
    let resp = client.h1.request(req).await.expect("post");
    assert_eq!(resp.status(), 401);
    // A browser reaching the port through DNS rebinding: refused.
    let req = hyper::Request::get(format!("http://{admin}/v1/status"))
        .header("host", "evil.example:80")
        .body(dmsc_node::proto::http::empty())
        .expect("req");
    assert_eq!(client.h1.request(req).await.expect("get").status(), 403);
    let req = hyper::Request::post(format!("http://{admin}/v1/agents"))
        .header("authorization", &bearer)
        .body(dmsc_node::proto::http::full(onboard.to_string()))
        .expect("req");
    let resp = client.h1.request(req).await.expect("post");
    assert_eq!(resp.status(), 201);
    eventually(Duration::from_secs(5), "routable", || {
        mesh.routable_everywhere("helper-1")
    })
    .await;
    // The same name on another node: refused (one home per agent name in a
    // tenant), and the first stays where it is.
    let req = hyper::Request::post(format!("http://{}/v1/agents", mesh.nodes[2].bound().admin))
        .header("authorization", format!("Bearer {}", mesh.admin_token(2)))
        .body(dmsc_node::proto::http::full(onboard.to_string()))
        .expect("req");
    let resp = client.h1.request(req).await.expect("post");
    assert_eq!(resp.status(), 409);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("already served by node `n1`"), "{body}");
    let id = dmsc_registry::AgentId::new("acme", "helper-1");
    for n in &mesh.nodes {
        assert_eq!(
            n.mesh()
                .read()
                .get(&id)
                .map(|e| e.node.to_string())
                .as_deref(),
            Some("n1")
        );
    }
    // An agent that cannot be onboarded yet is a clear answer, not a
    // crash: accepted as pending (retried each health round, as a declared
    // one is), and DELETE stops it.
    let req = hyper::Request::post(format!("http://{admin}/v1/agents"))
        .header("authorization", &bearer)
        .body(dmsc_node::proto::http::full(
            serde_json::json!({"tenant": "acme", "url": "http://127.0.0.1:1", "name": "later"})
                .to_string(),
        ))
        .expect("req");
    let resp = client.h1.request(req).await.expect("post");
    assert_eq!(resp.status(), 202);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v["pending"], true, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .contains("cannot fetch the agent card"),
        "{v}"
    );
    let pending = |n: &LocalMesh| {
        n.nodes[1]
            .agents()
            .agents
            .pending()
            .iter()
            .any(|(s, _)| s.name.as_deref() == Some("later"))
    };
    assert!(pending(&mesh));
    // `status` names it (what DELETE takes) and says what a card-less agent needs.
    let report = dmsc_node::admin::status::fetch_with(admin, None)
        .await
        .expect("status");
    let p = report
        .pending_agents
        .iter()
        .find(|p| p.name.as_deref() == Some("later"))
        .expect("pending agent named");
    assert!(
        p.error.contains("declare its `name` and `skills`"),
        "{}",
        p.error
    );
    for expected in [204, 404] {
        let req = hyper::Request::delete(format!("http://{admin}/v1/agents/acme/later"))
            .header("authorization", &bearer)
            .body(dmsc_node::proto::http::empty())
            .expect("req");
        let resp = client.h1.request(req).await.expect("delete");
        assert_eq!(resp.status(), expected);
    }
    assert!(!pending(&mesh), "no longer retried");
    let req = hyper::Request::delete(format!("http://{admin}/v1/agents/acme/helper-1"))
        .header("authorization", &bearer)
        .body(dmsc_node::proto::http::empty())
        .expect("req");
    let resp = client.h1.request(req).await.expect("delete");
    assert_eq!(resp.status(), 204);
    let id = dmsc_registry::AgentId::new("acme", "helper-1");
    eventually(Duration::from_secs(5), "gone everywhere", || {
        mesh.nodes
            .iter()
            .all(|n| n.mesh().read().get(&id).is_none())
    })
    .await;
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_agents_leave_every_candidate_set() {
    let mut mesh = mesh3(|_, raw| raw.gossip.interval_ms = Some(100)).await;
    let a = agent("edge", &["edge"], "edge work").await;
    let b = agent("core", &["edge"], "edge work").await;
    mesh.attach(2, &a.url(), None).await.expect("attach");
    mesh.attach(1, &b.url(), None).await.expect("attach");
    eventually(Duration::from_secs(5), "routable", || {
        mesh.routable_everywhere("edge") && mesh.routable_everywhere("core")
    })
    .await;
    // Node n2 dies abruptly (dropped, no goodbye).
    let n2 = mesh.nodes.pop().expect("node");
    drop(n2);
    let id = dmsc_registry::AgentId::new("acme", "edge");
    let start = Instant::now();
    eventually(Duration::from_secs(10), "edge gone from n0 and n1", || {
        mesh.nodes
            .iter()
            .all(|n| n.mesh().read().get(&id).is_none())
    })
    .await;
    eprintln!(
        "dead node's agent left the candidate sets after {:?}",
        start.elapsed()
    );
    for _ in 0..5 {
        let (resp, _) = mesh
            .call(0, "POST", "edge.cap.acme.dmsc", "/", &[], message_send("x"))
            .await
            .expect("call");
        assert_eq!(resp.status(), 200);
        assert_eq!(header(&resp, "dmsc-agent"), "acme/core");
    }
    // Called by name, the dead node's agent is not "unknown": its home went
    // away, and it may come back (503, retry later; was 404).
    let (resp, body) = mesh
        .call(0, "GET", "edge.acme.dmsc", "/", &[], "")
        .await
        .expect("call");
    let body = String::from_utf8_lossy(&body);
    assert_eq!(resp.status(), 503, "{body}");
    assert_eq!(header(&resp, "dmsc-error"), "none-available");
    assert!(body.contains("home node `n2` went away"), "{body}");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_gives_up_frees_the_agent_on_the_home_node() {
    let mesh = mesh3(|_, _| {}).await;
    let slow = agent_with(
        "sleepy",
        &["sleep"],
        "sleeps",
        Duration::from_secs(5),
        CardDialect::V03,
    )
    .await;
    attach_routable(&mesh, 1, &slow, "sleepy").await;
    let id = dmsc_registry::AgentId::new("acme", "sleepy");
    let home = mesh.nodes[1].agents().agents.get(&id).expect("local agent");
    // The client gives up after 300 ms (drops the request).
    let call = mesh.call(0, "POST", "sleepy.acme.dmsc", "/", &[], message_send("zzz"));
    assert!(tokio::time::timeout(Duration::from_millis(300), call)
        .await
        .is_err());
    // Both nodes let go well before the agent would have answered (5 s):
    // the caller's outstanding count and the home node's in-flight count.
    let start = Instant::now();
    eventually(
        Duration::from_secs(2),
        "in-flight back to zero on both nodes",
        || {
            home.in_flight.load(Ordering::Relaxed) == 0
                && mesh.nodes[0].mesh().outstanding(&id) == 0
        },
    )
    .await;
    eprintln!("released after {:?}", start.elapsed());
    mesh.stop().await;
}
