//! An agent redeployed at the same URL with a new card: its home node
//! fetches the card again (periodically, conditionally, and at once when the
//! agent comes back from being down), and the mesh routes by the new card
//! on every node; a card that cannot be fetched again keeps the last good one.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dmsc_node::demo::mesh::{message_send, LocalMesh};
use dmsc_registry::{AgentId, Health};
use http_body_util::Full;
use hyper::body::Bytes;
use tokio::net::TcpListener;

use super::{eventually, header, mesh_of};

/// How the agent behaves.
const UP: u8 = 0;
/// Serves a broken card (200, not JSON); everything else works, so it
/// stays healthy (its health path is the card path: any answer below 500).
const BAD_CARD: u8 = 1;
/// Answers everything with 503: unhealthy.
const DOWN: u8 = 2;

#[derive(Debug, Default)]
struct CardState {
    /// The skill tag its card lists now.
    tag: Mutex<String>,
    mode: AtomicU8,
    /// Card fetches by a node (`accept: application/json`; the health
    /// checks of the same path send none).
    fetches: AtomicU64,
    /// Of those, conditional ones, and the ones answered 304.
    conditional: AtomicU64,
    not_modified: AtomicU64,
}

/// An A2A 0.3 agent on loopback whose card (one skill, tagged as
/// `state.tag` says) has an ETag and is answered 304 when unchanged.
struct CardAgent {
    state: Arc<CardState>,
    url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CardAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CardAgent {
    async fn start(tag: &str) -> CardAgent {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(CardState::default());
        *state.tag.lock().expect("lock") = tag.to_string();
        let st = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(answer(&st, addr, &req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        CardAgent {
            state,
            url: format!("http://{addr}/"),
            task,
        }
    }

    fn set_tag(&self, tag: &str) {
        *self.state.tag.lock().expect("lock") = tag.to_string();
    }

    fn set_mode(&self, mode: u8) {
        self.state.mode.store(mode, Ordering::SeqCst);
    }
}

fn answer(
    st: &CardState,
    addr: std::net::SocketAddr,
    req: &hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Full<Bytes>> {
    let reply = |status: u16, body: String| {
        hyper::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("response")
    };
    let mode = st.mode.load(Ordering::SeqCst);
    if mode == DOWN {
        return reply(503, "{}".into());
    }
    if req.uri().path() != "/.well-known/agent-card.json" {
        return reply(200, r#"{"jsonrpc":"2.0","id":1,"result":{"kind":"message","role":"agent","messageId":"m","parts":[{"kind":"text","text":"echo"}]}}"#.into());
    }
    let by_node = req
        .headers()
        .get("accept")
        .is_some_and(|v| v == "application/json");
    if by_node {
        st.fetches.fetch_add(1, Ordering::SeqCst);
    }
    if mode == BAD_CARD {
        return reply(200, "{ this is not a card".into());
    }
    let tag = st.tag.lock().expect("lock").clone();
    let etag = format!("\"card-{tag}\"");
    if let Some(sent) = req.headers().get("if-none-match") {
        st.conditional.fetch_add(1, Ordering::SeqCst);
        if sent.as_bytes() == etag.as_bytes() {
            st.not_modified.fetch_add(1, Ordering::SeqCst);
            let mut r = reply(304, String::new());
            *r.body_mut() = Full::new(Bytes::new());
            r.headers_mut()
                .insert("etag", etag.parse().expect("etag value"));
            return r;
        }
    }
    let card = serde_json::json!({
        "name": "echo",
        "description": format!("Echo agent, skill tagged {tag}"),
        "version": "1.0.0",
        "protocolVersion": "0.3.0",
        "url": format!("http://{addr}/"),
        "preferredTransport": "JSONRPC",
        "capabilities": {},
        "defaultInputModes": ["text/plain"],
        "defaultOutputModes": ["text/plain"],
        "skills": [{
            "id": format!("{tag}-skill"),
            "name": format!("{tag} skill"),
            "description": format!("Answers as a {tag}"),
            "tags": [tag],
        }],
    });
    let mut r = reply(200, card.to_string());
    r.headers_mut()
        .insert("etag", etag.parse().expect("etag value"));
    r
}

/// Status and answering agent of a call for `<tag>.cap.acme.dmsc` at node `i`.
async fn by_tag(mesh: &LocalMesh, i: usize, tag: &str) -> (u16, String) {
    let (resp, _) = mesh
        .call(
            i,
            "POST",
            &format!("{tag}.cap.acme.dmsc"),
            "/",
            &[],
            message_send("hello"),
        )
        .await
        .expect("call");
    // A JSON-RPC caller gets the mesh's errors over 200: the kind says
    // which, as its HTTP status.
    let status = dmsc_node::proto::http::ErrorKind::parse(&header(&resp, "dmsc-error"))
        .map_or(resp.status(), |k| k.status());
    (status.as_u16(), header(&resp, "dmsc-agent"))
}

/// Waits until `tag` routes to `acme/echo` on every node and `gone` routes
/// nowhere.
async fn wait_routed_by(mesh: &LocalMesh, tag: &str, gone: &str, within: Duration) {
    let start = std::time::Instant::now();
    loop {
        let mut ok = true;
        for i in 0..mesh.nodes.len() {
            ok &= by_tag(mesh, i, tag).await == (200, "acme/echo".to_string());
            ok &= by_tag(mesh, i, gone).await.0 == 404;
        }
        if ok {
            return;
        }
        assert!(
            start.elapsed() < within,
            "not within {within:?}: `{tag}` routes to acme/echo and `{gone}` nowhere, on every node \
             (now: {tag} {:?}, {gone} {:?} at n0; {tag} {:?}, {gone} {:?} at n1)",
            by_tag(mesh, 0, tag).await,
            by_tag(mesh, 0, gone).await,
            by_tag(mesh, 1, tag).await,
            by_tag(mesh, 1, gone).await,
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The card node `i` serves for the agent at its well-known path.
async fn served_card(mesh: &LocalMesh, i: usize) -> String {
    let (resp, body) = mesh
        .call(
            i,
            "GET",
            "echo.acme.dmsc",
            "/.well-known/agent-card.json",
            &[],
            "",
        )
        .await
        .expect("call");
    assert_eq!(resp.status(), 200);
    String::from_utf8_lossy(&body).into_owned()
}

fn echo() -> AgentId {
    AgentId::new("acme", "echo")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_card_is_routed_by_on_home_and_peers_within_the_refresh_interval() {
    let mesh = mesh_of(&["n0", "n1"], |_, raw| {
        raw.delegation.card_refresh_interval_ms = Some(300);
    })
    .await;
    let agent = CardAgent::start("parrot").await;
    mesh.attach(0, &agent.url, None).await.expect("attach");
    eventually(Duration::from_secs(5), "echo routable everywhere", || {
        mesh.routable_everywhere("echo")
    })
    .await;
    assert_eq!(by_tag(&mesh, 1, "parrot").await, (200, "acme/echo".into()));
    let old_digest = mesh.nodes[0]
        .agents()
        .agents
        .get(&echo())
        .expect("onboarded")
        .digest();

    // Unchanged: conditional fetches, answered 304, change nothing.
    eventually(
        Duration::from_secs(5),
        "a 304 for an unchanged card",
        || agent.state.not_modified.load(Ordering::SeqCst) >= 2,
    )
    .await;
    assert_eq!(
        mesh.nodes[0]
            .agents()
            .agents
            .get(&echo())
            .expect("still there")
            .digest(),
        old_digest
    );

    // Redeployed with a new skill: the mesh follows, on both nodes.
    agent.set_tag("mimic");
    wait_routed_by(&mesh, "mimic", "parrot", Duration::from_secs(5)).await;
    for i in 0..2 {
        let card = served_card(&mesh, i).await;
        assert!(card.contains("mimic") && !card.contains("parrot"), "{card}");
        assert!(
            card.contains("http://echo.acme.dmsc"),
            "URLs rewritten: {card}"
        );
    }
    let home = mesh.nodes[0].agents().agents.get(&echo()).expect("there");
    assert_ne!(home.digest(), old_digest);
    let record = mesh.nodes[1]
        .mesh()
        .read()
        .get(&echo())
        .map(|e| e.record.digest().to_string());
    assert_eq!(
        record,
        Some(home.digest()),
        "the gossiped record names the new card"
    );
    assert_eq!(home.health(), Health::Healthy);
    assert!(agent.state.conditional.load(Ordering::SeqCst) >= 2);
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_card_that_cannot_be_fetched_again_keeps_the_last_good_one() {
    let mesh = mesh_of(&["n0", "n1"], |_, raw| {
        raw.delegation.card_refresh_interval_ms = Some(200);
    })
    .await;
    let agent = CardAgent::start("parrot").await;
    mesh.attach(0, &agent.url, None).await.expect("attach");
    eventually(Duration::from_secs(5), "echo routable everywhere", || {
        mesh.routable_everywhere("echo")
    })
    .await;
    let digest = mesh.nodes[0]
        .agents()
        .agents
        .get(&echo())
        .expect("onboarded")
        .digest();

    // A broken card (200, not JSON), fetched again and again: refused.
    agent.set_mode(BAD_CARD);
    let before = agent.state.fetches.load(Ordering::SeqCst);
    eventually(Duration::from_secs(5), "three refused re-fetches", || {
        agent.state.fetches.load(Ordering::SeqCst) >= before + 3
    })
    .await;
    let home = mesh.nodes[0].agents().agents.get(&echo()).expect("kept");
    assert_eq!(home.digest(), digest, "the last good card is kept");
    assert_eq!(
        home.health(),
        Health::Healthy,
        "a bad card is not ill health"
    );
    for i in 0..2 {
        assert_eq!(by_tag(&mesh, i, "parrot").await, (200, "acme/echo".into()));
        let card = served_card(&mesh, i).await;
        assert!(card.contains("parrot"), "{card}");
    }

    // Fixed, with a new skill: taken at the next fetch.
    agent.set_tag("mimic");
    agent.set_mode(UP);
    wait_routed_by(&mesh, "mimic", "parrot", Duration::from_secs(5)).await;
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_back_from_down_has_its_card_fetched_at_once() {
    // The default refresh interval (60 s): only the recovery can explain
    // a new card within seconds.
    let mesh = mesh_of(&["n0", "n1"], |_, _| {}).await;
    let agent = CardAgent::start("parrot").await;
    mesh.attach(0, &agent.url, None).await.expect("attach");
    eventually(Duration::from_secs(5), "echo routable everywhere", || {
        mesh.routable_everywhere("echo")
    })
    .await;
    let home = mesh.nodes[0]
        .agents()
        .agents
        .get(&echo())
        .expect("onboarded");

    // Down (a redeploy under way), then back with a new card.
    agent.set_mode(DOWN);
    eventually(Duration::from_secs(5), "echo unhealthy", || {
        home.health() == Health::Unhealthy
    })
    .await;
    assert_eq!(by_tag(&mesh, 0, "parrot").await.0, 503, "no healthy agent");
    agent.set_tag("mimic");
    agent.set_mode(UP);
    wait_routed_by(&mesh, "mimic", "parrot", Duration::from_secs(5)).await;
    mesh.stop().await;
}
